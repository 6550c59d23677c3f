"""Factorial experiments: the grid spec (``spec``), its cells (``cells``), the runner and
``normopt factorial`` (``runner``) and the SLURM array (``slurm``). A finished grid is
reported by :mod:`normopt.report`."""
