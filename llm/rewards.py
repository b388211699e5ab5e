"""Multi-objective reward models: (prompts, responses) -> an ``(batch, objectives)`` tensor.

Training uses a mixture alpha_0 of named objectives, r = sum_j alpha_j r_j; evaluation scores
the same responses under a grid of mixtures, including ones never trained on. Three
implementations share the :class:`RewardModel` interface:

- :class:`WordListReward`: rule-based, objective j scores the fraction of a response's words
  that are in word list j (the offline demo's objectives);
- :class:`CallableReward`: any user function returning the score matrix;
- :class:`SequenceClassifierReward`: a ``transformers`` sequence classifier, one objective per
  output head (as ArmoRM's 19 objectives or an emotion classifier's 6 classes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from drosim.llm.batch import nonfinite_rows_error


class RewardModel(Protocol):
    """Scores responses under several named objectives."""

    objectives: tuple[str, ...]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        """``(batch, len(objectives))`` float scores of each (prompt, response)."""
        ...


def score(reward_model: RewardModel, prompts: Sequence[str], responses: Sequence[str]
          ) -> Tensor:
    """Call ``reward_model`` and check what it returns.

    Raises:
        ValueError: mismatched or empty batches, a result of the wrong shape, or NaN/inf
            scores (the message names the batch rows).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if len(prompts) == 0:
        raise ValueError("empty batch: nothing to score")
    scores = reward_model(prompts, responses)
    expected = (len(prompts), len(reward_model.objectives))
    if tuple(scores.shape) != expected:
        raise ValueError(f"the reward model returned shape {tuple(scores.shape)}, expected "
                         f"(batch, objectives) = {expected}")
    scores = scores.float()  # before the check: a float64 1e300 overflows to inf here
    error = nonfinite_rows_error("rewards", scores)
    if error is not None:
        raise error
    return scores


def mixture_weights(objectives: Sequence[str], mixture: Mapping[str, float]) -> Tensor:
    """The ``(objectives,)`` weight vector of a named mixture, normalised to sum to 1.

    Raises:
        ValueError: an unknown objective name, a negative or non-finite weight, or weights
            summing to 0.

    Example:
        >>> mixture_weights(("joy", "calm", "anger"), {"joy": 1, "calm": 3})
        tensor([0.2500, 0.7500, 0.0000])
    """
    unknown = set(mixture) - set(objectives)
    if unknown:
        raise ValueError(f"unknown objectives {sorted(unknown)}; the reward model has "
                         f"{list(objectives)}")
    weights = torch.tensor([float(mixture.get(name, 0.0)) for name in objectives])
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not (
            float(weights.sum()) > 0):
        raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {dict(mixture)}")
    return weights / weights.sum()


def mixture_name(mixture: Mapping[str, float]) -> str:
    """A readable label such as ``"0.5 joy + 0.5 calm"``."""
    total = sum(mixture.values())
    return " + ".join(f"{w / total:g} {name}" for name, w in mixture.items() if w > 0)


class WordListReward:
    """Objective j = the fraction of a response's words that belong to word list j.

    Example:
        >>> reward = WordListReward({"joy": {"happy", "glad"}, "calm": {"quiet"}})
        >>> reward(["hi"], ["a happy quiet day"]).tolist()
        [[0.25, 0.25]]
    """

    def __init__(self, word_lists: Mapping[str, Sequence[str] | frozenset[str] | set[str]]):
        if not word_lists:
            raise ValueError("need at least one word list")
        self.objectives = tuple(word_lists)
        self._lists_of: dict[str, list[int]] = {}  # a word may belong to several lists
        for j, name in enumerate(self.objectives):
            for word in set(word_lists[name]):
                self._lists_of.setdefault(word, []).append(j)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        scores = torch.zeros(len(responses), len(self.objectives))
        for row, text in enumerate(responses):  # string matching: no tensor form to batch
            words = text.split()
            for word in words:
                for j in self._lists_of.get(word, ()):
                    scores[row, j] += 1.0 / len(words)
        return scores


class CallableReward:
    """Wrap ``fn(prompts, responses) -> (batch, objectives)`` (tensor or array-like).

    Example:
        >>> reward = CallableReward(lambda p, r: [[len(t)] for t in r], ["length"])
        >>> reward(["q"], ["abc"]).tolist()
        [[3.0]]
    """

    def __init__(self, fn: Callable[[Sequence[str], Sequence[str]], object],
                 objectives: Sequence[str]):
        self.fn = fn
        self.objectives = tuple(objectives)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        return torch.as_tensor(self.fn(prompts, responses), dtype=torch.float32)


class SequenceClassifierReward:
    """A ``transformers`` sequence classifier whose output heads are the objectives.

    Each (prompt, response) is scored as the text ``prompt + separator + response``; the
    objective names are the model's ``id2label``. Loads from a local directory or a hub name.

    Args:
        model_name_or_path: path or hub name of an ``AutoModelForSequenceClassification``.
        device: where to run it.
        batch_size: texts per forward pass.
        max_length: truncation length in tokens.
        separator: joins prompt and response.
    """

    def __init__(self, model_name_or_path: str | Path, *, device: str | torch.device = "cpu",
                 batch_size: int = 64, max_length: int = 512, separator: str = " "):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path).to(device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        labels = self.model.config.id2label
        self.objectives = tuple(labels[i] for i in range(self.model.config.num_labels))
        self.device, self.batch_size = torch.device(device), batch_size
        self.max_length, self.separator = max_length, separator

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        texts = [p + self.separator + r for p, r in zip(prompts, responses, strict=True)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt",
                                     padding=True, truncation=True,
                                     max_length=self.max_length).to(self.device)
            scores.append(self.model(**encoded).logits.float().cpu())
        return torch.cat(scores)
