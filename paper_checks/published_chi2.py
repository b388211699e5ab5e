"""Anchors: the public chi2-REBEL code's "worst case" can fall below the empirical mean.

The authors' public chi2-REBEL code (accompanying arXiv 2509.19104) evaluates
eta + sqrt((2 rho / n) sum (l_i - eta)_+^2) over a finite candidate set of eta (min - 1,
each distinct loss, max + 1) and keeps the smallest value. The chi-square dual (with
D = 1/2 E(dQ/dP - 1)^2 <= rho) has sqrt(1 + 2 rho) in place of sqrt(2 rho). Below the
smallest loss the published expression is eta + sqrt(2 rho) sqrt(Var + (mean - eta)^2),
which behaves like (1 - sqrt(2 rho)) eta + sqrt(2 rho) mean: for sqrt(2 rho) < 1 it is
unbounded below, so its value at the candidate min - 1 can drop below the empirical mean,
which no worst-case expectation can do. ``drosim.paper_checks.published`` re-implements that
code as a baseline.

"Anchors" are reference values of that code: the table ``ANCHORS`` holds, for three
(rho, n), the exact worst case, the public code's value and the mean of exponential(1)
losses, as measured on the public code. This check re-measures them: for each (rho, n),
exponential(1) losses from a fixed seed, it computes the exact worst case (drosim), the
cvxpy primal, the public code's value (``drosim.paper_checks.published``) and the mean. The
reference values came from unknown seeds, so the numbers differ except where the sample
happens to coincide; the pattern is what is checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from drosim import reference
from drosim.dro import chi2_worst_case
from drosim.paper_checks._framework import (
    TRUSTED_STATUSES,
    CheckResult,
    Preset,
    spread,
)
from drosim.paper_checks.published import published_chi2_objective

# Reference values of the public code: (rho, n, exact worst case, its chi2 value, mean).
ANCHORS = (
    (0.01, 64, 1.1809, -0.6749, 1.0311),
    (0.1, 512, 1.4211, -0.0104, 0.9802),
    (2.0, 512, 2.8704, 2.6481, 0.9653),
)
SEEDS: dict[str, tuple[int, ...]] = {"quick": (0,), "full": tuple(range(10))}
TOLERANCE = 1e-6  # on |ours - cvxpy| / spread
COLUMNS = ("rho", "n", "seed", "exact_ours", "exact_cvxpy", "cvxpy_status", "published", "mean",
           "published_below_mean", "anchors_exact", "anchors_published", "anchors_mean")


def run(preset: Preset = "quick", out: Path = Path("figures")) -> CheckResult:
    """Re-measure the reference values (``ANCHORS``) and check their pattern.

    Reproduced means: at the small radii (2 rho < 1, where the published expression is
    unbounded below) the public code's value is below the empirical mean for every seed,
    and drosim's exact worst case agrees with cvxpy everywhere, so the comparison stands
    on a trusted worst case.

    Args:
        preset: "quick" (seed 0) or "full" (seeds 0-9).
        out: unused: this check draws no figure.

    Returns:
        The result; its table has one row per (rho, n, seed) with the reference values
        (columns ``anchors_*``) alongside.
    """
    table = pd.DataFrame([_measure(rho, n, seed, anchor)
                          for rho, n, *anchor in ANCHORS for seed in SEEDS[preset]])
    gap = (table["exact_ours"] - table["exact_cvxpy"]).abs() / table.pop("spread")
    small = table[2 * table["rho"] < 1]

    if not (table["cvxpy_status"].isin(TRUSTED_STATUSES) & (gap <= TOLERANCE)).all():
        verdict = "inconclusive"  # without a trusted worst case there is nothing to stand on
    elif small["published_below_mean"].all():
        verdict = "reproduced"
    else:
        verdict = "not reproduced"

    first = table[table["seed"] == SEEDS[preset][0]]
    values = "; ".join(
        f"rho={r.rho:g}, n={r.n}: exact {r.exact_ours:.4f} (cvxpy {r.exact_cvxpy:.4f}), "
        f"public {r.published:.4f}, mean {r.mean:.4f} [anchors: {r.anchors_exact:.4f}, "
        f"{r.anchors_published:.4f}, {r.anchors_mean:.4f}]"
        for r in first.itertuples()
    )
    below = small.groupby("rho")["published_below_mean"].agg(["sum", "size"])
    counts = ", ".join(f"{int(c['sum'])}/{int(c['size'])} seeds at rho={rho:g}"
                       for rho, c in below.iterrows())
    measured = (
        f"Seed {SEEDS[preset][0]}: {values}. Public value below the mean in {counts}; below "
        f"the exact worst case in {int((table['published'] < table['exact_ours']).sum())}"
        f"/{len(table)} rows; max |ours - cvxpy| / spread {gap.max():.1e}."
    )
    return CheckResult(
        claim="anchors",
        title="The public chi2-REBEL code's value can fall below the empirical mean",
        paper_says=(
            "The authors' public chi2-REBEL code searches eta over {min-1, each "
            "distinct loss, max+1} in eta + sqrt((2 rho/n) sum (l-eta)_+^2); with sqrt(2 rho) "
            "< 1 this is unbounded below, and its value falls below the empirical mean "
            "(e.g. -0.6749 vs 1.0311 at rho=0.01, n=64), i.e. below any valid worst case."
        ),
        measured=measured,
        verdict=verdict,
        table=table,
        reason=("With sqrt(2 rho) < 1 the public code's eta-search is unbounded below, so on "
                "fixed exponential losses (no world or training involved) its value falls "
                "below the empirical mean, which no worst case over a ball can do."
                if verdict == "reproduced" else
                "On fixed exponential losses the public value stays at or above the mean at "
                "some small radius, or our exact worst case is not confirmed by cvxpy."),
        headline=(f"rho = {first['rho'].iloc[0]:g}, n = {first['n'].iloc[0]}: public "
                  f"{first['published'].iloc[0]:.4f} vs mean {first['mean'].iloc[0]:.4f} "
                  f"and exact worst case {first['exact_ours'].iloc[0]:.4f}; below the mean "
                  f"in {int(small['published_below_mean'].sum())}/{len(small)} small-rho rows"),
    )


def _measure(rho: float, n: int, seed: int, anchor: list[float]) -> dict[str, object]:
    """All four values for one (rho, n, seed), with the reference values for comparison.

    Args:
        rho: the chi-square radius.
        n: the number of losses.
        seed: seed of numpy's default generator for the exponential(1) losses.
        anchor: the reference (exact, public value, mean) for this (rho, n).

    Returns:
        One row of the table, plus the losses' spread for the gap.
    """
    losses = np.random.default_rng(seed).exponential(1.0, n)
    losses_t = torch.from_numpy(losses)
    primal = reference.chi2_primal(losses, rho)
    published = published_chi2_objective(losses_t, rho).objective
    mean = float(losses.mean())
    exact_anchor, published_anchor, mean_anchor = anchor
    return {
        "rho": rho, "n": n, "seed": seed,
        "exact_ours": float(chi2_worst_case(losses_t, rho).value),
        "exact_cvxpy": primal.value, "cvxpy_status": primal.status,
        "published": published, "mean": mean, "published_below_mean": published < mean,
        "anchors_exact": exact_anchor, "anchors_published": published_anchor,
        "anchors_mean": mean_anchor, "spread": spread(losses),
    }
