"""Where the trainer builds its ambiguity set (``robust_scope``), how large it is
(``protect_fraction``), and the ``robust/`` diagnostics of every train metrics line.

- ``minibatch`` (the default) is the pre-existing step bit for bit: the Danskin step of
  ``drosim.dro.robust_mean`` over the minibatch;
- ``iteration`` with one minibatch per iteration is that same step (the ball is the same);
- with smaller minibatches, each step's weights are the full iteration's worst-case weights of
  its pairs, solved by ``drosim.dro`` on the loss cache (checked inside a real run), the cache
  starts at theta_t and is refreshed as pairs are visited, the minibatch surrogates of an
  epoch average to the iteration's robust gradient at fixed theta, and two ranks give what
  one process gives;
- ``robust/dual``, ``robust/max_weight`` and ``robust/effective_pairs`` against the worst
  cases computed here;
- ``protect_fraction`` sets the ball's radius; every bad combination is one line, before
  anything is written.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from llm_helpers import (
    flat_grad,
    near_policy,
    random_pair_batch,
    run_on_two_ranks,
    shared_pair_batch,
    tiny_model,
    trainable,
)
from safetensors.torch import load_file

from drosim.dro import KL, Chi2, chi2_worst_case, robust_mean
from drosim.llm.components.batch import PairBatch
from drosim.llm.components.config import (
    bundled_config_path,
    config_method,
    load_config,
    save_config,
)
from drosim.llm.components.demo_world import build_demo_base
from drosim.llm.components.methods import Method, make_method
from drosim.llm.components.objective import IterationLosses, RobustDiagnostics
from drosim.llm.components.update import pair_logprobs, update_step
from drosim.llm.recipes import trainer

ETA, BETA, LR = 1.0, 0.5, 1e-2
RHO = 0.5  # large enough that the worst-case weights are far from uniform
SMOKE = bundled_config_path("smoke")
REWEIGHTING = ("chi2-rebel", "kl-rebel", "kltemp-rebel", "kl-dpo", "chi2-dpo")


def method_named(name: str) -> Method:
    return make_method(name, chi2_rho=RHO, kl_rho=RHO, kl_tau=0.5)


def pair_losses(model: torch.nn.Module, batch: PairBatch, method: Method) -> torch.Tensor:
    """``(n,)`` the method's pointwise losses of ``batch`` under ``model``."""
    return method.losses(pair_logprobs(model, batch), batch, eta=ETA, beta=BETA)


def pairs(n: int = 8) -> PairBatch:
    """n float64 pairs whose log-probabilities are near the seed-0 tiny policy's."""
    return near_policy(random_pair_batch(n, seed=1), tiny_model(seed=0), seed=2)


def assert_same_diagnostics(ours: RobustDiagnostics, theirs: RobustDiagnostics) -> None:
    """The same diagnostics to rounding (the same dual, or none for both)."""
    assert (ours.dual is None) == (theirs.dual is None)
    for a, b in zip(ours, theirs, strict=True):
        if b is not None:
            assert a == pytest.approx(b, rel=1e-12)


# ------------------------------------------------------------------------ the update, unit


@pytest.mark.parametrize("name", ["rebel", *REWEIGHTING, "w-rebel"])
def test_the_minibatch_scope_is_the_minibatch_worst_case_bit_for_bit(name):
    batch, method = pairs(6), method_named(name)
    ours, theirs = tiny_model(seed=0), tiny_model(seed=0)
    stats = update_step(ours, torch.optim.SGD(ours.parameters(), lr=LR), batch, method,
                        eta=ETA, beta=BETA, max_grad_norm=None, w_gradient="exact")
    if method.spec is not None and method.spec.needs_input_gradients:
        # the penalty's coefficients are not pair weights: the losses enter as the mean
        weights = torch.full((6,), 1 / 6, dtype=torch.float64)
    else:
        # the step as it was before robust_scope: Danskin weights of robust_mean, in float64
        losses = pair_losses(theirs, batch, method)
        full = losses.detach().to(torch.float64).requires_grad_()
        (weights,) = torch.autograd.grad(robust_mean(full, method.spec), full)
        (weights.to(losses.dtype) * losses).sum().backward()
        torch.optim.SGD(theirs.parameters(), lr=LR).step()
        for (key, value), other in zip(ours.state_dict().items(),
                                       theirs.state_dict().values(), strict=True):
            assert torch.equal(value, other), key
    # the diagnostics of the minibatch's worst case, from its weights
    assert stats.robust.max_weight == pytest.approx(float(weights.max()), rel=1e-12)
    assert stats.robust.effective_pairs == pytest.approx(float(1 / weights.square().sum()),
                                                         rel=1e-12)
    if isinstance(method.spec, Chi2 | KL):
        dual = method.spec.worst_case(pair_losses(tiny_model(seed=0), batch, method)
                                      .detach()).dual
        assert stats.robust.dual == pytest.approx(float(dual), rel=1e-9)
    else:  # the mean, a fixed temperature, a Wasserstein penalty: no dual is solved
        assert stats.robust.dual is None
    if method.spec is None:
        assert stats.robust.effective_pairs == pytest.approx(6) and stats.robust.max_weight \
            == pytest.approx(1 / 6)
    elif not method.spec.needs_input_gradients:
        assert stats.robust.effective_pairs < 6 * (1 - 1e-3)  # not uniform at this radius


@pytest.mark.parametrize("name", REWEIGHTING)
def test_one_minibatch_per_iteration_gives_the_minibatch_scopes_update(name):
    batch, method = pairs(8), method_named(name)
    scoped, plain = tiny_model(seed=0), tiny_model(seed=0)
    with torch.no_grad():
        cache = IterationLosses(pair_losses(scoped, batch, method), method.spec)
    # SGD: AdamW would amplify rounding-level gradient differences of near-zero gradients
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR) for m in (scoped, plain)]
    for epoch in range(2):
        # the epoch's one minibatch holds every pair, in an order other than the cache's
        rows = torch.randperm(8, generator=torch.Generator().manual_seed(epoch))
        ours = update_step(scoped, optimizers[0], batch.select(rows), method, eta=ETA,
                           beta=BETA, max_grad_norm=1.0,
                           aggregate=partial(cache.objective, rows=rows))
        theirs = update_step(plain, optimizers[1], batch.select(rows), method, eta=ETA,
                             beta=BETA, max_grad_norm=1.0)
        assert ours.objective == pytest.approx(theirs.objective, rel=1e-12)
        assert ours.max_weight == pytest.approx(theirs.max_weight, rel=1e-12)
        assert_same_diagnostics(ours.robust, theirs.robust)
    for key, value in scoped.state_dict().items():
        torch.testing.assert_close(value, plain.state_dict()[key], rtol=1e-12, atol=1e-14)
    assert any(not torch.equal(v, tiny_model(seed=0).state_dict()[k])
               for k, v in scoped.state_dict().items())


@pytest.mark.parametrize("name", ["chi2-rebel", "kl-rebel", "kl-dpo"])
def test_an_epochs_surrogates_average_to_the_iterations_robust_gradient(name):
    # at fixed theta, with the cache current, sum_{i in B} (N/m) q_i grad l_i averages over
    # the minibatches of a partition to sum_i q_i grad l_i: the full iteration's Danskin
    # gradient (unbiased for a uniformly drawn minibatch)
    model, batch, method = tiny_model(seed=0), pairs(8), method_named(name)
    params = trainable(model)
    with torch.no_grad():
        cache = IterationLosses(pair_losses(model, batch, method), method.spec)
    expected = flat_grad(robust_mean(pair_losses(model, batch, method), method.spec), params)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    surrogates = [flat_grad(cache.objective(pair_losses(model, batch.select(rows), method),
                                            rows).loss, params)
                  for rows in order.split(2)]
    torch.testing.assert_close(torch.stack(surrogates).mean(0), expected)
    # ... while a single minibatch's is not that gradient (the estimate has a variance)
    assert not torch.allclose(surrogates[0], expected, rtol=1e-3)


def _iteration_objective_on_rank(local: PairBatch) -> dict:
    """One rank's iteration-scope objective for its local rows 1 and 3 (global minibatch
    {1, 3, 5, 7} of 8 pairs): weights, value, diagnostics and the surrogate's gradient."""
    model, method = tiny_model(seed=0), method_named("chi2-rebel")
    with torch.no_grad():
        cache = IterationLosses(pair_losses(model, local, method), method.spec)
    rows = torch.tensor([1, 3])
    objective = cache.objective(pair_losses(model, local.select(rows), method), rows)
    return {"weights": objective.weights, "value": objective.value,
            "robust": objective.diagnostics,
            "grad": flat_grad(objective.loss, trainable(model))}


def test_two_ranks_share_the_iterations_worst_case(tmp_path):
    batch = shared_pair_batch()
    ranks = run_on_two_ranks(_iteration_objective_on_rank, batch, tmp_path)
    model, method = tiny_model(seed=0), method_named("chi2-rebel")
    with torch.no_grad():
        cache = IterationLosses(pair_losses(model, batch, method), method.spec)
    rows = torch.tensor([1, 3, 5, 7])
    single = cache.objective(pair_losses(model, batch.select(rows), method), rows)
    torch.testing.assert_close(torch.cat([r["weights"] for r in ranks]), single.weights)
    # each rank back-propagates its own pairs: the gradients sum to one process's
    torch.testing.assert_close(ranks[0]["grad"] + ranks[1]["grad"],
                               flat_grad(single.loss, trainable(model)))
    for rank in ranks:
        assert float(rank["value"]) == pytest.approx(float(single.value), rel=1e-12)
        assert_same_diagnostics(rank["robust"], single.diagnostics)


def test_the_update_refuses_an_aggregate_without_pair_weights():
    batch, method = pairs(4), method_named("rebel")
    model = tiny_model(seed=0)
    with pytest.raises(ValueError, match="rebel has no pair weights"):
        update_step(model, torch.optim.SGD(model.parameters(), lr=LR), batch, method,
                    eta=ETA, beta=BETA, max_grad_norm=None,
                    aggregate=lambda losses: pytest.fail("never called"))
    with pytest.raises(ValueError, match="Wasserstein set is a penalty"):
        IterationLosses(torch.ones(4), method_named("w-rebel").spec)


# --------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_demo_base(tmp_path_factory.mktemp("scope") / "base", pretrain_steps=20,
                           corpus_size=300)


def train_smoke(base: Path, out: Path, *overrides: str) -> list[dict]:
    """The smoke configuration trained in-process; its train metrics lines."""
    trainer.train(load_config(SMOKE, [f"model={base}", f"out_dir={out}", *overrides]))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_each_step_weighs_its_pairs_by_the_full_iterations_worst_case(base, tmp_path,
                                                                      monkeypatch):
    starts, calls = [], []
    start_iteration, objective = trainer.start_iteration, IterationLosses.objective

    def spy_start(*args):
        batch, cache = start_iteration(*args)
        starts.append((batch.rewards.clone(), cache.losses.clone()))
        return batch, cache

    def spy_objective(self, losses, rows):
        before = self.losses.clone()
        out = objective(self, losses, rows)
        calls.append({"before": before, "after": self.losses.clone(), "rows": rows.clone(),
                      "fresh": losses.detach().clone(), "out": out})
        return out

    monkeypatch.setattr(trainer, "start_iteration", spy_start)
    monkeypatch.setattr(IterationLosses, "objective", spy_objective)
    # 8 pairs an iteration, minibatches of 4, two epochs: 4 steps an iteration
    records = train_smoke(base, tmp_path / "run", "method=chi2-rebel", f"chi2_rho={RHO}",
                          "robust_scope=iteration", "epochs=2", "iterations=2")
    assert len(starts) == 2 and len(calls) == 8 and len(records) == 2

    minibatch_weights_differ = False
    for iteration, (rewards, cache) in enumerate(starts):
        # filled from the model at theta_t, where REBEL's policy term is 0: (r - r')^2
        assert torch.equal(cache, (rewards[:, 0] - rewards[:, 1]).square())
        steps = calls[4 * iteration:4 * iteration + 4]
        assert torch.equal(steps[0]["before"], cache)
        # the first step runs at theta_t too, batched as the cache's forward was
        assert torch.equal(steps[0]["fresh"], cache[steps[0]["rows"]])
        duals, largest, effective = [], [], []
        for step in steps:
            rows, after, out = step["rows"], step["after"], step["out"]
            assert torch.equal(after[rows], step["fresh"])  # the visited pairs: refreshed
            others = torch.ones(8, dtype=torch.bool)
            others[rows] = False
            assert torch.equal(after[others], step["before"][others])  # the others: stale
            worst = chi2_worst_case(after.to(torch.float64), RHO)
            torch.testing.assert_close(out.weights, worst.weights[rows].float())
            torch.testing.assert_close(out.loss.detach(), (8 / 4 * worst.weights[rows].float()
                                                           * step["fresh"]).sum())
            assert float(out.value) == pytest.approx(float(worst.value), rel=1e-12)
            minibatch_weights_differ |= not torch.allclose(
                out.weights / out.weights.sum(),
                chi2_worst_case(step["fresh"].double(), RHO).weights.float(), rtol=1e-3)
            duals.append(float(worst.dual))
            largest.append(float(worst.weights.max()))
            effective.append(float(1 / worst.weights.square().sum()))
            # chi2 in closed form: a binding constraint 1/2 (n sum q^2 - 1) = rho fixes
            # 1 / sum q^2 = n / (1 + 2 rho); when at least that many pairs tie at the largest
            # loss the worst case is uniform on them instead (here at theta_t, equal losses)
            ties = int((after == after.max()).sum())
            assert out.diagnostics.effective_pairs == pytest.approx(
                max(ties, 8 / (1 + 2 * RHO)), rel=1e-9)
        record = records[iteration]
        assert record["robust/dual"] == pytest.approx(sum(duals) / 4, rel=1e-9)
        assert record["robust/max_weight"] == pytest.approx(sum(largest) / 4, rel=1e-9)
        assert record["robust/effective_pairs"] == pytest.approx(sum(effective) / 4,
                                                                 rel=1e-9)
    # the scope matters: the iteration's weights are not a minibatch's own worst case
    assert minibatch_weights_differ


def test_the_trainer_with_one_minibatch_gives_either_scopes_run(base, tmp_path):
    runs = {scope: train_smoke(base, tmp_path / scope, "method=chi2-rebel",
                               f"chi2_rho={RHO}", "minibatch_size=8", "epochs=2",
                               "iterations=1", *([f"robust_scope={scope}"]
                                                 if scope == "iteration" else []))
            for scope in ("minibatch", "iteration")}
    (plain,), (scoped,) = runs["minibatch"], runs["iteration"]
    for key in ("objective", "loss", "grad_norm", "max_weight", "robust/dual",
                "robust/max_weight", "robust/effective_pairs"):
        assert scoped[key] == pytest.approx(plain[key], rel=1e-5), key
    assert plain["robust/effective_pairs"] < 7.5  # a ball that moves the weights
    ours, theirs = (load_file(tmp_path / scope / "final" / "model.safetensors")
                    for scope in ("iteration", "minibatch"))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)


def test_the_minibatch_scope_averages_its_diagnostics_over_the_steps(base, tmp_path,
                                                                     monkeypatch):
    steps = []
    update = trainer.update

    def spy_update(*args):
        steps.append(update(*args))
        return steps[-1]

    monkeypatch.setattr(trainer, "update", spy_update)
    records = train_smoke(base, tmp_path / "dpo", "method=dpo", "epochs=2", "iterations=1")
    (record,), (stats,) = records, steps
    assert "robust/dual" not in record  # the mean solves no dual
    # every step's minibatch of 4 pairs is uniformly weighted
    assert record["robust/max_weight"] == pytest.approx(1 / 4)
    assert record["robust/effective_pairs"] == pytest.approx(4)
    records = train_smoke(base, tmp_path / "kl", "method=kl-rebel", f"kl_rho={RHO}",
                          "epochs=2", "iterations=1")
    (record,), stats = records, steps[-1]
    assert len(stats) == 4
    for key, field in (("robust/dual", "dual"), ("robust/max_weight", "max_weight"),
                       ("robust/effective_pairs", "effective_pairs")):
        expected = sum(getattr(s.robust, field) for s in stats) / len(stats)
        assert record[key] == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------- the config


@pytest.mark.parametrize(("name", "radius", "ball"), [
    ("chi2-rebel", (1 / 0.2 - 1) / 2, Chi2), ("chi2-dpo", (1 / 0.2 - 1) / 2, Chi2),
    ("kl-rebel", math.log(1 / 0.2), KL)])
def test_protect_fraction_sets_the_balls_radius(name, radius, ball):
    config = load_config(SMOKE, [f"method={name}", "protect_fraction=0.2"])
    spec = config_method(config).spec
    assert type(spec) is ball and spec.rho == pytest.approx(radius, rel=1e-15)
    assert spec == ball.protecting(0.2)
    # unset radii stay unset: the default applies only without protect_fraction
    assert (config.chi2_rho, config.kl_rho) == (None, None)
    assert config_method(load_config(SMOKE, [f"method={name}"])).spec == ball(0.01)
    # f = 1 is P itself; the other ball's radius may be given, it is not this method's
    other = "kl_rho" if ball is Chi2 else "chi2_rho"
    assert config_method(load_config(SMOKE, [f"method={name}", "protect_fraction=1",
                                             f"{other}=0.3"])).spec == ball(0.0)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_the_protected_fraction_of_the_pairs_is_the_chi2_worst_cases_effective_size(
        fraction):
    # the chi2 constraint binds below the max: 1/2 (n sum q^2 - 1) = rho = (1/f - 1) / 2,
    # so the iteration's n pairs count as 1 / sum q^2 = f n
    batch, model = pairs(8), tiny_model(seed=0)
    method = config_method(load_config(SMOKE, ["method=chi2-rebel",
                                               f"protect_fraction={fraction}"]))
    with torch.no_grad():
        cache = IterationLosses(pair_losses(model, batch, method), method.spec)
    rows = torch.tensor([0, 5])
    out = cache.objective(pair_losses(model, batch.select(rows), method), rows)
    assert out.diagnostics.effective_pairs == pytest.approx(fraction * 8, rel=1e-9)


def test_a_protect_fraction_config_round_trips(tmp_path):
    config = load_config(SMOKE, ["method=chi2-rebel", "protect_fraction=0.25",
                                 "robust_scope=iteration"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


NO_BALL = ("rebel", "dpo", "ipo", "w-rebel", "wdpo", "kltemp-rebel", "kl-dpo")
NO_WEIGHTS = ("rebel", "dpo", "ipo", "w-rebel", "wdpo")


@pytest.mark.parametrize(("overrides", "message"), [
    (["robust_scope=epoch"], "robust_scope must be one of minibatch, iteration, got 'epoch'"),
    (["robust_scope=1"], "robust_scope: expected a string, got 1"),
    *[([f"method={m}", "robust_scope=iteration"],
       f"robust_scope=iteration shares worst-case pair weights over an iteration, and {m} "
       "has none") for m in NO_WEIGHTS],
    *[(["method=chi2-rebel", f"protect_fraction={f}"],
       f"protect_fraction: Chi2.protecting: the fraction f must be in (0, 1], got {g}")
      for f, g in (("0", "0.0"), ("-0.5", "-0.5"), ("1.5", "1.5"), (".nan", "nan"))],
    (["method=kl-rebel", "protect_fraction=2"],
     "protect_fraction: KL.protecting: the fraction f must be in (0, 1], got 2.0"),
    (["method=chi2-rebel", "protect_fraction=true"],
     "protect_fraction: expected a number, got True (bool)"),
    (["method=chi2-rebel", "protect_fraction=half"],
     "protect_fraction: expected a number, got 'half' (str)"),
    (["method=chi2-rebel", "chi2_rho=0.1", "protect_fraction=0.5"],
     "protect_fraction and chi2_rho both set chi2-rebel's radius"),
    (["method=chi2-dpo", "chi2_rho=0.01", "protect_fraction=0.5"],
     "protect_fraction and chi2_rho both set chi2-dpo's radius"),
    (["method=kl-rebel", "kl_rho=0.1", "protect_fraction=0.5"],
     "protect_fraction and kl_rho both set kl-rebel's radius"),
    *[([f"method={m}", "protect_fraction=0.5"],
       f"protect_fraction sets the radius of a chi-square or KL ball, and {m} has none")
      for m in NO_BALL],
])
def test_bad_scope_and_fraction_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError) as error:
        load_config(SMOKE, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name", REWEIGHTING)
def test_every_method_with_pair_weights_takes_the_iteration_scope(name):
    assert load_config(SMOKE, [f"method={name}", "robust_scope=iteration"]).robust_scope \
        == "iteration"


def test_the_command_line_refuses_before_writing_anything(tmp_path):
    out = tmp_path / "never"
    result = subprocess.run(
        [sys.executable, "-m", "drosim.llm.cli", "train", "--config", "smoke",
         "method=kltemp-rebel", "protect_fraction=0.1", f"out_dir={out}"],
        capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "drosim-llm: error: protect_fraction sets the radius of a chi-square or KL ball, and "
        "kltemp-rebel has none: use chi2-rebel, chi2-dpo or kl-rebel, or leave "
        "protect_fraction unset")
    assert not out.exists()
