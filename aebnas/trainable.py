"""The Ray Tune function trainable: one trial = one candidate early-exit network.

``train_candidate(config, data)`` builds the network from the trial's flat config,
trains it, and after every epoch evaluates the validation split, tunes the exit
thresholds for the target MACs, writes ``arch.json`` and ``exit_outputs.npz`` in the trial
directory and reports the metric contract (DESIGN.md) with a checkpoint. The last epoch
adds test metrics with the thresholds tuned on validation. Ray-specific code stays in
this file; everything it calls runs without Ray.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from ray import tune

from .config import ArchConfig, is_arch_key
from .cost import exit_costs
from .data import BatchLoader, Dataset
from .exit_policy import ExitOutputs, SimResult, oracle, save_exit_outputs, simulate, tune_thresholds
from .nn import EarlyExitNet
from .settings import SETTING_KEYS, TrialSettings
from .train import (NonFiniteLossError, evaluate, make_optimizer, make_scheduler, recalibrate_bn, select_device,
                    train_one_epoch)

FAILURE_FILE = "failure.json"
ARCH_FILE = "arch.json"
EXIT_OUTPUTS_FILE = "exit_outputs.npz"
CHECKPOINT_FILE = "checkpoint.pt"


class TrialError(RuntimeError):
    """A trial that cannot succeed (cannot be built, diverged, out of memory).

    Deterministic: the trial writes ``failure.json`` and a retry fails at once with the
    same message instead of spending compute on the same failure again.
    """


def parse_trial_config(config: Mapping[str, Any]) -> tuple[ArchConfig, TrialSettings]:
    """Split a trial's flat config into the architecture and the fixed settings.

    Raises ValueError naming any key that is neither (or a bad value).
    """
    unknown = sorted(k for k in config if not is_arch_key(k) and k not in SETTING_KEYS)
    if unknown:
        raise ValueError(f"unknown trial config key(s) {unknown}; settings are {sorted(SETTING_KEYS)}, "
                         "architecture keys are described in aebnas.config")
    arch = ArchConfig.from_flat({k: v for k, v in config.items() if is_arch_key(k)})
    settings = TrialSettings(**{k: v for k, v in config.items() if k in SETTING_KEYS})
    return arch, settings


def resolved_config(arch: ArchConfig, settings: TrialSettings) -> dict[str, Any]:
    """The flat config of what a trial actually builds (``arch.json``)."""
    return {**arch.to_flat(), **settings.to_dict()}


def epoch_metrics(arch: ArchConfig, val: ExitOutputs, sim: SimResult, score: float,
                  static_macs: float) -> dict[str, Any]:
    """The contract metrics of one epoch (validation split, tuned thresholds)."""
    m: dict[str, Any] = {"score": score, "accuracy": sim.accuracy, "avg_macs": sim.avg_macs,
                         "final_accuracy": float(val.exit_accuracy()[-1]), "static_macs": static_macs}
    acc = val.exit_accuracy()
    for j, pos in enumerate(arch.exit_positions):
        m[f"exit{pos}_accuracy"] = float(acc[j])
        m[f"exit{pos}_util"] = float(sim.utilization[j])
        m[f"exit{pos}_macs"] = float(sim.costs[j])
        m[f"exit{pos}_threshold"] = float(sim.thresholds[j])
    m["final_util"] = float(sim.utilization[-1])
    m["final_macs"] = float(sim.costs[-1])
    m["thresholds"] = [float(t) for t in sim.thresholds]
    m["num_exits"] = arch.num_exits
    return m


def _trial_dir() -> Path:
    # Ray moves each trial into its own working directory and, with
    # SyncConfig(sync_artifacts=True), uploads that directory to the trial's storage dir.
    # get_trial_dir() is not that directory on a fresh actor (it is the driver's staging
    # dir) and files written there by a reused actor are never uploaded.
    return Path.cwd()


def _stored_failure_file() -> tuple[Any, str] | None:
    """(pyarrow filesystem, path) of the trial's failure.json under storage_path, or None outside Tune.

    Unlike the working directory, storage_path is the same for a retry on another node and
    for a resumed search (a new Ray session and working directory).
    """
    try:
        storage = tune.get_context().get_storage()
        return storage.storage_filesystem, f"{storage.trial_fs_path}/{FAILURE_FILE}"
    except Exception:  # not in a Ray Tune trial (or Ray's developer API changed): the local record remains
        return None


def _fail(trial_dir: Path, message: str) -> TrialError:
    record = json.dumps({"error": message, "time": time.time()})
    (trial_dir / FAILURE_FILE).write_text(record)
    stored = _stored_failure_file()
    if stored is not None:
        fs, path = stored
        try:
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(path) as f:
                f.write(record.encode())
        except OSError:  # the local record still stops retries on this node
            pass
    return TrialError(message)


def _previous_failure(trial_dir: Path) -> str | None:
    """The error of an earlier attempt of this trial that failed deterministically, if any."""
    local = trial_dir / FAILURE_FILE
    if local.exists():
        return json.loads(local.read_text())["error"]
    stored = _stored_failure_file()
    if stored is None:
        return None
    fs, path = stored
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())["error"]
    except (OSError, ValueError):  # not there (pyarrow raises FileNotFoundError, an OSError)
        return None


def _is_out_of_memory(exc: BaseException) -> bool:
    """Whether an allocation failed: GPU out of memory, MemoryError, or torch's CPU allocator refusing."""
    # On CPU torch raises a plain RuntimeError: "[enforce fail at alloc_cpu.cpp:…] …
    # DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes".
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _out_of_memory(trial_dir: Path, when: str, exc: BaseException) -> TrialError:
    return _fail(trial_dir, f"{when}: out of memory ({type(exc).__name__}: {exc}); "
                 "lower batch_size or resolution, or give each trial more memory")


def _threads_for_trial() -> int:
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:  # outside Ray: fall back to one thread per trial
        cpus = 1
    return max(1, int(cpus))


def train_candidate(config: dict[str, Any], data: Dataset) -> None:
    """Ray Tune function trainable (use with ``tune.with_parameters(train_candidate, data=...)``)."""
    trial_dir = _trial_dir()
    trial_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_failure(trial_dir)
    if previous is not None:
        raise TrialError(previous + " (failed before; not retried)")
    try:
        arch, settings = parse_trial_config(config)
        arch = arch.replace(num_classes=data.num_classes, in_channels=data.in_channels)
        # Seed before the weights are drawn: with reused actors the global RNG otherwise
        # carries the previous trial's state, and one candidate scores differently per search.
        torch.manual_seed(settings.seed)
        model = EarlyExitNet(arch)
        costs = exit_costs(arch)
    except (ValueError, RuntimeError, MemoryError) as exc:
        if _is_out_of_memory(exc):
            raise _out_of_memory(trial_dir, "building the candidate", exc) from exc
        raise _fail(trial_dir, f"candidate cannot be built: {exc}") from exc

    torch.set_num_threads(_threads_for_trial())
    device = select_device(settings.device)
    model.to(device)
    ts = settings.train_settings()
    train_batches = BatchLoader.for_split(data, "train", batch_size=ts.batch_size,
                                          resolution=arch.resolution, train=True, device=device,
                                          seed=settings.seed)
    calib_batches = BatchLoader.for_split(data, "train", batch_size=ts.batch_size,
                                          resolution=arch.resolution, train=False, device=device)
    eval_loaders = {split: BatchLoader.for_split(data, split, batch_size=settings.eval_batch_size,
                                                 resolution=arch.resolution, train=False, device=device)
                    for split in ("val", "test")}
    optimizer = make_optimizer(model, ts)
    scheduler = make_scheduler(optimizer, ts, len(train_batches))

    start_epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        torch.set_rng_state(state["torch_rng"])

    (trial_dir / ARCH_FILE).write_text(json.dumps(resolved_config(arch, settings), indent=1))
    static_macs = costs.static_macs
    node = {"node_ip": _node_ip(), "node_id": _node_id(), "hostname": platform.node(), "pid": os.getpid(),
            "device": str(device)}

    for epoch in range(start_epoch, settings.epochs):
        train_batches.set_epoch(epoch)
        try:
            stats = train_one_epoch(model, train_batches, optimizer, scheduler, ts)
            t_eval = time.perf_counter()
            recalibrate_bn(model, calib_batches, ts.bn_recalibration_batches)
            outputs = {split: evaluate(model, loader, settings.confidence) for split, loader in eval_loaders.items()}
        except NonFiniteLossError as exc:
            raise _fail(trial_dir, f"epoch {epoch + 1}: {exc}") from exc
        except (RuntimeError, MemoryError) as exc:
            if not _is_out_of_memory(exc):
                raise
            raise _out_of_memory(trial_dir, f"epoch {epoch + 1}", exc) from exc
        tuned = tune_thresholds(outputs["val"], costs, settings.target_macs, settings.threshold_grid,
                                settings.score_lambda)
        metrics: dict[str, Any] = epoch_metrics(arch, outputs["val"], tuned.result, tuned.score, static_macs)
        orc = oracle(outputs["val"], costs)
        metrics.update({"epoch": epoch + 1, "epochs": settings.epochs, "loss": stats["loss"],
                        "train_seconds": stats["seconds"], "eval_seconds": time.perf_counter() - t_eval,
                        "images_per_s": stats["images_per_s"], "oracle_accuracy": orc.accuracy,
                        "oracle_macs": orc.avg_macs, "target_macs": settings.target_macs, **node})
        if epoch + 1 == settings.epochs:
            test = simulate(outputs["test"], tuned.thresholds, costs)
            metrics.update({"test_accuracy": test.accuracy, "test_avg_macs": test.avg_macs,
                            "test_final_accuracy": float(outputs["test"].exit_accuracy()[-1])})
        save_exit_outputs(trial_dir / EXIT_OUTPUTS_FILE, outputs, costs)
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                        "torch_rng": torch.get_rng_state(), "arch": arch.to_flat(),
                        "thresholds": tuned.thresholds}, Path(tmp) / CHECKPOINT_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _node_id() -> str:
    """Ray's id of the node running the trial (nodes on one machine share an IP)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return ""


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostbyname(socket.gethostname())


__all__ = ["train_candidate", "parse_trial_config", "resolved_config", "TrialSettings", "TrialError",
           "epoch_metrics", "SETTING_KEYS", "ARCH_FILE", "EXIT_OUTPUTS_FILE", "CHECKPOINT_FILE",
           "FAILURE_FILE"]
