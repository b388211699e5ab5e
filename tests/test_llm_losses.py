"""Losses, robust objectives and their gradients in drosim.llm, on a tiny float64 GPT-2.

- closed-form values of the REBEL, DPO and IPO losses;
- every method's gradient (``objective.loss.backward()``) against central finite differences
  of its objective VALUE, so the surrogate loss is checked against the quantity it claims to
  differentiate;
- chi2 / KL gradients against the Danskin formula sum_i q_i grad l_i, with q from drosim.dro
  and one backward per sample;
- the Wasserstein penalty's batched input gradients against a per-sample loop (the authors'
  create_graph approach), and the earlier defective variant's lack of a parameter gradient;
- the aggregation is drosim.dro.robust_mean itself, not a re-implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
from llm_helpers import (
    F64,
    directional_derivative,
    flat_grad,
    flat_param_grads,
    near_policy,
    random_direction,
    random_pair_batch,
    tiny_model,
    trainable,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

from drosim.dro import (
    KL,
    Chi2,
    KLTemperature,
    Wasserstein,
    as_ambiguity_set,
    chi2_worst_case,
    kl_tilted,
    kl_worst_case,
    robust_mean,
    wasserstein_penalty,
)
from drosim.llm.components.losses import (
    dpo_losses,
    ipo_losses,
    preferences_from_rewards,
    rebel_losses,
)
from drosim.llm.components.methods import METHODS, make_method
from drosim.llm.components.objective import input_grad_sq_norms, robust_objective
from drosim.llm.components.update import method_objective, pair_logprobs

ETA, BETA = 1.0, 0.5
RADII = dict(chi2_rho=0.1, kl_rho=0.1, kl_tau=0.5, w_rho=0.1)
ROBUST_NON_W = ("chi2-rebel", "kl-rebel", "kltemp-rebel", "kl-dpo", "chi2-dpo")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------- closed forms


def test_rebel_closed_form():
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, -0.5]], dtype=F64)
    sampling = torch.tensor([[-1.5, -1.0], [-2.0, -2.0]], dtype=F64)
    rewards = torch.tensor([[1.0, 0.0], [0.5, 2.0]], dtype=F64)
    # row 0: margin (0.5) - (-1) = 1.5, / 0.5 = 3, minus 1 -> 4
    # row 1: margin (-1) - (1.5) = -2.5, / 0.5 = -5, minus -1.5 -> 12.25
    out = rebel_losses(logprobs, sampling, rewards, eta=0.5)
    assert out.tolist() == [4.0, 12.25]


def test_dpo_and_ipo_closed_forms():
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, -0.5], [-1.0, -1.0]], dtype=F64)
    reference = torch.tensor([[-1.5, -1.0], [-2.0, -2.0], [-1.0, -1.0]], dtype=F64)
    preferences = torch.tensor([1.0, 0.25, 0.5], dtype=F64)
    beta = 0.7
    margins = [1.5, -2.5, 0.0]
    dpo = dpo_losses(logprobs, reference, preferences, beta)
    ipo = ipo_losses(logprobs, reference, preferences, beta)
    for i, (h, o) in enumerate(zip(margins, preferences.tolist(), strict=True)):
        expected_dpo = -o * math.log(_sigmoid(beta * h)) - (1 - o) * math.log(_sigmoid(-beta * h))
        expected_ipo = (h - (2 * o - 1) / (2 * beta)) ** 2
        assert float(dpo[i]) == pytest.approx(expected_dpo, rel=1e-14)
        assert float(ipo[i]) == pytest.approx(expected_ipo, rel=1e-14)
    # a tie (o = 1/2) at margin 0 costs log 2 in DPO and 0 in IPO
    assert float(dpo[2]) == pytest.approx(math.log(2), rel=1e-15)
    assert float(ipo[2]) == 0.0


def test_dpo_gradient_in_the_margin_is_beta_times_sigmoid_minus_preference():
    h = torch.tensor([1.5, -2.5, 0.3], dtype=F64)
    logprobs = torch.stack([h, torch.zeros_like(h)], dim=1).requires_grad_()
    preferences = torch.tensor([1.0, 0.0, 0.25], dtype=F64)
    beta = 0.7
    dpo_losses(logprobs, torch.zeros_like(logprobs), preferences, beta).sum().backward()
    expected = beta * (torch.sigmoid(beta * h) - preferences)
    torch.testing.assert_close(logprobs.grad[:, 0], expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(logprobs.grad[:, 1], -expected, rtol=1e-14, atol=0)


def test_preferences_from_rewards_ties_are_one_half():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-3.0, -3.0], [1e-9, 0.0]],
                           dtype=F64)
    assert preferences_from_rewards(rewards).tolist() == [1.0, 0.0, 0.5, 0.5, 1.0]


# -------------------------------------------------- gradients of every method's objective


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def batch(model):
    return near_policy(random_pair_batch(6, seed=11), model, seed=12)


def _assert_generic_weights(method, weights) -> None:
    """Robust weights that are neither uniform nor on a single sample, so the test exercises
    the worst case (and, for chi2, a solution with several unclipped samples)."""
    if method.spec is None or isinstance(method.spec, Wasserstein):
        return
    assert float(weights.max() - weights.min()) > 1e-3, weights
    assert int((weights > 1e-12).sum()) >= 2, weights
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)


# every method at the default radii, and chi2 at a radius where some weights are clipped to 0
FD_CASES = [pytest.param(name, RADII, False, id=name) for name in METHODS] + [
    pytest.param("chi2-rebel", {**RADII, "chi2_rho": 1.0}, True, id="chi2-rebel-clipped")]


@pytest.mark.parametrize(("name", "radii", "clipped"), FD_CASES)
def test_objective_gradient_matches_finite_differences_of_its_value(model, batch, name, radii,
                                                                     clipped):
    method = make_method(name, **radii)
    params = trainable(model)
    model.zero_grad(set_to_none=True)
    objective, _ = method_objective(model, batch, method, eta=ETA, beta=BETA)
    _assert_generic_weights(method, objective.weights)
    if clipped:  # some, not all but one, worst-case weights are 0
        assert 0 < int((objective.weights == 0).sum()) < len(batch) - 1
    objective.loss.backward()
    grad = flat_param_grads(params)
    model.zero_grad(set_to_none=True)
    assert float(grad.norm()) > 1e-3

    def value() -> float:
        return float(method_objective(model, batch, method, eta=ETA, beta=BETA)[0].value)

    assert value() == float(objective.value)  # the evaluation is deterministic
    along_gradient = [g.view_as(p) / grad.norm() for g, p in
                      zip(grad.split([p.numel() for p in params]), params, strict=True)]
    directions = [along_gradient, random_direction(params, 1), random_direction(params, 2)]
    for direction in directions:
        analytic = float(torch.cat([d.reshape(-1) for d in direction]) @ grad)
        numeric = directional_derivative(value, params, direction, h=1e-5)
        assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-9 * float(grad.norm()))


def _danskin_weights(spec, losses):
    """The worst-case distribution of drosim.dro's solvers on the detached losses."""
    losses = losses.detach()
    if spec is None:
        return torch.full_like(losses, 1.0 / losses.shape[0])
    if isinstance(spec, Chi2):
        return chi2_worst_case(losses, spec.rho).weights
    if isinstance(spec, KL):
        return kl_worst_case(losses, spec.rho).weights
    assert isinstance(spec, KLTemperature)
    return kl_tilted(losses, spec.tau).weights


@pytest.mark.parametrize("name", ("rebel", "dpo", "ipo", *ROBUST_NON_W))
def test_robust_gradient_is_the_danskin_sum_of_per_sample_gradients(model, batch, name):
    method = make_method(name, **RADII)
    params = trainable(model)
    losses = method.losses(pair_logprobs(model, batch), batch, eta=ETA, beta=BETA)
    weights = _danskin_weights(method.spec, losses)
    danskin = sum(float(weights[i]) * flat_grad(losses[i], params, retain_graph=True)
                  for i in range(losses.shape[0]))

    model.zero_grad(set_to_none=True)
    objective, _ = method_objective(model, batch, method, eta=ETA, beta=BETA)
    objective.loss.backward()
    grad = flat_param_grads(params)
    model.zero_grad(set_to_none=True)

    torch.testing.assert_close(objective.weights, weights, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, danskin, rtol=1e-9, atol=1e-12 * float(danskin.norm()))
    # the robust gradient really differs from the plain mean's
    if method.spec is not None:
        mean_grad = flat_grad(losses.mean(), params)
        assert float((grad - mean_grad).norm()) > 1e-3 * float(grad.norm())


# ------------------------------------------------------------------------- Wasserstein


def _pair_losses_from_embeddings(model, batch, method):
    """Input embeddings of ``batch`` (a graph leaf of the parameters) and the pair losses."""
    embeddings = model.get_input_embeddings()(batch.flat("input_ids"))
    with sdpa_kernel(SDPBackend.MATH):
        logprobs = pair_logprobs(model, batch, embeddings=embeddings)
    return embeddings, method.losses(logprobs, batch, eta=ETA, beta=BETA)


def _per_sample_loop(model, batch, method):
    """The authors' approach: one forward and one ``autograd.grad(create_graph=True)`` per
    sample, on that sample's own embeddings. Returns (losses, squared input-gradient norms)."""
    losses, norms = [], []
    for i in range(len(batch)):
        embeddings, loss = _pair_losses_from_embeddings(model, batch.select(slice(i, i + 1)),
                                                        method)
        (grad,) = torch.autograd.grad(loss[0], embeddings, create_graph=True)
        losses.append(loss[0])
        norms.append(grad.square().sum())
    return torch.stack(losses), torch.stack(norms)


@pytest.mark.parametrize("name", ["w-rebel", "wdpo"])
def test_batched_input_gradients_and_penalty_gradient_match_the_per_sample_loop(
        model, batch, name):
    method = make_method(name, **RADII)
    rho = method.spec.rho
    params = trainable(model)

    embeddings, losses = _pair_losses_from_embeddings(model, batch, method)
    batched = input_grad_sq_norms(losses, embeddings)
    loop_losses, loop = _per_sample_loop(model, batch, method)
    torch.testing.assert_close(losses, loop_losses, rtol=1e-12, atol=0)
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=0)
    assert bool((loop > 0).all()) and len(set(loop.tolist())) == len(batch)

    # the penalty trains the parameters through the double backward, as the loop's does
    penalty_grad = flat_grad(wasserstein_penalty(batched, rho), params)
    loop_penalty_grad = flat_grad(wasserstein_penalty(loop, rho), params, retain_graph=True)
    assert float(penalty_grad.norm()) > 1e-4
    torch.testing.assert_close(penalty_grad, loop_penalty_grad, rtol=1e-9,
                               atol=1e-12 * float(loop_penalty_grad.norm()))

    # and the whole update gradient is that of mean(l) + rho sqrt(mean ||grad_z l_i||^2)
    model.zero_grad(set_to_none=True)
    objective, _ = method_objective(model, batch, method, eta=ETA, beta=BETA)
    objective.loss.backward()
    grad = flat_param_grads(params)
    model.zero_grad(set_to_none=True)
    loop_value = loop_losses.mean() + wasserstein_penalty(loop, rho)
    assert float(objective.value) == pytest.approx(loop_value.item(), rel=1e-12)
    loop_grad = flat_grad(loop_value, params)
    torch.testing.assert_close(grad, loop_grad, rtol=1e-9, atol=1e-12 * float(loop_grad.norm()))


def test_earlier_backward_per_sample_variant_gives_a_penalty_without_parameter_gradient(
        model, batch):
    """loss_i.backward() per sample and reading the embeddings' .grad: the right VALUE, but
    the penalty is a constant to autograd (and the parameters' .grad got each l_i's gradient
    as a side effect). Ours has the value and a parameter gradient."""
    method = make_method("w-rebel", **RADII)
    rho = method.spec.rho
    params = trainable(model)
    model.zero_grad(set_to_none=True)
    norms = []
    for i in range(len(batch)):
        sub = batch.select(slice(i, i + 1))
        embeddings = model.get_input_embeddings()(sub.flat("input_ids"))
        embeddings.retain_grad()
        with sdpa_kernel(SDPBackend.MATH):
            logprobs = pair_logprobs(model, sub, embeddings=embeddings)
        method.losses(logprobs, sub, eta=ETA, beta=BETA)[0].backward()
        norms.append(embeddings.grad.square().sum())
    defective = wasserstein_penalty(torch.stack(norms), rho)
    side_effect = flat_param_grads(params)
    model.zero_grad(set_to_none=True)

    embeddings, losses = _pair_losses_from_embeddings(model, batch, method)
    ours = wasserstein_penalty(input_grad_sq_norms(losses, embeddings), rho)
    assert float(defective) == pytest.approx(ours.item(), rel=1e-10)
    assert not defective.requires_grad  # nothing to back-propagate to the parameters
    ours_grad = flat_grad(ours, params, retain_graph=True)
    assert float(ours_grad.norm()) > 1e-4
    # the defective loop left sum_i grad l_i in .grad, to be accumulated again by the update
    torch.testing.assert_close(side_effect, flat_grad(losses.sum(), params), rtol=1e-9,
                               atol=1e-12)


# ------------------------------------------- the aggregation is drosim.dro.robust_mean


SPECS = [None, Chi2(0.1), KL(0.1), KLTemperature(0.5), Wasserstein(0.1), Wasserstein(0.2, 3.0)]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_robust_objective_value_is_exactly_robust_mean(spec):
    generator = torch.Generator().manual_seed(5)
    n = 7
    z = torch.randn(2 * n, 3, generator=generator, dtype=F64, requires_grad=True)
    w = torch.randn(6, generator=generator, dtype=F64)
    losses = ((z.reshape(n, -1).sin() * w).sum(-1) + 0.3).square()

    wasserstein = isinstance(spec, Wasserstein)
    out = robust_objective(losses, spec, inputs=z if wasserstein else None)
    norms = input_grad_sq_norms(losses, z) if wasserstein else None
    expected = robust_mean(losses.detach(), spec,
                           grad_sq_norms=None if norms is None else norms.detach())
    assert torch.equal(out.value, expected)

    # and its surrogate has robust_mean's gradient (Danskin weights, double backward)
    (grad,) = torch.autograd.grad(out.loss, z, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(robust_mean(losses, spec, grad_sq_norms=norms), z)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_aggregates_through_drosim_robust_mean(model, batch, name, monkeypatch):
    # the objective asks the method's drosim.dro set for its worst case once (robust_mean's
    # own computation, whose weights and dual also give the diagnostics): its value is
    # robust_mean's on what it saw
    method = make_method(name, **RADII)
    resolved = as_ambiguity_set(method.spec)
    worst_case = type(resolved).worst_case
    calls = []

    def spy(self, losses, grad_sq_norms=None, **kwargs):
        calls.append((self, losses.detach().clone(),
                      None if grad_sq_norms is None else grad_sq_norms.detach().clone()))
        return worst_case(self, losses, grad_sq_norms, **kwargs)

    monkeypatch.setattr(type(resolved), "worst_case", spy)
    objective, losses = method_objective(model, batch, method, eta=ETA, beta=BETA)
    assert len(calls) == 1
    spec, seen_losses, seen_norms = calls[0]
    assert spec == resolved
    assert torch.equal(seen_losses, losses.detach())
    monkeypatch.undo()
    assert torch.equal(objective.value,
                       robust_mean(seen_losses, method.spec, grad_sq_norms=seen_norms))
