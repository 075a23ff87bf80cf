"""MLflow through Lightning's ``MLFlowLogger``: the only module that talks to mlflow.

Runs go to a local SQLite store (``sqlite:///<paths.outputs>/mlflow.db``) unless
``logger.tracking_uri`` says otherwise; open them with ``mlflow ui --backend-store-uri <that uri>``.
A run gets the resolved config as flattened params, the command-line overrides as a tag, per-step
metrics, text/PNG artifacts, and tables (the sampled completions, ``samples.json``).
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


def default_tracking_uri(outputs: str | Path) -> str:
    """``sqlite:///<outputs>/mlflow.db`` (the folder is made)."""
    db = Path(outputs).resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


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


class RunLogger:
    """A thin wrapper over ``MLFlowLogger`` adding text and file artifacts. ``params`` (a nested dict,
    the resolved config) are logged flattened (``grpo.lr``); long lists as JSON, cut to MLflow's limit."""

    def __init__(self, uri: str, experiment: str, run_name: str, *, params: dict[str, Any],
                 artifacts: Path, tags: Optional[dict[str, str]] = None):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not the store's "creating tables" lines
        from lightning.pytorch.loggers import MLFlowLogger
        from mlflow.tracking import MlflowClient

        self.uri = uri
        client = MlflowClient(uri)
        if client.get_experiment_by_name(experiment) is None:  # made here, with its artifact folder
            client.create_experiment(experiment, artifact_location=artifacts.as_uri())
        self.logger = MLFlowLogger(experiment_name=experiment, run_name=run_name, tracking_uri=uri,
                                   artifact_location=artifacts.as_uri(), tags=tags or {})
        flat = flatten(params)
        if isinstance(flat.get("layer.phrases"), list):
            flat["layer.phrases"] = " | ".join(flat["layer.phrases"])
        self.logger.log_hyperparams({k: str(v)[:6000] if isinstance(v, str) else v for k, v in flat.items()})

    @property
    def run_id(self) -> str:
        return self.logger.run_id

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.logger.experiment.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.logger.experiment.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Append ``rows`` (one dict per row, the same keys) to the run's MLflow table ``artifact_file``
        (a ``.json``), which the MLflow UI shows as a table (``mlflow.load_table`` reads it back)."""
        columns = {key: [row.get(key) for row in rows] for key in rows[0]}
        self.logger.experiment.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    def finish(self, status: str = "success") -> None:
        self.logger.finalize(status)


@contextmanager
def run_resources(reward_fn):
    """Scope of one command: yields a holder for its ``RunLogger`` (``.run_logger``); on the way out
    the MLflow run ends (``failed`` on an exception, so one failed multirun job does not poison the
    next) and the grader's worker process stops."""
    held = SimpleNamespace(run_logger=None)
    status = "success"
    try:
        yield held
    except BaseException:
        status = "failed"
        raise
    finally:
        if held.run_logger:
            held.run_logger.finish(status)
        reward_fn.close()
