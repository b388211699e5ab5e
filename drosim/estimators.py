"""(DRO-)REBEL and (DRO-)DPO estimators in the linear world, batched over trials.

Every estimator is one pointwise loss of the linear score s_i = <w, dphi_i> times one
robust aggregation (an ambiguity set of :mod:`drosim.dro`):

* REBEL: l_i = (s_i - dr_i)^2 (arXiv 2509.19104, section 2), DPO: l_i = -o_i log sigmoid(beta
  s_i) - (1 - o_i) log sigmoid(-beta s_i) (section 4);
* aggregation: the mean (spec None), chi-square and KL balls, the fixed-temperature KL,
  or Wasserstein. Wasserstein uses the exact closed forms of the linear world: for REBEL
  with p = 2, (sqrt(E l) + rho ||w||)^2 (a square-root lasso); for DPO with p = 1,
  E l + rho beta ||w|| (the logistic loss is beta ||w||-Lipschitz in dphi, and the type-1
  worst case of a Lipschitz loss with a cost on the inputs only is mean + rho * Lipschitz
  constant, Shafieezadeh-Abadeh et al. 2015).

The robust objectives are jointly convex in w and the set's dual variable (eta for
chi-square, tau for KL), and smooth except in the minimax regime (a radius so large that the
worst case is the largest loss; the fit warns there) and, for the balls and the Wasserstein
penalty in DPO, at w = 0 (see ``_Problem.fit``). Each fit is a damped Newton method on
(w, dual) with the exact derivatives of the set's dual objective
(:meth:`~drosim.dro.AmbiguitySet.dual_derivatives`); the chi-square dual is re-minimised
exactly after each step (:meth:`~drosim.dro.AmbiguitySet.solve_dual`, warm-started from the
step), and a line search on the halving grid runs on the scores, which are linear in w.
Trials leave the batch as they converge. Nothing loops over trials or samples in Python; the
only host synchronisation is the early stop, once per iteration. The returned objective is
the set's exact worst case at the fitted w (its dual re-solved warm, or
:meth:`~drosim.dro.AmbiguitySet.worst_case`).

The relative rewards of each trial are divided by a power of two near their largest value,
and dphi likewise where its scale is extreme (exact in floating point; every threshold is
relative to dphi's scale otherwise), so that data of any scale (1e-150 to 1e200) is fitted as
well as data of scale 1; a degenerate trial (an all-zero dphi) gets the minimum-norm
minimiser w = 0 without touching the others.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, replace
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor

from drosim.dro import (
    AmbiguitySet,
    Empirical,
    as_ambiguity_set,
    wasserstein_linear_sq_worst_case,
)

__all__ = ["Fit", "dpo", "rebel"]

_NEWTON_ITERATIONS = 40
_FINAL_DECREMENT = 1e-9  # Newton decrement (relative) from which a full step converges
_BACKTRACKS = 30  # step sizes 1, 1/2, ..., 2^-29
_SECULAR_ITERATIONS = 100  # safeguarded Newton steps of the square-root lasso's ridge path
_RAY = [0.25**k for k in range(7)]  # points t * u on the rays out of the kink at w = 0
_COLLAPSE = 1e-4  # ||w|| / ||w start|| below which Newton has collapsed into that kink
# dphi is rescaled only beyond 2^+-64, where its squares could leave the float range (every
# threshold of the Newton steps is relative to dphi's scale, so a copy would buy nothing).
_INPUT_SCALE_RANGE = 64


class Fit(NamedTuple):
    """A batch of fitted estimators.

    Attributes:
        w: ``(T, d)`` the minimisers (for REBEL, the estimate of (theta - theta_t) / eta).
        objective: ``(T,)`` the robust objective at w, the set's exact worst case.
        dual: ``(T,)`` the optimal dual variable (eta* for chi-square, tau* for KL), NaN
            where the aggregation has none.
    """

    w: Tensor
    objective: Tensor
    dual: Tensor


# ------------------------------------------------------------------ pointwise losses


@dataclass(frozen=True, eq=False)
class _Pointwise:
    """l_i = f(s_i) with its first two derivatives in the score s_i = <w, dphi_i>."""

    kind: str  # "squared" (target y) or "logistic" (label y in {0, 1}, slope beta)
    target: Tensor  # (T, n)
    beta: float = 1.0

    @cached_property
    def slope(self) -> Tensor:
        """``(T, n)`` (2 y - 1) beta for the logistic loss: its margin is slope * s."""
        return (2 * self.target - 1) * self.beta

    def derivatives(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.kind == "squared":
            r = s - self.target
            return r.square(), 2 * r, torch.full_like(s, 2.0)
        # With m = slope * s: l = softplus(-m), l' = -slope sigmoid(-m), l'' = beta^2
        # sigmoid(-m) sigmoid(m) (slope^2 = beta^2).
        negative_margin = -self.slope * s
        tail = torch.sigmoid(negative_margin)
        return (torch.nn.functional.softplus(negative_margin), -self.slope * tail,
                self.beta**2 * tail * (1 - tail))

    def value(self, s: Tensor, rows: Tensor | None = None) -> Tensor:
        """l(s); ``rows`` (indices) when s holds only those trials."""
        if self.kind == "squared":
            return (s - (self.target if rows is None else self.target[rows])).square()
        slope = self.slope if rows is None else self.slope[rows]
        return torch.nn.functional.softplus(-slope * s)


# ---------------------------------------------------------------------- the solver


@dataclass(frozen=True)
class _Problem:
    """min over (w, a) of A(l(<w, dphi>), a) + penalty ||w|| + ridge / 2 ||w||^2, per trial.

    A is the set's dual objective (:meth:`~drosim.dro.AmbiguitySet.dual_objective`) with the
    losses read in units of ``unit``; penalty and ridge are per trial, in the units of the
    (normalised) dphi.
    """

    dphi: Tensor  # (T, n, d)
    loss: _Pointwise
    spec: AmbiguitySet
    unit: Tensor  # (T,)
    penalty: Tensor  # (T,)
    ridge: Tensor  # (T,)

    @cached_property
    def dphi_t(self) -> Tensor:
        """dphi transposed, contiguous ``(T, d, n)``: <w, dphi_i> for every i and the
        Hessian read it about three times faster than dphi's own layout."""
        return self.dphi.transpose(-1, -2).contiguous()

    @cached_property
    def workspace(self) -> Tensor:
        """A buffer of dphi_t's size that every Newton step's Hessian reuses (a fresh
        allocation of that size costs about as much as filling it)."""
        return torch.empty_like(self.dphi_t)

    def scores(self, w: Tensor) -> Tensor:
        """``(T, n)`` s_i = <w, dphi_i> for w ``(T, d)``."""
        return (w.unsqueeze(-2) @ self.dphi_t).squeeze(-2)

    def objective(self, s: Tensor, w: Tensor, a: Tensor, rows: Tensor | None = None) -> Tensor:
        """The joint objective at scores s = <w, dphi> ``(T, n)``, w and the dual a; or, given
        ``rows`` (indices), at those trials' s, w and a only."""
        unit, penalty, ridge = ((self.unit, self.penalty, self.ridge) if rows is None else
                                (self.unit[rows], self.penalty[rows], self.ridge[rows]))
        value = self.spec.dual_objective(self.loss.value(s, rows), a, unit)
        return value + penalty * w.norm(dim=-1) + 0.5 * ridge * w.square().sum(-1)

    def newton_direction(self, s: Tensor, w: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """(gradient, Newton direction) of the joint objective in x = (w, a)."""
        d = w.shape[-1]
        l, f1, f2 = self.loss.derivatives(s)
        der = self.spec.dual_derivatives(l, a, self.unit)
        # One pass over dphi for every (T, n) -> (T, d) product: the gradient, the rank-one
        # factor and the cross derivative with the dual.
        rows = [der.grad_l * f1, der.low * f1]
        if der.cross is not None:
            rows.append(der.cross[..., 0] * f1)
        products = torch.stack(rows, -2) @ self.dphi  # (T, rows, d)
        grad_w, low = products[:, 0], products[:, 1]
        curv = der.grad_l * f2 + der.diag * f1.square()
        hess_w = torch.mul(self.dphi_t, curv.unsqueeze(-2), out=self.workspace) @ self.dphi
        hess_w = hess_w + der.low_sign.reshape(-1, 1, 1) * low.unsqueeze(-1) * low.unsqueeze(-2)
        eye = torch.eye(d, dtype=w.dtype, device=w.device)
        norm = w.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        unit_w = w / norm
        penalty = self.penalty.unsqueeze(-1)
        grad_w = grad_w + penalty * unit_w + self.ridge.unsqueeze(-1) * w
        hess_w = hess_w + (penalty / norm).unsqueeze(-1) * (
            eye - unit_w.unsqueeze(-1) * unit_w.unsqueeze(-2)) + self.ridge.reshape(-1, 1, 1) * eye
        grad, hess = grad_w, hess_w
        if der.grad_a is not None:
            cross = products[:, 2:].transpose(-1, -2)  # (T, d, 1)
            grad = torch.cat([grad_w, der.grad_a], -1)
            hess = torch.cat([torch.cat([hess_w, cross], -1),
                              torch.cat([cross.transpose(-1, -2), der.hess_a], -1)], -2)
        # A relative Levenberg term keeps singular Hessians (n < d, flat pieces, an all-zero
        # dphi) solvable without moving the minimiser: it only shortens steps.
        scale = hess.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
        scale = torch.where(scale > 0, scale, 1.0)
        damped = hess + 1e-12 * scale.reshape(-1, 1, 1) * torch.eye(
            hess.shape[-1], dtype=w.dtype, device=w.device)
        step = -torch.linalg.solve(damped, grad.unsqueeze(-1)).squeeze(-1)
        return grad, step

    def solve_dual(self, s: Tensor, start: Tensor | None = None) -> Tensor:
        """The exact dual variable at scores s (warm-started from ``start``)."""
        return self.spec.solve_dual(self.loss.value(s), start)

    def subset(self, keep: Tensor) -> _Problem:
        """The problem of the trials where ``keep`` ``(T,)`` is True."""
        return _Problem(self.dphi[keep], replace(self.loss, target=self.loss.target[keep]),
                        self.spec, self.unit[keep], self.penalty[keep], self.ridge[keep])

    def minimise(self, w: Tensor, *, kink_at_zero: bool = False) -> tuple[Tensor, Tensor]:
        """Damped Newton from w ``(T, d)``, batched; returns the minimiser and its dual
        variable ``(T, dual_size)``. With ``kink_at_zero``, a trial whose iterates have
        collapsed towards w = 0 (||w|| below ``_COLLAPSE`` times its start's) stops there:
        :meth:`fit` compares it with 0 and restarts it.

        A trial leaves the batch once it has converged (its Newton decrement is at rounding
        level, or will be after a full step) or stalled (no step size decreases its
        objective: a kink, which the caller handles), so the last iterations cost only what
        the slow trials need.
        """
        d = w.shape[-1]
        index, problem = torch.arange(w.shape[0], device=w.device), self
        s = self.scores(w)
        a = self.solve_dual(s)
        out, out_dual = w.clone(), a.clone()
        floor = _COLLAPSE * w.norm(dim=-1) if kink_at_zero else torch.zeros_like(w[:, 0])
        for _ in range(_NEWTON_ITERATIONS):
            grad, step = problem.newton_direction(s, w, a)
            step_w, step_a = step[..., :d], step[..., d:]
            ds = problem.scores(step_w)
            current = problem.objective(s, w, a)
            slope = (grad * step).sum(-1)
            moving = -slope > 1e-13 * (1 + current.abs())
            alpha = problem.line_search(s, w, a, step, ds, current, slope, moving)
            w, s = w + alpha.unsqueeze(-1) * step_w, s + alpha.unsqueeze(-1) * ds
            a = a + alpha.unsqueeze(-1) * step_a
            if a.shape[-1] and not self.spec.dual_is_strictly_convex:
                # Partial minimisation: the exact dual at the new w can only lower the joint
                # objective, and it keeps Newton off a flat face of the dual objective (chi2:
                # eta >= max(l)), where the joint Hessian vanishes.
                a = problem.solve_dual(s, a)
            # Newton converges quadratically: a full step from a decrement below 1e-9 leaves
            # one at rounding level (about its square), so that trial is done.
            done = (alpha == 1) & (-slope <= _FINAL_DECREMENT * (1 + current.abs()))
            live = (alpha > 0) & ~done & (w.norm(dim=-1) > floor)
            if not bool(live.any()):
                break
            if int(live.sum()) <= 0.75 * live.shape[0]:  # compact: copying costs one pass
                out[index[~live]], out_dual[index[~live]] = w[~live], a[~live]
                index, w, s, a, floor = index[live], w[live], s[live], a[live], floor[live]
                problem = problem.subset(live)
        out[index], out_dual[index] = w, a
        return out, out_dual

    def line_search(self, s: Tensor, w: Tensor, a: Tensor, step: Tensor, ds: Tensor,
                    current: Tensor, slope: Tensor, moving: Tensor) -> Tensor:
        """``(T,)`` step sizes on the grid 1, 1/2, 1/4, ...: per trial, halving until the
        Armijo condition holds and then on while the objective still decreases (0 for trials
        not ``moving`` and for those no step size decreases).

        Taking the best grid point rather than the first acceptable one matters at the kink
        of the robust DPO objectives at w = 0 (every loss is log 2 there, and the worst case
        is a norm of w to first order, as the Wasserstein penalty is): a Newton step that
        overshoots towards the origin is acceptable to Armijo where it lands next to the
        origin, off the minimiser's direction, and there the norm's curvature allows only
        shrinking steps. Only the trials still searching are evaluated. The slack admits the
        rounding-level increase a full step can make near the optimum.
        """
        d = w.shape[-1]
        alpha = torch.where(moving, 1.0, 0.0).to(w.dtype)
        best = torch.full_like(current, math.inf)
        pending = torch.arange(w.shape[0], device=w.device)
        for halving in range(_BACKTRACKS + 1):
            if not pending.numel():
                break
            t = alpha[pending].unsqueeze(-1) * 0.5**halving
            if halving:
                trial = self.objective(s[pending] + t * ds[pending],
                                       w[pending] + t * step[pending, :d],
                                       a[pending] + t * step[pending, d:], pending)
            else:  # every trial at once: cheaper than gathering the moving ones
                trial = self.objective(s + t * ds, w + t * step[:, :d], a + t * step[:, d:])
                trial = torch.where(moving, trial, math.inf)
            reference = current[pending]
            armijo = trial <= reference + 1e-4 * t[:, 0] * slope[pending] + 1e-13 * reference.abs()
            # (An improvement must beat rounding: near the optimum halvings only add noise.)
            improved = armijo & (trial < best[pending] - 1e-13 * reference.abs())
            first = improved & ~torch.isfinite(best[pending])
            best[pending] = torch.where(improved, trial, best[pending])
            found = torch.isfinite(best[pending])
            # Keep halving where nothing is acceptable yet, or the last halving still helped,
            # unless the step's first acceptable size decreased the objective by at least 3/4
            # of the quadratic model's prediction (-t slope (1 - t / 2) for a Newton step):
            # the model is then trustworthy, and a shorter step would not be better.
            predicted = -t[:, 0] * slope[pending] * (1 - t[:, 0] / 2)
            trusted = first & (reference - trial >= 0.75 * predicted)
            searching = ~found | (improved & ~trusted)
            alpha[pending[improved]] = t[improved, 0]
            pending = pending[searching]
        return torch.where(torch.isfinite(best), alpha, 0.0)

    def robust_objective(self, w: Tensor, dual_start: Tensor | None = None
                         ) -> tuple[Tensor, Tensor]:
        """The exact robust objective at candidates w ``(C, T, d)`` (solved in one call) and
        its dual variable ``(C, T)``, in this problem's units.

        A set with a dual variable gives its exact worst case (homogeneous in the losses, so
        the units do not matter): from ``dual_start`` ``(T, dual_size)``, e.g. a Newton
        fit's own dual, the exact dual is re-solved warm and its objective capped by the
        largest loss. (:meth:`~drosim.dro.AmbiguitySet.solve_dual` is exact except where the
        worst case is the max and the dual lies on its domain's boundary, where it returns
        an interior point whose objective exceeds the max; every worst case is at most the
        max.) Such rows' dual is NaN here: :meth:`best_of` solves the winners' exactly. A set
        without a dual is its dual objective itself; a Wasserstein set's worst case is the
        linear world's closed form: exact type 2 for the squared residual,
        mean + rho beta ||w|| (type 1) otherwise.
        """
        # One read of dphi for every candidate; the transposed copy, where Newton steps have
        # made it, is the faster one to read.
        if "dphi_t" in self.__dict__:
            s = (w.movedim(0, 1) @ self.dphi_t).movedim(1, 0)
        else:
            s = (self.dphi @ w.permute(1, 2, 0)).permute(2, 0, 1)
        nan = torch.full_like(s[..., 0], math.nan)
        if self.spec.needs_input_gradients and self.loss.kind == "squared":
            penalty = self.penalty.expand(s.shape[:-1])
            return wasserstein_linear_sq_worst_case(s - self.loss.target, w, penalty).value, nan
        l = self.loss.value(s)
        ridge = 0.5 * self.ridge * w.square().sum(-1)
        if not self.spec.dual_size:
            value = self.spec.dual_objective(l, l.new_zeros(*l.shape[:-1], 0), self.unit)
            return value + self.penalty * w.norm(dim=-1) + ridge, nan
        if dual_start is None:
            result = self.spec.worst_case(l)
            return result.value + ridge, result.dual
        k = self.spec.dual_size
        start = dual_start.expand(*l.shape[:-1], k).reshape(-1, k)
        dual = self.spec.solve_dual(l.reshape(-1, l.shape[-1]), start).reshape(*l.shape[:-1], k)
        value = self.spec.dual_objective(l, dual)
        top = l.amax(-1)
        return torch.minimum(value, top) + ridge, torch.where(value > top, math.nan,
                                                                dual[..., 0])

    def best_of(self, candidates: list[Tensor], dual_start: Tensor | None = None) -> Fit:
        """Per trial, the candidate w ``(T, d)`` with the lowest robust objective (see
        :meth:`robust_objective` for ``dual_start``)."""
        stacked = torch.stack(candidates)  # (C, T, d)
        objectives, duals = self.robust_objective(stacked, dual_start)  # (C, T)
        best = objectives.argmin(0, keepdim=True)
        w = stacked.gather(0, best.unsqueeze(-1).expand(1, *candidates[0].shape))[0]
        dual = duals.gather(0, best)[0]
        unsolved = torch.isnan(dual) & bool(self.spec.dual_size)
        if bool(unsolved.any()):  # a worst case on the max: its exact dual
            rows = unsolved.nonzero().squeeze(-1)
            s = (self.dphi[rows] @ w[rows].unsqueeze(-1)).squeeze(-1)
            l = self.loss.value(s, rows)
            dual = dual.index_put((unsolved,), self.spec.worst_case(l).dual)
        return Fit(w, objectives.gather(0, best)[0], dual)

    def fit(self, w0: Tensor, kink_at_zero: bool) -> tuple[Fit, Tensor]:
        """Newton from w0; with the ``(T,)`` mask of fits in the minimax regime.

        The robust objectives are smooth except in the minimax regime and, with
        ``kink_at_zero``, at w = 0, where every DPO loss is log 2 and the worst case of a
        ball (or the Wasserstein penalty) is a norm of w to first order. There Newton can
        only crawl: a minimiser at the kink is compared explicitly (w = 0 is a candidate), a
        penalised trial also starts from :meth:`step_out_of_zero` where that is better, and
        a trial whose iterates collapsed into the kink although its minimiser is elsewhere,
        close to it, is restarted from the best point of two rays out of it.
        """
        if not kink_at_zero:
            w, a = self.minimise(w0)
            fit = self.best_of([w], a)
            return fit, self.minimax(fit)
        if not self.spec.dual_size:  # the objective is cheap: compare the two starts
            w0 = self.best_of([w0, self.step_out_of_zero()]).w
        w, a = self.minimise(w0, kink_at_zero=True)
        fit = self.best_of([w, torch.zeros_like(w)], a)
        collapsed = (fit.w.norm(dim=-1) <= _COLLAPSE * w0.norm(dim=-1)) & (w0.norm(dim=-1) > 0)
        if bool(collapsed.any()):
            sub = self.subset(collapsed)
            rays = (w0[collapsed], sub.step_out_of_zero())
            start = sub.best_of([t * u for t in _RAY for u in rays]).w
            w, a = sub.minimise(start, kink_at_zero=True)
            retry = sub.best_of([w, torch.zeros_like(w)], a)
            index = (collapsed.nonzero().squeeze(-1),)
            fit = Fit(*(a.index_put(index, b) for a, b in zip(fit, retry, strict=True)))
        return fit, self.minimax(fit)

    def step_out_of_zero(self) -> Tensor:
        """``(T, d)`` the minimiser along the steepest descent of the mean loss at w = 0,
        u = -g / ||g||, of the objective's quadratic model there:
        w = u (||g|| - penalty)_+ / (u^T H u).

        g and H are the mean loss's gradient and Hessian at w = 0, where every loss is
        equal: for a penalised mean (Wasserstein) this is the objective's own model, and for
        a ball, whose worst case has no curvature at that kink, the plain fit's. When the
        minimiser lies close to the kink this is its first-order approximation, direction
        and radius; it is 0 where the penalty's kink is the minimiser (||g|| <= penalty: 0
        is then in the subdifferential).
        """
        s = torch.zeros_like(self.loss.target)
        _, f1, f2 = self.loss.derivatives(s)
        n = f1.shape[-1]
        grad = (f1.unsqueeze(-2) @ self.dphi).squeeze(-2) / n
        norm = grad.norm(dim=-1)
        tiny = torch.finfo(s.dtype).tiny
        u = -grad / norm.clamp_min(tiny).unsqueeze(-1)
        curvature = (f2 * self.scores(u).square()).sum(-1) / n + self.ridge
        radius = (norm - self.penalty).clamp_min(0) / curvature.clamp_min(tiny)
        return u * radius.unsqueeze(-1)

    def minimax(self, fit: Fit) -> Tensor:
        """``(T,)`` True where the worst case at the fit is the largest loss: there
        min_w max_i l_i(w) is a non-smooth problem, and the Newton iterates are not
        guaranteed to reach its minimiser."""
        if self.spec.needs_input_gradients:
            return torch.zeros_like(self.unit, dtype=torch.bool)
        l = self.loss.value(self.scores(fit.w))
        ridge = 0.5 * self.ridge * fit.w.square().sum(-1)
        return (fit.objective - ridge >= l.amax(-1)) & (l.amax(-1) > l.amin(-1))


# ------------------------------------------------------------------- REBEL's paths


def _least_squares(gram: Tensor, moment: Tensor) -> Tensor:
    """argmin_w mean (<w, dphi_i> - dr_i)^2 by the normal equations, batched, from the Gram
    matrix dphi^T dphi ``(T, d, d)`` and the moment dphi^T dr ``(T, d)``.

    A ridge of 1e-12 times the Gram matrix's mean eigenvalue keeps rank-deficient batches
    (n < d, repeated features, an all-zero dphi) solvable and picks the minimum-norm
    minimiser among flat directions; one step of iterative refinement with the same factors
    removes the bias it adds elsewhere (1e-12 times the condition number, to its square).
    """
    mean_eigenvalue = gram.diagonal(dim1=-2, dim2=-1).mean(-1)
    # An all-zero dphi has a zero moment too: any positive ridge gives its w = 0.
    ridge = 1e-12 * torch.where(mean_eigenvalue > 0, mean_eigenvalue, 1.0)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    factors = torch.linalg.lu_factor(gram + ridge.reshape(-1, 1, 1) * eye)
    w = torch.linalg.lu_solve(*factors, moment.unsqueeze(-1))
    return (w + torch.linalg.lu_solve(*factors, moment.unsqueeze(-1) - gram @ w)).squeeze(-1)


def _square_root_lasso(gram: Tensor, moment: Tensor, dr: Tensor, rho: Tensor) -> Tensor:
    """argmin_w ||dphi w - dr|| / sqrt(n) + rho ||w||, exactly, batched: W-REBEL (p = 2),
    from the Gram matrix dphi^T dphi ``(T, d, d)``, the moment dphi^T dr ``(T, d)``, dr
    ``(T, n)`` and rho ``(T,)``.

    Stationarity reads dphi^T r + lambda w = 0 with lambda = rho sqrt(n) ||r|| / ||w||, so
    the minimiser is the ridge solution w(lambda) = (dphi^T dphi + lambda I)^-1 dphi^T dr at
    the root of h(t) = log(rho sqrt(n) ||r||) - log(lambda ||w||), t = log lambda (h is
    positive below the root and negative above it). In the eigenbasis of dphi^T dphi
    (eigenvalues e_j, b = V^T dphi^T dr), with S3 = sum_j b_j^2 / (e_j + lambda)^3,
    d||w||^2 / d lambda = -2 S3 and d||r||^2 / d lambda = 2 lambda S3, so each step costs
    O(d): Newton in t, safeguarded by the bracket of the sign of h (bisection when a step
    leaves it). Where no root exists the minimiser is w = 0 (when rho sqrt(n) ||dr|| >=
    ||dphi^T dr||) or the exact least-squares fit (zero residuals); both are among the
    candidates the caller compares.
    """
    n = dr.shape[-1]
    evals, evecs = torch.linalg.eigh(gram)
    evals = evals.clamp_min(0)
    b = (evecs.transpose(-1, -2) @ moment.unsqueeze(-1)).squeeze(-1)
    b2 = b.square()
    yy = dr.square().sum(-1)
    tiny = torch.finfo(gram.dtype).tiny
    eps = torch.finfo(gram.dtype).eps
    log_budget = torch.log((rho * math.sqrt(n)).clamp_min(tiny))
    scale = evals.amax(-1)
    scale = torch.where(scale > 0, scale, 1.0)  # an all-zero dphi: b = 0 and w = 0 anyway
    def secular(t: Tensor) -> tuple[Tensor, Tensor]:
        """h(t) and dh/dt."""
        lam = t.exp().unsqueeze(-1)
        inv = 1 / (evals + lam)
        w2 = (b2 * inv.square()).sum(-1).clamp_min(tiny)
        r2 = (yy - (b2 * (evals + 2 * lam) * inv.square()).sum(-1)).clamp_min(tiny)
        s3 = (b2 * inv.pow(3)).sum(-1)
        lam = lam.squeeze(-1)
        h = log_budget + 0.5 * torch.log(r2) - t - 0.5 * torch.log(w2)
        return h, lam.square() * s3 / r2 + lam * s3 / w2 - 1

    lo, hi = torch.log(scale) - 40, torch.log(scale) + 40
    # Rows whose h keeps one sign over the bracket have no root there (their minimiser is a
    # kink, compared by the caller): they stay put instead of bisecting to an end.
    searching = (secular(lo)[0] > 0) & (secular(hi)[0] < 0)
    t = 0.5 * (lo + hi)
    for _ in range(_SECULAR_ITERATIONS):
        h, slope = secular(t)
        lo, hi = torch.where(h > 0, t, lo), torch.where(h > 0, hi, t)
        newton = t - h / slope
        # Inclusive: at convergence Newton lands on a bracket end to rounding.
        inside = (slope < 0) & (newton >= lo) & (newton <= hi)
        t_next = torch.where(searching, torch.where(inside, newton, 0.5 * (lo + hi)), t)
        # Converged: a step, or the bracket, within a few ulps (rounding can make the
        # iterates alternate between the bracket's ends).
        ulps = 8 * eps * (1 + t.abs())
        done = bool((((t_next - t).abs() <= ulps) | (hi - lo <= ulps)).all())
        t = t_next
        if done:
            break
    coef = b / (evals + t.exp().unsqueeze(-1))
    return (evecs @ coef.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------- validation


def _check_batch(dphi: Tensor, target: Tensor, name: str) -> None:
    for tensor, label in ((dphi, "dphi"), (target, name)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{label} must be a floating-point tensor, got dtype {tensor.dtype}")
    if dphi.dtype != target.dtype or dphi.device != target.device:
        raise TypeError(f"dphi ({dphi.dtype}, {dphi.device}) and {name} ({target.dtype}, "
                        f"{target.device}) must share dtype and device")
    if dphi.ndim != 3:
        raise ValueError(f"dphi must be (trials, n, d), got shape {tuple(dphi.shape)}")
    if dphi.shape[0] == 0 or dphi.shape[1] == 0 or dphi.shape[2] == 0:
        raise ValueError(f"empty batch: dphi has shape {tuple(dphi.shape)} (trials, n, d "
                         "must all be >= 1)")
    if target.shape != dphi.shape[:2]:
        raise ValueError(f"{name} must have shape {tuple(dphi.shape[:2])} to match dphi, got "
                         f"{tuple(target.shape)}")
    for tensor, label in ((dphi, "dphi"), (target, name)):
        # A finite sum proves every entry finite, in one read; only an overflowing sum needs
        # the elementwise test.
        if bool(torch.isfinite(tensor.sum())):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            trials = (~finite).flatten(1).any(-1).nonzero().flatten()[:5].tolist()
            raise ValueError(f"{label} contains NaN or infinite values (trials {trials})")


def _check_spec(spec: AmbiguitySet | None) -> AmbiguitySet:
    """The set to fit with; a zero radius is {P_n} itself."""
    spec = as_ambiguity_set(spec)
    if spec.is_empirical:
        return Empirical()
    if spec.is_minimax:
        raise ValueError(f"{spec} makes the estimator min_w max_i l_i(w), a non-smooth minimax "
                         "problem these Newton fits do not solve: use a finite radius (or a "
                         "positive temperature)")
    return spec


def _check_number(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {value}")
    return value


def _power_of_two_scale(x: Tensor, beyond: int = 0) -> Tensor:
    """Per trial, 2^round(log2 max |x|), or 1 where that lies within 2^+-``beyond`` (and for
    an all-zero trial): dividing by it is exact."""
    low, high = torch.aminmax(x.flatten(1), dim=-1)
    top = torch.maximum(high, -low)
    exponent = torch.frexp(torch.where(top > 0, top, 1.0)).exponent
    exponent = torch.where(exponent.abs() > beyond, exponent, 0)
    return torch.ldexp(torch.ones_like(top), exponent.to(top.dtype))


def _divide_trials(x: Tensor, scale: Tensor) -> Tensor:
    """x ``(T, ...)`` divided by scale ``(T,)``, without a copy when every scale is 1."""
    if bool((scale == 1).all()):
        return x
    return x / scale.reshape(-1, *([1] * (x.ndim - 1)))


def _finish(fit: Fit, w_scale: Tensor, unit: Tensor) -> Fit:
    """A fit of the normalised problem in the caller's units: w times ``w_scale``, the
    objective and the dual times ``unit`` (the losses' unit)."""
    objective = fit.objective * unit
    if not bool(torch.isfinite(objective).all()):
        trials = (~torch.isfinite(objective)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"the robust objective of trials {trials} overflows "
                         f"{objective.dtype}: their losses exceed its range")
    return Fit(fit.w * w_scale.unsqueeze(-1), objective, fit.dual * unit)


# ------------------------------------------------------------------------ estimators


def rebel(dphi: Tensor, dr: Tensor, spec: AmbiguitySet | None = None) -> Fit:
    """(DRO-)REBEL: argmin_w sup_{Q in ball(P_n)} E_Q[(<w, dphi> - dr)^2], batched.

    Args:
        dphi: ``(T, n, d)`` feature differences, one problem per trial.
        dr: ``(T, n)`` relative rewards, same dtype and device.
        spec: None (REBEL, least squares), Chi2(rho), KL(rho), KLTemperature(tau) or
            Wasserstein(rho, p=2) (exact: (sqrt(E l) + rho ||w||)^2).

    Returns:
        Fit with w ``(T, d)``, the robust objective ``(T,)`` and the dual variable.

    Raises:
        TypeError: non-tensor, integer or mixed-dtype inputs, or an unknown spec.
        ValueError: mismatched or empty batches, non-finite data, a minimax set (infinite
            radius, zero temperature), a Wasserstein order other than 2, or an objective
            beyond the float range.

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
    spec = _check_spec(spec)
    if spec.needs_input_gradients and spec.p != 2:
        raise ValueError(f"W-REBEL in the linear world is exact for p = 2, got p = {spec.p}")
    fit, minimax = _rebel_normalised(dphi, dr, spec)
    _warn_if_minimax(minimax, spec, dphi.shape[1])
    return fit


def _rebel_normalised(dphi: Tensor, dr: Tensor, spec: AmbiguitySet) -> tuple[Fit, Tensor]:
    """:func:`rebel` on validated data, each trial in its own units (module docstring)."""
    # For w' of the normalised problem, w = w' * target / input and the losses are l' * unit.
    input_scale = _power_of_two_scale(dphi, _INPUT_SCALE_RANGE)
    target_scale = _power_of_two_scale(dr)
    dphi, dr = _divide_trials(dphi, input_scale), _divide_trials(dr, target_scale)
    unit = target_scale.square()
    zeros = torch.zeros_like(unit)
    penalty = spec.rho / input_scale if spec.needs_input_gradients else zeros
    problem = _Problem(dphi, _Pointwise("squared", dr), spec, unit, penalty, zeros)
    gram = dphi.transpose(-1, -2) @ dphi
    moment = (dr.unsqueeze(-2) @ dphi).squeeze(-2)  # dphi^T dr
    w_ls = _least_squares(gram, moment)
    minimax = torch.zeros_like(unit, dtype=torch.bool)
    if spec.is_empirical:
        fit = problem.best_of([w_ls])
    elif spec.needs_input_gradients:
        # The exact ridge-path solution, or one of the kinks it cannot reach (see there).
        fit = problem.best_of([_square_root_lasso(gram, moment, dr, penalty), w_ls,
                               torch.zeros_like(w_ls)])
    else:
        fit, minimax = problem.fit(w_ls, kink_at_zero=False)
    return _finish(fit, target_scale / input_scale, unit), minimax


def dpo(dphi: Tensor, pref: Tensor, beta: float, spec: AmbiguitySet | None = None,
        *, ridge: float = 0.0) -> Fit:
    """(DRO-)DPO: logistic regression of the preference o on beta * <w, dphi>, batched.

    Args:
        dphi: ``(T, n, d)`` feature differences.
        pref: ``(T, n)`` labels in {0, 1} (1 when the first response is preferred), same
            dtype and device as dphi.
        beta: DPO's inverse temperature, a finite number > 0.
        spec: None (DPO), Chi2(rho), KL(rho), KLTemperature(tau) (KL-DPO) or
            Wasserstein(rho, p=1) (WDPO, exact: E l + rho beta ||w||).
        ridge: optional ridge / 2 ||w||^2 (finite, >= 0), which keeps separable data bounded.

    Returns:
        Fit with w ``(T, d)`` (the estimate of the reward parameter), objective and dual.

    Raises:
        TypeError: non-tensor, integer or mixed-dtype inputs, or an unknown spec.
        ValueError: mismatched or empty batches, labels outside {0, 1}, a bad beta or
            ridge, a minimax set, or a Wasserstein order other than 1.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> dphi = torch.randn(1, 400, 2, generator=g, dtype=torch.float64)
        >>> pref = torch.bernoulli(torch.sigmoid(dphi @ torch.tensor([2.0, -1.0],
        ...                                      dtype=torch.float64)), generator=g)
        >>> fit = dpo(dphi, pref, beta=1.0)
        >>> fit.w.shape, bool(fit.objective[0] < torch.log(torch.tensor(2.0)))
        (torch.Size([1, 2]), True)
    """
    _check_batch(dphi, pref, "pref")
    spec = _check_spec(spec)
    beta = _check_number("beta", beta, positive=True)
    ridge = _check_number("ridge", ridge, positive=False)
    if not bool(((pref == 0) | (pref == 1)).all()):
        raise ValueError("pref must hold labels 0 or 1")
    if spec.needs_input_gradients and spec.p != 1:
        raise ValueError("WDPO in the linear world is exact for p = 1 (the logistic loss is "
                         f"Lipschitz in dphi); got p = {spec.p}")
    fit, minimax = _dpo_normalised(dphi, pref, beta, spec, ridge)
    _warn_if_minimax(minimax, spec, dphi.shape[1])
    return fit


def _dpo_normalised(dphi: Tensor, pref: Tensor, beta: float, spec: AmbiguitySet, ridge: float
                    ) -> tuple[Fit, Tensor]:
    """:func:`dpo` on validated data, each trial in its own units (module docstring)."""
    input_scale = _power_of_two_scale(dphi, _INPUT_SCALE_RANGE)
    dphi = _divide_trials(dphi, input_scale)
    ones = torch.ones_like(input_scale)
    ridges = ridge / input_scale.square()
    loss = _Pointwise("logistic", pref, beta)
    w0 = _logistic_step_from_zero(dphi, pref, beta, ridges)
    if spec.is_empirical:
        base = _Problem(dphi, loss, spec, ones, torch.zeros_like(ones), ridges)
        fit = base.best_of([base.minimise(w0)[0]])
        minimax = torch.zeros_like(ones, dtype=torch.bool)
    else:
        # DPO's first Newton step is only the robust fit's starting point.
        penalty = (spec.rho * beta / input_scale if spec.needs_input_gradients
                   else torch.zeros_like(ones))
        # A ball's worst case is not differentiable where every loss is equal (its maximiser
        # is not unique there), as the penalty is not at w = 0; a temperature's is smooth.
        kink = bool(spec.dual_size) or spec.needs_input_gradients
        fit, minimax = _Problem(dphi, loss, spec, ones, penalty, ridges).fit(w0, kink)
    return _finish(fit, input_scale.reciprocal(), ones), minimax


def _logistic_step_from_zero(dphi: Tensor, pref: Tensor, beta: float, ridge: Tensor) -> Tensor:
    """DPO's first Newton step from w = 0, in closed form: there every score is 0, the
    gradient is -beta / (2 n) sum_i (2 o_i - 1) dphi_i and the Hessian
    beta^2 / (4 n) dphi^T dphi + ridge I (a regularised least-squares fit of the labels)."""
    n, d = dphi.shape[1:]
    gram = dphi.transpose(-1, -2) @ dphi
    hessian = beta**2 / (4 * n) * gram + ridge.reshape(-1, 1, 1) * torch.eye(
        d, dtype=dphi.dtype, device=dphi.device)
    gradient = -beta / (2 * n) * ((2 * pref - 1).unsqueeze(-2) @ dphi).squeeze(-2)
    return -_least_squares(hessian, gradient)


def _warn_if_minimax(minimax: Tensor, spec: AmbiguitySet, n: int) -> None:
    """One warning for the fits in the minimax regime (see :meth:`_Problem.minimax`)."""
    if bool(minimax.any()):
        warnings.warn(f"{int(minimax.sum())} fit(s) sit in the minimax regime (the worst case "
                      f"is the largest loss): the set {spec} is too large for n = {n}, and the "
                      "fit may not be the exact minimiser", RuntimeWarning, stacklevel=3)
