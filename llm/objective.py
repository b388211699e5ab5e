"""The robust training objective of a minibatch, global across data-parallel ranks.

Given per-sample losses l_i (and, for a Wasserstein set, their input-gradient norms), the
objective is ``drosim.dro.robust_mean`` over the GLOBAL minibatch: every rank all-gathers the
detached losses, solves the same dual, and back-propagates through its own samples only with

    surrogate = sum_{i local} (d F / d l_i) l_i + (d F / d g_i) g_i,

where F = robust_mean(l_all, spec, grad_sq_norms=g_all) and g_i = ||grad_{z_i} l_i||^2. The
coefficients are F's gradient at the gathered values, i.e. the Danskin weights q_i* for chi2
and KL (1/N and the penalty's slope for Wasserstein), so summing the surrogate gradients over
ranks gives exactly grad F. On one process the gather is the identity and the same code runs.

The Wasserstein penalty needs every per-sample gradient ||grad_{z_i} l_i||. Samples do not
interact in a transformer's forward pass, so one ``autograd.grad(sum_i l_i, z,
create_graph=True)`` returns all of them at once (row i of the result is grad_{z_i} l_i); the
authors' public code takes one autograd.grad per sample instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from drosim.dro import AmbiguitySet, robust_mean


class RobustObjective(NamedTuple):
    """A minibatch's robust objective.

    Attributes:
        loss: scalar to call ``backward()`` on; its gradient, summed over ranks, is the
            gradient of the global objective (its value is not the objective's).
        value: the global robust objective F, detached (the same on every rank), a float64
            scalar on the CPU.
        weights: ``(n_local,)`` d F / d l_i for this rank's samples (the worst-case weights
            for chi2 and KL), detached.
    """

    loss: Tensor
    value: Tensor
    weights: Tensor


def input_grad_sq_norms(losses: Tensor, inputs: Tensor) -> Tensor:
    """||grad_{z_i} l_i||^2 for every sample, from one ``autograd.grad`` call.

    Valid when sample i's loss depends only on its own rows of ``inputs`` (true for a
    transformer without batch-mixing layers). The result keeps the graph
    (``create_graph=True``) so a penalty built on it trains the parameters.

    Args:
        losses: ``(n,)`` per-sample losses.
        inputs: ``(n * k, ...)`` tensor the losses were computed from; rows ``i*k .. i*k+k-1``
            belong to sample i (k = 2 for response pairs).

    Returns:
        ``(n,)`` squared Euclidean norms, differentiable.

    Example:
        >>> import torch
        >>> z = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
        >>> input_grad_sq_norms((z ** 2).sum(-1), z).tolist()  # grad = 2 z
        [20.0, 100.0]
    """
    if inputs.shape[0] % losses.shape[0] != 0:
        raise ValueError(f"inputs have {inputs.shape[0]} rows, not a multiple of the "
                         f"{losses.shape[0]} losses")
    (grad,) = torch.autograd.grad(losses.sum(), inputs, create_graph=True)
    return grad.reshape(losses.shape[0], -1).square().sum(-1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_detached(local: Tensor) -> tuple[Tensor, slice]:
    """All ranks' ``(n,)`` tensors concatenated in rank order, and this rank's slice.

    Raises:
        ValueError: ranks hold different numbers of samples.
    """
    local = local.detach()
    if not _distributed():
        return local, slice(0, local.shape[0])
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"every rank must hold the same number of samples, got "
                         f"{[int(s) for s in sizes]}")
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    n = local.shape[0]
    return torch.cat(parts), slice(rank * n, (rank + 1) * n)


def robust_objective(losses: Tensor, spec: AmbiguitySet | None, *,
                     inputs: Tensor | None = None) -> RobustObjective:
    """The robust aggregate of a (possibly distributed) minibatch's per-sample losses.

    Args:
        losses: ``(n,)`` this rank's per-sample losses, carrying the graph.
        spec: a ``drosim.dro`` ambiguity set, or None for the mean.
        inputs: the input embeddings the losses were computed from (see
            :func:`input_grad_sq_norms`); required by a Wasserstein spec only.

    Returns:
        :class:`RobustObjective`.

    Raises:
        ValueError: ``losses`` not 1-D or empty, non-finite losses, a Wasserstein spec
            without ``inputs``, or as ``drosim.dro.robust_mean`` (e.g. a negative radius).

    Example:
        >>> import torch
        >>> from drosim.dro import Chi2
        >>> l = torch.tensor([0.0, 1.0, 2.0, 3.0], requires_grad=True)
        >>> out = robust_objective(l, Chi2(0.1))
        >>> out.loss.backward()
        >>> l.grad.tolist() == out.weights.tolist(), round(float(out.value), 4)
        (True, 2.0)
    """
    check_local_losses(losses)
    local = [losses]
    if spec is not None and spec.needs_input_gradients:
        if inputs is None:
            raise ValueError("a Wasserstein objective needs the input embeddings the losses "
                             "were computed from")
        local.append(input_grad_sq_norms(losses, inputs))
    value, coefficients = robust_coefficients(local, spec)
    loss = sum((c * t).sum() for c, t in zip(coefficients, local, strict=True))
    return RobustObjective(loss, value, coefficients[0])


def check_local_losses(losses: Tensor) -> None:
    """Refuse anything but a non-empty ``(n,)`` tensor of finite losses (before any backward
    runs through them)."""
    if losses.dim() != 1 or losses.shape[0] == 0:
        raise ValueError(f"losses must be a non-empty (n,) tensor, got {tuple(losses.shape)}")
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()[:5].tolist()
        raise ValueError(f"losses contains NaN or infinite values (first at indices {bad})")


def robust_coefficients(local: list[Tensor], spec: AmbiguitySet | None
                        ) -> tuple[Tensor, list[Tensor]]:
    """The global objective F and its gradient in this rank's values.

    Args:
        local: this rank's ``(n,)`` losses and, for a Wasserstein set, their squared
            input-gradient norms (graphs are ignored: only the values are read).
        spec: the ambiguity set, or None for the mean.

    Returns:
        (F, [d F / d l_i, d F / d g_i]) with F a detached float64 CPU scalar, the same on
        every rank, and the coefficients ``(n,)`` in each input's device and dtype.
    """
    gathered = []
    for tensor in local:
        full, own = gather_detached(tensor)
        # The dual is solved on the host in float64: n numbers cross the bus once, instead of
        # the solver's thousands of tiny kernel launches on a GPU.
        gathered.append(full.to("cpu", torch.float64).requires_grad_())
    value = robust_mean(gathered[0], spec,
                        grad_sq_norms=gathered[1] if len(gathered) > 1 else None)
    coefficients = [c[own].to(t.device, t.dtype)
                    for c, t in zip(torch.autograd.grad(value, gathered), local, strict=True)]
    return value.detach(), coefficients
