"""Data-parallel update_step over two gloo processes equals one process on the whole batch.

Each rank builds the same float64 policy and AdamW from one seed, takes its half of a shared
minibatch and runs ``update_step``; the robust objective is solved on the gathered losses and
the surrogate gradients are summed over ranks, so the parameters, the objective and the
global gradient norm must match a single process that sees the whole minibatch. Gradients are
clipped at norm 1 (the unclipped norms are 2 to 50), so the clipping must use the global norm.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from llm_helpers import (
    run_on_two_ranks,
    shared_pair_batch,
    tiny_model,
)

from drosim.llm.components.batch import PairBatch
from drosim.llm.components.methods import make_method
from drosim.llm.components.runtime import gather_detached
from drosim.llm.components.update import StepStats, update_step

METHOD_NAMES = ("rebel", "chi2-rebel", "kl-rebel", "w-rebel", "dpo")
RADII = dict(chi2_rho=0.1, kl_rho=0.1, kl_tau=0.5, w_rho=0.1)
ETA, BETA = 1.0, 1.0
STEPS = 2  # the second step sees AdamW's moments and the once-updated weights


def _train(batch: PairBatch, name: str) -> tuple[dict[str, torch.Tensor], list[StepStats]]:
    """``STEPS`` update_steps of method ``name`` from the seeded tiny policy and AdamW."""
    model = tiny_model(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    method = make_method(name, **RADII)
    # The exact Wasserstein gradient: the finite difference's cancellation (a factor of about
    # 1e8) turns rounding-level differences between 1 and 2 ranks into 1e-8 relative ones,
    # which AdamW's first step can amplify for near-zero gradients.
    stats = [update_step(model, optimizer, batch, method, eta=ETA, beta=BETA, max_grad_norm=1.0,
                         w_gradient="exact") for _ in range(STEPS)]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, stats


def _on_rank(local: PairBatch) -> dict:
    """One rank's results on its half of the batch for every method, and gather_detached
    probed."""
    results = {name: _train(local, name) for name in METHOD_NAMES}
    gathered = gather_detached(torch.arange(3, dtype=torch.float64) + 10 * dist.get_rank())
    try:
        gather_detached(torch.zeros(2 + dist.get_rank()))
        unequal_error = None
    except ValueError as error:
        unequal_error = str(error)
    return {"results": results, "gathered": gathered, "unequal_error": unequal_error}


@pytest.fixture(scope="module")
def shared_batch() -> PairBatch:
    return shared_pair_batch()


@pytest.fixture(scope="module")
def two_ranks(shared_batch, tmp_path_factory) -> list[dict]:
    """What each of the two gloo ranks saved."""
    return run_on_two_ranks(_on_rank, shared_batch, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_two_ranks_match_one_process_on_the_whole_batch(two_ranks, shared_batch, name):
    single_state, single_stats = _train(shared_batch, name)
    (state0, stats0), (state1, stats1) = (ranks["results"][name] for ranks in two_ranks)
    initial = tiny_model(seed=0).state_dict()

    for key, value in single_state.items():
        torch.testing.assert_close(state0[key], value, rtol=0, atol=1e-10, msg=key)
        assert torch.equal(state1[key], state0[key]), key  # the ranks stay in lockstep
    moved = max(float((single_state[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 5e-4  # the steps did something the comparison can see

    for step in range(STEPS):
        single, rank0, rank1 = single_stats[step], stats0[step], stats1[step]
        assert single.grad_norm > 1.0  # clipping was active
        for stats in (rank0, rank1):
            assert stats.objective == pytest.approx(single.objective, rel=1e-12, abs=1e-14)
            assert stats.mean_loss == pytest.approx(single.mean_loss, rel=1e-12, abs=1e-14)
            assert stats.grad_norm == pytest.approx(single.grad_norm, rel=1e-10)
        # each rank reports its own samples' largest weight; the larger is the global one
        assert max(rank0.max_weight, rank1.max_weight) == pytest.approx(single.max_weight,
                                                                         rel=1e-10)


def test_gather_detached_concatenates_in_rank_order_and_rejects_unequal_sizes(two_ranks):
    expected = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 12.0], dtype=torch.float64)
    for rank, saved in enumerate(two_ranks):
        full, own = saved["gathered"]
        assert torch.equal(full, expected)
        assert own == slice(3 * rank, 3 * rank + 3)
        assert saved["unequal_error"] is not None
        assert "same number of samples" in saved["unequal_error"]
        assert "[2, 3]" in saved["unequal_error"]
