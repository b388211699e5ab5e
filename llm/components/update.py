"""One optimiser step of a method on a minibatch of response pairs.

    logprobs   = sequence_logprobs(policy, pairs)                 one forward, (n, 2)
    losses     = method.losses(logprobs, pairs)                    pointwise, (n,)
    objective  = robust_objective(losses, method.spec, embeddings)  drosim.dro, global
    objective.loss.backward(); all-reduce(sum) the gradients; clip; step

With ``robust_scope=iteration`` the trainer passes an ``aggregate`` instead
(:class:`drosim.llm.components.objective.IterationLosses`): the same step, its weights those of the
iteration's worst case.

A Wasserstein method's penalty needs the gradient of ||grad_z l_i||^2: by default a forward
difference of two first-order gradients (:func:`finite_difference_backward`), or the exact
double backward (``w_gradient="exact"``, for verification).

Data parallelism is done by hand rather than with ``DistributedDataParallel``: the robust
objective already couples the ranks through its gathered dual, its surrogate gradients must be
SUMMED (not averaged) over ranks, and DDP's reducer does not support the double backward of
the exact Wasserstein gradient. One flattened all-reduce per step does the same communication.
A policy sharded with FSDP2 (:mod:`drosim.llm.components.sharding`) reduce-scatters, and sums, its
own gradients during the backward instead.

The policy is always fed token ids; a Wasserstein method reads (and, for the finite
difference, shifts) the input embeddings through a hook on the embedding layer
(:func:`input_embeddings`), inside the model's forward, where a sharded embedding table is
gathered.

With ``packing`` (:func:`batch_layout`) every forward of the update runs on packed rows
(:func:`drosim.llm.components.logprobs.packed_sequence_logprobs`): the pairs' real tokens end
to end, each sequence attending to itself only. The Wasserstein methods then see the
embeddings in that layout and map each token to its pair (:func:`token_pairs`).

The iteration's first step can supply log pi_t itself (``sampling_out``): at theta = theta_t
its own forward's detached log-probabilities are exactly what a recording forward would give.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from drosim.llm.components.batch import PairBatch
from drosim.llm.components.logprobs import (
    PackedLayout,
    model_layout,
    packed_sequence_logprobs,
    sequence_logprobs,
)
from drosim.llm.components.methods import W_GRADIENTS, Method
from drosim.llm.components.objective import (
    Aggregate,
    RobustDiagnostics,
    RobustObjective,
    check_local_losses,
    robust_coefficients,
    robust_objective,
    sample_sums,
)
from drosim.llm.components.runtime import all_reduce, sum_gradients_over_ranks
from drosim.llm.components.sharding import is_sharded

WGradient = Literal["exact", "finite-difference"]


class StepStats(NamedTuple):
    """Scalars of one update: the global objective, mean pointwise loss and gradient norm,
    this rank's largest sample weight, the worst case's diagnostics over its scope (the
    global minibatch, or the iteration's pairs), and the share of padding positions in the
    step's forwards (this rank's)."""

    objective: float
    mean_loss: float
    grad_norm: float
    max_weight: float
    robust: RobustDiagnostics
    padding_fraction: float


def pair_logprobs(policy: nn.Module, batch: PairBatch, *, embeddings: Tensor | None = None,
                  layout: PackedLayout | None = None) -> Tensor:
    """``(n, 2)`` log pi_theta of every pair's responses from one forward pass: of the padded
    ``(2n, T)`` rows, or of packed rows when ``layout`` (:func:`batch_layout`) is given."""
    rows = (batch.flat("input_ids"), batch.flat("attention_mask"), batch.flat("response_mask"))
    if layout is None:
        out = sequence_logprobs(policy, *rows, inputs_embeds=embeddings)
    else:
        out = packed_sequence_logprobs(policy, *rows, inputs_embeds=embeddings, layout=layout)
    return out.logprobs.view(len(batch), 2)


def batch_layout(policy: nn.Module, batch: PairBatch, packing: bool) -> PackedLayout | None:
    """The packed layout of the batch's ``2n`` sequences for the policy's attention kernel
    (:func:`drosim.llm.components.logprobs.model_layout`), or None (padded) without
    packing."""
    return model_layout(policy, batch.flat("attention_mask")) if packing else None


def padding_fraction(batch: PairBatch, layout: PackedLayout | None) -> float:
    """The share of the forward's token positions that are padding."""
    if layout is not None:
        return layout.padding_fraction()
    mask = batch.attention_mask
    return 1 - int(mask.sum()) / mask.numel()


def token_pairs(batch: PairBatch, layout: PackedLayout | None) -> Tensor:
    """The pair owning each token position of the forward, -1 on padding.

    Returns:
        ``(2n, T)`` for the padded rows (row 2i + j belongs to pair i), ``(rows, capacity)``
        for packed ones.
    """
    if layout is not None:
        return torch.where(layout.sequence >= 0, layout.sequence // 2, -1)
    mask = batch.flat("attention_mask").bool()
    pair = torch.arange(mask.shape[0], device=mask.device) // 2
    return torch.where(mask, pair[:, None], -1)


def pair_losses(method: Method, logprobs: Tensor, batch: PairBatch, *, eta: float,
                beta: float, sampling_out: Tensor | None = None) -> tuple[Tensor, PairBatch]:
    """The ``(n,)`` pointwise losses of ``logprobs`` and the batch they were computed on.

    With ``sampling_out`` (an ``(n, 2)`` tensor) the forward at theta_t supplies log pi_t: its
    detached log-probabilities replace the batch's ``sampling_logprobs`` (the REBEL policy
    term is then exactly 0) and are copied into ``sampling_out`` for the later steps.
    """
    if sampling_out is not None:
        current = logprobs.detach()
        sampling_out.copy_(current)
        batch = replace(batch, sampling_logprobs=current)
    return method.losses(logprobs, batch, eta=eta, beta=beta), batch


class CapturedEmbeddings:
    """What :func:`input_embeddings` saw: ``value``, the ``(batch, T, D)`` output of the
    embedding layer in the last forward (shift included), in the autograd graph."""

    value: Tensor


@contextlib.contextmanager
def input_embeddings(policy: nn.Module, *, shift: Tensor | None = None
                     ) -> Iterator[CapturedEmbeddings]:
    """Capture, and optionally shift, the input embeddings inside the policy's forward.

    A forward hook on ``policy.get_input_embeddings()`` records its output and returns
    ``output + shift``. Unlike embedding the ids outside the model and feeding
    ``inputs_embeds``, this works when the embedding table is sharded (FSDP2 gathers it only
    inside the root forward), and the shifted embeddings still depend on the table. With a
    frozen table (LoRA) the captured embeddings are made to require a gradient (outside
    ``torch.no_grad``), so the Wasserstein penalty can still differentiate through them.

    Args:
        policy: a causal LM with ``get_input_embeddings``.
        shift: ``(batch, T, D)`` added to the embeddings (broadcastable), or None.

    Yields:
        :class:`CapturedEmbeddings`, filled by each forward in the block.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11))
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> with input_embeddings(model) as captured:
        ...     _ = model(input_ids=ids)
        >>> captured.value.shape
        torch.Size([1, 3, 8])
    """
    captured = CapturedEmbeddings()

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if torch.is_grad_enabled() and not output.requires_grad:
            # A frozen table (LoRA) gives embeddings outside the graph: the penalty still
            # differentiates the loss with respect to them (they become a leaf).
            output.requires_grad_()
        captured.value = output if shift is None else output + shift
        return captured.value

    handle = policy.get_input_embeddings().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def method_objective(policy: nn.Module, batch: PairBatch, method: Method, *, eta: float,
                     beta: float, aggregate: Aggregate | None = None,
                     layout: PackedLayout | None = None, sampling_out: Tensor | None = None
                     ) -> tuple[RobustObjective, Tensor]:
    """The method's robust objective on ``batch`` and the ``(n,)`` pointwise losses.

    The Wasserstein sets differentiate through the input embeddings, which are captured from
    the forward (:func:`input_embeddings`; in packed rows with ``layout``, each token mapped
    to its pair by :func:`token_pairs`). ``aggregate`` replaces the minibatch's own worst
    case (:func:`robust_objective`) for a set with pair weights (``update_step`` checks).
    ``sampling_out``: see :func:`pair_losses`.
    """
    if not method.needs_input_gradients:
        logprobs = pair_logprobs(policy, batch, layout=layout)
        losses, _ = pair_losses(method, logprobs, batch, eta=eta, beta=beta,
                                sampling_out=sampling_out)
        if aggregate is not None:
            return aggregate(losses), losses
        return robust_objective(losses, method.spec), losses
    with attention_kernels(method), input_embeddings(policy) as embeddings:
        logprobs = pair_logprobs(policy, batch, layout=layout)
        losses, _ = pair_losses(method, logprobs, batch, eta=eta, beta=beta,
                                sampling_out=sampling_out)
        owners = None if layout is None else token_pairs(batch, layout)
        return robust_objective(losses, method.spec, inputs=embeddings.value,
                                owners=owners), losses


def attention_kernels(method: Method, w_gradient: WGradient = "exact"
                      ) -> contextlib.AbstractContextManager:
    """The attention kernels a method may use, as a context for its forward AND backward.

    The exact Wasserstein gradient differentiates twice; the fused (flash /
    memory-efficient) attention kernels have no double backward, the math kernel does. The
    backward needs the same context because gradient checkpointing recomputes the forward
    inside it. The finite-difference gradient needs first derivatives only: every kernel.
    """
    if method.needs_input_gradients and w_gradient == "exact":
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def maybe_compile(policy: nn.Module, enabled: bool) -> nn.Module:
    """The module the update calls: ``torch.compile(policy)`` when ``enabled``, else ``policy``.

    ``torch.compile(policy)`` rather than ``policy.compile()``: the wrapper it returns shares
    the policy's parameters but leaves the policy itself eager, so only the update's forward
    and backward are compiled, while sampling (``generate``, whose growing key-value cache
    would recompile at every length), evaluation, checkpoints and ``save_pretrained`` keep
    the plain module and its state-dict keys (the wrapper's carry an ``_orig_mod.`` prefix).
    The Wasserstein methods cannot use it (``update_step`` refuses them): their embedding hook
    (:func:`input_embeddings`) is registered per step, after compilation, and a compiled
    graph does not see it; the exact gradient's double backward has no compiled form either.

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(2, 2)
        >>> maybe_compile(layer, False) is layer
        True
    """
    return torch.compile(policy) if enabled else policy


def autocast_context(batch: PairBatch, dtype: torch.dtype | None
                     ) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on the batch's device (no autocast for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(batch.input_ids.device.type, dtype=dtype)


@torch.no_grad()
def record_sampling_logprobs(policy: nn.Module, batch: PairBatch, order: Tensor,
                             minibatch_size: int, *, method: Method,
                             autocast_dtype: torch.dtype | None = None,
                             w_gradient: WGradient = "finite-difference",
                             packing: bool = False, skip_first: bool = False) -> Tensor:
    """log pi_t of every pair, computed exactly as the first epoch's updates will compute
    log pi_theta: the REBEL policy term log pi_theta - log pi_t of the first minibatch is
    then exactly 0, not the rounding difference of two differently batched forwards.

    The minibatches are the same rows in the same order (``order[k * m:(k + 1) * m]``, the
    permutation the first epoch then uses), under the same autocast and attention kernels.
    ``torch.no_grad`` changes neither the kernels nor the bits on CPU (tested), and the
    Wasserstein methods' embedding hook (:func:`input_embeddings`) passes the embeddings on
    unchanged in their first forward.

    ``skip_first`` leaves out the first minibatch, whose first update step (at theta_t)
    supplies its own log pi_t (``update_step(..., sampling_out=...)``): one minibatch's
    forward fewer, none at all for an iteration of one minibatch.

    Args:
        policy: the policy pi_t, about to be updated.
        batch: ``n`` pairs (their ``sampling_logprobs`` are not read).
        order: ``(n,)`` a permutation of ``range(n)``: the first epoch's.
        minibatch_size: pairs per update step, a divisor of ``n``.
        method, autocast_dtype, w_gradient, packing: as given to :func:`update_step`.
        skip_first: leave the first minibatch's rows (``order[:minibatch_size]``) NaN.

    Returns:
        ``(n, 2)`` log pi_t in the batch's row order, for ``PairBatch.sampling_logprobs``
        (NaN on the skipped rows), in float32 or the policy's wider dtype.

    Raises:
        ValueError: ``order`` not a permutation of the batch's rows, or a minibatch size
            that does not divide them.
    """
    n = len(batch)
    if not torch.equal(order.sort().values.cpu(), torch.arange(n)):
        raise ValueError(f"order must be a permutation of range({n})")
    if minibatch_size < 1 or n % minibatch_size:
        raise ValueError(f"minibatch_size ({minibatch_size}) must divide the {n} pairs")
    first = minibatch_size if skip_first else 0
    with attention_kernels(method, w_gradient), autocast_context(batch, autocast_dtype):
        parts = []
        for start in range(first, n, minibatch_size):
            minibatch = batch.select(order[start:start + minibatch_size])
            parts.append(pair_logprobs(policy, minibatch,
                                       layout=batch_layout(policy, minibatch, packing)))
    # the dtype token_logprobs returns: float32, or the parameters' wider one
    dtype = parts[0].dtype if parts else torch.promote_types(
        next(policy.parameters()).dtype, torch.float32)
    logprobs = torch.full((n, 2), math.nan, dtype=dtype, device=batch.input_ids.device)
    if parts:
        logprobs[order[first:]] = torch.cat(parts)
    return logprobs


def finite_difference_backward(policy: nn.Module, batch: PairBatch, method: Method, *,
                               eta: float, beta: float,
                               autocast: contextlib.AbstractContextManager,
                               compute_dtype: torch.dtype | None = None,
                               layout: PackedLayout | None = None,
                               sampling_out: Tensor | None = None
                               ) -> tuple[RobustObjective, Tensor]:
    """Accumulate the gradient of a Wasserstein method's objective into ``.grad`` without a
    double backward; returns the objective and the ``(n,)`` pointwise losses.

    F = mean(l) + P(g) with g_i = ||v_i||^2, v_i = grad_{z_i} l_i (z: the input embeddings,
    rows of sample i), so grad_theta F = G1 + sum_i c_i grad_theta g_i with G1 = grad_theta
    mean(l) and c_i = dF/dg_i. Since grad_theta g_i = 2 d/d eps [grad_theta l_i(z + eps v_i)]
    at eps = 0 (v held fixed; theta includes the embedding table, through z), a forward
    difference with the step eps_i = kappa c_i gives

        grad_theta F ~ (1 - 2 N / kappa) G1 + (2 / kappa) grad_theta sum_i l_i(z + kappa c_i v)

    (N: the global number of samples, so G1 = grad sum_i l_i / N): two forward and two
    backward passes, the first of which also yields every v_i (z.grad = v / N). The rule for
    kappa: the largest perturbation, max_i kappa c_i rms(v_i), is sqrt(eps) rms(z) (eps:
    :func:`difference_eps`; rms over the real tokens, of pair i for v_i and of the whole
    global batch for z, so every rank uses the same kappa, and padded or packed rows the
    same). In float32 and float64 that is the textbook balance of a forward difference's
    truncation (O(kappa)) and rounding (O(eps / kappa)) errors at the embeddings' own scale;
    with bf16 (autocast or parameters) the geometric mean of bf16's and float32's epsilons
    is where a scan over eps measured the smallest error. Valid for every order p; a set of
    radius 0 (c = 0) takes only the first pass. Relative error of the parameter step
    against the exact double backward in float32 on a tiny GPT-2: 2e-7 (float64 forward),
    4e-3 (float32), 0.12 under bf16 autocast, where the exact double backward's own bf16
    rounding error is 0.06 (w_rho = 0.5; at w_rho = 0.05, 0.06 against 0.05). With bf16
    PARAMETERS, against the exact gradient in float64 on the same weights (GPT-2s of 2 x 32
    and 4 x 256, w_rho 0.05 and 0.5): 0.08-0.20, where the exact bf16 double backward's
    own error is 0.05-0.06 and dropping the penalty 0.61-0.98; bf16's own eps (a 16x
    larger perturbation) measured 0.40-0.70 (bench/results/w_gradient_dtype_cpu.md).

    With ``layout`` the forwards run on packed rows; ``sampling_out``: the first forward
    supplies log pi_t (:func:`pair_losses`), which the shifted one then reads.
    """
    with autocast, input_embeddings(policy) as captured:
        losses, batch = pair_losses(method, pair_logprobs(policy, batch, layout=layout), batch,
                                    eta=eta, beta=beta, sampling_out=sampling_out)
    embeddings = captured.value
    embeddings.retain_grad()
    check_local_losses(losses)
    total = _global_count(losses)
    (losses.sum() / total).backward()
    v = (embeddings.grad * total).detach()
    owners = token_pairs(batch, layout)  # (rows, columns) of z: the pair of each token
    real = owners >= 0
    grad_sq_norms = sample_sums(v.square().sum(-1), owners, len(batch))
    entries = sample_sums(real.to(v.dtype), owners, len(batch)) * v.shape[-1]
    value, (weights, slopes), diagnostics = robust_coefficients(
        [losses.detach(), grad_sq_norms], method.spec)
    # kappa from global statistics, the same on every rank: a run on R ranks then computes
    # what one process computes on the whole batch.
    largest = all_reduce((slopes * (grad_sq_norms / entries).sqrt()).max(),
                         dist.ReduceOp.MAX)
    if bool(largest > 0):
        z = embeddings.detach()[real]
        moments = all_reduce(torch.stack([z.square().sum(), z.new_tensor(z.numel())]))
        scale = (moments[0] / moments[1]).sqrt().clamp_min(torch.finfo(z.dtype).tiny)
        eps = difference_eps(v.dtype, compute_dtype)
        kappa = float(math.sqrt(eps) * scale / largest)
        # Sharded gradients are already summed over ranks; scaling the sum is the same.
        for parameter in policy.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(1 - 2 * total / kappa)
        # v is 0 on padding: its step there is immaterial
        step = (kappa * slopes)[owners.clamp_min(0)].unsqueeze(-1)
        with autocast, input_embeddings(policy, shift=step * v):
            moved = method.losses(pair_logprobs(policy, batch, layout=layout), batch, eta=eta,
                                  beta=beta)
        (moved.sum() * (2 / kappa)).backward()
    return RobustObjective(losses.new_zeros(()), value, weights, diagnostics), losses


def difference_eps(parameter_dtype: torch.dtype, compute_dtype: torch.dtype | None = None
                   ) -> float:
    """The rounding unit eps of :func:`finite_difference_backward`'s kappa rule.

    The geometric mean of the machine epsilons of the lowest precision in play (the
    parameters' or the forward's compute dtype) and of the dtype it accumulates in: float32
    for a 16-bit type (its matmuls, norms and softmaxes accumulate in float32), else itself.

    Args:
        parameter_dtype: the dtype of the input embeddings (the parameters').
        compute_dtype: the forward's autocast dtype, or None.

    Returns:
        eps: bf16 anywhere gives sqrt(2^-7 * 2^-23) = 2^-15; float32 alone 2^-23.

    Example:
        >>> difference_eps(torch.bfloat16) == difference_eps(torch.float32, torch.bfloat16)
        True
    """
    dtypes = [parameter_dtype] + ([compute_dtype] if compute_dtype is not None else [])
    low = max((torch.finfo(d) for d in dtypes), key=lambda info: info.eps)
    accumulate = torch.finfo(torch.float32) if low.bits < 32 else low
    return math.sqrt(low.eps * accumulate.eps)


def _global_count(losses: Tensor) -> int:
    """The number of samples over every rank."""
    return int(all_reduce(torch.tensor(losses.shape[0], device=losses.device)))


def update_step(policy: nn.Module, optimizer: torch.optim.Optimizer, batch: PairBatch,
                method: Method, *, eta: float, beta: float, max_grad_norm: float | None,
                autocast_dtype: torch.dtype | None = None,
                w_gradient: WGradient = "finite-difference",
                aggregate: Aggregate | None = None, packing: bool = False,
                sampling_out: Tensor | None = None) -> StepStats:
    """One AdamW (or any optimiser) step of ``method`` on the minibatch ``batch``.

    Args:
        policy: the causal LM being trained: unwrapped (its gradients are then summed over
            ranks here) or sharded by :func:`drosim.llm.components.sharding.shard_policy` (FSDP2
            sums them in the backward).
        optimizer: its optimiser.
        batch: this rank's share of the global minibatch.
        method: pointwise loss and ambiguity set.
        eta: REBEL step size.
        beta: DPO / IPO inverse temperature.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward under autocast.
        w_gradient: how a Wasserstein method differentiates its penalty: "exact" (a double
            backward, the math attention kernel), "finite-difference" (first derivatives
            only, any kernel, the default; see :func:`finite_difference_backward`).
        aggregate: the robust objective of the minibatch's ``(n,)`` losses; None: the
            worst case over the global minibatch (``robust_scope=minibatch``). The trainer
            passes ``partial(IterationLosses.objective, rows=...)`` for
            ``robust_scope=iteration``.
        packing: run the forwards on packed rows (padding-free; the policy must
            :func:`drosim.llm.components.logprobs.supports_packing`).
        sampling_out: ``(n, 2)``: this step's own forward supplies log pi_t, its detached
            log-probabilities written here (the iteration's first step, at theta_t;
            the batch's ``sampling_logprobs`` are then not read). None: the batch's.

    Raises:
        ValueError: an unknown ``w_gradient``, a Wasserstein method on a compiled policy,
            an ``aggregate`` for a method without pair weights, or ``packing`` for a policy
            that cannot pack.

    Returns:
        :class:`StepStats`.
    """
    optimizer.zero_grad(set_to_none=True)
    autocast = autocast_context(batch, autocast_dtype)
    if w_gradient not in W_GRADIENTS:
        raise ValueError(f"w_gradient must be one of {W_GRADIENTS}, got {w_gradient!r}")
    wasserstein = method.needs_input_gradients
    if wasserstein and hasattr(policy, "_orig_mod"):  # a torch.compile wrapper
        raise ValueError(f"a torch.compile'd policy cannot run {method.name}: see maybe_compile")
    if aggregate is not None and not method.reweights:
        raise ValueError(f"{method.name} has no pair weights for an aggregate to share")
    layout = batch_layout(policy, batch, packing)
    if wasserstein and w_gradient == "finite-difference":
        objective, losses = finite_difference_backward(
            policy, batch, method, eta=eta, beta=beta, autocast=autocast,
            compute_dtype=autocast_dtype, layout=layout, sampling_out=sampling_out)
    else:
        with attention_kernels(method, w_gradient):
            with autocast:
                objective, losses = method_objective(
                    policy, batch, method, eta=eta, beta=beta, aggregate=aggregate,
                    layout=layout, sampling_out=sampling_out)
            objective.loss.backward()
    parameters = [p for p in policy.parameters() if p.requires_grad]
    if not is_sharded(policy):
        sum_gradients_over_ranks(parameters)
    # On sharded (DTensor) gradients this is the norm of the whole gradient, over every rank.
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm or float("inf"))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    optimizer.step()
    total = all_reduce(torch.stack([losses.detach().sum(),
                                    losses.new_tensor(float(len(batch)))]))
    return StepStats(float(objective.value), float(total[0] / total[1]), float(norm),
                     float(objective.weights.max()), objective.diagnostics,
                     padding_fraction(batch, layout))
