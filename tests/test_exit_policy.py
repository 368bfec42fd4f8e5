"""Tests for aebnas/exit_policy.py: confidences, exit simulation, threshold tuning, artifacts.

The vectorized functions are checked against plain per-sample Python loops (aebnas.reference).
"""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from aebnas.config import ExitModuleConfig, uniform_arch
from aebnas.cost.macs import exit_costs
from aebnas.exit_policy import (
    PAPER_GRID,
    ExitCosts,
    ExitOutputs,
    exit_index,
    load_exit_outputs,
    oracle,
    save_exit_outputs,
    simulate,
    simulate_many,
    threshold_grid,
    threshold_score,
    tune_thresholds,
)
from aebnas.nn import EarlyExitNet, torch_confidence
from aebnas.reference import loop_costs, loop_simulate, loop_tune_thresholds
from aebnas.training.loop import evaluate, recalibrate_bn
from conftest import make_confident

COSTS = ExitCosts(backbone=[1.0, 2.5, 4.0, 9.0], branch=[0.2, 0.3, 0.5])


def _outputs(seed=0, exits=3, n=400, classes=10):
    """Random cached outputs: later exits are right more often (as in a trained network)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    right = rng.random((exits + 1, n)) < np.linspace(0.4, 0.8, exits + 1)[:, None]
    wrong = (labels + rng.integers(1, classes, (exits + 1, n))) % classes
    prediction = np.where(right, labels, wrong)
    # Confident when right, a little more often than not.
    confidence = np.clip(rng.random((exits + 1, n)) * 0.8 + 0.2 * right, 0, 1).astype(np.float32)
    return ExitOutputs(confidence, prediction, labels)


def _random_thresholds(rng, outputs, k):
    """k vectors mixing uniform values, 1.0, 0.0 and exact sample confidences (tie: >= passes)."""
    e = outputs.num_exits
    vectors = rng.random((k, e))
    vectors[rng.random((k, e)) < 0.2] = 1.0
    vectors[rng.random((k, e)) < 0.05] = 0.0
    ties = rng.random((k, e)) < 0.15
    cols = rng.integers(0, outputs.num_samples, (k, e))
    exact = outputs.confidence[np.arange(e)[None, :].repeat(k, 0), cols].astype(np.float64)
    vectors[ties] = exact[ties]
    return vectors


# --------------------------------------------------------------------------- confidences
def test_confidences_on_hand_made_logits():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    logits = torch.log(p) + 7.0  # softmax is shift-invariant
    torch.testing.assert_close(torch_confidence(logits, "margin"), torch.tensor([0.2, 0.4]))
    torch.testing.assert_close(torch_confidence(logits, "max_prob"), torch.tensor([0.5, 0.6]))
    entropy = [-(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)),
               -(2 * 0.2 * math.log(0.2) + 0.6 * math.log(0.6))]
    torch.testing.assert_close(torch_confidence(logits, "entropy"),
                               torch.tensor([1 - h / math.log(3) for h in entropy]))
    assert torch_confidence(logits).tolist() == pytest.approx([0.2, 0.4], abs=1e-6)  # default margin


def test_confidence_of_uniform_and_of_certain_logits():
    uniform = torch.zeros(3, 4)
    assert torch_confidence(uniform, "margin").tolist() == [0.0] * 3
    assert torch_confidence(uniform, "max_prob").tolist() == pytest.approx([0.25] * 3)
    assert torch_confidence(uniform, "entropy").tolist() == pytest.approx([0.0] * 3, abs=1e-6)
    certain = torch.tensor([[0.0, 100.0, 0.0, 0.0]])
    for measure in ("margin", "max_prob", "entropy"):
        assert float(torch_confidence(certain, measure)) == pytest.approx(1.0, abs=1e-6)
    tie = torch.tensor([[5.0, 5.0, -50.0]])  # two classes equally likely: margin 0, max_prob 0.5
    assert float(torch_confidence(tie, "margin")) == pytest.approx(0.0, abs=1e-6)
    assert float(torch_confidence(tie, "max_prob")) == pytest.approx(0.5)


def test_unknown_confidence_measure():
    with pytest.raises(ValueError, match=r"confidence='margn' is not one of \('margin', 'max_prob', 'entropy'\)"):
        torch_confidence(torch.zeros(1, 3), "margn")


# --------------------------------------------------------------------------- simulation
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simulate_equals_a_per_sample_loop(seed):
    outputs = _outputs(seed)
    rng = np.random.default_rng(100 + seed)
    for th in _random_thresholds(rng, outputs, 20):
        idx, acc, util, avg = loop_simulate(outputs, list(th), COSTS)
        sim = simulate(outputs, th, COSTS)
        assert sim.exit_index.tolist() == idx
        assert np.array_equal(exit_index(outputs, th), sim.exit_index)
        assert sim.accuracy == pytest.approx(acc, abs=1e-9)
        np.testing.assert_allclose(sim.utilization, util, atol=1e-12)
        assert sim.avg_cost == pytest.approx(avg, rel=1e-12)
        np.testing.assert_allclose(sim.costs, loop_costs(COSTS, th), rtol=1e-12)
        for j in range(4):
            taken = [s for s in range(outputs.num_samples) if idx[s] == j]
            if taken:
                right = sum(outputs.prediction[j, s] == outputs.labels[s] for s in taken)
                assert sim.taken_accuracy[j] == pytest.approx(100.0 * right / len(taken))
            else:
                assert math.isnan(sim.taken_accuracy[j])
        assert sim.thresholds == [float(t) for t in th]


def test_simulate_edge_thresholds():
    outputs = _outputs()
    off = simulate(outputs, [1.0, 1.0, 1.0], COSTS)
    assert np.all(off.exit_index == 3)
    assert off.accuracy == pytest.approx(100.0 * np.mean(outputs.prediction[3] == outputs.labels))
    assert off.avg_cost == pytest.approx(COSTS.static_cost)
    first = simulate(outputs, [0.0, 0.5, 0.5], COSTS)
    assert np.all(first.exit_index == 0)
    assert first.avg_cost == pytest.approx(1.2)
    assert first.utilization.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_simulate_rejects_mismatched_inputs():
    outputs = _outputs()
    with pytest.raises(ValueError, match="thresholds has 2 values but the network has 3 exits"):
        simulate(outputs, [0.5, 0.5], COSTS)
    with pytest.raises(ValueError, match="costs describe 2 exits but the outputs have 3"):
        simulate(outputs, [0.5] * 3, ExitCosts([1.0, 2.0, 3.0], [0.1, 0.1]))
    with pytest.raises(ValueError, match=r"threshold_vectors must have shape \(K, 3\)"):
        simulate_many(outputs, np.zeros((4, 2)), COSTS)


@pytest.mark.parametrize("chunk_elements", [None, 3 * 300 * 7], ids=["default", "small-chunks"])
def test_simulate_many_equals_the_loop(monkeypatch, chunk_elements):
    """Both counting paths: joint histograms of threshold levels (default for grids) and,
    when those would be too big, the per-sample walk in chunks of vectors."""
    import aebnas.exit_policy as policy

    if chunk_elements is not None:
        monkeypatch.setattr(policy, "_CHUNK_ELEMENTS", chunk_elements)  # 7 vectors per chunk
    outputs = _outputs(seed=5, n=300)
    vectors = _random_thresholds(np.random.default_rng(7), outputs, 60)
    acc, avg, util = simulate_many(outputs, vectors, COSTS)
    assert acc.shape == avg.shape == (60,) and util.shape == (60, 4)
    for k, th in enumerate(vectors):
        _, loop_acc, loop_util, loop_avg = loop_simulate(outputs, list(th), COSTS)
        assert acc[k] == pytest.approx(loop_acc, abs=1e-9)
        assert avg[k] == pytest.approx(loop_avg, rel=1e-12)
        np.testing.assert_allclose(util[k], loop_util, atol=1e-12)


def test_simulate_many_on_the_paper_grid_equals_simulate():
    outputs = _outputs(seed=6, n=500)
    grid = threshold_grid(3)
    acc, avg, util = simulate_many(outputs, grid, COSTS)
    for k in range(0, len(grid), 17):
        sim = simulate(outputs, grid[k], COSTS)
        assert acc[k] == pytest.approx(sim.accuracy, abs=1e-9)
        assert avg[k] == pytest.approx(sim.avg_cost, rel=1e-12)
        np.testing.assert_allclose(util[k], sim.utilization, atol=1e-12)


# --------------------------------------------------------------------------- tuning
def test_threshold_grid_is_the_product_with_rounding():
    assert PAPER_GRID == (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)
    grid = threshold_grid(2, (0.5, 0.97))
    assert grid.tolist() == [[0.5, 0.5], [0.5, 1.0], [1.0, 0.5], [1.0, 1.0]]
    assert threshold_grid(3).tolist() == [list(v) for v in itertools.product(PAPER_GRID, repeat=3)]
    assert threshold_grid(0).shape == (1, 0)
    for bad in [(0.5, -0.1), (0.5, 1.5), (), (0.5, float("nan"))]:
        with pytest.raises(ValueError, match="must be non-empty values in"):
            threshold_grid(2, bad)


def test_threshold_score_formula():
    assert threshold_score(80.0, 12.0, 10.0) == pytest.approx(80.0 - 0.1 * 100 * 2 / 10)
    assert threshold_score(80.0, 8.0, 10.0, lam=0.5) == pytest.approx(80.0 - 0.5 * 100 * 2 / 10)
    with pytest.raises(ValueError, match="target=0"):
        threshold_score(80.0, 8.0, 0.0)


@pytest.mark.parametrize("target", [2.0, 4.0, 7.0])
def test_tune_thresholds_finds_the_brute_force_optimum(target):
    outputs = _outputs(seed=11, n=250)
    tuned = tune_thresholds(outputs, COSTS, target=target)
    ref = loop_tune_thresholds(outputs, COSTS, target)
    th, score = ref.thresholds, ref.score
    assert tuned.thresholds == th
    assert tuned.score == pytest.approx(score, abs=1e-9)
    assert tuned.result.thresholds == th
    assert tuned.score == pytest.approx(threshold_score(tuned.result.accuracy, tuned.result.avg_cost, target))


def test_tune_thresholds_with_a_budget_matches_brute_force():
    outputs = _outputs(seed=12, n=250)
    # The unconstrained optimum for a high target is expensive; the budget must exclude it.
    free = tune_thresholds(outputs, COSTS, target=8.0)
    budget = free.result.avg_cost * 0.6
    tuned = tune_thresholds(outputs, COSTS, target=8.0, budget=budget)
    ref = loop_tune_thresholds(outputs, COSTS, 8.0, budget_macs=budget)
    th, score = ref.thresholds, ref.score
    assert tuned.thresholds == th and tuned.score == pytest.approx(score, abs=1e-9)
    assert tuned.result.avg_cost <= budget < free.result.avg_cost
    # No vector fits: the cheapest vector is returned.
    impossible = tune_thresholds(outputs, COSTS, target=8.0, budget=0.1)
    ref = loop_tune_thresholds(outputs, COSTS, 8.0, budget_macs=0.1)
    th, avg = ref.thresholds, ref.avg_macs  # aebnas.reference keeps its MMACs names
    assert impossible.thresholds == th and impossible.result.avg_cost == pytest.approx(avg)
    assert avg == pytest.approx(simulate_many(outputs, threshold_grid(3), COSTS)[1].min())


def test_tune_thresholds_on_a_custom_grid():
    outputs = _outputs(seed=13, exits=4, n=150)
    costs = ExitCosts(backbone=[1, 2, 3, 4, 8], branch=[0.1, 0.1, 0.2, 0.2])
    grid = (0.3, 0.6, 0.9, 1.0)
    tuned = tune_thresholds(outputs, costs, target=3.0, grid=grid, lam=0.3)
    ref = loop_tune_thresholds(outputs, costs, 3.0, grid=grid, lam=0.3)
    th, score = ref.thresholds, ref.score
    assert tuned.thresholds == th and tuned.score == pytest.approx(score, abs=1e-9)


def test_oracle_equals_a_loop():
    outputs = _outputs(seed=21, n=300)
    e = outputs.num_exits
    c = loop_costs(COSTS, [0.5] * e)  # all exits active
    idx, right = [], 0
    for s in range(outputs.num_samples):
        ok = [j for j in range(e + 1) if outputs.prediction[j, s] == outputs.labels[s]]
        idx.append(ok[0] if ok else e)
        right += bool(ok)
    result = oracle(outputs, COSTS)
    assert result.accuracy == pytest.approx(100.0 * right / outputs.num_samples)
    assert result.avg_cost == pytest.approx(sum(c[j] for j in idx) / outputs.num_samples)
    np.testing.assert_allclose(result.utilization, [idx.count(j) / outputs.num_samples for j in range(e + 1)])
    # An upper bound on accuracy for any thresholds.
    assert result.accuracy >= tune_thresholds(outputs, COSTS, target=4.0).result.accuracy


# --------------------------------------------------------------------------- artifacts
def test_exit_outputs_validate_shapes():
    with pytest.raises(ValueError, match="must both be"):
        ExitOutputs(np.zeros((3, 5)), np.zeros((3, 4)), np.zeros(5))
    with pytest.raises(ValueError, match="labels"):
        ExitOutputs(np.zeros((3, 5)), np.zeros((3, 5)), np.zeros(4))
    out = _outputs()
    assert out.num_exits == 3 and out.num_samples == 400
    np.testing.assert_allclose(out.exit_accuracy(), 100 * (out.prediction == out.labels).mean(axis=1))


def test_save_and_load_exit_outputs_round_trip(tmp_path):
    splits = {"val": _outputs(seed=1, n=50), "test": _outputs(seed=2, n=70)}
    path = tmp_path / "exit_outputs.npz"
    save_exit_outputs(path, splits, COSTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exit_outputs.npz"]  # no temp file left
    loaded, costs = load_exit_outputs(path)
    assert sorted(loaded) == ["test", "val"]
    for name, out in splits.items():
        got = loaded[name]
        for field in ("confidence", "prediction", "labels"):
            assert getattr(got, field).dtype == getattr(out, field).dtype
            np.testing.assert_array_equal(getattr(got, field), getattr(out, field))
    np.testing.assert_array_equal(costs.backbone, COSTS.backbone)
    np.testing.assert_array_equal(costs.branch, COSTS.branch)
    with np.load(path) as z:
        np.testing.assert_array_equal(z["costs_all_active"], COSTS.cumulative())
    # Overwriting is allowed (a trial rewrites it every epoch).
    save_exit_outputs(path, {"val": splits["val"]}, COSTS)
    assert sorted(load_exit_outputs(path)[0]) == ["val"]


# --------------------------------------------------------------------------- network ⇄ simulation
def test_infer_and_simulate_agree_sample_by_sample():
    torch.manual_seed(0)
    arch = uniform_arch(2, 3, 3, exits=(1, 2, 3, 4), exit_module=ExitModuleConfig(8, 3, 2, 1),
                        width_mult=0.25, resolution=32)
    net = EarlyExitNet(arch).eval()
    x, y = torch.randn(96, 3, 32, 32), torch.randint(0, 10, (96,))
    # Random weights are enough for a consistency check, but the fresh network is barely
    # confident (margins ~1e-5): measured BN statistics and larger classifier weights
    # spread the confidences over [0, 1].
    make_confident(net, x)
    outputs = evaluate(net, [(x[:50], y[:50]), (x[50:], y[50:])])

    # Thresholds between two observed confidences of the samples still there, so that about
    # a third of them leave at exits 0, 2 and 3; exit 1 is off.
    remaining = np.ones(96, dtype=bool)
    th = []
    for j in range(4):
        if j == 1:
            th.append(1.0)
            continue
        values = np.sort(outputs.confidence[j][remaining].astype(np.float64))
        k = int(len(values) * 2 / 3)
        assert values[k] - values[k - 1] > 1e-6  # no sample sits on a threshold
        th.append(float((values[k] + values[k - 1]) / 2))
        remaining &= outputs.confidence[j] < th[-1]

    sim = simulate(outputs, th, exit_costs(arch))
    logits, idx = net.infer(x, th)
    assert idx.tolist() == sim.exit_index.tolist()
    assert np.array_equal(logits.argmax(1).numpy(), outputs.prediction[sim.exit_index, np.arange(96)])
    assert set(sim.exit_index.tolist()) == {0, 2, 3, 4}  # every active path is taken
    assert sim.accuracy == pytest.approx(100.0 * float((logits.argmax(1) == y).float().mean()))


def test_threshold_equal_to_a_float32_confidence_matches_infer():
    """A confidence of exactly float32(0.7) passes threshold 0.7 in infer (float32 compare): same here."""
    import torch

    c = np.float32(0.7)
    assert bool(torch.tensor([c]) >= 0.7)  # what infer does
    outputs = ExitOutputs(confidence=np.array([[c], [0.0]], dtype=np.float32),
                          prediction=np.array([[1], [0]]), labels=np.array([1]))
    costs = ExitCosts(backbone=np.array([1.0, 2.0]), branch=np.array([0.5]))
    assert exit_index(outputs, [0.7]).tolist() == [0]
    acc, avg, util = simulate_many(outputs, np.array([[0.7], [0.85]]), costs)
    assert util[:, 0].tolist() == [1.0, 0.0] and acc.tolist() == [100.0, 0.0]
    assert simulate(outputs, [0.7], costs).exit_index.tolist() == [0]


def test_a_network_without_exits_sends_everything_to_the_final_classifier():
    """The static space: no exit, one threshold vector (the empty one), every sample at the final."""
    outputs = ExitOutputs(confidence=np.zeros((1, 5), dtype=np.float32),
                          prediction=np.array([[1, 0, 1, 1, 0]]), labels=np.array([1, 1, 1, 0, 0]))
    costs = ExitCosts(backbone=np.array([3.0]), branch=np.array([]))
    assert exit_index(outputs, []).tolist() == [0] * 5
    tuned = tune_thresholds(outputs, costs, target=3.0)
    assert tuned.thresholds == [] and tuned.result.accuracy == 60.0 and tuned.result.avg_cost == 3.0
    assert tuned.score == 60.0


def test_results_carry_the_unit_of_their_costs(tmp_path):
    from aebnas.exit_policy import MS

    outputs = _outputs(seed=3, n=50)
    ms = ExitCosts(backbone=COSTS.backbone, branch=COSTS.branch, unit=MS)
    sim = simulate(outputs, [0.5] * outputs.num_exits, ms)
    assert sim.unit == MS and sim.avg_cost == simulate(outputs, [0.5] * outputs.num_exits, COSTS).avg_cost
    assert oracle(outputs, ms).unit == MS and oracle(outputs, COSTS).unit == "MMACs"
    with pytest.raises(ValueError, match="holds costs in MMACs, got ms"):  # its keys say MACs
        save_exit_outputs(tmp_path / "x.npz", {"val": outputs}, ms)


def test_one_threshold_check_for_numpy_torchscript_and_onnx():
    from aebnas import exit_policy, onnx_runner

    assert exit_policy.validate_thresholds is onnx_runner.validate_thresholds
    assert onnx_runner.validate_thresholds((1, 0.5), 2) == [1.0, 0.5]
    for bad, message in (([0.5], "thresholds has 1 values but the network has 2 exits"),
                         ([0.5, 1.5], r"thresholds\[1\]=1.5 is not in \[0, 1\]"),
                         ([math.nan, 0.5], r"thresholds\[0\]=nan is not in \[0, 1\]")):
        with pytest.raises(ValueError, match=message):
            onnx_runner.validate_thresholds(bad, 2)
