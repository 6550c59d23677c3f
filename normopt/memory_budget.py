"""Will the model fit? A lower bound that refuses, and an estimate that advises.

A model that does not fit otherwise ends deep inside the first allocation (CPU: the kernel's
OOM killer, no message at all; CUDA: an out-of-memory traceback after minutes of setup).
Two numbers are computed before anything is allocated:

The **lower bound** counts only what training certainly holds, so it never refuses a run
that fits:

    per rank >= N (4 weight + 4 gradient + s optimizer) / W  +  2 * 4 b T V

with N parameters sharded over W ranks (FSDP2 keeps fp32 master weights and gradients
sharded), s the optimizer state bytes per parameter (AdamW: two fp32 moments, 8; the Muon
family: one fp32 momentum, 4, the AdamW-handled embeddings aside), and the float32 logits of
one micro-batch (b sequences of T tokens over a V-token vocabulary) and their gradient. A
run above it is refused.

The **estimate** adds the activations autograd keeps for one micro-batch, counted from the
tensors normopt's blocks save (:func:`activation_bytes_per_token`), times b T tokens and L
layers; with ``train.activation_checkpointing=block`` only each block's input is kept, plus
one block's activations while it is recomputed. It leaves out the all-gathered compute-dtype
copy of the layer in use, temporaries and allocator slack. On an H200 the 1B preset (bf16,
micro-batch 8 x 2048, 1 rank) peaked at 51.5 GiB allocated eager with AdamW (estimate 49.0,
5% under), 47.9 with Muon (45.2), 24.0 with activation checkpointing (22.3, 7% under) and
41.5 compiled (the estimate 18% over: compiled blocks keep fewer intermediates). A run whose
estimate exceeds the device is not refused (the estimate can be off); the trainer says what
to change before the model is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from normopt.errors import UserError

GIB = 1024**3
# the share by which the estimate may fall short of the measured peak (module docstring)
ESTIMATE_UNDERCOUNT = 0.10


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    world_size: int
    state_bytes: int  # weights + gradients + optimizer state, this rank's shard
    logits_bytes: int  # one micro-batch's float32 logits and their gradient
    activation_bytes: int = 0  # estimated activations of one micro-batch (0 = not estimated)

    @property
    def total_bytes(self) -> int:
        """The lower bound."""
        return self.state_bytes + self.logits_bytes

    @property
    def expected_bytes(self) -> int:
        """The estimate: the lower bound plus activations."""
        return self.total_bytes + self.activation_bytes

    def describe(self) -> str:
        text = (
            f"at least {self.total_bytes / GIB:.2f} GiB per rank ({self.params:,} parameters: weights, "
            f"gradients and optimizer state {self.state_bytes / GIB:.2f} GiB over {self.world_size} rank(s); "
            f"logits of one micro-batch {self.logits_bytes / GIB:.2f} GiB)"
        )
        if self.activation_bytes:
            text += (
                f"; about {self.expected_bytes / GIB:.1f} GiB with activations of one micro-batch "
                f"({self.activation_bytes / GIB:.2f} GiB; an estimate, up to ~{ESTIMATE_UNDERCOUNT:.0%} low)"
            )
        return text


def activation_bytes_per_token(args, compute_bytes: int) -> int:
    """Bytes autograd keeps per token for one block of ``args`` (a ModelArgs) in a compute
    dtype of ``compute_bytes`` (2 for bfloat16, 4 for float32).

    Each norm keeps two float32 copies of its input (for x^2 and the scaled output) and
    hands its output to the next matmuls; attention keeps q, k, v, its output, the log-sum-
    exp (float32 per head) and the input of the output projection; a SwiGLU keeps w1's and
    w3's outputs, silu's output and the product (4 hidden vectors per expert a token visits).
    """
    from normopt.models.components import attention_class, feed_forward_class

    norms = 2 * (2 * 4 * args.dim + compute_bytes * args.dim)
    return (
        norms
        + attention_class(args.attention).saved_bytes_per_token(args, compute_bytes)
        + feed_forward_class(args.ffn).saved_bytes_per_token(args, compute_bytes)
    )


def estimate_activations(
    args, micro_batch: int, seq_len: int, compute_bytes: int, activation_checkpointing: str = "none"
) -> int:
    """Activation bytes of one micro-batch (module docstring)."""
    tokens = micro_batch * seq_len
    per_block = activation_bytes_per_token(args, compute_bytes) * tokens
    if activation_checkpointing == "block":
        return args.n_layers * compute_bytes * args.dim * tokens + per_block
    return args.n_layers * per_block


def estimate_memory(
    params: int,
    optimizer: str,
    world_size: int,
    micro_batch: int,
    seq_len: int,
    vocab_size: int,
    args=None,
    compute_bytes: int = 4,
    activation_checkpointing: str = "none",
) -> MemoryEstimate:
    """The lower bound of the module docstring and, given the model's ``args``, the estimate."""
    from normopt.optim.registry import optimizer_spec

    per_param = 4 + 4 + optimizer_spec(optimizer).state_bytes
    state = -(-params * per_param // world_size)
    logits = 2 * 4 * micro_batch * seq_len * vocab_size
    activations = (
        0 if args is None else estimate_activations(args, micro_batch, seq_len, compute_bytes, activation_checkpointing)
    )
    return MemoryEstimate(params, world_size, state, logits, activations)


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
        raise UserError(
            f"the model does not fit: it needs {estimate.describe()}, but only "
            f"{available / GIB:.2f} GiB are available ({where}); use more ranks, a smaller "
            f"model or a smaller train.micro_batch_size"
        )


def memory_advice(
    estimate: MemoryEstimate, available: int | None, micro_batch: int, activation_checkpointing: str
) -> str | None:
    """What to change when the estimate exceeds the memory at hand (None when it fits):
    the largest micro-batch whose estimate fits, and activation checkpointing if it is off."""
    if available is None or not estimate.activation_bytes or estimate.expected_bytes <= available:
        return None
    per_sequence_act = estimate.activation_bytes / micro_batch
    per_sequence_logits = estimate.logits_bytes / micro_batch
    fits = int((available - estimate.state_bytes) // (per_sequence_act + per_sequence_logits))
    options = []
    if 1 <= fits < micro_batch:
        options.append(f"train.micro_batch_size={fits} (the same math: more accumulation steps)")
    if activation_checkpointing == "none":
        options.append("train.activation_checkpointing=block (about a third more compute)")
    if not options:
        options.append("more ranks or a smaller model")
    return (
        f"memory: the estimate {estimate.expected_bytes / GIB:.1f} GiB exceeds the {available / GIB:.1f} GiB "
        f"available; this run may run out of memory. Consider " + " or ".join(options)
    )
