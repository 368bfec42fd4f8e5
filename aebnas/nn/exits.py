"""Exit branches: the small classifiers that let easy inputs leave early."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ExitConfig, ExitModuleConfig
from .blocks import ConvBNAct


class ExitModule(nn.Sequential):
    """1×1 expand (if expansion > 1) → k×k depthwise → 1×1 project, BN + hard-swish, optional 2×2 avg pool."""

    def __init__(self, in_channels: int, cfg: ExitModuleConfig) -> None:
        mid = in_channels * cfg.expansion
        layers: list[nn.Module] = []
        if cfg.expansion > 1:
            layers.append(ConvBNAct(in_channels, mid, 1, activation="hswish"))
        layers.append(ConvBNAct(mid, mid, cfg.kernel, groups=mid, activation="hswish"))
        layers.append(ConvBNAct(mid, cfg.channels, 1, activation="hswish"))
        if cfg.pool:
            # ceil_mode: a 1×1 feature map (small resolutions, late exits) stays 1×1.
            layers.append(nn.AvgPool2d(2, ceil_mode=True))
        super().__init__(*layers)


class ExitBranch(nn.Module):
    """An exit: its modules, then global average pooling and a linear classifier."""

    def __init__(self, in_channels: int, cfg: ExitConfig, num_classes: int) -> None:
        super().__init__()
        modules = []
        channels = in_channels
        for module_cfg in cfg.modules:
            modules.append(ExitModule(channels, module_cfg))
            channels = module_cfg.channels
        self.features = nn.Sequential(*modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.position = cfg.position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
