"""Tests for aebnas/nn: shapes, dynamic inference that really skips work, BatchNorm statistics."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aebnas.config import ExitModuleConfig, uniform_arch
from aebnas.nn import EarlyExitNet, make_divisible, torch_confidence
from aebnas.training.loop import recalibrate_bn
from conftest import make_confident

NUM_CLASSES = 7


def _net(exits=(1, 2, 3, 4), seed=0, confident=True, **kwargs):
    """A small random network in eval mode.

    ``confident``: BatchNorm statistics measured on random inputs (fresh ones are 0/1 and
    let activations shrink with depth) and large classifier weights, so that confidences
    spread over [0, 1] instead of the ~1e-5 margins of the initial network.
    """
    torch.manual_seed(seed)
    kwargs.setdefault("width_mult", 0.25)
    kwargs.setdefault("num_classes", NUM_CLASSES)
    arch = uniform_arch(2, 3, 3, exits=exits, exit_module=ExitModuleConfig(8, 3, 2, 1), **kwargs)
    net = EarlyExitNet(arch).eval()
    if confident:
        make_confident(net, torch.randn(32, arch.in_channels, arch.resolution, arch.resolution))
    return net


def _calls(module):
    """Record the batch size of every call of ``module``; returns (list, hook handle)."""
    sizes = []
    handle = module.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    return sizes, handle


def _split_thresholds(conf, fraction=0.3):
    """A threshold strictly between two observed confidences, letting ~``fraction`` pass."""
    values = conf.sort().values
    k = int(len(values) * (1 - fraction))
    assert values[k] - values[k - 1] > 1e-6  # far from any sample: no rounding ties
    return float((values[k] + values[k - 1]) / 2)


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("resolution", [28, 32, 57, 72, 96])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_gives_one_logits_tensor_per_exit_then_final(in_channels, resolution):
    net = _net(in_channels=in_channels, resolution=resolution)
    out = net(torch.randn(2, in_channels, resolution, resolution))
    assert len(out) == 5
    assert all(o.shape == (2, NUM_CLASSES) and torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize("exits", [(), (3,), (2, 4), (1, 2, 3, 4)])
def test_forward_output_count_follows_the_exits(exits):
    net = _net(exits=exits, resolution=32)
    assert net.num_exits == len(exits)
    assert [e.position for e in net.exits] == list(exits)
    assert len(net(torch.randn(3, 3, 32, 32))) == len(exits) + 1


def test_exit_branches_hang_after_their_stage():
    net = _net(exits=(2, 4), width_mult=1.0)
    # width 1.0: stage widths 24/40/80/112/160; exit modules read their stage's channels.
    assert net.arch.stage_channels == (24, 40, 80, 112, 160)
    assert net.exits[0].features[0][1][0].in_channels == 40
    assert net.exits[1].features[0][1][0].in_channels == 112
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = net.stem(x)
        h = net.stages[1](net.stages[0](h))
        exit_a = net.exits[0](h)
        h = net.stages[3](net.stages[2](h))
        exit_b = net.exits[1](h)
        final = net.head(net.stages[4](h))
        out = net(x)
    for got, want in zip(out, (exit_a, exit_b, final)):
        torch.testing.assert_close(got, want)


def test_width_mult_scales_channels():
    net = _net(width_mult=0.25)
    assert net.arch.stage_channels == tuple(make_divisible(c * 0.25) for c in (24, 40, 80, 112, 160))
    assert net.arch.stage_channels == (8, 16, 24, 32, 40)


# --------------------------------------------------------------------------- infer
def test_infer_with_all_exits_off_equals_the_final_exit():
    net = _net()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        final = net(x)[-1]
    logits, idx = net.infer(x, [1.0] * 4)
    torch.testing.assert_close(logits, final, rtol=1e-5, atol=1e-6)
    assert torch.equal(idx, torch.full((16,), 4))


def test_infer_threshold_zero_sends_everything_to_the_first_exit():
    net = _net()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        first = net(x)[0]
    watched = [net.stages[1], net.exits[1], net.exits[2], net.exits[3], net.head]
    calls = [_calls(m) for m in watched]
    logits, idx = net.infer(x, [0.0, 0.3, 0.6, 0.9])
    for _, handle in calls:
        handle.remove()
    torch.testing.assert_close(logits, first, rtol=1e-5, atol=1e-6)
    assert torch.equal(idx, torch.zeros(16, dtype=torch.long))
    assert [sizes for sizes, _ in calls] == [[]] * len(watched)  # nothing computed past exit 0


def test_infer_computes_only_the_remaining_samples():
    net = _net()
    x = torch.randn(40, 3, 32, 32)
    with torch.no_grad():
        forward = net(x)
    conf = [torch_confidence(o) for o in forward]
    th = [_split_thresholds(conf[0]), 1.0, _split_thresholds(conf[2]), 1.0]
    calls = {name: _calls(mod) for name, mod in
             [("exit0", net.exits[0]), ("exit1", net.exits[1]), ("exit2", net.exits[2]),
              ("exit3", net.exits[3]), ("stage2", net.stages[1]), ("head", net.head)]}
    logits, idx = net.infer(x, th)
    for sizes, handle in calls.values():
        handle.remove()

    leave0 = conf[0] >= th[0]
    leave2 = ~leave0 & (conf[2] >= th[2])
    expected = torch.full((40,), 4)
    expected[leave2] = 2
    expected[leave0] = 0
    assert torch.equal(idx, expected)
    n0, n2 = int(leave0.sum()), int(leave2.sum())
    assert n0 > 0 and n2 > 0 and n0 + n2 < 40  # every path is exercised
    sizes = {name: s for name, (s, _) in calls.items()}
    assert sizes["exit0"] == [40]
    assert sizes["stage2"] == [40 - n0]
    assert sizes["exit1"] == [] and sizes["exit3"] == []  # threshold 1.0: never computed
    assert sizes["exit2"] == [40 - n0]
    assert sizes["head"] == [40 - n0 - n2]
    # Each sample gets the logits of the exit it took.
    for j in (0, 2, 4):
        rows = idx == j
        torch.testing.assert_close(logits[rows], forward[j][rows], rtol=1e-4, atol=1e-5)


def test_infer_never_computes_a_disabled_branch():
    net = _net()
    x = torch.randn(8, 3, 32, 32)
    calls = [_calls(m) for m in (*net.exits, net.head)]
    net.infer(x, [1.0, 0.0, 1.0, 1.0])
    assert [sizes for sizes, _ in calls] == [[], [8], [], [], []]
    net.infer(x, [1.0, 1.0, 1.0, 1.0])
    assert [sizes for sizes, _ in calls] == [[], [8], [], [], [8]]
    for _, handle in calls:
        handle.remove()


@pytest.mark.parametrize("thresholds, message", [
    ([0.5, 0.5, 0.5], "thresholds has 3 values but the network has 4 exits"),
    ([0.5] * 5, "thresholds has 5 values but the network has 4 exits"),
    ([0.5, 1.5, 0.5, 0.5], r"thresholds\[1\]=1.5 is not in \[0, 1\]"),
    ([0.5, 0.5, -0.1, 0.5], r"thresholds\[2\]=-0.1 is not in \[0, 1\]"),
    ([0.5, 0.5, 0.5, float("nan")], r"thresholds\[3\]=nan is not in \[0, 1\]"),
])
def test_infer_rejects_bad_thresholds(thresholds, message):
    with pytest.raises(ValueError, match=message):
        _net().infer(torch.randn(2, 3, 32, 32), thresholds)


def test_infer_on_a_static_network_runs_the_head():
    net = _net(exits=())
    x = torch.randn(4, 3, 32, 32)
    logits, idx = net.infer(x, [])
    with torch.no_grad():
        torch.testing.assert_close(logits, net(x)[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(idx, torch.zeros(4, dtype=torch.long))


# --------------------------------------------------------------------------- BatchNorm
def test_bn_uses_default_momentum():
    bns = [m for m in _net(confident=False).modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.1 for m in bns)


def test_recalibrate_bn_sets_running_stats_to_the_batch_statistics():
    net = _net(confident=False).train()
    torch.manual_seed(1)
    # Non-zero mean, so stale running statistics (initial 0/1, momentum 0.1) are visibly wrong.
    batches = [(torch.randn(16, 3, 32, 32) * 2 + 3, torch.zeros(16, dtype=torch.long)) for _ in range(4)]
    with torch.no_grad():
        net(batches[0][0])
        net(batches[1][0])
    stem_conv, stem_bn = net.stem[0][0], net.stem[0][1]
    head_bn = net.head[0][1]
    seen_by_head_bn = []
    handle = head_bn.register_forward_pre_hook(lambda m, args: seen_by_head_bn.append(args[0].clone()))

    used = recalibrate_bn(net, batches, max_batches=2)
    handle.remove()

    assert used == 2 and len(seen_by_head_bn) == 2  # the other two batches are not read
    assert not net.training and stem_bn.momentum == 0.1
    # Stem BN, by hand: its input is the stem conv of each batch; the running statistics
    # are the plain averages of the per-batch mean and (unbiased) variance.
    with torch.no_grad():
        conv_out = [F.conv2d(x, stem_conv.weight, stride=2, padding=1) for x, _ in batches[:2]]
    mean = torch.stack([c.mean(dim=(0, 2, 3)) for c in conv_out]).mean(0)
    var = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in conv_out]).mean(0)
    assert mean.abs().max() > 0.1  # the check below is not about zeros
    torch.testing.assert_close(stem_bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stem_bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert int(stem_bn.num_batches_tracked) == 2
    # A deep BN: the same rule on the inputs it saw.
    deep_mean = torch.stack([h.mean(dim=(0, 2, 3)) for h in seen_by_head_bn]).mean(0)
    torch.testing.assert_close(head_bn.running_mean, deep_mean, rtol=1e-4, atol=1e-5)


def test_recalibrate_bn_with_zero_batches_changes_nothing():
    net = _net(confident=False).train()
    with torch.no_grad():
        net(torch.randn(4, 3, 32, 32) + 1)
    before = net.stem[0][1].running_mean.clone()
    assert recalibrate_bn(net, [(torch.randn(4, 3, 32, 32), None)], max_batches=0) == 0
    assert torch.equal(net.stem[0][1].running_mean, before)


def test_scripted_network_infers_exactly_as_eager():
    """The exit rule exists once: the network itself scripts, thresholds and measure inside."""
    net = _net()
    net.set_thresholds([0.2, 0.5, 1.0, 0.4])
    scripted = torch.jit.script(net)
    x = torch.randn(16, 3, 32, 32)
    logits, idx = net.infer(x)
    s_logits, s_idx = scripted.infer(x)
    assert torch.equal(idx, s_idx) and len(set(idx.tolist())) > 1  # several exits taken
    torch.testing.assert_close(s_logits, logits)
    assert scripted.thresholds.tolist() == pytest.approx([0.2, 0.5, 1.0, 0.4])
    for out, ref in zip(scripted(x), net(x)):
        torch.testing.assert_close(out, ref)


def test_thresholds_are_a_buffer_saved_with_the_weights():
    net = _net()
    assert net.thresholds.tolist() == [1.0] * 4  # exits off until thresholds are tuned
    net.set_thresholds([0.3, 0.3, 0.3, 0.3])
    other = _net(seed=1)
    other.load_state_dict(net.state_dict())
    assert other.thresholds.tolist() == pytest.approx([0.3] * 4)
    with pytest.raises(ValueError, match="thresholds has 2 values"):
        net.set_thresholds([0.1, 0.2])


def test_state_dict_of_aebnas_0_1_loads():
    """0.1 numbered its existing exits `exits.j` and kept no thresholds; its checkpoints still load."""
    net = _net(exits=(2, 4))
    old = {}
    for key, value in net.state_dict().items():
        if key.startswith("branches."):
            stage, rest = key[len("branches."):].split(".", 1)
            key = f"exits.{(2, 4).index(int(stage) + 1)}.{rest}"
        if key != "thresholds":
            old[key] = value
    fresh = _net(exits=(2, 4), seed=3)
    fresh.load_state_dict(old)
    x = torch.randn(4, 3, 32, 32)
    for out, ref in zip(fresh(x), net(x)):
        torch.testing.assert_close(out, ref)


def test_block_rows_describe_the_built_blocks():
    """ArchConfig says what the network is, row by row; the network only turns rows into layers."""
    arch = uniform_arch(3, 5, 4, exits=(2,), width_mult=0.5)
    rows = arch.block_rows()
    assert len(rows) == 1 + 5 * 3 and rows[0].stage == 0
    net = EarlyExitNet(arch)
    built = [net.stem[1]] + [block for stage in net.stages for block in stage]
    for row, block in zip(rows, built):
        depthwise = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.groups > 1][0]
        assert depthwise.kernel_size == (row.kernel, row.kernel) and depthwise.stride == (row.stride, row.stride)
        assert block.block[-1][0].out_channels == row.out_channels
    assert [r.stride for r in rows if r.stage > 0][::3] == [2, 2, 2, 1, 2]
    assert rows[-1].out_channels == arch.stage_channels[-1] == make_divisible(160 * 0.5)


def test_builders_make_the_network_s_stem_head_and_widths():
    from aebnas.nn import build_head, build_stem, init_weights, se_channels

    arch = uniform_arch(2, 5, 4, exits=(2,), width_mult=0.75, num_classes=7)
    net = EarlyExitNet(arch)
    stem, head = build_stem(arch.stem_row(), arch.block_rows()[0]), build_head(arch.head_row())
    shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()]  # noqa: E731
    assert shapes(stem) == shapes(net.stem) and shapes(head) == shapes(net.head)
    assert head[-1].out_features == 7 and head[2].out_channels == 1280
    # the squeeze-excite reduction, computed in one place
    assert se_channels(72) == 24 and se_channels(40) == 16  # 72/4 = 18 → 24 (16 would lose > 10%); 10 → 16
    torch.manual_seed(0)
    a = EarlyExitNet(arch)
    torch.manual_seed(0)
    b = EarlyExitNet(arch)
    init_weights(b)  # a second draw from the same rule changes the convs, keeps BN at (1, 0)
    assert not torch.equal(a.stem[0][0].weight, b.stem[0][0].weight)
    assert torch.equal(b.stem[0][1].weight, torch.ones_like(b.stem[0][1].weight))


# --------------------------------------------------------------------------- exit branches
def test_the_paper_s_exit_module_resizes_then_convolves_with_stride_two_unpadded():
    """Two modules at exit 4, width 1.0 (112 channels): 10 px, k5, ×2 → 3×3 → 2×2 max pool → 1×1,
    then 10 px, k5, ×2 again on 224 channels; the classifier reads 448 features."""
    m1, m2 = ExitModuleConfig(10, 5, 2, 1), ExitModuleConfig(10, 5, 2, 0)
    net = EarlyExitNet(uniform_arch(2, 3, 3, exits=(4,), exit_module=m1, second_module=m2)).eval()
    branch = net.exits[0]
    first, second = branch.features
    assert first[0].size == 10 and isinstance(first[2], nn.MaxPool2d) and len(second) == 2  # no pool in m2
    conv = first[1][0]
    assert (tuple(conv.weight.shape), conv.stride, conv.padding, conv.bias) == ((224, 112, 5, 5), (2, 2), (0, 0), None)
    assert isinstance(first[1][2], nn.ReLU)
    assert tuple(second[1][0].weight.shape) == (448, 224, 5, 5)
    assert branch.classifier.in_features == 448 and isinstance(branch.mix, nn.Identity)
    h = torch.randn(2, 112, 4, 4)  # exit 4's map at 64 px
    with torch.no_grad():
        resized = F.interpolate(h, size=(10, 10), mode="bicubic", align_corners=False)
        torch.testing.assert_close(first[0](h), resized)
        assert first(h).shape == (2, 224, 1, 1) and second(first(h)).shape == (2, 448, 3, 3)


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_an_exit_s_output_does_not_depend_on_the_input_size_s_shape(size):
    """The resize makes every input size work, a 1×1 map included (the pool is skipped there)."""
    m = ExitModuleConfig(8, 5, 1, 1)  # 8 px, k5 → 2×2 → pooled to 1×1
    net = EarlyExitNet(uniform_arch(2, 3, 3, exits=(2,), exit_module=m, second_module=m, width_mult=0.5)).eval()
    out = net.exits[0](torch.randn(3, net.arch.stage_channels[1], size, size))
    assert out.shape == (3, 10)


def test_edanas_exit_expands_pools_mixes_then_classifies():
    net = EarlyExitNet(uniform_arch(2, 3, 3, exits=(1, 3), exit_branch="edanas", width_mult=1.0)).eval()
    branch = net.exits[1]  # after stage 3: 80 channels
    expand, mix = branch.features[0], branch.mix
    assert tuple(expand[0].weight.shape) == (480, 80, 1, 1) and isinstance(expand[2], nn.Hardswish)
    assert tuple(mix[0].weight.shape) == (640, 480, 1, 1) and mix[0].bias is None
    assert isinstance(mix[1], nn.Hardswish) and len(mix) == 2  # no BatchNorm after the feature conv
    assert branch.classifier.in_features == 640
    h = torch.randn(2, 80, 4, 4)
    with torch.no_grad():
        by_hand = branch.classifier(mix(expand(h).mean((2, 3), keepdim=True)).flatten(1))
        torch.testing.assert_close(branch(h), by_hand)
