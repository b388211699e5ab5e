"""Section 4 of the LLM benchmark: the peak extra memory of one ``update_step`` over the
plain method's, on the CPU each method in a fresh ``--memory-worker`` process (see
``bench/bench_llm.py``)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import torch
from peak_memory import peak_extra_bytes  # bench/peak_memory.py

from drosim.llm.components.batch import PairBatch
from drosim.llm.components.methods import Method, make_method

from .common import (
    MMAP_THRESHOLD,
    RADII,
    TIMING_MALLOC,
    WARMUP_PAIRS,
    Settings,
    baseline_of,
    build_model,
    demo_tokenizer,
    synthetic_batch,
    target_of,
    verdict,
)
from .timing import StepRunner

# The script whose hidden --memory-worker mode measures one method in a fresh process.
SCRIPT = Path(__file__).resolve().parents[1] / "bench_llm.py"



def step_memory(runner: StepRunner, method: Method, batch: PairBatch) -> dict[str, object]:
    """Bytes one ``update_step`` needs beyond what is allocated before it (see the module
    docstring); the optimiser state exists already and the gradients are freed."""
    runner.restore()
    gc.collect()
    device = torch.device(runner.settings.device)
    _, before, extra, measure = peak_extra_bytes(lambda: runner.step(method, batch), device)
    return {"before_bytes": before, "extra_bytes": extra, "measure": measure}


def memory_worker(name: str, settings: Settings) -> dict[str, object]:
    """Run in a fresh process: build the model and batch, warm up, measure one step."""
    model = build_model(settings, demo_tokenizer())
    batch = synthetic_batch(model, settings.pairs, settings.seq_len, settings.seed)
    runner = StepRunner(model, settings)
    method = make_method(name, **RADII)
    runner.step(method, batch.select(slice(0, WARMUP_PAIRS)))  # optimiser state, lazy init
    return {"method": name, **step_memory(runner, method, batch)}


def worker_command(name: str, settings: Settings) -> list[str]:
    """The command line of the worker that measures ``name`` at ``settings``' sizes."""
    command = [sys.executable, str(SCRIPT), "--memory-worker", name,
               "--device", settings.device, "--model", settings.model,
               "--pairs", str(settings.pairs), "--seq-len", str(settings.seq_len),
               "--seed", str(settings.seed)]
    if settings.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    return [*command, "--bf16"] if settings.bf16 else command


def run_worker(name: str, settings: Settings, timeout_s: float = 600.0) -> dict[str, object]:
    """Measure ``name`` in a fresh process (glibc's mmap threshold pinned, see the
    docstring of bench/bench_llm.py) and return its result.

    Raises:
        RuntimeError: the worker failed (its stderr in the message).
    """
    env = {**{k: v for k, v in os.environ.items() if k not in TIMING_MALLOC},
           "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run(worker_command(name, settings), capture_output=True, text=True,
                          env=env, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker {name} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(runner: StepRunner, batch: PairBatch, names: Sequence[str]) -> pd.DataFrame:
    """Peak extra memory of one step per method and its ratio over the plain method."""
    settings = runner.settings
    if torch.device(settings.device).type == "cuda":
        results = [{"method": name, **step_memory(runner, make_method(name, **RADII), batch)}
                   for name in names]
    else:
        with ThreadPoolExecutor(max_workers=settings.memory_jobs) as pool:
            results = list(pool.map(lambda name: run_worker(name, settings), names))
    extra = {r["method"]: r["extra_bytes"] for r in results}
    rows = []
    for r in results:
        name = str(r["method"])
        ratio = extra[name] / extra[baseline_of(name)]
        rows.append({"method": name, "over": baseline_of(name),
                     "before_MiB": r["before_bytes"] / 2**20,
                     "extra_MiB": r["extra_bytes"] / 2**20, "ratio": ratio,
                     "target": target_of(name, settings.device, "memory"),
                     "pass": verdict(ratio, target_of(name, settings.device, "memory")),
                     "measure": r["measure"]})
    return pd.DataFrame(rows)
