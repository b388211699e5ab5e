"""Derivatives: the Danskin gradient d value / d l = q* (autograd and central finite
differences), robust_mean's parameter gradients against per-sample gradients weighted by
hand, the Wasserstein penalty's closed forms and gradients, and gradcheck of the exact
linear Wasserstein worst case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import F64, central_difference, distinct_losses, losses_arrays, rhos, t64
from hypothesis import example, given, settings
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

SOLVERS = {"chi2": chi2_worst_case, "kl": kl_worst_case, "kl_tilted": kl_tilted}
solver_names = pytest.mark.parametrize("name", sorted(SOLVERS))


def _below_threshold(name: str, n: int, frac: float) -> float:
    """A radius strictly inside (0, threshold) for distinct losses (one argmax)."""
    if name == "chi2":
        return frac * (n - 1) / 2
    if name == "kl":
        return frac * math.log(n)
    return 10 ** (4 * frac - 2)  # a temperature in [1e-2, 1e2]


# ---------------------------------------------------------------- Danskin in the losses


@solver_names
@settings(max_examples=60)
@given(l=losses_arrays(max_n=300), rho=rhos(), batch=st.booleans())
@example(l=np.array([2.0, 0.0]), rho=5e-324, batch=False)  # kl_tilted: NaN weights and grad
def test_autograd_gradient_of_value_is_the_weights(name, device, l, rho, batch):
    lt = t64(l, device)
    if batch:
        lt = torch.stack([lt, lt.flip(-1), 2 * lt])
    lt.requires_grad_(True)
    res = SOLVERS[name](lt, rho)
    assert not res.weights.requires_grad and not res.dual.requires_grad
    res.value.sum().backward()
    torch.testing.assert_close(lt.grad, res.weights, rtol=0, atol=1e-15)


@solver_names
@settings(max_examples=30)
@given(l=distinct_losses(min_n=2, max_n=30), frac=st.floats(0.05, 0.95))
def test_finite_differences_of_value_match_the_weights(name, l, frac):
    """Central differences (step 1e-6) of the value, away from ties and from the threshold
    where the worst case jumps to the max, equal the worst-case weights."""
    rho = _below_threshold(name, l.size, frac)
    lt = t64(l)
    q = SOLVERS[name](lt, rho).weights
    fd = central_difference(lambda x: SOLVERS[name](x, rho).value, lt, 1e-6)
    torch.testing.assert_close(fd, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["chi2", "kl"])
def test_gradcheck_of_value_in_the_losses(name):
    g = torch.Generator().manual_seed(1)
    l = torch.rand(3, 7, generator=g, dtype=F64).requires_grad_(True)
    rho = torch.tensor([0.05, 0.3, 1.0], dtype=F64)
    assert torch.autograd.gradcheck(lambda x: SOLVERS[name](x, rho).value, (l,), eps=1e-6,
                                    atol=1e-6)


# ------------------------------------------------------------------- robust_mean training


def _model_and_losses(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1).double()
    x = torch.randn(n, 3, generator=g, dtype=F64)
    y = torch.randn(n, generator=g, dtype=F64) + x[:, 0].exp()
    return model, x, y


def _per_sample_grads(model, x, y) -> list[torch.Tensor]:
    """Flattened parameter gradient of each sample's squared error, by a loop."""
    grads = []
    for i in range(x.shape[0]):
        li = (model(x[i : i + 1]).squeeze(-1) - y[i : i + 1]).square().sum()
        gi = torch.autograd.grad(li, list(model.parameters()))
        grads.append(torch.cat([t.reshape(-1) for t in gi]))
    return grads


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize(
    "spec",
    [Chi2(0.0), Chi2(0.1), Chi2(2.0), Chi2(100.0), KL(0.0), KL(0.05), KL(1.0), KL(100.0),
     KLTemperature(0.0), KLTemperature(0.3), KLTemperature(5.0), None],
    ids=repr,
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_robust_mean_parameter_gradient_is_weighted_per_sample_gradients(spec, seed):
    model, x, y = _model_and_losses(seed, n=16)
    losses = (model(x).squeeze(-1) - y).square()
    out = robust_mean(losses, spec)
    out.backward()
    detached = losses.detach()
    if spec is None:
        q = torch.full_like(detached, 1 / detached.numel())
        assert float(out) == pytest.approx(float(detached.mean()), rel=1e-15)
    elif isinstance(spec, Chi2):
        q = chi2_worst_case(detached, spec.rho).weights
    elif isinstance(spec, KL):
        q = kl_worst_case(detached, spec.rho).weights
    else:
        q = kl_tilted(detached, spec.tau).weights
    expected = sum(qi * gi for qi, gi in zip(q, _per_sample_grads(model, x, y), strict=True))
    torch.testing.assert_close(_flat_grad(model), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, math.inf])
def test_robust_mean_wasserstein_is_mean_plus_penalty_with_its_gradient(p):
    """With grad_sq_norms built by create_graph=True, the parameter gradient is that of
    mean(l) + rho * (E ||grad_x l||^q)^(1/q), written out by hand here."""
    rho = 0.3
    model, x, y = _model_and_losses(0, n=12)
    x = x.clone().requires_grad_(True)
    losses = (model(x).squeeze(-1) - y).square()
    (gx,) = torch.autograd.grad(losses.sum(), x, create_graph=True)  # row i: grad_x_i l_i
    g = gx.square().sum(-1)
    out = robust_mean(losses, Wasserstein(rho, p), grad_sq_norms=g)
    norms = g.sqrt()
    if p == 1:
        by_hand = losses.mean() + rho * norms.max()
    elif math.isinf(p):
        by_hand = losses.mean() + rho * norms.mean()
    else:
        q = p / (p - 1)
        by_hand = losses.mean() + rho * norms.pow(q).mean().pow(1 / q)
    assert float(out) == pytest.approx(float(by_hand), rel=1e-12)
    params = list(model.parameters())
    got = torch.autograd.grad(out, params, retain_graph=True)
    want = torch.autograd.grad(by_hand, params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------- Wasserstein penalty


@settings(max_examples=60)
@given(g=hnp.arrays(np.float64, st.integers(1, 50), elements=st.floats(0.0, 1e4)),
       rho=rhos())
def test_wasserstein_penalty_closed_forms_for_p_one_two_inf(device, g, rho):
    gt = t64(g, device)
    norms = np.sqrt(g)
    # the penalty differentiates sqrt at max(x, finfo.tiny) (a finite gradient at 0), so a
    # subnormal norm reads as sqrt(tiny) ~ 1.5e-154: an absolute error that small is allowed
    floor = rho * math.sqrt(torch.finfo(F64).tiny) + 1e-300
    assert float(wasserstein_penalty(gt, rho, 2.0)) == pytest.approx(
        rho * math.sqrt(g.mean()), rel=1e-12, abs=floor)
    assert float(wasserstein_penalty(gt, rho, math.inf)) == pytest.approx(
        rho * norms.mean(), rel=1e-12, abs=floor)
    assert float(wasserstein_penalty(gt, rho, 1.0)) == pytest.approx(
        rho * norms.max(), rel=1e-12, abs=floor)
    q = 3.0 / 2.0  # p = 3
    assert float(wasserstein_penalty(gt, rho, 3.0)) == pytest.approx(
        rho * np.mean(norms**q) ** (1 / q), rel=1e-12, abs=floor)


def test_wasserstein_penalty_default_order_is_two_and_it_batches(device):
    g = torch.tensor([[1.0, 9.0, 4.0, 2.0], [0.0, 0.0, 0.0, 16.0]], dtype=F64, device=device)
    out = wasserstein_penalty(g, torch.tensor([0.5, 2.0], dtype=F64, device=device))
    torch.testing.assert_close(out.cpu(), torch.tensor([1.0, 4.0], dtype=F64))


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, math.inf])
def test_wasserstein_penalty_gradient_is_zero_when_all_grad_norms_vanish(device, p):
    g = torch.zeros(5, dtype=F64, device=device, requires_grad=True)
    out = wasserstein_penalty(g, 0.7, p)
    out.backward()
    assert float(out.detach()) == 0.0
    assert bool(torch.isfinite(g.grad).all())
    torch.testing.assert_close(g.grad, torch.zeros_like(g))


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0, math.inf])
def test_wasserstein_penalty_gradcheck_on_positive_grad_norms(p):
    g = torch.tensor([[0.3, 1.7, 2.2, 0.9], [4.0, 0.1, 0.5, 1.0]], dtype=F64,
                     requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: wasserstein_penalty(x, 0.4, p), (g,))


def test_wasserstein_penalty_p2_gradient_in_closed_form():
    g = torch.tensor([1.0, 9.0, 4.0, 2.0], dtype=F64, requires_grad=True)
    wasserstein_penalty(g, 0.5, 2.0).backward()
    expected = 0.5 / (2 * math.sqrt(4.0)) / 4  # rho / (2 sqrt(mean g)) / n
    torch.testing.assert_close(g.grad, torch.full_like(g, expected))


# ------------------------------------------------------------ exact linear Wasserstein


@settings(max_examples=30)
@given(r=hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(-5.0, 5.0)),
       w=hnp.arrays(np.float64, st.integers(1, 6), elements=st.floats(-3.0, 3.0)),
       rho=st.floats(0.0, 5.0))
def test_wasserstein_linear_sq_gradient_matches_finite_differences(r, w, rho):
    rt, wt = t64(r), t64(w)
    # the value is smooth where sqrt(E r^2) > 0 and ||w|| > 0
    if float(rt.square().mean()) < 1e-2 or float(wt.norm()) < 1e-2:
        rt, wt = rt + 1.0, wt + 1.0
    rt.requires_grad_(True)
    wt.requires_grad_(True)
    wasserstein_linear_sq_worst_case(rt, wt, rho).value.backward()
    fd_r = central_difference(lambda x: wasserstein_linear_sq_worst_case(x, wt, rho).value,
                              rt, 1e-6)
    fd_w = central_difference(lambda x: wasserstein_linear_sq_worst_case(rt, x, rho).value,
                              wt, 1e-6)
    scale = 1.0 + float(rt.abs().max()) + float(wt.abs().max())
    torch.testing.assert_close(rt.grad, fd_r, rtol=1e-6, atol=1e-6 * scale**2)
    torch.testing.assert_close(wt.grad, fd_w, rtol=1e-6, atol=1e-6 * scale**2)


def test_wasserstein_linear_sq_gradcheck_batched():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(2, 5, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(2, 3, generator=g, dtype=F64, requires_grad=True)
    rho = torch.tensor([0.2, 1.5], dtype=F64)
    assert torch.autograd.gradcheck(
        lambda a, b: wasserstein_linear_sq_worst_case(a, b, rho).value, (r, w))
