"""Will the model fit? A lower bound on a rank's memory, checked before anything is allocated.

A model that does not fit otherwise ends deep inside the first allocation (CPU: the kernel's
OOM killer, no message at all; CUDA: an out-of-memory traceback after minutes of setup).
The bound counts only what training certainly holds, so it never refuses a run that fits:

    per rank >= N (4 weight + 4 gradient + s optimizer) / W  +  2 * 4 b T V

with N parameters sharded over W ranks (FSDP2 keeps fp32 master weights and gradients
sharded), s the optimizer state bytes per parameter (AdamW: two fp32 moments, 8; the Muon
family: one fp32 momentum, 4, the AdamW-handled embeddings aside), and the float32 logits of
one micro-batch (b sequences of T tokens over a V-token vocabulary) and their gradient.
Activations, the all-gathered layer and allocator slack come on top, so a run the bound
admits can still run out of memory; one it refuses cannot fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from normopt.errors import UserError

GIB = 1024 ** 3
OPTIMIZER_STATE_BYTES = {"adamw": 8, "muon": 4, "normuon": 4}


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    world_size: int
    state_bytes: int  # weights + gradients + optimizer state, this rank's shard
    logits_bytes: int  # one micro-batch's float32 logits and their gradient

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.logits_bytes

    def describe(self) -> str:
        return (f"at least {self.total_bytes / GIB:.2f} GiB per rank ({self.params:,} parameters: weights, "
                f"gradients and optimizer state {self.state_bytes / GIB:.2f} GiB over {self.world_size} rank(s); "
                f"logits of one micro-batch {self.logits_bytes / GIB:.2f} GiB)")


def estimate_memory(params: int, optimizer: str, world_size: int, micro_batch: int, seq_len: int,
                    vocab_size: int) -> MemoryEstimate:
    """The lower bound of the module docstring."""
    per_param = 4 + 4 + OPTIMIZER_STATE_BYTES.get(optimizer, 4)
    state = -(-params * per_param // world_size)
    logits = 2 * 4 * micro_batch * seq_len * vocab_size
    return MemoryEstimate(params, world_size, state, logits)


def available_bytes(device_type: str, device_index: int | None = None) -> tuple[int | None, str]:
    """Memory this rank can use and where the number came from; None when unknown.

    CUDA: the device's free memory. CPU: the kernel's MemAvailable shared by the ranks of this
    node (LOCAL_WORLD_SIZE)."""
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device_index)
        return free, f"free memory of cuda:{device_index if device_index is not None else 0}"
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, "unknown"
    local_ranks = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    share = available // local_ranks
    where = "MemAvailable" + (f" / {local_ranks} ranks on this node" if local_ranks > 1 else "")
    return share, where


def check_fits(estimate: MemoryEstimate, available: int | None, where: str) -> None:
    """Refuse (exit 2, one line) a run whose lower bound exceeds the memory at hand."""
    if available is not None and estimate.total_bytes > available:
        raise UserError(f"the model does not fit: it needs {estimate.describe()}, but only "
                        f"{available / GIB:.2f} GiB are available ({where}); use more ranks, a smaller "
                        f"model or a smaller train.micro_batch_size")
