"""Strong duality: the batched duals equal the cvxpy primal (Clarabel), and every returned
solution carries its own optimality certificate (a feasible primal Q and a dual variable
whose dual objective equals the value, so weak duality pins the optimum)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import (
    chi2_divergence,
    chi2_dual_objective,
    kl_divergence,
    kl_dual_objective,
    losses_arrays,
    rhos,
    solved_reference,
    spread,
    t64,
    tol,
)
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from drosim import reference
from drosim.dro import (
    chi2_worst_case,
    kl_tilted,
    kl_worst_case,
    wasserstein_linear_sq_worst_case,
)

pytestmark = pytest.mark.filterwarnings("ignore:Solution may be inaccurate")

# Clarabel runs at tol_gap_abs = 1e-10: on a zero spread (n = 1, constant losses) the
# comparison falls back to that absolute accuracy, in units of the losses' magnitude.
CVXPY_FLOOR = 1e-9
RHO_SLACK = 1e-9


def _cvxpy_friendly(l: np.ndarray) -> None:
    """cvxpy's tolerances are absolute (1e-10): skip spreads too small for them to resolve."""
    s = spread(l)
    assume(s == 0 or s >= 1e-3 * max(1.0, float(np.abs(l).max())))


# ------------------------------------------------------------------------------ cvxpy


def _assert_matches_reference(solve, l: np.ndarray, rho: float, ref_value: float) -> None:
    """|value - cvxpy| <= 1e-6 spread; below rho = 1e-4 allow for cvxpy's constraint slack.

    Clarabel meets the divergence constraint to ~1e-10 only, and near rho = 0 the value moves
    like sqrt(2 rho Var): a slack delta in rho moves it by up to sqrt(2 delta Var) (1.4e-5 sd
    at rho = 0). There the reference must lie between the values at rho -+ RHO_SLACK.
    """
    lt = t64(l)
    value = float(solve(lt, rho).value)
    budget = tol(l, 1e-6, floor=CVXPY_FLOOR)
    if rho >= 1e-4:
        assert abs(value - ref_value) <= budget, (value, ref_value)
        return
    lo = float(solve(lt, max(rho - RHO_SLACK, 0.0)).value)
    hi = float(solve(lt, rho + RHO_SLACK).value)
    assert lo - budget <= ref_value <= hi + budget, (value, ref_value, lo, hi)
    assert lo - budget <= value <= hi + budget, (value, lo, hi)


@settings(max_examples=40)
@given(l=losses_arrays(), rho=rhos())
def test_chi2_value_equals_cvxpy_primal(l, rho):
    _cvxpy_friendly(l)
    ref = solved_reference(reference.chi2_primal, l, rho)
    _assert_matches_reference(chi2_worst_case, l, rho, ref.value)


@settings(max_examples=40)
@given(l=losses_arrays(), rho=rhos())
def test_kl_value_equals_cvxpy_primal(l, rho):
    _cvxpy_friendly(l)
    ref = solved_reference(reference.kl_primal, l, rho)
    _assert_matches_reference(kl_worst_case, l, rho, ref.value)


@settings(max_examples=40)
@given(
    r=hnp.arrays(np.float64, st.integers(1, 150), elements=st.floats(-1e2, 1e2)),
    w=hnp.arrays(np.float64, st.integers(1, 10), elements=st.floats(-10.0, 10.0)),
    rho=rhos(),
)
# tiny residuals: the value is rho^2 ||w||^2 = 1e-8 and Clarabel returns 1.2e-8 as optimal
@example(r=np.array([1.71473772e-66]), w=np.array([1.0]), rho=1e-4)
def test_wasserstein_linear_sq_value_equals_cvxpy_dual(r, w, rho):
    ref = solved_reference(reference.wasserstein_linear_sq_dual, r, w, rho)
    value = float(wasserstein_linear_sq_worst_case(t64(r), t64(w), rho).value)
    # Clarabel stops at absolute gaps of about 1e-8: a tighter absolute tolerance tests it
    assert value == pytest.approx(ref.value, rel=1e-6, abs=1e-8)


# ------------------------------------------------- certificates without a cvxpy solve


@settings(max_examples=150)
@given(l=losses_arrays(max_n=2000), rho=rhos())
@example(l=np.array([0.0, 1.0]), rho=1e-20)  # 1 + 2 rho rounds to 1: value = max
def test_chi2_dual_objective_at_returned_eta_equals_value(l, rho):
    """value = g(eta*) and value = E_q[l] with q feasible: weak duality makes both optimal."""
    res = chi2_worst_case(t64(l), rho)
    value, eta = float(res.value), float(res.dual)
    assert abs(chi2_dual_objective(t64(l), rho, eta) - value) <= tol(l, 1e-9)
    assert abs(float((res.weights * t64(l)).sum()) - value) <= tol(l, 1e-9)
    assert float(chi2_divergence(res.weights)) <= rho * (1 + 1e-9) + 1e-12


@settings(max_examples=150)
@given(l=losses_arrays(max_n=2000), rho=rhos())
@example(l=np.array([0.0, 1.0]), rho=1e-300)  # tau* ~ 1e8: log-mean-exp cancels
def test_kl_dual_objective_at_returned_tau_equals_value(l, rho):
    """value = tau* rho + tau* log E exp(l / tau*) and value = E_q[l] with KL(q) <= rho."""
    res = kl_worst_case(t64(l), rho)
    value, tau = float(res.value), float(res.dual)
    assert tau >= 0
    assert abs(kl_dual_objective(t64(l), rho, tau) - value) <= tol(l, 1e-9)
    assert abs(float((res.weights * t64(l)).sum()) - value) <= tol(l, 1e-9)
    assert float(kl_divergence(res.weights)) <= rho * (1 + 1e-9) + 1e-12


@settings(max_examples=100)
@given(l=losses_arrays(max_n=500), rho=rhos())
# a value within 1e-154 of the max: the squares of the piece search underflowed to 0
@example(l=np.array([0.0, -1.0, 8.11310074e-218]), rho=1e-08)
def test_chi2_value_is_at_most_the_variance_bound_with_equality_without_clipping(l, rho):
    """Dropping q >= 0 gives mean + sqrt(2 rho Var_n); the two agree when no weight is 0."""
    lt = t64(l)
    res = chi2_worst_case(lt, rho)
    bound = float(lt.mean() + torch.sqrt(2 * rho * lt.var(unbiased=False)))
    assert float(res.value) <= bound + tol(l, 1e-9)
    if bool((res.weights > 0).all()):
        assert abs(float(res.value) - bound) <= tol(l, 1e-9)


@settings(max_examples=100)
@given(l=losses_arrays(max_n=500), rho=rhos())
def test_kl_value_is_the_tilted_value_at_tau_star_plus_tau_star_rho(l, rho):
    """The constrained KL value is the penalised (tilted) value at tau* plus tau* rho."""
    res = kl_worst_case(t64(l), rho)
    tau = float(res.dual)
    assume(0 < tau < math.inf)
    tilted = kl_tilted(t64(l), tau)
    assert abs(float(tilted.value) + tau * rho - float(res.value)) <= tol(l, 1e-9)
    torch.testing.assert_close(tilted.weights, res.weights, rtol=0, atol=1e-9)


@settings(max_examples=100)
@given(l=losses_arrays(max_n=500), tau=st.floats(1e-3, 1e3))
def test_kl_tilted_value_is_log_mean_exp_and_its_lagrangian(l, tau):
    """tau log E exp(l / tau) = E_q[l] - tau KL(q || P_n) at q = softmax(l / tau)."""
    lt = t64(l)
    res = kl_tilted(lt, tau)
    direct = kl_dual_objective(lt, 0.0, tau)
    assert abs(float(res.value) - direct) <= tol(l, 1e-9)
    lagrangian = float((res.weights * lt).sum() - tau * kl_divergence(res.weights))
    assert abs(float(res.value) - lagrangian) <= tol(l, 1e-9) + 1e-9 * tau
    torch.testing.assert_close(res.weights, torch.softmax(lt / tau, -1), rtol=0, atol=1e-12)


@settings(max_examples=100)
@given(
    r=hnp.arrays(np.float64, st.integers(1, 150), elements=st.floats(-1e2, 1e2)),
    w=hnp.arrays(np.float64, st.integers(1, 10), elements=st.floats(-10.0, 10.0)),
    rho=st.floats(1e-6, 20.0),
)
def test_wasserstein_dual_lambda_attains_the_value(r, w, rho):
    """lambda* rho^2 + E r^2 lambda* / (lambda* - ||w||^2) equals the closed-form value."""
    a, m = float(np.dot(w, w)), float(np.mean(r * r))
    assume(a > 1e-6 and m > 1e-6)
    res = wasserstein_linear_sq_worst_case(t64(r), t64(w), rho)
    lam = float(res.dual)
    assert lam > a
    assert lam * rho**2 + m * lam / (lam - a) == pytest.approx(float(res.value), rel=1e-9)
