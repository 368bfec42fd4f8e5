"""What a candidate network *is*: the architecture as plain dataclasses.

Ray Tune hands each trial a flat dict of plain values (``stage2_depth``,
``exit1_m2_resize``, ``resolution`` …). :meth:`ArchConfig.from_flat` is the only parser
of that dict and :meth:`ArchConfig.to_flat` its inverse.

The whole network is data, as torchvision's ``InvertedResidualConfig`` rows: an
``ArchConfig`` gives a :class:`StemRow`, a :class:`BlockRow` per inverted residual, an
:class:`ExitRow` per exit branch and a :class:`HeadRow`, with every width and stride worked
out; ``aebnas.nn`` only turns rows into layers. The allowed values of each choice live in
``aebnas.space_values``.

Flat keys (``s`` = stage 1…5, ``b`` = block 0…depth-1, ``i`` = exit position 1…4)::

    resolution, width_mult, num_classes, in_channels, min_exits
    stage{s}_depth, stage{s}_block{b}_kernel, stage{s}_block{b}_expansion
    exit{i}_enabled, exit{i}_branch ("aebnas", the default, or "edanas"),
    exit{i}_m1_{resize,kernel,expansion,pool},
    exit{i}_m2_{resize,kernel,expansion,pool}   (m2_resize = 0: no second module)

Keys of blocks beyond a stage's depth, and of the modules of a disabled exit or of an
``edanas`` exit (it has no modules), are accepted and validated but not used: Ray Tune
samples every key of a space whatever the depth it picked.

``min_exits`` is the documented repair rule for samples that enable too few exits: the
deepest disabled positions that have a branch (``exit{i}_m1_resize`` keys, or
``exit{i}_branch="edanas"``) are enabled, with the branch their keys give, until
``min_exits`` exits exist. The paper's space sets ``min_exits=1``; a static
network (no exits) uses 0.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .space_values import EXIT_BRANCHES, EXIT_POSITIONS, LIMITS, PAPER_SPACE, Allowed, SpaceValues

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
# The paper's exit module (its authors' ``ExitBlock_Modified``): an unpadded convolution of stride 2, ReLU.
EXIT_MODULE_STRIDE = 2
EXIT_MODULE_ACTIVATION = "relu"
# EDANAS's exit (``ExitBlock``): 1×1 conv C → 6C (BN, h-swish), global pool, 1×1 conv 6C → 8C (h-swish), linear.
EDANAS_EXPAND = 6
EDANAS_FEATURES = 8
EDANAS_ACTIVATION = "hswish"


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
    """One module of the paper's exit branch: bicubic resize of its input to ``resize × resize``
    pixels → ``kernel × kernel`` convolution, stride 2, no padding, C → C·``expansion`` channels →
    BatchNorm → ReLU → 2×2 max pool if ``pool`` (skipped when the map is smaller than 2×2).

    ``resize`` is a spatial size, not a channel count: it makes a module's cost independent of the
    input resolution.
    """

    resize: int
    kernel: int
    expansion: int
    pool: int

    def __post_init__(self) -> None:
        if self.resize < self.kernel:
            raise ValueError(f"an exit module with resize {self.resize} and kernel {self.kernel}: the unpadded "
                             "convolution needs resize >= kernel")

    @property
    def conv_size(self) -> int:
        """Side of the convolution's output map."""
        return (self.resize - self.kernel) // EXIT_MODULE_STRIDE + 1

    @property
    def pools(self) -> bool:
        """Whether the 2×2 max pool runs (``pool`` set and a map of at least 2×2 to pool)."""
        return bool(self.pool) and self.conv_size >= 2

    @property
    def out_size(self) -> int:
        """Side of the module's output map."""
        return self.conv_size // 2 if self.pools else self.conv_size


@dataclass(frozen=True)
class ExitConfig:
    """An exit branch placed after backbone stage ``position`` (1…4).

    ``branch="aebnas"``: the paper's branch, one or more :class:`ExitModuleConfig` then global
    pooling and a linear classifier. ``branch="edanas"``: EDANAS's fixed exit, no modules.
    """

    position: int
    modules: tuple[ExitModuleConfig, ...] = ()
    branch: str = "aebnas"

    def __post_init__(self) -> None:
        if self.branch not in EXIT_BRANCHES:
            raise ValueError(f"exit {self.position}: branch={self.branch!r} is not one of {EXIT_BRANCHES}")
        if self.branch == "edanas" and self.modules:
            raise ValueError(f"exit {self.position}: an edanas branch has no modules, got {len(self.modules)}")
        if self.branch == "aebnas" and not self.modules:
            raise ValueError(f"exit {self.position}: an aebnas branch needs at least one module")

    @property
    def depth(self) -> int:
        return len(self.modules)

    def describe(self) -> str:
        """The branch in one word: ``edanas``, or its modules as ``resize px/k kernel/× expansion[/pool]``
        joined by ``+`` (``8px/k3/x1/pool+10px/k5/x2``)."""
        if self.branch == "edanas":
            return "edanas"
        return "+".join(f"{m.resize}px/k{m.kernel}/x{m.expansion}" + ("/pool" if m.pool else "") for m in self.modules)


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
    """An exit branch as the network builds it, on the output of stage ``position`` (``in_channels``
    channels): ``aebnas``, its modules, then global pooling and a linear classifier; ``edanas``, a 1×1
    expand conv, global pooling, a 1×1 feature conv and a linear classifier."""

    position: int
    in_channels: int
    branch: str
    modules: tuple[ExitModuleConfig, ...]
    num_classes: int

    def module_channels(self) -> tuple[tuple[int, int], ...]:
        """(input, output) channels of each module: each multiplies its input's by its expansion."""
        out, channels = [], self.in_channels
        for module in self.modules:
            out.append((channels, channels * module.expansion))
            channels *= module.expansion
        return tuple(out)

    @property
    def expand_channels(self) -> int:
        """EDANAS: the 1×1 expand conv's output channels."""
        return self.in_channels * EDANAS_EXPAND

    @property
    def features(self) -> int:
        """Inputs of the linear classifier."""
        if self.branch == "edanas":
            return self.in_channels * EDANAS_FEATURES
        return self.module_channels()[-1][1]


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
        return tuple(ExitRow(e.position, self.stage_channels[e.position - 1], e.branch, e.modules,
                             self.num_classes) for e in self.exits)

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
            flat[f"exit{i}_branch"] = ex.branch
            if ex.branch == "edanas":
                continue
            for m in (1, 2):
                if m <= ex.depth:
                    mod = ex.modules[m - 1]
                    for name in MODULE_FIELDS:
                        flat[f"exit{i}_m{m}_{name}"] = getattr(mod, name)
                else:
                    flat[f"exit{i}_m{m}_resize"] = 0
        return flat

    def replace(self, **changes: Any) -> "ArchConfig":
        return dataclasses.replace(self, **changes)


MODULE_FIELDS = ("resize", "kernel", "expansion", "pool")
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
        keys.add(f"exit{i}_branch")
        for m in (1, 2):
            for name in MODULE_FIELDS:
                keys.add(f"exit{i}_m{m}_{name}")
    return frozenset(keys)


_ARCH_KEYS = arch_keys(int(LIMITS["depths"].high))


def is_arch_key(key: str) -> bool:
    return key in _ARCH_KEYS


# The value set (a field of SpaceValues) each kind of flat key draws from.
_SETS = {"depth": "depths", "kernel": "kernels", "expansion": "expansions"}
_MODULE_SETS = {"kernel": "exit_kernels", "expansion": "exit_expansions", "pool": "exit_pools"}


def value_set_of(key: str) -> str | None:
    """The :class:`SpaceValues` field a flat key's value must come from (``"exit_m2_resizes"`` for
    ``"exit3_m2_resize"``), or None for keys no value set governs (``exit{i}_enabled``, ``width_mult`` …)."""
    if key == "resolution":
        return "resolutions"
    parts = key.split("_")
    if key.startswith("stage") and key in _ARCH_KEYS:
        return _SETS.get(parts[-1])
    if key.startswith("exit") and len(parts) == 3 and parts[1] in ("m1", "m2"):
        return f"exit_{parts[1]}_resizes" if parts[2] == "resize" else _MODULE_SETS.get(parts[2])
    return None


def has_branch(flat: Mapping[str, Any], i: int) -> bool:
    """Whether ``flat`` (a trial's config or a space's keys) gives exit ``i`` a branch, so the
    ``min_exits`` repair may enable it: module keys, or an ``edanas`` branch."""
    return f"exit{i}_m1_resize" in flat or flat.get(f"exit{i}_branch") == "edanas"


# Keys of flat configs written before the paper's exit modules, when a module's first value was a channel count.
_OLD_MODULE_KEY = re.compile(r"^exit\d_m[12]_channels$")


def refuse_old_keys(keys: Iterable[str]) -> None:
    """Raise ValueError saying what changed when ``keys`` hold an exit-module key of an older aebnas."""
    old = sorted(k for k in keys if _OLD_MODULE_KEY.match(k))
    if old:
        raise ValueError(
            f"{old[0]!r} is a key of the exit module aebnas had before the paper's (a channel count); "
            "exit modules now resize to a size in pixels (exit{i}_m{1,2}_resize, see docs/design.md): "
            "this configuration was written by an older aebnas and cannot be built by this one")


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
        refuse_old_keys(unknown)
        if unknown:
            raise ValueError(
                f"unknown architecture key(s) {unknown}; known keys look like 'stage2_depth', "
                "'stage2_block0_kernel', 'exit1_enabled', 'exit1_branch', 'exit1_m2_resize', 'resolution' "
                "(see aebnas.config)")
        # Validate keys not used by this sample too: a bad value is a bad space.
        for key in self.flat:
            set_name = value_set_of(key)
            if set_name is not None and not key.endswith("_depth") and key != "resolution":
                self.value(key, set_name)
            if key.endswith("_branch") and self.flat[key] not in EXIT_BRANCHES:
                raise ValueError(f"{key}={self.flat[key]!r} is not one of {EXIT_BRANCHES}")

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
            if not enabled[i] and has_branch(self.flat, i):
                enabled[i] = True
        if sum(enabled.values()) < int(min_exits):
            raise ValueError(f"min_exits={min_exits} but only {sum(enabled.values())} exits can be "
                             "enabled (the others have neither exit{i}_m1_* keys nor exit{i}_branch='edanas')")
        for i, on in enabled.items():
            if on and i not in self.sets["exit_positions"]:
                raise ValueError(f"exit{i}_enabled=True but position {i} "
                                 f"{self.sets['exit_positions'].describe()}")

        exits = [self.exit(i) for i in EXIT_POSITIONS if enabled[i]]

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

    def exit(self, i: int) -> ExitConfig:
        branch = self.flat.get(f"exit{i}_branch", "aebnas")
        if branch == "edanas":
            return ExitConfig(position=i, branch=branch)
        modules = [self.module(i, 1)]
        if self.value(f"exit{i}_m2_resize", "exit_m2_resizes", default=0) > 0:
            modules.append(self.module(i, 2))
        return ExitConfig(position=i, modules=tuple(modules), branch=branch)

    def module(self, i: int, m: int) -> ExitModuleConfig:
        p = f"exit{i}_m{m}_"
        values = {name: self.value(p + name, value_set_of(p + name)) for name in MODULE_FIELDS}
        try:
            return ExitModuleConfig(**values)
        except ValueError:  # ExitModuleConfig's own rule (resize >= kernel), said with the keys
            raise ValueError(f"{p}resize={values['resize']} is smaller than {p}kernel={values['kernel']}: the "
                             "module's unpadded convolution needs resize >= kernel") from None


def uniform_arch(depth: int, kernel: int, expansion: int, *, exits: Iterable[int] = (),
                 exit_module: ExitModuleConfig | None = None, second_module: ExitModuleConfig | None = None,
                 exit_branch: str = "aebnas", **kwargs: Any) -> ArchConfig:
    """An ArchConfig whose stages all share one depth/kernel/expansion and whose exits all share one
    branch (``exit_branch="edanas"``: EDANAS's, no modules); handy for tests and benchmarks."""
    block = BlockConfig(kernel, expansion)
    stages = tuple(StageConfig((block,) * depth) for _ in range(NUM_STAGES))
    if exit_branch == "edanas":
        mods: tuple[ExitModuleConfig, ...] = ()
    else:
        mod = exit_module or ExitModuleConfig(resize=8, kernel=3, expansion=1, pool=0)
        mods = (mod,) if second_module is None else (mod, second_module)
    return ArchConfig(stages=stages, exits=tuple(ExitConfig(p, mods, exit_branch) for p in sorted(exits)), **kwargs)


def smallest_arch(space: SpaceValues = PAPER_SPACE, **kwargs: Any) -> ArchConfig:
    """The cheapest architecture of ``space``: min depth/kernel/expansion, one one-module exit at the first
    position with the smallest resize, kernel and expansion."""
    mod = ExitModuleConfig(min(space.exit_m1_resizes), min(space.exit_kernels),
                           min(space.exit_expansions), max(space.exit_pools))
    kwargs.setdefault("resolution", min(space.resolutions))
    return uniform_arch(min(space.depths), min(space.kernels), min(space.expansions),
                        exits=(min(space.exit_positions),), exit_module=mod, **kwargs)


def largest_arch(space: SpaceValues = PAPER_SPACE, **kwargs: Any) -> ArchConfig:
    """The costliest architecture of ``space``: max everything, every exit with two modules of the largest
    resize, kernel and expansion, without pooling (when the space has no second module: one)."""
    mod = ExitModuleConfig(max(space.exit_m1_resizes), max(space.exit_kernels),
                           max(space.exit_expansions), min(space.exit_pools))
    mod2 = ExitModuleConfig(max(space.exit_m2_resizes), max(space.exit_kernels),
                            max(space.exit_expansions), min(space.exit_pools)) if max(space.exit_m2_resizes) else None
    kwargs.setdefault("resolution", max(space.resolutions))
    return uniform_arch(max(space.depths), max(space.kernels), max(space.expansions),
                        exits=space.exit_positions, exit_module=mod, second_module=mod2, **kwargs)


def random_arch(space: SpaceValues, rng: random.Random, *, min_exits: int = 1,
                branches: tuple[str, ...] = ("aebnas",), **kwargs: Any) -> ArchConfig:
    """An architecture of ``space`` drawn uniformly per choice from ``rng`` (the supernet's sampler).

    Every stage depth, block kernel and expansion, resolution and exit-module value is one
    uniform draw; each exit position exists with probability 1/2, and when fewer than
    ``min_exits`` do, the deepest missing ones are added (as ``ArchConfig.from_flat``
    repairs a Ray Tune sample). Each exit's branch is drawn from ``branches`` (the supernet
    trains both ``EXIT_BRANCHES``). ``kwargs`` set width, classes and input channels.
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

    def module(resizes: tuple[int, ...]) -> ExitModuleConfig | None:
        resize = rng.choice(resizes)
        values = rng.choice(space.exit_kernels), rng.choice(space.exit_expansions), rng.choice(space.exit_pools)
        return ExitModuleConfig(resize, *values) if resize else None

    exits = []
    for p in sorted(positions):
        branch = rng.choice(branches)
        first, second = module(space.exit_m1_resizes), module(space.exit_m2_resizes)
        modules = () if branch == "edanas" else tuple(m for m in (first, second) if m is not None)
        exits.append(ExitConfig(p, modules, branch))
    kwargs.setdefault("resolution", rng.choice(space.resolutions))
    return ArchConfig(stages=stages, exits=tuple(exits), **kwargs)


__all__ = [
    "ArchConfig", "StageConfig", "BlockConfig", "ExitConfig", "ExitModuleConfig",  # what is searched
    "StemRow", "BlockRow", "ExitRow", "HeadRow",  # what is built
    "make_divisible", "arch_keys", "is_arch_key", "value_set_of", "has_branch", "refuse_old_keys", "uniform_arch", "smallest_arch",
    "largest_arch", "random_arch", "MODULE_FIELDS",
    "NUM_STAGES", "EXIT_POSITIONS", "EXIT_BRANCHES", "EXIT_MODULE_STRIDE", "EXIT_MODULE_ACTIVATION", "EDANAS_EXPAND",
    "EDANAS_FEATURES", "EDANAS_ACTIVATION",
    # Re-exported from aebnas.space_values, where they live.
    "Allowed", "SpaceValues", "PAPER_SPACE", "LIMITS",
]
