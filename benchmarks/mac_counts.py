"""Claim 6: MAC counts of aebnas.cost (ptflops) vs an independent analytic count."""

import sys

from _common import Claim, main, measure_mac_counts

CLAIM = Claim(6, "mac_counts", "MAC counts",
              "`aebnas.cost` agrees with an independent per-layer count on 20 random architectures of the "
              "paper's space (largest relative difference < 1e-6)")
SETTINGS = dict(count=20, seed=0, width_mult=1.0)
QUICK = dict(SETTINGS, count=3)

if __name__ == "__main__":
    sys.exit(main(CLAIM, measure_mac_counts, SETTINGS, QUICK))
