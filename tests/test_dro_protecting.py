"""Chi2.protecting(f) and KL.protecting(f): the smallest balls holding every reweighting of P
onto a subpopulation of mass f, so that the worst case is at least the worst f-fraction's
mean (CVaR_f)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drosim.dro import KL, Chi2, chi2_worst_case, kl_worst_case

F64 = torch.float64


def _cvar(losses: torch.Tensor, f: float) -> float:
    """Mean of the worst f-fraction of equally weighted losses (a fractional last sample)."""
    s = torch.sort(losses, descending=True).values
    mass = f * len(s)
    whole = math.floor(mass)
    total = float(s[:whole].sum()) + (mass - whole) * (float(s[whole]) if whole < len(s) else 0)
    return total / mass


@pytest.mark.parametrize("f", [1.0, 0.5, 0.1, 0.01])
def test_the_radii_are_the_divergences_of_a_subpopulation(f):
    # dQ/dP = 1/f on mass f, 0 elsewhere: chi2 = 1/2 E_P (dQ/dP - 1)^2, KL = E_Q log dQ/dP
    chi2 = 0.5 * (f * (1 / f - 1) ** 2 + (1 - f))
    assert Chi2.protecting(f).rho == pytest.approx(chi2, rel=1e-12, abs=1e-15)
    assert KL.protecting(f).rho == pytest.approx(math.log(1 / f), rel=1e-12, abs=1e-15)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), f=st.floats(0.02, 1.0), seed=st.integers(0, 2**31 - 1))
def test_the_worst_case_is_at_least_the_worst_fraction_s_mean(n, f, seed):
    g = torch.Generator().manual_seed(seed)
    losses = torch.randn(n, generator=g, dtype=F64).exp()
    floor = _cvar(losses, f)
    for worst in (chi2_worst_case(losses, Chi2.protecting(f).rho).value,
                  kl_worst_case(losses, KL.protecting(f).rho).value):
        assert float(worst) >= floor - 1e-10 * (1 + abs(floor))


def test_a_smaller_radius_does_not_protect_the_fraction():
    # Just below the protecting radius some losses' worst f-fraction is out of reach: the
    # radius is the smallest that protects every subpopulation of mass f.
    losses = torch.tensor([1.0] + [0.0] * 9, dtype=F64)  # the worst 10% is the one 1.0
    assert float(chi2_worst_case(losses, Chi2.protecting(0.1).rho).value) == pytest.approx(1.0)
    assert float(chi2_worst_case(losses, 0.99 * Chi2.protecting(0.1).rho).value) < 1.0
    assert float(kl_worst_case(losses, 0.99 * KL.protecting(0.1).rho).value) < 1.0


@pytest.mark.parametrize(("f", "error"), [(0.0, ValueError), (1.5, ValueError),
                                          (-0.2, ValueError), (math.nan, ValueError),
                                          (True, TypeError), ("0.1", TypeError)])
def test_a_fraction_outside_0_1_is_refused_in_one_line(f, error):
    for family in (Chi2, KL):
        with pytest.raises(error, match="fraction f must"):
            family.protecting(f)
