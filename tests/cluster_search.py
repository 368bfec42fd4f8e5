"""A tiny aebnas search on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``).

The tests call :func:`run_cluster_search`, which runs this file in a child process (see
tests/ray_sandbox.py for why):

    python tests/cluster_search.py SPEC.json OUT.json

SPEC holds ``experiment`` (keyword arguments of ``aebnas.search.experiment.Experiment``),
``workers`` (worker nodes besides the head; every node has one CPU) and
``remove_worker``: when true, the worker node is removed in the middle of the search —
as soon as one trial has finished and a trial running on the worker has reported an epoch
(and so written a checkpoint) without finishing. OUT receives the node ids, what the
trials had reported when the worker was removed, and each trial's final error.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

TINY_EXPERIMENT = {"val_size": 100, "space_kwargs": {"resolutions": [32]}, "width_mult": 0.25, "target_macs": 1.0,
                   "epochs": 1, "num_samples": 2, "scheduler": "fifo", "batch_size": 64, "name": "cluster",
                   "verbose": 0}


# ------------------------------------------------------------------ used by the tests
def run_cluster_search(box: Any, tmp_path: Path, dataset: Path, timeout: float = 300, **spec: Any) -> dict:
    """Run this script in ``box`` (a RaySandbox) on a tiny search of ``dataset`` with results in
    ``tmp_path``; ``spec["experiment"]`` changes TINY_EXPERIMENT. Returns what the script wrote."""
    experiment = {**TINY_EXPERIMENT, "dataset": str(dataset), "storage_path": str(tmp_path),
                  **spec.pop("experiment", {})}
    (tmp_path / "spec.json").write_text(json.dumps({"experiment": experiment, **spec}))
    out = tmp_path / "out.json"
    code = box.run([sys.executable, __file__, str(tmp_path / "spec.json"), str(out)], "cluster.log", timeout=timeout)
    assert code == 0 and out.exists(), box.log("cluster.log")[-4000:]
    return json.loads(out.read_text())


def trial_history(trial_dir: Path) -> list[dict]:
    """The results in the trial's result.json so far (a line being written is left out)."""
    path = trial_dir / "result.json"
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def results_by_trial(exp_dir: Path) -> dict[str, list[dict]]:
    return {d.name: trial_history(d) for d in sorted(exp_dir.glob("trial_*"))}


# ------------------------------------------------------------------ the child process
def remove_worker_mid_trial(cluster: Any, worker: Any, exp_dir: Path, epochs: int, stop: threading.Event,
                            removed: dict) -> None:
    try:
        _remove_worker_mid_trial(cluster, worker, exp_dir, epochs, stop, removed)
    except Exception as exc:  # reported in OUT: a thread's exception would go unseen
        removed["watcher_error"] = repr(exc)


def _remove_worker_mid_trial(cluster: Any, worker: Any, exp_dir: Path, epochs: int, stop: threading.Event,
                             removed: dict) -> None:
    while not stop.is_set():
        history = {name: [(r["epoch"], r["node_id"]) for r in rows] for name, rows in results_by_trial(exp_dir).items()}
        removed["last_seen"] = history  # tells why, if the worker is never removed
        finished = [n for n, h in history.items() if h and h[-1][0] == epochs]
        running_on_worker = [n for n, h in history.items() if h and h[-1][0] < epochs and h[-1][1] == worker.node_id]
        if finished and running_on_worker:
            cluster.remove_node(worker, allow_graceful=False)
            removed.update(history=history, finished=finished, on_worker=running_on_worker)
            del removed["last_seen"]
            return
        time.sleep(0.05)


def main(spec_path: str, out_path: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from aebnas.search.experiment import Experiment, experiment_path
    from aebnas.search.tuner import run

    spec = json.loads(Path(spec_path).read_text())
    exp = Experiment(**spec["experiment"])
    if spec.get("remove_worker"):
        # The driver copies result.json to the storage path when it saves its experiment
        # state (by default every ~10 s); the watcher reads it there, so save every second.
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "1"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(spec.get("workers", 1))]
        cluster.wait_for_nodes(timeout=120)  # nodes start slowly on a busy machine
        ray.init(address=cluster.address, log_to_driver=False)
        removed: dict = {}
        stop = threading.Event()
        watcher = threading.Thread(target=remove_worker_mid_trial, daemon=True,
                                   args=(cluster, workers[0], Path(experiment_path(exp)), exp.epochs, stop, removed))
        if spec.get("remove_worker"):
            watcher.start()
        results = run(exp)  # joins the Ray connected above
        stop.set()
        if watcher.is_alive():
            watcher.join()
        out = {"head": cluster.head_node.node_id, "workers": [w.node_id for w in workers], "removed": removed or None,
               "num_errors": results.num_errors,
               "errors": {Path(r.path).name: str(r.error) for r in results if r.error}}
        Path(out_path).write_text(json.dumps(out, indent=1))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
