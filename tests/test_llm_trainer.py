"""The trainer end to end, through the ``drosim-llm`` command line in subprocesses:
exact resume after SIGKILL, checkpoint-and-exit on SIGTERM, bad configurations, and the
demo's smoke configuration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from drosim.llm.components.demo_world import build_demo_base
from drosim.llm.recipes.demo import DEMO_METHODS, learning_report, run_demo
from drosim.llm.recipes.report import summarise

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# 12 short iterations, a checkpoint every 4: a kill lands between checkpoints
RUN = ["train", "--config", "smoke", "method=chi2-rebel", "chi2_rho=0.1", "iterations=12",
       "checkpoint_every=4", "eval_every=5"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_demo_base(tmp_path_factory.mktemp("llm") / "base", pretrain_steps=20,
                           corpus_size=300)


def command(out: Path, base: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "drosim.llm.cli", *RUN, f"model={base}", f"out_dir={out}",
            *extra]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def train_records(out: Path) -> list[dict]:
    if not (out / "metrics.jsonl").exists():
        return []
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def wait_for_iteration(process: subprocess.Popen, out: Path, iteration: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(r["iteration"] >= iteration for r in train_records(out)):
            return
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.01)
    raise TimeoutError(f"iteration {iteration} never logged")


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llm") / "uninterrupted"
    subprocess.run(command(out, base), env=ENV, check=True, capture_output=True)
    return out


def assert_same_run(resumed: Path, reference: Path) -> None:
    ours, theirs = final_weights(resumed), final_weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{name} differs after resume"
    # the metrics log holds every iteration once, with the same numbers (but wall times)
    assert untimed(train_records(resumed)) == untimed(train_records(reference))


def untimed(records: list[dict]) -> list[dict]:
    """The records without their wall-clock timings (seconds, generation rate)."""
    return [{k: v for k, v in r.items() if not k.endswith(("seconds", "_per_s"))}
            for r in records]


def test_resume_after_sigkill_is_bitwise_exact(base, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen(command(out, base), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_iteration(process, out, 5)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("iteration-*"))
    assert checkpoints and checkpoints[-1] < "iteration-000012"
    assert not (out / "final").exists()

    subprocess.run(command(out, base, "--resume"), env=ENV, check=True, capture_output=True)
    assert_same_run(out, uninterrupted)


def test_sigterm_checkpoints_then_resumes_exactly(base, uninterrupted, tmp_path):
    out = tmp_path / "terminated"
    process = subprocess.Popen(command(out, base), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_for_iteration(process, out, 1)
    process.send_signal(signal.SIGTERM)
    assert process.wait() == 128 + signal.SIGTERM
    assert "resume with --resume" in process.stderr.read()
    state = json.loads(next((out / "checkpoints").glob("iteration-*/state.json")).read_text())
    assert state["iteration"] == train_records(out)[-1]["iteration"]

    subprocess.run(command(out, base, "--resume"), env=ENV, check=True, capture_output=True)
    assert_same_run(out, uninterrupted)


@pytest.mark.parametrize("override, message", [
    ("chi2_rho=-1", "chi2_rho"),
    ("method=ppo", "unknown method"),
    ("train_mixture={joy: 1, sadness: 1}", "unknown objectives"),
    ("temperature=0", "temperature"),
    ("minibatch_size=64", "minibatch_size"),
])
def test_bad_configuration_is_a_clear_error(base, tmp_path, override, message):
    result = subprocess.run(command(tmp_path / "bad", base, override), env=ENV,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr


def test_demo_smoke_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    rewards = run_demo(out, smoke=True, seeds=(0, 1), progress=False)
    assert (out / "rewards.png").stat().st_size > 10_000
    table = pd.read_csv(out / "rewards.csv")
    pd.testing.assert_frame_equal(table, rewards, check_dtype=False)
    assert set(table.method) == set(DEMO_METHODS)
    assert set(table.seed) == {0, 1}
    assert {"1 joy", "1 anger", "0.5 joy + 0.5 calm", "worst", "mean"} <= set(table.mixture)
    assert table.reward.between(0, 1).all()
    # every (method, seed) evaluated before training and at the end
    per_run = table.groupby(["method", "seed"]).iteration.agg(["min", "max"])
    assert (per_run["min"] == 0).all() and (per_run["max"] == 3).all()
    summary = pd.read_csv(out / "summary.csv")
    assert summary.trained_on.sum() == len(DEMO_METHODS)

    # a second call finds every run finished and only rebuilds the table
    started = time.perf_counter()
    again = run_demo(out, smoke=True, seeds=(0, 1), progress=False)
    assert time.perf_counter() - started < 10
    pd.testing.assert_frame_equal(again, rewards)
    # the smoke runs live apart, so a full demo into the same folder cannot reuse them
    assert (out / "runs-smoke").is_dir() and (out / "base-smoke").is_dir()
    assert not (out / "runs").exists() and not (out / "base").exists()


def test_a_run_of_another_configuration_is_never_reused(tmp_path):
    from drosim.llm.components.config import bundled_config_path, load_config, save_config
    from drosim.llm.recipes.demo import check_same_configuration

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    smoke = load_config(bundled_config_path("smoke"), [f"out_dir={run_dir}"])
    save_config(smoke, run_dir / "config.yaml")
    check_same_configuration(run_dir, smoke)  # the same: reused
    full = load_config(bundled_config_path("demo"), [f"out_dir={run_dir}"])
    with pytest.raises(ValueError, match=r"holds a run of another configuration .*iterations"):
        check_same_configuration(run_dir, full)


def test_a_finished_run_is_never_overwritten_silently(base, uninterrupted, tmp_path):
    out = tmp_path / "again"
    subprocess.run(command(out, base, "iterations=2", "checkpoint_every=1"), env=ENV,
                   check=True, capture_output=True)
    lines = (out / "metrics.jsonl").read_text()
    # a rerun without --resume or --overwrite is refused, and nothing is touched
    result = subprocess.run(command(out, base, "iterations=2", "checkpoint_every=1"), env=ENV,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert ("holds an earlier run (config.yaml, metrics.jsonl, checkpoints, final, "
            "eval_initial.pt)") in result.stderr
    assert (out / "metrics.jsonl").read_text() == lines
    # --overwrite replaces it: the log holds one run again
    subprocess.run([*command(out, base, "iterations=2", "checkpoint_every=1"), "--overwrite"],
                   env=ENV, check=True, capture_output=True)
    assert len(train_records(out)) == 2


def test_resume_without_a_checkpoint_says_it_starts_afresh(base, tmp_path):
    out = tmp_path / "fresh"
    result = subprocess.run([*command(out, base, "iterations=1"), "--resume"], env=ENV,
                            capture_output=True, text=True, check=True)
    assert "no intact checkpoint in" in result.stderr and "starts the run from scratch" in (
        result.stderr)
    assert (out / "final").is_dir()


@pytest.mark.slow
def test_demo_rebel_learns_beyond_seed_spread(tmp_path):
    """The embedded default's acceptance: REBEL's training-mixture reward rises well beyond
    its seed-to-seed spread (the full demo configuration, REBEL only)."""
    rewards = run_demo(tmp_path, methods=("rebel",), seeds=(0, 1, 2), progress=False)
    trained = rewards[rewards.mixture == "0.5 joy + 0.5 calm"]
    start = trained[trained.iteration == 0].reward
    end = trained[trained.iteration == trained.iteration.max()].reward
    assert end.mean() - start.mean() > 2 * end.std()
    assert end.min() > start.max() + 0.1
    assert "rebel learns" in learning_report(summarise(rewards, "0.5 joy + 0.5 calm"))


@pytest.mark.slow
@pytest.mark.parametrize("w_gradient", ["exact", "finite-difference"])
def test_torchrun_with_two_gloo_ranks_trains_end_to_end(base, tmp_path, w_gradient):
    """The trainer under ``torchrun`` (2 CPU ranks, gloo) with W-REBEL, either gradient; the
    update itself is checked against one process in tests/test_llm_distributed.py."""
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "-m", "drosim.llm.cli", "train", "--config", "smoke", "method=w-rebel",
            f"w_gradient={w_gradient}", f"model={base}", f"out_dir={out}"]
    subprocess.run(args, env=ENV, check=True, capture_output=True, timeout=300)
    assert [r["iteration"] for r in train_records(out)] == [1, 2, 3]
    assert (out / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_torchrun_ranks_build_the_demo_base_once(tmp_path):
    # model=demo: the base model is built by rank 0 while rank 1 waits (they used to race to
    # rename the same folder into place).
    out = tmp_path / "ddp-demo"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "drosim.llm.cli", "train", "--config", "smoke", "iterations=1",
            f"out_dir={out}"]
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "base" / "config.json").exists() and not (out / "base.tmp").exists()
    assert (out / "final" / "model.safetensors").exists()


def test_a_corrupted_newest_checkpoint_resumes_from_the_one_before_exactly(
        base, uninterrupted, tmp_path):
    out = tmp_path / "corrupted"
    process = subprocess.Popen(command(out, base), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_iteration(process, out, 9)
    process.send_signal(signal.SIGKILL)
    process.wait()
    newest = out / "checkpoints" / "iteration-000008"
    assert (out / "checkpoints" / "iteration-000004").is_dir() and newest.is_dir()
    model = newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # a torn write

    result = subprocess.run(command(out, base, "--resume"), env=ENV, check=True,
                            capture_output=True, text=True)
    assert "iteration-000008" in result.stderr and "trying the one before it" in result.stderr
    assert_same_run(out, uninterrupted)


def test_the_stop_flag_restores_the_signal_handlers_it_replaced():
    from drosim.llm.components.runtime import StopFlag

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        before = signal.getsignal(signal.SIGINT)
        with StopFlag() as stop:
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) == before
    finally:
        signal.signal(signal.SIGTERM, previous)
