"""Tests for aebnas/deploy.py: retrain a trial of a real search (and resume it after a kill),
export it to TorchScript with its exits, and classify image files with the export."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from aebnas.cli import main
from aebnas.config import ArchConfig, ExitModuleConfig, is_arch_key, uniform_arch
from aebnas.cost import exit_costs
from aebnas.data import BatchLoader, load_dataset
from aebnas.deploy import (DeployedEarlyExitNet, RetrainRequest, export, load_experiment_data,
                           load_run, read_experiment_dir, retrain, score_trials, val_outputs_from_checkpoint)
from aebnas.exit_policy import load_exit_outputs, simulate, torch_confidence, tune_thresholds
from aebnas.nn import EarlyExitNet
from aebnas.train import evaluate, recalibrate_bn
from aebnas.trainable import parse_trial_config

EPOCHS = 3
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
REPO = Path(__file__).resolve().parents[1]


def _run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _trial_arch(config):
    return ArchConfig.from_flat({k: v for k, v in config.items() if is_arch_key(k)})


@pytest.fixture(scope="module")
def experiment(tiny_search):
    path, results, exp = tiny_search
    assert results.num_errors == 0
    # the trial with the most exits exercises the most of the exit machinery
    trial = max(read_experiment_dir(path).trials, key=lambda t: _trial_arch(t.config).num_exits)
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
    # the trial's architecture, the run's settings
    trial_config = json.loads((path / trial / "params.json").read_text())
    arch, settings = parse_trial_config(json.loads((out / "arch.json").read_text()))
    assert arch.to_flat() == _trial_arch(trial_config).to_flat()
    assert (settings.epochs, settings.target_macs, settings.seed) == (EPOCHS, exp.target_macs, exp.seed)
    # the search's split: 600 images → 500 train / 100 val, 200 test
    assert {k: metrics["data"][k] for k in ("train", "val", "test")} == {"train": 500, "val": 100, "test": 200}
    assert metrics["source"]["trial"] == trial
    # progress: one line and one log row per epoch
    assert [int(r["epoch"]) for r in _log_rows(out)] == [1, 2, 3]
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/3", "2/3", "3/3"]
    assert all("ETA" in line for line in lines if line.startswith("epoch "))
    # thresholds are the validation optimum; the test metrics use them
    splits, costs = load_exit_outputs(out / "exit_outputs.npz")
    np.testing.assert_allclose(costs.backbone, exit_costs(arch).backbone)
    tuned = tune_thresholds(splits["val"], costs, exp.target_macs)
    assert json.loads((out / "thresholds.json").read_text())["thresholds"] == tuned.thresholds == metrics["thresholds"]
    test = simulate(splits["test"], tuned.thresholds, costs)
    assert metrics["test"]["accuracy"] == pytest.approx(test.accuracy)
    assert metrics["test"]["avg_macs"] == pytest.approx(test.avg_macs)
    assert metrics["test"]["utilization"] == pytest.approx(list(test.utilization))
    assert sum(metrics["test"]["utilization"]) == pytest.approx(1.0)
    assert [r["test_util"] for r in metrics["exits"]] == pytest.approx(list(test.utilization))
    # model.pt is the network the saved outputs came from
    loaded = load_run(out)
    data = load_dataset(str(small_npz), val_size=exp.val_size, seed=exp.seed)
    again = evaluate(loaded.net, BatchLoader.for_split(data, "test", batch_size=512, resolution=arch.resolution,
                                                       train=False), loaded.confidence)
    np.testing.assert_array_equal(again.prediction, splits["test"].prediction)


def test_retrain_learns(run):
    out, metrics, _ = run
    losses = [float(r["loss"]) for r in _log_rows(out)]
    assert losses[-1] < losses[0]
    assert metrics["test"]["final_accuracy"] > 10.0  # 10 classes: above chance after 3 epochs


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
    killed_at = torch.load(out / "checkpoint.pt", weights_only=False)["epoch"]
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
        costs = exit_costs(_trial_arch(t.config))
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
            val, costs = val_outputs_from_checkpoint(t, data), exit_costs(_trial_arch(t.config))
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
    with pytest.raises(SystemExit) as exc:  # argparse: one of --trial / --best is required
        main(["retrain", str(path)])
    assert exc.value.code == 2


# ----------------------------------------------------------------- export
def _median_thresholds(net, x, confidence):
    """Per exit, about the median confidence of the samples that reach it: several exits are taken.

    Each threshold lies halfway between two confidences, so no sample sits on a threshold,
    where rounding differences of 1e-7 could decide its exit.
    """
    thresholds, remaining = [], torch.ones(len(x), dtype=torch.bool)
    with torch.no_grad():
        outputs = net(x)
    for logits in outputs[:-1]:
        conf = torch_confidence(logits, confidence)
        reaching = conf[remaining].sort().values
        k = len(reaching) // 2
        t = float(reaching[k - 1] + reaching[k]) / 2
        thresholds.append(t)
        remaining &= conf < t
    return thresholds


def test_export_gives_infer_in_a_fresh_process_without_aebnas(run, tmp_path):
    run_dir, metrics, _ = run
    loaded = load_run(run_dir)
    net, arch = loaded.net, loaded.net.arch
    data = load_dataset("cifar10-subset")  # the embedded subset's test split (761 images)
    batch = BatchLoader(data.x_test, data.y_test, batch_size=len(data.y_test), resolution=arch.resolution,
                        mean=metrics["data"]["mean"], std=metrics["data"]["std"], train=False)
    x = next(iter(batch))[0]
    thresholds = _median_thresholds(net, x, loaded.confidence)
    ref_logits, ref_exit = net.infer(x, thresholds, loaded.confidence)
    assert len(set(ref_exit.tolist())) == arch.num_exits + 1 >= 3  # every exit and the final are taken

    model = tmp_path / "deploy" / "model.pt"
    meta = export(run_dir, model, thresholds=thresholds, log=lambda _: None)
    assert json.loads(model.with_suffix(".json").read_text()) == meta
    assert meta["thresholds"] == thresholds and meta["resolution"] == arch.resolution
    assert [e["position"] for e in meta["exits"]] == [*arch.exit_positions, "final"]
    np.save(tmp_path / "images.npy", data.x_test.numpy())
    # -I -S: no site-packages processing, so the editable install of aebnas is invisible;
    # only the directories holding torch and numpy are put on the path.
    site = sorted({str(Path(m.__file__).resolve().parents[1]) for m in (torch, np)})
    script = (
        "import sys\n"
        f"sys.path.extend({site!r})\n"
        "try:\n    import aebnas\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('aebnas is importable: ' + aebnas.__file__)\n"
        "import numpy as np, torch\n"
        "torch.set_num_threads(1)\n"
        "model = torch.jit.load(sys.argv[1])\n"
        "images = torch.from_numpy(np.load(sys.argv[2])).float() / 255\n"
        "logits, exits = model(images)\n"
        "np.savez(sys.argv[3], logits=logits.numpy(), exits=exits.numpy())\n"
    )
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script, str(model), "images.npy", "out.npz"],
                          cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "out.npz") as got:
        np.testing.assert_array_equal(got["exits"], ref_exit.numpy())
        np.testing.assert_array_equal(got["logits"].argmax(1), ref_logits.argmax(1).numpy())
        np.testing.assert_allclose(got["logits"], ref_logits.numpy(), atol=1e-4)


def test_export_cli_retunes_thresholds_for_a_target(run, tmp_path, capsys):
    run_dir, metrics, _ = run
    splits, costs = load_exit_outputs(run_dir / "exit_outputs.npz")
    target = metrics["target_macs"] * 0.7
    code, out, err = _run_cli(capsys, "export", run_dir, "--out", tmp_path / "m.pt", "--target-macs", target)
    assert code == 0, err
    meta = json.loads((tmp_path / "m.json").read_text())
    tuned = tune_thresholds(splits["val"], costs, target)
    assert meta["thresholds"] == tuned.thresholds and meta["target_macs"] == target
    assert meta["test"]["accuracy"] == pytest.approx(simulate(splits["test"], tuned.thresholds, costs).accuracy)
    active = np.asarray(tuned.thresholds) < 1.0
    assert [e["macs"] for e in meta["exits"]] == pytest.approx(list(costs.cumulative(active)))


def test_export_errors_name_the_problem(tmp_path, capsys):
    code, _, err = _run_cli(capsys, "export", tmp_path / "none", "--out", tmp_path / "m.pt")
    assert code == 2 and f"run directory {tmp_path / 'none'} does not exist" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "checkpoint.pt").write_bytes(b"")
    code, _, err = _run_cli(capsys, "export", tmp_path / "half", "--out", tmp_path / "m.pt")
    assert code == 2 and "lacks arch.json, model.pt" in err and "rerun the same `aebnas retrain`" in err


def _confident_net(resolution, exits=(1, 2, 3)):
    """A small random network whose exit confidences spread over [0, 1] (see tests/test_nn.py)."""
    torch.manual_seed(0)
    arch = uniform_arch(2, 3, 3, exits=exits, exit_module=ExitModuleConfig(8, 3, 2, 1), width_mult=0.25,
                        resolution=resolution)
    net = EarlyExitNet(arch).eval()
    recalibrate_bn(net, [(torch.randn(32, 3, resolution, resolution), None)], max_batches=1)
    for linear in [e.classifier for e in net.exits] + [net.head[-1]]:
        nn.init.normal_(linear.weight, 0.0, 3.0)
    return net


def test_deployed_module_normalises_and_resizes_like_training():
    net = _confident_net(resolution=40)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    loader = BatchLoader(images, torch.zeros(64, dtype=torch.long), batch_size=64, resolution=40, mean=mean,
                         std=std, train=False)
    x = next(iter(loader))[0]  # what training and evaluation feed the network
    thresholds = _median_thresholds(net, x, "margin")
    ref_logits, ref_exit = net.infer(x, thresholds)
    assert len(set(ref_exit.tolist())) == 4
    module = torch.jit.script(DeployedEarlyExitNet(net, thresholds, "margin", mean, std, [str(i) for i in range(10)]))
    assert not any(m.training for m in module.modules())
    for given in (images, images.float() / 255):  # uint8 and float in [0, 1]
        logits, exits = module(given)
        assert torch.equal(exits, ref_exit) and torch.equal(logits.argmax(1), ref_logits.argmax(1))
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    # any H, W: resized to the trained resolution after normalisation
    wide = torch.rand(8, 3, 30, 50)
    normalised = (wide - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    ref_logits, ref_exit = net.infer(F.interpolate(normalised, size=(40, 40), mode="bilinear", align_corners=False),
                                     thresholds)
    logits, exits = module(wide)
    assert torch.equal(exits, ref_exit)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception, match=r"images must have shape \(N, 3, H, W\)"):
        module(torch.rand(2, 1, 32, 32))


def test_a_disabled_exit_is_not_computed():
    net = _confident_net(resolution=32)
    module = DeployedEarlyExitNet(net, [1.0, 0.0, 1.0], "margin", (0.5,) * 3, (0.25,) * 3, [str(i) for i in range(10)])
    calls = []
    for block in module.blocks:
        block.branch.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    _, exits = module(torch.rand(4, 3, 32, 32))
    assert exits.tolist() == [1, 1, 1, 1]  # threshold 0: everyone leaves at exit 2 (after stage 2)
    assert calls == ["ExitBranch"]        # exit 1 (off) never ran, nothing after exit 2 ran


def test_a_network_without_exits_exports_as_a_static_network():
    torch.manual_seed(0)
    net = EarlyExitNet(uniform_arch(2, 3, 3, exits=(), width_mult=0.25, resolution=32)).eval()
    module = torch.jit.script(DeployedEarlyExitNet(net, [], "margin", (0.5,) * 3, (0.2,) * 3,
                                                   [str(i) for i in range(10)]))
    x = torch.rand(3, 3, 32, 32)
    logits, exits = module(x)
    assert exits.tolist() == [0, 0, 0] and module.exit_positions == []
    torch.testing.assert_close(logits, net((x - 0.5) / 0.2)[-1])
    assert module.exit_macs == pytest.approx([exit_costs(net.arch).static_macs])


# ----------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    run_dir, _, _ = run
    model = tmp_path_factory.mktemp("export") / "model.pt"
    export(run_dir, model, log=lambda _: None)
    return model


def _write_images(folder):
    data = load_dataset("cifar10-subset")
    paths = []
    for i in range(3):
        paths.append(folder / f"test{i}.png")
        Image.fromarray(data.x_test[i].permute(1, 2, 0).numpy()).save(paths[-1])
    paths.append(folder / "big gray.jpg")  # larger than the model's input, grayscale, a space in the name
    Image.fromarray(data.x_test[3].permute(1, 2, 0).numpy()).resize((96, 64)).convert("L").save(paths[-1])
    return paths, data


def test_predict_prints_one_line_per_image(exported, tmp_path, capsys):
    paths, data = _write_images(tmp_path)
    module = torch.jit.load(str(exported))
    meta = json.loads(exported.with_suffix(".json").read_text())
    n = len(meta["exits"])
    code, out, err = _run_cli(capsys, "predict", exported, *paths)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(paths)
    pattern = re.compile(r"^(?P<path>.+)  (?P<cls>\S+)  (?P<p>[01]\.\d\d)  exit (?P<k>\d)/(?P<n>\d) "
                         r"\((?P<where>stage \d|final)\)$")
    for i, (line, path) in enumerate(zip(lines, paths)):
        m = pattern.match(line)
        assert m and m["path"] == str(path) and m["cls"] in meta["classes"] and int(m["n"]) == n, line
        k = int(m["k"]) - 1
        assert m["where"] == ("final" if k == n - 1 else f"stage {meta['exits'][k]['position']}")
        if i < 3:  # a 32×32 PNG is exactly the dataset image
            logits, exits = module(data.x_test[i:i + 1])
            assert m["cls"] == meta["classes"][int(logits.argmax())] and k == int(exits[0])
            assert float(m["p"]) == pytest.approx(float(torch.softmax(logits, 1).max()), abs=0.005)

    code, out, err = _run_cli(capsys, "predict", exported, *paths, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert [r["class_name"] for r in rows] == [line.split("  ")[1] for line in lines]


def test_predict_names_unreadable_files(exported, tmp_path, capsys):
    paths, _ = _write_images(tmp_path)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    code, out, err = _run_cli(capsys, "predict", exported, paths[0], bad, tmp_path / "missing.jpg")
    assert code == 2 and out == ""
    assert f"cannot read image {bad}" in err and f"cannot read image {tmp_path / 'missing.jpg'}" in err
    code, _, err = _run_cli(capsys, "predict", tmp_path / "missing.pt", paths[0])
    assert code == 2 and f"model file {tmp_path / 'missing.pt'} does not exist" in err
    code, _, err = _run_cli(capsys, "predict", bad, paths[0])
    assert code == 2 and f"{bad} is not a TorchScript file" in err
