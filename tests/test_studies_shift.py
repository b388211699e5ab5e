"""Tests of the preference-shift study (claim C7 in the linear world) and its check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from drosim.dro import KL, Chi2
from drosim.estimators import rebel
from drosim.paper_checks import VERDICTS, load_check
from drosim.paper_checks._framework import STATS_COLUMNS
from drosim.studies import shift
from drosim.studies.montecarlo import ALPHA_0

# 64 pairs: the smallest batch the study uses (robust DPO fits of fewer noisy labels are
# not always certified).
TINY = {"world_seeds": 2, "trials": 2, "rounds": 1, "pairs": 64, "radii": (0.1, 1.0),
        "scales": ((64, 4),)}
ROBUST_METHODS = 6  # chi2, KL, W for REBEL and for DPO


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


def test_no_training_pair_scores_objective_3_in_the_headline_worlds() -> None:
    for name in shift.HEADLINE:
        world, evaluation = shift.world_variant(name, 1)
        scorers = [torch.tensor(ALPHA_0)]
        if world.annotator_alpha is not None:
            scorers.append(world.annotator_alpha)
        assert all(float(alpha[2]) == 0 for alpha in scorers), name
        assert evaluation is None and shift.WORLDS[name].held_out and not shift.WORLDS[name].seen
    assert shift.world_variant("misspecified reward", 1)[0].misspecification > 0
    assert shift.world_variant("5% contamination", 1)[0].contamination == 0.05


def test_the_seen_worlds_differ_only_in_annotators_and_prompts() -> None:
    plain, _ = shift.world_variant("well-specified", 1)
    seen, none = shift.world_variant("seen minority", 1)
    shifted, evaluation = shift.world_variant("annotators + prompt shift", 1)

    assert none is None and shift.WORLDS["seen minority"].seen
    torch.testing.assert_close(plain.features, shifted.features)
    assert plain.annotator_fraction == 0
    assert seen.annotator_fraction == shift.MINORITY_FRACTION
    assert seen.annotator_alpha.tolist() == list(shift.SEEN_ALPHA)
    train = shifted.prompt_probs
    assert train is not None and evaluation is not None
    # Evaluation puts most of its mass on the half of the prompts that training neglects.
    neglected = train < train.median()
    assert float(evaluation[neglected].sum()) > 0.7
    with pytest.raises(ValueError, match="world must be one of"):
        shift.world_variant("annotators", 0)


def test_chi2_moves_away_from_rebel_only_with_other_annotators() -> None:
    # One large batch per world at the uniform policy: the chi-square fit's distance from
    # least squares is sampling noise in the plain world, a shift of target with annotators.
    alpha0 = torch.tensor(ALPHA_0, dtype=torch.float64)
    moves = {}
    for name in ("well-specified", "seen minority"):
        world, _ = shift.world_variant(name, 0)
        generator = torch.Generator().manual_seed(0)
        pairs = world.sample_pairs(torch.zeros(2, shift.DIM, dtype=torch.float64), 2048, alpha0,
                                   generator)
        plain = rebel(pairs.dphi, pairs.dr).w
        robust = rebel(pairs.dphi, pairs.dr, Chi2(1.0)).w
        moves[name] = ((robust - plain).norm(dim=1) / plain.norm(dim=1)).max()

    assert float(moves["well-specified"]) < 0.06
    assert float(moves["seen minority"]) > 0.2


def test_radius_grids_end_at_the_point_mass_radii() -> None:
    # Past (n - 1) / 2 (chi2) and log n (KL) every ball holds every single pair: the fit is
    # the same minimax fit, so the grid's top is the end of the radius axis.
    n = 64
    chi2, kl = shift.radius_grid("chi2", n, 5), shift.radius_grid("kl", n, 5)

    assert chi2[-1] == pytest.approx(Chi2.protecting(1 / n).rho) == (n - 1) / 2
    assert kl[-1] == pytest.approx(KL.protecting(1 / n).rho)
    # Radius 0, the plain loss, is the axis's other end: a best radius of 0 says no ball helps.
    assert chi2[0] == kl[0] == 0.0 and len(chi2) == 6
    assert all(np.diff(chi2) > 0) and len(shift.radius_grid("wasserstein", n, 4)) == 5
    with pytest.raises(ValueError, match="family must be one of"):
        shift.radius_grid("tv", n, 5)
    with pytest.raises(ValueError, match="at least 3 points"):
        shift.radius_grid("chi2", n, 2)


def test_every_loss_has_its_frontier_and_its_robust_versions() -> None:
    runs = shift.methods(None, n=64, points=3)

    frontier = {(m.loss, step) for m, step in runs if m.family == "none"}
    robust = {m.name for m, _ in runs if m.family != "none"}
    assert frontier == {(loss, shift.ETA * s) for loss in shift.LOSSES for s in shift.STEP_SCALES}
    assert robust == {"chi2-REBEL", "KL-REBEL", "W-REBEL", "chi2-DPO", "KL-DPO", "W-DPO"}
    assert len(runs) == len(frontier) + ROBUST_METHODS * (3 + 1)  # radius 0 on top


def test_rewards_are_exact_expected_rewards(tiny_frame: pd.DataFrame) -> None:
    # Step 0 is the initial, uniform policy: its rewards are known in closed form, under the
    # evaluation prompts and mixtures of each world (held-out: weight on objective 3).
    grid = shift.mixture_grid()
    start = tiny_frame[(tiny_frame["rule"] == "frontier") & (tiny_frame["step"] == 0)]
    for (name, seed), rows in start.groupby(["world", "world_seed"]):
        world, evaluation = shift.world_variant(name, seed)
        mixtures = grid[grid[:, 2] > 0] if shift.WORLDS[name].held_out else grid
        zero = torch.zeros(shift.DIM, dtype=torch.float64)
        worst = world.expected_reward(zero, mixtures, evaluation).min()
        trained = world.expected_reward(zero, torch.tensor(ALPHA_0).double(), evaluation)

        np.testing.assert_allclose(rows["worst"], float(worst), rtol=1e-12)
        np.testing.assert_allclose(rows["trained"], float(trained), rtol=1e-12)


def test_run_is_deterministic_and_well_formed(tiny_frame: pd.DataFrame) -> None:
    one_world = {**TINY, "worlds": ("unseen objective",)}
    again = shift.run("quick", **one_world)

    first = tiny_frame[tiny_frame["world"] == "unseen objective"].reset_index(drop=True)
    pd.testing.assert_frame_equal(first, again)
    units = TINY["world_seeds"] * TINY["trials"]
    worlds = len(shift.PRESETS["quick"]["worlds"])
    runs = len(shift.methods(TINY["radii"]))
    assert len(tiny_frame) == worlds * (runs + ROBUST_METHODS) * units
    assert (tiny_frame.groupby("world")["trial"].nunique() == units).all()
    chosen = tiny_frame[tiny_frame["rule"] == "validated"]
    assert set(chosen["rho"]) <= set(TINY["radii"])
    assert (chosen.groupby(["world", "world_seed", "method"])["rho"].nunique() == 1).all()
    assert np.isfinite(tiny_frame[["trained", "worst", "protected"]]).all().all()


def test_a_copy_of_the_plain_method_lies_on_its_own_frontier(tiny_frame: pd.DataFrame) -> None:
    plain = tiny_frame[(tiny_frame["rule"] == "frontier") & (tiny_frame["step"] == shift.ETA)]
    copies = plain.assign(method=plain["method"] + " copy", family="chi2", rule="grid", rho=0.5)

    gains = shift.frontier_gain(pd.concat([tiny_frame, copies]), boots=20)

    rows = gains[gains["method"].str.endswith(" copy")]
    assert set(rows["loss"]) == {"rebel", "dpo"}
    np.testing.assert_allclose(rows[["vs_base", "gain", "protected_vs_base"]], 0.0, atol=1e-12)


def _hand_made(seeds: int = 10, trials: int = 8, effect: float = 0.1,
               seed_spread: float = 0.0) -> pd.DataFrame:
    """A frontier of REBEL steps and one robust method that adds ``effect`` to REBEL's worst
    case at step eta, unit by unit, plus a per-seed deviation of sd ``seed_spread`` (the
    cluster effect); every unit carries a large offset shared by its methods."""
    rng = np.random.default_rng(1)
    units = seeds * trials
    offset = rng.normal(0.0, 1.0, units)  # shared by every method of a unit: paired
    base = {"world": "hand", "world_seed": np.repeat(np.arange(seeds), trials),
            "trial": np.arange(units), "loss": "rebel", "family": "none", "rule": "frontier",
            "rho": 0.0}
    rows = [pd.DataFrame(base | {"method": "REBEL", "step": step, "trained": step,
                                 "worst": offset - step, "protected": offset})
            for step in (0.0, shift.ETA, 1.0)]
    cluster = np.repeat(rng.normal(0.0, seed_spread, seeds), trials)
    noise = rng.normal(0.0, 0.01, units)
    robust = rows[1]["worst"] + effect + cluster + noise
    for rule in ("grid", "validated"):
        rows.append(rows[1].assign(method="chi2-REBEL", family="chi2", rule=rule, rho=1.0,
                                   worst=robust))
    return pd.concat(rows, ignore_index=True)


def test_paired_bootstrap_sees_through_a_shared_offset() -> None:
    row = shift.frontier_gain(_hand_made(), boots=400).iloc[0]

    # The offsets (sd 1) cancel in the paired difference; only the noise (sd 0.01) is left.
    assert row["vs_base"] == pytest.approx(0.1, abs=0.01)
    assert row["gain"] == pytest.approx(row["vs_base"], abs=1e-12)
    assert row["gain_low"] > 0.09 and row["gain_high"] < 0.11
    assert row["gain_low_adj"] <= row["gain_low"] and row["gain_high_adj"] >= row["gain_high"]
    assert row["comparisons"] == 1 and row["seeds"] == 10


def test_the_bootstrap_resamples_world_seeds() -> None:
    # A per-seed deviation (sd 0.05 over 10 seeds) is shared by a seed's 8 trials: the
    # interval must carry its spread, about 0.05 / sqrt(10), not the trials' 0.01 / sqrt(80).
    row = shift.frontier_gain(_hand_made(seed_spread=0.05), boots=1000).iloc[0]

    width = row["gain_high"] - row["gain_low"]
    assert 0.5 * 2 * 1.645 * 0.05 / np.sqrt(10) < width < 2 * 2 * 1.645 * 0.05 / np.sqrt(10)
    with pytest.raises(ValueError, match="same number of trials"):
        shift.frontier_gain(_hand_made().query("world_seed > 0 or trial % 8 > 0"))


def test_statistics_are_long_format(tiny_frame: pd.DataFrame) -> None:
    stats = shift.statistics(tiny_frame)

    assert set(STATS_COLUMNS) <= set(stats.columns) and {"world", "quantity"} <= set(stats)
    gains = stats[stats["quantity"] == "gain"]
    assert set(gains["x_name"]) == {"rho"}
    assert set(gains["world"]) == set(shift.PRESETS["quick"]["worlds"])
    assert (gains["trials"] == TINY["world_seeds"] * TINY["trials"]).all()
    assert set(stats.loc[stats["method"].isin(["REBEL", "DPO"]), "x_name"]) == {"step"}


def test_plot_writes_files_with_one_colour_per_method(tiny_frame: pd.DataFrame,
                                                      tmp_path: Path) -> None:
    paths = shift.plot(tiny_frame, tmp_path)

    assert [p.name for p in paths] == ["shift.png", "shift.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert len(set(shift.METHOD_COLOURS.values())) == len(shift.METHOD_COLOURS)
    assert set(tiny_frame["method"]) <= set(shift.METHOD_COLOURS)


def test_verdicts_per_world_and_combined() -> None:
    check = load_check("preference_shift")
    table = shift.frontier_gain(_hand_made(), boots=400)
    chosen = table[table["rule"] == "validated"]

    assert check.world_verdict("seen minority", chosen) == "reproduced"
    assert check.world_verdict("well-specified", chosen) == "not testable here"
    losing = chosen.assign(vs_base_low_adj=-1.0, vs_base_high_adj=-0.5)
    assert check.world_verdict("unseen objective", chosen.assign(vs_base_low_adj=-1.0)
                               ) == "inconclusive"
    assert check.world_verdict("unseen objective", losing) == "not reproduced"
    # The combined verdict follows the headline (unseen) worlds only.
    assert check.combined_verdict({"seen minority": "reproduced",
                                   "unseen objective": "not reproduced",
                                   "5% contamination": "not reproduced"}) == "not reproduced"
    assert check.combined_verdict({"unseen objective": "reproduced",
                                   "5% contamination": "inconclusive"}) == "partially reproduced"
    assert check.combined_verdict({"seen minority": "reproduced"}) == "reproduced"


def test_oracle_flags_the_best_grid_radius_and_the_grid_ends() -> None:
    check = load_check("preference_shift")
    table = pd.DataFrame({"world": "w", "method": "m", "family": "chi2", "pairs": 21,
                          "rule": ["grid"] * 3 + ["validated"], "rho": [0.1, 1.0, 10.0, 1.0],
                          "gain": [0.0, 0.2, 0.1, 0.2]})

    flagged = check.with_oracle(table)

    assert flagged["oracle"].tolist() == [False, True, False, False]
    assert (flagged["grid_end"] == "").all()
    assert check.with_oracle(table.assign(gain=[0.3, 0.2, 0.1, 0.2]))["grid_end"].iloc[0] == \
        "smallest"
    assert check.with_oracle(table.assign(rho=[0.0, 1.0, 10.0, 1.0], gain=[0.0, -0.1, -0.2, 0.2])
                             )["grid_end"].iloc[0] == "radius 0"
    # 10 = (21 - 1) / 2: chi2's point-mass radius, past which no ball differs.
    top = check.with_oracle(table.assign(gain=[0.0, 0.1, 0.3, 0.2]))["grid_end"].iloc[2]
    assert top == "point-mass radius"
    assert check.with_oracle(table.assign(gain=[0.0, 0.1, 0.3, 0.2], pairs=64)
                             )["grid_end"].iloc[2] == "largest"


def test_the_check_names_every_world(tmp_path: Path) -> None:
    result = load_check("preference_shift").run("quick", out=tmp_path, **TINY)

    assert result.verdict in VERDICTS
    assert all(f"[{world}, " in result.measured for world in shift.PRESETS["quick"]["worlds"])
    assert all(world in result.measured for world in shift.HEADLINE)
    assert "validated" in result.measured and "world seed" in result.measured
    assert result.reason and result.headline.startswith(shift.HEADLINE[0])
    assert result.stats is not None
    assert set(result.table["rule"]) == {"grid", "validated"}
    sweep = result.table[result.table["dim"] != shift.DIM]
    assert set(sweep["world"]) == set(shift.SCALE_WORLDS) and "Dataset scales" in result.measured
