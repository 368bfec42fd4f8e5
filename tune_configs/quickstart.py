"""Quickstart: an AEBNAS search on the CIFAR-10 subset embedded in the package.

Every candidate inherits its weights, exit branches included, from the supernet shipped
with the package (``aebnas/_data/``, reproduced by the command in its README): it is
extracted, its BatchNorm statistics are recomputed and it is scored as it is (``epochs=0``).
Finishes in under 10 minutes on 2 CPU cores. Every flag of the full experiments works
here too (python tune_configs/quickstart.py --help); ``--epochs 1`` fine-tunes each
candidate for an epoch first.
"""

import sys

from aebnas.search.experiment import Experiment
from aebnas.search.flags import main
from aebnas.training.supernet_file import EMBEDDED_SUPERNET

QUICKSTART = Experiment(
    dataset="cifar10-subset",
    space="aebnas",
    space_kwargs={"resolutions": (32, 36, 40)},
    width_mult=0.75,
    target_macs=5.0,
    supernet=str(EMBEDDED_SUPERNET),
    epochs=0,
    num_samples=100,
    scheduler="fifo",
    batch_size=64,
    storage_path="aebnas_results",
)

if __name__ == "__main__":
    sys.exit(main(QUICKSTART, description=__doc__))
