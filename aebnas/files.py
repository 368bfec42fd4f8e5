"""Writing a file so that an interruption never leaves half of it: the one atomic-write rule.

Standard library only, so every module (the numpy-only ``exit_policy`` too) can use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], tmp_suffix: str = ".tmp") -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (its name plus ``tmp_suffix``), then rename it
    to ``path`` in one step; returns ``path``. ``tmp_suffix`` must keep an extension a writer insists on
    (``np.savez`` appends ``.npz`` to any other name)."""
    path = Path(path)
    tmp = path.with_name(path.name + tmp_suffix)
    write(tmp)
    os.replace(tmp, path)
    return path


__all__ = ["atomic_write"]
