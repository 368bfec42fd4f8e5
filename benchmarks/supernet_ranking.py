"""Claims 14 and 25: ranking fidelity — does the supernet rank candidates as training them alone would?

For architectures spread over a supernet's space (smallest, largest, random),
the validation accuracy of the final classifier (a) as inherited (0 fine-tuning epochs),
(b) after 1 fine-tuning epoch, against (c) stand-alone training from scratch for each of
``standalone_epochs`` (15 and 40) epochs, twice with different seeds. Kendall τ between (a) and the
mean stand-alone accuracy, and the noise ceiling: τ between the two stand-alone seeds; the goal is
judged at the longest training, whose ranking is the least noisy. Two variants, each its own section
(``--variant``):

- ``cifar10_subset`` (claim 14, the default): the supernet shipped with the package, on the embedded
  CIFAR-10 subset it was trained on.
- ``fashion_mnist`` (claim 25): claim 14 at full size, on the supernet that ``tune_configs/fashion_mnist.py``
  trains (width 0.5, 28 and 32 px, 16 epochs on 54,000 images), scored on its 6,000 validation images, where
  one image is 0.017 points instead of 0.2 on the CIFAR-10 subset. The size this 2-core machine affords: the
  stand-alone networks (12 architectures × 2 seeds) and the 1-epoch fine-tunings train on 12,000 of the
  54,000 training images, drawn at random, for 3 epochs (36,000 images each, two thirds of an epoch of the
  full split). The 24 stand-alone trainings took about 12 minutes on 2 cores (two single-threaded at a
  time), the inherited and fine-tuned scores 2. With a GPU, raise ``train_size`` and the epochs. Needs that
  supernet: run ``python tune_configs/fashion_mnist.py`` from the repository root first.

Runs on CUDA when there is one (``device=auto``); on 2 CPU cores the stand-alone
trainings take several hours (about 8–15 s per epoch and network, two at a time; an H200 does it all in 9 minutes), so every accuracy measured is kept in
``results/benchmarks/<claim>/measured.json`` as soon as it is known, keyed by the network, the seed, the
epochs, the device, the data (the supernet's split, ``train_size``), a hash of the code that trains and scores
(the modules of ``TRAINING_CODE`` and nn/) and, for an inherited network, of the supernet file (a
stand-alone training does not depend on it): a killed run started again measures
only what is missing, and a change to that code measures everything again. Several trainings run at
once in spawned processes (``jobs``: 0 = up to 8 on a GPU, since one small network leaves a GPU idle; one per core,
single-threaded, on a CPU).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from harness import fashion_mnist
from harness.claims import Claim, Variant
from harness.common import Context, Outcome, main_with_variants, md_table

from aebnas.search.predictors import kendall_tau

CIFAR10_SUBSET = {"archs": 12, "standalone_epochs": (15, 40), "seeds": (0, 1), "batch_size": 64, "jobs": 0,
                  "supernet": "embedded", "train_size": None}
FASHION_MNIST = {"archs": 12, "standalone_epochs": (3,), "seeds": (0, 1), "batch_size": fashion_mnist.JOB.batch_size,
                 "jobs": 0, "supernet": str(fashion_mnist.SUPERNET), "train_size": 12_000}
VARIANTS = {
    "cifar10_subset": Variant(
        Claim(14, "supernet_ranking", "Ranking fidelity of inherited accuracy",
              "Kendall τ(inherited, stand-alone ≥ 15 epochs) ≥ 0.8 × τ(stand-alone seed 0, seed 1) over ≥ 12 "
              "architectures"),
        CIFAR10_SUBSET,
        quick={"archs": 3, "standalone_epochs": (1,), "seeds": (0, 1), "batch_size": 64, "jobs": 0,
               "supernet": "embedded", "train_size": None}),
    fashion_mnist.VARIANT: Variant(
        fashion_mnist.SUPERNET_RANKING, FASHION_MNIST,
        quick=dict(FASHION_MNIST, archs=3, standalone_epochs=(1,), train_size=500),
        needs=fashion_mnist.SUPERNET, missing=fashion_mnist.NO_SUPERNET),
}


def measure(ctx: Context, archs: int, standalone_epochs: Sequence[int], seeds: Sequence[int], batch_size: int,
            jobs: int, supernet: str = "embedded", train_size: int | None = None) -> Outcome:
    """``supernet``: its file ("embedded": the shipped one); the data is the split it was trained on.
    ``train_size``: train (stand-alone and fine-tuning) on that many images of its training split, drawn
    at random with a fixed seed, instead of all of them (a size the machine affords; None: all)."""
    from aebnas.training.loop import select_device
    from aebnas.training.supernet_file import EMBEDDED_SUPERNET, read_supernet_info

    supernet_file = EMBEDDED_SUPERNET if supernet == "embedded" else Path(supernet)
    device = select_device("auto")
    info = read_supernet_info(supernet_file)
    chosen = _architectures(info, archs)
    jobs, threads = _processes(jobs, device)
    store = AccuracyStore.open(ctx.scratch / "measured.json", batch_size, _code_id(info, train_size),
                               hashlib.sha256(supernet_file.read_bytes()).hexdigest(), str(device))
    # The stand-alone trainings first: the longest work, and it does not need the supernet's weights.
    wanted = [(arch, epochs, seed, False) for epochs in standalone_epochs for arch in chosen for seed in seeds]
    wanted += [(arch, 0, 0, True) for arch in chosen] + [(arch, 1, 0, True) for arch in chosen]
    missing = [job for job in wanted if store.key(*job) not in store.measured]
    store.kept["from the store"] = len(wanted) - len(missing)
    print(f"  {len(wanted)} accuracies, {store.kept['from the store']} already stored; measuring {len(missing)} "
          f"on {device} with {jobs} process(es)", flush=True)
    _measure_missing(store, missing, (str(device), batch_size, threads, str(supernet_file), train_size), jobs)
    rows = _accuracy_rows(store, chosen, standalone_epochs, seeds)
    taus = _taus(rows, standalone_epochs, seeds)
    return _outcome(rows, taus, store, info, supernet, supernet_file, standalone_epochs, seeds, batch_size,
                    device, jobs, train_size)


def _architectures(info: Any, archs: int) -> list[Any]:
    """``archs`` architectures of the supernet's space: the smallest, the largest and random ones (seed 1)."""
    from aebnas.config import largest_arch, random_arch, smallest_arch

    kw = {"width_mult": info.width_mult, "num_classes": info.num_classes, "in_channels": info.in_channels}
    rng = random.Random(1)
    chosen = [smallest_arch(info.space, **kw), largest_arch(info.space, **kw)]
    return chosen + [random_arch(info.space, rng, **kw) for _ in range(archs - 2)]


def _processes(jobs: int, device: Any) -> tuple[int, int]:
    """(trainings at once, torch threads of each)."""
    cores = os.cpu_count() or 1
    if jobs == 0:  # auto: a GPU is launch-bound and takes several trainings at once; on a CPU, one per core,
        # single-threaded, trains these small networks faster than one training on every core (on 2 cores,
        # 7.8 s against 11.2 s per network-epoch: a small network's operators parallelise poorly)
        jobs = min(8, max(1, cores // 2)) if device.type == "cuda" else cores
    return jobs, max(1, cores // jobs)


# The modules of aebnas/ (besides nn/) that train and score a network: the training loop, the batches, the data,
# the architecture and its value sets, the settings, the exit policy, the supernet and its file.
TRAINING_CODE = ("training/loop.py", "data/batches.py", "data/datasets.py", "config.py", "space_values.py",
                 "settings.py", "exit_policy.py", "training/supernet.py", "training/supernet_file.py")


def _code_id(info: Any, train_size: int | None) -> str:
    """What decides an accuracy besides the network: the code that trains and scores a network and the data
    (the supernet's split, train_size)."""
    code = hashlib.sha256(json.dumps([info.dataset, info.val_size, info.split_seed, train_size]).encode())
    package = Path(__file__).resolve().parents[1] / "aebnas"
    for f in sorted([*(package / n for n in TRAINING_CODE), *(package / "nn").glob("*.py")]):
        code.update(f.read_bytes())
    return code.hexdigest()


@dataclass
class AccuracyStore:
    """Every accuracy measured (``path``, rewritten whole after each), keyed by the network, the epochs, the
    seed, whether inherited, and what else decides it; ``kept``: how many came from the file, how many now."""

    path: Path
    batch_size: int
    code_id: str
    supernet_id: str  # for an inherited network only: a stand-alone training does not depend on it
    device: str
    measured: dict[str, float]
    kept: dict[str, int] = field(default_factory=lambda: {"from the store": 0, "now": 0})

    @classmethod
    def open(cls, path: Path, batch_size: int, code_id: str, supernet_id: str, device: str) -> AccuracyStore:
        measured = json.loads(path.read_text()) if path.is_file() else {}
        return cls(path, batch_size, code_id, supernet_id, device, measured)

    def key(self, arch: Any, epochs: int, seed: int, inherit: bool) -> str:
        return json.dumps([arch.to_flat(), epochs, seed, inherit, self.batch_size, self.code_id,
                           self.supernet_id if inherit else None, self.device], sort_keys=True)

    def val_accuracy(self, arch: Any, epochs: int, seed: int, inherit: bool) -> float:
        return self.measured[self.key(arch, epochs, seed, inherit)]

    def keep(self, job: tuple[Any, int, int, bool], accuracy: float, missing: int) -> None:
        self.measured[self.key(*job)] = accuracy
        self.kept["now"] += 1
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.measured))
        tmp.replace(self.path)
        print(f"  [{self.kept['now']}/{missing}] {'inherited' if job[3] else 'alone'}, {job[1]} epochs, "
              f"seed {job[2]}: {accuracy:.1f}", flush=True)


def _measure_missing(store: AccuracyStore, missing: list[tuple[Any, int, int, bool]], worker: tuple[Any, ...],
                     jobs: int) -> None:
    """Train and score the ``missing`` networks, ``jobs`` at a time in spawned processes (in this one when 1);
    ``worker``: :func:`_load_worker`'s arguments."""
    if jobs == 1:
        _load_worker(*worker)
        for job in missing:
            store.keep(job, _train_and_score(*job), len(missing))
    elif missing:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_load_worker,
                                 initargs=worker) as pool:
            futures = {pool.submit(_train_and_score, *job): job for job in missing}
            for future in as_completed(futures):
                store.keep(futures[future], future.result(), len(missing))


def _accuracy_rows(store: AccuracyStore, chosen: list[Any], standalone_epochs: Sequence[int],
                   seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per architecture: inherited, +1 epoch, and each stand-alone training and their mean."""
    rows: list[dict[str, Any]] = []
    for i, arch in enumerate(chosen):
        row = {"arch": i, "resolution": arch.resolution, "depths": "".join(str(s.depth) for s in arch.stages),
               "inherited": store.val_accuracy(arch, 0, 0, True), "+1 epoch": store.val_accuracy(arch, 1, 0, True)}
        for epochs in standalone_epochs:
            for seed in seeds:
                row[f"{epochs} ep s{seed}"] = store.val_accuracy(arch, epochs, seed, False)
            row[f"{epochs} ep mean"] = sum(row[f"{epochs} ep s{s}"] for s in seeds) / len(seeds)
        rows.append(row)
        print(f"  arch {i}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return rows


def _taus(rows: list[dict[str, Any]], standalone_epochs: Sequence[int],
          seeds: Sequence[int]) -> dict[int, dict[str, float]]:
    """Per stand-alone training: τ of inherited and +1 epoch against the seeds' mean, and the ceiling."""
    def col(name: str) -> list[float]:
        return [r[name] for r in rows]

    return {epochs: {"inherited": kendall_tau(col("inherited"), col(f"{epochs} ep mean")),
                     "+1 epoch": kendall_tau(col("+1 epoch"), col(f"{epochs} ep mean")),
                     "ceiling": kendall_tau(col(f"{epochs} ep s{seeds[0]}"), col(f"{epochs} ep s{seeds[1]}"))}
            for epochs in standalone_epochs}


def _outcome(rows: list[dict[str, Any]], taus: dict[int, dict[str, float]], store: AccuracyStore, info: Any,
             supernet: str, supernet_file: Path, standalone_epochs: Sequence[int], seeds: Sequence[int],
             batch_size: int, device: Any, jobs: int, train_size: int | None) -> Outcome:
    """The verdict (judged at the longest stand-alone training), the table line and the section."""
    from aebnas.data.datasets import DEFAULT_VAL_SIZE

    # The goal is judged against the longest stand-alone training: its ranking is the least noisy.
    last = taus[standalone_epochs[-1]]
    # A ceiling at or below 0: the stand-alone seeds do not agree on any order, so there is nothing to match.
    holds = (bool(last["inherited"] >= 0.8 * last["ceiling"]) if last["ceiling"] > 0
             else f"could not tell (ceiling τ {last['ceiling']:.2f}: the stand-alone seeds do not agree)")
    measured = "; ".join(f"alone {e} epochs: τ(inherited, alone) {t['inherited']:.2f}, τ(+1 epoch, alone) "
                         f"{t['+1 epoch']:.2f}, ceiling τ(alone seeds) {t['ceiling']:.2f}"
                         for e, t in taus.items()) + f" over {len(rows)} architectures"
    tau_rows = [{"stand-alone epochs": e, "τ(inherited, alone mean)": t["inherited"],
                 "τ(+1 epoch, alone mean)": t["+1 epoch"], f"ceiling τ(seed {seeds[0]}, seed {seeds[1]})": t["ceiling"],
                 "goal 0.8 × ceiling": 0.8 * t["ceiling"]} for e, t in taus.items()]
    n_val = info.val_size or DEFAULT_VAL_SIZE.get(info.dataset, 0)  # 0: unknown (an .npz of the default split)
    details = "\n".join([
        f"{len(rows)} architectures of the space of the {'shipped ' if supernet == 'embedded' else ''}supernet "
        f"`{supernet_file.name}` ({info.describe()}): the smallest, the largest "
        f"and {len(rows) - 2} random ones. Validation accuracy (%) of the final classifier, each network scored "
        f"as a trial scores it (BatchNorm recalibrated): inherited (0 epochs), inherited and fine-tuned 1 epoch, "
        f"and trained from scratch for {' and for '.join(map(str, standalone_epochs))} epochs (`N ep sK`: seed K) "
        f"(batch {batch_size}); device {device}, {jobs} training(s) at a time. "
        + ("Every training (stand-alone and fine-tuning) used all the supernet's training images."
           if train_size is None else
           f"Every training (stand-alone and fine-tuning) used {train_size:,} of the supernet's training images, "
           "drawn at random (seed 0): the size this machine affords; BatchNorm recalibration and validation "
           "are as a trial does them."), "",
        md_table(rows, 1), "",
        "Kendall τ-b against the mean of the two stand-alone seeds, and the noise ceiling (τ between the seeds):", "",
        md_table(tau_rows, 2), "",
        (f"With {n_val:,} validation images one image is {100 / n_val:.2g} points, so close accuracies swap places "
         "by chance" if n_val else "Close accuracies swap places by chance")
        + ("; the longer training separates the networks more, which is why the goal is judged against it."
           if len(standalone_epochs) > 1 else "."),
        f"{store.kept['now']} accuracies were measured in this run and {store.kept['from the store']} kept from an "
        "earlier run of the same command (same networks, seeds, epochs, supernet, code and device)."])
    return Outcome(measured, holds, {"rows": rows, "taus": taus}, details)


_WORKER: dict[str, Any] = {}


def _load_worker(device: str, batch_size: int, threads: int, supernet_file: str, train_size: int | None) -> None:
    """Load the supernet and the data once per process (a pool worker, or the benchmark itself); the
    process uses ``threads`` torch threads (several trainings share the host's cores)."""
    import torch

    from aebnas.data.datasets import load_dataset
    from aebnas.training.supernet_file import load_supernet

    torch.set_num_threads(threads)
    supernet, info = load_supernet(supernet_file, device)
    data = _training_subset(load_dataset(info.dataset, val_size=info.val_size, seed=info.split_seed), train_size)
    _WORKER.update(supernet=supernet, data=data, device=torch.device(device), batch_size=batch_size)


def _training_subset(data, train_size: int | None):
    """``data`` with ``train_size`` training images drawn at random (seed 0; they keep the file's order), or as is."""
    import dataclasses

    import numpy as np

    if train_size is None or train_size >= len(data.y_train):
        return data
    keep = np.sort(np.random.default_rng(0).permutation(len(data.y_train))[:train_size])
    return dataclasses.replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])


def _train_and_score(arch, epochs: int, seed: int, inherit: bool) -> float:
    """Validation accuracy (%) of the final classifier: inherited and fine-tuned ``epochs``, or trained alone."""
    from aebnas.nn import extract
    from aebnas.settings import TrialSettings
    from aebnas.training.loop import CandidateTraining

    w = _WORKER
    settings = TrialSettings(epochs=epochs, batch_size=w["batch_size"], seed=seed, supernet="x" if inherit else None)
    run = CandidateTraining(arch, settings, w["data"], w["device"],
                            model=extract(w["supernet"], arch) if inherit else None)
    for _ in range(epochs):
        run.train_epoch()
    return float(run.evaluate(("val",))["val"].exit_accuracy()[-1])


if __name__ == "__main__":
    sys.exit(main_with_variants(VARIANTS, measure))
