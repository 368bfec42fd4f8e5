"""Claim 19: the latency table predicts the measured latency of the dynamic network.

Profiles the shipped supernet's space on this machine (``aebnas latency profile``: batch 1,
1 thread, ONNX Runtime and PyTorch, calibrated on 6 random networks; kept in
``results/benchmarks/latency_prediction/`` and resumed), then for ``archs`` random networks of the space, each with the supernet's weights
(BatchNorm recalibrated, as a trial scores it) and thresholds tuned on validation for
``target_fraction`` × its static MMACs: the predicted average latency Σ u_i · C_i (C_i from the
table, u_i the exit utilization of those thresholds on the test split) against the
measured one — every test image, one at a time, through the ONNX export (its driver,
1 thread) and through ``EarlyExitNet.infer`` in PyTorch (1 thread): mean milliseconds per image.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.claims import Claim
from harness.common import Context, Outcome, main, md_table
from harness.latency import TABLE_QUICK, TABLE_SETTINGS, per_image_ms, random_dynamic_networks, setup, write_onnx_export

CLAIM = Claim(19, "latency_prediction", "Latency table predicts the dynamic network's latency",
              "mean absolute error of predicted vs measured average latency ≤ 10%, worst ≤ 20% (≥ 20 random "
              "architectures, batch 1, 1 thread, test split, tuned thresholds)")
SETTINGS = dict(archs=20, target_fraction=0.6, **TABLE_SETTINGS, passes=5, images=None, seed=0)
QUICK = dict(SETTINGS, archs=2, **TABLE_QUICK, passes=1, images=50)


def measure(ctx: Context, archs: int, target_fraction: float, warmup: int, repeats: int,
            calibration_networks: int, passes: int, images: int | None, seed: int) -> Outcome:
    from aebnas.exit_policy import exit_index
    from aebnas.onnx_runner import OnnxEarlyExitNet

    torch.set_num_threads(1)
    supernet, info, data, tables = setup(ctx, warmup, repeats, calibration_networks)
    x_test = data.x_test if images is None else data.x_test[:images]
    rows: list[dict[str, Any]] = []
    for i, arch, net, th, test, macs in random_dynamic_networks(supernet, info, data, archs, seed, target_fraction):
        taken = exit_index(test, th)[:len(x_test)]
        u = np.bincount(taken, minlength=arch.num_exits + 1) / len(taken)
        active = np.asarray(th) < 1.0
        predicted = {b: t.exit_costs(arch).expected(u, active) for b, t in tables.items()}
        raw = {b: t.raw_exit_costs(arch).expected(u, active) for b, t in tables.items()}
        with tempfile.TemporaryDirectory() as tmp:
            write_onnx_export(net, th, data, Path(tmp))
            onnx_net = OnnxEarlyExitNet(tmp, threads=1)
            _, onnx_exits, _ = onnx_net(x_test)
            onnx_ms = per_image_ms(onnx_net, x_test, warmup, passes)
        deployed = _torch_runner(net, th, data)
        torch_ms = per_image_ms(deployed, x_test, warmup, passes)
        row = {"arch": i, "resolution": arch.resolution, "exits": arch.num_exits, "active": int(active.sum()),
               "MMACs static": macs.static_cost, "MMACs avg": macs.expected(u, active),
               "early %": 100 * (1 - u[-1]), "same exit ONNX %": 100 * float(np.mean(onnx_exits == taken)),
               "ORT pred ms": predicted["onnxruntime"], "ORT meas ms": onnx_ms,
               "ORT err %": 100 * (predicted["onnxruntime"] - onnx_ms) / onnx_ms,
               "ORT raw err %": 100 * (raw["onnxruntime"] - onnx_ms) / onnx_ms,
               "torch pred ms": predicted["torch"], "torch meas ms": torch_ms,
               "torch err %": 100 * (predicted["torch"] - torch_ms) / torch_ms,
               "torch raw err %": 100 * (raw["torch"] - torch_ms) / torch_ms}
        rows.append(row)
        print(f"  arch {i}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float)), flush=True)

    def errors(backend: str) -> tuple[float, float]:  # "ORT", "torch", "ORT raw", "torch raw"
        e = [abs(r[f"{backend} err %"]) for r in rows]
        return statistics.mean(e), max(e)

    mae, worst = errors("ORT")
    torch_mae, torch_worst = errors("torch")
    raw_mae, raw_worst = errors("ORT raw")
    raw_torch_mae, raw_torch_worst = errors("torch raw")
    cal = {b: t.calibration for b, t in tables.items()}
    holds = bool(mae <= 10 and worst <= 20)
    measured = (f"ONNX Runtime: mean abs error {mae:.1f}%, worst {worst:.1f}% over {len(rows)} networks "
                f"(plain sums of pieces: {raw_mae:.1f}%, worst {raw_worst:.1f}%); PyTorch eager: {torch_mae:.1f}%, "
                f"worst {torch_worst:.1f}% (plain: {raw_torch_mae:.1f}%)")
    t = tables["onnxruntime"]
    details = "\n".join([
        f"Table: `aebnas latency profile` of the shipped supernet's space ({info.describe()}) on this machine, "
        f"batch 1, 1 thread, {warmup} warm-up + {repeats} timed runs per piece, median "
        f"({len(t.ms)} pieces per backend; {t.describe()}). Networks: {len(rows)} random ones of that space with "
        f"inherited weights, thresholds tuned on validation for {target_fraction:.0%} of each network's static "
        f"MMACs. Predicted: Σ u_i · C_i with C_i summed from the table and u_i the test utilization of those "
        f"thresholds. Measured: mean time per image over {len(x_test)} test images, one image per call, median of "
        f"{passes} passes after {warmup} warm-up images — ONNX Runtime through the export's driver (`aebnas_onnx.py`, 1 thread), "
        "PyTorch through `DeployedEarlyExitNet` (preprocessing + `EarlyExitNet.infer`, 1 thread). "
        "Error = (predicted − measured) / measured.", "",
        md_table(rows, 2), "",
        f"Mean absolute error with the table's calibration: ONNX Runtime **{mae:.1f}%** (worst {worst:.1f}%), "
        f"PyTorch eager **{torch_mae:.1f}%** (worst {torch_worst:.1f}%). Without it (`raw`: the plain sums of the "
        f"pieces): ONNX Runtime {raw_mae:.1f}% (worst {raw_worst:.1f}%), PyTorch eager {raw_torch_mae:.1f}% "
        f"(worst {raw_torch_worst:.1f}%). The calibration (fitted by `aebnas latency profile` on "
        f"{t.table['settings']['calibration_networks']} other random networks with random weights and random images, "
        "exits off and on): " + "; ".join(
            f"{b}: {c['scale']:.3f} × pieces + {c['per_exit_ms']:.3f} ms per exit evaluated + "
            f"{c['per_image_ms']:.3f} ms per image" for b, c in cal.items() if c) + ". "
        "`same exit ONNX %`: images whose exit in the ONNX export is the one the PyTorch outputs give "
        "(float rounding can move an image that sits on a threshold)."])
    return Outcome(measured, holds, {"rows": rows, "mae": mae, "worst": worst, "torch_mae": torch_mae,
                                     "torch_worst": torch_worst, "raw_mae": raw_mae, "raw_torch_mae": raw_torch_mae,
                                     "calibration": cal}, details)


def _torch_runner(net, thresholds, data):
    from aebnas.deploy.torchscript import DeployedEarlyExitNet

    module = DeployedEarlyExitNet(net, thresholds, data.mean, data.std, data.classes)

    def run(images: np.ndarray) -> Any:
        return module(torch.from_numpy(images))
    return run


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK))
