"""torchrun worker (2 ranks): a checkpoint write refused on rank 0 alone, before DCP starts
(its non-tensor state), fails the save on both ranks instead of leaving rank 1 inside
DCP's collectives.

    NORMOPT_CHECKPOINT_TIMEOUT_S=20 torchrun --nproc_per_node=2 tests/workers/checkpoint_failure_worker.py RUN OUT

Each rank writes ``OUT.<rank>.json``: the refusal's text and how long the save took.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time

import torch

from normopt.checkpoint import manager
from normopt.errors import UserError
from normopt.parallel import collectives
from normopt.parallel.distributed import init_distributed
from normopt.run_dir import RunDir


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def main(run: str, out: str) -> None:
    info = init_distributed("cpu")
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    if info.rank == 0:
        manager.write_non_tensor_state = _disk_full
    writer = manager.CheckpointWriter(RunDir(run), info.is_main, keep_latest_k=2)
    started = time.monotonic()
    try:
        writer.save(1, model, [optimizer], {"tokens": 0, "world_size": 2})
        refusal = None
    except UserError as exc:
        refusal = str(exc)
    with open(f"{out}.{info.rank}.json", "w") as f:
        json.dump({"refusal": refusal, "seconds": time.monotonic() - started}, f)
    collectives.barrier()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
