"""Small layers with one job each: conv-BN-act, squeeze-excite, inverted residual."""

from __future__ import annotations

import torch
from torch import nn

from ..config import BlockRow, make_divisible

# PyTorch's default BN momentum (0.1) rather than torchvision MobileNetV3's 0.01: a
# candidate trains for a few epochs only, and with 0.01 its running statistics lag so far
# behind that eval-mode predictions collapse to one class (measured, see docs/design.md).
BN_MOMENTUM = 0.1

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "hswish": nn.Hardswish}


def expanded_channels(in_channels: int, expansion: int) -> int:
    """Middle channels of an inverted residual: ``in·expansion`` made divisible by 8 (no expand conv at 1)."""
    return make_divisible(in_channels * expansion) if expansion != 1 else in_channels


def make_activation(name: str | None) -> nn.Module:
    if name is None:
        return nn.Identity()
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not one of {tuple(ACTIVATIONS)}")
    return ACTIVATIONS[name](inplace=True)


class ConvBNAct(nn.Sequential):
    """k×k convolution (no bias, 'same' padding) → BatchNorm → activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1, activation: str | None = "relu") -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
            make_activation(activation),
        )
        self.out_channels = out_channels


class SqueezeExcite(nn.Module):
    """Channel attention as in MobileNetV3 / Once-for-All (reduction 4, hard-sigmoid gate)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        mid = make_divisible(channels / reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, mid, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(mid, channels, 1, bias=True)
        self.gate = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: 1×1 expand → k×k depthwise (→ SE) → 1×1 project, residual if shapes match."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, expansion: int,
                 stride: int = 1, use_se: bool = False, activation: str = "relu") -> None:
        super().__init__()
        mid = expanded_channels(in_channels, expansion)
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNAct(in_channels, mid, 1, activation=activation))
        layers.append(ConvBNAct(mid, mid, kernel, stride, groups=mid, activation=activation))
        if use_se:
            layers.append(SqueezeExcite(mid))
        layers.append(ConvBNAct(mid, out_channels, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    @classmethod
    def from_row(cls, row: BlockRow) -> "InvertedResidual":
        """The block a :class:`~aebnas.config.BlockRow` describes."""
        return cls(row.in_channels, row.out_channels, row.kernel, row.expansion, row.stride, row.use_se,
                   row.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out
