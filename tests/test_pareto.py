"""analysis/pareto.py: front and hypervolume against brute force, on random and real trial points."""

import itertools

import numpy as np
import pandas as pd
import pytest

from analysis.pareto import default_reference, hypervolume, parse_reference, pareto_front, pareto_mask
from analysis.posthoc import threshold_sweep
from analysis.results import load_experiment


def brute_front(acc, macs):
    """Every point that no other point dominates (≥ accuracy, ≤ MACs, one strictly)."""
    n = len(acc)
    return np.array([not any(acc[j] >= acc[i] and macs[j] <= macs[i] and (acc[j] > acc[i] or macs[j] < macs[i])
                             for j in range(n)) for i in range(n)])


def brute_hypervolume(acc, macs, ref):
    """Area of the union of the boxes [macs_i, ref_macs] × [ref_acc, acc_i], cell by cell."""
    ref_acc, ref_macs = ref
    xs = sorted({ref_macs, *(m for m in macs if m < ref_macs)})
    ys = sorted({ref_acc, *(a for a in acc if a > ref_acc)})
    area = 0.0
    for (x0, x1), (y0, y1) in itertools.product(zip(xs, xs[1:]), zip(ys, ys[1:])):
        if any(m <= x0 and a >= y1 for a, m in zip(acc, macs)):
            area += (x1 - x0) * (y1 - y0)
    return area


@pytest.mark.parametrize("seed", range(8))
def test_random_points_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    # Rounded values make ties and duplicate points common.
    acc = np.round(rng.uniform(10, 90, n), 0 if seed % 2 else 1)
    macs = np.round(rng.uniform(1, 20, n), 0 if seed % 3 else 2)
    np.testing.assert_array_equal(pareto_mask(acc, macs), brute_front(acc, macs))
    ref = (float(rng.uniform(0, 40)), float(rng.uniform(8, 25)))  # some points fall outside it
    assert hypervolume(acc, macs, ref) == pytest.approx(brute_hypervolume(acc, macs, ref), rel=1e-12)


def test_hand_computed_example():
    acc, macs = [50, 60, 55, 60, 40], [2.0, 4.0, 5.0, 4.0, 1.0]
    assert list(pareto_mask(acc, macs)) == [True, True, False, True, True]  # equal points both stay
    # ref (0 %, 6 MMACs): slabs 1→2 at 40, 2→4 at 50, 4→6 at 60.
    assert hypervolume(acc, macs, (0, 6)) == pytest.approx(40 * 1 + 50 * 2 + 60 * 2)
    assert hypervolume(acc, macs, (45, 3)) == pytest.approx(5 * 1)  # only (50 %, 2) improves on it
    assert hypervolume([], [], (0, 1)) == 0.0


def test_nan_points_are_never_on_the_front():
    assert list(pareto_mask([np.nan, 50, 60], [1.0, np.nan, 3.0])) == [False, False, True]


def test_real_trial_points_match_brute_force(tiny_search):
    """Trial points and every (trial × threshold vector) point of a real search."""
    res = load_experiment(tiny_search[0])
    sweep = threshold_sweep(res.trials)
    for frame in (res.trials, sweep):
        acc, macs = frame["accuracy"].to_numpy(float), frame["avg_macs"].to_numpy(float)
        np.testing.assert_array_equal(pareto_mask(acc, macs), brute_front(acc, macs))
        ref = default_reference(macs)
        assert ref == (0.0, pytest.approx(1.1 * macs.max()))
        assert hypervolume(acc, macs, ref) == pytest.approx(brute_hypervolume(acc, macs, ref), rel=1e-12)
    front = pareto_front(res.trials)
    assert list(front["avg_macs"]) == sorted(front["avg_macs"])
    assert set(front.index) == set(res.trials.index[brute_front(res.trials["accuracy"].to_numpy(float),
                                                                 res.trials["avg_macs"].to_numpy(float))])


def test_front_of_a_frame_is_sorted_by_macs():
    frame = pd.DataFrame({"accuracy": [70, 50, 80, 60], "avg_macs": [3.0, 1.0, 9.0, 5.0], "name": list("abcd")})
    assert list(pareto_front(frame)["name"]) == ["b", "a", "c"]


def test_reference_point_parsing():
    assert parse_reference("0,20") == (0.0, 20.0)
    assert parse_reference("12.5, 3e1") == (12.5, 30.0)
    for bad in ("20", "a,b", "1,2,3", "nan,1"):
        with pytest.raises(ValueError, match="ACC,MACS"):
            parse_reference(bad)
    with pytest.raises(ValueError, match="pass one explicitly"):
        default_reference([np.nan])
