"""Tests of the radius rules that never look at the test metric (drosim.radius)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drosim.dro import Chi2
from drosim.radius import smallest_group_share, validated_radius

RADII = (0.01, 0.1, 1.0, 3.0)


def _pairs(minority: float, n: int = 600, trials: int = 3, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs of a linear reward; a share ``minority`` of them (group 1) scores another one."""
    g = torch.Generator().manual_seed(seed)
    dphi = torch.randn(trials, n, 3, generator=g, dtype=torch.float64)
    groups = (torch.rand(trials, n, generator=g) < minority).long()
    majority = dphi @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    other = dphi @ torch.tensor([-1.0, 2.0, 0.0], dtype=torch.float64)
    noise = 0.3 * torch.randn(trials, n, generator=g, dtype=torch.float64)
    return dphi, torch.where(groups == 1, other, majority) + noise, groups


def test_smallest_group_share_reads_the_smallest_group() -> None:
    assert smallest_group_share([0, 0, 0, 0, 1]) == 0.2
    assert smallest_group_share(torch.tensor([3, 3])) == 1.0
    assert Chi2.protecting(smallest_group_share(np.array([0, 1, 1, 1]))).rho == 1.5


def test_a_planted_minority_gets_a_radius_above_the_smallest() -> None:
    dphi, dr, groups = _pairs(minority=0.2)

    choice = validated_radius(dphi, dr, groups, "chi2", RADII)

    assert (choice.radius > RADII[0]).all()
    # The chosen radius's worst group is the minority, and it does better there than REBEL.
    table = choice.table
    worst = table.pivot(index="trial", columns="radius", values="worst_group_loss")
    assert (worst[RADII[0]] > worst.min(axis=1)).all()
    assert table.groupby("trial")["chosen"].sum().eq(1).all()


def test_a_homogeneous_world_keeps_the_smallest_radius() -> None:
    dphi, dr, groups = _pairs(minority=0.0)

    for family in ("chi2", "kl", "wasserstein"):
        choice = validated_radius(dphi, dr, groups, family, RADII)
        np.testing.assert_array_equal(choice.radius, RADII[0])


def test_dpo_and_unbatched_input() -> None:
    dphi, dr, groups = _pairs(minority=0.2, trials=1)
    pref = (dr > 0).to(dr.dtype)

    choice = validated_radius(dphi[0], pref[0], groups[0], "kl", RADII, loss="dpo")

    assert choice.radius.shape == (1,) and float(choice.radius[0]) in RADII
    assert set(choice.table["radius"]) == set(RADII)


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"family": "tv"}, ValueError, "family must be one of"),
    ({"radii": ()}, ValueError, "radii must be"),
    ({"radii": (float("nan"),)}, ValueError, "radii must be"),
    ({"radii": (-1.0,)}, ValueError, "radii must be"),
    ({"holdout": 1.0}, ValueError, "holdout must be in"),
    ({"loss": "hinge"}, ValueError, "loss must be"),
    ({"groups": torch.zeros(2, 50)}, TypeError, "integer labels"),
    ({"groups": torch.zeros(2, 49, dtype=torch.long)}, ValueError, "need dphi"),
    ({"groups": torch.cat([torch.zeros(2, 49), torch.ones(2, 1)], 1).long()}, ValueError,
     "at least 2 pairs"),
    ({"dphi": np.zeros((2, 50, 3))}, TypeError, "torch tensors"),
    ({"target": torch.full((2, 50), float("nan"), dtype=torch.float64)}, ValueError,
     "finite"),
    ({"standard_errors": -1.0}, ValueError, "standard_errors must be"),
])
def test_bad_inputs_raise(change: dict[str, object], error: type[Exception], match: str) -> None:
    dphi, dr, groups = _pairs(minority=0.2, n=50, trials=2)
    arguments = {"dphi": dphi, "target": dr, "groups": groups, "family": "chi2",
                 "radii": RADII} | change

    with pytest.raises(error, match=match):
        validated_radius(**arguments)
