"""Tests of the preference-shift study (claim C7 in the linear world) and its check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from drosim.dro import Chi2
from drosim.estimators import rebel
from drosim.paper_checks import VERDICTS, load_check
from drosim.paper_checks._framework import STATS_COLUMNS
from drosim.studies import shift
from drosim.studies.montecarlo import ALPHA_0

TINY = {"world_seeds": 2, "trials": 2, "rounds": 1, "pairs": 32, "radii": (0.1, 1.0)}


@pytest.fixture(scope="module")
def tiny_frame() -> pd.DataFrame:
    return shift.run("quick", **TINY)


@pytest.mark.parametrize("seed", [0, 3])
def test_the_world_has_the_conflicting_objective(seed: int) -> None:
    objectives = shift.preference_world(seed=seed).objectives
    first, third = objectives[0], objectives[2]

    cosine = float(first @ third / (first.norm() * third.norm()))

    assert cosine == pytest.approx(shift.CONFLICT, abs=1e-12)
    assert float(third.norm()) == pytest.approx(float(first.norm()), rel=1e-12)


def test_the_mixture_grid_covers_the_simplex() -> None:
    grid = shift.mixture_grid()

    assert grid.shape == (66, 3)
    torch.testing.assert_close(grid.sum(-1), torch.ones(66, dtype=torch.float64))
    assert bool((grid >= 0).all()) and len({tuple(r) for r in grid.tolist()}) == 66


def test_the_worlds_differ_only_in_annotators_and_prompts() -> None:
    plain, none = shift.world_variant("well-specified", 1)
    annotators, also_none = shift.world_variant("annotators", 1)
    shifted, evaluation = shift.world_variant("annotators + prompt shift", 1)

    assert none is None and also_none is None
    torch.testing.assert_close(plain.features, shifted.features)
    assert plain.annotator_fraction == 0
    assert annotators.annotator_fraction == shift.ANNOTATOR_FRACTION
    train = shifted.prompt_probs
    assert train is not None and evaluation is not None
    # Evaluation puts most of its mass on the half of the prompts that training neglects.
    neglected = train < train.median()
    assert float(evaluation[neglected].sum()) > 0.7
    with pytest.raises(ValueError, match="world must be one of"):
        shift.world_variant("misspecified", 0)


def test_chi2_moves_away_from_rebel_only_with_other_annotators() -> None:
    # One large batch per world at the uniform policy: the chi-square fit's distance from
    # least squares is sampling noise in the plain world, a shift of target with annotators.
    alpha0 = torch.tensor(ALPHA_0, dtype=torch.float64)
    moves = {}
    for name in ("well-specified", "annotators"):
        world, _ = shift.world_variant(name, 0)
        generator = torch.Generator().manual_seed(0)
        pairs = world.sample_pairs(torch.zeros(2, shift.DIM, dtype=torch.float64), 2048, alpha0,
                                   generator)
        plain = rebel(pairs.dphi, pairs.dr).w
        robust = rebel(pairs.dphi, pairs.dr, Chi2(1.0)).w
        moves[name] = ((robust - plain).norm(dim=1) / plain.norm(dim=1)).max()

    assert float(moves["well-specified"]) < 0.06
    assert float(moves["annotators"]) > 0.2


def test_rewards_are_exact_expected_rewards(tiny_frame: pd.DataFrame) -> None:
    # Step 0 is the initial, uniform policy: its rewards are known in closed form, under the
    # evaluation prompt distribution of each world.
    grid = shift.mixture_grid()
    start = tiny_frame[(tiny_frame["method"] == "REBEL") & (tiny_frame["step"] == 0)]
    for (name, seed), rows in start.groupby(["world", "world_seed"]):
        world, evaluation = shift.world_variant(name, seed)
        expected = world.expected_reward(torch.zeros(shift.DIM, dtype=torch.float64), grid,
                                         evaluation).numpy()
        at_alpha0 = int(np.abs(grid.numpy() - ALPHA_0).sum(1).argmin())

        np.testing.assert_allclose(rows["worst"], expected.min(), rtol=1e-12)
        np.testing.assert_allclose(rows["trained"], expected[at_alpha0], rtol=1e-12)


def test_run_is_deterministic_and_well_formed(tiny_frame: pd.DataFrame) -> None:
    again = shift.run("quick", **TINY)

    pd.testing.assert_frame_equal(tiny_frame, again)
    runs = len(shift.methods(TINY["radii"]))
    units = TINY["world_seeds"] * TINY["trials"]
    assert len(tiny_frame) == len(shift.WORLDS) * runs * units
    assert (tiny_frame.groupby("world")["trial"].nunique() == units).all()
    assert np.isfinite(tiny_frame[["trained", "worst", "minority"]]).all().all()


def test_frontier_gain_of_rebel_itself_is_zero(tiny_frame: pd.DataFrame) -> None:
    # A robust method whose numbers are REBEL's at step eta lies on the frontier.
    copy = tiny_frame[(tiny_frame["method"] == "REBEL") & (tiny_frame["step"] == shift.ETA)]
    fake = copy.assign(method="copy", family="chi2", loss="rebel", rho=0.5)

    gains = shift.frontier_gain(pd.concat([tiny_frame, fake]), boots=20)

    rows = gains[gains["method"] == "copy"]
    assert list(rows["world"]) == list(shift.WORLDS)
    np.testing.assert_allclose(rows[["vs_rebel", "gain", "minority_vs_rebel"]], 0.0, atol=1e-12)


def _hand_made(units: int = 40, effect: float = 0.1) -> pd.DataFrame:
    """A frontier of REBEL steps and one robust method that adds ``effect`` to REBEL's worst
    case at step eta, unit by unit; every unit carries a large shared offset."""
    rng = np.random.default_rng(1)
    offset = rng.normal(0.0, 1.0, units)  # shared by every method of a unit: paired
    rows = [pd.DataFrame({"world": "hand", "trial": np.arange(units), "method": "REBEL",
                          "loss": "rebel", "family": "none", "rho": 0.0, "step": step,
                          "trained": step, "worst": offset - step, "minority": offset})
            for step in (0.0, shift.ETA, 1.0)]
    noise = rng.normal(0.0, 0.01, units)
    rows.append(rows[1].assign(method="chi2-REBEL", family="chi2", rho=1.0,
                               worst=rows[1]["worst"] + effect + noise))
    return pd.concat(rows, ignore_index=True)


def test_paired_bootstrap_sees_through_a_shared_offset() -> None:
    row = shift.frontier_gain(_hand_made(), boots=400).iloc[0]

    # The offsets (sd 1) cancel in the paired difference; only the noise (sd 0.01) is left.
    assert row["vs_rebel"] == pytest.approx(0.1, abs=0.01)
    assert row["gain"] == pytest.approx(row["vs_rebel"], abs=1e-12)
    assert row["gain_low"] > 0.09 and row["gain_high"] < 0.11
    assert row["gain_low_adj"] <= row["gain_low"] and row["gain_high_adj"] >= row["gain_high"]
    assert row["comparisons"] == 1


def test_statistics_are_long_format(tiny_frame: pd.DataFrame) -> None:
    stats = shift.statistics(tiny_frame)

    assert set(STATS_COLUMNS) <= set(stats.columns) and {"world", "quantity"} <= set(stats)
    gains = stats[stats["quantity"] == "gain"]
    assert set(gains["x_name"]) == {"rho"} and set(gains["world"]) == set(shift.WORLDS)
    assert (gains["trials"] == TINY["world_seeds"] * TINY["trials"]).all()
    assert set(stats.loc[stats["method"] == "REBEL", "x_name"]) == {"step"}


def test_plot_writes_files(tiny_frame: pd.DataFrame, tmp_path: Path) -> None:
    paths = shift.plot(tiny_frame, tmp_path)

    assert [p.name for p in paths] == ["shift.png", "shift.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_verdicts_per_world_and_combined() -> None:
    check = load_check("preference_shift")
    table = shift.frontier_gain(_hand_made(), boots=400)

    assert check.world_verdict("annotators", table) == "reproduced"
    assert check.world_verdict("well-specified", table) == "not testable here"
    assert check.combined_verdict({"well-specified": "not testable here",
                                   "annotators": "reproduced"}) == "partially reproduced"
    assert check.combined_verdict({"annotators": "reproduced"}) == "reproduced"
    losing = table.assign(vs_rebel_low_adj=-1.0)
    assert check.world_verdict("annotators", losing) == "not reproduced"


def test_the_check_names_every_world(tmp_path: Path) -> None:
    result = load_check("preference_shift").run("quick", out=tmp_path, **TINY)

    assert result.verdict in VERDICTS
    assert all(f"[{world}, " in result.measured for world in shift.WORLDS)
    assert "not testable" in result.measured and "Bonferroni" in result.measured
    assert result.stats is not None and set(result.table["world"]) == set(shift.WORLDS)
