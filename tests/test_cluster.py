"""Searches on real multi-node Ray clusters on this machine.

Each cluster runs in child processes (tests/ray_sandbox.py explains why and how they are
isolated and cleaned up): ``ray.cluster_utils.Cluster`` through tests/cluster_search.py,
and the ``ray start`` commands of docs/cluster.md.
"""

import shutil
import time

import pytest

from cluster_search import results_by_trial, run_cluster_search
from ray_sandbox import free_port, quickstart_argv, ray_sandbox  # noqa: F401  (fixture)


def test_trials_run_on_every_node(ray_sandbox, tmp_path, small_npz):  # noqa: F811
    """A head and a worker node with one CPU each: the two trials run at once, one per node."""
    out = run_cluster_search(ray_sandbox, tmp_path, small_npz)
    results = results_by_trial(tmp_path / "cluster")
    seen = {name: [(r["epoch"], r["node_id"][:8], r["timestamp"]) for r in rows] for name, rows in results.items()}
    retried = [d.name for d in (tmp_path / "cluster").glob("trial_*") if (d / "error.txt").exists()]
    assert out["num_errors"] == 0 and len(results) == 2 and not retried, (out, seen, retried)
    nodes = {r[-1]["node_id"] for r in results.values()}
    assert nodes == {out["head"], *out["workers"]}, (out, seen)
    for history in results.values():
        assert history[-1]["epoch"] == 1 and history[-1]["node_ip"] and history[-1]["hostname"]


@pytest.mark.slow
def test_quickstart_joins_a_cluster_started_with_ray_start(ray_sandbox, tmp_path, small_npz):  # noqa: F811
    """docs/cluster.md's commands: `ray start --head`, `ray start --address=HEAD:PORT` on a second
    node, then a tune_config with --address. Only the driver reads the dataset: the trials get it
    through Ray's object store. A driver without the cluster's token is refused with one message."""
    port = free_port()
    ray_sandbox.ray_start_head(port, num_cpus=2)
    ray_sandbox.ray_start_worker(port, num_cpus=2)
    dataset = tmp_path / "driver_only.npz"
    shutil.copy(small_npz, dataset)
    args = quickstart_argv(dataset, tmp_path, "joined", "--cpus-per-trial", "2")
    driver = ray_sandbox.spawn(args + ["--address", f"127.0.0.1:{port}"], "driver.log")
    deadline = time.time() + 300
    while "aebnas: " + str(dataset) not in ray_sandbox.log("driver.log"):  # the driver has loaded it
        assert driver.poll() is None and time.time() < deadline, ray_sandbox.log("driver.log")[-4000:]
        time.sleep(0.1)
    dataset.unlink()
    assert driver.wait(timeout=400) == 0, ray_sandbox.log("driver.log")[-4000:]
    results = results_by_trial(tmp_path / "joined")
    # two CPUs per trial and two per node: both trials at once, one on each node
    assert len(results) == 2 and len({r[-1]["node_id"] for r in results.values()}) == 2, results
    assert all(r[-1]["epoch"] == 1 for r in results.values())
    assert "Connecting to existing Ray cluster" in ray_sandbox.log("driver.log")
    # every worker ran aebnas' set-up hook (cluster.quiet_ray_worker): no line per trial's checkpoint
    assert "Checkpoint successfully created" not in ray_sandbox.log("driver.log")

    # RAY_ADDRESS instead of --address, without the cluster's token
    env = {k: v for k, v in ray_sandbox.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    shutil.copy(small_npz, dataset)
    code = ray_sandbox.run(args + ["--name", "refused"], "refused.log", timeout=300, env=env)
    log = ray_sandbox.log("refused.log")
    assert code == 2, log[-4000:]
    assert f"aebnas: error: the Ray cluster at address='127.0.0.1:{port}' did not accept this driver: it uses " \
           "token authentication; set RAY_AUTH_MODE=token" in log
    assert not (tmp_path / "refused").exists()


def test_default_worker_cpus_share_the_cluster_but_fit_a_node():
    """A Ray Train worker asks for the cluster's CPUs shared out, never more than one node has."""
    from aebnas.cluster import default_worker_cpus

    assert default_worker_cpus(1, [2.0]) == 2.0  # this machine: one worker takes both cores
    assert default_worker_cpus(2, [2.0]) == 1.0
    assert default_worker_cpus(1, [16.0, 16.0]) == 16.0  # 32 would never be scheduled
    assert default_worker_cpus(4, [16.0, 16.0]) == 8.0
    assert default_worker_cpus(3, [2.0]) == 1.0  # at least one


def test_aebnas_workers_drop_the_state_api_warning_and_nothing_else():
    """quiet_ray_worker (every worker's set-up hook) filters Ray Train's placement-group cleaner's 'State API
    unavailable' warning, which repeats every second without ray[default]'s dashboard; its other lines pass."""
    import logging

    from aebnas.cluster import _CLEANER_LOGGER, STATE_API_WARNING, quiet_ray_worker

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    logger, kept = logging.getLogger(_CLEANER_LOGGER), Keep()
    logger.addHandler(kept)
    try:
        quiet_ray_worker()
        logger.warning(f"Failed to query Ray Train Controller actor state. {STATE_API_WARNING}. Continuing.")
        logger.warning("Detected that the Ray Train controller actor is dead. Cleaning up placement group")
        assert kept.lines == ["Detected that the Ray Train controller actor is dead. Cleaning up placement group"]
    finally:
        logger.removeHandler(kept)
        logger.filters.clear()
