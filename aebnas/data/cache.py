"""Decoded image folders kept on disk, so a second run starts at once and a changed folder is read again.

A folder's decoded arrays are stored in one ``.npz`` under :func:`cache_dir` (``$AEBNAS_CACHE_DIR``,
else ``~/.cache/aebnas/image-folders``), named by the folder and the asked image size, and keyed
by everything that could change what decoding gives: every file's path, size and modification
time, the stored size asked for and :data:`CACHE_VERSION`. A file added, removed, rewritten or
touched gives another key, so the folder is decoded again and the old entry replaced. Nothing is
unpickled: the record's text is a JSON string.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..files import atomic_write

CACHE_VERSION = 1  # raise when decoding changes what it gives for the same files
CACHE_ENV = "AEBNAS_CACHE_DIR"
_KEY_CHARS = 36  # a cache file's name ends in 32 hex digits of its key and ".npz"


def cache_dir() -> Path:
    """Where decoded folders are kept: ``$AEBNAS_CACHE_DIR``, else ``~/.cache/aebnas/image-folders``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/aebnas/image-folders").expanduser()


def cache_path(root: Path, image_size: int | None, files: Iterable[tuple[str, int, int]]) -> Path:
    """The cache file of folder ``root`` decoded at ``image_size`` (None: the default size) with
    ``files`` as (path, bytes, mtime in ns) in path order."""
    digest = hashlib.sha256(f"{CACHE_VERSION}\0{image_size}\n".encode())
    for path, size, mtime in files:
        digest.update(f"{path}\0{size}\0{mtime}\n".encode())
    return cache_dir() / f"{_prefix(root, image_size)}{digest.hexdigest()[:_KEY_CHARS - 4]}.npz"


def _prefix(root: Path, image_size: int | None) -> str:
    """The part of a cache file's name that names the folder and the size asked for (not the files)."""
    return f"{root.name[:40]}-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}-{image_size or 'auto'}-"


def read_cache(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays and the record stored at ``path``; None when there is none (or it cannot be read)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
        return arrays, json.loads(str(arrays.pop("record")))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # a damaged entry is decoded again


def write_cache(path: Path, arrays: dict[str, np.ndarray], record: dict[str, Any]) -> str | None:
    """Store ``arrays`` and ``record`` at ``path`` and remove older entries of the same folder and size;
    returns why it could not (the cache is a convenience: a run goes on without it), else None."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: np.savez(tmp, record=np.array(json.dumps(record)), **arrays),
                     tmp_suffix=".tmp.npz")
        for old in path.parent.glob(glob.escape(path.name[:-_KEY_CHARS]) + "*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None
