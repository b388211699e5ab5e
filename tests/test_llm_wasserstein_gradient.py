"""The Wasserstein penalty's gradient by a finite difference of first-order gradients (no
double backward) against the exact double backward, through ``update_step``."""

from __future__ import annotations

import math

import pytest
import torch
from llm_helpers import F64, attention_ops, near_policy, random_pair_batch, tiny_model

from drosim.llm.components.methods import make_method
from drosim.llm.components.update import update_step

ETA, BETA = 1.0, 0.5


def _step_delta(name: str, w_gradient: str, dtype: torch.dtype = F64, w_p: float = 2.0,
                w_rho: float = 0.5, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The parameter change of one plain-SGD update_step (lr 1: minus the gradient)."""
    model = tiny_model(seed=0, dtype=dtype)
    batch = near_policy(random_pair_batch(6, seed=1, dtype=dtype), model)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    method = make_method(name, w_rho=w_rho, w_p=w_p)
    update_step(model, optimizer, batch, method, eta=ETA, beta=BETA, max_grad_norm=None,
                autocast_dtype=autocast_dtype, w_gradient=w_gradient)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("w_p", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("name", ["w-rebel", "wdpo"])
def test_finite_difference_moves_the_parameters_as_the_exact_gradient_in_float64(name, w_p):
    exact = _step_delta(name, "exact", w_p=w_p)
    approximate = _step_delta(name, "finite-difference", w_p=w_p)
    assert _relative_error(approximate, exact) <= 1e-4
    # ... and the penalty matters: without it the step is different.
    plain = _step_delta(name, "exact", w_rho=0.0)
    assert _relative_error(plain, exact) > 1e-3


def test_finite_difference_in_float32_is_close_to_the_exact_gradient():
    # Measured 4e-3: a forward difference's sqrt(eps) floor, times the loss's curvature.
    exact = _step_delta("w-rebel", "exact", dtype=torch.float32)
    approximate = _step_delta("w-rebel", "finite-difference", dtype=torch.float32)
    assert _relative_error(approximate, exact) <= 1e-2


@pytest.mark.parametrize("name", ["w-rebel", "wdpo"])
def test_finite_difference_under_bf16_autocast_is_within_bf16_rounding(name):
    # Reference: the exact gradient in float32. The exact gradient under bf16 autocast is
    # itself 0.06 (w-rebel) and 0.035 (wdpo) away (rounding); the finite difference
    # measured 0.12 and 0.16. A step eps of the parameters' dtype alone measured 1.5 and 0.9
    # here, and dropping the penalty 0.92 and 0.76.
    exact = _step_delta(name, "exact", dtype=torch.float32)
    bf16 = dict(dtype=torch.float32, autocast_dtype=torch.bfloat16)
    rounding = _relative_error(_step_delta(name, "exact", **bf16), exact)
    error = _relative_error(_step_delta(name, "finite-difference", **bf16), exact)
    penalty = _relative_error(_step_delta(name, "exact", dtype=torch.float32, w_rho=0.0), exact)
    assert error <= 5 * rounding
    assert error <= penalty / 4


def test_a_zero_radius_takes_the_plain_gradient():
    torch.testing.assert_close(_step_delta("w-rebel", "finite-difference", w_rho=0.0),
                               _step_delta("rebel", "exact"), rtol=1e-12, atol=1e-14)


def test_unknown_w_gradient_is_refused():
    with pytest.raises(ValueError, match="w_gradient must be one of"):
        _step_delta("w-rebel", "central")


def test_the_finite_difference_never_differentiates_twice(monkeypatch):
    # No create_graph anywhere: the fused attention kernels, checkpointing and sharding work.
    calls = []
    original = torch.autograd.grad

    def recording(*args, **kwargs):
        calls.append(kwargs.get("create_graph", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recording)
    _step_delta("w-rebel", "finite-difference")
    assert not any(calls)
    _step_delta("w-rebel", "exact")
    assert any(calls)


def test_the_finite_difference_runs_on_the_fused_attention_kernel():
    fused = attention_ops("finite-difference")
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in fused
    assert not any("math" in op for op in fused)
    # the exact double backward needs the math kernel, which it selects itself
    assert "aten::_scaled_dot_product_attention_math" in attention_ops("exact")


def _bf16_gradient(name: str, w_gradient: str, dtype: torch.dtype, w_rho: float, seed: int
                   ) -> torch.Tensor:
    """The flattened gradient update_step leaves (lr 0) for weights that are bf16 numbers,
    held in ``dtype``: float64 then computes the exact reference on the same weights."""
    model = tiny_model(seed=seed, dtype=torch.bfloat16).to(dtype)
    batch = near_policy(random_pair_batch(6, seed=1, dtype=F64), model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    update_step(model, optimizer, batch, make_method(name, w_rho=w_rho), eta=ETA, beta=BETA,
                max_grad_norm=None, w_gradient=w_gradient)
    return torch.cat([p.grad.to(F64).reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("w_rho", [0.05, 0.5])
@pytest.mark.parametrize("name", ["w-rebel", "wdpo"])
def test_finite_difference_with_bf16_parameters_keeps_the_penalty(name, w_rho):
    # Mean over 4 models of the error against the float64 exact gradient, relative to the
    # penalty's share of that gradient: measured 0.26-0.29; 0.79-0.97 with the previous
    # kappa rule (bf16's own eps, a perturbation 16x too large), where the step was about
    # as wrong as one without the penalty. The exact bf16 gradient's own error: 0.03-0.08,
    # the finite difference's 1.8-6.3x that.
    fd, rounding, penalty = [], [], []
    for seed in range(4):
        exact = _bf16_gradient(name, "exact", F64, w_rho, seed)
        fd.append(_relative_error(
            _bf16_gradient(name, "finite-difference", torch.bfloat16, w_rho, seed), exact))
        rounding.append(_relative_error(
            _bf16_gradient(name, "exact", torch.bfloat16, w_rho, seed), exact))
        penalty.append(_relative_error(_bf16_gradient(name, "exact", F64, 0.0, seed), exact))
    assert sum(fd) <= 0.4 * sum(penalty)
    assert sum(fd) <= 8 * sum(rounding)
