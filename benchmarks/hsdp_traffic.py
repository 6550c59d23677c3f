"""FSDP vs HSDP: bytes each training step moves, and how many of them cross nodes (a model).

    python benchmarks/hsdp_traffic.py                          # 1b, 4 nodes x 8 GPUs
    python benchmarks/hsdp_traffic.py --nodes 8 --accum 4 --json rows.json

Plain FSDP (``train.dp_replicate=1``) splits every FSDP unit (each block, and the root:
embedding, final norm, output head) over all N ranks; HSDP (``train.dp_replicate=R``,
``train.dp_shard=S`` = GPUs per node) splits it over the S GPUs of a node and keeps R copies.
Per step and per unit of P parameters, FSDP2 runs:

* all-gather of the parameters in the compute dtype, once per micro-batch in forward and once
  more in backward (blocks only: the root unit stays gathered between forward and backward);
* reduce-scatter of the gradients in the reduce dtype, once per step (gradient sync is off
  for every micro-batch but the last);
* HSDP only: all-reduce of each rank's reduced gradient shard (P / S elements) over its
  replica group, once per step.

Ring model of a collective on a group of n ranks and an M-byte (unsharded) tensor: every
member receives (n - 1) / n x M for an all-gather or reduce-scatter, 2 (n - 1) / n x M for an
all-reduce. Ranks are node-major (rank = node x GPUs per node + GPU) and a ring runs in rank
order, so a member's bytes cross nodes when its ring predecessor is on another node: in a
flat ring over all N ranks that is the first rank of each node; in HSDP's shard group
(one node) none; in a replica group (one GPU per node) every member. Buckets, overlap, link
speeds and NCCL's choice of tree or ring are left out: this counts bytes, it times nothing.
The Muon/NorMuon Newton-Schulz exchange (bf16 row shards to each matrix's owner and back)
is counted the same way, with normopt's own owner assignment.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from normopt.models.presets import PRESETS, count_parameters  # noqa: E402
from normopt.parallel.ns_plan import assign_owners, ns_cost  # noqa: E402
from normopt.parallel.row_layout import shard_rows  # noqa: E402

PARAM_BYTES = 2  # all-gather dtype: MixedPrecisionPolicy(param_dtype=bfloat16) (train.dtype auto on CUDA)
GRAD_BYTES = 4  # reduce dtype: reduce_dtype=float32 (normopt's policy)
NS_BYTES = 2  # optim.ns_dtype auto on CUDA: bfloat16 row shards travel to the owner and back


@dataclass(frozen=True)
class Layout:
    """R replica groups of S shards on nodes of ``gpus_per_node`` GPUs (R = 1: plain FSDP)."""

    name: str
    replicate: int
    shard: int
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.replicate * self.shard

    def shard_groups(self) -> list[list[int]]:
        """Ranks r * S + s, s = 0..S-1, for each replica r (the mesh of ``data_parallel_mesh``)."""
        return [[r * self.shard + s for s in range(self.shard)] for r in range(self.replicate)]

    def replicate_groups(self) -> list[list[int]]:
        """Ranks holding the same shard: r * S + s, r = 0..R-1, for each s (none when R = 1)."""
        if self.replicate == 1:
            return []
        return [[r * self.shard + s for r in range(self.replicate)] for s in range(self.shard)]


def ring_bytes_per_member(kind: str, n: int, nbytes: float) -> float:
    """Bytes each of n ring members receives: (n-1)/n M (all-gather, reduce-scatter of an
    M-byte tensor), 2 (n-1)/n M (all-reduce of M bytes)."""
    factor = {"all_gather": 1.0, "reduce_scatter": 1.0, "all_reduce": 2.0}[kind]
    return factor * (n - 1) / n * nbytes


def cross_node_members(group: list[int], gpus_per_node: int) -> int:
    """Members whose ring predecessor (the previous member, cyclically) sits on another node."""
    if len(group) < 2:
        return 0
    return sum(1 for i, r in enumerate(group) if group[i - 1] // gpus_per_node != r // gpus_per_node)


def collective(kind: str, groups: list[list[int]], nbytes: float, gpus_per_node: int) -> dict[str, float]:
    """One collective of an ``nbytes`` tensor run on every group at once: bytes received per
    rank (of a member), and bytes crossing nodes summed over the cluster."""
    if not groups:
        return {"per_rank": 0.0, "cross_node": 0.0}
    per = ring_bytes_per_member(kind, len(groups[0]), nbytes)
    return {"per_rank": per, "cross_node": per * sum(cross_node_members(g, gpus_per_node) for g in groups)}


def unit_traffic(params: int, layout: Layout, is_root: bool, accum: int) -> dict[str, dict[str, float]]:
    """Per step, one FSDP unit of ``params`` parameters (module docstring): forward and
    backward all-gathers (``accum`` micro-batches), the reduce-scatter and HSDP's all-reduce."""
    flat = layout.shard_groups()
    gather = collective("all_gather", flat, params * PARAM_BYTES, layout.gpus_per_node)
    scatter = collective("reduce_scatter", flat, params * GRAD_BYTES, layout.gpus_per_node)
    reduce = collective(
        "all_reduce", layout.replicate_groups(), params * GRAD_BYTES / layout.shard, layout.gpus_per_node
    )
    times = {
        "all_gather_forward": accum,
        "all_gather_backward": 0 if is_root else accum,
        "reduce_scatter": 1,
        "all_reduce": 1,
    }
    base = {
        "all_gather_forward": gather,
        "all_gather_backward": gather,
        "reduce_scatter": scatter,
        "all_reduce": reduce,
    }
    return {k: {m: v * times[k] for m, v in base[k].items()} for k in times}


def add(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {m: a[k][m] + b[k][m] for m in a[k]} for k in a}


def fsdp_units(preset: str) -> tuple[list[int], int, list[tuple[int, int]]]:
    """(parameters of each block, of the root unit, (rows, cols) of every block matrix
    Muon takes) of the preset, from the model built on the meta device (normopt's FSDP
    units: one per block, the rest in the root)."""
    from normopt.models.llama import build_model

    args = PRESETS[preset]
    model = build_model(args, "meta")
    blocks = [sum(p.numel() for p in block.parameters()) for block in model.layers]
    total = sum(p.numel() for p in model.parameters())  # a tied head shares the embedding's storage
    if total != count_parameters(args):
        raise AssertionError(f"model has {total} parameters, count_parameters says {count_parameters(args)}")
    matrices = [tuple(p.shape) for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2]
    return blocks, total - sum(blocks), matrices


def ns_exchange(matrices: list[tuple[int, int]], layout: Layout) -> dict[str, float]:
    """Muon's NS exchange per step under ``layout``: in each shard group, the owners of
    ``assign_owners(ns_cost)`` receive every other member's bf16 row shards (gather) and send
    them back (scatter). Returns bytes the busiest rank receives over both, and bytes
    crossing nodes summed over the cluster (every replica group runs the same exchange)."""
    n = layout.shard
    owners = assign_owners([ns_cost(r, c) for r, c in matrices], n)
    received = [0.0] * layout.world
    cross = 0.0
    for group in layout.shard_groups():
        for (rows, cols), owner in zip(matrices, owners):
            for i, (_, length) in enumerate(shard_rows(rows, n)):
                if i == owner or not length:
                    continue
                nbytes = length * cols * NS_BYTES
                received[group[owner]] += nbytes  # gather: shard i -> owner
                received[group[i]] += nbytes  # scatter: the owner's result rows -> i
                if group[i] // layout.gpus_per_node != group[owner] // layout.gpus_per_node:
                    cross += 2 * nbytes
    return {"per_rank": max(received), "cross_node": cross}


def model_rows(preset: str, nodes: int, gpus_per_node: int, accum: int) -> dict:
    """Every number the report prints, for FSDP over all ranks and HSDP with one node per
    replica group."""
    blocks, root, matrices = fsdp_units(preset)
    layouts = [
        Layout(f"FSDP {nodes * gpus_per_node}", 1, nodes * gpus_per_node, gpus_per_node),
        Layout(f"HSDP {nodes} x {gpus_per_node}", nodes, gpus_per_node, gpus_per_node),
    ]
    out = {
        "preset": preset,
        "params": sum(blocks) + root,
        "block_params": blocks,
        "root_params": root,
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "accum": accum,
        "layouts": {},
    }
    for layout in layouts:
        layer = unit_traffic(blocks[0], layout, False, accum)
        step = unit_traffic(root, layout, True, accum)
        for p in blocks:
            step = add(step, unit_traffic(p, layout, False, accum))
        out["layouts"][layout.name] = {
            "replicate": layout.replicate,
            "shard": layout.shard,
            "layer": layer,
            "step": step,
            "muon_ns": ns_exchange(matrices, layout),
        }
    return out


def _gb(x: float) -> str:
    return f"{x / 1e9:9.3f}"


def report(rows: dict) -> list[str]:
    lines = [
        f"FSDP vs HSDP communication model: {rows['preset']} preset ({rows['params']:,} parameters: "
        f"{len(rows['block_params'])} blocks of {rows['block_params'][0]:,}, root unit {rows['root_params']:,}), "
        f"{rows['nodes']} nodes x {rows['gpus_per_node']} GPUs, {rows['accum']} micro-batch(es) per step",
        f"  dtypes: parameters all-gathered in bf16 ({PARAM_BYTES} B), gradients reduce-scattered and "
        f"all-reduced in fp32 ({GRAD_BYTES} B), Muon NS shards in bf16 ({NS_BYTES} B)",
        "  ring model: per member (n-1)/n M (all-gather, reduce-scatter), 2(n-1)/n M (all-reduce); ranks "
        "node-major; cross-node = bytes whose ring predecessor is on another node, summed over all nodes",
        "  GB = 1e9 bytes; a model of bytes, not a measurement",
    ]
    kinds = ["all_gather_forward", "all_gather_backward", "reduce_scatter", "all_reduce"]
    for scope, title in (
        ("layer", f"per layer (one block, {rows['block_params'][0]:,} parameters), per step"),
        ("step", "per step (every unit)"),
    ):
        lines.append(f"  {title}:")
        lines.append(
            f"    {'layout':<12} {'collective':<20} {'GB per rank':>12} {'GB cross-node':>14} {'bytes cross-node':>18}"
        )
        for name, layout in rows["layouts"].items():
            for kind in kinds:
                v = layout[scope][kind]
                lines.append(
                    f"    {name:<12} {kind:<20} {_gb(v['per_rank']):>12} {_gb(v['cross_node']):>14} "
                    f"{v['cross_node']:>18,.0f}"
                )
    lines.append("  per step, totals:")
    for name, layout in rows["layouts"].items():
        step = layout["step"]
        gather = sum(step[k]["cross_node"] for k in kinds[:2])
        grads = sum(step[k]["cross_node"] for k in kinds[2:])
        ns = layout["muon_ns"]
        lines.append(
            f"    {name:<12} all-gather cross-node {_gb(gather)} GB, gradients {_gb(grads)} GB, "
            f"sum {_gb(gather + grads)} GB; Muon NS exchange {_gb(ns['cross_node'])} GB cross-node "
            f"({_gb(ns['per_rank'])} GB on the busiest rank)"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="1b", choices=list(PRESETS))
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (all-gathers per step)")
    p.add_argument("--json", default=None, help="write the numbers to this path")
    opts = p.parse_args(argv)
    rows = model_rows(opts.preset, opts.nodes, opts.gpus_per_node, opts.accum)
    print("\n".join(report(rows)))
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
