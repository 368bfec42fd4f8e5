"""Tests for aebnas/deploy/torchscript.py: export a retrained run of a real search to one TorchScript file
(``EarlyExitNet.infer`` with its thresholds and preprocessing inside), refuse files carrying
pickled objects, and classify image files with the export (without Ray)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from aebnas.cli import main
from aebnas.config import ExitModuleConfig, uniform_arch
from aebnas.data.batches import BatchLoader
from aebnas.data.datasets import load_dataset
from aebnas.exit_policy import load_exit_outputs, simulate, tune_thresholds
from aebnas.deploy.torchscript import DeployedEarlyExitNet, export, load_run, predict
from aebnas.nn import EarlyExitNet, torch_confidence
from aebnas.deploy.retrain import RetrainRequest, retrain
from conftest import make_confident
from aebnas.settings import parse_trial_config
from aebnas.training.loop import load_checkpoint, recalibrate_bn
from aebnas.deploy.pick import load_experiment_data
from aebnas.search.trials import read_experiment_dir
from conftest import Evil

EPOCHS = 1  # export and predict need a finished run, not a good one
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def _run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def experiment(tiny_search):
    path, results, exp = tiny_search
    assert results.num_errors == 0
    # the trial with the most exits exercises the most of the exit machinery
    trial = max(read_experiment_dir(path).trials, key=lambda t: parse_trial_config(t.config)[0].num_exits)
    return path, exp, trial.name


@pytest.fixture(scope="module")
def run(experiment, tmp_path_factory):
    """A retrain run of the experiment's trial with the most exits."""
    path, _, trial = experiment
    out = tmp_path_factory.mktemp("retrain") / "run"
    metrics = retrain(RetrainRequest(str(path), trial=trial, epochs=EPOCHS, out=str(out)), log=lambda _: None)
    assert load_run(out).net.num_exits >= 2
    return out, metrics


# ----------------------------------------------------------------- export
def _median_thresholds(net, x):
    """Per exit, about the median confidence of the samples that reach it: several exits are taken.

    Each threshold lies halfway between two confidences, so no sample sits on a threshold,
    where rounding differences of 1e-7 could decide its exit.
    """
    thresholds, remaining = [], torch.ones(len(x), dtype=torch.bool)
    with torch.no_grad():
        outputs = net(x)
    for logits in outputs[:-1]:
        conf = torch_confidence(logits, net.confidence)
        reaching = conf[remaining].sort().values
        k = len(reaching) // 2
        t = float(reaching[k - 1] + reaching[k]) / 2
        thresholds.append(t)
        remaining &= conf < t
    return thresholds


def test_export_gives_infer_in_a_fresh_process_without_aebnas(run, tmp_path):
    run_dir, metrics = run
    loaded = load_run(run_dir)
    net, arch = loaded.net, loaded.net.arch
    data = load_dataset("cifar10-subset")  # the embedded subset's test split (761 images)
    batch = BatchLoader(data.x_test, data.y_test, batch_size=len(data.y_test), resolution=arch.resolution,
                        mean=metrics["data"]["mean"], std=metrics["data"]["std"], train=False)
    x = next(iter(batch))[0]
    thresholds = _median_thresholds(net, x)
    ref_logits, ref_exit = net.infer(x, thresholds)
    assert len(set(ref_exit.tolist())) == arch.num_exits + 1 >= 3  # every exit and the final are taken

    model = tmp_path / "deploy" / "model.pt"
    meta = export(run_dir, model, thresholds=thresholds, log=lambda _: None)
    assert json.loads(model.with_suffix(".json").read_text()) == meta
    assert meta["thresholds"] == thresholds and meta["resolution"] == arch.resolution
    assert meta["confidence"] == loaded.confidence == net.confidence
    assert [e["position"] for e in meta["exits"]] == [*arch.exit_positions, "final"]
    np.save(tmp_path / "images.npy", data.x_test)
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
        "extra = {'model.json': ''}\n"
        "model = torch.jit.load(sys.argv[1], _extra_files=extra)\n"
        "images = torch.from_numpy(np.load(sys.argv[2])).float() / 255\n"
        "logits, exits = model(images)\n"
        "embedded = extra['model.json']\n"
        "embedded = embedded.decode() if isinstance(embedded, bytes) else embedded\n"
        "np.savez(sys.argv[3], logits=logits.numpy(), exits=exits.numpy(), thresholds=model.thresholds(),\n"
        "         embedded=np.array(embedded))\n"
    )
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script, str(model), "images.npy", "out.npz"],
                          cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "out.npz") as got:
        np.testing.assert_array_equal(got["exits"], ref_exit.numpy())
        np.testing.assert_array_equal(got["logits"].argmax(1), ref_logits.argmax(1).numpy())
        np.testing.assert_allclose(got["logits"], ref_logits.numpy(), rtol=0, atol=1e-5)
        # the thresholds are a buffer of the file (float32), the metadata is embedded in it
        np.testing.assert_allclose(got["thresholds"], thresholds, rtol=1e-6)
        assert json.loads(str(got["embedded"])) == meta


def _check_export_of(run_dir, data, tmp_path):
    """Export ``run_dir`` as ``aebnas export`` does by default (the thresholds of its thresholds.json);
    for every image of the test split the file gives the exit and logits of ``EarlyExitNet.infer``
    with those thresholds. Returns the exits taken."""
    loaded = load_run(run_dir)
    net, arch = loaded.net, loaded.net.arch
    run_thresholds = json.loads((run_dir / "thresholds.json").read_text())["thresholds"]
    assert loaded.thresholds == run_thresholds
    model = tmp_path / "model.pt"
    meta = export(run_dir, model, log=lambda _: None)
    assert meta["thresholds"] == run_thresholds
    scripted = torch.jit.load(str(model))
    np.testing.assert_allclose(scripted.thresholds(), run_thresholds, rtol=1e-6)
    x = next(iter(BatchLoader.for_split(data, "test", batch_size=len(data.y_test), resolution=arch.resolution,
                                        train=False)))[0]  # what evaluation feeds the network
    ref_logits, ref_exit = net.infer(x, run_thresholds)
    logits, exits = scripted(torch.from_numpy(data.x_test))  # the uint8 images as they are in the file
    assert torch.equal(exits, ref_exit)
    # float32 from two graphs (TorchScript's, with the preprocessing inside; eager): oneDNN may pick other kernels
    # and thread splits for each, so logits agree to about 1e-4 (5e-5 seen on a fresh clone), not to the last bit
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    # the test metrics of the export are those of these outputs
    accuracy = float((logits.argmax(1) == torch.from_numpy(data.y_test)).float().mean()) * 100
    assert meta["test"]["accuracy"] == pytest.approx(accuracy)
    utilization = np.bincount(exits.numpy(), minlength=arch.num_exits + 1) / len(exits)
    assert meta["test"]["utilization"] == pytest.approx(list(utilization))
    return exits


def test_exported_file_gives_infer_with_the_run_thresholds_on_every_test_image(experiment, run, tmp_path):
    path, _, _ = experiment
    run_dir, metrics = run
    data = load_experiment_data(read_experiment_dir(path))  # the search's split: the run's test images
    assert len(data.y_test) == metrics["data"]["test"]
    # model.pt carries the run's thresholds too (a buffer of the network), and infer() uses them
    loaded = load_run(run_dir)
    assert loaded.thresholds == metrics["thresholds"]
    np.testing.assert_allclose(loaded.net.thresholds.numpy(), metrics["thresholds"], rtol=1e-6)
    x = next(iter(BatchLoader.for_split(data, "test", batch_size=len(data.y_test),
                                        resolution=loaded.net.arch.resolution, train=False)))[0]
    stored, given = loaded.net.infer(x), loaded.net.infer(x, metrics["thresholds"])
    assert torch.equal(stored[0], given[0]) and torch.equal(stored[1], given[1])

    exits = _check_export_of(run_dir, data, tmp_path / "run")
    assert list(np.bincount(exits.numpy(), minlength=len(metrics["thresholds"]) + 1) / len(exits)) == \
        pytest.approx(metrics["test"]["utilization"])
    # After one epoch the exits are rarely confident enough for the threshold grid (often all
    # off): the same run with thresholds that send test images out of every exit.
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    thresholds = _median_thresholds(loaded.net, x)
    settings = json.loads((copy / "thresholds.json").read_text())
    (copy / "thresholds.json").write_text(json.dumps({**settings, "thresholds": thresholds}))
    exits = _check_export_of(copy, data, tmp_path / "copy")
    assert len(set(exits.tolist())) == loaded.net.num_exits + 1


def test_export_cli_retunes_thresholds_for_a_target(run, tmp_path, capsys):
    run_dir, metrics = run
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
    np.testing.assert_allclose(torch.jit.load(str(tmp_path / "m.pt")).thresholds(), tuned.thresholds, rtol=1e-6)


def test_export_errors_name_the_problem(tmp_path, capsys):
    code, _, err = _run_cli(capsys, "export", tmp_path / "none", "--out", tmp_path / "m.pt")
    assert code == 2 and f"run directory {tmp_path / 'none'} does not exist" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "checkpoint.pt").write_bytes(b"")
    code, _, err = _run_cli(capsys, "export", tmp_path / "half", "--out", tmp_path / "m.pt")
    assert code == 2 and "lacks arch.json, model.pt" in err and "rerun the same `aebnas retrain`" in err


def test_export_refuses_a_model_file_carrying_pickled_objects(run, tmp_path, capsys):
    run_dir, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    marker = tmp_path / "ran"
    torch.save({**load_checkpoint(copy / "model.pt"), "evil": Evil(marker)}, copy / "model.pt")
    code, out, err = _run_cli(capsys, "export", copy, "--out", tmp_path / "m.pt")
    assert code == 2, out
    assert f"{copy / 'model.pt'}: refused: it holds pickled Python objects" in err
    assert not marker.exists() and not (tmp_path / "m.pt").exists()
    # the file does run code when loaded without weights_only: the refusal is what kept it from running
    torch.load(copy / "model.pt", weights_only=False)
    assert marker.read_text() == "code ran while loading"


def _confident_net(resolution, exits=(1, 2, 3)):
    """A small random network whose exit confidences spread over [0, 1] (see tests/test_nn.py)."""
    torch.manual_seed(0)
    arch = uniform_arch(2, 3, 3, exits=exits, exit_module=ExitModuleConfig(8, 3, 2, 1), width_mult=0.25,
                        resolution=resolution)
    return make_confident(EarlyExitNet(arch), torch.randn(32, 3, resolution, resolution))


def test_deployed_module_normalises_and_resizes_like_training():
    net = _confident_net(resolution=40)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    loader = BatchLoader(images, torch.zeros(64, dtype=torch.long), batch_size=64, resolution=40, mean=mean,
                         std=std, train=False)
    x = next(iter(loader))[0]  # what training and evaluation feed the network
    thresholds = _median_thresholds(net, x)
    ref_logits, ref_exit = net.infer(x, thresholds)
    assert len(set(ref_exit.tolist())) == 4
    module = torch.jit.script(DeployedEarlyExitNet(net, thresholds, mean, std, [str(i) for i in range(10)]))
    assert not any(m.training for m in module.modules())
    np.testing.assert_allclose(module.thresholds(), thresholds, rtol=1e-6)
    for given in (images, images.float() / 255):  # uint8 and float in [0, 1]
        logits, exits = module(given)
        assert torch.equal(exits, ref_exit) and torch.equal(logits.argmax(1), ref_logits.argmax(1))
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(module.exit_confidence(logits), torch_confidence(ref_logits, "margin"),
                                   atol=1e-4, rtol=1e-4)
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
    # the network's confidence measure is the module's; the wrapped network is a copy
    entropy_net = _confident_net(resolution=40)
    entropy_net.confidence = "entropy"
    deployed = DeployedEarlyExitNet(entropy_net, thresholds, mean, std, [str(i) for i in range(10)])
    assert deployed.net.confidence == "entropy" and deployed.net is not entropy_net
    torch.testing.assert_close(deployed.exit_confidence(ref_logits), torch_confidence(ref_logits, "entropy"))
    assert entropy_net.thresholds.tolist() == [1.0, 1.0, 1.0]  # set on the copy only
    with pytest.raises(ValueError, match="9 classes"):
        DeployedEarlyExitNet(net, thresholds, mean, std, [str(i) for i in range(9)])


def test_a_disabled_exit_is_not_computed():
    net = _confident_net(resolution=32)
    module = DeployedEarlyExitNet(net, [1.0, 0.0, 1.0], (0.5,) * 3, (0.25,) * 3, [str(i) for i in range(10)])
    calls = []
    for branch in module.net.exits:
        branch.register_forward_hook(lambda m, args, out: calls.append(f"exit after stage {m.position}"))
    for s, stage in enumerate(module.net.stages):
        stage.register_forward_hook(lambda m, args, out, s=s: calls.append(f"stage {s + 1}"))
    module.net.head.register_forward_hook(lambda m, args, out: calls.append("head"))
    _, exits = module(torch.rand(4, 3, 32, 32))
    assert exits.tolist() == [1, 1, 1, 1]  # threshold 0: everyone leaves at exit 2 (after stage 2)
    # exit 1 (off) never ran, nothing after exit 2 ran
    assert calls == ["stage 1", "stage 2", "exit after stage 2"]


def test_a_network_without_exits_exports_as_a_static_network():
    torch.manual_seed(0)
    net = EarlyExitNet(uniform_arch(2, 3, 3, exits=(), width_mult=0.25, resolution=32)).eval()
    module = torch.jit.script(DeployedEarlyExitNet(net, [], (0.5,) * 3, (0.2,) * 3, [str(i) for i in range(10)]))
    x = torch.rand(3, 3, 32, 32)
    logits, exits = module(x)
    assert exits.tolist() == [0, 0, 0] and module.exit_positions == [] and module.thresholds() == []
    torch.testing.assert_close(logits, net((x - 0.5) / 0.2)[-1])


# ----------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    run_dir, _ = run
    model = tmp_path_factory.mktemp("export") / "model.pt"
    export(run_dir, model, log=lambda _: None)
    return model


def _write_images(folder):
    data = load_dataset("cifar10-subset")
    paths = []
    for i in range(3):
        paths.append(folder / f"test{i}.png")
        Image.fromarray(data.x_test[i].transpose(1, 2, 0)).save(paths[-1])
    paths.append(folder / "big gray.jpg")  # larger than the model's input, grayscale, a space in the name
    Image.fromarray(data.x_test[3].transpose(1, 2, 0)).resize((96, 64)).convert("L").save(paths[-1])
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
            logits, exits = module(torch.from_numpy(data.x_test[i:i + 1]))
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


def test_predict_runs_without_ray(exported, tmp_path):
    """``python -m aebnas.cli predict`` with Ray unimportable (a machine with torch, no Ray)."""
    paths, _ = _write_images(tmp_path)
    script = (
        "import sys\n"
        "sys.modules['ray'] = None  # `import ray` raises ImportError from here on\n"
        "from aebnas.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "loaded = sorted(m for m, v in sys.modules.items() if m.split('.')[0] == 'ray' and v is not None)\n"
        "if loaded:\n    raise SystemExit('ray modules were loaded: ' + ', '.join(loaded))\n"
        "try:  # the block works: a module that needs Ray cannot be imported\n"
        "    import aebnas.search.trainable\n"
        "except ImportError as exc:\n"
        "    print(exc, file=sys.stderr)\n"
        "else:\n"
        "    raise SystemExit('Ray was not blocked')\n"
        "sys.exit(code)\n"
    )
    argv = ["predict", str(exported), *map(str, paths), "--json"]
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "import of ray halted" in proc.stderr
    rows = json.loads(proc.stdout)
    expected = predict(exported, paths)  # in this process, where Ray is importable
    assert [r["path"] for r in rows] == [p.path for p in expected] == [str(p) for p in paths]
    assert [(r["class_index"], r["exit"], r["position"]) for r in rows] == \
        [(p.class_index, p.exit, p.position) for p in expected]
    assert [r["probability"] for r in rows] == pytest.approx([p.probability for p in expected], abs=1e-6)
