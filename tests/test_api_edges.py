"""Edge cases of the core API (issue 18, item 9): empty batches, infinite Wasserstein radii,
the Wasserstein order's type, array-likes, half-precision and differentiable estimator data,
the world's float options, radii that require grad and DPO on separable labels.

Every refusal is one line naming the argument; every accepted edge case gets the right
answer, not merely no error."""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import pytest
import torch

from drosim import dro
from drosim.dro import (
    KL,
    Chi2,
    Empirical,
    KLTemperature,
    Wasserstein,
    chi2_worst_case,
    kl_tilted,
    kl_worst_case,
    robust_mean,
    wasserstein_linear_sq_worst_case,
    wasserstein_penalty,
)
from drosim.estimators import SeparableDataWarning, dpo, rebel
from drosim.world import make_world

F64 = torch.float64

# How each public function of drosim.dro that takes per-sample data is called on ``x``
# ``(..., n)``; the test below fails when __all__ gains one that is not listed here.
DATA_ENTRY_POINTS = {
    "chi2_worst_case": lambda x: chi2_worst_case(x, 0.1),
    "kl_worst_case": lambda x: kl_worst_case(x, 0.1),
    "kl_tilted": lambda x: kl_tilted(x, 0.1),
    "wasserstein_penalty": lambda x: wasserstein_penalty(x, 0.1),
    "wasserstein_linear_sq_worst_case": lambda x: wasserstein_linear_sq_worst_case(
        x, torch.ones(*x.shape[:-1], 3, dtype=x.dtype), 0.1),
    "robust_mean": lambda x: robust_mean(x, Chi2(0.1)),
}
DATA_NAMES = {"losses", "residuals", "grad_sq_norms"}
ROBUST_MEAN_SPECS = [None, Empirical(), Chi2(0.1), KL(0.1), KLTemperature(0.5),
                     Wasserstein(0.1)]


def _public_data_functions() -> set[str]:
    return {name for name in dro.__all__ if inspect.isfunction(getattr(dro, name))
            and next(iter(inspect.signature(getattr(dro, name)).parameters)) in DATA_NAMES}


def test_every_public_function_taking_data_is_covered():
    assert _public_data_functions() == set(DATA_ENTRY_POINTS)


# ------------------------------------------------------------------------ 1. empty batch


@pytest.mark.parametrize("name", sorted(DATA_ENTRY_POINTS))
@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 5)], ids=str)
def test_an_empty_batch_is_refused_naming_its_shape(name, shape):
    x = torch.ones(shape, dtype=F64)
    with pytest.raises(ValueError, match=rf"has an empty batch: shape {re_shape(shape)} holds "
                                         "no samples"):
        DATA_ENTRY_POINTS[name](x)


@pytest.mark.parametrize("spec", ROBUST_MEAN_SPECS, ids=str)
def test_robust_mean_refuses_an_empty_batch_for_every_set(spec):
    x = torch.ones(0, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"losses has an empty batch: shape \(0, 5\)"):
        robust_mean(x, spec, grad_sq_norms=x)


def re_shape(shape: tuple[int, ...]) -> str:
    """The shape as the messages print it, escaped for a regex."""
    return str(shape).replace("(", r"\(").replace(")", r"\)")


# ------------------------------------------------------ 2. infinite Wasserstein radius


@pytest.mark.parametrize("rho", [math.inf, torch.tensor([0.1, math.inf], dtype=F64)],
                         ids=["float", "tensor"])
@pytest.mark.parametrize("call", [
    lambda rho: wasserstein_penalty(torch.ones(2, 4, dtype=F64), rho),
    lambda rho: wasserstein_linear_sq_worst_case(torch.ones(2, 4, dtype=F64),
                                                 torch.ones(2, 3, dtype=F64), rho),
], ids=["penalty", "linear_sq"])
def test_an_infinite_wasserstein_radius_is_refused_as_by_the_set(call, rho):
    with pytest.raises(ValueError, match=r"^rho must be finite"):
        call(rho)
    with pytest.raises(ValueError, match=r"^Wasserstein\.rho must be finite"):
        Wasserstein(math.inf)


def test_the_balls_still_read_an_infinite_radius_as_the_max():
    l = torch.tensor([0.0, 3.0, 1.0], dtype=F64)
    assert float(chi2_worst_case(l, math.inf).value) == 3.0
    assert float(kl_worst_case(l, math.inf).value) == 3.0


# ------------------------------------------------------------- 3. the Wasserstein order


@pytest.mark.parametrize("p", ["2", torch.tensor(2.0), True, None, 2 + 0j],
                         ids=["str", "tensor", "bool", "None", "complex"])
def test_the_wasserstein_order_must_be_a_real_number(p):
    g = torch.tensor([1.0, 9.0], dtype=F64)
    with pytest.raises(TypeError, match=r"^Wasserstein order p must be a real number"):
        wasserstein_penalty(g, 0.1, p)
    with pytest.raises(TypeError, match=r"^Wasserstein\.p must be a real number"):
        Wasserstein(0.1, p)


def test_a_tensor_order_is_refused_with_the_way_out():
    with pytest.raises(TypeError, match=r"got Tensor \(pass float\(\.\.\.\) for a 0-dim"):
        wasserstein_penalty(torch.ones(2, dtype=F64), 0.1, torch.tensor(2.0))


@pytest.mark.parametrize("p", [np.float64(2.0), 2, 2.0], ids=["numpy", "int", "float"])
def test_real_scalar_orders_give_the_same_penalty(p):
    g = torch.tensor([1.0, 9.0], dtype=F64)
    assert float(wasserstein_penalty(g, 0.5, p)) == pytest.approx(0.5 * math.sqrt(5.0))


def test_order_one_is_the_max_and_order_inf_the_mean():
    g = torch.tensor([1.0, 9.0], dtype=F64)  # norms 1 and 3
    assert float(wasserstein_penalty(g, 1.0, 1)) == 3.0
    assert float(wasserstein_penalty(g, 1.0, math.inf)) == 2.0


# ----------------------------------------------------------- 4. array-like grad norms


@pytest.mark.parametrize("grad_sq_norms", [[1.0, 1.0, 1.0, 1.0], np.ones(4)],
                         ids=["list", "ndarray"])
def test_grad_sq_norms_must_be_a_tensor_like_the_losses(grad_sq_norms):
    l = torch.ones(4, dtype=F64)
    with pytest.raises(TypeError, match=r"^grad_sq_norms must be a torch\.Tensor, got"):
        robust_mean(l, Wasserstein(0.1), grad_sq_norms=grad_sq_norms)
    with pytest.raises(TypeError, match=r"^losses must be a torch\.Tensor, got list"):
        robust_mean([1.0] * 4, Wasserstein(0.1), grad_sq_norms=torch.ones(4, dtype=F64))


# -------------------------------------------------- 5. and 6. the estimators' data


def _regression(trials: int = 2, n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dphi = torch.randn(trials, n, 3, generator=g, dtype=F64)
    dr = dphi @ torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    dr = dr + 0.5 * torch.randn(trials, n, generator=g, dtype=F64)
    pref = torch.bernoulli(torch.sigmoid(dr), generator=g)
    return dphi, dr, pref


def _assert_fit_is(fit, expected, dtype):
    for got, want in zip(fit, expected, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("spec", [None, Chi2(0.1), KL(0.1)], ids=str)
def test_low_precision_rebel_is_the_float64_solve_of_the_same_data_cast_back(dtype, spec):
    # float16 has no LU in torch and float32 cannot resolve the certificates: the data are
    # converted exactly to float64, and the answer is that fit rounded to the input's dtype.
    dphi, dr, _ = _regression()
    dphi, dr = dphi.to(dtype), dr.to(dtype)
    _assert_fit_is(rebel(dphi, dr, spec), rebel(dphi.double(), dr.double(), spec), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("spec", [None, Chi2(0.1)], ids=str)
def test_low_precision_dpo_is_the_float64_solve_of_the_same_data_cast_back(dtype, spec):
    dphi, _, pref = _regression()
    dphi, pref = dphi.to(dtype), pref.to(dtype)
    _assert_fit_is(dpo(dphi, pref, 1.0, spec), dpo(dphi.double(), pref.double(), 1.0, spec),
                   dtype)


def test_half_precision_weights_are_normalised_without_overflow():
    # 40 weights of 6e4 sum past float16's 65504: equal weights must still give the plain fit.
    dphi, dr, _ = _regression()
    dphi, dr = dphi.half(), dr.half()
    weights = torch.full(dr.shape, 6e4, dtype=torch.float16)
    fit, plain = rebel(dphi, dr, Chi2(0.1), weights=weights), rebel(dphi, dr, Chi2(0.1))
    torch.testing.assert_close(fit.w, plain.w, rtol=1e-3, atol=1e-3)


def test_a_half_precision_objective_beyond_its_range_is_refused():
    dphi, _, _ = _regression()
    dr = torch.where(torch.arange(40) % 2 == 0, 1000.0, -1000.0).expand(2, 40)  # losses ~ 1e6
    with pytest.raises(ValueError, match=r"objective of trials \[0, 1\] overflows torch\.float16"):
        rebel(dphi.half(), dr.half())


def test_a_half_precision_w_beyond_its_range_is_refused():
    # dphi of 1e-3 and rewards of 1e2: w ~ 1e5, past float16's 65504 (the objective fits).
    dphi, dr, _ = _regression()
    with pytest.raises(ValueError, match=r"fitted w of trials \[0, 1\] overflows torch\.float16"):
        rebel((dphi * 1e-3).half(), (dr * 1e2).half())
    assert bool(torch.isfinite(rebel((dphi * 1e-3).float(), (dr * 1e2).float()).w).all())


@pytest.mark.parametrize("which", ["dphi", "target", "weights"])
@pytest.mark.parametrize("estimator", ["rebel", "dpo"])
def test_data_that_require_grad_are_fitted_detached(estimator, which):
    # A fit is an argmin: it is computed on the detached data and carries no graph.
    dphi, dr, pref = _regression()
    target = dr if estimator == "rebel" else pref
    weights = torch.rand(dr.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    data = {"dphi": dphi, "target": target, "weights": weights}
    leaf = data[which] = data[which].clone().requires_grad_()

    def fit(d):
        if estimator == "rebel":
            return rebel(d["dphi"], d["target"], Chi2(0.1), weights=d["weights"])
        return dpo(d["dphi"], d["target"], 1.0, Chi2(0.1), weights=d["weights"])

    got = fit(data)
    assert not any(t.requires_grad for t in got)
    _assert_fit_is(got, fit({k: v.detach() for k, v in data.items()}), F64)
    assert leaf.grad is None


# ------------------------------------------------------------- 7. the world's options


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"noise": math.nan}, ValueError, r"^noise must be >= 0 and finite, got nan"),
    ({"noise": math.inf}, ValueError, r"^noise must be >= 0 and finite, got inf"),
    ({"noise": -0.1}, ValueError, r"^noise must be >= 0 and finite"),
    ({"noise": "0.1"}, TypeError, r"^noise must be a real number, got str"),
    ({"noise": True}, TypeError, r"^noise must be a real number, got bool"),
    ({"reward_scale": math.nan}, ValueError, r"^reward_scale must be > 0 and finite, got nan"),
    ({"reward_scale": math.inf}, ValueError, r"^reward_scale must be > 0 and finite"),
    ({"reward_scale": 0.0}, ValueError, r"^reward_scale must be > 0 and finite"),
    ({"noise_slope": math.inf}, ValueError, r"^noise_slope must be >= 0 and finite"),
    ({"noise_slope": math.nan}, ValueError, r"^noise_slope must be >= 0 and finite"),
    ({"misspecification": math.nan}, ValueError, r"^misspecification must be finite"),
    ({"contamination": math.nan}, ValueError, r"^contamination must be in \[0, 1\), got nan"),
    ({"annotator_fraction": math.inf}, ValueError, r"^annotator_fraction must be in \[0, 1\)"),
])
def test_make_world_refuses_float_arguments_outside_their_domain(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_world(3, **kwargs)


def test_make_world_accepts_the_edges_of_the_domains():
    world = make_world(3, noise=0, reward_scale=np.float64(2.0), noise_slope=0.0,
                       misspecification=-1.0, contamination=0.0)
    assert world.noise == 0
    assert float(world.objectives.norm(dim=1)[0]) == pytest.approx(2.0 * math.sqrt(3))


# ------------------------------------------------------------ 8. radii requiring grad


@pytest.mark.parametrize("solve", [chi2_worst_case, kl_worst_case, kl_tilted],
                         ids=["chi2", "kl", "kl_tilted"])
@pytest.mark.parametrize("dtype", [F64, torch.float16], ids=["f64", "f16"])
def test_a_ball_radius_that_requires_grad_is_refused(solve, dtype):
    rho = torch.tensor(0.1, dtype=dtype, requires_grad=True)
    with pytest.raises(ValueError, match=r"requires grad, but this worst case is solved "
                                         r"without autograd.*\.detach\(\)"):
        solve(torch.tensor([0.0, 1.0, 2.0], dtype=dtype), rho)
    assert rho.grad is None


def test_the_wasserstein_forms_are_differentiable_in_the_radius():
    g = torch.tensor([1.0, 9.0, 4.0, 2.0], dtype=F64)
    rho = torch.tensor(0.5, dtype=F64, requires_grad=True)
    wasserstein_penalty(g, rho).backward()
    assert float(rho.grad) == pytest.approx(math.sqrt(4.0))  # sqrt(mean g)
    r, w = torch.tensor([1.0, -1.0], dtype=F64), torch.tensor([3.0, 4.0], dtype=F64)
    rho = torch.tensor(0.2, dtype=F64, requires_grad=True)
    wasserstein_linear_sq_worst_case(r, w, rho).value.backward()
    assert float(rho.grad) == pytest.approx(2 * (1.0 + 0.2 * 5.0) * 5.0)  # 2 (rms + rho|w|) |w|


# ---------------------------------------------------------- 9. DPO on separable labels


def _labels(separable_trials: tuple[int, ...], trials: int = 3, n: int = 200):
    """Bradley-Terry labels (not separable at n = 200) except in ``separable_trials``,
    labelled by the sign of the true score; a few pairs there have dphi = 0 (y = y'),
    which no w separates and which must not hide the separation of the others."""
    g = torch.Generator().manual_seed(1)
    theta = torch.tensor([2.0, -1.0], dtype=F64)
    dphi = torch.randn(trials, n, 2, generator=g, dtype=F64)
    pref = torch.bernoulli(torch.sigmoid(dphi @ theta), generator=g)
    for i in separable_trials:
        pref[i] = (dphi[i] @ theta > 0).to(F64)
        dphi[i, :5] = 0
    return dphi, pref


@pytest.mark.parametrize("spec", [None, Chi2(0.1), KL(0.1), KLTemperature(1.0)], ids=str)
def test_separable_labels_warn_naming_the_trials(spec):
    dphi, pref = _labels(separable_trials=(1, 2))
    with pytest.warns(SeparableDataWarning, match=r"labels of 2 of 3 trials \(first \[1, 2\]\) "
                                                  r"are separable.*ridge > 0") as record:
        fit = dpo(dphi, pref, 1.0, spec)
    assert len(record) == 1
    assert record[0].filename == __file__  # points at the caller's line
    norms = fit.w.norm(dim=-1)
    assert float(norms[0]) < 10 < float(norms[1:].min())  # the separable fits ran away


@pytest.mark.parametrize("kwargs", [{}, {"ridge": 1e-3}, {"spec": Wasserstein(0.1, p=1)}],
                         ids=["not_separable", "ridge", "wasserstein"])
def test_no_warning_where_w_is_bounded(kwargs):
    # Non-separable labels, or separable ones whose w a ridge or a penalty bounds.
    separable = () if not kwargs else (1, 2)
    dphi, pref = _labels(separable_trials=separable)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = dpo(dphi, pref, 1.0, **kwargs)
    assert bool((fit.w.norm(dim=-1) < 100).all())


# ------------------------------------------------- the estimators' remaining refusals


@pytest.mark.parametrize(("call", "match"), [
    (lambda d, p: dpo(d * math.nan, p, 1.0), r"^dphi contains NaN or infinite values"),
    (lambda d, p: dpo(d.index_fill(1, torch.tensor([3]), math.inf), p, 1.0),
     r"^dphi contains NaN or infinite values \(trials \[0, 1, 2\]\)"),
    (lambda d, p: dpo(d, p.index_fill(1, torch.tensor([0]), math.nan), 1.0),
     r"^pref contains NaN or infinite values"),
    (lambda d, p: dpo(d, p[:2], 1.0), r"^pref must have shape \(3, 200\)"),
    (lambda d, p: dpo(d[:0], p[:0], 1.0), r"^empty batch: dphi has shape \(0, 200, 2\)"),
    (lambda d, p: dpo(d[:, :0], p[:, :0], 1.0), r"^empty batch"),
    (lambda d, p: dpo(d[..., :0], p, 1.0), r"^empty batch"),
    (lambda d, p: rebel(d.index_fill(1, torch.tensor([0]), math.inf), p),
     r"^dphi contains NaN or infinite values"),
    (lambda d, p: rebel(d, p.index_fill(1, torch.tensor([0]), -math.inf)),
     r"^dr contains NaN or infinite values"),
])
def test_the_estimators_refuse_non_finite_empty_and_mismatched_batches(call, match):
    dphi, pref = _labels(separable_trials=())
    with pytest.raises(ValueError, match=match):
        call(dphi, pref)
