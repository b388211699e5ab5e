"""The ambiguity-set protocol of drosim.dro: what the estimators ask of each set agrees with
its exact worst case, and the derivatives the Newton steps use are the dual objective's."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drosim.dro import (
    KL,
    Chi2,
    Empirical,
    KLTemperature,
    Wasserstein,
    as_ambiguity_set,
    kl_tilted,
    wasserstein_penalty,
)

F64 = torch.float64


def _losses(seed: int, rows: int = 4, n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, n, generator=g, dtype=F64).pow(3) * 5


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rho=st.sampled_from([1e-3, 0.05, 0.5, 3.0]),
       shift=st.floats(-2.0, 2.0), ball=st.sampled_from(["chi2", "kl"]))
def test_warm_dual_solve_is_the_exact_dual_from_any_start(seed, rho, shift, ball):
    spec = Chi2(rho) if ball == "chi2" else KL(rho)
    l = _losses(seed)
    exact = spec.worst_case(l)
    cold = spec.solve_dual(l)
    start = cold * math.exp(shift) if ball == "kl" else cold + shift
    warm = spec.solve_dual(l, start)
    # The dual objective at the solved dual is the worst case (strong duality), and the
    # dual is the exact solver's wherever the worst case is not the max.
    interior = exact.value < l.amax(-1)
    for dual in (cold, warm):
        value = spec.dual_objective(l, dual)
        torch.testing.assert_close(torch.minimum(value, l.amax(-1)), exact.value,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dual[interior, 0], exact.dual[interior], rtol=1e-9,
                                   atol=1e-12)


@pytest.mark.parametrize("spec", [Chi2(0.3), KL(0.3), KLTemperature(0.7), Empirical(),
                                  Wasserstein(0.1)], ids=str)
def test_dual_derivatives_are_those_of_the_dual_objective(spec):
    # Autograd of dual_objective against the closed forms (gradient, the Hessian in the losses
    # as diag + rank one, the dual's row and corner), at a point off every kink.
    l = _losses(3, rows=3, n=7)
    a = spec.solve_dual(l) + (0.05 if spec.dual_size else 0.0)
    unit = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    der = spec.dual_derivatives(l, a, unit)
    for row in range(3):
        x = torch.cat([l[row], a[row]]).requires_grad_()

        def objective(x, row=row):
            return spec.dual_objective(x[None, :7], x[None, 7:], unit[row : row + 1])[0]

        grad = torch.autograd.grad(objective(x), x)[0]
        hess = torch.autograd.functional.hessian(objective, x.detach())
        torch.testing.assert_close(der.value[row], objective(x).detach())
        torch.testing.assert_close(der.grad_l[row], grad[:7])
        low = der.low[row]
        expected = torch.diag(der.diag[row]) + der.low_sign[row] * torch.outer(low, low)
        torch.testing.assert_close(expected, hess[:7, :7], rtol=1e-9, atol=1e-12)
        if spec.dual_size:
            torch.testing.assert_close(der.grad_a[row], grad[7:])
            torch.testing.assert_close(der.cross[row, :, 0], hess[:7, 7], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(der.hess_a[row, 0, 0], hess[7, 7], rtol=1e-9, atol=1e-12)
        else:
            assert der.grad_a is None and a.shape[-1] == 0


def test_a_temperature_reads_its_losses_in_units():
    # tau log E exp(l / tau) of losses l = u * l': u times the objective of l' at tau / u.
    l = _losses(5)
    unit = torch.tensor([1.0, 4.0, 0.25, 3.0], dtype=F64)
    spec = KLTemperature(0.8)
    scaled = spec.dual_objective(l / unit[:, None], l.new_zeros(4, 0), unit) * unit
    torch.testing.assert_close(scaled, kl_tilted(l, 0.8).value, rtol=1e-13, atol=0)


def test_the_empirical_set_and_none_are_the_mean():
    l = _losses(7)
    result = Empirical().worst_case(l)
    torch.testing.assert_close(result.value, l.mean(-1))
    torch.testing.assert_close(result.weights, torch.full_like(l, 1 / l.shape[-1]))
    assert torch.isnan(result.dual).all() and as_ambiguity_set(None) == Empirical()


def test_wasserstein_worst_case_is_mean_plus_penalty_with_its_price_as_dual():
    l, g = _losses(8), _losses(9)
    result = Wasserstein(0.2, p=2).worst_case(l, g)
    torch.testing.assert_close(result.value, l.mean(-1) + wasserstein_penalty(g, 0.2))
    torch.testing.assert_close(result.dual, wasserstein_penalty(g, 1.0))
    with pytest.raises(ValueError, match="needs grad_sq_norms"):
        Wasserstein(0.2).worst_case(l)


@pytest.mark.parametrize(("spec", "empirical", "minimax"), [
    (Chi2(0.0), True, False), (KL(0.0), True, False), (Wasserstein(0.0), True, False),
    (KLTemperature(math.inf), True, False), (Chi2(math.inf), False, True),
    (KL(math.inf), False, True), (KLTemperature(0.0), False, True), (Chi2(0.1), False, False),
])
def test_limits_of_the_radius_are_flagged(spec, empirical, minimax):
    assert spec.is_empirical == empirical and spec.is_minimax == minimax


@pytest.mark.parametrize("bad", ["chi2", 0.1, object(), Chi2])
def test_anything_but_a_set_is_refused(bad):
    with pytest.raises(TypeError, match="unknown ambiguity set"):
        as_ambiguity_set(bad)
