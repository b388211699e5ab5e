"""The paper's three experiment configs (emotion.yaml, armorm.yaml, hh.yaml) run end to end
through the command line on local stand-ins (tests/llm_stand_ins.py), with only the world
pointed at local folders and the loop shrunk; and the ArmoRM run stops, with none of the
reward model's code run, without trust_remote_code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llm_stand_ins import (
    EMOTIONS,
    armolike_folder,
    char_tokenizer,
    tiny_classifier_folder,
    tiny_gpt2_folder,
    tiny_llama_folder,
    write_emotion,
    write_helpsteer,
    write_hh,
)

from drosim.llm.cli import main
from drosim.llm.components.config import bundled_config_path, load_config

# The loop shrunk to seconds; everything else comes from the bundled config.
SMALL = ["iterations=2", "pairs_per_iteration=4", "minibatch_size=2", "epochs=1",
         "max_new_tokens=6", "max_prompt_tokens=48", "num_eval_prompts=4", "eval_every=1",
         "checkpoint_every=1", "device=cpu", "bf16=false", "gradient_checkpointing=false",
         "progress=false"]
ARMOLIKE_HEADS = "reward_heads={helpfulness: 0, safety: 1, verbosity: 2}"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    return {"llama": tiny_llama_folder(root / "llama"),
            "classifier": tiny_classifier_folder(root / "classifier"),
            "armolike": armolike_folder(root / "armolike", root / "armolike-imported",
                                        char_tokenizer()),
            "emotion": write_emotion(root / "emotion.parquet"),
            "helpsteer": write_helpsteer(root / "helpsteer.jsonl"),
            "hh": write_hh(root / "hh.parquet")}


def _evaluations(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"]


def test_the_armorm_config_runs_with_a_custom_multi_head_reward(world, tmp_path, capsys):
    out = tmp_path / "armorm"
    code = main(["train", "--config", "armorm", f"model={world['llama']}",
                 f"reward={world['armolike']}", f"prompts={world['helpsteer']}",
                 f"eval_prompts={world['helpsteer']}", "eval_prompt_split=null",
                 "trust_remote_code=true", "reward_output=rewards", ARMOLIKE_HEADS,
                 "train_mixture={helpfulness: 0.1, safety: 0.9}",
                 "eval_mixtures=[{helpfulness: 1.0}, {safety: 1.0}, {verbosity: 1.0}]",
                 f"out_dir={out}", *SMALL])
    assert code == 0, capsys.readouterr().err
    first, *later = _evaluations(out)
    for name in ("helpfulness", "safety", "verbosity"):  # per-objective metrics
        assert f"objective/{name}" in first
    assert "win_rate/1 verbosity" in later[-1] and "win_rate/1 verbosity" not in first
    assert 0 <= later[-1]["win_rate/worst"] <= 1
    assert (out / "final" / "config.json").is_file()


def test_the_armorm_config_without_trust_runs_none_of_the_rewards_code(tmp_path, capsys):
    marker = tmp_path / "imported"
    armolike = armolike_folder(tmp_path / "armolike", marker, char_tokenizer())
    llama = tiny_llama_folder(tmp_path / "llama")
    prompts = write_helpsteer(tmp_path / "helpsteer.jsonl")
    out = tmp_path / "run"
    code = main(["train", "--config", "armorm", f"model={llama}", f"reward={armolike}",
                 f"prompts={prompts}", f"eval_prompts={prompts}", "eval_prompt_split=null",
                 "trust_remote_code=false", "reward_output=rewards", ARMOLIKE_HEADS,
                 "train_mixture={helpfulness: 0.1, safety: 0.9}",
                 "eval_mixtures=[{verbosity: 1.0}]", f"out_dir={out}", *SMALL])
    assert code == 2
    error = capsys.readouterr().err
    assert "trust_remote_code" in error and error.count("\n") == 1
    assert not marker.exists()  # its modeling file was never imported
    assert not out.exists()     # refused before anything was written


def test_the_hh_config_runs_on_transcripts_with_a_chat_template(world, tmp_path, capsys):
    out = tmp_path / "hh"
    code = main(["train", "--config", "hh", f"model={world['llama']}",
                 f"reward={world['armolike']}", f"prompts={world['hh']}",
                 f"eval_prompts={world['hh']}", "eval_prompt_split=null", ARMOLIKE_HEADS,
                 "train_mixture={helpfulness: 0.5, safety: 0.5}",
                 "eval_mixtures=[{helpfulness: 1.0}, {safety: 1.0}]",
                 f"out_dir={out}", "method=dpo", *SMALL, "max_prompt_tokens=16"])
    error = capsys.readouterr().err
    assert code == 0, error
    assert "objective/safety" in _evaluations(out)[-1]
    # every rendered transcript is longer than 16 characters: all cut, counted and warned
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["truncated_prompts"] for r in records if r["kind"] == "train"] == [4, 4]
    assert "4 of 4 prompts were longer than max_prompt_tokens = 16" in error


def test_the_emotion_config_runs_on_a_six_emotion_classifier(world, tmp_path, capsys):
    out = tmp_path / "emotion"
    code = main(["train", "--config", "emotion", f"model={world['llama']}",
                 f"reward={world['classifier']}", f"prompts={world['emotion']}",
                 f"eval_prompts={world['emotion']}", "eval_prompt_split=null",
                 f"out_dir={out}", "method=chi2-rebel", *SMALL])
    assert code == 0, capsys.readouterr().err
    last = _evaluations(out)[-1]
    assert {f"objective/{e}" for e in ("sadness", "joy", "love", "anger", "fear", "surprise")
            } <= set(last)
    assert "win_rate/1 sadness" in last  # a mixture never trained on


@pytest.mark.parametrize("name", ["emotion", "armorm", "hh"])
def test_the_paper_configs_convert_the_authors_scale(name):
    """The REBEL loss is 1/eta^2 times the authors' code's: the KL temperature (their 0.1)
    and the clipping norm (1.0 on their scale) are converted, the learning rate is not."""
    config = load_config(bundled_config_path(name))
    assert config.eta == 0.01 and config.lr == 1e-5
    assert config.kl_tau == pytest.approx(0.1 / config.eta**2)
    assert config.max_grad_norm == pytest.approx(1.0 / config.eta**2)


@pytest.mark.slow
def test_the_emotion_pipeline_runs_end_to_end(tmp_path, capsys):
    """sft -> train-reward -> train (REBEL and chi2-REBEL) -> report, each through the
    command line, on a tiny GPT-2 and the emotion table; the report's win rates are against
    each run's own SFT policy."""
    base = tiny_gpt2_folder(tmp_path / "gpt2")
    data = write_emotion(tmp_path / "emotion.parquet", repeat=8)
    sft, rm = tmp_path / "models" / "sft", tmp_path / "models" / "rm"
    assert main(["sft", "--model", str(base), "--data", str(data), "--field", "text",
                 "--out", str(sft), "--epochs", "3", "--lr", "3e-3", "--batch-size", "16",
                 "--max-length", "64"]) == 0
    assert main(["train-reward", "--model", str(base), "--data", str(data), "--out", str(rm),
                 "--epochs", "8", "--lr", "3e-3", "--batch-size", "16", "--max-length", "64",
                 "--eval-fraction", "0.2", "--labels", ",".join(EMOTIONS)]) == 0
    accuracy = json.loads((rm / "train_metrics.json").read_text())["eval_accuracy"]
    assert accuracy > 0.5  # six classes: chance is 1/6
    runs = []
    for method in ("rebel", "chi2-rebel"):
        runs.append(tmp_path / "runs" / method)
        assert main(["train", "--config", "emotion", f"model={sft}", f"reward={rm}",
                     f"prompts={data}", f"eval_prompts={data}", "eval_prompt_split=null",
                     f"method={method}", f"out_dir={runs[-1]}", "max_prompt_tokens=16",
                     "lr=1e-3", *SMALL, "iterations=4", "pairs_per_iteration=16",
                     "minibatch_size=8", "num_eval_prompts=16", "eval_every=2"]) == 0, (
            capsys.readouterr().err)
    report = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(report)]) == 0
    import pandas as pd

    summary = pd.read_csv(report / "summary.csv")
    assert set(summary.method) == {"rebel", "chi2-rebel"}
    assert summary.trained_on.sum() == 2
    assert summary.win_rate.between(0, 1).all()
    assert (report / "rewards.png").stat().st_size > 0


def test_a_missing_stage_0_model_is_named_with_its_key(tmp_path):
    """emotion.yaml names the stage-0 folders models/emotion-sft and models/emotion-rm: run
    before stage 0, the error says which key and that it was read as a hub name."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # local prompts: the hub dataset, read first, cannot be reached offline
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("i feel\nyou make me\n")
    result = subprocess.run([sys.executable, "-m", "drosim.llm.cli", "train", "--config",
                             "emotion", f"out_dir={tmp_path / 'run'}", "device=cpu",
                             f"prompts={prompts}", f"eval_prompts={prompts}",
                             "eval_prompt_split=train"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert ("model='models/emotion-sft' (not a local folder, so read as a hub name)"
            in result.stderr)
    assert not (tmp_path / "run").exists()
