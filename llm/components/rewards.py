"""Multi-objective reward models: (prompts, responses) -> an ``(batch, objectives)`` tensor.

Training uses a mixture alpha_0 of named objectives, r = sum_j alpha_j r_j; evaluation scores
the same responses under a grid of mixtures, including ones never trained on. Three
implementations share the :class:`RewardModel` interface:

- :class:`WordListReward`: rule-based, objective j scores the fraction of a response's words
  that are in word list j (the offline demo's objectives);
- :class:`CallableReward`: any user function returning the score matrix;
- :class:`SequenceClassifierReward`: a ``transformers`` reward model, one objective per chosen
  output head (an emotion classifier's 6 logits, or ArmoRM's 19 ``rewards``, custom code run
  only with ``trust_remote_code``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from drosim.llm.components.batch import nonfinite_rows_error

# Texts per reward forward pass (reward_batch_size): the fastest of 8 to 128, sorted by
# length, for the 4-layer classifier on one CPU thread in bench/results/reward_batch_cpu.md
# (bench/reward_batch.py; 3x the former 64's rate). Not measured on CUDA.
DEFAULT_BATCH_SIZE = 8


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


def refuse_untrusted_code(key: str, source: str | Path, *, trust_remote_code: bool) -> None:
    """Refuse a local model or tokenizer folder that ships custom code unless it is trusted.

    ``config.json`` and ``tokenizer_config.json`` are read as JSON, so nothing of the folder's
    code is imported. Without this check ``transformers`` would load a model folder such as
    ArmoRM's (``model_type`` ``llama``) as its built-in class, with freshly initialised
    heads and only a load report.

    Args:
        key: the config key naming ``source``, for the message.
        source: a local folder or a hub name (a hub name is not read: no files here; its
            missing weights are refused by :class:`SequenceClassifierReward`).
        trust_remote_code: whether running the folder's code is allowed.

    Raises:
        ValueError: if either file has an ``auto_map`` and ``trust_remote_code`` is false
            (the message names ``trust_remote_code=true``), or is not a JSON object.
    """
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(source).expanduser() / name
        if not path.is_file():
            continue
        try:
            auto_map = json.loads(path.read_text()).get("auto_map")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{key}={str(source)!r}: {path} is not a JSON object ({err})"
                             ) from None
        if auto_map:
            raise ValueError(f"{key}={str(source)!r} ships custom code ({path} auto_map: "
                             f"{auto_map}): read it, then pass trust_remote_code=true to run "
                             "it")


def _truncated(names: Sequence[str], limit: int = 5) -> str:
    """At most ``limit`` names, then how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class SequenceClassifierReward:
    """A ``transformers`` reward model whose output heads are the objectives.

    Each (prompt, response) is scored, with the reward model's own tokenizer, as the
    conversation ``[user: prompt, assistant: response]`` through the tokenizer's chat template
    when it has one, else as the text ``prompt + separator + response``. The scores are the
    columns ``heads`` of the output attribute ``output``: ``logits`` for a plain sequence
    classifier (one objective per label), ``rewards`` for ArmoRM's 19 objectives. Loads from a
    local directory or a hub name; a local folder with custom code is refused unless
    ``trust_remote_code``, and a model with newly initialised (missing) weights always is.

    Args:
        model_name_or_path: path or hub name of an ``AutoModelForSequenceClassification``.
        device: where to run it.
        batch_size: texts per forward pass (``reward_batch_size``), >= 1. Each batch is
            padded to its longest text, so the texts are batched in order of length
            (``sort_by_length``) and the scores returned in the callers' order.
        max_length: the most tokens scored per text, capped at the model's own limit
            (:func:`input_limit`); ``None``: that limit. A longer conversation loses its first
            tokens (the response, at the end, is kept) and is counted in ``truncated``.
        separator: joins prompt and response when the tokenizer has no chat template.
        trust_remote_code: run the model's custom code (its ``config.json`` ``auto_map``).
        output: the output attribute holding the ``(batch, heads)`` (or ``(batch,)``) scores.
        heads: objective name -> head index or ``id2label`` name, in order; ``None``: every
            label of the config's ``id2label``, named by it.
        dtype: the weights' dtype; ``None``: bfloat16 on CUDA, else float32.
        sort_by_length: batch the texts longest first, so that each batch carries little
            padding (the scores are the same to float rounding); false: in the given order.

    Raises:
        ValueError: a ``batch_size`` below 1, custom code without ``trust_remote_code``,
            missing weights, a head label not in ``id2label``, or (on a probe forward) an
            ``output`` the model's output lacks or a head index beyond its columns.
    """

    def __init__(self, model_name_or_path: str | Path, *, device: str | torch.device = "cpu",
                 batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = 1024,
                 separator: str = " ", trust_remote_code: bool = False,
                 output: str = "logits", heads: Mapping[str, int | str] | None = None,
                 dtype: torch.dtype | None = None, sort_by_length: bool = True):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"reward_batch_size must be >= 1, got {batch_size!r}")
        refuse_untrusted_code("reward", model_name_or_path, trust_remote_code=trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path,
                                                       trust_remote_code=trust_remote_code)
        device = torch.device(device)
        if dtype is None:  # bf16 halves a GPU's memory and time; CPUs gain little from it
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path, trust_remote_code=trust_remote_code, output_loading_info=True,
            dtype=dtype)
        if info["missing_keys"]:  # random heads would make random rewards, silently
            missing = sorted(info["missing_keys"])
            raise ValueError(f"reward={str(model_name_or_path)!r}: {len(missing)} weights are "
                             f"missing from the checkpoint and would be random "
                             f"({_truncated(missing)}); is it a reward model for this class? "
                             "(custom code needs trust_remote_code=true)")
        self.model = model.to(device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.objectives, self.columns = self._resolve_heads(heads)
        self.device, self.batch_size, self.sort_by_length = device, batch_size, sort_by_length
        self.separator, self.output = separator, output
        # A reward_max_length above the model's positions would index past its position
        # table (an IndexError deep in the forward): the model's limit wins.
        limits = [n for n in (max_length, input_limit(self.model.config, self.tokenizer))
                  if n is not None]
        self.max_length: int | None = min(limits, default=None)
        self.limited_by_model = self.max_length is not None and self.max_length != max_length
        self.truncated = 0  # texts cut to max_length so far
        # a wrong output or head fails now
        self._forward(self._token_rows(self.format(["Hi"], ["Hello"])))
        self.truncated = 0

    def _resolve_heads(self, heads: Mapping[str, int | str] | None
                       ) -> tuple[tuple[str, ...], list[int]]:
        """The objective names and the output columns they read."""
        labels = {int(i): name for i, name in self.model.config.id2label.items()}
        if heads is None:
            columns = list(range(self.model.config.num_labels))
            return tuple(labels[i] for i in columns), columns
        index_of = {name: i for i, name in labels.items()}
        columns = []
        for name, head in heads.items():
            if isinstance(head, str) and head not in index_of:
                raise ValueError(f"reward_heads[{name!r}] = {head!r} is not a label of the "
                                 f"reward model; its id2label names {list(index_of)}")
            columns.append(index_of[head] if isinstance(head, str) else head)
        return tuple(heads), columns

    def format(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        """The texts the model scores: chat-formatted conversations, or joined strings."""
        pairs = zip(prompts, responses, strict=True)
        if not self.tokenizer.chat_template:
            return [p + self.separator + r for p, r in pairs]
        return [self.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
            tokenize=False) for p, r in pairs]

    def _token_rows(self, texts: list[str]) -> list[list[int]]:
        """The token ids of formatted texts, each cut to its last ``max_length`` (counted in
        ``truncated``)."""
        # a chat template writes its own special tokens (BOS): not twice
        rows = self.tokenizer(texts, add_special_tokens=not self.tokenizer.chat_template,
                              truncation=False)["input_ids"]
        if self.max_length is not None:
            self.truncated += sum(len(row) > self.max_length for row in rows)
            rows = [row[-self.max_length:] for row in rows]
        return rows

    @torch.no_grad()
    def _forward(self, rows: list[list[int]]) -> Tensor:
        """``(len(rows), objectives)`` scores of one batch of token rows, padded together."""
        # On the right, whatever the tokenizer's side: left padding would shift a shorter
        # text's positions (a score depending on its batch), and ArmoRM reads the token
        # before the first pad.
        encoded = self.tokenizer.pad({"input_ids": rows}, padding_side="right",
                                     return_tensors="pt").to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            output = self.model(**encoded)
        scores = getattr(output, self.output, None)
        if not isinstance(scores, Tensor):
            present = list(output.keys()) if hasattr(output, "keys") else dir(output)
            raise ValueError(f"reward_output={self.output!r}: the reward model's output has no "
                             f"such tensor; it has {present}")
        scores = scores.float().reshape(len(rows), -1)  # ArmoRM's score is (batch, 1)
        too_far = [c for c in self.columns if not 0 <= c < scores.shape[1]]
        if too_far:
            raise ValueError(f"reward_heads: head {too_far[0]} is out of range; the output "
                             f"{self.output!r} has {scores.shape[1]} heads (0 to "
                             f"{scores.shape[1] - 1})")
        return scores[:, self.columns].cpu()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        texts = self.format(prompts, responses)
        before = self.truncated
        rows = self._token_rows(texts)
        order = torch.arange(len(rows))
        if self.sort_by_length:  # longest first: the batch needing most memory runs first
            order = torch.argsort(torch.tensor([len(row) for row in rows]), descending=True,
                                  stable=True)
        scores = torch.empty(len(rows), len(self.objectives))
        for batch in order.split(self.batch_size):
            scores[batch] = self._forward([rows[i] for i in batch.tolist()])
        if self.truncated > before:
            limit = (f"the reward model's {self.max_length} positions" if self.limited_by_model
                     else f"reward_max_length = {self.max_length} tokens")
            print(f"drosim-llm: warning: {self.truncated - before} of {len(texts)} texts were "
                  f"longer than {limit} and lost their first tokens", file=sys.stderr)
        return scores


def input_limit(config: Any, tokenizer: Any) -> int | None:
    """The most tokens a model reads: the smallest of its config's ``max_position_embeddings``
    and ``n_positions`` and its tokenizer's ``model_max_length`` that are set (a tokenizer
    without one reports a huge placeholder, which never wins against a config's).

    Args:
        config: the model's ``PretrainedConfig``.
        tokenizer: its tokenizer.

    Returns:
        The limit, or ``None`` when none of them is set.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> input_limit(NS(max_position_embeddings=512), NS(model_max_length=10**30))
        512
    """
    values = (getattr(config, "max_position_embeddings", None),
              getattr(config, "n_positions", None), getattr(tokenizer, "model_max_length", None))
    return min((v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0),
               default=None)


class NormalizedReward:
    """A reward model whose objective j reads ``(r_j - shift_j) / scale_j``.

    A fixed affine map, so the same response always gets the same reward (no running
    statistics to checkpoint) and the order within each objective is kept (scale > 0).
    Objectives not named keep their raw scores.

    Args:
        reward_model: the model to wrap.
        normalization: objective -> ``(shift, scale)``.

    Raises:
        ValueError: an objective the model does not have, or a scale that is not > 0.

    Example:
        >>> raw = CallableReward(lambda p, r: [[2.0, 5.0]] * len(p), ("a", "b"))
        >>> NormalizedReward(raw, {"b": (4.0, 2.0)})(["x"], ["y"])
        tensor([[2.0000, 0.5000]])
    """

    def __init__(self, reward_model: RewardModel,
                 normalization: Mapping[str, Sequence[float]]):
        unknown = sorted(set(normalization) - set(reward_model.objectives))
        if unknown:
            raise ValueError(f"reward_normalization names {unknown}, which the reward model "
                             f"does not score; its objectives are {list(reward_model.objectives)}")
        shift = torch.zeros(len(reward_model.objectives))
        scale = torch.ones(len(reward_model.objectives))
        for j, name in enumerate(reward_model.objectives):
            if name in normalization:
                shift[j], scale[j] = normalization[name]
        if not bool((scale > 0).all()):
            raise ValueError(f"reward_normalization scales must be > 0, got {normalization}")
        self.reward_model, self.shift, self.scale = reward_model, shift, scale
        self.objectives = reward_model.objectives

    @property
    def truncated(self) -> int:
        """The wrapped model's count of cut inputs (0 for one that never cuts)."""
        return getattr(self.reward_model, "truncated", 0)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        return (self.reward_model(prompts, responses).float() - self.shift) / self.scale
