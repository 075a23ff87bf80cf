"""Per-step seeding: every random draw of training step s is a pure function of (seed, s, rank).

At the start of each training step the trainer calls :func:`seed_step`, which seeds Python's
``random``, NumPy and torch (CPU and every CUDA device) from :func:`step_seed`; the rollout
engine's generator and the module's own ``random.Random`` are reseeded from the same number. So
what a step samples does not depend on what ran before it (validation, data-loader set-up,
checkpoint loading all draw random numbers of their own): a run resumed from the checkpoint of step
s draws exactly what the uninterrupted run drew, with nothing but the step in the checkpoint.
"""
from __future__ import annotations

import hashlib
import random


def step_seed(seed: int, step: int, rank: int, stream: str = "step") -> int:
    """A 63-bit seed for (``seed``, ``step``, ``rank``); ``stream`` names an independent sequence."""
    digest = hashlib.sha256(f"mgrpo/{stream}/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_step(seed: int, step: int, rank: int) -> int:
    """Seed Python, NumPy and torch (CPU and CUDA) for training step ``step`` of rank ``rank``;
    returns the seed, for the generators the caller owns."""
    import numpy as np
    import torch

    s = step_seed(seed, step, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also every CUDA device's generator
    return s
