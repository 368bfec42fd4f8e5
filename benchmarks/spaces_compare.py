"""Claims 1, 12 and 23: searched exit branches (aebnas) vs one fixed branch (fixed_exits) vs no exits (static).

The same budget for every space and seed; hypervolume on one shared reference point, and the test
accuracy of the trial picked on validation near the target MACs; one Pareto plot
(:func:`harness.spaces.measure_search_spaces`). Four variants, each its own section (``--variant``):

- ``cifar10_subset`` (claim 1, the default): candidates trained from scratch on the embedded CIFAR-10
  subset. Sized for about 25-35 minutes on 2 busy cores.
- ``supernet`` (claim 12): claim 1 re-measured with the supernet: every candidate inherits its weights from
  the supernet shipped with the package (one supernet serves all three spaces) and is scored as inherited,
  so each search can afford 100 candidates. Every seed searches the supernet's train/validation split
  (split seed 0).
- ``fashion_mnist`` (claim 23): claim 12 at full size, with the settings of ``tune_configs/fashion_mnist.py``:
  54,000 training / 6,000 validation / 10,000 test images, the Fashion-MNIST supernet that job trains (one
  supernet serves all three spaces), the surrogate-assisted NSGA-II, target 3 MMACs. With 10,000 test images
  one image is 0.01 points, where on the 761 test images of the CIFAR-10 subset it was 0.13: differences
  between the spaces that claim 12 could not see become measurable. Needs that supernet: run
  ``python tune_configs/fashion_mnist.py`` from the repository root first (it trains it under
  aebnas_results/, about 2 hours on 2 CPU cores, and resumes when interrupted).
- ``fashion_mnist_tight`` (claim 29): claim 23 at 1.5 MMACs, near the bottom of that space, where an exit
  branch's cost is a large share of the budget (the paper's branches cost 0.05–28 MMACs at width 1.0).

Run with RAY_worker_niceness=0 on a shared machine (Ray starts trials at niceness 15, and other users'
jobs then take most of the CPU).
"""

from __future__ import annotations

import sys

from harness import fashion_mnist
from harness.claims import Claim, Variant
from harness.common import main_with_variants
from harness.spaces import measure_search_spaces
from search_spaces import SPACES

from aebnas.training.supernet_file import EMBEDDED_SUPERNET

CIFAR10_SUBSET = dict(spaces=tuple(SPACES), seeds=(0, 1, 2), target_macs=2.5, tolerance=0.10,
                      width_mult=0.5, resolutions=(32,), epochs=2, num_samples=6, scheduler="fifo", batch_size=64)
SUPERNET = dict(spaces=tuple(SPACES), seeds=(0, 1, 2), target_macs=5.0, tolerance=0.10,
                width_mult=0.75, resolutions=(32, 36, 40), epochs=0, num_samples=100, scheduler="fifo", batch_size=64,
                supernet=str(EMBEDDED_SUPERNET), split_seed=0, figure="spaces_compare_supernet_pareto")
JOB = fashion_mnist.JOB
FASHION_MNIST = dict(spaces=tuple(SPACES), seeds=(0, 1, 2), target_macs=JOB.target_macs, tolerance=0.10,
                     width_mult=JOB.width_mult, resolutions=tuple(JOB.space_kwargs["resolutions"]), epochs=0,
                     num_samples=40, scheduler="fifo", batch_size=JOB.batch_size, supernet=str(fashion_mnist.SUPERNET),
                     split_seed=JOB.data_split_seed, val_size=JOB.val_size, dataset=JOB.dataset,
                     search_alg=JOB.search_alg, surrogate_batch=JOB.surrogate_batch,
                     figure="spaces_compare_fashion_mnist_pareto")
FASHION_MNIST_TIGHT = dict(FASHION_MNIST, target_macs=fashion_mnist.TIGHT_TARGET,
                           figure="spaces_compare_fashion_mnist_tight_pareto")

VARIANTS = {
    "cifar10_subset": Variant(
        Claim(1, "spaces_compare", "Searched branches vs fixed branches vs no exits",
              "aebnas beats fixed_exits and static at the same budget: higher hypervolume and higher test "
              "accuracy of the trial picked on validation within ±10% of the target MACs (mean of ≥ 3 seeds)"),
        CIFAR10_SUBSET,
        quick=dict(CIFAR10_SUBSET, seeds=(0,), width_mult=0.25, resolutions=(32,), target_macs=1.0, epochs=1,
                   num_samples=2)),
    "supernet": Variant(
        Claim(12, "spaces_compare_supernet", "Searched vs fixed branches vs no exits, with the supernet",
              "aebnas ahead of fixed_exits and static on test hypervolume and on the test accuracy of the trial "
              "picked on validation within ±10% of the target, by more than one standard error of the paired "
              "differences (3 seeds, 100 inherited candidates per space and seed)"),
        SUPERNET, quick=dict(SUPERNET, seeds=(0, 1), num_samples=3)),
    fashion_mnist.VARIANT: Variant(
        fashion_mnist.SPACES_COMPARE, FASHION_MNIST,
        quick=dict(FASHION_MNIST, seeds=(0, 1), num_samples=3, search_alg="random"),
        needs=fashion_mnist.SUPERNET, missing=fashion_mnist.NO_SUPERNET),
    f"{fashion_mnist.VARIANT}_tight": Variant(
        fashion_mnist.SPACES_COMPARE_TIGHT, FASHION_MNIST_TIGHT,
        quick=dict(FASHION_MNIST_TIGHT, seeds=(0, 1), num_samples=3, search_alg="random"),
        needs=fashion_mnist.SUPERNET, missing=fashion_mnist.NO_SUPERNET),
}

if __name__ == "__main__":
    sys.exit(main_with_variants(VARIANTS, measure_search_spaces, reusable=True))
