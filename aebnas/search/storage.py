"""Where results live: a local directory or a storage URI, through the filesystem layer Ray Tune uses.

``filesystem(path)`` opens a local path or a URI (``s3://``, ``gs://``, ``file://`` …) with
``pyarrow.fs``, as Ray Tune does for ``storage_path``; the experiment's settings file
(``aebnas_experiment.json``) is written and read through it, so a search, its resume and
``aebnas retrain`` / ``analyze`` work the same on a laptop and on a cluster's bucket.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ..settings import EXPERIMENT_FILE


def resolve_storage_path(storage_path: str) -> str:
    """Absolute local path (Ray needs one) or the URI unchanged (s3://, gs://, …)."""
    if "://" in storage_path:
        return storage_path
    return str(Path(storage_path).expanduser().resolve())


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The ``pyarrow.fs`` file system of a local path or a storage URI (as Ray Tune opens it), and the
    path inside it."""
    if "://" in path:
        fs, inside = pafs.FileSystem.from_uri(path)
        return fs, inside.rstrip("/") or "/"
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def write_experiment_settings(path: str, exp: Any) -> None:
    """Write ``exp`` as ``aebnas_experiment.json`` into the experiment directory ``path`` (a local
    path or a storage URI such as ``s3://bucket/results/name``), creating the directory."""
    fs, root = filesystem(path)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{EXPERIMENT_FILE}") as f:
        f.write(json.dumps(exp.to_json(), indent=1).encode())


def read_experiment_settings(path: str) -> dict[str, Any]:
    """The settings saved in the experiment directory ``path`` (local path or storage URI) as a
    ``to_json`` dict; FileNotFoundError when it holds no ``aebnas_experiment.json``."""
    fs, root = filesystem(path)
    file = f"{root}/{EXPERIMENT_FILE}"
    if fs.get_file_info(file).type != pafs.FileType.File:
        raise FileNotFoundError(f"no {EXPERIMENT_FILE} in {path}")
    with fs.open_input_stream(file) as f:
        return json.loads(f.read().decode("utf-8"))


def is_empty(path: str) -> bool:
    """True when the directory ``path`` (local or URI) is missing or empty."""
    fs, root = filesystem(path)
    return not fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
