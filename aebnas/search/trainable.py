"""The Ray Tune function trainable: one trial = one candidate early-exit network.

``train_candidate(config, data)`` builds the network from the trial's flat config,
trains it, and after every epoch evaluates the validation split, tunes the exit
thresholds for the target MACs, writes ``arch.json`` and ``exit_outputs.npz`` in the trial
directory and reports the metric contract (docs/design.md) with a checkpoint. The last epoch
adds test metrics with the thresholds tuned on validation. Ray-specific code stays in
this file; everything it calls runs without Ray.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray import tune

from ..config import ArchConfig
from ..cost.macs import exit_costs
from ..data.datasets import Dataset
from ..exit_policy import (ExitCosts, ExitOutputs, SimResult, TuneResult, oracle, save_exit_outputs, simulate,
                           tune_thresholds)
from ..cost.latency import LatencyTable, latency_metrics
from ..progress import Progress, print_line
from ..settings import (ARCH_FILE, CHECKPOINT_FILE, EXIT_OUTPUTS_FILE, SETTING_KEYS, TrialSettings,
                       parse_trial_config, resolved_config)
from ..training.supernet_file import inherited_network
from .trials import FAILURE_FILE, permanent_failure
from ..training.loop import CandidateTraining, NonFiniteLossError, load_checkpoint, select_device



class TrialError(RuntimeError):
    """A trial that failed, with a message saying why."""


class CandidateFailure(TrialError):
    """A failure that is the candidate's own and would repeat: it cannot be built, or its loss diverged.

    Permanent: the trial writes ``failure.json`` (under ``storage_path``) and every retry,
    including after ``--resume``, fails at once with the same message instead of spending
    compute on it again. Everything else (out of memory, a lost node, any error of the
    environment) is not recorded: Ray Tune retries it (``max_failures``) and ``--resume``
    runs it again.
    """


def epoch_metrics(arch: ArchConfig, val: ExitOutputs, sim: SimResult, score: float,
                  static_macs: float) -> dict[str, Any]:
    """The contract metrics of one epoch (validation split, tuned thresholds)."""
    m: dict[str, Any] = {"score": score, "accuracy": sim.accuracy, "avg_macs": sim.avg_cost,
                         "final_accuracy": float(val.exit_accuracy()[-1]), "static_macs": static_macs}
    acc = val.exit_accuracy()
    for j, pos in enumerate(arch.exit_positions):
        m[f"exit{pos}_accuracy"] = float(acc[j])
        m[f"exit{pos}_util"] = float(sim.utilization[j])
        m[f"exit{pos}_macs"] = float(sim.costs[j])
        m[f"exit{pos}_threshold"] = float(sim.thresholds[j])
    m["final_util"] = float(sim.utilization[-1])
    m["early_exit"] = 1.0 - float(sim.utilization[-1])  # fraction of images that leave at an exit
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


def _fail(trial_dir: Path, message: str) -> CandidateFailure:
    """Record a permanent candidate failure (locally and under storage_path); returns the error to raise."""
    record = json.dumps({"error": message, "permanent": True, "time": time.time()})
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
    return CandidateFailure(message)


def _previous_failure(trial_dir: Path) -> str | None:
    """The error of an earlier attempt of this trial that failed permanently, if any."""
    local = trial_dir / FAILURE_FILE
    if local.exists():
        return permanent_failure(local.read_text())
    stored = _stored_failure_file()
    if stored is None:
        return None
    fs, path = stored
    try:
        with fs.open_input_stream(path) as f:
            return permanent_failure(f.read())
    except OSError:  # not there (pyarrow raises FileNotFoundError, an OSError)
        return None


def _is_out_of_memory(exc: BaseException) -> bool:
    """Whether an allocation failed: GPU out of memory, MemoryError, or torch's CPU allocator refusing."""
    # On CPU torch raises a plain RuntimeError: "[enforce fail at alloc_cpu.cpp:…] …
    # DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes".
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _out_of_memory(when: str, exc: BaseException) -> TrialError:
    """Not permanent: memory may be taken by a neighbour (another trial on a shared GPU)."""
    return TrialError(f"{when}: out of memory ({type(exc).__name__}: {exc}); retried by Ray Tune "
                      "(max_failures) and by --resume; if it repeats, lower batch_size or resolution, "
                      "or give each trial more memory")


def _trial_device(preference: str) -> str:
    """``auto`` in a trial: CUDA only when Ray gave the trial a GPU.

    Ray 2.60 no longer hides a node's GPUs from a trial that reserved none, so
    ``torch.cuda.is_available()`` alone would put CPU trials on a GPU they do not own.
    """
    if preference != "auto":
        return preference
    try:
        import ray

        return "cuda" if ray.get_gpu_ids() else "cpu"
    except Exception:  # outside Ray: whatever the machine has
        return preference


def _threads_for_trial() -> int:
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:  # outside Ray: fall back to one thread per trial
        cpus = 1
    return max(1, int(cpus))


@dataclass(frozen=True)
class _Candidate:
    """A trial's candidate, built, and what every epoch scores it with."""

    arch: ArchConfig
    settings: TrialSettings
    costs: ExitCosts  # C_i in MMACs
    ms_costs: ExitCosts | None  # C_i in ms when the trial's cost is latency (target_ms), else None
    device: torch.device
    run: CandidateTraining
    inherited: bool  # its weights come from a supernet


def train_candidate(config: dict[str, Any], data: Dataset, supernet: dict[str, Any] | None = None,
                    latency: dict[str, Any] | None = None) -> None:
    """Ray Tune function trainable (use with ``tune.with_parameters(train_candidate, data=...)``).

    ``supernet``: the record of a supernet file; the candidate inherits its weights and
    fine-tunes ``epochs`` epochs (0: its inherited weights are scored once, as epoch 0).
    ``latency``: a latency table (``aebnas.cost.latency.read_table``); with ``target_ms`` set, the
    thresholds are tuned for that average latency and ``avg_ms`` is reported beside ``avg_macs``.
    """
    trial_dir = _trial_dir()
    trial_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_failure(trial_dir)
    if previous is not None:
        raise CandidateFailure(previous + " (failed before; not retried)")
    torch.set_num_threads(_threads_for_trial())
    cand = _build_candidate(config, data, supernet, latency, trial_dir)
    resumed = _resume_from_checkpoint(cand)
    (trial_dir / ARCH_FILE).write_text(json.dumps(resolved_config(cand.arch, cand.settings), indent=1))
    node = {"node_ip": _node_ip(), "node_id": _node_id(), "hostname": platform.node(), "pid": os.getpid(),
            "device": str(cand.device)}
    for epoch in _epochs_to_run(cand, resumed):
        stats, t_eval, outputs = _train_and_evaluate(cand, epoch, trial_dir)
        tuned, val = _tune_thresholds(cand, outputs["val"])
        cand.run.model.set_thresholds(tuned.thresholds)
        metrics = _epoch_report(cand, epoch, outputs, stats, tuned, val, t_eval, node)
        _save_and_report(cand, outputs, tuned, metrics, trial_dir)


def _build_candidate(config: dict[str, Any], data: Dataset, supernet: dict[str, Any] | None,
                     latency: dict[str, Any] | None, trial_dir: Path) -> _Candidate:
    """The trial's candidate; one that cannot be built fails for good, out of memory is retried."""
    try:
        arch, settings = parse_trial_config(config)
        arch = arch.replace(num_classes=data.num_classes, in_channels=data.in_channels)
        costs = exit_costs(arch)
        ms_costs = _latency_costs(arch, settings, latency)
        device = select_device(_trial_device(settings.device))
        model = None if supernet is None else inherited_network(supernet, arch, settings.confidence)
        run = CandidateTraining(arch, settings, data, device, model=model)
    except ValueError as exc:
        raise _fail(trial_dir, f"candidate cannot be built: {exc}") from exc
    except (RuntimeError, MemoryError) as exc:
        if _is_out_of_memory(exc):
            raise _out_of_memory("building the candidate", exc) from exc
        raise
    return _Candidate(arch, settings, costs, ms_costs, device, run, inherited=supernet is not None)


def _resume_from_checkpoint(cand: _Candidate) -> bool:
    """Load the trial's Ray Tune checkpoint, if it has one (a retry or a resumed search); whether it had."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as ckpt_dir:
        cand.run.load_state_dict(load_checkpoint(Path(ckpt_dir) / CHECKPOINT_FILE, cand.device))
    return True


def _epochs_to_run(cand: _Candidate, resumed: bool) -> range:
    """Epochs still to run; inherited weights with no fine-tuning are scored once, as epoch 0."""
    if cand.settings.epochs:
        return range(cand.run.epoch + 1, cand.settings.epochs + 1)
    return range(0) if resumed else range(0, 1)


def _train_and_evaluate(cand: _Candidate, epoch: int, trial_dir: Path
                        ) -> tuple[dict[str, float], float, dict[str, ExitOutputs]]:
    """Train epoch ``epoch`` (epoch 0 trains nothing) and evaluate every exit: (training stats, the
    time evaluation started, outputs per split). A diverged loss fails the candidate for good; out
    of memory is retried."""
    run, settings = cand.run, cand.settings
    try:
        # progress inside a fine-tuning epoch goes to the trial's output (Ray Tune's trial logs)
        progress = Progress(f"{trial_dir.name} epoch {epoch}/{settings.epochs}", len(run.train_batches),
                            print_line)
        stats = run.train_epoch(on_step=progress.update) if epoch else {"seconds": 0.0, "images_per_s": 0.0}
        t_eval = time.perf_counter()
        outputs = run.evaluate()
    except NonFiniteLossError as exc:
        raise _fail(trial_dir, f"epoch {epoch}: {exc}") from exc
    except (RuntimeError, MemoryError) as exc:
        if not _is_out_of_memory(exc):
            raise
        raise _out_of_memory(f"epoch {epoch}", exc) from exc
    return stats, t_eval, outputs


def _tune_thresholds(cand: _Candidate, val_outputs: ExitOutputs) -> tuple[TuneResult, SimResult]:
    """Thresholds tuned on validation for the target MACs or, with a latency cost, the target ms;
    with the validation result in MACs of those thresholds."""
    settings = cand.settings
    if cand.ms_costs is None:
        tuned = tune_thresholds(val_outputs, cand.costs, settings.target_macs, settings.threshold_grid,
                                settings.score_lambda)
        return tuned, tuned.result
    # tuned for the target latency; the MAC figures are those of the same thresholds
    tuned = tune_thresholds(val_outputs, cand.ms_costs, settings.target_ms, settings.threshold_grid,
                            settings.score_lambda)
    return tuned, simulate(val_outputs, tuned.thresholds, cand.costs)


def _epoch_report(cand: _Candidate, epoch: int, outputs: dict[str, ExitOutputs], stats: dict[str, float],
                  tuned: TuneResult, val: SimResult, t_eval: float, node: dict[str, Any]) -> dict[str, Any]:
    """The metrics the trial reports for ``epoch``: the contract's, timings, the oracle, where it runs;
    the last epoch adds the test split's."""
    arch, settings, costs = cand.arch, cand.settings, cand.costs
    metrics: dict[str, Any] = epoch_metrics(arch, outputs["val"], val, tuned.score, costs.static_cost)
    if cand.ms_costs is not None:
        metrics.update(latency_metrics(arch, tuned.result), static_ms=cand.ms_costs.static_cost,
                       target_ms=settings.target_ms)
    orc = oracle(outputs["val"], costs)
    if "loss" in stats:
        metrics["loss"] = stats["loss"]
    metrics.update({"epoch": epoch, "epochs": settings.epochs, "inherited": cand.inherited,
                    "train_seconds": stats["seconds"], "eval_seconds": time.perf_counter() - t_eval,
                    "images_per_s": stats["images_per_s"], "oracle_accuracy": orc.accuracy,
                    "oracle_macs": orc.avg_cost, "target_macs": settings.target_macs,
                    "peak_rss_mb": _peak_rss_mb(), **node})
    if epoch == settings.epochs:
        metrics.update(_test_metrics(cand, outputs["test"], tuned.thresholds))
    return metrics


def _test_metrics(cand: _Candidate, test_outputs: ExitOutputs, thresholds: list[float]) -> dict[str, Any]:
    """The test split at the thresholds tuned on validation (never tuned on test)."""
    test = simulate(test_outputs, thresholds, cand.costs)
    metrics: dict[str, Any] = {}
    if cand.ms_costs is not None:
        metrics.update(latency_metrics(cand.arch, simulate(test_outputs, thresholds, cand.ms_costs), "test_"))
    metrics.update({"test_accuracy": test.accuracy, "test_avg_macs": test.avg_cost,
                    "test_early_exit": 1.0 - float(test.utilization[-1]),
                    "test_final_accuracy": float(test_outputs.exit_accuracy()[-1])})
    return metrics


def _save_and_report(cand: _Candidate, outputs: dict[str, ExitOutputs], tuned: TuneResult,
                     metrics: dict[str, Any], trial_dir: Path) -> None:
    """Write the epoch's exit outputs in the trial directory, then report its metrics with a checkpoint."""
    save_exit_outputs(trial_dir / EXIT_OUTPUTS_FILE, outputs, cand.costs)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({**cand.run.state_dict(), "thresholds": tuned.thresholds}, Path(tmp) / CHECKPOINT_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _latency_costs(arch: ArchConfig, settings: TrialSettings, latency: dict[str, Any] | None
                   ) -> ExitCosts | None:
    """C_i pieces in ms when the trial's cost is latency (``target_ms``), else None."""
    if settings.target_ms is None:
        return None
    if latency is None:
        raise ValueError(f"target_ms={settings.target_ms} needs a latency table (Experiment.latency_table)")
    return LatencyTable(latency, settings.latency_backend).exit_costs(arch)


def _peak_rss_mb() -> float:
    """Peak resident memory of this worker process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
           "CandidateFailure", "permanent_failure",
           "epoch_metrics", "SETTING_KEYS", "ARCH_FILE", "EXIT_OUTPUTS_FILE", "CHECKPOINT_FILE",
           "FAILURE_FILE"]
