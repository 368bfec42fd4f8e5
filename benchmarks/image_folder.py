"""Claim 28: a folder of images as a dataset — decoding 70,000 PNGs, the cached reload, peak memory.

Fashion-MNIST's 60,000 training and 10,000 test images are written once as 28×28 PNG files in class
folders (``train/<class>/``, ``test/<class>/``, the layout a user brings); ``load_dataset`` then reads
the folder as ``aebnas search --dataset DIR`` does, in a fresh process each time: first with an
empty cache (every file decoded), then again (the decoded arrays read from the cache). Each process
resets its peak-RSS mark after its imports, so its peak is what loading the folder added.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from harness.claims import Claim
from harness.common import Context, Outcome, main, md_table, median

CLAIM = Claim(28, "image_folder", "A folder of images as a dataset: decoding, cached reload, memory",
              "70,000 28×28 PNGs in class folders decoded in ≤ 60 s on 2 cores, the cached reload ≤ 2 s, "
              "peak memory ≤ 2× the decoded arrays")
SETTINGS = dict(images=70_000, reloads=3)
QUICK = dict(images=2_000, reloads=2)
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")
MIB = 1024 * 1024


# ------------------------------------------------------------------ the folder
def _idx(name: str, offset: int) -> np.ndarray:
    with gzip.open(FASHION_MNIST / name) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def png_folder(ctx: Context, images: int) -> Path:
    """Fashion-MNIST as ``train/<class>/NNNNN.png`` and ``test/<class>/NNNNN.png``: the first ``images``
    in the proportions of its splits (6:1), written once (complete when its ``.done`` file is there)."""
    from PIL import Image

    root, done = ctx.scratch / f"fashion_mnist_png_{images}", ctx.scratch / f"fashion_mnist_png_{images}.done"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    n_test = images // 7
    for split, prefix, n in (("train", "train", images - n_test), ("test", "t10k", n_test)):
        x = _idx(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:n]
        y = _idx(f"{prefix}-labels-idx1-ubyte.gz", 8)[:n]
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(x[i]).save(root / split / CLASSES[y[i]] / f"{i:05d}.png")
    done.write_text("")
    return root


# ------------------------------------------------------------------ one load, in a fresh process
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def load_once(folder: str, cache: str) -> dict[str, Any]:
    """Load ``folder`` as a search does, in this (fresh) process: seconds, peak RSS added (MiB) and the
    decoded arrays' size (MiB)."""
    os.environ["AEBNAS_CACHE_DIR"] = cache
    import torchvision.datasets.folder  # noqa: F401 — imported before the peak mark is reset

    from aebnas.data import datasets, images  # noqa: F401

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
    base = _status_kib("VmRSS")
    lines: list[str] = []
    start = time.perf_counter()
    data = datasets.load_dataset(folder, log=lines.append)
    seconds = time.perf_counter() - start
    arrays = sum(getattr(data, f"x_{s}").nbytes for s in ("train", "val", "test"))
    return {"seconds": seconds, "peak_added_mib": (_status_kib("VmHWM") - base) / 1024,
            "arrays_mib": arrays / MIB, "summary": data.summary(), "log": lines}


def in_fresh_process(folder: Path, cache: Path) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(load_once, str(folder), str(cache)).result()


# ------------------------------------------------------------------ the claim
def measure_image_folder(ctx: Context, images: int, reloads: int) -> Outcome:
    """Claim 28: one cold load (empty cache), then ``reloads`` loads from the cache, each in a new process."""
    t0 = time.perf_counter()
    folder = png_folder(ctx, images)
    write_s = time.perf_counter() - t0
    cache = ctx.scratch / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cold = in_fresh_process(folder, cache)
    warm = [in_fresh_process(folder, cache) for _ in range(reloads)]
    warm_s, warm_peak = median([w["seconds"] for w in warm]), max(w["peak_added_mib"] for w in warm)
    ratio = max(cold["peak_added_mib"], warm_peak) / cold["arrays_mib"]
    goals = {"decode": cold["seconds"] <= 60, "reload": warm_s <= 2, "memory": ratio <= 2}
    measured = (f"{images:,} PNGs decoded in {cold['seconds']:.1f} s ({images / cold['seconds']:,.0f} images/s), "
                f"cached reload {warm_s:.2f} s, peak memory {ratio:.2f}× the decoded arrays "
                f"({cold['arrays_mib']:.1f} MiB)" + "".join(f"; {k} goal missed" for k, ok in goals.items() if not ok))
    rows = [{"load": "cold: every file decoded (empty cache)", "seconds": cold["seconds"],
             "peak RSS added (MiB)": cold["peak_added_mib"], "× decoded arrays": cold["peak_added_mib"] /
             cold["arrays_mib"]}]
    rows += [{"load": f"from the cache, run {i + 1}", "seconds": w["seconds"], "peak RSS added (MiB)":
              w["peak_added_mib"], "× decoded arrays": w["peak_added_mib"] / w["arrays_mib"]}
             for i, w in enumerate(warm)]
    details = "\n".join([
        f"Fashion-MNIST's first {images:,} images (6:1 train:test, as its splits) written as 28×28 grayscale PNG "
        f"files in class folders, `train/<class>/` and `test/<class>/` ({write_s:.0f} s to write, once; not part "
        "of the figures), then `load_dataset(DIR)` as `aebnas search --dataset DIR` calls it, each load in a "
        "fresh process (spawned) that resets its peak-RSS mark (`/proc/self/clear_refs`) after importing torch, "
        "torchvision and aebnas: the peak is what reading the folder added. The files were just written, so "
        "they are in the page cache: the cold figure is decoding, not disk reads.", "",
        md_table(rows, 2), "",
        f"Dataset: {cold['summary']}. What the cold load logged:", "",
        "\n".join(f"    {line}" for line in cold["log"]), "",
        "Goals: " + ", ".join(f"{k} {'met' if ok else '**missed**'}" for k, ok in goals.items()) + ".",
    ])
    return Outcome(measured=measured, holds=all(goals.values()),
                   figures={"images": images, "cold": {k: v for k, v in cold.items() if k != "log"},
                            "warm": [{k: v for k, v in w.items() if k != "log"} for w in warm],
                            "warm_median_s": warm_s, "peak_ratio": ratio, "write_s": write_s, "goals": goals},
                   details=details)


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure_image_folder, SETTINGS, QUICK))
