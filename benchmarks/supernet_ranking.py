"""Claim 14: ranking fidelity — does the supernet rank candidates as training them alone would?

For architectures spread over the shipped supernet's space (smallest, largest, random),
the validation accuracy of the final classifier (a) as inherited (0 fine-tuning epochs),
(b) after 1 fine-tuning epoch, against (c) stand-alone training from scratch for
``standalone_epochs`` epochs, twice with different seeds. Kendall τ between (a) and the
mean stand-alone accuracy, and the noise ceiling: τ between the two stand-alone seeds.
Runs on CUDA when there is one (``device=auto``); on 2 CPU cores the stand-alone
trainings take hours (about 25 s per epoch and network), so every accuracy measured is kept in
``results/benchmarks/supernet_ranking/measured.json`` as soon as it is known, keyed by the network,
the seed, the epochs, the device, and a hash of the supernet file and of the code that trains and scores
(train, batches, data, config, settings, exit_policy, supernet, nn): a killed run started again measures
only what is missing, and a change to that code measures everything again.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any, Sequence

from _common import Claim, Context, Outcome, main, md_table

from aebnas.predictors import kendall_tau

CLAIM = Claim(14, "supernet_ranking", "Ranking fidelity of inherited accuracy",
              "Kendall τ(inherited, stand-alone ≥ 15 epochs) ≥ 0.8 × τ(stand-alone seed 0, seed 1) over ≥ 12 "
              "architectures")
SETTINGS = {"archs": 12, "standalone_epochs": 15, "seeds": (0, 1), "batch_size": 64}
QUICK = {"archs": 3, "standalone_epochs": 1, "seeds": (0, 1), "batch_size": 64}


def measure(ctx: Context, archs: int, standalone_epochs: int, seeds: Sequence[int], batch_size: int) -> Outcome:
    from aebnas.config import largest_arch, random_arch, smallest_arch
    from aebnas.data import load_dataset
    from aebnas.nn import extract
    from aebnas.settings import TrialSettings
    from aebnas.supernet import EMBEDDED_SUPERNET, load_supernet
    from aebnas.train import CandidateTraining, select_device

    device = select_device("auto")
    supernet, info = load_supernet(EMBEDDED_SUPERNET, device)
    data = load_dataset(info.dataset, val_size=info.val_size, seed=info.split_seed)
    kw = {"width_mult": info.width_mult, "num_classes": info.num_classes, "in_channels": info.in_channels}
    rng = random.Random(1)
    chosen = [smallest_arch(info.space, **kw), largest_arch(info.space, **kw)]
    chosen += [random_arch(info.space, rng, **kw) for _ in range(archs - 2)]

    store = ctx.scratch / "measured.json"
    measured_before = json.loads(store.read_text()) if store.is_file() else {}
    # What decides an accuracy: the supernet's bytes and the code that trains and scores a network.
    code = hashlib.sha256(EMBEDDED_SUPERNET.read_bytes())
    package = Path(__file__).resolve().parents[1] / "aebnas"
    for f in sorted([*(package / n for n in ("train.py", "batches.py", "data.py", "config.py", "settings.py",
                                             "exit_policy.py", "supernet.py")), *(package / "nn").glob("*.py")]):
        code.update(f.read_bytes())
    supernet_id = code.hexdigest()
    kept = {"from the store": 0, "now": 0}

    def val_accuracy(arch, epochs: int, seed: int, inherit: bool) -> float:
        key = json.dumps([arch.to_flat(), epochs, seed, inherit, batch_size, supernet_id, str(device)], sort_keys=True)
        if key in measured_before:
            kept["from the store"] += 1
        else:
            measured_before[key] = _train_and_score(arch, epochs, seed, inherit)
            kept["now"] += 1
            tmp = store.with_suffix(".tmp")
            tmp.write_text(json.dumps(measured_before))
            tmp.replace(store)
        return measured_before[key]

    def _train_and_score(arch, epochs: int, seed: int, inherit: bool) -> float:
        settings = TrialSettings(epochs=epochs, batch_size=batch_size, seed=seed, supernet="x" if inherit else None)
        run = CandidateTraining(arch, settings, data, device, model=extract(supernet, arch) if inherit else None)
        for _ in range(epochs):
            run.train_epoch()
        return float(run.evaluate(("val",))["val"].exit_accuracy()[-1])

    rows: list[dict[str, Any]] = []
    for i, arch in enumerate(chosen):
        row = {"arch": i, "resolution": arch.resolution, "depths": "".join(str(s.depth) for s in arch.stages),
               "inherited": val_accuracy(arch, 0, 0, True), "+1 epoch": val_accuracy(arch, 1, 0, True)}
        for seed in seeds:
            row[f"alone seed {seed}"] = val_accuracy(arch, standalone_epochs, seed, False)
        row["alone mean"] = sum(row[f"alone seed {s}"] for s in seeds) / len(seeds)
        rows.append(row)
        print(f"  arch {i}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if isinstance(v, float)), flush=True)

    def col(name: str) -> list[float]:
        return [r[name] for r in rows]

    tau_inherited = kendall_tau(col("inherited"), col("alone mean"))
    tau_finetuned = kendall_tau(col("+1 epoch"), col("alone mean"))
    ceiling = kendall_tau(col(f"alone seed {seeds[0]}"), col(f"alone seed {seeds[1]}"))
    holds = bool(tau_inherited >= 0.8 * ceiling) if ceiling == ceiling else "could not tell (no ceiling)"
    measured = (f"τ(inherited, alone) {tau_inherited:.2f}, τ(+1 epoch, alone) {tau_finetuned:.2f}, "
                f"ceiling τ(alone seeds) {ceiling:.2f} over {len(rows)} architectures")
    details = "\n".join([
        f"{len(rows)} architectures of the shipped supernet's space ({info.describe()}): the smallest, the largest "
        f"and {len(rows) - 2} random ones. Validation accuracy (%) of the final classifier, each network scored "
        f"as a trial scores it (BatchNorm recalibrated); stand-alone: trained from scratch for {standalone_epochs} "
        f"epochs with seeds {tuple(seeds)} (batch {batch_size}); device {device}.", "",
        md_table(rows, 1), "",
        f"Kendall τ-b: inherited vs stand-alone mean **{tau_inherited:.2f}**, after 1 fine-tuning epoch "
        f"**{tau_finetuned:.2f}**; noise ceiling (stand-alone seed {seeds[0]} vs {seeds[1]}) **{ceiling:.2f}**. "
        "With 500 validation images one image is 0.2 points, so close accuracies swap places by chance.",
        f"{kept['now']} accuracies were measured in this run and {kept['from the store']} kept from an earlier, "
        "interrupted run of the same command (same networks, seeds, epochs, supernet and device)."])
    return Outcome(measured, holds, {"rows": rows, "tau_inherited": tau_inherited, "tau_finetuned": tau_finetuned,
                                     "ceiling": ceiling}, details)


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK))
