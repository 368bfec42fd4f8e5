"""An experiment's settings → a Ray Tune ``Tuner``, run locally or on a cluster.

``Experiment`` holds plain values; ``run(experiment)`` validates them (before Ray
starts), loads the dataset once and ships it to every trial through the Ray object store
(``tune.with_parameters``), connects to a cluster or starts local Ray, and runs — or
resumes — the search. ``main(defaults)`` is the command line shared by ``tune_configs/``
and ``aebnas search``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .settings import TrialSettings
from .trainable import train_candidate

SEARCH_ALGS = ("random", "tpe", "nsga2")
SCHEDULERS = ("asha", "fifo")
EXPERIMENT_FILE = "aebnas_experiment.json"
PROGRESS_METRICS = {"epoch": "epoch", "score": "score", "accuracy": "acc %", "avg_macs": "MMACs",
                    "num_exits": "exits", "test_accuracy": "test %"}


class ExperimentError(ValueError):
    """A setting of the experiment is wrong; raised before any trial starts."""


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
    space: str = "aebnas"
    space_kwargs: dict[str, Any] = field(default_factory=dict)
    width_mult: float = 1.0
    num_samples: int = 20
    search_alg: str = "random"
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    max_concurrent: int | None = None
    storage_path: str = "aebnas_results"
    name: str | None = None
    address: str | None = None
    resume: bool = False
    max_failures: int = 2
    keep_checkpoints: int = 2
    verbose: int = 1

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
        for name in ("epochs", "num_samples", "grace_period", "batch_size", "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be an integer ≥ 1")
        if not self.target_macs > 0:
            raise bad("target_macs", "must be > 0 (MMACs)")
        if not self.reduction_factor > 1:
            raise bad("reduction_factor", "must be > 1")
        if self.grace_period > self.epochs:
            raise bad("grace_period", f"must be ≤ epochs ({self.epochs})")
        if not self.cpus_per_trial > 0:
            raise bad("cpus_per_trial", "must be > 0")
        if self.gpus_per_trial < 0:
            raise bad("gpus_per_trial", "must be ≥ 0")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise bad("max_concurrent", "must be ≥ 1 (or None for no limit)")
        if self.max_failures < 0:
            raise bad("max_failures", "must be ≥ 0")
        if self.search_alg in ("tpe", "nsga2"):
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise ExperimentError(
                    f"search_alg={self.search_alg!r} needs Optuna, which is not installed: "
                    "pip install 'aebnas[optuna]' (or pip install optuna)") from None
        self.trial_settings()  # lr, confidence, grid, …
        self._check_a_candidate()

    def _check_a_candidate(self) -> None:
        """Parse one candidate of the space with the fixed settings (as a trial would), so that a
        value no trial can build, e.g. width_mult=0, is refused now instead of failing every trial."""
        from ray.tune.search.sample import Domain

        from .trainable import parse_trial_config

        flat = {k: v.sample() if isinstance(v, Domain) else v for k, v in self.param_space().items()}
        try:
            parse_trial_config(flat)
        except ValueError as exc:
            raise ExperimentError(str(exc)) from None

    def trial_settings(self) -> TrialSettings:
        """The settings every trial receives; ExperimentError naming a bad one."""
        try:
            return super().trial_settings()
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
        d = dataclasses.asdict(self)
        d["threshold_grid"] = list(self.threshold_grid)
        return d


def paper_experiment(dataset: str, *, target_macs: float, val_size: int) -> Experiment:
    """The paper's search settings for one dataset: its space (resolution 32–72), 5 epochs, ASHA."""
    return Experiment(dataset=dataset, val_size=val_size, space="aebnas", target_macs=target_macs, epochs=5,
                      num_samples=100, scheduler="asha", grace_period=1, reduction_factor=2)


# ------------------------------------------------------------------ Ray plumbing
def resolve_storage_path(storage_path: str) -> str:
    """Absolute local path (Ray needs one) or the URI unchanged (s3://, gs://, …)."""
    if "://" in storage_path:
        return storage_path
    return str(Path(storage_path).expanduser().resolve())


def check_address_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when a Ray head is not listening at ``address``."""
    if address == "auto":
        return  # Ray looks up the local head itself
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ExperimentError(f"address={address!r} is not HOST:PORT (e.g. 127.0.0.1:6379 or ray://HOST:10001)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ExperimentError(
            f"no Ray cluster answers at address={address!r} ({exc}); start one with "
            f"`ray start --head --port={port}` on that machine, or leave --address unset to run locally") from None


def connect_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start local Ray."""
    import ray

    if ray.is_initialized():
        return
    from ray.exceptions import AuthenticationError

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address_reachable(address)
        try:
            ray.init(address=address)
        except (ConnectionError, AuthenticationError) as exc:
            raise _join_error(address, exc) from None
    else:
        ray.init()


def _join_error(address: str, exc: Exception) -> ExperimentError:
    from ray.exceptions import AuthenticationError

    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    # ray.init wraps the GCS's refusal in a RuntimeError that quotes it as text.
    if any(isinstance(e, AuthenticationError) or "AuthenticationError" in str(e) for e in chain):
        # Ray sends this machine's token to an address given explicitly only when told to.
        return ExperimentError(
            f"the Ray cluster at address={address!r} did not accept this driver: it uses token "
            "authentication; set RAY_AUTH_MODE=token and give this machine the cluster's token "
            "(RAY_AUTH_TOKEN, or the file ~/.ray/auth_token or RAY_AUTH_TOKEN_PATH); see docs/cluster.md")
    return ExperimentError(f"could not join the Ray cluster at address={address!r}: {exc}")


def check_trial_fits(exp: Experiment, cluster_may_grow: bool) -> None:
    """Refuse per-trial resources that no node of the connected Ray cluster has.

    Ray Tune would wait for them forever. A cluster joined by address may be autoscaling,
    so there this only warns.
    """
    import ray

    need = {"CPU": exp.cpus_per_trial, "GPU": exp.gpus_per_trial}
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
        return
    have = ", ".join(sorted({f"{node.get('CPU', 0):g} CPUs + {node.get('GPU', 0):g} GPUs" for node in nodes}))
    message = (f"cpus_per_trial={exp.cpus_per_trial:g} and gpus_per_trial={exp.gpus_per_trial:g}, but no Ray node "
               f"has that much (nodes: {have})")
    if not cluster_may_grow:
        raise ExperimentError(f"{message}; no trial could ever start: lower --cpus-per-trial / --gpus-per-trial")
    print(f"aebnas: warning: {message}; trials wait until the cluster adds such a node", file=sys.stderr)


def make_search_alg(exp: Experiment) -> Any:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if exp.search_alg == "random":
        # A SearchGenerator ignores TuneConfig.max_concurrent_trials (Ray warns and drops it).
        return BasicVariantGenerator(random_state=exp.seed, max_concurrent=exp.max_concurrent or 0)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if exp.search_alg == "tpe":
        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=exp.seed))
    # NSGA-II optimises accuracy and average MACs together (the paper's two objectives).
    return OptunaSearch(metric=["accuracy", "avg_macs"], mode=["max", "min"],
                        sampler=optuna.samplers.NSGAIISampler(seed=exp.seed))


def make_scheduler(exp: Experiment) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if exp.scheduler == "fifo":
        return FIFOScheduler()
    # Multi-objective search: TuneConfig gets no metric, so ASHA needs its own.
    own_metric = {"metric": "score", "mode": "max"} if exp.search_alg == "nsga2" else {}
    return ASHAScheduler(time_attr="training_iteration", max_t=exp.epochs, grace_period=exp.grace_period,
                         reduction_factor=exp.reduction_factor, **own_metric)


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _build_tuner(exp: Experiment, data: Any, path: str) -> Any:
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(train_candidate, data=data),
                                    {"cpu": exp.cpus_per_trial, "gpu": exp.gpus_per_trial})
    if exp.resume:  # run() has checked that Ray Tune can restore it
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=exp.param_space(data.num_classes, data.in_channels))
    multi_objective = exp.search_alg == "nsga2"
    tune_config = tune.TuneConfig(
        metric=None if multi_objective else "score", mode=None if multi_objective else "max",
        num_samples=exp.num_samples, search_alg=make_search_alg(exp), scheduler=make_scheduler(exp),
        max_concurrent_trials=None if exp.search_alg == "random" else exp.max_concurrent, reuse_actors=True,
        trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname)
    from ray.tune import CLIReporter

    reporter = CLIReporter(metric_columns=PROGRESS_METRICS, parameter_columns=["resolution"],
                           max_report_frequency=30, sort_by_metric=not multi_objective)
    run_config = tune.RunConfig(
        name=exp.name, storage_path=resolve_storage_path(exp.storage_path),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=exp.keep_checkpoints),
        failure_config=tune.FailureConfig(max_failures=exp.max_failures),
        # arch.json / exit_outputs.npz are written in the trial's local working directory;
        # without this Ray leaves them there (not in storage_path) once actors are reused.
        sync_config=tune.SyncConfig(sync_artifacts=True),
        progress_reporter=reporter, verbose=exp.verbose)
    return tune.Tuner(trainable, param_space=exp.param_space(data.num_classes, data.in_channels),
                      tune_config=tune_config, run_config=run_config)


def experiment_path(exp: Experiment) -> str:
    root = resolve_storage_path(exp.storage_path)
    return f"{root.rstrip('/')}/{exp.experiment_name()}"


def run(exp: Experiment) -> Any:
    """Validate, load the data, connect Ray and run (or resume) the search; returns the ResultGrid.

    Raises ExperimentError (or the dataset's DatasetNotFoundError) before any trial starts
    when a setting or the data is wrong.
    """
    from ray import tune

    from .data import load_dataset

    exp.validate()
    address = exp.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address_reachable(address)  # fail fast: before the dataset is loaded (or downloaded)
    if exp.resume and not exp.name:
        raise ExperimentError("resume=True needs the name of the experiment to continue (--name)")
    if not exp.name:
        exp = dataclasses.replace(exp, name=exp.experiment_name())
    path = experiment_path(exp)
    local = "://" not in path
    if exp.resume:
        saved = Path(path) / EXPERIMENT_FILE
        if local and not saved.exists():
            raise ExperimentError(f"nothing to resume at {path} (no {EXPERIMENT_FILE}); check --name and --storage-path")
    elif local and Path(path).exists() and any(Path(path).iterdir()):
        raise ExperimentError(f"an experiment already exists at {path}; pass --resume to continue it "
                              "or another --name to start a new one")

    try:
        data = load_dataset(exp.dataset, data_dir=exp.data_dir, download=exp.download,
                            val_size=exp.val_size, seed=exp.seed)
    except ValueError as exc:  # a malformed .npz, a bad val_size, an unknown dataset name
        raise ExperimentError(str(exc)) from None
    print(f"aebnas: {data.summary()}", flush=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table shows our chosen columns
    connect_ray(exp.address)
    check_trial_fits(exp, cluster_may_grow=bool(address))
    if local:
        Path(path).mkdir(parents=True, exist_ok=True)
        if not exp.resume:
            (Path(path) / EXPERIMENT_FILE).write_text(json.dumps(exp.to_json(), indent=1))
    if exp.resume and not tune.Tuner.can_restore(path):
        raise ExperimentError(f"Ray Tune cannot restore {path}: the driver stopped before saving any state; "
                              "start it again without --resume")
    tuner = _build_tuner(exp, data, path)
    results = tuner.fit()
    _print_summary(exp, results, path)
    return results


def _print_summary(exp: Experiment, results: Any, path: str) -> None:
    n_err = results.num_errors
    print(f"\naebnas: {len(results)} trials, {n_err} errored; results in {path}")
    try:
        best = results.get_best_result(metric="score", mode="max", scope="last")
        m = best.metrics
        print(f"best trial {best.path.rsplit('/', 1)[-1]}: score {m['score']:.2f}, val accuracy "
              f"{m['accuracy']:.2f}% at {m['avg_macs']:.3f} MMACs (target {exp.target_macs})"
              + (f", test accuracy {m['test_accuracy']:.2f}%" if "test_accuracy" in m else ""))
    except (RuntimeError, KeyError, ValueError):
        print("no trial reported a score")
    if n_err:
        print(f"{n_err} trial(s) errored; see error.txt in their trial directories", file=sys.stderr)
    print(f"analyse it with:\n  python -m analysis {path} --target-macs {exp.target_macs} --out {path}/analysis")


# ------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser, defaults: Experiment) -> None:
    """The flags of ``aebnas search`` and of every tune_config, defaulting to ``defaults``."""
    d = defaults
    a = parser.add_argument
    a("--dataset", default=d.dataset,
      help="cifar10, cifar100, svhn, cifar10-subset (embedded) or the path of an .npz file (default: %(default)s)")
    a("--data-dir", default=d.data_dir, help="directory with the dataset in torchvision's layout")
    a("--download", action=argparse.BooleanOptionalAction, default=d.download,
      help="download the dataset with torchvision if missing")
    a("--val-size", type=int, default=d.val_size, help="validation images taken from train")
    a("--space", default=d.space, help="search space: aebnas, fixed_exits or static (default: %(default)s)")
    a("--resolutions", type=_int_list, default=None, help="comma-separated input resolutions to search")
    a("--width-mult", type=float, default=d.width_mult, help="channel width multiplier (default: %(default)s)")
    a("--target-macs", type=float, default=d.target_macs, help="target average MMACs (default: %(default)s)")
    a("--epochs", type=int, default=d.epochs, help="training epochs per trial (default: %(default)s)")
    a("--num-samples", type=int, default=d.num_samples, help="number of trials (default: %(default)s)")
    a("--search-alg", default=d.search_alg, choices=SEARCH_ALGS, help="default: %(default)s")
    a("--scheduler", default=d.scheduler, choices=SCHEDULERS, help="default: %(default)s")
    a("--grace-period", type=int, default=d.grace_period, help="ASHA: epochs before a trial can stop")
    a("--reduction-factor", type=float, default=d.reduction_factor, help="ASHA: keep 1/factor per rung")
    a("--cpus-per-trial", type=float, default=d.cpus_per_trial, help="default: %(default)s")
    a("--gpus-per-trial", type=float, default=d.gpus_per_trial, help="default: %(default)s")
    a("--max-concurrent", type=int, default=d.max_concurrent, help="at most this many trials at once")
    a("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    a("--lr", type=float, default=d.lr, help="peak learning rate of the one-cycle schedule")
    a("--storage-path", default=d.storage_path, help="where results go; shared by all nodes on a cluster")
    a("--name", default=d.name, help="experiment name (default: SPACE_DATASET_TIME)")
    a("--address", default=d.address, help="Ray cluster address HOST:PORT (default: $RAY_ADDRESS or local)")
    a("--seed", type=int, default=d.seed, help="default: %(default)s")
    a("--resume", action="store_true", help="continue the experiment --name from where it stopped")


def experiment_from_args(args: argparse.Namespace, defaults: Experiment) -> Experiment:
    space_kwargs = dict(defaults.space_kwargs)
    if args.resolutions:
        space_kwargs["resolutions"] = tuple(args.resolutions)
    fields = {f.name for f in dataclasses.fields(Experiment)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return dataclasses.replace(defaults, space_kwargs=space_kwargs, **values)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def run_cli(exp: Experiment) -> int:
    """``run`` with bad input turned into one message and exit code 2."""
    from .data import DatasetNotFoundError

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


def _cmd_search(args: argparse.Namespace) -> int:
    return run_cli(experiment_from_args(args, Experiment()))


CLI_COMMANDS = {"search": ("run a search (same flags as tune_configs/*.py)",
                           lambda p: add_arguments(p, Experiment()), _cmd_search)}
