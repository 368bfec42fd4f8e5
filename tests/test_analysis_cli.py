"""`python -m analysis` / `aebnas analyze`: every output file on a real search; bad input → exit code 2."""

import json
import runpy
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from aebnas.cli import main as aebnas_main
from aebnas.settings import parse_trial_config
from analysis.__main__ import best_trial, main
from analysis.pareto import hypervolume, pareto_front
from analysis.results import load_experiment

TABLES = ("trials.csv", "pareto.csv", "sweep_front.csv", "summary.md")
FIGURES = ("pareto", "threshold_sweep", "learning_curves")


def test_writes_every_file(tiny_search, tmp_path, capsys):
    path, _, exp = tiny_search
    assert main([str(path), "--out", str(tmp_path), "--reference-point", "0,2"]) == 0
    assert "analysing 4 trials" in capsys.readouterr().out
    res = load_experiment(path)
    for name in TABLES:
        assert (tmp_path / name).stat().st_size > 0, name
    for stem in FIGURES:
        for ext in ("png", "svg"):
            assert (tmp_path / f"{stem}.{ext}").stat().st_size > 1000, (stem, ext)
    assert len(list(tmp_path.glob("exits_*.png"))) == 1 and not (tmp_path / "experiments_pareto.png").exists()

    trials = pd.read_csv(tmp_path / "trials.csv")
    assert len(trials) == 4 and set(trials["status"]) == {"finished"}
    # At the experiment's own target the re-tuned columns equal what the trials reported.
    assert trials["at_target_accuracy"].tolist() == pytest.approx(trials["accuracy"].tolist())
    assert (trials["at_target_target_macs"] == exp.target_macs).all()
    front = pd.read_csv(tmp_path / "pareto.csv")
    assert set(front["trial_id"]) == set(pareto_front(res.trials)["trial_id"])
    best = res.trials.sort_values("score", ascending=False).iloc[0]
    summary = (tmp_path / "summary.md").read_text()
    hv = hypervolume(res.trials["accuracy"], res.trials["avg_macs"], (0, 2))
    assert f"**{best['trial_id']}**" in summary and f"{hv:.2f} %·MMACs" in summary
    assert "(0 %, 2 MMACs)" in summary and f"exits_{best['trial_id']}.png" in [p.name for p in tmp_path.iterdir()]
    # the best trial's exits name their branches, as `aebnas info` does
    arch = parse_trial_config(json.loads((Path(best["trial_dir"]) / "arch.json").read_text()))[0]
    for e in arch.exits:
        assert f"| exit{e.position} | {e.describe()} |" in summary
    assert "| final | head |" in summary


def test_aebnas_analyze_with_another_target_and_two_experiments(tiny_search, tmp_path):
    path = tiny_search[0]
    twin = tmp_path / "twin"
    shutil.copytree(path, twin)
    trial = load_experiment(path).trials["trial_id"].iloc[-1]
    out = tmp_path / "out"
    assert aebnas_main(["analyze", str(path), str(twin), "--out", str(out), "--target-macs", "1.4",
                        "--trial", f"twin/trial_{trial}"]) == 0
    assert (out / "experiments_pareto.png").exists() and (out / f"exits_{trial}.svg").exists()
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 8 and trials["experiment"].nunique() == 2
    assert (trials["at_target_target_macs"] == 1.4).all()
    assert "target of **1.4 MMACs**" in (out / "summary.md").read_text()


def _run(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_bad_inputs_exit_2_with_one_message(tiny_search, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run([tmp_path / "nope", "--out", out], capsys)
    assert code == 2 and "no such directory" in err and err.count("\n") == 1

    (tmp_path / "plain").mkdir()
    code, err = _run([tmp_path / "plain", "--out", out], capsys)
    assert code == 2 and "not an experiment directory" in err

    empty = tmp_path / "empty"  # a search killed before any trial reported
    empty.mkdir()
    shutil.copy(tiny_search[0] / "aebnas_experiment.json", empty)
    code, err = _run([empty, "--out", out], capsys)
    assert code == 2 and "no trial with results" in err

    code, err = _run([tiny_search[0], "--out", out, "--trial", "nobody"], capsys)
    assert code == 2 and "--trial: no trial 'nobody'; trials are" in err

    code, err = _run([tiny_search[0], "--out", out, "--target-macs", "-1"], capsys)
    assert code == 2 and "--target-macs=-1.0 must be a positive number" in err

    with pytest.raises(SystemExit) as exc:
        main([str(tiny_search[0]), "--out", str(out), "--reference-point", "80"])
    assert exc.value.code == 2 and "ACC,MACS" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:'analysis.__main__' found in sys.modules")
def test_module_entry_point_reports_bad_input(tmp_path, monkeypatch, capsys):
    """`python -m analysis` (run in this interpreter: a new one would spend seconds importing torch)."""
    monkeypatch.setattr(sys, "argv", ["analysis", str(tmp_path / "missing"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("analysis", run_name="__main__")
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"analysis: error: {tmp_path / 'missing'}: no such directory"


def test_experiment_settings_give_the_default_target(tiny_search):
    settings = json.loads((tiny_search[0] / "aebnas_experiment.json").read_text())
    res = load_experiment(tiny_search[0])
    assert res.settings[tiny_search[0].name]["target_macs"] == settings["target_macs"] == tiny_search[2].target_macs


def test_best_trial_prefers_finished_then_unfinished_then_errored():
    points = pd.DataFrame({"trial_id": list("abcd"), "status": ["errored", "stopped", "finished", "finished"],
                           "score": [40.0, 35.0, 20.0, 30.0], "avg_macs": [5.0, 5.0, 6.0, 9.0]})
    assert best_trial(points)["trial_id"] == "d"
    assert best_trial(points, budget_macs=6.0)["trial_id"] == "c"  # d costs more than the budget
    assert best_trial(points[points["status"] != "finished"])["trial_id"] == "b"
    assert best_trial(points[points["status"] == "errored"])["trial_id"] == "a"
    assert best_trial(points, budget_macs=1.0)["trial_id"] == "d"  # nothing fits: the best of all
