"""torchrun worker (4 ranks): the sub-groups of an HSDP mesh follow the phase's timeout.

    NORMOPT_STEP_TIMEOUT_S=2 torchrun --nproc_per_node=4 tests/workers/phase_timeout_worker.py OUT.json

The default group starts with the start-up timeout (30 minutes), the 2 x 2 mesh is built, and
the phase becomes "step". Rank 3 then stays away while rank 2, its partner in the dp_shard
group, all-reduces over that group, and again over a row-block team made by
``collectives.new_group``: each must fail within the step timeout. Rank 2 writes how long
each took to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

from normopt.parallel import collectives
from normopt.parallel.distributed import data_parallel_mesh
from normopt.parallel.timeouts import collective_timeout


def _timed_all_reduce(group) -> dict:
    started = time.monotonic()
    try:
        collectives.all_reduce_sum(torch.ones(1), group)
        failed = None
    except Exception as exc:  # noqa: BLE001 - the timeout is what is measured
        failed = type(exc).__name__
    return {"seconds": time.monotonic() - started, "failed": failed}


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=collective_timeout("start-up"))
    rank = collectives.rank()
    mesh = data_parallel_mesh("cpu", 2, 2)
    team = collectives.new_group([2, 3])
    collectives.barrier()
    collectives.set_phase_timeout("step")
    if rank == 2:
        seen = {"dp_shard": _timed_all_reduce(mesh.get_group("dp_shard")), "team": _timed_all_reduce(team)}
        with open(out, "w") as f:
            json.dump(seen, f)
    elif rank == 3:
        time.sleep(8)  # past rank 2's two 2 s timeouts
    sys.stdout.flush()
    os._exit(0)  # a group with a timed-out collective cannot be torn down cleanly


if __name__ == "__main__":
    main(sys.argv[1])
