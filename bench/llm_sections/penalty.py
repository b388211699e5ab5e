"""Section 2 of the LLM benchmark: the Wasserstein penalty and its backward, batched
(drosim) against the authors' per-sample loop (see ``bench/bench_llm.py``)."""

from __future__ import annotations

import time
from typing import NamedTuple

import pandas as pd
import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GPT2LMHeadModel

from drosim.dro import wasserstein_penalty
from drosim.llm.components.batch import PairBatch
from drosim.llm.components.methods import Method, make_method
from drosim.llm.components.objective import input_grad_sq_norms
from drosim.llm.components.update import pair_logprobs

from .common import (
    BETA,
    ETA,
    RADII,
    Settings,
    autocast,
    max_rel_err,
    synthetic_batch,
)
from .timing import median_time, synchronize


def penalty_forward(model: GPT2LMHeadModel, batch: PairBatch, method: Method
                    ) -> tuple[Tensor, Tensor]:
    """The input embeddings z and the ``(n,)`` losses computed from them, as W-REBEL does
    (the math attention kernel: the fused ones have no double backward)."""
    embeddings = model.get_input_embeddings()(batch.flat("input_ids"))
    with sdpa_kernel(SDPBackend.MATH):
        logprobs = pair_logprobs(model, batch, embeddings=embeddings)
    return embeddings, method.losses(logprobs, batch, eta=ETA, beta=BETA)


def penalty_of(sq_norms: Tensor, method: Method) -> Tensor:
    """The Wasserstein penalty of the per-sample squared input-gradient norms."""
    assert method.needs_input_gradients
    return wasserstein_penalty(sq_norms, method.spec.rho, method.spec.p)


class PenaltyRun(NamedTuple):
    """One penalty computed and back-propagated: its value, the per-sample squared norms
    (only the first ``len(sq_norms)`` samples for a truncated loop), and the seconds."""

    penalty: Tensor
    sq_norms: Tensor
    forward_s: float
    total_s: float


def batched_penalty(model: GPT2LMHeadModel, batch: PairBatch, method: Method,
                    settings: Settings) -> PenaltyRun:
    """drosim's way: every ||grad_{z_i} l_i||^2 from ONE autograd.grad of sum_i l_i."""
    model.zero_grad(set_to_none=True)
    synchronize(settings.device)
    start = time.perf_counter()
    with autocast(settings):
        embeddings, losses = penalty_forward(model, batch, method)
        sq_norms = input_grad_sq_norms(losses, embeddings)
        penalty = penalty_of(sq_norms, method)
    penalty.backward()
    synchronize(settings.device)
    return PenaltyRun(penalty.detach(), sq_norms.detach(), float("nan"),
                      time.perf_counter() - start)


def _cuda_memory_short(device: str) -> bool:
    """Over 40% of the GPU's memory in use: one more retained per-sample graph, and the
    double backward through all of them, might not fit."""
    if torch.device(device).type != "cuda":
        return False
    return torch.cuda.memory_allocated(device) > 0.4 * torch.cuda.get_device_properties(
        device).total_memory


def loop_penalty(model: GPT2LMHeadModel, batch: PairBatch, method: Method, settings: Settings,
                 samples: int) -> PenaltyRun:
    """The authors' way (their public code): one autograd.grad(l_i, z, create_graph=True) per
    sample, here for the first ``samples`` samples only (all of them for the real loop)."""
    model.zero_grad(set_to_none=True)
    synchronize(settings.device)
    start = time.perf_counter()
    with autocast(settings):
        embeddings, losses = penalty_forward(model, batch, method)
        synchronize(settings.device)
        forward_end = time.perf_counter()
        sq_norms = []
        for i in range(samples):
            (grad,) = torch.autograd.grad(losses[i], embeddings, create_graph=True,
                                          retain_graph=True)
            sq_norms.append(grad.square().sum())
            if i + 1 < samples and _cuda_memory_short(settings.device):
                break
        stacked = torch.stack(sq_norms)
        penalty = penalty_of(stacked, method)
    penalty.backward()
    synchronize(settings.device)
    return PenaltyRun(penalty.detach(), stacked.detach(), forward_end - start,
                      time.perf_counter() - start)


def gradients(model: GPT2LMHeadModel) -> Tensor:
    """Every parameter's gradient, flattened into one vector (0 where there is none)."""
    return torch.cat([torch.zeros(p.numel(), device=p.device) if p.grad is None
                      else p.grad.detach().float().flatten() for p in model.parameters()])


def check_penalties(batched: PenaltyRun, loop: PenaltyRun, batched_grads: Tensor | None,
                    loop_grads: Tensor | None, tolerance: float) -> float:
    """Assert the loop reproduces the batched result; return the largest relative error
    (of the per-sample norms, the penalty and the parameter gradient, each relative to its
    largest entry)."""
    k = len(loop.sq_norms)
    errors = [max_rel_err(loop.sq_norms, batched.sq_norms[:k])]
    if batched_grads is not None and loop_grads is not None:  # the full loop
        errors += [max_rel_err(loop.penalty, batched.penalty),
                   max_rel_err(loop_grads, batched_grads)]
    worst = max(errors)
    assert worst <= tolerance, (
        f"loop and batched penalties differ: relative error {worst:.3g} > {tolerance}")
    return worst


def penalty_row(model: GPT2LMHeadModel, pairs: int, settings: Settings, full_loop: bool
                ) -> dict[str, object]:
    """Batched vs loop W penalty (forward + penalty + backward to the parameters)."""
    batch = synthetic_batch(model, pairs, settings.seq_len, settings.seed + pairs)
    method = make_method("w-rebel", **RADII)
    last: list[PenaltyRun] = []
    batched_s = median_time(lambda: last.append(batched_penalty(model, batch, method, settings)),
                            settings.device, settings.repeats, budget_s=settings.loop_budget_s)
    batched = last[-1]
    batched_grads = gradients(model)
    affordable = int(settings.loop_budget_s // batched_s)  # a loop sample costs about as much
    samples = pairs if full_loop or affordable >= pairs else max(1, affordable)
    try:
        loop = loop_penalty(model, batch, method, settings, samples)
    except torch.cuda.OutOfMemoryError:  # too many retained per-sample graphs: time one
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        if samples == 1:
            raise
        loop = loop_penalty(model, batch, method, settings, 1)
    done = len(loop.sq_norms)
    full = done == pairs
    error = check_penalties(batched, loop, batched_grads if full else None,
                            gradients(model) if full else None, settings.tolerance)
    loop_s = loop.forward_s + pairs / done * (loop.total_s - loop.forward_s)
    return {"pairs": pairs, "tokens": int(batch.attention_mask.sum()), "batched_s": batched_s,
            "loop_s": loop_s, "loop/batched": loop_s / batched_s,
            "loop_timing": "timed" if full else f"{done} of {pairs} samples, extrapolated",
            "penalty": float(batched.penalty),
            "checked": "penalty, norms, grads" if full else f"norms of {done} samples",
            "max_rel_err": error}


def time_penalties(model: GPT2LMHeadModel, settings: Settings) -> pd.DataFrame:
    """One row per size of ``--penalty-pairs`` (the first with the full loop)."""
    rows = []
    for i, pairs in enumerate(settings.penalty_pairs):
        try:
            rows.append(penalty_row(model, pairs, settings, full_loop=i == 0))
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            rows.append({"pairs": pairs, "loop_timing": "out of GPU memory"})
    model.zero_grad(set_to_none=True)
    return pd.DataFrame(rows)
