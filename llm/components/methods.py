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

A ball (chi2-*, kl-rebel) takes its radius from ``chi2_rho`` / ``kl_rho``, or from
``protect_fraction``, the mass of the smallest subpopulation it must protect
(:func:`make_method`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from drosim.dro import KL, AmbiguitySet, Chi2, KLTemperature, Wasserstein
from drosim.llm.components.batch import PairBatch
from drosim.llm.components.losses import (
    dpo_losses,
    ipo_losses,
    preferences_from_rewards,
    rebel_losses,
)

Pointwise = Literal["rebel", "dpo", "ipo"]
# The family of a method's ambiguity set; None: the plain mean.
Family = Literal["chi2", "kl", "kltemp", "w"]

# method -> (its pointwise loss, its set's family), in the order of the table above
_METHOD_SETS: dict[str, tuple[Pointwise, Family | None]] = {
    "rebel": ("rebel", None),
    "chi2-rebel": ("rebel", "chi2"),
    "kl-rebel": ("rebel", "kl"),
    "kltemp-rebel": ("rebel", "kltemp"),
    "w-rebel": ("rebel", "w"),
    "dpo": ("dpo", None),
    "ipo": ("ipo", None),
    "wdpo": ("dpo", "w"),
    "kl-dpo": ("dpo", "kltemp"),
    "chi2-dpo": ("dpo", "chi2"),
}
METHODS: tuple[str, ...] = tuple(_METHOD_SETS)
# The families that are divergence balls: the keyword of their radius and their set.
_BALLS: dict[Family, tuple[str, type[Chi2] | type[KL]]] = {
    "chi2": ("chi2_rho", Chi2), "kl": ("kl_rho", KL)}
# The one home of the method keys' defaults (the config's method section and the benchmarks
# read them here): chi2_rho and kl_rho when neither they nor protect_fraction are given, the
# KL temperature and the Wasserstein set's radius and order.
DEFAULT_RADIUS = 0.01
DEFAULT_KL_TAU = 0.1
DEFAULT_W_RHO = 0.01
DEFAULT_W_P = 2.0
# How the Wasserstein penalty's gradient is taken: "finite-difference" (of two first-order
# gradients) or "exact" (a double backward, for verification).
W_GRADIENTS: tuple[str, ...] = ("finite-difference", "exact")


@dataclass(frozen=True)
class Method:
    """A pointwise loss and the ambiguity set that aggregates it.

    Attributes:
        name: one of :data:`METHODS`.
        pointwise: "rebel", "dpo" or "ipo".
        spec: the drosim.dro ambiguity set, None for the plain mean.
        w_gradient: how a Wasserstein penalty's gradient is taken, one of
            :data:`W_GRADIENTS` (ignored by the other sets).
    """

    name: str
    pointwise: Pointwise
    spec: AmbiguitySet | None
    w_gradient: str = W_GRADIENTS[0]

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

    @property
    def needs_input_gradients(self) -> bool:
        """True for a Wasserstein set: its penalty needs the losses' input-embedding
        gradients (an embedding hook per step, a finite difference or double backward)."""
        return self.spec is not None and self.spec.needs_input_gradients

    @property
    def reweights(self) -> bool:
        """True when the set weighs the pairs (a chi-square or KL ball, a KL temperature):
        it has worst-case weights q_i, which ``robust_scope=iteration`` shares over an
        iteration. False for the mean and for a Wasserstein set (a penalty on input-gradient
        norms, its pair weights uniform)."""
        return self.spec is not None and not self.needs_input_gradients


def make_method(name: str, *, chi2_rho: float | None = None, kl_rho: float | None = None,
                kl_tau: float = DEFAULT_KL_TAU, w_rho: float = DEFAULT_W_RHO,
                w_p: float = DEFAULT_W_P, protect_fraction: float | None = None,
                w_gradient: str = W_GRADIENTS[0]) -> Method:
    """The :class:`Method` called ``name`` with the given radii.

    Every radius is validated by its ``drosim.dro`` set, whichever method uses it, so a bad
    value in a config fails even when the method at hand ignores it. A ball's radius
    (``chi2_rho`` for chi2-*, ``kl_rho`` for kl-rebel) is given directly, or by
    ``protect_fraction`` f: the smallest ball holding every reweighting onto a subpopulation
    of mass f (``Chi2.protecting(f)``, rho = (1/f - 1) / 2; ``KL.protecting(f)``,
    rho = log(1/f)); neither gives :data:`DEFAULT_RADIUS`. ``w_gradient`` (one of
    :data:`W_GRADIENTS`) is how a Wasserstein penalty's gradient is taken.

    Raises:
        ValueError: an unknown name or ``w_gradient``, a radius its set refuses (the message
            names the keyword, e.g. ``chi2_rho: Chi2.rho must be non-negative, got -1.0``), a
            ``protect_fraction`` outside (0, 1] or NaN, or given to a method without a ball,
            or given together with that ball's radius.

    Example:
        >>> make_method("chi2-rebel", chi2_rho=0.05).spec
        Chi2(rho=0.05)
        >>> make_method("kl-rebel", protect_fraction=0.25).spec.rho == KL.protecting(0.25).rho
        True
    """
    if name not in _METHOD_SETS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    if w_gradient not in W_GRADIENTS:
        raise ValueError(f"w_gradient must be one of {', '.join(W_GRADIENTS)}, got "
                         f"{w_gradient!r}")
    pointwise, family = _METHOD_SETS[name]
    sets: dict[Family, AmbiguitySet] = {
        "chi2": _build("chi2_rho", Chi2, DEFAULT_RADIUS if chi2_rho is None else chi2_rho),
        "kl": _build("kl_rho", KL, DEFAULT_RADIUS if kl_rho is None else kl_rho),
        "kltemp": _build("kl_tau", KLTemperature, kl_tau),
        "w": _build("w_rho, w_p", Wasserstein, w_rho, w_p),
    }
    if protect_fraction is not None:
        if family not in _BALLS:
            raise ValueError(f"protect_fraction sets the radius of a chi-square or KL ball, "
                             f"and {name} has none: use chi2-rebel, chi2-dpo or kl-rebel, or "
                             "leave protect_fraction unset")
        key, ball = _BALLS[family]
        if {"chi2_rho": chi2_rho, "kl_rho": kl_rho}[key] is not None:
            raise ValueError(f"protect_fraction and {key} both set {name}'s radius: give one "
                             "of them (the other null)")
        sets[family] = _build("protect_fraction", ball.protecting, protect_fraction)
    return Method(name, pointwise, None if family is None else sets[family], w_gradient)


def _build(keys: str, ambiguity_set: Callable[..., AmbiguitySet], *parameters: float
           ) -> AmbiguitySet:
    """The set, or its own validation error prefixed with the keyword(s) that set it."""
    try:
        return ambiguity_set(*parameters)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{keys}: {err}") from None
