"""The LLM benchmark's report: its header, one markdown table per section, the verdicts
on the targets, and the .md / .csv files in bench/results/."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from transformers import GPT2LMHeadModel

from .common import MODELS, Settings, prompt_width_of


def to_markdown(df: pd.DataFrame) -> str:
    """A markdown table, "-" where a value does not apply."""
    return df.astype(object).where(df.notna(), None).to_markdown(
        index=False, floatfmt=".4g", missingval="-")


def header(settings: Settings, model: GPT2LMHeadModel, argv: Sequence[str]) -> list[str]:
    """The report's title, command line, model, batch and host lines."""
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
            f"{settings.gradient_checkpointing}, packing: {settings.packing}, dense bf16 peak "
            "for MFU: "
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
    """Write ``text`` as llm_<device>_<model>[_bf16][_quick].md and every table, with its
    section, into the .csv beside it; return the .md's path."""
    stem = (f"llm_{torch.device(settings.device).type}_{settings.model}"
            f"{'_bf16' if settings.bf16 else ''}{'_quick' if settings.quick else ''}")
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    (settings.out_dir / f"{stem}.md").write_text(text + "\n")
    combined = pd.concat([df.assign(section=name) for name, df in tables.items()],
                         ignore_index=True)
    combined.to_csv(settings.out_dir / f"{stem}.csv", index=False)
    return settings.out_dir / f"{stem}.md"
