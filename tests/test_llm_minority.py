"""Heterogeneous annotators: the minority's rows are mixed by its own mixture (exactly), its
count over the ranks, bad keys refused, exact resume with a minority, and the study recipe
(:mod:`drosim.llm.studies.minority_study`) in its smoke configuration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from drosim.llm.components.config import bundled_config_path, load_config
from drosim.llm.components.demo_world import build_demo_base
from drosim.llm.components.methods import make_method
from drosim.llm.components.rewards import CallableReward
from drosim.llm.components.rollout import SampledPairs
from drosim.llm.components.runtime import Distributed
from drosim.llm.recipes.trainer import local_minority_pairs, minority_rows, score_batch

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
MINORITY = ["minority_mixture={formal: 1.0}", "minority_fraction=0.25"]


def fake_run(scores: torch.Tensor, *, minority: bool, fraction: float = 0.3):
    """What score_batch reads of a run: a reward model returning ``scores`` (n, 2, 3) by
    response name, the mixtures, and a REBEL method (no reference forward)."""
    n = scores.shape[0]
    table = {f"{i}-{k}": scores[i, k] for i in range(n) for k in range(2)}
    reward_model = CallableReward(lambda prompts, responses: torch.stack(
        [table[r] for r in responses]), ["joy", "calm", "formal"])
    config = SimpleNamespace(minority_fraction=fraction if minority else 0.0,
                             pairs_per_iteration=n)
    return SimpleNamespace(
        reward_model=reward_model, device="cpu", config=config, world=Distributed(),
        local_pairs=n, method=make_method("rebel"), alpha=torch.tensor([0.5, 0.5, 0.0]),
        minority_alpha=torch.tensor([0.0, 0.2, 0.8]) if minority else None)


def fake_pairs(n: int) -> SampledPairs:
    ids = torch.zeros(n, 2, 3, dtype=torch.long)
    return SampledPairs(ids, torch.ones_like(ids), torch.ones_like(ids),
                        [[f"{i}-0", f"{i}-1"] for i in range(n)],
                        torch.zeros(n, 2, dtype=torch.bool))


def test_minority_rows_are_mixed_by_the_minority_mixture_exactly():
    scores = torch.rand(10, 2, 3, generator=torch.Generator().manual_seed(0))
    run = fake_run(scores, minority=True)
    torch.manual_seed(7)
    rewards = score_batch(run, ["p"] * 10, fake_pairs(10)).rewards
    torch.manual_seed(7)  # the same draw as score_batch's (the reward draws nothing)
    rows = minority_rows(run)
    assert int(rows.sum()) == 3  # round(0.3 * 10)
    assert torch.equal(rewards[rows], (scores @ run.minority_alpha)[rows])
    assert torch.equal(rewards[~rows], (scores @ run.alpha)[~rows])


def test_without_a_minority_every_row_is_the_training_mixture_and_nothing_is_drawn():
    scores = torch.rand(6, 2, 3, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    rewards = score_batch(fake_run(scores, minority=False), ["p"] * 6, fake_pairs(6)).rewards
    assert torch.equal(rewards, scores @ torch.tensor([0.5, 0.5, 0.0]))
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))  # the RNG stream the update draws from: untouched


@pytest.mark.parametrize("fraction, pairs, world_size", [
    (0.2, 64, 1), (0.2, 64, 4), (0.25, 8, 2), (0.1, 30, 3), (0.5, 6, 4)])
def test_the_minority_count_over_all_ranks_is_the_rounded_fraction(fraction, pairs,
                                                                     world_size):
    config = SimpleNamespace(minority_fraction=fraction, pairs_per_iteration=pairs)
    counts = [local_minority_pairs(config, Distributed(rank, world_size))
              for rank in range(world_size)]
    assert sum(counts) == round(fraction * pairs)
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("overrides, message", [
    (["minority_fraction=1.0", "minority_mixture={formal: 1}"], "minority_fraction must be"),
    (["minority_fraction=-0.1", "minority_mixture={formal: 1}"], "minority_fraction must be"),
    (["minority_mixture={formal: 1}"], "go together"),
    (["minority_fraction=0.2"], "go together"),
    (["minority_fraction=0.2", "minority_mixture={formal: -1}"], "minority_mixture"),
    (["minority_fraction=0.2", "minority_mixture={}"], "minority_mixture"),
    (["minority_fraction=0.05", "minority_mixture={formal: 1}"], "at least one of the 8"),
])
def test_bad_minority_keys_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(bundled_config_path("smoke"), overrides)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_demo_base(tmp_path_factory.mktemp("llm") / "base", pretrain_steps=20,
                           corpus_size=300)


def command(out: Path, base: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "drosim.llm.cli", "train", "--config", "smoke",
            "method=chi2-rebel", "chi2_rho=0.5", "iterations=4", "checkpoint_every=4",
            *MINORITY, f"model={base}", f"out_dir={out}", *extra]


def test_a_minority_objective_unknown_to_the_reward_model_is_refused(base, tmp_path):
    result = subprocess.run(command(tmp_path / "bad", base, "minority_mixture={sadness: 1}"),
                            env=ENV, capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown objectives ['sadness']" in result.stderr


def train_records(out: Path) -> list[dict]:
    if not (out / "metrics.jsonl").exists():
        return []
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if not k.endswith(("seconds", "_per_s"))}
            for r in records if r["kind"] == "train"]


def test_resume_with_a_minority_is_bitwise_exact(base, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(command(reference, base), env=ENV, check=True, capture_output=True)
    assert [r["minority_pairs"] for r in train_records(reference)] == [2] * 4  # 0.25 * 8

    out = tmp_path / "terminated"
    process = subprocess.Popen(command(out, base), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not train_records(out):  # stop it after its first iteration
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait() == 128 + signal.SIGTERM
    subprocess.run(command(out, base, "--resume"), env=ENV, check=True, capture_output=True)

    ours = load_file(out / "final" / "model.safetensors")
    theirs = load_file(reference / "final" / "model.safetensors")
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert train_records(out) == train_records(reference)


def test_the_study_smoke_writes_its_tables_and_figure(tmp_path):
    from drosim.llm.studies.minority_study import main

    assert main(["--out", str(tmp_path), "--smoke", "--seeds", "0,1"]) == 0
    table = pd.read_csv(tmp_path / "minority.csv")
    arms = {"rebel", "rebel-eta0.25x", "rebel-eta0.5x", "chi2-rebel", "kl-rebel"}
    assert set(table.method) == arms
    assert set(table.variant) == {"seen", "unseen"}
    assert set(table.seed) == {0, 1}
    assert len(table) == 2 * 5 * 2
    assert table[["train", "formal", "anger", "population", "worst"]].notna().all().all()
    seen, unseen = table[table.variant == "seen"], table[table.variant == "unseen"]
    # the annotators' average weighs the minority's own objective: formal, then anger
    assert (seen.population - (0.8 * seen.train + 0.2 * seen.formal)).abs().max() < 1e-12
    assert (unseen.population - (0.8 * unseen.train + 0.2 * unseen.anger)).abs().max() < 1e-12
    # REBEL's shorter steps: eta times the scale (smoke's eta is the default 0.1)
    steps = table.groupby("method").eta.first()
    assert steps["rebel-eta0.25x"] == pytest.approx(0.025)
    assert steps["rebel-eta0.5x"] == pytest.approx(0.05)
    # the radius from the drawn labels: round(0.2 * 8) = 2 of every 8 pairs, f = 0.25
    robust = table.method.isin(["chi2-rebel", "kl-rebel"])
    assert (table[robust].protect_fraction == 0.25).all()
    assert table[~robust].protect_fraction.isna().all()
    saved = load_config(tmp_path / "minority-runs-smoke" / "formal" / "chi2-rebel-seed0"
                        / "config.yaml")
    assert (saved.protect_fraction, saved.chi2_rho, saved.kl_rho) == (0.25, None, None)
    assert load_config(tmp_path / "minority-runs-smoke" / "anger" / "kl-rebel-seed1"
                       / "config.yaml").minority_mixture == {"anger": 1.0}
    # REBEL's weights are uniform over a minibatch; the frontier's arms have no gain over it
    assert (table[~robust].max_weight == 1 / 4).all()
    assert (table[~robust][["frontier_formal", "frontier_anger"]] == 0).all().all()
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert {"variant", "method", "metric", "n_seeds", "mean_difference", "ci_low", "ci_high",
            "adj_low", "adj_high", "median_difference", "n_positive", "n_negative", "sign_p",
            "sign_p_adj", "seed_0", "seed_1"} <= set(summary.columns)
    assert set(summary.method) == arms - {"rebel"}
    assert set(summary[summary.method == "chi2-rebel"].metric) == {
        "train", "formal", "anger", "population", "worst", "frontier_formal", "frontier_anger"}
    assert (summary.ci_low <= summary.mean_difference + 1e-12).all()
    assert (summary.mean_difference <= summary.ci_high + 1e-12).all()
    assert ((summary.sign_p > 0) & (summary.sign_p <= summary.sign_p_adj)
            & (summary.sign_p_adj <= 1)).all()
    assert (tmp_path / "minority.png").stat().st_size > 10_000


def test_the_frontier_is_interpolated_in_the_training_reward_and_held_flat_beyond():
    from drosim.llm.studies.minority_study import frontier_gain

    frontier = pd.DataFrame({"train": [0.4, 0.0, 0.2], "formal": [0.0, 0.2, 0.1]})
    assert frontier_gain(0.3, 0.5, frontier, "formal") == (pytest.approx(0.45), False)
    assert frontier_gain(0.1, 0.1, frontier, "formal") == (pytest.approx(-0.05), False)
    assert frontier_gain(0.5, 0.1, frontier, "formal") == (pytest.approx(0.1), True)


def test_the_frontier_gain_pairs_each_robust_run_with_its_own_seed():
    from drosim.llm.studies.minority_study import add_frontier_gains

    rows = []
    for seed, shift in [(0, 0.0), (1, 1.0)]:
        for method, train, formal in [("rebel", 0.4, 0.0), ("rebel-eta0.5x", 0.2, 0.1),
                                      ("chi2-rebel", 0.3, 0.3)]:
            rows.append({"variant": "seen", "method": method, "seed": seed,
                         "train": train, "formal": formal + shift, "anger": 0.0,
                         "initial_train": 0.0, "initial_formal": 0.2 + shift,
                         "initial_anger": 0.0})
    table = add_frontier_gains(pd.DataFrame(rows)).set_index(["method", "seed"])
    # frontier at 0.3: halfway between (0.2, 0.1) and (0.4, 0.0), shifted with the seed
    assert table.loc[("chi2-rebel", 0), "frontier_formal"] == pytest.approx(0.25)
    assert table.loc[("chi2-rebel", 1), "frontier_formal"] == pytest.approx(0.25)
    assert table.loc[("rebel-eta0.5x", 1), "frontier_formal"] == 0


def test_the_sign_test_is_exact_and_drops_ties():
    import numpy as np

    from drosim.llm.studies.minority_study import sign_test

    assert sign_test(np.array([1.0] * 10)) == (10, 0, pytest.approx(2 / 2**10))
    assert sign_test(np.array([1.0, -1.0, 0.0])) == (1, 1, 1.0)
    assert sign_test(np.zeros(3)) == (0, 0, 1.0)


def summary_row(variant, method, metric, median, p):
    return {"variant": variant, "method": method, "metric": metric, "n_seeds": 20,
            "mean_difference": median, "ci_low": median - 0.1, "ci_high": median + 0.1,
            "adj_low": median - 0.2, "adj_high": median + 0.2, "median_difference": median,
            "n_positive": 15 if median > 0 else 5, "n_negative": 5 if median > 0 else 15,
            "sign_p": p, "sign_p_adj": min(1.0, 2 * p)}


def test_the_verdict_says_whether_the_objective_was_seen_and_reads_the_frontier():
    from drosim.llm.studies.minority_study import verdict

    rows = []
    for variant, frontier in [("seen", 0.1), ("unseen", -0.02)]:
        for method in ("chi2-rebel", "kl-rebel"):
            rows += [summary_row(variant, method, "formal", frontier, 0.001),
                     summary_row(variant, method, "frontier_formal", frontier,
                                 0.001 if variant == "seen" else 0.3),
                     summary_row(variant, method, "train", -0.1, 0.001),
                     summary_row(variant, method, "population", -0.02, 0.2)]
    table = pd.DataFrame({"variant": ["seen", "unseen"] * 2,
                          "method": ["chi2-rebel"] * 2 + ["kl-rebel"] * 2,
                          "protect_fraction": [0.2] * 4, "outside_frontier": [False] * 4,
                          "train": [0.01, 0.3, 0.3, 0.3], "initial_train": [0.05] * 4})
    text = verdict(pd.DataFrame(rows), table, fraction=0.2)
    seen, unseen = text.split("== unseen")
    assert "formal was SEEN in training" in seen
    assert "NOT SEEN in training" in unseen
    assert seen.count("protects formal beyond what a smaller REBEL step buys") == 2
    assert unseen.count("serves formal WORSE than REBEL") == 2
    assert "median +0.100 [15+/5-, p 0.001, adj 0.002]" in seen
    assert "In 1 of 1 seeds it ends below the initial policy's" in seen
    assert "In 0 of 1 seeds" in unseen
