"""Claim 6: MAC counts of aebnas.cost.macs (ptflops) vs an independent analytic count."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from harness.claims import Claim
from harness.common import Context, Outcome, main, md_table

CLAIM = Claim(6, "mac_counts", "MAC counts",
              "`aebnas.cost.macs` agrees with an independent per-layer count on 20 random architectures of the "
              "paper's space (largest relative difference < 1e-6)")
SETTINGS = dict(count=20, seed=0, width_mult=1.0)
QUICK = dict(SETTINGS, count=3)


def random_paper_archs(count: int, seed: int, width_mult: float) -> list[Any]:
    """``count`` architectures sampled from the paper's search space (``search_spaces.aebnas_space``)."""
    from ray.tune.search.sample import Domain

    from aebnas.config import ArchConfig
    from search_spaces import aebnas_space

    rng = np.random.default_rng(seed)
    space = aebnas_space()
    return [ArchConfig.from_flat({**{k: v.sample(random_state=rng) if isinstance(v, Domain) else v
                                     for k, v in space.items()}, "width_mult": width_mult})
            for _ in range(count)]


def measure_mac_counts(ctx: Context, count: int, seed: int, width_mult: float) -> Outcome:
    """Claim 6: ``aebnas.cost.macs`` (ptflops) vs the analytic count of ``aebnas.reference``: every segment and
    every C_i."""
    from aebnas.cost.macs import exit_costs, segment_macs
    from aebnas.reference import analytic_exit_macs, analytic_segment_macs, loop_costs

    rows, worst_seg, worst_c = [], 0.0, 0.0
    for i, arch in enumerate(random_paper_archs(count, seed, width_mult)):
        ours, mine = segment_macs(arch), analytic_segment_macs(arch)
        if set(ours) != set(mine):
            raise RuntimeError(f"architecture {i}: segments differ: {sorted(ours)} vs {sorted(mine)}")
        seg_diff = max(abs(ours[k] - mine[k]) / mine[k] for k in mine)
        c_ours = exit_costs(arch).cumulative()
        c_mine = np.array(loop_costs(analytic_exit_macs(arch), [0.0] * arch.num_exits))  # every exit active
        c_diff = float(np.max(np.abs(c_ours - c_mine) / c_mine))
        worst_seg, worst_c = max(worst_seg, seg_diff), max(worst_c, c_diff)
        rows.append({"#": i, "resolution": arch.resolution, "depths": "".join(str(s.depth) for s in arch.stages),
                     "exits": ",".join(map(str, arch.exit_positions)), "static MMACs (cost.py)": c_ours[-1],
                     "static MMACs (analytic)": c_mine[-1], "largest segment diff": f"{seg_diff:.2e}",
                     "largest C_i diff": f"{c_diff:.2e}"})
    measured = f"largest relative difference {worst_c:.2e} over every C_i ({worst_seg:.2e} over segments)"
    details = "\n".join([
        f"{count} architectures sampled (seed {seed}) from the paper's space (`search_spaces.aebnas_space()`: "
        f"resolutions 32–72, depths, kernels, expansions, exits and branches), width {width_mult}. 'cost.py' is "
        "`aebnas.cost.macs` (ptflops, aten backend, per segment); 'analytic' is `aebnas.reference.analytic_segment_macs`: "
        "per-layer formulas walking the ArchConfig (its own channel rounding and output sizes; convolutions and "
        "linear layers, one extra MAC per output for a bias; nothing element-wise, the convention cost.py "
        "documents), and C_i from those segments by `aebnas.reference.loop_costs`, every exit active. The tests "
        "check cost.py against the same reference on hand-picked architectures (`tests/test_cost.py`).", "",
        md_table(rows, 3), "",
        f"Largest relative difference: **{worst_c:.2e}** over every C_i, {worst_seg:.2e} over every segment.",
    ])
    return Outcome(measured=measured, holds=bool(worst_c < 1e-6),
                   figures={"max_rel_diff_costs": worst_c, "max_rel_diff_segments": worst_seg}, details=details)


if __name__ == "__main__":
    sys.exit(main(CLAIM, measure_mac_counts, SETTINGS, QUICK))
