"""Benchmark: what the robust LLM updates cost over plain REBEL / DPO, measured side by side.

    OMP_NUM_THREADS=1 python bench/bench_llm.py           # CPU, the 4-layer "small" GPT-2
    python bench/bench_llm.py --device cuda [--bf16]      # GPU, GPT-2 small (random init)
    python bench/bench_llm.py --device cuda --bf16 --model llama-1b --pairs 64 --seq-len 512
    python bench/bench_llm.py --quick                     # tiny sizes (the smoke test)

Every number printed is a ratio of two measurements taken in the same run, on the same
randomly initialised ``GPT2LMHeadModel`` (dropout off) and the same synthetic ``PairBatch``:
random token ids, prompts left-padded to a quarter of ``--seq-len`` with varied lengths (one
prompt per pair), responses right-padded with varied lengths, standard normal rewards, the
sampling log-probabilities computed by the model itself (on-policy, as REBEL samples) and
reference log-probabilities = those plus N(0, 1) noise (a policy that has moved away from its
reference), so every loss is realistic and not constant. Models (``--model``): tiny = the
offline demo's 2 layers x 64 dims over the demo tokenizer's vocabulary; small = 4 layers x
256 dims x 4 heads, vocabulary 4096 (the CPU default); gpt2-small = GPT-2 small's
architecture, 12 x 768 x 12 heads, vocabulary 50257 (the CUDA default).

1. Step time. ``drosim.llm.update.update_step`` (forward, backward, clipping, AdamW step) of
   every robust method against its plain counterpart (chi2 / KL / KL-temperature / W-REBEL
   over REBEL; WDPO, KL-DPO, chi2-DPO over DPO). Every method is warmed up once on a 2-pair
   slice (and one full-size step is taken), then timed in ``--repeats`` round-robin rounds
   (each round starts one method later, so machine noise hits every method alike); the
   ratio is of the medians, the verdict against the target is on that ratio. The
   parameters are restored from a snapshot before every step (untimed), so every step sees
   the same model; on the CPU the process runs with glibc's allocator told to keep freed
   memory (``TIMING_MALLOC``), so page faults do not enter the times. Extra columns:
   ``ratio_of_min`` (the ratio of the fastest steps, the least disturbed on a shared
   machine; min_s / max_s show the spread), ``tokens_per_s``
   (CUDA: real prompt + response tokens per second of update_step) and ``aggregate_ms``
   (``robust_objective`` + its backward on the batch's (n,) losses alone: the aggregation's
   fixed cost, which a fast GPU step exposes). Targets: chi2 and KL (ball or temperature)
   at most 1.05x on CPU and 1.03x on CUDA, Wasserstein (finite difference) at most 2.0x.
   CUDA adds ``model_tflops`` and ``mfu`` (6 x parameters x real tokens per second over the
   device's dense bf16 peak) and ``attention_tflops`` (stated apart; see ``flop_rates``).
2. Wasserstein penalty. rho * sqrt(mean_i ||grad_z l_i||^2) and its back-propagation to the
   parameters (forward included) at 8, 32 and 128 pairs: one batched
   ``autograd.grad(sum_i l_i, z, create_graph=True)`` (``drosim.llm.objective``) against the
   authors' loop of one ``autograd.grad(l_i, z, create_graph=True)`` per sample (as their
   public code does it, re-implemented here). Each loop call is a full backward over the
   whole batch and keeps its graph, so the loop's time (and memory) grows linearly in the
   samples it has done: when the full loop would exceed ``--loop-budget`` seconds, only its
   first k samples are run (the smallest size always runs in full) and its time is
   extrapolated as forward + (n / k) * (the rest), which, if anything, favours the loop.
   Before a time is reported the two must agree: the per-sample squared norms always, and at
   full loops also the penalty and every parameter gradient.
3. Log-probabilities. ``drosim.llm.logprobs.sequence_logprobs`` against the authors' layout
   and loop (one forward, log-softmax, then a Python loop that re-tokenises each prompt to
   find where its response starts and sums that response's log-probabilities), both under
   ``torch.no_grad`` and both including the forward, on 2 * ``--pairs`` real sequences:
   prompts from ``demo_prompts``, responses cut from ``demo_corpus``, tokenised by the demo
   tokenizer, right-padded. The two must give equal values. The bare forward is timed too
   (``forward_only_s``), to show what each adds to it.
4. Peak memory of one ``update_step``, beyond what is allocated before it, over the plain
   method's. CUDA: ``max_memory_allocated`` minus ``memory_allocated`` just before the step
   (peak statistics reset), in this process. CPU: peak RSS during the step (VmHWM, reset just
   before it through /proc/self/clear_refs) minus the RSS just before it, each method in a
   FRESH subprocess (``--memory-worker``) that builds the same model and batch, warms the
   optimiser up on a 2-pair slice and frees its gradients first; glibc's dynamic mmap
   threshold is pinned (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the RSS at once
   and the RSS tracks the tensors alive. Targets as for the step time.
5. Generation rate. Response tokens sampled per second by each rollout engine available here
   (``drosim.llm.rollout_engines``), on ``--pairs`` demo prompts, two responses each, up to
   the response positions of ``--seq-len`` new tokens: the HF engine (``generate``, KV
   cache) in float32, plus bf16 autocast on CUDA; on CUDA with vLLM installed, the vLLM
   engine too, built from the same random model saved to a temporary folder. Each engine
   samples once untimed (warm-up), then ``--repeats`` times; the rate is of the median.

``--sections`` runs a subset (e.g. ``--sections steps,memory``), ``--methods`` a subset of
the robust methods (their plain method is always added). Results: one table per section,
printed and written to bench/results/llm_<device>_<model>[_bf16][_quick].{md,csv}.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from peak_memory import peak_extra_bytes  # bench/peak_memory.py, beside this script
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from drosim.dro import wasserstein_penalty
from drosim.llm.batch import PairBatch
from drosim.llm.demo_world import (
    demo_corpus,
    demo_model_config,
    demo_prompts,
    train_demo_tokenizer,
)
from drosim.llm.logprobs import sequence_logprobs
from drosim.llm.methods import Method, make_method
from drosim.llm.objective import input_grad_sq_norms, robust_objective
from drosim.llm.rollout_engines import (
    HFGenerateEngine,
    RolloutEngine,
    SamplingSettings,
    VLLMEngine,
    vllm_available,
)
from drosim.llm.update import pair_logprobs, update_step

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINES = ("rebel", "dpo")
ROBUST = ("chi2-rebel", "kl-rebel", "kltemp-rebel", "w-rebel", "wdpo", "kl-dpo", "chi2-dpo")
# The demo's radii (llm/configs/demo.yaml).
RADII = {"chi2_rho": 0.01, "kl_rho": 0.01, "kl_tau": 0.1, "w_rho": 0.01, "w_p": 2.0}
ETA, BETA, LR, MAX_GRAD_NORM = 0.1, 0.1, 1e-5, 1.0
# At most, over the plain method: chi2 / KL 1.05x on CPU and 1.03x on CUDA (time and
# memory), W 2.0x the time and 1.5x the peak memory.
TARGET_DIVERGENCE = {"cpu": 1.05, "cuda": 1.03}
TARGET_WASSERSTEIN = {"time": 2.0, "memory": 1.5}
# Dense bf16 peak (TFLOP/s, vendor datasheets) of the GPUs the MFU column knows.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
PAD, BOS, EOS, FIRST_WORD = 0, 1, 2, 4  # the demo tokenizer's special ids (unk = 3)
WARMUP_PAIRS = 2
MMAP_THRESHOLD = 65536  # bytes; pinning it disables glibc's growing (RSS-hiding) threshold
# The timed process keeps freed memory instead (no mmap of large blocks, no trimming), so a
# step's time is not its page faults: otherwise the two-pass Wasserstein step, which frees
# and re-allocates its big activations once more, pays for up to 5% more faults.
TIMING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**34)}
SECTIONS = {
    "steps": "1. update_step seconds per method (median over rounds), ratio over the plain "
             "method",
    "penalty": "2. W penalty + its backward to the parameters: batched vs per-sample loop",
    "logprobs": "3. Response log-probs, forward included: sequence_logprobs vs the per-row "
                "re-tokenising loop",
    "memory": "4. Peak extra memory of one update_step, ratio over the plain method",
    "generation": "5. Generation rate of each rollout engine: response tokens per second",
}


@dataclass(frozen=True)
class ModelSize:
    """A GPT-2 or Llama architecture; ``vocab_size`` None takes the demo tokenizer's
    vocabulary."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int | None
    seq_len: int  # default prompt + response tokens (the prompt gets a quarter)
    family: str = "gpt2"
    n_kv_head: int | None = None  # Llama: grouped-query attention
    intermediate: int | None = None  # Llama: the MLP's width


MODELS = {
    "tiny": ModelSize(2, 64, 4, None, 32),  # the offline demo's policy
    "small": ModelSize(4, 256, 4, 4096, 64),  # the CPU default: 16 prompt + 48 response
    "gpt2-small": ModelSize(12, 768, 12, 50257, 128),  # GPT-2 small, for the GPU
    # Llama-3.2-1B's shape (tied embeddings, 1.24B parameters), random init, for the GPU
    "llama-1b": ModelSize(16, 2048, 32, 128256, 512, family="llama", n_kv_head=8,
                          intermediate=8192),
    # the same family at a CPU-sized shape, to test the Llama path (--quick --model llama-tiny)
    "llama-tiny": ModelSize(2, 64, 4, 512, 32, family="llama", n_kv_head=2, intermediate=128),
}


@dataclass(frozen=True)
class Settings:
    device: str
    model: str
    pairs: int
    seq_len: int
    bf16: bool
    repeats: int
    penalty_pairs: tuple[int, ...]
    loop_budget_s: float
    methods: tuple[str, ...]
    sections: tuple[str, ...]
    memory_jobs: int
    seed: int
    quick: bool
    out_dir: Path
    gradient_checkpointing: bool = False
    peak_tflops: float | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.bf16 else None

    @property
    def tolerance(self) -> float:
        """Relative tolerance of the equality checks (bf16 rounds at 2^-8)."""
        return 5e-2 if self.bf16 else 1e-3


def autocast(settings: Settings) -> contextlib.AbstractContextManager:
    if not settings.bf16:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(settings.device).type, dtype=torch.bfloat16)


# ------------------------------------------------------------------------ model and batches


def demo_tokenizer():
    """The offline demo's word-level tokenizer (special ids: pad 0, bos 1, eos 2, unk 3)."""
    return train_demo_tokenizer(demo_corpus(500))


def build_model(settings: Settings, tokenizer) -> GPT2LMHeadModel | LlamaForCausalLM:
    """A randomly initialised model of ``settings.model``'s size, without dropout, built on
    its device (a 1B model initialised on the CPU would take most of a minute)."""
    torch.manual_seed(settings.seed)
    size = MODELS[settings.model]
    if size.family == "llama":
        config = LlamaConfig(vocab_size=size.vocab_size, hidden_size=size.n_embd,
                             num_hidden_layers=size.n_layer, num_attention_heads=size.n_head,
                             num_key_value_heads=size.n_kv_head,
                             intermediate_size=size.intermediate,
                             max_position_embeddings=max(2048, settings.seq_len),
                             rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=BOS,
                             eos_token_id=EOS, pad_token_id=PAD)
        with torch.device(settings.device):
            model = LlamaForCausalLM(config)
    elif size.vocab_size is None:
        config = demo_model_config(tokenizer, n_layer=size.n_layer, n_embd=size.n_embd,
                                   n_head=size.n_head, n_positions=max(64, settings.seq_len))
    else:
        config = GPT2Config(vocab_size=size.vocab_size, n_layer=size.n_layer,
                            n_embd=size.n_embd, n_head=size.n_head,
                            n_positions=max(1024, settings.seq_len), resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=BOS,
                            eos_token_id=EOS, pad_token_id=PAD)
    if size.family == "gpt2":
        model = GPT2LMHeadModel(config).to(settings.device)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def prompt_width_of(seq_len: int) -> int:
    """Prompt positions of a synthetic sequence: a quarter of it."""
    return max(2, seq_len // 4)


def synthetic_batch(model: GPT2LMHeadModel, pairs: int, seq_len: int, seed: int) -> PairBatch:
    """``pairs`` prompts with two responses each, laid out as ``generate`` returns them.

    Prompts (<bos> and random words) are left-padded to seq_len // 4 tokens with lengths
    drawn from [a quarter, all] of that; responses right-padded to the rest, lengths drawn
    likewise per response. Rewards are N(0, 1); the sampling log-probabilities are the
    model's own, the reference's the model's plus N(0, 1) noise.
    """
    gen = torch.Generator().manual_seed(seed)
    prompt_width = prompt_width_of(seq_len)
    response_width = seq_len - prompt_width
    vocab = model.config.vocab_size
    prompt_len = torch.randint(max(2, prompt_width // 4), prompt_width + 1, (pairs, 1, 1),
                               generator=gen)
    response_len = torch.randint(max(1, response_width // 4), response_width + 1, (pairs, 2, 1),
                                 generator=gen)
    position = torch.arange(seq_len)
    prompt_mask = (position < prompt_width) & (position >= prompt_width - prompt_len)
    response_mask = (position >= prompt_width) & (position < prompt_width + response_len)
    attention_mask = (prompt_mask | response_mask).long()
    ids = torch.randint(FIRST_WORD, vocab, (pairs, 2, seq_len), generator=gen)
    ids[:, 1, :prompt_width] = ids[:, 0, :prompt_width]  # one prompt per pair
    ids[position.expand_as(ids) == prompt_width - prompt_len] = BOS
    ids[attention_mask == 0] = PAD
    device = next(model.parameters()).device
    ids, attention_mask = ids.to(device), attention_mask.to(device)
    response_mask = response_mask.long().to(device)
    with torch.no_grad():  # in slices of rows: a 1B model's full-batch logits would not fit
        own = torch.cat([sequence_logprobs(model, *(t.view(-1, seq_len)[rows] for t in (
            ids, attention_mask, response_mask))).logprobs
            for rows in torch.arange(2 * pairs).split(16)]).view(pairs, 2)
    rewards = torch.randn(pairs, 2, generator=gen).to(device)
    reference = own + torch.randn(pairs, 2, generator=gen).to(device)
    return PairBatch(ids, attention_mask, response_mask, own, rewards, reference)


def methods_with_baselines(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` plus the plain method every robust one is compared with, baselines first."""
    wanted = set(names) | {make_method(name).pointwise for name in names}
    return tuple(m for m in (*BASELINES, *ROBUST) if m in wanted)


def baseline_of(name: str) -> str:
    return make_method(name).pointwise


def target_of(name: str, device: str = "cpu", measure: str = "time") -> float | None:
    """The largest allowed ratio over the plain method (None for a plain method)."""
    spec = make_method(name).spec
    if spec is None:
        return None
    if spec.needs_input_gradients:
        return TARGET_WASSERSTEIN[measure]
    return TARGET_DIVERGENCE[torch.device(device).type]


def verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return "-"
    return "PASS" if ratio <= target else "FAIL"


# -------------------------------------------------------------------------------- timing


def synchronize(device: torch.device | str) -> None:
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


# ------------------------------------------------------------------- 1. step time per method


class StepRunner:
    """``update_step`` of any method on one model, every step from the same parameters."""

    def __init__(self, model: GPT2LMHeadModel, settings: Settings) -> None:
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
        update_step(self.model, self.optimizer, batch, method, eta=ETA, beta=BETA,
                    max_grad_norm=MAX_GRAD_NORM, autocast_dtype=self.settings.autocast_dtype)


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

    model_tflops = 6 x parameters x real tokens / seconds (forward 2, backward 4 FLOPs per
    parameter and token; the embedding table counted once, tied or not). Attention's
    score and value products are stated apart: attention_tflops = 6 x layers x width x
    (mean real length) x real tokens / seconds (causal: half of 12 L d T). Gradient
    checkpointing's recomputed forward is not counted (MFU, not hardware utilisation), nor
    are a Wasserstein method's second forward and backward: its MFU is that of the plain
    step's useful work done in its time.
    """
    params = sum(p.numel() for p in model.parameters())
    tokens = float(batch.attention_mask.sum())
    rows = batch.attention_mask.flatten(0, 1)
    mean_length = tokens / rows.shape[0]
    config = model.config
    layers, width = config.num_hidden_layers, config.hidden_size
    rates = {"model_tflops": 6 * params * tokens / seconds / 1e12,
             "attention_tflops": 6 * layers * width * mean_length * tokens / seconds / 1e12}
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


# ----------------------------------------------------------- 2. batched W penalty vs loop


def penalty_forward(model: GPT2LMHeadModel, batch: PairBatch, method: Method
                    ) -> tuple[Tensor, Tensor]:
    """The input embeddings z and the ``(n,)`` losses computed from them, as W-REBEL does
    (the math attention kernel: the fused ones have no double backward)."""
    embeddings = model.get_input_embeddings()(batch.flat("input_ids"))
    with sdpa_kernel(SDPBackend.MATH):
        logprobs = pair_logprobs(model, batch, embeddings=embeddings)
    return embeddings, method.losses(logprobs, batch, eta=ETA, beta=BETA)


def penalty_of(sq_norms: Tensor, method: Method) -> Tensor:
    assert method.spec is not None and method.spec.needs_input_gradients
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


def max_rel_err(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want| (0 when both are 0)."""
    scale = want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)
    return float((got.float() - want.float()).abs().max() / scale.float())


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


# ---------------------------------------------------- 3. batched log-probs vs per-row loop


class TextBatch(NamedTuple):
    """Real sequences "<bos> prompt response <eos>", right-padded to one length."""

    prompts: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor


def text_batch(tokenizer, rows: int, seq_len: int, device: str, seed: int) -> TextBatch:
    """Prompts from ``demo_prompts``; responses cut from ``demo_corpus`` to a random length
    (a quarter to all of what fits in ``seq_len``), then "<eos>"."""
    rng = random.Random(seed)
    prompts = demo_prompts(rows, seed=seed)
    words = " ".join(demo_corpus(8 * rows + 16, seed=seed + 1)).split()
    ids = torch.full((rows, seq_len), PAD, dtype=torch.long)
    response_mask = torch.zeros(rows, seq_len, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt)["input_ids"]
        room = seq_len - len(prompt_ids) - 1
        length = rng.randint(max(1, room // 4), room)
        start = rng.randrange(len(words) - length)
        response = tokenizer(" ".join(words[start:start + length]),
                             add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        end = len(prompt_ids) + len(response)
        ids[i, :end] = torch.tensor(prompt_ids + response)
        response_mask[i, len(prompt_ids):end] = 1
    attention_mask = (ids != PAD).long()
    return TextBatch(prompts, ids.to(device), attention_mask.to(device),
                     response_mask.to(device))


def loop_logprobs(model: GPT2LMHeadModel, tokenizer, batch: TextBatch) -> Tensor:
    """The authors' way (their public code): one forward, then per row re-tokenise the prompt to
    find where the response starts and sum the response tokens' log-probabilities."""
    logprobs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask
                     ).logits.log_softmax(-1)
    sums = []
    for i, prompt in enumerate(batch.prompts):
        start = len(tokenizer(prompt)["input_ids"])
        end = int(batch.attention_mask[i].sum())
        targets = batch.input_ids[i, start:end]
        sums.append(logprobs[i, start - 1:end - 1].gather(-1, targets[:, None]).sum())
    return torch.stack(sums)


def batched_logprobs(model: GPT2LMHeadModel, batch: TextBatch) -> Tensor:
    return sequence_logprobs(model, batch.input_ids, batch.attention_mask,
                             batch.response_mask).logprobs


def time_logprobs(model: GPT2LMHeadModel, tokenizer, settings: Settings) -> pd.DataFrame:
    """Both ways (checked equal first), and the bare forward for scale, in interleaved
    rounds; the medians."""
    batch = text_batch(tokenizer, 2 * settings.pairs, settings.seq_len, settings.device,
                       settings.seed)
    calls = {"sequence_logprobs_s": lambda: batched_logprobs(model, batch),
             "loop_s": lambda: loop_logprobs(model, tokenizer, batch),
             "forward_only_s": lambda: model(input_ids=batch.input_ids,
                                             attention_mask=batch.attention_mask)}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad(), autocast(settings):
        ours, theirs = batched_logprobs(model, batch), loop_logprobs(model, tokenizer, batch)
        error = max_rel_err(theirs, ours)
        assert error <= settings.tolerance, f"log-probs differ: relative error {error:.3g}"
        for _ in range(2 * settings.repeats + 1):  # cheap: no backward
            for name, call in calls.items():
                seconds[name].append(timed(call, settings.device))
    median = {name: statistics.median(times) for name, times in seconds.items()}
    return pd.DataFrame([{"rows": len(batch.prompts), "tokens": int(batch.attention_mask.sum()),
                          **median,
                          "loop/batched": median["loop_s"] / median["sequence_logprobs_s"],
                          "max_rel_err": error}])


# ------------------------------------------------------------------- 4. peak memory per step


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
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", name,
               "--device", settings.device, "--model", settings.model,
               "--pairs", str(settings.pairs), "--seq-len", str(settings.seq_len),
               "--seed", str(settings.seed)]
    if settings.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    return [*command, "--bf16"] if settings.bf16 else command


def run_worker(name: str, settings: Settings, timeout_s: float = 600.0) -> dict[str, object]:
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


# ----------------------------------------------------------- 5. generation rate per engine


def rollout_engines(model: nn.Module, tokenizer, settings: Settings, sampling: SamplingSettings,
                    folder: Path) -> list[tuple[str, RolloutEngine]]:
    """(label, engine) of every engine that runs here, weights synced to ``model``: HF in
    float32, HF under bf16 autocast (CUDA), vLLM in bf16 (CUDA with vLLM installed, loaded
    from ``model`` saved to ``folder``)."""
    engines: list[tuple[str, RolloutEngine]] = [
        ("hf float32", HFGenerateEngine(tokenizer, sampling, dtype=torch.float32))]
    cuda = torch.device(settings.device).type == "cuda"
    if cuda:
        engines.append(("hf bf16 autocast",
                        HFGenerateEngine(tokenizer, sampling, dtype=torch.bfloat16)))
    if cuda and vllm_available():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        engines.append(("vllm bf16", VLLMEngine(str(folder), tokenizer, sampling,
                                                device=settings.device, dtype=torch.bfloat16,
                                                gpu_memory_utilization=0.3,
                                                seed=settings.seed)))
    for _, engine in engines:
        engine.sync_weights(model)
    return engines


def time_generation(model: nn.Module, tokenizer, settings: Settings,
                    folder: Path) -> pd.DataFrame:
    """One row per engine: the median response tokens of a sampling call over its median
    seconds."""
    prompts = demo_prompts(settings.pairs, seed=settings.seed)
    sampling = SamplingSettings(max_new_tokens=settings.seq_len - prompt_width_of(
        settings.seq_len))
    model.eval()  # what the trainer samples in (dropout is off already)
    rows = []
    for label, engine in rollout_engines(model, tokenizer, settings, sampling, folder):
        tokens: list[int] = []
        engine.sample(prompts)  # warm-up: kernels, caches, allocator
        seconds = median_time(lambda engine=engine, tokens=tokens: tokens.append(
            int(engine.sample(prompts).response_mask.sum())), settings.device,
            settings.repeats)
        rows.append({"engine": label, "prompts": len(prompts),
                     "max_new_tokens": sampling.max_new_tokens,
                     "response_tokens": statistics.median(tokens), "seconds": seconds,
                     "tokens_per_s": statistics.median(tokens) / seconds})
    model.train()
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------- report


def to_markdown(df: pd.DataFrame) -> str:
    """A markdown table, "-" where a value does not apply."""
    return df.astype(object).where(df.notna(), None).to_markdown(
        index=False, floatfmt=".4g", missingval="-")


def header(settings: Settings, model: GPT2LMHeadModel, argv: Sequence[str]) -> list[str]:
    size = MODELS[settings.model]
    params = sum(p.numel() for p in model.parameters())
    family = ("GPT-2" if size.family == "gpt2" else
              f"Llama ({size.n_kv_head} KV heads, MLP {size.intermediate})")
    device = (torch.cuda.get_device_name(settings.device)
              if torch.device(settings.device).type == "cuda" else platform.processor()
              or platform.machine())
    return [f"# LLM update benchmark ({settings.device}, model {settings.model})", "",
            f"`{' '.join(['python bench/bench_llm.py', *argv])}`", "",
            f"- model: {family}, {size.n_layer} layers x {size.n_embd} dims x {size.n_head} heads, "
            f"vocab {model.config.vocab_size}, {params / 1e6:.2f}M parameters, random init",
            f"- batch: {settings.pairs} pairs x 2 responses x {settings.seq_len} tokens "
            f"({prompt_width_of(settings.seq_len)} prompt + "
            f"{settings.seq_len - prompt_width_of(settings.seq_len)} response positions), "
            f"bf16 autocast: {settings.bf16}, gradient checkpointing: "
            f"{settings.gradient_checkpointing}, dense bf16 peak for MFU: "
            f"{settings.peak_tflops or 'unknown'} TFLOP/s",
            f"- host: {device}; torch {torch.__version__}, {torch.get_num_threads()} intra-op "
            f"threads; {settings.repeats} rounds; load average at start "
            f"{os.getloadavg()[0]:.2f}"]


def summary(tables: dict[str, pd.DataFrame]) -> list[str]:
    """One line per robust method and target: its ratio and the verdict."""
    lines = []
    for kind, section in (("step time", "steps"), ("peak memory", "memory")):
        table = tables.get(section)
        if table is None:
            continue
        for row in table[table["target"].notna()].to_dict("records"):
            lines.append(f"- {kind}: {row['method']} / {row['over']} = {row['ratio']:.3f}x "
                         f"(target <= {row['target']}x): {row['pass']}")
    return lines


def write_results(settings: Settings, tables: dict[str, pd.DataFrame], text: str) -> Path:
    stem = (f"llm_{torch.device(settings.device).type}_{settings.model}"
            f"{'_bf16' if settings.bf16 else ''}{'_quick' if settings.quick else ''}")
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    (settings.out_dir / f"{stem}.md").write_text(text + "\n")
    combined = pd.concat([df.assign(section=name) for name, df in tables.items()],
                         ignore_index=True)
    combined.to_csv(settings.out_dir / f"{stem}.csv", index=False)
    return settings.out_dir / f"{stem}.md"


# ------------------------------------------------------------------------------------ CLI


def known_peak_tflops() -> float | None:
    """The dense bf16 peak of this CUDA device, if it is one of PEAK_BF16_TFLOPS."""
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def parse_args(argv: Sequence[str]) -> tuple[Settings, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=tuple(MODELS),
                        help="default: small on CPU, gpt2-small on CUDA (tiny with --quick)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per batch (default 32)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="prompt + response tokens (default: the model's)")
    parser.add_argument("--penalty-pairs", default=None,
                        help="comma-separated batch sizes of section 2 (default 8,32,128)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each block's activations in the backward (default on "
                             "for llama-1b)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak for the MFU column (default: known "
                             "for H100 / H200 / A100)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timing rounds (default 5 on CPU, 10 on CUDA)")
    parser.add_argument("--loop-budget", type=float, default=None,
                        help="seconds the per-sample W loop may run per size before it is "
                             "extrapolated (default 20 on CPU, 15 on CUDA)")
    parser.add_argument("--methods", default=",".join(ROBUST),
                        help="comma-separated robust methods (their plain method is added)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {', '.join(SECTIONS)}")
    parser.add_argument("--memory-jobs", type=int, default=2,
                        help="CPU memory workers run at once (each measures its own RSS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--memory-worker", metavar="METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bf16 and args.device != "cuda":
        parser.error("--bf16 is for --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    cuda = args.device == "cuda"
    model = args.model or ("tiny" if args.quick else "gpt2-small" if cuda else "small")
    quick = args.quick
    settings = Settings(
        device=args.device, model=model,
        pairs=args.pairs or (4 if quick else 32),
        seq_len=args.seq_len or (16 if quick else MODELS[model].seq_len),
        bf16=args.bf16,
        repeats=args.repeats or (2 if quick else 10 if cuda else 5),
        penalty_pairs=tuple(int(n) for n in (
            args.penalty_pairs or ("2,4" if quick else "8,32,128")).split(",")),
        loop_budget_s=args.loop_budget if args.loop_budget is not None else (
            5.0 if quick else 15.0 if cuda else 20.0),
        methods=methods_with_baselines([m for m in args.methods.split(",") if m]),
        sections=tuple(name for name in SECTIONS if name in args.sections.split(",")),
        memory_jobs=args.memory_jobs, seed=args.seed, quick=quick, out_dir=args.out_dir,
        gradient_checkpointing=args.gradient_checkpointing or model == "llama-1b",
        peak_tflops=args.peak_tflops or (known_peak_tflops() if cuda else None))
    if settings.seq_len < 8:
        parser.error("--seq-len must be at least 8")
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return settings, args.memory_worker


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings, worker = parse_args(argv)
    if (worker is None and settings.device == "cpu" and __name__ == "__main__"
            and any(os.environ.get(k) != v for k, v in TIMING_MALLOC.items())):
        # glibc reads these once, at start: run again with them set
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, **TIMING_MALLOC})
    hf_logging.set_verbosity_error()
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    if worker is not None:
        print(json.dumps(memory_worker(worker, settings)))
        return 0

    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    tokenizer = demo_tokenizer()
    model = build_model(settings, tokenizer)
    batch = synthetic_batch(model, settings.pairs, settings.seq_len, settings.seed)
    lines = header(settings, model, argv)
    runner = StepRunner(model, settings)
    tables: dict[str, pd.DataFrame] = {}
    for number, section in enumerate(settings.sections, start=1):
        say(f"{number}/{len(settings.sections)} {SECTIONS[section]}")
        if section == "steps":
            tables[section] = time_steps(runner, batch, settings.methods)
        elif section == "penalty":
            tables[section] = time_penalties(model, settings)
        elif section == "logprobs":
            tables[section] = time_logprobs(model, tokenizer, settings)
        elif section == "generation":
            with tempfile.TemporaryDirectory() as folder:
                tables[section] = time_generation(model, tokenizer, settings, Path(folder))
        else:
            tables[section] = measure_memory(runner, batch, settings.methods)
        runner.restore()
    lines += [f"- load average at end {os.getloadavg()[0]:.2f}"]
    for section, table in tables.items():
        lines += ["", f"## {SECTIONS[section]}", "", to_markdown(table)]
    lines += ["", "## Targets", "", *summary(tables)]
    text = "\n".join(lines)
    print(text)
    say(f"written: {write_results(settings, tables, text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
