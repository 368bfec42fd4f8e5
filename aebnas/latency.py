"""Measured latency: ``aebnas latency profile`` writes a look-up table of every piece a space can
build, and :class:`LatencyTable` turns it into per-exit costs ``C_i`` in milliseconds.

A network is cut into the pieces :class:`aebnas.cost.PieceCosts` walks (the stem, each block
at its input size, each exit-branch module, each exit classifier, the head); the table holds
the median latency of each piece on the machine that profiled it, for one runtime (ONNX
Runtime or PyTorch eager), thread count and batch size. ``C_i`` of a network is then the
sum of its pieces up to exit i, as for MACs, and the expected latency of the dynamic
network is Σ u_i · C_i. ``benchmarks/latency_prediction.py`` measures how far that is
from the latency of the exported network.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .config import ArchConfig, ExitModuleConfig, SpaceValues, random_arch, uniform_arch
from .cost import PieceCosts
from .exit_policy import ExitCosts
from .export import DeployedEarlyExitNet
from .nn import EarlyExitNet, torch_confidence
from .onnx_export import write_onnx
from .onnx_runner import OnnxEarlyExitNet
from .settings import LATENCY_BACKENDS

BACKENDS = LATENCY_BACKENDS
TABLE_FORMAT = "aebnas latency table"
SAVE_EVERY = 20  # pieces between writes of a table being profiled (a killed profile resumes)
ROUNDS = 5  # a piece's timed runs are spread over this many rounds through its batch of 20 pieces
CALIBRATION_PASSES = 5  # passes over the calibration images per measurement; the median is kept


def piece_id(key: tuple) -> str:
    """A piece's key as it appears in a table: JSON of its parts (dataclasses as dicts)."""
    return json.dumps([dataclasses.asdict(k) if dataclasses.is_dataclass(k) else k for k in key])


def covering_archs(space: SpaceValues, **kwargs: Any) -> list[ArchConfig]:
    """Architectures that together use every piece ``space`` can build (every block choice of
    every stage at every resolution, every exit branch at every position, stem and head).

    Blocks: one network of maximal depth per (resolution, kernel, expansion) — the first
    block of a stage and the later ones differ. Exit branches: every first module, and every
    second module after every first, at every position, per resolution.
    """
    depth = max(space.depths)
    firsts = [ExitModuleConfig(c, k, e, p) for c in space.exit_m1_channels for k in space.exit_kernels
              for e in space.exit_expansions for p in space.exit_pools]
    seconds = [None] + [ExitModuleConfig(c, k, e, p) for c in space.exit_m2_channels if c > 0
                        for k in space.exit_kernels for e in space.exit_expansions for p in space.exit_pools]
    k0, e0 = space.kernels[0], space.expansions[0]
    archs = []
    for r in space.resolutions:
        archs += [uniform_arch(depth, k, e, resolution=r, **kwargs) for k in space.kernels for e in space.expansions]
        archs += [uniform_arch(depth, k0, e0, exits=space.exit_positions, exit_module=m1, second_module=m2,
                               resolution=r, **kwargs) for m1 in firsts for m2 in seconds]
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


# ----------------------------------------------------------------- timing
def time_torch(module: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``module(x)`` (eval, no_grad) after ``warmup`` calls."""
    module.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            module(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def onnx_session(module: nn.Module, x: torch.Tensor, threads: int) -> Any:
    """An ONNX Runtime session (CPU, ``threads`` intra-op threads) of ``module`` exported at ``x``'s shape.

    Pieces are plain feed-forward modules of fixed shape, so torch's TorchScript-based exporter
    (0.1 s a piece) is used here; the deployed network's graphs come from the ``torch.export``-based
    one (2–4 s a graph, too slow for the hundreds of pieces of a space)."""
    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), buffer, dynamo=False, input_names=["x"], opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def time_onnx(session: Any, x: np.ndarray, warmup: int, repeats: int) -> list[float]:
    times = []
    feed = {session.get_inputs()[0].name: x}
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def machine_info() -> dict[str, Any]:
    """Where a table was measured: platform, CPU model, cores, versions."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        import onnxruntime
        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(), "versions": versions}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; else what ``platform`` knows)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


# ----------------------------------------------------------------- profile
@dataclasses.dataclass(frozen=True)
class ProfileRequest:
    """What ``aebnas latency profile`` measures."""

    out: str
    space: SpaceValues = SpaceValues()
    width_mult: float = 1.0
    num_classes: int = 10
    in_channels: int = 3
    threads: int = 1
    batch: int = 1
    backends: tuple[str, ...] = BACKENDS
    warmup: int = 10
    repeats: int = 30
    calibration_networks: int = 6  # whole dynamic networks measured to fit the calibration (0: none)
    calibration_images: int = 200

    def __post_init__(self) -> None:
        for name in ("threads", "batch", "repeats", "num_classes", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} must be ≥ 0")
        if self.calibration_networks < 0 or self.calibration_images < 1:
            raise ValueError(f"calibration_networks={self.calibration_networks} must be ≥ 0 and "
                             f"calibration_images={self.calibration_images} ≥ 1")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ValueError(f"backends {list(self.backends)}: choose from {BACKENDS}")

    def settings(self) -> dict[str, Any]:
        """What decides the figures (a table resumes only under the same settings)."""
        return {"space": {k: list(v) for k, v in dataclasses.asdict(self.space).items()},
                "width_mult": self.width_mult, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "threads": self.threads, "batch": self.batch, "warmup": self.warmup, "repeats": self.repeats,
                "calibration_networks": self.calibration_networks, "calibration_images": self.calibration_images}


def profile(request: ProfileRequest, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every piece of the space with every backend; write ``request.out`` as it goes.

    A table at ``out`` with the same settings is resumed (its pieces are not measured again);
    one with other settings is refused. Returns the table.
    """
    if "onnxruntime" in request.backends:
        try:
            import onnxruntime
        except ImportError:
            onnxruntime = None
        if onnxruntime is None:
            raise ValueError('the onnxruntime backend needs onnxruntime: pip install "aebnas[onnx]" '
                             "(or --backends torch)")
    out = Path(request.out).expanduser()
    settings = request.settings()
    table: dict[str, Any] = {"format": TABLE_FORMAT, "settings": settings, "machine": machine_info(),
                             "unit": "ms", "statistic": "median", "backends": {b: {} for b in request.backends}}
    if out.is_file():
        old = json.loads(out.read_text())
        if old.get("format") != TABLE_FORMAT or old.get("settings") != settings:
            raise ValueError(f"{out} holds a latency table with other settings; choose another --out")
        for b in request.backends:
            table["backends"][b] = old.get("backends", {}).get(b, {})
        # calibrations already fitted are kept: running the profile again on a finished table
        # changes nothing, and one killed while calibrating goes on with the next backend
        kept = {b: c for b, c in old.get("calibration", {}).items() if b in request.backends}
        if kept:
            table["calibration"] = kept
        if "date" in old:
            table["date"] = old["date"]
    kw = {"width_mult": request.width_mult, "num_classes": request.num_classes, "in_channels": request.in_channels}
    pieces = space_pieces(covering_archs(request.space, **kw))
    todo = [(b, pid) for b in request.backends for pid in pieces if pid not in table["backends"][b]]
    for backend in {b for b, _ in todo}:  # pieces measured now: that backend's calibration is fitted again
        table.get("calibration", {}).pop(backend, None)
    log(f"latency profile: {len(pieces)} pieces × {len(request.backends)} backend(s), "
        f"{len(pieces) * len(request.backends) - len(todo)} already in {out}; measuring {len(todo)} "
        f"(batch {request.batch}, {request.threads} thread(s), {request.warmup} warm-up + {request.repeats} runs)")
    torch.set_num_threads(request.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0, last_report = time.perf_counter(), 0.0
    torch.manual_seed(0)
    done = 0
    for start in range(0, len(todo), SAVE_EVERY):
        chunk = todo[start:start + SAVE_EVERY]
        runs: list[Callable[[], list[float]]] = []
        for backend, pid in chunk:  # build every piece of the chunk, then time them in interleaved rounds
            piece = pieces[pid]
            module = piece.build().eval()
            x = torch.randn(request.batch, *piece.shape)
            if backend == "torch":
                time_torch(module, x, request.warmup, 0)
                runs.append(lambda m=module, x=x, n=0: time_torch(m, x, 0, n))
            else:
                session = onnx_session(module, x, request.threads)
                time_onnx(session, x.numpy(), request.warmup, 0)
                runs.append(lambda s=session, x=x.numpy(), n=0: time_onnx(s, x, 0, n))
        times: list[list[float]] = [[] for _ in chunk]
        per_round = [request.repeats // ROUNDS + (r < request.repeats % ROUNDS) for r in range(ROUNDS)]
        for n_runs in per_round:
            for i, run in enumerate(runs):
                times[i] += run(n=n_runs)
        for (backend, pid), t in zip(chunk, times):
            table["backends"][backend][pid] = statistics.median(t)
        _write(out, table)
        done += len(chunk)
        elapsed = time.perf_counter() - t0
        if elapsed - last_report >= 5 or done == len(todo):
            last_report = elapsed
            backend, pid = chunk[-1]
            log(f"  [{done}/{len(todo)}] {backend} {pieces[pid].key[0]}: {table['backends'][backend][pid]:.3f} ms  "
                f"({elapsed:.0f} s, ETA {elapsed / done * (len(todo) - done):.0f} s)")
    changed = bool(todo)
    if request.calibration_networks:
        table.setdefault("calibration", {})
        for backend in request.backends:
            if backend not in table["calibration"]:
                table["calibration"][backend] = calibrate(request, table, backend, log)
                _write(out, table)
                changed = True
    if changed or "date" not in table:  # the date the table was finished
        table["date"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    _write(out, table)
    log(f"wrote {out}")
    return table


# ----------------------------------------------------------------- calibration
def calibrate(request: ProfileRequest, table: dict[str, Any], backend: str,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit how whole dynamic networks differ from the sum of their pieces on this machine.

    A network run as a whole is not the sum of its pieces run alone: caches are colder, the
    exit rule (confidence, comparing, splitting the batch) and the preprocessing cost time,
    and ONNX Runtime pays a call per graph. For ``calibration_networks`` random networks of
    the space (random weights), each run as deployed (``backend``: the ONNX export and its
    driver, or ``DeployedEarlyExitNet`` in PyTorch) on random images at its resolution —
    once with every exit off, once with every exit on at its median confidence — the mean
    time per image is fitted by least squares as ``scale · Σ u_i P_i + per_exit_ms · Σ u_i A_i
    + per_image_ms``: P_i the pieces' sum up to exit i, A_i the exits a sample leaving at i
    has evaluated, u_i the fraction that left there. :class:`LatencyTable` applies it.
    """
    kw = {"width_mult": request.width_mult, "num_classes": request.num_classes, "in_channels": request.in_channels}
    raw = LatencyTable(table, backend)
    rng, rows, measured = random.Random(12345), [], []
    torch.manual_seed(12345)
    for n in range(request.calibration_networks):
        arch = random_arch(request.space, rng, **kw)
        net = EarlyExitNet(arch).eval()
        images = torch.rand(request.calibration_images, arch.in_channels, arch.resolution, arch.resolution)
        with torch.no_grad():
            outputs = net(images)
        median = [float(torch_confidence(o, net.confidence).median()) for o in outputs[:-1]]
        costs = raw.raw_exit_costs(arch)
        runner = _deployed_runner(net, backend, request.threads)
        for th in ([1.0] * arch.num_exits, median):
            runner.set_thresholds(th)
            ms, exits = _time_per_image(runner, images, request.batch, request.warmup)
            u = np.bincount(exits, minlength=arch.num_exits + 1) / len(exits)
            active = np.asarray(th) < 1.0
            evaluated = np.cumsum(active)
            a = np.r_[evaluated, evaluated[-1] if len(evaluated) else 0]  # exits evaluated by a sample leaving at i
            rows.append([float(u @ costs.cumulative(active)), float(u @ a), 1.0])
            measured.append(ms)
        log(f"  calibration {backend} [{n + 1}/{request.calibration_networks}]: sum of pieces "
            f"{rows[-1][0]:.3f} ms, measured {measured[-1]:.3f} ms (exits on), "
            f"{rows[-2][0]:.3f} / {measured[-2]:.3f} ms (exits off)")
    x, y = np.asarray(rows), np.asarray(measured)
    coef = _nonnegative_fit(x, y)
    fitted = x @ coef
    result = {"scale": float(coef[0]), "per_exit_ms": float(coef[1]), "per_image_ms": float(coef[2]),
              "networks": request.calibration_networks,
              "raw_error_pct": float(np.mean(np.abs(x[:, 0] - y) / y) * 100),
              "fitted_error_pct": float(np.mean(np.abs(fitted - y) / y) * 100)}
    log(f"  calibration {backend}: time ≈ {result['scale']:.3f} × pieces + {result['per_exit_ms']:.3f} ms per exit "
        f"evaluated + {result['per_image_ms']:.3f} ms per image (mean error on these networks "
        f"{result['raw_error_pct']:.1f}% → {result['fitted_error_pct']:.1f}%)")
    return result


def _nonnegative_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of y on the columns of x with every coefficient ≥ 0 (x has 3 columns: the scale
    is always fitted; the two overheads are each fitted or held at 0, whichever fits best)."""
    best, best_err = np.r_[float(y @ x[:, 0] / (x[:, 0] @ x[:, 0])), 0.0, 0.0], np.inf
    for cols in ([0], [0, 1], [0, 2], [0, 1, 2]):
        c = np.linalg.lstsq(x[:, cols], y, rcond=None)[0]
        if np.all(c >= 0):
            coef = np.zeros(3)
            coef[cols] = c
            err = float(np.sum((x @ coef - y) ** 2))
            if err < best_err:
                best, best_err = coef, err
    return best


class _Runner:
    """A network as deployed in one runtime: ``set_thresholds(th)`` then ``(images) → (logits, exits)``."""

    def __init__(self, call: Callable[[Any], tuple[np.ndarray, np.ndarray]], set_th: Callable[[list], None]):
        self._call, self._set = call, set_th

    def set_thresholds(self, th: Sequence[float]) -> "_Runner":
        self._set(list(th))
        return self

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self._call(images)


def _deployed_runner(net: nn.Module, backend: str, threads: int) -> _Runner:
    arch = net.arch
    mean, std = [0.5] * arch.in_channels, [0.25] * arch.in_channels
    classes = [str(i) for i in range(arch.num_classes)]
    if backend == "torch":
        torch.set_num_threads(threads)
        module = DeployedEarlyExitNet(net, [1.0] * arch.num_exits, mean, std, classes)

        def call(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            logits, exits = module(x)
            return logits.numpy(), exits.numpy()
        return _Runner(call, lambda th: module.net.set_thresholds(th))
    tmp = tempfile.mkdtemp(prefix="aebnas_calibration_")
    meta = {"thresholds": [1.0] * arch.num_exits, "classes": classes, "resolution": arch.resolution,
            "in_channels": arch.in_channels,
            "exits": [{"position": p} for p in arch.exit_positions] + [{"position": "final"}]}
    write_onnx(net, mean, std, meta, Path(tmp), log=lambda _: None)
    onnx_net = OnnxEarlyExitNet(tmp, threads=threads)  # the sessions hold the graphs: the files can go
    shutil.rmtree(tmp, ignore_errors=True)

    def call_onnx(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        logits, exits, _ = onnx_net(x.numpy())
        return logits, exits

    def set_onnx(th: list) -> None:
        onnx_net.thresholds = th
    return _Runner(call_onnx, set_onnx)


def _time_per_image(runner: _Runner, images: torch.Tensor, batch: int, warmup: int,
                    passes: int = CALIBRATION_PASSES) -> tuple[float, np.ndarray]:
    """Mean ms per image over ``images`` in calls of ``batch`` (the median of ``passes`` passes: one
    pass is easily disturbed on a shared machine); the exits taken."""
    for i in range(warmup):
        runner(images[i % len(images):i % len(images) + batch])
    means = []
    for _ in range(passes):
        exits = []
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            exits.append(runner(images[i:i + batch])[1])
        means.append((time.perf_counter() - t0) * 1e3 / len(images))
    return statistics.median(means), np.concatenate(exits)


def _write(path: Path, table: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(table, indent=0))
    tmp.replace(path)


# ----------------------------------------------------------------- use
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
    m = {f"{prefix}avg_ms": float(sim.avg_macs)}
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
        self._costs = PieceCosts(measure=self._lookup)

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
        """Per-exit pieces in milliseconds (as :func:`aebnas.cost.exit_costs` in MMACs), calibrated
        when the table has a calibration for this backend: ``scale`` × the pieces, plus
        ``per_exit_ms`` on every exit branch (paid when it is evaluated) and ``per_image_ms`` on
        the backbone (paid by every image)."""
        raw = self.raw_exit_costs(arch)
        c = self.calibration
        if not c:
            return raw
        return ExitCosts(backbone=c["scale"] * raw.backbone + c["per_image_ms"],
                         branch=c["scale"] * raw.branch + c["per_exit_ms"])

    def raw_exit_costs(self, arch: ArchConfig) -> ExitCosts:
        """The sums of the table's pieces, without calibration."""
        self.check(arch)
        return self._costs.exit_costs(arch)

    def describe(self) -> str:
        m, s = self.table["machine"], self.table["settings"]
        return (f"{self.backend} on {m['cpu']} ({s['threads']} thread(s), batch {s['batch']}; "
                f"{self.path.name}, {self.table.get('date', 'unfinished')})")
