"""The embedded default: an offline CPU demo of DRO-REBEL on a tiny GPT-2.

``drosim-llm demo --out DIR`` does, with nothing downloaded:

1. generate a corpus from :mod:`drosim.llm.demo_world`'s grammar, train a word-level
   tokenizer on it and pre-train a small GPT-2 (saved once to ``DIR/base``);
2. fine-tune that policy online with every method of the demo (REBEL, chi2-REBEL, KL-REBEL,
   W-REBEL, DPO) for several seeds, on the training mixture of two rule-based objectives
   (``llm/configs/demo.yaml``); each run is an ordinary :func:`drosim.llm.trainer.train` run
   in ``DIR/runs/<method>-seed<k>``, resumed if it was interrupted and skipped if finished
   (a run of another configuration there is refused; ``--smoke`` keeps its own
   ``DIR/base-smoke`` and ``DIR/runs-smoke``);
3. write ``DIR/rewards.csv`` (reward under every mixture of the grid, per method, seed and
   iteration), ``DIR/rewards.png`` (those curves, mean over seeds with their range) and
   ``DIR/summary.csv`` (start and end reward per method with the seed spread).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from drosim.llm.config import TrainConfig, bundled_config_path, config_to_dict, load_config
from drosim.llm.rewards import mixture_name

DEMO_METHODS = ("rebel", "chi2-rebel", "kl-rebel", "w-rebel", "dpo")


def build_demo_base(path: str | Path, *, seed: int = 0, corpus_size: int = 4000,
                    pretrain_steps: int = 300, progress: bool = False) -> Path:
    """Pre-train the demo's base policy and tokenizer into ``path`` (once: an existing base
    is reused) and return ``path``."""
    from transformers.utils import logging as hf_logging

    from drosim.llm.demo_world import (
        demo_corpus,
        demo_model_config,
        pretrain_demo_model,
        train_demo_tokenizer,
    )

    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    if not progress:
        hf_logging.disable_progress_bar()
    corpus = demo_corpus(corpus_size, seed=seed)
    tokenizer = train_demo_tokenizer(corpus)
    model = pretrain_demo_model(demo_model_config(tokenizer), tokenizer, corpus,
                                steps=pretrain_steps, seed=seed, progress=progress)
    staging = path.with_name(path.name + ".tmp")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.replace(path)
    return path


def read_eval_metrics(run_dir: Path) -> pd.DataFrame:
    """The evaluation records of one run as a long table (iteration, mixture, reward)."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] != "eval":
            continue
        for key, value in record.items():
            if key.startswith("reward/"):
                rows.append({"iteration": record["iteration"], "mixture": key[len("reward/"):],
                             "reward": value})
    return pd.DataFrame(rows)


def run_demo(out: str | Path, *, smoke: bool = False, methods: Sequence[str] = DEMO_METHODS,
             seeds: Sequence[int] = (0, 1, 2), progress: bool = True) -> pd.DataFrame:
    """Run the demo into ``out`` and return its long reward table.

    Args:
        out: output directory (created).
        smoke: the seconds-long configuration of the test suite (``smoke.yaml``, short
            pre-training) instead of ``demo.yaml``.
        methods: methods to train.
        seeds: RL seeds per method.
        progress: show progress bars.

    Returns:
        Columns method, seed, iteration, mixture, reward (also written to ``rewards.csv``).
    """
    from drosim.llm.trainer import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # The smoke configuration keeps its own base and runs: a later full demo into the same
    # folder must not reuse them.
    suffix = "-smoke" if smoke else ""
    base = build_demo_base(out / f"base{suffix}", pretrain_steps=40 if smoke else 300,
                           corpus_size=500 if smoke else 4000, progress=progress)
    config_path = bundled_config_path("smoke" if smoke else "demo")
    tables = []
    for method in methods:
        for seed in seeds:
            run_dir = out / f"runs{suffix}" / f"{method}-seed{seed}"
            config = load_config(config_path, [f"model={base}", f"method={method}",
                                               f"seed={seed}", f"out_dir={run_dir}",
                                               f"progress={str(progress).lower()}"])
            _check_same_configuration(run_dir, config)
            if not (run_dir / "final" / "config.json").exists():
                train(config, resume=True)
            table = read_eval_metrics(run_dir)
            tables.append(table.assign(method=method, seed=seed))
    rewards = pd.concat(tables, ignore_index=True)[
        ["method", "seed", "iteration", "mixture", "reward"]]
    rewards.to_csv(out / "rewards.csv", index=False)
    train_mixture = mixture_name(config.train_mixture)
    summary = summarise(rewards, train_mixture)
    summary.to_csv(out / "summary.csv", index=False)
    plot_rewards(rewards, train_mixture, out / "rewards.png")
    return rewards


def summarise(rewards: pd.DataFrame, train_mixture: str) -> pd.DataFrame:
    """Per method and mixture: mean reward at the first and last evaluation, the gain, the
    seed-to-seed standard deviation of the final reward, and gain / spread."""
    first, last = rewards.iteration.min(), rewards.iteration.max()
    ends = rewards[rewards.iteration.isin([first, last])].pivot_table(
        index=["method", "mixture", "seed"], columns="iteration", values="reward")
    ends["gain"] = ends[last] - ends[first]
    summary = ends.groupby(level=["method", "mixture"]).agg(
        start=(first, "mean"), end=(last, "mean"), gain=("gain", "mean"),
        seed_std=(last, "std")).reset_index()
    summary["gain_over_spread"] = summary.gain / summary.seed_std
    summary["trained_on"] = summary.mixture == train_mixture
    return summary


def _check_same_configuration(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to reuse (or resume) a run made with another configuration, e.g. a --smoke
    demo's runs for the full demo."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    before, now = config_to_dict(load_config(saved)), config_to_dict(config)
    changed = sorted(k for k in now if before.get(k) != now[k])
    if changed:
        raise ValueError(f"{run_dir} holds a run of another configuration (it differs in "
                         f"{', '.join(changed)}), e.g. a --smoke demo's: use another --out")


def learning_report(summary: pd.DataFrame, method: str = "rebel") -> str:
    """One sentence: how far ``method``'s training-mixture reward rose, against the seeds'
    spread (the demo's acceptance: REBEL must learn well beyond seed-to-seed noise)."""
    row = summary[(summary.method == method) & summary.trained_on].iloc[0]
    verdict = "learns" if row.gain > 2 * row.seed_std else "does NOT clearly learn"
    return (f"{method} {verdict}: training-mixture reward {row.start:.3f} -> {row.end:.3f} "
            f"(gain {row.gain:.3f} = {row.gain_over_spread:.1f}x the seed std {row.seed_std:.3f})")


def plot_rewards(rewards: pd.DataFrame, train_mixture: str, path: Path) -> None:
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
        title = f"{mixture} (trained)" if mixture == train_mixture else mixture
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(mixtures):]:
        ax.set_visible(False)
    axes[0, 0].set_ylabel("mean reward")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("drosim-llm demo: held-out reward per mixture (mean over seeds, range shaded)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
