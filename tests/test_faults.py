"""Faults a search survives, on real Ray: a node dies, the driver is killed, trials fail.

- A worker node removed mid-search: its trial is retried from its checkpoint on the
  remaining node; finished trials are kept as they were (tests/cluster_search.py).
- The driver SIGKILLed mid-search: ``--resume`` finishes the search from Ray's last
  experiment snapshot; finished trials are not run again.
- Bad trials (NaN loss, a candidate that cannot be built, out of memory) end errored with
  one clear message while the other trials finish. The candidate's own failures are
  permanent, so Ray's retries (``FailureConfig(max_failures)``) end at once instead of
  training again; out of memory is not the candidate's fault (a neighbour may hold the
  memory), so it is retried.
"""

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from aebnas.config import largest_arch
from analysis.results import load_experiment
from cluster_search import results_by_trial, run_cluster_search
from ray_sandbox import quickstart_argv, ray_sandbox  # noqa: F401  (fixture)

EPOCHS = 3


def _epochs(trial_dir: Path) -> list[int]:
    f = trial_dir / "result.json"
    return [json.loads(line)["epoch"] for line in f.read_text().splitlines()] if f.exists() else []


def _snapshot(exp_dir: Path) -> dict[str, tuple[str, int]]:
    """Ray Tune's last saved experiment state: trial dir name → (status, last epoch reported)."""
    files = sorted(exp_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
    except (json.JSONDecodeError, OSError):  # being written
        return {}
    trials = {}
    for trial_json, runtime_json in state["trial_data"]:
        trial, runtime = json.loads(trial_json), json.loads(runtime_json)
        trials[trial["relative_logdir"]] = (trial["status"], runtime["last_result"].get("epoch", 0))
    return trials


@pytest.mark.slow
def test_worker_node_dies_mid_search(ray_sandbox, tmp_path, small_npz):  # noqa: F811
    """Remove a worker node while a trial runs on it: Ray retries that trial from its checkpoint
    on the head (FailureConfig(max_failures=2)); every trial finishes; finished ones are untouched."""
    # Enough epochs that a trial is seen part-way: the watcher reads results synced once a second, and
    # two epochs of this tiny search once fitted in one sync (the worker was never removed).
    epochs = 6
    out = run_cluster_search(ray_sandbox, tmp_path, small_npz, remove_worker=True,
                             experiment={"epochs": epochs, "num_samples": 4, "max_failures": 2})
    head, (worker,) = out["head"], out["workers"]
    removed = out["removed"]
    assert removed and "history" in removed, f"the worker was not removed mid-trial: {out}"
    assert out["num_errors"] == 0, out["errors"]
    after = {name: [(r["epoch"], r["node_id"]) for r in rows]
             for name, rows in results_by_trial(tmp_path / "cluster").items()}
    assert len(after) == 4 and all(h[-1][0] == epochs for h in after.values()), after  # every trial accounted for
    for name in removed["finished"]:
        assert after[name] == [tuple(r) for r in removed["history"][name]], name  # not lost, not rerun
    (moved,) = removed["on_worker"]
    # its first epochs on the worker, then (no epoch repeated) the rest on the head, from the last checkpoint
    assert [e for e, _ in after[moved]] == list(range(1, epochs + 1)), after[moved]
    nodes = [node for _, node in after[moved]]
    first_on_head = nodes.index(head)
    assert first_on_head >= 1 and set(nodes[:first_on_head]) == {worker} and set(nodes[first_on_head:]) == {head}
    trial_dir = tmp_path / "cluster" / moved
    assert "Failure # 1" in (trial_dir / "error.txt").read_text()  # Ray recorded the lost node …
    assert not (trial_dir / "failure.json").exists()  # … which is not the trial's fault: retried
    assert set(load_experiment(tmp_path / "cluster").trials["status"]) == {"finished"}


@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_finished_trials(ray_sandbox, small_npz, tmp_path):  # noqa: F811
    """SIGKILL the driver (no chance to save anything); --resume finishes the search from Ray's snapshot."""
    args = quickstart_argv(small_npz, tmp_path, "killed", "--epochs", str(EPOCHS), "--num-samples", "3",
                           "--max-concurrent", "1", "--scheduler", "fifo")
    exp_dir = tmp_path / "killed"
    driver = ray_sandbox.spawn(args, "driver.log")
    deadline = time.time() + 300
    # Kill once Ray's experiment snapshot (saved every ~10 s, and on every 2nd checkpoint
    # of a trial) records a finished trial and a running one with a checkpoint: that
    # snapshot is what a resume starts from.
    while True:
        snap = _snapshot(exp_dir)
        if any(s == "TERMINATED" for s, _ in snap.values()) and \
                any(s == "RUNNING" and 0 < e < EPOCHS for s, e in snap.values()):
            break
        assert driver.poll() is None, ray_sandbox.log("driver.log")[-4000:]
        assert time.time() < deadline, f"the search made no progress: {snap}"
        time.sleep(0.1)
    ray_processes = ray_sandbox.leftovers()  # the driver's local Ray: GCS, raylet, trial workers
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    before = {d.name: _epochs(d) for d in exp_dir.glob("trial_*")}
    partial = load_experiment(exp_dir).trials.set_index("trial_id")["status"]  # analysis reads a killed search
    for name, (status, epoch) in snap.items():
        if status == "TERMINATED":
            assert partial[name.removeprefix("trial_")] == "finished"
    assert "running" in set(partial)
    assert len(ray_processes) > 2
    # On Linux Ray ties the processes of a local cluster to the driver that started it, so
    # they end with it (measured: none left after 2 s); whatever is left is killed here.
    ray_sandbox.wait_until_gone(timeout=10)
    ray_sandbox.kill_leftovers()
    assert not ray_sandbox.leftovers()

    assert ray_sandbox.run(args + ["--resume"], "resume.log", timeout=300) == 0, ray_sandbox.log("resume.log")
    assert not ray_sandbox.wait_until_gone(timeout=10)  # a driver that ends normally stops its local Ray
    after = {d.name: _epochs(d) for d in exp_dir.glob("trial_*")}
    assert len(after) == 3 and all(e and e[-1] == EPOCHS for e in after.values()), after
    assert set(load_experiment(exp_dir).trials["status"]) == {"finished"}
    for name, (status, epoch) in snap.items():
        if status == "TERMINATED":
            assert after[name] == before[name] == list(range(1, EPOCHS + 1)), name  # not run again
        elif epoch:
            # kept its history and went on from the checkpoint of `epoch`, not from scratch
            assert after[name][:len(before[name])] == before[name]
            assert after[name][len(before[name]):] == list(range(epoch + 1, EPOCHS + 1)), (name, before, after)


# ------------------------------------------------------------------ bad trials
MEMORY_ALLOWANCE = 512 * 2**20  # bytes a trial may allocate on top of what its process holds


def _vm_data() -> int:
    """Bytes of this process's data segment (what RLIMIT_DATA limits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


def train_with_memory_allowance(config, data):
    """``train_candidate`` in a process whose memory may grow by at most MEMORY_ALLOWANCE bytes.

    Stands for a node with little memory left (a GPU's memory, a small machine) without
    filling this shared machine's RAM: under RLIMIT_DATA an allocation past the allowance
    fails at once, as one past a GPU's memory does. The limit is lifted afterwards because
    Ray reuses the process for the next trial.
    """
    import resource

    import torch

    from aebnas.search.trainable import train_candidate

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    held = _vm_data()
    resource.setrlimit(resource.RLIMIT_DATA, (held + MEMORY_ALLOWANCE, hard))
    try:
        # Memory the allocator already holds and has free is usable on top of the allowance,
        # so a trial can use at most held + allowance; no single block can be larger, and
        # asking for one (not touched, so it costs no RAM) proves the limit is in force.
        try:
            torch.empty(held + MEMORY_ALLOWANCE + 1, dtype=torch.uint8)
        except RuntimeError:
            pass
        else:
            raise AssertionError("RLIMIT_DATA does not limit allocations on this system")
        train_candidate(config, data)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


# One trial per point (Ray Tune's points_to_evaluate); the rest of each config is sampled.
DIVERGES = {"lr": 1e12}
CANNOT_BUILD = {"exit1_enabled": True, "exit1_m1_kernel": 4}
# The largest architecture at twice the width, 96 px, the whole training set in one batch:
# measured, it needs more than 3.5 GB in its first epoch.
TOO_BIG = {**largest_arch(width_mult=2.0, resolution=96).to_flat(), "batch_size": 512}
BAD_POINTS = {"diverges": DIVERGES, "cannot_build": CANNOT_BUILD, "too_big": TOO_BIG}


def test_bad_trials_end_errored_and_the_search_goes_on(ray_local, small_npz, tmp_path, monkeypatch):
    """Four trials through aebnas.search.tuner.run: one normal, one that diverges, one that cannot be
    built, one out of memory. Only the search algorithm (to pick the four configs) and the
    trainable (to cap its memory) are swapped; Ray is real."""
    import ray.cloudpickle
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from aebnas.search import experiment, tuner
    from conftest import tiny_experiment

    points = [{}, *BAD_POINTS.values()]  # a sampled candidate, then the three bad ones
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    monkeypatch.setattr(tuner, "train_candidate", train_with_memory_allowance)
    monkeypatch.setattr(tuner, "make_search_alg",
                        lambda exp, *_: BasicVariantGenerator(points_to_evaluate=points, random_state=exp.seed))
    exp = tiny_experiment(tmp_path, small_npz, name="bad", epochs=1, num_samples=len(points), max_failures=1,
                          cpus_per_trial=0.5)  # all four at once on the 2 CPUs
    results = tuner.run(exp)

    assert len(results) == 4 and results.num_errors == 3
    by_case = {}
    for r in results:
        case = next((name for name, p in BAD_POINTS.items() if all(r.config.get(k) == v for k, v in p.items())),
                    "good")
        by_case[case] = r
    assert by_case["good"].error is None and by_case["good"].metrics["epoch"] == 1
    expected = {
        "diverges": "CandidateFailure: epoch 1: training loss is nan at batch 1 (diverged; try a lower lr)",
        "cannot_build": "CandidateFailure: candidate cannot be built: exit1_m1_kernel=4 is not one of",
        "too_big": "TrialError: epoch 1: out of memory (RuntimeError: [enforce fail",
    }
    for case, message in expected.items():
        error = str(by_case[case].error)
        assert message in error, (case, error)
        error_txt = (Path(by_case[case].path) / "error.txt").read_text()
        assert "Failure # 2" in error_txt and message in error_txt
        # Ray retried the trial (max_failures=1): a permanent failure stops the retry at once,
        # out of memory is tried again (and here runs out of memory again).
        permanent = case != "too_big"
        assert ("(failed before; not retried)" in error) == permanent, (case, error)
        assert (Path(by_case[case].path) / "failure.json").exists() == permanent, case
    assert "lower batch_size or resolution" in str(by_case["too_big"].error)

    trials = load_experiment(Path(experiment.experiment_path(exp))).trials.set_index("trial_id")
    for case, r in by_case.items():
        row = trials.loc[r.metrics.get("trial_id") or Path(r.path).name.removeprefix("trial_")]
        assert row["status"] == ("finished" if case == "good" else "errored"), (case, row["status"])
        if case != "good":
            assert expected[case].split(": ", 1)[1] in row["error"], (case, row["error"])


@pytest.mark.slow
def test_deterministic_failure_is_not_retried_after_resume(ray_sandbox, small_npz, tmp_path):  # noqa: F811
    """A resumed search runs in a new Ray session, so each trial in a new working directory (as
    a retry on another node does); the failure record kept in storage_path still stops the
    diverged candidate at once instead of training it again."""
    args = quickstart_argv(small_npz, tmp_path, "nan", "--num-samples", "1", "--lr", "1e12")
    assert ray_sandbox.run(args, "first.log", timeout=300) == 1  # every trial errored
    assert ray_sandbox.run(args + ["--resume"], "resume.log", timeout=300) == 1
    (trial_dir,) = (tmp_path / "nan").glob("trial_*")
    last_failure = (trial_dir / "error.txt").read_text()
    assert "Failure # 4" in last_failure  # 1 + max_failures=2 attempts, then the resumed one
    assert "training loss is nan at batch 1 (diverged; try a lower lr) (failed before; not retried)" \
        in last_failure
