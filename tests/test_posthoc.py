"""analysis/posthoc.py: re-tuned thresholds reproduce what real trials reported; sweep and oracle."""

import math

import numpy as np
import pandas as pd
import pytest

from aebnas.cost.macs import ExitCosts
from aebnas.exit_policy import PAPER_GRID, ExitOutputs, simulate, threshold_grid, tune_thresholds
from analysis.pareto import pareto_mask
from analysis.posthoc import (exit_breakdown, load_outputs, oracle_bounds, retune, retune_trials, sweep_front,
                              threshold_sweep)
from analysis.results import load_experiment


@pytest.fixture(scope="module")
def tiny(tiny_search):
    return load_experiment(tiny_search[0])


def test_retune_at_own_target_reproduces_the_reported_metrics(tiny):
    tuned = retune_trials(tiny.trials).set_index("trial_id")
    assert (tuned["source"] == "posthoc").all()
    for _, row in tiny.trials.iterrows():
        t = tuned.loc[row["trial_id"]]
        assert t["thresholds"] == row["thresholds"]
        for key in ("score", "accuracy", "avg_macs", "test_accuracy", "test_avg_macs"):
            assert t[key] == pytest.approx(row[key], abs=1e-9), key
        for pos in row["exit_positions"].split(","):
            assert t[f"exit{pos}_util"] == pytest.approx(row[f"exit{pos}_util"])
            assert t[f"exit{pos}_macs"] == pytest.approx(row[f"exit{pos}_macs"])
        assert t["final_util"] == pytest.approx(row["final_util"])


def test_retune_for_a_budget_keeps_val_macs_within_it(tiny):
    budget = float(tiny.trials["avg_macs"].median())
    tuned = retune_trials(tiny.trials, budget, budget_macs=budget)
    assert (tuned["budget_macs"] == budget).all() and (tuned["target_macs"] == budget).all()
    for _, t in tuned.iterrows():
        outputs, costs = load_outputs(tiny.trial(t["trial_id"])["exit_outputs"])
        macs = [simulate(outputs["val"], v, costs).avg_cost for v in threshold_grid(costs.num_exits)]
        if min(macs) <= budget:
            assert t["avg_macs"] <= budget + 1e-9
        else:  # nothing fits: the cheapest vector
            assert t["avg_macs"] == pytest.approx(min(macs))


def test_thresholds_are_never_tuned_on_test():
    """Changing the test split changes the test numbers, never the thresholds."""
    costs = ExitCosts(backbone=[1.0, 2.0, 4.0], branch=[0.1, 0.1])

    def split(n, seed):
        r = np.random.default_rng(seed)
        labels = r.integers(0, 5, n)
        pred = np.where(r.random((3, n)) < [[0.5], [0.7], [0.9]], labels, (labels + 1) % 5)
        return ExitOutputs(r.random((3, n)), pred, labels)

    val = split(400, 1)
    a = retune({"val": val, "test": split(300, 2)}, costs, 2.5)
    b = retune({"val": val, "test": split(300, 3)}, costs, 2.5)
    assert a.thresholds == b.thresholds == tune_thresholds(val, costs, 2.5).thresholds
    assert a.val.accuracy == b.val.accuracy and a.test.accuracy != b.test.accuracy


def test_sweep_gives_every_grid_vector_and_contains_the_reported_point(tiny):
    sweep = threshold_sweep(tiny.trials)
    for _, row in tiny.trials.iterrows():
        curve = sweep[sweep["trial_id"] == row["trial_id"]]
        assert len(curve) == len(PAPER_GRID) ** row["num_exits"]
        own = curve[curve["thresholds"] == tuple(row["thresholds"])]
        assert len(own) == 1
        assert own["accuracy"].iloc[0] == pytest.approx(row["accuracy"])
        assert own["avg_macs"].iloc[0] == pytest.approx(row["avg_macs"])
        assert own["test_accuracy"].iloc[0] == pytest.approx(row["test_accuracy"])
    front = sweep_front(sweep)
    acc, macs = sweep["accuracy"].to_numpy(), sweep["avg_macs"].to_numpy()
    assert set(front.index) == set(sweep.index[pareto_mask(acc, macs)])
    assert list(front["avg_macs"]) == sorted(front["avg_macs"])


def test_sweep_on_a_synthetic_trial_equals_simulate(tmp_path):
    from aebnas.exit_policy import save_exit_outputs

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 50)
    val = ExitOutputs(rng.random((3, 50)), rng.integers(0, 3, (3, 50)), labels)
    costs = ExitCosts(backbone=[1.0, 2.0, 3.0], branch=[0.2, 0.3])
    save_exit_outputs(tmp_path / "exit_outputs.npz", {"val": val, "test": val}, costs)
    trials = pd.DataFrame([{"experiment": "e", "trial_id": "t", "exit_outputs": str(tmp_path / "exit_outputs.npz"),
                            "exit_positions": "2,3", "target_macs": 2.0, "threshold_grid": [0.2, 0.6, 1.0]}])
    sweep = threshold_sweep(trials)
    assert len(sweep) == 9
    for _, s in sweep.iterrows():
        sim = simulate(val, list(s["thresholds"]), costs)
        assert s["accuracy"] == pytest.approx(sim.accuracy) and s["avg_macs"] == pytest.approx(sim.avg_cost)
    ex = exit_breakdown(trials.iloc[0], 2.0)
    assert list(ex.index) == ["exit2", "exit3", "final"]
    assert ex["util"].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(ex["accuracy"], val.exit_accuracy())
    tuned = tune_thresholds(val, costs, 2.0, grid=(0.2, 0.6, 1.0))
    assert list(ex["threshold"][:2]) == tuned.thresholds


def test_oracle_bounds_equal_what_the_trials_reported(tiny):
    bounds = oracle_bounds(tiny.trials).set_index("trial_id")
    for _, row in tiny.trials.iterrows():
        b = bounds.loc[row["trial_id"]]
        assert b["oracle_accuracy"] == pytest.approx(row["oracle_accuracy"])
        assert b["oracle_macs"] == pytest.approx(row["oracle_macs"])
        assert b["oracle_accuracy"] >= row["final_accuracy"] and b["test_oracle_accuracy"] >= row["test_final_accuracy"]


def test_trials_without_exit_outputs(tiny):
    trials = tiny.trials.copy()
    trials.loc[trials.index[0], "exit_outputs"] = None
    row = trials.iloc[0]
    own = retune_trials(trials).set_index("trial_id").loc[row["trial_id"]]
    assert own["source"] == "reported" and own["accuracy"] == row["accuracy"] and own["thresholds"] == row["thresholds"]
    other = retune_trials(trials, 2 * row["target_macs"]).set_index("trial_id").loc[row["trial_id"]]
    assert other["source"] == "missing" and math.isnan(other["accuracy"])
    ex = exit_breakdown(row)
    assert ex.loc["final", "util"] == row["final_util"]
    with pytest.raises(ValueError, match="no exit_outputs.npz"):
        exit_breakdown(row, 2 * row["target_macs"])
