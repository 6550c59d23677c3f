"""Collectives go through normopt.parallel.collectives, on the device their group needs."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from normopt.parallel import collectives
from tests.torchrun import REPO_ROOT, run_torchrun

# torch.distributed's functions that talk to other ranks (group creation included)
COLLECTIVES = {
    "all_reduce",
    "all_reduce_coalesced",
    "reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_coalesced",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "barrier",
    "monitored_barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "broadcast_object_list",
    "all_gather_object",
    "gather_object",
    "scatter_object_list",
    "send_object_list",
    "recv_object_list",
    "new_group",
    "new_subgroups",
}
ALLOWED = {Path("normopt/parallel/collectives.py")}


def _distributed_aliases(tree: ast.AST) -> set[str]:
    """Names bound to torch.distributed in a module (``import torch.distributed as dist``)."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    return aliases


def collective_calls(source: str) -> list[str]:
    """'line: name' of every direct use of a torch.distributed collective in ``source``."""
    tree = ast.parse(source)
    aliases = _distributed_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            base = ast.unparse(node.value)
            if base in aliases or base == "torch.distributed":
                found.append(f"{node.lineno}: {base}.{node.attr}")
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and (node.module == "torch.distributed" or "functional_collectives" in node.module)
        ):
            found += [
                f"{node.lineno}: from {node.module} import {a.name}"
                for a in node.names
                if a.name in COLLECTIVES or "functional_collectives" in node.module
            ]
    return found


def test_the_scan_finds_direct_collectives():
    source = (
        "import torch.distributed as dist\nfrom torch import distributed as td\n"
        "from torch.distributed import all_gather_object\n"
        "dist.all_reduce(x)\ntd.barrier()\ntorch.distributed.broadcast(x, 0)\ndist.get_rank()\n"
    )
    assert collective_calls(source) == [
        "3: from torch.distributed import all_gather_object",
        "4: dist.all_reduce",
        "5: td.barrier",
        "6: torch.distributed.broadcast",
    ]


def test_no_module_calls_torch_distributed_collectives_directly():
    offenders = {}
    for path in sorted((REPO_ROOT / "normopt").rglob("*.py")):
        relative = path.relative_to(REPO_ROOT)
        if relative in ALLOWED:
            continue
        calls = collective_calls(path.read_text())
        if calls:
            offenders[str(relative)] = calls
    assert not offenders, f"use normopt.parallel.collectives instead: {offenders}"


def test_device_for_each_backend(monkeypatch):
    assert collectives.device_for_backend("gloo") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.device_for_backend("nccl") == torch.device("cuda", 3)
    assert collectives.device_for_backend("cpu:gloo,cuda:nccl") == torch.device("cuda", 3)
    with pytest.raises(ValueError, match="ucc"):
        collectives.device_for_backend("ucc")


def test_without_a_process_group_every_collective_is_the_identity():
    t = torch.tensor([1.0, 2.0])
    assert collectives.all_reduce(t, "max") is t and t.tolist() == [1.0, 2.0]
    assert collectives.any_rank(True) and not collectives.any_rank(False)
    assert collectives.broadcast_object({"a": 1}) == {"a": 1}
    assert collectives.all_gather_object(5) == [5]
    assert collectives.group_device() == torch.device("cpu")
    assert collectives.new_group() is None
    collectives.barrier()


def test_two_gloo_ranks(tmp_path):
    out = tmp_path / "seen.json"
    run_torchrun(REPO_ROOT / "tests" / "workers" / "collectives_worker.py", 2, [str(out)], timeout=120)
    seen = json.loads(out.read_text())
    assert seen["device"] == "cpu" and seen["world"] == 2
    assert seen["sum"] == [3.0, 2.0] and seen["max"] == [1.0] and seen["min"] == [0.0]
    assert seen["any_last"] is True and seen["any_none"] is False
    assert seen["broadcast"] == {"from": 0}
    assert seen["objects"] == [{"rank": 0}, {"rank": 1}]
    assert seen["gathered"] == [[0.0, 0.0], [1.0, 1.0]]
    assert seen["group_sum"] == [2.0]
