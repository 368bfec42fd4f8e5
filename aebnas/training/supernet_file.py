"""The supernet file: what it holds, writing and reading it, checking it against a search, inheriting from it.

A supernet file (:func:`save_supernet` / :func:`load_supernet`) holds the weights of an
:class:`~aebnas.nn.ElasticEarlyExitNet` and what they cover (:class:`SupernetInfo`): space, width,
dataset, classes, resolutions, how it was trained (:class:`SupernetSettings`) and the digests of
the training images, so that a search can refuse a supernet that was trained on its validation or
test images (:func:`check_supernet`). :func:`inherited_network` is the one way a candidate takes
its weights from one. Training it is :mod:`aebnas.training.supernet`; nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from ..config import ArchConfig, SpaceValues
from ..data.datasets import Dataset
from ..files import atomic_write
from ..nn import ElasticEarlyExitNet, EarlyExitNet, extract
from ..settings import SUPERNET_FILE, TrainSettings, supernet_file
from .loop import load_checkpoint

EMBEDDED_SUPERNET = Path(__file__).resolve().parents[1] / "_data" / "supernet_cifar10-subset_w0.75.pt"
"""The supernet shipped with the package: the quickstart's space on the embedded CIFAR-10 subset
(reproduce it with the command in ``aebnas/_data/README.md``)."""


FORMAT = "aebnas-supernet"
# 2: the paper's exit modules (resize, strided convolution) and EDANAS's exit per position; version 1 held
# the earlier depthwise exit modules, whose weights fit no branch of today's.
VERSION = 2


@dataclass(frozen=True)
class SupernetSettings(TrainSettings):
    """How a supernet is trained (the optimisation fields are :class:`TrainSettings`').

    ``batch_size`` is the global batch: with N workers each takes ``batch_size // N``.
    ``random_subnets``: N of the sandwich rule. ``warmup_fraction``: the first fraction of
    the epochs trains the largest subnet alone. ``grad_clip``: max gradient norm.
    ``lr_batch``: the batch size ``lr`` is set for; at another ``batch_size`` the peak learning
    rate scales linearly, ``lr × batch_size / lr_batch`` (Goyal et al., 2017: large batches on
    a GPU keep the updates' size; the one-cycle schedule warms it up over its first 25%).
    None: ``lr`` as given.
    """

    epochs: int = 60
    label_smoothing: float = 0.1
    random_subnets: int = 2
    warmup_fraction: float = 0.25
    grad_clip: float = 5.0
    seed: int = 0
    eval_batch_size: int = 512
    lr_batch: int | None = None

    def check(self) -> None:
        super().check()
        if self.lr_batch is not None and (isinstance(self.lr_batch, bool) or not isinstance(self.lr_batch, int)
                                          or self.lr_batch < 1):
            raise ValueError(f"lr_batch={self.lr_batch!r} must be an integer ≥ 1 (or None: lr as given)")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} is out of range: a supernet trains for at least 1 epoch")
        if isinstance(self.random_subnets, bool) or not isinstance(self.random_subnets, int) \
                or self.random_subnets < 0:
            raise ValueError(f"random_subnets={self.random_subnets!r} must be an integer ≥ 0")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction={self.warmup_fraction!r} must be in [0, 1)")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip!r} must be > 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be an integer ≥ 0")

    @property
    def peak_lr(self) -> float:
        """The one-cycle schedule's peak learning rate at this batch size (see ``lr_batch``)."""
        return self.lr if self.lr_batch is None else self.lr * self.batch_size / self.lr_batch

    @property
    def warmup_epochs(self) -> int:
        """Epochs in which only the largest subnet trains."""
        return int(round(self.warmup_fraction * self.epochs))

    def to_dict(self) -> dict[str, Any]:
        """The settings as the supernet file and checkpoint store them (plain values)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SupernetSettings":
        """Settings read back from :meth:`to_dict` (a supernet file of any version: a field it lacks takes
        today's default, a key this aebnas does not know is ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def image_digests(x: np.ndarray) -> np.ndarray:
    """One 64-bit digest per image (BLAKE2b of its bytes), sorted: a set that ignores file order."""
    flat = np.ascontiguousarray(x).reshape(len(x), -1)
    digests = np.fromiter((int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little",
                                          signed=True) for row in flat), dtype=np.int64, count=len(flat))
    return np.sort(digests)


@dataclass
class SupernetInfo:
    """What a supernet covers and how it was made (everything in its file besides the weights)."""

    space: SpaceValues
    width_mult: float
    num_classes: int
    in_channels: int
    classes: list[str]
    dataset: str
    train_digests: np.ndarray
    settings: SupernetSettings
    epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)
    val_size: int | None = None    # the dataset split it was trained on: reload it with these
    split_seed: int = 0

    @property
    def resolutions(self) -> tuple[int, ...]:
        return self.space.resolutions

    def describe(self) -> str:
        last = self.history[-1] if self.history else {}
        accs = (f"; val accuracy largest {last['val_acc_largest']:.1f}%, smallest {last['val_acc_smallest']:.1f}%"
                if "val_acc_largest" in last else "")
        return (f"supernet of {self.dataset} ({self.num_classes} classes), width {self.width_mult}, "
                f"resolutions {list(self.resolutions)}, {len(self.train_digests)} training images, "
                f"{self.epochs} epochs{accs}")

    def to_record(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION,
                "space": {k: list(v) for k, v in dataclasses.asdict(self.space).items()},
                "width_mult": self.width_mult, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "classes": list(self.classes), "dataset": self.dataset,
                "train_digests": torch.from_numpy(np.asarray(self.train_digests, dtype=np.int64)),
                "settings": self.settings.to_dict(), "epochs": self.epochs, "history": self.history,
                "val_size": self.val_size, "split_seed": self.split_seed}

    @classmethod
    def from_record(cls, record: dict[str, Any], path: str | Path) -> "SupernetInfo":
        if record.get("format") != FORMAT:
            raise ValueError(f"{path} is not an aebnas supernet file (no '{FORMAT}' format marker)")
        if record.get("version") != VERSION:
            old = (" (its exit branches are the depthwise modules aebnas had before the paper's; their weights fit "
                   "no branch of today's)" if record.get("version") == 1 else "")
            raise ValueError(f"{path} is a supernet file of format version {record.get('version')}{old}; this aebnas "
                             f"reads version {VERSION}: train the supernet again with `aebnas supernet train` "
                             "(same dataset and flags), or search without --supernet")
        return cls(space=SpaceValues(**{k: tuple(v) for k, v in record["space"].items()}),
                   width_mult=float(record["width_mult"]), num_classes=int(record["num_classes"]),
                   in_channels=int(record["in_channels"]), classes=list(record["classes"]),
                   dataset=str(record["dataset"]), train_digests=record["train_digests"].numpy(),
                   settings=SupernetSettings.from_dict(record["settings"]), epochs=int(record["epochs"]),
                   history=list(record.get("history", [])), val_size=record.get("val_size"),
                   split_seed=int(record.get("split_seed", 0)))


def save_supernet(path: str | Path, model: ElasticEarlyExitNet, info: SupernetInfo, half: bool = True) -> Path:
    """Write the supernet file (atomically: a crash never leaves half a file).

    ``half``: floating-point weights are stored as float16 (half the size; :func:`load_supernet`
    returns float32). BatchNorm statistics are stored too, but every subnet is recalibrated
    before it is scored.
    """
    path = Path(path)
    state = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu()
             for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: torch.save({**info.to_record(), "model": state}, tmp))


def _read_record(path: str | Path) -> tuple[dict[str, Any], SupernetInfo]:
    """A supernet file's record and its metadata (ValueError if it is not one; FileNotFoundError if absent).
    ``path`` may be the directory ``aebnas supernet train --out`` wrote."""
    path = supernet_file(str(path))
    if not Path(path).is_file():
        raise FileNotFoundError(f"supernet file {path} does not exist (train one with: aebnas supernet train)")
    record = load_checkpoint(path)
    return record, SupernetInfo.from_record(record, path)


def read_supernet_info(path: str | Path) -> SupernetInfo:
    """The metadata of a supernet file (ValueError if it is not one; FileNotFoundError if absent)."""
    return _read_record(path)[1]


def load_supernet(path: str | Path, device: str | torch.device = "cpu") -> tuple[ElasticEarlyExitNet, SupernetInfo]:
    """The supernet of a file (float32, eval mode, on ``device``) and its :class:`SupernetInfo`."""
    record, info = _read_record(path)
    return supernet_from_state(record["model"], info, device), info


def supernet_from_state(state: dict[str, torch.Tensor], info: SupernetInfo,
                        device: str | torch.device = "cpu") -> ElasticEarlyExitNet:
    """An ``ElasticEarlyExitNet`` of ``info``'s space holding ``state`` (float32, eval mode)."""
    model = ElasticEarlyExitNet(info.space, info.width_mult, info.num_classes, info.in_channels)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.to(device).eval()


# The supernets this process has built, by the digest of their weights (one entry: a search inherits from one).
# Ray Tune runs trial after trial in the same worker process (function trainables reuse their actors), and each
# trial of a search receives the same record: the supernet module is built once per process, not once per trial.
_BUILT: dict[str, ElasticEarlyExitNet] = {}


def _weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def built_supernet(record: Mapping[str, Any]) -> ElasticEarlyExitNet:
    """The supernet of a supernet file's record (``load_checkpoint``), built once per process for the same
    weights (float32, eval mode, CPU). Callers must not change it: :func:`extract` copies what a candidate takes."""
    key = _weights_digest(record["model"])
    if key not in _BUILT:
        info = SupernetInfo.from_record(dict(record), "the supernet")
        _BUILT.clear()
        _BUILT[key] = supernet_from_state(record["model"], info)
    return _BUILT[key]


def inherited_network(record: Mapping[str, Any], arch: ArchConfig, confidence: str) -> EarlyExitNet:
    """The candidate ``arch`` holding its weights from a supernet file's record (``load_checkpoint``):
    what a trial with a supernet and ``aebnas retrain --inherit`` start from (eval mode, float32, CPU)."""
    return extract(built_supernet(record), arch, confidence)


def check_supernet(info: SupernetInfo, *, needs: Mapping[str, Iterable[Any]], width_mult: float,
                   data: Dataset | None = None) -> None:
    """Raise ValueError saying why a supernet cannot serve a search.

    ``needs``: every value the search's space can take, per ``SpaceValues`` field (e.g.
    ``{"kernels": {3, 5}, "resolutions": {32}}``); each must be in the supernet's space. The
    width must be the supernet's; with ``data``, so must the classes and input channels, and
    the supernet must not have trained on any of ``data``'s validation or test images
    (images that are also in ``data``'s own training split do not count: a dataset may hold
    duplicates).
    """
    reasons = []
    if float(width_mult) != info.width_mult:
        reasons.append(f"width_mult {width_mult} differs from the supernet's {info.width_mult}")
    for name, values in needs.items():
        missing = sorted(set(values) - set(getattr(info.space, name)))
        if missing:
            reasons.append(f"{name} {missing} are not in the supernet's {list(getattr(info.space, name))}")
    if data is not None:
        if data.num_classes != info.num_classes or list(data.classes) != list(info.classes):
            reasons.append(f"the data has {data.num_classes} classes {list(data.classes)[:4]}…, the supernet "
                           f"{info.num_classes} {list(info.classes)[:4]}…")
        if data.in_channels != info.in_channels:
            reasons.append(f"the data has {data.in_channels} input channels, the supernet {info.in_channels}")
    if data is not None and not reasons:
        held_out = np.union1d(image_digests(data.x_val), image_digests(data.x_test))
        leaked = np.setdiff1d(np.intersect1d(held_out, info.train_digests), image_digests(data.x_train))
        if len(leaked):
            reasons.append(f"it was trained on {len(leaked)} of this search's validation/test images (another "
                           "split of the data: a different val_size or seed); train a supernet on this split "
                           "(same dataset, val_size and seed)")
    if reasons:
        raise ValueError(f"it cannot serve this search ({info.describe()}): " + "; ".join(reasons))


__all__ = ["EMBEDDED_SUPERNET", "FORMAT", "VERSION", "SUPERNET_FILE", "SupernetSettings", "SupernetInfo", "save_supernet",
           "read_supernet_info", "load_supernet", "supernet_from_state", "built_supernet", "inherited_network",
           "check_supernet", "image_digests"]
