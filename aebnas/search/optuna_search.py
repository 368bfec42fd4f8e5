"""Optuna's TPE and NSGA-II as Ray Tune searchers (the ``aebnas[optuna]`` extra).

Imported only when ``search_alg`` is ``tpe`` or ``nsga2``: Optuna is optional.

Ray Tune pickles its searcher twice: with the ``TuneConfig`` when the ``Tuner`` starts (so a run
can be restored) and in ``OptunaSearch.save`` at every searcher checkpoint. Optuna 5.1 gave its
genetic samplers (``BaseGASampler``, hence ``NSGAIISampler``) a ``threading.Lock`` attribute and no
``__getstate__``, so the sampler no longer pickles ("cannot pickle '_thread.lock' object"). The
samplers here drop their locks when pickled and make new ones when unpickled, as Optuna's own
``InMemoryStorage`` does with its lock; on Optuna < 5.1 they hold no lock and pickle unchanged.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import optuna
from ray.tune.search.optuna import OptunaSearch

from ..errors import ExperimentError

# The releases the suite ran with (docs/design.md, "Tested versions"); older ones lack what
# OptunaSearch's define-by-run space and the samplers' ``seed`` need.
MIN_OPTUNA = (3, 4)
_LOCK_TYPES = {type(threading.Lock()): threading.Lock, type(threading.RLock()): threading.RLock}


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_optuna_version(installed: str = optuna.__version__) -> None:
    """Raise :class:`ExperimentError` naming the installed Optuna when it is older than supported."""
    if _version(installed) < MIN_OPTUNA:
        raise ExperimentError(
            f"optuna {installed} is installed, but --search-alg tpe/nsga2 needs optuna >= "
            f"{'.'.join(map(str, MIN_OPTUNA))}: pip install -U 'aebnas[optuna]'")


class _PicklableLocks:
    """Mixin: pickle a sampler without its thread locks and give the copy fresh ones."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        locks = {name: _LOCK_TYPES[type(value)] for name, value in state.items() if type(value) in _LOCK_TYPES}
        for name in locks:
            del state[name]
        state["_aebnas_locks"] = locks  # name → threading.Lock or threading.RLock (picklable by reference)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        locks = state.pop("_aebnas_locks", {})
        self.__dict__.update(state)
        for name, make_lock in locks.items():
            setattr(self, name, make_lock())


class NSGAIISampler(_PicklableLocks, optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, picklable on every supported Optuna release."""


class TPESampler(_PicklableLocks, optuna.samplers.TPESampler):
    """Optuna's TPE sampler, picklable on every supported Optuna release."""


def optuna_search(search_alg: str, space: Callable[[Any], Any], seed: int) -> OptunaSearch:
    """Ray Tune's ``OptunaSearch`` for ``tpe`` (on ``score``) or ``nsga2`` (on accuracy and MACs)."""
    check_optuna_version()
    if search_alg == "tpe":
        return OptunaSearch(space=space, metric="score", mode="max", sampler=TPESampler(seed=seed))
    if search_alg == "nsga2":
        # NSGA-II optimises accuracy and average MACs together (the paper's two objectives).
        return OptunaSearch(space=space, metric=["accuracy", "avg_macs"], mode=["max", "min"],
                            sampler=NSGAIISampler(seed=seed))
    raise ValueError(f"search_alg={search_alg!r} is not an Optuna searcher (tpe, nsga2)")
