"""Heterogeneous annotators: the minority's rows are mixed by its own mixture (exactly), its
count over the ranks, bad keys refused, exact resume with a minority, and the study recipe
(:mod:`drosim.llm.minority_study`) in its smoke configuration."""

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

from drosim.llm.config import bundled_config_path, load_config
from drosim.llm.demo import build_demo_base
from drosim.llm.methods import make_method
from drosim.llm.rewards import CallableReward
from drosim.llm.rollout import SampledPairs
from drosim.llm.trainer import Distributed, local_minority_pairs, minority_rows, score_batch

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
    from drosim.llm.minority_study import main

    assert main(["--out", str(tmp_path), "--smoke", "--seeds", "0,1", "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "minority.csv")
    assert set(table.method) == {"rebel", "chi2-rebel", "kl-rebel"}
    assert set(table.seed) == {0, 1}
    assert table[["train", "minority", "population", "worst"]].notna().all().all()
    assert (table.population - (0.8 * table.train + 0.2 * table.minority)).abs().max() < 1e-12
    # REBEL's weights are uniform over a minibatch; the robust sets' move
    assert (table[table.method == "rebel"].max_weight == 1 / 4).all()
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert {"method", "metric", "n_seeds", "mean_difference", "ci_low", "ci_high", "adj_low",
            "adj_high", "seed_0", "seed_1"} <= set(summary.columns)
    assert set(summary.method) == {"chi2-rebel", "kl-rebel"}
    assert set(summary.metric) == {"train", "minority", "population", "worst"}
    assert (summary.ci_low <= summary.mean_difference).all()
    assert (summary.mean_difference <= summary.ci_high).all()
    assert (tmp_path / "minority.png").stat().st_size > 10_000
