"""``aebnas export RUN --format onnx``: the network as ONNX graphs cut at the exits, plus a driver.

One graph per segment (see ``aebnas/onnx_runner.py``, which the export directory carries
as ``aebnas_onnx.py``): ONNX Runtime runs each graph, and the driver applies the exit rule
between them, so a sample that leaves at an exit costs only the graphs before it, as in
``EarlyExitNet.infer``. Why segments and not one graph with ``If`` nodes: an ``If`` branches
on one boolean for the whole batch, while the exit rule splits a batch per sample; the
segments keep the per-sample rule, each graph stays a plain feed-forward graph that every
ONNX runtime optimises, and the thresholds stay editable in ``model.json``.

Needs the ``onnx`` extra (``pip install "aebnas[onnx]"``: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, List, Sequence

import torch
from torch import nn

from ..errors import UsageError
from ..progress import Log, print_line
from .torchscript import _log_export, _plan
from ..nn import EarlyExitNet, torch_confidence
from .. import onnx_runner
from ..onnx_runner import FORMAT, META_FILE
from ..data.preprocess import Preprocess

RUNNER_FILE = "aebnas_onnx.py"
OPSET = 18


def require_onnx() -> None:
    """UsageError naming the extra when the ONNX exporter's packages are missing."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UsageError(f"ONNX export needs {', '.join(missing)}: pip install \"aebnas[onnx]\"")


class OnnxGraph(nn.Module):
    """What one exported graph computes: [normalise, resize] → ``body`` → [(logits, confidence)].

    ``preprocess``: (mean, std, resolution) for the first segment, which takes the images as
    float32 in [0, 1] of any size; ``confidence``: the measure, for graphs ending in logits.
    """

    def __init__(self, body: nn.Module, confidence: str | None = None,
                 preprocess: tuple[Sequence[float], Sequence[float], int] | None = None) -> None:
        super().__init__()
        self.body, self.confidence = body, confidence
        # The training rule on float input; a traced graph cannot branch on the input size, so it
        # always resizes (the identity at the trained size).
        self.preprocess = None if preprocess is None else Preprocess(*preprocess, always_resize=True)

    def forward(self, x: torch.Tensor) -> Any:
        if self.preprocess is not None:
            x = self.preprocess(x)
        x = self.body(x)
        if self.confidence is None:
            return x
        return x, torch_confidence(x, self.confidence)


def exit_graphs(net: EarlyExitNet, mean: Sequence[float], std: Sequence[float]) -> tuple[list[OnnxGraph],
                                                                                         list[OnnxGraph]]:
    """The segments (cut after each exit's stage; the last ends with the head) and the exit branches."""
    positions = list(net.arch.exit_positions)
    cuts = [0, *positions, len(net.stages)]
    segments: List[OnnxGraph] = []
    for k in range(len(cuts) - 1):
        parts: list[nn.Module] = [net.stem] if k == 0 else []
        parts += list(net.stages[cuts[k]:cuts[k + 1]])
        last = k == len(cuts) - 2
        if last:
            parts.append(net.head)
        segments.append(OnnxGraph(nn.Sequential(*parts), net.confidence if last else None,
                                  (mean, std, net.arch.resolution) if k == 0 else None).eval())
    branches = [OnnxGraph(net.branches[p - 1], net.confidence).eval() for p in positions]
    return segments, branches


def to_onnx(module: nn.Module, example: torch.Tensor, path: Path, outputs: Sequence[str],
            dynamic_size: bool = False) -> None:
    """Export ``module`` (one input) with the torch.export-based exporter; batch (and H, W) dynamic."""
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic_size:
        dims.update({2: torch.export.Dim("height", min=4, max=4096), 3: torch.export.Dim("width", min=4, max=4096)})
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET, input_names=["x"],
                                     output_names=list(outputs), dynamic_shapes=({0: dims[0]} if not dynamic_size
                                                                                  else dims,),
                                     optimize=True, verbose=False)
    program.save(str(path), external_data=False)


def export_onnx(run_dir: str | Path, out: str | Path, *, target_macs: float | None = None,
                thresholds: Sequence[float] | None = None, log: Log = print_line) -> dict[str, Any]:
    """Write the directory ``out``: ``model.json``, ``segment_k.onnx``, ``exit_j.onnx`` and the driver
    ``aebnas_onnx.py``; returns the metadata. Thresholds as in :func:`aebnas.deploy.torchscript.export`."""
    require_onnx()
    run, th, meta = _plan(run_dir, target_macs, thresholds)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; ONNX export writes a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise UsageError(f"--out {out} is a non-empty directory that is not an ONNX export; choose another")
    out.mkdir(parents=True, exist_ok=True)
    data = run.metrics["data"]
    write_onnx(run.net, data["mean"], data["std"], meta, out, log)
    _log_export(log, f"{out}/ ({len(meta['graphs']['segments']) + len(meta['graphs']['exits'])} ONNX graphs, "
                f"{META_FILE}, driver {RUNNER_FILE})", meta)
    return meta


def write_onnx(net: EarlyExitNet, mean: Sequence[float], std: Sequence[float], meta: dict[str, Any], out: Path,
               log: Log = print_line) -> None:
    """Write ``net``'s graphs, the driver and ``model.json`` (``meta`` plus the graph list) into ``out``.
    ``meta`` needs at least thresholds, classes, resolution, in_channels and exits (as export writes them)."""
    segments, branches = exit_graphs(net, mean, std)
    arch = net.arch
    graphs: dict[str, list[str]] = {"segments": [], "exits": []}
    total = len(segments) + len(branches)
    with torch.no_grad():
        # Example inputs of batch 2 (batch 1 would be specialised) and a size other than the
        # trained one (so the resize is not traced away).
        h = torch.rand(2, arch.in_channels, arch.resolution + 3, arch.resolution + 3)
        for k, segment in enumerate(segments):
            name = f"segment_{k}.onnx"
            last = k == len(segments) - 1
            log(f"  [{len(graphs['segments']) + len(graphs['exits']) + 1}/{total}] {name}")
            to_onnx(segment, h, out / name, ["logits", "confidence"] if last else ["features"], dynamic_size=k == 0)
            graphs["segments"].append(name)
            if not last:
                h = segment(h)
                name = f"exit_{k}.onnx"
                log(f"  [{len(graphs['segments']) + len(graphs['exits']) + 1}/{total}] {name}")
                to_onnx(branches[k], h, out / name, ["logits", "confidence"])
                graphs["exits"].append(name)
    import onnx
    import onnxruntime

    meta.update(format=FORMAT, graphs=graphs, opset=OPSET, runner=RUNNER_FILE,
                input="one array (N, C, H, W): uint8 in 0..255 or float32 in [0, 1], RGB (gray when C = 1); any "
                      "H and W (resized bilinearly, without antialiasing, to the square training resolution inside "
                      "segment_0; downscale large images with an antialiased filter first); normalisation with the "
                      "training mean/std happens inside segment_0",
                output="(logits (N, classes) float32, exit (N,) int64, confidence (N,) float32) from "
                       f"{RUNNER_FILE}: exit j < len(exit_positions) is the j-th exit, len(exit_positions) the final "
                       "classifier",
                versions={"torch": torch.__version__, "onnx": onnx.__version__,
                          "onnxruntime": onnxruntime.__version__})
    shutil.copyfile(onnx_runner.__file__, out / RUNNER_FILE)
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
