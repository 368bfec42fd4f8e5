"""What a candidate network *is*: the architecture as plain dataclasses.

Ray Tune hands each trial a flat dict of plain values (``stage2_depth``,
``exit1_m2_channels``, ``resolution`` …). :meth:`ArchConfig.from_flat` is the only parser
of that dict and :meth:`ArchConfig.to_flat` its inverse.

The whole network is data, as torchvision's ``InvertedResidualConfig`` rows: an
``ArchConfig`` gives a :class:`StemRow`, a :class:`BlockRow` per inverted residual, an
:class:`ExitRow` per exit branch and a :class:`HeadRow`, with every width and stride worked
out; ``aebnas.nn`` only turns rows into layers. The allowed values of each choice live in
``aebnas.space_values``.

Flat keys (``s`` = stage 1…5, ``b`` = block 0…depth-1, ``i`` = exit position 1…4)::

    resolution, width_mult, num_classes, in_channels, min_exits
    stage{s}_depth, stage{s}_block{b}_kernel, stage{s}_block{b}_expansion
    exit{i}_enabled, exit{i}_m1_{channels,kernel,expansion,pool},
    exit{i}_m2_{channels,kernel,expansion,pool}   (m2_channels = 0: no second module)

Keys of blocks beyond a stage's depth, and of the modules of a disabled exit, are
accepted and validated but not used: Ray Tune samples every key of a space whatever the
depth it picked.

``min_exits`` is the documented repair rule for samples that enable too few exits: the
deepest disabled positions are enabled (with the branch architecture their keys give)
until ``min_exits`` exits exist. The paper's space sets ``min_exits=1``; a static
network (no exits) uses 0.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .space_values import EXIT_POSITIONS, LIMITS, PAPER_SPACE, Allowed, SpaceValues

NUM_STAGES = 5
# Once-for-All MobileNetV3 macro-architecture (see docs/design.md).
STEM_CHANNELS = 16
FIRST_BLOCK_CHANNELS = 16
STAGE_CHANNELS = (24, 40, 80, 112, 160)
STAGE_STRIDES = (2, 2, 2, 1, 2)
STAGE_USE_SE = (False, True, False, True, True)
STAGE_ACTIVATION = ("relu", "relu", "hswish", "hswish", "hswish")
HEAD_EXPAND_CHANNELS = 960
HEAD_FEATURE_CHANNELS = 1280
EXIT_ACTIVATION = "hswish"


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without losing more than 10%."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


@dataclass(frozen=True)
class BlockRow:
    """One inverted-residual block as the network builds it (torchvision's ``InvertedResidualConfig``).

    ``stage`` 0 is the fixed first block (part of the stem), 1…5 the searched stages.
    """

    stage: int
    in_channels: int
    out_channels: int
    kernel: int
    expansion: int
    stride: int
    use_se: bool
    activation: str


@dataclass(frozen=True)
class BlockConfig:
    """One inverted-residual block of a backbone stage."""

    kernel: int
    expansion: int


@dataclass(frozen=True)
class StageConfig:
    """A backbone stage: its blocks (depth = number of blocks)."""

    blocks: tuple[BlockConfig, ...]

    @property
    def depth(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True)
class ExitModuleConfig:
    """One module of an exit branch: 1×1 expand → k×k depthwise → 1×1 project (+ 2×2 pool)."""

    channels: int
    kernel: int
    expansion: int
    pool: int


@dataclass(frozen=True)
class ExitConfig:
    """An exit branch placed after backbone stage ``position`` (1…4)."""

    position: int
    modules: tuple[ExitModuleConfig, ...]

    @property
    def depth(self) -> int:
        return len(self.modules)


@dataclass(frozen=True)
class StemRow:
    """The stem convolution: k×k, stride 2, BatchNorm, activation (torchvision's ``firstconv``)."""

    in_channels: int
    out_channels: int
    kernel: int = 3
    stride: int = 2
    activation: str = "hswish"


@dataclass(frozen=True)
class ExitRow:
    """An exit branch as the network builds it: its modules on the output of stage ``position``
    (``in_channels`` channels), then global pooling and a linear classifier."""

    position: int
    in_channels: int
    modules: tuple[ExitModuleConfig, ...]
    num_classes: int
    activation: str = EXIT_ACTIVATION  # of every conv of every module


@dataclass(frozen=True)
class HeadRow:
    """The final classifier: 1×1 expand conv (BN, activation) → global pool → 1×1 feature conv
    (no BN, activation) → linear."""

    in_channels: int
    expand_channels: int
    feature_channels: int
    num_classes: int
    activation: str = "hswish"


@dataclass(frozen=True)
class ArchConfig:
    """A complete early-exit network: backbone stages, exits (sorted by position), input."""

    stages: tuple[StageConfig, ...]
    exits: tuple[ExitConfig, ...] = ()
    resolution: int = 32
    width_mult: float = 1.0
    num_classes: int = 10
    in_channels: int = 3

    def __post_init__(self) -> None:
        if len(self.stages) != NUM_STAGES:
            raise ValueError(f"ArchConfig needs {NUM_STAGES} stages, got {len(self.stages)}")
        positions = [e.position for e in self.exits]
        if positions != sorted(set(positions)):
            raise ValueError(f"exit positions must be distinct and sorted, got {positions}")

    @property
    def exit_positions(self) -> tuple[int, ...]:
        return tuple(e.position for e in self.exits)

    @property
    def num_exits(self) -> int:
        """Number of intermediate exits (the final classifier is not counted)."""
        return len(self.exits)

    # ------------------------------------------------------------------ rows
    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Output channels of stage 1…5 (also the input channels of the exit after it)."""
        return tuple(make_divisible(c * self.width_mult) for c in STAGE_CHANNELS)

    def stem_row(self) -> StemRow:
        """The stem convolution (the first block after it is ``block_rows()[0]``)."""
        return StemRow(self.in_channels, make_divisible(STEM_CHANNELS * self.width_mult))

    def block_rows(self) -> tuple[BlockRow, ...]:
        """Every inverted-residual block in order: the first block (stage 0), then each stage's."""
        stem = self.stem_row().out_channels
        first = make_divisible(FIRST_BLOCK_CHANNELS * self.width_mult)
        rows = [BlockRow(0, stem, first, 3, 1, 1, False, "relu")]
        channels = first
        for s, (stage, out) in enumerate(zip(self.stages, self.stage_channels)):
            for b, block in enumerate(stage.blocks):
                rows.append(BlockRow(s + 1, channels, out, block.kernel, block.expansion,
                                     STAGE_STRIDES[s] if b == 0 else 1, STAGE_USE_SE[s], STAGE_ACTIVATION[s]))
                channels = out
        return tuple(rows)

    def exit_rows(self) -> tuple[ExitRow, ...]:
        """Every exit branch in position order, on the output of the stage it follows."""
        return tuple(ExitRow(e.position, self.stage_channels[e.position - 1], e.modules, self.num_classes)
                     for e in self.exits)

    def head_row(self) -> HeadRow:
        """The final classifier after stage 5."""
        # Once-for-All keeps the 1280-wide feature mix unless the width grows.
        feature = make_divisible(HEAD_FEATURE_CHANNELS * self.width_mult) if self.width_mult > 1.0 \
            else HEAD_FEATURE_CHANNELS
        return HeadRow(self.stage_channels[-1], make_divisible(HEAD_EXPAND_CHANNELS * self.width_mult), feature,
                       self.num_classes)

    # ------------------------------------------------------------------ flat dicts
    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], allowed: SpaceValues | None = None) -> "ArchConfig":
        """Parse a flat trial dict; returns the ArchConfig it describes.

        ``allowed`` restricts values to a search space's value sets (default: what the
        code can build). Unknown keys, missing keys and out-of-range values raise
        ``ValueError`` naming the key, the value and what is allowed.
        """
        parser = _FlatParser(flat, allowed)
        return parser.parse()

    def to_flat(self) -> dict[str, Any]:
        """The flat dict of this architecture (only the keys it uses)."""
        flat: dict[str, Any] = {
            "resolution": self.resolution,
            "width_mult": self.width_mult,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
        }
        for s, stage in enumerate(self.stages, start=1):
            flat[f"stage{s}_depth"] = stage.depth
            for b, block in enumerate(stage.blocks):
                flat[f"stage{s}_block{b}_kernel"] = block.kernel
                flat[f"stage{s}_block{b}_expansion"] = block.expansion
        by_pos = {e.position: e for e in self.exits}
        for i in EXIT_POSITIONS:
            ex = by_pos.get(i)
            flat[f"exit{i}_enabled"] = ex is not None
            if ex is None:
                continue
            for m in (1, 2):
                if m <= ex.depth:
                    mod = ex.modules[m - 1]
                    for name in _MODULE_FIELDS:
                        flat[f"exit{i}_m{m}_{name}"] = getattr(mod, name)
                else:
                    flat[f"exit{i}_m{m}_channels"] = 0
        return flat

    def replace(self, **changes: Any) -> "ArchConfig":
        return dataclasses.replace(self, **changes)


_MODULE_FIELDS = ("channels", "kernel", "expansion", "pool")
_GLOBAL_KEYS = ("resolution", "width_mult", "num_classes", "in_channels", "min_exits")


def arch_keys(max_depth: int = 8) -> frozenset[str]:
    """Every key ``ArchConfig.from_flat`` understands (blocks up to ``max_depth``)."""
    keys = set(_GLOBAL_KEYS)
    for s in range(1, NUM_STAGES + 1):
        keys.add(f"stage{s}_depth")
        for b in range(max_depth):
            keys.add(f"stage{s}_block{b}_kernel")
            keys.add(f"stage{s}_block{b}_expansion")
    for i in EXIT_POSITIONS:
        keys.add(f"exit{i}_enabled")
        for m in (1, 2):
            for name in _MODULE_FIELDS:
                keys.add(f"exit{i}_m{m}_{name}")
    return frozenset(keys)


_ARCH_KEYS = arch_keys(int(LIMITS["depths"].high))


def is_arch_key(key: str) -> bool:
    return key in _ARCH_KEYS


class _FlatParser:
    def __init__(self, flat: Mapping[str, Any], allowed: SpaceValues | None) -> None:
        if not isinstance(flat, Mapping):
            raise TypeError(f"ArchConfig.from_flat needs a dict, got {type(flat).__name__}")
        self.flat = dict(flat)
        if allowed is None:
            self.sets = LIMITS
        else:
            self.sets = {name: Allowed(getattr(allowed, name)) for name in LIMITS}

    def value(self, key: str, set_name: str, default: Any = dataclasses.MISSING) -> int:
        if key not in self.flat:
            if default is dataclasses.MISSING:
                raise ValueError(f"missing key {key!r} in the architecture config")
            return default
        v = self.flat[key]
        allowed = self.sets[set_name]
        if v not in allowed:
            raise ValueError(f"{key}={v!r} {allowed.describe()}")
        return int(v)

    def check_all_present_keys(self) -> None:
        unknown = sorted(k for k in self.flat if k not in _ARCH_KEYS)
        if unknown:
            raise ValueError(
                f"unknown architecture key(s) {unknown}; known keys look like 'stage2_depth', "
                "'stage2_block0_kernel', 'exit1_enabled', 'exit1_m2_channels', 'resolution' "
                "(see aebnas.config)")
        # Validate keys not used by this sample too: a bad value is a bad space.
        for key in self.flat:
            parts = key.split("_")
            if key.startswith("stage") and key.endswith("_kernel"):
                self.value(key, "kernels")
            elif key.startswith("stage") and key.endswith("_expansion"):
                self.value(key, "expansions")
            elif key.startswith("exit") and len(parts) == 3 and parts[1] in ("m1", "m2"):
                set_name = {"channels": f"exit_{parts[1]}_channels", "kernel": "exit_kernels",
                            "expansion": "exit_expansions", "pool": "exit_pools"}[parts[2]]
                self.value(key, set_name)

    def flag(self, key: str, default: bool) -> bool:
        v = self.flat.get(key, default)
        if isinstance(v, bool) or v in (0, 1):
            return bool(v)
        raise ValueError(f"{key}={v!r} is not a boolean (True/False or 1/0)")

    def parse(self) -> ArchConfig:
        self.check_all_present_keys()
        stages = []
        for s in range(1, NUM_STAGES + 1):
            depth = self.value(f"stage{s}_depth", "depths")
            blocks = tuple(
                BlockConfig(kernel=self.value(f"stage{s}_block{b}_kernel", "kernels"),
                            expansion=self.value(f"stage{s}_block{b}_expansion", "expansions"))
                for b in range(depth))
            stages.append(StageConfig(blocks))

        min_exits = self.flat.get("min_exits", 0)
        if isinstance(min_exits, bool) or min_exits not in Allowed(low=0, high=len(EXIT_POSITIONS)):
            raise ValueError(f"min_exits={min_exits!r} is not an integer in [0, {len(EXIT_POSITIONS)}]")
        enabled = {i: self.flag(f"exit{i}_enabled", False) for i in EXIT_POSITIONS}
        # Repair rule (module docstring): enable the deepest disabled positions.
        for i in reversed(EXIT_POSITIONS):
            if sum(enabled.values()) >= int(min_exits):
                break
            if not enabled[i] and f"exit{i}_m1_channels" in self.flat:
                enabled[i] = True
        if sum(enabled.values()) < int(min_exits):
            raise ValueError(f"min_exits={min_exits} but only {sum(enabled.values())} exits can be "
                             "enabled (the others have no exit{i}_m1_* keys)")
        for i, on in enabled.items():
            if on and i not in self.sets["exit_positions"]:
                raise ValueError(f"exit{i}_enabled=True but position {i} "
                                 f"{self.sets['exit_positions'].describe()}")

        exits = []
        for i in EXIT_POSITIONS:
            if not enabled[i]:
                continue
            modules = [self.module(i, 1)]
            if self.value(f"exit{i}_m2_channels", "exit_m2_channels", default=0) > 0:
                modules.append(self.module(i, 2))
            exits.append(ExitConfig(position=i, modules=tuple(modules)))

        width = self.flat.get("width_mult", 1.0)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0.05 <= width <= 4.0:
            raise ValueError(f"width_mult={width!r} is not a number in [0.05, 4.0]")
        num_classes = self.flat.get("num_classes", 10)
        if num_classes not in Allowed(low=2, high=100_000):
            raise ValueError(f"num_classes={num_classes!r} is not an integer in [2, 100000]")
        in_channels = self.flat.get("in_channels", 3)
        if in_channels not in Allowed((1, 3)):
            raise ValueError(f"in_channels={in_channels!r} is not one of (1, 3)")
        return ArchConfig(
            stages=tuple(stages), exits=tuple(exits),
            resolution=self.value("resolution", "resolutions"),
            width_mult=float(width), num_classes=int(num_classes), in_channels=int(in_channels))

    def module(self, i: int, m: int) -> ExitModuleConfig:
        p = f"exit{i}_m{m}_"
        return ExitModuleConfig(
            channels=self.value(p + "channels", f"exit_m{m}_channels"),
            kernel=self.value(p + "kernel", "exit_kernels"),
            expansion=self.value(p + "expansion", "exit_expansions"),
            pool=self.value(p + "pool", "exit_pools"))


def uniform_arch(depth: int, kernel: int, expansion: int, *, exits: Iterable[int] = (),
                 exit_module: ExitModuleConfig | None = None, second_module: ExitModuleConfig | None = None,
                 **kwargs: Any) -> ArchConfig:
    """An ArchConfig whose stages all share one depth/kernel/expansion; handy for tests and benchmarks."""
    block = BlockConfig(kernel, expansion)
    stages = tuple(StageConfig((block,) * depth) for _ in range(NUM_STAGES))
    mod = exit_module or ExitModuleConfig(channels=8, kernel=3, expansion=1, pool=0)
    mods = (mod,) if second_module is None else (mod, second_module)
    return ArchConfig(stages=stages, exits=tuple(ExitConfig(p, mods) for p in sorted(exits)), **kwargs)


def smallest_arch(space: SpaceValues = PAPER_SPACE, **kwargs: Any) -> ArchConfig:
    """The cheapest architecture of ``space``: min depth/kernel/expansion, one tiny exit at position 1."""
    mod = ExitModuleConfig(min(space.exit_m1_channels), min(space.exit_kernels),
                           min(space.exit_expansions), max(space.exit_pools))
    kwargs.setdefault("resolution", min(space.resolutions))
    return uniform_arch(min(space.depths), min(space.kernels), min(space.expansions),
                        exits=(min(space.exit_positions),), exit_module=mod, **kwargs)


def largest_arch(space: SpaceValues = PAPER_SPACE, **kwargs: Any) -> ArchConfig:
    """The costliest architecture of ``space``: max everything, every exit with two modules."""
    mod = ExitModuleConfig(max(space.exit_m1_channels), max(space.exit_kernels),
                           max(space.exit_expansions), min(space.exit_pools))
    mod2 = ExitModuleConfig(max(space.exit_m2_channels), max(space.exit_kernels),
                            max(space.exit_expansions), min(space.exit_pools))
    kwargs.setdefault("resolution", max(space.resolutions))
    return uniform_arch(max(space.depths), max(space.kernels), max(space.expansions),
                        exits=space.exit_positions, exit_module=mod, second_module=mod2, **kwargs)


def random_arch(space: SpaceValues, rng: random.Random, *, min_exits: int = 1, **kwargs: Any) -> ArchConfig:
    """An architecture of ``space`` drawn uniformly per choice from ``rng`` (the supernet's sampler).

    Every stage depth, block kernel and expansion, resolution and exit-module value is one
    uniform draw; each exit position exists with probability 1/2, and when fewer than
    ``min_exits`` do, the deepest missing ones are added (as ``ArchConfig.from_flat``
    repairs a Ray Tune sample). ``kwargs`` set width, classes and input channels.
    """
    stages = tuple(StageConfig(tuple(BlockConfig(rng.choice(space.kernels), rng.choice(space.expansions))
                                     for _ in range(rng.choice(space.depths))))
                   for _ in range(NUM_STAGES))
    positions = [p for p in space.exit_positions if rng.random() < 0.5]
    for p in sorted(space.exit_positions, reverse=True):
        if len(positions) >= min(min_exits, len(space.exit_positions)):
            break
        if p not in positions:
            positions.append(p)

    def module(channels: tuple[int, ...]) -> ExitModuleConfig:
        return ExitModuleConfig(rng.choice(channels), rng.choice(space.exit_kernels),
                                rng.choice(space.exit_expansions), rng.choice(space.exit_pools))

    exits = []
    for p in sorted(positions):
        first, second = module(space.exit_m1_channels), module(space.exit_m2_channels)
        exits.append(ExitConfig(p, (first,) if second.channels == 0 else (first, second)))
    kwargs.setdefault("resolution", rng.choice(space.resolutions))
    return ArchConfig(stages=stages, exits=tuple(exits), **kwargs)


__all__ = [
    "ArchConfig", "StageConfig", "BlockConfig", "ExitConfig", "ExitModuleConfig",  # what is searched
    "StemRow", "BlockRow", "ExitRow", "HeadRow",  # what is built
    "make_divisible", "arch_keys", "is_arch_key", "uniform_arch", "smallest_arch", "largest_arch", "random_arch",
    "NUM_STAGES", "EXIT_POSITIONS", "EXIT_ACTIVATION",
    # Re-exported from aebnas.space_values, where they live.
    "Allowed", "SpaceValues", "PAPER_SPACE", "LIMITS",
]
