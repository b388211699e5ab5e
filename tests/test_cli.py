"""The command lines refuse bad input at once, clearly, and never leave mixed results.

``drosim study`` / ``drosim run`` check their --out folder and --device before any work;
``drosim worst-case`` refuses a losses file that is not one finite number per line; an
interrupted ``drosim run`` leaves the previous results untouched.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from drosim import __version__, cli
from drosim.output import MARKER, STAGING_PREFIX, OutputError, ensure_writable, staged
from drosim.paper_checks import CheckResult
from drosim.paper_checks import __main__ as checks_cli


def _unwritable(tmp_path: Path) -> Path:
    """A folder that cannot be created, even by root: its parent is a regular file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    return blocker / "out"


def _no_work(*args, **kwargs):
    raise AssertionError("the command started computing before checking its input")


@pytest.fixture
def no_study_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """``drosim study updates`` finds a study that fails if it is run."""
    monkeypatch.setitem(sys.modules, "drosim.studies.updates",
                        SimpleNamespace(run=_no_work, plot=_no_work))


# ---------------------------------------------------------------------------- --version

def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"drosim {__version__}"
    assert __version__[0].isdigit()


def test_llm_version(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    from drosim.llm import cli as llm_cli

    with pytest.raises(SystemExit) as exit_:
        llm_cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"drosim-llm {__version__}"


# ------------------------------------------------------------------- the output folder

def test_ensure_writable_creates_the_folder_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    ensure_writable(out)
    assert out.is_dir() and list(out.iterdir()) == []


def test_ensure_writable_names_the_folder(tmp_path: Path) -> None:
    out = _unwritable(tmp_path)
    with pytest.raises(OutputError, match=f"cannot write to the output folder {out}"):
        ensure_writable(out)


@pytest.mark.usefixtures("no_study_work")
def test_study_checks_its_output_folder_first(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = _unwritable(tmp_path)
    start = time.perf_counter()
    assert cli.main(["study", "updates", "--out", str(out)]) == 2
    assert time.perf_counter() - start < 3
    err = capsys.readouterr().err
    assert err.startswith("drosim: error: cannot write to the output folder")
    assert str(out) in err and "Traceback" not in err and err.count("\n") == 1


def test_run_checks_its_output_folder_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(checks_cli, "load_check", _no_work)
    out = _unwritable(tmp_path)
    start = time.perf_counter()
    assert cli.main(["run", "--out", str(out), "--only", "published_chi2"]) == 2
    assert time.perf_counter() - start < 3
    err = capsys.readouterr().err
    assert err.startswith("drosim: error: cannot write to the output folder")
    assert str(out) in err
    # The checks' own command line says the same.
    assert checks_cli.main(["--out", str(out)]) == 2
    assert str(out) in capsys.readouterr().err


def test_run_refuses_an_unknown_check(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--out", str(tmp_path), "--only", "nonsense"]) == 2
    assert "unknown check nonsense" in capsys.readouterr().err


# -------------------------------------------------------------------------- --device

@pytest.mark.usefixtures("no_study_work")
@pytest.mark.parametrize("device", ["foo", "cuda:abc", "meta"])
def test_study_refuses_an_unknown_device(device: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["study", "updates", "--device", device, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("drosim: error:") and repr(device) in err
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written either


@pytest.mark.usefixtures("no_study_work")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_study_refuses_cuda_without_cuda(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["study", "updates", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"drosim: error: --device cuda: CUDA is not available (this torch "
                   f"{torch.__version__} is built without CUDA or sees no GPU)\n")


# ------------------------------------------------------------------------ worst-case

@pytest.mark.parametrize(("content", "message"), [
    ("1.0 2.0\n3.0 4.0\n", "expected one loss per line, found 2 columns"),
    ("1.0,2.0\n", "not one number per line"),
    ("", "no losses (the input is empty)"),
    ("# only a comment\n\n", "no losses (the input is empty)"),
    ("1.0\nnan\n2.0\n", "loss number 2 is nan (losses must be finite; 1 are not)"),
    ("1.0\ninf\n", "loss number 2 is inf"),
    ("1.0\nabc\n", "not one number per line"),
])
def test_worst_case_refuses_a_bad_losses_file(content: str, message: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "losses.txt"
    file.write_text(content)
    assert cli.main(["worst-case", "chi2", "0.1", str(file)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"drosim: error: {file}: ")
    assert message in captured.err and captured.err.count("\n") == 1


def test_worst_case_refuses_a_missing_file(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["worst-case", "chi2", "0.1", str(tmp_path / "missing.txt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "can't open" in err and "missing.txt" in err and "Traceback" not in err


def test_worst_case_reads_one_loss_per_line(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "losses.txt"
    file.write_text("1.0\n2.0\n3.0\n4.0\n")
    assert cli.main(["worst-case", "chi2", "0.1", str(file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("n=4 mean=2.5 worst_case=")


# ----------------------------------------------------------- publishing a run at once

def _previous_run(out: Path) -> dict[str, str]:
    files = {"claims.md": "old claims\n", "claims.csv": "old,csv\n", "checks/duality.csv": "old\n",
             "worst_case_vs_rho.png": "old figure"}
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return files


def _contents(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): p.read_text() for p in out.rglob("*") if p.is_file()}


def test_staged_publishes_every_file_and_the_summary_last(tmp_path: Path) -> None:
    _previous_run(tmp_path)
    with staged(tmp_path, last=("claims.md",)) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(STAGING_PREFIX)
        (stage / "checks").mkdir()
        (stage / "checks" / "duality.csv").write_text("new\n")
        (stage / "claims.md").write_text("new claims\n")
        (stage / "new.png").write_text("new figure")
        assert _contents(tmp_path)["claims.md"] == "old claims\n"  # nothing moved yet
    assert _contents(tmp_path) == {"claims.md": "new claims\n", "claims.csv": "old,csv\n",
                                   "checks/duality.csv": "new\n", "new.png": "new figure",
                                   "worst_case_vs_rho.png": "old figure"}
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*")) and not (tmp_path / MARKER).exists()


def test_staged_leaves_the_previous_results_on_interrupt(tmp_path: Path) -> None:
    before = _previous_run(tmp_path)
    with pytest.raises(KeyboardInterrupt), staged(tmp_path) as stage:
        (stage / "claims.md").write_text("new claims\n")
        (stage / "worst_case_vs_rho.png").write_text("new figure")
        raise KeyboardInterrupt
    assert _contents(tmp_path) == before
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_interrupted_run_keeps_the_previous_results(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while a check runs, after it has drawn its figure: the folder is unchanged."""
    before = _previous_run(tmp_path)

    class Interrupted:
        @staticmethod
        def run(preset: str, out: Path) -> CheckResult:
            (out / "worst_case_vs_rho.png").write_text("new figure")
            raise KeyboardInterrupt

    monkeypatch.setattr(checks_cli, "load_check", lambda name: Interrupted)
    assert checks_cli.main(["--out", str(tmp_path), "--only", "worst_case_curve"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert _contents(tmp_path) == before
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_sigint_during_a_run_keeps_the_previous_results(tmp_path: Path) -> None:
    """A real Ctrl-C (SIGINT) to ``python -m drosim.paper_checks`` while a check computes."""
    before = _previous_run(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "drosim.paper_checks", "--out", str(tmp_path), "--only",
         "duality"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(f"{STAGING_PREFIX}*")):  # the checks have started
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    # 130, or the process ended by SIGINT itself (which a shell also reports as 130): a
    # signal landing in a callback of the import machinery is printed as ignored, the run
    # goes on, and the interpreter ends by SIGINT at exit; the run remembers the signal and
    # publishes nothing (it used to finish and publish, exit 0, in such a case).
    assert process.returncode in (130, -signal.SIGINT), err
    assert "interrupted: nothing written" in err
    assert _contents(tmp_path) == before
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_a_completed_run_replaces_the_summary(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _previous_run(tmp_path)

    class Quick:
        @staticmethod
        def run(preset: str, out: Path) -> CheckResult:
            (out / "worst_case_vs_rho.png").write_text("new figure")
            return CheckResult("C1", "t", "p", "m", "reproduced", pd.DataFrame({"x": [1]}))

    monkeypatch.setattr(checks_cli, "load_check", lambda name: Quick)
    assert checks_cli.main(["--out", str(tmp_path), "--only", "worst_case_curve"]) == 0
    files = _contents(tmp_path)
    assert files["worst_case_vs_rho.png"] == "new figure"
    assert "worst_case_curve" in files["claims.md"] and "worst_case_curve" in files["claims.csv"]
    assert "checks/worst_case_curve.csv" in files and files["checks/duality.csv"] == "old\n"
    assert files["checks/worst_case_curve.md"].startswith("# worst_case_curve: t")
    assert MARKER not in files and not list(tmp_path.glob(f"{STAGING_PREFIX}*"))
