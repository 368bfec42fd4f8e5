"""``python -m analysis EXPERIMENT_DIR [...] --target-macs X --out DIR`` (also ``aebnas analyze``).

Writes to ``--out``: ``trials.csv`` (one row per trial, with its thresholds re-tuned for
the target), ``pareto.csv`` (the front at the target), ``sweep_front.csv`` (the front over
trials × threshold vectors), ``summary.md`` and the figures (PNG + SVG): ``pareto``,
``threshold_sweep``, ``exits_<trial>``, ``classes_<trial>`` (per class, named as the
dataset names them), ``learning_curves`` and, for several experiments, ``experiments_pareto``.
Bad input prints one message on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from aebnas.search.trials import rank

from . import plots
from .pareto import default_reference, hypervolume, parse_reference, pareto_front
from .posthoc import class_breakdown, exit_breakdown, oracle_bounds, retune_trials, sweep_front, threshold_sweep
from .results import NotAnExperimentError, Results, load_experiments, trials_with_results

# Columns of the loaded trials joined to their re-tuned rows (identity first).
TRIAL_COLUMNS = ["experiment", "trial_id", "status", "epochs_run", "exit_positions", "resolution", "checkpoint"]
FRONT_COLUMNS = ["experiment", "trial_id", "status", "epochs_run", "accuracy", "avg_macs", "test_accuracy",
                 "test_avg_macs", "score", "thresholds", "source", "exit_positions", "resolution", "checkpoint"]


class AnalysisError(Exception):
    """Bad input to the command: one message, exit code 2."""


@dataclass
class Analysis:
    """Everything the outputs are made of (MACs in MMACs, accuracy in %)."""

    results: Results
    target_macs: float
    budget_macs: float | None
    points: pd.DataFrame        # one row per trial with results, thresholds tuned for the target
    front: pd.DataFrame
    best: pd.Series
    reference: tuple[float, float]
    reference_given: bool
    hypervolume: float
    sweep: pd.DataFrame
    sweep_front: pd.DataFrame
    oracle: pd.DataFrame


def _progress(message: str) -> None:
    print(message, flush=True)


def _target(results: Results, target_macs: float | None, budget_macs: float | None) -> float:
    if target_macs is not None:
        return target_macs
    if budget_macs is not None:
        return budget_macs
    own = {float(s["target_macs"]) for s in results.settings.values() if "target_macs" in s}
    own |= set(results.trials["target_macs"].dropna().astype(float)) if "target_macs" in results.trials else set()
    if len(own) != 1:
        raise AnalysisError(f"the experiments have {'no' if not own else 'different'} target MACs "
                            f"({sorted(own)}); pass --target-macs")
    return own.pop()


def best_trial(points: pd.DataFrame, budget_macs: float | None = None) -> pd.Series:
    """The highest score at the target among finished trials (within the budget, if any); trials
    stopped early or unfinished count only when none finished, errored ones only when nothing else."""
    fits = points if budget_macs is None else points[points["avg_macs"] <= budget_macs + 1e-9]
    fits = fits if len(fits) else points
    if not len(fits):
        raise AnalysisError("no trial with results")
    # aebnas.search.trials.rank: the same rule as `aebnas retrain --best`.
    return rank([row for _, row in fits.iterrows()], lambda r: r["status"], lambda r: r["score"])[0]


def analyse(paths: Sequence[str], target_macs: float | None = None, budget_macs: float | None = None,
            reference: tuple[float, float] | None = None) -> Analysis:
    """Load the experiments and compute everything at ``target_macs`` (default: their own target)."""
    for name, value in (("--target-macs", target_macs), ("--budget-macs", budget_macs)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise AnalysisError(f"{name}={value} must be a positive number of MMACs")
    try:
        results = load_experiments(paths)
    except NotAnExperimentError as exc:
        raise AnalysisError(str(exc)) from None
    counts = results.trials["status"].value_counts()
    _progress(f"analysing {len(results.trials)} trials of {len(results.settings)} experiment(s) "
              f"({', '.join(f'{n} {s}' for s, n in counts.items())})…")
    if trials_with_results(results.trials).empty:
        raise AnalysisError(f"no trial with results in {', '.join(map(str, paths))} (no trial reported an epoch)")
    target = _target(results, target_macs, budget_macs)
    tuned = retune_trials(results.trials, target, budget_macs=budget_macs, progress=_progress)
    points = trials_with_results(tuned.merge(results.trials[[c for c in TRIAL_COLUMNS if c in results.trials]],
                                             on=["experiment", "trial_id"]))
    front = pareto_front(points)
    best = best_trial(points, budget_macs)
    ref = reference or default_reference(points["avg_macs"])
    sweep = threshold_sweep(results.trials, progress=_progress)
    return Analysis(results=results, target_macs=target, budget_macs=budget_macs, points=points, front=front,
                    best=best, reference=ref, reference_given=reference is not None,
                    hypervolume=hypervolume(front["accuracy"], front["avg_macs"], ref), sweep=sweep,
                    sweep_front=sweep_front(sweep), oracle=oracle_bounds(results.trials, progress=_progress))


# ------------------------------------------------------------------ outputs
def write_tables(a: Analysis, out: Path) -> list[Path]:
    """trials.csv, pareto.csv and sweep_front.csv."""
    at_target = a.points.drop(columns=[c for c in TRIAL_COLUMNS[2:] if c in a.points])
    keys = ("experiment", "trial_id")
    at_target = at_target.rename(columns={c: f"at_target_{c}" for c in at_target if c not in keys})
    test_oracle = a.oracle[["experiment", "trial_id", "test_oracle_accuracy", "test_oracle_macs"]]
    trials = (a.results.trials.merge(at_target, on=["experiment", "trial_id"], how="left")
              .merge(test_oracle, on=["experiment", "trial_id"], how="left"))
    paths = [out / "trials.csv", out / "pareto.csv", out / "sweep_front.csv"]
    trials.to_csv(paths[0], index=False)
    a.front[[c for c in FRONT_COLUMNS if c in a.front]].to_csv(paths[1], index=False)
    a.sweep_front.to_csv(paths[2], index=False)
    return paths


def write_plots(a: Analysis, out: Path, trial: pd.Series | None = None) -> list[Path]:
    """The figures (PNG + SVG) of :mod:`analysis.plots`."""
    names = ", ".join(a.results.settings)
    where = f"{'budget' if a.budget_macs else 'target'} {a.budget_macs or a.target_macs:g} MMACs"
    paths = plots.plot_pareto(a.points, out / "pareto", target_macs=a.budget_macs or a.target_macs, best=a.best,
                              budget=a.budget_macs is not None,
                              title=f"{names}\naccuracy vs. MACs, thresholds tuned for {where}")
    on_front = [t for t in a.front["trial_id"] if t in set(a.sweep["trial_id"])]
    if on_front:
        paths += plots.plot_threshold_sweeps(a.sweep, on_front, out / "threshold_sweep", tuned=a.points,
                                             target_macs=a.target_macs, front=a.sweep_front,
                                             title=f"{names}\nthreshold sweep of the front's trials (validation)")
    if trial is None:
        trial = a.results.trial(a.best["trial_id"], a.best["experiment"])
    try:
        breakdown = exit_breakdown(trial, a.target_macs, budget_macs=a.budget_macs)
        paths += plots.plot_exits(breakdown, out / f"exits_{trial['trial_id']}",
                                  title=f"Trial {trial['trial_id']} ({trial['status']}), thresholds tuned for {where}")
    except ValueError as exc:
        _progress(f"no exit plot: {exc}")
    paths += _class_plot(a, out, trial, where)
    history = a.results.history
    if "epoch" in history and (history["epoch"] > 0).any():
        paths += plots.plot_learning_curves(history, a.results.trials, out / "learning_curves",
                                            title=f"{names}\nscore per epoch")
    else:  # inherited weights scored once (epoch 0): there is no curve to draw
        _progress("no learning curves: no trial trained an epoch (inherited weights scored as they are)")
    trials = a.results.trials
    if "avg_ms" in trials and trials["avg_ms"].notna().any():  # searched with --cost latency
        timed = trials[trials["avg_ms"].notna() & trials["accuracy"].notna()]
        target = float(timed["target_ms"].iloc[0])  # a trial reports target_ms with every avg_ms
        best_ms = timed.sort_values("score", ascending=False, kind="stable").iloc[0]
        paths += plots.plot_pareto(timed, out / "pareto_latency", target_macs=target, best=best_ms, x="avg_ms",
                                   title=f"{names}\naccuracy vs. average latency predicted by the latency table, thresholds "
                                         f"tuned by each trial for {target:g} ms")
    if len(a.results.settings) > 1:
        paths += plots.plot_pareto(a.points, out / "experiments_pareto", target_macs=a.target_macs,
                                   color_by="experiment", title=f"Experiments compared at {where}")
    return paths


def _class_plot(a: Analysis, out: Path, trial: pd.Series, where: str) -> list[Path]:
    """The per-class figure of ``trial`` on the test split (none without its exit outputs)."""
    try:
        breakdown = class_breakdown(trial, a.target_macs, budget_macs=a.budget_macs)
    except ValueError as exc:
        _progress(f"no class plot: {exc}")
        return []
    return plots.plot_classes(breakdown, out / f"classes_{trial['trial_id']}",
                              title=f"Trial {trial['trial_id']} per class (test), thresholds tuned for {where}")


def _cell(value: object, digits: int) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return "" if value is None else str(value)


def _table(frame: pd.DataFrame, columns: dict[str, str], digits: int = 2) -> str:
    rows = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for _, r in frame.iterrows():
        cells = [_cell(r[c], digits) for c in columns]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summary_markdown(a: Analysis) -> str:
    """The short report: experiments, best trial at the target with its exits, the fronts, hypervolumes."""
    lines = (_experiments_lines(a) + _best_trial_lines(a) + _front_lines(a) + _sweep_front_lines(a)
             + _left_out_lines(a))
    return "\n".join(lines).rstrip() + "\n"


def _experiments_lines(a: Analysis) -> list[str]:
    """The title, each experiment's trials by status, and what the numbers below are."""
    t = a.results.trials
    lines = [f"# Analysis of {', '.join(a.results.settings)}", ""]
    for name in a.results.settings:
        rows = t[t["experiment"] == name]
        counts = ", ".join(f"{n} {s}" for s, n in rows["status"].value_counts().items())
        lines.append(f"- **{name}**: {len(rows)} trials ({counts})")
    budget = f", at most {a.budget_macs:g} MMACs" if a.budget_macs else ""
    lines += ["", f"Thresholds re-tuned on validation for a target of **{a.target_macs:g} MMACs**{budget} "
              "(the paper's score); test numbers use those thresholds (never tuned on test).", ""]
    return lines


def _best_trial_lines(a: Analysis) -> list[str]:
    """The best trial at the target: its figures, its exits, its oracle bound and its checkpoint."""
    b = a.best
    row = a.results.trial(b["trial_id"], b["experiment"])
    lines = ["## Best trial at the target", "",
             f"**{b['trial_id']}** ({b['experiment']}, {b['status']}, {row['epochs_run']}/{row['epochs']} epochs): "
             f"validation {b['accuracy']:.2f}% at {b['avg_macs']:.3f} MMACs (score {b['score']:.2f}); "
             + (f"test {b['test_accuracy']:.2f}% at {b['test_avg_macs']:.3f} MMACs." if pd.notna(b["test_accuracy"])
                else "no test numbers."),
             f"Resolution {row.get('resolution')}, exits after stages {row.get('exit_positions') or '(none)'}, "
             f"thresholds {b['thresholds']}.", ""]
    lines += _exit_lines(a, row) + _class_lines(a, row)
    orc = a.oracle[(a.oracle["trial_id"] == b["trial_id"]) & (a.oracle["experiment"] == b["experiment"])]
    if len(orc):
        o = orc.iloc[0]
        lines += [f"Oracle bound (every sample at the cheapest right exit): {o['oracle_accuracy']:.2f}% at "
                  f"{o['oracle_macs']:.3f} MMACs on validation, {o['test_oracle_accuracy']:.2f}% on test.", ""]
    if row.get("checkpoint"):
        lines += [f"Checkpoint: `{row['checkpoint']}`", ""]
    return lines


def _branches(row: pd.Series) -> dict[str, str]:
    """Each exit's branch in ``aebnas info``'s words (``10px/k5/x1``, ``edanas``), from the trial's architecture
    keys; {} when they do not give an architecture (a trial of an older aebnas)."""
    from aebnas.config import ArchConfig, is_arch_key

    plain = {k: v.item() if hasattr(v, "item") else v for k, v in row.items() if is_arch_key(k)}  # numpy → Python
    flat = {k: v for k, v in plain.items() if not (isinstance(v, float) and math.isnan(v))}
    try:
        arch = ArchConfig.from_flat(flat)
    except (TypeError, ValueError):
        return {}
    return {f"exit{e.position}": e.describe() for e in arch.exits}


def _exit_lines(a: Analysis, row: pd.Series) -> list[str]:
    """The table of a trial's exits at the target, or why they are unknown."""
    try:
        ex = exit_breakdown(row, a.target_macs, budget_macs=a.budget_macs).reset_index()
        ex["util"] = 100 * ex["util"]
        ex["branch"] = ex["exit"].map({**_branches(row), "final": "head"}).fillna("?")
        return [_table(ex, {"exit": "exit", "branch": "branch", "threshold": "threshold", "macs": "C_i (MMACs)",
                            "util": "leave here (%)", "accuracy": "accuracy alone (%)",
                            "taken_accuracy": "accuracy of leavers (%)"}), ""]
    except ValueError as exc:
        return [f"(exits unknown: {exc})", ""]


def _class_lines(a: Analysis, row: pd.Series) -> list[str]:
    """The table of a trial's classes on the test split at the target (nothing without its exit outputs)."""
    try:
        frame = class_breakdown(row, a.target_macs, budget_macs=a.budget_macs).reset_index()
    except ValueError:
        return []
    return ["Per class on the test split, same thresholds:", "",
            _table(frame, {"class": "class", "images": "images", "accuracy": "accuracy (%)",
                           "early": "leave early (%)", "avg_macs": "MMACs"}), ""]


def _front_lines(a: Analysis) -> list[str]:
    """The Pareto front at the target with its hypervolume (and each experiment's, for several)."""
    ref = f"({a.reference[0]:g} %, {a.reference[1]:.4g} MMACs)" + ("" if a.reference_given else
                                                                    ", the default: 0 % and 1.1 × the largest MACs")
    lines = ["## Pareto front at the target (validation accuracy ↑, average MACs ↓)", "",
             _table(a.front, {"trial_id": "trial", "experiment": "experiment", "status": "status",
                              "accuracy": "val acc (%)", "avg_macs": "MMACs", "test_accuracy": "test acc (%)",
                              "thresholds": "thresholds"}), "",
             f"Hypervolume: **{a.hypervolume:.2f} %·MMACs** against the reference point {ref}."]
    if len(a.results.settings) > 1:
        for name, group in a.points.groupby("experiment"):
            f = pareto_front(group)
            lines.append(f"- {name}: {hypervolume(f['accuracy'], f['avg_macs'], a.reference):.2f} %·MMACs")
    return lines + [""]


def _sweep_front_lines(a: Analysis) -> list[str]:
    """The front over trials × threshold vectors of the post-hoc sweep (none when nothing was swept)."""
    if not len(a.sweep_front):
        return []
    n_trials = a.sweep["trial_id"].nunique()
    hv = hypervolume(a.sweep_front["accuracy"], a.sweep_front["avg_macs"], a.reference)
    return ["## Front over trials × thresholds (post-hoc sweep)", "",
            f"{len(a.sweep)} threshold vectors of {n_trials} trials; {len(a.sweep_front)} on the front, "
            f"hypervolume {hv:.2f} %·MMACs (same reference). Selected on validation; see `sweep_front.csv`.", ""]


def _left_out_lines(a: Analysis) -> list[str]:
    """The trials the sweep could not use (no exit outputs) and the errored ones with their error."""
    t = a.results.trials
    lines: list[str] = []
    missing = t[t["exit_outputs"].isna() & t["accuracy"].notna()]
    if len(missing):
        lines += [f"{len(missing)} trial(s) have no `exit_outputs.npz` ({', '.join(missing['trial_id'])}): their "
                  "reported metrics are used at their own target; they are not in the sweep.", ""]
    errored = t[t["status"] == "errored"]
    for _, e in errored.iterrows():
        lines.append(f"- errored {e['trial_id']}: {e['error']}")
    return lines


def run_analysis(paths: Sequence[str], out: str | Path, target_macs: float | None = None,
                 budget_macs: float | None = None, reference: tuple[float, float] | None = None,
                 trial_id: str | None = None) -> list[Path]:
    """Analyse and write every output file under ``out``; returns their paths."""
    a = analyse(paths, target_macs, budget_macs, reference)
    trial = None
    if trial_id is not None:
        try:
            trial = a.results.trial(trial_id)
        except KeyError as exc:
            raise AnalysisError(f"--trial: {exc.args[0]}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths_written = write_tables(a, out) + write_plots(a, out, trial)
    summary = out / "summary.md"
    summary.write_text(summary_markdown(a))
    return paths_written + [summary]


# ------------------------------------------------------------------ command line
def _reference_arg(text: str) -> tuple[float, float]:
    try:
        return parse_reference(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("experiments", nargs="+", metavar="EXPERIMENT_DIR", help="experiment directories (local paths or storage URIs)")
    a("--out", required=True, help="directory for the plots, CSV files and summary.md")
    a("--target-macs", type=float, help="target average MMACs (default: the experiments' own target)")
    a("--budget-macs", type=float, help="only thresholds whose validation average MMACs fit this budget")
    a("--reference-point", type=_reference_arg, metavar="ACC,MACS",
      help="hypervolume reference point (accuracy %%, MMACs); default 0 %% and 1.1 × the largest MACs")
    a("--trial", help="trial for the exit plot: its id, trial_<id> or a unique end of the id, "
                       "EXPERIMENT/ID when several experiments share ids (default: the best trial at the target)")


def run(args: argparse.Namespace) -> int:
    try:
        written = run_analysis(args.experiments, args.out, args.target_macs, args.budget_macs,
                               args.reference_point, args.trial)
    except AnalysisError as exc:
        print(f"analysis: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {args.out}: " + ", ".join(p.name for p in written))
    return 0


CLI_COMMANDS = {"analyze": ("Pareto front, post-hoc thresholds and plots of finished or partial searches",
                            add_arguments, run)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=CLI_COMMANDS["analyze"][0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
