"""Claim 7: search throughput with 1 and 2 concurrent trials (one CPU each) on this machine."""

import sys

from _common import Claim, main, measure_search_throughput

CLAIM = Claim(7, "search_throughput", "Search throughput scaling",
              "trials per hour with 1 and 2 concurrent trials (one CPU each); what to expect on a cluster")
SEARCH = dict(dataset="cifar10-subset", space="aebnas", space_kwargs={"resolutions": (32,)}, width_mult=0.5,
              target_macs=2.5, epochs=1, num_samples=4, batch_size=64, seed=0)
SETTINGS = dict(search=SEARCH, concurrency=(1, 2))
QUICK = dict(search=dict(SEARCH, width_mult=0.25, num_samples=2, target_macs=1.0), concurrency=(1, 2))

if __name__ == "__main__":
    sys.exit(main(CLAIM, measure_search_throughput, SETTINGS, QUICK))
