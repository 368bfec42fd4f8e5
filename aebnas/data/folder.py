"""A folder of images in class subfolders as a dataset: the layout torchvision's ``ImageFolder``,
Keras' ``image_dataset_from_directory`` and Hugging Face's ``imagefolder`` read.

``DIR/<class>/<images>`` (a test split is then drawn, seeded and stratified, :func:`stratified_test_mask`), or
``DIR/train/<class>/`` with ``DIR/test/<class>/``. Classes are the folder names sorted as
``ImageFolder`` sorts them (``torchvision.datasets.folder.find_classes``); an image is any file
with one of ``ImageFolder``'s extensions, found at any depth in its class folder; hidden files
and folders (``.DS_Store``, ``.ipynb_checkpoints``) are not read. Files are taken in path order,
so nothing depends on the order the file system lists them in.

What is wrong with a folder is a :class:`FolderError` naming the files (an empty class folder,
a single class, a test class the training split lacks, no class folders at all), or a warning
line when the data is still usable (images loose beside the class folders, files that are not
images by their extension, files Pillow cannot decode: these are skipped, and the line says so).
Decoding (:mod:`aebnas.data.images`) happens once per folder content: :mod:`aebnas.data.cache`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ..progress import Log, duration
from .cache import cache_path, read_cache, write_cache
from .images import decode_images, default_size

DEFAULT_TEST_SIZE = 0.2
"""Fraction of each class drawn as the test split when the folder has no ``test`` folder."""
TEST_SPLIT_SEED = 0
"""Seed of that draw: fixed, so searches with any ``--seed`` are tested on the same images."""
IMAGE_SIZES = (8, 1024)  # the stored sizes --image-size accepts, in pixels


def image_extensions() -> tuple[str, ...]:
    """The file extensions ``ImageFolder`` reads (lower case, with the dot)."""
    # imported here: torchvision.datasets takes a second to import, and most commands never read a folder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


class FolderError(ValueError):
    """A folder that cannot be read as a dataset; the message names the files and what to do."""


def named(items: list[str], limit: int = 10) -> str:
    """``items`` as a short list for a message: the first ``limit`` and how many there are in all."""
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items)} in all)" if len(items) > limit else "")


@dataclass
class Listing:
    """The image files of a folder: paths relative to ``root`` in path order (training files first),
    their labels, bytes and modification times; ``test`` marks the files of ``root/test`` (None
    without a test folder); ``notes`` are the warnings about what is not read."""

    root: Path
    classes: list[str]
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    stats: list[tuple[int, int]] = field(default_factory=list)
    test: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    def files(self) -> list[tuple[str, int, int]]:
        """(path, bytes, mtime in ns) of every file, the cache's key."""
        return [(p, s, m) for p, (s, m) in zip(self.paths, self.stats)]


def list_folder(root: Path) -> Listing:
    """The image files of ``root`` in either layout; FolderError for a folder that is no dataset."""
    if not root.is_dir():
        raise FolderError(f"{root} is not a directory")
    dirs, loose = _entries(root)
    if "train" in dirs and _holds_classes(root / "train"):
        return _split_layout(root, dirs, loose)
    listing = Listing(root, _classes(root, root))
    listing.notes += _loose_notes(root, loose, "beside the class folders")
    _add_split(listing, root, "")
    return listing


def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """Names of the visible folders and files directly in ``folder``, sorted."""
    dirs, files = [], []
    with os.scandir(folder) as it:
        for entry in it:
            if not entry.name.startswith("."):
                (dirs if entry.is_dir() else files).append(entry.name)
    return sorted(dirs), sorted(files)


def _holds_classes(folder: Path) -> bool:
    """Whether ``folder`` holds class folders and no image of its own: ``DIR/train/<class>/``, not a class
    that happens to be named "train" (a dataset of vehicles) with its images in it."""
    dirs, files = _entries(folder)
    return bool(dirs) and not any(f.lower().endswith(image_extensions()) for f in files)


def _classes(root: Path, folder: Path) -> list[str]:
    """The class folders of ``folder`` sorted by name as ``ImageFolder`` sorts them (hidden ones left out)."""
    from torchvision.datasets.folder import find_classes

    try:
        classes = [c for c in find_classes(str(folder))[0] if not c.startswith(".")]
    except FileNotFoundError:
        classes = []
    if not classes:
        images = [f for f in _entries(folder)[1] if f.lower().endswith(image_extensions())]
        held = f"holds {len(images)} image(s) but no class folders" if images else "holds no class folders"
        raise FolderError(f"{folder} {held}: put each class's images in a folder of its own, "
                          f"{folder}/<class>/<image> (or {root}/train/<class>/ and {root}/test/<class>/)")
    return classes


def _split_layout(root: Path, dirs: list[str], loose: list[str]) -> Listing:
    """``root/train/<class>/`` and, when there, ``root/test/<class>/``."""
    listing = Listing(root, _classes(root, root / "train"))
    others = [d + "/" for d in dirs if d not in ("train", "test")]
    listing.notes += _loose_notes(root, loose + others, "beside train/ and test/ (validation is drawn from train/)")
    _add_split(listing, root, "train/")
    if "test" not in dirs:
        return listing
    n_train = len(listing.paths)
    extra = sorted(set(_classes(root, root / "test")) - set(listing.classes))
    if extra:
        raise FolderError(f"{root / 'test'} has class folder(s) that {root / 'train'} lacks: {named(extra)}; the "
                          "network can only learn the classes it is trained on: add them to train/ or remove them")
    _add_split(listing, root, "test/")
    listing.test = np.arange(len(listing.paths)) >= n_train
    missing = sorted(set(listing.classes) - {listing.classes[y] for y in listing.labels[n_train:]})
    if missing:
        listing.notes.append(f"{root / 'test'} has no images of class(es) {named(missing)}: they are trained on "
                             "but never tested")
    return listing


def _add_split(listing: Listing, root: Path, split: str) -> None:
    """Append the image files of ``root/split<class>/`` for every class folder that ``split`` holds."""
    empty, ignored = [], []
    for label, name in enumerate(listing.classes):
        folder = root / split / name
        if split == "test/" and not folder.is_dir():
            continue
        found = _images_in(folder, f"{split}{name}/", ignored)
        if not found:
            empty.append(f"{folder}")
        for rel, stat in found:
            listing.paths.append(rel)
            listing.labels.append(label)
            listing.stats.append(stat)
    if ignored:
        listing.notes.append(f"not read, not image files by their extension ({', '.join(image_extensions())}): "
                             f"{named(ignored)}")
    if empty:
        raise FolderError(f"class folder(s) with no image: {named(empty)}; a class needs images to be learnt and "
                          "tested: add images or remove the folder")
    if split != "test/" and len(listing.classes) < 2:
        raise FolderError(f"{root / split} has one class only ({listing.classes[0]}); a classifier needs at least "
                          "two class folders")


def _images_in(folder: Path, prefix: str, ignored: list[str]) -> list[tuple[str, tuple[int, int]]]:
    """(path relative to the dataset, (bytes, mtime ns)) of the images in ``folder`` at any depth, in
    path order; the visible files that are not images by extension are appended to ``ignored``."""
    found, extensions = [], image_extensions()
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(here).relative_to(folder).as_posix()
        sub = prefix if rel == "." else f"{prefix}{rel}/"
        for name in sorted(files):
            if name.startswith("."):
                continue
            if not name.lower().endswith(extensions):
                ignored.append(sub + name)
                continue
            st = os.stat(os.path.join(here, name))
            found.append((sub + name, (st.st_size, st.st_mtime_ns)))
    found.sort()
    return found


def _loose_notes(root: Path, loose: list[str], where: str) -> list[str]:
    """The warning about files (and folders) at the top level of ``root`` that are not read."""
    if not loose:
        return []
    return [f"not read, at the top level of {root} {where}: {named(loose)}; an image is read only inside a "
            "class folder"]


@dataclass
class FolderImages:
    """A folder decoded: ``x`` uint8 (N, C, size, size), ``y`` int64, ``test`` marks the images of
    ``root/test`` (None without a test folder), ``classes`` by label."""

    x: np.ndarray
    y: np.ndarray
    test: np.ndarray | None
    classes: list[str]


def read_folder(root: str | os.PathLike, image_size: int | None, log: Log) -> FolderImages:
    """The images of folder ``root`` at ``image_size`` px (None: :func:`aebnas.data.images.default_size`),
    from the cache when the folder has not changed since it was decoded, else decoded (and cached)."""
    root = Path(root).expanduser().resolve()
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or not IMAGE_SIZES[0] <= image_size <= IMAGE_SIZES[1]):
        raise FolderError(f"image_size={image_size!r} must be an integer from {IMAGE_SIZES[0]} to {IMAGE_SIZES[1]} "
                          "(pixels; None: from the images)")
    listing = list_folder(root)
    for note in listing.notes:
        log(f"aebnas: warning: {note}")
    path = cache_path(root, image_size, listing.files())
    cached = read_cache(path)
    if cached is None:
        arrays, record = _decode(listing, image_size, log)
        trouble = write_cache(path, arrays, record)
        log(f"aebnas: decoded {len(arrays['x'])} images of {root} in {duration(record['seconds'])}; "
            + (f"not cached ({trouble})" if trouble else f"cached in {path}, so the next run starts at once"))
    else:
        arrays, record = cached
        log(f"aebnas: {len(arrays['x'])} decoded images of {root} read from {path} (the folder is unchanged)")
    return _checked(listing, arrays, record, log)


def _decode(listing: Listing, image_size: int | None, log: Log) -> tuple[dict[str, np.ndarray], dict]:
    """Decode the listed files; the arrays and the record the cache keeps (the size chosen and why,
    the files that failed)."""
    start = time.perf_counter()
    if image_size is None:
        size, why = default_size(listing.root, listing.paths)
    else:
        size, why = image_size, "--image-size (image_size)"
    log(f"aebnas: decoding {len(listing.paths)} images of {listing.root} at {size}x{size} px ...")
    decoded = decode_images(listing.root, listing.paths, size, log)
    test = listing.test if listing.test is not None else np.zeros(len(listing.paths), dtype=bool)
    arrays = {"x": decoded.x, "y": np.asarray(listing.labels, dtype=np.int64)[decoded.ok], "test": test[decoded.ok]}
    record = {"size": size, "why": why, "failed": decoded.failed, "seconds": time.perf_counter() - start}
    return arrays, record


def _checked(listing: Listing, arrays: dict[str, np.ndarray], record: dict, log: Log) -> FolderImages:
    """The decoded folder, after saying what was skipped and how it is stored; FolderError when skipping
    left a class without training images."""
    root, x, y = listing.root, arrays["x"], arrays["y"]
    if record["failed"]:
        log(f"aebnas: warning: skipped {len(record['failed'])} file(s) Pillow cannot decode (not an image, "
            f"or truncated), left out of the dataset: {named([f'{p} ({why})' for p, why in record['failed']], 5)}")
    train = ~arrays["test"]
    lost = [c for k, c in enumerate(listing.classes) if not (y[train] == k).any()]
    if lost:
        raise FolderError(f"stopping: no image of class(es) {named(lost)} in {root} could be decoded (see the "
                          "files named above); fix or remove them")
    channels = "1 channel (every image is grayscale)" if x.shape[1] == 1 else "3 channels (RGB)"
    log(f"aebnas: images stored at {record['size']}x{record['size']} px, {channels}: {record['why']}; "
        "--image-size sets another size")
    return FolderImages(x, y, arrays["test"] if listing.test is not None else None, list(listing.classes))


def stratified_test_mask(y: np.ndarray, test_size: float, seed: int = TEST_SPLIT_SEED) -> np.ndarray:
    """Which images form the test split: ``test_size`` of each class (at least one of a class with two
    or more images, never all), drawn by a permutation seeded with ``seed``."""
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)) or not 0 < test_size < 1:
        raise FolderError(f"test_size={test_size!r} must be a fraction between 0 and 1 (of each class's images)")
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    for k in range(int(y.max()) + 1):
        members = np.flatnonzero(y == k)
        n = len(members)
        take = min(max(1, round(test_size * n)), n - 1) if n >= 2 else 0
        mask[members[rng.permutation(n)[:take]]] = True
    return mask
