"""Claim 24: does a large batch train the supernet as well, and faster?

The supernet of the quickstart's space (width 0.75, 32/36/40 px) trained on the embedded CIFAR-10
subset's 3,305 training images, the same epochs and seeds, at batch 128 (peak learning rate 0.1: the
default) and at a larger batch with the learning rate scaled linearly (``--lr-batch 128``: 0.1 × 4 at
batch 512), the one-cycle schedule warming it up over its first quarter. Reported side by side in one
run: the largest and smallest subnets' validation accuracy at the end (500 images: one image is 0.2
points) and the images/s of the sandwich epochs. On this machine's device: CUDA when present (where a
large batch is what fills the GPU), else the CPU.

Each training is an ``aebnas supernet train`` run directory under results/benchmarks/large_batch_supernet/
(resumed by ``train_supernet`` when a killed run is started again).

    python benchmarks/large_batch_supernet.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
from typing import Any, Sequence

import pandas as pd

from harness.claims import Claim
from harness.common import Context, Outcome, main, md_table
from harness.picks import ahead

CLAIM = Claim(24, "large_batch_supernet", "Large-batch supernet training: as accurate, and faster?",
              "at the same epochs, the large batch's largest and smallest validation accuracy at the end not lower "
              "than batch 128's by more than one standard error of the paired differences (seeds), and its "
              "sandwich epochs ≥ 1.5× the images/s")
SETTINGS = {"epochs": 20, "batches": (128, 512), "seeds": (0, 1)}
QUICK = {"epochs": 2, "batches": (128, 256), "seeds": (0,)}
BASE_BATCH, BASE_LR = 128, 0.1


def measure(ctx: Context, epochs: int, batches: Sequence[int], seeds: Sequence[int]) -> Outcome:
    from aebnas.training.supernet_file import SupernetSettings, read_supernet_info
    from aebnas.training.supernet_job import SupernetRequest, train_supernet
    from aebnas.training.loop import select_device

    device = select_device("auto")
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        for batch in batches:
            settings = SupernetSettings(epochs=epochs, batch_size=batch, lr=BASE_LR,
                                        lr_batch=None if batch == BASE_BATCH else BASE_BATCH, seed=seed,
                                        amp=device.type == "cuda")
            out = ctx.scratch / f"b{batch}_s{seed}"
            print(f"  batch {batch}, seed {seed}: peak lr {settings.peak_lr:g}, {epochs} epochs -> {out}", flush=True)
            path = train_supernet(SupernetRequest(out=str(out), dataset="cifar10-subset", width_mult=0.75,
                                                  space_kwargs={"resolutions": (32, 36, 40)}, settings=settings,
                                                  workers=0, split_seed=0))
            info = read_supernet_info(path)
            last = info.history[-1]
            sandwich = [h for h in info.history if not h.get("warmup")]
            rows.append({"seed": seed, "batch": batch, "peak lr": settings.peak_lr,
                         "val acc largest (%)": last["val_acc_largest"], "val acc smallest (%)": last["val_acc_smallest"],
                         "sandwich images/s": statistics.median(h["images_per_s"] for h in sandwich),
                         "training s": sum(h["seconds"] for h in info.history)})
    big = max(batches)
    pairs = {s: {r["batch"]: r for r in rows if r["seed"] == s} for s in seeds}

    def paired(key: str) -> tuple[float, float]:
        mean, se, _ = ahead(pd.Series({s: p[big][key] for s, p in pairs.items()}),
                            pd.Series({s: p[BASE_BATCH][key] for s, p in pairs.items()}))
        return mean, se

    diffs = {k: paired(k) for k in ("val acc largest (%)", "val acc smallest (%)")}
    speed = statistics.mean(p[big]["sandwich images/s"] / p[BASE_BATCH]["sandwich images/s"] for p in pairs.values())
    not_lower = all(m >= -(se if se == se else 0.0) for m, se in diffs.values())
    holds = not_lower and speed >= 1.5
    measured = (f"{device.type}: batch {big} vs {BASE_BATCH} at {epochs} epochs, {len(seeds)} seed(s): largest "
                f"{diffs['val acc largest (%)'][0]:+.1f} ± {diffs['val acc largest (%)'][1]:.1f} points, smallest "
                f"{diffs['val acc smallest (%)'][0]:+.1f} ± {diffs['val acc smallest (%)'][1]:.1f}; sandwich "
                f"×{speed:.2f} images/s")
    details = "\n".join([
        f"Device: {device}; supernet of the quickstart's space (width 0.75, resolutions 32/36/40), the embedded "
        f"CIFAR-10 subset (3,305 training, 500 validation images, split seed 0), {epochs} epochs (the first quarter "
        f"the largest subnet alone), trained in this process (`workers=0`). Batch {BASE_BATCH} at peak lr "
        f"{BASE_LR:g} (the default); batch {big} with `lr_batch={BASE_BATCH}` (peak lr {BASE_LR * big / BASE_BATCH:g}). "
        "Images/s: the median over the sandwich epochs (the time an epoch's steps take, scoring excluded).", "",
        md_table(rows, 2), "",
        "Paired differences (batch " + str(big) + " − batch " + str(BASE_BATCH) + ", same seed): " + "; ".join(
            f"{k}: {m:+.2f} ± {se:.2f} (s.e.)" for k, (m, se) in diffs.items()) + "."])
    return Outcome(measured, holds, {"rows": rows, "differences": {k: list(v) for k, v in diffs.items()},
                                     "speedup": speed}, details)


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK))
