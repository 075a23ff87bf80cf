"""Problems, and the embedded synthetic task ``arith``.

``arith``: 2-4 operands of 1..20 joined by ``+``/``-``, evaluated left to right. A worked solution
takes one operation per step (``12+7=19 19-5=14 \\boxed{14}``). A share of the warm-up's
first-attempt solutions (``shortcut_prob``) skip the steps and write the result at once
(``12+7-5=14 \\boxed{14}``): shorter and more error-prone, so a first attempt has a choice that
GRPO can learn to make well, and a careful second look (one operation per step) has something to
fix. File and hub data sets live in ``loaders``.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional


# not frozen: with trainer.precision=bf16-true (trainer=gpu's default) or 16-true, Lightning rebuilds every
# batch with apply_to_collection, which rejects frozen dataclasses
@dataclass
class Problem:
    """One question with its gold answer (an answer string such as ``18`` or ``\\frac{1}{2}``)."""

    id: str
    question: str
    answer: str
    solution: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)  # mapped fields (subject, level, id) or task facts
    extra: dict[str, Any] = field(default_factory=dict)  # the data set row's unmapped fields, as read


def _eval_left_to_right(operands: list[int], ops: list[str]) -> int:
    value = operands[0]
    for op, x in zip(ops, operands[1:], strict=True):
        value = value + x if op == "+" else value - x
    return value


def arith_question(operands: list[int], ops: list[str]) -> str:
    return str(operands[0]) + "".join(f"{op}{x}" for op, x in zip(ops, operands[1:], strict=True))


def careful_solution(operands: list[int], ops: list[str]) -> str:
    """One operation per step: ``12+7=19 19-5=14 \\boxed{14}``."""
    return merged_solution(operands, ops, merge=[False] * (len(ops) - 1))


def merged_solution(operands: list[int], ops: list[str], merge: list[bool]) -> str:
    """Steps joined where ``merge[i]`` says step i+1 continues step i: ``12+7-5=14 \\boxed{14}``."""
    steps, value, expr = [], operands[0], str(operands[0])
    for i, (op, x) in enumerate(zip(ops, operands[1:], strict=True)):
        expr += f"{op}{x}"
        value = value + x if op == "+" else value - x
        if i < len(merge) and merge[i]:
            continue
        steps.append(f"{expr}={value}")
        expr = str(value)
    return " ".join(steps) + f" \\boxed{{{value}}}"


def shortcut_merges(n_ops: int, rng: random.Random, shortcut_prob: float) -> list[bool]:
    """Merge flags for :func:`merged_solution`: every step merged (one-step answer) or none."""
    return [rng.random() < shortcut_prob] * (n_ops - 1)


def parse_arith(question: str) -> tuple[list[int], list[str]]:
    """Inverse of :func:`arith_question` (operands are positive integers)."""
    operands, ops, num = [], [], ""
    for ch in question.strip():
        if ch.isdigit():
            num += ch
        elif ch in "+-" and num:
            operands.append(int(num))
            ops.append(ch)
            num = ""
        else:
            raise ValueError(f"not an arith question: {question!r}")
    operands.append(int(num))
    return operands, ops


class ArithTask:
    """Deterministic problem streams: ``test`` and ``valid`` are fixed sets, ``train`` avoids both."""

    def __init__(self, min_operands: int, max_operands: int, max_operand: int, ops: str, shortcut_prob: float,
                 n_test: int, n_valid: int, seed: int = 0):
        self.min_operands, self.max_operands, self.max_operand = min_operands, max_operands, max_operand
        self.ops, self.shortcut_prob, self.seed = ops, shortcut_prob, seed
        self.test = self._fixed("test", n_test, exclude=set())
        self.valid = self._fixed("valid", n_valid, exclude={p.question for p in self.test})
        self._held_out = {p.question for p in self.test} | {p.question for p in self.valid}

    def _rng(self, split: str, seed: int | str) -> random.Random:
        digest = hashlib.sha256(f"arith/{split}/{seed}".encode()).hexdigest()
        return random.Random(int(digest[:16], 16))

    def _draw(self, rng: random.Random) -> tuple[list[int], list[str]]:
        n = rng.randint(self.min_operands, self.max_operands)
        operands = [rng.randint(1, self.max_operand) for _ in range(n)]
        ops = [rng.choice(self.ops) for _ in range(n - 1)]
        return operands, ops

    def _problem(self, split: str, index: int | str, operands: list[int], ops: list[str]) -> Problem:
        return Problem(
            id=f"arith-{split}-{index}",
            question=arith_question(operands, ops),
            answer=str(_eval_left_to_right(operands, ops)),
            solution=careful_solution(operands, ops),
            meta={"operands": len(operands)},
        )

    def _fixed(self, split: str, n: int, exclude: set[str]) -> list[Problem]:
        rng, out, seen = self._rng(split, self.seed), [], set(exclude)
        while len(out) < n:
            operands, ops = self._draw(rng)
            q = arith_question(operands, ops)
            if q in seen:
                continue
            seen.add(q)
            out.append(self._problem(split, len(out), operands, ops))
        return out

    def train_stream(self, seed: Optional[int] = None) -> Iterator[Problem]:
        """Endless training problems, none of them in ``test`` or ``valid``."""
        rng, i = self._rng("train", self.seed if seed is None else seed), 0
        while True:
            operands, ops = self._draw(rng)
            if arith_question(operands, ops) in self._held_out:
                continue
            yield self._problem("train", i, operands, ops)
            i += 1

    def train_batch(self, key: str, n: int) -> list[Problem]:
        """``n`` training problems drawn from a generator seeded by ``key`` alone (none held out)."""
        rng, out = self._rng("train", key), []
        while len(out) < n:
            operands, ops = self._draw(rng)
            if arith_question(operands, ops) not in self._held_out:
                out.append(self._problem("train", f"{key}-{len(out)}", operands, ops))
        return out

    def first_attempt(self, problem: Problem, rng: random.Random) -> str:
        """A warm-up first-attempt solution: all at once with ``shortcut_prob``, else step by step."""
        operands, ops = parse_arith(problem.question)
        return merged_solution(operands, ops, shortcut_merges(len(ops), rng, self.shortcut_prob))


class ProblemStream:
    """Training problems by step: the problems of step ``s`` on rank ``r`` are a pure function of
    (seed, s, r), so a resumed run draws exactly the problems the uninterrupted run would have drawn.

    ``arith``: fresh problems per (seed, step, rank). A pool (file or hub data): each rank walks its
    own seeded permutation of the pool, a new one every pass (epoch), ``batch_size`` problems a step.
    """

    def __init__(self, batch_size: int, seed: int, *, arith: Optional[ArithTask] = None,
                 pool: Optional[list[Problem]] = None):
        if (arith is None) == (pool is None):
            raise TypeError("ProblemStream takes an arith task or a pool of problems")
        self.batch_size, self.seed, self.arith, self.pool = batch_size, seed, arith, pool
        self._orders: dict[tuple[int, int], list[int]] = {}

    def _order(self, rank: int, epoch: int) -> list[int]:
        if (rank, epoch) not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            order = list(range(len(self.pool)))
            random.Random(f"{self.seed}/{rank}/{epoch}").shuffle(order)
            self._orders[(rank, epoch)] = order
        return self._orders[(rank, epoch)]

    def batch(self, step: int, rank: int = 0) -> list[Problem]:
        if self.arith is not None:
            return self.arith.train_batch(f"{self.seed}/{step}/{rank}", self.batch_size)
        size = len(self.pool)
        first = step * self.batch_size
        return [self.pool[self._order(rank, i // size)[i % size]] for i in range(first, first + self.batch_size)]

    def refill(self, step: int, rank: int, round_: int, n: int) -> list[Problem]:
        """``n`` more problems for step ``step`` on rank ``rank``, sampling round ``round_`` >= 1 (dynamic
        sampling), also a pure function of (seed, step, rank, round): arith draws fresh ones, a pool
        a seeded sample of it (the step's own batch may recur)."""
        key = f"{self.seed}/{step}/{rank}/refill{round_}"
        if self.arith is not None:
            return self.arith.train_batch(key, n)
        rng = random.Random(key)
        return [self.pool[rng.randrange(len(self.pool))] for _ in range(n)]
