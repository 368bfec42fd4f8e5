"""The one input rule of every network: scale to [0, 1], shift by the training mean/std, resize.

``Preprocess`` is a small ``nn.Module`` holding the rule's constants as buffers, so the
same module runs in training batches (:class:`aebnas.data.batches.BatchLoader`), inside the
TorchScript export (:class:`aebnas.deploy.torchscript.DeployedEarlyExitNet`) and inside the first
ONNX graph (:class:`aebnas.deploy.onnx_export.OnnxGraph`). The ONNX driver
(``aebnas/onnx_runner.py``, copied into each export as a numpy-only ``aebnas_onnx.py``)
does only what the float graph cannot: uint8 pixels → float32 in [0, 1]
(``OnnxEarlyExitNet.preprocess_input``), then feeds ``segment_0``, which holds this module.

The arithmetic, kept exactly as each path has always computed it (float rounding differs
between the forms, so a path's numbers depend on which one it uses):

- uint8 tensor (training, TorchScript): ``x · (1 / (255 · std)) + (−mean / std)``, one
  multiply-add;
- float tensor in [0, 1] (TorchScript, the ONNX graph): ``x · (1 / std) + (−mean / std)``;
  the ONNX driver gives uint8 images as ``float32(x) / 255`` first, so its uint8 path is
  ``(x / 255) · (1 / std) + (−mean / std)``, which can differ from the TorchScript uint8 path
  in the last bit;
- resize: bilinear, ``align_corners=False``, no antialiasing, to ``resolution × resolution``,
  skipped when the size already fits; a traced graph (``always_resize=True``) cannot branch on
  the size, so it always resizes (the identity at the same size).
"""
# No `from __future__ import annotations`: TorchScript reads the class-level annotations.

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """A batch of normalised images resized bilinearly to ``resolution`` (unchanged if it has that size),
    channels_last when resized."""
    if x.shape[-2:] == (resolution, resolution):
        return x
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False)
    return x.contiguous(memory_format=torch.channels_last)


class Preprocess(nn.Module):
    """Normalise with ``mean``/``std`` (one value per channel) and resize to ``resolution``.

    ``forward(images)``: (N, C, H, W) uint8 in 0..255 or float in [0, 1], any H and W →
    float32 (N, C, resolution, resolution). ``device``: where the constants are computed
    and kept (training computes them on its device). ``always_resize``: resize even at
    the same size (for a traced graph, which cannot branch on the input's size).
    """

    mean: List[float]
    std: List[float]

    def __init__(self, mean: Sequence[float], std: Sequence[float], resolution: int, *,
                 device: torch.device = torch.device("cpu"), always_resize: bool = False) -> None:
        super().__init__()
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean={self.mean} and std={self.std} must have one value per channel each")
        if min(self.std) <= 0:
            raise ValueError(f"std={tuple(self.std)} must be > 0 in every channel")
        self.in_channels, self.resolution, self.always_resize = len(self.mean), int(resolution), always_resize
        std_t = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        mean_t = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        # (x / 255 − mean) / std as one multiply-add for uint8 pixels.
        self.register_buffer("scale_uint8", 1.0 / (255.0 * std_t))
        self.register_buffer("scale", 1.0 / std_t)
        self.register_buffer("shift", -mean_t / std_t)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 in 0..255 or float in [0, 1] → float32 normalised with the training mean/std."""
        if images.dtype == torch.uint8:
            return images.float() * self.scale_uint8 + self.shift
        if images.is_floating_point():
            return images.float() * self.scale + self.shift
        raise ValueError("images must be float in [0, 1] or uint8, got " + str(images.dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError("images must have shape (N, " + str(self.in_channels) + ", H, W), got "
                             + str(images.shape))
        x = self.normalize(images)
        if self.always_resize or x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            x = F.interpolate(x, size=[self.resolution, self.resolution], mode="bilinear",
                              align_corners=False, antialias=False)
        return x


__all__ = ["Preprocess", "resize"]
