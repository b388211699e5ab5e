"""The transformer updates on CUDA: the same numbers as on the CPU, and the GPU options
(bf16 autocast, gradient checkpointing) with every aggregation. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
from llm_helpers import attention_ops, near_policy, random_pair_batch, tiny_model
from torch.distributed.tensor import DTensor

from drosim.llm.components.methods import make_method
from drosim.llm.components.update import update_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]

METHODS = ("rebel", "chi2-rebel", "kl-rebel", "kltemp-rebel", "w-rebel", "dpo", "wdpo")


def one_step(model, batch, name: str, **kwargs):
    method = make_method(name, chi2_rho=0.1, kl_rho=0.1, kl_tau=0.5, w_rho=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = update_step(model, optimizer, batch, method, eta=1.0, beta=0.5,
                        max_grad_norm=1.0, **kwargs)
    # a sharded model's state holds DTensors: gathered whole
    return stats, {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
                   for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("name", "w_gradient"), [
    *((name, "finite-difference") for name in METHODS if not name.startswith("w")),
    ("w-rebel", "exact"), ("wdpo", "exact")])
def test_cuda_update_equals_cpu_update(name, w_gradient):
    model = tiny_model()
    batch = near_policy(random_pair_batch(8, seed=3), model)
    cpu_stats, cpu_state = one_step(copy.deepcopy(model), batch, name, w_gradient=w_gradient)
    cuda_stats, cuda_state = one_step(copy.deepcopy(model).cuda(), batch.to("cuda"), name,
                                      w_gradient=w_gradient)
    assert cuda_stats.objective == pytest.approx(cpu_stats.objective, rel=1e-9)
    for key in cpu_state:
        torch.testing.assert_close(cuda_state[key], cpu_state[key], rtol=1e-8, atol=1e-10)


def sgd_step(model, batch, name: str) -> torch.Tensor:
    """Minus the finite-difference gradient of one update_step (SGD, lr 1), flattened."""
    method = make_method(name, w_rho=0.1)
    before = torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
    update_step(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, method, eta=1.0,
                beta=0.5, max_grad_norm=None, w_gradient="finite-difference")
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()]) - before


@pytest.mark.parametrize("name", ["w-rebel", "wdpo"])
def test_cuda_finite_difference_gradient_equals_the_cpu_one(name):
    # Compared as gradients, not after AdamW: Adam's m / sqrt(v) turns a near-zero gradient's
    # last digits into a step of size lr. A forward difference divides the two gradients'
    # float64 rounding (1e-16) by its relative step (sqrt(eps) ~ 1.5e-8): about 1e-8 here.
    model = tiny_model()
    batch = near_policy(random_pair_batch(8, seed=3), model)
    cpu = sgd_step(copy.deepcopy(model), batch, name)
    cuda = sgd_step(copy.deepcopy(model).cuda(), batch.to("cuda"), name)
    assert float((cuda - cpu).norm() / cpu.norm()) <= 1e-6


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


def _sharded_worker(rank: int, store: str, out: str) -> None:
    """One NCCL rank: every method's update, sharded (float64, and float32 weights with bf16
    mixed precision) and not; the results go to ``out``."""
    import torch.distributed as dist

    from drosim.llm.components.sharding import shard_policy

    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=1)
    torch.cuda.set_device(0)
    try:
        results = {}
        for name in METHODS:
            batch = near_policy(random_pair_batch(8, seed=3), tiny_model()).to("cuda")
            for mixed_precision in (None, torch.bfloat16):
                for sharded in (False, True):
                    dtype = torch.float64 if mixed_precision is None else torch.float32
                    model = tiny_model(dtype=dtype).cuda()
                    if sharded:
                        shard_policy(model, mixed_precision=mixed_precision)
                    stats, state = one_step(model, batch, name, autocast_dtype=mixed_precision,
                                            w_gradient="finite-difference")
                    results[name, mixed_precision, sharded] = stats, state
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_on_cuda(tmp_path_factory) -> dict:
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("fsdp-cuda")
    mp.spawn(_sharded_worker, args=(str(tmp / "store"), str(tmp / "results.pt")), nprocs=1,
             join=True)
    return torch.load(tmp / "results.pt", weights_only=False)


@pytest.mark.parametrize("name", METHODS)
def test_fsdp2_on_one_cuda_rank_equals_the_unsharded_update(sharded_on_cuda, name):
    plain, sharded = (sharded_on_cuda[name, None, s] for s in (False, True))
    assert sharded[0].grad_norm == pytest.approx(plain[0].grad_norm, rel=1e-6)
    for key in plain[1]:
        torch.testing.assert_close(sharded[1][key], plain[1][key], rtol=1e-6, atol=1e-10)
    # bf16 compute over float32 master weights: it trains, with finite numbers
    stats, state = sharded_on_cuda[name, torch.bfloat16, True]
    assert torch.isfinite(torch.tensor([stats.objective, stats.grad_norm])).all()
    assert all(v.dtype == torch.float32 for v in state.values())
