"""Elastic ops: one module per op kind holding the largest weights, sliced per call.

As Once-for-All's ``elastic_nn/modules/dynamic_op.py`` (dense conv, depthwise conv,
BatchNorm, linear, squeeze-excite), but without its mutable ``active_*`` state: every call
says which slice it wants (output channels, kernel); input channels are those of the
input. A subnet takes the first channels and the centre of the largest kernel.
``copy_to(plain)`` copies the slice the plain layer's shape asks for, through the same
``sliced`` method ``forward`` uses (a slice is defined once), and refuses a shape mismatch.

Every parameter slice is made by :func:`take`. By default it is plain indexing, whose backward
pass fills a zeroed copy of the whole weight and adds it into ``.grad``. Inside
:func:`slice_grads_in_place` (``SupernetTraining.backward_step`` enters it) a training forward pass
takes its slices through :class:`_SliceIntoGrad` instead: the backward pass adds the slice's gradient
into ``weight.grad[slice]`` in place (docs/speed.md, "The eager step").
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

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


# --------------------------------------------------------------------------- slices

_mode = threading.local()  # .enabled: take() slices in place; .casts: this context's cast copies (_cast_copy)
Index = tuple[slice, ...]


@contextlib.contextmanager
def slice_grads_in_place(enabled: bool = True) -> Iterator[None]:
    """Within it, slices taken by a training forward pass (grad enabled, eager) send their gradients
    straight into the full weight's ``.grad`` (:class:`_SliceIntoGrad`), and under autocast a weight is
    cast once for the whole context (one training step's subnets: ``SupernetTraining.backward_step``).

    The gradients reach ``.grad`` only through ``loss.backward()``: ``torch.autograd.grad`` would not
    return them, hence opt-in. Parameters no slice of theirs was used keep ``grad is None``. The weights
    must not change inside it (the optimiser steps after it): the cast copies are dropped when the
    outermost context ends.
    """
    previous = getattr(_mode, "enabled", False)
    outermost = getattr(_mode, "casts", None) is None
    _mode.enabled = enabled
    if outermost:
        _mode.casts = {}
    try:
        yield
    finally:
        _mode.enabled = previous
        if outermost:
            _mode.casts = None


def _dense_format(weight: torch.Tensor) -> torch.memory_format:
    """The memory format a 4-D ``weight`` is laid out in (channels_last when it is and plain contiguous is not)."""
    if weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _cast_copy(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``, cast once per :func:`slice_grads_in_place` context (again if the weight was
    changed in place meanwhile, which bumps its version; an optimiser step belongs outside the context, as
    fused optimisers do not bump it)."""
    casts = getattr(_mode, "casts", None)
    if casts is None:
        return weight.detach().to(dtype)
    key = (weight._version, weight.data_ptr(), dtype)
    cached = casts.get(id(weight))
    if cached is None or cached[1] != key:
        cached = (weight, key, weight.detach().to(dtype))  # the weight held: its id stays its own
        casts[id(weight)] = cached
    return cached[2]


class _SliceIntoGrad(torch.autograd.Function):
    """``weight[index]`` whose backward pass adds the gradient into ``weight.grad[index]`` in place.

    Plain slicing's backward (``slice_backward``) fills a zeroed full-size copy and copies the slice's
    gradient into it, once per dimension sliced (a centre crop slices two more), and autograd then adds
    the result into ``.grad``. Here a step's first use of a weight allocates ``.grad`` (zeros; or, for
    the whole weight, the gradient itself) and every use adds its slice in place: one kernel.

    ``cast``: the slice feeds an op autocast runs in low precision (conv, linear): under autocast it is
    returned in autocast's dtype, from a copy of the whole weight cast once a step (:func:`_cast_copy`;
    autocast's own cache holds leaves only, and a slice is not one), its gradient still added to the
    float32 ``.grad``. ``dense``: the consumer wants a packed weight (a convolution copies a strided one
    in its forward and again in its backward pass): a slice that is not is copied once, here.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, index: Index, cast: bool,  # type: ignore[override]
                dense: bool) -> torch.Tensor:
        ctx.weight, ctx.index = weight, index
        device = weight.device.type
        dtype = torch.get_autocast_dtype(device) if cast and torch.is_autocast_enabled(device) else weight.dtype
        view = weight[index]
        fmt = _dense_format(weight)
        if dense and not view.is_contiguous(memory_format=fmt):
            return view.to(dtype=dtype, memory_format=fmt)  # one copy: packed (and cast)
        return view if dtype == weight.dtype else _cast_copy(weight, dtype)[index]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None, None]:  # type: ignore[override]
        weight, index = ctx.weight, ctx.index
        if weight.grad is not None:
            weight.grad[index].add_(grad)
        elif grad.shape == weight.shape:  # the whole weight (slices of full length start at 0)
            # The gradient of a conv / linear / batch_norm weight is a tensor of its own: taken as .grad when it
            # has the weight's dtype and layout, as autograd's AccumulateGrad takes a gradient nothing else holds.
            if grad.dtype == weight.dtype and grad.stride() == weight.stride() and grad._base is None:
                weight.grad = grad
            else:
                weight.grad = torch.empty_like(weight).copy_(grad)
        else:
            weight.grad = torch.zeros_like(weight)
            weight.grad[index].add_(grad)
        return None, None, None, None


def take(weight: torch.Tensor, index: Index, *, cast: bool = False, dense: bool = False) -> torch.Tensor:
    """``weight[index]``: every slice of a parameter is made here (``sliced`` of each op; ``copy_to`` too).

    Plain indexing unless the slice is taken for training inside :func:`slice_grads_in_place` (grad
    enabled, ``weight`` requires grad, not while ``torch.compile`` traces): then :class:`_SliceIntoGrad`
    (``cast``, ``dense``: see there). The values are the same either way, in autocast's dtype under autocast.
    """
    if (torch.compiler.is_compiling() or not getattr(_mode, "enabled", False) or not weight.requires_grad
            or not torch.is_grad_enabled()):
        return weight[index]
    return _SliceIntoGrad.apply(weight, index, cast, dense)


def centre_crop(weight: torch.Tensor, kernel: int) -> torch.Tensor:
    """The centre ``kernel × kernel`` of a (…, K, K) weight (a view)."""
    return weight[(Ellipsis, *_centre(weight.shape[-1], kernel))]


def _centre(size: int, kernel: int) -> tuple[slice, slice]:
    start = (size - kernel) // 2
    return slice(start, start + kernel), slice(start, start + kernel)


class ElasticConv2d(nn.Module):
    """Dense convolution without padding (1×1 by default); a subnet uses the first ``out`` × first ``in``
    channels and the centre ``kernel × kernel`` of the largest weight."""

    def __init__(self, max_in: int, max_out: int, bias: bool = False, max_kernel: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(max_in, max_out, max_kernel, stride, bias=bias)

    def sliced(self, out_channels: int, in_channels: int,
               kernel: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the subnet layer: centre of weight[:out, :in], bias[:out]."""
        bias = None if self.conv.bias is None else take(self.conv.bias, (slice(out_channels),), cast=True)
        crop = () if kernel is None else _centre(self.conv.weight.shape[-1], kernel)
        return take(self.conv.weight, (slice(out_channels), slice(in_channels), *crop), cast=True, dense=True), bias

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
        return take(self.conv.weight, (slice(channels), slice(None), *_centre(self.conv.weight.shape[-1], kernel)),
                    cast=True, dense=True)

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
    sets it on every ``nn.BatchNorm2d`` it finds — the one held here included). The batch count
    ``num_batches_tracked`` is kept only where it is used, with ``momentum=None`` (one kernel per call
    saved in training; the supernet trains with momentum 0.1).
    """

    def __init__(self, max_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(max_channels, momentum=BN_MOMENTUM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, c = self.bn, x.shape[1]
        factor = 0.0
        if bn.training:
            factor = bn.momentum
            if factor is None:
                bn.num_batches_tracked.add_(1)
                factor = 1.0 / float(bn.num_batches_tracked)
        return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], *self.sliced(c), bn.training, factor, bn.eps)

    def sliced(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight[:channels], bias[:channels]): the affine parameters of the first channels."""
        return take(self.bn.weight, (slice(channels),)), take(self.bn.bias, (slice(channels),))

    def copy_to(self, bn: nn.BatchNorm2d) -> None:
        """Copy weight, bias, running mean/var (first ``bn.num_features``) and the batch count into ``bn``."""
        c = bn.num_features
        weight, bias = self.sliced(c)
        _copy(bn.weight, weight, "BatchNorm weight")
        _copy(bn.bias, bias, "BatchNorm bias")
        for name in ("running_mean", "running_var"):
            _copy(getattr(bn, name), getattr(self.bn, name)[:c], f"BatchNorm {name}")
        bn.num_batches_tracked.copy_(self.bn.num_batches_tracked)


class ElasticLinear(nn.Module):
    """Linear layer; a subnet uses the first input features (and the first outputs)."""

    def __init__(self, max_in: int, max_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(max_in, max_out)

    def sliced(self, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight[:out, :in], bias[:out])."""
        # not made dense: a row-major slice is already what a matrix product reads (leading dimension)
        return (take(self.linear.weight, (slice(out_features), slice(in_features)), cast=True),
                take(self.linear.bias, (slice(out_features),), cast=True))

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
        # the mean, as adaptive_avg_pool2d(x, 1) computes it, without its channels_last restriding (whose
        # backward pass is a zero-fill and a copy)
        s = F.relu(self.reduce(x.mean((2, 3), keepdim=True), se_channels(channels)))
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


__all__ = ["centre_crop", "take", "slice_grads_in_place", "ElasticConv2d", "ElasticDepthwiseConv2d",
           "ElasticBatchNorm2d", "ElasticLinear",
           "ElasticSqueezeExcite", "ElasticConvBNAct"]
