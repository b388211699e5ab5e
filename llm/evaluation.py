"""Held-out evaluation under a grid of reward mixtures, trained-on and unseen.

The policy samples two responses for each held-out prompt; their objective scores are taken
once, and every mixture alpha of the grid is scored as the mean of sum_j alpha_j r_j. The
report gives each mixture's mean reward, their mean and their worst case (the robust metric).
Sampling runs inside ``torch.random.fork_rng`` with a fixed seed: every evaluation of a run
sees the same sampling noise (lower-variance curves) and leaves the training RNG untouched,
which exact resume relies on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from drosim.llm.data import Prompt, prompt_text
from drosim.llm.rewards import RewardModel, mixture_name, mixture_weights, score
from drosim.llm.rollout import sample_pairs, warn_truncated


@torch.no_grad()
def evaluate_mixtures(policy: nn.Module, tokenizer, reward_model: RewardModel,
                      prompts: Sequence[Prompt], mixtures: Sequence[Mapping[str, float]], *,
                      temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 32,
                      batch_size: int = 64, seed: int = 0, chat_template: bool | None = False,
                      max_prompt_tokens: int | None = None) -> dict[str, float]:
    """Mean reward of the policy's samples under each mixture, plus mean and worst case.

    Args:
        policy: causal LM.
        tokenizer: its tokenizer.
        reward_model: scores (prompt, response) under named objectives.
        prompts: held-out prompts (strings or message lists; the reward model is given
            :func:`~drosim.llm.data.prompt_text` of each, the original text).
        mixtures: named mixtures, e.g. ``[{"joy": 1.0}, {"joy": 0.5, "calm": 0.5}]``.
        temperature, top_p, max_new_tokens: sampling parameters.
        batch_size: prompts per ``generate`` call.
        seed: seed of the evaluation's sampling noise.
        chat_template, max_prompt_tokens: as :func:`~drosim.llm.rollout.render_prompts`;
            the prompts cut are counted in one warning.

    Returns:
        ``{"reward/<mixture>": mean, ..., "objective/<name>": mean, "reward/mean": ...,
        "reward/worst": ...}``.

    Raises:
        ValueError: no prompts or no mixtures, or as :func:`score`.
    """
    if not prompts or not mixtures:
        raise ValueError("evaluation needs at least one prompt and one mixture")
    device = next(policy.parameters()).device
    devices = [device] if device.type == "cuda" else []
    scores, truncated = [], 0
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            pairs = sample_pairs(policy, tokenizer, chunk, temperature=temperature,
                                 top_p=top_p, max_new_tokens=max_new_tokens,
                                 chat_template=chat_template,
                                 max_prompt_tokens=max_prompt_tokens)
            truncated += pairs.truncated
            responses = [r for pair in pairs.responses for r in pair]
            texts = [prompt_text(p) for p in chunk for _ in range(2)]
            scores.append(score(reward_model, texts, responses))
    warn_truncated(truncated, len(prompts), "evaluation", max_prompt_tokens)
    objective_means = torch.cat(scores).mean(0)
    report = {f"objective/{name}": float(v)
              for name, v in zip(reward_model.objectives, objective_means, strict=True)}
    mixture_rewards = {f"reward/{mixture_name(m)}":
                       float(mixture_weights(reward_model.objectives, m) @ objective_means)
                       for m in mixtures}
    report.update(mixture_rewards)
    report["reward/mean"] = sum(mixture_rewards.values()) / len(mixture_rewards)
    report["reward/worst"] = min(mixture_rewards.values())
    return report
