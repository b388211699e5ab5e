"""Held-out evaluation under a grid of reward mixtures, trained-on and unseen.

The policy samples two responses for each held-out prompt, through the run's rollout engine
(:func:`engine_scores`: the engine, dtype and sampling settings of training, so that the
initial evaluation and every later one sample alike), or through ``generate`` on a bare
policy (:func:`sample_scores`); their objective scores are taken once, and every mixture
alpha of the grid is scored as the mean of sum_j alpha_j r_j (:func:`mixture_report`). The
report gives each objective's mean, each mixture's mean reward, their mean and their worst
case (the robust metric), and, against the initial policy's scores on the same prompts, each
mixture's win rate. Under ``torchrun`` the prompts are split over the ranks
(:func:`prompt_shard`) and the scores gathered (:func:`gather_scores`). Sampling runs inside
``torch.random.fork_rng`` with a fixed seed (per rank): every evaluation of a run sees the
same sampling noise (lower-variance curves) and leaves the training RNG untouched, which
exact resume relies on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from drosim.llm.components.data import Prompt, prompt_text
from drosim.llm.components.rewards import RewardModel, mixture_name, mixture_weights, score
from drosim.llm.components.rollout import warn_truncated
from drosim.llm.components.rollout_engines import HFGenerateEngine, RolloutEngine, SamplingSettings
from drosim.llm.components.runtime import all_gather_equal, is_distributed


@torch.no_grad()
def engine_scores(engine: RolloutEngine, reward_model: RewardModel, prompts: Sequence[Prompt],
                  *, batch_size: int = 64, seed: int = 0,
                  device: torch.device | str = "cpu") -> Tensor:
    """The objective scores of two responses per prompt, sampled by a rollout engine.

    The engine samples as it does for training (its weights, dtype and sampling settings),
    but from the fixed ``seed``: the global torch RNG (and ``device``'s, on CUDA) is forked,
    seeded, and restored afterwards. The HF engine draws its noise from that RNG; the vLLM
    engine seeds each request from it, so both give the same samples at every evaluation of
    a run and leave the training RNG as it was.

    Args:
        engine: the rollout engine, its weights already synced to the policy to evaluate.
        reward_model: scores (prompt, response) under named objectives.
        prompts: n held-out prompts (strings or message lists; the reward model is given
            :func:`~drosim.llm.components.data.prompt_text` of each, the original text).
        batch_size: prompts per ``engine.sample`` call.
        seed: seed of the sampling noise.
        device: the device the engine samples on (its CUDA RNG is forked too).

    Returns:
        ``(n, 2, objectives)`` float32 scores, on the CPU.

    Raises:
        ValueError: no prompts, or as the engine's ``sample`` or
            :func:`~drosim.llm.components.rewards.score`.

    Example:
        >>> engine = HFGenerateEngine(tok, SamplingSettings(max_new_tokens=8))  # doctest: +SKIP
        >>> engine.sync_weights(policy)                                   # doctest: +SKIP
        >>> engine_scores(engine, reward, ["Tell me a story"]).shape      # doctest: +SKIP
        torch.Size([1, 2, 3])
    """
    if not prompts:
        raise ValueError("evaluation needs at least one prompt")
    device = torch.device(device)
    scores, truncated = [], 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            pairs = engine.sample(chunk)
            truncated += pairs.truncated
            responses = [r for pair in pairs.responses for r in pair]
            texts = [prompt_text(p) for p in chunk for _ in range(2)]
            scores.append(score(reward_model, texts, responses).view(len(chunk), 2, -1))
    warn_truncated(truncated, len(prompts), "evaluation", engine.settings.max_prompt_tokens)
    return torch.cat(scores)


def sample_scores(policy: nn.Module, tokenizer, reward_model: RewardModel,
                  prompts: Sequence[Prompt], *, temperature: float = 1.0, top_p: float = 1.0,
                  max_new_tokens: int = 32, batch_size: int = 64, seed: int = 0,
                  chat_template: bool | None = False, max_prompt_tokens: int | None = None,
                  stop_token_ids: Sequence[int] = (), dtype: torch.dtype = torch.float32
                  ) -> Tensor:
    """:func:`engine_scores` of a :class:`HFGenerateEngine` on ``policy`` (``generate``);
    a training run evaluates with its own engine instead.

    Args:
        policy: causal LM.
        tokenizer: its tokenizer.
        reward_model, prompts, batch_size, seed: as :func:`engine_scores`.
        temperature, top_p, max_new_tokens: sampling parameters.
        chat_template, max_prompt_tokens: as :func:`~drosim.llm.components.rollout.render_prompts`;
            the prompts cut are counted in one warning.
        stop_token_ids: ids that end a response besides EOS, as in training.
        dtype: the sampling precision (bfloat16: under autocast), as ``rollout_dtype``.

    Returns:
        ``(n, 2, objectives)`` float32 scores, on the CPU.

    Raises:
        ValueError: as :func:`engine_scores`.
    """
    settings = SamplingSettings(temperature, top_p, max_new_tokens, chat_template,
                                max_prompt_tokens, tuple(stop_token_ids))
    engine = HFGenerateEngine(tokenizer, settings, dtype=dtype)
    engine.sync_weights(policy)
    return engine_scores(engine, reward_model, prompts, batch_size=batch_size, seed=seed,
                         device=next(policy.parameters()).device)


def win_rate(scores: Tensor, baseline: Tensor) -> Tensor:
    """How often a response beats the baseline's on the same prompt (ties count half).

    Every response of a prompt is compared with every baseline response of that prompt.

    Args:
        scores: ``(n, m)`` rewards of m responses per prompt.
        baseline: ``(n, m')`` rewards of the baseline's responses to the same prompts.

    Returns:
        A scalar in [0, 1].

    Example:
        >>> win_rate(torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 3.0]]))
        tensor(0.3750)
    """
    difference = scores[:, :, None] - baseline[:, None, :]
    return ((difference > 0).float() + 0.5 * (difference == 0).float()).mean()


def mixture_report(scores: Tensor, objectives: Sequence[str],
                   mixtures: Sequence[Mapping[str, float]], *,
                   baseline: Tensor | None = None) -> dict[str, float]:
    """Each objective's and each mixture's mean reward, their mean and worst case, and the
    win rates against a baseline.

    Args:
        scores: ``(n, m, objectives)`` scores of m responses to each of n prompts.
        objectives: the objectives' names, in the scores' order.
        mixtures: named mixtures, e.g. ``[{"joy": 1.0}, {"joy": 0.5, "calm": 0.5}]``.
        baseline: ``(n, m', objectives)`` scores of the initial policy's responses to the
            same prompts, or ``None`` for no win rates.

    Returns:
        ``{"objective/<name>": mean, "reward/<mixture>": mean, ..., "reward/mean",
        "reward/worst"}``, with a baseline also ``"win_rate/<mixture>"``,
        ``"win_rate/mean"`` and ``"win_rate/worst"``.

    Raises:
        ValueError: no mixtures, a mixture naming an unknown objective, or a baseline of
            other prompts or objectives.

    Example:
        >>> scores = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> mixture_report(scores, ["a", "b"], [{"a": 1.0}])["reward/1 a"]
        0.5
    """
    if not mixtures:
        raise ValueError("evaluation needs at least one mixture")
    if baseline is not None and (baseline.shape[0] != scores.shape[0]
                                 or baseline.shape[2:] != scores.shape[2:]):
        raise ValueError(f"the baseline's scores {tuple(baseline.shape)} do not match the "
                         f"evaluation's {tuple(scores.shape)} (other prompts or objectives)")
    report = {f"objective/{name}": float(v)
              for name, v in zip(objectives, scores.mean((0, 1)), strict=True)}
    rewards, wins = {}, {}
    for mixture in mixtures:
        name, alpha = mixture_name(mixture), mixture_weights(objectives, mixture)
        rewards[name] = float((scores @ alpha).mean())
        if baseline is not None:
            wins[name] = float(win_rate(scores @ alpha, baseline @ alpha))
    report.update({f"reward/{name}": value for name, value in rewards.items()})
    report["reward/mean"] = sum(rewards.values()) / len(rewards)
    report["reward/worst"] = min(rewards.values())
    if wins:
        report.update({f"win_rate/{name}": value for name, value in wins.items()})
        report["win_rate/mean"] = sum(wins.values()) / len(wins)
        report["win_rate/worst"] = min(wins.values())
    return report


def evaluate_mixtures(policy: nn.Module, tokenizer, reward_model: RewardModel,
                      prompts: Sequence[Prompt], mixtures: Sequence[Mapping[str, float]], *,
                      baseline: Tensor | None = None, **sampling) -> dict[str, float]:
    """:func:`mixture_report` of :func:`sample_scores` in one process.

    Args:
        policy, tokenizer, reward_model, prompts: as :func:`sample_scores`.
        mixtures, baseline: as :func:`mixture_report`.
        **sampling: the keyword arguments of :func:`sample_scores`.

    Raises:
        ValueError: no prompts or no mixtures, or as :func:`sample_scores`.
    """
    if not mixtures:
        raise ValueError("evaluation needs at least one mixture")
    scores = sample_scores(policy, tokenizer, reward_model, prompts, **sampling)
    return mixture_report(scores, reward_model.objectives, mixtures, baseline=baseline)


def prompt_shard(prompts: Sequence[Prompt], rank: int, world_size: int) -> list[Prompt]:
    """Rank ``rank``'s contiguous share of the prompts, all shares of one length.

    The last shares are padded with repeats of the last prompt, so that every rank runs the
    same number of ``generate`` calls (with a sharded policy each forward is a collective);
    :func:`gather_scores` drops the repeats.

    Example:
        >>> [prompt_shard(["a", "b", "c"], rank, 2) for rank in range(2)]
        [['a', 'b'], ['c', 'c']]
    """
    size = -(-len(prompts) // world_size)
    share = list(prompts[rank * size:(rank + 1) * size])
    return share + [prompts[-1]] * (size - len(share))


def gather_scores(local: Tensor, total: int, device: torch.device | str = "cpu") -> Tensor:
    """Every rank's :func:`prompt_shard` scores, in prompt order, the padding dropped.

    Args:
        local: ``(size, m, objectives)`` scores of this rank's share.
        total: the number of prompts over all ranks.
        device: where the collective runs (a CUDA device under NCCL).

    Returns:
        ``(total, m, objectives)`` scores on the CPU (``local`` itself in one process).
    """
    if not is_distributed():
        return local[:total]
    return torch.cat(all_gather_equal(local.to(device)))[:total].cpu()
