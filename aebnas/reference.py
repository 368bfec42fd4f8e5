"""Slow, independent reference implementations used by the tests and benchmarks to check the fast code.

Nothing in the package calls this module. Each function here redoes, the plain way, what
a fast module computes, so that the two can be compared:

- **MAC count** (checks ``aebnas.cost.macs``): per-layer formulas walking an ``ArchConfig``,
  with its own channel rounding and output sizes, instead of ptflops on the built network.
  It counts what ptflops' aten backend counts::

      conv    MACs = Cout·Hout·Wout·(Cin/groups)·k·k  (+ Cout·Hout·Wout with a bias)
      linear  MACs = in·out + out                     (aten.addmm counts the bias too)

  with padding k//2, so Hout = ceil(H / stride) (an exit module's convolution has no padding);
  nothing element-wise (BatchNorm, activations, pooling, resizing, the squeeze-excite product,
  residual additions).
- **Exits and thresholds** (checks ``aebnas.exit_policy``): C_i by a loop over the exits,
  every sample walked through the exits in Python, every threshold vector of the grid
  tried in ``itertools.product`` order (the authors' way, and claim 4's baseline).

It imports neither ``aebnas.cost.macs`` nor ``aebnas.exit_policy`` (nor ``aebnas.nn``): a
reference that shared their code would agree with them on their bugs. Only
``aebnas.config`` (what an architecture *is*, and its channel constants) is shared.
Units: MMACs unless a name says MACs; accuracy in %; utilization in fractions.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

from . import config as C
from .config import ArchConfig, ExitConfig

# The paper's threshold grid, λ and rounding, written out again from the paper (not imported).
PAPER_GRID = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)
PAPER_LAMBDA = 0.1
ROUND_TO_ONE_ABOVE = 0.95  # a tuned threshold above this becomes 1.0 (exit off)


# ======================================================================== MAC count
def round_channels(value: float, divisor: int = 8) -> int:
    """MobileNet channel rounding: nearest multiple of ``divisor`` (at least ``divisor``),
    never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_macs(c_in: int, c_out: int, kernel: int, hw: int, stride: int = 1, groups: int = 1,
              bias: bool = False) -> tuple[int, int]:
    """(MACs, output size) of a square convolution on an hw×hw map, padding kernel//2."""
    out = (hw + 2 * (kernel // 2) - kernel) // stride + 1
    return out * out * c_out * (c_in // groups * kernel * kernel + (1 if bias else 0)), out


def linear_macs(n_in: int, n_out: int) -> int:
    """MACs of a linear layer with a bias."""
    return n_in * n_out + n_out


def block_macs(c_in: int, c_out: int, kernel: int, expansion: int, stride: int, se: bool,
               hw: int) -> tuple[int, int]:
    """(MACs, output size) of an inverted residual: 1×1 expand (if expansion ≠ 1) → k×k
    depthwise → squeeze-excite (two biased 1×1 convs on the pooled 1×1 map) → 1×1 project."""
    mid = round_channels(c_in * expansion) if expansion != 1 else c_in
    macs = conv_macs(c_in, mid, 1, hw)[0] if expansion != 1 else 0
    depthwise, out = conv_macs(mid, mid, kernel, hw, stride, groups=mid)
    macs += depthwise
    if se:
        squeeze = round_channels(mid / 4)
        macs += conv_macs(mid, squeeze, 1, 1, bias=True)[0] + conv_macs(squeeze, mid, 1, 1, bias=True)[0]
    return macs + conv_macs(mid, c_out, 1, out)[0], out


def exit_branch_macs(c_in: int, exit_cfg: ExitConfig, hw: int, num_classes: int) -> int:
    """MACs of an exit branch on a c_in × hw × hw map.

    The paper's: per module a k×k convolution, stride 2, no padding, c → c·expansion, on the map
    resized to ``resize`` px (the resize is not counted), then a 2×2 max pool if ``pool`` and the map is
    at least 2×2; global pooling; linear classifier. EDANAS's: 1×1 conv c → 6c on the map, global pooling,
    1×1 conv 6c → 8c, linear classifier.
    """
    if exit_cfg.branch == "edanas":
        return (conv_macs(c_in, 6 * c_in, 1, hw)[0] + conv_macs(6 * c_in, 8 * c_in, 1, 1)[0]
                + linear_macs(8 * c_in, num_classes))
    macs = 0
    for module in exit_cfg.modules:
        out = (module.resize - module.kernel) // 2 + 1
        macs += out * out * c_in * module.expansion * c_in * module.kernel * module.kernel
        c_in *= module.expansion
    return macs + linear_macs(c_in, num_classes)


def analytic_segment_macs(arch: ArchConfig) -> dict[str, float]:
    """MMACs of every segment of ``arch`` (``stem``, ``stage1``…``stage5``, ``exit{p}``, ``head``),
    the segments ``aebnas.cost.macs.segment_macs`` reports."""
    w = arch.width_mult
    stem_c, first_c = round_channels(C.STEM_CHANNELS * w), round_channels(C.FIRST_BLOCK_CHANNELS * w)
    stem, hw = conv_macs(arch.in_channels, stem_c, 3, arch.resolution, stride=2)
    first, hw = block_macs(stem_c, first_c, 3, 1, 1, False, hw)  # first block: depthwise, no expansion
    seg = {"stem": stem + first}
    c = first_c
    exits = {e.position: e for e in arch.exits}
    for s, stage in enumerate(arch.stages):
        out_c, macs = round_channels(C.STAGE_CHANNELS[s] * w), 0
        for b, block in enumerate(stage.blocks):
            m, hw = block_macs(c, out_c, block.kernel, block.expansion, C.STAGE_STRIDES[s] if b == 0 else 1,
                               C.STAGE_USE_SE[s], hw)
            macs, c = macs + m, out_c
        seg[f"stage{s + 1}"] = macs
        if s + 1 in exits:
            seg[f"exit{s + 1}"] = exit_branch_macs(c, exits[s + 1], hw, arch.num_classes)
    expand = round_channels(C.HEAD_EXPAND_CHANNELS * w)
    feature = round_channels(C.HEAD_FEATURE_CHANNELS * w) if w > 1.0 else C.HEAD_FEATURE_CHANNELS
    # Head: 1×1 expand, global pooling, 1×1 conv to the features (no bias) on the 1×1 map, classifier.
    seg["head"] = conv_macs(c, expand, 1, hw)[0] + conv_macs(expand, feature, 1, 1)[0] \
        + linear_macs(feature, arch.num_classes)
    return {name: macs / 1e6 for name, macs in seg.items()}


class ExitMacs(NamedTuple):
    """Per-exit cost pieces (MMACs), laid out as ``ExitCosts``: backbone (E+1,) up to each exit
    and, last, the whole backbone plus the head; branch (E,) each exit's branch."""

    backbone: list[float]
    branch: list[float]


def analytic_exit_macs(arch: ArchConfig) -> ExitMacs:
    """The :class:`ExitMacs` of ``arch`` from :func:`analytic_segment_macs`."""
    seg = analytic_segment_macs(arch)
    upto, total = [], seg["stem"]
    for s in range(1, C.NUM_STAGES + 1):
        total += seg[f"stage{s}"]
        upto.append(total)
    return ExitMacs(backbone=[upto[p - 1] for p in arch.exit_positions] + [upto[-1] + seg["head"]],
                    branch=[seg[f"exit{p}"] for p in arch.exit_positions])


# ======================================================================== exits and thresholds
def loop_costs(costs: Any, thresholds: Sequence[float]) -> list[float]:
    """C_i (MMACs) of each exit and the final for these thresholds: backbone up to i, every
    active branch before i and its own branch; final: backbone, head and every active branch.
    An exit is active when its threshold is < 1.0. ``costs``: anything with ``backbone`` and
    ``branch`` sequences (``ExitCosts``, :class:`ExitMacs`)."""
    backbone, branch = [float(v) for v in costs.backbone], [float(v) for v in costs.branch]
    e = len(thresholds)
    c, paid = [], 0.0
    for j in range(e):
        c.append(backbone[j] + paid + branch[j])
        if thresholds[j] < 1.0:
            paid += branch[j]
    c.append(backbone[e] + paid)
    return c


class LoopSimulation(NamedTuple):
    """What one threshold vector does on cached outputs, by :func:`loop_simulate`."""

    exit_index: list[int]      # exit taken by each sample (E = the final classifier)
    accuracy: float            # %
    utilization: list[float]   # (E+1,) fraction of samples leaving at each exit
    avg_macs: float            # MMACs per sample


@dataclass
class LoopTuneResult:
    """The best threshold vector of a grid by :func:`loop_tune_thresholds`, and every vector tried."""

    thresholds: list[float]
    score: float
    accuracy: float                                  # % of the best vector
    avg_macs: float                                  # MMACs of the best vector
    evaluated: list[tuple[tuple[float, ...], float, float]]  # (vector, accuracy %, MMACs), product order


def loop_simulate(outputs: Any, thresholds: Sequence[float], costs: Any) -> LoopSimulation:
    """Walk every sample through the exits: it leaves at the first active exit whose confidence
    reaches the threshold, else at the final classifier. ``outputs``: anything with
    ``confidence`` and ``prediction`` (E+1, N) and ``labels`` (N,) (``ExitOutputs``)."""
    conf, correct = _as_lists(outputs)
    n, e = len(outputs.labels), len(thresholds)
    c = loop_costs(costs, thresholds)
    taken, right, macs = _walk(conf, correct, thresholds, c)
    return LoopSimulation(exit_index=taken, accuracy=100.0 * right / n,
                          utilization=[taken.count(j) / n for j in range(e + 1)], avg_macs=macs / n)


def loop_tune_thresholds(outputs: Any, costs: Any, target_macs: float, grid: Sequence[float] = PAPER_GRID,
                         lam: float = PAPER_LAMBDA, budget_macs: float | None = None,
                         round_above: float = ROUND_TO_ONE_ABOVE) -> LoopTuneResult:
    """Try every threshold vector of ``grid`` (values above ``round_above`` rounded to 1.0) with a
    per-sample loop; returns the best by the paper's score accuracy − λ·100·|MMACs − target|/target
    (the first in ``itertools.product`` order on ties). With ``budget_macs`` only vectors averaging
    at most the budget count, or, when none does, the cheapest ones."""
    values = sorted({1.0 if g > round_above else float(g) for g in grid})
    conf, correct = _as_lists(outputs)
    n, e = len(outputs.labels), len(conf) - 1
    evaluated = []
    for th in itertools.product(values, repeat=e):
        _, right, macs = _walk(conf, correct, th, loop_costs(costs, th))
        evaluated.append((th, 100.0 * right / n, macs / n))
    fits = [r for r in evaluated if budget_macs is None or r[2] <= budget_macs + 1e-9]
    if not fits:
        cheapest = min(r[2] for r in evaluated)
        fits = [r for r in evaluated if r[2] == cheapest]
    best, best_score = None, 0.0
    for th, acc, avg in fits:
        score = acc - lam * 100.0 * abs(avg - target_macs) / target_macs
        if best is None or score > best_score:
            best, best_score = (th, acc, avg), score
    th, acc, avg = best
    return LoopTuneResult(thresholds=list(th), score=best_score, accuracy=acc, avg_macs=avg, evaluated=evaluated)


def _as_lists(outputs: Any) -> tuple[list[list[float]], list[list[int]]]:
    """Confidences (as float32 values, their stored precision) and right/wrong (1/0) per exit, as
    Python lists: the loops below index them sample by sample."""
    conf = np.asarray(outputs.confidence, dtype=np.float32).tolist()
    labels = np.asarray(outputs.labels).tolist()
    correct = [[int(p == y) for p, y in zip(row, labels)] for row in np.asarray(outputs.prediction).tolist()]
    return conf, correct


def _walk(conf: list[list[float]], correct: list[list[int]], thresholds: Sequence[float],
          c: Sequence[float]) -> tuple[list[int], int, float]:
    """(exit of each sample, right answers, total MMACs). A confidence passes a threshold when it is
    ≥ the threshold rounded to float32: confidences are float32, and ``EarlyExitNet.infer``
    compares them with a Python float in float32."""
    e = len(thresholds)
    active = [t < 1.0 for t in thresholds]
    th32 = [float(np.float32(t)) for t in thresholds]
    taken, right, macs = [], 0, 0.0
    for s in range(len(correct[0])):
        k = e
        for j in range(e):
            if active[j] and conf[j][s] >= th32[j]:
                k = j
                break
        taken.append(k)
        right += correct[k][s]
        macs += c[k]
    return taken, right, macs
