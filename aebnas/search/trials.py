"""What a search left on disk: every trial's config, reports and status, and which trial is best.

The one reader of an experiment directory, for ``analysis`` and ``aebnas retrain`` alike. Everything
is read from the files a search leaves, never from a live Ray session, so finished, partial (driver
killed), resumed and still-running searches all read, from a local path or a storage URI (read
through ``pyarrow.fs``, as Ray Tune writes it):

- ``experiment_state-*.json`` (newest): the trial list and Ray's status of each trial;
- ``trial_*/result.json``: one line per reported epoch (a resumed trial may repeat an epoch; the
  last report of an epoch wins);
- ``trial_*/arch.json`` (else ``params.json``, else the config in the state): the architecture
  and fixed settings;
- ``trial_*/failure.json`` (a deterministic failure written by the trainable) and ``error.txt``
  (written by Ray for every failed attempt): the error;
- ``aebnas_experiment.json``: the experiment's settings.

Why not ``ray.tune.ExperimentAnalysis`` or ``Tuner.restore(...).get_results()``: both unpickle Ray
objects (so need the Ray version that wrote them), ``Trial.error_file`` needs a running Ray, and both
only know what the driver saved in the experiment state. Measured on ray 2.60: after a trial's actor
died, the saved state still read ``RUNNING`` while ``error.txt`` was on disk. The status therefore
combines Ray's state with the files (:func:`trial_status`).

Statuses (:data:`STATUSES`): ``finished`` (ran every configured epoch), ``stopped`` (ended by the
scheduler, ASHA, before the configured epochs), ``errored``, ``running`` (started, not finished, no
final error; also a trial whose driver was killed — resume it with ``--resume``) and ``pending``.

``rank`` is the one rule ``aebnas retrain --best`` and ``analysis`` share: finished trials rank
before stopped and unfinished ones (a score after one epoch is not comparable with a finished one),
errored trials come last; within a tier the higher validation score wins; a trial without a score
ranks after every trial with one. Ties keep the given order.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import pyarrow.fs as pafs

from ..errors import UsageError
from ..settings import ARCH_FILE, EXIT_OUTPUTS_FILE, EXPERIMENT_FILE
from .storage import Location, filesystem

T = TypeVar("T")

STATUSES = ("finished", "stopped", "errored", "running", "pending")
FAILURE_FILE = "failure.json"  # in a trial's directory: a deterministic failure, not retried
RESULT_FILE = "result.json"
PARAMS_FILE = "params.json"
ERROR_FILE = "error.txt"
STATE_GLOB = re.compile(r"^experiment_state-.*\.json$")
DEFAULT_MAX_FAILURES = 2  # Experiment.max_failures, when aebnas_experiment.json is absent


# ------------------------------------------------------------------ pure rules
def permanent_failure(text: str | bytes) -> str | None:
    """The message of a permanent failure record (``FAILURE_FILE``'s text), None if it is none (aebnas 0.1
    also recorded out-of-memory failures: those are retried now)."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record["error"] if isinstance(record, dict) and record.get("permanent") else None


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


_TIER = {"finished": 0, "errored": 2}  # every other status (stopped, running, pending): 1


def rank_key(status: str, score: float | None) -> tuple[bool, int, float]:
    """Sort key of one trial (smaller is better) from its status and validation score."""
    unknown = score is None or math.isnan(score)
    return unknown, _TIER.get(status, 1), math.inf if unknown else -float(score)


def rank(trials: Iterable[T], status: Callable[[T], str], score: Callable[[T], float | None]) -> list[T]:
    """``trials`` best first by :func:`rank_key`."""
    return sorted(trials, key=lambda t: rank_key(status(t), score(t)))


# ------------------------------------------------------------------ one trial
@dataclass
class TrialRecord:
    """What one trial left: its directory (None: not started), config, one report per epoch, status, error."""

    trial_id: str
    location: Location | None
    config: dict[str, Any]  # arch.json, else params.json, else the config in Ray's state ({} if none)
    config_file: str | None  # which of those files it came from (None: Ray's state or nothing)
    lines: list[dict[str, Any]]
    status: str
    error: str | None  # the line that says what went wrong, for an errored trial

    @property
    def name(self) -> str:
        return self.location.name if self.location is not None else f"trial_{self.trial_id}"

    @property
    def path(self) -> Path:
        """The trial's directory on this machine (a URI's trials are read from a local copy)."""
        if self.location is None or self.location.scheme:
            raise ValueError(f"{self.name} has no local directory")
        return Path(self.location.path)

    @property
    def last(self) -> dict[str, Any] | None:
        """The last epoch's report (None before the first)."""
        return self.lines[-1] if self.lines else None

    @property
    def epochs_run(self) -> int:
        return int(self.lines[-1].get("epoch", len(self.lines))) if self.lines else 0

    def last_checkpoint(self) -> Location | None:
        """The newest ``checkpoint_N`` directory, None if there is none."""
        if self.location is None:
            return None
        names = [n for n, is_dir in self.location.list() if is_dir and re.fullmatch(r"checkpoint_\d+", n)]
        return self.location.child(max(names)) if names else None


def read_trial(trial_dir: Location | None, trial_id: str, ray_status: str | None, state_config: dict[str, Any],
               settings: dict[str, Any], session: str | None) -> TrialRecord:
    """One trial's record (``trial_dir`` None: the trial has not started)."""
    config, config_file = state_config, None
    lines: list[dict[str, Any]] = []
    error, failures, deterministic = None, 0, False
    if trial_dir is not None:
        lines = _read_lines(trial_dir.child(RESULT_FILE))
        config_file = next((f for f in (ARCH_FILE, PARAMS_FILE) if trial_dir.child(f).is_file()), None)
        if config_file is not None:
            config = trial_dir.child(config_file).read_json()
        error, failures, deterministic = _error(trial_dir, session)
    last = lines[-1] if lines else {}
    epochs = last.get("epochs") or config.get("epochs") or settings.get("epochs")
    record = TrialRecord(trial_id, trial_dir, config, config_file, lines, "pending", None)
    record.status = trial_status(ray_status, record.epochs_run, epochs, failures=failures,
                                 max_failures=int(settings.get("max_failures", DEFAULT_MAX_FAILURES)),
                                 deterministic_failure=deterministic, reported=bool(lines))
    record.error = error if record.status == "errored" else None
    return record


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


def _error(trial_dir: Location, since: str | None) -> tuple[str | None, int, bool]:
    """(error text, failed attempts since ``since``, deterministic) from failure.json and error.txt."""
    failure, error_txt = trial_dir.child(FAILURE_FILE), trial_dir.child(ERROR_FILE)
    text = error_txt.read_text() if error_txt.is_file() else ""
    failures = count_failures(text, since)
    permanent = permanent_failure(failure.read_bytes()) if failure.is_file() else None
    if permanent is not None:
        return permanent, failures, True
    return (first_error_line(text) or None) if text else None, failures, False


# ------------------------------------------------------------------ an experiment
@dataclass
class ExperimentRecord:
    """An experiment directory: its settings ({} without ``aebnas_experiment.json``) and every trial, by id."""

    location: Location
    settings: dict[str, Any]
    trials: list[TrialRecord]

    @property
    def path(self) -> Path:
        """The experiment's directory on this machine (a URI is read from a local copy)."""
        return Path(self.location.path)

    def trial_names(self) -> str:
        return ", ".join(t.name for t in self.trials) or "(none)"


def is_experiment_dir(location: Location) -> bool:
    """True when ``location`` holds an aebnas experiment file or a Ray Tune experiment state."""
    names = {n for n, _ in location.list()}
    return EXPERIMENT_FILE in names or any(STATE_GLOB.match(n) for n in names)


def read_experiment(loc: Location) -> ExperimentRecord:
    """Every trial of the experiment at ``loc``: those in Ray's newest state, then trial directories
    the state lacks; sorted by trial id."""
    settings_file = loc.child(EXPERIMENT_FILE)
    settings = settings_file.read_json() if settings_file.is_file() else {}
    state, session = _read_state(loc)
    dirs = {n for n, is_dir in loc.list() if is_dir and n.startswith("trial_")}
    ids = list(state) + sorted(d[len("trial_"):] for d in dirs if d[len("trial_"):] not in state)
    trials = []
    for trial_id in ids:
        ray_status, dirname, config = state.get(trial_id, (None, f"trial_{trial_id}", {}))
        trials.append(read_trial(loc.child(dirname) if dirname in dirs else None, trial_id, ray_status, config,
                                 settings, session))
    return ExperimentRecord(loc, settings, sorted(trials, key=lambda t: t.trial_id))


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


def read_experiment_dir(path: str | Path) -> ExperimentRecord:
    """An aebnas experiment's settings and its trials that left a directory with a config (what
    ``aebnas retrain`` can rebuild); UsageError if it is not one.

    A URI is copied to a local cache directory first (through pyarrow's filesystem layer, as Ray
    Tune wrote it), so checkpoints and exit outputs open as local files; ``path`` is then that copy.
    """
    root = _local_copy(str(path)) if "://" in str(path) else Path(path).expanduser()
    if not root.is_dir():
        raise UsageError(f"experiment directory {root} does not exist")
    if not (root / EXPERIMENT_FILE).is_file():
        raise UsageError(f"{root} is not an aebnas experiment directory (no {EXPERIMENT_FILE}); "
                         "pass the directory `aebnas search` printed (STORAGE_PATH/NAME)")
    exp = read_experiment(Location(root))
    exp.trials = [t for t in exp.trials if t.config_file is not None]
    return exp


# What ranking and retraining read of a trial at a URI (its last checkpoint is added).
_TRIAL_FILES = (ARCH_FILE, PARAMS_FILE, RESULT_FILE, EXIT_OUTPUTS_FILE, ERROR_FILE, FAILURE_FILE)


def _local_copy(uri: str) -> Path:
    """Copy what this module reads of the experiment at ``uri`` into a local directory removed at exit.

    The settings file, Ray's newest experiment state and, per trial, its config, results, exit
    outputs, errors and last checkpoint (not every checkpoint). UsageError if it cannot be read.
    """
    try:
        fs, root = filesystem(uri)
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            raise UsageError(f"experiment directory {uri} does not exist")
        scratch = tempfile.TemporaryDirectory(prefix="aebnas_experiment_")
        _COPIES.append(scratch)  # removed when the process exits
        local = Path(scratch.name) / Path(root).name
        for rel in _wanted_files(fs, root):
            if fs.get_file_info(f"{root}/{rel}").type == pafs.FileType.NotFound:
                continue
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{root}/{rel}", str(local / rel), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
    except (OSError, ValueError) as exc:  # pyarrow: unknown scheme, no access, …
        raise UsageError(f"cannot read the experiment at {uri}: {exc}") from None
    return local


def _wanted_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """Paths under ``root`` that :func:`_local_copy` copies."""
    entries = fs.get_file_info(pafs.FileSelector(root))
    states = sorted(e.base_name for e in entries if e.type == pafs.FileType.File and STATE_GLOB.match(e.base_name))
    wanted = [EXPERIMENT_FILE, *states[-1:]]
    for trial in entries:
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
    return wanted


_COPIES: list[tempfile.TemporaryDirectory] = []


__all__ = ["STATUSES", "FAILURE_FILE", "TrialRecord", "ExperimentRecord", "read_experiment", "read_experiment_dir",
           "read_trial", "is_experiment_dir", "trial_status", "rank", "rank_key", "permanent_failure",
           "first_error_line", "count_failures", "dedupe_epochs"]
