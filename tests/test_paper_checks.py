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
from drosim.paper_checks._framework import HEADLINE_MAX_CHARS, REASON_MAX_CHARS

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


def _fake_result(verdict: str, reason: str = "why", headline: str = "1.0 [0.9, 1.1]"
                 ) -> CheckResult:
    return CheckResult("C0", "title", "paper", "measured", verdict, pd.DataFrame({"x": [1]}),
                       reason=reason, headline=headline)


def test_the_solver_checks_are_registered() -> None:
    assert set(EXPECTED) <= set(CHECKS)


def test_check_result_rejects_an_unknown_verdict() -> None:
    with pytest.raises(ValueError, match="verdict"):
        _fake_result("probably")


def test_reason_and_headline_default_to_empty() -> None:
    result = CheckResult("C0", "t", "p", "m", "reproduced", pd.DataFrame())
    assert result.reason == "" and result.headline == ""


@pytest.mark.parametrize(("field", "limit"), [("reason", REASON_MAX_CHARS),
                                              ("headline", HEADLINE_MAX_CHARS)])
def test_reason_and_headline_are_one_short_line(field: str, limit: int) -> None:
    assert getattr(_fake_result("reproduced", **{field: "x" * limit}), field) == "x" * limit
    with pytest.raises(ValueError, match=f"{field} must be at most {limit}"):
        _fake_result("reproduced", **{field: "x" * (limit + 1)})
    with pytest.raises(ValueError, match=f"{field} must be one line"):
        _fake_result("reproduced", **{field: "first line\nsecond line"})
    with pytest.raises(TypeError, match=f"{field} must be a string"):
        _fake_result("reproduced", **{field: None})


@pytest.mark.parametrize("name", list(EXPECTED))
def test_check_reproduces_on_quick_preset(name: str, tmp_path: Path) -> None:
    claim, columns, files = EXPECTED[name]
    result = load_check(name).run("quick", out=tmp_path)

    assert isinstance(result, CheckResult)
    assert result.claim == claim
    assert result.title and result.paper_says and result.measured
    assert result.reason and result.headline
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
    claims = pd.read_csv(out / "claims.csv", keep_default_na=False)
    assert list(claims["check"]) == list(names)
    assert list(claims.columns) == ["check", "claim", "title", "paper_says", "measured",
                                    "verdict", "reason", "headline", "seconds"]
    assert set(claims["verdict"]) <= set(VERDICTS)
    # Every check gives a reason and a headline (rates and preference_shift included: the
    # main job below covers them).
    assert claims["reason"].str.len().gt(0).all() and claims["headline"].str.len().gt(0).all()
    _assert_summary_is_short(out / "claims.md", names)
    for name in names:
        assert (out / "checks" / f"{name}.csv").exists()
        details = (out / "checks" / f"{name}.md").read_text()
        assert details.startswith(f"# {name}: ") and "## What was measured" in details
        assert f"== {name}:" in run.stdout


def _assert_summary_is_short(path: Path, names) -> None:
    """claims.md: a header, a rule and one row per check, no cell over 400 characters."""
    lines = path.read_text().splitlines()
    assert len(lines) == len(names) + 2
    assert lines[0] == "| check | claim | verdict | reason | headline |"
    for line, name in zip(lines[2:], names, strict=True):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert len(cells) == 5 and cells[0] == f"[{name}](checks/{name}.md)"
        assert max(len(c) for c in cells) <= cli.MAX_CELL_CHARS


def test_command_line_writes_the_claims_table(tmp_path: Path) -> None:
    run = _run_command_line(tmp_path, *EXPECTED)
    _assert_claims_written(tmp_path, run, list(EXPECTED))
    assert (tmp_path / "worst_case_vs_rho.png").exists()


@pytest.mark.slow
def test_main_job_runs_every_check_on_the_quick_preset(tmp_path: Path) -> None:
    run = _run_command_line(tmp_path)
    _assert_claims_written(tmp_path, run, list(CHECKS))
    # C4's error to each method's own target; C5 split into a coverage figure and one error
    # figure per world.
    for figure in ("dpo_rate_own.png", "coverage.png", "coverage_well-specified.png",
                   "coverage_skewed.png", "coverage_misspecified.png"):
        assert (tmp_path / figure).stat().st_size > 0


def test_a_crashing_check_fails_the_run_but_is_recorded(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(preset: str, out: Path) -> CheckResult:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "load_check", lambda name: SimpleNamespace(run=crash))

    assert cli.main(["--out", str(tmp_path), "--only", "duality"]) == 1
    claims = pd.read_csv(tmp_path / "claims.csv")
    assert list(claims["verdict"]) == ["crashed"]
    assert "RuntimeError: boom" in claims.loc[0, "measured"]
    assert "RuntimeError: boom" in claims.loc[0, "reason"]
    assert "RuntimeError: boom" in (tmp_path / "checks" / "duality.md").read_text()


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
    assert "| [rates](checks/rates.md) |" in (tmp_path / "claims.md").read_text()


def test_an_old_claims_file_without_reason_and_headline_still_merges(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # claims.csv as written before the reason and headline columns existed
    old = pd.DataFrame([{"check": "duality", "claim": "C1, C6", "title": "Strong duality",
                         "paper_says": "p", "measured": "m", "verdict": "reproduced",
                         "seconds": 1.0}])
    old.to_csv(tmp_path / "claims.csv", index=False)
    monkeypatch.setattr(cli, "load_check",
                        lambda name: SimpleNamespace(run=lambda p, out: _fake_result(
                            "not reproduced", reason="the world lets the set act")))

    assert cli.main(["--out", str(tmp_path), "--only", "rates"]) == 0
    assert "predates the columns reason, headline" in capsys.readouterr().out
    claims = pd.read_csv(tmp_path / "claims.csv", keep_default_na=False)
    assert list(claims["check"]) == ["duality", "rates"]
    assert list(claims["reason"]) == ["", "the world lets the set act"]
    assert list(claims["headline"]) == ["", "1.0 [0.9, 1.1]"]
    summary = (tmp_path / "claims.md").read_text()
    assert "| [duality](checks/duality.md) | C1, C6: Strong duality | reproduced |  |  |" in summary
    assert "nan" not in summary


def test_the_summary_refuses_a_cell_over_the_limit() -> None:
    long_title = "t" * cli.MAX_CELL_CHARS
    claims = pd.DataFrame([{"check": "duality", "claim": "C1", "title": long_title,
                            "paper_says": "p", "measured": "m", "verdict": "reproduced",
                            "reason": "r", "headline": "h", "seconds": 1.0}])
    with pytest.raises(ValueError, match="more than 400"):
        cli.summary_markdown(claims)


def test_each_check_gets_its_own_report(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "load_check",
                        lambda name: SimpleNamespace(run=lambda p, out: _fake_result(
                            "reproduced", reason="arithmetic, no world")))
    assert cli.main(["--out", str(tmp_path), "--only", "duality", "updates"]) == 0
    for name in ("duality", "updates"):
        report = (tmp_path / "checks" / f"{name}.md").read_text()
        for heading in (f"# {name}: title", "## Why", "## What the paper says",
                        "## What was measured", "## Table"):
            assert heading in report
        assert "arithmetic, no world" in report and "| x |" in report
    # the summary row is short; the full text lives in the check's report
    assert "measured" not in (tmp_path / "claims.md").read_text()


@pytest.mark.parametrize("text", ["old\n", "", "\x00\xff garbage"])
def test_a_claims_file_that_is_not_a_table_is_replaced_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, text: str) -> None:
    (tmp_path / "claims.csv").write_text(text, errors="surrogateescape")
    done = CheckResult("C0", "t", "p", "m", "reproduced", pd.DataFrame())
    monkeypatch.setattr(cli, "load_check", lambda name: SimpleNamespace(run=lambda p, out: done))
    assert cli.main(["--out", str(tmp_path), "--only", "rates"]) == 0
    assert "is not a claims table" in capsys.readouterr().out
    assert list(pd.read_csv(tmp_path / "claims.csv")["check"]) == ["rates"]
