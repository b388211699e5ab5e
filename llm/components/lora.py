"""LoRA adapters (through PEFT) for the online trainer: ``lora_rank`` in the config.

    policy = apply_lora(policy, rank=8, alpha=16.0, dropout=0.0, target_modules=None)
    causal_lm(policy)                the transformers model to call (LoRA layers inside)
    reference_model(policy, None)    pi_ref: the same model with its adapter disabled
    merged_copy(policy)              a plain model with the adapter merged, to save

Only the adapter trains; the base weights stay frozen, so the DPO-type methods' reference
(the initial policy) is the policy with its adapter switched off, and a run needs no second
copy of the model. Checkpoints hold the ``PeftModel``'s whole state (base and adapter), so a
resume is exact as without LoRA; ``final/`` and ``drosim-llm export`` write the merged model
as a plain Hugging Face folder.

``peft`` is imported by the functions that build or unwrap an adapter, not by this module:
``import peft`` takes seconds, and a run without LoRA never needs it.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator

from torch import nn

# The adapter saved next to a merged model (final/adapter, an export's adapter/).
ADAPTER_DIR = "adapter"


def apply_lora(policy: nn.Module, *, rank: int, alpha: float, dropout: float,
               target_modules: list[str] | None) -> nn.Module:
    """Wrap a causal LM in a LoRA ``PeftModel``: new adapter weights train, the rest freeze.

    PEFT initialises each adapter's B matrix to zero, so the wrapped model computes exactly
    what ``policy`` computed until its first update.

    Args:
        policy: a ``transformers`` causal LM; its layers are replaced in place.
        rank: the adapters' rank r (>= 1).
        alpha: the scale numerator: an adapter adds (alpha / r) B A x.
        dropout: dropout on the adapters' input (0 for none).
        target_modules: module names or suffixes to adapt (or ``["all-linear"]``); None:
            PEFT's default for the architecture (Llama: q_proj, v_proj; GPT-2: c_attn),
            else every linear layer but the output head.

    Returns:
        The ``peft.PeftModel`` (task ``CAUSAL_LM``) holding ``policy``.

    Raises:
        ValueError: ``target_modules`` that name no module of ``policy`` (or only modules
            LoRA cannot adapt), naming the ``lora_target_modules`` key.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11))
        >>> lora = apply_lora(model, rank=2, alpha=4.0, dropout=0.0, target_modules=None)
        >>> sorted({name.split(".")[-2] for name, p in lora.named_parameters()
        ...         if p.requires_grad})
        ['default']
    """
    from peft import LoraConfig, get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets: list[str] | str | None = target_modules
    if targets is None and policy.config.model_type not in DEFAULTS:
        targets = "all-linear"  # PEFT has no default for this architecture
    elif targets == ["all-linear"]:
        targets = "all-linear"  # PEFT reads the shorthand as a string only
    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=alpha,
                        lora_dropout=dropout, target_modules=targets)
    try:
        return get_peft_model(policy, config)
    except ValueError as error:
        if target_modules is None:
            raise
        raise ValueError(f"lora_target_modules={target_modules}: {error}") from None


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel``.

    Example:
        >>> is_lora(nn.Linear(2, 2))
        False
    """
    peft = sys.modules.get("peft")
    # A PeftModel exists only once peft is imported: no need to import it to say no.
    return peft is not None and isinstance(model, peft.PeftModel)


def causal_lm(policy: nn.Module) -> nn.Module:
    """The module the update and the reference forward call: a LoRA policy's
    ``transformers`` model (its LoRA layers inside, the same parameters), else ``policy``.

    The ``PeftModel`` wrapper computes the same, but its ``forward`` signature hides
    ``logits_to_keep`` (:func:`drosim.llm.components.logprobs.accepts_logits_to_keep`): through it
    every position's logits would be computed, not just the response's.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> causal_lm(layer) is layer
        True
    """
    return policy.get_base_model() if is_lora(policy) else policy


@contextlib.contextmanager
def reference_model(policy: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    """The DPO-type methods' reference pi_ref, for the block's forwards.

    Args:
        policy: the policy being trained.
        reference: its frozen initial copy (full fine-tuning), or None for a LoRA policy.

    Yields:
        ``reference``; or, without one, the LoRA policy's model with its adapter disabled:
        its frozen base weights, the initial policy, bit for bit (LoRA dropout is skipped
        with the adapter).

    Raises:
        ValueError: neither a reference nor a LoRA policy.

    Example:
        >>> frozen = nn.Linear(2, 2)
        >>> with reference_model(nn.Linear(2, 2), frozen) as model:
        ...     model is frozen
        True
    """
    if reference is not None:
        yield reference
    elif is_lora(policy):
        with policy.disable_adapter():
            yield causal_lm(policy)
    else:
        raise ValueError("no reference: a fully fine-tuned policy needs its frozen copy")


def merged_copy(policy: nn.Module) -> nn.Module:
    """A plain ``transformers`` model with the adapter merged into the weights (W + (alpha /
    r) B A), for saving; ``policy`` itself is left as it is (merging it in place and back
    would round its base weights). Costs one more copy of the model while it lives.

    Args:
        policy: a LoRA ``PeftModel``.

    Returns:
        The merged model, without PEFT layers.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11))
        >>> lora = apply_lora(model, rank=2, alpha=4.0, dropout=0.0, target_modules=None)
        >>> type(merged_copy(lora)).__name__, is_lora(lora)
        ('GPT2LMHeadModel', True)
    """
    return copy.deepcopy(policy).merge_and_unload()
