"""``drosim-llm``: the transformer-side command line.

    drosim-llm demo --out DIR [--smoke] [--methods rebel,w-rebel] [--seeds 0,1,2]
    drosim-llm train [--config demo|smoke|PATH.yaml] [--resume] [key=value ...]
    drosim-llm --version
    torchrun --nproc-per-node 2 -m drosim.llm.cli train --config smoke out_dir=runs/ddp
    drosim-llm export RUN_DIR_OR_CHECKPOINT --out DIR [--overwrite]
    drosim-llm report RUN_DIR [RUN_DIR ...] --out DIR

``train`` overrides take YAML values (``lr=3e-4``, ``bf16=true``,
``"train_mixture={joy: 0.7, calm: 0.3}"``); see :class:`drosim.llm.config.TrainConfig`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drosim import __version__
from drosim.llm.config import bundled_config_path, load_config


def _config_path(name: str) -> Path:
    return Path(name) if name.endswith((".yaml", ".yml")) else bundled_config_path(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drosim-llm", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the offline CPU demo: table and figure in --out")
    demo.add_argument("--out", required=True, help="output directory")
    demo.add_argument("--smoke", action="store_true", help="seconds-long configuration")
    demo.add_argument("--methods", default=None, help="comma-separated methods")
    demo.add_argument("--seeds", default="0,1,2", help="comma-separated RL seeds")
    demo.add_argument("--no-progress", action="store_true")

    train = commands.add_parser("train", help="one online training run")
    train.add_argument("--config", default="demo",
                       help="bundled config name (demo, smoke, gpt2-small-gpu) or a YAML path "
                            "(default: demo)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in out_dir")
    train.add_argument("--overwrite", action="store_true",
                       help="delete an earlier run's outputs in out_dir first")
    train.add_argument("overrides", nargs="*", help="key=value overrides")

    export = commands.add_parser("export", help="a run's policy as a Hugging Face model folder")
    export.add_argument("source", help="a run directory (its final/ folder, else its newest "
                                       "intact checkpoint) or one checkpoint directory")
    export.add_argument("--out", required=True, help="the folder to write (new or empty)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    report = commands.add_parser("report", help="rewards.csv, summary.csv and rewards.png of "
                                                "runs (several methods and seeds)")
    report.add_argument("runs", nargs="+", help="run directories (out_dir of train)")
    report.add_argument("--out", required=True, help="the folder to write the three files in")

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            import pandas as pd

            from drosim.llm.demo import DEMO_METHODS, learning_report, run_demo

            methods = tuple(args.methods.split(",")) if args.methods else DEMO_METHODS
            seeds = tuple(int(s) for s in args.seeds.split(","))
            run_demo(args.out, smoke=args.smoke, methods=methods, seeds=seeds,
                     progress=not args.no_progress)
            summary = pd.read_csv(Path(args.out) / "summary.csv")
            trained = summary[summary.trained_on | summary.mixture.isin(["mean", "worst"])]
            print(trained.drop(columns="trained_on").to_string(index=False,
                                                                float_format="{:.3f}".format))
            if "rebel" in methods and len(seeds) > 1:
                print(learning_report(summary))
            print(f"wrote {Path(args.out) / 'rewards.csv'}, summary.csv and rewards.png")
        elif args.command == "report":
            from drosim.llm.report import report_runs

            summary = report_runs(args.runs, args.out)
            print(summary.to_string(index=False, float_format="{:.3f}".format))
            print(f"wrote {Path(args.out) / 'rewards.csv'}, summary.csv and rewards.png")
        elif args.command == "export":
            from drosim.llm.export import export_model

            weights = export_model(args.source, args.out, overwrite=args.overwrite)
            print(f"exported {weights} to {args.out}")
        else:
            from drosim.llm.trainer import train as run_training

            config = load_config(_config_path(args.config), args.overrides)
            out = run_training(config, resume=args.resume, overwrite=args.overwrite)
            print(f"finished: {out / 'final'}")
    except (ValueError, OSError) as error:  # OSError: e.g. a hub name from_pretrained lacks
        print(f"drosim-llm: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
