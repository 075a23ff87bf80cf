"""Tests for ``mgrpo_cli.reporting.metrics`` and ``mgrpo_cli.reporting.figures`` on literal, hand-computed examples."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from mgrpo_cli.reporting.figures import plot_breakdown, plot_transitions
from mgrpo_cli.reporting.metrics import breakdown, maj_at_k, mean_pass_at_k, pass_at_k, self_correction

T, F = True, False


# ------------------------------------------------------------------------------ self-correction


def test_self_correction_hand_computed():
    t1 = [T, T, T, F, F, F, F, T, F, F]
    t2 = [T, F, T, T, T, F, F, T, F, T]
    # pairs: rr rw rr wr wr ww ww rr ww wr -> rr 3, rw 1, wr 3, ww 3
    sc = self_correction(t1, t2)
    assert sc["n"] == 10
    # fix_rate = wr / (wr + ww) = 3/6, break_rate = rw / (rr + rw) = 1/4
    expected = dict(acc_t1=0.4, acc_t2=0.6, delta=0.2, delta_i2c=0.3, delta_c2i=0.1,
                    rr=0.3, wr=0.3, rw=0.1, ww=0.3, fix_rate=0.5, break_rate=0.25)
    for key, value in expected.items():
        assert sc[key] == pytest.approx(value, abs=1e-15), key
    assert sc["delta"] == sc["delta_i2c"] - sc["delta_c2i"]


def test_self_correction_reproduces_score_reference_numbers():
    # SCoRe's base model on MATH-500: 52.6 -> 41.4, i->c 4.6, c->i 15.8 (n = 500)
    t1 = [T] * 184 + [T] * 79 + [F] * 23 + [F] * 214
    t2 = [T] * 184 + [F] * 79 + [T] * 23 + [F] * 214
    sc = self_correction(t1, t2)
    assert (sc["acc_t1"], sc["acc_t2"], sc["delta_i2c"], sc["delta_c2i"]) == (0.526, 0.414, 0.046, 0.158)
    assert sc["delta"] == pytest.approx(-0.112, abs=1e-15)
    assert sc["rr"] + sc["wr"] + sc["rw"] + sc["ww"] == pytest.approx(1.0)


def test_delta_identity_is_exact_on_many_tables():
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 97)
        t1 = [rng.random() < 0.5 for _ in range(n)]
        t2 = [rng.random() < 0.5 for _ in range(n)]
        sc = self_correction(t1, t2)
        assert sc["delta"] == sc["delta_i2c"] - sc["delta_c2i"]  # exact, not approx
        assert sc["delta"] == pytest.approx(sc["acc_t2"] - sc["acc_t1"], abs=1e-15)


def test_conditional_rates_do_not_move_with_acc_t1():
    # the same fix and break rates (1/2, 1/4) at Acc@t1 40% and 80%: Δi→c halves, fix_rate stays
    low = self_correction([T] * 4 + [F] * 6, [T] * 3 + [F] + [T] * 3 + [F] * 3)
    high = self_correction([T] * 8 + [F] * 2, [T] * 6 + [F] * 2 + [T] + [F])
    assert (low["fix_rate"], low["break_rate"]) == (high["fix_rate"], high["break_rate"]) == (0.5, 0.25)
    assert low["delta_i2c"] == 0.3 and high["delta_i2c"] == 0.1


def test_conditional_rate_without_a_denominator_is_none():
    all_right = self_correction([T, T], [T, F])
    assert all_right["fix_rate"] is None and all_right["break_rate"] == 0.5
    all_wrong = self_correction([F, F, F], [T, F, F])
    assert all_wrong["break_rate"] is None and all_wrong["fix_rate"] == pytest.approx(1 / 3)


def test_self_correction_rejects_bad_input():
    with pytest.raises(ValueError, match=r"differ in length \(2 vs 1\)"):
        self_correction([T, F], [T])
    with pytest.raises(ValueError, match="empty"):
        self_correction([], [])


# ---------------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4),
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (4, 0, 2, 0.0),
    (4, 4, 1, 1.0),
    (4, 3, 2, 1.0),  # n - c < k: every k-subset holds a correct sample
    (1000, 1, 1, 0.001),
])
def test_pass_at_k_literal(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomial_form():
    for n, c, k in itertools.product(range(1, 13), range(0, 13), range(1, 13)):
        if c <= n and k <= n:
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert 0.0 <= pass_at_k(10_000, 3, 500) <= 1.0  # no overflow on large n


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="n=3, c=4"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k=5, n=3"):
        pass_at_k(3, 1, 5)


def test_mean_pass_at_k():
    assert mean_pass_at_k([(5, 2), (5, 0), (5, 5)], 1) == pytest.approx((0.4 + 0.0 + 1.0) / 3)
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k([], 1)


# ----------------------------------------------------------------------------------- maj@k


def test_maj_at_k_literal():
    answers = ["2", "3", " 2 ", None, "3", "3"]
    verdicts = [T, F, T, None, F, F]
    assert maj_at_k(answers, verdicts, 1) is True
    assert maj_at_k(answers, verdicts, 3) is True  # "2" twice, "3" once
    assert maj_at_k(answers, verdicts, 5) is True  # tie 2-2 (None ignored): "2" was seen first
    assert maj_at_k(answers, verdicts, 6) is False  # "3" three times


def test_maj_at_k_ties_go_to_first_seen_and_spaces_ignored():
    assert maj_at_k(["4", "5"], [F, T], 2) is False
    assert maj_at_k(["5", "4"], [T, F], 2) is True
    assert maj_at_k(["1 / 2", "7", "1/2"], [T, F, T], 3) is True
    assert maj_at_k([None, None, "  "], [None, None, None], 3) is False
    assert maj_at_k(["x"], [None], 1) is False


def test_maj_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match=r"differ in length \(2 vs 1\)"):
        maj_at_k(["1", "2"], [T], 2)
    with pytest.raises(ValueError, match="k=0"):
        maj_at_k(["1"], [T], 0)


# ------------------------------------------------------------------------------- breakdown


ROWS = [
    {"level": 1, "subject": "Algebra", "correct": True},
    {"level": 1, "subject": "Geometry", "correct": False},
    {"level": 10, "subject": "Algebra", "correct": True},
    {"level": 2, "subject": "Algebra", "correct": False},
    {"level": 2, "correct": True},
    {"level": None, "subject": "Geometry", "correct": True},
]


def test_breakdown_literal():
    by_level = breakdown(ROWS, "level")
    assert list(by_level) == ["1", "2", "10", "unknown"]  # numeric order, unknown last
    assert by_level == {"1": {"n": 2, "acc": 0.5}, "2": {"n": 2, "acc": 0.5},
                        "10": {"n": 1, "acc": 1.0}, "unknown": {"n": 1, "acc": 1.0}}
    by_subject = breakdown(ROWS, "subject")
    assert list(by_subject) == ["Algebra", "Geometry", "unknown"]
    assert by_subject["Algebra"] == {"n": 3, "acc": pytest.approx(2 / 3)}
    assert by_subject["unknown"] == {"n": 1, "acc": 1.0}


def test_breakdown_other_value_and_missing_value():
    rows = [{"g": "a", "acc_t2": 0.0}, {"g": "a", "acc_t2": 1.0}]
    assert breakdown(rows, "g", "acc_t2") == {"a": {"n": 2, "acc": 0.5}}
    with pytest.raises(ValueError, match="row 1 has no 'correct' value"):
        breakdown([{"g": "a", "correct": True}, {"g": "b"}], "g")
    assert breakdown([], "g") == {}


# ----------------------------------------------------------------------------------- plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_transitions_writes_png(tmp_path):
    sc = self_correction([T, T, F, F, T], [T, F, T, F, T])
    out = plot_transitions(sc, tmp_path / "plots" / "transitions.png")
    assert out == tmp_path / "plots" / "transitions.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plot_transitions_rejects_other_dicts(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        plot_transitions({"acc": 1.0}, tmp_path / "x.png")


def test_plot_breakdown_writes_png(tmp_path):
    breakdowns = {"level": breakdown(ROWS, "level"), "subject": breakdown(ROWS, "subject")}
    out = plot_breakdown(breakdowns, str(tmp_path / "breakdown.png"), "toy: accuracy at t2")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    with pytest.raises(ValueError, match="no breakdowns"):
        plot_breakdown({}, tmp_path / "y.png", "empty")
