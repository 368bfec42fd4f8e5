"""The benchmark harness: what every script under ``benchmarks/`` imports, and nothing else does.

- :mod:`harness.claims`: ``Claim`` (a claim of docs/benchmarks.md) and ``Variant`` (one setup of a
  script that measures its claim on several, chosen with ``--variant``);
- :mod:`harness.common`: the command line of a script (``main``), the machine, the result files,
  searches and their provenance, markdown helpers;
- :mod:`harness.tables`: markdown tables of rows (``md_table``, ``fmt``; ``common`` hands them on);
- :mod:`harness.rows`: rows on disk as they are measured (``<claim>.partial.jsonl``) and pages rewritten after each
  section, so a benchmark stopped by a time limit keeps what it finished; SIGTERM raised as ``TimeLimit``;
- :mod:`harness.report`: rebuilds docs/benchmarks.md from the result files (``python benchmarks/report.py``);
- :mod:`harness.picks`: the trial one would deploy, paired differences over seeds, proposal order;
- :mod:`harness.spaces`: the comparison of the three search spaces (``spaces_compare.py``'s variants);
- :mod:`harness.latency`: the latency table, networks built from the shipped supernet, timing per image;
- :mod:`harness.fashion_mnist`: the Fashion-MNIST job's settings and claims, shared by the scripts that
  measure them and ``fashion_mnist_results.py``;
- :mod:`harness.op_count`: kernel-calling operators of a callable (``count_kernel_ops``), of one supernet
  training step (``sandwich_step_ops``) or a plain network's (``plain_step_ops``), counted with ``torch.profiler``;
- :mod:`harness.baseline`: torchvision's ``mobilenet_v3_small`` trained alone, the reference row of
  docs/results.md (also a command: ``python benchmarks/harness/baseline.py --help``).

Scripts are run from the repository root as ``python benchmarks/<script>.py``: ``benchmarks/`` is then
the first entry of ``sys.path``, so ``import harness`` finds this package. No script imports another.
"""
