"""The minibatch bias of DRO-REBEL's robust gradient (claim C6: "every variant is SGD-compatible").

A trainer sees an iteration's N pairs (an LLM iteration: ``pairs_per_iteration``) in
minibatches B of m pairs. Building the ambiguity set around each minibatch's empirical
distribution P_B optimises, at every m, a different objective from the full batch's:

    F_N(w) = sup_{Q in U(P_N)} E_Q[l(w)],        F_B(w) = sup_{Q in U(P_B)} E_Q[l(w)],

with the REBEL loss l_i(w) = (<w, dphi_i> - dr_i)^2. E_B[grad F_B] is the gradient of the
surrogate E_B[F_B], not of F_N: the minibatch robust gradient is a biased estimate of the
full-batch one (Levy, Carmon, Duchi & Sidford 2020, "Large-scale methods for distributionally
robust optimization", NeurIPS, arXiv 2010.05893, bound this bias for CVaR and the chi-square
ball with losses in [0, B]; their constants could not be consulted while writing this module,
so they are not evaluated here: the bound evaluated is the one derived below). Every set of
drosim.dro has F_B = F_N at m = N, and for every divergence ball or penalty and the
Wasserstein penalty E_B[F_B] <= F_N (the value is a concave function of the empirical
distribution, which B estimates without bias: Jensen).

This study measures, on the linear world, at w = the least-squares (REBEL) fit of each full
batch (where the plain mean's gradient vanishes, so g_full is the robust correction alone):

* the relative gradient bias ||E_B[g_B] - g_full|| / ||g_full|| of two estimators:
  - ``minibatch``: g_B = grad F_B, the ball built around B (Danskin: sum_{i in B} q_i^B grad l_i);
  - ``iteration``: the full-batch objective linearised at the current w in each pair's loss
    and squared input-gradient norm, averaged over B and scaled by N/m; for a divergence set
    g_B = sum_{i in B} (N/m) q_i* grad l_i with the full batch's worst-case weights q*, for
    the Wasserstein penalty its dual lambda* = sqrt(mean_N ||grad_z l||^2) is held fixed
    (rho sqrt(M) = min_lambda rho (M / lambda + lambda) / 2). Unbiased at fixed w by
    linearity. For the divergence sets this is the LLM trainer's ``robust_scope:
    iteration`` (drosim.llm.components.objective.IterationLosses, with current losses); the trainer
    offers no iteration scope for a Wasserstein set;
* the value bias E_B[F_B] - F_N (<= 0) and an upper bound on its size.

Monte Carlo: R minibatches per full batch, uniform without replacement, solved in one call
(``(trials, R, m)`` losses). A control variate removes the plain mean's sampling noise, which
would otherwise swamp small radii: E_B[mean_B l] = mean_N l exactly (as for its gradient), so
the bias is that of the robust premium F_B - mean_B l. At m = N the only minibatch is the
full batch: both estimators are then the full-batch objective itself and the bias is exactly 0.

The bound. For a divergence set (chi-square or KL ball, KL temperature), let q* be the full
batch's worst case and psi the step density on [0, 1] that is N q*_(j) on ((j-1)/N, j/N] (q*
sorted with the losses). The weights v_k = int_{(k-1)/m}^{k/m} psi put on the k-th smallest
loss of B form a distribution whose divergence from P_B is at most that of q* from P_N (Jensen
on each interval), so they are feasible for B's ball (and cost no more penalty), and

    0 <= F_N - E_B[F_B] <= sum_i q*_i l_i - sum_k v_k E_B[l_(k:m)],

with E_B[l_(k:m)] exact under sampling without replacement (hypergeometric ranks). It is 0 at
m = N. For the Wasserstein penalty rho sqrt(M), M = mean ||grad_z l||^2, the bound
sqrt(x) >= sqrt(M) + (x - M) / (2 sqrt M) - (x - M)^2 / (2 M^1.5) (x >= 0) gives

    0 <= F_N - E_B[F_B] <= rho (1 - m/N) S^2 / (2 m M^1.5),  S^2 = sum_i (g_i - M)^2 / (N - 1),

g_i = ||grad_z l_i||^2 = 4 r_i^2 ||w||^2 (the variance of a without-replacement mean).
Gradient biases have no such bound here (the value's is what Levy et al. bound).

Rows: one per (pairs N, method, rho, minibatch m, estimator, trial).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor
from tqdm import tqdm

from drosim.chunks import DEFAULT_MEMORY_BUDGET, chunk_slices, trials_per_chunk
from drosim.dro import KL, AmbiguitySet, Chi2, KLTemperature, Wasserstein, robust_mean
from drosim.estimators import rebel
from drosim.plotting import save_figure
from drosim.stats import per_x_statistics
from drosim.studies._common import one_thread, random_stream
from drosim.studies.montecarlo import resolve_preset, sample_trials
from drosim.world import PairBatch, make_world

__all__ = ["ESTIMATORS", "KEYS", "PRESETS", "TRAINER_MINIBATCH", "TRAINER_PAIRS",
           "TRAINER_RADII", "Estimates", "FullBatch", "RobustSet", "batch_estimates",
           "full_batch", "plot", "robust_sets", "run", "statistics", "value_bound"]

PRESETS: dict[str, dict[str, Any]] = {
    # pairs: full-batch sizes N (128: the paper configs' pairs_per_iteration; 32: the
    # trainer's default); minibatches: the sizes m < N measured (N itself is always added)
    "quick": {"pairs": (128, 32), "minibatches": (2, 4, 8, 16, 32, 64), "trials": 8,
              "draws": 2000, "dim": 8, "noise": 0.5, "seed": 0},
    "full": {"pairs": (128, 32), "minibatches": (2, 4, 8, 16, 32, 64), "trials": 32,
             "draws": 8000, "dim": 8, "noise": 0.5, "seed": 0},
}
ESTIMATORS = ("minibatch", "iteration")
# The LLM trainer's defaults (drosim.llm.components.config.TrainConfig; tests/test_minibatch.py
# checks they agree): pairs per iteration, pairs per optimiser step, and each family's radius.
TRAINER_PAIRS = 32
TRAINER_MINIBATCH = 16
TRAINER_RADII = {"chi2": 0.01, "kl": 0.01, "kl_temperature": 0.1, "wasserstein": 0.01}
# The columns that name a configuration (a row of statistics()).
KEYS = ["method", "family", "rho", "pairs", "estimator"]


class RobustSet(NamedTuple):
    """One ambiguity set of the study: its name, family (a key of FAMILY_COLOURS), radius
    (the temperature for a KL temperature) and the drosim.dro spec."""

    method: str
    family: str
    rho: float
    spec: AmbiguitySet


def robust_sets() -> list[RobustSet]:
    """chi-square and KL balls at 0.01, 0.1, 1 and the radius protecting 10% of the data, the
    KL temperature at 0.1 (the trainer's default) and 1, and the Wasserstein penalty at
    0.01 (at the least-squares fit its relative gradient bias does not depend on rho: the
    plain mean's gradient vanishes there and the penalty's is proportional to rho; likewise
    a chi-square ball whose weights are not clipped, mean + sqrt(2 rho Var), on the full
    batch and every minibatch, e.g. rho = 0.01 and 0.1 here)."""
    balls = [(Chi2, "chi2-REBEL", "chi2"), (KL, "KL-REBEL", "kl")]
    sets = [RobustSet(name, family, spec.rho, spec)
            for kind, name, family in balls
            for spec in (kind(0.01), kind(0.1), kind(1.0), kind.protecting(0.1))]
    sets += [RobustSet("KLtemp-REBEL", "kl_temperature", tau, KLTemperature(tau))
             for tau in (0.1, 1.0)]
    return [*sets, RobustSet("W-REBEL", "wasserstein", 0.01, Wasserstein(0.01))]


class Estimates(NamedTuple):
    """Robust premiums (objective minus the plain mean) and their gradients in w.

    Attributes:
        premium: ``(T, R)`` F - mean(l) per trial and draw.
        gradient: ``(T, R, d)`` its gradient in w.
    """

    premium: Tensor
    gradient: Tensor


class FullBatch(NamedTuple):
    """What the estimators need from the full batch, per trial.

    Attributes:
        estimates: premium ``(T, 1)`` and its gradient ``(T, 1, d)``.
        gradient: ``(T, d)`` g_full, the gradient of F_N itself.
        loss_weights: ``(T, N)`` d F_N / d l_i (Danskin's q*_i; 1/N for Wasserstein).
        norm_weights: ``(T, N)`` d F_N / d ||grad_z l_i||^2 (0 for divergence sets).
        offset: ``(T,)`` F_N minus its linearisation's sum (-tau KL(q*) for a temperature).
        losses: ``(T, N)`` l_i at w.
        norms: ``(T, N)`` ||grad_z l_i||^2 at w.
    """

    estimates: Estimates
    gradient: Tensor
    loss_weights: Tensor
    norm_weights: Tensor
    offset: Tensor
    losses: Tensor
    norms: Tensor


def _losses(dphi: Tensor, dr: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """REBEL losses and their squared input-gradient norms.

    Args:
        dphi: ``(T, R, m, d)`` feature differences.
        dr: ``(T, R, m)`` relative rewards.
        w: ``(T, R, d)`` one parameter per row (copies of a trial's w, so that one backward
            gives every row's own gradient).

    Returns:
        l_i = r_i^2 and ||grad_dphi l_i||^2 = ||2 r_i w||^2, each ``(T, R, m)``, with
        r_i = <w, dphi_i> - dr_i.
    """
    residual = torch.einsum("trmd,trd->trm", dphi, w) - dr
    return residual.square(), 4 * residual.square() * w.square().sum(-1, keepdim=True)


def _premium_and_gradient(premium: Tensor, w: Tensor, *, retain_graph: bool = False
                          ) -> Estimates:
    """Detached premiums ``(T, R)`` with their per-row gradients in w ``(T, R, d)``; keep
    the graph (``retain_graph``) when another premium shares its losses."""
    (gradient,) = torch.autograd.grad(premium.sum(), w, retain_graph=retain_graph)
    return Estimates(premium.detach(), gradient)


def full_batch(spec: AmbiguitySet, pairs: PairBatch, w: Tensor) -> FullBatch:
    """The full-batch objective F_N at w and its linearisation in the per-pair inputs.

    Args:
        spec: the ambiguity set.
        pairs: the full batches, dphi ``(T, N, d)``.
        w: ``(T, d)`` the parameter of each trial.

    Returns:
        The :class:`FullBatch` of each trial.
    """
    rows = w.detach().unsqueeze(1).requires_grad_()
    losses, norms = _losses(pairs.dphi.unsqueeze(1), pairs.dr.unsqueeze(1), rows)
    value = robust_mean(losses, spec, grad_sq_norms=norms)
    (gradient,) = torch.autograd.grad(value.sum(), rows, retain_graph=True)
    estimates = _premium_and_gradient(value - losses.mean(-1), rows)
    # d F_N / d(l_i, ||grad_z l_i||^2) at the solved dual: q*_i (Danskin) and, for the
    # Wasserstein penalty rho sqrt(M), rho / (2 N sqrt(M)).
    inputs = (losses.detach().squeeze(1).requires_grad_(),
              norms.detach().squeeze(1).requires_grad_())
    value = robust_mean(inputs[0], spec, grad_sq_norms=inputs[1])
    loss_weights, norm_weights = torch.autograd.grad(value.sum(), inputs, allow_unused=True)
    if norm_weights is None:  # a divergence set does not read the norms
        norm_weights = torch.zeros_like(loss_weights)
    linear = (loss_weights * inputs[0] + norm_weights * inputs[1]).sum(-1)
    return FullBatch(estimates, gradient.squeeze(1), loss_weights, norm_weights,
                     value.detach() - linear.detach(), inputs[0].detach(), inputs[1].detach())


def batch_estimates(spec: AmbiguitySet, pairs: PairBatch, w: Tensor, full: FullBatch,
                    index: Tensor) -> dict[str, Estimates]:
    """Both estimators on R minibatches per trial, solved in one call.

    Args:
        spec: the ambiguity set.
        pairs: the full batches, dphi ``(T, N, d)``.
        w: ``(T, d)`` the parameter of each trial.
        full: :func:`full_batch` of the same spec, pairs and w.
        index: ``(T, R, m)`` the pairs of each minibatch (distinct within a row).

    Returns:
        {"minibatch": premium of F_B, "iteration": premium of the linearised F_N averaged
        over B and scaled by N/m}, each with its gradient.
    """
    n, m = pairs.dr.shape[-1], index.shape[-1]
    trial = torch.arange(index.shape[0], device=index.device)[:, None, None]
    rows = w.detach().unsqueeze(1).expand(-1, index.shape[1], -1).clone().requires_grad_()
    losses, norms = _losses(pairs.dphi[trial, index], pairs.dr[trial, index], rows)
    minibatch = robust_mean(losses, spec, grad_sq_norms=norms) - losses.mean(-1)
    linear = (full.loss_weights[trial, index] * losses
              + full.norm_weights[trial, index] * norms).sum(-1)
    iteration = (n / m) * linear + full.offset[:, None] - losses.mean(-1)
    return {"minibatch": _premium_and_gradient(minibatch, rows, retain_graph=True),
            "iteration": _premium_and_gradient(iteration, rows)}


def value_bound(spec: AmbiguitySet, full: FullBatch, m: int) -> Tensor:
    """An upper bound on F_N - E_B[F_B] for minibatches of m pairs (module note).

    Args:
        spec: the ambiguity set.
        full: :func:`full_batch` of each trial.
        m: the minibatch size, 1 <= m <= N.

    Returns:
        ``(T,)`` the bound: the rank-restriction bound for a divergence set, the
        second-order Jensen bound for the Wasserstein penalty; 0 at m = N.

    Raises:
        ValueError: a Wasserstein set of order p != 2 (its penalty is not rho sqrt(M)).
    """
    losses, norms = full.losses, full.norms
    n = losses.shape[-1]
    if spec.needs_input_gradients:
        if spec.p != 2:
            raise ValueError(f"the Wasserstein bound is for p = 2, got p = {spec.p}")
        mean = norms.mean(-1)
        spread = (norms - mean[:, None]).square().sum(-1) / max(n - 1, 1)
        return spec.rho * (1 - m / n) * spread / (2 * m * mean.pow(1.5))
    order = losses.argsort(-1)
    x, q = losses.gather(-1, order), full.loss_weights.gather(-1, order)
    k = torch.arange(1, m + 1, dtype=torch.float64, device=losses.device)[:, None]
    j = torch.arange(1, n + 1, dtype=torch.float64, device=losses.device)[None, :]
    size, subset = k.new_tensor(float(n)), k.new_tensor(float(m))
    # N |((k-1)/m, k/m] & ((j-1)/N, j/N]| = (overlap of (k-1)N..kN and (j-1)m..jm) / m:
    # integers over m, so that at m = N the weights are q* exactly.
    overlap = (torch.minimum(k * n, j * m) - torch.maximum((k - 1) * n, (j - 1) * m))
    rank_weights = q @ (overlap.clamp_min(0) / m).to(q).T  # (T, m): v_k
    # P(the k-th smallest of B is the j-th smallest of the batch) = C(j-1, k-1) C(N-j, m-k)
    # / C(N, m) for B uniform without replacement.
    log_p = _log_choose(j - 1, k - 1) + _log_choose(n - j, m - k) - _log_choose(size, subset)
    expected = x @ log_p.exp().to(x).T  # (T, m): E[l_(k:m)]
    return (q * x).sum(-1) - (rank_weights * expected).sum(-1)


def _log_choose(a: Tensor, b: Tensor) -> Tensor:
    """log C(a, b) elementwise (broadcast), -inf where b < 0 or b > a."""
    valid = (b >= 0) & (b <= a)
    a, b = torch.broadcast_tensors(a, b)
    safe_b = torch.where(valid, b, 0.0)
    value = torch.lgamma(a + 1) - torch.lgamma(safe_b + 1) - torch.lgamma(a - safe_b + 1)
    return torch.where(valid, value, -torch.inf)


class _Moments:
    """Running sums over Monte-Carlo draws of a premium and its gradient, per trial."""

    def __init__(self) -> None:
        self.draws = 0
        self.sums: list[Tensor] = []

    def add(self, estimates: Estimates) -> None:
        p, g = estimates
        parts = [p.sum(1), p.square().sum(1), g.sum(1), g.square().sum(1)]
        self.sums = parts if not self.sums else [a + b for a, b in zip(self.sums, parts,
                                                                     strict=True)]
        self.draws += p.shape[1]

    def bias(self, full: FullBatch) -> dict[str, Tensor]:
        """Per trial: the relative gradient bias and value bias with their standard errors.

        The gradient's standard error is sqrt(trace Cov(g_B) / R) / ||g_full||, the root
        mean square size of the Monte-Carlo error of E_B[g_B]: a zero bias is measured as
        about that much, and a measured bias is within it of the true one (triangle
        inequality).
        """
        r = self.draws
        p1, p2, g1, g2 = (s / r for s in self.sums)
        scale = full.gradient.norm(dim=-1)
        gradient_gap = g1 - full.estimates.gradient.squeeze(1)
        gradient_var = (g2 - g1.square()).clamp_min(0).sum(-1) * r / max(r - 1, 1)
        value_var = (p2 - p1.square()).clamp_min(0) * r / max(r - 1, 1)
        return {"bias": gradient_gap.norm(dim=-1) / scale,
                "bias_se": (gradient_var / r).sqrt() / scale,
                "value_bias": p1 - full.estimates.premium.squeeze(1),
                "value_bias_se": (value_var / r).sqrt()}


def _draw_minibatches(trials: int, draws: int, n: int, m: int,
                      generator: torch.Generator) -> Tensor:
    """``(trials, draws, m)`` minibatches, each uniform without replacement from range(n)."""
    keys = torch.rand(trials, draws, n, generator=generator, device=generator.device)
    return keys.argsort(-1)[..., :m]


def run(preset: str = "quick", *, device: str | torch.device = "cpu",
        memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: bool = True,
        **settings: Any) -> pd.DataFrame:
    """The minibatch and iteration estimators against the full batch, for every set.

    Args:
        preset: "quick" or "full" (see PRESETS).
        device: where the tensors live.
        memory_budget: bytes per chunk of Monte-Carlo draws; draws beyond one chunk come
            from their own random streams, so the numbers depend on the budget only when it
            splits them.
        progress: show a progress bar over the (N, m) cells.
        **settings: override entries of the preset (pairs, minibatches, trials, draws, dim,
            noise, seed).

    Returns:
        One row per (pairs N, set, minibatch m, estimator, trial): columns method, family,
        rho, pairs, minibatch, estimator, trial, bias (||E_B[g_B] - g_full|| / ||g_full||),
        bias_se, value_bias (E_B[F_B] - F_N), value_bias_se, bound (on |value_bias|; the
        same for both estimators, whose value bias is F_B's for ``minibatch`` only),
        premium (F_N - mean_N l) and grad_norm (||g_full||). ``attrs["config"]`` holds the
        configuration.
    """
    config = resolve_preset(PRESETS, preset, settings)
    world = make_world(config["dim"], noise=config["noise"], seed=config["seed"],
                       device=device)
    sets = robust_sets()
    sizes = {n: [*(m for m in config["minibatches"] if m < n), n] for n in config["pairs"]}
    bar = tqdm(total=sum(map(len, sizes.values())), desc="minibatch", unit="cell",
               disable=not progress)
    rows = []
    with one_thread(), bar:
        for n, minibatches in sizes.items():
            pairs = sample_trials(world, n, slice(0, config["trials"]), (config["seed"], n))
            w = rebel(pairs.dphi, pairs.dr).w  # the least-squares fit
            fulls = [full_batch(s.spec, pairs, w) for s in sets]
            for m in minibatches:
                rows += _cell_rows(sets, fulls, pairs, w, m, config, memory_budget)
                bar.update()
    frame = pd.concat(rows, ignore_index=True)
    frame.attrs["config"] = config
    return frame


def _cell_rows(sets: list[RobustSet], fulls: list[FullBatch], pairs: PairBatch, w: Tensor,
               m: int, config: dict[str, Any], memory_budget: int) -> list[pd.DataFrame]:
    """The rows of :func:`run` for one full-batch size N and one minibatch size m."""
    trials, n = pairs.dr.shape
    if m == n:  # the one minibatch is the full batch: no Monte Carlo, no bias
        measured = [{e: _exact_zero(full) for e in ESTIMATORS} for full in fulls]
    else:
        measured = _monte_carlo(sets, fulls, pairs, w, m, config["draws"], memory_budget,
                                (config["seed"], n, m))
    rows = []
    for robust, full, by_estimator in zip(sets, fulls, measured, strict=True):
        bound = value_bound(robust.spec, full, m)
        for estimator, numbers in by_estimator.items():
            rows.append(pd.DataFrame({
                "method": robust.method, "family": robust.family, "rho": robust.rho,
                "pairs": n, "minibatch": m, "estimator": estimator,
                "trial": np.arange(trials),
                **{k: v.cpu().numpy() for k, v in numbers.items()},
                "bound": bound.cpu().numpy(),
                "premium": full.estimates.premium.squeeze(1).cpu().numpy(),
                "grad_norm": full.gradient.norm(dim=-1).cpu().numpy()}))
    return rows


def _exact_zero(full: FullBatch) -> dict[str, Tensor]:
    zero = torch.zeros_like(full.estimates.premium.squeeze(1))
    return {"bias": zero, "bias_se": zero, "value_bias": zero, "value_bias_se": zero}


def _monte_carlo(sets: list[RobustSet], fulls: list[FullBatch], pairs: PairBatch, w: Tensor,
                 m: int, draws: int, memory_budget: int, stream: tuple[int, ...]
                 ) -> list[dict[str, dict[str, Tensor]]]:
    """Per set and estimator, the per-trial biases over ``draws`` minibatches of m pairs;
    every set sees the same minibatches (common random numbers)."""
    trials, n, d = pairs.dphi.shape
    per_chunk = max(1, trials_per_chunk(n, d, memory_budget=memory_budget) // trials)
    moments = [{e: _Moments() for e in ESTIMATORS} for _ in sets]
    for chunk in chunk_slices(draws, per_chunk):
        generator = random_stream(*stream, chunk.start, device=pairs.dr.device)
        index = _draw_minibatches(trials, chunk.stop - chunk.start, n, m, generator)
        for robust, full, sums in zip(sets, fulls, moments, strict=True):
            for estimator, estimates in batch_estimates(robust.spec, pairs, w, full,
                                                        index).items():
                sums[estimator].add(estimates)
    return [{e: sums[e].bias(full) for e in ESTIMATORS}
            for full, sums in zip(fulls, moments, strict=True)]


def statistics(frame: pd.DataFrame) -> pd.DataFrame:
    """The long-format table of the check: one row per configuration and minibatch size.

    Args:
        frame: the output of :func:`run`.

    Returns:
        The per-x statistics over trials of each trial's relative gradient bias (study,
        KEYS, x_name = "minibatch", x, median, q10, q90, mean, trials), then minibatch
        (= x); bias = mean_t ||E_B[g_B] - g_full|| / mean_t ||g_full|| (a ratio of means
        over the trials t: a batch whose worst case sits on a pair with almost no gradient,
        e.g. dphi = 0, has a tiny ||g_full|| and would dominate a mean of ratios); bias_se =
        the root mean square over trials of each trial's Monte-Carlo standard error, on the
        same scale (a zero bias reads as about that much); value_bias and bound (means over
        trials); value_bias_se (root mean square over trials); premium (mean F_N - mean l).
    """
    stats = per_x_statistics(frame, "minibatch", "bias", study="minibatch", by=tuple(KEYS))
    scaled = frame.assign(gap=frame["bias"] * frame["grad_norm"],
                          gap_se2=(frame["bias_se"] * frame["grad_norm"]) ** 2,
                          value_se2=frame["value_bias_se"] ** 2)
    means = scaled.groupby([*KEYS, "minibatch"], sort=True)[
        ["gap", "gap_se2", "grad_norm", "value_bias", "value_se2", "bound", "premium"]].mean()
    summary = pd.DataFrame({
        "bias": means["gap"] / means["grad_norm"],
        "bias_se": np.sqrt(means["gap_se2"]) / means["grad_norm"],
        "value_bias": means["value_bias"], "value_bias_se": np.sqrt(means["value_se2"]),
        "bound": means["bound"], "premium": means["premium"]})
    summary = summary.reset_index().rename(columns={"minibatch": "x"})
    stats = stats.merge(summary, on=[*KEYS, "x"], validate="one_to_one")
    stats.insert(stats.columns.get_loc("bias"), "minibatch", stats["x"])
    return stats


_RADIUS_COLOURS = ("C0", "C1", "C2", "C3")


def plot(frame: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """figures/minibatch.{png,pdf}: biases against the minibatch size, log-log.

    Top row, one panel per family: the minibatch estimator's relative gradient bias (mean
    over trials) for the largest full batch, one colour per radius; grey dashes the
    iteration estimator (its Monte-Carlo floor, not a bias); stars the trainer's default
    minibatch of its default batch. Bottom row: |E_B[F_B] - F_N| (solid) and its bound
    (dashed). m = N is left out: every bias is exactly 0 there.

    Args:
        frame: the output of :func:`run`.
        out_dir: the folder to write to.

    Returns:
        The paths written.
    """
    stats = statistics(frame)
    largest = stats["pairs"].max()
    shown = stats[(stats["pairs"] == largest) & (stats["x"] < largest)]
    families = [f for f in dict.fromkeys(s.family for s in robust_sets())
                if f in set(shown["family"])]
    fig = Figure(figsize=(4.2 * len(families), 8), layout="constrained")
    axes = fig.subplots(2, len(families), squeeze=False)
    for column, family in enumerate(families):
        top, bottom = axes[0, column], axes[1, column]
        subset = shown[shown["family"] == family]
        for colour, (rho, group) in zip(_RADIUS_COLOURS, subset.groupby("rho"), strict=False):
            mini = group[group["estimator"] == "minibatch"]
            label = f"{'τ' if family == 'kl_temperature' else 'ρ'} = {rho:.3g}"
            top.plot(mini["x"], mini["bias"], "o-", color=colour, ms=3.5, label=label)
            iteration = group[group["estimator"] == "iteration"]
            top.plot(iteration["x"], iteration["bias"], "--", color="0.6", lw=1)
            bottom.plot(mini["x"], mini["value_bias"].abs(), "o-", color=colour, ms=3.5,
                        label=label)
            bottom.plot(mini["x"], mini["bound"], "--", color=colour, lw=1.2)
            default = stats[(stats["family"] == family) & (stats["rho"] == rho)
                            & (stats["pairs"] == TRAINER_PAIRS)
                            & (stats["x"] == TRAINER_MINIBATCH)
                            & (stats["estimator"] == "minibatch")]
            top.plot(default["x"], default["bias"], "*", color=colour, ms=11)
        top.plot([], [], "--", color="0.6", label="iteration estimator (MC floor)")
        top.plot([], [], "*", color="0.3", ls="none",
                 label=f"trainer default: {TRAINER_MINIBATCH} of {TRAINER_PAIRS} pairs")
        bottom.plot([], [], "--", color="0.3", label="bound (module note)")
        top.set_title(f"{subset['method'].iloc[0]}: gradient bias, N = {largest}")
        bottom.set_title(f"{subset['method'].iloc[0]}: objective bias, N = {largest}")
        top.set_ylabel("||E_B[g_B] − g_full|| / ||g_full||")
        bottom.set_ylabel("|E_B[F_B] − F_N|")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("minibatch size m")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("C6 (SGD): the ball built around each minibatch is a biased estimate of the "
                 "full batch's (linear world, w = least-squares fit, mean over "
                 f"{frame['trial'].nunique()} full batches)")
    return save_figure(fig, out_dir, "minibatch")
