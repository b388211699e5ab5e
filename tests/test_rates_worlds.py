"""Tests of C2 and C3 in the finite worlds, where chi-square and KL balls move REBEL's target.

The exact bias ||theta^rho - theta*||_Sigma^2 is checked against its small-radius closed
form, its local exponents against the claimed rates, the covering radius q / n against the
coverage it promises, and the sampled slopes against the rates with tolerances that a ball
that did not act (slope -1 at c / sqrt(n)) would fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from drosim.paper_checks import VERDICTS, CheckResult, load_check
from drosim.paper_checks import rates as check
from drosim.stats import loglog_slope
from drosim.studies import coverage, rates

TINY_WORLDS = {"sizes": (2**10, 2**12, 2**14), "trials": 16,
               "exact_sizes": tuple(4**k for k in range(5, 17))}


def test_local_exponents_read_a_power_law_and_skip_rounding_level() -> None:
    n = 2.0 ** np.arange(4, 12)

    np.testing.assert_allclose(rates.local_exponents(n, 3.0 * n**-0.5), -0.5)
    assert np.isnan(rates.local_exponents(n, np.full(n.shape, 1e-30))).all()
    with pytest.raises(ValueError, match="two sizes"):
        rates.local_exponents(n[:1], n[:1])


@pytest.mark.parametrize("family", rates.FINITE_FAMILIES)
def test_exact_bias_matches_its_small_radius_closed_form(family: str) -> None:
    # For small rho both balls give sup_Q E_Q l = E_P l + sqrt(2 rho Var_P l) + O(rho), so
    # theta^rho - theta* = -sqrt(2 rho) H^-1 grad sqrt(Var_P l)(theta*) + O(rho), H the
    # Hessian of E_P l: the squared bias is rho times a constant of P alone.
    world, laws = coverage.world_outcomes("skewed")
    dphi, dr = laws.rebel.atoms[:, :-1], laws.rebel.atoms[:, -1]
    probs = laws.rebel.probs
    sigma = world.pair_covariance(world.features.new_zeros(world.dim))
    second = torch.einsum("s,sd,se->de", probs, dphi, dphi)
    theta_star = torch.linalg.solve(second, torch.einsum("s,sd,s->d", probs, dphi, dr))
    w = theta_star.clone().requires_grad_(True)
    losses = (dr - dphi @ w).square()
    spread = (probs * (losses - (probs * losses).sum()).square()).sum().sqrt()
    (gradient,) = torch.autograd.grad(spread, w)
    shift = -torch.linalg.solve(2 * second, gradient)  # per sqrt(2 rho)
    rho = 2.0**-30
    closed_form = 2 * rho * shift @ sigma @ shift

    exact = rates.exact_bias("skewed", [2**60, 2**62], c=1.0, level=0.9)
    bias = exact.loc[(exact["family"] == family) & (exact["n"] == 2**60)  # rho = 2^-30
                     & (exact["schedule"] == rates.SLOW_RADIUS), "bias"].item()
    assert bias == pytest.approx(float(closed_form), rel=1e-3)


def test_exact_bias_reaches_the_claimed_exponents_where_the_balls_act() -> None:
    sizes = [4**k for k in range(12, 17)]  # 2^24 .. 2^32
    for world in ("skewed", "misspecified"):
        exact = rates.exact_bias(world, sizes, c=1.0, level=0.9)
        last = exact[exact["n"] == sizes[-1]].set_index(["family", "schedule"])["exponent"]
        for family in rates.FINITE_FAMILIES:
            assert last[(family, rates.SLOW_RADIUS)] == pytest.approx(-0.5, abs=0.01)
            assert last[(family, rates.FAST_RADIUS)] == pytest.approx(-1.0, abs=0.01)
        # Far from its limit at moderate n: the C2 exponent is above -1/2 at n = 2^16.
        early = rates.exact_bias(world, [2**14, 2**16, 2**18], c=1.0, level=0.9)
        slow = early[(early["n"] == 2**16) & (early["schedule"] == rates.SLOW_RADIUS)]
        assert (slow["exponent"] > -0.495).all()

    idle = rates.exact_bias("well-specified", sizes, c=1.0, level=0.9)
    assert idle["bias"].max() < 1e-20 and idle["exponent"].isna().all()


def test_q_over_n_covers_p_at_its_level() -> None:
    # n D(P || P_n) -> chi^2_{S-1} / 2: at n = 2^16 the q / n ball holds P in about 90% of
    # the samples (400 samples: binomial standard error 0.015).
    _, laws = coverage.world_outcomes("skewed")
    q, gamma = rates.covering_radii(laws.rebel.size, 1.0, 0.9)[rates.FAST_RADIUS]
    n = 2**16
    counts = np.random.default_rng(0).multinomial(n, laws.probs.numpy(), size=400)
    freq = laws.rebel.weights(torch.from_numpy(counts / n))
    found = coverage.divergences(laws.rebel.probs, freq)

    assert gamma == 1.0 and laws.rebel.size == 38
    for family in rates.FINITE_FAMILIES:
        assert float((found[family] <= q / n).double().mean()) == pytest.approx(0.9, abs=0.05)


@pytest.fixture(scope="module")
def worlds_frame() -> pd.DataFrame:
    return rates.run_worlds("quick", **TINY_WORLDS)


def test_run_worlds_frame(worlds_frame: pd.DataFrame) -> None:
    frame = worlds_frame
    assert list(frame.columns) == rates.WORLD_COLUMNS
    assert set(frame["world"]) == {"skewed", "misspecified"}
    cells = 2 * (1 + 2 * len(rates.FINITE_FAMILIES))  # worlds x (REBEL + family x schedule)
    assert len(frame) == cells * len(TINY_WORLDS["sizes"]) * TINY_WORLDS["trials"]
    plain = frame[frame["family"] == "none"]
    assert (plain["rho"] == 0).all() and not plain["covered"].any()
    assert (plain["bias"] == 0).all()
    robust = frame[frame["family"] != "none"]
    assert (robust["bias"] > 1e-6).all()
    assert robust.loc[robust["n"] == 2**14, "covered"].mean() > 0.8


def test_sampled_slopes_show_the_ball_acting(worlds_frame: pd.DataFrame) -> None:
    table = rates.world_slopes(worlds_frame).set_index(["world", "method", "schedule"])
    for world in ("skewed", "misspecified"):
        assert -1.3 <= table.loc[(world, "REBEL", "none"), "slope"] <= -0.7
        for method in ("chi2-REBEL", "KL-REBEL"):
            # An idle ball would give least squares' -1 at c / sqrt(n) as well.
            assert -0.75 <= table.loc[(world, method, "c/sqrt(n)"), "slope"] <= -0.3
            assert -1.25 <= table.loc[(world, method, "q/n"), "slope"] <= -0.75
    # The exact slope is the secant of the exact bias on the covered range.
    row = table.loc[("skewed", "chi2-REBEL", "c/sqrt(n)")]
    bias = worlds_frame[(worlds_frame["world"] == "skewed")
                        & (worlds_frame["method"] == "chi2-REBEL")
                        & (worlds_frame["schedule"] == "c/sqrt(n)")].groupby("n")["bias"].first()
    secant = np.log(bias[row["n_max"]] / bias[row["n_min"]]) / np.log(row["n_max"] / row["n_min"])
    assert row["exact_slope"] == pytest.approx(secant)
    assert loglog_slope(worlds_frame[worlds_frame["family"] == "none"], "n", "error").high < 0


def test_sampling_is_deterministic_under_a_seed(worlds_frame: pd.DataFrame) -> None:
    again = rates.run_worlds("quick", **TINY_WORLDS)
    other = rates.run_worlds("quick", **(TINY_WORLDS | {"seed": 1}))

    pd.testing.assert_frame_equal(worlds_frame, again)
    assert not np.allclose(worlds_frame["error"], other["error"])


def test_a_cell_fails_when_the_exact_exponent_misses_the_claim() -> None:
    exact = rates.exact_bias("skewed", [4**k for k in range(8, 17)], c=1.0, level=0.9)
    row = pd.Series({"world": "skewed", "method": "chi2-REBEL", "family": "chi2",
                     "schedule": rates.SLOW_RADIUS, "slope": -0.42, "low": -0.45,
                     "high": -0.39, "exact_slope": -0.42, "coverage": 1.0})
    assert check._finite_reading(row, exact).startswith("C2 holds")

    stalled = exact.assign(exponent=np.where(exact["n"] == exact["n"].max(), -0.4,
                                             exact["exponent"]))
    assert check._finite_reading(row, stalled).startswith("C2 fails")
    slower = row.copy()
    slower[["slope", "low", "high"]] = (-0.2, -0.25, -0.15)  # slower than its own bias
    assert check._finite_reading(slower, exact).startswith("C2 fails")


def test_the_check_reports_every_world(tmp_path: Path) -> None:
    result = load_check("rates").run(
        "quick", out=tmp_path, finite=TINY_WORLDS, n_grid=(32, 64), dim=3, d_grid=(2, 4),
        samples=32, trials=5)

    assert isinstance(result, CheckResult) and result.verdict in VERDICTS
    assert result.claim == "C2, C3" and result.paper_says
    assert {"gaussian", "skewed", "misspecified"} <= set(result.stats["world"])
    assert set(result.table["world"]) == {"gaussian", "well-specified", "skewed",
                                          "misspecified"}
    assert result.stats.loc[result.stats["study"] == "exact bias", "x"].max() == 2**32
    assert "never holds for a continuous P" in result.measured
    assert "well-specified world: not testable here" in result.measured
    assert result.reason and result.headline and "2^32" in result.headline
    for name in ("rate_n.png", "rate_d.pdf", "rate_worlds.png", "rate_worlds.pdf"):
        assert (tmp_path / name).stat().st_size > 0
