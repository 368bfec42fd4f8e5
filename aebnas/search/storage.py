"""Where results live: a local directory or a storage URI, through the filesystem layer Ray Tune uses.

``filesystem(path)`` opens a local path or a URI (``s3://``, ``gs://``, ``file://`` …) with
``pyarrow.fs``, as Ray Tune does for ``storage_path``; the experiment's settings file
(``aebnas_experiment.json``) is written and read through it, so a search, its resume and
``aebnas retrain`` / ``analyze`` work the same on a laptop and on a cluster's bucket. ``Location`` is
a directory or file there, read the same way whatever holds it.
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


class Location:
    """A directory on a local disk or behind a storage URI, read through ``pyarrow.fs``."""

    def __init__(self, location: str | Path) -> None:
        text = str(location)
        self.fs, self.path = filesystem(text)
        self.scheme = text.split("://", 1)[0] if "://" in text else ""
        self.query = "?" + text.split("?", 1)[1] if self.scheme and "?" in text else ""  # e.g. ?region=… for s3

    def child(self, *parts: str) -> "Location":
        out = object.__new__(Location)
        out.fs, out.scheme, out.query = self.fs, self.scheme, self.query
        out.path = "/".join([self.path.rstrip("/"), *parts])
        return out

    @property
    def url(self) -> str:
        """What a user (and :func:`read_bytes`) can open: a local path or a URI."""
        return f"{self.scheme}://{self.path}{self.query}" if self.scheme else self.path

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8", errors="replace")

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def list(self) -> list[tuple[str, bool]]:
        """(name, is_dir) of every entry, sorted by name."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((i.base_name, i.type == pafs.FileType.Directory) for i in infos)


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
