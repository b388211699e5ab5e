"""Each estimator's own population target: the minimiser of its population robust objective.

A robust estimator minimises a robust objective R_n(theta) of the sample; its population
target is the minimiser of the same objective under the population distribution P of the
pairs instead of the empirical one,

    theta_target = argmin_theta R_P(theta).

The estimator converges to theta_target, and its error to theta* then cannot fall below
the squared bias ||theta_target - theta*||_Sigma^2, whatever n.

* When the robustness vanishes with n (no ambiguity set; a radius c n^(-gamma) or a
  temperature c n^(+gamma) with gamma > 0), R_P tends to the mean loss E_P l, whose
  minimiser in this well-specified world is theta* (the logistic loss is a proper scoring
  rule and the Bradley-Terry labels follow q = sigmoid(<theta*, dphi>)): the target is
  theta*.
* At a fixed temperature tau (KL-DPO), R_P(theta) = tau log E_P exp(l(theta) / tau), and
  the target has a closed form. With s = <theta, dphi>, s* = <theta*, dphi> and DPO's loss
  in the units of theta = beta w (:mod:`drosim.methods`), l_1 = log(1 + e^(-s)) for o = 1
  and l_0 = log(1 + e^(s)) = s + l_1, so

      E_P exp(l / tau) = E_dphi[(1 + e^(-s))^(1/tau) (q + (1 - q) e^(s / tau))].

  log is increasing, so it suffices to minimise the inner term for every dphi. Its
  derivative in s vanishes where q e^(-s) = (1 - q) e^(s / tau), i.e. where
  e^(s (1 + 1/tau)) = q / (1 - q) = e^(s*): at s = tau / (1 + tau) s*. That score is
  linear in dphi, reached by theta = tau / (1 + tau) theta* for every dphi at once, so

      theta_target = tau / (1 + tau) theta*,
      ||theta_target - theta*||_Sigma^2 = ||theta*||_Sigma^2 / (1 + tau)^2,

  unique when Sigma is invertible (the objective is then strictly convex). At tau = 1 the
  tilted logistic loss is the exponential loss and the target is theta* / 2; at the
  authors' tau = 0.1 it is theta* / 11. A temperature tau_n = c sqrt(n) leaves a squared
  bias ||theta*||_Sigma^2 / (1 + c sqrt(n))^2, about ||theta*||_Sigma^2 / (c^2 n): the
  parametric rate once tau_n >> 1.

A fixed radius has a target of its own too; the studies here do not need it, and
:func:`own_target` refuses it rather than return theta*.
"""

from __future__ import annotations

from torch import Tensor

from drosim.methods import Method
from drosim.studies.montecarlo import ALPHA_0
from drosim.world import LinearWorld

__all__ = ["own_target", "tilted_shrinkage"]


def tilted_shrinkage(tau: float) -> float:
    """tau / (1 + tau): the factor by which a fixed temperature shrinks DPO's target theta*.

    Example:
        >>> tilted_shrinkage(1.0), round(tilted_shrinkage(0.1), 4)
        (0.5, 0.0909)
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return tau / (1 + tau)


def own_target(method: Method, world: LinearWorld) -> Tensor:
    """A method's population target (module note): theta* when its robustness vanishes.

    Args:
        method: a method of :mod:`drosim.methods`.
        world: the world the pairs come from (the training mixture ALPHA_0).

    Returns:
        ``(d,)`` theta_target, in the units of theta*.

    Raises:
        ValueError: a fixed radius (gamma = 0 for a ball or Wasserstein), or a fixed
            temperature with the REBEL loss, whose targets are not derived here.
    """
    theta_star = world.reward_parameter(world.features.new_tensor(ALPHA_0))
    if method.family == "none" or method.gamma > 0:
        return theta_star
    if method.family == "kl_temperature" and method.loss == "dpo":
        return tilted_shrinkage(method.c) * theta_star
    raise ValueError(f"no population target for {method.name} ({method.family}, "
                     f"{method.loss}, fixed size c = {method.c}) is derived here")
