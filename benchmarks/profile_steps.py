"""Where the time goes: ``torch.profiler`` of a sandwich step, a fine-tuning step and an inherited
candidate's scoring, on this machine's device (CUDA when present, else the CPU).

For each of the three, the wall time of its phases (perf_counter, CUDA synchronised) and the
operators that take the most self time (``torch.profiler``, CPU and, on CUDA, kernel time). Data:
the embedded CIFAR-10 subset and the shipped supernet (width 0.75, 32-40 px), as the quickstart.
Inherited candidates are also timed phase by phase as ``trainable.train_candidate`` runs them, and
in a real Ray Tune search of the same size (what Ray adds per trial; skipped, with a line saying
so, where Ray cannot be imported, as on a lent GPU machine).
Writes ``<device>.md`` in ``--out`` (default results/benchmarks/profile/), again after each section,
so a run stopped by a time limit keeps the sections it finished; docs/speed.md quotes it.

    python benchmarks/profile_steps.py [--steps N] [--candidates N] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from harness.common import SCRATCH, machine, md_table, tune_config
from harness.rows import GrowingPage


class Phases:
    """Wall seconds of named phases (the device synchronised at each end)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with record_function(name):
            yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def profiled(device: torch.device):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def op_table(prof, device: torch.device, rows: int = 12) -> str:
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"  # one name in torch 2.11-2.14
    return "```\n" + prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48) + "\n```"


def inherited_trial_phases(dev: torch.device, amp: bool, candidates: int) -> list[str]:
    """The phases of ``trainable.train_candidate`` for inherited candidates, timed outside Ray."""
    import tempfile

    from aebnas.config import random_arch
    from aebnas.cost.macs import exit_costs
    from aebnas.data.datasets import load_dataset
    from aebnas.exit_policy import oracle, save_exit_outputs, simulate, tune_thresholds
    from aebnas.settings import TrialSettings
    from aebnas.training.supernet_file import EMBEDDED_SUPERNET, SupernetInfo, built_supernet, supernet_from_state
    from aebnas.nn import extract
    from aebnas.training.loop import CandidateTraining, load_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    phases = Phases(dev)
    with phases("read the supernet file (once per search: Ray's object store hands it to trials)"):
        record = load_checkpoint(EMBEDDED_SUPERNET)
    info = SupernetInfo.from_record(dict(record), "the supernet")
    data = load_dataset(info.dataset, val_size=info.val_size, seed=info.split_seed)
    rng = random.Random(0)
    first = {}
    for i in range(candidates + 1):  # the first candidate builds the supernet; reported apart
        arch = random_arch(info.space, rng, width_mult=info.width_mult, num_classes=info.num_classes,
                           in_channels=info.in_channels)
        settings = TrialSettings(epochs=0, batch_size=64, supernet="x", amp=amp)
        p = phases if i else Phases(dev)
        with p("exit costs (ptflops)"):
            costs = exit_costs(arch)
        with p("the supernet module (built by the first trial of a process, then found by its digest)"):
            supernet = built_supernet(record)
        with p("extract the candidate's weights"):
            model = extract(supernet, arch, settings.confidence)
        with p("set up loaders (calibration sample, val/test batches)"):
            cand = CandidateTraining(arch, settings, data, dev, model=model)
        with p("recalibrate BatchNorm, every exit on val and test"):
            outputs = cand.evaluate()
        with p("tune thresholds, simulate test, oracle"):
            tuned = tune_thresholds(outputs["val"], costs, settings.target_macs, settings.threshold_grid,
                                    settings.score_lambda)
            simulate(outputs["test"], tuned.thresholds, costs)
            oracle(outputs["val"], costs)
        with p("write exit outputs and the checkpoint"), tempfile.TemporaryDirectory() as tmp:
            save_exit_outputs(Path(tmp) / "exit_outputs.npz", outputs, costs)
            torch.save({**cand.state_dict(), "thresholds": tuned.thresholds}, Path(tmp) / "checkpoint.pt")
        if not i:
            first = p.seconds
    with profiled(dev) as prof:  # the last candidate's scoring, by operator
        cand.evaluate()
    # before the per-process cache, every trial built the supernet module from the record (warm process)
    start = time.perf_counter()
    for _ in range(3):
        supernet_from_state(record["model"], info)
    rebuild = (time.perf_counter() - start) / 3
    torch.set_num_threads(threads)
    per = {k: v / (candidates if "file" not in k else 1) for k, v in phases.seconds.items()}
    total = sum(v for k, v in per.items() if "file" not in k)
    cached = next(v for k, v in per.items() if k.startswith("the supernet module"))
    before = total - cached + rebuild
    rows = [{"phase": k, "seconds per candidate": v, "share (%)": 100 * v / total if "file" not in k else None,
             "first trial of a process (s)": first.get(k)} for k, v in per.items()]
    return [f"## An inherited candidate as a trial scores it (1 thread, {candidates} candidates after a first one; "
            f"{len(data.y_val):,} val + {len(data.y_test):,} test images, Ray excluded)", "",
            md_table(rows), "", f"In all {total:.2f} s per candidate, {60 / total:.1f} per minute on one core "
            f"({3600 / total:.0f} per CPU-hour). Before the supernet was kept per process, each trial built it "
            f"again ({rebuild:.3f} s, measured in this run): {before:.2f} s per candidate, {3600 / before:.0f} per "
            f"CPU-hour; ×{before / total:.2f} now.", "",
            "The recalibration and evaluation of one candidate, profiled:", "",
            op_table(prof, dev), ""]


def ray_search(candidates: int) -> list[str]:
    """Wall time of a real search of ``candidates`` inherited trials (quickstart settings), on local Ray."""
    import tempfile

    import ray

    from aebnas.search.tuner import run

    cpus = max(1, (os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            exp = dataclasses.replace(tune_config("quickstart", "QUICKSTART"), num_samples=candidates,
                                      storage_path=tmp, name="profile", seed=0, verbose=0)
            start = time.perf_counter()
            results = run(exp)
            wall = time.perf_counter() - start
        finally:
            ray.shutdown()
    times = [r.metrics["time_total_s"] for r in results if r.metrics]
    evals = [r.metrics["eval_seconds"] for r in results if r.metrics]
    return [f"## The same kind of candidates in a Ray Tune search ({candidates} trials, quickstart settings, "
            f"{cpus} CPUs: {cpus} trials at once)", "",
            md_table([{"figure": "wall seconds of the search (Ray already started: Tuner built, trials, results read)",
                       "seconds": wall},
                      {"figure": "per trial: Ray's time_total_s (mean)", "seconds": float(np.mean(times))},
                      {"figure": "per trial: of which BatchNorm recalibration and evaluation (mean)",
                       "seconds": float(np.mean(evals))},
                      {"figure": "wall seconds per candidate (search wall / trials)", "seconds": wall / candidates}]),
            "", f"{3600 * candidates / (wall * cpus):.0f} candidates per CPU-hour in the search, "
            "the search's set-up included (Ray's start-up not).", ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="training steps profiled (after one warm-up step)")
    parser.add_argument("--candidates", type=int, default=8, help="inherited candidates timed (and searched on Ray)")
    parser.add_argument("--out", type=Path, default=SCRATCH / "profile",
                        help="folder of the page, <device>.md (default: results/benchmarks/profile/)")
    args = parser.parse_args()

    from aebnas.config import random_arch
    from aebnas.data.datasets import load_dataset
    from aebnas.nn import extract
    from aebnas.settings import TrialSettings
    from aebnas.training.supernet import SupernetTraining
    from aebnas.training.supernet_file import EMBEDDED_SUPERNET, SupernetSettings, load_supernet

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = dev.type == "cuda"
    page = GrowingPage(args.out / f"{dev.type}.md",
                       [f"# Profile on {machine()['gpu'] or f'CPU ({torch.get_num_threads()} threads)'}", "",
                        f"torch {torch.__version__}; `{' '.join(['python', *sys.argv])}`. Sections are added as "
                        "they are measured: one missing at the end was not reached.", ""])
    print(f"writing {page.path} as it goes", flush=True)

    # 1. sandwich steps of the shipped supernet's space
    supernet, info = load_supernet(EMBEDDED_SUPERNET, dev)
    data = load_dataset(info.dataset, val_size=info.val_size, seed=info.split_seed)
    batch = 128
    n = batch * (args.steps + 1)  # a speed measurement: which images does not matter
    sub = dataclasses.replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n])
    run = SupernetTraining(info.space, info.width_mult, sub, SupernetSettings(epochs=4, batch_size=batch,
                                                                              warmup_fraction=0.0, amp=amp), dev)
    run.train_epoch()  # warm-up epoch: one step more than profiled
    with profiled(dev) as prof:
        start = time.perf_counter()
        stats = run.train_epoch()
        sandwich_s = time.perf_counter() - start
    page.add([f"## Sandwich steps (batch {batch}, {args.steps + 1} steps, width {info.width_mult:g})", "",
              f"{stats['images_per_s']:.0f} images/s ({sandwich_s:.2f} s for the epoch).", "",
              op_table(prof, dev), ""])

    # 2. fine-tuning steps of an inherited candidate (its loop, on the same images as the sandwich steps)
    from aebnas.training.loop import CandidateTraining

    arch = random_arch(info.space, random.Random(0), width_mult=info.width_mult, num_classes=info.num_classes,
                       in_channels=info.in_channels)
    tune = CandidateTraining(arch, TrialSettings(epochs=2, batch_size=batch, supernet="x", amp=amp), sub, dev,
                             model=extract(supernet, arch))
    tune.train_epoch()  # warm-up
    with profiled(dev) as prof:
        ft = tune.train_epoch()
    page.add([f"## Fine-tuning steps of an inherited candidate (batch {batch}, {args.steps + 1} steps)", "",
              f"{ft['images_per_s']:.0f} images/s.", "", op_table(prof, dev), ""])

    # 3. an inherited candidate as a trial scores it (one thread, as a trial holding one CPU), phase by phase
    page.add(inherited_trial_phases(dev, amp, args.candidates))
    # 4. the same candidates in a real Ray Tune search (quickstart settings): what Ray adds per trial
    if importlib.util.find_spec("ray") is None:
        page.add(["## The same kind of candidates in a Ray Tune search", "",
                  "Skipped: Ray cannot be imported here (a GPU machine lent without it).", ""])
    else:
        page.add(ray_search(args.candidates))
    print(page.text)
    print(f"wrote {page.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
