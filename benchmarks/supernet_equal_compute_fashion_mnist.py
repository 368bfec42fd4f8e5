"""Claim 26: claim 15 on Fashion-MNIST — supernet + inherited search against a from-scratch search at equal
compute, 3 seeds, paired standard errors.

Claim 15's measurement (``supernet_equal_compute.measure``) with the data, space and target of
``tune_configs/fashion_mnist.py`` (54,000 training / 6,000 validation images, split seed 0 as the job;
10,000 test images; width 0.5 at 28 and 32 px; 3 MMACs). The size this 2-core machine affords: each seed
trains its own supernet for 1 epoch of the 54,000 images (about 5 minutes) and scores 30 inherited
candidates; the from-scratch search gets those seconds, each candidate trained 1 epoch (one epoch of
54,000 images already takes a small network past 80% here). About 15 minutes a seed. Fashion-MNIST's
ceiling is near 93%, so claim 15's 10-point gain cannot happen here: the goal is to be ahead by more
than one standard error of the paired differences, with ≥ 30% of test images leaving early.
"""

from __future__ import annotations

import sys

from _common import Claim, main, tune_config
from supernet_equal_compute import measure

JOB = tune_config("fashion_mnist", "FASHION_MNIST")  # one place for the settings of both
CLAIM = Claim(26, "supernet_equal_compute_fashion_mnist",
              "Supernet + search vs from-scratch search at equal compute on Fashion-MNIST",
              "at the same seconds on the same cores (the supernet's training counts), the validation-picked network "
              "within ±10% of the target is ahead on test by more than one standard error of the paired "
              "differences (3 seeds), and sends ≥ 30% of test images out early")
SETTINGS = dict(supernet_epochs=1, num_samples=30, scratch_epochs=1, target_macs=JOB.target_macs, tolerance=0.10,
                width_mult=JOB.width_mult, resolutions=tuple(JOB.space_kwargs["resolutions"]),
                batch_size=JOB.batch_size, seeds=(0, 1, 2), dataset=JOB.dataset, val_size=JOB.val_size,
                split_seed=JOB.data_split_seed, min_gain=0.0, min_early=30.0)
# A quick check of the script on the embedded subset (Fashion-MNIST's 16,000 images to score make any run long).
QUICK = dict(SETTINGS, seeds=(0, 1), num_samples=2, dataset="cifar10-subset", val_size=None, width_mult=0.25,
             resolutions=(32,), target_macs=1.0)

if __name__ == "__main__":
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK, reusable=True))
