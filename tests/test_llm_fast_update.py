"""The fast update step: pi_t recorded by the update's own forward, and torch.compile.

- :func:`record_sampling_logprobs` batches, casts and picks kernels as the first epoch's
  update steps do, so the REBEL policy term log pi_theta - log pi_t of the first minibatch
  is exactly 0 and its loss is exactly the squared reward gap;
- the trainer records pi_t that way at every iteration;
- an update step through ``maybe_compile(policy, True)`` moves the parameters as the eager
  step does.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess

import pytest
import torch
from llm_helpers import flat_param_grads, random_pair_batch, tiny_model, trainable

from drosim.llm.components.config import bundled_config_path, load_config
from drosim.llm.components.demo_world import build_demo_base
from drosim.llm.components.methods import Method, make_method
from drosim.llm.components.update import maybe_compile, record_sampling_logprobs, update_step
from drosim.llm.recipes.trainer import train

F32 = torch.float32
PAIRS, MINIBATCH = 8, 4


def _recorded_batch(model, method, w_gradient, seed=0):
    """A float32 pair batch whose sampling log-probs are recorded for the permutation
    ``order`` of the first epoch; returns the batch and ``order``."""
    batch = random_pair_batch(PAIRS, seed=seed, dtype=F32)
    order = torch.randperm(PAIRS, generator=torch.Generator().manual_seed(seed))
    recorded = record_sampling_logprobs(model, batch, order, MINIBATCH, method=method,
                                        w_gradient=w_gradient)
    return dataclasses.replace(batch, sampling_logprobs=recorded), order


_CUDA = torch.cuda.is_available()
# (device, autocast dtype, gradient checkpointing): the CPU in float32, and the GPU setting of
# a real run, where no_grad could pick other kernels than the update (it must not)
SETTINGS = [
    pytest.param(("cpu", None, False), id="cpu-float32"),
    pytest.param(("cpu", torch.bfloat16, True), id="cpu-bf16-checkpointing"),
    pytest.param(("cuda", torch.bfloat16, True), id="cuda-bf16-checkpointing",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not _CUDA, reason="no CUDA")]),
]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize(("name", "w_gradient"), [
    ("rebel", "finite-difference"),
    ("chi2-rebel", "finite-difference"),
    ("w-rebel", "finite-difference"),
    ("w-rebel", "exact"),
])
def test_the_first_minibatch_after_recording_has_a_zero_policy_term(monkeypatch, setting, name,
                                                                    w_gradient):
    device, autocast_dtype, checkpointing = setting
    model = tiny_model(seed=0, dtype=F32).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    method = make_method(name, chi2_rho=0.1, w_rho=0.1)
    batch = random_pair_batch(PAIRS, seed=0, dtype=F32).to(device)
    order = torch.randperm(PAIRS, generator=torch.Generator().manual_seed(0)).to(device)
    recorded = record_sampling_logprobs(model, batch, order, MINIBATCH, method=method,
                                        autocast_dtype=autocast_dtype, w_gradient=w_gradient)
    minibatch = dataclasses.replace(batch, sampling_logprobs=recorded).select(
        order[:MINIBATCH])

    seen = []
    losses = Method.losses

    def spy(self, logprobs, pairs, **kwargs):
        seen.append(logprobs.detach().clone())
        return losses(self, logprobs, pairs, **kwargs)

    monkeypatch.setattr(Method, "losses", spy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = update_step(model, optimizer, minibatch, method, eta=0.5, beta=0.1,
                        max_grad_norm=None, autocast_dtype=autocast_dtype,
                        w_gradient=w_gradient)
    # the update's (first) forward gives log pi_theta = log pi_t to the bit
    assert torch.equal(seen[0], minibatch.sampling_logprobs)
    gap = minibatch.rewards[:, 0] - minibatch.rewards[:, 1]
    assert stats.mean_loss == float(gap.square().sum() / MINIBATCH)


def test_recording_returns_the_batch_order_and_refuses_a_bad_permutation():
    model = tiny_model(seed=0, dtype=F32)
    method = make_method("rebel")
    batch, order = _recorded_batch(model, method, "finite-difference", seed=1)
    identity = record_sampling_logprobs(model, batch, torch.arange(PAIRS), PAIRS,
                                        method=method)
    # another batching of the same rows: the same values up to float32 rounding
    torch.testing.assert_close(batch.sampling_logprobs, identity, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="permutation"):
        record_sampling_logprobs(model, batch, torch.zeros(PAIRS, dtype=torch.long),
                                 MINIBATCH, method=method)
    with pytest.raises(ValueError, match="must divide"):
        record_sampling_logprobs(model, batch, order, 3, method=method)


def _c_compiler() -> bool:
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        return False
    return subprocess.run([shutil.which("gcc") or "cc", "--version"], capture_output=True,
                          check=False).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _c_compiler(), reason="torch.compile's inductor backend needs a C "
                    "compiler on CPU (gcc --version fails)")
@pytest.mark.parametrize(("name", "tolerance"), [("rebel", 1e-4), ("chi2-rebel", 1e-4)])
def test_a_compiled_update_step_equals_the_eager_one(name, tolerance):
    method = make_method(name, chi2_rho=0.1)
    results = []
    for compiled in (False, True):
        model = tiny_model(seed=0, dtype=F32)
        batch, order = _recorded_batch(model, method, "finite-difference", seed=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        stats = update_step(maybe_compile(model, compiled), optimizer,
                            batch.select(order[:MINIBATCH]), method, eta=0.5, beta=0.1,
                            max_grad_norm=None)
        results.append((stats, flat_param_grads(trainable(model))))
    (eager, eager_grad), (fast, fast_grad) = results
    assert fast.mean_loss == pytest.approx(eager.mean_loss, rel=1e-5)
    # fused kernels round differently: compare the whole gradient, not each entry
    assert float((fast_grad - eager_grad).norm() / eager_grad.norm()) < tolerance


def test_the_trainer_starts_every_iteration_at_a_zero_policy_term(monkeypatch, tmp_path):
    """In-process run of the smoke configuration: pi_t comes from the trainer's own update
    forward, so the first step of each iteration sees log pi_theta = log pi_t exactly."""
    base = build_demo_base(tmp_path / "base", pretrain_steps=5, corpus_size=100)
    config = load_config(bundled_config_path("smoke"), [
        f"model={base}", f"out_dir={tmp_path / 'run'}", "method=rebel", "iterations=2",
        "epochs=2", "eval_every=10", "checkpoint_every=10"])
    seen = []
    losses = Method.losses

    def spy(self, logprobs, pairs, **kwargs):
        seen.append(torch.equal(logprobs, pairs.sampling_logprobs))
        return losses(self, logprobs, pairs, **kwargs)

    monkeypatch.setattr(Method, "losses", spy)
    train(config)
    steps = config.epochs * config.pairs_per_iteration // config.minibatch_size
    # exactly 0 at each iteration's first step; the later steps see the policy move
    assert seen == ([True] + [False] * (steps - 1)) * config.iterations


def test_a_compiled_policy_refuses_the_wasserstein_methods():
    # Their embedding hook is registered per step, after compilation: a compiled graph would
    # not call it (found by CI: AttributeError deep inside the finite difference).
    model = tiny_model(seed=0, dtype=F32)
    method = make_method("w-rebel", w_rho=0.1)
    batch, order = _recorded_batch(model, method, "finite-difference", seed=2)
    with pytest.raises(ValueError, match="compile'd policy cannot run w-rebel"):
        update_step(torch.compile(model), torch.optim.SGD(model.parameters(), lr=1e-2),
                    batch.select(order[:MINIBATCH]), method, eta=0.5, beta=0.1,
                    max_grad_norm=None)
    with pytest.raises(ValueError, match="compile=true cannot run w-rebel"):
        load_config(bundled_config_path("smoke"), ["compile=true", "method=w-rebel"])
