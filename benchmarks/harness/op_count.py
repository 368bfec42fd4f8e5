"""How many kernel-calling operators a training step runs, counted with ``torch.profiler`` on the CPU.

On a GPU a small network's step is bound by launching kernels from Python (tens of µs each), so the
number of operators that launch one is a figure of its own, the same on any device and nearly the
same at every batch size, width and resolution: it can be counted on a CPU.

- :func:`count_kernel_ops` counts them for any callable (the rule: :data:`NO_KERNEL_OPS`);
- :func:`sandwich_step_ops` for one step of ``aebnas.training.supernet.SupernetTraining`` as
  ``train_epoch`` runs it (``SupernetTraining.backward_step``: the batch made by the loader, then
  forward, loss and backward of each subnet; zeroing the gradients and the optimiser step left out);
- :func:`plain_step_ops` for one step of a plain network (``EarlyExitNet``, torchvision's
  ``mobilenet_v3_small`` wrapped as ``harness.baseline.MobileNetV3Small``) as ``train_one_epoch`` runs
  it, with the same loader and loss, the optimiser step left out.

Example (the quickstart's space)::

    run = SupernetTraining(SpaceValues(resolutions=(32, 36, 40)), 0.75, load_dataset("cifar10-subset"),
                           SupernetSettings(epochs=4, batch_size=32), torch.device("cpu"))
    total, by_op = sandwich_step_ops(run)
    print(total, by_op.most_common(10))
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

NO_KERNEL_OPS: frozenset[str] = frozenset({
    # views and metadata: a new tensor header over the same memory
    "view", "_unsafe_view", "view_as", "as_strided", "as_strided_", "slice", "select", "narrow", "t", "transpose",
    "permute", "expand", "expand_as", "unsqueeze", "squeeze", "alias", "detach", "detach_", "_reshape_alias",
    "reshape", "unflatten", "flatten", "split", "split_with_sizes", "chunk", "unbind", "contiguous", "to",
    "type_as", "resolve_conj", "resolve_neg", "conj", "_conj", "numpy_T", "mT",
    # allocation (no fill)
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_", "set_", "lift_fresh",
    "lift", "_empty_affine_quantized",
    # questions about tensors, answered on the host
    "size", "stride", "numel", "dim", "is_same_size", "is_nonzero", "_has_compatible_shallow_copy_type",
    "cudnn_is_acceptable", "result_type", "_shape_as_tensor",
})
"""Aten operators that launch no kernel, by name without ``aten::``.

The rule of :func:`count_kernel_ops`: an event counts when its name starts with ``aten::``, is not
here, and either no ``aten::`` operator that is not here is nested in it at any depth (it is a leaf
among the operators that do work: ``aten::conv2d`` → … → ``aten::mkldnn_convolution``, which
allocates its output with ``aten::empty``, counts once, as the last) or it is one of
:data:`OWN_KERNEL_OPS`. What is here makes a view or reads metadata, allocates without filling, or
(``contiguous``, ``to``) found nothing to do — when they do something they call another ``aten::``
operator (``clone`` → ``copy_``, ``_to_copy`` → ``copy_``), which is then what counts.
"""

OWN_KERNEL_OPS: frozenset[str] = frozenset({
    "native_batch_norm", "native_batch_norm_backward", "convolution_backward", "addmm", "mm", "sum", "div", "mul",
    "add", "sub", "hardswish_", "hardsigmoid_", "nll_loss_backward", "upsample_bicubic2d_backward",
    "upsample_bilinear2d_backward", "max_pool2d_with_indices_backward", "_adaptive_avg_pool2d_backward",
})
"""Aten operators that launch a kernel of their own besides the ``aten::`` operators they call, so that
the leaf rule alone would miss them: on the CPU ``native_batch_norm`` and the pooling and resizing
backward passes zero their outputs with ``aten::zero_`` first, ``convolution_backward`` copies to and
from oneDNN's layout, ``addmm`` copies the bias into its output, a reduction or an arithmetic op with
a Python number converts it (``aten::to``), an in-place activation whose backward needs its input
(``hardswish_``) clones it first. Each counts once itself, and what it calls counts too (a zeroing or
a copy is a kernel). An operator missing here is counted through what it calls only: too few, never
too many.
"""


def _name(event: Any) -> str:
    return event.name[len("aten::"):] if event.name.startswith("aten::") else ""


def _calls_a_kernel_op(event: Any) -> bool:
    """Whether an ``aten::`` operator outside :data:`NO_KERNEL_OPS` is nested in ``event`` (at any depth)."""
    stack = list(event.cpu_children)
    while stack:
        child = stack.pop()
        name = _name(child)
        if name and name not in NO_KERNEL_OPS:
            return True
        stack.extend(child.cpu_children)
    return False


def kernel_ops_of(events: Any) -> collections.Counter:
    """The kernel-calling aten operators among profiler ``events`` (``prof.events()``), by name (``aten::…``)."""
    counts: collections.Counter = collections.Counter()
    for event in events:
        name = _name(event)
        if name and name not in NO_KERNEL_OPS and (name in OWN_KERNEL_OPS or not _calls_a_kernel_op(event)):
            counts[event.name] += 1
    return counts


def count_kernel_ops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, collections.Counter]:
    """(total, by operator) of the kernel-calling aten operators ``fn(*args, **kwargs)`` runs.

    Profiled on the CPU (``torch.profiler``, ``activities=[CPU]``): every thread's operators are
    recorded, the autograd engine's backward included (checked by ``tests/test_eager_step.py``).
    The rule is :data:`NO_KERNEL_OPS`'s (with :data:`OWN_KERNEL_OPS`).
    """
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args, **kwargs)
    counts = kernel_ops_of(prof.events())
    return sum(counts.values()), counts


def sandwich_step_ops(run: Any, epoch: int | None = None, step: int = 0,
                      warm_up: bool = True) -> tuple[int, collections.Counter]:
    """The kernel-calling operators of one step of ``run`` (an ``aebnas.training.supernet.SupernetTraining``).

    What is counted: the loader making the batch, then ``run.backward_step(x, y, epoch, step)`` — each subnet
    of ``run.subnets(epoch, step)`` forward, its loss, its backward (the code ``train_epoch`` runs). Zeroing
    the gradients before and the optimiser step after are not counted. ``epoch`` defaults to the first
    sandwich epoch (``settings.warmup_epochs``); an epoch before it counts the largest subnet alone.
    ``warm_up``: run the same step once first, uncounted (first calls set things up). Gradients are left
    in the parameters, the BatchNorm running statistics updated, as the step does.
    """
    if epoch is None:
        epoch = run.settings.warmup_epochs
    run.model.train()
    run.train_batches.set_epoch(epoch)

    def one_step() -> None:
        batches = iter(run.train_batches)
        x, y = next(batches)
        run.backward_step(x, y, epoch, step)

    if warm_up:
        run.optimizer.zero_grad(set_to_none=True)
        one_step()
    run.optimizer.zero_grad(set_to_none=True)
    return count_kernel_ops(one_step)


def plain_step_ops(model: torch.nn.Module, batches: Any, exit_weight: float = 1.0, label_smoothing: float = 0.1,
                   warm_up: bool = True) -> tuple[int, collections.Counter]:
    """The kernel-calling operators of one training step of a plain network (it returns a list of logits)
    on the next batch of ``batches`` (an ``aebnas.data.batches.BatchLoader``): the batch made, forward,
    ``multi_exit_loss``, backward, as ``aebnas.training.loop.train_one_epoch`` runs it; no optimiser step.
    ``label_smoothing`` defaults to the supernet's (``SupernetSettings``)."""
    from aebnas.training.loop import multi_exit_loss

    model.train()

    def one_step() -> None:
        x, y = next(iter(batches))
        multi_exit_loss(model(x), y, exit_weight, label_smoothing).backward()

    if warm_up:
        model.zero_grad(set_to_none=True)
        one_step()
    model.zero_grad(set_to_none=True)
    return count_kernel_ops(one_step)


__all__ = ["NO_KERNEL_OPS", "OWN_KERNEL_OPS", "count_kernel_ops", "kernel_ops_of", "sandwich_step_ops",
           "plain_step_ops"]
