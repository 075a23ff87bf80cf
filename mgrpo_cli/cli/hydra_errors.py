"""Hydra's composition errors as one line: the adapter between Hydra 1.3 and :mod:`mgrpo_cli.errors`.

Hydra reports a composition error (``mgrpo train seed=abc``: an unknown key, a value of the wrong
type or outside its choices, a group option that does not exist, an override that does not parse)
as a block on stderr and exit code 1, before any task function runs. :func:`hydra_error_line` turns
it into one line in the form of :class:`~mgrpo_cli.errors.UserError`, from the exception's
structured fields (OmegaConf's ``full_key``, ``msg``, ``object_type``; Hydra's ``options``,
``override``) and, where Hydra gives only text, its message.

Hydra 1.3 offers no public hook around its error report (``hydra.main`` calls
``hydra._internal.utils.run_and_report``), so :func:`install` wraps that one function; the pinned
Hydra (pyproject.toml) is the one ``tests/cli/test_hydra_errors.py`` checks it against.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from collections.abc import Callable
from typing import Any

from mgrpo_cli.errors import EXIT_USER_ERROR, full_errors

_CONVERT = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "text"}


def _override(message: str) -> str:
    """The ``key=value`` override a Hydra composition message quotes (empty when it quotes none)."""
    m = re.search(r"(?:Error merging override |To append to your config use \+)(\S+=.*)$", message, re.M)
    return m.group(1).strip() if m else ""


def _closest(name: str, names: list[str]) -> str:
    return max(names, key=lambda n: difflib.SequenceMatcher(None, name, n).ratio()) if names else ""


def _did_you_mean(name: str, names: list[str]) -> str:
    """`` (did you mean X?)`` when one of ``names`` is a likely typo of ``name``, else empty."""
    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def hydra_error_line(error: BaseException) -> str | None:
    """Hydra's composition errors (an unknown key, a value of the wrong type or outside its choices, a
    group option that does not exist, an override that does not parse) as one line in the form of
    :class:`UserError` (``trainer.max_steps=abc: expected an integer``); None for any other error."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if isinstance(error, MissingConfigException):
        m = re.search(r"Could not find '([^']+)/([^']+)'", str(error))
        if m and error.options:
            group, option = m.group(1).replace("/", "."), m.group(2)
            return (f"{group}={option}: no such {group} config; choose one of {', '.join(error.options)}"
                    f"{_did_you_mean(option, list(error.options))}")
        return None
    if isinstance(error, OverrideParseException):
        lines = str(error).strip().splitlines()
        return f"{error.override}: cannot parse it ({lines[0] if lines else 'bad syntax'}); overrides are key=value"
    if not isinstance(error, ConfigCompositionException):
        return None
    cause, message = error.__cause__, str(error)
    m = re.search(r"Either remove \+ prefix: '([^']+)'", message)
    if m:  # +key=value on a key that exists
        return f"+{m.group(1)}: {m.group(1).partition('=')[0]} exists already; set it without the +: {m.group(1)}"
    given = _override(message) or message.strip().splitlines()[0]
    key = str(getattr(cause, "full_key", "") or given.partition("=")[0])
    why = (str(getattr(cause, "msg", "")) or "").strip().splitlines()
    why_first = why[0] if why else ""
    owner = getattr(cause, "object_type", None)
    if "not in '" in why_first and dataclasses.is_dataclass(owner):  # an unknown key
        parent, _, name = key.rpartition(".")
        names = [f.name for f in dataclasses.fields(owner)]
        closest = _closest(name, names)
        where = f"{parent} has" if parent else "the config has"
        return (f"{given}: {where} no key {name!r}; the closest is {'.'.join(filter(None, [parent, closest]))} "
                f"(--cfg job prints every key)")
    m = re.search(r"could not be converted to (\w+)", why_first)
    if m:
        return f"{given}: expected {_CONVERT.get(m.group(1), m.group(1))}"
    m = re.search(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]", why_first)
    if m:
        choices = [c.strip() for c in m.group(2).split(",")]
        return f"{given}: expected one of {', '.join(choices)}{_did_you_mean(m.group(1), choices)}"
    if "is not Optional" in why_first:
        return f"{given}: {key} cannot be null"
    if why_first:
        return f"{given}: {why_first}"
    first = message.strip().splitlines()
    return f"{given}: {first[0]}" if first and first[0] not in given else given


def install() -> None:
    """Hydra reports a composition error (``mgrpo train seed=abc``) as a block on stderr and exit code 1,
    before any task function runs; report it as one ``error:`` line and exit code 2 instead, like every
    other bad input. Other errors, and every error under ``HYDRA_FULL_ERROR=1``, go to Hydra's report."""
    import hydra._internal.utils as hydra_utils

    original = hydra_utils.run_and_report
    if getattr(original, "one_line", False):
        return

    def run_and_report(func: Callable[[], Any]) -> Any:
        try:
            return func()
        except Exception as e:
            line = None if full_errors() else hydra_error_line(e)
            if line is None:
                def again(error: BaseException = e) -> Any:
                    raise error

                return original(again)
            print(f"error: {line}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    run_and_report.one_line = True  # type: ignore[attr-defined]
    hydra_utils.run_and_report = run_and_report
