"""Quickstart: a small AEBNAS search on the CIFAR-10 subset embedded in the package.

Finishes in under 10 minutes on 2 CPU cores. Every flag of the full experiments works
here too (python tune_configs/quickstart.py --help).
"""

import sys

from aebnas.experiment import Experiment, main

QUICKSTART = Experiment(
    dataset="cifar10-subset",
    space="aebnas",
    space_kwargs={"resolutions": (32, 36, 40)},
    width_mult=0.75,
    target_macs=5.0,
    epochs=4,
    num_samples=12,
    scheduler="asha",
    grace_period=1,
    reduction_factor=2,
    batch_size=64,
    storage_path="aebnas_results",
)

if __name__ == "__main__":
    sys.exit(main(QUICKSTART, description=__doc__))
