"""Exact, batched worst-case expectations over ambiguity sets around P_n.

Every function here takes per-sample losses ``l`` of shape ``(..., n)``: the last
dimension holds the n samples of one problem, P_n is uniform over them, and any
leading dimensions are independent problems solved together (no Python loop, no
host synchronisation inside a solve).

Conventions (pinned by the tests):

* chi-square, Cressie-Read k = 2:  D(Q || P_n) = 1/2 E_{P_n}[(dQ/dP_n - 1)^2] <= rho,

      sup_Q E_Q[l] = inf_eta  eta + sqrt(1 + 2 rho) * sqrt(E_{P_n}[(l - eta)_+^2]),

  worst-case weights q_i = (l_i - eta*)_+ / sum_j (l_j - eta*)_+.
* KL:  D(Q || P_n) = E_Q[log dQ/dP_n] <= rho,

      sup_Q E_Q[l] = inf_{tau > 0}  tau * rho + tau * log E_{P_n}[exp(l / tau)],

  worst-case weights q = softmax(l / tau*); tau* = 0 when rho >= log(n / #argmax)
  (the worst case then sits uniformly on the largest losses).
* KL with a fixed temperature (the penalised form used by KL-DPO):
  tau * log E_{P_n}[exp(l / tau)], weights softmax(l / tau).
* type-p Wasserstein with a Euclidean cost on the inputs z: for the squared residual
  of a linear model, (<w, z> - y)^2 with p = 2,

      sup_{W_2(Q, P_n) <= rho} E_Q[(<w, z> - y)^2] = (sqrt(E_{P_n}[r^2]) + rho ||w||_2)^2,

  and in general the first-order regulariser rho * (E ||grad_z l||_*^q)^(1/q), q = p/(p-1).

Gradients follow Danskin's theorem: ``d value / d l_i = q_i`` with the worst-case
weights held fixed; :func:`robust_mean` is the training entry point.

Weighted empirical distributions: every function and every :class:`AmbiguitySet` method
takes a keyword-only ``weights`` (default None, the uniform P_n above, on its own unchanged
code path). ``weights`` is a floating tensor broadcastable to ``losses.shape`` (``(..., n)``,
or ``(n,)`` shared by every problem), non-negative, finite and not all zero within a
problem; each problem's weights are normalised to a probability vector p, and the balls are
built around P = sum_i p_i delta_i instead of P_n:

* chi-square: 1/2 E_P[(dQ/dP - 1)^2] <= rho, value inf_eta eta + sqrt(1 + 2 rho)
  sqrt(E_P[(l - eta)_+^2]), q_i = p_i (l_i - eta*)_+ / sum_j p_j (l_j - eta*)_+; the max
  over the support once (1 + 2 rho) P(argmax) >= 1.
* KL: KL(Q || P) <= rho, value inf_tau tau rho + tau log E_P exp(l / tau), q proportional
  to p exp(l / tau*); the max over the support once rho >= -log P(argmax). The tilted form
  is tau log E_P exp(l / tau), q proportional to p exp(l / tau).
* Wasserstein: rho (E_P ||grad_z l||^q)^(1/q) (p = 1: rho times the max over the support);
  the empirical set: the weighted mean, q = p.

A zero weight removes its sample: it is never the argmax, its worst-case weight is exactly 0
and so is its gradient (its loss may be any finite number). The weights are data: they are
detached, and no gradient flows to them.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "KL",
    "AmbiguitySet",
    "Chi2",
    "DROResult",
    "DualDerivatives",
    "Empirical",
    "KLTemperature",
    "Wasserstein",
    "WassersteinResult",
    "as_ambiguity_set",
    "chi2_worst_case",
    "kl_tilted",
    "kl_worst_case",
    "robust_mean",
    "wasserstein_linear_sq_worst_case",
    "wasserstein_penalty",
]

# Safeguarded Newton iterations for the KL dual. On a battery of inputs (n from 2 to 4096;
# exponential, normal, log-normal, Pareto, tied and two-point losses; rho from 1e-6 to 30)
# log tau* is exact to 1e-10 after 10 iterations; 24 leave a wide margin.
_KL_ITERATIONS = 24
_CHI2_CHUNKS = 4
_CHI2_CHUNKED_SIZE = 1 << 22  # losses from which chi2 is solved in _CHI2_CHUNKS parts
# Active-set steps of the warm-started chi-square dual before the sorting solver takes over
# (from the previous Newton iterate's eta* one or two certify almost every row).
_CHI2_WARM_STEPS = 4
# Radii below which the KL dual is replaced by its small-radius expansion (see kl_worst_case):
# its error O(rho * spread) is then below the rounding of the exact solve.
_KL_SMALL_RADIUS = {torch.float64: 1e-12, torch.float32: 1e-6}
_HALF = (torch.float16, torch.bfloat16)
# The largest exponent of a warm (mean-centred) weighted tilt: exp(512) ~ 1e222 leaves room.
_WARM_EXPONENT = 512.0


class DROResult(NamedTuple):
    """Worst-case expectation over an ambiguity set around P_n (or a weighted P).

    Attributes:
        value: sup_Q E_Q[l], shape ``losses.shape[:-1]``. Differentiable in the losses
            with ``d value / d l_i = weights_i`` (Danskin).
        weights: the worst-case distribution Q on the n samples, shape ``losses.shape``;
            each row lies in the simplex (and is 0 where P is). Detached.
        dual: the optimal dual variable, shape ``losses.shape[:-1]`` (eta* for chi-square,
            tau* for KL, the given tau for the tilted form). Detached.
    """

    value: Tensor
    weights: Tensor
    dual: Tensor


class WassersteinResult(NamedTuple):
    """Exact type-2 Wasserstein worst case of a linear model's squared residual.

    Attributes:
        value: (sqrt(E r^2) + rho ||w||)^2, shape ``residuals.shape[:-1]``; differentiable
            in the residuals and in w.
        dual: lambda* = ||w||^2 + ||w|| sqrt(E r^2) / rho, the multiplier of the transport
            budget (inf when rho = 0). Detached.
    """

    value: Tensor
    dual: Tensor


# ---------------------------------------------------------------------- validation


def _check_losses(losses: Tensor, name: str = "losses") -> None:
    """The one rule for per-sample data ``(..., n)``: a floating tensor with n >= 1 samples,
    at least one problem (an empty batch has nothing to solve: refused, not answered with
    empty tensors) and only finite values.

    Raises:
        TypeError: not a tensor.
        ValueError: not floating-point, no samples, an empty batch, NaN or infinity.
    """
    if not isinstance(losses, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(losses).__name__}")
    if not losses.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {losses.dtype}")
    if losses.ndim == 0 or losses.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape "
                         f"{tuple(losses.shape)}")
    if losses.numel() == 0:
        raise ValueError(f"{name} has an empty batch: shape {tuple(losses.shape)} holds no "
                         "samples (every leading dimension must be >= 1)")
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[:5].tolist()
        raise ValueError(f"{name} contains NaN or infinite values (first at indices {bad})")


def _as_radius(rho: float | Tensor, like: Tensor, name: str = "rho", *,
               finite: bool = False, differentiable: bool = False) -> Tensor:
    """rho as a tensor on like's device and dtype, broadcast to the batch shape.

    The one radius rule of this module, for floats and tensors alike: a radius is a real
    number >= 0 (NaN refused). +inf is allowed and means the limit: the max for the chi-square
    and KL balls, the mean for a KL temperature; the Wasserstein forms, whose limit is
    infinite, ask for a ``finite`` one (as :class:`Wasserstein` does). A radius tensor that
    requires grad is refused unless the value is ``differentiable`` in it (the Wasserstein
    forms, closed forms in rho): the balls are solved without autograd, and a gradient
    silently lost would read as a zero derivative.

    Raises:
        TypeError: not a real number or a real tensor.
        ValueError: NaN, negative, infinite where ``finite``, requiring grad where not
            ``differentiable``, or a shape that does not broadcast to the batch.
    """
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real | Tensor):
        raise TypeError(f"{name} must be a real number or a tensor, got {type(rho).__name__}")
    if isinstance(rho, Tensor) and (rho.is_complex() or rho.dtype == torch.bool):
        raise TypeError(f"{name} must be real, got dtype {rho.dtype}")
    if isinstance(rho, Tensor) and rho.requires_grad and not differentiable:
        raise ValueError(f"{name} requires grad, but this worst case is solved without "
                         f"autograd and has no gradient in {name}: pass {name}.detach()")
    r = torch.as_tensor(rho, dtype=like.dtype, device=like.device)
    if bool(torch.isnan(r).any()):
        raise ValueError(f"{name} must not be NaN (a radius is a number >= 0)")
    if bool((r < 0).any()):
        raise ValueError(f"{name} must be non-negative, got {rho}")
    if finite and bool(torch.isinf(r).any()):
        raise ValueError(f"{name} must be finite (an infinite transport budget moves every "
                         f"input anywhere), got {rho}")
    try:
        return torch.broadcast_to(r, like.shape[:-1])
    except RuntimeError as err:
        raise ValueError(f"{name} of shape {tuple(r.shape)} does not broadcast to the batch "
                         f"shape {tuple(like.shape[:-1])}") from err


def _check_weights(weights: Tensor | None, losses: Tensor, name: str = "losses"
                   ) -> Tensor | None:
    """The weights as one probability vector p per problem, expanded to ``losses.shape``;
    None stays None (the uniform P_n).

    Every rule is checked before any work. Each problem's weights are divided by their
    largest before summing, so that neither huge weights (whose sum overflows) nor subnormal
    ones lose the problem's mass; that is done in the wider of the two dtypes, and p comes
    back in the dtype the losses are solved in (float32 for half precision). Detached: the
    weights are data.
    """
    if weights is None:
        return None
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got dtype {weights.dtype}")
    if weights.device != losses.device:
        raise ValueError(f"weights must be on the device of {name} ({losses.device}), got "
                         f"{weights.device}")
    try:
        broadcasts = torch.broadcast_shapes(weights.shape, losses.shape) == losses.shape
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not broadcast to {name} "
                         f"of shape {tuple(losses.shape)}")
    # Spread a weight shared by every sample (a last dimension of 1) before normalising.
    w = weights.detach().reshape(weights.shape or (1,))
    w = w.expand(*w.shape[:-1], losses.shape[-1])
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weights must be finite (they contain NaN or infinity)")
    if bool((w < 0).any()):
        raise ValueError("weights must be non-negative")
    top = w.amax(-1, keepdim=True)
    empty = torch.broadcast_to(top[..., 0] == 0, losses.shape[:-1])
    if bool(empty.any()):
        if empty.ndim == 0:
            raise ValueError("weights must not be all zero")
        first = tuple(empty.nonzero()[0].tolist())
        raise ValueError(f"weights are all zero in {int(empty.sum())} of {empty.numel()} "
                         f"problems (first at batch index {first})")
    dtype = torch.float32 if losses.dtype in _HALF else losses.dtype
    w = w.to(torch.promote_types(w.dtype, dtype))
    w = w / top.to(w.dtype)
    return (w / w.sum(-1, keepdim=True)).to(dtype).expand(losses.shape)


def _weighted_mean(x: Tensor, prob: Tensor | None) -> Tensor:
    """E_P[x] over the last dimension: the plain mean when prob is None (P_n)."""
    if prob is None:
        return x.mean(-1)
    return _row_dot(x, prob.to(x.dtype))


def _mass(inside: Tensor, prob: Tensor) -> Tensor:
    """P(inside) for a boolean mask over the samples."""
    return torch.where(inside, prob, 0.0).sum(-1)


def _on_support(losses: Tensor, prob: Tensor) -> Tensor:
    """losses with every zero-weight sample moved to the smallest loss of positive weight.

    Still weighted 0, such a sample can then be neither the row's max nor its min: the
    normalisation (and with it the precision of the solve), the argmax and the max regime
    are those of the support alone, whatever the absent losses are.
    """
    absent = prob == 0
    low = losses.masked_fill(absent, math.inf).amin(-1, keepdim=True)
    return torch.where(absent, low, losses)


def _at_max(z: Tensor, prob: Tensor | None) -> Tensor:
    """The argmax of normalised rows z (max 0), restricted to the support when weighted."""
    return z == 0 if prob is None else (z == 0) & (prob > 0)


def _at_float32(solve: Callable[..., DROResult], losses: Tensor, radius: float | Tensor,
                prob: Tensor | None = None) -> DROResult:
    """Solve half-precision losses in float32 and return the input's dtype.

    float16 cannot hold the solvers' sums (65504 is its max: a 65536-sample mean overflows)
    nor resolve their differences, so the solve runs at float32 and only the answer is
    rounded back. Gradients flow through both casts.
    """
    if isinstance(radius, Tensor):
        radius = radius.float()
    result = solve(losses.float(), radius, weights=prob)
    return DROResult(*(t.to(losses.dtype) for t in result))


def _with_danskin_gradient(value: Tensor, weights: Tensor, losses: Tensor) -> Tensor:
    """value, carrying d value / d l = weights (weights held fixed) when losses need grad."""
    if not losses.requires_grad:
        return value
    return value + (weights * (losses - losses.detach())).sum(-1)


class _Scale(NamedTuple):
    """l = shift + scale * z / factor for the normalised losses z in [-1, 0] (max 0)."""

    shift: Tensor
    scale: Tensor
    factor: Tensor

    def restore(self, value_z: Tensor) -> Tensor:
        """A location (value, eta) back in the losses' units."""
        return (self.shift * self.factor + self.scale * value_z) / self.factor

    def restore_spread(self, spread_z: Tensor) -> Tensor:
        """A spread (tau) back in the losses' units."""
        return self.scale * spread_z / self.factor


def _normalise(losses: Tensor) -> tuple[Tensor, _Scale]:
    """z = (l - max) / (max - min) per row (a flat row gets scale 1), and how to undo it.

    Solving on this scale keeps 1e30-sized losses from overflowing squares and
    exponentials, and keeps small spreads on large offsets exact to rounding. Rows whose
    spread overflows are first multiplied by 1/4, which is exact. One new tensor of the
    input's size is allocated.
    """
    hi = losses.amax(-1, keepdim=True)
    lo = losses.amin(-1, keepdim=True)
    factor = torch.where(torch.isinf(hi - lo), 0.25, 1.0).to(losses.dtype)
    scale = hi * factor - lo * factor
    scale = torch.where(scale > 0, scale, 1.0)
    z = (losses * factor).sub_(hi * factor).div_(scale)
    return z, _Scale(hi.squeeze(-1), scale.squeeze(-1), factor.squeeze(-1))


def _finish_weights(weights: Tensor, is_max: Tensor, on_max: Tensor, is_mean: Tensor,
                    prob: Tensor | None = None) -> Tensor:
    """Normalise weights in place and overwrite the rows whose worst case is the max
    (P restricted to the argmax ``is_max``: uniform on it for P_n) or the mean (P). Works
    in place so that no second tensor of the input's size is alive (for P_n)."""
    n = weights.shape[-1]
    on_max, is_mean = on_max.unsqueeze(-1), is_mean.unsqueeze(-1)
    top = is_max & on_max
    weights.masked_fill_(on_max, 0.0).add_(top if prob is None else torch.where(top, prob, 0.0))
    weights.div_(weights.sum(-1, keepdim=True).masked_fill_(is_mean, 1.0))
    if prob is None:
        return weights.masked_fill_(is_mean, 1.0 / n)
    return torch.where(is_mean, prob, weights)


# ---------------------------------------------------------------------- chi-square


def _at_rank(k: Tensor, t: Tensor) -> Tensor:
    """t at the 1-based positions (ranks) k along the last dimension."""
    return t.gather(-1, (k - 1).unsqueeze(-1)).squeeze(-1)


def _last_breakpoint_above(ties: Tensor, n: int,
                           derivative_positive: Callable[[Tensor], Tensor]) -> Tensor:
    """J = max{j : eta* < s_j} for rows sorted descending, by binary search on the sign of
    g'(s_j), which is monotone in j: true for j <= ties (those equal the max and eta* < max
    off on_max rows), false at j = n + 1 (s_{n+1} = -inf). The iteration count depends on n
    only, never on the data."""
    lo, hi = ties.clone(), torch.full_like(ties, n + 1)
    for _ in range(math.ceil(math.log2(n + 1))):
        active = hi - lo > 1
        mid = torch.where(active, (lo + hi) // 2, 2).clamp(2, max(n, 2))
        pos = derivative_positive(mid) if n >= 2 else torch.zeros_like(active)
        lo = torch.where(active & pos, mid, lo)
        hi = torch.where(active & ~pos, mid, hi)
    return lo


def _chi2_solve(z: Tensor, rho: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Minimise g(eta) = eta + c sqrt(mean((z - eta)_+^2)) exactly, for rows of z with max 0.

    g is convex, and C^1 below max(z). With z sorted descending (s_1 >= ... >= s_n) and the
    top k values above eta, g'(eta) = 1 - c sqrt(k/n) (m_k - eta) / sqrt((m_k - eta)^2 + v_k)
    (m_k, v_k: mean and variance of the top k), so the stationary point on that piece is
    eta_k = m_k - sqrt(n v_k / (c^2 k - n)). The piece holding eta* is found by a binary
    search over the breakpoints on the sign of g'(s_j), which is monotone in j; each probe
    reads the prefix sums at one index, so nothing larger than the input is built.

    Returns:
        (eta*, value, on_max), each of shape z.shape[:-1]; on_max marks rows whose worst
        case is the max (c^2 #argmax >= n), where eta* = value = 0.
    """
    n = z.shape[-1]
    s = torch.sort(z, dim=-1, descending=True).values
    del z  # the caller passes its only reference: free it before building prefix sums
    # Prefix sums relative to the max (s_1 = 0): the top-k variance computed from them loses
    # at most a factor (k + 1) of machine precision, since v_k >= (s_1 - m_k)^2 / k.
    p1 = s.cumsum(-1)
    p2 = s.square().cumsum_(-1)
    top = _at_rank

    def derivative_positive(j: Tensor) -> Tensor:
        """g'(s_j) > 0, from the top j - 1 values (j in [2, n])."""
        k = j - 1
        a1, a2, sj, kf = top(k, p1), top(k, p2), top(j, s), k.to(s.dtype)
        first = a1 - kf * sj  # sum_{i<j} (s_i - s_j)
        second = a2 - 2 * sj * a1 + kf * sj * sj  # sum_{i<j} (s_i - s_j)^2
        # g'(s_j) >= 1 - c sqrt(k / n) > 0 whenever c^2 k < n, whatever the data. Say so
        # directly: the squares underflow when s_j is within 1e-154 of the max.
        return ((kf - n) + 2 * rho * kf < 0) | ((1 + 2 * rho) * first * first < n * second)

    ties = (s == 0).sum(-1, dtype=torch.int32).to(torch.int64)
    on_max = ties + 2 * rho * ties >= n
    k = _last_breakpoint_above(ties, n, derivative_positive)

    kf = k.to(s.dtype)
    a1, a2 = top(k, p1), top(k, p2)
    m = a1 / kf
    v = (a2 / kf - m * m).clamp_min(0)
    upper = top(k, s)
    lower = torch.where(k < n, top((k + 1).clamp(max=n), s), -math.inf)
    # c^2 k - n written so that it stays exact when 1 + 2 rho rounds to 1.
    excess = ((kf - n) + 2 * rho * kf).clamp_min(0)
    stationary = m - torch.sqrt(n * v / excess.clamp_min(torch.finfo(s.dtype).tiny))
    eta = torch.minimum(torch.maximum(stationary, lower), upper)
    # At an interior stationary point g = m_k + sqrt(v_k (c^2 k - n) / n) (no cancellation
    # even when eta* is far below the data, as for tiny rho); on a clamped end, g(eta) from
    # the top-k prefix sums is exact.
    sq = (a2 - 2 * eta * a1 + kf * eta * eta).clamp_min(0)
    value = torch.where(stationary == eta, m + torch.sqrt(v * excess / n),
                        eta + torch.sqrt((1 + 2 * rho) * sq / n))
    zero = torch.zeros_like(eta)
    return torch.where(on_max, zero, eta), torch.where(on_max, zero, value), on_max


def _chi2_solve_weighted(z: Tensor, rho: Tensor, prob: Tensor
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_chi2_solve` around the weighted P: minimise
    g(eta) = eta + c sqrt(E_P[(z - eta)_+^2]) for rows of z with max 0 in P's support.

    The same search, but not the same prefix sums: the top-k variance from prefix sums of
    p s and p s^2 loses a factor W_k / p_1 of precision (W_k: the top-k mass), and with
    weights the max may weigh next to nothing (its excess is then lost, and with it the
    worst case's weights). Instead, with z sorted descending and the gaps d_k = s_k -
    s_{k+1} >= 0, the top-k sums about the piece's upper end s_k,

        F_k = sum_{i<=k} p_i (s_i - s_k),   S_k = sum_{i<=k} p_i (s_i - s_k)^2,

    are prefix sums of non-negative increments, F_{k+1} = F_k + W_k d_k and
    S_{k+1} = S_k + d_k (2 F_k + W_k d_k), exact to a factor n of machine precision.
    g'(s_k) > 0 iff c^2 F_k^2 < S_k. Below s_k, with eta = s_k - x and E = c^2 W_k - 1,
    g'(eta) = 0 is W E x^2 + 2 F E x = S - c^2 F^2 =: D, whose root is taken as
    x = D / (sqrt(E) (F sqrt(E) + sqrt(F^2 E + W D))) (no cancellation), and there
    g = s_k + c^2 F + E x, a sum of terms within the losses' range even when eta* lies far
    below the data (tiny rho). Masses are P's (total 1); E = 2 rho W_k - R_k with R_k the
    mass below the top k (a suffix sum), exact when 1 + 2 rho rounds to 1.

    Builds several tensors of the input's size (sorted weights, masses, gaps, F, S).

    Returns:
        (eta*, value, on_max, s_k, y) with eta* = s_k - y: the excess of a loss,
        (z - s_k) + y, keeps y's precision when eta* lies a hair below s_k (as when the max
        weighs next to nothing), where z - eta* would round it away.
    """
    n = z.shape[-1]
    s, order = torch.sort(z, dim=-1, descending=True)
    del z
    ps = prob.gather(-1, order)
    del order
    mass = ps.cumsum(-1)  # W_k at rank k
    from_rank = ps.flip(-1).cumsum_(-1).flip(-1)  # the mass at rank k and below
    del ps
    gap = s[..., :-1] - s[..., 1:]
    step = mass[..., :-1] * gap
    zeros = torch.zeros_like(s[..., :1])
    first = torch.cat([zeros, step.cumsum(-1)], -1)  # F at rank k
    second = torch.cat([zeros, (gap * step.add_(first[..., :-1], alpha=2)).cumsum_(-1)], -1)
    del gap, step
    c2 = 1 + 2 * rho
    top = _at_rank

    def masses(k: Tensor) -> tuple[Tensor, Tensor]:
        """(W_k, R_k): the mass of the top k and of the rest."""
        return top(k, mass), torch.where(k < n, top((k + 1).clamp(max=n), from_rank), 0.0)

    def derivative_positive(j: Tensor) -> Tensor:
        """g'(s_j) > 0, from the top j - 1 values (j in [2, n])."""
        w, r = masses(j - 1)
        f = top(j, first)
        # g'(s_j) >= 1 - c sqrt(W) > 0 whenever c^2 W < 1, whatever the data.
        return (2 * rho * w - r < 0) | (c2 * f * f < top(j, second))

    ties = (s == 0).sum(-1, dtype=torch.int32).to(torch.int64)
    w, r = masses(ties)
    on_max = 2 * rho * w >= r
    k = _last_breakpoint_above(ties, n, derivative_positive)

    w, r = masses(k)
    f, sq = top(k, first), top(k, second)
    upper = top(k, s)
    lower = torch.where(k < n, top((k + 1).clamp(max=n), s), -math.inf)
    excess = 2 * rho * w - r  # c^2 W_k - 1
    d = (sq - c2 * f * f).clamp_min(0)
    root_e = excess.clamp_min(0).sqrt()
    denominator = f * root_e + torch.sqrt(f * f * excess.clamp_min(0) + w * d)
    # No stationary point on the piece (E <= 0): g' > 0 there, the minimum is its lower end.
    x = torch.where(excess > 0, torch.where(d > 0, d / (root_e * denominator), 0.0), math.inf)
    e_x = torch.where(d > 0, root_e * d / denominator, 0.0)  # E x, finite as E -> 0
    y = torch.minimum(x, upper - lower)  # eta* = s_k - y, clamped to the piece
    eta = upper - y
    value = torch.where(x == y, upper + c2 * f + e_x,
                        eta + torch.sqrt(c2 * (sq + y * (2 * f + w * y))))
    eta, value, upper, y = (torch.where(on_max, 0.0, t) for t in (eta, value, upper, y))
    return eta, value, on_max, upper, y


def _chi2_solve_in_chunks(z: Tensor, rho: Tensor, prob: Tensor | None = None
                          ) -> tuple[Tensor, ...]:
    """_chi2_solve (_chi2_solve_weighted around a weighted P) on a quarter of the problems
    at a time when they are large (a loop over chunks of problems, never over samples): the
    sort's workspace (about 7x its input on CUDA) then stays within the 4x memory budget of
    the whole solve (for P_n). Small inputs are solved whole, where the per-call overhead
    would dominate."""
    n = z.shape[-1]
    rows, radii = z.reshape(-1, n), rho.reshape(-1)
    probs = None if prob is None else prob.reshape(-1, n)
    del z
    chunks = _CHI2_CHUNKS if rows.numel() >= _CHI2_CHUNKED_SIZE else 1
    step = max(1, -(-rows.shape[0] // chunks))
    parts = [_chi2_solve(rows[i : i + step], radii[i : i + step]) if probs is None
             else _chi2_solve_weighted(rows[i : i + step], radii[i : i + step],
                                       probs[i : i + step])
             for i in range(0, rows.shape[0], step)]
    return tuple(torch.cat(p).reshape(rho.shape) for p in zip(*parts, strict=True))


def chi2_worst_case(losses: Tensor, rho: float | Tensor, *, weights: Tensor | None = None
                    ) -> DROResult:
    """Worst-case mean over the chi-square ball 1/2 E_P[(dQ/dP - 1)^2] <= rho around P.

    P is P_n (uniform) or, with ``weights``, sum_i p_i delta_i for the weights normalised
    per problem. value = inf_eta eta + sqrt(1 + 2 rho) sqrt(E_P[(l - eta)_+^2]), solved
    exactly by sorting and a closed-form stationary point on each piece (O(n log n)). When
    no weight is clipped this equals E_P l + sqrt(2 rho Var_P(l)); once
    (1 + 2 rho) P(argmax) >= 1 (for P_n: rho >= (n / #argmax - 1) / 2) it equals the max
    over the support.

    Args:
        losses: ``(..., n)`` per-sample losses, any floating dtype (half precision is solved
            in float32 and returned in its own dtype), any device.
        rho: radius >= 0, a float or a tensor broadcastable to ``losses.shape[:-1]``.
        weights: None (P_n) or the weights of P, a floating tensor broadcastable to
            ``losses.shape`` (``(n,)`` is shared by every problem), non-negative, finite and
            not all zero in a problem, on the losses' device; normalised per problem. A zero
            weight removes its sample. Data: no gradient flows to them.

    Returns:
        DROResult with value ``(...)``, weights ``(..., n)`` proportional to
        p_i (l_i - eta*)_+ (P restricted to the argmax when the worst case is the max) and
        dual eta* (-inf at rho = 0, where the worst case is the mean E_P l).

    Raises:
        TypeError: weights that are not a floating-point tensor.
        ValueError: empty last dimension or batch, NaN or infinite losses, negative or NaN
            rho, a rho tensor that requires grad (no gradient flows to the radius); weights
            of another shape or device, negative, non-finite or all zero in a problem.

    Example:
        >>> import torch
        >>> from drosim.dro import chi2_worst_case
        >>> l = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
        >>> r = chi2_worst_case(l, 0.1)
        >>> round(float(r.value), 6), round(float(l.mean() + (0.2 * l.var(False)).sqrt()), 6)
        (2.0, 2.0)
        >>> float(chi2_worst_case(l, 10.0).value)
        3.0
        >>> # weight 2 on the last loss is that loss twice; weight 0 removes the first one
        >>> w = torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=torch.float64)
        >>> twice = torch.tensor([1.0, 2.0, 3.0, 3.0], dtype=torch.float64)
        >>> r = chi2_worst_case(l, 0.1, weights=w)
        >>> bool(torch.isclose(r.value, chi2_worst_case(twice, 0.1).value)), float(r.weights[0])
        (True, 0.0)
    """
    _check_losses(losses)
    prob = _check_weights(weights, losses)
    if losses.dtype in _HALF:
        return _at_float32(chi2_worst_case, losses, rho, prob)
    rho_t = _as_radius(rho, losses)
    with torch.no_grad():
        detached = losses.detach() if prob is None else _on_support(losses.detach(), prob)
        eta_z, value_z, on_max, *piece = _chi2_solve_in_chunks(_normalise(detached)[0], rho_t,
                                                              prob)
        # Rebuild the normalised losses rather than keep them through the solve (memory).
        z, scale = _normalise(detached)
        is_max = _at_max(z, prob)
        is_mean = rho_t == 0
        value_z = torch.where(is_mean, _weighted_mean(z, prob), value_z)
        if prob is None:
            weights = z.sub_(eta_z.unsqueeze(-1)).clamp_min_(0)  # (l - eta*)_+, z's storage
        else:  # p (l - eta*)_+ as p ((l - s_k) + y), see _chi2_solve_weighted
            upper, below = (t.unsqueeze(-1) for t in piece)
            weights = z.sub_(upper).add_(below).clamp_min_(0).mul_(prob)
        # Rounding can leave no excess right at the max: the worst case is then the argmax.
        on_max = on_max | (weights.sum(-1) <= 0)
        # eta* = -inf (a subnormal rho overflows sqrt(n v / excess)) is the uniform limit.
        weights = _finish_weights(weights, is_max, on_max, is_mean | torch.isinf(eta_z), prob)
        value = scale.restore(value_z)
        dual = torch.where(is_mean, -math.inf, scale.restore(eta_z))
    return DROResult(_with_danskin_gradient(value, weights, losses), weights, dual)


# ------------------------------------------------------------------------------ KL


def _tilt(z: Tensor, mean: Tensor, tau: Tensor, prob: Tensor | None = None
          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exponential tilt of normalised rows z (max 0, row means ``mean`` under P) at
    temperature tau; P is P_n, or ``prob``.

    Returns (t, g, log E_P exp(t), warm) with t = (z - shift) / tau and, per row, either
    shift = 0 when tau < -mean (a cold tilt: t <= 0 keeps the gaps below the max exact,
    g = exp(t)), or shift = mean (a warm tilt: g = expm1(t), which keeps the tiny tilts of
    large temperatures, i.e. small radii, to relative precision). exp(t) = g + warm.

    Weighted, the tilt is warm down to tau = -mean / _WARM_EXPONENT: a max of tiny weight
    makes the KL small at small temperatures as well, where the cold tilt's
    E_q t - log E_P exp(t) cancels to eps / tau. A warm tilt keeps E_P exp(t) >= 1
    (Jensen) and its exponents below _WARM_EXPONENT, so nothing overflows.
    """
    n = z.shape[-1]
    warm = tau >= -mean if prob is None else tau * _WARM_EXPONENT >= -mean
    shift = torch.where(warm, mean, 0.0)
    t = (z - shift.unsqueeze(-1)).div_(tau.unsqueeze(-1))
    if prob is None:
        g = torch.expm1(t).add_((~warm).to(t.dtype).unsqueeze(-1))
    else:
        # exp(t) = expm1(t) + 1 is exact to 1e-16 absolute, enough when the max's term
        # (1 / n, times exp(0)) keeps E_P exp(t) >= 1 / n; a max of tiny weight p_max does
        # not, and its cold tilt needs exp(t) to relative precision.
        g = torch.where(warm.unsqueeze(-1), torch.expm1(t), torch.exp(t))
    g_mean = g.sum(-1) / n if prob is None else _row_dot(g, prob)
    log_mean_exp = torch.where(warm, torch.log1p(g_mean), torch.log(g_mean))
    return t, g, log_mean_exp, warm


def _kl_of_tilt(z: Tensor, mean: Tensor, u: Tensor, prob: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For Q_tau proportional to p exp(z / tau), tau = e^u: KL(Q_tau || P), Var_Q(z / tau)
    (= -d KL / d u), and log E_P exp(t), warm as in :func:`_tilt`. Two tensors of z's size
    besides z (three when weighted)."""
    n = z.shape[-1]
    t, g, log_mean_exp, warm = _tilt(z, mean, u.exp(), prob)
    ones = warm.to(z.dtype)  # exp(t) = g + ones
    # Sums of p_i t_i and of p_i: in units of 1/n for P_n, so no product tensor is built.
    pt, mass, g_mass = (t, n, g.sum(-1)) if prob is None else (t * prob, 1.0, _row_dot(g, prob))
    total = g_mass + mass * ones
    mean_t = (ones * pt.sum(-1) + _row_dot(g, pt)) / total
    second = (ones * _row_dot(pt, t) + _row_dot(g.mul_(pt), t)) / total
    kl = mean_t - log_mean_exp  # KL = E_q[t] - log E_P exp(t), whatever the shift
    return kl, (second - mean_t.square()).clamp_min(0), log_mean_exp, warm


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_i a_i b_i over the last dimension, without an elementwise product tensor."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).reshape(a.shape[:-1])


def _kl_max_radius(is_max: Tensor, prob: Tensor | None, dtype: torch.dtype) -> Tensor:
    """-log P(argmax), the KL radius from which the worst case is the max: log(n / #argmax)
    for P_n; log1p(P(rest) / P(argmax)) when weighted, exactly 0 on a flat support."""
    if prob is None:
        return torch.log(is_max.shape[-1] / is_max.sum(-1).to(dtype))
    return torch.log1p(_mass(~is_max, prob) / _mass(is_max, prob))


def _kl_solve(z: Tensor, mean: Tensor, rho: Tensor, start: Tensor | None = None,
              prob: Tensor | None = None) -> Tensor:
    """u* = log tau* solving KL(Q_tau || P) = rho, Q_tau proportional to p exp(z / tau),
    for rows z in [-1, 0] (P = P_n, or ``prob``, whose support holds the max).

    Newton on log KL(u) = log rho, which is nearly linear in u for large tau (where
    KL ~ Var_P(z) / (2 tau^2)), safeguarded by a bracket on which KL decreases: at
    tau_hi = 1 / sqrt(8 rho) the KL is at most rho (at most range^2 / (8 tau^2) by
    Hoeffding's lemma), and at tau_lo = e^-60 it is within rounding of -log P(argmax),
    above rho on the rows solved. A step that leaves the bracket bisects it instead.
    ``start`` (a guess of u*, e.g. the previous solve of a nearby problem) replaces the
    right end of the bracket as the first iterate.
    """
    tiny = torch.finfo(z.dtype).tiny
    log_rho = torch.log(rho.clamp_min(tiny))
    u_hi = -0.5 * torch.log(8 * rho.clamp_min(tiny)) + 0.1
    u_lo = torch.minimum(torch.full_like(u_hi, -60.0 if z.dtype == torch.float64 else -30.0),
                         u_hi - 1)
    # Start right of the root, where KL <= rho: log KL is concave in u there and on the way,
    # so Newton's iterates approach the root from the right without overshooting.
    u = u_hi if start is None else torch.nan_to_num(start, nan=math.inf).clamp(u_lo, u_hi)
    eps = torch.finfo(z.dtype).eps
    for _ in range(_KL_ITERATIONS):
        kl, var_t, _, _ = _kl_of_tilt(z, mean, u, prob)
        above = kl > rho  # u is left of the root
        u_lo = torch.where(above, u, u_lo)
        u_hi = torch.where(above, u_hi, u)
        log_kl = torch.log(kl.clamp_min(tiny))
        newton = u + (log_kl - log_rho) * kl / var_t.clamp_min(tiny)
        # Inclusive: at convergence Newton lands on a bracket end to rounding.
        inside = (newton >= u_lo) & (newton <= u_hi)
        if prob is not None:
            # A max of tiny weight can leave the KL below its own rounding (the weighted
            # mean's, over tau) right of the root; a KL rounded to 0 gives Newton no step.
            inside &= kl > 0
        u_next = torch.where(inside, newton, 0.5 * (u_lo + u_hi))
        # On the CPU a convergence test is free (no device sync), and small problems are
        # dominated by the per-iteration dispatch: stop once every row stands still.
        # A Newton step below 1e-12 (relative) leaves u* exact to the KL's own rounding
        # (the next would be its square); near the root rounding can also make the iterates
        # dither, or alternate between the two ends of a bracket a few ulps wide.
        ulps = max(8 * eps, 1e-12) * (1 + u.abs())
        converged = z.device.type == "cpu" and bool(
            (((u_next - u).abs() <= ulps) | (u_hi - u_lo <= ulps)).all())
        u = u_next
        if converged:
            break
    return u


def _weighted_var(z: Tensor, mean: Tensor, prob: Tensor | None) -> Tensor:
    """Var_P(z) about its mean ``mean`` (the population variance for P_n)."""
    if prob is None:
        return z.var(-1, unbiased=False)
    return _row_dot((z - mean.unsqueeze(-1)).square(), prob)


def kl_worst_case(losses: Tensor, rho: float | Tensor, *, weights: Tensor | None = None
                  ) -> DROResult:
    """Worst-case mean over the KL ball KL(Q || P) <= rho around P.

    P is P_n (uniform) or, with ``weights``, sum_i p_i delta_i for the weights normalised
    per problem. value = inf_{tau > 0} tau rho + tau log E_P[exp(l / tau)], weights
    q_i proportional to p_i exp(l_i / tau*) (softmax(l / tau*) for P_n). tau* solves
    KL(q_tau || P) = rho by safeguarded Newton in log tau; when rho >= -log P(argmax)
    (for P_n: log(n / #argmax)) the worst case is the max over the support, with tau* = 0
    and P restricted to the argmax as weights; rho = 0 gives E_P l with tau* = inf.

    Args:
        losses: ``(..., n)`` per-sample losses, any floating dtype (half precision is solved
            in float32 and returned in its own dtype), any device.
        rho: radius >= 0, a float or a tensor broadcastable to ``losses.shape[:-1]``.
        weights: None (P_n) or the weights of P, a floating tensor broadcastable to
            ``losses.shape``, non-negative, finite, not all zero in a problem, on the
            losses' device; normalised per problem. A zero weight removes its sample. Data:
            no gradient flows to them.

    Returns:
        DROResult with value ``(...)``, weights ``(..., n)`` and dual tau* ``(...)``.

    Raises:
        TypeError: weights that are not a floating-point tensor.
        ValueError: empty last dimension or batch, NaN or infinite losses, negative or NaN
            rho, a rho tensor that requires grad (no gradient flows to the radius); weights
            of another shape or device, negative, non-finite or all zero in a problem.

    Example:
        >>> import torch
        >>> from drosim.dro import kl_worst_case
        >>> l = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
        >>> r = kl_worst_case(l, 0.05)
        >>> bool(l.mean() < r.value < l.max()), abs(float((r.weights * l).sum() - r.value)) < 1e-12
        (True, True)
        >>> float(kl_worst_case(l, 2.0).value), float(kl_worst_case(l, 2.0).dual)
        (3.0, 0.0)
        >>> # P = (0, 1/4, 1/4, 1/2): the max once rho >= -log P(l = 3) = log 2
        >>> w = torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=torch.float64)
        >>> [round(float(kl_worst_case(l, rho, weights=w).value), 4) for rho in (0.69, 0.7)]
        [2.9996, 3.0]
    """
    _check_losses(losses)
    prob = _check_weights(weights, losses)
    if losses.dtype in _HALF:
        return _at_float32(kl_worst_case, losses, rho, prob)
    rho_t = _as_radius(rho, losses)
    with torch.no_grad():
        z, scale = _normalise(losses.detach() if prob is None
                              else _on_support(losses.detach(), prob))
        is_max = _at_max(z, prob)
        on_max = rho_t >= _kl_max_radius(is_max, prob, z.dtype)
        is_mean = (rho_t == 0) & ~on_max
        mean_z = _weighted_mean(z, prob)
        var_z = _weighted_var(z, mean_z, prob)
        # Below _KL_SMALL_RADIUS the KL is too close to rounding to solve for; there
        # tau* = sqrt(Var / (2 rho)) and value = mean + sqrt(2 rho Var) hold up to O(rho).
        small = rho_t < _KL_SMALL_RADIUS[z.dtype]
        if prob is not None:
            # The expansion needs tau* far above the spread (1 here): a max of tiny weight
            # has a tiny variance, and there the tilt is solved for instead.
            small &= var_z >= 2e6 * rho_t
        tiny = torch.finfo(z.dtype).tiny
        u = torch.where(small, 0.5 * torch.log(var_z.clamp_min(tiny) / (2 * rho_t.clamp_min(tiny))),
                        _kl_solve(z, mean_z, rho_t, prob=prob))
        _, _, log_mean_exp, warm = _kl_of_tilt(z, mean_z, u, prob)
        tau_z = u.exp()
        value_z = torch.where(small, mean_z + torch.sqrt(2 * rho_t * var_z),
                              torch.where(warm, mean_z, 0.0) + tau_z * (rho_t + log_mean_exp))
        logits = z.div_(tau_z.unsqueeze(-1))
        weights = torch.softmax(logits if prob is None else logits.add_(prob.log()), -1)
        weights = _finish_weights(weights, is_max, on_max, is_mean, prob)
        value_z = torch.where(on_max, 0.0, torch.where(is_mean, mean_z, value_z))
        tau_z = torch.where(on_max, 0.0, torch.where(is_mean, math.inf, tau_z))
        value = scale.restore(value_z)
        dual = scale.restore_spread(tau_z)
    return DROResult(_with_danskin_gradient(value, weights, losses), weights, dual)


def kl_tilted(losses: Tensor, tau: float | Tensor, *, weights: Tensor | None = None
              ) -> DROResult:
    """Fixed-temperature KL penalty: tau * log E_P[exp(l / tau)], weights q_i proportional
    to p_i exp(l_i / tau) (softmax(l / tau) for P_n).

    This is the penalised (Lagrangian) form sup_Q E_Q[l] - tau KL(Q || P) used by KL-DPO
    and the authors' KL-REBEL; tau = 0 gives the max over the support, tau = inf E_P l.
    P is P_n (uniform) or, with ``weights``, sum_i p_i delta_i.

    Args:
        losses: ``(..., n)`` per-sample losses.
        tau: temperature >= 0, float or tensor broadcastable to ``losses.shape[:-1]``.
        weights: None (P_n) or the weights of P, a floating tensor broadcastable to
            ``losses.shape``, non-negative, finite, not all zero in a problem, on the
            losses' device; normalised per problem. A zero weight removes its sample. Data:
            no gradient flows to them.

    Returns:
        DROResult with value ``(...)``, weights ``(..., n)`` and dual = tau.

    Raises:
        TypeError: weights that are not a floating-point tensor.
        ValueError: empty last dimension or batch, NaN or infinite losses, negative or NaN
            tau, a tau tensor that requires grad; weights of another shape or device,
            negative, non-finite or all zero in a problem.

    Example:
        >>> import torch
        >>> from drosim.dro import kl_tilted
        >>> l = torch.tensor([0.0, 1.0], dtype=torch.float64)
        >>> import math
        >>> abs(float(kl_tilted(l, 1.0).value) - math.log((1 + math.e) / 2)) < 1e-12
        True
        >>> w = torch.tensor([3.0, 1.0], dtype=torch.float64)  # P = (3/4, 1/4)
        >>> abs(float(kl_tilted(l, 1.0, weights=w).value) - math.log((3 + math.e) / 4)) < 1e-12
        True
    """
    _check_losses(losses)
    prob = _check_weights(weights, losses)
    if losses.dtype in _HALF:
        return _at_float32(kl_tilted, losses, tau, prob)
    tau_t = _as_radius(tau, losses, "tau")
    with torch.no_grad():
        z, scale = _normalise(losses.detach() if prob is None
                              else _on_support(losses.detach(), prob))
        is_max = _at_max(z, prob)
        tau_z = scale.factor * tau_t / scale.scale  # 0 when tau underflows on this scale
        cold, flat = tau_z == 0, torch.isinf(tau_z)  # the max and the mean
        mean_z = _weighted_mean(z, prob)
        _, weights, log_mean_exp, warm = _tilt(z, mean_z, torch.where(cold | flat, 1.0, tau_z),
                                               prob)
        del z
        weights.add_(warm.to(weights.dtype).unsqueeze(-1))  # exp(t), normalised below
        if prob is not None:
            weights.mul_(prob)
        weights = _finish_weights(weights, is_max, cold, flat, prob)
        value_z = torch.where(cold, 0.0, torch.where(flat, mean_z, torch.where(warm, mean_z, 0.0)
                                                     + tau_z * log_mean_exp))
        value = scale.restore(value_z)
    return DROResult(_with_danskin_gradient(value, weights, losses), weights, tau_t.clone())


# ----------------------------------------------------------------------- Wasserstein


def wasserstein_linear_sq_worst_case(
    residuals: Tensor, w: Tensor, rho: float | Tensor
) -> WassersteinResult:
    """Exact type-2 Wasserstein worst case of the squared residual of a linear model.

    With residuals r_i = <w, z_i> - y_i and transport cost ||z - z'||_2^2 on the inputs
    only (W_2(Q, P_n) <= rho),

        sup_Q E_Q[(<w, z> - y)^2] = (sqrt(E_{P_n}[r^2]) + rho ||w||_2)^2

    (Blanchet, Kang & Murthy 2019), attained by moving each z_i by r_i w / (lambda* - ||w||^2).

    Args:
        residuals: ``(..., n)`` residuals r_i.
        w: ``(..., d)`` linear weights (same leading shape as residuals).
        rho: finite radius >= 0, float or tensor broadcastable to ``residuals.shape[:-1]``
            (a tensor may require grad: the value is differentiable in it).

    Returns:
        WassersteinResult with value ``(...)`` (differentiable in residuals, w and rho) and
        dual lambda* ``(...)``.

    Raises:
        ValueError: empty or non-finite residuals or w (or an empty batch), mismatched
            leading shapes, a negative, NaN or infinite rho.

    Example:
        >>> import torch
        >>> from drosim.dro import wasserstein_linear_sq_worst_case
        >>> r = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> w = torch.tensor([3.0, 4.0], dtype=torch.float64)
        >>> float(wasserstein_linear_sq_worst_case(r, w, 0.2).value)
        4.0
    """
    _check_losses(residuals, "residuals")
    _check_losses(w, "w")
    if residuals.shape[:-1] != w.shape[:-1]:
        raise ValueError(f"residuals {tuple(residuals.shape)} and w {tuple(w.shape)} must share "
                         "their leading (batch) shape")
    rho_t = _as_radius(rho, residuals, finite=True, differentiable=True)
    rms = residuals.square().mean(-1).sqrt()
    norm = torch.linalg.vector_norm(w, dim=-1)
    value = (rms + rho_t * norm).square()
    with torch.no_grad():
        # lambda* -> inf as rho -> 0 (the budget constraint then binds with infinite price).
        dual = torch.where(rho_t > 0, norm.square() + norm * rms / rho_t, math.inf)
    return WassersteinResult(value, dual)


def wasserstein_penalty(grad_sq_norms: Tensor, rho: float | Tensor, p: float = 2.0, *,
                        weights: Tensor | None = None) -> Tensor:
    """First-order type-p Wasserstein regulariser rho * (E_P ||grad_z l||_*^q)^(1/q).

    q = p / (p - 1) is the dual exponent (Gao, Chen & Kleywegt 2022); with the Euclidean
    cost the dual norm is Euclidean. For p = 2 this is rho * sqrt(E_P ||grad_z l||^2).
    p = 1 gives rho * max_i ||grad_z l_i|| over the support of P; p = inf gives
    rho * E_P ||grad_z l||. P is P_n (uniform) or, with ``weights``, sum_i p_i delta_i.

    Args:
        grad_sq_norms: ``(..., n)`` squared norms ||grad_z l_i||^2 (differentiable: build
            them with ``create_graph=True`` to train through the penalty).
        rho: finite radius >= 0, float or tensor broadcastable to ``grad_sq_norms.shape[:-1]``
            (a tensor may require grad: the penalty is linear in it).
        p: Wasserstein order in [1, inf], a real number (a Python or NumPy scalar; a
            tensor or a bool is refused, as by :class:`Wasserstein`).
        weights: None (P_n) or the weights of P, a floating tensor broadcastable to
            ``grad_sq_norms.shape``, non-negative, finite, not all zero in a problem, on
            the same device; normalised per problem. A zero weight removes its sample (and
            its gradient). Data: no gradient flows to them.

    Returns:
        The penalty, shape ``grad_sq_norms.shape[:-1]``.

    Raises:
        TypeError: p that is not a real number; weights that are not a floating-point
            tensor.
        ValueError: empty (or an empty batch), non-finite or negative squared norms; a
            negative, NaN or infinite rho; p < 1 or NaN; weights of another shape or
            device, negative, non-finite or all zero in a problem.

    Example:
        >>> import torch
        >>> from drosim.dro import wasserstein_penalty
        >>> float(wasserstein_penalty(torch.tensor([1.0, 9.0, 4.0, 2.0]), 0.5))
        1.0
        >>> w = torch.tensor([1.0, 0.0, 1.0, 0.0])  # P = (1/2, 0, 1/2, 0)
        >>> round(float(wasserstein_penalty(torch.tensor([1.0, 9.0, 4.0, 2.0]), 0.5, weights=w)), 6)
        0.790569
        >>> float(wasserstein_penalty(torch.tensor([1.0, 9.0, 4.0, 2.0]), 0.5, 1.0, weights=w))
        1.0
    """
    _check_losses(grad_sq_norms, "grad_sq_norms")
    prob = _check_weights(weights, grad_sq_norms, "grad_sq_norms")
    if bool((grad_sq_norms < 0).any()):
        raise ValueError("grad_sq_norms must be non-negative (they are squared norms)")
    p = _check_parameter("Wasserstein order p", p, minimum=1.0)
    rho_t = _as_radius(rho, grad_sq_norms, finite=True, differentiable=True)
    if prob is not None:
        # An absent sample counts for nothing, however large its norm (and 0 * inf is NaN).
        grad_sq_norms = grad_sq_norms.masked_fill(prob == 0, 0.0)
    # sqrt has an infinite derivative at 0: differentiate a clamped input instead, which
    # gives gradient 0 where every gradient norm vanishes.
    tiny = torch.finfo(grad_sq_norms.dtype).tiny
    if p == 1:
        norms = _safe_sqrt(grad_sq_norms, tiny)
        return rho_t * norms.amax(-1)
    if math.isinf(p):
        return rho_t * _weighted_mean(_safe_sqrt(grad_sq_norms, tiny), prob)
    if p == 2:
        return rho_t * _safe_sqrt(_weighted_mean(grad_sq_norms, prob), tiny)
    q = p / (p - 1)
    moment = _weighted_mean(_safe_sqrt(grad_sq_norms, tiny).pow(q), prob)
    return rho_t * moment.clamp_min(tiny).pow(1 / q) * (moment > 0)


def _safe_sqrt(x: Tensor, tiny: float) -> Tensor:
    return torch.where(x > 0, x.clamp_min(tiny).sqrt(), torch.zeros_like(x))


# ------------------------------------------------------------------- chi-square, warm


def _chi2_dual_warm(losses: Tensor, rho: Tensor, start: Tensor, prob: Tensor | None = None
                    ) -> Tensor:
    """eta* of the chi-square dual around P (P_n, or ``prob``), from a guess ``start`` (the
    previous eta* of a nearby problem, as in a Newton method on a model's parameters),
    without sorting.

    For a guessed active set A = {i : l_i > eta}, the stationary point of the dual on that
    piece is eta_A = m_A - sqrt(v_A / (c^2 P(A) - 1)) (m_A, v_A: the mean and variance of
    the losses in A under P restricted to A; for P_n, m_A - sqrt(n v_A / (c^2 |A| - n));
    see :func:`_chi2_solve`). When the losses above eta_A are exactly A, eta_A is eta* (g is
    convex and C^1, so a stationary point of its own piece is the minimiser). Each row moves
    to eta_A and tries again; rows not certified after ``_CHI2_WARM_STEPS`` tries are solved
    by the exact sorting solver instead. Rows whose worst case is the max
    (c^2 P(argmax) >= 1, e.g. equal losses) get eta* = max(l) at once, as there. The answer
    is the exact solver's to rounding either way.
    """
    n = losses.shape[-1]
    if prob is not None:
        losses = _on_support(losses, prob)  # the max is the support's
    top = losses.amax(-1)
    z = losses - top.unsqueeze(-1)  # max 0: squares stay small and offsets exact
    if prob is None:
        ties = (z == 0).sum(-1).to(z.dtype)
        on_max = ties + 2 * rho * ties >= n
    else:
        is_max = _at_max(z, prob)
        on_max = 2 * rho * _mass(is_max, prob) >= _mass(~is_max, prob)
    # Sums over the samples are P-weighted when weighted; masses are in units of the total
    # (1 / n for P_n: counts).
    size = n if prob is None else 1.0

    def total(x: Tensor) -> Tensor:
        return x.sum(-1) if prob is None else _row_dot(x, prob)

    eta = start - top
    certified = on_max
    for _ in range(_CHI2_WARM_STEPS):
        active = z > eta.unsqueeze(-1)
        k = active.sum(-1).to(z.dtype) if prob is None else _mass(active, prob)
        below = size - k if prob is None else _mass(~active, prob)
        m = total(torch.where(active, z, 0.0)) / k
        v = total(torch.where(active, z - m.unsqueeze(-1), 0.0).square()) / k
        excess = 2 * rho * k - below  # c^2 P(A) - 1, exact when 1 + 2 rho rounds to 1
        guess = m - torch.sqrt(size * v / excess)
        guess = torch.where(on_max, 0.0, guess)
        certified = on_max | ((excess > 0) & torch.isfinite(guess)
                              & ((z > guess.unsqueeze(-1)) == active).all(-1))
        if bool(certified.all()):
            return guess + top
        eta = torch.where((excess > 0) & torch.isfinite(guess), guess, eta)
    eta = torch.where(certified, guess, eta) + top
    rest = ~certified
    eta[rest] = chi2_worst_case(losses[rest], rho[rest],
                                weights=None if prob is None else prob[rest]).dual
    return eta


# --------------------------------------------------------------------- the protocol


class DualDerivatives(NamedTuple):
    """A dual objective A(l, a) with its derivatives in the losses l and the dual variable a.

    inf_a A(l, a) is the set's worst case of the losses l (around the weighted P when the
    set's methods are given weights). The Hessian in l is
    ``diag(diag) + low_sign * low low^T`` (a diagonal plus a rank-one term); the dual terms
    are None for a set without a dual variable (``dual_size == 0``). Shapes for losses
    ``(T, n)``: value, low_sign ``(T,)``; grad_l, diag, low ``(T, n)``; grad_a ``(T, 1)``;
    cross = d^2 A / dl da ``(T, n, 1)``; hess_a ``(T, 1, 1)``.
    """

    value: Tensor
    grad_l: Tensor
    diag: Tensor
    low: Tensor
    low_sign: Tensor
    grad_a: Tensor | None = None
    cross: Tensor | None = None
    hess_a: Tensor | None = None


def _check_parameter(label: str, value: object, *, finite: bool = False,
                     minimum: float = 0.0) -> float:
    """The one rule for a scalar parameter (a set's, e.g. ``"Chi2.rho"``, or a function's):
    a real number (not a bool, a string or a tensor), not NaN, >= ``minimum``, finite where
    ``finite``. Returns it as a float.

    Raises:
        TypeError: not a real number (a 0-dim tensor included: pass float(value)).
        ValueError: NaN, below ``minimum`` or, where ``finite``, infinite.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (pass float(...) for a 0-dim tensor)" if isinstance(value, Tensor) else ""
        raise TypeError(f"{label} must be a real number, got {type(value).__name__}{hint}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{label} must not be NaN")
    if value < minimum:
        raise ValueError(f"{label} must be {'non-negative' if minimum == 0 else f'>= {minimum}'}"
                         f", got {value}")
    if finite and math.isinf(value):
        raise ValueError(f"{label} must be finite, got {value}")
    return value


class AmbiguitySet(ABC):
    """An ambiguity set around P_n (or a weighted P): everything its users need, written
    once.

    * :meth:`worst_case`: value (what :func:`robust_mean` trains on), weights and dual;
    * for the linear-world estimators (:mod:`drosim.estimators`), a dual objective A(l, a)
      jointly convex in the losses and ``dual_size`` dual variables with
      inf_a A(l, a) = the worst case: :meth:`dual_objective`, :meth:`dual_derivatives`
      (for Newton steps) and :meth:`solve_dual` (the exact a*, optionally warm-started).

    Parameters are validated once, at construction, one rule per parameter (the message
    names it): a radius is a real number >= 0, and +inf is allowed where the set has a
    limit there (the max for the chi-square and KL balls, the mean for a KL temperature).

    Every method takes a keyword-only ``weights`` (None: P_n): a floating tensor
    broadcastable to the losses' shape (``(n,)`` is shared by every problem), non-negative,
    finite and not all zero in a problem, normalised per problem to the probabilities p of
    P; the set is then built around P (E_{P_n} becomes E_P, see the module docstring). A
    zero weight removes its sample; the weights are data (no gradient flows to them).

    Example:
        >>> import torch
        >>> from drosim.dro import Chi2
        >>> l = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
        >>> w = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # the 3 is absent
        >>> ball = Chi2(0.1)
        >>> eta = ball.solve_dual(l, weights=w)  # inf_eta A(l, eta) is the worst case
        >>> value = ball.dual_objective(l, eta, weights=w)
        >>> bool(torch.allclose(value, ball.worst_case(l[:, :3]).value))
        True
    """

    #: The worst case depends on the loss's gradients in the inputs (Wasserstein), not on
    #: the losses alone.
    needs_input_gradients: ClassVar[bool] = False
    #: Number of dual variables the estimators minimise jointly with the model (0 or 1).
    dual_size: ClassVar[int] = 0
    #: The dual objective is strictly convex in the dual variable on its open domain, so
    #: joint Newton steps in (model, dual) need no re-minimisation of the dual; chi-square's
    #: is flat above the largest loss.
    dual_is_strictly_convex: ClassVar[bool] = True

    @property
    def is_empirical(self) -> bool:
        """True when the set is {P_n} itself (radius 0): its worst case is the mean."""
        return False

    @property
    def is_minimax(self) -> bool:
        """True when the worst case is the max whatever the losses (an infinite radius, a
        zero temperature): min over a model of it is a non-smooth minimax problem."""
        return False

    @abstractmethod
    def worst_case(self, losses: Tensor, grad_sq_norms: Tensor | None = None, *,
                   weights: Tensor | None = None) -> DROResult:
        """sup_{Q in the set} E_Q[l] for losses ``(..., n)``: value (differentiable, with
        Danskin's gradient), weights and dual. ``grad_sq_norms`` ``(..., n)``, the squared
        input-gradient norms, is read by sets that ``needs_input_gradients`` only.
        ``weights`` (broadcastable to ``(..., n)``) centres the set on the weighted P."""

    @abstractmethod
    def dual_objective(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                       weights: Tensor | None = None) -> Tensor:
        """A(l, a) for losses ``(T, n)`` and dual ``(T, dual_size)``, +inf off its domain.

        ``unit`` ``(T,)``: the losses are given divided by it. Every set here is positively
        homogeneous (A(u l, u a) = u A(l, a)) except a fixed temperature, whose tau is then
        read as tau / unit. ``weights`` (``(T, n)`` or ``(n,)``): A of the set around the
        weighted P, whose infimum over a is that set's worst case.
        """

    @abstractmethod
    def dual_derivatives(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                         weights: Tensor | None = None) -> DualDerivatives:
        """A(l, a) and its first and second derivatives, see :class:`DualDerivatives`
        (``weights`` as in :meth:`dual_objective`)."""

    def solve_dual(self, losses: Tensor, start: Tensor | None = None, *,
                   weights: Tensor | None = None) -> Tensor:
        """The exact minimiser a* of A(losses, ., weights=weights), shape
        ``(T, dual_size)``; ``start`` is an optional guess of it (same shape)."""
        _check_weights(weights, losses)
        return losses.new_zeros(losses.shape[0], 0)


class _MeanDual:
    """A = E_P l, no dual variable: the loss side of {P} and of a Wasserstein set."""

    def dual_objective(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                       weights: Tensor | None = None) -> Tensor:
        return _weighted_mean(losses, _check_weights(weights, losses))

    def dual_derivatives(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                         weights: Tensor | None = None) -> DualDerivatives:
        return _mean_derivatives(losses, _check_weights(weights, losses))


def _mean_derivatives(losses: Tensor, prob: Tensor | None = None) -> DualDerivatives:
    """A = E_P l: gradient p (1/n for P_n), no curvature."""
    n = losses.shape[-1]
    zeros = torch.zeros_like(losses)
    grad = (torch.full_like(losses, 1.0 / n) if prob is None
            else prob.to(losses.dtype).contiguous())
    return DualDerivatives(_weighted_mean(losses, prob), grad, zeros, zeros,
                           torch.zeros_like(losses[..., 0]))


@dataclass(frozen=True)
class Empirical(_MeanDual, AmbiguitySet):
    """{P_n} (or {P}): no robustness, the worst case is the mean E_P l
    (``robust_mean(l, None)``), with weights p."""

    @property
    def is_empirical(self) -> bool:
        return True

    def worst_case(self, losses: Tensor, grad_sq_norms: Tensor | None = None, *,
                   weights: Tensor | None = None) -> DROResult:
        _check_losses(losses)
        prob = _check_weights(weights, losses)
        n = losses.shape[-1]
        q = (torch.full_like(losses.detach(), 1.0 / n) if prob is None
             else prob.to(losses.dtype).contiguous())
        return DROResult(_weighted_mean(losses, prob), q, torch.full_like(q[..., 0], math.nan))


@dataclass(frozen=True)
class _Ball(AmbiguitySet):
    """A divergence ball of radius rho around P_n, solved for one dual variable; rho = 0 is
    P_n itself and rho = inf every distribution on the samples (the worst case is the max)."""

    rho: float
    dual_size: ClassVar[int] = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", _check_parameter(f"{type(self).__name__}.rho",
                                                         self.rho))

    @property
    def is_empirical(self) -> bool:
        return self.rho == 0

    @property
    def is_minimax(self) -> bool:
        return math.isinf(self.rho)

    @classmethod
    def protecting(cls, fraction: float) -> _Ball:
        """The smallest ball that holds every reweighting of P onto a subpopulation of mass
        ``fraction`` (dQ/dP = 1/f on it, 0 elsewhere), so that its worst case is at least
        the mean of the worst f-fraction of the losses (CVaR_f).

        chi-square: rho = (1/f - 1) / 2 in this module's convention; KL: rho = log(1/f).
        f = 1 is P itself (rho = 0).

        Raises:
            TypeError: f is not a real number.
            ValueError: f is NaN or outside (0, 1].

        Example:
            >>> from drosim.dro import Chi2, KL
            >>> Chi2.protecting(0.2).rho, round(KL.protecting(0.5).rho, 6)
            (2.0, 0.693147)
        """
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
            raise TypeError(f"{cls.__name__}.protecting: the fraction f must be a real number, "
                            f"got {type(fraction).__name__}")
        f = float(fraction)
        if not 0 < f <= 1:
            raise ValueError(f"{cls.__name__}.protecting: the fraction f must be in (0, 1], "
                             f"got {fraction}")
        return cls(cls._protecting_radius(f))

    @staticmethod
    @abstractmethod
    def _protecting_radius(f: float) -> float:
        """The divergence from P of P restricted to a subpopulation of mass f."""


@dataclass(frozen=True)
class Chi2(_Ball):
    """chi-square ball {Q : 1/2 E_P[(dQ/dP - 1)^2] <= rho}; rho = inf is every Q (the max).

    Dual: A(l, eta) = eta + sqrt(1 + 2 rho) sqrt(E_P[(l - eta)_+^2]), P = P_n or weighted.
    """

    dual_is_strictly_convex: ClassVar[bool] = False

    @staticmethod
    def _protecting_radius(f: float) -> float:
        # 1/2 E_P[(dQ/dP - 1)^2] with dQ/dP = 1/f on mass f: (1/f - 1) / 2
        return 0.5 * (1.0 / f - 1.0)

    def worst_case(self, losses: Tensor, grad_sq_norms: Tensor | None = None, *,
                   weights: Tensor | None = None) -> DROResult:
        return chi2_worst_case(losses, self.rho, weights=weights)

    def dual_objective(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                       weights: Tensor | None = None) -> Tensor:
        return self._objective(losses, dual, _check_weights(weights, losses))

    def _objective(self, losses: Tensor, dual: Tensor, prob: Tensor | None) -> Tensor:
        eta = dual[..., 0]
        excess = (losses - eta.unsqueeze(-1)).clamp_min(0)
        if prob is None:
            return eta + math.sqrt((1 + 2 * self.rho) / losses.shape[-1]) * excess.norm(dim=-1)
        # sqrt(E_P e^2) as a norm: a zero excess then has gradient 0, not 0 / 0
        return eta + math.sqrt(1 + 2 * self.rho) * (excess * prob.sqrt()).norm(dim=-1)

    def dual_derivatives(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                         weights: Tensor | None = None) -> DualDerivatives:
        """With e = sqrt(p) (l - eta)_+ (p = 1/n for P_n) and M = de/d(l, eta), the Hessian
        of ||e|| is M^T (I - u u^T) M / ||e||, u = e / ||e||. In l that is
        k diag(p 1[l > eta]) - k w w^T with k = c / ||e||, w = p (l - eta)_+ / ||e||; the
        dual's row and corner follow from d e / d eta = -d e / d l (summed)."""
        n = losses.shape[-1]
        prob = _check_weights(weights, losses)
        c = math.sqrt(1 + 2 * self.rho)
        eta = dual[..., 0]
        e = (losses - eta.unsqueeze(-1)).clamp_min(0)
        active = (e > 0).to(losses.dtype)
        tiny = torch.finfo(losses.dtype).tiny
        if prob is None:
            safe = e.norm(dim=-1).clamp_min(tiny)
            # No excess (eta at or above the max): no curvature in l (c / tiny overflows)
            k = torch.where(safe > tiny, c / (math.sqrt(n) * safe), 0.0)
        else:
            # The same formulas with e_i -> p_i e_i and active_i -> p_i active_i, and
            # k = c / sqrt(E_P (l - eta)_+^2).
            prob = prob.to(losses.dtype)
            safe = (e * prob.sqrt()).norm(dim=-1).clamp_min(tiny)
            # No excess on the support (eta at or above its max): no curvature in l, and
            # c / tiny would overflow
            k = torch.where(safe > tiny, c / safe, 0.0)
            e, active = e * prob, active * prob
        unit_e = e / safe.unsqueeze(-1)
        total = unit_e.sum(-1)
        return DualDerivatives(
            value=self._objective(losses, dual, prob),
            grad_l=k.unsqueeze(-1) * e,
            diag=k.unsqueeze(-1) * active,
            low=unit_e,
            low_sign=-k,
            grad_a=(1 - k * e.sum(-1)).unsqueeze(-1),
            cross=(k.unsqueeze(-1) * (unit_e * total.unsqueeze(-1) - active)).unsqueeze(-1),
            hess_a=(k * (active.sum(-1) - total.square())).reshape(-1, 1, 1),
        )

    def solve_dual(self, losses: Tensor, start: Tensor | None = None, *,
                   weights: Tensor | None = None) -> Tensor:
        """eta*; without a ``start``, from the stationary point with every loss active,
        eta = E_P l - sqrt(Var_P(l) / (2 rho)), which is eta* when no weight is clipped."""
        _check_losses(losses)
        prob = _check_weights(weights, losses)
        rho = torch.full_like(losses[..., 0], self.rho)
        if start is None:
            mean = _weighted_mean(losses, prob)
            var = _weighted_var(losses, mean, prob)
            start = (mean - torch.sqrt(var / (2 * rho))).unsqueeze(-1)
        return _chi2_dual_warm(losses, rho, start[..., 0], prob).unsqueeze(-1)


def _tilted_value(losses: Tensor, tau: Tensor, rho: float, prob: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(A, log E_P exp(l / tau), logits) for A = tau rho + tau log E_P exp(l / tau), where
    softmax(logits) is the tilted Q (logits = l / tau, plus log p when weighted); A = +inf
    where tau <= 0 (off the domain), and the other two are taken at tau = 1 there."""
    safe = torch.where(tau > 0, tau, 1.0)
    z = losses / safe.unsqueeze(-1)
    if prob is None:
        lse = torch.logsumexp(z, -1) - math.log(losses.shape[-1])
    else:
        # log 0 = -inf drops an absent sample, whatever its loss (even one that overflows)
        z = torch.where(prob > 0, z + prob.log(), -math.inf)
        lse = torch.logsumexp(z, -1)
    return torch.where(tau > 0, safe * (lse + rho), math.inf), lse, z


def _tilted_derivatives(losses: Tensor, tau: Tensor, rho: float | None,
                        prob: Tensor | None = None) -> DualDerivatives:
    """A = tau rho + tau log E_P exp(l / tau), tau a dual variable when rho is given.

    In l the Hessian is (diag(q) - q q^T) / tau, q proportional to p exp(l / tau) (the
    weights enter through q alone); in tau, dA/dtau = rho + log E_P exp(l/tau) - E_q l / tau
    and d^2A/dtau^2 = Var_q(l) / tau^3.
    """
    if prob is not None:
        prob = prob.to(losses.dtype)
        # q = 0 on absent samples: keep their losses finite in q (l - E_q l)^2 as well
        losses = _on_support(losses, prob)
    value, lse, z = _tilted_value(losses, tau, rho or 0.0, prob)
    safe = torch.where(tau > 0, tau, 1.0)
    q = torch.softmax(z, -1)
    if rho is None:
        return DualDerivatives(value, q, q / safe.unsqueeze(-1), q, -1 / safe)
    mean = (q * losses).sum(-1)
    centred = losses - mean.unsqueeze(-1)
    return DualDerivatives(
        value=value,
        grad_l=q,
        diag=q / safe.unsqueeze(-1),
        low=q,
        low_sign=-1 / safe,
        grad_a=(rho + lse - mean / safe).unsqueeze(-1),
        cross=(-q * centred / safe.square().unsqueeze(-1)).unsqueeze(-1),
        hess_a=((q * centred.square()).sum(-1) / safe.pow(3)).reshape(-1, 1, 1),
    )


@dataclass(frozen=True)
class KL(_Ball):
    """KL ball {Q : KL(Q || P_n) <= rho}, solved for its optimal temperature; rho = inf is
    every Q (the max).

    Dual: A(l, tau) = tau rho + tau log E_P[exp(l / tau)], tau > 0, P = P_n or weighted.
    """

    @staticmethod
    def _protecting_radius(f: float) -> float:
        # E_Q[log dQ/dP] with dQ/dP = 1/f on mass f: log(1/f)
        return -math.log(f)

    def worst_case(self, losses: Tensor, grad_sq_norms: Tensor | None = None, *,
                   weights: Tensor | None = None) -> DROResult:
        return kl_worst_case(losses, self.rho, weights=weights)

    def dual_objective(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                       weights: Tensor | None = None) -> Tensor:
        return _tilted_value(losses, dual[..., 0], self.rho, _check_weights(weights, losses))[0]

    def dual_derivatives(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                         weights: Tensor | None = None) -> DualDerivatives:
        return _tilted_derivatives(losses, dual[..., 0], self.rho,
                                   _check_weights(weights, losses))

    def solve_dual(self, losses: Tensor, start: Tensor | None = None, *,
                   weights: Tensor | None = None) -> Tensor:
        """tau*, by safeguarded Newton steps from ``start`` (by default the small-radius
        expansion tau* ~ sqrt(Var_P / (2 rho))). Where the worst case is the max (tau* = 0,
        the boundary of the domain tau > 0) the interior point tau = 1e-3 spread(l) instead
        (over the support; 1e-3 max |l| for a flat row), whose objective exceeds the max by
        at most 1e-3 rho spread(l): Newton steps need a point inside."""
        _check_losses(losses)
        prob = _check_weights(weights, losses)
        if self.rho < _KL_SMALL_RADIUS[losses.dtype]:
            tau = kl_worst_case(losses, self.rho, weights=prob).dual
        else:
            rho = torch.full_like(losses[..., 0], self.rho)
            with torch.no_grad():
                z, scale = _normalise(losses.detach() if prob is None
                                      else _on_support(losses.detach(), prob))
                on_max = rho >= _kl_max_radius(_at_max(z, prob), prob, z.dtype)
                mean_z = _weighted_mean(z, prob)
                # Without a start, the small-radius expansion tau* ~ sqrt(Var / (2 rho)).
                u0 = (0.5 * torch.log(_weighted_var(z, mean_z, prob) / (2 * rho))
                      if start is None else torch.log(start[..., 0] * scale.factor / scale.scale))
                tau_z = _kl_solve(z, mean_z, rho, u0, prob).exp()
                tau = scale.restore_spread(torch.where(on_max, 0.0, tau_z))
        if prob is not None:
            losses = _on_support(losses, prob)
        # Flat rows have A = l + tau rho for every tau: any positive tau on their scale does.
        spread = losses.amax(-1) - losses.amin(-1)
        size = losses.abs().amax(-1)
        inside = 1e-3 * torch.where(spread > 0, spread, torch.where(size > 0, size, 1.0))
        return torch.where(tau > 0, tau, inside).unsqueeze(-1)


@dataclass(frozen=True)
class KLTemperature(AmbiguitySet):
    """Fixed-temperature KL penalty tau log E_P exp(l / tau) (KL-DPO, the authors' KL-REBEL):
    sup_Q E_Q[l] - tau KL(Q || P), P = P_n or weighted. tau = 0 is the max, tau = inf the
    mean."""

    tau: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", _check_parameter(f"{type(self).__name__}.tau",
                                                         self.tau))

    @property
    def is_empirical(self) -> bool:
        return math.isinf(self.tau)

    @property
    def is_minimax(self) -> bool:
        return self.tau == 0

    def worst_case(self, losses: Tensor, grad_sq_norms: Tensor | None = None, *,
                   weights: Tensor | None = None) -> DROResult:
        return kl_tilted(losses, self.tau, weights=weights)

    def _tau(self, losses: Tensor, unit: Tensor | float) -> Tensor:
        tau = torch.as_tensor(self.tau / unit, dtype=losses.dtype, device=losses.device)
        return tau.expand(losses.shape[:-1])

    def dual_objective(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                       weights: Tensor | None = None) -> Tensor:
        return _tilted_value(losses, self._tau(losses, unit), 0.0,
                             _check_weights(weights, losses))[0]

    def dual_derivatives(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                         weights: Tensor | None = None) -> DualDerivatives:
        return _tilted_derivatives(losses, self._tau(losses, unit), None,
                                   _check_weights(weights, losses))


@dataclass(frozen=True)
class Wasserstein(_MeanDual, AmbiguitySet):
    """Type-p Wasserstein ball of radius rho on the inputs z (Euclidean cost), in its
    first-order form: worst case = E_P l + rho (E_P ||grad_z l||^q)^(1/q), q = p / (p - 1),
    P = P_n or weighted.

    rho must be finite (an infinite budget moves every input anywhere); p is in [1, inf].
    The worst case needs the per-sample input-gradient norms (``needs_input_gradients``);
    in the estimators' dual objective the losses enter through their mean, and the
    linear world's exact forms add the penalty on the model (:mod:`drosim.estimators`).
    """

    rho: float
    p: float = 2.0
    needs_input_gradients: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", _check_parameter("Wasserstein.rho", self.rho,
                                                         finite=True))
        object.__setattr__(self, "p", _check_parameter("Wasserstein.p", self.p, minimum=1.0))

    @property
    def is_empirical(self) -> bool:
        return self.rho == 0

    def worst_case(self, losses: Tensor, grad_sq_norms: Tensor | None = None, *,
                   weights: Tensor | None = None) -> DROResult:
        """value = E_P l + penalty; weights p (each loss enters the mean alike: uniform for
        P_n); dual = (E_P ||grad_z l||^q)^(1/q), the value's derivative in rho."""
        _check_losses(losses)
        prob = _check_weights(weights, losses)
        if grad_sq_norms is None:
            raise ValueError("a Wasserstein set needs grad_sq_norms, the per-sample squared "
                             "norms of the loss gradients with respect to the inputs")
        _check_losses(grad_sq_norms, "grad_sq_norms")  # a tensor, as the losses must be
        if grad_sq_norms.shape != losses.shape:
            raise ValueError(f"grad_sq_norms {tuple(grad_sq_norms.shape)} must match losses "
                             f"{tuple(losses.shape)}")
        penalty = wasserstein_penalty(grad_sq_norms, self.rho, self.p, weights=prob)
        with torch.no_grad():
            dual = wasserstein_penalty(grad_sq_norms.detach(), 1.0, self.p, weights=prob)
            q = (torch.full_like(losses.detach(), 1.0 / losses.shape[-1]) if prob is None
                 else prob.to(losses.dtype).contiguous())
        return DROResult(_weighted_mean(losses, prob) + penalty, q, dual)


def as_ambiguity_set(spec: AmbiguitySet | None) -> AmbiguitySet:
    """``spec``, with None read as :class:`Empirical` (the plain mean).

    Raises:
        TypeError: anything else that is not an :class:`AmbiguitySet`.
    """
    if spec is None:
        return Empirical()
    if not isinstance(spec, AmbiguitySet):
        raise TypeError(f"unknown ambiguity set {spec!r}; expected Chi2, KL, KLTemperature, "
                        "Wasserstein, Empirical or None")
    return spec


# ----------------------------------------------------------------------- training


def robust_mean(
    losses: Tensor, spec: AmbiguitySet | None = None, *, grad_sq_norms: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """The robust aggregate of per-sample losses, differentiable for training.

    Its gradient is the Danskin gradient sum_i q_i* grad l_i with the worst-case weights q*
    held fixed. ``spec=None`` is the plain mean; a :class:`Wasserstein` spec needs the
    per-sample squared input-gradient norms and returns mean(l) + wasserstein_penalty.
    With ``weights`` the set is built around the weighted P instead of P_n (``spec=None``
    is then the weighted mean).

    Args:
        losses: ``(..., n)`` per-sample losses carrying the autograd graph.
        spec: Chi2(rho), KL(rho), KLTemperature(tau), Wasserstein(rho, p), Empirical() or
            None.
        grad_sq_norms: ``(..., n)`` ||grad_z l_i||^2, a floating tensor like the losses,
            required for Wasserstein only.
        weights: None (P_n) or the weights of P, a floating tensor broadcastable to
            ``losses.shape``, non-negative, finite, not all zero in a problem, on the
            losses' device; normalised per problem. A zero weight removes its sample (its
            gradient is 0). Data: no gradient flows to them.

    Returns:
        Tensor of shape ``losses.shape[:-1]`` (a scalar for a 1-D batch).

    Raises:
        ValueError: as the underlying solver (an empty batch included), or a Wasserstein
            spec without grad_sq_norms or with grad_sq_norms of another shape.
        TypeError: an unknown spec, losses or grad_sq_norms that are not tensors, or weights
            that are not a floating-point tensor.

    Example:
        >>> import torch
        >>> from drosim.dro import Chi2, robust_mean
        >>> l = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
        >>> robust_mean(l, Chi2(0.1)).backward()  # d/dl_i = worst-case weight q_i
        >>> [round(g, 4) for g in l.grad.tolist()]
        [0.1, 0.2, 0.3, 0.4]
        >>> l.grad = None
        >>> w = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # drop the last
        >>> robust_mean(l, None, weights=w).backward()  # the weighted mean
        >>> [round(g, 4) for g in l.grad.tolist()]
        [0.3333, 0.3333, 0.3333, 0.0]
    """
    return as_ambiguity_set(spec).worst_case(losses, grad_sq_norms, weights=weights).value
