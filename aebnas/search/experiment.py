"""An experiment's settings and their checks: what a search is, before anything runs.

``Experiment`` holds plain values; each setting is declared once, with its default, its
command-line help (``setting(…)``: :mod:`aebnas.search.flags` makes the flags from these
declarations) and, in :meth:`Experiment.validate`, its check, which names a bad value before
Ray starts. ``paper_experiment`` gives the paper's settings for a dataset. Running one, Ray
Tune's side, is :mod:`aebnas.search.tuner`; the command line is :mod:`aebnas.search.flags`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search_spaces import SPACES

from ..config import value_set_of
from ..data.datasets import Dataset, dataset_label, is_own_dataset
from ..data.fit import DEFAULT_BATCH_SIZE, MIN_STEPS, fitted_batch_size, fitted_resolutions
from ..data.folder import DEFAULT_TEST_SIZE
from ..progress import Log, print_line
from ..errors import ExperimentError
from ..cost.latency import read_table
from ..settings import SUPERNET_FILE, TrialSettings, parse_trial_config, setting, supernet_file
from .storage import resolve_storage_path
from ..training.supernet_file import SupernetInfo, check_supernet, read_supernet_info
from .surrogate import require_pymoo

SEARCH_ALGS = ("random", "tpe", "nsga2", "surrogate")
SCHEDULERS = ("asha", "moasha", "fifo")
COSTS = ("macs", "latency")


@dataclass(frozen=True)
class Experiment(TrialSettings):
    """Everything that defines a search. Units: MACs in millions (MMACs).

    The training and trial settings (epochs, lr, target_macs, seed, …) are inherited from
    :class:`aebnas.settings.TrialSettings`; the fields here are the search's own. Values are
    checked by :meth:`validate` (``run`` calls it), not on construction, so that a bad value
    is reported as an :class:`ExperimentError` naming it.
    """

    data_dir: str | None = setting(None, "directory with the dataset in torchvision's layout")
    download: bool = setting(False, "download the dataset with torchvision if missing")
    val_size: int | None = setting(None, "validation images taken from train")
    # a folder of images (DIR/<class>/): its test split and the size its images are stored at
    test_size: float | None = setting(None, "a folder without DIR/test/: the fraction of each class drawn (seeded) "
                                      "as the test split", none_means=str(DEFAULT_TEST_SIZE))
    image_size: int | None = setting(None, "a folder of images: the size (px) every image is stored at",
                                     none_means="from the images, at most 72")
    # None: DEFAULT_BATCH_SIZE, or for a dataset of one's own what fitted_batch_size gives (fitted_to_data)
    batch_size: int | None = setting(None, "training batch size", none_means=f"{DEFAULT_BATCH_SIZE}; for a small "
                                     f"dataset of your own smaller, to leave {MIN_STEPS} steps an epoch")
    # seed of the train/validation split; None: ``seed``
    split_seed: int | None = setting(None, "seed of the train/validation split (default: --seed); a supernet fixes it")
    space: str = setting("aebnas", "search space: {choices}", choices=tuple(SPACES), parser_checks=False)
    space_kwargs: dict[str, Any] = field(default_factory=dict)  # its flag: --resolutions (aebnas.search.flags)
    width_mult: float = setting(1.0, "channel width multiplier")
    num_samples: int = setting(20, "number of trials")
    # stop the search after this many seconds (None: when num_samples are done)
    time_budget_s: float | None = setting(None, "stop the search after this many seconds, running trials included "
                                          "(their last report stays in the results)", name="--time-budget")
    search_alg: str = setting("random", "how candidates are proposed: random, tpe / nsga2 (Optuna), surrogate (the "
                              "paper's surrogate-assisted NSGA-II; pymoo)", choices=SEARCH_ALGS)
    # search_alg="surrogate": candidates per iteration (the first 2× are random)
    surrogate_batch: int = setting(8, "surrogate: candidates per iteration (the first iteration proposes twice as "
                                   "many)")
    scheduler: str = setting("asha", "asha stops weak trials early on score; moasha on Pareto rank of (accuracy, "
                             "MACs); fifo runs every trial to the end", choices=SCHEDULERS)
    grace_period: int = setting(1, "ASHA: epochs before a trial can stop")
    reduction_factor: float = setting(2, "ASHA: keep 1/factor per rung")
    cpus_per_trial: float = setting(1, "CPUs each trial reserves (and torch threads in it)")
    # None: see trial_resources
    gpus_per_trial: float | None = setting(None, "GPUs each trial reserves; 0 trains on CPU",
                                           none_means="1 when the cluster has a GPU (a quarter of one for "
                                           "inherited candidates, epochs=0), else 0")
    max_concurrent: int | None = setting(None, "at most this many trials at once")
    storage_path: str = setting("aebnas_results", "where results go (a path or a URI such as s3://bucket/dir); "
                                "shared by all nodes on a cluster")
    name: str | None = setting(None, "experiment name (default: SPACE_DATASET_TIME)")
    address: str | None = setting(None, "Ray cluster address HOST:PORT (default: $RAY_ADDRESS or local)")
    resume: bool = setting(False, "continue the experiment --name from where it stopped; flags not given take the "
                           "values it was started with", action="store_true", show_default=False)
    max_failures: int = 2
    keep_checkpoints: int = 2
    verbose: int = 1
    # > 0 and no supernet: train one first (or reuse it), see supernet_path()
    supernet_epochs: int = setting(0, "without --supernet: train a supernet for this many epochs first (reused when "
                                   "it is already in STORAGE_PATH); 0: candidates train from scratch")
    supernet_workers: int = setting(1, "Ray Train workers of that supernet (0: in the driver's process)")
    # "latency": thresholds tuned for target_ms with C_i from latency_table
    cost: str = setting("macs", "what the thresholds are tuned for: macs (ptflops) or latency (measured: "
                        "--latency-table, --target-ms)", choices=COSTS)
    # `aebnas latency profile --out` file (cost="latency")
    latency_table: str | None = setting(None, "cost latency: table of `aebnas latency profile` for this space, "
                                        "measured on the target device")

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold_grid", tuple(self.threshold_grid))
        object.__setattr__(self, "supernet", supernet_file(self.supernet))
        object.__setattr__(self, "classes", tuple(self.classes))

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ExperimentError naming the first bad setting."""
        self._check_choices()
        self._check_counts()
        self._check_training()
        self._check_resources()
        self._check_searcher()
        self._check_cost()
        self.trial_settings()  # lr, confidence, grid, …
        self._check_a_candidate()

    def _bad(self, name: str, why: str) -> ExperimentError:
        """The error for setting ``name``, with its value and ``why`` it is refused."""
        return ExperimentError(f"{name}={getattr(self, name)!r} {why}")

    def _check_choices(self) -> None:
        """The space, searcher and scheduler are ones there are."""
        if self.space not in SPACES:
            raise self._bad("space", f"is not one of {tuple(SPACES)}")
        if self.search_alg not in SEARCH_ALGS:
            raise self._bad("search_alg", f"is not one of {SEARCH_ALGS}")
        if self.scheduler not in SCHEDULERS:
            raise self._bad("scheduler", f"is not one of {SCHEDULERS}")

    def _check_counts(self) -> None:
        """Settings that count something are whole numbers: ≥ 1, or ≥ 0 where 0 has a meaning."""
        for name in ("num_samples", "grace_period", "batch_size", "keep_checkpoints"):
            if name == "batch_size" and self.batch_size is None:
                continue  # fitted to the data once it is loaded
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise self._bad(name, "must be an integer ≥ 1")
        if not isinstance(self.supernet_epochs, int) or self.supernet_epochs < 0:
            raise self._bad("supernet_epochs", "must be an integer ≥ 0 (0: no supernet is trained)")
        if not isinstance(self.supernet_workers, int) or self.supernet_workers < 0:
            raise self._bad("supernet_workers", "must be an integer ≥ 0 (0: trained in the driver's process)")

    def _check_training(self) -> None:
        """Where a supernet can be trained, the epochs, the target, ASHA's rungs and the supernet file."""
        if self.supernet is None and self.supernet_epochs and "://" in self.storage_path:
            raise self._bad("supernet_epochs", "trains a supernet under a local storage_path only; with a URI train "
                            "one with `aebnas supernet train` and pass --supernet")
        if not isinstance(self.epochs, int) or self.epochs < (0 if self.supernet_path() else 1):
            raise self._bad("epochs", "must be an integer ≥ 1 (≥ 0 with a supernet: 0 scores inherited weights "
                            "only)")
        if not self.target_macs > 0:
            raise self._bad("target_macs", "must be > 0 (MMACs)")
        if not self.reduction_factor > 1:
            raise self._bad("reduction_factor", "must be > 1")
        if self.grace_period > max(self.epochs, 1):
            raise self._bad("grace_period", f"must be ≤ epochs ({self.epochs})")
        if self.supernet is not None:
            self.supernet_info()

    def _check_resources(self) -> None:
        """What each trial reserves, how many run at once, how often one is retried, how long the search runs."""
        if not self.cpus_per_trial > 0:
            raise self._bad("cpus_per_trial", "must be > 0")
        if self.gpus_per_trial is not None and self.gpus_per_trial < 0:
            raise self._bad("gpus_per_trial", "must be ≥ 0 (or None: one GPU per trial when the cluster has GPUs)")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise self._bad("max_concurrent", "must be ≥ 1 (or None for no limit)")
        if self.max_failures < 0:
            raise self._bad("max_failures", "must be ≥ 0")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise self._bad("time_budget_s", "must be > 0 seconds (or None: no time limit)")

    def _check_searcher(self) -> None:
        """The searcher's optional library is installed (Optuna for tpe / nsga2, pymoo for surrogate); its batch."""
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
            raise self._bad("surrogate_batch", "must be an integer ≥ 1")

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
        res = "-".join(map(str, self.space_kwargs.get("resolutions", ()))) or "paper"
        folder = "".join(f"_{k}{v}" for k, v in (("img", self.image_size), ("test", self.test_size)) if v is not None)
        name = (f"supernet_{dataset_label(self.dataset)}{folder}_w{self.width_mult:g}_r{res}"
                f"_split{self.data_split_seed}_v{self.val_size if self.val_size is not None else 'default'}"
                f"_{self.supernet_epochs}ep")
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
        needs = space_needs(self.param_space(info.num_classes, info.in_channels))
        try:
            check_supernet(info, needs=needs, width_mult=self.width_mult)
        except ValueError as exc:
            fits = ""  # a width or resolutions the supernet lacks: the flags that search what it has
            if float(self.width_mult) != info.width_mult or not needs["resolutions"] <= set(info.space.resolutions):
                own = ",".join(map(str, info.space.resolutions))
                fits = f"search the supernet's own space (--width-mult {info.width_mult:g} --resolutions {own}), or "
            raise ExperimentError(f"supernet={self.supernet!r}: {exc}; {fits}train one for this space with "
                                  "aebnas supernet train") from None
        return info

    def trial_settings(self) -> TrialSettings:
        """The settings every trial receives; ExperimentError naming a bad one."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrialSettings)}
        values["batch_size"] = self.batch_size or DEFAULT_BATCH_SIZE
        try:
            return TrialSettings(**{**values, "supernet": self.supernet_path()})
        except ValueError as exc:
            raise ExperimentError(str(exc)) from None

    def param_space(self, num_classes: int = 10, in_channels: int = 3) -> dict[str, Any]:
        """The Tuner's param space: the search space's samplers plus the fixed settings."""
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
        return f"{self.space}_{dataset_label(self.dataset)}_{time.strftime('%Y%m%d-%H%M%S')}"

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


def fitted_to_data(exp: Experiment, data: Dataset, log: Log = print_line) -> Experiment:
    """``exp`` with the settings it leaves open fitted to ``data``, each choice logged with its reason: the
    batch size (None: :func:`~aebnas.data.fit.fitted_batch_size` for a dataset of one's own, else
    the default) and, for a dataset of one's own searched without resolutions, the resolutions
    (:func:`~aebnas.data.fit.fitted_resolutions`). Settings given are kept as they are, and so is a resumed
    search's space (it was fitted when it started); the class names are the data's, so that every trial
    records them."""
    own = is_own_dataset(exp.dataset)
    exp = dataclasses.replace(exp, classes=tuple(data.classes))
    if exp.batch_size is None:
        batch, why = fitted_batch_size(len(data.y_train)) if own else (DEFAULT_BATCH_SIZE, "the default")
        if own:
            log(f"aebnas: batch size {batch}: {why}; --batch-size sets another")
        exp = dataclasses.replace(exp, batch_size=batch)
    if own and "resolutions" not in exp.space_kwargs and not exp.resume:
        resolutions, why = fitted_resolutions(data.x_train.shape[-1])
        log(f"aebnas: resolutions {','.join(map(str, resolutions))}: {why}; --resolutions sets others")
        exp = dataclasses.replace(exp, space_kwargs={**exp.space_kwargs, "resolutions": resolutions})
    return exp


def with_saved_fits(exp: Experiment, saved: dict[str, Any]) -> Experiment:
    """``exp`` resuming the experiment whose settings are ``saved``: what :func:`fitted_to_data` chose when it
    started (batch size, a dataset of one's own's resolutions, the class names) for what ``exp`` leaves open."""
    changes: dict[str, Any] = {}
    if exp.batch_size is None and saved.get("batch_size") is not None:
        changes["batch_size"] = saved["batch_size"]
    resolutions = (saved.get("space_kwargs") or {}).get("resolutions")
    if is_own_dataset(exp.dataset) and "resolutions" not in exp.space_kwargs and resolutions:
        changes["space_kwargs"] = {**exp.space_kwargs, "resolutions": tuple(resolutions)}
    if not exp.classes and saved.get("classes"):
        changes["classes"] = tuple(saved["classes"])
    return dataclasses.replace(exp, **changes)


def space_needs(param_space: dict[str, Any]) -> dict[str, set]:
    """Every value a param space can give each ``SpaceValues`` set (exit positions included)."""
    from ray.tune.search.sample import Categorical

    needs: dict[str, set] = {}
    for key, domain in param_space.items():
        name = value_set_of(key)
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


def experiment_path(exp: Experiment) -> str:
    """The experiment's directory: an absolute local path, or a URI (its ``?query`` kept at the end)."""
    root, query = resolve_storage_path(exp.storage_path), ""
    if "://" in root and "?" in root:
        root, query = root.split("?", 1)
        query = "?" + query
    return f"{root.rstrip('/')}/{exp.experiment_name()}{query}"
