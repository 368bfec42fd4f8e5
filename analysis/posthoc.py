"""Post-hoc exit thresholds from each trial's saved ``exit_outputs.npz`` (no network is run).

- :func:`retune_trials`: thresholds re-tuned for another target MACs (or under a MACs
  budget) on the **validation** split, then evaluated on the **test** split; never tuned
  on test. At a trial's own target, grid and λ this reproduces what the trial reported.
- :func:`threshold_sweep`: every threshold vector of the grid → (val and test) accuracy
  and average MACs: each trial's accuracy–MACs curve. :func:`sweep_front` is the Pareto
  front over (trial × thresholds), selected on validation.
- :func:`oracle_bounds`: the oracle bound of each trial (every sample leaves at the
  cheapest exit that is right).

Simulation and tuning are :mod:`aebnas.exit_policy`'s. Units: accuracy %, MACs MMACs,
utilization fraction. Grid and λ default to each trial's own (``threshold_grid``,
``score_lambda`` in its ``arch.json``).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from aebnas.cost.macs import ExitCosts
from aebnas.exit_policy import (PAPER_GRID, PAPER_LAMBDA, ExitOutputs, SimResult, load_exit_outputs, oracle,
                                simulate, simulate_many, threshold_grid, tune_thresholds)

from .pareto import pareto_mask
from .results import read_bytes

Progress = Callable[[str], None]


@dataclass
class Retuned:
    """Thresholds tuned on val for a target, and what they do on val and test."""

    thresholds: list[float]
    score: float           # the paper's score on val at the target
    val: SimResult
    test: SimResult | None  # None when the npz holds no test split


def load_outputs(location: str) -> tuple[dict[str, ExitOutputs], ExitCosts]:
    """({split: ExitOutputs}, ExitCosts) of an ``exit_outputs.npz`` given as a local path or URI."""
    return load_exit_outputs(io.BytesIO(read_bytes(location)))


def retune(outputs: dict[str, ExitOutputs], costs: ExitCosts, target_macs: float, *,
           budget_macs: float | None = None, grid: Sequence[float] = PAPER_GRID,
           lam: float = PAPER_LAMBDA) -> Retuned:
    """Tune on ``outputs["val"]`` for ``target_macs`` (MMACs; at most ``budget_macs`` if given), report on test."""
    tuned = tune_thresholds(outputs["val"], costs, target_macs, grid, lam, budget=budget_macs)
    test = simulate(outputs["test"], tuned.thresholds, costs) if "test" in outputs else None
    return Retuned(thresholds=tuned.thresholds, score=tuned.score, val=tuned.result, test=test)


def _trial_grid(row: pd.Series, grid: Sequence[float] | None) -> Sequence[float]:
    if grid is not None:
        return grid
    own = row.get("threshold_grid")
    return tuple(own) if isinstance(own, (list, tuple)) else PAPER_GRID


def _trial_lambda(row: pd.Series, lam: float | None) -> float:
    if lam is not None:
        return lam
    own = row.get("score_lambda")
    return float(own) if own is not None and not _isnan(own) else PAPER_LAMBDA


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _with_outputs(trials: pd.DataFrame, progress: Progress | None, what: str
                  ) -> Iterator[tuple[pd.Series, dict[str, ExitOutputs], ExitCosts]]:
    """Each trial that has an ``exit_outputs.npz``, with its loaded outputs."""
    rows = trials[trials["exit_outputs"].notna()] if "exit_outputs" in trials else trials.iloc[0:0]
    if progress and len(rows):
        progress(f"{what}: {len(rows)} trial(s) with exit outputs…")
    for _, row in rows.iterrows():
        outputs, costs = load_outputs(row["exit_outputs"])
        yield row, outputs, costs


def _exit_names(row: pd.Series, num_exits: int) -> list[str]:
    positions = [p for p in str(row.get("exit_positions") or "").split(",") if p]
    return [f"exit{p}" for p in positions] if len(positions) == num_exits else [f"exit_{j}" for j in range(num_exits)]


def retune_trials(trials: pd.DataFrame, target_macs: float | None = None, *, budget_macs: float | None = None,
                  grid: Sequence[float] | None = None, lam: float | None = None,
                  progress: Progress | None = None) -> pd.DataFrame:
    """One row per trial: thresholds re-tuned on val at ``target_macs`` (MMACs; default the trial's own).

    Columns: experiment, trial_id, source, target_macs, budget_macs, thresholds, score,
    accuracy, avg_macs (val), test_accuracy, test_avg_macs, and per exit (``exitP_`` and
    ``final_``) util (fraction of val samples), macs (C_i, MMACs), taken_accuracy (% of
    the val samples leaving there that are right). ``source`` is ``posthoc``; for a trial
    without ``exit_outputs.npz`` it is ``reported`` (its own metrics, when asked for its
    own target without a budget) or ``missing`` (no numbers).
    """
    rows = []
    for row, outputs, costs in _with_outputs(trials, progress, "re-tuning thresholds"):
        target = float(row["target_macs"]) if target_macs is None else float(target_macs)
        r = retune(outputs, costs, target, budget_macs=budget_macs, grid=_trial_grid(row, grid),
                   lam=_trial_lambda(row, lam))
        out = {"experiment": row["experiment"], "trial_id": row["trial_id"], "source": "posthoc",
               "target_macs": target, "budget_macs": budget_macs, "thresholds": r.thresholds, "score": r.score,
               "accuracy": r.val.accuracy, "avg_macs": r.val.avg_cost,
               "test_accuracy": r.test.accuracy if r.test else np.nan,
               "test_avg_macs": r.test.avg_cost if r.test else np.nan}
        for name, util, cost, acc in zip(_exit_names(row, costs.num_exits) + ["final"], r.val.utilization,
                                         r.val.costs, r.val.taken_accuracy):
            out.update({f"{name}_util": float(util), f"{name}_macs": float(cost), f"{name}_taken_accuracy": float(acc)})
        rows.append(out)
    done = {(r["experiment"], r["trial_id"]) for r in rows}
    for _, row in trials.iterrows():
        if (row["experiment"], row["trial_id"]) not in done:
            rows.append(_without_outputs(row, target_macs, budget_macs))
    return pd.DataFrame(rows)


def _without_outputs(row: pd.Series, target_macs: float | None, budget_macs: float | None) -> dict[str, Any]:
    own = row.get("target_macs")
    target = own if target_macs is None else target_macs
    out = {"experiment": row["experiment"], "trial_id": row["trial_id"], "source": "missing",
           "target_macs": target, "budget_macs": budget_macs}
    same_target = own is not None and not _isnan(own) and target is not None and math.isclose(target, own)
    if same_target and budget_macs is None and not _isnan(row.get("accuracy", np.nan)):
        out.update({"source": "reported", **{k: row.get(k, np.nan) for k in
                    ("thresholds", "score", "accuracy", "avg_macs", "test_accuracy", "test_avg_macs")}})
    return out


def threshold_sweep(trials: pd.DataFrame, grid: Sequence[float] | None = None,
                    progress: Progress | None = None) -> pd.DataFrame:
    """Every grid threshold vector of every trial → val and test accuracy (%) and average MMACs.

    Columns: experiment, trial_id, thresholds (tuple), accuracy, avg_macs (val),
    test_accuracy, test_avg_macs. Grid: ``grid`` or each trial's own (values > 0.95 become 1.0).
    """
    frames = []
    for row, outputs, costs in _with_outputs(trials, progress, "threshold sweep"):
        vectors = threshold_grid(costs.num_exits, _trial_grid(row, grid))
        acc, macs, _ = simulate_many(outputs["val"], vectors, costs)
        test_acc, test_macs = (simulate_many(outputs["test"], vectors, costs)[:2] if "test" in outputs
                               else (np.full(len(vectors), np.nan),) * 2)
        frames.append(pd.DataFrame({"experiment": row["experiment"], "trial_id": row["trial_id"],
                                    "thresholds": [tuple(float(t) for t in v) for v in vectors],
                                    "accuracy": acc, "avg_macs": macs,
                                    "test_accuracy": test_acc, "test_avg_macs": test_macs}))
    columns = ["experiment", "trial_id", "thresholds", "accuracy", "avg_macs", "test_accuracy", "test_avg_macs"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def sweep_front(sweep: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``sweep`` on the (val accuracy ↑, val MACs ↓) front over all trials × thresholds,
    sorted by MACs; their test columns show what the selection gives on unseen data."""
    if sweep.empty:
        return sweep
    mask = pareto_mask(sweep["accuracy"].to_numpy(float), sweep["avg_macs"].to_numpy(float))
    return sweep[mask].sort_values(["avg_macs", "accuracy"], ascending=[True, False], kind="stable")


def oracle_bounds(trials: pd.DataFrame, progress: Progress | None = None) -> pd.DataFrame:
    """Per trial the oracle bound: accuracy (%) and average MMACs, on val and test."""
    rows = []
    for row, outputs, costs in _with_outputs(trials, progress, "oracle bounds"):
        val = oracle(outputs["val"], costs)
        test = oracle(outputs["test"], costs) if "test" in outputs else None
        rows.append({"experiment": row["experiment"], "trial_id": row["trial_id"],
                     "oracle_accuracy": val.accuracy, "oracle_macs": val.avg_cost,
                     "test_oracle_accuracy": test.accuracy if test else np.nan,
                     "test_oracle_macs": test.avg_cost if test else np.nan})
    return pd.DataFrame(rows, columns=["experiment", "trial_id", "oracle_accuracy", "oracle_macs",
                                       "test_oracle_accuracy", "test_oracle_macs"])


def exit_breakdown(trial: pd.Series, target_macs: float | None = None, *, budget_macs: float | None = None,
                   grid: Sequence[float] | None = None, lam: float | None = None) -> pd.DataFrame:
    """Per exit of one trial (rows ``exitP`` …, ``final``) on val with thresholds tuned for
    ``target_macs`` (default the trial's own): threshold, macs (C_i, MMACs), util (fraction),
    accuracy (% of the exit alone on all samples), taken_accuracy (% right among the samples
    leaving there; NaN if none, or unknown without ``exit_outputs.npz``).

    Without ``exit_outputs.npz`` the trial's reported metrics are used, which exist only
    for its own target; another target then raises ValueError.
    """
    own = float(trial["target_macs"])
    target = own if target_macs is None else float(target_macs)
    location = trial.get("exit_outputs")
    if isinstance(location, str):
        outputs, costs = load_outputs(location)
        r = retune(outputs, costs, target, budget_macs=budget_macs, grid=_trial_grid(trial, grid),
                   lam=_trial_lambda(trial, lam))
        names = _exit_names(trial, costs.num_exits) + ["final"]
        return pd.DataFrame({"threshold": r.val.thresholds + [np.nan], "macs": r.val.costs,
                             "util": r.val.utilization, "accuracy": outputs["val"].exit_accuracy(),
                             "taken_accuracy": r.val.taken_accuracy}, index=pd.Index(names, name="exit"))
    if not math.isclose(target, own) or budget_macs is not None:
        raise ValueError(f"trial {trial['trial_id']} has no exit_outputs.npz: its exits are known only at its "
                         f"own target ({own} MMACs, no budget)")
    names = [f"exit{p}" for p in str(trial.get("exit_positions") or "").split(",") if p] + ["final"]
    return pd.DataFrame({"threshold": [trial.get(f"{n}_threshold", np.nan) for n in names],
                         "macs": [trial.get(f"{n}_macs", np.nan) for n in names],
                         "util": [trial.get(f"{n}_util", np.nan) for n in names],
                         "accuracy": [trial.get(f"{n}_accuracy", np.nan) for n in names],
                         "taken_accuracy": np.nan}, index=pd.Index(names, name="exit"))


def trial_classes(trial: pd.Series, labels: np.ndarray) -> list[str]:
    """The trial's class names by label (its ``arch.json``'s ``classes``), else "0" … "K-1" (K: its
    ``num_classes``, else one more than the largest of ``labels``)."""
    names = trial.get("classes")
    if isinstance(names, (list, tuple)) and len(names):
        return [str(n) for n in names]
    k = trial.get("num_classes")
    k = int(k) if isinstance(k, (int, float)) and not _isnan(k) else int(labels.max(initial=-1)) + 1
    return [str(c) for c in range(k)]


def class_breakdown(trial: pd.Series, target_macs: float | None = None, *, budget_macs: float | None = None,
                    split: str = "test") -> pd.DataFrame:
    """Per class of one trial (rows named by class) on ``split`` with thresholds tuned on val for
    ``target_macs`` (default the trial's own): images, accuracy (%), early (% of its images leaving at
    an exit before the final classifier) and avg_macs (MMACs). ValueError without ``exit_outputs.npz``
    or without that split."""
    location = trial.get("exit_outputs")
    if not isinstance(location, str):
        raise ValueError(f"trial {trial['trial_id']} has no exit_outputs.npz")
    outputs, costs = load_outputs(location)
    if split not in outputs:
        raise ValueError(f"trial {trial['trial_id']}'s exit_outputs.npz has no {split} split")
    target = float(trial["target_macs"]) if target_macs is None else float(target_macs)
    tuned = retune(outputs, costs, target, budget_macs=budget_macs, grid=_trial_grid(trial, None),
                   lam=_trial_lambda(trial, None))
    result = simulate(outputs[split], tuned.thresholds, costs)
    out = outputs[split]
    right = out.correct[result.exit_index, np.arange(out.num_samples)]
    names = trial_classes(trial, out.labels)
    count = np.bincount(out.labels, minlength=len(names)).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        frame = pd.DataFrame({
            "images": count.astype(int),
            "accuracy": 100 * np.bincount(out.labels, weights=right, minlength=len(names)) / count,
            "early": 100 * np.bincount(out.labels, weights=result.exit_index < out.num_exits,
                                       minlength=len(names)) / count,
            "avg_macs": np.bincount(out.labels, weights=result.costs[result.exit_index], minlength=len(names)) / count,
        }, index=pd.Index(names, name="class"))
    return frame
