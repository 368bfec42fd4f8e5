"""search_spaces: every sample of every space builds; keyword arguments change the value sets."""

import random

import pytest
import torch
from ray.tune.search.sample import Domain

from aebnas.config import PAPER_SPACE, ArchConfig, ExitModuleConfig
from aebnas.cost.macs import exit_costs
from aebnas.nn import EarlyExitNet
from search_spaces import SPACES, aebnas_space, fixed_exits_space, static_space


def sample(space: dict, seed: int) -> dict:
    random.seed(seed)
    import numpy as np

    np.random.seed(seed)
    return {k: (v.sample() if isinstance(v, Domain) else v) for k, v in space.items()}


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_sample_builds_and_runs(name):
    space = SPACES[name]()
    seen_exit_counts = set()
    for seed in range(40):
        flat = sample(space, seed)
        arch = ArchConfig.from_flat({**flat, "width_mult": 0.25}, allowed=PAPER_SPACE)
        seen_exit_counts.add(arch.num_exits)
        net = EarlyExitNet(arch).eval()
        with torch.no_grad():
            outs = net(torch.randn(1, 3, arch.resolution, arch.resolution))
        assert len(outs) == arch.num_exits + 1
        costs = exit_costs(arch).cumulative()
        assert (costs > 0).all()
        if name == "static":
            assert arch.num_exits == 0
        else:
            assert arch.num_exits >= 1  # min_exits=1 repairs samples with every exit off
    if name != "static":
        assert len(seen_exit_counts) >= 3  # exits really vary between samples


def test_aebnas_space_searches_branch_depth_and_layers():
    space = aebnas_space()
    depths, kernels = set(), set()
    for seed in range(60):
        arch = ArchConfig.from_flat(sample(space, seed))
        for e in arch.exits:
            depths.add(e.depth)
            kernels.update(m.kernel for m in e.modules)
    assert depths == {1, 2} and kernels == {3, 5}


def test_fixed_exits_space_has_one_branch_architecture():
    for seed in range(30):
        arch = ArchConfig.from_flat(sample(fixed_exits_space(), seed))
        assert arch.num_exits >= 1
        assert all(e.branch == "edanas" and e.modules == () for e in arch.exits)


def test_fixed_exits_can_fix_one_module_of_the_paper_s_instead():
    module = ExitModuleConfig(resize=10, kernel=5, expansion=2, pool=1)
    for seed in range(10):
        arch = ArchConfig.from_flat(sample(fixed_exits_space(branch=module), seed))
        assert all(e.branch == "aebnas" and e.modules == (module,) for e in arch.exits)
    with pytest.raises(TypeError, match="ExitModuleConfig or None"):
        fixed_exits_space(branch=(8, 3, 1, 0))


def test_the_aebnas_space_searches_every_module_value_of_the_paper():
    space = aebnas_space()
    assert space["exit2_branch"] == "aebnas"
    assert space["exit2_m1_resize"].categories == [8, 10] and space["exit2_m2_resize"].categories == [0, 8, 10]
    assert space["exit2_m1_kernel"].categories == [3, 5] and space["exit2_m2_expansion"].categories == [1, 2]
    assert space["exit2_m2_pool"].categories == [0, 1]


def test_no_exit_enabled_is_repaired_not_crashed():
    flat = sample(aebnas_space(), 0)
    flat.update({f"exit{i}_enabled": False for i in (1, 2, 3, 4)})
    arch = ArchConfig.from_flat(flat)
    assert arch.exit_positions == (4,)  # the deepest position, as documented


def test_keyword_arguments_change_value_sets():
    space = aebnas_space(resolutions=(40,), exit_positions=(2, 3), exit_m2_resizes=(0,), depths=(3,))
    assert space["resolution"] == 40 and space["stage1_depth"] == 3
    assert "exit1_enabled" not in space and "exit4_m1_resize" not in space
    for seed in range(20):
        arch = ArchConfig.from_flat(sample(space, seed))
        assert set(arch.exit_positions) <= {2, 3} and all(e.depth == 1 for e in arch.exits)
    assert static_space(resolutions=(48,))["resolution"] == 48


@pytest.mark.parametrize("kwargs, message", [
    ({"kernels": (3, 4)}, "kernels contains 4"),
    ({"resolutions": (200,)}, "resolutions contains 200"),
    ({"colour": (1,)}, "unknown search-space keyword(s) ['colour']"),
    ({"min_exits": 5}, "min_exits=5"),
])
def test_bad_space_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError) as err:
        aebnas_space(**kwargs)
    assert message in str(err.value)
