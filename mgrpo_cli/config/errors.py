"""User errors: one line that names the input and says what would be right, and a non-zero exit.

Every mistake a user can make (a config value, a rule that spans fields, a data file, a model or
checkpoint path, an output folder) raises :class:`UserError` with a message such as
``grpo.num_generations=1: GRPO needs at least 2 samples per group``. :func:`run_command` runs a
command's task function and turns a ``UserError`` into ``error: <message>`` on stderr and exit code
2; with ``HYDRA_FULL_ERROR=1`` the traceback is shown instead. In a multirun sweep a failed job does
not stop the sweep: its line is kept, and the sweep ends with the list of failed jobs and exit code 1.

A failure of the run's surroundings that is not the user's input but has one clear cause (a full
disk: :class:`DiskFull`, ``no space left on device writing <path>``) is one ``error:`` line and exit
code 1, also without a traceback.

This module imports nothing heavy: the command dispatcher uses it before torch loads.
"""
from __future__ import annotations

import dataclasses
import difflib
import errno
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_FAILED_JOBS = 1
EXIT_RUN_FAILED = 1

# (job name, one-line error) of the sweep's jobs that failed in this process
failed_jobs: list[tuple[str, str]] = []


class UserError(ValueError):
    """A mistake in the user's input; its message is the whole one-line explanation."""


class DiskFull(OSError):
    """The disk filled up while the run wrote ``path``."""

    def __init__(self, path: Any):
        super().__init__(errno.ENOSPC, "no space left on device", str(path))

    def __str__(self) -> str:
        return f"no space left on device writing {self.filename}"


def disk_full(error: BaseException, folder: Any = None) -> bool:
    """Whether ``error`` (or an error it came from) is a full disk: an ``OSError`` ENOSPC/EDQUOT, or the
    ``RuntimeError`` "file write failed" that ``torch.save`` raises instead when ``folder`` has (almost)
    no space left."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, RuntimeError) and "file write failed" in str(error) and folder is not None:
            try:
                stats = os.statvfs(folder)
            except OSError:
                return False
            return stats.f_bavail * stats.f_frsize < 1 << 24
        error = error.__cause__ or error.__context__
    return False


def as_disk_full(error: BaseException) -> DiskFull | None:
    """``error`` as a :class:`DiskFull` naming the file when it is an ``OSError`` of a full disk."""
    if isinstance(error, DiskFull):
        return error
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(error.filename or "(a file of the run)")
    return None


def bad_value(key: str, value: Any, why: str) -> UserError:
    """``UserError('<key>=<value>: <why>')``."""
    return UserError(f"{key}={value}: {why}")


def one_line(error: BaseException) -> str:
    """The error as one line for a job's records (``status.json``, MLflow's ``error`` tag):
    ``<type>: <first line of the message>`` (``UserError: grpo.lr=-1: ...``), as the sweep's failed-job
    list shows it; a full disk as :class:`DiskFull`."""
    if isinstance(error, OSError):
        error = as_disk_full(error) or error
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def full_errors() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _multirun() -> tuple[bool, str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False, ""
    hc = HydraConfig.get()
    if str(hc.mode) != "RunMode.MULTIRUN":
        return False, ""
    return True, f"#{hc.job.num} {' '.join(hc.overrides.task)}".strip()


def run_command(task: Callable[[Any], Any], cfg: Any) -> Any:
    """``task(cfg)``, with a ``UserError`` reported as one line (see the module docstring)."""
    try:
        return task(cfg)
    except (UserError, OSError) as e:
        full = as_disk_full(e) if isinstance(e, OSError) else None
        if full_errors() or not (isinstance(e, UserError) or full):
            raise
        multirun, job = _multirun()
        if multirun:
            log.error("job %s failed: %s", job, full or e)
            failed_jobs.append((job, str(full or e)))
            return None
        print(f"error: {full or e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_RUN_FAILED if full else EXIT_USER_ERROR)


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


def install_hydra_error_lines() -> None:
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


def report_failed_jobs() -> int:
    """After a sweep: one line listing the failed jobs and their errors; the exit code to use."""
    if not failed_jobs:
        return 0
    listing = "; ".join(f"job {name}: {error}" for name, error in failed_jobs)
    print(f"error: {len(failed_jobs)} sweep job(s) failed: {listing}", file=sys.stderr, flush=True)
    return EXIT_FAILED_JOBS
