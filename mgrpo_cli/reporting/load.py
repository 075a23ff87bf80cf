"""The runs a report reads: Hydra run folders and MLflow runs, each with its per-problem results.

A run folder brings its resolved config (``.hydra/config.yaml``), its command-line overrides, its
status (``status.json``) and its held-out files (``mgrpo_cli.reporting.heldout``: one file per
held-out evaluation of ``mgrpo train``, or ``mgrpo eval``'s ``problems.jsonl``). An MLflow
experiment name or run id brings the same from the run's params, tags and artifacts. Where MLflow
has it, a run also brings its per-layer training-metric history (:data:`TRAIN_METRICS`).
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mgrpo_cli.errors import UserError
from mgrpo_cli.reporting import provenance, tracking
from mgrpo_cli.reporting.heldout import FOLDER as HELDOUT
from mgrpo_cli.reporting.heldout import ProblemResult, read_rows, step_of

log = logging.getLogger(__name__)

# the per-layer training metrics read from MLflow: (metric name, label)
TRAIN_METRICS = (("reward_mean", "reward"), ("zero_variance_groups", "zero-variance groups"),
                 ("kl", "KL"), ("completion_length", "completion length"))
# read from MLflow too, not drawn: a layer's group count (a layer with no groups has no usable group)
HISTORY_EXTRA = ("groups",)
REPLICATE_KEY = "seed"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
DONE_FILE = {"train": "result.json", "eval": "summary.json"}


class ReportError(UserError):
    """A report that cannot be made; the message is one line naming what is wrong."""


# ---------------------------------------------------------------------------- runs

@dataclass
class Evaluation:
    step: Optional[int]  # global step of a train evaluation; None for an `mgrpo eval` run
    rows: dict[str, ProblemResult]


@dataclass
class MlflowRef:
    uri: str
    run_id: str
    experiment_id: Optional[str] = None
    parent_id: Optional[str] = None


@dataclass
class Run:
    name: str  # the run folder, or the MLflow run id
    command: str  # train | eval
    config: dict[str, str]  # the resolved config, flattened, values as strings
    override_keys: list[str]
    overrides: list[str]
    seed: int
    evaluations: list[Evaluation]  # by step
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    mlflow: Optional[MlflowRef] = None
    provenance: Optional[dict] = None  # what made it (``reporting.provenance``); None: not recorded
    started: Optional[float] = None  # when the job started (epoch seconds), for the run-order check
    sweep_command: Optional[str] = None  # the command of the sweep it belongs to

    def value(self, key: str) -> str:
        """The run's value of an override key (a group choice ``layer`` reads ``layer.name``)."""
        k = key.replace("/", ".")
        for candidate in (k, f"{k}.name"):
            if candidate in self.config:
                return self.config[candidate]
        for o in self.overrides:
            if _override_key(o) == key:
                return o.split("=", 1)[1] if "=" in o else "(deleted)"
        return "(unset)"


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].strip()


def _flat_strings(container: Any) -> dict[str, str]:
    return {k: _as_string(v) for k, v in tracking.flatten(container).items()}


def _as_string(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _command(config: dict[str, str]) -> str:
    return "eval" if "rescore" in config else "train"


def _natural(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path)))


def run_folders(path: Path) -> list[Path]:
    """A run folder itself, or the job folders of a multirun folder (also one level deeper)."""
    if (path / ".hydra" / "config.yaml").is_file():
        return [path]
    found = {p.parent.parent for pattern in ("*/.hydra/config.yaml", "*/*/.hydra/config.yaml")
             for p in path.glob(pattern)}
    return sorted(found, key=_natural)


def load_folder_run(folder: Path) -> Run | str:
    """The run of a Hydra job folder, or the reason it cannot be used."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that only resolves inside the job (e.g. ${hydra:...})
        container = OmegaConf.to_container(cfg, resolve=False)
    config = _flat_strings(container)
    over_file = folder / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(over_file)] if over_file.is_file() else []
    command = _command(config)
    mlflow_id = None
    status_file = folder / "status.json"
    if status_file.is_file():
        try:
            status = json.loads(status_file.read_text())
        except json.JSONDecodeError:
            return f"unreadable {status_file.name}"
        if status.get("status") != "FINISHED":
            error = status.get("error")
            return f"{status.get('status', 'unknown status')}" + (f": {error}" if error else "")
        mlflow_id = status.get("mlflow_run_id")
    elif not (folder / DONE_FILE[command]).is_file():
        return f"not finished (no status.json, no {DONE_FILE[command]})"
    if command == "eval":
        files = [(None, folder / "problems.jsonl")] if (folder / "problems.jsonl").is_file() else []
    else:
        files = sorted((step_of(p), p) for p in (folder / HELDOUT).glob("step_*.jsonl") if step_of(p) is not None)
    if not files:
        wanted = "problems.jsonl" if command == "eval" else f"{HELDOUT}/step_*.jsonl"
        return f"no per-problem results ({wanted})"
    evaluations = [Evaluation(step, {r.id: r for r in read_rows(p)}) for step, p in files]
    ref = None
    if config.get("logger.enabled") == "True":
        uri = config.get("logger.tracking_uri")
        if uri in (None, "None"):
            uri = tracking.default_tracking_uri(config.get("paths.outputs", "outputs"))
        ref = MlflowRef(uri, mlflow_id or "", experiment_id=None)
    recorded = provenance.read(folder)
    # Hydra writes the job's config when the job starts: its time is the start of runs made before
    # provenance.json recorded it
    started = (recorded or {}).get("started") or (folder / ".hydra" / "config.yaml").stat().st_mtime
    return Run(str(folder), command, config, [_override_key(o) for o in overrides], overrides,
               int(config.get(REPLICATE_KEY, 0)), evaluations, mlflow=ref, provenance=recorded, started=started,
               sweep_command=_sweep_command(folder.parent, command))


def _sweep_command(sweep_dir: Path, command: str) -> Optional[str]:
    """``mgrpo <command> -m <overrides>`` from a multirun folder's ``multirun.yaml`` (None without one)."""
    from omegaconf import OmegaConf

    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    overrides = OmegaConf.load(path).hydra.overrides
    return " ".join(["mgrpo", command, "-m", *map(str, overrides.hydra), *map(str, overrides.task)])


# ---------------------------------------------------------------------------- MLflow access

def _history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    out = {}
    for key in run.data.metrics:
        if key.startswith("train/layer") and key.rsplit("/", 1)[-1] in (*dict(TRAIN_METRICS), *HISTORY_EXTRA):
            out[key] = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    return out


def attach_mlflow(runs: list[Run], notes: list[str]) -> None:
    """Fill each folder run's MLflow run id (found by its ``run_dir`` tag when status.json has none),
    parent id and training-metric history."""
    clients: dict[str, Any] = {}
    for run in runs:
        ref = run.mlflow
        if ref is None or run.history:
            continue
        if not tracking.store_exists(ref.uri):
            notes.append(f"{run.name}: no MLflow store at {ref.uri}; training curves left out")
            run.mlflow = None
            continue
        client = clients.setdefault(ref.uri, tracking.client(ref.uri))
        if not ref.run_id:
            experiment = client.get_experiment_by_name(run.config.get("logger.experiment", "mgrpo"))
            found = [] if experiment is None else client.search_runs(
                [experiment.experiment_id], filter_string=f"tags.run_dir = '{Path(run.name).resolve()}'", max_results=1)
            if not found:
                notes.append(f"{run.name}: no MLflow run found for this folder; training curves left out")
                run.mlflow = None
                continue
            ref.run_id = found[0].info.run_id
        try:
            info = client.get_run(ref.run_id)
        except Exception:  # MlflowException: the store at that URI does not hold the run
            notes.append(f"{run.name}: no MLflow run {ref.run_id} in {ref.uri}; training curves left out")
            run.mlflow = None
            continue
        ref.experiment_id = info.info.experiment_id
        ref.parent_id = info.data.tags.get("mlflow.parentRunId")
        run.history = _history(client, ref.run_id)


def load_mlflow_runs(uri: str, what: str, tmp: Path, excluded: list[tuple[str, str]]) -> list[Run]:
    """The runs of an MLflow experiment (by name), or one run (by id), with their artifacts."""
    if not tracking.store_exists(uri):
        raise ReportError(f"{what}: no such folder, and no MLflow store at {uri} (give --tracking-uri)")
    client = tracking.client(uri)
    if _RUN_ID.match(what):
        try:
            found = [client.get_run(what)]
        except Exception:
            raise ReportError(f"{what}: no such folder or MLflow run in {uri}") from None
    else:
        experiment = client.get_experiment_by_name(what)
        if experiment is None:
            raise ReportError(f"{what}: no such folder, and no MLflow experiment of that name in {uri}")
        found = client.search_runs([experiment.experiment_id], max_results=10_000,
                                   order_by=["attributes.start_time ASC"])
    runs = []
    parents: dict[str, Optional[str]] = {}  # the sweeps' overrides, by parent run id
    for r in found:
        run_id, tags = r.info.run_id, r.data.tags
        if tags.get("mgrpo.kind") in ("sweep", "report"):
            continue
        if r.info.status != "FINISHED":
            excluded.append((run_id, r.info.status))
            continue
        config = dict(r.data.params)
        command = _command(config)
        dest = tmp / run_id
        if command == "eval":
            names = [a.path for a in client.list_artifacts(run_id) if a.path == "problems.jsonl"]
        else:
            names = [a.path for a in client.list_artifacts(run_id, HELDOUT) if step_of(a.path) is not None]
        if not names:
            excluded.append((run_id, "no per-problem results in its artifacts"))
            continue
        evaluations = []
        for name in sorted(names, key=lambda n: step_of(n) or 0):
            local = client.download_artifacts(run_id, name, str(dest))
            evaluations.append(Evaluation(step_of(name), {x.id: x for x in read_rows(local)}))
        raw = tags.get("overrides", "(none)")
        overrides = [] if raw == "(none)" else raw.split()
        parent = tags.get("mlflow.parentRunId")
        sweep = None
        if parent:
            if parent not in parents:
                parents[parent] = client.get_run(parent).data.tags.get("overrides")
            sweep = f"mgrpo {command} -m {parents[parent]}" if parents[parent] else None
        runs.append(Run(run_id, command, config, [_override_key(o) for o in overrides], overrides,
                        int(float(config.get(REPLICATE_KEY, 0))), evaluations, _history(client, run_id),
                        MlflowRef(uri, run_id, r.info.experiment_id, parent),
                        provenance=provenance.from_tags(tags), started=r.info.start_time / 1000,
                        sweep_command=sweep))
    return runs


def load_runs(whats: Sequence[str], tracking_uri: str, tmp: Path) -> tuple[list[Run], list[tuple[str, str]], list[str]]:
    """(usable runs, excluded runs with reasons, notes) for the ``<what>`` arguments."""
    runs: list[Run] = []
    excluded: list[tuple[str, str]] = []
    notes: list[str] = []
    for what in whats:
        path = Path(what)
        if path.is_dir():
            folders = run_folders(path)
            if not folders:
                raise ReportError(f"{what}: no run folders in it (a run folder has .hydra/config.yaml)")
            for folder in folders:
                got = load_folder_run(folder)
                if isinstance(got, str):
                    excluded.append((str(folder), got))
                else:
                    runs.append(got)
        elif path.exists():
            raise ReportError(f"{what}: not a folder (give a multirun folder, run folders, an MLflow experiment or run id)")
        else:
            runs.extend(load_mlflow_runs(tracking_uri, what, tmp, excluded))
    if not runs:
        reasons = "; ".join(f"{Path(n).name}: {r}" for n, r in excluded[:3]) or "none found"
        raise ReportError(f"{' '.join(whats)}: no finished runs with per-problem results ({reasons})")
    attach_mlflow(runs, notes)
    return runs, excluded, notes
