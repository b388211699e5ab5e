"""FSDP2 sharding (drosim.llm.components.sharding) of update_step over two gloo processes.

Each rank builds the same float64 tiny GPT-2 and optimiser from one seed, takes its half of a
shared minibatch and runs ``update_step`` twice, once with the policy sharded by
``shard_policy`` and once unsharded (the hand-written all-reduce). Both must match one process
on the whole minibatch. Gradients are clipped at norm 1 (the unclipped norms are 2 to 50):
clipping is blind to a gradient's scale, so the reported global norm, which is not, is what
shows that the ranks' gradients are summed and not averaged. The optimiser is SGD with
momentum (a state to shard, and linear: AdamW's first step divides each gradient by its own
size, which turns rounding in near-zero gradients into 1e-3 relative differences).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from llm_helpers import (
    run_on_two_ranks,
    shared_pair_batch,
    tiny_model,
)
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from drosim.llm.cli import main as cli_main
from drosim.llm.components.batch import PairBatch
from drosim.llm.components.config import bundled_config_path, load_config
from drosim.llm.components.demo_world import build_demo_base
from drosim.llm.components.methods import METHODS, make_method
from drosim.llm.components.sharding import is_sharded, shard_policy, transformer_blocks
from drosim.llm.components.update import StepStats, update_step

RADII = dict(chi2_rho=0.1, kl_rho=0.1, kl_tau=0.5, w_rho=0.1)
ETA, BETA = 1.0, 1.0
STEPS = 2  # the second step sees the momentum and the once-updated weights
# Bound on the parameters' difference to one process, relative to the size of the update. The
# objective's arithmetic differs only in summation order (rounding, 1e-16); the finite
# difference of the Wasserstein methods cancels two gradients about 1/sqrt(eps) = 7e7 times
# larger than their difference, so its rounding reaches ~1e-9 relative in the gradient.
# Measured: at most 4e-14, and 3e-9 for w-rebel and wdpo.
TOLERANCE = {name: 1e-7 if name in ("w-rebel", "wdpo") else 1e-12 for name in METHODS}


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters as whole (gathered) tensors."""
    return {name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
            for name, value in model.state_dict().items()}


def _train(batch: PairBatch, name: str, *, sharded: bool = False
           ) -> tuple[dict[str, torch.Tensor], list[StepStats]]:
    """``STEPS`` update_steps of method ``name`` from the seeded tiny policy."""
    model = tiny_model(seed=0)
    if sharded:
        shard_policy(model, mixed_precision=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.01)
    method = make_method(name, **RADII)
    stats = [update_step(model, optimizer, batch, method, eta=ETA, beta=BETA, max_grad_norm=1.0,
                         w_gradient="finite-difference") for _ in range(STEPS)]
    return _full_state(model), stats


def _on_rank(local: PairBatch) -> dict:
    """One rank's results on its half of the batch, sharded and not, for every method."""
    return {name: {"fsdp2": _train(local, name, sharded=True), "none": _train(local, name)}
            for name in METHODS}


@pytest.fixture(scope="module")
def shared_batch() -> PairBatch:
    return shared_pair_batch()


@pytest.fixture(scope="module")
def two_ranks(shared_batch, tmp_path_factory) -> list[dict]:
    """What each of the two gloo ranks saved."""
    return run_on_two_ranks(_on_rank, shared_batch, tmp_path_factory.mktemp("fsdp"))


def _relative_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
                         initial: dict[str, torch.Tensor]) -> float:
    """max over parameters of |ours - theirs| / max |theirs - initial| (the size of the
    update)."""
    moved = max(float((theirs[k] - initial[k]).abs().max()) for k in initial)
    return max(float((ours[k] - theirs[k]).abs().max()) for k in initial) / moved


@pytest.mark.parametrize("name", METHODS)
def test_sharded_ranks_match_one_process_and_the_unsharded_ranks(two_ranks, shared_batch,
                                                                 name):
    single_state, single_stats = _train(shared_batch, name)
    initial = tiny_model(seed=0).state_dict()
    assert max(float((single_state[k] - initial[k]).abs().max()) for k in initial) > 5e-4

    for rank in two_ranks:
        (sharded, sharded_stats), (plain, plain_stats) = (rank[name]["fsdp2"],
                                                          rank[name]["none"])
        assert sharded.keys() == single_state.keys()
        assert _relative_difference(sharded, single_state, initial) <= TOLERANCE[name]
        assert _relative_difference(sharded, plain, initial) <= TOLERANCE[name]
        for step in range(STEPS):
            single = single_stats[step]
            assert single.grad_norm > 1.0  # clipping was active
            for stats in (sharded_stats[step], plain_stats[step]):
                assert stats.objective == pytest.approx(single.objective, rel=TOLERANCE[name])
                assert stats.mean_loss == pytest.approx(single.mean_loss, rel=TOLERANCE[name])
                # summed, not averaged: an average would halve the norm
                assert stats.grad_norm == pytest.approx(single.grad_norm,
                                                        rel=TOLERANCE[name])
    # the two ranks hold the same gathered weights
    for key, value in two_ranks[0][name]["fsdp2"][0].items():
        assert torch.equal(two_ranks[1][name]["fsdp2"][0][key], value), key


def test_a_sharded_policy_is_recognised_through_torch_compile(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = tiny_model(seed=0)
        assert not is_sharded(model) and not is_sharded(torch.compile(model))
        shard_policy(model, mixed_precision=None)
        # the trainer hands update_step the compile wrapper (compile=true): it must not
        # all-reduce the already reduced, sharded gradients again
        assert is_sharded(model) and is_sharded(torch.compile(model))
    finally:
        dist.destroy_process_group()


def test_transformer_blocks_are_found_or_refused_clearly():
    model = tiny_model(seed=0)
    assert transformer_blocks(model) is model.transformer.h
    with pytest.raises(ValueError, match=r"no nn\.ModuleList of transformer blocks"):
        transformer_blocks(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ the trainer under torchrun

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# Two iterations of the smoke run, a checkpoint after each.
RUN = ["train", "--config", "smoke", "iterations=2", "checkpoint_every=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_demo_base(tmp_path_factory.mktemp("fsdp-run") / "base", pretrain_steps=20,
                           corpus_size=300)


def torchrun(out: Path, base: Path, *extra: str) -> list[str]:
    """The command of a 2-rank CPU run of the CLI."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "-m", "drosim.llm.cli", *RUN, f"model={base}", f"out_dir={out}", *extra]


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory) -> dict[str, Path]:
    """The same 2-rank run, sharded and not."""
    root = tmp_path_factory.mktemp("fsdp-runs")
    for sharding in ("fsdp2", "none"):
        done = subprocess.run(torchrun(root / sharding, base, f"sharding={sharding}"), env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    return {sharding: root / sharding for sharding in ("fsdp2", "none")}


def test_a_sharded_run_ends_where_the_unsharded_one_does(runs, base):
    sharded, plain = (load_file(runs[s] / "final" / "model.safetensors")
                      for s in ("fsdp2", "none"))
    initial = load_file(base / "model.safetensors")
    assert sharded.keys() == plain.keys() == initial.keys()  # tied weights saved once
    difference = max(float((sharded[k] - plain[k]).abs().max()) for k in plain)
    update = max(float((plain[k] - initial[k]).abs().max()) for k in plain)
    # float32: the gathered weights feed kernels with other strides, so gradients differ by
    # rounding (1e-7 relative); AdamW's first steps divide every gradient by its own size,
    # which lifts that to ~1% of a step in near-zero entries (measured 2.5e-5 after one
    # iteration, against steps of 2e-3).
    assert update > 1e-3
    assert difference < 0.05 * update
    checkpoint = runs["fsdp2"] / "checkpoints" / "iteration-000002"
    assert sorted(p.name for p in (checkpoint / "dcp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng-rank1.pt", "state.json"} <= set(
        manifest)


@pytest.mark.parametrize("sharding", ["fsdp2", "none"])
def test_export_of_a_checkpoint_loads_with_from_pretrained(runs, tmp_path, sharding):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    checkpoint = runs[sharding] / "checkpoints" / "iteration-000002"
    assert cli_main(["export", str(checkpoint), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    final = AutoModelForCausalLM.from_pretrained(runs[sharding] / "final")
    # the last checkpoint holds the final weights
    for (name, ours), (_, theirs) in zip(model.state_dict().items(),
                                         final.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name
    assert model.lm_head.weight is model.transformer.wte.weight
    assert AutoTokenizer.from_pretrained(out)("joy calm").input_ids


def test_export_of_a_run_dir_takes_final_and_refuses_a_non_empty_out(runs, tmp_path, capsys):
    out = tmp_path / "exported"
    assert cli_main(["export", str(runs["fsdp2"]), "--out", str(out)]) == 0
    assert f"exported {runs['fsdp2'] / 'final'}" in capsys.readouterr().out
    assert load_file(out / "model.safetensors").keys() == load_file(
        runs["fsdp2"] / "final" / "model.safetensors").keys()
    assert cli_main(["export", str(runs["fsdp2"]), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert cli_main(["export", str(runs["fsdp2"]), "--out", str(out), "--overwrite"]) == 0
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary folders are gone


def test_export_names_a_corrupt_or_missing_checkpoint(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["fsdp2"], run)
    shutil.rmtree(run / "final")
    shard = run / "checkpoints" / "iteration-000002" / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # a torn write
    assert cli_main(["export", str(shard.parent.parent), "--out", str(tmp_path / "a")]) == 2
    assert "dcp/__1_0.distcp missing or changed" in capsys.readouterr().err
    # the run dir falls back to the checkpoint before it
    assert cli_main(["export", str(run), "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr()
    assert "iteration-000002" in printed.err and "trying the one before it" in printed.err
    assert f"exported {run / 'checkpoints' / 'iteration-000001'}" in printed.out
    assert cli_main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")]) == 2
    assert "no run or checkpoint at" in capsys.readouterr().err


def test_a_sharded_checkpoint_is_not_loaded_into_an_unsharded_model(runs):
    from transformers import AutoModelForCausalLM

    from drosim.llm.components.checkpoint import load_checkpoint

    model = AutoModelForCausalLM.from_pretrained(runs["fsdp2"] / "final")
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"written by a sharded run .* `drosim-llm export`"):
        load_checkpoint(runs["fsdp2"] / "checkpoints" / "iteration-000002", model=model,
                        optimizer=optimizer, scheduler=None)


def test_fsdp2_outside_torchrun_is_a_clear_error(base, tmp_path, monkeypatch, capsys):
    for variable in ("MASTER_ADDR", "WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    out = tmp_path / "run"
    assert cli_main([*RUN, "sharding=fsdp2", f"model={base}", f"out_dir={out}"]) == 2
    assert "launch with torchrun" in capsys.readouterr().err
    assert not out.exists(), "refused before anything is written"


def test_fsdp2_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="sharding must be one of none, fsdp2"):
        load_config(bundled_config_path("smoke"), ["sharding=ddp"])
    with pytest.raises(ValueError, match="sharding=fsdp2 cannot run wdpo with w_gradient=exact"):
        load_config(bundled_config_path("smoke"),
                    ["sharding=fsdp2", "method=wdpo", "w_gradient=exact"])


# 8 iterations, a checkpoint every 3: a kill lands between checkpoints
LONG_RUN = ("sharding=fsdp2", "method=chi2-rebel", "chi2_rho=0.1", "iterations=8",
            "checkpoint_every=3", "eval_every=5")


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp-long") / "uninterrupted"
    subprocess.run(torchrun(out, base, *LONG_RUN), env=ENV, check=True, capture_output=True,
                   timeout=300)
    return out


def start_and_wait_for(out: Path, base: Path, iteration: int) -> subprocess.Popen:
    """The long sharded run, started in its own session, once it has logged ``iteration``."""
    job = subprocess.Popen(torchrun(out, base, *LONG_RUN), env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not any(r["iteration"] >= iteration for r in train_records(out)):
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    return job


def resume_and_compare(out: Path, base: Path, reference: Path) -> None:
    """Resume ``out`` to the end: its weights and metrics are those of ``reference``."""
    subprocess.run([*torchrun(out, base, *LONG_RUN), "--resume"], env=ENV, check=True,
                   capture_output=True, timeout=300)
    ours = load_file(out / "final" / "model.safetensors")
    theirs = load_file(reference / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    timed = ("seconds", "_per_s")  # wall-clock timings differ from run to run
    strip = [{k: v for k, v in r.items() if not k.endswith(timed)} for r in train_records(out)]
    assert strip == [{k: v for k, v in r.items() if not k.endswith(timed)}
                     for r in train_records(reference)]


@pytest.mark.slow
def test_a_sharded_run_killed_and_resumed_is_bitwise_exact(base, uninterrupted, tmp_path):
    """SIGKILL to every process of the job between two checkpoints, then --resume."""
    out = tmp_path / "killed"
    job = start_and_wait_for(out, base, 4)
    os.killpg(job.pid, signal.SIGKILL)  # torchrun and both ranks, as a lost node
    job.wait()
    assert [p.name for p in (out / "checkpoints").glob("iteration-*")] == ["iteration-000003"]
    assert not (out / "final").exists()
    resume_and_compare(out, base, uninterrupted)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_one_iteration(base, uninterrupted,
                                                                  tmp_path):
    """torchrun passes SIGTERM on to the ranks, which agree on the iteration to stop after
    (their checkpoint is a collective), save it and exit; --resume then ends exactly."""
    out = tmp_path / "terminated"
    job = start_and_wait_for(out, base, 1)
    job.send_signal(signal.SIGTERM)
    job.wait(timeout=120)
    stopped = [line for line in job.stderr.read().splitlines() if "stopped by signal" in line]
    assert len(stopped) == 2 and len(set(stopped)) == 1  # both ranks, the same iteration
    iteration = train_records(out)[-1]["iteration"]
    assert f"after iteration {iteration};" in stopped[0]
    assert (out / "checkpoints" / f"iteration-{iteration:06d}").is_dir()
    resume_and_compare(out, base, uninterrupted)


def train_records(out: Path) -> list[dict]:
    if not (out / "metrics.jsonl").exists():
        return []
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]
