"""Online (DRO-)REBEL in the linear world: T rounds of sample, regress, step.

Round t samples n pairs from pi_{theta_t}, fits w_t with an estimator of
:mod:`drosim.estimators`, and moves theta_{t+1} = theta_t + eta * w_t (paper sections 1-2).
With exact, noiseless, well-specified relative rewards w_t = theta_alpha, so the iterates
follow the exact mirror-descent step pi_{t+1} proportional to pi_t exp(eta r_alpha), i.e.
theta_{t+1} = theta_t + eta * theta_alpha (:func:`mirror_descent`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from drosim.dro import AmbiguitySet
from drosim.estimators import dpo, rebel
from drosim.world import LinearWorld

__all__ = ["OnlineRun", "mirror_descent", "online_rebel"]


@dataclass(frozen=True)
class OnlineRun:
    """The trajectory of an online run, batched over trials.

    Attributes:
        thetas: ``(rounds + 1, T, d)`` policy parameters theta_0 .. theta_rounds.
        rewards: ``(rounds + 1, T, A)`` exact expected reward of every iterate under every
            evaluation mixture.
    """

    thetas: Tensor
    rewards: Tensor


def online_rebel(world: LinearWorld, theta0: Tensor, alpha: Tensor, *, n: int, rounds: int,
                 eta: float, spec: AmbiguitySet | None = None, method: str = "rebel",
                 beta: float = 1.0, eval_mixtures: Tensor | None = None,
                 eval_prompt_probs: Tensor | None = None,
                 generator: torch.Generator | None = None) -> OnlineRun:
    """Run online (DRO-)REBEL (or DPO re-fitted on fresh on-policy pairs) for T trials.

    Args:
        world: the linear world.
        theta0: ``(T, d)`` initial policies, one per trial.
        alpha: ``(m,)`` the training mixture alpha_0.
        n: pairs sampled per round and trial.
        rounds: number of online rounds.
        eta: REBEL's step size (the mirror-descent step pi_t exp(eta r)).
        spec: the ambiguity set of the regression (None: plain REBEL).
        method: "rebel" (regress relative rewards) or "dpo" (logistic regression of the
            Bradley-Terry labels; w estimates theta_alpha when beta = 1).
        beta: DPO's inverse temperature.
        eval_mixtures: ``(A, m)`` mixtures to evaluate (default: alpha alone).
        eval_prompt_probs: ``(P,)`` the prompt distribution the rewards are evaluated under
            (default: the world's training one); another one measures covariate shift.
        generator: randomness for sampling.

    Returns:
        OnlineRun with the trajectory and exact rewards.

    Example:
        >>> import torch
        >>> from drosim.world import make_world
        >>> w = make_world(dim=3, noise=0.0, seed=0)
        >>> alpha = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        >>> run = online_rebel(w, torch.zeros(2, 3, dtype=torch.float64), alpha, n=32,
        ...                    rounds=3, eta=0.5)
        >>> torch.allclose(run.thetas[-1], mirror_descent(torch.zeros(2, 3, dtype=torch.float64),
        ...                w.reward_parameter(alpha), 0.5, 3)[-1])
        True
    """
    if method not in ("rebel", "dpo"):
        raise ValueError(f"method must be 'rebel' or 'dpo', got {method!r}")
    if rounds < 0 or eta <= 0:
        raise ValueError(f"need rounds >= 0 and eta > 0, got {rounds} and {eta}")
    mixtures = alpha.unsqueeze(0) if eval_mixtures is None else eval_mixtures
    thetas, theta = [theta0], theta0
    for _ in range(rounds):
        pairs = world.sample_pairs(theta, n, alpha, generator)
        if method == "rebel":
            fit = rebel(pairs.dphi, pairs.dr, spec)
        else:
            fit = dpo(pairs.dphi, pairs.pref, beta, spec)
        theta = theta + eta * fit.w
        thetas.append(theta)
    trajectory = torch.stack(thetas)
    return OnlineRun(trajectory, world.expected_reward(trajectory, mixtures, eval_prompt_probs))


def mirror_descent(theta0: Tensor, reward_parameter: Tensor, eta: float, rounds: int) -> Tensor:
    """Exact mirror descent pi_{t+1} proportional to pi_t exp(eta r): theta_t + eta theta_r.

    Returns ``(rounds + 1, *theta0.shape)``.
    """
    steps = torch.arange(rounds + 1, dtype=theta0.dtype, device=theta0.device)
    return theta0 + eta * steps.reshape(-1, *([1] * theta0.ndim)) * reward_parameter
