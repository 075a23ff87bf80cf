"""Own reward terms: a function named by its import path, resolved once and called with checks.

A ``reward.terms`` entry may name ``package.module:function`` instead of a built-in term. It is
imported when the reward is built (the working directory is importable, as for ``python -m``) and
called like TRL's ``reward_funcs``: ``f(completions, golds, **row_fields) -> list[float | None]``.
A bad path, a function that raises, or a result that is not one finite number (or None) per
completion is a ``RewardTermError``: a one-line ``UserError`` naming the term.
"""
from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mgrpo_cli.errors import UserError


class RewardTermError(UserError):
    """A reward term that cannot be built or called: ``reward term '<name>': <reason>``."""

    def __init__(self, term: str, reason: str) -> None:
        super().__init__(f"reward term {term!r}: {reason}")
        self.term, self.reason = term, reason


def resolve_reward_function(name: str) -> Callable[..., Sequence[float | None]]:
    """The function an import path ``package.module:function`` names (``function`` may be dotted:
    ``module:Class.method``). The working directory is importable, as for ``python -m``."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise RewardTermError(name, "an own reward function is named 'package.module:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise RewardTermError(name, f"cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise RewardTermError(name, f"{module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise RewardTermError(name, f"{attr!r} is not callable ({type(target).__name__})")
    return target


def call_reward_function(name: str, fn: Callable[..., Sequence[float | None]], completions: list[str], golds: list[str],
               row_fields: Mapping[str, Sequence[Any]]) -> list[float | None]:
    """``fn(completions, golds, **row_fields)`` checked: one number or None per completion."""
    try:
        out = fn(completions, golds, **row_fields)
    except Exception as exc:
        raise RewardTermError(name, f"raised {type(exc).__name__}: {exc}") from None
    try:
        values = list(out)
    except TypeError:
        values = None
    if values is None or len(values) != len(completions):
        got = f"{len(values)} values" if values is not None else type(out).__name__
        raise RewardTermError(name, f"returned {got} for {len(completions)} completions; it must return "
                                    "one float or None per completion")
    checked: list[float | None] = []
    for v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
            raise RewardTermError(name, f"returned {v!r}: expected a finite float or None")
        checked.append(None if v is None else float(v))
    return checked
