"""The Monte-Carlo engine the studies share: sample pairs, fit every trial at once, score.

A study is a grid of settings (a world and a sample size n) crossed with a list of
methods. Each (setting, method) cell fits all its trials as one batched tensor program,
split into chunks of trials that fit a memory budget (:mod:`drosim.chunks`), and scores
every estimate by the squared parameter error of paper section 2,

    ||theta_hat - theta*||_Sigma^2,  theta* = world.reward_parameter(alpha_0),
    Sigma = E[dphi dphi^T] under the sampling policy pi_0 (theta = 0: uniform responses).

Randomness: the pairs of trial t come from block t // SAMPLE_BLOCK of the setting, drawn
with a generator of its own seeded by (seed, setting key, block). The numbers therefore
depend neither on the chunk size (the memory budget) nor on the method: every method of a
setting sees the same pairs (common random numbers make the differences between methods
less noisy), and the first T trials are the same whatever the total number of trials.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from drosim.chunks import chunk_slices, trials_per_chunk
from drosim.methods import Method, default_methods
from drosim.world import LinearWorld, PairBatch

__all__ = [
    "ALPHA_0",
    "SAMPLE_BLOCK",
    "SCHEDULES",
    "TEMPERATURE_SCHEDULES",
    "UNSCHEDULED",
    "Setting",
    "resolve_preset",
    "run_settings",
    "sample_trials",
    "schedule_of",
    "scheduled_methods",
    "sigma_error",
]

ALPHA_0 = (0.9, 0.1, 0.0)  # the training mixture: mostly objective 1, a little of 2
SAMPLE_BLOCK = 32  # trials drawn by one generator: the unit of randomness
SCHEDULES = {1.0: "c/n", 0.5: "c/sqrt(n)", 0.0: "fixed"}  # gamma -> label of rho_n
# gamma -> label of a growing temperature tau_n = c n^gamma (drosim.methods.Method)
TEMPERATURE_SCHEDULES = {1.0: "tau = c n", 0.5: "tau = c sqrt(n)"}
UNSCHEDULED = "none"  # plain means and fixed temperatures have no radius schedule


def schedule_of(method: Method) -> str:
    """The label of a method's radius (or temperature) schedule, "none" when it has none.

    Args:
        method: a method of :mod:`drosim.methods`.

    Returns:
        "c/n", "c/sqrt(n)", "fixed" (gamma = 1, 0.5, 0), "n^-<gamma>" for another gamma,
        "tau = c sqrt(n)", "tau = c n", "tau = c n^<gamma>" for a temperature growing with
        n (the tilt vanishes), or "none" for the plain means and a fixed temperature.
    """
    if method.family == "none" or (method.family == "kl_temperature" and method.gamma == 0):
        return UNSCHEDULED
    if method.family == "kl_temperature":
        return TEMPERATURE_SCHEDULES.get(method.gamma, f"tau = c n^{method.gamma:g}")
    return SCHEDULES.get(method.gamma, f"n^-{method.gamma:g}")


def scheduled_methods(c: float, gammas: Sequence[float] = tuple(SCHEDULES)) -> list[Method]:
    """The methods of the studies: the plain ones once, every robust one per schedule.

    The robust methods are those of :func:`drosim.methods.default_methods` plus
    "KL-DPO (ball)", DPO's loss over a KL ball (the constrained form of KL-DPO, whose
    radius can shrink with n, unlike the fixed temperature of "KL-DPO").

    Args:
        c: the radius constant of rho_n = c n^(-gamma).
        gammas: the decay exponents, one copy of each robust method per exponent.

    Returns:
        REBEL, DPO, KL-DPO (temperature 1), then the robust methods schedule by schedule.
    """
    plain = [m for m in default_methods() if schedule_of(m) == UNSCHEDULED]
    robust = [
        m
        for gamma in gammas
        for m in [*default_methods(gamma, c), Method("KL-DPO (ball)", "dpo", "kl", c, gamma)]
        if schedule_of(m) != UNSCHEDULED
    ]
    return plain + robust


@dataclass(frozen=True)
class Setting:
    """One point of a study's grid.

    Attributes:
        world: the world the pairs are drawn from (on the study's device).
        n: pairs per trial.
        key: integers naming the setting's random stream; settings with the same key
            (and seed) draw the same prompts, responses and noise.
        labels: the columns written on each of the setting's rows (e.g. study, n, d).
    """

    world: LinearWorld
    n: int
    key: tuple[int, ...]
    labels: dict[str, object]


def sample_trials(world: LinearWorld, n: int, trials: slice, stream: Sequence[int]) -> PairBatch:
    """The pairs of trials ``trials.start .. trials.stop - 1`` of a random stream.

    Draws the whole blocks of SAMPLE_BLOCK trials that cover the slice, each with its own
    generator, and cuts the slice out, so trial t's pairs do not depend on the slice.

    Args:
        world: the world; pairs come from the uniform policy theta = 0 scored under ALPHA_0.
        n: pairs per trial.
        trials: a slice with explicit start and stop.
        stream: the setting's stream, (seed, *key).

    Returns:
        A PairBatch with ``trials.stop - trials.start`` trials.
    """
    device = world.features.device
    first, last = trials.start // SAMPLE_BLOCK, -(-trials.stop // SAMPLE_BLOCK)
    policy = world.features.new_zeros(SAMPLE_BLOCK, world.dim)
    alpha = world.features.new_tensor(ALPHA_0)
    blocks = []
    for block in range(first, last):
        state = np.random.SeedSequence([*stream, block]).generate_state(1, np.uint64)[0]
        generator = torch.Generator(device=device).manual_seed(int(state))
        blocks.append(world.sample_pairs(policy, n, alpha, generator))
    offset = first * SAMPLE_BLOCK
    keep = slice(trials.start - offset, trials.stop - offset)
    return PairBatch(**{f.name: torch.cat([getattr(b, f.name) for b in blocks])[keep]
                        for f in fields(PairBatch)})


def sigma_error(estimate: Tensor, theta_star: Tensor, sigma: Tensor) -> Tensor:
    """||estimate - theta*||_Sigma^2 per trial: ``(T, d)`` -> ``(T,)``."""
    delta = estimate - theta_star
    return torch.einsum("td,de,te->t", delta, sigma, delta)


def run_settings(settings: Sequence[Setting], methods: Sequence[Method], trials: int, *,
                 seed: int, memory_budget: int, progress: bool, desc: str,
                 targets: Callable[[Method, LinearWorld], Tensor] | None = None
                 ) -> pd.DataFrame:
    """Fit every method on every setting's trials and score the estimates.

    Args:
        settings: the grid.
        methods: the methods, fitted on the same pairs within a setting.
        trials: Monte-Carlo trials per (setting, method).
        seed: the seed of every random stream.
        memory_budget: bytes one chunk of trials may use (drosim.chunks).
        progress: show a progress bar over the (setting, method) cells.
        desc: the progress bar's label.
        targets: optional (method, world) -> the method's own population target
            (e.g. :func:`drosim.studies.targets.own_target`); with it, every estimate is
            also scored against that target.

    Returns:
        One row per (setting, method, trial): the setting's labels, method, schedule,
        loss, family, trial, error (||theta_hat - theta*||_Sigma^2) and signal
        (||theta*||_Sigma^2); with ``targets``, also own_error
        (||theta_hat - theta_target||_Sigma^2) and bias (||theta_target - theta*||_Sigma^2).
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    names = [(m.name, schedule_of(m)) for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"two methods share a name and a schedule: {names}")
    frames = []
    bar = tqdm(total=len(settings) * len(methods), desc=desc, unit="cell",
               disable=not progress)
    for setting in settings:
        world = setting.world
        theta_star = world.reward_parameter(world.features.new_tensor(ALPHA_0))
        sigma = world.pair_covariance(world.features.new_zeros(world.dim))
        per_chunk = trials_per_chunk(setting.n, world.dim, memory_budget=memory_budget,
                                     itemsize=world.features.element_size())
        # Each chunk's pairs are drawn once and fitted by every method (sampling costs
        # about as much as a plain fit).
        estimates: list[list[Tensor]] = [[] for _ in methods]
        for chunk in chunk_slices(trials, per_chunk):
            pairs = sample_trials(world, setting.n, chunk, (seed, *setting.key))
            for fits, method in zip(estimates, methods, strict=True):
                fits.append(method.estimate(pairs))
        for fits, method in zip(estimates, methods, strict=True):
            estimate = torch.cat(fits)
            target = None if targets is None else targets(method, world)
            scores = {} if target is None else {
                "own_error": sigma_error(estimate, target, sigma).cpu().numpy(),
                "bias": float(sigma_error(target[None], theta_star, sigma)[0])}
            frames.append(pd.DataFrame({
                **setting.labels,
                "method": method.name,
                "schedule": schedule_of(method),
                "loss": method.loss,
                "family": method.family,
                "trial": np.arange(trials),
                "error": sigma_error(estimate, theta_star, sigma).cpu().numpy(),
                "signal": float(theta_star @ sigma @ theta_star),
                **scores,
            }))
            bar.update()
    bar.close()
    return pd.concat(frames, ignore_index=True)


def resolve_preset(presets: dict[str, dict[str, object]], preset: str,
                   overrides: dict[str, object]) -> dict[str, object]:
    """A study's configuration: the preset's keyword arguments updated by the overrides.

    Args:
        presets: the study's PRESETS.
        preset: "quick" or "full".
        overrides: keyword arguments that replace the preset's values.

    Returns:
        The merged configuration.

    Raises:
        ValueError: an unknown preset or an override the preset does not have.
    """
    if preset not in presets:
        raise ValueError(f"preset must be one of {tuple(presets)}, got {preset!r}")
    unknown = set(overrides) - set(presets[preset])
    if unknown:
        raise ValueError(f"unknown overrides {sorted(unknown)}; the study takes "
                         f"{sorted(presets[preset])}")
    return {**presets[preset], **overrides}
