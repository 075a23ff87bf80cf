"""The math-verify worker: a separate process with a hard per-job deadline.

math-verify (imported only in the worker) runs under a 2 GiB address-space limit. Every call has a
hard wall-clock limit ``timeout_s`` that works from any thread: the parent waits on a pipe and,
past the deadline, kills the worker and starts a fresh one (inside the worker a SIGALRM timer at
3/4 of the limit usually stops the work first, sparing the restart). A worker that dies (killed,
out of memory) never stops the caller: the job it was grading is ``"error"``, a fresh worker grades
the rest, and if that one dies too the rest are ``"error"`` and the next call starts another.

The child process is a plain ``python -c`` that loads this file by its path, so this module imports
only the standard library: nothing of the package, whose ``__init__`` the child never runs.
"""
from __future__ import annotations

import logging
import multiprocessing
import signal
import subprocess
import sys
from typing import Any

log = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 120.0
_WORKER_MEMORY_BYTES = 2 << 30


class _SoftTimeout(BaseException):
    """Raised by the worker's SIGALRM timer; a BaseException so math-verify cannot swallow it."""


def _worker_main(conn: Any, soft_timeout_s: float) -> None:
    """Grade (gold, prediction) jobs from ``conn``; answer True/False, "gold" or "timeout" each."""
    import resource

    # stop signals are for the trainer (a SLURM job's SIGTERM reaches every process): it finishes its
    # step, grading included, and then stops this worker itself
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft > _WORKER_MEMORY_BYTES:
        resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, hard))
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from functools import lru_cache

    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0)]

    def parse_latex(answer: str) -> list:
        return parse(f"${answer}$", config, parsing_timeout=None)

    parse_gold = lru_cache(maxsize=1024)(parse_latex)

    def on_alarm(signum: int, frame: Any) -> None:
        raise _SoftTimeout

    signal.signal(signal.SIGALRM, on_alarm)
    conn.send("ready")
    while True:
        try:
            jobs = conn.recv()
        except (EOFError, OSError):
            return
        for gold, pred in jobs:
            signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
            try:
                gold_parsed = parse_gold(gold)
                if not gold_parsed:
                    result: bool | str = "gold"
                else:
                    result = bool(verify(gold_parsed, parse_latex(pred), timeout_seconds=None))
            except (_SoftTimeout, MemoryError, RecursionError):
                result = "timeout"
            except Exception:  # a prediction math-verify cannot handle is a wrong one
                result = False
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            conn.send(result)


class Worker:
    """A persistent math-verify process with a hard per-job deadline."""

    soft_fraction = 0.75  # the worker's own SIGALRM timer, as a share of the hard limit

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._proc: Any = None
        self._conn: Any = None
        self._ready = False
        self._started_once = False  # a worker has been ready before: failing to restart is not fatal
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """The worker process's id while one runs (started and not yet seen to end), else None."""
        return None if self._proc is None else self._proc.pid

    def _start(self) -> None:
        # A plain `python -c` child that loads this file by path: unlike multiprocessing's spawn, it
        # never re-imports the caller's __main__ (scripts without a main guard, notebooks) nor the
        # package's __init__.
        self._conn, child = multiprocessing.Pipe()
        code = (
            "import importlib.util as u, multiprocessing.connection as c, sys;"
            f"s = u.spec_from_file_location('_mgrpo_grader_worker', {__file__!r});"
            "m = sys.modules[s.name] = u.module_from_spec(s); s.loader.exec_module(m);"
            f"m._worker_main(c.Connection({child.fileno()}), {self.soft_fraction * self.timeout_s!r})"
        )
        self._ready = False
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[child.fileno()],
                                          stdin=subprocess.DEVNULL)
        except OSError as e:  # no memory or process slots left: not started, _ensure_ready decides
            log.warning("grader: could not start the math-verify worker: %s", e)
            self._conn.close()
            self._proc = self._conn = None
        finally:
            child.close()

    def _restart(self) -> None:
        self.close()
        self.restarts += 1
        self._start()  # boots while the caller goes on

    def _ensure_ready(self) -> bool:
        """Start the worker if it is not running and wait until it is ready. False when a restart did
        not come up (the caller counts its jobs as errors and the next call tries again); a first
        start that fails raises: math-verify is missing or broken, no grading can work."""
        if self._proc is not None and self._proc.poll() is not None:  # died while idle (killed, out of memory)
            self.close()
            self.restarts += 1
        if self._proc is None:
            self._start()
        if not self._ready:
            try:
                self._ready = (self._proc is not None and self._conn.poll(_STARTUP_TIMEOUT_S)
                               and self._conn.recv() == "ready")
            except (EOFError, OSError):
                pass
            if not self._ready:
                self.close()
                if not self._started_once:
                    raise RuntimeError(
                        f"mgrpo grader: the math-verify worker did not start within {_STARTUP_TIMEOUT_S:.0f} s "
                        f"(its error, if any, is above; is math-verify installed for {sys.executable}?)"
                    )
                log.warning("grader: the math-verify worker did not restart; its answers count as grader_error")
                return False
            self._started_once = True
        return True

    def grade(self, jobs: list[tuple[str, str]]) -> list[bool | str]:
        """One verdict per job: True/False, "gold" (gold unparseable), "timeout" or "error".

        A job past the deadline is "timeout": the worker is killed and a fresh one grades the rest.
        When the worker dies (killed, out of memory), the job it was working on is "error" and a fresh
        worker grades the rest; if that one dies too, every job left is "error" and the next call
        starts another. Nothing here raises on a dead worker."""
        results: list[bool | str] = []
        died = False
        while len(results) < len(jobs):
            if not self._ensure_ready():
                break
            pending = jobs[len(results) :]
            sent = False
            try:
                self._conn.send(pending)
                sent = True
                for _ in pending:
                    if not self._conn.poll(self.timeout_s):
                        results.append("timeout")
                        log.debug("grader worker stopped on %r; restarting it", jobs[len(results) - 1])
                        self._restart()
                        break
                    results.append(self._conn.recv())
            except (EOFError, OSError):  # the worker is gone; a job it had taken is lost
                if sent:
                    results.append("error")
                log.warning("grader: the math-verify worker died (killed or out of memory)%s",
                            "" if died else "; restarting it")
                if died:  # a second death in one call: the next call starts a fresh worker
                    self._proc.kill()
                    self._proc.wait()
                    break
                died = True
                self._restart()
        return results + ["error"] * (len(jobs) - len(results))

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._conn.close()
        self._proc = self._conn = None
