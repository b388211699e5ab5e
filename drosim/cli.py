"""The ``drosim`` command line.

    drosim run   [--preset quick|full] [--out figures/PRESET]  every paper check, figure and
                 [--only CHECK ...]                          the claims table (the main job)
    drosim study NAME [--preset quick|full] [--out figures/studies/NAME]
                 [--device cpu|cuda] [--memory-budget BYTES]  one study: its table, figures
    drosim worst-case {chi2,kl,kl-temperature} RADIUS [FILE]
                                                             worst case of losses read from
                                                             FILE (or stdin), one per line
    drosim --version

Bad input (an --out folder that cannot be written or where a file to be written is a folder,
an --out another drosim process writes into, an unavailable --device, a losses file that is
not one finite number per line) is refused before any work, with a one-line error and exit
status 2, leaving nothing created or changed. ``run`` and ``study`` write into a staging
folder and move their files into --out only when they have finished.

``study`` and ``worst-case`` are defined here. Commands of the applications built on drosim
(``run``: the paper checks) are registered from their side, as entry points of the group
:data:`COMMANDS_GROUP` (pyproject.toml), so that this core module never imports them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import torch

from drosim import __version__
from drosim.chunks import DEFAULT_MEMORY_BUDGET
from drosim.dro import chi2_worst_case, kl_tilted, kl_worst_case
from drosim.output import check_targets, ensure_writable, exclusive, staged

STUDIES = ("rates", "constants", "coverage", "shift", "updates", "minibatch")
# Where ``drosim study NAME`` writes by default: a folder of its own, so that its table and
# figures neither land in figures/ beside the paper checks' figures/quick and figures/full nor
# mix with another study's.
STUDY_ROOT = Path("figures") / "studies"
# The --help texts are plain text: argparse prints them as they are.
DESCRIPTION = ("drosim: the paper checks of DRO-REBEL (run), one study (study) and the worst "
               "case of a file of losses (worst-case).")
_WORST_CASES = {"chi2": chi2_worst_case, "kl": kl_worst_case, "kl-temperature": kl_tilted}
# Entry points of this group add a command: each names a function that takes the parser's
# subparsers action, adds its parser and sets its ``handler`` default (a function of the
# parsed arguments returning the exit status; a ValueError it raises is reported as bad input).
COMMANDS_GROUP = "drosim.commands"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``drosim`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # study and worst-case run without the registered commands: loading those imports their
    # packages (the paper checks: pandas and more), a second's start-up for nothing.
    registered = not argv or argv[0] not in ("study", "worst-case")
    args = _parser(registered).parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as err:  # bad input: say what is wrong, without a traceback
        print(f"drosim: error: {err}", file=sys.stderr)
        return 2


def _parser(registered: bool = True) -> argparse.ArgumentParser:
    """The ``drosim`` parser; with ``registered``, also the commands of :data:`COMMANDS_GROUP`."""
    parser = argparse.ArgumentParser(prog="drosim", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    # The registered commands come first: ``run``, the main job, heads the --help list.
    for entry in sorted(entry_points(group=COMMANDS_GROUP) if registered else (),
                        key=lambda entry: entry.name):
        entry.load()(commands)

    study = commands.add_parser("study", help="one study: its table (CSV) and figures")
    study.add_argument("name", choices=STUDIES)
    study.add_argument("--preset", choices=("quick", "full"), default="quick")
    study.add_argument("--out", type=Path, default=None,
                       help=f"default: {STUDY_ROOT}/<name>")
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


def _study(args: argparse.Namespace) -> int:
    device = _device(args.device)
    out = args.out or STUDY_ROOT / args.name
    table = f"{args.name}.csv"
    check_targets(out, [table])  # the figures' names are checked when they are published
    ensure_writable(out)
    module = importlib.import_module(f"drosim.studies.{args.name}")
    try:
        with exclusive(out, "drosim"), staged(out, last=(table,)) as stage:
            frame = module.run(args.preset, device=device, memory_budget=args.memory_budget)
            frame.to_csv(stage / table, index=False)
            paths = [stage / table, *module.plot(frame, stage)]
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing written, {out} holds the previous results",
              file=sys.stderr)
        return 130
    print("\n".join(f"wrote {out / path.relative_to(stage)}" for path in paths))
    return 0


def _device(name: str) -> torch.device:
    """The --device argument as a torch device, refused at once if torch cannot use it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} for --device (use cpu, cuda or cuda:N)"
                         ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available (this torch "
                         f"{torch.__version__} is built without CUDA or sees no GPU)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r} for --device (use cpu, cuda or cuda:N)")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:  # e.g. cuda:7 on a one-GPU machine
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--device {name} cannot be used: {message}") from None
    return device


def _read_losses(file) -> np.ndarray:
    """The losses of ``drosim worst-case``: one finite number per line."""
    name = getattr(file, "name", "input")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy's "input contained no data"
            values = np.loadtxt(file, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise ValueError(f"{name}: not one number per line ({err})") from None
    if values.size == 0:
        raise ValueError(f"{name}: no losses (the input is empty)")
    if values.shape[1] != 1:
        raise ValueError(f"{name}: expected one loss per line, found {values.shape[1]} "
                         f"columns")
    values = values[:, 0]
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(f"{name}: loss number {bad[0] + 1} is {values[bad[0]]} (losses must "
                         f"be finite; {bad.size} are not)")
    return values


def _worst_case(args: argparse.Namespace) -> int:
    values = _read_losses(args.file)
    result = _WORST_CASES[args.set](torch.from_numpy(values), args.radius)
    print(f"n={values.size} mean={values.mean():.10g} worst_case={float(result.value):.10g} "
          f"dual={float(result.dual):.10g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
