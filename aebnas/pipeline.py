"""The whole job in one command: search, retrain of the pick, export, and the export checked on test images.

A tune_config that calls :func:`job_main` runs, in order (each stage is skipped when its result is
on disk and resumed when it was interrupted, so rerunning the same command continues the job)::

    1 search   STORAGE/NAME                 Ray Tune (resumed); its supernet first, when it trains one
    2 retrain  STORAGE/NAME/deploy/retrain  `aebnas retrain --best [--inherit]`; done when metrics.json is there
    3 export   STORAGE/NAME/deploy/onnx     `aebnas export --format onnx`; done when model.json is there
    4 predict  STORAGE/NAME/deploy/test_images/*.png classified by the export with `aebnas predict`'s code;
               its accuracy must equal the retrained run's test accuracy -> deploy/predict.json

``deploy/job.json`` records each stage's wall-clock seconds (the CPU-hours of the results table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data.datasets import DatasetNotFoundError, dataset_label, load_dataset
from .errors import ExperimentError, UsageError
from .search.experiment import Experiment, experiment_path
from .deploy.torchscript import predict
from .files import atomic_write
from .search.flags import add_arguments, experiment_from_args, run_cli
from .deploy.onnx_export import export_onnx
from .deploy.retrain import RetrainRequest, retrain
from .search.storage import is_empty
from .search.tuner import run

DEPLOY_DIR = "deploy"
JOB_FILE = "job.json"
PREDICT_FILE = "predict.json"
# ONNX Runtime and PyTorch may round a confidence differently at a threshold: at most this share of test
# images may take another exit or class in the export than in the retrained run
MAX_DISAGREEMENT = 0.001


@dataclass(frozen=True)
class Deployment:
    """The stages after the search. ``retrain_epochs`` fine-tune the pick from the supernet's weights
    (``inherit``) or train it from scratch; ``predict_images``: test images written as PNG files and
    classified by the export (None: all)."""

    retrain_epochs: int = 5
    inherit: bool = True
    predict_images: int | None = None

    def validate(self) -> None:
        if not isinstance(self.retrain_epochs, int) or self.retrain_epochs < 0:
            raise ExperimentError(f"retrain_epochs={self.retrain_epochs!r} must be an integer ≥ 0")
        if self.retrain_epochs == 0 and not self.inherit:
            raise ExperimentError("retrain_epochs=0 scores inherited weights: it needs inherit=True")
        if self.predict_images is not None and self.predict_images < 1:
            raise ExperimentError(f"predict_images={self.predict_images!r} must be ≥ 1 (None: every test image)")


def job_name(exp: Experiment) -> str:
    """A fixed name, so that rerunning the command finds the job: SPACE_DATASET_sSEED."""
    return exp.name or f"{exp.space}_{dataset_label(exp.dataset)}_s{exp.seed}"


class _Stages:
    """The job's record of stage times, written after every stage (``deploy/job.json``)."""

    def __init__(self, deploy_dir: Path) -> None:
        self.path = deploy_dir / JOB_FILE
        self.record: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def run(self, name: str, done: bool, work: Callable[[], Any]) -> Any:
        if done:
            print(f"aebnas job: {name}: done before, skipped", flush=True)
            return None
        print(f"aebnas job: {name} ...", flush=True)
        start = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - start
        stages = self.record["stages"]
        stages[name] = {"seconds": stages.get(name, {}).get("seconds", 0.0) + seconds}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(self.record, indent=1)))
        return result


def run_job(exp: Experiment, deploy: Deployment) -> dict[str, Any]:
    """Run (or continue) the whole job; returns ``deploy/predict.json``'s record."""
    deploy.validate()
    exp = dataclasses.replace(exp, name=job_name(exp))
    root = Path(experiment_path(exp))
    if "://" in str(root):
        raise ExperimentError("the whole job keeps its retrained run and export under a local storage_path")
    out = root / DEPLOY_DIR
    stages = _Stages(out)

    def search() -> None:
        results = run(dataclasses.replace(exp, resume=not is_empty(str(root))))
        if len(results) == 0 or results.num_errors == len(results):
            raise ExperimentError(f"the search in {root} has no finished trial")

    retrain_dir, onnx_dir = out / "retrain", out / "onnx"
    # A finished search is restored and returned as it is (Ray Tune): the stage is cheap to repeat.
    stages.run("search", False, search)
    # `aebnas retrain ROOT --best [--inherit] --epochs N --out ...` and `aebnas export --format onnx`
    stages.run("retrain", (retrain_dir / "metrics.json").exists(), lambda: retrain(RetrainRequest(
        str(root), best=True, inherit=deploy.inherit, epochs=deploy.retrain_epochs, out=str(retrain_dir))))
    stages.run("export", (onnx_dir / "model.json").exists(), lambda: export_onnx(retrain_dir, onnx_dir))
    stages.run("predict", (out / PREDICT_FILE).exists(), lambda: check_export(exp, retrain_dir, onnx_dir, out,
                                                                              deploy.predict_images))
    record = json.loads((out / PREDICT_FILE).read_text())
    print(f"aebnas job: done. {record['summary']}\n  stage times: " + ", ".join(
        f"{k} {v['seconds'] / 60:.1f} min" for k, v in stages.record["stages"].items()), flush=True)
    return record


def write_test_images(exp: Experiment, out: Path, limit: int | None) -> tuple[list[Path], np.ndarray]:
    """The test split as PNG files (``out/test_images/NNNNN.png``, labels in ``labels.json``); reused
    when already written."""
    from PIL import Image

    folder = out / "test_images"
    labels_file = folder / "labels.json"
    if labels_file.exists():
        labels = json.loads(labels_file.read_text())
        return [folder / name for name in labels], np.array(list(labels.values()), dtype=np.int64)
    data = load_dataset(exp.dataset, data_dir=exp.data_dir, download=exp.download, val_size=exp.val_size,
                        seed=exp.data_split_seed, image_size=exp.image_size, test_size=exp.test_size)
    n = len(data.y_test) if limit is None else min(limit, len(data.y_test))
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    for i in range(n):
        image = data.x_test[i]
        array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        name = f"{i:05d}.png"
        Image.fromarray(np.ascontiguousarray(array)).save(folder / name)
        labels[name] = int(data.y_test[i])
    atomic_write(labels_file, lambda tmp: tmp.write_text(json.dumps(labels)))  # last: the folder is complete
    return [folder / name for name in labels], np.array(list(labels.values()), dtype=np.int64)


def check_export(exp: Experiment, retrain_dir: Path, onnx_dir: Path, out: Path, limit: int | None) -> dict[str, Any]:
    """Classify the test images with the export and compare with the retrained run's test figures."""
    metrics = json.loads((retrain_dir / "metrics.json").read_text())
    paths, labels = write_test_images(exp, out, limit)
    start = time.perf_counter()
    predictions = predict(onnx_dir, paths)
    seconds = time.perf_counter() - start
    classes = np.array([p.class_index for p in predictions])
    exits = np.array([p.exit for p in predictions])
    num_exits = predictions[0].num_exits
    accuracy = 100.0 * float((classes == labels).mean())
    share = np.bincount(exits, minlength=num_exits + 1) / len(exits)
    expected = metrics["test"]["accuracy"]
    record = {
        "images": len(paths), "accuracy": accuracy, "retrain_test_accuracy": expected,
        "exit_share": share.tolist(), "retrain_exit_share": metrics["test"]["utilization"],
        "early_exit_share": float(share[:-1].sum()), "avg_macs_retrain": metrics["test"]["avg_macs"],
        "seconds": seconds, "images_per_s": len(paths) / seconds,
        "summary": (f"the ONNX export classifies {len(paths)} test images (PNG) at {accuracy:.2f}% "
                    f"(retrain measured {expected:.2f}%), {100 * share[:-1].sum():.1f}% leaving early, "
                    f"{metrics['test']['avg_macs']:.3f} MMACs on average"),
    }
    if limit is None and abs(accuracy - expected) > 100 * MAX_DISAGREEMENT:
        raise ExperimentError(f"the export's test accuracy {accuracy:.2f}% differs from the retrained run's "
                              f"{expected:.2f}% by more than {100 * MAX_DISAGREEMENT:g} points: {onnx_dir} is "
                              "not the network that was measured")
    atomic_write(out / PREDICT_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    print(f"aebnas job: {record['summary']}", flush=True)
    return record


def job_main(defaults: Experiment, deploy: Deployment, argv: Sequence[str] | None = None,
             description: str | None = None) -> int:
    """Command line of a whole-job tune_config: the search's flags plus the deployment's; returns the
    exit code. ``--search-only`` stops after the search."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, defaults)
    job = parser.add_argument_group("the stages after the search")
    job.add_argument("--retrain-epochs", type=int, default=deploy.retrain_epochs,
                     help=f"epochs that retrain the pick (default: {deploy.retrain_epochs})")
    job.add_argument("--from-scratch", action="store_true",
                     help="retrain the pick from scratch instead of from the supernet's weights")
    job.add_argument("--predict-images", type=int, default=deploy.predict_images,
                     help="test images the export classifies (default: all)")
    job.add_argument("--search-only", action="store_true", help="stop after the search")
    args = parser.parse_args(argv)
    exp = experiment_from_args(args, defaults)
    deploy = Deployment(retrain_epochs=args.retrain_epochs, inherit=not args.from_scratch,
                        predict_images=args.predict_images)
    try:
        if args.search_only:
            named = dataclasses.replace(exp, name=job_name(exp))
            return run_cli(dataclasses.replace(named, resume=not is_empty(experiment_path(named))))
        run_job(exp, deploy)
    except (ExperimentError, UsageError, DatasetNotFoundError) as exc:
        print(f"aebnas: error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["Deployment", "check_export", "job_main", "job_name", "run_job", "write_test_images"]
