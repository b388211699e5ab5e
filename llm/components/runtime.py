"""What a training run needs from the machine it runs on, apart from what it trains.

The online loop (:mod:`drosim.llm.recipes.trainer`) and the stage-0 recipes
(:mod:`drosim.llm.recipes.sft`, :mod:`drosim.llm.recipes.reward_training`) share it:

    processes      is_distributed, Distributed (this rank's place), init_distributed,
                   resolve_device / use_device
    collectives    all_reduce, global_sums, all_gather_equal, gather_detached,
                   sum_gradients_over_ranks: each is the identity on one process, so the
                   code calling it reads the same with or without ``torchrun``
    seeding        seed_everything, iteration_seed
    signals        StopFlag (SIGTERM / SIGINT: finish the step, save, stop)
    metrics        MetricsLog (JSONL, optionally TensorBoard)

It imports nothing of :mod:`drosim.llm` above it: the layers that train import it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

# ------------------------------------------------------------------------ processes, devices


def distributed_world_size() -> int:
    """The number of ranks of the process group, 1 without one.

    Example:
        >>> distributed_world_size()
        1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_distributed() -> bool:
    """Whether other ranks take part in this process's collectives (a process group of more
    than one rank). A collective over one rank is the identity: callers skip it.

    Example:
        >>> is_distributed()
        False
    """
    return distributed_world_size() > 1


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the rank that writes what is written once per run."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for on one process)."""
        if self.world_size > 1:
            dist.barrier()

    def largest(self, value: int) -> int:
        """The largest of the ranks' ``value`` (``value`` itself on one process).

        Example:
            >>> Distributed().largest(3)
            3
        """
        if self.world_size == 1:
            return value
        # NCCL reduces CUDA tensors only; gloo CPU ones
        tensor = torch.tensor([value], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        return int(all_reduce(tensor, dist.ReduceOp.MAX))


def init_distributed(device: str, *, always: bool = False) -> Distributed:
    """Join the ``torchrun`` process group if the environment describes one.

    Uses NCCL when training on CUDA and gloo otherwise.

    Args:
        device: the training device ("cuda..." or "cpu").
        always: join even a one-process job (FSDP2 needs a process group; outside
            ``torchrun`` the trainer's ``check_sources`` has refused it already).

    Returns:
        This process's :class:`Distributed` (rank 0 of 1 outside a job).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not always:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Distributed(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(device: str, local_rank: int) -> str:
    """The torch device a config's ``device`` names for the rank ``local_rank``.

    Args:
        device: ``"auto"`` (this rank's GPU when CUDA is available, else the CPU),
            ``"cuda"`` (this rank's GPU) or any torch device name (kept as given).
        local_rank: the rank's index on its machine.

    Returns:
        A torch device name such as ``"cuda:1"`` or ``"cpu"``.

    Example:
        >>> resolve_device("cuda", 1)
        'cuda:1'
    """
    if device == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return f"cuda:{local_rank}" if device == "cuda" else device


def use_device(device: str, world: Distributed) -> str:
    """This rank's training device (:func:`resolve_device`), made CUDA's current device when
    it is one: before any collective, since NCCL talks to the current device.

    Returns:
        The device name.
    """
    resolved = resolve_device(device, world.local_rank)
    if resolved.startswith("cuda"):
        torch.cuda.set_device(resolved)
    return resolved


# ---------------------------------------------------------------------------- collectives


def all_reduce(tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """``tensor`` reduced in place over every rank (itself on one process).

    Returns:
        ``tensor``.
    """
    if is_distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


def global_sums(values: list[float | Tensor], device: str) -> list[float]:
    """Each value summed over the ranks (itself on one process), in one all-reduce and one
    host sync.

    Args:
        values: numbers or one-element tensors.
        device: where the collective runs (a CUDA device under NCCL).

    Returns:
        The sums, as floats, in the order of ``values``.

    Example:
        >>> global_sums([1, torch.tensor(2.5)], "cpu")
        [1.0, 2.5]
    """
    totals = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                          for v in values])
    return all_reduce(totals).tolist()


def all_gather_equal(local: Tensor) -> list[Tensor]:
    """Every rank's ``local`` (all of the same shape), in rank order (``[local]`` on one
    process).

    Example:
        >>> all_gather_equal(torch.ones(2))
        [tensor([1., 1.])]
    """
    if not is_distributed():
        return [local]
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return parts


def gather_detached(local: Tensor) -> tuple[Tensor, slice]:
    """All ranks' ``(n,)`` tensors concatenated in rank order, and this rank's slice.

    Raises:
        ValueError: ranks hold different numbers of samples.

    Example:
        >>> gather_detached(torch.arange(3.0))
        (tensor([0., 1., 2.]), slice(0, 3, None))
    """
    local = local.detach()
    if not is_distributed():
        return local, slice(0, local.shape[0])
    sizes = all_gather_equal(torch.tensor([local.shape[0]], device=local.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"every rank must hold the same number of samples, got "
                         f"{[int(s) for s in sizes]}")
    n = local.shape[0]
    rank = dist.get_rank()
    return torch.cat(all_gather_equal(local)), slice(rank * n, (rank + 1) * n)


def sum_gradients_over_ranks(parameters: list[nn.Parameter]) -> None:
    """All-reduce (sum) the parameters' gradients in one flattened buffer (nothing on one
    process)."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# -------------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's global and torch's generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the global state user reward code may draw from
    torch.manual_seed(seed)


def iteration_seed(seed: int, rank: int, iteration: int) -> int:
    """The RNG seed of one rank's iteration (distinct across ranks and iterations).

    Example:
        >>> iteration_seed(0, 1, 2)
        8193
    """
    return ((seed * 1_000_003 + iteration) * 4096 + rank) % 2**32


# ----------------------------------------------------------------------- signals and metrics


class StopFlag:
    """Set by SIGTERM / SIGINT while in its ``with`` block; a second signal falls back to the
    default action. The handlers in place before are restored on leaving the block."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum
        signal.signal(signum, signal.SIG_DFL)


class MetricsLog:
    """Append-only JSONL metrics (rank 0), optionally mirrored to TensorBoard.

    Args:
        path: the JSONL file.
        keep_until: a resumed run's iteration: the lines after it are dropped (the resumed
            run writes them again); None: a new run, the file emptied.
        tensorboard: mirror the numbers to ``<path's folder>/tensorboard`` (a note, and
            JSONL only, when TensorBoard is not installed).
    """

    def __init__(self, path: Path, *, keep_until: int | None, tensorboard: bool):
        self.path = path
        if keep_until is not None and path.exists():
            # lines written after the checkpoint we resume from are replayed by the resumed run
            kept = [line for line in path.read_text().splitlines()
                    if json.loads(line)["iteration"] <= keep_until]
            path.write_text("".join(line + "\n" for line in kept))
        elif keep_until is None:
            path.write_text("")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed: metrics go to JSONL only", file=sys.stderr)
            else:
                self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def close(self) -> None:
        """Close the TensorBoard writer, if any (the JSONL file is closed after each line)."""
        if self.writer is not None:
            self.writer.close()

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (with an ``iteration`` key) as one synced line; its numbers to
        TensorBoard."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, int | float):
                    self.writer.add_scalar(key, value, record["iteration"])
