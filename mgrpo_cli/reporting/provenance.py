"""What a training run was made with, recorded when it starts.

``capture()`` = the commit of the package's source checkout (``commit``; null when the package is
not run from a git checkout, e.g. an installed wheel), whether that checkout had changes not
committed (``dirty``: ``git status --porcelain`` not empty), the versions of the packages that shape
the numbers (``packages``) and Python's. ``mgrpo train`` writes it into ``<run>/provenance.json`` at
the start of every job (a resumed run's later legs go under ``"resumes"``) and, on the run's first
leg, as MLflow tags ``provenance.commit``, ``provenance.dirty`` and ``provenance.packages`` (JSON).
``mgrpo report`` gathers the files per run and warns when compared runs differ in them.
"""
from __future__ import annotations

import json
import platform
import subprocess
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
    now = capture()
    path = Path(folder) / FILE
    previous = read(folder)
    if previous is None:
        data = {**now, "resumes": []}
        if run_logger is not None:
            run_logger.set_tags({"provenance.commit": str(now["commit"]), "provenance.dirty": str(now["dirty"]),
                                 "provenance.packages": json.dumps(now["packages"], sort_keys=True)})
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
