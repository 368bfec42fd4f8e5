"""Claim 11: candidates scored per CPU-hour, inheriting from a supernet vs trained from scratch.

The same architectures (smallest, largest and random ones of the quickstart's space),
each scored the way a trial scores it — BatchNorm recalibrated, every exit's outputs on
the validation and test splits — after (a) inheriting the shipped supernet's weights,
(b) the same plus one fine-tuning epoch, (c) training from scratch for the paper's 5
epochs. CPU-seconds are this process's CPU time (both threads of torch's two),
interleaved per architecture. The supernet's own training is not counted here (it is a
one-off: see docs/supernet.md and claim 10).
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any

import torch

from harness.claims import Claim
from harness.common import Context, Outcome, main, md_table

CLAIM = Claim(11, "supernet_throughput", "Candidates per CPU-hour: inherited vs from scratch",
              "inheriting (0 fine-tuning epochs) scores ≥ 50× more candidates per CPU-hour than training "
              "each from scratch (5 epochs)")
SETTINGS = {"archs": 4, "scratch_epochs": 5, "finetune_epochs": 1, "batch_size": 64}
QUICK = {"archs": 2, "scratch_epochs": 1, "finetune_epochs": 1, "batch_size": 64}


def _cpu_seconds(fn) -> tuple[Any, float]:
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def measure(ctx: Context, archs: int, scratch_epochs: int, finetune_epochs: int, batch_size: int) -> Outcome:
    from aebnas.config import random_arch, smallest_arch
    from aebnas.data.datasets import load_dataset
    from aebnas.nn import extract
    from aebnas.settings import TrialSettings
    from aebnas.training.supernet_file import EMBEDDED_SUPERNET, load_supernet
    from aebnas.training.loop import CandidateTraining

    torch.set_num_threads(2)  # CPU-seconds count both threads; wall time is halved
    supernet, info = load_supernet(EMBEDDED_SUPERNET)
    data = load_dataset(info.dataset, val_size=info.val_size, seed=info.split_seed)
    kw = {"width_mult": info.width_mult, "num_classes": info.num_classes, "in_channels": info.in_channels}
    rng = random.Random(0)
    chosen = [smallest_arch(info.space, **kw)] + [random_arch(info.space, rng, **kw) for _ in range(archs - 1)]
    device = torch.device("cpu")

    def score(arch, epochs: int, inherit: bool) -> float:
        settings = TrialSettings(epochs=epochs, batch_size=batch_size, supernet="x" if inherit else None)
        run = CandidateTraining(arch, settings, data, device, model=extract(supernet, arch) if inherit else None)
        for _ in range(epochs):
            run.train_epoch()
        return float(run.evaluate()["test"].exit_accuracy()[-1])

    rows = []
    for i, arch in enumerate(chosen):
        row: dict[str, Any] = {"arch": i, "resolution": arch.resolution, "exits": arch.num_exits}
        for label, epochs, inherit in (("inherited", 0, True), (f"+{finetune_epochs} epoch", finetune_epochs, True),
                                       (f"scratch {scratch_epochs} ep", scratch_epochs, False)):
            acc, cpu = _cpu_seconds(lambda: score(arch, epochs, inherit))
            row[f"{label} CPU-s"], row[f"{label} test %"] = cpu, acc
        rows.append(row)
        print(f"  arch {i}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k.endswith("CPU-s")), flush=True)

    def per_hour(label: str) -> float:
        return 3600.0 * len(rows) / sum(r[f"{label} CPU-s"] for r in rows)

    inherited, tuned, scratch = (per_hour("inherited"), per_hour(f"+{finetune_epochs} epoch"),
                                 per_hour(f"scratch {scratch_epochs} ep"))
    ratio0, ratio1 = inherited / scratch, tuned / scratch
    measured = (f"{inherited:.0f} (inherited) / {tuned:.0f} (+{finetune_epochs} epoch) vs {scratch:.0f} (scratch) "
                f"candidates per CPU-hour: ×{ratio0:.0f} and ×{ratio1:.1f}")
    details = "\n".join([
        f"{len(rows)} architectures of the shipped supernet's space ({info.describe()}), each scored as a "
        "trial does (BatchNorm recalibrated on 10 batches, every exit on val and test) after each of three "
        f"preparations, one after the other per architecture; batch size {batch_size}, two torch threads. "
        "CPU-seconds of this process (`time.process_time`).", "",
        md_table(rows, 1), "",
        f"Candidates per CPU-hour: inherited **{inherited:.0f}**, inherited + {finetune_epochs} fine-tuning epoch "
        f"**{tuned:.0f}**, from scratch ({scratch_epochs} epochs) **{scratch:.0f}** — ×{ratio0:.1f} and ×{ratio1:.1f}. "
        "The supernet's own training (397 s on an H200; about 80 minutes estimated on these 2 cores) is paid "
        "once for every search on its space and split, and is not in these figures."])
    return Outcome(measured, ratio0 >= 50, {"rows": rows, "per_hour": {"inherited": inherited, "finetune": tuned,
                                                                       "scratch": scratch},
                                            "ratio_inherited": ratio0, "ratio_finetune": ratio1}, details)


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK))
