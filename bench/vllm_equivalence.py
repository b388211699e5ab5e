"""Does the vLLM rollout engine sample what the HF engine samples, with weights synced every
iteration?

    python bench/vllm_equivalence.py [--out bench/results/vllm_equivalence_cuda.md]

Needs a CUDA GPU and vLLM (``pip install 'drosim[vllm]'``); without either it says which is
missing and exits with status 77 (skipped). Nothing is downloaded: a random Llama policy
(2 layers x 256 dims, head size 64, untied head, weights of std 0.1) and the offline demo's
word-level tokenizer are written to a temporary folder, which vLLM loads. Then, for each of
``--iterations`` iterations, the policy's weights move (every weight matrix by Gaussian
noise of half its spread, and the LM head scaled by 1, 2, 3, ...: sharper and sharper
distributions), both engines are synced to it (``sync_weights``: vLLM reloads the state
dict, as the trainer does every iteration) and both sample two responses to each of
``--prompts`` demo prompts in bf16 at the same settings. Every sample is scored by the
policy itself in float32 (``sequence_logprobs``); per engine, the mean response
log-probability and the mean response length are compared by a two-sample z statistic. An
engine that kept the previous iteration's weights would sample from a visibly different
distribution. Ids that are multiples of 16 end a response (``stop_token_ids``), so lengths
vary and are compared too. Exit status 1 if some |z| exceeds ``--max-z``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drosim.llm.components.demo_world import demo_corpus, demo_prompts, train_demo_tokenizer
from drosim.llm.components.logprobs import sequence_logprobs
from drosim.llm.components.rollout import SampledPairs
from drosim.llm.components.rollout_engines import (
    VLLM_INSTALL,
    HFGenerateEngine,
    SamplingSettings,
    VLLMEngine,
    vllm_available,
)

SKIPPED = 77  # the automake convention for a test that cannot run here
RESULTS = Path(__file__).resolve().parent / "results"


def missing_requirements() -> list[str]:
    """What this machine lacks for the comparison (empty: it can run)."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("CUDA (no GPU visible to torch)")
    if not vllm_available():
        missing.append(f"vllm ({VLLM_INSTALL})")
    return missing


def build_policy(folder: Path, seed: int):
    """Write a random Llama policy and the demo tokenizer to ``folder``; return the policy
    (float32, on CUDA, eval mode) and the tokenizer."""
    tokenizer = train_demo_tokenizer(demo_corpus(500))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         initializer_range=0.1,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    policy = LlamaForCausalLM(config)
    policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return policy.cuda().eval(), tokenizer


@torch.no_grad()
def move_weights(policy: LlamaForCausalLM, head: torch.Tensor, iteration: int,
                 generator: torch.Generator) -> None:
    """The iteration's weights: every matrix plus noise of half its spread, the LM head
    ``head * (iteration + 1)`` (a distribution that sharpens from one iteration to the
    next)."""
    for param in policy.parameters():
        if param.dim() > 1:
            noise = torch.randn(param.shape, generator=generator).to(param.device)
            param.add_(0.5 * param.std() * noise)
    policy.lm_head.weight.copy_(head * (iteration + 1))


@torch.no_grad()
def response_stats(policy: LlamaForCausalLM, pairs: SampledPairs) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """Per response: its log-probability under ``policy`` (float32) and its length."""
    flat = [t.flatten(0, 1) for t in (pairs.input_ids, pairs.attention_mask,
                                       pairs.response_mask)]
    logprobs = sequence_logprobs(policy, *flat).logprobs.float()
    return logprobs.cpu(), flat[2].sum(-1).float().cpu()


def z_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample z of the difference of means (0 when both are constant and equal)."""
    spread = math.sqrt(float(a.var() / len(a) + b.var() / len(b)))
    difference = float(a.mean() - b.mean())
    return difference / spread if spread > 0 else (0.0 if difference == 0 else math.inf)


def compare(args: argparse.Namespace) -> pd.DataFrame:
    """One row per iteration: both engines' mean log-probability and length, and their z."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        policy, tokenizer = build_policy(folder, args.seed)
        stops = tuple(i for i in range(4, len(tokenizer)) if i % 16 == 0)
        settings = SamplingSettings(temperature=args.temperature, top_p=args.top_p,
                                    max_new_tokens=args.max_new_tokens,
                                    stop_token_ids=stops)
        engines = {"hf": HFGenerateEngine(tokenizer, settings, dtype=torch.bfloat16),
                   "vllm": VLLMEngine(str(folder), tokenizer, settings, device="cuda",
                                      dtype=torch.bfloat16,
                                      gpu_memory_utilization=args.gpu_memory_utilization,
                                      seed=args.seed, max_model_len=256)}
        prompts = demo_prompts(args.prompts, seed=args.seed)
        head = policy.lm_head.weight.detach().clone()
        generator = torch.Generator().manual_seed(args.seed)
        rows = []
        for iteration in range(args.iterations):
            move_weights(policy, head, iteration, generator)
            row: dict[str, object] = {"iteration": iteration, "head_scale": iteration + 1}
            stats = {}
            for name, engine in engines.items():
                engine.sync_weights(policy)
                torch.manual_seed(args.seed + iteration)
                stats[name] = response_stats(policy, engine.sample(prompts))
                row[f"{name}_logprob"] = float(stats[name][0].mean())
                row[f"{name}_length"] = float(stats[name][1].mean())
            row["z_logprob"] = z_statistic(stats["vllm"][0], stats["hf"][0])
            row["z_length"] = z_statistic(stats["vllm"][1], stats["hf"][1])
            rows.append(row)
    return pd.DataFrame(rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=256, help="prompts per iteration")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--max-z", type=float, default=4.0,
                        help="largest |z| accepted as sampling noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "vllm_equivalence_cuda.md")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"vllm_equivalence: skipped, this machine lacks {' and '.join(missing)}",
              file=sys.stderr)
        return SKIPPED
    table = compare(args)
    worst = float(table[["z_logprob", "z_length"]].abs().max().max())
    verdict = "PASS" if worst <= args.max_z else "FAIL"
    text = (f"# vLLM vs HF rollout engine, weights synced every iteration "
            f"({torch.cuda.get_device_name()})\n\n`python bench/vllm_equivalence.py "
            f"{' '.join(argv)}`\n\n- {args.prompts} prompts x 2 responses per engine and "
            f"iteration, bf16, temperature {args.temperature}, top_p {args.top_p}, at most "
            f"{args.max_new_tokens} new tokens; log-probabilities scored by the policy in "
            f"float32\n- {verdict}: largest |z| {worst:.2f} (limit {args.max_z})\n\n"
            + table.to_markdown(index=False, floatfmt=".4g") + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
