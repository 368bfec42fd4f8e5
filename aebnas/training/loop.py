"""Training and evaluation of an early-exit network: joint loss, epochs, cached exit outputs.

:class:`CandidateTraining` is the one training loop and the one evaluation path: a Ray
Tune trial (``aebnas.search.trainable``) and ``aebnas retrain`` (``aebnas.deploy.retrain``) both run it,
so a network is trained, BatchNorm-recalibrated and scored the same way in both.
Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ArchConfig
from ..data.batches import BatchLoader, calibration_loader
from ..data.datasets import Dataset
from ..exit_policy import ExitOutputs
from ..nn import EarlyExitNet, torch_confidence
from ..settings import DEFAULT_CONFIDENCE, TrainSettings, TrialSettings


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (diverged)."""


class LossWatch:
    """Training losses read by the host in batches, checked for NaN/inf.

    ``float(loss)`` after each forward makes the host wait for the GPU. Here the losses stay on the
    device and are copied ``every`` at a time (one wait per ``every`` losses); the first non-finite one
    raises :class:`NonFiniteLossError` with ``describe(step, index, value)``. On CPU there is nothing to
    wait for: ``every`` is 1 and a bad loss stops the run before its backward pass, as before. The
    values (Python floats, in the order added) are those ``float(loss)`` gives.
    """

    CUDA_EVERY = 100

    def __init__(self, device: torch.device, describe: Callable[[int, int, float], str]) -> None:
        self.every = self.CUDA_EVERY if device.type == "cuda" else 1
        self.describe = describe
        self.values: list[float] = []
        self._pending: list[tuple[int, int, torch.Tensor]] = []

    def add(self, step: int, index: int, loss: torch.Tensor) -> None:
        self._pending.append((step, index, loss.detach().float()))
        if len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> list[float]:
        """Read and check what is pending; returns every value so far."""
        if self._pending:
            read = torch.stack([t for _, _, t in self._pending]).cpu().tolist()
            for (step, index, _), value in zip(self._pending, read):
                if not math.isfinite(value):
                    raise NonFiniteLossError(self.describe(step, index, value))
            self.values += read
            self._pending.clear()
        return self.values


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by aebnas, read without running code (``weights_only=True``).

    Everything aebnas writes holds tensors and plain values only; a file carrying pickled
    Python objects could execute code when loaded, so it is refused with a ValueError.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: refused: it holds pickled Python objects, not only tensors and plain values "
                         f"({first}); aebnas never writes such files, and loading one could run code") from None


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


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` against the distribution ``target`` (probabilities, T = 1), batch mean."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def make_optimizer(model: nn.Module, settings: TrainSettings, fused: bool = False) -> torch.optim.Optimizer:
    """SGD (Nesterov); no weight decay on BatchNorm parameters and biases.

    ``fused``: one fused kernel per parameter group, the learning rate a tensor on the parameters' device
    (the static step's optimiser on CUDA: nothing in the step reads the rate back to the host)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if fused:
        lr = torch.tensor(settings.lr, device=next(model.parameters()).device)
        return torch.optim.SGD(groups, lr=lr, momentum=settings.momentum, nesterov=True, fused=True)
    return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=True)


def make_lr_schedule(optimizer: torch.optim.Optimizer, settings: TrainSettings,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle learning rate over all epochs (warm-up 25%, cosine down)."""
    total = max(1, settings.epochs * steps_per_epoch)
    # OneCycleLR divides by zero when pct_start x total_steps is exactly 1 (4 steps at 25%): warm up 30% there.
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=total, pct_start=0.25 if total != 4 else 0.3, div_factor=10.0,
        final_div_factor=100.0)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The mixed precision's dtype: on CUDA when ``enabled``, bfloat16 where supported, else float16; else None."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool) -> ContextManager[Any]:
    """Mixed precision on CUDA when ``enabled`` (:func:`amp_dtype`); else nothing."""
    dtype = amp_dtype(device, enabled)
    return nullcontext() if dtype is None else torch.autocast(device_type="cuda", dtype=dtype)


def train_one_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                    settings: TrainSettings,
                    on_step: Callable[[int, int], None] | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One pass over ``batches``; returns mean loss, seconds and images/s.

    With ``settings.amp`` on a CUDA model the forward pass runs under :func:`autocast`
    (``scaler`` scales float16 gradients). Raises :class:`NonFiniteLossError` when the loss
    is NaN or infinite (:class:`LossWatch`: at once on CPU, within 100 steps on CUDA).
    ``on_step(steps_done, images_done)`` is called after every step (progress lines).
    """
    model.train()
    device = next(model.parameters()).device
    watch = LossWatch(device, lambda step, _, value: f"training loss is {value} at batch {step} (diverged; try a "
                      "lower lr)")
    sizes: list[int] = []
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        with autocast(device, settings.amp):
            loss = multi_exit_loss(model(x), y, settings.exit_weight, settings.label_smoothing)
        watch.add(step, 0, loss)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        sizes.append(len(y))
        if on_step is not None:
            on_step(step + 1, sum(sizes))
    total = 0.0
    for value, n in zip(watch.flush(), sizes):
        total += value * n
    seconds = time.perf_counter() - start
    count = sum(sizes)
    return {"loss": total / max(count, 1), "seconds": seconds, "images_per_s": count / max(seconds, 1e-9)}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   max_batches: int) -> int:
    """Recompute BatchNorm running statistics as plain averages over training batches.

    As Once-for-All does before evaluating a sub-network: after a few epochs the running
    statistics lag behind the weights. ``batches`` must be a sample of the training split
    that does not depend on the order of images in a file (``aebnas.data.batches.calibration_loader``).
    Returns the number of batches used.
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
             confidence: str = DEFAULT_CONFIDENCE) -> ExitOutputs:
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


EVAL_SPLITS = ("val", "test")
"""The splits a candidate is scored on: thresholds are tuned on val, test only measures."""


def optimisation_state(run: Any) -> dict[str, Any]:
    """Weights, optimiser, schedule, loss scaler and epoch of a training run (``CandidateTraining``,
    ``supernet.SupernetTraining``), as tensors and plain values."""
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": run.epoch}


def load_optimisation_state(run: Any, state: dict[str, Any]) -> None:
    """Continue ``run`` from :func:`optimisation_state`."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.epoch = int(state["epoch"])


def grad_scaler(amp: bool, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler of a training run: active only for float16 autocast (``amp`` on a CUDA device without
    bfloat16; :func:`autocast` picks bfloat16 where it can, which needs no scaling), a no-op otherwise."""
    return torch.amp.GradScaler(
        "cuda", enabled=amp and device.type == "cuda" and not torch.cuda.is_bf16_supported())


class ScoringSettings(Protocol):
    """What :meth:`Scorer.from_settings` reads (``TrialSettings`` and ``SupernetSettings`` have it)."""

    @property
    def batch_size(self) -> int: ...
    @property
    def bn_recalibration_batches(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def eval_batch_size(self) -> int: ...


class Scorer:
    """How every network is scored: BatchNorm recalibrated, then every exit's outputs on a split.

    Holds, for one dataset and resolution, the fixed, seeded, shuffled calibration sample of
    the training split (``bn_batches`` batches of ``batch_size``) and the evaluation loaders. Calling it recomputes a network's
    BatchNorm statistics exactly (:func:`recalibrate_bn`) and evaluates it: a candidate, a
    retrained network and a supernet's subnet are all scored by this one path.
    """

    def __init__(self, data: Dataset, resolution: int, device: torch.device, *, batch_size: int,
                 bn_batches: int, seed: int, eval_batch_size: int = 512,
                 confidence: str = DEFAULT_CONFIDENCE) -> None:
        self.bn_batches, self.confidence = bn_batches, confidence
        self.calibration = calibration_loader(data, resolution=resolution, batch_size=batch_size,
                                              num_batches=bn_batches, seed=seed, device=device)
        self.eval_batches = {split: BatchLoader.for_split(data, split, batch_size=eval_batch_size,
                                                          resolution=resolution, train=False, device=device)
                             for split in EVAL_SPLITS}

    @classmethod
    def from_settings(cls, data: Dataset, resolution: int, device: torch.device, settings: ScoringSettings, *,
                      confidence: str = DEFAULT_CONFIDENCE, eval_batch_size: int | None = None) -> "Scorer":
        """The scorer of a run with ``settings`` (a trial's ``TrialSettings``, a supernet's
        ``SupernetSettings``): calibration sample and batches from its batch_size, bn_recalibration_batches
        and seed; evaluation batches of its eval_batch_size unless ``eval_batch_size`` is given."""
        return cls(data, resolution, device, batch_size=settings.batch_size,
                   bn_batches=settings.bn_recalibration_batches, seed=settings.seed,
                   eval_batch_size=settings.eval_batch_size if eval_batch_size is None else eval_batch_size,
                   confidence=confidence)

    def __call__(self, model: nn.Module, splits: Sequence[str] = EVAL_SPLITS) -> dict[str, ExitOutputs]:
        unknown = [s for s in splits if s not in self.eval_batches]
        if unknown:
            raise ValueError(f"cannot score on split(s) {unknown}: networks are scored on val and test only")
        recalibrate_bn(model, self.calibration, self.bn_batches)
        return {split: evaluate(model, self.eval_batches[split], self.confidence) for split in splits}


class CandidateTraining:
    """One candidate's training run: network, optimiser, schedule and batches of one dataset.

    ``train_epoch()`` trains one epoch; ``evaluate()`` recalibrates BatchNorm on a fixed,
    seeded, shuffled sample of the training split and returns every exit's outputs on the
    validation and test splits. ``state_dict()`` / ``load_state_dict()`` hold everything a
    resumed run needs (weights, optimiser, schedule, epoch, random state), as plain tensors
    and values (loadable with ``torch.load(weights_only=True)``). The initial weights depend
    on ``settings.seed`` only.
    """

    def __init__(self, arch: ArchConfig, settings: TrialSettings, data: Dataset, device: torch.device,
                 model: EarlyExitNet | None = None) -> None:
        self.arch, self.settings, self.device = arch, settings, device
        self.train_settings = settings.train_settings()
        torch.manual_seed(settings.seed)  # before the weights are drawn: with reused actors the RNG carries over
        if model is None:
            self.model = EarlyExitNet(arch, settings.confidence)
        else:  # inherited weights (a supernet's subnet): fine-tuned with their own learning rate
            if model.arch != arch:
                raise ValueError("the given model is not of this run's architecture")
            self.model = model
            self.train_settings = dataclasses.replace(self.train_settings, lr=settings.finetune_lr)
        # Batches come channels_last (aebnas.data.batches); weights in that layout skip a conversion per layer.
        self.model = self.model.to(device, memory_format=torch.channels_last)
        self.train_batches = BatchLoader.for_split(data, "train", batch_size=settings.batch_size,
                                                   resolution=arch.resolution, train=True, device=device,
                                                   seed=settings.seed)
        self.scorer = Scorer.from_settings(data, arch.resolution, device, settings, confidence=settings.confidence)
        self.optimizer = make_optimizer(self.model, self.train_settings)
        self.scheduler = make_lr_schedule(self.optimizer, self.train_settings, len(self.train_batches))
        self.scaler = grad_scaler(settings.amp, device)
        self.epoch = 0

    def train_epoch(self, on_step: Callable[[int, int], None] | None = None) -> dict[str, float]:
        """Train epoch ``self.epoch + 1``; returns mean loss, seconds, images/s and the last lr.
        ``on_step(steps_done, images_done)`` after every step (progress lines)."""
        self.train_batches.set_epoch(self.epoch)
        stats = train_one_epoch(self.model, self.train_batches, self.optimizer, self.scheduler,
                                self.train_settings, on_step, self.scaler)
        self.epoch += 1
        return {**stats, "lr": self.scheduler.get_last_lr()[0]}

    def evaluate(self, splits: Sequence[str] = EVAL_SPLITS) -> dict[str, ExitOutputs]:
        """Recalibrate BatchNorm, then every exit's outputs on ``splits``."""
        return self.scorer(self.model, splits)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain values."""
        return {**optimisation_state(self), "arch": self.arch.to_flat(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; ValueError if it holds another architecture."""
        if state.get("arch") is not None and state["arch"] != self.arch.to_flat():
            raise ValueError("the checkpoint holds another architecture than this run's")
        load_optimisation_state(self, state)
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
