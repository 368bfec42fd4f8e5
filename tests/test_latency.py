"""Tests for aebnas/cost/latency.py and ``aebnas latency profile``: the table covers every piece a
space can build (checked against every network of a small space), C_i in ms is the sum of
the table's pieces, a killed profile resumes, and bad input is refused with a clear error."""

import itertools
import json
import random

import numpy as np
import pytest

from aebnas.cli import main
from aebnas.config import EXIT_BRANCHES, ArchConfig, SpaceValues, random_arch, uniform_arch
from aebnas.cost.macs import count_macs, exit_costs
from aebnas.cost.latency import LatencyTable, covering_archs, space_pieces
from aebnas.deploy.latency_profile import ProfileRequest, profile

pytest.importorskip("onnxruntime")

# Two resolutions, two kernels, two exit-module choices: small enough to enumerate every network.
SMALL = SpaceValues(depths=(2, 3), kernels=(3, 5), expansions=(3,), resolutions=(32, 36), exit_positions=(1, 2, 3, 4),
                    exit_m1_resizes=(8,), exit_m2_resizes=(0, 8), exit_kernels=(3,), exit_expansions=(1, 2),
                    exit_pools=(0, 1))
KW = {"width_mult": 0.5, "num_classes": 10, "in_channels": 3}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("latency") / "table.json"
    lines = []
    profile(ProfileRequest(out=str(path), space=SMALL, warmup=1, repeats=3, calibration_networks=0, **KW),
            log=lines.append)
    return path, lines


def test_covering_archs_use_every_piece_of_the_space():
    """Every network drawn from the space meets only pieces of the covering set."""
    covered = set(space_pieces(covering_archs(SMALL, **KW)))
    rng = random.Random(0)
    for _ in range(300):
        arch = random_arch(SMALL, rng, branches=EXIT_BRANCHES, **KW)  # EDANAS's exits too
        assert set(space_pieces([arch])) <= covered, arch
    # a choice outside the space is a piece the cover lacks
    outside = uniform_arch(2, 7, 3, resolution=32, **KW)
    assert not set(space_pieces([outside])) <= covered


def test_profile_writes_every_piece_for_both_backends_with_the_machine(table):
    path, lines = table
    data = json.loads(path.read_text())
    pieces = space_pieces(covering_archs(SMALL, **KW))
    for backend in ("onnxruntime", "torch"):
        assert set(data["backends"][backend]) == set(pieces)
        assert all(v > 0 for v in data["backends"][backend].values())
    assert data["settings"]["threads"] == 1 and data["settings"]["batch"] == 1
    assert data["machine"]["cores"] >= 1 and "onnxruntime" in data["machine"]["versions"]
    assert data["unit"] == "ms" and data["statistic"] == "median" and data["date"]
    assert lines[0].startswith(f"latency profile: {len(pieces)} pieces × 2 backend(s)")
    assert any(ln.startswith("  [") and "ETA" in ln for ln in lines)  # progress


def test_latency_costs_are_sums_of_the_table_pieces(table, tmp_path):
    """A table whose every piece holds that piece's MMACs gives exactly the MMACs that ptflops
    counts on the whole network: the look-up adds each piece of a network as often as it occurs."""
    path, _ = table
    data = json.loads(path.read_text())
    pieces = space_pieces(covering_archs(SMALL, **KW))
    data["backends"]["onnxruntime"] = {pid: count_macs(p.build(), p.shape) for pid, p in pieces.items()}
    (tmp_path / "macs.json").write_text(json.dumps(data))
    as_macs = LatencyTable(tmp_path / "macs.json")
    measured = LatencyTable(path)
    rng = random.Random(1)
    for _ in range(20):
        arch = random_arch(SMALL, rng, **KW)
        expected = exit_costs(arch)  # ptflops on the whole network's segments
        got = as_macs.exit_costs(arch)
        np.testing.assert_allclose(got.backbone, expected.backbone, rtol=1e-9)
        np.testing.assert_allclose(got.branch, expected.branch, rtol=1e-9)
        ms = measured.exit_costs(arch)  # the measured table: C_i grows along the backbone
        assert np.all(np.diff(ms.backbone) > 0) and np.all(ms.branch > 0)


def test_profile_resumes_and_refuses_other_settings(tmp_path):
    path = tmp_path / "t.json"
    tiny = SpaceValues(depths=(2,), kernels=(3,), expansions=(3,), resolutions=(32,), exit_m1_resizes=(8,),
                       exit_m2_resizes=(0,), exit_kernels=(3,), exit_expansions=(1,), exit_pools=(0,))
    req = ProfileRequest(out=str(path), space=tiny, backends=("torch",), warmup=0, repeats=2, calibration_networks=0,
                         **KW)
    first = profile(req, log=lambda _: None)
    # a profile killed half way: drop half the pieces, as if they had not been measured yet
    data = json.loads(path.read_text())
    kept = dict(itertools.islice(data["backends"]["torch"].items(), len(data["backends"]["torch"]) // 2))
    data["backends"]["torch"] = kept
    path.write_text(json.dumps(data))
    lines = []
    second = profile(req, log=lines.append)
    assert f"{len(kept)} already in" in lines[0]
    assert set(second["backends"]["torch"]) == set(first["backends"]["torch"])
    assert all(second["backends"]["torch"][k] == v for k, v in kept.items())  # kept, not re-measured
    with pytest.raises(ValueError, match="other settings; choose another --out"):
        profile(ProfileRequest(out=str(path), space=tiny, backends=("torch",), warmup=0, repeats=3,
                               calibration_networks=0, **KW))


def test_profiling_a_finished_table_again_changes_nothing(tmp_path):
    path = tmp_path / "t.json"
    tiny = SpaceValues(depths=(2,), kernels=(3,), expansions=(3,), resolutions=(32,), exit_m1_resizes=(8,),
                       exit_m2_resizes=(0,), exit_kernels=(3,), exit_expansions=(1,), exit_pools=(0,))
    req = ProfileRequest(out=str(path), space=tiny, backends=("torch",), warmup=0, repeats=2, calibration_networks=2,
                         calibration_images=4, **KW)
    first = profile(req, log=lambda _: None)
    assert set(first["calibration"]) == {"torch"}
    lines = []
    again = profile(req, log=lines.append)
    assert not any("calibration" in line for line in lines)  # nothing measured or fitted again
    assert again["calibration"] == first["calibration"] and again["date"] == first["date"]
    assert json.loads(path.read_text()) == first
    # a piece missing (a kill while profiling): measured again, and its backend's calibration refitted
    data = json.loads(path.read_text())
    data["backends"]["torch"].pop(next(iter(data["backends"]["torch"])))
    path.write_text(json.dumps(data))
    lines = []
    profile(req, log=lines.append)
    assert "measuring 1 " in lines[0] and any("calibration torch [2/2]" in line for line in lines)


def test_latency_table_errors_name_the_problem(table, tmp_path):
    path, _ = table
    with pytest.raises(ValueError, match="does not exist"):
        LatencyTable(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="is not a latency table"):
        LatencyTable(tmp_path / "bad.json")
    lat = LatencyTable(path)
    with pytest.raises(ValueError, match="was profiled for width 0.5"):
        lat.exit_costs(uniform_arch(2, 3, 3, resolution=32, width_mult=1.0, num_classes=10, in_channels=3))
    with pytest.raises(ValueError, match="profiled for another space, width or resolution"):
        lat.exit_costs(uniform_arch(2, 3, 3, resolution=40, **KW))  # a resolution it did not profile
    with pytest.raises(ValueError, match="backends"):
        ProfileRequest(out="x.json", backends=("tflite",))


def test_latency_profile_cli(tmp_path, capsys):
    out = tmp_path / "cli.json"
    code = main(["latency", "profile", "--out", str(out), "--resolutions", "32", "--width-mult", "0.35",
                 "--backends", "torch", "--warmup", "0", "--repeats", "1", "--calibration-networks", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(out.read_text())
    assert data["settings"]["space"]["resolutions"] == [32] and data["settings"]["width_mult"] == 0.35
    arch = random_arch(SpaceValues(resolutions=(32,)), random.Random(0), width_mult=0.35, num_classes=10,
                       in_channels=3)
    assert isinstance(arch, ArchConfig)
    assert LatencyTable(out, "torch").exit_costs(arch).static_cost > 0  # every network of the space is covered
    assert main(["latency", "profile", "--out", str(out), "--threads", "0"]) == 2
    assert "threads=0 must be ≥ 1" in capsys.readouterr().err


# ----------------------------------------------------------------- --cost latency
@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    """A torch-backend table of the tiny search's space (conftest.tiny_experiment: width 0.25, 32 px)."""
    path = tmp_path_factory.mktemp("latency_search") / "table.json"
    profile(ProfileRequest(out=str(path), space=SpaceValues(resolutions=(32,)), width_mult=0.25, backends=("torch",),
                           warmup=1, repeats=3, calibration_networks=2, calibration_images=16), log=lambda _: None)
    return path


@pytest.fixture(scope="module")
def latency_search(ray_local, small_npz, tiny_table, tmp_path_factory):
    from aebnas.search.experiment import experiment_path
    from aebnas.search.tuner import run
    from conftest import tiny_experiment

    table = LatencyTable(tiny_table, "torch")
    target = 0.6 * table.exit_costs(uniform_arch(3, 5, 4, resolution=32, width_mult=0.25, num_classes=10,
                                                 in_channels=3)).static_cost
    exp = tiny_experiment(tmp_path_factory.mktemp("results"), small_npz, cost="latency", latency_table=str(tiny_table),
                          latency_backend="torch", target_ms=round(target, 4), num_samples=3, epochs=1)
    results = run(exp)
    assert results.num_errors == 0
    return exp, experiment_path(exp), results


def test_calibration_is_fitted_and_applied(tiny_table):
    """The tiny search's table was calibrated on 2 networks (exits off and on): LatencyTable adds the
    fitted overheads to the sums of the pieces, exactly as documented."""
    data = json.loads(tiny_table.read_text())
    cal = data["calibration"]["torch"]
    assert cal["networks"] == 2 and cal["scale"] > 0 and cal["per_exit_ms"] >= 0 and cal["per_image_ms"] >= 0
    table = LatencyTable(tiny_table, "torch")
    arch = random_arch(SpaceValues(resolutions=(32,)), random.Random(3), width_mult=0.25, num_classes=10,
                       in_channels=3)
    raw, costs = table.raw_exit_costs(arch), table.exit_costs(arch)
    np.testing.assert_allclose(costs.backbone, cal["scale"] * raw.backbone + cal["per_image_ms"])
    np.testing.assert_allclose(costs.branch, cal["scale"] * raw.branch + cal["per_exit_ms"])


def test_a_latency_search_tunes_thresholds_for_milliseconds(latency_search, tiny_table):
    """Every trial reports avg_ms beside avg_macs, and both are what its saved validation outputs give
    with the thresholds tune_thresholds picks for target_ms on the table's C_i."""
    from aebnas.exit_policy import load_exit_outputs, simulate, tune_thresholds
    from aebnas.settings import parse_trial_config

    exp, path, results = latency_search
    table = LatencyTable(tiny_table, "torch")
    assert len(results) == 3
    for result in results:
        m = result.metrics
        arch, settings = parse_trial_config(result.config)
        arch = arch.replace(num_classes=10, in_channels=3)
        assert m["target_ms"] == exp.target_ms and settings.target_ms == exp.target_ms
        splits, macs = load_exit_outputs(f"{result.path}/exit_outputs.npz")
        ms = table.exit_costs(arch)
        tuned = tune_thresholds(splits["val"], ms, exp.target_ms, settings.threshold_grid, settings.score_lambda)
        assert m["thresholds"] == pytest.approx(tuned.thresholds)
        assert m["score"] == pytest.approx(tuned.score)
        assert m["avg_ms"] == pytest.approx(tuned.result.avg_cost)  # SimResult's average is in the costs' unit
        assert m["static_ms"] == pytest.approx(ms.static_cost)
        assert m["avg_macs"] == pytest.approx(simulate(splits["val"], tuned.thresholds, macs).avg_cost)
        assert m["test_avg_ms"] == pytest.approx(simulate(splits["test"], tuned.thresholds, ms).avg_cost)
        for pos in arch.exit_positions:
            assert m[f"exit{pos}_ms"] > 0


def test_analysis_plots_accuracy_against_milliseconds(latency_search, tmp_path):
    from analysis.__main__ import main as analysis_main

    _, path, _ = latency_search
    assert analysis_main([str(path), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "pareto_latency.png").stat().st_size > 10_000


def test_latency_search_refuses_a_table_that_does_not_cover_the_space(small_npz, tmp_path, tiny_table):
    from aebnas.search.tuner import run
    from aebnas.errors import ExperimentError
    from conftest import tiny_experiment

    wrong_res = tiny_experiment(tmp_path / "r", small_npz, cost="latency", latency_table=str(tiny_table),
                                latency_backend="torch", target_ms=1.0, space_kwargs={"resolutions": (36,)})
    with pytest.raises(ExperimentError, match=r"lacks \d+ of the \d+ pieces this space can build.*--resolutions 36"):
        run(wrong_res)  # refused before Ray starts or any trial runs
    wrong_width = tiny_experiment(tmp_path / "w", small_npz, cost="latency", latency_table=str(tiny_table),
                                  latency_backend="torch", target_ms=1.0, width_mult=0.5)
    with pytest.raises(ExperimentError, match="was profiled for width 0.25"):
        run(wrong_width)
    no_ms = tiny_experiment(tmp_path / "m", small_npz, cost="latency", latency_table=str(tiny_table))
    with pytest.raises(ExperimentError, match="needs latency_table .* and target_ms"):
        run(no_ms)
    with pytest.raises(ExperimentError, match="no 'onnxruntime' figures|has no 'onnxruntime'"):
        run(tiny_experiment(tmp_path / "o", small_npz, cost="latency", latency_table=str(tiny_table), target_ms=1.0))
    with pytest.raises(ExperimentError, match="optimise MACs"):
        run(tiny_experiment(tmp_path / "s", small_npz, cost="latency", latency_table=str(tiny_table),
                            latency_backend="torch", target_ms=1.0, scheduler="moasha"))
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("trial_*"))


def test_nonnegative_fit_recovers_overheads_and_never_goes_negative():
    from aebnas.deploy.latency_profile import _nonnegative_fit

    rng = np.random.default_rng(0)
    x = np.c_[rng.uniform(1, 5, 12), rng.integers(0, 4, 12), np.ones(12)]
    np.testing.assert_allclose(_nonnegative_fit(x, x @ [1.3, 0.2, 0.05]), [1.3, 0.2, 0.05], atol=1e-9)
    # data that an unconstrained fit explains with a negative per-image overhead
    y = x @ [1.5, 0.1, 0.0] - 0.3
    coef = _nonnegative_fit(x, y)
    assert np.all(coef >= 0) and coef[0] > 0
    assert np.linalg.lstsq(x, y, rcond=None)[0][2] < 0
