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

Where the ball is built (config key ``robust_scope``):

* ``"minibatch"`` (the default): around each optimiser step's (global) minibatch, as above.
  The same radius then means a different set at every minibatch size (Levy et al. 2020
  bound the bias this adds to the full-batch robust gradient).
* ``"iteration"``: around all of the iteration's pairs (over every rank), with
  :class:`IterationLosses`: a cache of every pair's latest loss, filled at theta_t before the
  iteration's first step and refreshed with each minibatch's fresh losses as it is visited.
  At every step the worst case over the whole cache is re-solved, and the minibatch B (m of
  the iteration's N pairs) back-propagates sum_{i in B} (N / m) q_i l_i with q the cache's
  worst-case weights, detached (Danskin). For B drawn uniformly this is an unbiased estimate
  of the iteration's robust gradient sum_i q_i grad l_i at fixed theta when the cache is
  current; between visits a pair's cached loss is stale (that of the theta at which it was
  last computed). Only sets with pair weights take it (chi-square and KL balls, a KL
  temperature); a Wasserstein set is a penalty on input-gradient norms, not a reweighting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from drosim.dro import KL, AmbiguitySet, Chi2, DROResult, as_ambiguity_set
from drosim.llm.components.runtime import gather_detached

ROBUST_SCOPES: tuple[str, ...] = ("minibatch", "iteration")


class RobustDiagnostics(NamedTuple):
    """How far a worst case moves from the uniform weights of its scope's pairs.

    Attributes:
        dual: the solved dual variable, eta* (chi-square) or tau* (KL); None for a set that
            solves none (the mean, a fixed KL temperature, a Wasserstein penalty).
        max_weight: the largest worst-case weight q_i over the scope's pairs (all ranks).
        effective_pairs: 1 / sum_i q_i^2 (Kish's effective sample size): the number of
            equally weighted pairs with the same sum of squared weights (the scope's pair
            count under uniform weights, 1 when one pair takes all).
    """

    dual: float | None
    max_weight: float
    effective_pairs: float


def robust_diagnostics(spec: AmbiguitySet | None, result: DROResult) -> RobustDiagnostics:
    """The diagnostics of a solved worst case.

    Args:
        spec: the set ``result`` was solved for (None: the mean).
        result: its ``drosim.dro`` answer on ``(n,)`` losses: ``weights`` ``(n,)``, ``dual``
            a scalar.

    Returns:
        :class:`RobustDiagnostics`, as Python floats.
    """
    weights = result.weights.detach()
    dual = float(result.dual) if isinstance(spec, Chi2 | KL) else None
    return RobustDiagnostics(dual, float(weights.max()), float(1 / weights.square().sum()))


class RobustObjective(NamedTuple):
    """A minibatch's robust objective.

    Attributes:
        loss: scalar to call ``backward()`` on; its gradient, summed over ranks, is the
            gradient of the global objective (its value is not the objective's).
        value: the global robust objective F, detached (the same on every rank), a float64
            scalar on the CPU.
        weights: ``(n_local,)`` d F / d l_i for this rank's samples (the worst-case weights
            for chi2 and KL), detached; under :class:`IterationLosses`, the weights q_i of
            the iteration's worst case (``loss`` scales them by N / m).
        diagnostics: the worst case's :class:`RobustDiagnostics`, over the global minibatch
            (or the iteration's pairs).
    """

    loss: Tensor
    value: Tensor
    weights: Tensor
    diagnostics: RobustDiagnostics


def input_grad_sq_norms(losses: Tensor, inputs: Tensor, *, owners: Tensor | None = None
                        ) -> Tensor:
    """||grad_{z_i} l_i||^2 for every sample, from one ``autograd.grad`` call.

    Valid when sample i's loss depends only on its own tokens of ``inputs`` (true for a
    transformer without batch-mixing layers, and for packed rows whose attention keeps each
    sequence to itself). The result keeps the graph (``create_graph=True``) so a penalty
    built on it trains the parameters.

    Args:
        losses: ``(n,)`` per-sample losses.
        inputs: ``(n * k, ...)`` tensor the losses were computed from; rows ``i*k .. i*k+k-1``
            belong to sample i (k = 2 for response pairs). With ``owners``: ``(R, C, D)``
            token embeddings in any layout (e.g. packed rows).
        owners: ``(R, C)`` the sample owning each token of ``inputs``, -1 on padding; None
            for the row layout above.

    Returns:
        ``(n,)`` squared Euclidean norms, differentiable.

    Raises:
        ValueError: row-layout ``inputs`` whose rows are not a multiple of the samples.

    Example:
        >>> import torch
        >>> z = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
        >>> input_grad_sq_norms((z ** 2).sum(-1), z).tolist()  # grad = 2 z
        [20.0, 100.0]
    """
    if owners is None and inputs.shape[0] % losses.shape[0] != 0:
        raise ValueError(f"inputs have {inputs.shape[0]} rows, not a multiple of the "
                         f"{losses.shape[0]} losses")
    (grad,) = torch.autograd.grad(losses.sum(), inputs, create_graph=True)
    if owners is None:
        return grad.reshape(losses.shape[0], -1).square().sum(-1)
    return sample_sums(grad.square().sum(-1), owners, losses.shape[0])


def sample_sums(values: Tensor, owners: Tensor, n: int) -> Tensor:
    """Sum per-token ``values`` over the tokens of each sample (a segment sum).

    Args:
        values: ``(R, C)`` one value per token.
        owners: ``(R, C)`` the sample index of each token in ``[0, n)``, -1 for none.
        n: the number of samples.

    Returns:
        ``(n,)`` sums, differentiable in ``values``.

    Example:
        >>> import torch
        >>> sample_sums(torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([[1, -1, 1]]), 2).tolist()
        [0.0, 5.0]
    """
    keep = owners >= 0
    return values.new_zeros(n).index_add(0, owners[keep], values[keep])


def robust_objective(losses: Tensor, spec: AmbiguitySet | None, *,
                     inputs: Tensor | None = None, owners: Tensor | None = None
                     ) -> RobustObjective:
    """The robust aggregate of a (possibly distributed) minibatch's per-sample losses.

    Args:
        losses: ``(n,)`` this rank's per-sample losses, carrying the graph.
        spec: a ``drosim.dro`` ambiguity set, or None for the mean.
        inputs: the input embeddings the losses were computed from (see
            :func:`input_grad_sq_norms`); required by a Wasserstein spec only.
        owners: ``(R, C)`` the sample owning each token of ``inputs`` (-1 on padding) when
            they are not in the ``(n * k, ...)`` row layout, e.g. packed rows.

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
        local.append(input_grad_sq_norms(losses, inputs, owners=owners))
    value, coefficients, diagnostics = robust_coefficients(local, spec)
    loss = sum((c * t).sum() for c, t in zip(coefficients, local, strict=True))
    return RobustObjective(loss, value, coefficients[0], diagnostics)


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
                        ) -> tuple[Tensor, list[Tensor], RobustDiagnostics]:
    """The global objective F, its gradient in this rank's values, and its diagnostics.

    Args:
        local: this rank's ``(n,)`` losses and, for a Wasserstein set, their squared
            input-gradient norms (graphs are ignored: only the values are read).
        spec: the ambiguity set, or None for the mean.

    Returns:
        (F, [d F / d l_i, d F / d g_i], diagnostics) with F a detached float64 CPU scalar,
        the same on every rank, the coefficients ``(n,)`` in each input's device and dtype,
        and the :class:`RobustDiagnostics` of the global worst case.
    """
    gathered = []
    for tensor in local:
        full, own = gather_detached(tensor)
        gathered.append(host_float64(full).requires_grad_())
    # robust_mean's own computation, keeping the weights and dual for the diagnostics
    result = as_ambiguity_set(spec).worst_case(
        gathered[0], gathered[1] if len(gathered) > 1 else None)
    coefficients = [c[own].to(t.device, t.dtype) for c, t in
                    zip(torch.autograd.grad(result.value, gathered), local, strict=True)]
    return result.value.detach(), coefficients, robust_diagnostics(spec, result)


def host_float64(values: Tensor) -> Tensor:
    """``values`` as float64 on the CPU, where the duals are solved: n numbers cross the bus
    once, instead of the solver's thousands of tiny kernel launches on a GPU."""
    return values.to("cpu", torch.float64)


# The robust objective of a minibatch's (n,) losses, carrying their graph.
Aggregate = Callable[[Tensor], RobustObjective]


class IterationLosses:
    """``robust_scope=iteration``: the ball around all of an iteration's pairs.

    Holds this rank's ``(n,)`` cache of every pair's latest loss (detached). Each optimiser
    step hands :meth:`objective` its minibatch's fresh losses and rows: the rows are
    refreshed, the cache is gathered over the ranks (N pairs in all), its worst case is
    solved anew, and the minibatch back-propagates

        sum_{i in B} (N / m) q_i l_i       (m = the global minibatch size, q detached),

    summed over the ranks' minibatches. N / m is the same on every rank (each holds n / R
    of the pairs and m / R of every minibatch), so it is ``n / len(rows)`` locally.

    Stale: every pair outside the current minibatch, whose cached loss is that of the
    parameters at which it was last computed (at theta_t before its first visit of the
    iteration, at its last visit after).
    """

    def __init__(self, losses: Tensor, spec: AmbiguitySet) -> None:
        """Args:
            losses: ``(n,)`` this rank's pair losses at the iteration's starting parameters.
            spec: the method's set; one with pair weights (``Method.reweights``).

        Raises:
            ValueError: losses not a non-empty ``(n,)`` tensor of finite values, or a
                Wasserstein set (it has no pair weights to share).
        """
        check_local_losses(losses)
        if spec.needs_input_gradients:
            raise ValueError("robust_scope=iteration reweights pairs; a Wasserstein set is a "
                             "penalty on input-gradient norms, with no weights to share")
        self.spec = spec
        self.losses = losses.detach().clone()

    def objective(self, losses: Tensor, rows: Tensor) -> RobustObjective:
        """Refresh ``rows`` with ``losses``, re-solve the iteration's worst case, and return
        the minibatch's surrogate.

        Args:
            losses: ``(m_local,)`` the minibatch's fresh losses, carrying the graph.
            rows: ``(m_local,)`` their distinct positions in this rank's cache.

        Returns:
            :class:`RobustObjective`: ``loss`` = sum (N / m) q_i l_i over the rows, ``value``
            the worst case over the iteration's cached losses, ``weights`` the rows' q_i,
            ``diagnostics`` over all N pairs.

        Raises:
            ValueError: non-finite losses, or ``rows`` not matching ``losses``.
        """
        check_local_losses(losses)
        if rows.shape != losses.shape:
            raise ValueError(f"rows {tuple(rows.shape)} must match losses "
                             f"{tuple(losses.shape)}")
        self.losses[rows] = losses.detach().to(self.losses.dtype)
        full, own = gather_detached(self.losses)
        result = as_ambiguity_set(self.spec).worst_case(host_float64(full))
        weights = result.weights[own][rows.cpu()].to(losses.device, losses.dtype)
        scale = self.losses.shape[0] / losses.shape[0]  # N / m
        return RobustObjective((scale * weights * losses).sum(), result.value, weights,
                               robust_diagnostics(self.spec, result))
