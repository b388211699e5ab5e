"""The linear world's options for worlds where a robust set can act: skewed, heavy-tailed and
heteroscedastic noise, a misspecified reward, contamination, heterogeneous annotators and a
prompt shift. Each test checks the option's defining property on many samples."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from drosim.dro import Chi2
from drosim.estimators import rebel
from drosim.world import make_world

F64 = torch.float64
ALPHA = torch.tensor([0.9, 0.1, 0.0], dtype=F64)


def _pairs(world, n: int = 200_000, trials: int = 1, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return world.sample_pairs(torch.zeros(trials, world.dim, dtype=F64), n, ALPHA, generator)


def _noise(world, pairs):
    """The observed minus the true relative reward, divided by the noise level."""
    return (pairs.dr - pairs.dphi @ world.reward_parameter(ALPHA)) / world.noise


def test_student_t3_noise_has_unit_variance_and_heavy_tails():
    world = make_world(4, noise=1.0, noise_kind="student_t3")
    noise = _noise(world, _pairs(world))
    assert float(noise.var()) == pytest.approx(1.0, abs=0.1)  # t_3: the variance converges slowly
    fourth = float((noise**4).mean())
    assert fourth > 6  # a Gaussian's fourth moment is 3; t_3's is infinite


def test_skewed_noise_flips_its_skew_with_the_side_of_dphi():
    world = make_world(4, noise=1.0, noise_kind="skewed")
    pairs = _pairs(world)
    noise = _noise(world, pairs)
    projection = pairs.dphi @ (world.objectives[0] / world.objectives[0].norm())
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(noise.var()) == pytest.approx(1.0, abs=0.01)
    third = -2 / math.sqrt(3)  # of -sqrt(3) w.p. 1/4, 1/sqrt(3) w.p. 3/4
    # (y = y' gives dphi = 0, on the positive side: left out of both)
    assert float((noise[projection > 0] ** 3).mean()) == pytest.approx(third, abs=0.03)
    assert float((noise[projection < 0] ** 3).mean()) == pytest.approx(-third, abs=0.03)


def test_heteroscedastic_noise_grows_with_the_projection():
    world = make_world(4, noise=1.0, noise_slope=2.0)
    pairs = _pairs(world)
    noise = _noise(world, pairs)
    projection = (pairs.dphi @ (world.objectives[0] / world.objectives[0].norm())).abs()
    low, high = projection <= projection.median(), projection > projection.quantile(0.9)
    assert float(noise[high].std()) > 2 * float(noise[low].std())


def test_a_misspecified_reward_adds_the_quadratic_term():
    world = make_world(4, noise=0.0, misspecification=0.7)
    pairs = _pairs(world, n=1000)
    table = (world.features @ world.reward_parameter(ALPHA)
             + 0.7 * (4 * world.features[..., -1] ** 2 - (world.features**2).sum(-1)))
    expected = (table[pairs.prompts[..., None], pairs.responses].diff(dim=-1).squeeze(-1)
                * -1)
    assert torch.allclose(pairs.dr, expected, atol=1e-12)
    assert torch.allclose(world.true_rewards(ALPHA), table, atol=1e-12)


def test_contamination_reports_minus_three_times_the_gap_and_flips_labels():
    clean = make_world(4, noise=0.0)
    dirty = replace(clean, contamination=0.1)
    a, b = _pairs(clean, n=50_000), _pairs(dirty, n=50_000)
    moved = a.dr != 0  # y = y' has gap 0, which -3 times leaves at 0
    outlier = ~torch.isclose(a.dr, b.dr)
    assert float(outlier[moved].float().mean()) == pytest.approx(0.1, abs=0.01)
    assert torch.allclose(b.dr[outlier], -3 * a.dr[outlier])
    agree = (a.pref == b.pref).float()
    assert float(agree[outlier].mean()) < 0.6  # flipped labels (after a fresh draw)


def test_other_annotators_score_their_share_under_their_mixture():
    other = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    world = make_world(4, noise=0.0, annotator_fraction=0.2, annotator_alpha=other)
    pairs = _pairs(world, n=50_000)
    assert float(pairs.annotator.float().mean()) == pytest.approx(0.2, abs=0.01)
    assert torch.allclose(pairs.dr[pairs.annotator],
                          pairs.dphi[pairs.annotator] @ world.reward_parameter(other))
    assert torch.allclose(pairs.dr[~pairs.annotator],
                          pairs.dphi[~pairs.annotator] @ world.reward_parameter(ALPHA))


def test_a_prompt_distribution_shifts_sampling_and_evaluation():
    world = make_world(4, prompts=4)
    probs = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=F64)
    shifted = replace(world, prompt_probs=probs)
    pairs = _pairs(shifted, n=100_000)
    counts = torch.bincount(pairs.prompts.flatten(), minlength=4).to(F64) / 100_000
    assert torch.allclose(counts, probs, atol=0.01)
    theta = torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(1))
    per_prompt = (world.policy(theta) * world.true_rewards(ALPHA)).sum(-1)
    assert float(shifted.expected_reward(theta, ALPHA)) == pytest.approx(
        float(per_prompt @ probs))
    uniform = torch.full((4,), 0.25, dtype=F64)
    assert float(shifted.expected_reward(theta, ALPHA, uniform)) == pytest.approx(
        float(world.expected_reward(theta, ALPHA)))
    assert torch.allclose(replace(world, prompt_probs=uniform).pair_covariance(theta),
                          world.pair_covariance(theta))


def test_a_robust_set_moves_the_target_only_where_the_noise_depends_on_dphi():
    """The reason for the options: chi-square reweighting keeps theta* in the plain world
    (noise independent of dphi) and moves away from it under the dphi-dependent skew."""
    bias = {}
    for kind in ("gaussian", "skewed"):
        world = make_world(4, noise=1.0, noise_kind=kind)
        pairs = _pairs(world, n=20_000, trials=8)
        w = rebel(pairs.dphi, pairs.dr, Chi2(0.5)).w.mean(0)
        bias[kind] = float((w - world.reward_parameter(ALPHA)).norm())
    assert bias["skewed"] > 5 * bias["gaussian"]


@pytest.mark.parametrize("options, match", [
    ({"noise_kind": "cauchy"}, "noise_kind must be one of"),
    ({"noise_slope": -1.0}, "noise_slope must be >= 0"),
    ({"misspecification": math.inf}, "misspecification must be finite"),
    ({"contamination": 1.0}, r"contamination must be in \[0, 1\)"),
    ({"annotator_fraction": 0.2}, "go together"),
    ({"annotator_fraction": 0.2, "annotator_alpha": torch.tensor([0.5, 0.6, 0.0],
                                                                 dtype=F64)}, "simplex"),
    ({"prompt_probs": torch.full((3,), 1 / 3, dtype=F64)}, "distribution over the 64"),
    ({"noise_direction": torch.ones(3, dtype=F64)}, r"noise_direction must be \(4,\)"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        replace(make_world(4), **options)
