"""Ray Tune param spaces of early-exit networks (flat dicts of ``ray.tune`` samplers).

``aebnas``: the paper's space (backbone, resolution, every exit's existence and branch);
``fixed_exits``: EDANAS/NACHOS-like (exits on/off, one fixed branch architecture);
``static``: no exits. ``SPACES`` maps the names the CLI accepts to the functions.
"""

from .aebnas import aebnas_space
from .fixed_exits import fixed_exits_space
from .static import static_space

SPACES = {"aebnas": aebnas_space, "fixed_exits": fixed_exits_space, "static": static_space}

__all__ = ["aebnas_space", "fixed_exits_space", "static_space", "SPACES"]
