"""User errors: one line that names the input and says what would be right, and a non-zero exit.

Every mistake a user can make (a config value, a rule that spans fields, a data file, a model or
checkpoint path, an output folder) raises :class:`UserError` with a message such as
``grpo.num_generations=1: GRPO needs at least 2 samples per group``. :func:`run_command` runs a
command's task function and turns a ``UserError`` into ``error: <message>`` on stderr and exit code
2; with ``HYDRA_FULL_ERROR=1`` the traceback is shown instead. In a multirun sweep a failed job does
not stop the sweep: its line is kept, and the sweep ends with the list of failed jobs and exit code 1.

This module imports nothing heavy: the command dispatcher uses it before torch loads.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_FAILED_JOBS = 1

# (job name, one-line error) of the sweep's jobs that failed in this process
failed_jobs: list[tuple[str, str]] = []


class UserError(ValueError):
    """A mistake in the user's input; its message is the whole one-line explanation."""


def bad_value(key: str, value: Any, why: str) -> UserError:
    """``UserError('<key>=<value>: <why>')``."""
    return UserError(f"{key}={value}: {why}")


def one_line(error: BaseException) -> str:
    """The error as one line for a job's records (``status.json``, MLflow's ``error`` tag):
    ``<type>: <first line of the message>`` (``UserError: grpo.lr=-1: ...``), as the sweep's failed-job
    list shows it."""
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
    except UserError as e:
        if full_errors():
            raise
        multirun, job = _multirun()
        if multirun:
            log.error("job %s failed: %s", job, e)
            failed_jobs.append((job, str(e)))
            return None
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def report_failed_jobs() -> int:
    """After a sweep: one line listing the failed jobs and their errors; the exit code to use."""
    if not failed_jobs:
        return 0
    listing = "; ".join(f"job {name}: {error}" for name, error in failed_jobs)
    print(f"error: {len(failed_jobs)} sweep job(s) failed: {listing}", file=sys.stderr, flush=True)
    return EXIT_FAILED_JOBS
