"""The minibatch-bias study and its paper check (C6, SGD compatibility).

Exact tests enumerate every minibatch of a small batch (no Monte Carlo); the rest run the
check end to end on a tiny preset through ``python -m drosim.paper_checks``'s main.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pandas as pd
import pytest
import torch

from drosim.dro import KL, Chi2, KLTemperature, Wasserstein
from drosim.paper_checks import __main__ as cli
from drosim.paper_checks._framework import STATS_COLUMNS
from drosim.studies import minibatch
from drosim.studies.montecarlo import sample_trials
from drosim.world import PairBatch, make_world

SETS = [Chi2(0.1), Chi2.protecting(0.25), KL(0.1), KLTemperature(1.0), Wasserstein(0.01)]
TINY = {"pairs": (64, 32), "minibatches": (2, 8, 16), "trials": 4, "draws": 1000, "dim": 8,
        "noise": 0.5, "seed": 0}
DOCUMENTED = ["method", "rho", "minibatch", "bias", "bias_se", "value_bias", "bound",
              "estimator"]


def _batch(n: int, trials: int = 3) -> tuple[PairBatch, torch.Tensor]:
    pairs = sample_trials(make_world(4, noise=0.5, seed=1), n, slice(0, trials), (1, n))
    w = torch.linalg.lstsq(pairs.dphi, pairs.dr.unsqueeze(-1)).solution.squeeze(-1)
    return pairs, w


def _every_minibatch(trials: int, n: int, m: int) -> torch.Tensor:
    """``(trials, C(n, m), m)``: all minibatches of m of the n pairs."""
    return torch.tensor(list(itertools.combinations(range(n), m))).expand(trials, -1, -1)


def _mean_loss_gradient(pairs: PairBatch, w: torch.Tensor, index: torch.Tensor
                        ) -> torch.Tensor:
    """``(T, R, d)`` the gradient of mean_B (<w, dphi> - dr)^2: 2/m sum_B r_i dphi_i."""
    trial = torch.arange(index.shape[0])[:, None, None]
    dphi, dr = pairs.dphi[trial, index], pairs.dr[trial, index]
    residual = torch.einsum("trmd,td->trm", dphi, w) - dr
    return 2 * (residual.unsqueeze(-1) * dphi).mean(-2)


@pytest.mark.parametrize("spec", SETS, ids=repr)
def test_the_whole_batch_as_a_minibatch_is_the_full_batch_objective(spec) -> None:
    pairs, w = _batch(12)
    full = minibatch.full_batch(spec, pairs, w)
    index = _every_minibatch(3, 12, 12)  # one minibatch: every pair
    for estimates in minibatch.batch_estimates(spec, pairs, w, full, index).values():
        torch.testing.assert_close(estimates.premium, full.estimates.premium,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(estimates.gradient, full.estimates.gradient,
                                   rtol=1e-10, atol=1e-12)
    assert torch.all(minibatch.value_bound(spec, full, 12) == 0)


@pytest.mark.parametrize("spec", SETS, ids=repr)
def test_iteration_estimator_is_unbiased_and_minibatch_balls_are_not(spec) -> None:
    # Exact expectations over all C(8, 3) = 56 minibatches, mean gradient included.
    pairs, w = _batch(8)
    full = minibatch.full_batch(spec, pairs, w)
    index = _every_minibatch(3, 8, 3)
    estimates = minibatch.batch_estimates(spec, pairs, w, full, index)
    mean_part = _mean_loss_gradient(pairs, w, index)
    scale = full.gradient.norm(dim=-1, keepdim=True)
    expected = {name: (e.gradient + mean_part).mean(1) for name, e in estimates.items()}

    torch.testing.assert_close(expected["iteration"] / scale, full.gradient / scale,
                               rtol=0, atol=1e-10)
    bias = ((expected["minibatch"] - full.gradient).norm(dim=-1) / scale.squeeze(-1))
    assert torch.all(bias > 0.01), bias


@pytest.mark.parametrize("spec", SETS, ids=repr)
def test_objective_bias_is_negative_and_within_the_bound(spec) -> None:
    pairs, w = _batch(9)
    full = minibatch.full_batch(spec, pairs, w)
    for m in (2, 4, 7):
        premium = minibatch.batch_estimates(spec, pairs, w, full, _every_minibatch(3, 9, m))[
            "minibatch"].premium.mean(1)
        bias = premium - full.estimates.premium.squeeze(1)  # exact: mean_B l averages out
        bound = minibatch.value_bound(spec, full, m)
        assert torch.all(bias < 0), (m, bias)
        assert torch.all(-bias <= bound + 1e-12), (m, bias, bound)


def test_the_bound_is_exact_when_both_worst_cases_are_the_max() -> None:
    # A ball this large is the max on the batch and on every minibatch, and the bound's
    # rank weights put all of a minibatch's mass on its largest loss: bound = max - E max_B.
    pairs, w = _batch(10)
    spec = Chi2(1e6)
    full = minibatch.full_batch(spec, pairs, w)
    index = _every_minibatch(3, 10, 4)
    trial = torch.arange(3)[:, None, None]
    residual = torch.einsum("trmd,td->trm", pairs.dphi[trial, index], w) - pairs.dr[trial, index]
    exact = full.losses.amax(-1) - residual.square().amax(-1).mean(1)
    torch.testing.assert_close(minibatch.value_bound(spec, full, 4), exact, rtol=1e-12,
                               atol=1e-14)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The check run by the paper-checks command on a tiny preset: its output folder."""
    out = tmp_path_factory.mktemp("minibatch")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(minibatch.PRESETS, "quick", TINY)
        assert cli.main(["--out", str(out), "--only", "minibatch"]) == 0
    return out


def test_the_check_writes_its_table_with_the_documented_columns(written: Path) -> None:
    table = pd.read_csv(written / "tables" / "minibatch.csv")
    assert set(DOCUMENTED) <= set(table.columns)
    assert set(STATS_COLUMNS) <= set(table.columns)
    assert set(table["estimator"]) == set(minibatch.ESTIMATORS)
    assert len(table) == 2 * len(minibatch.robust_sets()) * (4 + 4)  # m in {2, 8, 16, N}
    assert (written / "checks" / "minibatch.csv").exists()
    assert (written / "minibatch.png").stat().st_size > 0
    claims = pd.read_csv(written / "claims.csv")
    assert list(claims["check"]) == ["minibatch"]
    assert claims.loc[0, "verdict"] == "partially reproduced", claims.loc[0, "measured"]
    assert "At the LLM trainer's defaults (minibatch_size 16 of pairs_per_iteration 32" in \
        claims.loc[0, "measured"]


def test_every_bias_is_exactly_zero_at_the_full_batch(written: Path) -> None:
    table = pd.read_csv(written / "tables" / "minibatch.csv")
    whole = table[table["minibatch"] == table["pairs"]]
    assert len(whole) == 2 * 2 * len(minibatch.robust_sets())
    for column in ("bias", "bias_se", "value_bias", "value_bias_se", "bound"):
        assert (whole[column] == 0).all(), column


def test_minibatch_chi2_bias_is_positive_and_falls_with_the_minibatch(written: Path) -> None:
    table = pd.read_csv(written / "tables" / "minibatch.csv")
    chi2 = table[(table["family"] == "chi2") & (table["estimator"] == "minibatch")]
    for _, group in chi2.groupby(["rho", "pairs"]):
        bias = group.sort_values("minibatch")
        smallest = bias.iloc[0]
        assert smallest["bias"] > 3 * smallest["bias_se"], smallest
        assert bias["bias"].is_monotonic_decreasing, bias[["minibatch", "bias"]]
        # The objective: below F_N, by no more than the bound (up to Monte Carlo).
        assert (bias["value_bias"] <= 0).all()
        assert (bias["value_bias"].abs() <= bias["bound"] + 3 * bias["value_bias_se"]).all()


def test_iteration_estimator_is_at_its_monte_carlo_floor(written: Path) -> None:
    table = pd.read_csv(written / "tables" / "minibatch.csv")
    iteration = table[(table["estimator"] == "iteration")
                      & (table["minibatch"] < table["pairs"])]
    assert (iteration["bias"] <= 2 * iteration["bias_se"]).all()
    assert (iteration["value_bias"].abs() <= 4 * iteration["value_bias_se"]).all()


def test_the_trainer_defaults_are_those_of_the_llm_config() -> None:
    config = pytest.importorskip("drosim.llm.components.config")
    methods = pytest.importorskip("drosim.llm.components.methods")
    defaults = {f.name: f.default for f in dataclasses.fields(config.TrainConfig)}
    assert defaults["pairs_per_iteration"] == minibatch.TRAINER_PAIRS
    assert defaults["minibatch_size"] == minibatch.TRAINER_MINIBATCH
    radius = getattr(methods, "DEFAULT_RADIUS", None)
    assert minibatch.TRAINER_RADII == {
        "chi2": defaults["chi2_rho"] if radius is None else radius,
        "kl": defaults["kl_rho"] if radius is None else radius,
        "kl_temperature": defaults["kl_tau"], "wasserstein": defaults["w_rho"]}
