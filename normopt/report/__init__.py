"""Reports over finished runs: reading their run directories, the statistics, tables,
markdown and plots of ``normopt report`` (entry point: :mod:`normopt.report.writer`)."""
