"""(DRO-)REBEL and (DRO-)DPO estimators in the linear world, batched over trials.

Every estimator is one pointwise loss of the linear score s_i = <w, dphi_i> times one
robust aggregation (the ambiguity specs of :mod:`drosim.dro`):

* REBEL: l_i = (s_i - dr_i)^2 (paper section 2), DPO: l_i = -o_i log sigmoid(beta s_i)
  - (1 - o_i) log sigmoid(-beta s_i) (section 4);
* aggregation: the mean (spec None), chi-square and KL balls, the fixed-temperature KL,
  or Wasserstein. Wasserstein uses the exact closed forms of the linear world: for REBEL
  with p = 2, (sqrt(E l) + rho ||w||)^2 (a square-root-lasso); for DPO with p = 1,
  E l + rho beta ||w|| (the logistic loss is beta ||w||-Lipschitz in dphi, and the type-1
  worst case of a Lipschitz loss with a cost on the inputs only is mean + rho * Lipschitz
  constant, Shafieezadeh-Abadeh et al. 2015).

The robust objectives are jointly convex in w and the dual variable (eta for chi-square,
tau for KL), and smooth except in the minimax regime (a radius so large that the worst case
is the largest loss; the fit warns there). Each fit is a damped Newton method on (w, dual)
with exact derivatives, the dual re-minimised exactly by :mod:`drosim.dro` after each step,
and a backtracking line search along the Newton ray evaluated for all step sizes at once.
Nothing loops over trials or samples in Python; the only host synchronisation is the
early stop, once per iteration. The returned objective is evaluated by :mod:`drosim.dro`
at the fitted w.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from drosim.dro import (
    KL,
    AmbiguitySet,
    Chi2,
    KLTemperature,
    Wasserstein,
    chi2_worst_case,
    kl_tilted,
    kl_worst_case,
)

__all__ = ["Fit", "dpo", "rebel", "robust_objective"]

_NEWTON_ITERATIONS = 40
_LINE_SEARCH_STEPS = 20  # step sizes 1, 1/2, ..., 2^-19


class Fit(NamedTuple):
    """A batch of fitted estimators.

    Attributes:
        w: ``(T, d)`` the minimisers (for REBEL, the estimate of (theta - theta_t) / eta).
        objective: ``(T,)`` the robust objective at w, evaluated by :mod:`drosim.dro`.
        dual: ``(T,)`` the optimal dual variable (eta* for chi-square, tau* for KL), NaN
            where the aggregation has none.
    """

    w: Tensor
    objective: Tensor
    dual: Tensor


# ------------------------------------------------------------------ pointwise losses


@dataclass(frozen=True)
class _Pointwise:
    """l_i = f(s_i) with its first two derivatives in the score s_i = <w, dphi_i>."""

    kind: str  # "squared" (target y) or "logistic" (label y in {0, 1}, slope beta)
    target: Tensor  # (T, n)
    beta: float = 1.0

    def derivatives(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.kind == "squared":
            r = s - self.target
            return r.square(), 2 * r, torch.full_like(s, 2.0)
        sign = 2 * self.target - 1
        margin = sign * self.beta * s
        p = torch.sigmoid(self.beta * s)
        return (torch.nn.functional.softplus(-margin), -sign * self.beta * torch.sigmoid(-margin),
                self.beta**2 * p * (1 - p))

    def value(self, s: Tensor) -> Tensor:
        if self.kind == "squared":
            return (s - self.target).square()
        return torch.nn.functional.softplus(-(2 * self.target - 1) * self.beta * s)


# ------------------------------------------------------------------- aggregations


class _Curvature(NamedTuple):
    """Derivatives of an aggregation A(l, a) in the losses l (n) and a dual variable a.

    The Hessian in l is diag(diag) + low_sign * low low^T. The dual terms are None when the
    aggregation has no dual variable.
    """

    value: Tensor  # (T,)
    grad_l: Tensor  # (T, n)
    diag: Tensor  # (T, n)
    low: Tensor  # (T, n)
    low_sign: Tensor  # (T,)
    grad_a: Tensor | None = None  # (T, 1)
    cross: Tensor | None = None  # (T, n, 1)  d^2 A / dl da
    hess_a: Tensor | None = None  # (T, 1, 1)


def _chi2_curvature(l: Tensor, eta: Tensor, rho: float) -> _Curvature:
    """A = eta + c ||e|| / sqrt(n), e = (l - eta)_+, c = sqrt(1 + 2 rho).

    With M = de/d(l, eta), the Hessian of ||e|| is M^T (I - u u^T) M / ||e||, u = e / ||e||.
    """
    n = l.shape[-1]
    c = math.sqrt(1 + 2 * rho)
    e = (l - eta.unsqueeze(-1)).clamp_min(0)
    active = (e > 0).to(l.dtype)
    norm = e.norm(dim=-1).clamp_min(torch.finfo(l.dtype).tiny)
    k = c / (math.sqrt(n) * norm)
    unit = e / norm.unsqueeze(-1)
    total = unit.sum(-1)
    return _Curvature(
        value=eta + c * norm / math.sqrt(n),
        grad_l=k.unsqueeze(-1) * e,
        diag=k.unsqueeze(-1) * active,
        low=unit,
        low_sign=-k,
        grad_a=(1 - k * e.sum(-1)).unsqueeze(-1),
        cross=(k.unsqueeze(-1) * (unit * total.unsqueeze(-1) - active)).unsqueeze(-1),
        hess_a=(k * (active.sum(-1) - total.square())).reshape(-1, 1, 1),
    )


def _kl_curvature(l: Tensor, tau: Tensor, rho: float | None) -> _Curvature:
    """A = tau rho + tau log E exp(l / tau), with tau a dual variable when rho is given.

    In l the Hessian is (diag(q) - q q^T) / tau, q = softmax(l / tau); in tau,
    dA/dtau = rho + log E exp(l/tau) - E_q l / tau and d^2A/dtau^2 = Var_q(l) / tau^3.
    """
    n = l.shape[-1]
    z = l / tau.unsqueeze(-1)
    lse = torch.logsumexp(z, -1) - math.log(n)
    q = torch.softmax(z, -1)
    if rho is None:
        return _Curvature(tau * lse, q, q / tau.unsqueeze(-1), q, -1 / tau)
    mean = (q * l).sum(-1)
    centred = l - mean.unsqueeze(-1)
    return _Curvature(
        value=tau * (rho + lse),
        grad_l=q,
        diag=q / tau.unsqueeze(-1),
        low=q,
        low_sign=-1 / tau,
        grad_a=(rho + lse - mean / tau).unsqueeze(-1),
        cross=(-q * centred / tau.square().unsqueeze(-1)).unsqueeze(-1),
        hess_a=((q * centred.square()).sum(-1) / tau.pow(3)).reshape(-1, 1, 1),
    )


def _mean_curvature(l: Tensor) -> _Curvature:
    """A = mean(l)."""
    n = l.shape[-1]
    zeros = torch.zeros_like(l)
    return _Curvature(l.mean(-1), torch.full_like(l, 1.0 / n), zeros, zeros,
                      torch.zeros_like(l[..., 0]))


# ---------------------------------------------------------------------- the solver


@dataclass(frozen=True)
class _Problem:
    """min over x = (w, a) of A(l(w), a) + penalty * ||w||  (+ ridge / 2 ||w||^2)."""

    dphi: Tensor  # (T, n, d)
    loss: _Pointwise
    spec: AmbiguitySet | None
    penalty: float  # coefficient of ||w||_2 (Wasserstein)
    ridge: float

    def curvature(self, l: Tensor, a: Tensor) -> _Curvature:
        spec = self.spec
        if isinstance(spec, Chi2):
            return _chi2_curvature(l, a[..., 0], spec.rho)
        if isinstance(spec, KL):
            return _kl_curvature(l, a[..., 0], spec.rho)
        if isinstance(spec, KLTemperature):
            return _kl_curvature(l, torch.full_like(l[..., 0], spec.tau), None)
        return _mean_curvature(l)

    def objective(self, x: Tensor, step: Tensor | None = None,
                  alphas: Tensor | None = None) -> Tensor:
        """The joint objective at x (T, d + k), or at x + alpha * step for each alpha (S,).

        Scores are linear in w, so the line search reuses <dphi, w> and <dphi, step>
        instead of multiplying dphi by every trial point. +inf where tau <= 0.
        """
        d = self.dphi.shape[-1]
        scores = (self.dphi @ x[..., :d].unsqueeze(-1)).squeeze(-1)
        if step is not None:
            alphas = alphas.reshape(-1, 1, 1)
            scores = scores + alphas * (self.dphi @ step[..., :d].unsqueeze(-1)).squeeze(-1)
            x = x + alphas * step
        w, a = x[..., :d], x[..., d:]
        l = self.loss.value(scores)
        spec = self.spec
        if isinstance(spec, Chi2):
            c = math.sqrt(1 + 2 * spec.rho)
            e = (l - a).clamp_min(0)
            value = a[..., 0] + c * e.norm(dim=-1) / math.sqrt(l.shape[-1])
        elif isinstance(spec, KL):
            tau = a[..., 0]
            safe = torch.where(tau > 0, tau, 1.0)
            lse = torch.logsumexp(l / safe.unsqueeze(-1), -1) - math.log(l.shape[-1])
            value = torch.where(tau > 0, safe * (spec.rho + lse), math.inf)
        elif isinstance(spec, KLTemperature):
            value = spec.tau * (torch.logsumexp(l / spec.tau, -1) - math.log(l.shape[-1]))
        else:
            value = l.mean(-1)
        return value + self.penalty * w.norm(dim=-1) + 0.5 * self.ridge * w.square().sum(-1)

    def newton_direction(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(gradient, Newton direction) of the joint objective at x (T, d + k)."""
        d = self.dphi.shape[-1]
        w, a = x[..., :d], x[..., d:]
        s = torch.einsum("tnd,td->tn", self.dphi, w)
        l, f1, f2 = self.loss.derivatives(s)
        cur = self.curvature(l, a)
        jac = f1.unsqueeze(-1) * self.dphi  # (T, n, d): d l_i / d w
        grad_w = torch.einsum("tn,tnd->td", cur.grad_l, jac)
        curv = cur.grad_l * f2 + cur.diag * f1.square()
        hess_w = (self.dphi * curv.unsqueeze(-1)).transpose(-1, -2) @ self.dphi
        low = torch.einsum("tn,tnd->td", cur.low, jac)
        hess_w = hess_w + cur.low_sign.reshape(-1, 1, 1) * low.unsqueeze(-1) * low.unsqueeze(-2)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        if self.penalty > 0:
            norm = w.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
            unit = w / norm
            grad_w = grad_w + self.penalty * unit
            hess_w = hess_w + (self.penalty / norm).unsqueeze(-1) * (
                eye - unit.unsqueeze(-1) * unit.unsqueeze(-2))
        if self.ridge > 0:
            grad_w = grad_w + self.ridge * w
            hess_w = hess_w + self.ridge * eye
        grad, hess = grad_w, hess_w
        if cur.grad_a is not None:
            cross = torch.einsum("tnk,tnd->tdk", cur.cross, jac)
            grad = torch.cat([grad_w, cur.grad_a], -1)
            hess = torch.cat([torch.cat([hess_w, cross], -1),
                              torch.cat([cross.transpose(-1, -2), cur.hess_a], -1)], -2)
        # A relative Levenberg term keeps singular Hessians (n < d, flat pieces) solvable
        # without moving the minimiser: it only shortens steps.
        scale = hess.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1.0)
        damped = hess + 1e-12 * scale.reshape(-1, 1, 1) * torch.eye(
            hess.shape[-1], dtype=x.dtype, device=x.device)
        step = -torch.linalg.solve(damped, grad.unsqueeze(-1)).squeeze(-1)
        return grad, step

    def minimise(self, x: Tensor, iterations: int = _NEWTON_ITERATIONS) -> Tensor:
        """Damped Newton from x; stops early once no trial moves (checked every step)."""
        steps = 0.5 ** torch.arange(_LINE_SEARCH_STEPS, dtype=x.dtype, device=x.device)
        d = self.dphi.shape[-1]
        for _ in range(iterations):
            grad, step = self.newton_direction(x)
            current = self.objective(x)
            slope = (grad * step).sum(-1)
            # Armijo with the full Newton step first: near the optimum it is always taken,
            # and only trials that reject it pay for the backtracking grid.
            # Rounding slack: at the optimum the full step may not decrease the objective.
            bound = current + 1e-4 * slope + 1e-13 * current.abs()
            full = self.objective(x, step, steps[:1])[0]
            alpha = (full <= bound).to(x.dtype)
            if not bool(alpha.all()):
                values = self.objective(x, step, steps)  # (S, T)
                armijo = values <= current + 1e-4 * steps.unsqueeze(-1) * slope
                first = armijo.to(torch.int8).argmax(0)
                fallback = torch.where(armijo.any(0), steps[first], 0.0)
                alpha = torch.where(alpha > 0, alpha, fallback)
            x = x + alpha.unsqueeze(-1) * step
            if x.shape[-1] > d:
                # Partial minimisation: the exact dual variable at the new w (drosim.dro)
                # can only lower the joint objective, and it keeps Newton off the flat face
                # eta >= max(l), where the joint Hessian vanishes.
                x = torch.cat([x[..., :d], _initial_dual(self, x[..., :d])], -1)
            # Stop once every trial has converged (Newton decrement at rounding level) or
            # stalled (no step decreases the objective: a kink, handled by the caller).
            moving = (-slope > 1e-13 * (1 + current.abs())) & (alpha > 0)
            if not bool(moving.any()):
                break
        return x


def _check_batch(dphi: Tensor, target: Tensor, name: str) -> None:
    if dphi.ndim != 3:
        raise ValueError(f"dphi must be (trials, n, d), got shape {tuple(dphi.shape)}")
    if dphi.shape[1] == 0:
        raise ValueError("empty batch: dphi has n = 0 samples")
    if target.shape != dphi.shape[:2]:
        raise ValueError(f"{name} must have shape {tuple(dphi.shape[:2])} to match dphi, got "
                         f"{tuple(target.shape)}")
    for tensor, label in ((dphi, "dphi"), (target, name)):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{label} contains NaN or infinite values")


def _initial_dual(problem: _Problem, w: Tensor) -> Tensor:
    """The exact dual variable at w, from drosim.dro (a feasible, well-scaled start)."""
    spec = problem.spec
    l = problem.loss.value(torch.einsum("tnd,td->tn", problem.dphi, w))
    if isinstance(spec, Chi2):
        return chi2_worst_case(l, spec.rho).dual.unsqueeze(-1)
    if isinstance(spec, KL):
        tau = kl_worst_case(l, spec.rho).dual
        spread = (l.amax(-1) - l.amin(-1)).clamp_min(1e-12)
        # tau* = 0 (worst case on the max) is a boundary: start just inside.
        return tau.clamp_min(1e-3 * spread).unsqueeze(-1)
    return w.new_zeros(w.shape[0], 0)


def _fit(problem: _Problem, w0: Tensor) -> Fit:
    """Newton from w0, then the better of its end point and w = 0.

    The robust objectives are smooth except where every loss is equal (DPO at w = 0, where
    each loss is log 2) or at w = 0 itself (the Wasserstein norm). Large radii put the
    minimiser exactly there, where Newton can only crawl, so that point is compared
    explicitly.
    """
    x0 = torch.cat([w0, _initial_dual(problem, w0)], -1)
    fit = _best_of(problem, [problem.minimise(x0)[..., : problem.dphi.shape[-1]],
                             torch.zeros_like(w0)])
    _warn_if_minimax(problem, fit.w)
    return fit


def _best_of(problem: _Problem, candidates: list[Tensor]) -> Fit:
    """Per trial, the candidate w ``(T, d)`` with the lowest robust objective."""
    results = [robust_objective(problem, w) for w in candidates]
    objectives = torch.stack([objective for objective, _ in results])  # (C, T)
    best = objectives.argmin(0, keepdim=True)
    w = torch.stack(candidates).gather(0, best.unsqueeze(-1).expand(1, *candidates[0].shape))
    dual = torch.stack([dual for _, dual in results]).gather(0, best)
    return Fit(w[0], objectives.gather(0, best)[0], dual[0])


def _least_squares(dphi: Tensor, dr: Tensor) -> Tensor:
    """argmin_w mean (<w, dphi_i> - dr_i)^2 by the normal equations, batched.

    A ridge of 1e-12 times the Gram matrix's mean eigenvalue keeps rank-deficient batches
    (n < d, repeated features) solvable; it moves the solution only at rounding level.
    """
    gram = dphi.transpose(-1, -2) @ dphi
    ridge = 1e-12 * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    moment = (dr.unsqueeze(-2) @ dphi).squeeze(-2)  # dphi^T dr
    return torch.linalg.solve(gram + ridge.reshape(-1, 1, 1) * eye, moment)


def _square_root_lasso(dphi: Tensor, dr: Tensor, rho: float) -> Tensor:
    """argmin_w ||dphi w - dr|| / sqrt(n) + rho ||w||, exactly, batched: W-REBEL (p = 2).

    Stationarity reads dphi^T r + lambda w = 0 with lambda = rho sqrt(n) ||r|| / ||w||, so
    the minimiser is the ridge solution w(lambda) = (dphi^T dphi + lambda I)^-1 dphi^T dr at
    the root of rho sqrt(n) ||r(lambda)|| = lambda ||w(lambda)|| (the left side grows and the
    right side's ratio to it grows with lambda). One eigendecomposition of dphi^T dphi makes
    each evaluation O(d^2), and bisection in log lambda finds the root to rounding. Where no
    root exists the minimiser is w = 0 (when rho sqrt(n) ||dr|| >= ||dphi^T dr||) or the
    exact least-squares fit (zero residuals); both are among the candidates compared.
    """
    n = dphi.shape[1]
    gram = dphi.transpose(-1, -2) @ dphi
    evals, evecs = torch.linalg.eigh(gram)
    evals = evals.clamp_min(0)
    b = (evecs.transpose(-1, -2) @ (dphi.transpose(-1, -2) @ dr.unsqueeze(-1))).squeeze(-1)
    yy = dr.square().sum(-1)

    def ridge(lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(w in the eigenbasis, ||r||, ||w||) at lambda."""
        coef = b / (evals + lam.unsqueeze(-1))
        resid_sq = yy - 2 * (coef * b).sum(-1) + (coef.square() * evals).sum(-1)
        return coef, resid_sq.clamp_min(0).sqrt(), coef.norm(dim=-1)

    scale = evals.amax(-1).clamp_min(torch.finfo(dphi.dtype).tiny)
    lo, hi = torch.log(scale) - 40, torch.log(scale) + 40
    for _ in range(200):  # bisection: the bracket spans 80 nats, 2^-200 of it is rounding
        mid = 0.5 * (lo + hi)
        _, resid, norm = ridge(mid.exp())
        grow = rho * math.sqrt(n) * resid > mid.exp() * norm  # lambda below the root
        lo, hi = torch.where(grow, mid, lo), torch.where(grow, hi, mid)
    coef, _, _ = ridge((0.5 * (lo + hi)).exp())
    return (evecs @ coef.unsqueeze(-1)).squeeze(-1)


def _warn_if_minimax(problem: _Problem, w: Tensor) -> None:
    """Warn when the worst case at w is the max: min_w max_i l_i(w) is a non-smooth problem,
    and the Newton iterates are not guaranteed to reach its minimiser."""
    if isinstance(problem.spec, Chi2 | KL):
        l = problem.loss.value(torch.einsum("tnd,td->tn", problem.dphi, w))
        at_max = (robust_objective(problem, w)[0] >= l.amax(-1)) & (l.amax(-1) > l.amin(-1))
        if bool(at_max.any()):
            warnings.warn(f"{int(at_max.sum())} fit(s) sit in the minimax regime (the worst case "
                          f"is the largest loss): the radius {problem.spec} is too large for n = "
                          f"{l.shape[-1]}, and the fit may not be the exact minimiser",
                          RuntimeWarning, stacklevel=3)


def robust_objective(problem: _Problem, w: Tensor) -> tuple[Tensor, Tensor]:
    """The robust objective at w and its dual variable, evaluated by drosim.dro."""
    spec = problem.spec
    l = problem.loss.value(torch.einsum("tnd,td->tn", problem.dphi, w))
    ridge = 0.5 * problem.ridge * w.square().sum(-1)
    nan = torch.full_like(l[..., 0], math.nan)
    if isinstance(spec, Chi2):
        r = chi2_worst_case(l, spec.rho)
        return r.value + ridge, r.dual
    if isinstance(spec, KL):
        r = kl_worst_case(l, spec.rho)
        return r.value + ridge, r.dual
    if isinstance(spec, KLTemperature):
        return kl_tilted(l, spec.tau).value + ridge, nan
    if isinstance(spec, Wasserstein) and problem.loss.kind == "squared":
        return (l.mean(-1).sqrt() + spec.rho * w.norm(dim=-1)).square() + ridge, nan
    return l.mean(-1) + problem.penalty * w.norm(dim=-1) + ridge, nan


def _plain(spec: AmbiguitySet | None) -> bool:
    """A ball of radius 0 is the empirical distribution itself."""
    return spec is None or (isinstance(spec, Chi2 | KL | Wasserstein) and spec.rho == 0)


def rebel(dphi: Tensor, dr: Tensor, spec: AmbiguitySet | None = None) -> Fit:
    """(DRO-)REBEL: argmin_w sup_{Q in ball(P_n)} E_Q[(<w, dphi> - dr)^2], batched.

    Args:
        dphi: ``(T, n, d)`` feature differences, one problem per trial.
        dr: ``(T, n)`` relative rewards.
        spec: None (REBEL, least squares), Chi2(rho), KL(rho), KLTemperature(tau) or
            Wasserstein(rho, p=2) (exact: (sqrt(E l) + rho ||w||)^2).

    Returns:
        Fit with w ``(T, d)``, the robust objective ``(T,)`` and the dual variable.

    Raises:
        ValueError: mismatched or empty batches, non-finite data, negative radius, or a
            Wasserstein order other than 2.

    Example:
        >>> import torch
        >>> from drosim.dro import Chi2
        >>> g = torch.Generator().manual_seed(0)
        >>> dphi = torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
        >>> dr = dphi @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        >>> fit = rebel(dphi, dr, Chi2(0.1))
        >>> torch.allclose(fit.w, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64).expand(2, 3))
        True
    """
    _check_batch(dphi, dr, "dr")
    _check_spec(spec)
    if isinstance(spec, Wasserstein) and spec.p != 2:
        raise ValueError(f"W-REBEL in the linear world is exact for p = 2, got p = {spec.p}")
    plain = _plain(spec)
    loss = _Pointwise("squared", dr)
    base = _Problem(dphi, loss, None, 0.0, 0.0)
    w_ls = _least_squares(dphi, dr)
    if plain:
        return Fit(w_ls, *robust_objective(base, w_ls))
    if isinstance(spec, Wasserstein):
        # The exact ridge-path solution, or one of the kinks it cannot reach (see there).
        return _best_of(_Problem(dphi, loss, spec, spec.rho, 0.0),
                        [_square_root_lasso(dphi, dr, spec.rho), w_ls, torch.zeros_like(w_ls)])
    return _fit(_Problem(dphi, loss, spec, 0.0, 0.0), w_ls)


def dpo(dphi: Tensor, pref: Tensor, beta: float, spec: AmbiguitySet | None = None,
        *, ridge: float = 0.0) -> Fit:
    """(DRO-)DPO: logistic regression of the preference o on beta * <w, dphi>, batched.

    Args:
        dphi: ``(T, n, d)`` feature differences.
        pref: ``(T, n)`` labels in {0, 1} (1 when the first response is preferred).
        beta: DPO's inverse temperature, > 0.
        spec: None (DPO), Chi2(rho), KL(rho), KLTemperature(tau) (KL-DPO) or
            Wasserstein(rho, p=1) (WDPO, exact: E l + rho beta ||w||).
        ridge: optional ridge / 2 ||w||^2, which keeps separable data bounded.

    Returns:
        Fit with w ``(T, d)`` (the estimate of the reward parameter), objective and dual.

    Raises:
        ValueError: mismatched or empty batches, labels outside {0, 1}, beta <= 0, negative
            radius or ridge, or a Wasserstein order other than 1.
    """
    _check_batch(dphi, pref, "pref")
    _check_spec(spec)
    if not bool(((pref == 0) | (pref == 1)).all()):
        raise ValueError("pref must hold labels 0 or 1")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if isinstance(spec, Wasserstein) and spec.p != 1:
        raise ValueError("WDPO in the linear world is exact for p = 1 (the logistic loss is "
                         f"Lipschitz in dphi); got p = {spec.p}")
    loss = _Pointwise("logistic", pref.to(dphi.dtype), beta)
    base = _Problem(dphi, loss, None, 0.0, ridge)
    w0 = base.minimise(dphi.new_zeros(dphi.shape[0], dphi.shape[-1]))
    if _plain(spec):
        return Fit(w0, *robust_objective(base, w0))
    penalty = spec.rho * beta if isinstance(spec, Wasserstein) else 0.0
    return _fit(_Problem(dphi, loss, spec, penalty, ridge), w0)


def _check_spec(spec: AmbiguitySet | None) -> None:
    if spec is None:
        return
    if not isinstance(spec, Chi2 | KL | KLTemperature | Wasserstein):
        raise TypeError(f"unknown ambiguity set {spec!r}")
    radius = spec.tau if isinstance(spec, KLTemperature) else spec.rho
    if not radius >= 0 or math.isinf(radius):
        raise ValueError(f"the radius / temperature of {spec!r} must be finite and >= 0")
    if isinstance(spec, KLTemperature) and spec.tau == 0:
        raise ValueError("KLTemperature(tau) needs tau > 0 for an estimator")
