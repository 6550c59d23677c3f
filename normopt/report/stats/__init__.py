"""The statistics of a report, as plain data (summary.json): the estimators and their intervals,
the summary itself, and the over-training, tuning and model-size analyses. Imports
:mod:`normopt.report.cells`, never the markdown or the plots."""
