"""The update count: online (DRO-)REBEL against the exact mirror-descent step.

REBEL's round t regresses relative rewards on dphi; with exact, noiseless, well-specified
rewards the regression returns theta_alpha itself (given enough pairs to span R^d), so the
iterates are exactly mirror descent, theta_t = theta_0 + t eta theta_alpha, i.e.
pi_{t+1} proportional to pi_t exp(eta r_alpha) (:func:`drosim.online.mirror_descent`).
Robust regressions share that fixed point when the data are noiseless: every loss vanishes
at theta_alpha, so it minimises any worst case over reweightings (chi-square, KL), and the
Wasserstein objective (sqrt(E l) + rho ||w||)^2 too as long as
rho^2 u^T Sigma_n^-1 u <= 1, u = theta_alpha / ||theta_alpha||, Sigma_n the sampled pairs'
second moment (the subgradient condition at theta_alpha; beyond it W-REBEL shrinks w, and
as the policy concentrates Sigma_n shrinks, so W-REBEL can leave mirror descent later on).
All of this needs the n pairs of a round to span R^d: the concentrating policy draws y = y'
(dphi = 0) more and more often, and a rank-deficient round leaves w free in the null space.

This study runs online REBEL and chi-square/KL/W-REBEL (two radii each) in the world of the
preference-shift study, training on alpha_0, without and with noise on the observed rewards,
and records per iteration the exact expected reward under alpha_0 next to mirror descent's,
and the largest coordinate gap |theta_t - theta_t^MD|.

Rows: one per (method, rho, noise, trial, iteration).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from drosim.chunks import DEFAULT_MEMORY_BUDGET, chunk_slices, trials_per_chunk
from drosim.methods import Method
from drosim.online import mirror_descent, online_rebel
from drosim.plotting import FAMILY_COLOURS, save_figure
from drosim.stats import quantile_band
from drosim.studies._common import random_stream
from drosim.studies.montecarlo import ALPHA_0, resolve_preset
from drosim.studies.shift import DIM, ETA, preference_world
from drosim.studies.shift import PAIRS as SHIFT_PAIRS

__all__ = ["PRESETS", "methods", "plot", "run", "wasserstein_condition"]

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"rounds": 10, "noises": (0.0, 0.5), "trials": 16, "seed": 0},
    "full": {"rounds": 16, "noises": (0.0, 0.1, 0.5, 1.0), "trials": 200, "seed": 0},
}
RADII = (0.1, 0.5)
# Twice the preference-shift study's pairs: the iterates concentrate the policy, so more
# pairs have y = y' (dphi = 0), and a round whose pairs do not span R^d leaves w undetermined.
PAIRS = 2 * SHIFT_PAIRS


def methods() -> list[Method]:
    """REBEL and chi-square/KL/W-REBEL at each of RADII (fixed radii: gamma = 0)."""
    names = {"chi2": "chi2-REBEL", "kl": "KL-REBEL", "wasserstein": "W-REBEL"}
    return [Method("REBEL")] + [Method(name, "rebel", family, rho)
                                for family, name in names.items() for rho in RADII]


def wasserstein_condition(rho: float, rounds: int) -> np.ndarray:
    """rho^2 u^T Sigma_t^-1 u along the mirror-descent path, t = 0 .. rounds.

    Sigma_t is the population second moment of dphi under the policy of mirror descent's
    iterate t, u = theta_alpha / ||theta_alpha||. Noiseless W-REBEL returns theta_alpha
    exactly when the same quantity with the sampled Sigma_n is at most 1, so where this one
    exceeds 1 W-REBEL leaves mirror descent (up to the sampling of Sigma_n).

    Args:
        rho: the Wasserstein radius.
        rounds: the number of mirror-descent steps.

    Returns:
        ``(rounds + 1,)`` values.
    """
    world = preference_world(0.0)
    target = world.reward_parameter(world.features.new_tensor(ALPHA_0))
    path = mirror_descent(world.features.new_zeros(DIM), target, ETA, rounds)
    unit = target / target.norm()
    sigma = world.pair_covariance(path)  # (rounds + 1, d, d)
    solved = torch.linalg.solve(sigma, unit.expand(rounds + 1, DIM).unsqueeze(-1))
    return (rho**2 * (unit @ solved.squeeze(-1).T)).cpu().numpy()


def run(preset: str = "quick", *, device: str | torch.device = "cpu",
        memory_budget: int = DEFAULT_MEMORY_BUDGET, **settings: Any) -> pd.DataFrame:
    """Online (DRO-)REBEL and mirror descent, iteration by iteration.

    Args:
        preset: "quick" or "full" (see PRESETS).
        device: where the tensors live.
        memory_budget: bytes per chunk of trials; trials beyond one chunk draw from their
            own random streams, so the numbers depend on the budget only when it splits them.
        **settings: override entries of the preset (rounds, noises, trials, seed).

    Returns:
        One row per (method, rho, noise, trial, iteration): columns method, family, rho,
        noise, trial, iteration, reward and md_reward (exact expected rewards under alpha_0
        of the online iterate and of mirror descent) and gap (max_j |theta_t - theta_t^MD|_j).
    """
    config = resolve_preset(PRESETS, preset, settings)
    trials, rounds = config["trials"], config["rounds"]
    chunks = chunk_slices(trials, trials_per_chunk(PAIRS, DIM, memory_budget=memory_budget))
    blocks = []
    for noise in config["noises"]:
        world = preference_world(noise, device)
        alpha0 = torch.tensor(ALPHA_0, dtype=world.features.dtype, device=device)
        theta0 = torch.zeros(DIM, dtype=world.features.dtype, device=device)
        exact = mirror_descent(theta0, world.reward_parameter(alpha0), ETA, rounds)  # (R+1, d)
        md_reward = world.expected_reward(exact, alpha0).cpu().numpy()
        for method in methods():
            thetas = []
            for chunk in chunks:
                # One stream per chunk, shared by every method and noise level.
                result = online_rebel(
                    world, theta0.expand(chunk.stop - chunk.start, DIM), alpha0, n=PAIRS,
                    rounds=rounds, eta=ETA, spec=method.spec(PAIRS),
                    generator=random_stream(config["seed"], chunk.start, device=device))
                thetas.append(result.thetas)
            path = torch.cat(thetas, 1)  # (R+1, T, d)
            reward = world.expected_reward(path, alpha0).cpu().numpy()  # (R+1, T)
            gap = (path - exact.unsqueeze(1)).abs().amax(-1).cpu().numpy()
            blocks.append(pd.DataFrame({
                "method": method.name, "family": method.family, "rho": method.radius(PAIRS),
                "noise": noise, "trial": np.tile(np.arange(trials), rounds + 1),
                "iteration": np.repeat(np.arange(rounds + 1), trials),
                "reward": reward.ravel(), "md_reward": np.repeat(md_reward, trials),
                "gap": gap.ravel()}))
    return pd.concat(blocks, ignore_index=True)


def plot(frame: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """figures/updates.{png,pdf}: rewards against iterations, and the gap to mirror descent.

    Left: the noiseless runs (median over trials) on mirror descent's exact curve. Middle:
    the noisiest runs (median, 10-90% band) against the same curve. Right: the largest
    |theta_t - theta_t^MD| over trials against t (log scale; noiseless circles, noisiest
    crosses). Colours are the ambiguity families', the larger radius dotted.

    Args:
        frame: the output of :func:`run`.
        out_dir: the folder to write to.

    Returns:
        The paths written.
    """
    # The family's colour of every study figure; the larger radius dotted.
    families = frame.groupby("method")["family"].first()
    largest = max(RADII)

    def style(name: str, rho: float) -> dict[str, object]:
        return {"color": FAMILY_COLOURS[families[name]], "ls": ":" if rho == largest else "-"}

    quiet, loud = frame["noise"].min(), frame["noise"].max()
    fig = Figure(figsize=(17, 5.2), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, noise in zip(axes[:2], (quiet, loud), strict=True):
        subset = frame[frame["noise"] == noise]
        md = subset.groupby("iteration")["md_reward"].first()
        ax.plot(md.index, md.values, "k-", lw=3, alpha=0.4, label="exact mirror descent")
        for (name, rho), group in subset.groupby(["method", "rho"], sort=False):
            band = quantile_band(group, ["iteration"], "reward")
            label = name if rho == 0 else f"{name}, ρ = {rho:g}"
            ax.plot(band["iteration"], band["median"], marker="o", ms=3, label=label,
                    **style(name, rho))
            if noise > 0:
                ax.fill_between(band["iteration"], band["low"], band["high"],
                                color=style(name, rho)["color"], alpha=0.08)
        ax.set_title(f"reward under α0, noise sd {noise:g}")
        ax.set_xlabel("iteration t")
        ax.set_ylabel("exact expected reward under α0")
    moved = frame[frame["iteration"] > 0]  # the gap is 0 at t = 0 by construction
    for (name, rho, noise), group in moved.groupby(["method", "rho", "noise"], sort=False):
        if noise not in (quiet, loud):
            continue
        worst = group.groupby("iteration")["gap"].max().clip(lower=1e-17)
        axes[2].plot(worst.index, worst.values, marker="o" if noise == quiet else "x", ms=3,
                     label=f"{name}{'' if rho == 0 else f', ρ = {rho:g}'}, noise {noise:g}",
                     **style(name, rho))
    axes[2].set_yscale("log")
    axes[2].set_xlabel("iteration t")
    axes[2].set_ylabel("max over trials of max_j |θ_t − θ_t^MD|_j")
    axes[2].set_title("distance to the exact mirror-descent iterate")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if ax is axes[2] else 1)
    fig.suptitle(f"C6 / online: REBEL's update is the mirror-descent step π_t exp(η r) "
                 f"(η = {ETA}, {PAIRS} pairs per round, trained on α0 = {ALPHA_0})")
    return save_figure(fig, out_dir, "updates")
