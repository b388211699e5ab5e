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

1. Step time. ``drosim.llm.components.update.update_step`` (forward, backward, clipping, AdamW step)
   of every robust method against its plain counterpart (chi2 / KL / KL-temperature / W-REBEL
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
   ``autograd.grad(sum_i l_i, z, create_graph=True)`` (``drosim.llm.components.objective``) against
   the authors' loop of one ``autograd.grad(l_i, z, create_graph=True)`` per sample (as their
   public code does it, re-implemented here). Each loop call is a full backward over the
   whole batch and keeps its graph, so the loop's time (and memory) grows linearly in the
   samples it has done: when the full loop would exceed ``--loop-budget`` seconds, only its
   first k samples are run (the smallest size always runs in full) and its time is
   extrapolated as forward + (n / k) * (the rest), which, if anything, favours the loop.
   Before a time is reported the two must agree: the per-sample squared norms always, and at
   full loops also the penalty and every parameter gradient.
3. Log-probabilities. ``drosim.llm.components.logprobs.sequence_logprobs`` against the authors'
   layout and loop (one forward, log-softmax, then a Python loop that re-tokenises each prompt to
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
   (``drosim.llm.components.rollout_engines``), on ``--pairs`` demo prompts, two responses each, up
   to the response positions of ``--seq-len`` new tokens: the HF engine (``generate``, KV
   cache) in float32, plus bf16 autocast on CUDA; on CUDA with vLLM installed, the vLLM
   engine too, built from the same random model saved to a temporary folder. Each engine
   samples once untimed (warm-up), then ``--repeats`` times; the rate is of the median.

``--sections`` runs a subset (e.g. ``--sections steps,memory``), ``--methods`` a subset of
the robust methods (their plain method is always added). Results: one table per section,
printed and written to bench/results/llm_<device>_<model>[_bf16][_quick].{md,csv}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# The sections (bench/llm_sections/) and bench/peak_memory.py sit beside this script: its
# folder goes on the path, which neither `python -P` nor an import by file location puts there.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd
import torch
from llm_sections import generation, logprobs, memory, penalty, steps
from llm_sections.common import (
    MODELS,
    PEAK_BF16_TFLOPS,
    ROBUST,
    SECTIONS,
    TIMING_MALLOC,
    Settings,
    build_model,
    demo_tokenizer,
    methods_with_baselines,
    synthetic_batch,
)
from llm_sections.report import header, summary, to_markdown, write_results
from llm_sections.timing import StepRunner
from transformers.utils import logging as hf_logging

from drosim.llm.components.batch import PairBatch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def known_peak_tflops() -> float | None:
    """The dense bf16 peak of this CUDA device, if it is one of PEAK_BF16_TFLOPS."""
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def _parser() -> argparse.ArgumentParser:
    """The benchmark's options (the hidden ``--memory-worker`` included)."""
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
    parser.add_argument("--packing", action="store_true",
                        help="padding-free (packed) update forwards, as the trainer's packing")
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
    return parser


def parse_args(argv: Sequence[str]) -> tuple[Settings, str | None]:
    """The settings of ``argv``, each default filled in for its device, and the method of
    ``--memory-worker`` (None in the main process).

    Raises:
        SystemExit: bad arguments (argparse's usage message, status 2).
    """
    parser = _parser()
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
        packing=args.packing,
        peak_tflops=args.peak_tflops or (known_peak_tflops() if cuda else None))
    if settings.seq_len < 8:
        parser.error("--seq-len must be at least 8")
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return settings, args.memory_worker


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen sections, print the report and write it to ``--out-dir``.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        0 (a failed equality check raises AssertionError).
    """
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
        print(json.dumps(memory.memory_worker(worker, settings)))
        return 0

    say = _stopwatch()
    tokenizer = demo_tokenizer()
    model = build_model(settings, tokenizer)
    batch = synthetic_batch(model, settings.pairs, settings.seq_len, settings.seed)
    lines = header(settings, model, argv)
    tables = run_sections(StepRunner(model, settings), batch, tokenizer, say)
    lines += [f"- load average at end {os.getloadavg()[0]:.2f}"]
    for section, table in tables.items():
        lines += ["", f"## {SECTIONS[section]}", "", to_markdown(table)]
    lines += ["", "## Targets", "", *summary(tables)]
    text = "\n".join(lines)
    print(text)
    say(f"written: {write_results(settings, tables, text)}")
    return 0


def _stopwatch() -> Callable[[str], None]:
    """A function that prints a message on stderr after the seconds since this call."""
    started = time.perf_counter()

    def say(message: str) -> None:
        """Print ``message`` on stderr after the seconds elapsed."""
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    return say


def run_sections(runner: StepRunner, batch: PairBatch, tokenizer,
                 say: Callable[[str], None]) -> dict[str, pd.DataFrame]:
    """The table of every section of ``runner.settings``, in order; the model's parameters
    are restored after each."""
    sections = runner.settings.sections
    tables: dict[str, pd.DataFrame] = {}
    for number, section in enumerate(sections, start=1):
        say(f"{number}/{len(sections)} {SECTIONS[section]}")
        tables[section] = run_section(section, runner, batch, tokenizer)
        runner.restore()
    return tables


def run_section(section: str, runner: StepRunner, batch: PairBatch, tokenizer) -> pd.DataFrame:
    """The table of one section (a key of SECTIONS) on the runner's model."""
    model, settings = runner.model, runner.settings
    if section == "steps":
        return steps.time_steps(runner, batch, settings.methods)
    if section == "penalty":
        return penalty.time_penalties(model, settings)
    if section == "logprobs":
        return logprobs.time_logprobs(model, tokenizer, settings)
    if section == "generation":
        with tempfile.TemporaryDirectory() as folder:
            return generation.time_generation(model, tokenizer, settings, Path(folder))
    return memory.measure_memory(runner, batch, settings.methods)


if __name__ == "__main__":
    raise SystemExit(main())
