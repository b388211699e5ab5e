"""Sequence log-probabilities of responses under a causal language model.

A batch holds prompt+response token sequences of one common length T, padded on either side.
Two masks of shape ``(batch, T)`` describe it:

- ``attention_mask``: 1 on real tokens (prompt and response), 0 on padding;
- ``response_mask``: 1 on response tokens only (a subset of the real tokens).

The log-probability of a response y given its prompt x is

    log pi(y | x) = sum_{t : response_mask[t] = 1} log pi(token_t | token_<t),

computed from ONE forward pass over the whole batch, the vocabulary projection and its
log-softmax restricted to the columns that predict a response token. Positions are counted
from the first real token of each row (``position_ids = cumsum(attention_mask) - 1``), so a
left-padded row gives the same numbers as the same row unpadded. A row whose response is
empty has log-probability 0 and is flagged in :attr:`SequenceLogProbs.empty`; the authors'
public code instead re-tokenises every prompt in a Python loop to find where its response
starts.
"""

from __future__ import annotations

import functools
import inspect
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


# A chunk's float32 copy of the logits stays near this size: large enough for fast kernels,
# small enough that the full (rows, vocab) float32 tensor never exists.
CHUNK_BYTES = 32 * 2**20


def default_chunk_rows(vocab_size: int) -> int:
    """Rows of logits whose float32 copy fills :data:`CHUNK_BYTES` (at least one).

    Example:
        >>> default_chunk_rows(50257)
        166
    """
    return max(1, CHUNK_BYTES // (4 * vocab_size))


class ChunkedTokenLogprobs(torch.autograd.Function):
    """``log_softmax(logits)[target]`` computed a chunk of rows at a time, in float32 or wider.

    The plain ``logits.float().log_softmax(-1).gather(...)`` materialises a float32 copy of
    every logit and keeps it (or the log-softmax) for the backward: with a 50k vocabulary
    that is the largest tensor of a step. Here only the logits (in their own dtype, e.g.
    bf16), the targets and one float32 log-sum-exp per row are saved; the backward recomputes
    each chunk's softmax and returns ``g * (onehot(target) - softmax)`` in the logits' dtype.

    The backward is written with differentiable ops, so a double backward (the exact
    Wasserstein gradient, ``create_graph=True``) works too; it then recomputes the
    log-sum-exp inside the graph instead of using the saved constant.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:
        compute = torch.promote_types(logits.dtype, torch.float32)
        flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
        picked = torch.empty(flat.shape[0], dtype=compute, device=logits.device)
        logsumexp = torch.empty_like(picked)
        for rows in _chunks(flat.shape[0], chunk_rows):
            x = flat[rows].to(compute)
            logsumexp[rows] = torch.logsumexp(x, dim=-1)
            picked[rows] = x.gather(-1, flat_targets[rows]).squeeze(-1) - logsumexp[rows]
        ctx.save_for_backward(logits, targets, logsumexp)
        ctx.chunk_rows = chunk_rows
        return picked.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        logits, targets, saved_logsumexp = ctx.saved_tensors
        compute = saved_logsumexp.dtype
        flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
        g = grad_output.reshape(-1, 1).to(compute)
        grad = torch.empty_like(flat)
        for rows in _chunks(flat.shape[0], ctx.chunk_rows):
            x = flat[rows].to(compute)
            # Under create_graph the log-sum-exp's own dependence on the logits matters.
            logsumexp = (torch.logsumexp(x, dim=-1) if torch.is_grad_enabled()
                         else saved_logsumexp[rows])
            chunk = -g[rows] * torch.exp(x - logsumexp.unsqueeze(-1))
            chunk = chunk.scatter_add(-1, flat_targets[rows], g[rows])
            grad[rows] = chunk.to(grad.dtype)
        return grad.view_as(logits), None, None


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def token_logprobs(logits: Tensor, targets: Tensor, *, chunk_rows: int | None = None
                   ) -> Tensor:
    """log softmax(logits)[target] without materialising the log-softmax.

    Args:
        logits: ``(..., V)`` unnormalised scores, any float dtype.
        targets: ``(...)`` token ids in ``[0, V)`` (on positions the caller masks out, any
            valid id: their gradient is multiplied by 0).
        chunk_rows: rows processed at once (default :func:`default_chunk_rows`).

    Returns:
        ``(...)`` log-probabilities, in float32 or wider (bf16 logits are upcast a chunk at
        a time; see :class:`ChunkedTokenLogprobs`).

    Example:
        >>> import torch
        >>> logits = torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=torch.bfloat16)
        >>> out = token_logprobs(logits, torch.tensor([0, 1]))
        >>> out.dtype, [round(v, 4) for v in out.tolist()]
        (torch.float32, [-0.6931, -0.1269])
    """
    rows = chunk_rows if chunk_rows is not None else default_chunk_rows(logits.shape[-1])
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {rows}")
    return ChunkedTokenLogprobs.apply(logits, targets, rows)


def prediction_columns(response_mask: Tensor) -> slice:
    """The span of columns whose logits predict a response token of some row.

    Column c predicts token c + 1, so these are the c with ``response_mask[:, c + 1]`` set
    in some row; the span runs from the first to the last of them (in drosim's layout,
    left-padded prompts and right-padded responses, every column in between is one).
    An empty slice when no row has a response token.

    Example:
        >>> import torch
        >>> prediction_columns(torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]))
        slice(1, 4, None)
    """
    columns = torch.nonzero(response_mask[:, 1:].bool().any(0)).flatten()
    if columns.numel() == 0:
        return slice(0, 0)
    return slice(int(columns[0]), int(columns[-1]) + 1)


def response_logprobs(logits: Tensor, input_ids: Tensor, response_mask: Tensor, *,
                      first_column: int = 0) -> SequenceLogProbs:
    """Sum the response tokens' log-probabilities from a causal LM's logits.

    Args:
        logits: ``(batch, K, V)`` the logits of columns ``first_column`` to
            ``first_column + K - 1``; column t predicts ``input_ids[:, t + 1]``. They must
            cover every column that predicts a response token (the last column of a
            sequence predicts nothing and may be included or not).
        input_ids: ``(batch, T)``.
        response_mask: ``(batch, T)``, 1 on response tokens.
        first_column: the sequence column of ``logits[:, 0]``.

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
    targets = slice(first_column + 1, first_column + 1 + logits.shape[1])
    predicted = input_ids[:, targets]
    per_token = token_logprobs(logits[:, :predicted.shape[1]], predicted)
    logprobs = (per_token * response_mask[:, targets].to(per_token.dtype)).sum(-1)
    num_tokens = response_mask[:, 1:].long().sum(-1)
    return SequenceLogProbs(logprobs, num_tokens, num_tokens == 0)


@functools.cache
def _forward_accepts(model_type: type, name: str) -> bool:
    return name in inspect.signature(model_type.forward).parameters


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do),
    looked up once per model class; a ``torch.compile`` wrapper is seen through."""
    return _forward_accepts(type(getattr(model, "_orig_mod", model)), "logits_to_keep")


def sequence_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                      response_mask: Tensor, *, inputs_embeds: Tensor | None = None
                      ) -> SequenceLogProbs:
    """log pi(y | x) for every row of a padded batch, in one forward pass.

    The LM head runs only on the columns that predict a response token
    (:func:`prediction_columns`, passed as ``logits_to_keep``; a model whose forward lacks
    that parameter computes every column's logits and the others are dropped), and their
    log-softmax is taken a chunk at a time (:func:`token_logprobs`).

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
    columns = prediction_columns(response_mask)
    kwargs = {}
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = torch.arange(columns.start, columns.stop,
                                                device=input_ids.device)
    logits = model(**inputs, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                   **kwargs).logits
    if "logits_to_keep" not in kwargs:
        logits = logits[:, columns]
    return response_logprobs(logits, input_ids, response_mask, first_column=columns.start)
