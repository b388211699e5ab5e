"""The clocks of the LLM benchmark (CUDA work included) and the runner of
``update_step`` that every step-timing and memory section uses."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from transformers import GPT2LMHeadModel

from drosim.llm.components.batch import PairBatch
from drosim.llm.components.methods import Method
from drosim.llm.components.update import update_step

from .common import BETA, ETA, LR, MAX_GRAD_NORM, Settings


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds of one call of ``fn`` (CUDA work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], device: torch.device | str, repeats: int,
                budget_s: float = float("inf")) -> float:
    """Median of ``repeats`` timings, fewer (at least one) once ``budget_s`` is spent."""
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        times.append(timed(fn, device))
    return statistics.median(times)

class StepRunner:
    """``update_step`` of any method on one model, every step from the same parameters."""

    def __init__(self, model: GPT2LMHeadModel, settings: Settings) -> None:
        """An AdamW optimiser on ``model`` and a snapshot of its parameters."""
        self.model = model
        self.settings = settings
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        self.snapshot = [p.detach().clone() for p in model.parameters()]

    def restore(self) -> None:
        """Parameters back to the snapshot, gradients freed (untimed)."""
        with torch.no_grad():
            for p, saved in zip(self.model.parameters(), self.snapshot, strict=True):
                p.copy_(saved)
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, method: Method, batch: PairBatch) -> None:
        """One ``update_step`` of ``method`` on ``batch`` (ETA, BETA, MAX_GRAD_NORM)."""
        update_step(self.model, self.optimizer, batch, method, eta=ETA, beta=BETA,
                    max_grad_norm=MAX_GRAD_NORM, autocast_dtype=self.settings.autocast_dtype,
                    packing=self.settings.packing)
