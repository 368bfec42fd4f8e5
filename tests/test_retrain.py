"""Tests for aebnas/deploy/retrain.py (and the reading of an experiment, aebnas/search/trials.py): retrain a
trial of a real search, reproduce the trial exactly with its own settings, resume after a
kill, learn with the default epochs, read an experiment at a URI, refuse checkpoints that
carry pickled objects."""

import dataclasses
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aebnas.cli import main
from aebnas.errors import UsageError
from aebnas.cost.macs import exit_costs
from aebnas.data.batches import BatchLoader
from aebnas.data.datasets import load_dataset
from aebnas.exit_policy import load_exit_outputs, simulate, tune_thresholds
from aebnas.deploy.torchscript import load_run
from aebnas.deploy.retrain import DEFAULT_EPOCHS, RetrainRequest, retrain
from aebnas.settings import parse_trial_config
from aebnas.training.loop import CandidateTraining, evaluate, load_checkpoint
from aebnas.deploy.pick import find_trial, load_experiment_data, score_trials, trial_arch, val_outputs_from_checkpoint
from aebnas.search.storage import Location
from aebnas.search.trials import ExperimentRecord, read_experiment_dir
from conftest import Evil

EPOCHS = 3


def _run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _arch(config):
    return parse_trial_config(config)[0]


@pytest.fixture(scope="module")
def experiment(tiny_search):
    path, results, exp = tiny_search
    assert results.num_errors == 0
    # the trial with the most exits exercises the most of the exit machinery
    trial = max(read_experiment_dir(path).trials, key=lambda t: _arch(t.config).num_exits)
    return path, exp, trial.name


@pytest.fixture(scope="module")
def run(experiment, tmp_path_factory):
    """An uninterrupted retrain run (in this process) of the experiment's trial with the most exits."""
    path, exp, trial = experiment
    out = tmp_path_factory.mktemp("retrain") / "run"
    lines = []
    metrics = retrain(RetrainRequest(str(path), trial=trial, epochs=EPOCHS, out=str(out)), log=lines.append)
    return out, metrics, lines


def _log_rows(run_dir):
    with open(run_dir / "train_log.csv") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------- retrain
def test_retrain_writes_a_consistent_run_dir(experiment, run, small_npz):
    path, exp, trial = experiment
    out, metrics, lines = run
    for name in ("arch.json", "model.pt", "thresholds.json", "metrics.json", "exit_outputs.npz",
                 "train_log.csv", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == metrics
    # the trial's architecture, the run's settings
    trial_config = json.loads((path / trial / "params.json").read_text())
    arch, settings = parse_trial_config(json.loads((out / "arch.json").read_text()))
    assert arch.to_flat() == _arch(trial_config).to_flat()
    assert (settings.epochs, settings.target_macs, settings.seed) == (EPOCHS, exp.target_macs, exp.seed)
    # the search's split: 600 images → 500 train / 100 val, 200 test
    assert {k: metrics["data"][k] for k in ("train", "val", "test")} == {"train": 500, "val": 100, "test": 200}
    assert metrics["source"]["trial"] == trial and metrics["epochs"] == EPOCHS
    # progress: one line and one log row per epoch
    assert [int(r["epoch"]) for r in _log_rows(out)] == [1, 2, 3]
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/3", "2/3", "3/3"]
    assert all("ETA" in line for line in lines if line.startswith("epoch "))
    # thresholds are the validation optimum; the test metrics use them
    splits, costs = load_exit_outputs(out / "exit_outputs.npz")
    np.testing.assert_allclose(costs.backbone, exit_costs(arch).backbone)
    tuned = tune_thresholds(splits["val"], costs, exp.target_macs)
    assert json.loads((out / "thresholds.json").read_text())["thresholds"] == tuned.thresholds == metrics["thresholds"]
    assert metrics["val"]["score"] == pytest.approx(tuned.score)
    test = simulate(splits["test"], tuned.thresholds, costs)
    assert metrics["test"]["accuracy"] == pytest.approx(test.accuracy)
    assert metrics["test"]["avg_macs"] == pytest.approx(test.avg_cost)
    assert metrics["test"]["utilization"] == pytest.approx(list(test.utilization))
    assert sum(metrics["test"]["utilization"]) == pytest.approx(1.0)
    assert [r["test_util"] for r in metrics["exits"]] == pytest.approx(list(test.utilization))
    # model.pt is the network the saved outputs came from (BN recalibrated), thresholds inside
    loaded = load_run(out)
    np.testing.assert_allclose(loaded.net.thresholds.numpy(), tuned.thresholds, rtol=1e-6)
    data = load_dataset(str(small_npz), val_size=exp.val_size, seed=exp.seed)
    for split in ("val", "test"):
        again = evaluate(loaded.net, BatchLoader.for_split(data, split, batch_size=512, resolution=arch.resolution,
                                                           train=False), loaded.confidence)
        np.testing.assert_array_equal(again.prediction, splits[split].prediction)
        np.testing.assert_allclose(again.confidence, splits[split].confidence, rtol=1e-5, atol=1e-6)
    # the checkpoint holds tensors and plain values only
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == EPOCHS


def test_retrain_with_the_trial_settings_reproduces_the_trial(experiment, tmp_path):
    """Trials and retrain share one training loop and one evaluation path (BN recalibration on
    the same seeded sample included): retraining a trial with its own epochs, seed and batch
    size on the search's split gives exactly the validation and test outputs it saved."""
    path, exp, trial = experiment
    record = find_trial(read_experiment_dir(path), trial)
    _, settings = parse_trial_config(record.config)
    assert torch.get_num_threads() == 1  # as the trial ran (one CPU per trial): the same arithmetic
    out = tmp_path / "run"
    metrics = retrain(RetrainRequest(str(path), trial=trial, epochs=settings.epochs, seed=settings.seed,
                                     batch_size=settings.batch_size, out=str(out)), log=lambda _: None)
    searched, searched_costs = load_exit_outputs(record.path / "exit_outputs.npz")
    retrained, costs = load_exit_outputs(out / "exit_outputs.npz")
    np.testing.assert_allclose(costs.backbone, searched_costs.backbone)
    np.testing.assert_allclose(costs.branch, searched_costs.branch)
    assert retrained.keys() == searched.keys() == {"val", "test"}
    for split in ("val", "test"):
        np.testing.assert_array_equal(retrained[split].labels, searched[split].labels)
        np.testing.assert_array_equal(retrained[split].prediction, searched[split].prediction)
        np.testing.assert_allclose(retrained[split].confidence, searched[split].confidence, rtol=1e-5, atol=1e-6)
    # the same weights (after BN recalibration) as the trial's last checkpoint
    trial_state = load_checkpoint(sorted(record.path.glob("checkpoint_*/checkpoint.pt"))[-1])
    assert trial_state["epoch"] == settings.epochs
    weights = load_checkpoint(out / "model.pt")
    assert weights.keys() == trial_state["model"].keys()
    for key, value in trial_state["model"].items():
        torch.testing.assert_close(weights[key], value, msg=key)
    # and the same reported numbers
    last = record.last
    assert last["epoch"] == settings.epochs
    assert metrics["thresholds"] == last["thresholds"]
    assert metrics["val"]["score"] == pytest.approx(last["score"], abs=1e-9)
    assert metrics["val"]["accuracy"] == pytest.approx(last["accuracy"], abs=1e-9)
    assert metrics["val"]["avg_macs"] == pytest.approx(last["avg_macs"], abs=1e-9)
    assert metrics["test"]["accuracy"] == pytest.approx(last["test_accuracy"], abs=1e-9)
    assert metrics["test"]["final_accuracy"] == pytest.approx(last["test_final_accuracy"], abs=1e-9)


def _final_exit(net, data, arch):
    """Accuracy (%) and mean cross-entropy of the final exit on the validation and test splits together."""
    logits, labels = [], []
    with torch.no_grad():
        for split in ("val", "test"):
            for x, y in BatchLoader.for_split(data, split, batch_size=512, resolution=arch.resolution, train=False):
                logits.append(net.eval()(x)[-1])
                labels.append(y)
    logits, labels = torch.cat(logits), torch.cat(labels)
    return float((logits.argmax(1) == labels).float().mean()) * 100, float(F.cross_entropy(logits, labels))


@pytest.mark.slow
def test_retrain_with_the_default_epochs_learns(experiment, tmp_path):
    """Far from chance on real images the network never trained on: against an untrained copy
    of the same network (same seed, BatchNorm recalibrated on the same sample), evaluated the
    same way on the same 300 validation and test images.

    Measured (CPU, 1 thread, seeds 0 and 1): trained 31–33 % and cross-entropy 1.87, untrained
    8–14 % and 2.31; on 300 images one standard deviation of an accuracy near 30 % is 2.6 points.
    """
    path, _, trial = experiment
    out = tmp_path / "run"
    metrics = retrain(RetrainRequest(str(path), trial=trial, out=str(out)), log=lambda _: None)
    assert metrics["epochs"] == DEFAULT_EPOCHS == 30
    exp_dir = read_experiment_dir(path)
    data = load_experiment_data(exp_dir)
    arch, settings = trial_arch(find_trial(exp_dir, trial), data)
    untrained = CandidateTraining(arch, settings, data, torch.device("cpu"))  # the initial weights of the run
    untrained.evaluate()  # BN recalibration, as for the trained network
    trained = load_run(out).net  # BN recalibrated by retrain
    acc, ce = _final_exit(trained, data, arch)
    acc0, ce0 = _final_exit(untrained.model, data, arch)
    losses = [float(r["loss"]) for r in _log_rows(out)]
    print(f"final exit on val+test: trained {acc:.1f}% CE {ce:.3f}, untrained {acc0:.1f}% CE {ce0:.3f}; "
          f"training loss {losses[0]:.3f} (epoch 1) → {losses[-1]:.3f} (epoch {len(losses)})")
    assert acc == pytest.approx((100 * metrics["val"]["final_accuracy"] + 200 * metrics["test"]["final_accuracy"])
                                / 300)
    assert acc >= 20.0 and acc >= acc0 + 10.0  # chance is 10 %
    assert ce <= ce0 - 0.25                      # ln 10 = 2.30 for a network that knows nothing
    assert losses[-1] < 0.85 * losses[0]


def test_retrain_resumes_after_being_killed(experiment, run, tmp_path):
    """Kill a real `aebnas retrain` process after its first checkpoint; running it again continues
    from there and ends exactly as the uninterrupted run of the same seed."""
    path, _, trial = experiment
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "aebnas.cli", "retrain", str(path), "--trial", trial, "--epochs", str(EPOCHS),
           "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread, as in this process: the same arithmetic
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    killed_output = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, killed_output
    killed_at = load_checkpoint(out / "checkpoint.pt")["epoch"]
    assert 1 <= killed_at < EPOCHS and not (out / "metrics.json").exists()

    # the same command again (in this process, to save a second start-up)
    request = RetrainRequest(str(path), trial=trial, epochs=EPOCHS, out=str(out))
    lines = []
    resumed = retrain(request, log=lines.append)
    assert f"resuming from {out / 'checkpoint.pt'} at epoch {killed_at + 1} of {EPOCHS}" in lines
    trained = [line.split()[1] for line in lines if line.startswith("epoch ")]
    assert trained == [f"{e}/{EPOCHS}" for e in range(killed_at + 1, EPOCHS + 1)]

    reference_dir, reference, _ = run
    assert resumed["thresholds"] == reference["thresholds"]
    for split in ("val", "test"):
        assert resumed[split].keys() == reference[split].keys()
        for key, value in reference[split].items():  # approx() takes no nested containers
            assert resumed[split][key] == pytest.approx(value, abs=1e-9), (split, key)
    assert [float(r["loss"]) for r in _log_rows(out)] == \
        pytest.approx([float(r["loss"]) for r in _log_rows(reference_dir)], rel=1e-9)
    # a finished run, run again: nothing is trained, the result is the same
    lines = []
    again = retrain(request, log=lines.append)
    assert any(line.startswith("training already complete") for line in lines)
    assert not any(line.startswith("epoch ") for line in lines)
    assert again["test"] == resumed["test"]


def test_scores_at_the_search_target_are_the_reported_ones(experiment):
    path, exp, _ = experiment
    exp_dir = read_experiment_dir(path)
    data = load_experiment_data(exp_dir)
    ranked = score_trials(exp_dir, exp.target_macs, data)
    reported = sorted((t.last["score"] for t in exp_dir.trials), reverse=True)
    assert [s.score for s in ranked] == reported
    # a trial's last checkpoint reproduces the outputs it reported from (the fallback when a
    # trial has no exit_outputs.npz)
    for t in exp_dir.trials:
        val = val_outputs_from_checkpoint(t, data)
        costs = exit_costs(_arch(t.config))
        assert tune_thresholds(val, costs, exp.target_macs).score == pytest.approx(t.last["score"], abs=1e-9)


def test_best_retunes_at_another_target(experiment, tmp_path, capsys):
    path, exp, _ = experiment
    target = exp.target_macs / 2
    exp_dir = read_experiment_dir(path)
    data = load_experiment_data(exp_dir)
    expected = {}
    for t in exp_dir.trials:
        if (t.path / "exit_outputs.npz").is_file():
            splits, costs = load_exit_outputs(t.path / "exit_outputs.npz")
            val = splits["val"]
        else:
            val, costs = val_outputs_from_checkpoint(t, data), exit_costs(_arch(t.config))
        expected[t.name] = tune_thresholds(val, costs, target).score
    ranked = score_trials(exp_dir, target, data)
    assert {s.trial.name: s.score for s in ranked} == pytest.approx(expected)
    best = max(expected, key=expected.get)
    code, out, err = _run_cli(capsys, "retrain", path, "--best", "--target-macs", target, "--epochs", 1,
                              "--out", tmp_path / "best")
    assert code == 0, err
    assert f"retraining {best} (--best at {target:g} MMACs" in out
    metrics = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert metrics["source"]["trial"] == best and metrics["target_macs"] == target


def test_retrain_errors_name_the_problem(experiment, run, tmp_path, capsys):
    path, _, trial = experiment
    code, _, err = _run_cli(capsys, "retrain", tmp_path / "nowhere", "--trial", trial)
    assert code == 2 and f"experiment directory {tmp_path / 'nowhere'} does not exist" in err
    code, _, err = _run_cli(capsys, "retrain", tmp_path, "--trial", trial)
    assert code == 2 and "no aebnas_experiment.json" in err
    code, _, err = _run_cli(capsys, "retrain", path, "--trial", "trial_nope")
    assert code == 2 and "'trial_nope' is not a trial" in err
    for t in read_experiment_dir(path).trials:
        assert t.name in err
    out_dir, _, _ = run
    code, _, err = _run_cli(capsys, "retrain", path, "--trial", trial, "--epochs", 5, "--out", out_dir)
    assert code == 2 and "holds another run (epochs: 3 there, 5 now)" in err
    code, _, err = _run_cli(capsys, "retrain", path, "--trial", trial, "--inherit")
    assert code == 2 and f"{trial} trained from scratch: its search had no supernet to inherit from" in err
    uri = f"file://{tmp_path / 'nowhere'}"
    code, _, err = _run_cli(capsys, "retrain", uri, "--trial", trial)
    assert code == 2 and f"experiment directory {uri} does not exist" in err
    code, _, err = _run_cli(capsys, "retrain", "nosuchscheme://bucket/exp", "--trial", trial)
    assert code == 2 and "cannot read the experiment at nosuchscheme://bucket/exp" in err
    with pytest.raises(SystemExit) as exc:  # argparse: one of --trial / --best is required
        main(["retrain", str(path)])
    assert exc.value.code == 2


def test_retrain_reads_an_experiment_at_a_uri(experiment, tmp_path, monkeypatch):
    """``file://`` (as ``s3://``, ``gs://``) goes through pyarrow into a local copy; without
    ``--out`` the run directory is ./retrain_TRIAL, never inside the (remote) experiment."""
    path, exp, trial = experiment
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    # the local copies go to the system's temp dir: here, this test's (pytest removes it)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    lines = []
    metrics = retrain(RetrainRequest("file://" + str(path), trial=trial, epochs=1), log=lines.append)
    copies = list((tmp_path / "tmp").glob(f"aebnas_experiment_*/{path.name}"))
    assert len(copies) == 1 and (copies[0] / trial / "params.json").is_file()
    run_dir = Path.cwd() / f"retrain_{trial}"
    assert any(line.startswith(f"retraining {trial} ") and line.endswith(f" into {run_dir}") for line in lines)
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert not (path / f"retrain_{trial}").exists()
    # the source is the URI, not the temporary copy it was read from
    assert metrics["source"]["experiment"] == "file://" + str(path) and metrics["source"]["trial"] == trial
    assert metrics["source"]["search_metrics"]["score"] == find_trial(read_experiment_dir(path), trial).last["score"]
    assert metrics["epochs"] == 1
    assert {k: metrics["data"][k] for k in ("train", "val", "test")} == {"train": 500, "val": 100, "test": 200}
    arch, settings = parse_trial_config(json.loads((run_dir / "arch.json").read_text()))
    assert arch.to_flat() == _arch(json.loads((path / trial / "params.json").read_text())).to_flat()
    assert settings.seed == exp.seed and settings.target_macs == exp.target_macs
    # the copy holds what the experiment holds
    copy = read_experiment_dir("file://" + str(path))
    assert copy.path.parent.parent == tmp_path / "tmp" and copy.settings == read_experiment_dir(path).settings
    assert [(t.name, t.config, t.last) for t in copy.trials] == \
        [(t.name, t.config, t.last) for t in read_experiment_dir(path).trials]


# ----------------------------------------------------------------- files that would run code


def _poison(checkpoint, marker):
    """Add an ``Evil`` object to a checkpoint written by aebnas."""
    torch.save({**load_checkpoint(checkpoint), "evil": Evil(marker)}, checkpoint)


def _assert_it_would_have_run(checkpoint, marker):
    """The file does run code when loaded without weights_only: the refusal kept it from running."""
    assert not marker.exists()
    torch.load(checkpoint, weights_only=False)
    assert marker.read_text() == "code ran while loading"


def test_retrain_refuses_to_resume_a_checkpoint_carrying_pickled_objects(experiment, run, tmp_path, capsys):
    path, _, trial = experiment
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    marker = tmp_path / "ran"
    _poison(copy / "checkpoint.pt", marker)
    code, out, err = _run_cli(capsys, "retrain", path, "--trial", trial, "--epochs", EPOCHS, "--out", copy)
    assert code == 2, out
    assert f"{copy / 'checkpoint.pt'}: refused: it holds pickled Python objects" in err
    assert not any(line.startswith(("resuming", "epoch ", "training already")) for line in out.splitlines())
    _assert_it_would_have_run(copy / "checkpoint.pt", marker)


def test_trial_checkpoint_carrying_pickled_objects_is_refused(experiment, tmp_path):
    path, exp, trial = experiment
    exp_dir = read_experiment_dir(path)
    original = find_trial(exp_dir, trial)
    copy = tmp_path / trial
    shutil.copytree(original.path, copy)
    (copy / "exit_outputs.npz").unlink()  # scores at another target then come from the checkpoint
    record = dataclasses.replace(original, location=Location(copy))
    checkpoint = sorted(copy.glob("checkpoint_*/checkpoint.pt"))[-1]
    marker = tmp_path / "ran"
    _poison(checkpoint, marker)
    data = load_experiment_data(exp_dir)
    message = f"{checkpoint}: refused: it holds pickled Python objects"
    with pytest.raises(UsageError) as exc:
        val_outputs_from_checkpoint(record, data)
    assert message in str(exc.value)
    with pytest.raises(UsageError) as exc:  # retrain --best at another target
        score_trials(ExperimentRecord(Location(tmp_path), exp_dir.settings, [record]), exp.target_macs / 2, data)
    assert message in str(exc.value)
    _assert_it_would_have_run(checkpoint, marker)
