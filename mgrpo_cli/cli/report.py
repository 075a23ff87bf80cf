"""``mgrpo report <what>...``: turn a sweep into a comparison with confidence intervals.

``<what>`` is a multirun folder (or one run folder), an MLflow experiment name or an MLflow run id;
several may be given. The runs are read (``reporting.load``), grouped and compared
(``reporting.analysis``), drawn (``reporting.figures``) and written (``reporting.document``).
Outputs: ``report.md``, a self-contained ``report.html`` (PNGs inlined), the PNGs,
``report.json`` (with what made each run: ``reporting.provenance``) and the re-check matrices
(``reporting.recheck``), written to ``--out`` and logged to MLflow (as artifacts of the sweep's parent run
when all runs have one, else of a new run tagged ``mgrpo.kind=report``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mgrpo_cli.errors import EXIT_USER_ERROR
from mgrpo_cli.reporting import provenance, recheck, tracking
from mgrpo_cli.reporting.analysis import METRICS, PRIMARY, Analysis, analyse, as_json
from mgrpo_cli.reporting.document import build_document
from mgrpo_cli.reporting.figures import plot_heldout, plot_training, plot_transition_bars, plot_vanishing
from mgrpo_cli.reporting.heldout import RowsError
from mgrpo_cli.reporting.load import ReportError, Run, load_runs

# ---------------------------------------------------------------------------- MLflow output

def log_to_mlflow(runs: list[Run], files: list[Path]) -> Optional[str]:
    """Log the report's files to the runs' common parent run, or to a new ``report`` run in their
    experiment. Returns a line saying where, or None when the runs have no MLflow store."""
    refs = [r.mlflow for r in runs if r.mlflow is not None and r.mlflow.run_id]
    if not refs or len({ref.uri for ref in refs}) != 1:
        return None
    client = tracking.client(refs[0].uri)
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
        client.log_artifact(target, str(f), "report/recheck" if f.parent.name == recheck.FOLDER else "report")
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
    warnings: list[str]


def make_report(whats: Sequence[str], out: Optional[Path] = None, tracking_uri: Optional[str] = None,
                log_mlflow: bool = True, n_resamples: int = 10_000, primary: str = PRIMARY) -> Report:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with tempfile.TemporaryDirectory() as tmp:
        runs, excluded, notes = load_runs(whats, tracking_uri or tracking.default_tracking_uri(), Path(tmp))
        with Progress(TextColumn("[bold]report: intervals"), BarColumn(), MofNCompleteColumn(),
                      transient=True) as bar:
            def progress(total: int):
                task = bar.add_task("intervals", total=total)
                return lambda: bar.advance(task)

            analysis = analyse(runs, n_resamples, progress, primary=primary)
        if out is None:
            single = len(whats) == 1 and Path(whats[0]).is_dir()
            out = Path(whats[0]) / "report" if single else Path("outputs") / "report" / time.strftime("%Y-%m-%d_%H-%M-%S")
        out.mkdir(parents=True, exist_ok=True)
        figures = []
        for plot, name, caption in (
                (plot_heldout, "heldout.png", "Held-out Acc@t1 and Acc@t2 over training steps"),
                (plot_training, "training.png", "Per-layer training metrics: reward, share of zero-variance groups "
                                                "(reward vanishing), KL, completion length"),
                (plot_transition_bars, "transitions.png", "t1→t2 transitions per group"),
                (plot_vanishing, "vanishing.png", "Reward vanishing: zero-variance groups per layer, steps without "
                                                  "a usable group")):
            path = plot(analysis, out / name)
            if path is not None:
                figures.append((path, caption))
        group_of = {r.name: g.label for g in analysis.grouping.groups for r in g.runs}
        made = provenance.gather(runs, group_of)
        compared = [r for r in runs if r.name in group_of]
        warnings = [w for w in [provenance.difference_warning(provenance.gather(compared, group_of))] if w]
        warnings += provenance.order_warnings(analysis.grouping)
        matrices = recheck.write(analysis, out)
        doc = build_document(analysis, runs, excluded, notes, whats, figures, warnings, made, matrices)
        (out / "report.md").write_text(doc.markdown(), encoding="utf-8")
        (out / "report.html").write_text(doc.html("mgrpo report"), encoding="utf-8")
        verdicts = [c.line() for c in analysis.primaries + analysis.secondaries]
        verdicts += [c.line() for c in analysis.changes if c.role != "duplicate"]
        saved = {**as_json(analysis), "provenance": {**made, "warnings": warnings}, "recheck": matrices}
        (out / "report.json").write_text(json.dumps(saved, indent=1), encoding="utf-8")
        files = [out / "report.md", out / "report.html", out / "report.json"] + [p for p, _ in figures]
        files += sorted((out / recheck.FOLDER).glob("*.csv"))
        where = log_to_mlflow(runs, files) if log_mlflow else None
        return Report(out, files, analysis, verdicts, where, warnings)


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
                   help="MLflow store for experiment names and run ids (default: sqlite:///outputs/mlflow.db, "
                        "where runs with logger.tracking_uri=null log)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    p.add_argument("--resamples", type=int, default=10_000,
                   help="bootstrap resamples, for groups of one run (default 10000)")
    p.add_argument("--primary", default=PRIMARY, choices=[m for m, _, _ in METRICS],
                   help=f"the primary endpoint: its verdict alone at 95%%, the others Holm-adjusted (default {PRIMARY})")
    return p.parse_args(list(argv))


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.resamples < 100:
            raise ReportError(f"--resamples {args.resamples}: need at least 100 bootstrap resamples")
        report = make_report(args.what, out=args.out, tracking_uri=args.tracking_uri,
                             log_mlflow=not args.no_mlflow, n_resamples=args.resamples, primary=args.primary)
    except (ReportError, RowsError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    for line in report.warnings:
        print(line, file=sys.stderr)
    for line in report.verdicts:
        print(line)
    if report.mlflow:
        print(report.mlflow)
    print(f"report: {report.out / 'report.md'} (and report.html)")
