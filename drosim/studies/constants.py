"""Claim C2's sharper constants: the error against the reward scale, REBEL against DPO.

REBEL regresses relative rewards with a squared loss whose curvature (2) does not depend on
the rewards; DPO fits Bradley-Terry labels with the logistic loss, whose curvature at the
truth, E[sigmoid'(<theta*, dphi>)], decays like exp(-reward scale) as the preferences
become nearly deterministic. The paper's bounds inherit 1 / curvature in their constants,
so DRO-DPO's error should grow with the reward scale while DRO-REBEL's does not.

The study fixes n and d and sweeps the reward scale of the world (every objective's norm;
the features, prompts, responses and noise stay the same: same seed, same random stream),
fitting each robust family with both losses under one radius schedule. Rows carry the raw
error ||theta_hat - theta*||_Sigma^2, the signal ||theta*||_Sigma^2 and their ratio
(relative_error), which compares estimators on the scale of what they estimate: REBEL's
observation noise has a fixed size, so its relative error falls like 1 / scale^2, whereas
DPO's label noise is part of the signal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from matplotlib.figure import Figure

from drosim.chunks import DEFAULT_MEMORY_BUDGET
from drosim.methods import Method
from drosim.plotting import ERROR_LABEL, FAMILY_COLOURS, draw_methods, save_figure
from drosim.stats import loglog_slope
from drosim.studies.montecarlo import (
    ALPHA_0,
    Setting,
    resolve_preset,
    run_settings,
    scheduled_methods,
)
from drosim.world import LinearWorld, make_world

__all__ = ["COLUMNS", "PRESETS", "LogisticCurvature", "default_pairs", "error_ratios",
           "logistic_curvature", "plot", "run", "slopes"]

PRESETS: dict[str, dict[str, object]] = {
    "quick": {"scales": (0.5, 1.0, 2.0, 4.0, 8.0), "n": 1024, "dim": 8, "trials": 40,
              "noise": 0.5, "c": 0.1, "gamma": 1.0},
    "full": {"scales": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0), "n": 4096, "dim": 8, "trials": 200,
             "noise": 0.5, "c": 0.1, "gamma": 1.0},
}

COLUMNS = ["method", "schedule", "loss", "family", "reward_scale", "n", "d", "trial", "error",
           "signal", "relative_error", "curvature", "asymptotic_ratio"]
QUANTITIES = ("error", "relative_error")
_FAMILY_NAMES = {"none": "plain (REBEL vs DPO)", "chi2": "chi2", "kl": "KL (ball)",
                 "wasserstein": "Wasserstein"}


def default_pairs(c: float, gamma: float) -> list[Method]:
    """REBEL and DPO, and each robust family with both losses, under rho_n = c n^-gamma.

    KL-DPO with a fixed temperature is left out: it has no REBEL twin, and its fixed
    temperature biases it (see the rates study), which would blur the constants.
    """
    return [m for m in scheduled_methods(c, (gamma,)) if m.family != "kl_temperature"]


class LogisticCurvature(NamedTuple):
    """How flat DPO's logistic loss is at the truth, exactly, under the uniform policy.

    Attributes:
        mean: E[sigmoid'(<theta*, dphi>)], the logistic loss's mean curvature (1/4 when
            the rewards are flat, smaller as they spread out).
        asymptotic_ratio: tr(Sigma I^-1) / (noise^2 d) with I = E[sigmoid'(<theta*, dphi>)
            dphi dphi^T] DPO's Fisher information: the large-n ratio of DPO's expected
            error to REBEL's, sigma^2 d / n (infinite without noise).
    """

    mean: float
    asymptotic_ratio: float


def logistic_curvature(world: LinearWorld) -> LogisticCurvature:
    """DPO's curvature at theta*, from every prompt and ordered pair (y, y') of the world.

    Args:
        world: the world; theta* is its reward parameter of ALPHA_0.

    Returns:
        The mean curvature and the asymptotic DPO / REBEL error ratio.
    """
    theta_star = world.reward_parameter(world.features.new_tensor(ALPHA_0))
    dphi = world.features.unsqueeze(2) - world.features.unsqueeze(1)  # (P, K, K, d)
    p = torch.sigmoid(dphi @ theta_star)
    curvature = p * (1 - p)
    information = torch.einsum("pab,pabd,pabe->de", curvature, dphi, dphi) / curvature.numel()
    sigma = world.pair_covariance(world.features.new_zeros(world.dim))
    constant = float(torch.trace(torch.linalg.solve(information, sigma))) / world.dim
    ratio = constant / world.noise**2 if world.noise > 0 else math.inf
    return LogisticCurvature(float(curvature.mean()), ratio)


def run(preset: str = "quick", *, methods: Sequence[Method] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET, device: str = "cpu", seed: int = 0,
        progress: bool = True, **overrides: object) -> pd.DataFrame:
    """Sweep the reward scale at fixed n and d.

    Args:
        preset: "quick" or "full" (see PRESETS).
        methods: the methods (default: default_pairs(c, gamma) with the preset's values).
        memory_budget: bytes one chunk of trials may use.
        device: where the worlds live and the fits run.
        seed: seeds the worlds and every random stream; the same seed gives the same frame.
        progress: show a progress bar over the (scale, method) cells.
        **overrides: replace preset values: scales, n, dim, trials, noise, c, gamma.

    Returns:
        One row per (method, reward_scale, trial), columns COLUMNS (curvature and
        asymptotic_ratio are the world's logistic_curvature); ``attrs["config"]`` holds
        the configuration.
    """
    config = resolve_preset(PRESETS, preset, overrides)
    methods = (list(methods) if methods is not None
               else default_pairs(config["c"], config["gamma"]))
    n, d = config["n"], config["dim"]
    settings = []
    for scale in config["scales"]:
        world = make_world(d, noise=config["noise"], reward_scale=scale, seed=seed,
                           device=device)
        # One stream for every scale: the same prompts, responses and noise throughout.
        curvature = logistic_curvature(world)
        settings.append(Setting(world, n, key=(n, d), labels={
            "reward_scale": scale, "n": n, "d": d, "curvature": curvature.mean,
            "asymptotic_ratio": curvature.asymptotic_ratio}))
    frame = run_settings(settings, methods, config["trials"], seed=seed,
                         memory_budget=memory_budget, progress=progress, desc="constants")
    frame["relative_error"] = frame["error"] / frame["signal"]
    frame = frame[COLUMNS]
    frame.attrs["config"] = config
    return frame


def slopes(frame: pd.DataFrame) -> pd.DataFrame:
    """Log-log slopes of the median raw and relative errors against the reward scale.

    Args:
        frame: the output of :func:`run`.

    Returns:
        One row per (method, schedule, quantity) with columns method, schedule, loss,
        family, quantity ("error" or "relative_error"), slope, low, high (90% bootstrap).
    """
    rows = []
    for (method, schedule), group in frame.groupby(["method", "schedule"], sort=False):
        for quantity in QUANTITIES:
            fit = loglog_slope(group, "reward_scale", quantity)
            rows.append({"method": method, "schedule": schedule,
                         "loss": group["loss"].iloc[0], "family": group["family"].iloc[0],
                         "quantity": quantity, "slope": fit.slope, "low": fit.low,
                         "high": fit.high})
    return pd.DataFrame(rows)


def error_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Median error of the DPO-loss method over its REBEL-loss twin, per family and scale.

    Args:
        frame: the output of :func:`run`.

    Returns:
        Columns family, reward_scale, ratio, curvature, asymptotic_ratio; one row per
        (family with both losses, scale).
    """
    medians = frame.groupby(["family", "loss", "reward_scale"])["error"].median().unstack("loss")
    ratios = (medians["dpo"] / medians["rebel"]).dropna().rename("ratio").reset_index()
    world = frame.groupby("reward_scale")[["curvature", "asymptotic_ratio"]].first()
    return ratios.merge(world, left_on="reward_scale", right_index=True)


def plot(frame: pd.DataFrame, out_dir: Path | str, *,
         slope_table: pd.DataFrame | None = None) -> list[Path]:
    """Draw constants.png and .pdf: errors and DPO/REBEL ratios against the reward scale.

    Left, the raw error; middle, the error relative to ||theta*||_Sigma^2 (both median and
    10-90% band, REBEL losses solid, DPO losses dashed, slopes in the legend); right, each
    family's median DPO / REBEL error ratio next to the large-n prediction from DPO's
    Fisher information.

    Args:
        frame: the output of :func:`run`.
        out_dir: the folder for the figures (created if missing).
        slope_table: the output of :func:`slopes`, computed here if not given.

    Returns:
        The paths written.
    """
    slope_table = slopes(frame) if slope_table is None else slope_table
    config = frame.attrs.get("config", {})
    fig = Figure(figsize=(18, 6.4), layout="constrained")
    raw, relative, ratio = fig.subplots(1, 3)
    for ax, quantity in ((raw, "error"), (relative, "relative_error")):
        draw_methods(ax, frame, "reward_scale", quantity,
                     slope_table[slope_table["quantity"] == quantity])
        ax.set_xlabel("reward scale (sd of a reward under the uniform policy)")
        # Below the axes: the bands of both losses fill the panel.
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    raw.set_ylabel(ERROR_LABEL)
    raw.set_title("raw error")
    relative.set_ylabel(r"$\|\hat\theta - \theta^*\|_\Sigma^2 \,/\, \|\theta^*\|_\Sigma^2$")
    relative.set_title("error relative to the signal")

    ratios = error_ratios(frame)
    for family, group in ratios.groupby("family", sort=False):
        ratio.plot(group["reward_scale"], group["ratio"], "o-", ms=3.5,
                   label=_FAMILY_NAMES[family], color=FAMILY_COLOURS[family])
    theory = ratios.groupby("reward_scale")["asymptotic_ratio"].first()
    ratio.plot(theory.index, theory.to_numpy(), ":", color="0.3", lw=1.5,
               label=r"large-n prediction $\mathrm{tr}(\Sigma I^{-1}) / (\sigma^2 d)$, "
                     "I = DPO's Fisher information")
    ratio.set_xscale("log", base=2)
    ratio.set_yscale("log")
    ratio.grid(True, which="major", alpha=0.3)
    ratio.set_xlabel("reward scale")
    ratio.set_ylabel("median error, DPO loss / REBEL loss")
    ratio.set_title("DPO / REBEL error ratio per ambiguity family")
    ratio.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"Error against the reward scale at n = {frame['n'].iloc[0]}, d = {frame['d'].iloc[0]}:"
        f" median and 10-90% band over {frame['trial'].nunique()} trials"
        + (f" (REBEL noise {config['noise']}, radius rho_n = {config['c']} n^-{config['gamma']:g})"
           if config else ""))
    return save_figure(fig, out_dir, "constants")
