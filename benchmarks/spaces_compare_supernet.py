"""Claim 12: claim 1 re-measured with the supernet — searched branches vs fixed branches vs no exits.

The same comparison as ``spaces_compare.py`` (claim 1), but every candidate inherits its
weights from the supernet shipped with the package (one supernet serves all three
spaces) and is scored as inherited, so each search can afford 100 candidates. Every seed
searches the supernet's train/validation split (split seed 0).
"""

from __future__ import annotations

import sys

from _common import Claim, main
from _spaces import measure_search_spaces
from search_spaces import SPACES

from aebnas.training.supernet_file import EMBEDDED_SUPERNET

CLAIM = Claim(12, "spaces_compare_supernet", "Searched vs fixed branches vs no exits, with the supernet",
              "aebnas ahead of fixed_exits and static on test hypervolume and on the test accuracy of the trial "
              "picked on validation within ±10% of the target, by more than one standard error of the paired "
              "differences (3 seeds, 100 inherited candidates per space and seed)")
SETTINGS = dict(spaces=tuple(SPACES), seeds=(0, 1, 2), target_macs=5.0, tolerance=0.10,
                width_mult=0.75, resolutions=(32, 36, 40), epochs=0, num_samples=100, scheduler="fifo", batch_size=64,
                supernet=str(EMBEDDED_SUPERNET), split_seed=0, figure="spaces_compare_supernet_pareto")
QUICK = dict(SETTINGS, seeds=(0, 1), num_samples=3)

if __name__ == "__main__":
    sys.exit(main(CLAIM, measure_search_spaces, SETTINGS, QUICK, reusable=True))
