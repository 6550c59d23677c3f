"""Per-block activation checkpointing (``train.activation_checkpointing: block``).

A checkpointed block keeps only its input during the forward pass and runs its forward a
second time in the backward pass to rebuild what the gradients need: activation memory
drops from every block's intermediates to one block input per layer, plus one block's
intermediates at a time, for about one more forward pass of compute (a third more FLOPs).
The recomputation repeats the same kernels on the same inputs, so the math is unchanged
(bit-identical on CPU; on CUDA under ``train.deterministic``).

Layers that record statistics in their forward pass (derf_ema's input scale, the MoE
routers' expert loads) name those buffers in ``forward_statistics``. The recomputation
records them a second time (it must run the very same graph, compiled or not, to rebuild
the same tensors), so their values are saved before it and put back after it: each real
forward counts once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "block")


def statistics_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The buffers that ``module``'s sub-layers update in their forward pass."""
    return [getattr(m, name) for m in module.modules() for name in getattr(m, "forward_statistics", ())]


@contextmanager
def statistics_kept(module: nn.Module) -> Iterator[None]:
    """Run a recomputation of ``module``, leaving its forward statistics as they were."""
    buffers = statistics_buffers(module)
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def checkpointed_call(module: nn.Module, fn: Callable, *args):
    """``fn(*args)`` (``module``'s computation), saving only ``args`` for backward and
    recomputing the rest there (non-reentrant checkpointing, which composes with FSDP2)."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), statistics_kept(module)))
