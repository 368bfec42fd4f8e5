"""Experiment: settings refused before Ray starts, the search algorithms, interrupt and resume,
resources per trial, storage URIs."""

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd

from search_spaces import SPACES

from aebnas.cluster import describe_resources, trial_resources
from aebnas.errors import ExperimentError
from aebnas.search.experiment import Experiment, experiment_path
from aebnas.search.flags import FLAGS, RESOLUTIONS, add_arguments, experiment_from_args
from aebnas.settings import EXPERIMENT_FILE, LATENCY_BACKENDS
from aebnas.search.storage import read_experiment_settings
from aebnas.search.tuner import run
from conftest import tiny_experiment

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("change, message", [
    ({"target_macs": 0}, "target_macs=0 must be > 0"),
    ({"epochs": 0}, "epochs=0 must be an integer ≥ 1"),
    ({"space": "nope"}, "space='nope' is not one of"),
    ({"search_alg": "grid"}, "search_alg='grid' is not one of"),
    ({"scheduler": "pbt"}, "scheduler='pbt' is not one of"),
    ({"grace_period": 9, "epochs": 3}, "grace_period=9 must be ≤ epochs (3)"),
    ({"space_kwargs": {"kernels": (4,)}}, "kernels contains 4"),
    ({"confidence": "vibes"}, "confidence='vibes' is not one of"),
    ({"time_budget_s": 0}, "time_budget_s=0 must be > 0 seconds"),
])
def test_bad_settings_are_refused_before_ray(change, message):
    with pytest.raises(ExperimentError) as err:
        Experiment(**change).validate()
    assert message in str(err.value)


def test_optuna_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # makes `import optuna` raise ImportError
    with pytest.raises(ExperimentError, match=r"pip install 'aebnas\[optuna\]'"):
        Experiment(search_alg="nsga2").validate()


def test_pymoo_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymoo", None)
    with pytest.raises(ExperimentError, match=r"pip install 'aebnas\[surrogate\]'"):
        Experiment(search_alg="surrogate").validate()
    with pytest.raises(ExperimentError, match="surrogate_batch=0 must be an integer ≥ 1"):
        Experiment(surrogate_batch=0).validate()


@pytest.mark.parametrize("alg", ["nsga2", pytest.param("tpe", marks=pytest.mark.slow)])  # one Optuna run by default
def test_optuna_searchers_run(alg, ray_local, small_npz, tmp_path):
    pytest.importorskip("optuna")
    exp = tiny_experiment(tmp_path, small_npz, name=alg, search_alg=alg, scheduler="asha",
                          num_samples=3, epochs=1, grace_period=1)
    results = run(exp)
    assert len(results) == 3 and results.num_errors == 0
    assert all("score" in r.metrics and "avg_macs" in r.metrics for r in results)
    configs = {json.dumps(r.config, sort_keys=True) for r in results}
    assert len(configs) == 3  # the searcher proposed distinct candidates


def test_time_budget_stops_the_search(ray_local, small_npz, tmp_path):
    exp = tiny_experiment(tmp_path, small_npz, name="budget", scheduler="fifo", num_samples=500, epochs=1,
                          time_budget_s=8)
    results = run(exp)
    # 500 trials cannot all start in 8 s on any machine, loaded or not: the budget ended the search,
    # and the trials it stopped are in the results, not errors. (How many finished depends on the
    # machine's speed, so it is not asserted.)
    assert 0 < len(results) < 500 and results.num_errors == 0
    args = argparse.ArgumentParser()
    add_arguments(args, Experiment())
    assert experiment_from_args(args.parse_args(["--time-budget", "90"]), Experiment()).time_budget_s == 90


def test_existing_experiment_is_not_overwritten(tmp_path, small_npz):
    exp = tiny_experiment(tmp_path, small_npz, name="taken")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "something").write_text("results")
    with pytest.raises(ExperimentError, match="already exists .* --resume"):
        run(exp)


def test_resume_needs_an_experiment(tmp_path, small_npz):
    with pytest.raises(ExperimentError, match="nothing to resume"):
        run(tiny_experiment(tmp_path, small_npz, name="ghost", resume=True))
    with pytest.raises(ExperimentError, match="needs the name of the experiment"):
        run(tiny_experiment(tmp_path, small_npz, name=None, resume=True))


@pytest.mark.parametrize("exp, cluster, expected", [
    (Experiment(), {"CPU": 16.0, "GPU": 1.0}, {"cpu": 1, "gpu": 1}),        # auto: a GPU when there is one
    (Experiment(), {"CPU": 2.0}, {"cpu": 1, "gpu": 0}),                      # auto on a CPU-only cluster
    (Experiment(max_concurrent=2), {"CPU": 16.0, "GPU": 4.0}, {"cpu": 1, "gpu": 1}),  # still one per trial
    (Experiment(gpus_per_trial=0), {"CPU": 16.0, "GPU": 1.0}, {"cpu": 1, "gpu": 0}),  # forced CPU
    (Experiment(gpus_per_trial=0.5, cpus_per_trial=4), {"CPU": 16.0, "GPU": 1.0}, {"cpu": 4, "gpu": 0.5}),
    (Experiment(epochs=0), {"CPU": 16.0, "GPU": 1.0}, {"cpu": 1, "gpu": 0.25}),  # inherited: 4 share a GPU
    (Experiment(epochs=0), {"CPU": 2.0}, {"cpu": 1, "gpu": 0}),               # ... and none without one
    (Experiment(epochs=0, gpus_per_trial=1), {"CPU": 16.0, "GPU": 1.0}, {"cpu": 1, "gpu": 1}),  # asked for
])
def test_trial_resources(exp, cluster, expected):
    assert trial_resources(exp, cluster) == expected


def test_resources_line():
    assert describe_resources({"cpu": 1, "gpu": 1}, {"CPU": 16.0, "GPU": 1.0}) == \
        "each trial gets 1 CPU and 1 GPU (cluster: 16 CPUs, 1 GPU)"
    assert describe_resources({"cpu": 2, "gpu": 0}, {"CPU": 2.0}) == \
        "each trial gets 2 CPUs and 0 GPUs (cluster: 2 CPUs, 0 GPUs)"
    assert describe_resources({"cpu": 1, "gpu": 0.25}, {"CPU": 16.0, "GPU": 1.0}) == \
        "each trial gets 1 CPU and 0.25 GPUs (4 trials share a GPU) (cluster: 16 CPUs, 1 GPU)"


def _resumable_copy(tiny_search, root: Path) -> Experiment:
    """A copy of the finished tiny search under ``root`` (so resuming it leaves the shared one alone)."""
    path, _, exp = tiny_search
    shutil.copytree(path, root / path.name)
    return dataclasses.replace(exp, storage_path=str(root), resume=True)


@pytest.mark.parametrize("change, named", [
    ({"seed": 1, "epochs": 3, "val_size": 50}, ["seed=1 (saved 0)", "epochs=3 (saved 2)", "val_size=50 (saved 100)"]),
    ({"space_kwargs": {"resolutions": (36,)}}, ["space_kwargs={'resolutions': [36]} (saved {'resolutions': [32]})"]),
    ({"width_mult": 0.5, "target_macs": 2.0}, ["width_mult=0.5 (saved 0.25)", "target_macs=2.0 (saved 1.0)"]),
    ({"dataset": "cifar10-subset"}, ["dataset='cifar10-subset' (saved '"]),
    ({"amp": True, "lr": 0.05}, ["amp=True (saved False)", "lr=0.05 (saved 0.1)"]),
    ({"num_samples": 8}, ["num_samples=8 (saved 4)"]),  # Ray Tune would ignore it: refused, not dropped
])
def test_resume_refuses_other_settings(change, named, tiny_search, tmp_path):
    exp = _resumable_copy(tiny_search, tmp_path)
    with pytest.raises(ExperimentError) as err:
        run(dataclasses.replace(exp, **change))
    message = str(err.value)
    assert message.startswith("--resume with settings that differ from the saved experiment: ")
    assert message.endswith("; resume with the saved settings or start a new --name")
    for item in named:
        assert item in message
    assert message.count("(saved ") == len(named)  # nothing else is named


def test_resume_with_the_saved_settings_continues(tiny_search, tmp_path, capsys):
    exp = _resumable_copy(tiny_search, tmp_path)
    lines = {d.name: _epochs(d) for d in (tmp_path / "tiny").glob("trial_*")}
    # Where the data is and what each trial reserves may change; max_concurrent is kept by Ray Tune.
    results = run(dataclasses.replace(exp, data_dir=str(tmp_path), cpus_per_trial=2, max_concurrent=1))
    assert len(results) == 4 and results.num_errors == 0
    assert {d.name: _epochs(d) for d in (tmp_path / "tiny").glob("trial_*")} == lines  # nothing rerun
    err = capsys.readouterr().err
    assert "--resume ignores max_concurrent=1 (saved None): Ray Tune keeps the saved values" in err


def _parse(argv: list[str], defaults: Experiment = Experiment()) -> Experiment:
    parser = argparse.ArgumentParser()
    add_arguments(parser, defaults)
    return experiment_from_args(parser.parse_args(argv), defaults)


def test_resume_flags_default_to_the_saved_settings(tiny_search, tmp_path):
    exp = _resumable_copy(tiny_search, tmp_path)
    with np.load(exp.dataset) as data:  # the saved experiment records its data's class names
        exp = dataclasses.replace(exp, classes=tuple(data["classes"].tolist()))
    where = ["--storage-path", str(tmp_path), "--name", "tiny"]
    assert _parse(where + ["--resume"]) == exp
    assert _parse(where + ["--resume", "--cpus-per-trial", "2", "--resolutions", "36"]) == dataclasses.replace(
        exp, cpus_per_trial=2.0, space_kwargs={"resolutions": (36,)})
    # A flag given with the default's value still counts as given.
    assert _parse(where + ["--resume", "--epochs", str(Experiment().epochs)]).epochs == Experiment().epochs
    # Without --resume the flags not given take the defaults, not the saved values.
    fresh = _parse(where)
    assert fresh == dataclasses.replace(Experiment(), storage_path=str(tmp_path), name="tiny")
    assert _parse(["--gpus-per-trial", "0", "--amp"]).gpus_per_trial == 0 and _parse(["--amp"]).amp is True
    assert _parse([]).gpus_per_trial is None and _parse([]).amp is False


def test_flags_are_made_from_the_settings_declarations():
    declared = {f.name for f in dataclasses.fields(Experiment) if "flag" in f.metadata}
    assert declared == set(FLAGS) - {RESOLUTIONS}  # every declared flag is listed once, and no other
    parser = argparse.ArgumentParser()
    add_arguments(parser, Experiment())
    actions = {a.dest: a for a in parser._actions}
    assert actions["latency_backend"].choices == LATENCY_BACKENDS
    assert actions["space"].choices is None  # validate() refuses a bad space, naming it
    assert actions["space"].help == "search space: aebnas, fixed_exits or static (default: aebnas)"
    assert tuple(SPACES) == ("aebnas", "fixed_exits", "static")
    assert actions["gpus_per_trial"].help.endswith(
        "(default: 1 when the cluster has a GPU (a quarter of one for inherited candidates, epochs=0), else 0)")
    assert _parse(["--supernet", "none"]).supernet is None and _parse(["--supernet", "a.pt"]).supernet == "a.pt"
    assert _parse(["--reduction-factor", "3", "--val-size", "7"]) == dataclasses.replace(
        Experiment(), reduction_factor=3.0, val_size=7)


@pytest.mark.slow
def test_search_under_a_storage_uri(ray_local, small_npz, tmp_path, capsys):
    """A file:// URI goes through pyarrow.fs like s3:// or gs://: settings, existing-experiment and resume checks."""
    exp = tiny_experiment(f"file://{tmp_path}", small_npz, name="uri", num_samples=2, epochs=1)
    results = run(exp)
    assert len(results) == 2 and results.num_errors == 0
    assert "aebnas: each trial gets 1 CPU and 0 GPUs (cluster: 2 CPUs, 0 GPUs)" in capsys.readouterr().out
    assert all(r.metrics["device"] == "cpu" for r in results)
    path = experiment_path(exp)
    assert path == f"file://{tmp_path}/uri" and (tmp_path / "uri" / EXPERIMENT_FILE).is_file()
    with np.load(small_npz) as data:  # the saved experiment records its data's class names
        saved = dataclasses.replace(exp, classes=tuple(data["classes"].tolist()))
    assert read_experiment_settings(path) == read_experiment_settings(str(tmp_path / "uri")) == saved.to_json()

    with pytest.raises(ExperimentError, match="already exists .* --resume"):
        run(exp)
    with pytest.raises(ExperimentError, match=r"differ from the saved experiment: seed=3 \(saved 0\);"):
        run(dataclasses.replace(exp, resume=True, seed=3))
    with pytest.raises(ExperimentError, match="nothing to resume"):
        run(dataclasses.replace(exp, resume=True, name="ghost"))
    resumed = run(dataclasses.replace(exp, resume=True))
    assert len(resumed) == 2 and resumed.num_errors == 0


def _write_svhn(folder: Path, n_train: int, n_test: int) -> dict:
    """SVHN's real on-disk format (.mat, X as H×W×C×N, label 10 for digit 0); returns md5s."""
    import hashlib

    scipy_io = pytest.importorskip("scipy.io")
    with np.load(REPO / "aebnas" / "_data" / "cifar10_subset.npz") as z:  # real images as pixels
        x = z["x_train"][: n_train + n_test]
    rng = np.random.default_rng(0)
    y = rng.integers(1, 11, size=len(x)).astype(np.uint8)
    md5 = {}
    for split, sl in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        f = folder / f"{split}_32x32.mat"
        scipy_io.savemat(f, {"X": x[sl].transpose(1, 2, 3, 0), "y": y[sl][:, None]})
        md5[split] = hashlib.md5(f.read_bytes()).hexdigest()
    return md5


def _run_tune_config(script: str, argv: list[str]) -> int:
    """Run ``python tune_configs/SCRIPT ARGV`` in this process (torchvision's checksum table patched)."""
    import runpy

    old = sys.argv
    sys.argv = [script, *argv]
    try:
        runpy.run_path(str(REPO / "tune_configs" / script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = old
    return 0


def test_svhn_config_runs_on_torchvision_files(ray_local, tmp_path, monkeypatch, capsys):
    md5 = _write_svhn(tmp_path, n_train=300, n_test=100)
    split_list = {s: [u, f, md5.get(s, m)] for s, (u, f, m) in tvd.SVHN.split_list.items()}
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)
    code = _run_tune_config("svhn.py", [
        "--data-dir", str(tmp_path), "--val-size", "60", "--num-samples", "2", "--epochs", "1",
        "--resolutions", "32", "--width-mult", "0.25", "--batch-size", "64",
        # The paper's config trains its supernet first (60 epochs): 1 epoch, in-process, here.
        "--supernet-epochs", "1", "--supernet-workers", "0",
        "--storage-path", str(tmp_path / "results"), "--name", "svhn"])
    assert code == 0
    trials = list((tmp_path / "results" / "svhn").glob("trial_*/exit_outputs.npz"))
    assert len(trials) == 2
    out = capsys.readouterr().out
    assert "svhn: 240 train / 60 val / 100 test" in out and "python -m analysis" in out
    assert "training the supernet in this process" in out and "candidates inherit their weights" in out
    assert list((tmp_path / "results").glob("supernet_svhn_w0.25_r32_split0_v60_1ep/supernet.pt"))


def test_svhn_config_without_data_stops_before_ray(tmp_path, capsys):
    code = _run_tune_config("svhn.py", ["--data-dir", str(tmp_path / "none"), "--storage-path",
                                        str(tmp_path / "results"), "--name", "x"])
    err = capsys.readouterr().err
    assert code == 2
    assert "dataset 'svhn' not found" in err and "--download" in err
    assert not list((tmp_path / "results").glob("x/trial_*"))  # no trial was started


def _epochs(trial_dir: Path) -> list[int]:
    f = trial_dir / "result.json"
    return [json.loads(line)["epoch"] for line in f.read_text().splitlines()] if f.exists() else []


def _checkpoints(trial_dir: Path) -> list[int]:
    return sorted(int(p.name.rsplit("_", 1)[1]) for p in trial_dir.glob("checkpoint_*"))


def test_interrupted_search_resumes(tmp_path, small_npz):
    """SIGINT the driver mid-search; --resume finishes it without rerunning finished work."""
    args = [sys.executable, str(REPO / "tune_configs" / "quickstart.py"), "--dataset", str(small_npz),
            "--val-size", "100", "--resolutions", "32", "--width-mult", "0.25", "--epochs", "4",
            "--num-samples", "3", "--max-concurrent", "1", "--scheduler", "fifo", "--batch-size", "64",
            "--supernet", "none", "--storage-path", str(tmp_path), "--name", "resume"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    exp_dir = tmp_path / "resume"
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    try:
        # Wait until one trial has finished and the next one has its first checkpoint (3 epochs
        # still to go, so it is surely unfinished when the SIGINT lands). Checkpoints reach
        # storage when reported; result.json only when the driver syncs, so watch those.
        while time.time() < deadline:
            ckpts = {d.name: _checkpoints(d) for d in exp_dir.glob("trial_*")}
            finished = [n for n, c in ckpts.items() if c and c[-1] == 3]
            partial = [n for n, c in ckpts.items() if c == [0]]
            if finished and partial:
                break
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()
            time.sleep(0.1)
        else:
            pytest.fail("the search made no progress")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    before = {d.name: _epochs(d) for d in exp_dir.glob("trial_*")}
    assert any(e and e[-1] < 4 for e in before.values()), before

    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    after = {d.name: _epochs(d) for d in exp_dir.glob("trial_*")}
    assert len(after) == 3 and all(e[-1] == 4 for e in after.values()), after
    for name, epochs in before.items():
        if epochs and epochs[-1] == 4:
            assert after[name] == epochs  # finished before: not run again
        elif epochs:
            # continued from its checkpointed epoch: no epoch is trained twice from scratch
            assert after[name] == [1, 2, 3, 4], (name, epochs, after[name])
