"""The report's PNG plots (matplotlib's Agg renderer). Imports :mod:`normopt.report.stats` and
:mod:`normopt.report.cells`, never the markdown."""
