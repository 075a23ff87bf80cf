"""Hydra callback that groups a multirun in MLflow and ends it with the list of failed jobs.

On multirun start (in the process that launches the jobs) it creates a parent MLflow run tagged
``mgrpo.kind=sweep`` with the sweep's overrides and folder, and puts its id in the environment
variable ``MGRPO_PARENT_RUN_ID`` before any job starts, so every launcher's jobs inherit it: the
basic launcher's (same process), joblib's worker processes, submitit's local subprocesses and SLURM
jobs (``sbatch`` exports the environment). A job's MLflow run carries it as ``mlflow.parentRunId``
(``tracking.RunLogger``), which makes it a nested child in the MLflow UI.

Each job folder holds ``status.json`` = ``{"status": "FINISHED"|"FAILED"|"KILLED", "error": one line
or null, "mlflow_run_id": ...}``; the job writes it, and :meth:`SweepCallback.on_job_end` writes one
from Hydra's job result when the job did not. On multirun end the callback logs the job list
(``jobs.json``) to the parent run, ends it (FAILED when a job failed), prints one line naming the
failed jobs with their errors and exits non-zero. Hydra's sweeper stops at the first failed job
result it reads, before its multirun-end hook: the same ending then runs at interpreter exit.

Configured in ``conf/hydra/callbacks/sweep.yaml`` (selected by the primary configs).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mgrpo_cli import errors

log = logging.getLogger(__name__)

PARENT_ENV = "MGRPO_PARENT_RUN_ID"
STATUS_FILE = "status.json"


def one_line(error: BaseException | str | None, width: int = 300) -> Optional[str]:
    """An exception (or text) as one line: ``Type: message`` (first line), at most ``width`` chars."""
    if error is None:
        return None
    text = errors.one_line(error) if isinstance(error, BaseException) else " ".join(str(error).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def job_folders(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (those holding ``.hydra/``), by job number."""
    found = [p.parent for p in sweep_dir.glob("*/.hydra")]
    return sorted(found, key=lambda p: (0, int(p.name)) if p.name.isdigit() else (1, p.name))


def read_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One entry per job folder: number, folder, overrides, status, error, MLflow run id."""
    jobs = []
    for folder in job_folders(sweep_dir):
        over = folder / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(over)] if over.is_file() else []
        status: dict[str, Any] = {"status": "UNKNOWN", "error": f"no {STATUS_FILE} (the job was killed or never ended)",
                                  "mlflow_run_id": None}
        if (folder / STATUS_FILE).is_file():
            try:
                status.update(json.loads((folder / STATUS_FILE).read_text()))
            except json.JSONDecodeError:
                status["error"] = f"unreadable {STATUS_FILE}"
        jobs.append({"job": folder.name, "dir": str(folder), "overrides": overrides, "status": status.get("status"),
                     "error": status.get("error") if status.get("status") != "FINISHED" else None,
                     "mlflow_run_id": status.get("mlflow_run_id")})
    return jobs


def failure_line(jobs: list[dict[str, Any]]) -> Optional[str]:
    """``error: 1 of 4 sweep jobs failed: #2 (layer=grpo seed=1): ValueError: …`` or None."""
    failed = [j for j in jobs if j["status"] != "FINISHED"]
    if not failed:
        return None
    parts = [f"#{j['job']} ({' '.join(j['overrides']) or 'no overrides'}): {j['status']}"
             + (f": {j['error']}" if j["error"] else "") for j in failed]
    return f"error: {len(failed)} of {len(jobs)} sweep jobs failed: " + "; ".join(parts)


class SweepCallback(Callback):
    """Parent MLflow run and failure summary of a multirun (see the module docstring)."""

    def __init__(self) -> None:
        self.sweep_dir: Optional[Path] = None
        self.client = None
        self.parent_id: Optional[str] = None
        self.ended = False
        self.pid = os.getpid()

    # ------------------------------------------------------------------ launcher process
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.pid = os.getpid()
        os.environ.pop(PARENT_ENV, None)
        if config.get("logger") is not None and config.logger.enabled:
            try:
                self._start_parent(config)
            except Exception as e:  # tracking is a convenience here: the sweep runs without it
                log.warning("sweep: no parent MLflow run (%s)", one_line(e))
        atexit.register(self._at_exit)

    def _start_parent(self, config: DictConfig) -> None:
        from mgrpo_cli.reporting import tracking

        uri = config.logger.tracking_uri or tracking.default_tracking_uri(config.paths.outputs)
        client = tracking.client(uri, create=True)
        name = config.logger.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is None:  # as the jobs' MLFlowLogger would create it
            artifacts = (Path(config.paths.outputs).resolve() / "mlartifacts").as_uri()
            experiment_id = client.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        overrides = [str(o) for o in config.hydra.overrides.task]
        run = client.create_run(experiment_id, run_name=f"sweep-{self.sweep_dir.name}", tags={
            "mgrpo.kind": "sweep", "overrides": " ".join(overrides) or "(none)",
            "sweep_dir": str(self.sweep_dir.resolve()), "task": str(config.get("task_name", ""))})
        self.client, self.parent_id = client, run.info.run_id
        os.environ[PARENT_ENV] = self.parent_id
        log.info("sweep: parent MLflow run %s", self.parent_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        line = self._finish()
        if line:
            print(line, file=sys.stderr)
            raise SystemExit(errors.EXIT_FAILED_JOBS)

    def _at_exit(self) -> None:
        if os.getpid() != self.pid or self.ended:
            return
        line = self._finish()
        if line:
            print(line, file=sys.stderr)

    def _finish(self) -> Optional[str]:
        """Log the jobs to the parent run and end it; the one-line failure list, or None."""
        self.ended = True
        os.environ.pop(PARENT_ENV, None)
        if self.sweep_dir is None:
            return None
        jobs = read_jobs(self.sweep_dir)
        line = failure_line(jobs)
        if self.client is not None and self.parent_id is not None:
            try:
                self.client.log_text(self.parent_id, json.dumps(jobs, indent=1), "jobs.json")
                self.client.set_tag(self.parent_id, "jobs", " | ".join(
                    f"#{j['job']} {' '.join(j['overrides'])}: {j['status']}" for j in jobs)[:5000])
                if line:
                    self.client.set_tag(self.parent_id, "failed_jobs", line[:5000])
                self.client.set_terminated(self.parent_id, "FAILED" if line or not jobs else "FINISHED")
            except Exception as e:
                log.warning("sweep: could not end the parent MLflow run %s (%s)", self.parent_id, one_line(e))
        return line

    # ------------------------------------------------------------------ job process
    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Write ``status.json`` from Hydra's job result when the job wrote none."""
        from hydra.core.utils import JobStatus

        folder = Path(config.hydra.runtime.output_dir)
        path = folder / STATUS_FILE
        if path.is_file() or not folder.is_dir():
            return
        ok = job_return.status == JobStatus.COMPLETED
        returned = getattr(job_return, "_return_value", None)
        error = None if ok else one_line(returned or "the job raised")
        if ok and isinstance(returned, errors.JobFailed):  # a UserError that errors.run_command caught
            ok, error = False, one_line(f"UserError: {returned.error}")
        path.write_text(json.dumps({"status": "FINISHED" if ok else "FAILED", "error": error,
                                    "mlflow_run_id": None}))
