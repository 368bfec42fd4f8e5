"""What a search left on disk, and which trial is best.

``read_experiment_dir`` reads an experiment directory (a local path, or a URI copied
through pyarrow's filesystem layer as Ray Tune wrote it): its settings and every trial's
config and last result. ``rank`` is the one rule ``aebnas retrain --best`` and
``analysis`` share: trials that trained all their epochs rank before trials stopped early
by ASHA or not yet finished (a score after one epoch is not comparable with a finished
one), errored trials come last; within a tier the higher validation score wins; a trial
without a score ranks after every trial with one. Ties keep the given order.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import numpy as np
import pyarrow.fs as pafs
import torch

from ..errors import UsageError
from ..config import ArchConfig
from ..cost.macs import exit_costs
from ..data.batches import BatchLoader
from ..data.datasets import Dataset, DatasetNotFoundError, load_dataset
from ..exit_policy import ExitCosts, ExitOutputs, load_exit_outputs, tune_thresholds
from ..nn import EarlyExitNet
from .storage import filesystem
from ..settings import ARCH_FILE, CHECKPOINT_FILE, EXIT_OUTPUTS_FILE, EXPERIMENT_FILE, TrialSettings, parse_trial_config
from ..training.loop import evaluate, load_checkpoint

T = TypeVar("T")

FAILURE_FILE = "failure.json"  # in a trial's directory: a deterministic failure, not retried


def permanent_failure(text: str | bytes) -> str | None:
    """The message of a permanent failure record (``FAILURE_FILE``'s text), None if it is none (aebnas 0.1
    also recorded out-of-memory failures: those are retried now)."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record["error"] if isinstance(record, dict) and record.get("permanent") else None

_TIER = {"finished": 0, "errored": 2}  # every other status (stopped, running, pending): 1


def rank_key(status: str, score: float | None) -> tuple[bool, int, float]:
    """Sort key of one trial (smaller is better) from its status and validation score."""
    unknown = score is None or math.isnan(score)
    return unknown, _TIER.get(status, 1), math.inf if unknown else -float(score)


def rank(trials: Iterable[T], status: Callable[[T], str], score: Callable[[T], float | None]) -> list[T]:
    """``trials`` best first by :func:`rank_key`."""
    return sorted(trials, key=lambda t: rank_key(status(t), score(t)))


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
    """The experiment settings and every trial's config and last result; UsageError if it is not one.

    A URI is copied to a local cache directory first (through pyarrow's filesystem layer,
    as Ray Tune wrote it); ``ExperimentDir.path`` is then that copy.
    """
    root = _local_copy(str(path)) if "://" in str(path) else Path(path).expanduser()
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


# What ranking and retraining read of a trial at a URI (its last checkpoint is added).
_TRIAL_FILES = (ARCH_FILE, "params.json", "result.json", EXIT_OUTPUTS_FILE, "error.txt")


def _local_copy(uri: str) -> Path:
    """Copy what this module reads of the experiment at ``uri`` into a local directory removed at exit.

    The settings file and, per trial, its config, results, exit outputs, error and last
    checkpoint (not every checkpoint). UsageError if it cannot be read.
    """
    local_fs = pafs.LocalFileSystem()
    try:
        fs, root = filesystem(uri)
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            raise UsageError(f"experiment directory {uri} does not exist")
        scratch = tempfile.TemporaryDirectory(prefix="aebnas_experiment_")
        _COPIES.append(scratch)  # removed when the process exits
        local = Path(scratch.name) / Path(root).name
        wanted = [EXPERIMENT_FILE]
        for trial in fs.get_file_info(pafs.FileSelector(root)):
            if trial.type != pafs.FileType.Directory or not trial.base_name.startswith("trial_"):
                continue
            inside = fs.get_file_info(pafs.FileSelector(trial.path))
            names = {i.base_name for i in inside if i.type == pafs.FileType.File}
            wanted += [f"{trial.base_name}/{f}" for f in _TRIAL_FILES if f in names]
            checkpoints = sorted(i.base_name for i in inside
                                 if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
            if checkpoints:
                last = f"{trial.path}/{checkpoints[-1]}"
                wanted += [f"{trial.base_name}/{checkpoints[-1]}/{i.base_name}"
                           for i in fs.get_file_info(pafs.FileSelector(last)) if i.type == pafs.FileType.File]
        for rel in wanted:
            if fs.get_file_info(f"{root}/{rel}").type == pafs.FileType.NotFound:
                continue
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{root}/{rel}", str(local / rel), source_filesystem=fs, destination_filesystem=local_fs)
    except (OSError, ValueError) as exc:  # pyarrow: unknown scheme, no access, …
        raise UsageError(f"cannot read the experiment at {uri}: {exc}") from None
    return local


_COPIES: list[tempfile.TemporaryDirectory] = []


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


def split_seed(settings: dict[str, Any]) -> int:
    """The seed of a search's train/validation split, from its saved settings."""
    seed = settings.get("split_seed")
    return int(settings.get("seed", 0) if seed is None else seed)


def load_experiment_data(exp: ExperimentDir, data_dir: str | None = None,
                         download: bool | None = None) -> Dataset:
    """The search's dataset with the same seeded train/validation split."""
    s = exp.settings
    try:
        return load_dataset(s["dataset"], data_dir=data_dir if data_dir is not None else s.get("data_dir"),
                            download=download if download is not None else bool(s.get("download")),
                            val_size=s.get("val_size"), seed=split_seed(s))
    except (DatasetNotFoundError, ValueError) as exc:
        raise UsageError(f"dataset of {exp.path}: {exc}") from None


def trial_arch(trial: TrialRecord, data: Dataset) -> tuple[ArchConfig, TrialSettings]:
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
            _, settings = trial_arch(trial, data)
            tuned = tune_thresholds(val, costs, target_macs, settings.threshold_grid, settings.score_lambda)
            scores.append(TrialScore(trial, tuned.score, source))
    return rank(scores, lambda s: trial_status(s.trial), lambda s: s.score)


def trial_status(trial: TrialRecord) -> str:
    """``finished`` (every configured epoch), ``errored`` (error.txt, not finished) or ``unfinished``."""
    last = trial.last or {}
    if last.get("epoch") is not None and last.get("epoch") == last.get("epochs"):
        return "finished"
    return "errored" if (trial.path / "error.txt").is_file() else "unfinished"


def _trial_val_outputs(trial: TrialRecord, data: Dataset,
                       device: torch.device | str) -> tuple[ExitOutputs | None, ExitCosts | None, str]:
    arch, settings = trial_arch(trial, data)
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
    arch, settings = trial_arch(trial, data)
    ckpts = sorted(trial.path.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
    if not ckpts:
        return None
    try:
        state = load_checkpoint(ckpts[-1], device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if state.get("arch") != arch.to_flat():
        return None
    model = EarlyExitNet(arch, settings.confidence).to(device)
    model.load_state_dict(state["model"])
    loader = BatchLoader.for_split(data, "val", batch_size=settings.eval_batch_size,
                                   resolution=arch.resolution, train=False, device=device)
    return evaluate(model, loader, settings.confidence)


