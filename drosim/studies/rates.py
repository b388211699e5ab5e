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

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from drosim.chunks import DEFAULT_MEMORY_BUDGET
from drosim.methods import Method
from drosim.plotting import ERROR_LABEL, draw_methods, draw_power_law, save_figure
from drosim.stats import loglog_slope
from drosim.studies.montecarlo import (
    SCHEDULES,
    UNSCHEDULED,
    Setting,
    resolve_preset,
    run_settings,
    scheduled_methods,
)
from drosim.world import make_world

__all__ = ["COLUMNS", "PRESETS", "plot", "run", "slopes"]

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
_GRID = {"n": "n", "d": "d"}  # study -> the column it varies
STATISTIC = {"n": "median", "d": "mean"}  # study -> the statistic its slope is fitted to
_RADIUS_TITLES = {UNSCHEDULED: "no radius", "fixed": "fixed rho = c"}


def run(preset: str = "quick", *, methods: Sequence[Method] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET, device: str = "cpu", seed: int = 0,
        progress: bool = True, **overrides: object) -> pd.DataFrame:
    """Run both sweeps.

    Args:
        preset: "quick" or "full" (see PRESETS).
        methods: the methods to fit (default: scheduled_methods(c) with the preset's c).
        memory_budget: bytes one chunk of trials may use.
        device: where the worlds live and the fits run.
        seed: seeds the worlds and every random stream; the same seed gives the same frame.
        progress: show a progress bar over the (setting, method) cells.
        **overrides: replace preset values: n_grid, dim, d_grid, samples, trials, noise,
            reward_scale, c. An empty n_grid or d_grid skips that study.

    Returns:
        One row per (study, method, schedule, n, d, trial), columns COLUMNS (signal is
        ||theta*||_Sigma^2); ``attrs["config"]`` holds the configuration.
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
                         memory_budget=memory_budget, progress=progress, desc="rates")
    frame = frame[COLUMNS]
    frame.attrs["config"] = config
    return frame


def slopes(frame: pd.DataFrame) -> pd.DataFrame:
    """The log-log slope of the median error in n (study "n") or of the mean error in d
    (study "d"; see the module note).

    Args:
        frame: the output of :func:`run`.

    Returns:
        One row per (method, schedule, study) with columns method, schedule, study, slope,
        low, high (a 90% bootstrap interval over trials, drosim.stats.loglog_slope).
    """
    rows = []
    for (study, method, schedule), group in frame.groupby(["study", "method", "schedule"],
                                                          sort=False):
        fit = loglog_slope(group, _GRID[study], "error", statistic=STATISTIC[study])
        rows.append({"method": method, "schedule": schedule, "study": study,
                     "slope": fit.slope, "low": fit.low, "high": fit.high})
    return pd.DataFrame(rows, columns=["method", "schedule", "study", "slope", "low", "high"])


def plot(frame: pd.DataFrame, out_dir: Path | str, *, slope_table: pd.DataFrame | None = None,
         prefix: str = "rate") -> list[Path]:
    """Draw ``<prefix>_n`` and ``<prefix>_d`` (PNG and PDF), one figure per study.

    One panel per (loss, radius schedule): REBEL-type methods on the top row, DPO-type
    below, and the plain methods (no radius) repeated in every panel of their row. Each
    method shows its median error with a 10-90% band and its fitted slope in the legend;
    the reference lines d/n and sqrt(d/n) pass through the median of the row's plain
    baseline (REBEL or DPO) at the first grid point.

    Args:
        frame: the output of :func:`run`.
        out_dir: the folder for the figures (created if missing).
        slope_table: the output of :func:`slopes`, computed here if not given.
        prefix: the start of the file names.

    Returns:
        The paths written.
    """
    slope_table = slopes(frame) if slope_table is None else slope_table
    config = frame.attrs.get("config", {})
    paths = []
    for study, group in frame.groupby("study", sort=False):
        x = _GRID[study]
        fixed = "d" if study == "n" else "n"
        rows = [(loss, _schedules(group[group["loss"] == loss]))
                for loss in ("rebel", "dpo") if loss in set(group["loss"])]
        columns = max(len(schedules) for _, schedules in rows)
        # Wide enough for the title when there is a single panel.
        fig = Figure(figsize=(max(5.6 * columns, 8.5), 4.8 * len(rows)), layout="constrained")
        axes = fig.subplots(len(rows), columns, squeeze=False)
        for row, (loss, schedules) in enumerate(rows):
            of_loss = group[group["loss"] == loss]
            baseline = of_loss[of_loss["family"] == "none"]
            for ax in axes[row, len(schedules):]:
                ax.set_visible(False)
            for ax, schedule in zip(axes[row], schedules, strict=False):
                shown = of_loss[of_loss["schedule"].isin([UNSCHEDULED, schedule])]
                draw_methods(ax, shown, x, "error", slope_table[slope_table["study"] == study])
                if not baseline.empty:
                    _draw_references(ax, baseline, x)
                radius = _RADIUS_TITLES.get(schedule, f"rho_n = {schedule}")
                ax.set_title(f"{'REBEL' if loss == 'rebel' else 'DPO'} losses, {radius}")
                ax.set_xlabel(f"{x}   ({fixed} = {group[fixed].iloc[0]})")
                ax.set_ylabel(ERROR_LABEL)
                ax.legend(fontsize=7, loc="lower left" if study == "n" else "upper left")
        fig.suptitle(
            f"Squared parameter error against {x}\nmedian and 10-90% band over "
            f"{group['trial'].nunique()} trials{_settings_text(config)}")
        paths += save_figure(fig, out_dir, f"{prefix}_{study}")
    return paths


def _settings_text(config: dict[str, object]) -> str:
    """The world's noise and scale and the radius constant, for a title ("" if unknown)."""
    if not config:
        return ""
    return (f" (noise {config['noise']}, reward scale {config['reward_scale']}, radius "
            f"constant c = {config['c']})")


def _schedules(frame: pd.DataFrame) -> list[str]:
    """The radius schedules present among frame's robust methods, in SCHEDULES order."""
    present = set(frame["schedule"])
    return [s for s in SCHEDULES.values() if s in present] or [UNSCHEDULED]


def _draw_references(ax: object, baseline: pd.DataFrame, x: str) -> None:
    """d/n and sqrt(d/n) as functions of x, through the baseline's first median."""
    grid = np.sort(baseline[x].unique())
    first = float(baseline.loc[baseline[x] == grid[0], "error"].median())
    sign = -1.0 if x == "n" else 1.0  # d/n falls in n and grows in d
    draw_power_law(ax, grid, (grid[0], first), sign, "d/n", ":")
    draw_power_law(ax, grid, (grid[0], first), sign / 2, "sqrt(d/n)", "-.")
