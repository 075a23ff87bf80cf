"""The two-pass (t1, t2) answer of a problem set: shared by validation, ``mgrpo eval`` and the warm-up.

t1 = the model's answer to each question (greedy, or n samples at a temperature); t2 = one
correction of the first t1 answer, prompted with a fixed guiding phrase (SCoRe's protocol, which the
MGRPO paper reports). Prompts are sorted by length and generated ``batch_size`` at a time. The
answers come graded; :meth:`Solved.records` adds the extracted answers, one :class:`Graded` record
per problem, from which validation takes its held-out rows and ``mgrpo eval`` its ``problems.jsonl``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from mgrpo_cli.reporting.heldout import ProblemResult
from mgrpo_cli.rollout.engine import RolloutEngine
from mgrpo_cli.rollout.prompts import PromptRenderer


@dataclass(frozen=True)
class SolveSpec:
    """How problems are answered: budgets of t1 and t2, batch size, samples, and the t2 phrase."""

    max_new_tokens: int  # t1's budget
    max_new_tokens_t2: int  # the correction's budget
    batch_size: int = 64
    n: int = 1  # t1 samples per problem; 1 = greedy
    temperature: float = 0.0  # used when n > 1
    phrase: Optional[str] = None  # t2's guiding phrase; None = t1 only


@dataclass(frozen=True)
class Graded:
    """One problem answered and graded: t1's prompt, completions, verdicts and extracted answers, and
    (two-pass) t2's."""

    prompt: str
    completions: list[str]
    correct: list[Optional[bool]]
    answers: list[Optional[str]]
    t2_prompt: Optional[str] = None
    t2_completion: Optional[str] = None  # None: no second pass
    t2_correct: Optional[bool] = None
    t2_answer: Optional[str] = None

    def heldout(self, problem_id: str) -> ProblemResult:
        """The held-out row (``reporting.heldout``): t1 = the first completion's verdict."""
        two_pass = self.t2_completion is not None
        return ProblemResult(problem_id, bool(self.correct[0]), bool(self.t2_correct) if two_pass else None,
                             self.answers[0], self.t2_answer)

    def fields(self) -> dict:
        """``mgrpo eval``'s record fields (after the problem's own): prompt, completions, the t2 prompt and
        completion when two-pass, answers and verdicts, then t2's."""
        out: dict = {"prompt": self.prompt, "completions": self.completions}
        if self.t2_completion is not None:
            out["t2_prompt"], out["t2_completion"] = self.t2_prompt, self.t2_completion
        out["answers"], out["correct"] = self.answers, list(self.correct)
        if self.t2_completion is not None:
            out["t2_answer"], out["t2_correct"] = self.t2_answer, self.t2_correct
        return out


@dataclass
class Solved:
    """Answers of every problem: t1 and, when two-pass, t2 on t1."""

    t1_texts: list[list[str]]  # per problem, n completions
    t1_correct: list[list[Optional[bool]]]
    t2_texts: Optional[list[str]] = None  # per problem, the correction of the first t1 completion
    t2_correct: Optional[list[Optional[bool]]] = None
    prompts: list[str] = field(default_factory=list)
    t2_prompts: Optional[list[str]] = None
    t2_cut: int = 0  # t2 prompts whose first answer was shortened to fit the correction prompt budget

    def records(self, golds: Sequence[str], answer: Callable[[str, str], Optional[str]]) -> list[Graded]:
        """One :class:`Graded` record per problem (``golds``: theirs, in order), the answers as
        ``answer(completion, gold)`` reads them (the grader's ``Grader.answer``)."""
        out = []
        for i, (texts, gold) in enumerate(zip(self.t1_texts, golds, strict=True)):
            record = Graded(self.prompts[i], texts, self.t1_correct[i], [answer(t, gold) for t in texts])
            if self.t2_texts is not None:
                t2 = self.t2_texts[i]
                record = dataclasses.replace(record, t2_prompt=self.t2_prompts[i], t2_completion=t2,
                                             t2_correct=self.t2_correct[i], t2_answer=answer(t2, gold))
            out.append(record)
        return out


def solve(engine: RolloutEngine, renderer: PromptRenderer, grader_correct, questions: Sequence[str],
          golds: Sequence[str], spec: SolveSpec, progress: Optional[Callable[[int], None]] = None) -> Solved:
    """Answer every question (t1) and, when ``spec.phrase`` is set, correct the first answer once (t2).

    ``grader_correct`` is the grader's ``correct(completions, golds)``; ``progress(k)`` is told of
    every k problems answered.
    """
    def generate_all(prompts: list[str], k: int, temp: float, max_new: int) -> list[list[str]]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        texts: list[Optional[list[str]]] = [None] * len(prompts)
        per_batch = max(1, spec.batch_size // k)
        for s in range(0, len(order), per_batch):
            idx = order[s:s + per_batch]
            ro = engine.generate([prompts[i] for i in idx], n=k, max_new_tokens=max_new, temperature=temp)
            for j, i in enumerate(idx):
                texts[i] = ro.texts[j * k:(j + 1) * k]
            if progress:
                progress(len(idx))
        return texts  # type: ignore[return-value]

    n = spec.n
    prompts = [renderer.render(q) for q in questions]
    t1 = generate_all(prompts, n, spec.temperature if n > 1 else 0.0, spec.max_new_tokens)
    flat = [t for row in t1 for t in row]
    flat_ok = grader_correct(flat, [g for g in golds for _ in range(n)])
    t1_correct = [flat_ok[i * n:(i + 1) * n] for i in range(len(questions))]
    solved = Solved(t1, t1_correct, prompts=prompts)
    if spec.phrase is not None:
        fitted = [renderer.fit(q, ((row[0], spec.phrase),)) for q, row in zip(questions, t1, strict=True)]
        t2_prompts = [text for text, _ in fitted]
        t2 = [row[0] for row in generate_all(t2_prompts, 1, 0.0, spec.max_new_tokens_t2)]
        solved.t2_texts, solved.t2_prompts = t2, t2_prompts
        solved.t2_cut = sum(cut for _, cut in fitted)
        solved.t2_correct = grader_correct(t2, list(golds))
    return solved


def attach_verdicts(records: list[dict], correct: list[list], t2_correct: list, grader) -> list[dict]:
    """Each record's verdicts (``correct`` per completion; ``t2_correct`` for the records that have a
    ``t2_completion``, in order) and the answers the grader read in its completions (``grader.answer``),
    in place."""
    for r, ok in zip(records, correct, strict=True):
        r["answers"] = [grader.answer(c, r["gold"]) for c in r["completions"]]
        r["correct"] = list(ok)
    with_t2 = [r for r in records if r.get("t2_completion") is not None]
    for r, v in zip(with_t2, t2_correct, strict=True):
        r["t2_answer"] = grader.answer(r["t2_completion"], r["gold"])
        r["t2_correct"] = v
    return records
