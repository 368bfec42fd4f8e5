"""Tests for aebnas/cost/macs.py: MACs against hand counts, C_i bookkeeping, caching."""

import numpy as np
import pytest

from aebnas.config import ExitModuleConfig, largest_arch, smallest_arch, uniform_arch
from aebnas.cost.macs import ExitCosts, _segment_macs, exit_costs, param_count, segment_macs
from aebnas.reference import analytic_segment_macs, block_macs

# --------------------------------------------------------------------------- hand counting
# The per-layer formulas (what ptflops' aten backend counts) are aebnas.reference's; width
# 1.0 throughout: stem 16, first block 16, stages 24/40/80/112/160 with strides 2/2/2/1/2, SE
# in stages 2, 4, 5, head 960 → 1280.


def _arch(depth, k, e, exits, resolution, **kwargs):
    mods = next(iter(exits.values())) if exits else [(8, 3, 1, 0)]
    assert all(v == mods for v in exits.values())  # uniform_arch: one branch architecture
    return uniform_arch(depth, k, e, exits=tuple(exits), resolution=resolution,
                        exit_module=ExitModuleConfig(*mods[0]),
                        second_module=ExitModuleConfig(*mods[1]) if len(mods) > 1 else None, **kwargs)


def test_stem_exit_and_head_by_hand():
    """Resolution 32, width 1.0, depth 2, kernel 3, expansion 3; one two-module exit after stage 2."""
    arch = _arch(2, 3, 3, {2: [(8, 3, 2, 1), (10, 5, 1, 0)]}, resolution=32)
    seg = segment_macs(arch)
    # stem: 3×3 conv 3→16 stride 2 (32→16); first block: 3×3 depthwise 16, 1×1 16→16.
    stem = 16 * 16 * 16 * 3 * 3 * 3 + 16 * 16 * 16 * 1 * 3 * 3 + 16 * 16 * 16 * 16
    assert stem == 212_992
    # exit after stage 2 (40 channels; the map's own size does not matter, each module resizes it):
    #   module 1: resize to 8 px, 3×3 conv 40→80 stride 2 unpadded → 3×3, max pool → 1×1
    #   module 2: resize to 10 px, 5×5 conv 80→80 stride 2 unpadded → 3×3; GAP; linear 80→10 (+10 bias)
    branch = 3 * 3 * 80 * 40 * 9 + 3 * 3 * 80 * 80 * 25 + 80 * 10 + 10
    assert branch == 1_700_010
    # head at 1×1 (32/2/2/2/2/1/2): 1×1 160→960, pool, 1×1 960→1280 (no bias), linear 1280→10.
    head = 960 * 160 + 1280 * 960 + 1280 * 10 + 10
    assert seg["stem"] == pytest.approx(stem / 1e6, rel=1e-12)
    assert seg["exit2"] == pytest.approx(branch / 1e6, rel=1e-12)
    assert seg["head"] == pytest.approx(head / 1e6, rel=1e-12)
    # stage 1 (16→24, 16×16 → 8×8, no SE): block 0 and block 1.
    stage1 = (16 * 16 * 48 * 16 + 8 * 8 * 48 * 9 + 8 * 8 * 24 * 48) + (8 * 8 * 72 * 24 + 8 * 8 * 72 * 9 + 8 * 8 * 24 * 72)
    assert seg["stage1"] == pytest.approx(stage1 / 1e6, rel=1e-12)
    # stage 2 block 0 has SE on its 72 expanded channels: 72/4 = 18 rounds to 16, which loses
    # more than 10%, so 24; each SE conv is biased and runs on the pooled 1×1 map.
    se = (24 * 72 + 24) + (72 * 24 + 72)
    stage2_block0 = 8 * 8 * 72 * 24 + 4 * 4 * 72 * 9 + se + 4 * 4 * 40 * 72
    assert block_macs(24, 40, 3, 3, 2, True, 8) == (stage2_block0, 4)


@pytest.mark.parametrize("depth, k, e, exits, resolution, kwargs", [
    (2, 3, 3, {2: [(8, 3, 2, 1), (10, 5, 1, 0)]}, 32, {}),
    (3, 5, 4, {1: [(10, 5, 2, 0), (8, 3, 2, 1)], 3: [(10, 5, 2, 0), (8, 3, 2, 1)],
               4: [(10, 5, 2, 0), (8, 3, 2, 1)]}, 40, {"num_classes": 100}),
    (4, 7, 6, {1: [(8, 3, 1, 1)], 2: [(8, 3, 1, 1)], 3: [(8, 3, 1, 1)], 4: [(8, 3, 1, 1)]}, 57,
     {"in_channels": 1}),
    (2, 3, 3, {}, 28, {}),
])
def test_whole_network_by_hand(depth, k, e, exits, resolution, kwargs):
    arch = _arch(depth, k, e, exits, resolution, **kwargs)
    hand = analytic_segment_macs(arch)
    seg = segment_macs(arch)
    assert seg.keys() == hand.keys()
    for name in hand:
        assert seg[name] == pytest.approx(hand[name], rel=1e-9), name
    costs = exit_costs(arch)
    backbone_total = sum(hand[n] for n in ("stem", "stage1", "stage2", "stage3", "stage4", "stage5"))
    assert costs.static_cost == pytest.approx(backbone_total + hand["head"], rel=1e-9)


def test_first_exit_cost_by_hand():
    """C_1 = stem + stage 1 + branch 1; final = everything (all exits active)."""
    exits = {1: [(8, 3, 1, 1)], 3: [(8, 3, 1, 1)]}
    arch = _arch(2, 3, 3, exits, 32)
    hand = analytic_segment_macs(arch)
    c = exit_costs(arch).cumulative()
    assert c[0] == pytest.approx(hand["stem"] + hand["stage1"] + hand["exit1"], rel=1e-9)
    assert c[1] == pytest.approx(hand["stem"] + hand["stage1"] + hand["stage2"] + hand["stage3"]
                                 + hand["exit1"] + hand["exit3"], rel=1e-9)
    assert c[2] == pytest.approx(sum(hand.values()), rel=1e-9)


# --------------------------------------------------------------------------- C_i bookkeeping
def test_cumulative_on_hand_made_pieces():
    costs = ExitCosts(backbone=[1.0, 2.0, 3.0, 10.0], branch=[0.1, 0.2, 0.4])
    np.testing.assert_allclose(costs.cumulative(), [1.1, 2.3, 3.7, 10.7])
    c = costs.cumulative([True, False, True])
    # exit 1 is off: nobody leaves there and nobody pays for it.
    np.testing.assert_allclose(c[[0, 2, 3]], [1.1, 3.5, 10.5])
    np.testing.assert_allclose(costs.cumulative([False, False, False])[3], 10.0)
    # A batch of active masks gives one row of C_i per mask.
    batch = costs.cumulative(np.array([[True, True, True], [True, False, True]]))
    assert batch.shape == (2, 4)
    np.testing.assert_allclose(batch[0], [1.1, 2.3, 3.7, 10.7])
    np.testing.assert_allclose(batch[1][[0, 2, 3]], [1.1, 3.5, 10.5])
    assert costs.static_cost == 10.0 and costs.num_exits == 3


def test_exit_costs_shape_is_checked():
    with pytest.raises(ValueError, match="one more entry"):
        ExitCosts(backbone=[1.0, 2.0], branch=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"3 exits, got shape \(2,\)"):
        ExitCosts(backbone=[1.0, 2.0, 3.0, 4.0], branch=[0.1, 0.2, 0.3]).cumulative([True, False])


def test_a_disabled_exit_costs_nothing():
    m = ExitModuleConfig(10, 5, 2, 0)
    full = uniform_arch(2, 3, 4, exits=(1, 2, 3, 4), exit_module=m, width_mult=0.5)
    without = uniform_arch(2, 3, 4, exits=(1, 3, 4), exit_module=m, width_mult=0.5)
    c_off = exit_costs(full).cumulative([True, False, True, True])
    c_without = exit_costs(without).cumulative()
    np.testing.assert_allclose(c_off[[0, 2, 3, 4]], c_without, rtol=1e-12)
    assert exit_costs(full).cumulative()[-1] > c_off[-1]  # the branch does cost when active
    np.testing.assert_allclose(exit_costs(full).cumulative([False] * 4)[-1], exit_costs(full).static_cost)


@pytest.mark.parametrize("arch", [
    smallest_arch(), largest_arch(),
    uniform_arch(3, 5, 6, exits=(1, 2, 3, 4), resolution=48, width_mult=0.5),
    uniform_arch(2, 7, 3, exits=(2, 4), resolution=72, exit_module=ExitModuleConfig(8, 3, 1, 1)),
], ids=["smallest", "largest", "all-four", "two"])
def test_cumulative_costs_strictly_increase(arch):
    c = exit_costs(arch).cumulative()
    assert len(c) == arch.num_exits + 1
    assert np.all(np.diff(c) > 0)


@pytest.mark.parametrize("arch", [smallest_arch(), largest_arch(),
                                  uniform_arch(3, 5, 4, exits=(2, 3), resolution=44)],
                         ids=["smallest", "largest", "mid"])
def test_static_macs_is_the_backbone_without_exits(arch):
    static = arch.replace(exits=())
    seg = segment_macs(static)
    assert set(seg) == {"stem", "stage1", "stage2", "stage3", "stage4", "stage5", "head"}
    assert exit_costs(arch).static_cost == pytest.approx(sum(seg.values()), rel=1e-12)
    assert exit_costs(static).static_cost == pytest.approx(exit_costs(arch).static_cost, rel=1e-12)
    assert exit_costs(static).cumulative().shape == (1,)


def test_expected_is_the_utilization_weighted_sum():
    arch = uniform_arch(2, 3, 3, exits=(1, 2, 4), width_mult=0.5)
    costs = exit_costs(arch)
    rng = np.random.default_rng(0)
    for active in ([True, True, True], [True, False, True], [False, False, False]):
        c = costs.cumulative(active)
        for _ in range(5):
            u = rng.dirichlet(np.ones(4))
            u[:3] *= np.asarray(active)  # nobody leaves at an inactive exit
            u /= u.sum()
            by_hand = sum(u[i] * c[i] for i in range(4))
            assert costs.expected(u, active) == pytest.approx(by_hand, rel=1e-12)
    assert costs.expected([0, 0, 0, 1]) == pytest.approx(costs.cumulative()[-1])
    assert costs.expected([0, 0, 0, 1], [False] * 3) == pytest.approx(costs.static_cost)


def test_segment_macs_is_cached():
    kwargs = dict(exits=(1, 3), resolution=36, width_mult=0.75)
    first = segment_macs(uniform_arch(3, 5, 3, **kwargs))
    hits = _segment_macs.cache_info().hits
    again = segment_macs(uniform_arch(3, 5, 3, **kwargs))  # an equal architecture hits the cache
    assert again == first and _segment_macs.cache_info().hits == hits + 1
    again["stem"] = -1.0  # callers get a copy: the cache stays intact
    assert segment_macs(uniform_arch(3, 5, 3, **kwargs))["stem"] == first["stem"]


def test_param_count_grows_by_the_branch_parameters():
    """Adding one exit adds exactly its branch's parameters (counted by hand)."""
    base = uniform_arch(2, 3, 3, exits=(), resolution=32)
    one = uniform_arch(2, 3, 3, exits=(2,), exit_module=ExitModuleConfig(8, 3, 2, 1), resolution=32)
    # 3×3 conv 40→80 (no bias) + BN(80), linear 80→10 with bias.
    branch = 80 * 40 * 9 + 2 * 80 + 80 * 10 + 10
    assert param_count(one) - param_count(base) == branch


def test_one_rule_assembles_c_i_from_segments_in_any_unit():
    """costs_from_segments: backbone up to each exit (stem + stages), the head on the final."""
    from aebnas.cost.macs import costs_from_segments

    arch = uniform_arch(2, 3, 3, exits=(2, 4))
    costs = costs_from_segments(arch, 1.0, [2.0, 3.0, 4.0, 5.0, 6.0], [0.5, 0.25], 10.0, "ms")
    np.testing.assert_array_equal(costs.backbone, [6.0, 15.0, 31.0])
    np.testing.assert_array_equal(costs.branch, [0.5, 0.25])
    assert costs.unit == "ms" and costs.static_cost == 31.0
    assert exit_costs(arch).unit == "MMACs"
    with pytest.raises(ValueError, match="unit='s'"):
        ExitCosts(backbone=[1.0], branch=[], unit="s")


def test_piece_costs_say_their_unit_and_read_old_searcher_checkpoints():
    import pickle

    from aebnas.cost.macs import PieceCosts

    arch = smallest_arch()
    ms = PieceCosts(measure=lambda key, build, shape: 1.0, unit="ms").exit_costs(arch)
    assert ms.unit == "ms" and ms.static_cost == 1.0 + 5 * 2 + 1.0  # stem, 5 stages of 2 blocks, head
    pieces = PieceCosts()
    pieces.exit_costs(arch)
    state = dict(pieces.__dict__)
    state["_macs"] = state.pop("_costs")  # as pickled before the fields said their unit
    del state["unit"]
    old = PieceCosts.__new__(PieceCosts)
    old.__setstate__(state)
    restored = pickle.loads(pickle.dumps(old))
    assert restored.unit == "MMACs" and restored.misses == pieces.misses
    np.testing.assert_array_equal(restored.exit_costs(arch).backbone, pieces.exit_costs(arch).backbone)
    assert restored.misses == pieces.misses  # every piece came from the restored cache


# --------------------------------------------------------------------------- exit branches at the defaults
@pytest.mark.parametrize("exit_cfg, position, by_hand", [
    # the paper's cheapest branch: exit 1 (24 channels), 8 px, k3, ×1 → 3×3 map; linear 24→10
    ((ExitModuleConfig(8, 3, 1, 1),), 1, 3 * 3 * 24 * 24 * 9 + 24 * 10 + 10),
    # its costliest: exit 4 (112 channels), two 10 px k5 ×2 modules → 3×3 maps; linear 448→10
    ((ExitModuleConfig(10, 5, 2, 0),) * 2, 4, 3 * 3 * 224 * 112 * 25 + 3 * 3 * 448 * 224 * 25 + 448 * 10 + 10),
    # EDANAS at 32 px: exit 1 on 8×8 (1×1 24→144, pool, 1×1 144→192, linear 192→10), exit 4 on 2×2
    ("edanas", 1, 8 * 8 * 144 * 24 + 192 * 144 + 192 * 10 + 10),
    ("edanas", 4, 2 * 2 * 672 * 112 + 896 * 672 + 896 * 10 + 10),
], ids=["cheapest", "costliest", "edanas-1", "edanas-4"])
def test_exit_branch_macs_at_width_one_by_hand(exit_cfg, position, by_hand):
    """The issue's range at the paper's defaults: about 0.05 to 28 MMACs a branch; EDANAS's 0.25 to 0.9."""
    if exit_cfg == "edanas":
        arch = uniform_arch(2, 3, 3, exits=(position,), exit_branch="edanas", resolution=32)
    else:
        arch = uniform_arch(2, 3, 3, exits=(position,), exit_module=exit_cfg[0],
                            second_module=exit_cfg[1] if len(exit_cfg) > 1 else None, resolution=32)
    assert segment_macs(arch)[f"exit{position}"] == pytest.approx(by_hand / 1e6, rel=1e-12)
    assert analytic_segment_macs(arch)[f"exit{position}"] == pytest.approx(by_hand / 1e6, rel=1e-12)


def test_a_paper_branch_costs_the_same_at_every_resolution():
    """The resize fixes a module's input size: its MACs do not follow the input resolution."""
    m = ExitModuleConfig(10, 3, 2, 1)
    costs = {r: segment_macs(uniform_arch(2, 3, 3, exits=(1, 3), exit_module=m, second_module=m, resolution=r))
             for r in (32, 48, 72)}
    assert costs[32]["exit1"] == costs[48]["exit1"] == costs[72]["exit1"]
    assert costs[32]["exit3"] == costs[72]["exit3"] and costs[32]["stage1"] < costs[72]["stage1"]
