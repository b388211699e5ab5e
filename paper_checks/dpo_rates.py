"""C4 (paper v1): WDPO and KL-DPO also reach the parametric rate d/n.

Runs :mod:`drosim.studies.rates` with the DPO loss: plain DPO (the baseline), WDPO with
radius c/n, KL-DPO in its penalised form with a fixed temperature tau (the form of Xu et
al. 2025, as the paper states it) and "KL-DPO (ball)", the constrained form
over a KL ball of radius c/n. Reproduced when every one of them has a slope of about -1 in
n (interval meeting [-1.1, -0.9]) and about +1 in d (meeting [0.9, 1.1]).

A fixed temperature keeps a fixed tilt exp(l / tau) towards the worst-fitted pairs at
every n, so its population minimiser is not theta*: the error should stop falling at the
squared bias. The check reports that level, relative to ||theta*||_Sigma^2, when it shows.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from drosim.methods import Method
from drosim.paper_checks._framework import CheckResult, Preset
from drosim.paper_checks._slopes import describe_all, overlaps, too_wide
from drosim.paper_checks.rates import FAST_D, FAST_N
from drosim.studies import rates
from drosim.studies.montecarlo import resolve_preset, scheduled_methods

COLUMNS = ["method", "schedule", "study", "slope", "low", "high", "rate"]
_FAMILIES = ("none", "wasserstein", "kl_temperature", "kl")


def methods(c: float) -> list[Method]:
    """DPO, WDPO (radius c/n), KL-DPO (temperature 1) and KL-DPO over a ball of radius c/n."""
    return [m for m in scheduled_methods(c, (1.0,)) if m.loss == "dpo" and m.family in _FAMILIES]


def run(preset: Preset = "quick", out: Path = Path("figures"), **overrides: object
        ) -> CheckResult:
    """Measure the DPO-loss slopes, draw dpo_rate_n and dpo_rate_d, and judge C4.

    Args:
        preset: the rates study's preset.
        out: folder for dpo_rate_n.png / .pdf and dpo_rate_d.png / .pdf.
        **overrides: passed to the study (e.g. a tiny grid for the tests).

    Returns:
        The result; its table has one row per (method, schedule, study) with the slope, its
        90% interval and whether it is the parametric rate.
    """
    c = resolve_preset(rates.PRESETS, preset, overrides)["c"]
    frame = rates.run(preset, methods=methods(c), progress=False, **overrides)
    table = rates.slopes(frame)
    paths = rates.plot(frame, out, slope_table=table, prefix="dpo_rate")
    table["rate"] = [overlaps(r, FAST_N if r["study"] == "n" else FAST_D)
                     for _, r in table.iterrows()]

    failing = table[~table["rate"]]
    if too_wide(table):
        verdict = "inconclusive"
    else:
        verdict = "reproduced" if failing.empty else "not reproduced"

    grid = frame.attrs["config"]
    by_n, by_d = (table[table["study"] == s] for s in ("n", "d"))
    plateaus = "; ".join(_plateau(frame, method) for method in failing["method"].unique())
    measured = (
        f"slopes in n (d = {grid['dim']}, n = {min(grid['n_grid'])}..{max(grid['n_grid'])}): "
        f"{describe_all(by_n)}; in d (n = {grid['samples']}): {describe_all(by_d)}. "
        + (f"Not at the parametric rate: {plateaus}. " if plateaus else
           "Every method is at the parametric rate. ")
        + f"Radius c/n with c = {grid['c']}; {grid['trials']} trials, 90% bootstrap "
        f"intervals. Figures: {', '.join(p.name for p in paths)}."
    )
    return CheckResult(
        claim="C4",
        title="WDPO and KL-DPO at the parametric rate",
        paper_says="(v1) WDPO and KL-DPO also reach the parametric rate under the same "
                   "analysis.",
        measured=measured,
        verdict=verdict,
        table=table[COLUMNS],
    )


def _plateau(frame: pd.DataFrame, method: str) -> str:
    """Where a method's median error ends up in the n study, against the signal."""
    rows = frame[(frame["method"] == method) & (frame["study"] == "n")]
    medians = rows.groupby("n")["error"].median()
    signal = rows["signal"].iloc[0]
    text = (f"{method}'s median error goes {medians.iloc[0]:.3g} -> {medians.iloc[-1]:.3g} "
            f"from n = {medians.index[0]} to {medians.index[-1]}, ending at "
            f"{medians.iloc[-1] / signal:.0%} of ||theta*||_Sigma^2 = {signal:.3g}")
    if rows["family"].iloc[0] == "kl_temperature":
        text += " (the bias a fixed temperature keeps at every n)"
    return text
