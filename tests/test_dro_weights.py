"""Weighted empirical distributions: every aggregation around P = sum_i p_i delta_i.

The weighted balls agree with the cvxpy primal (drosim.reference) from tiny radii to past
the max regime; integer weights are duplicated samples and a zero weight is a removed one;
Danskin's gradient, the dual derivatives (by finite differences) and the dual solve hold
with weights; bad weights are refused, each with its one-line message, before any work.
The divergences here are written from the definitions, not taken from drosim.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from helpers import (
    F64,
    central_difference,
    distinct_losses,
    losses_arrays,
    solved_reference,
    t64,
    tol,
)
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import Tensor

import drosim.dro
from drosim import reference
from drosim.dro import (
    KL,
    Chi2,
    Empirical,
    KLTemperature,
    Wasserstein,
    chi2_worst_case,
    kl_tilted,
    kl_worst_case,
    robust_mean,
    wasserstein_penalty,
)

pytestmark = pytest.mark.filterwarnings("ignore:Solution may be inaccurate")

SOLVERS = {"chi2": chi2_worst_case, "kl": kl_worst_case, "kl_tilted": kl_tilted}
solver_names = pytest.mark.parametrize("name", sorted(SOLVERS))
# Radii as multiples of the one from which the worst case is the max (its threshold).
FRACTIONS = (1e-6, 1e-3, 0.1, 0.5, 0.9, 0.999, 1.0, 1.001, 1.5, 3.0)
RHO_SLACK = 1e-9  # Clarabel meets the divergence constraint to about 1e-10
CVXPY_FLOOR = 1e-9  # and stops at absolute gaps of about 1e-10 (a zero spread falls back on it)


# ---------------------------------------------------------------------------- strategies


@st.composite
def weighted_losses(draw, max_n: int = 40, integer: bool = False):
    """(losses, weights): any loss vector, weights with zeros (at least one positive);
    integer weights from 0 to 4, or reals in {0} and [0.05, 1]."""
    l = draw(losses_arrays(max_n=max_n))
    values = (st.integers(0, 4).map(float) if integer
              else st.one_of(st.just(0.0), st.floats(0.05, 1.0)))
    w = draw(hnp.arrays(np.float64, l.size, elements=values))
    if not w.any():
        w[draw(st.integers(0, l.size - 1))] = 1.0
    return l, w


def _probabilities(w: np.ndarray) -> np.ndarray:
    return w / w.sum()


def _max_mass(l: np.ndarray, w: np.ndarray) -> float:
    """P(argmax over the support)."""
    p = _probabilities(w)
    on = p > 0
    return float(p[on & (l == l[on].max())].sum())


def _threshold(name: str, l: np.ndarray, w: np.ndarray) -> float:
    """The radius from which the worst case is the max: (1/P(argmax) - 1) / 2 for
    chi-square, -log P(argmax) for KL."""
    top = _max_mass(l, w)
    return 0.5 * (1 / top - 1) if name == "chi2" else -math.log(top)


def chi2_divergence_p(q: Tensor, p: Tensor) -> float:
    """1/2 E_P[(dQ/dP - 1)^2] = 1/2 sum_{p_i > 0} (q_i - p_i)^2 / p_i (Q << P checked apart)."""
    on = p > 0
    return float(0.5 * ((q[on] - p[on]).square() / p[on]).sum())


def kl_divergence_p(q: Tensor, p: Tensor) -> float:
    """KL(Q || P) = sum_{p_i > 0} q_i log(q_i / p_i), with 0 log 0 = 0."""
    on = p > 0
    return float(torch.xlogy(q[on], q[on] / p[on]).sum())


def _cvxpy_friendly(l: np.ndarray, w: np.ndarray) -> None:
    """Clarabel's tolerances are absolute: skip support spreads too small to resolve."""
    on = l[w > 0]
    s = float(on.max() - on.min())
    assume(s == 0 or s >= 1e-3 * max(1.0, float(np.abs(on).max())))


# ------------------------------------------------------------------------------ cvxpy


def _assert_ball_matches_cvxpy(name: str, l: np.ndarray, w: np.ndarray, frac: float) -> None:
    threshold = _threshold(name, l, w)
    rho = frac * threshold if threshold > 0 else frac
    solve = SOLVERS[name]
    primal = reference.chi2_primal if name == "chi2" else reference.kl_primal
    ref = solved_reference(primal, l, rho, w)
    lt, wt = t64(l), t64(w)
    res = solve(lt, rho, weights=wt)
    value, support = float(res.value), l[w > 0]
    budget = tol(support, 1e-6, floor=CVXPY_FLOOR)
    if rho >= 1e-4:
        assert abs(value - ref.value) <= budget, (value, ref.value, rho, threshold)
    else:
        # Near rho = 0 the value moves like sqrt(2 rho Var): the constraint slack of the
        # reference moves it by sqrt(2 slack Var). Bracket it with rho -+ the slack.
        lo = float(solve(lt, max(rho - RHO_SLACK, 0.0), weights=wt).value)
        hi = float(solve(lt, rho + RHO_SLACK, weights=wt).value)
        assert lo - budget <= ref.value <= hi + budget, (value, ref.value, lo, hi)
    # The returned weights certify the value: a Q in the ball around P (so Q << P) with
    # E_Q l = value; with the cvxpy optimum above, weak duality makes it the worst case.
    p, q = t64(_probabilities(w)), res.weights
    assert bool((q[p == 0] == 0).all()) and bool((q >= 0).all())
    assert abs(float(q.sum()) - 1) <= 1e-12
    divergence = chi2_divergence_p if name == "chi2" else kl_divergence_p
    assert divergence(q, p) <= rho * (1 + 1e-9) + 1e-12
    assert abs(float((q * lt).sum()) - value) <= tol(support, 1e-9)
    if frac >= 1 + 1e-9 or threshold == 0:  # past the threshold: the max over the support
        assert value == float(support.max())


@settings(max_examples=40)
@given(lw=weighted_losses(), frac=st.one_of(st.sampled_from(FRACTIONS), st.floats(0.0, 3.0)))
# Near the threshold, with an absent sample above the support (cvxpy solves these to
# "optimal"; it reports the exact threshold "inaccurate", and such examples are rejected).
@example(lw=(np.array([0.0, 1.0, 5.0, 2.0, 2.0]), np.array([1.0, 1.0, 0.0, 2.0, 0.5])),
         frac=0.99)
@example(lw=(np.array([3.0, 3.0, 1.0, 2.0]), np.array([0.2, 0.5, 1.0, 0.0])), frac=0.999)
def test_chi2_with_weights_equals_cvxpy_primal(lw, frac):
    _cvxpy_friendly(*lw)
    _assert_ball_matches_cvxpy("chi2", *lw, frac)


@settings(max_examples=40)
@given(lw=weighted_losses(), frac=st.one_of(st.sampled_from(FRACTIONS), st.floats(0.0, 3.0)))
@example(lw=(np.array([0.0, 1.0, 5.0, 2.0]), np.array([1.0, 1.0, 0.0, 2.0])), frac=1.001)
@example(lw=(np.array([0.0, 1.0, 5.0, 2.0]), np.array([1.0, 1.0, 0.0, 2.0])), frac=0.999)
def test_kl_with_weights_equals_cvxpy_primal(lw, frac):
    _cvxpy_friendly(*lw)
    _assert_ball_matches_cvxpy("kl", *lw, frac)


@settings(max_examples=30)
@given(lw=weighted_losses(), tau=st.one_of(st.sampled_from([1e-3, 1e-2, 0.1, 1.0, 10.0]),
                                           st.floats(1e-3, 10.0)))
def test_kl_temperature_with_weights_equals_cvxpy_primal(lw, tau):
    """tau log E_P exp(l / tau) = max_q E_q l - tau KL(q || P), attained by q ~ p exp(l/tau)."""
    l, w = lw
    _cvxpy_friendly(l, w)
    support = l[w > 0]
    tau = tau * max(1.0, float(support.max() - support.min()))  # in units of the spread
    ref = solved_reference(reference.kl_tilted_primal, l, tau, w)
    res = kl_tilted(t64(l), tau, weights=t64(w))
    assert abs(float(res.value) - ref.value) <= tol(support, 1e-6, floor=CVXPY_FLOOR)
    p = _probabilities(w)
    expected = p * np.exp(np.where(p > 0, l - support.max(), -np.inf) / tau)
    torch.testing.assert_close(res.weights, t64(expected / expected.sum()), rtol=0, atol=1e-12)


# ------------------------------------------------- certificates with extreme weights


def _weighted_dual_objective(name: str, l: np.ndarray, p: np.ndarray, rho: float,
                             dual: float) -> float:
    """The dual objective around P at ``dual``, exactly (mpmath, 50 digits), rounded:
    eta + sqrt(1 + 2 rho) sqrt(E_P (l - eta)_+^2) for chi-square, tau rho +
    tau log E_P exp(l / tau) for KL (tau = 0: the max over the support)."""
    on = p > 0
    xs = [mpmath.mpf(float(x)) for x in l[on]]
    ps = [mpmath.mpf(float(x)) for x in p[on]]
    total = mpmath.fsum(ps)
    if math.isinf(dual):  # rho = 0: the mean (eta* = -inf, tau* = inf)
        return float(mpmath.fsum(q * x for x, q in zip(xs, ps, strict=True)) / total)
    if name == "kl" and dual == 0:
        return float(max(xs))
    # A dual far from the data (tiny rho) makes the terms cancel to that many more digits.
    spread = float(max(xs) - min(xs)) or 1.0
    with mpmath.workdps(50 + 2 * max(0, int(math.log10(abs(dual) / spread + 1)))):
        if name == "chi2":
            e = mpmath.mpf(dual)
            second = mpmath.fsum(q * (x - e) ** 2 for x, q in zip(xs, ps, strict=True) if x > e)
            return float(e + mpmath.sqrt(1 + 2 * mpmath.mpf(rho)) * mpmath.sqrt(second / total))
        t, hi = mpmath.mpf(dual), max(xs)
        mean_exp = mpmath.fsum(q * mpmath.exp((x - hi) / t)
                               for x, q in zip(xs, ps, strict=True))
        return float(hi + t * (mpmath.mpf(rho) + mpmath.log(mean_exp / total)))


@pytest.mark.parametrize("name", ["chi2", "kl"])
@settings(max_examples=60)
@given(l=losses_arrays(min_n=2, max_n=400), data=st.data())
def test_weighted_solutions_carry_their_certificates_with_extreme_weights(name, l, data):
    """value = the dual objective at the returned dual (an upper bound on the sup) and
    value = E_q l with q in the ball (a lower bound): both hold to 1e-9 of the spread for
    weights spanning 26 orders of magnitude, so the value is the worst case."""
    logs = data.draw(hnp.arrays(np.float64, l.size, elements=st.floats(-60.0, 0.0)))
    w = np.exp(logs) * data.draw(hnp.arrays(np.bool_, l.size))
    if not w.any():
        w[0] = 1.0
    threshold = _threshold(name, l, w)
    if data.draw(st.booleans()) and threshold > 0:  # around and past the max regime
        rho = threshold * data.draw(st.one_of(st.sampled_from(FRACTIONS), st.floats(0.0, 3.0)))
    else:
        rho = data.draw(st.one_of(st.sampled_from([1e-8, 1e-3, 0.1, 1.0, 20.0]),
                                  st.floats(1e-8, 50.0)))
    res = SOLVERS[name](t64(l), rho, weights=t64(w))
    p = _probabilities(w)
    value, dual = float(res.value), float(res.dual)
    budget = tol(l[w > 0], 1e-9)
    # Every dual is an upper bound (weak duality), and the returned one attains the value up
    # to the rounding of eta* itself, which chi-square's objective amplifies by its slope
    # (up to 1 + sqrt(1 + 2 rho): 1e13 near the max regime of a max weighing 1e-26).
    objective = _weighted_dual_objective(name, l, p, rho, dual)
    rounding = (4 * (1 + math.sqrt(1 + 2 * rho)) * float(np.spacing(abs(dual)))
                if name == "chi2" and math.isfinite(dual) else 0.0)
    assert value - budget <= objective <= value + budget + rounding
    q, lt = res.weights, t64(l)
    assert abs(float((q * lt).sum()) - value) <= budget
    divergence = chi2_divergence_p if name == "chi2" else kl_divergence_p
    assert divergence(q, t64(p)) <= rho * (1 + 1e-9) + 1e-12
    assert bool((q[t64(p) == 0] == 0).all())


def test_a_max_of_tiny_weight_keeps_its_share():
    """The max weighs 3e-23 of P: the worst case gives it at most sqrt(2 rho 3e-23) and the
    next loss the rest of the excess. (From raw prefix sums of p s and p s^2 the top-k
    variance loses that max, and the worst case sat on it alone, far outside the ball.)"""
    l = np.array([3.0, 2.0, 2.0, 1.0, 0.0, -3.0])
    w = np.array([3e-23, 0.02, 0.015, 0.2, 0.6, 4e-24])
    rho = 20.0
    res = chi2_worst_case(t64(l), rho, weights=t64(w))
    p = t64(_probabilities(w))
    assert chi2_divergence_p(res.weights, p) <= rho * (1 + 1e-9)
    assert 0 < float(res.weights[0]) <= math.sqrt(2 * rho * float(p[0])) * (1 + 1e-9)
    assert abs(float((res.weights * t64(l)).sum()) - float(res.value)) <= 1e-14
    dual = _weighted_dual_objective("chi2", l, p.numpy(), rho, float(res.dual))
    assert abs(dual - float(res.value)) <= 1e-14


# ------------------------------------------------------ duplication, removal, broadcasting


@solver_names
@settings(max_examples=50)
@given(lw=weighted_losses(integer=True), frac=st.sampled_from(FRACTIONS))
def test_integer_weights_are_duplicated_samples(name, lw, frac):
    """Weight k on a sample is that sample k times (0 times: removed): same value, dual, and
    the duplicates' worst-case weights summed back onto their sample."""
    l, w = lw
    counts = w.astype(int)
    threshold = _threshold(name, l, w) if name != "kl_tilted" else 1.0
    rho = frac * threshold if threshold > 0 else frac
    weighted = SOLVERS[name](t64(l), rho, weights=t64(w))
    copies = SOLVERS[name](t64(np.repeat(l, counts)), rho)
    budget = tol(l[counts > 0], 1e-9)
    assert abs(float(weighted.value) - float(copies.value)) <= budget
    origin = torch.as_tensor(np.repeat(np.arange(l.size), counts))
    summed = torch.zeros(l.size, dtype=F64).index_add_(0, origin, copies.weights)
    torch.testing.assert_close(weighted.weights, summed, rtol=0, atol=1e-9)
    dual, dual_copies = float(weighted.dual), float(copies.dual)
    if frac == 1.0:
        # At the threshold the dual is ill-determined: chi-square's eta* is any point
        # between the two largest losses, and KL's objective is flat in tau near 0.
        return
    if math.isinf(dual_copies):
        assert dual == dual_copies
    else:
        assert dual == pytest.approx(dual_copies, rel=1e-6, abs=budget)


@solver_names
@settings(max_examples=50)
@given(lw=weighted_losses(max_n=60), frac=st.sampled_from(FRACTIONS),
       far=st.sampled_from([1e300, -1e300, 1e6, 0.0]))
def test_a_zero_weight_is_a_removed_sample(name, device, lw, frac, far):
    l, w = lw
    threshold = _threshold(name, l, w) if name != "kl_tilted" else 1.0
    rho = frac * threshold if threshold > 0 else frac
    solve = SOLVERS[name]
    present = w > 0
    absent = ~torch.as_tensor(present, device=device)
    kept = solve(t64(l[present], device), rho, weights=t64(w[present], device))
    res = solve(t64(l, device), rho, weights=t64(w, device))
    assert abs(float(res.value) - float(kept.value)) <= tol(l[present], 1e-12)
    assert bool((res.weights[absent] == 0).all())
    torch.testing.assert_close(res.weights[~absent], kept.weights, rtol=0, atol=1e-12)
    # Whatever the absent losses are (a huge one included), nothing changes, to the bit;
    # and their gradient is exactly 0.
    lt = t64(np.where(present, l, far), device).requires_grad_()
    other = solve(lt, rho, weights=t64(w, device))
    assert torch.equal(other.value.detach(), res.value) and torch.equal(other.dual, res.dual)
    assert torch.equal(other.weights, res.weights)
    other.value.backward()
    assert bool((lt.grad[absent] == 0).all())


def test_zero_weights_remove_samples_from_the_other_sets():
    g = torch.Generator().manual_seed(4)
    l, norms = torch.rand(3, 9, generator=g, dtype=F64), torch.rand(3, 9, generator=g, dtype=F64)
    w = torch.rand(3, 9, generator=g, dtype=F64)
    w[:, ::3] = 0
    keep = w[0] > 0
    for spec in (Empirical(), Wasserstein(0.3, p=1), Wasserstein(0.3), Wasserstein(0.3, 1.5),
                 Wasserstein(0.3, math.inf)):
        res = spec.worst_case(l, norms, weights=w)
        moved = spec.worst_case(l.masked_fill(w == 0, 1e300), norms.masked_fill(w == 0, 1e300),
                                weights=w)
        torch.testing.assert_close(moved.value, res.value, rtol=1e-15, atol=0)
        kept = spec.worst_case(l[:, keep], norms[:, keep], weights=w[:, keep])
        torch.testing.assert_close(res.value, kept.value, rtol=1e-13, atol=0)
        assert bool((res.weights[w == 0] == 0).all())


@pytest.mark.parametrize("order", [1.0, 1.5, 2.0, 4.0, math.inf])
def test_weighted_wasserstein_penalty_is_the_p_moment_under_p(order):
    """rho (E_P ||g||^q)^(1/q), q = p / (p - 1): the max over the support for p = 1, E_P ||g||
    for p = inf; the same as duplicating samples for integer weights."""
    g = torch.Generator().manual_seed(9)
    sq = torch.rand(2, 8, generator=g, dtype=F64) * 3
    w = torch.tensor([[2.0, 0, 1, 1, 3, 0, 1, 1], [1, 1, 0, 0, 0, 4, 1, 1]], dtype=F64)
    p, norms = w / w.sum(-1, keepdim=True), sq.sqrt()
    if order == 1:
        expected = 0.3 * torch.where(w > 0, norms, 0).amax(-1)
    elif math.isinf(order):
        expected = 0.3 * (p * norms).sum(-1)
    else:
        q = order / (order - 1)
        expected = 0.3 * (p * norms.pow(q)).sum(-1).pow(1 / q)
    torch.testing.assert_close(wasserstein_penalty(sq, 0.3, order, weights=w), expected,
                               rtol=1e-13, atol=0)
    for row in range(2):
        copies = sq[row].repeat_interleave(w[row].long())
        torch.testing.assert_close(wasserstein_penalty(sq[row], 0.3, order, weights=w[row]),
                                   wasserstein_penalty(copies, 0.3, order), rtol=1e-13, atol=0)


def test_weights_shared_by_every_problem_or_one_row_per_problem():
    g = torch.Generator().manual_seed(5)
    l = torch.rand(4, 12, generator=g, dtype=F64).pow(2)
    shared = torch.rand(12, generator=g, dtype=F64)
    rows = torch.rand(4, 12, generator=g, dtype=F64)
    rho = torch.tensor([0.01, 0.2, 1.0, 30.0], dtype=F64)
    for name, solve in SOLVERS.items():
        for w in (shared, rows, 7.0 * shared):
            batch = solve(l, rho, weights=w)
            for i in range(4):
                one = solve(l[i], rho[i], weights=w if w.ndim == 1 else w[i])
                torch.testing.assert_close(batch.value[i], one.value, rtol=1e-13, atol=0,
                                           msg=name)
                torch.testing.assert_close(batch.weights[i], one.weights, rtol=0, atol=1e-14)
        # Uniform weights, of any scale, are P_n.
        plain = solve(l, rho)
        for w in (torch.ones(12, dtype=F64), torch.full((4, 12), 1e-300, dtype=F64),
                  torch.full((4, 1), 1e300, dtype=F64), torch.tensor(3.0, dtype=F64)):
            torch.testing.assert_close(solve(l, rho, weights=w).value, plain.value,
                                       rtol=1e-12, atol=0, msg=name)


@solver_names
def test_half_precision_with_weights_is_solved_at_float32(name):
    g = torch.Generator().manual_seed(6)
    l = torch.rand(3, 50, generator=g)
    w = torch.rand(50, generator=g)
    w[::5] = 0
    res = SOLVERS[name](l.half(), 0.2, weights=w.half())
    at32 = SOLVERS[name](l.half().float(), 0.2, weights=w.half().float())
    assert res.value.dtype == res.weights.dtype == torch.float16
    torch.testing.assert_close(res.value, at32.value.half())
    assert bool((res.weights[..., ::5] == 0).all())


# ------------------------------------------------------------------------- derivatives


@solver_names
@settings(max_examples=40)
@given(lw=weighted_losses(max_n=200), frac=st.sampled_from(FRACTIONS), batch=st.booleans())
def test_autograd_gradient_with_weights_is_the_worst_case_weights(name, device, lw, frac,
                                                                   batch):
    l, w = lw
    threshold = _threshold(name, l, w) if name != "kl_tilted" else 1.0
    rho = frac * threshold if threshold > 0 else frac
    # weights are data: no gradient reaches them
    lt, wt = t64(l, device), t64(w, device).requires_grad_()
    if batch:
        lt = torch.stack([lt, lt.flip(-1), 2 * lt])
    lt.requires_grad_(True)
    res = SOLVERS[name](lt, rho, weights=wt)
    assert not res.weights.requires_grad and not res.dual.requires_grad
    grad_l, grad_w = torch.autograd.grad(res.value.sum(), (lt, wt), allow_unused=True)
    assert grad_w is None
    torch.testing.assert_close(grad_l, res.weights, rtol=0, atol=1e-15)


@solver_names
@settings(max_examples=25)
@given(l=distinct_losses(min_n=2, max_n=25), data=st.data())
def test_finite_differences_of_the_weighted_value_are_the_weights(name, l, data):
    """Central differences of the value equal q, away from ties, from the threshold and (for
    chi-square) from an eta* on a loss; the absent samples' differences are exactly 0."""
    w = data.draw(hnp.arrays(np.float64, l.size, elements=st.one_of(
        st.just(0.0), st.floats(0.1, 1.0))))
    assume(w.any() and (w > 0).sum() >= 2)
    frac = data.draw(st.floats(0.05, 0.95))
    rho = frac * _threshold(name, l, w) if name != "kl_tilted" else 10 ** (4 * frac - 2)
    lt, wt = t64(l), t64(w)
    res = SOLVERS[name](lt, rho, weights=wt)
    if name == "chi2":  # off the kinks, where eta* meets a loss of the support
        assume(float((lt[wt > 0] - res.dual).abs().min()) > 1e-4)
    q = res.weights
    fd = central_difference(lambda x: SOLVERS[name](x, rho, weights=wt).value, lt, 1e-6)
    torch.testing.assert_close(fd, q, rtol=0, atol=1e-6)
    assert bool((fd[wt == 0] == 0).all())


def test_robust_mean_trains_on_the_weighted_worst_case():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(30, 3, generator=g, dtype=F64), torch.randn(30, generator=g, dtype=F64)
    w = torch.rand(30, generator=g, dtype=F64)
    w[:10] = 0
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=F64, requires_grad=True)
    for spec in (None, Chi2(0.2), KL(0.2), KLTemperature(0.5)):
        per_sample = (x @ theta - y) ** 2
        (grad,) = torch.autograd.grad(robust_mean(per_sample, spec, weights=w), theta)
        q = (Empirical() if spec is None else spec).worst_case(per_sample.detach(),
                                                               weights=w).weights
        by_hand = (q[:, None] * 2 * (x @ theta - y).detach()[:, None] * x).sum(0)
        torch.testing.assert_close(grad, by_hand, rtol=1e-12, atol=1e-14)


def _fd_gradient(f, x: Tensor, h: float) -> Tensor:
    """Central differences of f: R^m -> R^k at x, shape (k, m) (f's output flattened)."""
    columns = []
    for i in range(x.numel()):
        step = torch.zeros_like(x)
        step[i] = h
        columns.append((f(x + step) - f(x - step)).reshape(-1) / (2 * h))
    return torch.stack(columns, -1)


@pytest.mark.parametrize("spec", [Chi2(0.3), KL(0.3), KLTemperature(0.7), Empirical(),
                                  Wasserstein(0.1)], ids=str)
def test_dual_derivatives_with_weights_by_finite_differences(spec):
    """grad_l and grad_a are the differences of dual_objective(..., weights=w); the Hessian
    blocks (diag + rank one in l, cross, hess_a) are the differences of those gradients."""
    g = torch.Generator().manual_seed(8)
    rows, n = 3, 7
    l = torch.rand(rows, n, generator=g, dtype=F64).pow(2) * 4
    w = torch.rand(rows, n, generator=g, dtype=F64)
    w[0, 1] = w[1, 4] = w[2, 0] = 0
    l[2, 0] = 50.0  # an absent sample far above the others
    a = spec.solve_dual(l, weights=w) + (0.05 if spec.dual_size else 0.0)
    unit = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    der = spec.dual_derivatives(l, a, unit, weights=w)
    k = spec.dual_size
    for row in range(rows):
        def objective(x, row=row):
            return spec.dual_objective(x[None, :n], x[None, n:], unit[row : row + 1],
                                       weights=w[row])[0]

        def gradient(x, row=row):
            d = spec.dual_derivatives(x[None, :n], x[None, n:], unit[row : row + 1],
                                      weights=w[row])
            return torch.cat([d.grad_l[0], d.grad_a[0]]) if k else d.grad_l[0]

        x = torch.cat([l[row], a[row]])
        torch.testing.assert_close(der.value[row], objective(x))
        first = _fd_gradient(objective, x, 1e-6)[0]
        torch.testing.assert_close(der.grad_l[row], first[:n], rtol=1e-6, atol=1e-8)
        assert bool((der.grad_l[row][w[row] == 0] == 0).all())
        second = _fd_gradient(gradient, x, 1e-6)
        low = der.low[row]
        hess_l = torch.diag(der.diag[row]) + der.low_sign[row] * torch.outer(low, low)
        torch.testing.assert_close(hess_l, second[:n, :n], rtol=1e-5, atol=1e-7)
        if k:
            torch.testing.assert_close(der.grad_a[row], first[n:], rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(der.cross[row, :, 0], second[:n, n], rtol=1e-5,
                                       atol=1e-7)
            torch.testing.assert_close(der.hess_a[row, 0, 0], second[n, n], rtol=1e-5,
                                       atol=1e-7)
        else:
            assert der.grad_a is None and a.shape[-1] == 0


# --------------------------------------------------------------------------- dual solve


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), frac=st.sampled_from([1e-3, 0.1, 0.5, 0.9, 2.0]),
       shift=st.floats(-2.0, 2.0), ball=st.sampled_from(["chi2", "kl"]))
def test_solve_dual_with_weights_minimises_the_weighted_dual_objective(seed, frac, shift,
                                                                       ball):
    g = torch.Generator().manual_seed(seed)
    l = torch.rand(4, 30, generator=g, dtype=F64).pow(3) * 5
    w = torch.rand(4, 30, generator=g, dtype=F64) * (torch.rand(4, 30, generator=g) > 0.3)
    w[:, 0] = 0.5  # every problem keeps a sample
    # One radius for the batch: a fraction of the smallest threshold, so that frac < 1 keeps
    # every problem off the max regime.
    thresholds = [_threshold(ball, l[i].numpy(), w[i].numpy()) for i in range(4)]
    spec = (Chi2 if ball == "chi2" else KL)(frac * min(thresholds))
    exact = spec.worst_case(l, weights=w)
    cold = spec.solve_dual(l, weights=w)
    start = cold * math.exp(shift) if ball == "kl" else cold + shift
    warm = spec.solve_dual(l, start, weights=w)
    top = torch.where(w > 0, l, -math.inf).amax(-1)
    for dual in (cold, warm):
        value = spec.dual_objective(l, dual, weights=w)
        # inf_a A(l, a) is the worst case (chi-square's A is flat at the max from the max on)
        torch.testing.assert_close(torch.minimum(value, top), exact.value, rtol=1e-11,
                                   atol=1e-12)
        if frac < 1:
            for step in (1e-3, 1e-1):
                for sign in (-1, 1):
                    moved = dual * math.exp(sign * step) if ball == "kl" else dual + sign * step
                    assert bool((spec.dual_objective(l, moved, weights=w)
                                 >= value - 1e-12 * value.abs()).all())


# ------------------------------------------------------------------------ bad weights

L3 = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
BATCH = torch.tensor([[0.5, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 2.0, 1.0]], dtype=F64)

BAD = [
    ([1.0, 1.0, 1.0], L3, TypeError, "weights must be a torch.Tensor or None, got list"),
    (torch.ones(3, dtype=torch.int64), L3, TypeError,
     "weights must be a floating-point tensor, got dtype torch.int64"),
    (torch.ones(4, dtype=F64), L3, ValueError,
     r"weights of shape \(4,\) do not broadcast to \w+ of shape \((1, )?3,?\)"),
    (torch.ones(2, 3, dtype=F64), L3, ValueError,
     r"weights of shape \(2, 3\) do not broadcast to \w+ of shape \((1, )?3,?\)"),
    (torch.tensor([1.0, -1.0, 1.0], dtype=F64), L3, ValueError, "weights must be non-negative"),
    (torch.tensor([1.0, math.nan, 1.0], dtype=F64), L3, ValueError, "weights must be finite"),
    (torch.tensor([1.0, math.inf, 1.0], dtype=F64), L3, ValueError, "weights must be finite"),
    # the set methods read one problem as a batch of one
    (torch.zeros(3, dtype=F64), L3, ValueError,
     r"weights (must not be all zero|are all zero in 1 of 1 problems)"),
    (torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64), BATCH,
     ValueError, r"weights are all zero in 2 of 3 problems \(first at batch index \(1,\)\)"),
    (torch.ones(3, dtype=F64, device="meta"), L3, ValueError,
     r"weights must be on the device of \w+ \(cpu\), got meta"),
]
BAD_IDS = ["list", "integer", "short", "extra-dimension", "negative", "nan", "inf", "zero",
           "zero-rows", "device"]


def _entry_points(losses: Tensor):
    """Every function and set method that takes weights, as callables of the weights."""
    grads = losses.abs() + 1
    dual = losses.new_ones((*losses.shape[:-1], 1)) if losses.ndim > 1 else losses.new_ones(1)
    rows = losses if losses.ndim > 1 else losses[None]
    yield "chi2_worst_case", lambda w: chi2_worst_case(losses, 0.1, weights=w)
    yield "kl_worst_case", lambda w: kl_worst_case(losses, 0.1, weights=w)
    yield "kl_tilted", lambda w: kl_tilted(losses, 0.5, weights=w)
    yield "wasserstein_penalty", lambda w: wasserstein_penalty(grads, 0.1, weights=w)
    for spec in (None, Chi2(0.1), KL(0.1), KLTemperature(0.5), Wasserstein(0.1)):
        yield f"robust_mean {spec}", lambda w, spec=spec: robust_mean(
            losses, spec, grad_sq_norms=grads, weights=w)
    for spec in (Empirical(), Chi2(0.1), KL(0.1), KLTemperature(0.5), Wasserstein(0.1)):
        d = dual[None] if losses.ndim == 1 else dual
        d = d[..., : spec.dual_size]
        yield f"{spec} worst_case", lambda w, spec=spec: spec.worst_case(losses, grads, weights=w)
        yield f"{spec} dual_objective", lambda w, spec=spec, d=d: spec.dual_objective(
            rows, d, weights=w)
        yield f"{spec} dual_derivatives", lambda w, spec=spec, d=d: spec.dual_derivatives(
            rows, d, weights=w)
        yield f"{spec} solve_dual", lambda w, spec=spec: spec.solve_dual(rows, weights=w)


@pytest.mark.parametrize(("weights", "losses", "error", "message"), BAD, ids=BAD_IDS)
def test_bad_weights_are_refused_everywhere_with_one_line(weights, losses, error, message,
                                                          monkeypatch):
    # Before any work: the solvers never normalise the losses.
    def no_work(*args, **kwargs):
        raise AssertionError("the weights were checked after the solve started")

    monkeypatch.setattr(drosim.dro, "_normalise", no_work)
    for where, call in _entry_points(losses):
        with pytest.raises(error, match=message) as info:
            call(weights)
        assert "\n" not in str(info.value), where


def test_good_weights_pass_every_entry_point():
    w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 2.0], [1e-300, 1e-300, 0.0]], dtype=F64)
    for _, call in _entry_points(BATCH):
        call(w)
        call(w[0])
