"""Datasets held in memory as uint8 numpy arrays: loading, validation split, device copies.

``load_dataset`` returns a :class:`Dataset`: train / validation / test splits as NCHW
uint8 numpy arrays plus what a trial needs to use them (classes, per-channel mean and
std, whether horizontal flips make sense). Numpy arrays, not tensors, because Ray's object
store maps them into every trial of a node without a copy (they arrive read-only);
tensors would be deserialized, i.e. copied, once per trial. :meth:`Dataset.split` makes a
split's tensors on a device once and caches them on the instance (on CPU they are views of
the arrays), so all loaders of a trial share one device copy.

A user's own data is an ``.npz`` of arrays (:mod:`aebnas.data.npz`) or a folder of images in class
folders (:mod:`aebnas.data.folder`), whose splits are views of one decoded array.

The splits keep the file's order (validation is a seeded random sample of it), so nothing
may take "the first N images" of a split: ``aebnas.data.batches.BatchLoader`` turns a split into normalised
float batches, training batches in a new seeded order every epoch with a random crop and
flip computed for the whole batch at once (no PIL, no per-sample Python loop);
:func:`aebnas.data.batches.calibration_loader` serves a fixed seeded random sample of the training split for
BatchNorm recalibration; evaluation uses every image, so its order does not matter.
"""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import shutil
import tarfile
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..progress import Log, print_line
from .folder import DEFAULT_TEST_SIZE, FolderError, read_folder, stratified_test_mask
from .npz import nhwc_to_nchw, read_npz_dataset

DATASET_NAMES = ("cifar10-subset", "cifar10", "cifar100", "svhn", "fashion-mnist")
"""Names ``load_dataset`` knows; any path ending in ``.npz`` and any folder of class folders is accepted too."""

DEFAULT_VAL_SIZE = {"cifar10": 5000, "cifar100": 5000, "svhn": 7325, "cifar10-subset": 500, "fashion-mnist": 6000}
"""Validation images taken out of the training set; .npz files get 10% of train (at least 1)."""

DEFAULT_DATA_DIR = pathlib.Path("~/.cache/aebnas/data")

FASHION_MNIST_SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's package ``dataset-fashion-mnist`` installs the four idx ``.gz`` files."""

# Where torchvision expects each dataset's files under DATA_DIR.
_TORCHVISION_LAYOUT = {
    "cifar10": "DATA_DIR/cifar-10-batches-py/ (cifar-10-python.tar.gz extracted)",
    "cifar100": "DATA_DIR/cifar-100-python/ (cifar-100-python.tar.gz extracted)",
    "svhn": "DATA_DIR/train_32x32.mat + DATA_DIR/test_32x32.mat",
    "fashion-mnist": "DATA_DIR/FashionMNIST/raw/ (the four idx files, extracted), or DATA_DIR holding the "
                     "four idx .gz files as Debian's package lays them out",
}
SPLITS = ("train", "val", "test")
"""Names of a Dataset's splits (:meth:`Dataset.split`, :meth:`BatchLoader.for_split`)."""


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where they were looked for (and were not downloaded)."""


@dataclass(repr=False)
class Dataset:
    """Three splits as numpy arrays: x uint8 (N, C, H, W) C-contiguous, y int64 (N,).

    Arrays that came through Ray's object store are read-only views of it. :meth:`split`
    caches each split's tensors per device on the instance; the cache is never pickled.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    in_channels: int
    classes: list[str]
    hflip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    _tensors: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def split(self, name: str, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Split ``name`` ("train", "val" or "test") as tensors (x uint8 NCHW, y int64) on ``device``.

        Made once per (split, device) and cached on this instance, so a trial's training,
        calibration and evaluation loaders share one device copy; on CPU the tensors share
        memory with the numpy arrays (no copy at all).
        """
        if name not in SPLITS:
            raise ValueError(f"split={name!r} is not one of {SPLITS}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one copy
            device = torch.device("cuda", torch.cuda.current_device())
        key = (name, device)
        if key not in self._tensors:
            x = _as_tensor(getattr(self, f"x_{name}")).to(device)
            y = _as_tensor(getattr(self, f"y_{name}")).to(device, dtype=torch.int64)
            self._tensors[key] = (x, y)
        return self._tensors[key]

    def __getstate__(self) -> dict:
        # Device tensors are per process; pickling them would ship the data twice (or to a
        # node without that device).
        return {k: v for k, v in self.__dict__.items() if k != "_tensors"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tensors = {}

    def summary(self) -> str:
        """One line: name, split sizes, number of classes and image shape (C×H×W)."""
        c, h, w = self.x_train.shape[1:]
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_val)} val / "
            f"{len(self.y_test)} test, {self.num_classes} classes, images {c}x{h}x{w}"
        )

    def __repr__(self) -> str:
        # The default dataclass repr would print every pixel.
        return f"Dataset({self.summary()})"


def embedded_dataset_path() -> pathlib.Path:
    """Path of the CIFAR-10 subset shipped with the package (``aebnas/_data/cifar10_subset.npz``)."""
    return pathlib.Path(__file__).resolve().parents[1] / "_data" / "cifar10_subset.npz"


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    val_size: int | None = None,
    seed: int = 0,
    *,
    image_size: int | None = None,
    test_size: float | None = None,
    log: Log = print_line,
) -> Dataset:
    """Load a dataset into memory and split a validation set off its training set.

    ``name`` is one of :data:`DATASET_NAMES`, a path ending in ``.npz`` or a folder of images in
    class folders (:mod:`aebnas.data.folder`: ``DIR/<class>/`` or ``DIR/train/<class>/`` with
    ``DIR/test/<class>/``), decoded at ``image_size`` px (None: from the images) and, without a
    test folder, with ``test_size`` of each class (default :data:`DEFAULT_TEST_SIZE`) drawn as the
    test split; ``log`` gets its lines (size chosen, progress, warnings).
    ``cifar10``, ``cifar100``, ``svhn`` and ``fashion-mnist`` are read with torchvision from
    ``data_dir`` (default ``~/.cache/aebnas/data``) in torchvision's layout, downloaded there
    first when ``download`` is true. For ``fashion-mnist``, ``data_dir`` may also hold the four
    idx ``.gz`` files as they are distributed (Debian's ``dataset-fashion-mnist`` package puts
    them in :data:`FASHION_MNIST_SYSTEM_DIR`, which is also looked in when ``data_dir`` is not
    given): they are extracted once into torchvision's layout. ``cifar10-subset`` is the embedded file
    (:func:`embedded_dataset_path`) and ignores ``data_dir`` and ``download``. An ``.npz``
    file needs keys ``x_train``, ``y_train``, ``x_test``, ``y_test`` (optional
    ``classes``), images uint8 NHWC or NHW, labels 0-based class ids; without ``classes``
    every id in 0..max label must occur in ``y_train``. A relative path that does not
    exist is also looked for under ``data_dir``.

    The validation split is ``val_size`` images (default :data:`DEFAULT_VAL_SIZE`) drawn
    by a permutation seeded with ``seed``; both splits keep the original order.
    Returns a :class:`Dataset` with mean/std (in [0, 1] pixel units) of the training split.
    Raises :class:`DatasetNotFoundError` when files are missing, ``ValueError`` for an
    unknown name, a bad ``val_size`` or a malformed ``.npz`` file or folder.
    """
    folder = _find_folder(name, data_dir)
    if folder is None and (image_size is not None or test_size is not None):
        raise ValueError(f"image_size and test_size apply to a folder of images; dataset={name!r} is not one")
    if folder is not None:
        return _from_folder(folder, str(name), image_size, test_size, val_size, seed, log)
    if name == "cifar10-subset":
        return _from_npz(embedded_dataset_path(), name, val_size, seed)
    if name in DATASET_NAMES[1:]:
        root = pathlib.Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).expanduser()
        return _from_torchvision(name, root, download, val_size, seed)
    if str(name).lower().endswith(".npz"):
        return _from_npz(_find_npz(name, data_dir), str(name), val_size, seed)
    raise ValueError(
        f"dataset={name!r} is not one of {DATASET_NAMES}, not a path ending in .npz and not an existing folder "
        "of images in class folders (DIR/<class>/<image>)"
    )


def is_own_dataset(name: str) -> bool:
    """Whether ``name`` is a user's own dataset (an ``.npz`` file or a folder), not one aebnas names."""
    return name not in DATASET_NAMES


def dataset_label(name: str) -> str:
    """A short name for ``name`` in experiment and file names: a path's last part (an ``.npz`` without it)."""
    if not is_own_dataset(name):
        return name
    path = pathlib.Path(str(name).rstrip("/\\"))
    return path.stem if path.suffix.lower() == ".npz" else path.name


# --------------------------------------------------------------------------- building


def _build(
    name: str,
    x_full: np.ndarray,
    y_full: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    classes: list[str],
    hflip: bool,
    val_size: int | None,
    seed: int,
) -> Dataset:
    """Split validation off the full training set and assemble a Dataset."""
    val_idx, train_idx = _validation_split(name, len(y_full), val_size, seed)
    return _assemble(name, (np.ascontiguousarray(x_full[train_idx]), y_full[train_idx]),
                     (np.ascontiguousarray(x_full[val_idx]), y_full[val_idx]),
                     (np.ascontiguousarray(x_test), y_test), classes, hflip)


def _validation_split(name: str, n: int, val_size: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation, training) indices into ``n`` training images, each sorted: ``val_size`` (default
    :data:`DEFAULT_VAL_SIZE`, else 10%) drawn by a permutation seeded with ``seed``."""
    if val_size is None:
        val_size = DEFAULT_VAL_SIZE.get(name, max(1, n // 10))
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 < val_size < n:
        raise ValueError(
            f"val_size={val_size!r} is not allowed for {name!r}: it must be an int with "
            f"0 < val_size < {n} (the number of training images); a validation split is "
            "needed to tune exit thresholds"
        )
    # torch's permutation, as before the splits became numpy: a seed gives the same split as ever.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(perm[:val_size]), np.sort(perm[val_size:])


def _assemble(name: str, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
              test: tuple[np.ndarray, np.ndarray], classes: list[str], hflip: bool) -> Dataset:
    """The Dataset of three (x uint8 NCHW C-contiguous, y) splits, with the training split's mean and std."""
    mean, std = _channel_stats(train[0])
    return Dataset(name=name, x_train=train[0], y_train=train[1].astype(np.int64), x_val=val[0],
                   y_val=val[1].astype(np.int64), x_test=test[0], y_test=test[1].astype(np.int64),
                   num_classes=len(classes), in_channels=train[0].shape[1], classes=classes, hflip=hflip,
                   mean=mean, std=std)


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 NCHW images, in [0, 1] units.

    Computed exactly from a 256-bin histogram per channel, counted 65,536 pixels at a time:
    a dataset never needs a float copy, nor the int64 copy ``np.bincount`` makes of its input.
    """
    levels = np.arange(256, dtype=np.float64) / 255.0
    rows = max(1, 2**16 // max(1, x[0, 0].size))
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = sum(np.bincount(x[i:i + rows, c].reshape(-1), minlength=256)
                     for i in range(0, len(x), rows)).astype(np.float64)
        mean = float((counts * levels).sum() / counts.sum())
        var = float((counts * (levels - mean) ** 2).sum() / counts.sum())
        means.append(mean)
        # A constant channel would divide by zero when normalising; leave it unscaled.
        stds.append(math.sqrt(var) if var > 0 else 1.0)
    return tuple(means), tuple(stds)


# --------------------------------------------------------------------------- torchvision


def _from_torchvision(
    name: str, root: pathlib.Path, download: bool, val_size: int | None, seed: int
) -> Dataset:
    import torchvision.datasets as tvd

    if name == "svhn":
        train = _open_torchvision(tvd.SVHN, name, root, download, split="train")
        test = _open_torchvision(tvd.SVHN, name, root, download, split="test")
        # torchvision's SVHN arrays are already (N, C, H, W) and labels 0..9.
        return _build(
            name,
            np.ascontiguousarray(train.data),
            np.asarray(train.labels, dtype=np.int64),
            np.ascontiguousarray(test.data),
            np.asarray(test.labels, dtype=np.int64),
            [str(d) for d in range(10)],
            hflip=False,  # digits are not mirror-symmetric
            val_size=val_size,
            seed=seed,
        )
    if name == "fashion-mnist":
        root = _fashion_mnist_layout(root, download)
        train = _open_torchvision(tvd.FashionMNIST, name, root, download, train=True)
        test = _open_torchvision(tvd.FashionMNIST, name, root, download, train=False)
        return _build(name, train.data.numpy()[:, None], train.targets.numpy(), test.data.numpy()[:, None],
                      test.targets.numpy(), list(train.classes), hflip=True, val_size=val_size, seed=seed)
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    train = _open_torchvision(cls, name, root, download, train=True)
    test = _open_torchvision(cls, name, root, download, train=False)
    return _build(
        name,
        nhwc_to_nchw(train.data),
        np.asarray(train.targets, dtype=np.int64),
        nhwc_to_nchw(test.data),
        np.asarray(test.targets, dtype=np.int64),
        list(train.classes),
        hflip=True,
        val_size=val_size,
        seed=seed,
    )


def _open_torchvision(cls, name: str, root: pathlib.Path, download: bool, **split):
    """Instantiate a torchvision dataset, turning its missing-file errors into clear ones."""
    # torchvision raises RuntimeError for missing or corrupt files; a failed download
    # raises urllib's errors (OSError), or a TarError for a truncated archive.
    failures = (RuntimeError, OSError, tarfile.TarError) if download else (RuntimeError, FileNotFoundError)
    try:
        return cls(root=str(root), download=download, **split)
    except ImportError as err:  # SVHN reads .mat files with scipy
        raise ImportError(f"reading {name!r} needs scipy ({err}); install it: pip install scipy") from err
    except failures as err:
        raise DatasetNotFoundError(_not_found_message(cls, name, root, download, err)) from err


def _fashion_mnist_layout(root: pathlib.Path, download: bool) -> pathlib.Path:
    """The directory to give torchvision's ``FashionMNIST``: ``root`` when it holds the dataset in
    torchvision's layout (or a download goes there); else, where ``root`` (or, for the default
    ``root``, Debian's :data:`FASHION_MNIST_SYSTEM_DIR`) holds the four idx ``.gz`` files as
    distributed, the default data directory with them extracted there once (never into the
    directory they came from, which may be a system one)."""
    from torchvision.datasets import FashionMNIST

    names = [name.removesuffix(".gz") for name, _ in FashionMNIST.resources]
    if download or all((root / "FashionMNIST" / "raw" / n).is_file() for n in names):
        return root
    target = DEFAULT_DATA_DIR.expanduser()
    folders = [root] + ([FASHION_MNIST_SYSTEM_DIR] if root == target else [])
    source = next((f for f in folders if all((f / f"{n}.gz").is_file() for n in names)), None)
    if source is None:
        return root  # torchvision reports what is missing (_not_found_message)
    raw = target / "FashionMNIST" / "raw"
    if all((raw / n).is_file() for n in names):
        return target  # extracted before
    raw.mkdir(parents=True, exist_ok=True)
    print(f"aebnas: extracting Fashion-MNIST's idx files from {source} into {raw} (once)", flush=True)
    for n in names:
        # Into a temporary name first: an interrupted extraction never looks complete.
        part = raw / f"{n}.part"
        with gzip.open(source / f"{n}.gz", "rb") as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        part.replace(raw / n)
    return target


def _expected_files(cls, root: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    """(path, md5) of every file torchvision checks for ``cls`` under ``root``."""
    if hasattr(cls, "resources"):  # FashionMNIST: the extracted raw files (torchvision checks no md5)
        return [(root / cls.__name__ / "raw" / n.removesuffix(".gz"), None) for n, _ in cls.resources]
    if hasattr(cls, "split_list"):  # SVHN
        return [(root / cls.split_list[s][1], cls.split_list[s][2]) for s in ("train", "test")]
    folder = root / cls.base_folder
    files = [(folder / f, md5) for f, md5 in cls.train_list + cls.test_list]
    return files + [(folder / cls.meta["filename"], cls.meta["md5"])]


def _not_found_message(cls, name: str, root: pathlib.Path, download: bool, err: Exception) -> str:
    from torchvision.datasets.utils import check_integrity

    def status(path: pathlib.Path, md5: str) -> str:
        if not path.is_file():
            return "missing"
        return "ok" if check_integrity(str(path), md5) else "present, but its md5 checksum differs"

    looked_at = "\n".join(f"  {p} ({status(p, md5)})" for p, md5 in _expected_files(cls, root))
    if hasattr(cls, "resources"):  # FashionMNIST
        urls = [cls.mirrors[0] + "…"]
        looked_at += "".join(f"\n  {folder / n} ({status(folder / n, None)})"
                             for folder in dict.fromkeys((root, FASHION_MNIST_SYSTEM_DIR)) for n, _ in cls.resources)
    elif hasattr(cls, "split_list"):  # SVHN
        urls = [cls.split_list[s][0] for s in ("train", "test")]
    else:
        urls = [cls.url]
    by_hand = (
        f"put the files from {' and '.join(urls)} in torchvision's layout, "
        f"{_TORCHVISION_LAYOUT[name]}, and pass --data-dir DATA_DIR (data_dir=DATA_DIR)"
    )
    if name == "fashion-mnist":
        by_hand += (f"; on Debian or Ubuntu, apt-get install dataset-fashion-mnist puts them in "
                    f"{FASHION_MNIST_SYSTEM_DIR}, found there without --data-dir")
    if download:
        return (
            f"downloading dataset {name!r} into {root} failed ({type(err).__name__}: {err}). "
            f"Without network access, {by_hand}. Files looked at:\n{looked_at}"
        )
    return (
        f"dataset {name!r} not found in {root}. Files looked at:\n{looked_at}\n"
        f"Get it with --download (download=True), or {by_hand}."
    )


# --------------------------------------------------------------------------- folders of images


def _find_folder(name: str, data_dir: str | os.PathLike | None) -> pathlib.Path | None:
    """The folder ``name`` names (also looked for under ``data_dir`` when relative); None if it names none."""
    if name in DATASET_NAMES or str(name).lower().endswith(".npz"):
        return None
    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        return path
    if data_dir is not None and not path.is_absolute() and (pathlib.Path(data_dir).expanduser() / path).is_dir():
        return pathlib.Path(data_dir).expanduser() / path
    return None


def _from_folder(folder: pathlib.Path, name: str, image_size: int | None, test_size: float | None,
                 val_size: int | None, seed: int, log: Log) -> Dataset:
    """A folder's images split into train / validation / test as views of the one decoded array,
    reordered in place: the dataset never holds two copies of its images."""
    images = read_folder(folder, image_size, log)
    if images.test is not None and test_size is not None:
        raise FolderError(f"test_size={test_size!r}: {folder} has a test folder, which is the test split; "
                          "leave test_size out")
    test = images.test if images.test is not None else stratified_test_mask(images.y, test_size or DEFAULT_TEST_SIZE)
    untested = [c for k, c in enumerate(images.classes) if not (images.y[test] == k).any()]
    if untested and images.test is None:
        log(f"aebnas: warning: class(es) with a single image, which stays in training (none is tested): "
            f"{', '.join(untested[:10])}")
    full, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
    val_idx, train_idx = _validation_split(name, len(full), val_size, seed)
    order = np.concatenate([full[train_idx], full[val_idx], test_idx])
    x, y = _reorder_rows(images.x, order), images.y[order]
    a, b = len(train_idx), len(train_idx) + len(val_idx)
    return _assemble(name, (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:]), images.classes, hflip=True)


def _reorder_rows(x: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``x[order]`` for a permutation ``order``, made in place by following its cycles (one row of
    extra memory instead of a second array)."""
    done = np.zeros(len(order), dtype=bool)
    row = np.empty_like(x[:1])
    for start in np.flatnonzero(order != np.arange(len(order))):
        if done[start]:
            continue
        row[0] = x[start]
        i = start
        while order[i] != start:
            x[i] = x[order[i]]
            done[i] = True
            i = order[i]
        x[i] = row[0]
        done[i] = True
    return x


# --------------------------------------------------------------------------- .npz files


def _find_npz(name: str, data_dir: str | os.PathLike | None) -> pathlib.Path:
    path = pathlib.Path(name).expanduser()
    candidates = [path]
    if data_dir is not None and not path.is_absolute():
        candidates.append(pathlib.Path(data_dir).expanduser() / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked_at = ", ".join(str(c.resolve()) for c in candidates)
    raise DatasetNotFoundError(
        f"dataset file {name!r} not found; looked at: {looked_at}. Pass the path of an "
        "existing .npz file with keys x_train, y_train, x_test, y_test (optional classes); "
        "download=True / --download only applies to " + ", ".join(DATASET_NAMES[1:])
    )


def _from_npz(path: pathlib.Path, name: str, val_size: int | None, seed: int) -> Dataset:
    x_full, y_full, x_test, y_test, classes = read_npz_dataset(path)
    return _build(name, x_full, y_full, x_test, y_test, classes, True, val_size, seed)


def _as_tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``a`` as a CPU tensor sharing its memory when it is a numpy array (no copy)."""
    if isinstance(a, torch.Tensor):
        return a
    if not a.flags.c_contiguous:  # torch cannot wrap negative strides; splits are contiguous anyway
        a = np.ascontiguousarray(a)
    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only; nothing here writes to them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(a)
