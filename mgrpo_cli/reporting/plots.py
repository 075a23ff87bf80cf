"""PNG figures for evaluation reports: self-correction transitions and accuracy by group.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so
they work headless and inside other processes' plotting state. matplotlib is imported lazily.
Left out: interactive display and styling beyond readable defaults.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Union

log = logging.getLogger(__name__)

TRANSITIONS = (
    ("rr", "right→right", "#4c9a5b"),
    ("wr", "wrong→right", "#7fc97f"),
    ("rw", "right→wrong", "#e0655a"),
    ("ww", "wrong→wrong", "#9e9e9e"),
)


def plot_transitions(sc: dict[str, Any], path: Union[str, Path]) -> Path:
    """Bar chart of the four t1→t2 transition shares of ``metrics.self_correction`` output."""
    missing = [k for k in ("rr", "wr", "rw", "ww", "acc_t1", "acc_t2") if k not in sc]
    if missing:
        raise ValueError(f"plot_transitions: self-correction dict lacks {missing}; got keys {sorted(sc)}")
    fig, canvas = _figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    shares = [float(sc[key]) for key, _, _ in TRANSITIONS]
    bars = ax.bar([label for _, label, _ in TRANSITIONS], shares, color=[c for _, _, c in TRANSITIONS])
    n = sc.get("n")
    for bar, share in zip(bars, shares):
        text = f"{share:.1%}" + (f"\n({round(share * n)})" if n else "")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, max(1.0, max(shares) * 1.15))
    ax.set_ylabel("share of problems")
    delta = float(sc["acc_t2"]) - float(sc["acc_t1"]) if "delta" not in sc else float(sc["delta"])
    title = f"Acc@t1 {float(sc['acc_t1']):.1%} → Acc@t2 {float(sc['acc_t2']):.1%} (Δ {delta:+.1%})"
    ax.set_title(title + (f", n={n}" if n else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, canvas, path)


def plot_breakdown(breakdowns: dict[str, dict], path: Union[str, Path], title: str) -> Path:
    """Accuracy by group, one subplot per breakdown (``{"level": metrics.breakdown(...), ...}``)."""
    if not breakdowns:
        raise ValueError("plot_breakdown: no breakdowns to plot")
    widths = [max(2.5, 0.6 * len(groups) + 1.0) for groups in breakdowns.values()]
    fig, canvas = _figure(figsize=(sum(widths), 4.5))
    grid = fig.add_gridspec(1, len(breakdowns), width_ratios=widths)
    for i, (key, groups) in enumerate(breakdowns.items()):
        ax = fig.add_subplot(grid[0, i])
        names = list(groups)
        accs = [float(groups[g]["acc"]) for g in names]
        bars = ax.bar(range(len(names)), accs, color="#5b8cc4")
        for bar, g in zip(bars, names):
            ax.annotate(f"n={groups[g]['n']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([_short(g) for g in names], rotation=45 if len(names) > 4 else 0,
                           ha="right" if len(names) > 4 else "center", fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_xlabel(key)
        if i == 0:
            ax.set_ylabel("accuracy")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, canvas, path)


def _figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    return fig, FigureCanvasAgg(fig)


def _save(fig: Any, canvas: Any, path: Union[str, Path]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.print_png(str(out))
    log.info("wrote %s", out)
    return out


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"
