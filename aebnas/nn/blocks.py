"""Small layers with one job each (conv-BN-act, squeeze-excite, inverted residual) and the
builders that turn ``aebnas.config`` rows into them: :func:`build_stem`, :func:`build_head`,
and the one weight initialisation, :func:`init_weights`.

``aebnas.nn.network`` (the plain network), ``aebnas.nn.elastic`` (the supernet) and
``aebnas.cost.macs`` (its pieces) build the stem and head with these, so each is typed once."""

from __future__ import annotations

import torch
from torch import nn

from ..config import BlockRow, HeadRow, StemRow, make_divisible

# PyTorch's default BN momentum (0.1) rather than torchvision MobileNetV3's 0.01: a
# candidate trains for a few epochs only, and with 0.01 its running statistics lag so far
# behind that eval-mode predictions collapse to one class (measured, see docs/design.md).
BN_MOMENTUM = 0.1

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "hswish": nn.Hardswish}
SE_REDUCTION = 4  # MobileNetV3 / Once-for-All: the squeeze is a quarter of the channels


def se_channels(channels: int) -> int:
    """Squeeze width of a squeeze-excite on ``channels``: ``channels / 4`` made divisible by 8."""
    return make_divisible(channels / SE_REDUCTION)


def expanded_channels(in_channels: int, expansion: int) -> int:
    """Middle channels of an inverted residual: ``in·expansion`` made divisible by 8 (no expand conv at 1)."""
    return make_divisible(in_channels * expansion) if expansion != 1 else in_channels


def make_activation(name: str | None) -> nn.Module:
    """The activation ``name`` as a layer. In place only where that is free in training: ReLU's backward
    pass reads its output, h-swish's its input, which autograd would first copy (one kernel more per call)."""
    if name is None:
        return nn.Identity()
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not one of {tuple(ACTIVATIONS)}")
    return ACTIVATIONS[name](inplace=name == "relu")


class ConvBNAct(nn.Sequential):
    """k×k convolution (no bias; 'same' padding unless ``padding`` is given) → BatchNorm → activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1, activation: str | None = "relu", padding: int | None = None) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2 if padding is None else padding,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
            make_activation(activation),
        )
        self.out_channels = out_channels


class SqueezeExcite(nn.Module):
    """Channel attention as in MobileNetV3 / Once-for-All (:func:`se_channels`, hard-sigmoid gate)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        mid = se_channels(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, mid, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(mid, channels, 1, bias=True)
        self.gate = nn.Hardsigmoid()  # not in place: its backward reads its input (autograd would copy it)

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


def build_stem(stem: StemRow, first_block: BlockRow) -> nn.Sequential:
    """The stem segment: the stem convolution, then the fixed first block (``block_rows()[0]``)."""
    return nn.Sequential(
        ConvBNAct(stem.in_channels, stem.out_channels, stem.kernel, stride=stem.stride, activation=stem.activation),
        InvertedResidual.from_row(first_block))


def build_head(head: HeadRow) -> nn.Sequential:
    """The final classifier a :class:`~aebnas.config.HeadRow` describes; gives logits (N, classes)."""
    return nn.Sequential(
        ConvBNAct(head.in_channels, head.expand_channels, 1, activation=head.activation),
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(head.expand_channels, head.feature_channels, 1, bias=False),
        make_activation(head.activation),
        nn.Flatten(1),
        nn.Linear(head.feature_channels, head.num_classes),
    )


def init_weights(model: nn.Module) -> None:
    """Initialise every conv, BatchNorm and linear layer of ``model`` in place (MobileNetV3's rule).

    Walks ``model.modules()`` in registration order, so a seed gives the same weights as long
    as the layers are registered in the same order (the supernet's elastic ops hold plain layers).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
