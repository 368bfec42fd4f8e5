"""A compact encoding of a space's networks: one integer per choice, one canonical vector per network.

A param space (``aebnas_space()`` and the others) is a flat dict of ``tune.choice`` samplers and
fixed values. Ray Tune samples every key, also those a network does not use: blocks beyond a
stage's depth, the modules of a disabled exit, the second module's kernel when it has no
second module. A searcher that learns from what it saw should not see those: two samples that
differ only there are the same network.

:class:`Encoding` gives each choice (``gene``) of a space an index into its values, in the
space's key order. A vector is *canonical* when its inactive genes are 0 and the ``min_exits``
repair of :meth:`aebnas.config.ArchConfig.from_flat` has been applied; every network of the space
has exactly one canonical vector (``encode(arch)``), and ``canonical(v) == encode(arch(v))`` maps
any vector a search operator produces to the network it means.

Which genes are active (what ``ArchConfig.from_flat`` reads):

- ``stage{s}_block{b}_*`` when ``b < stage{s}_depth``;
- ``exit{i}_m1_*`` and ``exit{i}_m2_resize`` when exit ``i`` exists (after the repair) with the
  paper's branch;
- ``exit{i}_m2_{kernel,expansion,pool}`` when it also has a second module (``m2_resize > 0``);
- every other gene (resolution, depths, ``exit{i}_enabled``).

:func:`define_by_run` is the same space for Optuna's define-by-run API: it asks only for the
active choices, so TPE and NSGA-II learn from the choices that decide the network.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from aebnas.config import EXIT_POSITIONS, MODULE_FIELDS, ArchConfig, has_branch, is_arch_key

_BLOCK = re.compile(r"^stage(\d)_block(\d+)_(kernel|expansion)$")
_MODULE = re.compile(r"^exit(\d)_m([12])_(resize|kernel|expansion|pool)$")


@dataclass(frozen=True)
class Gene:
    """One choice of a space: its key and the values it can take (index = the gene's value)."""

    key: str
    values: tuple[Any, ...]

    def index(self, value: Any) -> int:
        for i, v in enumerate(self.values):
            if v == value and isinstance(v, bool) == isinstance(value, bool):  # True is not 1 here
                return i
        raise ValueError(f"{self.key}={value!r} is not one of the space's values {self.values}")


class Encoding:
    """Integer vectors of the networks of a param space (see the module docstring).

    ``param_space``: a flat dict of ``tune.choice`` samplers and fixed values (what
    ``Experiment.param_space()`` returns). Samplers other than ``tune.choice`` are refused.
    """

    def __init__(self, param_space: Mapping[str, Any]) -> None:
        from ray.tune.search.sample import Categorical, Domain

        genes, constants = [], {}
        for key, value in param_space.items():
            if isinstance(value, Domain) and not is_arch_key(key):
                raise ValueError(f"{key}: the encoding covers architecture choices; fix the other settings")
            if isinstance(value, Categorical):
                genes.append(Gene(key, tuple(value.categories)))
            elif isinstance(value, Domain):
                raise ValueError(f"{key}: the encoding needs tune.choice samplers, got {type(value).__name__}")
            else:
                constants[key] = value
        if not genes:
            raise ValueError("the param space has no tune.choice to encode: every value is fixed")
        self.genes: tuple[Gene, ...] = tuple(genes)
        self.constants: dict[str, Any] = constants  # every fixed value (a trial config carries them)
        self._arch_constants = {k: v for k, v in constants.items() if is_arch_key(k)}
        self.sizes = np.array([len(g.values) for g in self.genes], dtype=np.int64)
        self._position = {g.key: i for i, g in enumerate(self.genes)}

    def __len__(self) -> int:
        return len(self.genes)

    # ------------------------------------------------------------ vector ↔ network
    def arch(self, vector: Sequence[int]) -> ArchConfig:
        """The network a vector means (any vector of valid indices; inactive genes are ignored)."""
        v = self.check(vector)
        return ArchConfig.from_flat({**self._arch_constants, **{g.key: g.values[int(i)] for g, i in zip(self.genes, v)}})

    def encode(self, arch: ArchConfig | Mapping[str, Any]) -> np.ndarray:
        """The canonical vector of a network (an ``ArchConfig`` or a trial's flat config)."""
        if not isinstance(arch, ArchConfig):
            arch = ArchConfig.from_flat({**self._arch_constants, **{k: v for k, v in arch.items() if is_arch_key(k)}})
        flat = arch.to_flat()
        for key, value in self.constants.items():  # a fixed value of the space must hold for the network
            if key in flat and flat[key] != value:
                raise ValueError(f"{key}={flat[key]!r}, but the space fixes it to {value!r}")
        vector = np.zeros(len(self.genes), dtype=np.int64)
        for i, gene in enumerate(self.genes):
            if gene.key in flat:
                vector[i] = gene.index(flat[gene.key])
        return vector

    def decode(self, vector: Sequence[int]) -> dict[str, Any]:
        """A trial config of the network: the space's fixed values and the active choices only."""
        flat = self.arch(vector).to_flat()
        return {**self.constants, **{g.key: flat[g.key] for g in self.genes if g.key in flat}}

    def canonical(self, vector: Sequence[int]) -> np.ndarray:
        """The canonical vector of the network ``vector`` means: inactive genes 0, exits repaired."""
        return self.encode(self.arch(vector))

    def active(self, vector: Sequence[int]) -> np.ndarray:
        """Boolean mask of the genes the network of ``vector`` uses."""
        flat = self.arch(vector).to_flat()
        return np.array([g.key in flat for g in self.genes])

    def sample(self, rng: random.Random) -> np.ndarray:
        """A canonical vector drawn as Ray Tune draws the space (uniform per choice), then repaired."""
        return self.canonical([rng.randrange(len(g.values)) for g in self.genes])

    def features(self, vectors: np.ndarray) -> np.ndarray:
        """Numeric features for a predictor, one row per vector: each active gene's value (True = 1),
        0 where inactive. Kernel, expansion, depth, channels and resolution keep their order and scale."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.int64))
        table = [np.array([float(v) for v in g.values]) for g in self.genes]
        out = np.zeros(vectors.shape, dtype=np.float64)
        for row, vector in enumerate(vectors):
            mask = self.active(vector)
            out[row] = [table[i][v] if mask[i] else 0.0 for i, v in enumerate(vector)]
        return out

    def check(self, vector: Sequence[int]) -> np.ndarray:
        """``vector`` as an int array; ValueError naming the gene when an index is out of range."""
        v = np.asarray(vector, dtype=np.int64)
        if v.shape != (len(self.genes),):
            raise ValueError(f"a vector of this space has {len(self.genes)} genes, got shape {v.shape}")
        bad = np.flatnonzero((v < 0) | (v >= self.sizes))
        if bad.size:
            g = self.genes[bad[0]]
            raise ValueError(f"gene {g.key}: index {v[bad[0]]} is not in [0, {len(g.values) - 1}]")
        return v

    def every_key(self, vector: Sequence[int]) -> dict[str, Any]:
        """A config with every key of the space, as Ray Tune samples one: unused genes at their
        canonical value (for a Tuner whose param_space still holds the samplers)."""
        v = self.check(vector)
        return {**self.constants, **{g.key: g.values[int(i)] for g, i in zip(self.genes, v)}}


# ---------------------------------------------------------------- Optuna, define-by-run
class DefineByRun:
    """An Optuna define-by-run function of ``param_space`` that asks only for active choices
    (a class, not a closure: Ray Tune pickles the searcher with it at every checkpoint).

    Order: resolution and depths, each stage's blocks up to its depth, the exits' existence
    (then the ``min_exits`` repair, as ``ArchConfig.from_flat`` does it), each existing exit's
    first module and second module's resize, and the second module's other choices only when it
    exists (an EDANAS exit has none). Returns the fixed values of the space and the repaired ``exit{i}_enabled``.
    """

    def __init__(self, param_space: Mapping[str, Any]) -> None:
        self.encoding = Encoding(param_space)
        self.genes = {g.key: g for g in self.encoding.genes}
        self.min_exits = int(self.encoding.constants.get("min_exits", 0))

    def _ask(self, trial: Any, key: str, chosen: dict[str, Any]) -> Any:
        if key in self.genes:
            chosen[key] = trial.suggest_categorical(key, list(self.genes[key].values))
        elif key in self.encoding.constants:
            chosen[key] = self.encoding.constants[key]
        return chosen.get(key)

    def __call__(self, trial: Any) -> dict[str, Any]:
        enc, chosen = self.encoding, {}
        for g in enc.genes:
            if not (_BLOCK.match(g.key) or _MODULE.match(g.key) or g.key.endswith("_enabled")):
                self._ask(trial, g.key, chosen)
        for g in enc.genes:
            m = _BLOCK.match(g.key)
            depth_key = f"stage{m.group(1)}_depth" if m else ""
            if m and int(m.group(2)) < int(chosen.get(depth_key, enc.constants.get(depth_key, 0))):
                self._ask(trial, g.key, chosen)
        enabled = {i: bool(self._ask(trial, f"exit{i}_enabled", chosen)) for i in EXIT_POSITIONS}
        for i in reversed(EXIT_POSITIONS):  # the repair rule of ArchConfig.from_flat
            if sum(enabled.values()) >= self.min_exits:
                break
            if not enabled[i] and has_branch({**self.genes, **enc.constants}, i):
                enabled[i] = True
        fixed = dict(enc.constants)
        for i in EXIT_POSITIONS:
            fixed[f"exit{i}_enabled"] = enabled[i]
            if not enabled[i] or enc.constants.get(f"exit{i}_branch") == "edanas":
                continue
            for name in MODULE_FIELDS:
                self._ask(trial, f"exit{i}_m1_{name}", chosen)
            if self._ask(trial, f"exit{i}_m2_resize", chosen):
                for name in ("kernel", "expansion", "pool"):
                    self._ask(trial, f"exit{i}_m2_{name}", chosen)
        # What was asked for, then the fixed values and the repaired exits (they win over what was
        # asked: Ray Tune merges this dict over the values Optuna recorded); unused choices stay absent.
        return {**chosen, **fixed}


def define_by_run(param_space: Mapping[str, Any]) -> DefineByRun:
    """Optuna's define-by-run function of ``param_space``: see :class:`DefineByRun`."""
    return DefineByRun(param_space)


__all__ = ["Encoding", "Gene", "DefineByRun", "define_by_run"]
