"""The coverage, preference-shift and updates checks on tiny settings: they run and report."""

from __future__ import annotations

from pathlib import Path

import pytest

from drosim.paper_checks import VERDICTS, CheckResult, load_check

# check name -> (claim, tiny overrides of its study, figure stem)
TINY: dict[str, tuple[str, dict[str, object], str]] = {
    "coverage": ("C5", {"worlds": ("skewed",), "sizes": (128, 512), "gammas": (0.5, 1.0),
                        "cs": (1.0,), "trials": 4, "supports": ((3, 3),),
                        "support_trials": 10}, "coverage"),
    "preference_shift": ("C7 (linear world)", {"radii": (0.1, 1.0), "trials": 3}, "shift"),
    "updates": ("C6 (online)", {"rounds": 3, "noises": (0.0, 0.5), "trials": 2}, "updates"),
}


@pytest.mark.parametrize("name", list(TINY))
def test_check_runs_on_a_tiny_setting(name: str, tmp_path: Path) -> None:
    claim, overrides, stem = TINY[name]

    result = load_check(name).run("quick", out=tmp_path, **overrides)

    assert isinstance(result, CheckResult)
    assert result.claim == claim and result.verdict in VERDICTS
    assert result.title and result.paper_says and result.measured
    assert len(result.table) > 0
    assert (tmp_path / f"{stem}.png").stat().st_size > 0
    if name == "updates":  # exact arithmetic: noiseless REBEL is mirror descent
        assert result.verdict == "reproduced", result.measured

