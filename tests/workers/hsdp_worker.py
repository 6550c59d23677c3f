"""torchrun worker: Muon/NorMuon under HSDP (2-D mesh) and FSDP against one process.

    torchrun --nproc_per_node=4 tests/workers/hsdp_worker.py OUT.pt

The runs of ``muon_worker`` (same models, gradients, options and single-process reference),
on every data-parallel layout R x S of the world size in LAYOUTS: R replica groups of S
shards (``normopt.parallel.distributed.data_parallel_mesh``; R = 1 is plain FSDP). Each rank
saves its full parameters after the run (gathered within its shard group, so every replica
reports its own copy) and its exchange statistics, so the test can check that every
replica equals the reference bit for bit and that each shard group computes each NS job
once. Teardown releases the FSDP modules before destroy_process_group (stack notes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

from normopt.parallel.distributed import data_parallel_mesh
from tests.workers.muon_worker import MATH_OPTIONS, OPTIMIZERS, VARIANTS, run_fsdp, run_reference, save_and_finish

# (case, gradient source, variant): whole matrices and expert stacks with injected and
# real gradients, per-head blocks, a bucket per job, batched NS, row-block teams (which
# must form within a shard group) and Gram NS
RUNS = [
    ("uneven", "inject", "default"),
    ("uneven", "backward", "default"),
    ("experts", "backward", "default"),
    ("heads", "inject", "default"),
    ("uneven", "inject", "buckets"),
    ("repeated", "inject", "batched"),
    ("few", "inject", "row_blocks"),
    ("uneven", "inject", "gram"),
]
REPLICATED_TOO = ("default",)  # ns_mode="replicated" also runs for these variants (case "uneven" only)
# (replicate, shard) layouts of 4 ranks
LAYOUTS = {4: [(2, 2), (1, 4)]}


def math_key(variant: str) -> tuple:
    return tuple(sorted((k, v) for k, v in VARIANTS[variant].items() if k in MATH_OPTIONS))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict = {"world_size": world, "layouts": LAYOUTS[world], "fsdp": {}, "exchange": {}, "reference": {}}
    for replicate, shard in LAYOUTS[world]:
        mesh = data_parallel_mesh("cpu", replicate, shard)
        for case, source, variant in RUNS:
            modes = (
                ("distributed", "replicated") if variant in REPLICATED_TOO and case == "uneven" else ("distributed",)
            )
            for opt_name in OPTIMIZERS:
                if rank == 0 and (case, opt_name, source, math_key(variant)) not in results["reference"]:
                    results["reference"][(case, opt_name, source, math_key(variant))] = run_reference(
                        case, opt_name, source, variant
                    )
                for ns_mode in modes:
                    params, exchange = run_fsdp(case, opt_name, source, ns_mode, mesh, variant)
                    key = ((replicate, shard), case, opt_name, source, ns_mode, variant)
                    per_rank_params, per_rank_exchange = [None] * world, [None] * world
                    dist.all_gather_object(per_rank_params, params)
                    dist.all_gather_object(per_rank_exchange, exchange)
                    results["fsdp"][key] = per_rank_params
                    results["exchange"][key] = per_rank_exchange
        del mesh
    save_and_finish(results, args.out, rank)


if __name__ == "__main__":
    main()
