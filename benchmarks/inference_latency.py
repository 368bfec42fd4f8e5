"""Claim 5: dynamic inference pays in CPU time, not only in MACs.

Uses the best aebnas trial of claim 1's searches (run benchmarks/spaces_compare.py first), its
thresholds re-tuned on validation for a deeper MAC cut so that exits are really taken.
"""

import sys

from _common import SCRATCH, Claim, main, measure_inference_latency

CLAIM = Claim(5, "inference_latency", "Dynamic inference pays in time",
              "CPU speed-up of `infer` over the same network run to the final exit ≥ 0.7 × the MAC speed-up "
              "(batch 1 and 64, 1 and 2 threads)")
SETTINGS = dict(experiments=[str(p) for p in sorted((SCRATCH / "spaces_compare").glob("aebnas_seed*"))],
                target_fraction=0.6, grid=(0.01, 0.02, 0.05, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0),
                batch_sizes=(1, 64), images={1: 200, 64: 256}, threads=(1, 2), repeats=10,
                warmup=2)
QUICK = dict(SETTINGS, experiments=[str(p) for p in sorted((SCRATCH / "quick" / "spaces_compare").glob("aebnas_seed*"))],
             images={1: 20, 64: 64}, repeats=2, warmup=1)

if __name__ == "__main__":
    sys.exit(main(CLAIM, measure_inference_latency, SETTINGS, QUICK))
