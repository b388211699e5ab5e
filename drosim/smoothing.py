"""Smoothed ambiguity sets: the path the estimators follow where the worst case is the max.

For a ball Q around P the robust objective F(w) = sup_{q in Q} <q, l(w)> is not
differentiable where its worst case is the largest loss, and for large radii the minimiser
of F sits exactly there: a tie among the largest losses (a Chebyshev fit for REBEL, a
max-margin point for DPO), with the worst case a point mass on the ties once the ball holds
point masses. Newton's method on the set's own dual stalls at such points. The estimators
(:mod:`drosim.estimators`) then minimise a sequence of smoothed objectives F_mu, mu -> 0,
each smooth in the model and in one dual variable, whose maximising weights q_mu lie in Q:

* chi-square, D(Q || P) = 1/2 E_P[(dQ/dP - 1)^2] <= rho, c = sqrt(1 + 2 rho): the proximal
  form sup_{q in Q} <q, l> - mu D(q || P), whose dual in eta is (derived by maximising
  pointwise in dQ/dP)

      A_mu(l, eta) = eta + psi_mu(E_P[(l - eta)_+^2]),
      psi_mu(E) = c sqrt(E) - mu rho     if E >= c^2 mu^2,
                = mu / 2 + E / (2 mu)   otherwise,

  C^1 in (l, eta), with weights q = p (l - eta*)_+ / E_P[(l - eta*)_+]. It is within mu rho
  (and within mu times the largest divergence of a distribution on the support) of the
  worst case, and defined for rho = inf too (only the second piece is used).
* KL, D = KL(Q || P): the ball's dual with a log-barrier on its temperature,
  A(l, tau) - mu log tau, whose weights softmax(l / tau*) (tilted from P) have
  KL = rho - mu / tau* < rho; F_mu is within mu of F at its minimiser.
* a fixed temperature tau (KL-DPO's penalty): the temperatures max(tau, mu).

None of these is a new ambiguity set for users: they exist to produce a pair (w, q) with q
in Q whose duality gap certifies w (see :func:`drosim.estimators.rebel`). Every function
takes the losses ``(T, n)`` in the estimators' normalised units (mu is in those units),
the dual ``(T, 1)`` and the normalised sample weights p ``(T, n)`` (None for uniform).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from drosim.dro import KL, Chi2, DualDerivatives, KLTemperature, kl_tilted
from drosim.newton import probabilities, support_max

__all__ = ["BarrierKL", "ProximalChi2", "SmoothedTemperature", "smoothed"]

# Safeguarded Newton steps of the barrier KL's 1-D dual (each at least halves the bracket
# when Newton leaves it, so 200 reach any float64 resolution).
_BARRIER_ITERATIONS = 200


def _expectation(x: Tensor, weights: Tensor | None) -> Tensor:
    """E_P[x] over the last dimension."""
    return x.mean(-1) if weights is None else (x * weights).sum(-1)


class _Smoothed:
    """What the estimators' Newton method reads of a set besides its dual: a smoothed set
    is never the plain mean, has no input gradients, and one dual variable unless it says
    otherwise."""

    dual_size: ClassVar[int] = 1
    dual_is_strictly_convex: ClassVar[bool] = True
    needs_input_gradients: ClassVar[bool] = False
    is_empirical: ClassVar[bool] = False


@dataclass(frozen=True)
class ProximalChi2(_Smoothed):
    """sup_{q in Chi2(rho)} <q, l> - mu D(q || P): see the module docstring."""

    rho: float
    mu: float
    # flat above the largest loss: the dual is re-solved after every Newton step
    dual_is_strictly_convex: ClassVar[bool] = False

    def _psi(self, e2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """psi_mu(E) and its first two derivatives."""
        mu, c2 = self.mu, 1 + 2 * self.rho
        root = c2 * mu * mu <= e2  # never true for rho = inf
        safe = torch.where(root, e2, 1.0)
        # (Both only enter where root holds, so rho is finite there.)
        c, rho = (math.sqrt(c2), self.rho) if math.isfinite(c2) else (0.0, 0.0)
        value = torch.where(root, c * safe.sqrt() - mu * rho, mu / 2 + e2 / (2 * mu))
        first = torch.where(root, c / (2 * safe.sqrt()), 1 / (2 * mu))
        second = torch.where(root, -c / (4 * safe.pow(1.5)), 0.0)
        return value, first, second

    def dual_objective(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                       weights: Tensor | None = None) -> Tensor:
        eta = dual[..., 0]
        e = (losses - eta.unsqueeze(-1)).clamp_min(0)
        return eta + self._psi(_expectation(e.square(), weights))[0]

    def dual_derivatives(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                         weights: Tensor | None = None) -> DualDerivatives:
        """With e = (l - eta)_+ and E = E_P e^2: dE/dl = 2 p e, dE/deta = -2 E_P e, so the
        Hessian in l is psi' 2 diag(p 1{e > 0}) + psi'' (2 p e)(2 p e)^T."""
        p = probabilities(weights, losses)
        eta = dual[..., 0]
        e = (losses - eta.unsqueeze(-1)).clamp_min(0)
        active = (e > 0).to(losses.dtype)
        pe = p * e
        s1 = pe.sum(-1)
        psi, first, second = self._psi((pe * e).sum(-1))
        k = (2 * first).unsqueeze(-1)
        return DualDerivatives(
            value=eta + psi,
            grad_l=k * pe,
            diag=k * p * active,
            low=2 * pe,
            low_sign=second,
            grad_a=(1 - 2 * first * s1).unsqueeze(-1),
            cross=(-4 * (second * s1).unsqueeze(-1) * pe - k * p * active).unsqueeze(-1),
            hess_a=(4 * second * s1.square() + 2 * first * (p * active).sum(-1)
                    ).reshape(-1, 1, 1),
        )

    def solve_dual(self, losses: Tensor, start: Tensor | None = None, *,
                   weights: Tensor | None = None) -> Tensor:
        """eta*, exactly: the minimiser on the quadratic piece solves E_P[(l - eta)_+] = mu
        (a water-filling level, found by sorting); where that level leaves E_P[(l - eta)_+^2]
        above c^2 mu^2 the minimiser is on the square-root piece, where it is the ball's own
        eta* (:meth:`drosim.dro.Chi2.solve_dual`)."""
        p = probabilities(weights, losses)
        level = _water_level(losses, p, self.mu)
        e2 = (p * (losses - level.unsqueeze(-1)).clamp_min(0).square()).sum(-1)
        quadratic = e2 <= (1 + 2 * self.rho) * self.mu**2
        if bool(quadratic.all()):
            return level.unsqueeze(-1)
        eta = Chi2(self.rho).solve_dual(losses, start, weights=weights)[..., 0]
        return torch.where(quadratic, level, eta).unsqueeze(-1)

    def weights_at(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0,
                   weights: Tensor | None = None) -> Tensor:
        """The maximising q = p (l - eta)_+ / E_P[(l - eta)_+], in the ball; where no loss
        exceeds eta (every loss equal, or all underflowed to 0), its limit as eta rises to
        the largest loss: P restricted to the samples at that loss."""
        p = probabilities(weights, losses)
        pe = p * (losses - dual).clamp_min(0)
        total = pe.sum(-1, keepdim=True)
        top = p * (losses == support_max(losses, weights).unsqueeze(-1))
        return torch.where(total > 0, pe, top) / torch.where(total > 0, total,
                                                             top.sum(-1, keepdim=True))


def _water_level(losses: Tensor, p: Tensor, mass: float) -> Tensor:
    """``(T,)`` the eta with sum_i p_i (l_i - eta)_+ = mass: with the losses sorted
    descending, on the piece where the top k are above eta, eta = (sum_{top k} p l - mass)
    / sum_{top k} p; k is the number of sorted losses s_j with sum_{i<j} p_i (s_i - s_j)
    below the mass (that sum grows with j)."""
    s, order = torch.sort(losses, dim=-1, descending=True)
    w = p.gather(-1, order)
    mass_above = w.cumsum(-1)
    first_moment = (w * s).cumsum(-1)
    below = first_moment - mass_above * s  # sum_{i<=j} p_i (s_i - s_j) = sum_{i<j} ...
    k = (below < mass).sum(-1, keepdim=True).clamp_min(1)
    top_mass = mass_above.gather(-1, k - 1).squeeze(-1)
    top_moment = first_moment.gather(-1, k - 1).squeeze(-1)
    return (top_moment - mass) / top_mass


@dataclass(frozen=True)
class BarrierKL(_Smoothed):
    """The KL ball's dual with a barrier on its temperature: A(l, tau) - mu log tau."""

    rho: float
    mu: float

    @property
    def ball(self) -> KL:
        return KL(self.rho)

    def dual_objective(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                       weights: Tensor | None = None) -> Tensor:
        tau = dual[..., 0]
        barrier = -self.mu * torch.log(torch.where(tau > 0, tau, 1.0))
        return self.ball.dual_objective(losses, dual, weights=weights) + barrier

    def dual_derivatives(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                         weights: Tensor | None = None) -> DualDerivatives:
        der = self.ball.dual_derivatives(losses, dual, weights=weights)
        tau = dual[..., 0]
        safe = torch.where(tau > 0, tau, 1.0)
        return der._replace(
            value=der.value - self.mu * torch.log(safe),
            grad_a=der.grad_a - (self.mu / safe).unsqueeze(-1),
            hess_a=der.hess_a + (self.mu / safe.square()).reshape(-1, 1, 1))

    def solve_dual(self, losses: Tensor, start: Tensor | None = None, *,
                   weights: Tensor | None = None) -> Tensor:
        """tau*: the root in u = log tau of f(u) = tau dA/dtau - mu = tau (rho - KL(q_tau))
        - mu (increasing), by Newton steps safeguarded by a bracket. f < 0 below
        tau = mu / rho (tau dA/dtau <= tau rho there), and f > 0 above
        max(spread / sqrt(4 rho), 2 mu / rho) (there KL <= spread^2 / (8 tau^2) <= rho / 2
        by Hoeffding's lemma)."""
        spread = losses.amax(-1) - losses.amin(-1)
        lo = torch.full_like(spread, math.log(self.mu / self.rho) - 1)
        hi = torch.log(torch.maximum(spread / math.sqrt(4 * self.rho),
                                     torch.full_like(spread, 2 * self.mu / self.rho))) + 1
        u = 0.5 * (lo + hi) if start is None else torch.log(start[..., 0]).clamp(lo, hi)
        eps = torch.finfo(losses.dtype).eps
        for _ in range(_BARRIER_ITERATIONS):
            tau = u.exp().unsqueeze(-1)
            der = self.dual_derivatives(losses, tau, weights=weights)
            t = tau[..., 0]
            f = t * der.grad_a[..., 0]
            slope = f + self.mu + t.square() * der.hess_a[:, 0, 0] - self.mu
            lo, hi = torch.where(f < 0, u, lo), torch.where(f < 0, hi, u)
            newton = u - f / slope
            inside = (slope > 0) & (newton >= lo) & (newton <= hi)
            step = torch.where(inside, newton, 0.5 * (lo + hi))
            done = bool((((step - u).abs() <= 8 * eps * (1 + u.abs()))
                         | (hi - lo <= 8 * eps * (1 + u.abs()))).all())
            u = step
            if done:
                break
        return u.exp().unsqueeze(-1)

    def weights_at(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0,
                   weights: Tensor | None = None) -> Tensor:
        """softmax(l / tau) tilted from P: KL = rho - mu / tau < rho."""
        return kl_tilted(losses, dual[..., 0], weights=weights).weights


@dataclass(frozen=True)
class SmoothedTemperature(_Smoothed):
    """The fixed-temperature penalty at temperature max(tau / unit, mu) (tau in the
    caller's units, read per trial as :class:`~drosim.dro.KLTemperature` does)."""

    tau: float
    mu: float
    dual_size: ClassVar[int] = 0

    def temperature(self, losses: Tensor, unit: Tensor | float) -> Tensor:
        tau = torch.as_tensor(self.tau / unit, dtype=losses.dtype, device=losses.device)
        return tau.expand(losses.shape[:-1]).clamp_min(self.mu)

    def _set(self, losses: Tensor, unit: Tensor | float) -> tuple[KLTemperature, Tensor]:
        # KLTemperature(1) at unit = 1 / temperature reads its tau as that temperature.
        return KLTemperature(1.0), 1 / self.temperature(losses, unit)

    def dual_objective(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                       weights: Tensor | None = None) -> Tensor:
        spec, inverse = self._set(losses, unit)
        return spec.dual_objective(losses, dual, inverse, weights=weights)

    def dual_derivatives(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0, *,
                         weights: Tensor | None = None) -> DualDerivatives:
        spec, inverse = self._set(losses, unit)
        return spec.dual_derivatives(losses, dual, inverse, weights=weights)

    def solve_dual(self, losses: Tensor, start: Tensor | None = None, *,
                   weights: Tensor | None = None) -> Tensor:
        return losses.new_zeros(losses.shape[0], 0)

    def weights_at(self, losses: Tensor, dual: Tensor, unit: Tensor | float = 1.0,
                   weights: Tensor | None = None) -> Tensor:
        return kl_tilted(losses, self.temperature(losses, unit), weights=weights).weights


def smoothed(spec: Chi2 | KL | KLTemperature, mu: float
             ) -> ProximalChi2 | BarrierKL | SmoothedTemperature:
    """The smoothed form of ``spec`` at smoothing mu (normalised loss units). A KL ball of
    infinite radius is every distribution on the support: its worst case is the max, smoothed
    by the temperature mu."""
    if isinstance(spec, Chi2):
        return ProximalChi2(spec.rho, mu)
    if isinstance(spec, KL):
        return BarrierKL(spec.rho, mu) if math.isfinite(spec.rho) else SmoothedTemperature(
            0.0, mu)
    return SmoothedTemperature(spec.tau, mu)
