"""Independent random streams for the study modules that draw their own samples."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["random_stream"]


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
