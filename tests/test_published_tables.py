"""The committed results can be checked by a reader: figures/full/tables/*.csv hold the
per-x statistics behind the figures, and a slope reported in figures/full/claims.md is
refitted from them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from drosim.paper_checks._framework import STATS_COLUMNS

FULL = Path(__file__).resolve().parents[1] / "figures" / "full"


def _claims_row(check: str) -> str:
    claims = pd.read_csv(FULL / "claims.csv")
    return claims.loc[claims["check"] == check, "measured"].iloc[0]


def _reported(text: str, pattern: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in the reported text"
    return float(found.group(1))


@pytest.mark.parametrize("table", sorted((FULL / "tables").glob("*.csv")) or [None])
def test_every_committed_table_has_the_per_x_columns(table):
    assert table is not None, "figures/full/tables/ holds no table"
    frame = pd.read_csv(table)
    assert set(STATS_COLUMNS) <= set(frame.columns)
    # Exact population curves (rates' "exact bias") are not sampled: no trials, one value.
    exact = frame["study"].eq("exact bias") if "study" in frame else frame["trials"].lt(0)
    assert (frame.loc[~exact, "trials"] > 0).all() and (frame["q10"] <= frame["q90"]).all()
    values = frame.loc[exact, ["median", "q10", "q90", "mean"]]
    assert (frame.loc[exact, "trials"] == 0).all() and (values.nunique(axis=1) == 1).all()


def test_rebels_reported_slopes_refit_from_the_committed_table():
    """REBEL's slope in n from the medians and in d from the means, as the check fits them,
    equals what claims.csv reports (to its two printed decimals)."""
    stats = pd.read_csv(FULL / "tables" / "rates.csv")
    text = _claims_row("rates")
    rebel = stats[(stats["method"] == "REBEL") & (stats["world"] == "gaussian")]
    # "Gaussian world: ... REBEL -1.00 [..], W-REBEL .. (n); REBEL 1.00 [..], .. (d)"
    n_part, d_part = text.split("Gaussian world:", 1)[1].split("(n);", 1)
    for study, column, part in (("n", "median", n_part), ("d", "mean", d_part)):
        rows = rebel[rebel["study"] == study].sort_values("x")
        slope = np.polyfit(np.log(rows["x"]), np.log(rows[column]), 1)[0]
        assert slope == pytest.approx(_reported(part, r"REBEL (-?\d+\.\d+)"), abs=0.011)
