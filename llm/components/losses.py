"""Pointwise losses on response pairs: REBEL, DPO and IPO.

Each function maps a batch of n pairs (y, y') to n per-sample losses; a robust method is one
of these losses aggregated by :func:`drosim.dro.robust_mean` (see
:mod:`drosim.llm.components.objective`). Log-probabilities come as ``(n, 2)`` tensors, column 0 for
y and column 1 for y'.

REBEL (Gao et al. 2024), with pi_t the policy that sampled the pair:

    l = ( (1/eta) [log pi(y)/pi_t(y) - log pi(y')/pi_t(y')] - (r(y) - r(y')) )^2

DPO (Rafailov et al. 2023) with pi_ref the frozen initial policy and h the log-ratio margin
h = log pi(y)/pi_ref(y) - log pi(y')/pi_ref(y'), for a preference o = P(y preferred to y'):

    l = -o log sigmoid(beta h) - (1 - o) log sigmoid(-beta h)

IPO (Azar et al. 2024): l = (h - (2o - 1) / (2 beta))^2, the squared-loss analogue that
regresses the margin on a fixed target instead of pushing it to infinity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pairs(name: str, tensor: Tensor, n: int | None = None) -> None:
    if tensor.dim() != 2 or tensor.shape[-1] != 2:
        raise ValueError(f"{name} must have shape (n, 2), got {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} is empty: a loss needs at least one pair")
    if n is not None and tensor.shape[0] != n:
        raise ValueError(f"{name} has {tensor.shape[0]} pairs, expected {n}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def log_ratio_margin(logprobs: Tensor, base_logprobs: Tensor) -> Tensor:
    """h = log pi(y)/pi_0(y) - log pi(y')/pi_0(y') for ``(n, 2)`` log-probabilities."""
    _check_pairs("logprobs", logprobs)
    _check_pairs("base_logprobs", base_logprobs, logprobs.shape[0])
    ratios = logprobs - base_logprobs
    return ratios[:, 0] - ratios[:, 1]


def rebel_losses(logprobs: Tensor, sampling_logprobs: Tensor, rewards: Tensor, eta: float
                 ) -> Tensor:
    """REBEL's squared relative-reward regression loss, one per pair.

    Args:
        logprobs: ``(n, 2)`` log pi_theta of (y, y'), differentiable.
        sampling_logprobs: ``(n, 2)`` log pi_t of (y, y') recorded when they were sampled.
        rewards: ``(n, 2)`` scalar rewards r(x, y), r(x, y').
        eta: step size > 0 of the implied mirror-descent step pi_t exp(eta r).

    Returns:
        ``(n,)`` losses.

    Raises:
        ValueError: shapes other than ``(n, 2)``, an empty batch, eta <= 0.

    Example:
        >>> import torch
        >>> lp = torch.tensor([[-1.0, -2.0]])
        >>> rebel_losses(lp, lp, torch.tensor([[1.0, 0.5]]), eta=0.1)  # (0 - 0.5)^2
        tensor([0.2500])
    """
    _check_positive("eta", eta)
    _check_pairs("rewards", rewards, logprobs.shape[0])
    margin = log_ratio_margin(logprobs, sampling_logprobs)
    return (margin / eta - (rewards[:, 0] - rewards[:, 1])).square()


def dpo_losses(logprobs: Tensor, reference_logprobs: Tensor, preferences: Tensor, beta: float
               ) -> Tensor:
    """DPO's logistic loss, one per pair.

    Args:
        logprobs: ``(n, 2)`` log pi_theta of (y, y'), differentiable.
        reference_logprobs: ``(n, 2)`` log pi_ref of (y, y').
        preferences: ``(n,)`` o in [0, 1], the probability that y is preferred.
        beta: inverse temperature > 0.

    Returns:
        ``(n,)`` losses.

    Raises:
        ValueError: bad shapes, an empty batch, beta <= 0, preferences outside [0, 1].

    Example:
        >>> import torch
        >>> lp = torch.zeros(1, 2)
        >>> dpo_losses(lp, lp, torch.ones(1), beta=0.1)  # -log sigmoid(0) = log 2
        tensor([0.6931])
    """
    _check_positive("beta", beta)
    h = log_ratio_margin(logprobs, reference_logprobs)
    o = _check_preferences(preferences, h.shape[0])
    return -o * F.logsigmoid(beta * h) - (1 - o) * F.logsigmoid(-beta * h)


def ipo_losses(logprobs: Tensor, reference_logprobs: Tensor, preferences: Tensor, beta: float
               ) -> Tensor:
    """IPO's squared loss (h - (2o - 1)/(2 beta))^2, one per pair.

    Args and Raises: as :func:`dpo_losses`.

    Example:
        >>> import torch
        >>> lp = torch.zeros(1, 2)
        >>> ipo_losses(lp, lp, torch.ones(1), beta=0.5)  # (0 - 1)^2
        tensor([1.])
    """
    _check_positive("beta", beta)
    h = log_ratio_margin(logprobs, reference_logprobs)
    o = _check_preferences(preferences, h.shape[0])
    return (h - (2 * o - 1) / (2 * beta)).square()


def _check_preferences(preferences: Tensor, n: int) -> Tensor:
    if preferences.shape != (n,):
        raise ValueError(f"preferences must have shape ({n},), got {tuple(preferences.shape)}")
    if not bool(((preferences >= 0) & (preferences <= 1)).all()):
        raise ValueError("preferences must lie in [0, 1]")
    return preferences


def preferences_from_rewards(rewards: Tensor) -> Tensor:
    """o = 1 where r(y) > r(y'), 0 where r(y) < r(y'), 1/2 on ties.

    The online DPO convention: the reward model labels which of the two samples is chosen.

    Example:
        >>> import torch
        >>> preferences_from_rewards(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]))
        tensor([1.0000, 0.0000, 0.5000])
    """
    _check_pairs("rewards", rewards)
    return (torch.sign(rewards[:, 0] - rewards[:, 1]) + 1) / 2
