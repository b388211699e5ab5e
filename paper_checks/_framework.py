"""What every paper check returns, and the small helpers the checks share.

A check is a module with a ``run(preset, out) -> CheckResult`` function. It measures one
claim of the paper (DRO-REBEL, arXiv 2509.19104) or one property of the authors' public code,
and says in plain words whether the measurement reproduces it. "Not reproduced" is a
finding, not an error: only a check that raises is a failure of the software.

The verdicts, read as a referee would:

* "reproduced": the claim holds where it was tested;
* "partially reproduced": it holds in some regimes or worlds and not in others (the
  measured text names them);
* "not reproduced": it fails in a world where the effect could show;
* "not testable here": the world tested decides the question by construction (e.g. a robust
  set cannot act on a well-specified, homoscedastic world); the text says why;
* "inconclusive": the measurement is too noisy to decide (intervals too wide).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np
import pandas as pd

Preset = Literal["quick", "full"]
Verdict = Literal["reproduced", "partially reproduced", "not reproduced", "not testable here",
                  "inconclusive"]

PRESETS: tuple[str, ...] = get_args(Preset)
VERDICTS: tuple[str, ...] = get_args(Verdict)

# The per-x statistics every swept study publishes (drosim.stats.per_x_statistics).
STATS_COLUMNS: tuple[str, ...] = ("study", "method", "x_name", "x", "median", "q10", "q90",
                                  "mean", "trials")

# Lengths that keep a row of claims.md readable in a minute (see CheckResult).
REASON_MAX_CHARS = 300
HEADLINE_MAX_CHARS = 150

# cvxpy statuses whose value we trust as a reference; anything else is counted and skipped.
TRUSTED_STATUSES = ("optimal", "optimal_inaccurate")


@dataclass(frozen=True, eq=False)  # eq=False: comparing DataFrames with == is not a bool
class CheckResult:
    """The outcome of one paper check.

    Attributes:
        claim: the claim's label ("C1", "C1, C6", ...; see ``drosim.paper_checks``) or
            "anchors" for a finding about the authors' public code rather than the paper.
        title: a short name for what is checked.
        paper_says: the claim, stated in our words (the paper's, or what the public code
            does).
        measured: what this check measured, with the numbers that decide the verdict.
        verdict: one of :data:`VERDICTS` (see the module note).
        table: the detailed measurements, one row per configuration.
        stats: per-x statistics behind the figures and slopes, long format (columns
            :data:`STATS_COLUMNS` at least; see :func:`drosim.stats.per_x_statistics`),
            written to ``<out>/tables/<check>.csv`` so that anyone can refit a reported
            slope; ``None`` for checks without a swept x.
        reason: one sentence (at most :data:`REASON_MAX_CHARS` characters, no newline)
            saying why the verdict: what in the world lets the robust set act or not, and
            whether the protected objective was seen in training.
        headline: the number that decides the verdict, with its interval (at most
            :data:`HEADLINE_MAX_CHARS` characters, no newline).
    """

    claim: str
    title: str
    paper_says: str
    measured: str
    verdict: Verdict
    table: pd.DataFrame
    stats: pd.DataFrame | None = None
    reason: str = ""
    headline: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if not isinstance(self.table, pd.DataFrame):
            raise TypeError(f"table must be a pandas DataFrame, got {type(self.table).__name__}")
        if self.stats is not None:
            missing = [c for c in STATS_COLUMNS if c not in self.stats.columns]
            if missing:
                raise ValueError(f"stats lacks the columns {missing}")
        _check_one_line("reason", self.reason, REASON_MAX_CHARS)
        _check_one_line("headline", self.headline, HEADLINE_MAX_CHARS)


def clip(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters, with "..." where it was cut: for a
    reason or headline built from measured names that may run long.

    Args:
        text: the text.
        max_chars: the longest allowed length (at least 3).

    Returns:
        ``text`` itself when short enough, else its start followed by "...".
    """
    return text if len(text) <= max_chars else text[:max_chars - 3] + "..."


def _check_one_line(field: str, text: str, max_chars: int) -> None:
    """Raise unless ``text`` is a string of one line and at most ``max_chars`` characters.

    Args:
        field: the field's name, for the message.
        text: the value to check.
        max_chars: the longest allowed length.

    Raises:
        TypeError: ``text`` is not a string.
        ValueError: ``text`` holds a line break or is too long.
    """
    if not isinstance(text, str):
        raise TypeError(f"{field} must be a string, got {type(text).__name__}")
    if "\n" in text or "\r" in text:
        raise ValueError(f"{field} must be one line, got {text!r}")
    if len(text) > max_chars:
        raise ValueError(f"{field} must be at most {max_chars} characters, got {len(text)}")


class Check(Protocol):
    """A check module: anything with this ``run`` function."""

    def run(self, preset: Preset = "quick", out: Path = Path("figures")) -> CheckResult:
        """Run the check.

        Args:
            preset: "quick" (seconds) or "full" (larger sizes, more seeds).
            out: the folder where the check may write figures.

        Returns:
            The check's result.
        """
        ...


def load_check(name: str) -> Check:
    """Import the check module ``drosim.paper_checks.<name>``.

    Args:
        name: the module's name, as listed in ``drosim.paper_checks.CHECKS``.

    Returns:
        The module, which has a ``run`` function.
    """
    return importlib.import_module(f"drosim.paper_checks.{name}")


def spread(losses: np.ndarray) -> float:
    """max - min of the losses: the scale on which worst-case values are compared.

    Every worst case over a chi-square or KL ball lies in [mean, max], so an error
    divided by the spread is a relative error on the only range the answer can take.

    Args:
        losses: 1-D array of per-sample losses, not all equal.

    Returns:
        The spread, a positive float.
    """
    return float(np.ptp(losses))
