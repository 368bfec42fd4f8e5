"""Claim 13: supernet epoch time with 1 and 2 Ray Train workers (one CPU each) on this machine.

``aebnas supernet train`` of the quickstart's space for a few epochs (no warm-up: every
epoch is a sandwich epoch), once with 1 worker and once with 2 (data-parallel, gloo), same
global batch. The epoch time is what the first worker reports (training only; the
validation of largest and smallest subnets after each epoch is not in it).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, Sequence

from harness.claims import Claim
from harness.common import Context, Outcome, main, md_table, start_ray, stop_ray

WHY = (" Each worker runs as many steps as one worker would, on half the images: per-step work that does not "
       "shrink with the batch (Python dispatch of four subnets' sliced layers, the optimizer step, the all-reduce) "
       "is paid in full by both, which caps the speed-up on small batches.")
CLAIM = Claim(13, "supernet_scaling", "Supernet training with 1 and 2 Ray Train workers",
              "epoch time with 1 and 2 data-parallel workers (one CPU each); a figure")
SETTINGS = {"workers": (1, 2), "epochs": 2, "width_mult": 0.75, "resolutions": (32, 36, 40), "batch_size": 128}
QUICK = {"workers": (1, 2), "epochs": 1, "width_mult": 0.25, "resolutions": (32,), "batch_size": 64}


def measure(ctx: Context, workers: Sequence[int], epochs: int, width_mult: float, resolutions: Sequence[int],
            batch_size: int) -> Outcome:
    from aebnas.training.supernet_file import SupernetSettings, read_supernet_info
    from aebnas.training.supernet_job import SupernetRequest, train_supernet

    start_ray()
    rows: list[dict[str, Any]] = []
    for n in workers:
        out = ctx.scratch / f"workers{n}"
        shutil.rmtree(out, ignore_errors=True)
        request = SupernetRequest(out=str(out), space_kwargs={"resolutions": tuple(resolutions)}, width_mult=width_mult,
                                  settings=SupernetSettings(epochs=epochs, batch_size=batch_size, warmup_fraction=0.0),
                                  workers=n, cpus_per_worker=1)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        path = train_supernet(request)
        wall = time.perf_counter() - t0
        history = read_supernet_info(path).history
        epoch_s = [h["seconds"] for h in history]
        rows.append({"workers": n, "epochs": len(history), "mean epoch (s)": sum(epoch_s) / len(epoch_s),
                     "images/s (worker 0)": sum(h["images_per_s"] for h in history) / len(history),
                     "wall incl. start-up and validation (s)": wall,
                     "val acc largest (%)": history[-1]["val_acc_largest"], "load at start (1 min)": load})
        print(f"  {n} worker(s): {rows[-1]['mean epoch (s)']:.1f} s per epoch", flush=True)
    stop_ray()
    by_n = {r["workers"]: r for r in rows}
    lo, hi = min(by_n), max(by_n)
    speedup = by_n[lo]["mean epoch (s)"] / by_n[hi]["mean epoch (s)"]
    measured = (f"{by_n[lo]['mean epoch (s)']:.0f} s → {by_n[hi]['mean epoch (s)']:.0f} s per epoch "
                f"(×{speedup:.2f} with {hi} workers vs {lo})")
    details = "\n".join([
        f"`aebnas supernet train` of the quickstart's space (width {width_mult}, resolutions {tuple(resolutions)}, "
        f"global batch {batch_size}, {epochs} sandwich epochs) on the embedded CIFAR-10 subset, with {lo} and then "
        f"{hi} Ray Train workers of one CPU each (gloo) on this {os.cpu_count()}-core machine. Epoch time as the "
        "first worker measures it (its shard of the epoch: every worker has as many batches).", "",
        md_table(rows, 1), "",
        f"Speed-up of an epoch: **×{speedup:.2f}** (ideal ×{hi / lo:.0f}). Each step all-reduces every gradient "
        "once (one flat buffer); with only 2 cores the workers also share the machine with Ray itself. On a "
        "cluster, workers on other nodes add the network's all-reduce time per step."
        + WHY])
    return Outcome(measured, None, {"rows": rows, "speedup": speedup}, details)


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK))
