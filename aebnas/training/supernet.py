"""Training a weight-sharing supernet by the sandwich rule, and the supernet file.

``SupernetTraining`` trains an :class:`~aebnas.nn.ElasticEarlyExitNet` on the training
split of a dataset. Each step (BigNAS / AttentiveNAS "sandwich rule"):

1. the largest subnet, at the largest resolution, learns from the labels (every exit and
   the final classifier, CE with label smoothing);
2. the smallest subnet, at the smallest resolution, and ``random_subnets`` random subnets
   learn in place from the largest's detached final logits (soft cross-entropy, T = 1, on
   every exit and the final classifier of the subnet);
3. the gradients add up; one clipped SGD step.

For the first ``warmup_fraction`` of the epochs only the largest trains (DεpS: with a small
budget the shared weights first need a good large network). A subnet is evaluated as every
candidate is (:class:`aebnas.training.loop.Scorer`): extracted, BatchNorm recalibrated on a fixed,
seeded, shuffled sample of the training split, scored on the validation split. The
validation and test splits are never trained on.

Data-parallel training (``aebnas.training.supernet_job``, Ray Train) gives each worker a shard of
every epoch (``batch_size // N`` images per step); all workers draw the same subnets each
step (the draw is seeded by epoch and step) and average their gradients before the step.
As with DDP without SyncBatchNorm, each worker's BatchNorm normalises by its own shard, so
N workers train like one with N times smaller BatchNorm batches, not identically.

The supernet file (:func:`save_supernet` / :func:`load_supernet`) holds the weights and
what they cover: space, width, dataset, classes, resolutions, and the digests of the
training images, so that a search can refuse a supernet that was trained on its
validation or test images (:func:`check_supernet`). Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batches import BatchLoader
from ..config import ArchConfig, SpaceValues, largest_arch, random_arch, smallest_arch
from ..data.datasets import Dataset
from ..exit_policy import ExitOutputs
from ..files import atomic_write
from ..nn import ElasticEarlyExitNet, EarlyExitNet, extract
from ..data.preprocess import resize
from ..settings import DEFAULT_CONFIDENCE, SUPERNET_FILE, TrainSettings, supernet_file
from .loop import (LossWatch, Scorer, autocast, grad_scaler, load_checkpoint, load_optimisation_state,
                    make_optimizer, make_lr_schedule, multi_exit_loss, optimisation_state)

EMBEDDED_SUPERNET = Path(__file__).resolve().parents[1] / "_data" / "supernet_cifar10-subset_w0.75.pt"
"""The supernet shipped with the package: the quickstart's space on the embedded CIFAR-10 subset
(reproduce it with the command in ``aebnas/_data/README.md``)."""
FORMAT = "aebnas-supernet"
VERSION = 1


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


def distillation_loss(outputs: list[torch.Tensor], teacher: torch.Tensor, exit_weight: float) -> torch.Tensor:
    """Soft cross-entropy (T = 1) of every output against the teacher's softmax: final + w · Σ exits."""
    target = F.softmax(teacher, dim=1)

    def soft_ce(logits: torch.Tensor) -> torch.Tensor:
        return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()

    loss = soft_ce(outputs[-1])
    if len(outputs) > 1 and exit_weight > 0:
        loss = loss + exit_weight * sum(soft_ce(o) for o in outputs[:-1])
    return loss


def image_digests(x: np.ndarray) -> np.ndarray:
    """One 64-bit digest per image (BLAKE2b of its bytes), sorted: a set that ignores file order."""
    flat = np.ascontiguousarray(x).reshape(len(x), -1)
    digests = np.fromiter((int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little",
                                          signed=True) for row in flat), dtype=np.int64, count=len(flat))
    return np.sort(digests)


# --------------------------------------------------------------------------- the file


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
            raise ValueError(f"{path} is a supernet file of version {record.get('version')}; "
                             f"this aebnas reads version {VERSION}")
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


# --------------------------------------------------------------------------- training


def _all_reduce_mean(params: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """Average the gradients of ``params`` over the workers (one all-reduce of one flat buffer)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p)
        offset += n


class SupernetTraining:
    """One supernet's training run: elastic network, optimiser, schedule, sandwich sampling.

    ``rank`` / ``world_size``: this worker's shard in data-parallel training (gradients are
    averaged with ``torch.distributed`` when ``world_size > 1``). ``state_dict()`` holds
    everything a resumed run needs, as plain tensors and values.

    ``compile``: the largest and the smallest subnet, which every step trains with the same
    shapes, run through ``torch.compile`` (one graph each, compiled in their first step: minutes
    on a CPU); the random subnets, new every step, run eagerly. The weights are the same
    parameters, so checkpoints and results do not depend on it; it only changes speed (claim 27
    in docs/benchmarks.md measures whether it pays).
    """

    def __init__(self, space: SpaceValues, width_mult: float, data: Dataset, settings: SupernetSettings,
                 device: torch.device, *, dataset_name: str | None = None, split_seed: int = 0, rank: int = 0,
                 world_size: int = 1, compile: bool = False) -> None:
        self.space, self.width_mult, self.data, self.settings = space, float(width_mult), data, settings
        self.device, self.rank, self.world_size = device, rank, world_size
        self.dataset_name, self.split_seed = dataset_name or data.name, split_seed
        torch.manual_seed(settings.seed)  # the same initial weights on every worker
        self.model = ElasticEarlyExitNet(space, width_mult, data.num_classes, data.in_channels).to(
            device, memory_format=torch.channels_last)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        native = data.x_train.shape[-1]
        self.train_batches = BatchLoader.for_split(
            data, "train", batch_size=max(1, settings.batch_size // world_size), resolution=native, train=True,
            device=device, seed=settings.seed, shard=(rank, world_size))
        scaled = dataclasses.replace(settings, lr=settings.peak_lr, lr_batch=None)  # lr scaled to the batch size
        self.optimizer = make_optimizer(self.model, scaled)
        self.scheduler = make_lr_schedule(self.optimizer, scaled, len(self.train_batches))
        self.scaler = grad_scaler(settings.amp, device)
        self.arch_kwargs = {"width_mult": self.width_mult, "num_classes": data.num_classes,
                            "in_channels": data.in_channels}
        self.largest = largest_arch(space, **self.arch_kwargs)
        self.smallest = smallest_arch(space, **self.arch_kwargs)
        # dynamic=False: one graph per fixed subnet (their shapes never change), no symbolic batch sizes
        self.compiled = torch.compile(self.model, dynamic=False) if compile else None
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self._scorers: dict[int, Scorer] = {}
        self._train_digests: np.ndarray | None = None  # computed once, for the file written every epoch

    # ------------------------------------------------------------ sampling
    def subnets(self, epoch: int, step: int) -> list[ArchConfig]:
        """The subnets of one step: largest first (the teacher), then smallest and random ones.

        In warm-up epochs the largest alone. Seeded by (seed, epoch, step): every worker
        draws the same subnets, and a resumed run the same as an uninterrupted one.
        """
        if epoch < self.settings.warmup_epochs:
            return [self.largest]
        rng = random.Random(f"{self.settings.seed}/{epoch}/{step}")
        randoms = [random_arch(self.space, rng, **self.arch_kwargs) for _ in range(self.settings.random_subnets)]
        return [self.largest, self.smallest, *randoms]

    # ------------------------------------------------------------ training
    def train_epoch(self, on_step: Callable[[int, int], None] | None = None) -> dict[str, float]:
        """Train epoch ``self.epoch + 1``; returns mean losses (largest, others), seconds, images/s, lr.
        ``on_step(steps_done, images_done)`` is called after every step (progress lines)."""
        s = self.settings
        self.model.train()
        self.train_batches.set_epoch(self.epoch)
        epoch = self.epoch + 1
        watch = LossWatch(self.device, lambda step, i, value: f"supernet loss is {value} at epoch {epoch} step "
                          f"{step} (subnet {i}; diverged: try a lower lr)")
        per_step: list[int] = []  # subnets trained in each step
        steps, images, start = 0, 0, time.perf_counter()
        for step, (x, y) in enumerate(self.train_batches):
            self.optimizer.zero_grad(set_to_none=True)
            teacher = None
            subnets = self.subnets(self.epoch, step)
            for i, arch in enumerate(subnets):
                with autocast(self.device, s.amp):
                    outputs = self._forward(resize(x, arch.resolution), arch)
                    if i == 0:
                        loss = multi_exit_loss(outputs, y, s.exit_weight, s.label_smoothing)
                        teacher = outputs[-1].detach()
                    else:
                        loss = distillation_loss(outputs, teacher, s.exit_weight)
                watch.add(step, i, loss)
                self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            if self.world_size > 1:
                _all_reduce_mean(self.params, self.world_size)
            torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            per_step.append(len(subnets))
            steps += 1
            images += len(y)
            if on_step is not None:
                on_step(steps, images)
        totals = {"loss": 0.0, "loss_largest": 0.0, "loss_distilled": 0.0}
        values, at = watch.flush(), 0
        for n in per_step:  # summed in the order (and precision) of one float(loss) per subnet
            step_losses, at = values[at:at + n], at + n
            totals["loss"] += sum(step_losses)
            totals["loss_largest"] += step_losses[0]
            totals["loss_distilled"] += (sum(step_losses[1:]) / len(step_losses[1:])) if len(step_losses) > 1 else 0.0
        self.epoch += 1
        seconds = time.perf_counter() - start
        return {**{k: v / max(steps, 1) for k, v in totals.items()}, "seconds": seconds,
                "images_per_s": images / max(seconds, 1e-9), "lr": self.scheduler.get_last_lr()[0],
                "warmup": self.epoch <= s.warmup_epochs}

    def _forward(self, x: torch.Tensor, arch: ArchConfig) -> list[torch.Tensor]:
        """Subnet ``arch``'s outputs in a training step: compiled for the two fixed subnets when asked."""
        if self.compiled is not None and (arch is self.largest or arch is self.smallest):
            return self.compiled(x, arch)
        return self.model(x, arch)

    # ------------------------------------------------------------ evaluation
    def scorer(self, resolution: int) -> Scorer:
        """The scoring path of every candidate, at ``resolution`` (cached)."""
        if resolution not in self._scorers:
            self._scorers[resolution] = Scorer.from_settings(self.data, resolution, self.device, self.settings)
        return self._scorers[resolution]

    def evaluate(self, arch: ArchConfig, split: str = "val") -> ExitOutputs:
        """Every exit's outputs of subnet ``arch`` on ``split``, scored as a candidate is."""
        return score_subnet(self.model, arch, self.scorer(arch.resolution), split)

    # ------------------------------------------------------------ state
    def info(self) -> SupernetInfo:
        if self._train_digests is None:
            self._train_digests = image_digests(self.data.x_train)
        return SupernetInfo(space=self.space, width_mult=self.width_mult, num_classes=self.data.num_classes,
                            in_channels=self.data.in_channels, classes=list(self.data.classes),
                            dataset=self.dataset_name, train_digests=self._train_digests,
                            settings=self.settings, epochs=self.epoch, history=list(self.history),
                            val_size=len(self.data.y_val), split_seed=self.split_seed)

    def state_dict(self) -> dict[str, Any]:
        return {**optimisation_state(self), "history": self.history, "settings": self.settings.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("settings") not in (None, self.settings.to_dict()):
            raise ValueError("the checkpoint was written by a supernet run with other settings")
        load_optimisation_state(self, state)
        self.history = list(state.get("history", []))


def score_subnet(supernet: ElasticEarlyExitNet, arch: ArchConfig, scorer: Scorer, split: str = "val",
                 confidence: str = DEFAULT_CONFIDENCE) -> ExitOutputs:
    """Extract ``arch``, recalibrate its BatchNorm and return every exit's outputs on ``split``.

    The supernet itself is left untouched (the statistics are recomputed on the copy).
    """
    net: EarlyExitNet = extract(supernet, arch, confidence)
    return scorer(net, (split,))[split]


__all__ = ["SupernetSettings", "SupernetTraining", "SupernetInfo", "save_supernet", "load_supernet",
           "built_supernet", "read_supernet_info", "supernet_from_state", "inherited_network", "check_supernet", "score_subnet", "distillation_loss",
           "image_digests", "SUPERNET_FILE", "EMBEDDED_SUPERNET"]
