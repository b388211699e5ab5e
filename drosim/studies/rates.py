"""Rates of the squared parameter error in n and in d (paper claims C2, C3 and C4).

Two sweeps of the linear world (paper section 2), each fitting every method on the same
Monte-Carlo trials:

* study "n": the number of pairs n over a doubling grid (2^7 .. 2^14 in "full") at a fixed
  dimension d;
* study "d": the dimension d over a doubling grid (2 .. 64 in "full") at a fixed n.

The error is ||theta_hat - theta*||_Sigma^2 with theta* the reward parameter of the
training mixture ALPHA_0 and Sigma = E[dphi dphi^T] under the uniform sampling policy
(:mod:`drosim.studies.montecarlo`). Least squares in a well-specified world with noise
sigma has error about sigma^2 d / n, so the parametric ("fast") rate is a slope of -1 in n
and +1 in d on log-log axes; the slow rate sqrt(d / n) is a slope of -1/2 in n.

Slopes in n are fitted to medians, slopes in d to means (drosim.stats.loglog_slope). The
error of least squares is about sigma^2 / n times a chi-square with d degrees of freedom:
its mean is exactly proportional to d, while its median is 31% below the mean at d = 2,
16% at d = 4 and 1% at d = 32, so medians would read a slope in d above +1 on grids that
start small (about +1.10 on d = 2 .. 64). Along n the shape of that distribution does not
change, and the median is the more robust statistic.

The methods are REBEL, DPO and KL-DPO with a fixed temperature, plus every robust method
under each radius schedule rho_n = c / n, c / sqrt(n) and a fixed rho = c
(:func:`drosim.studies.montecarlo.scheduled_methods`). The DPO-loss methods with a fixed
radius are the slow ones: with noisy preferences their minimiser sits at or near w = 0, a
kink of the robust objective where the Newton solver of drosim.estimators runs to its
iteration cap (about 20-60 times the cost of the others); the paper checks leave them out.

Finite worlds (:func:`run_worlds`, :func:`exact_bias`). In the Gaussian world above the
noise is independent of dphi, so a chi-square or KL ball leaves REBEL's population target at
theta* at every radius and its rates are those of least squares. The finite worlds of
:mod:`drosim.studies.coverage` ("skewed": noise whose skew follows dphi; "misspecified": a
reward the features cannot express) make the residual at theta* depend on dphi, and there the
balls move the target: theta^rho - theta* is of order sqrt(rho), so the squared bias
||theta^rho - theta*||_Sigma^2 is of order rho. A sample is its Multinomial(n, P) vector of
atom counts, and fits and population targets are exact weighted fits on the atoms
(:func:`drosim.studies.atoms.robust_fit`), so n costs nothing: the bias curve needs only P
and is followed to n = 2^32. The radii are the covering ones: c / sqrt(n) (C2) and q / n with
q the 90% quantile of chi^2_{S-1} / 2 (C3), since n D(P || P_n) -> chi^2_{S-1} / 2 for both
divergences on S atoms; this needs every atom seen (n >= S at least), and no f-divergence
ball around P_n ever holds a continuous P.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy.stats import chi2 as chi2_law
from torch import Tensor

from drosim.chunks import DEFAULT_MEMORY_BUDGET
from drosim.methods import Method
from drosim.plotting import (
    ERROR_LABEL,
    FAMILY_COLOURS,
    draw_methods,
    draw_power_law,
    draw_ratios,
    save_figure,
    slope_label,
)
from drosim.stats import loglog_slope
from drosim.studies import coverage
from drosim.studies._common import one_thread
from drosim.studies.atoms import Outcomes, robust_fit
from drosim.studies.montecarlo import (
    SCHEDULES,
    TEMPERATURE_SCHEDULES,
    UNSCHEDULED,
    Setting,
    resolve_preset,
    run_settings,
    scheduled_methods,
    sigma_error,
)
from drosim.world import LinearWorld, make_world

__all__ = ["CLAIMED_EXPONENT", "COLUMNS", "EXACT_COLUMNS", "FINITE_FAMILIES", "PRESETS",
           "TARGET_COLUMNS", "WORLD_COLUMNS", "WORLD_PRESETS", "WORLD_SLOPE_COLUMNS",
           "covering_radii", "exact_bias", "local_exponents", "plot", "plot_worlds", "run",
           "run_worlds", "slopes", "world_slopes"]

_DOUBLINGS_N = tuple(2**k for k in range(7, 15))  # 128 .. 16384
_DOUBLINGS_D = tuple(2**k for k in range(1, 7))  # 2 .. 64

PRESETS: dict[str, dict[str, object]] = {
    "quick": {
        "n_grid": _DOUBLINGS_N[:5], "dim": 8,  # study "n": n over n_grid at d = dim
        # study "d": d over d_grid at n = samples; d = 2 left out (see the note on medians)
        "d_grid": _DOUBLINGS_D[1:5], "samples": 1024,
        "trials": 48, "noise": 0.5, "reward_scale": 1.0, "c": 0.1,
    },
    "full": {
        "n_grid": _DOUBLINGS_N, "dim": 8,
        "d_grid": _DOUBLINGS_D, "samples": 4096,
        "trials": 200, "noise": 0.5, "reward_scale": 1.0, "c": 0.1,
    },
}

COLUMNS = ["study", "method", "schedule", "loss", "family", "n", "d", "trial", "error",
           "signal"]
# Added by run(targets=...): the error to each method's own population target and that
# target's squared distance to theta* (drosim.studies.targets).
TARGET_COLUMNS = ["own_error", "bias"]
_GRID = {"n": "n", "d": "d"}  # study -> the column it varies
STATISTIC = {"n": "median", "d": "mean"}  # study -> the statistic its slope is fitted to
_RADIUS_TITLES = {UNSCHEDULED: "no radius", "fixed": "fixed rho = c"}
# Colours for further methods of a family already drawn in a panel (e.g. two temperatures).
_SPARE_COLOURS = ("C9", "C6", "C8", "C5", "C7")


def run(preset: str = "quick", *, methods: Sequence[Method] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET, device: str = "cpu", seed: int = 0,
        progress: bool = True,
        targets: Callable[[Method, LinearWorld], Tensor] | None = None,
        **overrides: object) -> pd.DataFrame:
    """Run both sweeps.

    Args:
        preset: "quick" or "full" (see PRESETS).
        methods: the methods to fit (default: scheduled_methods(c) with the preset's c).
        memory_budget: bytes one chunk of trials may use.
        device: where the worlds live and the fits run.
        seed: seeds the worlds and every random stream; the same seed gives the same frame.
        progress: show a progress bar over the (setting, method) cells.
        targets: optional (method, world) -> the method's own population target
            (:func:`drosim.studies.targets.own_target`); adds the TARGET_COLUMNS.
        **overrides: replace preset values: n_grid, dim, d_grid, samples, trials, noise,
            reward_scale, c. An empty n_grid or d_grid skips that study.

    Returns:
        One row per (study, method, schedule, n, d, trial), columns COLUMNS (signal is
        ||theta*||_Sigma^2), then TARGET_COLUMNS with ``targets``; ``attrs["config"]``
        holds the configuration.
    """
    config = resolve_preset(PRESETS, preset, overrides)
    methods = list(methods) if methods is not None else scheduled_methods(config["c"])

    def setting(study: str, n: int, d: int) -> Setting:
        world = make_world(d, noise=config["noise"], reward_scale=config["reward_scale"],
                           seed=seed, device=device)
        # The stream is keyed by (n, d) only: the two studies share the point they have
        # in common, and every method of a setting sees the same pairs.
        return Setting(world, n, key=(n, d), labels={"study": study, "n": n, "d": d})

    settings = [setting("n", n, config["dim"]) for n in config["n_grid"]]
    settings += [setting("d", config["samples"], d) for d in config["d_grid"]]
    frame = run_settings(settings, methods, config["trials"], seed=seed,
                         memory_budget=memory_budget, progress=progress, desc="rates",
                         targets=targets)
    frame = frame[COLUMNS + (TARGET_COLUMNS if targets is not None else [])]
    frame.attrs["config"] = config
    return frame


def slopes(frame: pd.DataFrame, y: str = "error") -> pd.DataFrame:
    """The log-log slope of the median error in n (study "n") or of the mean error in d
    (study "d"; see the module note).

    Args:
        frame: the output of :func:`run`.
        y: the error column: "error" (to theta*) or "own_error" (to the own target).

    Returns:
        One row per (method, schedule, study) with columns method, schedule, study, slope,
        low, high (a 90% bootstrap interval over trials, drosim.stats.loglog_slope).
    """
    rows = []
    for (study, method, schedule), group in frame.groupby(["study", "method", "schedule"],
                                                          sort=False):
        fit = loglog_slope(group, _GRID[study], y, statistic=STATISTIC[study])
        rows.append({"method": method, "schedule": schedule, "study": study,
                     "slope": fit.slope, "low": fit.low, "high": fit.high})
    return pd.DataFrame(rows, columns=["method", "schedule", "study", "slope", "low", "high"])


def plot(frame: pd.DataFrame, out_dir: Path | str, *, slope_table: pd.DataFrame | None = None,
         prefix: str = "rate", own_slopes: pd.DataFrame | None = None) -> list[Path]:
    """Draw ``<prefix>_n`` and ``<prefix>_d`` (PNG and PDF), one figure per study.

    One panel per (loss, radius or temperature schedule): REBEL-type methods on the top
    row, DPO-type below, and the plain methods (no radius, fixed temperatures) repeated in
    every panel of their row. Each method shows its median error with the band of its
    trials' 10% to 90% quantiles and its fitted slope in the legend; the reference lines d/n
    and sqrt(d/n) pass through the median of the row's plain baseline (REBEL or DPO) at the
    first grid point. With the TARGET_COLUMNS (``run(targets=...)``), a method whose own
    target is not theta* also gets a dashed line at ||theta_target - theta*||_Sigma^2, the
    level its error to theta* cannot fall below.

    Args:
        frame: the output of :func:`run`.
        out_dir: the folder for the figures (created if missing).
        slope_table: the output of :func:`slopes`, computed here if not given.
        prefix: the start of the file names.
        own_slopes: ``slopes(frame, "own_error")``; a target line's legend entry then
            gives the slope of the error to that target.

    Returns:
        The paths written.
    """
    slope_table = slopes(frame) if slope_table is None else slope_table
    config = frame.attrs.get("config", {})
    colours = _colours(frame)
    paths = []
    for study, group in frame.groupby("study", sort=False):
        x = _GRID[study]
        fixed = "d" if study == "n" else "n"
        rows = [(loss, _schedules(group[group["loss"] == loss]))
                for loss in ("rebel", "dpo") if loss in set(group["loss"])]
        columns = max(len(schedules) for _, schedules in rows)
        # Wide enough for the title when there is a single panel; the legends sit below
        # the panels, so each row is taller than its axes.
        # Under each row of error panels, a row of paired ratios to the plain baseline:
        # robust curves that sit on the baseline's are told apart there.
        fig = Figure(figsize=(max(5.6 * columns, 8.5), 9.4 * len(rows)), layout="constrained")
        grid = fig.subplots(2 * len(rows), columns, squeeze=False,
                            gridspec_kw={"height_ratios": [2.4, 1] * len(rows)})
        for row, (loss, schedules) in enumerate(rows):
            of_loss = group[group["loss"] == loss]
            baseline = of_loss[of_loss["family"] == "none"]
            for ax in [*grid[2 * row, len(schedules):], *grid[2 * row + 1, len(schedules):]]:
                ax.set_visible(False)
            for ratio_ax, schedule in zip(grid[2 * row + 1], schedules, strict=False):
                shown = of_loss[of_loss["schedule"].isin([UNSCHEDULED, schedule])]
                if not baseline.empty:
                    draw_ratios(ratio_ax, shown, x, "error", baseline["method"].iloc[0],
                                colours)
                ratio_ax.set_xlabel(x)
            for ax, schedule in zip(grid[2 * row], schedules, strict=False):
                shown = of_loss[of_loss["schedule"].isin([UNSCHEDULED, schedule])]
                draw_methods(ax, shown, x, "error", slope_table[slope_table["study"] == study],
                             colours)
                if "bias" in shown:
                    _draw_targets(ax, shown, x, colours, own_slopes, study)
                if not baseline.empty:
                    _draw_references(ax, baseline, x)
                ax.set_title(f"{'REBEL' if loss == 'rebel' else 'DPO'} losses, "
                             f"{_panel_title(schedule)}")
                ax.set_xlabel(f"{x}   ({fixed} = {group[fixed].iloc[0]})")
                ax.set_ylabel(ERROR_LABEL)
                ax.text(0.99, 0.99, "bands: 10-90% of trials", transform=ax.transAxes,
                        ha="right", va="top", fontsize=7, color="0.3")
                ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.13),
                          frameon=False)
        fig.suptitle(
            f"Squared parameter error against {x}\nmedian and 10-90% band over "
            f"{group['trial'].nunique()} trials{_settings_text(config)}")
        paths += save_figure(fig, out_dir, f"{prefix}_{study}")
    return paths


def _panel_title(schedule: str) -> str:
    """A panel's schedule in words: "no radius", "rho_n = c/n", "temperature tau = c n"."""
    if schedule in TEMPERATURE_SCHEDULES.values():
        return f"temperature {schedule}"
    return _RADIUS_TITLES.get(schedule, f"rho_n = {schedule}")


def _colours(frame: pd.DataFrame) -> dict[str, str]:
    """Method -> colour: a family's first method keeps its colour, the others get spares.

    Methods of one family and loss share a panel when their schedule is "none" or theirs
    (two fixed temperatures and a growing one, say), so distinct names get distinct colours.
    """
    colours, spare = {}, itertools.cycle(_SPARE_COLOURS)
    for (family, _), names in frame.groupby(["family", "loss"], sort=False)["method"]:
        first, *others = names.unique()
        colours[first] = FAMILY_COLOURS[family]
        colours.update({name: next(spare) for name in others})
    return colours


def _draw_targets(ax: object, shown: pd.DataFrame, x: str, colours: dict[str, str],
                  own_slopes: pd.DataFrame | None, study: str) -> None:
    """A dashed line at ||theta_target - theta*||_Sigma^2 per method whose target is not
    theta* (horizontal in n; in d the world, and so the target, changes with d)."""
    for method, rows in shown[shown["bias"] > 0].groupby("method", sort=False):
        level = rows.groupby(x)["bias"].first()
        label = f"own target of {method}"
        fit = None if own_slopes is None else own_slopes[
            (own_slopes["method"] == method) & (own_slopes["study"] == study)]
        if fit is not None and not fit.empty:
            row = fit.iloc[0]
            label += "; " + slope_label("error to it", row["slope"], row["low"], row["high"])
        ax.plot(level.index, level.to_numpy(), ls=(0, (7, 3)), lw=1.1, color=colours[method],
                label=label)


def _settings_text(config: dict[str, object]) -> str:
    """The world's noise and scale and the radius constant, for a title ("" if unknown)."""
    if not config:
        return ""
    return (f" (noise {config['noise']}, reward scale {config['reward_scale']}, radius "
            f"constant c = {config['c']})")


def _schedules(frame: pd.DataFrame) -> list[str]:
    """The schedules present among frame's robust methods: radii in SCHEDULES order, then
    temperatures in TEMPERATURE_SCHEDULES order."""
    present = set(frame["schedule"])
    known = (*SCHEDULES.values(), *TEMPERATURE_SCHEDULES.values())
    return [s for s in known if s in present] or [UNSCHEDULED]


def _draw_references(ax: object, baseline: pd.DataFrame, x: str) -> None:
    """d/n and sqrt(d/n) as functions of x, through the baseline's first median."""
    grid = np.sort(baseline[x].unique())
    first = float(baseline.loc[baseline[x] == grid[0], "error"].median())
    sign = -1.0 if x == "n" else 1.0  # d/n falls in n and grows in d
    draw_power_law(ax, grid, (grid[0], first), sign, "d/n", ":")
    draw_power_law(ax, grid, (grid[0], first), sign / 2, "sqrt(d/n)", "-.")


# Finite worlds: where the chi-square and KL balls move REBEL's target (module note).

FINITE_FAMILIES = ("chi2", "kl")
SLOW_RADIUS, FAST_RADIUS = "c/sqrt(n)", "q/n"  # the covering schedules of C2 and C3
# n of the exact bias curves: 2^8 .. 2^32 every 4x (one fit per radius, no sampling).
_EXACT_SIZES = tuple(4**k for k in range(4, 17))
WORLD_PRESETS: dict[str, dict[str, object]] = {
    "quick": {"sizes": tuple(2**k for k in range(8, 17)), "trials": 24,
              "worlds": ("skewed", "misspecified"), "c": 1.0, "level": 0.9,
              "exact_sizes": _EXACT_SIZES, "seed": 0},
    "full": {"sizes": tuple(2**k for k in range(7, 25)), "trials": 400,
             "worlds": ("skewed", "misspecified"), "c": 1.0, "level": 0.9,
             "exact_sizes": _EXACT_SIZES, "seed": 0},
}
CLAIMED_EXPONENT = {SLOW_RADIUS: -0.5, FAST_RADIUS: -1.0}  # of the squared error
WORLD_COLUMNS = ["world", "method", "family", "schedule", "n", "trial", "rho", "error",
                 "bias", "covered"]
EXACT_COLUMNS = ["world", "method", "family", "schedule", "n", "rho", "bias", "exponent"]
WORLD_SLOPE_COLUMNS = ["world", "method", "family", "schedule", "n_min", "n_max",
                       "coverage_n_min", "coverage_n_max", "slope", "low", "high",
                       "exact_slope"]


def covering_radii(atoms: int, c: float, level: float) -> dict[str, tuple[float, float]]:
    """The covering radius schedules rho_n = a n^(-gamma), as label -> (a, gamma).

    n D(P || P_n) -> chi^2_{S-1} / 2 for the chi-square and the KL divergence on S atoms
    (:mod:`drosim.studies.coverage`), so q / n with q the ``level`` quantile of that law
    covers P with probability -> level (C3's radius), and c / sqrt(n) covers it with
    probability -> 1 (C2's radius).

    Args:
        atoms: S, the number of atoms the estimator sees.
        c: the constant of c / sqrt(n).
        level: the asymptotic coverage of q / n.

    Returns:
        {"c/sqrt(n)": (c, 0.5), "q/n": (q, 1.0)}.
    """
    return {SLOW_RADIUS: (c, 0.5), FAST_RADIUS: (float(chi2_law.ppf(level, atoms - 1)) / 2, 1.0)}


def local_exponents(n: np.ndarray, values: np.ndarray) -> np.ndarray:
    """d log(values) / d log(n), by centred differences (one-sided at the ends).

    Args:
        n: ``(K,)`` increasing sizes.
        values: ``(K,)`` positive values at those sizes.

    Returns:
        ``(K,)`` the local exponents; NaN where a value is at rounding level
        (<= coverage.IDLE_BIAS: no curve to differentiate).

    Raises:
        ValueError: fewer than two sizes.

    Example:
        >>> import numpy as np
        >>> local_exponents(np.array([1.0, 2.0, 4.0]), np.array([1.0, 0.5, 0.25]))
        array([-1., -1., -1.])
    """
    if len(n) < 2:
        raise ValueError(f"a local exponent needs at least two sizes, got {len(n)}")
    exponents = np.gradient(np.log(np.maximum(values, coverage.IDLE_BIAS)), np.log(n))
    return np.where(values > coverage.IDLE_BIAS, exponents, np.nan)


def _method(family: str) -> str:
    """REBEL's name with the family's prefix: "REBEL", "chi2-REBEL", "KL-REBEL"."""
    return f"{coverage.FAMILY_NAMES[family]}REBEL"


def _population(name: str) -> tuple[LinearWorld, Tensor, Tensor, Outcomes]:
    """The finite world ``name``, its Sigma ``(d, d)``, theta* ``(d,)`` (REBEL's rho = 0
    population fit) and the law of (dphi, dr) REBEL sees."""
    world, laws = coverage.world_outcomes(name)
    sigma = world.pair_covariance(world.features.new_zeros(world.dim))
    theta_star = coverage.targets(laws.rebel, "rebel", "none", sigma.new_zeros(1))[0]
    return world, sigma, theta_star, laws


def exact_bias(world: str, sizes: Sequence[int], c: float, level: float) -> pd.DataFrame:
    """The exact squared bias ||theta^{rho_n} - theta*||_Sigma^2 of chi2- and KL-REBEL under
    both covering schedules, and its local exponent in n.

    theta^{rho_n} is the population robust fit at radius rho_n, exact from the atom
    weights of P: no sampling, so n can reach 2^32 and beyond.

    Args:
        world: a finite world, a key of ``coverage.WORLDS``.
        sizes: ``(K,)`` increasing n, K >= 2.
        c: the constant of c / sqrt(n).
        level: the asymptotic coverage of q / n (:func:`covering_radii`).

    Returns:
        One row per (family, schedule, n), columns EXACT_COLUMNS; the exponent is NaN
        where the ball does not act (bias at rounding level).
    """
    _, sigma, theta_star, laws = _population(world)
    n = np.asarray(sizes, dtype=np.float64)
    blocks = []
    for family in FINITE_FAMILIES:
        for schedule, (a, gamma) in covering_radii(laws.rebel.size, c, level).items():
            rho = torch.from_numpy(a * n ** -gamma)
            target = coverage.targets(laws.rebel, "rebel", family, rho)
            bias = sigma_error(target, theta_star, sigma).numpy()
            blocks.append(pd.DataFrame({
                "world": world, "method": _method(family), "family": family,
                "schedule": schedule, "n": np.asarray(sizes), "rho": rho.numpy(),
                "bias": bias, "exponent": local_exponents(n, bias)}))
    return pd.concat(blocks, ignore_index=True)[EXACT_COLUMNS]


def _frequencies(probs: Tensor, n: int, trials: int, keys: tuple[int, ...]) -> Tensor:
    """``(trials, J)`` outcome frequencies of Multinomial(n, probs) samples, from the
    random stream of ``keys``."""
    rng = np.random.default_rng(np.random.SeedSequence(list(keys)))
    weights = probs.numpy() / float(probs.sum())
    return torch.from_numpy(rng.multinomial(n, weights, size=trials) / n)


def run_worlds(preset: str = "quick", **overrides: object) -> pd.DataFrame:
    """REBEL, chi2-REBEL and KL-REBEL under the covering radii in the finite worlds.

    Per trial a sample of n pairs is drawn as its outcome counts, and each method is the
    exact weighted fit on the atoms; the error is ||theta_hat - theta*||_Sigma^2.

    Args:
        preset: "quick" or "full" (see WORLD_PRESETS).
        **overrides: replace preset values: sizes, trials, worlds, c, level, exact_sizes,
            seed.

    Returns:
        One row per (world, method, schedule, n, trial), columns WORLD_COLUMNS: rho (0 for
        REBEL, schedule "none"), the error, the exact squared bias of the schedule's target
        at that n, and whether P lies in the ball around P_n (never for REBEL);
        ``attrs["config"]`` holds the configuration.

    Raises:
        ValueError: an unknown preset or override.
    """
    config = resolve_preset(WORLD_PRESETS, preset, overrides)
    trials, sizes = config["trials"], config["sizes"]
    n = torch.tensor(sizes, dtype=torch.float64)
    blocks = []
    with one_thread():
        for index, world in enumerate(config["worlds"]):
            _, sigma, theta_star, laws = _population(world)
            support = laws.rebel
            freq = torch.cat([support.weights(_frequencies(laws.probs, size, trials,
                                                           (config["seed"], index, size)))
                              for size in sizes])
            divergence = coverage.divergences(support.probs, freq)
            schedules = covering_radii(support.size, config["c"], config["level"])
            cells = [("none", UNSCHEDULED, (0.0, 0.0))] + [
                (family, schedule, radius) for family in FINITE_FAMILIES
                for schedule, radius in schedules.items()]
            for family, schedule, (a, gamma) in cells:
                rho = a * n ** -gamma
                target = (theta_star.expand(len(sizes), -1) if family == "none" else
                          coverage.targets(support, "rebel", family, rho))
                per_trial = rho.repeat_interleave(trials)
                estimates = robust_fit(support.atoms, freq, per_trial, "rebel", family)
                covered = (torch.zeros_like(per_trial, dtype=torch.bool) if family == "none"
                           else divergence[family] <= per_trial)
                blocks.append(pd.DataFrame({
                    "world": world, "method": _method(family), "family": family,
                    "schedule": schedule, "n": np.repeat(sizes, trials),
                    "trial": np.tile(np.arange(trials), len(sizes)),
                    "rho": per_trial.numpy(),
                    "error": sigma_error(estimates, theta_star, sigma).numpy(),
                    "bias": sigma_error(target, theta_star, sigma).repeat_interleave(
                        trials).numpy(),
                    "covered": covered.numpy()}))
    frame = pd.concat(blocks, ignore_index=True)[WORLD_COLUMNS]
    frame.attrs["config"] = config
    return frame


def world_slopes(frame: pd.DataFrame, boots: int = 200) -> pd.DataFrame:
    """The slope of the median error in n on each schedule's covered range, beside the
    exact bias's slope on the same range.

    The covered range runs from the first n where P lies in the ball in at least
    coverage.COVERED (50%) of the trials; REBEL, which has no ball, keeps every n. A
    schedule covered at fewer than two sizes gets every n (its coverage columns say so).

    Args:
        frame: the output of :func:`run_worlds`.
        boots: bootstrap resamples of each slope's 90% interval.

    Returns:
        One row per (world, method, schedule), columns WORLD_SLOPE_COLUMNS; exact_slope is
        the secant slope of log bias between n_min and n_max (NaN for REBEL).
    """
    rows = []
    keys = ["world", "method", "family", "schedule"]
    for key, group in frame.groupby(keys, sort=False):
        part = group if key[2] == "none" else _covered_range(group)
        first, last = part["n"].min(), part["n"].max()
        fit = loglog_slope(part, "n", "error", boots=boots)
        bias = part.groupby("n")["bias"].first()
        exact = (math.log(bias[last] / bias[first]) / math.log(last / first)
                 if key[2] != "none" else math.nan)
        rows.append({**dict(zip(keys, key, strict=True)), "n_min": first, "n_max": last,
                     "coverage_n_min": part.loc[part["n"] == first, "covered"].mean(),
                     "coverage_n_max": part.loc[part["n"] == last, "covered"].mean(),
                     "slope": fit.slope, "low": fit.low, "high": fit.high,
                     "exact_slope": exact})
    return pd.DataFrame(rows, columns=WORLD_SLOPE_COLUMNS)


def _covered_range(group: pd.DataFrame) -> pd.DataFrame:
    """The rows of one schedule from the first n covered in >= 50% of trials on, or all
    rows when fewer than two sizes are left."""
    by_n = group.groupby("n")["covered"].mean()
    covered = by_n.index[by_n >= coverage.COVERED]
    part = group[group["n"] >= covered.min()] if len(covered) else group
    return part if part["n"].nunique() >= 2 else group


def plot_worlds(frame: pd.DataFrame, exact: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """``rate_worlds`` (PNG and PDF): one row per finite world, one column per covering
    schedule. Each panel shows the median error of chi2- and KL-REBEL with its 10-90% band,
    REBEL's (no ball) in black, and dotted the exact bias ||theta^{rho_n} - theta*||^2 out to
    the largest exact n, with the claimed rate (n^(-1/2) for C2, n^(-1) for C3) through its
    last point.

    Args:
        frame: the output of :func:`run_worlds`.
        exact: :func:`exact_bias` of the same worlds.
        out_dir: the folder for the figures (created if missing).

    Returns:
        The paths written.
    """
    worlds = list(dict.fromkeys(frame["world"]))
    schedules = (SLOW_RADIUS, FAST_RADIUS)
    fig = Figure(figsize=(12, 4.6 * len(worlds)), layout="constrained")
    grid = fig.subplots(len(worlds), len(schedules), squeeze=False)
    for row, world in zip(grid, worlds, strict=True):
        of_world = frame[frame["world"] == world]
        plain = of_world[of_world["family"] == "none"].groupby("n")["error"].median()
        for ax, schedule in zip(row, schedules, strict=True):
            ax.plot(plain.index, plain.to_numpy(), "k--", label="REBEL (no ball), median")
            for family in FINITE_FAMILIES:
                colour = FAMILY_COLOURS[family]
                cells = of_world[(of_world["family"] == family)
                                 & (of_world["schedule"] == schedule)]
                band = cells.groupby("n")["error"].quantile([0.1, 0.5, 0.9]).unstack()
                ax.plot(band.index, band[0.5], "o-", ms=3, color=colour,
                        label=f"{_method(family)}, median (band 10-90%)")
                ax.fill_between(band.index, band[0.1], band[0.9], color=colour, alpha=0.12,
                                lw=0)
                curve = exact[(exact["world"] == world) & (exact["family"] == family)
                              & (exact["schedule"] == schedule)]
                ax.plot(curve["n"], curve["bias"], ":", color=colour, lw=1.8,
                        label=f"exact bias of {_method(family)}, exponent "
                              f"{curve['exponent'].iloc[-1]:.3f} at n = 2^"
                              f"{int(math.log2(curve['n'].iloc[-1]))}")
            # The claimed rate through the last exact point, over the curve's far end only
            # (drawn over the whole range it would stretch the axes by decades).
            end = curve.iloc[-1]
            sizes = curve["n"].to_numpy(dtype=float)
            draw_power_law(ax, sizes[sizes >= 2**16], (end["n"], end["bias"]),
                           CLAIMED_EXPONENT[schedule], "claimed rate", "-.")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("n")
            ax.set_ylabel(ERROR_LABEL)
            ax.set_title(f"{world}: rho_n = {schedule}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6.5)
    config = frame.attrs.get("config", {})
    fig.suptitle(f"Covering radii in the finite worlds: sampled error (n up to 2^"
                 f"{round(math.log2(frame['n'].max()))}, {frame['trial'].nunique()} trials) "
                 f"and exact bias (out to 2^{round(math.log2(exact['n'].max()))})\n"
                 f"c = {config.get('c')}; q = the {config.get('level')} quantile of "
                 "chi^2_(S-1) / 2, S the number of atoms")
    return save_figure(fig, out_dir, "rate_worlds")
