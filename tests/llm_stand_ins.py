"""Local stand-ins for the paper's three worlds: tiny models and datasets written to folders.

Nothing can be downloaded here, so the tests build what a real run loads from the hub:

- :func:`char_tokenizer`: a character-level tokenizer (any English text maps to known ids)
  with a Llama-3-like chat template, built in-process;
- :func:`tiny_llama_folder`: a randomly initialised two-layer Llama policy with that
  tokenizer, as a Hugging Face folder (the Llama-3.2-1B stand-in);
- :func:`tiny_gpt2_folder`: a random two-layer GPT-2 language model with that tokenizer (no
  chat template), the stand-in of the Emotion experiment's GPT-2 before SFT;
- :func:`tiny_classifier_folder`: a GPT-2 sequence classifier with named labels (the
  six-emotion reward classifier's stand-in, before or instead of ``train-reward``);
- :func:`armolike_folder`: a reward model with custom code (``auto_map``) and several heads
  in ``.rewards`` (ArmoRM's stand-in); its code writes a marker file when imported;
- :func:`write_emotion`, :func:`write_helpsteer`, :func:`write_hh`: tiny datasets in the
  three formats (emotion text + label, HelpSteer2 prompt, Anthropic-HH transcripts).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIAL = ["<pad>", "<bos>", "<eos>", "<user>", "<assistant>", "<system>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")
# The chat template marks each turn with its role token and ends it with <eos>; the
# generation prompt opens an assistant turn. The policy's sampled <eos> ends its turn.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                 "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>"
                 "{% endif %}")
EMOTIONS = ["sadness", "joy", "love", "anger", "fear", "surprise"]


def char_tokenizer(*, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus :data:`SPECIAL` tokens.

    A character outside the vocabulary becomes a space, so any text tokenises; decoding fuses
    the characters back into the text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        additional_special_tokens=SPECIAL[3:])
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_folder(folder: Path, *, seed: int = 0, chat_template: bool = True) -> Path:
    """Write a random two-layer, 32-wide Llama causal LM and :func:`char_tokenizer`."""
    tokenizer = char_tokenizer(chat_template=chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_gpt2_folder(folder: Path, *, seed: int = 0, width: int = 32) -> Path:
    """Write a random two-layer GPT-2 causal LM and :func:`char_tokenizer` (no template)."""
    tokenizer = char_tokenizer(chat_template=False)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=width, n_head=2,
                        n_positions=256, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_classifier_folder(folder: Path, labels: list[str] = EMOTIONS, *, seed: int = 0
                           ) -> Path:
    """Write a random two-layer GPT-2 sequence classifier with ``labels`` as its id2label."""
    tokenizer = char_tokenizer(chat_template=False)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2,
                        n_positions=256, num_labels=len(labels),
                        id2label=dict(enumerate(labels)),
                        label2id={name: i for i, name in enumerate(labels)},
                        pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


ARMOLIKE_LABELS = {0: "helpfulness", 1: "safety", 2: "verbosity"}
ARMOLIKE_MODELING = '''
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

Path({marker!r}).write_text("imported")


class ArmoLikeConfig(PretrainedConfig):
    model_type = "armolike"

    def __init__(self, vocab_size=40, hidden_size=8, num_objectives=3, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_objectives = num_objectives
        super().__init__(**kwargs)


@dataclass
class ArmoLikeOutput(ModelOutput):
    rewards: torch.FloatTensor | None = None
    score: torch.FloatTensor | None = None


class ArmoLikeModel(PreTrainedModel):
    """Mean-pooled embeddings -> objective heads, and a gated overall score (as ArmoRM)."""

    config_class = ArmoLikeConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.heads = nn.Linear(config.hidden_size, config.num_objectives)
        self.gate = nn.Linear(config.hidden_size, config.num_objectives)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden = (self.embed(input_ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        rewards = self.heads(hidden)
        score = (rewards * self.gate(hidden).softmax(-1)).sum(-1, keepdim=True)
        return ArmoLikeOutput(rewards=rewards, score=score)
'''


def armolike_folder(folder: Path, marker: Path, tokenizer: PreTrainedTokenizerFast, *,
                    hidden: int = 8, seed: int = 0) -> Path:
    """Write the ArmoRM stand-in (random weights, three objective heads) into ``folder``.

    Its config, as ArmoRM's, names fewer labels (two) than it has objectives (three), and
    maps its classes to ``modeling_armolike.py`` through ``auto_map``.
    """
    folder.mkdir(parents=True)
    (folder / "modeling_armolike.py").write_text(ARMOLIKE_MODELING.format(marker=str(marker)))
    vocab, heads = len(tokenizer), len(ARMOLIKE_LABELS)
    config = {"model_type": "armolike", "architectures": ["ArmoLikeModel"],
              "vocab_size": vocab, "hidden_size": hidden, "num_objectives": heads,
              "id2label": {"0": "helpfulness", "1": "safety"},
              "auto_map": {"AutoConfig": "modeling_armolike.ArmoLikeConfig",
                           "AutoModelForSequenceClassification":
                               "modeling_armolike.ArmoLikeModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(seed)
    weights = {"embed.weight": torch.randn(vocab, hidden, generator=generator),
               "heads.weight": torch.randn(heads, hidden, generator=generator),
               "heads.bias": torch.randn(heads, generator=generator),
               "gate.weight": torch.randn(heads, hidden, generator=generator),
               "gate.bias": torch.zeros(heads)}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------- datasets

_EMOTION_TEXTS = {
    "sadness": ["i feel so alone tonight", "i miss my old friends", "everything feels grey"],
    "joy": ["i am so happy today", "what a wonderful morning", "i feel great and free"],
    "love": ["i adore my little family", "you mean the world to me", "i cherish our talks"],
    "anger": ["i am furious about this", "stop lying to me", "this makes me so mad"],
    "fear": ["i am scared of the dark", "something is wrong here", "i feel nervous now"],
    "surprise": ["i did not expect that", "wow what a twist", "that came out of nowhere"],
}


def _write_table(table: dict[str, list], path: Path) -> Path:
    """Write a column table as .parquet or .jsonl (by ``path``'s suffix)."""
    import pandas as pd

    frame = pd.DataFrame(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=True)
    return path


def write_emotion(path: Path, repeat: int = 1) -> Path:
    """The "emotion" dataset's format: ``text`` and an integer ``label`` (EMOTIONS order)."""
    rows = [(text, label) for label, name in enumerate(EMOTIONS)
            for text in _EMOTION_TEXTS[name]] * repeat
    return _write_table({"text": [t for t, _ in rows], "label": [lab for _, lab in rows]},
                        path)


def write_helpsteer(path: Path) -> Path:
    """HelpSteer2's format: ``prompt``, ``response`` and its five attribute scores."""
    prompts = ["Write a short poem about rain.", "Explain tides to a child.",
               "Give me three tips for sleep.", "What is a prime number?"]
    table: dict[str, list] = {"prompt": prompts, "response": ["ok"] * len(prompts)}
    for attribute in ("helpfulness", "correctness", "coherence", "complexity", "verbosity"):
        table[attribute] = [3] * len(prompts)
    return _write_table(table, path)


def write_hh(path: Path) -> Path:
    """Anthropic-HH's format: ``chosen`` / ``rejected`` transcripts."""
    chosen = ["\n\nHuman: hi, how are you?\n\nAssistant: good, thanks!",
              "\n\nHuman: tell me a joke\n\nAssistant: why did the cat sit?\n\nHuman: why?"
              "\n\nAssistant: to be warm.",
              "\n\nHuman: how do i bake bread?\n\nAssistant: flour, water, yeast.",
              "\n\nHuman: is the sea salty?\n\nAssistant: yes."]
    return _write_table({"chosen": chosen, "rejected": [c + " no" for c in chosen]}, path)
