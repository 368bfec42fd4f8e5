"""Tests for aebnas/config.py: the flat trial dict ⇄ ArchConfig, and its error messages."""

import math
import random

import pytest

import aebnas.config as config
from aebnas.config import (
    EXIT_POSITIONS,
    NUM_STAGES,
    PAPER_SPACE,
    ArchConfig,
    BlockConfig,
    ExitConfig,
    ExitModuleConfig,
    SpaceValues,
    StageConfig,
    largest_arch,
    smallest_arch,
    uniform_arch,
)

MODULE_FIELDS = ("resize", "kernel", "expansion", "pool")


def _flat(depth=2, kernel=3, expansion=3, exits=(2,), resolution=32, **extra):
    """A complete, valid flat dict (paper space) built key by key, not through to_flat."""
    flat = {"resolution": resolution}
    for s in range(1, NUM_STAGES + 1):
        flat[f"stage{s}_depth"] = depth
        for b in range(depth):
            flat[f"stage{s}_block{b}_kernel"] = kernel
            flat[f"stage{s}_block{b}_expansion"] = expansion
    for i in EXIT_POSITIONS:
        flat[f"exit{i}_enabled"] = i in exits
        flat.update({f"exit{i}_m1_resize": 8, f"exit{i}_m1_kernel": 3,
                     f"exit{i}_m1_expansion": 1, f"exit{i}_m1_pool": 0,
                     f"exit{i}_m2_resize": 0, f"exit{i}_m2_kernel": 3,
                     f"exit{i}_m2_expansion": 1, f"exit{i}_m2_pool": 0})
    flat.update(extra)
    return flat


def _error(flat, allowed=None):
    with pytest.raises(ValueError) as info:
        ArchConfig.from_flat(flat, allowed=allowed)
    return str(info.value)


def _random_sample(rng: random.Random, space: SpaceValues = PAPER_SPACE):
    """What Ray Tune hands a trial: every key of the space sampled, whatever the depth."""
    max_depth = max(space.depths)
    flat = {"resolution": rng.choice(space.resolutions), "width_mult": rng.choice((0.25, 0.5, 1.0)),
            "num_classes": rng.choice((10, 100)), "in_channels": rng.choice((1, 3)), "min_exits": 1}
    for s in range(1, NUM_STAGES + 1):
        flat[f"stage{s}_depth"] = rng.choice(space.depths)
        for b in range(max_depth):
            flat[f"stage{s}_block{b}_kernel"] = rng.choice(space.kernels)
            flat[f"stage{s}_block{b}_expansion"] = rng.choice(space.expansions)
    for i in space.exit_positions:
        flat[f"exit{i}_enabled"] = rng.random() < 0.5
        for m, channels in ((1, space.exit_m1_resizes), (2, space.exit_m2_resizes)):
            flat[f"exit{i}_m{m}_resize"] = rng.choice(channels)
            flat[f"exit{i}_m{m}_kernel"] = rng.choice(space.exit_kernels)
            flat[f"exit{i}_m{m}_expansion"] = rng.choice(space.exit_expansions)
            flat[f"exit{i}_m{m}_pool"] = rng.choice(space.exit_pools)
    return flat


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("make", [smallest_arch, largest_arch])
@pytest.mark.parametrize("allowed", [None, PAPER_SPACE])
def test_round_trip_smallest_and_largest(make, allowed):
    arch = make()
    assert ArchConfig.from_flat(arch.to_flat(), allowed=allowed) == arch


def test_smallest_and_largest_are_the_extremes_of_the_paper_space():
    small, large = smallest_arch(), largest_arch()
    assert small.resolution == 32 and large.resolution == 72
    assert {b for s in small.stages for b in s.blocks} == {BlockConfig(3, 3)}
    assert [s.depth for s in small.stages] == [2] * NUM_STAGES
    assert small.exits == (ExitConfig(1, (ExitModuleConfig(8, 3, 1, 1),)),)
    assert {b for s in large.stages for b in s.blocks} == {BlockConfig(7, 6)}
    assert [s.depth for s in large.stages] == [4] * NUM_STAGES
    assert large.exit_positions == (1, 2, 3, 4)
    assert all(e.modules == (ExitModuleConfig(10, 5, 2, 0), ExitModuleConfig(10, 5, 2, 0))
               for e in large.exits)


def test_random_samples_parse_to_what_was_sampled_and_round_trip():
    rng = random.Random(1234)
    seen_depths, seen_exit_counts = set(), set()
    for _ in range(200):
        flat = _random_sample(rng)
        arch = ArchConfig.from_flat(flat, allowed=PAPER_SPACE)
        # What was parsed is what was sampled (only the used keys matter).
        assert arch.resolution == flat["resolution"]
        assert arch.width_mult == flat["width_mult"]
        assert arch.num_classes == flat["num_classes"]
        assert arch.in_channels == flat["in_channels"]
        for s, stage in enumerate(arch.stages, start=1):
            assert stage.depth == flat[f"stage{s}_depth"]
            seen_depths.add(stage.depth)
            for b, block in enumerate(stage.blocks):
                assert block == BlockConfig(flat[f"stage{s}_block{b}_kernel"],
                                            flat[f"stage{s}_block{b}_expansion"])
        sampled_on = [i for i in EXIT_POSITIONS if flat[f"exit{i}_enabled"]]
        assert arch.exit_positions == (tuple(sampled_on) if sampled_on else (4,))  # repair: deepest
        for e in arch.exits:
            p = f"exit{e.position}_m"
            m1 = ExitModuleConfig(*(flat[f"{p}1_{f}"] for f in MODULE_FIELDS))
            if flat[f"{p}2_resize"] == 0:
                assert e.modules == (m1,)
            else:
                assert e.modules == (m1, ExitModuleConfig(*(flat[f"{p}2_{f}"] for f in MODULE_FIELDS)))
        seen_exit_counts.add(arch.num_exits)
        # Round trip both ways.
        again = arch.to_flat()
        assert ArchConfig.from_flat(again, allowed=PAPER_SPACE) == arch
        assert all(flat[k] == v for k, v in again.items() if k in flat and not k.endswith("_enabled"))
        assert [i for i in EXIT_POSITIONS if again[f"exit{i}_enabled"]] == list(arch.exit_positions)
    assert seen_depths == {2, 3, 4} and seen_exit_counts == {1, 2, 3, 4}


def test_to_flat_writes_only_used_keys():
    arch = uniform_arch(2, 3, 3, exits=(3,))
    flat = arch.to_flat()
    assert "stage1_block2_kernel" not in flat
    assert flat["exit1_enabled"] is False and "exit1_m1_resize" not in flat
    assert flat["exit3_enabled"] is True and flat["exit3_m2_resize"] == 0
    assert "exit3_m2_kernel" not in flat
    assert set(flat) <= config.arch_keys()


# --------------------------------------------------------------------------- bad keys and values
def test_unknown_key_is_named():
    message = _error(_flat(stage2_dpeth=3))
    assert "'stage2_dpeth'" in message and "unknown" in message


def test_block_key_beyond_the_structural_maximum_is_unknown():
    assert "'stage1_block8_kernel'" in _error(_flat(stage1_block8_kernel=3))


@pytest.mark.parametrize("key, value, message", [
    ("exit2_m1_kernel", 4, "exit2_m1_kernel=4 is not one of (3, 5)"),
    ("exit2_m1_kernel", 7, "exit2_m1_kernel=7 is not one of (3, 5)"),
    ("exit2_m1_resize", 12, "exit2_m1_resize=12 is not one of (8, 10)"),
    ("exit2_m2_resize", 9, "exit2_m2_resize=9 is not one of (0, 8, 10)"),
    ("exit2_m1_expansion", 3, "exit2_m1_expansion=3 is not one of (1, 2)"),
    ("exit2_m1_pool", 2, "exit2_m1_pool=2 is not one of (0, 1)"),
    ("stage3_depth", 5, "stage3_depth=5 is not one of (2, 3, 4)"),
    ("stage3_block1_kernel", 9, "stage3_block1_kernel=9 is not one of (3, 5, 7)"),
    ("stage3_block0_expansion", 2, "stage3_block0_expansion=2 is not one of (3, 4, 6)"),
    ("resolution", 30, "resolution=30 is not one of (32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72)"),
])
def test_out_of_paper_space_value_gives_the_style_message(key, value, message):
    assert _error(_flat(**{key: value}), allowed=PAPER_SPACE) == message


def test_values_outside_the_paper_space_but_buildable_pass_without_allowed():
    arch = ArchConfig.from_flat(_flat(exit2_m1_kernel=7, exit2_m1_resize=12, stage3_depth=5,
                                      stage3_block2_kernel=9, stage3_block3_kernel=1,
                                      stage3_block4_kernel=3, stage3_block2_expansion=8,
                                      stage3_block3_expansion=1, stage3_block4_expansion=2,
                                      resolution=30))
    assert arch.exits[0].modules[0] == ExitModuleConfig(12, 7, 1, 0)
    assert arch.stages[2].depth == 5
    assert arch.stages[2].blocks[2:] == (BlockConfig(9, 8), BlockConfig(1, 1), BlockConfig(3, 2))
    assert arch.resolution == 30


@pytest.mark.parametrize("key, value, message", [
    ("exit2_m1_kernel", 4, "exit2_m1_kernel=4 is not one of (1, 3, 5, 7, 9)"),
    ("stage1_block0_kernel", 2, "stage1_block0_kernel=2 is not one of (1, 3, 5, 7, 9)"),
    ("stage1_depth", 9, "stage1_depth=9 is not an integer in [1, 8]"),
    ("stage1_depth", 0, "stage1_depth=0 is not an integer in [1, 8]"),
    ("stage1_depth", 2.5, "stage1_depth=2.5 is not an integer in [1, 8]"),
    ("stage1_depth", True, "stage1_depth=True is not an integer in [1, 8]"),
    ("stage1_depth", "2", "stage1_depth='2' is not an integer in [1, 8]"),
    ("stage1_block0_expansion", 0, "stage1_block0_expansion=0 is not an integer in [1, 8]"),
    ("stage1_block0_expansion", 9, "stage1_block0_expansion=9 is not an integer in [1, 8]"),
    ("resolution", 27, "resolution=27 is not an integer in [28, 96]"),
    ("resolution", 97, "resolution=97 is not an integer in [28, 96]"),
    ("exit2_m1_resize", 0, "exit2_m1_resize=0 is not an integer in [1, 64]"),
    ("exit2_m2_resize", -1, "exit2_m2_resize=-1 is not an integer in [0, 64]"),
    ("exit2_m1_pool", True, "exit2_m1_pool=True is not one of (0, 1)"),
    ("exit2_enabled", 2, "exit2_enabled=2 is not a boolean (True/False or 1/0)"),
])
def test_structural_limits_without_allowed(key, value, message):
    assert _error(_flat(**{key: value})) == message


def test_integral_floats_are_accepted_as_ints():
    arch = ArchConfig.from_flat(_flat(stage1_depth=3.0, stage1_block2_kernel=5.0,
                                      stage1_block2_expansion=4, resolution=40.0))
    assert arch.stages[0].depth == 3 and arch.stages[0].blocks[2] == BlockConfig(5, 4)
    assert arch.resolution == 40 and isinstance(arch.resolution, int)


@pytest.mark.parametrize("key", ["stage3_block1_kernel", "stage5_depth", "resolution",
                                 "exit2_m1_kernel", "exit2_m1_pool"])
def test_missing_key_is_named(key):
    flat = _flat()
    del flat[key]
    assert _error(flat) == f"missing key {key!r} in the architecture config"


def test_modules_of_a_disabled_exit_may_be_missing():
    flat = {k: v for k, v in _flat(exits=(2,)).items() if not k.startswith("exit3_m")}
    assert ArchConfig.from_flat(flat).exit_positions == (2,)


def test_m2_resize_zero_gives_a_one_module_branch():
    flat = _flat(exit2_m1_resize=10, exit2_m1_pool=1, exit2_m2_resize=0, exit2_m2_kernel=5)
    assert ArchConfig.from_flat(flat).exits == (ExitConfig(2, (ExitModuleConfig(10, 3, 1, 1),)),)
    two = ArchConfig.from_flat(_flat(exit2_m2_resize=8, exit2_m2_kernel=5, exit2_m2_expansion=2))
    assert two.exits[0].modules == (ExitModuleConfig(8, 3, 1, 0), ExitModuleConfig(8, 5, 2, 0))
    assert two.exits[0].depth == 2


def test_m2_keys_may_be_absent_for_a_one_module_branch():
    flat = {k: v for k, v in _flat(exits=(2,)).items() if not k.startswith("exit2_m2")}
    assert ArchConfig.from_flat(flat).exits[0].depth == 1


def test_block_keys_beyond_depth_are_accepted_ignored_and_validated():
    flat = _flat(depth=2, stage1_block3_kernel=7, stage1_block3_expansion=6)
    arch = ArchConfig.from_flat(flat, allowed=PAPER_SPACE)
    assert arch.stages[0].blocks == (BlockConfig(3, 3), BlockConfig(3, 3))
    flat["stage1_block3_kernel"] = 4
    assert _error(flat) == "stage1_block3_kernel=4 is not one of (1, 3, 5, 7, 9)"
    flat["stage1_block3_kernel"] = 9
    assert _error(flat, PAPER_SPACE) == "stage1_block3_kernel=9 is not one of (3, 5, 7)"


def test_module_keys_of_a_disabled_exit_are_validated():
    assert _error(_flat(exits=(2,), exit4_m2_kernel=4), PAPER_SPACE) == \
        "exit4_m2_kernel=4 is not one of (3, 5)"


# --------------------------------------------------------------------------- min_exits repair
def test_min_exits_repair_is_documented():
    doc = config.__doc__
    assert "min_exits" in doc and "deepest disabled positions that have a branch" in doc


def test_min_exits_one_enables_the_deepest_position():
    flat = _flat(exits=(), min_exits=1, exit4_m1_resize=10, exit4_m1_kernel=5)
    arch = ArchConfig.from_flat(flat, allowed=PAPER_SPACE)
    assert arch.exits == (ExitConfig(4, (ExitModuleConfig(10, 5, 1, 0),)),)


def test_min_exits_two_enables_the_two_deepest_disabled():
    assert ArchConfig.from_flat(_flat(exits=(), min_exits=2)).exit_positions == (3, 4)
    assert ArchConfig.from_flat(_flat(exits=(4,), min_exits=2)).exit_positions == (3, 4)
    assert ArchConfig.from_flat(_flat(exits=(1,), min_exits=3)).exit_positions == (1, 3, 4)


def test_min_exits_does_nothing_when_enough_exits_exist():
    assert ArchConfig.from_flat(_flat(exits=(1,), min_exits=1)).exit_positions == (1,)
    assert ArchConfig.from_flat(_flat(exits=(), min_exits=0)).exit_positions == ()
    assert ArchConfig.from_flat(_flat(exits=())).exit_positions == ()  # default 0: static


def test_min_exits_skips_positions_without_module_keys():
    flat = {k: v for k, v in _flat(exits=(), min_exits=1).items() if not k.startswith("exit4_")}
    assert ArchConfig.from_flat(flat).exit_positions == (3,)


def test_min_exits_that_cannot_be_met_raises():
    flat = {k: v for k, v in _flat(exits=()).items() if not k.startswith("exit")}
    flat["min_exits"] = 1
    assert _error(flat).startswith("min_exits=1 but only 0 exits can be enabled")


@pytest.mark.parametrize("value", [5, -1, 1.5, True, "1"])
def test_bad_min_exits(value):
    assert _error(_flat(min_exits=value)) == f"min_exits={value!r} is not an integer in [0, 4]"


# --------------------------------------------------------------------------- global settings
@pytest.mark.parametrize("value", [0, 0.0, -1.0, 0.04, 4.5, math.nan, math.inf, "1.0", True, None])
def test_bad_width_mult(value):
    assert _error(_flat(width_mult=value)) == f"width_mult={value!r} is not a number in [0.05, 4.0]"


def test_good_width_mult_and_defaults():
    assert ArchConfig.from_flat(_flat(width_mult=0.25)).width_mult == 0.25
    arch = ArchConfig.from_flat(_flat(width_mult=2))
    assert arch.width_mult == 2.0 and isinstance(arch.width_mult, float)
    default = ArchConfig.from_flat(_flat())
    assert (default.width_mult, default.num_classes, default.in_channels) == (1.0, 10, 3)


@pytest.mark.parametrize("value", [0, 2, 4, 1.5, True, "3"])
def test_bad_in_channels(value):
    assert _error(_flat(in_channels=value)) == f"in_channels={value!r} is not one of (1, 3)"


@pytest.mark.parametrize("value", [1, 0, -10, 2.5, 100_001, "10"])
def test_bad_num_classes(value):
    assert _error(_flat(num_classes=value)) == f"num_classes={value!r} is not an integer in [2, 100000]"


def test_good_num_classes_and_in_channels():
    arch = ArchConfig.from_flat(_flat(num_classes=100, in_channels=1))
    assert (arch.num_classes, arch.in_channels) == (100, 1)


def test_from_flat_needs_a_mapping():
    with pytest.raises(TypeError, match="needs a dict, got list"):
        ArchConfig.from_flat([("resolution", 32)])


def test_arch_config_checks_its_own_structure():
    stages = (StageConfig((BlockConfig(3, 3),)),) * NUM_STAGES
    mod = (ExitModuleConfig(8, 3, 1, 0),)
    with pytest.raises(ValueError, match="needs 5 stages, got 4"):
        ArchConfig(stages=stages[:4])
    with pytest.raises(ValueError, match=r"distinct and sorted, got \[3, 1\]"):
        ArchConfig(stages=stages, exits=(ExitConfig(3, mod), ExitConfig(1, mod)))
    with pytest.raises(ValueError, match=r"distinct and sorted, got \[2, 2\]"):
        ArchConfig(stages=stages, exits=(ExitConfig(2, mod), ExitConfig(2, mod)))


# --------------------------------------------------------------------------- SpaceValues
@pytest.mark.parametrize("field, values, message", [
    ("kernels", (3, 4), "SpaceValues.kernels contains 4, which is not one of (1, 3, 5, 7, 9)"),
    ("exit_kernels", (2,), "SpaceValues.exit_kernels contains 2, which is not one of (1, 3, 5, 7, 9)"),
    ("depths", (2, 9), "SpaceValues.depths contains 9, which is not an integer in [1, 8]"),
    ("resolutions", (24, 32), "SpaceValues.resolutions contains 24, which is not an integer in [28, 96]"),
    ("exit_m1_resizes", (0, 8), "SpaceValues.exit_m1_resizes contains 0, which is not an integer in [1, 64]"),
    ("exit_pools", (0, 2), "SpaceValues.exit_pools contains 2, which is not one of (0, 1)"),
    ("exit_positions", (1, 5), "SpaceValues.exit_positions contains 5, which is not one of (1, 2, 3, 4)"),
    ("expansions", (), "SpaceValues.expansions is empty"),
])
def test_space_values_with_a_bad_set_names_the_field(field, values, message):
    with pytest.raises(ValueError) as info:
        SpaceValues(**{field: values})
    assert str(info.value) == message


def test_custom_space_restricts_parsing():
    space = SpaceValues(kernels=(3,), exit_positions=(2, 4))
    arch = ArchConfig.from_flat(_flat(exits=(2, 4)), allowed=space)
    assert arch.exit_positions == (2, 4)
    assert _error(_flat(kernel=5), space) == "stage1_block0_kernel=5 is not one of (3,)"
    assert _error(_flat(exits=(1,)), space) == "exit1_enabled=True but position 1 is not one of (2, 4)"
    assert smallest_arch(space).exit_positions == (2,)
    assert largest_arch(space).exit_positions == (2, 4)


# --------------------------------------------------------------------------- rows


def test_rows_describe_stem_exits_and_head_by_hand():
    """Width 0.5, 100 classes, grey input: every width of the built network is in a row."""
    mod = config.ExitModuleConfig(resize=8, kernel=3, expansion=2, pool=1)
    arch = config.uniform_arch(2, 3, 3, exits=(1, 3), exit_module=mod, width_mult=0.5, num_classes=100,
                               in_channels=1)
    assert arch.stem_row() == config.StemRow(in_channels=1, out_channels=8, kernel=3, stride=2, activation="hswish")
    assert arch.block_rows()[0].in_channels == 8
    # exits sit on the output of their stage: 24·0.5 → 16 (make_divisible keeps ≥ 90%), 80·0.5 → 40
    assert arch.exit_rows() == (config.ExitRow(1, 16, "aebnas", (mod,), 100),
                                config.ExitRow(3, 40, "aebnas", (mod,), 100))
    # a module doubles the channels (expansion 2); the classifier reads them: 16·2, 40·2
    assert [r.features for r in arch.exit_rows()] == [32, 80]
    # EDANAS: 1×1 conv to 6C, then 8C features
    edanas = config.uniform_arch(2, 3, 3, exits=(1,), exit_branch="edanas", width_mult=0.5).exit_rows()[0]
    assert (edanas.branch, edanas.modules, edanas.expand_channels, edanas.features) == ("edanas", (), 96, 128)
    # head: 960·0.5 = 480; the 1280 feature mix only grows with the width
    assert arch.head_row() == config.HeadRow(in_channels=80, expand_channels=480, feature_channels=1280,
                                             num_classes=100, activation="hswish")
    wide = config.uniform_arch(2, 3, 3, width_mult=1.25)
    assert (wide.head_row().expand_channels, wide.head_row().feature_channels) == (1200, 1600)


def test_space_values_live_in_their_own_module():
    from aebnas import space_values

    assert config.SpaceValues is space_values.SpaceValues and config.PAPER_SPACE is space_values.PAPER_SPACE
    assert config.EXIT_POSITIONS == space_values.EXIT_POSITIONS == (1, 2, 3, 4)


# --------------------------------------------------------------------------- exit branches
@pytest.mark.parametrize("resize, kernel, pool, conv, out", [
    (8, 3, 0, 3, 3), (8, 3, 1, 3, 1), (8, 5, 1, 2, 1), (10, 3, 1, 4, 2), (10, 5, 0, 3, 3),
    (5, 5, 1, 1, 1),  # a 1×1 map is not pooled (the authors' code skips it)
])
def test_an_exit_module_s_map_sizes(resize, kernel, pool, conv, out):
    module = ExitModuleConfig(resize, kernel, 1, pool)
    assert (module.conv_size, module.out_size) == (conv, out)
    assert module.pools == (bool(pool) and conv >= 2)


def test_an_exit_module_smaller_than_its_kernel_is_refused_naming_the_keys():
    with pytest.raises(ValueError, match="resize >= kernel"):
        ExitModuleConfig(3, 5, 1, 0)
    assert _error(_flat(exit2_m1_resize=4, exit2_m1_kernel=5)) == (
        "exit2_m1_resize=4 is smaller than exit2_m1_kernel=5: the module's unpadded convolution needs "
        "resize >= kernel")
    with pytest.raises(ValueError, match="exit resize 3 is smaller than exit kernel 5"):
        SpaceValues(exit_m1_resizes=(3, 8))


def test_an_edanas_exit_has_no_modules_and_ignores_their_keys():
    arch = ArchConfig.from_flat(_flat(exits=(2, 3), exit2_branch="edanas", exit3_branch="aebnas"))
    assert arch.exits == (ExitConfig(2, (), "edanas"), ExitConfig(3, (ExitModuleConfig(8, 3, 1, 0),), "aebnas"))
    flat = arch.to_flat()
    assert flat["exit2_branch"] == "edanas" and not any(k.startswith("exit2_m") for k in flat)
    assert ArchConfig.from_flat(flat) == arch
    # no exit{i}_branch key: the paper's branch
    assert ArchConfig.from_flat(_flat(exits=(2,))).exits[0].branch == "aebnas"


def test_a_bad_branch_is_refused():
    assert _error(_flat(exit2_branch="nachos")) == "exit2_branch='nachos' is not one of ('aebnas', 'edanas')"
    with pytest.raises(ValueError, match="an edanas branch has no modules"):
        ExitConfig(1, (ExitModuleConfig(8, 3, 1, 0),), "edanas")
    with pytest.raises(ValueError, match="needs at least one module"):
        ExitConfig(1, (), "aebnas")


def test_a_config_with_the_old_channel_keys_is_refused_with_what_changed():
    flat = _flat()
    flat["exit2_m1_channels"] = flat.pop("exit2_m1_resize")
    message = _error(flat)
    assert "'exit2_m1_channels'" in message and "exit{i}_m{1,2}_resize" in message and "older aebnas" in message


def test_min_exits_repairs_an_edanas_exit_that_has_no_module_keys():
    flat = {k: v for k, v in _flat(exits=()).items() if not k.startswith("exit3_m") and not k.startswith("exit4")}
    flat.update(min_exits=1, exit3_branch="edanas")
    assert ArchConfig.from_flat(flat).exits == (ExitConfig(3, (), "edanas"),)


@pytest.mark.parametrize("key, name", [
    ("resolution", "resolutions"), ("stage2_depth", "depths"), ("stage3_block1_kernel", "kernels"),
    ("stage5_block0_expansion", "expansions"), ("exit1_m1_resize", "exit_m1_resizes"),
    ("exit4_m2_resize", "exit_m2_resizes"), ("exit2_m2_kernel", "exit_kernels"),
    ("exit3_m1_expansion", "exit_expansions"), ("exit1_m2_pool", "exit_pools"),
    ("exit1_enabled", None), ("exit1_branch", None), ("width_mult", None), ("min_exits", None),
])
def test_value_set_of_names_the_space_field_of_each_key(key, name):
    assert config.value_set_of(key) == name
    assert name is None or hasattr(PAPER_SPACE, name)
