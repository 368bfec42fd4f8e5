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


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (diverged)."""


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings for a short from-scratch run (defaults measured on the CIFAR-10 subset).

    SGD with Nesterov momentum and a one-cycle schedule gets a MobileNetV3 candidate to a
    useful accuracy in a few epochs; ``exit_weight`` is w in CE(final) + w·ΣCE(exit_i).
    """

    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-5
    momentum: float = 0.9
    exit_weight: float = 1.0
    label_smoothing: float = 0.0
    bn_recalibration_batches: int = 10

    def __post_init__(self) -> None:
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "weight_decay": self.weight_decay >= 0, "exit_weight": self.exit_weight >= 0,
                  "momentum": 0 <= self.momentum < 1, "label_smoothing": 0 <= self.label_smoothing < 1,
                  "bn_recalibration_batches": self.bn_recalibration_batches >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range")


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
