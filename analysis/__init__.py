"""Analysis of aebnas searches from their experiment directories (see docs/analysis.md).

``results`` (directories → DataFrames), ``pareto`` (front, hypervolume), ``posthoc``
(thresholds re-tuned from saved exit outputs), ``plots`` (figures) and ``__main__``
(``python -m analysis`` / ``aebnas analyze``).
"""
