"""The primary interval of a study reported before it existed, recomputed from its per-seed table.

    python scripts/old_study_intervals.py docs/study-mgrpo-vs-grpo docs/study-vanishing docs/study-weak-warmstart

Reads the ``## Runs`` table of each folder's ``report.md`` (one row per run: group, seed, end Acc@t1,
end Acc@t2, to 0.1 point: exact for 200 problems) and the crossed-bootstrap interval its
``report.json`` gave. Prints a Markdown table: per study and metric, the old interval and the
t-interval over the per-seed paired differences (``docs/report.md``), with both verdicts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from study_table import runs_table, t_over_seeds  # scripts/ is on the path when run as a script


def _ci(mean: float, low: float, high: float) -> str:
    return f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def _verdict(low: float, high: float) -> str:
    return "excludes 0" if low > 0 or high < 0 else "includes 0"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path)
    args = p.parse_args(argv)
    print("| study | metric | seeds | crossed bootstrap (as reported) | t over per-seed differences (now) | sd of the per-seed difference |")
    print("|---|---|---|---|---|---|")
    for folder in args.folders:
        report = json.loads((folder / "report.json").read_text())
        rows = runs_table((folder / "report.md").read_text())
        for metric, column in (("acc_t2", "end Acc@t2"), ("acc_t1", "end Acc@t1")):
            old = next(c for c in report["comparisons"] if c["metric"] == metric)
            b, a = old["title"].split(" (")[0].split(" − ")
            by = {g: {int(r["seed"]): float(r[column]) / 100 for r in rows if r["group"] == g} for g in (a, b)}
            seeds = sorted(set(by[a]) & set(by[b]))
            d = [by[b][s] - by[a][s] for s in seeds]
            mean, low, high = t_over_seeds(d)
            sd = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5
            o = old["diff"]
            print(f"| {folder.name.removeprefix('study-')} | {b} − {a} {column.removeprefix('end ')} | {len(d)} | "
                  f"{_ci(o['mean'], o['low'], o['high'])}: {_verdict(o['low'], o['high'])} | "
                  f"{_ci(mean, low, high)}: {_verdict(low, high)} | {100 * sd:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
