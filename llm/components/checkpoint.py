"""Atomic, exactly-resumable training checkpoints.

A run directory holds its checkpoints as::

    run_dir/checkpoints/
        iteration-000010/   model.safetensors  optimizer.pt  scheduler.pt  rng.pt  state.json
        iteration-000020/   ...
        latest              "iteration-000020": the one checkpoint a resume may trust

Resuming must be exact: a run killed at any moment and resumed from ``latest_checkpoint`` ends
with the same weights, bit for bit, as a run that was never interrupted. Two things make that
hold. Everything that decides the future of the run is saved: weights, optimizer and scheduler
state, the position in the prompt stream and every global random number generator. And a
checkpoint only gets its final name once all of its files are on disk, and ``latest`` is only
pointed at a complete checkpoint, so a crash while saving leaves the previous one in force.

Only the global generators (python ``random``, numpy's global state, torch CPU and CUDA) are
captured, and only in the process that saves; a trainer that draws from its own
``torch.Generator`` objects, or from different streams on each distributed rank, must put their
state in ``TrainState.extra`` or derive them from the iteration number.

A policy sharded with FSDP2 (``sharding: fsdp2``) is saved by every rank at once, through
``torch.distributed.checkpoint`` (DCP)::

    iteration-000010/   dcp/.metadata  dcp/__0_0.distcp  dcp/__1_0.distcp ...   (model and
                        optimizer, each rank writing its own shards)
                        scheduler.pt  rng-rank0.pt  rng-rank1.pt ...  state.json  manifest.json

with the same temporary directory, manifest (its names are paths inside the checkpoint) and
``latest`` pointer, written by rank 0 once every rank's files are in place. The ranks must
share the run directory's filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DataParallel, DistributedDataParallel

from drosim.llm.components.sharding import is_sharded

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"  # sha256 of every other file, written last
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
DCP_DIR = "dcp"  # a sharded checkpoint's model and optimizer
REQUIRED_SHARDED_FILES = (f"{DCP_DIR}/.metadata", STATE_FILE)
STATE_KEYS = ("iteration", "data_position", "extra")


class CorruptCheckpointError(ValueError):
    """A checkpoint whose files do not match its manifest (or miss one)."""

# A checkpoint is first written to ".tmp-<final name>-<random>" next to its final place.
_TMP_PREFIX = ".tmp-"
_CHECKPOINT_NAME = re.compile(r"iteration-(\d+)")


@dataclass(frozen=True)
class TrainState:
    """Where a run stands, besides its weights, optimizer, scheduler and RNG state.

    Attributes:
        iteration: number of completed training iterations.
        data_position: number of prompts consumed from the prompt stream.
        extra: anything else to carry over (the config dict, metrics so far); must be
            JSON-serialisable.
    """

    iteration: int
    data_position: int
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(iteration: int) -> str:
    """The directory name of the checkpoint taken after ``iteration`` iterations."""
    return f"iteration-{iteration:06d}"


# ------------------------------------------------------------------------------------- saving


def save_checkpoint(
    run_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    state: TrainState,
    keep: int = 2,
) -> Path:
    """Atomically write a checkpoint of the run and point ``latest`` at it.

    A sharded model (:func:`drosim.llm.components.sharding.shard_policy`) is saved in the sharded
    format by :func:`save_sharded_checkpoint`: every rank must then call this function.

    The checkpoint is written into a temporary sibling directory, every file is fsynced, and
    only then is the directory renamed to ``run_dir/checkpoints/iteration-NNNNNN`` and
    ``latest`` rewritten (a temporary file plus ``os.replace``). Old checkpoints are deleted
    after that. A crash at any point leaves ``latest_checkpoint`` naming a complete checkpoint:
    the previous one, or the new one once it is in place.

    Saving an iteration that already has a checkpoint directory replaces it; this happens when
    a finished run is resumed and saves its last iteration again, or when a crash came after a
    checkpoint was renamed into place but before ``latest`` named it.

    Args:
        run_dir: the run's output directory; ``checkpoints/`` is created inside it.
        model: the policy; a ``DistributedDataParallel``/``DataParallel`` wrapper is unwrapped
            so the saved names carry no ``module.`` prefix.
        optimizer: its state dict goes to ``optimizer.pt``.
        scheduler: its state dict goes to ``scheduler.pt``; ``None`` writes no such file.
        state: iteration, prompt-stream position and JSON-serialisable extras.
        keep: how many checkpoints to keep: this one and the ``keep - 1`` newest before it.

    Returns:
        The path of the new checkpoint directory.

    Raises:
        ValueError: if ``keep`` < 1 or ``state.iteration`` < 0.
        TypeError: if ``state.extra`` is not JSON-serialisable (raised before anything is
            written).
        OSError: the checkpoint cannot be written (a full disk, no permission); nothing of
            it is left and ``latest`` still names the previous one.
    """
    if is_sharded(model):
        return save_sharded_checkpoint(run_dir, model=model, optimizer=optimizer,
                                       scheduler=scheduler, state=state, keep=keep)
    state_json = _state_json(state, keep)
    root = Path(run_dir) / CHECKPOINTS_DIR
    with _write_failure_as_oserror(root, state.iteration) as staging:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{checkpoint_name(state.iteration)}-",
                                    dir=root))
        staging.append(tmp)
        safetensors.torch.save_model(_unwrap(model), str(tmp / MODEL_FILE))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        torch.save(_rng_state(), tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(state_json)
        return _commit(tmp, iteration=state.iteration, keep=keep)


@contextlib.contextmanager
def _write_failure_as_oserror(root: Path, iteration: int):
    """Turn a failure to write a checkpoint into one ``OSError`` naming it, after removing
    its temporary directory (the paths the block appends to the yielded list), so the
    previous checkpoint stays the one in force and nothing half-written is left.

    A full disk or a refused write reaches here as ``OSError``, as ``RuntimeError`` from
    torch's zip writer (which does not say why) or as ``SafetensorError``: the error code is
    the ``OSError``'s own, else ENOSPC when the file system is (nearly) full, else EIO.

    Raises:
        OSError: ``[Errno N] cannot write the checkpoint of iteration I in ROOT (reason) ...``.
    """
    staging: list[Path] = []
    try:
        yield staging
    except (OSError, RuntimeError, SafetensorError, CheckpointException) as error:
        code = getattr(error, "errno", None) or _full_disk_errno(root)
        for path in staging:
            shutil.rmtree(path, ignore_errors=True)
        reason = getattr(error, "strerror", None) or os.strerror(code)
        raise OSError(code, _failure_message(root, iteration, reason)) from error


def _failure_message(root: Path, iteration: int, reason: str) -> str:
    """The one line of a checkpoint that could not be written, naming the one kept."""
    kept = _read_latest(root) if root.is_dir() else None
    return (f"cannot write the checkpoint of iteration {iteration} in {root} ({reason}); the "
            f"previous checkpoint ({kept or 'none yet'}) is kept: free space or fix the "
            "folder's permissions, then --resume")


def _full_disk_errno(root: Path) -> int:
    """ENOSPC when the file system holding ``root`` has less than 1 MiB free, else EIO."""
    folder = next((p for p in (root, *root.parents) if p.exists()), Path("/"))
    return errno.ENOSPC if shutil.disk_usage(folder).free < 1 << 20 else errno.EIO


def save_sharded_checkpoint(
    run_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    state: TrainState,
    keep: int = 2,
) -> Path:
    """Atomically write a checkpoint of a sharded run; every rank calls it.

    Each rank writes its shards of the model and optimizer state (DCP) and its generators'
    state into one temporary directory that rank 0 created; after a barrier rank 0 writes
    the scheduler, state and manifest and renames the directory into place exactly as
    :func:`save_checkpoint` does. Arguments, return value and errors as
    :func:`save_checkpoint`.
    """
    state_json = _state_json(state, keep)
    root = Path(run_dir) / CHECKPOINTS_DIR
    main = dist.get_rank() == 0
    with _sharded_write_failure_as_oserror(root, state.iteration) as staging:
        tmp = [None]
        if main:
            root.mkdir(parents=True, exist_ok=True)
            tmp = [tempfile.mkdtemp(
                prefix=f"{_TMP_PREFIX}{checkpoint_name(state.iteration)}-", dir=root)]
            staging.append(Path(tmp[0]))
        _agree_or_raise(False)  # rank 0 could make the temporary directory
        dist.broadcast_object_list(tmp)
        tmp = Path(tmp[0])
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 checkpoint_id=tmp / DCP_DIR)
        rng_file = tmp / _rank_rng_file(dist.get_rank())
        torch.save(_rng_state(), rng_file)
        # Each rank flushes what it wrote (DCP its shards): on a filesystem shared by several
        # nodes, rank 0's fsync in _commit need not reach another node's writes.
        _fsync(rng_file)
        _agree_or_raise(False)  # every rank's files are written
        if main:
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            (tmp / STATE_FILE).write_text(state_json)
            _commit(tmp, iteration=state.iteration, keep=keep)
        _agree_or_raise(False)  # the checkpoint is in place before any rank goes on
    return root / checkpoint_name(state.iteration)


class _PeerFailed(Exception):
    """Another rank failed to write its part of a sharded checkpoint."""


def _agree_or_raise(failed: bool) -> None:
    """A barrier that also tells every rank whether one of them failed (``failed``), so that
    all leave a sharded save together instead of hanging in the next collective."""
    flags: list[bool | None] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, failed)
    if any(flags):
        raise _PeerFailed


@contextlib.contextmanager
def _sharded_write_failure_as_oserror(root: Path, iteration: int):
    """:func:`_write_failure_as_oserror` for every rank of a sharded save: a rank whose write
    failed tells the others at the next agreement (:func:`_agree_or_raise`), and every rank
    raises the same one-line ``OSError`` (rank 0, the only one that stages, removes the
    temporary directory).

    DCP reports a failed write on any rank to every rank as a ``CheckpointException``.
    """
    with _write_failure_as_oserror(root, iteration) as staging:
        try:
            yield staging
        except _PeerFailed:
            raise OSError(_full_disk_errno(root), "another rank could not write its shards"
                          ) from None
        except (OSError, RuntimeError, SafetensorError, CheckpointException):
            with contextlib.suppress(_PeerFailed):
                _agree_or_raise(True)
            raise


def _state_json(state: TrainState, keep: int) -> str:
    """The checkpoint's ``state.json`` text, after checking the arguments of a save: a bad
    ``extra`` or ``keep`` fails before any file is touched.

    Raises:
        ValueError: if ``keep`` < 1 or ``state.iteration`` < 0.
        TypeError: if ``state.extra`` is not JSON-serialisable.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    if state.iteration < 0:
        raise ValueError(f"state.iteration must be non-negative, got {state.iteration}")
    return json.dumps({"iteration": state.iteration, "data_position": state.data_position,
                       "extra": state.extra}, indent=2)


def _rank_rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def _commit(tmp: Path, *, iteration: int, keep: int) -> Path:
    """Give the complete temporary checkpoint ``tmp`` its final name and point ``latest`` at it.

    Writes the manifest (sha256 of every file, by its path inside the checkpoint), fsyncs
    every file and directory, renames, rewrites ``latest`` and prunes old checkpoints.
    """
    root = tmp.parent
    name = checkpoint_name(iteration)
    files = sorted(file for file in tmp.rglob("*") if file.is_file())
    manifest = {file.relative_to(tmp).as_posix(): _sha256(file) for file in files}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    for path in sorted(tmp.rglob("*"), reverse=True):  # files before their directories
        _fsync(path)
    _fsync(tmp)

    final = root / name
    if final.exists():
        if _read_latest(root) == name:
            # `latest` must never name a directory that is being replaced: point it at the
            # complete temporary copy while the old one is deleted.
            _write_latest(root, tmp.name)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    _write_latest(root, name)
    _prune(root, newest=iteration, keep=keep)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(path: str | Path) -> None:
    """Check a checkpoint against its manifest: every listed file present with its sha256,
    and ``state.json`` holding every key. A checkpoint written before manifests existed is
    checked for its files and keys only.

    Raises:
        FileNotFoundError: ``path`` is not a directory, or a required file is missing.
        CorruptCheckpointError: naming the checkpoint and what is wrong (a truncated or
            overwritten file, an unreadable state or one without a key).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}: not a directory")
    required = REQUIRED_SHARDED_FILES if is_sharded_checkpoint(path) else REQUIRED_FILES
    missing = [file for file in required if not (path / file).is_file()]
    if missing:
        raise FileNotFoundError(f"incomplete checkpoint {path}: missing {', '.join(missing)}")
    if (path / MANIFEST_FILE).is_file():
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
        except json.JSONDecodeError as err:
            raise CorruptCheckpointError(f"checkpoint {path}: unreadable manifest "
                                         f"({err})") from None
        changed = [name for name, digest in manifest.items()
                   if not (path / name).is_file() or _sha256(path / name) != digest]
        if changed:
            raise CorruptCheckpointError(f"checkpoint {path}: {', '.join(changed)} "
                                         "missing or changed since it was saved")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except json.JSONDecodeError as err:
        raise CorruptCheckpointError(f"checkpoint {path}: unreadable {STATE_FILE} "
                                     f"({err})") from None
    absent = [key for key in STATE_KEYS if key not in state]
    if absent:
        raise CorruptCheckpointError(f"checkpoint {path}: {STATE_FILE} lacks "
                                     f"{', '.join(absent)}")


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` was written by a sharded run (DCP format)."""
    return (Path(path) / DCP_DIR).is_dir()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module a DDP or DataParallel wrapper holds, so the checkpoint loads unwrapped."""
    if isinstance(model, DistributedDataParallel | DataParallel):
        return model.module
    return model


def _rng_state() -> dict[str, Any]:
    """Every global generator's state, in types that ``torch.load(weights_only=True)`` accepts.

    Python's ``random.getstate()`` is a tuple of ints, which the weights-only unpickler
    accepts; numpy's state holds an ndarray, which it does not, so its key becomes a list.
    """
    # The legacy global state is what np.random.* calls in user code draw from.
    np_state = np.random.get_state(legacy=False)  # noqa: NPY002
    return {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(),
                                        "pos": np_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        # Querying CUDA's state would initialise CUDA in a CPU-only run; an uninitialised CUDA
        # has not drawn anything, so there is nothing to save.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    }


def _write_latest(root: Path, name: str) -> None:
    """Atomically make ``root/latest`` hold ``name``."""
    tmp = root / f"{_TMP_PREFIX}{LATEST_FILE}"
    try:
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / LATEST_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)  # `latest` still names the previous checkpoint
        raise
    _fsync(root)


def _prune(root: Path, *, newest: int, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints up to ``newest``, and any leftovers.

    Checkpoints numbered after ``newest`` belong to an abandoned continuation (the run was
    resumed from an earlier point), and temporary directories are saves that never finished;
    neither can be named by ``latest`` once this save is in place.
    """
    iterations = sorted(
        (int(match.group(1)), path)
        for path in root.iterdir()
        if path.is_dir() and (match := _CHECKPOINT_NAME.fullmatch(path.name))
    )
    kept = [path for iteration, path in iterations if iteration <= newest][-keep:]
    for _, path in iterations:
        if path not in kept:
            shutil.rmtree(path)
    for path in root.glob(f"{_TMP_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk so a power loss cannot reorder them."""
    if path.is_dir() and os.name != "posix":
        return  # only POSIX can open a directory to fsync it
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ loading


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint that ``run_dir/checkpoints/latest`` names.

    Checkpoint directories that ``latest`` does not name (a save that crashed before updating
    it) and temporary directories are ignored.

    Args:
        run_dir: the run's output directory.

    Returns:
        The checkpoint directory, or ``None`` when the run has no ``latest`` pointer yet.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    name = _read_latest(root)
    if name is None:
        return None
    path = root / name
    if name.startswith(_TMP_PREFIX) and not path.exists():
        # While replacing the checkpoint `latest` named, save_checkpoint pointed `latest` at
        # the complete temporary directory; a crash right after renaming that directory into
        # place leaves `latest` naming it by its old name ".tmp-<final name>-<random>".
        path = root / name.removeprefix(_TMP_PREFIX).rsplit("-", 1)[0]
    return path


def checkpoints_newest_first(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints to resume from, in order of preference: the one ``latest``
    names, then every other complete checkpoint directory, newest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    latest = latest_checkpoint(run_dir)
    others = sorted((p for p in root.glob("iteration-*")
                     if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name) and p != latest),
                    key=lambda p: p.name, reverse=True) if root.is_dir() else []
    return ([latest] if latest is not None else []) + others


def _read_latest(root: Path) -> str | None:
    """The directory name ``root/latest`` holds, or ``None`` when there is no such file."""
    try:
        return (root / LATEST_FILE).read_text().strip()
    except FileNotFoundError:
        return None


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    map_location: str | torch.device = "cpu",
) -> TrainState:
    """Restore a run from a checkpoint written by :func:`save_checkpoint`.

    A sharded model loads a sharded checkpoint, every rank calling this function with its
    own shards of ``model`` and ``optimizer``.

    Weights (strictly: every name must match), optimizer and scheduler state are loaded in
    place, and every global generator (python ``random``, numpy, torch CPU, and CUDA where the
    checkpoint has CUDA state and CUDA is available) is reset to its state at save time.

    Args:
        path: a checkpoint directory, e.g. ``latest_checkpoint(run_dir)``.
        model: the policy, built as when saving; a DDP/DataParallel wrapper is unwrapped.
        optimizer: built over ``model``'s parameters, as when saving.
        scheduler: built over ``optimizer`` as when saving, or ``None`` to skip it.
        map_location: where tensors are read to before being copied into ``model`` and
            ``optimizer`` (which keep their own devices).

    Returns:
        The saved :class:`TrainState`.

    Raises:
        FileNotFoundError, CorruptCheckpointError: the checkpoint fails
            :func:`verify_checkpoint` or misses ``scheduler.pt`` when ``scheduler`` is given
            (checked before anything is loaded).
        ValueError: a sharded checkpoint for an unsharded model, or the reverse.
        RuntimeError: if the saved weights do not match ``model``'s names or shapes.
    """
    path = Path(path)
    verify_checkpoint(path)
    if scheduler is not None and not (path / SCHEDULER_FILE).is_file():
        raise FileNotFoundError(f"incomplete checkpoint {path}: missing {SCHEDULER_FILE}")
    if is_sharded_checkpoint(path) != is_sharded(model):
        written, given = ("sharded", "an unsharded") if is_sharded_checkpoint(path) else (
            "unsharded", "a sharded")
        raise ValueError(f"checkpoint {path} was written by a {written} run and cannot be "
                         f"loaded into {given} model: resume with the run's own sharding, or "
                         "turn it into a model folder with `drosim-llm export`")

    if is_sharded(model):
        model_state, optimizer_state = get_state_dict(model, optimizer)
        saved = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(saved, checkpoint_id=path / DCP_DIR)
        set_state_dict(model, optimizer, model_state_dict=saved["model"],
                       optim_state_dict=saved["optimizer"])
        rng_file = _rank_rng_file(dist.get_rank())
    else:
        safetensors.torch.load_model(_unwrap(model), path / MODEL_FILE, strict=True,
                                     device=str(map_location))
        optimizer.load_state_dict(
            torch.load(path / OPTIMIZER_FILE, map_location=map_location, weights_only=True)
        )
        rng_file = RNG_FILE
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    # Generator states must be CPU byte tensors whatever map_location says. A sharded run
    # resumed on more ranks than it was saved on has no saved state for the new ranks.
    if (path / rng_file).is_file():
        _set_rng_state(torch.load(path / rng_file, map_location="cpu", weights_only=True))

    saved = json.loads((path / STATE_FILE).read_text())
    return TrainState(iteration=saved["iteration"], data_position=saved["data_position"],
                      extra=saved["extra"])


def _set_rng_state(states: dict[str, Any]) -> None:
    """Reset every global generator to the states ``_rng_state`` returned."""
    random.setstate(states["python"])
    np_state = states["numpy"]
    np.random.set_state({**np_state, "state": {  # noqa: NPY002
        "key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
        "pos": np_state["state"]["pos"]}})
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        # A run resumed on fewer GPUs than it was saved on cannot be bitwise exact anyway;
        # restore the devices that exist.
        for device, cuda_state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


# ------------------------------------------------------------------ a model folder's files


def check_model_folder(key: str, source: str) -> None:
    """Refuse a local model folder whose files are damaged: every top-level ``.json`` file
    must parse and every ``.safetensors`` file must be as long as its header says (a copy or
    download cut short). A hub name is left to ``from_pretrained``, which checks what it
    downloads.

    Args:
        key: the config key or argument naming ``source`` (for the message).
        source: a local folder or a hub name.

    Raises:
        ValueError: naming ``key``, the file and what is wrong.
    """
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.json")):
        try:
            json.loads(file.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{key}={source!r}: {file.name} is not valid JSON "
                             f"({error}): copy or download the folder again") from None
    for file in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise ValueError(f"{key}={source!r}: {file.name} is truncated or damaged "
                             f"({problem}): copy or download the folder again")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a ``.safetensors`` file's layout (its 8-byte header length, JSON
    header and the size its tensors' offsets imply), or None; reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than the 8-byte header length"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"a header of {length} bytes in a file of {size}"
        try:
            header = json.loads(f.read(length))
            end = max((int(entry["data_offsets"][1]) for name, entry in header.items()
                       if name != "__metadata__"), default=0)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError,
                ValueError, AttributeError) as error:
            return f"unreadable header: {error}"
    if 8 + length + end != size:
        return f"{size} bytes, but its header describes {8 + length + end}"
    return None
