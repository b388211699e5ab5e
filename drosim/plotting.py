"""Figures of drosim's worst-case expectations, checked against cvxpy.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no pyplot), so
nothing opens a window and no global backend is changed: ``savefig`` renders PNG with Agg
and PDF with the PDF backend. The cvxpy points need the optional dependency
(``pip install drosim[test]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor

from drosim import reference
from drosim.dro import chi2_worst_case, kl_worst_case, wasserstein_linear_sq_worst_case

__all__ = ["WASSERSTEIN_W", "plot_worst_case_vs_rho", "worst_case_points"]

# The linear model's weights in the Wasserstein panel. ||w|| = 0.2 keeps the worst case
# within a few times the largest loss over rho in [1e-3, 10]: rho ||w|| is how far
# (in loss-root units) the adversary can push each residual.
WASSERSTEIN_W = (0.12, 0.16)

# Each ball's name and its convention, as the x-axis label of its panel.
_CONVENTIONS = {
    "chi2": r"chi-square: $\frac{1}{2}\,\mathbb{E}_{P_n}(dQ/dP_n - 1)^2 \leq \rho$",
    "KL": r"KL: $\mathbb{E}_Q \log(dQ/dP_n) \leq \rho$",
    "Wasserstein": r"Wasserstein-2 on inputs $z$: $W_2(Q, P_n) \leq \rho$",
}
_TRUSTED_STATUSES = ("optimal", "optimal_inaccurate")
_CURVE_POINTS = 300


def worst_case_values(losses: Tensor, rhos: Tensor, w: Tensor) -> dict[str, np.ndarray]:
    """drosim's exact worst case for every radius, one batched solve per ambiguity set.

    For Wasserstein the losses are read as squared residuals of a linear model with weights
    w, r_i = sqrt(l_i), so all three sets share the empirical mean.

    Args:
        losses: 1-D float64 losses (non-negative).
        rhos: 1-D radii.
        w: the linear model's weights for the Wasserstein set.

    Returns:
        Set name -> values, each of shape ``rhos.shape``.
    """
    batch = losses.expand(rhos.numel(), -1)
    residuals = losses.sqrt().expand(rhos.numel(), -1)
    return {
        "chi2": chi2_worst_case(batch, rhos).value.numpy(),
        "KL": kl_worst_case(batch, rhos).value.numpy(),
        "Wasserstein": wasserstein_linear_sq_worst_case(
            residuals, w.expand(rhos.numel(), -1), rhos
        ).value.numpy(),
    }


def worst_case_points(
    losses: Tensor, rhos: Sequence[float], w: Sequence[float] = WASSERSTEIN_W
) -> pd.DataFrame:
    """drosim's worst case next to cvxpy's at each radius: the figure's markers.

    Args:
        losses: 1-D losses (converted to float64).
        rhos: radii at which to solve with cvxpy.
        w: the linear model's weights for the Wasserstein set.

    Returns:
        One row per (set, rho) with columns set, rho, ours, cvxpy and status (cvxpy's; its
        value is NaN unless the status is optimal or optimal_inaccurate).
    """
    losses = torch.as_tensor(losses, dtype=torch.float64)
    w_t = torch.as_tensor(w, dtype=torch.float64)
    ours = worst_case_values(losses, torch.tensor(rhos, dtype=torch.float64), w_t)
    l_np, w_np = losses.numpy(), w_t.numpy()
    rows = []
    for name, values in ours.items():
        for rho, value in zip(rhos, values, strict=True):
            if name == "chi2":
                solution = reference.chi2_primal(l_np, rho)
            elif name == "KL":
                solution = reference.kl_primal(l_np, rho)
            else:
                solution = reference.wasserstein_linear_sq_dual(np.sqrt(l_np), w_np, rho)
            trusted = solution.status in _TRUSTED_STATUSES
            rows.append({"set": name, "rho": rho, "ours": float(value),
                         "cvxpy": solution.value if trusted else np.nan,
                         "status": solution.status})
    return pd.DataFrame(rows)


def plot_worst_case_vs_rho(
    losses: Tensor, rhos: Sequence[float], out_dir: Path | str,
    w: Sequence[float] = WASSERSTEIN_W,
) -> list[Path]:
    """Plot the worst-case expected loss against the radius for chi-square, KL and Wasserstein.

    One panel per ambiguity set: drosim's exact value on a dense log-spaced grid of radii
    (line), cvxpy's value at ``rhos`` (markers), and the empirical mean and the largest loss
    (horizontal lines). chi-square and KL worst cases reweight the samples, so they lie
    between the mean and the max; the Wasserstein adversary moves the inputs, so it can
    exceed the max.

    Args:
        losses: 1-D non-negative losses.
        rhos: radii of the cvxpy markers; the line spans their range.
        out_dir: folder for the figure (created if missing).
        w: the linear model's weights for the Wasserstein panel.

    Returns:
        The paths written: ``out_dir/worst_case_vs_rho.png`` and ``.pdf``.
    """
    losses = torch.as_tensor(losses, dtype=torch.float64)
    grid = np.geomspace(min(rhos), max(rhos), _CURVE_POINTS)
    curves = worst_case_values(losses, torch.from_numpy(grid),
                               torch.as_tensor(w, dtype=torch.float64))
    points = worst_case_points(losses, rhos, w)
    mean, top = float(losses.mean()), float(losses.max())

    fig = Figure(figsize=(14, 4.6), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)  # one scale: the sets compare at a glance
    for ax, (name, values) in zip(axes, curves.items(), strict=True):
        ax.plot(grid, values, color="C0", lw=2, label="drosim (exact dual)")
        marks = points[points["set"] == name]
        ax.plot(marks["rho"], marks["cvxpy"], "o", mfc="none", mec="black", ms=7,
                label="cvxpy (Clarabel)")
        ax.axhline(mean, color="0.4", ls="--", lw=1, label=f"empirical mean {mean:.2f}")
        ax.axhline(top, color="C3", ls=":", lw=1.2, label=f"largest loss {top:.2f}")
        ax.set_xscale("log")
        ax.set_xlabel(r"radius $\rho$")
        ax.set_title(_CONVENTIONS[name], fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("worst-case expected loss over the ball")
    axes[2].text(0.03, 0.97, rf"loss $(\langle w, z\rangle - y)^2$, $\|w\|_2 = "
                 rf"{float(np.linalg.norm(w)):.2g}$", transform=axes[2].transAxes,
                 va="top", fontsize=9)
    axes[0].legend(loc="upper left", fontsize=9)
    fig.suptitle(f"Worst-case expected loss against the radius, n = {losses.numel()} losses")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "worst_case_vs_rho.png", out_dir / "worst_case_vs_rho.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


# ------------------------------------------------------------- Monte-Carlo study figures
# Shared by drosim.studies: log-log error curves with quantile bands, one style per method.

__all__ += ["ERROR_LABEL", "FAMILY_COLOURS", "draw_methods", "draw_power_law", "slope_label"]

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
    # Imported here, not at the top: this section is appended to the figures above, and
    # only the study figures need drosim.stats.
    from drosim.stats import quantile_band

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


__all__ += ["save_figure"]


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


__all__ += ["BAND_NOTE", "draw_ratios"]

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
    from drosim.stats import quantile_band

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
