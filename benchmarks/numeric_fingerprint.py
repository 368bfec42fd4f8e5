"""Before/after equality check for changes that must not change any output (refactors).

Runs the package's numeric paths through its command line, on fixed seeds and inputs, and
keeps what they print and write: exit costs (``aebnas info``), inherited scoring and
thresholds (a random and a surrogate search on the embedded supernet), training from scratch
(a tiny search and ``aebnas retrain``), thresholds in milliseconds (``--cost latency`` on a
latency table measured once and shared), a supernet epoch (``aebnas supernet train --workers 0``),
the TorchScript and ONNX exports with ``aebnas predict`` on test images, and the analysis'
post-hoc tables. Timings and paths are left out.

    python benchmarks/numeric_fingerprint.py OUT --tree OLD_CHECKOUT [--table T]  # before
    python benchmarks/numeric_fingerprint.py OUT2 --table OUT/table.json           # after
    python benchmarks/numeric_fingerprint.py --compare OUT OUT2

``--tree`` runs another checkout's code (e.g. ``git worktree add /tmp/before HEAD``); the
latency table is measured in the first run and must be passed to the second (timings differ
run to run, the costs computed from one table must not). Takes about 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parents[1]
# Values that are timings, dates, hosts or paths: they differ between runs of the same code.
VOLATILE = ("time", "date", "timestamp", "hostname", "node_ip", "pid", "path", "dir", "logdir", "checkpoint",
            "seconds", "iterations_since_restore", "host", "machine", "elapsed", "images_per_s", "per_s",
            "trial_id", "experiment_tag", "out", "storage", "supernet", "data_dir", "created", "finished")


def _volatile(key: str) -> bool:
    k = key.lower()
    # "_s" only as a suffix (time_total_s): as a substring it would drop e.g. val_acc_smallest.
    return k.endswith("_s") or any(v in k for v in VOLATILE)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in sorted(obj.items()) if not _volatile(str(k))}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _sh(tree: Path, *argv: str, out: Path | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def _cli(tree: Path, *argv: str) -> str:
    return _sh(tree, "-m", "aebnas.cli", *argv)


def _arrays(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k].tolist() for k in sorted(z.files)}


def _experiment(tree: Path, exp_dir: Path) -> dict[str, Any]:
    trials = {}
    for trial in sorted(p for p in exp_dir.iterdir() if p.is_dir() and p.name.startswith("train_candidate")):
        arch = json.loads((trial / "arch.json").read_text())
        key = hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:12]
        lines = [json.loads(x) for x in (trial / "result.json").read_text().splitlines() if x.strip()]
        info = json.loads(_cli(tree, "info", "--json", str(trial / "arch.json")))
        outputs = trial / "exit_outputs.npz"
        trials[key] = {"arch": arch, "results": _clean(lines), "info": _clean(info),
                       "exit_outputs": _arrays(outputs) if outputs.exists() else None}
    return trials


def _tensors(path: Path) -> dict[str, Any]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            flat[prefix] = hashlib.sha1(obj.detach().contiguous().numpy().tobytes()).hexdigest()
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}[{i}]", v)
        elif not _volatile(prefix.rsplit(".", 1)[-1]):
            flat[prefix] = obj if isinstance(obj, (int, float, str, bool, type(None))) else repr(obj)
    walk("", state)
    return flat


def fingerprint(out: Path, tree: Path, table: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(tree))
    from aebnas.data.datasets import embedded_dataset_path
    from aebnas.training.supernet_file import EMBEDDED_SUPERNET

    small = out / "small.npz"
    with np.load(embedded_dataset_path()) as z:
        np.savez(small, x_train=z["x_train"][:600], y_train=z["y_train"][:600], x_test=z["x_test"][:200],
                 y_test=z["y_test"][:200], classes=z["classes"])
    results = out / "results"
    shutil.rmtree(results, ignore_errors=True)
    common = ["--scheduler", "fifo", "--seed", "0", "--storage-path", str(results), "--max-concurrent", "2"]
    inherited = ["--dataset", "cifar10-subset", "--supernet", str(EMBEDDED_SUPERNET), "--epochs", "0",
                 "--resolutions", "32,36,40", "--width-mult", "0.75", "--target-macs", "5"]
    tiny = ["--dataset", str(small), "--val-size", "100", "--resolutions", "32", "--width-mult", "0.25",
            "--target-macs", "1", "--batch-size", "64", "--supernet", "none"]
    _cli(tree, "search", *inherited, "--num-samples", "6", "--name", "inherited", *common)
    _cli(tree, "search", *inherited, "--space", "fixed_exits", "--num-samples", "3", "--name", "fixed", *common)
    _cli(tree, "search", *inherited, "--search-alg", "surrogate", "--surrogate-batch", "3", "--num-samples", "12",
         "--name", "surrogate", *common)
    _cli(tree, "search", *tiny, "--epochs", "1", "--num-samples", "2", "--name", "scratch", *common)
    if table is None:
        table = out / "table.json"
        _cli(tree, "latency", "profile", "--out", str(table), "--resolutions", "32", "--width-mult", "0.25",
             "--backends", "torch", "--warmup", "1", "--repeats", "3", "--calibration-networks", "2")
    _cli(tree, "search", *tiny, "--epochs", "1", "--num-samples", "2", "--name", "latency", "--cost", "latency",
         "--latency-table", str(table), "--latency-backend", "torch", "--target-ms", "0.5", *common)

    record: dict[str, Any] = {"experiments": {}, "runs": {}}
    for name in ("inherited", "fixed", "surrogate", "scratch", "latency"):
        record["experiments"][name] = _experiment(tree, results / name)
    log = results / "surrogate" / "surrogate_log.jsonl"
    record["surrogate_log"] = _clean([json.loads(x) for x in log.read_text().splitlines() if x.strip()])

    runs = {"scratch": ["--best", "--epochs", "1", "--device", "cpu"],
            "inherited": ["--best", "--inherit", "--epochs", "0", "--device", "cpu"]}
    images = out / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    from PIL import Image
    with np.load(embedded_dataset_path()) as z:
        for i in range(16):
            Image.fromarray(z["x_test"][i]).save(images / f"{i:02d}.png")
    pngs = [str(p) for p in sorted(images.glob("*.png"))]
    for name, flags in runs.items():
        run_dir = out / f"run_{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        _cli(tree, "retrain", str(results / name), *flags, "--out", str(run_dir))
        entry = {"metrics": _clean(json.loads((run_dir / "metrics.json").read_text())),
                 "model": _tensors(run_dir / "model.pt")}
        ts = out / f"{name}.ts"
        onnx_dir = out / f"{name}_onnx"
        shutil.rmtree(onnx_dir, ignore_errors=True)
        _cli(tree, "export", str(run_dir), "--out", str(ts))
        _cli(tree, "export", str(run_dir), "--out", str(onnx_dir), "--format", "onnx")
        _cli(tree, "export", str(run_dir), "--out", str(out / f"{name}_retuned.ts"), "--target-macs", "2")
        entry["model_json"] = _clean(json.loads(ts.with_suffix(".json").read_text())) \
            if ts.with_suffix(".json").exists() else None
        for label, model in (("torchscript", ts), ("onnx", onnx_dir), ("retuned", out / f"{name}_retuned.ts")):
            entry[f"predict_{label}"] = _clean(json.loads(_cli(tree, "predict", "--json", str(model), *pngs)))
        record["runs"][name] = entry

    sn = out / "supernet"
    shutil.rmtree(sn, ignore_errors=True)
    _cli(tree, "supernet", "train", "--dataset", str(small), "--val-size", "100", "--resolutions", "32",
         "--width-mult", "0.25", "--epochs", "1", "--batch-size", "64", "--workers", "0", "--out", str(sn))
    record["supernet"] = _tensors(sn / "supernet.pt")

    analysis = out / "analysis"
    shutil.rmtree(analysis, ignore_errors=True)
    _sh(tree, "-m", "analysis", str(results / "inherited"), str(results / "fixed"), "--out", str(analysis))
    record["analysis"] = {p.name: p.read_text() for p in sorted(analysis.glob("*.csv"))}
    (out / "fingerprint.json").write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
    print(f"wrote {out / 'fingerprint.json'}")


def _diff(a: Any, b: Any, path: str, found: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                found.append(f"{path}.{k}: only in {'after' if k not in a else 'before'}")
            else:
                _diff(a[k], b[k], f"{path}.{k}", found)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", found)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b)):
        found.append(f"{path}: {str(a)[:120]} != {str(b)[:120]}")


def compare(before: Path, after: Path) -> int:
    a = json.loads((before / "fingerprint.json").read_text())
    b = json.loads((after / "fingerprint.json").read_text())
    found: list[str] = []
    _diff(a, b, "", found)
    print("\n".join(found[:60]) if found else "identical: every recorded value is equal")
    print(f"{len(found)} differences; compared {len(json.dumps(a)):,} characters of outputs")
    return 1 if found else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--tree", type=Path, default=HERE, help="checkout whose code runs (default: this one)")
    parser.add_argument("--table", type=Path, help="latency table measured by an earlier run")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("OUT is required (or --compare BEFORE AFTER)")
    fingerprint(args.out.resolve(), args.tree.resolve(), args.table.resolve() if args.table else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
