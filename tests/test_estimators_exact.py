"""Exact fits at every radius: the estimators against cvxpy across the whole radius range,
up to and past the radius from which the ball holds point masses, with their certificates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drosim import certificates, reference
from drosim.dro import KL, Chi2, KLTemperature
from drosim.estimators import dpo, rebel

F64 = torch.float64


def _minority(n: int, d: int, seed: int, fraction: float = 0.1):
    """REBEL pairs from one reward and a planted minority scored by another, with DPO labels
    from the same relative rewards (Bradley-Terry)."""
    g = np.random.default_rng(seed)
    dphi = g.standard_normal((n, d))
    theta, other = g.standard_normal(d), g.standard_normal(d)
    minority = np.arange(n) < max(1, int(fraction * n))
    dr = np.where(minority, dphi @ other, dphi @ theta) + 0.3 * g.standard_normal(n)
    pref = (g.random(n) < 1 / (1 + np.exp(-dr))).astype(float)
    pref[:2] = [0.0, 1.0]
    return dphi, dr, pref


def _radii(n: int) -> list:
    """Every regime: small, moderate, ties at the optimum's largest losses, just below, at
    and past the point-mass radius, and the limits."""
    chi2_mass, kl_mass = (n - 1) / 2, math.log(n)
    return [Chi2(0.05), Chi2(3.0), Chi2(0.3 * chi2_mass), Chi2(chi2_mass - 0.5),
            Chi2(chi2_mass), Chi2(4 * chi2_mass), Chi2(math.inf),
            KL(0.05), KL(1.5), KL(0.75 * kl_mass), KL(kl_mass - 0.05), KL(kl_mass),
            KL(3 * kl_mass), KL(math.inf),
            KLTemperature(1.0), KLTemperature(0.01), KLTemperature(1e-4), KLTemperature(0.0)]


def _check(fit, i: int, ref) -> None:
    """The fit's objective equals cvxpy's optimum to cvxpy's accuracy, and its certificate is
    sound: objective - gap is a lower bound on the optimum, the gap within tolerance."""
    assert ref.status in ("optimal", "optimal_inaccurate")
    objective, gap = float(fit.objective[i]), float(fit.gap[i])
    tolerance = 1e-6 * abs(ref.objective) + 1e-9
    assert objective <= ref.objective + tolerance, (objective, ref.objective)
    assert objective >= ref.objective - tolerance, (objective, ref.objective)
    assert 0 <= gap <= 1e-8 * objective + 1e-12
    assert objective - gap <= ref.objective + tolerance


@pytest.mark.parametrize("spec", _radii(96), ids=str)
def test_rebel_is_exact_at_every_radius(spec):
    dphi, dr, _ = _minority(96, 4, seed=1)
    fit = rebel(torch.tensor(dphi)[None], torch.tensor(dr)[None], spec)
    _check(fit, 0, reference.rebel_fit(dphi, dr, spec))


@pytest.mark.parametrize("spec", _radii(96), ids=str)
def test_dpo_is_exact_at_every_radius(spec):
    dphi, _, pref = _minority(96, 4, seed=2)
    fit = dpo(torch.tensor(dphi)[None], torch.tensor(pref)[None], 1.0, spec, ridge=0.01)
    _check(fit, 0, reference.dpo_fit(dphi, pref, 1.0, spec, ridge=0.01))


def test_the_issue_reports_minority_fits_are_exact():
    # 256 pairs, 8 features: KL at rho = 4.5 and log(n) - 0.05 and chi2 at rho = 60 used to
    # stop 0.6% / 35% / 3.4% above the optimum, and past the point-mass radius at the
    # least-squares start.
    n = 256
    dphi, dr, _ = _minority(n, 8, seed=0)
    specs = [KL(4.5), KL(math.log(n) - 0.05), Chi2(60.0), Chi2((n - 1) / 2), KL(math.log(n))]
    fits = [rebel(torch.tensor(dphi)[None], torch.tensor(dr)[None], s) for s in specs]
    for spec, fit in zip(specs, fits, strict=True):
        _check(fit, 0, reference.rebel_fit(dphi, dr, spec))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(12, 48), d=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       family=st.sampled_from(["chi2", "kl"]), loss=st.sampled_from(["rebel", "dpo"]),
       share=st.floats(0.0, 1.5))
def test_random_problems_over_the_whole_radius_range(n, d, seed, family, loss, share):
    """share = the radius as a fraction of the point-mass radius (past it above 1)."""
    dphi, dr, pref = _minority(n, d, seed)
    spec = (Chi2(share * (n - 1) / 2 + 1e-3) if family == "chi2"
            else KL(share * math.log(n) + 1e-3))
    x = torch.tensor(dphi)[None]
    if loss == "rebel":
        fit, ref = rebel(x, torch.tensor(dr)[None], spec), reference.rebel_fit(dphi, dr, spec)
    else:
        fit = dpo(x, torch.tensor(pref)[None], 1.0, spec, ridge=0.01)
        ref = reference.dpo_fit(dphi, pref, 1.0, spec, ridge=0.01)
    _check(fit, 0, ref)


def test_a_batch_mixing_regimes_equals_its_trials_fitted_alone():
    trials = [_minority(64, 3, seed) for seed in range(4)]
    dphi = torch.tensor(np.stack([t[0] for t in trials]))
    dr = torch.tensor(np.stack([t[1] for t in trials]))
    dr[1] *= 1e-3  # another scale: another regime at the same radius
    together = rebel(dphi, dr, KL(3.5))
    for i in range(4):
        alone = rebel(dphi[i : i + 1], dr[i : i + 1], KL(3.5))
        torch.testing.assert_close(together.objective[i], alone.objective[0], rtol=1e-9,
                                   atol=0)


def test_a_fit_that_cannot_be_certified_raises_naming_its_trials(monkeypatch):
    # Without the smoothing path nothing certifies a Chebyshev fit: the estimator must
    # refuse rather than return Newton's (or the least-squares) starting point.
    monkeypatch.setattr(certificates, "_SMOOTHING", [])
    dphi, dr, _ = _minority(64, 3, seed=0)
    with pytest.raises(ValueError, match=r"trials \[0\] could not be certified optimal"):
        rebel(torch.tensor(dphi)[None], torch.tensor(dr)[None], Chi2(math.inf))


def test_the_gap_certifies_the_smooth_regime_at_rounding_level():
    dphi, dr, _ = _minority(128, 5, seed=3)
    fit = rebel(torch.tensor(dphi)[None], torch.tensor(dr)[None], Chi2(0.1))
    assert float(fit.gap[0]) <= 1e-12 * float(fit.objective[0])


# ------------------------------------------------------------------------ weighted P

WEIGHTED_SPECS = [None, Chi2(0.3), Chi2(30.0), KL(0.3), KL(3.0), KLTemperature(0.5),
                  KL(math.inf)]


def _weights(n: int, seed: int) -> np.ndarray:
    """Integer weights 0..3, some zero (those samples are absent)."""
    counts = np.random.default_rng(seed).integers(0, 4, n).astype(float)
    counts[:3] = [0.0, 2.0, 1.0]
    return counts


@pytest.mark.parametrize("loss", ["rebel", "dpo"])
@pytest.mark.parametrize("spec", [*WEIGHTED_SPECS, "wasserstein"], ids=str)
def test_weighted_fits_equal_cvxpy_on_the_weighted_p(loss, spec):
    dphi, dr, pref = _minority(48, 3, seed=5)
    weights = _weights(48, 5)
    if spec == "wasserstein":
        from drosim.dro import Wasserstein
        spec = Wasserstein(0.1, p=2.0 if loss == "rebel" else 1.0)
    x, wt = torch.tensor(dphi)[None], torch.tensor(weights)[None]
    if loss == "rebel":
        fit = rebel(x, torch.tensor(dr)[None], spec, weights=wt)
        ref = reference.rebel_fit(dphi, dr, spec, weights=weights)
    else:
        fit = dpo(x, torch.tensor(pref)[None], 1.0, spec, ridge=0.01, weights=wt)
        ref = reference.dpo_fit(dphi, pref, 1.0, spec, ridge=0.01, weights=weights)
    _check(fit, 0, ref)


@pytest.mark.parametrize("loss", ["rebel", "dpo"])
@pytest.mark.parametrize("spec", WEIGHTED_SPECS, ids=str)
def test_integer_weights_equal_duplicated_samples(loss, spec):
    dphi, dr, pref = _minority(40, 3, seed=6)
    counts = _weights(40, 6)
    repeat = torch.tensor(counts, dtype=torch.long)
    x, y = torch.tensor(dphi), torch.tensor(dr if loss == "rebel" else pref)
    wt = torch.tensor(counts)[None]

    def fit(dphi, target, weights=None):
        if loss == "rebel":
            return rebel(dphi[None], target[None], spec, weights=weights)
        return dpo(dphi[None], target[None], 1.0, spec, ridge=0.01, weights=weights)

    weighted = fit(x, y, wt)
    duplicated = fit(x.repeat_interleave(repeat, 0), y.repeat_interleave(repeat, 0))
    torch.testing.assert_close(weighted.objective, duplicated.objective, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(weighted.w, duplicated.w, rtol=1e-4, atol=1e-5)


def test_a_zero_weight_removes_its_sample_whatever_its_data():
    dphi, dr, _ = _minority(40, 3, seed=7)
    weights = np.ones(40)
    weights[0] = 0.0
    wild = dr.copy()
    wild[0] = 1e6  # an outlier that every ball would chase, were it present
    fits = [rebel(torch.tensor(dphi)[None], torch.tensor(t)[None], KL(1.0),
                  weights=torch.tensor(weights)[None]) for t in (dr, wild)]
    alone = rebel(torch.tensor(dphi[1:])[None], torch.tensor(dr[1:])[None], KL(1.0))
    for fit in fits:
        torch.testing.assert_close(fit.objective, alone.objective, rtol=1e-9, atol=0)


@pytest.mark.parametrize("loss", ["rebel", "dpo"])
def test_wasserstein_certificates_are_sound(loss):
    from drosim.dro import Wasserstein

    dphi, dr, pref = _minority(64, 4, seed=8)
    for rho in (0.01, 0.3, 5.0):  # 5: the zero solution
        spec = Wasserstein(rho, p=2.0 if loss == "rebel" else 1.0)
        if loss == "rebel":
            fit, ref = rebel(torch.tensor(dphi)[None], torch.tensor(dr)[None], spec), \
                reference.rebel_fit(dphi, dr, spec)
        else:
            fit = dpo(torch.tensor(dphi)[None], torch.tensor(pref)[None], 1.0, spec)
            ref = reference.dpo_fit(dphi, pref, 1.0, spec)
        _check(fit, 0, ref)


@pytest.mark.parametrize("spec", [None, Chi2(0.05), KL(0.05), KLTemperature(1.0)], ids=str)
def test_smooth_fits_are_certified_by_newton_alone(monkeypatch, spec):
    # Where the objective is smooth at the minimiser the set's own worst case certifies
    # Newton's fit: no smoothing path (which would cost ~100 Newton steps). dr of scale 4
    # makes the losses' unit 16, where a temperature must be read as tau / 16.
    monkeypatch.setattr(certificates, "_SMOOTHING", [])
    dphi, dr, pref = _minority(200, 4, seed=9, fraction=0.0)
    x = torch.tensor(dphi)[None].expand(3, -1, -1)
    fit = rebel(x, 4 * torch.tensor(dr)[None].expand(3, -1), spec)
    assert bool((fit.gap <= 1e-10 * fit.objective).all())
    fit = dpo(x, torch.tensor(pref)[None].expand(3, -1), 1.0, spec)
    assert bool((fit.gap <= 1e-10 * fit.objective).all())


def test_a_noiseless_w_rebel_fit_on_the_kink_of_its_norm_is_certified():
    # Zero residuals: sqrt(E r^2) has a kink at the least-squares fit, where the certifying
    # dual point is not r / ||r|| but the smallest u with E[u dphi] = -rho w / ||w||.
    from drosim.dro import Wasserstein

    # At larger radii the minimiser leaves that kink (the least-squares fit is then not
    # optimal: the ridge path's root and Newton steps started off the kink find it).
    dphi, _, _ = _minority(64, 4, seed=10)
    dr = dphi @ np.array([1.0, -2.0, 0.5, 0.0])
    for rho in (0.1, 0.5, 2.0):
        fit = rebel(torch.tensor(dphi)[None], torch.tensor(dr)[None], Wasserstein(rho))
        _check(fit, 0, reference.rebel_fit(dphi, dr, Wasserstein(rho)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), floor=st.sampled_from([0.0, 1e-6, 0.3, 1.0]),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), weighted=st.booleans())
def test_the_quadratic_certificate_bounds_the_minimum_from_p_s_gram_matrix(
        seed, floor, scale, weighted):
    # REBEL's lower bound h(w) - lambda^2 takes lambda^2 from P's Gram matrix where
    # q >= c P (H_q >= c H_P): it must never exceed min h, computed here by least squares
    # under q, whatever q's smallest ratio to P (down to 0, where h's own Hessian is used)
    # and however far w is from h's minimiser.
    from drosim.dro import Empirical
    from drosim.newton import PointwiseLoss, Problem, least_squares

    g = torch.Generator().manual_seed(seed)
    n, d = 40, 3
    dphi = scale * torch.randn(2, n, d, generator=g, dtype=F64)
    dr = torch.randn(2, n, generator=g, dtype=F64)
    p = torch.rand(2, n, generator=g, dtype=F64) + 0.1 if weighted else None
    p = None if p is None else p / p.sum(-1, keepdim=True)
    q = floor + torch.rand(2, n, generator=g, dtype=F64)
    q = q / q.sum(-1, keepdim=True)
    zeros = torch.zeros(2, dtype=F64)
    problem = Problem(dphi, PointwiseLoss("squared", dr), Empirical(), torch.ones(2, dtype=F64),
                      zeros, zeros, p)
    w_min = least_squares((dphi * q.unsqueeze(-1)).mT @ dphi, ((q * dr).unsqueeze(-2) @ dphi
                                                              ).squeeze(-2))
    minimum = (q * ((dphi @ w_min.unsqueeze(-1)).squeeze(-1) - dr).square()).sum(-1)
    # 3e-6 / scale off the minimiser: lambda^2 near 1e-11, where P's Gram matrix is used.
    for w in (w_min, w_min + 3e-6 / scale, torch.randn(2, d, generator=g, dtype=F64) / scale):
        bound = certificates.lower_bound(problem, q, w)
        assert bool((bound <= minimum * (1 + 1e-13)).all()), (bound - minimum) / minimum
    # At the minimiser the bound is tight: the certificate loses nothing there.
    torch.testing.assert_close(certificates.lower_bound(problem, q, w_min), minimum,
                               rtol=1e-9, atol=1e-12)


def _point_mass_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A small REBEL problem (integer features, as in the preference-shift worlds) whose
    chi-square fit at exactly the point-mass radius (n - 1) / 2 lost its ties before balls
    that hold every point mass were fitted as the minimax set they equal."""
    g = np.random.default_rng(seed)
    n, d = int(g.choice([8, 12, 16, 24])), int(g.choice([2, 3]))
    dphi = (g.integers(-2, 3, (1, n, d)).astype(float) if g.random() < 0.5
            else g.standard_normal((1, n, d)))
    dr = dphi @ g.standard_normal(d) + 0.5 * g.standard_normal((1, n))
    return dphi[0], dr[0]


@pytest.mark.parametrize("seed", [30, 82, 286])
def test_exactly_at_the_point_mass_radius_the_fit_is_exact(seed):
    dphi, dr = _point_mass_case(seed)
    n = dphi.shape[0]
    for spec in (Chi2((n - 1) / 2), KL(math.log(n))):
        fit = rebel(torch.tensor(dphi)[None], torch.tensor(dr)[None], spec)
        _check(fit, 0, reference.rebel_fit(dphi, dr, spec))


def test_a_batch_past_the_point_mass_radius_in_some_trials_only_fits_each_exactly():
    # Weights move each trial's point-mass radius (1 / min p - 1) / 2: one Chi2(7.5) batch
    # holds trials beyond it (uniform P on 16 pairs: exactly at it) and below it (a light
    # pair makes min p smaller), each fitted as it is alone and as cvxpy fits it.
    dphi, dr = _point_mass_case(82)
    n = dphi.shape[0]
    light = np.ones(n)
    light[0] = 0.25
    weights = torch.tensor(np.stack([np.ones(n), light]))
    x, y = torch.tensor(dphi)[None].expand(2, -1, -1), torch.tensor(dr)[None].expand(2, -1)
    batch = rebel(x, y, Chi2(7.5), weights=weights)
    for i in range(2):
        alone = rebel(x[i:i + 1], y[i:i + 1], Chi2(7.5), weights=weights[i:i + 1])
        torch.testing.assert_close(batch.objective[i:i + 1], alone.objective, rtol=1e-10,
                                   atol=0)
        p = weights[i].numpy() / weights[i].sum().item()
        _check(batch, i, reference.rebel_fit(dphi, dr, Chi2(7.5), weights=p))


def test_a_well_fitted_regression_s_small_objective_is_certified():
    # Residuals far below the relative rewards (noise 0.1): the objective is small in the
    # normalised units, where Newton's stop and the certificates' bounds must resolve it
    # relative to itself, not to 1 (these fits were once refused with gaps near 2e-11).
    for seed in (1, 6):
        g = np.random.default_rng(seed)
        n, d = int(g.choice([16, 32, 64, 128])), int(g.choice([2, 4, 8]))
        scale = g.choice([1e-2, 1, 30])
        dphi = g.standard_normal((n, d)) * scale
        g.random()
        dr = dphi @ g.standard_normal(d) + g.choice([0.0, 0.1, 1.0]) * g.standard_normal(n)
        spec = KLTemperature(10 ** g.uniform(-4, 0))
        fit = rebel(torch.tensor(dphi)[None], torch.tensor(dr)[None], spec)
        _check(fit, 0, reference.rebel_fit(dphi, dr, spec))


@pytest.mark.parametrize("divergence", ["chi2", "kl"])
def test_closest_multipliers_reach_every_target_inside_the_hull(divergence):
    # Targets inside the hull of the supported gradients always have multipliers; near the
    # solution the potential's decrease falls below its rounding, where a line search that
    # compares values stalled with the residual at 2e-9 (a DPO fit at w = 0 went uncertified).
    gen = torch.Generator().manual_seed(0)
    trials, t, d = 2000, 37, 3
    grads = torch.randn(trials, t, d, dtype=torch.float64, generator=gen)
    mix = torch.rand(trials, t, dtype=torch.float64, generator=gen) ** 4
    prior = torch.rand(trials, t, dtype=torch.float64, generator=gen)
    mix[:, -4:], prior[:, -4:] = 0, 0  # padded slots, as polish_ties gathers them
    mix, prior = mix / mix.sum(-1, keepdim=True), prior / prior.sum(-1, keepdim=True)
    target = (mix.unsqueeze(-1) * grads).sum(-2)
    lam = certificates._closest_multipliers(grads, target, prior, divergence)
    assert not torch.isnan(lam).any()
    assert (lam >= 0).all() and (lam[:, -4:] == 0).all()
    torch.testing.assert_close(lam.sum(-1), torch.ones(trials, dtype=torch.float64))
    residual = ((lam.unsqueeze(-1) * grads).sum(-2) - target).norm(dim=-1)
    assert float(residual.max()) <= 1e-9
