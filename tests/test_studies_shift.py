"""Tests of the preference-shift study (claim C7 in the linear world)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from drosim.studies import shift

TINY = {"radii": (0.1, 1.0), "trials": 3}


@pytest.fixture(scope="module")
def tiny_frame() -> pd.DataFrame:
    return shift.run("quick", **TINY)


def test_the_world_has_the_conflicting_objective() -> None:
    objectives = shift.preference_world().objectives
    first, third = objectives[0], objectives[2]

    cosine = float(first @ third / (first.norm() * third.norm()))

    assert cosine == pytest.approx(shift.CONFLICT, abs=1e-12)
    assert float(third.norm()) == pytest.approx(float(first.norm()), rel=1e-12)


def test_the_mixture_grid_covers_the_simplex() -> None:
    grid = shift.mixture_grid()

    assert grid.shape == (66, 3)
    torch.testing.assert_close(grid.sum(-1), torch.ones(66, dtype=torch.float64))
    assert bool((grid >= 0).all()) and len({tuple(r) for r in grid.tolist()}) == 66


def test_rewards_are_exact_expected_rewards(tiny_frame: pd.DataFrame) -> None:
    # Step 0 is the initial, uniform policy: its rewards are known in closed form.
    world = shift.preference_world()
    grid = shift.mixture_grid()
    start = tiny_frame[(tiny_frame["method"] == "REBEL") & (tiny_frame["step"] == 0)]
    expected = world.expected_reward(torch.zeros(shift.DIM, dtype=torch.float64), grid)

    for _, rows in start.groupby("trial"):
        np.testing.assert_allclose(rows["reward"].to_numpy(), expected.numpy(), rtol=1e-12)


def test_run_is_deterministic_and_well_formed(tiny_frame: pd.DataFrame) -> None:
    again = shift.run("quick", **TINY)

    pd.testing.assert_frame_equal(tiny_frame, again)
    runs = len(shift.methods(TINY["radii"]))
    assert len(tiny_frame) == runs * TINY["trials"] * 66
    assert np.isfinite(tiny_frame["reward"]).all()


def test_frontier_gain_of_rebel_itself_is_zero(tiny_frame: pd.DataFrame) -> None:
    per_trial = shift.worst_case(tiny_frame)
    # A robust method whose numbers are REBEL's at step eta lies on the frontier.
    copy = per_trial[(per_trial["method"] == "REBEL") & (per_trial["step"] == shift.ETA)]
    fake = copy.assign(method="copy", family="chi2", loss="rebel", rho=0.5)

    gains = shift.frontier_gain(pd.concat([per_trial, fake]), boots=20)

    row = gains[gains["method"] == "copy"].iloc[0]
    assert row["vs_rebel"] == pytest.approx(0.0, abs=1e-12)
    assert row["gain"] == pytest.approx(0.0, abs=1e-12)


def test_plot_writes_files(tiny_frame: pd.DataFrame, tmp_path: Path) -> None:
    paths = shift.plot(tiny_frame, tmp_path)

    assert [p.name for p in paths] == ["shift.png", "shift.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)
