"""The surrogate searcher: piece costs, predictors, the Searcher's bookkeeping, real searches and resume."""

import json
import random
import signal
import time

import numpy as np
import pytest

from aebnas.config import SpaceValues, random_arch
from aebnas.cost.macs import PieceCosts, exit_costs
from aebnas.search.tuner import run
from aebnas.search.predictors import PREDICTORS, choose_predictor, cross_validated_tau, kendall_tau, make_predictor
from conftest import tiny_experiment
from ray_sandbox import quickstart_argv, ray_sandbox  # noqa: F401  (fixture)
from search_spaces import aebnas_space
from search_spaces.encoding import Encoding

pytest.importorskip("pymoo")
from aebnas.search.surrogate import LOG_FILE, SurrogateSearch  # noqa: E402

FIXED = {"width_mult": 0.25, "num_classes": 10, "in_channels": 3}


def test_piece_costs_equal_whole_network_counts():
    space, rng, pieces = SpaceValues(resolutions=(32, 44)), random.Random(0), PieceCosts()
    for _ in range(12):
        arch = random_arch(space, rng, width_mult=0.5)
        whole, summed = exit_costs(arch), pieces.exit_costs(arch)
        np.testing.assert_allclose(summed.backbone, whole.backbone, rtol=1e-12)
        np.testing.assert_allclose(summed.branch, whole.branch, rtol=1e-12)
    misses = pieces.misses
    pieces.exit_costs(arch)
    assert pieces.misses == misses  # a network seen before costs no ptflops call


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert np.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="one length"):
        kendall_tau([1, 2], [1, 2, 3])


@pytest.fixture(scope="module")
def macs_data():
    """Encodings of 100 networks and their static MMACs: a real, deterministic function of the
    architecture that a predictor can learn (no claim about accuracy is made from it)."""
    enc = Encoding({**aebnas_space(resolutions=(32, 40)), **FIXED})
    rng, pieces = random.Random(1), PieceCosts()
    vectors = np.array([enc.sample(rng) for _ in range(100)])
    y = np.array([pieces.exit_costs(enc.arch(v)).static_cost for v in vectors])
    return enc.features(vectors), y


@pytest.mark.parametrize("name", PREDICTORS)
def test_each_predictor_ranks_held_out_networks(name, macs_data):
    X, y = macs_data
    model = make_predictor(name, seed=0).fit(X[:70], y[:70])
    assert kendall_tau(model.predict(X[70:]), y[70:]) > 0.5   # 30 held-out networks
    again = make_predictor(name, seed=0).fit(X[:70], y[:70])
    np.testing.assert_allclose(again.predict(X[70:]), model.predict(X[70:]))  # deterministic for a seed


def test_adaptive_switching_keeps_the_best_cross_validated_kind(macs_data):
    X, y = macs_data
    model, taus = choose_predictor(X, y, ("rbf", "gp"), seed=0)
    assert set(taus) == {"rbf", "gp"}
    assert model.name == max(taus, key=taus.get)
    assert taus[model.name] == pytest.approx(cross_validated_tau(model.name, X, y, seed=0))
    with pytest.raises(ValueError, match="predictor 'svm' is not one of"):
        make_predictor("svm")


def _searcher(**kw):
    space = {**aebnas_space(resolutions=(32, 40)), **FIXED, "epochs": 1}
    return SurrogateSearch(space, target_macs=1.0, batch_size=4, initial=6, population=20, generations=3, **kw), space


def _complete(search, trial_id, config, epoch=1, epochs=1):
    # A stand-in result (no claim is made from its values): accuracy grows with the resolution.
    search.on_trial_complete(trial_id, {"accuracy": config["resolution"] + 0.01 * int(trial_id[1:]),
                                        "avg_macs": 1.0, "epoch": epoch, "epochs": epochs})


def test_initial_design_then_surrogate_iterations(tmp_path):
    search, space = _searcher(log_dir=str(tmp_path))
    enc = Encoding(space)
    configs = [search.suggest(f"t{i}") for i in range(6)]
    vectors = [tuple(enc.encode(c)) for c in configs]
    assert len(set(vectors)) == 6                                       # distinct networks
    assert vectors[0] == tuple(search._extreme(smallest=True))          # the smallest …
    assert vectors[1] == tuple(search._extreme(smallest=False))         # … and the largest first
    assert enc.arch(vectors[0]).resolution == 32 and enc.arch(vectors[1]).resolution == 40
    for i, c in enumerate(configs):
        assert c["epochs"] == 1 and c["width_mult"] == 0.25              # the fixed values travel along
        _complete(search, f"t{i}", c, epoch=1 if i != 5 else 0)         # t5: stopped early (ASHA)
    assert len(search.archive) == 5                                     # learns from full fidelity only
    more = [search.suggest(f"t{i}") for i in range(6, 10)]
    assert all(tuple(enc.encode(c)) not in vectors for c in more)       # nothing proposed twice
    record = search.iterations[-1]
    assert record["kind"] == "surrogate" and record["predictor"] in PREDICTORS
    for i, c in enumerate(more, start=6):
        _complete(search, f"t{i}", c)
    assert search.iterations[-1]["batch_tau"] is not None
    lines = [json.loads(ln) for ln in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [ln["iteration"] for ln in lines] == [0, 1, 1]                # proposed, proposed, batch τ
    assert "ranked its batch with τ" in lines[-1]["message"]


def test_a_batch_predicted_all_alike_says_why_it_has_no_tau(tmp_path):
    """A tree ensemble is piecewise constant, so NSGA-II on it can propose a whole batch from one
    plateau: τ on that batch is undefined, and the log says why (it used to print 'τ nan')."""
    search, _ = _searcher(predictors=("trees",), log_dir=str(tmp_path))
    for i in range(6):  # the initial design all measures alike, so the trees predict one value everywhere
        search.suggest(f"t{i}")
        search.on_trial_complete(f"t{i}", {"accuracy": 50.0, "avg_macs": 1.0, "epoch": 1, "epochs": 1})
    for i in range(6, 10):
        search.suggest(f"t{i}")
    assert len(set(search.iterations[-1]["predicted"].values())) == 1
    for i in range(6, 10):
        search.on_trial_complete(f"t{i}", {"accuracy": 40.0 + i, "avg_macs": 1.0, "epoch": 1, "epochs": 1})
    assert search.iterations[-1]["batch_tau"] != search.iterations[-1]["batch_tau"]  # NaN: undefined
    last = json.loads((tmp_path / LOG_FILE).read_text().splitlines()[-1])
    assert last["batch_tau"] is None
    assert "τ on its batch is undefined (4 candidates: it predicted the same accuracy for all of them)" \
        in last["message"]


def test_state_round_trip_gives_the_same_next_proposals(tmp_path):
    a, _ = _searcher(seed=3)
    for i in range(6):
        _complete(a, f"t{i}", a.suggest(f"t{i}"))
    a.save(str(tmp_path / "state.pkl"))
    b, _ = _searcher(seed=3)
    b.restore(str(tmp_path / "state.pkl"))
    assert [a.suggest(f"n{i}") for i in range(4)] == [b.suggest(f"n{i}") for i in range(4)]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="predictors=\\['svm'\\]"):
        _searcher(predictors=("svm",))
    with pytest.raises(ValueError, match="target_macs=0 must be > 0"):
        SurrogateSearch({}, target_macs=0)


def test_surrogate_search_runs_on_ray(ray_local, small_npz, tmp_path):
    exp = tiny_experiment(tmp_path, small_npz, name="surrogate", search_alg="surrogate", surrogate_batch=2,
                          num_samples=6, epochs=1)
    results = run(exp)
    assert len(results) == 6 and results.num_errors == 0
    assert len({json.dumps(r.config, sort_keys=True) for r in results}) == 6
    lines = [json.loads(ln) for ln in (tmp_path / "surrogate" / LOG_FILE).read_text().splitlines()]
    kinds = [ln["kind"] for ln in lines if "proposing" in ln["message"]]
    assert kinds[0] == "initial design" and "surrogate" in kinds  # it went on to fit predictors


@pytest.mark.slow  # about 90 s: two drivers start Ray
def test_surrogate_search_resumes_after_the_driver_is_killed(ray_sandbox, small_npz, tmp_path):  # noqa: F811
    """SIGKILL the driver once the searcher has learnt from a batch; --resume goes on with the same
    archive and iteration numbers, and the search ends with all its trials."""
    args = quickstart_argv(small_npz, tmp_path, "killed", "--num-samples", "10", "--search-alg", "surrogate",
                           "--surrogate-batch", "2", "--scheduler", "fifo")
    exp_dir = tmp_path / "killed"
    driver = ray_sandbox.spawn(args, "first.log")
    deadline = time.time() + 300
    log_file = exp_dir / LOG_FILE
    while not (log_file.exists() and sum("proposing" in ln for ln in log_file.open()) >= 3):
        assert driver.poll() is None, ray_sandbox.log("first.log")[-4000:]
        assert time.time() < deadline, "the search made no progress:\n" + ray_sandbox.log("first.log")[-4000:]
        time.sleep(0.2)
    time.sleep(3)  # Ray Tune saves the searcher's state with the experiment state, every few seconds
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    ray_sandbox.wait_until_gone(timeout=10)
    ray_sandbox.kill_leftovers()
    before = [json.loads(ln) for ln in log_file.read_text().splitlines()]
    assert ray_sandbox.run(args + ["--resume"], "second.log", timeout=400) == 0, ray_sandbox.log("second.log")[-4000:]
    after = [json.loads(ln) for ln in log_file.read_text().splitlines()]
    assert after[:len(before)] == before
    proposed = [ln for ln in after if "proposing" in ln["message"]]
    resumed = proposed[len([ln for ln in before if "proposing" in ln["message"]]):]
    assert resumed, "no iteration after the resume"
    # numbering went on from the saved state (an iteration may be proposed again if the kill came
    # before Ray Tune saved it), and the archive of the first run was kept
    assert resumed[0]["iteration"] >= 2 and resumed[0]["archive"] >= 2
    assert len(list(exp_dir.glob("trial_*/result.json"))) == 10
