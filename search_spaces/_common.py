"""Pieces every space shares: the backbone and resolution samplers."""

from __future__ import annotations

from typing import Any

from aebnas.config import NUM_STAGES, PAPER_SPACE, SpaceValues


def space_values(base: SpaceValues = PAPER_SPACE, **changes: Any) -> SpaceValues:
    """``base`` with some value sets replaced; raises ValueError naming a bad set or keyword."""
    unknown = sorted(set(changes) - set(SpaceValues.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown search-space keyword(s) {unknown}; allowed: "
                         f"{sorted(SpaceValues.__dataclass_fields__)}")
    return SpaceValues(**{**base.__dict__, **{k: tuple(v) for k, v in changes.items()}})


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
