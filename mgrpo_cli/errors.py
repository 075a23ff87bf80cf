"""User errors: one line that names the input and says what would be right, and a non-zero exit.

Every mistake a user can make (a config value, a rule that spans fields, a data file, a model or
checkpoint path, an output folder) raises :class:`UserError` with a message such as
``grpo.num_generations=1: GRPO needs at least 2 samples per group``. :func:`run_command` runs a
command's task function and turns a ``UserError`` into ``error: <message>`` on stderr and exit code
2; with ``HYDRA_FULL_ERROR=1`` the traceback is shown instead. In a multirun sweep a failed job does
not stop the sweep: it returns its line (:class:`JobFailed`), and the sweep callback ends the sweep
with the list of failed jobs and exit code 1. Hydra's own composition errors become one line in
``cli.hydra_errors``.

A failure of the run's surroundings that is not the user's input but has one clear cause (a full
disk: :class:`DiskFull`, ``no space left on device writing <path>``) is one ``error:`` line and exit
code 1, also without a traceback.

The base of the package: every subpackage may import it, and it imports nothing heavy (the command
dispatcher uses it before torch loads).
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_FAILED_JOBS = 1  # a sweep with a failed job
EXIT_RUN_FAILED = 1


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


@dataclasses.dataclass(frozen=True)
class JobFailed:
    """What a sweep job whose task raised a ``UserError`` (or filled the disk) returns to Hydra: its one
    line. The sweep callback (``reporting.sweep``) reads it from the job's result and lists the job as
    failed."""

    error: str


def _multirun_job() -> str | None:
    """``#<job number> <overrides>`` inside a multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if str(hc.mode) != "RunMode.MULTIRUN":
        return None
    return f"#{hc.job.num} {' '.join(hc.overrides.task)}".strip()


def run_command(task: Callable[[Any], Any], cfg: Any) -> Any:
    """``task(cfg)``, with a ``UserError`` reported as one line (see the module docstring); in a sweep
    job the line is logged and returned as :class:`JobFailed`."""
    try:
        return task(cfg)
    except (UserError, OSError) as e:
        full = as_disk_full(e) if isinstance(e, OSError) else None
        if full_errors() or not (isinstance(e, UserError) or full):
            raise
        job = _multirun_job()
        if job is not None:
            log.error("job %s failed: %s", job, full or e)
            return JobFailed(str(full or e))
        print(f"error: {full or e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_RUN_FAILED if full else EXIT_USER_ERROR)
