"""The supernet at fixed shapes: every subnet runs the largest one's tensors, its choices given as masks.

:func:`masked_forward` runs subnet ``arch`` of an :class:`~aebnas.nn.ElasticEarlyExitNet` with the same
parameters as ``supernet(x, arch)``, but every shape is the one the largest subnet has at that input
resolution, so a training step traces into one graph per resolution whatever the subnet (CUDA graphs
can capture it; docs/supernet.md, "The static-shape step"). The subnet is a flat float tensor of masks
(:class:`MaskLayout`, ``layout.encode(arch)``):

- **channels**: an inverted residual's middle channels (expansion) and squeeze width, an exit module's
  output channels (its expansion): the channels a subnet does not have are zeroed after their
  activation, so the next layer adds nothing from them;
- **kernels**: a depthwise weight's unused ring is zeroed — exactly the centre crop, as padding is
  ``K // 2`` at the largest kernel K;
- **depth**: a block the subnet does not have is gated off: ``h + 0 · f(h)`` is ``h``;
- **exit branches**: every (resize, kernel) of an exit module is computed at its own small, fixed shape
  (there are four in the paper's space), as are both branches and both depths; the subnet's are picked
  by 0/1 weights; a missing exit gives zero logits and its loss is masked (``exits_on``);
- **BatchNorm**: batch statistics are per channel, so masked channels change nothing of the others; the
  running statistics of a channel, block or variant the subnet does not have are left as they were.

The outputs equal the sliced ones (``supernet(x, arch)``) to float tolerance, and so do the losses and
the gradients of every parameter the subnet uses; a parameter it does not use gets a zero gradient
where the sliced path leaves ``None`` (:func:`unused_parameters` names them, so a step can set them back
to ``None`` before the optimizer sees them). The resolution is the one spatial choice left to the
caller: each is its own shape (a bucket).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ArchConfig, ExitConfig, ExitModuleConfig
from .blocks import expanded_channels, se_channels
from .elastic import ElasticEarlyExitNet, ElasticExitBranch, ElasticInvertedResidual, covers
from .elastic_ops import ElasticBatchNorm2d, centre_crop
from .exits import resize_bicubic


@dataclasses.dataclass(frozen=True)
class _Variant:
    """One exit module's spatial choice: resize, kernel, and whether a 2×2 pool can follow (conv output ≥ 2)."""

    resize: int
    kernel: int

    @property
    def can_pool(self) -> bool:
        return ExitModuleConfig(self.resize, self.kernel, 1, 1).pools


class MaskLayout:
    """Where each mask lives in the flat mask tensor of one supernet (:meth:`encode` writes one subnet's).

    Names: ``s{stage}b{block}/on|mid|squeeze|kernel|e1``; ``exit{p}/on|edanas|depth1|depth2|expand1|expand2``,
    ``exit{p}/m{1,2}/v{i}`` (that variant of that module is the subnet's), ``exit{p}/m{1,2}/pool`` and
    ``exit{p}/m2/resize{r}`` (the matrix resizing module 1's output to r pixels; zero without module 2).
    """

    def __init__(self, supernet: ElasticEarlyExitNet) -> None:
        self.supernet, space = supernet, supernet.space
        self.shapes: dict[str, tuple[int, ...]] = {}
        for s, stage in enumerate(supernet.stages, start=1):
            for b, block in enumerate(stage):
                self._blocks_masks(f"s{s}b{b}", block)
        self.variants = {m: tuple(_Variant(r, k) for r, k in itertools.product(resizes, space.exit_kernels) if r)
                         for m, resizes in ((1, space.exit_m1_resizes), (2, space.exit_m2_resizes))}
        self.m1_side = max(ExitModuleConfig(v.resize, v.kernel, 1, 0).conv_size for v in self.variants[1])
        for p in space.exit_positions:
            branch = supernet.branches[p - 1]
            for name in ("on", "edanas", "depth1", "depth2"):
                self.shapes[f"exit{p}/{name}"] = ()
            for m, module in enumerate(branch.features, start=1):
                self.shapes[f"exit{p}/expand{m}"] = (module.conv.conv.conv.out_channels,)
                self.shapes[f"exit{p}/m{m}/pool"] = ()
                for i in range(len(self.variants[m])):
                    self.shapes[f"exit{p}/m{m}/v{i}"] = ()
                if m == 2:  # module 1's output (padded to the largest) resized to each of module 2's sizes
                    for r in sorted({v.resize for v in self.variants[2]}):
                        self.shapes[f"exit{p}/m2/resize{r}"] = (r, self.m1_side)
        self.offsets: dict[str, int] = {}
        self.sizes = {name: int(np.prod(shape, dtype=np.int64)) for name, shape in self.shapes.items()}
        at = 0
        for name in self.shapes:
            self.offsets[name] = at
            at += self.sizes[name]
        self.size = at

    def _blocks_masks(self, prefix: str, block: ElasticInvertedResidual) -> None:
        mid = block.depthwise.conv.conv.out_channels
        self.shapes[f"{prefix}/on"] = ()
        self.shapes[f"{prefix}/mid"] = (mid,)
        self.shapes[f"{prefix}/kernel"] = tuple(block.depthwise.conv.conv.kernel_size)
        self.shapes[f"{prefix}/e1"] = ()
        if block.se is not None:
            self.shapes[f"{prefix}/squeeze"] = (block.se.reduce.conv.out_channels,)

    # ------------------------------------------------------------ writing
    def encode(self, arch: ArchConfig) -> np.ndarray:
        """Subnet ``arch`` as one float32 vector of 0/1 masks (raises ValueError if it is not a subnet)."""
        reason = covers(self.supernet, arch)
        if reason is not None:
            raise ValueError(reason)
        flat = np.zeros(self.size, np.float32)
        for s, (stage, stage_cfg) in enumerate(zip(self.supernet.stages, arch.stages), start=1):
            for b, (block, block_cfg) in enumerate(zip(stage, stage_cfg.blocks)):
                self._write_block(flat, f"s{s}b{b}", block, block_cfg.kernel, block_cfg.expansion)
        for e in arch.exits:
            self._write_exit(flat, e)
        return flat

    def _set(self, flat: np.ndarray, name: str, value: float | np.ndarray) -> None:
        at = self.offsets[name]
        flat[at:at + self.sizes[name]] = np.asarray(value, np.float32).reshape(-1)

    def _first(self, name: str, count: int) -> np.ndarray:
        mask = np.zeros(self.shapes[name], np.float32)
        mask[:count] = 1.0
        return mask

    def _write_block(self, flat: np.ndarray, prefix: str, block: ElasticInvertedResidual, kernel: int,
                     expansion: int) -> None:
        mid = expanded_channels(block.in_channels, expansion)
        self._set(flat, f"{prefix}/on", 1.0)
        self._set(flat, f"{prefix}/mid", self._first(f"{prefix}/mid", mid))
        self._set(flat, f"{prefix}/e1", float(expansion == 1))
        ring = np.zeros(self.shapes[f"{prefix}/kernel"], np.float32)
        centre_crop(ring, kernel)[...] = 1.0  # the centre a subnet's kernel takes (the sliced path's crop)
        self._set(flat, f"{prefix}/kernel", ring)
        if block.se is not None:
            self._set(flat, f"{prefix}/squeeze", self._first(f"{prefix}/squeeze", se_channels(mid)))

    def _write_exit(self, flat: np.ndarray, e: ExitConfig) -> None:
        p = f"exit{e.position}"
        self._set(flat, f"{p}/on", 1.0)
        if e.branch == "edanas":
            self._set(flat, f"{p}/edanas", 1.0)
            return
        self._set(flat, f"{p}/depth{e.depth}", 1.0)
        channels = self.supernet.branches[e.position - 1].features[0].conv.conv.conv.in_channels
        for m, module in enumerate(e.modules, start=1):
            channels *= module.expansion
            self._set(flat, f"{p}/expand{m}", self._first(f"{p}/expand{m}", channels))
            self._set(flat, f"{p}/m{m}/pool", float(module.pool))
            index = self.variants[m].index(_Variant(module.resize, module.kernel))
            self._set(flat, f"{p}/m{m}/v{index}", 1.0)
            if m == 2:
                for r in sorted({v.resize for v in self.variants[2]}):
                    self._set(flat, f"{p}/m2/resize{r}", _padded_matrix(e.modules[0].out_size, r, self.m1_side))

    # ------------------------------------------------------------ reading
    def unpack(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` by name (inside a traced graph these are free)."""
        return {name: flat[self.offsets[name]:self.offsets[name] + self.sizes[name]].view(shape)
                for name, shape in self.shapes.items()}


@functools.lru_cache(maxsize=None)
def _padded_matrix(size_in: int, size_out: int, side: int) -> np.ndarray:
    """The resize matrix from ``size_in`` to ``size_out`` pixels, zero columns up to ``side`` (host side)."""
    matrix = np.zeros((size_out, side), np.float32)
    matrix[:, :size_in] = _bicubic_matrix(size_in, size_out, torch.empty(0)).numpy()
    return matrix


# --------------------------------------------------------------------------- layers


def _masked_bn(x: torch.Tensor, bn: nn.BatchNorm2d, keep: torch.Tensor) -> torch.Tensor:
    """BatchNorm in training mode whose running statistics move only where ``keep`` (per channel, or one
    value for the whole layer) is 1; elsewhere they stay, as a layer the subnet does not have stays."""
    if not bn.training:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    if bn.momentum is None:
        raise ValueError("the static step needs BatchNorm momentum set (a cumulative average counts batches)")
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    y = F.batch_norm(x, mean, var, bn.weight, bn.bias, True, bn.momentum, bn.eps)
    kept = keep.expand_as(mean) > 0.5
    bn.running_mean.copy_(torch.where(kept, mean, bn.running_mean))
    bn.running_var.copy_(torch.where(kept, var, bn.running_var))
    return y


def _channels(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(1, -1, 1, 1)


def _conv_bn_act(x: torch.Tensor, layer, weight: torch.Tensor, keep: torch.Tensor, *, padding: int = 0,
                 groups: int = 1) -> torch.Tensor:
    """An ``ElasticConvBNAct`` at full width with ``weight`` (its own, or masked), running stats kept by ``keep``."""
    conv: nn.Conv2d = layer.conv.conv
    h = F.conv2d(x, weight, conv.bias, conv.stride, padding, 1, groups)
    bn: ElasticBatchNorm2d = layer.bn
    return layer.act(_masked_bn(h, bn.bn, keep))


def _block(h: torch.Tensor, block: ElasticInvertedResidual, m: dict[str, torch.Tensor], prefix: str,
           has_e1: bool, has_expand: bool) -> torch.Tensor:
    on, mid = m[f"{prefix}/on"], m[f"{prefix}/mid"]
    keep_mid = mid * on
    x = h
    if has_expand:
        e1 = m[f"{prefix}/e1"]
        expanded = _conv_bn_act(x, block.expand, block.expand.conv.conv.weight, keep_mid * (1 - e1))
        if has_e1:  # expansion 1 skips the expand conv: the input itself, widened with zero channels
            widened = F.pad(x, (0, 0, 0, 0, 0, expanded.shape[1] - x.shape[1]))
            expanded = e1 * widened + (1 - e1) * expanded
        x = expanded
    x = x * _channels(mid)
    dw = block.depthwise.conv.conv
    weight = dw.weight * m[f"{prefix}/kernel"]
    x = _conv_bn_act(x, block.depthwise, weight, keep_mid, padding=dw.kernel_size[0] // 2, groups=dw.groups)
    x = x * _channels(mid)
    if block.se is not None:
        se = block.se
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.relu(F.conv2d(s, se.reduce.conv.weight, se.reduce.conv.bias)) * _channels(m[f"{prefix}/squeeze"])
        x = x * F.hardsigmoid(F.conv2d(s, se.expand.conv.weight, se.expand.conv.bias))
    x = _conv_bn_act(x, block.project, block.project.conv.conv.weight, on)
    if block.use_residual:
        return h + on * x
    return x


def _module_variant(x: torch.Tensor, module, variant: _Variant, expand: torch.Tensor,
                    keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (resize, kernel) of an exit module at full width on ``x``, already resized: (output, 2×2-pooled
    output or None)."""
    h = _conv_bn_act(x, module.conv, centre_crop(module.conv.conv.conv.weight, variant.kernel), keep * expand)
    h = h * _channels(expand)
    return h, (F.max_pool2d(h, 2) if variant.can_pool else None)


def _exit_modules(h: torch.Tensor, branch: ElasticExitBranch, variants: dict[int, tuple[_Variant, ...]],
                  m: dict[str, torch.Tensor], p: str, aebnas: torch.Tensor) -> list[torch.Tensor]:
    """The pooled features after each module of the paper's branch (depth 1, then 2).

    Resizing is linear and separable, so it runs as two small matrix products (``A x Aᵀ``): module 1's
    matrices depend on the stage's map alone; module 2 takes module 1's possible outputs, padded to one
    size and summed with their 0/1 weights, and the matrices ``encode`` wrote for the size of the one
    the subnet has (bicubic interpolation's backward is slow on the CPU, a product's is not)."""
    features: list[torch.Tensor] = []
    previous: list[tuple[torch.Tensor, torch.Tensor]] = []  # module 1's possible outputs and their weights
    for i, module in enumerate(branch.features, start=1):
        depth_on = aebnas if i == 1 else m[f"{p}/depth2"]
        expand, pool = m[f"{p}/expand{i}"], m[f"{p}/m{i}/pool"]
        sizes = sorted({v.resize for v in variants[i]})
        if i == 1:
            inputs = {r: _resize_by(h, _bicubic_matrix(h.shape[-1], r, h)) for r in sizes}
        else:
            side = max(out.shape[-1] for _, out in previous)
            canvas = sum(w * F.pad(out, (0, side - out.shape[-1], 0, side - out.shape[-2])) for w, out in previous)
            inputs = {r: _resize_by(canvas, m[f"{p}/m2/resize{r}"]) for r in sizes}
        feature, current = 0.0, []
        for v, variant in enumerate(variants[i]):
            chosen = m[f"{p}/m{i}/v{v}"]
            out, pooled = _module_variant(inputs[variant.resize], module, variant, expand, chosen * depth_on)
            if pooled is None:
                current.append((chosen, out))
                feature = feature + chosen * out.mean((2, 3))
            else:
                current += [(chosen * (1 - pool), out), (chosen * pool, pooled)]
                feature = feature + chosen * ((1 - pool) * out.mean((2, 3)) + pool * pooled.mean((2, 3)))
        features.append(feature)
        previous = current
    return features


def _bicubic_matrix(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """``[size_out, size_in]``: :func:`resize_bicubic` along one side as a matrix (it applied to the identity,
    along the height alone)."""
    eye = torch.eye(size_in, dtype=torch.float32, device=like.device).view(size_in, 1, size_in, 1)
    return resize_bicubic(eye, (size_out, 1)).view(size_in, size_out).t()


def _resize_by(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W), H = W, resized by ``matrix`` (``[size, H]``) along both sides."""
    return torch.matmul(torch.matmul(matrix, x), matrix.t())


def _edanas(h: torch.Tensor, branch: ElasticExitBranch, keep: torch.Tensor) -> torch.Tensor:
    edanas = branch.edanas
    conv_bn_act = edanas.features[0]
    x = conv_bn_act[2](_masked_bn(F.conv2d(h, conv_bn_act[0].weight), conv_bn_act[1], keep))
    return edanas.classifier(torch.flatten(edanas.mix(edanas.pool(x)), 1))


def _exit(h: torch.Tensor, branch: ElasticExitBranch, variants: dict[int, tuple[_Variant, ...]],
          m: dict[str, torch.Tensor], position: int) -> torch.Tensor:
    p = f"exit{position}"
    edanas = m[f"{p}/edanas"]
    aebnas = m[f"{p}/on"] * (1 - edanas)
    logits = edanas * _edanas(h, branch, edanas)
    for d, (feature, classifier) in enumerate(zip(_exit_modules(h, branch, variants, m, p, aebnas),
                                                  branch.classifiers), start=1):
        logits = logits + m[f"{p}/depth{d}"] * F.linear(feature, classifier.linear.weight, classifier.linear.bias)
    return logits


# --------------------------------------------------------------------------- network


class MaskedSupernet(nn.Module):
    """``forward(x, masks)`` of subnet ``masks`` (``layout.encode(arch)`` as a tensor) at fixed shapes.

    Returns ``(exit_logits, final_logits, exits_on)``: logits at every exit position of the space
    (``[P, N, classes]``, zero where the subnet has no exit), the final classifier's, and which
    positions the subnet has (``[P]``). Holds the supernet (same parameters): ``state_dict`` is its.
    """

    def __init__(self, supernet: ElasticEarlyExitNet) -> None:
        super().__init__()
        self.supernet = supernet
        self.layout = MaskLayout(supernet)
        space = supernet.space
        self.has_e1 = 1 in space.expansions and len(space.expansions) > 1
        self.positions = tuple(space.exit_positions)

    def masks(self, arch: ArchConfig, device: torch.device | str) -> torch.Tensor:
        """Subnet ``arch`` as the mask tensor ``forward`` takes, on ``device``."""
        return torch.from_numpy(self.layout.encode(arch)).to(device, non_blocking=True)

    def forward(self, x: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        net, m = self.supernet, self.layout.unpack(masks)
        h = net.stem(x)
        exits = []
        for s, stage in enumerate(net.stages, start=1):
            for b, block in enumerate(stage):
                h = _block(h, block, m, f"s{s}b{b}", self.has_e1, block.expand is not None)
            if s in self.positions:
                exits.append(_exit(h, net.branches[s - 1], self.layout.variants, m, s))
        on = torch.stack([m[f"exit{p}/on"] for p in self.positions])
        return torch.stack(exits), net.head(h), on


def masked_exit_loss(exits: torch.Tensor, final: torch.Tensor, on: torch.Tensor, loss_of, exit_weight: float
                     ) -> torch.Tensor:
    """final + w · Σ on_p · loss(exit_p): ``multi_exit_loss`` / ``distillation_loss`` with exits as masks."""
    loss = loss_of(final)
    if exit_weight > 0:
        loss = loss + exit_weight * sum(on[i] * loss_of(exits[i]) for i in range(exits.shape[0]))
    return loss


def unused_parameters(supernet: ElasticEarlyExitNet, archs: list[ArchConfig]) -> list[nn.Parameter]:
    """The exit-branch parameters none of ``archs`` uses (EDANAS's exits, a depth's classifier, a whole
    position's branch): the sliced path leaves their gradient ``None``, the masked one zero."""
    used: set[int] = set()
    for arch in archs:
        for e in arch.exits:
            branch = supernet.branches[e.position - 1]
            parts = ([branch.edanas] if e.branch == "edanas" else
                     [*branch.features[:e.depth], branch.classifiers[e.depth - 1]])
            used.update(id(p) for part in parts for p in part.parameters())
    return [p for branch in supernet.branches if isinstance(branch, ElasticExitBranch)
            for p in branch.parameters() if id(p) not in used]


__all__ = ["MaskLayout", "MaskedSupernet", "masked_exit_loss", "unused_parameters"]
