"""Pareto front and hypervolume of (accuracy ↑, average MACs ↓).

A point dominates another when its accuracy is ≥ and its MACs are ≤, one of them
strictly; the front is the set of points no other point dominates (equal points are all
kept; dominance itself is :mod:`aebnas.search.pareto`'s). The 2-D hypervolume is the area, in %·MMACs, of the region of the
(MMACs, accuracy %) plane that the points dominate and that dominates the reference
point ``(ref_accuracy %, ref_macs MMACs)``: bigger is better. Points with accuracy ≤
``ref_accuracy`` or MACs ≥ ``ref_macs`` add nothing.

Reference point: compare hypervolumes only when computed against the *same* reference.
The default, :func:`default_reference`, is (0 %, 1.1 × the largest MACs of the given
points), so it depends on the points; to compare runs, pass one reference explicitly
(``--reference-point 0,20`` on the command line), e.g. (0 %, the static MACs of the
largest network in the space).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from aebnas.search.pareto import pareto_mask

DEFAULT_REFERENCE_MACS_FACTOR = 1.1


def pareto_front(frame: pd.DataFrame, accuracy: str = "accuracy", macs: str = "avg_macs") -> pd.DataFrame:
    """The rows of ``frame`` on the front of (``accuracy`` ↑, ``macs`` ↓), sorted by MACs."""
    mask = pareto_mask(frame[accuracy].to_numpy(float), frame[macs].to_numpy(float))
    return frame[mask].sort_values([macs, accuracy], ascending=[True, False], kind="stable")


def default_reference(macs: Sequence[float]) -> tuple[float, float]:
    """(0 %, 1.1 × the largest finite MACs): every point with accuracy > 0 counts."""
    values = np.asarray(macs, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no finite MACs to derive a reference point from; pass one explicitly")
    return 0.0, DEFAULT_REFERENCE_MACS_FACTOR * float(values.max())


def hypervolume(accuracy: Sequence[float], macs: Sequence[float], reference: tuple[float, float]) -> float:
    """Area (%·MMACs) dominated by the points and bounded by ``reference`` = (accuracy %, MMACs)."""
    ref_acc, ref_macs = (float(v) for v in reference)
    acc, cost = np.asarray(accuracy, dtype=float), np.asarray(macs, dtype=float)
    keep = pareto_mask(acc, cost) & (acc > ref_acc) & (cost < ref_macs)
    acc, cost = acc[keep], cost[keep]
    order = np.argsort(cost, kind="stable")
    acc, cost = acc[order], cost[order]
    # Front sorted by MACs has rising accuracy: slab i spans [macs_i, macs_{i+1}) at height acc_i.
    widths = np.diff(np.append(cost, ref_macs))
    return float(np.sum(widths * (acc - ref_acc)))


def parse_reference(text: str) -> tuple[float, float]:
    """``"ACC,MACS"`` (%, MMACs) → (accuracy, macs); raises ValueError describing the format."""
    parts = text.split(",")
    try:
        ref = (float(parts[0]), float(parts[1])) if len(parts) == 2 else None
    except ValueError:
        ref = None
    if ref is None or not all(np.isfinite(ref)):
        raise ValueError(f"reference point {text!r} is not ACC,MACS (accuracy %, MMACs), e.g. 0,20")
    return ref


__all__ = ["pareto_mask", "pareto_front", "default_reference", "hypervolume", "parse_reference"]
