"""cvxpy reference formulations: slow, trustworthy, used only by tests and paper checks.

Each function solves one problem (a 1-D numpy array of n losses) as a conic program with
Clarabel and returns the optimal value and, where it exists, the primal worst-case weights.
The conventions are those of :mod:`drosim.dro`. cvxpy is an optional dependency
(``pip install drosim[test]``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class ReferenceSolution(NamedTuple):
    """A cvxpy solution: optimal value, primal variable (or None) and solver status."""

    value: float
    weights: np.ndarray | None
    status: str


def _cvxpy():
    try:
        import cvxpy as cp
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("drosim.reference needs cvxpy: pip install 'drosim[test]'") from err
    return cp


def _solve(problem, weights) -> ReferenceSolution:
    """Solve with Clarabel at tight tolerances.

    A solver failure (Clarabel sometimes gives up on large, badly scaled problems) comes
    back as value NaN and status "solver_error", so callers count such problems instead of
    crashing; cvxpy's warning on "optimal_inaccurate" is silenced because the status says so.
    """
    import warnings

    cp = _cvxpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10,
                          tol_feas=1e-10, max_iter=500)
        except cp.error.SolverError:
            return ReferenceSolution(math.nan, None, "solver_error")
    w = None if weights is None or weights.value is None else np.asarray(weights.value)
    value = math.nan if problem.value is None else float(problem.value)
    return ReferenceSolution(value, w, str(problem.status))


def chi2_primal(losses: np.ndarray, rho: float) -> ReferenceSolution:
    """max_q q.l over the simplex with 1/(2n) sum_i (n q_i - 1)^2 <= rho."""
    cp = _cvxpy()
    losses = np.asarray(losses, dtype=float)
    n = losses.size
    q = cp.Variable(n, nonneg=True)
    constraints = [cp.sum(q) == 1, cp.sum_squares(n * q - 1) <= 2 * n * rho]
    return _solve(cp.Problem(cp.Maximize(losses @ q), constraints), q)


def kl_primal(losses: np.ndarray, rho: float) -> ReferenceSolution:
    """max_q q.l over the simplex with sum_i q_i log(n q_i) <= rho."""
    cp = _cvxpy()
    losses = np.asarray(losses, dtype=float)
    n = losses.size
    q = cp.Variable(n, nonneg=True)
    constraints = [cp.sum(q) == 1, -cp.sum(cp.entr(q)) + math.log(n) <= rho]
    return _solve(cp.Problem(cp.Maximize(losses @ q), constraints), q)


def wasserstein_linear_sq_dual(residuals: np.ndarray, w: np.ndarray, rho: float
                               ) -> ReferenceSolution:
    """The type-2 Wasserstein worst case of (<w, z> - y)^2 through its 1-D dual in lambda.

    sup_{W_2(Q, P_n) <= rho} E_Q[r^2] = inf_{lambda > ||w||^2} lambda rho^2
    + E_{P_n}[r^2] lambda / (lambda - ||w||^2), since sup_D (r + <w, D>)^2 - lambda ||D||^2
    = r^2 lambda / (lambda - ||w||^2). Written as lambda rho^2 + M + M a / (lambda - a).
    """
    cp = _cvxpy()
    a = float(np.dot(w, w))
    m = float(np.mean(np.square(residuals)))
    if a == 0.0 or m == 0.0 or rho == 0.0:
        return ReferenceSolution(m if rho == 0.0 or a == 0.0 else a * rho**2, None, "optimal")
    lam = cp.Variable()
    objective = lam * rho**2 + m + m * a * cp.inv_pos(lam - a)
    return _solve(cp.Problem(cp.Minimize(objective), [lam >= a]), None)



class ReferenceFit(NamedTuple):
    """A cvxpy estimator: minimiser, optimal robust objective and solver status."""

    w: np.ndarray | None
    objective: float
    status: str


def _aggregate(l, spec, constraints: list):
    """The robust aggregate of the convex per-sample losses l (an n-vector expression)."""
    from drosim.dro import KL, Chi2, KLTemperature

    cp = _cvxpy()
    n = l.shape[0]
    if spec is None:
        return cp.sum(l) / n
    if isinstance(spec, Chi2):
        eta, t = cp.Variable(), cp.Variable(n, nonneg=True)
        constraints.append(t >= l - eta)
        return eta + math.sqrt(1 + 2 * spec.rho) * cp.norm(t, 2) / math.sqrt(n)
    if isinstance(spec, KL | KLTemperature):
        # tau log mean exp(l / tau) <= s  <=>  sum_i tau exp((l_i - s) / tau) <= tau, each
        # term an exponential cone (p_i - s, tau, u_i) with p_i >= l_i.
        s, p, u = cp.Variable(), cp.Variable(n), cp.Variable(n)
        tau = cp.Variable(nonneg=True) if isinstance(spec, KL) else spec.tau
        constraints += [p >= l, cp.constraints.ExpCone(p - s, tau * np.ones(n), u),
                        cp.sum(u) <= tau]
        return s - tau * math.log(n) + (tau * spec.rho if isinstance(spec, KL) else 0)
    raise TypeError(f"unsupported spec {spec!r}")


def rebel_fit(dphi: np.ndarray, dr: np.ndarray, spec=None) -> ReferenceFit:
    """argmin_w of the robust mean of (<w, dphi_i> - dr_i)^2, one problem ``(n, d)``.

    Wasserstein(rho) is the exact type-2 form (sqrt(E r^2) + rho ||w||)^2, minimised as the
    square-root lasso ||r||_2 / sqrt(n) + rho ||w||_2 and reported squared.
    """
    from drosim.dro import Wasserstein

    cp = _cvxpy()
    w = cp.Variable(dphi.shape[1])
    residual = dphi @ w - dr
    if isinstance(spec, Wasserstein):
        root = cp.norm(residual, 2) / math.sqrt(dphi.shape[0]) + spec.rho * cp.norm(w, 2)
        solution = _solve(cp.Problem(cp.Minimize(root)), w)
        return ReferenceFit(solution.weights, solution.value**2, solution.status)
    constraints: list = []
    objective = _aggregate(cp.square(residual), spec, constraints)
    solution = _solve(cp.Problem(cp.Minimize(objective), constraints), w)
    return ReferenceFit(solution.weights, solution.value, solution.status)


def dpo_fit(dphi: np.ndarray, pref: np.ndarray, beta: float, spec=None, ridge: float = 0.0
            ) -> ReferenceFit:
    """argmin_w of the robust mean of the DPO logistic loss, one problem ``(n, d)``.

    l_i = log(1 + exp(-(2 o_i - 1) beta <w, dphi_i>)); Wasserstein(rho, p=1) is the exact
    type-1 form E l + rho beta ||w||_2; ``ridge`` adds ridge / 2 ||w||^2.
    """
    from drosim.dro import Wasserstein

    cp = _cvxpy()
    w = cp.Variable(dphi.shape[1])
    losses = cp.logistic(-cp.multiply(beta * (2 * pref - 1), dphi @ w))
    constraints: list = []
    if isinstance(spec, Wasserstein):
        objective = cp.sum(losses) / dphi.shape[0] + spec.rho * beta * cp.norm(w, 2)
    else:
        objective = _aggregate(losses, spec, constraints)
    objective = objective + 0.5 * ridge * cp.sum_squares(w)
    solution = _solve(cp.Problem(cp.Minimize(objective), constraints), w)
    return ReferenceFit(solution.weights, solution.value, solution.status)
