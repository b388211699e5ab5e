"""The batched (DRO-)REBEL / (DRO-)DPO estimators against cvxpy, and their invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from drosim import reference
from drosim.dro import KL, Chi2, KLTemperature, Wasserstein, as_ambiguity_set
from drosim.estimators import dpo, rebel

F64 = torch.float64
REBEL_SPECS = [None, Chi2(0.05), Chi2(1.0), KL(0.05), KL(0.5), KLTemperature(0.5),
               Wasserstein(0.05), Wasserstein(0.5)]
DPO_SPECS = [None, Chi2(0.05), KL(0.05), KLTemperature(0.5), Wasserstein(0.05, p=1)]


@st.composite
def regression(draw, logistic: bool = False):
    """One problem: n pairs in d dimensions, possibly ill-conditioned or with tiny n.

    n >= 4 (d + 1) keeps the worst case at the minimiser off the max for the radii used here
    (tests/test_estimators_exact.py covers the radii where it sits on the max).
    """
    d = draw(st.integers(1, 5))
    n = draw(st.integers(4 * (d + 1), 40))
    seed = draw(st.integers(0, 2**31 - 1))
    condition = draw(st.sampled_from([1.0, 1e2, 1e4]))
    g = np.random.default_rng(seed)
    dphi = g.standard_normal((n, d)) * np.geomspace(1.0, 1.0 / condition, d)
    theta = g.standard_normal(d)
    if logistic:
        # Labels from Bradley-Terry with both outcomes in every problem (no separation).
        pref = (g.random(n) < 1 / (1 + np.exp(-dphi @ theta))).astype(float)
        pref[:2] = [0.0, 1.0]
        return dphi, pref
    return dphi, dphi @ theta + draw(st.sampled_from([0.1, 1.0])) * g.standard_normal(n)


def _assert_matches(fit_w, fit_objective, ref, dphi):
    assume(ref.status == "optimal")
    # Objective within 1e-6 relative; ours may only be lower (it is a minimiser too).
    assert fit_objective <= ref.objective + 1e-6 * abs(ref.objective) + 1e-12
    assert fit_objective >= ref.objective - 1e-6 * abs(ref.objective) - 1e-12
    # Parameters within 1e-4 in the data's own norm sqrt(mean <dphi, w - w_ref>^2): on
    # ill-conditioned draws the flat directions are set by cvxpy's tolerance, not the data.
    gap = np.sqrt(np.mean(np.square(dphi @ (fit_w - ref.w))))
    assert gap <= 1e-4 * (1 + np.sqrt(np.mean(np.square(dphi @ ref.w))))


@pytest.mark.parametrize("spec", REBEL_SPECS, ids=str)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=regression())
def test_rebel_equals_cvxpy_minimiser(spec, problem):
    dphi, dr = problem
    fit = rebel(torch.from_numpy(dphi)[None], torch.from_numpy(dr)[None], spec)
    ref = reference.rebel_fit(dphi, dr, spec)
    _assert_matches(fit.w[0].numpy(), float(fit.objective[0]), ref, dphi)


@pytest.mark.parametrize("spec", DPO_SPECS, ids=str)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=regression(logistic=True))
def test_dpo_equals_cvxpy_minimiser(spec, problem):
    dphi, pref = problem
    ridge = 1e-2  # keeps nearly separable draws bounded, in both solvers alike
    fit = dpo(torch.from_numpy(dphi)[None], torch.from_numpy(pref)[None], 1.0, spec, ridge=ridge)
    ref = reference.dpo_fit(dphi, pref, 1.0, spec, ridge=ridge)
    _assert_matches(fit.w[0].numpy(), float(fit.objective[0]), ref, dphi)


def _batch(trials=6, n=50, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dphi = torch.randn(trials, n, d, generator=g, dtype=F64)
    theta = torch.randn(d, generator=g, dtype=F64)
    dr = dphi @ theta + 0.5 * torch.randn(trials, n, generator=g, dtype=F64)
    pref = torch.bernoulli(torch.sigmoid(dphi @ theta), generator=g)
    return dphi, dr, pref, theta


@pytest.mark.parametrize("spec", REBEL_SPECS[1:], ids=str)
def test_robust_rebel_objective_is_never_below_the_plain_one(spec):
    dphi, dr, _, _ = _batch()
    plain, robust = rebel(dphi, dr), rebel(dphi, dr, spec)
    assert torch.all(robust.objective >= plain.objective - 1e-12)


@pytest.mark.parametrize("spec", DPO_SPECS[1:], ids=str)
def test_robust_dpo_objective_is_never_below_the_plain_one(spec):
    dphi, _, pref, _ = _batch()
    plain, robust = dpo(dphi, pref, 1.0), dpo(dphi, pref, 1.0, spec)
    assert torch.all(robust.objective >= plain.objective - 1e-12)


@pytest.mark.parametrize("spec", [None, Chi2(0.1), KL(0.1), Wasserstein(0.1)], ids=str)
def test_batched_fit_equals_one_trial_at_a_time(spec):
    dphi, dr, _, _ = _batch()
    batched = rebel(dphi, dr, spec)
    for i in range(dphi.shape[0]):
        single = rebel(dphi[i : i + 1], dr[i : i + 1], spec)
        torch.testing.assert_close(batched.w[i], single.w[0], rtol=0, atol=1e-8)


@pytest.mark.parametrize("spec", [Chi2(0.3), KL(0.3)], ids=str)
def test_noiseless_well_specified_rebel_recovers_theta_for_any_radius(spec):
    # Every loss vanishes at theta*, so every worst case does too: theta* is the minimiser.
    dphi, _, _, theta = _batch()
    fit = rebel(dphi, dphi @ theta, spec)
    torch.testing.assert_close(fit.w, theta.expand_as(fit.w), rtol=0, atol=1e-6)


def test_large_wasserstein_radius_gives_the_exact_zero_solution():
    # The square-root lasso is solved by w = 0 once rho >= ||E[r dphi]|| / sqrt(E r^2) at 0.
    dphi, dr, _, _ = _batch()
    fit = rebel(dphi, dr, Wasserstein(1e3))
    assert torch.all(fit.w == 0)
    torch.testing.assert_close(fit.objective, dr.square().mean(-1))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda d, r, p: rebel(d, r[:, :-1]), "must have shape"),
        (lambda d, r, p: rebel(d[:, :0], r[:, :0]), "empty batch"),
        (lambda d, r, p: rebel(d, r * float("nan")), "NaN or infinite"),
        (lambda d, r, p: rebel(d, r, weights=-r.abs()), "non-negative"),
        (lambda d, r, p: rebel(d, r, weights=r * float("nan")), "finite"),
        (lambda d, r, p: rebel(d, r, weights=0 * r), r"all zero in trials \[0, 1"),
        (lambda d, r, p: rebel(d, r, weights=r[:, :-1].abs()), "weights must have shape"),
        (lambda d, r, p: rebel(d, r, Wasserstein(0.1, p=1)), "exact for p = 2"),
        (lambda d, r, p: dpo(d, p, 0.0), "beta must be a finite number > 0"),
        (lambda d, r, p: dpo(d, p + 0.5, 1.0), "labels 0 or 1"),
        (lambda d, r, p: dpo(d, p, 1.0, Wasserstein(0.1)), "exact for p = 1"),
        (lambda d, r, p: rebel(d[0], r), "must be \\(trials, n, d\\)"),
    ],
)
def test_bad_input_raises_a_clear_error(call, match):
    dphi, dr, pref, _ = _batch()
    with pytest.raises(ValueError, match=match):
        call(dphi, dr, pref)


# --------------------------------------------------------------- degenerate and scaled data


ALL_REBEL = [None, Chi2(0.1), KL(0.1), KLTemperature(0.5), Wasserstein(0.05)]
ALL_DPO = [None, Chi2(0.1), KL(0.1), KLTemperature(0.5), Wasserstein(0.05, p=1)]


def _fit(loss, dphi, target, spec):
    return rebel(dphi, target, spec) if loss == "rebel" else dpo(dphi, target, 1.0, spec)


@pytest.mark.parametrize(("loss", "spec"), [("rebel", s) for s in ALL_REBEL]
                         + [("dpo", s) for s in ALL_DPO], ids=str)
def test_an_all_zero_dphi_trial_gets_w_zero_and_leaves_the_others_alone(loss, spec):
    dphi, dr, pref, _ = _batch(trials=4)
    target = dr if loss == "rebel" else pref
    degenerate = dphi.clone()
    degenerate[1] = 0.0
    fit, alone = _fit(loss, degenerate, target, spec), _fit(loss, dphi, target, spec)
    # The loss does not depend on w there: the minimum-norm minimiser is 0, and the
    # objective is the set's worst case of the constant-in-w losses.
    assert torch.all(fit.w[1] == 0)
    l = dr[1].square() if loss == "rebel" else torch.full_like(dr[1], math.log(2.0))
    expected = as_ambiguity_set(spec).worst_case(l).value if not (
        spec is not None and spec.needs_input_gradients) else l.mean()
    torch.testing.assert_close(fit.objective[1], expected, rtol=1e-12, atol=0)
    keep = [0, 2, 3]
    torch.testing.assert_close(fit.w[keep], alone.w[keep], rtol=0, atol=1e-9)
    torch.testing.assert_close(fit.objective[keep], alone.objective[keep], rtol=1e-12, atol=0)


@pytest.mark.parametrize("scale", [1e-150, 1e200])
@pytest.mark.parametrize(("loss", "spec"), [("rebel", s) for s in ALL_REBEL]
                         + [("dpo", s) for s in ALL_DPO], ids=str)
def test_the_scale_of_dphi_is_normalised_away(loss, spec, scale):
    # <w, c dphi> = <w / c, dphi>: the same losses at w / c (w to the accuracy of a Newton
    # decrement at rounding level, the objective to rounding). The input cost of a Wasserstein
    # ball scales with dphi, so there the radius does too.
    dphi, dr, pref, _ = _batch(trials=3)
    target = dr if loss == "rebel" else pref
    scaled_spec = spec
    if spec is not None and spec.needs_input_gradients:
        scaled_spec = Wasserstein(spec.rho * scale, spec.p)
    fit, reference_fit = _fit(loss, dphi * scale, target, scaled_spec), _fit(loss, dphi, target,
                                                                               spec)
    assert torch.all(torch.isfinite(fit.w)) and torch.all(torch.isfinite(fit.objective))
    torch.testing.assert_close(fit.w * scale, reference_fit.w, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(fit.objective, reference_fit.objective, rtol=1e-9, atol=0)


@pytest.mark.parametrize("scale", [1e-150, 1e150])
@pytest.mark.parametrize("spec", [None, Chi2(0.1), KL(0.1), Wasserstein(0.05)], ids=str)
def test_the_scale_of_the_relative_rewards_is_normalised_away(spec, scale):
    # Every set here is positively homogeneous: fitting c dr gives c w and c^2 the objective.
    dphi, dr, _, _ = _batch(trials=3)
    fit, reference_fit = rebel(dphi, dr * scale, spec), rebel(dphi, dr, spec)
    torch.testing.assert_close(fit.w / scale, reference_fit.w, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(fit.objective / scale**2, reference_fit.objective, rtol=1e-9,
                               atol=0)


def test_an_objective_beyond_the_float_range_is_refused():
    dphi, dr, _, _ = _batch(trials=2)
    with pytest.raises(ValueError, match="overflows"):
        rebel(dphi, dr * 1e200, Chi2(0.1))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"beta": math.inf}, ValueError, "beta must be a finite number > 0"),
    ({"beta": math.nan}, ValueError, "beta must be a finite number > 0"),
    ({"beta": -1.0}, ValueError, "beta must be a finite number > 0"),
    ({"beta": "1"}, TypeError, "beta must be a real number"),
    ({"ridge": math.nan}, ValueError, "ridge must be a finite number >= 0"),
    ({"ridge": -1.0}, ValueError, "ridge must be a finite number >= 0"),
    ({"ridge": math.inf}, ValueError, "ridge must be a finite number >= 0"),
])
def test_dpo_refuses_invalid_arguments_naming_them(kwargs, error, match):
    dphi, _, pref, _ = _batch(trials=2)
    with pytest.raises(error, match=match):
        dpo(dphi, pref, **{"beta": 1.0, **kwargs})


@pytest.mark.parametrize("call", [
    lambda d, r: rebel(d.to(torch.int64), r),
    lambda d, r: rebel(d, r.to(torch.int64)),
    lambda d, r: rebel(d.float(), r),
    lambda d, r: rebel(d.numpy(), r),
    lambda d, r: rebel(d, r, "chi2"),
    lambda d, r: rebel(d, r, weights=r.abs().float()),
    lambda d, r: rebel(d, r, weights=[1.0] * r.shape[1]),
])
def test_integer_mixed_and_non_tensor_inputs_get_a_type_error(call):
    dphi, dr, _, _ = _batch(trials=2)
    with pytest.raises(TypeError):
        call(dphi, dr)


@pytest.mark.parametrize("spec", [Chi2(math.inf), KL(math.inf), KLTemperature(0.0)], ids=str)
def test_minimax_sets_give_the_chebyshev_fit(spec):
    # Every distribution on the samples: min_w max_i (<w, dphi_i> - dr_i)^2, whose square root
    # is the L-infinity regression's optimum (an LP, here scipy's).
    from scipy.optimize import linprog

    dphi, dr, _, _ = _batch(trials=2, n=30)
    fit = rebel(dphi, dr, spec)
    for i in range(2):
        a, b = dphi[i].numpy(), dr[i].numpy()
        n, d = a.shape
        # min t subject to -t <= a w - b <= t, over (w, t)
        ones = np.ones((n, 1))
        lp = linprog(np.r_[np.zeros(d), 1.0], A_ub=np.block([[a, -ones], [-a, -ones]]),
                     b_ub=np.r_[b, -b], bounds=[(None, None)] * d + [(0, None)])
        assert float(fit.objective[i]) == pytest.approx(lp.fun**2, rel=1e-7)


@pytest.mark.parametrize("spec", [Chi2(0.05), KL(0.05), Wasserstein(0.05, p=1)], ids=str)
def test_robust_dpo_minimisers_near_the_kink_at_zero_are_found(spec):
    # Weak signal: the robust DPO minimiser lies close to w = 0, where every loss is log 2 and
    # the objective has a kink. Newton steps that overshoot towards the origin used to land
    # there off the minimiser's direction and crawl into w = 0, 0.1-0.2% above the optimum.
    g = torch.Generator().manual_seed(0)
    trials, n, d = 24, 512, 16
    dphi = torch.randn(trials, n, d, generator=g, dtype=F64) / d**0.5
    theta = torch.randn(d, generator=g, dtype=F64)
    torch.randn(trials, n, generator=g, dtype=F64)  # the benchmark's noise draw, unused
    pref = torch.bernoulli(torch.sigmoid(dphi @ theta), generator=g)
    fit = dpo(dphi, pref, 1.0, spec)
    for i in range(trials):
        ref = reference.dpo_fit(dphi[i].numpy(), pref[i].numpy(), 1.0, spec)
        if ref.status == "optimal":
            assert float(fit.objective[i]) <= ref.objective * (1 + 1e-6), i
