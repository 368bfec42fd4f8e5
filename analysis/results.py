"""Experiment directories → pandas DataFrames: one row per trial, and the per-epoch history.

What a search left is read by :mod:`aebnas.search.trials` (the one reader of an experiment directory
and the one trial status, which ``aebnas retrain`` uses too): finished, partial (driver killed),
resumed and still-running searches all load, from a local path or a storage URI (``s3://``,
``gs://``, ``file://``; read through ``pyarrow.fs``, as Ray Tune itself does). This module turns
those records into frames.

Statuses: ``finished`` (ran every configured epoch), ``stopped`` (ended by the scheduler,
ASHA, before the configured epochs), ``errored`` (see the ``error`` column), ``running``
(started, not finished, no final error; also a trial whose driver was killed — resume it
with ``--resume``) and ``pending`` (not started). Units: MACs in MMACs, accuracy in %.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from aebnas.search.storage import Location
from aebnas.search.trials import (STATUSES, TrialRecord, count_failures, dedupe_epochs, first_error_line,
                                  is_experiment_dir, read_experiment, trial_status)
from aebnas.settings import ARCH_FILE, EXIT_OUTPUTS_FILE, EXPERIMENT_FILE, parse_trial_config, resolved_config

# Ray bookkeeping in every result line that is neither a metric nor useful to compare trials.
_RAY_KEYS = frozenset({"config", "date", "timestamp", "checkpoint_dir_name", "should_checkpoint", "done",
                       "training_iteration", "trial_id", "time_this_iter_s", "time_since_restore",
                       "iterations_since_restore", "pid", "experiment_tag"})
_FIRST_COLUMNS = ("experiment", "trial_id", "status", "error", "epochs_run", "epochs", "score", "accuracy",
                  "avg_macs", "test_accuracy", "test_avg_macs", "thresholds", "exit_positions", "resolution",
                  "target_macs", "static_macs", "final_accuracy", "oracle_accuracy", "oracle_macs")
ARTIFACT_COLUMNS = ("trial_dir", "exit_outputs", "checkpoint")
_BASE_COLUMNS = ("experiment", "trial_id", "status", "error", "epochs_run", "epochs")


class NotAnExperimentError(ValueError):
    """The path is missing, or is not an experiment directory."""


@dataclass
class Results:
    """Loaded experiments: ``trials`` (one row per trial), ``history`` (one row per trial and
    epoch) and ``settings`` (experiment name → its ``aebnas_experiment.json``, {} if absent)."""

    trials: pd.DataFrame
    history: pd.DataFrame
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def trial(self, key: str, experiment: str | None = None) -> pd.Series:
        """The row of one trial, given its id, its directory name (``trial_<id>``) or a unique end
        of its id (``00001``), optionally as ``EXPERIMENT/ID``; raises KeyError naming the trials."""
        if experiment is None and "/" in key:
            experiment, key = key.rsplit("/", 1)
        rows = self.trials if experiment is None else self.trials[self.trials["experiment"] == experiment]
        key = key.removeprefix("trial_")
        for match in (rows[rows["trial_id"] == key], rows[rows["trial_id"].str.endswith(key)]):
            if len(match) == 1:
                return match.iloc[0]
            if len(match) > 1:
                where = [f"{e}/{t}" for e, t in zip(match["experiment"], match["trial_id"])]
                raise KeyError(f"trial {key!r} is ambiguous: {', '.join(where)}; pass EXPERIMENT/ID")
        raise KeyError(f"no trial {key!r}; trials are {', '.join(sorted(rows['trial_id']))}")


def read_bytes(location: str | Path) -> bytes:
    """Bytes of a file given as a local path or a storage URI (an artifact path of ``trials``)."""
    return Location(location).read_bytes()


# ------------------------------------------------------------------ loading
def load_experiment(path: str | Path, name: str | None = None) -> Results:
    """Load one experiment directory (local path or URI); ``name`` defaults to its base name.

    Raises NotAnExperimentError when the path is missing or not an experiment.
    """
    loc = Location(path)
    if not loc.is_dir():
        raise NotAnExperimentError(f"{loc.url}: no such directory")
    if not is_experiment_dir(loc):
        raise NotAnExperimentError(f"{loc.url}: not an experiment directory (no {EXPERIMENT_FILE} and no "
                                   "experiment_state-*.json); pass the directory `aebnas search` printed")
    name = name or loc.name
    exp = read_experiment(loc)
    rows = [{"experiment": name, **_row(t, exp.settings)} for t in exp.trials]
    history = [{"experiment": name, "trial_id": t.trial_id, **_metrics(line)} for t in exp.trials for line in t.lines]
    trials = _order(pd.DataFrame(rows))
    trials = trials.sort_values("trial_id", kind="stable").reset_index(drop=True)
    return Results(trials=trials, history=_history_frame(history), settings={name: exp.settings})


def load_experiments(paths: Sequence[str | Path]) -> Results:
    """Load several experiments into one :class:`Results` (the ``experiment`` column tells them apart;
    two directories with the same base name are named ``parent/name``)."""
    names = [Location(p).name for p in paths]
    if len(set(names)) < len(names):
        names = ["/".join(Location(p).path.rstrip("/").rsplit("/", 2)[-2:]) for p in paths]
    loaded = [load_experiment(p, n) for p, n in zip(paths, names)]
    return Results(trials=_order(pd.concat([r.trials for r in loaded], ignore_index=True)),
                   history=pd.concat([r.history for r in loaded], ignore_index=True),
                   settings={k: v for r in loaded for k, v in r.settings.items()})


def _architecture(trial: TrialRecord) -> dict[str, Any]:
    """The resolved flat config (architecture + settings) and ``exit_positions`` ("1,3"), from
    ``arch.json``, else ``params.json``, else the config in the experiment state ({} if none parses)."""
    flat = trial.config
    if trial.config_file != ARCH_FILE:
        try:
            flat = resolved_config(*parse_trial_config(trial.config))
        except (ValueError, TypeError):
            return {}
    positions = [i for i in range(1, 5) if flat.get(f"exit{i}_enabled")]
    return {**flat, "exit_positions": ",".join(map(str, positions))}


def _row(trial: TrialRecord, settings: dict[str, Any]) -> dict[str, Any]:
    """The trial's row: status, metrics of its last report, architecture, artifact paths."""
    arch = _architecture(trial)
    last = _metrics(trial.last) if trial.last else {}
    epochs = last.get("epochs") or arch.get("epochs") or settings.get("epochs")
    outputs = trial.location.child(EXIT_OUTPUTS_FILE) if trial.location else None
    checkpoint = trial.last_checkpoint()
    return {"trial_id": trial.trial_id, "status": trial.status, "error": trial.error,
            "epochs_run": trial.epochs_run, "epochs": epochs, **{k: v for k, v in arch.items() if k not in last},
            **last,
            "trial_dir": trial.location.url if trial.location else None,
            "exit_outputs": outputs.url if outputs and outputs.is_file() else None,
            "checkpoint": checkpoint.url if checkpoint else None}


def _metrics(line: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in line.items() if k not in _RAY_KEYS}


def _order(frame: pd.DataFrame) -> pd.DataFrame:
    """Identity, status and headline metrics first, artifact paths last (all present, even with no trial)."""
    frame = frame.reindex(columns=[*frame.columns, *(c for c in (*_BASE_COLUMNS, *ARTIFACT_COLUMNS)
                                                     if c not in frame.columns)])
    first = [c for c in _FIRST_COLUMNS if c in frame.columns]
    last = [c for c in ARTIFACT_COLUMNS if c in frame.columns]
    middle = [c for c in frame.columns if c not in first and c not in last]
    out = frame[first + middle + last].reset_index(drop=True)
    for col in ("epochs_run", "epochs"):
        if col in out:
            out[col] = out[col].astype("Int64")
    return out


def _history_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=None if rows else ["experiment", "trial_id", "epoch"])
    return frame.sort_values(["experiment", "trial_id", "epoch"], kind="stable").reset_index(drop=True)


def trials_with_results(trials: pd.DataFrame) -> pd.DataFrame:
    """Rows that reported at least one epoch (have ``accuracy`` and ``avg_macs``)."""
    if "accuracy" not in trials or "avg_macs" not in trials:
        return trials.iloc[0:0]
    return trials[trials["accuracy"].notna() & trials["avg_macs"].notna()]


__all__ = ["Results", "NotAnExperimentError", "STATUSES", "load_experiment", "load_experiments", "read_bytes",
           "trials_with_results", "trial_status", "count_failures", "dedupe_epochs", "first_error_line"]
