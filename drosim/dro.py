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


class DROResult(NamedTuple):
    """Worst-case expectation over an ambiguity set around P_n.

    Attributes:
        value: sup_Q E_Q[l], shape ``losses.shape[:-1]``. Differentiable in the losses
            with ``d value / d l_i = weights_i`` (Danskin).
        weights: the worst-case distribution Q on the n samples, shape ``losses.shape``;
            each row lies in the simplex. Detached.
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
    if not isinstance(losses, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(losses).__name__}")
    if not losses.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {losses.dtype}")
    if losses.ndim == 0 or losses.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape "
                         f"{tuple(losses.shape)}")
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[:5].tolist()
        raise ValueError(f"{name} contains NaN or infinite values (first at indices {bad})")


def _as_radius(rho: float | Tensor, like: Tensor, name: str = "rho") -> Tensor:
    """rho as a tensor on like's device and dtype, broadcast to the batch shape.

    The one radius rule of this module, for floats and tensors alike: a radius is a real
    number >= 0 (NaN refused). +inf is allowed and means the limit: the max for the chi-square
    and KL balls, the mean for a KL temperature (the sets that need a finite one say so).
    """
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real | Tensor):
        raise TypeError(f"{name} must be a real number or a tensor, got {type(rho).__name__}")
    if isinstance(rho, Tensor) and (rho.is_complex() or rho.dtype == torch.bool):
        raise TypeError(f"{name} must be real, got dtype {rho.dtype}")
    r = torch.as_tensor(rho, dtype=like.dtype, device=like.device)
    if bool(torch.isnan(r).any()):
        raise ValueError(f"{name} must not be NaN (a radius is a number >= 0)")
    if bool((r < 0).any()):
        raise ValueError(f"{name} must be non-negative, got {rho}")
    try:
        return torch.broadcast_to(r, like.shape[:-1])
    except RuntimeError as err:
        raise ValueError(f"{name} of shape {tuple(r.shape)} does not broadcast to the batch "
                         f"shape {tuple(like.shape[:-1])}") from err


def _at_float32(solve: Callable[[Tensor, float | Tensor], DROResult], losses: Tensor,
                radius: float | Tensor) -> DROResult:
    """Solve half-precision losses in float32 and return the input's dtype.

    float16 cannot hold the solvers' sums (65504 is its max: a 65536-sample mean overflows)
    nor resolve their differences, so the solve runs at float32 and only the answer is
    rounded back. Gradients flow through both casts.
    """
    if isinstance(radius, Tensor):
        radius = radius.float()
    result = solve(losses.float(), radius)
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


def _finish_weights(weights: Tensor, is_max: Tensor, on_max: Tensor, is_mean: Tensor
                    ) -> Tensor:
    """Normalise weights in place and overwrite the rows whose worst case is the max
    (uniform on the argmax, ``is_max``) or the mean (uniform). Works in place so that no
    second tensor of the input's size is alive."""
    n = weights.shape[-1]
    on_max, is_mean = on_max.unsqueeze(-1), is_mean.unsqueeze(-1)
    weights.masked_fill_(on_max, 0.0).add_(is_max & on_max, alpha=1.0)
    weights.div_(weights.sum(-1, keepdim=True).masked_fill_(is_mean, 1.0))
    return weights.masked_fill_(is_mean, 1.0 / n)


# ---------------------------------------------------------------------- chi-square


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

    def top(k: Tensor, t: Tensor) -> Tensor:
        return t.gather(-1, (k - 1).unsqueeze(-1)).squeeze(-1)

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
    # Binary search for J = max{j : eta* < s_j}: true for j <= ties (those equal the max and
    # eta* < max off on_max rows), false at j = n + 1 (s_{n+1} = -inf). The iteration count
    # depends on n only, never on the data.
    lo, hi = ties.clone(), torch.full_like(ties, n + 1)
    for _ in range(math.ceil(math.log2(n + 1))):
        active = hi - lo > 1
        mid = torch.where(active, (lo + hi) // 2, 2).clamp(2, max(n, 2))
        pos = derivative_positive(mid) if n >= 2 else torch.zeros_like(active)
        lo = torch.where(active & pos, mid, lo)
        hi = torch.where(active & ~pos, mid, hi)
    k = lo

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


def _chi2_solve_in_chunks(z: Tensor, rho: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """_chi2_solve on a quarter of the problems at a time when they are large (a loop over
    chunks of problems, never over samples): the sort's workspace (about 7x its input on
    CUDA) then stays within the 4x memory budget of the whole solve. Small inputs are
    solved whole, where the per-call overhead would dominate."""
    n = z.shape[-1]
    rows, radii = z.reshape(-1, n), rho.reshape(-1)
    del z
    chunks = _CHI2_CHUNKS if rows.numel() >= _CHI2_CHUNKED_SIZE else 1
    step = max(1, -(-rows.shape[0] // chunks))
    parts = [_chi2_solve(rows[i : i + step], radii[i : i + step])
             for i in range(0, rows.shape[0], step)]
    return tuple(torch.cat(p).reshape(rho.shape) for p in zip(*parts, strict=True))


def chi2_worst_case(losses: Tensor, rho: float | Tensor) -> DROResult:
    """Worst-case mean over the chi-square ball 1/2 E_{P_n}[(dQ/dP_n - 1)^2] <= rho.

    value = inf_eta eta + sqrt(1 + 2 rho) sqrt(E_{P_n}[(l - eta)_+^2]), solved exactly by
    sorting and a closed-form stationary point on each piece (O(n log n)). When no weight is
    clipped this equals mean + sqrt(2 rho Var_n(l)); once rho >= (n / #argmax - 1) / 2 it
    equals max(l).

    Args:
        losses: ``(..., n)`` per-sample losses, any floating dtype (half precision is solved
            in float32 and returned in its own dtype), any device.
        rho: radius >= 0, a float or a tensor broadcastable to ``losses.shape[:-1]``.

    Returns:
        DROResult with value ``(...)``, weights ``(..., n)`` proportional to
        (l - eta*)_+ (uniform on the argmax when the worst case is the max) and dual eta*
        (-inf at rho = 0, where the worst case is the mean).

    Raises:
        ValueError: empty last dimension, NaN or infinite losses, negative or NaN rho.

    Example:
        >>> import torch
        >>> from drosim.dro import chi2_worst_case
        >>> l = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
        >>> r = chi2_worst_case(l, 0.1)
        >>> round(float(r.value), 6), round(float(l.mean() + (0.2 * l.var(False)).sqrt()), 6)
        (2.0, 2.0)
        >>> float(chi2_worst_case(l, 10.0).value)
        3.0
    """
    _check_losses(losses)
    if losses.dtype in _HALF:
        return _at_float32(chi2_worst_case, losses, rho)
    rho_t = _as_radius(rho, losses)
    with torch.no_grad():
        eta_z, value_z, on_max = _chi2_solve_in_chunks(_normalise(losses.detach())[0], rho_t)
        # Rebuild the normalised losses rather than keep them through the solve (memory).
        z, scale = _normalise(losses.detach())
        is_max = z == 0
        is_mean = rho_t == 0
        value_z = torch.where(is_mean, z.mean(-1), value_z)
        weights = z.sub_(eta_z.unsqueeze(-1)).clamp_min_(0)  # (l - eta*)_+, z's storage
        # Rounding can leave no excess right at the max: the worst case is then the argmax.
        on_max = on_max | (weights.sum(-1) <= 0)
        # eta* = -inf (a subnormal rho overflows sqrt(n v / excess)) is the uniform limit.
        weights = _finish_weights(weights, is_max, on_max, is_mean | torch.isinf(eta_z))
        value = scale.restore(value_z)
        dual = torch.where(is_mean, -math.inf, scale.restore(eta_z))
    return DROResult(_with_danskin_gradient(value, weights, losses), weights, dual)


# ------------------------------------------------------------------------------ KL


def _tilt(z: Tensor, mean: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exponential tilt of normalised rows z (max 0, row means ``mean``) at temperature tau.

    Returns (t, g, log E exp(t), warm) with t = (z - shift) / tau and, per row, either
    shift = 0 when tau < -mean (a cold tilt: t <= 0 keeps the gaps below the max exact,
    g = exp(t)), or shift = mean (a warm tilt: g = expm1(t), which keeps the tiny tilts of
    large temperatures, i.e. small radii, to relative precision). exp(t) = g + warm.
    """
    n = z.shape[-1]
    warm = tau >= -mean
    shift = torch.where(warm, mean, 0.0)
    t = (z - shift.unsqueeze(-1)).div_(tau.unsqueeze(-1))
    g = torch.expm1(t).add_((~warm).to(t.dtype).unsqueeze(-1))
    g_sum = g.sum(-1)
    log_mean_exp = torch.where(warm, torch.log1p(g_sum / n), torch.log(g_sum / n))
    return t, g, log_mean_exp, warm


def _kl_of_tilt(z: Tensor, mean: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For q = softmax(z / tau), tau = e^u: KL(q || uniform), Var_q(z / tau) (= -d KL / d u),
    and log E exp(t), warm as in :func:`_tilt`. Two tensors of z's size besides z."""
    n = z.shape[-1]
    t, g, log_mean_exp, warm = _tilt(z, mean, u.exp())
    ones = warm.to(z.dtype)  # exp(t) = g + ones
    total = g.sum(-1) + n * ones
    mean_t = (ones * t.sum(-1) + _row_dot(g, t)) / total
    second = (ones * _row_dot(t, t) + _row_dot(g.mul_(t), t)) / total
    kl = mean_t - log_mean_exp  # KL = E_q[t] - log E exp(t), whatever the shift
    return kl, (second - mean_t.square()).clamp_min(0), log_mean_exp, warm


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_i a_i b_i over the last dimension, without an elementwise product tensor."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).reshape(a.shape[:-1])


def _kl_solve(z: Tensor, mean: Tensor, rho: Tensor, start: Tensor | None = None) -> Tensor:
    """u* = log tau* solving KL(softmax(z / tau) || uniform) = rho, for rows z in [-1, 0].

    Newton on log KL(u) = log rho, which is nearly linear in u for large tau (where
    KL ~ Var(z) / (2 tau^2)), safeguarded by a bracket on which KL decreases: at
    tau_hi = 1 / sqrt(8 rho) the KL is at most rho (at most range^2 / (8 tau^2) by
    Hoeffding's lemma), and at tau_lo = e^-60 it is within rounding of log(n / #argmax),
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
        kl, var_t, _, _ = _kl_of_tilt(z, mean, u)
        above = kl > rho  # u is left of the root
        u_lo = torch.where(above, u, u_lo)
        u_hi = torch.where(above, u_hi, u)
        log_kl = torch.log(kl.clamp_min(tiny))
        newton = u + (log_kl - log_rho) * kl / var_t.clamp_min(tiny)
        # Inclusive: at convergence Newton lands on a bracket end to rounding.
        inside = (newton >= u_lo) & (newton <= u_hi)
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


def kl_worst_case(losses: Tensor, rho: float | Tensor) -> DROResult:
    """Worst-case mean over the KL ball KL(Q || P_n) <= rho.

    value = inf_{tau > 0} tau rho + tau log E_{P_n}[exp(l / tau)], weights softmax(l / tau*).
    tau* solves KL(softmax(l / tau) || uniform) = rho by safeguarded Newton in log tau; when
    rho >= log(n / #argmax) the worst case is the max, with tau* = 0 and uniform weights on
    the argmax; rho = 0 gives the mean with tau* = inf.

    Args:
        losses: ``(..., n)`` per-sample losses, any floating dtype (half precision is solved
            in float32 and returned in its own dtype), any device.
        rho: radius >= 0, a float or a tensor broadcastable to ``losses.shape[:-1]``.

    Returns:
        DROResult with value ``(...)``, weights ``(..., n)`` and dual tau* ``(...)``.

    Raises:
        ValueError: empty last dimension, NaN or infinite losses, negative or NaN rho.

    Example:
        >>> import torch
        >>> from drosim.dro import kl_worst_case
        >>> l = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
        >>> r = kl_worst_case(l, 0.05)
        >>> bool(l.mean() < r.value < l.max()), abs(float((r.weights * l).sum() - r.value)) < 1e-12
        (True, True)
        >>> float(kl_worst_case(l, 2.0).value), float(kl_worst_case(l, 2.0).dual)
        (3.0, 0.0)
    """
    _check_losses(losses)
    if losses.dtype in _HALF:
        return _at_float32(kl_worst_case, losses, rho)
    rho_t = _as_radius(rho, losses)
    n = losses.shape[-1]
    with torch.no_grad():
        z, scale = _normalise(losses.detach())
        is_max = z == 0
        on_max = rho_t >= torch.log(n / is_max.sum(-1).to(z.dtype))
        is_mean = (rho_t == 0) & ~on_max
        mean_z = z.mean(-1)
        var_z = z.var(-1, unbiased=False)
        # Below _KL_SMALL_RADIUS the KL is too close to rounding to solve for; there
        # tau* = sqrt(Var / (2 rho)) and value = mean + sqrt(2 rho Var) hold up to O(rho).
        small = rho_t < _KL_SMALL_RADIUS[z.dtype]
        tiny = torch.finfo(z.dtype).tiny
        u = torch.where(small, 0.5 * torch.log(var_z.clamp_min(tiny) / (2 * rho_t.clamp_min(tiny))),
                        _kl_solve(z, mean_z, rho_t))
        _, _, log_mean_exp, warm = _kl_of_tilt(z, mean_z, u)
        tau_z = u.exp()
        value_z = torch.where(small, mean_z + torch.sqrt(2 * rho_t * var_z),
                              torch.where(warm, mean_z, 0.0) + tau_z * (rho_t + log_mean_exp))
        weights = torch.softmax(z.div_(tau_z.unsqueeze(-1)), -1)
        weights = _finish_weights(weights, is_max, on_max, is_mean)
        value_z = torch.where(on_max, 0.0, torch.where(is_mean, mean_z, value_z))
        tau_z = torch.where(on_max, 0.0, torch.where(is_mean, math.inf, tau_z))
        value = scale.restore(value_z)
        dual = scale.restore_spread(tau_z)
    return DROResult(_with_danskin_gradient(value, weights, losses), weights, dual)


def kl_tilted(losses: Tensor, tau: float | Tensor) -> DROResult:
    """Fixed-temperature KL penalty: tau * log E_{P_n}[exp(l / tau)], weights softmax(l / tau).

    This is the penalised (Lagrangian) form sup_Q E_Q[l] - tau KL(Q || P_n) used by KL-DPO
    and the authors' KL-REBEL; tau = 0 gives the max.

    Args:
        losses: ``(..., n)`` per-sample losses.
        tau: temperature >= 0, float or tensor broadcastable to ``losses.shape[:-1]``.

    Returns:
        DROResult with value ``(...)``, weights ``(..., n)`` and dual = tau.

    Raises:
        ValueError: empty last dimension, NaN or infinite losses, negative or NaN tau.

    Example:
        >>> import torch
        >>> from drosim.dro import kl_tilted
        >>> l = torch.tensor([0.0, 1.0], dtype=torch.float64)
        >>> import math
        >>> abs(float(kl_tilted(l, 1.0).value) - math.log((1 + math.e) / 2)) < 1e-12
        True
    """
    _check_losses(losses)
    if losses.dtype in _HALF:
        return _at_float32(kl_tilted, losses, tau)
    tau_t = _as_radius(tau, losses, "tau")
    with torch.no_grad():
        z, scale = _normalise(losses.detach())
        is_max = z == 0
        tau_z = scale.factor * tau_t / scale.scale  # 0 when tau underflows on this scale
        cold, flat = tau_z == 0, torch.isinf(tau_z)  # the max and the mean
        mean_z = z.mean(-1)
        _, weights, log_mean_exp, warm = _tilt(z, mean_z, torch.where(cold | flat, 1.0, tau_z))
        del z
        weights.add_(warm.to(weights.dtype).unsqueeze(-1))  # exp(t), normalised below
        weights = _finish_weights(weights, is_max, cold, flat)
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
        rho: radius >= 0, float or tensor broadcastable to ``residuals.shape[:-1]``.

    Returns:
        WassersteinResult with value ``(...)`` (differentiable in residuals and w) and dual
        lambda* ``(...)``.

    Raises:
        ValueError: empty or non-finite residuals or w, mismatched leading shapes, bad rho.

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
    rho_t = _as_radius(rho, residuals)
    rms = residuals.square().mean(-1).sqrt()
    norm = torch.linalg.vector_norm(w, dim=-1)
    value = (rms + rho_t * norm).square()
    with torch.no_grad():
        # lambda* -> inf as rho -> 0 (the budget constraint then binds with infinite price).
        dual = torch.where(rho_t > 0, norm.square() + norm * rms / rho_t, math.inf)
    return WassersteinResult(value, dual)


def wasserstein_penalty(grad_sq_norms: Tensor, rho: float | Tensor, p: float = 2.0) -> Tensor:
    """First-order type-p Wasserstein regulariser rho * (E_{P_n} ||grad_z l||_*^q)^(1/q).

    q = p / (p - 1) is the dual exponent (Gao, Chen & Kleywegt 2022); with the Euclidean
    cost the dual norm is Euclidean. For p = 2 this is rho * sqrt(mean_i ||grad_z l_i||^2).
    p = 1 gives rho * max_i ||grad_z l_i||; p = inf gives rho * mean_i ||grad_z l_i||.

    Args:
        grad_sq_norms: ``(..., n)`` squared norms ||grad_z l_i||^2 (differentiable: build
            them with ``create_graph=True`` to train through the penalty).
        rho: radius >= 0.
        p: Wasserstein order in [1, inf].

    Returns:
        The penalty, shape ``grad_sq_norms.shape[:-1]``.

    Raises:
        ValueError: empty, non-finite or negative squared norms; bad rho; p < 1.

    Example:
        >>> import torch
        >>> from drosim.dro import wasserstein_penalty
        >>> float(wasserstein_penalty(torch.tensor([1.0, 9.0, 4.0, 2.0]), 0.5))
        1.0
    """
    _check_losses(grad_sq_norms, "grad_sq_norms")
    if bool((grad_sq_norms < 0).any()):
        raise ValueError("grad_sq_norms must be non-negative (they are squared norms)")
    if not p >= 1:
        raise ValueError(f"Wasserstein order p must be >= 1, got {p}")
    rho_t = _as_radius(rho, grad_sq_norms)
    # sqrt has an infinite derivative at 0: differentiate a clamped input instead, which
    # gives gradient 0 where every gradient norm vanishes.
    tiny = torch.finfo(grad_sq_norms.dtype).tiny
    if p == 1:
        norms = _safe_sqrt(grad_sq_norms, tiny)
        return rho_t * norms.amax(-1)
    if math.isinf(p):
        return rho_t * _safe_sqrt(grad_sq_norms, tiny).mean(-1)
    if p == 2:
        return rho_t * _safe_sqrt(grad_sq_norms.mean(-1), tiny)
    q = p / (p - 1)
    moment = _safe_sqrt(grad_sq_norms, tiny).pow(q).mean(-1)
    return rho_t * moment.clamp_min(tiny).pow(1 / q) * (moment > 0)


def _safe_sqrt(x: Tensor, tiny: float) -> Tensor:
    return torch.where(x > 0, x.clamp_min(tiny).sqrt(), torch.zeros_like(x))


# ------------------------------------------------------------------- chi-square, warm


def _chi2_dual_warm(losses: Tensor, rho: Tensor, start: Tensor) -> Tensor:
    """eta* of the chi-square dual, from a guess ``start`` (the previous eta* of a nearby
    problem, as in a Newton method on a model's parameters), without sorting.

    For a guessed active set A = {i : l_i > eta}, the stationary point of the dual on that
    piece is eta_A = m_A - sqrt(n v_A / (c^2 |A| - n)) (m_A, v_A: the mean and variance of
    the losses in A; see :func:`_chi2_solve`). When the losses above eta_A are exactly A,
    eta_A is eta* (g is convex and C^1, so a stationary point of its own piece is the
    minimiser). Each row moves to eta_A and tries again; rows not certified after
    ``_CHI2_WARM_STEPS`` tries are solved by the exact sorting solver instead. Rows whose
    worst case is the max (c^2 #argmax >= n, e.g. equal losses) get eta* = max(l) at once,
    as there. The answer is the exact solver's to rounding either way.
    """
    n = losses.shape[-1]
    top = losses.amax(-1)
    z = losses - top.unsqueeze(-1)  # max 0: squares stay small and offsets exact
    ties = (z == 0).sum(-1).to(z.dtype)
    on_max = ties + 2 * rho * ties >= n
    eta = start - top
    certified = on_max
    for _ in range(_CHI2_WARM_STEPS):
        active = z > eta.unsqueeze(-1)
        k = active.sum(-1).to(z.dtype)
        m = torch.where(active, z, 0.0).sum(-1) / k
        v = torch.where(active, z - m.unsqueeze(-1), 0.0).square().sum(-1) / k
        excess = (k - n) + 2 * rho * k
        guess = m - torch.sqrt(n * v / excess)
        guess = torch.where(on_max, 0.0, guess)
        certified = on_max | ((excess > 0) & torch.isfinite(guess)
                              & ((z > guess.unsqueeze(-1)) == active).all(-1))
        if bool(certified.all()):
            return guess + top
        eta = torch.where((excess > 0) & torch.isfinite(guess), guess, eta)
    eta = torch.where(certified, guess, eta) + top
    rest = ~certified
    eta[rest] = chi2_worst_case(losses[rest], rho[rest]).dual
    return eta


# --------------------------------------------------------------------- the protocol


class DualDerivatives(NamedTuple):
    """A dual objective A(l, a) with its derivatives in the losses l and the dual variable a.

    inf_a A(l, a) is the set's worst case of the losses l. The Hessian in l is
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


def _check_parameter(owner: object, name: str, value: object, *, finite: bool = False,
                     minimum: float = 0.0) -> float:
    """The one rule for a set's scalar parameter: a real number (not a bool), not NaN,
    >= ``minimum``, finite where ``finite``. Returns it as a float."""
    label = f"{type(owner).__name__}.{name}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{label} must be a real number, got {type(value).__name__}")
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
    """An ambiguity set around P_n: everything its users need, written once.

    * :meth:`worst_case`: value (what :func:`robust_mean` trains on), weights and dual;
    * for the linear-world estimators (:mod:`drosim.estimators`), a dual objective A(l, a)
      jointly convex in the losses and ``dual_size`` dual variables with
      inf_a A(l, a) = the worst case: :meth:`dual_objective`, :meth:`dual_derivatives`
      (for Newton steps) and :meth:`solve_dual` (the exact a*, optionally warm-started).

    Parameters are validated once, at construction, one rule per parameter (the message
    names it): a radius is a real number >= 0, and +inf is allowed where the set has a
    limit there (the max for the chi-square and KL balls, the mean for a KL temperature).
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
    def worst_case(self, losses: Tensor, grad_sq_norms: Tensor | None = None) -> DROResult:
        """sup_{Q in the set} E_Q[l] for losses ``(..., n)``: value (differentiable, with
        Danskin's gradient), weights and dual. ``grad_sq_norms`` ``(..., n)``, the squared
        input-gradient norms, is read by sets that ``needs_input_gradients`` only."""

    @abstractmethod
    def dual_objective(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0
                       ) -> Tensor:
        """A(l, a) for losses ``(T, n)`` and dual ``(T, dual_size)``, +inf off its domain.

        ``unit`` ``(T,)``: the losses are given divided by it. Every set here is positively
        homogeneous (A(u l, u a) = u A(l, a)) except a fixed temperature, whose tau is then
        read as tau / unit.
        """

    @abstractmethod
    def dual_derivatives(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0
                         ) -> DualDerivatives:
        """A(l, a) and its first and second derivatives, see :class:`DualDerivatives`."""

    def solve_dual(self, losses: Tensor, start: Tensor | None = None) -> Tensor:
        """The exact minimiser a* of A(losses, .), shape ``(T, dual_size)``; ``start`` is an
        optional guess of it (same shape)."""
        return losses.new_zeros(losses.shape[0], 0)


class _MeanDual:
    """A = mean(l), no dual variable: the loss side of {P_n} and of a Wasserstein set."""

    def dual_objective(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0
                       ) -> Tensor:
        return losses.mean(-1)

    def dual_derivatives(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0
                         ) -> DualDerivatives:
        return _mean_derivatives(losses)


def _mean_derivatives(losses: Tensor) -> DualDerivatives:
    """A = mean(l): gradient 1/n, no curvature."""
    n = losses.shape[-1]
    zeros = torch.zeros_like(losses)
    return DualDerivatives(losses.mean(-1), torch.full_like(losses, 1.0 / n), zeros, zeros,
                           torch.zeros_like(losses[..., 0]))


@dataclass(frozen=True)
class Empirical(_MeanDual, AmbiguitySet):
    """{P_n}: no robustness, the worst case is the mean (``robust_mean(l, None)``)."""

    @property
    def is_empirical(self) -> bool:
        return True

    def worst_case(self, losses: Tensor, grad_sq_norms: Tensor | None = None) -> DROResult:
        _check_losses(losses)
        n = losses.shape[-1]
        weights = torch.full_like(losses.detach(), 1.0 / n)
        return DROResult(losses.mean(-1), weights,
                         torch.full_like(weights[..., 0], math.nan))


@dataclass(frozen=True)
class _Ball(AmbiguitySet):
    """A divergence ball of radius rho around P_n, solved for one dual variable; rho = 0 is
    P_n itself and rho = inf every distribution on the samples (the worst case is the max)."""

    rho: float
    dual_size: ClassVar[int] = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", _check_parameter(self, "rho", self.rho))

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
    def _protecting_radius(f: float) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class Chi2(_Ball):
    """chi-square ball {Q : 1/2 E_P[(dQ/dP - 1)^2] <= rho}; rho = inf is every Q (the max).

    Dual: A(l, eta) = eta + sqrt(1 + 2 rho) sqrt(E_{P_n}[(l - eta)_+^2]).
    """

    dual_is_strictly_convex: ClassVar[bool] = False

    @staticmethod
    def _protecting_radius(f: float) -> float:
        # 1/2 E_P[(dQ/dP - 1)^2] with dQ/dP = 1/f on mass f: (1/f - 1) / 2
        return 0.5 * (1.0 / f - 1.0)

    def worst_case(self, losses: Tensor, grad_sq_norms: Tensor | None = None) -> DROResult:
        return chi2_worst_case(losses, self.rho)

    def dual_objective(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0
                       ) -> Tensor:
        eta = dual[..., 0]
        excess = (losses - eta.unsqueeze(-1)).clamp_min(0)
        return eta + math.sqrt((1 + 2 * self.rho) / losses.shape[-1]) * excess.norm(dim=-1)

    def dual_derivatives(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0
                         ) -> DualDerivatives:
        """With e = (l - eta)_+ and M = de/d(l, eta), the Hessian of ||e|| is
        M^T (I - u u^T) M / ||e||, u = e / ||e||."""
        n = losses.shape[-1]
        c = math.sqrt(1 + 2 * self.rho)
        eta = dual[..., 0]
        e = (losses - eta.unsqueeze(-1)).clamp_min(0)
        active = (e > 0).to(losses.dtype)
        safe = e.norm(dim=-1).clamp_min(torch.finfo(losses.dtype).tiny)
        k = c / (math.sqrt(n) * safe)
        unit_e = e / safe.unsqueeze(-1)
        total = unit_e.sum(-1)
        return DualDerivatives(
            value=self.dual_objective(losses, dual),
            grad_l=k.unsqueeze(-1) * e,
            diag=k.unsqueeze(-1) * active,
            low=unit_e,
            low_sign=-k,
            grad_a=(1 - k * e.sum(-1)).unsqueeze(-1),
            cross=(k.unsqueeze(-1) * (unit_e * total.unsqueeze(-1) - active)).unsqueeze(-1),
            hess_a=(k * (active.sum(-1) - total.square())).reshape(-1, 1, 1),
        )

    def solve_dual(self, losses: Tensor, start: Tensor | None = None) -> Tensor:
        """eta*; without a ``start``, from the stationary point with every loss active,
        eta = mean - sqrt(Var / (2 rho)), which is eta* when no weight is clipped."""
        _check_losses(losses)
        rho = torch.full_like(losses[..., 0], self.rho)
        if start is None:
            start = (losses.mean(-1) - torch.sqrt(losses.var(-1, unbiased=False) / (2 * rho))
                     ).unsqueeze(-1)
        return _chi2_dual_warm(losses, rho, start[..., 0]).unsqueeze(-1)


def _tilted_value(losses: Tensor, tau: Tensor, rho: float) -> tuple[Tensor, Tensor, Tensor]:
    """(A, log E exp(l / tau), l / tau) for A = tau rho + tau log E exp(l / tau); A = +inf
    where tau <= 0 (off the domain), and the other two are taken at tau = 1 there."""
    safe = torch.where(tau > 0, tau, 1.0)
    z = losses / safe.unsqueeze(-1)
    lse = torch.logsumexp(z, -1) - math.log(losses.shape[-1])
    return torch.where(tau > 0, safe * (lse + rho), math.inf), lse, z


def _tilted_derivatives(losses: Tensor, tau: Tensor, rho: float | None) -> DualDerivatives:
    """A = tau rho + tau log E exp(l / tau), tau a dual variable when rho is given.

    In l the Hessian is (diag(q) - q q^T) / tau, q = softmax(l / tau); in tau,
    dA/dtau = rho + log E exp(l/tau) - E_q l / tau and d^2A/dtau^2 = Var_q(l) / tau^3.
    """
    value, lse, z = _tilted_value(losses, tau, rho or 0.0)
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

    Dual: A(l, tau) = tau rho + tau log E_{P_n}[exp(l / tau)], tau > 0.
    """

    @staticmethod
    def _protecting_radius(f: float) -> float:
        # E_Q[log dQ/dP] with dQ/dP = 1/f on mass f: log(1/f)
        return -math.log(f)

    def worst_case(self, losses: Tensor, grad_sq_norms: Tensor | None = None) -> DROResult:
        return kl_worst_case(losses, self.rho)

    def dual_objective(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0
                       ) -> Tensor:
        return _tilted_value(losses, dual[..., 0], self.rho)[0]

    def dual_derivatives(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0
                         ) -> DualDerivatives:
        return _tilted_derivatives(losses, dual[..., 0], self.rho)

    def solve_dual(self, losses: Tensor, start: Tensor | None = None) -> Tensor:
        """tau*, by safeguarded Newton steps from ``start`` (by default the small-radius
        expansion tau* ~ sqrt(Var / (2 rho))). Where the worst case is the max (tau* = 0,
        the boundary of the domain tau > 0) the interior point tau = 1e-3 spread(l) instead
        (1e-3 max |l| for a flat row), whose objective exceeds the max by at most
        1e-3 rho spread(l): Newton steps need a point inside."""
        if self.rho < _KL_SMALL_RADIUS[losses.dtype]:
            tau = kl_worst_case(losses, self.rho).dual
        else:
            _check_losses(losses)
            rho = torch.full_like(losses[..., 0], self.rho)
            with torch.no_grad():
                z, scale = _normalise(losses.detach())
                on_max = rho >= torch.log(losses.shape[-1] / (z == 0).sum(-1).to(z.dtype))
                # Without a start, the small-radius expansion tau* ~ sqrt(Var / (2 rho)).
                u0 = (0.5 * torch.log(z.var(-1, unbiased=False) / (2 * rho)) if start is None
                      else torch.log(start[..., 0] * scale.factor / scale.scale))
                tau_z = _kl_solve(z, z.mean(-1), rho, u0).exp()
                tau = scale.restore_spread(torch.where(on_max, 0.0, tau_z))
        # Flat rows have A = l + tau rho for every tau: any positive tau on their scale does.
        spread = losses.amax(-1) - losses.amin(-1)
        size = losses.abs().amax(-1)
        inside = 1e-3 * torch.where(spread > 0, spread, torch.where(size > 0, size, 1.0))
        return torch.where(tau > 0, tau, inside).unsqueeze(-1)


@dataclass(frozen=True)
class KLTemperature(AmbiguitySet):
    """Fixed-temperature KL penalty tau log E exp(l / tau) (KL-DPO, the authors' KL-REBEL):
    sup_Q E_Q[l] - tau KL(Q || P_n). tau = 0 is the max, tau = inf the mean."""

    tau: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", _check_parameter(self, "tau", self.tau))

    @property
    def is_empirical(self) -> bool:
        return math.isinf(self.tau)

    @property
    def is_minimax(self) -> bool:
        return self.tau == 0

    def worst_case(self, losses: Tensor, grad_sq_norms: Tensor | None = None) -> DROResult:
        return kl_tilted(losses, self.tau)

    def _tau(self, losses: Tensor, unit: Tensor | float) -> Tensor:
        tau = torch.as_tensor(self.tau / unit, dtype=losses.dtype, device=losses.device)
        return tau.expand(losses.shape[:-1])

    def dual_objective(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0
                       ) -> Tensor:
        return _tilted_value(losses, self._tau(losses, unit), 0.0)[0]

    def dual_derivatives(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0
                         ) -> DualDerivatives:
        return _tilted_derivatives(losses, self._tau(losses, unit), None)


@dataclass(frozen=True)
class Wasserstein(_MeanDual, AmbiguitySet):
    """Type-p Wasserstein ball of radius rho on the inputs z (Euclidean cost), in its
    first-order form: worst case = E l + rho (E ||grad_z l||^q)^(1/q), q = p / (p - 1).

    rho must be finite (an infinite budget moves every input anywhere); p is in [1, inf].
    The worst case needs the per-sample input-gradient norms (``needs_input_gradients``);
    in the estimators' dual objective the losses enter through their mean, and the
    linear world's exact forms add the penalty on the model (:mod:`drosim.estimators`).
    """

    rho: float
    p: float = 2.0
    needs_input_gradients: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", _check_parameter(self, "rho", self.rho, finite=True))
        object.__setattr__(self, "p", _check_parameter(self, "p", self.p, minimum=1.0))

    @property
    def is_empirical(self) -> bool:
        return self.rho == 0

    def worst_case(self, losses: Tensor, grad_sq_norms: Tensor | None = None) -> DROResult:
        """value = E l + penalty; weights uniform (each loss enters the mean alike); dual =
        (E ||grad_z l||^q)^(1/q), the value's derivative in rho."""
        _check_losses(losses)
        if grad_sq_norms is None:
            raise ValueError("a Wasserstein set needs grad_sq_norms, the per-sample squared "
                             "norms of the loss gradients with respect to the inputs")
        if grad_sq_norms.shape != losses.shape:
            raise ValueError(f"grad_sq_norms {tuple(grad_sq_norms.shape)} must match losses "
                             f"{tuple(losses.shape)}")
        penalty = wasserstein_penalty(grad_sq_norms, self.rho, self.p)
        with torch.no_grad():
            dual = wasserstein_penalty(grad_sq_norms.detach(), 1.0, self.p)
            weights = torch.full_like(losses.detach(), 1.0 / losses.shape[-1])
        return DROResult(losses.mean(-1) + penalty, weights, dual)


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
    losses: Tensor, spec: AmbiguitySet | None = None, *, grad_sq_norms: Tensor | None = None
) -> Tensor:
    """The robust aggregate of per-sample losses, differentiable for training.

    Its gradient is the Danskin gradient sum_i q_i* grad l_i with the worst-case weights q*
    held fixed. ``spec=None`` is the plain mean; a :class:`Wasserstein` spec needs the
    per-sample squared input-gradient norms and returns mean(l) + wasserstein_penalty.

    Args:
        losses: ``(..., n)`` per-sample losses carrying the autograd graph.
        spec: Chi2(rho), KL(rho), KLTemperature(tau), Wasserstein(rho, p), Empirical() or
            None.
        grad_sq_norms: ``(..., n)`` ||grad_z l_i||^2, required for Wasserstein only.

    Returns:
        Tensor of shape ``losses.shape[:-1]`` (a scalar for a 1-D batch).

    Raises:
        ValueError: as the underlying solver, or a Wasserstein spec without grad_sq_norms.
        TypeError: an unknown spec.

    Example:
        >>> import torch
        >>> from drosim.dro import Chi2, robust_mean
        >>> l = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
        >>> robust_mean(l, Chi2(0.1)).backward()  # d/dl_i = worst-case weight q_i
        >>> [round(g, 4) for g in l.grad.tolist()]
        [0.1, 0.2, 0.3, 0.4]
    """
    return as_ambiguity_set(spec).worst_case(losses, grad_sq_norms).value
