"""Run the paper checks and write their results (``drosim run`` calls this).

    python -m drosim.paper_checks [--preset quick|full] [--out figures/PRESET] [--only NAME ...]

Prints, for each check, the claim, what the paper says, what was measured and the verdict;
writes ``<out>/claims.csv`` and ``<out>/claims.md`` (one row per check) and each check's
detail table to ``<out>/checks/<name>.csv``. The output folder is checked for writing
before any check runs, and the run's files are moved into it only once every check has
finished: an interrupted run leaves the previous results untouched. Exits 0 whatever the
verdicts (a claim that does not reproduce is a finding), 1 if a check crashed, 2 if the
output folder cannot be written and 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from drosim.output import OutputError, ensure_writable, staged
from drosim.paper_checks import CHECKS, PRESETS, CheckResult, load_check

PROG = "python -m drosim.paper_checks"
CLAIM_COLUMNS = ("check", "claim", "title", "paper_says", "measured", "verdict", "seconds")
_WIDTH = 100
_LABEL = 13  # width of the "paper says:" column in the printed report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected checks, print their reports and write the result files.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 if every check ran, 1 if any crashed, 2 if the output folder
        cannot be written, 130 if interrupted (Ctrl-C) before the results were published.
    """
    args = _parse_args(argv)
    try:
        ensure_writable(args.out)
    except OutputError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    interrupted = _InterruptFlag()
    try:
        with interrupted, staged(args.out, last=("claims.csv", "claims.md")) as stage:
            claims = _run_checks(args.only or list(CHECKS), args.preset, stage,
                                 previous=args.out / "claims.csv" if args.only else None)
            interrupted.raise_if_set()
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing written, {args.out} holds the previous results",
              file=sys.stderr)
        return 130
    counts = claims["verdict"].value_counts()
    summary = ", ".join(f"{count} {verdict}" for verdict, count in counts.items())
    checks = "1 check" if len(claims) == 1 else f"{len(claims)} checks"
    print(f"\n{checks} ({args.preset}) in {time.perf_counter() - start:.1f} s: "
          f"{summary}. Results in {args.out / 'claims.csv'} and {args.out / 'claims.md'}.")
    return 1 if (claims["verdict"] == "crashed").any() else 0


def _run_checks(names: Sequence[str], preset: str, out: Path,
                previous: Path | None = None) -> pd.DataFrame:
    """Run the checks, print their reports and write every result file into ``out``.

    Args:
        names: the checks to run, in order.
        preset: "quick" or "full".
        out: the (staging) folder the files are written to.
        previous: an earlier claims.csv of the same folder (``--only``): its rows of the
            checks not run now are kept, so rerunning one check updates its row alone.

    Returns:
        The claims of the checks run now, one row each.
    """
    (out / "checks").mkdir(parents=True, exist_ok=True)
    rows = []
    for name in tqdm(names, desc="paper checks", unit="check"):
        began = time.perf_counter()
        try:
            result = load_check(name).run(preset, out=out)
        except Exception as err:  # a crash is reported and the other checks still run
            tqdm.write(f"\n== {name}: CRASHED ==\n{traceback.format_exc()}")
            rows.append({"check": name, "claim": "", "title": "", "paper_says": "",
                         "measured": f"{type(err).__name__}: {err}", "verdict": "crashed",
                         "seconds": round(time.perf_counter() - began, 1)})
            continue
        seconds = time.perf_counter() - began
        tqdm.write(report(name, result, seconds))
        result.table.to_csv(out / "checks" / f"{name}.csv", index=False)
        if result.stats is not None:
            (out / "tables").mkdir(exist_ok=True)
            result.stats.to_csv(out / "tables" / f"{name}.csv", index=False)
        rows.append({"check": name, "claim": result.claim, "title": result.title,
                     "paper_says": result.paper_says, "measured": result.measured,
                     "verdict": result.verdict, "seconds": round(seconds, 1)})

    claims = pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))
    table = claims
    earlier = _earlier_claims(previous) if previous is not None else None
    if earlier is not None:
        order = {name: i for i, name in enumerate(CHECKS)}
        table = pd.concat([earlier[~earlier["check"].isin(names)], claims], ignore_index=True)
        table = table.sort_values("check", key=lambda c: c.map(order).fillna(len(order)),
                                  kind="stable", ignore_index=True)
    table.to_csv(out / "claims.csv", index=False)
    (out / "claims.md").write_text(markdown_table(table))
    return claims


def _earlier_claims(path: Path) -> pd.DataFrame | None:
    """The claims table at ``path``, or None when there is none or it is not one (a
    warning says so: its rows are then not kept)."""
    if not path.is_file():
        return None
    try:
        earlier = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        earlier, reason = None, str(err)
    else:
        reason = "it lacks the claims columns"
    if earlier is None or not set(CLAIM_COLUMNS) <= set(earlier.columns):
        tqdm.write(f"{PROG}: warning: {path} is not a claims table ({reason}); only the "
                   "checks run now are written")
        return None
    return earlier


class _InterruptFlag:
    """Remembers a Ctrl-C while its ``with`` block runs. Python raises KeyboardInterrupt
    where the signal lands, and where that is inside a callback of the import machinery it
    is printed as ignored and the run goes on; the flag still says it came, so nothing is
    published. Restores the previous SIGINT handler on leaving (main thread only; elsewhere
    it records nothing)."""

    def __init__(self) -> None:
        self.set = False
        self._previous = None

    def __enter__(self) -> _InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.set = True
        raise KeyboardInterrupt

    def raise_if_set(self) -> None:
        if self.set:
            raise KeyboardInterrupt


def report(name: str, result: CheckResult, seconds: float) -> str:
    """A check's result in plain words, one labelled paragraph per field.

    Args:
        name: the check module's name.
        result: its result.
        seconds: how long it ran.

    Returns:
        The report, ready to print.
    """
    verdict = result.verdict
    if verdict == "not reproduced":
        verdict = "*** NOT REPRODUCED ***"  # the finding a reader must not miss
    lines = [f"\n== {name}: {result.title} =="]
    for label, text in (("claim", result.claim), ("paper says", result.paper_says),
                        ("measured", result.measured),
                        ("verdict", f"{verdict}  ({seconds:.1f} s)")):
        lines.append(textwrap.fill(text, _WIDTH, initial_indent=f"{label + ':':<{_LABEL}}",
                                   subsequent_indent=" " * _LABEL))
    return "\n".join(lines)


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub-flavoured markdown table (pandas needs tabulate for this).

    Args:
        frame: the table; cells are written with ``str``.

    Returns:
        The markdown text, ending with a newline.
    """
    def cell(value: object) -> str:
        return str(value).replace("|", r"\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="quick",
                        help="quick: seconds per check; full: larger sizes and more seeds")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for claims.csv, claims.md, checks/ and figures "
                             "(default: figures/<preset>)")
    parser.add_argument("--only", nargs="+", choices=CHECKS, metavar="NAME",
                        help=f"run only these checks (of: {', '.join(CHECKS)})")
    args = parser.parse_args(argv)
    # One folder per preset: the committed full-preset figures survive a quick run.
    args.out = args.out or Path("figures") / args.preset
    return args


if __name__ == "__main__":
    sys.exit(main())
