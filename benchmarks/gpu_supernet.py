"""Claim 10: the supernet trains, and its candidates are scored, fine-tuned and run, on CUDA.

Runs on a GPU machine (it needs no Ray): trains the quickstart's supernet with the
documented command (``aebnas supernet train … --workers 0``, in-process on one GPU),
then, on CUDA: scores candidates that inherit its weights (BatchNorm recalibrated, as a
trial does), fine-tunes one for an epoch with mixed precision, and checks that
``EarlyExitNet.infer`` on CUDA takes the same exits and predictions as on the CPU.
Without a GPU it reports that it could not tell. The supernet file it writes is the one
the package ships (``aebnas/_data/``); copy it there by hand after a full run.

    python benchmarks/gpu_supernet.py [--quick] [--docs-dir DIR]
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from harness.claims import Claim
from harness.common import DOCS_DIR, REPO, Context, Outcome, main, md_table

CLAIM = Claim(10, "gpu_supernet", "Supernet training, inherited scoring, fine-tuning and infer on CUDA",
              "everything runs on CUDA; infer on CUDA agrees with the CPU (figures: epoch and candidate times)")

SETTINGS = {"epochs": 60, "width_mult": 0.75, "resolutions": "32,36,40", "candidates": 12}
QUICK = {"epochs": 1, "width_mult": 0.5, "resolutions": "32", "candidates": 3}


def measure(ctx: Context, epochs: int, width_mult: float, resolutions: str, candidates: int) -> Outcome:
    from aebnas.data.datasets import load_dataset
    from aebnas.training.supernet_file import load_supernet

    if not torch.cuda.is_available() and not ctx.quick:
        return Outcome("no GPU on this machine", "could not tell (no GPU)", {}, "No CUDA device: nothing measured.")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # --quick checks the script on a CPU
    out = ctx.scratch / "supernet"
    command, train_s = train_supernet(out, epochs, width_mult, resolutions)
    supernet, info = load_supernet(out / "supernet.pt", dev)
    if ctx.docs.resolve() != DOCS_DIR.resolve():  # --docs-dir on a lent machine: bring the supernet back too
        shutil.copyfile(out / "supernet.pt", ctx.docs / "supernet.pt")
    history = info.history
    data = load_dataset(info.dataset, val_size=info.val_size, seed=info.split_seed)
    archs, rows, score_s = score_candidates(supernet, info, data, dev, candidates)
    tuned = finetune_and_infer(supernet, archs[1] if len(archs) > 1 else archs[0], data, dev, out)
    holds = tuned["agree_pred"] >= 0.99 and tuned["agree_exit"] >= 0.99
    sandwich = [h["seconds"] for h in history if not h.get("warmup")]
    warm = [h["seconds"] for h in history if h.get("warmup")]
    last = history[-1]
    figures = {"gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else "none (--quick on a CPU)", "epochs": epochs, "train_s": train_s,
               "epoch_s_sandwich": sum(sandwich) / max(len(sandwich), 1),
               "epoch_s_warmup": sum(warm) / max(len(warm), 1), "val_acc_largest": last["val_acc_largest"],
               "val_acc_smallest": last["val_acc_smallest"], "score_s_per_candidate": score_s,
               "candidates": rows, "finetune_epoch_s": tuned["stats"]["seconds"],
               "finetune_val_before": tuned["before"], "finetune_val_after": tuned["after"],
               "infer_agree_pred": tuned["agree_pred"], "infer_agree_exit": tuned["agree_exit"],
               "history": [{k: h[k] for k in ("epoch", "loss", "val_acc_largest", "val_acc_smallest", "seconds")}
                           for h in history]}
    measured = (f"{epochs} epochs in {train_s:.0f} s on {figures['gpu']}; val acc largest "
                f"{last['val_acc_largest']:.1f}%, smallest {last['val_acc_smallest']:.1f}%; "
                f"{score_s:.2f} s per inherited candidate; infer CUDA=CPU on {100 * tuned['agree_pred']:.1f}% of "
                "predictions")
    details = "\n".join([
        f"Supernet: `{' '.join(command[1:]).replace(str(REPO) + '/', '')}` — {train_s:.0f} s in all, "
        f"{figures['epoch_s_warmup']:.2f} s per warm-up epoch (largest only), {figures['epoch_s_sandwich']:.2f} s "
        f"per sandwich epoch (largest, smallest and 2 random subnets).", "",
        f"Inherited candidates (BatchNorm recalibrated, validation split): {score_s:.2f} s each on CUDA.", "",
        md_table(rows[:10]), "",
        f"One-epoch fine-tuning with AMP: {tuned['stats']['seconds']:.1f} s; validation accuracy "
        f"{tuned['before']:.1f}% → {tuned['after']:.1f}%.",
        "", f"`infer` on CUDA vs CPU (256 test images, thresholds 0.5): same prediction for "
        f"{100 * tuned['agree_pred']:.1f}%, same exit for {100 * tuned['agree_exit']:.1f}%.", "",
        "Supernet per epoch: " + ", ".join(f"{h['epoch']}: {h['val_acc_largest']:.1f}/{h['val_acc_smallest']:.1f}"
                                            for h in history[:: max(1, len(history) // 10)]) + " (val % largest/smallest)"])
    return Outcome(measured, holds, figures, details)


def train_supernet(out: Path, epochs: int, width_mult: float, resolutions: str) -> tuple[list[str], float]:
    """The quickstart's supernet trained with the documented command (in-process on one GPU) into ``out``:
    (the command, its wall seconds)."""
    command = [sys.executable, "-m", "aebnas.cli", "supernet", "train", "--dataset", "cifar10-subset",
               "--resolutions", resolutions, "--width-mult", str(width_mult), "--epochs", str(epochs),
               "--workers", "0", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO)
    return command, time.perf_counter() - t0


def score_candidates(supernet: Any, info: Any, data: Any, dev: torch.device, candidates: int
                     ) -> tuple[list[Any], list[dict[str, Any]], float]:
    """The smallest and random candidates of the supernet's space scored as inherited on validation:
    (the candidates, a row each, seconds per candidate)."""
    from aebnas.config import random_arch, smallest_arch
    from aebnas.training.loop import Scorer
    from aebnas.training.supernet import score_subnet

    rng = random.Random(0)
    kw = {"width_mult": info.width_mult, "num_classes": info.num_classes, "in_channels": info.in_channels}
    archs = [smallest_arch(info.space, **kw)] + [random_arch(info.space, rng, **kw) for _ in range(candidates - 1)]
    scorers: dict[int, Scorer] = {}
    rows, t_score = [], time.perf_counter()
    for arch in archs:
        scorer = scorers.setdefault(arch.resolution, Scorer.from_settings(data, arch.resolution, dev, info.settings))
        acc = score_subnet(supernet, arch, scorer, "val").exit_accuracy()
        rows.append({"resolution": arch.resolution, "exits": arch.num_exits, "final_val_acc": float(acc[-1]),
                     "best_exit_val_acc": float(acc[:-1].max()) if arch.num_exits else None})
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return archs, rows, (time.perf_counter() - t_score) / len(archs)


def finetune_and_infer(supernet: Any, arch: Any, data: Any, dev: torch.device, out: Path) -> dict[str, Any]:
    """Fine-tuning an inherited candidate for one epoch with mixed precision, as a trial does; then ``infer``
    on CUDA against the CPU: same exits taken and same predictions (thresholds mid-range). Returns
    {"stats": the epoch's, "before"/"after": validation accuracy, "agree_pred"/"agree_exit": shares}."""
    from aebnas.nn import extract
    from aebnas.settings import TrialSettings
    from aebnas.training.loop import CandidateTraining

    settings = TrialSettings(epochs=1, supernet=str(out / "supernet.pt"), amp=True, batch_size=64)
    run = CandidateTraining(arch, settings, data, dev, model=extract(supernet, arch))
    before = float(run.evaluate(("val",))["val"].exit_accuracy()[-1])
    stats = run.train_epoch()
    after = float(run.evaluate(("val",))["val"].exit_accuracy()[-1])
    net = run.model.float().eval()
    net.set_thresholds([0.5] * arch.num_exits)
    x = next(iter(run.scorer.eval_batches["test"]))[0][:256]
    logits, gpu_exit = net.infer(x)
    gpu_pred, gpu_exit = logits.argmax(1).cpu(), gpu_exit.cpu()
    logits, cpu_exit = net.to("cpu").infer(x.cpu())
    cpu_pred = logits.argmax(1)
    return {"stats": stats, "before": before, "after": after,
            "agree_pred": float((gpu_pred == cpu_pred).float().mean()),
            "agree_exit": float((gpu_exit == cpu_exit).float().mean())}


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK))
