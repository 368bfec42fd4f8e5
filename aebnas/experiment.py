"""An experiment's settings → a Ray Tune ``Tuner``, run locally or on a cluster.

``Experiment`` holds plain values; ``run(experiment)`` validates them (before Ray
starts), loads the dataset once and ships it to every trial through the Ray object store
(``tune.with_parameters``), connects to a cluster or starts local Ray, and runs — or
resumes — the search. The settings are saved as ``aebnas_experiment.json`` in the
experiment directory, a local path or a storage URI alike (``write_experiment_settings`` /
``read_experiment_settings``, through ``pyarrow.fs`` as Ray Tune does); a resume is checked
against them. ``main(defaults)`` is the command line shared by ``tune_configs/`` and
``aebnas search``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .cluster import check_address_reachable, check_trial_fits, connect_ray, describe_resources, trial_resources
from .data import DatasetNotFoundError, load_dataset
from .latency import LatencyTable, covering_archs, read_table, space_pieces
from .moasha import MOASHA
from .errors import ExperimentError
from .settings import (EXPERIMENT_FILE, LATENCY_BACKENDS, TrialSettings, int_list,
                       parse_trial_config)
from .storage import is_empty, read_experiment_settings, resolve_storage_path, write_experiment_settings
from .supernet import SUPERNET_FILE, SupernetInfo, SupernetSettings, check_supernet, read_supernet_info
from .supernet_train import SupernetRequest, space_values_of, train_supernet
from .surrogate import SurrogateSearch, require_pymoo
from .train import load_checkpoint
from .trainable import train_candidate

SEARCH_ALGS = ("random", "tpe", "nsga2", "surrogate")
SCHEDULERS = ("asha", "moasha", "fifo")
COSTS = ("macs", "latency")
PROGRESS_METRICS = {"epoch": "epoch", "score": "score", "accuracy": "acc %", "avg_macs": "MMACs",
                    "num_exits": "exits", "test_accuracy": "test %"}
# What a resume may change: where the data and the results are, where to connect, and what
# each trial reserves (Ray Tune applies new resources to the trials it restarts).
RESUME_FREE = frozenset({"data_dir", "download", "storage_path", "name", "address", "resume", "cpus_per_trial",
                         "gpus_per_trial"})
# Ray Tune restores these from its snapshot and ignores new values: a change is reported, not refused.
RESUME_KEPT_BY_RAY = frozenset({"max_concurrent", "max_failures", "keep_checkpoints", "verbose", "time_budget_s"})


@dataclass(frozen=True)
class Experiment(TrialSettings):
    """Everything that defines a search. Units: MACs in millions (MMACs).

    The training and trial settings (epochs, lr, target_macs, seed, …) are inherited from
    :class:`aebnas.settings.TrialSettings`; the fields here are the search's own. Values are
    checked by :meth:`validate` (``run`` calls it), not on construction, so that a bad value
    is reported as an :class:`ExperimentError` naming it.
    """

    data_dir: str | None = None
    download: bool = False
    val_size: int | None = None
    split_seed: int | None = None  # seed of the train/validation split; None: ``seed``
    space: str = "aebnas"
    space_kwargs: dict[str, Any] = field(default_factory=dict)
    width_mult: float = 1.0
    num_samples: int = 20
    time_budget_s: float | None = None  # stop the search after this many seconds (None: when num_samples are done)
    search_alg: str = "random"
    surrogate_batch: int = 8  # search_alg="surrogate": candidates per iteration (the first 2× are random)
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2
    cpus_per_trial: float = 1
    gpus_per_trial: float | None = None  # None: 1 when the cluster has a GPU, else 0 (see trial_resources)
    max_concurrent: int | None = None
    storage_path: str = "aebnas_results"
    name: str | None = None
    address: str | None = None
    resume: bool = False
    max_failures: int = 2
    keep_checkpoints: int = 2
    verbose: int = 1
    supernet_epochs: int = 0  # > 0 and no supernet: train one first (or reuse it), see supernet_path()
    supernet_workers: int = 1
    cost: str = "macs"  # "latency": thresholds tuned for target_ms with C_i from latency_table
    latency_table: str | None = None  # `aebnas latency profile --out` file (cost="latency")

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold_grid", tuple(self.threshold_grid))

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ExperimentError naming the first bad setting."""
        from search_spaces import SPACES

        def bad(name: str, why: str) -> ExperimentError:
            return ExperimentError(f"{name}={getattr(self, name)!r} {why}")

        if self.space not in SPACES:
            raise bad("space", f"is not one of {tuple(SPACES)}")
        if self.search_alg not in SEARCH_ALGS:
            raise bad("search_alg", f"is not one of {SEARCH_ALGS}")
        if self.scheduler not in SCHEDULERS:
            raise bad("scheduler", f"is not one of {SCHEDULERS}")
        for name in ("num_samples", "grace_period", "batch_size", "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be an integer ≥ 1")
        if not isinstance(self.supernet_epochs, int) or self.supernet_epochs < 0:
            raise bad("supernet_epochs", "must be an integer ≥ 0 (0: no supernet is trained)")
        if not isinstance(self.supernet_workers, int) or self.supernet_workers < 0:
            raise bad("supernet_workers", "must be an integer ≥ 0 (0: trained in the driver's process)")
        if self.supernet is None and self.supernet_epochs and "://" in self.storage_path:
            raise bad("supernet_epochs", "trains a supernet under a local storage_path only; with a URI train one "
                      "with `aebnas supernet train` and pass --supernet")
        if not isinstance(self.epochs, int) or self.epochs < (0 if self.supernet_path() else 1):
            raise bad("epochs", "must be an integer ≥ 1 (≥ 0 with a supernet: 0 scores inherited weights only)")
        if not self.target_macs > 0:
            raise bad("target_macs", "must be > 0 (MMACs)")
        if not self.reduction_factor > 1:
            raise bad("reduction_factor", "must be > 1")
        if self.grace_period > max(self.epochs, 1):
            raise bad("grace_period", f"must be ≤ epochs ({self.epochs})")
        if self.supernet is not None:
            self.supernet_info()
        if not self.cpus_per_trial > 0:
            raise bad("cpus_per_trial", "must be > 0")
        if self.gpus_per_trial is not None and self.gpus_per_trial < 0:
            raise bad("gpus_per_trial", "must be ≥ 0 (or None: one GPU per trial when the cluster has GPUs)")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise bad("max_concurrent", "must be ≥ 1 (or None for no limit)")
        if self.max_failures < 0:
            raise bad("max_failures", "must be ≥ 0")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise bad("time_budget_s", "must be > 0 seconds (or None: no time limit)")
        if self.search_alg in ("tpe", "nsga2"):
            try:
                import optuna
            except ImportError:
                raise ExperimentError(
                    f"search_alg={self.search_alg!r} needs Optuna, which is not installed: "
                    "pip install 'aebnas[optuna]' (or pip install optuna)") from None
            from .optuna_search import check_optuna_version

            check_optuna_version(optuna.__version__)
        if self.search_alg == "surrogate":
            try:
                require_pymoo()
            except ImportError as exc:
                raise ExperimentError(str(exc)) from None
        if not isinstance(self.surrogate_batch, int) or self.surrogate_batch < 1:
            raise ExperimentError(f"surrogate_batch={self.surrogate_batch!r} must be an integer ≥ 1")
        self._check_cost()
        self.trial_settings()  # lr, confidence, grid, …
        self._check_a_candidate()

    def _check_cost(self) -> None:
        if self.cost not in COSTS:
            raise ExperimentError(f"cost={self.cost!r} is not one of {COSTS}")
        if self.cost == "macs":
            if self.target_ms is not None or self.latency_table is not None:
                raise ExperimentError("target_ms and latency_table are for cost='latency' (--cost latency)")
            return
        if self.latency_table is None or self.target_ms is None:
            raise ExperimentError("cost='latency' needs latency_table (a file of `aebnas latency profile`) and "
                                  "target_ms (--latency-table FILE --target-ms X)")
        if self.search_alg in ("surrogate", "nsga2") or self.scheduler == "moasha":
            raise ExperimentError(f"cost='latency' works with search_alg random or tpe and scheduler asha or fifo: "
                                  f"search_alg={self.search_alg!r} / scheduler={self.scheduler!r} optimise MACs")
        try:
            read_table(self.latency_table)
        except ValueError as exc:
            raise ExperimentError(f"latency_table: {exc}") from None

    def _check_a_candidate(self) -> None:
        """Parse one candidate of the space with the fixed settings (as a trial would), so that a
        value no trial can build, e.g. width_mult=0, is refused now instead of failing every trial."""
        from ray.tune.search.sample import Domain

        flat = {k: v.sample() if isinstance(v, Domain) else v for k, v in self.param_space().items()}
        try:
            parse_trial_config(flat)
        except ValueError as exc:
            raise ExperimentError(str(exc)) from None

    def supernet_path(self) -> str | None:
        """The supernet the candidates inherit from: ``supernet``; else, with ``supernet_epochs``, the one
        :func:`run` trains first (or reuses) under ``storage_path``; else None (from scratch)."""
        if self.supernet is not None or not self.supernet_epochs:
            return self.supernet
        data = Path(self.dataset).stem if self.dataset.endswith(".npz") else self.dataset
        res = "-".join(map(str, self.space_kwargs.get("resolutions", ()))) or "paper"
        name = (f"supernet_{data}_w{self.width_mult:g}_r{res}_split{self.data_split_seed}"
                f"_v{self.val_size if self.val_size is not None else 'default'}_{self.supernet_epochs}ep")
        return str(Path(resolve_storage_path(self.storage_path)) / name / SUPERNET_FILE)

    @property
    def data_split_seed(self) -> int:
        """The seed of the train/validation split: ``split_seed``, or ``seed`` when that is None."""
        return self.seed if self.split_seed is None else self.split_seed

    def supernet_info(self) -> SupernetInfo:
        """What the supernet file covers; ExperimentError if it is missing, not a supernet, or does not
        cover this search's space and width (its data is checked by :func:`run` once loaded)."""
        try:
            info = read_supernet_info(self.supernet)
        except (FileNotFoundError, ValueError) as exc:
            raise ExperimentError(f"supernet={self.supernet!r}: {exc}") from None
        try:
            check_supernet(info, needs=space_needs(self.param_space(info.num_classes, info.in_channels)),
                           width_mult=self.width_mult)
        except ValueError as exc:
            raise ExperimentError(f"supernet={self.supernet!r}: {exc}; train one for this space with "
                                  "aebnas supernet train") from None
        return info

    def trial_settings(self) -> TrialSettings:
        """The settings every trial receives; ExperimentError naming a bad one."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrialSettings)}
        try:
            return TrialSettings(**{**values, "supernet": self.supernet_path()})
        except ValueError as exc:
            raise ExperimentError(str(exc)) from None

    def param_space(self, num_classes: int = 10, in_channels: int = 3) -> dict[str, Any]:
        """The Tuner's param space: the search space's samplers plus the fixed settings."""
        from search_spaces import SPACES

        try:
            space = SPACES[self.space](**self.space_kwargs)
        except (TypeError, ValueError) as exc:
            raise ExperimentError(f"space_kwargs={self.space_kwargs!r} for space {self.space!r}: {exc}") from None
        settings = self.trial_settings().to_dict()
        return {**space, **settings, "width_mult": self.width_mult, "num_classes": num_classes,
                "in_channels": in_channels}

    def experiment_name(self) -> str:
        if self.name:
            return self.name
        data = Path(self.dataset).stem if self.dataset.endswith(".npz") else self.dataset
        return f"{self.space}_{data}_{time.strftime('%Y%m%d-%H%M%S')}"

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values (tuples become lists), as ``aebnas_experiment.json`` holds them."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, saved: dict[str, Any], base: Experiment | None = None) -> Experiment:
        """``base`` (default: the defaults) with the values of ``saved`` (a ``to_json`` dict); keys
        that are not settings (any more) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in saved.items() if k in names}
        if isinstance(values.get("space_kwargs"), dict):
            values["space_kwargs"] = {k: tuple(v) if isinstance(v, list) else v
                                      for k, v in values["space_kwargs"].items()}
        return dataclasses.replace(base or cls(), **values)


# Which SpaceValues set a flat key of a param space draws from.
def _value_set(key: str) -> str | None:
    if key == "resolution":
        return "resolutions"
    if key.startswith("stage"):
        return {"depth": "depths", "kernel": "kernels", "expansion": "expansions"}.get(key.rsplit("_", 1)[1])
    if key.startswith("exit") and "_m" in key:
        module, name = key.split("_")[1:]
        if name == "channels":
            return f"exit_{module}_channels"
        return {"kernel": "exit_kernels", "expansion": "exit_expansions", "pool": "exit_pools"}[name]
    return None


def space_needs(param_space: dict[str, Any]) -> dict[str, set]:
    """Every value a param space can give each ``SpaceValues`` set (exit positions included)."""
    from ray.tune.search.sample import Categorical

    needs: dict[str, set] = {}
    for key, domain in param_space.items():
        name = _value_set(key)
        if name is None:
            if key.startswith("exit") and key.endswith("_enabled"):
                needs.setdefault("exit_positions", set()).add(int(key[4:-len("_enabled")]))
            continue
        values = domain.categories if isinstance(domain, Categorical) else [domain]
        needs.setdefault(name, set()).update(values)
    return needs


def paper_experiment(dataset: str, *, target_macs: float, val_size: int) -> Experiment:
    """The paper's search settings for one dataset: its space (resolution 32–72), its searcher (surrogate-
    assisted NSGA-II, batches of 8), ASHA, and candidates that inherit their weights from a supernet and
    fine-tune 5 epochs (lr 0.01, as NSGANetV2 on CIFAR).

    Without ``--supernet`` the run first trains one for 60 epochs under its storage path (or reuses
    it there): the paper starts from Once-for-All ImageNet weights, which fit only its exact space.
    """
    return Experiment(dataset=dataset, val_size=val_size, space="aebnas", target_macs=target_macs, epochs=5,
                      num_samples=100, search_alg="surrogate", surrogate_batch=8, scheduler="asha", grace_period=1,
                      reduction_factor=2, supernet_epochs=60, finetune_lr=0.01)


# ------------------------------------------------------------------ Ray Tune
def resume_conflicts(saved: dict[str, Any], exp: Experiment) -> tuple[list[str], list[str]]:
    """How ``exp`` differs from the ``saved`` settings of the experiment it resumes, as
    ``"name=new (saved old)"`` items: (settings a resume must keep, settings Ray Tune keeps anyway).

    A setting missing from an older ``saved`` file counts as its default.
    """
    now, default = exp.to_json(), Experiment().to_json()
    refused, kept = [], []
    for name in now:
        old = saved.get(name, default[name])
        if name in RESUME_FREE or now[name] == old:
            continue
        (kept if name in RESUME_KEPT_BY_RAY else refused).append(f"{name}={now[name]!r} (saved {old!r})")
    return refused, kept


def check_resumable(exp: Experiment, path: str) -> None:
    """Refuse to resume ``path`` when it holds no experiment, or with settings that change what its
    trials train or how they are scored (data, split, seed, space, training, target, search …): the
    trials continue from checkpoints made with the saved ones."""
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
    from search_spaces.encoding import define_by_run

    from .optuna_search import optuna_search

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


def make_scheduler(exp: Experiment) -> Any:
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
        scheduler=make_scheduler(exp),
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


def experiment_path(exp: Experiment) -> str:
    """The experiment's directory: an absolute local path, or a URI (its ``?query`` kept at the end)."""
    root, query = resolve_storage_path(exp.storage_path), ""
    if "://" in root and "?" in root:
        root, query = root.split("?", 1)
        query = "?" + query
    return f"{root.rstrip('/')}/{exp.experiment_name()}{query}"


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
    if exp.resume and not exp.name:
        raise ExperimentError("resume=True needs the name of the experiment to continue (--name)")
    if not exp.name:
        exp = dataclasses.replace(exp, name=exp.experiment_name())
    path = experiment_path(exp)
    if exp.resume:
        check_resumable(exp, path)
    elif not is_empty(path):
        raise ExperimentError(f"an experiment already exists at {path}; pass --resume to continue it "
                              "or another --name to start a new one")

    try:
        data = load_dataset(exp.dataset, data_dir=exp.data_dir, download=exp.download,
                            val_size=exp.val_size, seed=exp.data_split_seed)
    except ValueError as exc:  # a malformed .npz, a bad val_size, an unknown dataset name
        raise ExperimentError(str(exc)) from None
    print(f"aebnas: {data.summary()}", flush=True)
    if exp.supernet is None and exp.supernet_epochs:
        exp = dataclasses.replace(exp, supernet=train_supernet_first(exp, data))
    supernet = None
    if exp.supernet is not None:
        supernet = load_checkpoint(exp.supernet)
        info = SupernetInfo.from_record(supernet, exp.supernet)
        try:
            check_supernet(info, needs=space_needs(exp.param_space(data.num_classes, data.in_channels)),
                           width_mult=exp.width_mult, data=data)
        except ValueError as exc:
            raise ExperimentError(f"supernet={exp.supernet!r}: {exc}") from None
        print(f"aebnas: candidates inherit their weights from {exp.supernet} ({info.describe()}) and fine-tune "
              f"{exp.epochs} epoch(s) at lr {exp.finetune_lr}", flush=True)
    latency = latency_table_for(exp, data)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table shows our chosen columns
    connect_ray(exp.address)
    import ray

    cluster = ray.cluster_resources()
    resources = trial_resources(exp, cluster)
    print(f"aebnas: {describe_resources(resources, cluster)}", flush=True)
    check_trial_fits(resources, cluster_may_grow=bool(address))
    if not exp.resume:
        write_experiment_settings(path, exp)  # as given: gpus_per_trial=None is resolved again on resume
    if exp.resume and not tune.Tuner.can_restore(path):
        raise ExperimentError(f"Ray Tune cannot restore {path}: the driver stopped before saving any state; "
                              "start it again without --resume")
    tuner = _build_tuner(exp, data, path, resources, supernet, latency)
    results = tuner.fit()
    _print_summary(exp, results, path)
    return results


def train_supernet_first(exp: Experiment, data: Any) -> str:
    """Train the supernet of ``exp`` (``supernet_epochs`` on Ray Train; a finished one is reused, a
    killed one resumed) and return the path of its file."""
    path = Path(exp.supernet_path())
    print(f"aebnas: no --supernet given: training one for this search ({exp.supernet_epochs} epochs) in "
          f"{path.parent}, or reusing it", flush=True)
    request = SupernetRequest(
        out=str(path.parent), dataset=exp.dataset, space_name=exp.space, data_dir=exp.data_dir, download=exp.download,
        val_size=exp.val_size, split_seed=exp.data_split_seed, space_kwargs=exp.space_kwargs,
        width_mult=exp.width_mult, workers=exp.supernet_workers, cpus_per_worker=exp.cpus_per_trial,
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


# ------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser, defaults: Experiment) -> None:
    """The flags of ``aebnas search`` and of every tune_config, defaulting to ``defaults``.

    A flag that is not given is absent from the parsed arguments (``argparse.SUPPRESS``), so that
    :func:`experiment_from_args` can tell it from one given with its default value.
    """
    d = defaults

    def a(flag: str, help: str, default: Any = None, **kw: Any) -> None:
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(flag, default=argparse.SUPPRESS, help=help + shown, **kw)

    a("--dataset", "cifar10, cifar100, svhn, cifar10-subset (embedded) or the path of an .npz file", d.dataset)
    a("--data-dir", "directory with the dataset in torchvision's layout", d.data_dir)
    a("--download", "download the dataset with torchvision if missing", d.download,
      action=argparse.BooleanOptionalAction)
    a("--val-size", "validation images taken from train", d.val_size, type=int)
    a("--space", "search space: aebnas, fixed_exits or static", d.space)
    a("--resolutions", "comma-separated input resolutions to search",
      ",".join(map(str, d.space_kwargs["resolutions"])) if "resolutions" in d.space_kwargs else None,
      type=int_list)
    a("--width-mult", "channel width multiplier", d.width_mult, type=float)
    a("--target-macs", "target average MMACs", d.target_macs, type=float)
    a("--cost", "what the thresholds are tuned for: macs (ptflops) or latency (measured: --latency-table, "
      "--target-ms)", d.cost, choices=COSTS)
    a("--latency-table", "cost latency: table of `aebnas latency profile` for this space, measured on the target "
      "device", d.latency_table)
    a("--latency-backend", "cost latency: the table's figures to use: onnxruntime or torch", d.latency_backend,
      choices=LATENCY_BACKENDS)
    a("--target-ms", "cost latency: target average latency per image in milliseconds", d.target_ms, type=float)
    a("--epochs", "training epochs per trial (with --supernet: fine-tuning epochs, 0 = inherited weights as "
      "they are)", d.epochs, type=int)
    a("--supernet", "supernet file (aebnas supernet train) the candidates inherit their weights from; "
      "'none': they train from scratch", d.supernet, type=_supernet_arg)
    a("--finetune-lr", "peak learning rate of fine-tuning inherited weights", d.finetune_lr, type=float)
    a("--supernet-epochs", "without --supernet: train a supernet for this many epochs first (reused when it is "
      "already in STORAGE_PATH); 0: candidates train from scratch", d.supernet_epochs, type=int)
    a("--supernet-workers", "Ray Train workers of that supernet (0: in the driver's process)", d.supernet_workers,
      type=int)
    a("--num-samples", "number of trials", d.num_samples, type=int)
    a("--time-budget", "stop the search after this many seconds, running trials included (their last report "
      "stays in the results)", d.time_budget_s, type=float, dest="time_budget_s")
    a("--search-alg", "how candidates are proposed: random, tpe / nsga2 (Optuna), surrogate (the paper's "
      "surrogate-assisted NSGA-II; pymoo)", d.search_alg, choices=SEARCH_ALGS)
    a("--surrogate-batch", "surrogate: candidates per iteration (the first iteration proposes twice as many)",
      d.surrogate_batch, type=int)
    a("--scheduler", "asha stops weak trials early on score; moasha on Pareto rank of (accuracy, MACs); fifo runs "
      "every trial to the end", d.scheduler,
      choices=SCHEDULERS)
    a("--grace-period", "ASHA: epochs before a trial can stop", d.grace_period, type=int)
    a("--reduction-factor", "ASHA: keep 1/factor per rung", d.reduction_factor, type=float)
    a("--cpus-per-trial", "CPUs each trial reserves (and torch threads in it)", d.cpus_per_trial, type=float)
    a("--gpus-per-trial", "GPUs each trial reserves; 0 trains on CPU (default: 1 when the cluster has a GPU, "
      "else 0)" if d.gpus_per_trial is None else "GPUs each trial reserves; 0 trains on CPU",
      d.gpus_per_trial, type=float)
    a("--amp", "mixed precision on CUDA (ignored on CPU)", d.amp, action=argparse.BooleanOptionalAction)
    a("--max-concurrent", "at most this many trials at once", d.max_concurrent, type=int)
    a("--batch-size", "training batch size", d.batch_size, type=int)
    a("--lr", "peak learning rate of the one-cycle schedule", d.lr, type=float)
    a("--storage-path", "where results go (a path or a URI such as s3://bucket/dir); shared by all nodes on "
      "a cluster", d.storage_path)
    a("--name", "experiment name (default: SPACE_DATASET_TIME)", d.name)
    a("--address", "Ray cluster address HOST:PORT (default: $RAY_ADDRESS or local)", d.address)
    a("--seed", "seed of the search, the trials and (unless --split-seed) the data split", d.seed, type=int)
    a("--split-seed", "seed of the train/validation split (default: --seed); a supernet fixes it", d.split_seed,
      type=int)
    a("--resume", "continue the experiment --name from where it stopped; flags not given take the "
      "values it was started with", action="store_true")


def _supernet_arg(text: str) -> str | None:
    return None if text.strip().lower() in ("", "none") else text


# Taken from the command line or the script's defaults on --resume, never from the saved experiment.
_NOT_FROM_SAVED = ("address", "resume", "name", "storage_path")


def experiment_from_args(args: argparse.Namespace, defaults: Experiment) -> Experiment:
    """The experiment the flags ask for: each flag not given takes its value from ``defaults`` or, with
    ``--resume``, from the saved experiment (so the same search continues without repeating its flags)."""
    fields = {f.name for f in dataclasses.fields(Experiment)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    exp = dataclasses.replace(defaults, **given)
    if exp.resume and exp.name:
        try:
            saved = read_experiment_settings(experiment_path(exp))
        except FileNotFoundError:
            return exp  # run() says there is nothing to resume
        base = Experiment.from_json({k: v for k, v in saved.items() if k not in _NOT_FROM_SAVED}, defaults)
        exp = dataclasses.replace(base, **given)
    if getattr(args, "resolutions", None):
        exp = dataclasses.replace(exp, space_kwargs={**exp.space_kwargs, "resolutions": tuple(args.resolutions)})
    return exp


def run_cli(exp: Experiment) -> int:
    """``run`` with bad input turned into one message and exit code 2."""
    try:
        results = run(exp)
    except (ExperimentError, DatasetNotFoundError) as exc:
        print(f"aebnas: error: {exc}", file=sys.stderr)
        return 2
    return 1 if len(results) and results.num_errors == len(results) else 0


def main(defaults: Experiment, argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """Command line of a tune_config: flags override ``defaults``; returns the exit code."""
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser, defaults)
    return run_cli(experiment_from_args(parser.parse_args(argv), defaults))
