"""Linking layers: selection on literal reward tables, layer-2 inputs on literal strings."""
import random

import pytest
import torch

from mgrpo_cli.layers import LayerInput, layer_rewards, micro_batches, next_inputs, select_responses, transitions
from mgrpo_cli.modeling import build_byte_tokenizer
from mgrpo_cli.prompts import PromptRenderer

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
    with pytest.raises(ValueError, match="layer.select"):
        select_responses(TABLE, "best", 2, random.Random(0))


def test_next_inputs_chain_turns():
    inputs = [LayerInput(0), LayerInput(1)]
    texts = ["a0", "a1", "b0", "b1"]
    out = next_inputs(inputs, texts, [T, F, F, T], 2, [(0, 1), (1, 1)], ["P"], random.Random(0))
    assert out == [LayerInput(0, (("a1", "P"),), False), LayerInput(1, (("b1", "P"),), True)]
    deeper = next_inputs(out, ["c0", "c1", "d0", "d1"], [T, T, F, F], 2, [(1, 0)], ["Q"], random.Random(0))
    assert deeper == [LayerInput(1, (("b1", "P"), ("d0", "Q")), False)]


def test_layer2_input_continue_mode_plain():
    r = PromptRenderer(build_byte_tokenizer(), "plain", input_mode="continue", phrase_template="\n{phrase}\n")
    assert r.render("3+4") == "3+4\n"
    text = r.render("3+4", (("3+4=8 \\boxed{8}", "Wait, let me double-check that."),))
    assert text == "3+4\n3+4=8 \\boxed{8}\nWait, let me double-check that.\n"
    deeper = r.render("3+4", (("x", "P1"), ("y", "P2")))
    assert deeper == "3+4\nx\nP1\ny\nP2\n"


def test_layer2_input_new_turn_mode_plain_and_chat():
    tok = build_byte_tokenizer()
    plain = PromptRenderer(tok, "plain", input_mode="new_turn", new_turn_prompt="Review. {phrase}")
    assert plain.render("3+4", (("7", "Check."),)) == "3+4\n7\nReview. Check.\n"
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = PromptRenderer(tok, "chat", system_prompt="S", input_mode="new_turn", new_turn_prompt="Review. {phrase}")
    assert chat.render("Q") == "<system>S</system><user>Q</user><assistant>"
    assert chat.render("Q", (("A", "Hmm."),)) == (
        "<system>S</system><user>Q</user><assistant>A</assistant><user>Review. Hmm.</user><assistant>")
    cont = PromptRenderer(tok, "chat", system_prompt="S", input_mode="continue", phrase_template=" {phrase} ")
    assert cont.render("Q", (("A", "Hmm."),)) == "<system>S</system><user>Q</user><assistant>A Hmm. "


def test_improvement_reward_and_transitions():
    base = torch.tensor([1.0, 0.0, 1.0, 0.0])
    correct, prev = [T, F, T, F], [F, T, T, None]
    assert layer_rewards(base, correct, prev, "correct", 1.0).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert layer_rewards(base, correct, prev, "improvement", 0.5).tolist() == [1.5, -0.5, 1.0, 0.0]
    assert transitions(prev, correct) == {"wrong_to_right": 0.25, "right_to_wrong": 0.25}
    with pytest.raises(ValueError, match="layer.reward"):
        layer_rewards(base, correct, prev, "bonus", 1.0)


def test_micro_batches_cover_every_row_once_under_the_budget():
    from mgrpo_cli.rollout import Rollout

    pm = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]])
    cm = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    ro = Rollout(pm, pm, cm, cm, ["", "", "", ""], 2)
    batches = micro_batches(ro, max_tokens=12)
    rows = sorted(int(r) for b in batches for r in b)
    assert rows == [0, 1, 2, 3]
    assert all(len(b) * 6 <= 12 or len(b) == 1 for b in batches)
