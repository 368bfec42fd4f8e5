"""docs/results.md: the paper's table at full size, on Fashion-MNIST (70,000 real images).

Reads what the runs wrote and measures nothing itself:

- the whole job, ``python tune_configs/fashion_mnist.py`` run from the repository root
  (supernet, search, retrain, ONNX export, the export classifying the 10,000 test images);
- claim 23, ``python benchmarks/spaces_compare.py --variant fashion_mnist`` (aebnas, fixed_exits and
  static, 3 seeds each, inherited from the same supernet, picked on validation at the target);
- claims 25 and 26 (``supernet_ranking.py --variant fashion_mnist``, ``supernet_equal_compute.py --variant
  fashion_mnist``): claims 14 and 15 on the job's data, their records in docs/benchmarks/;
- torchvision's ``mobilenet_v3_small`` scaled to the target and trained alone
  (``python benchmarks/harness/baseline.py ... --out results/benchmarks/baseline_mnv3_fashion-mnist_3mmacs_s0``).

The job's settings and the three claims are shared with the scripts that measure them through
``harness.fashion_mnist``.

Writes docs/results.md, docs/results/fashion_mnist.json (one record per row) and
docs/results/fashion_mnist_pareto.png. A missing input leaves its rows out and says so. What the
job and its supernet measured is also kept in docs/results/fashion_mnist_job.json, and each baseline's
result.json copied to docs/results/: they are read from there when the runs' directories are not on
this machine (a clone, or a machine that lost them), since the runs take hours.

    python benchmarks/fashion_mnist_results.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from harness.claims import Claim  # noqa: E402
from harness.common import DOCS_DIR, REPO, SCRATCH, code_state, machine, md_table  # noqa: E402
from harness.fashion_mnist import (JOB, SPACES_COMPARE, SUPERNET, SUPERNET_EQUAL_COMPUTE,  # noqa: E402
                                   SUPERNET_RANKING, command)
from harness.report import holds_text  # noqa: E402

from aebnas.pipeline import DEPLOY_DIR, JOB_FILE, PREDICT_FILE, job_name  # noqa: E402
from aebnas.training.supernet_file import read_supernet_info  # noqa: E402

RESULTS_MD = REPO / "docs" / "results.md"
RESULTS_DIR = REPO / "docs" / "results"
JOB_RECORD = RESULTS_DIR / "fashion_mnist_job.json"
GOAL_ACCURACY, GOAL_EARLY = 93.0, 0.5
DISCUSSION = "## What the table shows"
# zalandoresearch/fashion-mnist, README "Benchmark" table (submitted results, test accuracy %). MMACs only where
# the network is pinned down: the 2-conv network's layout is not given beyond "< 100K parameters"; ~10 MMACs is
# what two 5x5 convolutions (32, 64 filters) with pooling cost at 28x28. MobileNet and ResNet18: input size and
# width not stated, so no MACs.
PUBLISHED = [
    {"model": "published: MobileNet", "test_accuracy": 95.0, "avg_macs": None},
    {"model": "published: ResNet18", "test_accuracy": 94.9, "avg_macs": None},
    {"model": "published: 2-conv, <100K parameters", "test_accuracy": 92.5, "avg_macs": 10.0},
]


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def supernet_rows() -> tuple[dict[str, Any] | None, float]:
    """(what the supernet is, its training seconds) from its file."""
    if not SUPERNET.is_file():
        return None, 0.0
    info = read_supernet_info(SUPERNET)
    seconds = sum(h["seconds"] for h in info.history)
    last = info.history[-1] if info.history else {}
    return {"epochs": info.epochs, "val_acc_largest": last.get("val_acc_largest"),
            "val_acc_smallest": last.get("val_acc_smallest"), "seconds": seconds}, seconds


def job_rows(job_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The deployed network of the job (retrained, and as the ONNX export classified the PNG test images)."""
    deploy = job_dir / DEPLOY_DIR
    metrics, predict, stages = (_json(deploy / "retrain" / "metrics.json"), _json(deploy / PREDICT_FILE),
                                _json(deploy / JOB_FILE))
    if metrics is None:
        return [], None
    test = metrics["test"]
    row = {"model": "aebnas (searched, retrained, deployed)", "seed": JOB.seed, "test_accuracy": test["accuracy"],
           "avg_macs": test["avg_macs"], "early_exit_share": 1.0 - test["utilization"][-1],
           "exit_share": test["utilization"], "static_macs": metrics.get("static_macs"),
           "export_test_accuracy": None if predict is None else predict["accuracy"],
           "export_early_exit_share": None if predict is None else predict["early_exit_share"]}
    picked = metrics["source"].get("search_metrics") or {}
    rows = [row]
    if picked.get("test_accuracy") is not None:  # the same network as the search scored it (inherited weights)
        reports = Path(metrics["source"]["experiment"]) / metrics["source"]["trial"] / "result.json"
        last = json.loads(reports.read_text().splitlines()[-1]) if reports.is_file() else {}  # JSON lines
        rows.append({"model": "aebnas (the job's search pick, inherited, before retraining)", "seed": JOB.seed,
                     "test_accuracy": picked["test_accuracy"], "avg_macs": last.get("test_avg_macs"),
                     "early_exit_share": last.get("test_early_exit")})
    return rows, {"stages": (stages or {}).get("stages", {}), "metrics": metrics, "predict": predict}


def job_and_supernet(job_dir: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]],
                                               dict[str, Any] | None, dict[str, Any] | None]:
    """(supernet, the job's rows, the job, the saved record when it was read instead of the runs' files).

    Read from the runs' directories when they are here (and saved to JOB_RECORD), else from JOB_RECORD."""
    supernet, _ = supernet_rows()
    rows, job = job_rows(job_dir)
    if job is not None and supernet is not None:
        def where(path: Path) -> str:
            return str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else str(path)

        JOB_RECORD.write_text(json.dumps({"job_dir": where(job_dir), "supernet_file": where(SUPERNET),
                                          "read_on": dt.date.today().isoformat(),
                                          "commit": str(code_state().commit)[:10], "supernet": supernet,
                                          "rows": rows, "job": job}, indent=1) + "\n")
        return supernet, rows, job, None
    saved = _json(JOB_RECORD)
    if saved is not None:
        return saved["supernet"], saved["rows"], saved["job"], saved
    return supernet, rows, job, None


def space_rows() -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The validation picks of claim 23 (inherited, every space and seed)."""
    record = _json(DOCS_DIR / f"{SPACES_COMPARE.key}.json")
    if record is None:
        return [], None
    rows = [{"model": r["space"] + " (inherited)", "space": r["space"], "seed": r["seed"],
             "test_accuracy": r["pick_test_acc"], "avg_macs": r["pick_test_macs"],
             "early_exit_share": r.get("pick_test_early_exit"), "hv_test": r["hv_test"],
             "search_s": r["search_wall_s"]}
            for r in record["figures"]["runs"] if r["pick_test_acc"] is not None]
    return rows, record


def baseline_rows() -> list[dict[str, Any]]:
    """The baselines' results: from their run directories (copied to docs/results/), else the copies."""
    for path in SCRATCH.glob("baseline_mnv3_fashion-mnist_*/result.json"):
        (RESULTS_DIR / f"{path.parent.name}.json").write_text(path.read_text())
    rows = []
    for path in sorted(RESULTS_DIR.glob("baseline_mnv3_fashion-mnist_*.json")):
        r = json.loads(path.read_text())
        rows.append({"model": f"mobilenet_v3_small (width {r['width_mult']:g}, {r['resolution']} px, {r['epochs']} "
                              "epochs, trained alone)", "seed": r["seed"], "test_accuracy": r["test_accuracy"],
                     "avg_macs": r["avg_macs"], "early_exit_share": 0.0, "seconds": r["train_seconds"]})
    return rows


def _draw(ax: Any, rows: list[dict[str, Any]], trials: Any, legend: bool) -> None:
    styles = {"aebnas": ("tab:blue", "o"), "fixed_exits": ("tab:orange", "s"), "static": ("tab:green", "^"),
              "mobilenet": ("tab:red", "D"), "published": ("tab:gray", "*"), "deployed": ("navy", "P"),
              "pick": ("tab:purple", "X")}
    if trials is not None:  # every candidate of claim 23's searches, faint, behind the picks
        for space, g in trials.groupby("space"):
            ax.scatter(g["test_avg_macs"], g["test_accuracy"], color=styles[space][0], marker=styles[space][1],
                       s=10, alpha=0.25, lw=0, zorder=1)
    seen, lines = set(), 0
    for r in rows:
        if r["avg_macs"] is None:  # published without MACs: a line at its accuracy, labels above and below in turn
            ax.axhline(r["test_accuracy"], color="gray", lw=0.8, ls="-.", zorder=0)
            if legend:
                ax.annotate(f"{r['model']} (MACs unknown)", (0.01, r["test_accuracy"]),
                            xycoords=("axes fraction", "data"), fontsize=7, color="dimgray",
                            va="bottom" if lines % 2 == 0 else "top")
            lines += 1
            continue
        key = ("deployed" if "deployed" in r["model"] else "pick" if "search pick" in r["model"] else "published"
               if r["model"].startswith("published") else "mobilenet" if r["model"].startswith("mobilenet")
               else r.get("space", "aebnas"))
        color, marker = styles[key]
        label = (r["model"] if key in ("deployed", "published", "pick") else None if key in seen else
                 f"{key} (3 seeds' validation picks, inherited)" if "space" in r else r["model"])
        seen.add(key)
        ax.scatter(r["avg_macs"], r["test_accuracy"], color=color, marker=marker, s=90 if key == "deployed" else 45,
                   label=label if legend else None, zorder=4 if key in ("deployed", "pick") else 3,
                   edgecolor="black" if key == "deployed" else None)
    ax.axvline(JOB.target_macs, color="gray", ls=":", lw=1, label=f"target {JOB.target_macs:g} MMACs" if legend else None)
    ax.axhline(GOAL_ACCURACY, color="gray", ls="--", lw=0.8, label=f"goal {GOAL_ACCURACY:g}%" if legend else None)
    ax.grid(alpha=0.3)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Everything on a log MACs axis (left), and the networks at the target close up (right)."""
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12.5, 5), gridspec_kw={"width_ratios": [1.35, 1]})
    trials_csv = SCRATCH / SPACES_COMPARE.key / "trials.csv"
    trials = None
    if trials_csv.is_file():
        import pandas as pd

        trials = pd.read_csv(trials_csv)
    _draw(ax, rows, trials, legend=True)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("average MMACs per test image (log scale)")
    ax.set_ylabel("test accuracy (%), 10,000 images")
    ax.set_title("Fashion-MNIST: test accuracy against average compute", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    _draw(zoom, rows, trials, legend=False)
    near = [r for r in rows if r["avg_macs"] is not None and abs(r["avg_macs"] / JOB.target_macs - 1) <= 0.15]
    if near:
        accs = [r["test_accuracy"] for r in near]
        zoom.set_ylim(min(accs) - 0.3, max(max(accs), GOAL_ACCURACY) + 0.3)
        zoom.set_xlim(0.93 * JOB.target_macs, 1.12 * JOB.target_macs)
    zoom.set_xlabel("average MMACs per test image")
    zoom.set_title(f"close up: within -7% / +12% of the target {JOB.target_macs:g} MMACs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def pct(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def write(job_dir: Path) -> int:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    supernet, deployed, job, saved = job_and_supernet(job_dir)
    spaces, claim = space_rows()
    baselines = baseline_rows()
    # claims 14 and 15 at this size: their records, as benchmarks/report.py reads them
    others = [(c, _json(DOCS_DIR / f"{c.key}.json")) for c in (SUPERNET_RANKING, SUPERNET_EQUAL_COMPUTE)]
    rows = deployed + spaces + baselines + PUBLISHED
    (RESULTS_DIR / "fashion_mnist.json").write_text(json.dumps(records(rows), indent=1) + "\n")
    png = plot(rows, RESULTS_DIR / "fashion_mnist_pareto.png")
    missing = [what for what, have in (("the job (python tune_configs/fashion_mnist.py)", job),
                                       (f"claim {SPACES_COMPARE.number} ({command(SPACES_COMPARE)})", claim),
                                       ("the mobilenet_v3_small baseline (benchmarks/harness/baseline.py)", baselines),
                                       *((f"claim {c.number} ({command(c)})", r) for c, r in others))
               if not have]
    lines = header_section(rows, png, missing, saved) + deployed_section(job)
    compute, total = compute_rows(supernet, job, claim, others, baselines)
    lines += ["## Compute", ""]
    if compute:
        lines += [md_table(compute), "", "No GPU was lent for these runs: GPU-minutes not measured.", ""]
    goals = goal_rows(deployed, claim, baselines, others, total)
    lines += ["## Goals", "", md_table(goals) if goals else "Nothing measured yet.", ""]
    # What the table shows and why is written by hand below DISCUSSION: kept when the tables are rewritten.
    kept = RESULTS_MD.read_text().partition(DISCUSSION)[2] if RESULTS_MD.is_file() else ""
    lines += [DISCUSSION + (kept or "\n\n(not written yet)\n")]
    RESULTS_MD.write_text("\n".join(lines))
    print(f"wrote {RESULTS_MD.relative_to(REPO)}, {png.relative_to(REPO)} and docs/results/fashion_mnist.json"
          + (f"; missing: {'; '.join(missing)}" if missing else ""))
    return 0


def records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """docs/results/fashion_mnist.json: one record per row of the table."""
    return [{"model": r.get("space") or ("aebnas" if r["model"].startswith("aebnas") else "mobilenet_v3_small"
                                         if r["model"].startswith("mobilenet") else r["model"]),
             "variant": r["model"], "seed": r.get("seed"), "test_accuracy": r["test_accuracy"],
             "avg_macs": r["avg_macs"], "early_exit_share": r.get("early_exit_share")} for r in rows]


def header_section(rows: list[dict[str, Any]], png: Path, missing: list[str],
                   saved: dict[str, Any] | None) -> list[str]:
    """The title, what the page is and where it came from, what is missing, and the table of every row."""
    table = [{"network": r["model"], "seed": pct(r.get("seed"), 0) if r.get("seed") is not None else "–",
              "test accuracy (%)": pct(r["test_accuracy"]), "average MMACs": pct(r["avg_macs"], 3),
              "test images leaving early (%)": pct(None if r.get("early_exit_share") is None
                                                    else 100 * r["early_exit_share"], 1)} for r in rows]
    lines = ["# Results: Fashion-MNIST at full size", "",
             f"Written by `python benchmarks/fashion_mnist_results.py` on {dt.date.today().isoformat()} "
             f"(commit {str(code_state().commit)[:10]}); machine: {machine()['cpu']}, {machine()['cores']} cores, "
             f"GPU {machine()['gpu'] or 'none'}. 54,000 training / 6,000 validation (split seed "
             f"{JOB.data_split_seed}) / 10,000 test images; every pick is made on validation, the test set only "
             "scores it. Target: "
             f"{JOB.target_macs:g} MMACs average per image (why: `tune_configs/fashion_mnist.py`).", ""]
    if missing:
        lines += ["**Not yet run, rows left out:** " + "; ".join(missing) + ".", ""]
    if saved:
        lines += [f"The job's and its supernet's figures come from [results/{JOB_RECORD.name}](results/"
                  f"{JOB_RECORD.name}): the job's run ({saved['job_dir']}) is not on this machine, or not finished; "
                  f"this script read them on {saved['read_on']} (commit {saved['commit']})"
                  + (f". {saved['note']}" if saved.get("note") else "") + ".", ""]
    image = f"![Test accuracy against average MMACs]({png.relative_to(RESULTS_MD.parent)})"
    return lines + [md_table(table), "", image, "",
                    "Rows also as JSON: [results/fashion_mnist.json](results/fashion_mnist.json).", ""]


def deployed_section(job: dict[str, Any] | None) -> list[str]:
    """The deployed network: retrained accuracy and MACs, its ONNX export on the PNG test images, exit shares."""
    if not job:
        return []
    m, p = job["metrics"], job["predict"]
    lines = ["## The deployed network", "",
             f"`python tune_configs/fashion_mnist.py`: the search's validation pick, retrained "
             f"{m['epochs']} epoch(s) from the supernet's weights, thresholds tuned on "
             f"validation: test accuracy **{m['test']['accuracy']:.2f}%** at **{m['test']['avg_macs']:.3f} "
             f"MMACs** on average (static network {m.get('static_macs', float('nan')):.3f} MMACs)."]
    if p:
        lines += [f"Its ONNX export classified the {p['images']:,} test images, written as PNG files: "
                  f"{p['accuracy']:.2f}% ({p['images_per_s']:.0f} images/s), "
                  f"{100 * p['early_exit_share']:.1f}% leaving at an early exit."]
    return lines + ["", md_table([{"exit": i + 1 if i < len(m["test"]["utilization"]) - 1 else "final",
                                   "test images taking it (%)": 100 * u}
                                  for i, u in enumerate(m["test"]["utilization"])]), ""]


def compute_rows(supernet: dict[str, Any] | None, job: dict[str, Any] | None, claim: dict[str, Any] | None,
                 others: list[tuple[Claim, dict[str, Any] | None]], baselines: list[dict[str, Any]]
                 ) -> tuple[list[dict[str, Any]], float | None]:
    """(hours of each stage of the job, the whole job, and of the runs outside it; the whole job's hours)."""
    supernet_s = supernet["seconds"] if supernet else 0.0
    compute = []
    if supernet:
        compute.append({"stage": f"supernet ({supernet['epochs']} epochs)", "wall hours (2 CPU cores)":
                        supernet_s / 3600, "CPU-hours": 2 * supernet_s / 3600})
    for name, v in (job["stages"].items() if job else []):
        compute.append({"stage": name, "wall hours (2 CPU cores)": v["seconds"] / 3600,
                        "CPU-hours": 2 * v["seconds"] / 3600})
    total = sum(c["wall hours (2 CPU cores)"] for c in compute) if compute else None  # the whole job's hours
    if total is not None:
        compute.append({"stage": "whole job", "wall hours (2 CPU cores)": total, "CPU-hours": 2 * total})
    # outside the job: the comparison's searches and the baselines
    if claim:
        compute.append({"stage": f"claim {SPACES_COMPARE.number}: 9 searches (not part of the job)",
                        "wall hours (2 CPU cores)": claim["wall_s"] / 3600, "CPU-hours": 2 * claim["wall_s"] / 3600})
    for c, r in others:
        if r:
            compute.append({"stage": f"claim {c.number}: {c.title} (not part of the job)",
                            "wall hours (2 CPU cores)": r["wall_s"] / 3600, "CPU-hours": 2 * r["wall_s"] / 3600})
    for b in baselines:
        compute.append({"stage": f"{b['model']} (not part of the job)", "wall hours (2 CPU cores)":
                        b["seconds"] / 3600, "CPU-hours": 2 * b["seconds"] / 3600})
    return compute, total


def goal_rows(deployed: list[dict[str, Any]], claim: dict[str, Any] | None, baselines: list[dict[str, Any]],
              others: list[tuple[Claim, dict[str, Any] | None]], total: float | None) -> list[dict[str, Any]]:
    """Each goal of the full-size run, what was measured, and whether it was met."""
    goals = []
    if deployed:
        d = deployed[0]
        goals.append({"goal": f"searched network ≥ {GOAL_ACCURACY:g}% at ≤ {JOB.target_macs:g} MMACs, "
                      f"≥ {GOAL_EARLY:.0%} leaving early", "measured": f"{d['test_accuracy']:.2f}% at "
                      f"{d['avg_macs']:.3f} MMACs, {100 * d['early_exit_share']:.1f}% early",
                      "met": "yes" if (d["test_accuracy"] >= GOAL_ACCURACY and d["avg_macs"] <= JOB.target_macs
                                       and d["early_exit_share"] >= GOAL_EARLY) else "**no**"})
    if claim:
        for m in claim["figures"]["margins"]:
            goals.append({"goal": f"aebnas ahead of {m['vs']} by > 1 s.e. ({m['figure']}, paired, 3 seeds)",
                          "measured": f"{m['mean difference']:+.2f} ± {m['standard error']:.2f}",
                          "met": "yes" if m["ahead by > 1 s.e."] == "yes" else "**no**"})
    if deployed and baselines:
        d, b = deployed[0], baselines[0]
        goals.append({"goal": "≥ 1 point above mobilenet_v3_small at the same MACs (or as accurate at ≤ half)",
                      "measured": f"{d['test_accuracy'] - b['test_accuracy']:+.2f} points ({d['avg_macs']:.2f} vs "
                      f"{b['avg_macs']:.2f} MMACs)",
                      "met": "yes" if d["test_accuracy"] - b["test_accuracy"] >= 1.0 or (
                          d["test_accuracy"] >= b["test_accuracy"] and d["avg_macs"] <= b["avg_macs"] / 2)
                      else "**no**"})
    for c, r in others:
        if r:
            goals.append({"goal": f"claim {c.number}: {c.goal}", "measured": r["measured"],
                          "met": holds_text(r["holds"])})
    if total is not None:
        goals.append({"goal": "whole job ≤ 6 hours on 2 CPU cores", "measured": f"{total:.2f} h",
                      "met": "yes" if total <= 6 else "**no**"})
    return goals


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, default=Path(JOB.storage_path) / job_name(JOB),
                        help="the job's directory (default: where tune_configs/fashion_mnist.py writes it)")
    sys.exit(write(parser.parse_args().job))
