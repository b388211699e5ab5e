"""C2 and C3: the squared parameter error of (DRO-)REBEL falls like sqrt(d/n), and like d/n.

Runs :mod:`drosim.studies.rates` with REBEL and every DRO-REBEL method (chi-square, KL,
Wasserstein) under the radii rho_n = c/n, c/sqrt(n) and a fixed rho = c, and fits the
log-log slope of the median error in n (at fixed d) and in d (at fixed n).

* C3 (fast rate d/n): for REBEL and each DRO-REBEL with radius c/n, the slope in n is
  about -1 (its interval meets [-1.1, -0.9]) and the slope in d about +1 (meets [0.9, 1.1]).
* C2 (slow rate sqrt(d/n)): the error is at most a constant times sqrt(d/n), i.e. the
  slope in n is at most -1/2 within its interval, for REBEL and each DRO-REBEL whose radius
  shrinks (c/n and c/sqrt(n), the latter being the coverage radius of the slow-rate bound).

Fixed radii are outside both claims; their slopes are reported as they come. Slopes are
those of medians, which read a little above +1 in d on grids that start at small d (see
:mod:`drosim.studies.rates`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from drosim.methods import Method
from drosim.paper_checks._framework import CheckResult, Preset
from drosim.paper_checks._slopes import describe, describe_all, overlaps, too_wide
from drosim.stats import per_x_statistics
from drosim.studies import rates
from drosim.studies.montecarlo import UNSCHEDULED, resolve_preset, scheduled_methods

FAST_N = (-1.1, -0.9)  # d/n in n
FAST_D = (0.9, 1.1)  # d/n in d
SLOW_N = -0.5  # sqrt(d/n) in n: the slow rate allows any slope at or below this
FAST_SCHEDULES = (UNSCHEDULED, "c/n")
SLOW_SCHEDULES = (UNSCHEDULED, "c/n", "c/sqrt(n)")
COLUMNS = ["method", "schedule", "study", "slope", "low", "high", "reading"]


def methods(c: float) -> list[Method]:
    """REBEL and every DRO-REBEL under each radius schedule, with radius constant c."""
    return [m for m in scheduled_methods(c) if m.loss == "rebel"]


def run(preset: Preset = "quick", out: Path = Path("figures"), **overrides: object
        ) -> CheckResult:
    """Measure the slopes, draw rate_n and rate_d, and judge C2 and C3.

    Args:
        preset: the rates study's preset (drosim.studies.rates.PRESETS; "full" runs n up
            to 2^14 and d up to 64 with 200 trials).
        out: folder for rate_n.png / .pdf and rate_d.png / .pdf.
        **overrides: passed to the study (e.g. a tiny grid for the tests).

    Returns:
        The result; its table has one row per (method, schedule, study) with the slope,
        its 90% interval and how it reads against the claimed rates.
    """
    c = resolve_preset(rates.PRESETS, preset, overrides)["c"]
    frame = rates.run(preset, methods=methods(c), progress=False, **overrides)
    table = rates.slopes(frame)
    paths = rates.plot(frame, out, slope_table=table)
    table["reading"] = table.apply(_reading, axis=1)
    stats = study_statistics(frame)

    by_n = table[table["study"] == "n"]
    by_d = table[table["study"] == "d"]
    fast_n = by_n[by_n["schedule"].isin(FAST_SCHEDULES)]
    fast_d = by_d[by_d["schedule"].isin(FAST_SCHEDULES)]
    slow_n = by_n[by_n["schedule"].isin(SLOW_SCHEDULES)]
    off_fast = pd.concat([fast_n[[not overlaps(r, FAST_N) for _, r in fast_n.iterrows()]],
                          fast_d[[not overlaps(r, FAST_D) for _, r in fast_d.iterrows()]]])
    off_slow = slow_n[slow_n["low"] > SLOW_N]
    c3, c2 = off_fast.empty, off_slow.empty
    if too_wide(pd.concat([fast_n, fast_d, slow_n])):
        verdict = "inconclusive"
    else:
        verdict = "reproduced" if c2 and c3 else "not reproduced"

    others = [
        f"{schedule}: " + "; ".join(f"{describe(r)} ({r['reading']})"
                                    for _, r in by_n[by_n["schedule"] == schedule].iterrows())
        for schedule in ("c/sqrt(n)", "fixed") if schedule in set(by_n["schedule"])
    ]
    grid = frame.attrs["config"]
    measured = (
        f"C3, slopes in n (d = {grid['dim']}, n = {min(grid['n_grid'])}..{max(grid['n_grid'])})"
        f" for REBEL and radius c/n: {describe_all(fast_n)}; in d (n = {grid['samples']}, d = "
        f"{min(grid['d_grid'])}..{max(grid['d_grid'])}): {describe_all(fast_d)} -> "
        f"{_outcome(off_fast)} (intervals must meet [-1.1, -0.9] in n and [0.9, 1.1] in d). "
        f"C2, every slope in n of REBEL and radii c/n, c/sqrt(n) at most -0.5 within its "
        f"interval -> {_outcome(off_slow)} (largest upper end {slow_n['high'].max():.2f}). "
        f"Other radii, slopes in n: {' | '.join(others)}. "
        f"Radius constant c = {grid['c']}, noise {grid['noise']}, {grid['trials']} trials, "
        f"90% bootstrap intervals; slopes of medians in n and of means in d (the error is "
        f"chi-square-shaped in d: its median / mean ratio moves with d). "
        f"Figures: {', '.join(p.name for p in paths)}."
    )
    return CheckResult(
        claim="C2, C3",
        title="Rates of the squared Sigma-error of (DRO-)REBEL in n and d",
        paper_says=(
            "C2: ||theta_hat - theta*||_Sigma^2 = O~(sqrt(d/n)) under coverage. C3: O~(d/n), "
            "the parametric rate, matching non-robust RLHF in benign regimes."
        ),
        measured=measured,
        verdict=verdict,
        table=table[COLUMNS],
        stats=stats,
    )


def study_statistics(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-x statistics of the error of both sweeps (study "n": x = n, "d": x = d), per
    method and radius schedule: what the slopes are fitted to."""
    return pd.concat([per_x_statistics(frame[frame["study"] == study], study, "error",
                                       study=study, by=("method", "schedule"))
                      for study in ("n", "d") if (frame["study"] == study).any()],
                     ignore_index=True)


def _outcome(failing: pd.DataFrame) -> str:
    """The word "holds", or "fails for" and the slopes outside their band."""
    if failing.empty:
        return "holds"
    return "fails for " + ", ".join(f"{describe(r)} in {r['study']}" for _, r in
                                    failing.iterrows())


def _reading(row: pd.Series) -> str:
    """How one slope reads against the claimed rates."""
    if row["study"] == "d":
        return "about +1 (d/n)" if overlaps(row, FAST_D) else "not +1"
    if overlaps(row, FAST_N):
        return "parametric, about -1"
    if row["low"] <= SLOW_N:
        return "between sqrt(d/n) and d/n" if row["slope"] > FAST_N[1] else "faster than d/n"
    return "slower than sqrt(d/n): a plateau or bias"
