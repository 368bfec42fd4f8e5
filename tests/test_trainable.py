"""The trial's contract (docs/design.md): metrics every epoch, artifacts on disk, consistent with simulate."""

import json

import numpy as np
import pytest

from aebnas.config import ArchConfig, is_arch_key
from aebnas.cost.macs import exit_costs
from aebnas.exit_policy import load_exit_outputs, simulate, tune_thresholds
from aebnas.search.trainable import parse_trial_config

CONTRACT = ("score", "accuracy", "avg_macs", "final_accuracy", "static_macs", "thresholds", "epoch", "epochs")


def epochs_of(trial_dir):
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]


@pytest.fixture(scope="module")
def trials(tiny_search):
    path, results, exp = tiny_search
    dirs = sorted(p for p in path.iterdir() if p.name.startswith("trial_"))
    assert len(dirs) == exp.num_samples == 4 and results.num_errors == 0
    return dirs, exp


def test_every_epoch_reports_the_contract(trials):
    dirs, exp = trials
    for d in dirs:
        history = epochs_of(d)
        assert [h["epoch"] for h in history] == [1, 2] and history[-1]["epochs"] == exp.epochs
        arch = ArchConfig.from_flat({k: v for k, v in history[0]["config"].items() if is_arch_key(k)})
        for h in history:
            for key in CONTRACT:
                assert key in h, f"{d.name} epoch {h['epoch']} lacks {key}"
            assert len(h["thresholds"]) == arch.num_exits
            for pos in arch.exit_positions:
                for key in ("accuracy", "util", "macs"):
                    assert f"exit{pos}_{key}" in h
            assert abs(sum(h[f"exit{p}_util"] for p in arch.exit_positions) + h["final_util"] - 1) < 1e-9
        assert "test_accuracy" in history[-1] and "test_accuracy" not in history[0]


def test_artifacts_are_on_disk(trials):
    dirs, _ = trials
    for d in dirs:
        assert sorted(p.name for p in d.glob("checkpoint_*")) == ["checkpoint_000000", "checkpoint_000001"]
        assert (d / "checkpoint_000001" / "checkpoint.pt").is_file()
        arch_json = json.loads((d / "arch.json").read_text())
        arch, settings = parse_trial_config(arch_json)
        assert settings.target_macs == 1.0 and arch.width_mult == 0.25
        splits, costs = load_exit_outputs(d / "exit_outputs.npz")
        assert set(splits) == {"val", "test"} and splits["val"].num_samples == 100
        assert splits["test"].num_samples == 200 and costs.num_exits == arch.num_exits
        np.testing.assert_allclose(costs.backbone, exit_costs(arch).backbone)


def test_reported_metrics_equal_simulate_on_saved_outputs(trials):
    dirs, exp = trials
    for d in dirs:
        last = epochs_of(d)[-1]
        splits, costs = load_exit_outputs(d / "exit_outputs.npz")
        val = simulate(splits["val"], last["thresholds"], costs)
        assert val.accuracy == pytest.approx(last["accuracy"])
        assert val.avg_cost == pytest.approx(last["avg_macs"])
        # avg MACs lie between the cheapest and the costliest place an image can leave (the exits on, and the
        # final); not "from the first exit's cost": a branch can cost more than the backbone to the next exit
        reachable = [c for c, t in zip(val.costs, [*last["thresholds"], 0.0]) if t < 1.0]
        assert min(reachable) - 1e-9 <= last["avg_macs"] <= max(reachable) + 1e-9
        # the thresholds are the validation optimum …
        tuned = tune_thresholds(splits["val"], costs, exp.target_macs)
        assert tuned.thresholds == last["thresholds"] and tuned.score == pytest.approx(last["score"])
        # … and the test metrics use them (never tuned on test)
        test = simulate(splits["test"], last["thresholds"], costs)
        assert test.accuracy == pytest.approx(last["test_accuracy"])
        assert test.avg_cost == pytest.approx(last["test_avg_macs"])
        assert splits["test"].exit_accuracy()[-1] == pytest.approx(last["test_final_accuracy"])


def test_bad_trial_config_names_the_key():
    with pytest.raises(ValueError, match="unknown trial config key"):
        parse_trial_config({"stage1_depth": 2, "learning_rate": 0.1})
    with pytest.raises(ValueError, match="target_macs=0"):
        parse_trial_config({"target_macs": 0, **_min_arch()})


def _min_arch():
    from aebnas.config import smallest_arch

    return smallest_arch().to_flat()


def test_a_trial_without_a_gpu_runs_on_cpu(ray_local):
    """device=auto inside Ray: CUDA only when Ray gave the task a GPU (Ray 2.60 does not hide a
    node's GPUs from tasks that reserved none); explicit devices are kept."""
    from aebnas.search.trainable import _trial_device

    @ray_local.remote(num_gpus=0)
    def devices():
        return _trial_device("auto"), _trial_device("cuda:1")

    assert ray_local.get(devices.remote()) == ("cpu", "cuda:1")
