"""Reward models with custom code and several output heads (as ArmoRM): the refusals (custom
code without trust_remote_code, missing weights, a wrong output attribute or head), the head
selection, chat-formatted scoring and a training run on such a model.

The ArmoRM stand-in is a folder written by hand (config.json with ``auto_map``, weights as
safetensors, ``modeling_armolike.py``), so the test process never imports its code itself:
the module writes a marker file when imported, which shows whether ``transformers`` ran it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


# ------------------------------------------------------------ reward_batch_size, sorting

# Texts of very different lengths, so that batching in order of length pads less.
LONG_AND_SHORT = (["a", "a long prompt of many characters", "b", "another long prompt here",
                   "c", "mid prompt", "d"], ["x", "a long response", "y", "z", "also long w",
                                             "q", "r"])


def padded_widths(reward: SequenceClassifierReward, monkeypatch) -> list[tuple[int, int]]:
    """The ``(rows, width)`` of every forward the reward model runs on LONG_AND_SHORT."""
    shapes = []
    forward = reward.model.forward

    def recording(input_ids, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return forward(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(reward.model, "forward", recording)
    reward(*LONG_AND_SHORT)
    return shapes


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return stand_ins.tiny_classifier_folder(tmp_path_factory.mktemp("classifier") / "c")


@pytest.fixture(scope="module")
def left_padded_classifier(tmp_path_factory) -> Path:
    """The classifier with a tokenizer that pads on the left (as a policy's does)."""
    folder = stand_ins.tiny_classifier_folder(tmp_path_factory.mktemp("left") / "c")
    config_file = folder / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "padding_side": "left"}))
    return folder


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("sort_by_length", [False, True])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_scores_do_not_depend_on_the_batch_size_or_sorting(classifier, left_padded_classifier,
                                                           batch_size, sort_by_length,
                                                           padding_side):
    folder = classifier if padding_side == "right" else left_padded_classifier
    alone = SequenceClassifierReward(folder, batch_size=1, sort_by_length=False)
    reward = SequenceClassifierReward(folder, batch_size=batch_size,
                                      sort_by_length=sort_by_length)
    assert reward.tokenizer.padding_side == padding_side
    expected = alone(*LONG_AND_SHORT)  # one text per forward: no padding at all
    torch.testing.assert_close(reward(*LONG_AND_SHORT), expected, atol=1e-5, rtol=0)
    # the rows are the callers' order: each differs from the others
    assert len({tuple(row.tolist()) for row in expected}) == len(expected)


def test_sorting_by_length_pads_less(classifier, monkeypatch):
    shapes = {}
    for sort in (False, True):
        reward = SequenceClassifierReward(classifier, batch_size=2, sort_by_length=sort)
        shapes[sort] = padded_widths(reward, monkeypatch)
    assert [rows for rows, _ in shapes[True]] == [2, 2, 2, 1]  # batch_size texts a forward
    widths = [width for _, width in shapes[True]]
    assert widths == sorted(widths, reverse=True)  # the longest first
    padded = {sort: sum(rows * width for rows, width in s) for sort, s in shapes.items()}
    assert padded[True] < padded[False]


def test_reward_batch_size_reaches_the_reward_model(classifier, tmp_path, monkeypatch):
    from drosim.llm.components.config import bundled_config_path, load_config
    from drosim.llm.recipes.trainer import load_reward_model

    config = load_config(bundled_config_path("smoke"), [
        f"reward={classifier}", "reward_batch_size=3", f"out_dir={tmp_path}"])
    reward = load_reward_model(config, "cpu")
    assert reward.batch_size == 3
    assert [rows for rows, _ in padded_widths(reward, monkeypatch)] == [3, 3, 1]
    default = load_config(bundled_config_path("smoke"), [f"reward={classifier}"])
    assert load_reward_model(default, "cpu").batch_size == default.reward_batch_size


@pytest.mark.parametrize("override, match", [
    ("reward_batch_size=0", "reward_batch_size must be >= 1, got 0"),
    ("reward_batch_size=-4", "reward_batch_size must be >= 1, got -4"),
    ("reward_batch_size=2.5", "reward_batch_size: expected an integer"),
    ("reward_batch_size=true", "reward_batch_size: expected an integer"),
])
def test_a_bad_reward_batch_size_is_refused_at_load(override, match):
    from drosim.llm.components.config import bundled_config_path, load_config

    with pytest.raises(ValueError, match=match):
        load_config(bundled_config_path("smoke"), [override])


def test_a_reward_model_refuses_a_batch_size_below_one(classifier):
    with pytest.raises(ValueError, match="reward_batch_size must be >= 1, got 0"):
        SequenceClassifierReward(classifier, batch_size=0)


def test_the_batch_bench_times_every_setting_and_agrees_with_unbatched_scores(tmp_path):
    out = tmp_path / "reward_batch.md"
    bench = Path(__file__).resolve().parents[1] / "bench" / "reward_batch.py"
    subprocess.run([sys.executable, str(bench), "--quick", "--out", str(out)], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert [(int(r[0].split()[0]), r[1].strip()) for r in rows] == [
        (b, sort) for b in (8, 16, 32, 64, 128) for sort in ("no", "yes")]
    assert all(float(r[-1]) < 1e-5 for r in rows)  # batching changes no score
    assert sum("(fastest)" in r[0] for r in rows) == 1
