"""drosim.llm.components.logprobs and rollout.response_mask_after against per-row references.

The reference runs the model on every row alone, with its padding stripped, and sums the
log-softmax of its response tokens one by one; the batched code must agree with it to
float64 rounding whatever the padding side, and must flag (not corrupt) empty responses.
"""

from __future__ import annotations

import math

import pytest
import torch
from llm_helpers import (
    EOS,
    PAD,
    VOCAB,
    flat_grad,
    naive_logprobs,
    random_pair_batch,
    repad,
    tiny_model,
    tiny_tokenizer,
    trainable,
)

from drosim.llm.components.logprobs import (
    accepts_logits_to_keep,
    check_sequence_batch,
    prediction_columns,
    response_logprobs,
    sequence_logprobs,
    token_logprobs,
)
from drosim.llm.components.rollout import response_mask_after, sample_pairs

RTOL = 1e-10


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def _flat_batch(n: int = 4, seed: int = 1, empty_rows=()):
    """``(2n, T)`` ids/attention/response of a random pair batch: prompts left-padded,
    responses right-padded, prompts and responses of varied lengths."""
    batch = random_pair_batch(n, seed=seed, empty_rows=empty_rows)
    return (batch.flat("input_ids"), batch.flat("attention_mask"),
            batch.flat("response_mask"))


@pytest.mark.parametrize("padding", ["generated", "left", "right"])
def test_sequence_logprobs_match_per_row_unpadded_reference(model, padding):
    ids, attention, response = _flat_batch()
    if padding != "generated":
        ids, attention, response = repad(ids, attention, response, padding)
    # the batch really has padding on the side under test, and rows of different lengths
    if padding == "left":
        assert not bool(attention[:, -1].eq(0).any()) and bool(attention[:, 0].eq(0).any())
    if padding == "right":
        assert not bool(attention[:, 0].eq(0).any()) and bool(attention[:, -1].eq(0).any())
    assert len(set(attention.sum(-1).tolist())) > 2
    assert len(set(response.sum(-1).tolist())) > 2

    out = sequence_logprobs(model, ids, attention, response)
    expected = naive_logprobs(model, ids, attention, response)
    torch.testing.assert_close(out.logprobs, expected, rtol=RTOL, atol=0)
    assert out.num_tokens.tolist() == response.sum(-1).tolist()
    assert not bool(out.empty.any())


def test_left_and_right_padding_give_the_same_logprobs_and_gradients(model):
    ids, attention, response = _flat_batch(seed=2)
    params = trainable(model)
    results = []
    for side in ("left", "right"):
        out = sequence_logprobs(model, *repad(ids, attention, response, side))
        results.append((out.logprobs.detach(), flat_grad(out.logprobs.sum(), params)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=RTOL, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-9, atol=1e-12)


def test_inputs_embeds_path_equals_token_ids_path(model):
    ids, attention, response = _flat_batch(seed=3)
    by_ids = sequence_logprobs(model, ids, attention, response)
    embeddings = model.get_input_embeddings()(ids)
    by_embeddings = sequence_logprobs(model, ids, attention, response, inputs_embeds=embeddings)
    torch.testing.assert_close(by_embeddings.logprobs, by_ids.logprobs, rtol=RTOL, atol=0)


def test_zero_length_responses_are_zero_flagged_and_do_not_block_gradients(model):
    empty_rows = (1, 4, 5)
    ids, attention, response = _flat_batch(n=4, seed=4, empty_rows=empty_rows)
    out = sequence_logprobs(model, ids, attention, response)
    empty = torch.zeros(ids.shape[0], dtype=torch.bool)
    empty[list(empty_rows)] = True

    assert out.empty.tolist() == empty.tolist()
    assert out.num_tokens[empty].tolist() == [0] * len(empty_rows)
    assert bool((out.num_tokens[~empty] > 0).all())
    assert out.logprobs[empty].tolist() == [0.0] * len(empty_rows)  # exactly 0
    expected = naive_logprobs(model, ids, attention, response)
    torch.testing.assert_close(out.logprobs, expected, rtol=RTOL, atol=0)

    params = trainable(model)
    # an empty row contributes nothing; the others still carry their full gradient
    assert float(flat_grad(out.logprobs[empty].sum(), params, retain_graph=True).abs().max()) == 0
    grad = flat_grad(out.logprobs.sum(), params)
    assert bool(torch.isfinite(grad).all()) and float(grad.norm()) > 1e-3
    torch.testing.assert_close(grad, flat_grad(expected.sum(), params), rtol=1e-9, atol=1e-12)


def test_response_logprobs_counts_only_masked_next_token_predictions():
    """Hand-built logits: position t's logits predict token t + 1."""
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]],
                                    dtype=torch.float64))
    ids = torch.tensor([[0, 1, 2]])
    out = response_logprobs(logits, ids, torch.tensor([[0, 1, 1]]))
    assert float(out.logprobs) == pytest.approx(math.log(0.25 * 0.7),
                                                rel=1e-14)
    out = response_logprobs(logits, ids, torch.tensor([[0, 0, 1]]))
    assert float(out.logprobs) == pytest.approx(math.log(0.7), rel=1e-14)
    assert int(out.num_tokens) == 1 and not bool(out.empty)


# ------------------------------------------------------------------------- bad inputs


def _good():
    ids = torch.tensor([[1, 5, 6, 7], [0, 1, 5, 6]])
    attention = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    response = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    return ids, attention, response


def test_good_batch_passes_validation():
    check_sequence_batch(*_good())


@pytest.mark.parametrize(("case", "match"), [
    ("empty", r"empty batch"),
    ("empty_length", r"empty batch"),
    ("one_dimensional", r"must be \(batch, T\)"),
    ("attention_shape", r"attention_mask has shape \(2, 3\), input_ids \(2, 4\)"),
    ("response_shape", r"response_mask has shape \(1, 4\), input_ids \(2, 4\)"),
    ("response_on_padding", r"marks padding as response tokens in rows \[1\]"),
    ("response_at_start", r"rows \[0\] start with a response token"),
])
def test_bad_batches_raise_clear_value_errors(model, case, match):
    ids, attention, response = _good()
    if case == "empty":
        ids, attention, response = (x[:0] for x in (ids, attention, response))
    elif case == "empty_length":
        ids, attention, response = (x[:, :0] for x in (ids, attention, response))
    elif case == "one_dimensional":
        ids, attention, response = ids[0], attention[0], response[0]
    elif case == "attention_shape":
        attention = attention[:, 1:]
    elif case == "response_shape":
        response = response[:1]
    elif case == "response_on_padding":
        response = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 1]])
        attention = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    elif case == "response_at_start":
        response = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match=match):
        sequence_logprobs(model, ids, attention, response)


def test_response_right_after_left_padding_is_rejected(model):
    """Unpadded, this row has its response at position 0 and is rejected; left-padded it
    must be rejected too, not scored from the logits of a padding position."""
    ids, attention, response = (torch.tensor([[0, 0, 5, 6, 7]]), torch.tensor([[0, 0, 1, 1, 1]]),
                                torch.tensor([[0, 0, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"start with a response token"):
        sequence_logprobs(model, ids[:, 2:], attention[:, 2:], response[:, 2:])
    with pytest.raises(ValueError, match=r"must follow at least one prompt token"):
        sequence_logprobs(model, ids, attention, response)


# ------------------------------------------------------------------ response_mask_after


@pytest.mark.parametrize(("prompt_length", "sequences", "eos", "expected"), [
    # EOS inside the response: kept, everything after it dropped
    (2, [[5, 6, 7, 2, 9, 0]], 2, [[0, 0, 1, 1, 0, 0]]),
    # no EOS: the whole generated part
    (2, [[5, 6, 7, 8, 9]], 2, [[0, 0, 1, 1, 1]]),
    # EOS as the first generated token: a one-token response
    (2, [[5, 6, 2, 0, 0]], 2, [[0, 0, 1, 0, 0]]),
    # EOS twice: only up to the first
    (1, [[5, 2, 7, 2, 8]], 2, [[0, 1, 0, 0, 0]]),
    # pad == eos: the padding after the first EOS is not response; EOS padding of the prompt
    # (left of prompt_length) is never looked at
    (2, [[0, 5, 7, 0, 0, 0]], 0, [[0, 0, 1, 1, 0, 0]]),
    (2, [[0, 5, 0, 0, 0]], 0, [[0, 0, 1, 0, 0]]),
    # several rows at once, each with its own first EOS
    (1, [[4, 2, 0, 0], [4, 3, 3, 2], [4, 3, 3, 3]], 2,
     [[0, 1, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1]]),
])
def test_response_mask_after_hand_made_sequences(prompt_length, sequences, eos, expected):
    mask = response_mask_after(prompt_length, torch.tensor(sequences), eos_token_id=eos)
    assert mask.tolist() == expected
    assert mask.dtype == torch.long


# ---------------------------------------------------------------------------- sampling


def _sampling_model():
    """The tiny policy with EOS favoured during generation (not in its log-probabilities),
    so that some sampled responses stop early."""
    model = tiny_model(seed=0)
    model.generation_config.sequence_bias = {(EOS,): 4.0}
    return model


def test_sample_pairs_masks():
    policy, tokenizer = _sampling_model(), tiny_tokenizer()
    prompts = ["[BOS] w3 w4", "[BOS] w5", "[BOS] w6 w7 w8"]
    torch.manual_seed(0)
    out = sample_pairs(policy, tokenizer, prompts, max_new_tokens=6)

    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    prompt_length = encoded["input_ids"].shape[1]
    ids = out.input_ids.reshape(6, -1)
    assert out.input_ids.shape[:2] == (3, 2) and ids.shape[1] <= prompt_length + 6
    # both samples of a prompt start with that prompt, left-padded
    assert torch.equal(ids[:, :prompt_length], encoded["input_ids"].repeat_interleave(2, 0))
    # the response runs from the prompt's end to the first EOS (inclusive) or the cap
    expected_response = torch.zeros_like(ids)
    stopped = 0
    for row in range(6):
        generated = ids[row, prompt_length:].tolist()
        end = generated.index(EOS) + 1 if EOS in generated else len(generated)
        stopped += EOS in generated and end < 6
        expected_response[row, prompt_length:prompt_length + end] = 1
        assert all(t == PAD for t in generated[end:])  # what generate wrote after the EOS
        assert out.responses[row // 2][row % 2] == tokenizer.decode(
            generated[:end], skip_special_tokens=True)
    assert stopped > 0  # some responses ended before the cap
    assert torch.equal(out.response_mask.reshape(6, -1), expected_response)
    expected_attention = torch.cat([encoded["attention_mask"].repeat_interleave(2, 0),
                                    expected_response[:, prompt_length:]], dim=1)
    assert torch.equal(out.attention_mask.reshape(6, -1), expected_attention)
    assert not bool(out.empty.any())


def test_sample_pairs_with_a_tokenizer_without_pad_token():
    policy, tokenizer = _sampling_model(), tiny_tokenizer(pad=False)
    torch.manual_seed(0)
    out = sample_pairs(policy, tokenizer, ["[BOS] w3 w4", "[BOS] w5"], max_new_tokens=4)
    assert out.input_ids.shape[:2] == (2, 2)


# ------------------------------------------------------------- chunked log-softmax


def _reference_token_logprobs(logits, targets):
    """The plain float32 (or wider) log_softmax-then-gather."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(wide, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _logits_and_targets(shape=(3, 5), vocab=11, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn((*shape, vocab), generator=generator, dtype=torch.float64)
    return logits.to(dtype), torch.randint(0, vocab, shape, generator=generator)


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_chunked_token_logprobs_gradcheck_float64(chunk_rows):
    logits, targets = _logits_and_targets()
    logits.requires_grad_(True)

    def fn(x):
        return token_logprobs(x, targets, chunk_rows=chunk_rows)

    assert torch.autograd.gradcheck(fn, (logits,))
    # the exact Wasserstein gradient differentiates the backward itself
    assert torch.autograd.gradgradcheck(fn, (logits,))


def test_chunked_token_logprobs_equal_log_softmax_gather_in_float32():
    logits, targets = _logits_and_targets(shape=(6, 7), vocab=4096, dtype=torch.float32)
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))
    chunked = logits.clone().requires_grad_(True)
    plain = logits.clone().requires_grad_(True)
    out = token_logprobs(chunked, targets, chunk_rows=5)  # 42 rows: 9 chunks, the last short
    expected = _reference_token_logprobs(plain, targets)
    assert out.dtype == torch.float32 and out.shape == targets.shape
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(chunked.grad, plain.grad, rtol=1e-6, atol=1e-7)


def test_chunked_token_logprobs_of_bf16_logits_are_float32():
    logits, targets = _logits_and_targets(shape=(4, 9), vocab=1000, dtype=torch.bfloat16)
    logits.requires_grad_(True)
    out = token_logprobs(logits, targets, chunk_rows=7)
    expected = _reference_token_logprobs(logits.detach(), targets)  # upcast reference
    assert out.dtype == torch.float32
    # the same float32 arithmetic on the same (bf16-exact) values
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    upcast = logits.detach().float().requires_grad_(True)
    _reference_token_logprobs(upcast, targets).sum().backward()
    torch.testing.assert_close(logits.grad.float(), upcast.grad, rtol=2**-7, atol=1e-3)


def test_masked_positions_get_a_zero_gradient_not_nan(model):
    """Padding and prompt columns are scored (any valid target id) and masked by a 0."""
    logits, targets = _logits_and_targets(shape=(2, 5), vocab=11, dtype=torch.float32)
    logits.requires_grad_(True)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    (token_logprobs(logits, targets) * mask).sum().backward()
    assert bool(torch.isfinite(logits.grad).all())
    assert float(logits.grad[mask == 0].abs().max()) == 0


# -------------------------------------------------- logits only where they are needed


@pytest.mark.parametrize(("response", "expected"), [
    ([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], slice(1, 4)),
    ([[0, 1, 0, 0, 1]], slice(0, 4)),  # a gap inside the span is kept
    ([[0, 0, 0, 0, 0]], slice(0, 0)),
])
def test_prediction_columns(response, expected):
    assert prediction_columns(torch.tensor(response)) == expected


def test_lm_head_runs_only_on_the_columns_that_predict_a_response_token(model):
    ids, attention, response = _flat_batch(seed=5)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        sequence_logprobs(model, ids, attention, response)
    finally:
        handle.remove()
    columns = prediction_columns(response)
    assert seen == [torch.Size([ids.shape[0], columns.stop - columns.start, VOCAB])]
    assert columns.stop - columns.start < ids.shape[1] - 1  # the prompts' columns are skipped


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``: full logits every time."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None,
                inputs_embeds=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=use_cache,
                          inputs_embeds=inputs_embeds)


def test_a_model_without_logits_to_keep_gets_the_same_logprobs(model):
    ids, attention, response = _flat_batch(seed=6)
    assert accepts_logits_to_keep(model) and not accepts_logits_to_keep(_NoLogitsToKeep(model))
    expected = naive_logprobs(model, ids, attention, response)
    out = sequence_logprobs(_NoLogitsToKeep(model), ids, attention, response)
    torch.testing.assert_close(out.logprobs, expected, rtol=RTOL, atol=0)


def test_the_policy_uses_pytorch_sdpa_attention(model):
    """The fused attention kernels (flash / memory-efficient) need the SDPA implementation,
    transformers 5's default: nothing in drosim.llm may switch a model to eager."""
    assert model.config._attn_implementation == "sdpa"


def test_a_llama_policy_takes_the_same_logits_to_keep_path():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).double().eval()
    ids, attention, response = _flat_batch(seed=7)
    seen = []
    handle = llama.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    try:
        out = sequence_logprobs(llama, ids, attention, response)
    finally:
        handle.remove()
    columns = prediction_columns(response)
    assert accepts_logits_to_keep(llama) and seen == [columns.stop - columns.start]
    expected = naive_logprobs(llama, ids, attention, response)
    torch.testing.assert_close(out.logprobs, expected, rtol=RTOL, atol=0)
