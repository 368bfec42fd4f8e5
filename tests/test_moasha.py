"""MO-ASHA: Pareto ranks (a rank is not a sorted order), promotion at rungs, a real search."""

import json

import numpy as np
import pytest
from ray.tune.schedulers import TrialScheduler

from aebnas.search.tuner import run
from aebnas.search.moasha import MOASHA, pareto_ranks
from aebnas.search.pareto import non_dominated_fronts
from conftest import tiny_experiment


def test_fronts():
    F = np.array([[1, 5], [2, 2], [5, 1], [3, 3], [6, 6]], dtype=float)
    fronts = [sorted(f.tolist()) for f in non_dominated_fronts(F)]
    assert fronts == [[0, 1, 2], [3], [4]]


def test_ranks_are_the_inverse_of_the_order():
    # Row 2 is best, row 0 second, row 1 worst: the ranks are [1, 2, 0]; the sorted order (row of
    # rank 0, of rank 1, …) is [2, 0, 1]. Taking one for the other ranks the worst row first.
    G = np.array([[2.0, 2.0], [3.0, 3.0], [1.0, 1.0]])
    assert pareto_ranks(G).tolist() == [1, 2, 0]
    assert np.argsort(pareto_ranks(G)).tolist() == [2, 0, 1]


def test_a_trial_that_dominates_all_others_continues():
    sched = MOASHA(max_t=8, grace_period=1, reduction_factor=2)
    for i, (acc, macs) in enumerate([(50, 5.0), (60, 4.0), (55, 6.0), (40, 3.0), (45, 7.0)]):
        sched.decide(f"t{i}", 1, np.array([-acc, macs]))
    assert sched.decide("new", 1, np.array([-70.0, 1.0])) == TrialScheduler.CONTINUE
    assert sched.decide("dominated", 1, np.array([-10.0, 9.0])) == TrialScheduler.STOP


def test_first_trial_continues_and_the_top_fraction_is_kept():
    sched = MOASHA(max_t=8, grace_period=1, reduction_factor=2)
    assert sched.milestones == [1, 2, 4, 8]
    assert sched.decide("a", 1, np.array([-50.0, 5.0])) == TrialScheduler.CONTINUE  # alone at its rung
    assert sched.decide("b", 1, np.array([-40.0, 6.0])) == TrialScheduler.STOP       # dominated, 1 of 2 kept
    # Not dominated: on the first front with "a"; ε-net puts the most accurate first, so of 3 the
    # top ceil(3/2) = 2 are "a" and the far end of the front.
    assert sched.decide("c", 1, np.array([-30.0, 1.0])) == TrialScheduler.CONTINUE
    assert sched.decide("a", 1, np.array([-50.0, 5.0])) == TrialScheduler.CONTINUE  # no new rung: continue


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="at least two objectives"):
        MOASHA([("accuracy", "max")])
    with pytest.raises(ValueError, match="mode 'up'"):
        MOASHA([("accuracy", "up"), ("avg_macs", "min")])


def test_moasha_search_stops_the_trials_its_ranks_say(ray_local, small_npz, tmp_path):
    """A real search, one trial at a time; replaying its reported (accuracy, MACs) through the rules
    gives exactly the epoch at which each trial ended."""
    exp = tiny_experiment(tmp_path, small_npz, name="moasha", scheduler="moasha", num_samples=5, epochs=4,
                          grace_period=1, max_concurrent=1)
    results = run(exp)
    assert len(results) == 5 and results.num_errors == 0
    assert json.loads((tmp_path / "moasha" / "aebnas_experiment.json").read_text())["scheduler"] == "moasha"
    replay = MOASHA(max_t=4, grace_period=1, reduction_factor=2)
    ended = []
    for r in sorted(results, key=lambda r: r.path):  # trial ids in the order the trials ran
        history = r.metrics_dataframe.sort_values("training_iteration")
        expected = 4
        for _, row in history.iterrows():
            t = int(row["training_iteration"])
            if t < 4 and replay.decide(r.path, t, np.array([-row["accuracy"], row["avg_macs"]])) == "STOP":
                expected = t
                break
        assert int(history["training_iteration"].max()) == expected, r.path
        ended.append(expected)
    assert ended[0] == 4  # the first trial is alone at every rung
