"""Statistics for the studies: log-log slopes with bootstrap intervals, quantile bands.

Slopes are fitted by least squares of log(median error) on log(x) across the grid of x;
the interval resamples trials (with replacement, within each x) and refits, so it reflects
the Monte-Carlo uncertainty of the medians.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

__all__ = ["Slope", "loglog_slope", "per_x_statistics", "quantile_band"]


class Slope(NamedTuple):
    """A fitted log-log slope with its bootstrap confidence interval."""

    slope: float
    low: float
    high: float

    def contains(self, value: float, tolerance: float = 0.0) -> bool:
        """Whether value lies in [low - tolerance, high + tolerance]."""
        return self.low - tolerance <= value <= self.high + tolerance


def loglog_slope(frame: pd.DataFrame, x: str, y: str, *, boots: int = 500,
                 level: float = 0.9, seed: int = 0, statistic: str = "median") -> Slope:
    """Slope of log(median y) (or log(mean y)) against log(x), with a bootstrap interval over
    trials.

    Args:
        frame: one row per trial and x value.
        x: the column of the grid (e.g. "n").
        y: the column of the measured error (positive).
        boots: bootstrap resamples.
        level: confidence level of the interval.
        seed: the bootstrap's seed.
        statistic: "median" (robust to heavy tails) or "mean" (the right one when the
            error's distribution changes shape along x, e.g. a chi-square with d degrees of
            freedom, whose median / mean ratio moves with d).

    Returns:
        Slope(slope, low, high).

    Raises:
        ValueError: fewer than two distinct x values, or non-positive y.

    Example:
        >>> import pandas as pd
        >>> f = pd.DataFrame({"n": [10, 10, 100, 100], "err": [1.0, 1.2, 0.1, 0.12]})
        >>> round(loglog_slope(f, "n", "err").slope, 3)
        -1.0
    """
    if statistic not in ("median", "mean"):
        raise ValueError(f"statistic must be 'median' or 'mean', got {statistic!r}")
    groups = [g[y].to_numpy(dtype=float) for _, g in frame.groupby(x, sort=True)]
    xs = np.log(np.sort(frame[x].unique()).astype(float))
    if len(xs) < 2:
        raise ValueError(f"a slope needs at least two distinct values of {x}")
    if not all((g > 0).all() and np.isfinite(g).all() for g in groups):
        raise ValueError(f"{y} must be positive and finite to take logs")

    def centre(values: np.ndarray) -> float:
        # the median of the logs (between two middle values: their geometric mean); the
        # mean is taken before the log
        if statistic == "median":
            return float(np.median(np.log(values)))
        return float(np.log(values.mean()))

    slope = float(np.polyfit(xs, [centre(g) for g in groups], 1)[0])
    rng = np.random.default_rng(seed)
    resampled = np.empty(boots)
    for b in range(boots):
        centres = [centre(rng.choice(g, size=g.size)) for g in groups]
        resampled[b] = np.polyfit(xs, centres, 1)[0]
    tail = (1 - level) / 2
    return Slope(slope, float(np.quantile(resampled, tail)),
                 float(np.quantile(resampled, 1 - tail)))


def quantile_band(frame: pd.DataFrame, by: list[str], y: str, low: float = 0.1,
                  high: float = 0.9) -> pd.DataFrame:
    """Median and [low, high] quantiles of y per group (columns median, low, high)."""
    grouped = frame.groupby(by)[y]
    return pd.DataFrame({"median": grouped.median(), "low": grouped.quantile(low),
                         "high": grouped.quantile(high)}).reset_index()


def per_x_statistics(frame: pd.DataFrame, x: str, y: str, *, study: str,
                     by: tuple[str, ...] = ("method",)) -> pd.DataFrame:
    """Long-format statistics of y per group and x: what a reader needs to refit a slope.

    Args:
        frame: one row per trial and x value.
        x: the swept column (e.g. "n").
        y: the measured column (e.g. "error").
        study: the study's name, written in the ``study`` column.
        by: the grouping columns kept (``method`` at least; e.g. schedule, world).

    Returns:
        Columns study, *by, x_name, x, median, q10, q90, mean, trials, one row per (group,
        x), sorted.

    Example:
        >>> import pandas as pd
        >>> f = pd.DataFrame({"method": "A", "n": [10, 10, 100], "error": [1.0, 3.0, 0.5]})
        >>> per_x_statistics(f, "n", "error", study="rates")[["x", "median", "trials"]]
             x  median  trials
        0   10     2.0       2
        1  100     0.5       1
    """
    grouped = frame.groupby([*by, x], sort=True)[y]
    stats = pd.DataFrame({"median": grouped.median(), "q10": grouped.quantile(0.1),
                          "q90": grouped.quantile(0.9), "mean": grouped.mean(),
                          "trials": grouped.size()}).reset_index().rename(columns={x: "x"})
    stats.insert(0, "study", study)
    stats.insert(len(by) + 1, "x_name", x)
    return stats
