"""``drosim-llm train`` refuses what cannot work with one line and exit status 2, before it
writes anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drosim.llm.cli import main


def _train(capsys, tmp_path: Path, *overrides: str, config: str = "smoke") -> str:
    out = tmp_path / "out"
    assert main(["train", "--config", config, f"out_dir={out}", "iterations=1", *overrides]) == 2
    assert not out.exists(), "nothing may be written before the run can start"
    return capsys.readouterr().err


def test_a_malformed_yaml_file_is_a_clear_error(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    assert "bad.yaml is not valid YAML" in _train(capsys, tmp_path, config=str(bad))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_only_torch_is_refused(capsys, tmp_path):
    assert "device=cuda, but this torch build has no CUDA" in _train(capsys, tmp_path,
                                                                      "device=cuda")


@pytest.mark.parametrize("key", ["model", "tokenizer", "reward"])
def test_a_missing_local_path_is_named(capsys, tmp_path, key):
    missing = tmp_path / "nowhere"
    assert f"{key}='{missing}': no such file or directory" in _train(
        capsys, tmp_path, f"{key}={missing}")


def test_an_output_folder_that_cannot_be_made_is_refused(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", "--config", "smoke", f"out_dir={blocker / 'sub'}"]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def _smoke(tmp_path: Path, *overrides: str) -> list[str]:
    return ["train", "--config", "smoke", f"out_dir={tmp_path / 'run'}", "iterations=2",
            *overrides]


def test_a_prompt_longer_than_the_model_positions_is_named(capsys, tmp_path):
    # The demo policy reads 64 positions; this prompt alone has 80 tokens.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a short prompt\n" + "the " * 80 + "\n")
    assert main(_smoke(tmp_path, f"prompts={prompts}", f"eval_prompts={prompts}")) == 2
    err = capsys.readouterr().err
    assert "exceeds the model's 64 positions: shorten the prompts or max_new_tokens" in err
    assert "Traceback" not in err


def test_a_full_disk_is_one_clear_message_and_keeps_the_last_checkpoint(capsys, tmp_path,
                                                                         monkeypatch):
    import errno

    import drosim.llm.recipes.trainer as trainer
    from drosim.llm.components.checkpoint import checkpoints_newest_first, verify_checkpoint

    original, calls = trainer.save_checkpoint, []

    def save_then_fill_the_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run"))
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_fill_the_disk)
    assert main(_smoke(tmp_path, "iterations=4", "checkpoint_every=1")) == 2
    assert "drosim-llm: error: [Errno 28] No space left on device" in capsys.readouterr().err
    (newest,) = checkpoints_newest_first(tmp_path / "run")
    verify_checkpoint(newest)  # the checkpoint written before the disk filled is intact
