"""Exact fits with certificates: duality gaps, the smoothing path and the ties' polish.

The robust objective F(w) = sup_{q in Q} E_q l(w) - R(q) of a set Q around P (R = 0 for a
ball, tau KL(q || P) for a fixed temperature) is bounded below by weak duality: for every
q in Q,

    min_w F(w) >= g(q) = min_w E_q l(w) + ridge / 2 ||w||^2 - R(q),

a weighted fit of the plain loss (closed form for REBEL, Newton for DPO). A fit w with a
q in Q is certified by its duality gap F(w) - g(q) (:func:`certify`; a Wasserstein set by
the dual of its norm, :func:`penalty_lower_bound`). :func:`certified_fit` finds both:

1. Newton on the set's own dual (:meth:`drosim.newton.Problem.fit`): where the objective is
   smooth at the minimiser, the worst case at the fit certifies it to rounding;
2. where it is not (the worst case at the optimum a tie among the largest losses, up to a
   point mass once the ball holds point masses), the smoothing path of
   :mod:`drosim.smoothing` at mu = 10^-1, 10^-2, ... (normalised units), each stage from the
   last minimiser, certified by the smoothed worst case q_mu (a member of Q), by the set's
   own worst case at w_mu, or by :func:`polish_ties`: Newton's method on the optimality
   conditions of the ties the smoothed worst case sits on, whose multipliers are the saddle
   point's distribution. Each trial leaves the path once certified.

:func:`require_certified` refuses, naming the trials, any fit whose gap is above
1e-8 of its objective plus 1e-13 (in the normalised units of :mod:`drosim.estimators`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from drosim.dro import KL, AmbiguitySet, Chi2, Empirical, KLTemperature, kl_tilted
from drosim.newton import (
    Fit,
    Problem,
    least_squares,
    probabilities,
    put_trials,
    support_max,
)
from drosim.smoothing import smoothed

__all__ = ["certified_fit", "certify", "in_set", "lower_bound", "penalty_lower_bound",
           "polish_ties", "require_certified", "tolerance", "worst_case_weights"]

# A fit is certified when its duality gap is at most this fraction of its objective plus
# the absolute floor (normalised units: losses of order 1): cvxpy's own accuracy.
_GAP_RELATIVE, _GAP_ABSOLUTE = 1e-8, 1e-13
# The smoothing parameters of the path (normalised units), each stage started from the last.
_SMOOTHING = [10.0**-k for k in range(1, 17)]
_TIED = 1e-6  # smoothed weights below this fraction of the largest are not on the ties
_POLISH_STEPS = 6  # Newton steps on the ties' KKT system (quadratic from the path's point)
_TIGHT_DECREMENT = 1e-30  # Newton's stop (a predicted decrement) when a certificate asks for more
_MANY_TIES = 4  # supports beyond this many times d + 1 samples are polished only if exact
# A logistic fit's Newton decrement (relative) above which Newton steps on h come first:
# h(w) - lambda^2 loses lambda^2 / 2 of the bound, which must stay below the tolerance.
_NEAR_DECREMENT = 1e-10
# The share of a certificate's tolerance that REBEL's bound from P's Gram matrix may spend.
_CHEAP_SHARE = 1e-2


def worst_case_weights(problem: Problem, w: Tensor, dual: Tensor | None = None) -> Tensor:
    """``(T, n)`` the set's worst-case distribution at w (P itself for a penalty).

    Given the exact dual ``dual`` ``(T,)`` at w (a fit's), the distribution is the dual
    objective's gradient in the losses there (Danskin), without a new solve; rows whose
    dual is not an interior point (NaN, or a temperature of 0) are solved anew."""
    l = problem.loss.value(problem.scores(w))
    if problem.spec.needs_input_gradients:
        return probabilities(problem.weights, l)
    if dual is not None and problem.spec.dual_size and not problem.spec.is_minimax:
        interior = torch.isfinite(dual) & (dual > 0 if isinstance(problem.spec, KL) else True)
        if bool(interior.all()):
            q = problem.spec.dual_derivatives(l, dual.unsqueeze(-1), problem.unit,
                                              weights=problem.weights).grad_l
            return q / q.sum(-1, keepdim=True)
    if isinstance(problem.spec, KLTemperature):  # its tau is in the caller's units
        return kl_tilted(l, problem.spec.tau / problem.unit, weights=problem.weights).weights
    return problem.spec.worst_case(l, weights=problem.weights).weights


def lower_bound(problem: Problem, q: Tensor, w: Tensor) -> Tensor:
    """``(T,)`` a lower bound on min over the model of the robust objective, from a
    distribution q ``(T, n)`` in the set (weak duality: for every w',
    sup_{Q} E_Q l(w') - R(Q) >= E_q l(w') - R(q), so the minimum is at least
    g(q) = min_w' h(w') - R(q), h = E_q l + ridge / 2 ||w'||^2 (+ <linear, w'>), with
    R = tau KL(q || P) for a fixed temperature and 0 for a ball).

    min h >= h(w) - lambda^2, lambda^2 the Newton decrement of h at w: exactly (by a factor
    2) for REBEL's quadratic h (see :func:`_quadratic_decremented_value`); for DPO's
    logistic h near its minimum, where h(w) - min h is lambda^2 / 2 to higher order (a
    certifying pair has lambda near 0: at the saddle point w minimises h). Where DPO's
    decrement is not small the bound is taken after Newton steps on h from w.
    """
    inner = problem.with_spec(Empirical(), unit=torch.ones_like(problem.unit),
                              penalty=torch.zeros_like(problem.penalty), weights=q)
    if problem.loss.kind == "squared":
        bound = _quadratic_decremented_value(problem, inner, w)
    else:
        bound = _decremented_value(inner, w)
        far = bound[1] > _NEAR_DECREMENT * (1 + bound[0].abs())
        if bool(far.any()):
            sub = inner.subset(far)
            bound = tuple(x.index_put((far.nonzero().squeeze(-1),), y) for x, y in
                          zip(bound, _decremented_value(sub, sub.minimise(w[far])[0]),
                              strict=True))
    value = bound[0] - bound[1]
    if isinstance(problem.spec, KLTemperature):
        value = value - problem.spec.tau / problem.unit * _kl_divergence(q, problem.weights)
    return value


def _decremented_value(problem: Problem, w: Tensor) -> tuple[Tensor, Tensor]:
    """(h(w), lambda^2) for the dual-free objective h of ``problem``."""
    empty = w.new_zeros(w.shape[0], 0)
    s = problem.scores(w)
    grad, step = problem.newton_direction(s, w, empty)
    return problem.objective(s, w, empty), (-(grad * step).sum(-1)).clamp_min(0)


def _quadratic_decremented_value(problem: Problem, inner: Problem, w: Tensor
                                 ) -> tuple[Tensor, Tensor]:
    """(h(w), an upper bound on lambda^2) for the quadratic h of ``inner`` (REBEL's, under
    q = inner.weights), from ``problem``'s Gram matrix of P rather than one of q.

    h's Hessian is H_q = 2 E_q[dphi dphi^T] + ridge I. Where q >= c P with c > 0, every
    term being positive semi-definite, H_q >= c H_P, so lambda^2 = g^T H_q^-1 g <=
    g^T H_P^-1 g / c: one Gram matrix (the least-squares fit's) serves every candidate q.
    Trials where that bound exceeds _CHEAP_SHARE of the certificate's tolerance (q near 0
    somewhere, an ill-conditioned H_P, w not yet at h's minimiser) take h's own decrement.
    """
    empty = w.new_zeros(w.shape[0], 0)
    s = inner.scores(w)
    value = inner.objective(s, w, empty)
    q, p = inner.weights, probabilities(problem.weights, inner.weights)
    ratio = torch.where(p > 0, q / p.clamp_min(torch.finfo(q.dtype).tiny), math.inf).amin(-1)
    _, f1, _ = inner.loss.derivatives(s)
    grad = ((q * f1).unsqueeze(-2) @ inner.dphi).squeeze(-2) + inner.ridge.unsqueeze(-1) * w
    if inner.linear is not None:
        grad = grad + inner.linear
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    hessian = 2 / q.shape[-1] * problem.gram + inner.ridge.reshape(-1, 1, 1) * eye
    step, info = torch.linalg.solve_ex(hessian, grad.unsqueeze(-1))
    decrement = (grad * step.squeeze(-1)).sum(-1) / ratio.clamp(max=1)
    own = ~((decrement <= _CHEAP_SHARE * tolerance(value)) & (info == 0))
    if bool(own.any()):
        decrement = decrement.index_put((own.nonzero().squeeze(-1),),
                                        _decremented_value(inner.subset(own), w[own])[1])
    return value, decrement.clamp_min(0)


def penalty_lower_bound(problem: Problem, w: Tensor) -> Tensor:
    """``(T,)`` a lower bound on min over the model of a Wasserstein objective, from the
    dual of its norm: penalty ||w'|| = max_{||v|| <= penalty} <v, w'>.

    REBEL (exact type 2, (sqrt(E r^2) + rho ||w||)^2): with r = dphi w - dr,
    sqrt(E_P r^2) + rho ||w|| >= -E_P[u dr] for every u with E_P[u^2] <= 1 and
    ||E_P[u dphi]|| <= rho (the Lagrangian's minimum over w), here
    u = r / sqrt(E_P r^2) shrunk into that set. DPO (type 1, E l + rho beta ||w||):
    v = penalty w / ||w|| (the subgradient that is optimal at the minimiser; at w = 0 the
    mean loss's gradient clipped to the penalty), then min_w' E l(w') + <v, w'>.
    """
    p = probabilities(problem.weights, problem.loss.target)
    if problem.loss.kind == "squared":
        r = problem.scores(w) - problem.loss.target
        rms = (p * r.square()).sum(-1).sqrt()
        u = r / rms.clamp_min(torch.finfo(r.dtype).tiny).unsqueeze(-1)
        bound = _root_bound(problem, u, p)
        # A fit with no residual (noiseless data) sits on the kink of sqrt(E r^2): there the
        # certifying u is the smallest with E_P[u dphi] = -rho w / ||w||.
        kink = rms <= 1e-6 * (p * problem.loss.target.square()).sum(-1).sqrt()
        if bool(kink.any()):
            sub, rows = problem.subset(kink), kink.nonzero().squeeze(-1)
            p_sub, direction = p[kink], w[kink] / w[kink].norm(dim=-1, keepdim=True).clamp_min(
                torch.finfo(w.dtype).tiny)
            weighted = sub.dphi * p_sub.unsqueeze(-1)
            gram = weighted.transpose(-1, -2) @ sub.dphi
            u_kink = -(sub.dphi @ least_squares(gram, sub.penalty.unsqueeze(-1) * direction
                                                ).unsqueeze(-1)).squeeze(-1)
            bound = bound.index_put((rows,), torch.maximum(bound[kink],
                                                           _root_bound(sub, u_kink, p_sub)))
        return bound.clamp_min(0).square()
    norm = w.norm(dim=-1, keepdim=True)
    grad, _ = problem.mean_gradient_at_zero()
    at_zero = -grad * (problem.penalty / grad.norm(dim=-1).clamp_min(
        torch.finfo(w.dtype).tiny)).clamp(max=1).unsqueeze(-1)
    v = torch.where(norm > 0, problem.penalty.unsqueeze(-1) * w / norm.clamp_min(
        torch.finfo(w.dtype).tiny), at_zero)
    dual = problem.with_spec(Empirical(), penalty=torch.zeros_like(problem.penalty), linear=v)
    return lower_bound(dual, p, w)


def _root_bound(problem: Problem, u: Tensor, p: Tensor) -> Tensor:
    """-E_P[u dr] after shrinking u ``(T, n)`` into E_P[u^2] <= 1 and
    ||E_P[u dphi]|| <= rho: a lower bound on min sqrt(E_P r^2) + rho ||w|| (W-REBEL)."""
    size = (p * u.square()).sum(-1).sqrt()
    pull = ((p * u).unsqueeze(-2) @ problem.dphi).squeeze(-2).norm(dim=-1)
    shrink = torch.minimum(torch.where(size > 1, 1 / size, 1.0),
                           torch.where(pull > problem.penalty, problem.penalty / pull, 1.0))
    return -(p * u * problem.loss.target).sum(-1) * shrink


def polish_ties(problem: Problem, w: Tensor, support: Tensor, q: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """The exact minimiser if its worst case is the max over ``support`` (a ``(T, n)``
    mask of the tied samples, e.g. where the smoothed worst case q ``(T, n)`` sits):
    Newton's method on the KKT system of min_{w, v} v + ridge / 2 ||w||^2 subject to
    l_i(w) = v on the support, from (w, max l, q),

        sum_i lambda_i grad l_i(w) + ridge w = 0,  sum_i lambda_i = 1,  l_i(w) = v,

    a square system in (w, v, lambda) (a Chebyshev or max-margin fit on the ties). Its
    multipliers are the saddle point's distribution: the certificate decides whether
    they lie in the set and whether the others' losses stay below v. With more ties than
    d + 1 (DPO's w = 0, where every loss is log 2) the multipliers are not unique:
    returned are the ones with the smallest chi-square and the smallest KL divergence
    from P (:func:`_closest_multipliers`), each ``(T, n)`` (NaN where none was found),
    with w ``(T, d)``. The support is gathered into ``(T, t)`` with t its largest size:
    a support of more than _MANY_TIES (d + 1) samples is taken only where its ties are
    already exact (a Chebyshev point has d + 1 ties; more, unequal, are no tie set).
    """
    d = w.shape[-1]
    l = problem.loss.value(problem.scores(w))
    top = support_max(l, problem.weights).unsqueeze(-1)
    exact = ((top - l).abs() <= 8 * torch.finfo(w.dtype).eps * top.abs()) | ~support
    support = support & (exact.all(-1) | (support.sum(-1) <= _MANY_TIES * (d + 1))
                         ).unsqueeze(-1)
    t = max(1, int(support.sum(-1).max()))
    index = torch.topk(support.to(w.dtype) + q, t, dim=-1).indices  # the support first
    valid = support.gather(-1, index).to(w.dtype)
    dphi = problem.dphi.gather(1, index.unsqueeze(-1).expand(-1, -1, d))
    loss = replace(problem.loss, target=problem.loss.target.gather(-1, index))
    lam = q.gather(-1, index) * valid
    lam = lam / lam.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    l = loss.value((dphi @ w.unsqueeze(-1)).squeeze(-1))
    v = l.amax(-1)
    # Ties that are already exact (DPO's w = 0) stay put: there the system is singular,
    # and a least-squares step would trade w for smaller multipliers.
    lowest = torch.where(valid > 0, l, v.unsqueeze(-1)).amin(-1)
    eps = torch.finfo(w.dtype).eps
    moving = ((v - lowest > 8 * eps * v.abs()) & (valid.sum(-1) > 0)).unsqueeze(-1)
    eye = torch.eye(d, dtype=w.dtype, device=w.device)
    linear = 0 if problem.linear is None else problem.linear
    for _ in range(_POLISH_STEPS):
        l, f1, f2 = loss.derivatives((dphi @ w.unsqueeze(-1)).squeeze(-1))
        grads = dphi * (f1 * valid).unsqueeze(-1)  # (T, t, d): grad l_i on the support
        hess = (dphi * (lam * f2).unsqueeze(-1)).transpose(-1, -2) @ dphi
        hess = hess + problem.ridge.reshape(-1, 1, 1) * eye
        top = torch.cat([hess, torch.zeros_like(hess[..., :1]), grads.transpose(-1, -2)], -1)
        middle = torch.cat([torch.zeros_like(w), torch.zeros_like(v).unsqueeze(-1),
                            -valid], -1).unsqueeze(-2)
        # A padded slot's equation is lambda_i = 0. The tiny -delta on the multipliers'
        # diagonal keeps the system regular when ties repeat a sample (equal rows), and
        # then picks the smallest multipliers.
        delta = 1e-13 * grads.square().sum(-1).amax(-1).clamp_min(1e-300).unsqueeze(-1)
        bottom = torch.cat([grads, -valid.unsqueeze(-1),
                            torch.diag_embed(1 - valid - delta * valid)], -1)
        kkt = torch.cat([top, middle, bottom], -2)
        rhs = torch.cat([-(problem.ridge.unsqueeze(-1) * w + linear), -torch.ones_like(v[:, None]),
                         -(l - v.unsqueeze(-1)) * valid], -1)
        step, info = torch.linalg.solve_ex(kkt, rhs.unsqueeze(-1))
        finite = torch.isfinite(kkt).all(-1).all(-1) & torch.isfinite(rhs).all(-1)
        singular = (info != 0) & finite
        if bool(singular.any()):  # e.g. every tie exact: least squares
            step[singular] = torch.linalg.lstsq(kkt[singular], rhs[singular].unsqueeze(-1)
                                                ).solution
        step = step.squeeze(-1)
        # A system with no finite solution (losses that overflowed) leaves its trial where it
        # is: the certificate then judges that point.
        moving = moving & (finite & torch.isfinite(step).all(-1)).unsqueeze(-1)
        w = torch.where(moving, w + step[:, :d], w)
        v, lam = torch.where(moving[:, 0], v + step[:, d], v), step[:, d + 1:]
    _, f1, _ = loss.derivatives((dphi @ w.unsqueeze(-1)).squeeze(-1))
    prior = probabilities(problem.weights, q).gather(-1, index) * valid
    grads, target = dphi * f1.unsqueeze(-1), -(problem.ridge.unsqueeze(-1) * w + linear)
    found = (_closest_multipliers(grads, target, prior, "chi2"),
             _closest_multipliers(grads, target, prior, "kl"))
    return w, *(torch.zeros_like(q).scatter(-1, index, x) for x in found)


def in_set(problem: Problem, q: Tensor) -> Tensor:
    """``(T,)`` True where q ``(T, n)`` lies in the set (to rounding): the divergence
    from P within the radius, and no mass off P's support."""
    p = probabilities(problem.weights, q)
    off_support = ((q > 0) & (p <= 0)).any(-1) | torch.isnan(q).any(-1)
    spec, slack = problem.spec, 1e-12
    if isinstance(spec, Chi2):
        inside = 0.5 * (q.square() / p.clamp_min(torch.finfo(q.dtype).tiny)).sum(-1) - 0.5 \
            <= spec.rho * (1 + slack) + slack
    elif isinstance(spec, KL):
        inside = _kl_divergence(q, problem.weights) <= spec.rho * (1 + slack) + slack
    else:  # a fixed temperature: every q (its penalty enters the bound)
        inside = torch.ones_like(off_support)
    return inside & ~off_support


def certify(problem: Problem, fit: Fit, candidates: list[Tensor] | None = None) -> Fit:
    """``fit`` with its gap: its objective less the best lower bound from the
    ``candidates`` ``(T, n)`` that lie in the set (by default the worst case at fit.w)
    or, for a Wasserstein set, from the dual of its norm."""
    if problem.spec.needs_input_gradients:
        bound = penalty_lower_bound(problem, fit.w)
    else:
        candidates = candidates or [worst_case_weights(problem, fit.w, fit.dual)]
        p = probabilities(problem.weights, fit.w.new_empty(fit.w.shape[0], problem.dphi.shape[1]))
        bounds = []
        for q in candidates:
            inside = in_set(problem, q)  # the others are bounded with P, then dropped
            q = torch.where(inside.unsqueeze(-1), q, p)
            bounds.append(torch.where(inside, lower_bound(problem, q, fit.w), -math.inf))
        bound = torch.stack(bounds).amax(0)
    return fit._replace(gap=(fit.objective - bound).clamp_min(0))


def _closest_multipliers(grads: Tensor, target: Tensor, prior: Tensor, divergence: str
                         ) -> Tensor:
    """``(T, t)`` the distribution lambda closest to ``prior`` ``(T, t)`` with
    sum_i lambda_i grads_i = target (grads ``(T, t, d)``, target ``(T, d)``), closest in
    the chi-square divergence 1/2 sum lambda^2 / prior ("chi2") or in KL ("kl").

    With m_i = (grads_i, 1) and b = (target, 1), the minimiser is lambda_i =
    prior_i (<y, m_i>)_+ (chi2) or prior_i exp(<y, m_i>) (kl), y minimising the convex
    sum_i prior_i Psi(<y, m_i>) - <y, b>, Psi(u) = (u)_+^2 / 2 or exp(u): damped Newton, its
    gradient the constraints' residual M lambda - b and its Hessian M diag(prior Psi'') M^T.
    NaN where no such lambda exists (the target outside the grads' hull), or the residual
    stays above rounding.
    """
    rows = torch.cat([grads, torch.ones_like(prior).unsqueeze(-1)], -1)  # (T, t, d + 1)
    b = torch.cat([target, torch.ones_like(target[:, :1])], -1)
    eye = torch.eye(b.shape[-1], dtype=b.dtype, device=b.device)

    def potential(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        u = (rows @ y.unsqueeze(-1)).squeeze(-1)
        if divergence == "kl":
            lam = prior * torch.exp(u.clamp(max=700))
            return lam.sum(-1) - (y * b).sum(-1), lam, lam
        lam = prior * u.clamp_min(0)
        return 0.5 * (lam * u.clamp_min(0)).sum(-1) - (y * b).sum(-1), lam, prior * (u > 0)

    y = torch.zeros_like(b)
    y[:, -1] = 0.0 if divergence == "kl" else 1.0  # lambda = prior: feasible for sum = 1
    for _ in range(_POLISH_STEPS * 5):
        value, lam, curvature = potential(y)
        gradient = ((lam.unsqueeze(-1) * rows).sum(-2) - b).unsqueeze(-1)
        if bool((gradient.norm(dim=(-2, -1)) <= 1e-14 * (1 + b.norm(dim=-1))).all()):
            break
        hessian = (rows * curvature.unsqueeze(-1)).transpose(-1, -2) @ rows
        scale = hessian.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300).reshape(-1, 1, 1)
        step = -torch.linalg.solve(hessian + 1e-13 * scale * eye, gradient).squeeze(-1)
        t = torch.ones_like(value)
        # A step whose predicted decrease is below the potential's rounding is a full one:
        # there the line search can no longer see progress, and Newton is quadratic.
        measurable = (gradient.squeeze(-1) * step).sum(-1).abs() > 1e-13 * (value.abs() + 1)
        for _ in range(40):  # halve until the potential does not increase
            worse = (potential(y + t.unsqueeze(-1) * step)[0] > value) & measurable
            if not bool(worse.any()):
                break
            t = torch.where(worse, t / 2, t)
        y = y + t.unsqueeze(-1) * step
    lam = potential(y)[1]
    residual = ((lam.unsqueeze(-1) * rows).sum(-2) - b).norm(dim=-1)
    size = grads.norm(dim=-1).amax(-1) + target.norm(dim=-1) + 1
    return torch.where((residual <= 1e-9 * size).unsqueeze(-1), lam / lam.sum(-1, keepdim=True),
                       math.nan)


def _kl_divergence(q: Tensor, weights: Tensor | None) -> Tensor:
    """KL(q || P) per row, with 0 log 0 = 0."""
    p = probabilities(weights, q)
    return torch.where(q > 0, q * torch.log(q / p), 0.0).sum(-1)


def tolerance(objective: Tensor) -> Tensor:
    """The largest gap a fit of this objective (normalised units) is returned with."""
    return _GAP_RELATIVE * objective.abs() + _GAP_ABSOLUTE


def certified_fit(problem: Problem, w0: Tensor, kink_at_zero: bool) -> Fit:
    """The exact minimiser with its duality gap (to be below :func:`tolerance`).

    Newton on the set's own dual first (exact wherever the robust objective is smooth at
    the minimiser: its worst case there certifies it). Trials it leaves uncertified, and
    every trial of a minimax set, follow the smoothing path of :mod:`drosim.smoothing`:
    Newton on the smoothed objective at mu = 10^-1, 10^-2, ... in the normalised units,
    each from the last minimiser, until the smoothed worst case q_mu (a member of the set)
    certifies w_mu; each trial leaves the path once it is certified.

    A ball that holds every point mass on P's support is the whole simplex there: its
    trials are fitted as the minimax set they equal (:func:`_holds_point_masses`).
    """
    spec = problem.spec
    masses = _holds_point_masses(problem)
    if bool(masses.any()):
        minimax = problem.subset(masses).with_spec(type(spec)(math.inf))
        fit = certified_fit(minimax, w0[masses], kink_at_zero)
        if bool(masses.all()):
            return fit
        rest = certified_fit(problem.subset(~masses), w0[~masses], kink_at_zero)
        whole = Fit(*(x.new_empty((masses.shape[0], *x.shape[1:])) for x in rest))
        return put_trials(put_trials(whole, masses, fit), ~masses, rest)
    if spec.is_minimax:
        fit = problem.best_of([w0])
    else:
        fit = certify(problem, problem.fit(w0, kink_at_zero))
    pending = ~(fit.gap <= tolerance(fit.objective))
    if bool(pending.any()) and not spec.is_minimax:
        # Newton's own stop leaves ill-conditioned fits a little short of a tight
        # certificate: more steps, to a decrement at rounding level, where that suffices.
        sub = problem.subset(pending)
        w, a = sub.minimise(fit.w[pending], kink_at_zero=kink_at_zero,
                            final_decrement=_TIGHT_DECREMENT)
        retry = certify(sub, sub.best_of([w, fit.w[pending]], a))
        fit = put_trials(fit, pending, Fit(*(torch.where(
            (retry.gap < fit.gap[pending]).reshape(-1, *([1] * (x.ndim - 1))), x, y)
            for x, y in zip(retry, Fit(*(f[pending] for f in fit)), strict=True))))
        pending = ~(fit.gap <= tolerance(fit.objective))
    if bool(pending.any()) and not spec.needs_input_gradients and not spec.is_empirical:
        sub = problem.subset(pending)
        fit = put_trials(fit, pending, _smoothing_path(sub, fit.w[pending], [
            worst_case_weights(sub, fit.w[pending])]))
    return fit


def _holds_point_masses(problem: Problem) -> Tensor:
    """``(T,)`` True where the chi-square or KL ball holds every point mass on P's support:
    its radius is at least the divergence of the point mass on P's least likely sample
    (``protecting(min p)``'s radius). The ball, convex, is then the whole simplex on that
    support, and its worst case the largest loss; exactly at that radius Newton's method on
    the ball's dual and the smoothing path both lose the ties (the dual is flat between the
    two largest losses), while the minimax set's path keeps them."""
    spec = problem.spec
    if not isinstance(spec, Chi2 | KL) or spec.is_minimax:
        return torch.zeros_like(problem.unit, dtype=torch.bool)
    p = probabilities(problem.weights, problem.loss.target)
    least = torch.where(p > 0, p, 1.0).amin(-1)
    radius = 0.5 * (1 / least - 1) if isinstance(spec, Chi2) else -torch.log(least)
    return spec.rho >= radius * (1 - 1e-12)


def require_certified(fit: Fit, spec: AmbiguitySet) -> Fit:
    """``fit``, once every trial's gap is within :func:`tolerance` (normalised units).

    Raises:
        ValueError: naming the trials that are not, with their gaps.
    """
    pending = ~(fit.gap <= tolerance(fit.objective))
    if bool(pending.any()):
        trials = pending.nonzero().flatten()[:5].tolist()
        gaps = [f"{g:.2e}" for g in fit.gap[pending][:5].tolist()]
        raise ValueError(f"the fits of trials {trials} could not be certified optimal under "
                         f"{spec}: their duality gaps {gaps} exceed {_GAP_RELATIVE:g} of the "
                         "objective")
    return fit


def _smoothing_path(problem: Problem, w: Tensor, start: list[Tensor]) -> Fit:
    """Certified fits of ``problem``'s trials along the smoothing path (see
    :func:`certified_fit`), from w ``(T, d)`` and its worst case ``start`` (``[(T, n)]``),
    whose ties are tried first.

    Every candidate w gives an upper bound on the optimum (its objective) and every
    candidate distribution a lower bound (its objective less its gap): each trial keeps the
    lowest objective and the highest bound found so far, and leaves the path once they are
    within tolerance (uncertified trials end with that gap)."""
    best = Fit(w, *(torch.full_like(w[:, 0], math.inf) for _ in range(3)))
    bound = torch.full_like(w[:, 0], -math.inf)
    index = torch.arange(w.shape[0], device=w.device)
    for mu in [None, *_SMOOTHING]:
        if mu is None:
            q = start[0]
        else:
            smooth = problem.with_spec(smoothed(problem.spec, mu))
            w, a = smooth.minimise(w)
            q = smooth.spec.weights_at(smooth.loss.value(smooth.scores(w)), a, smooth.unit,
                                       smooth.weights)
        # Two certificates of w_mu, the smoothed worst case and the set's own at w_mu
        # (right where the worst case is not the max), and the exact fit on the samples the
        # smoothed worst case sits on (right where it is the max).
        candidates = [certify(problem, problem.best_of([w]),
                              [q, worst_case_weights(problem, w)])]
        # The ties: where q is not negligible, or its d + 1 largest (a Chebyshev point's
        # count, found long before the smoothed weights off the ties vanish).
        chebyshev = torch.zeros_like(q, dtype=torch.bool).scatter(
            -1, q.topk(min(w.shape[-1] + 1, q.shape[-1]), dim=-1).indices, True)
        attempts = [(w, q > _TIED * q.amax(-1, keepdim=True)), (w, chebyshev & (q > 0))]
        if mu is None and problem.loss.kind == "logistic":
            # DPO's w = 0, where every loss is log 2: a tie of every sample, exact.
            attempts.append((torch.zeros_like(w), q >= 0))
        for start_w, support in attempts:
            w_ties, *multipliers = polish_ties(problem, start_w, support, q)
            candidates.append(certify(problem, problem.best_of([w_ties]), multipliers))
        for fit in candidates:
            lower = (fit.objective - fit.gap).nan_to_num(-math.inf)
            bound = bound.index_put((index,), torch.maximum(bound[index], lower))
            better = fit.objective < best.objective[index]
            best = put_trials(best, index[better], Fit(*(x[better] for x in fit)))
        best = best._replace(gap=(best.objective - bound).clamp_min(0))
        live = ~(best.gap[index] <= tolerance(best.objective[index]))
        if not bool(live.any()):
            break
        index, w, problem = index[live], w[live], problem.subset(live)
    return best
