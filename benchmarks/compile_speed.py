"""Claim 27: does ``aebnas supernet train --compile`` pay for its compilation?

``--compile`` runs the largest and the smallest subnet of every sandwich step through
``torch.compile`` (the random subnets, new every step, stay eager). This trains the quickstart's
supernet (width 0.75, 32/36/40 px, the embedded CIFAR-10 subset's 3,305 training images, batch 128)
twice with the documented command, ``aebnas supernet train … --workers 0`` (in this process), the
same seed and epochs: without and with ``--compile``, each in a fresh process with an empty inductor
cache (``TORCHINDUCTOR_CACHE_DIR``), so the compile is paid as a user's first run pays it.
The first epoch (warm-up: the largest alone) compiles the largest, the second (the first sandwich
epoch) the smallest; the later epochs give the steady speed.

Reported: each epoch's seconds, the steady sandwich images/s, the compile's cost (the two compiling
epochs' seconds beyond the eager run's), the epochs after which it has paid (cost ÷ seconds saved per
steady epoch), and the accuracies at the end. On this machine's device: CUDA when present (with
``--amp``), else the CPU's threads.

    python benchmarks/compile_speed.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from typing import Any

from harness.claims import Claim
from harness.common import REPO, Context, Outcome, main, md_table

CLAIM = Claim(27, "compile_speed", "torch.compile of the supernet's fixed subnets: does it pay?",
              "steady sandwich epochs ≥ 1.1× the eager images/s, and the compile's cost paid back within the "
              "60 epochs of a default supernet run")
SETTINGS = {"epochs": 5, "resolutions": (32, 36, 40), "width_mult": 0.75}
QUICK = {"epochs": 3, "resolutions": (32,), "width_mult": 0.25}
DEFAULT_EPOCHS = 60  # SupernetSettings' default: the run the compile must pay within
MIN_SPEEDUP = 1.1


def _train(ctx: Context, compile: bool, epochs: int, resolutions: tuple[int, ...], width_mult: float,
           cuda: bool) -> list[dict[str, Any]]:
    from aebnas.training.supernet_file import read_supernet_info

    name = "compiled" if compile else "eager"
    out = ctx.scratch / name
    cache = ctx.scratch / f"inductor_cache_{name}"
    if not (out / "supernet.pt").exists():  # a run killed part-way starts again: its epochs' times would mix
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    argv = [sys.executable, "-m", "aebnas.cli", "supernet", "train", "--dataset", "cifar10-subset",
            "--width-mult", str(width_mult), "--resolutions", ",".join(map(str, resolutions)),
            "--epochs", str(epochs), "--workers", "0", "--out", str(out),
            *(["--compile"] if compile else []), *(["--amp"] if cuda else [])]
    print(f"  {name}: {' '.join(argv[1:])}", flush=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    subprocess.run(argv, check=True, env=env, cwd=REPO)
    return read_supernet_info(out / "supernet.pt").history


def measure(ctx: Context, epochs: int, resolutions: tuple[int, ...], width_mult: float) -> Outcome:
    import torch

    from aebnas.training.supernet_file import SupernetSettings

    if epochs < 3:
        raise ValueError(f"epochs={epochs}: 2 epochs compile, at least one more gives the steady speed")
    cuda = torch.cuda.is_available()
    warmup = SupernetSettings(epochs=epochs).warmup_epochs
    if warmup != 1:
        raise ValueError(f"epochs={epochs} gives {warmup} warm-up epochs; the figures assume 1 (3 to 5 epochs)")
    runs = {mode: _train(ctx, mode, epochs, resolutions, width_mult, cuda) for mode in (False, True)}
    eager, compiled = runs[False], runs[True]
    rows = [{"epoch": e["epoch"], "phase": "warm-up" if e.get("warmup") else "sandwich",
             "eager s": e["seconds"], "compiled s": c["seconds"], "eager images/s": e["images_per_s"],
             "compiled images/s": c["images_per_s"]} for e, c in zip(eager, compiled)]
    named = (("eager", eager), ("compiled", compiled))

    def steady(key: str) -> dict[str, float]:  # the mean after the two epochs that compile
        return {name: statistics.mean(h[key] for h in hist[2:]) for name, hist in named}

    rate, epoch_s = steady("images_per_s"), steady("seconds")
    speedup = rate["compiled"] / rate["eager"]
    cost = sum(c["seconds"] - e["seconds"] for e, c in zip(eager[:2], compiled[:2]))
    saved = epoch_s["eager"] - epoch_s["compiled"]
    payback = cost / saved if saved > 0 else None
    holds = speedup >= MIN_SPEEDUP and payback is not None and payback <= DEFAULT_EPOCHS
    device = torch.cuda.get_device_name(0) if cuda else f"cpu, {torch.get_num_threads()} threads"
    pays = (f"paid back after {payback:.0f} epochs" if payback is not None
            else "never paid back (the compiled epochs are not faster)")
    measured = (f"{device}: steady sandwich ×{speedup:.2f} images/s ({rate['compiled']:.0f} vs {rate['eager']:.0f}); "
                f"compile {cost:.0f} s, {pays}")
    accuracy = [{"run": name, "val acc largest (%)": hist[-1]["val_acc_largest"],
                 "val acc smallest (%)": hist[-1]["val_acc_smallest"], "training s": sum(h["seconds"] for h in hist)}
                for name, hist in named]
    details = "\n".join([
        f"Device: {device}. The supernet of width {width_mult:g}, resolutions {list(resolutions)}, on the embedded "
        f"CIFAR-10 subset (3,305 training images; scoring after each epoch not counted), batch 128, seed 0, "
        f"{epochs} epochs (the first the largest alone), trained by `aebnas supernet train --workers 0` without and "
        "with `--compile`, each in its own process with an empty inductor cache. Epochs 1 and 2 compile the "
        "largest and the smallest subnet; the steady figures are the mean of the later epochs.", "",
        md_table(rows, 1), "",
        f"Compile cost: {cost:.0f} s (epochs 1–2, compiled minus eager). Seconds saved per steady epoch: "
        f"{saved:.1f}. {pays[0].upper() + pays[1:]}; a default run has {DEFAULT_EPOCHS} epochs. At the end "
        "(the two runs differ only by the rounding of fused kernels, which training amplifies):", "",
        md_table(accuracy, 1)])
    return Outcome(measured, holds, {"rows": rows, "steady_images_per_s": rate, "speedup": speedup,
                                     "compile_cost_s": cost, "saved_per_epoch_s": saved, "payback_epochs": payback,
                                     "accuracy": accuracy}, details)


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK))
