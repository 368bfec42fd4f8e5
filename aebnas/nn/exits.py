"""Exit branches: the small classifiers that let easy inputs leave early.

Two kinds (``ExitRow.branch``, docs/design.md "Exit branches"):

- ``aebnas``, the paper's searched branch (its authors' ``ExitBlock_Modified``): one or two
  :class:`ExitModule`, each a bicubic resize to a fixed size and an unpadded strided convolution,
  then global average pooling and a linear classifier.
- ``edanas``, EDANAS's fixed exit (``ExitBlock``): 1×1 conv C → 6C (BN, h-swish), global average
  pooling, 1×1 conv 6C → 8C (h-swish, no BN), linear classifier.

Both are an :class:`ExitBranch` with the same four parts (``features``, ``pool``, ``mix``,
``classifier``), so cost, export and the supernet walk one structure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EDANAS_ACTIVATION, EXIT_MODULE_ACTIVATION, EXIT_MODULE_STRIDE, ExitModuleConfig, ExitRow
from .blocks import ConvBNAct, make_activation


def resize_bicubic(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """``x`` resized to ``size × size`` pixels (or ``size`` = (height, width)): bicubic, ``align_corners=False``
    (as the authors' code)."""
    return F.interpolate(x, size=(size, size) if isinstance(size, int) else size, mode="bicubic",
                         align_corners=False)


class Resize(nn.Module):
    """:func:`resize_bicubic` as a layer (element-wise work: not counted in MACs, as BatchNorm is not)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_bicubic(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, mode=bicubic"


class ExitModule(nn.Sequential):
    """The paper's exit module: resize → k×k conv, stride 2, no padding, C → C·expansion (BN, ReLU) →
    2×2 max pool when ``cfg.pools``."""

    def __init__(self, in_channels: int, cfg: ExitModuleConfig) -> None:
        layers: list[nn.Module] = [
            Resize(cfg.resize),
            ConvBNAct(in_channels, in_channels * cfg.expansion, cfg.kernel, stride=EXIT_MODULE_STRIDE, padding=0,
                      activation=EXIT_MODULE_ACTIVATION)]
        if cfg.pools:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


def edanas_features(row: ExitRow) -> nn.Sequential:
    """EDANAS's expand conv: 1×1, C → 6C, BN, h-swish."""
    return nn.Sequential(ConvBNAct(row.in_channels, row.expand_channels, 1, activation=EDANAS_ACTIVATION))


def edanas_mix(row: ExitRow) -> nn.Sequential:
    """EDANAS's feature conv after pooling: 1×1, 6C → 8C, no BN, h-swish."""
    return nn.Sequential(nn.Conv2d(row.expand_channels, row.features, 1, bias=False),
                         make_activation(EDANAS_ACTIVATION))


class ExitBranch(nn.Module):
    """The exit an :class:`~aebnas.config.ExitRow` describes: ``features`` → global average ``pool`` →
    ``mix`` (EDANAS's feature conv; identity for the paper's branch) → linear ``classifier``."""

    def __init__(self, row: ExitRow) -> None:
        super().__init__()
        if row.branch == "edanas":
            self.features = edanas_features(row)
            self.mix: nn.Module = edanas_mix(row)
        else:
            self.features = nn.Sequential(*(ExitModule(c_in, cfg)
                                            for (c_in, _), cfg in zip(row.module_channels(), row.modules)))
            self.mix = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(row.features, row.num_classes)
        self.position, self.branch = row.position, row.branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.mix(self.pool(self.features(x))), 1))


__all__ = ["ExitBranch", "ExitModule", "Resize", "resize_bicubic", "edanas_features", "edanas_mix"]
