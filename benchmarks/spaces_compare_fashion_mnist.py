"""Claim 23: claim 12 at full size — searched vs fixed branches vs no exits on Fashion-MNIST.

The comparison of claim 12 (``_spaces.measure_search_spaces``) with the settings of
``tune_configs/fashion_mnist.py``: 54,000 training / 6,000 validation / 10,000 test images,
the Fashion-MNIST supernet that job trains (one supernet serves all three spaces), the
surrogate-assisted NSGA-II, target 3 MMACs. With 10,000 test images one image is 0.01 points,
where on the 761 test images of the CIFAR-10 subset it was 0.13: differences between the spaces
that claim 12 could not see become measurable.

Needs that supernet: run ``python tune_configs/fashion_mnist.py`` from the repository root first
(it trains it under aebnas_results/, about 2 hours on 2 CPU cores, and resumes when interrupted).
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import Claim, main, tune_config
from _spaces import measure_search_spaces
from search_spaces import SPACES


JOB = tune_config("fashion_mnist", "FASHION_MNIST")  # one place for the settings of both
SUPERNET = Path(JOB.supernet_path())
CLAIM = Claim(23, "spaces_compare_fashion_mnist", "Searched vs fixed branches vs no exits on Fashion-MNIST",
              "aebnas ahead of fixed_exits and static on test hypervolume and on the test accuracy of the trial "
              "picked on validation within ±10% of the target, by more than one standard error of the paired "
              "differences (3 seeds, inherited candidates from the Fashion-MNIST supernet, 10,000 test images)")
SETTINGS = dict(spaces=tuple(SPACES), seeds=(0, 1, 2), target_macs=JOB.target_macs, tolerance=0.10,
                width_mult=JOB.width_mult, resolutions=tuple(JOB.space_kwargs["resolutions"]), epochs=0,
                num_samples=40, scheduler="fifo", batch_size=JOB.batch_size, supernet=str(SUPERNET),
                split_seed=JOB.data_split_seed, val_size=JOB.val_size, dataset=JOB.dataset,
                search_alg=JOB.search_alg, surrogate_batch=JOB.surrogate_batch,
                figure="spaces_compare_fashion_mnist_pareto")
QUICK = dict(SETTINGS, seeds=(0, 1), num_samples=3, search_alg="random")

if __name__ == "__main__":
    if not Path(SUPERNET).is_file():
        sys.exit(f"no Fashion-MNIST supernet at {SUPERNET}: run `python tune_configs/fashion_mnist.py` from the "
                 "repository root first (it trains one)")
    sys.exit(main(CLAIM, measure_search_spaces, SETTINGS, QUICK, reusable=True))
