"""Finitely supported linear worlds: their atoms, and robust fits from atom weights.

In a world with finitely many prompts and responses and a two-point noise, every observation
is one of finitely many outcomes o = (x, y, y', noise level, label). REBEL sees
z = (dphi, dr) and DPO sees z = (dphi, label): two finite laws, each the image of the law of
the outcomes. A sample of n pairs is then summarised, exactly, by its atom frequencies P_n:
every loss of :mod:`drosim.estimators` is an average over the sample, and the worst case over
a chi-square or KL ball puts equal weight on equal samples (the set and the objective are
invariant under permuting them, and both are convex; W-REBEL's and WDPO's exact forms
depend on the sample only through E_{P_n} l), so

    min_w sup_{D(Q || P_n) <= rho} E_Q[l(w, z)]

is the same problem whether Q reweights the n samples or the S atoms. :func:`robust_fit`
solves it from atom weights with the estimators of :mod:`drosim.estimators` (their
``weights``), so a fit costs O(S), not O(n), and the same estimators, fed P itself, give
the population robust target theta^rho. This module only enumerates the outcomes.

The two-point noise is sigma * (-sqrt(3) w.p. 1/4, +1/sqrt(3) w.p. 3/4) (mean 0, variance
sigma^2), independent of the pair in the plain and misspecified worlds and multiplied by
sign<u, dphi> in the skewed one (:mod:`drosim.world`'s ``noise_kind="skewed"``, u the first
objective's direction, sign +1 at 0), so its skew depends on dphi there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from drosim.dro import KL, Chi2, Wasserstein
from drosim.estimators import dpo, rebel
from drosim.world import SKEW_PROBS, SKEW_VALUES, LinearWorld, PairBatch

__all__ = ["NOISE_PROBS", "NOISE_VALUES", "FiniteSupport", "Outcomes",
           "outcome_index", "outcomes", "robust_fit", "sample"]

# The two-point noise is the skewed world's, times the noise scale (signs: world.noise_sign).
NOISE_VALUES, NOISE_PROBS = SKEW_VALUES, SKEW_PROBS


@dataclass(frozen=True)
class FiniteSupport:
    """A finitely supported law of z = (dphi, last), last = dr (REBEL) or the label (DPO).

    Attributes:
        atoms: ``(S, d + 1)`` the distinct values of z.
        probs: ``(S,)`` their probabilities.
        index: ``(J,)`` the atom of each outcome (see :class:`Outcomes`).
    """

    atoms: Tensor
    probs: Tensor
    index: Tensor

    @property
    def size(self) -> int:
        return self.atoms.shape[0]

    def weights(self, outcome_weights: Tensor) -> Tensor:
        """Push ``(..., J)`` outcome weights (counts or frequencies) onto the atoms."""
        shape = (*outcome_weights.shape[:-1], self.size)
        found = outcome_weights.new_zeros(shape)
        return found.index_add_(-1, self.index, outcome_weights)


@dataclass(frozen=True)
class Outcomes:
    """Every outcome (x, y, y', level, label), row-major, and the two laws it induces.

    Attributes:
        probs: ``(J,)`` the outcome probabilities, J = P K K L 2 (L noise levels).
        rebel: the law of (dphi, dr).
        dpo: the law of (dphi, label).
        noise_scale: sigma of the two-point noise.
    """

    probs: Tensor
    rebel: FiniteSupport
    dpo: FiniteSupport
    noise_scale: float

    def support(self, loss: str) -> FiniteSupport:
        """The law the estimator of ``loss`` ("rebel" or "dpo") sees."""
        return self.rebel if loss == "rebel" else self.dpo


def _merge(values: Tensor, mass: Tensor) -> FiniteSupport:
    """Distinct rows of ``values (J, d + 1)`` with their summed ``mass``."""
    atoms, index = torch.unique(values, dim=0, return_inverse=True)
    probs = mass.new_zeros(atoms.shape[0]).index_add_(0, index, mass)
    return FiniteSupport(atoms, probs, index)


def outcomes(world: LinearWorld, noise_scale: float, alpha: Tensor) -> Outcomes:
    """Enumerate the outcomes of ``world`` under the uniform sampling policy.

    P(x, y, y', level, label) = P(x) pi(y|x) pi(y'|x) p(level) P(label | x, y, y'), with
    P(label = 1 | x, y, y') = sigmoid(r(x, y) - r(x, y')) (Bradley-Terry on the true reward,
    misspecified part included) and dr = r(x, y) - r(x, y') + noise_scale * sign * value.

    Args:
        world: a finite world; its own noise scale is not used (noise_scale is).
        noise_scale: sigma of the two-point noise.
        alpha: ``(m,)`` the scoring mixture.

    Returns:
        The outcomes and the laws of (dphi, dr) and (dphi, label).
    """
    features = world.features
    prompts, k, _ = features.shape
    values = noise_scale * features.new_tensor(NOISE_VALUES)
    x, y, y2, level, label = (g.flatten() for g in torch.meshgrid(
        *(torch.arange(s, device=features.device)
          for s in (prompts, k, k, len(NOISE_VALUES), 2)), indexing="ij"))
    pi = world.policy(features.new_zeros(world.dim))
    rewards = world.true_rewards(alpha)
    gap = rewards[x, y] - rewards[x, y2]
    dphi = features[x, y] - features[x, y2]
    won = torch.sigmoid(gap)
    mass = (world.prompt_weights()[x] * pi[x, y] * pi[x, y2]
            * features.new_tensor(NOISE_PROBS)[level] * torch.where(label == 1, won, 1 - won))
    dr = gap + world.noise_sign(dphi) * values[level]
    rebel = _merge(torch.cat([dphi, dr.unsqueeze(-1)], -1), mass)
    dpo = _merge(torch.cat([dphi, label.unsqueeze(-1).to(dphi)], -1), mass)
    return Outcomes(mass, rebel, dpo, noise_scale)


def sample(world: LinearWorld, noise_scale: float, alpha: Tensor, trials: int, n: int,
           generator: torch.Generator) -> PairBatch:
    """n pairs per trial from the uniform policy, with the two-point noise of
    :func:`outcomes`: the world's own when it has one (the skewed world), else added here."""
    theta = world.features.new_zeros(trials, world.dim)
    pairs = world.sample_pairs(theta, n, alpha, generator)
    if world.noise > 0:
        return pairs
    probs = world.features.new_tensor(NOISE_PROBS)
    level = torch.multinomial(probs, pairs.dr.numel(), replacement=True,
                              generator=generator).reshape(pairs.dr.shape)
    noise = noise_scale * world.features.new_tensor(NOISE_VALUES)[level]
    return PairBatch(pairs.dphi, pairs.dr + noise, pairs.pref, pairs.prompts,
                     pairs.responses, pairs.annotator)


def outcome_index(world: LinearWorld, pairs: PairBatch, noise_scale: float, alpha: Tensor
                  ) -> Tensor:
    """The outcome of each sampled pair, ``(T, n)``, in :func:`outcomes`' order.

    The noise level is read off the pair: |noise| is sqrt(3) sigma (level 0) or
    sigma / sqrt(3) (level 1), so a threshold at sigma separates them.
    """
    rewards = world.true_rewards(alpha)
    gap = (rewards[pairs.prompts, pairs.responses[..., 0]]
           - rewards[pairs.prompts, pairs.responses[..., 1]])
    level = ((pairs.dr - gap).abs() < noise_scale).long()
    k = world.features.shape[1]
    key = (pairs.prompts * k + pairs.responses[..., 0]) * k + pairs.responses[..., 1]
    return (key * len(NOISE_VALUES) + level) * 2 + pairs.pref.long()


def robust_fit(atoms: Tensor, probs: Tensor, rho: Tensor, loss: str, family: str) -> Tensor:
    """argmin_w sup_{Q in ball(probs, rho)} E_Q[l(w, z)] for a batch of atom weights.

    The estimators of :mod:`drosim.estimators` with P = the atom weights (``weights=``),
    one batched call per distinct radius: REBEL's squared loss or DPO's logistic loss at
    beta = 1, aggregated by the family's set (W-REBEL's exact type 2 and WDPO's type 1
    forms for "wasserstein"). Each fit is certified exact (see :class:`drosim.estimators.Fit`).

    Args:
        atoms: ``(S, d + 1)`` the support, rows (dphi, dr) or (dphi, label).
        probs: ``(B, S)`` one weighting per problem (P_n, or P for the population).
        rho: ``(B,)`` radii (ignored for "none").
        loss: "rebel" or "dpo".
        family: "none", "chi2", "kl" or "wasserstein".

    Returns:
        ``(B, d)`` the minimisers w.
    """
    batch = probs.shape[0]
    dphi = atoms[:, :-1].expand(batch, *atoms[:, :-1].shape)
    last = atoms[:, -1].expand(batch, -1)
    radii = torch.zeros_like(rho) if family == "none" else rho
    w = dphi.new_empty(batch, dphi.shape[-1])
    for value in torch.unique(radii).tolist():
        rows = radii == value
        spec = _ambiguity_set(family, value, loss)
        fit = (rebel(dphi[rows], last[rows], spec, weights=probs[rows]) if loss == "rebel"
               else dpo(dphi[rows], last[rows], 1.0, spec, weights=probs[rows]))
        w[rows] = fit.w
    return w


def _ambiguity_set(family: str, rho: float, loss: str) -> Chi2 | KL | Wasserstein | None:
    """The family's set at radius rho (Wasserstein: type 2 for REBEL, 1 for DPO, the orders
    whose worst cases the estimators know exactly)."""
    if family == "none":
        return None
    if family == "wasserstein":
        return Wasserstein(rho, p=2.0 if loss == "rebel" else 1.0)
    return {"chi2": Chi2, "kl": KL}[family](rho)
