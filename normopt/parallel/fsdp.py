"""FSDP2 wrapping: one ``fully_shard`` unit per transformer block, plus the root."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from normopt.dtypes import DTYPES


def mixed_precision_policy(dtype_name: str) -> MixedPrecisionPolicy:
    """Compute in ``dtype_name``; keep fp32 master weights and reduce gradients in fp32."""
    dtype = DTYPES[dtype_name]
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, dtype_name: str) -> nn.Module:
    """Shard every parameter along dim 0 over ``mesh``.

    Blocks are separate units so that only one block's full weights are materialised at a
    time; the root unit holds the embedding, final norm and output head (a tied head shares
    the embedding's storage, which is why both must live in the same unit).
    """
    policy = mixed_precision_policy(dtype_name)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
