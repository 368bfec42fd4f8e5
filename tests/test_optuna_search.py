"""aebnas.search.optuna_search: Optuna's samplers survive Ray Tune's pickling on every supported Optuna
release (5.1 added a thread lock to the GA samplers), and an unsupported release is named."""

import pickle
import threading

import pytest

optuna = pytest.importorskip("optuna")

from aebnas.search.optuna_search import NSGAIISampler, TPESampler, check_optuna_version, optuna_search  # noqa: E402
from aebnas.errors import ExperimentError  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _objective(trial):
    x = trial.suggest_int("x", 0, 20)
    y = trial.suggest_categorical("y", [1, 2, 3])
    return float(x), float(y * x % 7)


def _next_params(sampler, study_trials=12):
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.optimize(_objective, n_trials=study_trials)
    return [t.params for t in study.trials]


@pytest.mark.parametrize("make", [lambda: NSGAIISampler(seed=3, population_size=4), lambda: TPESampler(seed=3)])
def test_sampler_pickles_and_samples_like_the_original(make):
    sampler = make()
    copy = pickle.loads(pickle.dumps(sampler))
    for name, value in vars(sampler).items():
        if isinstance(value, type(threading.Lock())):
            # a fresh lock of the same kind, not the original one (which cannot cross processes)
            assert type(getattr(copy, name)) is type(value) and getattr(copy, name) is not value
    # the copy carries the sampler's state, its random generator included: same proposals
    assert _next_params(copy) == _next_params(make())


def test_sampler_still_pickles_after_use():
    sampler = NSGAIISampler(seed=0, population_size=4)
    first = _next_params(sampler, study_trials=9)  # three generations: the GA cache and its lock used
    assert len(first) == 9
    copy = pickle.loads(pickle.dumps(sampler))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=copy)
    study.optimize(_objective, n_trials=4)  # the copy's fresh lock works
    assert len(study.trials) == 4


def _space(trial):
    return {"x": trial.suggest_int("x", 0, 9)}


def test_ray_optuna_search_saves_and_restores(tmp_path):
    from ray import cloudpickle

    searcher = optuna_search("nsga2", _space, seed=1)
    cloudpickle.dumps(searcher)  # what Tuner does with its TuneConfig (Optuna 5.1 failed here)
    suggested = searcher.suggest("t1")
    assert 0 <= suggested["x"] <= 9
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = optuna_search("nsga2", _space, seed=1)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("t2") == searcher.suggest("t2")


def test_unsupported_optuna_is_named():
    with pytest.raises(ExperimentError, match=r"optuna 3\.3\.1 is installed.*needs optuna >= 3\.4"):
        check_optuna_version("3.3.1")
    check_optuna_version("3.4.0")
    check_optuna_version("5.1.0")
    check_optuna_version("5.2.0.dev0")
    with pytest.raises(ValueError, match="search_alg='random' is not an Optuna searcher"):
        optuna_search("random", lambda trial: {}, seed=0)
