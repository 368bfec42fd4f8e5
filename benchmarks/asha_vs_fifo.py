"""Claim 2: ASHA vs FIFO on the same space, seed and candidates: compute spent and best score."""

import sys

from _common import Claim, main, measure_asha_vs_fifo

CLAIM = Claim(2, "asha_vs_fifo", "ASHA vs FIFO",
              "ASHA reaches FIFO's best score with less compute (ratio of CPU-seconds FIFO / ASHA > 1)")
SEARCH = dict(dataset="cifar10-subset", space="aebnas", space_kwargs={"resolutions": (32,)}, width_mult=0.5,
              target_macs=2.5, epochs=3, num_samples=6, batch_size=64, seed=0, grace_period=1, reduction_factor=2)
SETTINGS = dict(search=SEARCH, schedulers=("fifo", "asha"))
QUICK = dict(search=dict(SEARCH, width_mult=0.25, space_kwargs={"resolutions": (32,)}, target_macs=1.0, epochs=2,
                         num_samples=4), schedulers=("fifo", "asha"))

if __name__ == "__main__":
    sys.exit(main(CLAIM, measure_asha_vs_fifo, SETTINGS, QUICK))
