"""Heterogeneous annotators in the LLM demo: does a robust set protect a minority objective?

    python -m drosim.llm.minority_study --out DIR [--seeds 0,1,2,3,4]
        [--methods rebel,chi2-rebel,kl-rebel] [--fraction 0.2] [--rho 0.5] [--smoke]

Each iteration a random ``--fraction`` of the training pairs is scored by a minority of
annotators under :data:`MINORITY_MIXTURE` ({formal: 1}, an objective the majority's joy/calm
mixture gives no weight) instead of the training mixture; the methods are not told which pairs
are the minority's. Every method and seed is an ordinary demo run (``llm/configs/demo.yaml``,
or ``smoke.yaml`` with ``--smoke``) on the demo's pre-trained base (``DIR/base``, built once and
reused, as :func:`drosim.llm.demo.run_demo` does), with ``chi2_rho = kl_rho = --rho``; runs
live in ``DIR/minority-runs/<method>-seed<k>``, resumed if interrupted and skipped if finished.

Written to ``DIR``:

- ``minority.csv``: per method and seed, the final held-out reward under the training mixture
  (``train``), under the minority mixture (``minority``), averaged over the annotators
  (``population``: (1 - fraction) train + fraction minority, what the training rewards
  estimate) and the worst case over the evaluation grid (``worst``), and the mean over
  iterations of the largest robust weight in a minibatch (``max_weight``; 1 / minibatch_size
  when the weights are uniform, as REBEL's);
- ``summary.csv``: per robust method and metric, the differences to REBEL paired by seed
  (``seed_<k>``), their mean, a paired bootstrap 90% interval (``ci_low``, ``ci_high``) and
  the Bonferroni-adjusted interval over the robust methods compared (``adj_low``,
  ``adj_high``: level 1 - 0.1 / methods);
- ``minority.png``: minority reward against training-mixture reward, a point per seed, the
  method's mean with its bootstrap 90% interval on both axes.

The verdict (:func:`verdict`) says "protects the minority" only when the adjusted interval of
the minority-reward gain over REBEL lies above 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from drosim.llm.config import TrainConfig, bundled_config_path, load_config
from drosim.llm.demo import build_demo_base, check_same_configuration
from drosim.llm.report import read_eval_metrics
from drosim.llm.rewards import mixture_name

STUDY_METHODS = ("rebel", "chi2-rebel", "kl-rebel")
BASELINE = "rebel"
MINORITY_MIXTURE = {"formal": 1.0}
# The radius of both sets: large enough for the weights to move. At the demo's 0.01 the
# largest weight of a 32-pair minibatch is 1.6x uniform (1/32); at 0.5, 5-9x (measured as
# max_weight, see figures/llm_minority/README.md).
RHO = 0.5
LEVEL = 0.9
BOOTS = 10_000
METRICS = ("train", "minority", "population", "worst")


def study_config(base: Path, run_dir: Path, *, method: str, seed: int, fraction: float,
                 rho: float, smoke: bool, progress: bool) -> TrainConfig:
    """One run's configuration: the demo's (or smoke's) with the minority, ``rho`` as the
    radius of both sets and an evaluation grid that holds the minority's mixture."""
    path = bundled_config_path("smoke" if smoke else "demo")
    grid = load_config(path).eval_mixtures
    if mixture_name(MINORITY_MIXTURE) not in map(mixture_name, grid):
        grid = [*grid, MINORITY_MIXTURE]
    return load_config(path, [
        f"model={base}", f"method={method}", f"seed={seed}", f"out_dir={run_dir}",
        f"progress={str(progress).lower()}", f"minority_mixture={json.dumps(MINORITY_MIXTURE)}",
        f"minority_fraction={fraction}", f"eval_mixtures={json.dumps(grid)}",
        f"chi2_rho={rho}", f"kl_rho={rho}"])


def final_rewards(run_dir: Path, config: TrainConfig) -> dict[str, float]:
    """A finished run's last evaluation under the training and minority mixtures, their
    average over the annotators and the worst case over the grid, with the mean over
    iterations of its largest robust weight."""
    rewards = read_eval_metrics(run_dir)
    last = rewards[rewards.iteration == rewards.iteration.max()].set_index("mixture").reward
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    weights = [r["max_weight"] for r in map(json.loads, lines) if r["kind"] == "train"]
    train, minority = last[mixture_name(config.train_mixture)], last[mixture_name(
        MINORITY_MIXTURE)]
    fraction = config.minority_fraction
    return {"train": float(train), "minority": float(minority),
            "population": float((1 - fraction) * train + fraction * minority),
            "worst": float(last["worst"]), "max_weight": float(np.mean(weights))}


def train_runs(out: Path, *, methods: Sequence[str], seeds: Sequence[int], fraction: float,
               rho: float, smoke: bool, progress: bool) -> pd.DataFrame:
    """Train (or resume, or skip when finished) every method and seed; their final rewards.

    Returns:
        Columns method, seed, train, minority, population, worst, max_weight.
    """
    from drosim.llm.trainer import train

    suffix = "-smoke" if smoke else ""
    base = build_demo_base(out / f"base{suffix}", pretrain_steps=40 if smoke else 300,
                           corpus_size=500 if smoke else 4000, progress=progress)
    rows = []
    for method in methods:
        for seed in seeds:
            run_dir = out / f"minority-runs{suffix}" / f"{method}-seed{seed}"
            config = study_config(base, run_dir, method=method, seed=seed, fraction=fraction,
                                  rho=rho, smoke=smoke, progress=progress)
            check_same_configuration(run_dir, config)
            if not (run_dir / "final" / "config.json").exists():
                train(config, resume=True)
            rows.append({"method": method, "seed": seed, **final_rewards(run_dir, config)})
    return pd.DataFrame(rows)


def bootstrap_interval(values: np.ndarray, level: float, *, boots: int = BOOTS,
                       seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (resampled with
    replacement). With 5 values it is too narrow rather than too wide: read it as a rough
    guide."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(boots, len(values)), replace=True).mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_differences(table: pd.DataFrame, *, level: float = LEVEL) -> pd.DataFrame:
    """Per robust method and metric, the differences to REBEL paired by seed, their mean, the
    bootstrap interval at ``level`` and the Bonferroni-adjusted one (level 1 - (1 - level) / k
    over the k methods compared to REBEL).

    Raises:
        ValueError: no REBEL runs, or no other method.
    """
    wide = table.set_index(["method", "seed"])
    others = [m for m in dict.fromkeys(table.method) if m != BASELINE]
    if BASELINE not in set(table.method) or not others:
        raise ValueError(f"the study compares methods to {BASELINE}: give {BASELINE} and at "
                         "least one other method")
    adjusted = 1 - (1 - level) / len(others)
    rows = []
    for method in others:
        for metric in METRICS:
            # paired by seed: only seeds both methods ran
            diffs = (wide.loc[method, metric] - wide.loc[BASELINE, metric]).dropna()
            values = diffs.to_numpy()
            low, high = bootstrap_interval(values, level)
            adj_low, adj_high = bootstrap_interval(values, adjusted)
            rows.append({"method": method, "metric": metric, "n_seeds": len(values),
                         "mean_difference": float(values.mean()), "ci_low": low,
                         "ci_high": high, "adj_low": adj_low, "adj_high": adj_high,
                         **{f"seed_{seed}": float(d) for seed, d in diffs.items()}})
    return pd.DataFrame(rows)


def verdict(summary: pd.DataFrame, *, fraction: float, level: float = LEVEL) -> str:
    """Plain words: per robust method, whether it protects the minority better than REBEL,
    and at what cost on the training mixture, the annotators' average and the worst case."""
    methods = list(dict.fromkeys(summary.method))
    adjusted = 1 - (1 - level) / len(methods)
    lines = []
    for method in methods:
        rows = summary[summary.method == method].set_index("metric")
        minority, train = rows.loc["minority"], rows.loc["train"]
        if minority.adj_low > 0:
            said = "protects the minority"
        elif minority.ci_low > 0:
            said = ("may protect the minority (its unadjusted interval is above 0, not its "
                    "Bonferroni-adjusted one)")
        elif minority.adj_high < 0:
            said = "serves the minority WORSE than it"
        else:
            said = "does not clearly protect the minority"
        lines.append(f"{method} against {BASELINE}: {said}. Minority reward "
                     f"{_difference(minority)}; training mixture {_difference(train)} "
                     f"({_cost(train)}); averaged over the annotators "
                     f"{_difference(rows.loc['population'])}; worst case over the grid "
                     f"{_difference(rows.loc['worst'])}.")
    seeds = int(summary.n_seeds.min())
    lines.append(f"(minority: {fraction:g} of the pairs scored by "
                 f"{mixture_name(MINORITY_MIXTURE)}; differences paired by seed over {seeds} "
                 f"seeds, mean [bootstrap {level:.0%} interval; Bonferroni-adjusted "
                 f"{adjusted:.1%} interval over the {len(methods)} methods compared to "
                 f"{BASELINE}]. With {seeds} seeds the intervals are wide and themselves "
                 "uncertain (a bootstrap of so few differences tends to understate the "
                 "spread): a rough guide, not a test.)")
    return "\n".join(lines)


def _difference(row: pd.Series) -> str:
    return (f"{row.mean_difference:+.4f} [{row.ci_low:+.4f}, {row.ci_high:+.4f}; adjusted "
            f"{row.adj_low:+.4f}, {row.adj_high:+.4f}]")


def _cost(train: pd.Series) -> str:
    """The training-mixture difference in words (adjusted interval)."""
    if train.adj_high < 0:
        return "a cost"
    if train.adj_low > 0:
        return "a gain"
    return "neither a cost nor a gain resolved"


def plot_minority(table: pd.DataFrame, path: Path, *, level: float = LEVEL) -> None:
    """Minority reward against training-mixture reward: a point per seed, per method the mean
    with its bootstrap interval on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for method, group in table.groupby("method", sort=False):
        points = ax.scatter(group.train, group.minority, s=18, alpha=0.45)
        x_low, x_high = bootstrap_interval(group.train.to_numpy(), level)
        y_low, y_high = bootstrap_interval(group.minority.to_numpy(), level)
        x, y = group.train.mean(), group.minority.mean()
        ax.errorbar(x, y, xerr=[[x - x_low], [x_high - x]], yerr=[[y - y_low], [y_high - y]],
                    fmt="o", ms=7, capsize=3, color=points.get_facecolor()[0][:3],
                    label=f"{method} (mean, {level:.0%} CI)")
    ax.set_xlabel("final reward, training mixture (0.5 joy + 0.5 calm)")
    ax.set_ylabel(f"final reward, minority ({mixture_name(MINORITY_MIXTURE)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("heterogeneous annotators: a point per seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_minority_study(out: str | Path, *, methods: Sequence[str] = STUDY_METHODS,
                       seeds: Sequence[int] = (0, 1, 2, 3, 4), fraction: float = 0.2,
                       rho: float = RHO, smoke: bool = False, progress: bool = True
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the study into ``out``; returns (minority table, summary), also written there
    with ``minority.png``.

    Raises:
        ValueError: no REBEL or no other method, a fraction outside (0, 1), or a run folder
            holding a run of another configuration (e.g. another ``--fraction`` or ``--rho``).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"--fraction must be in (0, 1), got {fraction}")
    if BASELINE not in methods or len(set(methods)) < 2:
        raise ValueError(f"the study compares methods to {BASELINE}: give {BASELINE} and at "
                         "least one other method")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = train_runs(out, methods=methods, seeds=seeds, fraction=fraction, rho=rho,
                       smoke=smoke, progress=progress)
    summary = paired_differences(table)
    table.to_csv(out / "minority.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    plot_minority(table, out / "minority.png")
    return table, summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drosim.llm.minority_study",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated RL seeds")
    parser.add_argument("--methods", default=",".join(STUDY_METHODS),
                        help="comma-separated methods, rebel among them")
    parser.add_argument("--fraction", type=float, default=0.2,
                        help="the minority's fraction of each iteration's pairs")
    parser.add_argument("--rho", type=float, default=RHO,
                        help="the radius of both sets (chi2_rho and kl_rho)")
    parser.add_argument("--smoke", action="store_true", help="seconds-long configuration")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        table, summary = run_minority_study(
            args.out, methods=tuple(args.methods.split(",")),
            seeds=tuple(int(s) for s in args.seeds.split(",")), fraction=args.fraction,
            rho=args.rho, smoke=args.smoke, progress=not args.no_progress)
    except (ValueError, OSError) as error:
        print(f"minority_study: error: {error}", file=sys.stderr)
        return 2
    print(table.groupby("method", sort=False)[[*METRICS, "max_weight"]].mean().to_string(
        float_format="{:.4f}".format))
    print(verdict(summary, fraction=args.fraction))
    print(f"wrote {Path(args.out) / 'minority.csv'}, summary.csv and minority.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
