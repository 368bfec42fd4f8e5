"""Joining Ray, and what each trial gets from it: the cluster side of a search.

``connect_ray`` joins a cluster by address (or ``RAY_ADDRESS``) with clear errors, or
starts local Ray; ``trial_resources`` decides what one trial reserves (a GPU by default
when the cluster has one, a share of one for inherited candidates); ``check_trial_fits``
refuses resources no node has.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

import ray
from ray.exceptions import AuthenticationError

from .errors import ExperimentError


def check_address_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when a Ray head is not listening at ``address``."""
    if address == "auto":
        return  # Ray looks up the local head itself
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ExperimentError(f"address={address!r} is not HOST:PORT (e.g. 127.0.0.1:6379 or ray://HOST:10001)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ExperimentError(
            f"no Ray cluster answers at address={address!r} ({exc}); start one with "
            f"`ray start --head --port={port}` on that machine, or leave --address unset to run locally") from None


# Ray Train's placement-group cleaner (a detached actor of every TorchTrainer run) asks Ray's State API,
# served by the dashboard of ray[default], whether the run's controller is alive. Without the dashboard
# (aebnas needs ray[tune] only) it logged this warning every second of a supernet's training, the only
# lines a user saw for minutes. The check cannot succeed there, so the line says nothing a user can act on.
STATE_API_WARNING = "State API may be temporarily unavailable"
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


# "Checkpoint successfully created at: Checkpoint(…)" after every checkpoint of every trial and supernet epoch:
# in a search, one line per trial between Ray Tune's progress tables, saying what aebnas' files say.
_CHECKPOINT_LOGGERS = ("ray.train._internal.storage",  # Ray Tune's trials
                       "ray.train.v2._internal.execution.storage")  # Ray Train's workers


def _not_state_api_warning(record: logging.LogRecord) -> bool:
    return STATE_API_WARNING not in record.getMessage()


def _train_report_logger() -> str:
    # Ray Train's worker logs every report, metrics and checkpoint path in full ("Reporting training result
    # N: TrainingReport(…)"), under a logger named by its file's path (not under ray.train, so RunConfig's
    # LoggingConfig does not reach it): the path is built here, without importing Ray Train in every worker.
    return os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")


def quiet_ray_worker() -> None:
    """Set-up of every worker process of aebnas' Ray jobs (``worker_process_setup_hook``): drops the
    placement-group cleaner's State API warning, and Ray Train's INFO lines per report and per checkpoint
    (aebnas prints its own line per epoch, Ray Tune its table per trial); their warnings and errors still
    show. If Ray renames these loggers, nothing is hidden."""
    logging.getLogger(_CLEANER_LOGGER).addFilter(_not_state_api_warning)
    for name in (_train_report_logger(), *_CHECKPOINT_LOGGERS):
        logging.getLogger(name).setLevel(logging.WARNING)


def connect_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start local Ray. Every worker process
    of the job runs :func:`quiet_ray_worker` first (aebnas is installed on every node: docs/cluster.md)."""
    if ray.is_initialized():
        return
    runtime_env = {"worker_process_setup_hook": quiet_ray_worker}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address_reachable(address)
        try:
            ray.init(address=address, runtime_env=runtime_env)
        except (ConnectionError, AuthenticationError) as exc:
            raise _join_error(address, exc) from None
    else:
        ray.init(runtime_env=runtime_env)


def _join_error(address: str, exc: Exception) -> ExperimentError:
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    # ray.init wraps the GCS's refusal in a RuntimeError that quotes it as text.
    if any(isinstance(e, AuthenticationError) or "AuthenticationError" in str(e) for e in chain):
        # Ray sends this machine's token to an address given explicitly only when told to.
        return ExperimentError(
            f"the Ray cluster at address={address!r} did not accept this driver: it uses token "
            "authentication; set RAY_AUTH_MODE=token and give this machine the cluster's token "
            "(RAY_AUTH_TOKEN, or the file ~/.ray/auth_token or RAY_AUTH_TOKEN_PATH); see docs/cluster.md")
    return ExperimentError(f"could not join the Ray cluster at address={address!r}: {exc}")


# Inherited candidates (epochs=0) only recalibrate BatchNorm and run two evaluation passes: one of them
# leaves most of a GPU idle, so this many share one (each reserves 1/this of a GPU).
INHERITED_TRIALS_PER_GPU = 4


def trial_resources(exp: Any, cluster_resources: dict[str, float]) -> dict[str, float]:
    """What one trial reserves, ``{"cpu": …, "gpu": …}``, on a cluster with ``cluster_resources``
    (``ray.cluster_resources()``: totals such as ``{"CPU": 16.0, "GPU": 1.0}``).

    ``gpus_per_trial=None`` (the default) gives each trial one GPU when the cluster has one, else
    none; trials that train (``epochs > 0``) then run one per GPU at most, whatever ``max_concurrent``
    allows, and inherited candidates (``epochs=0``) ``INHERITED_TRIALS_PER_GPU`` per GPU.
    """
    gpus = exp.gpus_per_trial
    if gpus is None:
        has_gpu = cluster_resources.get("GPU", 0) >= 1
        gpus = 0 if not has_gpu else 1 if exp.epochs > 0 else 1 / INHERITED_TRIALS_PER_GPU
    return {"cpu": exp.cpus_per_trial, "gpu": gpus}


def default_worker_cpus(workers: int, node_cpus: list[float]) -> float:
    """CPUs each of ``workers`` Ray Train workers reserves when none is asked for: the cluster's CPUs
    (``node_cpus``: each alive node's) shared out among the workers, but never more than the largest node
    has (a worker runs on one node: asking more would leave it waiting forever), and at least 1."""
    share = int(sum(node_cpus)) // max(1, workers)
    return float(max(1, min(share, int(max(node_cpus, default=1)))))


def describe_resources(resources: dict[str, float], cluster_resources: dict[str, float]) -> str:
    """One line: what each trial gets, and what the cluster has."""
    def count(n: float, unit: str) -> str:
        return f"{n:g} {unit}" + ("" if n == 1 else "s")

    gpu = resources["gpu"]
    shared = f" ({round(1 / gpu)} trials share a GPU)" if 0 < gpu < 1 and abs(1 / gpu - round(1 / gpu)) < 1e-9 else ""
    return (f"each trial gets {count(resources['cpu'], 'CPU')} and {count(gpu, 'GPU')}{shared} "
            f"(cluster: {count(cluster_resources.get('CPU', 0), 'CPU')}, "
            f"{count(cluster_resources.get('GPU', 0), 'GPU')})")


def check_trial_fits(resources: dict[str, float], cluster_may_grow: bool) -> None:
    """Refuse per-trial ``resources`` (``trial_resources``) that no node of the connected Ray cluster has.

    Ray Tune would wait for them forever. A cluster joined by address may be autoscaling,
    so there this only warns.
    """
    need = {"CPU": resources["cpu"], "GPU": resources["gpu"]}
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
        return
    have = ", ".join(sorted({f"{node.get('CPU', 0):g} CPUs + {node.get('GPU', 0):g} GPUs" for node in nodes}))
    message = (f"cpus_per_trial={need['CPU']:g} and gpus_per_trial={need['GPU']:g}, but no Ray node "
               f"has that much (nodes: {have})")
    if not cluster_may_grow:
        raise ExperimentError(f"{message}; no trial could ever start: lower --cpus-per-trial / --gpus-per-trial")
    print(f"aebnas: warning: {message}; trials wait until the cluster adds such a node", file=sys.stderr)
