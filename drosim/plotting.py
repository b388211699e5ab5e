"""The study figures' shared drawing: log-log error curves with quantile bands, one style
per method, and saving a figure as PNG and PDF. (The worst case against the radius, drawn
next to cvxpy's points, is the figure of the check ``drosim.paper_checks.worst_case_curve``.)

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no pyplot), so
nothing opens a window and no global backend is changed: ``savefig`` renders PNG with Agg
and PDF with the PDF backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from drosim.stats import quantile_band

__all__ = ["BAND_NOTE", "ERROR_LABEL", "FAMILY_COLOURS", "draw_methods", "draw_power_law",
           "draw_ratios", "save_figure", "slope_label"]

# The y-axis of every error figure: the quantity and its convention (paper section 2).
ERROR_LABEL = (r"$\|\hat\theta - \theta^*\|_\Sigma^2$" "\n"
               r"$\Sigma = \mathbb{E}[d\phi\, d\phi^\top]$ under $\pi_0$ (uniform responses)")

# One colour per ambiguity family and one line style per loss, the same in every figure.
FAMILY_COLOURS = {"none": "black", "chi2": "C1", "kl": "C2", "kl_temperature": "C4",
                   "wasserstein": "C3"}
_LOSS_STYLES = {"rebel": "-", "dpo": "--"}


def slope_label(name: str, slope: float, low: float, high: float) -> str:
    """A legend entry such as "chi2-REBEL: slope -0.99 [-1.03, -0.95]"."""
    return f"{name}: slope {slope:.2f} [{low:.2f}, {high:.2f}]"


def draw_methods(ax: object, frame: pd.DataFrame, x: str, y: str,
                 slope_table: pd.DataFrame | None = None,
                 colours: dict[str, str] | None = None) -> None:
    """Each method's median of y against x with its 10-90% band, on log-log axes.

    Args:
        ax: a matplotlib Axes.
        frame: one row per trial, with columns method, schedule, family, loss, x and y.
        x: the grid column.
        y: the error column (positive).
        slope_table: rows (method, schedule, slope, low, high); a method found there gets
            its slope and interval in the legend.
        colours: method name -> colour, for methods that must not share their family's
            colour (FAMILY_COLOURS) with another method of the same panel.
    """
    slope_rows = {} if slope_table is None else {
        (r.method, r.schedule): r for r in slope_table.itertuples(index=False)}
    for (method, schedule), group in frame.groupby(["method", "schedule"], sort=False):
        band = quantile_band(group, [x], y)
        first = group.iloc[0]
        colour = (colours or {}).get(method, FAMILY_COLOURS[first["family"]])
        fit = slope_rows.get((method, schedule))
        label = method if fit is None else slope_label(method, fit.slope, fit.low, fit.high)
        ax.plot(band[x], band["median"], _LOSS_STYLES[first["loss"]], color=colour,
                marker="o", ms=3.5, lw=1.6, label=label)
        ax.fill_between(band[x], band["low"], band["high"], color=colour, alpha=0.12, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)


def draw_power_law(ax: object, grid: np.ndarray, anchor: tuple[float, float], slope: float,
                   label: str, style: str) -> None:
    """The reference line y = y0 (x / x0)^slope through anchor = (x0, y0), thin and grey."""
    x0, y0 = anchor
    ax.plot(grid, y0 * (grid / x0) ** slope, style, color="0.45", lw=1.1,
            label=f"{label} (slope {slope:g})")


def save_figure(fig: Figure, out_dir: Path | str, stem: str, dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``out_dir/stem.png`` and ``.pdf`` (creating out_dir); return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    # Lay the figure out once, not once per format: the layout is in inches, the same for
    # both, and constrained layout dominates the saving time of many-panel figures.
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)
        fig.set_layout_engine("none")
    for path in paths:
        fig.savefig(path, dpi=dpi)
    return paths


# How every study figure's shading reads: the spread of the trials, not an interval on the
# median (the slopes' intervals are bootstrap intervals, given in the legends).
BAND_NOTE = "shaded: 10-90% of trials (their spread, not a confidence interval)"


def draw_ratios(ax: object, frame: pd.DataFrame, x: str, y: str, baseline: str,
                colours: dict[str, str] | None = None) -> None:
    """Each method's y divided by the baseline method's on the same trial, against x.

    The methods of a setting are fitted on the same pairs, so the paired ratio shows where a
    robust method differs from its baseline even when their error curves overlap; a ratio
    of exactly 1 means the same estimate.

    Args:
        ax: a matplotlib Axes.
        frame: one row per trial, with columns method, schedule, family, loss, trial, x, y.
        x: the grid column.
        y: the error column (positive).
        baseline: the method every other one is divided by.
        colours: method name -> colour, as :func:`draw_methods`.
    """
    keys = [x, "trial"]
    base = frame[frame["method"] == baseline].set_index(keys)[y]
    for (method, _), group in frame.groupby(["method", "schedule"], sort=False):
        if method == baseline:
            continue
        paired = group.set_index(keys)[y] / base.reindex(group.set_index(keys).index)
        band = quantile_band(paired.rename("ratio").reset_index(), [x], "ratio")
        first = group.iloc[0]
        colour = (colours or {}).get(method, FAMILY_COLOURS[first["family"]])
        ax.plot(band[x], band["median"], _LOSS_STYLES[first["loss"]], color=colour,
                marker="o", ms=3, lw=1.4, label=method)
        ax.fill_between(band[x], band["low"], band["high"], color=colour, alpha=0.12, lw=0)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_ylabel(f"error / {baseline}'s\n(same trial)")
