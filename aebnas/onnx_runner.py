"""Run an early-exit network exported by ``aebnas export --format onnx``: numpy and onnxruntime only.

This file is self-contained on purpose: ``aebnas export`` copies it into the export
directory as ``aebnas_onnx.py``, so a device that has only ``numpy`` and ``onnxruntime``
runs the network with its exits::

    import numpy as np
    from aebnas_onnx import OnnxEarlyExitNet      # the copy next to model.json

    net = OnnxEarlyExitNet("deploy/model_onnx")
    logits, exits, confidence = net(images)       # images: (N, C, H, W) uint8 or float32 in [0, 1]

The export directory holds one ONNX graph per segment of the network, cut at the exits:
``segment_0.onnx`` (normalisation, resize to the trained resolution, stem and the stages
up to the first exit), ``segment_k.onnx`` (the stages up to the next exit; the last one
ends with the head and gives the final classifier's logits), and ``exit_j.onnx`` for
each exit branch. Every graph that gives logits also gives their confidence (the
network's measure). The exit rule is applied here, between the graphs, exactly as
``EarlyExitNet.infer`` applies it: a sample leaves at the first exit whose confidence ≥
its threshold and is not computed any further; an exit with threshold ≥ 1.0 is never run.
``model.json`` holds the thresholds, classes, preprocessing and costs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, List, Sequence

import numpy as np

FORMAT = "aebnas ONNX early-exit network"
META_FILE = "model.json"


def validate_thresholds(thresholds: List[float], num_exits: int) -> List[float]:
    """Thresholds as a list of floats (any sequence of numbers from Python), one per exit, each in
    [0, 1] (1.0 disables the exit); raises ValueError naming the first bad one otherwise.

    The one check of thresholds: ``aebnas.exit_policy`` and the exported TorchScript model
    (``EarlyExitNet.infer`` compiles it, so it is written in TorchScript's subset) use this one,
    which lives here because this file must run with numpy and onnxruntime alone.
    """
    th = [float(t) for t in thresholds]
    if len(th) != num_exits:
        raise ValueError(f"thresholds has {len(th)} values but the network has {num_exits} exits")
    for j, t in enumerate(th):
        if not 0.0 <= t <= 1.0:  # NaN fails too
            raise ValueError(f"thresholds[{j}]={t} is not in [0, 1] (1.0 disables the exit)")
    return th


class OnnxEarlyExitNet:
    """The exported network: ``net(images)`` → (logits (N, classes) float32, exit (N,) int64,
    confidence (N,) float32). Exit j < ``num_exits`` is the j-th exit, ``num_exits`` the final classifier.

    ``threads``: intra-op threads of every ONNX Runtime session (default: ONNX Runtime's
    choice); ``providers``: ONNX Runtime execution providers (default: CPU).
    """

    def __init__(self, directory: str | os.PathLike, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        self.directory = Path(directory).expanduser()
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise ValueError(f"{self.directory} is not an ONNX export of aebnas: it has no {META_FILE} "
                             "(write one with `aebnas export RUN_DIR --format onnx --out DIR`)")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not the {META_FILE} of an aebnas ONNX export "
                             f"(format {self.meta.get('format')!r})")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        chosen = list(providers) if providers else ["CPUExecutionProvider"]

        def session(name: str) -> Any:
            return ort.InferenceSession(str(self.directory / name), options, providers=chosen)

        graphs = self.meta["graphs"]
        self.segments = [session(name) for name in graphs["segments"]]
        self.exit_sessions = [session(name) for name in graphs["exits"]]
        self._segment_inputs = [s.get_inputs()[0].name for s in self.segments]
        self._exit_inputs = [s.get_inputs()[0].name for s in self.exit_sessions]
        self.classes: list[str] = list(self.meta["classes"])
        self.resolution, self.in_channels = int(self.meta["resolution"]), int(self.meta["in_channels"])
        self.exit_positions: list[int] = [int(e["position"]) for e in self.meta["exits"][:-1]]
        self.num_exits = len(self.exit_positions)
        self.thresholds = self.meta["thresholds"]

    @property
    def thresholds(self) -> list[float]:
        """The exit thresholds (1.0 = exit off); assign a list to change them."""
        return list(self._thresholds)

    @thresholds.setter
    def thresholds(self, values: Sequence[float]) -> None:
        self._thresholds = validate_thresholds(list(values), len(self.exit_positions))

    def preprocess_input(self, images: np.ndarray) -> np.ndarray:
        """(N, C, H, W) uint8 in 0..255 or float in [0, 1] → float32 in [0, 1].

        The rest of the input rule (normalise, resize: ``aebnas/data/preprocess.py``) is inside segment_0;
        only this dtype step lives here, in numpy, so the driver needs no torch."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"images must have shape (N, {self.in_channels}, H, W), got {images.shape}")
        if images.dtype == np.uint8:
            return images.astype(np.float32) / np.float32(255.0)
        if np.issubdtype(images.dtype, np.floating):
            return images.astype(np.float32, copy=False)
        raise ValueError(f"images must be float in [0, 1] or uint8, got {images.dtype}")

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = self.preprocess_input(images)
        n = x.shape[0]
        logits_out = np.zeros((n, len(self.classes)), dtype=np.float32)
        exit_out = np.full(n, self.num_exits, dtype=np.int64)
        confidence_out = np.zeros(n, dtype=np.float32)
        remaining = np.arange(n)
        h = x
        for k, segment in enumerate(self.segments):
            if remaining.size == 0:
                break
            outputs = segment.run(None, {self._segment_inputs[k]: h})
            if k == len(self.segments) - 1:  # the head: the final classifier
                logits_out[remaining], confidence_out[remaining] = outputs[0], outputs[1]
                break
            h = outputs[0]
            j = k  # segment k ends where exit k sits
            if self._thresholds[j] < 1.0:
                logits, confidence = self.exit_sessions[j].run(None, {self._exit_inputs[j]: h})
                leave = confidence >= np.float32(self._thresholds[j])
                idx = remaining[leave]
                logits_out[idx], exit_out[idx], confidence_out[idx] = logits[leave], j, confidence[leave]
                stay = ~leave
                h, remaining = h[stay], remaining[stay]
        return logits_out, exit_out, confidence_out
