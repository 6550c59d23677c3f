"""Scripts launched by tests under torchrun (one process per rank)."""
