"""A training run's life outside the math: its status file, stop signals, checkpoints on request.

Status file: ``<run folder>/status.json`` = ``{"status", "error", "mlflow_run_id"}``. It says
``RUNNING`` from the start of the job, and at the end of every job ``FINISHED`` (the command
completed), ``FAILED`` (``error`` = the one-line error) or ``KILLED`` (stopped by a signal). A run
killed with SIGKILL (or a crash of the machine) keeps ``RUNNING``: nothing runs after SIGKILL.

Stop signals (:class:`StopRequests`): SIGTERM, SIGUSR1 (what SLURM sends ahead of a time limit with
``--signal=USR1@<seconds>``) and a first Ctrl+C (SIGINT) only record the request; the running
training step finishes, every rank agrees on stopping after that same step (one all-reduce per
step), a checkpoint is written (:class:`StopAndCheckpoint`), and ``mgrpo train`` marks the MLflow
run KILLED and exits with :data:`EXIT_PREEMPTED`. A second Ctrl+C stops at once (KILLED, no
checkpoint, exit :data:`EXIT_INTERRUPTED`). A request that comes while the run is still setting up
or evaluating its start is acted on before the first training step.

Time-based checkpoints (``trainer.checkpoint_every_minutes``): :class:`StopAndCheckpoint` also
writes ``last.ckpt`` after any step that ends more than that many minutes after the last
checkpoint, so a preempted run with long steps loses little; and once more when training ends, so
``last.ckpt`` always holds the final weights.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; resume= continues it
EXIT_INTERRUPTED = 130  # a second Ctrl+C: stopped at once, resume= continues from the last checkpoint
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")


def write_status(folder: str | Path, status: str, error: Optional[str] = None,
                 mlflow_run_id: Optional[str] = None, reason: Optional[str] = None) -> None:
    """Write ``<folder>/status.json`` atomically (a reader never sees half a file); on a full disk, where
    no new file can be made, over the old file's bytes in place (its block holds the few hundred bytes).
    ``reason``: why a FINISHED run ended before its last step (early stopping), as ``"reason"``."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    path = Path(folder) / "status.json"
    fields = {"status": status, "error": error, "mlflow_run_id": mlflow_run_id} | ({"reason": reason} if reason else {})
    text = json.dumps(fields, indent=1) + "\n"
    replace_or_overwrite(path, text.encode())


def replace_or_overwrite(path: Path, data: bytes) -> None:
    """``path`` holds ``data``: written to a temporary file renamed over it, or, when the disk is too full
    for a new file, written over the existing file in place (no new block needed for a small file)."""
    from mgrpo_cli.errors import disk_full

    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if not (disk_full(e) and path.is_file()):
            raise
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def read_status(folder: str | Path) -> Optional[dict]:
    """The run's status file, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((Path(folder) / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def on_rank_death(record: Callable[[str], None]) -> None:
    """Call ``record(error)`` on rank 0 when a rank it launched dies, before Lightning's launcher kills
    rank 0 (its observer thread SIGKILLs the whole job a few seconds after a rank exits with an error,
    so nothing after it runs: without this the run would stay RUNNING)."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as launcher

    class RecordingObserver(fabric_launcher._ChildProcessObserver):
        def _terminate_all(self) -> None:
            dead = [(rank, p.returncode) for rank, p in enumerate(self._child_processes, start=1) if p.returncode]
            try:
                record("; ".join(f"rank {rank} died (exit code {code})" for rank, code in dead))
            except Exception as e:  # recording must not stop the job's end
                log.error("could not record the death of a rank: %s", e)
            finally:
                super()._terminate_all()

    def observe(child_processes) -> None:
        RecordingObserver(child_processes=child_processes, main_pid=os.getpid()).start()

    launcher._launch_process_observer = observe  # what the DDP launcher calls after starting ranks 1..n-1


class StopRequests:
    """Handlers of :data:`STOP_SIGNALS` that record a stop request (see the module docstring).

    ``install`` may be called again (Lightning puts its own SIGTERM handler in place at the start of
    every ``fit``/``validate``; the :class:`StopAndCheckpoint` callback puts this one back); ``restore``
    puts back the handlers found by the first ``install``."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None  # the first stop signal received
        self.interrupted = False  # a second Ctrl+C: stop at once
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. a test runner's worker)
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            self.interrupted = True
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            hint = " (Ctrl+C again to stop at once, without a checkpoint)" if signum == signal.SIGINT else ""
            log.warning("received %s: stopping after the current training step, with a checkpoint%s",
                        signal.Signals(signum).name, hint)


class StopRequested(Exception):
    """Raised out of ``trainer.fit`` after the checkpoint of a stop request, when the next step
    would start. ``Trainer.should_stop`` would run an unscheduled validation first; raising in
    ``on_train_batch_end`` would lose that step's metrics, which Lightning hands to the logger after
    that hook. A validation scheduled at the stopped step still runs, after the checkpoint, so the
    stopped run's record is whole (a resumed run re-runs it only when its held-out file is missing:
    ``callbacks.HeldoutFiles``)."""


class StopAndCheckpoint(Callback):
    """After each training step: on a stop request (on any rank), or when ``every_minutes`` have
    passed since the last checkpoint, write ``last.ckpt`` through ``writer``
    (``checkpointing.CheckpointWriter``, shared with the step-based checkpoints, which writes a step
    once); on a stop request, leave ``fit`` after that step and its scheduled validation, if any
    (:class:`StopRequested`; ``stop_pending`` says so when it was the last step). When training ends,
    write ``last.ckpt`` if its last step is not in it."""

    def __init__(self, requests: StopRequests, writer, *, every_minutes: Optional[float] = None):
        self.requests, self.writer = requests, writer
        self.every_s = every_minutes * 60 if every_minutes else None
        self._last = time.monotonic()
        self.stop_pending = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.requests.install()
        self._last = time.monotonic()

    def on_validation_start(self, trainer, pl_module) -> None:
        self.requests.install()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.stop_pending:
            raise StopRequested(f"stopped after step {trainer.global_step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from mgrpo_cli.training import distributed

        now = time.monotonic()
        if self.writer.saved_step == trainer.global_step:  # the step-based checkpoint of this step
            self._last = now
        due = self.every_s is not None and now - self._last >= self.every_s
        vote = distributed.max_over_ranks(2 * int(self.requests.requested) + int(due))  # every rank, every step
        if vote == 0:
            return
        self._save(trainer)
        self._last = now
        if vote >= 2:
            self.stop_pending = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def _save(self, trainer) -> None:
        if self.writer.saved_step != trainer.global_step:
            self.writer.save_last(trainer)  # every rank takes part; rank 0 writes
            log.info("checkpoint at step %d: %s", trainer.global_step, self.writer.last)
