"""The AEBNAS paper's space: backbone, resolution, and per exit its existence and branch.

Each existing exit has the paper's branch (``exit{i}_branch="aebnas"``): one or two modules, each a
resize to ``exit{i}_m{1,2}_resize`` pixels and a strided convolution (docs/design.md). Branch depth is
searched through ``exit{i}_m2_resize``: 0 means no second module. At
least ``min_exits`` exits exist: a sample enabling fewer is repaired by
``ArchConfig.from_flat``, which enables the deepest disabled positions (documented there).
"""

from __future__ import annotations

from typing import Any

from aebnas.config import PAPER_SPACE, SpaceValues

from aebnas.space_values import space_values

from ._common import backbone_space, choice


def aebnas_space(values: SpaceValues = PAPER_SPACE, *, min_exits: int = 1, **changes: Any) -> dict[str, Any]:
    """Param space of the paper; keyword arguments replace value sets of ``values``.

    E.g. ``aebnas_space(resolutions=(32, 40), exit_positions=(2, 3), exit_m2_resizes=(0,))``.
    Returns a flat dict of ``ray.tune`` samplers (and fixed values).
    """
    values = space_values(values, **changes)
    if not 0 <= min_exits <= len(values.exit_positions):
        raise ValueError(f"min_exits={min_exits} is not in [0, {len(values.exit_positions)}] "
                         f"(exit_positions={values.exit_positions})")
    space = backbone_space(values)
    space["min_exits"] = min_exits
    for i in values.exit_positions:
        space[f"exit{i}_enabled"] = choice((True, False))
        space[f"exit{i}_branch"] = "aebnas"
        for m, resizes in ((1, values.exit_m1_resizes), (2, values.exit_m2_resizes)):
            space[f"exit{i}_m{m}_resize"] = choice(resizes)
            space[f"exit{i}_m{m}_kernel"] = choice(values.exit_kernels)
            space[f"exit{i}_m{m}_expansion"] = choice(values.exit_expansions)
            space[f"exit{i}_m{m}_pool"] = choice(values.exit_pools)
    return space
