"""Grouped-query attention (``model.attention: gqa``): n_heads query heads share n_kv_heads
key-value heads (n_kv_heads = n_heads is multi-head attention), RoPE on all head dims."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normopt.models.rope import apply_rope


class GroupedQueryAttention(nn.Module):
    name = "gqa"
    matrix_components = {"attn.wq": "q", "attn.wk": "k", "attn.wv": "v", "attn.wo": "o"}

    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.attend(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(h) + causal mask) v, heads grouped."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)

    def input_matrices(self) -> list[torch.Tensor]:
        return [self.wq.weight, self.wk.weight, self.wv.weight]

    def output_matrices(self) -> list[torch.Tensor]:
        return [self.wo.weight]

    def head_blocks(self) -> list[tuple[torch.Tensor, str, int]]:
        """(weight, axis, heads) of each projection that has one block per attention head
        (``optim.muon_split_heads``): W_q's rows in n_heads blocks of head_dim, W_k's and
        W_v's rows in n_kv_heads blocks (GQA's key-value heads), W_o's columns (its input
        features, the concatenated head outputs) in n_heads blocks."""
        return [
            (self.wq.weight, "rows", self.n_heads),
            (self.wk.weight, "rows", self.n_kv_heads),
            (self.wv.weight, "rows", self.n_kv_heads),
            (self.wo.weight, "cols", self.n_heads),
        ]

    def norms(self) -> list[nn.Module]:
        return []

    # -- what the registry asks (models/components.py) --------------------------------

    @classmethod
    def fill_shapes(cls, args) -> dict:
        return {}

    @classmethod
    def check_shapes(cls, args) -> None:
        """Refuse (UserError naming the key) a shape this attention cannot take."""

    @classmethod
    def rope_dim(cls, args) -> int:
        return args.head_dim

    @classmethod
    def param_count(cls, args, norm_params) -> int:
        """2 d^2 + 2 d n_kv h (h the head dim)."""
        return 2 * args.dim * args.dim + 2 * args.dim * args.n_kv_heads * args.head_dim

    @classmethod
    def matmul_params(cls, args) -> int:
        return cls.param_count(args, lambda features: 0)

    @classmethod
    def score_flops(cls, args, seq_len: int) -> float:
        """Training FLOPs per token of the score and value products: 12 d T (the causal mask
        not discounted, the PaLM MFU convention)."""
        return 12.0 * args.dim * seq_len

    @classmethod
    def saved_bytes_per_token(cls, args, compute_bytes: int) -> int:
        """q, k, v, the output and the output projection's input, and the float32
        log-sum-exp per head."""
        kv = args.n_kv_heads * args.head_dim
        return compute_bytes * (3 * args.dim + 2 * kv) + 4 * args.n_heads

    @classmethod
    def describe(cls, args) -> str | None:
        return None
