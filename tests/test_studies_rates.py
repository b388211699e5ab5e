"""Tests of the Monte-Carlo studies (rates, constants) and of the paper checks built on them.

Every study runs here on a tiny grid (a few trials, two or three grid points), so the whole
file takes seconds; the real property (REBEL's error falls like 1 / n) uses enough trials
for its slope to be tight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from drosim.methods import Method
from drosim.paper_checks import VERDICTS, CheckResult, load_check
from drosim.stats import loglog_slope
from drosim.studies import constants, rates
from drosim.studies.montecarlo import UNSCHEDULED, resolve_preset, scheduled_methods

# One method per family and loss, so every code path of the studies runs.
METHODS = [
    Method("REBEL"),
    Method("chi2-REBEL", "rebel", "chi2", 0.1, 1.0),
    Method("W-REBEL", "rebel", "wasserstein", 0.1, 0.0),
    Method("DPO", "dpo"),
    Method("KL-DPO", "dpo", "kl_temperature", 1.0),
]
TINY_RATES = {"n_grid": (32, 64), "dim": 3, "d_grid": (2, 4), "samples": 32, "trials": 5}
TINY_CONSTANTS = {"scales": (0.5, 2.0), "n": 32, "dim": 3, "trials": 5}


@pytest.fixture(scope="module")
def rates_frame() -> pd.DataFrame:
    return rates.run("quick", methods=METHODS, progress=False, **TINY_RATES)


@pytest.fixture(scope="module")
def constants_frame() -> pd.DataFrame:
    return constants.run("quick", progress=False, **TINY_CONSTANTS)


def test_rates_frame_has_one_positive_error_per_trial(rates_frame: pd.DataFrame) -> None:
    assert list(rates_frame.columns) == rates.COLUMNS
    settings = len(TINY_RATES["n_grid"]) + len(TINY_RATES["d_grid"])
    assert len(rates_frame) == settings * len(METHODS) * TINY_RATES["trials"]
    assert np.isfinite(rates_frame["error"]).all() and (rates_frame["error"] > 0).all()
    by_study = rates_frame.groupby("study")
    assert set(by_study.get_group("n")["n"]) == set(TINY_RATES["n_grid"])
    assert set(by_study.get_group("d")["d"]) == set(TINY_RATES["d_grid"])
    assert set(rates_frame["schedule"]) == {UNSCHEDULED, "c/n", "fixed"}


def test_rates_is_deterministic_under_a_seed(rates_frame: pd.DataFrame) -> None:
    again = rates.run("quick", methods=METHODS, progress=False, **TINY_RATES)
    other = rates.run("quick", methods=METHODS, progress=False, seed=1, **TINY_RATES)

    pd.testing.assert_frame_equal(rates_frame, again)
    assert not np.allclose(rates_frame["error"], other["error"])


def test_chunking_does_not_change_the_numbers(rates_frame: pd.DataFrame) -> None:
    # A budget of one byte forces one trial per chunk.
    chunked = rates.run("quick", methods=METHODS, progress=False, memory_budget=1,
                        **TINY_RATES)

    pd.testing.assert_frame_equal(rates_frame, chunked)


def test_more_trials_keep_the_first_ones() -> None:
    small = rates.run("quick", methods=METHODS[:1], progress=False, **TINY_RATES)
    large = rates.run("quick", methods=METHODS[:1], progress=False,
                      **(TINY_RATES | {"trials": 40}))

    head = large[large["trial"] < TINY_RATES["trials"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(small, head, check_dtype=False)


def test_methods_share_pairs_within_a_setting() -> None:
    # Two copies of REBEL under different names must make identical errors.
    twins = [Method("REBEL"), Method("REBEL twin")]
    frame = rates.run("quick", methods=twins, progress=False, **TINY_RATES)
    errors = frame.pivot_table(index=["study", "n", "d", "trial"], columns="method",
                               values="error")
    np.testing.assert_array_equal(errors["REBEL"], errors["REBEL twin"])


def test_slopes_table_has_one_row_per_method_schedule_study(rates_frame: pd.DataFrame) -> None:
    table = rates.slopes(rates_frame)

    assert list(table.columns) == ["method", "schedule", "study", "slope", "low", "high"]
    assert len(table) == 2 * len(METHODS)
    assert (table["low"] <= table["slope"]).all() and (table["slope"] <= table["high"]).all()


def test_rates_plot_writes_both_figures(rates_frame: pd.DataFrame, tmp_path: Path) -> None:
    paths = rates.plot(rates_frame, tmp_path)

    names = {p.name for p in paths}
    assert names == {"rate_n.png", "rate_n.pdf", "rate_d.png", "rate_d.pdf"}
    assert all(p.stat().st_size > 0 for p in paths)


def test_rebel_error_falls_like_one_over_n() -> None:
    # Least squares in a noisy well-specified world: E||theta_hat - theta*||_Sigma^2 is
    # about sigma^2 d / n, a slope of -1 on log-log axes.
    frame = rates.run("quick", methods=[Method("REBEL")], progress=False,
                      n_grid=(128, 256, 512, 1024), d_grid=(), dim=4, trials=150)
    slope = loglog_slope(frame, "n", "error")

    assert -1.3 <= slope.slope <= -0.7, slope
    assert slope.high - slope.low < 0.3, slope  # enough trials for the slope to mean something


def test_constants_frame_and_plot(constants_frame: pd.DataFrame, tmp_path: Path) -> None:
    frame = constants_frame
    assert list(frame.columns) == constants.COLUMNS
    assert np.isfinite(frame["error"]).all() and (frame["error"] > 0).all()
    np.testing.assert_allclose(frame["relative_error"], frame["error"] / frame["signal"])
    # theta* scales with the reward scale, so ||theta*||_Sigma^2 scales with its square.
    signal = frame.groupby("reward_scale")["signal"].first()
    assert signal[2.0] == pytest.approx(16 * signal[0.5])
    assert set(frame["loss"]) == {"rebel", "dpo"}

    paths = constants.plot(frame, tmp_path)
    assert {p.name for p in paths} == {"constants.png", "constants.pdf"}
    assert set(constants.slopes(frame)["quantity"]) == {"error", "relative_error"}


def test_logistic_curvature_is_a_quarter_for_flat_rewards() -> None:
    # sigmoid'(0) = 1/4 everywhere when the rewards barely vary, and DPO's Fisher
    # information is then Sigma / 4: the large-n DPO / REBEL ratio is 4 / noise^2.
    from drosim.world import make_world

    world = make_world(3, reward_scale=1e-6, noise=0.5, seed=0)
    curvature = constants.logistic_curvature(world)

    assert curvature.mean == pytest.approx(0.25)
    assert curvature.asymptotic_ratio == pytest.approx(4 / 0.25, rel=1e-6)


def test_scheduled_methods_repeat_only_the_robust_ones() -> None:
    methods = scheduled_methods(0.1)
    plain = [m.name for m in methods if m.family in ("none", "kl_temperature")]

    assert plain == ["REBEL", "DPO", "KL-DPO"]
    assert len(methods) == 3 + 3 * 6  # six robust methods under three schedules
    assert "KL-DPO (ball)" in {m.name for m in methods}


def test_an_unknown_override_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown overrides"):
        resolve_preset(rates.PRESETS, "quick", {"n_gird": (8,)})
    with pytest.raises(ValueError, match="preset"):
        rates.run("medium")


# check name -> (claim, overrides of the study for a tiny run, figure files); the rates
# check runs in tests/test_rates_worlds.py, with its finite worlds.
CHECKS = {
    "dpo_rates": ("C4", TINY_RATES, ["dpo_rate_n.png", "dpo_rate_d.pdf"]),
    "constants": ("C2 (constants)", TINY_CONSTANTS, ["constants.png", "constants.pdf"]),
}


@pytest.mark.parametrize("name", CHECKS)
def test_check_runs_on_a_tiny_setting(name: str, tmp_path: Path) -> None:
    claim, overrides, files = CHECKS[name]
    result = load_check(name).run("quick", out=tmp_path, **overrides)

    assert isinstance(result, CheckResult)
    assert result.claim == claim
    assert result.verdict in VERDICTS
    assert result.paper_says and result.measured
    assert len(result.table) > 0
    for file in files:
        assert (tmp_path / file).stat().st_size > 0
