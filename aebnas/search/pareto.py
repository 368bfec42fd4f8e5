"""Pareto dominance, the one definition: MO-ASHA's rung ranking, the surrogate search and ``analysis``.

A row of objectives (all minimised) dominates another when it is ≤ in every objective and
< in at least one; equal rows do not dominate each other. Pure numpy, no Ray.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def dominates(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Boolean (len(A), len(B)): whether row i of ``A`` dominates row j of ``B`` (objectives minimised;
    a comparison with NaN is false, so NaN rows neither dominate nor are dominated)."""
    return np.all(A[:, None] <= B[None], axis=2) & np.any(A[:, None] < B[None], axis=2)


def non_dominated_fronts(F: np.ndarray) -> list[np.ndarray]:
    """Indices of the rows of ``F`` (objectives, minimised) by non-dominated front, best first."""
    F = np.asarray(F, dtype=float)
    dominance = dominates(F, F)
    count = dominance.sum(axis=0)  # how many rows dominate each row
    fronts, left = [], np.ones(len(F), dtype=bool)
    while left.any():
        front = np.flatnonzero(left & (count == 0))
        fronts.append(front)
        left[front] = False
        count = count - dominance[front].sum(axis=0)
    return fronts


def pareto_mask(accuracy: Sequence[float], macs: Sequence[float]) -> np.ndarray:
    """Boolean mask of the points no other point dominates in (accuracy ↑, MACs ↓); equal points are all
    kept, NaN points are never on the front."""
    acc, cost = np.asarray(accuracy, dtype=float), np.asarray(macs, dtype=float)
    if acc.shape != cost.shape or acc.ndim != 1:
        raise ValueError(f"accuracy {acc.shape} and macs {cost.shape} must be 1-D of the same length")
    idx = np.flatnonzero(~(np.isnan(acc) | np.isnan(cost)))
    F = np.column_stack([-acc[idx], cost[idx]])
    dominated = np.zeros(len(idx), dtype=bool)
    for start in range(0, len(idx), 1024):  # blocks of rows: memory stays O(1024 · n) for large analyses
        dominated |= dominates(F[start:start + 1024], F).any(axis=0)
    mask = np.zeros(acc.shape, dtype=bool)
    mask[idx[~dominated]] = True
    return mask


__all__ = ["dominates", "non_dominated_fronts", "pareto_mask"]
