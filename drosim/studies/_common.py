"""What the study modules share: independent random streams, and one thread for small solves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["one_thread", "random_stream"]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run with one intra-op thread: the batched solves of a study are small (trials x pairs x
    8), and on busy shared cores torch's threads made them up to ten times slower, not
    faster. Restores the previous thread count on leaving."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def random_stream(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator whose stream depends only on the integer keys.

    Distinct keys give statistically independent streams (numpy's SeedSequence hashing), so
    a study can give each (seed, n, purpose) or (seed, chunk) its own randomness.

    Example:
        >>> a = torch.rand(2, generator=random_stream(0, 5))
        >>> torch.equal(a, torch.rand(2, generator=random_stream(0, 5)))
        True
    """
    state = int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state)
