"""The static-shape sandwich step (aebnas.nn.masked, aebnas.training.static_step): every subnet at the largest
one's shapes with its choices as masks gives the sliced step's outputs, BatchNorm statistics, losses and
gradients, and under torch.compile it traces into a fixed set of graphs (two per resolution)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from aebnas.config import EXIT_BRANCHES, largest_arch, random_arch, smallest_arch
from aebnas.data.datasets import load_dataset
from aebnas.nn import ElasticEarlyExitNet
from aebnas.nn.masked import MaskedSupernet, unused_parameters
from aebnas.space_values import SpaceValues
from aebnas.training.supernet import SupernetTraining
from aebnas.training.supernet_file import SupernetSettings

# Small, but every kind of choice: expansion 1 (no expand conv) beside others, two kernels, depths, both
# exit branches, one- and two-module exits with every resize, kernel, expansion and pool.
SPACE = SpaceValues(depths=(1, 2), kernels=(3, 5), expansions=(1, 3), resolutions=(32, 36))
KW = {"width_mult": 0.35, "num_classes": 10, "in_channels": 3}


def _archs(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [largest_arch(SPACE, **KW), smallest_arch(SPACE, **KW),
            *(random_arch(SPACE, rng, branches=EXIT_BRANCHES, **KW) for _ in range(n))]


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_masked_forward_equals_the_sliced_one_outputs_and_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    net = ElasticEarlyExitNet(SPACE, KW["width_mult"], 10).train()
    masked = MaskedSupernet(net)
    x = torch.randn(6, 3, 32, 32)
    seen = set()
    for arch in _archs(12):
        start = _state(net)
        sliced = net(x, arch)
        after_sliced = _state(net)
        net.load_state_dict(start, strict=False)
        exits, final, on = masked(x, masked.masks(arch, "cpu"))
        positions = [e.position for e in arch.exits]
        assert on.tolist() == [float(p in positions) for p in SPACE.exit_positions]
        got = [exits[SPACE.exit_positions.index(p)] for p in positions] + [final]
        for a, b in zip(sliced, got):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        for k, v in _state(net).items():
            torch.testing.assert_close(v, after_sliced[k], rtol=1e-5, atol=1e-6, msg=k)
        seen.update(e.branch for e in arch.exits)
        seen.update(f"depth{e.depth}" for e in arch.exits if e.branch == "aebnas")
    assert seen >= {"aebnas", "edanas", "depth1", "depth2"}  # the draw covered every kind of exit


def _sandwich_grads(static: bool) -> tuple[list[float], dict[str, torch.Tensor | None], dict[str, torch.Tensor]]:
    data = load_dataset("cifar10-subset")
    data = dataclasses.replace(data, x_train=data.x_train[:64], y_train=data.y_train[:64])
    settings = SupernetSettings(epochs=2, batch_size=32, warmup_fraction=0.0, random_subnets=3)
    run = SupernetTraining(SPACE, KW["width_mult"], data, settings, torch.device("cpu"), static=static,
                           static_backend=False)
    x, y = next(iter(run.train_batches))
    losses = [float(v) for v in run.backward_step(x, y, epoch=0, step=0)]
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in run.model.named_parameters()}
    return losses, grads, _state(run.model)


def test_masked_sandwich_step_gives_the_sliced_losses_gradients_and_statistics() -> None:
    losses, grads, stats = _sandwich_grads(static=False)
    m_losses, m_grads, m_stats = _sandwich_grads(static=True)
    assert m_losses == pytest.approx(losses, rel=1e-5)
    assert {n for n, g in m_grads.items() if g is None} == {n for n, g in grads.items() if g is None}
    assert any(g is None for g in grads.values())  # some exit branch was not drawn: None in both
    for n, g in grads.items():
        if g is not None:
            torch.testing.assert_close(m_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
    for k, v in stats.items():
        torch.testing.assert_close(m_stats[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_unused_parameters_are_the_exit_parts_no_subnet_ran() -> None:
    net = ElasticEarlyExitNet(SPACE, KW["width_mult"], 10)
    largest = largest_arch(SPACE, **KW)
    unused = {id(p) for p in unused_parameters(net, [largest])}
    branch = net.branches[SPACE.exit_positions[0] - 1]
    assert {id(p) for p in branch.edanas.parameters()} <= unused  # the largest uses the paper's branch only
    assert {id(p) for p in branch.classifiers[0].parameters()} <= unused  # ... at depth 2
    assert not {id(p) for p in branch.features.parameters()} & unused
    assert not {id(p) for p in net.stages.parameters()} & unused


def test_a_mask_of_another_supernets_subnet_is_refused() -> None:
    masked = MaskedSupernet(ElasticEarlyExitNet(SPACE, KW["width_mult"], 10))
    with pytest.raises(ValueError, match="kernel 7"):
        masked.masks(largest_arch(dataclasses.replace(SPACE, kernels=(3, 7)), **KW), "cpu")


@pytest.mark.slow
def test_compiled_static_step_traces_two_graphs_per_resolution_and_never_recompiles() -> None:
    """Under torch.compile (the cheap "eager" backend: dynamo's tracing and guards, no code generation)."""
    data = load_dataset("cifar10-subset")
    data = dataclasses.replace(data, x_train=data.x_train[:64], y_train=data.y_train[:64])
    settings = SupernetSettings(epochs=2, batch_size=32, warmup_fraction=0.0)
    run = SupernetTraining(SPACE, KW["width_mult"], data, settings, torch.device("cpu"), static=True,
                           static_backend="eager")
    x, y = next(iter(run.train_batches))
    for step in range(8):
        run.optimizer.zero_grad(set_to_none=True)
        run.backward_step(x, y, epoch=0, step=step)
    graphs = run.static.graphs()
    assert set(graphs) <= {f"{role}@{r}" for role in ("teacher", "student") for r in SPACE.resolutions}
    assert all(n == 1 for n in graphs.values()), graphs  # one graph each, compiled once: no recompile


def test_static_shapes_is_asked_for_by_the_request_not_part_of_its_identity_and_not_with_compile() -> None:
    from aebnas.errors import ExperimentError
    from aebnas.training.supernet_job import SupernetRequest, _loop_config, _make_run

    data = load_dataset("cifar10-subset")
    space = {k: list(v) for k, v in dataclasses.asdict(SPACE).items()}
    plain = SupernetRequest(out="unused", space_kwargs=space, width_mult=KW["width_mult"],
                            settings=SupernetSettings(epochs=1, batch_size=64), workers=0)
    static = dataclasses.replace(plain, static_shapes=True)
    assert plain.identity() == static.identity()  # the same gradients: a run resumes either way
    assert _make_run(_loop_config(plain, None), data, torch.device("cpu"), 0, 1).static is None
    run = _make_run(_loop_config(static, None), data, torch.device("cpu"), 0, 1)
    assert run.static is not None and run.static.model is run.model
    with pytest.raises(ExperimentError, match="drop compile"):
        dataclasses.replace(static, compile=True).validate()
    with pytest.raises(ExperimentError, match="static_shapes='yes' must be True or False"):
        dataclasses.replace(plain, static_shapes="yes").validate()


def _trained_epoch(static: bool) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    data = load_dataset("cifar10-subset")
    data = dataclasses.replace(data, x_train=data.x_train[:96], y_train=data.y_train[:96])
    settings = SupernetSettings(epochs=2, batch_size=32, warmup_fraction=0.0, random_subnets=2)
    run = SupernetTraining(SPACE, KW["width_mult"], data, settings, torch.device("cpu"), static=static,
                           static_backend=False)
    record = run.train_epoch()
    return record, _state(run.model)


def test_an_epoch_of_static_steps_trains_the_weights_the_sliced_steps_do() -> None:
    """Three optimiser steps (momentum, weight decay, clipping): the gradient buffers kept between steps and
    the unused parameters left at None give the same weights."""
    record, weights = _trained_epoch(static=False)
    m_record, m_weights = _trained_epoch(static=True)
    assert m_record["loss"] == pytest.approx(record["loss"], rel=1e-5)
    for k, v in weights.items():  # float noise of different reductions, carried through three steps
        assert (m_weights[k] - v).abs().max() <= 1e-4 * v.abs().max() + 1e-5, k


def test_the_fused_optimiser_with_a_tensor_learning_rate_steps_as_the_plain_one() -> None:
    """The static-shape step's optimiser on CUDA (fused SGD, the rate a tensor), checked on the CPU."""
    from aebnas.training.loop import TrainSettings, make_lr_schedule, make_optimizer

    settings = TrainSettings(epochs=2, batch_size=8, weight_decay=1e-3)
    weights = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
        optimizer = make_optimizer(model, settings, fused=fused)
        schedule = make_lr_schedule(optimizer, settings, 3)
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
        for _ in range(4):
            optimizer.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            optimizer.step()
            schedule.step()
        assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor) == fused
        weights.append([p.detach().clone() for p in model.parameters()])
    for plain, fused_w in zip(*weights):
        torch.testing.assert_close(fused_w, plain, rtol=1e-5, atol=1e-6)
