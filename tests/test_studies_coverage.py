"""Tests of the coverage study (claim C5): the finite worlds' atoms, exact divergences and
coverage, the weighted robust fits and targets, regimes, statistics and the paper check."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from drosim.dro import KL, Chi2, Wasserstein
from drosim.estimators import dpo, rebel
from drosim.paper_checks import coverage as check
from drosim.paper_checks._framework import STATS_COLUMNS
from drosim.studies import atoms, coverage
from drosim.world import PairBatch

ALPHA = torch.tensor([1.0], dtype=torch.float64)
TINY = {"worlds": ("skewed",), "sizes": (128, 512, 2048, 8192), "gammas": (0.5, 1.0),
        "cs": (1.0,), "trials": 6, "supports": ((3, 3),), "support_trials": 10}


@pytest.fixture(scope="module")
def tiny_frame() -> pd.DataFrame:
    return coverage.run("quick", **TINY)


def _outcome_frequencies(world_name: str, n: int, trials: int, seed: int
                         ) -> tuple[atoms.Outcomes, torch.Tensor,
                                    tuple[PairBatch, torch.Tensor]]:
    """Pairs sampled by the world itself, as outcome frequencies ``(T, J)``."""
    world, laws = coverage.world_outcomes(world_name)
    pairs = atoms.sample(world, coverage.NOISE_SCALE, ALPHA, trials, n,
                         torch.Generator().manual_seed(seed))
    index = atoms.outcome_index(world, pairs, coverage.NOISE_SCALE, ALPHA)
    counts = torch.zeros(trials, laws.probs.numel(), dtype=torch.float64)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))
    return laws, counts / n, (pairs, index)


def test_divergences_match_a_direct_numpy_computation() -> None:
    p = np.array([0.2, 0.3, 0.5])
    freq = np.array([[0.25, 0.25, 0.5], [0.1, 0.6, 0.3]])

    found = coverage.divergences(torch.from_numpy(p), torch.from_numpy(freq))

    np.testing.assert_allclose(found["chi2"].numpy(), 0.5 * ((p - freq) ** 2 / freq).sum(-1),
                               rtol=1e-12)
    np.testing.assert_allclose(found["kl"].numpy(), (p * np.log(p / freq)).sum(-1),
                               rtol=1e-12)
    unseen = coverage.divergences(torch.from_numpy(p), torch.tensor([[0.0, 0.5, 0.5]]).double())
    assert math.isinf(float(unseen["chi2"][0])) and math.isinf(float(unseen["kl"][0]))


def test_transport_lp_on_two_point_distributions() -> None:
    points = np.array([0.0, 2.0])
    cost = (points[:, None] - points[None, :]) ** 2
    # Move 1/4 of the mass a distance 2 (squared cost 4): W_2^2 = 1.
    assert coverage.transport_cost(np.array([0.5, 0.5]), np.array([0.25, 0.75]), cost) == (
        pytest.approx(1.0, abs=1e-9))


@pytest.mark.parametrize("world_name", list(coverage.WORLDS))
def test_the_world_samples_land_on_the_enumerated_atoms(world_name: str) -> None:
    laws, _, (pairs, index) = _outcome_frequencies(world_name, 200, 3, seed=0)

    assert float(laws.probs.sum()) == pytest.approx(1.0, abs=1e-12)
    rebel_atoms = laws.rebel.atoms[laws.rebel.index[index]]
    dpo_atoms = laws.dpo.atoms[laws.dpo.index[index]]
    torch.testing.assert_close(rebel_atoms[..., :-1], pairs.dphi)
    torch.testing.assert_close(rebel_atoms[..., -1], pairs.dr)
    torch.testing.assert_close(dpo_atoms[..., -1], pairs.pref)


def test_outcome_probabilities_match_the_skewed_worlds_frequencies() -> None:
    laws, freq, _ = _outcome_frequencies("skewed", 200_000, 1, seed=1)
    # Each frequency within 5 binomial standard deviations of its probability.
    sd = torch.sqrt(laws.probs * (1 - laws.probs) / 200_000)
    assert bool(((freq[0] - laws.probs).abs() <= 5 * sd + 1e-12).all())


def test_exact_coverage_matches_a_monte_carlo_count_of_world_samples() -> None:
    n, trials, rho = 1024, 400, 0.02
    laws, freq, _ = _outcome_frequencies("skewed", n, trials, seed=2)
    support = laws.rebel
    from_world = coverage.divergences(support.probs, support.weights(freq))["chi2"] <= rho
    counts = torch.from_numpy(coverage._counts(laws.probs.numpy(), n, trials, (7,)))
    from_counts = coverage.divergences(support.probs, support.weights(counts) / n)["chi2"] <= rho

    difference = float(from_world.double().mean() - from_counts.double().mean())
    assert abs(difference) < 4 * math.sqrt(0.25 * 2 / trials)
    assert 0.05 < float(from_world.double().mean()) < 0.95  # a radius that tells them apart


@pytest.mark.parametrize(("loss", "family", "spec"), [
    ("rebel", "chi2", Chi2(0.05)), ("rebel", "kl", KL(0.05)),
    ("rebel", "wasserstein", Wasserstein(0.05, p=2.0)), ("dpo", "chi2", Chi2(0.05)),
    ("dpo", "kl", KL(0.05))])
def test_weighted_fits_match_the_estimators_on_the_samples(loss: str, family: str,
                                                          spec: object) -> None:
    laws, freq, (pairs, _) = _outcome_frequencies("skewed", 256, 3, seed=3)
    support = laws.support(loss)

    found = atoms.robust_fit(support.atoms, support.weights(freq),
                             torch.full((3,), 0.05, dtype=torch.float64), loss, family)

    expected = (rebel(pairs.dphi, pairs.dr, spec) if loss == "rebel"
                else dpo(pairs.dphi, pairs.pref, 1.0, spec)).w
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-5)


def test_the_robust_target_is_theta_star_only_in_the_well_specified_world() -> None:
    rhos = torch.tensor([0.01, 0.3], dtype=torch.float64)
    for world_name, moved in (("well-specified", False), ("skewed", True)):
        world, laws = coverage.world_outcomes(world_name)
        theta = world.reward_parameter(ALPHA)
        star = coverage.targets(laws.rebel, "rebel", "none", rhos[:1])[0]
        torch.testing.assert_close(star, theta)
        for family in ("chi2", "kl"):
            shift = (coverage.targets(laws.rebel, "rebel", family, rhos) - theta).norm(dim=-1)
            assert bool((shift > 1e-3).all()) if moved else float(shift.max()) < 1e-9


def test_regimes_cut_where_coverage_crosses_one_half() -> None:
    sizes = [128, 256, 512, 1024, 2048]
    covered = [0.0, 0.1, 0.9, 1.0, 1.0]
    frame = pd.DataFrame({"n": np.repeat(sizes, 4), "covered": np.repeat(covered, 4) > 0.5,
                          "error": np.repeat([1 / n for n in sizes], 4)})

    parts = coverage.regimes(frame)

    assert [label for label, _ in parts] == ["n = 128..256", "n = 512..2048"]
    assert [float(np.polyfit(np.log(p["n"]), np.log(p["error"]), 1)[0]) for _, p in parts] == (
        pytest.approx([-1.0, -1.0]))


def test_run_summary_statistics_and_plot(tiny_frame: pd.DataFrame, tmp_path: Path) -> None:
    sweep = coverage.support_sweep("quick", **TINY)
    summary = coverage.summarise(tiny_frame, boots=20)
    stats = coverage.statistics(tiny_frame)
    paths = coverage.plot(tiny_frame, tmp_path, sweep)

    assert (tiny_frame["error"] > 0).all() and not tiny_frame.loc[
        tiny_frame["family"] == "none", "covered"].any()
    # The same samples for every radius: a larger radius never uncovers P.
    robust = tiny_frame[tiny_frame["family"] != "none"].sort_values("rho")
    for _, group in robust.groupby(["loss", "family", "n", "trial"]):
        assert np.all(np.diff(group["covered"].to_numpy(dtype=int)) >= 0)
    assert summary["coverage_n_max"].between(0, 1).all() and summary["last"].any()
    assert set(STATS_COLUMNS) <= set(stats.columns)
    assert set(stats["target"]) == {"theta*", "theta^rho", "coverage"}
    assert sweep["scaled"].gt(0).all()
    # One coverage figure, then one error figure per world: each readable on its own.
    assert [p.name for p in paths] == ["coverage.png", "coverage.pdf", "coverage_skewed.png",
                                       "coverage_skewed.pdf"]


def test_the_paper_check_returns_stats_and_a_verdict(tmp_path: Path) -> None:
    result = check.run("quick", tmp_path, **TINY)

    assert result.verdict in ("reproduced", "partially reproduced", "not reproduced",
                              "inconclusive")
    assert result.stats is not None and set(STATS_COLUMNS) <= set(result.stats.columns)
    assert "skewed, chi2-REBEL" in result.measured


def test_run_rejects_an_unknown_setting() -> None:
    with pytest.raises(ValueError, match="unknown"):
        coverage.run("quick", trails=3)


def test_the_fits_do_not_depend_on_the_memory_budget(tiny_frame: pd.DataFrame) -> None:
    # One fit per batch: the same numbers as the whole batch at once.
    settings = {**TINY, "sizes": TINY["sizes"][:2]}
    whole = coverage.run("quick", **settings)
    pieces = coverage.run("quick", memory_budget=1, **settings)

    pd.testing.assert_frame_equal(whole, pieces, rtol=1e-9)
    pd.testing.assert_frame_equal(whole, tiny_frame[tiny_frame["n"].isin(settings["sizes"])]
                                  .reset_index(drop=True), rtol=1e-9)
