"""``mgrpo report <what>...``: turn a sweep into a comparison with confidence intervals.

``<what>`` is a multirun folder (or one run folder), an MLflow experiment name or an MLflow run id;
several may be given. Each finished run brings its per-problem results (``mgrpo_cli.reporting.heldout``: one
file per held-out evaluation of ``mgrpo train``, or ``mgrpo eval``'s ``problems.jsonl``), its config
and command-line overrides, and, where MLflow has it, its training-metric history.

Runs are grouped by the override keys whose values differ among them; ``seed`` is the replicate
key. For every group: Acc@t1, Acc@t2, Δ(t1,t2), Δi→c, Δc→i at the start and the end of training as a
mean with a 95% t-interval over seeds (over problems for a single run), and the end − start change
with a bootstrap interval over seeds × problems (``mgrpo_cli.reporting.stats``). For every pair of groups that
differ in one key: the paired per-problem difference (same seed, same problem) with the same
bootstrap, and a computed verdict line. Figures: held-out learning curves with seed bands, the
per-layer training metrics (reward, share of zero-variance groups, KL, completion length), the
t1→t2 transition bars. Outputs: ``report.md``, a self-contained ``report.html`` (PNGs inlined),
the PNGs and ``report.json``, written to ``--out`` and logged to MLflow (as artifacts of the sweep's
parent run when all runs have one, else of a new run tagged ``mgrpo.kind=report``).

Left out: runs on different problem sets in one report (one problem set per report), multiple-
comparison corrections. MLflow access for reading runs lives here rather than in ``tracking``,
which writes runs.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mgrpo_cli.config.errors import EXIT_USER_ERROR, UserError
from mgrpo_cli.reporting.heldout import FOLDER as HELDOUT
from mgrpo_cli.reporting.heldout import ProblemResult, RowsError, read_rows, step_of
from mgrpo_cli.reporting.stats import Interval, crossed_bootstrap, t_interval, verdict

log = logging.getLogger(__name__)

# (key, label, higher is better)
METRICS = (("acc_t1", "Acc@t1", True), ("acc_t2", "Acc@t2", True), ("delta", "Δ(t1,t2)", True),
           ("delta_i2c", "Δi→c", True), ("delta_c2i", "Δc→i", False))
TRANSITIONS = (("rr", "right→right", "#4c9a5b"), ("wr", "wrong→right", "#7fc97f"),
               ("rw", "right→wrong", "#e0655a"), ("ww", "wrong→wrong", "#9e9e9e"))
TRAIN_METRICS = (("reward_mean", "reward"), ("zero_variance_groups", "zero-variance groups"),
                 ("kl", "KL"), ("completion_length", "completion length"))
REPLICATE_KEY = "seed"
# overrides that change where or how fast a run goes, not what it computes: never a grouping key
IGNORED_KEYS = ("hydra", "paths", "logger", "trainer.threads", "trainer.checkpoint_every",
                "trainer.weight_checksums", "ckpt_path", "eval.batch_size")
# keys that choose the evaluated problems: runs of one report must agree on them
PROBLEM_SET_KEYS = ("dataset", "eval.split", "eval.limit", "rescore")
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
    from mgrpo_cli.reporting.tracking import flatten

    return {k: _as_string(v) for k, v in flatten(container).items()}


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
            uri = f"sqlite:///{Path(config.get('paths.outputs', 'outputs')).resolve() / 'mlflow.db'}"
        ref = MlflowRef(uri, mlflow_id or "", experiment_id=None)
    return Run(str(folder), command, config, [_override_key(o) for o in overrides], overrides,
               int(config.get(REPLICATE_KEY, 0)), evaluations, mlflow=ref)


# ---------------------------------------------------------------------------- MLflow access

def _store_exists(uri: str) -> bool:
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()


def _client(uri: str):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    out = {}
    for key in run.data.metrics:
        if key.startswith("train/layer") and key.rsplit("/", 1)[-1] in dict(TRAIN_METRICS):
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
        if not _store_exists(ref.uri):
            notes.append(f"{run.name}: no MLflow store at {ref.uri}; training curves left out")
            run.mlflow = None
            continue
        client = clients.setdefault(ref.uri, _client(ref.uri))
        if not ref.run_id:
            experiment = client.get_experiment_by_name(run.config.get("logger.experiment", "mgrpo"))
            found = [] if experiment is None else client.search_runs(
                [experiment.experiment_id], filter_string=f"tags.run_dir = '{Path(run.name).resolve()}'", max_results=1)
            if not found:
                notes.append(f"{run.name}: no MLflow run found for this folder; training curves left out")
                run.mlflow = None
                continue
            ref.run_id = found[0].info.run_id
        info = client.get_run(ref.run_id)
        ref.experiment_id = info.info.experiment_id
        ref.parent_id = info.data.tags.get("mlflow.parentRunId")
        run.history = _history(client, ref.run_id)


def load_mlflow_runs(uri: str, what: str, tmp: Path, excluded: list[tuple[str, str]]) -> list[Run]:
    """The runs of an MLflow experiment (by name), or one run (by id), with their artifacts."""
    if not _store_exists(uri):
        raise ReportError(f"{what}: no such folder, and no MLflow store at {uri} (give --tracking-uri)")
    client = _client(uri)
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
        runs.append(Run(run_id, command, config, [_override_key(o) for o in overrides], overrides,
                        int(float(config.get(REPLICATE_KEY, 0))), evaluations, _history(client, run_id),
                        MlflowRef(uri, run_id, r.info.experiment_id, tags.get("mlflow.parentRunId"))))
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


# ---------------------------------------------------------------------------- groups

@dataclass
class Group:
    values: tuple[str, ...]  # one per varying key
    label: str
    runs: list[Run]  # one per seed, by seed

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


@dataclass
class Grouping:
    keys: list[str]  # the varying keys, in order of first appearance
    groups: list[Group]
    shared: list[str]  # overrides every run has, with one value
    pairs: list[tuple[str, Group, Group]]  # (the key that differs, first value's group, second's)


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in IGNORED_KEYS)


def _short_values(values: list[str]) -> dict[str, str]:
    """Labels for one key's values: paths shortened to their last parts, as few as keep them apart."""
    values = list(dict.fromkeys(values))
    if not all("/" in v for v in values):
        return {v: v for v in values}
    for n in range(1, max(len(Path(v).parts) for v in values) + 1):
        tails = {v: str(Path(*Path(v).parts[-n:])) for v in values}
        if len(set(tails.values())) == len(values):
            return tails
    return {v: v for v in values}


def group_runs(runs: list[Run]) -> Grouping:
    commands = sorted({r.command for r in runs})
    if len(commands) > 1:
        raise ReportError("runs mix `mgrpo train` and `mgrpo eval` results: report one command's runs at a time")
    keys: list[str] = []
    for r in runs:
        for k in r.override_keys:
            if k not in keys and k != REPLICATE_KEY and not _ignored(k):
                keys.append(k)
    varying = [k for k in keys if len({r.value(k) for r in runs}) > 1]
    problem_keys = [k for k in varying if any(k == p or k.startswith(p + ".") for p in PROBLEM_SET_KEYS)]
    if problem_keys:
        k = problem_keys[0]
        raise ReportError(f"runs evaluate different problem sets ({k} = {', '.join(sorted({r.value(k) for r in runs}))}): "
                          "no comparable key; report one problem set at a time")
    shared = [f"{k}={runs[0].value(k)}" for k in keys if k not in varying]
    by_values: dict[tuple[str, ...], list[Run]] = {}
    for r in runs:
        by_values.setdefault(tuple(r.value(k) for k in varying), []).append(r)
    short = [_short_values([v[i] for v in by_values]) for i in range(len(varying))]
    groups = []
    for values, members in by_values.items():
        seeds = [r.seed for r in members]
        if len(set(seeds)) != len(seeds):
            dup = sorted({s for s in seeds if seeds.count(s) > 1})
            names = [Path(r.name).name for r in members if r.seed in dup]
            raise ReportError(f"runs {', '.join(names)} share every swept key and seed={dup[0]}: "
                              "no key tells them apart (sweep a key, or report them separately)")
        shown = [short[i][v] for i, v in enumerate(values)]
        if len(varying) == 1:
            label = shown[0]
        else:
            label = ", ".join(f"{k}={v}" for k, v in zip(varying, shown)) or "all runs"
        groups.append(Group(values, label, sorted(members, key=lambda r: r.seed)))
    pairs = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            differ = [k for k, x, y in zip(varying, a.values, b.values) if x != y]
            if len(differ) == 1:
                pairs.append((differ[0], a, b))
    if len(groups) > 1 and not pairs:
        raise ReportError(f"runs share no comparable key: every two of the groups ({'; '.join(g.label for g in groups)}) "
                          "differ in more than one key; sweep one key at a time")
    return Grouping(varying, groups, shared, pairs)


# ---------------------------------------------------------------------------- numbers

def per_problem(rows: dict[str, ProblemResult], ids: list[str], metric: str):
    """One value per problem whose mean is ``metric`` (``metrics.self_correction``'s definitions)."""
    import numpy as np

    t1 = np.array([rows[i].t1 for i in ids], dtype=float)
    if metric == "acc_t1":
        return t1
    t2 = np.array([bool(rows[i].t2) for i in ids], dtype=float)
    return {"acc_t2": t2, "delta": t2 - t1, "delta_i2c": (1 - t1) * t2, "delta_c2i": t1 * (1 - t2),
            "rr": t1 * t2, "wr": (1 - t1) * t2, "rw": t1 * (1 - t2), "ww": (1 - t1) * (1 - t2)}[metric]


def _matrix(evals: list[Evaluation], ids: list[str], metric: str):
    import numpy as np

    return np.stack([per_problem(e.rows, ids, metric) for e in evals])  # (seeds, problems)


def group_interval(evals: list[Evaluation], ids: list[str], metric: str) -> Interval:
    """Mean over seeds with a t-interval over the per-seed means; one run: over its problems."""
    m = _matrix(evals, ids, metric)
    return t_interval(m.mean(axis=1) if len(evals) > 1 else m[0])


@dataclass
class Comparison:
    title: str
    metric: str
    label: str
    higher_is_better: bool
    a: str
    b: str
    a_mean: float
    b_mean: float
    diff: Interval
    n_seeds: int
    n_problems: int
    change: bool  # end − start of one group (else group b − group a)

    @property
    def verdict(self) -> str:
        words = ("grew", "fell", "no detectable change") if self.change else ("better", "worse", "no detectable difference")
        return verdict(self.diff, True if self.change else self.higher_is_better, words)

    def line(self) -> str:
        d = self.diff
        ci = f"[{_pts(d.low)}, {_pts(d.high)}]" if d.defined else "[no interval]"
        head = (f"{self.a} {self.label} end − start" if self.change
                else f"{self.b} {self.label} − {self.a} {self.label}")
        return (f"{head} = {_pts(d.mean)} {ci} points "
                f"({self.n_seeds} seed{'s' * (self.n_seeds != 1)} × {self.n_problems} problems): {self.verdict}")


def _pts(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:+.1f}"


def _pm(iv: Interval) -> str:
    if not iv.defined:
        return f"{100 * iv.mean:.1f}"
    return f"{100 * iv.mean:.1f} ± {100 * iv.half_width:.1f}"


@dataclass
class Analysis:
    grouping: Grouping
    ids: list[str]
    metrics: list[tuple[str, str, bool]]
    start: dict[str, dict[str, Interval]]  # group label -> metric -> interval
    end: dict[str, dict[str, Interval]]
    transitions: dict[str, dict[str, Interval]]
    changes: list[Comparison]
    comparisons: list[Comparison]
    command: str
    steps: tuple[Optional[int], Optional[int]]
    dropped_problems: int


def analyse(runs: list[Run], n_resamples: int, progress=None) -> Analysis:
    grouping = group_runs(runs)
    all_ids = [set(e.rows) for r in runs for e in r.evaluations]
    ids = sorted(set.intersection(*all_ids))
    if not ids:
        raise ReportError("runs share no problem ids: their per-problem results cannot be compared")
    dropped = len(set.union(*all_ids)) - len(ids)
    has_t2 = all(e.rows[i].t2 is not None for r in runs for e in r.evaluations for i in ids)
    metrics = [m for m in METRICS if has_t2 or m[0] == "acc_t1"]
    command = runs[0].command
    start, end, transitions = {}, {}, {}
    changes, comparisons = [], []
    n_jobs = len(grouping.groups) * len(metrics) * (command == "train") + len(grouping.pairs) * len(metrics)
    advance = progress(n_jobs) if progress else (lambda: None)
    for g in grouping.groups:
        first, last = [r.evaluations[0] for r in g.runs], [r.evaluations[-1] for r in g.runs]
        start[g.label] = {m: group_interval(first, ids, m) for m, _, _ in metrics}
        end[g.label] = {m: group_interval(last, ids, m) for m, _, _ in metrics}
        if has_t2:
            transitions[g.label] = {t: group_interval(last, ids, t) for t, _, _ in TRANSITIONS}
        if command != "train":
            continue
        for m, label, better in metrics:
            diff = _matrix(last, ids, m) - _matrix(first, ids, m)
            changes.append(Comparison(g.label, m, label, better, g.label, g.label, start[g.label][m].mean,
                                      end[g.label][m].mean, crossed_bootstrap(diff, n_resamples=n_resamples),
                                      len(g.runs), len(ids), change=True))
            advance()
    for key, a, b in grouping.pairs:
        seeds = sorted(set(a.seeds) & set(b.seeds))
        if not seeds:
            for _ in metrics:
                advance()
            continue
        ea = [r.evaluations[-1] for r in a.runs if r.seed in seeds]
        eb = [r.evaluations[-1] for r in b.runs if r.seed in seeds]
        for m, label, better in metrics:
            ma, mb = _matrix(ea, ids, m), _matrix(eb, ids, m)
            comparisons.append(Comparison(f"{b.label} − {a.label} ({key})", m, label, better, a.label, b.label,
                                          float(ma.mean()), float(mb.mean()),
                                          crossed_bootstrap(mb - ma, n_resamples=n_resamples),
                                          len(seeds), len(ids), change=False))
            advance()
    steps = (runs[0].evaluations[0].step, runs[0].evaluations[-1].step)
    return Analysis(grouping, ids, metrics, start, end, transitions, changes, comparisons, command, steps, dropped)


# ---------------------------------------------------------------------------- figures

def _figure(figsize, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, FigureCanvasAgg(fig)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _band(series: list[list[tuple[int, float]]]):
    """Mean and 95% t-band over runs at the steps all of them have (NaN band for one run)."""
    import numpy as np

    common = sorted(set.intersection(*[{s for s, _ in run} for run in series]))
    values = np.array([[dict(run)[s] for s in common] for run in series])  # (runs, steps)
    ivs = [t_interval(values[:, j]) for j in range(len(common))]
    return (np.array(common), np.array([iv.mean for iv in ivs]), np.array([iv.low for iv in ivs]),
            np.array([iv.high for iv in ivs]))


def _smooth(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    import numpy as np

    if window <= 1 or len(points) < window:
        return points
    steps, values = zip(*points)
    kernel = np.ones(window) / window
    smooth = np.convolve(np.asarray(values, dtype=float), kernel, mode="valid")
    return list(zip(steps[window - 1:], smooth.tolist()))


def plot_heldout(an: Analysis, path: Path) -> Optional[Path]:
    groups = an.grouping.groups
    if an.command != "train" or all(len(r.evaluations) < 2 for g in groups for r in g.runs):
        return None
    shown = [m for m in an.metrics if m[0] in ("acc_t1", "acc_t2")]
    fig, canvas = _figure((5.0 * len(shown), 3.8))
    for j, (m, label, _) in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), j + 1)
        for g, color in zip(groups, _colors(len(groups))):
            series = [[(e.step, float(per_problem(e.rows, an.ids, m).mean())) for e in r.evaluations] for r in g.runs]
            steps, mean, low, high = _band(series)
            ax.plot(steps, 100 * mean, marker="o", color=color, label=f"{g.label} (n={len(g.runs)})")
            if len(g.runs) > 1:
                ax.fill_between(steps, 100 * low, 100 * high, color=color, alpha=0.2)
        ax.set_title(f"held-out {label}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("%")
        ax.legend(fontsize=8)
    fig.suptitle(f"held-out accuracy, {len(an.ids)} problems (band: 95% t-interval over seeds)", fontsize=10)
    fig.tight_layout()
    canvas.print_png(str(path))
    return path


def plot_training(an: Analysis, path: Path) -> Optional[Path]:
    groups = an.grouping.groups
    keys = {k for g in groups for r in g.runs for k in r.history}
    depths = sorted({int(k.split("/")[1][len("layer"):]) for k in keys})
    if not depths:
        return None
    names = [(m, label) for m, label in TRAIN_METRICS if any(k.endswith("/" + m) for k in keys)]
    fig, canvas = _figure((4.2 * len(depths), 2.8 * len(names)), dpi=80)
    longest = max(len(v) for g in groups for r in g.runs for v in r.history.values())
    window = max(1, round(longest / 15))
    for i, (m, label) in enumerate(names):
        for j, depth in enumerate(depths):
            ax = fig.add_subplot(len(names), len(depths), i * len(depths) + j + 1)
            key = f"train/layer{depth}/{m}"
            for g, color in zip(groups, _colors(len(groups))):
                series = [_smooth(r.history[key], window) for r in g.runs if r.history.get(key)]
                if not series:
                    continue
                steps, mean, low, high = _band(series)
                ax.plot(steps, mean, color=color, label=f"{g.label} (n={len(series)})", linewidth=1.2)
                if len(series) > 1:
                    ax.fill_between(steps, low, high, color=color, alpha=0.2)
            ax.set_title(f"layer {depth}: {label}", fontsize=9)
            ax.tick_params(labelsize=7)
            if i == len(names) - 1:
                ax.set_xlabel("step", fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    smoothing = f"moving mean over {window} steps" if window > 1 else "per step"
    fig.suptitle(f"training metrics ({smoothing}; band: 95% t-interval over seeds)", fontsize=10)
    fig.tight_layout()
    canvas.print_png(str(path))
    return path


def plot_transition_bars(an: Analysis, path: Path) -> Optional[Path]:
    import numpy as np

    if not an.transitions:
        return None
    groups = an.grouping.groups
    fig, canvas = _figure((max(6.0, 1.6 * len(TRANSITIONS) * max(1, len(groups)) / 2), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(groups)
    x = np.arange(len(TRANSITIONS))
    for k, (g, color) in enumerate(zip(groups, _colors(len(groups)))):
        ivs = [an.transitions[g.label][t] for t, _, _ in TRANSITIONS]
        means = np.array([iv.mean for iv in ivs]) * 100
        err = np.array([[iv.mean - iv.low, iv.high - iv.mean] if iv.defined else [0, 0] for iv in ivs]).T * 100
        bars = ax.bar(x + (k - (len(groups) - 1) / 2) * width, means, width, yerr=err, capsize=3, color=color,
                      label=f"{g.label} (n={len(g.runs)})")
        for bar, v in zip(bars, means):
            ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([label for _, label, _ in TRANSITIONS])
    ax.set_ylabel("% of problems")
    when = "after training" if an.command == "train" else "evaluation"
    ax.set_title(f"t1→t2 transitions {when}, {len(an.ids)} problems (bars: 95% CI)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    canvas.print_png(str(path))
    return path


# ---------------------------------------------------------------------------- documents

@dataclass
class Doc:
    """Report blocks rendered to Markdown and to self-contained HTML."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", header, rows))

    def img(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", path, caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"{'#' * b[1]} {b[2]}")
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {item}" for item in b[1]))
            elif b[0] == "table":
                out.append("\n".join(["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1])]
                                     + ["| " + " | ".join(row) + " |" for row in b[2]]))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1].name})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        e = html.escape
        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{_code(e(b[1]))}</p>")
            elif b[0] == "ul":
                body.append("<ul>" + "".join(f"<li>{_code(e(i))}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "table":
                head = "".join(f"<th>{e(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(b[1].read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{e(b[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{e(b[2])}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
                 "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
                 "code{background:#f4f4f4;padding:0 .2em}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _code(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def build_document(an: Analysis, runs: list[Run], excluded: list[tuple[str, str]], notes: list[str],
                   sources: Sequence[str], figures: list[tuple[Path, str]]) -> Doc:
    g = an.grouping
    doc = Doc()
    doc.h(1, "mgrpo report")
    doc.p(f"Read: {', '.join(f'`{s}`' for s in sources)}; {len(runs)} finished runs used"
          + (f", {len(excluded)} left out (listed at the end)." if excluded else "."))
    doc.h(2, "Verdicts")
    if an.comparisons:
        doc.p("Between groups, at the end:")
        doc.ul([c.line() for c in an.comparisons])
    if an.changes:
        doc.p("Within each group, end − start of training:")
        doc.ul([c.line() for c in an.changes])
    if not an.comparisons and not an.changes:
        doc.p("One group and no training curve: nothing to compare.")
    doc.h(2, "Settings")
    seeds = sorted({r.seed for r in runs})
    varying = "; ".join(f"`{k}` ({', '.join(dict.fromkeys(gr.values[i] for gr in g.groups))})"
                        for i, k in enumerate(g.keys)) or "none (one group)"
    items = [f"Groups by the keys that vary: {varying}. Replicate key: `{REPLICATE_KEY}` ({', '.join(map(str, seeds))}).",
             f"Overrides all runs share: {' '.join(f'`{s}`' for s in g.shared) or '(none)'}.",
             f"Problems: {len(an.ids)} ({runs[0].config.get('dataset.name', '?')}, split "
             f"{runs[0].config.get('eval.split', '?')})"
             + (f"; {an.dropped_problems} problems not in every run were left out." if an.dropped_problems else ".")]
    if an.command == "train":
        items.append(f"Start = the held-out evaluation at step {an.steps[0]} (before training); end = step {an.steps[1]}.")
    items.append("Group values: mean ± half-width of the 95% t-interval over the seeds (n given); a group with one "
                 "run: over its problems. Differences and end − start changes: mean of the per-problem paired "
                 "differences (same seed, same problem) with a 95% percentile bootstrap interval, seeds and problems "
                 "resampled independently (scipy.stats.bootstrap). A verdict says better/worse (or grew/fell) only "
                 "when the interval excludes 0. All numbers in points (%).")
    doc.ul(items)
    doc.h(2, "Groups")
    for gr in g.groups:
        n = len(gr.runs)
        doc.h(3, f"{gr.label} (n = {n} seed{'s' * (n != 1)}: {', '.join(map(str, gr.seeds))})")
        changes = {c.metric: c for c in an.changes if c.a == gr.label}
        header = ["metric", "start", "end"] if an.command == "train" else ["metric", "value"]
        if changes:
            header.append("end − start [95% CI]")
        rows = []
        for m, label, _ in an.metrics:
            row = [label, _pm(an.start[gr.label][m]), _pm(an.end[gr.label][m])] if an.command == "train" \
                else [label, _pm(an.end[gr.label][m])]
            if m in changes:
                d = changes[m].diff
                row.append(f"{_pts(d.mean)} [{_pts(d.low)}, {_pts(d.high)}]")
            rows.append(row)
        doc.table(header, rows)
    if an.comparisons:
        doc.h(2, "Paired differences at the end")
        titles = list(dict.fromkeys(c.title for c in an.comparisons))
        for title in titles:
            cs = [c for c in an.comparisons if c.title == title]
            doc.h(3, f"{title}: seeds {cs[0].n_seeds} × problems {cs[0].n_problems}")
            doc.table(["metric", cs[0].a, cs[0].b, f"{cs[0].b} − {cs[0].a} [95% CI]", "verdict"],
                      [[c.label, f"{100 * c.a_mean:.1f}", f"{100 * c.b_mean:.1f}",
                        f"{_pts(c.diff.mean)} [{_pts(c.diff.low)}, {_pts(c.diff.high)}]", c.verdict] for c in cs])
    if figures:
        doc.h(2, "Figures")
        for path, caption in figures:
            doc.img(path, caption)
    doc.h(2, "Runs")
    metrics = [m for m in an.metrics if m[0] in ("acc_t1", "acc_t2")]
    rows = []
    for gr in g.groups:
        for r in gr.runs:
            last = r.evaluations[-1]
            rows.append([_short_name(r.name), gr.label, str(r.seed), str(len(r.evaluations))]
                        + [f"{100 * float(per_problem(last.rows, an.ids, m).mean()):.1f}" for m, _, _ in metrics])
    doc.table(["run", "group", "seed", "evaluations"] + [f"end {label}" for _, label, _ in metrics], rows)
    if excluded:
        doc.h(2, "Left out")
        doc.ul([f"`{_short_name(n)}`: {reason}" for n, reason in excluded])
    doc.ul(notes)
    return doc


def _short_name(name: str) -> str:
    p = Path(name)
    return str(Path(p.parent.name) / p.name) if p.parent.name else name


# ---------------------------------------------------------------------------- MLflow output

def log_to_mlflow(runs: list[Run], files: list[Path]) -> Optional[str]:
    """Log the report's files to the runs' common parent run, or to a new ``report`` run in their
    experiment. Returns a line saying where, or None when the runs have no MLflow store."""
    refs = [r.mlflow for r in runs if r.mlflow is not None and r.mlflow.run_id]
    if not refs or len({ref.uri for ref in refs}) != 1:
        return None
    client = _client(refs[0].uri)
    parents = {ref.parent_id for ref in refs}
    if len(parents) == 1 and None not in parents and len(refs) == len(runs):
        target = parents.pop()
        where = f"parent run {target}"
    else:
        experiment = refs[0].experiment_id
        target = client.create_run(experiment, run_name=f"report-{time.strftime('%Y-%m-%d_%H-%M-%S')}",
                                   tags={"mgrpo.kind": "report"}).info.run_id
        client.log_text(target, "\n".join(r.name for r in runs), "report/runs.txt")
        where = f"new run {target}"
    for f in files:
        client.log_artifact(target, str(f), "report")
    if where.startswith("new"):
        client.set_terminated(target)
    return f"logged to MLflow ({refs[0].uri}): {where}, artifacts report/"


# ---------------------------------------------------------------------------- the command

@dataclass
class Report:
    out: Path
    files: list[Path]
    analysis: Analysis
    verdicts: list[str]
    mlflow: Optional[str]


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path('outputs') / 'mlflow.db').resolve()}"


def make_report(whats: Sequence[str], out: Optional[Path] = None, tracking_uri: Optional[str] = None,
                log_mlflow: bool = True, n_resamples: int = 10_000) -> Report:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with tempfile.TemporaryDirectory() as tmp:
        runs, excluded, notes = load_runs(whats, tracking_uri or default_tracking_uri(), Path(tmp))
        with Progress(TextColumn("[bold]report: intervals"), BarColumn(), MofNCompleteColumn(),
                      transient=True) as bar:
            def progress(total: int):
                task = bar.add_task("intervals", total=total)
                return lambda: bar.advance(task)

            analysis = analyse(runs, n_resamples, progress)
        if out is None:
            single = len(whats) == 1 and Path(whats[0]).is_dir()
            out = Path(whats[0]) / "report" if single else Path("outputs") / "report" / time.strftime("%Y-%m-%d_%H-%M-%S")
        out.mkdir(parents=True, exist_ok=True)
        figures = []
        for plot, name, caption in (
                (plot_heldout, "heldout.png", "Held-out Acc@t1 and Acc@t2 over training steps"),
                (plot_training, "training.png", "Per-layer training metrics: reward, share of zero-variance groups "
                                                "(reward vanishing), KL, completion length"),
                (plot_transition_bars, "transitions.png", "t1→t2 transitions per group")):
            path = plot(analysis, out / name)
            if path is not None:
                figures.append((path, caption))
        doc = build_document(analysis, runs, excluded, notes, whats, figures)
        (out / "report.md").write_text(doc.markdown(), encoding="utf-8")
        (out / "report.html").write_text(doc.html("mgrpo report"), encoding="utf-8")
        verdicts = [c.line() for c in analysis.comparisons] + [c.line() for c in analysis.changes]
        (out / "report.json").write_text(json.dumps(_as_json(analysis), indent=1), encoding="utf-8")
        files = [out / "report.md", out / "report.html", out / "report.json"] + [p for p, _ in figures]
        where = log_to_mlflow(runs, files) if log_mlflow else None
        return Report(out, files, analysis, verdicts, where)


def _iv_json(iv: Interval) -> dict:
    return {"mean": iv.mean, "low": None if math.isnan(iv.low) else iv.low,
            "high": None if math.isnan(iv.high) else iv.high, "n": iv.n, "method": iv.method}


def _as_json(an: Analysis) -> dict:
    return {
        "keys": an.grouping.keys,
        "problems": len(an.ids),
        "groups": {g.label: {"seeds": g.seeds, "runs": [r.name for r in g.runs],
                             "start": {m: _iv_json(iv) for m, iv in an.start[g.label].items()},
                             "end": {m: _iv_json(iv) for m, iv in an.end[g.label].items()}}
                   for g in an.grouping.groups},
        "comparisons": [{"title": c.title, "metric": c.metric, "diff": _iv_json(c.diff), "verdict": c.verdict,
                         "line": c.line()} for c in an.comparisons],
        "changes": [{"group": c.a, "metric": c.metric, "diff": _iv_json(c.diff), "verdict": c.verdict,
                     "line": c.line()} for c in an.changes],
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mgrpo report",
        description="Compare the runs of a sweep: groups by the keys that vary, intervals over seeds and "
                    "problems, verdict lines; writes report.md, report.html and PNGs, and logs them to MLflow.")
    p.add_argument("what", nargs="+",
                   help="a multirun folder, run folders, an MLflow experiment name or MLflow run ids")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: <folder>/report for one folder, else outputs/report/<time>)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store for experiment names and run ids (default: $MLFLOW_TRACKING_URI or "
                        "sqlite:///outputs/mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    return p.parse_args(list(argv))


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.resamples < 100:
            raise ReportError(f"--resamples {args.resamples}: need at least 100 bootstrap resamples")
        report = make_report(args.what, out=args.out, tracking_uri=args.tracking_uri,
                             log_mlflow=not args.no_mlflow, n_resamples=args.resamples)
    except (ReportError, RowsError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    for line in report.verdicts:
        print(line)
    if report.mlflow:
        print(report.mlflow)
    print(f"report: {report.out / 'report.md'} (and report.html)")
