"""Tests for ``aebnas export --format onnx`` (aebnas/deploy/onnx_export.py) and its driver
(aebnas/onnx_runner.py): on every test image the ONNX graphs take the exit of
``EarlyExitNet.infer`` with logits within 1e-4; the export runs with numpy and onnxruntime
alone; ``aebnas predict`` takes the export directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from aebnas.data.batches import BatchLoader  # noqa: E402
from aebnas.data.datasets import load_dataset  # noqa: E402
from aebnas.deploy.torchscript import DeployedEarlyExitNet, export, load_run, predict  # noqa: E402
from aebnas.deploy.onnx_export import export_onnx  # noqa: E402
from aebnas.onnx_runner import OnnxEarlyExitNet  # noqa: E402
from test_export import _median_thresholds, _run_cli, _write_images, experiment, run  # noqa: E402,F401

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


@pytest.fixture(scope="module")
def onnx_export(run, tmp_path_factory):
    """The run exported to ONNX with thresholds that send test images to every exit, and those inputs."""
    run_dir, metrics = run
    net = load_run(run_dir).net
    data = load_dataset("cifar10-subset")  # the embedded subset's test split (761 images)
    batch = BatchLoader(data.x_test, data.y_test, batch_size=len(data.y_test), resolution=net.arch.resolution,
                        mean=metrics["data"]["mean"], std=metrics["data"]["std"], train=False)
    x = next(iter(batch))[0]  # what evaluation feeds the network
    thresholds = _median_thresholds(net, x)
    out = tmp_path_factory.mktemp("onnx") / "model_onnx"
    lines = []
    meta = export_onnx(run_dir, out, thresholds=thresholds, log=lines.append)
    return out, meta, net, data, x, thresholds, lines


def test_onnx_export_takes_the_exits_of_infer_on_every_test_image(onnx_export):
    out, meta, net, data, x, thresholds, lines = onnx_export
    arch = net.arch
    ref_logits, ref_exit = net.infer(x, thresholds)
    assert len(set(ref_exit.tolist())) == arch.num_exits + 1 >= 3  # every exit and the final are taken
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.json", "aebnas_onnx.py", *(f"segment_{k}.onnx" for k in range(arch.num_exits + 1)),
         *(f"exit_{j}.onnx" for j in range(arch.num_exits))])
    assert json.loads((out / "model.json").read_text()) == meta
    assert meta["thresholds"] == thresholds and meta["resolution"] == arch.resolution
    assert [e["position"] for e in meta["exits"]] == [*arch.exit_positions, "final"]
    assert len([ln for ln in lines if ".onnx" in ln]) == 2 * arch.num_exits + 1  # progress, one line per graph

    onnx_net = OnnxEarlyExitNet(out, threads=1)
    assert onnx_net.thresholds == thresholds and onnx_net.exit_positions == list(arch.exit_positions)
    logits, exits, confidence = onnx_net(data.x_test)  # the uint8 images as they are in the file
    np.testing.assert_array_equal(exits, ref_exit.numpy())
    np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=0, atol=1e-4)
    from aebnas.nn import torch_confidence
    np.testing.assert_allclose(confidence, torch_confidence(ref_logits, net.confidence).numpy(), rtol=0, atol=1e-4)
    # float input in [0, 1] is the same images
    logits_f, exits_f, _ = onnx_net(data.x_test.astype(np.float32) / 255)
    np.testing.assert_array_equal(exits_f, exits)
    np.testing.assert_allclose(logits_f, logits, rtol=0, atol=1e-5)
    # thresholds are editable: all off → every image at the final classifier, as infer says
    onnx_net.thresholds = [1.0] * arch.num_exits
    logits_off, exits_off, _ = onnx_net(data.x_test[:64])
    ref_off_logits, ref_off_exit = net.infer(x[:64], [1.0] * arch.num_exits)
    assert (exits_off == arch.num_exits).all() and torch.equal(torch.from_numpy(exits_off), ref_off_exit)
    np.testing.assert_allclose(logits_off, ref_off_logits.numpy(), rtol=0, atol=1e-4)


def test_exit_modules_resize_bicubically_in_onnx_as_in_pytorch(onnx_export):
    """Every exit module's resize is an ONNX Resize in cubic mode with PyTorch's coefficient (-0.75) and
    coordinate mode (half pixel, align_corners=False), so the graphs agree with PyTorch's bicubic."""
    import onnx

    out, meta, net, *_ = onnx_export
    modules = sum(e.depth for e in net.arch.exits)
    assert modules >= 1
    nodes = [n for j in range(net.arch.num_exits) for n in onnx.load(str(out / f"exit_{j}.onnx")).graph.node
             if n.op_type == "Resize"]
    assert len(nodes) == modules
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["mode"] == b"cubic"
        assert attrs.get("cubic_coeff_a", -0.75) == pytest.approx(-0.75)
        assert attrs.get("coordinate_transformation_mode", b"half_pixel") in (b"half_pixel", b"pytorch_half_pixel")
        assert attrs.get("exclude_outside", 0) == 0


def test_onnx_export_resizes_like_the_torchscript_export(onnx_export):
    """Images of another size go through the same normalisation and bilinear resize as in TorchScript."""
    out, meta, net, data, _, thresholds, _ = onnx_export
    deployed = DeployedEarlyExitNet(net, thresholds, meta["mean"], meta["std"], meta["classes"])
    rng = np.random.default_rng(0)
    for shape in [(5, 3, 48, 48), (3, 3, 20, 27)]:
        images = rng.random(shape, dtype=np.float32)
        ref_logits, ref_exit = deployed(torch.from_numpy(images))
        logits, exits, _ = OnnxEarlyExitNet(out, threads=1)(images)
        np.testing.assert_array_equal(exits, ref_exit.numpy())
        np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=0, atol=1e-4)


def test_onnx_export_runs_with_only_numpy_and_onnxruntime(onnx_export, tmp_path):
    out, _, _, data, _, _, _ = onnx_export
    np.save(tmp_path / "images.npy", data.x_test)
    import onnxruntime

    # -I -S: no site-packages processing (the editable install of aebnas is invisible); only
    # the directories holding numpy and onnxruntime go on the path, and torch and aebnas are blocked.
    site = sorted({str(Path(m.__file__).resolve().parents[1]) for m in (np, onnxruntime)})
    script = (
        "import sys\n"
        f"sys.path.extend({site!r})\n"
        "sys.modules['torch'] = None\nsys.modules['aebnas'] = None\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from aebnas_onnx import OnnxEarlyExitNet\n"
        "import numpy as np\n"
        "net = OnnxEarlyExitNet(sys.argv[1], threads=1)\n"
        "logits, exits, confidence = net(np.load(sys.argv[2]))\n"
        "loaded = sorted(m for m, v in sys.modules.items() if m.split('.')[0] in ('torch', 'aebnas') and v)\n"
        "if loaded:\n    raise SystemExit('loaded: ' + ', '.join(loaded))\n"
        "np.savez(sys.argv[3], logits=logits, exits=exits, confidence=confidence)\n"
    )
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script, str(out), "images.npy", "out.npz"],
                          cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    logits, exits, confidence = OnnxEarlyExitNet(out, threads=1)(data.x_test)
    with np.load(tmp_path / "out.npz") as got:
        np.testing.assert_array_equal(got["exits"], exits)
        np.testing.assert_allclose(got["logits"], logits, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got["confidence"], confidence, rtol=0, atol=1e-6)


def test_predict_accepts_the_onnx_export(onnx_export, run, tmp_path, capsys):
    out, meta, *_ = onnx_export
    paths, _ = _write_images(tmp_path)
    torchscript = tmp_path / "model.pt"
    export(run[0], torchscript, thresholds=meta["thresholds"], log=lambda _: None)
    code, text, err = _run_cli(capsys, "predict", out, *paths, "--json")
    assert code == 0, err
    rows = json.loads(text)
    expected = predict(torchscript, paths)  # the TorchScript export of the same thresholds
    assert [(r["path"], r["class_index"], r["exit"], r["position"]) for r in rows] == \
        [(p.path, p.class_index, p.exit, p.position) for p in expected]
    assert [r["probability"] for r in rows] == pytest.approx([p.probability for p in expected], abs=1e-4)
    assert [r["confidence"] for r in rows] == pytest.approx([p.confidence for p in expected], abs=1e-4)


@pytest.mark.slow  # a second export of every graph (about 30 s); the fixture's export is checked by default
def test_onnx_cli_export_retunes_for_a_target(run, tmp_path, capsys):
    run_dir, metrics = run
    out = tmp_path / "cli_onnx"
    code, text, err = _run_cli(capsys, "export", run_dir, "--format", "onnx", "--out", out,
                               "--target-macs", metrics["target_macs"] * 0.8)
    assert code == 0, err
    meta = json.loads((out / "model.json").read_text())
    assert meta["target_macs"] == pytest.approx(metrics["target_macs"] * 0.8)
    assert "exported" in text and "ONNX graphs" in text


def test_onnx_cli_errors(run, onnx_export, tmp_path, capsys):
    run_dir, _ = run
    meta = onnx_export[1]
    # a file where the directory should go; a directory that is something else; not an export
    (tmp_path / "a_file").write_text("x")
    code, _, err = _run_cli(capsys, "export", run_dir, "--format", "onnx", "--out", tmp_path / "a_file")
    assert code == 2 and "is a file; ONNX export writes a directory" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = _run_cli(capsys, "export", run_dir, "--format", "onnx", "--out", tmp_path / "other")
    assert code == 2 and "non-empty directory that is not an ONNX export" in err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    paths, _ = _write_images(tmp_path)
    code, _, err = _run_cli(capsys, "predict", tmp_path / "other", paths[0])
    assert code == 2 and "is not an ONNX export of aebnas: it has no model.json" in err
    n = len(meta["thresholds"])
    with pytest.raises(ValueError, match=f"thresholds has {n + 1} values but the network has {n} exits"):
        OnnxEarlyExitNet(onnx_export[0]).thresholds = [0.5] * (n + 1)
    with pytest.raises(ValueError, match=r"not in \[0, 1\]"):
        OnnxEarlyExitNet(onnx_export[0]).thresholds = [1.5] * len(meta["thresholds"])
