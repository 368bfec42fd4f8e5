"""EDANAS/NACHOS-like space: exits on or off and the backbone searched, one fixed branch.

Every existing exit gets the same branch, ``branch`` (default: one module with 10
channels, 3×3 depthwise, no expansion, 2×2 pooling), so only positions, thresholds and
the backbone are searched — the baseline AEBNAS is compared against.
"""

from __future__ import annotations

from typing import Any

from aebnas.config import PAPER_SPACE, ExitModuleConfig, SpaceValues

from aebnas.space_values import space_values

from ._common import backbone_space, choice

DEFAULT_BRANCH = ExitModuleConfig(channels=10, kernel=3, expansion=1, pool=1)


def fixed_exits_space(values: SpaceValues = PAPER_SPACE, *, branch: ExitModuleConfig = DEFAULT_BRANCH,
                      min_exits: int = 1, **changes: Any) -> dict[str, Any]:
    """Param space with searched exit positions and one fixed branch architecture."""
    values = space_values(values, **changes)
    if not 0 <= min_exits <= len(values.exit_positions):
        raise ValueError(f"min_exits={min_exits} is not in [0, {len(values.exit_positions)}]")
    space = backbone_space(values)
    space["min_exits"] = min_exits
    for i in values.exit_positions:
        space[f"exit{i}_enabled"] = choice((True, False))
        for name in ("channels", "kernel", "expansion", "pool"):
            space[f"exit{i}_m1_{name}"] = getattr(branch, name)
        space[f"exit{i}_m2_channels"] = 0
    return space
