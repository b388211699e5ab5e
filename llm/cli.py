"""``drosim-llm``: the transformer-side command line.

    drosim-llm demo --out DIR [--smoke] [--methods rebel,w-rebel] [--seeds 0,1,2]
    drosim-llm train [--config NAME|PATH.yaml] [--resume] [--overwrite] [key=value ...]
    drosim-llm --version
    torchrun --nproc-per-node 2 -m drosim.llm.cli train --config smoke out_dir=runs/ddp
    drosim-llm export RUN_DIR_OR_CHECKPOINT --out DIR [--overwrite]
    drosim-llm report RUN_DIR [RUN_DIR ...] --out DIR
    drosim-llm sft --model M --data D --out DIR [--field F] [--split S] [--epochs N] [--lr X]
        [--batch-size B] [--max-length L] [--seed S] [--bf16] [--trust-remote-code]
        [--overwrite] [--resume] [--save-steps N]
    drosim-llm train-reward --model M --data D --out DIR [--text-field F] [--label-field F]
        [--labels a,b,c] [--eval-fraction X] [the training options of sft]

``train`` overrides take YAML values (``lr=3e-4``, ``bf16=true``,
``"train_mixture={joy: 0.7, calm: 0.3}"``); see :class:`drosim.llm.components.config.TrainConfig`.
``sft`` and ``train-reward`` are the stage-0 recipes (:mod:`drosim.llm.recipes.sft`,
:mod:`drosim.llm.recipes.reward_training`): their ``--out`` folders are ``train``'s ``model`` and
``reward``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from drosim import __version__
from drosim.llm.components.config import (
    METHODS,
    bundled_config_names,
    bundled_config_path,
    load_config,
    suggest,
)

# --help shows plain text: the module docstring's first line carries reST markup.
DESCRIPTION = "drosim-llm: the transformer-side command line"
SEED_LIMIT = 2**32  # numpy's seed range, as the config's seed key


def _config_path(name: str) -> Path:
    """``--config``'s file: a ``.yaml`` / ``.yml`` path as given, else the bundled config of
    that name (:func:`drosim.llm.components.config.bundled_config_path` refuses an unknown one)."""
    return Path(name) if name.endswith((".yaml", ".yml")) else bundled_config_path(name)


def _comma_list(text: str, *, flag: str) -> list[str]:
    """The items of a comma-separated flag value, each stripped, none empty nor repeated.

    Raises:
        ValueError: an empty item or one given twice, naming ``flag``.
    """
    items = [item.strip() for item in text.split(",")]
    if "" in items:
        raise ValueError(f"{flag} {text!r} has an empty item; give comma-separated values "
                         "such as 0,1,2")
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise ValueError(f"{flag} {text!r} names {', '.join(repeated)} more than once; give "
                         "each once")
    return items


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: distinct integers in [0, 2**32), comma-separated.

    Raises:
        ValueError: an item that is not such an integer, an empty or repeated item.

    Example:
        >>> parse_seeds("0, 1,7")
        (0, 1, 7)
    """
    seeds = []
    for item in _comma_list(text, flag="--seeds"):
        if not (item.isdigit() and int(item) < SEED_LIMIT):  # isdigit: no sign, no point
            raise ValueError(f"--seeds: {item!r} is not a seed; give integers in [0, 2**32) "
                             "such as 0,1,2")
        seeds.append(int(item))
    return tuple(seeds)


def parse_methods(text: str) -> tuple[str, ...]:
    """``--methods``: distinct method names of :data:`drosim.llm.components.methods.METHODS`.

    Raises:
        ValueError: an unknown name (the close matches suggested), an empty or repeated item.

    Example:
        >>> parse_methods("rebel,w-rebel")
        ('rebel', 'w-rebel')
    """
    methods = _comma_list(text, flag="--methods")
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"--methods: unknown method {method!r}; "
                             f"{suggest(method, METHODS, plural='methods')}")
    return tuple(methods)


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments, ``train``'s ``key=value`` overrides allowed before and after its flags.

    argparse gives a positional list the first run of its values only, and calls the rest
    unrecognised: those (in order, after the first run) are the later overrides.
    """
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        args.overrides += [item for item in rest if not item.startswith("-")]
        rest = [item for item in rest if item.startswith("-")]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def _add_training_options(command: argparse.ArgumentParser, *, lr: float,
                          batch_size: int, max_length: int) -> None:
    """The options ``sft`` and ``train-reward`` share: model, data, out and Trainer's."""
    command.add_argument("--model", required=True, help="a local folder or hub name")
    command.add_argument("--data", required=True,
                         help="a .txt / .parquet / .jsonl / .json / .csv file, a saved "
                              "dataset folder or a hub dataset name")
    command.add_argument("--out", required=True, help="the folder to write (new or empty)")
    command.add_argument("--split", default="train", help="dataset split (default: train)")
    command.add_argument("--epochs", type=float, default=1.0, help="default: 1")
    command.add_argument("--lr", type=float, default=lr, help=f"default: {lr:g}")
    command.add_argument("--batch-size", type=int, default=batch_size,
                         help=f"default: {batch_size}")
    command.add_argument("--max-length", type=int, default=max_length,
                         help=f"tokens per example (default: {max_length})")
    command.add_argument("--seed", type=int, default=0, help="default: 0")
    command.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    command.add_argument("--trust-remote-code", action="store_true",
                         help="run the model folder's custom code")
    command.add_argument("--overwrite", action="store_true",
                         help="replace a non-empty --out and an interrupted run's checkpoints")
    command.add_argument("--resume", action="store_true",
                         help="continue an interrupted run from its checkpoints in OUT.work/")
    command.add_argument("--save-steps", type=int, default=500,
                         help="steps between checkpoints (default: 500)")


def _training_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`_add_training_options`' options but model/data/out."""
    return {"split": args.split, "epochs": args.epochs, "lr": args.lr,
            "batch_size": args.batch_size, "max_length": args.max_length, "seed": args.seed,
            "bf16": args.bf16, "trust_remote_code": args.trust_remote_code,
            "overwrite": args.overwrite, "resume": args.resume, "save_steps": args.save_steps}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``drosim-llm`` console script; returns the exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        0 when the command has finished, 2 on bad input (one line on stderr, no traceback).
    """
    args = _parse(_parser(), argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as error:  # OSError: e.g. a hub name from_pretrained lacks
        print(f"drosim-llm: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    """The parser of every subcommand, each with its handler as ``handler``."""
    parser = argparse.ArgumentParser(prog="drosim-llm", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (_add_demo, _add_train, _add_export, _add_report, _add_sft,
                        _add_train_reward):
        add_command(commands)
    return parser


def _add_demo(commands: argparse._SubParsersAction) -> None:
    """``demo``: the offline CPU demo."""
    demo = commands.add_parser("demo", help="the offline CPU demo: table and figure in --out")
    demo.add_argument("--out", required=True, help="output directory")
    demo.add_argument("--smoke", action="store_true", help="seconds-long configuration")
    demo.add_argument("--methods", default=None,
                      help=f"comma-separated methods, of: {', '.join(METHODS)} (default: "
                           "the demo's five)")
    demo.add_argument("--seeds", default="0,1,2",
                      help="comma-separated RL seeds, integers >= 0 (default: 0,1,2)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(handler=_demo)


def _add_train(commands: argparse._SubParsersAction) -> None:
    """``train``: one online training run, its config overridden by ``key=value`` items."""
    train = commands.add_parser("train", help="one online training run")
    train.add_argument("--config", default="demo",
                       help=f"bundled config name ({', '.join(bundled_config_names())}) or a "
                            "YAML path (default: demo)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in out_dir")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an earlier run's outputs in out_dir once the new run has "
                            "started")
    train.add_argument("overrides", nargs="*",
                       help="key=value overrides, before or after the flags; later ones win")
    train.set_defaults(handler=_train)


def _add_export(commands: argparse._SubParsersAction) -> None:
    """``export``: a run's policy as a Hugging Face model folder."""
    export = commands.add_parser("export", help="a run's policy as a Hugging Face model folder")
    export.add_argument("source", help="a run directory (its final/ folder, else its newest "
                                       "intact checkpoint) or one checkpoint directory")
    export.add_argument("--out", required=True, help="the folder to write (new or empty)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.set_defaults(handler=_export)


def _add_report(commands: argparse._SubParsersAction) -> None:
    """``report``: the tables and figure of several runs."""
    report = commands.add_parser("report", help="rewards.csv, summary.csv and rewards.png of "
                                                "runs (several methods and seeds)")
    report.add_argument("runs", nargs="+", help="run directories (out_dir of train)")
    report.add_argument("--out", required=True, help="the folder to write the three files in")
    report.set_defaults(handler=_report)


def _add_sft(commands: argparse._SubParsersAction) -> None:
    """``sft``: stage 0's supervised fine-tuning."""
    sft = commands.add_parser("sft", help="stage 0: supervised fine-tuning of a causal LM")
    _add_training_options(sft, lr=2e-5, batch_size=8, max_length=1024)
    sft.add_argument("--field", default=None,
                     help="the text or conversation column (default: text, else messages)")
    sft.set_defaults(handler=_sft)


def _add_train_reward(commands: argparse._SubParsersAction) -> None:
    """``train-reward``: stage 0's reward model."""
    reward = commands.add_parser("train-reward",
                                 help="stage 0: a sequence classifier as a reward model")
    _add_training_options(reward, lr=2e-5, batch_size=16, max_length=512)
    reward.add_argument("--text-field", default="text", help="default: text")
    reward.add_argument("--label-field", default="label", help="default: label")
    reward.add_argument("--labels", default=None,
                        help="comma-separated class names in id order (default: the column's "
                             "ClassLabel names, else the sorted labels)")
    reward.add_argument("--eval-fraction", type=float, default=0.1,
                        help="held-out fraction for the accuracy (default: 0.1)")
    reward.set_defaults(handler=_train_reward)


def _demo(args: argparse.Namespace) -> int:
    """Run the demo into ``--out`` and print its table (and learning report).

    Raises:
        ValueError: a bad ``--methods`` or ``--seeds``, refused before any work.
    """
    # checked before the demo's modules load or its base model is pre-trained
    chosen_methods = parse_methods(args.methods) if args.methods else None
    seeds = parse_seeds(args.seeds)
    import pandas as pd

    from drosim.llm.recipes.demo import DEMO_METHODS, learning_report, run_demo

    methods = chosen_methods or DEMO_METHODS
    run_demo(args.out, smoke=args.smoke, methods=methods, seeds=seeds,
             progress=not args.no_progress)
    summary = pd.read_csv(Path(args.out) / "summary.csv")
    trained = summary[summary.trained_on | summary.mixture.isin(["mean", "worst"])]
    print(trained.drop(columns="trained_on").to_string(index=False,
                                                        float_format="{:.3f}".format))
    if "rebel" in methods and len(seeds) > 1:
        print(learning_report(summary))
    print(f"wrote {Path(args.out) / 'rewards.csv'}, summary.csv and rewards.png")
    return 0


def _train(args: argparse.Namespace) -> int:
    """One training run from ``--config`` and the overrides; prints its final folder."""
    from drosim.llm.recipes.trainer import train as run_training

    config = load_config(_config_path(args.config), args.overrides)
    out = run_training(config, resume=args.resume, overwrite=args.overwrite)
    print(f"finished: {out / 'final'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """Export a run's (or checkpoint's) policy to ``--out``."""
    from drosim.llm.recipes.export import export_model

    weights = export_model(args.source, args.out, overwrite=args.overwrite)
    print(f"exported {weights} to {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    """Write the runs' rewards, summary and figure to ``--out``; print the summary."""
    from drosim.llm.recipes.report import report_runs

    summary = report_runs(args.runs, args.out)
    print(summary.to_string(index=False, float_format="{:.3f}".format))
    print(f"wrote {Path(args.out) / 'rewards.csv'}, summary.csv and rewards.png")
    return 0


def _sft(args: argparse.Namespace) -> int:
    """Fine-tune ``--model`` on ``--data`` into ``--out``."""
    from drosim.llm.recipes.sft import sft as run_sft

    out = run_sft(args.model, args.data, args.out, field=args.field, **_training_kwargs(args))
    print(f"wrote the fine-tuned model to {out}")
    return 0


def _train_reward(args: argparse.Namespace) -> int:
    """Train a reward model into ``--out``; print its held-out accuracy when measured."""
    from drosim.llm.recipes.reward_training import train_reward
    from drosim.llm.recipes.stage0 import METRICS_FILE

    labels = [name.strip() for name in args.labels.split(",")] if args.labels else None
    out = train_reward(args.model, args.data, args.out, text_field=args.text_field,
                       label_field=args.label_field, labels=labels,
                       eval_fraction=args.eval_fraction, **_training_kwargs(args))
    metrics = json.loads((out / METRICS_FILE).read_text())
    if "eval_accuracy" in metrics:
        print(f"held-out accuracy {metrics['eval_accuracy']:.3f} on "
              f"{metrics['eval_rows']} rows")
    print(f"wrote the reward model ({', '.join(metrics['labels'])}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
