"""Training a weight-sharing supernet by the sandwich rule.

``SupernetTraining`` trains an :class:`~aebnas.nn.ElasticEarlyExitNet` on the training
split of a dataset. Each step (BigNAS / AttentiveNAS "sandwich rule"):

1. the largest subnet, at the largest resolution, learns from the labels (every exit and
   the final classifier, CE with label smoothing);
2. the smallest subnet, at the smallest resolution, and ``random_subnets`` random subnets
   learn in place from the largest's detached final logits (soft cross-entropy, T = 1, on
   every exit and the final classifier of the subnet);
3. the gradients add up; one clipped SGD step.

For the first ``warmup_fraction`` of the epochs only the largest trains (DεpS: with a small
budget the shared weights first need a good large network). A subnet is evaluated as every
candidate is (:class:`aebnas.training.loop.Scorer`): extracted, BatchNorm recalibrated on a fixed,
seeded, shuffled sample of the training split, scored on the validation split. The
validation and test splits are never trained on.

Data-parallel training (``aebnas.training.supernet_job``, Ray Train) gives each worker a shard of
every epoch (``batch_size // N`` images per step); all workers draw the same subnets each
step (the draw is seeded by epoch and step) and average their gradients before the step.
As with DDP without SyncBatchNorm, each worker's BatchNorm normalises by its own shard, so
N workers train like one with N times smaller BatchNorm batches, not identically.

What a run writes, the supernet file, is :mod:`aebnas.training.supernet_file`. Nothing here
imports Ray.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batches import BatchLoader
from ..config import EXIT_BRANCHES, ArchConfig, SpaceValues, largest_arch, random_arch, smallest_arch
from ..data.datasets import Dataset
from ..exit_policy import ExitOutputs
from ..nn import ElasticEarlyExitNet, EarlyExitNet, extract
from ..nn.elastic_ops import slice_grads_in_place
from ..data.preprocess import resize
from ..settings import DEFAULT_CONFIDENCE
from .supernet_file import SupernetInfo, SupernetSettings, image_digests
from .static_step import StaticSandwich
from .loop import (LossWatch, Scorer, amp_dtype, autocast, grad_scaler, load_optimisation_state,
                    make_optimizer, make_lr_schedule, multi_exit_loss, optimisation_state, soft_cross_entropy)


def distillation_loss(outputs: list[torch.Tensor], teacher: torch.Tensor, exit_weight: float) -> torch.Tensor:
    """Soft cross-entropy (T = 1) of every output against the teacher's softmax: final + w · Σ exits."""
    target = F.softmax(teacher, dim=1)
    loss = soft_cross_entropy(outputs[-1], target)
    if len(outputs) > 1 and exit_weight > 0:
        loss = loss + exit_weight * sum(soft_cross_entropy(o, target) for o in outputs[:-1])
    return loss


# --------------------------------------------------------------------------- training


def _all_reduce_mean(params: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """Average the gradients of ``params`` over the workers (one all-reduce of one flat buffer)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p)
        offset += n


class SupernetTraining:
    """One supernet's training run: elastic network, optimiser, schedule, sandwich sampling.

    ``rank`` / ``world_size``: this worker's shard in data-parallel training (gradients are
    averaged with ``torch.distributed`` when ``world_size > 1``). ``state_dict()`` holds
    everything a resumed run needs, as plain tensors and values.

    ``compile``: the largest and the smallest subnet, which every step trains with the same
    shapes, run through ``torch.compile`` (one graph each, compiled in their first step: minutes
    on a CPU); the random subnets, new every step, run eagerly. The weights are the same
    parameters, so checkpoints and results do not depend on it; it only changes speed (claim 27
    in docs/benchmarks.md measures whether it pays).
    """

    def __init__(self, space: SpaceValues, width_mult: float, data: Dataset, settings: SupernetSettings,
                 device: torch.device, *, dataset_name: str | None = None, split_seed: int = 0, rank: int = 0,
                 world_size: int = 1, compile: bool = False, static: bool = False, static_backend: Any = None) -> None:
        self.space, self.width_mult, self.data, self.settings = space, float(width_mult), data, settings
        self.device, self.rank, self.world_size = device, rank, world_size
        self.dataset_name, self.split_seed = dataset_name or data.name, split_seed
        torch.manual_seed(settings.seed)  # the same initial weights on every worker
        self.model = ElasticEarlyExitNet(space, width_mult, data.num_classes, data.in_channels).to(
            device, memory_format=torch.channels_last)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        native = data.x_train.shape[-1]
        self.train_batches = BatchLoader.for_split(
            data, "train", batch_size=max(1, settings.batch_size // world_size), resolution=native, train=True,
            device=device, seed=settings.seed, shard=(rank, world_size))
        scaled = dataclasses.replace(settings, lr=settings.peak_lr, lr_batch=None)  # lr scaled to the batch size
        # the static step on CUDA: one fused kernel per parameter group, the learning rate a tensor on the GPU
        fused = static and device.type == "cuda"
        self.optimizer = make_optimizer(self.model, scaled, fused=fused)
        self.scheduler = make_lr_schedule(self.optimizer, scaled, len(self.train_batches))
        self.scaler = grad_scaler(settings.amp, device)
        self.arch_kwargs = {"width_mult": self.width_mult, "num_classes": data.num_classes,
                            "in_channels": data.in_channels}
        self.largest = largest_arch(space, **self.arch_kwargs)
        self.smallest = smallest_arch(space, **self.arch_kwargs)
        # dynamic=False: one graph per fixed subnet (their shapes never change), no symbolic batch sizes
        # elastic_ops.slice_grads_in_place: fewer kernel launches a step, which is what a GPU's step waits on;
        # on the CPU plain slices train 6-10% faster (measured side by side, docs/speed.md), so only on CUDA
        self.grads_in_place = device.type == "cuda"
        self.compiled = torch.compile(self.model, dynamic=False) if compile and not static else None
        self.static = StaticSandwich(self.model, exit_weight=settings.exit_weight,
                                     label_smoothing=settings.label_smoothing, amp_dtype=amp_dtype(device, settings.amp),
                                     device=device, backend=static_backend,
                                     resolutions=space.resolutions) if static else None
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self._scorers: dict[int, Scorer] = {}
        self._train_digests: np.ndarray | None = None  # computed once, for the file written every epoch

    # ------------------------------------------------------------ sampling
    def subnets(self, epoch: int, step: int) -> list[ArchConfig]:
        """The subnets of one step: largest first (the teacher), then smallest and random ones.

        In warm-up epochs the largest alone. Seeded by (seed, epoch, step): every worker
        draws the same subnets, and a resumed run the same as an uninterrupted one.
        """
        if epoch < self.settings.warmup_epochs:
            return [self.largest]
        rng = random.Random(f"{self.settings.seed}/{epoch}/{step}")
        randoms = [random_arch(self.space, rng, branches=EXIT_BRANCHES, **self.arch_kwargs)
                   for _ in range(self.settings.random_subnets)]
        return [self.largest, self.smallest, *randoms]

    # ------------------------------------------------------------ training
    def train_epoch(self, on_step: Callable[[int, int], None] | None = None) -> dict[str, float]:
        """Train epoch ``self.epoch + 1``; returns mean losses (largest, others), seconds, images/s, lr.
        ``on_step(steps_done, images_done)`` is called after every step (progress lines)."""
        s = self.settings
        self.model.train()
        self.train_batches.set_epoch(self.epoch)
        epoch = self.epoch + 1
        watch = LossWatch(self.device, lambda step, i, value: f"supernet loss is {value} at epoch {epoch} step "
                          f"{step} (subnet {i}; diverged: try a lower lr)")
        per_step: list[int] = []  # subnets trained in each step
        steps, images, start = 0, 0, time.perf_counter()
        for step, (x, y) in enumerate(self.train_batches):
            self.optimizer.zero_grad(set_to_none=True)
            losses = self.backward_step(x, y, self.epoch, step, on_loss=lambda i, loss: watch.add(step, i, loss))
            self.scaler.unscale_(self.optimizer)
            if self.world_size > 1:
                _all_reduce_mean(self.params, self.world_size)
            torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            per_step.append(len(losses))
            steps += 1
            images += len(y)
            if on_step is not None:
                on_step(steps, images)
        totals = {"loss": 0.0, "loss_largest": 0.0, "loss_distilled": 0.0}
        values, at = watch.flush(), 0
        for n in per_step:  # summed in the order (and precision) of one float(loss) per subnet
            step_losses, at = values[at:at + n], at + n
            totals["loss"] += sum(step_losses)
            totals["loss_largest"] += step_losses[0]
            totals["loss_distilled"] += (sum(step_losses[1:]) / len(step_losses[1:])) if len(step_losses) > 1 else 0.0
        self.epoch += 1
        seconds = time.perf_counter() - start
        return {**{k: v / max(steps, 1) for k, v in totals.items()}, "seconds": seconds,
                "images_per_s": images / max(seconds, 1e-9),
                "lr": float(self.scheduler.get_last_lr()[0]),  # a tensor with the fused optimiser
                "warmup": self.epoch <= s.warmup_epochs}

    def backward_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int,
                      on_loss: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
        """The gradients of one sandwich step: forward, loss and backward of each of ``self.subnets(epoch,
        step)`` on the batch ``(x, y)``, added to the parameters' ``.grad`` (scaled by ``self.scaler``).

        Returns each subnet's loss (largest first); ``on_loss(i, loss)`` is called before subnet ``i``'s
        backward pass (``train_epoch`` checks it there). The caller zeroes the gradients before and steps
        the optimiser after; ``train_epoch`` runs exactly this, and benchmarks measure it.
        """
        s = self.settings
        if self.static is not None:
            return self.static.backward_step(x, y, self.subnets(epoch, step), self.scaler, on_loss)
        teacher = None
        losses = []
        # elastic_ops: the slices' gradients go straight into .grad (on CUDA); under autocast a weight is cast
        # once a step
        with slice_grads_in_place(self.grads_in_place):
            for i, arch in enumerate(self.subnets(epoch, step)):
                with autocast(self.device, s.amp):
                    outputs = self._forward(resize(x, arch.resolution), arch)
                    if i == 0:
                        loss = multi_exit_loss(outputs, y, s.exit_weight, s.label_smoothing)
                        teacher = outputs[-1].detach()
                    else:
                        loss = distillation_loss(outputs, teacher, s.exit_weight)
                if on_loss is not None:
                    on_loss(i, loss)
                self.scaler.scale(loss).backward()
                losses.append(loss.detach())
        return losses

    def _forward(self, x: torch.Tensor, arch: ArchConfig) -> list[torch.Tensor]:
        """Subnet ``arch``'s outputs in a training step: compiled for the two fixed subnets when asked."""
        if self.compiled is not None and (arch is self.largest or arch is self.smallest):
            return self.compiled(x, arch)
        return self.model(x, arch)

    # ------------------------------------------------------------ evaluation
    def scorer(self, resolution: int) -> Scorer:
        """The scoring path of every candidate, at ``resolution`` (cached)."""
        if resolution not in self._scorers:
            self._scorers[resolution] = Scorer.from_settings(self.data, resolution, self.device, self.settings)
        return self._scorers[resolution]

    def evaluate(self, arch: ArchConfig, split: str = "val") -> ExitOutputs:
        """Every exit's outputs of subnet ``arch`` on ``split``, scored as a candidate is."""
        return score_subnet(self.model, arch, self.scorer(arch.resolution), split)

    # ------------------------------------------------------------ state
    def info(self) -> SupernetInfo:
        if self._train_digests is None:
            self._train_digests = image_digests(self.data.x_train)
        return SupernetInfo(space=self.space, width_mult=self.width_mult, num_classes=self.data.num_classes,
                            in_channels=self.data.in_channels, classes=list(self.data.classes),
                            dataset=self.dataset_name, train_digests=self._train_digests,
                            settings=self.settings, epochs=self.epoch, history=list(self.history),
                            val_size=len(self.data.y_val), split_seed=self.split_seed)

    def state_dict(self) -> dict[str, Any]:
        return {**optimisation_state(self), "history": self.history, "settings": self.settings.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("settings") not in (None, self.settings.to_dict()):
            raise ValueError("the checkpoint was written by a supernet run with other settings")
        load_optimisation_state(self, state)
        self.history = list(state.get("history", []))


def score_subnet(supernet: ElasticEarlyExitNet, arch: ArchConfig, scorer: Scorer, split: str = "val",
                 confidence: str = DEFAULT_CONFIDENCE) -> ExitOutputs:
    """Extract ``arch``, recalibrate its BatchNorm and return every exit's outputs on ``split``.

    The supernet itself is left untouched (the statistics are recomputed on the copy).
    """
    net: EarlyExitNet = extract(supernet, arch, confidence)
    return scorer(net, (split,))[split]


__all__ = ["SupernetTraining", "score_subnet", "distillation_loss"]
