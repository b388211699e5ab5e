"""Tests of the coverage study (claim C5): exact divergences, transport LP, coverage, plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from drosim.studies import coverage

TINY = {"sizes": (64, 256), "gammas": (0.5, 1.5), "trials": 6, "calibration_trials": 8}


@pytest.fixture(scope="module")
def tiny_frame() -> pd.DataFrame:
    return coverage.run("quick", **TINY)


def test_divergences_match_a_direct_numpy_computation() -> None:
    p = np.array([0.2, 0.3, 0.5])
    freq = np.array([[0.25, 0.25, 0.5], [0.1, 0.6, 0.3]])

    found = coverage.divergences(torch.from_numpy(p), torch.from_numpy(freq))

    chi2 = 0.5 * ((p - freq) ** 2 / freq).sum(-1)
    kl = (p * np.log(p / freq)).sum(-1)
    np.testing.assert_allclose(found["chi2"].numpy(), chi2, rtol=1e-12)
    np.testing.assert_allclose(found["kl"].numpy(), kl, rtol=1e-12)


def test_an_unobserved_atom_puts_p_outside_every_ball() -> None:
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    freq = torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64)

    found = coverage.divergences(p, freq)

    assert math.isinf(float(found["chi2"][0])) and math.isinf(float(found["kl"][0]))


def test_transport_lp_on_two_point_distributions() -> None:
    # Move 1/4 of the mass a distance 2 (squared cost 4): W_2^2 = 1, W_2 = 1.
    points = np.array([0.0, 2.0])
    cost = (points[:, None] - points[None, :]) ** 2

    value = coverage.transport_cost(np.array([0.5, 0.5]), np.array([0.25, 0.75]), cost)

    assert value == pytest.approx(1.0, abs=1e-9)
    assert coverage.transport_cost(np.array([0.5, 0.5]), np.array([0.5, 0.5]), cost) == (
        pytest.approx(0.0, abs=1e-12))


def test_wasserstein_of_p_to_itself_is_zero_and_grows_with_a_shifted_sample() -> None:
    support = coverage.study_support()
    exact = support.probs.unsqueeze(0)
    lopsided = torch.zeros_like(exact)
    lopsided[0, 0] = 1.0

    found = coverage.wasserstein2(support, torch.cat([exact, lopsided]))

    assert found[0] == pytest.approx(0.0, abs=1e-6) and found[1] > 0.1


def test_the_support_is_a_distribution_and_the_sample_lands_on_it() -> None:
    world = coverage.coverage_world()
    support = coverage.study_support()
    alpha = torch.tensor([1.0], dtype=torch.float64)
    theta = torch.zeros(3, coverage.DIM, dtype=torch.float64)

    pairs, atoms = coverage.sample(world, support, theta, 200, alpha,
                                   torch.Generator().manual_seed(0))

    assert float(support.probs.sum()) == pytest.approx(1.0, abs=1e-12)
    # y = y' pairs of every prompt share an atom per noise value.
    assert support.size == (coverage.PROMPTS * coverage.RESPONSES * (coverage.RESPONSES - 1)
                            + 1) * len(coverage.NOISE_VALUES)
    observed = support.atoms[atoms]  # (T, n, d + 1)
    torch.testing.assert_close(observed[..., :-1], pairs.dphi)
    torch.testing.assert_close(observed[..., -1], pairs.dr)


def test_the_empirical_law_of_many_samples_approaches_p() -> None:
    world = coverage.coverage_world()
    support = coverage.study_support()
    alpha = torch.tensor([1.0], dtype=torch.float64)
    theta = torch.zeros(1, coverage.DIM, dtype=torch.float64)

    _, atoms = coverage.sample(world, support, theta, 50_000, alpha,
                               torch.Generator().manual_seed(1))

    freq = coverage.empirical(atoms, support.size)[0]
    assert float((freq - support.probs).abs().max()) < 0.01


def test_coverage_is_monotone_in_the_radius(tiny_frame: pd.DataFrame) -> None:
    # Every gamma of a family sees the same samples: at equal (n, trial), a larger radius
    # never uncovers P.
    robust = tiny_frame[tiny_frame["family"] != "none"].sort_values("rho")
    for _, group in robust.groupby(["family", "n", "trial"]):
        assert np.all(np.diff(group["covered"].to_numpy(dtype=int)) >= 0)


def test_run_is_deterministic_and_well_formed(tiny_frame: pd.DataFrame) -> None:
    again = coverage.run("quick", **TINY)
    # One trial per chunk: the samples do not depend on the chunking.
    chunked = coverage.run("quick", memory_budget=1, **TINY)

    pd.testing.assert_frame_equal(tiny_frame, again)
    pd.testing.assert_frame_equal(tiny_frame, chunked, rtol=1e-9)
    assert list(tiny_frame.columns) == ["method", "family", "gamma", "c", "n", "trial", "rho",
                                        "error", "divergence", "covered"]
    assert (tiny_frame["error"] > 0).all()
    assert not tiny_frame.loc[tiny_frame["family"] == "none", "covered"].any()


def test_run_rejects_an_unknown_setting() -> None:
    with pytest.raises(ValueError, match="unknown"):
        coverage.run("quick", trails=3)


def test_summary_and_plot(tiny_frame: pd.DataFrame, tmp_path: Path) -> None:
    summary = coverage.summarise(tiny_frame)
    paths = coverage.plot(tiny_frame, tmp_path)

    assert len(summary) == 1 + len(coverage.FAMILIES) * len(TINY["gammas"])
    assert summary["coverage_n_max"].between(0, 1).all()
    assert [p.name for p in paths] == ["coverage.png", "coverage.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)
