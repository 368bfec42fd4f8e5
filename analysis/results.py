"""Experiment directories → pandas DataFrames: one row per trial, and the per-epoch history.

Everything is read from the files a search leaves in its experiment directory, never
from a live Ray session, so finished, partial (driver killed), resumed and still-running
searches all load, from a local path or a storage URI (``s3://``, ``gs://``,
``file://``; read through ``pyarrow.fs``, as Ray Tune itself does):

- ``experiment_state-*.json`` (newest): the trial list and Ray's status of each trial;
- ``trial_*/result.json``: one line per reported epoch (a resumed trial may repeat an
  epoch; the last report of an epoch wins);
- ``trial_*/arch.json`` (else ``params.json``, else the config in the state): the
  architecture and fixed settings;
- ``trial_*/failure.json`` (a deterministic failure written by the trainable) and
  ``error.txt`` (written by Ray for every failed attempt): the error;
- ``aebnas_experiment.json``: the experiment's settings (under a path or a URI alike), which
  give the default target MACs.

Why not ``ray.tune.ExperimentAnalysis`` or ``Tuner.restore(...).get_results()``: both
unpickle Ray objects (so need the Ray version that wrote them), ``Trial.error_file``
needs a running Ray, ``Tuner.restore`` needs the trainable, and both only know what the
driver saved in the experiment state. Measured on ray 2.60: after a trial's actor died,
the saved state still read ``RUNNING`` while ``error.txt`` was on disk. The status
therefore combines Ray's state with the files (:func:`trial_status`).

Statuses: ``finished`` (ran every configured epoch), ``stopped`` (ended by the scheduler,
ASHA, before the configured epochs), ``errored`` (see the ``error`` column), ``running``
(started, not finished, no final error; also a trial whose driver was killed — resume it
with ``--resume``) and ``pending`` (not started). Units: MACs in MMACs, accuracy in %.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import pyarrow.fs as pafs

from aebnas.settings import ARCH_FILE, EXIT_OUTPUTS_FILE, EXPERIMENT_FILE, parse_trial_config, resolved_config
from aebnas.search.trials import FAILURE_FILE, permanent_failure

STATUSES = ("finished", "stopped", "errored", "running", "pending")
RESULT_FILE = "result.json"
PARAMS_FILE = "params.json"
ERROR_FILE = "error.txt"
STATE_GLOB = re.compile(r"^experiment_state-.*\.json$")
DEFAULT_MAX_FAILURES = 2  # Experiment.max_failures, when aebnas_experiment.json is absent
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


# ------------------------------------------------------------------ storage access
class Location:
    """A directory on a local disk or behind a storage URI, read through ``pyarrow.fs``."""

    def __init__(self, location: str | Path) -> None:
        text = str(location)
        self.scheme, self.query = "", ""
        if "://" in text:
            self.fs, self.path = pafs.FileSystem.from_uri(text)
            self.scheme = text.split("://", 1)[0]
            self.query = "?" + text.split("?", 1)[1] if "?" in text else ""  # e.g. ?region=… for s3
        else:
            self.fs, self.path = pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
        self.path = self.path.rstrip("/") or "/"

    def child(self, *parts: str) -> "Location":
        out = object.__new__(Location)
        out.fs, out.scheme, out.query = self.fs, self.scheme, self.query
        out.path = "/".join([self.path.rstrip("/"), *parts])
        return out

    @property
    def url(self) -> str:
        """What a user (and :func:`read_bytes`) can open: a local path or a URI."""
        return f"{self.scheme}://{self.path}{self.query}" if self.scheme else self.path

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8", errors="replace")

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def list(self) -> list[tuple[str, bool]]:
        """(name, is_dir) of every entry, sorted by name."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((i.base_name, i.type == pafs.FileType.Directory) for i in infos)


def read_bytes(location: str | Path) -> bytes:
    """Bytes of a file given as a local path or a storage URI (an artifact path of ``trials``)."""
    return Location(location).read_bytes()


# ------------------------------------------------------------------ pure rules
def trial_status(ray_status: str | None, epochs_run: int, epochs: int | None, *, failures: int = 0,
                 max_failures: int = DEFAULT_MAX_FAILURES, deterministic_failure: bool = False,
                 reported: bool = False) -> str:
    """One of :data:`STATUSES` from Ray's status (None if absent from the state) and the files.

    ``reported``: the trial wrote a result; with ``epochs == 0`` (inherited weights scored as
    they are, reported once as epoch 0) that one report finishes it.
    ``failures`` counts failed attempts in ``error.txt``; Ray retries a trial until it has
    failed more than ``max_failures`` times, and ``failure.json`` (``deterministic_failure``)
    means every retry fails at once.
    """
    if (epochs and epochs_run >= epochs) or (epochs == 0 and reported):
        return "finished"
    if ray_status == "ERROR" or deterministic_failure or failures > max_failures:
        return "errored"
    if ray_status == "TERMINATED":
        return "stopped"
    # Started and not finished is "running", whatever the (possibly stale) state says: a resumed
    # search lists its unfinished trials as PENDING again, with their earlier results.
    if ray_status == "RUNNING" or epochs_run > 0:
        return "running"
    return "pending"


def first_error_line(text: str) -> str:
    """The line of an error report that says what went wrong (the last exception line of a
    traceback, else the first line that is not Ray's ``Failure # N (occurred at …)`` header)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    exception = re.compile(r"^([\w.]+(Error|Exception|Interrupt)|[\w.]*TrialError)(\(\w+\))?: ")
    hits = [ln for ln in lines if exception.match(ln)]
    if hits:
        return hits[-1]
    rest = [ln for ln in lines if not ln.startswith(("Failure #", "Traceback", "File "))]
    return rest[0] if rest else ""


def count_failures(text: str, since: str | None = None) -> int:
    """Failed attempts recorded in a Ray ``error.txt`` (its ``Failure # N (occurred at TIME)``
    headers), only those at or after ``since`` (Ray's ``YYYY-MM-DD_HH-MM-SS``) when given: a
    resumed search (``resume_errored``) retries a trial that failed in an earlier session."""
    times = re.findall(r"^Failure # \d+(?: \(occurred at ([\d_-]+)\))?", text, flags=re.MULTILINE)
    if not times:
        return 1 if text.strip() else 0
    return sum(1 for t in times if since is None or not t or t >= since)


def dedupe_epochs(lines: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Result lines with one entry per epoch, the last report of an epoch winning, by epoch."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in lines:
        epoch = line.get("epoch", line.get("training_iteration"))
        if epoch is not None:
            by_epoch[int(epoch)] = line
    return [by_epoch[e] for e in sorted(by_epoch)]


# ------------------------------------------------------------------ loading
def is_experiment_dir(location: Location) -> bool:
    """True when ``location`` holds an aebnas experiment file or a Ray Tune experiment state."""
    names = {n for n, _ in location.list()}
    return EXPERIMENT_FILE in names or any(STATE_GLOB.match(n) for n in names)


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
    settings_file = loc.child(EXPERIMENT_FILE)
    settings = settings_file.read_json() if settings_file.is_file() else {}
    state, session = _read_state(loc)
    dirs = {n for n, is_dir in loc.list() if is_dir and n.startswith("trial_")}
    ids = list(state) + sorted(d[len("trial_"):] for d in dirs if d[len("trial_"):] not in state)
    rows, history = [], []
    for trial_id in ids:
        ray_status, dirname, config = state.get(trial_id, (None, f"trial_{trial_id}", {}))
        row, lines = _load_trial(loc.child(dirname) if dirname in dirs else None, trial_id, ray_status, config,
                                 settings, session)
        rows.append({"experiment": name, **row})
        history += [{"experiment": name, "trial_id": trial_id, **_metrics(line)} for line in lines]
    trials = _order(pd.DataFrame(rows))
    trials = trials.sort_values("trial_id", kind="stable").reset_index(drop=True)
    return Results(trials=trials, history=_history_frame(history), settings={name: settings})


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


def _read_state(loc: Location) -> tuple[dict[str, tuple[str, str, dict[str, Any]]], str | None]:
    """trial id → (Ray status, trial dir name, config) from the newest experiment state, and the
    start time of the session that wrote it (``experiment_state-<start>.json``; a resume starts one)."""
    states = sorted(n for n, is_dir in loc.list() if not is_dir and STATE_GLOB.match(n))
    if not states:
        return {}, None
    session = states[-1][len("experiment_state-"):-len(".json")]
    try:
        data = loc.child(states[-1]).read_json()
    except (json.JSONDecodeError, OSError):
        return {}, None  # a state being rewritten: fall back to the trial directories
    out = {}
    for trial_json, _ in data.get("trial_data", []):
        trial = json.loads(trial_json)
        dirname = trial.get("relative_logdir") or trial.get("custom_dirname") or f"trial_{trial['trial_id']}"
        config = trial.get("config") if isinstance(trial.get("config"), dict) else {}
        out[trial["trial_id"]] = (trial.get("status"), dirname, config)
    return out, session


def _read_lines(loc: Location) -> list[dict[str, Any]]:
    if not loc.is_file():
        return []
    lines = []
    for text in loc.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue  # a line cut off by a crash
    return dedupe_epochs(lines)


def _architecture(trial_dir: Location | None, config: dict[str, Any]) -> dict[str, Any]:
    """The resolved flat config (architecture + settings) and ``exit_positions`` ("1,3"), from
    ``arch.json``, else ``params.json``, else the config in the experiment state ({} if none parses)."""
    arch_file = trial_dir.child(ARCH_FILE) if trial_dir else None
    params_file = trial_dir.child(PARAMS_FILE) if trial_dir else None
    if arch_file and arch_file.is_file():
        flat = arch_file.read_json()
    else:
        raw = params_file.read_json() if params_file and params_file.is_file() else config
        try:
            flat = resolved_config(*parse_trial_config(raw))
        except (ValueError, TypeError):
            return {}
    positions = [i for i in range(1, 5) if flat.get(f"exit{i}_enabled")]
    return {**flat, "exit_positions": ",".join(map(str, positions))}


def _error(trial_dir: Location, since: str | None) -> tuple[str | None, int, bool]:
    """(error text, failed attempts since ``since``, deterministic) from failure.json and error.txt."""
    failure, error_txt = trial_dir.child(FAILURE_FILE), trial_dir.child(ERROR_FILE)
    text = error_txt.read_text() if error_txt.is_file() else ""
    failures = count_failures(text, since)
    permanent = permanent_failure(failure.read_bytes()) if failure.is_file() else None
    if permanent is not None:
        return permanent, failures, True
    return (first_error_line(text) or None) if text else None, failures, False


def _latest_checkpoint(trial_dir: Location) -> str | None:
    names = [n for n, is_dir in trial_dir.list() if is_dir and re.fullmatch(r"checkpoint_\d+", n)]
    return trial_dir.child(max(names)).url if names else None


def _load_trial(trial_dir: Location | None, trial_id: str, ray_status: str | None, config: dict[str, Any],
                settings: dict[str, Any], session: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The trial's row and its result lines (``trial_dir`` None: the trial has not started)."""
    lines = _read_lines(trial_dir.child(RESULT_FILE)) if trial_dir else []
    arch = _architecture(trial_dir, config)
    last = _metrics(lines[-1]) if lines else {}
    epochs = last.get("epochs") or arch.get("epochs") or settings.get("epochs")
    error, failures, deterministic = _error(trial_dir, session) if trial_dir else (None, 0, False)
    epochs_run = int(lines[-1].get("epoch", len(lines))) if lines else 0
    status = trial_status(ray_status, epochs_run, epochs, failures=failures,
                          max_failures=int(settings.get("max_failures", DEFAULT_MAX_FAILURES)),
                          deterministic_failure=deterministic, reported=bool(lines))
    outputs = trial_dir.child(EXIT_OUTPUTS_FILE) if trial_dir else None
    row = {"trial_id": trial_id, "status": status, "error": error if status == "errored" else None,
           "epochs_run": epochs_run, "epochs": epochs, **{k: v for k, v in arch.items() if k not in last},
           **last,
           "trial_dir": trial_dir.url if trial_dir else None,
           "exit_outputs": outputs.url if outputs and outputs.is_file() else None,
           "checkpoint": _latest_checkpoint(trial_dir) if trial_dir else None}
    return row, lines


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
