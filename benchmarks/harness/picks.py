"""Picking and comparing the trials of benchmark searches: the trial one would deploy, the paired
difference between two arms over seeds, the hypervolume reference point, the order of proposals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import pandas as pd

from .common import report_start


def reference_macs(width_mult: float, resolutions: Sequence[int]) -> float:
    """MMACs of the costliest network of the paper's space with every exit computed: no trial
    of any of the three spaces averages more, so (0 %, this) bounds every hypervolume."""
    from aebnas.config import SpaceValues, largest_arch
    from aebnas.cost.macs import exit_costs

    arch = largest_arch(SpaceValues(resolutions=tuple(resolutions)), width_mult=width_mult)
    return float(exit_costs(arch).cumulative()[-1])


def in_window(macs: pd.Series, target: float, tolerance: float) -> pd.Series:
    return (macs - target).abs() <= tolerance * target


def validation_pick(trials: pd.DataFrame, target: float, tolerance: float, cost: str = "avg_macs"
                    ) -> pd.Series | None:
    """The trial one would deploy, chosen without the test set: the best validation accuracy among
    the trials with a test result (finished) whose validation average cost (``cost``: ``avg_macs``,
    or ``avg_ms`` of a latency search) is in the window."""
    rows = trials[in_window(trials[cost], target, tolerance) & trials["test_accuracy"].notna()]
    return None if rows.empty else rows.sort_values("accuracy", ascending=False, kind="stable").iloc[0]


def ahead(ours: pd.Series, theirs: pd.Series) -> tuple[float, float, bool]:
    """Paired (same seed) differences ours − theirs: (mean, standard error, ahead by more than one
    standard error). Seeds where either side is missing are left out; one seed is never enough."""
    d = (ours - theirs).dropna()
    sem = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    mean = float(d.mean()) if len(d) else float("nan")
    return mean, sem, bool(len(d) > 1 and mean > sem)


def in_proposal_order(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials in the order they started (Optuna's and the surrogate's trial ids are not counters):
    the first report's timestamp minus its duration, from each trial's result.json."""
    def started(trial_dir: str) -> float:
        with open(Path(trial_dir) / "result.json") as f:
            return report_start(json.loads(f.readline()))

    return trials.assign(started=[started(d) for d in trials["trial_dir"]]).sort_values(
        ["started", "trial_id"], kind="stable").reset_index(drop=True)


def pick_details(pick: pd.Series | None) -> dict | None:
    """What a record keeps of a picked trial, so that which branches win can be read from the records: its
    flat architecture, and per exit its branch (``aebnas info``'s words), the branch's MMACs, the share of
    validation images leaving there (with the tuned thresholds) and their accuracy."""
    if pick is None:
        return None
    from aebnas.cost.macs import exit_costs

    from .common import trial_config

    arch = trial_config(pick)[0]
    branch = exit_costs(arch).branch
    return {"arch": arch.to_flat(),
            "exits": [{"position": e.position, "branch": e.describe(), "branch_mmacs": round(float(branch[j]), 5),
                       "val_util": float(pick[f"exit{e.position}_util"]),
                       "val_accuracy": float(pick[f"exit{e.position}_accuracy"])}
                      for j, e in enumerate(arch.exits)]}
