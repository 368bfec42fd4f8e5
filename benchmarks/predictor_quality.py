"""Claim 17: how well each accuracy predictor ranks unseen candidates as the archive grows (a figure).

Data: the random searches of claim 16 (``benchmarks/searcher_efficiency.py``, run it first):
inherited candidates of the shipped supernet with their validation accuracy. For each seed,
the candidates in proposal order; the last ``held_out`` are the test set; each predictor is
fitted on the first n (n in ``sizes``) and scored by Kendall τ on the test set. Random search's
candidates are used because they are an unbiased sample of the space: a searcher's own archive
would favour the predictor that built it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from harness.claims import Claim
from harness.common import SCRATCH, Context, Outcome, load_trials, main, md_image, md_table
from harness.picks import in_proposal_order

CLAIM = Claim(17, "predictor_quality", "Accuracy predictors: Kendall τ on held-out candidates",
              "τ of RBF, GP, trees and MLP as the archive grows; a figure")
SETTINGS = dict(seeds=(0, 1, 2), sizes=(10, 25, 50, 100, 150), held_out=50)
QUICK = dict(seeds=(0,), sizes=(5, 10), held_out=10)


def measure(ctx: Context, seeds: Sequence[int], sizes: Sequence[int], held_out: int) -> Outcome:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aebnas.search.predictors import PREDICTORS, make_predictor, kendall_tau
    from aebnas.settings import ARCH_FILE
    from search_spaces.encoding import Encoding

    source = (SCRATCH / "quick" if ctx.quick else SCRATCH) / "searcher_efficiency"
    rows = []
    for seed in seeds:
        path = source / f"random_seed{seed}"
        if not path.is_dir():
            raise SystemExit(f"{path} is missing: run benchmarks/searcher_efficiency.py first")
        trials = in_proposal_order(load_trials(path))
        configs = [json.loads((Path(d) / ARCH_FILE).read_text()) for d in trials["trial_dir"]]
        enc = Encoding(_space_of(path))
        X = enc.features(np.array([enc.encode(c) for c in configs]))
        y = trials["accuracy"].to_numpy(float)
        test = slice(len(y) - held_out, len(y))
        for n in sizes:
            if n > len(y) - held_out:
                continue
            for name in PREDICTORS:
                model = make_predictor(name, seed=seed).fit(X[:n], y[:n])
                rows.append({"seed": seed, "archive": n, "predictor": name,
                             "tau": kendall_tau(model.predict(X[test]), y[test])})
    df = pd.DataFrame(rows)
    mean = df.groupby(["archive", "predictor"])["tau"].agg(["mean", "std"]).reset_index()
    table = [{"archive": int(n), **{p: float(g.set_index("predictor").loc[p, "mean"]) for p in PREDICTORS}}
             for n, g in mean.groupby("archive")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in PREDICTORS:
        g = mean[mean["predictor"] == name]
        ax.errorbar(g["archive"], g["mean"], yerr=g["std"], marker="o", capsize=3, label=name)
    ax.set_xlabel("candidates in the archive (fitted on)")
    ax.set_ylabel(f"Kendall τ on {held_out} held-out candidates")
    ax.set_title("Accuracy predictors on inherited candidates")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend()
    fig.tight_layout()
    png = ctx.docs / "predictor_quality.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    best = max(table[-1], key=lambda k: table[-1][k] if k != "archive" else -9)
    measured = (f"τ on held-out candidates with {table[-1]['archive']} in the archive: "
                + ", ".join(f"{p} {table[-1][p]:.2f}" for p in PREDICTORS) + f" (best {best})")
    details = "\n".join([
        f"Random search's inherited candidates of claim 16 (seeds {tuple(seeds)}), in proposal order; the last "
        f"{held_out} of each seed are held out. Mean Kendall τ over seeds:", "", md_table(table, 2), "",
        md_image(png, "τ of each predictor against the archive size")])
    return Outcome(measured, None, {"rows": rows, "table": table, "plot": png}, details)


def _space_of(path: Path) -> dict:
    """The param space the search at ``path`` ran (from its saved settings)."""
    from aebnas.search.experiment import Experiment
    from aebnas.search.storage import read_experiment_settings

    exp = Experiment.from_json(read_experiment_settings(str(path)))
    return exp.param_space()


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK))
