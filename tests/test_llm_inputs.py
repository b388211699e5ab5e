"""Bad inputs to drosim.llm fail early with a ValueError that says what is wrong (and where),
and the three reward models score what they claim to, including a sequence classifier saved
to and loaded from a local directory."""

from __future__ import annotations

import math

import pytest
import torch
from llm_helpers import F64, random_pair_batch, tiny_config, tiny_model, tiny_tokenizer
from transformers import GPT2ForSequenceClassification

from drosim.dro import KL, Chi2, KLTemperature, Wasserstein
from drosim.llm.components.batch import PairBatch
from drosim.llm.components.losses import (
    dpo_losses,
    ipo_losses,
    preferences_from_rewards,
    rebel_losses,
)
from drosim.llm.components.methods import make_method
from drosim.llm.components.objective import robust_objective
from drosim.llm.components.rewards import (
    CallableReward,
    SequenceClassifierReward,
    WordListReward,
    mixture_weights,
    score,
)
from drosim.llm.components.rollout import sample_pairs
from drosim.llm.components.update import method_objective

NAN, INF = math.nan, math.inf


def _fields(n: int = 4) -> dict:
    """The fields of a valid random PairBatch, to be spoiled one at a time."""
    batch = random_pair_batch(n, seed=3)
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                response_mask=batch.response_mask, sampling_logprobs=batch.sampling_logprobs,
                rewards=batch.rewards, reference_logprobs=batch.reference_logprobs)


# ------------------------------------------------------------------------------ PairBatch


@pytest.mark.parametrize("name", ["rewards", "sampling_logprobs", "reference_logprobs"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_pair_batch_names_the_rows_with_non_finite_values(name, bad):
    fields = _fields(5)
    values = fields[name].clone()
    values[1, 0] = bad
    values[3, 1] = bad
    fields[name] = values
    with pytest.raises(ValueError, match=rf"^{name} are not finite .* rows \[1, 3\]$"):
        PairBatch(**fields)


def test_pair_batch_accepts_finite_values_and_no_reference():
    fields = _fields(5)
    fields["reference_logprobs"] = None
    assert len(PairBatch(**fields)) == 5


@pytest.mark.parametrize(("spoil", "match"), [
    (lambda f: f.update({k: v[:0] for k, v in f.items()}), r"empty batch"),
    (lambda f: f.update(input_ids=f["input_ids"][:, 0]), r"input_ids must be \(n, 2, T\)"),
    (lambda f: f.update(attention_mask=f["attention_mask"][:, :, 1:]),
     r"attention_mask has shape \(4, 2, 9\), input_ids \(4, 2, 10\)"),
    (lambda f: f.update(response_mask=f["response_mask"][:3]),
     r"response_mask has shape \(3, 2, 10\)"),
    (lambda f: f.update(rewards=f["rewards"][:3]),
     r"rewards must have shape \(4, 2\), got \(3, 2\)"),
    (lambda f: f.update(sampling_logprobs=f["sampling_logprobs"][:, :1]),
     r"sampling_logprobs must have shape \(4, 2\)"),
])
def test_pair_batch_rejects_bad_shapes(spoil, match):
    fields = _fields(4)
    spoil(fields)
    with pytest.raises(ValueError, match=match):
        PairBatch(**fields)


# --------------------------------------------------------------------- losses and methods


LP = torch.tensor([[-1.0, -2.0], [-3.0, -0.5]], dtype=F64)
REWARDS = torch.tensor([[1.0, 0.0], [0.5, 2.0]], dtype=F64)
PREFERENCES = torch.tensor([1.0, 0.0], dtype=F64)


@pytest.mark.parametrize("eta", [0.0, -0.5, NAN])
def test_rebel_rejects_non_positive_eta(eta):
    with pytest.raises(ValueError, match=r"eta must be > 0"):
        rebel_losses(LP, LP, REWARDS, eta=eta)


@pytest.mark.parametrize("loss", [dpo_losses, ipo_losses])
@pytest.mark.parametrize("beta", [0.0, -1.0, NAN])
def test_dpo_and_ipo_reject_non_positive_beta(loss, beta):
    with pytest.raises(ValueError, match=r"beta must be > 0"):
        loss(LP, LP, PREFERENCES, beta=beta)


@pytest.mark.parametrize("loss", [dpo_losses, ipo_losses])
@pytest.mark.parametrize("bad", [1.5, -0.1, NAN])
def test_dpo_and_ipo_reject_preferences_outside_unit_interval(loss, bad):
    preferences = torch.tensor([0.5, bad], dtype=F64)
    with pytest.raises(ValueError, match=r"preferences must lie in \[0, 1\]"):
        loss(LP, LP, preferences, beta=0.5)


def test_losses_reject_empty_and_mismatched_batches():
    empty = torch.zeros(0, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"is empty: a loss needs at least one pair"):
        rebel_losses(empty, empty, empty, eta=1.0)
    with pytest.raises(ValueError, match=r"logprobs is empty: a loss needs at least one pair"):
        dpo_losses(empty, empty, torch.zeros(0, dtype=F64), beta=1.0)
    with pytest.raises(ValueError, match=r"rewards is empty"):
        preferences_from_rewards(empty)
    with pytest.raises(ValueError, match=r"rewards has 1 pairs, expected 2"):
        rebel_losses(LP, LP, REWARDS[:1], eta=1.0)
    with pytest.raises(ValueError, match=r"base_logprobs must have shape \(n, 2\)"):
        rebel_losses(LP, LP[:, 0], REWARDS, eta=1.0)
    with pytest.raises(ValueError, match=r"preferences must have shape \(2,\)"):
        dpo_losses(LP, LP, PREFERENCES[:1], beta=1.0)


# Radii follow drosim.dro's one rule (each set validates itself); the message names the key.
@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(name="chi2-rebel", chi2_rho=-1.0), r"chi2_rho: Chi2\.rho must be non-negative"),
    (dict(name="chi2-dpo", chi2_rho=NAN), r"chi2_rho: Chi2\.rho must not be NaN"),
    (dict(name="kl-rebel", kl_rho=-0.1), r"kl_rho: KL\.rho must be non-negative"),
    (dict(name="w-rebel", w_rho=-0.1), r"w_rho, w_p: Wasserstein\.rho must be non-negative"),
    (dict(name="w-rebel", w_rho=math.inf), r"w_rho, w_p: Wasserstein\.rho must be finite"),
    (dict(name="wdpo", w_p=0.5), r"w_rho, w_p: Wasserstein\.p must be >= 1"),
    (dict(name="kltemp-rebel", kl_tau=NAN), r"kl_tau: KLTemperature\.tau must not be NaN"),
    (dict(name="kl-dpo", kl_tau=-1.0), r"kl_tau: KLTemperature\.tau must be non-negative"),
    # A radius the method at hand ignores is validated too.
    (dict(name="rebel", kl_rho=-1.0), r"kl_rho: KL\.rho must be non-negative"),
    (dict(name="rebell"), r"unknown method 'rebell'; expected one of rebel, chi2-rebel"),
])
def test_make_method_rejects_bad_radii_and_names(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_method(**kwargs)


def test_limit_radii_are_accepted_and_mean_the_documented_limit():
    # tau = 0 is the max and an infinite chi2 / KL radius is every distribution (the max).
    for method in (make_method("kl-dpo", kl_tau=0.0), make_method("chi2-rebel", chi2_rho=math.inf)):
        assert method.spec.is_minimax


@pytest.mark.parametrize("make", [lambda: Chi2(-1.0), lambda: KL(-1.0),
                                  lambda: KLTemperature(-1.0), lambda: Wasserstein(-0.1)])
def test_a_negative_radius_never_reaches_robust_objective(make):
    # Sets validate themselves at construction, so no invalid set exists to pass along.
    with pytest.raises(ValueError, match=r"must be non-negative"):
        make()


@pytest.mark.parametrize("spec", [None, Chi2(0.1), KL(0.1), KLTemperature(0.5)], ids=repr)
def test_robust_objective_rejects_empty_and_non_finite_losses(spec):
    with pytest.raises(ValueError, match=r"losses must be a non-empty \(n,\) tensor, got \(0,\)"):
        robust_objective(torch.zeros(0, dtype=F64), spec)
    with pytest.raises(ValueError, match=r"losses must be a non-empty \(n,\) tensor"):
        robust_objective(torch.zeros(2, 3, dtype=F64), spec)
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        robust_objective(torch.tensor([1.0, NAN, 2.0], dtype=F64), spec)


def test_wasserstein_without_inputs_raises():
    with pytest.raises(ValueError, match=r"Wasserstein objective needs the input embeddings"):
        robust_objective(torch.tensor([0.5, 1.0], dtype=F64, requires_grad=True),
                         Wasserstein(0.1))


@pytest.mark.parametrize("name", ["dpo", "ipo", "wdpo", "kl-dpo", "chi2-dpo"])
def test_dpo_family_without_reference_logprobs_raises(name):
    batch = random_pair_batch(2, seed=1, with_reference=False)
    with pytest.raises(ValueError, match=rf"{name} needs the reference policy's log-prob"):
        method_objective(tiny_model(), batch, make_method(name), eta=1.0, beta=0.5)


# ------------------------------------------------------------------------- rewards


def test_score_names_rows_with_non_finite_rewards():
    def fn(prompts, responses):
        out = torch.ones(len(responses), 2)
        out[0, 1], out[2, 0] = NAN, INF
        return out

    reward = CallableReward(fn, ["a", "b"])
    with pytest.raises(ValueError, match=r"rewards are not finite .* rows \[0, 2\]"):
        score(reward, ["p"] * 4, ["r"] * 4)


def test_score_rejects_mismatched_empty_and_misshapen_batches():
    reward = CallableReward(lambda p, r: torch.zeros(len(r), 2), ["a", "b"])
    with pytest.raises(ValueError, match=r"2 prompts but 3 responses"):
        score(reward, ["p", "q"], ["x", "y", "z"])
    with pytest.raises(ValueError, match=r"empty batch"):
        score(reward, [], [])
    flat = CallableReward(lambda p, r: torch.zeros(len(r)), ["a", "b"])
    with pytest.raises(ValueError, match=r"returned shape \(3,\), expected .* \(3, 2\)"):
        score(flat, ["p"] * 3, ["r"] * 3)


def test_callable_reward_passes_prompts_and_responses_through():
    reward = CallableReward(lambda p, r: [[len(a), len(b)] for a, b in zip(p, r, strict=True)],
                            ("prompt_length", "response_length"))
    scores = score(reward, ["ab", "abcd"], ["xyz", ""])
    assert reward.objectives == ("prompt_length", "response_length")
    assert scores.dtype == torch.float32
    assert scores.tolist() == [[2.0, 3.0], [4.0, 0.0]]


def test_word_list_reward_scores_fractions_of_listed_words():
    reward = WordListReward({"joy": ["happy", "glad"], "calm": {"quiet"}})
    responses = ["happy happy sad", "quiet", "", "glad quiet x y"]
    scores = score(reward, ["p"] * len(responses), responses)
    expected = torch.tensor([[2 / 3, 0.0], [0.0, 1.0], [0.0, 0.0], [0.25, 0.25]])
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0)
    assert reward.objectives == ("joy", "calm")
    with pytest.raises(ValueError, match=r"at least one word list"):
        WordListReward({})


def test_word_list_reward_counts_a_word_for_every_list_it_is_in():
    reward = WordListReward({"joy": {"bright"}, "calm": {"bright", "still"}})
    assert reward(["p"], ["bright day"]).tolist() == [[0.5, 0.5]]


def test_mixture_weights_normalise_and_reject_bad_mixtures():
    weights = mixture_weights(("joy", "calm", "anger"), {"anger": 2.0, "joy": 6.0})
    assert weights.tolist() == [0.75, 0.0, 0.25]
    with pytest.raises(ValueError, match=r"unknown objectives \['fear'\]"):
        mixture_weights(("joy", "calm"), {"joy": 1.0, "fear": 1.0})
    with pytest.raises(ValueError, match=r"must be >= 0 with a positive sum"):
        mixture_weights(("joy", "calm"), {"joy": 1.0, "calm": -0.5})
    with pytest.raises(ValueError, match=r"must be >= 0 with a positive sum"):
        mixture_weights(("joy", "calm"), {"joy": 0.0})
    with pytest.raises(ValueError, match=r"must be >= 0 with a positive sum"):
        mixture_weights(("joy", "calm"), {"joy": NAN})


@pytest.mark.parametrize("pad", [True, False], ids=["own-pad", "eos-as-pad"])
def test_sequence_classifier_reward_from_a_local_directory(tmp_path, pad):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(pad=pad)
    labels = {0: "a", 1: "b", 2: "c"}
    config = tiny_config(num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()},
                         pad_token_id=tokenizer.pad_token_id)
    model = GPT2ForSequenceClassification(config).eval()
    with torch.no_grad():  # a random score head, so every objective differs
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    reward = SequenceClassifierReward(tmp_path, batch_size=2)
    assert reward.objectives == ("a", "b", "c")
    prompts = ["w3 w4", "w5", "w6 w7 w8", "w9"]
    responses = ["w10", "w11 w12 w13 w14", "w15", ""]
    scores = score(reward, prompts, responses)
    assert scores.shape == (4, 3)

    # the model's logits on each text alone (no padding), in the reward's "prompt response"
    expected = []
    with torch.no_grad():
        for p, r in zip(prompts, responses, strict=True):
            ids = tokenizer(f"{p} {r}", return_tensors="pt")["input_ids"]
            expected.append(model(input_ids=ids).logits[0])
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-5, atol=1e-6)
    assert len({tuple(row) for row in scores.round(decimals=4).tolist()}) == 4


# ----------------------------------------------------------------------------- rollout


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(prompts=[]), r"no prompts"),
    (dict(temperature=0.0), r"need temperature > 0, .* got 0.0, 1.0, 32"),
    (dict(temperature=-1.0), r"need temperature > 0"),
    (dict(top_p=0.0), r"0 < top_p <= 1"),
    (dict(top_p=1.5), r"0 < top_p <= 1"),
    (dict(max_new_tokens=0), r"max_new_tokens >= 1"),
])
def test_sample_pairs_rejects_bad_arguments(kwargs, match):
    args = dict(prompts=["[BOS] w3 w4"]) | kwargs
    with pytest.raises(ValueError, match=match):
        sample_pairs(tiny_model(), tiny_tokenizer(), **args)
