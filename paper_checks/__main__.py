"""Run the paper checks and write their results (drosim run calls this).

    python -m drosim.paper_checks [--preset quick|full] [--out figures/PRESET] [--only NAME ...]

Prints, for each check, the claim, what the paper says, what was measured and the verdict;
writes OUT/claims.md (one short row per check: claim, verdict, why, headline number),
OUT/claims.csv (every field of every check), and for each check OUT/checks/NAME.md (its
full report: the paper's claim, what was measured, the verdict and the detail table),
OUT/checks/NAME.csv (the detail table), OUT/tables/NAME.csv (the per-x statistics of a swept
study) and its figures. Before any check runs, OUT is refused if it cannot be written, if a
file to be written is in the way (claims.csv a folder, checks a file, ...) or if another
drosim process writes into it; staging folders left by a killed run are removed. The run's
files are moved into OUT only once every check has finished: an interrupted run leaves the
previous results untouched. Exits 0 whatever the verdicts (a claim that does not reproduce
is a finding), 1 if a check crashed, 2 if OUT is refused or the results cannot be moved into
it, and 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from drosim.output import OutputError, check_targets, ensure_writable, exclusive, staged
from drosim.paper_checks import CHECKS, PRESETS, CheckResult, load_check
from drosim.paper_checks._framework import REASON_MAX_CHARS, clip

PROG = "python -m drosim.paper_checks"
CLAIM_COLUMNS = ("check", "claim", "title", "paper_says", "measured", "verdict", "reason",
                 "headline", "seconds")
# Columns added after claims.csv was first published: an earlier file without them still
# merges (``--only``), its rows with these cells empty.
LATER_COLUMNS = ("reason", "headline")
# claims.md is read in a minute: its columns, and the longest cell it may hold.
SUMMARY_COLUMNS = ("check", "claim", "verdict", "reason", "headline")
MAX_CELL_CHARS = 400
_WIDTH = 100
_LABEL = 13  # width of the "paper says:" column in the printed report


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Run the selected checks, print their reports and write the result files.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).
        prog: the command's name in its messages (``drosim run`` passes "drosim").

    Returns:
        The exit status: 0 if every check ran, 1 if any crashed, 2 if the output folder is
        refused (cannot be written, a file in the way, another writer) or the results cannot
        be moved into it, 130 if interrupted (Ctrl-C) before the results were published.
    """
    args = _parse_args(argv)
    names = args.only or list(CHECKS)
    try:
        check_targets(args.out, publish_targets(names))  # before anything is created
        ensure_writable(args.out)
        with exclusive(args.out, prog):
            return _run_and_publish(args.out, args.preset, names, bool(args.only), prog)
    except OutputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


def add_run_command(commands: argparse._SubParsersAction) -> None:
    """Add ``drosim run`` to the ``drosim`` command line.

    pyproject.toml registers this function as the entry point ``run`` of the group
    ``drosim.commands``, which :mod:`drosim.cli` loads: the core never imports the checks.

    Args:
        commands: the subparsers action of ``drosim``'s parser.
    """
    run = commands.add_parser("run", help="every paper check, figure and the claims table")
    run.add_argument("--preset", choices=("quick", "full"), default="quick")
    run.add_argument("--out", type=Path, default=None, help="default: figures/<preset>")
    run.add_argument("--only", nargs="+", metavar="CHECK",
                     help="run only these checks (default: all; see drosim.paper_checks)")
    run.set_defaults(handler=_drosim_run)


def _drosim_run(args: argparse.Namespace) -> int:
    """``drosim run``: :func:`main` under the name "drosim".

    Args:
        args: the parsed ``drosim run`` arguments (preset, out, only).

    Returns:
        :func:`main`'s exit status.

    Raises:
        ValueError: ``--only`` names an unknown check (``drosim`` reports it as bad input).
    """
    unknown = sorted(set(args.only or ()) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown check {', '.join(unknown)} for --only (choose from "
                         f"{', '.join(CHECKS)})")
    out = args.out or Path("figures") / args.preset
    only = ["--only", *args.only] if args.only else []
    # main checks --out, locks it and publishes, in drosim's own words.
    return main(["--preset", args.preset, "--out", str(out), *only], prog="drosim")


def publish_targets(names: Sequence[str]) -> list[str]:
    """The files a run of these checks may publish whose names are known before it runs.

    The figures' names are not: :func:`drosim.output.publish` checks them before it moves
    anything.

    Args:
        names: the checks to run.

    Returns:
        Paths relative to the output folder.
    """
    return ["claims.csv", "claims.md",
            *(path for name in names
              for path in (f"checks/{name}.csv", f"checks/{name}.md", f"tables/{name}.csv"))]


def _run_and_publish(out: Path, preset: str, names: Sequence[str], merge: bool,
                     prog: str) -> int:
    """Run the checks into a staging folder and publish it into ``out`` (held locked).

    Args:
        out: the output folder, checked and locked.
        preset: "quick" or "full".
        names: the checks to run.
        merge: keep the other checks' rows of ``out/claims.csv`` (``--only``).
        prog: the command's name in its messages.

    Returns:
        The exit status (see :func:`main`).

    Raises:
        OutputError: the results cannot be moved into ``out``.
    """
    start = time.perf_counter()
    interrupted = _InterruptFlag()
    try:
        with interrupted, staged(out, last=("claims.csv", "claims.md")) as stage:
            claims = _run_checks(names, preset, stage,
                                 previous=out / "claims.csv" if merge else None, prog=prog)
            interrupted.raise_if_set()
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing written, {out} holds the previous results",
              file=sys.stderr)
        return 130
    counts = claims["verdict"].value_counts()
    summary = ", ".join(f"{count} {verdict}" for verdict, count in counts.items())
    checks = "1 check" if len(claims) == 1 else f"{len(claims)} checks"
    print(f"\n{checks} ({preset}) in {time.perf_counter() - start:.1f} s: "
          f"{summary}. Results in {out / 'claims.csv'} and {out / 'claims.md'}.")
    return 1 if (claims["verdict"] == "crashed").any() else 0


def _run_checks(names: Sequence[str], preset: str, out: Path,
                previous: Path | None = None, prog: str = PROG) -> pd.DataFrame:
    """Run the checks, print their reports and write every result file into ``out``.

    Args:
        names: the checks to run, in order.
        preset: "quick" or "full".
        out: the (staging) folder the files are written to.
        previous: an earlier claims.csv of the same folder (``--only``): its rows of the
            checks not run now are kept, so rerunning one check updates its row alone.
        prog: the command's name in its warnings.

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
            trace = traceback.format_exc()
            tqdm.write(f"\n== {name}: CRASHED ==\n{trace}")
            (out / "checks" / f"{name}.md").write_text(crash_markdown(name, trace))
            error = f"{type(err).__name__}: {err}"
            rows.append({"check": name, "claim": "", "title": "", "paper_says": "",
                         "measured": error, "verdict": "crashed",
                         "reason": clip(" ".join(error.split()), REASON_MAX_CHARS),
                         "headline": "", "seconds": round(time.perf_counter() - began, 1)})
            continue
        seconds = time.perf_counter() - began
        tqdm.write(report(name, result, seconds))
        result.table.to_csv(out / "checks" / f"{name}.csv", index=False)
        (out / "checks" / f"{name}.md").write_text(check_markdown(name, result, seconds))
        if result.stats is not None:
            (out / "tables").mkdir(exist_ok=True)
            result.stats.to_csv(out / "tables" / f"{name}.csv", index=False)
        rows.append({"check": name, "claim": result.claim, "title": result.title,
                     "paper_says": result.paper_says, "measured": result.measured,
                     "verdict": result.verdict, "reason": result.reason,
                     "headline": result.headline, "seconds": round(seconds, 1)})

    claims = pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))
    table = claims
    earlier = _earlier_claims(previous, prog) if previous is not None else None
    if earlier is not None:
        order = {name: i for i, name in enumerate(CHECKS)}
        table = pd.concat([earlier[~earlier["check"].isin(names)], claims], ignore_index=True)
        table = table.sort_values("check", key=lambda c: c.map(order).fillna(len(order)),
                                  kind="stable", ignore_index=True)
    table.to_csv(out / "claims.csv", index=False)
    (out / "claims.md").write_text(summary_markdown(table))
    return claims


def _earlier_claims(path: Path, prog: str = PROG) -> pd.DataFrame | None:
    """The claims table at ``path``, or None when there is none or it is not one (a
    warning says so: its rows are then not kept). A table written before the
    :data:`LATER_COLUMNS` existed is read with those cells empty (a note says so); rows
    with a blank check name are dropped (a warning names them: no check could update them).

    Args:
        path: the earlier claims.csv.
        prog: the command's name in its warnings.

    Returns:
        The table with the columns :data:`CLAIM_COLUMNS`, or None.
    """
    if not path.is_file():
        return None
    try:
        # Text cells stay text: an empty cell is "", not NaN (which would print as "nan").
        earlier = pd.read_csv(path, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        earlier, reason = None, str(err)
    else:
        reason = "it lacks the claims columns"
    required = set(CLAIM_COLUMNS) - set(LATER_COLUMNS)
    if earlier is None or not required <= set(earlier.columns):
        tqdm.write(f"{prog}: warning: {path} is not a claims table ({reason}); only the "
                   "checks run now are written")
        return None
    missing = [c for c in LATER_COLUMNS if c not in earlier.columns]
    if missing:
        tqdm.write(f"{prog}: note: {path} predates the columns {', '.join(missing)}; the "
                   "rows kept from it leave them empty until their checks run again")
    blank = earlier["check"].astype(str).str.strip() == ""
    if blank.any():
        rows = ", ".join(str(row + 1) for row in np.flatnonzero(blank))
        tqdm.write(f"{prog}: warning: {path}: dropped the rows with no check name (data rows "
                   f"{rows}, counted from 1 below the header)")
        earlier = earlier[~blank]
    return earlier.reindex(columns=list(CLAIM_COLUMNS), fill_value="")


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
                        ("verdict", f"{verdict}  ({seconds:.1f} s)"),
                        ("why", result.reason), ("headline", result.headline)):
        if not text:  # a check that gives no reason or headline
            continue
        lines.append(textwrap.fill(text, _WIDTH, initial_indent=f"{label + ':':<{_LABEL}}",
                                   subsequent_indent=" " * _LABEL))
    return "\n".join(lines)


def summary_markdown(claims: pd.DataFrame) -> str:
    """claims.md: one short row per check, read in a minute.

    The check's name links to its full report (checks/<name>.md) and the claim cell gives
    the claim's label with the check's title.

    Args:
        claims: the claims table (:data:`CLAIM_COLUMNS`).

    Returns:
        The markdown text.

    Raises:
        ValueError: a cell is longer than :data:`MAX_CELL_CHARS` characters.
    """
    rows = pd.DataFrame({
        "check": [f"[{name}](checks/{name}.md)" for name in claims["check"]],
        "claim": [f"{label}: {title}" if title else label
                  for label, title in zip(claims["claim"], claims["title"], strict=True)],
        "verdict": claims["verdict"],
        "reason": claims["reason"],
        "headline": claims["headline"],
    }, columns=list(SUMMARY_COLUMNS))
    return markdown_table(rows, max_cell_chars=MAX_CELL_CHARS)


def check_markdown(name: str, result: CheckResult, seconds: float) -> str:
    """checks/<name>.md: one check's full report, with headings.

    Args:
        name: the check module's name.
        result: its result.
        seconds: how long it ran.

    Returns:
        The markdown text.
    """
    wrap = textwrap.TextWrapper(_WIDTH, break_long_words=False, break_on_hyphens=False)
    files = [f"`checks/{name}.csv` (the table above, at full precision)"]
    if result.stats is not None:
        files.append(f"`tables/{name}.csv` (the per-x statistics behind its figures and "
                     "slopes)")
    sections = [
        f"# {name}: {result.title}",
        f"Claim **{result.claim}**. Verdict: **{result.verdict}** ({seconds:.1f} s).",
        f"## Why\n\n{wrap.fill(result.reason or '(not given)')}",
        f"## Headline\n\n{wrap.fill(result.headline or '(not given)')}",
        f"## What the paper says\n\n{wrap.fill(result.paper_says)}",
        "## What was measured\n\n" + "\n\n".join(
            wrap.fill(sentence) for sentence in _sentences(result.measured)),
        f"## Table\n\n{markdown_table(result.table) if len(result.table) else '(empty)'}",
        "Files: " + "; ".join(files) + ".",
    ]
    return "\n\n".join(section.rstrip("\n") for section in sections) + "\n"


def _sentences(text: str) -> list[str]:
    """``text`` cut after each full stop that ends a sentence ("e.g." and "i.e." do not):
    a long measurement reads as one paragraph per finding."""
    return re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<=\.) +(?=\S)", text)


def crash_markdown(name: str, trace: str) -> str:
    """checks/<name>.md of a check that raised: the traceback."""
    return f"# {name}: crashed\n\nThe check raised; nothing was measured.\n\n```\n{trace}```\n"


def markdown_table(frame: pd.DataFrame, max_cell_chars: int | None = None) -> str:
    """A DataFrame as a GitHub-flavoured markdown table (pandas needs tabulate for this).

    Args:
        frame: the table; floats are written with 4 significant digits, other cells with
            ``str``.
        max_cell_chars: the longest cell allowed, or None for no limit.

    Returns:
        The markdown text, ending with a newline.

    Raises:
        ValueError: a cell is longer than ``max_cell_chars``.
    """
    def cell(value: object) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        text = text.replace("|", r"\|").replace("\n", " ")
        if max_cell_chars is not None and len(text) > max_cell_chars:
            raise ValueError(f"a markdown cell has {len(text)} characters, more than "
                             f"{max_cell_chars}: {text[:80]!r}...")
        return text

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
