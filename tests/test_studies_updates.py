"""Tests of the update-count study: online REBEL against exact mirror descent."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from drosim.studies import updates

TINY = {"rounds": 4, "noises": (0.0, 0.5), "trials": 3}


@pytest.fixture(scope="module")
def tiny_frame() -> pd.DataFrame:
    return updates.run("quick", **TINY)


def test_noiseless_online_rebel_is_mirror_descent(tiny_frame: pd.DataFrame) -> None:
    quiet = tiny_frame[tiny_frame["noise"] == 0]
    # Least squares, chi-square and KL keep theta_alpha as their noiseless fixed point.
    reweighted = quiet[quiet["family"].isin(["none", "chi2", "kl"])]
    assert reweighted["gap"].max() < 1e-10
    assert (reweighted["reward"] - reweighted["md_reward"]).abs().max() < 1e-10


def test_noiseless_w_rebel_follows_its_exactness_condition(tiny_frame: pd.DataFrame) -> None:
    # rho^2 u' Sigma_t^-1 u well below 1 on the whole path: exact; well above 1 at some
    # step: the square-root lasso shrinks w there and the iterates leave mirror descent.
    quiet = tiny_frame[(tiny_frame["noise"] == 0) & (tiny_frame["family"] == "wasserstein")]
    for rho, rows in quiet.groupby("rho"):
        condition = updates.wasserstein_condition(rho, TINY["rounds"])
        final = rows[rows["iteration"] == TINY["rounds"]]["gap"]
        if condition[:-1].max() < 0.5:
            assert final.max() < 1e-10
        elif condition[:-1].max() > 2:
            assert final.min() > 1e-6


def test_noise_moves_the_iterates_off_mirror_descent(tiny_frame: pd.DataFrame) -> None:
    noisy = tiny_frame[(tiny_frame["noise"] > 0) & (tiny_frame["iteration"] > 0)]

    assert noisy["gap"].min() > 1e-6


def test_run_is_deterministic_and_well_formed(tiny_frame: pd.DataFrame) -> None:
    again = updates.run("quick", **TINY)

    pd.testing.assert_frame_equal(tiny_frame, again)
    assert len(tiny_frame) == (len(updates.methods()) * len(TINY["noises"]) * TINY["trials"]
                               * (TINY["rounds"] + 1))
    assert (tiny_frame.loc[tiny_frame["iteration"] == 0, "gap"] == 0).all()


def test_plot_writes_files(tiny_frame: pd.DataFrame, tmp_path: Path) -> None:
    paths = updates.plot(tiny_frame, tmp_path)

    assert [p.name for p in paths] == ["updates.png", "updates.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)
