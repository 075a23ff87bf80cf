"""A report's document: Markdown and self-contained HTML (PNGs inlined) from one list of blocks."""
from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mgrpo_cli.reporting.analysis import ESTIMAND, Analysis, per_problem, pm, pts, vanishing_keys, vanishing_label
from mgrpo_cli.reporting.load import REPLICATE_KEY, Run


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


def _duplicates(an: Analysis) -> list[tuple[str, str]]:
    labels = dict((m, lab) for m, lab, _ in an.metrics)
    return sorted({(labels[c.metric], labels[c.duplicate_of]) for c in an.comparisons if c.role == "duplicate"})


def build_document(an: Analysis, runs: list[Run], excluded: list[tuple[str, str]], notes: list[str],
                   sources: Sequence[str], figures: list[tuple[Path, str]], warnings: Sequence[str] = (),
                   provenance: Optional[dict] = None, recheck: Optional[dict] = None) -> Doc:
    g = an.grouping
    doc = Doc()
    doc.h(1, "mgrpo report")
    doc.p(f"Read: {', '.join(f'`{s}`' for s in sources)}; {len(runs)} finished runs used"
          + (f", {len(excluded)} left out (listed at the end)." if excluded else "."))
    doc.h(2, "Verdicts")
    for line in warnings:
        doc.p(f"**{line}**")
    label = dict((m, lab) for m, lab, _ in an.metrics)[an.primary]
    if an.primaries:
        where = "at the end of training" if an.command == "train" else "of the evaluations"
        doc.p(f"Primary endpoint: {label} {where} (`--primary {an.primary}`), its verdict at 95%"
              + (f", Holm-adjusted over the {len(an.primaries)} pairs" if len(an.primaries) > 1 else "") + ". "
              f"Estimand: {ESTIMAND}.")
        items = []
        for c in an.primaries:
            items.append(c.line())
            if c.population is not None and c.population.defined:
                items.append(f"with the problems random too (another draw of {c.n_problems} problems from the same "
                             f"source; two-way random effects, secondary reading): {pts(c.population.mean)} "
                             f"[{pts(c.population.low)}, {pts(c.population.high)}] points")
        doc.ul(items)
    if an.secondaries:
        doc.p(f"Secondary, between groups at the end: 95% intervals, verdicts Holm-adjusted over these "
              f"{len(an.secondaries)} comparisons"
              + (" (" + "; ".join(f"{m} counts the same problems as the {d}, so its verdict is the {d}'s"
                                  for m, d in _duplicates(an)) + ")" if _duplicates(an) else "") + ":")
        doc.ul([c.line() for c in an.secondaries])
    changes = [c for c in an.changes if c.role != "duplicate"]
    if changes:
        doc.p(f"Within each group, end − start of training: verdicts Holm-adjusted over these {len(changes)} changes:")
        doc.ul([c.line() for c in changes])
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
    items.append("Group values: the mean over seeds of each seed's value (its mean over the problems, or its rate) ± "
                 "the half-width of the 95% t-interval over the seeds (n given). Differences and end − start changes: "
                 "the mean of the per-seed paired differences (same seed, same problems) with the 95% t-interval "
                 "over seeds. A group with one run: over its problems (a t-interval; differences and rates: the "
                 "percentile bootstrap over problems). A verdict says better/worse (or grew/fell) only when the "
                 "interval excludes 0 (the primary endpoint) or the Holm-adjusted p-value is below 0.05 (the "
                 "others). All numbers in points (%).")
    if any(m == "fix_rate" for m, _, _ in an.metrics):
        items.append("fix rate = share of the t1-wrong problems right at t2; break rate = share of the t1-right "
                     "problems wrong at t2 (per seed, then the mean over seeds); Δi→c and Δc→i are the same counts "
                     "over all problems. answer changed = share of the problems whose final answer at t2 differs "
                     "from t1's (a model that learned to repeat itself changes none).")
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
            row = [label, pm(an.start[gr.label][m]), pm(an.end[gr.label][m])] if an.command == "train" \
                else [label, pm(an.end[gr.label][m])]
            if m in changes:
                d = changes[m].diff
                row.append(f"{pts(d.mean)} [{pts(d.low)}, {pts(d.high)}]")
            rows.append(row)
        doc.table(header, rows)
    if an.comparisons:
        doc.h(2, "Paired differences at the end")
        titles = list(dict.fromkeys(c.title for c in an.comparisons))
        for title in titles:
            cs = [c for c in an.comparisons if c.title == title]
            doc.h(3, f"{title}: seeds {cs[0].n_seeds} × problems {cs[0].n_problems}")
            doc.table(["metric", cs[0].a, cs[0].b, f"{cs[0].b} − {cs[0].a} [95% CI]", "verdict",
                       "sd over seeds", "seeds for ±3"],
                      [[c.label, f"{100 * c.a_mean:.1f}", f"{100 * c.b_mean:.1f}",
                        f"{pts(c.diff.mean)} [{pts(c.diff.low)}, {pts(c.diff.high)}]", c.verdict,
                        "—" if math.isnan(c.seed_sd) else f"{100 * c.seed_sd:.1f}",
                        str(c.seeds_for() or "—")] for c in cs])
        doc.p("sd over seeds: the sample standard deviation of the per-seed difference (b − a on each seed's "
              "problems); seeds for ±3: the smallest n with t(0.975, n − 1) · sd / √n ≤ 3 points, the seeds per "
              "group the report's 95% interval of ±3 points needs, from the spread measured here.")
    if an.vanishing:
        doc.h(2, "Reward vanishing")
        doc.p("From each run's per-step training metrics: a zero-variance group has all rewards equal, so all its "
              "advantages are 0 and it adds nothing to the reward's gradient; a step with no usable group in any "
              "layer trains on nothing but the KL term. Mean ± half-width of the 95% t-interval over seeds; "
              "differences paired by seed (t-interval). In points (%).")
        labels = list(an.vanishing)
        keys = vanishing_keys(an.vanishing)
        doc.table(["measure"] + [f"{g} (n = {next(iter(an.vanishing[g].values())).n})" for g in labels],
                  [[vanishing_label(k)] + [pm(an.vanishing[g][k]) if k in an.vanishing[g] else "—" for g in labels]
                   for k in keys])
        doc.ul([c.line() for c in an.vanishing_comparisons])
    if figures:
        doc.h(2, "Figures")
        for path, caption in figures:
            doc.img(path, caption)
    if provenance is not None:
        doc.h(2, "Provenance")
        doc.p("What made the runs, as each recorded it when it started (commit of the source checkout, whether it "
              "had uncommitted changes, package versions), with the sweep's command and each run's overrides: "
              "`report.json` → `provenance`.")
        if provenance["sweep_commands"]:
            doc.ul([f"`{c}`" for c in provenance["sweep_commands"]])
        entries = provenance["runs"]
        packages = {json.dumps(e["packages"], sort_keys=True) for e in entries if e["recorded"]}
        if len(packages) == 1:
            doc.p("Packages (every run): " + ", ".join(f"{k} {v}" for k, v in json.loads(packages.pop()).items())
                  + f"; Python {entries[0]['python']}.")
        doc.table(["run", "group", "seed", "started (UTC)", "commit", "dirty"],
                  [[_short_name(e["run"]), str(e["group"]), str(e["seed"]), str(e["started"]),
                    (e["commit"] or "—")[:10] if e["recorded"] else "not recorded",
                    "—" if e["dirty"] is None else ("yes" if e["dirty"] else "no")] for e in entries])
    if recheck is not None:
        doc.h(2, "Re-check files")
        doc.p(f"Per group, the seeds × problems 0/1 matrices the intervals come from ({recheck['format']}): "
              + "; ".join(f"{g}: " + ", ".join(f"`{f}`" for moment in files.values() for f in moment.values())
                          for g, files in recheck["files"].items())
              + ". `python scripts/recheck.py <this folder>` recomputes the primary interval from them alone "
              "(docs/report.md shows the same in a few lines of numpy).")
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
