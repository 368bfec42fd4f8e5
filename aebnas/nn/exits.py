"""Exit branches: the small classifiers that let easy inputs leave early."""

from __future__ import annotations

import torch
from torch import nn

from ..config import EXIT_ACTIVATION, ExitModuleConfig, ExitRow
from .blocks import ConvBNAct


def exit_expanded_channels(in_channels: int, expansion: int) -> int:
    """Middle channels of an exit module: ``in_channels × expansion`` (not rounded, unlike a block's)."""
    return in_channels * expansion


class ExitModule(nn.Sequential):
    """1×1 expand (if expansion > 1) → k×k depthwise → 1×1 project, BN + activation, optional 2×2 avg pool."""

    def __init__(self, in_channels: int, cfg: ExitModuleConfig, activation: str = EXIT_ACTIVATION) -> None:
        mid = exit_expanded_channels(in_channels, cfg.expansion)
        layers: list[nn.Module] = []
        if cfg.expansion > 1:
            layers.append(ConvBNAct(in_channels, mid, 1, activation=activation))
        layers.append(ConvBNAct(mid, mid, cfg.kernel, groups=mid, activation=activation))
        layers.append(ConvBNAct(mid, cfg.channels, 1, activation=activation))
        if cfg.pool:
            # ceil_mode: a 1×1 feature map (small resolutions, late exits) stays 1×1.
            layers.append(nn.AvgPool2d(2, ceil_mode=True))
        super().__init__(*layers)


class ExitBranch(nn.Module):
    """The exit an :class:`~aebnas.config.ExitRow` describes: its modules, then global average
    pooling and a linear classifier."""

    def __init__(self, row: ExitRow) -> None:
        super().__init__()
        modules = []
        channels = row.in_channels
        for module_cfg in row.modules:
            modules.append(ExitModule(channels, module_cfg, row.activation))
            channels = module_cfg.channels
        self.features = nn.Sequential(*modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, row.num_classes)
        self.position = row.position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
