"""What a candidate costs: MMACs per segment (ptflops) and per exit.

ptflops runs with its **aten** backend, chosen explicitly: it counts multiply-accumulates
of ``aten.convolution`` (every conv: full, depthwise, 1×1, plus one MAC per output
element for a bias) and of matrix products (``aten.mm/addmm/bmm``: linear layers, plus
one MAC per output for a bias). BatchNorm, activations, pooling, the squeeze-excite
product and residual additions are *not* counted: they are element-wise, a few percent
of the total, and counting them depends on how a framework fuses them.

Segments: ``stem`` (stem conv + first block), ``stage1``…``stage5``, ``exit{p}`` (the
branch after stage p) and ``head``. The cost ``C_i`` of exit i (docs/design.md): backbone up to
exit i + every *active* branch at or before it (its own included); final: whole backbone + head +
every active branch. An exit is active when it exists and its threshold is < 1.0.

Two ways measure the segments, one rule assembles them (:func:`costs_from_segments`):
:func:`exit_costs` counts each segment of the built network with ptflops, :class:`PieceCosts`
sums cached pieces (blocks, exit modules) in any unit. The arithmetic from pieces to ``C_i``
(``ExitCosts.cumulative``) is numpy and lives in ``aebnas.exit_policy``.
"""

from __future__ import annotations

import functools
import io
from typing import Callable, Sequence

import numpy as np
import torch
from ptflops import get_model_complexity_info
from torch import nn

from ..config import NUM_STAGES, ArchConfig, ExitRow
from ..exit_policy import MMACS, ExitCosts
from ..nn import EarlyExitNet
from ..nn.blocks import InvertedResidual, build_head, build_stem
from ..nn.exits import ExitModule, edanas_features, edanas_mix

PTFLOPS_BACKEND = "aten"


def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> float:
    """MMACs of one forward pass of ``module`` on one input of shape (C, H, W)."""
    was_training = module.training
    module.eval()
    try:
        macs, _ = get_model_complexity_info(
            module, tuple(input_shape), as_strings=False, print_per_layer_stat=False,
            backend=PTFLOPS_BACKEND, ost=io.StringIO())
    finally:
        module.train(was_training)
    if macs is None:
        raise RuntimeError(f"ptflops could not count {type(module).__name__} on input {input_shape}")
    return macs / 1e6


def segment_macs(arch: ArchConfig) -> dict[str, float]:
    """MMACs of every segment of ``arch`` (cached per architecture; the caller gets a copy)."""
    return dict(_segment_macs(arch))


@functools.lru_cache(maxsize=256)
def _segment_macs(arch: ArchConfig) -> dict[str, float]:
    net = EarlyExitNet(arch).eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        h = torch.zeros(1, arch.in_channels, arch.resolution, arch.resolution)
        out["stem"] = count_macs(net.stem, tuple(h.shape[1:]))
        h = net.stem(h)
        for s in range(NUM_STAGES):
            out[f"stage{s + 1}"] = count_macs(net.stages[s], tuple(h.shape[1:]))
            h = net.stages[s](h)
            if s + 1 in arch.exit_positions:
                out[f"exit{s + 1}"] = count_macs(net.branches[s], tuple(h.shape[1:]))
        out["head"] = count_macs(net.head, tuple(h.shape[1:]))
    return out


def costs_from_segments(arch: ArchConfig, stem: float, stages: Sequence[float], branches: Sequence[float],
                        head: float, unit: str) -> ExitCosts:
    """The :class:`ExitCosts` (in ``unit``) of ``arch`` from the costs of its segments.

    ``stages``: stage 1…5; ``branches``: each exit in position order. The backbone entry of
    exit i is the stem and the stages up to its position; the final's adds the head.
    """
    stage_cum = np.cumsum([stem] + list(stages))
    backbone = [stage_cum[p] for p in arch.exit_positions] + [stage_cum[-1] + head]
    return ExitCosts(backbone=np.array(backbone), branch=np.array(branches), unit=unit)


def exit_costs(arch: ArchConfig) -> ExitCosts:
    """The :class:`ExitCosts` of ``arch`` in MMACs, from ptflops on each segment of the built network."""
    seg = segment_macs(arch)
    return costs_from_segments(arch, seg["stem"], [seg[f"stage{s}"] for s in range(1, NUM_STAGES + 1)],
                               [seg[f"exit{p}"] for p in arch.exit_positions], seg["head"], MMACS)


class PieceCosts:
    """:func:`exit_costs` of many architectures with ptflops called once per *piece*, not per network.

    A network's MMACs are the sum of its pieces' (ptflops counts per layer): the stem, every
    block (its row and input size), every exit branch (its input channels and size) and the
    head. A searcher that scores thousands of proposals meets few new pieces: the quickstart's
    space has a few hundred blocks and branches in all, so after the first proposals a cost is
    a dictionary look-up. ``misses`` counts the measurements made.

    ``measure(key, build, input_shape)`` gives a piece's cost in ``unit`` (default: ptflops
    MMACs of ``build()``); :mod:`aebnas.cost.latency` passes one that reads milliseconds from a
    latency table (``unit="ms"``), or records the pieces a space has, with the same walk over a
    network. A key names a piece in a latency table on disk: keys must not change.
    """

    def __init__(self, measure: Callable[[tuple, Callable[[], nn.Module], tuple[int, ...]], float] | None = None,
                 unit: str = MMACS) -> None:
        self._costs: dict[tuple, float] = {}
        self._measure = measure or _ptflops_macs  # a module-level function: searchers pickle their PieceCosts
        self.unit = unit
        self.misses = 0

    def __setstate__(self, state: dict) -> None:
        # Searcher checkpoints pickled before the cost fields said their unit hold ``_macs``, no unit.
        state.setdefault("_costs", state.pop("_macs", {}))
        state.setdefault("unit", MMACS)
        self.__dict__.update(state)

    def _count(self, key: tuple, build: Callable[[], nn.Module], shape: tuple[int, ...]) -> float:
        if key not in self._costs:
            self._costs[key] = self._measure(key, build, shape)
            self.misses += 1
        return self._costs[key]

    def exit_costs(self, arch: ArchConfig) -> ExitCosts:
        """The :class:`ExitCosts` of ``arch`` in ``self.unit``: by default MMACs, the same as
        ``exit_costs(arch)`` (equal to float rounding: the sums run over pieces, not segments)."""
        stem_row, rows, head_row = arch.stem_row(), arch.block_rows(), arch.head_row()
        h = arch.resolution
        stem = self._count(("stem", stem_row.in_channels, stem_row.out_channels, rows[0], h),
                           lambda: build_stem(stem_row, rows[0]), (stem_row.in_channels, h, h))
        h = _strided(h, stem_row.stride)
        stage_costs = [0.0] * NUM_STAGES
        size_after: dict[int, int] = {}  # spatial size after each stage
        for row in rows[1:]:
            stage_costs[row.stage - 1] += self._count(("block", row, h), lambda r=row: InvertedResidual.from_row(r),
                                                      (row.in_channels, h, h))
            h = _strided(h, row.stride)
            size_after[row.stage] = h
        branches = [self._branch(row, size_after[row.position]) for row in arch.exit_rows()]
        size = size_after[NUM_STAGES]
        head = self._count(("head", head_row.in_channels, head_row.expand_channels, head_row.feature_channels,
                            head_row.num_classes, size),
                           lambda: build_head(head_row), (head_row.in_channels, size, size))
        return costs_from_segments(arch, stem, stage_costs, branches, head, self.unit)

    def _branch(self, row: ExitRow, size: int) -> float:
        """An exit branch as its pieces: the paper's modules (each at its input size and channels) and its
        classifier, or EDANAS's expand conv and its feature conv with the classifier."""
        if row.branch == "edanas":
            return (self._count(("edanas features", row.in_channels, size), lambda: edanas_features(row),
                                (row.in_channels, size, size))
                    + self._count(("edanas mix", row.in_channels, row.num_classes),
                                  lambda: nn.Sequential(edanas_mix(row), nn.Flatten(1),
                                                        nn.Linear(row.features, row.num_classes)),
                                  (row.expand_channels, 1, 1)))
        total = 0.0
        for (channels, _), cfg in zip(row.module_channels(), row.modules):
            total += self._count(("exit module", channels, cfg, size), lambda c=channels, m=cfg: ExitModule(c, m),
                                 (channels, size, size))
            size = cfg.out_size
        return total + self._count(("exit classifier", row.features, row.num_classes),
                                   lambda: nn.Sequential(nn.Flatten(1), nn.Linear(row.features, row.num_classes)),
                                   (row.features, 1, 1))


def _ptflops_macs(key: tuple, build: Callable[[], nn.Module], shape: tuple[int, ...]) -> float:
    """PieceCosts' default measure: ptflops MMACs of the piece."""
    return count_macs(build(), shape)


def _strided(size: int, stride: int) -> int:
    """Spatial size after a 'same'-padded odd-kernel convolution with ``stride``."""
    return (size - 1) // stride + 1


def param_count(arch: ArchConfig) -> int:
    """Number of parameters of the whole network, exits included."""
    return sum(p.numel() for p in EarlyExitNet(arch).parameters())
