r"""Rewards: the ``RewardFunction`` that training calls on each batch (made by ``cli.build.reward``).

A ``RewardFunction`` returns, per completion, ``sum_k weight_k * term_k`` (accuracy, format, or an
own function named by its import path ``package.module:function``) as ``Scored``. Reward functions
share the shape ``f(completions, golds, **row_fields) -> list[float | None]``; ``None`` means
"cannot be graded": the trainer leaves it out of the group statistics.
Accuracy: the ``Grader``'s verdict (``grading.grader``), 1.0 or 0.0. Format: a non-empty
``\boxed{}`` (style boxed), or exactly ``[<think>]…</think><answer>…</answer>`` (style think; the
opening tag may end the prompt). Random: 1.0 with probability ``random_probability``, else 0.0,
whatever the completion says (the spurious-rewards control): drawn from the function's own generator,
which training reseeds at every step (``reseed``), so a resumed run draws the same rewards.
The answers are graded for every term (``Scored.correct``: accuracy and transitions stay measured).

:func:`overlong_penalty` is DAPO's soft overlong punishment, added per layer to the reward by the
layer pipeline (``algo.layers``), which knows each layer's token budget.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mgrpo_cli.grading.extract import MAX_COMPLETION_CHARS, last_boxed
from mgrpo_cli.grading.grader import Grader

REWARD_TERMS = ("accuracy", "format", "random")


@dataclass(frozen=True)
class Scored:
    """Result for a batch of completions."""

    rewards: list[float | None]  # weighted reward; None = cannot be graded
    correct: list[bool | None]  # answer correctness; None = ungradable
    # each completion's term values (unweighted, in the order of ``weights``), for GDPO's per-term
    # normalisation (reward.multi_objective_aggregation=normalize_then_sum); None = not given
    terms: list[list[float | None]] | None = None
    weights: list[float] | None = None


def _has_format(text: str, style: str) -> bool:
    if len(text) > MAX_COMPLETION_CHARS:
        return False
    if style == "boxed":
        return bool((last_boxed(text) or "").strip())
    # R1 style, string operations only: [<think>]…</think><answer>…</answer>, each tag once
    # (the opening <think> may sit at the end of the prompt instead).
    text = text.strip().removeprefix("<think>")
    if any(text.count(tag) != 1 for tag in ("</think>", "<answer>", "</answer>")) or "<think>" in text:
        return False
    think_end, answer_start, answer_end = text.find("</think>"), text.find("<answer>"), text.find("</answer>")
    return (
        think_end < answer_start < answer_end == len(text) - len("</answer>")
        and not text[think_end + len("</think>") : answer_start].strip()
        and bool(text[answer_start + len("<answer>") : answer_end].strip())
    )


def format_reward(completions: Sequence[str], golds: Sequence[str], *, style: str) -> list[float | None]:
    r"""1.0 when the completion has the format: a non-empty ``\boxed{}`` (boxed) or exactly
    ``[<think>]…</think><answer>…</answer>`` (think); else 0.0. ``golds`` is unused."""
    return [float(_has_format(text, style)) for text in completions]


def random_reward(n: int, probability: float, generator: torch.Generator) -> list[float]:
    """n Bernoulli(``probability``) rewards, 1.0 or 0.0, from ``generator``."""
    return (torch.rand(n, generator=generator, dtype=torch.float64) < probability).double().tolist()


def overlong_penalty(lengths: torch.Tensor, budget: int, buffer_len: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment per completion, (B,) token lengths -> (B,) float64 penalties <= 0:
    0 up to ``budget - buffer_len`` tokens, then falling linearly to ``-factor`` at the budget,
    ``-factor * (length - (budget - buffer_len)) / buffer_len`` (verl's and OpenRLHF's rule). A completion
    the budget cut off has the budget's length and gets the full ``-factor``."""
    exceed = lengths.to(torch.float64) - (budget - buffer_len)
    return (-factor * exceed / buffer_len).clamp(max=0.0)


class RewardFunction:
    """Weighted sum of reward terms: ``reward = sum_k weight_k * term_k`` (None if a term is None).

    A term is ``accuracy``, ``format`` or an own function named by its import path
    (``mypkg.rewards:brevity``, resolved once, here), called as TRL calls its ``reward_funcs``:
    ``f(completions, golds, **row_fields) -> list[float | None]``, where ``row_fields`` holds one list
    per field, a value per completion (the caller's problem fields: question, id, the dataset row's
    other fields, ...). An own function should take ``**kwargs`` for the fields it does not use.
    """

    def __init__(self, terms: list[tuple[str, float]], grader: Grader, format_style: str,
                 random_probability: float = 0.5) -> None:
        from mgrpo_cli.grading.terms import resolve_reward_function

        self.own: dict[str, Callable[..., Sequence[float | None]]] = {
            name: resolve_reward_function(name) for name, _ in terms if ":" in name}
        self.terms = [(name, float(weight)) for name, weight in terms]
        self.grader = grader
        self.format_style = format_style
        self.random_probability = random_probability
        self.generator = torch.Generator().manual_seed(0)  # the random term's; reseeded per training step

    def reseed(self, seed: int) -> None:
        """Restart the random term's draws from ``seed`` (training calls it at every step)."""
        self.generator.manual_seed(seed)

    def __call__(self, completions: list[str], golds: list[str], **row_fields: Sequence[Any]) -> Scored:
        correct = self.grader.correct(completions, golds)
        values = {"accuracy": [None if c is None else float(c) for c in correct]}
        if any(name == "format" for name, _ in self.terms):
            values["format"] = format_reward(completions, golds, style=self.format_style)
        if any(name == "random" for name, _ in self.terms):
            values["random"] = random_reward(len(completions), self.random_probability, self.generator)
        if self.own:
            from mgrpo_cli.grading.terms import call_reward_function

            for name, fn in self.own.items():
                values[name] = call_reward_function(name, fn, completions, golds, row_fields)
        rewards: list[float | None] = []
        for i in range(len(completions)):
            parts = [(weight, values[name][i]) for name, weight in self.terms]
            rewards.append(None if any(v is None for _, v in parts) else sum(w * v for w, v in parts))
        terms = [[values[name][i] for name, _ in self.terms] for i in range(len(completions))]
        return Scored(rewards=rewards, correct=correct, terms=terms, weights=[w for _, w in self.terms])

    def close(self) -> None:
        self.grader.close()

    def __enter__(self) -> RewardFunction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
