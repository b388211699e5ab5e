"""drosim: distributionally robust REBEL, from exact duals to transformer policies."""

from drosim.dro import (
    KL,
    AmbiguitySet,
    Chi2,
    DROResult,
    KLTemperature,
    Wasserstein,
    WassersteinResult,
    chi2_worst_case,
    kl_tilted,
    kl_worst_case,
    robust_mean,
    wasserstein_linear_sq_worst_case,
    wasserstein_penalty,
)

__version__ = "0.1.0"

__all__ = [
    "KL",
    "AmbiguitySet",
    "Chi2",
    "DROResult",
    "KLTemperature",
    "Wasserstein",
    "WassersteinResult",
    "chi2_worst_case",
    "kl_tilted",
    "kl_worst_case",
    "robust_mean",
    "wasserstein_linear_sq_worst_case",
    "wasserstein_penalty",
]
