"""The eager sandwich step's gradient path (aebnas.nn.elastic_ops: ``take``, ``slice_grads_in_place``).

A slice's gradient goes straight into ``weight.grad[slice]`` instead of through a zeroed full-size copy;
under autocast a weight is cast once per step. Each check runs the same sandwich twice, from the same
weights: with plain slicing (autograd's own path, as before) and in place, and compares gradients,
BatchNorm statistics and which parameters got no gradient. And the operators of a step, counted with
benchmarks/harness/op_count.py.
"""

from __future__ import annotations

import collections
import random
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from aebnas.config import EXIT_BRANCHES, largest_arch, random_arch, smallest_arch
from aebnas.data.preprocess import resize
from aebnas.nn import ElasticEarlyExitNet, extract
from aebnas.nn.elastic_ops import ElasticBatchNorm2d, ElasticConv2d, _cast_copy, slice_grads_in_place
from aebnas.space_values import SpaceValues
from aebnas.training.loop import multi_exit_loss
from aebnas.training.supernet import distillation_loss

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from harness.op_count import count_kernel_ops, sandwich_step_ops  # noqa: E402

SPACE = SpaceValues(depths=(1, 2), kernels=(3, 5), expansions=(2, 3), resolutions=(28, 32), exit_m1_resizes=(8,),
                    exit_m2_resizes=(0, 8), exit_kernels=(3,), exit_expansions=(1, 2))
WIDTH = 0.25


def supernet(memory_format: torch.memory_format = torch.channels_last) -> ElasticEarlyExitNet:
    torch.manual_seed(0)
    net = ElasticEarlyExitNet(SPACE, WIDTH, num_classes=10).to(memory_format=memory_format).train()
    with torch.no_grad():  # BatchNorm affine parameters away from 1 and 0, so their gradients mean something
        for name, p in net.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return net


def archs(n_random: int = 2, seed: int = 0) -> list:
    kwargs = {"width_mult": WIDTH, "num_classes": 10}
    rng = random.Random(seed)
    return [largest_arch(SPACE, **kwargs), smallest_arch(SPACE, **kwargs),
            *(random_arch(SPACE, rng, branches=EXIT_BRANCHES, **kwargs) for _ in range(n_random))]


def batch(memory_format: torch.memory_format = torch.channels_last, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 3, 32, 32, generator=g).contiguous(memory_format=memory_format),
            torch.randint(0, 10, (n,), generator=g))


def sandwich(net, subnets, x, y, in_place: bool, amp: torch.dtype | None = None, scaler=None) -> list[torch.Tensor]:
    """One sandwich step's gradients (as SupernetTraining.backward_step: labels for the first, the first's
    detached logits for the others), with plain slicing or in place."""
    teacher, losses = None, []
    with slice_grads_in_place(in_place):
        for i, arch in enumerate(subnets):
            with torch.autocast("cpu", dtype=amp) if amp is not None else nullcontext():
                outputs = net(resize(x, arch.resolution), arch)
                if i == 0:
                    loss = multi_exit_loss(outputs, y, 1.0, 0.1)
                    teacher = outputs[-1].detach()
                else:
                    loss = distillation_loss(outputs, teacher, 1.0)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            losses.append(loss.detach())
    return losses


def assert_same_step(a: ElasticEarlyExitNet, b: ElasticEarlyExitNet, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """The same gradients (None for the same parameters, some of them) and BatchNorm statistics."""
    grads_a, grads_b = dict(a.named_parameters()), dict(b.named_parameters())
    unused = [n for n, p in grads_a.items() if p.grad is None]
    assert unused == [n for n, p in grads_b.items() if p.grad is None]
    assert unused and len(unused) < len(grads_a)  # EDANAS's exits or a depth no subnet had: none in this step
    for name, p in grads_a.items():
        if p.grad is not None:
            assert p.grad.dtype == p.dtype and p.grad.shape == p.shape, name
            torch.testing.assert_close(p.grad, grads_b[name].grad, rtol=rtol, atol=atol, msg=name)
    for (name, buf), (_, other) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(buf, other, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_in_place_slice_gradients_are_autograds(memory_format):
    """Largest, smallest and two random subnets (other kernels, expansions, exits): the same gradients, the
    same unused parameters (grad None) and running statistics as plain slicing gives."""
    plain, fast = supernet(memory_format), supernet(memory_format)
    x, y = batch(memory_format)
    subnets = archs()
    expected = sandwich(plain, subnets, x, y, in_place=False)
    got = sandwich(fast, subnets, x, y, in_place=True)
    assert [float(v) for v in got] == [float(v) for v in expected]
    assert_same_step(fast, plain)


def test_two_steps_with_the_optimiser_clipping_and_a_loss_scaler():
    """What train_epoch does around the step: GradScaler's unscale_ (reads .grad), clip_grad_norm_, SGD, then
    zero_grad(set_to_none) and a second step with other subnets: the same weights after both."""
    nets = [supernet(), supernet()]
    x, y = batch()
    for step in range(2):
        norms = []
        for net, in_place in zip(nets, (False, True)):
            opt = getattr(net, "opt", None) or torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
            net.opt = opt
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            opt.zero_grad(set_to_none=True)
            sandwich(net, archs(seed=step), x, y, in_place=in_place, scaler=scaler)
            scaler.unscale_(opt)
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(net.parameters()), 5.0)))
            if step == 0 and in_place:
                assert_same_step(nets[1], nets[0])
            scaler.step(opt)
            scaler.update()
        assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_under_autocast_a_weight_is_cast_once_per_step_and_its_gradient_stays_float32():
    """CPU autocast (bfloat16) stands for CUDA's: the same low-precision values reach the convolutions, the
    gradients land in float32 .grad as autocast's own casts' do; the cast copy is kept until the weight
    changes in place (an optimiser step)."""
    plain, fast = supernet(), supernet()
    x, y = batch()
    subnets = archs()
    expected = sandwich(plain, subnets, x, y, in_place=False, amp=torch.bfloat16)
    got = sandwich(fast, subnets, x, y, in_place=True, amp=torch.bfloat16)
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=1e-3, atol=1e-3)
    assert_same_step(fast, plain, rtol=2e-2, atol=1e-3)

    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    with slice_grads_in_place():  # one step
        first = _cast_copy(w, torch.bfloat16)
        assert _cast_copy(w, torch.bfloat16) is first and first.dtype == torch.bfloat16
        with torch.no_grad():
            w.mul_(2.0)  # changed in place (bumps its version): cast again
        again = _cast_copy(w, torch.bfloat16)
        assert again is not first and torch.equal(again, w.detach().to(torch.bfloat16))
    w.data.mul_(2.0)  # as a fused optimiser step changes it: no version bump, but the next step casts anew
    with slice_grads_in_place():
        assert torch.equal(_cast_copy(w, torch.bfloat16), w.detach().to(torch.bfloat16))

    # one layer called three times in a step: autocast casts its input every call (an activation), and the
    # weight and bias every call too (a slice is not a leaf, autocast's cache misses); in place, once
    conv = ElasticConv2d(8, 16, bias=True)
    x = torch.randn(2, 8, 5, 5)

    def casts(in_place: bool) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with slice_grads_in_place(in_place):  # the step, as backward_step enters it
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    outputs = [conv(x, 16) for _ in range(3)]
            sum(o.float().sum() for o in outputs).backward()
        assert all(o.dtype == torch.bfloat16 for o in outputs)
        return sum(e.name == "aten::_to_copy" for e in prof.events())

    plain_casts = casts(False)
    conv.zero_grad(set_to_none=True)
    assert casts(True) == plain_casts - 4 - 2  # weight and bias: 1 cast each, not 3; nor 3 casts of their grads
    assert conv.conv.weight.grad.dtype == torch.float32


def test_the_step_runs_fewer_kernels_and_no_slice_backward():
    """The profiler sees the backward pass (the autograd engine's operators are counted) and no zeroed
    full-size copy of a weight (``aten::slice_backward``); fewer kernel-calling operators in all."""
    x, y = batch()
    subnets = archs()
    counts, names = {}, {}
    for in_place in (False, True):
        net = supernet()
        sandwich(net, subnets, x, y, in_place)  # warm-up
        net.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sandwich(net, subnets, x, y, in_place)
        names[in_place] = collections.Counter(e.name for e in prof.events())
        net.zero_grad(set_to_none=True)
        counts[in_place] = count_kernel_ops(sandwich, net, subnets, x, y, in_place)
    for in_place in (False, True):
        assert counts[in_place][1]["aten::convolution_backward"] > 0
    slice_backwards = names[False]["aten::slice_backward"]  # each a zero-fill and a copy
    assert slice_backwards > 100 and not names[True]["aten::slice_backward"]
    # those are gone; in their place one add per slice (and fewer copies of strided weights into convolutions)
    assert counts[True][0] <= counts[False][0] - slice_backwards


def test_outside_the_context_slices_are_plain_autograd():
    """``torch.autograd.grad`` (which the in-place path would not feed) and no-grad copies (extract) see
    plain slices; inside the context, extract still copies the same weights."""
    net = supernet()
    x, _ = batch()
    arch = archs()[1]
    net.eval()  # the same BatchNorm statistics for both passes and both copies
    loss = sum(o.sum() for o in net(x, arch))
    params = [p for p in net.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert all(p.grad is None for p in params)
    with slice_grads_in_place():
        copied = extract(net, arch)
        sum(o.sum() for o in net(x, arch)).backward()
    for p, g in zip(params, grads):
        assert (p.grad is None) == (g is None)
        if g is not None:
            torch.testing.assert_close(p.grad, g)
    for (name, a), b in zip(copied.state_dict().items(), extract(net, arch).state_dict().values()):
        assert torch.equal(a, b), name


def test_batchnorm_counts_batches_only_when_its_momentum_is_none():
    """With momentum set the count is not used (and not kept); with None (BN recalibration) it is the
    cumulative average's divisor, as in nn.BatchNorm2d."""
    bn = ElasticBatchNorm2d(16).train()
    x = torch.randn(4, 8, 5, 5)
    bn(x)
    assert int(bn.bn.num_batches_tracked) == 0
    bn.bn.reset_running_stats()
    bn.bn.momentum = None
    ref = torch.nn.BatchNorm2d(8, momentum=None).train()
    for _ in range(3):
        x = torch.randn(4, 8, 5, 5)
        bn(x)
        ref(x)
    assert int(bn.bn.num_batches_tracked) == 3
    torch.testing.assert_close(bn.bn.running_mean[:8], ref.running_mean)
    torch.testing.assert_close(bn.bn.running_var[:8], ref.running_var)


@pytest.mark.slow  # about 16 s on 2 cores: Dynamo traces two subnets
def test_mixed_with_a_compiled_subnet():
    """SupernetTraining(compile=True) runs the largest and smallest through torch.compile (plain slicing while
    traced: its backward adds through autograd's AccumulateGrad) and the others in place: the same gradients.
    Here with the ``aot_eager`` backend (AOT autograd, no code generation: seconds); tests/test_supernet.py's
    slow test compiles with inductor."""
    torch._dynamo.reset()
    plain, fast = supernet(), supernet()
    compiled = torch.compile(fast, backend="aot_eager", dynamic=False)
    x, y = batch()
    subnets = archs(n_random=1)
    expected = sandwich(plain, subnets, x, y, in_place=False)
    teacher = None
    for i, arch in enumerate(subnets):
        with slice_grads_in_place():
            outputs = (compiled if i < 2 else fast)(resize(x, arch.resolution), arch)
            loss = multi_exit_loss(outputs, y, 1.0, 0.1) if i == 0 else distillation_loss(outputs, teacher, 1.0)
        teacher = outputs[-1].detach() if i == 0 else teacher
        loss.backward()
        torch.testing.assert_close(loss.detach(), expected[i], rtol=1e-5, atol=1e-6)
    assert_same_step(fast, plain, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def run(small_npz):
    from aebnas.data.datasets import load_dataset
    from aebnas.training.supernet import SupernetTraining
    from aebnas.training.supernet_file import SupernetSettings

    data = load_dataset(str(small_npz), val_size=100, seed=0)
    settings = SupernetSettings(epochs=4, batch_size=16, random_subnets=2)  # epoch 0 warms up: the largest alone
    run = SupernetTraining(SPACE, WIDTH, data, settings, torch.device("cpu"))
    assert not run.grads_in_place  # the CPU's default: plain slices (faster there)
    run.grads_in_place = True  # CUDA's step, counted on the CPU
    return run


def test_the_harness_counts_the_training_codes_step(run):
    """``sandwich_step_ops`` profiles ``SupernetTraining.backward_step`` (the code train_epoch runs): four
    subnets' forward and backward passes, more than the largest alone, without a zeroed copy of a slice;
    the gradients stay in the parameters."""
    total, by_op = sandwich_step_ops(run)
    alone, _ = sandwich_step_ops(run, epoch=0)
    assert by_op["aten::convolution_backward"] > 0 and 2 * alone < total
    assert not by_op["aten::slice_backward"] and any(p.grad is not None for p in run.params)
