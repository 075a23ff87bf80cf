"""The report's re-check files: the data its intervals come from, in plain CSV.

Per group, and per evaluation (``start``: before training, ``end``: after it; an ``mgrpo eval``
report has ``end`` only), three seeds × problems matrices of 0/1:
``recheck/<group>.<start|end>.<t1|t2|changed>.csv`` = the first answer right (t1), the
self-correction right (t2), the final answer changed from t1 to t2 (changed). Each file's header is
``seed,<problem id>,...`` (the same problems in the same order in every file) and each row one seed.
``report.json``'s ``recheck`` block maps each group to its files; ``scripts/recheck.py <report folder>``
(or the snippet in ``docs/report.md``) recomputes the primary interval from them alone.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from mgrpo_cli.reporting.analysis import Analysis, per_problem

FOLDER = "recheck"
MATRICES = (("t1", "acc_t1"), ("t2", "acc_t2"), ("changed", "changed"))


def file_stem(label: str, taken: set[str]) -> str:
    """A file-name-safe stem for a group label, distinct from those in ``taken``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_.") or "group"
    unique, n = stem, 1
    while unique in taken:
        n += 1
        unique = f"{stem}_{n}"
    taken.add(unique)
    return unique


def write(an: Analysis, out: Path) -> dict:
    """Write the matrices under ``out/recheck/``; returns report.json's ``recheck`` block."""
    folder = out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.csv"):  # a report written again into the same folder
        old.unlink()
    has_t2 = any(m == "acc_t2" for m, _, _ in an.metrics)
    taken: set[str] = set()
    files: dict[str, dict[str, dict[str, str]]] = {}
    for g in an.grouping.groups:
        stem = file_stem(g.label, taken)
        moments = {"end": [r.evaluations[-1] for r in g.runs]}
        if an.command == "train":
            moments = {"start": [r.evaluations[0] for r in g.runs], **moments}
        files[g.label] = {}
        for when, evals in moments.items():
            files[g.label][when] = {}
            for name, metric in MATRICES:
                if metric != "acc_t1" and not has_t2:
                    continue
                matrix = np.stack([per_problem(e.rows, an.ids, metric) for e in evals]).astype(int)
                path = folder / f"{stem}.{when}.{name}.csv"
                with path.open("w", newline="", encoding="utf-8") as f:
                    writer = csv.writer(f, lineterminator="\n")
                    writer.writerow(["seed", *an.ids])
                    writer.writerows([r.seed, *row] for r, row in zip(g.runs, matrix.tolist(), strict=True))
                files[g.label][when][name] = f"{FOLDER}/{path.name}"
    return {"format": "CSV: header seed,<problem id>,...; one row per seed; 1 = right (t1, t2) or changed",
            "files": files}
