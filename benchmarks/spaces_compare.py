"""Claim 1: searched exit branches (aebnas) vs one fixed branch (fixed_exits) vs no exits (static).

The same budget for every space and seed on the embedded CIFAR-10 subset; hypervolume
on one shared reference point, and the test accuracy of the trial picked on validation
near the target MACs; one Pareto plot. Sized for about 25-35 minutes on 2 busy cores; run
with RAY_worker_niceness=0 on a shared machine (Ray starts trials at niceness 15, and
other users' jobs then take most of the CPU).
"""

from __future__ import annotations

import sys

from _common import Claim, main
from _spaces import measure_search_spaces
from search_spaces import SPACES

CLAIM = Claim(1, "spaces_compare", "Searched branches vs fixed branches vs no exits",
              "aebnas beats fixed_exits and static at the same budget: higher hypervolume and higher test "
              "accuracy of the trial picked on validation within ±10% of the target MACs (mean of ≥ 3 seeds)")
SETTINGS = dict(spaces=tuple(SPACES), seeds=(0, 1, 2), target_macs=2.5, tolerance=0.10,
                width_mult=0.5, resolutions=(32,), epochs=2, num_samples=6, scheduler="fifo", batch_size=64)
QUICK = dict(SETTINGS, seeds=(0,), width_mult=0.25, resolutions=(32,), target_macs=1.0, epochs=1, num_samples=2)

if __name__ == "__main__":
    sys.exit(main(CLAIM, measure_search_spaces, SETTINGS, QUICK, reusable=True))
