"""Output folders of the command lines: checked before any work, published all at once.

``ensure_writable`` is called before a long computation, so that an --out folder that cannot
be written fails at once instead of after minutes of work, and ``check_targets`` refuses a
folder where a file to be written is a folder (or a folder to be written into is a file).
``locked`` holds an advisory lock on the folder for the whole run, so that two writers never
interleave their files, and ``remove_stale_stages`` then removes the staging folders of runs
that were killed (``exclusive`` does both). ``staged`` lets a run write its files into a
hidden staging folder inside the output folder and moves them into place only when the run
has finished: an interrupted run (Ctrl-C, a crash) leaves the previous results as they
were, never new tables beside an old claims table.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePath

__all__ = ["OutputError", "check_targets", "ensure_writable", "exclusive", "locked",
           "publish", "remove_stale_stages", "staged"]

# A staging folder that an interrupted run left behind (for example after SIGKILL).
STAGING_PREFIX = ".incomplete-"
# Present in the output folder while a publish moves files into it.
MARKER = "INCOMPLETE"
# The advisory lock file of :func:`locked`; it holds the pid of its last holder.
LOCK_FILE = ".drosim.lock"


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


def check_targets(folder: Path, files: Iterable[str | PurePath]) -> None:
    """Refuse ``folder`` if one of ``files`` could not be written there for the type of what
    is in its way: the file's path holds a folder (or a device, a socket, ...), or one of
    the folders above it is a file. Nothing is created or changed.

    Args:
        folder: the output folder; it need not exist.
        files: paths relative to ``folder`` of the files a run will write.

    Raises:
        OutputError: the first file in the way; the message names its path and what to do.
    """
    folder = Path(folder)
    for relative in files:
        for parent in reversed(PurePath(relative).parents[:-1]):  # [:-1]: not "." itself
            path = folder / parent
            if path.exists() and not path.is_dir():
                raise OutputError(f"{path} is a file but the run writes files into a folder "
                                  f"of that name; move it away or choose another --out")
        target = folder / relative
        # A link is replaced, not followed, by the atomic rename: whatever it points to is fine.
        if not target.is_symlink() and target.exists() and not target.is_file():
            raise OutputError(f"{target} is not a regular file but the run writes a file "
                              f"there; move it away or choose another --out")


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` for the duration of the block.

    The lock is ``flock`` on ``folder/.drosim.lock``: the kernel releases it when its holder
    exits in any way (SIGKILL included), so a lock left by a killed process is simply taken
    over. The file keeps the holder's pid so that a refused writer can name it, and is
    removed when the block ends.

    Args:
        folder: an existing output folder.

    Raises:
        OutputError: another process holds the lock; the message names its pid.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder, locked(Path(folder)):
        ...     pass
    """
    path = Path(folder) / LOCK_FILE
    descriptor = _lock(path, folder)
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        # Removed while still held, so that a finished run leaves no trace; a writer that
        # opened it just before sees it gone once it gets the lock, and makes a new one.
        path.unlink(missing_ok=True)
        os.close(descriptor)  # closing the last descriptor releases the flock


def _lock(path: Path, folder: Path) -> int:
    """An open descriptor of the lock file ``path``, exclusively flocked.

    Args:
        path: the lock file (created if missing).
        folder: the output folder, for the message.

    Returns:
        The descriptor; the caller closes it to release the lock.

    Raises:
        OutputError: another process holds the lock; the message names its pid.
    """
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise OutputError(f"{folder} is in use by another drosim process (pid {holder}); "
                              f"wait for it to finish or choose another folder") from None
        try:
            if os.path.samestat(os.fstat(descriptor), os.stat(path)):
                return descriptor
        except FileNotFoundError:
            pass  # its holder removed it between our open and our flock: lock a new one
        os.close(descriptor)


def remove_stale_stages(folder: Path) -> list[Path]:
    """Remove the staging folders that killed runs left in ``folder`` (see :func:`staged`).

    A staging folder ``.incomplete-<pid>`` is stale when no process ``pid`` exists: a run
    killed by SIGKILL (or a power cut) cannot remove its own. One whose process is alive is
    kept, whoever that process is. Call it while holding :func:`locked`.

    Args:
        folder: the output folder.

    Returns:
        The folders removed, sorted.
    """
    removed = []
    for stage in sorted(Path(folder).glob(f"{STAGING_PREFIX}*")):
        pid = stage.name.removeprefix(STAGING_PREFIX)
        if not (pid.isdigit() and stage.is_dir() and not stage.is_symlink()):
            continue  # not a staging folder of ours
        if _alive(int(pid)):  # this process's own included
            continue
        shutil.rmtree(stage)
        removed.append(stage)
    return removed


@contextlib.contextmanager
def exclusive(folder: Path, prog: str) -> Iterator[None]:
    """:func:`locked` on ``folder``, after which the staging folders of killed runs are
    removed (:func:`remove_stale_stages`) with a one-line note on stderr.

    Args:
        folder: an existing output folder.
        prog: the command's name, for the note.

    Raises:
        OutputError: another process holds the lock; the message names its pid.
    """
    with locked(folder):
        removed = remove_stale_stages(folder)
        if removed:
            print(f"{prog}: note: removed {', '.join(stage.name for stage in removed)} from "
                  f"{folder}: the staging files of an earlier run that was killed before it "
                  f"finished (its results were never published)", file=sys.stderr)
        yield


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # none, or a number no pid can reach
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


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

    Raises:
        OutputError: a file is in the way of one of them (see :func:`check_targets`; then
            nothing is moved), or a move failed (then, if a file was moved before, the marker
            stays and says the folder is mixed); the one-line message names the path.
    """
    files = sorted(p.relative_to(stage) for p in stage.rglob("*") if p.is_file())
    final = [Path(name) for name in last]
    order = [p for p in files if p not in final] + [p for p in final if p in files]
    check_targets(folder, [*order, MARKER])  # e.g. a figure's name taken by a folder
    marker = folder / MARKER
    published = []
    relative = Path(MARKER)
    try:
        marker.write_text("drosim is moving a new run's files into this folder; if this file "
                          "is still here, that run was interrupted and the files are mixed.\n")
        for relative in order:
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / relative, target)
            published.append(target)
        marker.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if published:
            state = f"{folder} now mixes new and earlier files (its {MARKER} file says so)"
        else:  # nothing is mixed: leave the folder as it was
            with contextlib.suppress(OSError):
                marker.unlink(missing_ok=True)
            state = f"nothing was moved into {folder}"
        raise OutputError(f"cannot publish {folder / relative}: {reason}; {state}; fix the "
                          f"cause and run again") from None
    return published
