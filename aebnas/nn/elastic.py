"""A weight-sharing supernet: one elastic network holding every subnet of a search space.

``ElasticEarlyExitNet(space, width_mult, num_classes)`` holds the largest weights of every
layer; ``forward(x, arch)`` runs the subnet ``arch`` by slicing them, and
``extract(supernet, arch)`` copies that subnet into a plain :class:`EarlyExitNet`, so
trials, cost, export and retrain keep working on ``EarlyExitNet`` unchanged.

Slicing follows Once-for-All: a subnet uses the first ``d`` blocks of a stage, the first
channels of every layer and the centre ``k×k`` of the largest depthwise kernel. The layers
are the elastic ops of ``elastic_ops`` (one per op kind); the blocks here pass each op its
slice from the sub-architecture given to every call — there is no ``active_*`` state — so
one code path runs and extracts a subnet. Exit branches are elastic too (one per exit
position, with EDANAS's exit beside the paper's; no published code shares them): see docs/supernet.md.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (EXIT_MODULE_ACTIVATION, EXIT_MODULE_STRIDE, NUM_STAGES, ArchConfig, BlockConfig, BlockRow,
                      ExitConfig, ExitModuleConfig, ExitRow, SpaceValues, largest_arch, uniform_arch)
from ..settings import DEFAULT_CONFIDENCE
from .blocks import InvertedResidual, build_head, build_stem, expanded_channels, init_weights
from .elastic_ops import ElasticConv2d, ElasticConvBNAct, ElasticDepthwiseConv2d, ElasticLinear, ElasticSqueezeExcite
from .exits import ExitBranch, ExitModule, resize_bicubic
from .network import EarlyExitNet


# --------------------------------------------------------------------------- blocks


class ElasticInvertedResidual(nn.Module):
    """Every inverted residual one block position can hold: largest kernel, largest expansion.

    ``row`` is the block position's row with the largest kernel; ``expansions`` the
    expansions a subnet may pick (expansion 1 skips the expand conv, as in InvertedResidual).
    """

    def __init__(self, row: BlockRow, expansions: tuple[int, ...]) -> None:
        super().__init__()
        mid = max(expanded_channels(row.in_channels, e) for e in expansions)
        self.in_channels, self.out_channels = row.in_channels, row.out_channels
        self.expand = (ElasticConvBNAct(ElasticConv2d(row.in_channels, mid), row.activation)
                       if any(e != 1 for e in expansions) else None)
        self.depthwise = ElasticConvBNAct(ElasticDepthwiseConv2d(mid, row.kernel, row.stride), row.activation)
        self.se = ElasticSqueezeExcite(mid) if row.use_se else None
        self.project = ElasticConvBNAct(ElasticConv2d(mid, row.out_channels), None)
        self.use_residual = row.stride == 1 and row.in_channels == row.out_channels

    def forward(self, x: torch.Tensor, block: BlockConfig) -> torch.Tensor:
        h = x
        if block.expansion != 1:
            h = self.expand(h, out_channels=expanded_channels(self.in_channels, block.expansion))
        h = self.depthwise(h, kernel=block.kernel)
        if self.se is not None:
            h = self.se(h)
        h = self.project(h, out_channels=self.out_channels)
        return x + h if self.use_residual else h

    def copy_to(self, plain: InvertedResidual, block: BlockConfig) -> None:
        """Copy the slices of subnet block ``block`` into ``plain`` (an ``InvertedResidual`` of it)."""
        layers: Iterator[nn.Module] = iter(plain.block)
        if block.expansion != 1:
            self.expand.copy_to(next(layers))
        self.depthwise.copy_to(next(layers))
        if self.se is not None:
            self.se.copy_to(next(layers))
        self.project.copy_to(next(layers))


class ElasticExitModule(nn.Module):
    """Every paper's exit module one branch position can hold: the largest kernel and expansion.

    A module resizes its input, so the weights depend on its input channels only: module 1 of an exit
    after a stage of C channels holds a ``[C·e_max, C, k_max, k_max]`` convolution; a subnet's kernel k
    takes its centre, expansion e its first C·e output channels (and the first input channels when the
    input is narrower, as module 2's is after an expansion below the largest).
    """

    def __init__(self, max_in: int, max_kernel: int, max_expansion: int) -> None:
        super().__init__()
        self.conv = ElasticConvBNAct(ElasticConv2d(max_in, max_in * max_expansion, max_kernel=max_kernel,
                                                   stride=EXIT_MODULE_STRIDE), EXIT_MODULE_ACTIVATION)

    def forward(self, x: torch.Tensor, module: ExitModuleConfig) -> torch.Tensor:
        h = self.conv(resize_bicubic(x, module.resize), out_channels=x.shape[1] * module.expansion,
                      kernel=module.kernel)
        return F.max_pool2d(h, 2) if module.pools else h

    def copy_to(self, plain: ExitModule) -> None:
        """Copy the slices of ``plain``'s shape into ``plain`` (resize and pooling have no weights)."""
        self.conv.copy_to(plain[1])


class ElasticExitBranch(nn.Module):
    """Every exit branch of a space at one position: the paper's, up to two elastic modules and a classifier
    per depth (one module's features and two modules' are different things), and EDANAS's (``edanas``, one
    plain branch: its shape is fixed by the position's channels)."""

    def __init__(self, row: ExitRow, space: SpaceValues) -> None:
        super().__init__()
        kernel, expansion, c = max(space.exit_kernels), max(space.exit_expansions), row.in_channels
        depths = 2 if max(space.exit_m2_resizes) > 0 else 1
        self.features = nn.ModuleList(ElasticExitModule(c * expansion ** d, kernel, expansion) for d in range(depths))
        self.classifiers = nn.ModuleList(ElasticLinear(c * expansion ** (d + 1), row.num_classes)
                                         for d in range(depths))
        self.edanas = ExitBranch(dataclasses.replace(row, branch="edanas", modules=()))

    def forward(self, x: torch.Tensor, exit_cfg: ExitConfig) -> torch.Tensor:
        if exit_cfg.branch == "edanas":
            return self.edanas(x)
        h = x
        for module, module_cfg in zip(self.features, exit_cfg.modules):
            h = module(h, module_cfg)
        return self.classifiers[exit_cfg.depth - 1](h.mean((2, 3)))  # global average pooling (as elastic_ops' SE)

    def copy_to(self, plain: ExitBranch, exit_cfg: ExitConfig) -> None:
        """Copy the slices of exit ``exit_cfg`` into ``plain`` (an ``ExitBranch`` of it)."""
        if exit_cfg.branch == "edanas":
            plain.load_state_dict(self.edanas.state_dict())
            return
        for module, plain_module in zip(self.features, plain.features):
            module.copy_to(plain_module)
        self.classifiers[exit_cfg.depth - 1].copy_to(plain.classifier)


# --------------------------------------------------------------------------- network


class ElasticEarlyExitNet(nn.Module):
    """Every ``EarlyExitNet`` of ``space`` at one width, number of classes and input channels.

    Per stage ``max(space.depths)`` elastic blocks (a subnet runs the first ``depth``), one
    elastic exit branch per position in ``space.exit_positions`` (``branches[s]``: the exit
    after stage ``s + 1``, ``Identity`` where the space has none). Stem, first block and
    head are fixed: built from their rows by the builders ``EarlyExitNet`` uses. Any input resolution.
    """

    def __init__(self, space: SpaceValues, width_mult: float, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.space, self.width_mult = space, float(width_mult)
        self.num_classes, self.in_channels = num_classes, in_channels
        self.stem, self.head = _fixed_parts(uniform_arch(1, 3, 1, width_mult=width_mult, num_classes=num_classes,
                                                         in_channels=in_channels))
        largest = uniform_arch(max(space.depths), max(space.kernels), max(space.expansions),
                               width_mult=width_mult, num_classes=num_classes, in_channels=in_channels)
        rows = largest.block_rows()
        self.stages = nn.ModuleList(
            nn.ModuleList(ElasticInvertedResidual(r, space.expansions) for r in rows if r.stage == s)
            for s in range(1, NUM_STAGES + 1))
        rows = {row.position: row for row in largest_arch(space, width_mult=width_mult, num_classes=num_classes,
                                                          in_channels=in_channels).exit_rows()}
        self.branches = nn.ModuleList(
            ElasticExitBranch(rows[s + 1], space) if s + 1 in rows else nn.Identity() for s in range(NUM_STAGES))
        # The same initialisation as every candidate (the elastic ops hold plain layers).
        init_weights(self)

    def forward(self, x: torch.Tensor, arch: ArchConfig) -> list[torch.Tensor]:
        """Logits of subnet ``arch``: each of its exits (position order), then the final classifier.

        Raises ValueError (the reason from :func:`covers`) if ``arch`` is not a subnet.
        """
        reason = covers(self, arch)
        if reason is not None:
            raise ValueError(reason)
        by_position = {e.position: e for e in arch.exits}
        outputs: list[torch.Tensor] = []
        h = self.stem(x)
        for s, (stage, stage_cfg) in enumerate(zip(self.stages, arch.stages)):
            for block, block_cfg in zip(stage, stage_cfg.blocks):
                h = block(h, block_cfg)
            if s + 1 in by_position:
                outputs.append(self.branches[s](h, by_position[s + 1]))
        outputs.append(self.head(h))
        return outputs


def _fixed_parts(smallest: ArchConfig) -> tuple[nn.Sequential, nn.Sequential]:
    """The supernet's stem and head: those of every subnet (here of ``smallest``), built and initialised.

    ``smallest``'s five one-block stages are built and initialised between them, then dropped:
    supernets so far drew their initial weights after these random numbers, and a seed must keep
    giving the same supernet (the embedded one included).
    """
    rows = smallest.block_rows()
    stem = build_stem(smallest.stem_row(), rows[0])
    stages = nn.ModuleList(InvertedResidual.from_row(r) for r in rows[1:])
    head = build_head(smallest.head_row())
    init_weights(nn.ModuleList([stem, stages, head]))
    return stem, head


def _outside(value: int, allowed: tuple[int, ...], what: str) -> str | None:
    if value in allowed:
        return None
    if value > max(allowed):
        return f"{what} is larger than the supernet's {max(allowed)}"
    return f"{what} is not one of the supernet's {allowed}"


def covers(supernet: ElasticEarlyExitNet, arch: ArchConfig) -> str | None:
    """None if ``arch`` is a subnet of ``supernet``, else a sentence saying why not.

    A subnet has the supernet's width, classes and input channels and takes every depth,
    kernel, expansion, exit position and exit-module value from the supernet's space; an
    exit may be either branch (``aebnas`` or ``edanas``).
    The resolution is not checked: the network runs on any input size.
    """
    for name in ("width_mult", "num_classes", "in_channels"):
        if getattr(arch, name) != getattr(supernet, name):
            return f"{name}={getattr(arch, name)} differs from the supernet's {getattr(supernet, name)}"
    space = supernet.space
    for s, stage in enumerate(arch.stages, start=1):
        reason = _outside(stage.depth, space.depths, f"depth {stage.depth} of stage {s}")
        for b, block in enumerate(stage.blocks):
            reason = (reason or _outside(block.kernel, space.kernels, f"kernel {block.kernel} of stage {s} block {b}")
                      or _outside(block.expansion, space.expansions,
                                  f"expansion {block.expansion} of stage {s} block {b}"))
        if reason:
            return reason
    for e in arch.exits:
        reason = _outside(e.position, space.exit_positions, f"exit position {e.position}")
        if reason:
            return reason
        if e.branch == "edanas":
            continue
        depths = len(supernet.branches[e.position - 1].features)
        if not 1 <= e.depth <= depths:
            return f"exit {e.position} has {e.depth} modules; the supernet's branches have 1 to {depths}"
        for m, module in enumerate(e.modules, start=1):
            resizes = space.exit_m1_resizes if m == 1 else space.exit_m2_resizes
            where = f"of exit {e.position} module {m}"
            reason = (_outside(module.resize, resizes, f"resize {module.resize} {where}")
                      or _outside(module.kernel, space.exit_kernels, f"kernel {module.kernel} {where}")
                      or _outside(module.expansion, space.exit_expansions, f"expansion {module.expansion} {where}")
                      or _outside(module.pool, space.exit_pools, f"pool {module.pool} {where}"))
            if reason:
                return reason
    return None


@torch.no_grad()
def extract(supernet: ElasticEarlyExitNet, arch: ArchConfig, confidence: str = DEFAULT_CONFIDENCE) -> EarlyExitNet:
    """A plain ``EarlyExitNet(arch, confidence)`` holding copies of the subnet's weights and BN statistics.

    On the supernet's device and dtype, in its training mode; raises ValueError (the reason
    from :func:`covers`) if ``arch`` is not a subnet.
    """
    reason = covers(supernet, arch)
    if reason is not None:
        raise ValueError(reason)
    net = EarlyExitNet(arch, confidence).to(next(supernet.parameters()))
    net.stem.load_state_dict(supernet.stem.state_dict())
    net.head.load_state_dict(supernet.head.state_dict())
    for stage, plain_stage, stage_cfg in zip(supernet.stages, net.stages, arch.stages):
        for block, plain_block, block_cfg in zip(stage, plain_stage, stage_cfg.blocks):
            block.copy_to(plain_block, block_cfg)
    for e in arch.exits:
        supernet.branches[e.position - 1].copy_to(net.branches[e.position - 1], e)
    return net.train(supernet.training)


__all__ = ["ElasticEarlyExitNet", "covers", "extract", "ElasticInvertedResidual", "ElasticExitModule",
           "ElasticExitBranch", "expanded_channels"]
