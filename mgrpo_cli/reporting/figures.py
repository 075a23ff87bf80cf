"""PNG figures: ``mgrpo eval``'s transitions and accuracy by group, and a report's held-out curves,
per-layer training metrics, transition bars and reward-vanishing bars.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so
they work headless and inside other processes' plotting state. matplotlib is imported lazily.
Left out: interactive display and styling beyond readable defaults.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

from mgrpo_cli.reporting.analysis import TRANSITIONS, Analysis, per_problem, vanishing_keys, vanishing_label
from mgrpo_cli.reporting.load import TRAIN_METRICS
from mgrpo_cli.reporting.stats import t_interval

log = logging.getLogger(__name__)


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
    for bar, share in zip(bars, shares, strict=True):
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
        for bar, g in zip(bars, names, strict=True):
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


# ---------------------------------------------------------------------------- figures

def _figure(figsize, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, FigureCanvasAgg(fig)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _band(series: list[list[tuple[int, float]]]):
    """Mean and 95% t-band over runs at the steps all of them have (NaN band for one run)."""
    import numpy as np

    common = sorted(set.intersection(*[{s for s, _ in run} for run in series]))
    values = np.array([[dict(run)[s] for s in common] for run in series])  # (runs, steps)
    ivs = [t_interval(values[:, j]) for j in range(len(common))]
    return (np.array(common), np.array([iv.mean for iv in ivs]), np.array([iv.low for iv in ivs]),
            np.array([iv.high for iv in ivs]))


def _smooth(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    import numpy as np

    if window <= 1 or len(points) < window:
        return points
    steps, values = zip(*points, strict=True)
    kernel = np.ones(window) / window
    smooth = np.convolve(np.asarray(values, dtype=float), kernel, mode="valid")
    return list(zip(steps[window - 1:], smooth.tolist(), strict=True))


def plot_heldout(an: Analysis, path: Path) -> Optional[Path]:
    groups = an.grouping.groups
    if an.command != "train" or all(len(r.evaluations) < 2 for g in groups for r in g.runs):
        return None
    shown = [m for m in an.metrics if m[0] in ("acc_t1", "acc_t2")]
    fig, canvas = _figure((5.0 * len(shown), 3.8))
    for j, (m, label, _) in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), j + 1)
        for g, color in zip(groups, _colors(len(groups)), strict=True):
            series = [[(e.step, float(per_problem(e.rows, an.ids, m).mean())) for e in r.evaluations] for r in g.runs]
            steps, mean, low, high = _band(series)
            ax.plot(steps, 100 * mean, marker="o", color=color, label=f"{g.label} (n={len(g.runs)})")
            if len(g.runs) > 1:
                ax.fill_between(steps, 100 * low, 100 * high, color=color, alpha=0.2)
        ax.set_title(f"held-out {label}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("%")
        ax.legend(fontsize=8)
    fig.suptitle(f"held-out accuracy, {len(an.ids)} problems (band: 95% t-interval over seeds)", fontsize=10)
    fig.tight_layout()
    canvas.print_png(str(path))
    return path


def plot_training(an: Analysis, path: Path) -> Optional[Path]:
    groups = an.grouping.groups
    keys = {k for g in groups for r in g.runs for k in r.history}
    depths = sorted({int(k.split("/")[1][len("layer"):]) for k in keys})
    if not depths:
        return None
    names = [(m, label) for m, label in TRAIN_METRICS if any(k.endswith("/" + m) for k in keys)]
    fig, canvas = _figure((4.2 * len(depths), 2.8 * len(names)), dpi=80)
    longest = max(len(v) for g in groups for r in g.runs for v in r.history.values())
    window = max(1, round(longest / 15))
    for i, (m, label) in enumerate(names):
        for j, depth in enumerate(depths):
            ax = fig.add_subplot(len(names), len(depths), i * len(depths) + j + 1)
            key = f"train/layer{depth}/{m}"
            for g, color in zip(groups, _colors(len(groups)), strict=True):
                series = [_smooth(r.history[key], window) for r in g.runs if r.history.get(key)]
                if not series:
                    continue
                steps, mean, low, high = _band(series)
                ax.plot(steps, mean, color=color, label=f"{g.label} (n={len(series)})", linewidth=1.2)
                if len(series) > 1:
                    ax.fill_between(steps, low, high, color=color, alpha=0.2)
            ax.set_title(f"layer {depth}: {label}", fontsize=9)
            ax.tick_params(labelsize=7)
            if i == len(names) - 1:
                ax.set_xlabel("step", fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    smoothing = f"moving mean over {window} steps" if window > 1 else "per step"
    fig.suptitle(f"training metrics ({smoothing}; band: 95% t-interval over seeds)", fontsize=10)
    fig.tight_layout()
    canvas.print_png(str(path))
    return path


def plot_transition_bars(an: Analysis, path: Path) -> Optional[Path]:
    import numpy as np

    if not an.transitions:
        return None
    groups = an.grouping.groups
    fig, canvas = _figure((max(6.0, 1.6 * len(TRANSITIONS) * max(1, len(groups)) / 2), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(groups)
    x = np.arange(len(TRANSITIONS))
    for k, (g, color) in enumerate(zip(groups, _colors(len(groups)), strict=True)):
        ivs = [an.transitions[g.label][t] for t, _, _ in TRANSITIONS]
        means = np.array([iv.mean for iv in ivs]) * 100
        err = np.array([[iv.mean - iv.low, iv.high - iv.mean] if iv.defined else [0, 0] for iv in ivs]).T * 100
        bars = ax.bar(x + (k - (len(groups) - 1) / 2) * width, means, width, yerr=err, capsize=3, color=color,
                      label=f"{g.label} (n={len(g.runs)})")
        for bar, v in zip(bars, means, strict=True):
            ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([label for _, label, _ in TRANSITIONS])
    ax.set_ylabel("% of problems")
    when = "after training" if an.command == "train" else "evaluation"
    ax.set_title(f"t1→t2 transitions {when}, {len(an.ids)} problems (bars: 95% CI)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    canvas.print_png(str(path))
    return path


def plot_vanishing(an: Analysis, path: Path) -> Optional[Path]:
    """Reward vanishing per group: per layer the mean share of zero-variance groups, and the share of
    steps without a usable group (layer 1, every layer), with 95% t-intervals over seeds."""
    import numpy as np

    if not an.vanishing:
        return None
    labels = list(an.vanishing)
    keys = vanishing_keys(an.vanishing)
    fig, canvas = _figure((max(6.0, 1.5 * len(keys) * max(1, len(labels)) / 2 + 2), 4.4))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(labels)
    x = np.arange(len(keys))
    for k, (g, color) in enumerate(zip(labels, _colors(len(labels)), strict=True)):
        ivs = [an.vanishing[g].get(key) for key in keys]
        means = np.array([100 * iv.mean if iv else np.nan for iv in ivs])
        err = np.array([[iv.mean - iv.low, iv.high - iv.mean] if iv and iv.defined else [0, 0] for iv in ivs]).T * 100
        n = max(iv.n for iv in ivs if iv)
        bars = ax.bar(x + (k - (len(labels) - 1) / 2) * width, np.nan_to_num(means), width, yerr=err, capsize=3,
                      color=color, label=f"{g} (n={n})")
        for bar, v in zip(bars, means, strict=True):
            if not np.isnan(v):
                ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([_wrap(vanishing_label(key)) for key in keys], fontsize=7)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title("reward vanishing over training (bars: 95% t-interval over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    canvas.print_png(str(path))
    return path


def _wrap(text: str, width: int = 22) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _save(fig: Any, canvas: Any, path: Union[str, Path]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.print_png(str(out))
    log.info("wrote %s", out)
    return out


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"
