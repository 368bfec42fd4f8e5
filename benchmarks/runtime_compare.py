"""Claim 20: ONNX Runtime vs PyTorch eager vs TorchScript on the same exported dynamic network.

Networks of the shipped supernet's space with its weights (BatchNorm recalibrated), thresholds
tuned on validation for ``target_fraction`` × the network's static MMACs (as claim 19), run on
the test split with the exits by each runtime: the ONNX export through its driver
(``aebnas_onnx.py``), ``DeployedEarlyExitNet`` in PyTorch eager mode, and the same module as
TorchScript (``aebnas export``'s format). Mean milliseconds per image at batch 1 (one image
per call) and batch 64, with 1 and 2 threads; the ratios are from one run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from harness.claims import Claim
from harness.common import Context, Outcome, main, md_table
from harness.latency import per_image_ms, random_dynamic_networks, write_onnx_export

CLAIM = Claim(20, "runtime_compare", "ONNX Runtime vs PyTorch eager vs TorchScript",
              "figures: per-image latency of the same dynamic network in each runtime, batch 1 and 64 "
              "(ratios from one run)")
SETTINGS = dict(archs=3, target_fraction=0.6, threads=(1, 2), batch_sizes=(1, 64), warmup=10, passes=3,
                images=None, seed=1)
QUICK = dict(SETTINGS, archs=1, threads=(1,), warmup=1, passes=1, images=64)


def per_image_ms_batched(fn: Callable[[np.ndarray], Any], images: np.ndarray, batch: int, warmup: int,
                         passes: int) -> float:
    """Median over ``passes`` of the mean milliseconds per image, in calls of ``batch`` images."""
    if batch == 1:
        return per_image_ms(fn, images, warmup, passes)
    for _ in range(warmup):
        fn(images[:batch])
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            fn(images[i:i + batch])
        times.append((time.perf_counter() - t0) * 1e3 / len(images))
    return float(np.median(times))


def measure(ctx: Context, archs: int, target_fraction: float, threads: tuple[int, ...],
            batch_sizes: tuple[int, ...], warmup: int, passes: int, images: int | None, seed: int) -> Outcome:
    from aebnas.data.datasets import load_dataset
    from aebnas.deploy.torchscript import DeployedEarlyExitNet, quiet_torchscript
    from aebnas.onnx_runner import OnnxEarlyExitNet
    from aebnas.training.supernet_file import EMBEDDED_SUPERNET, load_supernet

    supernet, info = load_supernet(EMBEDDED_SUPERNET, "cpu")
    data = load_dataset(info.dataset, val_size=info.val_size, seed=info.split_seed)
    x_test = data.x_test if images is None else data.x_test[:images]
    rows: list[dict[str, Any]] = []
    for i, arch, net, th, _, macs in random_dynamic_networks(supernet, info, data, archs, seed, target_fraction):
        module = DeployedEarlyExitNet(net, th, data.mean, data.std, data.classes).eval()
        with quiet_torchscript():
            scripted = torch.jit.script(module)
        with tempfile.TemporaryDirectory() as tmp:
            write_onnx_export(net, th, data, Path(tmp))
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                onnx_net = OnnxEarlyExitNet(tmp, threads=n_threads)
                runtimes = {"ONNX Runtime": onnx_net,
                            "PyTorch eager": lambda x: module(torch.from_numpy(x)),
                            "TorchScript": lambda x: scripted(torch.from_numpy(x))}
                _, onnx_exits, _ = onnx_net(x_test)
                _, torch_exits = module(torch.from_numpy(x_test))
                for batch in batch_sizes:
                    ms = {name: per_image_ms_batched(fn, x_test, batch, warmup, passes)
                          for name, fn in runtimes.items()}
                    row = {"arch": i, "resolution": arch.resolution, "MMACs static": macs.static_cost,
                           "early %": 100 * float(np.mean(torch_exits.numpy() < arch.num_exits)),
                           "threads": n_threads, "batch": batch,
                           **{f"{k} ms": v for k, v in ms.items()},
                           "eager / ORT": ms["PyTorch eager"] / ms["ONNX Runtime"],
                           "TorchScript / ORT": ms["TorchScript"] / ms["ONNX Runtime"],
                           "same exit ORT %": 100 * float(np.mean(onnx_exits == torch_exits.numpy()))}
                    rows.append(row)
                    print("  " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
    torch.set_num_threads(max(threads))

    def geo(col: str, batch: int) -> float:
        vals = [r[col] for r in rows if r["batch"] == batch]
        return float(np.exp(np.mean(np.log(vals))))

    summary = [{"batch": b, "eager / ORT (geometric mean)": geo("eager / ORT", b),
                "TorchScript / ORT (geometric mean)": geo("TorchScript / ORT", b)} for b in batch_sizes]
    measured = "; ".join(f"batch {s['batch']}: PyTorch eager {s['eager / ORT (geometric mean)']:.2f}× and "
                         f"TorchScript {s['TorchScript / ORT (geometric mean)']:.2f}× the time of ONNX Runtime"
                         for s in summary)
    details = "\n".join([
        f"{archs} random networks of the shipped supernet's space ({info.describe()}), its weights, BatchNorm "
        f"recalibrated, thresholds tuned on validation for {target_fraction:.0%} of each network's static MMACs "
        f"(as claim 19). {len(x_test)} test images (uint8, 32×32, resized inside each runtime). Mean ms per "
        f"image, median of {passes} passes after {warmup} warm-up calls; ONNX Runtime through the export's driver "
        "(`aebnas_onnx.py`), PyTorch eager and TorchScript through `DeployedEarlyExitNet` "
        "(`EarlyExitNet.infer` with preprocessing), all with the exits.", "",
        md_table(rows, 3), "", md_table(summary, 2)])
    return Outcome(measured, True, {"rows": rows, "summary": summary}, details)


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK))
