"""The authors' public chi2-REBEL / KL-REBEL aggregation, re-implemented: a DEFECTIVE baseline.

WARNING: this module reproduces a DEFECTIVE method, for comparison only (benchmarks and
paper checks). Do not use it for training or for any robust estimate.

It was written from the description in the project's notes on the authors' public code
(GitHub: sharansahu/distributionally_robust_rebel), not copied from that code. The
chi-square aggregation there searches eta over the candidate set
{min(l) - 1, every distinct loss value, max(l) + 1} in a Python loop, evaluating

    g(eta) = eta + sqrt((2 rho / n) * sum_i (l_i - eta)_+^2)

at each candidate with one host synchronisation (``.item()``) per candidate, which is
O(n^2) work and up to n + 2 device round trips per call.

Why it is wrong: the chi-square dual (with D = 1/2 E(dQ/dP - 1)^2 <= rho) is
eta + sqrt(1 + 2 rho) * sqrt(E(l - eta)_+^2); the published expression drops the "1 +".
By Cauchy-Schwarz g'(eta) >= 1 - sqrt(2 rho), so whenever sqrt(2 rho) < 1 (rho < 1/2) g is
strictly increasing and unbounded below in eta, and the candidate search merely returns
its left-most candidate, eta = min(l) - 1: the finite candidate set hides the divergence.
The resulting "worst case" can lie below the empirical mean (e.g. rho = 0.01, n = 64
exponential losses: about -0.67 against a mean of about 1.03), which no worst-case
expectation can do. With sqrt(2 rho) >= 1 the value is finite but still not the
chi-square worst case. The correct, exact solver is :func:`drosim.dro.chi2_worst_case`.

The KL-REBEL aggregation is a fixed-temperature softmax of centred losses; it is a
legitimate penalised (not constrained) form, reproduced here with its weights left
attached to the autograd graph as in the original (the exact counterpart with Danskin
gradients is :func:`drosim.dro.kl_tilted`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "PublishedChi2",
    "PublishedKL",
    "published_chi2_candidates",
    "published_chi2_objective",
    "published_chi2_value_at",
    "published_kl_weights",
]


class PublishedChi2(NamedTuple):
    """Output of the published chi-square candidate search.

    Attributes:
        objective: min over the candidates of eta + sqrt((2 rho / n) sum (l_i - eta)_+^2),
            a Python float: the "public code's chi2 value". Can be below mean(l).
        eta: the minimising candidate (a Python float; constant for autograd).
        weights: w_i = (l_i - eta)_+ / (n lambda) with
            lambda = sqrt((2 rho / n) sum (l_i - eta)_+^2), shape ``(n,)``. NOT detached:
            gradients flow through the weights as in the original. They do not sum to 1
            in general, and are NaN (0 / 0) if the minimising eta leaves no excess.
        loss: sum_i w_i l_i, a 0-d tensor attached to the autograd graph.
    """

    objective: float
    eta: float
    weights: Tensor
    loss: Tensor


class PublishedKL(NamedTuple):
    """Output of the published fixed-temperature KL aggregation.

    Attributes:
        weights: P_i = softmax((l_i - mean(l)) / tau), shape ``(n,)``; NOT detached.
        loss: sum_i P_i l_i, a 0-d tensor attached to the autograd graph.
    """

    weights: Tensor
    loss: Tensor


def _check_1d(losses: Tensor) -> None:
    if not isinstance(losses, Tensor):
        raise TypeError(f"losses must be a torch.Tensor, got {type(losses).__name__}")
    if losses.ndim != 1 or losses.numel() == 0:
        raise ValueError(f"losses must be a non-empty 1-D tensor, got shape {tuple(losses.shape)}")
    if not losses.is_floating_point():
        raise ValueError(f"losses must be a floating-point tensor, got dtype {losses.dtype}")


def published_chi2_candidates(losses: Tensor) -> Tensor:
    """The candidate set {min - 1, every distinct loss value, max + 1}, ascending, detached.

    Args:
        losses: 1-D tensor of per-sample losses.

    Returns:
        1-D tensor of candidate etas on the losses' device and dtype.
    """
    _check_1d(losses)
    distinct = torch.unique(losses.detach())  # sorted ascending
    return torch.cat([distinct[:1] - 1, distinct, distinct[-1:] + 1])


def published_chi2_value_at(losses: Tensor, eta: Tensor | float, rho: float) -> float:
    """g(eta) = eta + sqrt((2 rho / n) sum (l_i - eta)_+^2) at one candidate, as a float.

    The ``float(...)`` is the per-candidate host synchronisation of the original loop.

    Args:
        losses: 1-D tensor of per-sample losses.
        eta: the candidate (0-d tensor or float).
        rho: the radius.

    Returns:
        g(eta) as a Python float.
    """
    l = losses.detach()
    excess_sq = (l - eta).clamp_min(0).square().sum()
    return (eta + torch.sqrt((2 * rho / l.numel()) * excess_sq)).item()


def published_chi2_objective(losses: Tensor, rho: float) -> PublishedChi2:
    """The published chi2-REBEL aggregation: candidate search for eta, then soft weights.

    Reproduces a DEFECTIVE method (see the module docstring); for comparison only.

    Args:
        losses: 1-D tensor of n per-sample losses; may require grad.
        rho: the radius (the published code uses sqrt(2 rho), not sqrt(1 + 2 rho)).

    Returns:
        PublishedChi2(objective, eta, weights, loss). Ties between candidates go to the
        smallest eta (the first in the ascending loop).

    Raises:
        ValueError: losses not a non-empty 1-D floating tensor, or rho negative or NaN.

    Example:
        >>> import torch
        >>> l = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
        >>> out = published_chi2_objective(l, 0.01)  # sqrt(2 rho) < 1: min - 1 wins
        >>> out.eta, round(out.objective, 4), bool(out.objective < float(l.mean()))
        (-1.0, -0.6127, True)
    """
    _check_1d(losses)
    if not rho >= 0:
        raise ValueError(f"rho must be non-negative, got {rho}")
    n = losses.numel()
    best_value, best_eta = math.inf, math.nan
    # The published loop: one evaluation and one host sync per candidate, O(n^2) overall.
    for eta in published_chi2_candidates(losses):
        value = published_chi2_value_at(losses, eta, rho)
        if value < best_value:
            best_value, best_eta = value, eta.item()
    excess = (losses - best_eta).clamp_min(0)
    lam = torch.sqrt((2 * rho / n) * excess.square().sum())
    weights = excess / (n * lam)
    return PublishedChi2(best_value, best_eta, weights, (weights * losses).sum())


def published_kl_weights(losses: Tensor, tau: float) -> PublishedKL:
    """The published KL-REBEL / KL-DPO aggregation: softmax((l - mean) / tau), attached.

    Args:
        losses: 1-D tensor of per-sample losses; may require grad.
        tau: the fixed temperature, > 0.

    Returns:
        PublishedKL(weights, loss) with loss = sum_i P_i l_i.

    Raises:
        ValueError: losses not a non-empty 1-D floating tensor, or tau not positive.

    Example:
        >>> import torch
        >>> out = published_kl_weights(torch.tensor([0.0, 1.0], dtype=torch.float64), 1.0)
        >>> round(float(out.weights[1]), 6) == round(1 / (1 + math.exp(-1)), 6)
        True
    """
    _check_1d(losses)
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    weights = torch.softmax((losses - losses.mean()) / tau, dim=0)
    return PublishedKL(weights, (weights * losses).sum())
