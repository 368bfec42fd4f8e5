"""Shared test settings."""

import torch

# The tests use tiny tensors: one intra-op thread is as fast, and far faster when the
# machine's cores are busy (measured: tests/test_nn.py 3.6 s with one thread, 34 s with two
# on 2 cores shared with other jobs). Tests that time real training set their own count.
torch.set_num_threads(1)

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from aebnas.data.datasets import embedded_dataset_path  # noqa: E402


def write_small_cifar_npz(path: Path, n_train: int = 600, n_test: int = 200) -> Path:
    """A small .npz of real CIFAR-10 images (the first images of the embedded subset)."""
    with np.load(embedded_dataset_path()) as z:
        np.savez(path, x_train=z["x_train"][:n_train], y_train=z["y_train"][:n_train],
                 x_test=z["x_test"][:n_test], y_test=z["y_test"][:n_test], classes=z["classes"])
    return path


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory) -> Path:
    return write_small_cifar_npz(tmp_path_factory.mktemp("data") / "cifar_small.npz")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance (2 CPUs) for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny_experiment(storage: Path, data: Path, **changes):
    """Settings of a real but tiny search: small width, one resolution, 2 epochs."""
    from aebnas.search.experiment import Experiment

    base = Experiment(dataset=str(data), val_size=100, space="aebnas", space_kwargs={"resolutions": (32,)},
                      width_mult=0.25, target_macs=1.0, epochs=2, num_samples=4, scheduler="fifo",
                      batch_size=64, storage_path=str(storage), name="tiny", seed=0, verbose=0)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="session")
def tiny_search(ray_local, small_npz, tmp_path_factory):
    """A finished real Ray Tune search (4 trials × 2 epochs); returns (experiment path, ResultGrid, Experiment)."""
    from aebnas.search.experiment import experiment_path
    from aebnas.search.tuner import run

    exp = tiny_experiment(tmp_path_factory.mktemp("results"), small_npz)
    results = run(exp)
    return Path(experiment_path(exp)), results, exp


def _run_code(marker):
    """What unpickling an ``Evil`` object calls: it leaves ``marker`` behind."""
    Path(marker).write_text("code ran while loading")
    return {}


class Evil:
    """A Python object in a checkpoint: unpickling it runs ``_run_code`` (tests of weights-only loading)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _run_code, (self.marker,)


def make_confident(net, x: torch.Tensor, spread: float = 2.0):
    """Make a random network's exit confidences spread over [0, 1] (returns ``net``, in eval mode).

    A fresh network is barely confident (margins ~1e-5): BatchNorm statistics are measured on
    ``x``, then every classifier (each exit's and the final) gets random weights scaled so that its
    logits on ``x`` have standard deviation ``spread``: neither all ties nor all saturated, whatever
    the width of the features it reads.
    """
    from torch import nn

    from aebnas.training.loop import recalibrate_bn

    recalibrate_bn(net, [(x, None)], max_batches=1)
    net.eval()
    classifiers = [e.classifier for e in net.exits] + [net.head[-1]]
    inputs = {}
    hooks = [c.register_forward_hook(lambda m, args, out: inputs.__setitem__(m, args[0])) for c in classifiers]
    with torch.no_grad():
        net(x)
        for h in hooks:
            h.remove()
        for c in classifiers:
            nn.init.normal_(c.weight)
            nn.init.zeros_(c.bias)
            c.weight.mul_(spread / (inputs[c] @ c.weight.T).std())
    return net
