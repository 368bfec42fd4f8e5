"""Claim 21: does the latency objective pay? A search for a target in milliseconds against a
search for the MACs that the same milliseconds would predict.

The latency table is claim 19's (``aebnas latency profile`` of the shipped supernet's space on
this machine, batch 1, 1 thread; profiled here first if claim 19 has not run). The target in ms
and its MAC counterpart: over ``fit_archs`` random networks of the space, every exit's cost in
MMACs (ptflops) is fitted as a straight line of its cost in ms (the table's ONNX Runtime
figures); ``target_macs`` MMACs give ``target_ms`` = the ms at which that line reaches them.
Per seed, two random searches with the same seed — hence the same candidates, inherited from the
shipped supernet (0 fine-tuning epochs) — one with ``--cost latency --target-ms``, one with
``--target-macs``; each picks, on validation, the most accurate trial within ±``tolerance`` of
its own target. Each picked network (the supernet's weights, BatchNorm recalibrated with its trial's
settings, the thresholds its trial tuned) is exported to ONNX and timed through the export's driver
on every test image, one at a time, 1 thread, the picks taking turns pass by pass: measured
milliseconds per image and test accuracy.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from harness.claims import Claim
from harness.common import (Context, Outcome, fmt, load_trials, main, md_table, provenance_note, run_search, stop_ray,
                            trial_config)
from harness.latency import (TABLE_QUICK, TABLE_SETTINGS, inherited_network, per_image_ms, random_archs, setup,
                             table_path, write_onnx_export)
from harness.picks import ahead, validation_pick

from aebnas.training.supernet_file import EMBEDDED_SUPERNET

CLAIM = Claim(21, "latency_objective", "Does the latency objective pay?",
              "the network a search for a target in ms picks (on validation, within ±10% of the target) is closer "
              "to that target in measured ms per image than the pick of a search for the corresponding MACs, and "
              "not less accurate on test (3 seeds; closer by more than one standard error of the paired "
              "differences, less accurate by no more than one)")
SETTINGS = dict(seeds=(0, 1, 2), num_samples=100, target_macs=5.0, tolerance=0.10, fit_archs=300, warmup=10,
                passes=15, images=None, batch_size=64)
QUICK = dict(SETTINGS, seeds=(0, 1), num_samples=6, fit_archs=20, warmup=1, passes=1, images=50, tolerance=0.5)
BACKEND = "onnxruntime"


def ms_for_macs(table, info, target_macs: float, archs: int, seed: int = 0) -> tuple[float, float, float]:
    """The ms at which the line MMACs = a + b · ms, fitted over every exit of ``archs`` random networks of
    the space, reaches ``target_macs``; returns (target_ms, a, b)."""
    from aebnas.cost.macs import exit_costs

    ms, macs = [], []
    for arch in random_archs(info, archs, seed):
        ms.extend(table.exit_costs(arch).cumulative())
        macs.extend(exit_costs(arch).cumulative())
    b, a = np.polyfit(ms, macs, 1)
    return float((target_macs - a) / b), float(a), float(b)


def rebuild_pick(supernet, info, data, table, trial, images: int | None, out: Path):
    """The picked trial's network rebuilt (inherited weights, BatchNorm recalibrated with the trial's
    settings, the trial's thresholds), exported to ONNX into ``out``: (driver, figures on test)."""
    from aebnas.exit_policy import simulate
    from aebnas.onnx_runner import OnnxEarlyExitNet
    arch, settings = trial_config(trial)
    thresholds = [float(t) for t in trial["thresholds"]]
    net, outputs = inherited_network(supernet, info, data, arch, settings)
    net.eval().set_thresholds(thresholds)
    x, y = (data.x_test, data.y_test) if images is None else (data.x_test[:images], data.y_test[:images])
    out.mkdir(parents=True)
    write_onnx_export(net, thresholds, data, out)
    runner = OnnxEarlyExitNet(out, threads=1)
    logits, exits, _ = runner(x)
    return runner, {"resolution": arch.resolution, "exits": ",".join(map(str, arch.exit_positions)) or "-",
                    "table ms (test)": simulate(outputs["test"], thresholds, table.exit_costs(arch)).avg_cost,
                    "test acc (ONNX) %": 100 * float(np.mean(logits.argmax(1) == y)),
                    "early %": 100 * float(np.mean(exits < arch.num_exits))}


def interleaved_ms(runners: Sequence[Any], images: np.ndarray, warmup: int, passes: int) -> list[float]:
    """Milliseconds per image of each runner (batch 1): the median of ``passes`` passes over the images,
    the runners taking turns pass by pass, so a change of machine load reaches all of them alike."""
    for run in runners:
        for i in range(min(warmup, len(images))):
            run(images[i:i + 1])
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(passes):
        for k, run in enumerate(runners):
            times[k].append(per_image_ms(run, images, 0, 1))
    return [statistics.median(t) for t in times]


def measure(ctx: Context, seeds: Sequence[int], num_samples: int, target_macs: float, tolerance: float,
            fit_archs: int, warmup: int, passes: int, images: int | None, batch_size: int) -> Outcome:
    torch.set_num_threads(1)
    t = TABLE_QUICK if ctx.quick else TABLE_SETTINGS
    supernet, info, data, tables = setup(ctx, t["warmup"], t["repeats"], t["calibration_networks"])
    table = tables[BACKEND]
    target_ms, a, b = ms_for_macs(table, info, target_macs, fit_archs)
    print(f"  target {target_ms:.3f} ms ↔ {target_macs} MMACs (MMACs = {a:.2f} + {b:.2f} · ms)", flush=True)
    budget = dict(dataset=info.dataset, space_kwargs={"resolutions": tuple(info.space.resolutions)},
                  width_mult=info.width_mult, target_macs=target_macs, epochs=0, num_samples=num_samples,
                  scheduler="fifo", batch_size=batch_size, supernet=str(EMBEDDED_SUPERNET), split_seed=0)
    arms = {"ms": dict(cost="latency", latency_table=str(table_path(ctx)), target_ms=target_ms,
                       latency_backend=BACKEND),
            "MACs": {}}
    runs, rows, picks = {}, [], {}
    for seed in seeds:
        for arm, extra in arms.items():
            runs[arm, seed] = run_search(ctx, f"{arm.lower()}_seed{seed}", seed=seed, **budget, **extra)
            trials = load_trials(runs[arm, seed].path)
            picks[arm, seed] = (validation_pick(trials, target_ms, tolerance, "avg_ms") if arm == "ms"
                                else validation_pick(trials, target_macs, tolerance))
            rows.append({"seed": seed, "search": arm, "trials": len(trials)})
    stop_ray()  # the timing below runs alone
    x_test = data.x_test if images is None else data.x_test[:images]
    with tempfile.TemporaryDirectory() as tmp:
        runners, timed_rows = [], []
        for row in rows:
            chosen = picks[row["search"], row["seed"]]
            if chosen is None:
                continue
            runner, figures = rebuild_pick(supernet, info, data, table, chosen, images,
                                           Path(tmp) / f"{row['search']}_{row['seed']}")
            row.update({"val acc %": float(chosen["accuracy"]), "test acc %": float(chosen["test_accuracy"]),
                        "avg MMACs (test)": float(chosen["test_avg_macs"]), **figures})
            runners.append(runner)
            timed_rows.append(row)
        for row, ms in zip(timed_rows, interleaved_ms(runners, x_test, warmup, passes)):
            row.update({"measured ms": ms, "ms / target": ms / target_ms})
    for row in rows:
        print(f"  seed {row['seed']} {row['search']}: " + ", ".join(
            f"{k} {fmt(v, 3) if isinstance(v, float) else v}" for k, v in row.items()), flush=True)
    return verdict(rows, runs, seeds, target_ms, target_macs, tolerance, num_samples, passes, (a, b), table)


def verdict(rows, runs, seeds, target_ms, target_macs, tolerance, num_samples, passes, fit, table) -> Outcome:
    import pandas as pd

    frame = pd.DataFrame(rows)
    missing = frame[frame["measured ms"].isna()] if "measured ms" in frame else frame
    if len(missing):
        measured = "could not tell: no trial in the window for " + ", ".join(
            f"{r.search} seed {r.seed}" for r in missing.itertuples())
        return Outcome(measured, measured, {"rows": rows, "target_ms": target_ms}, md_table(rows, 2))
    frame["latency error %"] = 100 * (frame["measured ms"] / target_ms - 1).abs()
    by = {col: frame.pivot(index="seed", columns="search", values=col)
          for col in ("latency error %", "test acc (ONNX) %", "measured ms")}
    closer, closer_sem, is_closer = ahead(by["latency error %"]["MACs"], by["latency error %"]["ms"])
    acc, acc_sem, _ = ahead(by["test acc (ONNX) %"]["ms"], by["test acc (ONNX) %"]["MACs"])
    holds = bool(is_closer and acc > -acc_sem)
    measured = (f"target {target_ms:.2f} ms (↔ {target_macs} MMACs): measured ms per image of the picks, ms search "
                f"{statistics.mean(by['measured ms']['ms']):.2f} vs MAC search "
                f"{statistics.mean(by['measured ms']['MACs']):.2f} (error vs target "
                f"{statistics.mean(by['latency error %']['ms']):.0f}% vs "
                f"{statistics.mean(by['latency error %']['MACs']):.0f}%); test accuracy "
                f"{statistics.mean(by['test acc (ONNX) %']['ms']):.1f}% vs "
                f"{statistics.mean(by['test acc (ONNX) %']['MACs']):.1f}% ({len(seeds)} seeds)")
    details = "\n".join([
        f"Latency table: {table.describe()}. Target: {target_ms:.3f} ms, where the line MMACs = "
        f"{fit[0]:.2f} + {fit[1]:.2f} · ms (fitted over every exit of random networks of the space) reaches "
        f"{target_macs} MMACs. Per seed, two random searches of {num_samples} candidates with the same seed (the "
        "same candidates, inherited from the shipped supernet, 0 fine-tuning epochs): `--cost latency "
        f"--target-ms {target_ms:.3f}` and `--target-macs {target_macs}`. Each search's pick: the best validation "
        f"accuracy within ±{tolerance:.0%} of its own target (`avg_ms` or `avg_macs` on validation). The pick is "
        "rebuilt (inherited weights, BatchNorm recalibrated with its trial's settings, the thresholds its trial tuned), "
        "exported to ONNX and timed through the export's driver (`aebnas_onnx.py`, 1 thread), every test image "
        f"alone: the median of {passes} passes over the test images, the picks taking turns pass by pass (a "
        "change of machine load reaches all alike); `table ms (test)` is what the table predicts for those "
        "thresholds on test.", "",
        md_table(rows, 2), "",
        f"Paired differences (MAC search − ms search) of the latency error: {closer:+.1f} ± {fmt(closer_sem, 1)} "
        f"points (s.e.); test accuracy (ms search − MAC search): {acc:+.1f} ± {fmt(acc_sem, 1)} points.", "",
        provenance_note(list(runs.values()))])
    figures = {"rows": rows, "target_ms": target_ms, "fit": list(fit), "closer": closer, "closer_sem": closer_sem,
               "acc_diff": acc, "acc_sem": acc_sem}
    return Outcome(measured, holds, figures, details)


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK, reusable=True))
