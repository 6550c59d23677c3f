"""report.md and the terminal summary as text, from the summary alone (never files). Imports
:mod:`normopt.report.stats` and :mod:`normopt.report.cells`, never the plots."""
