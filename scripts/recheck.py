"""Recompute a report's primary interval from its re-check files alone (numpy and scipy, no mgrpo).

    python scripts/recheck.py docs/study-nocorr

Reads ``report.json`` only for which metric is primary, which two groups it compares and where their
CSV matrices are (``recheck/<group>.end.<t1|t2|changed>.csv``: one row per seed, one column per
problem, 0/1). Per seed: the metric on that seed's problems (a mean, or a rate's ratio of sums); the
interval: Student's t over the per-seed paired differences (b − a, same seed). Prints it and the
report's, and exits 1 when they differ.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats


def load(folder: Path, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(seeds, seeds × problems 0/1 matrix) of one CSV."""
    data = np.loadtxt(folder / path, delimiter=",", skiprows=1, ndmin=2)
    return data[:, 0].astype(int), data[:, 1:]


def per_seed(t1: np.ndarray, t2: np.ndarray, changed: np.ndarray, metric: str) -> np.ndarray:
    if metric in ("acc_t1", "changed"):
        return (t1 if metric == "acc_t1" else changed).mean(axis=1)
    means = {"acc_t2": t2, "delta": t2 - t1, "delta_i2c": (1 - t1) * t2, "delta_c2i": t1 * (1 - t2)}
    if metric in means:
        return means[metric].mean(axis=1)
    num, den = {"fix_rate": ((1 - t1) * t2, 1 - t1), "break_rate": (t1 * (1 - t2), t1)}[metric]
    with np.errstate(invalid="ignore", divide="ignore"):
        return num.sum(axis=1) / den.sum(axis=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="a report folder (report.json and recheck/)")
    folder = p.parse_args(argv).folder
    report = json.loads((folder / "report.json").read_text())
    metric, files = report["primary"]["metric"], report["recheck"]["files"]
    status = 0
    for c in report["primary"]["comparisons"]:
        values = {}
        for group in (c["a"], c["b"]):
            loaded = {name: load(folder, path) for name, path in files[group]["end"].items()}
            seeds = loaded["t1"][0]
            t2 = loaded["t2"][1] if "t2" in loaded else None
            changed = loaded["changed"][1] if "changed" in loaded else None
            values[group] = dict(zip(seeds.tolist(), per_seed(loaded["t1"][1], t2, changed, metric), strict=True))
        seeds = sorted(set(values[c["a"]]) & set(values[c["b"]]))
        d = np.array([values[c["b"]][s] - values[c["a"]][s] for s in seeds])
        d = d[~np.isnan(d)]
        if d.size < 2:
            print(f"{c['title']}: {d.size} seed(s): the report's interval is over problems, not re-checked here")
            continue
        mean, sem = float(d.mean()), float(stats.sem(d))
        low, high = stats.t.interval(0.95, d.size - 1, loc=mean, scale=sem) if sem > 0 else (mean, mean)
        r = c["diff"]
        same = all(abs(x - y) < 1e-9 for x, y in ((mean, r["mean"]), (low, r["low"]), (high, r["high"])))
        print(f"{c['title']}, {metric}: recomputed {100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] points "
              f"over {d.size} seeds; report.json {100 * r['mean']:+.2f} [{100 * r['low']:+.2f}, {100 * r['high']:+.2f}]: "
              + ("the same" if same else "DIFFERENT"))
        status |= 0 if same else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
