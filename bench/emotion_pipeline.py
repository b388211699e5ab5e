"""The Emotion experiment's pipeline at reduced scale, timed stage by stage, with nothing
downloaded: sft -> train-reward -> train (REBEL and chi2-REBEL) -> report.

The world is built here: a synthetic six-emotion table (sentences from per-emotion word
lists, the "emotion" dataset's text / label format), a word-level tokenizer trained on it,
and a randomly initialised GPT-2 of GPT-2 small's shape (12 layers, width 768; ``--tiny``: 2
layers, width 64, for a CPU smoke run). Each stage runs through the ``drosim-llm`` command
line, as a user runs it, with ``llm/configs/emotion.yaml`` shrunk by overrides. The script
prints one line per stage (seconds), the reward classifier's held-out accuracy, the training
runs' generation rate (response tokens per second of the rollout engine) and the report's
summary, and writes them to ``OUT/emotion_pipeline.json``.

    python bench/emotion_pipeline.py --out bench/results/emotion --device cuda
    python bench/emotion_pipeline.py --out /tmp/emotion --tiny          # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

EMOTION_WORDS = {
    "sadness": "lonely grey tearful lost empty heavy",
    "joy": "happy bright cheerful glad sunny delighted",
    "love": "tender caring devoted warm adoring fond",
    "anger": "furious bitter outraged hostile mad irate",
    "fear": "scared nervous anxious afraid shaky tense",
    "surprise": "amazed stunned shocked astonished startled speechless",
}
SUBJECTS = "i we you they she he".split()
VERBS = "feel felt am was seem became".split()
ENDINGS = "today tonight again now lately at work at home".split(" ")


def emotion_table(rows: int, seed: int = 0) -> dict[str, list]:
    """``rows`` sentences in the emotion dataset's format (``text``, integer ``label``)."""
    rng = random.Random(seed)
    names = list(EMOTION_WORDS)
    texts, labels = [], []
    for _ in range(rows):
        label = rng.randrange(len(names))
        words = EMOTION_WORDS[names[label]].split()
        texts.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(words)} and "
                     f"{rng.choice(words)} {rng.choice(ENDINGS)}")
        labels.append(label)
    return {"text": texts, "label": labels}


def build_world(folder: Path, *, tiny: bool, rows: int) -> tuple[Path, Path]:
    """The emotion table (parquet) and the random base GPT-2 folder."""
    import pandas as pd
    import torch
    from transformers import GPT2LMHeadModel

    from drosim.llm.components.demo_world import demo_model_config, train_demo_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    table = emotion_table(rows)
    data = folder / "emotion.parquet"
    pd.DataFrame(table).to_parquet(data)
    tokenizer = train_demo_tokenizer(table["text"])
    shape = dict(n_layer=2, n_embd=64, n_head=4) if tiny else dict(n_layer=12, n_embd=768,
                                                                    n_head=12)
    torch.manual_seed(0)
    base = folder / "gpt2-base"
    GPT2LMHeadModel(demo_model_config(tokenizer, n_positions=64, **shape)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return data, base


def run_stage(name: str, argv: list[str], seconds: dict[str, float]) -> None:
    """Run one ``drosim-llm`` command; stop the pipeline if it fails."""
    from drosim.llm.cli import main

    start = time.perf_counter()
    code = main(argv)
    seconds[name] = time.perf_counter() - start
    print(f"{name}: exit {code}, {seconds[name]:.1f} s", flush=True)
    if code != 0:
        raise SystemExit(f"stage {name} failed (exit {code})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="a new or empty folder")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: a CPU smoke run")
    parser.add_argument("--iterations", type=int, default=None)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: give a new folder")
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rows, pairs, iterations = (240, 16, 2) if args.tiny else (4000, 128, 10)
    iterations = args.iterations or iterations
    data, base = build_world(out / "world", tiny=args.tiny, rows=rows)
    bf16 = ["--bf16"] if cuda else []
    seconds: dict[str, float] = {}
    sft, rm = out / "models" / "sft", out / "models" / "rm"
    run_stage("sft", ["sft", "--model", str(base), "--data", str(data), "--field", "text",
                      "--out", str(sft), "--epochs", "1", "--lr", "1e-3", "--batch-size",
                      "32", "--max-length", "32", *bf16], seconds)
    run_stage("train_reward", [
        "train-reward", "--model", str(base), "--data", str(data), "--out", str(rm),
        "--epochs", "2", "--lr", "1e-3", "--batch-size", "32", "--max-length", "32",
        "--labels", ",".join(EMOTION_WORDS), *bf16], seconds)
    accuracy = json.loads((rm / "train_metrics.json").read_text()).get("eval_accuracy")
    runs, rates = [], {}
    for method in ("rebel", "chi2-rebel"):
        run = out / "runs" / method
        runs.append(run)
        run_stage(f"train_{method}", [
            "train", "--config", "emotion", f"model={sft}", f"reward={rm}",
            f"prompts={data}", f"eval_prompts={data}", "eval_prompt_split=null",
            f"method={method}", f"out_dir={run}", f"iterations={iterations}",
            f"pairs_per_iteration={pairs}", f"minibatch_size={min(pairs, 32)}",
            "max_prompt_tokens=8", "max_new_tokens=16", f"num_eval_prompts={pairs}",
            f"eval_every={iterations}", f"checkpoint_every={iterations}", "lr=1e-4",
            f"device={'cuda' if cuda else 'cpu'}", f"bf16={str(cuda).lower()}",
            "progress=false"], seconds)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["kind"] == "train"]
        rates[method] = sum(r["generation_tokens_per_s"] for r in train) / len(train)
    run_stage("report", ["report", *map(str, runs), "--out", str(out / "report")], seconds)
    import pandas as pd

    summary = pd.read_csv(out / "report" / "summary.csv")
    result = {"device": "cuda" if cuda else "cpu", "tiny": args.tiny, "seconds": seconds,
              "reward_accuracy": accuracy, "generation_tokens_per_s": rates,
              "summary": summary.to_dict(orient="records")}
    (out / "emotion_pipeline.json").write_text(json.dumps(result, indent=1))
    print(f"reward classifier held-out accuracy: {accuracy}")
    print("generation tokens/s (HF engine, mean over iterations): " +
          ", ".join(f"{m} {r:.0f}" for m, r in rates.items()))
    print(summary[summary.trained_on | summary.mixture.isin(["mean", "worst"])].to_string(
        index=False, float_format="{:.3f}".format))


if __name__ == "__main__":
    main()
