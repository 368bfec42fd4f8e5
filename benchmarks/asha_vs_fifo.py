"""Claim 2: ASHA vs FIFO on the same space, seed and candidates: compute spent and best score."""

from __future__ import annotations

import sys
from typing import Any, Sequence

import pandas as pd

from harness.claims import Claim
from harness.common import (Context, Outcome, SearchRun, main, md_table, priority_note, provenance_note, run_search,
                            search_figures, search_window, stop_ray, timestamp)

CLAIM = Claim(2, "asha_vs_fifo", "ASHA vs FIFO",
              "ASHA reaches FIFO's best score with less compute (ratio of CPU-seconds FIFO / ASHA > 1)")
SEARCH = dict(dataset="cifar10-subset", space="aebnas", space_kwargs={"resolutions": (32,)}, width_mult=0.5,
              target_macs=2.5, epochs=3, num_samples=6, batch_size=64, seed=0, grace_period=1, reduction_factor=2)
SETTINGS = dict(search=SEARCH, schedulers=("fifo", "asha"))
QUICK = dict(search=dict(SEARCH, width_mult=0.25, space_kwargs={"resolutions": (32,)}, target_macs=1.0, epochs=2,
                         num_samples=4), schedulers=("fifo", "asha"))
SAME_SCORE = 1e-9  # scores closer than this are the same score


def trial_number(trial_id: str) -> int:
    """The sample's place in the search (``…_00003`` → 3): equal numbers, same candidate, for a seeded
    random search."""
    return int(trial_id.rsplit("_", 1)[-1])


def architectures(trials: pd.DataFrame) -> dict[int, dict[str, Any]]:
    """Trial number → the architecture keys of its resolved config."""
    from aebnas.config import is_arch_key

    cols = [c for c in trials.columns if is_arch_key(c)]
    return {trial_number(r["trial_id"]): {c: r[c] for c in cols if pd.notna(r[c])} for _, r in trials.iterrows()}


def score_differences(fifo: pd.DataFrame, asha: pd.DataFrame) -> pd.Series:
    """|score FIFO − score ASHA| for every (trial number, epoch) both searches ran."""
    keyed = [h.assign(n=h["trial_id"].map(trial_number)).set_index(["n", "epoch"])["score"] for h in (fifo, asha)]
    both = pd.concat(keyed, axis=1, keys=["fifo", "asha"], join="inner")
    return (both["fifo"] - both["asha"]).abs()


def measure_asha_vs_fifo(ctx: Context, search: dict[str, Any], schedulers: Sequence[str]) -> Outcome:
    """Claim 2: the same search under each scheduler; CPU-seconds, trial-epochs and best score."""
    if sorted(schedulers) != ["asha", "fifo"]:
        raise ValueError(f"schedulers={tuple(schedulers)} must be ('fifo', 'asha') in some order")
    runs, trials, history, rows = run_both(ctx, search, schedulers)
    fifo, asha = rows["fifo"], rows["asha"]
    epochs = int(search["epochs"])
    cpu_ratio = fifo["CPU-seconds (Σ time_total_s)"] / asha["CPU-seconds (Σ time_total_s)"]
    epoch_ratio = fifo["trial-epochs"] / asha["trial-epochs"]
    per_epoch = {s: r["CPU-seconds (Σ time_total_s)"] / r["trial-epochs"] for s, r in rows.items()}
    differ, candidates = same_candidates_note(trials)
    same_candidates = not differ
    # Does one candidate train the same way in both searches? (Same seed: same initial weights and data order.)
    diffs = score_differences(history["fifo"], history["asha"]) if same_candidates else pd.Series(dtype=float)
    compute = (f"FIFO spent ×{cpu_ratio:.2f} the CPU-seconds of ASHA (×{epoch_ratio:.2f} the trial-epochs): ASHA "
               + ("used less compute" if cpu_ratio > 1 else "used as much compute or more")
               + f". Per trial-epoch, FIFO's trials took {per_epoch['fifo']:.1f} s and ASHA's "
               f"{per_epoch['asha']:.1f} s.")
    best = best_candidates(fifo, asha, trials["asha"], epochs, same_candidates)
    details = "\n".join([
        f"Settings: {', '.join(f'{k}={v}' for k, v in search.items())}; the two searches differ only in the "
        f"scheduler. ASHA: grace period {search.get('grace_period', 1)} epoch(s), reduction factor "
        f"{search.get('reduction_factor', 2)}, on `score`. Compute = Σ over trials of Ray's `time_total_s` (each "
        "trial holds one CPU, so these are CPU-seconds); trial-epochs is the same count free of machine noise. "
        + candidates + " " + order_note(runs) + " " + priority_note(list(runs.values())) + " "
        + provenance_note(list(runs.values())), "",
        md_table(list(rows.values()), 2), "",
        " ".join(s for s in (compute, best["found"], repeat_note(diffs), best["verdict"]) if s),
    ])
    return Outcome(measured=(f"FIFO/ASHA compute ×{cpu_ratio:.2f} CPU-s (×{epoch_ratio:.2f} trial-epochs); best "
                             f"score FIFO {fifo['best score']:.2f}, ASHA {asha['best score']:.2f} ("
                             + ("same candidate" if fifo["best trial #"] == asha["best trial #"] and same_candidates
                                else "different candidates" if same_candidates else
                                "the searches sampled different candidates") + ")"),
                   holds=bool(best["reached"] and cpu_ratio > 1),
                   figures={"rows": rows, "cpu_ratio": cpu_ratio, "trial_epoch_ratio": epoch_ratio,
                            "same_candidates": same_candidates, "different_trial_numbers": differ,
                            "max_score_difference_same_candidate_epoch": None if diffs.empty else float(diffs.max()),
                            "asha_epochs_of_fifo_best": best["epochs_of_fifo_best"], "reached": bool(best["reached"]),
                            "searches": search_figures(runs.values())},
                   details=details)


def run_both(ctx: Context, search: dict[str, Any], schedulers: Sequence[str]) -> tuple[
        dict[str, SearchRun], dict[str, pd.DataFrame], dict[str, pd.DataFrame], dict[str, dict[str, Any]]]:
    """The search under each scheduler: (the searches, their trials, their per-epoch histories, a table row each:
    compute, trial-epochs and the best trial)."""
    from analysis.results import load_experiment, trials_with_results

    runs: dict[str, SearchRun] = {}
    trials, history, rows = {}, {}, {}
    for sched in schedulers:
        runs[sched] = run_search(ctx, sched, scheduler=sched, **search)
        loaded = load_experiment(runs[sched].path)
        t, h = trials_with_results(loaded.trials).copy(), loaded.history
        trials[sched], history[sched] = t, h
        best = t.sort_values("score", ascending=False, kind="stable").iloc[0]
        rows[sched] = {"scheduler": sched, "trials": len(t), "trial-epochs": int(t["epochs_run"].sum()),
                       "CPU-seconds (Σ time_total_s)": float(t["time_total_s"].sum()),
                       "Σ train+eval s": float((h["train_seconds"] + h["eval_seconds"]).sum()),
                       "wall s": runs[sched].wall_s, "best score": float(best["score"]),
                       "best trial #": trial_number(best["trial_id"]),
                       "its val acc (%)": float(best["accuracy"]), "its MMACs": float(best["avg_macs"]),
                       "finished trials": int((t["status"] == "finished").sum())}
    stop_ray()
    return runs, trials, history, rows


def same_candidates_note(trials: dict[str, pd.DataFrame]) -> tuple[list[int], str]:
    """Were the candidates the same? (A seeded random search should sample them in the same order.)
    Returns (the trial numbers whose architectures differ, a sentence)."""
    arch_f, arch_a = architectures(trials["fifo"]), architectures(trials["asha"])
    differ = sorted(n for n in set(arch_f) | set(arch_a) if arch_f.get(n) != arch_a.get(n))
    if not differ:
        return differ, (f"Both searches sampled the same {len(arch_f)} candidates in the same order (checked: the "
                        "architectures of equal trial numbers are equal), so a trial number names one candidate.")
    return differ, (f"The two searches did not sample the same candidates: trial number(s) "
                    f"{', '.join(f'#{n}' for n in differ)} hold different architectures, so comparing a trial "
                    "number across the two searches compares different networks.")


def repeat_note(diffs: pd.Series) -> str:
    """Whether one candidate trained the same way in both searches, from its score differences."""
    if diffs.empty:
        return ""
    if diffs.max() <= SAME_SCORE:
        return (f"Over the {len(diffs)} (candidate, epoch) pairs both searches ran, the scores are identical: a "
                "candidate trains the same way under both schedulers, so differences below come from the "
                "scheduler alone.")
    (n_worst, e_worst) = diffs.idxmax()
    return (f"Over the {len(diffs)} (candidate, epoch) pairs both searches ran, the scores differ by up to "
            f"{diffs.max():.2f} points (candidate #{n_worst}, epoch {e_worst}; median {diffs.median():.2f}): "
            "the same candidate does not train identically in the two runs, so score differences of that "
            "size are training noise, not the scheduler.")


def order_note(runs: dict[str, SearchRun]) -> str:
    """Whether the two searches ran one after the other or shared the machine."""
    windows = {s: search_window(r.path) for s, r in runs.items()}
    (f0, f1), (a0, a1) = windows["fifo"], windows["asha"]
    when = f"FIFO from {timestamp(f0)} to {timestamp(f1)}, ASHA from {timestamp(a0)} to {timestamp(a1)}"
    return (f"The two searches ran one after the other ({when})." if f1 <= a0 or a1 <= f0 else
            f"The two searches overlapped in time ({when}), so they shared the machine for part of it.")


def best_candidates(fifo: dict[str, Any], asha: dict[str, Any], asha_trials: pd.DataFrame, epochs: int,
                    same_candidates: bool) -> dict[str, Any]:
    """The best candidates, how far ASHA trained FIFO's best one, and whether ASHA reached FIFO's best score:
    {"found", "verdict": sentences, "reached", "epochs_of_fifo_best"}."""
    best_f, best_a = fifo["best trial #"], asha["best trial #"]
    asha_by_n = asha_trials.assign(n=asha_trials["trial_id"].map(trial_number)).set_index("n")
    epochs_of_fifo_best = int(asha_by_n.loc[best_f, "epochs_run"]) if best_f in asha_by_n.index else 0
    asha_trained_fifo_best = same_candidates and epochs_of_fifo_best == epochs
    gap = asha["best score"] - fifo["best score"]
    if not same_candidates:
        found = (f"FIFO's best is its trial #{best_f} ({fifo['best score']:.2f}), ASHA's its trial #{best_a} "
                 f"({asha['best score']:.2f}).")
    elif best_f == best_a:
        found = (f"Both searches rank candidate #{best_f} best; ASHA trained it for "
                 + (f"all {epochs} epochs." if asha_trained_fifo_best else f"{epochs_of_fifo_best} of {epochs} epochs."))
    else:
        found = (f"FIFO's best is candidate #{best_f} ({fifo['best score']:.2f}), ASHA's #{best_a} "
                 f"({asha['best score']:.2f}); ASHA "
                 + (f"trained #{best_f} for all {epochs} epochs too." if asha_trained_fifo_best else
                    f"stopped #{best_f} after {epochs_of_fifo_best} of {epochs} epochs." if epochs_of_fifo_best else
                    f"did not train #{best_f}."))
    reached = gap >= -SAME_SCORE or asha_trained_fifo_best
    if gap >= -SAME_SCORE:
        verdict = f"ASHA's best score is {gap:+.2f} points from FIFO's: it reached FIFO's best score."
    elif asha_trained_fifo_best:
        verdict = (f"ASHA's best score is {gap:+.2f} points from FIFO's although ASHA trained FIFO's best candidate "
                   "through every epoch: ASHA found the same best candidate, and the gap is the difference between "
                   "two trainings of it.")
    elif same_candidates:
        verdict = (f"ASHA's best score is {gap:+.2f} points from FIFO's and ASHA did not train FIFO's best candidate "
                   "to the end: at this budget ASHA's saving came with a worse result.")
    else:
        verdict = f"ASHA's best score is {gap:+.2f} points from FIFO's: it did not reach FIFO's best score."
    return {"found": found, "verdict": verdict, "reached": reached, "epochs_of_fifo_best": epochs_of_fifo_best}


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure_asha_vs_fifo, SETTINGS, QUICK, reusable=True))
