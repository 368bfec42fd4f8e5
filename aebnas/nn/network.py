"""EarlyExitNet: a MobileNetV3 (Once-for-All) backbone with exit branches after stages 1–4."""
# No `from __future__ import annotations`: TorchScript reads the annotations of the scripted
# methods and class attributes and cannot evaluate them as strings.

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import NUM_STAGES, ArchConfig
from ..exit_policy import validate_thresholds
from ..settings import CONFIDENCE_MEASURES, DEFAULT_CONFIDENCE
from .blocks import InvertedResidual, build_head, build_stem, init_weights
from .confidence import torch_confidence
from .exits import ExitBranch


class EarlyExitNet(nn.Module):
    """The network an ``ArchConfig`` describes; scriptable with ``torch.jit.script``.

    Segments (what ``aebnas.cost.macs`` measures): ``stem`` (stem conv + first block),
    ``stages[0..4]``, ``branches[s]`` (the exit after stage s + 1, ``Identity`` where there is
    none), ``head`` (960-channel expand, pooling, 1280-channel mix, classifier).

    The exit rule lives here once: :meth:`infer` with the ``thresholds`` buffer (one per
    existing exit, position order; 1.0 = exit off, the default) and the ``confidence``
    measure. Training, evaluation, ``aebnas export`` and ``aebnas predict`` all run it.
    """

    __jit_unused_properties__ = ["exits"]
    exit_index: List[int]
    confidence: str
    num_exits: int
    num_classes: int

    def __init__(self, arch: ArchConfig, confidence: str = DEFAULT_CONFIDENCE) -> None:
        super().__init__()
        if confidence not in CONFIDENCE_MEASURES:
            raise ValueError(f"confidence={confidence!r} is not one of {CONFIDENCE_MEASURES}")
        self.arch = arch
        rows = arch.block_rows()
        # Registration order (stem, stages, branches, head) is the order init_weights draws in.
        self.stem = build_stem(arch.stem_row(), rows[0])
        self.stages = nn.ModuleList(
            nn.Sequential(*(InvertedResidual.from_row(r) for r in rows if r.stage == s))
            for s in range(1, NUM_STAGES + 1))
        exit_rows = {row.position: row for row in arch.exit_rows()}
        self.branches = nn.ModuleList(
            ExitBranch(exit_rows[s + 1]) if s + 1 in exit_rows else nn.Identity() for s in range(NUM_STAGES))
        # exit index (0-based, position order) after each stage, -1 where there is none
        self.exit_index = [arch.exit_positions.index(s + 1) if s + 1 in exit_rows else -1
                           for s in range(NUM_STAGES)]
        self.head = build_head(arch.head_row())
        self.num_exits, self.num_classes = arch.num_exits, arch.num_classes
        self.confidence = confidence
        self.register_buffer("thresholds", torch.ones(arch.num_exits))
        self._register_load_state_dict_pre_hook(self._upgrade_state_dict)
        init_weights(self)

    @property
    def exits(self) -> List[nn.Module]:
        """The existing exit branches in position order."""
        return [self.branches[e.position - 1] for e in self.arch.exits]

    @torch.jit.ignore
    def set_thresholds(self, thresholds: Sequence[float]) -> "EarlyExitNet":
        """Store the thresholds :meth:`infer` uses (validated); returns self."""
        th = validate_thresholds(thresholds, self.num_exits)
        self.thresholds.copy_(torch.tensor(th, dtype=self.thresholds.dtype))
        return self

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Logits of every existing exit (position order), then of the final classifier."""
        outputs: List[torch.Tensor] = []
        h = self.stem(x)
        for s, (stage, branch) in enumerate(zip(self.stages, self.branches)):
            h = stage(h)
            if self.exit_index[s] >= 0:
                outputs.append(branch(h))
        outputs.append(self.head(h))
        return outputs

    @torch.jit.export
    def infer(self, x: torch.Tensor, thresholds: Optional[List[float]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dynamic inference; returns (logits (N, classes) float32, exit index (N,) int64).

        Exit index j < num_exits is the j-th existing exit, ``num_exits`` the final
        classifier. A sample leaves at the first exit whose confidence ≥ its threshold and
        is not computed any further; an exit with threshold ≥ 1.0 is never computed.
        ``thresholds`` defaults to the stored ones (:meth:`set_thresholds`).
        """
        with torch.no_grad():
            stored: List[float] = self.thresholds.tolist()
            th = validate_thresholds(stored if thresholds is None else thresholds, self.num_exits)
            n = x.shape[0]
            logits_out = torch.zeros((n, self.num_classes), dtype=torch.float32, device=x.device)
            exit_out = torch.full((n,), self.num_exits, dtype=torch.long, device=x.device)
            remaining = torch.arange(n, device=x.device)
            h = self.stem(x)
            for s, (stage, branch) in enumerate(zip(self.stages, self.branches)):
                j = self.exit_index[s]
                # No `break` in a loop over modules under TorchScript: skip the rest instead.
                if remaining.numel() > 0:
                    h = stage(h)
                    if j >= 0 and th[j] < 1.0:
                        logits = branch(h)
                        leave = torch_confidence(logits, self.confidence) >= th[j]
                        idx = remaining[leave]
                        logits_out[idx] = logits[leave].float()
                        exit_out[idx] = j
                        stay = torch.logical_not(leave)
                        h, remaining = h[stay], remaining[stay]
            if remaining.numel() > 0:
                logits_out[remaining] = self.head(h).float()
            return logits_out, exit_out

    @torch.jit.ignore
    def _upgrade_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        """Read state dicts of aebnas 0.1 (exits numbered ``exits.j``, no ``thresholds``)."""
        old = prefix + "exits."
        for key in [k for k in state_dict if k.startswith(old)]:
            j, rest = key[len(old):].split(".", 1)
            position = self.arch.exits[int(j)].position
            state_dict[f"{prefix}branches.{position - 1}.{rest}"] = state_dict.pop(key)
        state_dict.setdefault(prefix + "thresholds", self.thresholds.detach().clone())
