"""search_spaces.encoding: one canonical integer vector per network, and Optuna's define-by-run space."""

import itertools
import random

import pytest
from ray import tune

from aebnas.config import ArchConfig
from search_spaces import SPACES, aebnas_space
from search_spaces.encoding import Encoding, define_by_run

FIXED = {"width_mult": 0.5, "num_classes": 10, "in_channels": 3}


def space_of(name, **kwargs):
    return {**SPACES[name](**kwargs), **FIXED}


@pytest.mark.parametrize("name", sorted(SPACES))
def test_encode_decode_is_the_identity_over_the_space(name):
    enc = Encoding(space_of(name, resolutions=(32, 40)))
    rng = random.Random(0)
    for _ in range(300):
        raw = [rng.randrange(n) for n in enc.sizes]   # any vector a search operator could produce
        v = enc.canonical(raw)
        assert (enc.canonical(v) == v).all()           # canonical vectors are fixed points
        assert enc.arch(v) == enc.arch(raw)            # …of the same network
        config = enc.decode(v)
        assert (enc.encode(config) == v).all()         # encode ∘ decode = identity
        assert ArchConfig.from_flat(config) == enc.arch(v)
        assert (enc.encode(enc.arch(v)) == v).all()
        assert not v[~enc.active(v)].any()             # inactive genes carry no free value


def test_one_canonical_vector_per_network():
    # Small enough to enumerate (2^13 vectors): depths 1–2, exits at 2 and 4 with one or two modules.
    space = {**aebnas_space(depths=(1, 2), kernels=(3,), expansions=(3,), resolutions=(32,),
                            exit_positions=(2, 4), exit_m1_resizes=(8,), exit_m2_resizes=(0, 8),
                            exit_kernels=(3,), exit_expansions=(1,), exit_pools=(0, 1)), **FIXED}
    enc = Encoding(space)
    assert len(enc) == 13
    by_network = {}
    for raw in itertools.product(*(range(n) for n in enc.sizes)):
        arch = enc.arch(raw)
        by_network.setdefault(arch, set()).add(tuple(enc.canonical(raw)))
    assert all(len(v) == 1 for v in by_network.values())               # one vector per network …
    assert len({next(iter(v)) for v in by_network.values()}) == len(by_network) > 100  # … and no two share one
    # The full space, sampled: the same bijection between networks and canonical vectors.
    enc, rng, seen = Encoding(space_of("aebnas")), random.Random(1), {}
    for _ in range(2000):
        v = enc.canonical([rng.randrange(n) for n in enc.sizes])
        assert seen.setdefault(tuple(v), enc.arch(v)) == enc.arch(v)


def test_decode_holds_only_the_keys_the_network_uses():
    enc = Encoding(space_of("aebnas"))
    v = enc.encode(ArchConfig.from_flat({**{g.key: g.values[0] for g in enc.genes}, **enc.constants,
                                         "stage1_depth": 2, "exit1_enabled": False, "exit2_enabled": True,
                                         "exit2_m2_resize": 0}))
    config = enc.decode(v)
    assert "stage1_block2_kernel" not in config and "stage1_block1_kernel" in config
    assert not any(k.startswith("exit1_m") for k in config)
    assert "exit2_m2_resize" in config and "exit2_m2_kernel" not in config
    assert config["width_mult"] == 0.5 and config["min_exits"] == 1


def test_bad_input_is_named():
    enc = Encoding(space_of("aebnas"))
    with pytest.raises(ValueError, match="gene resolution: index 99"):
        enc.arch([99] + [0] * (len(enc) - 1))
    with pytest.raises(ValueError, match="has 82 genes"):
        enc.arch([0, 0])
    with pytest.raises(ValueError, match="resolution: the encoding needs tune.choice samplers, got Integer"):
        Encoding({**space_of("aebnas"), "resolution": tune.randint(32, 40)})
    with pytest.raises(ValueError, match="lr: the encoding covers architecture choices"):
        Encoding({**space_of("aebnas"), "lr": tune.uniform(0.01, 0.1)})
    with pytest.raises(ValueError, match="width_mult=0.75, but the space fixes it to 0.5"):
        enc.encode(ArchConfig.from_flat({**enc.decode(enc.canonical([0] * len(enc))), "width_mult": 0.75}))


def test_define_by_run_asks_only_active_choices():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = space_of("aebnas", resolutions=(32, 40))
    enc, ask = Encoding(space), define_by_run(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    asked_sizes = set()
    for _ in range(40):
        trial = study.ask()
        config = {**trial.params, **ask(trial)}
        arch = ArchConfig.from_flat(config)
        used = set(arch.to_flat())
        genes = {g.key for g in enc.genes}
        assert set(trial.params) <= used, set(trial.params) - used  # nothing asked that the network ignores
        assert genes & used <= set(config)                         # everything it uses was asked or fixed
        assert (enc.encode(config) == enc.encode(arch)).all()
        asked_sizes.add(len(trial.params))
        study.tell(trial, 0.0)
    assert len(asked_sizes) > 5  # the number of choices depends on the network


def test_define_by_run_repairs_exits_as_from_flat_does():
    optuna = pytest.importorskip("optuna")
    space = space_of("aebnas")
    fixed = {"resolution": 32, **{f"stage{s}_depth": 2 for s in range(1, 6)},
             **{f"exit{i}_enabled": False for i in (1, 2, 3, 4)}}
    trial = optuna.trial.FixedTrial({**fixed, **{f"stage{s}_block{b}_{n}": 3 for s in range(1, 6) for b in (0, 1)
                                                for n in ("kernel", "expansion")},
                                     "exit4_m1_resize": 8, "exit4_m1_kernel": 3, "exit4_m1_expansion": 1,
                                     "exit4_m1_pool": 0, "exit4_m2_resize": 0})
    config = {**trial.params, **define_by_run(space)(trial)}
    assert config["exit4_enabled"] is True and ArchConfig.from_flat(config).exit_positions == (4,)
