"""Figures of a search (matplotlib, no display needed): each function writes PNG and SVG.

Built on ``matplotlib.figure.Figure`` directly (no ``pyplot``), so nothing changes the
global backend or keeps figures alive; it runs headless. Every function takes the
DataFrames of :mod:`analysis.results` / :mod:`analysis.posthoc` and a path *stem*
(``out/pareto`` → ``out/pareto.png`` and ``out/pareto.svg``) and returns the paths written.
Axes: MACs in MMACs per image, accuracy in %.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .pareto import pareto_front

MACS_LABEL = "average MACs per image (MMACs)"
ACC_LABEL = "validation accuracy (%)"
STATUS_STYLE = {  # colour, marker, label
    "finished": ("tab:blue", "o", "finished"),
    "stopped": ("0.55", "v", "stopped early (ASHA)"),
    "running": ("tab:orange", "^", "running / unfinished"),
    "errored": ("tab:red", "X", "errored (last result)"),
    "pending": ("0.8", ".", "pending"),
}
FORMATS = ("png", "svg")
MAX_LABELLED_CURVES = 10  # beyond this, finished trials share one colour and one legend entry


def _save(fig: Figure, stem: str | Path) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(f".{fmt}") for fmt in FORMATS]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def _legend_outside(fig: Figure, ax: Axes, handles: list | None = None) -> None:
    """The legend right of the axes, where it hides no point or line."""
    handles = handles if handles is not None else ax.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)


# The cost axes an accuracy–cost plot can have: column → (unit, axis label).
COST_AXES = {"avg_macs": ("MMACs", MACS_LABEL), "avg_ms": ("ms", "average latency per image (ms)")}


def _finish_accuracy_macs(fig: Figure, ax: Axes, title: str, stem: str | Path, x: str = "avg_macs") -> list[Path]:
    """Axis labels (MMACs or ms, %), title, grid and legend of an accuracy–cost plot; saves it."""
    ax.set_xlabel(COST_AXES[x][1])
    ax.set_ylabel(ACC_LABEL)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax)
    return _save(fig, stem)


def _colors(keys: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(keys) <= 10 else "tab20"]
    return {k: cmap(i % cmap.N) for i, k in enumerate(keys)}


def _step_fronts(ax: Axes, fronts: Sequence[tuple[pd.DataFrame, dict]], x_col: str = "avg_macs") -> None:
    """Each front as the border of the region it dominates: up from the bottom of the axes at its
    cheapest point, right to each next point's MACs then up, right to the edge after the last.
    Drawn last, inside the limits the points set (``fronts``: (rows, keyword arguments of plot))."""
    ax.autoscale_view()
    (x_lo, x_hi), (y_lo, y_hi) = ax.get_xlim(), ax.get_ylim()
    for front, kw in fronts:
        if front.empty:
            continue
        x, y = front[x_col].to_numpy(float), front["accuracy"].to_numpy(float)
        style = {"color": "black", "lw": 1.4, "zorder": 2, **kw}
        ax.plot(np.r_[x[0], x, max(x_hi, x.max())], np.r_[min(y_lo, y.min()), y, y[-1]], drawstyle="steps-post",
                **style)
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)


def _target_line(ax: Axes, target_macs: float | None, budget: bool = False, unit: str = "MMACs") -> None:
    if target_macs:
        word = "budget" if budget else "target"
        ax.axvline(target_macs, color="0.35", ls="--", lw=1.2, label=f"{word} {target_macs:g} {unit}", zorder=1)


def _annotate_best(ax: Axes, best: pd.Series | None, x_col: str = "avg_macs") -> None:
    if best is None:
        return
    x, y = float(best[x_col]), float(best["accuracy"])
    ax.scatter([x], [y], s=180, facecolors="none", edgecolors="black", lw=1.6, zorder=5)
    x_mid = np.mean(ax.get_xlim())
    ax.annotate(f"best at target: {best['trial_id']}\n{y:.1f}% at {x:.2f} {COST_AXES[x_col][0]}", xy=(x, y),
                xytext=(-30 if x > x_mid else 30, -64), textcoords="offset points",
                ha="right" if x > x_mid else "left", fontsize=8.5,
                bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.6", "alpha": 0.75},
                arrowprops={"arrowstyle": "->", "color": "0.3"}, zorder=6)


def plot_pareto(points: pd.DataFrame, stem: str | Path, *, target_macs: float | None = None,
                best: pd.Series | None = None, color_by: str = "status", title: str | None = None,
                budget: bool = False, x: str = "avg_macs") -> list[Path]:
    """(a)/(e) Every trial at its tuned thresholds (``accuracy`` %, ``avg_macs`` MMACs, or ``x="avg_ms"``:
    milliseconds), coloured by ``status`` or ``experiment``; the front of all points (one front per
    experiment when colouring by experiment) as a step line; the target as a vertical line; ``best`` circled."""
    points = points[points["accuracy"].notna() & points[x].notna()]
    fig = Figure(figsize=(9.0, 5.0), layout="constrained")
    ax = fig.subplots()
    if color_by == "status":
        for status, (color, marker, label) in STATUS_STYLE.items():
            group = points[points["status"] == status]
            if len(group):
                ax.scatter(group[x], group["accuracy"], c=[color], marker=marker, s=42,
                           label=f"{label} ({len(group)})", zorder=3, edgecolors="white", linewidths=0.5)
        fronts = [(pareto_front(points, macs=x), {"label": "Pareto front"})]
    else:
        colors = _colors(sorted(points[color_by].unique()))
        fronts = []
        for key, group in points.groupby(color_by, sort=True):
            ax.scatter(group[x], group["accuracy"], color=colors[key], s=42, zorder=3,
                       edgecolors="white", linewidths=0.5, label=f"{key} ({len(group)} trials)")
            fronts.append((pareto_front(group, macs=x), {"color": colors[key], "alpha": 0.9}))
        ax.plot([], [], color="0.3", lw=1.4, label="front of each")
    _target_line(ax, target_macs, budget, COST_AXES[x][0])
    ax.margins(x=0.08, y=0.12)
    _step_fronts(ax, fronts, x)
    _annotate_best(ax, best, x)
    return _finish_accuracy_macs(fig, ax, title or "Accuracy vs. average MACs of every trial", stem, x)


def plot_threshold_sweeps(sweep: pd.DataFrame, trial_ids: Sequence[str], stem: str | Path, *,
                          tuned: pd.DataFrame | None = None, target_macs: float | None = None,
                          front: pd.DataFrame | None = None, title: str | None = None) -> list[Path]:
    """(b) For each trial in ``trial_ids``: every grid threshold vector (dots) and the trial's own
    accuracy–MACs front over thresholds (line), its tuned thresholds (``tuned``, large marker);
    ``front`` (over all trials × thresholds) dashed black."""
    fig = Figure(figsize=(9.0, 5.0), layout="constrained")
    ax = fig.subplots()
    colors = _colors(list(trial_ids))
    for trial_id in trial_ids:
        curve = sweep[sweep["trial_id"] == trial_id]
        if curve.empty:
            continue
        color = colors[trial_id]
        ax.scatter(curve["avg_macs"], curve["accuracy"], color=color, s=6, alpha=0.25, zorder=2, lw=0)
        own = pareto_front(curve)
        ax.plot(own["avg_macs"], own["accuracy"], "-o", drawstyle="steps-post", color=color, ms=3, lw=1.3,
                zorder=3, label=f"{trial_id} ({len(curve)} threshold vectors)")
        if tuned is not None:
            t = tuned[tuned["trial_id"] == trial_id]
            if len(t) and pd.notna(t["accuracy"].iloc[0]):
                ax.scatter(t["avg_macs"], t["accuracy"], color=color, marker="*", s=160, zorder=4,
                           edgecolors="black", linewidths=0.6)
    if tuned is not None:
        ax.scatter([], [], marker="*", s=120, color="0.5", edgecolors="black", label="thresholds tuned for target")
    _target_line(ax, target_macs)
    if front is not None and not front.empty:
        _step_fronts(ax, [(front, {"ls": "--", "label": "front over trials × thresholds"})])
    return _finish_accuracy_macs(fig, ax, title or "Threshold sweep of the front's trials", stem)


def plot_exits(breakdown: pd.DataFrame, stem: str | Path, *, title: str | None = None) -> list[Path]:
    """(c) One trial's exits (rows of :func:`analysis.posthoc.exit_breakdown`): share of samples
    leaving at each exit (%), and per exit the accuracy alone and among the samples taken there (%)."""
    def label(name: str, th: float, macs: float) -> str:
        theta = "" if pd.isna(th) else f"θ={th:.2f}" + (" (off)" if th >= 1 else "")
        return f"{name}\n{theta}\n{macs:.2f} MMACs"

    labels = [label(*row) for row in zip(breakdown.index, breakdown["threshold"], breakdown["macs"])]
    x = np.arange(len(breakdown))
    fig = Figure(figsize=(max(7.5, 2.2 * len(x) + 3), 4.4), layout="constrained")
    ax_u, ax_a = fig.subplots(1, 2)
    util = 100 * breakdown["util"].to_numpy(float)
    bars = ax_u.bar(x, util, color="tab:blue", width=0.6)
    ax_u.bar_label(bars, labels=[f"{u:.1f}%" for u in util], fontsize=8, padding=2)
    ax_u.set_ylabel("samples leaving here (%)")
    ax_u.set_ylim(0, max(105, util.max() * 1.12 if len(util) else 105))
    ax_u.set_title("Exit utilization")
    w = 0.38
    alone = ax_a.bar(x - w / 2, breakdown["accuracy"], w, color="tab:gray", label="exit alone, all samples")
    taken = ax_a.bar(x + w / 2, breakdown["taken_accuracy"].fillna(0), w, color="tab:orange",
                     label="samples that leave here")
    ax_a.bar_label(alone, fmt="%.1f", fontsize=7.5, padding=2)
    ax_a.bar_label(taken, labels=["–" if np.isnan(v) else f"{v:.1f}" for v in breakdown["taken_accuracy"]],
                   fontsize=7.5, padding=2)
    ax_a.set_ylabel("accuracy (%)")
    top = np.nanmax(np.r_[breakdown["accuracy"].to_numpy(float), breakdown["taken_accuracy"].to_numpy(float), 1])
    ax_a.set_ylim(0, min(110, top * 1.25))
    ax_a.set_title("Per-exit accuracy (validation)")
    ax_a.legend(fontsize=8, loc="upper left")
    for ax in (ax_u, ax_a):
        ax.set_xticks(x, labels, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "Exits of one trial")
    return _save(fig, stem)


def plot_classes(breakdown: pd.DataFrame, stem: str | Path, *, title: str | None = None) -> list[Path]:
    """(d) One trial per class, named (rows of :func:`analysis.posthoc.class_breakdown`): accuracy (%) and
    the share of the class's images leaving at an early exit (%)."""
    y = np.arange(len(breakdown))
    fig = Figure(figsize=(8, max(2.5, 0.32 * len(y) + 1.4)), layout="constrained")
    ax_a, ax_e = fig.subplots(1, 2, sharey=True)
    for ax, column, color, name in ((ax_a, "accuracy", "tab:orange", "accuracy (%)"),
                                    (ax_e, "early", "tab:blue", "leave at an early exit (%)")):
        values = breakdown[column].to_numpy(float)
        bars = ax.barh(y, np.nan_to_num(values), color=color, height=0.6)
        ax.bar_label(bars, labels=["–" if np.isnan(v) else f"{v:.0f}" for v in values], fontsize=7.5, padding=2)
        ax.set_xlim(0, 110)
        ax.set_xlabel(name)
        ax.grid(axis="x", alpha=0.3)
    ax_a.set_yticks(y, [f"{c} ({n})" for c, n in zip(breakdown.index, breakdown["images"])], fontsize=8)
    ax_a.invert_yaxis()
    fig.suptitle(title or "Classes of one trial")
    return _save(fig, stem)


def plot_learning_curves(history: pd.DataFrame, trials: pd.DataFrame, stem: str | Path, *,
                         metric: str = "score", title: str | None = None) -> list[Path]:
    """(d) ``metric`` per epoch of every trial; finished trials coloured, ASHA-stopped ones grey dashed
    ending in ×, errored ones red dotted, unfinished ones orange."""
    fig = Figure(figsize=(9.0, 5.0), layout="constrained")
    ax = fig.subplots()
    status = dict(zip(zip(trials["experiment"], trials["trial_id"]), trials["status"]))
    finished = [k for k, s in status.items() if s == "finished"]
    label_each = len(finished) <= MAX_LABELLED_CURVES
    colors = _colors([k[1] for k in finished]) if label_each else {k[1]: "tab:blue" for k in finished}
    style = {"stopped": ("0.6", "--", "x"), "errored": ("tab:red", ":", "X"), "running": ("tab:orange", "-.", ">")}
    handles = []
    for key, curve in history.groupby(["experiment", "trial_id"], sort=True):
        s = status.get(key, "running")
        curve = curve.sort_values("epoch")
        if s == "finished":
            line = ax.plot(curve["epoch"], curve[metric], "-o", ms=3.5, lw=1.6 if label_each else 1.0,
                           color=colors[key[1]], label=key[1], zorder=3, alpha=1.0 if label_each else 0.6)
            if label_each or not handles:
                handles.append(line[0])
                if not label_each:
                    line[0].set_label(f"finished ({len(finished)})")
        else:
            color, ls, marker = style.get(s, style["running"])
            ax.plot(curve["epoch"], curve[metric], ls=ls, color=color, lw=1.1, zorder=2)
            ax.plot(curve["epoch"].iloc[-1:], curve[metric].iloc[-1:], marker=marker, color=color, ms=7,
                    ls="none", zorder=2)
    for s, (color, ls, marker) in style.items():
        if (trials["status"] == s).any():
            n = int((trials["status"] == s).sum())
            handles.append(Line2D([], [], color=color, ls=ls, marker=marker, label=f"{STATUS_STYLE[s][2]} ({n})"))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (accuracy % − MACs penalty)" if metric == "score" else metric)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title or f"Learning curves: {metric} per epoch")
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax, handles)
    return _save(fig, stem)
