"""The transformer updates on CUDA: the same numbers as on the CPU, and the GPU options
(bf16 autocast, gradient checkpointing) with every aggregation. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
from llm_helpers import attention_ops, near_policy, random_pair_batch, tiny_model

from drosim.llm.methods import make_method
from drosim.llm.update import update_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]

METHODS = ("rebel", "chi2-rebel", "kl-rebel", "kltemp-rebel", "w-rebel", "dpo", "wdpo")


def one_step(model, batch, name: str, **kwargs):
    method = make_method(name, chi2_rho=0.1, kl_rho=0.1, kl_tau=0.5, w_rho=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = update_step(model, optimizer, batch, method, eta=1.0, beta=0.5,
                        max_grad_norm=1.0, **kwargs)
    return stats, {k: v.detach().cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("name", "w_gradient", "rtol"), [
    *((name, "finite-difference", 1e-8) for name in METHODS if not name.startswith("w")),
    ("w-rebel", "exact", 1e-8), ("wdpo", "exact", 1e-8),
    # a forward difference divides two gradients' float64 rounding by sqrt(eps) ~ 1e-8
    ("w-rebel", "finite-difference", 1e-6), ("wdpo", "finite-difference", 1e-6)])
def test_cuda_update_equals_cpu_update(name, w_gradient, rtol):
    model = tiny_model()
    batch = near_policy(random_pair_batch(8, seed=3), model)
    cpu_stats, cpu_state = one_step(copy.deepcopy(model), batch, name, w_gradient=w_gradient)
    cuda_stats, cuda_state = one_step(copy.deepcopy(model).cuda(), batch.to("cuda"), name,
                                      w_gradient=w_gradient)
    assert cuda_stats.objective == pytest.approx(cpu_stats.objective, rel=1e-9)
    for key in cpu_state:
        torch.testing.assert_close(cuda_state[key], cpu_state[key], rtol=rtol, atol=1e-10)


@pytest.mark.parametrize("name", METHODS)
def test_bf16_autocast_with_gradient_checkpointing_trains(name):
    batch = near_policy(random_pair_batch(8, seed=4), tiny_model())
    model = tiny_model(dtype=torch.float32).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats, after = one_step(model, batch.to("cuda"), name, autocast_dtype=torch.bfloat16)
    assert all(map(torch.isfinite, (torch.tensor(stats.objective), torch.tensor(stats.grad_norm))))
    assert stats.grad_norm > 0
    assert any(not torch.equal(before[k].cpu(), after[k]) for k in before)


def test_the_finite_difference_runs_on_a_fused_attention_kernel_on_cuda():
    fused = attention_ops("finite-difference", device="cuda")
    assert any("efficient_attention" in op or "flash_attention" in op for op in fused), fused
    assert not any("math" in op for op in fused), fused
