"""Run Ray processes (``ray start``, drivers, helper scripts) in a sandbox the test cleans up.

Tests that need a Ray cluster of their own cannot use the session's local Ray (conftest's
``ray_local``): one process joins one cluster. They start it in child processes instead,
with an environment that isolates it from every other Ray on the machine:

- ``RAY_TMPDIR`` points at a private directory, so the cluster's sessions and its
  ``ray_current_cluster`` file live there; a plain ``ray.init()`` elsewhere (the test
  session, other users' jobs) never finds this cluster, and this cluster's drivers never
  find theirs;
- token authentication with a fresh token (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``),
  as docs/cluster.md tells users to run a cluster;
- every process started from it, Ray's own daemons and workers included, inherits that
  environment, so teardown finds and kills exactly them — never ``ray stop``, which would
  kill every Ray process on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def quickstart_argv(dataset: Path, storage_path: Path, name: str, *flags: str) -> list[str]:
    """``python tune_configs/quickstart.py`` on a tiny search from scratch (2 trials of 1 epoch); ``flags`` override."""
    return [sys.executable, str(REPO / "tune_configs" / "quickstart.py"), "--dataset", str(dataset),
            "--val-size", "100", "--resolutions", "32", "--width-mult", "0.25", "--epochs", "1",
            "--num-samples", "2", "--batch-size", "64", "--supernet", "none", "--scheduler", "asha",
            "--storage-path", str(storage_path), "--name", name, *flags]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RaySandbox:
    """Child processes sharing one private Ray environment; ``close()`` ends all of them."""

    def __init__(self) -> None:
        # Short on purpose: Ray puts unix sockets under it (108-byte path limit).
        self.root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.env = {**os.environ, "RAY_TMPDIR": str(self.root), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": self.token, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []

    def spawn(self, args: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``args`` in its own process group, stdout+stderr to ``ROOT/log``."""
        out = open(self.root / log, "w")
        proc = subprocess.Popen(args, env=env or self.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO)
        out.close()
        self.procs.append(proc)
        return proc

    def run(self, args: list[str], log: str, timeout: float, env: dict[str, str] | None = None) -> int:
        """Run ``args`` to completion; returns its exit code (kills it after ``timeout`` s)."""
        proc = self.spawn(args, log, env)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            pytest.fail(f"{' '.join(args[:3])} … ran over {timeout} s:\n{self.log(log)[-4000:]}")

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    def ray_start_head(self, port: int, num_cpus: int, log: str = "head.log") -> subprocess.Popen:
        """``ray start --head`` on 127.0.0.1:port, in the foreground (``--block``) so it is ours to stop."""
        return self._ray_start(["--head", f"--port={port}", "--include-dashboard=false"], num_cpus, log,
                               f"127.0.0.1:{port}")

    def ray_start_worker(self, port: int, num_cpus: int, log: str = "worker.log") -> subprocess.Popen:
        """``ray start --address=127.0.0.1:port``: a second node (another raylet) on this machine."""
        return self._ray_start([f"--address=127.0.0.1:{port}"], num_cpus, log, f"127.0.0.1:{port}")

    def _ray_start(self, where: list[str], num_cpus: int, log: str, address: str) -> subprocess.Popen:
        ray = str(Path(sys.executable).with_name("ray"))
        before = self.num_nodes(address) if "--head" not in where else 0
        proc = self.spawn([ray, "start", *where, f"--num-cpus={num_cpus}", "--disable-usage-stats", "--block"], log)
        deadline = time.time() + 90
        while self.num_nodes(address) <= before:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray start {' '.join(where)} did not come up:\n{self.log(log)[-4000:]}")
            time.sleep(0.5)
        return proc

    def num_nodes(self, address: str) -> int:
        """Alive nodes of the cluster at ``address`` according to ``ray status`` (0 if it does not answer)."""
        ray = str(Path(sys.executable).with_name("ray"))
        try:
            out = subprocess.run([ray, "status", f"--address={address}"], env=self.env, capture_output=True,
                                 text=True, timeout=30).stdout
        except subprocess.TimeoutExpired:
            return 0
        active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
        return sum(1 for line in active.splitlines() if "node_" in line)

    def stop(self, proc: subprocess.Popen, grace: float = 15) -> None:
        """SIGTERM the process group (``ray start --block`` then stops its node), SIGKILL after ``grace`` s."""
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def leftovers(self) -> list[int]:
        """Pids of live processes started from this sandbox (found by its RAY_TMPDIR in their environment)."""
        mark = f"RAY_TMPDIR={self.root}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and mark in environ.split(b"\0"):
                pids.append(int(entry.name))
        return pids

    def wait_until_gone(self, timeout: float) -> list[int]:
        """Wait up to ``timeout`` s for this sandbox's processes to end; returns those still alive."""
        deadline = time.time() + timeout
        while (left := self.leftovers()) and time.time() < deadline:
            time.sleep(0.2)
        return left

    def kill_leftovers(self, timeout: float = 15) -> list[int]:
        """SIGKILL every process of this sandbox; returns the pids that were still alive."""
        found = self.leftovers()
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.wait_until_gone(timeout)
        return found

    def close(self) -> None:
        for proc in reversed(self.procs):  # workers before the head
            self.stop(proc)
        self.kill_leftovers()
        for _ in range(3):  # a dying process may still write a log file while we delete
            shutil.rmtree(self.root, ignore_errors=True)
            if not self.root.exists():
                break
            time.sleep(1)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def ray_sandbox():
    """A :class:`RaySandbox`; every process it started is gone after the test, pass or fail."""
    box = RaySandbox()
    try:
        yield box
    finally:
        box.close()
