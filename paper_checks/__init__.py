"""Paper checks: does each claim of DRO-REBEL (docs: /work/shared/paper.md) reproduce?

Run them all with ``python -m paper_checks``; each check is a module of this package with
a ``run(preset, out) -> CheckResult`` function. To add a check, write the module and add
its name to ``CHECKS``.
"""

from paper_checks._framework import (
    PRESETS,
    VERDICTS,
    Check,
    CheckResult,
    Preset,
    Verdict,
    load_check,
)

# Run in this order by ``python -m paper_checks``.
CHECKS: tuple[str, ...] = (
    "duality",  # C1, C6: every robust step is a weighted / regularised regression
    "worst_case_curve",  # C1: figure of the worst case against the radius
    "published_chi2",  # anchors: the public code's chi-square value falls below the mean
    "rates",  # C2, C3: (DRO-)REBEL's error against n and d, slopes against sqrt(d/n), d/n
    "dpo_rates",  # C4: DPO, WDPO and KL-DPO against the parametric rate
    "constants",  # C2 (constants): error against the reward scale, REBEL vs DPO losses
    "coverage",  # C5: exact coverage of P by the ball against the error rate, per radius decay
    "preference_shift",  # C7 (linear world): worst-case reward over unseen preference mixtures
    "updates",  # C6 (online): online REBEL against the exact mirror-descent step
)

__all__ = [
    "CHECKS",
    "PRESETS",
    "VERDICTS",
    "Check",
    "CheckResult",
    "Preset",
    "Verdict",
    "load_check",
]
