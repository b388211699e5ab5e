"""Strategies and independent numeric helpers shared by the drosim tests.

Nothing here calls drosim: the divergences, dual objectives and tolerances are written from
the conventions in the drosim.dro module docstring, so a test that uses them checks the
library against the mathematics rather than against itself.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import torch
from hypothesis import reject
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import Tensor

F64 = torch.float64
mpmath.mp.dps = 50

# ---------------------------------------------------------------------------- strategies

KINDS = ("floats", "ties", "constant", "pareto", "lognormal", "signed_lognormal", "gaussian")
RHO_GRID = (0.0, 1e-8, 1e-4, 1e-2, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0)


@st.composite
def losses_arrays(draw, min_n: int = 1, max_n: int = 150, kinds=KINDS) -> np.ndarray:
    """1-D float64 loss vectors: bounded floats, ties, constants and heavy tails.

    Heavy tails are built by transforming bounded uniform/Gaussian-like draws (Pareto with
    index down to 0.5, lognormal with sigma 3), so hypothesis can still shrink them.
    """
    kind = draw(st.sampled_from(kinds))
    n = draw(st.integers(min_n, max_n))
    if kind == "floats":
        elements = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
        return draw(hnp.arrays(np.float64, n, elements=elements))
    if kind == "ties":
        return draw(hnp.arrays(np.float64, n, elements=st.sampled_from([0.0, 1.0, 2.0])))
    if kind == "constant":
        return np.full(n, draw(st.floats(-1e3, 1e3)))
    if kind == "gaussian":
        # Box-Muller on bounded uniforms: a smooth, tie-free-in-practice sample.
        u1 = draw(hnp.arrays(np.float64, n, elements=st.floats(1e-6, 1.0)))
        u2 = draw(hnp.arrays(np.float64, n, elements=st.floats(0.0, 1.0)))
        return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)
    if kind == "pareto":
        alpha = draw(st.sampled_from([0.5, 1.0, 1.5, 3.0]))
        u = draw(hnp.arrays(np.float64, n, elements=st.floats(0.0, 0.999)))
        return (1 - u) ** (-1 / alpha)
    g = draw(hnp.arrays(np.float64, n, elements=st.floats(-4.0, 4.0)))
    out = np.exp(3 * g)  # lognormal, sigma 3
    if kind == "signed_lognormal":
        signs = draw(hnp.arrays(np.float64, n, elements=st.sampled_from([-1.0, 1.0])))
        out = out * signs
    return out


def rhos(max_rho: float = 20.0) -> st.SearchStrategy[float]:
    """Radii in [0, max_rho]: a grid of typical values plus arbitrary floats."""
    grid = [r for r in RHO_GRID if r <= max_rho]
    return st.one_of(st.sampled_from(grid), st.floats(0.0, max_rho))


def distinct_losses(min_n: int = 2, max_n: int = 40, min_gap: float = 1e-2):
    """Loss vectors whose sorted values are at least min_gap apart (no ties, no near ties)."""
    gaps = hnp.arrays(np.float64, st.integers(min_n, max_n),
                      elements=st.floats(min_gap, 1.0))

    @st.composite
    def build(draw):
        g = draw(gaps)
        perm = draw(st.permutations(range(g.size)))
        offset = draw(st.floats(-10.0, 10.0))
        return (offset + np.cumsum(g))[np.asarray(perm, dtype=int)]

    return build()


# ------------------------------------------------------------------------------ numerics


def t64(x, device="cpu") -> Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=F64, device=device)


def spread(losses) -> float:
    a = np.asarray(torch.as_tensor(losses).detach().cpu(), dtype=np.float64)
    return float(a.max(-1).max() - a.min(-1).min()) if a.size else 0.0


def tol(losses, rel: float, floor: float = 1e-12) -> float:
    """rel in units of the losses' spread, plus a rounding floor in units of their size."""
    a = np.asarray(torch.as_tensor(losses).detach().cpu(), dtype=np.float64)
    return rel * spread(a) + floor * max(1.0, float(np.abs(a).max()))


def chi2_divergence(q: Tensor) -> Tensor:
    """1/2 E_{P_n}[(dQ/dP_n - 1)^2] = 1/(2n) sum_i (n q_i - 1)^2."""
    n = q.shape[-1]
    return (n * q - 1).square().sum(-1) / (2 * n)


def kl_divergence(q: Tensor) -> Tensor:
    """KL(Q || P_n) = sum_i q_i log(n q_i), with 0 log 0 = 0."""
    n = q.shape[-1]
    return torch.xlogy(q, n * q).sum(-1)


def chi2_dual_objective(losses: Tensor, rho: float, eta: float) -> float:
    """eta + sqrt(1 + 2 rho) sqrt(E (l - eta)_+^2), exactly (mpmath, 50 digits), rounded.

    Exact arithmetic matters: for small rho, eta* lies far below the data and the two terms
    cancel to many digits (eta = -inf means rho = 0: the mean).
    """
    l = [mpmath.mpf(float(x)) for x in losses.detach().double().cpu().reshape(-1)]
    if math.isinf(eta) and eta < 0:
        return float(mpmath.fsum(l) / len(l))
    with mpmath.workdps(_digits(l, eta)):
        e = mpmath.mpf(eta)
        second = mpmath.fsum((x - e) ** 2 for x in l if x > e) / len(l)
        return float(e + mpmath.sqrt(1 + 2 * mpmath.mpf(rho)) * mpmath.sqrt(second))


def _digits(l: list, far: float) -> int:
    """Digits for the dual objective at a dual variable ``far`` from the data: its terms are
    (far / spread)^2 times the answer, and they cancel."""
    spread = float(max(l) - min(l)) or 1.0
    return 50 + 2 * max(0, int(math.log10(abs(far) / spread + 1)))


def kl_dual_objective(losses: Tensor, rho: float, tau: float) -> float:
    """tau rho + tau log E exp(l / tau), exactly (mpmath, 50 digits), rounded; tau = 0 is the
    max and tau = inf the mean (their limits)."""
    l = [mpmath.mpf(float(x)) for x in losses.detach().double().cpu().reshape(-1)]
    if tau == 0:
        return float(max(l))
    if math.isinf(tau):
        return float(mpmath.fsum(l) / len(l))
    with mpmath.workdps(_digits(l, tau)):
        t, hi = mpmath.mpf(tau), max(l)
        mean_exp = mpmath.fsum(mpmath.exp((x - hi) / t) for x in l) / len(l)
        return float(hi + t * (mpmath.mpf(rho) + mpmath.log(mean_exp)))


def solved_reference(fn, *args):
    """A drosim.reference solution, or reject the example unless cvxpy reports 'optimal'."""
    import cvxpy as cp

    try:
        sol = fn(*args)
    except cp.error.SolverError:
        reject()
    if sol.status != "optimal" or not math.isfinite(sol.value):
        reject()
    return sol


def central_difference(f, x: Tensor, h: float) -> Tensor:
    """Central finite differences of the scalar function f at x, one coordinate at a time."""
    x = x.detach().clone()
    grad = torch.empty_like(x)
    flat, gflat = x.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        old = float(flat[i])
        flat[i] = old + h
        up = float(f(x))
        flat[i] = old - h
        down = float(f(x))
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return grad
