"""Reward models with custom code and several output heads (as ArmoRM): the refusals (custom
code without trust_remote_code, missing weights, a wrong output attribute or head), the head
selection, chat-formatted scoring and a training run on such a model.

The ArmoRM stand-in is a folder written by hand (config.json with ``auto_map``, weights as
safetensors, ``modeling_armolike.py``), so the test process never imports its code itself:
the module writes a marker file when imported, which shows whether ``transformers`` ran it.
"""

from __future__ import annotations

import json
from pathlib import Path

import llm_stand_ins as stand_ins
import pytest
import torch
from llm_helpers import tiny_config, tiny_tokenizer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, GPT2ForSequenceClassification

from drosim.llm.cli import main
from drosim.llm.components.rewards import SequenceClassifierReward, score

LABELS = stand_ins.ARMOLIKE_LABELS
HIDDEN = 8
# Words of the tiny tokenizer's vocabulary, so every token is a known one.
CHAT_TEMPLATE = "{% for m in messages %}[BOS] {{ m['content'] }} [EOS] {% endfor %}"
PROMPTS = ["w3 w4", "w5", "w6 w7 w8", "w9"]
RESPONSES = ["w10", "w11 w12 w13 w14", "w15", ""]

def armolike_folder(folder: Path, marker: Path, *, chat: bool = False) -> Path:
    """The ArmoRM stand-in (three objective heads in ``rewards``) over the tiny word-level
    vocabulary, with a chat template when ``chat``."""
    tokenizer = tiny_tokenizer()
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return stand_ins.armolike_folder(folder, marker, tokenizer, hidden=HIDDEN)


@pytest.fixture(scope="module")
def armolike(tmp_path_factory) -> Path:
    """One trusted stand-in for the tests that load it (its code runs)."""
    root = tmp_path_factory.mktemp("trusted")
    return armolike_folder(root / "armolike_trusted", root / "imported")


def own_outputs(folder: Path, texts: list[str], *, special: bool = True):
    """The stand-in's own output on each text alone (no padding)."""
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    tokenizer = tiny_tokenizer()
    with torch.no_grad():
        outputs = [model(input_ids=tokenizer(t, return_tensors="pt",
                                             add_special_tokens=special)["input_ids"])
                   for t in texts]
    return (torch.cat([o.rewards for o in outputs]), torch.cat([o.score for o in outputs]))


def test_custom_code_is_refused_without_trust_and_never_imported(tmp_path, capsys):
    marker = tmp_path / "imported"
    folder = armolike_folder(tmp_path / "armolike_untrusted", marker)
    with pytest.raises(ValueError, match=r"ships custom code .* trust_remote_code=true"):
        SequenceClassifierReward(folder)
    # the trainer refuses it as a reward model or as the policy, before writing anything
    for key in ("reward", "model"):
        out = tmp_path / "out"
        assert main(["train", "--config", "smoke", f"{key}={folder}",
                     f"out_dir={out}"]) == 2
        assert f"{key}='{folder}' ships custom code" in capsys.readouterr().err
        assert not out.exists()
    assert not marker.exists(), "the folder's code was imported"


def test_a_tokenizer_with_custom_code_is_refused_without_trust(tmp_path, capsys):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}}))
    assert main(["train", "--config", "smoke", f"tokenizer={tokenizer}",
                 f"out_dir={tmp_path / 'out'}"]) == 2
    assert f"tokenizer='{tokenizer}' ships custom code" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{broken", "[1, 2]"])
def test_a_corrupt_config_file_is_named(tmp_path, capsys, text):
    folder = tmp_path / "reward"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    out = tmp_path / "out"
    assert main(["train", "--config", "smoke", f"reward={folder}", f"out_dir={out}"]) == 2
    assert "config.json is not a JSON object" in capsys.readouterr().err
    assert not out.exists()


def test_trusted_heads_are_the_models_own_rewards(armolike):
    reward = SequenceClassifierReward(armolike, trust_remote_code=True, output="rewards",
                                      heads={"helpfulness": 0, "safety": "safety",
                                             "verbosity": 2}, batch_size=3)
    assert reward.objectives == ("helpfulness", "safety", "verbosity")
    rewards, overall = own_outputs(armolike, [f"{p} {r}" for p, r in
                                              zip(PROMPTS, RESPONSES, strict=True)])
    torch.testing.assert_close(score(reward, PROMPTS, RESPONSES), rewards)
    # the gated overall score, (batch, 1), as one objective
    overall_reward = SequenceClassifierReward(armolike, trust_remote_code=True,
                                              output="score", heads={"overall": 0})
    torch.testing.assert_close(score(overall_reward, PROMPTS, RESPONSES), overall)


def test_heads_default_to_the_configs_labels(armolike):
    reward = SequenceClassifierReward(armolike, trust_remote_code=True, output="rewards")
    assert reward.objectives == ("helpfulness", "safety")
    assert score(reward, PROMPTS, RESPONSES).shape == (4, 2)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(output="logits"), r"reward_output='logits': .* no such tensor; it has "
                            r"\['rewards', 'score'\]"),
    (dict(output="rewards", heads={"x": 3}), r"head 3 is out of range; the output 'rewards' "
                                             r"has 3 heads \(0 to 2\)"),
    (dict(output="rewards", heads={"x": -1}), r"head -1 is out of range"),
    (dict(output="rewards", heads={"x": "joy"}), r"reward_heads\['x'\] = 'joy' is not a label "
                                                 r"of the reward model; its id2label names "
                                                 r"\['helpfulness', 'safety'\]"),
])
def test_a_wrong_output_or_head_is_refused_at_load(armolike, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SequenceClassifierReward(armolike, trust_remote_code=True, **kwargs)


def test_a_chat_template_formats_the_conversation(tmp_path):
    folder = armolike_folder(tmp_path / "armolike_chat", tmp_path / "imported", chat=True)
    reward = SequenceClassifierReward(folder, trust_remote_code=True, output="rewards",
                                      heads={"helpfulness": 0, "safety": 1})
    texts = reward.format(PROMPTS, RESPONSES)
    assert texts[0] == "[BOS] w3 w4 [EOS] [BOS] w10 [EOS] "
    rewards, _ = own_outputs(folder, texts, special=False)
    torch.testing.assert_close(score(reward, PROMPTS, RESPONSES), rewards[:, :2])


def test_missing_head_weights_are_refused(tmp_path):
    labels = {0: "a", 1: "b"}
    config = tiny_config(num_labels=2, id2label=labels,
                         label2id={v: k for k, v in labels.items()})
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    weights_file = tmp_path / "model.safetensors"
    weights = load_file(str(weights_file))
    del weights["score.weight"]  # a base model without the reward head
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 weights are missing .* \(score\.weight\)"):
        SequenceClassifierReward(tmp_path)


def test_training_on_a_custom_multi_head_reward_model(armolike, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", "smoke", f"reward={armolike}", "trust_remote_code=true",
                 "reward_output=rewards", "reward_heads={joy: 0, calm: 1}", "iterations=1",
                 "train_mixture={joy: 0.5, calm: 0.5}",
                 "eval_mixtures=[{joy: 1.0}, {calm: 1.0}]", f"out_dir={out}"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "objective/joy" in r]
    assert evaluated and "objective/calm" in evaluated[-1]
