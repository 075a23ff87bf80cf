"""The non-finite step guard: no NaN or infinite loss or gradient ever reaches the weights.

Before each optimizer step the trainer asks :func:`grads_finite` (and looks at the loss); a step
whose loss or gradient is not finite is skipped (gradients dropped, optimizer untouched) and
counted. :class:`NonFiniteGuard` keeps the counts: the total (logged as ``train/nonfinite_steps``)
and how many training steps in a row had a skipped update; after ``limit`` in a row the run stops
(:attr:`NonFiniteGuard.exhausted`), its weights still those of the last good step. The counts travel
in the checkpoint (``state_dict``), so a resumed run counts on where it stopped.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch


def grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """Whether every gradient of ``params`` is finite (parameters without a gradient count as finite).

    Through the total 2-norm (a NaN or infinity anywhere makes it non-finite; so does a norm past the
    float range, a gradient no step should take either): one fused pass and one device-to-host sync,
    about 20 times faster on CPU than ``isfinite(g).all()`` per tensor. A sharded gradient (DTensor)
    is checked on this rank's shard only: the caller combines the answers of the ranks."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def finite(*values: float) -> bool:
    """Whether every number is finite (losses, as floats)."""
    return all(math.isfinite(v) for v in values)


@dataclass
class NonFiniteGuard:
    """Counts of training steps whose update was skipped for a non-finite loss or gradient.

    ``limit``: stop after this many such steps in a row (0 = never stop)."""

    limit: int
    total: int = 0
    in_a_row: int = 0

    def observe(self, step_finite: bool) -> None:
        """Record one training step: ``step_finite`` is False when any of its updates was skipped."""
        if step_finite:
            self.in_a_row = 0
        else:
            self.total += 1
            self.in_a_row += 1

    @property
    def exhausted(self) -> bool:
        return self.limit > 0 and self.in_a_row >= self.limit

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.in_a_row = int(state["total"]), int(state["in_a_row"])
