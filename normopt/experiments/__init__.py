"""Experiment-level tools that read finished run directories (reports over factorial cells)."""
