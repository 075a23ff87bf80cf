"""Per-step seeding (mgrpo_cli/training/seeding.py): a step's draws depend on (seed, step, rank) only."""
import random

import numpy as np
import torch

from mgrpo_cli.training.seeding import seed_step, step_seed


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_step_seed_is_stable_and_distinct():
    assert step_seed(0, 5, 0) == step_seed(0, 5, 0) < 2**63
    seeds = {step_seed(s, t, r) for s in range(3) for t in range(50) for r in range(4)}
    assert len(seeds) == 3 * 50 * 4
    assert step_seed(0, 5, 0, "problems") != step_seed(0, 5, 0)


def test_seed_step_makes_draws_independent_of_what_ran_before():
    seed_step(7, 12, 1)
    first = _draws()
    random.random(), np.random.rand(5), torch.rand(100)  # anything in between (validation, ...)
    seed_step(7, 12, 1)
    assert _draws() == first
    seed_step(7, 13, 1)
    assert _draws() != first
