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

    Raises:
        ValueError: an unknown name or a negative radius (from the spec's solver at use, or
            here for the radius this method uses).

    Example:
        >>> make_method("chi2-rebel", chi2_rho=0.05)
        Method(name='chi2-rebel', pointwise='rebel', spec=Chi2(rho=0.05))
    """
    specs: dict[str, tuple[Pointwise, AmbiguitySet | None]] = {
        "rebel": ("rebel", None),
        "chi2-rebel": ("rebel", Chi2(chi2_rho)),
        "kl-rebel": ("rebel", KL(kl_rho)),
        "kltemp-rebel": ("rebel", KLTemperature(kl_tau)),
        "w-rebel": ("rebel", Wasserstein(w_rho, w_p)),
        "dpo": ("dpo", None),
        "ipo": ("ipo", None),
        "wdpo": ("dpo", Wasserstein(w_rho, w_p)),
        "kl-dpo": ("dpo", KLTemperature(kl_tau)),
        "chi2-dpo": ("dpo", Chi2(chi2_rho)),
    }
    if name not in specs:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    pointwise, spec = specs[name]
    _check_spec(spec)
    return Method(name, pointwise, spec)


def _check_spec(spec: AmbiguitySet | None) -> None:
    if isinstance(spec, Chi2 | KL | Wasserstein) and not spec.rho >= 0:
        raise ValueError(f"the radius must be >= 0, got {spec}")
    if isinstance(spec, KLTemperature) and not spec.tau > 0:
        raise ValueError(f"the temperature must be > 0, got {spec}")
    if isinstance(spec, Wasserstein) and not spec.p >= 1:
        raise ValueError(f"the Wasserstein order must be >= 1, got {spec}")
