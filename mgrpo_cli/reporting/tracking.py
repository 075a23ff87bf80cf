"""MLflow access: where the store is, the clients, and a training run's logger.

Every MLflow client of the package is made here (:func:`client`), and every store address is
decided here (:func:`default_tracking_uri`): runs go to a local SQLite store
(``sqlite:///<paths.outputs>/mlflow.db``) unless ``logger.tracking_uri`` (``mgrpo report
--tracking-uri``) says otherwise; open them with ``mlflow ui --backend-store-uri <that uri>``.
A training or eval run writes through :class:`RunLogger` (Lightning's ``MLFlowLogger``); the sweep's
parent run (``reporting.sweep``) and ``mgrpo report`` (``reporting.load``, ``cli.report``) read and
write through a :func:`client`.
A run gets the resolved config as flattened params, the command-line overrides as a tag, per-step
metrics, text/PNG artifacts, and tables (the sampled completions, ``samples.json``).

The command, not Lightning, says how a run ends (:meth:`RunLogger.end`): FINISHED when the command
completed, FAILED when it raised (the one-line error as the ``error`` tag), KILLED when a signal
stopped it, with the real end time. Lightning's ``MLFlowLogger.finalize`` would end the run at the
end of every ``trainer.validate`` (the start-of-run evaluation) and ``fit``; here it leaves the run
as it is. A resumed training run reopens its MLflow run (``run_id``): RUNNING again, params kept.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

log = logging.getLogger(__name__)


SQLITE = "sqlite:///"


def default_tracking_uri(outputs: str | Path = "outputs") -> str:
    """The store of runs whose ``logger.tracking_uri`` is null: ``sqlite:///<outputs>/mlflow.db``."""
    return f"{SQLITE}{Path(outputs).resolve() / 'mlflow.db'}"


def store_exists(uri: str) -> bool:
    """False only for a SQLite store whose file is not there (other stores are asked when used)."""
    return not uri.startswith(SQLITE) or Path(uri[len(SQLITE):]).is_file()


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not the store's "creating tables" lines
    for name in ("mlflow", "alembic", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def client(uri: str, *, create: bool = False):
    """An ``MlflowClient`` of the store ``uri``; ``create`` makes a SQLite store's folder first."""
    _quiet()
    if create and uri.startswith(SQLITE):
        Path(uri[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(node, list) and any(isinstance(v, (dict, list)) for v in node):
        out[prefix[:-1]] = json.dumps(node)
    else:
        out[prefix[:-1]] = node
    return out


_LOGGER_CLASS = None


def _logger_class():
    """Lightning's ``MLFlowLogger`` whose ``finalize`` leaves the run's status alone and which logs no
    params into a resumed run (they are there; MLflow refuses a changed value)."""
    global _LOGGER_CLASS
    if _LOGGER_CLASS is None:
        from lightning.pytorch.loggers import MLFlowLogger

        class CommandEndsRun(MLFlowLogger):
            resumed = False

            def finalize(self, status: str = "success") -> None:
                pass  # RunLogger.end says how the run ended

            def log_hyperparams(self, params) -> None:
                if not self.resumed:
                    super().log_hyperparams(params)

        _LOGGER_CLASS = CommandEndsRun
    return _LOGGER_CLASS


class RunLogger:
    """A thin wrapper over ``MLFlowLogger`` adding text and file artifacts, tags and the run's end.
    ``params`` (a nested dict, the resolved config) are logged flattened (``grpo.lr``); long lists as
    JSON, cut to MLflow's limit. The run is made (or, with ``run_id``, reopened) at once, on rank 0;
    on other ranks every call does nothing."""

    def __init__(self, uri: str, experiment: str, run_name: str, *, params: dict[str, Any],
                 artifacts: Path, tags: Optional[dict[str, str]] = None, run_id: Optional[str] = None):
        from lightning.pytorch.utilities import rank_zero_only

        self.uri = uri
        self.is_global_zero = getattr(rank_zero_only, "rank", 0) == 0
        if self.is_global_zero:
            store = client(uri, create=True)
            if store.get_experiment_by_name(experiment) is None:  # made here, with its artifact folder
                store.create_experiment(experiment, artifact_location=artifacts.as_uri())
        if run_id is not None and self.is_global_zero and not self._exists(uri, run_id):
            log.warning("MLflow run %s is not in %s: this training run continues in a new MLflow run", run_id, uri)
            run_id = None
        self.logger = _logger_class()(experiment_name=experiment, run_name=run_name, tracking_uri=uri,
                                      artifact_location=artifacts.as_uri(), tags=tags or {}, run_id=run_id)
        self.logger.resumed = run_id is not None
        if not self.is_global_zero:
            return
        if run_id is None:
            flat = flatten(params)
            if isinstance(flat.get("layer.phrases"), list):
                flat["layer.phrases"] = " | ".join(flat["layer.phrases"])
            self.logger.log_hyperparams({k: str(v)[:6000] if isinstance(v, str) else v for k, v in flat.items()})
        else:
            run_client = self.logger.experiment
            # RUNNING again; MLflow's API cannot clear an end time, so a run reopened after a KILLED leg shows
            # that leg's end until end() sets the last leg's (set_terminated: the end time is now)
            run_client.update_run(run_id, status="RUNNING")
            resumes = int(run_client.get_run(run_id).data.tags.get("resumes", "0")) + 1
            self.set_tags({"resumes": str(resumes), f"resume.{resumes}.overrides": (tags or {}).get("overrides", "")})

    @staticmethod
    def _exists(uri: str, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return client(uri).get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    @property
    def run_id(self) -> Optional[str]:
        return self.logger.run_id if self.is_global_zero else None

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.is_global_zero:
            self.logger.experiment.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.is_global_zero:
            self.logger.experiment.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Append ``rows`` (one dict per row, the same keys) to the run's MLflow table ``artifact_file``
        (a ``.json``), which the MLflow UI shows as a table (``mlflow.load_table`` reads it back)."""
        if self.is_global_zero:
            columns = {key: [row.get(key) for row in rows] for key in rows[0]}
            self.logger.experiment.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    def read_table(self, artifact_file: str) -> list[dict[str, Any]]:
        """The rows of the run's MLflow table ``artifact_file`` so far ([] when there is none yet)."""
        import json
        import tempfile

        if not self.is_global_zero:
            return []
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.logger.experiment.download_artifacts(self.run_id, artifact_file, tmp)
            except Exception:  # MLflow raises several types for an artifact that does not exist
                return []
            data = json.loads(Path(path).read_text())
        columns = data.get("columns", [])
        return [dict(zip(columns, row, strict=True)) for row in data.get("data", [])]

    def log_folder(self, folder: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.is_global_zero:
            self.logger.experiment.log_artifacts(self.run_id, str(folder), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.is_global_zero:
            for key, value in tags.items():
                self.logger.experiment.set_tag(self.run_id, key, str(value)[:5000])

    def end(self, status: str = "FINISHED", error: Optional[str] = None) -> None:
        """End the run: FINISHED, FAILED (``error`` becomes the ``error`` tag) or KILLED; end time now."""
        if not self.is_global_zero:
            return
        if error:
            self.set_tags({"error": error})
        self.logger.experiment.set_terminated(self.run_id, status)


@contextmanager
def run_resources(reward_fn):
    """Scope of one command: yields a holder for its ``RunLogger`` (``.run_logger``); on the way out
    the MLflow run ends (FAILED with the error on an exception, so one failed multirun job does not
    poison the next; KILLED on Ctrl+C) and the grader's worker process stops."""
    from mgrpo_cli.config.errors import one_line

    held = SimpleNamespace(run_logger=None)
    status, error = "FINISHED", None
    try:
        yield held
    except (KeyboardInterrupt, SystemExit):  # Ctrl+C (Lightning turns it into sys.exit(1)) or SIGTERM
        status = "KILLED"
        raise
    except BaseException as e:
        status, error = "FAILED", one_line(e)
        raise
    finally:
        if held.run_logger:
            held.run_logger.end(status, error)
        reward_fn.close()
