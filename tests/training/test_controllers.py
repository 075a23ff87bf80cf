"""The small stateful controllers of a run (mgrpo_cli/training/controllers.py), each alone: what they
do step by step, and that their state survives a state_dict round trip."""
import pytest
import torch

from mgrpo_cli.algo.layers import LayerInput
from mgrpo_cli.data.problems import Problem
from mgrpo_cli.training.controllers import EntropyControl, ReferenceSync, Refill


def test_entropy_control_steers_each_layer_from_its_own_entropy():
    c = EntropyControl([1, 2], coef=0.01, adaptive=True, target=1.0, step=0.005, low=0.0, high=0.02)
    assert c.active and c.applied(1) == 0.0  # adaptive: no entropy seen yet, no bonus
    c.observe({"train/layer1/entropy": 0.5, "train/layer2/entropy": 3.0})
    assert c.coefs == {1: pytest.approx(0.015), 2: pytest.approx(0.005)}
    assert c.applied(1) == pytest.approx(0.015) and c.applied(2) == 0.0  # layer 2's entropy is above the target
    c.observe({"train/layer1/entropy": 0.5})  # layer 2 did not run: it keeps its own
    assert c.coefs == {1: pytest.approx(0.02), 2: pytest.approx(0.005)}  # capped at high
    again = EntropyControl([1, 2], coef=0.01, adaptive=True, target=1.0, step=0.005, low=0.0, high=0.02)
    again.load_state_dict(c.state_dict())
    assert again.coefs == c.coefs and again.last_entropy == c.last_entropy


def test_a_fixed_entropy_coefficient_is_applied_as_given():
    c = EntropyControl([1], coef=0.1, adaptive=False, target=0.0, step=0.005, low=0.0, high=1.0)
    c.observe({"train/layer1/entropy": 9.0})
    assert c.active and c.applied(1) == 0.1
    assert not EntropyControl([1], 0.0, False, 0.0, 0.005, 0.0, 1.0).active


def test_reference_sync_mixes_every_nth_step_and_restores_the_moved_reference():
    policy, reference = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        policy.weight.fill_(1.0)
        reference.weight.zero_()
    sync = ReferenceSync(reference, alpha=0.5, every=2)
    sync.after_step(1, policy)
    assert sync.syncs == 0 and torch.equal(reference.weight, torch.zeros(1, 2))
    sync.after_step(2, policy)
    assert sync.syncs == 1 and torch.equal(reference.weight, torch.full((1, 2), 0.5))
    state = sync.state_dict()
    fresh_ref = torch.nn.Linear(2, 1, bias=False)
    fresh = ReferenceSync(fresh_ref, alpha=0.5, every=2)
    fresh.load_state_dict(state)
    assert fresh.syncs == 1 and torch.equal(fresh_ref.weight, reference.weight)


def test_refill_draws_problems_for_layer_one_and_spares_for_corrections():
    problems = [Problem("p0", "1+1", "2")]
    drawn = []

    def draw_problems(step, rank, round_, n):
        drawn.append((step, rank, round_, n))
        return [Problem(f"q{i}", "2+2", "4") for i in range(n)]

    refill = Refill(draw_problems)
    more = refill.draws(1, problems, [], step=7, rank=1)(2, 1)
    assert drawn == [(7, 1, 1, 2)] and [x.problem for x in more] == [1, 2] and len(problems) == 3
    spare = [LayerInput(0, (("a", "P"),)), LayerInput(0, (("b", "P"),)), LayerInput(0, (("c", "P"),))]
    taken = refill.draws(2, problems, spare, step=7, rank=1)(2, 1)
    assert [x.turns[0][0] for x in taken] == ["a", "b"] and [x.turns[0][0] for x in spare] == ["c"]
    assert Refill(None).draws(1, problems, [], step=0, rank=0)(3, 1) == []
