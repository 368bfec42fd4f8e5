"""The whole job (aebnas.pipeline): search, retrain, ONNX export and the export checked on test images,
each stage resumable; on a tiny real search."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from aebnas.errors import ExperimentError
from aebnas.search.experiment import experiment_path
from aebnas.pipeline import DEPLOY_DIR, JOB_FILE, PREDICT_FILE, Deployment, check_export, job_name, run_job
from tests.conftest import tiny_experiment

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def job(ray_local, small_npz, tmp_path_factory):
    exp = tiny_experiment(tmp_path_factory.mktemp("job"), small_npz, name=None, epochs=1, num_samples=2)
    deploy = Deployment(retrain_epochs=1, inherit=False)
    record = run_job(exp, deploy)
    root = experiment_path(dataclasses.replace(exp, name=job_name(exp)))
    return exp, deploy, record, root


def test_job_runs_every_stage_and_the_export_measures_what_retrain_measured(job):
    exp, _, record, root = job
    out = f"{root}/{DEPLOY_DIR}"
    metrics = json.loads(open(f"{out}/retrain/metrics.json").read())
    assert root.endswith("aebnas_cifar_small_s0")
    assert record["images"] == 200  # every test image of the .npz, as PNG files
    assert record["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=0.1)
    assert np.allclose(record["exit_share"], metrics["test"]["utilization"], atol=0.01)
    assert sum(record["exit_share"]) == pytest.approx(1.0)
    stages = json.loads(open(f"{out}/{JOB_FILE}").read())["stages"]
    assert set(stages) == {"search", "retrain", "export", "predict"}
    assert all(s["seconds"] > 0 for s in stages.values())


def test_rerun_skips_finished_stages_and_redoes_a_missing_one(job, capsys):
    exp, deploy, record, root = job
    out = f"{root}/{DEPLOY_DIR}"
    model_before = open(f"{out}/retrain/model.pt", "rb").read()
    shutil.rmtree(f"{out}/onnx")  # as if the job had stopped during the export
    (Path(out) / PREDICT_FILE).unlink()
    again = run_job(exp, deploy)
    printed = capsys.readouterr().out
    assert "retrain: done before, skipped" in printed
    assert "export ..." in printed and "predict ..." in printed
    assert open(f"{out}/retrain/model.pt", "rb").read() == model_before  # not retrained
    assert again["accuracy"] == record["accuracy"] and again["exit_share"] == record["exit_share"]


def test_an_export_that_disagrees_with_the_measured_run_is_refused(job, tmp_path):
    exp, _, _, root = job
    out = f"{root}/{DEPLOY_DIR}"
    retrain_copy = tmp_path / "retrain"
    shutil.copytree(f"{out}/retrain", retrain_copy)
    metrics = json.loads((retrain_copy / "metrics.json").read_text())
    metrics["test"]["accuracy"] += 5.0  # what a stale or wrong export would look like
    (retrain_copy / "metrics.json").write_text(json.dumps(metrics))
    shutil.copytree(f"{out}/test_images", tmp_path / "test_images")
    with pytest.raises(ExperimentError, match="differs from the retrained run"):
        check_export(exp, retrain_copy, Path(out) / "onnx", tmp_path, None)
    assert not (tmp_path / PREDICT_FILE).exists()


def test_bad_deployment_settings_are_named():
    with pytest.raises(ExperimentError, match="retrain_epochs"):
        Deployment(retrain_epochs=-1).validate()
    with pytest.raises(ExperimentError, match="inherit"):
        Deployment(retrain_epochs=0, inherit=False).validate()
    with pytest.raises(ExperimentError, match="predict_images"):
        Deployment(predict_images=0).validate()
