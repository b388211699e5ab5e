"""C4 (paper v1): WDPO and KL-DPO also reach the parametric rate d/n.

Runs :mod:`drosim.studies.rates` with the DPO loss and scores every estimate twice: against
theta* and against the estimator's own population target theta_target, the minimiser of
its robust objective under the population (:mod:`drosim.studies.targets`). The methods:

* DPO, the baseline;
* WDPO and "KL-DPO (ball)" (the constrained form over a KL ball), each at radius c/n and
  c/sqrt(n): their robustness vanishes, so theta_target = theta*;
* KL-DPO in the penalised form of Xu et al. 2025 at a fixed temperature: tau = 1, and the
  authors' tau = 0.1 (their public code). A fixed tau keeps a tilt exp(l / tau) at every n,
  and theta_target = tau / (1 + tau) theta* (exact, see drosim.studies.targets): theta* / 2
  at tau = 1, where the tilted logistic loss is the exponential loss;
* KL-DPO with a temperature growing with n, tau_n = TAU_GROWTH sqrt(n) = sqrt(n): the tilt
  vanishes and the squared bias ||theta*||_Sigma^2 / (1 + tau_n)^2 falls like 1 / n (the
  bias is below 1% of ||theta*||_Sigma^2 from n = 128; a smaller constant would keep it
  comparable to the variance, so its slope on the grid would only approach -1).

beta = 1 throughout: in the linear world beta only changes the units of w (every loss value
and the reported beta * w depend on theta = beta w alone), so the authors' beta = 0.1 gives
the same estimates; their tau = 0.1 is used as is, since it divides loss values.

Each slope in n (and in d) reads as "parametric" when its 90% interval meets [-1.1, -0.9]
(in d, [0.9, 1.1]). A method whose target is theta* "reaches theta* at the parametric rate"
when both of its slopes to theta* do. A fixed temperature is "explained by its target" when
its slopes to its own target are parametric and its median error to theta* at the largest n
sits at the squared bias (ratio within [1/2, 2]). Verdict: reproduced when WDPO, a vanishing
KL-DPO and every other vanishing form reach theta* at the parametric rate and the fixed
temperatures are explained by their targets; partially reproduced when some vanishing forms
do (the text names the others); not reproduced when none does.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from drosim.methods import Method
from drosim.paper_checks._framework import (
    HEADLINE_MAX_CHARS,
    REASON_MAX_CHARS,
    CheckResult,
    Preset,
    clip,
)
from drosim.paper_checks._slopes import describe, overlaps, too_wide
from drosim.paper_checks.rates import FAST_D, FAST_N, SLOW_N
from drosim.plotting import BAND_NOTE, draw_power_law, save_figure, slope_label
from drosim.stats import per_x_statistics, quantile_band
from drosim.studies import rates
from drosim.studies.montecarlo import resolve_preset
from drosim.studies.targets import own_target

COLUMNS = ["method", "schedule", "study", "target", "slope", "low", "high", "reading"]
AUTHORS_TAU = 0.1  # the KL-DPO temperature of the authors' public code
TAU_GROWTH = 1.0  # tau_n = TAU_GROWTH * sqrt(n): 11 at n = 128, 128 at n = 16384
PLATEAU = (0.5, 2.0)  # error to theta* at the largest n / squared bias: "at the bias"
_TARGETS = {"error": "theta*", "own_error": "own"}  # frame column -> target label
EXPLAINED = "converges at the parametric rate to its own target, not to theta*"
UNEXPLAINED = "not explained by its target (no d/n rate to it, or no plateau at its bias)"


def methods(c: float) -> list[Method]:
    """DPO; WDPO and KL-DPO (ball) at radii c/n and c/sqrt(n); KL-DPO at tau = 1, tau = 0.1
    and tau_n = TAU_GROWTH sqrt(n)."""
    vanishing = [Method(name, "dpo", family, c, gamma)
                 for gamma in (1.0, 0.5)
                 for name, family in (("WDPO", "wasserstein"), ("KL-DPO (ball)", "kl"))]
    return [
        Method("DPO", "dpo"),
        *vanishing,
        Method("KL-DPO (tau = 1)", "dpo", "kl_temperature", 1.0),
        Method(f"KL-DPO (tau = {AUTHORS_TAU:g})", "dpo", "kl_temperature", AUTHORS_TAU),
        Method("KL-DPO (tau_n = sqrt(n))", "dpo", "kl_temperature", TAU_GROWTH, 0.5),
    ]


def run(preset: Preset = "quick", out: Path = Path("figures"), **overrides: object
        ) -> CheckResult:
    """Measure the DPO-loss slopes to theta* and to each own target, draw dpo_rate_n,
    dpo_rate_d and dpo_rate_own, and judge C4.

    Args:
        preset: the rates study's preset.
        out: folder for dpo_rate_n and dpo_rate_d (errors to theta*) and dpo_rate_own
            (errors to each method's own target), each as .png and .pdf.
        **overrides: passed to the study (e.g. a tiny grid for the tests).

    Returns:
        The result; its table has one row per (method, schedule, study, target) with the
        slope, its 90% interval and its reading; its stats the per-x statistics of both
        errors (column target: "theta*" or "own").
    """
    c = resolve_preset(rates.PRESETS, preset, overrides)["c"]
    frame = rates.run(preset, methods=methods(c), progress=False, targets=own_target,
                      **overrides)
    biased = frame[frame["bias"] > 0]
    to_star = rates.slopes(frame)
    # A method whose target is theta* has own_error == error: its own slope is the same.
    to_own = pd.concat([to_star[~to_star["method"].isin(set(biased["method"]))],
                        rates.slopes(biased, "own_error")], ignore_index=True)
    paths = rates.plot(frame, out, slope_table=to_star, prefix="dpo_rate", own_slopes=to_own)
    paths += plot_own_targets(frame, out, to_own)
    table = pd.concat([to_star.assign(target="theta*"), to_own.assign(target="own")],
                      ignore_index=True)
    table["reading"] = table.apply(_reading, axis=1)

    cells = list(frame.groupby(["method", "schedule"], sort=False).groups)
    outcomes = {cell: _outcome(table, frame, cell) for cell in cells}
    shared = {method for method, _ in cells if sum(m == method for m, _ in cells) > 1}
    verdict = _verdict(table, frame, outcomes)
    grid = frame.attrs["config"]
    lines = "; ".join(f"{_name(cell, shared)}: {text}" for cell, text in outcomes.items())
    measured = (
        f"{_summary(outcomes, shared)} Slopes in n (d = {grid['dim']}, "
        f"n = {min(grid['n_grid'])}..{max(grid['n_grid'])}) "
        f"and in d (n = {grid['samples']}, d = {min(grid['d_grid'])}..{max(grid['d_grid'])}) "
        f"of the median squared Sigma-error, to theta* and to each method's own population "
        f"target. {lines}. {_why_fixed_temperature()} beta = 1 (in the linear world beta "
        f"only rescales w, so the authors' beta = 0.1 gives the same estimates); radius "
        f"constant c = {grid['c']}; {grid['trials']} trials, 90% bootstrap intervals. "
        f"Figures: {', '.join(p.name for p in paths)}."
    )
    return CheckResult(
        claim="C4",
        title="WDPO and KL-DPO at the parametric rate, to theta* and to their own targets",
        paper_says="(v1) WDPO and KL-DPO also reach the parametric rate under the same "
                   "analysis.",
        measured=measured,
        verdict=verdict,
        table=table[COLUMNS],
        stats=statistics(frame),
        reason=_reason(outcomes, shared),
        headline=_headline(table, outcomes, shared),
    )


def plot_own_targets(frame: pd.DataFrame, out: Path, own_slopes: pd.DataFrame) -> list[Path]:
    """Draw dpo_rate_own.png / .pdf: every method's error to its OWN population target.

    One panel per study (against n, against d). A method whose target is theta* draws the
    same curve as in dpo_rate_n / dpo_rate_d; a fixed temperature draws its error to
    tau / (1 + tau) theta*, the curve that shows it converging at d/n to that target.

    Args:
        frame: the rates study's frame with the TARGET_COLUMNS.
        out: folder for the figure.
        own_slopes: the slopes of the error to each own target (rows method, schedule,
            study, slope, low, high), given in the legend.

    Returns:
        The paths written.
    """
    cells = list(frame.groupby(["method", "schedule"], sort=False).groups)
    shared = {method for method, _ in cells if sum(m == method for m, _ in cells) > 1}
    colours = {cell: f"C{i % 10}" for i, cell in enumerate(cells)}
    config = frame.attrs.get("config", {})
    fig = Figure(figsize=(15, 6.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (study, group) in zip(axes, frame.groupby("study", sort=False), strict=False):
        fixed = "d" if study == "n" else "n"
        for cell, rows in group.groupby(["method", "schedule"], sort=False):
            band = quantile_band(rows, [study], "own_error")
            fit = _rows(own_slopes, cell, study=study).iloc[0]
            ax.plot(band[study], band["median"], "o-", color=colours[cell], ms=3.5, lw=1.5,
                    label=slope_label(_name(cell, shared), fit["slope"], fit["low"],
                                      fit["high"]))
            ax.fill_between(band[study], band["low"], band["high"], color=colours[cell],
                            alpha=0.1, lw=0)
        baseline = quantile_band(group[group["family"] == "none"], [study], "own_error")
        if not baseline.empty:  # the parametric rate through DPO's first point
            first = baseline.iloc[0]
            draw_power_law(ax, baseline[study].to_numpy(), (first[study], first["median"]),
                           -1.0 if study == "n" else 1.0, "d/n", ":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel(f"{study}   ({fixed} = {group[fixed].iloc[0]})")
        ax.set_ylabel(r"$\|\hat\theta - \theta_{\mathrm{target}}\|_\Sigma^2$"
                      "\n(the method's own population target)")
        statistic = rates.STATISTIC[study]
        ax.set_title(f"against {study} (slope of the {statistic} error, 90% interval)")
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.12),
                  frameon=False, ncol=2)
    fig.suptitle("C4: DPO-loss error to each method's own target (theta* for DPO, WDPO and "
                 "vanishing KL forms; tau / (1 + tau) theta* for a fixed KL-DPO temperature)"
                 f"\nmedian over {config.get('trials', '?')} trials, {BAND_NOTE}")
    return save_figure(fig, out, "dpo_rate_own")


def statistics(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-x statistics of both errors, for refitting every slope of the check.

    Args:
        frame: the study's frame with the TARGET_COLUMNS.

    Returns:
        drosim.stats.per_x_statistics by (method, schedule, target) for study "n" (x = n)
        and study "d" (x = d), target "theta*" (the error to theta*) or "own" (to the
        method's own target), with the squared bias ||theta_target - theta*||_Sigma^2 of
        each (method, x) in the column bias.
    """
    long = frame.melt(id_vars=["study", "method", "schedule", "n", "d", "trial", "bias"],
                      value_vars=list(_TARGETS), var_name="target", value_name="value")
    long["target"] = long["target"].map(_TARGETS)
    parts = []
    for study, group in long.groupby("study", sort=False):
        x = "n" if study == "n" else "d"
        stats = per_x_statistics(group, x, "value", study=study,
                                 by=("method", "schedule", "target"))
        bias = group.groupby(["method", "schedule", x])["bias"].first().rename_axis(
            index={x: "x"})
        parts.append(stats.join(bias, on=["method", "schedule", "x"]))
    return pd.concat(parts, ignore_index=True)


def _reading(row: pd.Series) -> str:
    """How one slope reads: parametric, slower than sqrt(d/n), in between or faster."""
    if row["study"] == "d":
        return "about +1 (d/n)" if overlaps(row, FAST_D) else "not +1"
    if overlaps(row, FAST_N):
        return "parametric"
    if row["slope"] > SLOW_N:
        return "slower than sqrt(d/n)"
    return "between sqrt(d/n) and d/n" if row["slope"] > FAST_N[1] else "faster than d/n"


Cell = tuple[str, str]  # (method, schedule): WDPO and KL-DPO (ball) come with two radii


def _name(cell: Cell, shared: set[str]) -> str:
    """A cell's name: "WDPO (c/n)" for a method in ``shared`` (run under several
    schedules), the method's name otherwise."""
    method, schedule = cell
    return f"{method} ({schedule})" if method in shared else method


def _rows(frame: pd.DataFrame, cell: Cell, **equal: object) -> pd.DataFrame:
    """The rows of one (method, schedule) cell, with further columns fixed by ``equal``."""
    keep = (frame["method"] == cell[0]) & (frame["schedule"] == cell[1])
    for column, value in equal.items():
        keep &= frame[column] == value
    return frame[keep]


def _is_parametric(table: pd.DataFrame, cell: Cell, target: str) -> bool:
    """Whether both slopes of a cell to target (in n and in d) read as the d/n rate."""
    return (overlaps(_rows(table, cell, study="n", target=target).iloc[0], FAST_N)
            and overlaps(_rows(table, cell, study="d", target=target).iloc[0], FAST_D))


def _outcome(table: pd.DataFrame, frame: pd.DataFrame, cell: Cell) -> str:
    """One cell's slopes and reading; for a target other than theta*, its bias too."""
    def slopes(target: str) -> str:
        n, d = (_rows(table, cell, study=s, target=target).iloc[0] for s in ("n", "d"))
        return f"{_short(n)} in n ({n['reading']}), {_short(d)} in d"

    rows = _rows(frame, cell, study="n")
    bias, signal = rows["bias"].iloc[0], rows["signal"].iloc[0]
    if bias == 0:
        reading = ("reaches theta* at the parametric rate" if
                   _is_parametric(table, cell, "theta*") else "does not reach theta* at d/n")
        return f"to theta* {slopes('theta*')} -> {reading}"
    last = rows[rows["n"] == rows["n"].max()]
    ratio = float(last["error"].median()) / bias
    explained = _is_parametric(table, cell, "own") and PLATEAU[0] <= ratio <= PLATEAU[1]
    reading = EXPLAINED if explained else UNEXPLAINED
    return (f"to theta* {slopes('theta*')}; to its own target {slopes('own')}; "
            f"||target - theta*||_Sigma^2 = {bias:.3g} = {bias / signal:.3f} "
            f"||theta*||_Sigma^2, median error to theta* at n = {last['n'].iloc[0]} "
            f"{ratio:.2f} times that -> {reading}")


def _short(row: pd.Series) -> str:
    """A slope as "-0.99 [-1.03, -0.95]" (see drosim.paper_checks._slopes.describe)."""
    return describe(row).removeprefix(f"{row['method']} ")


def _verdict(table: pd.DataFrame, frame: pd.DataFrame, outcomes: dict[Cell, str]) -> str:
    """The check's verdict from the slopes (module note)."""
    if too_wide(table):
        return "inconclusive"
    kind = frame.groupby(["method", "schedule"], sort=False)[["family", "bias"]].first()
    vanishing = kind[(kind["bias"] == 0) & (kind["family"] != "none")]
    reached = {cell for cell in vanishing.index if _is_parametric(table, cell, "theta*")}
    wdpo = any(kind.loc[cell, "family"] == "wasserstein" for cell in reached)
    kl = any(kind.loc[cell, "family"] != "wasserstein" for cell in reached)
    explained = all(outcomes[cell].endswith(EXPLAINED) for cell in kind.index[kind["bias"] > 0])
    if wdpo and kl and reached == set(vanishing.index) and explained:
        return "reproduced"
    return "partially reproduced" if reached else "not reproduced"


def _summary(outcomes: dict[Cell, str], shared: set[str]) -> str:
    """Which cells reach theta* at d/n, which converge to their own target, which neither."""
    groups = {"Reach theta* at the parametric rate": "reaches theta* at the parametric rate",
              "Parametric to their own target tau / (1 + tau) theta*, not to theta*": EXPLAINED,
              "Slower than d/n to theta*": "does not reach theta* at d/n",
              "Not explained by their target": "not explained by its target"}
    parts = []
    for title, ending in groups.items():
        names = [_name(cell, shared) for cell, text in outcomes.items() if ending in text]
        if names:
            parts.append(f"{title}: {', '.join(names)}.")
    return " ".join(parts)


def _reason(outcomes: dict[Cell, str], shared: set[str]) -> str:
    """Why the verdict: where a robust DPO loss's tilt vanishes fast enough to reach theta*."""
    def named(*endings: str) -> list[str]:
        return [_name(cell, shared) for cell, text in outcomes.items()
                if cell[0] != "DPO" and any(text.endswith(e) for e in endings)]

    reached = named("reaches theta* at the parametric rate")
    fixed = named(EXPLAINED)
    slower = named("does not reach theta* at d/n")
    unexplained = named(UNEXPLAINED)
    # The forms that reach theta* are the expected case: count them, name the others.
    parts = [f"Well-specified world, nothing unseen to protect: a robust DPO loss reaches "
             f"theta* at d/n only if its tilt vanishes fast enough ({len(reached)} of "
             f"{len(reached) + len(slower)} vanishing forms do)"]
    if slower:
        parts.append(f"{', '.join(slower)} keep(s) a bias falling slower than d/n")
    if fixed:
        parts.append("a fixed tau reaches its own target tau/(1+tau) theta* at d/n")
    if unexplained:
        parts.append(f"{', '.join(unexplained)} reach(es) neither theta* nor its own target")
    return clip("; ".join(parts) + ".", REASON_MAX_CHARS)


def _headline(table: pd.DataFrame, outcomes: dict[Cell, str], shared: set[str]) -> str:
    """The slowest slope in n to theta* among the methods meant to reach it, and the first
    fixed temperature's slope in n to its own target."""
    in_n = table[table["study"] == "n"]
    aimed = [cell for cell, text in outcomes.items() if not text.endswith(EXPLAINED)
             and "not explained" not in text]
    parts = []
    if aimed:
        to_star = in_n[in_n["target"] == "theta*"].set_index(["method", "schedule"])
        slowest = max(aimed, key=lambda cell: to_star.loc[cell, "slope"])
        parts.append(f"slowest to theta*: {_name(slowest, shared)} "
                     f"{_interval(to_star.loc[slowest])}")
    fixed = [cell for cell, text in outcomes.items() if text.endswith(EXPLAINED)]
    if fixed:
        own = in_n[in_n["target"] == "own"].set_index(["method", "schedule"])
        parts.append(f"{_name(fixed[0], shared)} to its own target "
                     f"{_interval(own.loc[fixed[0]])}")
    return clip("slope in n: " + "; ".join(parts), HEADLINE_MAX_CHARS)


def _interval(row: pd.Series) -> str:
    """A slope with its interval, "-0.99 [-1.03, -0.95]"."""
    return f"{row['slope']:.2f} [{row['low']:.2f}, {row['high']:.2f}]"


def _why_fixed_temperature() -> str:
    """The sentence that says why a fixed temperature misses theta*."""
    return ("Why a fixed temperature misses theta*: the tilt exp(loss / tau) weights each "
            "pair towards the label the fit gets wrong, and for DPO's logistic loss the "
            "population minimiser of tau log E exp(loss / tau) is exactly tau / (1 + tau) "
            "theta* (theta* / 2 at tau = 1, where the tilted loss is the exponential loss; "
            "theta* / 11 at the authors' tau = 0.1), whatever n; a temperature growing like "
            "sqrt(n) leaves a squared bias ||theta*||_Sigma^2 / (1 + tau_n)^2 of order 1 / n. "
            "A KL ball of radius rho acts as a temperature of about sd(loss) / sqrt(2 rho), "
            "so its squared bias is of order rho: 1 / n at rho = c/n, but 1 / sqrt(n) at "
            "c/sqrt(n), a slope that tends to -1/2.")
