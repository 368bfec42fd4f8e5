"""Tests for aebnas/training/loop.py: the joint loss, divergence, evaluation, and one real training run."""

import copy
import time

import numpy as np
import pytest
import torch

from aebnas.config import PAPER_SPACE, ArchConfig, ExitModuleConfig, uniform_arch
from aebnas.data.batches import BatchLoader
from aebnas.data.datasets import load_dataset
from aebnas.nn import torch_confidence
from aebnas.nn import EarlyExitNet
from aebnas.settings import TrialSettings
from aebnas.training.loop import (
    NonFiniteLossError,
    TrainSettings,
    evaluate,
    make_optimizer,
    make_lr_schedule,
    multi_exit_loss,
    recalibrate_bn,
    train_one_epoch,
)


def _small_net(seed=0, exits=(1, 2, 3, 4)):
    torch.manual_seed(seed)
    arch = uniform_arch(2, 3, 3, exits=exits, exit_module=ExitModuleConfig(8, 3, 2, 1),
                        width_mult=0.25, resolution=32)
    return EarlyExitNet(arch)


def _manual_ce(logits, target, smoothing=0.0):
    """Cross-entropy by hand: mean over samples of −Σ_c q_c log softmax(logits)_c."""
    logp = logits - logits.logsumexp(dim=1, keepdim=True)
    classes = logits.shape[1]
    q = torch.full_like(logp, smoothing / classes)
    q[torch.arange(len(target)), target] += 1.0 - smoothing
    return -(q * logp).sum(dim=1).mean()


# --------------------------------------------------------------------------- loss
@pytest.mark.parametrize("weight, smoothing", [(1.0, 0.0), (0.4, 0.0), (0.0, 0.0), (2.5, 0.1)])
def test_multi_exit_loss_is_final_plus_weighted_exits(weight, smoothing):
    torch.manual_seed(0)
    outputs = [torch.randn(6, 5) * 3 for _ in range(4)]
    target = torch.randint(0, 5, (6,))
    manual = _manual_ce(outputs[-1], target, smoothing) + weight * sum(
        _manual_ce(o, target, smoothing) for o in outputs[:-1])
    got = multi_exit_loss(outputs, target, exit_weight=weight, label_smoothing=smoothing)
    torch.testing.assert_close(got, manual)


def test_multi_exit_loss_of_a_static_network_is_plain_ce():
    logits, target = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    expected = -torch.log(torch.softmax(logits, 1)[0, 0])
    torch.testing.assert_close(multi_exit_loss([logits], target), expected)


def test_multi_exit_loss_backpropagates_into_every_exit():
    net = _small_net()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    multi_exit_loss(net(x), y).backward()
    for branch in net.exits:
        assert branch.classifier.weight.grad.abs().sum() > 0
    assert net.head[-1].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- divergence
def test_nan_input_raises_before_any_update():
    net = _small_net()
    settings = TrainSettings(epochs=1, batch_size=4)
    opt = make_optimizer(net, settings)
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(4, 3, 32, 32)
    x[1, 0, 5, 5] = float("nan")
    with pytest.raises(NonFiniteLossError, match="training loss is nan at batch 0"):
        train_one_epoch(net, [(x, torch.randint(0, 10, (4,)))], opt, None, settings)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_huge_learning_rate_diverges_with_non_finite_loss_error():
    net = _small_net()
    settings = TrainSettings(epochs=1, batch_size=8, lr=1e30)
    opt = make_optimizer(net, settings)
    torch.manual_seed(1)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(6)]
    with pytest.raises(NonFiniteLossError, match=r"training loss is (nan|inf|-inf) at batch [1-5] "):
        train_one_epoch(net, batches, opt, None, settings)


def test_train_settings_reject_bad_values():
    with pytest.raises(ValueError, match="lr=0 is out of range"):
        TrainSettings(lr=0)
    with pytest.raises(ValueError, match="momentum=1.0 is out of range"):
        TrainSettings(momentum=1.0)
    with pytest.raises(ValueError, match="epochs=-1 is out of range"):
        TrainSettings(epochs=-1)
    # 0 epochs means "score inherited weights": a trial allows it only with a supernet.
    with pytest.raises(ValueError, match="epochs=0 scores inherited weights only, so it needs a supernet"):
        TrialSettings(epochs=0)
    assert TrialSettings(epochs=0, supernet="supernet.pt").epochs == 0
    with pytest.raises(ValueError, match="finetune_lr=0"):
        TrialSettings(finetune_lr=0)


def test_one_epoch_reports_its_loss_and_steps_the_schedule():
    net = _small_net()
    settings = TrainSettings(epochs=2, batch_size=8, lr=0.05)
    opt = make_optimizer(net, settings)
    sched = make_lr_schedule(opt, settings, steps_per_epoch=3)
    torch.manual_seed(2)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(3)]
    # The same steps by hand, reading each loss at once: the mean train_one_epoch reports.
    twin = copy.deepcopy(net)
    twin_opt = make_optimizer(twin, settings)
    twin_sched = make_lr_schedule(twin_opt, settings, steps_per_epoch=3)
    by_hand = []
    for x, y in batches:
        loss = multi_exit_loss(twin(x), y, settings.exit_weight, settings.label_smoothing)
        by_hand.append(loss.item())
        twin_opt.zero_grad(set_to_none=True)
        loss.backward()
        twin_opt.step()
        twin_sched.step()
    seen = []
    stats = train_one_epoch(net, batches, opt, sched, settings, on_step=lambda steps, images: seen.append(images))
    assert seen == [8, 16, 24]
    assert stats["loss"] == pytest.approx(np.mean(by_hand), rel=1e-6)
    assert sched.last_epoch == 3
    # One-cycle: starts at lr/10, peaks at lr after 25% of the steps.
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(0.005)
    assert opt.param_groups[0]["max_lr"] == 0.05
    # No weight decay on BN parameters and biases.
    assert all(p.ndim > 1 for p in opt.param_groups[0]["params"])
    assert all(p.ndim <= 1 for p in opt.param_groups[1]["params"]) and opt.param_groups[1]["weight_decay"] == 0


# --------------------------------------------------------------------------- evaluate
def test_evaluate_returns_every_exit_on_every_sample():
    net = _small_net(exits=(2, 4)).eval()
    torch.manual_seed(3)
    x, y = torch.randn(13, 3, 32, 32), torch.randint(0, 10, (13,))
    batches = [(x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])]
    out = evaluate(net, batches)
    assert out.confidence.shape == out.prediction.shape == (3, 13)
    assert out.confidence.dtype == np.float32 and out.prediction.dtype == np.int64
    np.testing.assert_array_equal(out.labels, y.numpy())
    with torch.no_grad():
        logits = net(x)
    for j, o in enumerate(logits):
        np.testing.assert_array_equal(out.prediction[j], o.argmax(1).numpy())
        np.testing.assert_allclose(out.confidence[j], torch_confidence(o).numpy(), rtol=1e-5, atol=1e-6)
    assert not net.training
    with pytest.raises(ValueError, match="no batches"):
        evaluate(net, [])


# --------------------------------------------------------------------------- real learning
@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_training_on_the_cifar10_subset_learns(two_threads):
    """Acceptance: a network of the paper's space learns on real data (a few minutes on 2 cores; the time is
    printed, not asserted: it depends on what else the machine runs).

    Embedded CIFAR-10 subset (3,305 train / 761 test images), resolution 32, 10 epochs,
    one-cycle SGD, BN recalibration, 2 CPU threads.
    """
    start = time.perf_counter()
    torch.manual_seed(0)
    data = load_dataset("cifar10-subset")
    settings = TrainSettings(epochs=10, batch_size=64, lr=0.1)
    arch = uniform_arch(2, 3, 3, exits=(1, 2, 3, 4), resolution=32)
    assert ArchConfig.from_flat(arch.to_flat(), allowed=PAPER_SPACE) == arch  # in the paper's space
    model = EarlyExitNet(arch)
    train = BatchLoader.for_split(data, "train", batch_size=settings.batch_size, resolution=32, train=True)
    test = BatchLoader.for_split(data, "test", batch_size=256, resolution=32, train=False)
    opt = make_optimizer(model, settings)
    sched = make_lr_schedule(opt, settings, steps_per_epoch=len(train))
    for epoch in range(settings.epochs):
        stats = train_one_epoch(model, train, opt, sched, settings)
        print(f"epoch {epoch + 1}: loss {stats['loss']:.3f} ({stats['seconds']:.1f} s)")
    recalibrate_bn(model, train, settings.bn_recalibration_batches)
    out = evaluate(model, test)
    seconds = time.perf_counter() - start
    acc = out.exit_accuracy()
    print(f"test accuracy per exit (%): {np.round(acc, 1).tolist()} (final last); {seconds:.0f} s")
    assert out.num_samples == 761
    assert acc[-1] >= 35.0
    assert np.all(acc[:-1] > 20.0)


@pytest.mark.parametrize("total_steps", range(1, 10))
def test_the_schedule_runs_for_any_number_of_steps(total_steps):
    """A tiny dataset gives a few steps in all; 4 (pct_start x steps = 1) once divided by zero in OneCycleLR."""
    from aebnas.training.loop import make_lr_schedule

    param = torch.nn.Parameter(torch.zeros(1))
    settings = TrainSettings(epochs=total_steps, lr=0.1)
    opt = torch.optim.SGD([param], lr=settings.lr)
    sched = make_lr_schedule(opt, settings, steps_per_epoch=1)
    lrs = []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if len(lrs) < total_steps:
            sched.step()
    assert max(lrs) <= settings.lr + 1e-12 and lrs[-1] < settings.lr / 100 + 1e-12  # ends at lr / 1000
