"""The REBEL policy term at theta = theta_t: how far from zero it is, by how pi_t is recorded.

    python bench/pi_t_residual.py --device cuda --bf16 [--model gpt2-small]
    python bench/pi_t_residual.py --quick                 # CPU, tiny model (the smoke test)

REBEL regresses (log pi_theta/pi_t(y) - log pi_theta/pi_t(y')) / eta on the reward gap. In
the first minibatch of an iteration theta = theta_t, so the policy term must be 0; any
residual is divided by eta (0.01 in the paper) and becomes a spurious regression target.
Two ways of recording pi_t are compared on the same model and synthetic batch
(``bench_llm.synthetic_batch``):

- ``rollout fp32``: one forward over the whole batch in float32, as a rollout records it
  while the update runs under bf16 autocast in minibatches;
- ``trainer's own forward``: ``drosim.llm.components.update.record_sampling_logprobs``, the update's
  own minibatches, dtype and kernels.

For each, the largest |log pi_theta - log pi_t| over the first minibatch's responses (from a
gradient-enabled forward, as ``update_step`` computes it) and that residual's gap divided by
eta = 0.01.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_llm import MODELS, Settings, build_model, demo_tokenizer, synthetic_batch

from drosim.llm.components.logprobs import sequence_logprobs
from drosim.llm.components.methods import make_method
from drosim.llm.components.update import autocast_context, pair_logprobs, record_sampling_logprobs

ETA = 0.01  # the paper's REBEL step size


def residuals(model, batch, recorded: torch.Tensor, first: torch.Tensor,
              autocast_dtype: torch.dtype | None) -> tuple[float, float]:
    """Largest |log pi_theta - log pi_t| on the first minibatch and largest |gap| / eta."""
    minibatch = batch.select(first)
    with autocast_context(minibatch, autocast_dtype):
        current = pair_logprobs(model, minibatch).detach()
    term = (current - recorded[first]).float()
    gap = term[:, 0] - term[:, 1]
    return float(term.abs().max()), float(gap.abs().max() / ETA)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=tuple(MODELS), default=None)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--minibatch", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    model_name = args.model or ("tiny" if args.quick else "gpt2-small")
    settings = Settings(device=args.device, model=model_name, pairs=args.pairs,
                        seq_len=16 if args.quick else MODELS[model_name].seq_len,
                        bf16=args.bf16, repeats=1, penalty_pairs=(), loop_budget_s=0.0,
                        methods=(), sections=(), memory_jobs=1, seed=0, quick=args.quick,
                        out_dir=Path("."))
    model = build_model(settings, demo_tokenizer())
    batch = synthetic_batch(model, settings.pairs, settings.seq_len, seed=0)
    autocast_dtype = torch.bfloat16 if args.bf16 else None
    order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(0)).to(
        args.device)
    first = order[:args.minibatch]
    print(f"model {model_name} on {args.device}, bf16 autocast {args.bf16}, "
          f"{args.pairs} pairs, minibatch {args.minibatch}, eta {ETA}")
    print("| method | pi_t recorded by | max abs(log pi_theta - log pi_t) | max abs(gap) / eta |")
    print("|---|---|---|---|")
    for name in ("rebel", "w-rebel"):
        method = make_method(name, w_rho=0.01)
        with torch.no_grad():
            rollout = sequence_logprobs(model, batch.flat("input_ids"),
                                        batch.flat("attention_mask"),
                                        batch.flat("response_mask")).logprobs.view(-1, 2)
        own = record_sampling_logprobs(model, batch, order, args.minibatch, method=method,
                                       autocast_dtype=autocast_dtype)
        for label, recorded in (("rollout fp32", rollout), ("trainer's own forward", own)):
            term, scaled = residuals(model, batch, recorded, first, autocast_dtype)
            print(f"| {name} | {label} | {term:.3g} | {scaled:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
