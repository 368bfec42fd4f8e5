"""Pieces every space shares: the backbone and resolution samplers."""

from __future__ import annotations

from typing import Any

from aebnas.config import NUM_STAGES
from aebnas.space_values import SpaceValues


def choice(values: tuple) -> Any:
    """A categorical sampler, or the plain value when there is nothing to choose."""
    # Ray is loaded when a space is built, not when ``SPACES`` is imported: the space names are
    # read by commands that run without Ray (``aebnas supernet train --workers 0``, ``--help``).
    from ray import tune

    return values[0] if len(values) == 1 else tune.choice(list(values))


def backbone_space(values: SpaceValues) -> dict[str, Any]:
    """Samplers for every stage's depth and every block's kernel and expansion, and the resolution.

    Keys of blocks beyond the sampled depth are sampled too (Ray Tune samples keys
    independently) and ignored by ``ArchConfig.from_flat``.
    """
    space: dict[str, Any] = {"resolution": choice(values.resolutions)}
    for s in range(1, NUM_STAGES + 1):
        space[f"stage{s}_depth"] = choice(values.depths)
        for b in range(max(values.depths)):
            space[f"stage{s}_block{b}_kernel"] = choice(values.kernels)
            space[f"stage{s}_block{b}_expansion"] = choice(values.expansions)
    return space
