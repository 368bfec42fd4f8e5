"""What a candidate costs: MMACs per segment (ptflops) and per exit.

ptflops runs with its **aten** backend, chosen explicitly: it counts multiply-accumulates
of ``aten.convolution`` (every conv: full, depthwise, 1×1, plus one MAC per output
element for a bias) and of matrix products (``aten.mm/addmm/bmm``: linear layers, plus
one MAC per output for a bias). BatchNorm, activations, pooling, the squeeze-excite
product and residual additions are *not* counted: they are element-wise, a few percent
of the total, and counting them depends on how a framework fuses them.

Segments: ``stem`` (stem conv + first block), ``stage1``…``stage5``, ``exit{p}`` (the
branch after stage p) and ``head``. The cost ``C_i`` of exit i (DESIGN.md): backbone up to
exit i + every *active* branch before it + its own branch; final: whole backbone + head +
every active branch. An exit is active when it exists and its threshold is < 1.0.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import torch
from ptflops import get_model_complexity_info
from torch import nn

from .config import NUM_STAGES, ArchConfig

PTFLOPS_BACKEND = "aten"


@dataclass
class ExitCosts:
    """Per-exit cost pieces in MMACs; ``cumulative`` turns them into ``C_i``.

    backbone: (E+1,) stem + stages up to each exit's position; the last entry is the whole
    backbone plus the head. branch: (E,) each exit branch.
    """

    backbone: np.ndarray
    branch: np.ndarray

    def __post_init__(self) -> None:
        self.backbone = np.asarray(self.backbone, dtype=np.float64)
        self.branch = np.asarray(self.branch, dtype=np.float64)
        if self.backbone.shape != (self.branch.shape[0] + 1,):
            raise ValueError(f"backbone {self.backbone.shape} must have one more entry than branch "
                             f"{self.branch.shape}")

    @property
    def num_exits(self) -> int:
        return self.branch.shape[0]

    @property
    def static_macs(self) -> float:
        """MMACs of the network without any exit (backbone + head)."""
        return float(self.backbone[-1])

    def cumulative(self, active: np.ndarray | None = None) -> np.ndarray:
        """``C_i`` (MMACs) for each exit and the final, shape (..., E+1), given active (..., E)."""
        e = self.num_exits
        act = np.ones(e, dtype=bool) if active is None else np.asarray(active, dtype=bool)
        if act.shape[-1:] != (e,):
            raise ValueError(f"active must end in a dimension of {e} exits, got shape {act.shape}")
        paid = act * self.branch                       # branches computed on the way
        before = np.cumsum(paid, axis=-1) - paid       # active branches strictly before i
        out = np.empty(act.shape[:-1] + (e + 1,))
        out[..., :e] = self.backbone[:e] + before + self.branch
        out[..., e] = self.backbone[e] + paid.sum(axis=-1)
        return out

    def expected(self, utilization: np.ndarray, active: np.ndarray | None = None) -> float:
        """Expected MMACs per sample: Σ u_i · C_i."""
        return float(np.asarray(utilization) @ self.cumulative(active))


def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> float:
    """MMACs of one forward pass of ``module`` on one input of shape (C, H, W)."""
    was_training = module.training
    module.eval()
    try:
        macs, _ = get_model_complexity_info(
            module, tuple(input_shape), as_strings=False, print_per_layer_stat=False,
            backend=PTFLOPS_BACKEND, ost=io.StringIO())
    finally:
        module.train(was_training)
    if macs is None:
        raise RuntimeError(f"ptflops could not count {type(module).__name__} on input {input_shape}")
    return macs / 1e6


def segment_macs(arch: ArchConfig) -> dict[str, float]:
    """MMACs of every segment of ``arch`` (cached per architecture; the caller gets a copy)."""
    return dict(_segment_macs(arch))


@functools.lru_cache(maxsize=256)
def _segment_macs(arch: ArchConfig) -> dict[str, float]:
    from .nn import EarlyExitNet  # late import: nn imports exit_policy, which imports this module

    net = EarlyExitNet(arch).eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        h = torch.zeros(1, arch.in_channels, arch.resolution, arch.resolution)
        out["stem"] = count_macs(net.stem, tuple(h.shape[1:]))
        h = net.stem(h)
        exits = {e.position: branch for e, branch in zip(arch.exits, net.exits)}
        for s in range(NUM_STAGES):
            out[f"stage{s + 1}"] = count_macs(net.stages[s], tuple(h.shape[1:]))
            h = net.stages[s](h)
            if s + 1 in exits:
                out[f"exit{s + 1}"] = count_macs(exits[s + 1], tuple(h.shape[1:]))
        out["head"] = count_macs(net.head, tuple(h.shape[1:]))
    return out


def exit_costs(arch: ArchConfig) -> ExitCosts:
    """The :class:`ExitCosts` of ``arch`` from its segment MMACs."""
    seg = segment_macs(arch)
    stage_cum = np.cumsum([seg["stem"]] + [seg[f"stage{s}"] for s in range(1, NUM_STAGES + 1)])
    backbone = [stage_cum[p] for p in arch.exit_positions] + [stage_cum[-1] + seg["head"]]
    branch = [seg[f"exit{p}"] for p in arch.exit_positions]
    return ExitCosts(backbone=np.array(backbone), branch=np.array(branch))


def param_count(arch: ArchConfig) -> int:
    """Number of parameters of the whole network, exits included."""
    from .nn import EarlyExitNet

    return sum(p.numel() for p in EarlyExitNet(arch).parameters())
