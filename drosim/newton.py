"""The damped Newton method behind the linear-world estimators (:mod:`drosim.estimators`).

A :class:`Problem` is, per trial, min over (w, a) of A(l(<w, dphi>), a) + penalty ||w||
+ ridge / 2 ||w||^2, with A the dual objective of an ambiguity set
(:meth:`~drosim.dro.AmbiguitySet.dual_objective`, jointly convex in the losses and the
set's dual variable a: eta for chi-square, tau for KL) and l a :class:`PointwiseLoss`
(REBEL's squared residual or DPO's logistic loss). :meth:`Problem.minimise` takes damped
Newton steps on (w, a) with the exact derivatives of the set's dual objective
(:meth:`~drosim.dro.AmbiguitySet.dual_derivatives`); the chi-square dual is re-minimised
exactly after each step (:meth:`~drosim.dro.AmbiguitySet.solve_dual`, warm-started from
the step), and a line search on the halving grid runs on the scores, which are linear in w.
Trials leave the batch as they converge. Nothing loops over trials or samples in Python; the
only host synchronisation is the early stop, once per iteration.

The objectives are smooth except where the worst case is the largest loss (handled by
:mod:`drosim.certificates`) and, for the balls and the Wasserstein penalty in DPO, at w = 0
(see :meth:`Problem.fit`). These are the estimators' building blocks, not a public API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor

from drosim.dro import AmbiguitySet, wasserstein_linear_sq_worst_case

__all__ = ["Fit", "PointwiseLoss", "Problem", "least_squares", "probabilities",
           "put_trials", "support_max"]

_NEWTON_ITERATIONS = 40
# A trial is done when the Newton decrement (relative) predicted after its full step is
# below 1e-12, four orders under the certificates' tolerance: C r^2, Newton's quadratic
# convergence with C = r_k / r_(k-1)^2 read off its last two full steps, or a cautious
# C = 100 before it has taken one. (The certificate judges the result; a trial it refuses
# gets more steps, then the smoothing path.)
_FINAL_DECREMENT = 1e-12
_QUADRATIC_PHASE = 1e-6  # decrements below which the read-off C is trusted
# Decrements are relative to |f| + _SCALE_FLOOR, the shape of the certificates' tolerance
# 1e-8 (|f| + 1e-5): a well-fitted regression's small objective is still resolved.
_SCALE_FLOOR = 1e-5
_BACKTRACKS = 30  # step sizes 1, 1/2, ..., 2^-29
_RAY = [0.25**k for k in range(7)]  # points t * u on the rays out of the kink at w = 0
_COLLAPSE = 1e-4  # ||w|| / ||w start|| below which Newton has collapsed into that kink
_COMPACT = 0.75  # the share of live trials from which a batch is compacted
_GRAM_CHUNK_BYTES = 1 << 21  # a chunk of scaled features that stays in a CPU core's cache


class Fit(NamedTuple):
    """A batch of fitted estimators, each certified optimal.

    Attributes:
        w: ``(T, d)`` the minimisers (for REBEL, the estimate of (theta - theta_t) / eta).
        objective: ``(T,)`` the robust objective at w, the set's exact worst case.
        dual: ``(T,)`` the optimal dual variable (eta* for chi-square, tau* for KL), NaN
            where the aggregation has none.
        gap: ``(T,)`` the certificate: a duality gap, objective minus a lower bound on the
            optimum, so 0 <= objective - min <= gap. Every returned fit has
            gap <= 1e-8 objective + 1e-13 (in the losses' normalised units: the relative
            rewards divided by a power of two near their largest value, squared).
    """

    w: Tensor
    objective: Tensor
    dual: Tensor
    gap: Tensor


# ------------------------------------------------------------------ pointwise losses


@dataclass(frozen=True, eq=False)
class PointwiseLoss:
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
class Problem:
    """min over (w, a) of A(l(<w, dphi>), a) + penalty ||w|| + ridge / 2 ||w||^2, per trial.

    A is the set's dual objective (:meth:`~drosim.dro.AmbiguitySet.dual_objective`) with the
    losses read in units of ``unit``; penalty and ridge are per trial, in the units of the
    (normalised) dphi.
    """

    dphi: Tensor  # (T, n, d)
    loss: PointwiseLoss
    spec: AmbiguitySet
    unit: Tensor  # (T,)
    penalty: Tensor  # (T,)
    ridge: Tensor  # (T,)
    weights: Tensor | None = None  # (T, n) the probabilities of P, None for uniform
    linear: Tensor | None = None  # (T, d): adds <linear, w> (a dual certificate's term)

    @cached_property
    def workspace(self) -> Tensor:
        """A buffer for one chunk of dphi scaled per sample (:meth:`weighted_gram`), about
        2 MiB: small enough to stay in cache between the scaling and the product that reads
        it, and reused by every Newton step (a fresh buffer costs as much as filling it)."""
        t, n, d = self.dphi.shape
        chunk = min(t, max(1, _GRAM_CHUNK_BYTES // (n * d * self.dphi.element_size())))
        return torch.empty(chunk, n, d, dtype=self.dphi.dtype, device=self.dphi.device)

    @cached_property
    def gram(self) -> Tensor:
        """``(T, d, d)`` dphi^T diag(n p) dphi = n E_P[dphi dphi^T]: the least-squares normal
        equations' matrix."""
        if self.weights is None:
            return self.dphi.mT @ self.dphi
        return self.weighted_gram(self.weights * self.dphi.shape[1])

    def weighted_gram(self, c: Tensor) -> Tensor:
        """``(T, d, d)`` dphi^T diag(c) dphi for per-sample weights c ``(T, n)``."""
        if self.dphi.device.type != "cpu":
            return (self.dphi * c.unsqueeze(-1)).mT @ self.dphi
        # On CPU a loop over chunks of trials (never over samples): each chunk's scaled copy
        # is read back from cache, about 1.3x faster than one pass over the whole batch.
        out = torch.empty(*c.shape[:-1], self.dphi.shape[-1], self.dphi.shape[-1],
                          dtype=c.dtype, device=c.device)
        step = self.workspace.shape[0]
        for start in range(0, c.shape[0], step):
            part = slice(start, start + step)
            rows = self.dphi[part]
            scaled = torch.mul(rows, c[part].unsqueeze(-1), out=self.workspace[:rows.shape[0]])
            torch.bmm(scaled.mT, rows, out=out[part])
        return out

    def scores(self, w: Tensor) -> Tensor:
        """``(T, n)`` s_i = <w, dphi_i> for w ``(T, d)``."""
        # A row times dphi^T: several times faster than dphi times a column (a batched
        # matrix-vector product) in MKL, and needs no transposed copy.
        return (w.unsqueeze(-2) @ self.dphi.mT).squeeze(-2)

    def _rows(self, x: Tensor | None, rows: Tensor | None) -> Tensor | None:
        return x if x is None or rows is None else x[rows]

    def objective(self, s: Tensor, w: Tensor, a: Tensor, rows: Tensor | None = None) -> Tensor:
        """The joint objective at scores s = <w, dphi> ``(T, n)``, w and the dual a; or, given
        ``rows`` (indices), at those trials' s, w and a only."""
        unit, penalty, ridge, weights, linear = (
            self._rows(x, rows) for x in (self.unit, self.penalty, self.ridge, self.weights,
                                          self.linear))
        value = self.spec.dual_objective(self.loss.value(s, rows), a, unit, weights=weights)
        value = value + penalty * w.norm(dim=-1) + 0.5 * ridge * w.square().sum(-1)
        return value if linear is None else value + (linear * w).sum(-1)

    def newton_direction(self, s: Tensor, w: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """(gradient, Newton direction) of the joint objective in x = (w, a)."""
        d = w.shape[-1]
        l, f1, f2 = self.loss.derivatives(s)
        der = self.spec.dual_derivatives(l, a, self.unit, weights=self.weights)
        # One pass over dphi for every (T, n) -> (T, d) product: the gradient, the rank-one
        # factor and the cross derivative with the dual.
        rows = [der.grad_l * f1, der.low * f1]
        if der.cross is not None:
            rows.append(der.cross[..., 0] * f1)
        products = torch.stack(rows, -2) @ self.dphi  # (T, rows, d)
        grad_w, low = products[:, 0], products[:, 1]
        curv = der.grad_l * f2 + der.diag * f1.square()
        hess_w = self.weighted_gram(curv)
        hess_w = hess_w + der.low_sign.reshape(-1, 1, 1) * low.unsqueeze(-1) * low.unsqueeze(-2)
        eye = torch.eye(d, dtype=w.dtype, device=w.device)
        norm = w.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        unit_w = w / norm
        penalty = self.penalty.unsqueeze(-1)
        grad_w = grad_w + penalty * unit_w + self.ridge.unsqueeze(-1) * w
        if self.linear is not None:
            grad_w = grad_w + self.linear
        # The norm has no curvature to offer at its kink w = 0 (there the line search
        # decides whether a step out of it pays).
        curvature = torch.where(w.norm(dim=-1, keepdim=True) > 0, penalty / norm, 0.0)
        hess_w = hess_w + curvature.unsqueeze(-1) * (
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
        return self.spec.solve_dual(self.loss.value(s), start, weights=self.weights)

    def subset(self, keep: Tensor) -> Problem:
        """The problem of the trials where ``keep`` ``(T,)`` is True (sharing the Gram
        matrices' buffer)."""
        other = Problem(self.dphi[keep], replace(self.loss, target=self.loss.target[keep]),
                        self.spec, self.unit[keep], self.penalty[keep], self.ridge[keep],
                        self._rows(self.weights, keep), self._rows(self.linear, keep))
        if "workspace" in self.__dict__:
            other.__dict__["workspace"] = self.workspace
        return other

    def with_spec(self, spec: object, **changes: Tensor | None) -> Problem:
        """The same data under another aggregation (e.g. a smoothed set), with ``changes``
        to the other fields (unit, penalty, ridge, weights, linear). The Gram matrices' buffer
        is shared, not rebuilt."""
        fields = {"unit": self.unit, "penalty": self.penalty, "ridge": self.ridge,
                  "weights": self.weights, "linear": self.linear, **changes}
        other = Problem(self.dphi, self.loss, spec, **fields)
        if "workspace" in self.__dict__:
            other.__dict__["workspace"] = self.workspace
        return other

    def minimise(self, w: Tensor, *, kink_at_zero: bool = False,
                 final_decrement: float = _FINAL_DECREMENT) -> tuple[Tensor, Tensor]:
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
        last = torch.full_like(floor, math.nan)  # the last full step's relative decrement
        # A trial that is done stays put while it waits in the batch for the others to
        # finish: a batch then gives each trial the fit it gets alone.
        live = torch.ones_like(floor, dtype=torch.bool)
        # Where the dual is not re-solved after a step, the line search's value at the new
        # point is the next iteration's objective.
        carried = not (a.shape[-1] and not self.spec.dual_is_strictly_convex)
        current = None
        for _ in range(_NEWTON_ITERATIONS):
            if current is None:
                current = problem.objective(s, w, a)
            grad, step = problem.newton_direction(s, w, a)
            step_w, step_a = step[..., :d], step[..., d:]
            ds = problem.scores(step_w)
            slope = (grad * step).sum(-1)
            scale = current.abs() + _SCALE_FLOOR
            moving = (-slope > 1e-13 * scale) & live
            alpha, reached = problem.line_search(s, w, a, step, ds, current, slope, moving)
            decrement = -slope / scale
            constant = torch.where((decrement <= _QUADRATIC_PHASE) & (last > 0),
                                   decrement / last.square(), 100.0)
            w, s = w + alpha.unsqueeze(-1) * step_w, s + alpha.unsqueeze(-1) * ds
            a = a + alpha.unsqueeze(-1) * step_a
            if a.shape[-1] and not self.spec.dual_is_strictly_convex:
                # Partial minimisation: the exact dual at the new w can only lower the joint
                # objective, and it keeps Newton off a flat face of the dual objective (chi2:
                # eta >= max(l)), where the joint Hessian vanishes.
                a = problem.solve_dual(s, a)
            current = torch.where(alpha > 0, reached, current) if carried else None
            done = (alpha == 1) & (constant * decrement.square() <= final_decrement)
            live = (alpha > 0) & ~done & (w.norm(dim=-1) > floor)
            last = torch.where(alpha == 1, decrement, math.nan)
            if not bool(live.any()):
                break
            if int(live.sum()) <= _COMPACT * live.shape[0]:  # compact: copying costs one pass
                out[index[~live]], out_dual[index[~live]] = w[~live], a[~live]
                index, w, s, a = index[live], w[live], s[live], a[live]
                floor, last = floor[live], last[live]
                current = current[live] if carried else None
                problem, live = problem.subset(live), live[live]
        out[index], out_dual[index] = w, a
        return out, out_dual

    def line_search(self, s: Tensor, w: Tensor, a: Tensor, step: Tensor, ds: Tensor,
                    current: Tensor, slope: Tensor, moving: Tensor) -> tuple[Tensor, Tensor]:
        """``(T,)`` step sizes on the grid 1, 1/2, 1/4, ...: per trial, halving until the
        Armijo condition holds and then on while the objective still decreases (0 for trials
        not ``moving`` and for those no step size decreases); and ``(T,)`` the objective
        there (inf where the step size is 0).

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
        return torch.where(torch.isfinite(best), alpha, 0.0), best

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
        mean + rho beta ||w|| (type 1) otherwise. A minimax set (infinite radius, zero
        temperature) is the largest loss.
        """
        s = (w.movedim(0, 1) @ self.dphi.mT).movedim(1, 0)  # one read of dphi for all
        nan = torch.full_like(s[..., 0], math.nan)
        if self.spec.needs_input_gradients and self.loss.kind == "squared":
            penalty = self.penalty.expand(s.shape[:-1])
            return wasserstein_linear_sq_worst_case(s - self.loss.target, w, penalty).value, nan
        l = self.loss.value(s)
        ridge = 0.5 * self.ridge * w.square().sum(-1)
        weights = None if self.weights is None else self.weights.expand(l.shape)
        if not self.spec.dual_size and not self.spec.is_minimax:
            value = self.spec.dual_objective(l, l.new_zeros(*l.shape[:-1], 0), self.unit,
                                             weights=weights)
            return value + self.penalty * w.norm(dim=-1) + ridge, nan
        if dual_start is None or self.spec.is_minimax:
            result = self.spec.worst_case(l, weights=weights)
            return result.value + ridge, result.dual
        k = self.spec.dual_size
        start = dual_start.expand(*l.shape[:-1], k).reshape(-1, k)
        flat = None if weights is None else weights.reshape(-1, l.shape[-1])
        dual = self.spec.solve_dual(l.reshape(-1, l.shape[-1]), start, weights=flat
                                    ).reshape(*l.shape[:-1], k)
        value = self.spec.dual_objective(l, dual, weights=weights)
        top = support_max(l, weights)
        return torch.minimum(value, top) + ridge, torch.where(value > top, math.nan,
                                                                dual[..., 0])

    def best_of(self, candidates: list[Tensor], dual_start: Tensor | None = None) -> Fit:
        """Per trial, the candidate w ``(T, d)`` with the lowest robust objective (see
        :meth:`robust_objective` for ``dual_start``); its gap is not yet known (inf)."""
        stacked = torch.stack(candidates)  # (C, T, d)
        objectives, duals = self.robust_objective(stacked, dual_start)  # (C, T)
        best = objectives.argmin(0, keepdim=True)
        w = stacked.gather(0, best.unsqueeze(-1).expand(1, *candidates[0].shape))[0]
        dual = duals.gather(0, best)[0]
        unsolved = torch.isnan(dual) & bool(self.spec.dual_size)
        if bool(unsolved.any()):  # a worst case on the max: its exact dual
            rows = unsolved.nonzero().squeeze(-1)
            l = self.loss.value((self.dphi[rows] @ w[rows].unsqueeze(-1)).squeeze(-1), rows)
            dual = dual.index_put((unsolved,), self.spec.worst_case(
                l, weights=self._rows(self.weights, rows)).dual)
        objective = objectives.gather(0, best)[0]
        return Fit(w, objective, dual, torch.full_like(objective, math.inf))

    def or_zero(self, fit: Fit) -> Fit:
        """``fit``, or w = 0 for the trials where that is lower. At the logistic loss's kink
        every loss is l(0) = log 2, so every worst case (a ball's, a temperature's, a
        penalised mean) is that value: no dual to solve but for the trials it wins."""
        at_zero = self.loss.value(torch.zeros_like(self.loss.target))  # (T, n), all log 2
        wins = at_zero[:, 0] < fit.objective
        if not bool(wins.any()):
            return fit
        rows = wins.nonzero().squeeze(-1)
        dual = fit.dual.clone()
        if self.spec.dual_size:
            dual[rows] = self.spec.worst_case(at_zero[rows],
                                              weights=self._rows(self.weights, rows)).dual
        return Fit(torch.where(wins.unsqueeze(-1), 0.0, fit.w),
                   torch.where(wins, at_zero[:, 0], fit.objective), dual, fit.gap)

    def fit(self, w0: Tensor, kink_at_zero: bool) -> Fit:
        """Newton from w0 on the set's own dual objective.

        The robust objectives are smooth except where the worst case is the largest loss
        (handled by :func:`_certified_fit`'s smoothing path) and, with ``kink_at_zero``, at
        w = 0, where every DPO loss is log 2 and the worst case of a ball (or the
        Wasserstein penalty) is a norm of w to first order. There Newton can only crawl: a
        minimiser at the kink is compared explicitly (w = 0 is a candidate), a penalised
        trial also starts from :meth:`step_out_of_zero` where that is better, and a trial
        whose iterates collapsed into the kink although its minimiser is elsewhere, close
        to it, is restarted from the best point of two rays out of it.
        """
        if not kink_at_zero:
            w, a = self.minimise(w0)
            return self.best_of([w], a)
        if not self.spec.dual_size:  # the objective is cheap: compare the two starts
            w0 = self.best_of([w0, self.step_out_of_zero()]).w
        w, a = self.minimise(w0, kink_at_zero=True)
        fit = self.or_zero(self.best_of([w], a))
        collapsed = (fit.w.norm(dim=-1) <= _COLLAPSE * w0.norm(dim=-1)) & (w0.norm(dim=-1) > 0)
        if bool(collapsed.any()):
            sub = self.subset(collapsed)
            rays = (w0[collapsed], sub.step_out_of_zero())
            start = sub.best_of([t * u for t in _RAY for u in rays]).w
            w, a = sub.minimise(start, kink_at_zero=True)
            retry = sub.or_zero(sub.best_of([w], a))
            fit = put_trials(fit, collapsed, retry)
        return fit

    def mean_gradient_at_zero(self) -> tuple[Tensor, Tensor]:
        """``(T, d)`` the gradient g of E_P l at w = 0 and ``(T, n)`` the losses' second
        derivatives there (every score is 0)."""
        s = torch.zeros_like(self.loss.target)
        _, f1, f2 = self.loss.derivatives(s)
        p = probabilities(self.weights, f1)
        return ((p * f1).unsqueeze(-2) @ self.dphi).squeeze(-2), p * f2

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
        grad, curv = self.mean_gradient_at_zero()
        norm = grad.norm(dim=-1)
        tiny = torch.finfo(grad.dtype).tiny
        u = -grad / norm.clamp_min(tiny).unsqueeze(-1)
        curvature = (curv * self.scores(u).square()).sum(-1) + self.ridge
        radius = (norm - self.penalty).clamp_min(0) / curvature.clamp_min(tiny)
        return u * radius.unsqueeze(-1)


def probabilities(weights: Tensor | None, like: Tensor) -> Tensor:
    """P's probabilities ``(T, n)``: ``weights``, or uniform over like's last dimension."""
    return torch.full_like(like, 1.0 / like.shape[-1]) if weights is None else weights


def support_max(l: Tensor, weights: Tensor | None) -> Tensor:
    """The largest loss among the samples with positive weight."""
    return l.amax(-1) if weights is None else torch.where(weights > 0, l, -math.inf).amax(-1)


def put_trials(fit: Fit, rows: Tensor, part: Fit) -> Fit:
    """``fit`` with the trials ``rows`` (indices, or a ``(T,)`` mask) replaced by ``part``'s,
    in order."""
    index = (rows.nonzero().squeeze(-1) if rows.dtype == torch.bool else rows,)
    return Fit(*(whole.index_put(index, new) for whole, new in zip(fit, part, strict=True)))


def least_squares(gram: Tensor, moment: Tensor) -> Tensor:
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
