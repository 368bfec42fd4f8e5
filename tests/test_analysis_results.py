"""analysis/results.py: experiment directories of real Ray Tune runs → DataFrames, statuses."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from aebnas.config import is_arch_key
from aebnas.settings import EXPERIMENT_FILE
from aebnas.search.storage import write_experiment_settings
from analysis.results import (NotAnExperimentError, count_failures, dedupe_epochs, first_error_line,
                              load_experiment, load_experiments, trial_status)

REPO = Path(__file__).resolve().parents[1]
# What Ray 2.60 wrote to error.txt when a trial's worker process was SIGKILLed (abridged).
ACTOR_DIED = """Failure # 1 (occurred at 2026-11-25_17-03-38)
The actor died unexpectedly before finishing this task.
\tclass_name: ImplicitFunc
\tpid: 15997
The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR
"""
TRIAL_ERROR = """Failure # 1 (occurred at 2026-11-25_17-10-02)
ray::ImplicitFunc.train() (pid=1, ip=192.0.2.2, actor_id=ab, repr=train_candidate)
  File "/work/main/aebnas/search/trainable.py", line 160, in train_candidate
    raise _fail(trial_dir, f"candidate cannot be built: {exc}") from exc
aebnas.search.trainable.TrialError: candidate cannot be built: exit2_m1_kernel=4 is not one of (3, 5)

Failure # 2 (occurred at 2026-11-25_17-10-04)
aebnas.search.trainable.TrialError: candidate cannot be built: exit2_m1_kernel=4 is not one of (3, 5) (failed before; not retried)
"""


def _lines(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]


# ------------------------------------------------------------------ pure rules
@pytest.mark.parametrize("ray_status, run, epochs, kw, expected", [
    ("TERMINATED", 3, 3, {}, "finished"),
    ("TERMINATED", 1, 3, {}, "stopped"),              # ASHA leaves no mark: fewer epochs than configured
    ("ERROR", 1, 3, {}, "errored"),
    ("RUNNING", 1, 3, {"failures": 1, "max_failures": 0}, "errored"),  # the state lags behind error.txt
    ("RUNNING", 1, 3, {"failures": 1, "max_failures": 2}, "running"),  # failed once, being retried
    ("PENDING", 0, 3, {"deterministic_failure": True}, "errored"),     # failure.json: every retry fails
    ("RUNNING", 2, 3, {}, "running"),
    ("RUNNING", 3, 3, {}, "finished"),                # driver killed after the last report
    ("PENDING", 0, 3, {}, "pending"),
    ("PAUSED", 0, 3, {}, "pending"),
    ("PENDING", 2, 3, {}, "running"),                 # resumed, waiting to continue; or a state that lags
    (None, 1, 3, {}, "running"),                      # not in the state yet: the files decide
    (None, 0, 3, {}, "pending"),
    ("TERMINATED", 3, 3, {"failures": 1}, "finished"),  # recovered from a failure
    ("TERMINATED", 0, 0, {"reported": True}, "finished"),  # inherited weights scored once, as epoch 0
    ("RUNNING", 0, 0, {}, "running"),                 # epochs=0 and nothing reported yet
])
def test_trial_status(ray_status, run, epochs, kw, expected):
    assert trial_status(ray_status, run, epochs, **kw) == expected


def test_error_lines_and_failure_counts():
    assert first_error_line(ACTOR_DIED) == "The actor died unexpectedly before finishing this task."
    assert first_error_line(TRIAL_ERROR) == ("aebnas.search.trainable.TrialError: candidate cannot be built: "
                                             "exit2_m1_kernel=4 is not one of (3, 5) (failed before; not retried)")
    assert count_failures(ACTOR_DIED) == 1 and count_failures(TRIAL_ERROR) == 2 and count_failures("") == 0
    # A search resumed at 17-10-03 retried the trial: only its failures since then count.
    assert count_failures(TRIAL_ERROR, since="2026-11-25_17-10-03") == 1
    assert count_failures(TRIAL_ERROR, since="2026-11-25_18-00-00") == 0


def test_resumed_epochs_keep_the_last_report():
    lines = [{"epoch": 1, "score": 1}, {"epoch": 2, "score": 2}, {"epoch": 2, "score": 2.5}, {"epoch": 3, "score": 3}]
    assert dedupe_epochs(lines) == [{"epoch": 1, "score": 1}, {"epoch": 2, "score": 2.5}, {"epoch": 3, "score": 3}]


# ------------------------------------------------------------------ a real finished search
def test_finished_search_loads_every_trial(tiny_search):
    path, grid, exp = tiny_search
    res = load_experiment(path)
    t = res.trials
    assert len(t) == exp.num_samples == len(list(path.glob("trial_*")))
    assert set(t["experiment"]) == {path.name}
    assert list(t["status"]) == ["finished"] * exp.num_samples
    assert list(t["epochs_run"]) == [exp.epochs] * exp.num_samples and list(t["epochs"]) == [exp.epochs] * 4
    assert t["error"].isna().all()
    for _, row in t.iterrows():
        trial_dir = path / f"trial_{row['trial_id']}"
        lines = _lines(trial_dir)
        last = lines[-1]
        for key in ("score", "accuracy", "avg_macs", "final_accuracy", "static_macs", "test_accuracy",
                    "test_avg_macs", "thresholds", "num_exits", "oracle_accuracy", "oracle_macs", "target_macs"):
            assert row[key] == last[key], key
        for key in (k for k in last if k.startswith("exit") and k[4].isdigit()):
            assert row[key] == last[key], key
        arch = json.loads((trial_dir / "arch.json").read_text())
        assert {k: row[k] for k in arch if is_arch_key(k)} == {k: v for k, v in arch.items() if is_arch_key(k)}
        assert row["exit_positions"] == ",".join(str(i) for i in range(1, 5) if arch.get(f"exit{i}_enabled"))
        assert row["trial_dir"] == str(trial_dir)
        assert row["exit_outputs"] == str(trial_dir / "exit_outputs.npz")
        assert row["checkpoint"] == str(trial_dir / f"checkpoint_{exp.epochs - 1:06d}")
        hist = res.history[res.history["trial_id"] == row["trial_id"]]
        assert list(hist["epoch"]) == [line["epoch"] for line in lines]
        assert list(hist["score"]) == [line["score"] for line in lines]
    assert set(t["trial_id"]) == {r.metrics["trial_id"] for r in grid}


def test_storage_uri_loads_like_a_path(tiny_search):
    path = tiny_search[0]
    local, uri = load_experiment(path), load_experiment(f"file://{path}")
    assert uri.trials["exit_outputs"].str.startswith("file:///").all()
    cols = ["trial_id", "status", "epochs_run", "score", "avg_macs", "test_accuracy"]
    pd.testing.assert_frame_equal(local.trials[cols], uri.trials[cols])


def test_default_target_from_the_settings_under_a_uri(tiny_search, tmp_path):
    """With no --target-macs, analysis works at the experiment's own target, read from the settings
    file that aebnas.search.experiment writes under a storage URI (the same pyarrow.fs layer both ways)."""
    from analysis.__main__ import _target, main

    path, _, exp = tiny_search
    copy = tmp_path / path.name
    shutil.copytree(path, copy)
    (copy / EXPERIMENT_FILE).unlink()
    uri = f"file://{copy}"
    write_experiment_settings(uri, exp)
    res = load_experiment(uri)
    assert res.settings[path.name] == exp.to_json()
    assert _target(res, None, None) == exp.target_macs
    res.trials = res.trials.drop(columns="target_macs")  # the settings alone decide
    assert _target(res, None, None) == exp.target_macs
    out = tmp_path / "out"
    assert main([uri, "--out", str(out)]) == 0
    assert (pd.read_csv(out / "trials.csv")["at_target_target_macs"] == exp.target_macs).all()


def test_several_experiments_in_one_frame(tiny_search, tmp_path):
    path = tiny_search[0]
    twin = tmp_path / "other" / path.name  # same base name: told apart by the parent
    shutil.copytree(path, twin)
    res = load_experiments([path, twin])
    assert len(res.trials) == 8 and res.trials["experiment"].nunique() == 2
    assert set(res.trials["experiment"]) == {f"{path.parent.name}/{path.name}", f"other/{path.name}"}
    assert set(res.settings) == set(res.trials["experiment"])
    trial_id = res.trials["trial_id"].iloc[0]
    with pytest.raises(KeyError, match="ambiguous"):
        res.trial(trial_id)  # the copy has the same ids
    assert res.trial(trial_id, experiment=f"other/{path.name}")["trial_dir"] == str(twin / f"trial_{trial_id}")
    assert res.trial(f"other/{path.name}/trial_{trial_id}")["trial_dir"] == str(twin / f"trial_{trial_id}")


def test_not_an_experiment(tmp_path):
    with pytest.raises(NotAnExperimentError, match="no such directory"):
        load_experiment(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(NotAnExperimentError, match="not an experiment directory"):
        load_experiment(tmp_path)


def test_labels_from_files_when_the_state_is_missing(tiny_search, tmp_path):
    """A driver killed before Ray saved its state: the files alone label the trials."""
    exp_dir = tmp_path / "killed"
    shutil.copytree(tiny_search[0], exp_dir)
    for state in exp_dir.glob("experiment_state-*.json"):
        state.unlink()
    trials = sorted(exp_dir.glob("trial_*"))
    for trial in trials[:2]:  # both reported one epoch: one was killed, one diverged in its second
        cut = trial / "result.json"
        cut.write_text(cut.read_text().splitlines()[0] + "\n")
    (trials[1] / "failure.json").write_text(json.dumps({"error": "epoch 2: loss is nan", "permanent": True, "time": 0}))
    res = load_experiment(exp_dir)
    status = dict(zip(res.trials["trial_id"], res.trials["status"]))
    ids = [d.name[len("trial_"):] for d in trials]
    assert [status[i] for i in ids] == ["running", "errored", "finished", "finished"]
    row = res.trial(ids[1])
    assert row["error"] == "epoch 2: loss is nan"
    assert res.trial(ids[0])["epochs_run"] == 1
    assert res.trial(f"trial_{ids[2]}")["trial_id"] == res.trial(ids[2][-5:])["trial_id"] == ids[2]
    with pytest.raises(KeyError, match="no trial 'nobody'; trials are"):
        res.trial("nobody")


# ------------------------------------------------------------------ a real partial search
PARTIAL_DRIVER = """
import sys
import ray
from aebnas.search.experiment import Experiment
from aebnas.search.tuner import run
# One CPU: trials run one at a time, and Ray Tune creates all four at the start (a searcher's
# max_concurrent=1 would create each only when the one before ends, so the last could be missing).
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
run(Experiment(dataset=sys.argv[2], val_size=100, space_kwargs={"resolutions": (32,)}, width_mult=0.25,
               target_macs=1.0, epochs=4, num_samples=4, scheduler="fifo", batch_size=64,
               max_failures=0, storage_path=sys.argv[1], name="partial", verbose=0))
"""


def _epochs(trial_dir: Path) -> list[dict]:
    try:
        return _lines(trial_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _trials_in_state(exp_dir: Path) -> int:
    """How many trials Ray Tune's newest experiment state lists (0 before it is first saved)."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    try:
        return len(json.loads(states[-1].read_text())["trial_data"]) if states else 0
    except (json.JSONDecodeError, KeyError):
        return 0  # being rewritten


def _progress(exp_dir: Path) -> tuple[dict[str, list[dict]], set[str]]:
    """Result lines per trial id, and the ids of trials with an error.txt, as storage holds them now."""
    runs = {d.name[len("trial_"):]: _epochs(d) for d in exp_dir.glob("trial_*")}
    return runs, {f.parent.name[len("trial_"):] for f in exp_dir.glob("trial_*/error.txt")}


@pytest.fixture(scope="module")
def partial_search(small_npz, tmp_path_factory):
    """A real search left partial: a trial's worker SIGKILLed (it errors: max_failures=0), then the
    driver SIGKILLed while a later trial runs and once Ray Tune's saved state lists all four trials
    (so the one not started yet is in it). Returns (path, errored ids, running ids), read from the
    files once the driver is dead (nothing changes them any more)."""
    root = tmp_path_factory.mktemp("partial")
    exp_dir = root / "partial"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen([sys.executable, "-c", PARTIAL_DRIVER, str(root), str(small_npz)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline, killed_worker, ready = time.time() + 300, False, False  # a guard: each step waits for progress
    try:
        while time.time() < deadline and not ready:
            assert proc.poll() is None, proc.stdout.read()
            runs, errored = _progress(exp_dir)
            midway = [i for i, e in runs.items() if e and e[-1]["epoch"] < 4 and i not in errored]
            if not killed_worker and midway and any(e and e[-1]["epoch"] == 4 for e in runs.values()):
                os.kill(runs[midway[0]][-1]["pid"], signal.SIGKILL)  # the worker running that trial
                killed_worker = True
            ready = bool(errored) and bool(midway) and _trials_in_state(exp_dir) == 4
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait(timeout=30)
    runs, errored = _progress(exp_dir)
    running = {i for i, e in runs.items() if e and e[-1]["epoch"] < 4 and i not in errored}
    if not (errored and running):
        pytest.fail(f"the partial search did not reach the expected state: {runs}, errored {errored}")
    return exp_dir, errored, running


@pytest.mark.slow
def test_partial_search_is_labelled(partial_search):
    path, errored, running = partial_search
    res = load_experiment(path)
    status = dict(zip(res.trials["trial_id"], res.trials["status"]))
    assert {status[i] for i in errored} == {"errored"} and {status[i] for i in running} == {"running"}
    assert "finished" in status.values()
    assert set(status.values()) <= {"finished", "errored", "running", "pending"}
    assert len(status) == 4  # trials not started yet are listed as pending
    for i in errored:
        assert res.trial(i)["error"] == "The actor died unexpectedly before finishing this task."
    for i in running:
        assert res.trial(i)["epochs_run"] >= 1 and pd.isna(res.trial(i)["error"])
    pending = res.trials[res.trials["status"] == "pending"]
    assert (pending["epochs_run"] == 0).all() and pending["accuracy"].isna().all()


@pytest.mark.slow
def test_partial_search_analysis_cli(partial_search, tmp_path):
    from analysis.__main__ import main

    assert main([str(partial_search[0]), "--out", str(tmp_path)]) == 0
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert "errored" in set(trials["status"]) and "running" in set(trials["status"])
    assert "errored" in (tmp_path / "summary.md").read_text()
