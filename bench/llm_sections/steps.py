"""Section 1 of the LLM benchmark: ``update_step`` seconds per method over its plain
method's (see ``bench/bench_llm.py``)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from drosim.llm.components.batch import PairBatch
from drosim.llm.components.methods import Method, make_method
from drosim.llm.components.objective import robust_objective
from drosim.llm.components.update import pair_logprobs

from .common import BETA, ETA, RADII, WARMUP_PAIRS, baseline_of, target_of, verdict
from .timing import StepRunner, median_time, timed


def aggregate_ms(logprobs: Tensor, batch: PairBatch, method: Method, device: str
                 ) -> float | None:
    """Milliseconds of the aggregation alone: ``robust_objective`` and its backward on the
    batch's ``(n,)`` losses, held as a leaf (None for Wasserstein, whose cost is the double
    backward through the model, not the aggregation)."""
    if method.spec is not None and method.spec.needs_input_gradients:
        return None
    leaf = method.losses(logprobs, batch, eta=ETA, beta=BETA).detach().requires_grad_()
    return 1e3 * median_time(lambda: robust_objective(leaf, method.spec).loss.backward(),
                             device, repeats=21)


def flop_rates(model: nn.Module, batch: PairBatch, seconds: float, peak_tflops: float | None
               ) -> dict[str, float]:
    """Model FLOP/s of a step and its MFU over the device's dense bf16 peak.

    Only real tokens count (``attention_mask == 1``: prompt and response, never padding),
    so the rates are the same whether the step ran on padded or on packed rows, and
    padding's wasted work lowers the MFU instead of inflating it.
    model_tflops = 6 x parameters x real tokens / seconds (forward 2, backward 4 FLOPs per
    parameter and token; the embedding table counted once, tied or not). Attention's
    score and value products are stated apart: attention_tflops = 6 x layers x width x
    sum over sequences of (real length)^2 / seconds (causal: half of 12 L d T^2 per
    sequence). Gradient checkpointing's recomputed forward is not counted (MFU, not
    hardware utilisation), nor are a Wasserstein method's second forward and backward: its
    MFU is that of the plain step's useful work done in its time.

    Args:
        model: the policy (its parameters and ``config``'s layers and width).
        batch: the step's batch; ``attention_mask`` ``(n, 2, T)``.
        seconds: the step's time, > 0.
        peak_tflops: the device's dense bf16 peak, or None (no ``mfu``).

    Returns:
        ``model_tflops``, ``attention_tflops`` and, with a peak, ``mfu``.
    """
    params = sum(p.numel() for p in model.parameters())
    lengths = batch.attention_mask.flatten(0, 1).sum(-1).double()
    config = model.config
    layers, width = config.num_hidden_layers, config.hidden_size
    rates = {"model_tflops": 6 * params * float(lengths.sum()) / seconds / 1e12,
             "attention_tflops": 6 * layers * width * float(lengths.square().sum())
             / seconds / 1e12}
    if peak_tflops:
        rates["mfu"] = rates["model_tflops"] / peak_tflops
    return rates


def time_steps(runner: StepRunner, batch: PairBatch, names: Sequence[str]) -> pd.DataFrame:
    """Median ``update_step`` seconds per method over interleaved rounds, and the ratios."""
    settings = runner.settings
    cuda = torch.device(settings.device).type == "cuda"
    methods = {name: make_method(name, **RADII) for name in names}
    for method in methods.values():  # warm-up: lazy initialisation, optimiser state
        runner.restore()
        runner.step(method, batch.select(slice(0, WARMUP_PAIRS)))
    runner.restore()  # and one full-size step, so the allocator is warm for the first method
    runner.step(methods[names[0]], batch)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(settings.repeats):
        shift = round_ % len(names)
        for name in (*names[shift:], *names[:shift]):
            runner.restore()
            seconds[name].append(timed(lambda m=methods[name]: runner.step(m, batch),
                                       settings.device))
    tokens = int(batch.attention_mask.sum())
    with torch.no_grad():
        logprobs = pair_logprobs(runner.model, batch)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    rows = []
    for name in names:
        base, target = baseline_of(name), target_of(name, settings.device)
        ratio = median[name] / median[base]
        row = {"method": name, "over": base, "median_s": median[name],
               "min_s": min(seconds[name]), "max_s": max(seconds[name]), "ratio": ratio,
               "target": target, "pass": verdict(ratio, target),
               "ratio_of_min": min(seconds[name]) / min(seconds[base])}
        if cuda:
            row["tokens_per_s"] = tokens / median[name]
            row.update(flop_rates(runner.model, batch, median[name], settings.peak_tflops))
        row["aggregate_ms"] = aggregate_ms(logprobs, batch, methods[name], settings.device)
        rows.append(row)
    return pd.DataFrame(rows)
