"""Claim 7: search throughput with 1 and 2 concurrent trials (one CPU each) on this machine."""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import numpy as np

from harness.claims import Claim
from harness.common import Context, Outcome, load_trials, main, md_table, priority_note, run_search, stop_ray

CLAIM = Claim(7, "search_throughput", "Search throughput scaling",
              "trials per hour with 1 and 2 concurrent trials (one CPU each); what to expect on a cluster")
SEARCH = dict(dataset="cifar10-subset", space="aebnas", space_kwargs={"resolutions": (32,)}, width_mult=0.5,
              target_macs=2.5, epochs=1, num_samples=4, batch_size=64, seed=0)
SETTINGS = dict(search=SEARCH, concurrency=(1, 2))
QUICK = dict(search=dict(SEARCH, width_mult=0.25, num_samples=2, target_macs=1.0), concurrency=(1, 2))


def measure_search_throughput(ctx: Context, search: dict[str, Any], concurrency: Sequence[int]) -> Outcome:
    """Claim 7: the same search with at most 1, then 2, trials at once (one CPU each): trials per hour."""
    rows, runs = [], []
    for c in concurrency:
        load = os.getloadavg()[0]
        runs.append(run_search(ctx, f"concurrent{c}", max_concurrent=c, cpus_per_trial=1, scheduler="fifo", **search))
        path, wall = runs[-1].path, runs[-1].wall_s
        t = load_trials(path)
        busy = float(t["time_total_s"].sum())
        rows.append({"concurrent trials": c, "trials": len(t), "wall (s)": wall,
                     "trials / hour": 3600.0 * len(t) / wall, "Σ trial time (s)": busy,
                     "mean trial time (s)": busy / len(t),
                     "outside trials per trial (s)": (wall * c - busy) / len(t), "load at start (1 min)": load})
        print(f"  {c} concurrent: {rows[-1]['trials / hour']:.0f} trials/h", flush=True)
    stop_ray()
    checkpoint_mb = float(np.mean([sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                                   for d in path.glob("trial_*/checkpoint_*")])) / 1e6
    by_c = {r["concurrent trials"]: r for r in rows}
    lo, hi = min(by_c), max(by_c)
    scaling = by_c[hi]["trials / hour"] / by_c[lo]["trials / hour"]
    measured = (f"{by_c[lo]['trials / hour']:.0f} → {by_c[hi]['trials / hour']:.0f} trials/h "
                f"(×{scaling:.2f} with {hi} concurrent trials vs {lo})")
    details = "\n".join([
        f"The same search ({', '.join(f'{k}={v}' for k, v in search.items())}; FIFO, one CPU and one torch "
        f"thread per trial), run with at most {lo} and then {hi} trials at once on this {os.cpu_count()}-core "
        "machine. Wall time of `aebnas.search.experiment.run` with Ray already started (dataset loading, trial start-up, "
        "training, evaluation, checkpoints). 'Outside trials per trial' = (wall × concurrency − Σ trial time) / "
        "trials: Ray's scheduling, actor start-up and the driver's bookkeeping per trial. " + priority_note(runs), "",
        md_table(rows, 1), "",
        f"Scaling from {lo} to {hi} concurrent trials: **×{scaling:.2f}** (ideal ×{hi / lo:.0f})."
        + (" The concurrent trials share this machine's cores with the other jobs running on it (see the load "
           "column), so each gets less than a core." if scaling < 0.9 * hi / lo else ""),
        "", "**What to expect on a cluster.** Trials are independent: the search runs as many at once as "
        "there are trial slots (`cpus_per_trial` / `gpus_per_trial` over all nodes), so trials per hour grow "
        "with the slots as long as each trial has its cores to itself and the search has enough trials to fill "
        "them (with ASHA, the last rungs hold few trials and leave slots idle). Per trial add the start-up and "
        "bookkeeping measured above, plus the upload of checkpoints and `exit_outputs.npz` to the shared "
        f"`storage_path` (here {checkpoint_mb:.1f} MB per trial and epoch: weights and optimizer state). The dataset "
        "travels once per node through the object store. "
        "One trial of this size does not profit from more than a few threads; a GPU (not available here, so "
        "not measured) would make each trial's epoch much shorter and the per-trial overhead relatively larger.",
    ])
    return Outcome(measured=measured, holds=None,
                   figures={"rows": rows, "scaling": scaling, "checkpoint_mb": checkpoint_mb}, details=details)


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure_search_throughput, SETTINGS, QUICK))
