"""Measured latency, as a search and its trials read it: :class:`LatencyTable` turns a table of
``aebnas latency profile`` (:mod:`aebnas.deploy.latency_profile`) into per-exit costs ``C_i`` in milliseconds.

A network is cut into the pieces :class:`aebnas.cost.macs.PieceCosts` walks (the stem, each block
at its input size, each exit-branch module, each exit classifier, the head); the table holds
the median latency of each piece on the machine that profiled it, for one runtime (ONNX
Runtime or PyTorch eager), thread count and batch size. ``C_i`` of a network is then the
sum of its pieces up to exit i, as for MACs, and the expected latency of the dynamic
network is Σ u_i · C_i. ``benchmarks/latency_prediction.py`` measures how far that is
from the latency of the exported network.

This module holds what a trial needs (no ONNX export, no timing); the profiler that writes a
table imports it, never the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from ..config import ArchConfig, ExitModuleConfig, SpaceValues, uniform_arch
from .macs import PieceCosts
from ..exit_policy import MS, ExitCosts

TABLE_FORMAT = "aebnas latency table"


def piece_id(key: tuple) -> str:
    """A piece's key as it appears in a table: JSON of its parts (dataclasses as dicts)."""
    return json.dumps([dataclasses.asdict(k) if dataclasses.is_dataclass(k) else k for k in key])


def covering_archs(space: SpaceValues, **kwargs: Any) -> list[ArchConfig]:
    """Architectures that together use every piece ``space`` can build (every block choice of
    every stage at every resolution, every exit branch at every position, stem and head).

    Blocks: one network of maximal depth per (resolution, kernel, expansion) — the first
    block of a stage and the later ones differ. Exit branches: every first module, and every
    second module after every first, at every position, per resolution; and EDANAS's exit at
    every position, per resolution.
    """
    depth = max(space.depths)
    firsts = [ExitModuleConfig(r, k, e, p) for r in space.exit_m1_resizes for k in space.exit_kernels
              for e in space.exit_expansions for p in space.exit_pools]
    seconds = [None] + [ExitModuleConfig(r, k, e, p) for r in space.exit_m2_resizes if r > 0
                        for k in space.exit_kernels for e in space.exit_expansions for p in space.exit_pools]
    k0, e0 = space.kernels[0], space.expansions[0]
    archs = []
    for r in space.resolutions:
        archs += [uniform_arch(depth, k, e, resolution=r, **kwargs) for k in space.kernels for e in space.expansions]
        archs += [uniform_arch(depth, k0, e0, exits=space.exit_positions, exit_module=m1, second_module=m2,
                               resolution=r, **kwargs) for m1 in firsts for m2 in seconds]
        archs.append(uniform_arch(depth, k0, e0, exits=space.exit_positions, exit_branch="edanas", resolution=r,
                                  **kwargs))
    return archs


@dataclasses.dataclass
class Piece:
    key: tuple
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]


def space_pieces(archs: Iterable[ArchConfig]) -> dict[str, Piece]:
    """Every distinct piece of ``archs``, by :func:`piece_id`, in the order first met."""
    found: dict[str, Piece] = {}

    def record(key: tuple, build: Callable[[], nn.Module], shape: tuple[int, ...]) -> float:
        found.setdefault(piece_id(key), Piece(key, build, shape))
        return 0.0

    walker = PieceCosts(measure=record)
    for arch in archs:
        walker.exit_costs(arch)
    return found


def read_table(path: str | os.PathLike) -> dict[str, Any]:
    """A table file as a dict (``path`` added), ValueError naming the file if it is none."""
    p = Path(path).expanduser()
    try:
        table = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"latency table {p} does not exist (write one with "
                         "`aebnas latency profile --out FILE`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p} is not a latency table ({exc})") from None
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT:
        raise ValueError(f"{p} is not a latency table of aebnas")
    table["path"] = str(p)
    return table


def latency_metrics(arch: ArchConfig, sim: Any, prefix: str = "") -> dict[str, float]:
    """What a trial reports beside the MAC figures when its cost is latency: ``avg_ms``,
    ``final_ms`` and ``exitP_ms`` (C_i in ms) of a simulation in milliseconds."""
    m = {f"{prefix}avg_ms": float(sim.avg_cost)}
    if not prefix:
        m["final_ms"] = float(sim.costs[-1])
        for j, pos in enumerate(arch.exit_positions):
            m[f"exit{pos}_ms"] = float(sim.costs[j])
    return m


class LatencyTable:
    """A profiled table, one backend: ``exit_costs(arch)`` gives ``C_i`` pieces in milliseconds."""

    def __init__(self, path: str | os.PathLike | dict[str, Any], backend: str = "onnxruntime") -> None:
        if isinstance(path, dict):  # a table already read (a trial gets it through Ray's object store)
            table, self.path = path, Path(path.get("path", "latency table"))
        else:
            table, self.path = read_table(path), Path(path).expanduser()
        if table.get("format") != TABLE_FORMAT:
            raise ValueError(f"{self.path} is not a latency table of aebnas")
        if backend not in table["backends"]:
            raise ValueError(f"{self.path} has no {backend!r} figures (it has {sorted(table['backends'])})")
        self.table, self.backend = table, backend
        self.ms: dict[str, float] = table["backends"][backend]
        settings = table["settings"]
        self.width_mult, self.num_classes = settings["width_mult"], settings["num_classes"]
        self.in_channels, self.threads, self.batch = settings["in_channels"], settings["threads"], settings["batch"]
        self.calibration: dict[str, float] | None = table.get("calibration", {}).get(backend)
        self._costs = PieceCosts(measure=self._lookup, unit=MS)

    def _lookup(self, key: tuple, build: Callable[[], nn.Module], shape: Sequence[int]) -> float:
        pid = piece_id(key)
        if pid not in self.ms:
            raise ValueError(f"{self.path} has no {self.backend} latency of {key[0]} {pid}: it was profiled for "
                             f"another space, width or resolution (profile the space the search uses)")
        return self.ms[pid]

    def check(self, arch: ArchConfig) -> None:
        """ValueError when ``arch``'s width, classes or channels are not the table's."""
        mine = (self.width_mult, self.num_classes, self.in_channels)
        theirs = (arch.width_mult, arch.num_classes, arch.in_channels)
        if mine != theirs:
            raise ValueError(f"{self.path} was profiled for width {mine[0]}, {mine[1]} classes, {mine[2]} channels; "
                             f"the network has width {theirs[0]}, {theirs[1]} classes, {theirs[2]} channels")

    def exit_costs(self, arch: ArchConfig) -> ExitCosts:
        """Per-exit pieces in milliseconds (as :func:`aebnas.cost.macs.exit_costs` in MMACs), calibrated
        when the table has a calibration for this backend: ``scale`` × the pieces, plus
        ``per_exit_ms`` on every exit branch (paid when it is evaluated) and ``per_image_ms`` on
        the backbone (paid by every image)."""
        raw = self.raw_exit_costs(arch)
        c = self.calibration
        if not c:
            return raw
        return ExitCosts(backbone=c["scale"] * raw.backbone + c["per_image_ms"],
                         branch=c["scale"] * raw.branch + c["per_exit_ms"], unit=raw.unit)

    def raw_exit_costs(self, arch: ArchConfig) -> ExitCosts:
        """The sums of the table's pieces, without calibration."""
        self.check(arch)
        return self._costs.exit_costs(arch)

    def describe(self) -> str:
        m, s = self.table["machine"], self.table["settings"]
        return (f"{self.backend} on {m['cpu']} ({s['threads']} thread(s), batch {s['batch']}; "
                f"{self.path.name}, {self.table.get('date', 'unfinished')})")
