"""The linear-reward / log-linear-policy world of DRO-REBEL's theory (paper section 2).

A world has P prompts, K candidate responses per prompt and features phi(x, y) in R^d.
Objectives are linear, r_j(x, y) = <theta_j*, phi(x, y)> for j = 1..m, and a preference
mixture alpha in the simplex rewards r_alpha = sum_j alpha_j r_j. Policies are log-linear,
pi_theta(y | x) proportional to exp<theta, phi(x, y)>, so every expectation over responses
is an exact softmax-weighted sum over the K candidates.

Sampling is batched over a leading trials dimension T: ``theta`` of shape (T, d) gives T
independent policies and every sampled tensor has T in front. All randomness comes from a
``torch.Generator``, so the same seed gives the same numbers on the same device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LinearWorld", "PairBatch", "make_world"]


@dataclass(frozen=True)
class PairBatch:
    """n response pairs per trial, sampled from a policy.

    Attributes:
        dphi: ``(T, n, d)`` feature differences phi(x, y) - phi(x, y').
        dr: ``(T, n)`` observed relative rewards r_alpha(x, y) - r_alpha(x, y') + noise.
        pref: ``(T, n)`` Bradley-Terry labels o ~ Bernoulli(sigmoid(true relative reward)),
            1.0 when y is preferred.
        prompts: ``(T, n)`` prompt indices.
        responses: ``(T, n, 2)`` indices of y and y' among the K candidates.
    """

    dphi: Tensor
    dr: Tensor
    pref: Tensor
    prompts: Tensor
    responses: Tensor


@dataclass(frozen=True)
class LinearWorld:
    """A finite world: features, reward objectives, and the noise of observed rewards.

    Attributes:
        features: ``(P, K, d)`` phi(x, y) for P prompts and K responses each.
        objectives: ``(m, d)`` reward parameters theta_j*, one row per objective.
        noise: standard deviation of the noise added to each observed relative reward.
        noise_kind: "gaussian", or "rademacher" (+-noise with probability 1/2 each: still
            sub-Gaussian, and it keeps the data distribution finitely supported, so its
            divergence from an empirical distribution is computable exactly).
    """

    features: Tensor
    objectives: Tensor
    noise: float = 0.0
    noise_kind: str = "gaussian"

    def __post_init__(self) -> None:
        if self.features.ndim != 3:
            raise ValueError(f"features must be (P, K, d), got {tuple(self.features.shape)}")
        if self.features.shape[1] < 2:
            raise ValueError("each prompt needs at least K = 2 candidate responses")
        if self.objectives.ndim != 2 or self.objectives.shape[1] != self.features.shape[2]:
            raise ValueError(f"objectives must be (m, d) with d = {self.features.shape[2]}, "
                             f"got {tuple(self.objectives.shape)}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if self.noise_kind not in ("gaussian", "rademacher"):
            raise ValueError(f"noise_kind must be 'gaussian' or 'rademacher', got "
                             f"{self.noise_kind!r}")

    @property
    def dim(self) -> int:
        return self.features.shape[2]

    def reward_parameter(self, alpha: Tensor) -> Tensor:
        """theta_alpha = sum_j alpha_j theta_j*, for mixtures ``(..., m)`` -> ``(..., d)``."""
        alpha = torch.as_tensor(alpha, dtype=self.features.dtype, device=self.features.device)
        if alpha.shape[-1] != self.objectives.shape[0]:
            raise ValueError(f"a mixture has {self.objectives.shape[0]} weights, got "
                             f"{alpha.shape[-1]}")
        if bool((alpha < 0).any()) or not torch.allclose(alpha.sum(-1), torch.ones(())
                                                         .to(alpha)):
            raise ValueError("a preference mixture alpha must lie in the simplex")
        return alpha @ self.objectives

    def policy(self, theta: Tensor) -> Tensor:
        """pi_theta(y | x) for every prompt: ``theta (..., d)`` -> ``(..., P, K)``."""
        logits = torch.einsum("pkd,...d->...pk", self.features, theta)
        return torch.softmax(logits, -1)

    def expected_reward(self, theta: Tensor, alpha: Tensor) -> Tensor:
        """E_x E_{y ~ pi_theta}[r_alpha(x, y)], prompts uniform.

        Args:
            theta: ``(..., d)`` policy parameters.
            alpha: ``(A, m)`` mixtures (or ``(m,)`` for one).

        Returns:
            ``(..., A)`` (or ``(...)`` for one mixture) exact expected rewards.
        """
        mixtures = alpha if alpha.ndim == 2 else alpha.unsqueeze(0)
        rewards = torch.einsum("pkd,ad->apk", self.features, self.reward_parameter(mixtures))
        value = torch.einsum("...pk,apk->...a", self.policy(theta), rewards)
        value = value / self.features.shape[0]
        return value if alpha.ndim == 2 else value.squeeze(-1)

    def pair_covariance(self, theta: Tensor) -> Tensor:
        """Sigma = E[dphi dphi^T] for x uniform and y, y' iid from pi_theta(. | x).

        For fixed x, E[(phi(y) - phi(y'))(phi(y) - phi(y'))^T] = 2 Cov_pi(phi | x), so
        Sigma = 2 E_x Cov_{pi(.|x)}(phi). ``theta (..., d)`` -> ``(..., d, d)``.
        """
        pi = self.policy(theta)
        mean = torch.einsum("...pk,pkd->...pd", pi, self.features)
        second = torch.einsum("...pk,pkd,pke->...de", pi, self.features, self.features)
        outer = torch.einsum("...pd,...pe->...de", mean, mean)
        return 2 * (second - outer) / self.features.shape[0]

    def sample_pairs(self, theta: Tensor, n: int, alpha: Tensor,
                     generator: torch.Generator | None = None) -> PairBatch:
        """Sample n (x, y, y') per trial from pi_theta and score them under alpha.

        Args:
            theta: ``(T, d)`` one policy per trial.
            n: pairs per trial.
            alpha: ``(m,)`` the mixture that generates rewards and preferences.
            generator: the source of randomness (on theta's device).

        Returns:
            A PairBatch with leading dimensions (T, n).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if theta.ndim != 2 or theta.shape[1] != self.dim:
            raise ValueError(f"theta must be (T, {self.dim}), got {tuple(theta.shape)}")
        trials, (prompts_total, k, _) = theta.shape[0], self.features.shape
        device, dtype = self.features.device, self.features.dtype
        prompts = torch.randint(prompts_total, (trials, n), generator=generator, device=device)
        pi = self.policy(theta)  # (T, P, K)
        probs = torch.gather(pi, 1, prompts.unsqueeze(-1).expand(trials, n, k))
        responses = torch.multinomial(probs.reshape(-1, k), 2, replacement=True,
                                      generator=generator).reshape(trials, n, 2)
        phi = self.features[prompts.unsqueeze(-1), responses]  # (T, n, 2, d)
        dphi = phi[..., 0, :] - phi[..., 1, :]
        true_dr = dphi @ self.reward_parameter(alpha)
        noise = torch.randn(true_dr.shape, generator=generator, device=device, dtype=dtype)
        if self.noise_kind == "rademacher":
            noise = noise.sign()
        pref = torch.bernoulli(torch.sigmoid(true_dr), generator=generator)
        return PairBatch(dphi, true_dr + self.noise * noise, pref, prompts, responses)


def make_world(dim: int, prompts: int = 64, responses: int = 8, objectives: int = 3,
               reward_scale: float = 1.0, noise: float = 0.1, seed: int = 0,
               dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
               noise_kind: str = "gaussian") -> LinearWorld:
    """A random world: Gaussian features, objectives of norm ``reward_scale``.

    Features are N(0, I / d), so a reward <theta, phi> has standard deviation ||theta|| / sqrt(d);
    the objectives are drawn uniformly on the sphere of radius ``reward_scale * sqrt(d)``, so
    rewards have standard deviation ``reward_scale`` whatever d is.

    Example:
        >>> w = make_world(dim=4, seed=0)
        >>> tuple(w.features.shape), tuple(w.objectives.shape)
        ((64, 8, 4), (3, 4))
    """
    if dim < 1 or prompts < 1 or responses < 2 or objectives < 1:
        raise ValueError("need dim >= 1, prompts >= 1, responses >= 2 and objectives >= 1")
    if reward_scale <= 0:
        raise ValueError(f"reward_scale must be positive, got {reward_scale}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    features = torch.randn(prompts, responses, dim, generator=gen, dtype=torch.float64)
    features /= dim**0.5
    theta = torch.randn(objectives, dim, generator=gen, dtype=torch.float64)
    theta *= reward_scale * dim**0.5 / theta.norm(dim=1, keepdim=True)
    return LinearWorld(features.to(device, dtype), theta.to(device, dtype), noise, noise_kind)
