"""Claim C7 in the linear world: does DRO-REBEL hold up under preference shift?

Online (DRO-)REBEL is trained for a few rounds on the mixture alpha_0 = (0.9, 0.1, 0) of a
3-objective world, and the final policy's exact expected reward is evaluated under every
mixture of a simplex grid (step 1/10), most of them never seen in training; the worst case
over the grid is the robustness figure of merit, the reward under the minority annotators'
mixture (ANNOTATOR_ALPHA, on the grid) a second one. Methods: REBEL and chi-square-, KL- and
W-REBEL over a log grid of radii (a fixed radius every round: each round has the same n);
as baselines DPO and W-DPO (online: the logistic fit of Bradley-Terry labels replaces the
regression). chi-square- and KL-DPO are left out: with one thread each of their fits costs
seconds at n = 256 (about 20 times W-DPO's), which would triple the full preset's time.

Each world's third objective is built to conflict with the first (cosine -0.5 between their
parameters), so a policy that climbs alpha_0 loses reward under mixtures that weigh the
third objective. Three worlds (:data:`WORLDS`), each drawn afresh for every world seed:

* "well-specified": every pair is scored under alpha_0 with Gaussian noise. Reweighting
  pairs cannot move the regression's target theta_alpha0 there (the noise is independent of
  dphi), so chi-square- and KL-REBEL are REBEL up to sampling noise by construction;
* "annotators": a fraction ANNOTATOR_FRACTION of the pairs is scored and labelled under
  ANNOTATOR_ALPHA, near the conflicting objective. Those pairs have large residuals under
  the majority's fit, so a chi-square or KL ball, which upweights large losses, moves the
  target towards them: the robust set can act;
* "annotators + prompt shift": the same annotators, with training prompts drawn away from
  the prompts where the conflicting objective varies most and the evaluation drawn towards
  them (:func:`prompt_distributions`): covariate shift on top of preference shift.

Whatever the method, moving the policy less also loses less under the conflicting
mixtures; so REBEL is also run with shorter steps (eta times 0.1 .. 1.5), which traces the
trade-off between reward under alpha_0 and the worst case that a smaller step buys by
itself (step 0 is the initial, uniform policy). A robust method helps beyond that only if it
lies above this frontier: :func:`frontier_gain` measures by how much, with paired bootstrap
intervals (a unit is one world seed and trial, shared by every method).

Rows of :func:`run`: one per (world, method, rho, step, unit).
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
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from torch import Tensor

from drosim.chunks import DEFAULT_MEMORY_BUDGET, chunk_slices, trials_per_chunk
from drosim.methods import Method
from drosim.online import online_rebel
from drosim.plotting import FAMILY_COLOURS, save_figure
from drosim.stats import per_x_statistics
from drosim.studies._common import one_thread, random_stream
from drosim.studies.montecarlo import ALPHA_0, resolve_preset
from drosim.world import LinearWorld, make_world

__all__ = ["PRESETS", "WORLDS", "frontier", "frontier_difference", "frontier_gain", "methods",
           "mixture_grid", "plot", "preference_world", "prompt_distributions", "run", "statistics",
           "world_variant"]

DIM, PROMPTS, RESPONSES = 8, 32, 8
NOISE = 0.5  # Gaussian noise on each observed relative reward
CONFLICT = -0.5  # cosine between objectives 1 and 3
PAIRS, ETA = 64, 0.5  # pairs per round of the quick preset (the updates study's unit too)
GRID_STEP = 10  # mixtures with coordinates in {0, 1/10, ..., 1}
# REBEL's frontier: eta times these (0: the initial policy, no round at all).
STEP_SCALES = (0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5)
WORLD_SEED = 0
ROBUST = {"chi2": "chi2", "kl": "KL", "wasserstein": "W"}
_STYLES = {"rebel": "o-", "dpo": "s--"}  # REBEL solid with circles, DPO dashed with squares
WORLDS = ("well-specified", "annotators", "annotators + prompt shift")
ANNOTATOR_FRACTION = 0.2
ANNOTATOR_ALPHA = (0.1, 0.1, 0.8)  # near the conflicting objective, on the grid
PROMPT_TILT = 1.5  # log-odds per standard deviation of the prompt score (prompt shift)

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"worlds": WORLDS, "world_seeds": 3, "trials": 8, "rounds": 3, "pairs": PAIRS,
              "radii": (0.01, 0.1, 1.0, 3.0), "seed": 0},
    "full": {"worlds": WORLDS, "world_seeds": 10, "trials": 16, "rounds": 5,
             "pairs": 4 * PAIRS, "radii": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0), "seed": 0},
}


def preference_world(noise: float = NOISE, device: str | torch.device = "cpu",
                     seed: int = WORLD_SEED, **options: Any) -> LinearWorld:
    """A random 3-objective world whose third objective conflicts with the first.

    The third parameter is replaced by one of the same norm at cosine CONFLICT with the
    first, keeping its direction orthogonal to the first otherwise. ``options`` are
    :class:`drosim.world.LinearWorld` options (annotators, prompt distribution, ...).
    """
    world = make_world(DIM, PROMPTS, RESPONSES, objectives=3, noise=noise, seed=seed,
                       device=device)
    first, third = world.objectives[0], world.objectives[2]
    unit = first / first.norm()
    orthogonal = third - (third @ unit) * unit
    conflicting = first.norm() * (CONFLICT * unit + math.sqrt(1 - CONFLICT**2) * orthogonal
                                  / orthogonal.norm())
    objectives = torch.stack([first, world.objectives[1], conflicting])
    options = {k: v.to(world.features) if isinstance(v, Tensor) else v
               for k, v in options.items()}
    return replace(world, objectives=objectives, **options)


def prompt_distributions(world: LinearWorld, tilt: float = PROMPT_TILT) -> tuple[Tensor, Tensor]:
    """(training, evaluation) prompt distributions of the prompt-shift world.

    A prompt's score is the standardised spread (standard deviation over its responses) of
    the conflicting objective's reward: training prompts are drawn with weight
    exp(-tilt * score), evaluation prompts with exp(+tilt * score), so training rarely sees
    the prompts on which the conflicting mixtures are won or lost.
    """
    spread = (world.features @ world.objectives[2]).std(-1)
    score = (spread - spread.mean()) / spread.std()
    return torch.softmax(-tilt * score, 0), torch.softmax(tilt * score, 0)


def world_variant(name: str, seed: int, device: str | torch.device = "cpu"
                  ) -> tuple[LinearWorld, Tensor | None]:
    """The world ``name`` (one of :data:`WORLDS`) drawn with ``seed``, and the prompt
    distribution it is evaluated under (None: the training one)."""
    if name not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, got {name!r}")
    if name == "well-specified":
        return preference_world(device=device, seed=seed), None
    annotators = {"annotator_fraction": ANNOTATOR_FRACTION,
                  "annotator_alpha": torch.tensor(ANNOTATOR_ALPHA)}
    world = preference_world(device=device, seed=seed, **annotators)
    if name == "annotators":
        return world, None
    train, evaluate = prompt_distributions(world)
    return replace(world, prompt_probs=train), evaluate


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
    """(method, step size) pairs: REBEL at every step of the frontier, DPO, the robust REBELs
    and W-DPO at every radius (fixed radius: gamma = 0)."""
    plain = [(Method("REBEL"), ETA * s) for s in STEP_SCALES] + [(Method("DPO", "dpo"), ETA)]
    robust = [(Method(f"{ROBUST[f]}-REBEL", "rebel", f, rho), ETA)
              for f in ROBUST for rho in radii]
    wdpo = [(Method("W-DPO", "dpo", "wasserstein", rho), ETA) for rho in radii]
    return plain + robust + wdpo


def run(preset: str = "quick", *, device: str | torch.device = "cpu",
        memory_budget: int = DEFAULT_MEMORY_BUDGET, **settings: Any) -> pd.DataFrame:
    """Train every method online on alpha_0 in every world and evaluate it on the grid.

    Args:
        preset: "quick" or "full" (see PRESETS).
        device: where the tensors live.
        memory_budget: bytes per chunk of trials; trials beyond one chunk draw from their
            own random streams, so the numbers depend on the budget only when it splits them.
        **settings: override entries of the preset (worlds, world_seeds, trials, rounds,
            pairs, radii, seed).

    Returns:
        One row per (world, method, rho, step, unit): columns world, world_seed, trial (the
        unit: world_seed * trials + trial, shared by every method of a world), method, loss,
        family, rho, step, trained (exact expected reward of the final policy under
        alpha_0), worst (its minimum over the grid) and minority (under ANNOTATOR_ALPHA),
        under the world's evaluation prompt distribution.
    """
    config = resolve_preset(PRESETS, preset, settings)
    chunks = chunk_slices(config["trials"], trials_per_chunk(config["pairs"], DIM,
                                                             memory_budget=memory_budget))
    blocks = []
    with one_thread():
        for name in config["worlds"]:
            for world_seed in range(config["world_seeds"]):
                world, evaluation = world_variant(name, world_seed, device)
                blocks += _world_blocks(world, evaluation, name, world_seed, config, chunks)
    return pd.concat(blocks, ignore_index=True)


def _world_blocks(world: LinearWorld, evaluation: Tensor | None, name: str, world_seed: int,
                  config: dict[str, Any], chunks: list[slice]) -> list[pd.DataFrame]:
    """The rows of :func:`run` for one world and world seed."""
    device = world.features.device
    grid = mixture_grid(dtype=world.features.dtype, device=device)
    alpha0 = torch.tensor(ALPHA_0).to(grid)
    at_alpha0 = int((grid - alpha0).abs().sum(-1).argmin())
    minority = int((grid - torch.tensor(ANNOTATOR_ALPHA).to(grid)).abs().sum(-1).argmin())
    trials, pairs = config["trials"], config["pairs"]
    blocks = []
    for method, step in methods(config["radii"]):
        rewards = []
        for chunk in chunks:
            # One stream per (world seed, chunk), shared by every method: round 1 sees the
            # same prompts and responses, so a unit is paired across methods.
            theta0 = torch.zeros(chunk.stop - chunk.start, DIM, dtype=grid.dtype,
                                 device=device)
            stream = random_stream(config["seed"], world_seed, chunk.start,
                                   device=device)
            result = online_rebel(
                world, theta0, alpha0, n=pairs,
                rounds=config["rounds"] if step > 0 else 0, eta=step or ETA,
                spec=method.spec(pairs), method=method.loss, beta=method.beta,
                eval_mixtures=grid, eval_prompt_probs=evaluation, generator=stream)
            rewards.append(result.rewards[-1])
        reward = torch.cat(rewards).cpu().numpy()  # (trials, A)
        blocks.append(pd.DataFrame({
            "world": name, "world_seed": world_seed,
            "trial": world_seed * trials + np.arange(trials),
            "method": method.name, "loss": method.loss, "family": method.family,
            "rho": method.radius(pairs), "step": step,
            "trained": reward[:, at_alpha0], "worst": reward.min(1),
            "minority": reward[:, minority]}))
    return blocks


def frontier(per_trial: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """REBEL's step-size frontier in one world: mean reward at alpha_0 and mean worst case
    per step.

    Args:
        per_trial: the rows of :func:`run` of one world.

    Returns:
        (trained, worst), sorted by trained, for :func:`numpy.interp`.
    """
    rebel = per_trial[per_trial["method"] == "REBEL"].groupby("step")[["trained", "worst"]]
    means = rebel.mean().sort_values("trained")
    return means["trained"].to_numpy(), means["worst"].to_numpy()


def frontier_gain(per_trial: pd.DataFrame, *, boots: int = 2000, level: float = 0.9,
                  seed: int = 0) -> pd.DataFrame:
    """How much each robust method gains, per world, against REBEL and its frontier.

    Units (a world seed and trial) are paired: every method of a world starts unit u from
    the same random stream, so the bootstrap resamples units jointly for all methods and
    refits the frontier. Two intervals per figure: at ``level`` for one comparison, and at
    the Bonferroni level 1 - (1 - level) / k for the k robust (method, radius) pairs
    compared in the world (columns ``*_adj``).

    Args:
        per_trial: the output of :func:`run`.
        boots: bootstrap resamples.
        level: confidence level of the per-comparison intervals.
        seed: the bootstrap's seed.

    Returns:
        One row per (world, robust method, rho) (with its loss, family and step): mean
        trained, worst and minority, vs_rebel (mean worst case minus REBEL's at step eta),
        minority_vs_rebel (the same under ANNOTATOR_ALPHA) and gain (mean worst case minus
        the frontier's at the same mean reward under alpha_0), each with its intervals
        (columns *_low, *_high, *_low_adj, *_high_adj), and comparisons (k).
    """
    tables = [_world_gain(rows, boots, level, seed).assign(world=world)
              for world, rows in per_trial.groupby("world", sort=False)]
    table = pd.concat(tables, ignore_index=True)
    return table[["world", *table.columns.drop("world")]]


def _world_gain(per_trial: pd.DataFrame, boots: int, level: float, seed: int) -> pd.DataFrame:
    """:func:`frontier_gain` for the rows of one world."""
    keys = ["method", "loss", "family", "rho", "step"]
    values = {name: per_trial.pivot_table(index=keys, columns="trial", values=name)
              for name in ("trained", "worst", "minority")}
    labels = values["trained"].index.to_frame(index=False)
    on_frontier = (labels["method"] == "REBEL").to_numpy()
    reference = np.flatnonzero(on_frontier & np.isclose(labels["step"], ETA))[0]
    robust = np.flatnonzero(labels["rho"] > 0)
    units = values["trained"].shape[1]
    rng = np.random.default_rng(seed)
    picks = np.vstack([np.arange(units), rng.integers(units, size=(boots, units))])
    # (rows, 1 + boots): the first column is the data itself
    t, w, m = (np.stack([v.to_numpy()[:, p].mean(1) for p in picks], 1)
               for v in values.values())
    line = np.stack([np.interp(t[robust, b], *_sorted(t[on_frontier, b], w[on_frontier, b]))
                     for b in range(t.shape[1])], 1)
    table = labels.iloc[robust].reset_index(drop=True)
    for name, value in (("trained", t), ("worst", w), ("minority", m)):
        table[name] = value[robust, 0]
    comparisons = len(robust)
    table["comparisons"] = comparisons
    for name, value in (("vs_rebel", w[robust] - w[reference]),
                        ("minority_vs_rebel", m[robust] - m[reference]),
                        ("gain", w[robust] - line)):
        table[name] = value[:, 0]
        for suffix, alpha in (("", 1 - level), ("_adj", (1 - level) / comparisons)):
            table[f"{name}_low{suffix}"] = np.quantile(value[:, 1:], alpha / 2, axis=1)
            table[f"{name}_high{suffix}"] = np.quantile(value[:, 1:], 1 - alpha / 2, axis=1)
    return table


def _sorted(trained: np.ndarray, worst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The frontier's points sorted by reward under alpha_0, as numpy.interp needs them."""
    order = np.argsort(trained)
    return trained[order], worst[order]


def frontier_difference(per_trial: pd.DataFrame) -> pd.DataFrame:
    """The robust rows with ``gain``: each unit's worst case minus REBEL's frontier at the
    method's mean reward under alpha_0 (per world), so its mean is frontier_gain's gain and
    its spread is the spread over units."""
    parts = []
    for _, rows in per_trial.groupby("world", sort=False):
        line = frontier(rows)
        robust = rows[rows["rho"] > 0]
        mean_trained = robust.groupby(["method", "rho"])["trained"].transform("mean")
        parts.append(robust.assign(gain=robust["worst"] - np.interp(mean_trained, *line)))
    return pd.concat(parts)


def statistics(per_trial: pd.DataFrame) -> pd.DataFrame:
    """Per-x statistics (:func:`drosim.stats.per_x_statistics`) behind the figure.

    Robust methods against x = rho: their worst case, minority reward and gain over REBEL's
    frontier; REBEL and DPO against x = step: their worst case and minority reward. A column
    ``quantity`` says which, ``world`` which world.
    """
    robust = frontier_difference(per_trial)
    rebel = per_trial[per_trial["rho"] == 0]
    parts = [per_x_statistics(frame.assign(quantity=y, value=frame[y]), x, "value",
                              study="shift", by=("method", "world", "quantity"))
             for frame, x, ys in ((robust, "rho", ("worst", "minority", "gain")),
                                  (rebel, "step", ("worst", "minority")))
             for y in ys]
    return pd.concat(parts, ignore_index=True)


def plot(per_trial: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """figures/shift.{png,pdf}: two rows of panels, one column per world.

    Top: each robust REBEL's gain over REBEL's step-size frontier against the radius (mean,
    shaded: 90% paired bootstrap interval of the mean; dotted: 10-90% spread over units).
    Bottom: mean reward under alpha_0 against mean worst case, REBEL's frontier in black.

    Args:
        per_trial: the output of :func:`run`.
        out_dir: the folder to write to.

    Returns:
        The paths written.
    """
    worlds = list(dict.fromkeys(per_trial["world"]))
    gains = frontier_gain(per_trial, boots=500)
    spread = frontier_difference(per_trial)
    fig = Figure(figsize=(5.5 * len(worlds), 9), layout="constrained")
    axes = fig.subplots(2, len(worlds), squeeze=False)
    bands = [Patch(color="grey", alpha=0.3, label="shaded: 90% paired bootstrap CI of the mean"),
             Line2D([], [], color="grey", ls=":", label="dotted: 10-90% spread over units")]
    for column, world in enumerate(worlds):
        top, bottom = axes[:, column]
        rows = per_trial[per_trial["world"] == world]
        trained, worst = frontier(rows)
        bottom.plot(trained, worst, "k-", lw=2, label="REBEL with step s·η")
        for (name, family, loss), group in gains[gains["world"] == world].groupby(
                ["method", "family", "loss"]):
            colour, style = FAMILY_COLOURS[family], _STYLES[loss]
            top.plot(group["rho"], group["gain"], style, color=colour, label=name)
            top.fill_between(group["rho"], group["gain_low"], group["gain_high"], color=colour,
                             alpha=0.2)
            units = spread[(spread["world"] == world) & (spread["method"] == name)]
            band = units.groupby("rho")["gain"].quantile([0.1, 0.9]).unstack()
            for quantile in (0.1, 0.9):
                top.plot(band.index, band[quantile], ":", color=colour, lw=1)
            bottom.plot(group["trained"], group["worst"], style, color=colour, lw=0.8,
                        label=f"{name} (ρ = {group['rho'].min():g} .. {group['rho'].max():g})")
        dpo = rows[rows["method"] == "DPO"]
        bottom.plot(dpo["trained"].mean(), dpo["worst"].mean(), "ks", mfc="none", label="DPO")
        top.axhline(0.0, color="k", lw=1)
        top.set_xscale("log")
        top.set_xlabel("radius ρ (Wasserstein: in units of dphi)")
        top.set_ylabel("worst case minus REBEL's frontier")
        top.set_title(f"{world}: gain over the step frontier")
        top.legend(handles=[*top.get_legend_handles_labels()[0], *bands], fontsize=7)
        bottom.set_xlabel("mean reward under the training mixture α0")
        bottom.set_ylabel("mean worst-case reward over the grid")
        bottom.set_title(f"{world}: above black = beats a shorter step", fontsize=10)
        bottom.legend(fontsize=7)
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
    fig.suptitle(f"C7 (linear world): online training on α0 = {ALPHA_0}, η = {ETA}; exact "
                 f"rewards under {len(mixture_grid())} mixtures; "
                 f"{per_trial['trial'].nunique()} units (world seed × trial) per world")
    return save_figure(fig, out_dir, "shift")
