"""A sharded (FSDP2) checkpoint that cannot be written: every rank stops with one line, the
previous checkpoint stays in force, and no temporary folder is left (a real full disk, on a
small tmpfs the test mounts; skipped where mounting is not permitted)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from drosim.llm.components.checkpoint import (
    CHECKPOINTS_DIR,
    checkpoints_newest_first,
    verify_checkpoint,
)
from drosim.llm.components.demo_world import build_demo_base

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(out: Path, base: Path, *extra: str) -> list[str]:
    """A 2-rank sharded CPU run of the smoke config, a checkpoint after every iteration."""
    # --standalone: a free port of its own, never one that another job still holds
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "drosim.llm.cli", "train", "--config", "smoke", "checkpoint_every=1",
            "sharding=fsdp2", "progress=false", f"model={base}", f"out_dir={out}", *extra]


@pytest.mark.slow
def test_a_full_disk_in_a_sharded_checkpoint_stops_every_rank_in_one_line(tmp_path, small_fs):
    base = build_demo_base(tmp_path / "base", pretrain_steps=20, corpus_size=300)
    out = small_fs / "run"
    first = subprocess.run(torchrun(out, base, "iterations=1"), env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    free = shutil.disk_usage(small_fs).free
    (small_fs / "filler").write_bytes(b"\0" * max(free - 16 * 1024, 0))
    second = subprocess.run([*torchrun(out, base, "iterations=2"), "--resume"], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode != 0
    errors = [line for line in second.stderr.splitlines()
              if line.startswith("drosim-llm: error: ")]
    assert len(errors) == 2, second.stderr[-3000:]  # one line from each rank
    assert all("cannot write the checkpoint of iteration 2" in line and
               "the previous checkpoint (iteration-000001) is kept" in line for line in errors)
    # (torchrun's own launcher prints a traceback of its ChildFailedError; no rank does)
    assert not [line for line in second.stderr.splitlines()
                if line.strip().startswith("File ") and "drosim" in line]
    (newest,) = checkpoints_newest_first(out)
    assert newest.name == "iteration-000001"
    verify_checkpoint(newest)
    assert not [p.name for p in (out / CHECKPOINTS_DIR).iterdir() if p.name.startswith(".tmp")]
