"""What a training run was made with, recorded when it starts.

``capture()`` = the commit of the package's source checkout (``commit``; null when the package is
not run from a git checkout, e.g. an installed wheel), whether that checkout had changes not
committed (``dirty``: ``git status --porcelain`` not empty), the versions of the packages that shape
the numbers (``packages``) and Python's. ``mgrpo train`` writes it, with the job's start time
(``started``, epoch seconds), into ``<run>/provenance.json`` at the start of every job (a resumed
run's later legs go under ``"resumes"``) and, on the run's first leg, as MLflow tags
``provenance.commit``, ``provenance.dirty``, ``provenance.packages`` (JSON) and ``provenance.python``.

``mgrpo report`` gathers them per run with each run's overrides and the sweep's command
(:func:`gather`), and warns in one line when the compared runs differ in them (:func:`difference_warning`)
or when a compared key is confounded with the runs' start times (:func:`order_warnings`).
"""
from __future__ import annotations

import json
import platform
import subprocess
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

FILE = "provenance.json"
# the distributions whose versions can change a run's numbers ("mgrpo" is the package itself)
PACKAGES = ("mgrpo", "torch", "transformers", "lightning", "numpy", "hydra-core", "peft", "vllm", "mlflow")
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding mgrpo_cli/


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def capture(root: Path = SOURCE_ROOT) -> dict[str, Any]:
    """The provenance of code run from ``root`` (see the module docstring)."""
    commit = dirty = None
    top = _git(root, "rev-parse", "--show-toplevel")
    # only the checkout whose top is ``root``: an installed package inside some other repository is not it
    if top is not None and Path(top).resolve() == root.resolve():
        commit = _git(root, "rev-parse", "HEAD")
        status = _git(root, "status", "--porcelain")
        dirty = None if status is None else bool(status)
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"commit": commit, "dirty": dirty, "packages": packages, "python": platform.python_version()}


def record(folder: Path, run_logger=None) -> dict[str, Any]:
    """Write this job's provenance into ``<folder>/provenance.json`` (under ``"resumes"`` when the
    file is there: a resumed run) and, on a first leg, as the MLflow run's ``provenance.*`` tags."""
    now = {**capture(), "started": time.time()}
    path = Path(folder) / FILE
    previous = read(folder)
    if previous is None:
        data = {**now, "resumes": []}
        if run_logger is not None:
            run_logger.set_tags({"provenance.commit": str(now["commit"]), "provenance.dirty": str(now["dirty"]),
                                 "provenance.packages": json.dumps(now["packages"], sort_keys=True),
                                 "provenance.python": now["python"]})
    else:
        data = {**previous, "resumes": [*previous.get("resumes", []), now]}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


def read(folder: Path) -> Optional[dict[str, Any]]:
    """A run folder's ``provenance.json``, or None when it has none (a run made before it was recorded)."""
    try:
        data = json.loads((Path(folder) / FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def from_tags(tags: dict[str, str]) -> Optional[dict[str, Any]]:
    """The provenance of an MLflow run from its ``provenance.*`` tags (None when it has none)."""
    if "provenance.commit" not in tags:
        return None
    commit = tags["provenance.commit"]
    return {"commit": None if commit == "None" else commit,
            "dirty": {"True": True, "False": False}.get(tags.get("provenance.dirty", "None")),
            "packages": json.loads(tags.get("provenance.packages", "{}")), "python": tags.get("provenance.python")}


def gather(runs, group_of: dict[str, str]) -> dict[str, Any]:
    """The report's provenance block: the sweeps' commands and, per run (``load.Run``), its group,
    seed, start time, overrides and what made it."""
    entries = []
    for r in sorted(runs, key=lambda r: (r.started or 0, r.name)):
        p = r.provenance or {}
        entries.append({"run": r.name, "group": group_of.get(r.name), "seed": r.seed,
                        "started": None if r.started is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.started)),
                        "overrides": r.overrides, "commit": p.get("commit"), "dirty": p.get("dirty"),
                        "packages": p.get("packages"), "python": p.get("python"), "recorded": bool(p),
                        "resumed_legs": len(p.get("resumes", []))})
    return {"sweep_commands": sorted({r.sweep_command for r in runs if r.sweep_command}), "runs": entries}


def _fields(entry: dict[str, Any]) -> dict[str, str]:
    if not entry["recorded"]:
        return {"provenance": "not recorded"}
    out = {"commit": (entry["commit"] or "no git checkout")[:10], "python": str(entry["python"])}
    out.update({name: version for name, version in (entry["packages"] or {}).items()})
    return out


def difference_warning(block: dict[str, Any]) -> Optional[str]:
    """One line naming what the compared runs differ in (commit, package versions, whether provenance
    was recorded) and how many were made from a checkout with uncommitted changes; None when nothing."""
    entries = block["runs"]
    fields = [_fields(e) for e in entries]
    names = sorted({k for f in fields for k in f})
    parts = []
    for name in names:
        counts = Counter(f.get(name, "absent") for f in fields)
        if len(counts) > 1:
            parts.append(f"{name} (" + ", ".join(f"{v} ×{n}" for v, n in counts.most_common()) + ")")
    dirty = sum(1 for e in entries if e["dirty"])
    if dirty:
        parts.append(f"{dirty} of {len(entries)} runs made from a checkout with uncommitted changes")
    if not parts:
        return None
    return "warning: the compared runs differ in what made them: " + "; ".join(parts)


def order_warnings(grouping) -> list[str]:
    """One line per compared key whose groups' runs started at separated times (every run of one
    group before every run of the other, or a Mann–Whitney test of the start times at p < 0.05): a
    difference between the groups may then be a difference between times (a machine's load, code
    or data changing between the halves of a sweep)."""
    from scipy import stats

    out = []
    for key, a, b in grouping.pairs:
        ta = [r.started for r in a.runs if r.started is not None]
        tb = [r.started for r in b.runs if r.started is not None]
        if len(ta) < 2 or len(tb) < 2:
            continue
        separated = max(ta) < min(tb) or max(tb) < min(ta)
        p = float(stats.mannwhitneyu(ta, tb, alternative="two-sided").pvalue)
        if not separated and p >= 0.05:
            continue
        first, then = (a, b) if sum(ta) / len(ta) < sum(tb) / len(tb) else (b, a)
        how = (f"every {first.label} run started before every {then.label} run" if separated
               else f"the {first.label} runs started earlier than the {then.label} runs")
        out.append(f"warning: `{key}` is confounded with the runs' start time: {how} (Mann–Whitney p = {p:.2g}, "
                   f"{len(ta)} and {len(tb)} runs); sweep `seed` first (`-m seed=0,1,... {key}=...`) so the "
                   "groups alternate within each seed")
    return out
