"""The embedded default world of the offline LLM demo: a toy language, its objectives, a model.

The demo fine-tunes a tiny GPT-2 policy with (DRO-)REBEL towards a mixture of rule-based
objectives, on one CPU and without downloading anything. This module builds everything that
run needs in-process:

* :data:`OBJECTIVES` -- four named word lists ("joy", "calm", "anger", "formal"). A rule-based
  reward scores a response by the fraction of its words that lie in one list.
* :func:`demo_corpus` -- English-like sentences from a small template grammar,

      [opener] determiner [description] person  verb  determiner [adjective] thing
      [adverb] [tail] .

  Each sentence has a *tone*: neutral most often, otherwise one of the objectives. The tone
  fills the emotional slots (verb, object adjective, adverb, "and felt ..." tail) with that
  objective's words, so a model fitted to the corpus writes mostly neutral sentences, yet
  every objective is reachable: RL has room to move and rewards vary between samples.
* :func:`demo_prompts` -- sentence beginnings ("the old man", "today my friend"). They end
  before the first emotional slot, so a prompt never fixes the tone of its response.
* :func:`train_demo_tokenizer`, :func:`demo_model_config`, :func:`pretrain_demo_model` --
  a word-level tokenizer, a 2-layer GPT-2 configuration and a short causal-LM pretraining
  run on the corpus (about ten seconds on one CPU thread), the reference policy of the demo.
* :func:`build_demo_base` -- all three, saved once as a Hugging Face folder: the concrete
  ``model`` a ``model: demo`` run (:mod:`drosim.llm.recipes.trainer`) and the demo's runs
  (:mod:`drosim.llm.recipes.demo`) load.

Everything is deterministic in its seed: the grammar draws from ``random.Random(seed)`` and
pretraining from ``torch.manual_seed(seed)`` and a seeded ``torch.Generator``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm

__all__ = [
    "OBJECTIVES",
    "build_demo_base",
    "demo_corpus",
    "demo_model_config",
    "demo_prompts",
    "pretrain_demo_model",
    "train_demo_tokenizer",
]

# ----------------------------------------------------------------------------- vocabulary

# An objective's words by grammatical slot: verbs are past-tense transitive, adjectives must
# read after "the" and after "and felt", adverbs close the verb phrase.
_OBJECTIVE_SLOTS: dict[str, dict[str, tuple[str, ...]]] = {
    "joy": {
        "verb": ("hugged", "celebrated", "welcomed", "cherished", "admired"),
        "adjective": ("happy", "joyful", "delighted", "cheerful", "wonderful", "bright",
                      "glad", "merry", "lovely", "sunny"),
        "adverb": ("happily", "joyfully", "cheerfully", "gladly", "merrily"),
    },
    "calm": {
        "verb": ("soothed", "cradled", "eased", "tended", "smoothed"),
        "adjective": ("calm", "peaceful", "quiet", "serene", "gentle", "relaxed", "tranquil",
                      "still", "soft", "restful"),
        "adverb": ("calmly", "peacefully", "quietly", "gently", "softly"),
    },
    "anger": {
        "verb": ("kicked", "slammed", "smashed", "cursed", "shoved"),
        "adjective": ("angry", "furious", "bitter", "hostile", "annoyed", "irritated",
                      "outraged", "cruel", "resentful", "enraged"),
        "adverb": ("angrily", "furiously", "bitterly", "harshly", "rudely"),
    },
    "formal": {
        "verb": ("acknowledged", "requested", "reviewed", "submitted", "approved"),
        "adjective": ("appropriate", "formal", "esteemed", "official", "adequate", "respectful",
                      "obliged", "satisfactory", "proper", "honored"),
        "adverb": ("respectfully", "accordingly", "sincerely", "duly", "formally"),
    },
}

OBJECTIVES: dict[str, frozenset[str]] = {
    name: frozenset(word for words in slots.values() for word in words)
    for name, slots in _OBJECTIVE_SLOTS.items()
}
"""The demo's objectives: name -> its word list (lower case, lists pairwise disjoint).

A rule-based reward scores a response by the fraction of its words in one list; no neutral
word of the grammar is in any list.

Example:
    >>> sorted(OBJECTIVES)
    ['anger', 'calm', 'formal', 'joy']
    >>> "happily" in OBJECTIVES["joy"], "the" in OBJECTIVES["joy"]
    (True, False)
"""

# The neutral tone fills the same emotional slots with words no objective rewards.
_NEUTRAL_SLOTS: dict[str, tuple[str, ...]] = {
    "verb": ("saw", "found", "carried", "opened", "watched", "painted", "moved", "visited",
             "cleaned", "fixed", "held", "bought"),
    "adjective": ("wooden", "small", "red", "blue", "round", "heavy", "green", "large",
                  "plain", "brown"),
    "adverb": ("again", "twice", "early", "quickly", "together"),
}
# "and felt <adjective>" after a neutral verb phrase: states, not emotions.
_NEUTRAL_FEELINGS = ("tired", "hungry", "cold", "sleepy", "busy", "ready")

# The sentence frame, shared by every tone (and so by every prompt).
_OPENERS = ("today", "yesterday", "tonight", "then", "later")
_DETERMINERS = ("the", "my", "our", "this", "his", "her")
_DESCRIPTIONS = ("old", "young", "tall", "little", "local")
_PEOPLE = ("man", "woman", "friend", "teacher", "child", "farmer", "student", "doctor",
           "neighbor", "baker", "driver", "sister", "brother")
_THINGS = ("door", "letter", "garden", "window", "book", "table", "road", "house", "box",
           "car", "bread", "chair", "basket", "boat")
_PLACES = ("at home", "in town", "at school", "near the river", "in the park",
           "at the market")

# Half the sentences are neutral and each objective tones an eighth of them: each objective's
# list holds about 3.5% of the corpus words and 5% of the words a pretrained model appends to
# a prompt -- rare enough for RL to have room, frequent enough for rewards to vary.
_NEUTRAL_TONE_PROB = 0.5
_TONES = tuple(_OBJECTIVE_SLOTS)
_SLOT_PROB = {"opener": 0.3, "description": 0.5, "adjective": 0.6, "adverb": 0.5}
_TAIL_PROBS = {"place": 0.3, "feeling": 0.35}  # otherwise no tail


# ------------------------------------------------------------------------------- grammar

def _subject(rng: random.Random) -> list[str]:
    """The tone-free sentence beginning: [opener] determiner [description] person.

    An opener and a description never come together, which caps a sentence at 11 words
    before its final "." (12 tokens).
    """
    words = []
    opener = rng.random() < _SLOT_PROB["opener"]
    if opener:
        words.append(rng.choice(_OPENERS))
    words.append(rng.choice(_DETERMINERS))
    if not opener and rng.random() < _SLOT_PROB["description"]:
        words.append(rng.choice(_DESCRIPTIONS))
    words.append(rng.choice(_PEOPLE))
    return words


def _predicate(rng: random.Random, tone: str | None) -> list[str]:
    """verb determiner [adjective] thing [adverb] [tail], emotional slots in ``tone``.

    ``tone`` None is the neutral tone.
    """
    slots = _NEUTRAL_SLOTS if tone is None else _OBJECTIVE_SLOTS[tone]
    feelings = _NEUTRAL_FEELINGS if tone is None else slots["adjective"]
    words = [rng.choice(slots["verb"]), rng.choice(_DETERMINERS)]
    if rng.random() < _SLOT_PROB["adjective"]:
        words.append(rng.choice(slots["adjective"]))
    words.append(rng.choice(_THINGS))
    if rng.random() < _SLOT_PROB["adverb"]:
        words.append(rng.choice(slots["adverb"]))
    u = rng.random()
    if u < _TAIL_PROBS["place"]:
        words.extend(rng.choice(_PLACES).split())
    elif u < _TAIL_PROBS["place"] + _TAIL_PROBS["feeling"]:
        words.extend(["and", "felt", rng.choice(feelings)])
    return words


def _sentence(rng: random.Random) -> str:
    """One corpus sentence: a subject, a predicate in a random tone, and " ."."""
    subject = _subject(rng)
    tone = None if rng.random() < _NEUTRAL_TONE_PROB else rng.choice(_TONES)
    return " ".join([*subject, *_predicate(rng, tone), "."])


def demo_corpus(num_sentences: int, seed: int = 0) -> list[str]:
    """Sentences of the demo language, the pretraining corpus of the demo's reference policy.

    Every sentence is lower case, has 5 to 11 words followed by a " ." token, and separates
    its tokens by single spaces. Half the sentences are neutral; the rest use one objective's
    words in their emotional slots, so a large corpus contains every objective word.

    Args:
        num_sentences: how many sentences to generate.
        seed: seed of the ``random.Random`` that draws them.

    Returns:
        ``num_sentences`` sentences; the same seed gives the same list.

    Raises:
        ValueError: if ``num_sentences`` is negative.

    Example:
        >>> corpus = demo_corpus(3, seed=0)
        >>> len(corpus), all(s.endswith(" .") for s in corpus)
        (3, True)
        >>> corpus == demo_corpus(3, seed=0)
        True
    """
    if num_sentences < 0:
        raise ValueError(f"num_sentences must be >= 0, got {num_sentences}")
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(num_sentences)]


def demo_prompts(num_prompts: int, seed: int = 0) -> list[str]:
    """Prompts of the demo: sentence beginnings of 2 or 3 words from the corpus grammar.

    A prompt is the subject of a sentence ("the old man", "today my friend"); it stops
    before the first emotional slot, so every objective remains a likely continuation.
    Callers draw train and evaluation prompts with different seeds.

    Args:
        num_prompts: how many prompts to generate (repeats are possible).
        seed: seed of the ``random.Random`` that draws them.

    Returns:
        ``num_prompts`` prompts; the same seed gives the same list.

    Raises:
        ValueError: if ``num_prompts`` is negative.

    Example:
        >>> prompts = demo_prompts(4, seed=1)
        >>> all(2 <= len(p.split()) <= 3 for p in prompts), prompts == demo_prompts(4, seed=1)
        (True, True)
    """
    if num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
    rng = random.Random(seed)
    return [" ".join(_subject(rng)) for _ in range(num_prompts)]


# ----------------------------------------------------------------------- tokenizer, model

_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>",
                   "unk_token": "<unk>"}


def train_demo_tokenizer(corpus: Sequence[str]) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer fitted to ``corpus``, ready for GPT-2 training and generation.

    Every encoded text starts with "<bos>" (a prompt always has a token to condition on) and
    batches are padded on the left (prompts end where generation starts). The special tokens
    "<pad>", "<bos>", "<eos>", "<unk>" have ids 0 to 3.

    Args:
        corpus: the sentences whose words make the vocabulary.

    Returns:
        The tokenizer; ``decode(encode(s), skip_special_tokens=True) == s`` for every
        sentence ``s`` of ``corpus``, and it saves and loads with ``save_pretrained`` /
        ``from_pretrained``.

    Raises:
        ValueError: if ``corpus`` is empty.

    Example:
        >>> tok = train_demo_tokenizer(["the old man saw the door ."])
        >>> ids = tok("the old man")["input_ids"]
        >>> tok.convert_ids_to_tokens(ids)
        ['<bos>', 'the', 'old', 'man']
        >>> tok.decode(ids, skip_special_tokens=True)
        'the old man'
    """
    if not corpus:
        raise ValueError("corpus must contain at least one sentence")
    specials = list(_SPECIAL_TOKENS.values())
    tokenizer = Tokenizer(models.WordLevel(unk_token=_SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(corpus, trainer=trainers.WordLevelTrainer(
        special_tokens=specials))
    bos = _SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tokenizer.token_to_id(bos))])
    # No decoder: tokenizers then joins tokens with single spaces, the exact inverse of
    # splitting a corpus sentence on its single spaces.
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        padding_side="left",
        # GPT-2 adds the embedding of any token_type_ids it is given to its inputs; older
        # transformers returned them by default and would shift every hidden state.
        model_input_names=["input_ids", "attention_mask"],
        **_SPECIAL_TOKENS,
    )


def demo_model_config(tokenizer: transformers.PreTrainedTokenizerBase, *, n_layer: int = 2,
                      n_embd: int = 64, n_head: int = 4,
                      n_positions: int = 64) -> transformers.GPT2Config:
    """A small GPT-2 configuration for ``tokenizer``'s vocabulary, without dropout.

    Dropout is off so that training and log-probabilities are exactly reproducible, and
    finite differences of a loss see the same function at every evaluation.

    Args:
        tokenizer: the demo tokenizer; gives the vocabulary size and special token ids.
        n_layer: transformer blocks.
        n_embd: width of the residual stream (a multiple of ``n_head``).
        n_head: attention heads per block.
        n_positions: longest sequence (prompt plus response, with "<bos>") the model reads.

    Returns:
        A ``GPT2Config`` with tied input and output embeddings.

    Raises:
        ValueError: if ``n_embd`` is not a multiple of ``n_head``, or the tokenizer lacks a
            "<bos>", "<eos>" or "<pad>" token.

    Example:
        >>> tok = train_demo_tokenizer(demo_corpus(50))
        >>> cfg = demo_model_config(tok)
        >>> cfg.vocab_size == len(tok), cfg.pad_token_id, cfg.resid_pdrop
        (True, 0, 0.0)
    """
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    special_ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if None in special_ids:
        raise ValueError("the tokenizer needs bos, eos and pad tokens")
    return transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


# ---------------------------------------------------------------------------- pretraining

def _causal_lm_batch(tokenizer: transformers.PreTrainedTokenizerBase,
                     corpus: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sentence as "<bos> sentence <eos>", right-padded to one ``(N, L)`` tensor.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (``input_ids`` with -100 on padding,
        so the loss ignores it). Right padding puts every sentence at positions 0, 1, ..., so
        the model's default position ids are right for every row.
    """
    texts = [f"{sentence} {tokenizer.eos_token}" for sentence in corpus]  # <bos> comes first
    batch = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each token given the ones before it, skipping labels of -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=-100)


def pretrain_demo_model(config: transformers.GPT2Config,
                        tokenizer: transformers.PreTrainedTokenizerBase,
                        corpus: Sequence[str], *, steps: int = 300, batch_size: int = 32,
                        lr: float = 3e-3, seed: int = 0,
                        progress: bool = False) -> transformers.GPT2LMHeadModel:
    """A GPT-2 trained from scratch as a causal LM on ``corpus``: the demo's reference policy.

    AdamW with a 10% linear warm-up and cosine decay; each step draws ``batch_size``
    sentences uniformly with replacement. With the default sizes, 300 steps on a 2000-sentence
    corpus take about ten seconds on one CPU thread.

    Args:
        config: the model configuration, e.g. from :func:`demo_model_config`.
        tokenizer: the tokenizer the configuration was built for.
        corpus: training sentences, e.g. from :func:`demo_corpus`.
        steps: optimiser steps.
        batch_size: sentences per step.
        lr: peak learning rate.
        seed: seeds the initial weights and the batch draws; on CPU the same seed gives
            bitwise the same model.
        progress: show a tqdm progress bar with the running loss.

    Returns:
        The trained ``GPT2LMHeadModel``, on CPU, in eval mode.

    Raises:
        ValueError: if ``steps`` or ``batch_size`` is below 1, ``corpus`` is empty, or a
            sentence with "<bos>" and "<eos>" is longer than ``config.n_positions``.

    Example:
        >>> corpus = demo_corpus(64)
        >>> tok = train_demo_tokenizer(corpus)
        >>> model = pretrain_demo_model(demo_model_config(tok), tok, corpus, steps=2)
        >>> model.training
        False
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if not corpus:
        raise ValueError("corpus must contain at least one sentence")
    input_ids, attention_mask, labels = _causal_lm_batch(tokenizer, corpus)
    if input_ids.shape[1] > config.n_positions:
        raise ValueError(f"a sentence has {input_ids.shape[1]} tokens with <bos> and <eos>, "
                         f"more than n_positions = {config.n_positions}")

    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = transformers.get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=math.ceil(0.1 * steps), num_training_steps=steps)
    # Batches come from their own generator, so they do not depend on how much of the global
    # stream model construction consumed.
    generator = torch.Generator().manual_seed(seed)

    bar = tqdm(range(steps), desc="pretrain", disable=not progress)
    for _ in bar:
        rows = torch.randint(len(corpus), (batch_size,), generator=generator)
        logits = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).logits
        loss = _next_token_loss(logits, labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if progress:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def build_demo_base(path: str | Path, *, seed: int = 0, corpus_size: int = 4000,
                    pretrain_steps: int = 300, progress: bool = False) -> Path:
    """Pre-train the demo's base policy and tokenizer into ``path``, once: an existing base
    is reused.

    The folder is written whole or not at all (staged beside ``path``, then renamed).

    Args:
        path: the Hugging Face folder to write.
        seed: seeds the corpus and the pretraining.
        corpus_size: sentences of :func:`demo_corpus`.
        pretrain_steps: optimiser steps of :func:`pretrain_demo_model`.
        progress: show transformers' and the pretraining's progress bars.

    Returns:
        ``path``.
    """
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    if not progress:
        hf_logging.disable_progress_bar()
    corpus = demo_corpus(corpus_size, seed=seed)
    tokenizer = train_demo_tokenizer(corpus)
    model = pretrain_demo_model(demo_model_config(tokenizer), tokenizer, corpus,
                                steps=pretrain_steps, seed=seed, progress=progress)
    staging = path.with_name(path.name + ".tmp")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.replace(path)
    return path
