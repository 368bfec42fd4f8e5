"""Claims 15 and 26: equal compute — a supernet trained here plus an inherited search, against a from-scratch
search given the same seconds on the same cores.

Arm A trains a supernet of the space on this machine (``train_supernet`` in the driver's process, all
cores) and then searches ``num_samples`` candidates on it, each scored as inherited (0 fine-tuning epochs).
Its cost is the wall time of both on this machine, which both keep busy. Arm B searches the same space and
target from scratch (``scratch_epochs`` per candidate, ASHA) with ``time_budget_s`` set to arm A's seconds:
the supernet's training counts against the supernet arm. Each arm's network is the one picked on validation
within ±10% of the target MACs; we report its test accuracy and the share of test images that leave at an
early exit. With several seeds (each trains its own supernet and runs its own searches), the gain is judged
on the paired differences as well. Two variants, each its own section (``--variant``):

- ``cifar10_subset`` (claim 15, the default): the embedded CIFAR-10 subset, the quickstart's space.
- ``fashion_mnist`` (claim 26): the data, space and target of ``tune_configs/fashion_mnist.py`` (54,000
  training / 6,000 validation images, split seed 0 as the job; 10,000 test images; width 0.5 at 28 and
  32 px; 3 MMACs). The size this 2-core machine affords: each seed trains its own supernet for 1 epoch of
  the 54,000 images (about 5 minutes) and scores 30 inherited candidates; the from-scratch search gets
  those seconds, each candidate trained 1 epoch (one epoch of 54,000 images already takes a small network
  past 80% here). About 15 minutes a seed. Fashion-MNIST's ceiling is near 93%, so claim 15's 10-point
  gain cannot happen here: the goal is to be ahead by more than one standard error of the paired
  differences, with ≥ 30% of test images leaving early.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from harness import fashion_mnist
from harness.claims import Claim, Variant
from harness.common import (Context, Outcome, arch_summary, load_trials, main_with_variants, md_table,
                            provenance_note, run_search, search_figures, start_ray, stop_ray, trial_config)
from harness.picks import ahead, in_window, validation_pick

CIFAR10_SUBSET = dict(supernet_epochs=12, num_samples=100, scratch_epochs=5, target_macs=5.0, tolerance=0.10,
                      width_mult=0.75, resolutions=(32, 36, 40), batch_size=64, seeds=(0,))
JOB = fashion_mnist.JOB
FASHION_MNIST = dict(supernet_epochs=1, num_samples=30, scratch_epochs=1, target_macs=JOB.target_macs,
                     tolerance=0.10, width_mult=JOB.width_mult, resolutions=tuple(JOB.space_kwargs["resolutions"]),
                     batch_size=JOB.batch_size, seeds=(0, 1, 2), dataset=JOB.dataset, val_size=JOB.val_size,
                     split_seed=JOB.data_split_seed, min_gain=0.0, min_early=30.0)
VARIANTS = {
    "cifar10_subset": Variant(
        Claim(15, "supernet_equal_compute", "Supernet + search vs from-scratch search at equal compute",
              "at the same seconds on the same cores (the supernet's training counts), the validation-picked "
              "network within ±10% of the target is ≥ 10 points more accurate on test, and sends ≥ 30% of test "
              "images out early"),
        CIFAR10_SUBSET,
        quick=dict(CIFAR10_SUBSET, supernet_epochs=1, num_samples=3, scratch_epochs=1, width_mult=0.25,
                   resolutions=(32,), target_macs=1.0)),
    fashion_mnist.VARIANT: Variant(
        fashion_mnist.SUPERNET_EQUAL_COMPUTE, FASHION_MNIST,
        # --quick checks the script on the embedded subset (Fashion-MNIST's 16,000 images to score make any run long)
        quick=dict(FASHION_MNIST, seeds=(0, 1), num_samples=2, dataset="cifar10-subset", val_size=None,
                   width_mult=0.25, resolutions=(32,), target_macs=1.0)),
}


def measure(ctx: Context, supernet_epochs: int, num_samples: int, scratch_epochs: int, target_macs: float,
            tolerance: float, width_mult: float, resolutions: Sequence[int], batch_size: int, seeds: Sequence[int],
            dataset: str = "cifar10-subset", val_size: int | None = None, split_seed: int | None = None,
            min_gain: float = 10.0, min_early: float = 30.0) -> Outcome:
    """``split_seed`` None: each seed draws its own train/validation split. Holds when the supernet arm's
    test accuracy is ``min_gain`` points or more above the scratch arm's (mean over seeds; with several
    seeds also by more than one standard error of the paired differences) and its pick sends
    ``min_early`` % or more of the test images out early (mean over seeds)."""
    from aebnas.data.datasets import load_dataset

    data = load_dataset(dataset, val_size=val_size, seed=split_seed or 0)  # for the summary line only
    per_seed = [_one_seed(ctx, seed, supernet_epochs, num_samples, scratch_epochs, target_macs, tolerance,
                          width_mult, resolutions, batch_size, dataset, val_size,
                          seed if split_seed is None else split_seed, tag=len(seeds) > 1)
                for seed in seeds]
    stop_ray()
    rows = [row for s in per_seed for row in s["rows"]]
    gains = [s["gain"] for s in per_seed]
    if any(g is None for g in gains):
        holds: bool | str = "could not tell: an arm of some seed has no finished trial in the window"
        measured = "no pick in the window for some seed: " + ", ".join(
            f"seed {s['seed']}: " + ("none" if s["gain"] is None else f"{s['gain']:+.1f} points") for s in per_seed)
        gain = sem = early = None
    else:
        import pandas as pd

        ours = pd.Series([s["rows"][0]["picked test acc (%)"] for s in per_seed], index=list(seeds))
        theirs = pd.Series([s["rows"][1]["picked test acc (%)"] for s in per_seed], index=list(seeds))
        gain, sem, beyond = ahead(ours, theirs)
        early = sum(s["rows"][0]["test images leaving early (%)"] for s in per_seed) / len(per_seed)
        holds = bool(gain >= min_gain and early >= min_early and (len(seeds) == 1 or beyond))
        budget_min = sum(s["budget_s"] for s in per_seed) / len(per_seed) / 60
        measured = (f"{ours.mean():.1f}% vs {theirs.mean():.1f}% test accuracy ({gain:+.1f}"
                    + (f" ± {sem:.1f} points, s.e. of {len(seeds)} paired seeds)" if len(seeds) > 1 else " points)")
                    + f" at {budget_min:.1f} min each; {early:.0f}% of test images leave early")
    first = per_seed[0]
    beyond_se = "by more than one standard error of the paired (same seed) differences" if len(seeds) > 1 else ""
    gain_rule = (f"≥ {min_gain:g} points ahead" + (f" and {beyond_se}" if beyond_se else "") if min_gain > 0
                 else f"ahead {beyond_se}".strip())
    details = "\n".join([
        f"Space aebnas (width {width_mult}, resolutions {tuple(resolutions)}), {data.summary()} "
        f"(split seed {'= seed' if split_seed is None else split_seed}), target {target_macs} MMACs "
        f"±{tolerance:.0%}, seed(s) {tuple(seeds)}, batch {batch_size}, on this machine's cores. Each seed:", "",
        f"- **Supernet arm:** `train_supernet` for {supernet_epochs} epoch(s) in the driver's process (seed 0: "
        f"{first['supernet_s']:.0f} s wall, {first['supernet_cpu']:.0f} s of process CPU: every core busy), then "
        f"{num_samples} candidates scored as inherited (random search); both count.",
        f"- **From-scratch arm:** the same search, candidates trained from scratch for up to {scratch_epochs} "
        f"epoch(s) with ASHA (grace 1, reduction 2), stopped by Ray Tune's `time_budget_s` = the supernet arm's "
        "seconds.", "",
        md_table(rows, 1), "",
        "Supernets (validation accuracy at the end): " + "; ".join(
            f"seed {s['seed']}: largest {s['history'][-1]['val_acc_largest']:.1f}%, smallest "
            f"{s['history'][-1]['val_acc_smallest']:.1f}% ({s['supernet_s']:.0f} s)" for s in per_seed) + ".", "",
        f"Goal here: the supernet arm's pick {gain_rule} on test accuracy, with ≥ {min_early:g}% of test images "
        "leaving early (mean over seeds). The pick is the best validation accuracy among finished trials whose "
        "validation average MACs is within the window; a from-scratch trial that ASHA or the time budget stopped "
        "has no test score and is not picked. " + provenance_note([r for s in per_seed for r in s["runs"]])])
    figures = {"rows": rows, "gain_points": gain, "gain_se": sem, "early_percent": early,
               "per_seed": [{k: v for k, v in s.items() if k not in ("rows", "runs")} for s in per_seed],
               "searches": search_figures([r for s in per_seed for r in s["runs"]])}
    return Outcome(measured, holds, figures, details)


def _one_seed(ctx: Context, seed: int, supernet_epochs: int, num_samples: int, scratch_epochs: int,
              target_macs: float, tolerance: float, width_mult: float, resolutions: Sequence[int], batch_size: int,
              dataset: str, val_size: int | None, split_seed: int, tag: bool) -> dict[str, Any]:
    """Both arms for one seed; ``tag``: name the runs after the seed (several seeds)."""
    from aebnas.training.supernet_file import SupernetSettings, read_supernet_info
    from aebnas.training.supernet_job import SupernetRequest, train_supernet

    suffix = f"_s{seed}" if tag else ""
    common = {"width_mult": width_mult, "space_kwargs": {"resolutions": tuple(resolutions)},
              "target_macs": target_macs, "batch_size": batch_size, "seed": seed, "split_seed": split_seed,
              "dataset": dataset, "val_size": val_size}
    # Arm A, part 1: the supernet, in this process on every core (no Ray running). With --reuse, the
    # supernet of an earlier run and its measured seconds (timing.json, written when it finished).
    stop_ray()
    out = ctx.scratch / f"supernet{suffix}"
    timing = out / "timing.json"
    if ctx.reuse and timing.is_file():
        recorded = json.loads(timing.read_text())
        path, supernet_s, supernet_cpu = Path(recorded["path"]), recorded["wall_s"], recorded["cpu_s"]
    else:
        shutil.rmtree(out, ignore_errors=True)
        request = SupernetRequest(out=str(out), dataset=dataset, val_size=val_size,
                                  space_kwargs={"resolutions": tuple(resolutions)}, width_mult=width_mult,
                                  split_seed=split_seed, workers=0,
                                  settings=SupernetSettings(epochs=supernet_epochs, batch_size=batch_size, seed=seed))
        cpu0, t0 = time.process_time(), time.perf_counter()
        path = train_supernet(request)
        supernet_s, supernet_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        timing.write_text(json.dumps({"path": str(path), "wall_s": supernet_s, "cpu_s": supernet_cpu}))
    history = read_supernet_info(path).history
    print(f"  seed {seed}: supernet {supernet_epochs} epoch(s) in {supernet_s:.0f} s (process CPU "
          f"{supernet_cpu:.0f} s), val acc largest {history[-1]['val_acc_largest']:.1f}%, smallest "
          f"{history[-1]['val_acc_smallest']:.1f}%", flush=True)
    # Arm A, part 2: the inherited search.
    start_ray()
    inherited = run_search(ctx, f"inherited{suffix}", supernet=str(path), epochs=0, num_samples=num_samples,
                           scheduler="fifo", **common)
    budget = supernet_s + inherited.wall_s
    print(f"  seed {seed}: inherited search: {num_samples} candidates in {inherited.wall_s:.0f} s; budget "
          f"{budget:.0f} s", flush=True)
    # Arm B: from scratch, the same seconds.
    scratch = run_search(ctx, f"scratch{suffix}", supernet=None, epochs=scratch_epochs, num_samples=10_000,
                         scheduler="asha", grace_period=1, reduction_factor=2, time_budget_s=budget, **common)

    rows: list[dict[str, Any]] = []
    for label, run, cost in (("supernet + inherited search", inherited, budget),
                             ("from scratch", scratch, scratch.wall_s)):
        trials = load_trials(run.path)
        finished = trials[trials["test_accuracy"].notna()]
        pick = validation_pick(trials, target_macs, tolerance)
        rows.append({
            "seed": seed, "arm": label, "seconds": cost, "trials started": len(trials),
            "trials finished": len(finished),
            "finished in window": int(in_window(finished["avg_macs"], target_macs, tolerance).sum()),
            "picked val acc (%)": None if pick is None else float(pick["accuracy"]),
            "picked test acc (%)": None if pick is None else float(pick["test_accuracy"]),
            "picked test MMACs": None if pick is None else float(pick["test_avg_macs"]),
            "test images leaving early (%)": None if pick is None else 100 * float(pick["test_early_exit"]),
            "picked network": "–" if pick is None else arch_summary(trial_config(pick)[0].to_flat())})
        print(f"  {label}: " + ", ".join(f"{k} {v}" for k, v in rows[-1].items() if k != "arm"), flush=True)
    a, b = rows
    gain = (None if a["picked test acc (%)"] is None or b["picked test acc (%)"] is None
            else a["picked test acc (%)"] - b["picked test acc (%)"])
    return {"seed": seed, "rows": rows, "gain": gain, "budget_s": budget, "supernet_s": supernet_s,
            "supernet_cpu": supernet_cpu, "history": history, "runs": [inherited, scratch]}


if __name__ == "__main__":
    sys.exit(main_with_variants(VARIANTS, measure, reusable=True))
