"""Choosing a trial of a finished search: by name, or by its validation score at a target.

``score_trials`` re-scores every trial at any target MACs, from what it reported, its saved exit
outputs or its last checkpoint, and ranks them by :func:`aebnas.search.trials.rank`; ``aebnas
retrain --best`` and ``--trial`` pick from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ArchConfig
from ..cost.macs import exit_costs
from ..data.batches import BatchLoader
from ..data.datasets import Dataset, DatasetNotFoundError, load_dataset
from ..errors import UsageError
from ..exit_policy import ExitCosts, ExitOutputs, load_exit_outputs, tune_thresholds
from ..nn import EarlyExitNet
from ..search.trials import ExperimentRecord, TrialRecord, rank
from ..settings import CHECKPOINT_FILE, EXIT_OUTPUTS_FILE, TrialSettings, parse_trial_config
from ..training.loop import evaluate, load_checkpoint


def find_trial(exp: ExperimentRecord, ident: str) -> TrialRecord:
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


def load_experiment_data(exp: ExperimentRecord, data_dir: str | None = None,
                         download: bool | None = None) -> Dataset:
    """The search's dataset with the same seeded train/validation split."""
    s = exp.settings
    try:
        return load_dataset(s["dataset"], data_dir=data_dir if data_dir is not None else s.get("data_dir"),
                            download=download if download is not None else bool(s.get("download")),
                            val_size=s.get("val_size"), seed=split_seed(s), image_size=s.get("image_size"),
                            test_size=s.get("test_size"))
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


def score_trials(exp: ExperimentRecord, target_macs: float, data: Dataset,
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
    return rank(scores, lambda s: s.trial.status, lambda s: s.score)


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
    checkpoint = trial.last_checkpoint()
    if checkpoint is None or not checkpoint.child(CHECKPOINT_FILE).is_file():
        return None
    try:
        state = load_checkpoint(Path(checkpoint.child(CHECKPOINT_FILE).path), device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if state.get("arch") != arch.to_flat():
        return None
    model = EarlyExitNet(arch, settings.confidence).to(device)
    model.load_state_dict(state["model"])
    loader = BatchLoader.for_split(data, "val", batch_size=settings.eval_batch_size,
                                   resolution=arch.resolution, train=False, device=device)
    return evaluate(model, loader, settings.confidence)


