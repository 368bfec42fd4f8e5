"""Bad input is refused before any trial starts, with one clear message and exit code 2.

Through the command lines a user types: ``aebnas search …`` (run in this process through
``aebnas.cli.main``), ``python tune_configs/quickstart.py …`` and ``python -m analysis …``
(as subprocesses). The library-level checks behind them are tested in test_experiment.py
(settings), test_data.py (dataset files) and test_config.py (architectures).
"""

import subprocess
import sys
import time

import numpy as np
import pytest

from aebnas.cli import main
from ray_sandbox import REPO, free_port

TINY = ["--val-size", "100", "--resolutions", "32", "--width-mult", "0.25", "--epochs", "1", "--num-samples", "1",
        "--batch-size", "64", "--name", "x"]


def search(capsys, tmp_path, *argv):
    """``aebnas search TINY… ARGV``: (exit code, stdout, stderr)."""
    code = main(["search", *TINY, "--storage-path", str(tmp_path / "results"), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, out, err, tmp_path, message):
    assert code == 2, (out, err)
    assert err.startswith("aebnas: error: ") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "results" / "x").exists()  # nothing was started or written


def write_npz(path, small_npz, **changes):
    """A copy of the small CIFAR file with some arrays replaced (None removes a key)."""
    with np.load(small_npz) as z:
        arrays = {k: z[k] for k in z.files}
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value(arrays) if callable(value) else value
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("argv, message", [
    pytest.param(["--resolutions", "20"], "SpaceValues.resolutions contains 20, which is not an integer in [28, 96]",
                 id="resolution-outside-space"),
    pytest.param(["--width-mult", "0"], "width_mult=0.0 is not a number in [0.05, 4.0]", id="width-outside-space"),
    pytest.param(["--space", "nas"], "space='nas' is not one of ('aebnas', 'fixed_exits', 'static')",
                 id="unknown-space"),
    pytest.param(["--dataset", "imagenet"],
                 "dataset='imagenet' is not one of ('cifar10-subset', 'cifar10', 'cifar100', 'svhn', 'fashion-mnist')",
                 id="unknown-dataset"),
    pytest.param(["--target-macs", "0"], "target_macs=0.0 must be > 0 (MMACs)", id="target-macs-zero"),
    pytest.param(["--target-macs", "-5"], "target_macs=-5.0 must be > 0 (MMACs)", id="target-macs-negative"),
    pytest.param(["--epochs", "0"], "epochs=0 must be an integer ≥ 1", id="epochs-zero"),
    pytest.param(["--epochs", "-2"], "epochs=-2 must be an integer ≥ 1", id="epochs-negative"),
    pytest.param(["--resume"], "nothing to resume at", id="resume-nothing"),
])
def test_bad_settings(capsys, tmp_path, argv, message):
    assert_refused(*search(capsys, tmp_path, *argv), tmp_path, message)


@pytest.mark.parametrize("changes, message", [
    pytest.param({"y_test": None}, "missing key(s) y_test; found ['classes', 'x_test', 'x_train', 'y_train']",
                 id="missing-key"),
    pytest.param({"x_train": lambda a: a["x_train"].transpose(0, 3, 1, 2)},
                 "x_train has shape (600, 3, 32, 32) (it looks like NCHW; store NHWC)", id="nchw-images"),
    pytest.param({"x_test": lambda a: a["x_test"][:, :16]},
                 "x_test images have shape (C, H, W)=(3, 16, 32) but x_train images have (3, 32, 32)",
                 id="image-shapes-differ"),
    pytest.param({"y_train": lambda a: a["y_train"][:-1]}, "y_train has 599 labels but x_train has 600 images",
                 id="label-count"),
    pytest.param({"y_train": lambda a: np.where(a["y_train"] == 9, 12, a["y_train"])},
                 "y_train has label 12 but 'classes' lists 10 names; expected labels in 0..9", id="label-too-large"),
    pytest.param({"y_test": lambda a: a["y_test"] - 1}, "y_test has negative label -1", id="label-negative"),
])
def test_malformed_npz(capsys, tmp_path, small_npz, changes, message):
    path = write_npz(tmp_path / "bad.npz", small_npz, **changes)
    assert_refused(*search(capsys, tmp_path, "--dataset", str(path)), tmp_path, f"{path}: {message}")


def test_missing_data_directory(capsys, tmp_path):
    nowhere = tmp_path / "no-such-dir"
    code, out, err = search(capsys, tmp_path, "--dataset", "cifar10", "--data-dir", str(nowhere))
    assert_refused(code, out, err, tmp_path, f"dataset 'cifar10' not found in {nowhere}")
    assert f"{nowhere}/cifar-10-batches-py/data_batch_1 (missing)" in err and "--download" in err
    code, out, err = search(capsys, tmp_path, "--dataset", "train.npz", "--data-dir", str(nowhere))
    assert_refused(code, out, err, tmp_path, "dataset file 'train.npz' not found; looked at: ")
    assert str(nowhere / "train.npz") in err


@pytest.mark.parametrize("where", ["--address", "RAY_ADDRESS"])
def test_unreachable_cluster_fails_fast(capsys, tmp_path, monkeypatch, where):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    if where == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", address)
    start = time.perf_counter()
    code, out, err = search(capsys, tmp_path, *(["--address", address] if where == "--address" else []))
    assert time.perf_counter() - start < 5
    assert_refused(code, out, err, tmp_path, f"no Ray cluster answers at address={address!r}")
    assert f"ray start --head --port={address.rsplit(':', 1)[1]}" in err
    assert "cifar10-subset:" not in out  # refused before the dataset was loaded


def test_malformed_address(capsys, tmp_path):
    assert_refused(*search(capsys, tmp_path, "--address", "headnode"), tmp_path,
                   "address='headnode' is not HOST:PORT (e.g. 127.0.0.1:6379 or ray://HOST:10001)")


def test_quickstart_script_exits_2(tmp_path):
    """The tune_configs scripts share the command line: one message on stderr, exit code 2."""
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, str(REPO / "tune_configs" / "quickstart.py"), "--address", address,
                           "--storage-path", str(tmp_path / "results"), "--name", "x"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"aebnas: error: no Ray cluster answers at address={address!r} ([Errno 111] Connection refused); start "
        f"one with `ray start --head --port={address.rsplit(':', 1)[1]}` on that machine, or leave --address unset "
        "to run locally"]


@pytest.mark.parametrize("kind", ["empty", "missing", "files"])
def test_analysis_of_a_directory_that_is_not_an_experiment(tmp_path, capsys, kind):
    """``python -m analysis DIR`` on something a search did not write: one message, exit code 2."""
    analysis_cli = pytest.importorskip("analysis.__main__", reason="analysis CLI (issue 5) not in this checkout")
    target = tmp_path / "notanexperiment"
    argv = [str(target), "--out", str(tmp_path / "out")]
    if kind != "missing":
        target.mkdir()
    if kind == "files":  # the real command line, once
        (target / "notes.txt").write_text("not results")
        (target / "trial_0").mkdir()
        proc = subprocess.run([sys.executable, "-m", "analysis", *argv], capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = analysis_cli.main(argv), capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"analysis: error: {target}"), err
    assert ("no such directory" if kind == "missing" else "not an experiment directory") in lines[0]


@pytest.mark.parametrize("argv, message", [
    pytest.param(["--gpus-per-trial", "64"], "cpus_per_trial=1 and gpus_per_trial=64, but no Ray node has that much "
                                             "(nodes: 2 CPUs + ", id="gpus"),
    pytest.param(["--cpus-per-trial", "3"], "cpus_per_trial=3 and gpus_per_trial=0, but no Ray node has that much",
                 id="cpus"),
])
def test_trial_larger_than_every_node(ray_local, capsys, tmp_path, argv, message):
    """Ray Tune would wait forever for resources no node has (measured: it only warns every 60 s)."""
    code, out, err = search(capsys, tmp_path, *argv)
    assert code == 2 and err.startswith("aebnas: error: ") and message in err, err
    assert not list((tmp_path / "results").glob("x/trial_*"))
