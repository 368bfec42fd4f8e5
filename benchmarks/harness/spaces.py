"""The comparison of claims 1, 12 and 23: searched exit branches (aebnas) vs one fixed branch
(fixed_exits) vs no exits (static), the same budget for every space and seed.

What ``spaces_compare.py`` measures on each of its variants (candidates trained from scratch, or
inheriting the weights of the embedded or the Fashion-MNIST supernet): the searches, then per search and
seed the figures, then the section.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .common import (Context, Outcome, SearchRun, fmt, load_trials, md_image, md_table, priority_note,
                     provenance_note, run_search, search_figures, stop_ray)
from .picks import ahead, in_window, pick_details, reference_macs, validation_pick


def measure_search_spaces(ctx: Context, spaces: Sequence[str], seeds: Sequence[int], target_macs: float,
                          tolerance: float, width_mult: float, resolutions: Sequence[int], epochs: int,
                          num_samples: int, scheduler: str, batch_size: int, supernet: str | None = None,
                          split_seed: int | None = None, figure: str = "search_spaces_pareto",
                          dataset: str = "cifar10-subset", val_size: int | None = None, search_alg: str = "random",
                          surrogate_batch: int | None = None) -> Outcome:
    """Claim 1: the same search budget on each space, for each seed; hypervolume and the test accuracy
    of the validation-picked trial at the target. With ``supernet``, candidates inherit its weights
    (``epochs`` fine-tuning epochs) and every seed searches the supernet's split (``split_seed``,
    ``val_size``: that supernet's). ``search_alg``: the searcher every search uses."""
    from aebnas.data.datasets import load_dataset

    searcher = {"search_alg": search_alg} | ({"surrogate_batch": surrogate_batch} if surrogate_batch else {}) \
        | ({"val_size": val_size} if val_size is not None else {})
    data_name = "the embedded CIFAR-10 subset" if dataset == "cifar10-subset" else dataset
    budget = dict(dataset=dataset, **searcher, space_kwargs={"resolutions": tuple(resolutions)}, width_mult=width_mult,
                  target_macs=target_macs, epochs=epochs, num_samples=num_samples, scheduler=scheduler,
                  batch_size=batch_size, supernet=supernet, split_seed=split_seed)
    trials, runs = _search_every_space(ctx, spaces, seeds, budget)
    ref = (0.0, reference_macs(width_mult, resolutions))
    per_run = [_run_figures(g, space, seed, runs[space, seed], target_macs, tolerance, ref)
               for (space, seed), g in trials.groupby(["space", "seed"], sort=False)]
    per_seed = pd.DataFrame(per_run).astype(
        {c: float for c in ("pick_val_acc", "pick_val_macs", "pick_test_acc", "pick_test_macs")})
    summary = _summary(per_seed, spaces)
    png = _plot(ctx, trials, figure, f"{len(seeds)} seeds × {num_samples} trials per space,\n"
                f"thresholds tuned for {target_macs:g} MMACs ({data_name})", target_macs)
    margins = _margins(per_seed, spaces)
    holds = all(m["ahead by > 1 s.e."] == "yes" for m in margins)
    ours = spaces[0]
    ratios = {s: summary.loc[ours, "hv_test"] / summary.loc[s, "hv_test"] for s in spaces if s != ours}
    data = load_dataset(dataset, val_size=val_size) if val_size is not None else load_dataset(dataset)
    how = ("trained from scratch for a few epochs: a smoke-scale replication, not the paper's setting (full "
           "CIFAR-10, Once-for-All weights, 5 epochs of fine-tuning, NSGA-II)." if supernet is None else
           f"every candidate inherits its weights, exit branches included, from the supernet `{os.path.basename(supernet)}` "
           f"and is fine-tuned {epochs} epoch(s) (0: scored as inherited); every seed uses the supernet's "
           f"train/validation split (split seed {split_seed}), the seed changes the sampled candidates.")
    setup = (f"Budget, identical for every space and seed: {num_samples} trials ({search_alg} search) × {epochs} "
             f"epochs, scheduler `{scheduler}`, width {width_mult}, resolutions {tuple(resolutions)}, batch "
             f"{batch_size}, target {target_macs:g} MMACs, seeds {tuple(seeds)} (the seed fixes the sampled "
             f"candidates, their initial weights and the order of the training data). Data: {data_name} "
             f"({len(data.y_train):,} train / {len(data.y_val):,} val / {len(data.y_test):,} test images), " + how)
    details = _section(setup, summary, per_seed, margins, list(runs.values()), ref, tolerance, ours, png)
    return Outcome(measured=_measured(summary, spaces, ratios, len(seeds)), holds=holds,
                   figures={"reference": ref, "summary": summary.reset_index().to_dict("records"), "margins": margins,
                            "runs": per_run, "hv_ratio_test": ratios, "plot": png,
                            "searches": search_figures(runs.values())}, details=details)


def _search_every_space(ctx: Context, spaces: Sequence[str], seeds: Sequence[int], budget: dict[str, Any]
                        ) -> tuple[pd.DataFrame, dict[tuple[str, int], SearchRun]]:
    """One search per space and seed with the same ``budget``: (every trial, with its space and seed; the
    searches). The trials are also written to ``ctx.scratch/trials.csv``."""
    frames, runs = [], {}
    for seed in seeds:  # seeds outermost: a change of load hits every space alike
        for space in spaces:
            runs[space, seed] = run_search(ctx, f"{space}_seed{seed}", space=space, seed=seed, **budget)
            frames.append(load_trials(runs[space, seed].path).assign(space=space, seed=seed))
    stop_ray()
    trials = pd.concat(frames, ignore_index=True)
    trials.drop(columns=["trial_dir", "exit_outputs", "checkpoint"], errors="ignore").to_csv(
        ctx.scratch / "trials.csv", index=False)
    return trials, runs


def _run_figures(g: pd.DataFrame, space: str, seed: int, run: SearchRun, target_macs: float, tolerance: float,
                 ref: tuple[float, float]) -> dict[str, Any]:
    """One search's figures: hypervolumes on validation and test, and the trial picked on validation."""
    from analysis.pareto import hypervolume

    pick = validation_pick(g, target_macs, tolerance)
    value = (lambda col: None if pick is None else float(pick[col]))  # noqa: E731
    return {
        "space": space, "seed": seed, "trials": len(g),
        "hv_val": hypervolume(g["accuracy"], g["avg_macs"], ref),
        "hv_test": hypervolume(g["test_accuracy"], g["test_avg_macs"], ref),
        "in_window": int(in_window(g["avg_macs"], target_macs, tolerance).sum()),
        "pick_trial": None if pick is None else str(pick["trial_id"]),
        "pick_val_acc": value("accuracy"), "pick_val_macs": value("avg_macs"),
        "pick_test_acc": value("test_accuracy"), "pick_test_macs": value("test_avg_macs"),
        "pick_test_early_exit": value("test_early_exit") if "test_early_exit" in g else None,
        "pick": pick_details(pick),
        "search_wall_s": run.wall_s,
    }


def _summary(per_seed: pd.DataFrame, spaces: Sequence[str]) -> pd.DataFrame:
    """Per space: means and standard deviations over the seeds, seeds with a pick, search seconds."""
    return per_seed.groupby("space", sort=False).agg(
        hv_val=("hv_val", "mean"), hv_val_std=("hv_val", "std"), hv_test=("hv_test", "mean"),
        hv_test_std=("hv_test", "std"), pick_test_acc=("pick_test_acc", "mean"),
        pick_test_acc_std=("pick_test_acc", "std"), pick_test_macs=("pick_test_macs", "mean"),
        seeds_with_pick=("pick_test_acc", "count"), wall_s=("search_wall_s", "sum")).reindex(list(spaces))


def _plot(ctx: Context, trials: pd.DataFrame, figure: str, title: str, target_macs: float) -> Path:
    """One figure, every trial of every seed, coloured by space (validation points, as plots labels them);
    only its PNG is kept."""
    from analysis import plots

    plot_points = trials.assign(experiment=trials["space"])
    paths = plots.plot_pareto(plot_points, ctx.docs / figure, target_macs=target_macs, color_by="space", title=title)
    for p in paths:
        if p.suffix != ".png":
            p.unlink()
    return [p for p in paths if p.suffix == ".png"][0]


def _margins(per_seed: pd.DataFrame, spaces: Sequence[str]) -> list[dict[str, Any]]:
    """The first space against each other one, paired by seed, on test hypervolume and on the test accuracy
    of the validation-picked trial."""
    ours = spaces[0]
    by_seed = per_seed.pivot(index="seed", columns="space")
    margins = []
    for other in (s for s in spaces if s != ours):
        for col, label in (("hv_test", "test hypervolume"), ("pick_test_acc", "test acc of the val-picked trial")):
            mean, sem, win = ahead(by_seed[col][ours], by_seed[col][other])
            margins.append({"vs": other, "figure": label, "mean difference": mean, "standard error": sem,
                            "ahead by > 1 s.e.": "yes" if win else "no"})
    return margins


def _measured(summary: pd.DataFrame, spaces: Sequence[str], ratios: dict[str, float], seeds: int) -> str:
    """The claims table's line: test hypervolumes and their ratios, test accuracy of the picks."""
    ours, others = spaces[0], [s for s in spaces if s != spaces[0]]

    def acc_at_target(space: str) -> str:
        r = summary.loc[space]
        hits = int(r.seeds_with_pick)
        return f"{space} {fmt(r.pick_test_acc, 1)}%" + ("" if hits == seeds else f" ({hits} of {seeds} seeds)")

    return (f"test HV {ours} {summary.loc[ours, 'hv_test']:.0f} vs "
            + ", ".join(f"{s} {summary.loc[s, 'hv_test']:.0f}" for s in others) + " %·MMACs ("
            + ", ".join(f"×{r:.2f} vs {s}" for s, r in ratios.items())
            + "); test acc of the trial picked on validation at target "
            + ", ".join(acc_at_target(s) for s in spaces) + f" (mean of {seeds} seeds)")


def _exits_cell(pick: dict | None) -> str:
    """A picked trial's exits in one table cell: ``after stage p: branch (MMACs, share)`` each."""
    if not pick or not pick["exits"]:
        return "–"
    return "; ".join(f"{e['position']}: {e['branch']} ({e['branch_mmacs']:.2f}, {e['val_util']:.0%})"
                     for e in pick["exits"])


def _section(setup: str, summary: pd.DataFrame, per_seed: pd.DataFrame, margins: list[dict[str, Any]],
             runs: list[SearchRun], ref: tuple[float, float], tolerance: float, ours: str, png: Path) -> str:
    """The section's markdown: ``setup`` (budget and data), the spread over seeds, how the figures are taken,
    the summary, the verdict's margins, every search, the plot."""
    summary_rows = [{"space": s, "hypervolume val (%·MMACs)": f"{r.hv_val:.1f} ± {fmt(r.hv_val_std, 1)}",
                     "hypervolume test": f"{r.hv_test:.1f} ± {fmt(r.hv_test_std, 1)}",
                     "test acc of the val-picked trial (%)": f"{fmt(r.pick_test_acc)} ± {fmt(r.pick_test_acc_std)}",
                     "its test MACs": r.pick_test_macs, "seeds with a pick": int(r.seeds_with_pick),
                     "search time, all seeds (s)": r.wall_s}
                    for s, r in summary.iterrows()]
    run_rows = [{"space": r.space, "seed": r.seed, "HV val": r.hv_val, "HV test": r.hv_test,
                 "trials with val MACs in window": r.in_window, "picked trial": r.pick_trial or "–",
                 "its val acc (%)": r.pick_val_acc, "its val MACs": r.pick_val_macs,
                 "its test acc (%)": r.pick_test_acc, "its test MACs": r.pick_test_macs,
                 "its exits: branch (MMACs, val share leaving)": _exits_cell(r.pick),
                 "search time (s)": r.search_wall_s} for r in per_seed.itertuples()]
    spread = summary["pick_test_acc_std"].dropna()
    return "\n".join([
        setup
        + (f" From one seed to another, the picked trial's test accuracy of a space varies by "
           f"{spread.min():.1f}–{spread.max():.1f} points (standard deviation)." if len(spread) else "")
        + " " + priority_note(runs) + " " + provenance_note(runs), "",
        f"Hypervolume of (accuracy ↑, average MACs ↓) against one reference point for all: "
        f"(0 %, {ref[1]:.3f} MMACs), the costliest network of the space with every exit computed. "
        "Validation points use the thresholds each trial tuned on validation; test points use the same thresholds.",
        f"Accuracy at the target: in each search, the trial with the best validation accuracy among the finished "
        f"trials whose validation average MACs is within ±{tolerance:.0%} of the target; its test accuracy is "
        "reported. Nothing is selected on the test set.", "",
        md_table(summary_rows, 2), "",
        f"Verdict rule: {ours} must be ahead of each other space by more than one standard error of the "
        "paired (same seed) differences, on test hypervolume and on the test accuracy of the validation-picked "
        "trial (a seed where either space has no trial in the window is left out of that pair):", "",
        md_table(margins, 2), "",
        "Per seed ('search time': wall seconds of `aebnas.search.experiment.run`, Ray already started):", "",
        md_table(run_rows, 2), "",
        md_image(png, "Pareto plot of the three spaces"), "",
        "The plot shows every trial of every seed at its tuned thresholds (validation), one colour per space, "
        "with each space's front.",
    ])
