"""torchrun worker: FSDP2 Muon/NorMuon against a single-process reference.

    torchrun --nproc_per_node=N tests/workers/muon_worker.py OUT.pt [--checkpoint-dir DIR]

Every rank builds the same small model of uneven nn.Linear layers (same seed), wraps it
with ``fully_shard`` and trains it for a few steps with Muon or NorMuon in both
``ns_mode``s, with gradients either injected (the same deterministic full gradient,
sliced to each rank's rows) or computed by a real forward/backward through FSDP2 on the
same batch on every rank. Rank 0 also runs the identical math on a plain (non-DTensor)
copy of the model, with no process group involved, and saves everything to OUT.pt for
the test to compare. With --checkpoint-dir it also checks a DCP save/load round trip.

Teardown releases the FSDP modules before destroy_process_group (see stack notes: 2-rank
gloo FSDP2 processes otherwise crash at exit).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from normopt.optim.muon import Muon, NorMuon
from normopt.parallel.row_layout import shard_rows
from normopt.parallel.row_shards import row_shards_of

# (out_features, in_features) of each nn.Linear: uneven, tall and wide, some with fewer
# rows than ranks (empty shards), and a case with fewer matrices than ranks; (experts, out,
# in) is a 3-D expert stack as MoE layers store them, sharded over the experts (2 experts on
# 3 ranks: one rank holds none).
CASES = {
    "uneven": [(48, 32), (32, 80), (13, 7), (5, 64)],
    "few": [(6, 5), (2, 9)],
    "experts": [(3, 12, 8), (2, 6, 10), (7, 9)],
    "repeated": [(12, 8), (12, 8), (12, 8), (5, 10), (5, 10), (2, 6, 4), (2, 6, 4)],  # for batched NS
    # per-head NS (HEAD_BLOCKS): W_q of 3 heads of 4 rows, W_k and W_v of 2 key-value heads,
    # W_o by 3 column blocks, one whole matrix; on 3 ranks head blocks straddle the shards
    "heads": [(12, 8), (8, 8), (8, 8), (8, 12), (13, 7)],
}
# head_blocks of each param group of a case (param_groups), for the cases that split heads
HEAD_BLOCKS = {"heads": [("rows", 3), ("rows", 2), ("cols", 3), None]}
# Per-case hyperparameters, chosen to exercise every option at least once.
OPTIONS = {
    "uneven": dict(lr=0.02, weight_decay=0.1, nesterov=True, scale_rule="match_adamw", ns_coefficients="quintic"),
    "few": dict(lr=0.05, weight_decay=0.0, nesterov=False, scale_rule="original", ns_coefficients="polar_express"),
    "experts": dict(lr=0.03, weight_decay=0.05, nesterov=True, scale_rule="spectral", ns_coefficients="quintic"),
    "repeated": dict(lr=0.02, weight_decay=0.1, nesterov=True, scale_rule="match_adamw", ns_coefficients="quintic"),
    "heads": dict(lr=0.03, weight_decay=0.1, nesterov=True, scale_rule="original", ns_coefficients="quintic"),
}
OPTIMIZERS = {"muon": Muon, "normuon": NorMuon}
# How the distributed step is executed. Buckets of ~1 byte put every job in a bucket of its
# own (the most collectives in flight); ns_batch_size and ns_row_blocks are part of the
# math, so the single-process reference runs with them too.
VARIANTS = {
    "default": {},
    "buckets": dict(ns_bucket_mb=1e-6),
    "buckets_sync": dict(ns_bucket_mb=1e-6, ns_overlap=False),
    "batched": dict(ns_batch_size=2, ns_bucket_mb=1e-6),
    "row_blocks": dict(ns_row_blocks=3, ns_bucket_mb=1e-6),
    "row_blocks_batched": dict(ns_row_blocks=2, ns_batch_size=3),
    "gram": dict(ns_algorithm="gram", ns_bucket_mb=1e-6),
    "gram_batched": dict(ns_algorithm="gram", ns_batch_size=2),
}
MATH_OPTIONS = ("ns_batch_size", "ns_row_blocks", "ns_algorithm")
REPLICATED_TOO = ("default", "row_blocks")  # variants also run with ns_mode="replicated"
# (case, gradient source, variant) of every run, each with both optimizers (and both
# ns_modes for the variants in REPLICATED_TOO).
RUNS = [(case, source, "default") for case in ("uneven", "few", "experts") for source in ("inject", "backward")] + [
    ("uneven", "inject", "buckets"),
    ("experts", "inject", "buckets"),
    ("uneven", "inject", "buckets_sync"),
    ("repeated", "inject", "batched"),
    ("few", "inject", "row_blocks"),
    ("uneven", "inject", "row_blocks"),
    ("repeated", "inject", "row_blocks_batched"),
    ("heads", "inject", "default"),
    ("heads", "backward", "default"),
    ("heads", "inject", "row_blocks"),
    ("heads", "inject", "batched"),
    # Gram NS: quintic on tall, wide and square matrices (3 and 5 steps), Polar Express, a
    # 3-D expert stack, batches of equal shapes, per-head blocks, and real backward passes
    ("uneven", "backward", "gram"),
    ("few", "inject", "gram"),
    ("experts", "inject", "gram"),
    ("repeated", "inject", "gram_batched"),
    ("heads", "inject", "gram"),
]
STEPS = 4
BATCH = 6


class Experts(nn.Module):
    """A 3-D weight (experts, out, in): every expert applied to the whole batch."""

    def __init__(self, experts: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, out_features, in_features) / in_features**0.5)

    def forward(self, x):
        return torch.einsum("bi,eoi->beo", x, self.weight)


class LinearStack(nn.Module):
    """Independent bias-free linear layers (or expert stacks); loss = sum_i mean(tanh(W_i x_i)^2)."""

    def __init__(self, shapes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(s[1], s[0], bias=False) if len(s) == 2 else Experts(*s) for s in shapes)

    def forward(self, xs):
        return sum(torch.tanh(layer(x)).square().mean() for layer, x in zip(self.layers, xs))


def build_model(case: str, seed: int, mesh=None) -> LinearStack:
    torch.manual_seed(seed)
    model = LinearStack(CASES[case])
    if mesh is not None:
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def param_groups(model: LinearStack, case: str) -> list[dict]:
    """Two groups so per-group ns_steps is exercised: the first layer gets 3 NS steps. A
    case in HEAD_BLOCKS has one group per head layout instead (the first still 3 steps):
    W_q; W_k and W_v (batched together under ns_batch_size 2); W_o; the whole matrix."""
    params = list(model.layers.parameters())
    if case in HEAD_BLOCKS:
        parts = [params[:1], params[1:3], params[3:4], params[4:]]
        groups = [
            {"params": part, **({} if layout is None else {"head_blocks": layout})}
            for part, layout in zip(parts, HEAD_BLOCKS[case])
        ]
        groups[0]["ns_steps"] = 3
        return groups
    return [{"params": params[:1], "ns_steps": 3}, {"params": params[1:]}]


def batch(case: str, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(BATCH, shape[-1], generator=g) for shape in CASES[case]]


def injected_grad(shape, step: int, index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * step + index)
    return torch.randn(*shape, generator=g)


def set_grads(model: LinearStack, case: str, step: int, source: str) -> None:
    """Fill p.grad for this step: a real backward, or the deterministic full gradient
    restricted to this rank's rows (exactly what FSDP2's reduce-scatter would deliver)."""
    if source == "backward":
        model(batch(case, step)).backward()
        return
    for index, p in enumerate(model.layers.parameters()):
        full = injected_grad(p.shape, step, index)
        if isinstance(p, DTensor):  # FSDP2 (Shard(0)) or HSDP (Replicate(), Shard(0)): p's layout
            shards = row_shards_of(p)
            start, length = shard_rows(p.shape[0], shards.size())[shards.local_rank()]
            p.grad = DTensor.from_local(
                full[start : start + length].clone(),
                p.device_mesh,
                p.placements,
                shape=p.shape,
                stride=p.stride(),
                run_check=False,
            )
        else:
            p.grad = full


def train(model: LinearStack, optimizer, case: str, source: str, steps: range) -> None:
    for step in steps:
        set_grads(model, case, step, source)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters by name; collective when they are DTensors."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = t.detach().clone()
    return out


def run_fsdp(case, opt_name, source, ns_mode, mesh, variant="default") -> tuple[dict, list[dict]]:
    """Train the FSDP2 model; return full params and, per step, what this rank's exchange
    did (jobs computed, buckets, peak buffer bytes)."""
    model = build_model(case, seed=0, mesh=mesh)
    optimizer = OPTIMIZERS[opt_name](param_groups(model, case), ns_mode=ns_mode, **OPTIONS[case], **VARIANTS[variant])
    exchange = []
    for step in range(STEPS):
        set_grads(model, case, step, source)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats = optimizer.last_step_stats
        exchange.append(dict(jobs=stats.jobs_computed, buckets=stats.buckets, peak=stats.peak_buffer_bytes))
    params = full_params(model)
    del model, optimizer
    gc.collect()
    return params, exchange


def run_reference(case, opt_name, source, variant="default") -> dict:
    """The same math on plain tensors in this one process: no DTensor, no communication."""
    model = build_model(case, seed=0)
    math = {k: v for k, v in VARIANTS[variant].items() if k in MATH_OPTIONS}
    optimizer = OPTIMIZERS[opt_name](param_groups(model, case), **OPTIONS[case], **math)
    train(model, optimizer, case, source, range(STEPS))
    return full_params(model)


def checkpoint_round_trip(opt_name: str, mesh, directory: Path) -> dict:
    """Train 2 steps, save with DCP, train 2 more (run A). A fresh model and optimizer
    (different init) load the checkpoint and train the same 2 steps (run B)."""
    case = "uneven"
    model = build_model(case, seed=0, mesh=mesh)
    optimizer = OPTIMIZERS[opt_name](param_groups(model, case), **OPTIONS[case])
    train(model, optimizer, case, "backward", range(2))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state_keys = sorted(optim_sd["state"])
    state_fields = sorted({f"{k}:{field}" for k, v in optim_sd["state"].items() for field in v})
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / opt_name))
    train(model, optimizer, case, "backward", range(2, 4))
    continued = full_params(model)
    del model, optimizer, model_sd, optim_sd
    gc.collect()

    model = build_model(case, seed=123, mesh=mesh)
    optimizer = OPTIMIZERS[opt_name](param_groups(model, case), **OPTIONS[case])
    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(directory / opt_name))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    train(model, optimizer, case, "backward", range(2, 4))
    resumed = full_params(model)
    del model, optimizer, model_sd, optim_sd, loaded
    gc.collect()
    return {"continued": continued, "resumed": resumed, "state_keys": state_keys, "state_fields": state_fields}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results: dict = {
        "world_size": world,
        "fsdp": {},
        "reference": {},
        "exchange": {},
        "checkpoint": {},
        "initial": {case: full_params(build_model(case, seed=0)) for case in CASES},
    }
    for case, source, variant in RUNS:
        for opt_name in OPTIMIZERS:
            if rank == 0:
                math = tuple(sorted((k, v) for k, v in VARIANTS[variant].items() if k in MATH_OPTIONS))
                if (case, opt_name, source, math) not in results["reference"]:
                    results["reference"][(case, opt_name, source, math)] = run_reference(
                        case, opt_name, source, variant
                    )
            # replicated NS has no buckets to schedule: the execution variants need only distributed
            for ns_mode in ("distributed", "replicated") if variant in REPLICATED_TOO else ("distributed",):
                params, exchange = run_fsdp(case, opt_name, source, ns_mode, mesh, variant)
                per_rank = [None] * world
                dist.all_gather_object(per_rank, exchange)
                results["fsdp"][(case, opt_name, source, ns_mode, variant)] = params
                results["exchange"][(case, opt_name, source, ns_mode, variant)] = per_rank
    if args.checkpoint_dir is not None:
        for opt_name in OPTIMIZERS:
            outcome = checkpoint_round_trip(opt_name, mesh, args.checkpoint_dir)
            per_rank = [None] * world
            dist.all_gather_object(per_rank, (outcome["state_keys"], outcome["state_fields"]))
            outcome["state_keys_per_rank"] = per_rank
            results["checkpoint"][opt_name] = outcome
    save_and_finish(results, args.out, rank)


def save_and_finish(results: dict, out: str, rank: int) -> None:
    """Rank 0 saves the results; every rank then tears down (gc before destroy: the gloo exit
    crash of stack.md)."""
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
