"""What the stage-0 recipes (:mod:`~drosim.llm.recipes.sft`,
:mod:`~drosim.llm.recipes.reward_training`) share.

Both train with ``transformers``' ``Trainer`` and write a Hugging Face folder:

    check_hyperparameters   refuse non-positive epochs / lr / batch size / max_length
    prepare_out             refuse a non-empty out (or a stale work dir) unless overwrite
    claimed                 after every check and load: create and lock out (one writer),
                            then delete a stale work dir with overwrite
    fit                     Trainer checkpoints in ``<out>.work/``; resume from the newest
                            complete one; SIGTERM / SIGINT save the step and stop;
                            the trained model + tokenizer written atomically as out; work
                            dir removed

Nothing is lost on interruption: the work dir keeps ``Trainer``'s checkpoints (model,
optimiser, scheduler, RNG, data position) until the final folder is in place.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from drosim.llm.components.checkpoint import check_model_folder
from drosim.llm.components.rewards import refuse_untrusted_code
from drosim.llm.components.runtime import StopFlag
from drosim.llm.recipes.export import claimed_output, holds_files, write_pretrained

WORK_SUFFIX = ".work"
METRICS_FILE = "train_metrics.json"


def work_dir(out: Path) -> Path:
    """Where ``Trainer`` checkpoints a recipe writing ``out``: the sibling ``<out>.work``.

    Example:
        >>> work_dir(Path("models/sft")).as_posix()
        'models/sft.work'
    """
    return out.with_name(out.name + WORK_SUFFIX)


def check_hyperparameters(*, epochs: float, lr: float, batch_size: int, max_length: int,
                          save_steps: int) -> None:
    """Refuse values ``Trainer`` would misread or fail on only after loading everything.

    Raises:
        ValueError: a non-positive or non-finite epochs / lr, a batch size or save_steps
            below 1, or a max_length below 2.

    Example:
        >>> check_hyperparameters(epochs=0, lr=1e-5, batch_size=8, max_length=512,
        ...                       save_steps=500)
        Traceback (most recent call last):
        ...
        ValueError: epochs must be a positive number, got 0
    """
    for name, value in (("epochs", epochs), ("lr", lr)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    # max_length 1 would leave a causal LM no next token to predict
    for name, value, least in (("batch_size", batch_size, 1), ("max_length", max_length, 2),
                               ("save_steps", save_steps, 1)):
        if not (isinstance(value, int) and value >= least):
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def prepare_out(out: Path, *, overwrite: bool, resume: bool) -> Path:
    """Check ``out`` and its work dir before anything is loaded or written; returns the
    work dir.

    A stale work dir (an interrupted run's checkpoints) is continued with ``resume``,
    deleted with ``overwrite`` (by :func:`claimed`, once the run holds ``out``), and
    otherwise refused, so no checkpoint is silently mixed with a new run's.

    Raises:
        FileExistsError: ``out`` is not empty, or the work dir exists, without ``overwrite``
            (the work dir: nor ``resume``).
    """
    if holds_files(out) and not overwrite:
        raise FileExistsError(f"--out {out} is not empty: choose another folder or pass "
                              "--overwrite")
    work = work_dir(out)
    if work.exists() and not (resume or overwrite):
        raise FileExistsError(f"{work} holds the checkpoints of an interrupted run (or of "
                              "one still running): pass --resume to continue it or "
                              "--overwrite to start over")
    return work


def check_recipe(out: Path, model: str, *, epochs: float, lr: float, batch_size: int,
                 max_length: int, save_steps: int, overwrite: bool, resume: bool,
                 trust_remote_code: bool) -> Path:
    """Everything a stage-0 recipe checks before it reads its data: the hyperparameters
    (:func:`check_hyperparameters`), ``out`` and its work dir (:func:`prepare_out`), and the
    model (custom code needs ``trust_remote_code``; a local folder's files must be whole);
    returns the work dir.

    Raises:
        ValueError, FileExistsError: as the checks named above.
    """
    check_hyperparameters(epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length,
                          save_steps=save_steps)
    work = prepare_out(out, overwrite=overwrite, resume=resume)
    refuse_untrusted_code("model", model, trust_remote_code=trust_remote_code)
    check_model_folder("model", model)
    return work


@contextlib.contextmanager
def claimed(out: Path, *, overwrite: bool, resume: bool) -> Iterator[None]:
    """Hold ``out`` for the whole recipe (:func:`drosim.llm.recipes.export.claimed_output`: one
    writer at a time) and, with ``overwrite`` and without ``resume``, delete the stale work
    dir only once it is held (not another writer's checkpoints).

    Raises:
        OutputError: ``out`` cannot be created, or another process holds it (its pid named).
    """
    with claimed_output(out):
        if overwrite and not resume:
            shutil.rmtree(work_dir(out), ignore_errors=True)
        yield


def training_arguments(work: Path, *, epochs: float, lr: float, batch_size: int, seed: int,
                       bf16: bool, save_steps: int):
    """``TrainingArguments`` of a recipe: checkpoints every ``save_steps`` in ``work`` (the
    last two kept: the newest may be cut short by a kill, see :func:`latest_checkpoint`),
    progress bars, no hub, no reporting integrations; ``bf16`` is mixed precision (on the
    CPU too)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(work), num_train_epochs=epochs, learning_rate=lr,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        seed=seed, data_seed=seed, bf16=bf16, save_strategy="steps", save_steps=save_steps,
        save_total_limit=2, logging_steps=50, report_to="none",
        disable_tqdm=False, push_to_hub=False,
        # the collators read columns the model's forward does not name
        remove_unused_columns=False, dataloader_pin_memory=torch.cuda.is_available(),
        # without CUDA, Trainer takes bf16 (as CPU autocast) only when told to use the CPU
        use_cpu=bf16 and not torch.cuda.is_available())


def fit(trainer, tokenizer, out: Path, work: Path, *, resume: bool, overwrite: bool,
        metrics: dict[str, Any] | None = None,
        evaluate: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train (from the work dir's newest checkpoint with ``resume``), write ``out``, clean up.

    Args:
        trainer: a ``transformers.Trainer`` whose ``output_dir`` is ``work``.
        tokenizer: saved with the model.
        out: the folder to write atomically (model, tokenizer, :data:`METRICS_FILE`).
        work: the checkpoint folder, removed once ``out`` is complete.
        resume: continue from :func:`latest_checkpoint` (none: start, with a note).
        overwrite: replace a non-empty ``out``.
        metrics: more numbers for :data:`METRICS_FILE` than the training loss and steps.
        evaluate: called after training, before writing: more metrics (held-out accuracy).

    Returns:
        The metrics written to ``out/``:data:`METRICS_FILE`.
    """
    checkpoint = latest_checkpoint(work) if resume else None
    if resume and checkpoint is None:
        print(f"drosim-llm: no checkpoint in {work}: --resume starts from scratch",
              file=sys.stderr)
    with StopFlag() as stop:
        trainer.add_callback(_SaveAndStopOnSignal(stop))
        result = trainer.train(resume_from_checkpoint=checkpoint)
    if stop.signal:
        print(f"\nstopped by signal {stop.signal} after step {trainer.state.global_step}; "
              f"resume with --resume (checkpoints in {work})", file=sys.stderr)
        raise SystemExit(128 + stop.signal)
    written = {"train_loss": result.training_loss, "global_step": result.global_step,
               **(metrics or {}), **(evaluate() if evaluate else {})}
    write_pretrained(trainer.model, tokenizer, out, overwrite=overwrite,
                     files={METRICS_FILE: json.dumps(written, indent=2) + "\n"})
    shutil.rmtree(work, ignore_errors=True)
    return written


def latest_checkpoint(work: Path) -> str | None:
    """The newest complete ``checkpoint-<step>`` folder of ``work``, or ``None``.

    ``Trainer`` writes a checkpoint's ``trainer_state.json`` last, so a folder without it was
    cut short (a kill while saving): it is skipped with a warning.
    """
    steps = {int(p.name.split("-")[1]): p for p in work.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit()}
    for step in sorted(steps, reverse=True):
        if (steps[step] / "trainer_state.json").is_file():
            return str(steps[step])
        print(f"drosim-llm: warning: {steps[step]} is incomplete (no trainer_state.json); "
              "trying the one before it", file=sys.stderr)
    return None


class _SaveAndStopOnSignal(TrainerCallback):
    """After the step during which SIGTERM / SIGINT arrived: save a checkpoint and stop
    (:func:`fit` then exits instead of writing the unfinished model)."""

    def __init__(self, stop: StopFlag):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.signal:
            control.should_save = control.should_training_stop = True
        return control


def eval_rows(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows): a seeded random ``fraction`` of ``count`` rows held out
    (at least one when ``fraction > 0``, and at least one row left to train on).

    Raises:
        ValueError: a fraction outside ``[0, 1)``, or too few rows to hold any out.

    Example:
        >>> eval_rows(5, 0.4, seed=0)[1].__len__()
        2
    """
    if not (isinstance(fraction, int | float) and 0 <= fraction < 1):
        raise ValueError(f"eval_fraction must be in [0, 1), got {fraction!r}")
    held = 0 if fraction == 0 else max(1, round(count * fraction))
    if held and held >= count:
        raise ValueError(f"eval_fraction={fraction} leaves no training row of {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def check_rows(kind: str, values: Sequence[Any], *, where: str) -> None:
    """Refuse a None / NaN / empty / non-string ``kind`` cell, naming its row."""
    for row, value in enumerate(values):
        if not (isinstance(value, str) and value.strip()):
            raise ValueError(f"{where}: row {row}: {kind} must be a non-empty string, got "
                             f"{value!r:.80}")
