"""MLflow access: where the store is, the clients, and a training run's logger.

Every MLflow client of the package is made here (:func:`client`), and every store address is
decided here (:func:`default_tracking_uri`): runs go to a local SQLite store
(``sqlite:///<paths.outputs>/mlflow.db``) unless ``logger.tracking_uri`` (``mgrpo report
--tracking-uri``) says otherwise; open them with ``mlflow ui --backend-store-uri <that uri>``.
A training or eval run writes through :class:`RunLogger` (the Trainer through its Lightning logger);
the sweep's parent run (``reporting.sweep``) and ``mgrpo report`` (``reporting.load``,
``cli.report``) read and write through a :func:`client`.
A run gets the resolved config as flattened params, the command-line overrides as a tag, per-step
metrics, text/PNG artifacts, and tables (the sampled completions, ``samples.json``).

A tracking store never slows or stops a run: a server must answer when the run starts
(:func:`check_reachable`, no retries: a one-line error at once otherwise), and from then on
everything the run logs goes through its run folder's outbox (``reporting.outbox``), sent in the
background and kept on disk while the store is away.

The command, not Lightning, says how a run ends (:meth:`RunLogger.end`): FINISHED when the command
completed, FAILED when it raised (the one-line error as the ``error`` tag), KILLED when a signal
stopped it, with the real end time. A resumed training run reopens its MLflow run (``run_id``):
RUNNING again, params kept, after what its earlier legs left unsent.
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


class TrackingUnavailable(Exception):
    """The tracking store does not answer, or refuses, at the start of a run."""


def metric_name(key: str) -> str:
    """A metric's name in MLflow, which allows no ``@``: ``val/pass@4`` is ``val/pass_at_4`` there."""
    return key.replace("@", "_at_")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """For a tracking server (``http(s)://``): raise :class:`TrackingUnavailable` unless it answers as
    MLflow within ``timeout`` seconds, with no retries (a refused connection is known at once). Other
    stores (SQLite, a folder) are opened when used."""
    if not uri.startswith(("http://", "https://")):
        return
    _quiet()
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    from mgrpo_cli.reporting.outbox import first_line

    try:
        answer = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "POST",
                              max_retries=0, timeout=timeout, raise_on_status=False, json={"max_results": 1})
    except Exception as e:
        raise TrackingUnavailable(f"no answer ({first_line(e)})") from None
    if answer.status_code != 200:
        raise TrackingUnavailable(f"it refuses: HTTP {answer.status_code} {answer.reason}")
    # from here on a request that gets no answer fails at once: the outbox (reporting.outbox) retries it
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _lightning_logger(run_logger: RunLogger):
    """The Lightning logger the Trainer writes metrics through: into ``run_logger``'s outbox. The run's
    params are the flattened config ``RunLogger`` logs (not the module's hparams), and the command, not
    Lightning, ends the run."""
    from lightning.pytorch.loggers.logger import Logger

    class ToRunLogger(Logger):
        @property
        def name(self) -> str:
            return "mlflow"

        @property
        def version(self) -> str:
            return run_logger.run_id or ""

        def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
            run_logger.log_metrics(metrics, step)

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

    return ToRunLogger()


class RunLogger:
    """A run's MLflow record: params, metrics, tags, text, files and tables, and its end.

    The run is made (or, with ``run_id``, reopened) at once, on rank 0, after checking that the store
    answers (:class:`TrackingUnavailable` otherwise); from then on every call only appends to the run
    folder's outbox (``reporting.outbox``), sent in the background, so a tracking store that goes away
    never slows or stops training. ``params`` (a nested dict, the resolved config) are logged flattened
    (``grpo.lr``); long lists as JSON, cut to MLflow's limit. On other ranks every call does nothing.
    ``logger`` is the Lightning logger to give the Trainer."""

    END_WAIT_S = 30.0  # at the end, how long to wait for the outbox to be sent

    def __init__(self, uri: str, experiment: str, run_name: str, *, params: dict[str, Any],
                 artifacts: Path, folder: Path, tags: Optional[dict[str, str]] = None, run_id: Optional[str] = None):
        from lightning.pytorch.utilities import rank_zero_only

        from mgrpo_cli.reporting.outbox import Outbox, Sender, first_line

        self.uri, self.folder, self._run_id, self.outbox = uri, Path(folder), None, None
        self.is_global_zero = getattr(rank_zero_only, "rank", 0) == 0
        self.logger = _lightning_logger(self)
        if not self.is_global_zero:
            return
        check_reachable(uri)
        try:
            store = client(uri, create=True)
            found = store.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else \
                store.create_experiment(experiment, artifact_location=artifacts.as_uri())
            if run_id is not None and not self._exists(store, run_id):
                log.warning("MLflow run %s is not in %s: this training run continues in a new MLflow run", run_id, uri)
                run_id = None
            self.outbox = Outbox(self.folder, uri)
            self.outbox.start(Sender(client(uri)))
            if run_id is None:
                from mlflow.tracking.context.registry import resolve_tags

                self._run_id = store.create_run(experiment_id, run_name=run_name,
                                                tags=resolve_tags(tags or {})).info.run_id
            else:
                self._run_id = run_id
                self.outbox.wait_sent(self.END_WAIT_S)  # the earlier legs' unsent record first
                resumes = int(store.get_run(run_id).data.tags.get("resumes", "0")) + 1
        except TrackingUnavailable:
            raise
        except Exception as e:
            if self.outbox is not None:
                self.outbox.close(timeout=0)
            raise TrackingUnavailable(f"it fails ({first_line(e)})") from None
        if run_id is None:
            flat = flatten(params)
            if isinstance(flat.get("layer.phrases"), list):
                flat["layer.phrases"] = " | ".join(flat["layer.phrases"])
            self._put({"op": "params", "params": {k: str(v)[:6000] for k, v in flat.items()}})
        else:
            # RUNNING again; MLflow's API cannot clear an end time, so a run reopened after a KILLED leg shows
            # that leg's end until end() sets the last leg's
            self._put({"op": "status", "status": "RUNNING"})
            self.set_tags({"resumes": str(resumes), f"resume.{resumes}.overrides": (tags or {}).get("overrides", "")})

    @staticmethod
    def _exists(store, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return store.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    @property
    def run_id(self) -> Optional[str]:
        return self._run_id

    def _put(self, op: dict[str, Any]) -> None:
        if self.outbox is not None:
            self.outbox.put({**op, "run": self._run_id})

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        from mgrpo_cli.reporting.outbox import now_ms

        self._put({"op": "metrics", "metrics": {metric_name(k): float(v) for k, v in metrics.items()}, "step": step or 0,
                   "ts": now_ms()})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put({"op": "text", "text": text, "file": artifact_file})

    def log_file(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._put({"op": "artifact", "path": str(Path(path).resolve()), "dir": artifact_path})

    def log_folder(self, folder: str | Path, artifact_path: Optional[str] = None) -> None:
        self.log_file(folder, artifact_path)

    def _table_file(self, artifact_file: str) -> Path:
        from mgrpo_cli.reporting.outbox import FOLDER

        return self.folder / FOLDER / "tables" / artifact_file

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Append ``rows`` (one dict per row, the same keys) to the run's MLflow table ``artifact_file``
        (a ``.json``, kept whole in the run folder), which the MLflow UI shows as a table
        (``mlflow.load_table`` reads it back)."""
        if self.outbox is None or not rows:
            return
        kept = self.read_table(artifact_file)
        columns = list(kept[0]) if kept else list(rows[0])
        table = {"columns": columns, "data": [[row.get(c) for c in columns] for row in kept + rows]}
        path = self._table_file(artifact_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(table))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._put({"op": "table", "path": str(path.resolve()), "file": artifact_file})

    def read_table(self, artifact_file: str) -> list[dict[str, Any]]:
        """The rows of the run's table ``artifact_file`` so far ([] when there is none yet); a run from
        before tables were kept in the run folder reads MLflow's copy."""
        import tempfile

        if self.outbox is None:
            return []
        path = self._table_file(artifact_file)
        if not path.is_file():
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    path = Path(client(self.uri).download_artifacts(self._run_id, artifact_file, tmp))
                    data = json.loads(path.read_text())
                except Exception:  # MLflow raises several types for an artifact that does not exist
                    return []
        else:
            data = json.loads(path.read_text())
        columns = data.get("columns", [])
        return [dict(zip(columns, row, strict=True)) for row in data.get("data", [])]

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put({"op": "tags", "tags": {k: str(v)[:5000] for k, v in tags.items()}})

    def sync_to_disk(self) -> None:
        """The outbox on disk (it survives a crash of the machine): at every checkpoint."""
        if self.outbox is not None:
            self.outbox.sync_to_disk()

    def end(self, status: str = "FINISHED", error: Optional[str] = None) -> None:
        """End the run: FINISHED, FAILED (``error`` becomes the ``error`` tag) or KILLED; end time now.
        Waits up to ``END_WAIT_S`` for the outbox to be sent; what is left is said in one line."""
        from mgrpo_cli.reporting.outbox import now_ms

        if self.outbox is None:
            return
        if error:
            self.set_tags({"error": error})
        self._put({"op": "end", "status": status, "ts": now_ms()})
        outbox, self.outbox = self.outbox, None
        unsent = outbox.close(timeout=self.END_WAIT_S)
        if unsent:
            steps = [op["step"] for op in unsent if op["op"] == "metrics"]
            what = f"metrics of steps {min(steps)}..{max(steps)}, " if steps else ""
            lost = outbox.lost
            kept = len(unsent) - lost
            log.warning("tracking: %d operations (%sthe run's end: %s) not sent to %s, which does not answer; %s",
                        len(unsent), what, status, self.uri,
                        (f"{kept} are kept in {self.folder / 'tracking'}: send them with: mgrpo sync {self.folder}"
                         if kept else "") + (f"{'; ' if kept else ''}{lost} could not be kept (the disk is full)"
                                             if lost else ""))


@contextmanager
def run_resources(reward_fn):
    """Scope of one command: yields a holder for its ``RunLogger`` (``.run_logger``); on the way out
    the MLflow run ends (FAILED with the error on an exception, so one failed multirun job does not
    poison the next; KILLED on Ctrl+C) and the grader's worker process stops."""
    from mgrpo_cli.errors import one_line

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
