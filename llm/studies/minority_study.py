"""Heterogeneous annotators in the LLM demo: does a robust set protect a minority objective,
beyond what a smaller REBEL step buys by itself, and only when that objective was seen?

    python -m drosim.llm.studies.minority_study --out DIR [--seeds 0,...,19]
        [--methods rebel,chi2-rebel,kl-rebel] [--step-scales 0.25,0.5]
        [--variants seen,unseen] [--fraction 0.2] [--rho RHO] [--smoke]

Each iteration a random ``--fraction`` of the training pairs is scored by a minority of
annotators under their own objective instead of the majority's training mixture (0.5 joy +
0.5 calm); the methods are not told which pairs are the minority's. The protected objective,
evaluated on held-out prompts, is :data:`PROTECTED` ({formal: 1}) in both variants
(:data:`VARIANTS`):

- ``seen``: the minority scores formal: the protected objective is scored by 20% of the
  training pairs;
- ``unseen``: the minority scores anger: no training pair scores formal, the protected
  objective.

(Each variant also reads the other objective: ``anger`` is unseen in the seen variant and
the minority's own, seen, objective in the unseen one.)

Every method and seed is an ordinary demo run (``llm/configs/demo.yaml``, or ``smoke.yaml``
with ``--smoke``) on the demo's pre-trained base (``DIR/base``, built once and reused, as
:func:`drosim.llm.recipes.demo.run_demo` does). Beside the methods, REBEL runs with shorter steps
(``eta`` times each ``--step-scales`` value, arms ``rebel-eta<s>x``), paired by seed: with the
initial policy (eta -> 0) and REBEL (the full step) they trace REBEL's step frontier in the
(training reward, protected reward) plane, what a smaller step buys by itself.

The radius is chosen without the test metric: ``protect_fraction`` (``Chi2.protecting(f)``,
``KL.protecting(f)``; the config's ``chi2_rho`` and ``kl_rho`` left null, as the two are
exclusive) is :func:`drosim.radius.smallest_group_share` of the annotator labels of the
training pairs REBEL drew in the same seed and variant (all iterations; read from its
``metrics.jsonl``'s ``minority_pairs``, not from the config). ``--rho`` instead gives both
sets that fixed radius. Runs live in ``DIR/minority-runs/<minority objective>/<arm>-seed<k>``,
resumed if interrupted and skipped if finished; they are trained seed by seed, so a cut-short
study holds whole seeds.

Written to ``DIR``:

- ``minority.csv``: per variant, arm and seed, the step size ``eta``, the
  ``protect_fraction`` (robust arms), the final held-out reward under the training mixture
  (``train``), under formal and anger alone, averaged over the annotators (``population``:
  (1 - fraction) train + fraction x the minority's objective) and the worst case over the
  evaluation grid (``worst``), the mean over iterations of the largest robust weight in a
  minibatch (``max_weight``; 1 / minibatch_size for REBEL's uniform weights), the gain over
  REBEL's step frontier (``frontier_formal``, ``frontier_anger``: the reward minus the
  frontier's, piecewise linear in the training reward through the seed's REBEL arms and
  initial policy, held flat beyond its ends, ``outside_frontier`` then true) and the initial
  policy's ``train``, ``formal`` and ``anger`` (``initial_*``);
- ``summary.csv``: per variant, arm other than REBEL and metric, the differences to REBEL
  paired by seed (``seed_<k>``; for ``frontier_*`` the gains themselves), their mean with a
  paired bootstrap 90% interval (``ci_*``) and the Bonferroni-adjusted one over the robust
  methods (``adj_*``), their median with an exact two-sided sign test (``n_positive``,
  ``n_negative``, ties dropped; ``sign_p`` and ``sign_p_adj``, times the robust methods;
  REBEL's shorter steps, described rather than tested, unadjusted);
- ``minority.png``: per variant, formal reward against training-mixture reward: a point per
  seed, each arm's mean with its bootstrap interval, REBEL's mean step frontier.

The verdict (:func:`verdict`) says whether formal was seen in training, and calls a method
protective only when its median gain over REBEL's step frontier is positive with an adjusted
sign-test p below 1 - level.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from drosim.llm.components.config import TrainConfig, bundled_config_path, load_config
from drosim.llm.components.demo_world import build_demo_base
from drosim.llm.components.rewards import mixture_name
from drosim.llm.recipes.demo import check_same_configuration
from drosim.llm.recipes.report import read_eval_metrics
from drosim.llm.recipes.trainer import previous_run, train
from drosim.radius import smallest_group_share

STUDY_METHODS = ("rebel", "chi2-rebel", "kl-rebel")
BASELINE = "rebel"
ROBUST = ("chi2-rebel", "kl-rebel")
STEP_SCALES = (0.25, 0.5)
PROTECTED = {"formal": 1.0}
# variant -> the minority's objective; the protected objective is PROTECTED in both
VARIANTS = {"seen": {"formal": 1.0}, "unseen": {"anger": 1.0}}
OBJECTIVES = ("formal", "anger")  # read alone in every run
LEVEL = 0.9
BOOTS = 10_000
METRICS = ("train", "formal", "anger", "population", "worst")
FRONTIER_METRICS = tuple(f"frontier_{o}" for o in OBJECTIVES)


def step_arm(scale: float) -> str:
    """The name of REBEL's arm with ``scale`` x eta: ``rebel-eta0.5x``."""
    return f"{BASELINE}-eta{scale:g}x"


def study_config(base: Path, run_dir: Path, *, method: str, seed: int, fraction: float,
                 minority: dict[str, float], smoke: bool, progress: bool,
                 step_scale: float = 1.0, rho: float | None = None,
                 protect_fraction: float | None = None) -> TrainConfig:
    """One run's configuration: the demo's (or smoke's) with the minority, REBEL's step
    times ``step_scale``, the robust sets' radius (``rho`` for both, or ``protect_fraction``
    with both radii null) and an evaluation grid that holds formal and anger alone."""
    path = bundled_config_path("smoke" if smoke else "demo")
    defaults = load_config(path)
    grid = defaults.eval_mixtures
    for mixture in (minority, *({o: 1.0} for o in OBJECTIVES)):
        if mixture_name(mixture) not in map(mixture_name, grid):
            grid = [*grid, mixture]
    overrides = [
        f"model={base}", f"method={method}", f"seed={seed}", f"out_dir={run_dir}",
        f"progress={str(progress).lower()}", f"minority_mixture={json.dumps(minority)}",
        f"minority_fraction={fraction}", f"eval_mixtures={json.dumps(grid)}",
        f"eta={defaults.eta * step_scale!r}"]
    if protect_fraction is not None:
        overrides += ["chi2_rho=null", "kl_rho=null", f"protect_fraction={protect_fraction!r}"]
    elif rho is not None:
        overrides += [f"chi2_rho={rho}", f"kl_rho={rho}"]
    return load_config(path, overrides)


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def drawn_protect_fraction(run_dir: Path, config: TrainConfig) -> float:
    """:func:`smallest_group_share` of the annotator labels (1: the minority's, 0: the
    majority's) of every training pair a finished run drew, read from its
    ``metrics.jsonl`` (``minority_pairs`` of each iteration's ``pairs_per_iteration``)."""
    labels = [np.repeat([1, 0], [r["minority_pairs"],
                                 config.pairs_per_iteration - r["minority_pairs"]])
              for r in _train_records(run_dir)]
    return smallest_group_share(np.concatenate(labels))


def final_rewards(run_dir: Path, config: TrainConfig) -> dict[str, float]:
    """A finished run's last evaluation under the training mixture, formal and anger, the
    average over the annotators and the worst case over the grid, the mean over iterations
    of its largest robust weight, and the initial policy's rewards."""
    rewards = read_eval_metrics(run_dir)
    first = rewards[rewards.iteration == rewards.iteration.min()].set_index("mixture").reward
    last = rewards[rewards.iteration == rewards.iteration.max()].set_index("mixture").reward
    train_name = mixture_name(config.train_mixture)
    names = {o: mixture_name({o: 1.0}) for o in OBJECTIVES}
    fraction = config.minority_fraction
    own = last[mixture_name(config.minority_mixture)]
    return {"eta": config.eta, "protect_fraction": config.protect_fraction,
            "train": float(last[train_name]),
            **{o: float(last[name]) for o, name in names.items()},
            "population": float((1 - fraction) * last[train_name] + fraction * own),
            "worst": float(last["worst"]),
            "max_weight": float(np.mean([r["max_weight"] for r in _train_records(run_dir)])),
            "initial_train": float(first[train_name]),
            **{f"initial_{o}": float(first[name]) for o, name in names.items()},
            "train_seconds": float(sum(r["seconds"] for r in _train_records(run_dir)))}


def train_runs(out: Path, *, methods: Sequence[str], seeds: Sequence[int], fraction: float,
               step_scales: Sequence[float] = STEP_SCALES,
               variants: Sequence[str] = tuple(VARIANTS), rho: float | None = None,
               smoke: bool = False, progress: bool = False) -> pd.DataFrame:
    """Train (or resume, or skip when finished) every variant, arm and seed, seed by seed,
    REBEL first (its draws set the robust arms' ``protect_fraction`` unless ``rho``); their
    final rewards (:func:`final_rewards`).

    Returns:
        Columns variant, method, seed and those of :func:`final_rewards`.
    """
    suffix = "-smoke" if smoke else ""
    base = build_demo_base(out / f"base{suffix}", pretrain_steps=40 if smoke else 300,
                           corpus_size=500 if smoke else 4000, progress=progress)
    arms = [(BASELINE, 1.0), *((BASELINE, s) for s in step_scales),
            *((m, 1.0) for m in methods if m != BASELINE)]
    rows = []
    for seed in seeds:
        for variant in variants:
            minority = VARIANTS[variant]
            folder = out / f"minority-runs{suffix}" / next(iter(minority))
            share = None
            for method, scale in arms:
                arm = method if scale == 1.0 else step_arm(scale)
                run_dir = folder / f"{arm}-seed{seed}"
                robust = method != BASELINE
                config = study_config(
                    base, run_dir, method=method, seed=seed, fraction=fraction,
                    minority=minority, smoke=smoke, progress=progress, step_scale=scale,
                    rho=rho if robust else None,
                    protect_fraction=share if robust and rho is None else None)
                check_same_configuration(run_dir, config)
                started = time.monotonic()
                if not (run_dir / "final" / "config.json").exists():
                    # an interrupted arm is resumed; a fresh one just starts (no "no
                    # intact checkpoint" line per arm)
                    train(config, resume=bool(previous_run(run_dir)))
                    print(f"[minority_study] {variant} {arm} seed {seed}: "
                          f"{time.monotonic() - started:.1f} s", flush=True)
                if arm == BASELINE:
                    share = drawn_protect_fraction(run_dir, config)
                rows.append({"variant": variant, "method": arm, "seed": seed,
                             **final_rewards(run_dir, config)})
    return add_frontier_gains(pd.DataFrame(rows))


def frontier_gain(train: float, reward: float, frontier: pd.DataFrame,
                  objective: str) -> tuple[float, bool]:
    """``reward`` minus REBEL's step frontier at training reward ``train``: the frontier
    is piecewise linear through ``frontier``'s (train, ``objective``) points sorted by
    train, held flat beyond its ends (then the second value is true)."""
    points = frontier.sort_values("train")
    x, y = points.train.to_numpy(), points[objective].to_numpy()
    return float(reward - np.interp(train, x, y)), bool(train < x[0] or train > x[-1])


def frontier_points(runs: pd.DataFrame) -> pd.DataFrame:
    """One seed and variant's REBEL step frontier: the initial policy (eta -> 0, read from
    REBEL's first evaluation) and every REBEL arm's final (train, formal, anger)."""
    rebel = runs[runs.method.str.startswith(BASELINE) & ~runs.method.isin(ROBUST)]
    start = runs[runs.method == BASELINE].iloc[0]
    initial = {"train": start.initial_train, **{o: start[f"initial_{o}"] for o in OBJECTIVES}}
    return pd.concat([pd.DataFrame([initial]), rebel[["train", *OBJECTIVES]]],
                     ignore_index=True)


def add_frontier_gains(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``frontier_<objective>`` and ``outside_frontier`` per run (0 and false
    for REBEL's arms, which make the frontier)."""
    table = table.copy()
    for objective in OBJECTIVES:
        table[f"frontier_{objective}"] = 0.0
    table["outside_frontier"] = False
    for _, runs in table.groupby(["variant", "seed"], sort=False):
        if BASELINE not in set(runs.method):
            continue
        frontier = frontier_points(runs)
        for index, run in runs[runs.method.isin(ROBUST)].iterrows():
            for objective in OBJECTIVES:
                gain, outside = frontier_gain(run.train, run[objective], frontier, objective)
                table.loc[index, f"frontier_{objective}"] = gain
            table.loc[index, "outside_frontier"] = outside
    return table


def bootstrap_interval(values: np.ndarray, level: float, *, boots: int = BOOTS,
                       seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (resampled with
    replacement). With few values it is too narrow rather than too wide: read it as a rough
    guide."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(boots, len(values)), replace=True).mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def sign_test(values: np.ndarray) -> tuple[int, int, float]:
    """The exact two-sided sign test of a zero median: (positives, negatives, p); exact
    zeros are dropped (p = 1 when nothing is left)."""
    positive, negative = int((values > 0).sum()), int((values < 0).sum())
    if positive + negative == 0:
        return positive, negative, 1.0
    return positive, negative, float(binomtest(positive, positive + negative, 0.5).pvalue)


def _describe(values: np.ndarray, level: float, adjusted: float, k: int) -> dict:
    low, high = bootstrap_interval(values, level)
    adj_low, adj_high = bootstrap_interval(values, adjusted)
    positive, negative, p = sign_test(values)
    return {"n_seeds": len(values), "mean_difference": float(values.mean()), "ci_low": low,
            "ci_high": high, "adj_low": adj_low, "adj_high": adj_high,
            "median_difference": float(np.median(values)), "n_positive": positive,
            "n_negative": negative, "sign_p": p, "sign_p_adj": min(1.0, p * k)}


def paired_differences(table: pd.DataFrame, *, level: float = LEVEL) -> pd.DataFrame:
    """Per variant, arm other than REBEL and metric, the differences to REBEL paired by seed
    (for ``frontier_*``, robust arms only, the gains themselves), with mean, bootstrap
    interval at ``level`` and the Bonferroni-adjusted one (level 1 - (1 - level) / k over
    the k robust methods), median and sign test (p and p times k); REBEL's shorter steps,
    described rather than tested, are not adjusted (``adj_*`` = ``ci_*``, ``sign_p_adj`` =
    ``sign_p``).

    Raises:
        ValueError: no REBEL runs, or no other method.
    """
    if BASELINE not in set(table.method) or set(table.method) == {BASELINE}:
        raise ValueError(f"the study compares methods to {BASELINE}: give {BASELINE} and at "
                         "least one other method")
    k = max(1, len(set(table.method) & set(ROBUST)))
    adjusted = 1 - (1 - level) / k
    rows = []
    for variant, runs in table.groupby("variant", sort=False):
        wide = runs.set_index(["method", "seed"])
        for method in dict.fromkeys(runs.method):
            if method == BASELINE:
                continue
            metrics = [*METRICS, *(FRONTIER_METRICS if method in ROBUST else ())]
            for metric in metrics:
                if metric.startswith("frontier_"):
                    diffs = wide.loc[method, metric]
                else:  # paired by seed: only seeds both arms ran
                    diffs = (wide.loc[method, metric] - wide.loc[BASELINE, metric]).dropna()
                # REBEL's shorter steps are described, not tested: no adjustment
                robust = method in ROBUST
                rows.append({"variant": variant, "method": method, "metric": metric,
                             **_describe(diffs.to_numpy(), level,
                                         adjusted if robust else level, k if robust else 1),
                             **{f"seed_{seed}": float(d) for seed, d in diffs.items()}})
    return pd.DataFrame(rows)


def _row(summary: pd.DataFrame, variant: str, method: str, metric: str) -> pd.Series:
    return summary[(summary.variant == variant) & (summary.method == method)
                   & (summary.metric == metric)].iloc[0]


def verdict(summary: pd.DataFrame, table: pd.DataFrame, *, fraction: float,
            level: float = LEVEL) -> str:
    """Plain words per variant and robust method: whether the protected objective (formal)
    was seen in training, whether the method raises it over REBEL and over REBEL's step
    frontier (medians with sign tests, Bonferroni over the robust methods), at what cost on
    the training mixture and the annotators' average."""
    alpha = 1 - level
    robust = [m for m in dict.fromkeys(summary.method) if m in ROBUST]
    protected = next(iter(PROTECTED))
    lines = []
    for variant in dict.fromkeys(summary.variant):
        minority = next(iter(VARIANTS[variant]))
        seen = minority == protected
        lines.append(
            f"== {variant}: the minority ({fraction:g} of the pairs) scores {minority}; the "
            f"protected objective {protected} was "
            + ("SEEN in training (the minority's pairs score it)" if seen else
               "NOT SEEN in training (no training pair scores it)") + " ==")
        runs = table[table.variant == variant]
        for method in robust:
            over = _row(summary, variant, method, protected)
            gain = _row(summary, variant, method, f"frontier_{protected}")
            train = _row(summary, variant, method, "train")
            share = runs[runs.method == method].protect_fraction
            if gain.median_difference > 0 and gain.sign_p_adj < alpha:
                said = (f"protects {protected} beyond what a smaller REBEL step buys (it lies "
                        "above REBEL's step frontier)")
            elif gain.median_difference < 0 and gain.sign_p_adj < alpha:
                said = (f"lies BELOW REBEL's step frontier on {protected}: a smaller REBEL "
                        "step buys more of it for the same training reward")
            elif over.median_difference > 0 and over.sign_p_adj < alpha:
                said = (f"raises {protected} over REBEL, but not resolved beyond REBEL's step "
                        "frontier: a smaller step might buy as much")
            elif over.median_difference < 0 and over.sign_p_adj < alpha:
                said = f"serves {protected} WORSE than REBEL"
            else:
                said = f"does not resolve a difference to REBEL on {protected}"
            radius = (f"protect_fraction {share.median():.4g} from the drawn labels"
                      if share.notna().all() else "a fixed radius")
            mine = runs[runs.method == method]
            outside = int(mine.outside_frontier.sum())
            # below the initial policy on the training mixture: the policy left the majority
            switched = int((mine.train < mine.initial_train).sum())
            lines.append(
                f"{method} ({radius}): {said}. {protected} over REBEL {_difference(over)}; "
                f"over REBEL's step frontier {_difference(gain)}"
                + (f" ({outside} seeds beyond the frontier's ends, held flat)" if outside
                   else "")
                + f"; training mixture {_difference(train)}; averaged over the annotators "
                f"{_difference(_row(summary, variant, method, 'population'))}. In {switched} "
                f"of {len(mine)} seeds it ends below the initial policy's training-mixture "
                f"reward (it left the majority for the minority's {minority}).")
        for method in dict.fromkeys(summary[summary.variant == variant].method):
            if method not in ROBUST:
                lines.append(f"{method} (REBEL's shorter step, unadjusted) against REBEL: "
                             f"{protected} "
                             f"{_difference(_row(summary, variant, method, protected))}; "
                             "training mixture "
                             f"{_difference(_row(summary, variant, method, 'train'))}.")
    seeds = int(summary.n_seeds.min())
    k = max(1, len(robust))
    lines.append(
        f"(differences paired by seed over {seeds} seeds: median [sign test: positive/"
        f"negative seeds, exact two-sided p, times {k} robust methods (Bonferroni)]; mean "
        f"[bootstrap {level:.0%} interval]. Resolved: adjusted p < {alpha:g}. Not adjusted "
        "over the variants or metrics.)")
    return "\n".join(lines)


def _difference(row: pd.Series) -> str:
    return (f"median {row.median_difference:+.3f} [{row.n_positive}+/{row.n_negative}-, "
            f"p {row.sign_p:.2g}, adj {row.sign_p_adj:.2g}], mean {row.mean_difference:+.3f} "
            f"[{row.ci_low:+.3f}, {row.ci_high:+.3f}]")


def plot_minority(table: pd.DataFrame, path: Path, *, level: float = LEVEL) -> None:
    """Per variant, formal reward against training-mixture reward: a point per seed, per arm
    the mean with its bootstrap interval on both axes, REBEL's mean step frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(table.variant))
    fig, axes = plt.subplots(1, len(variants), figsize=(5.4 * len(variants), 4.4),
                             squeeze=False, sharey=True)
    protected = next(iter(PROTECTED))
    for ax, variant in zip(axes[0], variants, strict=True):
        runs = table[table.variant == variant]
        rebel = runs[~runs.method.isin(ROBUST)].groupby("method")[["eta", "train",
                                                                    protected]].mean()
        start = runs[runs.method == BASELINE][["initial_train", f"initial_{protected}"]].mean()
        xs = [start.initial_train, *rebel.sort_values("eta").train]
        ys = [start[f"initial_{protected}"], *rebel.sort_values("eta")[protected]]
        ax.plot(xs, ys, "k--", lw=1, label="REBEL step frontier (mean; initial, eta x s)")
        for method, group in runs.groupby("method", sort=False):
            points = ax.scatter(group.train, group[protected], s=12, alpha=0.35)
            x_low, x_high = bootstrap_interval(group.train.to_numpy(), level)
            y_low, y_high = bootstrap_interval(group[protected].to_numpy(), level)
            x, y = group.train.mean(), group[protected].mean()
            ax.errorbar(x, y, xerr=[[x - x_low], [x_high - x]],
                        yerr=[[y - y_low], [y_high - y]], fmt="o", ms=7, capsize=3,
                        color=points.get_facecolor()[0][:3], label=f"{method} (mean)")
        minority = next(iter(VARIANTS[variant]))
        ax.set_title(f"{variant}: minority scores {minority}, protected {protected}",
                     fontsize=10)
        ax.set_xlabel("final reward, training mixture (0.5 joy + 0.5 calm)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"final reward, {protected} (points: seeds; bars: {level:.0%} CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_minority_study(out: str | Path, *, methods: Sequence[str] = STUDY_METHODS,
                       seeds: Sequence[int] = tuple(range(20)), fraction: float = 0.2,
                       step_scales: Sequence[float] = STEP_SCALES,
                       variants: Sequence[str] = tuple(VARIANTS), rho: float | None = None,
                       smoke: bool = False, progress: bool = False
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the study into ``out``; returns (minority table, summary), also written there
    with ``minority.png``.

    Raises:
        ValueError: no REBEL or no other method, a method or variant the study does not
            know, a step scale outside (0, 1), a fraction outside (0, 1), or a run folder
            holding a run of another configuration (e.g. another ``--fraction``).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"--fraction must be in (0, 1), got {fraction}")
    if BASELINE not in methods or len(set(methods)) < 2:
        raise ValueError(f"the study compares methods to {BASELINE}: give {BASELINE} and at "
                         "least one other method")
    if set(methods) - {BASELINE, *ROBUST}:
        raise ValueError(f"the study's methods are {BASELINE} and {', '.join(ROBUST)}, got "
                         f"{', '.join(sorted(set(methods) - {BASELINE, *ROBUST}))}")
    if set(variants) - set(VARIANTS) or not variants:
        raise ValueError(f"the variants are {', '.join(VARIANTS)}, got {', '.join(variants)}")
    if any(not 0 < s < 1 for s in step_scales):
        raise ValueError(f"--step-scales must be in (0, 1), got {list(step_scales)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = train_runs(out, methods=methods, seeds=seeds, fraction=fraction,
                       step_scales=step_scales, variants=variants, rho=rho, smoke=smoke,
                       progress=progress)
    summary = paired_differences(table)
    table.to_csv(out / "minority.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    plot_minority(table, out / "minority.png")
    return table, summary


def _numbers(text: str, kind: type) -> tuple:
    return tuple(kind(s) for s in text.split(",") if s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drosim.llm.studies.minority_study",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seeds", default=",".join(map(str, range(20))),
                        help="comma-separated RL seeds (default 0-19)")
    parser.add_argument("--methods", default=",".join(STUDY_METHODS),
                        help="comma-separated methods, rebel among them")
    parser.add_argument("--step-scales", default=",".join(map(str, STEP_SCALES)),
                        help="REBEL's shorter steps, as fractions of eta (empty: none)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="seen (the minority scores formal), unseen (it scores anger)")
    parser.add_argument("--fraction", type=float, default=0.2,
                        help="the minority's fraction of each iteration's pairs")
    parser.add_argument("--rho", type=float, default=None,
                        help="a fixed radius of both sets (chi2_rho and kl_rho) instead of "
                             "protect_fraction from the drawn annotator labels")
    parser.add_argument("--smoke", action="store_true", help="seconds-long configuration")
    parser.add_argument("--progress", action="store_true", help="the trainer's progress bars")
    args = parser.parse_args(argv)
    try:
        table, summary = run_minority_study(
            args.out, methods=tuple(args.methods.split(",")), seeds=_numbers(args.seeds, int),
            fraction=args.fraction, step_scales=_numbers(args.step_scales, float),
            variants=tuple(args.variants.split(",")), rho=args.rho, smoke=args.smoke,
            progress=args.progress)
    except (ValueError, OSError) as error:
        print(f"minority_study: error: {error}", file=sys.stderr)
        return 2
    means = table.groupby(["variant", "method"], sort=False)[
        ["eta", *METRICS, "max_weight", *FRONTIER_METRICS]].mean()
    print(means.to_string(float_format="{:.4f}".format))
    print(verdict(summary, table, fraction=args.fraction))
    print(f"wrote {Path(args.out) / 'minority.csv'}, summary.csv and minority.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
