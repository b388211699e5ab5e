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


def _probabilities(weights, n: int) -> np.ndarray:
    """The weights of P (broadcastable to ``(n,)``) normalised to a probability vector."""
    w = np.broadcast_to(np.asarray(weights, dtype=float), (n,))
    if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w / w.sum()


def _with_absent(solution: ReferenceSolution, on: np.ndarray) -> ReferenceSolution:
    """A solution over the support of P, with weight 0 on the samples outside it."""
    if solution.weights is None:
        return solution
    weights = np.zeros(on.size)
    weights[on] = solution.weights
    return solution._replace(weights=weights)


def chi2_primal(losses: np.ndarray, rho: float, weights=None) -> ReferenceSolution:
    """max_q q.l over the simplex with 1/(2n) sum_i (n q_i - 1)^2 <= rho.

    With ``weights`` (normalised to p): 1/2 sum_i (q_i - p_i)^2 / p_i <= rho over the
    support of p, and q = 0 off it (those samples are not variables at all).
    """
    cp = _cvxpy()
    losses = np.asarray(losses, dtype=float)
    n = losses.size
    if weights is None:
        q = cp.Variable(n, nonneg=True)
        constraints = [cp.sum(q) == 1, cp.sum_squares(n * q - 1) <= 2 * n * rho]
        return _solve(cp.Problem(cp.Maximize(losses @ q), constraints), q)
    p = _probabilities(weights, n)
    on = p > 0
    q = cp.Variable(int(on.sum()), nonneg=True)
    divergence = cp.sum_squares(cp.multiply(1 / np.sqrt(p[on]), q - p[on]))
    constraints = [cp.sum(q) == 1, divergence <= 2 * rho]
    return _with_absent(_solve(cp.Problem(cp.Maximize(losses[on] @ q), constraints), q), on)


def _kl_program(losses: np.ndarray, weights):
    """(q, q.l, KL(q || P)) over the support of P (P_n without weights), and that support."""
    cp = _cvxpy()
    losses = np.asarray(losses, dtype=float)
    n = losses.size
    p = np.full(n, 1.0 / n) if weights is None else _probabilities(weights, n)
    on = p > 0
    q = cp.Variable(int(on.sum()), nonneg=True)
    if weights is None:
        kl = -cp.sum(cp.entr(q)) + math.log(n)
    else:
        kl = -cp.sum(cp.entr(q)) - q @ np.log(p[on])
    return q, losses[on] @ q, kl, on


def kl_primal(losses: np.ndarray, rho: float, weights=None) -> ReferenceSolution:
    """max_q q.l over the simplex with sum_i q_i log(n q_i) <= rho; with ``weights``
    (normalised to p), sum_i q_i log(q_i / p_i) <= rho over the support of p, q = 0 off it."""
    cp = _cvxpy()
    q, mean, kl, on = _kl_program(losses, weights)
    solution = _solve(cp.Problem(cp.Maximize(mean), [cp.sum(q) == 1, kl <= rho]), q)
    return _with_absent(solution, on)


def kl_tilted_primal(losses: np.ndarray, tau: float, weights=None) -> ReferenceSolution:
    """max_q q.l - tau KL(q || P) over the simplex (P = P_n, or ``weights`` normalised),
    the penalised form whose value is tau log E_P exp(l / tau)."""
    cp = _cvxpy()
    q, mean, kl, on = _kl_program(losses, weights)
    solution = _solve(cp.Problem(cp.Maximize(mean - tau * kl), [cp.sum(q) == 1]), q)
    return _with_absent(solution, on)


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


def _aggregate(l, spec, constraints: list, p: np.ndarray):
    """The robust aggregate of the convex per-sample losses l (an m-vector expression over
    the support of P, whose probabilities are p). A minimax set (infinite radius, zero
    temperature) is the largest loss."""
    from drosim.dro import KL, Chi2, KLTemperature

    cp = _cvxpy()
    if spec is None:
        return p @ l
    if spec.is_minimax:
        return cp.max(l)
    if isinstance(spec, Chi2):
        # sqrt(E_P t^2) = ||sqrt(p) t||
        eta, t = cp.Variable(), cp.Variable(p.size, nonneg=True)
        constraints.append(t >= l - eta)
        return eta + math.sqrt(1 + 2 * spec.rho) * cp.norm(cp.multiply(np.sqrt(p), t), 2)
    if isinstance(spec, KL | KLTemperature):
        # tau log E_P exp(l / tau) <= s  <=>  sum_i p_i tau exp((l_i - s) / tau) <= tau, each
        # term an exponential cone (q_i - s, tau, u_i) with q_i >= l_i.
        s, q, u = cp.Variable(), cp.Variable(p.size), cp.Variable(p.size)
        tau = cp.Variable(nonneg=True) if isinstance(spec, KL) else spec.tau
        constraints += [q >= l, cp.constraints.ExpCone(q - s, tau * np.ones(p.size), u),
                        p @ u <= tau]
        return s + (tau * spec.rho if isinstance(spec, KL) else 0)
    raise TypeError(f"unsupported spec {spec!r}")


def _support(n: int, weights) -> tuple[np.ndarray, np.ndarray]:
    """P's probabilities on its support and the support's mask (uniform without weights)."""
    p = np.full(n, 1.0 / n) if weights is None else _probabilities(weights, n)
    return p[p > 0], p > 0


def rebel_fit(dphi: np.ndarray, dr: np.ndarray, spec=None, weights=None) -> ReferenceFit:
    """argmin_w of the robust mean of (<w, dphi_i> - dr_i)^2, one problem ``(n, d)``, under
    P_n or the P of ``weights`` (normalised; zero weights drop their samples).

    Wasserstein(rho) is the exact type-2 form (sqrt(E r^2) + rho ||w||)^2, minimised as the
    square-root lasso sqrt(E_P r^2) + rho ||w||_2 and reported squared.
    """
    from drosim.dro import Wasserstein

    cp = _cvxpy()
    p, on = _support(dphi.shape[0], weights)
    w = cp.Variable(dphi.shape[1])
    residual = dphi[on] @ w - dr[on]
    if isinstance(spec, Wasserstein):
        root = cp.norm(cp.multiply(np.sqrt(p), residual), 2) + spec.rho * cp.norm(w, 2)
        solution = _solve(cp.Problem(cp.Minimize(root)), w)
        return ReferenceFit(solution.weights, solution.value**2, solution.status)
    constraints: list = []
    objective = _aggregate(cp.square(residual), spec, constraints, p)
    solution = _solve(cp.Problem(cp.Minimize(objective), constraints), w)
    return ReferenceFit(solution.weights, solution.value, solution.status)


def dpo_fit(dphi: np.ndarray, pref: np.ndarray, beta: float, spec=None, ridge: float = 0.0,
            weights=None) -> ReferenceFit:
    """argmin_w of the robust mean of the DPO logistic loss, one problem ``(n, d)``, under
    P_n or the P of ``weights``.

    l_i = log(1 + exp(-(2 o_i - 1) beta <w, dphi_i>)); Wasserstein(rho, p=1) is the exact
    type-1 form E l + rho beta ||w||_2; ``ridge`` adds ridge / 2 ||w||^2.
    """
    from drosim.dro import Wasserstein

    cp = _cvxpy()
    p, on = _support(dphi.shape[0], weights)
    w = cp.Variable(dphi.shape[1])
    losses = cp.logistic(-cp.multiply(beta * (2 * pref[on] - 1), dphi[on] @ w))
    constraints: list = []
    if isinstance(spec, Wasserstein):
        objective = p @ losses + spec.rho * beta * cp.norm(w, 2)
    else:
        objective = _aggregate(losses, spec, constraints, p)
    objective = objective + 0.5 * ridge * cp.sum_squares(w)
    solution = _solve(cp.Problem(cp.Minimize(objective), constraints), w)
    return ReferenceFit(solution.weights, solution.value, solution.status)
