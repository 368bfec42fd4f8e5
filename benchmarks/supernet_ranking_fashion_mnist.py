"""Claim 25: claim 14 at full size — ranking fidelity of inherited accuracy on Fashion-MNIST.

Claim 14's measurement (``supernet_ranking.measure``) on the supernet that
``tune_configs/fashion_mnist.py`` trains (width 0.5, 28 and 32 px, 16 epochs on 54,000 images),
scored on its 6,000 validation images, where one image is 0.017 points instead of 0.2 on the CIFAR-10
subset. The size this 2-core machine affords: the stand-alone networks (12 architectures × 2 seeds)
and the 1-epoch fine-tunings train on 12,000 of the 54,000 training images, drawn at random, for
3 epochs (36,000 images each, two thirds of an epoch of the full split). The 24 stand-alone trainings
took about 12 minutes on 2 cores (two single-threaded at a time), the inherited and fine-tuned scores 2;
every accuracy is kept as soon as it is measured, so a stopped run goes on where it was. With a GPU,
raise ``train_size`` and the epochs.

Needs that supernet: run ``python tune_configs/fashion_mnist.py`` from the repository root first.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import Claim, main, tune_config
from supernet_ranking import measure

JOB = tune_config("fashion_mnist", "FASHION_MNIST")  # one place for the settings of both
SUPERNET = Path(JOB.supernet_path())
CLAIM = Claim(25, "supernet_ranking_fashion_mnist", "Ranking fidelity of inherited accuracy on Fashion-MNIST",
              "Kendall τ(inherited, stand-alone) ≥ 0.8 × τ(stand-alone seed 0, seed 1) over 12 architectures of "
              "the Fashion-MNIST supernet's space, 6,000 validation images")
SETTINGS = {"archs": 12, "standalone_epochs": (3,), "seeds": (0, 1), "batch_size": JOB.batch_size, "jobs": 0,
            "supernet": str(SUPERNET), "train_size": 12_000}
QUICK = dict(SETTINGS, archs=3, standalone_epochs=(1,), train_size=500)

if __name__ == "__main__":
    if not SUPERNET.is_file():
        sys.exit(f"no Fashion-MNIST supernet at {SUPERNET}: run `python tune_configs/fashion_mnist.py` from the "
                 "repository root first (it trains one)")
    sys.exit(main(CLAIM, measure, SETTINGS, QUICK))
