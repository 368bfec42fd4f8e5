"""aebnas/files.py: a file is replaced whole or not at all."""

import numpy as np
import pytest

from aebnas.files import atomic_write


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    assert atomic_write(path, lambda tmp: tmp.write_text("new")) == path
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, fail)
    assert path.read_text() == "old"


def test_a_suffix_the_writer_insists_on(tmp_path):
    path = tmp_path / "outputs.npz"
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, a=np.arange(3)), tmp_suffix=".tmp.npz")
    assert np.load(path)["a"].tolist() == [0, 1, 2] and sorted(p.name for p in tmp_path.iterdir()) == ["outputs.npz"]
