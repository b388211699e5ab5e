"""Padding-free (packed) update forwards, and the first step supplying its own log pi_t.

- :func:`pack_layout` places every real token once, in rows no longer than the longest
  sequence, each sequence contiguous with positions from 0;
- packed log-probabilities (and their gradients) equal the padded ones and the per-row
  reference, on GPT-2 and Llama, ragged rows and empty responses included;
- one ``update_step`` of every method moves the parameters alike packed or padded (LoRA too),
  with less padding;
- ``sampling_out``: the first step's own forward gives log pi_t (the REBEL policy term is
  exactly 0), so an iteration of one minibatch runs no recording forward;
- two smoke runs, packing on and off, end at the same weights.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from llm_helpers import naive_logprobs, near_policy, random_pair_batch, tiny_model
from llm_stand_ins import tiny_llama_folder
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from drosim.llm.components import update as update_module
from drosim.llm.components.config import bundled_config_path, load_config
from drosim.llm.components.demo_world import build_demo_base
from drosim.llm.components.logprobs import (
    model_layout,
    pack_layout,
    packed_sequence_logprobs,
    packing_refusal,
    row_lengths,
    sequence_logprobs,
    supports_packing,
)
from drosim.llm.components.lora import apply_lora, causal_lm
from drosim.llm.components.methods import Method, make_method
from drosim.llm.components.update import record_sampling_logprobs, update_step
from drosim.llm.recipes.trainer import train, update_packing

F32 = torch.float32


def _rows(batch):
    return batch.flat("input_ids"), batch.flat("attention_mask"), batch.flat("response_mask")


def test_the_layout_places_every_real_token_once_in_rows_of_the_longest_length():
    batch = random_pair_batch(24, seed=5, max_prompt=6, max_response=7, empty_rows=(3, 10))
    ids, attention, _ = _rows(batch)
    layout = pack_layout(attention)
    lengths = attention.sum(-1)
    assert layout.sequence.shape[1] == int(lengths.max())
    # every real token once, in its row's order
    assert layout.target.unique().numel() == layout.target.numel() == int(lengths.sum())
    assert torch.equal(layout.pack(ids).flatten()[layout.target], ids.flatten()[layout.source])
    # each sequence contiguous, its positions 0 .. length - 1
    for row in range(ids.shape[0]):
        where = (layout.sequence == row).nonzero()
        assert where[:, 0].unique().numel() == 1
        columns = where[:, 1]
        assert torch.equal(columns - columns[0], torch.arange(int(lengths[row])))
        assert torch.equal(layout.position_ids[layout.sequence == row],
                           torch.arange(int(lengths[row])))
    padded_share = 1 - attention.sum() / attention.numel()
    assert layout.padding_fraction() < float(padded_share) / 2
    # the padding tail restarts at 0: a sequence of its own
    tail = layout.sequence < 0
    starts = tail & ~torch.cat([torch.zeros_like(tail[:, :1]), tail[:, :-1]], 1)
    assert bool((layout.position_ids[starts] == 0).all())


def test_sequences_of_one_length_pack_without_padding():
    # eight rows of 4 real tokens, shifted about in 7 columns: padded 43% padding, packed 0
    attention = torch.zeros(8, 7, dtype=torch.long)
    for row in range(8):
        attention[row, row % 4:row % 4 + 4] = 1
    layout = pack_layout(attention)
    assert layout.sequence.shape == (8, 4) and layout.padding_fraction() == 0.0


def test_a_flash_attention_policy_gets_one_row():
    # transformers' flash attention finds packed sequences in a batch of ONE row only
    attention = random_pair_batch(6, seed=2).flat("attention_mask")
    model = tiny_model(seed=0)
    assert model_layout(model, attention).sequence.shape[0] > 1
    model.config._attn_implementation = "flash_attention_2"
    layout = model_layout(model, attention)
    assert layout.sequence.shape == (1, int(attention.sum())) and layout.padding_fraction() == 0
    assert torch.equal(layout.sequence[0].unique(), torch.arange(12))


def test_the_layout_refuses_an_empty_row_and_a_bad_capacity():
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        pack_layout(torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="below the longest sequence"):
        pack_layout(torch.tensor([[1, 1]]), capacity=1)


def test_ragged_lengths_pack_into_longer_rows_with_less_padding():
    # 32 sequences of 9-16 tokens (the smoke world at max_new_tokens 32): one per row of
    # the longest wastes a quarter; rows of two sequences waste 5.5% (the greedy bins).
    lengths = torch.tensor([9, 9, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 12, 12, 12, 12, 12,
                            12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 14, 14, 16])
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=11))
    assert pack_layout(mask).padding_fraction() > 0.25
    layout = model_layout(model, mask)
    assert layout.padding_fraction() < 0.06
    assert 16 <= layout.sequence.shape[1] <= max(row_lengths(lengths)) <= 8 * 16


def _llama(tmp_path):
    return LlamaForCausalLM.from_pretrained(tiny_llama_folder(tmp_path / "llama"),
                                            dtype=F32).eval()


@pytest.mark.parametrize("kind", ["gpt2-sdpa", "gpt2-eager", "llama"])
def test_packed_logprobs_and_gradients_equal_the_padded_ones(tmp_path, kind):
    if kind == "llama":
        model = _llama(tmp_path)
    else:
        model = tiny_model(seed=1, dtype=F32)
        model.config._attn_implementation = kind.split("-")[1]
    batch = random_pair_batch(12, seed=2, empty_rows=(0, 5, 6), dtype=F32)
    results, head_rows = [], []
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_rows.append(out.shape[:-1]))
    for packed in (False, True):
        model.zero_grad()
        forward = packed_sequence_logprobs if packed else sequence_logprobs
        out = forward(model, *_rows(batch))
        (out.logprobs * torch.linspace(0.5, 1.5, out.logprobs.shape[0])).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out, grads))
    (padded, padded_grad), (packed, packed_grad) = results
    torch.testing.assert_close(packed.logprobs, padded.logprobs, rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.num_tokens, padded.num_tokens)
    assert packed.empty.tolist() == padded.empty.tolist() and int(packed.empty.sum()) == 3
    assert bool((packed.logprobs[packed.empty] == 0).all())
    assert float((packed_grad - padded_grad).norm() / padded_grad.norm()) < 1e-5
    # packed, the LM head ran on the response-predicting positions alone
    assert tuple(head_rows[-1]) == (1, int(batch.response_mask.sum()))
    # and the per-row reference: every sequence alone, no padding at all
    with torch.no_grad():
        reference = naive_logprobs(model, *_rows(batch))
    torch.testing.assert_close(packed.logprobs.detach(), reference, rtol=1e-5, atol=1e-5)


def test_inputs_embeds_are_packed_like_the_ids():
    model = tiny_model(seed=0)
    batch = random_pair_batch(5, seed=4)
    ids, attention, response = _rows(batch)
    by_ids = packed_sequence_logprobs(model, ids, attention, response)
    by_embeddings = packed_sequence_logprobs(model, ids, attention, response,
                                             inputs_embeds=model.get_input_embeddings()(ids))
    torch.testing.assert_close(by_embeddings.logprobs, by_ids.logprobs, rtol=1e-12, atol=1e-12)


def test_a_model_that_cannot_pack_is_named():
    model = tiny_model(seed=0)
    assert supports_packing(model) and supports_packing(torch.compile(model))
    model.config._attn_implementation = "paged|sdpa"
    assert "attn_implementation 'paged|sdpa'" in packing_refusal(model)
    with pytest.raises(ValueError, match="cannot pack the update's forward: attn_impl"):
        packed_sequence_logprobs(model, *_rows(random_pair_batch(2)))
    assert packing_refusal(torch.nn.Linear(2, 2)) == "Linear is not a transformers model"


def _step(model, batch, method, *, packing, w_gradient="finite-difference"):
    """Plain SGD, lr 1: the parameter change is minus the step's gradient."""
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    stats = update_step(model, optimizer, batch, method, eta=0.5, beta=0.5,
                        max_grad_norm=None, w_gradient=w_gradient, packing=packing)
    delta = torch.cat([(p.detach() - b).flatten()
                       for p, b in zip(model.parameters(), before, strict=True)])
    return delta, stats


@pytest.mark.parametrize(("name", "w_gradient"), [
    ("rebel", "finite-difference"), ("chi2-rebel", "finite-difference"),
    ("kl-rebel", "finite-difference"), ("w-rebel", "finite-difference"),
    ("w-rebel", "exact"), ("dpo", "finite-difference"),
])
def test_an_update_step_moves_the_parameters_alike_packed_or_padded(name, w_gradient):
    method = make_method(name, chi2_rho=0.1, kl_rho=0.1, w_rho=0.5)
    batch = near_policy(random_pair_batch(8, seed=3, empty_rows=(2,)), tiny_model(seed=0))
    padded, padded_stats = _step(tiny_model(seed=0), batch, method, packing=False,
                                 w_gradient=w_gradient)
    packed, packed_stats = _step(tiny_model(seed=0), batch, method, packing=True,
                                 w_gradient=w_gradient)
    assert float(padded.norm()) > 0
    assert float((packed - padded).norm() / padded.norm()) < 1e-8
    assert packed_stats.mean_loss == pytest.approx(padded_stats.mean_loss, rel=1e-10)
    assert packed_stats.padding_fraction == pack_layout(batch.flat("attention_mask")
                                                       ).padding_fraction()
    assert packed_stats.padding_fraction < padded_stats.padding_fraction / 2


@pytest.mark.parametrize("name", ["rebel", "chi2-rebel", "dpo"])
def test_in_float32_packed_and_padded_steps_differ_by_rounding_only(name):
    # "Equal to float rounding": the float32 steps of the two layouts are no further apart
    # than each is from the float64 step (measured: 1e-6 to 6e-6 of the step, both).
    method = make_method(name, chi2_rho=0.1)
    batch64 = near_policy(random_pair_batch(8, seed=5, max_prompt=9, max_response=9),
                          tiny_model(seed=0))
    batch32 = dataclasses.replace(batch64, **{
        field: getattr(batch64, field).float()
        for field in ("sampling_logprobs", "rewards", "reference_logprobs")})
    exact, _ = _step(tiny_model(seed=0), batch64, method, packing=False)
    steps = {packing: _step(tiny_model(seed=0).float(), batch32, method,
                            packing=packing)[0].double() for packing in (False, True)}
    rounding = max(float((step - exact).norm()) for step in steps.values())
    assert 0 < float((steps[True] - steps[False]).norm()) <= 2 * rounding
    assert rounding < 1e-5 * float(exact.norm())


@pytest.mark.parametrize("name", ["rebel", "w-rebel"])
def test_a_lora_step_moves_the_adapters_alike_packed_or_padded(name):
    method = make_method(name, w_rho=0.5)
    batch = near_policy(random_pair_batch(6, seed=7), tiny_model(seed=0))
    deltas = []
    for packing in (False, True):
        policy = apply_lora(tiny_model(seed=0), rank=4, alpha=8.0, dropout=0.0,
                            target_modules=None)
        with torch.no_grad():  # B starts at 0: draw it, so that A moves too
            for parameter_name, parameter in policy.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.copy_(0.3 * torch.randn(parameter.shape, dtype=parameter.dtype,
                                                      generator=torch.Generator().manual_seed(1)))
        assert supports_packing(policy) and supports_packing(causal_lm(policy))
        deltas.append(_step(causal_lm(policy), batch, method, packing=packing)[0])
    padded, packed = deltas
    assert float(padded.norm()) > 0
    assert float((packed - padded).norm() / padded.norm()) < 1e-8


@pytest.mark.parametrize(("name", "w_gradient"), [
    ("rebel", "finite-difference"), ("w-rebel", "finite-difference"), ("w-rebel", "exact")])
@pytest.mark.parametrize("packing", [False, True])
def test_the_first_step_supplies_log_pi_t_and_its_policy_term_is_zero(monkeypatch, name,
                                                                      w_gradient, packing):
    model = tiny_model(seed=0, dtype=F32)
    method = make_method(name, w_rho=0.1)
    pairs = random_pair_batch(4, seed=0, dtype=F32)
    batch = dataclasses.replace(pairs, sampling_logprobs=None)
    seen = []
    losses = Method.losses

    def spy(self, logprobs, used, **kwargs):
        seen.append((logprobs.detach().clone(), used.sampling_logprobs.clone()))
        return losses(self, logprobs, used, **kwargs)

    monkeypatch.setattr(Method, "losses", spy)
    out = torch.full((4, 2), torch.nan)
    stats = update_step(model, torch.optim.SGD(model.parameters(), lr=1e-3), batch, method,
                        eta=0.5, beta=0.1, max_grad_norm=None, w_gradient=w_gradient,
                        packing=packing, sampling_out=out)
    first_logprobs, first_pi_t = seen[0]
    assert torch.equal(first_logprobs, first_pi_t) and torch.equal(out, first_pi_t)
    gap = pairs.rewards[:, 0] - pairs.rewards[:, 1]
    assert stats.mean_loss == float(gap.square().mean())
    if name == "w-rebel" and w_gradient == "finite-difference":
        # the shifted forward reads the same log pi_t
        assert len(seen) == 2 and torch.equal(seen[1][1], out)
    # ... and what a recording forward would have given
    recorded = record_sampling_logprobs(tiny_model(seed=0, dtype=F32), pairs, torch.arange(4),
                                        4, method=method, w_gradient=w_gradient,
                                        packing=packing)
    assert torch.equal(recorded, out)


def test_recording_can_skip_the_first_minibatch():
    model = tiny_model(seed=0, dtype=F32)
    method = make_method("rebel")
    batch = random_pair_batch(8, seed=1, dtype=F32)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    full = record_sampling_logprobs(model, batch, order, 4, method=method, packing=True)
    skipped = record_sampling_logprobs(model, batch, order, 4, method=method, packing=True,
                                       skip_first=True)
    assert bool(skipped[order[:4]].isnan().all())
    assert torch.equal(skipped[order[4:]], full[order[4:]])
    nothing = record_sampling_logprobs(model, batch, order, 8, method=method, skip_first=True)
    assert nothing.dtype == F32 and bool(nothing.isnan().all())


def _smoke(tmp_path, base, name, *overrides):
    return load_config(bundled_config_path("smoke"), [
        f"model={base}", f"out_dir={tmp_path / name}", "iterations=1", "eval_every=10",
        "checkpoint_every=10", *overrides])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_demo_base(tmp_path_factory.mktemp("base") / "base", pretrain_steps=5,
                           corpus_size=100)


@pytest.mark.parametrize("method", ["rebel", "w-rebel"])
def test_an_iteration_of_one_minibatch_runs_one_policy_forward_fewer(monkeypatch, tmp_path,
                                                                     base, method):
    calls = []
    original = update_module.pair_logprobs

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(update_module, "pair_logprobs", counting)
    train(_smoke(tmp_path, base, "one", f"method={method}", "pairs_per_iteration=4",
                 "minibatch_size=4"))
    # the update's own forward(s) only (two for the finite difference), none recording
    assert calls == [True] * (2 if method == "w-rebel" else 1)
    calls.clear()
    train(_smoke(tmp_path, base, "two", f"method={method}", "pairs_per_iteration=8",
                 "minibatch_size=4"))
    # one recording forward (the second minibatch), then the two steps
    assert calls[0] is False and calls.count(False) == 1


def test_smoke_runs_packed_and_padded_end_at_the_same_weights(tmp_path, base):
    weights, records = [], []
    for packing in ("true", "false"):
        out = train(_smoke(tmp_path, base, f"packing-{packing}", "method=chi2-rebel",
                           "chi2_rho=0.1", f"packing={packing}"))
        weights.append(load_file(out / "final" / "model.safetensors"))
        records.append([json.loads(line) for line in
                        (out / "metrics.jsonl").read_text().splitlines()
                        if json.loads(line)["kind"] == "train"])
    start = load_file(base / "model.safetensors")
    packed, padded = weights
    assert packed.keys() == padded.keys()
    # AdamW's first step is lr * g / (|g| + 1e-8): where |g| is near 1e-8 a float32
    # rounding difference of g (absolute ~1e-9 beside entries ~1e-2) moves the step by a
    # fraction of lr (measured up to 1.8e-5 at lr 1e-3), hence atol lr / 10; the whole
    # change agrees far closer (below).
    for key in packed:
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-5, atol=1e-4)
    moved = sum(float((padded[k] - start[k]).square().sum()) for k in start) ** 0.5
    apart = sum(float((packed[k] - padded[k]).square().sum()) for k in start) ** 0.5
    assert moved > 0 and apart / moved < 1e-3  # measured 2.6e-5
    # the smoke world's responses mostly run to max_new_tokens: little padding to drop
    packed_record, padded_record = records[0][0], records[1][0]
    assert 0 <= packed_record["update_padding_fraction"] <= padded_record[
        "update_padding_fraction"] < 0.1


def test_a_run_whose_policy_cannot_pack_says_so_once_and_stays_padded(capsys):
    policy = tiny_model(seed=0)
    policy.config._attn_implementation = "paged|sdpa"
    config, world = SimpleNamespace(packing=True), SimpleNamespace(is_main=True)
    # decided once per run (set_up), so said once
    assert update_packing(config, policy, world) is False
    assert capsys.readouterr().err.count("the update's forwards stay padded") == 1
    assert update_packing(config, tiny_model(seed=0), world) is True
    config.packing = False
    assert update_packing(config, tiny_model(seed=0), world) is False
    assert capsys.readouterr().err == ""
