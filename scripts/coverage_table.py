"""The coverage table of docs/report.md: the report's interval against the crossed bootstrap it replaced.

    python scripts/coverage_table.py [--studies 2000] [--bootstrap-studies 400] [--bootstrap-seeds 10] [--resamples 1000]

Fabricated studies with a known truth (``mgrpo_cli.reporting.coverage``, its default model), 3, 5 and
10 seeds, Acc@t2 (a mean) and the fix rate (a rate). Prints a Markdown table: coverage of the 95%
interval (± 1 Monte-Carlo standard error) and the mean half-width, per method.
"""
from __future__ import annotations

import argparse
import sys
import time

from mgrpo_cli.reporting import coverage as cv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=2000, help="studies per cell, t-interval")
    p.add_argument("--bootstrap-studies", type=int, default=400, help="studies per cell, crossed bootstrap")
    p.add_argument("--bootstrap-seeds", type=int, nargs="+", default=[10],
                   help="seed counts at which to score the crossed bootstrap (slow: a bootstrap per study)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per study")
    args = p.parse_args(argv)
    model = cv.Model()
    probs = cv.problems(model)
    start = time.perf_counter()
    print("| metric | seeds | method | coverage of 95% interval | mean half-width (points) |")
    print("|---|---|---|---|---|")
    for metric, label in (("acc_t2", "Acc@t2 b − a"), ("fix_rate", "fix rate b − a")):
        truth = cv.truth(model, probs, metric)
        for n_seeds in (3, 5, 10):
            methods = [("t", "t over per-seed differences (report)", args.studies)]
            if n_seeds in args.bootstrap_seeds:
                methods.append(("crossed", "crossed bootstrap (before)", args.bootstrap_studies))
            for method, name, n in methods:
                c = cv.coverage(model, probs, truth, metric, n_seeds, n, method=method, n_resamples=args.resamples)
                print(f"| {label} | {n_seeds} | {name} | {100 * c.rate:.1f}% ± {100 * c.mc_se:.1f} ({n} studies) | "
                      f"{100 * c.mean_half_width:.1f} |", flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
