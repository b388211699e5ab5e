"""Tests of the DPO estimators' own population targets (drosim.studies.targets) and of C4.

The fixed-temperature KL-DPO converges to tau / (1 + tau) theta*, not to theta*: checked
exactly (the population gradient vanishes there), by a large-n fit, and through the slope
of the error to that target. A few seconds in all.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from drosim.dro import KLTemperature
from drosim.methods import Method
from drosim.paper_checks import load_check
from drosim.paper_checks._framework import STATS_COLUMNS
from drosim.stats import loglog_slope
from drosim.studies import rates
from drosim.studies.montecarlo import ALPHA_0, sample_trials, schedule_of
from drosim.studies.targets import own_target, tilted_shrinkage
from drosim.world import LinearWorld, make_world

KL_TAU_1 = Method("KL-DPO (tau = 1)", "dpo", "kl_temperature", 1.0)
KL_TAU_01 = Method("KL-DPO (tau = 0.1)", "dpo", "kl_temperature", 0.1)
TINY_RATES = {"n_grid": (32, 64), "dim": 3, "d_grid": (2, 4), "samples": 32, "trials": 5}


@pytest.fixture(scope="module")
def world() -> LinearWorld:
    return make_world(4, noise=0.5, seed=0)


def _theta_star(world: LinearWorld) -> torch.Tensor:
    return world.reward_parameter(world.features.new_tensor(ALPHA_0))


def _population_gradient(world: LinearWorld, theta: torch.Tensor, tau: float) -> torch.Tensor:
    """Gradient of log E_P exp(l / tau) over every (prompt, y, y', label) atom, exactly."""
    dim = world.dim
    dphi = (world.features.unsqueeze(2) - world.features.unsqueeze(1)).reshape(-1, dim)
    q = torch.sigmoid(dphi @ _theta_star(world))
    theta = theta.clone().requires_grad_(True)
    s = dphi @ theta
    losses = torch.cat([torch.nn.functional.softplus(-s), torch.nn.functional.softplus(s)])
    objective = torch.logsumexp(torch.cat([q.log(), (1 - q).log()]) + losses / tau, 0)
    return torch.autograd.grad(objective, theta)[0]


@pytest.mark.parametrize("tau", [1.0, 0.1, 3.0])
def test_population_gradient_vanishes_at_the_closed_form_target(world: LinearWorld,
                                                                tau: float) -> None:
    theta_star = _theta_star(world)
    target = own_target(Method("KL", "dpo", "kl_temperature", tau), world)

    assert torch.allclose(target, tilted_shrinkage(tau) * theta_star)
    assert _population_gradient(world, target, tau).abs().max() < 1e-12
    assert _population_gradient(world, theta_star, tau).abs().max() > 1e-3


def test_tau_one_target_is_half_theta_star_by_a_large_n_fit(world: LinearWorld) -> None:
    # Four fits of n = 2^16 pairs: their mean estimates the population minimiser, which
    # for tau = beta = 1 (the exponential loss) is theta* / 2.
    pairs = sample_trials(world, 2**16, slice(0, 4), (0, 99))
    estimates = KL_TAU_1.estimate(pairs)
    theta_star = _theta_star(world)
    sigma = world.pair_covariance(world.features.new_zeros(world.dim))
    signal = theta_star @ sigma @ theta_star

    def relative(delta: torch.Tensor) -> float:
        return float(delta @ sigma @ delta / signal)

    assert relative(estimates.mean(0) - theta_star / 2) < 1e-3
    assert max(relative(e - theta_star / 2) for e in estimates) < 5e-3  # each fit, too
    assert relative(estimates.mean(0) - theta_star) > 0.2  # far from theta*


def test_beta_only_changes_units(world: LinearWorld) -> None:
    # Every DPO loss value depends on theta = beta w alone: the authors' beta = 0.1 gives
    # the estimate of beta = 1.
    pairs = sample_trials(world, 256, slice(0, 4), (0, 7))
    authors = Method("KL", "dpo", "kl_temperature", 0.1, beta=0.1).estimate(pairs)

    torch.testing.assert_close(authors, KL_TAU_01.estimate(pairs), rtol=1e-6, atol=1e-8)


def test_fixed_temperature_error_falls_like_one_over_n_to_its_own_target() -> None:
    frame = rates.run("quick", methods=[KL_TAU_1], progress=False, targets=own_target,
                      n_grid=(256, 512, 1024, 2048), d_grid=(), dim=4, trials=64)
    to_own = loglog_slope(frame, "n", "own_error")
    to_star = loglog_slope(frame, "n", "error")

    assert -1.25 <= to_own.slope <= -0.75, to_own
    assert to_star.slope > -0.2, to_star  # a plateau at the squared bias
    assert frame["bias"].iloc[0] == pytest.approx(frame["signal"].iloc[0] / 4)


def test_vanishing_robustness_targets_theta_star_and_a_fixed_radius_is_refused(
        world: LinearWorld) -> None:
    growing = Method("KL", "dpo", "kl_temperature", 1.0, 0.5)
    assert growing.spec(100) == KLTemperature(10.0)
    assert schedule_of(growing) == "tau = c sqrt(n)"
    assert schedule_of(KL_TAU_1) == "none"
    for method in (growing, Method("WDPO", "dpo", "wasserstein", 0.1, 1.0), Method("DPO", "dpo")):
        assert torch.equal(own_target(method, world), _theta_star(world))
    with pytest.raises(ValueError, match="no population target"):
        own_target(Method("KL ball", "dpo", "kl", 0.1, 0.0), world)


def test_check_names_the_target_and_publishes_both_errors(tmp_path: Path) -> None:
    result = load_check("dpo_rates").run("quick", out=tmp_path, **TINY_RATES)

    assert "tau / (1 + tau) theta*" in result.measured
    assert "own target" in result.measured
    stats = result.stats
    assert isinstance(stats, pd.DataFrame)
    assert set(STATS_COLUMNS) <= set(stats.columns)
    assert set(stats["target"]) == {"theta*", "own"}
    assert set(stats["study"]) == {"n", "d"}
    assert set(result.table["target"]) == {"theta*", "own"}
    fixed = stats[stats["method"] == "KL-DPO (tau = 1)"]
    assert (fixed["bias"] > 0).all()
