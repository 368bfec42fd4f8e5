"""The fixed (not searched) settings of training and of a trial, declared once.

``TrainSettings`` is how a candidate is optimised; ``TrialSettings`` adds what a trial
needs around it (data, target, threshold tuning, device). ``aebnas.search.experiment.Experiment``
extends ``TrialSettings`` with the search's own settings, so every setting has one
declaration, one default and one check; one with a command-line flag is declared with
``setting(default, help, …)`` (a :class:`Flag`), from which :mod:`aebnas.search.flags` makes it. A trial receives ``TrialSettings.to_dict()`` in
its flat config next to the architecture keys; ``SETTING_KEYS`` names them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .config import ArchConfig, is_arch_key, refuse_old_keys

EXPERIMENT_FILE = "aebnas_experiment.json"  # an experiment's settings, in its directory
# Files a trial directory and a retrain run directory hold.
ARCH_FILE = "arch.json"               # the flat config: architecture + settings
CHECKPOINT_FILE = "checkpoint.pt"     # resume state (tensors and plain values only)
EXIT_OUTPUTS_FILE = "exit_outputs.npz"  # per split: every exit's confidence and prediction, the costs
MODEL_FILE = "model.pt"               # retrain: final weights and thresholds
THRESHOLDS_FILE = "thresholds.json"   # retrain: thresholds tuned on validation
SUPERNET_FILE = "supernet.pt"          # `aebnas supernet train --out DIR` writes DIR/supernet.pt
METRICS_FILE = "metrics.json"         # retrain: written last, so its presence says the run is complete

# The paper's threshold grid: 0.1 … 1.0 in steps of 0.15 (7 values); λ = 0.1.
PAPER_GRID: tuple[float, ...] = tuple(round(0.1 + 0.15 * k, 2) for k in range(7))
PAPER_LAMBDA = 0.1
CONFIDENCE_MEASURES = ("margin", "max_prob", "entropy")
DEFAULT_CONFIDENCE = "margin"  # the paper's score margin


@dataclass(frozen=True)
class Flag:
    """How a setting is given on the command line; :mod:`aebnas.search.flags` makes the flag from it.

    ``help`` may name ``{choices}``: they are listed there ("a, b or c"), so a choice is named
    in one place. argparse accepts only ``choices`` unless ``parser_checks`` is False (then the
    setting's own check refuses a bad value, naming it). ``type`` parses the text (default: the
    field's annotation, int, float or str; a bool gives ``--x / --no-x``). ``none_means`` is
    shown as the default when the default is None.
    """

    help: str
    choices: tuple[str, ...] = ()
    parser_checks: bool = True
    type: Callable[[str], Any] | None = None
    action: str | None = None
    name: str | None = None  # the flag; default: --field-name
    show_default: bool = True
    none_means: str | None = None

    def help_text(self) -> str:
        """The help with ``{choices}`` filled in."""
        return self.help.format(choices=listed(self.choices))


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A dataclass field with ``default`` that has a command-line flag (keywords: :class:`Flag`'s)."""
    return dataclasses.field(default=default, metadata={"flag": Flag(help, **flag)})


def listed(names: tuple[str, ...]) -> str:
    """``("a", "b", "c")`` as ``"a, b or c"``."""
    return " or ".join(filter(None, (", ".join(names[:-1]), names[-1]))) if names else ""


def none_or_text(text: str) -> str | None:
    """A command-line value where ``none`` (or nothing) means None, e.g. ``--supernet none``."""
    return None if text.strip().lower() in ("", "none") else text


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation of one candidate (defaults measured on the CIFAR-10 subset).

    SGD with Nesterov momentum and a one-cycle schedule gets a MobileNetV3 candidate to a
    useful accuracy in a few epochs; ``exit_weight`` is w in CE(final) + w·ΣCE(exit_i).
    ``epochs`` may be 0 only where weights are inherited (a supernet's subnet: scored as is).
    ``bn_recalibration_batches`` batches of a fixed, seeded, shuffled sample of the training
    split recompute BatchNorm statistics before every evaluation. ``amp``: bfloat16/float16
    autocast on CUDA (ignored on CPU).
    """

    epochs: int = setting(5, "training epochs per trial (with --supernet: fine-tuning epochs, 0 = inherited weights "
                          "as they are)")
    batch_size: int = setting(128, "training batch size")
    lr: float = setting(0.1, "peak learning rate of the one-cycle schedule")
    weight_decay: float = 5e-5
    momentum: float = 0.9
    exit_weight: float = 1.0
    label_smoothing: float = 0.0
    bn_recalibration_batches: int = 10
    amp: bool = setting(False, "mixed precision on CUDA (ignored on CPU)")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        def integer(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        checks = {"epochs": integer(self.epochs) and self.epochs >= 0,
                  "batch_size": integer(self.batch_size) and self.batch_size >= 1,
                  "lr": self.lr > 0 and math.isfinite(self.lr),
                  "weight_decay": self.weight_decay >= 0, "exit_weight": self.exit_weight >= 0,
                  "momentum": 0 <= self.momentum < 1, "label_smoothing": 0 <= self.label_smoothing < 1,
                  "bn_recalibration_batches": integer(self.bn_recalibration_batches)
                  and self.bn_recalibration_batches >= 0,
                  "amp": isinstance(self.amp, bool)}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range")

    def train_settings(self) -> TrainSettings:
        """Only the optimisation settings (a plain ``TrainSettings``)."""
        return TrainSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainSettings)})


LATENCY_BACKENDS = ("onnxruntime", "torch")  # the runtimes a latency table holds figures of


@dataclass(frozen=True)
class TrialSettings(TrainSettings):
    """Everything fixed that travels in a trial's config besides the architecture.

    ``supernet``: the supernet file the candidates inherit their weights from (None: they
    train from scratch); then ``epochs`` are fine-tuning epochs (0: score the inherited
    weights as they are) at learning rate ``finetune_lr`` instead of ``lr``.
    ``target_ms``: thresholds are tuned for this average latency (ms, from the latency table
    the trial is given, ``latency_backend`` figures) instead of ``target_macs``.
    """

    dataset: str = setting("cifar10-subset", "cifar10, cifar100, svhn, fashion-mnist, cifar10-subset (embedded), the "
                           "path of an .npz file or a folder of images in class folders (DIR/<class>/, or "
                           "DIR/train/<class>/ with DIR/test/<class>/)")
    target_macs: float = setting(17.0, "target average MMACs")
    seed: int = setting(0, "seed of the search, the trials and (unless --split-seed) the data split")
    confidence: str = DEFAULT_CONFIDENCE
    score_lambda: float = PAPER_LAMBDA
    threshold_grid: tuple[float, ...] = PAPER_GRID
    eval_batch_size: int = 512
    device: str = "auto"
    supernet: str | None = setting(None, "supernet file (aebnas supernet train) the candidates inherit their weights "
                                   "from; 'none': they train from scratch", type=none_or_text)
    finetune_lr: float = setting(0.01, "peak learning rate of fine-tuning inherited weights")
    # set: the cost is measured latency (a latency table), thresholds tuned for it
    target_ms: float | None = setting(None, "cost latency: target average latency per image in milliseconds")
    latency_backend: str = setting("onnxruntime", "cost latency: the table's figures to use: {choices}",
                                   choices=LATENCY_BACKENDS)
    # the dataset's class names by label, recorded (arch.json, results) so that they travel with a trial
    classes: tuple[str, ...] = ()

    def check(self) -> None:
        super().check()
        if not self.target_macs > 0:
            raise ValueError(f"target_macs={self.target_macs} must be > 0 (MMACs)")
        if self.target_ms is not None and not (isinstance(self.target_ms, (int, float)) and self.target_ms > 0):
            raise ValueError(f"target_ms={self.target_ms!r} must be > 0 (milliseconds), or None to tune for MACs")
        if self.latency_backend not in LATENCY_BACKENDS:
            raise ValueError(f"latency_backend={self.latency_backend!r} is not one of {LATENCY_BACKENDS}")
        if self.confidence not in CONFIDENCE_MEASURES:
            raise ValueError(f"confidence={self.confidence!r} is not one of {CONFIDENCE_MEASURES}")
        if self.score_lambda < 0:
            raise ValueError(f"score_lambda={self.score_lambda} must be ≥ 0")
        if not self.finetune_lr > 0 or not math.isfinite(self.finetune_lr):
            raise ValueError(f"finetune_lr={self.finetune_lr!r} must be a finite number > 0")
        if self.epochs == 0 and self.supernet is None:
            raise ValueError("epochs=0 scores inherited weights only, so it needs a supernet; "
                             "without one a candidate trains for epochs ≥ 1")
        if not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size={self.eval_batch_size!r} must be an integer ≥ 1")
        grid = tuple(self.threshold_grid)
        if not grid or any(not 0.0 <= float(g) <= 1.0 for g in grid):
            raise ValueError(f"threshold_grid={grid} must be non-empty values in [0, 1]")

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold_grid", tuple(float(g) for g in self.threshold_grid))
        object.__setattr__(self, "supernet", supernet_file(self.supernet))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        super().__post_init__()

    def trial_settings(self) -> TrialSettings:
        """Only the trial settings (a plain ``TrialSettings``)."""
        return TrialSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrialSettings)})

    def to_dict(self) -> dict[str, Any]:
        """The settings as the plain values a trial's flat config carries."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrialSettings)}
        d["threshold_grid"] = list(self.threshold_grid)
        d["classes"] = list(self.classes)
        return d


SETTING_KEYS = frozenset(f.name for f in dataclasses.fields(TrialSettings))
"""Keys of a trial's flat config that are settings, not architecture."""


def parse_trial_config(config: Mapping[str, Any]) -> tuple[ArchConfig, TrialSettings]:
    """Split a trial's flat config into the architecture and the fixed settings.

    Raises ValueError naming any key that is neither (or a bad value).
    """
    unknown = sorted(k for k in config if not is_arch_key(k) and k not in SETTING_KEYS)
    refuse_old_keys(unknown)
    if unknown:
        raise ValueError(f"unknown trial config key(s) {unknown}; settings are {sorted(SETTING_KEYS)}, "
                         "architecture keys are described in aebnas.config")
    arch = ArchConfig.from_flat({k: v for k, v in config.items() if is_arch_key(k)})
    settings = TrialSettings(**{k: v for k, v in config.items() if k in SETTING_KEYS})
    return arch, settings


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers (a command-line value such as ``--resolutions 32,36``)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def resolved_config(arch: ArchConfig, settings: TrialSettings) -> dict[str, Any]:
    """The flat config of what a trial actually builds (``arch.json``)."""
    return {**arch.to_flat(), **settings.to_dict()}


def supernet_file(path: str | None) -> str | None:
    """``path``, or the supernet file inside it when ``path`` is the directory ``aebnas supernet
    train --out`` wrote: the path one command prints is the path the next one takes."""
    if path is not None and pathlib.Path(path).expanduser().is_dir():
        inside = pathlib.Path(path).expanduser() / SUPERNET_FILE
        if inside.is_file():
            return str(inside)
    return path
