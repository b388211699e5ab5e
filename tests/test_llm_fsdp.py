"""FSDP2 sharding (drosim.llm.sharding) of update_step over two gloo processes.

Each rank builds the same float64 tiny GPT-2 and optimiser from one seed, takes its half of a
shared minibatch and runs ``update_step`` twice, once with the policy sharded by
``shard_policy`` and once unsharded (the hand-written all-reduce). Both must match one process
on the whole minibatch. Gradients are clipped at norm 1 (the unclipped norms are 2 to 50):
clipping is blind to a gradient's scale, so the reported global norm, which is not, is what
shows that the ranks' gradients are summed and not averaged. The optimiser is SGD with
momentum (a state to shard, and linear: AdamW's first step divides each gradient by its own
size, which turns rounding in near-zero gradients into 1e-3 relative differences).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from llm_helpers import near_policy, random_pair_batch, tiny_model
from torch.distributed.tensor import DTensor

from drosim.llm.batch import PairBatch
from drosim.llm.methods import METHODS, make_method
from drosim.llm.sharding import shard_policy, transformer_blocks
from drosim.llm.update import StepStats, update_step

WORLD = 2
RADII = dict(chi2_rho=0.1, kl_rho=0.1, kl_tau=0.5, w_rho=0.1)
ETA, BETA = 1.0, 1.0
STEPS = 2  # the second step sees the momentum and the once-updated weights
# Bound on the parameters' difference to one process, relative to the size of the update. The
# objective's arithmetic differs only in summation order (rounding, 1e-16); the finite
# difference of the Wasserstein methods cancels two gradients about 1/sqrt(eps) = 7e7 times
# larger than their difference, so its rounding reaches ~1e-9 relative in the gradient.
# Measured: at most 4e-14, and 3e-9 for w-rebel and wdpo.
TOLERANCE = {name: 1e-7 if name in ("w-rebel", "wdpo") else 1e-12 for name in METHODS}


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters as whole (gathered) tensors."""
    return {name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
            for name, value in model.state_dict().items()}


def _train(batch: PairBatch, name: str, *, sharded: bool = False
           ) -> tuple[dict[str, torch.Tensor], list[StepStats]]:
    """``STEPS`` update_steps of method ``name`` from the seeded tiny policy."""
    model = tiny_model(seed=0)
    if sharded:
        shard_policy(model, mixed_precision=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.01)
    method = make_method(name, **RADII)
    stats = [update_step(model, optimizer, batch, method, eta=ETA, beta=BETA, max_grad_norm=1.0,
                         w_gradient="finite-difference") for _ in range(STEPS)]
    return _full_state(model), stats


def _worker(rank: int, store: str, batch: PairBatch, out: str) -> None:
    """One rank: train on its half of ``batch``, sharded and not, for every method; save the
    results to ``out/rank{rank}.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    try:
        half = len(batch) // WORLD
        local = batch.select(slice(rank * half, (rank + 1) * half))
        results = {name: {"fsdp2": _train(local, name, sharded=True),
                          "none": _train(local, name)} for name in METHODS}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def shared_batch() -> PairBatch:
    """Eight pairs (one response empty), log-probabilities near the initial policy's."""
    return near_policy(random_pair_batch(8, seed=21, empty_rows=(5,)), tiny_model(seed=0),
                       seed=22)


@pytest.fixture(scope="module")
def two_ranks(shared_batch, tmp_path_factory) -> list[dict]:
    """What each of the two gloo ranks saved."""
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(tmp / "store"), shared_batch, str(tmp)), nprocs=WORLD,
             join=True)
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _relative_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
                         initial: dict[str, torch.Tensor]) -> float:
    """max over parameters of |ours - theirs| / max |theirs - initial| (the size of the
    update)."""
    moved = max(float((theirs[k] - initial[k]).abs().max()) for k in initial)
    return max(float((ours[k] - theirs[k]).abs().max()) for k in initial) / moved


@pytest.mark.parametrize("name", METHODS)
def test_sharded_ranks_match_one_process_and_the_unsharded_ranks(two_ranks, shared_batch,
                                                                 name):
    single_state, single_stats = _train(shared_batch, name)
    initial = tiny_model(seed=0).state_dict()
    assert max(float((single_state[k] - initial[k]).abs().max()) for k in initial) > 5e-4

    for rank in two_ranks:
        (sharded, sharded_stats), (plain, plain_stats) = (rank[name]["fsdp2"],
                                                          rank[name]["none"])
        assert sharded.keys() == single_state.keys()
        assert _relative_difference(sharded, single_state, initial) <= TOLERANCE[name]
        assert _relative_difference(sharded, plain, initial) <= TOLERANCE[name]
        for step in range(STEPS):
            single = single_stats[step]
            assert single.grad_norm > 1.0  # clipping was active
            for stats in (sharded_stats[step], plain_stats[step]):
                assert stats.objective == pytest.approx(single.objective, rel=TOLERANCE[name])
                assert stats.mean_loss == pytest.approx(single.mean_loss, rel=TOLERANCE[name])
                # summed, not averaged: an average would halve the norm
                assert stats.grad_norm == pytest.approx(single.grad_norm,
                                                        rel=TOLERANCE[name])
    # the two ranks hold the same gathered weights
    for key, value in two_ranks[0][name]["fsdp2"][0].items():
        assert torch.equal(two_ranks[1][name]["fsdp2"][0][key], value), key


def test_transformer_blocks_are_found_or_refused_clearly():
    model = tiny_model(seed=0)
    assert transformer_blocks(model) is model.transformer.h
    with pytest.raises(ValueError, match=r"no nn\.ModuleList of transformer blocks"):
        transformer_blocks(torch.nn.Linear(2, 2))
