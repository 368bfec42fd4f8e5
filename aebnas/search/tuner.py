"""Ray Tune's side of a search: an :class:`~aebnas.search.experiment.Experiment` → a ``Tuner``, run locally or
on a cluster.

``run(experiment)`` validates the settings (before Ray starts), loads the dataset once and
ships it to every trial through the Ray object store (``tune.with_parameters``), trains the
supernet first when asked, connects to a cluster or starts local Ray, and runs — or resumes —
the search. The settings are saved as ``aebnas_experiment.json`` in the experiment directory, a
local path or a storage URI alike (``write_experiment_settings`` / ``read_experiment_settings``,
through ``pyarrow.fs`` as Ray Tune does); a resume is checked against them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from search_spaces.encoding import define_by_run

from ..cluster import check_address_reachable, check_trial_fits, connect_ray, describe_resources, trial_resources
from ..data.datasets import load_dataset
from ..errors import ExperimentError
from .experiment import Experiment, experiment_path, fitted_to_data, space_needs, with_saved_fits
from ..cost.latency import LatencyTable, covering_archs, read_table, space_pieces
from .moasha import MOASHA
from ..settings import EXPERIMENT_FILE
from .storage import is_empty, read_experiment_settings, resolve_storage_path, write_experiment_settings
from ..training.supernet_file import SupernetInfo, SupernetSettings, check_supernet
from ..space_values import space_values_of
from ..training.supernet_job import SupernetRequest, train_supernet
from .surrogate import SurrogateSearch
from ..training.loop import load_checkpoint
from .trainable import train_candidate

PROGRESS_METRICS = {"epoch": "epoch", "score": "score", "accuracy": "acc %", "avg_macs": "MMACs",
                    "num_exits": "exits", "test_accuracy": "test %"}
# What a resume may change: where the data and the results are, where to connect, and what
# each trial reserves (Ray Tune applies new resources to the trials it restarts).
RESUME_FREE = frozenset({"data_dir", "download", "storage_path", "name", "address", "resume", "cpus_per_trial",
                         "gpus_per_trial"})
# Ray Tune restores these from its snapshot and ignores new values: a change is reported, not refused.
RESUME_KEPT_BY_RAY = frozenset({"max_concurrent", "max_failures", "keep_checkpoints", "verbose", "time_budget_s"})


def resume_conflicts(saved: dict[str, Any], exp: Experiment) -> tuple[list[str], list[str]]:
    """How ``exp`` differs from the ``saved`` settings of the experiment it resumes, as
    ``"name=new (saved old)"`` items: (settings a resume must keep, settings Ray Tune keeps anyway).

    A setting missing from an older ``saved`` file counts as its default; one ``exp`` leaves to be fitted
    to the data is the one fitted when the experiment started (:func:`with_saved_fits`).
    """
    now, default = with_saved_fits(exp, saved).to_json(), Experiment().to_json()
    refused, kept = [], []
    for name in now:
        old = saved.get(name, default[name])
        if name in RESUME_FREE or now[name] == old:
            continue
        (kept if name in RESUME_KEPT_BY_RAY else refused).append(f"{name}={now[name]!r} (saved {old!r})")
    return refused, kept


def check_resumable(exp: Experiment, path: str) -> Experiment:
    """Refuse to resume ``path`` when it holds no experiment, or with settings that change what its
    trials train or how they are scored (data, split, seed, space, training, target, search …): the
    trials continue from checkpoints made with the saved ones. Returns ``exp`` with the settings that
    were fitted to the data when it started (:func:`with_saved_fits`)."""
    try:
        saved = read_experiment_settings(path)
    except FileNotFoundError:
        raise ExperimentError(f"nothing to resume at {path} (no {EXPERIMENT_FILE}); "
                              "check --name and --storage-path") from None
    refused, kept = resume_conflicts(saved, exp)
    if refused:
        raise ExperimentError(f"--resume with settings that differ from the saved experiment: {', '.join(refused)}; "
                              "resume with the saved settings or start a new --name")
    if kept:
        print(f"aebnas: warning: --resume ignores {', '.join(kept)}: Ray Tune keeps the saved values",
              file=sys.stderr)
    return with_saved_fits(exp, saved)


def make_search_alg(exp: Experiment, param_space: dict[str, Any], path: str | None = None) -> Any:
    """The searcher of ``exp.search_alg``. All but ``random`` hold the space's choices themselves
    (the Tuner then gets the fixed values only: :func:`tuner_param_space`)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if exp.search_alg == "random":
        # A SearchGenerator ignores TuneConfig.max_concurrent_trials (Ray warns and drops it).
        return BasicVariantGenerator(random_state=exp.seed, max_concurrent=exp.max_concurrent or 0)
    if exp.search_alg == "surrogate":
        from ray.tune.search import ConcurrencyLimiter

        log_dir = path if path is not None and "://" not in path else None
        searcher = SurrogateSearch(param_space, target_macs=exp.target_macs, score_lambda=exp.score_lambda,
                                   batch_size=exp.surrogate_batch, initial=2 * exp.surrogate_batch, seed=exp.seed,
                                   log_dir=log_dir)
        # batch=True: an iteration starts once the previous batch is back, so it learns from all of it.
        return ConcurrencyLimiter(searcher, max_concurrent=exp.max_concurrent or exp.surrogate_batch, batch=True)
    from .optuna_search import optuna_search  # Optuna is optional: loaded for tpe / nsga2 only

    # Define-by-run: Optuna sees only the choices a candidate uses (no blocks beyond its depth, no
    # modules of a missing exit), so TPE and NSGA-II do not learn from values that change nothing.
    return optuna_search(exp.search_alg, define_by_run(param_space), exp.seed)


def tuner_param_space(exp: Experiment, param_space: dict[str, Any]) -> dict[str, Any]:
    """What the Tuner gets: the whole space for random search, else only its fixed values (the
    searcher proposes the choices; Ray Tune refuses samplers it would have to fill itself)."""
    from ray.tune.search.sample import Domain

    if exp.search_alg == "random":
        return param_space
    return {k: v for k, v in param_space.items() if not isinstance(v, Domain)}


def make_trial_scheduler(exp: Experiment) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if exp.scheduler == "fifo":
        return FIFOScheduler()
    if exp.scheduler == "moasha":
        return MOASHA(time_attr="training_iteration", max_t=max(exp.epochs, 1), grace_period=exp.grace_period,
                      reduction_factor=exp.reduction_factor)
    # Multi-objective search: TuneConfig gets no metric, so ASHA needs its own.
    own_metric = {"metric": "score", "mode": "max"} if exp.search_alg == "nsga2" else {}
    return ASHAScheduler(time_attr="training_iteration", max_t=max(exp.epochs, 1), grace_period=exp.grace_period,
                         reduction_factor=exp.reduction_factor, **own_metric)


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def latency_table_for(exp: Experiment, data: Any) -> dict[str, Any] | None:
    """The latency table of a ``cost='latency'`` search (None otherwise), checked against the data and
    the space: every piece a candidate can have must be in it, or the search is refused now."""
    if exp.cost != "latency":
        return None
    try:
        table = read_table(exp.latency_table)
        lat = LatencyTable(table, exp.latency_backend)
    except ValueError as exc:
        raise ExperimentError(f"latency_table: {exc}") from None
    settings = table["settings"]
    mine = (exp.width_mult, data.num_classes, data.in_channels)
    theirs = (settings["width_mult"], settings["num_classes"], settings["in_channels"])
    if mine != theirs:
        raise ExperimentError(f"latency_table {exp.latency_table} was profiled for width {theirs[0]}, {theirs[1]} "
                              f"classes, {theirs[2]} channels; this search has width {mine[0]}, {mine[1]} classes, "
                              f"{mine[2]} channels")
    space = space_values_of(exp.space_kwargs)
    needed = space_pieces(covering_archs(space, width_mult=exp.width_mult, num_classes=data.num_classes,
                                         in_channels=data.in_channels))
    missing = [pid for pid in needed if pid not in lat.ms]
    if missing:
        raise ExperimentError(f"latency_table {exp.latency_table} lacks {len(missing)} of the {len(needed)} pieces "
                              f"this space can build (e.g. {missing[0]}): profile the search's space, e.g. "
                              f"`aebnas latency profile --resolutions "
                              f"{','.join(map(str, space.resolutions))} "
                              f"--width-mult {exp.width_mult:g} --num-classes {data.num_classes} --out FILE`")
    print(f"aebnas: cost is latency: thresholds tuned for {exp.target_ms} ms on average, C_i from {lat.describe()}",
          flush=True)
    return table


def _build_tuner(exp: Experiment, data: Any, path: str, resources: dict[str, float],
                 supernet: dict[str, Any] | None = None, latency: dict[str, Any] | None = None) -> Any:
    from ray import tune

    # with_parameters puts data, supernet and latency table in the object store once: each node fetches them once.
    inherit = {} if supernet is None else {"supernet": supernet}
    if latency is not None:
        inherit["latency"] = latency
    trainable = tune.with_resources(tune.with_parameters(train_candidate, data=data, **inherit), resources)
    param_space = exp.param_space(data.num_classes, data.in_channels)
    if exp.resume:  # run() has checked that Ray Tune can restore it
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=tuner_param_space(exp, param_space))
    multi_objective = exp.search_alg == "nsga2"
    tune_config = tune.TuneConfig(
        metric=None if multi_objective else "score", mode=None if multi_objective else "max",
        num_samples=exp.num_samples, time_budget_s=exp.time_budget_s,
        search_alg=make_search_alg(exp, param_space, path),
        scheduler=make_trial_scheduler(exp),
        max_concurrent_trials=None if exp.search_alg in ("random", "surrogate") else exp.max_concurrent,
        reuse_actors=True,
        trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname)
    from ray.tune import CLIReporter

    columns = PROGRESS_METRICS if exp.cost == "macs" else {**PROGRESS_METRICS, "avg_ms": "ms"}
    reporter = CLIReporter(metric_columns=columns, parameter_columns=["resolution"],
                           max_report_frequency=30, sort_by_metric=not multi_objective)
    run_config = tune.RunConfig(
        name=exp.name, storage_path=resolve_storage_path(exp.storage_path),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=exp.keep_checkpoints),
        failure_config=tune.FailureConfig(max_failures=exp.max_failures),
        # arch.json / exit_outputs.npz are written in the trial's local working directory;
        # without this Ray leaves them there (not in storage_path) once actors are reused.
        sync_config=tune.SyncConfig(sync_artifacts=True),
        progress_reporter=reporter, verbose=exp.verbose)
    return tune.Tuner(trainable, param_space=tuner_param_space(exp, param_space), tune_config=tune_config,
                      run_config=run_config)


def run(exp: Experiment) -> Any:
    """Validate, load the data, connect Ray and run (or resume) the search; returns the ResultGrid.

    Raises ExperimentError (or the dataset's DatasetNotFoundError) before any trial starts
    when a setting or the data is wrong.
    """
    from ray import tune

    exp.validate()
    address = exp.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address_reachable(address)  # fail fast: before the dataset is loaded (or downloaded)
    exp, path = _named_experiment(exp)
    data = _load_data(exp)
    exp = fitted_to_data(exp, data)
    exp, supernet = _supernet_record(exp, data)
    latency = latency_table_for(exp, data)
    resources = _connect_and_reserve(exp, address)
    if not exp.resume:
        write_experiment_settings(path, exp)  # as given: gpus_per_trial=None is resolved again on resume
    if exp.resume and not tune.Tuner.can_restore(path):
        raise ExperimentError(f"Ray Tune cannot restore {path}: the driver stopped before saving any state; "
                              "start it again without --resume")
    tuner = _build_tuner(exp, data, path, resources, supernet, latency)
    results = tuner.fit()
    _print_summary(exp, results, path)
    return results


def _named_experiment(exp: Experiment) -> tuple[Experiment, str]:
    """``exp`` with its name (a new search without one gets one) and its directory, checked: a resume
    needs the saved experiment and its settings, a new search a directory that holds none."""
    if exp.resume and not exp.name:
        raise ExperimentError("resume=True needs the name of the experiment to continue (--name)")
    if not exp.name:
        exp = dataclasses.replace(exp, name=exp.experiment_name())
    path = experiment_path(exp)
    if exp.resume:
        exp = check_resumable(exp, path)
    elif not is_empty(path):
        raise ExperimentError(f"an experiment already exists at {path}; pass --resume to continue it "
                              "or another --name to start a new one")
    return exp, path


def _load_data(exp: Experiment) -> Any:
    """The search's dataset, loaded once in the driver (trials get it through the object store)."""
    try:
        data = load_dataset(exp.dataset, data_dir=exp.data_dir, download=exp.download, val_size=exp.val_size,
                            seed=exp.data_split_seed, image_size=exp.image_size, test_size=exp.test_size)
    except ValueError as exc:  # a malformed .npz, a bad val_size, an unknown dataset name
        raise ExperimentError(str(exc)) from None
    print(f"aebnas: {data.summary()}", flush=True)
    return data


def _supernet_record(exp: Experiment, data: Any) -> tuple[Experiment, dict[str, Any] | None]:
    """The record of the supernet the candidates inherit from, checked against the space and the data
    (None: they train from scratch); with ``supernet_epochs`` and no ``supernet`` it is trained first
    (or reused) and the returned ``exp`` names its file."""
    if exp.supernet is None and exp.supernet_epochs:
        exp = dataclasses.replace(exp, supernet=train_supernet_first(exp, data))
    if exp.supernet is None:
        return exp, None
    supernet = load_checkpoint(exp.supernet)
    info = SupernetInfo.from_record(supernet, exp.supernet)
    try:
        check_supernet(info, needs=space_needs(exp.param_space(data.num_classes, data.in_channels)),
                       width_mult=exp.width_mult, data=data)
    except ValueError as exc:
        raise ExperimentError(f"supernet={exp.supernet!r}: {exc}") from None
    print(f"aebnas: candidates inherit their weights from {exp.supernet} ({info.describe()}) and fine-tune "
          f"{exp.epochs} epoch(s) at lr {exp.finetune_lr}", flush=True)
    return exp, supernet


def _connect_and_reserve(exp: Experiment, address: str | None) -> dict[str, float]:
    """Connect to the cluster (or start local Ray); what each trial reserves, checked to fit on it."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table shows our chosen columns
    connect_ray(exp.address)
    import ray

    cluster = ray.cluster_resources()
    resources = trial_resources(exp, cluster)
    print(f"aebnas: {describe_resources(resources, cluster)}", flush=True)
    check_trial_fits(resources, cluster_may_grow=bool(address))
    return resources


def train_supernet_first(exp: Experiment, data: Any) -> str:
    """Train the supernet of ``exp`` (``supernet_epochs`` on Ray Train; a finished one is reused, a
    killed one resumed) and return the path of its file."""
    path = Path(exp.supernet_path())
    print(f"aebnas: no --supernet given: training one for this search ({exp.supernet_epochs} epochs) in "
          f"{path.parent}, or reusing it", flush=True)
    request = SupernetRequest(
        out=str(path.parent), dataset=exp.dataset, space_name=exp.space, data_dir=exp.data_dir, download=exp.download,
        val_size=exp.val_size, image_size=exp.image_size, test_size=exp.test_size,
        split_seed=exp.data_split_seed, space_kwargs=exp.space_kwargs,
        width_mult=exp.width_mult, workers=exp.supernet_workers, cpus_per_worker=None,
        use_gpu=None if exp.gpus_per_trial is None else exp.gpus_per_trial > 0, address=exp.address,
        settings=SupernetSettings(epochs=exp.supernet_epochs, batch_size=exp.batch_size, amp=exp.amp, seed=exp.seed))
    return str(train_supernet(request, data))


def _print_summary(exp: Experiment, results: Any, path: str) -> None:
    n_err = results.num_errors
    print(f"\naebnas: {len(results)} trials, {n_err} errored; results in {path}")
    try:
        best = results.get_best_result(metric="score", mode="max", scope="last")
        m = best.metrics
        at = (f"{m['avg_macs']:.3f} MMACs (target {exp.target_macs})" if exp.cost == "macs" else
              f"{m['avg_ms']:.3f} ms (target {exp.target_ms} ms), {m['avg_macs']:.3f} MMACs")
        print(f"best trial {best.path.rsplit('/', 1)[-1]}: score {m['score']:.2f}, val accuracy "
              f"{m['accuracy']:.2f}% at {at}"
              + (f", test accuracy {m['test_accuracy']:.2f}%" if "test_accuracy" in m else "")
              + (f", {100 * m['test_early_exit']:.0f}% of test images leave early" if "test_early_exit" in m else ""))
    except (RuntimeError, KeyError, ValueError):
        print("no trial reported a score")
    if n_err:
        print(f"{n_err} trial(s) errored; see error.txt in their trial directories", file=sys.stderr)
    out = f"{path}/analysis" if "://" not in path else f"{exp.name}_analysis"
    print(f"analyse it with:\n  python -m analysis {path} --out {out}")
