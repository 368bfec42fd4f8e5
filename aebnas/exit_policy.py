"""Which exit a sample takes, and which thresholds to use.

Everything here works on *cached* exit outputs (per-exit confidence and predicted class
for every sample of a split, :class:`ExitOutputs`), so thresholds are tuned and exits
simulated without running a network; trials and ``analysis`` share this code.

Conventions: exits are indexed 0…E-1 in position order and E is the final classifier;
accuracies are in %, utilizations are fractions. Costs are in the unit of the
:class:`ExitCosts` they come from (``ExitCosts.unit``): MMACs (``aebnas.cost.macs``) or
milliseconds (``aebnas.cost.latency``); fields and arguments are named ``cost``/``target``, never
``macs``, so a millisecond is never stored under a MACs name.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

# The one threshold check, shared with TorchScript (EarlyExitNet.infer compiles it) and the
# standalone ONNX driver, which may import neither torch nor aebnas: so it lives there.
from .onnx_runner import validate_thresholds
from .files import atomic_write
from .settings import PAPER_GRID, PAPER_LAMBDA

# The authors round any tuned threshold above 0.95 to 1.0 (exit off).
ROUND_TO_ONE_ABOVE = 0.95
# Bounds memory: the (vectors × samples) boolean blocks of the per-sample walk, and (÷ 8) the
# joint histograms of the by-level count.
_CHUNK_ELEMENTS = 8_000_000


MMACS, MS = "MMACs", "ms"  # the units an ExitCosts can be in


@dataclass
class ExitCosts:
    """Per-exit cost pieces in ``unit``; ``cumulative`` turns them into ``C_i``.

    backbone: (E+1,) stem + stages up to each exit's position; the last entry is the whole
    backbone plus the head. branch: (E,) each exit branch. unit: ``MMACS`` or ``MS``.
    """

    backbone: np.ndarray
    branch: np.ndarray
    unit: str = MMACS

    def __post_init__(self) -> None:
        self.backbone = np.asarray(self.backbone, dtype=np.float64)
        self.branch = np.asarray(self.branch, dtype=np.float64)
        if self.backbone.shape != (self.branch.shape[0] + 1,):
            raise ValueError(f"backbone {self.backbone.shape} must have one more entry than branch "
                             f"{self.branch.shape}")
        if self.unit not in (MMACS, MS):
            raise ValueError(f"unit={self.unit!r} is not one of {(MMACS, MS)}")

    @property
    def num_exits(self) -> int:
        return self.branch.shape[0]

    @property
    def static_cost(self) -> float:
        """Cost (``unit``) of the network without any exit (backbone + head)."""
        return float(self.backbone[-1])

    def cumulative(self, active: np.ndarray | None = None) -> np.ndarray:
        """``C_i`` (``unit``) for each exit and the final, shape (..., E+1), given active (..., E).

        The one rule: backbone up to exit i + every active branch at or before i (its own
        branch counts even when inactive: ``C_i`` is what leaving there costs); the final pays
        the whole backbone, the head and every active branch."""
        e = self.num_exits
        act = np.ones(e, dtype=bool) if active is None else np.asarray(active, dtype=bool)
        if act.shape[-1:] != (e,):
            raise ValueError(f"active must end in a dimension of {e} exits, got shape {act.shape}")
        paid = act * self.branch                       # branches computed on the way
        before = np.cumsum(paid, axis=-1) - paid       # active branches strictly before i
        out = np.empty(act.shape[:-1] + (e + 1,))
        out[..., :e] = self.backbone[:e] + before + self.branch
        out[..., e] = self.backbone[e] + paid.sum(axis=-1)
        return out

    def expected(self, utilization: np.ndarray, active: np.ndarray | None = None) -> float:
        """Expected cost per sample (``unit``): Σ u_i · C_i."""
        return float(np.asarray(utilization) @ self.cumulative(active))


@dataclass
class ExitOutputs:
    """Cached outputs of every exit on one split: arrays of shape (E+1, N) and labels (N,)."""

    confidence: np.ndarray  # float32, row E (final) kept for completeness
    prediction: np.ndarray  # int64
    labels: np.ndarray      # int64

    def __post_init__(self) -> None:
        self.confidence = np.asarray(self.confidence, dtype=np.float32)
        self.prediction = np.asarray(self.prediction, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.confidence.ndim != 2 or self.confidence.shape != self.prediction.shape:
            raise ValueError(f"confidence {self.confidence.shape} and prediction "
                             f"{self.prediction.shape} must both be (exits+1, samples)")
        if self.labels.shape != (self.confidence.shape[1],):
            raise ValueError(f"labels {self.labels.shape} do not match {self.confidence.shape[1]} samples")

    @property
    def num_exits(self) -> int:
        return self.confidence.shape[0] - 1

    @property
    def num_samples(self) -> int:
        return self.confidence.shape[1]

    @property
    def correct(self) -> np.ndarray:
        return self.prediction == self.labels[None, :]

    def exit_accuracy(self) -> np.ndarray:
        """Accuracy (%) of each exit alone on the whole split, final last."""
        return 100.0 * self.correct.mean(axis=1)


@dataclass
class SimResult:
    """What a set of thresholds does on a split; costs in ``unit`` (that of the ExitCosts simulated)."""

    thresholds: list[float]
    accuracy: float             # %
    avg_cost: float             # per sample
    utilization: np.ndarray     # (E+1,) fraction of samples leaving at each exit
    costs: np.ndarray           # (E+1,) C_i with these thresholds
    taken_accuracy: np.ndarray  # (E+1,) % correct among samples leaving there (nan if none)
    exit_index: np.ndarray      # (N,) exit taken by each sample
    unit: str = MMACS


def _as_confidence_dtype(thresholds: np.ndarray) -> np.ndarray:
    """Thresholds in float32, the precision of the confidences.

    ``EarlyExitNet.infer`` compares a float32 confidence tensor with a Python float, which
    torch does in float32; comparing in float64 here could send a sample whose confidence
    rounds to the threshold to another exit than ``infer`` does.
    """
    return np.asarray(thresholds, dtype=np.float64).astype(np.float32)


def exit_index(outputs: ExitOutputs, thresholds: Sequence[float]) -> np.ndarray:
    """Exit taken by each sample (0…E-1 an exit, E the final classifier)."""
    th = np.asarray(validate_thresholds(thresholds, outputs.num_exits))
    e = outputs.num_exits
    if e == 0:  # a static network: argmax over no exits would raise
        return np.zeros(outputs.num_samples, dtype=np.int64)
    passes = (outputs.confidence[:e] >= _as_confidence_dtype(th)[:, None]) & (th < 1.0)[:, None]
    return np.where(passes.any(axis=0), passes.argmax(axis=0), e)


def simulate(outputs: ExitOutputs, thresholds: Sequence[float], costs: ExitCosts) -> SimResult:
    """Accuracy, utilization and average cost (``costs.unit``) of ``thresholds`` on cached outputs."""
    th = validate_thresholds(thresholds, outputs.num_exits)
    _check_costs(outputs, costs)
    idx = exit_index(outputs, th)
    e, n = outputs.num_exits, outputs.num_samples
    taken_correct = outputs.correct[idx, np.arange(n)]
    counts = np.bincount(idx, minlength=e + 1)
    util = counts / max(n, 1)
    per_exit_right = np.bincount(idx, weights=taken_correct, minlength=e + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        taken_acc = np.where(counts > 0, 100.0 * per_exit_right / counts, np.nan)
    c = costs.cumulative(np.asarray(th) < 1.0)
    return SimResult(thresholds=th, accuracy=100.0 * float(taken_correct.mean()) if n else 0.0,
                     avg_cost=float(util @ c), utilization=util, costs=c,
                     taken_accuracy=taken_acc, exit_index=idx, unit=costs.unit)


def simulate_many(outputs: ExitOutputs, threshold_vectors: np.ndarray,
                  costs: ExitCosts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorized :func:`simulate` for K threshold vectors (K, E).

    Returns (accuracy % (K,), average cost in ``costs.unit`` (K,), utilization (K, E+1)).
    """
    _check_costs(outputs, costs)
    tv = np.asarray(threshold_vectors, dtype=np.float64)
    e, n = outputs.num_exits, outputs.num_samples
    if tv.ndim != 2 or tv.shape[1] != e:
        raise ValueError(f"threshold_vectors must have shape (K, {e}), got {tv.shape}")
    levels = [np.unique(tv[:, j]) for j in range(e)]
    if math.prod(len(v) + 1 for v in levels) <= _CHUNK_ELEMENTS // 8:
        counts, right = _exit_counts_by_level(outputs, tv, levels)
    else:
        counts, right = _exit_counts_by_sample(outputs, tv)
    util = counts / n
    acc = 100.0 * (right / n)
    avg = (util * costs.cumulative(tv < 1.0)).sum(axis=1)
    return acc, avg, util


def _exit_counts_by_level(outputs: ExitOutputs, tv: np.ndarray,
                          values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Samples leaving at each exit (K, E+1) and right answers (K,), from joint histograms.

    ``values[j]``: the distinct thresholds of exit j among the vectors (sorted). A sample's
    *level* at exit j is how many of them below 1.0 its confidence reaches, so it passes
    threshold ``values[j][t]`` iff its level > t (a threshold of 1.0 is never passed). A
    sample leaves at exit j iff its levels are ≤ t_i before j and > t_j at j: a box of the
    joint histogram of levels, summed in O(1) per vector after prefix sums. Work:
    O(samples·exits + Π(len(values[j]) + 1) + vectors·exits) instead of
    O(samples·exits·vectors); used when the histograms are small (the threshold grids).
    """
    e, k = outputs.num_exits, tv.shape[0]
    sample_level = [np.searchsorted(_as_confidence_dtype(v[v < 1.0]), outputs.confidence[j], side="right")
                    for j, v in enumerate(values)]
    vector_index = [np.searchsorted(v, tv[:, j]) for j, v in enumerate(values)]
    correct = outputs.correct
    counts = np.empty((k, e + 1))
    right = np.zeros(k)
    for j in range(e + 1):
        axes = min(j + 1, e)  # levels of exits 0…j (0…E-1 for the final classifier)
        shape = tuple(len(v) + 1 for v in values[:axes])
        cell = np.ravel_multi_index(sample_level[:axes], shape) if axes else np.zeros(outputs.num_samples, int)
        size = math.prod(shape)
        for weights, out in ((None, "count"), (correct[j], "right")):
            hist = np.bincount(cell, weights=weights, minlength=size).astype(np.float64).reshape(shape)
            for axis in range(min(j, e)):       # levels ≤ t_i before exit j
                hist = np.cumsum(hist, axis=axis)
            if j < e:                           # level > t_j at exit j
                hist = np.flip(np.cumsum(np.flip(hist, axis=j), axis=j), axis=j)
                index = tuple(vector_index[:j]) + (vector_index[j] + 1,)
            else:
                index = tuple(vector_index)
            box = hist[index] if axes else np.full(k, hist.item())
            if out == "count":
                counts[:, j] = box
            else:
                right += box
    return counts, right


def _exit_counts_by_sample(outputs: ExitOutputs, tv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same as :func:`_exit_counts_by_level`, walking every (vector, sample) pair in chunks."""
    e, n, k = outputs.num_exits, outputs.num_samples, tv.shape[0]
    counts = np.empty((k, e + 1))
    right = np.empty(k)
    conf, correct = outputs.confidence[:e], outputs.correct
    chunk = max(1, _CHUNK_ELEMENTS // max(1, e * n))
    for start in range(0, k, chunk):
        t = tv[start:start + chunk]
        t32 = _as_confidence_dtype(t)
        remaining = np.ones((t.shape[0], n), dtype=bool)
        hits = np.zeros(t.shape[0])
        for j in range(e):  # the earliest passing exit takes the sample
            leave = remaining & (conf[j][None, :] >= t32[:, j:j + 1]) & (t[:, j:j + 1] < 1.0)
            counts[start:start + chunk, j] = np.count_nonzero(leave, axis=1)
            hits += np.count_nonzero(leave & correct[j], axis=1)
            remaining &= ~leave
        counts[start:start + chunk, e] = np.count_nonzero(remaining, axis=1)
        right[start:start + chunk] = hits + np.count_nonzero(remaining & correct[e], axis=1)
    return counts, right


def threshold_score(accuracy: np.ndarray | float, avg_cost: np.ndarray | float, target: float,
                    lam: float = PAPER_LAMBDA) -> np.ndarray | float:
    """The paper's score: accuracy% − λ·100·|avg_cost − target| / target (cost and target in one unit)."""
    if target <= 0:
        raise ValueError(f"target={target} must be > 0 (in the costs' unit)")
    return accuracy - lam * 100.0 * np.abs(np.asarray(avg_cost) - target) / target


def threshold_grid(num_exits: int, grid: Sequence[float] = PAPER_GRID) -> np.ndarray:
    """All threshold vectors of ``grid`` (values > 0.95 rounded to 1.0), in itertools.product order."""
    # Checked before rounding: a value above 1 must fail, not quietly become 1.0.
    if len(grid) == 0 or any(not 0.0 <= float(g) <= 1.0 for g in grid):
        raise ValueError(f"grid={tuple(grid)} must be non-empty values in [0, 1]")
    values = sorted({1.0 if g > ROUND_TO_ONE_ABOVE else float(g) for g in grid})
    if num_exits == 0:
        return np.zeros((1, 0))
    return np.array(list(itertools.product(values, repeat=num_exits)), dtype=np.float64)


@dataclass
class TuneResult:
    thresholds: list[float]
    score: float
    result: SimResult


def tune_thresholds(outputs: ExitOutputs, costs: ExitCosts, target: float,
                    grid: Sequence[float] = PAPER_GRID, lam: float = PAPER_LAMBDA,
                    budget: float | None = None) -> TuneResult:
    """Best thresholds on the grid by the paper's score for an average cost of ``target`` (``costs.unit``).

    Ties go to the first vector in ``itertools.product`` order. With ``budget`` (``costs.unit``),
    vectors whose average cost exceeds the budget are excluded (if none fits, the cheapest
    vector is returned).
    """
    vectors = threshold_grid(outputs.num_exits, grid)
    acc, avg, _ = simulate_many(outputs, vectors, costs)
    scores = np.asarray(threshold_score(acc, avg, target, lam), dtype=np.float64)
    if budget is not None:
        fits = avg <= budget + 1e-9
        scores = np.where(fits, scores, -np.inf) if fits.any() else np.where(avg == avg.min(), scores, -np.inf)
    best = int(np.argmax(scores))
    th = [float(t) for t in vectors[best]]
    return TuneResult(thresholds=th, score=float(scores[best]), result=simulate(outputs, th, costs))


@dataclass
class OracleResult:
    accuracy: float          # % (a sample is right if any exit is right)
    avg_cost: float          # per sample, in ``unit``
    utilization: np.ndarray  # (E+1,)
    unit: str = MMACS


def oracle(outputs: ExitOutputs, costs: ExitCosts) -> OracleResult:
    """Upper bound: every sample leaves at the cheapest exit that is right (all exits active)."""
    _check_costs(outputs, costs)
    e = outputs.num_exits
    correct = outputs.correct
    idx = np.where(correct.any(axis=0), correct.argmax(axis=0), e)
    c = costs.cumulative(np.ones(e, dtype=bool))
    util = np.bincount(idx, minlength=e + 1) / max(outputs.num_samples, 1)
    return OracleResult(accuracy=100.0 * float(correct.any(axis=0).mean()),
                        avg_cost=float(util @ c), utilization=util, unit=costs.unit)


def _check_costs(outputs: ExitOutputs, costs: ExitCosts) -> None:
    if costs.num_exits != outputs.num_exits:
        raise ValueError(f"costs describe {costs.num_exits} exits but the outputs have {outputs.num_exits}")


# ----------------------------------------------------------------- saved artifacts
def save_exit_outputs(path: str | Path, splits: dict[str, ExitOutputs], costs: ExitCosts) -> None:
    """Write ``exit_outputs.npz``: per split ``{split}_confidence/_prediction/_labels`` plus the costs (MMACs)."""
    if costs.unit != MMACS:  # the file's keys say MACs; readers take them as such
        raise ValueError(f"exit_outputs.npz holds costs in {MMACS}, got {costs.unit}")
    arrays: dict[str, np.ndarray] = {
        "backbone_macs": costs.backbone, "branch_macs": costs.branch,
        "costs_all_active": costs.cumulative(np.ones(costs.num_exits, dtype=bool)),
    }
    for split, out in splits.items():
        arrays[f"{split}_confidence"] = out.confidence
        arrays[f"{split}_prediction"] = out.prediction
        arrays[f"{split}_labels"] = out.labels
    path = Path(path)
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays), tmp_suffix=".tmp.npz")


def load_exit_outputs(path: str | Path) -> tuple[dict[str, ExitOutputs], ExitCosts]:
    """Read ``exit_outputs.npz``; returns ({split: ExitOutputs}, ExitCosts)."""
    with np.load(path) as z:
        costs = ExitCosts(backbone=z["backbone_macs"], branch=z["branch_macs"])
        splits = {}
        for key in z.files:
            if key.endswith("_confidence"):
                s = key[: -len("_confidence")]
                splits[s] = ExitOutputs(z[f"{s}_confidence"], z[f"{s}_prediction"], z[f"{s}_labels"])
    return splits, costs
