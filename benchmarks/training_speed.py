"""Claim 22: training and scoring at the hardware's pace (CPU, and CUDA when there is one).

Measured in one run, on this machine's device (CUDA when present, else the CPU):

- **sandwich**: images/s of ``SupernetTraining.train_epoch`` (largest, smallest and two random
  subnets per step, as the supernet trains) at one resolution and batch size;
- **largest alone**: the space's largest subnet trained by aebnas's candidate loop
  (``CandidateTraining.train_epoch``);
- **torchvision**: ``mobilenet_v3_small`` (10 classes) in the same loop with the same batches,
  precision and layout: what a user gets without aebnas, the ceiling to compare with;
- forward MACs per second of each (images/s x the forward MMACs of the networks a step trains:
  every exit branch included);
- **candidates per minute** from the shipped supernet: inherited (BatchNorm recalibrated, every
  exit on validation and test, as a trial scores) and with one fine-tuning epoch;
- the paper's SVHN experiment (60 supernet epochs on 65,932 images at 32-72 px, 100 candidates
  fine-tuned 5 epochs each) projected from the measured rates.

Images are the embedded CIFAR-10 subset's (real images; the figures are speeds, not accuracy),
resized to each resolution as training does. Each rate skips the first step (allocation, cuDNN
autotuning) and times the next ``steps`` steps.

    python benchmarks/training_speed.py [--quick] [--docs-dir DIR]
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from typing import Any

import numpy as np
import torch

from harness.baseline import MobileNetV3Small, macs_of
from harness.claims import Claim
from harness.common import Context, Outcome, main, md_table

CLAIM = Claim(22, "training_speed", "Training and scoring speed: aebnas vs a plain torchvision loop",
              "CUDA (H200): sandwich ≥ 10,000 images/s at 32-40 px and ≥ 50% of torchvision's forward MACs/s, "
              "≥ 60 inherited candidates per GPU-minute, SVHN experiment ≤ 2 h; CPU: figures to compare")
SETTINGS = {"cpu": {"grid": [[32, 128], [32, 512], [72, 128]], "steps": 4, "candidates": 6},
            "cuda": {"grid": [[32, 128], [32, 512], [32, 1024], [72, 128], [72, 512], [72, 1024]], "steps": 20,
                     "candidates": 24}}
QUICK = {"cpu": {"grid": [[32, 64]], "steps": 2, "candidates": 2}, "cuda": {"grid": [[32, 128]], "steps": 3,
                                                                            "candidates": 3}}
SVHN_TRAIN_IMAGES = 73257 - 7325  # the paper's split: 7,325 validation images held out


def _subset(data: Any, images: int) -> Any:
    """``data`` with its training split cut (or repeated) to ``images`` images."""
    idx = np.arange(images) % len(data.y_train)
    return dataclasses.replace(data, x_train=np.ascontiguousarray(data.x_train[idx]), y_train=data.y_train[idx])


class _Clock:
    """``on_step`` callback: times steps 2 … n (the first pays allocation and autotuning)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.t1, self.images1, self.t, self.images = device, None, 0, None, 0

    def __call__(self, steps: int, images: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if steps == 1:
            self.t1, self.images1 = now, images
        self.t, self.images = now, images

    @property
    def rate(self) -> float:
        return (self.images - self.images1) / max(self.t - self.t1, 1e-9)


def _forward_mmacs(arch: Any) -> float:
    from aebnas.cost.macs import exit_costs

    c = exit_costs(arch)
    return float(c.backbone[-1] + c.branch.sum())


def measure(ctx: Context, cpu: dict[str, Any], cuda: dict[str, Any]) -> Outcome:
    from aebnas.data.datasets import load_dataset

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = cuda if dev.type == "cuda" else cpu
    amp = dev.type == "cuda"
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = load_dataset("cifar10-subset")
    steps = plan["steps"]
    rows = []
    for resolution, batch in plan["grid"]:
        rows.append(grid_row(data, resolution, batch, steps, dev, amp))
        print("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
              flush=True)
    info, train_images, inherited_s, finetune_s = candidate_seconds(plan["candidates"], dev, amp)
    per_min = {"inherited": 60 / float(np.mean(inherited_s)), "one fine-tuning epoch": 60 / float(np.mean(finetune_s))}
    hours, largest_px = svhn_projection(rows)
    device = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    small = [r for r in rows if r["px"] <= 40]
    top = max(small, key=lambda r: r["sandwich img/s"]) if small else rows[0]
    holds: bool | str
    if dev.type == "cuda":
        holds = (top["sandwich img/s"] >= 10000 and top["sandwich / torchvision MACs"] >= 0.5
                 and per_min["inherited"] >= 60 and hours <= 2)
    else:
        holds = "no GPU: the CUDA goals cannot be told here (CPU figures below)"
    measured = (f"{device}: sandwich {top['sandwich img/s']:.0f} images/s at {top['px']} px (batch {top['batch']}), "
                f"{100 * top['sandwich / torchvision MACs']:.0f}% of torchvision's MACs/s; "
                f"{per_min['inherited']:.1f} inherited candidates/min; SVHN projected {hours:.1f} h")
    details = "\n".join([
        f"Device: {device}; mixed precision {'bf16/fp16 autocast' if amp else 'off (CPU)'}; channels_last; "
        f"{steps} timed steps after one untimed step; width 1.0, the paper's space at one resolution.", "",
        md_table(rows, 2), "",
        f"Candidates of the shipped supernet ({info.describe()}), batch 64: "
        f"{per_min['inherited']:.1f} per minute inherited (mean of {len(inherited_s)}), "
        f"{per_min['one fine-tuning epoch']:.2f} per minute with one fine-tuning epoch "
        f"({train_images} training images).", "",
        f"The paper's SVHN experiment projected from these rates: **{hours:.1f} h** (15 warm-up supernet epochs "
        f"at the largest subnet's rate at {largest_px} px, 45 sandwich epochs at the mean sandwich rate of the "
        f"measured resolutions, 100 candidates x 5 fine-tuning epochs at the largest subnet's rate, on "
        f"{SVHN_TRAIN_IMAGES:,} training images)."])
    return Outcome(measured, holds, {"device": device, "rows": rows, "candidates_per_min": per_min,
                                     "inherited_s": inherited_s, "finetune_s": finetune_s,
                                     "svhn_projected_h": hours}, details)


def grid_row(data: Any, resolution: int, batch: int, steps: int, dev: torch.device, amp: bool) -> dict[str, Any]:
    """Images/s and forward GMAC/s at one resolution and batch size of the sandwich step, the largest subnet
    alone, and torchvision's mobilenet_v3_small, each on ``steps`` timed steps of the same images."""
    from aebnas.config import largest_arch
    from aebnas.data.batches import BatchLoader
    from aebnas.settings import TrialSettings
    from aebnas.space_values import space_values_of
    from aebnas.training.loop import (CandidateTraining, TrainSettings, grad_scaler, make_lr_schedule,
                                      make_optimizer, train_one_epoch)
    from aebnas.training.supernet import SupernetTraining
    from aebnas.training.supernet_file import SupernetSettings

    sub = _subset(data, batch * (steps + 1))
    space = space_values_of({"resolutions": (resolution,)})
    row: dict[str, Any] = {"px": resolution, "batch": batch}
    # the supernet's sandwich step
    run = SupernetTraining(space, 1.0, sub, SupernetSettings(epochs=4, batch_size=batch, warmup_fraction=0.0,
                                                             amp=amp), dev)
    clock = _Clock(dev)
    run.train_epoch(on_step=clock)
    subnets = [a for s in range(steps + 1) for a in run.subnets(0, s)]
    sandwich_mmacs = sum(_forward_mmacs(a) for a in subnets) / (steps + 1)  # per image and step
    row["sandwich img/s"] = clock.rate
    row["sandwich GMAC/s"] = clock.rate * sandwich_mmacs / 1e3
    # the largest subnet alone, in the candidates' loop
    largest = largest_arch(space, width_mult=1.0, num_classes=sub.num_classes, in_channels=sub.in_channels)
    cand = CandidateTraining(largest, TrialSettings(epochs=1, batch_size=batch, amp=amp), sub, dev)
    clock = _Clock(dev)
    cand.train_epoch(on_step=clock)
    row["largest img/s"] = clock.rate
    row["largest GMAC/s"] = clock.rate * _forward_mmacs(largest) / 1e3
    # torchvision's mobilenet_v3_small in the same loop, batches, precision and layout
    model = MobileNetV3Small(1.0, sub.num_classes).to(dev, memory_format=torch.channels_last)
    settings = TrainSettings(epochs=1, batch_size=batch, amp=amp)
    opt = make_optimizer(model, settings)
    loader = BatchLoader.for_split(sub, "train", batch_size=batch, resolution=resolution, train=True, device=dev)
    clock = _Clock(dev)
    train_one_epoch(model, loader, opt, make_lr_schedule(opt, settings, len(loader)), settings, clock,
                    grad_scaler(amp, dev))
    tv_mmacs = macs_of(1.0, resolution, sub.num_classes)
    row["torchvision img/s"] = clock.rate
    row["torchvision GMAC/s"] = clock.rate * tv_mmacs / 1e3
    row["sandwich / torchvision MACs"] = row["sandwich GMAC/s"] / row["torchvision GMAC/s"]
    return row


def candidate_seconds(candidates: int, dev: torch.device, amp: bool) -> tuple[Any, int, list[float], list[float]]:
    """Candidates from the shipped supernet, inherited and with one fine-tuning epoch (a third of them), each
    scored as a trial scores it: (the supernet's info, its training images, seconds each inherited, seconds
    each fine-tuned)."""
    from aebnas.config import random_arch
    from aebnas.data.datasets import load_dataset
    from aebnas.nn import extract
    from aebnas.settings import TrialSettings
    from aebnas.training.loop import CandidateTraining
    from aebnas.training.supernet_file import EMBEDDED_SUPERNET, load_supernet

    supernet, info = load_supernet(EMBEDDED_SUPERNET, dev)
    sdata = load_dataset(info.dataset, val_size=info.val_size, seed=info.split_seed)
    kw = {"width_mult": info.width_mult, "num_classes": info.num_classes, "in_channels": info.in_channels}
    rng = random.Random(0)
    archs = [random_arch(info.space, rng, **kw) for _ in range(candidates)]

    def candidate(arch: Any, epochs: int) -> float:
        start = time.perf_counter()
        settings = TrialSettings(epochs=epochs, batch_size=64, supernet="x", amp=amp)
        run = CandidateTraining(arch, settings, sdata, dev, model=extract(supernet, arch))
        for _ in range(epochs):
            run.train_epoch()
        run.evaluate()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    candidate(archs[0], 0)  # warm-up (allocations, autotuning)
    inherited_s = [candidate(a, 0) for a in archs]
    finetune_s = [candidate(a, 1) for a in archs[: max(1, len(archs) // 3)]]
    return info, len(sdata.y_train), inherited_s, finetune_s


def svhn_projection(rows: list[dict[str, Any]]) -> tuple[float, int]:
    """(hours, the largest resolution measured) of the paper's SVHN experiment projected from the measured rates:
    supernet (15 warm-up epochs of the largest at 72 px, 45 sandwich epochs at the paper's 32-72 px, here the mean
    of the measured resolutions' rates at the largest batch measured), 100 candidates fine-tuned 5 epochs at the
    largest subnet's rate (an upper bound: most are smaller)."""
    best = {px: max((r for r in rows if r["px"] == px), key=lambda r: r["sandwich img/s"]) for px in {r["px"] for r in rows}}
    sandwich_rate = float(np.mean([r["sandwich img/s"] for r in best.values()]))
    largest_rate = best[max(best)]["largest img/s"]
    hours = (15 * SVHN_TRAIN_IMAGES / largest_rate + 45 * SVHN_TRAIN_IMAGES / sandwich_rate
             + 100 * 5 * SVHN_TRAIN_IMAGES / largest_rate) / 3600
    return hours, max(best)


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK))
