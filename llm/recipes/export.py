"""``drosim-llm export``: a run's policy as a Hugging Face model folder.

    export_model("runs/demo", "exported/")                      final/, else newest checkpoint
    export_model("runs/demo/checkpoints/iteration-000010", "exported/")

The folder (``config.json``, ``model.safetensors``, the tokenizer) loads with
``AutoModelForCausalLM.from_pretrained``, whether the checkpoint was written by an unsharded
run (safetensors) or a sharded one (``torch.distributed.checkpoint``, read here on one
process without a process group). A checkpoint holds weights only; the architecture and the
tokenizer come from the run's ``config.yaml`` (its ``model`` and ``tokenizer``: the cached
``base/`` for ``model: demo``). A LoRA run's policy (``lora_rank``) is written with its
adapter merged into the weights, a plain model, and the adapter alone in ``adapter/``
(``PeftModel.from_pretrained(base, folder / "adapter")`` reads it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from drosim.llm.components.checkpoint import (
    CHECKPOINTS_DIR,
    DCP_DIR,
    MODEL_FILE,
    CorruptCheckpointError,
    checkpoints_newest_first,
    is_sharded_checkpoint,
    verify_checkpoint,
)
from drosim.llm.components.config import load_config
from drosim.llm.components.lora import ADAPTER_DIR, apply_lora, is_lora, merged_copy
from drosim.output import LOCK_FILE, ensure_writable, locked

FINAL_DIR = "final"


def export_model(source: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the policy of a run directory or checkpoint as a Hugging Face model folder.

    Args:
        source: a run directory (its ``final/`` folder when the run finished, else its newest
            intact checkpoint) or one checkpoint directory of a run.
        out: the folder to write; it must not exist or be empty unless ``overwrite``.
        overwrite: replace a non-empty ``out``.

    Returns:
        The weights exported: the checkpoint or ``final/`` directory.

    Raises:
        FileExistsError: ``out`` is not empty and ``overwrite`` is not set.
        FileNotFoundError: no such run or checkpoint, or a run with nothing to export.
        CorruptCheckpointError: the checkpoint does not match its manifest.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out)
    if holds_files(out) and not overwrite:
        raise FileExistsError(f"--out {out} is not empty: choose another folder or pass "
                              "--overwrite")
    weights, run_dir = _weights_to_export(Path(source))
    if weights.name == FINAL_DIR:
        config_file = run_dir / "config.yaml"
        trust = config_file.is_file() and load_config(config_file).trust_remote_code
        model, tokenizer = load_pretrained_policy(str(weights), trust_remote_code=trust)
    else:
        model, tokenizer = _run_policy(run_dir)
        load_weights(model, weights)
    with claimed_output(out):
        write_pretrained(model, tokenizer, out, overwrite=overwrite)
    return weights


def holds_files(folder: Path) -> bool:
    """Whether ``folder`` exists and holds anything but a lock file (a folder written by a
    run that stopped before its output: empty for the purpose of writing it again), or is
    not a folder."""
    if not folder.exists():
        return False
    return not folder.is_dir() or any(p.name != LOCK_FILE for p in folder.iterdir())


@contextlib.contextmanager
def claimed_output(out: Path) -> Iterator[None]:
    """Create the output folder ``out`` and hold its lock (:func:`drosim.output.locked`)
    for the block: one writer at a time. If the block fails and ``out`` was new and holds
    nothing but the lock, it is removed again.

    Raises:
        OutputError: ``out`` cannot be created, or another process holds it (its pid named).
    """
    existed = out.exists()
    ensure_writable(out)
    with locked(out):
        try:
            yield
        except BaseException:  # only the lock's holder may remove the folder
            if not existed and not holds_files(out):
                shutil.rmtree(out, ignore_errors=True)
            raise


def _weights_to_export(source: Path) -> tuple[Path, Path]:
    """(the checkpoint or final/ folder to export, its run directory) for ``source``.

    Raises:
        FileNotFoundError, CorruptCheckpointError: see :func:`export_model`.
    """
    if not source.is_dir():
        raise FileNotFoundError(f"no run or checkpoint at {source}")
    if source.parent.name == CHECKPOINTS_DIR:  # one checkpoint: it must be intact
        verify_checkpoint(source)
        return source, source.parent.parent
    if (source / FINAL_DIR).is_dir():
        return source / FINAL_DIR, source
    for candidate in checkpoints_newest_first(source):
        try:
            verify_checkpoint(candidate)
        except (CorruptCheckpointError, FileNotFoundError) as error:
            print(f"drosim-llm: warning: {error}; trying the one before it", file=sys.stderr)
            continue
        return candidate, source
    raise FileNotFoundError(f"{source} holds no {FINAL_DIR}/ folder and no intact checkpoint "
                            "to export")


def load_pretrained_policy(source: str, *, tokenizer: str | None = None,
                           trust_remote_code: bool = False, dtype: str = "float32",
                           attn_implementation: str | None = None) -> tuple[nn.Module, object]:
    """A causal LM with ``dtype`` weights and its tokenizer (EOS as padding if it has none),
    from a local folder or a hub name; ``tokenizer`` None reads it from ``source``;
    ``attn_implementation`` None leaves transformers' default kernel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tokenizer or source,
                                           trust_remote_code=trust_remote_code)
    if loaded.pad_token is None:
        loaded.pad_token = loaded.eos_token
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype),
                                                 trust_remote_code=trust_remote_code, **extra)
    return model, loaded


def _run_policy(run_dir: Path) -> tuple[nn.Module, object]:
    """The run's initial policy (the architecture to load weights into, with the run's LoRA
    adapter when it had one) and tokenizer."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: cannot tell which model the "
                                "checkpoint belongs to")
    config = load_config(config_file)
    source = (str(run_dir / "base") if config.model == "demo"
              else recorded_source(run_dir, "model", config.model))
    tokenizer_source = config.tokenizer and recorded_source(run_dir, "tokenizer",
                                                            config.tokenizer)
    model, tokenizer = load_pretrained_policy(source, tokenizer=tokenizer_source,
                                              trust_remote_code=config.trust_remote_code,
                                              dtype=config.dtype)
    if config.lora_rank is not None:
        model = apply_lora(model, rank=config.lora_rank, alpha=config.lora_alpha,
                           dropout=config.lora_dropout,
                           target_modules=config.lora_target_modules)
    return model, tokenizer


def recorded_source(run_dir: Path, key: str, source: str) -> str:
    """Where the ``key`` a run's ``config.yaml`` records is, whatever the current folder.

    The trainer records local paths as absolute paths, so a relative one is a hub name, or
    a local path recorded by a run from before that: it is read relative to the run
    folder's parent when that exists there. One that looks like a local path (it starts
    with ``.`` or ``~``, or has more than one ``/``) and is not there is refused.

    Raises:
        FileNotFoundError: an absolute path that no longer exists, or a relative local path
            not found next to the run folder; the path named.
    """
    path = Path(source)
    if path.is_absolute():
        if not path.exists():
            raise FileNotFoundError(f"{run_dir / 'config.yaml'} records {key}={source!r}, "
                                    "which no longer exists: restore it to export the run")
        return source
    beside = run_dir.parent / path
    if beside.exists():
        return str(beside)
    if source.startswith((".", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"{run_dir / 'config.yaml'} records the relative path "
                                f"{key}={source!r}, not found at {beside}: put it there or "
                                "edit config.yaml to give its absolute path")
    return source  # a hub name ("org/name")


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load a checkpoint's weights into an unsharded ``model``, in place.

    A sharded (DCP) checkpoint is read on this process alone: DCP needs no process group to
    load, and gathers every shard of each tensor into the model's whole tensor.

    Raises:
        RuntimeError: names or shapes that do not match ``model``.
    """
    if is_sharded_checkpoint(checkpoint):
        state = {"model": model.state_dict()}
        # One process on purpose: DCP's warning that it assumes so is noise here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process")
            dcp.load(state, checkpoint_id=checkpoint / DCP_DIR, no_dist=True)
        model.load_state_dict(state["model"])
    else:
        safetensors.torch.load_model(model, checkpoint / MODEL_FILE, strict=True)


def write_pretrained(model: nn.Module, tokenizer, out: Path, *, overwrite: bool,
                     state_dict: dict[str, torch.Tensor] | None = None,
                     files: Mapping[str, str] | None = None) -> None:
    """Atomically write ``model`` (safetensors) and ``tokenizer`` as the folder ``out``.

    Written into a temporary sibling and renamed, so ``out`` is complete or absent. A LoRA
    ``PeftModel`` is written as a plain model with its adapter merged (a merged copy:
    ``model`` itself is unchanged) and its adapter alone in ``out/adapter``.

    Args:
        model: a ``transformers`` model, or a LoRA ``PeftModel`` wrapping one.
        tokenizer: its tokenizer.
        out: the folder to create.
        overwrite: replace an existing ``out`` (otherwise only an empty one is replaced).
        state_dict: the weights to write instead of ``model``'s own (e.g. the gathered full
            state of a sharded model); names that alias an earlier parameter of ``model``
            (tied embeddings) are dropped, as ``save_pretrained`` drops them from a model.
        files: more text files for the folder (name -> content), written with it.

    Raises:
        FileExistsError: ``out`` is not empty and ``overwrite`` is not set.
    """
    if holds_files(out) and not overwrite:
        raise FileExistsError(f"{out} is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    adapter = None
    if is_lora(model):
        adapter, model = model, merged_copy(model)
    if state_dict is not None:
        state_dict = {name: value for name, value in state_dict.items()
                      if name not in _tied_aliases(model)}
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        if adapter is not None:
            adapter.save_pretrained(tmp / ADAPTER_DIR)
        tokenizer.save_pretrained(tmp)
        for name, content in (files or {}).items():
            (tmp / name).write_text(content)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as an earlier-named one (e.g. GPT-2's
    ``lm_head.weight``, tied to ``transformer.wte.weight``)."""
    first: dict[int, str] = {}
    aliases = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases.add(name)
        first.setdefault(id(parameter), name)
    return aliases
