"""Own reward functions for ``reward.terms``, in the shape of TRL's ``reward_funcs``.

Name a function by its import path next to the built-in terms; from the repository root (the working
directory is importable):

    mgrpo train 'reward.terms=[{name: accuracy, weight: 1.0}, {name: "examples.rewards:brevity", weight: 0.1}]'

Each function is called once per layer batch as ``f(completions, golds, **row_fields)``: the completions,
the gold answers and, as keyword arguments, one list per field with a value per completion:
``question``, ``id``, ``solution``, ``layer`` (1 for first answers, 2+ for corrections), ``turns`` (the
earlier attempts and phrases a correction continues) and the dataset row's other fields (the arith
task's ``operands``; a file or hub data set's own columns). It returns one float per completion, or
None for "cannot be scored" (left out of its group's statistics). Take ``**fields`` for the fields
you do not use.
"""
from __future__ import annotations

BREVITY_CHARS = 120  # completions this long or longer get no brevity reward


def brevity(completions: list[str], golds: list[str], **fields) -> list[float]:
    """1 for an empty completion, falling linearly to 0 at ``BREVITY_CHARS`` characters."""
    return [1.0 - min(len(text), BREVITY_CHARS) / BREVITY_CHARS for text in completions]


def steps_shown(completions: list[str], golds: list[str], operands: list[int], **fields) -> list[float]:
    """1 when the arith solution shows one step per operation (operands - 1 equals signs), else 0:
    a dataset field (``operands``, from the arith task's problems) reaching a reward."""
    return [float(text.count("=") == n - 1) for text, n in zip(completions, operands)]
