"""Training configs of drosim.llm.components.config: layering, type checks, validation, bundled
files."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from drosim.llm.components.config import (
    CONFIGS_DIR,
    METHODS,
    TrainConfig,
    bundled_config_path,
    config_to_dict,
    load_config,
    save_config,
    validate_config,
)

DEMO_PATH = bundled_config_path("demo")
DEMO = load_config(DEMO_PATH)
WORLD_YAML = ("model: demo\nprompts: demo\neval_prompts: demo\nreward: demo\n"
              "train_mixture: {joy: 1.0}\neval_mixtures: [{joy: 1.0}]\n")


def world() -> dict:
    """The world fields of a minimal run (fresh objects each call)."""
    return yaml.safe_load(WORLD_YAML)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("field", ["model", "prompts", "eval_prompts", "reward"])
def test_the_world_has_no_default(field):
    # The demo's world lives in demo.yaml, not in TrainConfig: a run must name its own.
    with pytest.raises(ValueError, match=f"{field} is not set"):
        validate_config(dataclasses.replace(TrainConfig(**world()), **{field: None}))
    with pytest.raises(ValueError, match="model is not set"):
        load_config()
    validate_config(TrainConfig(**world()))  # everything else has a working default
    assert TrainConfig().train_mixture == {} and TrainConfig().eval_mixtures == []
    assert METHODS == ("rebel", "chi2-rebel", "kl-rebel", "kltemp-rebel", "w-rebel",
                       "dpo", "ipo", "wdpo", "kl-dpo", "chi2-dpo")


def test_default_mixtures_are_not_shared_between_configs():
    a, b = TrainConfig(**world()), TrainConfig()
    a.train_mixture["anger"] = 1.0
    a.eval_mixtures.append({"joy": 1.0})
    assert b == TrainConfig() and b.train_mixture == {} and b.eval_mixtures == []


def test_yaml_overrides_defaults_and_overrides_win(tmp_path):
    path = _write(tmp_path / "run.yaml",
                  "# comment\nlr: 0.01\niterations: 7\nmethod: dpo\n" + WORLD_YAML)
    config = load_config(path, ["iterations=9", "method=w-rebel"])
    assert config == TrainConfig(**world(), lr=0.01, iterations=9, method="w-rebel")
    assert load_config(path, ["lr=0.02", "lr=0.03"]).lr == 0.03  # later overrides win


@pytest.mark.parametrize(("override", "field", "expected"), [
    ("lr=3e-4", "lr", 3e-4),  # YAML 1.1 alone would read this as the string "3e-4"
    ("lr=1", "lr", 1.0),
    ("bf16=true", "bf16", True),
    ("train_mixture={joy: 0.7, calm: 0.3}", "train_mixture", {"joy": 0.7, "calm": 0.3}),
    ("train_mixture={joy: 1}", "train_mixture", {"joy": 1.0}),
    ("eval_mixtures=[{anger: 1}]", "eval_mixtures", [{"anger": 1.0}]),
    ("tokenizer=null", "tokenizer", None),
    ("tokenizer=gpt2", "tokenizer", "gpt2"),
    ("out_dir=runs/a=b", "out_dir", "runs/a=b"),  # split at the first "="
    (" seed = 3", "seed", 3),
])
def test_override_values_are_parsed_as_yaml(override, field, expected):
    value = getattr(load_config(DEMO_PATH, [override]), field)
    assert value == expected
    assert type(value) is type(expected)


def test_exponent_floats_in_yaml_files_are_floats(tmp_path):
    path = _write(tmp_path / "run.yaml", "lr: 1e-5\nweight_decay: 2E-2\n" + WORLD_YAML)
    config = load_config(path)
    assert (config.lr, config.weight_decay) == (1e-5, 2e-2)


@pytest.mark.parametrize(("override", "message"), [
    ("iterations=1.5", "iterations: expected an integer, got 1.5"),
    ("iterations=true", "iterations: expected an integer, got True"),
    ("iterations=1e3", "iterations: expected an integer"),
    ("lr=abc", "lr: expected a number, got 'abc'"),
    ("lr=false", "lr: expected a number"),
    ("bf16=1", r"bf16: expected a boolean \(true/false\), got 1"),
    ("model=3", "model: expected a string, got 3"),
    ("model=null", "model is not set"),
    ("train_mixture=[1, 2]", "train_mixture: expected a mapping"),
    ("train_mixture={joy: high}", r"train_mixture\['joy'\]: expected a number, got 'high'"),
    ("train_mixture={1: 0.5}", "train_mixture key: expected a string, got 1"),
    ("eval_mixtures={joy: 1}", "eval_mixtures: expected a list"),
    ("eval_mixtures=[0.5]", r"eval_mixtures\[0\]: expected a mapping"),
])
def test_values_of_the_wrong_type_are_rejected(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(DEMO_PATH, [override])


def test_validate_rejects_wrong_types_set_in_code():
    with pytest.raises(ValueError, match="epochs: expected an integer"):
        validate_config(TrainConfig(epochs=2.0))


@pytest.mark.parametrize(("key", "close"), [
    ("lrr", "lr"), ("iteratons", "iterations"), ("train_mix", "train_mixture"),
    ("methd", "method"),
])
def test_unknown_override_key_names_the_close_match(key, close):
    with pytest.raises(ValueError, match=f"unknown config key '{key}'.*did you mean '{close}'"):
        load_config(overrides=[f"{key}=1"])


def test_unknown_yaml_key_names_the_file_and_close_match(tmp_path):
    path = _write(tmp_path / "run.yaml", "max_new_token: 5\n")
    with pytest.raises(ValueError, match=r"'max_new_token' in .*run\.yaml.*'max_new_tokens'"):
        load_config(path)


def test_unknown_key_without_close_match_lists_the_valid_keys():
    with pytest.raises(ValueError, match="valid keys: model, tokenizer, prompts"):
        load_config(overrides=["zzzzzz=1"])


@pytest.mark.parametrize("override", ["lr", "=3", "lr=[unclosed"])
def test_malformed_overrides_are_rejected(override):
    with pytest.raises(ValueError, match=re.escape(f"override '{override}'")):
        load_config(overrides=[override])


def test_yaml_file_must_be_a_mapping(tmp_path):
    with pytest.raises(ValueError, match="expected a mapping of config keys, got list"):
        load_config(_write(tmp_path / "run.yaml", "- lr\n- 0.1\n"))
    with pytest.raises(ValueError, match="model is not set"):  # empty: all defaults
        load_config(_write(tmp_path / "empty.yaml", "# nothing\n"))


@pytest.mark.parametrize(("changes", "message"), [
    ({"method": "ppo"}, "unknown method 'ppo'; valid methods: rebel, chi2-rebel"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"chi2_rho": -0.1}, r"chi2_rho: Chi2\.rho must be non-negative"),
    ({"kl_rho": -1e-9}, r"kl_rho: KL\.rho must be non-negative"),
    ({"w_rho": -1.0}, r"w_rho, w_p: Wasserstein\.rho must be non-negative"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"warmup_iterations": -1}, "warmup_iterations must be >= 0"),
    ({"kl_tau": -1.0}, r"kl_tau: KLTemperature\.tau must be non-negative"),
    ({"eta": 0.0}, "eta must be > 0"),
    ({"eta": float("nan")}, "eta must be a finite number, got nan"),
    ({"beta": -0.1}, "beta must be > 0"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"w_p": 0.5}, r"w_rho, w_p: Wasserstein\.p must be >= 1"),
    ({"w_gradient": "central"}, r"w_gradient must be one of finite-difference, exact"),
    ({"w_gradient": "auto"}, r"w_gradient must be one of finite-difference, exact"),
    ({"compile": True, "method": "w-rebel"}, r"compile=true cannot run w-rebel yet"),
    ({"compile": True, "method": "wdpo", "w_gradient": "exact"}, r"compile=true cannot run wdpo"),
    ({"iterations": 0}, "iterations must be >= 1"),
    ({"pairs_per_iteration": 0}, "pairs_per_iteration must be >= 1"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"minibatch_size": 0}, "minibatch_size must be >= 1"),
    ({"minibatch_size": 65}, r"minibatch_size must be <= pairs_per_iteration \(64\)"),
    ({"minibatch_size": 24}, r"minibatch_size must be a divisor of pairs_per_iteration \(64; "
                             r"16 pairs would be dropped every epoch\)"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"eval_every": 0}, "eval_every must be >= 1"),
    ({"num_eval_prompts": 0}, "num_eval_prompts must be >= 1"),
    ({"checkpoint_every": 0}, "checkpoint_every must be >= 1"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"seed": -1}, r"seed must be in \[0, 2\*\*32\)"),
    ({"train_mixture": {"joy": -0.5, "calm": 1.5}}, "train_mixture: the weight of 'joy'"),
    ({"train_mixture": {"joy": float("inf")}}, "train_mixture: the weight of 'joy'"),
    ({"train_mixture": {"joy": 0.0}}, "train_mixture: the weights must sum to a positive"),
    ({"train_mixture": {}}, "train_mixture: the weights must sum to a positive"),
    ({"eval_mixtures": []}, "eval_mixtures is empty"),
    ({"eval_mixtures": [{"joy": 1.0}, {"calm": -1.0}]}, r"eval_mixtures\[1\]: the weight"),
])
def test_invalid_values_are_rejected(changes, message):
    config = dataclasses.replace(DEMO, **changes)
    with pytest.raises(ValueError, match=message):
        validate_config(config)


def test_load_config_validates():
    with pytest.raises(ValueError, match="minibatch_size must be <= pairs_per_iteration"):
        load_config(DEMO_PATH, ["pairs_per_iteration=8"])


def test_save_and_load_round_trip(tmp_path):
    config = dataclasses.replace(
        DEMO, tokenizer="gpt2", method="kltemp-rebel", lr=3e-5, kl_tau=0.25, seed=7,
        train_mixture={"joy": 0.7, "calm": 0.3}, eval_mixtures=[{"anger": 1.0}], bf16=True,
        out_dir="runs/x")
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert json.loads(json.dumps(config_to_dict(config))) == config_to_dict(config)


def test_config_to_dict_is_a_copy():
    config = load_config(DEMO_PATH)
    config_to_dict(config)["train_mixture"]["joy"] = 9.0
    assert config.train_mixture["joy"] == 0.5


# ----------------------------------------------------------------------------- bundled files


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_bundled_config_loads_and_validates(path):
    assert path.read_text().startswith("#")  # each file says what it is for
    assert bundled_config_path(path.stem) == path
    load_config(path)


def test_bundled_configs():
    # The demo spells out every field, so changing a default cannot change the demo.
    demo = yaml.safe_load(bundled_config_path("demo").read_text())
    assert list(demo) == [f.name for f in dataclasses.fields(TrainConfig)]
    smoke = load_config(bundled_config_path("smoke"))
    assert (smoke.iterations, smoke.pairs_per_iteration, smoke.minibatch_size, smoke.epochs,
            smoke.eval_every, smoke.num_eval_prompts, smoke.checkpoint_every,
            smoke.max_new_tokens, smoke.progress) == (3, 8, 4, 1, 2, 8, 2, 6, False)
    gpu = load_config(bundled_config_path("gpt2-small-gpu"))
    assert (gpu.model, gpu.device, gpu.bf16, gpu.gradient_checkpointing, gpu.lr, gpu.eta,
            gpu.temperature, gpu.pairs_per_iteration, gpu.minibatch_size,
            gpu.max_new_tokens) == ("gpt2", "cuda", True, True, 1e-5, 0.01, 0.7, 128, 32, 64)


def test_unknown_bundled_config_lists_the_available_ones():
    with pytest.raises(ValueError, match="no bundled config 'smok'; available: armorm, demo, "
                                         "emotion, gpt2-small-gpu, hh, smoke"):
        bundled_config_path("smok")


def test_reward_heads_take_indices_and_labels_and_refuse_other_types(tmp_path):
    config = load_config(None, [*(f"{k}={json.dumps(v)}" for k, v in world().items()),
                                "reward=./rm", "reward_output=rewards",
                                "reward_heads={joy: 0, calm: calm}"])
    assert config.reward_heads == {"joy": 0, "calm": "calm"}
    assert config.reward_output == "rewards" and config.trust_remote_code is False
    for bad, expected in [("1.5", "an integer or a string, got 1.5"),
                          ("true", "an integer or a string, got True"),
                          ("null", "an integer or a string, got None")]:
        message = f"reward_heads['joy']: expected {expected}"
        with pytest.raises(ValueError, match=re.escape(message)):
            load_config(None, [f"reward_heads={{joy: {bad}}}"])


@pytest.mark.parametrize(("overrides", "match"), [
    (["reward_heads={joy: -1}"], r"reward_heads\['joy'\] must be a head index >= 0"),
    (["reward_heads={joy: ''}"], r"reward_heads\['joy'\] must be a head index >= 0"),
    (["reward_heads={}"], r"reward_heads is empty"),
    (["reward_output=rewards[0]"], r"reward_output must be an attribute name"),
    (["reward=demo", "reward_output=rewards"], r"the rule-based reward=demo has none"),
    (["reward=demo", "reward_heads={joy: 0}"], r"the rule-based reward=demo has none"),
])
def test_bad_reward_keys_are_refused(overrides, match):
    values = world() | {"reward": "./rm"}
    with pytest.raises(ValueError, match=match):
        load_config(None, [*(f"{k}={json.dumps(v)}" for k, v in values.items()), *overrides])
