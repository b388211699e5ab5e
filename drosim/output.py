"""Output folders of the command lines: checked before any work, published all at once.

``ensure_writable`` is called before a long computation, so that an --out folder that cannot
be written fails at once instead of after minutes of work. ``staged`` lets a run write its
files into a hidden staging folder inside the output folder and moves them into place only
when the run has finished: an interrupted run (Ctrl-C, a crash) leaves the previous
results as they were, never new tables beside an old claims table.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["OutputError", "ensure_writable", "publish", "staged"]

# A staging folder that an interrupted run left behind (for example after SIGKILL).
STAGING_PREFIX = ".incomplete-"
# Present in the output folder while a publish moves files into it.
MARKER = "INCOMPLETE"


class OutputError(ValueError):
    """The output folder cannot be created or written."""


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` (and its parents) and check a file can be written into it.

    Args:
        folder: the output folder.

    Raises:
        OutputError: the folder cannot be created, is not a folder, or a probe file
            cannot be written and removed there; the message names the folder.
    """
    folder = Path(folder)
    probe = folder / f".drosim-write-test-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputError(f"cannot write to the output folder {folder}: {reason}") from None


@contextlib.contextmanager
def staged(folder: Path, last: Sequence[str] = ()) -> Iterator[Path]:
    """A staging folder whose files are published into ``folder`` when the block succeeds.

    The staging folder is ``folder/.incomplete-<pid>``, on the same file system, so every
    file is moved into place by an atomic rename. If the block raises (KeyboardInterrupt
    included), the staging folder is removed and ``folder`` is left untouched.

    Args:
        folder: the output folder; it must exist (see :func:`ensure_writable`).
        last: relative paths of files published after all the others (the summary that
            refers to them, for example claims.md).

    Yields:
        The staging folder, empty.
    """
    stage = Path(folder) / f"{STAGING_PREFIX}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        publish(stage, Path(folder), last=last)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, folder: Path, last: Sequence[str] = ()) -> list[Path]:
    """Move every file under ``stage`` to the same relative path under ``folder``.

    Each move is an atomic rename that replaces an existing file. While the moves run, a file
    ``INCOMPLETE`` in ``folder`` says that its contents are mixed; it is removed once every
    file is in place, so a publish cut short is marked.

    Args:
        stage: the folder holding the new files.
        folder: where they go (on the same file system).
        last: relative paths moved after all the others.

    Returns:
        The published files' new paths, in the order they were moved.
    """
    files = sorted(p.relative_to(stage) for p in stage.rglob("*") if p.is_file())
    final = [Path(name) for name in last]
    order = [p for p in files if p not in final] + [p for p in final if p in files]
    marker = folder / MARKER
    marker.write_text("drosim is moving a new run's files into this folder; if this file is "
                      "still here, that run was interrupted and the files are mixed.\n")
    published = []
    for relative in order:
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / relative, target)
        published.append(target)
    marker.unlink()
    return published
