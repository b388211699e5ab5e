"""Sampling response pairs from the current policy pi_t.

Prompts are tokenised once, left-padded, and every prompt is sampled twice in ONE
``generate`` call (``num_return_sequences=2``). The response of a row is everything generated
up to and including its first end token (EOS, or one of the caller's stop ids); what
``generate`` writes after it is padding. :func:`pairs_from_completions` lays out token ids
sampled elsewhere (a vLLM engine) in the same way. The pi_t log-probabilities REBEL needs are
not recorded here: the trainer computes them with the update's own forward
(:func:`drosim.llm.components.update.record_sampling_logprobs`), so that pi_theta and pi_t round
alike, whichever engine sampled.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from drosim.llm.components.data import Prompt, prompt_text


class SampledPairs(NamedTuple):
    """Two sampled responses for each of n prompts.

    Attributes:
        input_ids: ``(n, 2, T)`` prompt (left-padded) + response (right-padded) tokens.
        attention_mask: ``(n, 2, T)``.
        response_mask: ``(n, 2, T)``.
        responses: n lists of the two decoded responses (special tokens removed).
        empty: ``(n, 2)`` bool, True where a response has no token.
        truncated: the number of prompts cut to ``max_prompt_tokens`` tokens.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    responses: list[list[str]]
    empty: Tensor
    truncated: int = 0


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (as TRL does for RL fine-tuning): the log-probs of
    the update must be those of the policy that sampled, not of a random sub-network."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def response_mask_after(prompt_length: int, sequences: Tensor,
                        eos_token_id: int | Sequence[int]) -> Tensor:
    """Mask of the generated tokens up to and including each row's first end token.

    Args:
        prompt_length: the width P of the (left-padded) prompt part.
        sequences: ``(rows, P + G)`` prompts followed by generated tokens.
        eos_token_id: the id that ends a response, or several (EOS and stop ids): a
            response ends at the first of any of them, which is counted in it.

    Returns:
        ``(rows, P + G)`` long mask, 0 over the prompt part.

    Example:
        >>> import torch
        >>> seq = torch.tensor([[7, 4, 2, 0, 0], [7, 4, 4, 4, 2]])   # eos = 2, pad = 0
        >>> response_mask_after(1, seq, eos_token_id=2).tolist()
        [[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
        >>> response_mask_after(1, seq, eos_token_id=[2, 4]).tolist()   # 4: a stop id
        [[0, 1, 0, 0, 0], [0, 1, 0, 0, 0]]
    """
    end_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else
                           list(eos_token_id), device=sequences.device)
    generated = sequences[:, prompt_length:]
    is_end = torch.isin(generated, end_ids).long()
    before_or_at_first_end = (is_end.cumsum(-1) - is_end) == 0
    mask = torch.zeros_like(sequences, dtype=torch.long)
    mask[:, prompt_length:] = before_or_at_first_end.long()
    return mask


def end_token_ids(tokenizer, stop_token_ids: Sequence[int] = ()) -> list[int]:
    """The ids that end a response: the tokenizer's EOS, then the extra stop ids (each once).

    Example:
        >>> from types import SimpleNamespace
        >>> end_token_ids(SimpleNamespace(eos_token_id=2), [7, 2, 9])
        [2, 7, 9]
    """
    return list(dict.fromkeys([tokenizer.eos_token_id, *stop_token_ids]))


def padding_id(tokenizer) -> int:
    """The tokenizer's pad id, or its EOS id when it has none (GPT-2's tokenizer)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token id lists left-padded to a common length, and their attention mask.

    Padding by hand leaves the caller's tokenizer untouched (it may have no pad token).

    Example:
        >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def check_prompt_lengths(prompts: Sequence[str], lengths: Sequence[int], max_new_tokens: int,
                         positions: int | None) -> None:
    """Refuse prompts that leave no room for ``max_new_tokens`` in the model's positions.

    Args:
        prompts: the prompt strings (for the message).
        lengths: their token counts.
        max_new_tokens: the response length cap.
        positions: the model's ``max_position_embeddings`` (None: no limit known).

    Raises:
        ValueError: naming the longest prompt, its length and the limit.
    """
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if positions is not None and lengths[longest] + max_new_tokens > positions:
        raise ValueError(f"a prompt of {lengths[longest]} tokens ({prompts[longest][:60]!r}...) "
                         f"plus max_new_tokens = {max_new_tokens} exceeds the model's "
                         f"{positions} positions: shorten the prompts or max_new_tokens")


def render_prompts(tokenizer, prompts: Sequence[Prompt], *, chat_template: bool | None = False,
                   max_prompt_tokens: int | None = None) -> tuple[list[list[int]], int]:
    """Prompts as the token ids the policy is given, and how many were cut.

    A conversation is rendered with the tokenizer's chat template
    (``add_generation_prompt=True``); a string is too, as one user message, when the template
    is used, else tokenised as is. A rendering longer than ``max_prompt_tokens`` keeps its
    LAST tokens: the question and the assistant header sit at the end of a prompt.

    Args:
        tokenizer: the policy's tokenizer.
        prompts: strings or ``{"role", "content"}`` message lists.
        chat_template: None: use the template when the tokenizer has one; True: require one;
            False: never (conversations then still need one).
        max_prompt_tokens: the token budget of a prompt; None: no cut.

    Returns:
        The token id lists, and the number of prompts truncated.

    Raises:
        ValueError: ``chat_template=True``, or a conversation, with a tokenizer that has no
            chat template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has_template:
        raise ValueError("chat_template=true, but the tokenizer has no chat template: set "
                         "chat_template=null or false, or use a chat tokenizer")
    use_template = has_template if chat_template is None else chat_template
    templated = [use_template or not isinstance(prompt, str) for prompt in prompts]
    if any(templated) and not has_template:
        first = prompts[templated.index(True)]
        raise ValueError(f"a chat prompt ({prompt_text(first)[:60]!r}...) needs a tokenizer "
                         "with a chat template")
    texts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": p}] if isinstance(p, str) else p, tokenize=False,
        add_generation_prompt=True) for p, t in zip(prompts, templated, strict=True) if t]
    plain = [p for p, t in zip(prompts, templated, strict=True) if not t]
    # one tokenizer call per kind; a template writes its own special tokens (BOS), so its
    # renderings are tokenised without adding them again
    rendered = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    as_is = iter(tokenizer(plain)["input_ids"] if plain else [])
    tokens = [list(next(rendered if t else as_is)) for t in templated]
    if max_prompt_tokens is None:
        return tokens, 0
    truncated = sum(len(ids) > max_prompt_tokens for ids in tokens)
    return [ids[-max_prompt_tokens:] for ids in tokens], truncated


def warn_truncated(count: int, total: int, where: str, max_prompt_tokens: int | None) -> None:
    """One stderr line when ``count`` of ``total`` prompts of ``where`` were cut (once per
    iteration or evaluation, not per prompt, so a long dataset does not flood the log)."""
    if count:
        print(f"drosim-llm: warning: {where}: {count} of {total} prompts were longer than "
              f"max_prompt_tokens = {max_prompt_tokens} and lost their first tokens",
              file=sys.stderr)


def check_sampling(prompts: Sequence[Prompt], temperature: float, top_p: float,
                   max_new_tokens: int) -> None:
    """Refuse what no engine can sample: no prompts, or a sampling parameter out of range.

    Raises:
        ValueError: naming the parameters and their values.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts to sample from")
    if not temperature > 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise ValueError(f"need temperature > 0, 0 < top_p <= 1 and max_new_tokens >= 1; got "
                         f"{temperature}, {top_p}, {max_new_tokens}")


def assemble_pairs(tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, sequences: Tensor,
                   end_ids: Sequence[int], truncated: int, lengths: Tensor | None = None
                   ) -> SampledPairs:
    """The :class:`SampledPairs` of n prompts sampled twice each.

    Args:
        tokenizer: decodes the responses (special tokens removed).
        prompt_ids: ``(n, P)`` left-padded prompts.
        prompt_mask: ``(n, P)`` their attention mask.
        sequences: ``(2n, P + G)`` the prompts (each twice, in a row) followed by the
            generated tokens, right-padded.
        end_ids: the ids that end a response (:func:`end_token_ids`).
        truncated: the number of prompts cut to ``max_prompt_tokens``.
        lengths: ``(2n,)`` the tokens each row generated, for an engine whose rows can stop
            short of G without an end token; None: a row runs to its end token or to G (as
            in ``generate``, which pads only after an end token).

    Returns:
        :class:`SampledPairs` with ``(n, 2, P + G)`` tensors.
    """
    n, prompt_length = prompt_ids.shape
    response_mask = response_mask_after(prompt_length, sequences, end_ids)
    if lengths is not None:
        position = torch.arange(sequences.shape[1], device=sequences.device) - prompt_length
        response_mask = response_mask * (position < lengths[:, None])
    attention_mask = torch.cat([prompt_mask.repeat_interleave(2, dim=0),
                                response_mask[:, prompt_length:]], dim=1)
    responses = tokenizer.batch_decode(
        torch.where(response_mask.bool(), sequences, padding_id(tokenizer))[:, prompt_length:],
        skip_special_tokens=True)
    return SampledPairs(sequences.view(n, 2, -1), attention_mask.view(n, 2, -1),
                        response_mask.view(n, 2, -1),
                        [responses[2 * i:2 * i + 2] for i in range(n)],
                        response_mask.sum(-1).view(n, 2) == 0, truncated)


def pairs_from_completions(tokenizer, prompt_tokens: Sequence[Sequence[int]],
                           completions: Sequence[Sequence[int]], *,
                           stop_token_ids: Sequence[int] = (), truncated: int = 0
                           ) -> SampledPairs:
    """Token ids sampled by another engine (vLLM), laid out as :func:`sample_pairs` does.

    The prompts are left-padded and the completions right-padded to the longest one with the
    pad id (what ``generate`` writes after a finished row); each response ends at its first
    EOS or stop id, counted in it (a completion that runs on past it is cut there), or at
    its last token (padding is never response).

    Args:
        tokenizer: the policy's tokenizer (EOS, pad id, decoding).
        prompt_tokens: n prompts' token ids, as :func:`render_prompts` returns them.
        completions: 2n completions' token ids, the two of prompt i at 2i and 2i + 1.
        stop_token_ids: extra ids that end a response, beside EOS.
        truncated: the number of prompts cut to ``max_prompt_tokens``.

    Returns:
        :class:`SampledPairs` with ``(n, 2, P + G)`` tensors, G the longest completion.

    Raises:
        ValueError: not two completions per prompt, or an empty completion.

    Example:
        >>> from types import SimpleNamespace
        >>> tok = SimpleNamespace(eos_token_id=2, pad_token_id=0,
        ...                       batch_decode=lambda rows, **kw: [str(r.tolist()) for r in rows])
        >>> pairs = pairs_from_completions(tok, [[5, 6], [7]], [[9, 2], [9, 9, 9], [2], [8]])
        >>> pairs.input_ids[0].tolist(), pairs.response_mask[1].tolist()
        ([[5, 6, 9, 2, 0], [5, 6, 9, 9, 9]], [[0, 0, 1, 0, 0], [0, 0, 1, 0, 0]])
    """
    if len(completions) != 2 * len(prompt_tokens):
        raise ValueError(f"need two completions per prompt: {len(prompt_tokens)} prompts, "
                         f"{len(completions)} completions")
    if any(len(c) == 0 for c in completions):
        raise ValueError("an empty completion: an engine samples at least one token")
    pad_id = padding_id(tokenizer)
    prompt_ids, prompt_mask = left_pad(prompt_tokens, pad_id)
    width = max(len(c) for c in completions)
    generated = torch.tensor([list(c) + [pad_id] * (width - len(c)) for c in completions])
    sequences = torch.cat([prompt_ids.repeat_interleave(2, dim=0), generated], dim=1)
    return assemble_pairs(tokenizer, prompt_ids, prompt_mask, sequences,
                          end_token_ids(tokenizer, stop_token_ids), truncated,
                          lengths=torch.tensor([len(c) for c in completions]))


@torch.no_grad()
def sample_pairs(policy: nn.Module, tokenizer, prompts: Sequence[Prompt], *,
                 temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 32,
                 chat_template: bool | None = False, max_prompt_tokens: int | None = None,
                 stop_token_ids: Sequence[int] = ()) -> SampledPairs:
    """Sample two responses per prompt from ``policy``.

    Sampling draws from torch's global RNG, so a checkpoint that saves it resumes exactly.

    Args:
        policy: a causal LM with ``generate`` (a ``transformers`` model).
        tokenizer: its tokenizer; needs an EOS token (and uses it as padding if it has none).
        prompts: n prompt strings or message lists.
        temperature: sampling temperature > 0.
        top_p: nucleus mass in (0, 1].
        max_new_tokens: response length cap >= 1.
        chat_template, max_prompt_tokens: as :func:`render_prompts` (the defaults tokenise
            the strings as they are).
        stop_token_ids: extra ids that end a response as EOS does (counted in it; a row
            stops generating there).

    Returns:
        :class:`SampledPairs`; ``truncated`` counts the prompts cut to ``max_prompt_tokens``.

    Raises:
        ValueError: no prompts, a bad sampling parameter, or a prompt too long for the
            model's positions.
    """
    check_sampling(prompts, temperature, top_p, max_new_tokens)
    device = next(policy.parameters()).device
    pad_id = padding_id(tokenizer)
    tokens, truncated = render_prompts(tokenizer, prompts, chat_template=chat_template,
                                       max_prompt_tokens=max_prompt_tokens)
    check_prompt_lengths([prompt_text(p) for p in prompts], [len(t) for t in tokens],
                         max_new_tokens, getattr(policy.config, "max_position_embeddings", None))
    prompt_ids, prompt_mask = left_pad(tokens, pad_id)
    end_ids = end_token_ids(tokenizer, stop_token_ids)
    # a list of end ids stops a row at any of them (the one EOS id alone as before); the KV
    # cache is asked for, as a config saved for training may have turned it off
    sequences = policy.generate(input_ids=prompt_ids.to(device),
                                attention_mask=prompt_mask.to(device), do_sample=True,
                                use_cache=True,
                                temperature=temperature, top_p=top_p, top_k=0,
                                max_new_tokens=max_new_tokens, num_return_sequences=2,
                                pad_token_id=pad_id,
                                eos_token_id=end_ids if len(end_ids) > 1 else end_ids[0])
    return assemble_pairs(tokenizer, prompt_ids.to(device), prompt_mask.to(device), sequences,
                          end_ids, truncated)
