"""aebnas/nn/elastic.py: the supernet runs every subnet exactly as the extracted EarlyExitNet does."""

import random

import numpy as np
import pytest
import torch
from ray.tune.search.sample import Domain
from torch import nn

from aebnas.config import (NUM_STAGES, PAPER_SPACE, ArchConfig, BlockConfig, ExitConfig, ExitModuleConfig,
                           SpaceValues, StageConfig, largest_arch, make_divisible, smallest_arch, uniform_arch)
from aebnas.nn import EarlyExitNet
from aebnas.nn.elastic import ElasticEarlyExitNet, covers, extract
from search_spaces import aebnas_space, fixed_exits_space, static_space

WIDTH = 0.25
RESOLUTIONS = (32, 36, 40)
# A space unlike the paper's: expansion 1 (no expand conv), a 9×9 kernel, exits only at 2
# and 3, a second exit module resizing to more pixels than the first, exit kernel 1, exit expansion 3.
ODD_SPACE = SpaceValues(depths=(1, 2), kernels=(3, 5, 9), expansions=(1, 3, 6), exit_positions=(2, 3),
                        exit_m1_resizes=(5, 8), exit_m2_resizes=(0, 6, 12), exit_kernels=(1, 3, 5),
                        exit_expansions=(1, 3))


def random_arch(space: SpaceValues, rng: random.Random) -> ArchConfig:
    """An architecture drawn from the space's value sets; each exit position is on with p = 0.5, its
    branch the paper's or EDANAS's with p = 0.5."""
    def module(resize: int) -> ExitModuleConfig:
        return ExitModuleConfig(resize, rng.choice(space.exit_kernels), rng.choice(space.exit_expansions),
                                rng.choice(space.exit_pools))

    stages = tuple(StageConfig(tuple(BlockConfig(rng.choice(space.kernels), rng.choice(space.expansions))
                                     for _ in range(rng.choice(space.depths))))
                   for _ in range(NUM_STAGES))
    exits = []
    for position in space.exit_positions:
        if rng.random() < 0.5:
            continue
        modules = [module(rng.choice(space.exit_m1_resizes))]
        m2 = rng.choice(space.exit_m2_resizes)
        if m2:
            modules.append(module(m2))
        edanas = rng.random() < 0.5
        exits.append(ExitConfig(position, () if edanas else tuple(modules), "edanas" if edanas else "aebnas"))
    return ArchConfig(stages, tuple(exits), resolution=rng.choice(RESOLUTIONS), width_mult=WIDTH)


def arch_set(space: SpaceValues, n_random: int, seed: int) -> list[ArchConfig]:
    """Smallest, largest, a random one with no exits, then ``n_random`` random ones."""
    rng = random.Random(seed)
    return ([smallest_arch(space, width_mult=WIDTH, resolution=32),
             largest_arch(space, width_mult=WIDTH, resolution=40),
             random_arch(space, rng).replace(exits=())]
            + [random_arch(space, rng) for _ in range(n_random)])


PAPER_ARCHS = arch_set(PAPER_SPACE, 20, seed=0)
ODD_ARCHS = arch_set(ODD_SPACE, 6, seed=1)


def randomize(net: nn.Module, seed: int) -> None:
    """Non-trivial affine BN parameters, biases and classifiers (conv weights keep their init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.normal_(0.0, 0.1, generator=g)
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, 0.1, generator=g)


def make_supernet(space: SpaceValues, seed: int = 0) -> ElasticEarlyExitNet:
    torch.manual_seed(seed)
    supernet = ElasticEarlyExitNet(space, WIDTH, num_classes=10)
    randomize(supernet, seed)
    return supernet


def calibrated(space: SpaceValues, archs: list[ArchConfig]) -> ElasticEarlyExitNet:
    """A supernet whose BN running statistics come from training-mode passes of several subnets; eval mode."""
    supernet = make_supernet(space).train()
    with torch.no_grad():
        for arch in archs[:6]:
            for _ in range(2):
                supernet(torch.randn(4, 3, arch.resolution, arch.resolution), arch)
    bn = supernet.stages[2][0].depthwise.bn.bn
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    return supernet.eval()


@pytest.fixture(scope="module")
def paper_supernet() -> ElasticEarlyExitNet:
    return calibrated(PAPER_SPACE, [PAPER_ARCHS[1], *PAPER_ARCHS[3:]])


@pytest.fixture(scope="module")
def odd_supernet() -> ElasticEarlyExitNet:
    return calibrated(ODD_SPACE, [ODD_ARCHS[1], *ODD_ARCHS[3:]])


def assert_same_outputs(supernet: ElasticEarlyExitNet, arch: ArchConfig, seed: int = 0) -> None:
    x = torch.randn(3, 3, arch.resolution, arch.resolution, generator=torch.Generator().manual_seed(seed))
    plain = extract(supernet, arch).eval()
    with torch.no_grad():
        expected, got = supernet(x, arch), plain(x)
    assert len(got) == len(expected) == arch.num_exits + 1
    for e, g in zip(expected, got):
        assert e.shape == g.shape == (3, 10)
        assert e.abs().max() > 1e-2  # logits that are not all zero: the comparison means something
        assert (e - g).abs().max().item() <= 1e-5


def test_the_architectures_cover_the_cases():
    """The random architectures include disabled exits, EDANAS exits, one- and two-module branches of every
    resize, pool on and off."""
    exits = [e for a in PAPER_ARCHS for e in a.exits]
    modules = [m for e in exits for m in e.modules]
    assert len(PAPER_ARCHS) >= 20
    assert any(a.num_exits == 0 for a in PAPER_ARCHS)
    assert any(0 < a.num_exits < len(PAPER_SPACE.exit_positions) for a in PAPER_ARCHS)
    assert {e.depth for e in exits if e.branch == "aebnas"} == {1, 2}
    assert any(e.branch == "edanas" for e in exits)
    assert {m.resize for m in modules} == {8, 10}
    assert {m.pool for m in modules} == {0, 1}
    assert {m.expansion for m in modules} == set(PAPER_SPACE.exit_expansions)
    blocks = [b for a in PAPER_ARCHS for s in a.stages for b in s.blocks]
    assert {b.kernel for b in blocks} == set(PAPER_SPACE.kernels)
    assert {b.expansion for b in blocks} == set(PAPER_SPACE.expansions)
    assert {s.depth for a in PAPER_ARCHS for s in a.stages} == set(PAPER_SPACE.depths)
    assert {a.resolution for a in PAPER_ARCHS} == set(RESOLUTIONS)


@pytest.mark.parametrize("index", range(len(PAPER_ARCHS)))
def test_extracted_network_computes_what_the_supernet_computes(paper_supernet, index):
    assert_same_outputs(paper_supernet, PAPER_ARCHS[index], seed=index)


@pytest.mark.parametrize("index", range(len(ODD_ARCHS)))
def test_expansion_one_and_wide_second_modules_are_sliced_alike(odd_supernet, index):
    assert_same_outputs(odd_supernet, ODD_ARCHS[index], seed=index)


@pytest.mark.parametrize("index", [0, 1, 3, 4])
def test_extracted_network_has_the_shapes_of_a_fresh_one(paper_supernet, index):
    arch = PAPER_ARCHS[index]
    plain, fresh = extract(paper_supernet, arch), EarlyExitNet(arch)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in fresh.parameters())
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}


def test_extracted_weights_are_the_slices(paper_supernet):
    """Kernel centre and first channels, by hand, for one block and one exit; SE squeeze width."""
    arch = PAPER_ARCHS[0]  # smallest: kernel 3, expansion 3; stage 2 has SE
    plain = extract(paper_supernet, arch)
    block = paper_supernet.stages[1][0]
    in_ch = arch.block_rows()[1 + arch.stages[0].depth].in_channels
    mid = make_divisible(in_ch * 3)
    dw = plain.stages[1][0].block[1][0].weight
    assert torch.equal(dw, block.depthwise.conv.conv.weight[:mid, :, 2:5, 2:5])
    se = plain.stages[1][0].block[2]
    assert se.reduce.out_channels == make_divisible(mid / 4) < block.se.reduce.conv.out_channels
    assert torch.equal(se.reduce.weight, block.se.reduce.conv.weight[:make_divisible(mid / 4), :mid])
    bn = plain.stages[1][0].block[1][1]
    assert torch.equal(bn.running_var, block.depthwise.bn.bn.running_var[:mid])
    assert bn.num_batches_tracked == block.depthwise.bn.bn.num_batches_tracked  # counted with momentum None only
    # exit 1, one module (8 px, kernel 3, expansion 1): the centre 3×3 of the [C·2, C, 5, 5] convolution's
    # first C outputs, and the one-module classifier's first C inputs
    branch, plain_branch = paper_supernet.branches[0], plain.branches[0]
    module, c = arch.exits[0].modules[0], arch.stage_channels[0]
    assert (module.kernel, module.expansion) == (3, 1)
    full = branch.features[0].conv.conv.conv.weight
    assert tuple(full.shape) == (2 * c, c, 5, 5)
    assert torch.equal(plain_branch.features[0][1][0].weight, full[:c, :, 1:4, 1:4])
    assert torch.equal(plain_branch.features[0][1][1].running_mean,
                       branch.features[0].conv.bn.bn.running_mean[:c])
    assert torch.equal(plain_branch.classifier.weight, branch.classifiers[0].linear.weight[:, :c])


def test_covers_refuses_what_is_outside_with_a_reason(paper_supernet, odd_supernet):
    largest = largest_arch(PAPER_SPACE, width_mult=WIDTH)
    assert covers(paper_supernet, largest) is None
    stages = list(largest.stages)
    stages[1] = StageConfig((BlockConfig(9, 6),) + stages[1].blocks[1:])
    too_big = largest.replace(stages=tuple(stages))
    reason = "kernel 9 of stage 2 block 0 is larger than the supernet's 7"
    assert covers(paper_supernet, too_big) == reason
    with pytest.raises(ValueError, match=reason):
        paper_supernet(torch.randn(1, 3, 32, 32), too_big)
    with pytest.raises(ValueError, match=reason):
        extract(paper_supernet, too_big)
    assert covers(paper_supernet, uniform_arch(5, 3, 3, width_mult=WIDTH)) == \
        "depth 5 of stage 1 is larger than the supernet's 4"
    assert covers(paper_supernet, uniform_arch(4, 3, 3, width_mult=0.5)) == \
        "width_mult=0.5 differs from the supernet's 0.25"
    assert covers(paper_supernet, largest.replace(num_classes=100)) == \
        "num_classes=100 differs from the supernet's 10"
    assert "exit position 1 is not one of the supernet's (2, 3)" == \
        covers(odd_supernet, uniform_arch(2, 3, 3, exits=(1,), width_mult=WIDTH))
    wide = ExitModuleConfig(resize=16, kernel=3, expansion=1, pool=0)
    assert covers(paper_supernet, uniform_arch(2, 3, 3, exits=(2,), exit_module=wide, width_mult=WIDTH)) == \
        "resize 16 of exit 2 module 1 is larger than the supernet's 10"
    odd = ExitModuleConfig(resize=9, kernel=3, expansion=1, pool=0)
    assert covers(paper_supernet, uniform_arch(2, 3, 3, exits=(2,), exit_module=odd, width_mult=WIDTH)) == \
        "resize 9 of exit 2 module 1 is not one of the supernet's (8, 10)"
    assert covers(paper_supernet, uniform_arch(2, 3, 3, exits=(2, 3), exit_branch="edanas", width_mult=WIDTH)) is None


def test_fixed_exits_and_static_spaces_are_served_by_the_aebnas_supernet(paper_supernet):
    rng = np.random.RandomState(0)
    served = {}
    for name, space in (("aebnas", aebnas_space()), ("fixed_exits", fixed_exits_space()),
                        ("static", static_space())):
        for _ in range(10):
            flat = {k: (v.sample(random_state=rng) if isinstance(v, Domain) else v) for k, v in space.items()}
            arch = ArchConfig.from_flat({**flat, "width_mult": WIDTH, "resolution": 32}, allowed=PAPER_SPACE)
            assert covers(paper_supernet, arch) is None, (name, arch)
            served.setdefault(name, arch)
    assert served["static"].num_exits == 0 and served["fixed_exits"].num_exits >= 1
    for arch in served.values():
        assert_same_outputs(paper_supernet, arch)


def _loss(supernet: ElasticEarlyExitNet, arch: ArchConfig, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return sum(nn.functional.cross_entropy(out, y) for out in supernet(x, arch))


def test_subnets_train_the_shared_weights():
    """Gradients reach exactly the slices a subnet uses; one SGD step on two subnets moves shared weights."""
    supernet = make_supernet(PAPER_SPACE).train()
    small, large = PAPER_ARCHS[0], PAPER_ARCHS[1]
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    dw = supernet.stages[0][0].depthwise.conv.conv.weight  # (48, 1, 7, 7) at width 0.25
    mid = make_divisible(8 * 3)  # the smallest subnet's middle width in stage 1 block 0

    _loss(supernet, small, x, y).backward()
    grad_small = dw.grad.clone()
    used = torch.zeros_like(dw, dtype=torch.bool)
    used[:mid, :, 2:5, 2:5] = True
    assert grad_small[used].abs().sum() > 0 and not grad_small[~used].any()
    assert supernet.branches[1].classifiers[0].linear.weight.grad is None  # the smallest has only exit 1
    assert supernet.stages[0][3].depthwise.conv.conv.weight.grad is None  # nor a fourth block
    supernet.zero_grad()
    _loss(supernet, large, x, y).backward()
    grad_large = dw.grad.clone()
    assert grad_large[~used].abs().sum() > 0

    supernet.zero_grad()
    before = extract(supernet, small).state_dict()
    shared_before = dw.detach().clone()
    (_loss(supernet, small, x, y) + _loss(supernet, large, x, y)).backward()
    torch.testing.assert_close(dw.grad, grad_small + grad_large)
    with torch.no_grad():  # one plain SGD step (torch.optim.SGD's first use costs seconds of imports)
        for p in supernet.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert not torch.equal(dw[used], shared_before[used])
    after = extract(supernet, small).state_dict()
    assert not torch.equal(after["stem.1.block.0.0.weight"], before["stem.1.block.0.0.weight"])
    assert not torch.equal(after["stages.0.0.block.1.0.weight"], before["stages.0.0.block.1.0.weight"])


def test_training_mode_updates_only_the_subnets_statistics_as_the_plain_network_does():
    supernet = make_supernet(PAPER_SPACE).train()
    arch = PAPER_ARCHS[0]
    plain = extract(supernet, arch)
    bn = supernet.stages[0][0].expand.bn.bn  # 48 channels; the smallest subnet uses 24
    mean_before = bn.running_mean.clone()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, got = supernet(x, arch), plain(x)
    for e, g in zip(expected, got):
        assert (e - g).abs().max().item() <= 1e-5
    assert not torch.equal(bn.running_mean[:24], mean_before[:24])
    assert torch.equal(bn.running_mean[24:], mean_before[24:])
    again = extract(supernet, arch).state_dict()
    for key, value in plain.state_dict().items():
        if key.endswith("num_batches_tracked"):  # an elastic BatchNorm counts batches only with momentum None
            continue
        torch.testing.assert_close(again[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_fixed_stem_and_head_are_built_from_the_rows_of_every_subnet():
    supernet = ElasticEarlyExitNet(PAPER_SPACE, 0.75, 10)
    net = EarlyExitNet(random_arch(PAPER_SPACE, random.Random(0)).replace(width_mult=0.75))
    for mine, theirs in ((supernet.stem, net.stem), (supernet.head, net.head)):
        assert [(k, v.shape) for k, v in mine.state_dict().items()] == \
            [(k, v.shape) for k, v in theirs.state_dict().items()]
    # registration order (stem, head, stages, branches) is the order the initialisation draws in
    assert [name for name, _ in supernet.named_children()] == ["stem", "head", "stages", "branches"]


def test_exit_branches_share_weights_across_kernels_expansions_and_depths(paper_supernet):
    """Module 2 after a module of expansion 1 reads C channels: the first C inputs of its [4C, 2C, 5, 5]
    convolution; each depth has its own classifier; an EDANAS exit is the position's one plain exit."""
    c = paper_supernet.branches[2].features[0].conv.conv.conv.in_channels
    m1, m2 = ExitModuleConfig(10, 5, 1, 0), ExitModuleConfig(8, 3, 2, 1)
    arch = uniform_arch(2, 3, 3, exits=(3,), exit_module=m1, second_module=m2, width_mult=WIDTH)
    plain, branch = extract(paper_supernet, arch).branches[2], paper_supernet.branches[2]
    full = branch.features[1].conv.conv.conv.weight
    assert tuple(full.shape) == (4 * c, 2 * c, 5, 5)
    assert torch.equal(plain.features[0][1][0].weight, branch.features[0].conv.conv.conv.weight[:c])
    assert torch.equal(plain.features[1][1][0].weight, full[:2 * c, :c, 1:4, 1:4])
    assert torch.equal(plain.classifier.weight, branch.classifiers[1].linear.weight[:, :2 * c])
    edanas = uniform_arch(2, 3, 3, exits=(3,), exit_branch="edanas", width_mult=WIDTH)
    plain = extract(paper_supernet, edanas).branches[2]
    assert plain.state_dict().keys() == branch.edanas.state_dict().keys()
    assert all(torch.equal(v, branch.edanas.state_dict()[k]) for k, v in plain.state_dict().items())
    assert_same_outputs(paper_supernet, edanas)
