"""Claim 8: peak memory of 2 concurrent trials, dataset as numpy arrays (now) vs torch tensors (0.1)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.claims import Claim
from harness.common import Context, Outcome, main, md_table, start_ray, stop_ray

CLAIM = Claim(8, "memory_per_trial", "Memory per trial",
              "with numpy arrays in the object store, the peak RSS of 2 concurrent trials is lower than with "
              "torch tensors (each trial copying the dataset)")
# Small networks (width 0.25, resolution 32, 1 epoch) so that the dataset dominates a trial's memory.
SEARCH = dict(space="aebnas", space_kwargs={"resolutions": (32,)}, width_mult=0.25, target_macs=1.0, epochs=1,
              batch_size=128, seed=0)
# The embedded subset tiled to CIFAR-10's size: 50,000 training (5,000 of them validation) and 10,000 test images.
SETTINGS = dict(search=SEARCH, train_images=50_000, test_images=10_000, val_size=5_000, trials=2)
QUICK = dict(search=SEARCH, train_images=2_000, test_images=400, val_size=200, trials=2)

SPLIT_FIELDS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
MODES = ("torch tensors (0.1)", "numpy arrays")
MODE_NAMES = {"torch tensors (0.1)": "before_torch", "numpy arrays": "after_numpy"}
TRIAL_TITLE = "ray::ImplicitFunc"  # process title of a Ray Tune function trial's actor
MIB = 1024 * 1024


# ------------------------------------------------------------------ data
def tiled_npz(ctx: Context, train_images: int, test_images: int) -> Path:
    """The embedded CIFAR-10 subset with its train and test images repeated to ``train_images`` /
    ``test_images``, as an uncompressed .npz in the scratch folder (written once)."""
    from aebnas.data.datasets import embedded_dataset_path

    path = ctx.scratch / f"cifar10_subset_tiled_{train_images}_{test_images}.npz"
    if not path.is_file():
        with np.load(embedded_dataset_path()) as src:
            arrays = {k: src[k] for k in src.files}
        for split, n in (("train", train_images), ("test", test_images)):
            idx = np.arange(n) % len(arrays[f"y_{split}"])
            arrays[f"x_{split}"], arrays[f"y_{split}"] = arrays[f"x_{split}"][idx], arrays[f"y_{split}"][idx]
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    return path


def as_torch(data: Any) -> Any:
    """``data`` as aebnas 0.1 shipped it: every split a torch tensor owning a copy of its array."""
    import torch

    return dataclasses.replace(data, **{f: torch.from_numpy(getattr(data, f).copy()) for f in SPLIT_FIELDS})


def stored_bytes(data: Any) -> int:
    """Bytes of ``data`` serialized by Ray, i.e. what ``tune.with_parameters`` puts in the object store."""
    import ray

    return int(ray._private.worker.global_worker.get_serialization_context().serialize(data).total_bytes)


# ------------------------------------------------------------------ memory of trial processes
def _smaps_kib(pid: int) -> dict[str, int]:
    """Rss, Pss, Shared_* and Private_* (KiB) of a process, from /proc/PID/smaps_rollup."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def _descendants(root: int) -> set[int]:
    """Pids of every process below ``root`` (this driver: its raylet and the raylet's workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class TrialMemorySampler(threading.Thread):
    """Samples, every ``interval_s``, the memory of this Ray session's trial processes (descendants of
    this driver titled ``ray::ImplicitFunc…``; other sessions on the machine are not counted): per
    process the largest RSS, PSS and private memory (USS) seen, and the largest sum over the processes
    alive at one sample. PSS counts a page shared by k processes as 1/k in each; USS counts private pages
    only: the object store's pages that a trial maps count fully in its RSS, never in its USS."""

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.per_pid: dict[int, dict[str, float]] = {}
        self.peak_sum: dict[str, float] = {"rss": 0.0, "pss": 0.0, "uss": 0.0}
        self.max_alive = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._done.is_set():
            total = {"rss": 0.0, "pss": 0.0, "uss": 0.0}
            alive = 0
            for pid in _descendants(me):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if not f.read().startswith(TRIAL_TITLE.encode()):
                            continue
                    kib = _smaps_kib(pid)
                except OSError:  # ended between the listing and the read
                    continue
                now = {"rss": kib.get("Rss", 0) / 1024, "pss": kib.get("Pss", 0) / 1024,
                       "uss": (kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0)) / 1024}
                peak = self.per_pid.setdefault(pid, {"rss": 0.0, "pss": 0.0, "uss": 0.0})
                for k, v in now.items():
                    peak[k] = max(peak[k], v)
                    total[k] += v
                alive += 1
            for k, v in total.items():
                self.peak_sum[k] = max(self.peak_sum[k], v)
            self.max_alive = max(self.max_alive, alive)
            self.samples += 1
            self._done.wait(self.interval_s)

    def stop(self) -> None:
        self._done.set()
        self.join()


# ------------------------------------------------------------------ one search
def run_mode(ctx: Context, mode: str, data: Any, dataset_path: Path, val_size: int, trials: int,
           search: dict[str, Any]) -> dict[str, Any]:
    """``trials`` candidates, all at once (one CPU each), trained on ``data`` in fresh Ray workers of a
    fresh local Ray; returns per-trial metrics, the sampler's figures and the stored object's size."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from aebnas.search.experiment import Experiment
    from aebnas.search.tuner import make_search_alg
    from aebnas.search.trainable import train_candidate

    name = MODE_NAMES[mode]
    exp = Experiment(dataset=str(dataset_path), val_size=val_size, num_samples=trials, max_concurrent=trials,
                     cpus_per_trial=1, gpus_per_trial=0, scheduler="fifo", storage_path=str(ctx.scratch),
                     name=name, verbose=0, max_failures=0, **search)
    exp.validate()
    shutil.rmtree(ctx.scratch / name, ignore_errors=True)
    stop_ray()
    start_ray()  # a fresh Ray for each mode: no worker process of one mode runs a trial of the other
    import ray

    if ray.cluster_resources().get("CPU", 0) < trials:
        raise RuntimeError(f"{trials} concurrent trials need {trials} CPUs; Ray sees {ray.cluster_resources()}")
    store_mb = stored_bytes(data) / MIB
    trainable = tune.with_resources(tune.with_parameters(train_candidate, data=data), {"cpu": 1, "gpu": 0})
    tuner = tune.Tuner(
        trainable, param_space=exp.param_space(data.num_classes, data.in_channels),
        tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=trials,
                                    search_alg=make_search_alg(exp), scheduler=FIFOScheduler(),
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=name, storage_path=str(ctx.scratch), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)))
    sampler = TrialMemorySampler()
    sampler.start()
    try:
        results = tuner.fit()
    finally:
        sampler.stop()
        stop_ray()
    if results.num_errors:
        raise RuntimeError(f"{results.num_errors} trial(s) of {name} errored; see {ctx.scratch / name}")
    rows = []
    for r in results:
        m = r.metrics
        sampled = sampler.per_pid.get(int(m["pid"]), {})
        rows.append({"pid": int(m["pid"]), "peak_rss_mb": float(m["peak_rss_mb"]),
                     "sampled_rss_mb": sampled.get("rss"), "sampled_pss_mb": sampled.get("pss"),
                     "sampled_uss_mb": sampled.get("uss"), "static_macs": float(m["static_macs"]),
                     "end": float(m["timestamp"]), "start": float(m["timestamp"]) - float(m["time_total_s"])})
    rows.sort(key=lambda row: row["static_macs"])  # the same candidate on the same row in both modes
    overlap = max(r["start"] for r in rows) < min(r["end"] for r in rows)
    return {"mode": mode, "trials": rows, "sum_peak_rss_mb": sum(r["peak_rss_mb"] for r in rows),
            "overlap": overlap, "object_store_mb": store_mb, "sampled_peak_sum": dict(sampler.peak_sum),
            "sampled_max_alive": sampler.max_alive, "samples": sampler.samples}


# ------------------------------------------------------------------ the claim
def measure_memory_per_trial(ctx: Context, search: dict[str, Any], train_images: int, test_images: int,
                             val_size: int, trials: int) -> Outcome:
    """Claim 8: the same ``trials`` concurrent trials with the dataset's splits as torch tensors (as 0.1
    shipped them) and as numpy arrays (as ``load_dataset`` returns them): peak RSS per trial and summed."""
    from aebnas.data.datasets import load_dataset

    zero_copy_env = os.environ.pop("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", None)
    if zero_copy_env is not None:
        print(f"  unset RAY_ENABLE_ZERO_COPY_TORCH_TENSORS={zero_copy_env}: 0.1 ran with Ray's default "
              "(tensors pickled, copied in every trial)", flush=True)
    path = tiled_npz(ctx, train_images, test_images)
    numpy_data = load_dataset(str(path), val_size=val_size, seed=search["seed"])
    data_mb = sum(getattr(numpy_data, f).nbytes for f in SPLIT_FIELDS) / MIB
    sizes = (f"{len(numpy_data.y_train):,} train / {len(numpy_data.y_val):,} val / {len(numpy_data.y_test):,} test "
             f"images of {'×'.join(map(str, numpy_data.x_train.shape[1:]))}")
    print(f"  {os.path.relpath(path)}: {sizes}, {data_mb:.1f} MiB", flush=True)
    runs = run_modes(ctx, numpy_data, path, val_size, trials, search)
    before, after = runs[MODES[0]], runs[MODES[1]]
    ratio = after["sum_peak_rss_mb"] / before["sum_peak_rss_mb"]
    saved_per_trial = (before["sum_peak_rss_mb"] - after["sum_peak_rss_mb"]) / trials
    holds = bool(after["sum_peak_rss_mb"] < before["sum_peak_rss_mb"])
    if not (before["overlap"] and after["overlap"]):
        holds = f"cannot tell: the {trials} trials of a mode did not run at the same time"
    uss_before, uss_after = before["sampled_peak_sum"]["uss"], after["sampled_peak_sum"]["uss"]
    uss_ratio = uss_after / uss_before if uss_before else float("nan")
    uss_saved_per_trial = (uss_before - uss_after) / trials
    measured = (f"Σ peak RSS of {trials} concurrent trials {before['sum_peak_rss_mb']:.0f} MiB (torch tensors) → "
                f"{after['sum_peak_rss_mb']:.0f} MiB (numpy arrays): ×{ratio:.2f}, {saved_per_trial:.0f} MiB less "
                f"per trial ({data_mb:.0f} MiB dataset)")
    full_size = " (full CIFAR-10's size)" if (train_images, test_images) == (50_000, 10_000) else ""
    where = os.path.relpath(path, Path(__file__).resolve().parents[1])
    data = (f"Data: the embedded CIFAR-10 subset (3,805 train / 761 test images) **tiled** (its images repeated) to "
            f"{train_images:,} training images{full_size}, {val_size:,} of them split off for validation, and "
            f"{test_images:,} test images, written to `{where}` (scratch, git-ignored): {sizes}, {data_mb:.1f} "
            "MiB of arrays. Repeated images change nothing here: memory depends on the number of images, not on their "
            "content (the accuracies of these trials mean nothing).")
    result = (f"Σ peak RSS of the {trials} concurrent trials: **{before['sum_peak_rss_mb']:.0f} MiB with torch "
              f"tensors, {after['sum_peak_rss_mb']:.0f} MiB with numpy arrays (×{ratio:.2f})**, i.e. "
              f"{saved_per_trial:.0f} MiB less per trial for a {data_mb:.0f} MiB dataset. Private memory (USS), peak "
              f"of the sum: {uss_before:.0f} → {uss_after:.0f} MiB (×{uss_ratio:.2f}, {uss_saved_per_trial:.0f} MiB "
              "less per trial). "
              + reading(saved_per_trial, uss_saved_per_trial, data_mb, ratio, uss_ratio))
    details = section(runs, search, trials, data, result)
    figures = {"dataset_mib": data_mb, "ratio_sum_peak_rss": ratio, "saved_per_trial_mib": saved_per_trial,
               "ratio_peak_sum_uss": uss_ratio,
               "uss_saved_per_trial_mib": uss_saved_per_trial, "zero_copy_torch_env_unset": zero_copy_env,
               "runs": {MODE_NAMES[m]: runs[m] for m in MODES}}
    return Outcome(measured=measured, holds=holds, figures=figures, details=details)


def run_modes(ctx: Context, numpy_data: Any, path: Path, val_size: int, trials: int,
              search: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """:func:`run_mode` for each of MODES, the dataset as torch tensors first, then as numpy arrays."""
    runs = {}
    for mode in MODES:
        data = as_torch(numpy_data) if mode == MODES[0] else numpy_data
        t0 = time.perf_counter()
        runs[mode] = search_run = run_mode(ctx, mode, data, path, val_size, trials, search)
        print(f"  {mode}: peak RSS per trial {[round(r['peak_rss_mb']) for r in search_run['trials']]} MiB, "
              f"sum {search_run['sum_peak_rss_mb']:.0f} MiB ({time.perf_counter() - t0:.0f} s)", flush=True)
        del data
    return runs


def reading(saved_per_trial: float, uss_saved_per_trial: float, data_mb: float, ratio: float,
            uss_ratio: float) -> str:
    """What the RSS and the private memory (USS) savings say together."""
    copies = saved_per_trial / data_mb
    if abs(uss_saved_per_trial - saved_per_trial) <= 0.25 * data_mb:
        return (f"RSS and private memory show the same saving, about {copies:.1f} × the dataset per trial: with "
                "torch tensors each trial holds a private copy that it deserialized from the store's bytes; with "
                "numpy arrays it reads the store's pages in place. Those pages are counted in every trial's RSS "
                "(not in its USS) but are one physical copy for the node, there in both modes; relative to the "
                f"whole, the saving is larger in private memory (×{uss_ratio:.2f}) than in RSS (×{ratio:.2f}), "
                "which also counts the libraries all trials share.")
    if uss_saved_per_trial > saved_per_trial:
        return ("RSS understates the saving: with numpy arrays a trial's RSS still counts the object store's "
                "pages of the dataset that it reads in place (one physical copy for the node, counted in every "
                "trial's RSS), which its private memory does not.")
    return "Private memory shows a smaller saving than RSS here."


def section(runs: dict[str, dict[str, Any]], search: dict[str, Any], trials: int, data: str, result: str) -> str:
    """The section's markdown: how the trials ran, ``data``, what each figure is, the tables, ``result``."""
    rows = []
    for mode in MODES:
        for i, t in enumerate(runs[mode]["trials"], 1):
            rows.append({"dataset in trials": mode, "trial": i, "static MMACs": f"{t['static_macs']:.2f}",
                         "peak RSS, getrusage (MiB)": t["peak_rss_mb"],
                         "peak RSS, sampled (MiB)": t["sampled_rss_mb"],
                         "peak PSS, sampled (MiB)": t["sampled_pss_mb"],
                         "peak private (USS), sampled (MiB)": t["sampled_uss_mb"]})
    sums = [{"dataset in trials": mode, "Σ peak RSS, getrusage (MiB)": runs[mode]["sum_peak_rss_mb"],
             "peak of Σ RSS, sampled": runs[mode]["sampled_peak_sum"]["rss"],
             "peak of Σ PSS, sampled": runs[mode]["sampled_peak_sum"]["pss"],
             "peak of Σ USS, sampled": runs[mode]["sampled_peak_sum"]["uss"],
             "dataset object in the store (MiB)": runs[mode]["object_store_mb"],
             "trials overlapped": "yes" if runs[mode]["overlap"] else "**no**"} for mode in MODES]
    return "\n".join([
        f"The same {trials} candidates (random search, seed {search['seed']}; width {search['width_mult']}, "
        f"resolution 32, {search['epochs']} epoch, batch {search['batch_size']}), run {trials} at once with one "
        "CPU each, through `tune.with_parameters(train_candidate, data=…)` as `aebnas.search.experiment.run` ships the "
        "dataset, twice in one run: first with every split of the Dataset turned into a torch tensor owning a "
        "copy of its array (`torch.from_numpy(arr.copy())`, as aebnas 0.1 shipped it), then with the Dataset "
        "as `load_dataset` returns it (uint8 / int64 numpy arrays). Each mode starts a fresh local Ray and its "
        "trials fresh actors (`reuse_actors=False`), so no process of one mode serves the other. "
        "`RAY_ENABLE_ZERO_COPY_TORCH_TENSORS` was unset (Ray's default: a tensor is pickled, so every trial "
        "deserializes its own copy). The networks are small, so that the dataset is a large part of a trial's "
        "memory and one epoch stays short.",
        "",
        data,
        "",
        "'getrusage' is the `peak_rss_mb` each trial reports (`resource.getrusage` of its worker process: its "
        "peak over the whole trial); Σ adds the trials' peaks. 'Sampled' figures were read by the driver "
        "every 0.25 s from `/proc/PID/smaps_rollup` of this run's trial processes (other Ray sessions on "
        "the machine excluded): RSS counts every resident page a process maps, shared ones too (libraries, and "
        "the object store's pages that a trial reads in place); PSS divides a shared page among the processes "
        "that map it; USS (private pages) is what a trial holds on its own. 'Peak of Σ' is the "
        "largest sum over the trials alive at one sample. 'Dataset object in the store' is the size of the "
        "serialized Dataset that `tune.with_parameters` puts in the object store (once per node, in both modes). "
        "Rows are the same candidate in both modes.",
        "",
        md_table(rows, 0), "",
        md_table(sums, 0), "",
        result,
    ])


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure_memory_per_trial, SETTINGS, QUICK))
