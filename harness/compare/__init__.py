"""Compare results CSVs: statistics, verdicts, tables, plots, the HTML report and the gate.

* :mod:`harness.compare.load`   :func:`harness.results.load` frames grouped by scenario
* :mod:`harness.compare.stats`  per-metric statistics and the verdict rule
* :mod:`harness.compare.table`  terminal (rich), markdown and CSV renderings
* :mod:`harness.compare.plots`  matplotlib (Agg) figures as PNG bytes
* :mod:`harness.compare.provenance` what each side ran on (kernels, QEMU, host, scenario keys)
* :mod:`harness.compare.report` the self-contained HTML report
* :mod:`harness.compare.gate`   ``--fail-on METRIC:+PCT`` regression gate
"""
