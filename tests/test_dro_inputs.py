"""Adversarial and invalid inputs: n = 1, constant rows, heavy ties, heavy tails, 1e30-scale
and near-overflow losses, tiny spreads on large offsets, bad arguments (ValueError or
TypeError naming the problem) and a memory-linearity guard on n = 200_000."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from helpers import F64, chi2_divergence, kl_divergence, rhos, t64, tol
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from drosim.dro import (
    KL,
    Chi2,
    KLTemperature,
    Wasserstein,
    chi2_worst_case,
    kl_tilted,
    kl_worst_case,
    robust_mean,
    wasserstein_linear_sq_worst_case,
    wasserstein_penalty,
)

SOLVERS = {"chi2": (chi2_worst_case, chi2_divergence), "kl": (kl_worst_case, kl_divergence)}
solver_names = pytest.mark.parametrize("name", sorted(SOLVERS))
ALL_SOLVERS = pytest.mark.parametrize("solve", [chi2_worst_case, kl_worst_case, kl_tilted],
                                      ids=["chi2", "kl", "kl_tilted"])


def _assert_certified(res, l: torch.Tensor, rho: float, divergence, rel: float = 1e-9):
    """Finite, simplex weights inside the ball, value = E_q[l] within [mean, max]."""
    ld = l.double()
    value = float(res.value)
    assert math.isfinite(value)
    assert bool(torch.isfinite(res.weights).all()) and bool((res.weights >= 0).all())
    assert abs(float(res.weights.double().sum()) - 1) <= (1e-12 if l.dtype == F64 else 1e-6)
    assert float(divergence(res.weights.double())) <= rho * (1 + 1e-9) + (
        1e-12 if l.dtype == F64 else 1e-5)
    slack = tol(ld, rel)
    assert float(ld.mean()) - slack <= value <= float(ld.max()) + slack
    assert abs(float((res.weights.double() * ld).sum()) - value) <= slack


# ------------------------------------------------------------------- degenerate inputs


@solver_names
@settings(max_examples=30)
@given(x=st.floats(-1e6, 1e6), rho=rhos())
def test_single_sample_gives_that_sample(name, device, x, rho):
    solve, _ = SOLVERS[name]
    res = solve(torch.tensor([x], dtype=F64, device=device), rho)
    assert float(res.value) == x
    assert float(res.weights[0]) == 1.0


@solver_names
@settings(max_examples=30)
@given(x=st.floats(-1e6, 1e6), n=st.integers(1, 300), rho=rhos())
def test_constant_losses_give_the_constant_and_uniform_weights(name, device, x, n, rho):
    solve, _ = SOLVERS[name]
    res = solve(torch.full((n,), x, dtype=F64, device=device), rho)
    assert float(res.value) == x
    torch.testing.assert_close(res.weights, torch.full((n,), 1 / n, dtype=F64, device=device),
                               rtol=0, atol=1e-15)


def test_kl_tilted_single_and_constant_rows(device):
    l = torch.tensor([[2.5, 2.5, 2.5]], dtype=F64, device=device)
    for tau in (0.0, 1e-3, 1.0):
        res = kl_tilted(l, tau)
        assert float(res.value) == 2.5
        torch.testing.assert_close(res.weights, torch.full_like(l, 1 / 3))


@solver_names
@settings(max_examples=40)
@given(l=hnp.arrays(np.float64, st.integers(1, 400), elements=st.sampled_from([0.0, 1.0, 2.0])),
       rho=rhos())
def test_many_ties_are_certified_and_tied_losses_get_equal_weights(name, device, l, rho):
    solve, divergence = SOLVERS[name]
    lt = t64(l, device)
    res = solve(lt, rho)
    _assert_certified(res, lt, rho, divergence)
    for level in (0.0, 1.0, 2.0):
        w = res.weights[lt == level]
        if w.numel():
            assert float(w.max() - w.min()) <= 1e-15


@solver_names
@pytest.mark.parametrize("dist", ["pareto0.5", "pareto1.1", "lognormal3"])
@pytest.mark.parametrize("rho", [1e-4, 0.1, 1.0, 10.0])
def test_heavy_tails_are_certified(name, device, dist, rho):
    rng = np.random.default_rng(7)
    if dist.startswith("pareto"):
        l = rng.pareto(float(dist[6:]), size=(3, 5000))
    else:
        l = rng.lognormal(0.0, 3.0, size=(3, 5000))
    solve, divergence = SOLVERS[name]
    res = solve(t64(l, device), rho)
    for i in range(3):
        _assert_certified(type(res)(res.value[i], res.weights[i], res.dual[i]),
                          t64(l[i], device), rho, divergence)


@solver_names
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("rho", [0.0, 1e-3, 0.5, 5.0, 1e3])
def test_1e30_scale_losses_do_not_overflow(name, device, dtype, rho):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 64, generator=g, dtype=F64)
    l = (base * 1e30).to(dtype).to(device)
    solve, divergence = SOLVERS[name]
    res = solve(l, rho)
    assert res.value.dtype == dtype
    for i in range(4):
        _assert_certified(type(res)(res.value[i], res.weights[i], res.dual[i]), l[i], rho,
                          divergence, rel=1e-9 if dtype == F64 else 1e-4)
    # the answer is the unit-scale answer scaled by 1e30
    unit = solve(base, rho).value
    torch.testing.assert_close(res.value.double().cpu() / 1e30, unit,
                               rtol=0, atol=1e-9 if dtype == F64 else 1e-4)


@ALL_SOLVERS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_losses_whose_spread_exceeds_the_float_range_give_a_finite_max_bounded_value(
        solve, device, dtype):
    """Finite losses at +-0.75 * finfo.max: max - min overflows, the answer must not."""
    big = 0.75 * torch.finfo(dtype).max
    l = torch.tensor([-big, 0.0, big], dtype=dtype, device=device)
    res = solve(l, 0.5)
    assert bool(torch.isfinite(res.value)), res
    assert bool(torch.isfinite(res.weights).all()), res
    assert float(res.value) <= big
    assert float(res.value) >= 0.0  # the mean is 0


@solver_names
@settings(max_examples=40)
@given(u=hnp.arrays(np.float64, st.integers(2, 200), elements=st.floats(0.0, 1.0)),
       rho=rhos(), offset=st.sampled_from([1e6, -1e6, 1e8, -1e10]))
def test_tiny_spread_on_a_large_offset_is_resolved(name, device, u, rho, offset):
    """l = offset + 1e-3 u: (value - offset) equals the value of the exactly shifted losses
    l - offset (and, for |offset| = 1e6, 1e-3 value(u)) to 1e-6 of the spread."""
    if u.max() == u.min():
        u[0], u[-1] = 0.0, 1.0
    u = (u - u.min()) / (u.max() - u.min())  # spread exactly 1
    solve, _ = SOLVERS[name]
    ut = t64(u, device)
    l = offset + 1e-3 * ut
    small = l - offset  # exact (Sterbenz): the losses the solver actually sees, unshifted
    spread = float(l.max() - l.min())
    value = float(solve(l, rho).value)
    # value is a float64 near offset: it cannot be closer than half an ulp of the offset
    budget = 1e-6 * spread + math.ulp(abs(offset))
    assert abs((value - offset) - float(solve(small, rho).value)) <= budget
    if abs(offset) == 1e6:  # the input rounding (ulp(1e6) / 2 ~ 6e-11) is inside the budget
        assert abs((value - offset) - 1e-3 * float(solve(ut, rho).value)) <= budget


# ---------------------------------------------------------------------- invalid input


@ALL_SOLVERS
def test_negative_radius_raises(solve):
    with pytest.raises(ValueError, match="non-negative"):
        solve(torch.ones(3, dtype=F64), -0.1)


@ALL_SOLVERS
def test_nan_radius_raises(solve):
    with pytest.raises(ValueError, match="NaN"):
        solve(torch.ones(3, dtype=F64), math.nan)
    with pytest.raises(ValueError, match="NaN"):
        solve(torch.ones(2, 3, dtype=F64), torch.tensor([0.1, math.nan], dtype=F64))


@ALL_SOLVERS
def test_negative_entry_in_radius_tensor_raises(solve):
    with pytest.raises(ValueError, match="non-negative"):
        solve(torch.ones(2, 3, dtype=F64), torch.tensor([0.1, -1.0], dtype=F64))


@ALL_SOLVERS
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_losses_raise(solve, bad):
    l = torch.tensor([0.0, 1.0, bad, 2.0], dtype=F64)
    with pytest.raises(ValueError, match="NaN or infinite"):
        solve(l, 0.1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        solve(l.float().expand(2, -1), 0.1)


@ALL_SOLVERS
@pytest.mark.parametrize("shape", [(0,), (3, 0), ()])
def test_empty_last_dimension_raises(solve, shape):
    with pytest.raises(ValueError, match="non-empty last dimension"):
        solve(torch.ones(shape, dtype=F64), 0.1)


@ALL_SOLVERS
@pytest.mark.parametrize("rho_shape", [(3,), (2, 2), (4, 1, 1)])
def test_radius_that_does_not_broadcast_raises(solve, rho_shape):
    with pytest.raises(ValueError, match="does not broadcast"):
        solve(torch.ones(2, 5, dtype=F64), torch.full(rho_shape, 0.1, dtype=F64))


@ALL_SOLVERS
def test_integer_losses_raise_and_non_tensor_losses_raise_type_error(solve):
    with pytest.raises(ValueError, match="floating-point"):
        solve(torch.arange(4), 0.1)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        solve([0.0, 1.0], 0.1)


def test_wasserstein_penalty_rejects_negative_grad_norms_and_small_orders():
    g = torch.tensor([1.0, 2.0], dtype=F64)
    with pytest.raises(ValueError, match="non-negative"):
        wasserstein_penalty(torch.tensor([1.0, -1e-12], dtype=F64), 0.1)
    for p in (0.5, 0.0, -1.0):
        with pytest.raises(ValueError, match=r"p must be >= 1"):
            wasserstein_penalty(g, 0.1, p)
    with pytest.raises(ValueError, match=r"p must not be NaN"):  # as Wasserstein(0.1, nan)
        wasserstein_penalty(g, 0.1, math.nan)
    with pytest.raises(ValueError, match="non-negative"):
        wasserstein_penalty(g, -0.1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        wasserstein_penalty(torch.tensor([1.0, math.inf], dtype=F64), 0.1)


def test_wasserstein_linear_sq_rejects_bad_inputs():
    r, w = torch.ones(2, 4, dtype=F64), torch.ones(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="leading"):
        wasserstein_linear_sq_worst_case(r, torch.ones(3, 3, dtype=F64), 0.1)
    with pytest.raises(ValueError, match="non-negative"):
        wasserstein_linear_sq_worst_case(r, w, -1.0)
    with pytest.raises(ValueError, match=r"w contains NaN"):
        wasserstein_linear_sq_worst_case(r, torch.full((2, 3), math.nan, dtype=F64), 0.1)
    with pytest.raises(ValueError, match=r"residuals contains NaN"):
        wasserstein_linear_sq_worst_case(torch.full((2, 4), math.inf, dtype=F64), w, 0.1)


def test_robust_mean_wasserstein_needs_matching_grad_sq_norms():
    l = torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match="needs grad_sq_norms"):
        robust_mean(l, Wasserstein(0.1))
    with pytest.raises(ValueError, match="must match"):
        robust_mean(l, Wasserstein(0.1), grad_sq_norms=torch.ones(3, dtype=F64))


@pytest.mark.parametrize("spec", ["chi2", 0.1, object(), Chi2], ids=repr)
def test_robust_mean_unknown_spec_raises_type_error(spec):
    with pytest.raises(TypeError, match="unknown ambiguity set"):
        robust_mean(torch.ones(4, dtype=F64), spec)


@pytest.mark.parametrize("spec", [Chi2(0.1), KL(0.1), KLTemperature(0.1), None])
def test_robust_mean_validates_losses_through_the_solver(spec):
    with pytest.raises(ValueError, match="NaN or infinite"):
        robust_mean(torch.tensor([0.0, math.nan], dtype=F64), spec)


# One radius rule, checked once at construction; the message names the set and parameter.
@pytest.mark.parametrize(("make", "label"), [
    (Chi2, "Chi2.rho"), (KL, "KL.rho"), (KLTemperature, "KLTemperature.tau"),
    (Wasserstein, "Wasserstein.rho"), (lambda v: Wasserstein(0.1, v), "Wasserstein.p"),
])
@pytest.mark.parametrize(("value", "error", "words"), [
    (-1.0, ValueError, "non-negative|>= 1"), (math.nan, ValueError, "not be NaN"),
    ("0.1", TypeError, "real number"), (True, TypeError, "real number"),
    (None, TypeError, "real number"),
])
def test_every_set_validates_its_parameters_at_construction(make, label, value, error, words):
    with pytest.raises(error, match=rf"{re.escape(label)} must (.* )?({words})"):
        make(value)


@pytest.mark.parametrize(("spec", "limit"), [(Chi2(math.inf), "max"), (KL(math.inf), "max"),
                                              (KLTemperature(math.inf), "mean"),
                                              (KLTemperature(0.0), "max")])
def test_an_infinite_radius_is_the_documented_limit(spec, limit):
    l = torch.tensor([0.0, 3.0, 1.0, 2.0], dtype=F64)
    expected = l.max() if limit == "max" else l.mean()
    assert float(spec.worst_case(l).value) == pytest.approx(float(expected), abs=1e-12)
    assert spec.is_minimax == (limit == "max")


def test_wasserstein_radius_must_be_finite_and_order_at_least_one():
    with pytest.raises(ValueError, match=r"Wasserstein\.rho must be finite"):
        Wasserstein(math.inf)
    with pytest.raises(ValueError, match=r"Wasserstein\.p must be >= 1"):
        Wasserstein(0.1, 0.5)
    assert Wasserstein(0.1, math.inf).p == math.inf


def test_set_parameters_are_stored_as_floats_and_sets_compare_by_value():
    assert Chi2(1) == Chi2(1.0) and isinstance(Chi2(1).rho, float)
    assert hash(KL(np.float64(0.5))) == hash(KL(0.5))


# -------------------------------------------------------------------- memory linearity


@solver_names
def test_large_n_runs_in_linear_memory(name):
    """(4, 200_000) float64: an n x n intermediate would need 320 GB."""
    g = torch.Generator().manual_seed(0)
    l = torch.randn(4, 200_000, generator=g, dtype=F64).exp()
    solve, divergence = SOLVERS[name]
    rho = torch.tensor([1e-3, 0.1, 0.5, 3.0], dtype=F64)
    res = solve(l, rho)
    assert res.value.shape == (4,)
    for i in (0, 3):
        _assert_certified(type(res)(res.value[i], res.weights[i], res.dual[i]), l[i],
                          float(rho[i]), divergence)


def test_chi2_subnormal_radius_gives_the_uniform_limit(device):
    """1 + 2 rho rounds to 1 and n v / (2 rho k) overflows: eta* = -inf, weights uniform."""
    l = torch.tensor([0.0] * 5 + [1.0] * 20, dtype=torch.float64, device=device)
    res = chi2_worst_case(l, 5e-324)
    torch.testing.assert_close(res.weights, torch.full_like(l, 1 / 25))
    assert float(res.value) == pytest.approx(0.8, abs=1e-15)


# ------------------------------------------------------------------ half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1000, 65536, 70000])
@pytest.mark.parametrize("solve", [chi2_worst_case, kl_worst_case, kl_tilted])
def test_half_precision_is_solved_in_float32_and_returned_in_its_dtype(solve, n, dtype):
    # float16 overflows at 65504 (a 65536-sample sum) and cannot resolve the duals' sums: the
    # answer must be the float64 one rounded to the input's dtype, dual sign included.
    g = torch.Generator().manual_seed(0)
    l = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    half, exact = solve(l, 0.1), solve(l.double(), 0.1)
    for got, want in zip(half, exact, strict=True):
        assert got.dtype == dtype and bool(torch.isfinite(got).all())
        # (float16 weights of 1/65536 are subnormal: their step is 2^-24.)
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=max(1e-3 / n, 2**-23))
    assert torch.sign(half.dual) == torch.sign(exact.dual)


def test_half_precision_keeps_the_danskin_gradient():
    l = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float16, requires_grad=True)
    chi2_worst_case(l, 0.1).value.backward()
    assert l.grad.dtype == torch.float16
    torch.testing.assert_close(l.grad.double(), chi2_worst_case(l.detach().double(), 0.1).weights,
                               rtol=1e-3, atol=1e-3)
