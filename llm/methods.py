"""Every training method as one pointwise loss times one ambiguity set.

=============  ==========  =====================================
method         pointwise   aggregation (drosim.dro spec)
=============  ==========  =====================================
rebel          REBEL       mean
chi2-rebel     REBEL       Chi2(chi2_rho)
kl-rebel       REBEL       KL(kl_rho), optimal temperature
kltemp-rebel   REBEL       KLTemperature(kl_tau)
w-rebel        REBEL       Wasserstein(w_rho, w_p) on embeddings
dpo            DPO         mean
ipo            IPO         mean
wdpo           DPO         Wasserstein(w_rho, w_p) on embeddings
kl-dpo         DPO         KLTemperature(kl_tau) (Xu et al. 2025)
chi2-dpo       DPO         Chi2(chi2_rho)
=============  ==========  =====================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from drosim.dro import KL, AmbiguitySet, Chi2, KLTemperature, Wasserstein
from drosim.llm.batch import PairBatch
from drosim.llm.losses import dpo_losses, ipo_losses, preferences_from_rewards, rebel_losses

Pointwise = Literal["rebel", "dpo", "ipo"]

METHODS: tuple[str, ...] = ("rebel", "chi2-rebel", "kl-rebel", "kltemp-rebel", "w-rebel",
                            "dpo", "ipo", "wdpo", "kl-dpo", "chi2-dpo")


@dataclass(frozen=True)
class Method:
    """A pointwise loss and the ambiguity set that aggregates it.

    Attributes:
        name: one of :data:`METHODS`.
        pointwise: "rebel", "dpo" or "ipo".
        spec: the drosim.dro ambiguity set, None for the plain mean.
    """

    name: str
    pointwise: Pointwise
    spec: AmbiguitySet | None

    def losses(self, logprobs: Tensor, batch: PairBatch, *, eta: float, beta: float) -> Tensor:
        """The ``(n,)`` pointwise losses of the pairs given their ``(n, 2)`` log pi_theta."""
        if self.pointwise == "rebel":
            if batch.sampling_logprobs is None:
                raise ValueError(f"{self.name} needs the sampling policy's log-probabilities "
                                 "(batch.sampling_logprobs is None)")
            return rebel_losses(logprobs, batch.sampling_logprobs, batch.rewards, eta)
        if batch.reference_logprobs is None:
            raise ValueError(f"{self.name} needs the reference policy's log-probabilities "
                             "(batch.reference_logprobs is None)")
        preferences = preferences_from_rewards(batch.rewards)
        loss = dpo_losses if self.pointwise == "dpo" else ipo_losses
        return loss(logprobs, batch.reference_logprobs, preferences, beta)


def make_method(name: str, *, chi2_rho: float = 0.01, kl_rho: float = 0.01,
                kl_tau: float = 0.1, w_rho: float = 0.01, w_p: float = 2.0) -> Method:
    """The :class:`Method` called ``name`` with the given radii.

    Every radius is validated by its ``drosim.dro`` set, whichever method uses it, so a bad
    value in a config fails even when the method at hand ignores it.

    Raises:
        ValueError: an unknown name, or a radius its set refuses (the message names the
            keyword, e.g. ``chi2_rho: Chi2.rho must be non-negative, got -1.0``).

    Example:
        >>> make_method("chi2-rebel", chi2_rho=0.05)
        Method(name='chi2-rebel', pointwise='rebel', spec=Chi2(rho=0.05))
    """
    chi2 = _build("chi2_rho", Chi2, chi2_rho)
    kl = _build("kl_rho", KL, kl_rho)
    temperature = _build("kl_tau", KLTemperature, kl_tau)
    wasserstein = _build("w_rho, w_p", Wasserstein, w_rho, w_p)
    specs: dict[str, tuple[Pointwise, AmbiguitySet | None]] = {
        "rebel": ("rebel", None),
        "chi2-rebel": ("rebel", chi2),
        "kl-rebel": ("rebel", kl),
        "kltemp-rebel": ("rebel", temperature),
        "w-rebel": ("rebel", wasserstein),
        "dpo": ("dpo", None),
        "ipo": ("ipo", None),
        "wdpo": ("dpo", wasserstein),
        "kl-dpo": ("dpo", temperature),
        "chi2-dpo": ("dpo", chi2),
    }
    if name not in specs:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    pointwise, spec = specs[name]
    return Method(name, pointwise, spec)


def _build(keys: str, ambiguity_set: type[AmbiguitySet], *parameters: float) -> AmbiguitySet:
    """The set, or its own validation error prefixed with the keyword(s) that set it."""
    try:
        return ambiguity_set(*parameters)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{keys}: {err}") from None
