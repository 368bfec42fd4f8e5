"""Claim 15: equal compute — a supernet trained here plus an inherited search, against a from-scratch search
given the same seconds on the same cores.

Arm A trains a supernet of the quickstart's space on this machine (``train_supernet`` in the driver's
process, all cores) and then searches ``num_samples`` candidates on it, each scored as inherited
(0 fine-tuning epochs). Its cost is the wall time of both on this 2-core machine, which both keep busy.
Arm B searches the same space and target from scratch (``epochs`` per candidate, ASHA) with
``time_budget_s`` set to arm A's seconds: the supernet's training counts against the supernet arm.
Each arm's network is the one picked on validation within ±10% of the target MACs; we report its test
accuracy and the share of test images that leave at an early exit.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from _common import (Claim, Context, Outcome, arch_summary, load_trials, main, md_table, provenance_note,
                     run_search, search_figures, start_ray, stop_ray, trial_config)
from _picks import in_window, validation_pick

CLAIM = Claim(15, "supernet_equal_compute", "Supernet + search vs from-scratch search at equal compute",
              "at the same seconds on the same cores (the supernet's training counts), the validation-picked network "
              "within ±10% of the target is ≥ 10 points more accurate on test, and sends ≥ 30% of test images out "
              "early")
SETTINGS = dict(supernet_epochs=12, num_samples=100, scratch_epochs=5, target_macs=5.0, tolerance=0.10,
                width_mult=0.75, resolutions=(32, 36, 40), batch_size=64, seed=0)
QUICK = dict(SETTINGS, supernet_epochs=1, num_samples=3, scratch_epochs=1, width_mult=0.25, resolutions=(32,),
             target_macs=1.0)


def measure(ctx: Context, supernet_epochs: int, num_samples: int, scratch_epochs: int, target_macs: float,
            tolerance: float, width_mult: float, resolutions: Sequence[int], batch_size: int, seed: int) -> Outcome:
    from aebnas.supernet import SupernetSettings, read_supernet_info
    from aebnas.supernet_train import SupernetRequest, train_supernet

    common = {"width_mult": width_mult, "space_kwargs": {"resolutions": tuple(resolutions)},
              "target_macs": target_macs, "batch_size": batch_size, "seed": seed, "split_seed": seed}
    # Arm A, part 1: the supernet, in this process on every core (no Ray running). With --reuse, the
    # supernet of an earlier run and its measured seconds (timing.json, written when it finished).
    stop_ray()
    out = ctx.scratch / "supernet"
    timing = out / "timing.json"
    if ctx.reuse and timing.is_file():
        recorded = json.loads(timing.read_text())
        path, supernet_s, supernet_cpu = Path(recorded["path"]), recorded["wall_s"], recorded["cpu_s"]
    else:
        shutil.rmtree(out, ignore_errors=True)
        request = SupernetRequest(out=str(out), space_kwargs={"resolutions": tuple(resolutions)},
                                  width_mult=width_mult, split_seed=seed, workers=0,
                                  settings=SupernetSettings(epochs=supernet_epochs, batch_size=batch_size, seed=seed))
        cpu0, t0 = time.process_time(), time.perf_counter()
        path = train_supernet(request)
        supernet_s, supernet_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        timing.write_text(json.dumps({"path": str(path), "wall_s": supernet_s, "cpu_s": supernet_cpu}))
    history = read_supernet_info(path).history
    print(f"  supernet: {supernet_epochs} epochs in {supernet_s:.0f} s (process CPU {supernet_cpu:.0f} s), "
          f"val acc largest {history[-1]['val_acc_largest']:.1f}%, smallest {history[-1]['val_acc_smallest']:.1f}%",
          flush=True)
    # Arm A, part 2: the inherited search.
    start_ray()
    inherited = run_search(ctx, "inherited", supernet=str(path), epochs=0, num_samples=num_samples, scheduler="fifo",
                           **common)
    budget = supernet_s + inherited.wall_s
    print(f"  inherited search: {num_samples} candidates in {inherited.wall_s:.0f} s; budget {budget:.0f} s",
          flush=True)
    # Arm B: from scratch, the same seconds.
    scratch = run_search(ctx, "scratch", supernet=None, epochs=scratch_epochs, num_samples=10_000, scheduler="asha",
                         grace_period=1, reduction_factor=2, time_budget_s=budget, **common)
    stop_ray()

    rows: list[dict[str, Any]] = []
    for label, run, cost in (("supernet + inherited search", inherited, budget), ("from scratch", scratch, scratch.wall_s)):
        trials = load_trials(run.path)
        finished = trials[trials["test_accuracy"].notna()]
        pick = validation_pick(trials, target_macs, tolerance)
        rows.append({
            "arm": label, "seconds": cost, "trials started": len(trials), "trials finished": len(finished),
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
    early = a["test images leaving early (%)"]
    holds: bool | str = ("could not tell: an arm has no finished trial in the window" if gain is None
                         else bool(gain >= 10 and early is not None and early >= 30))
    measured = ("no pick in the window" if gain is None else
                f"{a['picked test acc (%)']:.1f}% vs {b['picked test acc (%)']:.1f}% test accuracy (+{gain:.1f} points) "
                f"at {budget / 60:.1f} min each; {early:.0f}% of test images leave early")
    details = "\n".join([
        f"Quickstart's space (width {width_mult}, resolutions {tuple(resolutions)}), embedded CIFAR-10 subset, "
        f"target {target_macs} MMACs ±{tolerance:.0%}, seed {seed}, batch {batch_size}, on this machine's 2 cores.", "",
        f"- **Supernet arm:** `train_supernet` for {supernet_epochs} epochs in the driver's process ({supernet_s:.0f} s "
        f"wall, {supernet_cpu:.0f} s of process CPU: both cores busy; validation accuracy of the largest subnet "
        f"{history[-1]['val_acc_largest']:.1f}%, smallest {history[-1]['val_acc_smallest']:.1f}%), then "
        f"{num_samples} candidates scored as inherited ({inherited.wall_s:.0f} s): **{budget:.0f} s** in all.",
        f"- **From-scratch arm:** the same search, candidates trained from scratch for up to {scratch_epochs} epochs "
        f"with ASHA (grace 1, reduction 2), stopped by Ray Tune's `time_budget_s={budget:.0f}`.", "",
        md_table(rows, 1), "",
        "The pick is the best validation accuracy among finished trials whose validation average MACs is within "
        "the window; a from-scratch trial that ASHA or the time budget stopped has no test score and is not "
        "picked. " + provenance_note([inherited, scratch])])
    figures = {"rows": rows, "gain_points": gain, "budget_s": budget, "supernet_s": supernet_s,
               "supernet_cpu_s": supernet_cpu, "supernet_history": history,
               "searches": search_figures([inherited, scratch])}
    return Outcome(measured, holds, figures, details)


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK, reusable=True))
