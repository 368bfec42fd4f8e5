"""Ship a retrained run: one TorchScript file with its exits, and prediction on image files.

``export`` turns a run directory written by ``aebnas retrain`` into one TorchScript file
whose ``forward`` does the whole inference: input normalisation, resize to the trained
resolution, then ``EarlyExitNet.infer`` — the network's own exit rule, with its tuned
thresholds and confidence measure as buffers and attributes. It loads with
``torch.jit.load`` alone (no aebnas). ``predict`` classifies image files with such a file.
This module needs torch only: ``aebnas predict`` never imports Ray.
"""
# No `from __future__ import annotations` here: TorchScript reads the class-level attribute
# annotations of the exported module and cannot evaluate them as strings.

import copy
import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..exit_policy import ExitCosts, ExitOutputs, load_exit_outputs, simulate, tune_thresholds, validate_thresholds
from ..nn import EarlyExitNet, torch_confidence
from ..onnx_runner import OnnxEarlyExitNet
from ..data.images import open_image, square
from ..data.preprocess import Preprocess
from ..progress import Log, print_line
from ..settings import (ARCH_FILE, CHECKPOINT_FILE, EXIT_OUTPUTS_FILE, METRICS_FILE, MODEL_FILE, THRESHOLDS_FILE,
                       TrialSettings, parse_trial_config)
from ..training.loop import load_checkpoint


class DeployedEarlyExitNet(nn.Module):
    """An EarlyExitNet with its preprocessing inside, for ``torch.jit.script``.

    ``forward(images)``: images (N, C, H, W), float in [0, 1] or uint8 in 0..255, any H and
    W; returns (logits (N, classes) float32, exit index (N,) int64) where index j <
    ``num_exits`` is the j-th exit of the architecture and ``num_exits`` the final
    classifier: ``EarlyExitNet.infer`` itself, on the normalised, resized images.
    """

    classes: List[str]
    exit_positions: List[int]
    mean: List[float]
    std: List[float]

    def __init__(self, net: EarlyExitNet, thresholds: Sequence[float],
                 mean: Sequence[float], std: Sequence[float], classes: Sequence[str]) -> None:
        super().__init__()
        arch = net.arch
        th = validate_thresholds(thresholds, net.num_exits)
        if len(classes) != arch.num_classes or len(mean) != arch.in_channels or len(std) != arch.in_channels:
            raise ValueError(f"{len(classes)} classes, mean {list(mean)} and std {list(std)} do not fit a network "
                             f"of {arch.num_classes} classes and {arch.in_channels} channels")
        self.net = copy.deepcopy(net).eval().set_thresholds(th)
        self.num_exits = net.num_exits
        self.in_channels, self.resolution = arch.in_channels, arch.resolution
        self.exit_positions = list(arch.exit_positions)
        self.classes, self.mean, self.std = list(classes), [float(m) for m in mean], [float(s) for s in std]
        # The same rule as training batches: normalise (uint8 or float), resize to the trained resolution.
        self.preprocess = Preprocess(self.mean, self.std, self.resolution)
        self.eval()

    @torch.jit.export
    def exit_confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """Confidence (the model's measure) of each row of ``logits``."""
        return torch_confidence(logits, self.net.confidence)

    @torch.jit.export
    def thresholds(self) -> List[float]:
        """The exit thresholds (1.0 = exit off)."""
        return self.net.thresholds.tolist()

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.net.infer(self.preprocess(images))


@dataclass
class RunFiles:
    """A finished run directory, loaded: the network in eval mode and what export needs."""

    net: EarlyExitNet
    thresholds: list[float]
    confidence: str
    metrics: dict[str, Any]
    exit_outputs: dict[str, ExitOutputs]
    costs: ExitCosts
    settings: TrialSettings


def load_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory written by ``retrain``; UsageError naming what is missing."""
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise UsageError(f"run directory {root} does not exist (write one with `aebnas retrain`)")
    missing = [f for f in (ARCH_FILE, MODEL_FILE, THRESHOLDS_FILE, METRICS_FILE, EXIT_OUTPUTS_FILE)
               if not (root / f).is_file()]
    if missing:
        hint = " (training unfinished? rerun the same `aebnas retrain` to resume)" \
            if (root / CHECKPOINT_FILE).is_file() else ""
        raise UsageError(f"{root} lacks {', '.join(missing)}{hint}")
    try:
        arch, settings = parse_trial_config(json.loads((root / ARCH_FILE).read_text()))
    except ValueError as exc:  # json.JSONDecodeError is one too
        raise UsageError(f"{root / ARCH_FILE}: {exc}") from None
    th = json.loads((root / THRESHOLDS_FILE).read_text())
    net = EarlyExitNet(arch, th["confidence"])
    try:
        net.load_state_dict(load_checkpoint(root / MODEL_FILE))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except RuntimeError as exc:  # load_state_dict: missing keys or other shapes
        raise UsageError(f"{root / MODEL_FILE} does not hold the network of {root / ARCH_FILE} "
                         f"({str(exc).splitlines()[0]})") from None
    splits, costs = load_exit_outputs(root / EXIT_OUTPUTS_FILE)
    return RunFiles(net.eval(), [float(t) for t in th["thresholds"]], th["confidence"],
                    json.loads((root / METRICS_FILE).read_text()), splits, costs, settings)


def _plan(run_dir: str | Path, target_macs: float | None,
          thresholds: Sequence[float] | None) -> Tuple[RunFiles, List[float], dict[str, Any]]:
    """The run, the thresholds to ship (the run's, re-tuned for ``target_macs`` on its validation
    outputs, or given) and the metadata every export format carries."""
    run = load_run(run_dir)
    th, target = run.thresholds, run.metrics["target_macs"]
    if target_macs is not None:
        s = run.settings
        th = tune_thresholds(run.exit_outputs["val"], run.costs, target_macs, s.threshold_grid,
                             s.score_lambda).thresholds
        target = target_macs
    if thresholds is not None:
        th, target = validate_thresholds(thresholds, run.net.num_exits), None
    data = run.metrics["data"]
    test = simulate(run.exit_outputs["test"], th, run.costs)
    arch = run.net.arch
    exit_macs = [float(c) for c in run.costs.cumulative(np.asarray(th) < 1.0)]
    meta = {
        "format": "aebnas TorchScript early-exit network",
        "input": INPUT_CONTRACT, "output": OUTPUT_CONTRACT,
        "resolution": arch.resolution, "in_channels": arch.in_channels, "classes": data["classes"],
        "mean": data["mean"], "std": data["std"], "confidence": run.confidence, "thresholds": th,
        "target_macs": target,
        "exits": [{"index": j, "position": p, "threshold": th[j], "active": th[j] < 1.0,
                   "macs": exit_macs[j]} for j, p in enumerate(arch.exit_positions)]
        + [{"index": arch.num_exits, "position": "final", "macs": exit_macs[-1]}],
        "static_macs": run.costs.static_cost,
        "test": {"accuracy": test.accuracy, "avg_macs": test.avg_cost,
                 "utilization": [float(u) for u in test.utilization]},
        "architecture": arch.to_flat(),
        "run_dir": str(Path(run_dir).resolve()),
    }
    return run, th, meta


def _log_export(log: Log, what: str, meta: dict[str, Any]) -> None:
    test = meta["test"]
    log(f"exported {what}: thresholds {meta['thresholds']}, test accuracy {test['accuracy']:.2f}% "
        f"at {test['avg_macs']:.3f} MMACs")


def export(run_dir: str | Path, out: str | Path, *, target_macs: float | None = None,
           thresholds: Sequence[float] | None = None, log: Log = print_line) -> dict[str, Any]:
    """Write the TorchScript file ``out`` and ``out`` with suffix .json; returns that JSON.

    Thresholds: the run's (tuned on val for its target), re-tuned on the run's validation
    outputs for ``target_macs``, or given explicitly.
    """
    run, th, meta = _plan(run_dir, target_macs, thresholds)
    data = run.metrics["data"]
    module = DeployedEarlyExitNet(run.net, th, data["mean"], data["std"], data["classes"])
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, indent=1)
    with quiet_torchscript():
        scripted = torch.jit.script(module)
        scripted.save(str(out), _extra_files={"model.json": text})
    out.with_suffix(".json").write_text(text)
    _log_export(log, f"{out} and {out.with_suffix('.json')}", meta)
    return meta


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Silence torch.jit's deprecation notice: TorchScript is still the format that keeps
    data-dependent control flow and loads without the Python code (torch.export would
    need every exit rewritten with torch.cond)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
        yield


INPUT_CONTRACT = ("one tensor (N, C, H, W): float32 RGB (or gray when C = 1) in [0, 1], or uint8 in 0..255; "
                  "any H and W (resized bilinearly, without antialiasing, to the square training "
                  "resolution; downscale large images with an antialiased filter first); "
                  "normalisation with the training mean/std happens inside")
OUTPUT_CONTRACT = ("(logits (N, classes) float32, exit (N,) int64): exit j < len(exit_positions) is the "
                   "j-th exit (after stage exit_positions[j]), len(exit_positions) the final classifier")


# ----------------------------------------------------------------- predict
@dataclass
class Prediction:
    path: str
    class_index: int
    class_name: str
    probability: float   # softmax probability of the class
    confidence: float    # the model's exit confidence measure
    exit: int            # 0-based; num_exits = final classifier
    num_exits: int
    position: int | None  # backbone stage the exit follows; None for the final classifier


def load_deployed(path: str | Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` an exported model; UsageError naming the file if it is not one."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"model file {p} does not exist (write one with `aebnas export RUN_DIR --out {p}`)")
    try:
        with quiet_torchscript():
            module = torch.jit.load(str(p), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"{p} is not a TorchScript file ({str(exc).splitlines()[0]})") from None
    if not all(hasattr(module, a) for a in ("classes", "resolution", "in_channels", "exit_positions")):
        raise UsageError(f"{p} is a TorchScript file but not one written by `aebnas export`")
    return module


def read_image(path: str | Path, channels: int, resolution: int) -> torch.Tensor:
    """An image file as uint8 (1, C, H, W), RGB or gray, decoded as a folder dataset's images are
    (:mod:`aebnas.data.images`: upright, 8 bits, the middle square); shrunk (antialiased) to
    ``resolution`` if larger."""
    from PIL import Image

    try:
        img = square(open_image(path)).convert("RGB" if channels == 3 else "L")
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 — whatever Pillow raises for a file it cannot decode
        raise UsageError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None
    if max(img.size) > resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BILINEAR, reducing_gap=None)
    array = np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)


Outputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class _Exported:
    """An exported model as ``predict`` uses it: ``run(images)`` → (logits, exit, confidence)."""

    run: Callable[[torch.Tensor], Outputs]
    classes: List[str]
    resolution: int
    in_channels: int
    exit_positions: List[int]


def _load_exported(path: Path) -> _Exported:
    """A TorchScript file, or an ONNX export directory (run with ONNX Runtime)."""
    if path.is_dir():
        try:
            net = OnnxEarlyExitNet(path)
        except ImportError:
            raise UsageError(f'{path} is an ONNX export; running it needs onnxruntime: pip install "aebnas[onnx]"') \
                from None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return _Exported(lambda x: tuple(torch.from_numpy(a) for a in net(x.numpy())),  # type: ignore[misc]
                         net.classes, net.resolution, net.in_channels, net.exit_positions)
    module = load_deployed(path)

    def run(x: torch.Tensor) -> Outputs:
        logits, exit_index = module(x)
        return logits, exit_index, module.exit_confidence(logits)

    return _Exported(run, list(module.classes), int(module.resolution), int(module.in_channels),
                     list(module.exit_positions))


def predict(model_path: str | Path, images: Sequence[str | Path]) -> list[Prediction]:
    """Classify image files with an exported model (a TorchScript file, or an ONNX export directory);
    UsageError listing every unreadable file."""
    model = _load_exported(Path(model_path).expanduser())
    tensors, errors = [], []
    for path in images:
        try:
            tensors.append(read_image(path, model.in_channels, model.resolution))
        except UsageError as exc:
            errors.append(str(exc))
    if errors:
        raise UsageError("\n".join(errors))
    num_exits = len(model.exit_positions)
    out = []
    for path, x in zip(images, tensors):
        logits, exit_index, confidence = model.run(x)
        probs = torch.softmax(logits, dim=1)[0]
        k, j = int(probs.argmax()), int(exit_index[0])
        out.append(Prediction(str(path), k, model.classes[k], float(probs[k]), float(confidence[0]), j, num_exits,
                              None if j == num_exits else int(model.exit_positions[j])))
    return out


def format_prediction(p: Prediction) -> str:
    """``cat.png  cat  0.82  exit 2/3 (stage 3)``: path, class, probability, exit taken."""
    where = "final" if p.position is None else f"stage {p.position}"
    return f"{p.path}  {p.class_name}  {p.probability:.2f}  exit {p.exit + 1}/{p.num_exits + 1} ({where})"


