"""Section 5 of the LLM benchmark: response tokens per second of each rollout engine
available here (see ``bench/bench_llm.py``)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from drosim.llm.components.demo_world import demo_prompts
from drosim.llm.components.rollout_engines import (
    HFGenerateEngine,
    RolloutEngine,
    SamplingSettings,
    VLLMEngine,
    vllm_available,
)

from .common import Settings, prompt_width_of
from .timing import median_time


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
