"""``drosim run`` / ``drosim study`` publish safely: one writer per --out, refusals that leave
no trace, and nothing half-written (issue 18).

Every check here is a stub (or the refusal comes before any check runs), so the file runs
in seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from drosim import cli
from drosim.output import LOCK_FILE, MARKER, STAGING_PREFIX, locked
from drosim.paper_checks import CheckResult
from drosim.paper_checks import __main__ as checks_cli

CHECK = "worst_case_curve"  # the check the stubs stand in for


def _snapshot(folder: Path) -> dict[str, object]:
    """Every entry under ``folder``: a folder as "dir", a file as its bytes."""
    tree: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        tree[name] = "dir" if path.is_dir() else path.read_bytes()
    return tree


def _no_work(*args, **kwargs):
    raise AssertionError("the command started computing before checking its --out")


def _previous_run(out: Path) -> None:
    """An earlier run's files in ``out``."""
    (out / "checks").mkdir(parents=True)
    (out / "checks" / "duality.md").write_text("old report\n")
    (out / "claims.md").write_text("old claims\n")
    (out / "worst_case_vs_rho.png").write_bytes(b"old figure")


class _Stub:
    """A check that draws one figure and reproduces its claim, in no time."""

    @staticmethod
    def run(preset: str, out: Path) -> CheckResult:
        (out / "worst_case_vs_rho.png").write_bytes(b"new figure")
        return CheckResult("C1", "stub", "p", "m", "reproduced", pd.DataFrame({"x": [1]}))


@pytest.fixture
def stub_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks_cli, "load_check", lambda name: _Stub)


@pytest.fixture
def no_check_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks_cli, "load_check", _no_work)


def _one_line_error(err: str) -> str:
    """The error of a refused run: stderr's last line, after the progress bar if any."""
    assert "Traceback" not in err and err.endswith("\n"), err
    before, _, line = err[:-1].rpartition("\n")
    line = line.rpartition("\r")[2]  # the bar, drawn on this line, was cleared by "\r"
    assert line.startswith("drosim: error: "), err
    assert "drosim: error: " not in before, err
    return line


# ------------------------------------------------ a path of the wrong type, found first

@pytest.mark.usefixtures("no_check_work")
@pytest.mark.parametrize(("make", "named"), [
    (lambda out: (out / "claims.csv").mkdir(), "claims.csv is not a regular file"),
    (lambda out: (out / "claims.md").mkdir(), "claims.md is not a regular file"),
    (lambda out: (out / "checks").write_text("a file\n"), "checks is a file"),
    (lambda out: (out / "tables").write_text("a file\n"), "tables is a file"),
    (lambda out: (out / "checks" / f"{CHECK}.md").mkdir(parents=True),
     f"{CHECK}.md is not a regular file"),
])
def test_run_refuses_a_path_of_the_wrong_type_before_computing(
        make, named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier\n")
    make(out)
    before = _snapshot(tmp_path)
    assert cli.main(["run", "--out", str(out), "--only", CHECK]) == 2
    err = _one_line_error(capsys.readouterr().err)
    assert named in err and str(out) in err and "choose another --out" in err
    assert _snapshot(tmp_path) == before  # nothing created or changed (no lock file either)


@pytest.mark.usefixtures("no_check_work")
def test_run_refuses_a_wrong_type_without_creating_the_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A parent of --out that is a file: refused, and no folder is made on the way."""
    (tmp_path / "a").write_text("a file\n")
    before = _snapshot(tmp_path)
    assert cli.main(["run", "--out", str(tmp_path / "a" / "b"), "--only", CHECK]) == 2
    _one_line_error(capsys.readouterr().err)
    assert _snapshot(tmp_path) == before


def test_study_refuses_its_table_path_as_a_folder(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "drosim.studies.updates",
                        SimpleNamespace(run=_no_work, plot=_no_work))
    (tmp_path / "updates.csv").mkdir()
    before = _snapshot(tmp_path)
    assert cli.main(["study", "updates", "--out", str(tmp_path)]) == 2
    assert "updates.csv is not a regular file" in _one_line_error(capsys.readouterr().err)
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------- a failure while publishing

@pytest.mark.usefixtures("stub_check")
def test_a_figure_path_of_the_wrong_type_found_late_changes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The figure's name is known only once the check ran: publish refuses before any move."""
    _previous_run(tmp_path)
    (tmp_path / "worst_case_vs_rho.png").unlink()
    (tmp_path / "worst_case_vs_rho.png").mkdir()
    before = _snapshot(tmp_path)
    assert cli.main(["run", "--out", str(tmp_path), "--only", CHECK]) == 2
    err = _one_line_error(capsys.readouterr().err)
    assert "worst_case_vs_rho.png is not a regular file" in err
    assert _snapshot(tmp_path) == before  # no staging folder, no marker, no lock file


@pytest.mark.usefixtures("stub_check")
@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_move_that_fails_is_one_line_and_says_what_is_left(
        fail_at: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A PermissionError on the first or second move: exit 2, one line, no traceback."""
    _previous_run(tmp_path)
    before = _snapshot(tmp_path)
    replace, calls = os.replace, []

    def failing_replace(source, target):
        calls.append(target)
        if len(calls) == fail_at:
            raise PermissionError(13, "Permission denied")
        replace(source, target)

    monkeypatch.setattr("drosim.output.os.replace", failing_replace)
    assert cli.main(["run", "--out", str(tmp_path), "--only", CHECK]) == 2
    err = _one_line_error(capsys.readouterr().err)
    assert f"cannot publish {calls[-1]}: Permission denied" in err
    after = _snapshot(tmp_path)
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*")) and LOCK_FILE not in after
    if fail_at == 1:  # nothing moved: the folder is as it was (an empty folder at most)
        assert "nothing was moved" in err
        assert {k: v for k, v in after.items() if v != "dir"} == \
            {k: v for k, v in before.items() if v != "dir"}
    else:  # one file moved: the marker says the folder is mixed
        assert "now mixes new and earlier files" in err and MARKER in after


# ----------------------------------------------------------- staging folders left behind

@pytest.mark.usefixtures("stub_check")
def test_a_run_removes_the_staging_folders_of_killed_runs_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    stale = tmp_path / f"{STAGING_PREFIX}{dead.pid}"
    live = tmp_path / f"{STAGING_PREFIX}{os.getppid()}"  # the process that started pytest
    for stage in (stale, live):
        stage.mkdir()
        (stage / "claims.md").write_text("half-written\n")
    assert cli.main(["run", "--out", str(tmp_path), "--only", CHECK]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("drosim: note: removed")]
    assert notes == [f"drosim: note: removed {stale.name} from {tmp_path}: the staging files "
                     "of an earlier run that was killed before it finished (its results were "
                     "never published)"]
    assert not stale.exists()
    assert (live / "claims.md").read_text() == "half-written\n"  # its process is alive


# ------------------------------------------------------------- an earlier claims.csv

@pytest.mark.usefixtures("stub_check")
def test_rows_with_a_blank_check_name_are_dropped_with_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    columns = list(checks_cli.CLAIM_COLUMNS)
    earlier = pd.DataFrame([dict.fromkeys(columns, "x") | {"check": name, "verdict": "reproduced"}
                            for name in ("duality", "", "rates", "  ")], columns=columns)
    earlier.to_csv(tmp_path / "claims.csv", index=False)
    assert cli.main(["run", "--out", str(tmp_path), "--only", CHECK]) == 0
    out = capsys.readouterr().out  # beside the other warnings about an earlier claims.csv
    assert (f"drosim: warning: {tmp_path / 'claims.csv'}: dropped the rows with no check name "
            "(data rows 2, 4, counted from 1 below the header)") in out
    claims = pd.read_csv(tmp_path / "claims.csv", keep_default_na=False)
    assert list(claims["check"]) == ["duality", CHECK, "rates"]


# ------------------------------------------------------------------- one writer per --out

_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from drosim.paper_checks import __main__ as checks_cli

    class Hold:  # a check that never ends
        @staticmethod
        def run(preset, out):
            (Path(out) / "started").write_text("")
            time.sleep(600)

    checks_cli.load_check = lambda name: Hold
    sys.exit(checks_cli.main(["--out", sys.argv[1], "--only", "duality"], prog="drosim"))
""")


def test_a_second_writer_is_refused_until_the_first_is_killed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stage = tmp_path / f"{STAGING_PREFIX}{holder.pid}"
    try:
        deadline = time.monotonic() + 60
        while not (stage / "started").exists():
            assert holder.poll() is None, holder.communicate()
            assert time.monotonic() < deadline, "the first writer never started"
            time.sleep(0.05)
        monkeypatch.setattr(checks_cli, "load_check", _no_work)
        before = _snapshot(tmp_path)
        assert cli.main(["run", "--out", str(tmp_path), "--only", CHECK]) == 2
        err = _one_line_error(capsys.readouterr().err)
        assert f"{tmp_path} is in use by another drosim process (pid {holder.pid})" in err
        assert _snapshot(tmp_path) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert stage.is_dir() and (tmp_path / LOCK_FILE).exists()  # what SIGKILL leaves
    monkeypatch.setattr(checks_cli, "load_check", lambda name: _Stub)
    assert cli.main(["run", "--out", str(tmp_path), "--only", CHECK]) == 0  # taken over
    assert f"removed {stage.name}" in capsys.readouterr().err
    assert not stage.exists() and not (tmp_path / LOCK_FILE).exists()
    assert (tmp_path / "worst_case_vs_rho.png").read_bytes() == b"new figure"


def test_study_refuses_a_locked_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "drosim.studies.updates",
                        SimpleNamespace(run=_no_work, plot=_no_work))
    with locked(tmp_path):
        before = _snapshot(tmp_path)
        assert cli.main(["study", "updates", "--out", str(tmp_path)]) == 2
        assert _snapshot(tmp_path) == before
    err = _one_line_error(capsys.readouterr().err)
    assert f"in use by another drosim process (pid {os.getpid()})" in err


# ------------------------------------------------------------------ drosim study's folder

def test_study_writes_into_a_folder_of_its_own(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """By default figures/studies/NAME, apart from figures/quick and figures/full."""
    def plot(frame: pd.DataFrame, out: Path) -> list[Path]:
        (out / "updates.png").write_bytes(b"figure")
        return [out / "updates.png"]

    monkeypatch.setitem(sys.modules, "drosim.studies.updates", SimpleNamespace(
        run=lambda preset, device, memory_budget: pd.DataFrame({"x": [1.5]}), plot=plot))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["study", "updates"]) == 0
    out = Path("figures") / "studies" / "updates"
    assert _snapshot(tmp_path) == {"figures": "dir", "figures/studies": "dir",
                                   str(out): "dir", f"{out}/updates.csv": b"x\n1.5\n",
                                   f"{out}/updates.png": b"figure"}
    assert capsys.readouterr().out == f"wrote {out}/updates.csv\nwrote {out}/updates.png\n"


# --------------------------------------------------------------------------- --help

@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["study", "--help"],
                                  ["worst-case", "--help"]])
def test_help_is_plain_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert "``" not in capsys.readouterr().out


def test_the_checks_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        checks_cli.main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "claims.csv" in out
