"""The reference row of docs/results.md: torchvision's ``mobilenet_v3_small`` trained alone.

Its width is scaled so that its MACs (ptflops, as aebnas counts them) are closest to a target;
it trains on the same split as the search (the training images only; the 6,000 validation images
are held out as the supernet's were) with aebnas's optimiser, schedule and augmentation
(SGD + Nesterov, one-cycle, random crop / flip as the dataset allows), and is tested on the test
split. Grayscale inputs are repeated to 3 channels (no MACs: the first convolution is counted
with 3 input channels, as the model is). Checkpointed every epoch: rerunning resumes.

    python benchmarks/harness/baseline.py --dataset fashion-mnist --val-size 6000 --target-macs 3 \
        --epochs 21 --out results/benchmarks/baseline_mnv3_3mmacs_s0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from aebnas.data.batches import BatchLoader
from aebnas.cost.macs import count_macs
from aebnas.data.datasets import load_dataset
from aebnas.files import atomic_write
from aebnas.progress import Progress, duration
from aebnas.settings import TrainSettings
from aebnas.training.loop import load_checkpoint, make_optimizer, make_lr_schedule, train_one_epoch

WIDTHS = np.round(np.arange(0.25, 3.001, 0.05), 2)
RESULT_FILE = "result.json"
CHECKPOINT_FILE = "checkpoint.pt"


class MobileNetV3Small(nn.Module):
    """torchvision's network; returns ``[logits]`` (one exit) for aebnas's training loop."""

    def __init__(self, width: float, num_classes: int) -> None:
        super().__init__()
        self.net = torchvision.models.mobilenet_v3_small(width_mult=float(width), num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)]


def macs_of(width: float, resolution: int, num_classes: int) -> float:
    return count_macs(MobileNetV3Small(width, num_classes).net, (3, resolution, resolution))


def width_for(target_macs: float, resolution: int, num_classes: int) -> tuple[float, float]:
    """(width, MMACs) of the width on the 0.05 grid whose MACs are closest to ``target_macs``."""
    best = min(((abs(macs_of(w, resolution, num_classes) - target_macs), float(w)) for w in WIDTHS))
    return best[1], macs_of(best[1], resolution, num_classes)


@torch.no_grad()
def test_accuracy(model: nn.Module, loader: BatchLoader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x)[0].argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def train(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / RESULT_FILE).exists():
        result = json.loads((out / RESULT_FILE).read_text())
        print(f"baseline: {out / RESULT_FILE} is done: {result['test_accuracy']:.2f}%")
        return result
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, data_dir=args.data_dir, val_size=args.val_size, seed=args.split_seed)
    width, macs = (args.width, macs_of(args.width, args.resolution, data.num_classes)) if args.width else \
        width_for(args.target_macs, args.resolution, data.num_classes)
    print(f"baseline: mobilenet_v3_small width {width:g}: {macs:.3f} MMACs at {args.resolution} px; {data.summary()}")
    torch.manual_seed(args.seed)
    model = MobileNetV3Small(width, data.num_classes).to(memory_format=torch.channels_last)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    batches = BatchLoader.for_split(data, "train", batch_size=args.batch_size, resolution=args.resolution,
                                    train=True, seed=args.seed)
    optimizer = make_optimizer(model, settings)
    scheduler = make_lr_schedule(optimizer, settings, len(batches))
    history: list[dict[str, float]] = []
    if (out / CHECKPOINT_FILE).exists():
        state = load_checkpoint(out / CHECKPOINT_FILE)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        print(f"baseline: resuming after epoch {len(history)}")
    test = BatchLoader.for_split(data, "test", batch_size=512, resolution=args.resolution, train=False)
    while len(history) < args.epochs:
        epoch = len(history) + 1
        batches.set_epoch(epoch - 1)
        progress = Progress(f"baseline epoch {epoch}/{args.epochs}", len(batches), print)
        stats = train_one_epoch(model, batches, optimizer, scheduler, settings, progress.update)
        history.append({"epoch": epoch, "loss": stats["loss"], "seconds": stats["seconds"],
                        "images_per_s": stats["images_per_s"]})
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "history": history}
        atomic_write(out / CHECKPOINT_FILE, lambda tmp, state=state: torch.save(state, tmp))
        print(f"baseline epoch {epoch}/{args.epochs}: loss {stats['loss']:.4f}, {stats['images_per_s']:.0f} images/s, "
              f"{duration(stats['seconds'])}", flush=True)
    start = time.perf_counter()
    accuracy = test_accuracy(model, test)
    result = {"model": "mobilenet_v3_small", "width_mult": width, "avg_macs": macs, "resolution": args.resolution,
              "seed": args.seed, "epochs": args.epochs, "test_accuracy": accuracy, "early_exit_share": 0.0,
              "train_seconds": sum(h["seconds"] for h in history), "test_seconds": time.perf_counter() - start,
              "params": sum(p.numel() for p in model.parameters()), "dataset": data.name,
              "train_images": len(data.y_train), "test_images": len(data.y_test)}
    atomic_write(out / RESULT_FILE, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    print(f"baseline: test accuracy {accuracy:.2f}% at {macs:.3f} MMACs -> {out / RESULT_FILE}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--val-size", type=int, default=6000)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--target-macs", type=float, default=3.0, help="MMACs the width is scaled to")
    p.add_argument("--width", type=float, help="this width instead of --target-macs")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--epochs", type=int, default=21)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    train(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
