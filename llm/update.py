"""One optimiser step of a method on a minibatch of response pairs.

    logprobs   = sequence_logprobs(policy, pairs)                 one forward, (n, 2)
    losses     = method.losses(logprobs, pairs)                    pointwise, (n,)
    objective  = robust_objective(losses, method.spec, embeddings)  drosim.dro, global
    objective.loss.backward(); all-reduce(sum) the gradients; clip; step

Data parallelism is done by hand rather than with ``DistributedDataParallel``: the robust
objective already couples the ranks through its gathered dual, its surrogate gradients must be
SUMMED (not averaged) over ranks, and DDP's reducer does not support the double backward of
the Wasserstein penalty. One flattened all-reduce per step does the same communication.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from drosim.llm.batch import PairBatch
from drosim.llm.logprobs import sequence_logprobs
from drosim.llm.methods import Method
from drosim.llm.objective import RobustObjective, robust_objective


class StepStats(NamedTuple):
    """Scalars of one update: the global objective, mean pointwise loss and gradient norm,
    and this rank's largest sample weight."""

    objective: float
    mean_loss: float
    grad_norm: float
    max_weight: float


def pair_logprobs(policy: nn.Module, batch: PairBatch, *, embeddings: Tensor | None = None
                  ) -> Tensor:
    """``(n, 2)`` log pi_theta of every pair's responses from one forward pass."""
    out = sequence_logprobs(policy, batch.flat("input_ids"), batch.flat("attention_mask"),
                            batch.flat("response_mask"), inputs_embeds=embeddings)
    return out.logprobs.view(len(batch), 2)


def method_objective(policy: nn.Module, batch: PairBatch, method: Method, *, eta: float,
                     beta: float) -> tuple[RobustObjective, Tensor]:
    """The method's robust objective on ``batch`` and the ``(n,)`` pointwise losses.

    The Wasserstein sets need the input embeddings as a tensor in the graph, so the policy is
    then fed ``inputs_embeds`` instead of token ids.
    """
    if method.spec is None or not method.spec.needs_input_gradients:
        logprobs = pair_logprobs(policy, batch)
        losses = method.losses(logprobs, batch, eta=eta, beta=beta)
        return robust_objective(losses, method.spec), losses
    with attention_kernels(method):
        embeddings = policy.get_input_embeddings()(batch.flat("input_ids"))
        logprobs = pair_logprobs(policy, batch, embeddings=embeddings)
        losses = method.losses(logprobs, batch, eta=eta, beta=beta)
        return robust_objective(losses, method.spec, inputs=embeddings), losses


def attention_kernels(method: Method) -> contextlib.AbstractContextManager:
    """The attention kernels a method may use, as a context for its forward AND backward.

    The Wasserstein penalty differentiates twice; the fused (flash / memory-efficient)
    attention kernels have no double backward, the math kernel does. The backward needs the
    same context because gradient checkpointing recomputes the forward inside it.
    """
    if method.spec is not None and method.spec.needs_input_gradients:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def sum_gradients_over_ranks(parameters: list[nn.Parameter]) -> None:
    """All-reduce (sum) the parameters' gradients in one flattened buffer."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def update_step(policy: nn.Module, optimizer: torch.optim.Optimizer, batch: PairBatch,
                method: Method, *, eta: float, beta: float, max_grad_norm: float | None,
                autocast_dtype: torch.dtype | None = None) -> StepStats:
    """One AdamW (or any optimiser) step of ``method`` on the minibatch ``batch``.

    Args:
        policy: the causal LM being trained (unwrapped; gradients are summed over ranks here).
        optimizer: its optimiser.
        batch: this rank's share of the global minibatch.
        method: pointwise loss and ambiguity set.
        eta: REBEL step size.
        beta: DPO / IPO inverse temperature.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward under autocast.

    Returns:
        :class:`StepStats`.
    """
    optimizer.zero_grad(set_to_none=True)
    device_type = batch.input_ids.device.type
    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype
                else contextlib.nullcontext())
    with attention_kernels(method):
        with autocast:
            objective, losses = method_objective(policy, batch, method, eta=eta, beta=beta)
        objective.loss.backward()
    parameters = [p for p in policy.parameters() if p.requires_grad]
    sum_gradients_over_ranks(parameters)
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm or float("inf"))
    optimizer.step()
    total = torch.stack([losses.detach().sum(), losses.new_tensor(float(len(batch)))])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return StepStats(float(objective.value), float(total[0] / total[1]), float(norm),
                     float(objective.weights.max()))
