"""Run the paper checks and write their results.

    python -m paper_checks [--preset quick|full] [--out figures/PRESET] [--only NAME ...]

Prints, for each check, the claim, what the paper says, what was measured and the verdict;
writes ``<out>/claims.csv`` and ``<out>/claims.md`` (one row per check) and each check's
detail table to ``<out>/checks/<name>.csv``. Exits 0 whatever the verdicts (a claim that
does not reproduce is a finding) and 1 if a check crashed.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from paper_checks import CHECKS, PRESETS, CheckResult, load_check

CLAIM_COLUMNS = ("check", "claim", "title", "paper_says", "measured", "verdict", "seconds")
_WIDTH = 100
_LABEL = 13  # width of the "paper says:" column in the printed report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected checks, print their reports and write the result files.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 if every check ran, 1 if any crashed.
    """
    args = _parse_args(argv)
    names = args.only or list(CHECKS)
    (args.out / "checks").mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.perf_counter()
    for name in tqdm(names, desc="paper checks", unit="check"):
        began = time.perf_counter()
        try:
            result = load_check(name).run(args.preset, out=args.out)
        except Exception as err:  # a crash is reported and the other checks still run
            tqdm.write(f"\n== {name}: CRASHED ==\n{traceback.format_exc()}")
            rows.append({"check": name, "claim": "", "title": "", "paper_says": "",
                         "measured": f"{type(err).__name__}: {err}", "verdict": "crashed",
                         "seconds": round(time.perf_counter() - began, 1)})
            continue
        seconds = time.perf_counter() - began
        tqdm.write(report(name, result, seconds))
        result.table.to_csv(args.out / "checks" / f"{name}.csv", index=False)
        rows.append({"check": name, "claim": result.claim, "title": result.title,
                     "paper_says": result.paper_says, "measured": result.measured,
                     "verdict": result.verdict, "seconds": round(seconds, 1)})

    claims = pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))
    claims.to_csv(args.out / "claims.csv", index=False)
    (args.out / "claims.md").write_text(markdown_table(claims))
    counts = claims["verdict"].value_counts()
    summary = ", ".join(f"{count} {verdict}" for verdict, count in counts.items())
    checks = "1 check" if len(claims) == 1 else f"{len(claims)} checks"
    print(f"\n{checks} ({args.preset}) in {time.perf_counter() - start:.1f} s: "
          f"{summary}. Results in {args.out / 'claims.csv'} and {args.out / 'claims.md'}.")
    return 1 if (claims["verdict"] == "crashed").any() else 0


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
    parser = argparse.ArgumentParser(prog="python -m paper_checks", description=__doc__,
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
