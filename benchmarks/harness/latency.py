"""Latency helpers shared by claims 19 (latency_prediction), 20 (runtime_compare) and 21
(latency_objective): the latency table of the shipped supernet's space on this machine, networks
built from the supernet with tuned thresholds, their ONNX export, and timing per image.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .common import Context

from aebnas.settings import LATENCY_BACKENDS

# How the table is profiled (claim 19's settings; claim 21 searches with the same table).
TABLE_SETTINGS = dict(warmup=10, repeats=30, calibration_networks=6)
TABLE_QUICK = dict(warmup=1, repeats=3, calibration_networks=1)


def table_path(ctx: Context) -> Path:
    """Where this claim keeps its latency table (claim 21 searches with the same table)."""
    return ctx.scratch.parent / "latency_prediction" / "table.json"


def setup(ctx: Context, warmup: int, repeats: int, calibration_networks: int,
          backends: tuple[str, ...] = LATENCY_BACKENDS):
    """The shipped supernet, its data, and a latency table of its space on this machine (resumed;
    one profiled with other settings is moved aside)."""
    from aebnas.data.datasets import load_dataset
    from aebnas.cost.latency import LatencyTable
    from aebnas.deploy.latency_profile import ProfileRequest, profile
    from aebnas.training.supernet_file import EMBEDDED_SUPERNET, load_supernet

    supernet, info = load_supernet(EMBEDDED_SUPERNET, "cpu")
    data = load_dataset(info.dataset, val_size=info.val_size, seed=info.split_seed)
    table = table_path(ctx)
    table.parent.mkdir(parents=True, exist_ok=True)
    request = ProfileRequest(out=str(table), space=info.space, width_mult=info.width_mult,
                             num_classes=info.num_classes, in_channels=info.in_channels, threads=1, batch=1,
                             backends=backends, warmup=warmup, repeats=repeats,
                             calibration_networks=calibration_networks)
    if table.is_file() and json.loads(table.read_text()).get("settings") != request.settings():
        print(f"  {table} was profiled with other settings: moved to {table.name}.old, profiling again", flush=True)
        table.replace(table.with_name(table.name + ".old"))
    profile(request, log=lambda m: print(m, flush=True))
    return supernet, info, data, {b: LatencyTable(table, b) for b in backends}


def inherited_network(supernet, info, data, arch, trial_settings=None):
    """The subnet with inherited weights, BatchNorm recalibrated and scored as ``aebnas supernet eval``
    does (the supernet's settings), or with ``trial_settings`` (a ``TrialSettings``) as that trial did.
    Returns (net, {"val": outputs, "test": outputs})."""
    from aebnas.training.loop import Scorer
    from aebnas.nn import extract

    cpu = torch.device("cpu")
    if trial_settings is None:
        scorer = Scorer.from_settings(data, arch.resolution, cpu, info.settings, eval_batch_size=512)
        net = extract(supernet, arch)
    else:
        t = trial_settings
        scorer = Scorer.from_settings(data, arch.resolution, cpu, t, confidence=t.confidence)
        net = extract(supernet, arch, t.confidence)
    return net, scorer(net, ("val", "test"))  # recalibrates net's BatchNorm in place, as a trial does


def dynamic_network(supernet, info, data, arch, target_fraction: float):
    """:func:`inherited_network` with thresholds tuned on val for a fraction of its static MACs.
    Returns (net, thresholds, test outputs, MAC costs)."""
    from aebnas.cost.macs import exit_costs
    from aebnas.exit_policy import tune_thresholds
    from aebnas.settings import TrialSettings

    settings = TrialSettings()
    net, outputs = inherited_network(supernet, info, data, arch)
    macs = exit_costs(arch)
    th = tune_thresholds(outputs["val"], macs, target_fraction * macs.static_cost, settings.threshold_grid,
                         settings.score_lambda).thresholds
    return net.eval().set_thresholds(th), list(th), outputs["test"], macs


def random_archs(info, count: int, seed: int):
    """``count`` random architectures of the supernet's space (width, classes, channels), seeded."""
    from aebnas.config import random_arch

    rng = random.Random(seed)
    kw = {"width_mult": info.width_mult, "num_classes": info.num_classes, "in_channels": info.in_channels}
    return [random_arch(info.space, rng, **kw) for _ in range(count)]


def random_dynamic_networks(supernet, info, data, archs: int, seed: int, target_fraction: float):
    """``archs`` random networks of the supernet's space as :func:`dynamic_network` makes them:
    yields (index, arch, net, thresholds, test outputs, MAC costs)."""
    for i, arch in enumerate(random_archs(info, archs, seed)):
        yield (i, arch, *dynamic_network(supernet, info, data, arch, target_fraction))


def write_onnx_export(net, thresholds, data, out: Path) -> None:
    """The ONNX export of ``net`` with ``thresholds`` into ``out`` (what `aebnas export --format onnx` writes)."""
    from aebnas.deploy.onnx_export import write_onnx

    arch = net.arch
    meta = {"thresholds": thresholds, "classes": list(data.classes), "resolution": arch.resolution,
            "in_channels": arch.in_channels,
            "exits": [{"position": p} for p in arch.exit_positions] + [{"position": "final"}]}
    write_onnx(net, data.mean, data.std, meta, out, log=lambda _: None)


def per_image_ms(fn, images: np.ndarray, warmup: int, passes: int = 1) -> float:
    """Mean milliseconds per image, each image alone (batch 1), after ``warmup`` images; the median
    of ``passes`` passes over the images."""
    for i in range(min(warmup, len(images))):
        fn(images[i:i + 1])
    means = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for i in range(len(images)):
            fn(images[i:i + 1])
        means.append((time.perf_counter() - t0) * 1e3 / len(images))
    return statistics.median(means)
