"""Splitting Monte-Carlo trials into chunks that fit a memory budget.

Studies run hundreds of trials as one batched tensor program; a chunk of trials is the
unit of work, sized so that the estimator's working set stays within the budget on CPU or
GPU. The working set of a Newton fit is dominated by the (trials, n, d) features and the
(line-search steps, trials, n) trial losses, hence the per-trial estimate below.
"""

from __future__ import annotations

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes: 1 GiB per chunk leaves room on a 4 GiB machine

# Working-set multiples measured on the estimators (bench/bench_estimators.py reports the
# real peak): features and their weighted copies, plus the line search's trial losses.
_FEATURE_COPIES = 4
_LOSS_COPIES = 48


def trials_per_chunk(n: int, d: int, *, itemsize: int = 8,
                     memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """How many trials of n pairs in d dimensions one chunk may hold (at least 1).

    Example:
        >>> trials_per_chunk(512, 16, memory_budget=1 << 30) > 256
        True
    """
    if n < 1 or d < 1 or memory_budget <= 0:
        raise ValueError("need n >= 1, d >= 1 and a positive memory budget")
    per_trial = itemsize * n * (_FEATURE_COPIES * d + _LOSS_COPIES)
    return max(1, memory_budget // per_trial)


def chunk_slices(trials: int, per_chunk: int) -> list[slice]:
    """Consecutive slices of at most per_chunk trials covering range(trials)."""
    return [slice(start, min(start + per_chunk, trials)) for start in range(0, trials, per_chunk)]
