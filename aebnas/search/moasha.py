"""Multi-objective ASHA: successive halving that promotes by Pareto rank, not by one scalar.

Ray Tune's ASHA compares trials on one metric (``score``, which folds accuracy and the MAC target
together with λ). ``MOASHA`` is the same asynchronous successive halving — rungs at
``grace_period · reduction_factor^k`` epochs, a trial decided when it reaches a rung, the first
trial at a rung always continues — but at a rung it ranks the trials recorded there on several
objectives, by default (validation accuracy ↑, average MACs ↓), as Syne Tune's MOASHA does
(Schmucker et al., 2021):

1. non-dominated sorting splits them into fronts (front 1: dominated by none, …);
2. inside a front, an ε-net order: first the point best on the first objective, then again and
   again the point farthest (in objectives scaled to [0, 1] over the rung) from those taken;
3. the concatenated order is inverted into a per-trial rank (a sorted order is not a rank:
   position ``i`` of the order holds the trial *of* rank ``i``);
4. the trial continues when its rank is among the top ``ceil(n / reduction_factor)`` of the
   ``n`` trials recorded at the rung (itself included).

So a trial that dominates every other at its rung always continues.
"""

from __future__ import annotations

import math
import pickle
from typing import Any, Sequence

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from .pareto import non_dominated_fronts

DEFAULT_OBJECTIVES = (("accuracy", "max"), ("avg_macs", "min"))


def epsilon_net_order(F: np.ndarray) -> np.ndarray:
    """An order of the rows of ``F`` (minimised, already scaled): the best on the first objective,
    then repeatedly the row farthest from every row taken so far."""
    n = len(F)
    order = [int(np.lexsort(F.T[::-1])[0])]
    distance = np.linalg.norm(F - F[order[0]], axis=1)
    while len(order) < n:
        distance[order] = -1.0
        nxt = int(np.argmax(distance))
        order.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(F - F[nxt], axis=1))
    return np.array(order, dtype=int)


def pareto_ranks(F: np.ndarray) -> np.ndarray:
    """Rank (0 = best) of every row of ``F`` (objectives, minimised): front by front, ε-net order inside
    a front. NaN counts as the worst value of its objective."""
    F = np.asarray(F, dtype=float)
    if F.ndim != 2 or not len(F):
        raise ValueError(f"pareto_ranks needs a non-empty (trials, objectives) array, got shape {F.shape}")
    F = np.where(np.isnan(F), np.inf, F)
    finite = np.where(np.isinf(F), np.nan, F)
    low, high = np.nanmin(finite, axis=0), np.nanmax(finite, axis=0)
    low, high = np.nan_to_num(low), np.nan_to_num(high)
    span = np.where(high > low, high - low, 1.0)
    scaled = np.where(np.isinf(F), 2.0, (F - low) / span)
    order = np.concatenate([front[epsilon_net_order(scaled[front])] for front in non_dominated_fronts(F)])
    ranks = np.empty(len(F), dtype=int)
    ranks[order] = np.arange(len(F))  # invert the permutation: order[i] is the row of rank i
    return ranks


class MOASHA(FIFOScheduler):
    """Asynchronous successive halving on several objectives (see the module docstring).

    ``objectives``: (metric, "max" | "min") pairs, default (accuracy, max), (avg_macs, min).
    ``time_attr``, ``max_t``, ``grace_period``, ``reduction_factor``: as Ray Tune's ASHA
    (``max_t`` ends every trial).
    """

    def __init__(self, objectives: Sequence[tuple[str, str]] = DEFAULT_OBJECTIVES, *,
                 time_attr: str = "training_iteration", max_t: int = 100, grace_period: int = 1,
                 reduction_factor: float = 2) -> None:
        super().__init__()
        if len(objectives) < 2:
            raise ValueError("MOASHA needs at least two objectives; with one, use ASHA")
        for metric, mode in objectives:
            if mode not in ("max", "min"):
                raise ValueError(f"objective {metric!r}: mode {mode!r} is not 'max' or 'min'")
        if not (max_t > 0 and 0 < grace_period <= max_t and reduction_factor > 1):
            raise ValueError(f"need 0 < grace_period ({grace_period}) ≤ max_t ({max_t}) and reduction_factor "
                             f"({reduction_factor}) > 1")
        self.objectives = tuple((str(m), str(d)) for m, d in objectives)
        self.time_attr, self.max_t = time_attr, max_t
        self.grace_period, self.reduction_factor = grace_period, reduction_factor
        rungs = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
        self.milestones = [grace_period * reduction_factor ** k for k in range(rungs)]
        self.recorded: dict[float, dict[str, np.ndarray]] = {m: {} for m in self.milestones}
        self.num_stopped = 0

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # ranks on its own objectives; TuneConfig's metric (score) stays the searcher's

    def _point(self, result: dict[str, Any]) -> np.ndarray | None:
        if any(m not in result for m, _ in self.objectives):
            return None
        return np.array([-float(result[m]) if d == "max" else float(result[m]) for m, d in self.objectives])

    def decide(self, trial_id: str, t: float, point: np.ndarray) -> str:
        """Record ``point`` at the highest rung ``t`` reached that the trial has not been ranked at, and
        say whether it continues (CONTINUE when no new rung was reached)."""
        for milestone in reversed(self.milestones):
            if t < milestone or trial_id in self.recorded[milestone]:
                continue
            at_rung = self.recorded[milestone]
            at_rung[trial_id] = point
            ids = list(at_rung)
            ranks = pareto_ranks(np.array([at_rung[i] for i in ids]))
            keep = math.ceil(len(ids) / self.reduction_factor)
            return TrialScheduler.CONTINUE if ranks[ids.index(trial_id)] < keep else TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        point = self._point(result)
        if self.time_attr not in result or point is None:
            return TrialScheduler.CONTINUE
        if result[self.time_attr] >= self.max_t:
            return TrialScheduler.STOP  # done, not stopped early
        action = self.decide(trial.trial_id, result[self.time_attr], point)
        if action == TrialScheduler.STOP:
            self.num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        point = self._point(result or {})
        if point is not None and self.time_attr in result:
            self.decide(trial.trial_id, result[self.time_attr], point)

    def debug_string(self) -> str:
        rungs = " | ".join(f"epoch {m:g}: {len(r)} ranked" for m, r in self.recorded.items())
        names = ", ".join(f"{m} {'↑' if d == 'max' else '↓'}" for m, d in self.objectives)
        return f"Using MO-ASHA on ({names}): stopped early {self.num_stopped}\nRungs: {rungs}"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


__all__ = ["MOASHA", "pareto_ranks", "epsilon_net_order", "DEFAULT_OBJECTIVES"]
