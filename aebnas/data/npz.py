"""A user's dataset file (``--dataset my.npz``): its arrays read and checked, with errors that
name the file, the key and what was expected.

The file holds ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 images NHWC, or NHW for
grayscale; integer labels 0…K−1) and optionally ``classes`` (the class names). Nothing is
unpickled: an array of Python objects is refused.
"""

from __future__ import annotations

import pathlib

import numpy as np

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def nhwc_to_nchw(images: np.ndarray) -> np.ndarray:
    """``images`` (N, H, W, C) as a contiguous (N, C, H, W) array."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def read_npz_dataset(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(x_train NCHW uint8, y_train int64, x_test, y_test, class names) of the file at ``path``;
    ValueError naming the problem if the file is not such a dataset."""
    arrays = _read_npz(path)
    x_full = _npz_images(path, "x_train", arrays["x_train"])
    x_test = _npz_images(path, "x_test", arrays["x_test"])
    if x_full.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{path}: x_test images have shape (C, H, W)={tuple(x_test.shape[1:])} but "
            f"x_train images have {tuple(x_full.shape[1:])}; expected the same shape"
        )
    y_full = _npz_labels(path, "y_train", arrays["y_train"], len(x_full))
    y_test = _npz_labels(path, "y_test", arrays["y_test"], len(x_test))
    if "classes" in arrays:
        classes = _npz_classes(path, arrays["classes"])
    else:
        classes = _classes_from_labels(path, y_full, y_test)
    for key, y in (("y_train", y_full), ("y_test", y_test)):
        if int(y.max()) >= len(classes):
            raise ValueError(
                f"{path}: {key} has label {int(y.max())} but 'classes' lists "
                f"{len(classes)} names; expected labels in 0..{len(classes) - 1}"
            )
    return x_full, y_full, x_test, y_test, classes


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # np.load raises several types for a file that is not .npz
        raise ValueError(f"{path}: cannot be read as an .npz archive ({err})") from err
    with archive:
        if not hasattr(archive, "files"):
            raise ValueError(f"{path}: holds a single array; expected an .npz archive with keys {NPZ_KEYS}")
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise ValueError(
                f"{path}: missing key(s) {', '.join(missing)}; found {sorted(archive.files)}; "
                f"expected {', '.join(NPZ_KEYS)} (and optionally classes)"
            )
        arrays = {}
        for key in (*NPZ_KEYS, "classes"):
            if key not in archive.files:
                continue
            try:
                arrays[key] = archive[key]
            except ValueError as err:  # object arrays need pickle, which is never allowed here
                raise ValueError(
                    f"{path}: key {key} holds Python objects ({err}); expected a plain numpy array"
                ) from err
        return arrays


def _npz_images(path: pathlib.Path, key: str, x: np.ndarray) -> np.ndarray:
    """Validate images stored as NHWC (C in {1, 3}) or NHW; return NCHW uint8."""
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"{path}: {key} has dtype {x.dtype}; expected uint8 pixels (0..255)")
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(
                f"{path}: {key} has dtype {x.dtype} with values in {x.min()}..{x.max()}; "
                "expected uint8 pixels (0..255)"
            )
        x = x.astype(np.uint8)
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim != 4 or x.shape[-1] not in (1, 3):
        hint = " (it looks like NCHW; store NHWC)" if x.ndim == 4 and x.shape[1] in (1, 3) else ""
        raise ValueError(
            f"{path}: {key} has shape {x.shape}{hint}; expected (N, H, W, C) with C in (1, 3) "
            "or (N, H, W) for grayscale"
        )
    if len(x) == 0:
        raise ValueError(f"{path}: {key} has no images; expected at least one")
    return nhwc_to_nchw(x)


def _npz_labels(path: pathlib.Path, key: str, y: np.ndarray, n_images: int) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: {key} has dtype {y.dtype}; expected integer class labels")
    if y.ndim != 1:
        raise ValueError(f"{path}: {key} has shape {y.shape}; expected 1-D (N,)")
    x_key = "x" + key[1:]
    if len(y) != n_images:
        raise ValueError(f"{path}: {key} has {len(y)} labels but {x_key} has {n_images} images; expected equal")
    if y.min() < 0:
        raise ValueError(f"{path}: {key} has negative label {y.min()}; expected labels >= 0")
    return y.astype(np.int64)


def _classes_from_labels(path: pathlib.Path, y_train: np.ndarray, y_test: np.ndarray) -> list[str]:
    """Class names "0".."K-1" for a file without a classes key; every id must occur in y_train.

    Without names, every id up to the largest label becomes a class: an id no training
    image has is almost always a labelling mistake (1-based labels, a class dropped), and
    it would add a class the network can never learn.
    """
    top = int(max(y_train.max(), y_test.max()))
    unused = np.flatnonzero(np.bincount(y_train, minlength=top + 1) == 0)
    if len(unused):
        shown = ", ".join(str(i) for i in unused[:10]) + (f", … ({len(unused)} ids)" if len(unused) > 10 else "")
        hint = "The labels look 1-based: subtract 1. " if unused.tolist() == [0] else ""
        raise ValueError(
            f"{path}: y_train never uses label(s) {shown} of 0..{top}; without a 'classes' key every id "
            f"in 0..{top} becomes a class. {hint}Renumber the labels to 0..K-1, or add a 'classes' key "
            "naming every class (then a class may be absent from the training split)"
        )
    return [str(i) for i in range(top + 1)]


def _npz_classes(path: pathlib.Path, classes: np.ndarray) -> list[str]:
    if classes.ndim != 1 or classes.dtype.kind not in "US" or len(classes) == 0:
        raise ValueError(
            f"{path}: classes has dtype {classes.dtype} and shape {classes.shape}; "
            "expected a non-empty 1-D array of class names (strings)"
        )
    return [c.decode() if isinstance(c, bytes) else str(c) for c in classes.tolist()]
