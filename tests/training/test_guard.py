"""The non-finite step guard (mgrpo_cli/training/guard.py): which steps are skipped, when the run stops."""
import math

import pytest
import torch

from mgrpo_cli.config import rules
from mgrpo_cli.errors import UserError
from mgrpo_cli.training.guard import NonFiniteGuard, finite, grads_finite


def _params(*grads):
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = None if g is None else torch.tensor(g)
        out.append(p)
    return out


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_grads_finite_finds_one_bad_value_among_many(bad):
    assert grads_finite(_params([1.0, 2.0], None, [0.0, -3.0]))
    assert not grads_finite(_params([1.0, 2.0], None, [0.0, bad]))
    assert grads_finite(_params(None)) and grads_finite([])


def test_finite_losses():
    assert finite(0.0, -1e30) and not finite(0.5, math.nan) and not finite(math.inf)


def test_guard_counts_in_a_row_and_stops_at_the_limit():
    guard = NonFiniteGuard(limit=3)
    for ok in (True, False, False, True, False, False):
        guard.observe(ok)
        assert not guard.exhausted
    assert (guard.total, guard.in_a_row) == (4, 2)
    guard.observe(False)
    assert guard.exhausted and guard.total == 5
    resumed = NonFiniteGuard(limit=3)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.exhausted and resumed.total == 5


def test_guard_limit_zero_never_stops_and_negative_is_refused(small_cfg):
    guard = NonFiniteGuard(limit=0)
    for _ in range(10):
        guard.observe(False)
    assert not guard.exhausted and guard.total == 10
    with pytest.raises(UserError, match=r"^trainer.max_nonfinite_steps=-1: "):
        rules.check(small_cfg("trainer.max_nonfinite_steps=-1"))
