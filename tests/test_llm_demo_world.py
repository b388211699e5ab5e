"""The demo world of drosim.llm: its language, objectives, tokenizer and pretrained model."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
import transformers

from drosim.llm.components.demo_world import (
    OBJECTIVES,
    demo_corpus,
    demo_model_config,
    demo_prompts,
    pretrain_demo_model,
    train_demo_tokenizer,
)

PRETRAIN_STEPS = 40


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return demo_corpus(1000, seed=0)


@pytest.fixture(scope="module")
def tokenizer(corpus) -> transformers.PreTrainedTokenizerFast:
    return train_demo_tokenizer(corpus)


@pytest.fixture(scope="module")
def config(tokenizer) -> transformers.GPT2Config:
    return demo_model_config(tokenizer)


@pytest.fixture(scope="module")
def model(config, tokenizer, corpus) -> transformers.GPT2LMHeadModel:
    return pretrain_demo_model(config, tokenizer, corpus, steps=PRETRAIN_STEPS, seed=0)


def heldout_loss(model, tokenizer, sentences: list[str]) -> float:
    """Mean next-token loss of "<bos> sentence <eos>", by transformers' own labels path."""
    batch = tokenizer([f"{s} {tokenizer.eos_token}" for s in sentences], padding=True,
                      padding_side="right", return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


# ------------------------------------------------------------------------------ language

def test_corpus_is_deterministic_in_its_seed():
    assert demo_corpus(200, seed=3) == demo_corpus(200, seed=3)
    assert demo_corpus(200, seed=3) != demo_corpus(200, seed=4)
    # a longer corpus extends a shorter one: the seed fixes one stream of sentences
    assert demo_corpus(300, seed=3)[:200] == demo_corpus(200, seed=3)


def test_corpus_sentences_have_the_documented_shape(corpus):
    for sentence in corpus:
        words = sentence.split(" ")
        assert words[-1] == "." and "." not in words[:-1], sentence
        assert 5 <= len(words) - 1 <= 11, sentence
        assert all(w.isalpha() and w.islower() for w in words[:-1]), sentence  # no "" either
    assert len(set(corpus)) > 0.9 * len(corpus)  # a language, not a handful of sentences


def test_objectives_are_disjoint_word_lists_of_the_documented_size():
    assert len(OBJECTIVES) >= 4
    for words in OBJECTIVES.values():
        assert 15 <= len(words) <= 25
        assert all(w.isalpha() and w.islower() for w in words)
    for a, b in itertools.combinations(OBJECTIVES.values(), 2):
        assert not a & b


def test_every_objective_word_occurs_at_a_modest_frequency():
    words = Counter(w for s in demo_corpus(5000, seed=1) for w in s.split() if w != ".")
    total = sum(words.values())
    for name, objective in OBJECTIVES.items():
        assert objective <= words.keys(), f"{name}: {sorted(objective - words.keys())}"
        share = sum(words[w] for w in objective) / total
        assert 0.01 < share < 0.1, (name, share)
    # the neutral words carry most of the corpus
    neutral = total - sum(words[w] for objective in OBJECTIVES.values() for w in objective)
    assert neutral / total > 0.8


def test_prompts_are_tone_free_sentence_beginnings():
    prompts = demo_prompts(300, seed=5)
    assert prompts == demo_prompts(300, seed=5)
    assert prompts != demo_prompts(300, seed=6)
    # each of the ~860 possible beginnings starts about 20 of these sentences
    beginnings = {" ".join(s.split()[:n]) for s in demo_corpus(20_000, seed=2) for n in (2, 3)}
    objective_words = frozenset().union(*OBJECTIVES.values())
    for prompt in prompts:
        assert 2 <= len(prompt.split()) <= 4
        assert prompt in beginnings, prompt
        assert not objective_words & set(prompt.split()), prompt


@pytest.mark.parametrize("make", [lambda: demo_corpus(-1), lambda: demo_prompts(-1),
                                  lambda: train_demo_tokenizer([])])
def test_invalid_sizes_are_rejected(make):
    with pytest.raises(ValueError):
        make()


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_the_corpus_without_unknown_tokens(tokenizer, corpus):
    ids = tokenizer(corpus)["input_ids"]
    for sentence, seq in zip(corpus, ids, strict=True):
        assert tokenizer.unk_token_id not in seq
        assert len(seq) == len(sentence.split()) + 1  # one token per word, plus <bos>
        assert tokenizer.decode(seq, skip_special_tokens=True) == sentence


def test_tokenizer_special_tokens_bos_and_left_padding(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token,
            tokenizer.unk_token) == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert tokenizer("")["input_ids"] == [tokenizer.bos_token_id]
    batch = tokenizer(["the man", "today my old friend"], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}  # GPT-2 would embed token_type_ids
    assert batch["input_ids"][:, -2].tolist() == tokenizer.convert_tokens_to_ids(["the", "old"])
    assert batch["input_ids"][0].tolist()[:3] == [tokenizer.pad_token_id] * 2 + [
        tokenizer.bos_token_id]
    assert batch["attention_mask"][0].tolist() == [0, 0, 1, 1, 1]
    assert tokenizer("the dragon")["input_ids"][-1] == tokenizer.unk_token_id


def test_tokenizer_save_and_load_round_trip(tokenizer, corpus, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = [*corpus[:50], "the man", "today my friend"]
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert loaded.padding_side == "left"
    assert loaded(texts[-2:], padding=True)["input_ids"] == tokenizer(
        texts[-2:], padding=True)["input_ids"]
    assert loaded.get_vocab() == tokenizer.get_vocab()


# --------------------------------------------------------------------------------- model

def test_config_has_no_dropout_and_the_tokenizer_special_ids(config, tokenizer):
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.0
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert config.tie_word_embeddings
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_config_rejects_a_width_not_divisible_by_the_heads(tokenizer):
    with pytest.raises(ValueError):
        demo_model_config(tokenizer, n_embd=30, n_head=4)


def test_pretraining_lowers_the_heldout_loss_well_below_uniform(model, config, tokenizer):
    held_out = demo_corpus(200, seed=99)
    torch.manual_seed(0)
    untrained = heldout_loss(transformers.GPT2LMHeadModel(config), tokenizer, held_out)
    uniform = math.log(len(tokenizer))
    assert untrained > 0.9 * uniform  # a fresh model is close to uniform ...
    assert heldout_loss(model, tokenizer, held_out) < 0.7 * uniform  # ... training is not
    assert not model.training


def test_pretraining_never_targets_padding(model, tokenizer):
    # Padding follows <eos> in every short training row: trained on, it would be predicted
    # there with probability ~0.7 after 40 steps.
    batch = tokenizer([f"{s} {tokenizer.eos_token}" for s in demo_corpus(200, seed=99)],
                      padding=True, padding_side="right", return_tensors="pt")
    with torch.no_grad():
        pad_prob = model(**batch).logits.softmax(-1)[..., tokenizer.pad_token_id]
    assert pad_prob[batch["attention_mask"].bool()].max() < 0.1


def test_pretraining_is_bitwise_deterministic_in_its_seed(model, config, tokenizer, corpus):
    again = pretrain_demo_model(config, tokenizer, corpus, steps=PRETRAIN_STEPS, seed=0)
    other = pretrain_demo_model(config, tokenizer, corpus, steps=PRETRAIN_STEPS, seed=1)
    reference = model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in again.state_dict().items())
    assert not all(torch.equal(reference[k], v) for k, v in other.state_dict().items())


def test_pretraining_rejects_sentences_longer_than_the_context(tokenizer, corpus):
    short = demo_model_config(tokenizer, n_positions=8)
    with pytest.raises(ValueError, match="n_positions"):
        pretrain_demo_model(short, tokenizer, corpus, steps=1)


def test_pretrained_model_samples_sentences_that_end(model, tokenizer):
    prompts = demo_prompts(64, seed=7)
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, max_new_tokens=12,
                             pad_token_id=tokenizer.pad_token_id)
    responses = out[:, batch["input_ids"].shape[1]:]
    assert (responses == tokenizer.eos_token_id).any(dim=1).float().mean() > 0.6
