"""The methods compared in the linear world: one pointwise loss times one ambiguity set.

A :class:`Method` names a pointwise loss ("rebel" or "dpo"), an ambiguity family and a
radius schedule rho_n = c * n^(-gamma) (gamma = 1: c / n, gamma = 0.5: c / sqrt(n),
gamma = 0: a fixed radius). The fixed-temperature KL ("kl_temperature") has a temperature
schedule instead, tau_n = c * n^(+gamma): gamma is in both cases the rate at which the
robustness vanishes (the tilt 1 / tau_n falls like n^(-gamma); gamma = 0 is a fixed
temperature tau = c, the form of KL-DPO).

Fitting a batch of sampled pairs gives an estimate of the training mixture's reward
parameter theta* (REBEL regresses relative rewards onto dphi, so w estimates theta*; DPO's
logistic regression on beta * <w, dphi> estimates theta* / beta, so beta * w is reported).
In the linear world beta is a change of units: every DPO loss value, and so every robust
objective and the reported beta * w, depends on theta = beta * w alone, so the estimate
does not depend on beta (only the temperature tau, which divides loss values, matters).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from drosim.dro import KL, AmbiguitySet, Chi2, KLTemperature, Wasserstein
from drosim.estimators import dpo, rebel
from drosim.world import PairBatch

__all__ = ["FAMILIES", "Method", "default_methods"]

FAMILIES = ("none", "chi2", "kl", "kl_temperature", "wasserstein")


@dataclass(frozen=True)
class Method:
    """A (robust) estimator with its radius schedule.

    Attributes:
        name: display name, e.g. "chi2-REBEL".
        loss: "rebel" (squared relative-reward regression) or "dpo" (logistic).
        family: one of FAMILIES.
        c: radius constant (the temperature's constant for "kl_temperature").
        gamma: decay exponent of the robustness: radius rho_n = c * n^(-gamma), or for
            "kl_temperature" temperature tau_n = c * n^(+gamma) (gamma = 0: fixed tau = c).
        beta: DPO's inverse temperature.
    """

    name: str
    loss: str = "rebel"
    family: str = "none"
    c: float = 0.0
    gamma: float = 0.0
    beta: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in ("rebel", "dpo"):
            raise ValueError(f"loss must be 'rebel' or 'dpo', got {self.loss!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.c < 0:
            raise ValueError(f"radius constant must be >= 0, got {self.c}")

    def radius(self, n: int) -> float:
        """rho_n = c * n^(-gamma)."""
        return self.c * n ** (-self.gamma)

    def temperature(self, n: int) -> float:
        """tau_n = c * n^(+gamma), the temperature of "kl_temperature" with n samples."""
        return self.c * n**self.gamma

    def spec(self, n: int) -> AmbiguitySet | None:
        """The ambiguity set used with n samples."""
        rho = self.radius(n)
        if self.family == "chi2":
            return Chi2(rho)
        if self.family == "kl":
            return KL(rho)
        if self.family == "kl_temperature":
            return KLTemperature(self.temperature(n))
        if self.family == "wasserstein":
            # The exact linear-world forms: type 2 for REBEL, type 1 for DPO.
            return Wasserstein(rho, p=2.0 if self.loss == "rebel" else 1.0)
        return None

    def estimate(self, pairs: PairBatch) -> Tensor:
        """Fit every trial of ``pairs`` and return the estimate of theta*, ``(T, d)``."""
        n = pairs.dphi.shape[1]
        if self.loss == "rebel":
            return rebel(pairs.dphi, pairs.dr, self.spec(n)).w
        return self.beta * dpo(pairs.dphi, pairs.pref, self.beta, self.spec(n)).w


def default_methods(gamma: float = 1.0, c: float = 1.0) -> list[Method]:
    """REBEL, chi2-/KL-/W-REBEL and DPO, chi2-DPO, KL-DPO (temperature), WDPO."""
    return [
        Method("REBEL"),
        Method("chi2-REBEL", "rebel", "chi2", c, gamma),
        Method("KL-REBEL", "rebel", "kl", c, gamma),
        Method("W-REBEL", "rebel", "wasserstein", c, gamma),
        Method("DPO", "dpo"),
        Method("chi2-DPO", "dpo", "chi2", c, gamma),
        Method("KL-DPO", "dpo", "kl_temperature", 1.0),
        Method("WDPO", "dpo", "wasserstein", c, gamma),
    ]
