"""Entry point: ``python train.py --config PATH [section.key=value ...]``, or the same
under ``torchrun --nproc_per_node=N`` for N ranks."""

import sys

from normopt.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
