"""The ``drosim`` command line.

    drosim run   [--preset quick|full] [--out figures/PRESET]  every paper check, figure and
                                                             the claims table (the main job)
    drosim study NAME [--preset quick|full] [--out DIR] [--device cpu|cuda]
                 [--memory-budget BYTES]                    one study: its table and figures
    drosim worst-case {chi2,kl,kl-temperature} RADIUS [FILE]
                                                             worst case of losses read from
                                                             FILE (or stdin), one per line
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from drosim.chunks import DEFAULT_MEMORY_BUDGET
from drosim.dro import chi2_worst_case, kl_tilted, kl_worst_case

STUDIES = ("rates", "constants", "coverage", "shift", "updates")
_WORST_CASES = {"chi2": chi2_worst_case, "kl": kl_worst_case, "kl-temperature": kl_tilted}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``drosim`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as err:  # bad input: say what is wrong, without a traceback
        print(f"drosim: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drosim", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="every paper check, figure and the claims table")
    run.add_argument("--preset", choices=("quick", "full"), default="quick")
    run.add_argument("--out", type=Path, default=None, help="default: figures/<preset>")
    run.set_defaults(handler=_run)

    study = commands.add_parser("study", help="one study: its table (CSV) and figures")
    study.add_argument("name", choices=STUDIES)
    study.add_argument("--preset", choices=("quick", "full"), default="quick")
    study.add_argument("--out", type=Path, default=Path("figures"))
    study.add_argument("--device", default="cpu")
    study.add_argument("--memory-budget", type=int, default=DEFAULT_MEMORY_BUDGET,
                       help="bytes per chunk of trials (default: %(default)s)")
    study.set_defaults(handler=_study)

    worst = commands.add_parser("worst-case", help="worst case of losses read from a file")
    worst.add_argument("set", choices=sorted(_WORST_CASES))
    worst.add_argument("radius", type=float, help="rho (tau for kl-temperature)")
    worst.add_argument("file", nargs="?", type=argparse.FileType("r"), default=sys.stdin)
    worst.set_defaults(handler=_worst_case)
    return parser


def _run(args: argparse.Namespace) -> int:
    from paper_checks.__main__ import main as run_checks

    out = ["--out", str(args.out)] if args.out else []
    return run_checks(["--preset", args.preset, *out])


def _study(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"drosim.studies.{args.name}")
    frame = module.run(args.preset, device=args.device, memory_budget=args.memory_budget)
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / f"{args.name}.csv"
    frame.to_csv(table, index=False)
    paths = [table, *module.plot(frame, args.out)]
    print("\n".join(f"wrote {p}" for p in paths))
    return 0


def _worst_case(args: argparse.Namespace) -> int:
    values = np.loadtxt(args.file, dtype=np.float64, ndmin=1)
    result = _WORST_CASES[args.set](torch.from_numpy(values), args.radius)
    print(f"n={values.size} mean={values.mean():.10g} worst_case={float(result.value):.10g} "
          f"dual={float(result.dual):.10g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
