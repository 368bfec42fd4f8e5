"""AEBNAS on SVHN with the paper's settings.

Resolution 32–72 (step 4), validation split of 7325 training images, target 1.0 MMACs
(the authors' command), a supernet of the space trained first (60 epochs, on Ray Train; reused from the storage
path when it is already there, resumed when it was interrupted), then every candidate
inherits its weights and fine-tunes 5 epochs; the surrogate-assisted NSGA-II searcher proposes 100
candidates in batches of 8, ASHA on the fine-tuning epochs. The data comes from torchvision: pass
--download, or --data-dir pointing at a directory holding it in torchvision's layout
(from http://ufldl.stanford.edu/housenumbers/ (train_32x32.mat, test_32x32.mat)).
Every setting has a flag: python tune_configs/svhn.py --help
"""

import sys

from aebnas.search.experiment import paper_experiment
from aebnas.search.flags import main

PAPER = paper_experiment("svhn", target_macs=1.0, val_size=7325)

if __name__ == "__main__":
    sys.exit(main(PAPER, description=__doc__))
