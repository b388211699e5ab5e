"""Rates of the squared parameter error in n and in d (paper claims C2, C3 and C4).

Two sweeps of the linear world (paper section 2), each fitting every method on the same
Monte-Carlo trials:

* study "n": the number of pairs n over a doubling grid (2^7 .. 2^14 in "full") at a fixed
  dimension d;
* study "d": the dimension d over a doubling grid (2 .. 64 in "full") at a fixed n.

The error is ||theta_hat - theta*||_Sigma^2 with theta* the reward parameter of the
training mixture ALPHA_0 and Sigma = E[dphi dphi^T] under the uniform sampling policy
(:mod:`drosim.studies.montecarlo`). Least squares in a well-specified world with noise
sigma has error about sigma^2 d / n, so the parametric ("fast") rate is a slope of -1 in n
and +1 in d on log-log axes; the slow rate sqrt(d / n) is a slope of -1/2 in n.

Slopes in n are fitted to medians, slopes in d to means (drosim.stats.loglog_slope). The
error of least squares is about sigma^2 / n times a chi-square with d degrees of freedom:
its mean is exactly proportional to d, while its median is 31% below the mean at d = 2,
16% at d = 4 and 1% at d = 32, so medians would read a slope in d above +1 on grids that
start small (about +1.10 on d = 2 .. 64). Along n the shape of that distribution does not
change, and the median is the more robust statistic.

The methods are REBEL, DPO and KL-DPO with a fixed temperature, plus every robust method
under each radius schedule rho_n = c / n, c / sqrt(n) and a fixed rho = c
(:func:`drosim.studies.montecarlo.scheduled_methods`). The DPO-loss methods with a fixed
radius are the slow ones: with noisy preferences their minimiser sits at or near w = 0, a
kink of the robust objective where the Newton solver of drosim.estimators runs to its
iteration cap (about 20-60 times the cost of the others); the paper checks leave them out.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import Tensor

from drosim.chunks import DEFAULT_MEMORY_BUDGET
from drosim.methods import Method
from drosim.plotting import (
    ERROR_LABEL,
    FAMILY_COLOURS,
    draw_methods,
    draw_power_law,
    draw_ratios,
    save_figure,
    slope_label,
)
from drosim.stats import loglog_slope
from drosim.studies.montecarlo import (
    SCHEDULES,
    TEMPERATURE_SCHEDULES,
    UNSCHEDULED,
    Setting,
    resolve_preset,
    run_settings,
    scheduled_methods,
)
from drosim.world import LinearWorld, make_world

__all__ = ["COLUMNS", "PRESETS", "TARGET_COLUMNS", "plot", "run", "slopes"]

_DOUBLINGS_N = tuple(2**k for k in range(7, 15))  # 128 .. 16384
_DOUBLINGS_D = tuple(2**k for k in range(1, 7))  # 2 .. 64

PRESETS: dict[str, dict[str, object]] = {
    "quick": {
        "n_grid": _DOUBLINGS_N[:5], "dim": 8,  # study "n": n over n_grid at d = dim
        # study "d": d over d_grid at n = samples; d = 2 left out (see the note on medians)
        "d_grid": _DOUBLINGS_D[1:5], "samples": 1024,
        "trials": 48, "noise": 0.5, "reward_scale": 1.0, "c": 0.1,
    },
    "full": {
        "n_grid": _DOUBLINGS_N, "dim": 8,
        "d_grid": _DOUBLINGS_D, "samples": 4096,
        "trials": 200, "noise": 0.5, "reward_scale": 1.0, "c": 0.1,
    },
}

COLUMNS = ["study", "method", "schedule", "loss", "family", "n", "d", "trial", "error",
           "signal"]
# Added by run(targets=...): the error to each method's own population target and that
# target's squared distance to theta* (drosim.studies.targets).
TARGET_COLUMNS = ["own_error", "bias"]
_GRID = {"n": "n", "d": "d"}  # study -> the column it varies
STATISTIC = {"n": "median", "d": "mean"}  # study -> the statistic its slope is fitted to
_RADIUS_TITLES = {UNSCHEDULED: "no radius", "fixed": "fixed rho = c"}
# Colours for further methods of a family already drawn in a panel (e.g. two temperatures).
_SPARE_COLOURS = ("C9", "C6", "C8", "C5", "C7")


def run(preset: str = "quick", *, methods: Sequence[Method] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET, device: str = "cpu", seed: int = 0,
        progress: bool = True,
        targets: Callable[[Method, LinearWorld], Tensor] | None = None,
        **overrides: object) -> pd.DataFrame:
    """Run both sweeps.

    Args:
        preset: "quick" or "full" (see PRESETS).
        methods: the methods to fit (default: scheduled_methods(c) with the preset's c).
        memory_budget: bytes one chunk of trials may use.
        device: where the worlds live and the fits run.
        seed: seeds the worlds and every random stream; the same seed gives the same frame.
        progress: show a progress bar over the (setting, method) cells.
        targets: optional (method, world) -> the method's own population target
            (:func:`drosim.studies.targets.own_target`); adds the TARGET_COLUMNS.
        **overrides: replace preset values: n_grid, dim, d_grid, samples, trials, noise,
            reward_scale, c. An empty n_grid or d_grid skips that study.

    Returns:
        One row per (study, method, schedule, n, d, trial), columns COLUMNS (signal is
        ||theta*||_Sigma^2), then TARGET_COLUMNS with ``targets``; ``attrs["config"]``
        holds the configuration.
    """
    config = resolve_preset(PRESETS, preset, overrides)
    methods = list(methods) if methods is not None else scheduled_methods(config["c"])

    def setting(study: str, n: int, d: int) -> Setting:
        world = make_world(d, noise=config["noise"], reward_scale=config["reward_scale"],
                           seed=seed, device=device)
        # The stream is keyed by (n, d) only: the two studies share the point they have
        # in common, and every method of a setting sees the same pairs.
        return Setting(world, n, key=(n, d), labels={"study": study, "n": n, "d": d})

    settings = [setting("n", n, config["dim"]) for n in config["n_grid"]]
    settings += [setting("d", config["samples"], d) for d in config["d_grid"]]
    frame = run_settings(settings, methods, config["trials"], seed=seed,
                         memory_budget=memory_budget, progress=progress, desc="rates",
                         targets=targets)
    frame = frame[COLUMNS + (TARGET_COLUMNS if targets is not None else [])]
    frame.attrs["config"] = config
    return frame


def slopes(frame: pd.DataFrame, y: str = "error") -> pd.DataFrame:
    """The log-log slope of the median error in n (study "n") or of the mean error in d
    (study "d"; see the module note).

    Args:
        frame: the output of :func:`run`.
        y: the error column: "error" (to theta*) or "own_error" (to the own target).

    Returns:
        One row per (method, schedule, study) with columns method, schedule, study, slope,
        low, high (a 90% bootstrap interval over trials, drosim.stats.loglog_slope).
    """
    rows = []
    for (study, method, schedule), group in frame.groupby(["study", "method", "schedule"],
                                                          sort=False):
        fit = loglog_slope(group, _GRID[study], y, statistic=STATISTIC[study])
        rows.append({"method": method, "schedule": schedule, "study": study,
                     "slope": fit.slope, "low": fit.low, "high": fit.high})
    return pd.DataFrame(rows, columns=["method", "schedule", "study", "slope", "low", "high"])


def plot(frame: pd.DataFrame, out_dir: Path | str, *, slope_table: pd.DataFrame | None = None,
         prefix: str = "rate", own_slopes: pd.DataFrame | None = None) -> list[Path]:
    """Draw ``<prefix>_n`` and ``<prefix>_d`` (PNG and PDF), one figure per study.

    One panel per (loss, radius or temperature schedule): REBEL-type methods on the top
    row, DPO-type below, and the plain methods (no radius, fixed temperatures) repeated in
    every panel of their row. Each method shows its median error with the band of its
    trials' 10% to 90% quantiles and its fitted slope in the legend; the reference lines d/n
    and sqrt(d/n) pass through the median of the row's plain baseline (REBEL or DPO) at the
    first grid point. With the TARGET_COLUMNS (``run(targets=...)``), a method whose own
    target is not theta* also gets a dashed line at ||theta_target - theta*||_Sigma^2, the
    level its error to theta* cannot fall below.

    Args:
        frame: the output of :func:`run`.
        out_dir: the folder for the figures (created if missing).
        slope_table: the output of :func:`slopes`, computed here if not given.
        prefix: the start of the file names.
        own_slopes: ``slopes(frame, "own_error")``; a target line's legend entry then
            gives the slope of the error to that target.

    Returns:
        The paths written.
    """
    slope_table = slopes(frame) if slope_table is None else slope_table
    config = frame.attrs.get("config", {})
    colours = _colours(frame)
    paths = []
    for study, group in frame.groupby("study", sort=False):
        x = _GRID[study]
        fixed = "d" if study == "n" else "n"
        rows = [(loss, _schedules(group[group["loss"] == loss]))
                for loss in ("rebel", "dpo") if loss in set(group["loss"])]
        columns = max(len(schedules) for _, schedules in rows)
        # Wide enough for the title when there is a single panel; the legends sit below
        # the panels, so each row is taller than its axes.
        # Under each row of error panels, a row of paired ratios to the plain baseline:
        # robust curves that sit on the baseline's are told apart there.
        fig = Figure(figsize=(max(5.6 * columns, 8.5), 9.4 * len(rows)), layout="constrained")
        grid = fig.subplots(2 * len(rows), columns, squeeze=False,
                            gridspec_kw={"height_ratios": [2.4, 1] * len(rows)})
        for row, (loss, schedules) in enumerate(rows):
            of_loss = group[group["loss"] == loss]
            baseline = of_loss[of_loss["family"] == "none"]
            for ax in [*grid[2 * row, len(schedules):], *grid[2 * row + 1, len(schedules):]]:
                ax.set_visible(False)
            for ratio_ax, schedule in zip(grid[2 * row + 1], schedules, strict=False):
                shown = of_loss[of_loss["schedule"].isin([UNSCHEDULED, schedule])]
                if not baseline.empty:
                    draw_ratios(ratio_ax, shown, x, "error", baseline["method"].iloc[0],
                                colours)
                ratio_ax.set_xlabel(x)
            for ax, schedule in zip(grid[2 * row], schedules, strict=False):
                shown = of_loss[of_loss["schedule"].isin([UNSCHEDULED, schedule])]
                draw_methods(ax, shown, x, "error", slope_table[slope_table["study"] == study],
                             colours)
                if "bias" in shown:
                    _draw_targets(ax, shown, x, colours, own_slopes, study)
                if not baseline.empty:
                    _draw_references(ax, baseline, x)
                ax.set_title(f"{'REBEL' if loss == 'rebel' else 'DPO'} losses, "
                             f"{_panel_title(schedule)}")
                ax.set_xlabel(f"{x}   ({fixed} = {group[fixed].iloc[0]})")
                ax.set_ylabel(ERROR_LABEL)
                ax.text(0.99, 0.99, "bands: 10-90% of trials", transform=ax.transAxes,
                        ha="right", va="top", fontsize=7, color="0.3")
                ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.13),
                          frameon=False)
        fig.suptitle(
            f"Squared parameter error against {x}\nmedian and 10-90% band over "
            f"{group['trial'].nunique()} trials{_settings_text(config)}")
        paths += save_figure(fig, out_dir, f"{prefix}_{study}")
    return paths


def _panel_title(schedule: str) -> str:
    """A panel's schedule in words: "no radius", "rho_n = c/n", "temperature tau = c n"."""
    if schedule in TEMPERATURE_SCHEDULES.values():
        return f"temperature {schedule}"
    return _RADIUS_TITLES.get(schedule, f"rho_n = {schedule}")


def _colours(frame: pd.DataFrame) -> dict[str, str]:
    """Method -> colour: a family's first method keeps its colour, the others get spares.

    Methods of one family and loss share a panel when their schedule is "none" or theirs
    (two fixed temperatures and a growing one, say), so distinct names get distinct colours.
    """
    colours, spare = {}, itertools.cycle(_SPARE_COLOURS)
    for (family, _), names in frame.groupby(["family", "loss"], sort=False)["method"]:
        first, *others = names.unique()
        colours[first] = FAMILY_COLOURS[family]
        colours.update({name: next(spare) for name in others})
    return colours


def _draw_targets(ax: object, shown: pd.DataFrame, x: str, colours: dict[str, str],
                  own_slopes: pd.DataFrame | None, study: str) -> None:
    """A dashed line at ||theta_target - theta*||_Sigma^2 per method whose target is not
    theta* (horizontal in n; in d the world, and so the target, changes with d)."""
    for method, rows in shown[shown["bias"] > 0].groupby("method", sort=False):
        level = rows.groupby(x)["bias"].first()
        label = f"own target of {method}"
        fit = None if own_slopes is None else own_slopes[
            (own_slopes["method"] == method) & (own_slopes["study"] == study)]
        if fit is not None and not fit.empty:
            row = fit.iloc[0]
            label += "; " + slope_label("error to it", row["slope"], row["low"], row["high"])
        ax.plot(level.index, level.to_numpy(), ls=(0, (7, 3)), lw=1.1, color=colours[method],
                label=label)


def _settings_text(config: dict[str, object]) -> str:
    """The world's noise and scale and the radius constant, for a title ("" if unknown)."""
    if not config:
        return ""
    return (f" (noise {config['noise']}, reward scale {config['reward_scale']}, radius "
            f"constant c = {config['c']})")


def _schedules(frame: pd.DataFrame) -> list[str]:
    """The schedules present among frame's robust methods: radii in SCHEDULES order, then
    temperatures in TEMPERATURE_SCHEDULES order."""
    present = set(frame["schedule"])
    known = (*SCHEDULES.values(), *TEMPERATURE_SCHEDULES.values())
    return [s for s in known if s in present] or [UNSCHEDULED]


def _draw_references(ax: object, baseline: pd.DataFrame, x: str) -> None:
    """d/n and sqrt(d/n) as functions of x, through the baseline's first median."""
    grid = np.sort(baseline[x].unique())
    first = float(baseline.loc[baseline[x] == grid[0], "error"].median())
    sign = -1.0 if x == "n" else 1.0  # d/n falls in n and grows in d
    draw_power_law(ax, grid, (grid[0], first), sign, "d/n", ":")
    draw_power_law(ax, grid, (grid[0], first), sign / 2, "sqrt(d/n)", "-.")
