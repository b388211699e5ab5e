"""Claim C5: the radius-coverage trade-off, with coverage computed exactly.

The paper says radii that shrink faster than the empirical divergence concentrates give the
parametric rate but lose coverage (the data distribution P falls outside the ball around
the empirical P_n), while radii that guarantee coverage give n^(-1/2) on the squared error.
This study measures both sides on the same samples: for radius schedules
rho_n = c n^(-gamma) over a grid of gamma and n, and for each trial,

* the squared error ||theta_hat - theta*||_Sigma^2 of robust REBEL (Sigma = E[dphi dphi^T]
  under the sampling policy, as in the rates study), and
* whether P lies in the ball {Q : D(Q || P_n) <= rho_n}.

The world is finitely supported so that D(P || P_n) is exact, not estimated: 3 prompts, 3
responses, d = 3, one reward objective, the uniform sampling policy, and a two-point noise
on the relative reward, sigma * (-sqrt(3) w.p. 1/4, +1/sqrt(3) w.p. 3/4) (mean 0, variance
sigma^2). The estimator sees z = (dphi, dr), so the support of P is the set of distinct z:
one atom per (prompt, y != y', noise value), with P(z) = (1/P) pi(y|x) pi(y'|x) p(noise), and
one atom per noise value for y = y' (then dphi = 0 whatever the prompt). P_n is the empirical
distribution of the n sampled atoms.

Why not Rademacher noise (world.py's ``noise_kind="rademacher"``)? Then the loss at theta*
is the same, sigma^2, on every sample: every Q in the ball is a worst case there, the robust
objective has a kink at theta*, and chi-square/KL-REBEL recover theta* to rounding error as
soon as rho_n >> 1/n. Two noise magnitudes remove that degeneracy (the worst case is unique
as long as it does not sit entirely on the rare large-noise atoms, i.e. for chi-square
radii below 3/2 and KL radii below log 4, which every radius here is).

Divergences, in drosim.dro's conventions (both +inf when some atom of P is unobserved, since
then P is not absolutely continuous with respect to P_n and lies in no ball around it):

* chi-square: D(P || P_n) = 1/2 sum_z (P(z) - P_n(z))^2 / P_n(z);
* KL: D(P || P_n) = sum_z P(z) log(P(z) / P_n(z)).

n D(P || P_n) converges in law to chi^2_{S-1} / 2 for both (S atoms), so the balls cover P
for good once rho_n >> 1/n (gamma < 1) and lose it when gamma > 1.

Wasserstein: W-REBEL's ball moves only the inputs dphi (cost ||dphi - dphi'||^2, dr held
fixed). Under that cost P is at infinite distance from P_n unless every dr value carries the
same mass in both, so its coverage is almost surely 0 and not informative. Reported instead
is W_2(P, P_n) with the joint cost ||z - z'||^2 on z = (dphi, dr), an exact transport LP
(HiGHS) per trial. It is a LOWER bound on the inputs-only distance, so "covered" for the
Wasserstein family is an UPPER bound on the coverage of W-REBEL's ball. For a finitely
supported P, W_2(P, P_n) ~ n^(-1/4) (moving mass TV ~ n^(-1/2) over distances of order 1),
so its coverage boundary is gamma = 1/4.

The radius constants are calibrated, separately for each family, on independent samples at
n = 1024: c = q * 1024^gamma with q the 90% quantile of D(P || P_n) there. Every schedule
thus covers P in about 90% of trials at n = 1024, and the gammas fan out from that pivot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from matplotlib.figure import Figure
from scipy.optimize import linprog
from torch import Tensor

from drosim.chunks import DEFAULT_MEMORY_BUDGET, chunk_slices, trials_per_chunk
from drosim.methods import Method
from drosim.plotting import save_figure, slope_label
from drosim.stats import loglog_slope, quantile_band
from drosim.studies._common import random_stream
from drosim.studies.montecarlo import SAMPLE_BLOCK, resolve_preset, sigma_error
from drosim.world import LinearWorld, PairBatch, make_world

__all__ = [
    "FAMILIES",
    "PRESETS",
    "FiniteSupport",
    "coverage_boundary",
    "coverage_world",
    "divergence_quantiles",
    "divergences",
    "empirical",
    "finite_support",
    "plot",
    "run",
    "sample",
    "study_support",
    "summarise",
    "transport_cost",
    "wasserstein2",
]

FAMILIES = ("chi2", "kl", "wasserstein")
NAMES = {"none": "REBEL", "chi2": "chi2-REBEL", "kl": "KL-REBEL", "wasserstein": "W-REBEL"}
LABELS = {"chi2": "chi-square", "kl": "KL", "wasserstein": "Wasserstein (joint-cost W₂)",
          "none": "REBEL (rho = 0)"}
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"sizes": tuple(2**k for k in range(7, 13)), "gammas": (0.25, 0.5, 1.0, 1.5),
              "trials": 48, "calibration_trials": 200, "seed": 0},
    "full": {"sizes": tuple(2**k for k in range(7, 15)),
             "gammas": (0.125, 0.25, 0.5, 0.75, 1.0, 1.5), "trials": 400,
             "calibration_trials": 2000, "seed": 0},
}

PROMPTS, RESPONSES, DIM = 3, 3, 3
NOISE_VALUES = (-math.sqrt(3.0), 1 / math.sqrt(3.0))  # times NOISE_SCALE: mean 0, variance 1
NOISE_PROBS = (0.25, 0.75)
NOISE_SCALE = 0.5
WORLD_SEED = 0
REFERENCE_N = 1024  # where every schedule is calibrated to cover P in REFERENCE_LEVEL of trials
REFERENCE_LEVEL = 0.9
_ALPHA = (1.0,)  # one objective: theta* is its parameter


def coverage_world(device: str | torch.device = "cpu") -> LinearWorld:
    """The noiseless finite world (the two-point noise is added by :func:`sample`)."""
    return make_world(DIM, PROMPTS, RESPONSES, objectives=1, noise=0.0, seed=WORLD_SEED,
                      device=device)


@dataclass(frozen=True)
class FiniteSupport:
    """The finitely supported law P of z = (dphi, dr).

    Attributes:
        atoms: ``(S, d + 1)`` the distinct values of z.
        probs: ``(S,)`` P(z) of each atom.
        index: ``(P * K * K * L,)`` the atom of each (prompt, y, y', noise value), in that
            row-major order (L noise values).
    """

    atoms: Tensor
    probs: Tensor
    index: Tensor

    @property
    def size(self) -> int:
        return self.atoms.shape[0]


def _noise(world: LinearWorld) -> tuple[Tensor, Tensor]:
    """The noise values (scaled) and their probabilities, on the world's device."""
    like = world.features
    return (NOISE_SCALE * torch.tensor(NOISE_VALUES, dtype=like.dtype, device=like.device),
            torch.tensor(NOISE_PROBS, dtype=like.dtype, device=like.device))


def finite_support(world: LinearWorld, theta: Tensor, alpha: Tensor) -> FiniteSupport:
    """Enumerate P: every (prompt, y, y', noise value), merged where z coincides.

    Args:
        world: a finite world (its own noise is not used).
        theta: ``(d,)`` the sampling policy.
        alpha: ``(m,)`` the mixture that scores the pairs.

    Returns:
        The atoms, their probabilities (summing to 1) and the merge index.
    """
    prompts, k, _ = world.features.shape
    values, probs = _noise(world)
    x, y, y2, level = torch.meshgrid(*(torch.arange(s, device=values.device)
                                       for s in (prompts, k, k, values.numel())), indexing="ij")
    x, y, y2, level = x.flatten(), y.flatten(), y2.flatten(), level.flatten()
    pi = world.policy(theta)
    mass = pi[x, y] * pi[x, y2] * probs[level] / prompts
    dphi = world.features[x, y] - world.features[x, y2]
    dr = dphi @ world.reward_parameter(alpha) + values[level]
    # y = y' gives dphi = 0 exactly for every prompt: unique() merges those rows.
    atoms, index = torch.unique(torch.cat([dphi, dr.unsqueeze(-1)], -1), dim=0,
                                return_inverse=True)
    atom_probs = torch.zeros(atoms.shape[0], dtype=mass.dtype, device=mass.device)
    return FiniteSupport(atoms, atom_probs.index_add_(0, index, mass), index)


def study_support(device: str | torch.device = "cpu") -> FiniteSupport:
    """P of the study: :func:`coverage_world` sampled by the uniform policy (theta = 0)."""
    world = coverage_world(device)
    origin = world.features.new_zeros(DIM)
    return finite_support(world, origin, world.features.new_tensor(_ALPHA))


def sample(world: LinearWorld, support: FiniteSupport, theta: Tensor, n: int, alpha: Tensor,
           generator: torch.Generator | None = None) -> tuple[PairBatch, Tensor]:
    """n pairs per trial with the two-point noise added, and the atom of each pair.

    Args:
        world: the noiseless finite world.
        support: its :func:`finite_support` for the same policy and mixture.
        theta: ``(T, d)`` the sampling policy, repeated per trial.
        n: pairs per trial.
        alpha: ``(m,)`` the scoring mixture.
        generator: the randomness.

    Returns:
        The pairs (dr includes the noise) and ``(T, n)`` atom indices.
    """
    pairs = world.sample_pairs(theta, n, alpha, generator)
    values, probs = _noise(world)
    level = torch.multinomial(probs, pairs.dr.numel(), replacement=True,
                              generator=generator).reshape(pairs.dr.shape)
    k, levels = world.features.shape[1], values.numel()
    key = ((pairs.prompts * k + pairs.responses[..., 0]) * k + pairs.responses[..., 1]) * levels
    noisy = replace(pairs, dr=pairs.dr + values[level])
    return noisy, support.index[key + level]


def empirical(atoms: Tensor, size: int) -> Tensor:
    """P_n on the S atoms: ``(T, n)`` atom indices -> ``(T, S)`` frequencies."""
    counts = torch.zeros(atoms.shape[0], size, dtype=torch.float64, device=atoms.device)
    counts.scatter_add_(1, atoms, torch.ones_like(atoms, dtype=torch.float64))
    return counts / atoms.shape[1]


def divergences(probs: Tensor, freq: Tensor) -> dict[str, Tensor]:
    """chi-square and KL divergences D(P || P_n), batched over trials.

    Args:
        probs: ``(S,)`` P, positive on every atom.
        freq: ``(T, S)`` P_n.

    Returns:
        {"chi2": (T,), "kl": (T,)}, +inf where some atom is unobserved.

    Example:
        >>> import torch
        >>> p = torch.tensor([0.5, 0.5], dtype=torch.float64)
        >>> d = divergences(p, torch.tensor([[0.25, 0.75], [1.0, 0.0]], dtype=torch.float64))
        >>> [round(float(v), 4) for v in d["chi2"]], bool(torch.isinf(d["kl"][1]))
        ([0.1667, inf], True)
    """
    seen = freq > 0
    safe = torch.where(seen, freq, 1.0)
    chi2 = 0.5 * ((probs - freq).square() / safe).sum(-1)
    kl = (probs * (probs / safe).log()).sum(-1)
    complete = seen.all(-1)
    return {"chi2": torch.where(complete, chi2, math.inf),
            "kl": torch.where(complete, kl, math.inf)}


def transport_cost(a: np.ndarray, b: np.ndarray, cost: np.ndarray) -> float:
    """The optimal transport cost between two discrete distributions (an exact LP).

    min_pi sum_ij pi_ij cost_ij over pi >= 0 with row sums a and column sums b.

    Args:
        a: ``(S,)`` source masses.
        b: ``(R,)`` target masses (zeros allowed: those columns are dropped).
        cost: ``(S, R)`` transport costs.

    Returns:
        The optimal cost.

    Raises:
        RuntimeError: HiGHS does not report an optimum.

    Example:
        >>> import numpy as np
        >>> transport_cost(np.array([0.5, 0.5]), np.array([0.25, 0.75]),
        ...                np.array([[0.0, 1.0], [1.0, 0.0]]))
        0.25
    """
    used = b > 0
    c = cost[:, used]
    rows, cols = c.shape
    constraints = sp.vstack([sp.kron(sp.eye(rows), np.ones((1, cols))),
                             sp.kron(np.ones((1, rows)), sp.eye(cols))], format="csr")
    masses = np.concatenate([a / a.sum(), b[used] / b.sum()])
    result = linprog(c.ravel(), A_eq=constraints, b_eq=masses, bounds=(0, None),
                     method="highs")
    if result.status != 0:
        raise RuntimeError(f"transport LP failed: {result.message}")
    return float(result.fun)


def wasserstein2(support: FiniteSupport, freq: Tensor) -> np.ndarray:
    """W_2(P, P_n) with the joint cost ||z - z'||^2 on z = (dphi, dr), one LP per trial.

    Args:
        support: P's atoms and probabilities.
        freq: ``(T, S)`` P_n on the same atoms.

    Returns:
        ``(T,)`` distances.
    """
    atoms = support.atoms.cpu().numpy()
    cost = ((atoms[:, None, :] - atoms[None, :, :]) ** 2).sum(-1)
    probs = support.probs.cpu().numpy()
    costs = np.array([transport_cost(probs, row, cost) for row in freq.cpu().numpy()])
    return np.sqrt(np.maximum(costs, 0.0))  # HiGHS may return -1e-17 for a zero cost


def _all_divergences(support: FiniteSupport, atoms: Tensor) -> dict[str, np.ndarray]:
    """D(P || P_n) of every family for ``(T, n)`` sampled atoms."""
    freq = empirical(atoms, support.size)
    found = {name: value.cpu().numpy() for name, value in divergences(support.probs,
                                                                      freq).items()}
    return found | {"wasserstein": wasserstein2(support, freq)}


def coverage_boundary(family: str) -> float:
    """The gamma at which rho_n = c n^(-gamma) shrinks like D(P || P_n) itself."""
    return 0.25 if family == "wasserstein" else 1.0


def run(preset: str = "quick", *, device: str | torch.device = "cpu",
        memory_budget: int = DEFAULT_MEMORY_BUDGET, **settings: Any) -> pd.DataFrame:
    """Errors and exact coverage for every (family, gamma, n, trial).

    Args:
        preset: "quick" or "full" (see PRESETS).
        device: where the tensors live.
        memory_budget: bytes per chunk of trials (sampled and fitted together).
        **settings: override entries of the preset (sizes, gammas, trials,
            calibration_trials, seed).

    Returns:
        One row per (family, gamma, n, trial), with columns method, family, gamma, c, n,
        trial, rho, error, divergence, covered. Family "none" is plain REBEL (rho = 0, gamma and
        divergence NaN, never covered); for "wasserstein", divergence is the joint-cost
        W_2 and covered is an upper bound on W-REBEL's coverage.
    """
    config = resolve_preset(PRESETS, preset, settings)
    world = coverage_world(device)
    alpha = world.features.new_tensor(_ALPHA)
    theta_star = world.reward_parameter(alpha)
    sigma = world.pair_covariance(world.features.new_zeros(DIM))
    support = study_support(device)

    # Calibrate each family's constant on independent samples (purpose 1) at REFERENCE_N.
    calibration = slice(0, config["calibration_trials"])
    reference = _all_divergences(support, _sample_trials(world, support, REFERENCE_N,
                                                         calibration, (config["seed"], 1))[1])
    radius = {f: float(np.quantile(reference[f], REFERENCE_LEVEL)) for f in FAMILIES}
    methods = [Method(NAMES["none"])] + [
        Method(NAMES[f], "rebel", f, radius[f] * REFERENCE_N**g, g)
        for f in FAMILIES for g in config["gammas"]]

    blocks = []
    trials = config["trials"]
    for n in config["sizes"]:
        found: dict[str, list[np.ndarray]] = {f: [] for f in FAMILIES}
        errors: list[list[np.ndarray]] = [[] for _ in methods]
        per_chunk = trials_per_chunk(n, DIM, memory_budget=memory_budget)
        for chunk in chunk_slices(trials, per_chunk):
            pairs, atoms = _sample_trials(world, support, n, chunk, (config["seed"], 0))
            for family, values in _all_divergences(support, atoms).items():
                found[family].append(values)
            for method, sink in zip(methods, errors, strict=True):
                estimate = method.estimate(pairs)
                sink.append(sigma_error(estimate, theta_star, sigma).cpu().numpy())
        divergences_n = {f: np.concatenate(v) for f, v in found.items()}
        for method, sink in zip(methods, errors, strict=True):
            rho = method.radius(n)
            divergence = divergences_n.get(method.family, np.full(trials, np.nan))
            blocks.append(pd.DataFrame({
                "method": method.name, "family": method.family,
                "gamma": method.gamma if method.family != "none" else np.nan,
                "c": method.c, "n": n, "trial": np.arange(trials), "rho": rho,
                "error": np.concatenate(sink), "divergence": divergence,
                "covered": (divergence <= rho) & (method.family != "none")}))
    return pd.concat(blocks, ignore_index=True)


def _sample_trials(world: LinearWorld, support: FiniteSupport, n: int, trials: slice,
                   stream: tuple[int, ...]) -> tuple[PairBatch, Tensor]:
    """The pairs and atoms of trials ``trials.start .. trials.stop - 1`` of a stream.

    Draws the whole blocks of SAMPLE_BLOCK trials that cover the slice, block b with the
    generator of (*stream, n, b), and cuts the slice out: trial t's sample depends neither
    on the chunking (the memory budget) nor on the number of trials.

    Args:
        world: the noiseless finite world.
        support: its finite support.
        n: pairs per trial.
        trials: a slice with explicit start and stop.
        stream: (seed, purpose).

    Returns:
        The pairs and their ``(T, n)`` atom indices.
    """
    first, last = trials.start // SAMPLE_BLOCK, -(-trials.stop // SAMPLE_BLOCK)
    theta = world.features.new_zeros(SAMPLE_BLOCK, DIM)
    alpha = world.features.new_tensor(_ALPHA)
    device = world.features.device
    drawn = [sample(world, support, theta, n, alpha,
                    random_stream(*stream, n, block, device=device))
             for block in range(first, last)]
    keep = slice(trials.start - first * SAMPLE_BLOCK, trials.stop - first * SAMPLE_BLOCK)
    pairs = PairBatch(*(torch.cat([getattr(p, f.name) for p, _ in drawn])[keep]
                        for f in fields(PairBatch)))
    return pairs, torch.cat([a for _, a in drawn])[keep]


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (family, gamma): coverage at the smallest and largest n and the error's slope.

    Args:
        frame: the output of :func:`run`.

    Returns:
        One row per (method, gamma) with columns method, family, gamma, boundary (the
        family's :func:`coverage_boundary`), n_min, n_max, coverage_n_min, coverage_n_max, slope,
        low, high (the log-log slope of the median error against n and its 90% bootstrap
        interval).
    """
    rows = []
    for (method, family, gamma), group in frame.groupby(["method", "family", "gamma"],
                                                        dropna=False, sort=False):
        slope = loglog_slope(group, "n", "error")
        sizes = group["n"]
        rows.append({
            "method": method, "family": family, "gamma": gamma,
            "boundary": coverage_boundary(family) if family != "none" else np.nan,
            "n_min": sizes.min(), "n_max": sizes.max(),
            "coverage_n_min": group.loc[sizes == sizes.min(), "covered"].mean(),
            "coverage_n_max": group.loc[sizes == sizes.max(), "covered"].mean(),
            "slope": slope.slope, "low": slope.low, "high": slope.high})
    return pd.DataFrame(rows)


def divergence_quantiles(frame: pd.DataFrame, level: float) -> pd.DataFrame:
    """The level-quantile of D(P || P_n) per (family, n); +inf while it is infinite.

    Args:
        frame: the output of :func:`run`.
        level: e.g. 0.9.

    Returns:
        Columns family, n, quantile.
    """
    # One gamma per family: the divergence does not depend on the radius.
    first = frame[frame["gamma"] == frame["gamma"].min()]
    # "higher": no interpolation, so an infinite divergence gives an infinite quantile.
    grouped = first.groupby(["family", "n"])["divergence"]
    return grouped.quantile(level, interpolation="higher").rename("quantile").reset_index()


def plot(frame: pd.DataFrame, out_dir: Path | str, *,
         summary: pd.DataFrame | None = None) -> list[Path]:
    """figures/coverage.{png,pdf}: one row per family, three panels each.

    Left: how often P lies in the ball against n, per gamma. Middle: the median squared
    error against n (log-log, 10-90% band) with the fitted slope and its 90% interval in
    the legend; plain REBEL dashed. Right: the schedules rho_n against n next to the 50%
    and 90% quantiles of D(P || P_n) (an infinite quantile, some atom unseen, is not drawn):
    a schedule covers P in 90% of trials where it runs above the 90% quantile.

    Args:
        frame: the output of :func:`run`.
        out_dir: the folder to write to (created if missing).
        summary: :func:`summarise` of the frame, if already computed (its bootstrap is
            the slow part).

    Returns:
        The paths written.
    """
    families = [f for f in FAMILIES if f in set(frame["family"])]
    gammas = sorted(frame["gamma"].dropna().unique())
    colours = {g: f"C{i}" for i, g in enumerate(gammas)}
    fits = (summarise(frame) if summary is None else summary).set_index(["family", "gamma"])
    quantiles = {level: divergence_quantiles(frame, level) for level in (0.5, 0.9)}
    fig = Figure(figsize=(16, 4.2 * len(families)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(families), 3))
    baseline = quantile_band(frame[frame["family"] == "none"], ["n"], "error")
    for row, family in zip(axes, families, strict=True):
        rows = frame[frame["family"] == family]
        for gamma, group in rows.groupby("gamma"):
            cover = group.groupby("n")["covered"].mean()
            row[0].plot(cover.index, cover.values, "o-", color=colours[gamma],
                        label=f"γ = {gamma:g}")
            band = quantile_band(group, ["n"], "error")
            fit = fits.loc[(family, gamma)]
            row[1].plot(band["n"], band["median"], "o-", color=colours[gamma],
                        label=slope_label(f"γ = {gamma:g}", fit["slope"], fit["low"],
                                          fit["high"]))
            row[1].fill_between(band["n"], band["low"], band["high"], color=colours[gamma],
                                alpha=0.08)
            radii = group.groupby("n")["rho"].first()
            row[2].plot(radii.index, radii.values, "-", color=colours[gamma],
                        label=f"ρ_n, γ = {gamma:g}")
        row[1].plot(baseline["n"], baseline["median"], "k--", label=LABELS["none"])
        for (level, table), style in zip(quantiles.items(), (":", "--"), strict=True):
            q = table[(table["family"] == family) & np.isfinite(table["quantile"])]
            row[2].plot(q["n"], q["quantile"], "k" + style, lw=2,
                        label=f"{level:.0%} quantile of D(P || P_n)")
        row[0].set_ylim(-0.03, 1.03)
        row[0].set_ylabel("fraction of trials with P inside the ball")
        row[0].set_title(f"{LABELS[family]}: coverage"
                         + (" (upper bound)" if family == "wasserstein" else ""))
        row[1].set_title(f"{LABELS[family]}: squared error, slope [90% CI]")
        row[2].set_title(f"{LABELS[family]}: radii against D(P || P_n)")
        row[1].set_ylabel("median ‖θ̂ − θ*‖²_Σ")
        row[2].set_ylabel("radius, divergence")
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("n")
            ax.grid(True, alpha=0.3)
        for ax in row[1:]:
            ax.set_yscale("log")
        for ax in row:
            ax.legend(fontsize=7)
    fig.suptitle(f"C5, radius-coverage trade-off: rho_n = c n^-γ, c calibrated so that P is "
                 f"inside the ball in {REFERENCE_LEVEL:.0%} of trials at n = {REFERENCE_N}.\n"
                 "Wasserstein row: W_2 with the joint cost on z = (dphi, dr) is a lower bound on "
                 "W-REBEL's inputs-only W_2, so its coverage is an UPPER bound on W-REBEL's.")
    return save_figure(fig, out_dir, "coverage")
