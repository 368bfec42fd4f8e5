"""Claim 3: training images/s of one candidate inside a Ray Tune trial vs a plain process."""

import sys

from _common import Claim, main, measure_tune_overhead

CLAIM = Claim(3, "tune_overhead", "Ray Tune overhead",
              "training images/s inside a trial within 5% of a plain process with the same threads")
# The plain process runs at Ray's worker niceness (like for like), then once at normal priority.
# One fixed candidate: every value set of the space has one value, the only exit position is forced on.
FIXED = dict(resolutions=(32,), depths=(2,), kernels=(5,), expansions=(4,), exit_positions=(2,),
             exit_m1_channels=(8,), exit_m2_channels=(0,), exit_kernels=(3,), exit_expansions=(1,), exit_pools=(1,))
SEARCH = dict(dataset="cifar10-subset", space="aebnas", space_kwargs=FIXED, width_mult=0.5, target_macs=2.5,
              epochs=2, batch_size=64, seed=0, cpus_per_trial=1)
SETTINGS = dict(search=SEARCH, plain_niceness=(15, 15, 15, 0))
QUICK = dict(search=dict(SEARCH, width_mult=0.25, epochs=1), plain_niceness=(15,))

if __name__ == "__main__":
    sys.exit(main(CLAIM, measure_tune_overhead, SETTINGS, QUICK))
