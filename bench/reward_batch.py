"""Benchmark: the reward model's batch size (``reward_batch_size``) and length sorting.

    OMP_NUM_THREADS=1 python bench/reward_batch.py   # bench/results/reward_batch_cpu.md
    python bench/reward_batch.py --device cuda       # bench/results/reward_batch_cuda.md
    python bench/reward_batch.py --quick             # the tiny model, 2 repeats (a smoke run)

Scores 128 (prompt, response) texts, as a run's scoring and evaluation do, with
``drosim.llm.components.rewards.SequenceClassifierReward`` at batch sizes 8 to 128, with and
without sorting the texts by length (each batch is padded to its longest text). The texts are
drawn from the offline demo's corpus: prompts of 8 to 160 units (words or characters), and
responses of 16 to 32 units (``max_new_tokens: 32``, some ending early). Two randomly
initialised GPT-2 sequence classifiers with 6 labels (the emotion reward's shape):

- ``tiny``: the tests' stand-in (``tests/llm_stand_ins.py`` ``tiny_classifier_folder``: 2
  layers x 32 dims, a character tokenizer), at most 256 positions;
- ``small``: 4 layers x 256 dims x 4 heads over the demo's word-level tokenizer.

Every setting is warmed up once, then timed in ``--repeats`` round-robin rounds (each round
starts one setting later, so machine noise hits every setting alike); the table gives the
median and the fastest time of a full scoring of the 128 texts, and the largest difference of
its scores from the unsorted batch-size-1 scores (the reference: no padding at all). The
fastest setting is the one of the smallest minimum (on a shared machine the median carries
the other processes' load).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification
from transformers.utils import logging as hf_logging

from drosim.llm.components.demo_world import demo_corpus, train_demo_tokenizer
from drosim.llm.components.rewards import SequenceClassifierReward

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' stand-ins (llm_stand_ins.py)
RESULTS = ROOT / "bench" / "results"
BATCH_SIZES = (8, 16, 32, 64, 128)
LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]


@dataclass(frozen=True)
class Setting:
    """One timed configuration: a batch size, with or without sorting by length."""

    batch_size: int
    sort_by_length: bool


def tiny_classifier(folder: Path) -> tuple[Path, str]:
    """The tests' stand-in classifier; its tokenizer reads characters."""
    from llm_stand_ins import tiny_classifier_folder

    return tiny_classifier_folder(folder, LABELS), "char"


def small_classifier(folder: Path) -> tuple[Path, str]:
    """A 4-layer, 256-dim GPT-2 classifier over the demo's word-level tokenizer."""
    tokenizer = train_demo_tokenizer(demo_corpus(500))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=4, n_embd=256, n_head=4,
                        n_positions=512, num_labels=len(LABELS),
                        id2label=dict(enumerate(LABELS)),
                        label2id={name: i for i, name in enumerate(LABELS)},
                        pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, "word"


def texts(n: int, unit: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` prompts of 8 to 160 units and responses of 16 to 32, from the demo corpus.

    Args:
        n: how many (prompt, response) pairs.
        unit: "word" or "char", what one unit of length is (the tokenizer's token).
        seed: the lengths' and offsets' seed.

    Returns:
        The prompts and the responses.
    """
    rng = random.Random(seed)
    corpus = " ".join(demo_corpus(2000, seed=seed))
    units = corpus.split() if unit == "word" else list(corpus)
    joiner = " " if unit == "word" else ""

    def piece(length: int) -> str:
        start = rng.randrange(len(units) - length)
        return joiner.join(units[start:start + length])

    prompts = [piece(rng.randint(8, 160)) for _ in range(n)]
    responses = [piece(rng.randint(16, 32)) for _ in range(n)]
    return prompts, responses


def time_settings(folder: Path, prompts: list[str], responses: list[str], repeats: int,
                  device: str) -> dict[Setting, tuple[float, float, float]]:
    """``{setting: (median_s, min_s, max_abs_diff)}`` of scoring all the texts once (the
    scores come back to the CPU: each time includes the device's work)."""
    models = {s: SequenceClassifierReward(folder, batch_size=s.batch_size, device=device,
                                          sort_by_length=s.sort_by_length, max_length=None)
              for s in (Setting(b, sort) for b in BATCH_SIZES for sort in (False, True))}
    reference = SequenceClassifierReward(folder, batch_size=1, sort_by_length=False,
                                         device=device, max_length=None)(prompts, responses)
    differences = {s: float((m(prompts, responses) - reference).abs().max())  # + warm-up
                   for s, m in models.items()}
    times: dict[Setting, list[float]] = {s: [] for s in models}
    settings = list(models)
    for round_ in range(repeats):
        for s in settings[round_ % len(settings):] + settings[:round_ % len(settings)]:
            started = time.perf_counter()
            models[s](prompts, responses)
            times[s].append(time.perf_counter() - started)
    return {s: (statistics.median(t), min(t), differences[s]) for s, t in times.items()}


def table(name: str, results: dict[Setting, tuple[float, float, float]]) -> list[str]:
    """The markdown rows of one model's results, and its fastest setting."""
    best = min(results, key=lambda s: results[s][1])  # the least disturbed by other work
    lines = [f"### {name}", "",
             "| batch size | sorted by length | median s | min s | texts/s | max abs diff |",
             "|---:|:---:|---:|---:|---:|---:|"]
    for s, (median, fastest, diff) in results.items():
        mark = " **(fastest)**" if s == best else ""
        lines.append(f"| {s.batch_size}{mark} | {'yes' if s.sort_by_length else 'no'} | "
                     f"{median:.3f} | {fastest:.3f} | {128 / median:.0f} | {diff:.1e} |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats, tiny model only")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (weights: float32 on "
                        "the CPU, bfloat16 on CUDA, as reward_dtype=auto)")
    parser.add_argument("--out", type=Path, help="default: bench/results/reward_batch_"
                        "<cpu|cuda>.md")
    args = parser.parse_args()
    device = torch.device(args.device).type
    out = args.out or RESULTS / f"reward_batch_{device}.md"
    hf_logging.disable_progress_bar()
    repeats = 2 if args.quick else args.repeats
    builders = {"tiny": tiny_classifier} if args.quick else {"tiny": tiny_classifier,
                                                             "small": small_classifier}
    where = (torch.cuda.get_device_name() if device == "cuda" else
             f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}")
    lines = [f"# Reward scoring: batch size and length sorting ({device.upper()})", "",
             f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python bench/reward_batch.py"
             f" --device {device}{' --quick' if args.quick else ''} --repeats {repeats}`", "",
             f"torch {torch.__version__}, {where}; 128 texts, prompts of 8-160 "
             "units, responses of 16-32 units (words for `small`, characters for `tiny`); "
             f"{repeats} round-robin repeats after a warm-up. max abs diff: against the "
             "unsorted batch-size-1 scores (no padding). Fastest: the smallest min s. Load "
             "average at the start: "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in builders.items():
            folder, unit = build(Path(tmp) / name)
            prompts, responses = texts(128, unit)
            results = time_settings(folder, prompts, responses, repeats, args.device)
            lines += table(name, results)
            print("\n".join(table(name, results)), flush=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
