"""Claim C5: the radius-coverage trade-off, with coverage and robust targets computed exactly.

The paper says radii that shrink faster than the empirical divergence concentrates give the
parametric rate but lose coverage (the data distribution P falls outside the ball around
P_n), while radii that guarantee coverage give n^(-1/2) on the squared error. This study
measures both sides on the same samples, for radius schedules rho_n = c n^(-gamma) and for
the REBEL and DPO losses with chi-square, KL and (REBEL) Wasserstein balls.

Worlds (3 prompts, 3 responses, d = 3, one objective, uniform sampling policy, two-point
noise of scale 0.5; :mod:`drosim.studies.atoms`):

* "well-specified": linear reward, noise independent of the pair. There the squared
  residual at theta* is the noise alone, so a chi-square or KL reweighting by the loss keeps
  E_Q[noise * dphi] = 0: theta* minimises the robust REBEL objective at every radius and a
  ball costs REBEL nothing (the trade-off is not testable for chi2-/KL-REBEL). DPO's logistic
  loss at theta* does depend on (dphi, label), so its balls act even here;
* "skewed": the noise's sign follows sign<u, dphi> (world.py's ``noise_kind="skewed"``), so the
  large losses sit on one side of each dphi and reweighting them moves the target;
* "misspecified": a quadratic reward term the features cannot express (weight 2): the
  residuals at the least-squares target depend on dphi.

Targets: theta* is each loss's rho = 0 population minimiser (the reward parameter in the
first two worlds, its least-squares / logistic projection in the misspecified one), and
theta^rho the population robust minimiser at radius rho, both exact (the weighted fit of
:func:`drosim.studies.atoms.robust_fit` fed P). Errors are ||theta_hat - theta||_Sigma^2,
Sigma = E[dphi dphi^T] under the sampling policy. The bias level is ||theta^rho - theta*||^2.

Sampling: a sample of n pairs is its vector of outcome counts, Multinomial(n, P) (the
robust fits depend on the sample only through the atom frequencies P_n; see atoms.py), so n
costs nothing and reaches 2^16.

Coverage, exact: P lies in {Q : D(Q || P_n) <= rho_n} iff D(P || P_n) <= rho_n, with D the
chi-square or KL divergence on the atoms the estimator sees ((dphi, dr) for REBEL, (dphi,
label) for DPO; +inf while an atom is unobserved). n D(P || P_n) -> chi^2_{S-1} / 2, so the
coverage radius shrinks like S / n (S atoms): swept in :func:`support_sweep`. For the
Wasserstein family the joint-cost W_2(P, P_n) on z = (dphi, dr) (an exact LP) is a LOWER
bound on the inputs-only distance of W-REBEL's ball, so its "covered" is an UPPER bound;
W_2(P, P_n) ~ n^(-1/4).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from matplotlib.figure import Figure
from scipy.optimize import linprog
from scipy.stats import chi2 as chi2_law
from torch import Tensor

from drosim.chunks import DEFAULT_MEMORY_BUDGET
from drosim.plotting import FAMILY_COLOURS, save_figure
from drosim.stats import Slope, loglog_slope, per_x_statistics, quantile_band
from drosim.studies.atoms import FiniteSupport, Outcomes, outcomes, robust_fit
from drosim.studies.montecarlo import resolve_preset, sigma_error
from drosim.world import LinearWorld, make_world

__all__ = [
    "LOSS_FAMILIES",
    "PRESETS",
    "WORLDS",
    "coverage_world",
    "divergences",
    "plot",
    "regimes",
    "run",
    "statistics",
    "summarise",
    "support_sweep",
    "targets",
    "transport_cost",
    "wasserstein2",
    "world_outcomes",
]

WORLDS: dict[str, dict[str, Any]] = {
    "well-specified": {},
    "skewed": {"noise_kind": "skewed"},
    "misspecified": {"misspecification": 2.0},
}
LOSS_FAMILIES = {"rebel": ("chi2", "kl", "wasserstein"), "dpo": ("chi2", "kl")}
LOSS_NAMES = {"rebel": "REBEL", "dpo": "DPO"}
FAMILY_NAMES = {"none": "", "chi2": "chi2-", "kl": "KL-", "wasserstein": "W-"}
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"sizes": tuple(2**k for k in range(7, 17, 2)), "gammas": (0, 0.25, 0.5, 0.75, 1),
              "cs": (0.1, 1.0), "trials": 40, "worlds": tuple(WORLDS),
              "supports": ((3, 3), (6, 5), (12, 8)), "support_trials": 100, "seed": 0},
    "full": {"sizes": tuple(2**k for k in range(7, 17)), "gammas": (0, 0.25, 0.5, 0.75, 1),
             "cs": (0.1, 1.0), "trials": 200, "worlds": tuple(WORLDS),
             "supports": ((3, 3), (6, 5), (12, 8), (24, 15)), "support_trials": 400,
             "seed": 0},
}
PROMPTS, RESPONSES, DIM = 3, 3, 3
NOISE_SCALE = 0.5
WORLD_SEED = 0
SWEEP_SIZES = (2**20, 2**22)  # n of the support sweep: every atom seen, even with 10^4 atoms
IDLE_BIAS = 1e-10  # ||theta^rho - theta*||_Sigma^2 below this: the ball does not act
COVERED = 0.5  # the coverage level whose crossing separates two regimes
_ALPHA = (1.0,)
# Bytes per fit and atom in a batch: 12 step lengths, a few float64 temporaries each.
_LINE_SEARCH_BYTES = 12 * 8 * 8


def coverage_world(name: str, prompts: int = PROMPTS, responses: int = RESPONSES
                   ) -> LinearWorld:
    """The finite world ``name`` (a key of :data:`WORLDS`); only the skewed one carries its
    own noise (its sign depends on dphi), the others get the independent two-point noise
    from :func:`drosim.studies.atoms.outcomes`."""
    options = WORLDS[name]
    return make_world(DIM, prompts, responses, objectives=1,
                      noise=NOISE_SCALE if options.get("noise_kind") else 0.0,
                      seed=WORLD_SEED, **options)


def world_outcomes(name: str, prompts: int = PROMPTS, responses: int = RESPONSES
                   ) -> tuple[LinearWorld, Outcomes]:
    """The world and its enumerated outcomes under the uniform policy."""
    world = coverage_world(name, prompts, responses)
    return world, outcomes(world, NOISE_SCALE, world.features.new_tensor(_ALPHA))


def targets(support: FiniteSupport, loss: str, family: str, rhos: Tensor) -> Tensor:
    """theta^rho, the population robust minimisers at the radii ``rhos (R,)``: ``(R, d)``;
    family "none" gives theta* (rho ignored)."""
    probs = support.probs.expand(rhos.shape[0], -1)
    return robust_fit(support.atoms, probs, rhos, loss, family)


def _counts(probs: np.ndarray, n: int, trials: int, keys: tuple[int, ...]) -> np.ndarray:
    """``(trials, J)`` Multinomial(n, probs) counts from the stream of ``keys``."""
    rng = np.random.default_rng(np.random.SeedSequence(list(keys)))
    return rng.multinomial(n, probs / probs.sum(), size=trials).astype(np.float64)


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


def _schedule(gamma: float, c: float) -> str:
    """A schedule's label, e.g. "1 n^-0.5"; "rho = 0" for the plain estimator."""
    return "rho = 0" if c == 0 else f"{c:g} n^-{gamma:g}"


def run(preset: str = "quick", *, device: str | torch.device = "cpu",
        memory_budget: int = DEFAULT_MEMORY_BUDGET, **settings: Any) -> pd.DataFrame:
    """Errors, targets and exact coverage for every (world, loss, family, schedule, n, trial).

    Args:
        preset: "quick" or "full" (see PRESETS).
        device: where the robust fits run (the sampling and the LPs stay on the CPU).
        memory_budget: bytes per batch of fits (the line search holds 12 x S losses each).
        **settings: override entries of the preset (sizes, gammas, cs, trials, worlds,
            supports, support_trials, seed).

    Returns:
        One row per (world, loss, family, gamma, c, n, trial) with columns world, loss,
        family, method, schedule, gamma, c, n, trial, rho, error (to theta*), error_target
        (to theta^rho), bias (||theta^rho - theta*||_Sigma^2), divergence, covered. The plain
        estimator is family "none" (rho = 0, gamma and c 0, divergence NaN, never covered).
    """
    config = resolve_preset(PRESETS, preset, settings)
    blocks = []
    for index, name in enumerate(config["worlds"]):
        world, laws = world_outcomes(name)
        sigma = world.pair_covariance(world.features.new_zeros(DIM))
        samples = {n: torch.from_numpy(_counts(laws.probs.numpy(), n, config["trials"],
                                               (config["seed"], index, n)))
                   for n in config["sizes"]}
        for loss, families in LOSS_FAMILIES.items():
            support = laws.support(loss)
            freq = {n: support.weights(counts) / n for n, counts in samples.items()}
            found = {n: divergences(support.probs, f) for n, f in freq.items()}
            if "wasserstein" in families:
                for n, f in freq.items():
                    found[n]["wasserstein"] = torch.from_numpy(wasserstein2(support, f))
            for family in ("none", *families):
                fit = _Fit(support, loss, family, torch.device(device), memory_budget)
                blocks.append(_fit_family(name, fit, freq, found, sigma, config))
    return pd.concat(blocks, ignore_index=True)


@dataclass(frozen=True)
class _Fit:
    """Where and how one (loss, family)'s fits run."""

    support: FiniteSupport
    loss: str
    family: str
    device: torch.device
    memory_budget: int

    def __call__(self, probs: Tensor, rho: Tensor) -> Tensor:
        """robust_fit in batches that fit the memory budget, results on the CPU.

        On the CPU the fits run on one thread: their tensors, (B, 12, S) with S of tens of
        atoms, are too small for intra-op threads to pay (measured: 8x slower on two cores).
        """
        atoms = self.support.atoms.to(self.device)
        rows = max(1, self.memory_budget // (_LINE_SEARCH_BYTES * self.support.size))
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            return torch.cat([robust_fit(atoms, probs[i:i + rows].to(self.device),
                                         rho[i:i + rows].to(self.device), self.loss,
                                         self.family).cpu()
                              for i in range(0, probs.shape[0], rows)])
        finally:
            torch.set_num_threads(threads)


def _fit_family(world: str, fit: _Fit, freq: dict[int, Tensor],
                found: dict[int, dict[str, Tensor]], sigma: Tensor, config: dict[str, Any]
                ) -> pd.DataFrame:
    """Every schedule and n of one (world, loss, family), fitted together."""
    support, loss, family = fit.support, fit.loss, fit.family
    schedules = ([(0.0, 0.0)] if family == "none"
                 else list(itertools.product(config["gammas"], config["cs"])))
    trials, sizes = config["trials"], config["sizes"]
    grid = [(n, g, c) for n in sizes for g, c in schedules]
    rhos = torch.tensor([c * n ** (-g) for n, g, c in grid], dtype=torch.float64)
    probs = torch.cat([freq[n].repeat(len(schedules), 1) for n in sizes])
    rho = rhos.repeat_interleave(trials)
    estimates = fit(probs, rho)
    theta_star = targets(support, loss, "none", rhos[:1])[0]
    theta_rho = (theta_star.expand(len(grid), -1) if family == "none"
                 else targets(support, loss, family, rhos))
    bias = sigma_error(theta_rho, theta_star, sigma)
    nan = torch.full((trials,), math.nan, dtype=torch.float64)
    divergence = torch.cat([found[n].get(family, nan) for n, _, _ in grid])
    return pd.DataFrame({
        "world": world, "loss": loss, "family": family,
        "method": f"{FAMILY_NAMES[family]}{LOSS_NAMES[loss]}",
        "schedule": np.repeat([_schedule(g, c) for _, g, c in grid], trials),
        "gamma": np.repeat([g for _, g, _ in grid], trials),
        "c": np.repeat([c for _, _, c in grid], trials),
        "n": np.repeat([n for n, _, _ in grid], trials),
        "trial": np.tile(np.arange(trials), len(grid)),
        "rho": rho.numpy(),
        "error": sigma_error(estimates, theta_star, sigma).numpy(),
        "error_target": sigma_error(estimates, theta_rho.repeat_interleave(trials, 0),
                                    sigma).numpy(),
        "bias": bias.repeat_interleave(trials).numpy(),
        "divergence": divergence.numpy(),
        "covered": (divergence <= rho).numpy() & (family != "none")})


def support_sweep(preset: str = "quick", **settings: Any) -> pd.DataFrame:
    """The 90% quantile of D(P || P_n) as the support grows (well-specified world, REBEL's
    atoms), at the fixed n of :data:`SWEEP_SIZES`.

    n D(P || P_n) -> chi^2_{S-1} / 2, so n q_90 / S -> 1/2 + O(S^(-1/2)): the coverage radius
    of the f-divergence balls is S / n, not 1 / n.

    Returns:
        Columns prompts, responses, atoms, n, family, quantile, scaled (n * quantile / S),
        limit (the chi^2_{S-1} / 2 quantile divided by S), trials.
    """
    config = resolve_preset(PRESETS, preset, settings)
    rows = []
    for prompts, responses in config["supports"]:
        _, laws = world_outcomes("well-specified", prompts, responses)
        support = laws.rebel
        for n in SWEEP_SIZES:
            counts = _counts(support.probs.numpy(), n, config["support_trials"],
                             (config["seed"], prompts, responses, n))
            found = divergences(support.probs, torch.from_numpy(counts) / n)
            for family, values in found.items():
                q = float(np.quantile(values.numpy(), 0.9, method="higher"))
                rows.append({"prompts": prompts, "responses": responses,
                             "atoms": support.size, "n": n, "family": family, "quantile": q,
                             "scaled": n * q / support.size,
                             "limit": chi2_law.ppf(0.9, support.size - 1) / 2 / support.size,
                             "trials": config["support_trials"]})
    return pd.DataFrame(rows)


def regimes(group: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Split one schedule's rows where its coverage crosses :data:`COVERED`.

    The first n whose coverage is on the other side of COVERED from the smallest n's starts
    the second regime; each regime needs two sizes for a slope, else the whole range is
    one regime.

    Returns:
        [(label, rows)], label "n = a..b" with the sizes the rows cover.
    """
    coverage = group.groupby("n")["covered"].mean().sort_index()
    side = coverage >= COVERED
    changed = side.to_numpy() != side.to_numpy()[0]
    sizes = coverage.index.to_numpy()
    parts = [group]
    if changed.any():
        cut = sizes[np.argmax(changed)]
        before, after = group[group["n"] < cut], group[group["n"] >= cut]
        if before["n"].nunique() >= 2 and after["n"].nunique() >= 2:
            parts = [before, after]
    return [(f"n = {p['n'].min()}..{p['n'].max()}", p) for p in parts]


def summarise(frame: pd.DataFrame, boots: int = 200) -> pd.DataFrame:
    """Slopes per regime of every (world, loss, family, schedule).

    Returns:
        One row per (world, loss, family, method, schedule, regime) with gamma, c, n_min,
        n_max, coverage_n_min and coverage_n_max (of the regime), bias (at the regime's largest
        n), slope, low, high (log-log slope of the median error to theta* and its 90%
        bootstrap interval) and target_slope, target_low, target_high (error to theta^rho),
        last (True for the regime that holds the largest n).
    """
    rows = []
    keys = ["world", "loss", "family", "method", "schedule"]
    for key, group in frame.groupby(keys, sort=False):
        parts = regimes(group)
        for position, (label, part) in enumerate(parts):
            sizes = part["n"]
            fit = loglog_slope(part, "n", "error", boots=boots)
            target = _target_slope(part, boots)
            rows.append({
                **dict(zip(keys, key, strict=True)), "regime": label,
                "gamma": part["gamma"].iloc[0], "c": part["c"].iloc[0],
                "n_min": sizes.min(), "n_max": sizes.max(),
                "coverage_n_min": part.loc[sizes == sizes.min(), "covered"].mean(),
                "coverage_n_max": part.loc[sizes == sizes.max(), "covered"].mean(),
                "bias": part.loc[sizes == sizes.max(), "bias"].iloc[0],
                "slope": fit.slope, "low": fit.low, "high": fit.high,
                "target_slope": target.slope, "target_low": target.low,
                "target_high": target.high, "last": position == len(parts) - 1})
    return pd.DataFrame(rows)


def _target_slope(part: pd.DataFrame, boots: int) -> Slope:
    """The log-log slope of the error to theta^rho, NaN where some fit equals its target
    exactly (a ball so large that the fit is w = 0 in the sample and the population: the
    exact fits put it there, and there is no rate to measure)."""
    if bool((part["error_target"] <= 0).any()):
        return Slope(math.nan, math.nan, math.nan)
    return loglog_slope(part, "n", "error_target", boots=boots)


def statistics(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-n statistics of the error to theta* and to theta^rho and of the coverage
    indicator (its mean is the coverage), long format, with a ``target`` column."""
    by = ("method", "world", "loss", "family", "schedule", "gamma", "c")
    parts = [per_x_statistics(frame.assign(covered=frame["covered"].astype(float)), "n", y,
                              study="coverage", by=by).assign(target=target)
             for y, target in (("error", "theta*"), ("error_target", "theta^rho"),
                               ("covered", "coverage"))]
    return pd.concat(parts, ignore_index=True)


_PANELS = (("rebel", "chi2"), ("rebel", "kl"), ("rebel", "wasserstein"), ("dpo", "chi2"),
           ("dpo", "kl"))


def plot(frame: pd.DataFrame, out_dir: Path | str, sweep: pd.DataFrame | None = None
         ) -> list[Path]:
    """The C5 figures (PNG and PDF), c = 1 schedules (c = 0.1 is in the tables).

    * ``coverage``: the fraction of trials whose ball holds P against n, one panel per
      world (chi2-REBEL solid, chi2-DPO dashed, one colour per gamma), and, with ``sweep``,
      a last panel n q_90 / S against S next to its chi^2_{S-1} / (2 S) limit;
    * ``coverage_<world>``, one per world: the median ||theta_hat - theta*||_Sigma^2 against
      n for each (loss, family), REBEL on the top row and DPO below, one colour per gamma
      with its 10-90% band and, dotted, the bias level ||theta^rho - theta*||_Sigma^2 the
      schedule keeps; the plain estimator in black. The legend has a cell of its own.

    Args:
        frame: the output of :func:`run`.
        out_dir: the folder for the figures (created if missing).
        sweep: the output of :func:`support_sweep`, or None to leave its panel out.

    Returns:
        The paths written.
    """
    shown = frame[frame["c"] != 0.1]
    gammas = sorted(shown.loc[shown["family"] != "none", "gamma"].unique())
    colours = {g: f"C{i}" for i, g in enumerate(gammas)}
    paths = save_figure(_coverage_figure(shown, colours, sweep), out_dir, "coverage")
    for world, rows in shown.groupby("world", sort=False):
        paths += save_figure(_error_figure(world, rows, colours), out_dir, f"coverage_{world}")
    return paths


def _coverage_figure(frame: pd.DataFrame, colours: dict[float, str],
                     sweep: pd.DataFrame | None) -> Figure:
    """Coverage of P against n, one panel per world, and the support sweep's panel."""
    worlds = list(dict.fromkeys(frame["world"]))
    panels = len(worlds) + (sweep is not None)
    fig = Figure(figsize=(4.8 * panels, 5.4), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, world in zip(axes, worlds, strict=False):
        rows = frame[(frame["world"] == world) & (frame["family"] == "chi2")]
        for loss, style in (("rebel", "-"), ("dpo", "--")):
            for gamma, group in rows[rows["loss"] == loss].groupby("gamma"):
                cover = group.groupby("n")["covered"].mean()
                ax.plot(cover.index, cover.values, "o" + style, color=colours[gamma], ms=3,
                        label=f"chi2-{LOSS_NAMES[loss]}, ρ = n^-{gamma:g}")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n (pairs)")
        ax.set_ylabel("fraction of trials with P in the ball")
        ax.set_title(f"{world} world")
        ax.grid(True, alpha=0.3)
    # The world panels share their entries: one legend, below the panels.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center",
               ncol=min(2 * len(colours), 5), fontsize=8, frameon=False)
    if sweep is not None:
        _plot_sweep(axes[-1], sweep)
    fig.suptitle("C5: coverage of the data distribution P by the ball around P_n, "
                 "ρ_n = n^-γ (chi-square; KL and W in the tables)")
    return fig


def _error_figure(world: str, rows: pd.DataFrame, colours: dict[float, str]) -> Figure:
    """One world's errors: one panel per (loss, family), the legend in a cell of its own."""
    fig = Figure(figsize=(15, 9), layout="constrained")
    grid = fig.subplots(2, 3)
    panels = dict(zip(_PANELS, [*grid[0], *grid[1]], strict=False))
    handles: dict[str, object] = {}  # label -> line: one legend for the whole figure
    for (loss, family), ax in panels.items():
        cells = rows[(rows["loss"] == loss) & (rows["family"] == family)]
        for gamma, group in cells.groupby("gamma"):
            band = quantile_band(group, ["n"], "error")
            (line,) = ax.plot(band["n"], band["median"], "o-", ms=3, color=colours[gamma])
            handles.setdefault(f"ρ = n^-{gamma:g}: median error", line)
            ax.fill_between(band["n"], band["low"], band["high"], color=colours[gamma],
                            alpha=0.1, lw=0)
            bias = group.groupby("n")["bias"].first()
            if bias.max() > IDLE_BIAS:  # else theta^rho = theta*: nothing to draw
                (line,) = ax.plot(bias.index, bias.values, ":", color=colours[gamma], lw=1.8)
                handles.setdefault(f"ρ = n^-{gamma:g}: bias ‖θ^ρ − θ*‖²_Σ it keeps", line)
        if cells["bias"].max() <= IDLE_BIAS:
            ax.text(0.03, 0.03, "θ^ρ = θ* at every radius: the ball cannot act", fontsize=8,
                    transform=ax.transAxes)
        plain = quantile_band(rows[(rows["loss"] == loss) & (rows["family"] == "none")],
                              ["n"], "error")
        (line,) = ax.plot(plain["n"], plain["median"], "k--")
        handles.setdefault("plain estimator (ρ = 0): median error", line)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (pairs)")
        ax.set_ylabel("‖θ̂ − θ*‖²_Σ")
        ax.set_title(f"{FAMILY_NAMES[family]}{LOSS_NAMES[loss]}")
        ax.grid(True, alpha=0.3)
    legend_cell = grid[1, 2]  # _PANELS fills five of the six cells
    legend_cell.set_axis_off()
    legend_cell.legend(list(handles.values()), list(handles), loc="center", fontsize=9,
                       frameon=False, title="shaded: 10-90% of trials")
    fig.suptitle(f"C5, {world} world: squared error to θ* against n, ρ_n = n^-γ (c = 1); "
                 "W coverage (joint-cost W₂) bounds W-REBEL's from above")
    return fig


def _plot_sweep(ax: object, sweep: pd.DataFrame) -> None:
    """The support sweep's panel: n q_90 / S against S, next to its chi-square limit."""
    for (family, n), group in sweep.groupby(["family", "n"]):
        ax.plot(group["atoms"], group["scaled"], "o-", color=FAMILY_COLOURS[family],
                alpha=1.0 if n == max(SWEEP_SIZES) else 0.5,
                label=f"{family}, n = 2^{int(math.log2(n))}")
    limit = sweep.drop_duplicates("atoms")
    ax.plot(limit["atoms"], limit["limit"], "k:", label="χ²_{S-1} 90% quantile / (2S)")
    ax.set_xscale("log")
    ax.set_xlabel("atoms S")
    ax.set_ylabel("n × 90% quantile of D(P ‖ P_n) / S")
    ax.set_title("support sweep: the f-divergence\ncoverage radius is S / n")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(True, alpha=0.3)
