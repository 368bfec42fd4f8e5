"""Decoded image folders kept on disk, so a second run starts at once and a changed folder is read again.

A folder's decoded arrays are stored as ``.npy`` files in one directory under :func:`cache_dir`
(``$AEBNAS_CACHE_DIR``, else ``~/.cache/aebnas/image-folders``), named by the folder and the asked
image size, and keyed by everything that could change what decoding gives: every file's path, size
and modification time, the stored size asked for and :data:`CACHE_VERSION`. A file added, removed, rewritten or
touched gives another key, so the folder is decoded again and the old entry replaced. ``.npy``
files are written from and read into memory directly (an ``.npz`` is written through 16 MiB
copies); nothing is unpickled.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np

CACHE_VERSION = 1  # raise when decoding changes what it gives for the same files
CACHE_ENV = "AEBNAS_CACHE_DIR"
_KEY_CHARS = 32  # an entry's name ends in 32 hex digits of its key
RECORD = "record.json"  # in an entry: the decoding's record and the names of its arrays


def cache_dir() -> Path:
    """Where decoded folders are kept: ``$AEBNAS_CACHE_DIR``, else ``~/.cache/aebnas/image-folders``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/aebnas/image-folders").expanduser()


def cache_path(root: Path, image_size: int | None, files: Iterable[tuple[str, int, int]]) -> Path:
    """The cache entry (a directory) of folder ``root`` decoded at ``image_size`` (None: the default size)
    with ``files`` as (path, bytes, mtime in ns) in path order."""
    digest = hashlib.sha256(f"{CACHE_VERSION}\0{image_size}\n".encode())
    for path, size, mtime in files:
        digest.update(f"{path}\0{size}\0{mtime}\n".encode())
    return cache_dir() / f"{_prefix(root, image_size)}{digest.hexdigest()[:_KEY_CHARS]}"


def _prefix(root: Path, image_size: int | None) -> str:
    """The part of an entry's name that names the folder and the size asked for (not the files)."""
    return f"{root.name[:40]}-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}-{image_size or 'auto'}-"


def read_cache(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays and the record stored in the entry ``path``; None when there is none (or it cannot be read)."""
    try:
        record = json.loads((path / RECORD).read_text())
        arrays = {name: np.load(path / f"{name}.npy", allow_pickle=False) for name in record["arrays"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, or damaged: decoded again
    return arrays, record


def write_cache(path: Path, arrays: dict[str, np.ndarray], record: dict[str, Any]) -> str | None:
    """Store ``arrays`` (one ``.npy`` each, written straight from memory: no copy) and ``record`` in the
    entry ``path``, made whole under a temporary name and renamed, and remove older entries of the same
    folder and size; returns why it could not (the cache is a convenience: a run goes on without it)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
        (tmp / RECORD).write_text(json.dumps({**record, "arrays": list(arrays)}))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        for old in path.parent.glob(glob.escape(path.name[:-_KEY_CHARS]) + "*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"{type(err).__name__}: {err}"
    return None
