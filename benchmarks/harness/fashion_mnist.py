"""The Fashion-MNIST job at full size, as its benchmarks and docs/results.md share it.

``JOB`` is the Experiment of ``tune_configs/fashion_mnist.py`` (one place for the settings of the job and
of the claims measured on its data), ``SUPERNET`` the supernet file that job trains. Claims 23, 25 and 26
(and 29, claim 23 at a tighter target) are the ``fashion_mnist`` variants of ``spaces_compare.py``, ``supernet_ranking.py`` and
``supernet_equal_compute.py``; ``fashion_mnist_results.py`` reads their records into docs/results.md.
"""

from __future__ import annotations

from pathlib import Path

from .claims import Claim
from .common import tune_config

JOB = tune_config("fashion_mnist", "FASHION_MNIST")
SUPERNET = Path(JOB.supernet_path())
VARIANT = "fashion_mnist"  # the --variant of the scripts below that measures a claim on this job's data
NO_SUPERNET = (f"no Fashion-MNIST supernet at {SUPERNET}: run `python tune_configs/fashion_mnist.py` from the "
               "repository root first (it trains one)")

SPACES_COMPARE = Claim(
    23, "spaces_compare_fashion_mnist", "Searched vs fixed branches vs no exits on Fashion-MNIST",
    "aebnas ahead of fixed_exits and static on test hypervolume and on the test accuracy of the trial "
    "picked on validation within ±10% of the target, by more than one standard error of the paired "
    "differences (3 seeds, inherited candidates from the Fashion-MNIST supernet, 10,000 test images)")
TIGHT_TARGET = 1.5  # MMACs: near the bottom of the job's space (1.4–5.7 static at 32 px), where a branch's cost bites
SPACES_COMPARE_TIGHT = Claim(
    29, "spaces_compare_fashion_mnist_tight",
    f"Searched vs fixed branches vs no exits on Fashion-MNIST at {TIGHT_TARGET:g} MMACs",
    "claim 23's goal at a target where a branch's cost is a large share of the budget: aebnas ahead of "
    "fixed_exits and static on test hypervolume and on the test accuracy of the trial picked on validation "
    "within ±10% of the target, by more than one standard error of the paired differences (3 seeds)")
SUPERNET_RANKING = Claim(
    25, "supernet_ranking_fashion_mnist", "Ranking fidelity of inherited accuracy on Fashion-MNIST",
    "Kendall τ(inherited, stand-alone) ≥ 0.8 × τ(stand-alone seed 0, seed 1) over 12 architectures of "
    "the Fashion-MNIST supernet's space, 6,000 validation images")
SUPERNET_EQUAL_COMPUTE = Claim(
    26, "supernet_equal_compute_fashion_mnist",
    "Supernet + search vs from-scratch search at equal compute on Fashion-MNIST",
    "at the same seconds on the same cores (the supernet's training counts), the validation-picked network "
    "within ±10% of the target is ahead on test by more than one standard error of the paired "
    "differences (3 seeds), and sends ≥ 30% of test images out early")
SCRIPTS = {SPACES_COMPARE: "spaces_compare", SUPERNET_RANKING: "supernet_ranking",
           SUPERNET_EQUAL_COMPUTE: "supernet_equal_compute"}


def command(claim: Claim) -> str:
    """The command that measures one of these claims."""
    return f"python benchmarks/{SCRIPTS[claim]}.py --variant {VARIANT}"
