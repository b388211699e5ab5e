"""Reading fitted log-log slopes against the rates the paper claims (shared by rate checks).

A slope "matches" a target band when its bootstrap interval overlaps the band: with a few
dozen trials per grid point an interval is about +-0.1 wide, so demanding that it sit
inside the band would reject the claim for Monte-Carlo noise alone.
"""

from __future__ import annotations

import pandas as pd

# An interval wider than this cannot tell the rates apart (d/n from sqrt(d/n) is 0.5 apart).
MAX_WIDTH = 0.5


def overlaps(row: pd.Series, band: tuple[float, float]) -> bool:
    """Whether the slope's interval [low, high] meets the band [lo, hi].

    Args:
        row: a row of a slope table (columns slope, low, high).
        band: the target interval.

    Returns:
        True when the intervals intersect.
    """
    return bool(row["low"] <= band[1] and row["high"] >= band[0])


def describe(row: pd.Series) -> str:
    """A slope as "name -0.99 [-1.03, -0.95]"."""
    return f"{row['method']} {row['slope']:.2f} [{row['low']:.2f}, {row['high']:.2f}]"


def describe_all(rows: pd.DataFrame) -> str:
    """Every slope of a table, comma-separated (see :func:`describe`)."""
    return ", ".join(describe(r) for _, r in rows.iterrows())


def too_wide(rows: pd.DataFrame) -> bool:
    """Whether any interval among rows is too wide to decide (see MAX_WIDTH)."""
    return bool(((rows["high"] - rows["low"]) > MAX_WIDTH).any())
