"""The lifecycle of ``drosim-llm`` runs (issue 18): refusals that leave no trace, one writer
per output folder, a resume that checks what it resumes, checkpoints that survive a full or
read-only disk, exports that do not depend on the current folder, and a demo that says once
that it starts fresh.

The runs are the smoke configuration on a tiny pre-built demo base, called in-process.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drosim.llm.cli import main
from drosim.llm.components.checkpoint import (
    CHECKPOINTS_DIR,
    checkpoints_newest_first,
    verify_checkpoint,
)
from drosim.llm.components.demo_world import build_demo_base
from drosim.output import locked

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_demo_base(tmp_path_factory.mktemp("llm") / "base", pretrain_steps=20,
                           corpus_size=300)


def train_args(out: Path, base: Path, *extra: str) -> list[str]:
    return ["train", "--config", "smoke", f"model={base}", f"out_dir={out}", "iterations=1",
            "checkpoint_every=1", "eval_every=1", "num_eval_prompts=4", *extra]


# the method of the finished run
CHI2 = ("method=chi2-rebel", "chi2_rho=0.1")


@pytest.fixture(scope="module")
def finished(base, tmp_path_factory) -> Path:
    """A finished one-iteration run (chi2-rebel): copy it before changing it."""
    out = tmp_path_factory.mktemp("llm") / "finished"
    assert main(train_args(out, base, *CHI2)) == 0
    return out


def snapshot(folder: Path) -> dict[str, bytes | None] | None:
    """Every path under ``folder`` with its bytes (None for a folder); None if absent."""
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes()
            for p in sorted(folder.rglob("*"))}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("drosim-llm: error:")]
    assert len(lines) == 1, err
    return lines[0]


def truncated_copy(base: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "truncated"
    shutil.copytree(base, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return folder


# (overrides, what the one-line refusal says); ``{prompts}``, ``{empty}`` and ``{truncated}``
# are filled in by the test
REFUSALS = {
    "long-prompt": (["prompts={prompts}"], "exceeds the model's 64 positions"),
    "max-new-tokens": (["max_new_tokens=70"], "exceeds the model's 64 positions"),
    "chat-template": (["chat_template=true"], "the tokenizer has no chat template"),
    "truncated-weights": (["model={truncated}"], "model.safetensors is truncated or damaged"),
    "infinite-lr": (["lr=.inf"], "lr must be a finite number"),
    "empty-prompt": (["prompts={empty}"], "row 1"),
    "stop-token-id": (["stop_token_ids=[100000]"], "100000 is not a token id of the tokenizer"),
}


def refusal_overrides(case: str, base: Path, tmp_path: Path) -> tuple[list[str], str]:
    overrides, message = REFUSALS[case]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a short prompt\n" + "the " * 80 + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "the cat"}\n{"prompt": ""}\n')
    filled = {"prompts": prompts, "empty": empty,
              "truncated": truncated_copy(base, tmp_path) if case == "truncated-weights"
              else ""}
    return [o.format(**filled) for o in overrides], message


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refused_fresh_run_creates_nothing(capsys, base, tmp_path, case):
    overrides, message = refusal_overrides(case, base, tmp_path)
    out = tmp_path / "out"
    assert main([*train_args(out, base), *overrides]) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refused_overwrite_keeps_the_finished_run(capsys, base, finished, tmp_path, case):
    overrides, message = refusal_overrides(case, base, tmp_path)
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    assert main([*train_args(out, base, "--overwrite"), *overrides]) == 2
    assert message in one_line_error(capsys)
    assert snapshot(out) == before


def test_an_unfetchable_model_keeps_the_finished_run(base, finished, tmp_path):
    # a hub name that cannot be fetched (offline): only from_pretrained can tell
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    result = subprocess.run(
        [sys.executable, "-m", "drosim.llm.cli", *train_args(out, base, "--overwrite"),
         "model=no-such-org/no-such-model"], env=ENV, capture_output=True, text=True)
    assert result.returncode == 2
    assert "model='no-such-org/no-such-model'" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(out) == before


def test_overwrite_replaces_the_run_once_the_new_one_starts(base, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    assert main([*train_args(out, base, "--overwrite"), "method=rebel"]) == 0
    assert "method: rebel" in (out / "config.yaml").read_text()
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert [record["iteration"] for record in train] == [1]
    assert not (out / "resumes.jsonl").exists()


@pytest.mark.parametrize("recipe", ["sft", "train-reward"])
def test_a_recipe_on_truncated_weights_is_refused_before_writing(capsys, base, tmp_path,
                                                                 recipe):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "the cat", "label": "a"}\n{"text": "the dog", "label": "b"}\n')
    model = truncated_copy(base, tmp_path)
    before = snapshot(tmp_path)
    assert main([recipe, "--model", str(model), "--data", str(data), "--out",
                 str(tmp_path / "out")]) == 2
    assert "model.safetensors is truncated or damaged" in one_line_error(capsys)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_naming_the_holder(capsys, base, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    with locked(out):  # another process's hold (flock: a second descriptor is refused)
        holding = snapshot(out)
        for extra in ("--resume", "--overwrite"):
            assert main([*train_args(out, base, extra), *CHI2, "iterations=2"]) == 2
            assert f"in use by another drosim process (pid {os.getpid()})" in one_line_error(
                capsys)
            assert snapshot(out) == holding
    assert {k: v for k, v in snapshot(out).items() if k != ".drosim.lock"} == before


def test_a_running_train_refuses_a_resume_of_its_folder(base, tmp_path):
    out = tmp_path / "run"
    running = subprocess.Popen(
        [sys.executable, "-m", "drosim.llm.cli",
         *train_args(out, base, "iterations=400", "eval_every=400")],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").stat().st_size:
            assert running.poll() is None, running.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "drosim.llm.cli", *train_args(out, base, "--resume"),
             "iterations=400", "eval_every=400"], env=ENV, capture_output=True, text=True)
        assert second.returncode == 2
        assert f"(pid {running.pid})" in second.stderr
        assert running.poll() is None, "the first run must go on"
    finally:
        running.kill()
        running.wait()
    # one writer: every iteration logged once
    train = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text()
             .splitlines() if line.endswith("}") and json.loads(line)["kind"] == "train"]
    assert train == list(range(1, len(train) + 1))


def test_export_sft_and_demo_refuse_a_held_output(capsys, base, finished, tmp_path):
    exported = tmp_path / "exported"
    exported.mkdir()
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat\nthe dog ran\n")
    sft_out = tmp_path / "sft"
    sft_out.mkdir()
    work = tmp_path / "sft.work"
    work.mkdir()
    (work / "checkpoint-1").mkdir()  # another writer's checkpoints: --overwrite must keep them
    demo_out = tmp_path / "demo"
    demo_out.mkdir()
    commands = {exported: ["export", str(finished), "--out", str(exported)],
                sft_out: ["sft", "--model", str(base), "--data", str(texts), "--out",
                          str(sft_out), "--overwrite"],
                demo_out: ["demo", "--out", str(demo_out), "--smoke", "--methods", "rebel",
                           "--seeds", "0", "--no-progress"]}
    for folder, command in commands.items():
        with locked(folder):
            before = snapshot(tmp_path)
            assert main(command) == 2, command[0]
            assert f"(pid {os.getpid()})" in one_line_error(capsys)
            assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------- resuming


def test_a_resume_that_changes_the_run_is_refused_listing_the_changes(capsys, base, finished,
                                                                      tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    assert main([*train_args(out, base, "--resume"), "method=dpo", "lr=0.5",
                 "iterations=2"]) == 2
    line = one_line_error(capsys)
    assert "method: 'chi2-rebel' -> 'dpo'" in line
    assert "lr: 0.001 -> 0.5" in line
    assert "iterations" not in line  # may change
    assert snapshot(out) == before


def test_a_resume_with_another_model_is_refused_before_loading(capsys, base, finished,
                                                               tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    other = tmp_path / "other"
    shutil.copytree(base, other)
    before = snapshot(out)
    assert main([*train_args(out, base, "--resume"), *CHI2, f"model={other}"]) == 2
    assert f"model: '{base}' -> '{other}'" in one_line_error(capsys)
    assert snapshot(out) == before


def test_a_resume_may_extend_the_run_and_records_it(capsys, base, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    assert main([*train_args(out, base, "--resume"), *CHI2, "iterations=2",
                 "checkpoint_every=2"]) == 0
    err = capsys.readouterr().err
    assert err.count("iterations: 1 -> 2") == 1
    (record,) = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert record["iteration"] == 1
    # (out_dir changed too: the run was copied here)
    assert record["changed"]["iterations"] == [1, 2]
    assert record["changed"]["checkpoint_every"] == [1, 2]
    train = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text()
             .splitlines() if json.loads(line)["kind"] == "train"]
    assert train == [1, 2]


# ------------------------------------------------------------------------- exporting


def test_export_does_not_depend_on_the_current_folder(base, tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(base, project / "models" / "base")
    monkeypatch.chdir(project)
    assert main(["train", "--config", "smoke", "model=models/base", "out_dir=runs/a",
                 "iterations=1", "checkpoint_every=1", "num_eval_prompts=4"]) == 0
    run = project / "runs" / "a"
    saved = (run / "config.yaml").read_text()
    assert f"model: {project / 'models' / 'base'}" in saved  # recorded absolute
    shutil.rmtree(run / "final")  # export the checkpoint: the model comes from config.yaml
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run), "--out", str(tmp_path / "e1")]) == 0
    assert (tmp_path / "e1" / "model.safetensors").is_file()


def test_export_of_an_old_relative_path_reads_it_beside_the_run_or_refuses(
        capsys, base, finished, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "final")
    shutil.copytree(base, tmp_path / "models" / "base")
    config = (run / "config.yaml").read_text()
    monkeypatch.chdir(tmp_path / "models")  # not where the old run was started
    (run / "config.yaml").write_text(config.replace(f"model: {base}", "model: models/base"))
    assert main(["export", str(run), "--out", str(tmp_path / "e1")]) == 0
    (run / "config.yaml").write_text(config.replace(f"model: {base}", "model: ./gone/base"))
    assert main(["export", str(run), "--out", str(tmp_path / "e2")]) == 2
    assert "records the relative path model='./gone/base'" in one_line_error(capsys)
    assert not (tmp_path / "e2").exists()


# --------------------------------------------------------------------------- full disk


def fill(folder: Path, leave: int) -> None:
    """Write a file that leaves ``leave`` bytes free on ``folder``'s file system."""
    free = shutil.disk_usage(folder).free
    (folder / "filler").write_bytes(b"\0" * max(free - leave, 0))


@pytest.mark.parametrize("failure", ["full", "read-only"])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_previous(
        capsys, base, small_fs, monkeypatch, failure):
    import drosim.llm.recipes.trainer as trainer

    original, saves = trainer.checkpoint, []

    out = small_fs / "run"
    checkpoints = out / CHECKPOINTS_DIR

    def checkpoint_then_break_the_disk(run, state):
        if saves:  # the second save meets the broken disk
            if failure == "full":
                fill(small_fs, leave=64 * 1024)
            else:  # a read-only view of checkpoints/ (the run holds files open elsewhere)
                for options in (["--bind"], ["-o", "remount,bind,ro"]):
                    subprocess.run(["mount", *options, str(checkpoints), str(checkpoints)],
                                   check=True)
        saves.append(state.iteration)
        original(run, state)

    monkeypatch.setattr(trainer, "checkpoint", checkpoint_then_break_the_disk)
    try:
        assert main(train_args(out, base, "iterations=3")) == 2
    finally:
        if failure == "read-only":
            subprocess.run(["umount", str(checkpoints)], check=True)
    line = one_line_error(capsys)
    code = errno.ENOSPC if failure == "full" else errno.EROFS
    assert f"[Errno {code}] cannot write the checkpoint of iteration 2" in line
    assert "iteration-000001" in line  # the one kept
    (newest,) = checkpoints_newest_first(out)
    assert newest.name == "iteration-000001"
    verify_checkpoint(newest)
    assert [p.name for p in (out / CHECKPOINTS_DIR).iterdir() if p.name.startswith(".tmp")] == []


# -------------------------------------------------------------------------------- demo


def test_a_fresh_demo_says_once_that_it_starts_fresh(capfd, tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--smoke", "--methods", "rebel",
                 "--seeds", "0", "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert err.count("1 of 1 runs start fresh") == 1
    assert "no intact checkpoint" not in err
