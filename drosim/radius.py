"""Choosing a radius from training data alone, never from the test metric.

A radius read as a fraction (``Chi2.protecting(f)``, ``KL.protecting(f)``, see
:mod:`drosim.dro`) protects every subpopulation of mass at least f: its worst case is at
least the mean loss of the worst f-fraction of the pairs. The rule here sets f from the
training pairs' group labels (annotator ids, sources, prompt categories: whatever the data
records), as the share of the smallest group, so that the ball holds the reweighting onto
any one group seen in training. :func:`validated_radius` instead fits every candidate radius
on part of the training pairs and keeps the one whose worst group does best on the rest.
Neither looks at any evaluation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from drosim.dro import KL, Chi2, Wasserstein
from drosim.estimators import SeparableDataWarning, dpo, rebel

__all__ = ["RadiusChoice", "smallest_group_share", "validated_radius"]


def smallest_group_share(groups: Tensor | np.ndarray | Sequence[int]) -> float:
    """The share of the smallest group among the training pairs: f for ``protecting(f)``.

    Args:
        groups: ``(n,)`` one integer group label per training pair (e.g. the annotator's
            id); only the labels present count as groups.

    Returns:
        min over groups g of (pairs in g) / n, in (0, 1]; 1 when there is one group (then
        ``protecting(1)`` is P itself, radius 0).

    Raises:
        TypeError: labels that are not integers.
        ValueError: no labels, or labels that are not one-dimensional.

    Example:
        >>> from drosim.dro import Chi2
        >>> share = smallest_group_share([0, 0, 0, 0, 1])
        >>> share, Chi2.protecting(share).rho
        (0.2, 2.0)
    """
    labels = groups.detach().cpu().numpy() if isinstance(groups, Tensor) else np.asarray(groups)
    if labels.ndim != 1:
        raise ValueError(f"groups must be one label per pair (1-D), got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("groups is empty: there are no training pairs to read a share from")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"groups must be integer labels, got dtype {labels.dtype}")
    _, counts = np.unique(labels, return_counts=True)
    return float(counts.min() / labels.size)


# The ambiguity set of each family at radius rho, for each loss (Wasserstein: the exact
# linear-world orders, type 2 for REBEL, type 1 for DPO).
_SETS = {"chi2": lambda rho, loss: Chi2(rho), "kl": lambda rho, loss: KL(rho),
         "wasserstein": lambda rho, loss: Wasserstein(rho, p=2.0 if loss == "rebel" else 1.0)}


class RadiusChoice(NamedTuple):
    """What :func:`validated_radius` chose, and why.

    Attributes:
        radius: ``(T,)`` the chosen radius of every trial (a float array; one entry for
            unbatched input).
        table: one row per (trial, candidate radius): columns trial, radius,
            worst_group_loss (the largest held-out mean loss over the groups), worst_group
            (its label), standard_error (of that mean), mean_loss (over all held-out pairs),
            certified (False: the exact fit could not certify some trial at that radius,
            which is then never chosen, its losses infinite) and chosen.
    """

    radius: np.ndarray
    table: pd.DataFrame


def validated_radius(dphi: Tensor, target: Tensor, groups: Tensor, family: str,
                     radii: Sequence[float], *, loss: str = "rebel", beta: float = 1.0,
                     holdout: float = 0.5, standard_errors: float = 1.0,
                     seed: int = 0) -> RadiusChoice:
    """Choose a radius on held-out training pairs: the worst group's loss, never the test.

    Each trial's pairs are split at random, within every group, into a fitting part and a
    held-out part (a fraction ``holdout`` of each group, at least one pair). Every candidate
    radius is fitted on the fitting part (all trials in one batched call per radius, the
    held-out pairs given weight 0), and scored by the largest mean held-out loss over the
    groups. The rule picks the smallest radius whose score is within ``standard_errors``
    standard errors (of the best score's mean) of the best score: with 1, the
    one-standard-error rule of cross-validation (a larger radius must earn its place by more
    than the noise of the held-out means), so a world without a group to protect keeps the
    smallest candidate; with 0, the plain minimiser, ties going to the smaller radius.

    Args:
        dphi: ``(T, n, d)`` or ``(n, d)`` feature differences of the training pairs.
        target: ``(T, n)`` or ``(n,)`` relative rewards (``loss="rebel"``) or preference
            labels in {0, 1} (``loss="dpo"``), same dtype as dphi.
        groups: ``(T, n)`` or ``(n,)`` integer group labels (annotator ids, sources).
        family: "chi2", "kl" or "wasserstein" (type 2 for REBEL, type 1 for DPO).
        radii: the candidate radii, >= 0, at least one.
        loss: "rebel" (squared error) or "dpo" (logistic loss with ``beta``).
        beta: DPO's inverse temperature.
        holdout: the held-out share of every group, in (0, 1).
        standard_errors: the rule's tolerance, finite and >= 0 (see above).
        seed: the split's seed.

    Returns:
        :class:`RadiusChoice` with the radius per trial and the table of scores.

    Raises:
        TypeError: non-tensor data, or group labels that are not integers.
        ValueError: an unknown family or loss, no or negative or non-finite radii, a
            holdout outside (0, 1), a negative or non-finite tolerance, mismatched shapes,
            non-finite data (raised by the estimators), a group with a single pair (it
            cannot be both fitted and held out), or no candidate whose fit is certified.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> dphi = torch.randn(400, 3, generator=g, dtype=torch.float64)
        >>> dr = dphi @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        >>> dr = dr + 0.1 * torch.randn(400, generator=g, dtype=torch.float64)
        >>> choice = validated_radius(dphi, dr, torch.zeros(400, dtype=torch.long), "chi2",
        ...                           [0.01, 0.1, 1.0])
        >>> float(choice.radius[0])  # one group: nothing to protect, the smallest radius
        0.01
    """
    dphi, target, labels = _as_batch(dphi, target, groups)
    candidates = _check_radii(radii)
    _check_rule(family, loss, holdout, standard_errors)
    held_out = _held_out_mask(labels, holdout, seed).to(dphi.device)
    one_hot = torch.as_tensor(labels[..., None] == np.unique(labels), dtype=dphi.dtype)
    held = one_hot * held_out[..., None].to(dphi)  # (T, n, G): held-out pairs per group
    rows = [_held_out_score(dphi, target, held_out, held, family, float(rho), loss, beta)
            for rho in candidates]  # one batched fit over all trials per candidate radius
    certified = [row is not None for row in rows]
    if not any(certified):
        raise ValueError("no candidate radius could be fitted with a certificate")
    uncertified = _HeldOutScore(torch.full_like(held[:, 0], torch.inf),
                                torch.zeros_like(held[:, 0]),
                                torch.full_like(held[:, 0, 0], torch.inf))
    rows = [uncertified if row is None else row for row in rows]  # never chosen
    worst, worst_group, error, chosen = _one_standard_error_choice(rows, standard_errors)
    table = pd.DataFrame({
        "trial": np.repeat(np.arange(dphi.shape[0]), len(candidates)),
        "radius": np.tile(candidates, dphi.shape[0]),
        "worst_group_loss": worst.flatten().cpu().numpy(),
        "worst_group": np.unique(labels)[worst_group.flatten().cpu().numpy()],
        "standard_error": error.flatten().cpu().numpy(),
        "mean_loss": torch.stack([row.mean_loss for row in rows], 1).flatten().cpu().numpy(),
        "certified": np.tile(certified, dphi.shape[0]),
        "chosen": (torch.arange(len(candidates)) == chosen[:, None].cpu()).flatten().numpy()})
    return RadiusChoice(np.asarray(candidates)[chosen.cpu().numpy()], table)


def _one_standard_error_choice(rows: list[_HeldOutScore], standard_errors: float
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per trial and radius ``(T, R)``: the worst group's held-out loss, that group, its
    standard error; and per trial ``(T,)`` the index of the smallest radius whose worst loss
    is within ``standard_errors`` standard errors of the best one."""
    group_means = torch.stack([row.group_means for row in rows], 1)  # (T, R, G)
    worst, worst_group = group_means.max(-1)
    error = torch.stack([row.error for row in rows], 1).gather(
        -1, worst_group[..., None]).squeeze(-1)
    best = worst.argmin(1, keepdim=True)
    threshold = worst.gather(1, best) + standard_errors * error.gather(1, best)
    chosen = (worst <= threshold).to(torch.int64).argmax(1)  # the first: the smallest radius
    return worst, worst_group, error, chosen


def _check_rule(family: str, loss: str, holdout: float, standard_errors: float) -> None:
    """Refuse the rule's settings outside their domains (see :func:`validated_radius`)."""
    if family not in _SETS:
        raise ValueError(f"family must be one of {tuple(_SETS)}, got {family!r}")
    if loss not in ("rebel", "dpo"):
        raise ValueError(f"loss must be 'rebel' or 'dpo', got {loss!r}")
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    if not 0 <= standard_errors < math.inf:
        raise ValueError(f"standard_errors must be finite and >= 0, got {standard_errors}")


class _HeldOutScore(NamedTuple):
    """One radius's held-out losses: per group ``(T, G)`` (-inf for a group without
    held-out pairs), their standard errors ``(T, G)``, and over all pairs ``(T,)``."""

    group_means: Tensor
    error: Tensor
    mean_loss: Tensor


def _held_out_score(dphi: Tensor, target: Tensor, held_out: Tensor, held: Tensor, family: str,
                    rho: float, loss: str, beta: float) -> _HeldOutScore | None:
    """The fit at radius ``rho`` on the fitting pairs, scored on the held-out ones (``held``
    ``(T, n, G)`` marks each group's); None where some trial's fit is not certified."""
    w = _fit(dphi, target, ~held_out, family, rho, loss, beta)
    if w is None:
        return None
    counts = held.sum(1).clamp_min(1)  # (T, G)
    losses = _pointwise_loss(w, dphi, target, loss, beta)
    means = (losses[..., None] * held).sum(1) / counts
    squares = (losses[..., None] ** 2 * held).sum(1) / counts
    error = (squares - means**2).clamp_min(0).sqrt() / counts.sqrt()
    return _HeldOutScore(torch.where(held.sum(1) > 0, means, -torch.inf), error,
                         (losses * held_out).sum(1) / held_out.sum(1))


def _as_batch(dphi: Tensor, target: Tensor, groups: Tensor | np.ndarray | Sequence[int]
              ) -> tuple[Tensor, Tensor, np.ndarray]:
    """The inputs of :func:`validated_radius` with a leading trials dimension, checked."""
    if not isinstance(dphi, Tensor) or not isinstance(target, Tensor):
        raise TypeError("dphi and target must be torch tensors")
    labels = groups.detach().cpu().numpy() if isinstance(groups, Tensor) else np.asarray(groups)
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"groups must be integer labels, got dtype {labels.dtype}")
    if dphi.ndim == 2:
        dphi, target, labels = dphi[None], target[None], labels[None]
    if dphi.ndim != 3 or target.shape != dphi.shape[:2] or labels.shape != dphi.shape[:2]:
        raise ValueError(f"need dphi (T, n, d) with target and groups (T, n), got "
                         f"{tuple(dphi.shape)}, {tuple(target.shape)} and {labels.shape}")
    if dphi.shape[1] == 0:
        raise ValueError("there are no training pairs")
    return dphi, target, labels


def _check_radii(radii: Sequence[float]) -> np.ndarray:
    """The candidate radii as a float array, sorted, or a ValueError."""
    candidates = np.sort(np.asarray(radii, dtype=float).ravel())
    if candidates.size == 0 or not np.isfinite(candidates).all() or (candidates < 0).any():
        raise ValueError(f"radii must be finite, >= 0 and at least one, got {radii!r}")
    return candidates


def _held_out_mask(labels: np.ndarray, holdout: float, seed: int) -> Tensor:
    """``(T, n)`` True for the held-out pairs: the ceil(holdout * size) pairs of every group
    (in every trial) with the smallest random keys, so that each group is both fitted and
    held out."""
    same = labels[:, :, None] == labels[:, None, :]  # (T, n, n): pairs of the same group
    size = same.sum(-1)
    if (size < 2).any():
        raise ValueError("every group needs at least 2 pairs: one to fit, one to hold out")
    keys = np.random.default_rng(seed).random(labels.shape)
    rank = (same & (keys[:, None, :] < keys[:, :, None])).sum(-1)  # rank within its group
    return torch.as_tensor(rank < np.ceil(holdout * size))


def _fit(dphi: Tensor, target: Tensor, fitted: Tensor, family: str, rho: float, loss: str,
         beta: float) -> Tensor | None:
    """``(T, d)`` the robust fit of every trial on its fitting pairs (the others weigh 0),
    or None where the exact fit could not certify some trial (it raises then)."""
    spec = _SETS[family](rho, loss) if rho > 0 else None
    weights = fitted.to(dphi)
    try:
        if loss == "rebel":
            return rebel(dphi, target, spec, weights=weights).w
        with warnings.catch_warnings():
            # A small fitting split can be separable: its long w is what DPO returns there,
            # and the held-out loss that this validation computes is what judges it.
            warnings.simplefilter("ignore", SeparableDataWarning)
            return dpo(dphi, target, beta, spec, weights=weights).w
    except ValueError as error:
        if "could not be certified" not in str(error):
            raise
        return None


def _pointwise_loss(w: Tensor, dphi: Tensor, target: Tensor, loss: str, beta: float
                    ) -> Tensor:
    """``(T, n)`` each pair's loss under the fit w: squared error, or DPO's logistic loss."""
    score = (dphi @ w.unsqueeze(-1)).squeeze(-1)
    if loss == "rebel":
        return (score - target) ** 2
    return torch.nn.functional.softplus(-(2 * target - 1) * beta * score)
