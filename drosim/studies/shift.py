"""Claim C7 in the linear world: does DRO-REBEL hold up under preference shift?

Online (DRO-)REBEL and (DRO-)DPO are trained for a few rounds on the mixture alpha_0 =
(0.9, 0.1, 0) of a 3-objective world whose third objective conflicts with the first (cosine
-0.5 between their parameters), and the final policy's exact expected reward is evaluated
under mixtures of a simplex grid (step 1/10): the worst case over the world's evaluation
mixtures is the figure of merit, the reward under objective 3 alone ("protected") a second.

A robust set can only protect what its training pairs carry. The worlds (:data:`WORLDS`),
each drawn afresh for every world seed, say in turn whether the protected objective was
seen in training:

* "unseen objective" (headline): a minority of 20% of the pairs scores objective 2 alone,
  so no training pair scores objective 3, and the evaluation keeps only the held-out
  mixtures (those with weight on objective 3);
* "misspecified reward" (headline): one mixture, alpha_0, plus a quadratic reward the
  linear features cannot express; held-out mixtures;
* "5% contamination" (headline): one mixture, with 5% of the pairs adversarial outliers
  (:class:`drosim.world.LinearWorld`'s ``contamination``); held-out mixtures;
* "seen minority" (context): 20% of the pairs is scored under (0.1, 0.1, 0.8), near the
  conflicting objective, so the set can move the fit towards a group it has seen; the
  whole grid, whose worst case is mostly that objective's vertex;
* "annotators + prompt shift" (context): the seen minority, with training prompts drawn
  away from the prompts where objective 3 varies most and evaluation towards them;
* "well-specified" (not testable, full preset only): noise independent of dphi, so
  reweighting pairs cannot move the regression's target.

Methods: for each loss (REBEL's regression, DPO's logistic fit of Bradley-Terry labels) the
plain method over a step-size frontier (eta times 0 .. 1.5: a policy that moves less also
loses less under the conflicting mixtures), and its chi-square, KL and Wasserstein versions
over a radius grid per family (:func:`radius_grid`) that runs from 0 (the plain loss) up to
the ball of point masses (chi-square (n - 1) / 2, KL log n) where the fit is the worst single
pair's. A robust method helps beyond a shorter step only if it lies above its own loss's
frontier: :func:`frontier_gain` measures by how much. Its radius is reported twice: the one
chosen by :func:`drosim.radius.validated_radius` on a pilot batch of training pairs grouped by
annotator (rule "validated", what the verdicts use), and every grid radius (rule "grid",
whose best is the oracle: chosen on the test metric, context only).

Intervals are bootstrapped by world seed (a cluster: its trials share the world), resampling
seeds with all their trials. Rows of :func:`run`: one per (world, method, rule, rho, step,
unit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

from drosim.chunks import DEFAULT_MEMORY_BUDGET, trials_per_chunk
from drosim.estimators import dpo, rebel
from drosim.methods import Method
from drosim.plotting import save_figure
from drosim.radius import validated_radius
from drosim.stats import per_x_statistics
from drosim.studies._common import one_thread, random_stream
from drosim.studies.montecarlo import ALPHA_0, resolve_preset
from drosim.world import LinearWorld, make_world

__all__ = ["HEADLINE", "METHOD_COLOURS", "PRESETS", "SCALE_WORLDS", "WORLDS", "WorldSpec",
           "frontier", "frontier_difference", "frontier_gain", "methods", "mixture_grid", "plot",
           "preference_world", "prompt_distributions", "radius_grid", "run", "scale_sweep",
           "statistics", "world_variant"]

DIM, PROMPTS, RESPONSES = 8, 32, 8
NOISE = 0.5  # Gaussian noise on each observed relative reward
CONFLICT = -0.5  # cosine between objectives 1 and 3
PAIRS, ETA = 64, 0.5  # pairs per round of the quick preset (the updates study's unit too)
GRID_STEP = 10  # mixtures with coordinates in {0, 1/10, ..., 1}
# Each loss's frontier: eta times these (0: the initial policy, no round at all).
STEP_SCALES = (0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5)
WORLD_SEED = 0
LOSSES = {"rebel": "REBEL", "dpo": "DPO"}
ROBUST = {"chi2": "chi2", "kl": "KL", "wasserstein": "W"}
# One colour per method, the same in every panel; each loss's frontier in black or grey.
METHOD_COLOURS = {"chi2-REBEL": "tab:orange", "KL-REBEL": "tab:green", "W-REBEL": "tab:red",
                  "chi2-DPO": "tab:purple", "KL-DPO": "tab:brown", "W-DPO": "tab:cyan",
                  "REBEL": "black", "DPO": "tab:gray"}
MINORITY_FRACTION = 0.2
SEEN_ALPHA = (0.1, 0.1, 0.8)  # the seen minority: near the conflicting objective
UNSEEN_ALPHA = (0.0, 1.0, 0.0)  # the unseen-objective world's minority: objective 2 alone
PROTECTED = (0.0, 0.0, 1.0)  # the conflicting objective alone
MISSPECIFICATION = 0.5  # weight of the quadratic reward (its sd is about the linear one's)
CONTAMINATION = 0.05
PROMPT_TILT = 1.5  # log-odds per standard deviation of the prompt score (prompt shift)
PILOT_STREAM = 1  # the random stream key of the pilot batch the radius is validated on


@dataclass(frozen=True)
class WorldSpec:
    """How one C7 world differs from the plain preference world.

    Attributes:
        options: :class:`drosim.world.LinearWorld` options (noise kind, contamination, ...).
        minority: the minority annotators' mixture (a share MINORITY_FRACTION of the pairs),
            None for one mixture.
        prompt_shift: train and evaluate under :func:`prompt_distributions`.
        held_out: evaluate only the mixtures with weight on objective 3 (no training pair
            scores it), else the whole grid.
        seen: whether some training pairs score the protected objective; None where a set
            cannot act (well-specified).
    """

    options: dict[str, Any] = field(default_factory=dict)
    minority: tuple[float, float, float] | None = None
    prompt_shift: bool = False
    held_out: bool = False
    seen: bool | None = False


WORLDS: dict[str, WorldSpec] = {
    "unseen objective": WorldSpec(minority=UNSEEN_ALPHA, held_out=True),
    "misspecified reward": WorldSpec({"misspecification": MISSPECIFICATION}, held_out=True),
    "5% contamination": WorldSpec({"contamination": CONTAMINATION}, held_out=True),
    "seen minority": WorldSpec(minority=SEEN_ALPHA, seen=True),
    "annotators + prompt shift": WorldSpec(minority=SEEN_ALPHA, prompt_shift=True, seen=True),
    "well-specified": WorldSpec(seen=None),
}
HEADLINE = ("unseen objective", "misspecified reward", "5% contamination")

# Sizes set by the robust fits' cost (seconds per batched fit at the largest radii): every
# cell is fitted in one batch, so time grows with cells x trials x methods x rounds.
_COMMON = {"dim": DIM, "radii": None, "losses": tuple(LOSSES), "families": tuple(ROBUST),
           "seed": 0}
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"worlds": tuple(w for w in WORLDS if w != "well-specified"), "world_seeds": 4,
              "trials": 2, "rounds": 2, "pairs": PAIRS, "grid_points": 4,
              "scales": ((2 * PAIRS, DIM), (PAIRS, 2 * DIM)), **_COMMON},
    "full": {"worlds": tuple(WORLDS), "world_seeds": 10, "trials": 3, "rounds": 3,
             "pairs": 2 * PAIRS, "grid_points": 6,
             "scales": ((PAIRS, DIM), (4 * PAIRS, DIM), (2 * PAIRS, 2 * DIM)), **_COMMON},
}
# The dataset-scale sweep: its worlds and method (chi-square-REBEL against REBEL's frontier).
SCALE_WORLDS = ("unseen objective", "seen minority")


def preference_world(noise: float = NOISE, device: str | torch.device = "cpu",
                     seed: int = WORLD_SEED, dim: int = DIM, **options: Any) -> LinearWorld:
    """A random 3-objective world whose third objective conflicts with the first.

    The third parameter is replaced by one of the same norm at cosine CONFLICT with the
    first, keeping its direction orthogonal to the first otherwise. ``options`` are
    :class:`drosim.world.LinearWorld` options (annotators, prompt distribution, ...).
    """
    world = make_world(dim, PROMPTS, RESPONSES, objectives=3, noise=noise, seed=seed,
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


def world_variant(name: str, seed: int, device: str | torch.device = "cpu", dim: int = DIM
                  ) -> tuple[LinearWorld, Tensor | None]:
    """The world ``name`` (a key of :data:`WORLDS`) drawn with ``seed`` in ``dim``
    dimensions, and the prompt distribution it is evaluated under (None: the training one).

    Raises:
        ValueError: an unknown world.

    Example:
        >>> world, evaluation = world_variant("unseen objective", 0)
        >>> world.annotator_alpha.tolist(), evaluation is None
        ([0.0, 1.0, 0.0], True)
    """
    if name not in WORLDS:
        raise ValueError(f"world must be one of {tuple(WORLDS)}, got {name!r}")
    spec = WORLDS[name]
    options = dict(spec.options)
    if spec.minority is not None:
        options |= {"annotator_fraction": MINORITY_FRACTION,
                    "annotator_alpha": torch.tensor(spec.minority, dtype=torch.float64)}
    world = preference_world(device=device, seed=seed, dim=dim, **options)
    if not spec.prompt_shift:
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


def radius_grid(family: str, n: int, points: int) -> tuple[float, ...]:
    """Radius 0 and a log grid of ``points`` positive radii for one family with n pairs per
    round: the whole radius axis, both of whose ends are natural.

    Radius 0 is the plain loss at the robust methods' step (every ball is {P}); its gain over
    the own loss's frontier is 0, so a best radius of 0 says that no ball helps. The positive
    radii run, for chi-square, from 0.01 to (n - 1) / 2 and, for KL, from 0.003 to log n:
    the point-mass radii (``protecting(1 / n)``), from which the ball holds every single pair
    and the fit is the worst pair's (a Chebyshev or max-margin fit), the same at every larger
    radius: the grid's top is the end of the radius axis, not a truncation. Wasserstein runs
    from 0.003 to 3 (in units of dphi, whose norm is about 1.4), past which W-REBEL's fit is
    w = 0.

    Raises:
        ValueError: an unknown family, n < 4 or fewer than 3 points (no interior).

    Example:
        >>> [round(r, 6) for r in radius_grid("chi2", 66, 3)]
        [0.0, 0.01, 0.570088, 32.5]
    """
    if family not in ROBUST:
        raise ValueError(f"family must be one of {tuple(ROBUST)}, got {family!r}")
    if n < 4 or points < 3:
        raise ValueError(f"need n >= 4 and at least 3 points, got n = {n}, points = {points}")
    low, high = {"chi2": (0.01, (n - 1) / 2), "kl": (0.003, math.log(n)),
                 "wasserstein": (0.003, 3.0)}[family]
    return (0.0, *(float(r) for r in np.geomspace(low, high, points)))


def methods(radii: tuple[float, ...] | None, n: int = PAIRS, points: int = 5
            ) -> list[tuple[Method, float]]:
    """(method, step size) pairs: each loss at every step of its frontier, and its chi2, KL
    and W versions at every radius (fixed radius: gamma = 0).

    Args:
        radii: the radii of every family, or None for :func:`radius_grid`'s.
        n: pairs per round (sets the grids' point-mass ends).
        points: positive radii per family of the grids (radius 0 comes on top).

    Returns:
        The frontier first, then the robust methods.
    """
    frontier_runs = [(Method(LOSSES[loss], loss), ETA * s) for loss in LOSSES
                     for s in STEP_SCALES]
    robust = [(Method(f"{ROBUST[f]}-{LOSSES[loss]}", loss, f, rho), ETA)
              for loss in LOSSES for f in ROBUST
              for rho in (radii if radii is not None else radius_grid(f, n, points))]
    return frontier_runs + robust


@dataclass(frozen=True)
class _Cell:
    """One (world, world seed): the world, its evaluation prompts and mixtures."""

    name: str
    world_seed: int
    world: LinearWorld
    evaluation: Tensor | None
    mixtures: Tensor  # (A, 3): the world's evaluation mixtures


def _cell(name: str, world_seed: int, device: str | torch.device, dim: int) -> _Cell:
    """The world ``name`` with ``world_seed`` and its evaluation mixtures."""
    world, evaluation = world_variant(name, world_seed, device, dim)
    grid = mixture_grid(dtype=world.features.dtype, device=world.features.device)
    mixtures = grid[grid[:, 2] > 0] if WORLDS[name].held_out else grid
    return _Cell(name, world_seed, world, evaluation, mixtures)


def run(preset: str = "quick", *, device: str | torch.device = "cpu",
        memory_budget: int = DEFAULT_MEMORY_BUDGET, **settings: Any) -> pd.DataFrame:
    """Train every method online on alpha_0 in every world and evaluate it exactly.

    All (world, world seed) cells are fitted together, one batched fit per method and
    round (cells in chunks of at most ``memory_budget`` bytes of pairs).

    Args:
        preset: "quick" or "full" (see PRESETS).
        device: where the tensors live.
        memory_budget: bytes of pairs per batched fit.
        **settings: override entries of the preset (worlds, world_seeds, trials, rounds,
            pairs, dim, radii, grid_points, losses, families, scales, seed; scales is
            :func:`scale_sweep`'s).

    Returns:
        One row per (world, method, rule, rho, step, unit): columns world, world_seed, trial
        (the unit: world_seed * trials + trial, shared by every method of a world),
        method, loss, family, rule ("frontier" for the plain losses, "grid" for every
        radius, "validated" for the radius :func:`drosim.radius.validated_radius` chose on
        the cell's pilot batch), rho, step, trained (exact expected reward of the final
        policy under alpha_0), worst (its minimum over the world's evaluation mixtures) and
        protected (under objective 3 alone), under the world's evaluation prompts.
        ``attrs["uncertified"]`` lists the (method, rho) left out because the exact fit
        could not certify some trial (in any chunk of cells: then in every chunk).

    Raises:
        ValueError: an unknown preset, override or world.

    Example:
        >>> frame = run("quick", worlds=("unseen objective",), world_seeds=2, trials=1,
        ...             rounds=1, pairs=64, radii=(0.1, 1.0))
        >>> sorted(frame["rule"].unique())
        ['frontier', 'grid', 'validated']
    """
    config = resolve_preset(PRESETS, preset, settings)
    runs = [(method, step) for method, step in
            methods(config["radii"], config["pairs"], config["grid_points"])
            if method.loss in config["losses"] and method.family in ("none",
                                                                      *config["families"])]
    per_chunk = max(1, trials_per_chunk(config["pairs"], config["dim"],
                                        memory_budget=memory_budget)
                    // config["trials"])
    blocks, uncertified = [], set()
    with one_thread():
        cells = [_cell(name, seed, device, config["dim"]) for name in config["worlds"]
                 for seed in range(config["world_seeds"])]
        for start in range(0, len(cells), per_chunk):
            chunk = cells[start:start + per_chunk]
            grid_blocks = []
            for method, step in runs:
                try:
                    grid_blocks.append(_rows(chunk, method, step, config))
                except ValueError as error:
                    # The exact fits raise where they cannot certify a trial (seen at large
                    # chi-square radii): that radius is left out and named, not guessed.
                    if "could not be certified" not in str(error):
                        raise
                    uncertified.add((method.name, method.radius(config["pairs"])))
            blocks += grid_blocks + _validated_rows(chunk, pd.concat(grid_blocks), config)
    frame = pd.concat(blocks, ignore_index=True)
    dropped = pd.Series(list(zip(frame["method"], frame["rho"], strict=True))).isin(uncertified)
    frame = frame[~dropped.to_numpy() | (frame["rule"] == "validated").to_numpy()]
    frame = frame.reset_index(drop=True)
    frame.attrs["uncertified"] = sorted(uncertified)
    return frame


def _train(cells: list[_Cell], method: Method, step: float, config: dict[str, Any]
           ) -> Tensor:
    """``(cells, trials, d)`` the final policies of one method in every cell.

    Each cell draws from its own stream, keyed by (seed, world seed) and shared by every
    method, so round 1 sees the same pairs whatever the method: a unit is paired.
    """
    features = cells[0].world.features
    trials, n = config["trials"], config["pairs"]
    theta = features.new_zeros(len(cells), trials, cells[0].world.dim)
    alpha0 = torch.tensor(ALPHA_0).to(features)
    streams = [random_stream(config["seed"], c.world_seed, device=features.device)
               for c in cells]
    spec = method.spec(n)
    for _ in range(config["rounds"] if step > 0 else 0):
        pairs = [cell.world.sample_pairs(policies, n, alpha0, stream)
                 for cell, policies, stream in zip(cells, theta, streams, strict=True)]
        dphi = torch.cat([p.dphi for p in pairs])
        if method.loss == "rebel":
            w = rebel(dphi, torch.cat([p.dr for p in pairs]), spec).w
        else:
            w = dpo(dphi, torch.cat([p.pref for p in pairs]), method.beta, spec).w
        theta = theta + step * w.reshape(theta.shape)
    return theta


def _rows(cells: list[_Cell], method: Method, step: float, config: dict[str, Any]
          ) -> pd.DataFrame:
    """The rows of :func:`run` for one method on some cells."""
    theta = _train(cells, method, step, config)
    trials = config["trials"]
    frames = []
    for cell, policies in zip(cells, theta, strict=True):
        protected = torch.tensor([ALPHA_0, PROTECTED]).to(policies)
        trained, objective3 = cell.world.expected_reward(policies, protected,
                                                         cell.evaluation).T.cpu().numpy()
        worst = cell.world.expected_reward(policies, cell.mixtures, cell.evaluation).min(-1)
        frames.append(pd.DataFrame({
            "world": cell.name, "world_seed": cell.world_seed,
            "trial": cell.world_seed * trials + np.arange(trials),
            "method": method.name, "loss": method.loss, "family": method.family,
            "rule": "frontier" if method.family == "none" else "grid",
            "rho": method.radius(config["pairs"]), "step": step, "trained": trained,
            "worst": worst.values.cpu().numpy(), "protected": objective3}))
    return pd.concat(frames, ignore_index=True)


def _validated_rows(cells: list[_Cell], grid_rows: pd.DataFrame, config: dict[str, Any]
                    ) -> list[pd.DataFrame]:
    """Each robust method at the radius validated on its cell's pilot batch (rule
    "validated"): a copy of its grid rows at that radius.

    The pilot batch is as many pairs as training uses (rounds x pairs per round), drawn
    from the initial policy with its own random stream and grouped by annotator (the pairs
    record who scored them; one group in a world of one mixture);
    :func:`drosim.radius.validated_radius` picks among the grid's positive radii: the
    verdicts judge a robust method, so its rule chooses a ball, never radius 0 (the plain
    loss, which the grid keeps as the oracle's lower end).
    """
    features = cells[0].world.features
    alpha0 = torch.tensor(ALPHA_0).to(features)
    size = max(1, config["rounds"]) * config["pairs"]
    pilots = [c.world.sample_pairs(features.new_zeros(1, c.world.dim), size, alpha0,
                                   random_stream(config["seed"], c.world_seed, PILOT_STREAM,
                                                 device=features.device)) for c in cells]
    dphi = torch.cat([p.dphi for p in pilots])
    groups = torch.cat([p.annotator for p in pilots]).long()
    robust = grid_rows[grid_rows["rule"] == "grid"]
    keys = pd.DataFrame({"world": [c.name for c in cells],
                         "world_seed": [c.world_seed for c in cells]})
    blocks = []
    for (name, loss, family), rows in robust.groupby(["method", "loss", "family"], sort=False):
        target = torch.cat([p.dr if loss == "rebel" else p.pref for p in pilots])
        radii = np.sort(rows["rho"].unique())
        radii = radii[radii > 0]
        choice = validated_radius(dphi, target, groups, family, radii, loss=loss,
                                  seed=config["seed"])
        chosen = keys.assign(method=name, rho=choice.radius)
        blocks.append(rows.merge(chosen, on=["world", "world_seed", "method", "rho"])
                      .assign(rule="validated"))
    return blocks


def scale_sweep(preset: str = "quick", **settings: Any) -> pd.DataFrame:
    """chi-square-REBEL's gain over REBEL's frontier across dataset scales and dimensions.

    For each (pairs per round, d) of the preset's ``scales``, :func:`run` with REBEL and
    chi-square-REBEL only, in :data:`SCALE_WORLDS`; the gains are :func:`frontier_gain`'s.

    Args:
        preset: "quick" or "full".
        **settings: overrides of the preset, as for :func:`run` (worlds is fixed).

    Returns:
        :func:`frontier_gain`'s rows of the validated radius, with columns pairs, dim and
        uncertified (how many grid radii were left out, see :func:`run`).

    Example:
        >>> sweep = scale_sweep("quick", world_seeds=2, trials=1, rounds=1,
        ...                     radii=(0.1, 1.0), scales=((64, 4),))
        >>> sweep[["world", "method", "pairs", "dim"]].drop_duplicates().shape
        (2, 4)
    """
    config = resolve_preset(PRESETS, preset, settings)
    tables = []
    for pairs, dim in config["scales"]:
        frame = run(preset, **{**settings, "worlds": SCALE_WORLDS, "pairs": pairs, "dim": dim,
                               "losses": ("rebel",), "families": ("chi2",)})
        gains = frontier_gain(frame)
        tables.append(gains[gains["rule"] == "validated"].assign(
            pairs=pairs, dim=dim, uncertified=len(frame.attrs["uncertified"])))
    return pd.concat(tables, ignore_index=True)


def frontier(per_trial: pd.DataFrame, loss: str = "rebel") -> tuple[np.ndarray, np.ndarray]:
    """One loss's step-size frontier in one world: mean reward at alpha_0 and mean worst
    case per step.

    Args:
        per_trial: the rows of :func:`run` of one world.
        loss: "rebel" or "dpo".

    Returns:
        (trained, worst), sorted by trained, for :func:`numpy.interp`.
    """
    plain = per_trial[(per_trial["rule"] == "frontier") & (per_trial["loss"] == loss)]
    means = plain.groupby("step")[["trained", "worst"]].mean().sort_values("trained")
    return means["trained"].to_numpy(), means["worst"].to_numpy()


def frontier_gain(per_trial: pd.DataFrame, *, boots: int = 2000, level: float = 0.9,
                  seed: int = 0) -> pd.DataFrame:
    """How much each robust method gains, per world, against its plain loss and frontier.

    Units are paired (every method of a world starts unit u from the same random stream)
    and clustered (the trials of a world seed share the world), so the bootstrap resamples
    world seeds, each with all its trials, jointly for all methods, and refits the
    frontiers. Two intervals per figure: at ``level`` for one comparison, and at the
    Bonferroni level 1 - (1 - level) / k for the k comparisons of the row's rule in the
    world (columns ``*_adj``).

    Args:
        per_trial: the output of :func:`run`.
        boots: bootstrap resamples.
        level: confidence level of the per-comparison intervals.
        seed: the bootstrap's seed.

    Returns:
        One row per (world, robust method, rule, rho) (with its loss, family and step; for
        rule "validated" rho is the median chosen radius and rho_low / rho_high the range
        over world seeds): mean trained, worst and protected, vs_base (mean worst case minus
        the plain loss's at step eta), protected_vs_base (the same under objective 3) and
        gain (mean worst case minus the loss's frontier at the same mean reward under
        alpha_0), each with its intervals (columns *_low, *_high, *_low_adj, *_high_adj),
        comparisons (k) and seeds (clusters).

    Raises:
        ValueError: world seeds with unequal numbers of trials (the clusters must be equal).
    """
    tables = [_world_gain(rows, boots, level, seed).assign(world=world)
              for world, rows in per_trial.groupby("world", sort=False)]
    table = pd.concat(tables, ignore_index=True)
    return table[["world", *table.columns.drop("world")]]


def _world_gain(per_trial: pd.DataFrame, boots: int, level: float, seed: int) -> pd.DataFrame:
    """:func:`frontier_gain` for the rows of one world."""
    validated = per_trial["rule"] == "validated"
    # A validated method's radius varies by seed: one row per method, its range kept aside.
    radii = per_trial[validated].groupby("method")["rho"].agg(["median", "min", "max"])
    frame = per_trial.assign(rho=per_trial["rho"].where(~validated, 0.0))
    keys = ["method", "loss", "family", "rule", "rho", "step"]
    sizes = frame.groupby("world_seed")["trial"].nunique()
    if sizes.nunique() != 1:
        raise ValueError(f"every world seed needs the same number of trials, got {dict(sizes)}")
    values = {name: frame.pivot_table(index=keys, columns="trial", values=name)
              for name in ("trained", "worst", "protected")}
    labels = values["trained"].index.to_frame(index=False)
    seeds = len(sizes)
    # (rows, seeds): each seed's mean over its trials (columns are sorted by trial, seed-major)
    t, w, p = (v.to_numpy().reshape(len(labels), seeds, -1).mean(-1) for v in values.values())
    rng = np.random.default_rng(seed)
    picks = np.vstack([np.arange(seeds), rng.integers(seeds, size=(boots, seeds))])
    # (rows, 1 + boots): the first column is the data itself
    t, w, p = (x[:, picks].mean(-1) for x in (t, w, p))
    is_plain = (labels["rule"] == "frontier").to_numpy()
    at_eta = is_plain & np.isclose(labels["step"], ETA)
    robust = np.flatnonzero(~is_plain)
    table = labels.iloc[robust].reset_index(drop=True)
    # Each robust row against its own loss: the plain method at step eta, and its frontier.
    reference = np.array([np.flatnonzero(at_eta & (labels["loss"] == loss).to_numpy())[0]
                          for loss in table["loss"]])
    line = np.empty_like(t[robust])
    for loss in table["loss"].unique():
        mine = (table["loss"] == loss).to_numpy()
        on_frontier = is_plain & (labels["loss"] == loss).to_numpy()
        line[mine] = np.stack([np.interp(t[robust[mine], b], *_sorted(
            t[on_frontier, b], w[on_frontier, b])) for b in range(t.shape[1])], 1)
    for name, value in (("trained", t), ("worst", w), ("protected", p)):
        table[name] = value[robust, 0]
    table["comparisons"] = table.groupby("rule")["rule"].transform("size")
    table["seeds"] = seeds
    alphas = {"": np.full(len(table), 1 - level),
              "_adj": (1 - level) / table["comparisons"].to_numpy()}
    for name, value in (("vs_base", w[robust] - w[reference]),
                        ("protected_vs_base", p[robust] - p[reference]),
                        ("gain", w[robust] - line)):
        table[name] = value[:, 0]
        for suffix, alpha in alphas.items():
            table[f"{name}_low{suffix}"] = _row_quantile(value[:, 1:], alpha / 2)
            table[f"{name}_high{suffix}"] = _row_quantile(value[:, 1:], 1 - alpha / 2)
    chosen = table["rule"] == "validated"
    table.loc[chosen, "rho"] = table.loc[chosen, "method"].map(radii["median"])
    table["rho_low"] = table["rho"].where(~chosen, table["method"].map(radii["min"]))
    table["rho_high"] = table["rho"].where(~chosen, table["method"].map(radii["max"]))
    return table


def _row_quantile(draws: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``(rows,)`` the q[i] quantile of row i of ``draws`` (rows, boots), one level per row
    (numpy's linear interpolation between order statistics)."""
    ordered = np.sort(draws, 1)
    position = q * (draws.shape[1] - 1)
    below = np.floor(position).astype(int)
    above = np.minimum(below + 1, draws.shape[1] - 1)
    rows = np.arange(len(draws))
    fraction = position - below
    return ordered[rows, below] * (1 - fraction) + ordered[rows, above] * fraction


def _sorted(trained: np.ndarray, worst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The frontier's points sorted by reward under alpha_0, as numpy.interp needs them."""
    order = np.argsort(trained)
    return trained[order], worst[order]


def frontier_difference(per_trial: pd.DataFrame) -> pd.DataFrame:
    """The robust grid rows with ``gain``: each unit's worst case minus its loss's frontier
    at the method's mean reward under alpha_0 (per world), so its mean is frontier_gain's
    gain and its spread is the spread over units."""
    parts = []
    for _, rows in per_trial.groupby("world", sort=False):
        robust = rows[rows["rule"] == "grid"]
        mean_trained = robust.groupby(["method", "rho"])["trained"].transform("mean")
        line = np.empty(len(robust))
        for loss in robust["loss"].unique():
            mine = (robust["loss"] == loss).to_numpy()
            line[mine] = np.interp(mean_trained[mine], *frontier(rows, loss))
        parts.append(robust.assign(gain=robust["worst"] - line))
    return pd.concat(parts)


def statistics(per_trial: pd.DataFrame) -> pd.DataFrame:
    """Per-x statistics (:func:`drosim.stats.per_x_statistics`) behind the figure.

    Robust methods against x = rho (every grid radius): their worst case, protected reward
    and gain over their loss's frontier; REBEL and DPO against x = step: their worst case and
    protected reward. A column ``quantity`` says which, ``world`` which world.
    """
    robust = frontier_difference(per_trial)
    plain = per_trial[per_trial["rule"] == "frontier"]
    parts = [per_x_statistics(frame.assign(quantity=y, value=frame[y]), x, "value",
                              study="shift", by=("method", "world", "quantity"))
             for frame, x, ys in ((robust, "rho", ("worst", "protected", "gain")),
                                  (plain, "step", ("worst", "protected")))
             for y in ys]
    return pd.concat(parts, ignore_index=True)


def plot(per_trial: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """figures/shift.{png,pdf}: two rows of panels, one column per world.

    Top: each robust method's gain over its loss's step-size frontier against the radius
    (mean; shaded: 90% interval bootstrapped by world seed), a star at the validated radius
    (median over world seeds). Bottom: mean reward under alpha_0 against mean worst case,
    REBEL's frontier in black and DPO's in grey. One colour per method; the legend sits
    below the panels.

    Args:
        per_trial: the output of :func:`run`.
        out_dir: the folder to write to.

    Returns:
        The paths written.
    """
    worlds = list(dict.fromkeys(per_trial["world"]))
    gains = frontier_gain(per_trial, boots=500)
    fig = Figure(figsize=(4.2 * len(worlds), 8.5), layout="constrained")
    axes = fig.subplots(2, len(worlds), squeeze=False)
    for column, world in enumerate(worlds):
        top, bottom = axes[:, column]
        rows = per_trial[per_trial["world"] == world]
        for loss, name in LOSSES.items():
            bottom.plot(*frontier(rows, loss), "-", color=METHOD_COLOURS[name], lw=2)
        mine = gains[gains["world"] == world]
        for (name, loss), group in mine[mine["rule"] == "grid"].groupby(["method", "loss"]):
            colour, style = METHOD_COLOURS[name], "o-" if loss == "rebel" else "s--"
            top.plot(group["rho"], group["gain"], style, color=colour, ms=3)
            top.fill_between(group["rho"], group["gain_low"], group["gain_high"], color=colour,
                             alpha=0.15)
            bottom.plot(group["trained"], group["worst"], style, color=colour, lw=0.8, ms=3)
        chosen = mine[mine["rule"] == "validated"]
        for _, row in chosen.iterrows():  # one star per method
            top.plot(row["rho"], row["gain"], "*", color=METHOD_COLOURS[row["method"]], ms=11,
                     mec="k", mew=0.5)
        top.axhline(0.0, color="k", lw=1)
        # Linear below the smallest positive radius, so that radius 0 (the plain loss) shows.
        positive = mine.loc[mine["rho"] > 0, "rho"]
        top.set_xscale("symlog", linthresh=float(positive.min()) if len(positive) else 1.0)
        top.set_xlim(left=0.0)
        top.set_xlabel("radius ρ (Wasserstein: in units of dφ)")
        top.set_ylabel("worst case minus own loss's step frontier")
        seen = WORLDS[world].seen
        top.set_title(f"{world}\n(objective 3 {'seen' if seen else 'unseen'} in training)"
                      if seen is not None else f"{world}\n(not testable)", fontsize=10)
        bottom.set_xlabel("mean reward under the training mixture α0")
        bottom.set_ylabel("mean worst-case reward over the evaluation mixtures")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=METHOD_COLOURS[n], ls="-" if n.endswith("REBEL") else "--",
                      marker="o" if n.endswith("REBEL") else "s", label=n)
               for n in METHOD_COLOURS if n not in LOSSES.values()]
    handles += [Line2D([], [], color=METHOD_COLOURS[n], lw=2, label=f"{n} at step s·η "
                       "(its frontier)") for n in LOSSES.values()]
    handles += [Line2D([], [], color="grey", marker="*", ls="", ms=11,
                       label="radius validated on held-out training pairs"),
                Line2D([], [], color="grey", lw=6, alpha=0.3,
                       label="90% interval, bootstrapped by world seed")]
    fig.legend(handles=handles, loc="outside lower center", ncol=6, fontsize=8)
    fig.suptitle(f"C7 (linear world): online training on α0 = {ALPHA_0}, η = {ETA}; exact "
                 f"rewards; {per_trial['world_seed'].nunique()} world seeds × "
                 f"{per_trial.groupby('world_seed')['trial'].nunique().iloc[0]} trials per "
                 "world")
    return save_figure(fig, out_dir, "shift")
