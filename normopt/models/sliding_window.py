"""Sliding-window attention (``model.attention: swa``): grouped-query attention in which
each token attends to itself and the ``model.attention_window - 1`` tokens before it
(Longformer / Mistral style local attention), a common baseline against full attention.

    out_i = softmax_j (q_i k_j^T / sqrt(h)),  i - w < j <= i

The band is an explicit boolean mask (one per sequence length and device, cached), so
SDPA uses a masked kernel; a window at least as long as the sequence is full causal
attention. Parameters and matrices are those of GQA; FLOPs count min(T, w) keys per query.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from normopt.models.gqa import GroupedQueryAttention

DEFAULT_WINDOW = 128


def band_mask(seq_len: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(seq, seq) bool: True where query i may attend key j, i.e. i - window < j <= i."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


class SlidingWindowAttention(GroupedQueryAttention):
    name = "swa"

    def __init__(self, args):
        super().__init__(args)
        self.window = args.attention_window
        self._masks: dict[tuple[int, str], torch.Tensor] = {}

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        seq = q.shape[-2]
        key = (seq, str(q.device))
        if key not in self._masks:
            self._masks[key] = band_mask(seq, self.window, q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=self._masks[key], enable_gqa=self.n_kv_heads != self.n_heads
        )

    @classmethod
    def fill_shapes(cls, args) -> dict:
        return {} if args.attention_window else {"attention_window": DEFAULT_WINDOW}

    @classmethod
    def score_flops(cls, args, seq_len: int) -> float:
        return 12.0 * args.dim * min(seq_len, args.attention_window)

    @classmethod
    def describe(cls, args) -> str | None:
        return f"attention: swa window={args.attention_window}"
