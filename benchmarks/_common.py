"""Benchmark-only glue: the machine, the result files, and each claim's measurement.

A script under ``benchmarks/`` states one claim's settings and calls :func:`main` with
the ``measure_*`` function of its claim. ``main`` records the machine, the date and the
load average before and after, runs the measurement, writes the claim's small result
file ``docs/benchmarks/<claim>.json`` (figures + the markdown of its section) and
rebuilds ``docs/benchmarks.md`` (:mod:`report`). ``--quick`` runs the script's tiny
settings and writes under the git-ignored ``results/benchmarks/quick/`` instead, so the
docs only ever show real runs. Experiments, trial directories and other bulky outputs
go to ``results/benchmarks/`` (git-ignored).

Everything measured here is a ratio (or a difference) between two things timed in the
same run, interleaved where they are cheap enough to repeat: the machine is shared and
its load changes by the minute. Reusable logic lives in ``aebnas`` and ``analysis``;
what is here only exists to check a claim (e.g. an independent MAC count, a plain-Python
threshold search to compare against).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS_DIR = REPO / "docs" / "benchmarks"   # one JSON per claim + figures (committed)
SCRATCH = REPO / "results" / "benchmarks"  # experiments and bulky outputs (git-ignored)
ENV_SETTINGS = ("RAY_worker_niceness", "OMP_NUM_THREADS")  # recorded in a result's command when set


# ======================================================================== recording
@dataclass(frozen=True)
class Claim:
    """One claim of docs/benchmarks.md: its place in the table and what would make it hold."""

    number: int
    key: str    # file name of its result, e.g. "search_spaces"
    title: str
    goal: str


@dataclass
class Outcome:
    """What a measurement returns: the table cells, the numbers and the section's markdown."""

    measured: str            # one line for the claims table
    holds: bool | str | None  # None: no pass/fail goal (a figure to know); str: why it cannot be told
    figures: dict[str, Any]  # the numbers behind the text (JSON)
    details: str             # markdown of the section body


@dataclass
class Context:
    """Where a measurement writes: ``scratch`` (bulky, git-ignored) and ``docs`` (figures)."""

    claim: Claim
    scratch: Path
    docs: Path
    quick: bool
    reuse: bool = False  # searches: analyse what is already in ``scratch``


def machine() -> dict[str, Any]:
    """Platform, CPU model (/proc/cpuinfo), cores, Python / torch / ray versions, GPU (or None)."""
    import ray

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__, "gpu": gpu}


def main(claim: Claim, measure: Callable[..., Outcome], settings: dict[str, Any],
         quick: dict[str, Any]) -> int:
    """Command line of a benchmark script: run ``measure`` with ``settings`` (``--quick``: ``quick``)."""
    parser = argparse.ArgumentParser(description=f"Benchmark {claim.number}: {claim.title}. Goal: {claim.goal}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings to check the script works; writes under results/benchmarks/quick/ only")
    parser.add_argument("--reuse", action="store_true",
                        help="searches: analyse the experiments already in results/benchmarks/ instead of running them")
    args = parser.parse_args()
    chosen = quick if args.quick else settings
    root = SCRATCH / "quick" if args.quick else SCRATCH
    ctx = Context(claim=claim, scratch=root / claim.key, docs=root / "docs" if args.quick else DOCS_DIR,
                  quick=args.quick, reuse=args.reuse)
    ctx.scratch.mkdir(parents=True, exist_ok=True)
    ctx.docs.mkdir(parents=True, exist_ok=True)
    load_start, started, t0 = os.getloadavg(), dt.datetime.now().astimezone(), time.perf_counter()
    print(f"benchmark {claim.number} ({claim.key}): load average {load_start[0]:.2f} on {os.cpu_count()} cores",
          flush=True)
    outcome = measure(ctx, **chosen)
    record = {
        "number": claim.number, "key": claim.key, "title": claim.title, "goal": claim.goal,
        "measured": outcome.measured, "holds": outcome.holds,
        "command": " ".join([f"{k}={os.environ[k]}" for k in ENV_SETTINGS if k in os.environ]
                            + ["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "date": started.isoformat(timespec="seconds"), "wall_s": round(time.perf_counter() - t0, 1),
        "machine": machine(), "load_start": [round(v, 2) for v in load_start],
        "load_end": [round(v, 2) for v in os.getloadavg()], "settings": _plain(chosen),
        "figures": _plain(outcome.figures), "details": outcome.details,
    }
    path = ctx.docs / f"{claim.key}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    from report import build_report  # benchmarks/ is on sys.path when a script runs

    out = build_report(ctx.docs, ctx.docs.parent / "benchmarks.md" if not args.quick else ctx.docs / "benchmarks.md")
    print(f"{claim.title}: {outcome.measured} → holds: {outcome.holds}"
          f"\nwrote {path.relative_to(REPO)} and {out.relative_to(REPO)}", flush=True)
    return 0


def _plain(value: Any) -> Any:
    """JSON-able copy (numpy scalars, tuples, paths)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return os.path.relpath(value, REPO)
    return value


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def md_table(rows: Sequence[dict[str, Any]], digits: int = 2) -> str:
    """Markdown table of dict rows (keys are the headers; floats with ``digits`` decimals)."""
    if not rows:
        return "(no rows)"
    heads = list(rows[0])
    cell = lambda v: fmt(v, digits) if isinstance(v, float) or v is None else str(v)  # noqa: E731
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(cell(r[h]) for h in heads) + " |" for r in rows]
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ======================================================================== searches
def start_ray() -> None:
    """Local Ray on every core of the machine, quiet (no dashboard, no worker logs on the driver)."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run_search(ctx: Context, name: str, **settings: Any) -> tuple[Path, float]:
    """One search with ``aebnas.experiment.run`` into ``ctx.scratch/name`` (replaced if there);
    returns (experiment directory, wall seconds of the search itself, Ray already started)."""
    from aebnas.experiment import Experiment, experiment_path, run

    exp = Experiment(storage_path=str(ctx.scratch), name=name, verbose=0, **settings)
    path = Path(experiment_path(exp))
    if ctx.reuse and path.is_dir():
        return path, float("nan")
    shutil.rmtree(path, ignore_errors=True)
    start_ray()
    t0 = time.perf_counter()
    results = run(exp)
    wall = time.perf_counter() - t0
    if results.num_errors:
        raise RuntimeError(f"{results.num_errors} trial(s) of {name} errored; see {path}/trial_*/error.txt")
    return path, wall


def priority_note() -> str:
    """How the trials were prioritised (Ray starts workers at niceness 15 unless told otherwise)."""
    nice = os.environ.get("RAY_worker_niceness")
    if nice is None:
        return "Trials ran at Ray's default worker niceness 15."
    return (f"Trials ran at niceness {nice} (`RAY_worker_niceness={nice}`, see the command): at Ray's default 15 "
            "the other jobs on this shared machine took most of the CPU (claim 3).")


def search_window(path: Path) -> tuple[float, float]:
    """(first trial's start, last report) of an experiment, epoch seconds, from its result.json files."""
    starts, ends = [], []
    for f in path.glob("trial_*/result.json"):
        lines = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
        if lines:
            starts.append(lines[0]["timestamp"] - lines[0]["time_this_iter_s"])
            ends.append(lines[-1]["timestamp"])
    return (min(starts), max(ends)) if ends else (float("nan"), float("nan"))


def ahead(ours: pd.Series, theirs: pd.Series) -> tuple[float, float, bool]:
    """Paired (same seed) differences ours − theirs: (mean, standard error, ahead by more than one
    standard error). Seeds where either side is missing are left out; one seed is never enough."""
    d = (ours - theirs).dropna()
    sem = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    mean = float(d.mean()) if len(d) else float("nan")
    return mean, sem, bool(len(d) > 1 and mean > sem)


def load_trials(path: Path) -> pd.DataFrame:
    """One row per trial with results (``analysis.results``)."""
    from analysis.results import load_experiment, trials_with_results

    return trials_with_results(load_experiment(path).trials).copy()


# ---------------------------------------------------------------- 1. search spaces
def reference_macs(width_mult: float, resolutions: Sequence[int]) -> float:
    """MMACs of the costliest network of the paper's space with every exit computed: no trial
    of any of the three spaces averages more, so (0 %, this) bounds every hypervolume."""
    from aebnas.config import SpaceValues, largest_arch
    from aebnas.cost import exit_costs

    arch = largest_arch(SpaceValues(resolutions=tuple(resolutions)), width_mult=width_mult)
    return float(exit_costs(arch).cumulative()[-1])


def _in_window(macs: pd.Series, target: float, tolerance: float) -> pd.Series:
    return (macs - target).abs() <= tolerance * target


def _best_in_window(trials: pd.DataFrame, acc: str, macs: str, target: float, tolerance: float) -> pd.Series | None:
    rows = trials[_in_window(trials[macs], target, tolerance) & trials[acc].notna()]
    return None if rows.empty else rows.sort_values(acc, ascending=False, kind="stable").iloc[0]


def measure_search_spaces(ctx: Context, spaces: Sequence[str], seeds: Sequence[int], target_macs: float,
                          tolerance: float, width_mult: float, resolutions: Sequence[int], epochs: int,
                          num_samples: int, scheduler: str, batch_size: int) -> Outcome:
    """Claim 1: the same search budget on each space, for each seed; hypervolume and best accuracy at target."""
    from analysis import plots
    from analysis.pareto import hypervolume

    budget = dict(dataset="cifar10-subset", space_kwargs={"resolutions": tuple(resolutions)}, width_mult=width_mult,
                  target_macs=target_macs, epochs=epochs, num_samples=num_samples, scheduler=scheduler,
                  batch_size=batch_size)
    frames, walls, windows = [], {}, []
    for seed in seeds:  # seeds outermost: a change of load hits every space alike
        for space in spaces:
            path, _ = run_search(ctx, f"{space}_seed{seed}", space=space, seed=seed, **budget)
            windows.append(search_window(path))
            walls[f"{space}/{seed}"] = windows[-1][1] - windows[-1][0]
            frames.append(load_trials(path).assign(space=space, seed=seed))
    stop_ray()
    trials = pd.concat(frames, ignore_index=True)
    trials.drop(columns=["trial_dir", "exit_outputs", "checkpoint"], errors="ignore").to_csv(
        ctx.scratch / "trials.csv", index=False)
    ref = (0.0, reference_macs(width_mult, resolutions))
    per_run = []
    for (space, seed), g in trials.groupby(["space", "seed"], sort=False):
        pick_test = _best_in_window(g, "test_accuracy", "test_avg_macs", target_macs, tolerance)
        pick_val = _best_in_window(g, "accuracy", "avg_macs", target_macs, tolerance)
        per_run.append({
            "space": space, "seed": seed, "trials": len(g),
            "hv_val": hypervolume(g["accuracy"], g["avg_macs"], ref),
            "hv_test": hypervolume(g["test_accuracy"], g["test_avg_macs"], ref),
            "in_window": int(_in_window(g["test_avg_macs"], target_macs, tolerance).sum()),
            "best_test_acc": None if pick_test is None else float(pick_test["test_accuracy"]),
            "best_test_macs": None if pick_test is None else float(pick_test["test_avg_macs"]),
            "val_pick_test_acc": None if pick_val is None else float(pick_val["test_accuracy"]),
            "val_pick_test_macs": None if pick_val is None else float(pick_val["test_avg_macs"]),
            "best_final_acc": float(g["test_final_accuracy"].max()),
            "search_wall_s": walls[f"{space}/{seed}"],
        })
    runs = pd.DataFrame(per_run)
    summary = runs.groupby("space", sort=False).agg(
        hv_val=("hv_val", "mean"), hv_val_std=("hv_val", "std"), hv_test=("hv_test", "mean"),
        hv_test_std=("hv_test", "std"), best_test_acc=("best_test_acc", "mean"),
        best_test_macs=("best_test_macs", "mean"), seeds_with_hit=("best_test_acc", "count"),
        val_pick_test_acc=("val_pick_test_acc", "mean"), wall_s=("search_wall_s", "sum")).reindex(list(spaces))

    # One figure, every trial of every seed, coloured by space (validation points, as plots labels them).
    plot_points = trials.assign(experiment=trials["space"])
    paths = plots.plot_pareto(plot_points, ctx.docs / "search_spaces_pareto", target_macs=target_macs,
                              color_by="space", title=f"{len(seeds)} seeds × {num_samples} trials per space, "
                              f"thresholds tuned for {target_macs:g} MMACs (CIFAR-10 subset)")
    for p in paths:
        if p.suffix != ".png":
            p.unlink()
    png = [p for p in paths if p.suffix == ".png"][0]

    a = summary.loc[spaces[0]]
    others = summary.drop(index=spaces[0])
    by_seed = runs.pivot(index="seed", columns="space")
    margins = []
    for other in others.index:
        for col, label in (("hv_test", "test hypervolume"), ("best_test_acc", "best test acc in window")):
            mean, sem, win = ahead(by_seed[col][spaces[0]], by_seed[col][other])
            margins.append({"vs": other, "figure": label, "mean difference": mean, "standard error": sem,
                            "ahead by > 1 s.e.": "yes" if win else "no"})
    holds = all(m["ahead by > 1 s.e."] == "yes" for m in margins)
    ratios = {s: a["hv_test"] / summary.loc[s, "hv_test"] for s in others.index}
    measured = (f"test HV {spaces[0]} {a['hv_test']:.0f} vs " +
                ", ".join(f"{s} {summary.loc[s, 'hv_test']:.0f}" for s in others.index) + " %·MMACs (" +
                ", ".join(f"×{r:.2f} vs {s}" for s, r in ratios.items()) + "); best test acc at target " +
                ", ".join(f"{s} {fmt(summary.loc[s, 'best_test_acc'], 1)}%" for s in spaces) +
                f" (mean of {len(seeds)} seeds)")
    summary_rows = [{"space": s, "hypervolume val (%·MMACs)": f"{r.hv_val:.1f} ± {r.hv_val_std:.1f}",
                     "hypervolume test": f"{r.hv_test:.1f} ± {r.hv_test_std:.1f}",
                     f"best test acc, test MACs ±{tolerance:.0%} of target (%)": r.best_test_acc,
                     "its test MACs": r.best_test_macs, "seeds with a trial in the window": int(r.seeds_with_hit),
                     "test acc of the val-best in the window (%)": r.val_pick_test_acc,
                     "search time, all seeds (s)": r.wall_s}
                    for s, r in summary.iterrows()]
    run_rows = [{"space": r.space, "seed": r.seed, "HV val": r.hv_val, "HV test": r.hv_test,
                 "trials in window": r.in_window, "best test acc in window (%)": r.best_test_acc,
                 "its test MACs": r.best_test_macs, "best final-exit test acc (%)": r.best_final_acc,
                 "search time (s)": r.search_wall_s} for r in runs.itertuples()]
    details = "\n".join([
        f"Budget, identical for every space and seed: {num_samples} trials (random search) × {epochs} epochs, "
        f"scheduler `{scheduler}`, width {width_mult}, resolutions {tuple(resolutions)}, batch {batch_size}, "
        f"target {target_macs:g} MMACs, seeds {tuple(seeds)} (the seed fixes the sampled candidates and the "
        "training order). Data: the embedded CIFAR-10 subset (3,305 train / 500 val / 761 test images), "
        "trained from scratch for a few epochs, so accuracies are low and differences of a few points are "
        "within seed noise: this is a smoke-scale replication, not the paper's setting (full CIFAR-10, "
        "Once-for-All weights, 5 epochs of fine-tuning, NSGA-II). " + priority_note(), "",
        f"Hypervolume of (accuracy ↑, average MACs ↓) against one reference point for all: "
        f"(0 %, {ref[1]:.3f} MMACs), the costliest network of the space with every exit computed. "
        "Validation points use the thresholds each trial tuned on validation; test points use the same thresholds.",
        f"'Best test acc' is the highest test accuracy among trials whose test average MACs is within ±{tolerance:.0%} "
        "of the target (selected on test, as asked); the next column picks by validation accuracy instead "
        "(val MACs in the window) and reports that trial's test accuracy — the unbiased number.", "",
        md_table(summary_rows, 2), "",
        *([f"(`--reuse`: this run re-analysed searches that ran from "
           f"{dt.datetime.fromtimestamp(min(w[0] for w in windows)).astimezone().isoformat(timespec='seconds')} to "
           f"{dt.datetime.fromtimestamp(max(w[1] for w in windows)).astimezone().isoformat(timespec='seconds')} "
           "with these settings.)", ""] if ctx.reuse else []),
        f"Verdict rule: {spaces[0]} must be ahead of each other space by more than one standard error of the "
        "paired (same seed) differences, on test hypervolume and on best test accuracy in the window:", "",
        md_table(margins, 2), "",
        "Per seed ('search time': first trial start to last report):", "", md_table(run_rows, 2), "",
        f"![Pareto plot of the three spaces]({os.path.relpath(png, DOCS_DIR.parent)})", "",
        f"The plot shows every trial of every seed at its tuned thresholds (validation), one colour per space, "
        "with each space's front.",
    ])
    return Outcome(measured=measured, holds=holds,
                   figures={"reference": ref, "summary": summary.reset_index().to_dict("records"), "margins": margins,
                            "runs": per_run, "hv_ratio_test": ratios, "plot": png}, details=details)


# ---------------------------------------------------------------- 2. ASHA vs FIFO
def measure_asha_vs_fifo(ctx: Context, search: dict[str, Any], schedulers: Sequence[str]) -> Outcome:
    """Claim 2: the same search under each scheduler; CPU-seconds, trial-epochs and best score."""
    rows = {}
    for sched in schedulers:
        path, wall = run_search(ctx, sched, scheduler=sched, **search)
        t = load_trials(path)
        best = t.sort_values("score", ascending=False, kind="stable").iloc[0]
        rows[sched] = {"scheduler": sched, "trials": len(t), "trial-epochs": int(t["epochs_run"].sum()),
                       "CPU-seconds (Σ time_total_s)": float(t["time_total_s"].sum()),
                       "Σ train+eval s": float(sum(_history_seconds(path).values())),
                       "wall s": wall, "best score": float(best["score"]),
                       "best trial #": int(best["trial_id"].rsplit("_", 1)[-1]),
                       "its val acc (%)": float(best["accuracy"]), "its MMACs": float(best["avg_macs"]),
                       "finished trials": int((t["status"] == "finished").sum())}
    stop_ray()
    fifo, asha = rows["fifo"], rows["asha"]
    cpu_ratio = fifo["CPU-seconds (Σ time_total_s)"] / asha["CPU-seconds (Σ time_total_s)"]
    epoch_ratio = fifo["trial-epochs"] / asha["trial-epochs"]
    # Same candidate best in both, or ASHA's best at least as good: the saving cost no quality.
    same_best = fifo["best trial #"] == asha["best trial #"] or asha["best score"] >= fifo["best score"] - 1e-9
    measured = (f"FIFO/ASHA compute ×{cpu_ratio:.2f} CPU-s (×{epoch_ratio:.2f} trial-epochs); best score "
                f"FIFO {fifo['best score']:.2f}, ASHA {asha['best score']:.2f}"
                + (" (same trial)" if fifo["best trial #"] == asha["best trial #"] else " (different trials)"))
    details = "\n".join([
        f"Same space, seed and candidates (random search with a fixed seed samples the same "
        f"{search['num_samples']} architectures in the same order), {search['epochs']} epochs each; "
        f"settings: {', '.join(f'{k}={v}' for k, v in search.items())}. ASHA: grace period "
        f"{search.get('grace_period', 1)} epoch, reduction factor {search.get('reduction_factor', 2)}, on `score`. "
        "Compute = Σ over trials of Ray's `time_total_s` (each trial holds one CPU, so these are CPU-seconds); "
        "trial-epochs is the same count free of machine noise. The two searches ran one after the other. "
        + priority_note() + " Caveat: the trainable builds the network before seeding torch, so with reused "
        "actors a candidate's initial weights depend on the trial that ran before it in the same worker; the "
        "two searches train the same architectures, not necessarily from the same initial weights.", "",
        md_table(list(rows.values()), 2), "",
        f"FIFO spent ×{cpu_ratio:.2f} the CPU-seconds of ASHA (×{epoch_ratio:.2f} the trial-epochs). "
        + (f"Both searches found the same best candidate (#{fifo['best trial #']}) and trained it to the end, so "
           "this is the ratio of compute for the same best candidate; its score differs by "
           f"{asha['best score'] - fifo['best score']:+.2f} points between the two runs (same architecture and "
           "epochs, other initial weights): training noise of this short setup, not an effect of the scheduler."
           if fifo["best trial #"] == asha["best trial #"] else
           f"ASHA's best is candidate #{asha['best trial #']}, FIFO's #{fifo['best trial #']} "
           f"({asha['best score'] - fifo['best score']:+.2f} points): "
           + ("ASHA stopped the candidate that ended best under FIFO, so at this budget the saving came with a loss."
              if not same_best else "ASHA's best scored at least as high.")),
        *(["", "(`--reuse`: this run re-analysed the two searches of an earlier run with these settings; wall "
           "times were not re-measured.)"] if ctx.reuse else []),
    ])
    return Outcome(measured=measured, holds=bool(same_best and cpu_ratio > 1),
                   figures={"rows": rows, "cpu_ratio": cpu_ratio, "trial_epoch_ratio": epoch_ratio}, details=details)


def _history_seconds(path: Path) -> dict[str, float]:
    from analysis.results import load_experiment

    h = load_experiment(path).history
    return (h["train_seconds"] + h["eval_seconds"]).groupby(h["trial_id"]).sum().to_dict()


# ---------------------------------------------------------------- 3. Ray Tune overhead
# Ray starts its worker processes, trials included, at this niceness (Ray's default; verified with ps).
RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", 15))


def _plain_training(config: dict[str, Any], threads: int, niceness: int, queue: Any, stop: Any) -> None:
    """The trainable's training loop without Ray, in a fresh process at ``niceness``: images/s of each
    epoch, epoch after epoch until ``stop`` is set (at least one)."""
    os.nice(niceness)
    torch.set_num_threads(threads)
    from aebnas.data import BatchLoader, load_dataset
    from aebnas.nn import EarlyExitNet
    from aebnas.trainable import parse_trial_config
    from aebnas.train import make_optimizer, make_scheduler, train_one_epoch

    arch, ts = parse_trial_config(config)
    data = load_dataset(ts.dataset, seed=ts.seed)
    model = EarlyExitNet(arch.replace(num_classes=data.num_classes, in_channels=data.in_channels))
    torch.manual_seed(ts.seed)
    train = dataclasses.replace(ts.train_settings(), epochs=1000)  # the schedule must outlast the loop
    batches = BatchLoader.for_split(data, "train", batch_size=train.batch_size, resolution=arch.resolution,
                                    train=True, seed=ts.seed)
    optimizer = make_optimizer(model, train)
    scheduler = make_scheduler(optimizer, train, len(batches))
    epochs: list[tuple[float, float, float]] = []  # (start, end, images/s)
    while not epochs or not stop.is_set():
        batches.set_epoch(len(epochs))
        start = time.time()
        ips = train_one_epoch(model, batches, optimizer, scheduler, train)["images_per_s"]
        epochs.append((start, time.time(), ips))
    queue.put(epochs)


def _fixed_trial_config(search: dict[str, Any]) -> dict[str, Any]:
    """The one config a space with single-valued sets gives (samplers left are repaired away)."""
    from ray.tune.search.sample import Domain

    from aebnas.experiment import Experiment

    space = Experiment(**search).param_space()
    return {k: v.sample() if isinstance(v, Domain) else v for k, v in space.items()}


def measure_tune_overhead(ctx: Context, search: dict[str, Any], plain_niceness: Sequence[int]) -> Outcome:
    """Claim 3: images/s of one fixed candidate in a Ray Tune trial vs a plain process, side by side."""
    from analysis.results import load_experiment

    config = _fixed_trial_config(search)
    threads = int(search.get("cpus_per_trial", 1))
    mp = multiprocessing.get_context("spawn")
    rows, ratios = [], {}
    for rep, niceness in enumerate(plain_niceness):
        start_ray()
        queue, stop = mp.Queue(), mp.Event()
        plain = mp.Process(target=_plain_training, args=(config, threads, niceness, queue, stop))
        plain.start()
        path, _ = run_search(ctx, f"rep{rep}", num_samples=1, scheduler="fifo", **search)
        stop.set()
        plain_epochs = queue.get()
        plain.join()
        stop_ray()
        ray_ips = load_experiment(path).history["images_per_s"].tolist()
        # Only plain epochs that ran while the trial trained: before and after it, the plain process
        # had a core more to itself.
        begin, end = search_window(path)
        inside = [ips for start, stop_t, ips in plain_epochs if begin <= (start + stop_t) / 2 <= end]
        plain_ips = inside or [ips for _, _, ips in plain_epochs]
        for where, ips, nice in (("ray trial", ray_ips, RAY_WORKER_NICENESS), ("plain", plain_ips, niceness)):
            rows.append({"repeat": rep, "where": where, "nice": nice,
                         "images/s per epoch": ", ".join(f"{v:.1f}" for v in ips), "median images/s": median(ips)})
        ratios.setdefault(niceness, []).append(median(ray_ips) / median(plain_ips))
        print(f"  rep {rep}: ray {median(ray_ips):.1f}, plain (nice {niceness}) {median(plain_ips):.1f} images/s",
              flush=True)
    same = ratios.get(RAY_WORKER_NICENESS, [])
    if not same:
        raise ValueError(f"plain_niceness={tuple(plain_niceness)} has no run at Ray's worker niceness "
                         f"{RAY_WORKER_NICENESS}: nothing to compare like for like")
    overhead = 1.0 - median(same)
    spread = max(same) - min(same) if len(same) > 1 else float("inf")
    # The goal is a 5% margin: runs that disagree by more than twice that cannot tell.
    holds: bool | str = (overhead < 0.05 if spread <= 0.10 else
                         f"inconclusive (equal-priority runs differ by {spread:.0%})")
    measured = (f"{overhead:+.1%} (median of {len(same)} side-by-side runs at equal priority)"
                + "".join(f"; trial at ×{median(r):.2f} of a nice-{n} plain process" for n, r in ratios.items()
                          if n != RAY_WORKER_NICENESS))
    details = "\n".join([
        f"One fixed candidate ({_arch_summary({k: v for k, v in config.items() if _is_arch_key(k)})}), "
        f"{threads} torch thread(s) in both. 'ray': a real search with one trial (`aebnas.experiment.run`, "
        f"{search['epochs']} epochs, one CPU), images/s as the trainable reports it for each epoch's training "
        "loop. 'plain': the same loop (`aebnas.train.train_one_epoch`, same data pipeline, optimizer and batch "
        "size) in a fresh Python process without Ray, running **at the same time** as the trial (epoch after "
        "epoch until the trial ends; only its epochs whose midpoint falls between the trial's start and its last "
        "report count), so both see the same machine load; they share the 2 cores one each. "
        "On this busy machine a measurement taken a minute later can differ by ×2–4 (seen while writing "
        "this benchmark), which is why the two run side by side and not one after the other.", "",
        f"Priority matters: Ray starts its workers, hence every trial, at niceness {RAY_WORKER_NICENESS} "
        "(its `RAY_worker_niceness` default). The like-for-like comparison runs the plain process at the same "
        "niceness; runs with another niceness show what a trial gets next to normal-priority processes. "
        f"Overhead = 1 − median over the equal-priority repeats of (trial / plain).", "",
        md_table(rows, 1), "",
        "Ratio trial / plain: " + "; ".join(f"plain at nice {n}: {', '.join(f'{r:.3f}' for r in rs)}"
                                           for n, rs in ratios.items()) + ".",
        f"Overhead at equal priority: **{overhead:+.1%}** (negative: the trial was faster); the equal-priority "
        f"runs differ by {spread:.0%}, and the verdict needs them within 10% of each other. Only the training "
        "loop is timed; Ray's per-trial start-up and per-epoch report and checkpoint are in claim 7's "
        "'outside trials' time. Next to normal-priority work (other users' jobs, a data loader, a notebook) "
        "a trial gets a smaller share of the CPU; export `RAY_worker_niceness=0` before starting Ray to give "
        "trials normal priority on a shared machine.",
    ])
    return Outcome(measured=measured, holds=holds,
                   figures={"overhead": overhead, "spread": spread, "ratios_by_plain_niceness": ratios,
                            "ray_worker_niceness": RAY_WORKER_NICENESS, "rows": rows}, details=details)


def _is_arch_key(key: str) -> bool:
    from aebnas.config import is_arch_key

    return is_arch_key(key) and key != "min_exits"


def _arch_summary(flat: dict[str, Any] | None) -> str:
    if not flat:
        return "?"
    from aebnas.config import ArchConfig
    from aebnas.cost import exit_costs

    arch = ArchConfig.from_flat(flat)
    return (f"resolution {arch.resolution}, width {arch.width_mult}, exits after stages {arch.exit_positions}, "
            f"{exit_costs(arch).static_macs:.2f} MMACs static")


# ---------------------------------------------------------------- 4. threshold tuning speed
def synthetic_exit_outputs(num_samples: int, accuracies: Sequence[float], classes: int, seed: int):
    """Cached outputs of a network whose exits (and final) have the given accuracies (fractions);
    confidences are higher on right answers, as in a trained network."""
    from aebnas.exit_policy import ExitOutputs

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, num_samples)
    right = rng.random((len(accuracies), num_samples)) < np.asarray(accuracies)[:, None]
    wrong = (labels + rng.integers(1, classes, (len(accuracies), num_samples))) % classes
    prediction = np.where(right, labels[None, :], wrong)
    confidence = np.where(right, rng.beta(4, 2, right.shape), rng.beta(2, 4, right.shape)).astype(np.float32)
    return ExitOutputs(confidence=confidence, prediction=prediction, labels=labels)


def loop_tune_thresholds(confidence: np.ndarray, prediction: np.ndarray, labels: np.ndarray,
                         backbone: Sequence[float], branch: Sequence[float], target: float,
                         grid: Sequence[float], lam: float, round_above: float) -> dict[str, Any]:
    """The straightforward search, as the authors' code does it: for every threshold vector of the
    grid, walk every sample through the exits in Python. Returns the best vector (first on ties)
    and per vector (accuracy %, average MMACs)."""
    e, n = len(branch), len(labels)
    values = sorted({1.0 if g > round_above else float(g) for g in grid})
    conf = [row.tolist() for row in confidence]
    correct = [[int(p == y) for p, y in zip(row.tolist(), labels.tolist())] for row in prediction]
    best, per_vector = None, []
    for th in itertools.product(values, repeat=e):
        costs, paid = [], 0.0
        for j in range(e):  # C_j: backbone to j + active branches before j + its own branch
            costs.append(backbone[j] + paid + branch[j])
            if th[j] < 1.0:
                paid += branch[j]
        costs.append(backbone[e] + paid)
        right, macs = 0, 0.0
        for i in range(n):
            k = e
            for j in range(e):
                if th[j] < 1.0 and conf[j][i] >= th[j]:
                    k = j
                    break
            right += correct[k][i]
            macs += costs[k]
        acc, avg = 100.0 * right / n, macs / n
        score = acc - lam * 100.0 * abs(avg - target) / target
        per_vector.append((acc, avg))
        if best is None or score > best["score"]:
            best = {"thresholds": list(th), "score": score, "accuracy": acc, "avg_macs": avg}
    return {"best": best, "per_vector": np.array(per_vector)}


def measure_threshold_speed(ctx: Context, num_samples: int, accuracies: Sequence[float], target_fraction: float,
                            vector_repeats: int, seed: int) -> Outcome:
    """Claim 4: ``tune_thresholds`` vs the per-sample loop on the same outputs: same answer, time ratio."""
    from aebnas.config import uniform_arch
    from aebnas.cost import exit_costs
    from aebnas.exit_policy import (PAPER_GRID, PAPER_LAMBDA, ROUND_TO_ONE_ABOVE, _exit_counts_by_sample,
                                    simulate_many, threshold_grid, tune_thresholds)

    exits = len(accuracies) - 1
    outputs = synthetic_exit_outputs(num_samples, accuracies, 10, seed)
    # Real per-exit costs: a mid-size network of the paper's space with an exit after stages 1–4.
    costs = exit_costs(uniform_arch(3, 5, 4, exits=tuple(range(1, exits + 1)), resolution=48))
    target = target_fraction * costs.static_macs
    vector_times, loop_time = [], None
    for _ in range(vector_repeats):  # half before the loop, half after
        if loop_time is None and len(vector_times) >= vector_repeats // 2:
            t0 = time.perf_counter()
            loop = loop_tune_thresholds(outputs.confidence[:exits], outputs.prediction, outputs.labels,
                                        costs.backbone.tolist(), costs.branch.tolist(), target, PAPER_GRID,
                                        PAPER_LAMBDA, ROUND_TO_ONE_ABOVE)
            loop_time = time.perf_counter() - t0
        t0 = time.perf_counter()
        tuned = tune_thresholds(outputs, costs, target)
        vector_times.append(time.perf_counter() - t0)
    vectors = threshold_grid(exits)
    t0 = time.perf_counter()
    _exit_counts_by_sample(outputs, vectors)  # the fallback walk simulate_many uses for large threshold sets
    walk_time = time.perf_counter() - t0
    acc, avg, _ = simulate_many(outputs, vectors, costs)
    max_acc_diff = float(np.abs(acc - loop["per_vector"][:, 0]).max())
    max_mac_diff = float(np.abs(avg - loop["per_vector"][:, 1]).max())
    same_best = tuned.thresholds == loop["best"]["thresholds"]
    identical = same_best and max_acc_diff < 1e-9 and max_mac_diff < 1e-9
    vec = median(vector_times)
    ratio = loop_time / vec
    measured = (f"×{ratio:.0f} faster ({vec * 1000:.0f} ms vs {loop_time:.1f} s); "
                + ("identical results" if identical else "RESULTS DIFFER"))
    details = "\n".join([
        f"{num_samples:,} samples × {exits} exits (+ final), the paper's grid {PAPER_GRID} (values > "
        f"{ROUND_TO_ONE_ABOVE} rounded to 1.0 = exit off) → {len(vectors):,} threshold vectors, λ = {PAPER_LAMBDA}, "
        f"target {target:.3f} MMACs ({target_fraction:.0%} of the static MACs). Synthetic cached outputs (seed {seed}; "
        f"exit accuracies {tuple(accuracies)}, confidences higher on right answers) and the real per-exit costs of a "
        "network of the paper's space. The loop (`loop_tune_thresholds` in `benchmarks/_common.py`) is written "
        "independently: its own grid rounding, its own C_i; one run. `tune_thresholds`: median of "
        f"{vector_repeats} runs, half before the loop and half after.", "",
        md_table([{"method": "per-sample Python loop", "seconds": loop_time,
                   "best thresholds": str(loop["best"]["thresholds"]), "best score": loop["best"]["score"]},
                  {"method": "`aebnas.exit_policy.tune_thresholds`", "seconds": vec,
                   "best thresholds": str(tuned.thresholds), "best score": tuned.score},
                  {"method": "numpy walk over (vector, sample) pairs, counts only", "seconds": walk_time,
                   "best thresholds": "", "best score": None}], 4), "",
        "`simulate_many` (what `tune_thresholds` calls) counts the samples leaving at each exit from joint "
        "histograms of each sample's confidence *level* (how many of an exit's threshold values it reaches) with "
        "prefix sums: O(samples·exits + grid cells + vectors·exits), changed for this benchmark (before, it "
        "walked every (vector, sample) pair). That walk, now on boolean masks, is kept for threshold sets too large for histograms; its time is the third row (one run, "
        "after the loop).", "",
        f"Largest difference over all {len(vectors):,} vectors: accuracy {max_acc_diff:.2e} points, average MACs "
        f"{max_mac_diff:.2e} MMACs; same best vector: {same_best}. Speed-up **×{ratio:.0f}** "
        f"(`tune_thresholds` runs: {', '.join(f'{t * 1000:.0f}' for t in vector_times)} ms).",
    ])
    return Outcome(measured=measured, holds=bool(identical and ratio >= 100),
                   figures={"loop_s": loop_time, "vectorized_s": vec, "vectorized_runs_s": vector_times, "walk_s": walk_time,
                            "ratio": ratio, "identical": identical, "max_acc_diff": max_acc_diff,
                            "max_macs_diff": max_mac_diff}, details=details)


# ---------------------------------------------------------------- 5. dynamic inference latency
def _pick_trial(experiments: Sequence[Path]) -> pd.Series:
    """The best trial by validation score (at the searches' target) among finished trials with exits."""
    t = pd.concat([load_trials(p) for p in experiments], ignore_index=True)
    t = t[(t["status"] == "finished") & t["checkpoint"].notna() & t["exit_outputs"].notna()
          & (t["num_exits"] > 0)]
    if t.empty:
        raise RuntimeError(f"no finished trial with exits in {experiments}; nothing to measure")
    return t.sort_values("score", ascending=False, kind="stable").iloc[0]


def _time_passes(fn: Callable[[], Any], passes: int) -> list[float]:
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure_inference_latency(ctx: Context, experiments: Sequence[str], target_fraction: float,
                              grid: Sequence[float], batch_sizes: Sequence[int], images: dict[int, int], threads: Sequence[int], repeats: int,
                              warmup: int) -> Outcome:
    """Claim 5: ``infer`` with tuned thresholds vs the same network to the final exit (thresholds 1.0)."""
    from analysis.posthoc import load_outputs, retune
    from aebnas.config import ArchConfig
    from aebnas.cost import exit_costs
    from aebnas.data import BatchLoader, load_dataset
    from aebnas.nn import EarlyExitNet
    from aebnas.trainable import CHECKPOINT_FILE

    paths = [Path(p) for p in experiments]
    missing = [p for p in paths if not p.is_dir()]
    if missing or not paths:
        raise SystemExit(f"experiments {missing or '(none)'} not found: run benchmarks/search_spaces.py first")
    trial = _pick_trial(paths)
    state = torch.load(Path(trial["checkpoint"]) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    arch = ArchConfig.from_flat(state["arch"])
    model = EarlyExitNet(arch).eval()
    model.load_state_dict(state["model"])
    costs = exit_costs(arch)
    # Re-tuned on validation (the trial's saved outputs, same weights) for a deeper cut, so that exits
    # are really taken: on this small, briefly trained subset the search's own thresholds rarely exit.
    outputs, _ = load_outputs(trial["exit_outputs"])
    budget = target_fraction * costs.static_macs
    tuned = retune(outputs, costs, budget, budget_macs=budget, grid=grid)
    thresholds = tuned.thresholds
    off = [1.0] * arch.num_exits
    c_tuned = costs.cumulative(np.asarray(thresholds) < 1.0)
    data = load_dataset("cifar10-subset")
    test = BatchLoader.for_split(data, "test", batch_size=len(data.y_test), resolution=arch.resolution, train=False)
    x_all = next(iter(test))[0]

    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for bs in batch_sizes:
            n = images[bs]
            batches = [x_all[i:i + bs] for i in range(0, n, bs)]
            with torch.inference_mode():
                exit_idx = torch.cat([model.infer(b, thresholds)[1] for b in batches]).numpy()
                run = {"dynamic": lambda: [model.infer(b, thresholds) for b in batches],
                       "final exit": lambda: [model.infer(b, off) for b in batches]}
                for fn in run.values():
                    _time_passes(fn, warmup)
                times = {k: [] for k in run}
                for rep in range(repeats):  # alternate, so load changes hit both alike
                    for k in (run if rep % 2 == 0 else reversed(list(run))):
                        times[k] += _time_passes(run[k], 1)
            mac_dyn = float(c_tuned[exit_idx].mean())
            mac_speedup = costs.static_macs / mac_dyn
            t_dyn, t_full = median(times["dynamic"]) / n, median(times["final exit"]) / n
            speedup = t_full / t_dyn
            rows.append({"threads": n_threads, "batch": bs, "images": n,
                         "early exits (%)": 100.0 * float((exit_idx < arch.num_exits).mean()),
                         "final exit (ms/image)": 1000 * t_full, "dynamic (ms/image)": 1000 * t_dyn,
                         "measured speed-up": speedup, "MAC speed-up": mac_speedup,
                         "measured / MAC": speedup / mac_speedup})
            print(f"  {n_threads} thread(s), batch {bs}: ×{speedup:.2f} measured vs ×{mac_speedup:.2f} MACs",
                  flush=True)
    worst = min(r["measured / MAC"] for r in rows)
    measured = "measured/MAC speed-up " + ", ".join(
        f"{r['measured / MAC']:.2f} (b{r['batch']}, {r['threads']}t)" for r in rows) + \
        f"; MAC speed-up ×{rows[0]['MAC speed-up']:.2f}"
    details = "\n".join([
        f"Network: trial `{trial['trial_id']}` of `{trial['experiment']}` (claim 1's aebnas searches), the best "
        f"validation score at the searches' target among finished trials with exits: "
        f"{_arch_summary(arch.to_flat())}; weights from its last checkpoint. Its own thresholds "
        f"{[float(v) for v in state['thresholds']]} send {100 * (1 - trial['final_util']):.1f}% of validation "
        "images out early (the subset is small and training short, so exits are weak and the tuner keeps them "
        f"mostly shut); accuracy is not the point here, so the thresholds were re-tuned on validation (the trial's saved outputs, λ 0.1, the grid "
        f"{tuple(grid)}) under a budget of {target_fraction:.0%} of its static MACs (the cheapest vector when "
        f"none fits): {thresholds}, "
        f"{100 * (1 - tuned.val.utilization[-1]):.1f}% of validation images out early, validation accuracy "
        f"{tuned.val.accuracy:.1f}% at {tuned.val.avg_macs:.3f} MMACs (static {costs.static_macs:.3f}).", "",
        "Timed: `EarlyExitNet.infer` under `torch.inference_mode()` on the first test images (preprocessed "
        "beforehand), with the tuned thresholds ('dynamic') and with every threshold 1.0 ('final exit': the same "
        "network, no branch computed, the static MACs). Per configuration: "
        f"{warmup} warm-up passes each, then {repeats} passes alternating the two; the median pass time divided "
        "by the number of images. MAC speed-up = static MACs / mean C_i of the exits those images took.", "",
        md_table(rows, 3), "",
        f"Goal: measured speed-up ≥ 0.7 × MAC speed-up; worst case {worst:.2f}.",
    ])
    return Outcome(measured=measured, holds=bool(worst >= 0.7),
                   figures={"trial": trial["trial_id"], "experiment": trial["experiment"], "thresholds": thresholds,
                            "rows": rows}, details=details)


# ---------------------------------------------------------------- 6. MAC counts
def _divisible(value: float, divisor: int = 8) -> int:
    """MobileNet channel rounding, written out again here so the check shares no code with aebnas."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def _conv(c_in: int, c_out: int, k: int, hw: int, stride: int = 1, groups: int = 1,
          bias: bool = False) -> tuple[float, int]:
    """MACs of a square convolution with 'same'-style padding k//2, and its output size."""
    out = (hw + 2 * (k // 2) - k) // stride + 1
    return out * out * c_out * (c_in // groups * k * k + (1 if bias else 0)), out


def analytic_segment_macs(arch: Any) -> dict[str, float]:
    """MMACs per segment from per-layer formulas walking the ArchConfig (convs and linear layers,
    a bias adding one MAC per output; nothing element-wise), as documented in aebnas/cost.py."""
    from aebnas import config as C

    w, hw, seg = arch.width_mult, arch.resolution, {}
    stem, first = _divisible(C.STEM_CHANNELS * w), _divisible(C.FIRST_BLOCK_CHANNELS * w)
    m1, hw = _conv(arch.in_channels, stem, 3, hw, stride=2)
    m2, _ = _conv(stem, stem, 3, hw, groups=stem)             # first block: depthwise, no expansion
    m3, _ = _conv(stem, first, 1, hw)                         # project
    seg["stem"], c = (m1 + m2 + m3) / 1e6, first
    exits = {e.position: e for e in arch.exits}
    for s, stage in enumerate(arch.stages):
        out_c, macs = _divisible(C.STAGE_CHANNELS[s] * w), 0.0
        for b, block in enumerate(stage.blocks):
            mid = _divisible(c * block.expansion) if block.expansion != 1 else c
            if block.expansion != 1:
                macs += _conv(c, mid, 1, hw)[0]
            dw, hw = _conv(mid, mid, block.kernel, hw, stride=C.STAGE_STRIDES[s] if b == 0 else 1, groups=mid)
            macs += dw
            if C.STAGE_USE_SE[s]:
                squeeze = _divisible(mid / 4)
                macs += _conv(mid, squeeze, 1, 1, bias=True)[0] + _conv(squeeze, mid, 1, 1, bias=True)[0]
            macs += _conv(mid, out_c, 1, hw)[0]
            c = out_c
        seg[f"stage{s + 1}"] = macs / 1e6
        if s + 1 in exits:
            e_macs, ec, ehw = 0.0, c, hw
            for mod in exits[s + 1].modules:
                mid = ec * mod.expansion
                if mod.expansion > 1:
                    e_macs += _conv(ec, mid, 1, ehw)[0]
                e_macs += _conv(mid, mid, mod.kernel, ehw, groups=mid)[0] + _conv(mid, mod.channels, 1, ehw)[0]
                ec, ehw = mod.channels, math.ceil(ehw / 2) if mod.pool else ehw
            seg[f"exit{s + 1}"] = (e_macs + ec * arch.num_classes + arch.num_classes) / 1e6
    expand = _divisible(C.HEAD_EXPAND_CHANNELS * w)
    feature = _divisible(C.HEAD_FEATURE_CHANNELS * w) if w > 1.0 else C.HEAD_FEATURE_CHANNELS
    seg["head"] = (_conv(c, expand, 1, hw)[0] + expand * feature + feature * arch.num_classes
                   + arch.num_classes) / 1e6
    return seg


def random_paper_archs(count: int, seed: int, width_mult: float) -> list[Any]:
    """``count`` architectures sampled from the paper's search space (``search_spaces.aebnas_space``)."""
    from ray.tune.search.sample import Domain

    from aebnas.config import ArchConfig
    from search_spaces import aebnas_space

    rng = np.random.default_rng(seed)
    space = aebnas_space()
    return [ArchConfig.from_flat({**{k: v.sample(random_state=rng) if isinstance(v, Domain) else v
                                     for k, v in space.items()}, "width_mult": width_mult})
            for _ in range(count)]


def measure_mac_counts(ctx: Context, count: int, seed: int, width_mult: float) -> Outcome:
    """Claim 6: ``aebnas.cost`` (ptflops) vs the analytic count: every segment and every C_i."""
    from aebnas.cost import ExitCosts, exit_costs, segment_macs

    rows, worst_seg, worst_c = [], 0.0, 0.0
    for i, arch in enumerate(random_paper_archs(count, seed, width_mult)):
        ours, mine = segment_macs(arch), analytic_segment_macs(arch)
        if set(ours) != set(mine):
            raise RuntimeError(f"architecture {i}: segments differ: {sorted(ours)} vs {sorted(mine)}")
        seg_diff = max(abs(ours[k] - mine[k]) / mine[k] for k in mine)
        stage_cum = np.cumsum([mine["stem"]] + [mine[f"stage{s}"] for s in range(1, 6)])
        analytic = ExitCosts(backbone=[stage_cum[p] for p in arch.exit_positions] + [stage_cum[-1] + mine["head"]],
                             branch=[mine[f"exit{p}"] for p in arch.exit_positions])
        c_ours, c_mine = exit_costs(arch).cumulative(), analytic.cumulative()
        c_diff = float(np.max(np.abs(c_ours - c_mine) / c_mine))
        worst_seg, worst_c = max(worst_seg, seg_diff), max(worst_c, c_diff)
        rows.append({"#": i, "resolution": arch.resolution, "depths": "".join(str(s.depth) for s in arch.stages),
                     "exits": ",".join(map(str, arch.exit_positions)), "static MMACs (cost.py)": c_ours[-1],
                     "static MMACs (analytic)": c_mine[-1], "largest segment diff": f"{seg_diff:.2e}",
                     "largest C_i diff": f"{c_diff:.2e}"})
    measured = f"largest relative difference {worst_c:.2e} over every C_i ({worst_seg:.2e} over segments)"
    details = "\n".join([
        f"{count} architectures sampled (seed {seed}) from the paper's space (`search_spaces.aebnas_space()`: "
        f"resolutions 32–72, depths, kernels, expansions, exits and branches), width {width_mult}. 'cost.py' is "
        "`aebnas.cost` (ptflops, aten backend, per segment); 'analytic' is `analytic_segment_macs` in "
        "`benchmarks/_common.py`: per-layer formulas walking the ArchConfig (its own channel rounding and output "
        "sizes; convolutions and linear layers, one extra MAC per output for a bias; nothing element-wise, the "
        "convention cost.py documents). C_i with every exit active.", "",
        md_table(rows, 3), "",
        f"Largest relative difference: **{worst_c:.2e}** over every C_i, {worst_seg:.2e} over every segment.",
    ])
    return Outcome(measured=measured, holds=bool(worst_c < 1e-6),
                   figures={"max_rel_diff_costs": worst_c, "max_rel_diff_segments": worst_seg}, details=details)


# ---------------------------------------------------------------- 7. search throughput
def measure_search_throughput(ctx: Context, search: dict[str, Any], concurrency: Sequence[int]) -> Outcome:
    """Claim 7: the same search with at most 1, then 2, trials at once (one CPU each): trials per hour."""
    rows = []
    for c in concurrency:
        load = os.getloadavg()[0]
        path, wall = run_search(ctx, f"concurrent{c}", max_concurrent=c, cpus_per_trial=1, scheduler="fifo", **search)
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
        "machine. Wall time of `aebnas.experiment.run` with Ray already started (dataset loading, trial start-up, "
        "training, evaluation, checkpoints). 'Outside trials per trial' = (wall × concurrency − Σ trial time) / "
        "trials: Ray's scheduling, actor start-up and the driver's bookkeeping per trial. " + priority_note(), "",
        md_table(rows, 1), "",
        f"Scaling from {lo} to {hi} concurrent trials: **×{scaling:.2f}** (ideal ×{hi / lo:.0f})."
        + (" The concurrent trials share this machine's cores with the other jobs running on it (see the load "
           "column), so each gets less than a core." if scaling < 0.9 * hi / lo else ""),
        "", "**What to expect on a cluster.** Trials are independent: the search runs as many at once as "
        "there are trial slots (`cpus_per_trial` / `gpus_per_trial` over all nodes), so trials per hour grow "
        "with the slots as long as each trial has its cores to itself and the search has enough trials to fill "
        "them (with ASHA, the last rungs hold few trials and leave slots idle). Per trial add the start-up and "
        "bookkeeping measured above, plus the upload of checkpoints and `exit_outputs.npz` to the shared "
        f"`storage_path` (here {checkpoint_mb:.1f} MB per trial and epoch: weights and optimizer state). The dataset travels once per node through the object store. "
        "One trial of this size does not profit from more than a few threads; a GPU (not available here, so "
        "not measured) would make each trial's epoch much shorter and the per-trial overhead relatively larger.",
    ])
    return Outcome(measured=measured, holds=None,
                   figures={"rows": rows, "scaling": scaling, "checkpoint_mb": checkpoint_mb}, details=details)


