"""Input validation of the LLM side (issue 18): what the config, the data loaders, the reward
model and the command line refuse, each in one line that names the key, file or row, and
before anything is written (every refusal compares the folder tree and its bytes before and
after). Tiny models are built in-process; nothing is downloaded."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path

import pytest
import torch
from llm_helpers import tiny_config, tiny_tokenizer
from transformers import GPT2ForSequenceClassification

from drosim.llm.cli import main
from drosim.llm.components.config import (
    TrainConfig,
    bundled_config_names,
    bundled_config_path,
    check_token_ids,
    load_config,
    validate_config,
)
from drosim.llm.components.data import check_split, load_prompts, read_table
from drosim.llm.components.rewards import CallableReward, NormalizedReward, SequenceClassifierReward

DEMO = load_config(bundled_config_path("demo"))
SMOKE = str(bundled_config_path("smoke"))


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (``None`` for a folder)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def refused(capsys, root: Path, argv: list[str]) -> str:
    """Run ``drosim-llm argv``; assert exit status 2, one line on stderr and ``root``
    unchanged; return that line."""
    before = tree(root)
    capsys.readouterr()  # what the test's own set-up printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("drosim-llm: error: ") and err.count("\n") == 1, err
    assert tree(root) == before, "a refusal may not create or change anything"
    return err


def train_argv(tmp_path: Path, *overrides: str, config: str = SMOKE) -> list[str]:
    return ["train", "--config", config, f"out_dir={tmp_path / 'run'}", *overrides]


# ------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("key", ["eta", "temperature", "lr"])
def test_an_infinite_step_size_temperature_or_lr_is_refused_by_name(capsys, tmp_path, key):
    err = refused(capsys, tmp_path, train_argv(tmp_path, f"{key}=.inf"))
    assert f"{key} must be a finite number, got inf" in err


# The radii are validated by their drosim.dro sets (an infinite chi2 / KL radius is the max).
METHOD_KEYS = {"chi2_rho", "kl_rho", "kl_tau", "w_rho", "w_p", "protect_fraction"}
FLOAT_KEYS = [name for name, hint in typing.get_type_hints(TrainConfig).items()
              if name not in METHOD_KEYS
              and (hint is float or (typing.get_origin(hint) is types.UnionType
                                     and float in typing.get_args(hint)))]


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_nan_and_infinity(key):
    assert {"eta", "lr", "temperature", "top_p", "lora_alpha"} <= set(FLOAT_KEYS)
    for value in (math.nan, math.inf, -math.inf):
        if key == "max_grad_norm" and value == math.inf:
            continue  # no clipping: the one float key where infinity means something
        with pytest.raises(ValueError, match=f"^{key} must be a finite number, got"):
            validate_config(dataclasses.replace(DEMO, **{key: value}))


def test_an_infinite_max_grad_norm_means_no_clipping_and_is_accepted():
    assert load_config(bundled_config_path("demo"), ["max_grad_norm=.inf"]).max_grad_norm \
        == math.inf


def test_a_warmup_longer_than_the_run_is_refused(capsys, tmp_path):
    err = refused(capsys, tmp_path, train_argv(tmp_path, "iterations=3",
                                               "warmup_iterations=4"))
    assert "warmup_iterations must be <= iterations (3)" in err
    assert load_config(SMOKE, ["iterations=3", "warmup_iterations=3"]).warmup_iterations == 3


def test_a_duplicate_yaml_key_names_the_key_the_file_and_both_lines(capsys, tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text(f"lr: 0.1\n# a comment\nseed: 1\nlr: 0.2\nout_dir: {tmp_path / 'run'}\n")
    err = refused(capsys, tmp_path, ["train", "--config", str(config)])
    assert f"{config}: duplicate key 'lr' (lines 1 and 4)" in err


def test_duplicate_keys_inside_a_mapping_or_an_override_are_refused(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("train_mixture:\n  joy: 1.0\n  joy: 0.5\n")
    with pytest.raises(ValueError, match=r"nested\.yaml: duplicate key 'joy' \(lines 2 and 3\)"):
        load_config(nested)
    with pytest.raises(ValueError, match=re.escape("override 'train_mixture={joy: 1, joy: 2}': "
                                                   "duplicate key 'joy'")):
        load_config(SMOKE, ["train_mixture={joy: 1, joy: 2}"])


def test_a_merge_key_may_still_be_overridden(tmp_path):
    # YAML's merge (<<) brings keys in that the mapping may override: not a duplicate.
    merged = tmp_path / "merged.yaml"
    merged.write_text("model: demo\nprompts: demo\neval_prompts: demo\nreward: demo\n"
                      "train_mixture: &base {joy: 1.0, calm: 2.0}\n"
                      "eval_mixtures: [{<<: *base, calm: 0.0}]\n")
    assert load_config(merged).eval_mixtures == [{"joy": 1.0, "calm": 0.0}]


def test_stop_token_ids_beyond_the_vocabulary_are_refused():
    config = dataclasses.replace(DEMO, stop_token_ids=[2, 39])
    check_token_ids(config, vocab_size=40)  # the last id is a token
    check_token_ids(dataclasses.replace(DEMO, stop_token_ids=None), vocab_size=1)
    with pytest.raises(ValueError, match=r"^stop_token_ids: 40 is not a token id of the "
                                         r"tokenizer \(its ids are 0 to 39\)"):
        check_token_ids(dataclasses.replace(DEMO, stop_token_ids=[2, 40]), vocab_size=40)


def test_a_binary_config_file_is_named(capsys, tmp_path):
    config = tmp_path / "weights.yaml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    err = refused(capsys, tmp_path, ["train", "--config", str(config)])
    assert f"config: {config} is not a UTF-8 text file (byte 0 is 0x89)" in err


# -------------------------------------------------------------------------------------- data

def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("name", ["p.jsonl", "p.txt"])
def test_a_single_file_has_only_the_train_split(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        _jsonl(path, [{"prompt": "a"}, {"prompt": "b"}])
    else:
        path.write_text("a\nb\n")
    before = tree(tmp_path)
    message = re.escape(f"{path} is a single file, whose only split is 'train' (as datasets "
                        "names it), not 'test'")
    with pytest.raises(ValueError, match=f"^prompts: {message}"):
        load_prompts(str(path), split="test")
    with pytest.raises(ValueError, match=r"^training data: .*only split is 'train'"):
        read_table(str(path), split="test")
    assert load_prompts(str(path)) == ["a", "b"]  # the one split it has
    check_split("org/hub-set", "test", what="prompts")  # a hub name has its own splits
    assert tree(tmp_path) == before


def _causal_lm_folder(folder: Path) -> Path:
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel(tiny_config()).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_sft_split_test_on_a_jsonl_is_refused_before_training(capsys, tmp_path):
    model = _causal_lm_folder(tmp_path / "model")
    data = _jsonl(tmp_path / "train.jsonl", [{"text": "w3 w4"}, {"text": "w5 w6"}])
    err = refused(capsys, tmp_path, ["sft", "--model", str(model), "--data", str(data),
                                     "--out", str(tmp_path / "out"), "--split", "test"])
    assert f"training data: {data} is a single file, whose only split is 'train'" in err


@pytest.mark.parametrize("command", ["sft", "train-reward"])
def test_training_data_errors_speak_of_training_data(capsys, tmp_path, command):
    missing = tmp_path / "nowhere.jsonl"
    err = refused(capsys, tmp_path, [command, "--model", str(tmp_path / "m"), "--data",
                                     str(missing), "--out", str(tmp_path / "out")])
    assert f"training data: the file {missing} does not exist" in err
    assert "prompt" not in err


@pytest.mark.parametrize("blank", ["", "   "])
def test_an_empty_prompt_is_refused_by_row(tmp_path, blank):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": blank}])
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=r"p\.jsonl field 'prompt': row 1: the prompt is "
                                         "empty; remove the row or give it a text"):
        load_prompts(str(path))
    assert tree(tmp_path) == before


@pytest.mark.parametrize(("rows", "overrides", "message"), [
    (["fine", ""], (), "field 'prompt': row 1: the prompt is empty"),
    (["fine"], ("prompt_split=test",), "prompts: {path} is a single file, whose only split is"),
])
def test_train_refuses_empty_prompts_and_a_files_missing_split_before_writing(
        capsys, tmp_path, rows, overrides, message):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": row} for row in rows])
    err = refused(capsys, tmp_path, train_argv(tmp_path, f"prompts={path}", *overrides))
    assert message.format(path=path) in err


def test_binary_prompt_files_are_named_in_one_line(tmp_path):
    text = tmp_path / "p.txt"
    text.write_bytes(b"ok\n\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=rf"^prompts: {text} is not a UTF-8 text file "
                                         r"\(byte 3 is 0xff\)"):
        load_prompts(str(text))
    table = tmp_path / "p.jsonl"
    table.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=rf"^prompts: cannot read the file {table}") as info:
        load_prompts(str(table))
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------- rewards

def _classifier_folder(folder: Path, positions: int) -> Path:
    """A tiny GPT-2 sequence classifier reading ``positions`` tokens, over the tiny
    word-level vocabulary."""
    torch.manual_seed(0)
    GPT2ForSequenceClassification(tiny_config(n_positions=positions, num_labels=2)
                                  ).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_reward_inputs_are_cut_to_the_models_positions(tmp_path, capsys):
    folder = _classifier_folder(tmp_path / "rm", positions=16)
    reward = SequenceClassifierReward(folder, max_length=1024)  # the config's default
    assert (reward.max_length, reward.limited_by_model) == (16, True)
    prompt = " ".join(f"w{3 + i % 30}" for i in range(25))
    scores = reward([prompt, "w3"], ["w4 w5", "w6"])  # 28 tokens: past the 16 positions
    assert reward.truncated == 1
    assert ("1 of 2 texts were longer than the reward model's 16 positions and lost their "
            "first tokens") in capsys.readouterr().err
    # the cut text is scored as its last 16 tokens alone: the end of the response is kept
    ids = reward.tokenizer(prompt + " w4 w5")["input_ids"][-16:]
    with torch.no_grad():
        alone = reward.model(input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(scores[0], alone, atol=1e-5)
    # a wrapped model exposes the same count, for the trainer's log
    assert NormalizedReward(reward, {}).truncated == 1
    assert NormalizedReward(CallableReward(lambda p, r: [[0.0]], ["x"]), {}).truncated == 0


@pytest.mark.parametrize(("max_length", "limit", "by_model"), [(None, 16, True), (8, 8, False)])
def test_the_smaller_of_reward_max_length_and_the_positions_wins(tmp_path, max_length, limit,
                                                                  by_model):
    reward = SequenceClassifierReward(_classifier_folder(tmp_path / "rm", positions=16),
                                      max_length=max_length)
    assert (reward.max_length, reward.limited_by_model) == (limit, by_model)


def test_reward_max_length_null_is_the_models_limit_and_zero_is_refused():
    assert load_config(SMOKE, ["reward_max_length=null"]).reward_max_length is None
    with pytest.raises(ValueError, match="reward_max_length must be >= 1 or null, got 0"):
        load_config(SMOKE, ["reward_max_length=0"])


# ------------------------------------------------------------------------------ command line

def test_flags_may_follow_overrides_and_overrides_keep_their_order(monkeypatch, tmp_path):
    import drosim.llm.recipes.trainer as trainer

    seen = {}

    def fake_train(config, *, resume, overwrite):
        seen.update(config=config, resume=resume, overwrite=overwrite)
        return Path(config.out_dir)

    monkeypatch.setattr(trainer, "train", fake_train)
    assert main(["train", "--config", SMOKE, f"out_dir={tmp_path / 'run'}", "lr=0.1",
                 "--overwrite", "lr=0.5", "seed=4", "--resume", "iterations=3"]) == 0
    config = seen["config"]
    assert (config.lr, config.seed, config.iterations) == (0.5, 4, 3)
    assert seen["resume"] and seen["overwrite"]
    assert config.out_dir == str(tmp_path / "run")


def test_an_override_after_a_flag_is_validated_and_unknown_flags_still_refused(capsys,
                                                                                tmp_path):
    err = refused(capsys, tmp_path, train_argv(tmp_path, "--overwrite", "eta=.inf"))
    assert "eta must be a finite number" in err
    with pytest.raises(SystemExit) as exit_info:
        main(train_argv(tmp_path, "--overwrite", "--bogus", "lr=1"))
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--seeds", "a,b", "--seeds: 'a' is not a seed; give integers in [0, 2**32)"),
    ("--seeds", "0,-1", "--seeds: '-1' is not a seed"),
    ("--seeds", "1.5", "--seeds: '1.5' is not a seed"),
    ("--seeds", "4294967296", "--seeds: '4294967296' is not a seed"),
    ("--seeds", "0,1,0", "--seeds '0,1,0' names 0 more than once"),
    ("--seeds", "0,,1", "--seeds '0,,1' has an empty item"),
    ("--methods", "foo", "--methods: unknown method 'foo'; valid methods: rebel, chi2-rebel"),
    ("--methods", "rebel,rebell", "--methods: unknown method 'rebell'; did you mean 'rebel' or"),
    ("--methods", "dpo,dpo", "--methods 'dpo,dpo' names dpo more than once"),
])
def test_demo_seeds_and_methods_are_checked_before_any_work(capsys, tmp_path, monkeypatch,
                                                            flag, value, message):
    import drosim.llm.recipes.demo as demo

    def no_work(*args, **kwargs):
        raise AssertionError("the demo started")

    monkeypatch.setattr(demo, "run_demo", no_work)
    err = refused(capsys, tmp_path, ["demo", "--out", str(tmp_path / "out"), flag, value])
    assert message in err


def test_train_help_lists_every_bundled_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    names = bundled_config_names()
    assert len(names) >= 6 and f"bundled config name ({', '.join(names)})" in help_text


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["export"], ["report"], ["sft"],
                                     ["train-reward"]])
def test_help_text_is_plain(capsys, command):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    help_text = capsys.readouterr().out
    assert "usage: drosim-llm" in help_text
    for markup in ("``", ":func:", ":class:", ":mod:", ":data:"):
        assert markup not in help_text
