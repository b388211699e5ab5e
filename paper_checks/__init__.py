"""Paper checks: does each claim of DRO-REBEL (Sahu & Wells, arXiv 2509.19104) reproduce?

Run them all with ``drosim run`` (or ``python -m drosim.paper_checks``); each check is a
module of this package with a ``run(preset, out) -> CheckResult`` function. To add a check,
write the module and add its name to ``CHECKS``. The folder paper_checks/ of the repository
installs as ``drosim.paper_checks``.

The claim labels, in our words:

* C1: the worst case over a chi-square, KL or Wasserstein ball has an exact dual, so its
  value, worst-case weights and dual variable can be computed without a generic solver.
* C2: (DRO-)REBEL's squared parameter error is at most a constant times sqrt(d/n) (slow
  rate), with constants that do not grow with the reward scale, unlike DPO's.
* C3: with a radius shrinking like 1/n, it reaches the fast (parametric) rate d/n.
* C4: WDPO and KL-DPO reach the parametric rate too.
* C5: a radius large enough to cover the data distribution costs rate: a trade-off between
  coverage and the error rate.
* C6: every robust step is a weighted or regularised regression, online REBEL with exact
  rewards is mirror descent, and every DRO-REBEL variant is SGD-compatible (trained with
  minibatch stochastic gradients).
* C7: DRO-REBEL improves the worst-case reward under preference mixtures unseen in training.
* anchors: not a claim of the paper but a finding about the authors' public chi-square code
  (see ``published_chi2``).
"""

from drosim.paper_checks._framework import (
    PRESETS,
    VERDICTS,
    Check,
    CheckResult,
    Preset,
    Verdict,
    load_check,
)

# Run in this order by ``drosim run``.
CHECKS: tuple[str, ...] = (
    "duality",  # C1, C6: every robust step is a weighted / regularised regression
    "worst_case_curve",  # C1: figure of the worst case against the radius
    "published_chi2",  # anchors: the public code's chi-square value can fall below the mean
    "rates",  # C2, C3: (DRO-)REBEL's error against n and d, slopes against sqrt(d/n), d/n
    "dpo_rates",  # C4: DPO, WDPO and KL-DPO against the parametric rate
    "constants",  # C2 (constants): error against the reward scale, REBEL vs DPO losses
    "coverage",  # C5: exact coverage of P by the ball against the error rate, per radius decay
    "preference_shift",  # C7 (linear world): worst-case reward over unseen preference mixtures
    "updates",  # C6 (online): online REBEL against the exact mirror-descent step
    "minibatch",  # C6 (SGD): the minibatch robust gradient's bias against the full batch's
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
