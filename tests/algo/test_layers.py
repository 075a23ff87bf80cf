"""Linking layers: selection on literal reward tables, layer-2 inputs on literal strings."""
import random

import pytest
import torch
from conftest import loss_spec

from mgrpo_cli.algo import advantage, grpo
from mgrpo_cli.algo.layers import LayerInput, layer_rewards, next_inputs, select_responses, transitions
from mgrpo_cli.algo.loss import micro_batches
from mgrpo_cli.cli import build
from mgrpo_cli.models.tiny import build_byte_tokenizer
from mgrpo_cli.rollout.prompts import PromptRenderer

T, F = True, False
TABLE = [[T, F, F, T], [F, F, F, F], [T, T, T, T], [None, T, F, F]]


def test_select_all_and_wrong():
    rng = random.Random(0)
    assert select_responses(TABLE, "all", 2, rng) == [(g, i) for g in range(4) for i in range(4)]
    assert select_responses(TABLE, "wrong", 2, rng) == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3),
                                                          (3, 2), (3, 3)]


def test_select_sample_prefers_a_mix():
    for seed in range(20):
        chosen = select_responses(TABLE, "sample", 2, random.Random(seed))
        by_group = {g: [i for gg, i in chosen if gg == g] for g in range(4)}
        assert all(len(v) == 2 for v in by_group.values())
        # groups with both right and wrong responses send one of each
        assert {TABLE[0][i] for i in by_group[0]} == {True, False}
        assert {TABLE[3][i] for i in by_group[3]} == {True, False}
    k3 = select_responses(TABLE, "sample", 3, random.Random(0))
    assert len(k3) == 12


def test_next_inputs_chain_turns():
    inputs = [LayerInput(0), LayerInput(1)]
    texts = ["a0", "a1", "b0", "b1"]
    out = next_inputs(inputs, texts, [T, F, F, T], 2, [(0, 1), (1, 1)], ["P"], random.Random(0))
    assert out == [LayerInput(0, (("a1", "P"),), False), LayerInput(1, (("b1", "P"),), True)]
    deeper = next_inputs(out, ["c0", "c1", "d0", "d1"], [T, T, F, F], 2, [(1, 0)], ["Q"], random.Random(0))
    assert deeper == [LayerInput(1, (("b1", "P"), ("d0", "Q")), False)]


def test_layer2_input_continue_mode_plain():
    r = PromptRenderer(build_byte_tokenizer(), "plain", "", "continue", "\n{phrase}\n", "")
    assert r.render("3+4") == "3+4\n"
    text = r.render("3+4", (("3+4=8 \\boxed{8}", "Wait, let me double-check that."),))
    assert text == "3+4\n3+4=8 \\boxed{8}\nWait, let me double-check that.\n"
    deeper = r.render("3+4", (("x", "P1"), ("y", "P2")))
    assert deeper == "3+4\nx\nP1\ny\nP2\n"


def test_layer2_input_new_turn_mode_plain_and_chat():
    tok = build_byte_tokenizer()
    plain = PromptRenderer(tok, "plain", "", "new_turn", "", "Review. {phrase}")
    assert plain.render("3+4", (("7", "Check."),)) == "3+4\n7\nReview. Check.\n"
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = PromptRenderer(tok, "chat", "S", "new_turn", "", "Review. {phrase}")
    assert chat.render("Q") == "<system>S</system><user>Q</user><assistant>"
    assert chat.render("Q", (("A", "Hmm."),)) == (
        "<system>S</system><user>Q</user><assistant>A</assistant><user>Review. Hmm.</user><assistant>")
    cont = PromptRenderer(tok, "chat", "S", "continue", " {phrase} ", "")
    assert cont.render("Q", (("A", "Hmm."),)) == "<system>S</system><user>Q</user><assistant>A Hmm. "


def test_improvement_reward_and_transitions():
    base = torch.tensor([1.0, 0.0, 1.0, 0.0])
    correct, prev = [T, F, T, F], [F, T, T, None]
    assert layer_rewards(base, correct, prev, "correct", 1.0).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert layer_rewards(base, correct, prev, "improvement", 0.5).tolist() == [1.5, -0.5, 1.0, 0.0]
    assert transitions(prev, correct) == {"wrong_to_right": 0.25, "right_to_wrong": 0.25}


def test_micro_batches_cover_every_row_once_under_the_budget():
    from mgrpo_cli.rollout.engine import Rollout

    pm = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]])
    cm = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    ro = Rollout(pm, pm, cm, cm, ["", "", "", ""], 2)
    batches = micro_batches(ro, max_tokens=12)
    rows = sorted(int(r) for b in batches for r in b)
    assert rows == [0, 1, 2, 3]
    assert all(len(b) * 6 <= 12 or len(b) == 1 for b in batches)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_zero_advantage_completions_are_skipped_and_the_gradient_is_unchanged(loss_type, monkeypatch):
    from omegaconf import OmegaConf

    from mgrpo_cli.algo import loss
    from mgrpo_cli.algo.loss import (
        completion_logps,
        completion_logps_and_entropy,
        loss_pass,
        prepare_layer_loss,
    )
    from mgrpo_cli.config.schema import ModelConfig
    from mgrpo_cli.models.tiny import build_tiny_model
    from mgrpo_cli.rollout.engine import HFEngine

    tok = build_byte_tokenizer()
    model = build_tiny_model(build.model_spec(OmegaConf.structured(ModelConfig())), tok, seed=3)
    torch.manual_seed(0)
    ro = HFEngine(model, tok, max_prompt_length=512, seed=1).generate(["1+2\n", "13+4\n", "5-6\n"], n=4, max_new_tokens=8, temperature=1.0)
    adv = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.5, -0.5, 0.0, 0.7, 0.0, -0.7])
    settings = loss_spec(beta=0.0, epsilon=0.2, epsilon_high=0.2, loss_type=loss_type, scale_rewards="group",
                         std_eps=1e-4, temperature=1.0, top_p=1.0, micro_batch_tokens=65536, max_completion_length=8)
    seen = []
    monkeypatch.setattr(loss, "completion_logps_and_entropy", lambda m, r, rows, *a, **k: seen.append(rows.tolist())
                        or completion_logps_and_entropy(m, r, rows, *a, **k))
    model.train()
    stats = loss_pass(model, prepare_layer_loss(model, ro, adv, settings), settings, lambda loss: loss.backward())
    skipped = {p: p.grad.clone() for p in model.parameters()}
    assert sorted(r for rows in seen for r in rows) == [4, 5, 6, 7, 9, 11]

    model.zero_grad()
    mask = ro.completion_mask.float()
    logp = completion_logps(model, ro, torch.arange(12), 1.0)
    per_token = grpo.policy_loss(epsilon=0.2, epsilon_high=0.2, beta=0.0)(logp, adv, mask).loss
    loss = grpo.sequence_terms(per_token, mask, loss_type).sum() / grpo.loss_normalizer(mask, loss_type, 8)
    loss.backward()
    assert abs(stats["loss"] - loss.item()) < 1e-6
    for p in model.parameters():
        assert torch.allclose(skipped[p], p.grad, atol=1e-6)
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_improvement_bonus_is_a_per_group_constant_that_group_scaling_removes():
    """A layer-2 group holds the H corrections of ONE input, so every row shares ``prev``: the bonus
    is affine within the group. Group scaling removes it; no scaling doubles the advantages."""
    from mgrpo_cli.algo.advantage import group_advantages

    correct = [T, F, T, T, F, F, T, F]  # two groups of H = 4
    prev = [T] * 4 + [F] * 4
    base = torch.tensor([1.0 if c else 0.0 for c in correct])
    plain = layer_rewards(base, correct, prev, "correct", 1.0).view(2, 4)
    shaped = layer_rewards(base, correct, prev, "improvement", 1.0).view(2, 4)
    assert shaped.tolist() == [[1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 0.0]]
    assert torch.allclose(group_advantages(shaped, "group"), group_advantages(plain, "group"), atol=1e-3)
    assert torch.allclose(group_advantages(shaped, "none"), 2 * group_advantages(plain, "none"))


# ---------------------------------------------------------------- dynamic sampling and own rewards' fields

def _fake_result(inputs, rewards, n=2):
    """A LayerResult with literal rewards (one row per group) and a stand-in rollout."""
    from mgrpo_cli.algo.layers import LayerResult
    from mgrpo_cli.rollout.engine import Rollout

    b = len(inputs) * n
    ids = torch.arange(b).unsqueeze(-1) + 1
    ro = Rollout(ids, torch.ones_like(ids), ids, torch.ones_like(ids), [f"r{x.problem}.{i}" for x in inputs for i in range(n)], n)
    r = torch.tensor(rewards, dtype=torch.float32).view(-1, n)
    return LayerResult(inputs, ro, [bool(v) for v in r.reshape(-1).tolist()], r, advantage.group_advantages(r))


def _spec(**kw):
    from mgrpo_cli.algo.layers import LayerSpec

    return LayerSpec(**{"depth": 1, "n": 2, "max_new_tokens": 4, "reward": "correct", "improvement_bonus": 0.0,
                        "weight": 1.0, "keep_successful": False, "select": None, "k": 2, "phrases": (),
                        "dynamic_sampling": True, "max_sampling_rounds": 1, "overlong_buffer_len": None,
                        "overlong_penalty_factor": 1.0, **kw})



def _advantages():
    """The layer pipeline's advantage estimator: grpo, group-scaled."""
    return advantage.advantage_fn("grpo", "group", 1e-4)


def test_fill_layer_drops_zero_variance_groups_and_refills():
    from mgrpo_cli.algo.layers import fill_layer

    # problem p's group rewards: varied when p % 3 == 0 (only then)
    def run(xs):
        return _fake_result(xs, [r for x in xs for r in ((1.0, 0.0) if x.problem % 3 == 0 else (1.0, 1.0))])

    drawn = []

    def draw(k, round_):
        first = 4 + sum(drawn)
        drawn.append(k)
        return [LayerInput(first + i) for i in range(k)]

    out = fill_layer(run, [LayerInput(i) for i in range(4)], draw, _spec(max_sampling_rounds=5), _advantages())
    # round 0 keeps problems 0 and 3; round 1 draws 2 (4, 5): none; round 2 draws 2 (6, 7): 6; round 3 draws 1 (8): none
    # round 4 draws 1 (9): kept -> full
    assert drawn == [2, 2, 1, 1] and [x.problem for x in out.train.inputs] == [0, 3, 6, 9]
    assert out.metrics["sampling_rounds"] == 5.0 and out.metrics["kept_share"] == pytest.approx(4 / 10)
    assert advantage.varied_groups(out.train.rewards).all() and out.train.rollout.texts[:2] == ["r0.0", "r0.1"]
    assert out.metrics["groups"] == 10.0  # the metrics describe every rollout made
    # the round limit: what was kept is trained on, however few
    few = fill_layer(run, [LayerInput(i) for i in range(4)], draw, _spec(max_sampling_rounds=1), _advantages())
    assert [x.problem for x in few.train.inputs] == [0, 3] and few.metrics["sampling_rounds"] == 1.0
    # a draw that comes back empty ends it; the kept groups beyond the batch are not trained on
    none = fill_layer(run, [LayerInput(i) for i in range(2)], lambda k, r: [], _spec(max_sampling_rounds=9), _advantages())
    assert [x.problem for x in none.train.inputs] == [0]
    trim = fill_layer(run, [LayerInput(1)], lambda k, r: [LayerInput(3), LayerInput(6)], _spec(max_sampling_rounds=3),
                      _advantages())
    assert [x.problem for x in trim.train.inputs] == [3]


def test_unused_responses_are_the_next_layers_spare_inputs():
    from mgrpo_cli.algo.layers import unused_responses

    rounds = [_fake_result([LayerInput(0), LayerInput(1)], [1.0, 0.0, 0.0, 0.0]),
              _fake_result([LayerInput(2)], [0.0, 1.0])]
    chosen = {(0, 0, 0), (0, 1, 1)}
    spare = unused_responses(rounds, chosen, _spec(select="sample", phrases=("P",)), random.Random(0))
    assert sorted((x.problem, x.turns[0][0]) for x in spare) == [(0, "r0.1"), (1, "r1.0"), (2, "r2.0"), (2, "r2.1")]
    assert all(x.turns[0][1] == "P" and x.prev_correct is not None for x in spare)
    wrong = unused_responses(rounds, chosen, _spec(select="wrong", phrases=("P",)), random.Random(0))
    assert sorted(x.turns[0][0] for x in wrong) == ["r0.1", "r1.0", "r2.0"]


def test_selection_rules_are_the_schemas_choices():
    from mgrpo_cli.algo.layers import SELECTION_RULES
    from mgrpo_cli.config.schema import Select

    assert set(SELECTION_RULES) == {s.value for s in Select}


def test_link_is_the_selected_inputs_and_the_spares(monkeypatch):
    """``link`` hands the next layer the picked responses of the first round, each with a phrase, and
    (dynamic sampling) the rest its rule allows, drawing from the rng in that order; a rule added to the
    registry is all a new ``layer.select`` needs below the schema."""
    from mgrpo_cli.algo import layers
    from mgrpo_cli.algo.layers import chosen_after, inputs_after, link, unused_responses

    rounds = [_fake_result([LayerInput(0), LayerInput(1)], [1.0, 0.0, 0.0, 0.0]),
              _fake_result([LayerInput(2)], [0.0, 1.0])]
    for select in ("all", "wrong", "sample"):
        spec = _spec(select=select, k=1, phrases=("P", "Q"))
        got = link(rounds, spec, random.Random(5))
        rng = random.Random(5)
        chosen = chosen_after(rounds[0], spec, rng)
        assert got.inputs == inputs_after(rounds[0], spec, rng, chosen)
        assert got.spare == unused_responses(rounds, {(0, g, i) for g, i in chosen}, spec, rng)
    assert link(rounds, _spec(select="all", dynamic_sampling=False, phrases=("P",)), random.Random(0)).spare == []
    assert link(rounds, _spec(select=None), random.Random(0)) == layers.Link([], [])
    # a new rule: the first response of every group, the right ones as spares
    first = layers.SelectionRule(lambda row, k, rng: [0], lambda correct: correct is True)
    monkeypatch.setitem(layers.SELECTION_RULES, "first", first)
    out = link(rounds, _spec(select="first", phrases=("P",)), random.Random(0))
    assert [x.turns[0][0] for x in out.inputs] == ["r0.0", "r1.0"]
    assert [x.turns[0][0] for x in out.spare] == ["r2.1"]


def test_row_fields_reach_own_reward_functions():
    from mgrpo_cli.algo.layers import row_fields
    from mgrpo_cli.data.problems import Problem

    problems = [Problem("a", "1+2", "3", "1+2=3", meta={"operands": 2}, extra={"hint": "add"}),
                Problem("b", "4-1", "3", meta={"operands": 2, "question": "shadowed"})]
    inputs = [LayerInput(1, (("4-1=2", "Wait."),), False), LayerInput(0)]
    fields = row_fields(problems, inputs, 2, depth=2)
    assert fields["question"] == ["4-1", "4-1", "1+2", "1+2"]  # the named fields win over meta/extra
    assert fields["id"] == ["b", "b", "a", "a"] and fields["solution"] == [None, None, "1+2=3", "1+2=3"]
    assert fields["layer"] == [2] * 4 and fields["turns"][0] == (("4-1=2", "Wait."),) and fields["turns"][2] == ()
    assert fields["operands"] == [2] * 4 and fields["hint"] == [None, None, "add", "add"]


NAN_ = float("nan")


def test_reward_terms_for_gdpo_carry_the_improvement_bonus_as_a_term():
    from mgrpo_cli.algo.layers import reward_terms
    from mgrpo_cli.grading.rewards import Scored

    scored = Scored(rewards=[1.2, 0.0, None, 1.0], correct=[True, False, None, True],
                    terms=[[1.0, 1.0], [0.0, 0.0], [None, 1.0], [1.0, 0.0]], weights=[1.0, 0.2])
    prev = [False, True, True, True]
    terms, weights = reward_terms(scored, prev, _spec(depth=2, reward="improvement", improvement_bonus=0.5), n=2)
    assert weights.tolist() == pytest.approx([1.0, 0.2, 1.0])
    # wrong -> right +0.5, right -> wrong -0.5, ungradable (None) no bonus, right -> right 0
    expected = [[[1.0, 1.0, 0.5], [0.0, 0.0, -0.5]], [[NAN_, 1.0, 0.0], [1.0, 0.0, 0.0]]]
    assert torch.equal(torch.isnan(terms), torch.isnan(torch.tensor(expected)))
    assert torch.allclose(terms.nan_to_num(7.0), torch.tensor(expected).nan_to_num(7.0))
    plain, _ = reward_terms(scored, prev, _spec(), n=2)
    assert plain.shape == (2, 2, 2)
    assert reward_terms(Scored(rewards=[1.0], correct=[True]), [None], _spec(n=1),
                        n=1) == (None, None)
