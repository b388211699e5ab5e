"""Accuracy of the Wasserstein penalty's finite-difference gradient with bf16 PARAMETERS.

    OMP_NUM_THREADS=1 python bench/w_gradient_dtype.py  # -> results/w_gradient_dtype_cpu.md

``update_step``'s default ``w_gradient=finite-difference`` (see
``drosim.llm.components.update.finite_difference_backward``) against the exact double
backward computed in float64 on the same weights. The weights are rounded to bf16 once, at
the start, so every variant (float32, bfloat16 or float64 copies of them) holds exactly the
same numbers and the reference is exact for all. Variants (``dtype`` = the parameters'
dtype, ``autocast`` = the forward's):

- ``fd float32``: the finite difference with float32 parameters (``dtype: float32``);
- ``fd float32 + bf16 autocast``: the same under bf16 autocast (``bf16: true``);
- ``fd bf16 params, float32 compute``: what keeping the difference in float32 would give at
  best: a float32 working copy of the bf16 weights, the gradient rounded to bf16 at the end;
- ``fd bf16 params``: what ``dtype: bfloat16`` runs (bf16 throughout);
- ``fd bf16 params, bf16-eps kappa``: the same with the previous kappa rule (eps = bf16's
  own epsilon: a perturbation 16x larger than ``difference_eps`` gives), for comparison;
- ``fd bf16 params + bf16 autocast``: ``dtype: bfloat16`` and ``bf16: true``;
- ``exact bf16 params``: the exact double backward in bf16, its own rounding error (the floor);
- ``exact float32 + bf16 autocast``: the same floor for the autocast variants.

Columns: ``grad_err`` = ||g - g64|| / ||g64|| of the flattened parameter gradient;
``adam_err`` = the same for AdamW's first step direction g / (|g| + 1e-8) (computed in
float64 from each gradient: the step the optimiser takes); the median over ``--seeds``
batches (and, for the gradient, the largest). ``penalty`` = ||g64 - g64(rho = 0)|| / ||g64||:
how much of the gradient is the penalty's; an error of that size is as bad as dropping it.
Models: ``tiny`` = the test stand-in's shape (2 layers x 32 dims, 2 heads, vocabulary 100),
``small`` = 4 layers x 256 dims x 4 heads, vocabulary 4096; both with weight matrices of
std 1.2 / sqrt(width) (HF's 0.02 makes every token nearly equiprobable).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pandas as pd
import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_sections.common import BOS, EOS, PAD, synthetic_batch

from drosim.llm.components import update
from drosim.llm.components.batch import PairBatch
from drosim.llm.components.methods import make_method

ETA, BETA = 1.0, 0.5
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Variant:
    """How one gradient is computed: the parameters' dtype, the forward's autocast dtype
    (None: none), the gradient's method, an optional working dtype (the parameters are
    copied to it for the computation, the gradient rounded back to ``dtype``) and whether
    kappa takes the previous rule's eps."""

    label: str
    dtype: torch.dtype
    autocast: torch.dtype | None
    w_gradient: str
    compute: torch.dtype | None = None
    previous_rule: bool = False


def previous_eps(parameter_dtype: torch.dtype, compute_dtype: torch.dtype | None = None
                 ) -> float:
    """The kappa rule's eps before bf16 parameters were measured: the geometric mean of the
    compute dtype's and the parameters' epsilons (bf16 parameters: bf16's own)."""
    return math.sqrt(torch.finfo(compute_dtype or parameter_dtype).eps
                     * torch.finfo(parameter_dtype).eps)


BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64
VARIANTS = (
    Variant("fd float32", F32, None, "finite-difference"),
    Variant("fd float32 + bf16 autocast", F32, BF16, "finite-difference"),
    Variant("exact float32 + bf16 autocast", F32, BF16, "exact"),
    Variant("fd bf16 params, float32 compute", BF16, None, "finite-difference", F32),
    Variant("fd bf16 params", BF16, None, "finite-difference"),
    Variant("fd bf16 params, bf16-eps kappa", BF16, None, "finite-difference",
            previous_rule=True),
    Variant("fd bf16 params + bf16 autocast", BF16, BF16, "finite-difference"),
    Variant("exact bf16 params", BF16, None, "exact"),
)
SHAPES = {"tiny": dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100, seq_len=16),
          "small": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=4096, seq_len=32)}


def build_model(shape: str, seed: int) -> GPT2LMHeadModel:
    """A random GPT-2 of ``shape`` in float64 whose weights are bf16 numbers (dropout off)."""
    size = dict(SHAPES[shape])
    size.pop("seq_len")
    torch.manual_seed(seed)
    config = GPT2Config(**size, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 1.2 / config.n_embd ** 0.5, generator=generator)
            param.copy_(param.to(BF16))
    return model.to(F64)


def gradient(reference: GPT2LMHeadModel, batch: PairBatch, w_rho: float, variant: Variant
             ) -> Tensor:
    """The flattened parameter gradient that ``update_step`` computes under ``variant``, in
    float64 (after its rounding to the variant's parameter dtype)."""
    model = GPT2LMHeadModel(reference.config).eval()
    model.load_state_dict(reference.state_dict())
    model.to(variant.compute or variant.dtype)
    # lr 0: update_step leaves the gradient in .grad and the weights as they were.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    rule = (mock.patch.object(update, "difference_eps", previous_eps)
            if variant.previous_rule else contextlib.nullcontext())
    with rule:
        update.update_step(model, optimizer, batch, make_method("w-rebel", w_rho=w_rho),
                           eta=ETA, beta=BETA, max_grad_norm=None,
                           autocast_dtype=variant.autocast, w_gradient=variant.w_gradient)
    return torch.cat([p.grad.to(variant.dtype).to(F64).reshape(-1)
                      for p in model.parameters()])


def relative(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def adam_direction(grad: Tensor) -> Tensor:
    """AdamW's first update direction (bias-corrected moments of one gradient)."""
    return grad / (grad.abs() + 1e-8)


def measure(shape: str, w_rho: float, seeds: int, pairs: int) -> list[dict[str, object]]:
    """One row per variant: its errors against the float64 exact gradient."""
    errors: dict[str, list[tuple[float, float]]] = {v.label: [] for v in VARIANTS}
    penalty = []
    for seed in range(seeds):
        model = build_model(shape, seed)
        batch = synthetic_batch(model, pairs, SHAPES[shape]["seq_len"], seed + 100)
        exact = Variant("exact float64", F64, None, "exact")
        truth = gradient(model, batch, w_rho, exact)
        penalty.append(relative(gradient(model, batch, 0.0, exact), truth))
        for variant in VARIANTS:
            grad = gradient(model, batch, w_rho, variant)
            errors[variant.label].append((relative(grad, truth),
                                          relative(adam_direction(grad), adam_direction(truth))))
    rows = []
    for label, pairs_ in errors.items():
        grad_errors = [g for g, _ in pairs_]
        rows.append({"model": shape, "w_rho": w_rho, "variant": label,
                     "grad_err": statistics.median(grad_errors),
                     "grad_err_max": max(grad_errors),
                     "adam_err": statistics.median(a for _, a in pairs_),
                     "penalty": statistics.median(penalty)})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--w-rho", nargs="+", type=float, default=[0.05, 0.5])
    parser.add_argument("--seeds", type=int, default=3, help="batches (and weights) per cell")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "w_gradient_dtype_cpu.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    rows = [row for shape in args.models for w_rho in args.w_rho
            for row in measure(shape, w_rho, args.seeds, args.pairs)]
    table = pd.DataFrame(rows)
    command = "OMP_NUM_THREADS=1 python bench/w_gradient_dtype.py" + (
        " " + " ".join(argv) if argv else "")
    text = (f"# Finite-difference W gradient: accuracy by parameter dtype (cpu)\n\n"
            f"`{command}`\n\n- torch {torch.__version__}, {args.seeds} seeds per cell, "
            f"{args.pairs} pairs, w-rebel (eta {ETA}, w_p 2); reference: the exact double "
            "backward in float64 on the same (bf16-representable) weights\n"
            "- columns: see the docstring of bench/w_gradient_dtype.py\n\n"
            + table.to_markdown(index=False, floatfmt=".3g") + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
