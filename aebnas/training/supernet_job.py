"""``aebnas supernet train``: a supernet trained data-parallel on Ray Train, checkpointed every epoch.

``train_supernet(request)`` runs :class:`aebnas.training.supernet.SupernetTraining` as a Ray Train
``TorchTrainer`` (gloo on CPU, NCCL on GPU) on the cluster a search uses. Every epoch the
first worker evaluates the largest and smallest subnets on the validation split, prints
a line, and writes a checkpoint (resume state and the supernet file) to
``OUT/train`` — the run's Ray Train storage. Running the same command again after a crash
resumes from the last checkpoint (Ray Train picks up a run of the same name and
storage path); a finished run is reused, not retrained. The final supernet is written to
``OUT/supernet.pt``.

``workers=0`` trains in this process without Ray (one device): for a single GPU machine,
and the same code path per worker.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from search_spaces import SPACES

from ..config import SpaceValues
from ..data.datasets import Dataset, load_dataset
from ..errors import ExperimentError
from ..progress import Progress, print_line
from ..settings import CHECKPOINT_FILE, SUPERNET_FILE
from ..space_values import space_values_of
from .supernet_file import VERSION, SupernetSettings, load_supernet, read_supernet_info, save_supernet
from .supernet import SupernetTraining
from .loop import load_checkpoint, select_device

REQUEST_FILE = "supernet_request.json"
RUN_NAME = "train"


@dataclass(frozen=True)
class SupernetRequest:
    """What ``aebnas supernet train`` trains, where, and on what.

    The dataset split (``val_size``, ``split_seed``) must be the one of the searches that
    will use the supernet: it trains on that split's training images only, and a search
    refuses a supernet that has seen its validation or test images.
    """

    out: str = "aebnas_supernet"
    dataset: str = "cifar10-subset"
    space_name: str = "aebnas"  # aebnas, fixed_exits and static share the value sets: one supernet serves all
    data_dir: str | None = None
    download: bool = False
    val_size: int | None = None
    image_size: int | None = None  # a folder of images: the size they are stored at (None: from the images)
    test_size: float | None = None  # a folder without a test folder: its test split (None: the default)
    split_seed: int = 0
    space_kwargs: dict[str, Any] = field(default_factory=dict)
    width_mult: float = 1.0
    settings: SupernetSettings = field(default_factory=SupernetSettings)
    workers: int = 1
    cpus_per_worker: float | None = None  # None: the cluster's CPUs shared out among the workers
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    address: str | None = None
    max_failures: int = 2
    compile: bool = False  # torch.compile the largest and smallest subnets' steps (speed only: not in identity())
    static_shapes: bool = False  # the static-shape step, compiled per resolution (the same gradients: not in identity())

    @property
    def space(self) -> SpaceValues:
        try:
            return space_values_of(self.space_kwargs)
        except (TypeError, ValueError) as exc:
            raise ExperimentError(f"space_kwargs={self.space_kwargs!r}: {exc}") from None

    def validate(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ExperimentError(f"workers={self.workers!r} must be an integer ≥ 0 (0: in this process, no Ray)")
        for name in ("compile", "static_shapes"):
            if not isinstance(getattr(self, name), bool):
                raise ExperimentError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.compile and self.static_shapes:
            raise ExperimentError("compile and static_shapes were both asked for: the static-shape step compiles every subnet's "
                                  "step itself; drop compile")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ExperimentError(f"cpus_per_worker={self.cpus_per_worker!r} must be > 0")
        if self.space_name not in SPACES:
            raise ExperimentError(f"space={self.space_name!r} is not one of {tuple(SPACES)}")
        if self.width_mult <= 0:
            raise ExperimentError(f"width_mult={self.width_mult!r} must be > 0")
        self.space  # noqa: B018 (raises on a bad value set)
        if self.workers > 1 and self.settings.batch_size < self.workers:
            raise ExperimentError(f"batch_size={self.settings.batch_size} is smaller than workers={self.workers}")

    def identity(self) -> dict[str, Any]:
        """What makes two requests the same training run (a rerun resumes only if these are equal)."""
        return json.loads(json.dumps({
            "format_version": VERSION, "dataset": self.dataset, "val_size": self.val_size, "split_seed": self.split_seed,
            **{k: getattr(self, k) for k in ("image_size", "test_size") if getattr(self, k) is not None},
            "space_name": self.space_name, "space": dataclasses.asdict(self.space), "width_mult": self.width_mult,
            "settings": self.settings.to_dict()}))


def _check_request_file(out: Path, request: SupernetRequest) -> None:
    """Refuse to continue ``out`` when it was started by a different request; record it otherwise."""
    path = out / REQUEST_FILE
    now = request.identity()
    if path.exists():
        saved = json.loads(path.read_text())
        if isinstance(saved.get("settings"), dict):  # written by an older aebnas: its missing fields take the defaults
            saved["settings"] = json.loads(json.dumps(SupernetSettings.from_dict(saved["settings"]).to_dict()))
        diff = [f"{k}={now[k]!r} (saved {saved.get(k)!r})" for k in now if saved.get(k) != now[k]]
        if diff:
            raise ExperimentError(f"{out} holds a supernet run with other settings: {'; '.join(diff)}; "
                                  "use another --out, or the same settings to resume it")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=1))


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """The progress line of one epoch."""
    phase = " (warm-up: largest only)" if record.get("warmup") else ""
    return (f"supernet epoch {record['epoch']}/{epochs}{phase}: loss {record['loss']:.3f}, val accuracy "
            f"largest {record['val_acc_largest']:.1f}%, smallest {record['val_acc_smallest']:.1f}% "
            f"({record['seconds']:.0f} s, {record['images_per_s']:.0f} images/s)")


def run_epochs(run: SupernetTraining, chief: bool, save: Callable[[dict[str, Any]], None],
               log: Callable[[str], None] = print, progress_every_s: float = 30.0) -> None:
    """Train until ``run.settings.epochs``; the chief logs progress inside an epoch every
    ``progress_every_s`` seconds, and after each epoch scores largest and smallest on the validation
    split and logs; every worker calls ``save(record)``."""
    if chief and run.compiled is not None and run.epoch < run.settings.epochs:
        log("aebnas: torch.compile of the largest and smallest subnets: each one's first step compiles it "
            "(minutes on a CPU), the random subnets run eagerly")
    if chief and run.static is not None and run.epoch < run.settings.epochs:
        log("aebnas: the static-shape step: the first step at each resolution compiles its two graphs "
            "(teacher, student; minutes), then every subnet replays them")
    while run.epoch < run.settings.epochs:
        progress = Progress(f"supernet epoch {run.epoch + 1}/{run.settings.epochs}", len(run.train_batches), log,
                            every_s=progress_every_s)
        record: dict[str, Any] = {"epoch": run.epoch + 1,
                                  **run.train_epoch(on_step=progress.update if chief else None)}
        if chief:
            record["val_acc_largest"] = float(run.evaluate(run.largest).exit_accuracy()[-1])
            record["val_acc_smallest"] = float(run.evaluate(run.smallest).exit_accuracy()[-1])
            record["time"] = time.time()
            run.history.append(record)
            log(epoch_line(record, run.settings.epochs))
        save(record)


def _make_run(config: dict[str, Any], data: Dataset, device: torch.device, rank: int,
              world_size: int) -> SupernetTraining:
    return SupernetTraining(space_values_of(config["space_kwargs"]), config["width_mult"], data,
                            SupernetSettings(**config["settings"]), device, dataset_name=config["dataset"],
                            split_seed=config["split_seed"], rank=rank, world_size=world_size,
                            compile=config["compile"], static=config.get("static_shapes", False))


def _write_checkpoint(directory: Path, run: SupernetTraining) -> None:
    torch.save(run.state_dict(), directory / CHECKPOINT_FILE)
    save_supernet(directory / SUPERNET_FILE, run.model, run.info())


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker (``train_loop_per_worker``)."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    data = ray.get(config["data"])
    device = ray.train.torch.get_device()
    run = _make_run(config, data, device, rank, world_size)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            run.load_state_dict(load_checkpoint(Path(d) / CHECKPOINT_FILE, device))
        if rank == 0:
            _to_stdout(f"aebnas: resuming the supernet after epoch {run.epoch}")

    def save(record: dict[str, Any]) -> None:
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            _write_checkpoint(Path(tmp), run)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    run_epochs(run, rank == 0, save, log=_to_stdout)


def _to_stdout(line: str) -> None:
    """A line of a Ray Train worker, printed once: Ray Train (2.5x) patches ``print`` in its workers
    to send each line to its logger as well, which printed every epoch line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _train_local(request: SupernetRequest, data: Dataset, out: Path) -> None:
    """``workers=0``: the same epochs in this process; the checkpoint is ``OUT/train/checkpoint.pt``."""
    ckpt_dir = out / RUN_NAME
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    device = select_device("auto")
    config = _loop_config(request, data=None)
    run = _make_run(config, data, device, 0, 1)
    if (ckpt_dir / CHECKPOINT_FILE).exists():
        run.load_state_dict(load_checkpoint(ckpt_dir / CHECKPOINT_FILE, device))
        print(f"aebnas: resuming the supernet after epoch {run.epoch}", flush=True)

    def save(record: dict[str, Any]) -> None:
        tmp = Path(tempfile.mkdtemp(dir=ckpt_dir))
        _write_checkpoint(tmp, run)
        for name in (CHECKPOINT_FILE, SUPERNET_FILE):
            (tmp / name).replace(ckpt_dir / name)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"aebnas: training the supernet in this process on {device}", flush=True)
    run_epochs(run, True, save, log=print_line)
    shutil.copyfile(ckpt_dir / SUPERNET_FILE, out / SUPERNET_FILE)


def _loop_config(request: SupernetRequest, data: Any) -> dict[str, Any]:
    return {"space_kwargs": {k: list(v) for k, v in dataclasses.asdict(request.space).items()},
            "width_mult": request.width_mult, "settings": request.settings.to_dict(),
            "dataset": request.dataset, "split_seed": request.split_seed,
            "cpus_per_worker": request.cpus_per_worker, "compile": request.compile,
            "static_shapes": request.static_shapes, "data": data}


def _quiet_train_logs() -> dict[str, Any]:
    """RunConfig keywords that keep Ray Train's INFO lines (each report's metrics, each checkpoint's path,
    worker start-up) out of the console, where aebnas prints its own line per epoch; warnings and errors
    still show, and Ray's log files keep everything. Ray Train releases without ``LoggingConfig``: nothing."""
    import ray.train

    logging_config = getattr(ray.train, "LoggingConfig", None)
    return {} if logging_config is None else {"logging_config": logging_config(log_level="WARNING")}


def _train_ray(request: SupernetRequest, data: Dataset, out: Path) -> None:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..cluster import connect_ray, default_worker_cpus

    connect_ray(request.address)
    use_gpu = request.use_gpu if request.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    if request.cpus_per_worker is None:  # use the machine: every CPU of the cluster, shared out
        cpus = default_worker_cpus(request.workers, [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]])
        request = dataclasses.replace(request, cpus_per_worker=cpus)
    print(f"aebnas: training the supernet on {request.workers} Ray Train worker(s), "
          f"{request.cpus_per_worker:g} CPU{' and 1 GPU' if use_gpu else ''} each "
          f"({'nccl' if use_gpu else 'gloo'})", flush=True)
    trainer = TorchTrainer(
        _worker_loop, train_loop_config=_loop_config(request, ray.put(data)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=request.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": request.cpus_per_worker}),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(out),
                             failure_config=FailureConfig(max_failures=request.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), **_quiet_train_logs()))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the supernet run in {out / RUN_NAME} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        shutil.copyfile(Path(d) / SUPERNET_FILE, out / SUPERNET_FILE)


def train_supernet(request: SupernetRequest, data: Dataset | None = None) -> Path:
    """Train (or resume, or reuse) the supernet of ``request``; returns the path of ``OUT/supernet.pt``.

    ``data``: the request's dataset and split when the caller has loaded it already.
    Raises ExperimentError for a bad request, or when ``OUT`` holds a run of other settings.
    """
    request.validate()
    out = Path(request.out).expanduser().resolve()
    _check_request_file(out, request)
    final = out / SUPERNET_FILE
    done = read_supernet_info(final) if final.exists() else None
    if done is not None and done.epochs >= request.settings.epochs:
        print(f"aebnas: {final} is already trained ({done.describe()}); reusing it")
        return final
    if data is None:
        try:
            data = load_dataset(request.dataset, data_dir=request.data_dir, download=request.download,
                                val_size=request.val_size, seed=request.split_seed, image_size=request.image_size,
                                test_size=request.test_size)
        except ValueError as exc:
            raise ExperimentError(str(exc)) from None
    print(f"aebnas: {data.summary()}; the supernet trains on the {len(data.y_train)} training images only",
          flush=True)
    start = time.perf_counter()
    if request.workers == 0:
        _train_local(request, data, out)
    else:
        _train_ray(request, data, out)
    info = read_supernet_info(final)
    print(f"aebnas: {info.describe()}\naebnas: wrote {final} ({time.perf_counter() - start:.0f} s)", flush=True)
    return final


__all__ = ["SupernetRequest", "train_supernet", "run_epochs", "epoch_line", "load_supernet",
           "REQUEST_FILE"]
