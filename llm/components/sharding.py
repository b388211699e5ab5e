"""Fully sharded data parallelism (torch FSDP2) for the policy and the reference model.

``sharding: fsdp2`` splits every parameter, gradient and AdamW moment over the ranks, so a
model that does not fit on one device trains on several. Each transformer block and then
the root module become FSDP units: a unit all-gathers its parameters just before its
forward (and again in the backward) and reduce-scatters its gradients right after.

Two things differ from FSDP2's defaults, both on purpose:

- gradients are SUMMED over ranks, not averaged: the robust objective's surrogate loss on
  each rank already carries the global 1/N and dual weights (see
  :mod:`drosim.llm.components.objective`), exactly as the hand-written all-reduce of an unsharded
  run sums them;
- the model is flagged as FSDP-managed for ``transformers``' ``generate``, which then keeps
  every rank stepping (``synced_gpus``) until all ranks' samples have ended: each forward
  is a collective, so a rank whose responses end early must keep calling it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

SHARDINGS: tuple[str, ...] = ("none", "fsdp2")


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a Hugging Face causal LM.

    Found generically as the ``nn.ModuleList`` of identically-typed modules holding the most
    parameters (GPT-2: ``transformer.h``, Llama / Qwen / Mistral: ``model.layers``).

    Args:
        model: a causal LM.

    Returns:
        The module list of blocks.

    Raises:
        ValueError: the model has no such list.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=11))
        >>> transformer_blocks(model) is model.transformer.h
        True
    """
    stacks = [module for module in model.modules()
              if isinstance(module, nn.ModuleList) and len(module) > 0
              and len({type(block) for block in module}) == 1]
    if not stacks:
        raise ValueError(f"cannot shard {type(model).__name__}: no nn.ModuleList of "
                         "transformer blocks found (expected e.g. transformer.h or "
                         "model.layers)")
    return max(stacks, key=lambda stack: sum(p.numel() for p in stack.parameters()))


def shard_policy(model: nn.Module, *, mixed_precision: torch.dtype | None) -> FSDPModule:
    """Shard ``model`` in place with FSDP2: every transformer block, then the root.

    Call it after the model is on its device and inside an initialised process group. The
    master weights stay in the model's dtype (float32 for training); with
    ``mixed_precision`` the forward and backward run in that dtype and gradients are reduced
    in float32.

    Args:
        model: a Hugging Face causal LM (see :func:`transformer_blocks`).
        mixed_precision: e.g. ``torch.bfloat16``, or None to compute in the weights' dtype.

    Returns:
        The same module, now an ``FSDPModule`` whose gradients are summed over ranks.

    Raises:
        ValueError: no transformer blocks found.
    """
    policy = (MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
              if mixed_precision is not None else MixedPrecisionPolicy())
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in fsdp_modules(model):
        # Divide by 1 instead of the world size (a sum), and through a plain SUM collective:
        # gloo has no PREMUL_SUM, which FSDP2 would otherwise use for a factor on float32.
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    model._is_fsdp_managed_module = True  # transformers' generate: synced_gpus
    return model


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """The FSDP units inside ``model`` (itself included), root first."""
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or the module a ``torch.compile`` wrapper holds) was sharded by
    :func:`shard_policy`: its root is an FSDP unit."""
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)
