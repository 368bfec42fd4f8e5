"""Retrain a trial of a search: longer, on the search's own data split.

``retrain`` picks a trial of an experiment directory (by id, or the best validation score
at a target, by the rule of ``aebnas.search.trials``), trains its architecture for more epochs —
from scratch, or (``inherit`` / ``supernet``) starting from a supernet's weights for it and
fine-tuning them at ``finetune_lr`` — with the same training loop and evaluation path as a trial
(``aebnas.training.loop.CandidateTraining``: BatchNorm recalibrated on a seeded, shuffled sample of
the training split before every evaluation), tunes the exit thresholds on the validation
split and measures the test split with them. It is resumable: a checkpoint after every
epoch. A run directory holds::

    arch.json         flat config: architecture + the settings of this run
    checkpoint.pt     resume state (weights, optimizer, schedule, epoch, log)
    train_log.csv     one row per epoch
    model.pt          state dict of the final EarlyExitNet (BN recalibrated, thresholds inside)
    thresholds.json   thresholds tuned on validation for the target MMACs
    exit_outputs.npz  per-exit confidence/prediction on val and test, and the costs
    metrics.json      test/val accuracy (%), average MMACs, exit utilization, data, source

An experiment under a URI (``s3://…``, ``gs://…``, ``file://…``) is read through pyarrow's
filesystem layer, as Ray Tune writes it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..config import ArchConfig
from ..cost.macs import exit_costs
from ..data.datasets import Dataset
from ..exit_policy import ExitOutputs, SimResult, save_exit_outputs, simulate, tune_thresholds
from ..files import atomic_write
from ..nn import EarlyExitNet
from ..progress import Log, Progress, duration, print_line
from ..training.supernet_file import SupernetInfo, check_supernet, inherited_network
from ..search.trials import ExperimentRecord, TrialRecord, read_experiment_dir
from .pick import find_trial, load_experiment_data, score_trials, split_seed, trial_arch
from ..settings import (ARCH_FILE, CHECKPOINT_FILE, EXIT_OUTPUTS_FILE, METRICS_FILE, MODEL_FILE, THRESHOLDS_FILE,
                       TrialSettings, resolved_config)
from ..training.loop import CandidateTraining, load_checkpoint, select_device


# Trials train a few epochs; a from-scratch MobileNetV3 keeps improving well past that.
DEFAULT_EPOCHS = 30
TRAIN_LOG_FILE = "train_log.csv"
LOG_COLUMNS = ("epoch", "loss", "val_accuracy", "val_avg_macs", "val_final_accuracy", "lr", "seconds")
# Settings that change the weights: a run directory resumes only with the same values.
_TRAINING_KEYS = ("dataset", "epochs", "batch_size", "lr", "weight_decay", "momentum", "exit_weight",
                  "label_smoothing", "bn_recalibration_batches", "seed", "supernet", "finetune_lr")



# ----------------------------------------------------------------- retrain
@dataclass(frozen=True)
class RetrainRequest:
    """What ``aebnas retrain`` was asked; ``None`` means: as the trial / experiment had it.

    ``inherit``: start from the weights of the supernet the trial inherited from (its search's
    ``supernet``) instead of from scratch; ``supernet``: start from this supernet file instead.
    Either way the weights fine-tune at ``lr`` if given, else at the trial's ``finetune_lr``;
    ``epochs=0`` then scores the inherited weights as they are.
    """

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
    inherit: bool = False
    supernet: str | None = None


def retrain(req: RetrainRequest, log: Log = print_line) -> dict[str, Any]:
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
    log(f"data: {data.summary()} (split seed {split_seed(exp.settings)}, as in the search)")

    if trial is not None:
        selected_by = f"--trial {req.trial}"
    else:
        trial, selected_by = _best_trial(exp, target, data, device, log)

    arch, trial_settings = trial_arch(trial, data)
    supernet = _supernet_of(req, trial.name, trial_settings)
    lr_key = "finetune_lr" if supernet else "lr"  # inherited weights fine-tune at their own rate
    overrides = {k: v for k, v in {"batch_size": req.batch_size, lr_key: req.lr, "seed": req.seed}.items()
                 if v is not None}
    try:
        settings = dataclasses.replace(trial_settings, epochs=req.epochs, target_macs=target,
                                       device=req.device, supernet=supernet, **overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model = None if supernet is None else _inherited_network(supernet, arch, settings.confidence, data, log)
    run_dir = _run_dir(req, exp, trial)
    start = "from scratch" if supernet is None else f"from the supernet's weights at lr {settings.finetune_lr:g}"
    log(f"retraining {trial.name} ({selected_by}) {start} for {settings.epochs} epochs on {device} into {run_dir}")
    run = _Run(run_dir, arch, settings, data, device, log, model)
    run.train()
    # A URI, not the temporary local copy read from it (gone with the next reboot).
    source = {"experiment": req.experiment_dir if "://" in str(req.experiment_dir) else str(exp.path.resolve()),
              "trial": trial.name, "selected_by": selected_by, "supernet": supernet,
              "search_metrics": {k: trial.last.get(k) for k in ("score", "accuracy", "avg_macs", "epoch",
                                                               "test_accuracy")} if trial.last else None}
    return run.finish(source)


def _best_trial(exp: ExperimentRecord, target: float, data: Dataset, device: torch.device,
                log: Log) -> tuple[TrialRecord, str]:
    """The trial with the best validation score at ``target`` (the ranking is logged), and how it was selected."""
    ranking = score_trials(exp, target, data, device)
    log(f"trials ranked by validation score at {target:g} MMACs:")
    for s in ranking:
        value = "      -" if s.score is None else f"{s.score:7.2f}"
        log(f"  {s.trial.name:<28} {value}  ({s.source})")
    if ranking[0].score is None:
        raise UsageError(f"no trial of {exp.path} has a score; trials: {exp.trial_names()}")
    return ranking[0].trial, f"--best at {target:g} MMACs (search score {ranking[0].score:.2f})"


def _run_dir(req: RetrainRequest, exp: ExperimentRecord, trial: TrialRecord) -> Path:
    """``--out``, else ``retrain_<trial>`` in the experiment directory (the working directory for one under a URI)."""
    if req.out:
        return Path(req.out).expanduser()
    if "://" in str(req.experiment_dir):  # exp.path is a local copy: keep the run where the user is
        return Path.cwd() / f"retrain_{trial.name}"
    return exp.path / f"retrain_{trial.name}"


def _supernet_of(req: RetrainRequest, trial: str, trial_settings: TrialSettings) -> str | None:
    """The supernet file whose weights the run starts from (None: from scratch)."""
    if req.supernet is not None:
        return req.supernet
    if not req.inherit:
        return None
    if trial_settings.supernet is None:
        raise UsageError(f"{trial} trained from scratch: its search had no supernet to inherit from; "
                         "pass --supernet PATH to start from one")
    return trial_settings.supernet


def _inherited_network(path: str, arch: ArchConfig, confidence: str, data: Dataset, log: Log) -> EarlyExitNet:
    """``arch`` holding the weights of the supernet file ``path``; UsageError saying why it cannot."""
    try:
        if not Path(path).is_file():
            raise ValueError("the file does not exist (pass --supernet PATH where it is now)")
        record = load_checkpoint(path)
        info = SupernetInfo.from_record(record, path)
        # The same checks a search makes: width, classes, no validation/test image trained on, and the
        # candidate's resolution and every block and branch inside the supernet's space.
        check_supernet(info, needs={"resolutions": [arch.resolution]}, width_mult=arch.width_mult, data=data)
        model = inherited_network(record, arch, confidence)
    except ValueError as exc:
        raise UsageError(f"supernet {path}: {exc}") from None
    log(f"starting from {path} ({info.describe()})")
    return model


class _Run:
    """One retraining run in ``run_dir``; resumes from ``checkpoint.pt`` when it is there."""

    def __init__(self, run_dir: Path, arch: ArchConfig, settings: TrialSettings, data: Dataset,
                 device: torch.device, log: Log, model: EarlyExitNet | None = None) -> None:
        self.dir, self.arch, self.settings, self.data, self.log = run_dir, arch, settings, data, log
        self.costs = exit_costs(arch)
        self.config = resolved_config(arch, settings)
        self.training = CandidateTraining(arch, settings, data, device, model=model)
        self.history: list[dict[str, float]] = []

    # -- checkpoints
    def _resume(self) -> None:
        path = self.dir / CHECKPOINT_FILE
        if not path.is_file():
            return
        try:
            state = load_checkpoint(path, self.training.device)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        saved = state.get("config")
        if not isinstance(saved, dict):
            raise UsageError(f"{path} is not a retrain checkpoint (it holds no run config); pass another --out")
        differ = [k for k in sorted(set(saved) | set(self.config))
                  if (k in _TRAINING_KEYS or k in self.arch.to_flat()) and saved.get(k) != self.config.get(k)]
        if differ:
            changes = ", ".join(f"{k}: {saved.get(k)!r} there, {self.config.get(k)!r} now" for k in differ)
            raise UsageError(f"{self.dir} holds another run ({changes}); resume it with the same settings, "
                             "or pass another --out")
        self.training.load_state_dict(state)
        self.history = list(state["history"])
        epoch, epochs = self.training.epoch, self.settings.epochs
        self.log(f"resuming from {path} at epoch {epoch + 1} of {epochs}" if epoch < epochs else
                 f"training already complete in {path} ({epoch} epochs); tuning and testing again")

    def _checkpoint(self) -> None:
        state = {**self.training.state_dict(), "history": self.history, "config": self.config}
        atomic_write(self.dir / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))
        atomic_write(self.dir / TRAIN_LOG_FILE, lambda tmp: _write_log(tmp, self.history))

    # -- training
    def train(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._resume()
        _write_json(self.dir / ARCH_FILE, self.config)
        epochs, first = self.settings.epochs, self.training.epoch
        started = time.perf_counter()
        while self.training.epoch < epochs:
            t0 = time.perf_counter()
            progress = Progress(f"epoch {self.training.epoch + 1}/{epochs}", len(self.training.train_batches),
                                self.log)
            stats = self.training.train_epoch(on_step=progress.update)
            val = self.training.evaluate(("val",))["val"]
            tuned = self._tune(val)
            epoch = self.training.epoch
            self.history.append({
                "epoch": epoch, "loss": stats["loss"], "val_accuracy": tuned.result.accuracy,
                "val_avg_macs": tuned.result.avg_cost, "val_final_accuracy": float(val.exit_accuracy()[-1]),
                "lr": stats["lr"], "seconds": time.perf_counter() - t0})
            self._checkpoint()
            eta = (time.perf_counter() - started) / (epoch - first) * (epochs - epoch)
            row = self.history[-1]
            self.log(f"epoch {epoch:>{len(str(epochs))}}/{epochs}  loss {row['loss']:.4f}  "
                     f"val acc {row['val_accuracy']:5.2f}% at {row['val_avg_macs']:.3f} MMACs "
                     f"(final exit {row['val_final_accuracy']:5.2f}%)  {row['seconds']:.1f} s  "
                     f"ETA {duration(eta)}")

    def _tune(self, val: ExitOutputs) -> Any:
        s = self.settings
        return tune_thresholds(val, self.costs, s.target_macs, s.threshold_grid, s.score_lambda)

    # -- after training
    def finish(self, source: dict[str, Any]) -> dict[str, Any]:
        """Evaluate as a trial does, tune thresholds on val, measure test; write the final files."""
        outputs = self.training.evaluate()
        s = self.settings
        tuned = self._tune(outputs["val"])
        test = simulate(outputs["test"], tuned.thresholds, self.costs)
        model = self.training.model.set_thresholds(tuned.thresholds)
        # metrics.json last: its presence says the other files are complete.
        atomic_write(self.dir / MODEL_FILE, lambda tmp: torch.save(model.state_dict(), tmp))
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
            "static_macs": self.costs.static_cost, "epochs": self.training.epoch,
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
    return {"accuracy": sim.accuracy, "avg_macs": sim.avg_cost,
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


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1)))


