"""EDANAS/NACHOS-like space: exits on or off and the backbone searched, one fixed branch.

Every existing exit gets the same branch: by default EDANAS's exit (``exit{i}_branch="edanas"``: 1×1
conv C → 6C, global pooling, 1×1 conv 6C → 8C, linear; docs/design.md), or, with ``branch=``, one
fixed module of the paper's. Only positions, thresholds and the backbone are searched: the baseline
AEBNAS is compared against.
"""

from __future__ import annotations

from typing import Any

from aebnas.config import MODULE_FIELDS, PAPER_SPACE, ExitModuleConfig, SpaceValues

from aebnas.space_values import space_values

from ._common import backbone_space, choice


def fixed_exits_space(values: SpaceValues = PAPER_SPACE, *, branch: ExitModuleConfig | None = None,
                      min_exits: int = 1, **changes: Any) -> dict[str, Any]:
    """Param space with searched exit positions and one fixed branch: EDANAS's exit, or ``branch`` (one
    module of the paper's, e.g. ``ExitModuleConfig(resize=8, kernel=3, expansion=1, pool=1)``)."""
    values = space_values(values, **changes)
    if not 0 <= min_exits <= len(values.exit_positions):
        raise ValueError(f"min_exits={min_exits} is not in [0, {len(values.exit_positions)}]")
    if branch is not None and not isinstance(branch, ExitModuleConfig):
        raise TypeError(f"branch must be an ExitModuleConfig or None (EDANAS's exit), got {branch!r}")
    space = backbone_space(values)
    space["min_exits"] = min_exits
    for i in values.exit_positions:
        space[f"exit{i}_enabled"] = choice((True, False))
        space[f"exit{i}_branch"] = "edanas" if branch is None else "aebnas"
        if branch is not None:
            for name in MODULE_FIELDS:
                space[f"exit{i}_m1_{name}"] = getattr(branch, name)
            space[f"exit{i}_m2_resize"] = 0
    return space
