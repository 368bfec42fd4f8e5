"""What a candidate costs: MMACs per segment (ptflops) and per exit.

ptflops runs with its **aten** backend, chosen explicitly: it counts multiply-accumulates
of ``aten.convolution`` (every conv: full, depthwise, 1×1, plus one MAC per output
element for a bias) and of matrix products (``aten.mm/addmm/bmm``: linear layers, plus
one MAC per output for a bias). BatchNorm, activations, pooling, the squeeze-excite
product and residual additions are *not* counted: they are element-wise, a few percent
of the total, and counting them depends on how a framework fuses them.

Segments: ``stem`` (stem conv + first block), ``stage1``…``stage5``, ``exit{p}`` (the
branch after stage p) and ``head``. The cost ``C_i`` of exit i (docs/design.md): backbone up to
exit i + every *active* branch before it + its own branch; final: whole backbone + head +
every active branch. An exit is active when it exists and its threshold is < 1.0.
The arithmetic on these pieces (``ExitCosts``) is numpy and lives in ``aebnas.exit_policy``.
"""

from __future__ import annotations

import functools
import io
from typing import Callable

import numpy as np
import torch
from ptflops import get_model_complexity_info
from torch import nn

from .config import NUM_STAGES, ArchConfig, ExitConfig
from .exit_policy import ExitCosts
from .nn import EarlyExitNet
from .nn.blocks import ConvBNAct, InvertedResidual
from .nn.exits import ExitModule

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


def exit_costs(arch: ArchConfig) -> ExitCosts:
    """The :class:`ExitCosts` of ``arch`` from its segment MMACs."""
    seg = segment_macs(arch)
    stage_cum = np.cumsum([seg["stem"]] + [seg[f"stage{s}"] for s in range(1, NUM_STAGES + 1)])
    backbone = [stage_cum[p] for p in arch.exit_positions] + [stage_cum[-1] + seg["head"]]
    branch = [seg[f"exit{p}"] for p in arch.exit_positions]
    return ExitCosts(backbone=np.array(backbone), branch=np.array(branch))


class PieceCosts:
    """:func:`exit_costs` of many architectures with ptflops called once per *piece*, not per network.

    A network's MMACs are the sum of its pieces' (ptflops counts per layer): the stem, every
    block (its row and input size), every exit branch (its input channels and size) and the
    head. A searcher that scores thousands of proposals meets few new pieces: the quickstart's
    space has a few hundred blocks and branches in all, so after the first proposals a cost is
    a dictionary look-up. ``misses`` counts the measurements made.

    ``measure(key, build, input_shape)`` gives a piece's cost (default: ptflops MMACs of
    ``build()``); :mod:`aebnas.latency` passes one that reads milliseconds from a latency
    table, or records the pieces a space has, with the same walk over a network.
    """

    def __init__(self, measure: Callable[[tuple, Callable[[], nn.Module], tuple[int, ...]], float] | None = None
                 ) -> None:
        self._macs: dict[tuple, float] = {}
        self._measure = measure or _ptflops_macs  # a module-level function: searchers pickle their PieceCosts
        self.misses = 0

    def _count(self, key: tuple, build: Callable[[], nn.Module], shape: tuple[int, ...]) -> float:
        if key not in self._macs:
            self._macs[key] = self._measure(key, build, shape)
            self.misses += 1
        return self._macs[key]

    def exit_costs(self, arch: ArchConfig) -> ExitCosts:
        """The :class:`ExitCosts` of ``arch`` in the measure's unit: by default MMACs, the same as
        ``exit_costs(arch)`` (equal to float rounding)."""
        rows = arch.block_rows()
        h = arch.resolution
        stem = self._count(("stem", arch.in_channels, arch.stem_channels, rows[0], h), lambda: nn.Sequential(
            ConvBNAct(arch.in_channels, arch.stem_channels, 3, stride=2, activation="hswish"),
            InvertedResidual.from_row(rows[0])), (arch.in_channels, h, h))
        h = _strided(h, 2)
        stage_macs = [0.0] * NUM_STAGES
        branch_in: dict[int, tuple[int, int]] = {}
        for row in rows[1:]:
            stage_macs[row.stage - 1] += self._count(("block", row, h), lambda r=row: InvertedResidual.from_row(r),
                                                     (row.in_channels, h, h))
            h = _strided(h, row.stride)
            branch_in[row.stage] = (row.out_channels, h)
        stage_cum = np.cumsum([stem] + stage_macs)
        branch = [self._branch(*branch_in[ex.position], ex, arch.num_classes) for ex in arch.exits]
        expand, feature = arch.head_channels
        channels, size = branch_in[NUM_STAGES]
        head = self._count(("head", channels, expand, feature, arch.num_classes, size),
                           lambda: EarlyExitNet(arch).head, (channels, size, size))
        backbone = [stage_cum[p] for p in arch.exit_positions] + [stage_cum[-1] + head]
        return ExitCosts(backbone=np.array(backbone), branch=np.array(branch))


    def _branch(self, channels: int, size: int, ex: ExitConfig, num_classes: int) -> float:
        """An exit branch as its modules (each at its input size) and its classifier."""
        total = 0.0
        for cfg in ex.modules:
            total += self._count(("exit module", channels, cfg, size), lambda c=channels, m=cfg: ExitModule(c, m),
                                 (channels, size, size))
            channels, size = cfg.channels, -(-size // 2) if cfg.pool else size  # ceil_mode pooling
        return total + self._count(("exit classifier", channels, num_classes),
                                   lambda: nn.Sequential(nn.Flatten(1), nn.Linear(channels, num_classes)),
                                   (channels, 1, 1))


def _ptflops_macs(key: tuple, build: Callable[[], nn.Module], shape: tuple[int, ...]) -> float:
    """PieceCosts' default measure: ptflops MMACs of the piece."""
    return count_macs(build(), shape)


def _strided(size: int, stride: int) -> int:
    """Spatial size after a 'same'-padded odd-kernel convolution with ``stride``."""
    return (size - 1) // stride + 1


def param_count(arch: ArchConfig) -> int:
    """Number of parameters of the whole network, exits included."""
    return sum(p.numel() for p in EarlyExitNet(arch).parameters())
