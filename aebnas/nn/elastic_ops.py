"""Elastic ops: one module per op kind holding the largest weights, sliced per call.

As Once-for-All's ``elastic_nn/modules/dynamic_op.py`` (dense conv, depthwise conv,
BatchNorm, linear, squeeze-excite), but without its mutable ``active_*`` state: every call
says which slice it wants (output channels, kernel); input channels are those of the
input. A subnet takes the first channels and the centre of the largest kernel.
``copy_to(plain)`` copies the slice the plain layer's shape asks for, through the same
``sliced`` method ``forward`` uses (a slice is defined once), and refuses a shape mismatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BN_MOMENTUM, ConvBNAct, SqueezeExcite, make_activation, se_channels


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    # Tensor.copy_ broadcasts; a slice of the wrong shape must fail, not spread.
    if dst.shape != src.shape:
        raise ValueError(f"{what}: the plain layer has shape {tuple(dst.shape)}, the supernet's slice "
                         f"{tuple(src.shape)}")
    dst.copy_(src)


def centre_crop(weight: torch.Tensor, kernel: int) -> torch.Tensor:
    """The centre ``kernel × kernel`` of a (…, K, K) weight (a view)."""
    start = (weight.shape[-1] - kernel) // 2
    return weight[..., start:start + kernel, start:start + kernel]


class ElasticConv2d(nn.Module):
    """Dense convolution without padding (1×1 by default); a subnet uses the first ``out`` × first ``in``
    channels and the centre ``kernel × kernel`` of the largest weight."""

    def __init__(self, max_in: int, max_out: int, bias: bool = False, max_kernel: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(max_in, max_out, max_kernel, stride, bias=bias)

    def sliced(self, out_channels: int, in_channels: int,
               kernel: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the subnet layer: centre of weight[:out, :in], bias[:out]."""
        bias = None if self.conv.bias is None else self.conv.bias[:out_channels]
        weight = self.conv.weight[:out_channels, :in_channels]
        return (weight if kernel is None else centre_crop(weight, kernel)), bias

    def forward(self, x: torch.Tensor, out_channels: int, kernel: int | None = None) -> torch.Tensor:
        weight, bias = self.sliced(out_channels, x.shape[1], kernel)
        return F.conv2d(x, weight, bias, self.conv.stride)

    def copy_to(self, conv: nn.Conv2d) -> None:
        """Copy the slice ``conv``'s shape asks for into ``conv`` (same stride, no padding)."""
        if conv.stride != self.conv.stride or conv.padding != self.conv.padding:
            raise ValueError(f"conv: the plain layer has stride={conv.stride}, padding={conv.padding}; the "
                             f"supernet's stride={self.conv.stride}, padding={self.conv.padding}")
        weight, bias = self.sliced(conv.out_channels, conv.in_channels, conv.kernel_size[0])
        _copy(conv.weight, weight, "conv weight")
        if (bias is None) != (conv.bias is None):
            raise ValueError("conv bias: the plain layer and the supernet differ in having one")
        if bias is not None:
            _copy(conv.bias, bias, "conv bias")


class ElasticDepthwiseConv2d(nn.Module):
    """k×k depthwise convolution; a subnet uses the first channels and the centre of the largest kernel."""

    def __init__(self, max_channels: int, max_kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(max_channels, max_channels, max_kernel, stride, padding=max_kernel // 2,
                              groups=max_channels, bias=False)

    def sliced(self, channels: int, kernel: int) -> torch.Tensor:
        """The subnet's weight: first ``channels``, centre ``kernel × kernel``."""
        return centre_crop(self.conv.weight[:channels], kernel)

    def forward(self, x: torch.Tensor, kernel: int) -> torch.Tensor:
        channels = x.shape[1]
        return F.conv2d(x, self.sliced(channels, kernel), None, self.conv.stride, kernel // 2, 1, channels)

    def copy_to(self, conv: nn.Conv2d) -> None:
        """Copy the slice ``conv``'s shape asks for into ``conv`` (a depthwise conv, same stride)."""
        if conv.groups != conv.in_channels or conv.stride != self.conv.stride:
            raise ValueError(f"depthwise conv: the plain layer has groups={conv.groups}, stride={conv.stride}; "
                             f"the supernet's is depthwise with stride={self.conv.stride}")
        _copy(conv.weight, self.sliced(conv.out_channels, conv.kernel_size[0]), "depthwise weight")


class ElasticBatchNorm2d(nn.Module):
    """BatchNorm over the first channels: affine parameters and running statistics are sliced.

    In training mode the running statistics of the slice are updated in place, as
    ``nn.BatchNorm2d`` would (``momentum=None``: cumulative average, as BN recalibration
    sets it on every ``nn.BatchNorm2d`` it finds — the one held here included).
    """

    def __init__(self, max_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(max_channels, momentum=BN_MOMENTUM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, c = self.bn, x.shape[1]
        factor = 0.0
        if bn.training:
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c],
                            bn.training, factor, bn.eps)

    def copy_to(self, bn: nn.BatchNorm2d) -> None:
        """Copy weight, bias, running mean/var (first ``bn.num_features``) and the batch count into ``bn``."""
        c = bn.num_features
        for name in ("weight", "bias", "running_mean", "running_var"):
            _copy(getattr(bn, name), getattr(self.bn, name)[:c], f"BatchNorm {name}")
        bn.num_batches_tracked.copy_(self.bn.num_batches_tracked)


class ElasticLinear(nn.Module):
    """Linear layer; a subnet uses the first input features (and the first outputs)."""

    def __init__(self, max_in: int, max_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(max_in, max_out)

    def sliced(self, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight[:out, :in], bias[:out])."""
        return self.linear.weight[:out_features, :in_features], self.linear.bias[:out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.sliced(self.linear.out_features, x.shape[1]))

    def copy_to(self, linear: nn.Linear) -> None:
        """Copy the slice ``linear``'s shape asks for into ``linear``."""
        weight, bias = self.sliced(linear.out_features, linear.in_features)
        _copy(linear.weight, weight, "linear weight")
        _copy(linear.bias, bias, "linear bias")


class ElasticSqueezeExcite(nn.Module):
    """SqueezeExcite over the first channels; the squeeze width follows them (:func:`se_channels`)."""

    def __init__(self, max_channels: int) -> None:
        super().__init__()
        squeeze = se_channels(max_channels)
        self.reduce = ElasticConv2d(max_channels, squeeze, bias=True)
        self.expand = ElasticConv2d(squeeze, max_channels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        s = F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1), se_channels(channels)))
        return x * F.hardsigmoid(self.expand(s, channels))

    def copy_to(self, se: SqueezeExcite) -> None:
        """Copy the reduce and expand slices into ``se``."""
        self.reduce.copy_to(se.reduce)
        self.expand.copy_to(se.expand)


class ElasticConvBNAct(nn.Module):
    """An elastic conv → elastic BatchNorm → activation (the elastic ``ConvBNAct``).

    ``forward(x, **slice)`` hands the slice (``out_channels=``, ``kernel=``) to the conv;
    the BatchNorm follows the conv's output channels.
    """

    def __init__(self, conv: ElasticConv2d | ElasticDepthwiseConv2d, activation: str | None) -> None:
        super().__init__()
        self.conv = conv
        self.bn = ElasticBatchNorm2d(conv.conv.out_channels)
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor, **conv_slice: int) -> torch.Tensor:
        return self.act(self.bn(self.conv(x, **conv_slice)))

    def copy_to(self, plain: ConvBNAct) -> None:
        """Copy the conv and BatchNorm slices into ``plain``."""
        self.conv.copy_to(plain[0])
        self.bn.copy_to(plain[1])


__all__ = ["centre_crop", "ElasticConv2d", "ElasticDepthwiseConv2d", "ElasticBatchNorm2d", "ElasticLinear",
           "ElasticSqueezeExcite", "ElasticConvBNAct"]
