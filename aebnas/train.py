"""Training and evaluation of an early-exit network: joint loss, epochs, cached exit outputs."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .exit_policy import ExitOutputs, torch_confidence
from .settings import TrainSettings


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (diverged)."""


def select_device(preference: str = "auto") -> torch.device:
    """``cuda`` when available (or asked for), else ``cpu``."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={preference!r} but CUDA is not available on this machine")
    return device


def multi_exit_loss(outputs: list[torch.Tensor], target: torch.Tensor, exit_weight: float = 1.0,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Joint loss CE(final) + w · Σ CE(exit_i) over a forward pass's list of logits."""
    final = F.cross_entropy(outputs[-1], target, label_smoothing=label_smoothing)
    if len(outputs) == 1 or exit_weight == 0:
        return final
    exits = sum(F.cross_entropy(o, target, label_smoothing=label_smoothing) for o in outputs[:-1])
    return final + exit_weight * exits


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """SGD (Nesterov); no weight decay on BatchNorm parameters and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=True)


def make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle learning rate over all epochs (warm-up 25%, cosine down)."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=max(1, settings.epochs * steps_per_epoch),
        pct_start=0.25, div_factor=10.0, final_div_factor=100.0)


def train_one_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                    settings: TrainSettings,
                    on_batch: Callable[[int, float], None] | None = None) -> dict[str, float]:
    """One pass over ``batches``; returns mean loss, seconds and images/s.

    Raises :class:`NonFiniteLossError` as soon as the loss is NaN or infinite.
    """
    model.train()
    total, count, images = 0.0, 0, 0
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        loss = multi_exit_loss(model(x), y, settings.exit_weight, settings.label_smoothing)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(f"training loss is {value} at batch {step} (diverged; try a lower lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += value * len(y)
        count += len(y)
        images += len(y)
        if on_batch is not None:
            on_batch(step, value)
    seconds = time.perf_counter() - start
    return {"loss": total / max(count, 1), "seconds": seconds, "images_per_s": images / max(seconds, 1e-9)}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   max_batches: int) -> int:
    """Recompute BatchNorm running statistics as plain averages over training batches.

    As Once-for-All does before evaluating a sub-network: after a few epochs the running
    statistics lag behind the weights. Returns the number of batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or max_batches <= 0:
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    used = 0
    try:
        for x, _ in batches:
            if used >= max_batches:
                break
            model(x)
            used += 1
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
    return used


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             confidence: str = "margin") -> ExitOutputs:
    """Every exit's confidence and prediction on every sample of a split (E+1, N arrays)."""
    model.eval()
    confs, preds, labels = [], [], []
    for x, y in batches:
        outputs = model(x)
        confs.append(torch.stack([torch_confidence(o, confidence) for o in outputs]).cpu())
        preds.append(torch.stack([o.argmax(dim=1) for o in outputs]).cpu())
        labels.append(y.cpu())
    if not labels:
        raise ValueError("evaluate() got no batches")
    return ExitOutputs(confidence=torch.cat(confs, dim=1).numpy(),
                       prediction=torch.cat(preds, dim=1).numpy(),
                       labels=torch.cat(labels).numpy().astype(np.int64))
