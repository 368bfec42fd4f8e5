"""From a search to a deployed network: retrain a chosen trial, export it with its exits, predict.

``retrain`` picks a trial of an experiment directory (by id, or the best validation score
at a target), trains its architecture from scratch for more epochs on the search's train
split (resumable: a checkpoint after every epoch), recalibrates BatchNorm, tunes the exit
thresholds on the validation split and measures the test split with them. A run
directory holds::

    arch.json         flat config: architecture + the settings of this run
    checkpoint.pt     resume state (weights, optimizer, schedule, epoch, log)
    train_log.csv     one row per epoch
    model.pt          state dict of the final EarlyExitNet (BN recalibrated)
    thresholds.json   thresholds tuned on validation for the target MMACs
    exit_outputs.npz  per-exit confidence/prediction on val and test, and the costs
    metrics.json      test/val accuracy (%), average MMACs, exit utilization, data, source

``export`` turns a run directory into one TorchScript file whose ``forward`` does the whole
inference: input normalisation, resize to the trained resolution, the early-exit control
flow with the tuned thresholds and confidence measure. It loads with ``torch.jit.load``
alone (no aebnas). ``predict`` classifies image files with such a file.
"""
# No `from __future__ import annotations` here: TorchScript reads the class-level attribute
# annotations of the exported modules and cannot evaluate them as strings.

import argparse
import copy
import csv
import dataclasses
import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cli import UsageError
from .config import ArchConfig
from .cost import ExitCosts, exit_costs
from .data import BatchLoader, Dataset, DatasetNotFoundError, load_dataset
from .experiment import EXPERIMENT_FILE
from .exit_policy import (CONFIDENCE_MEASURES, ExitOutputs, SimResult, load_exit_outputs, save_exit_outputs,
                          simulate, torch_confidence, tune_thresholds, validate_thresholds)
from .nn import EarlyExitNet
from .train import (NonFiniteLossError, TrainSettings, evaluate, make_optimizer, make_scheduler,
                    recalibrate_bn, select_device, train_one_epoch)
from .trainable import (ARCH_FILE, CHECKPOINT_FILE, EXIT_OUTPUTS_FILE, TrialSettings,
                        parse_trial_config, resolved_config)

# Trials train a few epochs; a from-scratch MobileNetV3 keeps improving well past that.
DEFAULT_EPOCHS = 30
MODEL_FILE = "model.pt"
THRESHOLDS_FILE = "thresholds.json"
METRICS_FILE = "metrics.json"
TRAIN_LOG_FILE = "train_log.csv"
LOG_COLUMNS = ("epoch", "loss", "val_accuracy", "val_avg_macs", "val_final_accuracy", "lr", "seconds")
# Settings that change the weights: a run directory resumes only with the same values.
_TRAINING_KEYS = ("dataset", "epochs", "batch_size", "lr", "weight_decay", "exit_weight", "seed")

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------- experiment directory
@dataclass
class TrialRecord:
    """What a trial left on disk: its flat config and its last reported metrics (or None)."""

    path: Path
    config: dict[str, Any]
    last: dict[str, Any] | None

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class ExperimentDir:
    path: Path
    settings: dict[str, Any]  # aebnas_experiment.json
    trials: list[TrialRecord]

    def trial_names(self) -> str:
        return ", ".join(t.name for t in self.trials) or "(none)"


def read_experiment_dir(path: str | Path) -> ExperimentDir:
    """The experiment settings and every trial's config and last result; UsageError if it is not one."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UsageError(f"experiment directory {root} does not exist")
    exp_file = root / EXPERIMENT_FILE
    if not exp_file.is_file():
        raise UsageError(f"{root} is not an aebnas experiment directory (no {EXPERIMENT_FILE}); "
                         "pass the directory `aebnas search` printed (STORAGE_PATH/NAME)")
    trials = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("trial_")):
        # arch.json is the resolved config; Ray's params.json the sampled one (parsed the same way).
        config_file = next((d / f for f in (ARCH_FILE, "params.json") if (d / f).is_file()), None)
        if config_file is None:
            continue
        trials.append(TrialRecord(d, json.loads(config_file.read_text()), _last_result(d / "result.json")))
    return ExperimentDir(root, json.loads(exp_file.read_text()), trials)


def _last_result(path: Path) -> dict[str, Any] | None:
    """The last complete line of a trial's result.json (a trial killed mid-write leaves half a line)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def find_trial(exp: ExperimentDir, ident: str) -> TrialRecord:
    """The trial named ``ident``: its directory name, its trial id, or a unique end of either."""
    for t in exp.trials:
        if ident in (t.name, t.name.removeprefix("trial_")):
            return t
    matches = [t for t in exp.trials if t.name.endswith(ident)]
    if len(matches) == 1:
        return matches[0]
    why = f"matches {len(matches)} trials" if matches else "is not a trial"
    raise UsageError(f"--trial {ident!r} {why} of {exp.path}; available trials: {exp.trial_names()}")


def load_experiment_data(exp: ExperimentDir, data_dir: str | None = None,
                         download: bool | None = None) -> Dataset:
    """The search's dataset with the same seeded train/validation split."""
    s = exp.settings
    try:
        return load_dataset(s["dataset"], data_dir=data_dir if data_dir is not None else s.get("data_dir"),
                            download=download if download is not None else bool(s.get("download")),
                            val_size=s.get("val_size"), seed=int(s.get("seed", 0)))
    except (DatasetNotFoundError, ValueError) as exc:
        raise UsageError(f"dataset of {exp.path}: {exc}") from None


def _trial_arch(trial: TrialRecord, data: Dataset) -> tuple[ArchConfig, TrialSettings]:
    try:
        arch, settings = parse_trial_config(trial.config)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{trial.name}: {exc}") from None
    return arch.replace(num_classes=data.num_classes, in_channels=data.in_channels), settings


@dataclass
class TrialScore:
    trial: TrialRecord
    score: float | None   # paper's score (val) at the target, None if it cannot be known
    source: str           # where it came from: reported / exit_outputs.npz / checkpoint / why not


def score_trials(exp: ExperimentDir, target_macs: float, data: Dataset,
                 device: torch.device | str = "cpu") -> list[TrialScore]:
    """Validation score of every trial at ``target_macs``, best first (finished trials first, unknown scores last).

    At the experiment's own target the reported score of the last epoch is used; at another
    target the thresholds are re-tuned on the trial's saved validation outputs
    (``exit_outputs.npz``), or, where a trial has none, on outputs recomputed from its last
    checkpoint (the same weights the outputs came from).
    """
    scores = []
    at_search_target = math.isclose(target_macs, float(exp.settings["target_macs"]))
    for trial in exp.trials:
        if trial.last is None:
            scores.append(TrialScore(trial, None, "no result"))
        elif at_search_target and "score" in trial.last:
            scores.append(TrialScore(trial, float(trial.last["score"]), f"reported (epoch {trial.last['epoch']})"))
        else:
            val, costs, source = _trial_val_outputs(trial, data, device)
            if val is None:
                scores.append(TrialScore(trial, None, source))
                continue
            _, settings = _trial_arch(trial, data)
            tuned = tune_thresholds(val, costs, target_macs, settings.threshold_grid, settings.score_lambda)
            scores.append(TrialScore(trial, tuned.score, source))
    # Same rule as `analysis`: trials that trained all their epochs rank before ASHA-stopped
    # or unfinished ones (a 1-epoch score is not comparable to a finished one).
    return sorted(scores, key=lambda s: (s.score is not None, _finished(s.trial),
                                         -math.inf if s.score is None else s.score), reverse=True)


def _finished(trial: TrialRecord) -> bool:
    last = trial.last or {}
    return last.get("epoch") is not None and last.get("epoch") == last.get("epochs")


def _trial_val_outputs(trial: TrialRecord, data: Dataset,
                       device: torch.device | str) -> tuple[ExitOutputs | None, ExitCosts | None, str]:
    arch, settings = _trial_arch(trial, data)
    costs = exit_costs(arch)
    npz = trial.path / EXIT_OUTPUTS_FILE
    if npz.is_file():
        splits, saved = load_exit_outputs(npz)
        if saved.num_exits == costs.num_exits and np.allclose(saved.backbone, costs.backbone):
            return splits["val"], saved, EXIT_OUTPUTS_FILE
    val = val_outputs_from_checkpoint(trial, data, device)
    if val is None:
        return None, None, f"no {EXIT_OUTPUTS_FILE} and no checkpoint of this architecture"
    return val, costs, "checkpoint"


def val_outputs_from_checkpoint(trial: TrialRecord, data: Dataset,
                                device: torch.device | str = "cpu") -> ExitOutputs | None:
    """Validation outputs of the trial's last checkpoint (None without a matching one).

    Checkpoints hold the weights after BatchNorm recalibration, so these are the outputs
    the trial reported from.
    """
    arch, settings = _trial_arch(trial, data)
    ckpts = sorted(trial.path.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
    if not ckpts:
        return None
    state = torch.load(ckpts[-1], map_location=device, weights_only=False)
    if state.get("arch") != arch.to_flat():
        return None
    model = EarlyExitNet(arch).to(device)
    model.load_state_dict(state["model"])
    loader = BatchLoader.for_split(data, "val", batch_size=settings.eval_batch_size,
                                   resolution=arch.resolution, train=False, device=device)
    return evaluate(model, loader, settings.confidence)


# ----------------------------------------------------------------- retrain
@dataclass(frozen=True)
class RetrainRequest:
    """What ``aebnas retrain`` was asked; ``None`` means: as the trial / experiment had it."""

    experiment_dir: str
    trial: str | None = None
    best: bool = False
    target_macs: float | None = None
    epochs: int = DEFAULT_EPOCHS
    out: str | None = None
    data_dir: str | None = None
    download: bool | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    device: str = "auto"


def retrain(req: RetrainRequest, log: Log = _print) -> dict[str, Any]:
    """Select, train (or resume), tune and measure; writes the run directory and returns metrics.json."""
    if (req.trial is None) == (not req.best):
        raise UsageError("pass exactly one of --trial ID and --best")
    exp = read_experiment_dir(req.experiment_dir)
    if not exp.trials:
        raise UsageError(f"{exp.path} holds no trials (no trial_* directories with a config)")
    target = float(req.target_macs if req.target_macs is not None else exp.settings["target_macs"])
    if not target > 0:
        raise UsageError(f"--target-macs={target} must be > 0 (MMACs)")
    try:
        device = select_device(req.device)
    except (ValueError, RuntimeError) as exc:  # RuntimeError: torch.device() of a malformed name
        raise UsageError(f"--device: {exc}") from None
    trial = find_trial(exp, req.trial) if req.trial is not None else None
    data = load_experiment_data(exp, req.data_dir, req.download)
    log(f"data: {data.summary()} (split seed {exp.settings.get('seed', 0)}, as in the search)")

    if trial is not None:
        selected_by = f"--trial {req.trial}"
    else:
        ranking = score_trials(exp, target, data, device)
        log(f"trials ranked by validation score at {target:g} MMACs:")
        for s in ranking:
            value = "      -" if s.score is None else f"{s.score:7.2f}"
            log(f"  {s.trial.name:<28} {value}  ({s.source})")
        if ranking[0].score is None:
            raise UsageError(f"no trial of {exp.path} has a score; trials: {exp.trial_names()}")
        trial = ranking[0].trial
        selected_by = f"--best at {target:g} MMACs (search score {ranking[0].score:.2f})"

    arch, trial_settings = _trial_arch(trial, data)
    overrides = {k: v for k, v in {"batch_size": req.batch_size, "lr": req.lr, "seed": req.seed}.items()
                 if v is not None}
    try:
        settings = dataclasses.replace(trial_settings, epochs=req.epochs, target_macs=target,
                                       device=req.device, **overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    run_dir = Path(req.out).expanduser() if req.out else exp.path / f"retrain_{trial.name}"
    log(f"retraining {trial.name} ({selected_by}) for {settings.epochs} epochs on {device} into {run_dir}")
    run = _Run(run_dir, arch, settings, data, device, log)
    run.train()
    source = {"experiment": str(exp.path.resolve()), "trial": trial.name, "selected_by": selected_by,
              "search_metrics": {k: trial.last.get(k) for k in ("score", "accuracy", "avg_macs", "epoch",
                                                               "test_accuracy")} if trial.last else None}
    return run.finish(source)


class _Run:
    """One retraining run in ``run_dir``; resumes from ``checkpoint.pt`` when it is there."""

    def __init__(self, run_dir: Path, arch: ArchConfig, settings: TrialSettings, data: Dataset,
                 device: torch.device, log: Log) -> None:
        self.dir, self.arch, self.settings, self.data = run_dir, arch, settings, data
        self.device, self.log = device, log
        self.costs = exit_costs(arch)
        self.ts: TrainSettings = settings.train_settings()
        self.config = resolved_config(arch, settings)
        torch.manual_seed(settings.seed)  # the initial weights depend on the seed only
        self.model = EarlyExitNet(arch).to(device)
        self.train_batches = BatchLoader.for_split(data, "train", batch_size=self.ts.batch_size,
                                                   resolution=arch.resolution, train=True, device=device,
                                                   seed=settings.seed)
        self.optimizer = make_optimizer(self.model, self.ts)
        self.scheduler = make_scheduler(self.optimizer, self.ts, len(self.train_batches))
        self.history: list[dict[str, float]] = []
        self.epoch = 0

    def loader(self, split: str) -> BatchLoader:
        return BatchLoader.for_split(self.data, split, batch_size=self.settings.eval_batch_size,
                                     resolution=self.arch.resolution, train=False, device=self.device)

    # -- checkpoints
    def _resume(self) -> None:
        path = self.dir / CHECKPOINT_FILE
        if not path.is_file():
            return
        state = torch.load(path, map_location=self.device, weights_only=False)
        saved = state["config"]
        differ = [k for k in sorted(set(saved) | set(self.config))
                  if (k in _TRAINING_KEYS or k in self.arch.to_flat()) and saved.get(k) != self.config.get(k)]
        if differ:
            changes = ", ".join(f"{k}: {saved.get(k)!r} there, {self.config.get(k)!r} now" for k in differ)
            raise UsageError(f"{self.dir} holds another run ({changes}); resume it with the same settings, "
                             "or pass another --out")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        self.log(f"resuming from {path} at epoch {self.epoch + 1} of {self.settings.epochs}"
                 if self.epoch < self.settings.epochs else
                 f"training already complete in {path} ({self.epoch} epochs); tuning and testing again")

    def _checkpoint(self) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "history": self.history,
                 "config": self.config, "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        _atomic(self.dir / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))
        _atomic(self.dir / TRAIN_LOG_FILE, lambda tmp: _write_log(tmp, self.history))

    # -- training
    def train(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._resume()
        _write_json(self.dir / ARCH_FILE, self.config)
        val_loader = self.loader("val")
        epochs, first = self.settings.epochs, self.epoch
        started = time.perf_counter()
        for epoch in range(first, epochs):
            t0 = time.perf_counter()
            self.train_batches.set_epoch(epoch)
            stats = train_one_epoch(self.model, self.train_batches, self.optimizer, self.scheduler, self.ts)
            val = evaluate(self.model, val_loader, self.settings.confidence)
            tuned = tune_thresholds(val, self.costs, self.settings.target_macs, self.settings.threshold_grid,
                                    self.settings.score_lambda)
            self.epoch = epoch + 1
            self.history.append({
                "epoch": self.epoch, "loss": stats["loss"], "val_accuracy": tuned.result.accuracy,
                "val_avg_macs": tuned.result.avg_macs, "val_final_accuracy": float(val.exit_accuracy()[-1]),
                "lr": self.scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0})
            self._checkpoint()
            done = epoch + 1 - first
            eta = (time.perf_counter() - started) / done * (epochs - epoch - 1)
            row = self.history[-1]
            self.log(f"epoch {self.epoch:>{len(str(epochs))}}/{epochs}  loss {row['loss']:.4f}  "
                     f"val acc {row['val_accuracy']:5.2f}% at {row['val_avg_macs']:.3f} MMACs "
                     f"(final exit {row['val_final_accuracy']:5.2f}%)  {row['seconds']:.1f} s  "
                     f"ETA {_duration(eta)}")

    # -- after training
    def finish(self, source: dict[str, Any]) -> dict[str, Any]:
        """Recalibrate BN, tune thresholds on val, measure test; write the final files."""
        recalibrate_bn(self.model, self.loader("train"), self.ts.bn_recalibration_batches)
        outputs = {split: evaluate(self.model, self.loader(split), self.settings.confidence)
                   for split in ("val", "test")}
        s = self.settings
        tuned = tune_thresholds(outputs["val"], self.costs, s.target_macs, s.threshold_grid, s.score_lambda)
        test = simulate(outputs["test"], tuned.thresholds, self.costs)
        # metrics.json last: its presence says the other files are complete.
        _atomic(self.dir / MODEL_FILE, lambda tmp: torch.save(self.model.state_dict(), tmp))
        save_exit_outputs(self.dir / EXIT_OUTPUTS_FILE, outputs, self.costs)
        _write_json(self.dir / THRESHOLDS_FILE, {
            "thresholds": tuned.thresholds, "exit_positions": list(self.arch.exit_positions),
            "confidence": s.confidence, "target_macs": s.target_macs, "tuned_on": "val",
            "grid": list(s.threshold_grid), "score_lambda": s.score_lambda})
        d = self.data
        metrics = {
            "target_macs": s.target_macs, "thresholds": tuned.thresholds, "confidence": s.confidence,
            "test": _split_metrics(outputs["test"], test),
            "val": {**_split_metrics(outputs["val"], tuned.result), "score": tuned.score},
            "exits": _exit_table(self.arch, tuned.result, test, outputs["test"]),
            "static_macs": self.costs.static_macs, "epochs": self.epoch,
            "train_seconds": sum(r["seconds"] for r in self.history),
            "data": {"dataset": d.name, "classes": list(d.classes), "mean": list(d.mean), "std": list(d.std),
                     "in_channels": d.in_channels, "image_size": list(d.x_train.shape[2:]),
                     "train": len(d.y_train), "val": len(d.y_val), "test": len(d.y_test)},
            "source": source,
        }
        _write_json(self.dir / METRICS_FILE, metrics)
        self.log(format_summary(metrics, self.dir))
        return metrics


def _split_metrics(outputs: ExitOutputs, sim: SimResult) -> dict[str, Any]:
    return {"accuracy": sim.accuracy, "avg_macs": sim.avg_macs,
            "final_accuracy": float(outputs.exit_accuracy()[-1]),
            "utilization": [float(u) for u in sim.utilization]}


def _exit_table(arch: ArchConfig, val: SimResult, test: SimResult, test_out: ExitOutputs) -> list[dict[str, Any]]:
    alone = test_out.exit_accuracy()
    rows = []
    for j in range(arch.num_exits + 1):
        final = j == arch.num_exits
        taken = test.taken_accuracy[j]
        rows.append({"exit": j, "position": None if final else arch.exits[j].position,
                     "threshold": None if final else val.thresholds[j], "macs": float(test.costs[j]),
                     "val_util": float(val.utilization[j]), "test_util": float(test.utilization[j]),
                     "test_accuracy_taken": None if np.isnan(taken) else float(taken),
                     "test_accuracy_alone": float(alone[j])})
    return rows


def format_summary(metrics: dict[str, Any], run_dir: Path) -> str:
    """The table ``retrain`` prints at the end (test split, thresholds tuned on val)."""
    t = metrics["test"]
    lines = [f"test accuracy {t['accuracy']:.2f}% at {t['avg_macs']:.3f} MMACs on average "
             f"(target {metrics['target_macs']:g}; final exit alone {t['final_accuracy']:.2f}%, "
             f"static network {metrics['static_macs']:.3f} MMACs); thresholds tuned on val "
             f"(val accuracy {metrics['val']['accuracy']:.2f}%, score {metrics['val']['score']:.2f})",
             f"{'exit':>5} {'after':>7} {'threshold':>10} {'MMACs':>8} {'test util':>10} {'acc taken':>10}"]
    n = len(metrics["exits"])
    for row in metrics["exits"]:
        where = "head" if row["position"] is None else f"stage{row['position']}"
        th = "-" if row["threshold"] is None else ("off" if row["threshold"] >= 1.0 else f"{row['threshold']:.2f}")
        acc = "-" if row["test_accuracy_taken"] is None else f"{row['test_accuracy_taken']:.1f}%"
        lines.append(f"{row['exit'] + 1:>3}/{n} {where:>7} {th:>10} {row['macs']:>8.3f} "
                     f"{100 * row['test_util']:>9.1f}% {acc:>10}")
    lines.append(f"saved in {run_dir}: {ARCH_FILE}, {MODEL_FILE}, {THRESHOLDS_FILE}, {METRICS_FILE}, "
                 f"{EXIT_OUTPUTS_FILE}, {TRAIN_LOG_FILE}")
    return "\n".join(lines)


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(history)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file, so an interruption never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1)))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ----------------------------------------------------------------- export
class _StageExit(nn.Module):
    """A backbone stage and the exit after it (Identity where there is none or it is off)."""

    active: bool
    threshold: float
    index: int

    def __init__(self, stage: nn.Module, branch: nn.Module | None, threshold: float, index: int) -> None:
        super().__init__()
        self.stage = stage
        self.active = branch is not None and threshold < 1.0
        self.branch = branch if self.active else nn.Identity()
        self.threshold = float(threshold)
        self.index = index


class DeployedEarlyExitNet(nn.Module):
    """An EarlyExitNet with its preprocessing and exit rule inside, for ``torch.jit.script``.

    ``forward(images)``: images (N, C, H, W), float in [0, 1] or uint8 in 0..255, any H and
    W; returns (logits (N, classes) float32, exit index (N,) int64) where index j <
    ``num_exits`` is the j-th exit of the architecture and ``num_exits`` the final
    classifier — exactly ``EarlyExitNet.infer`` on the normalised, resized images.
    """

    classes: List[str]
    thresholds: List[float]
    exit_positions: List[int]
    exit_macs: List[float]
    mean: List[float]
    std: List[float]

    def __init__(self, net: EarlyExitNet, thresholds: Sequence[float], confidence: str,
                 mean: Sequence[float], std: Sequence[float], classes: Sequence[str]) -> None:
        super().__init__()
        arch = net.arch
        th = validate_thresholds(thresholds, net.num_exits)
        if confidence not in CONFIDENCE_MEASURES:
            raise ValueError(f"confidence={confidence!r} is not one of {CONFIDENCE_MEASURES}")
        if len(classes) != arch.num_classes or len(mean) != arch.in_channels or len(std) != arch.in_channels:
            raise ValueError(f"{len(classes)} classes, mean {list(mean)} and std {list(std)} do not fit a network "
                             f"of {arch.num_classes} classes and {arch.in_channels} channels")
        net = copy.deepcopy(net).eval()
        self.stem, self.head = net.stem, net.head
        exit_after = {e.position: j for j, e in enumerate(arch.exits)}
        blocks = []
        for s, stage in enumerate(net.stages, start=1):
            j = exit_after.get(s, -1)
            blocks.append(_StageExit(stage, net.exits[j] if j >= 0 else None, th[j] if j >= 0 else 1.0, j))
        self.blocks = nn.ModuleList(blocks)
        self.num_exits, self.num_classes = net.num_exits, arch.num_classes
        self.in_channels, self.resolution = arch.in_channels, arch.resolution
        self.confidence = confidence
        self.thresholds, self.exit_positions = th, list(arch.exit_positions)
        self.exit_macs = [float(c) for c in exit_costs(arch).cumulative(np.asarray(th) < 1.0)]
        self.classes, self.mean, self.std = list(classes), [float(m) for m in mean], [float(s) for s in std]
        # The same arithmetic as BatchLoader: x·scale + shift, scale = 1/(255·std) for uint8.
        std_t = torch.tensor(self.std).view(1, -1, 1, 1)
        mean_t = torch.tensor(self.mean).view(1, -1, 1, 1)
        self.register_buffer("scale_uint8", 1.0 / (255.0 * std_t))
        self.register_buffer("scale", 1.0 / std_t)
        self.register_buffer("shift", -mean_t / std_t)
        self.eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise and resize to the trained resolution (bilinear, as in training)."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError("images must have shape (N, " + str(self.in_channels) + ", H, W), got "
                             + str(images.shape))
        if images.dtype == torch.uint8:
            x = images.float() * self.scale_uint8 + self.shift
        elif images.is_floating_point():
            x = images.float() * self.scale + self.shift
        else:
            raise ValueError("images must be float in [0, 1] or uint8, got " + str(images.dtype))
        if x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            x = F.interpolate(x, size=[self.resolution, self.resolution], mode="bilinear",
                              align_corners=False, antialias=False)
        return x

    @torch.jit.export
    def exit_confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """Confidence (the model's measure) of each row of ``logits``."""
        return torch_confidence(logits, self.confidence)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            x = self.preprocess(images)
            n = x.shape[0]
            logits_out = torch.zeros((n, self.num_classes), dtype=x.dtype, device=x.device)
            exit_out = torch.full((n,), self.num_exits, dtype=torch.long, device=x.device)
            remaining = torch.arange(n, device=x.device)
            h = self.stem(x)
            for block in self.blocks:
                if remaining.numel() > 0:
                    h = block.stage(h)
                    if block.active:
                        logits = block.branch(h)
                        leave = self.exit_confidence(logits) >= block.threshold
                        idx = remaining[leave]
                        logits_out[idx] = logits[leave]
                        exit_out[idx] = block.index
                        stay = torch.logical_not(leave)
                        h, remaining = h[stay], remaining[stay]
            if remaining.numel() > 0:
                logits_out[remaining] = self.head(h)
            return logits_out, exit_out


@dataclass
class RunFiles:
    """A finished run directory, loaded: the network in eval mode and what export needs."""

    net: EarlyExitNet
    thresholds: list[float]
    confidence: str
    metrics: dict[str, Any]
    exit_outputs: dict[str, ExitOutputs]
    costs: ExitCosts
    settings: TrialSettings


def load_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory written by ``retrain``; UsageError naming what is missing."""
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise UsageError(f"run directory {root} does not exist (write one with `aebnas retrain`)")
    missing = [f for f in (ARCH_FILE, MODEL_FILE, THRESHOLDS_FILE, METRICS_FILE, EXIT_OUTPUTS_FILE)
               if not (root / f).is_file()]
    if missing:
        hint = " (training unfinished? rerun the same `aebnas retrain` to resume)" \
            if (root / CHECKPOINT_FILE).is_file() else ""
        raise UsageError(f"{root} lacks {', '.join(missing)}{hint}")
    arch, settings = parse_trial_config(json.loads((root / ARCH_FILE).read_text()))
    net = EarlyExitNet(arch)
    net.load_state_dict(torch.load(root / MODEL_FILE, map_location="cpu", weights_only=True))
    th = json.loads((root / THRESHOLDS_FILE).read_text())
    splits, costs = load_exit_outputs(root / EXIT_OUTPUTS_FILE)
    return RunFiles(net.eval(), [float(t) for t in th["thresholds"]], th["confidence"],
                    json.loads((root / METRICS_FILE).read_text()), splits, costs, settings)


def export(run_dir: str | Path, out: str | Path, *, target_macs: float | None = None,
           thresholds: Sequence[float] | None = None, log: Log = _print) -> dict[str, Any]:
    """Write the TorchScript file ``out`` and ``out`` with suffix .json; returns that JSON.

    Thresholds: the run's (tuned on val for its target), re-tuned on the run's validation
    outputs for ``target_macs``, or given explicitly.
    """
    run = load_run(run_dir)
    th, target = run.thresholds, run.metrics["target_macs"]
    if target_macs is not None:
        s = run.settings
        th = tune_thresholds(run.exit_outputs["val"], run.costs, target_macs, s.threshold_grid,
                             s.score_lambda).thresholds
        target = target_macs
    if thresholds is not None:
        th, target = validate_thresholds(thresholds, run.net.num_exits), None
    data = run.metrics["data"]
    module = DeployedEarlyExitNet(run.net, th, run.confidence, data["mean"], data["std"], data["classes"])
    test = simulate(run.exit_outputs["test"], th, run.costs)
    arch = run.net.arch
    meta = {
        "format": "aebnas TorchScript early-exit network",
        "input": INPUT_CONTRACT, "output": OUTPUT_CONTRACT,
        "resolution": arch.resolution, "in_channels": arch.in_channels, "classes": data["classes"],
        "mean": data["mean"], "std": data["std"], "confidence": run.confidence, "thresholds": th,
        "target_macs": target,
        "exits": [{"index": j, "position": p, "threshold": th[j], "active": th[j] < 1.0,
                   "macs": module.exit_macs[j]} for j, p in enumerate(arch.exit_positions)]
        + [{"index": arch.num_exits, "position": "final", "macs": module.exit_macs[-1]}],
        "static_macs": run.costs.static_macs,
        "test": {"accuracy": test.accuracy, "avg_macs": test.avg_macs,
                 "utilization": [float(u) for u in test.utilization]},
        "architecture": arch.to_flat(),
        "run_dir": str(Path(run_dir).resolve()),
    }
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, indent=1)
    with _torchscript():
        scripted = torch.jit.script(module)
        scripted.save(str(out), _extra_files={"model.json": text})
    out.with_suffix(".json").write_text(text)
    log(f"exported {out} and {out.with_suffix('.json')}: thresholds {th}, test accuracy {test.accuracy:.2f}% "
        f"at {test.avg_macs:.3f} MMACs")
    return meta


@contextmanager
def _torchscript() -> Iterator[None]:
    """Silence torch.jit's deprecation notice: TorchScript is still the format that keeps
    data-dependent control flow and loads without the Python code (torch.export would
    need every exit rewritten with torch.cond)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
        yield


INPUT_CONTRACT = ("one tensor (N, C, H, W): float32 RGB (or gray when C = 1) in [0, 1], or uint8 in 0..255; "
                  "any H and W (resized bilinearly, without antialiasing, to the square training "
                  "resolution; downscale large images with an antialiased filter first); "
                  "normalisation with the training mean/std happens inside")
OUTPUT_CONTRACT = ("(logits (N, classes) float32, exit (N,) int64): exit j < len(exit_positions) is the "
                   "j-th exit (after stage exit_positions[j]), len(exit_positions) the final classifier")


# ----------------------------------------------------------------- predict
@dataclass
class Prediction:
    path: str
    class_index: int
    class_name: str
    probability: float   # softmax probability of the class
    confidence: float    # the model's exit confidence measure
    exit: int            # 0-based; num_exits = final classifier
    num_exits: int
    position: int | None  # backbone stage the exit follows; None for the final classifier


def load_deployed(path: str | Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` an exported model; UsageError naming the file if it is not one."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"model file {p} does not exist (write one with `aebnas export RUN_DIR --out {p}`)")
    try:
        with _torchscript():
            module = torch.jit.load(str(p), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"{p} is not a TorchScript file ({str(exc).splitlines()[0]})") from None
    if not all(hasattr(module, a) for a in ("classes", "resolution", "in_channels", "exit_positions")):
        raise UsageError(f"{p} is a TorchScript file but not one written by `aebnas export`")
    return module


def read_image(path: str | Path, channels: int, resolution: int) -> torch.Tensor:
    """An image file as uint8 (1, C, H, W), RGB or gray; shrunk (antialiased) to ``resolution`` if larger."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"cannot read image {path}: {exc}") from None
    if max(img.size) > resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BILINEAR, reducing_gap=None)
    array = np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)


def predict(model_path: str | Path, images: Sequence[str | Path]) -> list[Prediction]:
    """Classify image files with an exported model; UsageError listing every unreadable file."""
    module = load_deployed(model_path)
    tensors, errors = [], []
    for path in images:
        try:
            tensors.append(read_image(path, int(module.in_channels), int(module.resolution)))
        except UsageError as exc:
            errors.append(str(exc))
    if errors:
        raise UsageError("\n".join(errors))
    num_exits = len(module.exit_positions)
    out = []
    for path, x in zip(images, tensors):
        logits, exit_index = module(x)
        probs = torch.softmax(logits, dim=1)[0]
        k, j = int(probs.argmax()), int(exit_index[0])
        out.append(Prediction(str(path), k, module.classes[k], float(probs[k]),
                              float(module.exit_confidence(logits)[0]), j, num_exits,
                              None if j == num_exits else int(module.exit_positions[j])))
    return out


def format_prediction(p: Prediction) -> str:
    """``cat.png  cat  0.82  exit 2/3 (stage 3)``: path, class, probability, exit taken."""
    where = "final" if p.position is None else f"stage {p.position}"
    return f"{p.path}  {p.class_name}  {p.probability:.2f}  exit {p.exit + 1}/{p.num_exits + 1} ({where})"


# ----------------------------------------------------------------- command line
def _add_retrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment_dir", help="experiment directory of a search (STORAGE_PATH/NAME)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", help="trial to retrain: directory name (trial_…), trial id or a unique end of it")
    which.add_argument("--best", action="store_true", help="retrain the trial with the best validation score "
                       "at --target-macs")
    p.add_argument("--target-macs", type=float, help="target average MMACs for ranking and threshold tuning "
                   "(default: the experiment's)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs (default: %(default)s)")
    p.add_argument("--out", help="run directory (default: EXPERIMENT_DIR/retrain_TRIAL); rerun to resume")
    p.add_argument("--data-dir", help="where the dataset is, if not where the search found it")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                   help="download the dataset with torchvision if missing (default: as the search)")
    p.add_argument("--batch-size", type=int, help="default: the trial's")
    p.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule (default: the trial's)")
    p.add_argument("--seed", type=int, help="seed of initial weights and batch order (default: the trial's; "
                   "the train/val split is always the search's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 …")


def _cmd_retrain(args: argparse.Namespace) -> int:
    req = RetrainRequest(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RetrainRequest)})
    try:
        retrain(req)
    except NonFiniteLossError as exc:
        print(f"aebnas retrain: error: {exc}", flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; the last finished epoch is saved: run the same command again to resume", flush=True)
        return 130
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by `aebnas retrain`")
    p.add_argument("--out", required=True, help="TorchScript file to write (model.json goes next to it)")
    p.add_argument("--target-macs", type=float,
                   help="re-tune the thresholds on the run's validation outputs for this target (MMACs)")


def _cmd_export(args: argparse.Namespace) -> int:
    if args.target_macs is not None and not args.target_macs > 0:
        raise UsageError(f"--target-macs={args.target_macs} must be > 0 (MMACs)")
    export(args.run_dir, args.out, target_macs=args.target_macs)
    return 0


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="TorchScript file written by `aebnas export`")
    p.add_argument("images", nargs="+", help="PNG or JPEG files")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of one line per image")


def _cmd_predict(args: argparse.Namespace) -> int:
    predictions = predict(args.model, args.images)
    if args.json:
        print(json.dumps([dataclasses.asdict(p) for p in predictions], indent=1))
    else:
        for p in predictions:
            print(format_prediction(p))
    return 0


CLI_COMMANDS = {
    "retrain": ("train a trial's architecture from scratch for longer, tune its exits, test it",
                _add_retrain, _cmd_retrain),
    "export": ("write a run as one TorchScript file with its exits, thresholds and preprocessing",
               _add_export, _cmd_export),
    "predict": ("classify image files with an exported model", _add_predict, _cmd_predict),
}

__all__ = ["retrain", "RetrainRequest", "score_trials", "read_experiment_dir", "find_trial", "export",
           "load_run", "DeployedEarlyExitNet", "predict", "Prediction", "load_deployed",
           "read_image", "format_prediction", "CLI_COMMANDS", "DEFAULT_EPOCHS", "INPUT_CONTRACT"]
