"""Which trial is best: the one rule ``aebnas retrain --best`` and ``analysis`` share.

Trials that trained all their epochs rank before trials stopped early by ASHA or not yet
finished (a score after one epoch is not comparable with a finished one), and errored
trials come last; within a tier the higher validation score wins; a trial without a score
ranks after every trial with one. Ties keep the given order.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")

_TIER = {"finished": 0, "errored": 2}  # every other status (stopped, running, pending): 1


def rank_key(status: str, score: float | None) -> tuple[bool, int, float]:
    """Sort key of one trial (smaller is better) from its status and validation score."""
    unknown = score is None or math.isnan(score)
    return unknown, _TIER.get(status, 1), math.inf if unknown else -float(score)


def rank(trials: Iterable[T], status: Callable[[T], str], score: Callable[[T], float | None]) -> list[T]:
    """``trials`` best first by :func:`rank_key`."""
    return sorted(trials, key=lambda t: rank_key(status(t), score(t)))
