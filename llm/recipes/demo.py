"""The embedded default: an offline CPU demo of DRO-REBEL on a tiny GPT-2.

``drosim-llm demo --out DIR`` does, with nothing downloaded:

1. generate a corpus from :mod:`drosim.llm.components.demo_world`'s grammar, train a word-level
   tokenizer on it and pre-train a small GPT-2 (saved once to ``DIR/base``);
2. fine-tune that policy online with every method of the demo (REBEL, chi2-REBEL, KL-REBEL,
   W-REBEL, DPO) for several seeds, on the training mixture of two rule-based objectives
   (``llm/configs/demo.yaml``); each run is an ordinary :func:`drosim.llm.recipes.trainer.train` run
   in ``DIR/runs/<method>-seed<k>``, resumed if it was interrupted and skipped if finished
   (a run of another configuration there is refused; ``--smoke`` keeps its own
   ``DIR/base-smoke`` and ``DIR/runs-smoke``); ``DIR`` is locked for the whole demo (one
   writer), and a first run says once that its runs start fresh;
3. write ``DIR/rewards.csv`` (reward under every mixture of the grid, per method, seed and
   iteration), ``DIR/rewards.png`` (those curves, mean over seeds with their range) and
   ``DIR/summary.csv`` (start and end reward per method with the seed spread).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from drosim.llm.components.config import TrainConfig, bundled_config_path, load_config
from drosim.llm.components.demo_world import build_demo_base
from drosim.llm.components.rewards import mixture_name
from drosim.llm.recipes.report import COLUMNS, plot_rewards, read_eval_metrics, summarise
from drosim.llm.recipes.trainer import previous_run, saved_config_changes, train
from drosim.output import ensure_writable, locked

DEMO_METHODS = ("rebel", "chi2-rebel", "kl-rebel", "w-rebel", "dpo")


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
        Columns method, seed, iteration, mixture, reward, win_rate (also written to
        ``rewards.csv``; see :mod:`drosim.llm.recipes.report`).
    """
    out = Path(out)
    # The smoke configuration keeps its own base and runs: a later full demo into the same
    # folder must not reuse them.
    suffix = "-smoke" if smoke else ""
    base_path = out / f"base{suffix}"
    config_path = bundled_config_path("smoke" if smoke else "demo")
    runs = {}
    for method in methods:
        for seed in seeds:
            run_dir = out / f"runs{suffix}" / f"{method}-seed{seed}"
            runs[method, seed] = load_config(config_path, [
                f"model={base_path}", f"method={method}", f"seed={seed}", f"out_dir={run_dir}",
                f"progress={str(progress).lower()}"])
            check_same_configuration(run_dir, runs[method, seed])  # before anything is written
    ensure_writable(out)
    tables = []
    with locked(out):
        build_demo_base(base_path, pretrain_steps=40 if smoke else 300,
                        corpus_size=500 if smoke else 4000, progress=progress)
        fresh = [key for key, config in runs.items() if not previous_run(Path(config.out_dir))]
        if fresh:
            print(f"drosim-llm demo: {len(fresh)} of {len(runs)} runs start fresh in "
                  f"{out / f'runs{suffix}'}", file=sys.stderr)
        for (method, seed), config in runs.items():
            run_dir = Path(config.out_dir)
            if not (run_dir / "final" / "config.json").exists():
                # an earlier (interrupted) run is resumed; a fresh one just starts
                train(config, resume=(method, seed) not in fresh)
            table = read_eval_metrics(run_dir)
            tables.append(table.assign(method=method, seed=seed))
        rewards = pd.concat(tables, ignore_index=True)[COLUMNS]
        rewards.to_csv(out / "rewards.csv", index=False)
        train_mixture = mixture_name(config.train_mixture)
        summary = summarise(rewards, train_mixture)
        summary.to_csv(out / "summary.csv", index=False)
        plot_rewards(rewards, train_mixture, out / "rewards.png",
                     title="drosim-llm demo: held-out reward per mixture")
    return rewards


def check_same_configuration(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to reuse (or resume) a run made with another configuration, e.g. a --smoke
    demo's runs for the full demo (every key counts: a reused run must be this one).

    Raises:
        ValueError: naming the keys that differ.
    """
    # out_dir aside: the same folder may be named from another current folder
    changed = sorted(key for key in saved_config_changes(replace(config, out_dir=str(run_dir)))
                     if key != "out_dir")
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
