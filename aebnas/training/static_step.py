"""The static-shape sandwich step: every subnet at the largest one's shapes, compiled once per resolution.

``SupernetTraining(static=True)`` trains through :class:`StaticSandwich` instead of slicing weights per
subnet. Each subnet is a mask tensor (:mod:`aebnas.nn.masked`), so the step's forward, loss and backward
trace into two graphs per input resolution — the teacher's (the largest subnet, against the labels) and
a student's (every other subnet, against the teacher) — whatever subnets are drawn, and
``torch.compile(mode="reduce-overhead")`` replays them as CUDA graphs. The losses and gradients are the
sliced step's (float tolerance; tests/test_static_step.py); parameters no subnet of the step used get
their gradient set back to ``None``, so the optimiser treats them as the sliced step does.

The price is compute: every subnet costs what the largest costs at its resolution (and every exit
variant is computed). On a GPU, bound by launching kernels, that is cheap; on the CPU the sliced step
stays the default (docs/supernet.md, "The static-shape step"; claim 30 counts the ops and graphs).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ..config import ArchConfig
from ..nn import ElasticEarlyExitNet
from ..nn.masked import MaskedSupernet, masked_exit_loss, unused_parameters
from ..data.preprocess import resize
from .loop import soft_cross_entropy

TEACHER, STUDENT = "teacher", "student"
GRAPH_RANGE = "aebnas::static_graph"  # profiler range around what the graphs hold (forward+loss, backward)


def _graph_count() -> int:
    """Graphs dynamo has compiled in this process so far (all backends)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class _LossGraph(nn.Module):
    """One role's graph: the masked supernet's forward under autocast, then the loss (a module, so that
    ``torch.compile`` sees the supernet's parameters and buffers as a module's: CUDA graphs keep them in
    place and may update the BatchNorm buffers)."""

    def __init__(self, masked: MaskedSupernet, role: str, exit_weight: float, label_smoothing: float,
                 amp_dtype: torch.dtype | None, device_type: str) -> None:
        super().__init__()
        self.masked, self.role = masked, role
        self.exit_weight, self.label_smoothing = exit_weight, label_smoothing
        self.amp_dtype, self.device_type = amp_dtype, device_type

    def forward(self, x: torch.Tensor, masks: torch.Tensor, target: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, final logits detached): ``target`` is the labels (teacher) or the teacher's logits."""
        with torch.autocast(self.device_type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            exits, final, on = self.masked(x, masks)
        exits, final = exits.float(), final.float()
        if self.role == TEACHER:
            loss = masked_exit_loss(exits, final, on, lambda o: F.cross_entropy(
                o, target, label_smoothing=self.label_smoothing), self.exit_weight)
        else:
            soft = F.softmax(target.float(), dim=1)
            loss = masked_exit_loss(exits, final, on, lambda o: soft_cross_entropy(o, soft), self.exit_weight)
        return loss, final.detach()


class StaticSandwich:
    """The sandwich step's gradients at fixed shapes: ``backward_step(x, y, subnets, scaler, on_loss)``.

    ``backend``: what ``torch.compile`` compiles with — ``None`` for inductor (CUDA graphs on CUDA, as
    ``mode="reduce-overhead"``), a backend name (``"eager"``, ``"aot_eager"``: cheap, for the CPU's
    checks), or ``False`` to run the masked network uncompiled. ``compiles`` counts, per (role,
    resolution), the graphs each call compiled: after the first step at a resolution it should stay put.
    """

    def __init__(self, model: ElasticEarlyExitNet, *, exit_weight: float, label_smoothing: float,
                 amp_dtype: torch.dtype | None, device: torch.device, backend: Any = None,
                 resolutions: tuple[int, ...] = ()) -> None:
        self.model, self.masked = model, MaskedSupernet(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._grads: list[torch.Tensor] | None = None  # the step's gradient sums, reused step after step
        self.compiles: Counter[tuple[str, int]] = Counter()
        self.cuda_graphs = backend is None and device.type == "cuda"
        graphs = {role: _LossGraph(self.masked, role, exit_weight, label_smoothing, amp_dtype, device.type)
                  for role in (TEACHER, STUDENT)}
        if backend is not False:
            import torch._dynamo.config as dynamo_config

            # Each resolution is a graph of each role; the default limit (8) would fall back to eager.
            limit = max(dynamo_config.cache_size_limit, 2 * len(resolutions) + 2)
            dynamo_config.cache_size_limit = limit
            if hasattr(dynamo_config, "recompile_limit"):
                dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
            options: dict[str, Any] = ({"mode": "reduce-overhead"} if self.cuda_graphs
                                       else {"backend": backend} if backend is not None else {})
            graphs = {role: torch.compile(g, dynamic=False, fullgraph=True, **options) for role, g in graphs.items()}
        self.graphs_by_role = graphs

    # ------------------------------------------------------------ the step
    def backward_step(self, x: torch.Tensor, y: torch.Tensor, subnets: list[ArchConfig], scaler: Any,
                      on_loss: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
        """Forward, loss and backward of each subnet (the first is the teacher); the gradients are added up
        (one multi-tensor add a subnet, into buffers kept from step to step) and added to ``.grad``; those
        of parameters no subnet used stay ``None``. Returns the losses."""
        if self._grads is None:
            self._grads = [torch.zeros_like(p) for p in self.params]
        else:
            torch._foreach_zero_(self._grads)
        losses, teacher = [], y
        for i, arch in enumerate(subnets):
            role = TEACHER if i == 0 else STUDENT
            masks = self.masked.masks(arch, x.device)
            xr = resize(x, arch.resolution)
            if self.cuda_graphs:  # the last replay's outputs have been read: its memory may be reused
                torch.compiler.cudagraph_mark_step_begin()
            before = _graph_count()
            with record_function(GRAPH_RANGE):
                loss, final = self.graphs_by_role[role](xr, masks, teacher)
            self.compiles[(role, arch.resolution)] += _graph_count() - before
            if i == 0:
                teacher = final.clone()  # a CUDA graph's outputs are overwritten by its next replay
            value = loss.detach().clone()
            if on_loss is not None:
                on_loss(i, value)
            scaled = scaler.scale(loss)
            with record_function(GRAPH_RANGE):
                # every parameter is in the masked graph (unused ones with a zero gradient)
                grads = torch.autograd.grad(scaled, self.params, allow_unused=True, materialize_grads=True)
            torch._foreach_add_(self._grads, grads)
            losses.append(value)
        self._set_grads(subnets)
        return losses

    def _set_grads(self, subnets: list[ArchConfig]) -> None:
        unused = {id(p) for p in unused_parameters(self.model, subnets)}
        for p, g in zip(self.params, self._grads):
            if id(p) in unused:
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

    def graphs(self) -> dict[str, int]:
        """Graphs compiled so far by role and resolution (``"teacher@32"`` …)."""
        return {f"{role}@{res}": n for (role, res), n in sorted(self.compiles.items())}


__all__ = ["StaticSandwich", "TEACHER", "STUDENT", "GRAPH_RANGE"]
