"""LoRA (``lora_rank``) in the online trainer.

- the DPO-type reference is the policy with its adapter disabled: the initial policy's
  log-probabilities, bit for bit, before and after updates (adapter dropout or not); only
  the adapters train; the merged copy computes the adapted policy and leaves it alone;
- the Wasserstein methods differentiate through the frozen embedding table's output: their
  penalty moves the adapters, the finite difference as the exact double backward does;
- ``train()`` with DPO and W-REBEL on the tiny Llama stand-in and a classifier reward: no
  reference copy, the optimiser holds the adapters alone, the base weights stay put, a
  resumed run ends bitwise where an uninterrupted one does, and ``final/`` is a plain
  (merged) model that ``from_pretrained`` and ``train`` accept;
- the LoRA keys' errors; a torch.compile'd LoRA update equals the eager one (slow).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from llm_helpers import near_policy, random_pair_batch, tiny_model
from llm_stand_ins import tiny_classifier_folder, tiny_llama_folder, write_helpsteer
from safetensors.torch import load_file

from drosim.llm.components.config import load_config
from drosim.llm.components.logprobs import sequence_logprobs
from drosim.llm.components.lora import (
    ADAPTER_DIR,
    apply_lora,
    causal_lm,
    is_lora,
    merged_copy,
    reference_model,
)
from drosim.llm.components.methods import Method, make_method
from drosim.llm.components.runtime import Distributed
from drosim.llm.components.update import update_step
from drosim.llm.recipes import trainer
from drosim.llm.recipes.export import export_model
from drosim.llm.recipes.trainer import set_up, train, update

RANK, ALPHA = 4, 8.0


def lora_model(seed: int = 0, *, randomise: bool = False) -> torch.nn.Module:
    """The tiny float64 GPT-2 with rank-4 adapters on its default targets (c_attn);
    ``randomise`` draws B (zero at PEFT's initialisation), so that A has gradients too."""
    model = apply_lora(tiny_model(seed=seed), rank=RANK, alpha=ALPHA, dropout=0.0,
                       target_modules=None)
    if randomise:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator,
                                                      dtype=parameter.dtype))
    return model


def base_name(name: str) -> str:
    """A LoRA model's parameter name as the plain model names it."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def logprobs(model: torch.nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logprobs(model, batch.flat("input_ids"), batch.flat("attention_mask"),
                                 batch.flat("response_mask")).logprobs


def test_the_reference_is_the_initial_policy_before_and_after_updates():
    initial = tiny_model(seed=0)
    policy = apply_lora(copy.deepcopy(initial), rank=RANK, alpha=ALPHA, dropout=0.0,
                        target_modules=None)
    assert all("lora_" in name for name, p in policy.named_parameters() if p.requires_grad)
    batch = random_pair_batch(6, seed=3)
    expected = logprobs(initial, batch)
    model = causal_lm(policy)
    assert torch.equal(logprobs(model, batch), expected)  # B = 0: the initial policy

    batch = near_policy(batch, initial)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        update_step(model, optimizer, batch, make_method("dpo"), eta=1.0, beta=0.5,
                    max_grad_norm=1.0)
    assert not torch.allclose(logprobs(model, batch), expected)
    with reference_model(policy, None) as reference:
        assert torch.equal(logprobs(reference, batch), expected)
    assert not torch.allclose(logprobs(model, batch), expected)  # the adapter is back on
    frozen = dict(initial.named_parameters())
    for name, parameter in policy.named_parameters():
        if "lora_" not in name:
            assert torch.equal(parameter, frozen[base_name(name)]), name


def test_lora_dropout_leaves_the_reference_exact():
    initial = tiny_model(seed=0)
    policy = apply_lora(copy.deepcopy(initial), rank=RANK, alpha=ALPHA, dropout=0.5,
                        target_modules=None)
    policy.train()  # adapter dropout on
    batch = random_pair_batch(4, seed=5)
    with reference_model(policy, None) as reference:
        assert torch.equal(logprobs(reference, batch), logprobs(initial, batch))


def test_the_merged_copy_computes_the_adapted_policy_and_leaves_it_alone():
    policy = lora_model(randomise=True)
    before = {name: p.detach().clone() for name, p in policy.state_dict().items()}
    merged = merged_copy(policy)
    assert not is_lora(merged) and not any("lora_" in name for name in merged.state_dict())
    batch = random_pair_batch(4, seed=6)
    torch.testing.assert_close(logprobs(merged, batch), logprobs(causal_lm(policy), batch),
                               rtol=1e-12, atol=1e-12)
    after = policy.state_dict()
    assert is_lora(policy) and all(torch.equal(after[name], before[name]) for name in before)


def _w_step(name: str, w_gradient: str, w_rho: float = 0.5) -> dict[str, torch.Tensor]:
    """Every parameter's change in one plain-SGD step (lr 1) of ``name`` under LoRA."""
    policy = lora_model(randomise=True)
    model = causal_lm(policy)
    batch = near_policy(random_pair_batch(6, seed=1), model)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    update_step(model, optimizer, batch, make_method(name, w_rho=w_rho), eta=1.0, beta=0.5,
                max_grad_norm=None, w_gradient=w_gradient)
    return {n: p.detach() - before[n] for n, p in policy.named_parameters()}


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    flat_a, flat_b = (torch.cat([t.reshape(-1) for t in d.values()]) for d in (a, b))
    return float((flat_a - flat_b).norm() / flat_b.norm())


@pytest.mark.parametrize("name", ["w-rebel", "wdpo"])
def test_wasserstein_methods_get_embedding_gradients_under_lora(name):
    exact = _w_step(name, "exact")
    approximate = _w_step(name, "finite-difference")
    # only the adapters move, A and B alike
    for parameter, delta in exact.items():
        assert bool(delta.any()) == ("lora_" in parameter), parameter
    assert _relative_error(approximate, exact) <= 1e-4
    # ... and the penalty (through the frozen embeddings) matters
    assert _relative_error(_w_step(name, "exact", w_rho=0.0), exact) > 1e-3


def test_target_modules_that_match_nothing_are_named():
    with pytest.raises(ValueError, match=r"lora_target_modules=\['q_proj'\]: .*not found"):
        apply_lora(tiny_model(), rank=RANK, alpha=ALPHA, dropout=0.0,
                   target_modules=["q_proj"])
    everything = apply_lora(tiny_model(), rank=RANK, alpha=ALPHA, dropout=0.0,
                            target_modules=["all-linear"])
    adapted = {n.split(".")[-4] for n, p in everything.named_parameters() if p.requires_grad}
    assert adapted == {"c_attn", "c_proj", "c_fc"}


# ------------------------------------------------------------------------------ the trainer


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-world")
    return {"model": tiny_llama_folder(root / "llama"),
            "reward": tiny_classifier_folder(root / "classifier"),
            "prompts": write_helpsteer(root / "helpsteer.parquet")}


def run_config(world: dict[str, Path], out: Path, *overrides: str):
    return load_config(None, [
        f"model={world['model']}", f"reward={world['reward']}",
        f"prompts={world['prompts']}", f"eval_prompts={world['prompts']}",
        "train_mixture={joy: 0.5, love: 0.5}", "eval_mixtures=[{joy: 1.0}]",
        "iterations=2", "pairs_per_iteration=4", "minibatch_size=2", "epochs=1",
        "max_new_tokens=6", "eval_every=10", "num_eval_prompts=2", "checkpoint_every=1",
        "lr=1e-2", "lora_rank=4", "device=cpu", "progress=false", f"out_dir={out}",
        *overrides])


@pytest.fixture(scope="module")
def dpo_run(world, tmp_path_factory) -> Path:
    return train(run_config(world, tmp_path_factory.mktemp("lora") / "dpo", "method=dpo"))


def test_set_up_adapts_the_policy_without_a_reference_copy(world, tmp_path):
    config = run_config(world, tmp_path / "set-up", "method=dpo", "lora_dropout=0.1")
    run = set_up(config, Distributed())
    assert is_lora(run.policy) and run.reference is None
    assert run.update_policy is causal_lm(run.policy)
    # disable_dropout ran before the adapters were added: they keep lora_dropout
    dropouts = [m.p for n, m in run.policy.named_modules()
                if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n]
    assert dropouts and set(dropouts) == {0.1}
    trained = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for n, p in run.policy.named_parameters() if "lora_" in n}


def test_a_lora_run_trains_the_adapters_only(world, dpo_run):
    saved = load_file(dpo_run / "checkpoints" / "iteration-000002" / "model.safetensors")
    initial = load_file(world["model"] / "model.safetensors")
    adapters = [name for name in saved if "lora_" in name]
    assert adapters and any(saved[name].any() for name in adapters if "lora_B" in name)
    assert {base_name(name) for name in saved if "lora_" not in name} == set(initial)
    for name, weight in saved.items():
        if "lora_" not in name:
            assert torch.equal(weight, initial[base_name(name)]), name


def test_final_is_the_merged_plain_model(world, dpo_run, tmp_path):
    from transformers import AutoModelForCausalLM

    final = dpo_run / "final"
    weights = load_file(final / "model.safetensors")
    assert set(weights) == set(load_file(world["model"] / "model.safetensors"))
    assert (final / ADAPTER_DIR / "adapter_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(final)
    # the export of the last checkpoint merges the same adapter into the same weights
    export_model(dpo_run / "checkpoints" / "iteration-000002", tmp_path / "exported")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert exported.keys() == weights.keys()
    assert all(torch.equal(exported[name], weights[name]) for name in weights)
    assert any(not torch.equal(weights[name], weight) for name, weight in
               load_file(world["model"] / "model.safetensors").items())
    # ... and a new run starts from it
    train(run_config(world, tmp_path / "again", f"model={final}", "iterations=1",
                     "lora_rank=null", "method=rebel"))


def test_a_resumed_lora_run_ends_bitwise_where_an_uninterrupted_one_does(world, dpo_run,
                                                                        tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    train(run_config(world, out, "method=dpo", "iterations=1"))  # stops after iteration 1
    shutil.rmtree(out / "final")
    updated = []

    def counted(run, batch):
        updated.append(len(batch))
        return update(run, batch)

    monkeypatch.setattr(trainer, "update", counted)
    train(run_config(world, out, "method=dpo"), resume=True)
    assert len(updated) == 1  # iteration 2 only: the checkpoint of iteration 1 was loaded
    ours, theirs = (load_file(run / "final" / "model.safetensors") for run in (out, dpo_run))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_w_rebel_trains_under_lora_from_a_zero_policy_term(world, tmp_path, monkeypatch):
    first = []
    losses = Method.losses

    def spy(self, logprobs, pairs, **kwargs):
        first.append(torch.equal(logprobs, pairs.sampling_logprobs))
        return losses(self, logprobs, pairs, **kwargs)

    monkeypatch.setattr(Method, "losses", spy)
    out = train(run_config(world, tmp_path / "w", "method=w-rebel", "w_rho=0.5",
                           "iterations=1", "gradient_checkpointing=true"))
    assert first[0]  # the iteration's first step: log pi_theta = log pi_t exactly
    assert (out / "final" / ADAPTER_DIR).is_dir()


@pytest.mark.parametrize("overrides, message", [
    (["lora_rank=0"], r"lora_rank must be >= 1"),
    (["lora_rank=4", "lora_alpha=0"], r"lora_alpha must be finite and > 0"),
    (["lora_rank=4", "lora_dropout=1.0"], r"lora_dropout must be in \[0, 1\)"),
    (["lora_rank=4", "lora_dropout=-0.1"], r"lora_dropout must be in \[0, 1\)"),
    (["lora_rank=4", "lora_dropout=0.1"], r"lora_dropout > 0 cannot run rebel"),
    (["lora_rank=4", "lora_dropout=0.1", "method=wdpo"], r"cannot run wdpo"),
    (["lora_rank=4", "lora_target_modules=[]"], r"lora_target_modules is empty"),
    (["lora_rank=4", "sharding=fsdp2"], r"sharding=fsdp2 cannot run a LoRA policy"),
    (["lora_alpha=32"], r"lora_alpha configure a LoRA adapter, but lora_rank is null"),
    (["lora_target_modules=[q_proj]"], r"lora_target_modules configure"),
])
def test_bad_lora_keys_are_clear_errors(overrides, message):
    world_keys = ["model=demo", "prompts=demo", "eval_prompts=demo", "reward=demo",
                  "train_mixture={joy: 1.0}", "eval_mixtures=[{joy: 1.0}]"]
    with pytest.raises(ValueError, match=message):
        load_config(None, [*world_keys, *overrides])


def test_lora_dropout_is_allowed_with_the_dpo_type_methods():
    config = load_config(None, ["model=demo", "prompts=demo", "eval_prompts=demo",
                                "reward=demo", "train_mixture={joy: 1.0}",
                                "eval_mixtures=[{joy: 1.0}]", "lora_rank=8",
                                "lora_dropout=0.05", "method=chi2-dpo",
                                "lora_target_modules=[all-linear]"])
    assert (config.lora_rank, config.lora_dropout) == (8, 0.05)


def _c_compiler() -> bool:
    compiler = shutil.which("gcc") or shutil.which("cc")
    return compiler is not None and subprocess.run(
        [compiler, "--version"], capture_output=True, check=False).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _c_compiler(), reason="torch.compile's inductor backend needs a C "
                    "compiler on CPU")
def test_a_compiled_lora_update_equals_the_eager_one():
    from drosim.llm.components.update import maybe_compile

    steps = []
    for compiled in (False, True):
        policy = lora_model(randomise=True)
        policy.float()
        model = causal_lm(policy)
        batch = near_policy(random_pair_batch(4, seed=2, dtype=torch.float32), model)
        optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad],
                                    lr=1.0)
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
        update_step(maybe_compile(model, compiled), optimizer, batch, make_method("dpo"),
                    eta=1.0, beta=0.5, max_grad_norm=None)
        steps.append({n: p.detach() - before[n] for n, p in policy.named_parameters()})
    assert _relative_error(steps[1], steps[0]) < 1e-4
    assert all(bool(delta.any()) == ("lora_" in name) for name, delta in steps[1].items())

