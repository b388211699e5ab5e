"""Tests of the paper checks: the solver checks on their quick preset, the command line end to
end, and (marked slow) the main job: every registered check on its quick preset.

The expected claims and table columns are written out here (not read from the modules) so
that a change to what a check reports shows up as a test failure. The simulator checks are
tested on small settings next to their studies (tests/test_studies_*.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from drosim.paper_checks import CHECKS, VERDICTS, CheckResult, load_check
from drosim.paper_checks import __main__ as cli

# check name -> (claim, detail-table columns, files written to the output folder)
EXPECTED: dict[str, tuple[str, list[str], list[str]]] = {
    "duality": (
        "C1, C6",
        ["set", "n", "rho", "comparisons", "skipped", "max_gap", "max_primal_gap",
         "max_dual_gap", "max_infeasibility", "max_regulariser_gap"],
        [],
    ),
    "worst_case_curve": (
        "C1 (figure)",
        ["set", "rho", "ours", "cvxpy", "status", "gap"],
        ["worst_case_vs_rho.png", "worst_case_vs_rho.pdf"],
    ),
    "published_chi2": (
        "anchors",
        ["rho", "n", "seed", "exact_ours", "exact_cvxpy", "cvxpy_status", "published", "mean",
         "published_below_mean", "anchors_exact", "anchors_published", "anchors_mean"],
        [],
    ),
}


def _fake_result(verdict: str) -> CheckResult:
    return CheckResult("C0", "title", "paper", "measured", verdict, pd.DataFrame({"x": [1]}))


def test_the_solver_checks_are_registered() -> None:
    assert set(EXPECTED) <= set(CHECKS)


def test_check_result_rejects_an_unknown_verdict() -> None:
    with pytest.raises(ValueError, match="verdict"):
        _fake_result("probably")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_check_reproduces_on_quick_preset(name: str, tmp_path: Path) -> None:
    claim, columns, files = EXPECTED[name]
    result = load_check(name).run("quick", out=tmp_path)

    assert isinstance(result, CheckResult)
    assert result.claim == claim
    assert result.title and result.paper_says and result.measured
    # Every check here measures our exact solvers (or the public code's defect) on fixed seeds:
    # a verdict other than "reproduced" means a solver or a reference changed.
    assert result.verdict == "reproduced", result.measured
    assert list(result.table.columns) == columns
    assert len(result.table) > 0
    for file in files:
        assert (tmp_path / file).stat().st_size > 0


def test_published_chi2_matches_the_first_reference_row() -> None:
    # Seed 0 happens to be the reference values' sample for (rho, n) = (0.01, 64).
    table = load_check("published_chi2").run("quick").table
    row = table[(table["rho"] == 0.01) & (table["n"] == 64)].iloc[0]
    for ours, anchors in (("exact_ours", "anchors_exact"), ("published", "anchors_published"),
                          ("mean", "anchors_mean")):
        assert row[ours] == pytest.approx(row[anchors], abs=5e-5)


def test_report_shouts_when_a_claim_does_not_reproduce() -> None:
    assert "*** NOT REPRODUCED ***" in cli.report("fake", _fake_result("not reproduced"), 1.0)
    assert "NOT REPRODUCED" not in cli.report("fake", _fake_result("reproduced"), 1.0)


def _run_command_line(out: Path, *names: str) -> subprocess.CompletedProcess:
    # Run from the output folder, outside the checkout: the installed package is what runs.
    only = ["--only", *names] if names else []
    return subprocess.run([sys.executable, "-m", "drosim.paper_checks", "--out", str(out),
                           *only], cwd=out, capture_output=True, text=True, timeout=1800)


def _assert_claims_written(out: Path, run: subprocess.CompletedProcess, names) -> None:
    assert run.returncode == 0, run.stderr
    claims = pd.read_csv(out / "claims.csv")
    assert list(claims["check"]) == list(names)
    assert list(claims.columns) == ["check", "claim", "title", "paper_says", "measured",
                                    "verdict", "seconds"]
    assert set(claims["verdict"]) <= set(VERDICTS)
    assert (out / "claims.md").read_text().count("\n") == len(names) + 2
    for name in names:
        assert (out / "checks" / f"{name}.csv").exists()
        assert f"== {name}:" in run.stdout


def test_command_line_writes_the_claims_table(tmp_path: Path) -> None:
    run = _run_command_line(tmp_path, *EXPECTED)
    _assert_claims_written(tmp_path, run, list(EXPECTED))
    assert (tmp_path / "worst_case_vs_rho.png").exists()


@pytest.mark.slow
def test_main_job_runs_every_check_on_the_quick_preset(tmp_path: Path) -> None:
    run = _run_command_line(tmp_path)
    _assert_claims_written(tmp_path, run, list(CHECKS))


def test_a_crashing_check_fails_the_run_but_is_recorded(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(preset: str, out: Path) -> CheckResult:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "load_check", lambda name: SimpleNamespace(run=crash))

    assert cli.main(["--out", str(tmp_path), "--only", "duality"]) == 1
    claims = pd.read_csv(tmp_path / "claims.csv")
    assert list(claims["verdict"]) == ["crashed"]
    assert "RuntimeError: boom" in claims.loc[0, "measured"]


def test_rerunning_one_check_updates_its_row_and_keeps_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def result(verdict: str):
        def run(preset: str, out: Path) -> CheckResult:
            return CheckResult("C0", "t", "p", f"measured {verdict}", verdict, pd.DataFrame())
        return SimpleNamespace(run=run)

    monkeypatch.setattr(cli, "load_check", lambda name: result("reproduced"))
    assert cli.main(["--out", str(tmp_path), "--only", "rates", "duality"]) == 0
    monkeypatch.setattr(cli, "load_check", lambda name: result("not reproduced"))
    assert cli.main(["--out", str(tmp_path), "--only", "rates"]) == 0
    claims = pd.read_csv(tmp_path / "claims.csv")
    # CHECKS order, the rerun row replaced, the other kept
    assert list(claims["check"]) == ["duality", "rates"]
    assert list(claims["verdict"]) == ["reproduced", "not reproduced"]
    assert "| rates |" in (tmp_path / "claims.md").read_text()


@pytest.mark.parametrize("text", ["old\n", "", "\x00\xff garbage"])
def test_a_claims_file_that_is_not_a_table_is_replaced_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, text: str) -> None:
    (tmp_path / "claims.csv").write_text(text, errors="surrogateescape")
    done = CheckResult("C0", "t", "p", "m", "reproduced", pd.DataFrame())
    monkeypatch.setattr(cli, "load_check", lambda name: SimpleNamespace(run=lambda p, out: done))
    assert cli.main(["--out", str(tmp_path), "--only", "rates"]) == 0
    assert "is not a claims table" in capsys.readouterr().out
    assert list(pd.read_csv(tmp_path / "claims.csv")["check"]) == ["rates"]
