"""Certificates and structure of the worst cases: simplex weights inside the ball, value
between mean and max, the rho = 0 and large-rho limits, monotonicity in rho, and the
equivariances (permutation, translation, scaling, batching, per-row radii, float32)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import (
    F64,
    RHO_GRID,
    chi2_divergence,
    kl_divergence,
    losses_arrays,
    rhos,
    spread,
    t64,
    tol,
)
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from drosim.dro import chi2_worst_case, kl_tilted, kl_worst_case

SOLVERS = {"chi2": (chi2_worst_case, chi2_divergence), "kl": (kl_worst_case, kl_divergence)}
solver_names = pytest.mark.parametrize("name", sorted(SOLVERS))


def _threshold(name: str, l: np.ndarray) -> float:
    """The smallest radius at which the worst case is the max."""
    n, ties = l.size, int((l == l.max()).sum())
    return (n / ties - 1) / 2 if name == "chi2" else math.log(n / ties)


# ----------------------------------------------------------------------- certificates


@solver_names
@settings(max_examples=100)
@given(l=losses_arrays(max_n=500), rho=rhos())
@example(l=np.array([0.0] * 5 + [1.0] * 20), rho=1e-105)  # chi2: NaN weights (eta* = -inf)
@example(l=np.array([0.0, 1.0]), rho=1e-181)  # KL: E_q[l] != value
def test_weights_are_a_feasible_worst_case_attaining_the_value(name, device, l, rho):
    solve, divergence = SOLVERS[name]
    lt = t64(l, device)
    res = solve(lt, rho)
    q = res.weights
    assert q.shape == lt.shape and res.value.shape == () and res.dual.shape == ()
    assert bool((q >= 0).all())
    assert abs(float(q.sum()) - 1) <= 1e-12
    assert float(divergence(q)) <= rho * (1 + 1e-9) + 1e-12
    assert abs(float((q * lt).sum()) - float(res.value)) <= tol(l, 1e-9)


@solver_names
@settings(max_examples=100)
@given(l=losses_arrays(max_n=500), rho=rhos())
def test_value_lies_between_mean_and_max(name, device, l, rho):
    solve, _ = SOLVERS[name]
    lt = t64(l, device)
    value = float(solve(lt, rho).value)
    slack = tol(l, 1e-12)
    assert float(lt.mean()) - slack <= value <= float(lt.max()) + slack


@settings(max_examples=100)
@given(l=losses_arrays(max_n=500), tau=st.one_of(st.just(0.0), st.floats(1e-6, 1e6)))
def test_kl_tilted_weights_in_simplex_and_value_between_mean_and_max(device, l, tau):
    lt = t64(l, device)
    res = kl_tilted(lt, tau)
    assert bool((res.weights >= 0).all()) and abs(float(res.weights.sum()) - 1) <= 1e-12
    slack = tol(l, 1e-12)
    assert float(lt.mean()) - slack <= float(res.value) <= float(lt.max()) + slack
    assert float(res.dual) == tau


@solver_names
@settings(max_examples=60)
@given(l=losses_arrays(max_n=500))
def test_zero_radius_gives_the_mean_and_uniform_weights(name, device, l):
    solve, _ = SOLVERS[name]
    lt = t64(l, device)
    res = solve(lt, 0.0)
    assert abs(float(res.value) - float(lt.mean())) <= tol(l, 1e-12)
    torch.testing.assert_close(res.weights, torch.full_like(lt, 1 / l.size), rtol=0, atol=1e-15)


@solver_names
@settings(max_examples=60)
@given(l=losses_arrays(max_n=500), excess=st.sampled_from([0.0, 1e-9, 1e-3, 1.0, 1e3]))
def test_radius_past_the_threshold_gives_the_max_on_the_argmax(name, device, l, excess):
    """chi2: rho >= (n / #argmax - 1) / 2; KL: rho >= log(n / #argmax), with tau* = 0."""
    solve, _ = SOLVERS[name]
    lt = t64(l, device)
    threshold = _threshold(name, l)
    res = solve(lt, threshold + excess)
    on_argmax = torch.as_tensor(l == l.max(), device=device)
    expected = on_argmax.to(F64) / on_argmax.sum()
    if excess == 0.0:  # exactly on the threshold, up to the rounding of the threshold itself
        assert abs(float(res.value) - float(l.max())) <= tol(l, 1e-9)
        torch.testing.assert_close(res.weights, expected, rtol=0, atol=1e-6)
        return
    assert float(res.value) == float(l.max())
    torch.testing.assert_close(res.weights, expected, rtol=0, atol=1e-15)
    if name == "kl":
        assert float(res.dual) == 0.0
    else:
        assert float(res.dual) == float(l.max())  # eta* = max: g(max) = max


@solver_names
@settings(max_examples=60)
@given(l=losses_arrays(min_n=2, max_n=500), frac=st.floats(0.01, 0.99))
def test_radius_below_the_threshold_does_not_reach_the_max(name, l, frac):
    """Below the threshold the worst case still puts mass off the argmax (checked where the
    runner-up is clearly below the max: a near-tie is a tie to rounding)."""
    assume(spread(l) > 0)
    below = l[l < l.max()]
    assume(l.max() - below.max() >= 1e-6 * spread(l))
    solve, _ = SOLVERS[name]
    res = solve(t64(l), frac * _threshold(name, l))
    assert float(res.weights[torch.as_tensor(l < l.max())].sum()) > 0
    assert float(res.value) < float(l.max())


@solver_names
@settings(max_examples=60)
@given(l=losses_arrays(max_n=500))
def test_value_is_monotone_non_decreasing_in_rho(name, device, l):
    solve, _ = SOLVERS[name]
    grid = sorted({*RHO_GRID, *np.geomspace(1e-6, 50, 40).tolist()})
    lt = t64(l, device).expand(len(grid), -1)
    values = solve(lt, torch.tensor(grid, dtype=F64, device=device)).value
    steps = (values[1:] - values[:-1]).cpu()
    assert float(steps.min()) >= -tol(l, 1e-12), steps


@settings(max_examples=60)
@given(l=losses_arrays(max_n=500))
@example(l=np.array([-1.2341e-4] + [1.2341e-4] * 8))  # tau >> spread: +1.5e-12 steps
def test_kl_tilted_value_is_monotone_non_increasing_in_tau(device, l):
    grid = [0.0, *np.geomspace(1e-4, 1e4, 40).tolist()]
    lt = t64(l, device).expand(len(grid), -1)
    values = kl_tilted(lt, torch.tensor(grid, dtype=F64, device=device)).value
    steps = (values[1:] - values[:-1]).cpu()
    assert float(steps.max()) <= tol(l, 1e-12), steps


def test_kl_tilted_zero_temperature_is_the_max_and_large_temperature_the_mean(device):
    l = torch.tensor([0.0, 3.0, 1.0, 3.0, -2.0], dtype=F64, device=device)
    cold = kl_tilted(l, 0.0)
    assert float(cold.value) == 3.0
    torch.testing.assert_close(cold.weights.cpu(), torch.tensor([0, 0.5, 0, 0.5, 0], dtype=F64))
    hot = kl_tilted(l, 1e8)
    assert float(hot.value) == pytest.approx(float(l.mean()), abs=1e-7)


def test_kl_tilted_infinite_temperature_is_the_mean(device):
    """tau = inf passes validation (non-negative, not NaN); its limit is the mean."""
    l = torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=F64, device=device)
    res = kl_tilted(l, math.inf)
    assert float(res.value) == pytest.approx(2.0, abs=1e-12)
    torch.testing.assert_close(res.weights, torch.full_like(l, 0.25))


@solver_names
def test_infinite_radius_gives_the_max(name, device):
    solve, _ = SOLVERS[name]
    l = torch.tensor([0.0, 1.0, 5.0, 2.0], dtype=F64, device=device)
    res = solve(l, math.inf)
    assert float(res.value) == 5.0
    torch.testing.assert_close(res.weights.cpu(), torch.tensor([0, 0, 1.0, 0], dtype=F64))


@pytest.mark.parametrize("rho", [1e-300, 1e-30, 1e-20, 1e-18, 1e-17, 1e-14, 1e-12])
@solver_names
def test_tiny_radius_gives_mean_plus_sqrt_two_rho_variance(name, rho):
    """As rho -> 0 both balls give mean + sqrt(2 rho Var_n) + O(rho); here that is the mean
    to far below 1e-9 of the spread, and never outside [mean, max]."""
    solve, _ = SOLVERS[name]
    g = torch.Generator().manual_seed(0)
    for l in (torch.tensor([0.0, 1.0], dtype=F64), torch.randn(100, generator=g, dtype=F64)):
        expected = float(l.mean() + torch.sqrt(2 * rho * l.var(unbiased=False)))
        value = float(solve(l, rho).value)
        assert abs(value - expected) <= 1e-9 * spread(l), (name, rho, value, expected)


# ----------------------------------------------------------------------- equivariances


def _dyadic_losses(max_n: int = 100):
    """Multiples of 1/64 in [-1024, 1024]: shifts by integers and scalings by powers of two
    are exact on them, so the solver sees bit-identical normalised inputs."""
    return hnp.arrays(np.float64, st.integers(1, max_n),
                      elements=st.integers(-65536, 65536).map(lambda k: k / 64))


@solver_names
@settings(max_examples=60)
@given(l=losses_arrays(max_n=200), rho=rhos(), data=st.data())
def test_permuting_losses_permutes_weights_and_keeps_value(name, device, l, rho, data):
    solve, _ = SOLVERS[name]
    perm = torch.as_tensor(data.draw(st.permutations(range(l.size))), device=device)
    lt = t64(l, device)
    res, res_p = solve(lt, rho), solve(lt[perm], rho)
    assert abs(float(res_p.value) - float(res.value)) <= tol(l, 1e-12)
    torch.testing.assert_close(res_p.weights, res.weights[perm], rtol=0, atol=1e-12)


@solver_names
@settings(max_examples=60)
@given(l=_dyadic_losses(), rho=rhos(), shift=st.integers(-4096, 4096))
def test_translating_losses_translates_value_and_keeps_weights(name, device, l, rho, shift):
    solve, _ = SOLVERS[name]
    lt = t64(l, device)
    res, res_s = solve(lt, rho), solve(lt + shift, rho)
    assert abs(float(res_s.value) - (float(res.value) + shift)) <= tol(l, 1e-12) + 1e-12 * abs(
        shift)
    torch.testing.assert_close(res_s.weights, res.weights, rtol=0, atol=1e-12)


@solver_names
@settings(max_examples=60)
@given(l=losses_arrays(max_n=500), rho=rhos(), shift=st.floats(-1e3, 1e3))
def test_translating_arbitrary_losses_translates_value(name, l, rho, shift):
    solve, _ = SOLVERS[name]
    lt = t64(l)
    value, value_s = float(solve(lt, rho).value), float(solve(lt + shift, rho).value)
    rounding = 1e-15 * (abs(shift) + float(np.abs(l).max()))  # of l + shift itself
    assert abs(value_s - (value + shift)) <= tol(l, 1e-9) + 4 * rounding


@solver_names
@settings(max_examples=60)
@given(l=losses_arrays(max_n=500), rho=rhos(), a=st.floats(1e-3, 1e3))
def test_scaling_losses_scales_value(name, device, l, rho, a):
    solve, _ = SOLVERS[name]
    lt = t64(l, device)
    value, value_a = float(solve(lt, rho).value), float(solve(a * lt, rho).value)
    assert abs(value_a - a * value) <= a * tol(l, 1e-9)


@solver_names
@settings(max_examples=40)
@given(l=_dyadic_losses(), rho=rhos(), k=st.integers(-20, 20))
@example(l=np.array([0.0] * 5 + [1.0] * 20), rho=1e-105, k=0)  # chi2: NaN weights
def test_scaling_by_powers_of_two_keeps_weights(name, device, l, rho, k):
    solve, _ = SOLVERS[name]
    lt = t64(l, device)
    res, res_a = solve(lt, rho), solve(lt * 2.0**k, rho)
    assert float(res_a.value) == pytest.approx(float(res.value) * 2.0**k, rel=1e-12, abs=1e-300)
    torch.testing.assert_close(res_a.weights, res.weights, rtol=0, atol=1e-12)


def _batch(draw, shape, n):
    kind_losses = losses_arrays(min_n=n, max_n=n)
    rows = [draw(kind_losses) for _ in range(math.prod(shape))]
    return np.stack(rows).reshape(*shape, n)


@solver_names
@settings(max_examples=30)
@given(data=st.data(), n=st.integers(1, 40), rho=rhos(),
       shape=st.sampled_from([(1,), (3,), (2, 3), (1, 4), (3, 1)]))
def test_batched_call_equals_row_by_row_calls(name, device, data, n, rho, shape):
    solve, _ = SOLVERS[name]
    l = _batch(data.draw, shape, n)
    res = solve(t64(l, device), rho)
    assert res.value.shape == shape and res.weights.shape == (*shape, n)
    for idx in np.ndindex(*shape):
        one = solve(t64(l[idx], device), rho)
        assert abs(float(res.value[idx]) - float(one.value)) <= tol(l[idx], 1e-9)
        torch.testing.assert_close(res.weights[idx], one.weights, rtol=0, atol=1e-9)
        # the dual is ill-conditioned for small rho (KL: d tau / tau ~ eps / rho), the value not
        d_batch, d_one = float(res.dual[idx]), float(one.dual)
        rel = 1e-9 + (1e-14 / rho if rho > 0 else 0.0)
        assert d_batch == pytest.approx(d_one, rel=rel, abs=1e-12 * max(1, spread(l[idx])))


@solver_names
@settings(max_examples=30)
@given(data=st.data(), n=st.integers(1, 20))
def test_per_row_radii_equal_per_row_calls(name, device, data, n):
    """rho of shape (B1, B2), (B1, 1) and (B2,) broadcast against a (B1, B2) batch."""
    solve, _ = SOLVERS[name]
    l = _batch(data.draw, (2, 3), n)
    lt = t64(l, device)
    for rho_shape in [(2, 3), (2, 1), (3,)]:
        rho = np.asarray(data.draw(hnp.arrays(np.float64, rho_shape, elements=rhos())))
        res = solve(lt, torch.as_tensor(rho, device=device))
        full = np.broadcast_to(rho, (2, 3))
        for idx in np.ndindex(2, 3):
            one = solve(t64(l[idx], device), float(full[idx]))
            assert abs(float(res.value[idx]) - float(one.value)) <= tol(l[idx], 1e-9)
            torch.testing.assert_close(res.weights[idx], one.weights, rtol=0, atol=1e-9)


@solver_names
@settings(max_examples=40)
@given(l=losses_arrays(max_n=500), rho=rhos())
@example(l=np.array([0.0] + [1.0] * 7), rho=1e-8)  # KL: 2.2e-4 of the spread off
def test_float32_is_close_to_float64(name, device, l, rho):
    solve, _ = SOLVERS[name]
    l32 = torch.as_tensor(l, dtype=torch.float32, device=device)
    # compare on the float32-rounded losses, so only the solver's precision is measured
    l64 = l32.double()
    r32, r64 = solve(l32, rho), solve(l64, rho)
    assert r32.value.dtype == torch.float32 and r32.weights.dtype == torch.float32
    assert abs(float(r32.value) - float(r64.value)) <= tol(l64, 1e-4, floor=1e-6)


@settings(max_examples=40)
@given(l=losses_arrays(max_n=500), tau=st.floats(1e-3, 1e3))
@example(l=np.array([0.0] + [1.0] * 83), tau=464.0)  # 1.7e-4 of the spread off
def test_kl_tilted_float32_is_close_to_float64_and_batches(device, l, tau):
    l32 = torch.as_tensor(l, dtype=torch.float32, device=device)
    r32, r64 = kl_tilted(l32, tau), kl_tilted(l32.double(), tau)
    assert abs(float(r32.value) - float(r64.value)) <= tol(l32.double(), 1e-4, floor=1e-6)
    taus = torch.tensor([tau, 0.0, tau], dtype=F64, device=device)
    batch = kl_tilted(l32.double().expand(3, -1), taus)
    assert float(batch.value[0]) == pytest.approx(float(r64.value), rel=1e-12, abs=1e-12)
    assert float(batch.value[1]) == float(l32.max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("solve", [chi2_worst_case, kl_worst_case, kl_tilted],
                         ids=["chi2", "kl", "kl_tilted"])
def test_cuda_matches_cpu(solve, dtype):
    g = torch.Generator().manual_seed(5)
    l = torch.randn(6, 1000, generator=g, dtype=F64).exp().to(dtype)
    l[1, :500] = l[1, 500:]  # ties
    l[2] = 3.0  # a constant row
    rho = torch.tensor([0.0, 1e-4, 0.1, 1.0, 5.0, 1e3], dtype=dtype)
    cpu, gpu = solve(l, rho), solve(l.cuda(), rho.cuda())
    assert gpu.value.device.type == "cuda" and gpu.weights.device.type == "cuda"
    rel = 1e-10 if dtype == F64 else 1e-4
    spreads = (l.amax(-1) - l.amin(-1)).double()
    assert bool(((gpu.value.cpu().double() - cpu.value.double()).abs() <= rel * spreads
                 + 1e-12).all())
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=0, atol=rel)
