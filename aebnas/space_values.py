"""What each architectural choice may take: what the code can build, and a search space's value sets.

:data:`LIMITS` bounds every choice the builders in ``aebnas.nn`` can turn into layers;
:class:`SpaceValues` is one search space's value sets within them (the defaults: the AEBNAS
paper's space, :data:`PAPER_SPACE`). ``aebnas.config`` parses flat trial dicts against
either; ``search_spaces`` builds Ray Tune samplers from a ``SpaceValues``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

# An exit can follow stages 1…4 (stage 5 feeds the head).
EXIT_POSITIONS = (1, 2, 3, 4)
# What an exit branch can be: the paper's searched modules (``aebnas``) or EDANAS's fixed exit (``edanas``).
EXIT_BRANCHES = ("aebnas", "edanas")


class Allowed:
    """A set of allowed values with a readable description for error messages."""

    def __init__(self, values: Iterable[Any] | None = None, *, low: float | None = None,
                 high: float | None = None, integer: bool = True) -> None:
        self.values = tuple(values) if values is not None else None
        self.low, self.high, self.integer = low, high, integer

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if self.values is not None:
            return value in self.values
        if self.integer and not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            return False
        if not isinstance(value, (int, float)):
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def describe(self) -> str:
        if self.values is not None:
            return f"is not one of {self.values}"
        kind = "an integer" if self.integer else "a number"
        return f"is not {kind} in [{self.low}, {self.high}]"


@dataclass(frozen=True)
class SpaceValues:
    """Allowed value sets of every architectural choice.

    The defaults are the AEBNAS paper's search space; ``search_spaces`` builds Ray Tune
    samplers from an instance, and :data:`LIMITS` is what the code can build at all.

    An exit module (``exit_*``) resizes its input to ``resize × resize`` pixels
    (``exit_m1_resizes``, ``exit_m2_resizes``; a 0 among the second's means *no second
    module*, which is how a branch's depth is searched), then applies a strided convolution of
    one of ``exit_kernels`` that multiplies the channels by one of ``exit_expansions``, and a
    2×2 max pool when its ``exit_pools`` value is 1 (docs/design.md, "Exit branches").
    """

    depths: tuple[int, ...] = (2, 3, 4)
    kernels: tuple[int, ...] = (3, 5, 7)
    expansions: tuple[int, ...] = (3, 4, 6)
    resolutions: tuple[int, ...] = tuple(range(32, 73, 4))
    exit_positions: tuple[int, ...] = EXIT_POSITIONS
    exit_m1_resizes: tuple[int, ...] = (8, 10)
    exit_m2_resizes: tuple[int, ...] = (0, 8, 10)
    exit_kernels: tuple[int, ...] = (3, 5)
    exit_expansions: tuple[int, ...] = (1, 2)
    exit_pools: tuple[int, ...] = (0, 1)

    def __post_init__(self) -> None:
        # Each value set must itself be buildable; catching it here names the field.
        for name, allowed in LIMITS.items():
            values = getattr(self, name)
            if not values:
                raise ValueError(f"SpaceValues.{name} is empty")
            for v in values:
                if v not in allowed:
                    raise ValueError(f"SpaceValues.{name} contains {v!r}, which {allowed.describe()}")
        # A module's convolution has no padding: it needs at least kernel × kernel pixels.
        smallest = min(r for r in self.exit_m1_resizes + self.exit_m2_resizes if r > 0)
        if smallest < max(self.exit_kernels):
            raise ValueError(f"SpaceValues: exit resize {smallest} is smaller than exit kernel {max(self.exit_kernels)}; "
                             "an exit module's unpadded convolution needs resize >= kernel")


# What the code can build (odd kernels keep 'same' padding; tested resolutions 28…96).
LIMITS: dict[str, Allowed] = {
    "depths": Allowed(low=1, high=8),
    "kernels": Allowed((1, 3, 5, 7, 9)),
    "expansions": Allowed(low=1, high=8),
    "resolutions": Allowed(low=28, high=96),
    "exit_positions": Allowed(EXIT_POSITIONS),
    "exit_m1_resizes": Allowed(low=1, high=64),
    "exit_m2_resizes": Allowed(low=0, high=64),  # 0: no second module
    "exit_kernels": Allowed((1, 3, 5, 7, 9)),
    "exit_expansions": Allowed(low=1, high=8),
    "exit_pools": Allowed((0, 1)),
}

PAPER_SPACE = SpaceValues()

# Keywords a space function of ``search_spaces`` takes besides value sets: they shape the space, not a
# value set, so :func:`space_values_of` passes over them.
SPACE_OPTIONS = frozenset({"min_exits", "branch"})


def space_values(base: SpaceValues = PAPER_SPACE, **changes: Any) -> SpaceValues:
    """``base`` with some value sets replaced: the one way keywords become a :class:`SpaceValues`.

    Raises ValueError naming an unknown keyword or a value set the code cannot build.
    """
    unknown = sorted(set(changes) - set(SpaceValues.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown search-space keyword(s) {unknown}; allowed: "
                         f"{sorted(SpaceValues.__dataclass_fields__)}")
    return SpaceValues(**{**base.__dict__, **{k: tuple(v) for k, v in changes.items()}})


def space_values_of(space_kwargs: dict[str, Any]) -> SpaceValues:
    """The value sets a space's keyword arguments (an experiment's ``space_kwargs``) give, over the paper's.

    The space's own options (:data:`SPACE_OPTIONS`, e.g. ``min_exits``) are passed over; any other
    keyword that is not a value set is refused as in :func:`space_values`.
    """
    return space_values(PAPER_SPACE, **{k: v for k, v in space_kwargs.items() if k not in SPACE_OPTIONS})


__all__ = ["EXIT_BRANCHES", "EXIT_POSITIONS", "LIMITS", "PAPER_SPACE", "SPACE_OPTIONS", "Allowed", "SpaceValues", "space_values",
           "space_values_of"]
