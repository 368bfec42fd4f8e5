"""Claim 16: sample efficiency of the searchers — random, Optuna TPE, Optuna NSGA-II, SurrogateSearch.

Every candidate inherits its weights from the shipped supernet and is scored as inherited
(0 fine-tuning epochs), so a search of ``num_samples`` candidates costs minutes. For each
searcher and seed: the validation hypervolume (accuracy %, avg MMACs; reference (0 %, the
costliest network of the space)) of the first k candidates in the order they were proposed
(trial ids count up), every ``step`` candidates, and the test accuracy of the network picked
on validation within ±10% of the target among all of them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from harness.claims import Claim
from harness.common import (Context, Outcome, fmt, load_trials, main, md_image, md_table, provenance_note, run_search,
                            search_figures, stop_ray)
from harness.picks import ahead, in_proposal_order, reference_macs, validation_pick

from aebnas.training.supernet_file import EMBEDDED_SUPERNET

CLAIM = Claim(16, "searcher_efficiency", "Sample efficiency of the searchers",
              "SurrogateSearch reaches random search's final validation hypervolume within 1/3 of the evaluations, "
              "and ends ahead of Optuna's NSGA-II by more than one standard error of the paired differences "
              "(3 seeds, ≥ 200 inherited candidates each)")
SETTINGS = dict(searchers=("random", "tpe", "nsga2", "surrogate"), seeds=(0, 1, 2), num_samples=200, step=25,
                target_macs=5.0, tolerance=0.10, width_mult=0.75, resolutions=(32, 36, 40), batch_size=64)
QUICK = dict(SETTINGS, seeds=(0, 1), num_samples=20, step=10)


def curve(ordered: pd.DataFrame, ref: tuple[float, float], points: Sequence[int]) -> list[float]:
    """Validation hypervolume of the first k trials for each k of ``points``; ``ordered``: the trials in
    proposal order (:func:`in_proposal_order`)."""
    from analysis.pareto import hypervolume

    return [hypervolume(ordered["accuracy"][:k], ordered["avg_macs"][:k], ref) for k in points]


def plot(png: Path, fine: dict[tuple[str, int], list[float]], fine_points: Sequence[int], searchers: Sequence[str],
         seeds: Sequence[int], random_final: float, budget_third: float) -> None:
    """Validation hypervolume against evaluations: per searcher the mean over seeds, shaded from the
    worst seed to the best; random search's final level and a third of the budget marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for alg in searchers:
        runs = np.array([fine[alg, s] for s in seeds])
        line, = ax.plot(fine_points, runs.mean(axis=0), label=f"{alg} (mean of {len(seeds)} seeds)")
        ax.fill_between(fine_points, runs.min(axis=0), runs.max(axis=0), color=line.get_color(), alpha=0.15)
    ax.axhline(random_final, color="grey", ls="--", lw=1, label="random search's final (mean)")
    ax.axvline(budget_third, color="grey", ls=":", lw=1, label="a third of the budget")
    ax.set_xlabel("candidates evaluated (proposal order)")
    ax.set_ylabel("validation hypervolume (% · MMACs)")
    ax.set_title("Sample efficiency of the searchers (shaded: worst to best seed)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def run_searches(ctx: Context, searchers: Sequence[str], seeds: Sequence[int], budget: dict[str, Any],
                 ref: tuple[float, float], points: Sequence[int], fine_points: Sequence[int], target_macs: float,
                 tolerance: float) -> tuple[dict, list[dict[str, Any]], dict, dict, dict]:
    """One search per searcher and seed with the same ``budget``: (the searches, a row each, the hypervolume
    curve at ``points`` and at ``fine_points``, the trials in proposal order), keyed by (searcher, seed)."""
    runs, rows, curves, fine, found = {}, [], {}, {}, {}
    for seed in seeds:  # seeds outermost: a change of load hits every searcher alike
        for alg in searchers:
            runs[alg, seed] = run_search(ctx, f"{alg}_seed{seed}", search_alg=alg, seed=seed, **budget)
            trials = load_trials(runs[alg, seed].path)
            ordered = found[alg, seed] = in_proposal_order(trials)  # reads every trial's result.json: once
            curves[alg, seed] = curve(ordered, ref, points)
            fine[alg, seed] = curve(ordered, ref, fine_points)
            pick = validation_pick(trials, target_macs, tolerance)  # its tie-break follows the loaded order
            rows.append({"searcher": alg, "seed": seed, "trials": len(trials), "hv_final": curves[alg, seed][-1],
                         "pick_test_acc": None if pick is None else float(pick["test_accuracy"]),
                         "wall_s": runs[alg, seed].wall_s})
            print(f"  {alg} seed {seed}: hypervolume {curves[alg, seed][-1]:.1f}", flush=True)
    stop_ray()
    return runs, rows, curves, fine, found


def with_extremes(rows: list[dict[str, Any]], found: dict[tuple[str, int], pd.DataFrame],
                  extremes: dict[int, pd.DataFrame], ref: tuple[float, float]) -> list[float]:
    """The control: SurrogateSearch's initial design starts with the space's smallest and largest networks,
    which the other searchers rarely draw, and a front's hypervolume rewards its ends. Every searcher's final
    hypervolume with those two points (``extremes``, as measured in the surrogate's search of the same seed:
    an inherited network scores the same in any search), one per row."""
    from analysis.pareto import hypervolume

    return [hypervolume(both["accuracy"], both["avg_macs"], ref)
            for both in (pd.concat([found[r["searcher"], r["seed"]], extremes[r["seed"]]]) for r in rows)]


def measure(ctx: Context, searchers: Sequence[str], seeds: Sequence[int], num_samples: int, step: int,
            target_macs: float, tolerance: float, width_mult: float, resolutions: Sequence[int],
            batch_size: int) -> Outcome:
    budget = dict(dataset="cifar10-subset", space_kwargs={"resolutions": tuple(resolutions)}, width_mult=width_mult,
                  target_macs=target_macs, epochs=0, num_samples=num_samples, scheduler="fifo", batch_size=batch_size,
                  supernet=str(EMBEDDED_SUPERNET), split_seed=0)
    ref = (0.0, reference_macs(width_mult, resolutions))
    points = list(range(step, num_samples + 1, step))
    fine_points = list(range(min(5, step), num_samples + 1, min(5, step)))  # for the figure
    runs, rows, curves, fine, found = run_searches(ctx, searchers, seeds, budget, ref, points, fine_points,
                                                   target_macs, tolerance)
    per_seed = pd.DataFrame(rows).astype({"pick_test_acc": float})
    mean_curve = {alg: np.mean([curves[alg, s] for s in seeds], axis=0) for alg in searchers}
    random_final = float(mean_curve["random"][-1])
    reach = next((k for k, hv in zip(points, mean_curve["surrogate"]) if hv >= random_final), None)
    # Control: every searcher's front with the space's smallest and largest networks, as the surrogate's initial
    # design measured them (:func:`with_extremes`); and the validation-picked networks at the target.
    extremes = {s: found["surrogate", s].iloc[:2] for s in seeds}
    per_seed["hv_with_extremes"] = with_extremes(rows, found, extremes, ref)
    by_seed = per_seed.pivot(index="seed", columns="searcher")
    diff, sem, is_ahead = ahead(by_seed["hv_final"]["surrogate"], by_seed["hv_final"]["nsga2"])
    holds = bool(reach is not None and reach <= num_samples / 3 and is_ahead)
    diff_x, sem_x, _ = ahead(by_seed["hv_with_extremes"]["surrogate"], by_seed["hv_with_extremes"]["nsga2"])
    diff_acc, sem_acc, _ = ahead(by_seed["pick_test_acc"]["surrogate"], by_seed["pick_test_acc"]["nsga2"])
    control = (f"with the space's smallest and largest networks added to every searcher's front, surrogate − "
               f"NSGA-II {diff_x:+.1f} ± {fmt(sem_x, 1)}; test accuracy of the validation pick at the target, "
               f"surrogate − NSGA-II {diff_acc:+.1f} ± {fmt(sem_acc, 1)} points")
    reached = f"after {reach} evaluations" if reach else f"not within {num_samples} evaluations"
    measured = (f"surrogate reaches random's final hypervolume {reached}; final hypervolume vs NSGA-II "
                f"{diff:+.1f} ± {fmt(sem, 1)} (s.e., {len(seeds)} seeds); control: {control}")
    table = [{"evaluations": k, **{alg: float(mean_curve[alg][i]) for alg in searchers}} for i, k in enumerate(points)]
    summary = per_seed.groupby("searcher", sort=False).agg(
        hv_final=("hv_final", "mean"), hv_final_std=("hv_final", "std"),
        hv_with_extremes=("hv_with_extremes", "mean"), pick_test_acc=("pick_test_acc", "mean"),
        wall_s=("wall_s", "sum")).reindex(list(searchers)).reset_index()
    png = ctx.docs / "searcher_efficiency.png"
    plot(png, fine, fine_points, searchers, seeds, random_final, num_samples / 3)
    details = "\n".join([
        f"{num_samples} candidates per searcher and seed (seeds {tuple(seeds)}), each inherited from the shipped "
        f"supernet and scored as inherited; quickstart's space (width {width_mult}, resolutions {tuple(resolutions)}), "
        f"target {target_macs} MMACs, embedded CIFAR-10 subset (split seed 0). Hypervolume of the validation front "
        f"(accuracy %, avg MMACs), reference (0 %, {ref[1]:.1f} MMACs); mean over seeds after k proposals:", "",
        md_table(table, 1), "",
        "Per searcher (mean over seeds; test accuracy of the network picked on validation within "
        f"±{tolerance:.0%} of the target):", "", md_table(summary.to_dict("records"), 1), "",
        f"Random search's final hypervolume {random_final:.1f}; SurrogateSearch reaches it {reached} "
        f"(goal ≤ {num_samples / 3:.0f}). Final "
        f"hypervolume, SurrogateSearch − NSGA-II paired by seed: {diff:+.1f} ± {fmt(sem, 1)}.", "",
        "**Control.** SurrogateSearch's initial design starts with the space's smallest and largest networks "
        "(the paper's design); the other searchers rarely draw these corners of the space, and a front's "
        "hypervolume rewards its ends. `hv_with_extremes` gives every searcher those two points, as measured in "
        "the surrogate's search of the same seed (an inherited network scores the same in any search): "
        f"{control}. The two points per seed: "
        + "; ".join(f"seed {sd}: " + ", ".join(f"{a:.1f}% at {m:.2f} MMACs" for a, m in
                                                zip(e["accuracy"], e["avg_macs"])) for sd, e in extremes.items())
        + ".", "",
        md_image(png, "Validation hypervolume against candidates evaluated, per searcher"),
        "", provenance_note(list(runs.values()))])
    figures = {"per_seed": per_seed.to_dict("records"), "curves": {f"{a}/{s}": c for (a, s), c in curves.items()},
               "points": points, "plot": png, "reach": reach, "diff_vs_nsga2": diff, "sem": sem,
               "control": {"hv_with_extremes_diff_vs_nsga2": diff_x, "sem": sem_x,
                           "pick_test_acc_diff_vs_nsga2": diff_acc, "pick_sem": sem_acc},
               "searches": search_figures(runs.values())}
    return Outcome(measured, holds, figures, details)


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK, reusable=True))
