"""Claim C7 in the linear world: does DRO-REBEL hold up under preference shift?

Online (DRO-)REBEL is trained for a few rounds on the mixture alpha_0 = (0.9, 0.1, 0) of a
3-objective world, and the final policy's exact expected reward is evaluated under every
mixture of a simplex grid (step 1/10), most of them never seen in training; the worst case
over the grid is the robustness figure of merit. Methods: REBEL; chi-square-, KL- and
W-REBEL over a grid of radii (a fixed radius every round: each round has the same n); DPO and
its chi-square, KL and Wasserstein versions (online: the logistic fit of Bradley-Terry labels
replaces the regression, :func:`drosim.online.online_rebel` with ``method="dpo"``).

The world makes preference shift matter: its third objective is built to conflict with the
first (cosine -0.5 between their parameters), so a policy that climbs alpha_0 loses reward
under mixtures that weigh the third objective. Whatever the method, moving the policy less
also loses less there; so REBEL is also run with shorter steps (eta times 0.1 .. 1.5), which
traces the trade-off between reward under alpha_0 and the worst case that a smaller step
buys by itself (step 0 is the initial, uniform policy). A robust method helps beyond that
only if it lies above this frontier: :func:`frontier_gain` measures by how much, with a
bootstrap interval over trials.

Rows: one per (method, rho, step, trial, mixture).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from drosim.chunks import DEFAULT_MEMORY_BUDGET, chunk_slices, trials_per_chunk
from drosim.methods import Method
from drosim.online import online_rebel
from drosim.plotting import FAMILY_COLOURS, save_figure
from drosim.stats import quantile_band
from drosim.studies._common import random_stream
from drosim.studies.montecarlo import ALPHA_0, resolve_preset
from drosim.world import LinearWorld, make_world

__all__ = ["PRESETS", "frontier", "frontier_gain", "methods", "mixture_grid", "plot",
           "preference_world", "run", "worst_case"]

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"radii": (0.01, 0.03, 0.1, 0.3, 1.0), "trials": 32, "seed": 0},
    "full": {"radii": (0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0), "trials": 400, "seed": 0},
}

DIM, PROMPTS, RESPONSES = 8, 32, 8
NOISE = 0.5  # Gaussian noise on each observed relative reward
CONFLICT = -0.5  # cosine between objectives 1 and 3
ROUNDS, PAIRS, ETA = 5, 64, 0.5
GRID_STEP = 10  # mixtures with coordinates in {0, 1/10, ..., 1}
# REBEL's frontier: eta times these (0: the initial policy, no round at all).
STEP_SCALES = (0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5)
WORLD_SEED = 0
ROBUST = {"chi2": "chi2", "kl": "KL", "wasserstein": "W"}


def preference_world(noise: float = NOISE, device: str | torch.device = "cpu") -> LinearWorld:
    """A random 3-objective world whose third objective conflicts with the first.

    The third parameter is replaced by one of the same norm at cosine CONFLICT with the
    first, keeping its direction orthogonal to the first otherwise.
    """
    world = make_world(DIM, PROMPTS, RESPONSES, objectives=3, noise=noise, seed=WORLD_SEED,
                       device=device)
    first, third = world.objectives[0], world.objectives[2]
    unit = first / first.norm()
    orthogonal = third - (third @ unit) * unit
    conflicting = first.norm() * (CONFLICT * unit + math.sqrt(1 - CONFLICT**2) * orthogonal
                                  / orthogonal.norm())
    objectives = torch.stack([first, world.objectives[1], conflicting])
    return replace(world, objectives=objectives)


def mixture_grid(step: int = GRID_STEP, dtype: torch.dtype = torch.float64,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """Every 3-mixture with coordinates in {0, 1/step, ..., 1}: ``(A, 3)``.

    Example:
        >>> mixture_grid(2).tolist()[:3]
        [[0.0, 0.0, 1.0], [0.0, 0.5, 0.5], [0.0, 1.0, 0.0]]
    """
    first, second = np.meshgrid(np.arange(step + 1), np.arange(step + 1), indexing="ij")
    keep = first + second <= step
    counts = np.stack([first[keep], second[keep], step - first[keep] - second[keep]], -1)
    return torch.as_tensor(counts / step, dtype=dtype, device=device)


def methods(radii: tuple[float, ...]) -> list[tuple[Method, float]]:
    """(method, step size) pairs: REBEL at every step of the frontier, DPO, and the robust
    REBEL and DPO variants at every radius (fixed radius: gamma = 0)."""
    plain = [(Method("REBEL"), ETA * s) for s in STEP_SCALES] + [(Method("DPO", "dpo"), ETA)]
    robust = [(Method(f"{ROBUST[f]}-{'REBEL' if loss == 'rebel' else 'DPO'}", loss, f, rho),
               ETA) for loss in ("rebel", "dpo") for f in ROBUST for rho in radii]
    return plain + robust


def run(preset: str = "quick", *, device: str | torch.device = "cpu",
        memory_budget: int = DEFAULT_MEMORY_BUDGET, **settings: Any) -> pd.DataFrame:
    """Train every method online on alpha_0 and evaluate it on every mixture of the grid.

    Args:
        preset: "quick" or "full" (see PRESETS).
        device: where the tensors live.
        memory_budget: bytes per chunk of trials; trials beyond one chunk draw from their
            own random streams, so the numbers depend on the budget only when it splits them.
        **settings: override entries of the preset (radii, trials, seed).

    Returns:
        One row per (method, rho, step, trial, mixture): columns method, loss, family, rho,
        step, trial, mixture, alpha_1, alpha_2, alpha_3, distance (L1 distance from
        alpha_0), reward (exact expected reward of the final policy).
    """
    config = resolve_preset(PRESETS, preset, settings)
    world = preference_world(device=device)
    dtype = world.features.dtype
    grid = mixture_grid(dtype=dtype, device=device)
    alpha0 = torch.tensor(ALPHA_0, dtype=dtype, device=device)
    trials = config["trials"]
    chunks = chunk_slices(trials, trials_per_chunk(PAIRS, DIM, memory_budget=memory_budget))
    mixtures = pd.DataFrame(grid.cpu().numpy(), columns=["alpha_1", "alpha_2", "alpha_3"])
    mixtures["distance"] = (grid - alpha0).abs().sum(-1).cpu().numpy()
    blocks = []
    for method, step in methods(config["radii"]):
        rewards = []
        for chunk in chunks:
            # One stream per chunk, shared by every method: round 1 sees the same pairs.
            theta0 = torch.zeros(chunk.stop - chunk.start, DIM, dtype=dtype, device=device)
            stream = random_stream(config["seed"], chunk.start, device=device)
            result = online_rebel(world, theta0, alpha0, n=PAIRS,
                                  rounds=ROUNDS if step > 0 else 0, eta=step or ETA,
                                  spec=method.spec(PAIRS), method=method.loss,
                                  beta=method.beta, eval_mixtures=grid, generator=stream)
            rewards.append(result.rewards[-1])
        mixture = np.tile(np.arange(len(mixtures)), trials)  # trial-major, as reward.ravel()
        block = pd.DataFrame({
            "method": method.name, "loss": method.loss, "family": method.family,
            "rho": method.radius(PAIRS), "step": step,
            "trial": np.repeat(np.arange(trials), len(mixtures)), "mixture": mixture})
        block = block.join(mixtures.iloc[mixture].reset_index(drop=True))
        block["reward"] = torch.cat(rewards).cpu().numpy().ravel()  # (T, A) flattened
        blocks.append(block)
    return pd.concat(blocks, ignore_index=True)


def worst_case(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (method, rho, step, trial): the worst reward over the grid and the reward at alpha_0.

    Args:
        frame: the output of :func:`run`.

    Returns:
        Columns method, loss, family, rho, step, trial, worst, trained.
    """
    keys = ["method", "loss", "family", "rho", "step", "trial"]
    worst = frame.groupby(keys, sort=False)["reward"].min().rename("worst")
    at_alpha0 = frame[frame["distance"] < 1e-9].set_index(keys)["reward"].rename("trained")
    return pd.concat([worst, at_alpha0], axis=1).reset_index()


def frontier(per_trial: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """REBEL's step-size frontier: mean reward at alpha_0 and mean worst case per step.

    Args:
        per_trial: the output of :func:`worst_case`.

    Returns:
        (trained, worst), sorted by trained, for :func:`numpy.interp`.
    """
    rebel = per_trial[per_trial["method"] == "REBEL"].groupby("step")[["trained", "worst"]]
    means = rebel.mean().sort_values("trained")
    return means["trained"].to_numpy(), means["worst"].to_numpy()


def frontier_gain(per_trial: pd.DataFrame, *, boots: int = 1000, level: float = 0.9,
                  seed: int = 0) -> pd.DataFrame:
    """How much each robust method gains on the worst case, against REBEL and its frontier.

    Trials are paired (every method's trial t starts from the same random stream), so the
    bootstrap resamples trial indices jointly for all methods and refits the frontier.

    Args:
        per_trial: the output of :func:`worst_case`.
        boots: bootstrap resamples.
        level: confidence level of the intervals.
        seed: the bootstrap's seed.

    Returns:
        One row per robust (method, rho) (with its loss, family and step): mean trained and
        worst, vs_rebel (mean worst case
        minus REBEL's at step eta) and gain (mean worst case minus the frontier's at the
        same mean reward under alpha_0), each with its interval (columns *_low, *_high).
    """
    keys = ["method", "loss", "family", "rho", "step"]
    trained = per_trial.pivot_table(index=keys, columns="trial", values="trained")
    worst = per_trial.pivot_table(index=keys, columns="trial", values="worst")
    labels = trained.index.to_frame(index=False)
    on_frontier = (labels["method"] == "REBEL").to_numpy()
    reference = np.flatnonzero(on_frontier & np.isclose(labels["step"], ETA))[0]
    robust = np.flatnonzero(labels["rho"] > 0)
    rng = np.random.default_rng(seed)
    samples = [np.arange(trained.shape[1])] + [
        rng.integers(trained.shape[1], size=trained.shape[1]) for _ in range(boots)]
    vs_rebel, gain = [], []
    for picked in samples:  # the first "resample" is the data itself
        t = trained.to_numpy()[:, picked].mean(1)
        w = worst.to_numpy()[:, picked].mean(1)
        order = np.argsort(t[on_frontier])
        line = np.interp(t[robust], t[on_frontier][order], w[on_frontier][order])
        vs_rebel.append(w[robust] - w[reference])
        gain.append(w[robust] - line)
    table = labels.iloc[robust].reset_index(drop=True)
    table["trained"] = trained.to_numpy()[robust].mean(1)
    table["worst"] = worst.to_numpy()[robust].mean(1)
    tail = (1 - level) / 2
    for name, values in (("vs_rebel", np.array(vs_rebel)), ("gain", np.array(gain))):
        table[name] = values[0]
        table[f"{name}_low"] = np.quantile(values[1:], tail, axis=0)
        table[f"{name}_high"] = np.quantile(values[1:], 1 - tail, axis=0)
    return table


def plot(frame: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """figures/shift.{png,pdf}: three panels.

    Left: the worst-case reward over the mixture grid against the radius, per robust method
    (median and 10-90% band over trials), REBEL and DPO (at step eta) as horizontal lines.
    Middle: mean reward at alpha_0 against mean worst case for every method and radius, with
    REBEL's step-size frontier. Right: for the best radius of each robust REBEL (the largest
    gain over the frontier: the best worst case alone would favour radii so large that the
    policy does not move), its mean reward minus REBEL's on every mixture, against the
    mixture's L1 distance from alpha_0.

    Args:
        frame: the output of :func:`run`.
        out_dir: the folder to write to.

    Returns:
        The paths written.
    """
    per_trial = worst_case(frame)
    robust = per_trial[per_trial["family"] != "none"]
    reference = per_trial[(per_trial["family"] == "none") & np.isclose(per_trial["step"], ETA)]
    # The colours of every study figure; REBEL solid with circles, DPO dashed with squares.
    colour = FAMILY_COLOURS
    marker = {"rebel": "o", "dpo": "s"}
    fig = Figure(figsize=(17, 5.4), layout="constrained")
    left, middle, right = fig.subplots(1, 3)

    for (name, family, loss), group in robust.groupby(["method", "family", "loss"]):
        band = quantile_band(group, ["rho"], "worst")
        left.plot(band["rho"], band["median"], marker[loss] + ("-" if loss == "rebel" else "--"),
                  color=colour[family], label=name)
        if loss == "rebel":  # DPO's bands are wide and would hide the rest
            left.fill_between(band["rho"], band["low"], band["high"], color=colour[family],
                              alpha=0.1)
    for name, group in reference.groupby("method"):
        left.axhline(group["worst"].median(), color="k", ls=":" if name == "REBEL" else "-.",
                     lw=1.5, label=f"{name} (median)")
    left.set_xscale("log")
    left.set_xlabel("radius ρ (Wasserstein: in units of dphi)")
    left.set_ylabel("worst-case reward over the mixture grid")
    left.set_title("worst case over all mixtures (median, 10-90% band)")

    trained, worst = frontier(per_trial)
    middle.plot(trained, worst, "k-", lw=2, label="REBEL with step s·η")
    means = per_trial.groupby(["method", "family", "loss", "rho", "step"])[
        ["trained", "worst"]].mean().reset_index()
    for _, point in means[means["method"] == "REBEL"].iterrows():
        middle.annotate(f"s={point['step'] / ETA:g}", (point["trained"], point["worst"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    for (name, family, loss), group in means[means["family"] != "none"].groupby(
            ["method", "family", "loss"]):
        middle.plot(group["trained"], group["worst"], marker[loss], color=colour[family],
                    label=name)
    dpo = means[means["method"] == "DPO"]
    middle.plot(dpo["trained"], dpo["worst"], "s", color="k", mfc="none", label="DPO")
    middle.set_xlabel("mean reward under the training mixture α0")
    middle.set_ylabel("mean worst-case reward over the grid")
    middle.set_title("above the black frontier: better than a shorter REBEL step")

    mean_reward = frame.groupby(["method", "rho", "step", "mixture"])["reward"].mean()
    base = mean_reward.loc[("REBEL", 0.0, ETA)]
    distance = frame.groupby("mixture")["distance"].first()
    gains = frontier_gain(per_trial)
    for (name, family), group in gains[gains["loss"] == "rebel"].groupby(["method", "family"]):
        best = group.loc[group["gain"].idxmax(), "rho"]
        diff = mean_reward.loc[(name, best, ETA)] - base
        right.plot(distance[diff.index], diff.values, "o", color=colour[family], alpha=0.7,
                   label=f"{name}, ρ = {best:g}")
    right.axhline(0.0, color="k", lw=1)
    right.set_xlabel("L1 distance of the evaluation mixture from α0")
    right.set_ylabel("mean reward minus REBEL's")
    right.set_title("per mixture, at the radius of largest frontier gain")
    for ax in (left, middle, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"C7 (linear world): online training on α0 = {ALPHA_0} for {ROUNDS} rounds "
                 f"of {PAIRS} pairs, η = {ETA}; exact rewards under {len(distance)} mixtures")
    return save_figure(fig, out_dir, "shift")
