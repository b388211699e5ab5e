"""Sequence log-probabilities of responses under a causal language model.

A batch holds prompt+response token sequences of one common length T, padded on either side.
Three masks of shape ``(batch, T)`` describe it:

- ``attention_mask``: 1 on real tokens (prompt and response), 0 on padding;
- ``response_mask``: 1 on response tokens only (a subset of the real tokens).

The log-probability of a response y given its prompt x is

    log pi(y | x) = sum_{t : response_mask[t] = 1} log pi(token_t | token_<t),

computed from ONE forward pass over the whole batch. Positions are counted from the first real
token of each row (``position_ids = cumsum(attention_mask) - 1``), so a left-padded row gives
the same numbers as the same row unpadded. A row whose response is empty has log-probability 0
and is flagged in :attr:`SequenceLogProbs.empty`; the authors' public code instead re-tokenises
every prompt in a Python loop to find where its response starts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class SequenceLogProbs(NamedTuple):
    """Per-sequence response log-probabilities.

    Attributes:
        logprobs: ``(batch,)`` sum of the response tokens' log-probabilities (0 when empty).
        num_tokens: ``(batch,)`` number of response tokens.
        empty: ``(batch,)`` bool, True where the response has no token.
    """

    logprobs: Tensor
    num_tokens: Tensor
    empty: Tensor


def check_sequence_batch(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor
                         ) -> None:
    """Validate a padded prompt+response batch.

    Raises:
        ValueError: empty batch, shapes that differ or are not ``(batch, T)``, a response
            token on padding, or a row whose first real token is a response token (a response
            needs at least one token of context before it, e.g. a BOS token).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, T), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"empty batch: input_ids has shape {tuple(input_ids.shape)}")
    for name, mask in (("attention_mask", attention_mask), ("response_mask", response_mask)):
        if mask.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(mask.shape)}, input_ids "
                             f"{tuple(input_ids.shape)}: they must match")
    response = response_mask.bool()
    if bool((response & ~attention_mask.bool()).any()):
        rows = torch.nonzero((response & ~attention_mask.bool()).any(-1)).flatten().tolist()
        raise ValueError(f"response_mask marks padding as response tokens in rows {rows}")
    real = attention_mask.bool()
    first_real = real & (real.long().cumsum(-1) == 1)
    starts_response = (response & first_real).any(-1)
    if bool(starts_response.any()):
        rows = torch.nonzero(starts_response).flatten().tolist()
        raise ValueError(f"rows {rows} start with a response token: a response must follow at "
                         "least one prompt token")


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token (0 on left padding).

    Example:
        >>> import torch
        >>> position_ids_from_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])).tolist()
        [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] without materialising the log-softmax.

    Args:
        logits: ``(..., V)`` unnormalised scores.
        targets: ``(...)`` token ids.

    Returns:
        ``(...)`` log-probabilities, in float32 or wider (bf16 logits are upcast).
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def response_logprobs(logits: Tensor, input_ids: Tensor, response_mask: Tensor
                      ) -> SequenceLogProbs:
    """Sum the response tokens' log-probabilities from a causal LM's logits.

    Args:
        logits: ``(batch, T, V)``; ``logits[:, t]`` predicts ``input_ids[:, t + 1]``.
        input_ids: ``(batch, T)``.
        response_mask: ``(batch, T)``, 1 on response tokens.

    Returns:
        :class:`SequenceLogProbs`.

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> out = response_logprobs(logits, ids, torch.tensor([[0, 1, 1]]))
        >>> round(float(out.logprobs), 4), int(out.num_tokens), bool(out.empty)
        (-2.7726, 2, False)
    """
    per_token = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    logprobs = (per_token * response_mask[:, 1:].to(per_token.dtype)).sum(-1)
    num_tokens = response_mask[:, 1:].long().sum(-1)
    return SequenceLogProbs(logprobs, num_tokens, num_tokens == 0)


def sequence_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                      response_mask: Tensor, *, inputs_embeds: Tensor | None = None
                      ) -> SequenceLogProbs:
    """log pi(y | x) for every row of a padded batch, in one forward pass.

    Args:
        model: a causal LM returning ``.logits`` (e.g. ``transformers.GPT2LMHeadModel``).
        input_ids: ``(batch, T)`` prompt+response tokens, padded left or right.
        attention_mask: ``(batch, T)``, 1 on real tokens.
        response_mask: ``(batch, T)``, 1 on response tokens.
        inputs_embeds: optional ``(batch, T, D)`` input embeddings to feed instead of the ids
            (the Wasserstein penalty differentiates the loss with respect to them).

    Returns:
        :class:`SequenceLogProbs`; ``logprobs`` carries the autograd graph.

    Raises:
        ValueError: see :func:`check_sequence_batch`.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> _ = torch.manual_seed(0)
        >>> config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, bos_token_id=0,
        ...                     eos_token_id=0)
        >>> model = GPT2LMHeadModel(config).eval()
        >>> ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 0]])   # left, right padded
        >>> attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
        >>> resp = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]])
        >>> out = sequence_logprobs(model, ids, attn, resp)
        >>> out.num_tokens.tolist(), bool(torch.allclose(out.logprobs[0], out.logprobs[1]))
        ([2, 2], True)
    """
    check_sequence_batch(input_ids, attention_mask, response_mask)
    inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {
        "input_ids": input_ids}
    logits = model(**inputs, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    return response_logprobs(logits, input_ids, response_mask)
