"""Tables and a figure from finished (or running) training runs.

``drosim-llm report RUN_DIR [RUN_DIR ...] --out DIR`` reads each run's ``config.yaml``
(method, seed, training mixture) and the evaluation records of its ``metrics.jsonl``, and
writes:

- ``rewards.csv``: method, seed, iteration, mixture, reward, win_rate (against the initial
  policy; empty at iteration 0), one row per evaluation and mixture, including the rows
  ``mean`` and ``worst`` over the mixture grid;
- ``summary.csv``: per method and mixture, the reward at the first and last evaluation, the
  gain, the seeds' spread and the final win rate;
- ``rewards.png``: reward against iteration, one panel per mixture, a line per method (mean
  over seeds, range shaded).

The demo (:mod:`drosim.llm.recipes.demo`) writes the same three files for its runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from drosim.llm.components.config import load_config
from drosim.llm.components.rewards import mixture_name

COLUMNS = ["method", "seed", "iteration", "mixture", "reward", "win_rate"]


def read_eval_metrics(run_dir: Path) -> pd.DataFrame:
    """The evaluation records of one run as a long table.

    Args:
        run_dir: a run's out_dir (its ``metrics.jsonl`` is read).

    Returns:
        Columns iteration, mixture, reward, win_rate (NaN where the record has none).

    Raises:
        FileNotFoundError: no ``metrics.jsonl``.
        ValueError: a line that is not JSON (named by its number), or no evaluation record.
    """
    rows = []
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{run_dir}/metrics.jsonl line {number} is not JSON: "
                             f"{line[:60]!r}") from None
        if record.get("kind") != "eval":
            continue
        for key, value in record.items():
            if key.startswith("reward/"):
                mixture = key[len("reward/"):]
                rows.append({"iteration": record["iteration"], "mixture": mixture,
                             "reward": value,
                             "win_rate": record.get(f"win_rate/{mixture}", math.nan)})
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no evaluation yet")
    return pd.DataFrame(rows)


def summarise(rewards: pd.DataFrame, train_mixture: str) -> pd.DataFrame:
    """Per method and mixture: mean reward at the first and last evaluation, the gain, the
    seed-to-seed standard deviation of the final reward, gain / spread, and the mean final
    win rate against the initial policy (when the table has one)."""
    first, last = rewards.iteration.min(), rewards.iteration.max()
    ends = rewards[rewards.iteration.isin([first, last])].pivot_table(
        index=["method", "mixture", "seed"], columns="iteration", values="reward")
    ends["gain"] = ends[last] - ends[first]
    summary = ends.groupby(level=["method", "mixture"]).agg(
        start=(first, "mean"), end=(last, "mean"), gain=("gain", "mean"),
        seed_std=(last, "std")).reset_index()
    summary["gain_over_spread"] = summary.gain / summary.seed_std
    if "win_rate" in rewards:
        final = rewards[rewards.iteration == last].groupby(["method", "mixture"]).win_rate
        summary = summary.merge(final.mean().rename("win_rate").reset_index(),
                                on=["method", "mixture"])
    summary["trained_on"] = summary.mixture == train_mixture
    return summary


def plot_rewards(rewards: pd.DataFrame, train_mixture: str, path: Path, *,
                 title: str = "held-out reward per mixture") -> None:
    """One panel per mixture: reward against iterations, a line per method (mean over seeds,
    shaded between the seeds' min and max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixtures = list(dict.fromkeys(rewards.mixture))
    columns = min(4, len(mixtures))
    rows = -(-len(mixtures) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows),
                             squeeze=False, sharex=True)
    for ax, mixture in zip(axes.flat, mixtures, strict=False):
        for method, group in rewards[rewards.mixture == mixture].groupby("method", sort=False):
            stats = group.groupby("iteration").reward.agg(["mean", "min", "max"])
            line, = ax.plot(stats.index, stats["mean"], label=method)
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.15,
                            color=line.get_color())
        ax.set_title(f"{mixture} (trained)" if mixture == train_mixture else mixture,
                     fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(mixtures):]:
        ax.set_visible(False)
    axes[0, 0].set_ylabel("mean reward")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{title} (mean over seeds, range shaded)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_runs(run_dirs: Sequence[str | Path], out: str | Path) -> pd.DataFrame:
    """Write ``rewards.csv``, ``summary.csv`` and ``rewards.png`` for ``run_dirs`` into
    ``out`` and return the summary.

    Args:
        run_dirs: runs' out_dirs, each with its ``config.yaml`` and ``metrics.jsonl``; runs
            of one method and several seeds are pooled.
        out: the folder to write (created; the three files are replaced).

    Raises:
        ValueError: no runs, two runs of the same method and seed, runs of different
            training mixtures or evaluation grids, or as :func:`read_eval_metrics`.
        FileNotFoundError: a run without ``config.yaml`` or ``metrics.jsonl``.
    """
    if not run_dirs:
        raise ValueError("report needs at least one run directory")
    tables, seen, mixtures = [], {}, set()
    for run_dir in map(Path, run_dirs):
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} has no config.yaml: not a drosim-llm run")
        config = load_config(run_dir / "config.yaml")
        key = (config.method, config.seed)
        if key in seen:
            raise ValueError(f"{run_dir} and {seen[key]} are both {config.method} with seed "
                             f"{config.seed}: report one of them")
        seen[key] = run_dir
        mixtures.add((mixture_name(config.train_mixture),
                      tuple(mixture_name(m) for m in config.eval_mixtures)))
        tables.append(read_eval_metrics(run_dir).assign(method=config.method,
                                                        seed=config.seed))
    if len(mixtures) > 1:
        raise ValueError("the runs differ in their training mixture or evaluation grid: "
                         "report them separately")
    (train_mixture, _), = mixtures
    rewards = pd.concat(tables, ignore_index=True)[COLUMNS]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rewards, train_mixture)
    _write_csv(rewards, out / "rewards.csv")
    _write_csv(summary, out / "summary.csv")
    plot_rewards(rewards, train_mixture, out / "rewards.png")
    return summary


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    """Write through a temporary file, so an interrupted report never leaves half a table."""
    staging = path.with_name(path.name + ".tmp")
    table.to_csv(staging, index=False)
    staging.replace(path)
