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

Every radius is solved exactly, with a certificate: Newton's method on the set's dual
(:mod:`drosim.newton`), and where the worst case at the optimum is a tie among the largest
losses a smoothing path and a polish of the ties (:mod:`drosim.certificates`); every
returned fit carries its duality gap (:class:`Fit`), and a fit that cannot be certified
raises.

The relative rewards of each trial are divided by a power of two near their largest value,
and dphi likewise where its scale is extreme (exact in floating point; every threshold is
relative to dphi's scale otherwise), so that data of any scale (1e-150 to 1e200) is fitted as
well as data of scale 1; a degenerate trial (an all-zero dphi) gets the minimum-norm
minimiser w = 0 without touching the others.

Every fit is solved in float64 whatever the data's dtype: float16, bfloat16 and float32
convert to it exactly, the certificates' tolerance (1e-8 relative) is beyond float32's
resolution of a duality gap, and torch has no half-precision linear solves. The fit comes
back in the data's dtype. A fit is an argmin, not differentiated through: the data are read
detached and no gradient flows to them.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor

from drosim.certificates import certified_fit, certify, require_certified, tolerance
from drosim.dro import AmbiguitySet, Empirical, as_ambiguity_set
from drosim.newton import Fit, PointwiseLoss, Problem, least_squares, put_trials

__all__ = ["Fit", "SeparableDataWarning", "dpo", "rebel"]

_SECULAR_ITERATIONS = 100  # safeguarded Newton steps of the square-root lasso's ridge path
# dphi is rescaled only beyond 2^+-64, where its squares could leave the float range (every
# threshold of the Newton steps is relative to dphi's scale, so a copy would buy nothing).
_INPUT_SCALE_RANGE = 64
_SOLVE_DTYPE = torch.float64  # every fit's precision (module docstring)


class SeparableDataWarning(UserWarning):
    """DPO's labels are separable by the fitted w: the objective does not increase along it,
    nothing bounds ||w||, and w's norm is where the solver stopped."""


def _least_squares_gap(gram: Tensor, moment: Tensor, w: Tensor, n: int) -> Tensor:
    """``(T,)`` REBEL's certificate: F(w) - min F = d^T G^-1 d / n exactly for the quadratic
    F = |dphi w - dr|^2 / n, with G = dphi^T dphi and d = G w - dphi^T dr (rows already
    scaled by sqrt(n p)), from the normal equations at hand: no second pass over dphi."""
    residual = (gram @ w.unsqueeze(-1)).squeeze(-1) - moment
    return (residual * least_squares(gram, residual)).sum(-1).clamp_min(0) / n


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
    # ||r(lambda)||^2 = ||dr_perp||^2 + sum_j b_j^2 lambda^2 / (e_j (e_j + lambda)^2), the part
    # of dr outside dphi's columns plus positive terms: no cancellation when dr is (almost)
    # in the column space (noiseless data), where yy - sum_j b_j^2 (e_j + 2 lambda) /
    # (e_j + lambda)^2 would lose every digit.
    spanned = evals > eps * scale.unsqueeze(-1)
    safe_evals = torch.where(spanned, evals, 1.0)
    perp = (yy - torch.where(spanned, b2 / safe_evals, 0.0).sum(-1)).clamp_min(0)

    def secular(t: Tensor) -> tuple[Tensor, Tensor]:
        """h(t) and dh/dt."""
        lam = t.exp().unsqueeze(-1)
        inv = 1 / (evals + lam)
        w2 = (b2 * inv.square()).sum(-1).clamp_min(tiny)
        r2 = (perp + torch.where(spanned, b2 * (lam * inv).square() / safe_evals, 0.0).sum(-1)
              ).clamp_min(tiny)
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


def _out_of_zero(gram: Tensor, moment: Tensor, dr: Tensor, rho: Tensor) -> Tensor:
    """``(T, d)`` the minimiser of f(w) = sqrt(E r^2) + rho ||w||'s quadratic model at w = 0
    along u = -g / ||g||, g = -E[dr dphi] / sqrt(E dr^2) (the smooth part's gradient there):
    t u with t = (||g|| - rho)_+ / u^T H u, H = (E[dphi dphi^T] - g g^T) / sqrt(E dr^2)."""
    n = dr.shape[-1]
    tiny = torch.finfo(dr.dtype).tiny
    rms = dr.square().mean(-1).sqrt().clamp_min(tiny)
    g = -moment / (n * rms.unsqueeze(-1))
    u = -g / g.norm(dim=-1, keepdim=True).clamp_min(tiny)
    curvature = ((u.unsqueeze(-2) @ gram @ u.unsqueeze(-1)).reshape(-1) / n
                 - (g * u).sum(-1).square()) / rms
    return u * ((g.norm(dim=-1) - rho).clamp_min(0) / curvature.clamp_min(tiny)).unsqueeze(-1)


def _square_root_lasso_newton(dphi: Tensor, dr: Tensor, gram: Tensor, rho: Tensor, w: Tensor
                              ) -> Tensor:
    """Damped Newton steps from w ``(T, d)`` on f(w) = sqrt(E r^2) + rho ||w||, r = dphi w - dr
    (``(T, n, d)``, ``(T, n)``, rows of equal weight), with the residuals computed from the
    data (accurate where the fit is close) and the Hessian's Gram part from ``gram``. f is
    smooth away from w = 0 and r = 0, the kinks :func:`_rebel_normalised` compares as
    candidates; steps halve until f decreases (a trial that cannot improve stays)."""
    n = dr.shape[-1]
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    tiny = torch.finfo(w.dtype).tiny

    def residuals(w: Tensor) -> Tensor:
        return (dphi @ w.unsqueeze(-1)).squeeze(-1) - dr

    def value(w: Tensor) -> Tensor:
        return residuals(w).square().mean(-1).sqrt() + rho * w.norm(dim=-1)

    for _ in range(_SECULAR_ITERATIONS // 4):
        r = residuals(w)
        rms = r.square().mean(-1).sqrt().clamp_min(tiny)
        pull = (r.unsqueeze(-2) @ dphi).squeeze(-2) / n  # E[r dphi]
        norm = w.norm(dim=-1).clamp_min(tiny)
        unit = w / norm.unsqueeze(-1)
        grad = pull / rms.unsqueeze(-1) + rho.unsqueeze(-1) * unit
        hess = (gram / (n * rms.reshape(-1, 1, 1))
                - pull.unsqueeze(-1) * pull.unsqueeze(-2) / rms.pow(3).reshape(-1, 1, 1)
                + (rho / norm).reshape(-1, 1, 1) * (eye - unit.unsqueeze(-1) * unit.unsqueeze(-2)))
        scale = hess.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(tiny).reshape(-1, 1, 1)
        step = -torch.linalg.solve(hess + 1e-12 * scale * eye, grad.unsqueeze(-1)).squeeze(-1)
        # Within rounding of the minimum f cannot show a decrease, but a full Newton step
        # still gains its quadratic convergence in w (the certificate needs w, not f, exact).
        close = -(grad * step).sum(-1) <= 1e-12 * value(w)
        current, t = value(w), torch.ones_like(rho)
        for _ in range(40):
            worse = ~(value(w + t.unsqueeze(-1) * step) < current) & ~close
            if not bool(worse.any()):
                break
            t = torch.where(worse, t / 2, t)
        moved = (value(w + t.unsqueeze(-1) * step) < current) | close
        if not bool(moved.any()) or bool(close.all()):
            w = torch.where(moved.unsqueeze(-1), w + t.unsqueeze(-1) * step, w)
            break
        w = torch.where(moved.unsqueeze(-1), w + t.unsqueeze(-1) * step, w)
    return w


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
    return Empirical() if spec.is_empirical else spec


def _check_weights(weights: Tensor | None, dphi: Tensor) -> Tensor | None:
    """P's probabilities ``(T, n)`` from sample weights ``(T, n)`` or ``(n,)`` (shared by
    every trial), normalised per trial in the solver's dtype (a float16 sum of weights
    overflows at 65504) and detached; None stays None (uniform)."""
    if weights is None:
        return None
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dtype != dphi.dtype or weights.device != dphi.device:
        raise TypeError(f"weights ({weights.dtype}, {weights.device}) must share dphi's dtype "
                        f"and device ({dphi.dtype}, {dphi.device})")
    if weights.shape not in (dphi.shape[:2], dphi.shape[1:2]):
        raise ValueError(f"weights must have shape {tuple(dphi.shape[:2])} or "
                         f"({dphi.shape[1]},), got {tuple(weights.shape)}")
    weights = _for_solver(weights)
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights must be finite (no NaN or inf)")
    if bool((weights < 0).any()):
        raise ValueError("weights must be non-negative")
    total = weights.expand(dphi.shape[:2]).sum(-1, keepdim=True)
    if not bool((total > 0).all()):
        trials = (total[:, 0] <= 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"weights are all zero in trials {trials}: each trial needs a sample")
    return weights / total


def _for_solver(x: Tensor) -> Tensor:
    """x as every fit reads it: detached, in float64 (module docstring); no copy when it
    already is."""
    return x.detach().to(_SOLVE_DTYPE)


def _drop_absent(p: Tensor | None, dphi: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """dphi and the target with the samples of weight 0 set to 0: absent, they must not set
    the scales the problem is normalised by (nor overflow them)."""
    if p is None or bool((p > 0).all()):
        return dphi, target
    present = (p > 0).to(dphi.dtype).expand(dphi.shape[:2])
    return dphi * present.unsqueeze(-1), target * present


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
    flat = x.flatten(1)
    low, high = flat.amin(-1), flat.amax(-1)  # (torch.aminmax is ~10x slower on CPU)
    top = torch.maximum(high, -low)
    exponent = torch.frexp(torch.where(top > 0, top, 1.0)).exponent
    exponent = torch.where(exponent.abs() > beyond, exponent, 0)
    return torch.ldexp(torch.ones_like(top), exponent.to(top.dtype))


def _divide_trials(x: Tensor, scale: Tensor) -> Tensor:
    """x ``(T, ...)`` divided by scale ``(T,)``, without a copy when every scale is 1."""
    if bool((scale == 1).all()):
        return x
    return x / scale.reshape(-1, *([1] * (x.ndim - 1)))


def _finish(fit: Fit, w_scale: Tensor, unit: Tensor, dtype: torch.dtype) -> Fit:
    """A fit of the normalised problem in the caller's units and dtype: w times ``w_scale``,
    the objective and the dual times ``unit`` (the losses' unit).

    Raises:
        ValueError: an objective or a w beyond ``dtype``'s range (named by trial).
    """
    objective = (fit.objective * unit).to(dtype)
    w = (fit.w * w_scale.unsqueeze(-1)).to(dtype)
    for values, what in ((objective, "robust objective"), (w.flatten(1), "fitted w")):
        finite = torch.isfinite(values).reshape(values.shape[0], -1).all(-1)
        if not bool(finite.all()):
            trials = (~finite).nonzero().flatten()[:5].tolist()
            raise ValueError(f"the {what} of trials {trials} overflows {dtype}: their data "
                             "exceed its range (fit them in a wider dtype)")
    return Fit(w, objective, (fit.dual * unit).to(dtype), (fit.gap * unit).to(dtype))


# ------------------------------------------------------------------------ estimators


def rebel(dphi: Tensor, dr: Tensor, spec: AmbiguitySet | None = None, *,
          weights: Tensor | None = None) -> Fit:
    """(DRO-)REBEL: argmin_w sup_{Q in ball(P)} E_Q[(<w, dphi> - dr)^2], batched, exact.

    Every radius is solved exactly, up to and past the radius from which the ball holds
    point masses (chi-square rho >= (1 / min p - 1) / 2, KL rho >= log(1 / min p), and
    rho = inf): there the objective is the largest loss and the fit a Chebyshev fit. Each fit
    carries a certificate, its duality gap (:class:`Fit`).

    Args:
        dphi: ``(T, n, d)`` feature differences, one problem per trial, any floating dtype
            (solved in float64, the fit returned in this dtype); read detached.
        dr: ``(T, n)`` relative rewards, same dtype and device; read detached.
        spec: None (REBEL, least squares), Chi2(rho), KL(rho), KLTemperature(tau) or
            Wasserstein(rho, p=2) (exact: (sqrt(E l) + rho ||w||)^2).
        weights: optional ``(T, n)`` or ``(n,)`` non-negative sample weights: P puts mass
            proportional to them on the samples (normalised per trial; a zero weight removes
            the sample) and the ball is built around that P. None is uniform.

    Returns:
        Fit with w ``(T, d)``, the robust objective ``(T,)``, the dual variable and the gap,
        in dphi's dtype; no gradient flows to the data.

    Raises:
        TypeError: non-tensor, integer or mixed-dtype inputs, or an unknown spec.
        ValueError: mismatched or empty batches, non-finite data, bad weights (negative,
            NaN or inf, all zero in a trial, of the wrong shape), a Wasserstein order other
            than 2, an objective beyond the float range, or a fit that could not be
            certified (named by trial).

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
    p = _check_weights(weights, dphi)
    if spec.needs_input_gradients and spec.p != 2:
        raise ValueError(f"W-REBEL in the linear world is exact for p = 2, got p = {spec.p}")
    dtype = dphi.dtype
    dphi, dr = _drop_absent(p, _for_solver(dphi), _for_solver(dr))
    return _rebel_normalised(dphi, dr, spec, p, dtype)


def _rebel_normalised(dphi: Tensor, dr: Tensor, spec: AmbiguitySet, p: Tensor | None,
                      dtype: torch.dtype) -> Fit:
    """:func:`rebel` on validated float64 data, each trial in its own units (module
    docstring); the fit is returned in ``dtype``."""
    # For w' of the normalised problem, w = w' * target / input and the losses are l' * unit.
    input_scale = _power_of_two_scale(dphi, _INPUT_SCALE_RANGE)
    target_scale = _power_of_two_scale(dr)
    dphi, dr = _divide_trials(dphi, input_scale), _divide_trials(dr, target_scale)
    unit = target_scale.square()
    zeros = torch.zeros_like(unit)
    if p is not None and (spec.is_empirical or spec.needs_input_gradients):
        # These objectives see P only through E_P l: rows scaled by sqrt(n p) give the same
        # objective under the uniform P_n, where the closed forms below apply.
        root = (p * dphi.shape[1]).sqrt()
        dphi, dr, p = dphi * root.unsqueeze(-1), dr * root, None
    penalty = spec.rho / input_scale if spec.needs_input_gradients else zeros
    problem = Problem(dphi, PointwiseLoss("squared", dr), spec, unit, penalty, zeros, p)
    gram = problem.gram  # also bounds the certificates' curvature (certificates.lower_bound)
    weighted = dr if p is None else dr * p * dphi.shape[1]
    moment = (weighted.unsqueeze(-2) @ dphi).squeeze(-2)  # dphi^T diag(n p) dr
    w_ls = least_squares(gram, moment)
    if spec.is_empirical:
        fit = problem.best_of([w_ls])
        fit = fit._replace(gap=_least_squares_gap(gram, moment, w_ls, dphi.shape[1]))
    elif spec.needs_input_gradients:
        # The exact ridge-path solution, or one of the kinks it cannot reach (see there),
        # polished by Newton steps on the objective itself where the path's root is off.
        path = _square_root_lasso(gram, moment, dr, penalty)
        fit = certify(problem, problem.best_of([path, w_ls, torch.zeros_like(w_ls)]))
        pending = ~(fit.gap <= tolerance(fit.objective))
        if bool(pending.any()):
            # Where the path's root is off: Newton steps on the objective itself, started
            # off both kinks: the path's point, half the least-squares fit (whose residual
            # is 0 on noiseless data, a kink of sqrt(E r^2) Newton cannot leave) and the
            # quadratic model's minimiser along the steepest descent out of w = 0 (for
            # minimisers close to that kink of ||w||).
            sub = problem.subset(pending)
            starts = (path[pending], 0.5 * w_ls[pending],
                      _out_of_zero(gram[pending], moment[pending], dr[pending],
                                   penalty[pending]))
            polished = [_square_root_lasso_newton(dphi[pending], dr[pending], gram[pending],
                                                  penalty[pending], start) for start in starts]
            retry = certify(sub, sub.best_of(polished))
            better = retry.gap < fit.gap[pending]
            fit = put_trials(fit, pending.nonzero().squeeze(-1)[better],
                             Fit(*(x[better] for x in retry)))
    else:
        fit = certified_fit(problem, w_ls, kink_at_zero=False)
    return _finish(require_certified(fit, spec), target_scale / input_scale, unit, dtype)


def dpo(dphi: Tensor, pref: Tensor, beta: float, spec: AmbiguitySet | None = None,
        *, ridge: float = 0.0, weights: Tensor | None = None) -> Fit:
    """(DRO-)DPO: logistic regression of the preference o on beta * <w, dphi>, batched, exact.

    Every radius is solved exactly, as for :func:`rebel`: past the point-mass radius the
    objective is the largest loss (a max-margin fit; w = 0 when the labels are not
    separable). Each fit carries its duality gap (:class:`Fit`).

    Args:
        dphi: ``(T, n, d)`` feature differences, any floating dtype (solved in float64, the
            fit returned in this dtype); read detached.
        pref: ``(T, n)`` labels in {0, 1} (1 when the first response is preferred), same
            dtype and device as dphi.
        beta: DPO's inverse temperature, a finite number > 0.
        spec: None (DPO), Chi2(rho), KL(rho), KLTemperature(tau) (KL-DPO) or
            Wasserstein(rho, p=1) (WDPO, exact: E l + rho beta ||w||).
        ridge: optional ridge / 2 ||w||^2 (finite, >= 0), which keeps separable data bounded.
        weights: optional ``(T, n)`` or ``(n,)`` sample weights, as in :func:`rebel`.

    Returns:
        Fit with w ``(T, d)`` (the estimate of the reward parameter), objective, dual, gap,
        in dphi's dtype; no gradient flows to the data.

    Warns:
        SeparableDataWarning: without a ridge or a Wasserstein penalty, where the fitted w
            separates a trial's labels (every pair with dphi != 0 on its label's side): the
            objective then has no bounded minimiser and ||w|| is where the solver stopped.

    Raises:
        TypeError: non-tensor, integer or mixed-dtype inputs, or an unknown spec.
        ValueError: mismatched or empty batches, labels outside {0, 1}, a bad beta, ridge
            or weights, a Wasserstein order other than 1, or a fit that could not be
            certified (separable labels under a minimax set without a ridge, say).

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
    p = _check_weights(weights, dphi)
    beta = _check_number("beta", beta, positive=True)
    ridge = _check_number("ridge", ridge, positive=False)
    if not bool(((pref == 0) | (pref == 1)).all()):
        raise ValueError("pref must hold labels 0 or 1")
    if spec.needs_input_gradients and spec.p != 1:
        raise ValueError("WDPO in the linear world is exact for p = 1 (the logistic loss is "
                         f"Lipschitz in dphi); got p = {spec.p}")
    dtype = dphi.dtype
    pref = _for_solver(pref)
    dphi, _ = _drop_absent(p, _for_solver(dphi), pref)
    return _dpo_normalised(dphi, pref, beta, spec, ridge, p, dtype)


def _dpo_normalised(dphi: Tensor, pref: Tensor, beta: float, spec: AmbiguitySet, ridge: float,
                    p: Tensor | None, dtype: torch.dtype) -> Fit:
    """:func:`dpo` on validated float64 data, each trial in its own units (module
    docstring); the fit is returned in ``dtype``. Warns (:class:`SeparableDataWarning`)
    where the labels are separable and nothing bounds w."""
    input_scale = _power_of_two_scale(dphi, _INPUT_SCALE_RANGE)
    dphi = _divide_trials(dphi, input_scale)
    ones = torch.ones_like(input_scale)
    ridges = ridge / input_scale.square()
    penalty = (spec.rho * beta / input_scale if spec.needs_input_gradients
               else torch.zeros_like(ones))
    problem = Problem(dphi, PointwiseLoss("logistic", pref, beta), spec, ones, penalty, ridges, p)
    # DPO's first Newton step is only the robust fit's starting point. A ball's worst case
    # is not differentiable where every loss is equal (its maximiser is not unique there),
    # as the penalty is not at w = 0; a temperature's is smooth.
    kink = bool(spec.dual_size) or spec.needs_input_gradients
    fit = require_certified(certified_fit(problem, _logistic_step_from_zero(problem), kink), spec)
    if ridge == 0 and not spec.needs_input_gradients:  # a ridge or a penalty bounds w
        _warn_if_separable(fit.w, dphi, pref)
    return _finish(fit, input_scale.reciprocal(), ones, dtype)


def _warn_if_separable(w: Tensor, dphi: Tensor, pref: Tensor) -> None:
    """Warn, naming the trials, where w ``(T, d)`` separates the labels: every pair whose
    dphi is not 0 has (2 o - 1) <w, dphi> > 0 (a pair with dphi = 0, identical responses or
    an absent sample, has the same loss for every w).

    Such a w is a witness of separability, never a false alarm: along t w (t > 1) every
    other loss strictly decreases and the constant ones stay, so no worst case of them (the
    mean, a ball's, a temperature's) increases and nothing bounds ||w|| (the caller skips
    the objectives with a ridge or a penalty); the fit's norm is where the solver stopped.
    """
    scores = (w.unsqueeze(-2) @ dphi.mT).squeeze(-2)
    margins = torch.where(pref == 1, scores, -scores)
    # A pair with dphi = 0 scores exactly 0: only trials passing this cheap test can be
    # separated, and only theirs need the pass over dphi.
    suspects = ((margins > 0) | (scores == 0)).all(-1).nonzero().flatten()
    if not suspects.numel():
        return
    informative = (dphi[suspects] != 0).any(-1)
    separated = ((margins[suspects] > 0) | ~informative).all(-1) & informative.any(-1)
    if bool(separated.any()):
        trials = suspects[separated]
        warnings.warn(
            f"dpo: the labels of {trials.numel()} of {w.shape[0]} trials (first "
            f"{trials[:5].tolist()}) are separable: the fitted w classifies every pair with "
            "dphi != 0 with a positive margin, so the objective never increases along t w "
            "(t > 1) and ||w|| is where the solver stopped; pass ridge > 0 or a Wasserstein "
            "spec to bound it", SeparableDataWarning, stacklevel=4)


def _logistic_step_from_zero(problem: Problem) -> Tensor:
    """DPO's first Newton step from w = 0, in closed form: there every score is 0, the
    gradient is -beta / 2 E_P[(2 o - 1) dphi] and the Hessian beta^2 / 4 E_P[dphi dphi^T]
    + ridge I (a regularised least-squares fit of the labels)."""
    grad, curv = problem.mean_gradient_at_zero()
    hessian = problem.weighted_gram(curv)
    eye = torch.eye(grad.shape[-1], dtype=grad.dtype, device=grad.device)
    hessian = hessian + problem.ridge.reshape(-1, 1, 1) * eye
    return -least_squares(hessian, grad)

