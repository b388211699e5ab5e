"""The linear-reward / log-linear-policy world of DRO-REBEL's theory (paper section 2).

A world has P prompts, K candidate responses per prompt and features phi(x, y) in R^d.
Objectives are linear, r_j(x, y) = <theta_j*, phi(x, y)> for j = 1..m, and a preference
mixture alpha in the simplex rewards r_alpha = sum_j alpha_j r_j. Policies are log-linear,
pi_theta(y | x) proportional to exp<theta, phi(x, y)>, so every expectation over responses
is an exact softmax-weighted sum over the K candidates.

Sampling is batched over a leading trials dimension T: ``theta`` of shape (T, d) gives T
independent policies and every sampled tensor has T in front. All randomness comes from a
``torch.Generator``, so the same seed gives the same numbers on the same device.

The default world is well specified and homoscedastic: a robust set cannot move the target of
the relative-reward regression there (reweighting pairs by their loss keeps
E_Q[noise * dphi] = 0 when the noise is independent of dphi). The options of
:class:`LinearWorld` build worlds where it can (each off by default; with every option off
the random draws are those of the plain world):

* ``noise_kind="skewed"``: two-point noise (-sqrt(3) w.p. 1/4, 1/sqrt(3) w.p. 3/4; mean 0,
  variance 1) whose sign flips with the sign of <u, dphi>, so its skew depends on dphi;
  ``noise_kind="student_t3"``: heavy-tailed Student t with 3 degrees of freedom, scaled to
  variance 1; ``noise_slope``: heteroscedastic scale, sd = noise * (1 + noise_slope *
  |<u, dphi>| / E|<u, dphi>|) (u = ``noise_direction``, by default the first objective's
  direction);
* ``misspecification``: the true reward is <theta_alpha, phi> + m * q(phi) with
  q(phi) = d * <v, phi>^2 - |phi|^2 (v = the last coordinate axis), a quadratic the linear
  features cannot express;
* ``contamination``: epsilon-contamination, each pair with probability epsilon has its
  observed relative reward replaced by -3 times the true one and its label flipped;
* ``annotator_fraction`` and ``annotator_alpha``: heterogeneous annotators, that fraction of
  pairs (at random) is scored and labelled under another mixture;
* ``prompt_probs``: the training prompt distribution (uniform by default); evaluation may
  use another one (:meth:`LinearWorld.expected_reward`'s ``prompt_probs``): covariate shift.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["NOISE_KINDS", "SKEW_PROBS", "SKEW_VALUES", "LinearWorld", "PairBatch",
           "make_world"]

NOISE_KINDS = ("gaussian", "rademacher", "student_t3", "skewed")
# The skewed noise's two values and their probabilities: mean 0, variance 1.
SKEW_VALUES = (-math.sqrt(3.0), 1 / math.sqrt(3.0))
SKEW_PROBS = (0.25, 0.75)
_CONTAMINATION_FACTOR = -3.0  # a contaminated pair reports this times its true reward gap


def _check_real(name: str, value: object, low: float = -math.inf, high: float = math.inf, *,
                positive: bool = False) -> None:
    """The one rule for a world's float option: a real number (not a bool), finite, in
    [low, high) (NaN and infinity refused whatever the bounds); > 0 where ``positive``.

    Raises:
        TypeError: not a real number.
        ValueError: NaN, infinite or out of range; the message names the option.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if math.isfinite(value) and low <= value < high and not (positive and value <= 0):
        return
    if positive:
        raise ValueError(f"{name} must be > 0 and finite, got {value}")
    if math.isfinite(high):
        raise ValueError(f"{name} must be in [{low:g}, {high:g}), got {value}")
    if math.isfinite(low):
        raise ValueError(f"{name} must be >= {low:g} and finite, got {value}")
    raise ValueError(f"{name} must be finite, got {value}")


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
        annotator: ``(T, n)`` True where the pair was scored under the world's
            ``annotator_alpha`` instead of the training mixture (None when built by hand).
    """

    dphi: Tensor
    dr: Tensor
    pref: Tensor
    prompts: Tensor
    responses: Tensor
    annotator: Tensor | None = None


@dataclass(frozen=True)
class LinearWorld:
    """A finite world: features, reward objectives, and the noise of observed rewards.

    Attributes:
        features: ``(P, K, d)`` phi(x, y) for P prompts and K responses each.
        objectives: ``(m, d)`` reward parameters theta_j*, one row per objective.
        noise: standard deviation of the noise added to each observed relative reward.
        noise_kind: one of :data:`NOISE_KINDS`: "gaussian"; "rademacher" (+-noise with
            probability 1/2 each: still sub-Gaussian, and it keeps the data distribution
            finitely supported, so its divergence from an empirical distribution is
            computable exactly); "student_t3" (heavy tails); "skewed" (see the module note).
        noise_slope: heteroscedasticity, >= 0 (0: the same scale for every pair).
        noise_direction: ``(d,)`` the direction u the skew and scale depend on; None: the
            first objective's direction.
        misspecification: m, the weight of the quadratic term the features cannot express.
        contamination: epsilon in [0, 1), the probability a pair is an adversarial outlier.
        annotator_fraction: in [0, 1), the probability a pair is scored under
            ``annotator_alpha``.
        annotator_alpha: ``(m,)`` the other annotators' mixture.
        prompt_probs: ``(P,)`` the training prompt distribution; None: uniform.
    """

    features: Tensor
    objectives: Tensor
    noise: float = 0.0
    noise_kind: str = "gaussian"
    noise_slope: float = 0.0
    noise_direction: Tensor | None = None
    misspecification: float = 0.0
    contamination: float = 0.0
    annotator_fraction: float = 0.0
    annotator_alpha: Tensor | None = None
    prompt_probs: Tensor | None = None

    def __post_init__(self) -> None:
        if self.features.ndim != 3:
            raise ValueError(f"features must be (P, K, d), got {tuple(self.features.shape)}")
        if self.features.shape[1] < 2:
            raise ValueError("each prompt needs at least K = 2 candidate responses")
        if self.objectives.ndim != 2 or self.objectives.shape[1] != self.features.shape[2]:
            raise ValueError(f"objectives must be (m, d) with d = {self.features.shape[2]}, "
                             f"got {tuple(self.objectives.shape)}")
        _check_real("noise", self.noise, low=0.0)
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind must be one of {NOISE_KINDS}, got "
                             f"{self.noise_kind!r}")
        _check_real("noise_slope", self.noise_slope, low=0.0)
        _check_real("misspecification", self.misspecification)
        for name in ("contamination", "annotator_fraction"):
            _check_real(name, getattr(self, name), low=0.0, high=1.0)
        if (self.annotator_fraction > 0) != (self.annotator_alpha is not None):
            raise ValueError("annotator_fraction > 0 and annotator_alpha go together")
        if self.annotator_alpha is not None:
            self.reward_parameter(self.annotator_alpha)  # checks it is a mixture
        if self.noise_direction is not None and tuple(self.noise_direction.shape) != (
                self.dim,):
            raise ValueError(f"noise_direction must be ({self.dim},), got "
                             f"{tuple(self.noise_direction.shape)}")
        if self.prompt_probs is not None:
            probs = self.prompt_probs
            if (tuple(probs.shape) != (self.features.shape[0],) or bool((probs < 0).any())
                    or not math.isclose(float(probs.sum()), 1.0, rel_tol=1e-9)):
                raise ValueError(f"prompt_probs must be a distribution over the "
                                 f"{self.features.shape[0]} prompts")

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

    def true_rewards(self, alpha: Tensor) -> Tensor:
        """r_alpha(x, y) for every prompt and response: ``alpha (..., m)`` -> ``(..., P, K)``.

        <theta_alpha, phi(x, y)>, plus m * q(phi) in a misspecified world (module note).
        """
        linear = torch.einsum("pkd,...d->...pk", self.features, self.reward_parameter(alpha))
        if self.misspecification == 0:
            return linear
        return linear + self.misspecification * self.quadratic_term()

    def quadratic_term(self) -> Tensor:
        """q(phi) = d <v, phi>^2 - |phi|^2 with v the last axis: ``(P, K)``; mean 0 for
        phi ~ N(0, I / d), orthogonal to every linear function of phi."""
        return self.dim * self.features[..., -1] ** 2 - (self.features**2).sum(-1)

    def prompt_weights(self, prompt_probs: Tensor | None = None) -> Tensor:
        """``(P,)`` the prompt distribution: ``prompt_probs``, else the training one."""
        probs = prompt_probs if prompt_probs is not None else self.prompt_probs
        if probs is None:
            return self.features.new_full((self.features.shape[0],),
                                          1 / self.features.shape[0])
        return probs.to(self.features)

    def policy(self, theta: Tensor) -> Tensor:
        """pi_theta(y | x) for every prompt: ``theta (..., d)`` -> ``(..., P, K)``."""
        logits = torch.einsum("pkd,...d->...pk", self.features, theta)
        return torch.softmax(logits, -1)

    def expected_reward(self, theta: Tensor, alpha: Tensor,
                        prompt_probs: Tensor | None = None) -> Tensor:
        """E_x E_{y ~ pi_theta}[r_alpha(x, y)], x from the training prompt distribution or
        ``prompt_probs``.

        Args:
            theta: ``(..., d)`` policy parameters.
            alpha: ``(A, m)`` mixtures (or ``(m,)`` for one).
            prompt_probs: ``(P,)`` the evaluation prompt distribution; None: the training one.

        Returns:
            ``(..., A)`` (or ``(...)`` for one mixture) exact expected rewards.
        """
        mixtures = alpha if alpha.ndim == 2 else alpha.unsqueeze(0)
        rewards = self.true_rewards(mixtures)
        if prompt_probs is None and self.prompt_probs is None:
            value = torch.einsum("...pk,apk->...a", self.policy(theta), rewards)
            value = value / self.features.shape[0]
        else:
            rewards = rewards * self.prompt_weights(prompt_probs)[:, None]
            value = torch.einsum("...pk,apk->...a", self.policy(theta), rewards)
        return value if alpha.ndim == 2 else value.squeeze(-1)

    def pair_covariance(self, theta: Tensor) -> Tensor:
        """Sigma = E[dphi dphi^T] for x from the training prompt distribution and y, y' iid
        from pi_theta(. | x).

        For fixed x, E[(phi(y) - phi(y'))(phi(y) - phi(y'))^T] = 2 Cov_pi(phi | x), so
        Sigma = 2 E_x Cov_{pi(.|x)}(phi). ``theta (..., d)`` -> ``(..., d, d)``.
        """
        pi = self.policy(theta)
        mean = torch.einsum("...pk,pkd->...pd", pi, self.features)
        if self.prompt_probs is None:
            second = torch.einsum("...pk,pkd,pke->...de", pi, self.features, self.features)
            outer = torch.einsum("...pd,...pe->...de", mean, mean)
            return 2 * (second - outer) / self.features.shape[0]
        weights = self.prompt_weights()
        second = torch.einsum("...pk,pkd,pke,p->...de", pi, self.features, self.features,
                              weights)
        outer = torch.einsum("...pd,...pe,p->...de", mean, mean, weights)
        return 2 * (second - outer)

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
        if self.prompt_probs is None:
            prompts = torch.randint(prompts_total, (trials, n), generator=generator,
                                    device=device)
        else:
            prompts = torch.multinomial(self.prompt_weights().expand(trials, -1), n,
                                        replacement=True, generator=generator)
        pi = self.policy(theta)  # (T, P, K)
        probs = torch.gather(pi, 1, prompts.unsqueeze(-1).expand(trials, n, k))
        responses = torch.multinomial(probs.reshape(-1, k), 2, replacement=True,
                                      generator=generator).reshape(trials, n, 2)
        phi = self.features[prompts.unsqueeze(-1), responses]  # (T, n, 2, d)
        dphi = phi[..., 0, :] - phi[..., 1, :]
        true_dr = self._reward_gaps(alpha, dphi, prompts, responses)
        noise = self._noise(dphi, generator)
        pref = torch.bernoulli(torch.sigmoid(true_dr), generator=generator)
        annotator = torch.zeros_like(true_dr, dtype=torch.bool)
        if self.annotator_fraction > 0:
            annotator = torch.rand(true_dr.shape, generator=generator, device=device,
                                   dtype=dtype) < self.annotator_fraction
            other = self._reward_gaps(self.annotator_alpha, dphi, prompts, responses)
            other_pref = torch.bernoulli(torch.sigmoid(other), generator=generator)
            true_dr = torch.where(annotator, other, true_dr)
            pref = torch.where(annotator, other_pref, pref)
        dr = true_dr + self.noise * noise
        if self.contamination > 0:
            outlier = torch.rand(true_dr.shape, generator=generator, device=device,
                                 dtype=dtype) < self.contamination
            dr = torch.where(outlier, _CONTAMINATION_FACTOR * true_dr, dr)
            pref = torch.where(outlier, 1 - pref, pref)
        return PairBatch(dphi, dr, pref, prompts, responses, annotator)

    def _reward_gaps(self, alpha: Tensor, dphi: Tensor, prompts: Tensor, responses: Tensor
                     ) -> Tensor:
        """r_alpha(x, y) - r_alpha(x, y') of sampled pairs: ``(T, n)``."""
        if self.misspecification == 0:  # <theta_alpha, dphi>, as the plain world has it
            return dphi @ self.reward_parameter(alpha)
        table = self.true_rewards(alpha)  # (P, K)
        rewards = table[prompts.unsqueeze(-1), responses]  # (T, n, 2)
        return rewards[..., 0] - rewards[..., 1]

    def noise_sign(self, dphi: Tensor) -> Tensor:
        """``(...)`` the sign the skewed noise is multiplied by, -1 where <u, dphi> < 0 and
        +1 elsewhere (and everywhere for the other noise kinds), for ``dphi (..., d)``."""
        if self.noise_kind != "skewed":
            return torch.ones_like(dphi[..., 0])
        return torch.where(dphi @ self._direction() < 0, -1.0, 1.0).to(dphi)

    def _direction(self) -> Tensor:
        """The unit vector u the noise's skew and scale depend on."""
        u = self.noise_direction if self.noise_direction is not None else self.objectives[0]
        return u.to(self.features) / u.norm()

    def _noise(self, dphi: Tensor, generator: torch.Generator | None) -> Tensor:
        """``(T, n)`` unit-variance noise of the kind asked, scaled per pair by the slope."""
        shape, device, dtype = dphi.shape[:-1], dphi.device, dphi.dtype
        if self.noise_kind == "student_t3":
            normal = torch.randn(shape, generator=generator, device=device, dtype=dtype)
            chi2 = torch.randn((*shape, 3), generator=generator, device=device,
                               dtype=dtype).square().sum(-1)
            noise = normal / torch.sqrt(chi2 / 3) / math.sqrt(3.0)  # t_3 has variance 3
        elif self.noise_kind == "skewed":
            rare = torch.rand(shape, generator=generator, device=device,
                              dtype=dtype) < SKEW_PROBS[0]
            noise = torch.where(rare, SKEW_VALUES[0], SKEW_VALUES[1]).to(dtype)
            noise = noise * self.noise_sign(dphi)
        else:
            noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
            if self.noise_kind == "rademacher":
                noise = noise.sign()
        if self.noise_slope > 0:
            projection = (dphi @ self._direction()).abs()
            # E|<u, dphi>| under the uniform policy, a fixed number of the world
            typical = self._typical_projection()
            noise = noise * (1 + self.noise_slope * projection / typical)
        return noise

    def _typical_projection(self) -> Tensor:
        """E|<u, dphi>| for x from the training prompts and y, y' uniform: the unit of the
        heteroscedastic scale."""
        projected = self.features @ self._direction()  # (P, K)
        gaps = (projected[:, :, None] - projected[:, None, :]).abs().mean((1, 2))
        return (gaps * self.prompt_weights()).sum()


def make_world(dim: int, prompts: int = 64, responses: int = 8, objectives: int = 3,
               reward_scale: float = 1.0, noise: float = 0.1, seed: int = 0,
               dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
               noise_kind: str = "gaussian", **options: Any) -> LinearWorld:
    """A random world: Gaussian features, objectives of norm ``reward_scale``.

    Features are N(0, I / d), so a reward <theta, phi> has standard deviation ||theta|| / sqrt(d);
    the objectives are drawn uniformly on the sphere of radius ``reward_scale * sqrt(d)``, so
    rewards have standard deviation ``reward_scale`` whatever d is. ``options`` are the other
    fields of :class:`LinearWorld` (noise_slope, misspecification, contamination, ...);
    tensors among them are moved to ``device`` and ``dtype``.

    Raises:
        TypeError: a float argument or option that is not a real number.
        ValueError: sizes below their minimum; reward_scale not finite and > 0; noise,
            noise_slope not finite and >= 0; misspecification not finite; contamination,
            annotator_fraction outside [0, 1); or another invalid option (see
            :class:`LinearWorld`).

    Example:
        >>> w = make_world(dim=4, seed=0)
        >>> tuple(w.features.shape), tuple(w.objectives.shape)
        ((64, 8, 4), (3, 4))
        >>> make_world(dim=4, noise_kind="skewed", contamination=0.05).contamination
        0.05
    """
    if dim < 1 or prompts < 1 or responses < 2 or objectives < 1:
        raise ValueError("need dim >= 1, prompts >= 1, responses >= 2 and objectives >= 1")
    _check_real("reward_scale", reward_scale, positive=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    features = torch.randn(prompts, responses, dim, generator=gen, dtype=torch.float64)
    features /= dim**0.5
    theta = torch.randn(objectives, dim, generator=gen, dtype=torch.float64)
    theta *= reward_scale * dim**0.5 / theta.norm(dim=1, keepdim=True)
    options = {key: value.to(device, dtype) if isinstance(value, Tensor) else value
               for key, value in options.items()}
    return LinearWorld(features.to(device, dtype), theta.to(device, dtype), noise, noise_kind,
                       **options)
