"""EarlyExitNet: a MobileNetV3 (Once-for-All) backbone with exit branches after stages 1–4."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import config as C
from ..config import ArchConfig
from ..exit_policy import torch_confidence, validate_thresholds
from .blocks import ConvBNAct, InvertedResidual, make_divisible
from .exits import ExitBranch


class EarlyExitNet(nn.Module):
    """The network an ``ArchConfig`` describes.

    Segments (what ``aebnas.cost`` measures): ``stem`` (stem conv + first block),
    ``stages[0..4]``, ``exits[j]`` (one per existing exit, sorted by position), ``head``
    (960-channel expand, pooling, 1280-channel mix, classifier).
    """

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        w = arch.width_mult
        stem_ch = make_divisible(C.STEM_CHANNELS * w)
        first_ch = make_divisible(C.FIRST_BLOCK_CHANNELS * w)
        self.stem = nn.Sequential(
            ConvBNAct(arch.in_channels, stem_ch, 3, stride=2, activation="hswish"),
            InvertedResidual(stem_ch, first_ch, kernel=3, expansion=1, activation="relu"),
        )
        stages, channels = [], first_ch
        self.stage_channels: list[int] = []
        for s, stage_cfg in enumerate(arch.stages):
            out_ch = make_divisible(C.STAGE_CHANNELS[s] * w)
            blocks = []
            for b, block in enumerate(stage_cfg.blocks):
                blocks.append(InvertedResidual(
                    channels, out_ch, block.kernel, block.expansion,
                    stride=C.STAGE_STRIDES[s] if b == 0 else 1,
                    use_se=C.STAGE_USE_SE[s], activation=C.STAGE_ACTIVATION[s]))
                channels = out_ch
            stages.append(nn.Sequential(*blocks))
            self.stage_channels.append(out_ch)
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(
            ExitBranch(self.stage_channels[e.position - 1], e, arch.num_classes) for e in arch.exits)
        expand_ch = make_divisible(C.HEAD_EXPAND_CHANNELS * w)
        # Once-for-All keeps the 1280-wide feature mix unless the width grows.
        feature_ch = make_divisible(C.HEAD_FEATURE_CHANNELS * w) if w > 1.0 else C.HEAD_FEATURE_CHANNELS
        self.head = nn.Sequential(
            ConvBNAct(channels, expand_ch, 1, activation="hswish"),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(expand_ch, feature_ch, 1, bias=False),
            nn.Hardswish(inplace=True),
            nn.Flatten(1),
            nn.Linear(feature_ch, arch.num_classes),
        )
        # exit index (0-based, in position order) hanging after each stage, -1 for none
        self._exit_after_stage = [-1] * C.NUM_STAGES
        for j, e in enumerate(arch.exits):
            self._exit_after_stage[e.position - 1] = j
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
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

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every existing exit (position order), then of the final classifier."""
        outputs = []
        h = self.stem(x)
        for stage, j in zip(self.stages, self._exit_after_stage):
            h = stage(h)
            if j >= 0:
                outputs.append(self.exits[j](h))
        outputs.append(self.head(h))
        return outputs

    @torch.no_grad()
    def infer(self, x: torch.Tensor, thresholds: Sequence[float],
              confidence: str = "margin") -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic inference; returns (logits (N, classes), exit index (N,)).

        Exit index j < num_exits is the j-th existing exit, ``num_exits`` the final
        classifier. A sample leaves at the first exit whose confidence ≥ its threshold and
        is not computed any further; an exit with threshold ≥ 1.0 is never computed.
        """
        th = validate_thresholds(thresholds, self.num_exits)
        n = x.shape[0]
        logits_out = x.new_zeros((n, self.arch.num_classes))
        exit_out = torch.full((n,), self.num_exits, dtype=torch.long, device=x.device)
        remaining = torch.arange(n, device=x.device)
        h = self.stem(x)
        for stage, j in zip(self.stages, self._exit_after_stage):
            if remaining.numel() == 0:
                break
            h = stage(h)
            if j < 0 or th[j] >= 1.0:
                continue
            logits = self.exits[j](h)
            leave = torch_confidence(logits, confidence) >= th[j]
            idx = remaining[leave]
            logits_out[idx] = logits[leave].to(logits_out.dtype)
            exit_out[idx] = j
            stay = ~leave
            h, remaining = h[stay], remaining[stay]
        if remaining.numel():
            logits_out[remaining] = self.head(h).to(logits_out.dtype)
        return logits_out, exit_out
