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
solves it from atom weights, so a fit costs O(S), not O(n), and the same solver, fed P
itself, gives the population robust target theta^rho.

The two-point noise is sigma * (-sqrt(3) w.p. 1/4, +1/sqrt(3) w.p. 3/4) (mean 0, variance
sigma^2), independent of the pair in the plain and misspecified worlds and multiplied by
sign<u, dphi> in the skewed one (:mod:`drosim.world`'s ``noise_kind="skewed"``, u the first
objective's direction, sign +1 at 0), so its skew depends on dphi there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from drosim.world import SKEW_PROBS, SKEW_VALUES, LinearWorld, PairBatch

__all__ = ["NOISE_PROBS", "NOISE_VALUES", "FiniteSupport", "Outcomes",
           "outcome_index", "outcomes", "robust_fit", "robust_objective", "sample"]

# The two-point noise is the skewed world's, times the noise scale (signs: world.noise_sign).
NOISE_VALUES, NOISE_PROBS = SKEW_VALUES, SKEW_PROBS
_NEWTON_STEPS = 60
# 0 first: on a tie argmin keeps x, so a problem that cannot improve stops moving.
_LINE_SEARCH = torch.tensor([0.0] + [4.0**-k for k in range(11)], dtype=torch.float64)
_GRADIENT_TOLERANCE = 1e-12
_RELATIVE_GAIN = 1e-14
_TINY = 1e-30  # keeps sqrt differentiable at 0


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


def _pointwise(loss: str, w: Tensor, atoms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """l(w, z) per atom with its first two derivatives in the score s = <w, dphi>.

    REBEL: l = (s - dr)^2; DPO (beta = 1): l = log(1 + exp(-t s)), t = 2 label - 1.
    ``w (..., d)`` -> three ``(..., S)`` tensors (l, dl/ds, d2l/ds2).
    """
    score = w @ atoms[:, :-1].T
    if loss == "rebel":
        residual = score - atoms[:, -1]
        return residual.square(), 2 * residual, torch.full_like(residual, 2.0)
    sign = 2 * atoms[:, -1] - 1
    return (torch.nn.functional.softplus(-sign * score), -sign * torch.sigmoid(-sign * score),
            torch.sigmoid(score) * torch.sigmoid(-score))


def robust_objective(x: Tensor, probs: Tensor, rho: Tensor, atoms: Tensor, loss: str,
                     family: str) -> Tensor:
    """The objective whose minimiser over x = (w, a) is the robust fit, ``(B, d + 1)`` ->
    ``(B,)``.

    With E the expectation under the atom weights ``probs`` and l = l(w, z):

    * "none": E l + a^2 / 2 (the a^2 / 2 pins the unused a);
    * "chi2": a + sqrt(1 + 2 rho) sqrt(E (l - a)_+^2); its minimum over a = eta is
      sup_{chi2(Q || P) <= rho} E_Q l (drosim.dro's convention);
    * "kl": tau rho + tau log E exp(l / tau) with tau = exp(a): sup_{KL(Q || P) <= rho} E_Q l;
    * "wasserstein": REBEL sqrt(E l) + rho ||w||, the square root of W-REBEL's exact
      (sqrt(E l) + rho ||w||)^2 (same minimiser); DPO E l + rho ||w|| (WDPO, type 1);
      both + a^2 / 2.
    """
    score = x[:, :-1] @ atoms[:, :-1].T
    return _objective(score, x[:, :-1].norm(dim=-1), x[:, -1], probs, rho, atoms, loss,
                      family)


def _objective(score: Tensor, norm: Tensor, a: Tensor, probs: Tensor, rho: Tensor,
               atoms: Tensor, loss: str, family: str) -> Tensor:
    """:func:`robust_objective` from the scores <w, dphi> ``(..., S)`` and ||w|| ``(...)``
    (probs ``(B, S)`` and rho ``(B,)`` lead; any dimensions between broadcast)."""
    losses = _losses(loss, score, atoms)
    extra = (None,) * (score.ndim - 2)
    probs, rho = probs[(slice(None), *extra)], rho[(slice(None), *extra)]
    if family == "chi2":
        excess = (probs * torch.relu(losses - a[..., None]).square()).sum(-1)
        return a + torch.sqrt(1 + 2 * rho) * torch.sqrt(excess + _TINY)
    if family == "kl":
        tau = torch.exp(a)
        return tau * rho + tau * torch.logsumexp(losses / tau[..., None] + _log(probs), -1)
    mean = (probs * losses).sum(-1)
    if family == "wasserstein":
        mean = (torch.sqrt(mean + _TINY) if loss == "rebel" else mean) + rho * norm
    return mean + 0.5 * a.square()


def _losses(loss: str, score: Tensor, atoms: Tensor) -> Tensor:
    """l per atom from the scores (see :func:`_pointwise`)."""
    if loss == "rebel":
        return (score - atoms[:, -1]).square()
    return torch.nn.functional.softplus(-(2 * atoms[:, -1] - 1) * score)


def _log(probs: Tensor) -> Tensor:
    """log p with log 0 = -inf (an atom of weight 0 takes no part in a KL worst case)."""
    return torch.where(probs > 0, probs, 1.0).log().masked_fill(probs <= 0, -math.inf)


class _Terms(NamedTuple):
    """Derivatives of F(l, a), the objective as a function of the loss vector l and of a.

    F_ll = diag(diag) - low low^T (every family's curvature in l has that form).
    """

    f_l: Tensor  # (B, S)
    f_a: Tensor  # (B,)
    f_la: Tensor  # (B, S)
    f_aa: Tensor  # (B,)
    diag: Tensor  # (B, S)
    low: Tensor  # (B, S)


def _terms(a: Tensor, probs: Tensor, rho: Tensor, losses: Tensor, loss: str, family: str
           ) -> _Terms:
    """:class:`_Terms` of each family.

    * chi2 (c = sqrt(1 + 2 rho), e = (l - a)_+, m = 1[l > a], Q = E e^2):
      F_l = c p e / sqrt(Q), F_a = 1 - c E e / sqrt(Q),
      F_ll = c p m / sqrt(Q) - c (p e)(p e)^T / Q^(3/2),
      F_la = -c p m / sqrt(Q) + c (p e) E e / Q^(3/2), F_aa = c E m / sqrt(Q) - c (E e)^2 / Q^(3/2);
    * kl (a = log tau, q = softmax(l / tau + log p), lbar = E_q l, V = Var_q l):
      F_l = q, F_ll = (diag q - q q^T) / tau, F_a = tau (rho + log E_p e^(l / tau)) - lbar,
      F_la = -q (l - lbar) / tau, F_aa = F_a + V / tau;
    * none, WDPO: F_l = p, F_ll = 0; W-REBEL (M = E l): F_l = p / (2 sqrt M),
      F_ll = -p p^T / (4 M^(3/2)); all three F_a = a, F_aa = 1, F_la = 0.
    """
    zeros = torch.zeros_like(losses)
    if family == "chi2":
        c = torch.sqrt(1 + 2 * rho)[:, None]
        excess = torch.relu(losses - a[:, None])
        active = probs * (excess > 0).to(losses)
        pe = probs * excess
        q = (pe * excess).sum(-1, keepdim=True) + _TINY
        mean_e = pe.sum(-1, keepdim=True)
        return _Terms(c * pe / q.sqrt(), (1 - c * mean_e / q.sqrt())[:, 0],
                      -c * active / q.sqrt() + c * pe * mean_e / q**1.5,
                      (c * active.sum(-1, keepdim=True) / q.sqrt()
                       - c * mean_e.square() / q**1.5)[:, 0],
                      c * active / q.sqrt(), pe * (c / q**1.5).sqrt())
    if family == "kl":
        tau = torch.exp(a)[:, None]
        logits = losses / tau + _log(probs)
        q = torch.softmax(logits, -1)
        lbar = (q * losses).sum(-1, keepdim=True)
        variance = (q * (losses - lbar).square()).sum(-1)
        f_a = (tau * (rho[:, None] + torch.logsumexp(logits, -1, keepdim=True)) - lbar)[:, 0]
        return _Terms(q, f_a, -q * (losses - lbar) / tau, f_a + variance / tau[:, 0],
                      q / tau, q / tau.sqrt())
    ones = torch.ones_like(a)
    if family == "wasserstein" and loss == "rebel":
        mean = (probs * losses).sum(-1, keepdim=True) + _TINY
        return _Terms(probs / (2 * mean.sqrt()), a, zeros, ones, zeros,
                      probs / (2 * mean**0.75))
    return _Terms(probs, a, zeros, ones, zeros, zeros)


def _newton_system(x: Tensor, probs: Tensor, rho: Tensor, atoms: Tensor, loss: str,
                   family: str) -> tuple[Tensor, Tensor]:
    """Gradient ``(B, d + 1)`` and Hessian ``(B, d + 1, d + 1)`` of the objective at x.

    With J = dl/dw = l_s dphi (chain rule through the score s = <w, dphi>):
    grad_w = J^T F_l, grad_a = F_a, H_ww = J^T F_ll J + sum_i F_l,i l_ss,i dphi_i dphi_i^T
    (+ rho's norm term for Wasserstein), H_wa = J^T F_la, H_aa = F_aa.
    """
    w, a = x[:, :-1], x[:, -1]
    dphi = atoms[:, :-1]
    losses, slope, curve = _pointwise(loss, w, atoms)
    t = _terms(a, probs, rho, losses, loss, family)
    jac = slope[:, :, None] * dphi  # (B, S, d)
    grad_w = torch.einsum("bs,bsd->bd", t.f_l, jac)
    low = torch.einsum("bs,bsd->bd", t.low, jac)
    h_ww = (torch.einsum("bs,bsd,bse->bde", t.diag, jac, jac) - low[:, :, None] * low[:, None]
            + torch.einsum("bs,sd,se->bde", t.f_l * curve, dphi, dphi))
    if family == "wasserstein":
        norm = torch.sqrt(w.square().sum(-1) + _TINY)[:, None]
        grad_w = grad_w + rho[:, None] * w / norm
        unit = w / norm
        eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
        h_ww = h_ww + (rho[:, None] / norm)[:, :, None] * (eye - unit[:, :, None] * unit[:, None])
    h_wa = torch.einsum("bs,bsd->bd", t.f_la, jac)
    gradient = torch.cat([grad_w, t.f_a[:, None]], -1)
    top = torch.cat([h_ww, h_wa[:, :, None]], -1)
    bottom = torch.cat([h_wa, t.f_aa[:, None]], -1)[:, None]
    return gradient, torch.cat([top, bottom], 1)


def _start(atoms: Tensor, probs: Tensor, rho: Tensor, loss: str, family: str) -> Tensor:
    """A starting point: the plain fit (weighted least squares for REBEL, weighted logistic
    regression for DPO, never w = 0, where every DPO loss ties and the robust objectives
    have a kink), and the small-radius dual variable, eta = E l - sqrt(Var l / (2 rho)) or
    tau = sqrt(Var l / (2 rho))."""
    dphi = atoms[:, :-1]
    if loss == "rebel":
        gram = torch.einsum("bs,sd,se->bde", probs, dphi, dphi)
        moment = torch.einsum("bs,sd,s->bd", probs, dphi, atoms[:, -1])
        eye = torch.eye(dphi.shape[1], dtype=dphi.dtype, device=dphi.device)
        w = torch.linalg.solve(gram + 1e-12 * eye, moment)
    elif family == "none":
        w = probs.new_zeros(probs.shape[0], dphi.shape[1])
    else:
        w = robust_fit(atoms, probs, rho, loss, "none")
    losses = _pointwise(loss, w, atoms)[0]
    mean = (probs * losses).sum(-1)
    spread = torch.sqrt((probs * (losses - mean[:, None]).square()).sum(-1) + 1e-12)
    scale = spread / torch.sqrt(2 * rho.clamp_min(1e-12))
    a = {"chi2": mean - scale, "kl": scale.clamp(1e-3, 1e8).log()}.get(
        family, torch.zeros_like(mean))
    return torch.cat([w, a.unsqueeze(-1)], -1)


def robust_fit(atoms: Tensor, probs: Tensor, rho: Tensor, loss: str, family: str) -> Tensor:
    """argmin_w sup_{Q in ball(probs, rho)} E_Q[l(w, z)] for a batch of atom weights.

    Damped Newton on :func:`robust_objective` in x = (w, a), with the exact gradient and
    Hessian of :func:`_newton_system`; the Hessian's eigenvalues are replaced by their
    absolute values (floored), so every step is a descent direction, and the step length
    is the best of 0, 1, 1/4, ..., 4^-10 (monotone by construction). A problem stops when
    its step gains less than 1e-14 of its objective (from the same point the next step
    would be the same); all stop when every gradient is below 1e-12.

    Args:
        atoms: ``(S, d + 1)`` the support.
        probs: ``(B, S)`` one weighting per problem (P_n, or P for the population).
        rho: ``(B,)`` radii (ignored for "none").
        loss: "rebel" or "dpo".
        family: "none", "chi2", "kl" or "wasserstein".

    Returns:
        ``(B, d)`` the minimisers w.
    """
    x = _start(atoms, probs, rho, loss, family)
    # A problem whose step is 0 would repeat the same step forever: it leaves the batch.
    active = torch.arange(x.shape[0], device=x.device)
    for _ in range(_NEWTON_STEPS):
        moved = _newton_step(x[active], probs[active], rho[active], atoms, loss, family)
        if moved is None:
            break
        keep, x_new = moved
        x[active] = x_new
        active = active[keep]
        if active.numel() == 0:
            break
    return x[:, :-1]


def _newton_step(x: Tensor, probs: Tensor, rho: Tensor, atoms: Tensor, loss: str, family: str
                 ) -> tuple[Tensor, Tensor] | None:
    """One damped Newton step of :func:`robust_fit` for a batch of problems.

    Returns:
        None when every gradient is below 1e-12; else (which problems moved ``(B,)`` bool,
        the new points ``(B, d + 1)``).
    """
    g, h = _newton_system(x, probs, rho, atoms, loss, family)
    if float(g.abs().amax()) < _GRADIENT_TOLERANCE:
        return None
    eigenvalues, vectors = torch.linalg.eigh(0.5 * (h + h.transpose(-1, -2)))
    floor = 1e-12 * eigenvalues.abs().amax(-1, keepdim=True) + 1e-300
    inverse = 1 / torch.maximum(eigenvalues.abs(), floor)
    direction = -torch.einsum("bij,bj,bkj,bk->bi", vectors, inverse, vectors, g)
    steps = _LINE_SEARCH.to(probs)
    trial = x[:, None, :] + steps[None, :, None] * direction[:, None, :]
    # The scores are linear in w: two products instead of one per step length.
    dphi_t = atoms[:, :-1].T
    score = ((x[:, :-1] @ dphi_t)[:, None, :]
             + steps[None, :, None] * (direction[:, :-1] @ dphi_t)[:, None, :])
    values = _objective(score, trial[..., :-1].norm(dim=-1), trial[..., -1], probs, rho, atoms,
                        loss, family).nan_to_num(math.inf)
    rows = torch.arange(x.shape[0], device=x.device)
    best = values.argmin(-1)
    # Gains at the rounding level of the objective are noise, not progress.
    gain = values[:, 0] - values[rows, best]
    best = torch.where(gain > _RELATIVE_GAIN * (1 + values[:, 0].abs()), best, 0)
    return best > 0, trial[rows, best]
