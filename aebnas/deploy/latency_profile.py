"""``aebnas latency profile``: measure every piece a space can build on this machine, with ONNX
Runtime and PyTorch, and fit how whole deployed networks differ from the sums of their pieces.

The table it writes is read by :class:`aebnas.cost.latency.LatencyTable`; the pieces and the
networks that cover them come from :mod:`aebnas.cost.latency`. Only the profiler exports ONNX and
times modules, so a trial that reads a table never loads this module.
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
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..config import SpaceValues, random_arch
from .torchscript import DeployedEarlyExitNet
from ..files import atomic_write
from ..cost.latency import TABLE_FORMAT, LatencyTable, Piece, covering_archs, space_pieces
from ..nn import EarlyExitNet, torch_confidence
from .onnx_export import write_onnx
from ..onnx_runner import OnnxEarlyExitNet
from ..settings import LATENCY_BACKENDS

SAVE_EVERY = 20  # pieces between writes of a table being profiled (a killed profile resumes)
ROUNDS = 5  # a piece's timed runs are spread over this many rounds through its batch of 20 pieces
CALIBRATION_PASSES = 5  # passes over the calibration images per measurement; the median is kept


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
    backends: tuple[str, ...] = LATENCY_BACKENDS
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
        unknown = [b for b in self.backends if b not in LATENCY_BACKENDS]
        if unknown or not self.backends:
            raise ValueError(f"backends {list(self.backends)}: choose from {LATENCY_BACKENDS}")

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
    _require_onnxruntime(request)
    out = Path(request.out).expanduser()
    table = _new_or_resumed_table(request, out)
    pieces = space_pieces(covering_archs(request.space, **_arch_kwargs(request)))
    todo = [(b, pid) for b in request.backends for pid in pieces if pid not in table["backends"][b]]
    for backend in {b for b, _ in todo}:  # pieces measured now: that backend's calibration is fitted again
        table.get("calibration", {}).pop(backend, None)
    log(f"latency profile: {len(pieces)} pieces × {len(request.backends)} backend(s), "
        f"{len(pieces) * len(request.backends) - len(todo)} already in {out}; measuring {len(todo)} "
        f"(batch {request.batch}, {request.threads} thread(s), {request.warmup} warm-up + {request.repeats} runs)")
    torch.set_num_threads(request.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    _measure_pieces(request, table, pieces, todo, out, log)
    calibrated = _calibrate_missing(request, table, out, log)
    if todo or calibrated or "date" not in table:  # the date the table was finished
        table["date"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    _write(out, table)
    log(f"wrote {out}")
    return table


def _require_onnxruntime(request: ProfileRequest) -> None:
    """Refuse the onnxruntime backend, before anything is measured, when onnxruntime is not installed."""
    if "onnxruntime" in request.backends:
        try:
            import onnxruntime
        except ImportError:
            onnxruntime = None
        if onnxruntime is None:
            raise ValueError('the onnxruntime backend needs onnxruntime: pip install "aebnas[onnx]" '
                             "(or --backends torch)")


def _arch_kwargs(request: ProfileRequest) -> dict[str, Any]:
    """What every network of the request has in common besides its space."""
    return {"width_mult": request.width_mult, "num_classes": request.num_classes, "in_channels": request.in_channels}


def _new_or_resumed_table(request: ProfileRequest, out: Path) -> dict[str, Any]:
    """An empty table for ``request``, or the one at ``out`` to go on with; ValueError if that one has other
    settings."""
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
    return table


def _measure_pieces(request: ProfileRequest, table: dict[str, Any], pieces: dict[str, Piece],
                    todo: list[tuple[str, str]], out: Path, log: Callable[[str], None]) -> None:
    """Time the ``todo`` (backend, piece) pairs into ``table``, ``SAVE_EVERY`` at a time, writing the table
    after each chunk (a killed profile resumes); a progress line at most every 5 s."""
    t0, last_report = time.perf_counter(), 0.0
    torch.manual_seed(0)
    done = 0
    for start in range(0, len(todo), SAVE_EVERY):
        chunk = todo[start:start + SAVE_EVERY]
        times = _interleaved_times(_warm_runs(request, pieces, chunk), request.repeats)
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


def _warm_runs(request: ProfileRequest, pieces: dict[str, Piece], chunk: list[tuple[str, str]]
               ) -> list[Callable[..., list[float]]]:
    """Build every piece of the chunk and warm it up; for each, ``run(n=…)`` times that many calls."""
    runs: list[Callable[..., list[float]]] = []
    for backend, pid in chunk:
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
    return runs


def _interleaved_times(runs: list[Callable[..., list[float]]], repeats: int) -> list[list[float]]:
    """Milliseconds of ``repeats`` timed calls of each run, spread over ``ROUNDS`` rounds through all of them."""
    times: list[list[float]] = [[] for _ in runs]
    per_round = [repeats // ROUNDS + (r < repeats % ROUNDS) for r in range(ROUNDS)]
    for n_runs in per_round:
        for i, run in enumerate(runs):
            times[i] += run(n=n_runs)
    return times


def _calibrate_missing(request: ProfileRequest, table: dict[str, Any], out: Path,
                       log: Callable[[str], None]) -> bool:
    """Fit the calibration of every backend that lacks one (if the request asks for any), writing the table
    after each; whether any was fitted."""
    if not request.calibration_networks:
        return False
    table.setdefault("calibration", {})
    fitted = False
    for backend in request.backends:
        if backend not in table["calibration"]:
            table["calibration"][backend] = calibrate(request, table, backend, log)
            _write(out, table)
            fitted = True
    return fitted


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
    kw = _arch_kwargs(request)
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
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(table, indent=0)))
