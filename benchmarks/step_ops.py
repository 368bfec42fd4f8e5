"""Claim 30: kernel-calling operators per supernet training step, and the static step's graphs.

On a GPU a small network's training step is bound by launching kernels from Python (about 50 µs
each on the H200 of claim 10), so the number of operators that launch one decides its speed; it
hardly depends on the batch, width or resolution, and can be counted on the CPU
(``harness.op_count``: ``torch.profiler``, aten operators that launch a kernel). Counted here, at
batch 32, the optimiser step left out:

- the **eager sandwich** step (``SupernetTraining.backward_step``: largest, smallest and two random
  subnets; the batch made, forward, loss, backward) as it runs on CUDA (slices' gradients into
  ``.grad`` in place; the CPU's default slices plainly, which is faster there) on three spaces: the
  quickstart's, the Fashion-MNIST job's and the paper's at 32 px; of them, the operators only the
  CPU's channels_last kernels add;
- the **static sandwich** step (``SupernetTraining(static=True)``): the operators its graphs hold
  (forward with loss, and backward, of each subnet: what CUDA graphs replay without Python launching
  them, before inductor fuses anything) and the operators launched outside them, plus one launch per
  graph run — the step's launches from Python under ``torch.compile(mode="reduce-overhead")``. A
  multi-tensor (``_foreach_``) operator counts once: on CUDA it is one fused kernel (a handful for
  many tensors), on the CPU it loops;
- the largest subnet alone, and torchvision's ``mobilenet_v3_small``, in the candidates' loop;
- the static step under ``torch.compile`` with a cheap backend (``eager``: dynamo's tracing and
  guards, which decide recompiles, without code generation) over 20 random sandwich steps of the
  quickstart's space: graphs per (role, resolution), and recompiles (graphs compiled for a key that
  had one already);
- masked vs sliced: the largest difference of any gradient after one sandwich step, relative to the
  largest gradient.

Prints its figures as one JSON line last (keys ``eager_sandwich_ops``, ``static_sandwich_ops``,
``torchvision_ops``, ``static_graphs``, ``static_recompiles``, ``resolutions`` and more).

    python benchmarks/step_ops.py [--quick]
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import torch

from harness.claims import Claim
from harness.common import Context, Outcome, main, md_table
from harness.op_count import kernel_ops_of, plain_step_ops, sandwich_step_ops

CLAIM = Claim(30, "step_ops", "Kernel-calling operators per supernet training step; the static step's graphs",
              "eager sandwich step ≤ 3,500 kernel-calling operators (batch 32); the static step compiles into at "
              "most 2 graphs per resolution and recompiles 0 times over 20 random sandwich steps; masked and "
              "sliced gradients equal to float tolerance (largest difference < 1e-4 of the largest gradient)")
SETUPS = {  # name: (space keywords, width)
    "quickstart": ({"resolutions": (32, 36, 40)}, 0.75),
    "Fashion-MNIST job": ({"resolutions": (28, 32)}, 0.5),
    "paper, 32 px": ({"resolutions": (32,)}, 1.0),
}
SETTINGS = {"batch": 32, "compile_steps": 20, "compile_setup": "quickstart", "setups": list(SETUPS)}
QUICK = {"batch": 8, "compile_steps": 3, "compile_setup": "quickstart", "setups": ["quickstart"]}
JSON_KEYS = ("eager_sandwich_ops", "static_sandwich_ops", "torchvision_ops", "static_graphs", "static_recompiles",
             "resolutions")
LAST: dict[str, Any] = {}  # the figures of the JSON line printed last
FOREACH = "aten::_foreach_*"  # a multi-tensor operator: one fused kernel on CUDA, a loop on the CPU
MAIN = "paper, 32 px"  # the setup of the JSON's single figures (the quick run: its only one)


def _data(batch: int) -> Any:
    from aebnas.data.datasets import load_dataset

    data = load_dataset("cifar10-subset")  # real images; the counts do not depend on them
    return dataclasses.replace(data, x_train=data.x_train[:2 * batch], y_train=data.y_train[:2 * batch])


def _run(setup: str, batch: int, **kwargs: Any) -> Any:
    from aebnas.space_values import space_values_of
    from aebnas.training.supernet import SupernetTraining
    from aebnas.training.supernet_file import SupernetSettings

    space_kwargs, width = SETUPS[setup]
    settings = SupernetSettings(epochs=4, batch_size=batch, warmup_fraction=0.0)
    return SupernetTraining(space_values_of(space_kwargs), width, _data(batch), settings, torch.device("cpu"),
                            **kwargs)


def _inside(event: Any, name: str) -> bool:
    """Whether ``event`` or one of its callers is named ``name`` (a name ending in ``*``: starts with it)."""
    while event is not None:
        if event.name == name or (name.endswith("*") and event.name.startswith(name[:-1])):
            return True
        event = event.cpu_parent
    return False


def static_step_ops(run: Any) -> dict[str, Any]:
    """One static step, uncompiled: operators inside the graphs' ranges, outside them (a ``_foreach_``
    operator once), the graph runs, and the launches from Python under CUDA graphs (outside + runs)."""
    from torch.profiler import ProfilerActivity, profile

    from aebnas.training.static_step import GRAPH_RANGE

    x, y = next(iter(run.train_batches))
    epoch = run.settings.warmup_epochs
    run.backward_step(x, y, epoch, 0)  # warm-up (buffers allocated)
    run.optimizer.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run.backward_step(x, y, epoch, 0)
    events = prof.events()
    inside = kernel_ops_of([e for e in events if _inside(e, GRAPH_RANGE)])
    outside = kernel_ops_of([e for e in events if not _inside(e, GRAPH_RANGE) and not _inside(e, FOREACH)])
    outside.update(e.name for e in events if e.name.startswith(FOREACH[:-1]) and not _inside(e, GRAPH_RANGE)
                   and not _inside(e.cpu_parent, FOREACH))
    runs = sum(1 for e in events if e.name == GRAPH_RANGE)
    return {"graph ops": sum(inside.values()), "outside ops": sum(outside.values()), "graph runs": runs,
            "launches": sum(outside.values()) + runs, "outside by op": outside}


CPU_LAYOUT = {"aten::native_batch_norm": "aten::zero_", "aten::convolution_backward": "aten::copy_"}


def cpu_layout_ops(run: Any) -> int:
    """Of one eager sandwich step's operators, those the CPU's channels_last kernels add: BatchNorm zeroing
    its outputs before its own kernel, convolution backward copying gradients to and from oneDNN's layout
    (cuDNN launches neither)."""
    from torch.profiler import ProfilerActivity, profile

    x, y = next(iter(run.train_batches))
    run.optimizer.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run.backward_step(x, y, run.settings.warmup_epochs, 0)
    events = prof.events()
    nested = {parent: kernel_ops_of([e for e in events if _inside(e.cpu_parent, parent)]) for parent in CPU_LAYOUT}
    return sum(nested[parent][op] for parent, op in CPU_LAYOUT.items())


def compiled_graphs(setup: str, batch: int, steps: int) -> dict[str, Any]:
    """The static step under torch.compile (backend ``eager``) for ``steps`` random sandwich steps."""
    run = _run(setup, batch, static=True, static_backend="eager")
    x, y = next(iter(run.train_batches))
    epoch = run.settings.warmup_epochs
    for step in range(steps):
        run.optimizer.zero_grad(set_to_none=True)
        run.backward_step(x, y, epoch, step)
    graphs = run.static.graphs()
    resolutions = sorted({int(k.split("@")[1]) for k in graphs})
    per_resolution = {r: sum(n for k, n in graphs.items() if k.endswith(f"@{r}")) for r in resolutions}
    return {"graphs": graphs, "per resolution": per_resolution, "recompiles": sum(n - 1 for n in graphs.values()),
            "resolutions": resolutions, "space resolutions": list(run.space.resolutions)}


def masked_vs_sliced(setup: str, batch: int) -> float:
    """Largest |masked − sliced| over every parameter's gradient after one sandwich step, relative to the
    largest |sliced| gradient (per parameter would divide noise by noise: a BatchNorm bias before another
    BatchNorm has a gradient of ~1e-9, zero but for rounding)."""
    grads = []
    for static in (False, True):
        run = _run(setup, batch, static=static, static_backend=False)
        x, y = next(iter(run.train_batches))
        run.backward_step(x, y, run.settings.warmup_epochs, 0)
        grads.append({n: p.grad for n, p in run.model.named_parameters()})
    sliced, masked = grads
    if {n for n, g in sliced.items() if g is None} != {n for n, g in masked.items() if g is None}:
        raise RuntimeError("the masked step leaves other parameters without a gradient than the sliced one")
    scale = max(float(g.abs().max()) for g in sliced.values() if g is not None)
    return max(float((masked[n] - g).abs().max()) for n, g in sliced.items() if g is not None) / scale


def baseline_ops(batch: int) -> dict[str, int]:
    """Largest subnet of the paper's space alone and torchvision's mobilenet_v3_small, at 32 px."""
    from harness.baseline import MobileNetV3Small

    from aebnas.config import largest_arch
    from aebnas.data.batches import BatchLoader
    from aebnas.nn import EarlyExitNet

    data = _data(batch)
    loader = BatchLoader.for_split(data, "train", batch_size=batch, resolution=32, train=True,
                                   device=torch.device("cpu"))
    largest = EarlyExitNet(largest_arch(_run(MAIN, batch).space, width_mult=1.0, num_classes=10, in_channels=3))
    tv = MobileNetV3Small(1.0, 10)
    return {"largest alone": plain_step_ops(largest, loader)[0], "torchvision": plain_step_ops(tv, loader)[0]}


def measure(ctx: Context, batch: int, compile_steps: int, compile_setup: str, setups: list[str]) -> Outcome:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for setup in setups:
        eager_run = _run(setup, batch)
        eager_run.grads_in_place = True  # the eager step as it runs on CUDA (the CPU's default slices plainly)
        eager, by_op = sandwich_step_ops(eager_run)
        layout = cpu_layout_ops(eager_run)
        static = static_step_ops(_run(setup, batch, static=True, static_backend=False))
        row = {"setup": setup, "eager sandwich ops": eager, "of which CPU layout": layout,
               "static: launches": static["launches"],
               "static: graph runs": static["graph runs"], "static: ops outside graphs": static["outside ops"],
               "static: ops inside graphs": static["graph ops"],
               "eager top ops": ", ".join(f"{k[6:]} {v}" for k, v in by_op.most_common(4))}
        rows.append(row)
        ctx.add_row("steps", row)
        print(f"  {setup}: eager {eager}, static launches {static['launches']} "
              f"(graphs hold {static['graph ops']})", flush=True)
    base = baseline_ops(batch)
    ctx.add_row("baselines", base)
    compiled = compiled_graphs(compile_setup, batch, compile_steps)
    ctx.add_row("compiled", {k: v for k, v in compiled.items() if k != "graphs"})
    diff = masked_vs_sliced(setups[-1], batch)
    main_row = next((r for r in rows if r["setup"] == MAIN), rows[-1])
    figures = {"eager_sandwich_ops": main_row["eager sandwich ops"], "static_sandwich_ops": main_row["static: launches"],
               "static_graph_ops": main_row["static: ops inside graphs"], "largest_alone_ops": base["largest alone"],
               "torchvision_ops": base["torchvision"], "static_graphs": max(compiled["per resolution"].values()),
               "static_recompiles": compiled["recompiles"], "resolutions": compiled["resolutions"],
               "graphs": compiled["graphs"], "masked_vs_sliced_grad_rel_diff": diff,
               "eager_sandwich_ops_by_setup": {r["setup"]: r["eager sandwich ops"] for r in rows},
               "eager_cpu_layout_ops": main_row["of which CPU layout"], "batch": batch}
    holds = (max(r["eager sandwich ops"] for r in rows) <= 3500 and figures["static_graphs"] <= 2
             and figures["static_recompiles"] == 0 and diff < 1e-4)
    measured = (f"eager sandwich {figures['eager_sandwich_ops']:,} ops ({main_row['setup']}; "
                f"{min(r['eager sandwich ops'] for r in rows):,}–{max(r['eager sandwich ops'] for r in rows):,} "
                f"over {len(rows)} spaces); static step {figures['static_sandwich_ops']} launches, "
                f"{figures['static_graphs']} graphs per resolution, {figures['static_recompiles']} recompiles in "
                f"{compile_steps} steps; gradients equal to {diff:.1e}; torchvision {base['torchvision']}")
    details = "\n".join([
        f"Batch {batch}, CPU-counted (`harness.op_count`: aten operators that launch a kernel; the optimiser "
        "step not counted). *Of which CPU layout*: the eager step's operators that the CPU's channels_last "
        "kernels add and cuDNN does not launch (BatchNorm zeroing its outputs, convolution backward copying "
        "to and from oneDNN's layout). Static step: *launches* = operators outside the graphs (a multi-tensor `_foreach_` "
        "operator once) + one per graph run (forward with loss, backward, per subnet), what Python launches "
        "when `torch.compile(mode=\"reduce-overhead\")` replays the graphs as CUDA graphs; *inside* = what the "
        "graphs hold before inductor fuses anything.", "",
        md_table(rows, 0), "",
        f"Largest subnet of the paper's space alone at 32 px: {base['largest alone']:,} ops; torchvision's "
        f"`mobilenet_v3_small`: {base['torchvision']:,}.", "",
        f"Static step under `torch.compile` (backend `eager`), {compile_steps} random sandwich steps of the "
        f"{compile_setup} space (resolutions {compiled['space resolutions']}): graphs by role and resolution "
        f"{compiled['graphs']}; {compiled['recompiles']} recompiles.", "",
        f"Masked vs sliced, one sandwich step ({setups[-1]}): largest gradient difference "
        f"{diff:.1e} of the largest gradient.",
    ])
    LAST.update({k: figures[k] for k in JSON_KEYS})
    return Outcome(measured, holds, figures, details)


if __name__ == "__main__":
    status = main(CLAIM, measure, SETTINGS, QUICK)
    if LAST:
        print(json.dumps(LAST), flush=True)
    sys.exit(status)
