"""Claim 18: MO-ASHA against ASHA on ``score`` — hypervolume per CPU-second on the same candidates.

Random search with the same seed proposes the same candidates to both schedulers; every candidate
inherits its weights from the shipped supernet and fine-tunes up to ``epochs`` epochs (rungs at
1, 2, 4, … epochs, reduction factor 2). ASHA ranks on ``score`` (accuracy − λ·MAEP at the target);
MO-ASHA on the Pareto rank of (accuracy, avg MACs). Per search: the validation hypervolume of every
trial's last report, the CPU-seconds the trials used (the sum of their ``time_total_s``, one CPU
each), and the hypervolume per CPU-hour. CPU-seconds move with the machine's load, so a control counts
the work instead: the MMAC-epochs trained (each trial's epochs times its backbone's MACs), a figure no load changes.
"""

from __future__ import annotations

import sys
from typing import Sequence

import pandas as pd

from harness.claims import Claim
from harness.common import (Context, Outcome, fmt, load_trials, main, md_table, provenance_note, run_search,
                            search_figures, stop_ray)
from harness.picks import ahead, reference_macs

from aebnas.training.supernet_file import EMBEDDED_SUPERNET

CLAIM = Claim(18, "moasha_vs_asha", "MO-ASHA vs ASHA on score",
              "MO-ASHA's validation hypervolume per CPU-hour above ASHA's by more than one standard error of the "
              "paired differences (3 seeds, the same candidates)")
SETTINGS = dict(seeds=(0, 1, 2), num_samples=32, epochs=4, target_macs=5.0, width_mult=0.75,
                resolutions=(32, 36, 40), batch_size=64)
QUICK = dict(SETTINGS, seeds=(0, 1), num_samples=4, epochs=2, width_mult=0.75)


def measure(ctx: Context, seeds: Sequence[int], num_samples: int, epochs: int, target_macs: float,
            width_mult: float, resolutions: Sequence[int], batch_size: int) -> Outcome:
    from analysis.pareto import hypervolume

    budget = dict(dataset="cifar10-subset", space_kwargs={"resolutions": tuple(resolutions)}, width_mult=width_mult,
                  target_macs=target_macs, epochs=epochs, num_samples=num_samples, batch_size=batch_size,
                  supernet=str(EMBEDDED_SUPERNET), split_seed=0, grace_period=1, reduction_factor=2)
    ref = (0.0, reference_macs(width_mult, resolutions))
    runs, rows = {}, []
    for seed in seeds:
        for scheduler in ("asha", "moasha"):
            runs[scheduler, seed] = run_search(ctx, f"{scheduler}_seed{seed}", scheduler=scheduler, seed=seed, **budget)
            trials = load_trials(runs[scheduler, seed].path)
            cpu_s = float(trials["time_total_s"].sum())
            work = float((trials["epochs_run"] * trials["static_macs"]).sum())
            hv = hypervolume(trials["accuracy"], trials["avg_macs"], ref)
            rows.append({"scheduler": scheduler, "seed": seed, "trials": len(trials),
                         "epochs trained": int(trials["epochs_run"].sum()), "MMAC-epochs": work, "cpu_s": cpu_s,
                         "CPU-s per MMAC-epoch": cpu_s / work, "hv_val": hv, "hv_per_cpu_hour": hv / (cpu_s / 3600),
                         "hv per 100 MMAC-epochs": 100 * hv / work})
            print(f"  {scheduler} seed {seed}: hypervolume {hv:.1f} in {cpu_s:.0f} CPU-s", flush=True)
    stop_ray()
    per_seed = pd.DataFrame(rows)
    by_seed = per_seed.pivot(index="seed", columns="scheduler")
    by = by_seed["hv_per_cpu_hour"]
    diff, sem, is_ahead = ahead(by["moasha"], by["asha"])
    work_diff, work_sem, work_ahead = ahead(by_seed["hv per 100 MMAC-epochs"]["moasha"],
                                            by_seed["hv per 100 MMAC-epochs"]["asha"])
    hv_diff, hv_sem, _ = ahead(by_seed["hv_val"]["moasha"], by_seed["hv_val"]["asha"])
    measured = (f"hypervolume per CPU-hour: MO-ASHA − ASHA {diff:+.0f} ± {fmt(sem, 0)} (s.e., {len(seeds)} seeds); "
                f"means {by['moasha'].mean():.0f} vs {by['asha'].mean():.0f}; control, per 100 MMAC-epochs "
                f"trained: {work_diff:+.1f} ± {fmt(work_sem, 1)}")
    details = "\n".join([
        f"{num_samples} candidates per search (random search, the same per seed for both schedulers), inherited "
        f"from the shipped supernet and fine-tuned up to {epochs} epochs; rungs at 1, 2, 4 … epochs, reduction 2. "
        f"Hypervolume of every trial's last validation report, reference (0 %, {ref[1]:.1f} MMACs); CPU-seconds: "
        "the trials' summed `time_total_s` (one CPU each).", "",
        md_table(per_seed.to_dict("records"), 1), "",
        f"Hypervolume alone (no cost): MO-ASHA − ASHA {hv_diff:+.1f} ± {fmt(hv_sem, 1)}. Control: CPU-seconds "
        "depend on the machine's load as well as on the work, so the work is also counted without a clock, in "
        "MMAC-epochs (each trial's epochs × its backbone's MMACs, `static_macs`; the exit branches add at most a "
        "few percent): hypervolume per "
        f"100 MMAC-epochs, MO-ASHA − ASHA {work_diff:+.1f} ± {fmt(work_sem, 1)} "
        f"({'ahead' if work_ahead else 'not ahead'} by more than one standard error). The CPU-seconds per "
        "MMAC-epoch vary from search to search (a trial also pays a fixed cost to build, score and report, and "
        "the machine is shared), so a per-CPU-hour ratio from one pair of searches carries that noise.", "",
        provenance_note(list(runs.values()))])
    figures = {"per_seed": rows, "diff": diff, "sem": sem, "per_mmac_epoch_diff": work_diff,
               "per_mmac_epoch_sem": work_sem, "hv_diff": hv_diff, "hv_sem": hv_sem,
               "searches": search_figures(runs.values())}
    return Outcome(measured, bool(is_ahead), figures, details)


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK, reusable=True))
