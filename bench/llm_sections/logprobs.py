"""Section 3 of the LLM benchmark: response log-probabilities, ``sequence_logprobs``
against the authors' per-row re-tokenising loop (see ``bench/bench_llm.py``)."""

from __future__ import annotations

import random
import statistics
from typing import NamedTuple

import pandas as pd
import torch
from torch import Tensor
from transformers import GPT2LMHeadModel

from drosim.llm.components.demo_world import demo_corpus, demo_prompts
from drosim.llm.components.logprobs import sequence_logprobs

from .common import PAD, Settings, autocast, max_rel_err
from .timing import timed


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
    """drosim's way: ``sequence_logprobs`` on the whole batch."""
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
