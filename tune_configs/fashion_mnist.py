"""AEBNAS on Fashion-MNIST at full size: the whole job, from supernet to a deployed network.

The paper's protocol on 70,000 real images (docs/results.md has the table it produces):

1. **Supernet.** 6,000 validation images drawn from the 60,000 training images (split seed 0), and
   a supernet of the aebnas space trained 16 epochs on the other 54,000 (sandwich rule, the first
   quarter on the largest subnet alone). Inputs are 28x28 grayscale, so the resolutions are 28
   (native) and 32, and the width is 0.5: at 32 px the space then spans 1.4 to 5.7 MMACs per
   static network, with the target in its middle.
2. **Search.** The paper's surrogate-assisted NSGA-II proposes 100 candidates (8 per batch after
   16 random ones). Each inherits its weights, exit branches included, from the supernet and is
   scored as it is (BatchNorm recalibrated, thresholds tuned on the 6,000 validation images): on
   2 CPU cores one fine-tuning epoch of 54,000 images costs a candidate about 3 minutes, 100 times
   the scoring. With a GPU, ``--epochs 2 --scheduler asha`` (or ``moasha``) fine-tunes each
   candidate with early stopping.
3. **Target: 3 MMACs** average per image. A microcontroller of the Cortex-M7 class runs int8
   convolutions at roughly 0.2-0.5 GMAC/s, so 3 MMACs is about 10 ms an image there, and fits
   its few hundred KB of SRAM at width 0.5. (The 2-conv network of the Fashion-MNIST benchmark
   table, 92.5%, costs about 10 MMACs.)
4. **Retrain** the validation pick 5 epochs from the supernet's weights (``aebnas retrain --best
   --inherit``), **export** it to ONNX (``aebnas export --format onnx``) and **classify** the
   10,000 test images, written as PNG files, with the export (``aebnas predict``'s code): its
   accuracy must equal the one the retrained run reports.

Every stage resumes: rerun the same command after an interruption. Results go to
aebnas_results/aebnas_fashion-mnist_s0 (the supernet beside it); ``--space fixed_exits`` or
``static`` and ``--seed`` run the baselines of the table under their own names.

The data: Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``:
the four idx .gz files under /usr/share/datasets/fashion-mnist, found there), ``--data-dir`` with
those files, or ``--download``. Needs the onnx extra: pip install -e ".[onnx]".
Every setting has a flag: python tune_configs/fashion_mnist.py --help
"""

import sys

from aebnas.search.experiment import Experiment
from aebnas.pipeline import Deployment, job_main

FASHION_MNIST = Experiment(
    dataset="fashion-mnist",
    val_size=6000,
    space="aebnas",
    space_kwargs={"resolutions": (28, 32)},
    width_mult=0.5,
    target_macs=3.0,
    supernet_epochs=16,
    supernet_workers=0,  # one machine: in the driver's process (--supernet-workers N on a cluster)
    epochs=0,
    num_samples=100,
    search_alg="surrogate",
    surrogate_batch=8,
    scheduler="fifo",
    storage_path="aebnas_results",
)
DEPLOY = Deployment(retrain_epochs=5, inherit=True)

if __name__ == "__main__":
    sys.exit(job_main(FASHION_MNIST, DEPLOY, description=__doc__))
