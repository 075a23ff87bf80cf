"""Per-problem results of one evaluation: the artifact format, written by train and read by report.

One JSON object per line and per problem::

    {"id": "arith-test-17", "t1": true, "t2": false, "t1_answer": "14", "t2_answer": "15"}

``t1``/``t2`` are the verdicts of the first answer and of the self-correction pass (``t2`` is null
when the evaluation has no second pass); the answers are the extracted final answers (null when
none was found). ``mgrpo train`` writes one file per held-out evaluation,
``<run>/heldout/step_<global step, 6 digits>.jsonl`` (step 0 = before training, the last = after),
with the evaluation's scores (``val/*`` without the prefix) beside it in ``step_<n>.json``
(:func:`write_scores`, written first: the rows file marks a finished evaluation), and ``mgrpo eval`` keeps its richer ``problems.jsonl`` (``correct`` = per-sample verdicts, the first
one is t1; ``t2_correct``, ``answers``, ``t2_answer``), which :func:`read_rows` reads as well.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

FOLDER = "heldout"
_STEP_FILE = re.compile(r"^step_(\d+)\.jsonl$")


class RowsError(ValueError):
    """A per-problem file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class ProblemResult:
    id: str
    t1: bool
    t2: Optional[bool]
    t1_answer: Optional[str] = None
    t2_answer: Optional[str] = None

    def to_json(self) -> dict:
        return {"id": self.id, "t1": self.t1, "t2": self.t2, "t1_answer": self.t1_answer,
                "t2_answer": self.t2_answer}


def step_file(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / FOLDER / f"step_{int(step):06d}.jsonl"


def step_of(path: str | Path) -> Optional[int]:
    """The global step of a ``step_<n>.jsonl`` file name, else None."""
    m = _STEP_FILE.match(Path(path).name)
    return int(m.group(1)) if m else None


def write_rows(path: str | Path, rows: list[ProblemResult]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    tmp.replace(out)  # a reader never sees half a file
    return out


def scores_file(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / FOLDER / f"step_{int(step):06d}.json"


def write_scores(run_dir: str | Path, step: int, scores: dict[str, float]) -> Path:
    """An evaluation's scores at ``step`` to ``heldout/step_<n>.json``, whole or not at all."""
    out = scores_file(run_dir, step)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(scores, indent=1))
    tmp.replace(out)
    return out


def read_scores(run_dir: str | Path, up_to: Optional[int] = None) -> dict[int, dict[str, float]]:
    """Every evaluation's scores of a run folder by step (those at steps <= ``up_to``, when given)."""
    out: dict[int, dict[str, float]] = {}
    for path in sorted((Path(run_dir) / FOLDER).glob("step_*.json")):
        m = re.match(r"^step_(\d+)\.json$", path.name)
        if m and (up_to is None or int(m.group(1)) <= up_to):
            out[int(m.group(1))] = json.loads(path.read_text())
    return out


def read_rows(path: str | Path) -> list[ProblemResult]:
    """Rows of a ``heldout/step_*.jsonl`` file or of ``mgrpo eval``'s ``problems.jsonl``."""
    from mgrpo_cli.data.loaders import json_lines

    p = Path(path)
    rows: list[ProblemResult] = []
    seen: set[str] = set()
    if not p.is_file():
        raise RowsError(f"{p}: cannot read (no such file)")
    for line_no, obj in json_lines(p, RowsError):
        if "id" not in obj:
            raise RowsError(f"{p}:{line_no}: expected an object with an 'id'")
        if "t1" in obj:
            t1, t2, a1, a2 = obj["t1"], obj.get("t2"), obj.get("t1_answer"), obj.get("t2_answer")
        elif isinstance(obj.get("correct"), list) and obj["correct"]:
            answers = obj.get("answers") or [None]
            t1, t2, a1, a2 = obj["correct"][0], obj.get("t2_correct"), answers[0], obj.get("t2_answer")
        else:
            raise RowsError(f"{p}:{line_no}: no verdict: expected 't1' (held-out rows) or 'correct' (eval rows)")
        pid = str(obj["id"])
        if pid in seen:
            raise RowsError(f"{p}:{line_no}: problem id {pid!r} appears twice")
        seen.add(pid)
        rows.append(ProblemResult(pid, bool(t1), None if t2 is None else bool(t2),
                                  None if a1 is None else str(a1), None if a2 is None else str(a2)))
    return rows
