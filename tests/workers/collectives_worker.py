"""torchrun worker: normopt.parallel.collectives on real gloo ranks.

    torchrun --nproc_per_node=N tests/workers/collectives_worker.py OUT.json

Every rank runs each collective with rank-dependent inputs; rank 0 writes what it saw to
OUT.json for the test to compare with the values the collectives must produce.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from normopt.parallel import collectives


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = collectives.rank(), collectives.world_size()
    seen = {"rank": rank, "world": world, "device": str(collectives.group_device())}
    seen["sum"] = collectives.all_reduce_sum(torch.tensor([rank + 1.0, 2.0 * rank])).tolist()
    seen["max"] = collectives.all_reduce(torch.tensor([float(rank)]), "max").tolist()
    seen["min"] = collectives.all_reduce(torch.tensor([float(rank)]), "min").tolist()
    seen["any_last"] = collectives.any_rank(rank == world - 1)
    seen["any_none"] = collectives.any_rank(False)
    seen["broadcast"] = collectives.broadcast_object({"from": rank} if rank == 0 else None)
    seen["objects"] = collectives.all_gather_object({"rank": rank})
    seen["gathered"] = [t.tolist() for t in collectives.all_gather(torch.full((2,), float(rank)))]
    sub = collectives.new_group(list(range(world)))
    seen["group_sum"] = collectives.all_reduce_sum(torch.ones(1), sub).tolist()
    collectives.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(seen, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
