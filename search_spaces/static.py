"""A static network: the same backbone space, no exits (the final classifier only)."""

from __future__ import annotations

from typing import Any

from aebnas.config import EXIT_POSITIONS, PAPER_SPACE, SpaceValues

from aebnas.space_values import space_values

from ._common import backbone_space


def static_space(values: SpaceValues = PAPER_SPACE, **changes: Any) -> dict[str, Any]:
    """Param space of the backbone and resolution only; every exit disabled."""
    space = backbone_space(space_values(values, **changes))
    space.update({f"exit{i}_enabled": False for i in EXIT_POSITIONS})
    return space
