"""A batch of sampled response pairs: the unit of data every update consumes.

For n prompts with two sampled responses each, sequences are stored as ``(n, 2, T)`` tensors
(column 0 is y, column 1 is y'); :meth:`PairBatch.flat` views them as ``(2n, T)`` for one
forward pass, rows 2i and 2i + 1 being the pair of prompt i.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor


def nonfinite_rows_error(name: str, values: Tensor) -> ValueError | None:
    """A ValueError naming the batch rows of ``values`` that hold NaN or inf, else None."""
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return None
    rows = torch.nonzero(bad.reshape(values.shape[0], -1).any(-1)).flatten().tolist()
    return ValueError(f"{name} are not finite (NaN or inf) in batch rows {rows}")


@dataclass(frozen=True)
class PairBatch:
    """n prompts, two sampled responses each, with what the losses need.

    Attributes:
        input_ids: ``(n, 2, T)`` prompt+response tokens (prompt left-padded, response
            right-padded, as ``generate`` returns them).
        attention_mask: ``(n, 2, T)``, 1 on real tokens.
        response_mask: ``(n, 2, T)``, 1 on response tokens.
        sampling_logprobs: ``(n, 2)`` log pi_t(y | x) under the sampling policy (REBEL needs
            it; None until the trainer records it, or when no method of the run needs it).
        rewards: ``(n, 2)`` scalar rewards of the training mixture.
        reference_logprobs: ``(n, 2)`` log pi_ref(y | x) under the frozen initial policy
            (DPO and IPO need it; None when no method of the run does).
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    sampling_logprobs: Tensor | None
    rewards: Tensor
    reference_logprobs: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.input_ids.shape[0]
        if self.input_ids.dim() != 3 or self.input_ids.shape[1] != 2:
            raise ValueError(f"input_ids must be (n, 2, T), got {tuple(self.input_ids.shape)}")
        if n == 0:
            raise ValueError("empty batch: a PairBatch needs at least one prompt")
        for name in ("attention_mask", "response_mask"):
            if getattr(self, name).shape != self.input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"input_ids {tuple(self.input_ids.shape)}: they must match")
        for name in ("sampling_logprobs", "rewards", "reference_logprobs"):
            value = getattr(self, name)
            if value is None and name != "rewards":
                continue
            if value.shape != (n, 2):
                raise ValueError(f"{name} must have shape ({n}, 2), got {tuple(value.shape)}")
            error = nonfinite_rows_error(name, value)
            if error is not None:
                raise error

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def flat(self, name: str) -> Tensor:
        """A ``(n, 2, T)`` field viewed as ``(2n, T)``."""
        value = getattr(self, name)
        return value.reshape(-1, value.shape[-1])

    def select(self, index: Tensor | slice) -> PairBatch:
        """The pairs at ``index`` (a slice or a 1-D index tensor)."""
        return self._map(lambda t: t[index])

    def to(self, device: torch.device | str) -> PairBatch:
        return self._map(lambda t: t.to(device))

    def _map(self, fn: Callable[[Tensor], Tensor]) -> PairBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PairBatch(**{k: None if v is None else fn(v) for k, v in values.items()})
