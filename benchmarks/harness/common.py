"""The benchmark harness: the machine, the result files, searches and their provenance.

A script under ``benchmarks/`` states one claim's settings (or, measuring its claim on several setups,
one :class:`~harness.claims.Variant` per setup), holds its own ``measure`` function and calls
:func:`main` (or :func:`main_with_variants`). ``main`` records the machine, the date and the load
average before and after, runs the measurement, writes the claim's small result file
``docs/benchmarks/<claim>.json`` (figures + the markdown of its section) and rebuilds
``docs/benchmarks.md`` (:mod:`harness.report`). Rows a script measures go to disk as it measures
them (``ctx.add_row``, :mod:`harness.rows`), so a run stopped by a time limit keeps them.
``--quick`` runs the script's tiny settings and writes under the git-ignored
``results/benchmarks/quick/`` instead, so the docs only ever show real runs. Experiments, trial
directories and other bulky outputs go to ``results/benchmarks/`` (git-ignored).

Everything measured is a ratio (or a difference) between two things timed in the same
run, interleaved where they are cheap enough to repeat: the machine is shared and its
load changes by the minute. Only what several scripts use lives here; a helper used by
one script lives in that script, and the independent references the claims check
against (MAC count, per-sample threshold loop) are in ``aebnas.reference``.

Searches record which code ran them (:data:`PROVENANCE_FILE` in the experiment
directory); ``--reuse`` re-analyses a search only when that code is the current code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .claims import Claim, Variant
from .rows import RowLog, TimeLimit, partial_path, raise_on_sigterm
from .tables import fmt, md_table  # noqa: F401 (every script takes them from here)

REPO = Path(__file__).resolve().parents[2]
DOCS_DIR = REPO / "docs" / "benchmarks"   # one JSON per claim + figures (committed)
SCRATCH = REPO / "results" / "benchmarks"  # experiments and bulky outputs (git-ignored)
ENV_SETTINGS = ("RAY_worker_niceness", "OMP_NUM_THREADS")  # recorded in a result's command when set
# What a search runs: a change to any file here makes an earlier search stale for --reuse.
CODE_DIRS = ("aebnas", "search_spaces")
PROVENANCE_FILE = "benchmark_provenance.json"  # in an experiment directory, written after the search


def tune_config(file: str, name: str) -> Any:
    """The Experiment ``name`` of ``tune_configs/<file>.py``, whose settings a benchmark shares (those
    scripts are not a package), with its storage_path made absolute as when run from the repository root."""
    import dataclasses
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tune_config_{file}", REPO / "tune_configs" / f"{file}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    exp = getattr(module, name)
    return dataclasses.replace(exp, storage_path=str(REPO / exp.storage_path))


# ======================================================================== recording
@dataclass
class Outcome:
    """What a measurement returns: the table cells, the numbers and the section's markdown."""

    measured: str            # one line for the claims table
    holds: bool | str | None  # None: no pass/fail goal (a figure to know); str: why it cannot be told
    figures: dict[str, Any]  # the numbers behind the text (JSON)
    details: str             # markdown of the section body


@dataclass
class Context:
    """Where a measurement writes: ``scratch`` (bulky, git-ignored) and ``docs`` (figures)."""

    claim: Claim
    scratch: Path
    docs: Path
    quick: bool
    reuse: bool = False  # searches: re-analyse those in ``scratch`` that the current code ran
    # rows written as they are measured (harness.rows), through ``add_row``; None outside ``main``
    log: RowLog | None = None

    def add_row(self, table: str, row: dict[str, Any]) -> None:
        """Row ``row`` of ``table`` on disk now (``<claim>.partial.jsonl``), kept if the run is stopped."""
        if self.log is not None:
            self.log.add(table, row)


def machine() -> dict[str, Any]:
    """Platform, CPU model (/proc/cpuinfo), cores, Python / torch / ray versions, GPU (or None)."""
    try:
        import ray
        ray_version = ray.__version__
    except ImportError:  # a GPU machine may have torch but not Ray: scripts that need no Ray still run
        ray_version = None

    from aebnas.deploy.latency_profile import cpu_model

    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray_version, "gpu": gpu}


def main(claim: Claim, measure: Callable[..., Outcome], settings: dict[str, Any], quick: dict[str, Any],
         reusable: bool = False, flags: dict[str, str] | None = None) -> int:
    """Command line of a benchmark script: run ``measure`` with ``settings`` (``--quick``: ``quick``).
    ``reusable``: the claim's searches may be re-analysed with ``--reuse``. ``flags``: the script's own
    on/off options, name → help (``{"static_on_cpu": …}`` is ``--static-on-cpu``), passed to ``measure``
    as keyword arguments and recorded with the settings."""
    return main_with_variants({"": Variant(claim, settings, quick)}, measure, reusable, flags)


def main_with_variants(variants: dict[str, Variant], measure: Callable[..., Outcome], reusable: bool = False,
                       flags: dict[str, str] | None = None) -> int:
    """Command line of a script that measures its claim on several setups: ``--variant NAME`` picks one of
    ``variants`` (the first by default; a single one named "" has no flag), run as :func:`main` runs a claim.

    Rows a script adds with ``ctx.add_row`` go to ``<claim>.partial.jsonl`` as they are measured (beside the
    record with ``--docs-dir`` or ``--quick``, else in the claim's scratch directory), removed once the record
    is written. SIGTERM (the limit of ``timeout``) raises :class:`~harness.rows.TimeLimit` in ``measure``: one
    that does not catch it ends here with exit status 124, its rows left in the partial file."""
    args = _parse_args(variants, reusable, flags or {})
    variant = variants[args.variant]
    if variant.needs is not None and not variant.needs.is_file():
        raise SystemExit(variant.missing)
    ctx = _context(variant.claim, args)
    chosen = {**(variant.quick if args.quick else variant.settings),
              **{name: getattr(args, name) for name in (flags or {})}}
    load_start, started, t0 = os.getloadavg(), dt.datetime.now().astimezone(), time.perf_counter()
    print(f"benchmark {ctx.claim.number} ({ctx.claim.key}): load average {load_start[0]:.2f} on "
          f"{os.cpu_count()} cores", flush=True)
    ctx.log = RowLog(partial_path(args.docs_dir or (ctx.docs if args.quick else ctx.scratch), ctx.claim.key),
                     {"number": ctx.claim.number, "key": ctx.claim.key, "title": ctx.claim.title,
                      "command": _command(), "date": started.isoformat(timespec="seconds"), "machine": machine(),
                      "settings": plain(chosen)})
    raise_on_sigterm()
    try:
        outcome = measure(ctx, **chosen)
    except TimeLimit:
        print(f"benchmark {ctx.claim.number} stopped by SIGTERM (its time limit) after "
              f"{time.perf_counter() - t0:.0f} s: no record written; the {ctx.log.rows} row(s) it measured are in "
              f"{ctx.log.path} (python benchmarks/harness/rows.py {ctx.log.path})", flush=True)
        return 124
    record = _record(ctx.claim, outcome, chosen, started, time.perf_counter() - t0, load_start)
    path = ctx.docs / f"{ctx.claim.key}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    ctx.log.finish()
    return _rebuild_page(ctx, outcome, path, args)


def _parse_args(variants: dict[str, Variant], reusable: bool, flags: dict[str, str]) -> argparse.Namespace:
    """The flags of a benchmark script (``--variant`` when it has several); the description is its first
    variant's claim."""
    claim = next(iter(variants.values())).claim
    parser = argparse.ArgumentParser(description=f"Benchmark {claim.number}: {claim.title}. Goal: {claim.goal}")
    if len(variants) > 1:
        parser.add_argument("--variant", choices=list(variants), default=next(iter(variants)),
                            help="the setup to measure the claim on, each its own section of docs/benchmarks.md: "
                                 + "; ".join(f"{name}{' (default)' if i == 0 else ''}: benchmark {v.claim.number}, "
                                             f"{v.claim.title}" for i, (name, v) in enumerate(variants.items())))
    else:
        parser.set_defaults(variant=next(iter(variants)))
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings to check the script works; writes under results/benchmarks/quick/ only")
    if reusable:
        parser.add_argument("--reuse", action="store_true",
                            help="re-analyse the searches already in results/benchmarks/ instead of running them "
                                 "(one left unfinished by a killed run is run again); "
                                 f"refused unless the current {' and '.join(f'{d}/' for d in CODE_DIRS)} ran them "
                                 "with the same settings")
    parser.add_argument("--docs-dir", type=Path, help="write the result file here instead of docs/benchmarks/ "
                        "(a run on another machine, copied back by hand)")
    for name, text in flags.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", help=text)
    return parser.parse_args()


def _context(claim: Claim, args: argparse.Namespace) -> Context:
    """Where the run writes (created): quick runs under results/benchmarks/quick/, real ones in docs/."""
    root = SCRATCH / "quick" if args.quick else SCRATCH
    docs = args.docs_dir or (root / "docs" if args.quick else DOCS_DIR)
    ctx = Context(claim=claim, scratch=root / claim.key, docs=docs,
                  quick=args.quick, reuse=getattr(args, "reuse", False))
    ctx.scratch.mkdir(parents=True, exist_ok=True)
    ctx.docs.mkdir(parents=True, exist_ok=True)
    return ctx


def _record(claim: Claim, outcome: Outcome, chosen: dict[str, Any], started: dt.datetime, wall_s: float,
            load_start: tuple[float, float, float]) -> dict[str, Any]:
    """The result file's content: the claim, the outcome, the command that ran it, when and where."""
    return {
        "number": claim.number, "key": claim.key, "title": claim.title, "goal": claim.goal,
        "measured": outcome.measured, "holds": outcome.holds,
        "command": _command(),
        "date": started.isoformat(timespec="seconds"), "wall_s": round(wall_s, 1),
        "machine": machine(), "load_start": [round(v, 2) for v in load_start],
        "load_end": [round(v, 2) for v in os.getloadavg()], "settings": plain(chosen),
        "figures": plain(outcome.figures), "details": outcome.details,
    }


def _command() -> str:
    """The command line that ran this script, with the environment settings that change its figures."""
    return " ".join([f"{k}={os.environ[k]}" for k in ENV_SETTINGS if k in os.environ]
                    + ["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def _rebuild_page(ctx: Context, outcome: Outcome, path: Path, args: argparse.Namespace) -> int:
    """docs/benchmarks.md rebuilt with the new result (the quick page under results/ for --quick); nothing
    with --docs-dir (the result is copied back by hand)."""
    from .report import build_report

    if args.docs_dir:
        print(f"{ctx.claim.title}: {outcome.measured} → holds: {outcome.holds}\nwrote {path}", flush=True)
        return 0
    out = build_report(ctx.docs, ctx.docs.parent / "benchmarks.md" if not args.quick else ctx.docs / "benchmarks.md")
    print(f"{ctx.claim.title}: {outcome.measured} → holds: {outcome.holds}"
          f"\nwrote {path.relative_to(REPO)} and {out.relative_to(REPO)}", flush=True)
    return 0


def plain(value: Any) -> Any:
    """JSON-able copy (numpy scalars, tuples, paths; NaN becomes None)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return os.path.relpath(value, REPO)
    return value


def md_image(png: Path, alt: str) -> str:
    """Markdown image of ``png`` for docs/benchmarks.md (the path relative to docs/)."""
    return f"![{alt}]({os.path.relpath(png, DOCS_DIR.parent)})"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def timestamp(epoch_s: float) -> str:
    """Local ISO time of an epoch timestamp, to the second."""
    return dt.datetime.fromtimestamp(epoch_s).astimezone().isoformat(timespec="seconds")


# ======================================================================== provenance
@dataclass(frozen=True)
class CodeState:
    """Which code would run a search now: the git commit, the paths of CODE_DIRS with uncommitted
    changes, and the sha256 of every file there (what decides; the commit is for people)."""

    commit: str | None
    uncommitted: tuple[str, ...]
    files: dict[str, str]
    versions: dict[str, str]


def code_state() -> CodeState:
    """The current :class:`CodeState` of the repository."""
    import ray

    files = {}
    for top in CODE_DIRS:
        for f in sorted((REPO / top).rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                files[f.relative_to(REPO).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    commit = _git("rev-parse", "HEAD")
    changed = [_git("diff", "--name-only", "HEAD", "--", *CODE_DIRS),
               _git("ls-files", "--others", "--exclude-standard", "--", *CODE_DIRS)]
    uncommitted = tuple(sorted({p for out in changed if out for p in out.splitlines()}))
    versions = {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                "numpy": np.__version__}
    return CodeState(commit=commit, uncommitted=uncommitted, files=files, versions=versions)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@dataclass(frozen=True)
class SearchRun:
    """One search of a benchmark: its experiment directory, the wall seconds of ``aebnas.search.tuner.run``
    (measured when it ran) and its provenance record; ``reused``: re-analysed, not run now."""

    path: Path
    wall_s: float
    provenance: dict[str, Any]
    reused: bool

    @property
    def niceness(self) -> str | None:
        """``RAY_worker_niceness`` when the search ran (None: Ray's default, 15)."""
        return self.provenance["env"].get("RAY_worker_niceness")


def run_search(ctx: Context, name: str, **settings: Any) -> SearchRun:
    """One search with ``aebnas.search.tuner.run`` into ``ctx.scratch/name`` (replaced if there), Ray
    already started; with ``ctx.reuse`` the one already there, if the current code ran it."""
    from aebnas.search.experiment import Experiment, experiment_path
    from aebnas.search.tuner import run

    exp = Experiment(storage_path=str(ctx.scratch), name=name, verbose=0, **settings)
    path = Path(experiment_path(exp))
    before = code_state()
    if ctx.reuse and path.is_dir():
        if (path / PROVENANCE_FILE).is_file():
            record = _reusable_record(path, settings, before)
            return SearchRun(path=path, wall_s=record["wall_s"], provenance=record, reused=True)
        # No record: the search never finished (killed with the benchmark), so it runs again from the start;
        # a benchmark killed half-way thus goes on with --reuse from its first unfinished search.
        print(f"  {name}: unfinished in an earlier run (no {PROVENANCE_FILE}); searching again", flush=True)
    shutil.rmtree(path, ignore_errors=True)
    start_ray()
    started = time.time()
    t0 = time.perf_counter()
    results = run(exp)
    wall = time.perf_counter() - t0
    if results.num_errors:
        raise RuntimeError(f"{results.num_errors} trial(s) of {name} errored; see {path}/trial_*/error.txt")
    after = code_state()
    if after.files != before.files:
        changed = _changed_files(before.files, after.files)
        raise RuntimeError(f"{', '.join(changed)} changed while search {name} ran: its trials did not all run "
                           "the same code; run the benchmark again")
    record = {"name": name, "settings": _settings_json(settings), "commit": before.commit,
              "uncommitted": list(before.uncommitted), "files": before.files, "versions": before.versions,
              "env": {k: os.environ.get(k) for k in ENV_SETTINGS}, "started": timestamp(started),
              "wall_s": wall}
    (path / PROVENANCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return SearchRun(path=path, wall_s=wall, provenance=record, reused=False)


def _settings_json(settings: dict[str, Any]) -> Any:
    return json.loads(json.dumps(plain(settings)))


def _changed_files(old: dict[str, str], new: dict[str, str]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _reusable_record(path: Path, settings: dict[str, Any], now: CodeState) -> dict[str, Any]:
    """The provenance record of the search in ``path``; SystemExit unless the current code, the same
    settings and the same library versions ran it (then its figures are what a new run would measure,
    up to training noise)."""
    where = os.path.relpath(path, REPO)
    file = path / PROVENANCE_FILE
    record = json.loads(file.read_text())
    problems = []
    if record.get("settings") != _settings_json(settings):
        problems.append(f"it ran with settings {record.get('settings')}, this run asks for "
                        f"{_settings_json(settings)}")
    changed = _changed_files(record.get("files", {}), now.files)
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        problems.append(f"{len(changed)} file(s) of {'/, '.join(CODE_DIRS)}/ differ from the code that ran it "
                        f"(commit {str(record.get('commit'))[:10]}, now {str(now.commit)[:10]}): {shown}")
    if record.get("versions") != now.versions:
        problems.append(f"it ran with {record.get('versions')}, now {now.versions}")
    if problems:
        raise SystemExit(f"--reuse refused for {where}: " + "; ".join(problems)
                         + ". Run without --reuse to search again with the current code.")
    return record


def provenance_note(runs: Sequence[SearchRun]) -> str:
    """A sentence on which code ran the searches, and, for reused ones, when they ran."""
    commits = sorted({str(r.provenance["commit"])[:10] for r in runs})
    dirty = sorted({p for r in runs for p in r.provenance["uncommitted"]})
    text = (f"The searches ran the code of commit {', '.join(commits)}"
            + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else
               f" ({' and '.join(f'{d}/' for d in CODE_DIRS)} as committed)") + ".")
    reused = [r for r in runs if r.reused]
    if reused:
        starts = sorted(r.provenance["started"] for r in reused)
        which = (f"{len(reused)} of the {len(runs)} searches {'was' if len(reused) == 1 else 'were'}"
                 if len(reused) < len(runs) else
                 "the searches were" if len(runs) > 1 else "the search was")
        when = f"started at {starts[0]}" if len(starts) == 1 else f"started from {starts[0]} to {starts[-1]}"
        text += (f" `--reuse`: {which} re-analysed, not run again ({when}); every file of "
                 f"{' and '.join(f'{d}/' for d in CODE_DIRS)}, the settings and the torch/ray/numpy versions are "
                 "the same now as when they ran (checked).")
    return text


def search_figures(runs: Iterable[SearchRun]) -> dict[str, dict[str, Any]]:
    """Per search: the code that ran it, when, its wall seconds, whether it was reused (for a result's JSON)."""
    return {r.provenance["name"]: {"commit": r.provenance["commit"], "uncommitted": r.provenance["uncommitted"],
                                   "started": r.provenance["started"], "wall_s": r.wall_s, "reused": r.reused,
                                   "env": r.provenance["env"]} for r in runs}


# ======================================================================== searches
def start_ray() -> None:
    """Local Ray on every core of the machine, quiet (no dashboard, no worker logs on the driver)."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def priority_note(runs: Sequence[SearchRun]) -> str:
    """How the searches' trials were prioritised (Ray starts workers at niceness 15 unless told otherwise)."""
    values = sorted({r.niceness or "15 (Ray's default)" for r in runs})
    if len(values) > 1:
        return f"Trials ran at different worker niceness from one search to another: {', '.join(values)}."
    nice = runs[0].niceness if runs else None
    if nice is None:
        return "Trials ran at Ray's default worker niceness 15."
    return (f"Trials ran at niceness {nice} (`RAY_worker_niceness={nice}` when the searches ran): at Ray's default "
            "15 the other jobs on this shared machine took most of the CPU (claim 3).")


def report_start(report: dict[str, Any]) -> float:
    """When the work of a result.json line began: its timestamp minus its duration (epoch seconds)."""
    return report["timestamp"] - report["time_this_iter_s"]


def search_window(path: Path) -> tuple[float, float]:
    """(first trial's start, last report) of an experiment, epoch seconds, from its result.json files."""
    starts, ends = [], []
    for f in path.glob("trial_*/result.json"):
        lines = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
        if lines:
            starts.append(report_start(lines[0]))
            ends.append(lines[-1]["timestamp"])
    return (min(starts), max(ends)) if ends else (float("nan"), float("nan"))


def load_trials(path: Path) -> pd.DataFrame:
    """One row per trial with results (``analysis.results``)."""
    from analysis.results import load_experiment, trials_with_results

    return trials_with_results(load_experiment(path).trials).copy()


def trial_config(trial: Any) -> tuple[Any, Any]:
    """(ArchConfig, TrialSettings) of a trial row, from the arch.json its trial wrote."""
    from aebnas.settings import ARCH_FILE, parse_trial_config

    return parse_trial_config(json.loads((Path(trial["trial_dir"]) / ARCH_FILE).read_text()))


def arch_summary(flat: dict[str, Any] | None) -> str:
    """One line on a candidate: resolution, width, exit positions, static MMACs."""
    if not flat:
        return "?"
    from aebnas.config import ArchConfig
    from aebnas.cost.macs import exit_costs

    arch = ArchConfig.from_flat(flat)
    return (f"resolution {arch.resolution}, width {arch.width_mult}, exits after stages {arch.exit_positions}, "
            f"{exit_costs(arch).static_cost:.2f} MMACs static")
