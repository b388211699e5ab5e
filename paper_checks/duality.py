"""C1 and C6: strong duality turns every DRO-REBEL step into a weighted or regularised regression.

For each ambiguity set, drosim's exact solution is checked twice:

1. Against an independent cvxpy solve of the same problem:

   * chi-square: the 1-D dual solve in eta (``chi2_worst_case``) against the primal over
     the simplex (``reference.chi2_primal``);
   * KL: the importance weights softmax(l / tau*) (``kl_worst_case``) against the primal
     (``reference.kl_primal``);
   * Wasserstein-2 on the inputs of a linear model's squared residual: the closed form
     (sqrt(E r^2) + rho ||w||)^2 against cvxpy's 1-D dual in lambda
     (``reference.wasserstein_linear_sq_dual``).

2. By its own primal-dual certificate, which needs no solver. The returned worst case Q*
   (the weights q for chi-square and KL, the transported sample for Wasserstein) is a
   feasible distribution, so its expected loss is a lower bound on the sup; the dual
   objective at the returned dual variable is an upper bound (weak duality). When both
   equal the value, strong duality holds and the value is the exact worst case.

The certificate is also what the claim means in practice: for chi-square and KL the value
is sum_i q_i l_i with q a distribution in the ball, so a robust step is a least-squares fit
with the fixed weights q (Danskin); for Wasserstein the exact value is the mean loss plus
the gradient regulariser rho sqrt(E ||grad_z l||^2) plus rho^2 ||w||^2, i.e. the
first-order gradient penalty is exact up to a ridge term.

Clarabel's "optimal_inaccurate" answers on the largest problems can miss by more than the
tolerance (at n = 4096 its KL weights exceed the budget by about 10%). Such an answer lies
outside the interval the certificate proves the sup to be in, so it is reported but not
held against the claim; a disagreement with an "optimal" answer is.

Errors are divided by the spread (max - min) of the losses, the range a worst case lies in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import logsumexp, xlogy

from drosim import reference
from drosim.dro import (
    DROResult,
    chi2_worst_case,
    kl_worst_case,
    wasserstein_linear_sq_worst_case,
    wasserstein_penalty,
)
from drosim.paper_checks._framework import (
    TRUSTED_STATUSES,
    CheckResult,
    Preset,
    spread,
)
from drosim.reference import ReferenceSolution

RADII = (0.001, 0.01, 0.1, 1.0, 10.0)
SIZES: dict[str, tuple[int, ...]] = {"quick": (8, 64, 512), "full": (8, 64, 512, 4096)}
SEEDS: dict[str, int] = {"quick": 3, "full": 5}
DISTRIBUTIONS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "exponential": lambda rng, n: rng.exponential(1.0, n),
    # Heavy right tail: the worst case concentrates on a few large losses.
    "lognormal": lambda rng, n: rng.lognormal(0.0, 1.0, n),
}
DIMENSION = 5  # of the linear model's weights w in the Wasserstein problems
TOLERANCE = 1e-6  # on every relative gap

SETS = ("chi2", "KL", "Wasserstein")
CERTIFICATE = ("primal_gap", "dual_gap", "infeasibility", "regulariser_gap")
COLUMNS = ("set", "n", "rho", "comparisons", "skipped", "max_gap",
           *(f"max_{name}" for name in CERTIFICATE))


def run(preset: Preset = "quick", out: Path = Path("figures")) -> CheckResult:
    """Check the exact solvers over a sweep of n, rho, loss distributions and seeds.

    Reproduced means: every certificate closes to within ``TOLERANCE`` and every cvxpy
    answer with status "optimal" agrees to within ``TOLERANCE``.

    Args:
        preset: "quick" (n up to 512, 3 seeds) or "full" (n up to 4096, 5 seeds).
        out: unused: this check draws no figure.

    Returns:
        The result; its table has one row per (set, n, rho) with the largest gaps over the
        distributions and seeds.
    """
    rows = measure(preset)
    table = summarise(rows)
    worst = rows.groupby("set")[["gap", *CERTIFICATE]].max().fillna(0.0)
    compared = rows.groupby("set")["gap"].count()
    skipped = rows.loc[~rows["status"].isin(TRUSTED_STATUSES), "status"].value_counts()
    optimal = rows[rows["status"] == "optimal"]
    inaccurate = rows[(rows["status"] == "optimal_inaccurate") & (rows["gap"] > TOLERANCE)]

    if compared.reindex(list(SETS), fill_value=0).eq(0).any():
        verdict = "inconclusive"  # some set has no trusted cvxpy answer to compare with
    elif (worst[list(CERTIFICATE)] <= TOLERANCE).all(axis=None) and (
            optimal["gap"] <= TOLERANCE).all():
        verdict = "reproduced"
    else:
        verdict = "not reproduced"

    gaps = ", ".join(f"{s} {worst.loc[s, 'gap']:.1e} ({compared[s]} solves)" for s in SETS)
    certificate = ", ".join(
        f"{s} {worst.loc[s, ['primal_gap', 'dual_gap']].max():.1e}" for s in SETS)
    skipped_text = ", ".join(f"{count} {status}" for status, count in skipped.items()) or "none"
    inaccurate_text = (
        f"{len(inaccurate)} cvxpy 'optimal_inaccurate' answers miss by up to "
        f"{inaccurate['gap'].max():.1e} (n = {sorted(set(inaccurate['n']))}), outside the "
        f"certified interval, so the reference is off there. " if len(inaccurate) else "")
    measured = (
        f"max |ours - cvxpy| / spread: {gaps}; cvxpy solves skipped: {skipped_text}. "
        f"{inaccurate_text}"
        f"Primal-dual certificate (value vs E_Q*[l] of our feasible worst case and vs the dual "
        f"objective at our dual variable): {certificate}; Q* outside the simplex or the ball "
        f"by at most {worst['infeasibility'].max():.1e}. Regularised reading (W): exact = mean "
        f"+ rho sqrt(E||grad_z l||^2) + rho^2 ||w||^2 to "
        f"{worst.loc['Wasserstein', 'regulariser_gap']:.1e}. "
        f"Tolerance {TOLERANCE:.0e}; n in {SIZES[preset]}, rho in {RADII}."
    )
    return CheckResult(
        claim="C1, C6",
        title="Strong duality: each robust step is a weighted or regularised regression",
        paper_says=(
            "By strong duality every DRO-REBEL step is a relative-reward regression: weighted "
            "least squares for chi-square (a 1-D dual solve) and KL (importance weighting), "
            "regularised for Wasserstein (gradient regularisation)."
        ),
        measured=measured,
        verdict=verdict,
        table=table,
        reason=_reason(verdict),
        headline=(f"largest |ours - cvxpy| / spread {worst['gap'].max():.1e} over "
                  f"{int(compared.sum())} solves; certificates close to "
                  f"{worst[['primal_gap', 'dual_gap']].max(axis=None):.1e} "
                  f"(tolerance {TOLERANCE:.0e})"),
    )


def _reason(verdict: str) -> str:
    """Why the verdict, in one sentence: this check is arithmetic, not a world."""
    if verdict == "reproduced":
        return ("Pure arithmetic on fixed loss samples, no world or training involved: the "
                "exact duals equal cvxpy and close their own primal-dual certificates, so "
                "each robust step is a weighted (chi2, KL) or regularised (W) regression.")
    if verdict == "inconclusive":
        return ("Some set has no cvxpy answer with a trusted status to compare with, so "
                "the duals are checked against their certificates only.")
    return ("A dual value or certificate misses by more than the tolerance on fixed loss "
            "samples (no world involved): a solver or a reference changed.")


def measure(preset: Preset) -> pd.DataFrame:
    """Solve every problem of the sweep with drosim and with cvxpy.

    The same loss sample serves all three sets; for Wasserstein the losses are the squared
    residuals r_i^2 of a linear model, r_i = +-sqrt(l_i), with random weights w.

    Args:
        preset: "quick" or "full".

    Returns:
        One row per (set, n, rho, distribution, seed) with the cvxpy status, the gap to
        cvxpy (NaN unless the status is trusted) and the certificate's gaps.
    """
    rows: list[dict[str, object]] = []
    for n in SIZES[preset]:
        for k, (distribution, draw) in enumerate(DISTRIBUTIONS.items()):
            for seed in range(SEEDS[preset]):
                rng = np.random.default_rng([seed, n, k])
                losses = draw(rng, n)
                residuals = rng.choice([-1.0, 1.0], n) * np.sqrt(losses)
                w = rng.normal(size=DIMENSION)
                sample = {"n": n, "distribution": distribution, "seed": seed}
                for row in (
                    *_weighted_rows("chi2", losses, chi2_worst_case, reference.chi2_primal,
                                    _chi2_divergence, _chi2_dual_objective),
                    *_weighted_rows("KL", losses, kl_worst_case, reference.kl_primal,
                                    _kl_divergence, _kl_dual_objective),
                    *_wasserstein_rows(residuals, w),
                ):
                    rows.append(sample | row)
    return pd.DataFrame(rows)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Collapse the per-problem rows to one row per (set, n, rho).

    Args:
        rows: the output of :func:`measure`.

    Returns:
        Columns ``COLUMNS``: how many cvxpy solves were compared and skipped, and the
        largest of each gap (NaN where a gap does not apply to the set).
    """
    rows = rows.assign(trusted=rows["status"].isin(TRUSTED_STATUSES))
    table = rows.groupby(["set", "n", "rho"]).agg(
        comparisons=("trusted", "sum"),
        skipped=("trusted", lambda t: int((~t).sum())),
        max_gap=("gap", "max"),
        **{f"max_{name}": (name, "max") for name in CERTIFICATE},
    )
    table = table.reset_index().sort_values(
        ["set", "n", "rho"], key=lambda col: col.map(SETS.index) if col.name == "set" else col
    )
    return table.reset_index(drop=True)[list(COLUMNS)]


def _weighted_rows(
    name: str,
    losses: np.ndarray,
    solve: Callable[[torch.Tensor, torch.Tensor], DROResult],
    primal: Callable[[np.ndarray, float], ReferenceSolution],
    divergence: Callable[[np.ndarray], float],
    dual_objective: Callable[[np.ndarray, float, float], float],
) -> list[dict[str, object]]:
    """Gaps for a set whose worst case is a reweighting of the samples (chi-square, KL).

    Args:
        name: the set's name in the table.
        losses: 1-D losses of one sample.
        solve: drosim's batched solver, called once for all radii.
        primal: the cvxpy reference for one radius.
        divergence: D(q || uniform) in the set's convention.
        dual_objective: the dual objective at a dual variable, an upper bound on the sup.

    Returns:
        One row per radius: status, gap to cvxpy, gaps between the value and sum_i q_i l_i
        and the dual objective, and how far q leaves the simplex or the ball.
    """
    scale = spread(losses)
    batch = torch.as_tensor(losses).expand(len(RADII), -1)
    result = solve(batch, torch.tensor(RADII, dtype=batch.dtype))
    rows = []
    for rho, value, q, dual in zip(RADII, result.value.tolist(), result.weights.numpy(),
                                   result.dual.tolist(), strict=True):
        ref = primal(losses, rho)
        rows.append({
            "set": name,
            "rho": rho,
            "status": ref.status,
            "gap": _gap(value, ref, scale),
            "primal_gap": abs(value - float(q @ losses)) / scale,
            "dual_gap": abs(value - dual_objective(losses, rho, dual)) / scale,
            "infeasibility": max(abs(q.sum() - 1.0), -q.min(), divergence(q) - rho),
            "regulariser_gap": np.nan,
        })
    return rows


def _wasserstein_rows(residuals: np.ndarray, w: np.ndarray) -> list[dict[str, object]]:
    """Gaps for the Wasserstein-2 worst case of the squared residual (<w, z> - y)^2.

    With a = ||w||^2, m = E r^2 and the returned multiplier lambda, the worst case moves each
    input z_i by r_i w / (lambda - a): the residuals become r_i lambda / (lambda - a) at a
    transport cost sqrt(m a) / (lambda - a) <= rho. The dual objective is
    lambda rho^2 + m lambda / (lambda - a) (see ``reference.wasserstein_linear_sq_dual``).

    Args:
        residuals: 1-D residuals r_i of one sample.
        w: the linear model's weights.

    Returns:
        One row per radius: status, gap to cvxpy's dual, the certificate's gaps, and the gap
        between the exact value and mean + gradient regulariser + rho^2 ||w||^2.
    """
    losses = residuals**2
    scale = spread(losses)
    rho = torch.tensor(RADII, dtype=torch.float64)
    r = torch.as_tensor(residuals).expand(len(RADII), -1)
    result = wasserstein_linear_sq_worst_case(r, torch.as_tensor(w).expand(len(RADII), -1), rho)
    a, m = float(w @ w), float(losses.mean())
    # grad_z (<w, z> - y)^2 = 2 r w, so ||grad_z l_i||^2 = 4 r_i^2 ||w||^2.
    penalty = wasserstein_penalty(4 * a * r.square(), rho)
    regularised = m + penalty + rho.square() * a
    rows = []
    for rho_i, value, lam, reg in zip(RADII, result.value.tolist(), result.dual.tolist(),
                                      regularised.tolist(), strict=True):
        ref = reference.wasserstein_linear_sq_dual(residuals, w, rho_i)
        stretch = lam / (lam - a)  # each residual's factor in the worst case
        rows.append({
            "set": "Wasserstein",
            "rho": rho_i,
            "status": ref.status,
            "gap": _gap(value, ref, scale),
            "primal_gap": abs(value - m * stretch**2) / scale,
            "dual_gap": abs(value - (lam * rho_i**2 + m * stretch)) / scale,
            "infeasibility": np.sqrt(m * a) / (lam - a) - rho_i,
            "regulariser_gap": abs(value - reg) / scale,
        })
    return rows


def _gap(value: float, ref: ReferenceSolution, scale: float) -> float:
    """|value - cvxpy| / scale, or NaN when cvxpy's status is not trusted."""
    return abs(value - ref.value) / scale if ref.status in TRUSTED_STATUSES else np.nan


def _chi2_divergence(q: np.ndarray) -> float:
    """1/2 E_{P_n}[(dQ/dP_n - 1)^2] = 1/(2n) sum_i (n q_i - 1)^2."""
    return float(0.5 * np.mean((q.size * q - 1.0) ** 2))


def _kl_divergence(q: np.ndarray) -> float:
    """KL(Q || P_n) = sum_i q_i log(n q_i), with 0 log 0 = 0."""
    return float(xlogy(q, q.size * q).sum())


def _chi2_dual_objective(losses: np.ndarray, rho: float, eta: float) -> float:
    """eta + sqrt(1 + 2 rho) sqrt(E_{P_n}[(l - eta)_+^2]): >= the sup for every eta."""
    excess = np.maximum(losses - eta, 0.0)
    return float(eta + np.sqrt((1 + 2 * rho) * np.mean(excess**2)))


def _kl_dual_objective(losses: np.ndarray, rho: float, tau: float) -> float:
    """tau rho + tau log E_{P_n}[exp(l / tau)]: >= the sup for every tau > 0; max at tau = 0."""
    if tau == 0.0:
        return float(losses.max())
    return float(tau * rho + tau * (logsumexp(losses / tau) - np.log(losses.size)))
