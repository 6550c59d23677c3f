"""Multi-head latent attention (MLA), the DeepSeek-V2 form.

Keys and values come from one compressed latent shared by all heads; queries optionally
go through a low-rank latent of their own; a few head dimensions carry RoPE (with one
RoPE key shared across heads) and the rest carry none. With x of shape (batch, seq, dim):

    q_lat  = norm_q(W_qa x)                       (q_lora_rank > 0; else q = W_q x)
    q      = W_qb q_lat        -> per head [q_nope (d_nope) | q_rope (d_rope)]
    [c_kv | k_rope] = W_kva x                     (c_kv: kv_lora_rank, k_rope: d_rope)
    [k_nope | v]    = W_kvb norm_kv(c_kv)         -> per head (d_nope | d_v)
    q_rope, k_rope  = RoPE(q_rope), RoPE(k_rope)  (k_rope broadcast over heads)
    out = W_o softmax([q_nope|q_rope] [k_nope|k_rope]^T / sqrt(d_nope + d_rope) + causal) v

The latent norms are the model's norm (``model.norm``: RMSNorm in DeepSeek-V2, or DyT,
Derf, derf_ema), built at the attention location, so the norm study covers them too.
RoPE is normopt's rotate-half form (models/rope.py); DeepSeek's code rotates interleaved
pairs, which is the same rotation on a permuted basis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normopt.key_roles import require
from normopt.models.norms import build_norm
from normopt.models.rope import apply_rope


class LatentAttention(nn.Module):
    name = "mla"
    # the joint key-value projections are neither k nor v alone (models/matrix_roles.py)
    matrix_components = {
        "attn.wq": "q",
        "attn.wo": "o",
        "attn.wq_a": "q",
        "attn.wq_b": "q",
        "attn.wkv_a": "kv",
        "attn.wkv_b": "kv",
    }

    def __init__(self, args):
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.d_nope, self.d_rope, self.d_v = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        qk_dim = self.d_nope + self.d_rope
        if self.q_lora_rank > 0:
            self.wq_a = nn.Linear(args.dim, self.q_lora_rank, bias=False)
            self.q_norm = build_norm(args.norm_config, self.q_lora_rank, "attn")
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(args.dim, self.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(args.dim, self.kv_lora_rank + self.d_rope, bias=False)
        self.kv_norm = build_norm(args.norm_config, self.kv_lora_rank, "attn")
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_heads * (self.d_nope + self.d_v), bias=False)
        self.wo = nn.Linear(self.n_heads * self.d_v, args.dim, bias=False)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """q of shape (batch, seq, heads, d_nope + d_rope), before RoPE."""
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank > 0 else self.wq(x)
        return q.view(*x.shape[:2], self.n_heads, self.d_nope + self.d_rope)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q_nope, q_rope = self.queries(x).transpose(1, 2).split([self.d_nope, self.d_rope], dim=-1)
        c_kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.d_rope], dim=-1)
        kv = self.wkv_b(self.kv_norm(c_kv)).view(batch, seq, self.n_heads, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin).expand(-1, self.n_heads, -1, -1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        # SDPA's default scale is 1/sqrt(q.size(-1)) = 1/sqrt(d_nope + d_rope); v may be narrower
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    def input_matrices(self) -> list[torch.Tensor]:
        """Weights initialised with the model's std (everything but the output projection)."""
        names = ("wq_a", "wq_b") if self.q_lora_rank > 0 else ("wq",)
        return [getattr(self, n).weight for n in names + ("wkv_a", "wkv_b")]

    def output_matrices(self) -> list[torch.Tensor]:
        """Weights writing into the residual stream (initialised with the depth-scaled std)."""
        return [self.wo.weight]

    def head_blocks(self) -> list[tuple[torch.Tensor, str, int]]:
        """(weight, axis, heads) of the per-head projections (``optim.muon_split_heads``):
        the query up-projection W_qb (or W_q without a query latent) by rows, each head's
        [q_nope | q_rope] block; the key-value up-projection W_kvb by rows, each head's
        [k_nope | v] block; W_o by columns, each head's d_v inputs. The down-projections
        W_qa and W_kva have no head structure (their outputs are latents shared by every
        head, and W_kva's RoPE key is shared too), so they never split."""
        q = self.wq_b if self.q_lora_rank > 0 else self.wq
        return [
            (q.weight, "rows", self.n_heads),
            (self.wkv_b.weight, "rows", self.n_heads),
            (self.wo.weight, "cols", self.n_heads),
        ]

    def norms(self) -> list[nn.Module]:
        return [self.q_norm, self.kv_norm] if self.q_lora_rank > 0 else [self.kv_norm]

    # -- what the registry asks (models/components.py) --------------------------------

    @classmethod
    def fill_shapes(cls, args) -> dict:
        """Shape keys left at 0, relative to the head size h as in DeepSeek-V2-Lite."""
        h = args.head_dim
        defaults = dict(kv_lora_rank=4 * h, qk_nope_head_dim=h, qk_rope_head_dim=max(2, h // 2), v_head_dim=h)
        return {k: v for k, v in defaults.items() if not getattr(args, k)}

    @classmethod
    def check_shapes(cls, args) -> None:
        require(
            args.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim", f"{args.qk_rope_head_dim} must be even for RoPE"
        )

    @classmethod
    def rope_dim(cls, args) -> int:
        return args.qk_rope_head_dim

    @classmethod
    def param_count(cls, args, norm_params) -> int:
        return mla_param_count(args, norm_params)

    @classmethod
    def matmul_params(cls, args) -> int:
        return mla_matmul_params(args)

    @classmethod
    def score_flops(cls, args, seq_len: int) -> float:
        return mla_attention_flops(args, seq_len)

    @classmethod
    def saved_bytes_per_token(cls, args, compute_bytes: int) -> int:
        """q and k (all heads), v and the output, the latents, the float32 log-sum-exp."""
        qk = args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim)
        latents = (args.q_lora_rank or 0) + args.kv_lora_rank + args.qk_rope_head_dim
        return compute_bytes * (2 * qk + 2 * args.n_heads * args.v_head_dim + latents) + 4 * args.n_heads

    @classmethod
    def describe(cls, args) -> str | None:
        return (
            f"attention: mla q_lora={args.q_lora_rank} kv_lora={args.kv_lora_rank} qk_nope={args.qk_nope_head_dim} "
            f"qk_rope={args.qk_rope_head_dim} v={args.v_head_dim}"
        )


def mla_param_count(args, norm_params) -> int:
    """Parameters of one MLA layer: the projections above and the latent norms
    (``norm_params(features)`` gives one norm layer's count)."""
    d, h = args.dim, args.n_heads
    qk = args.qk_nope_head_dim + args.qk_rope_head_dim
    if args.q_lora_rank > 0:
        q = d * args.q_lora_rank + args.q_lora_rank * h * qk + norm_params(args.q_lora_rank)
    else:
        q = d * h * qk
    kv = d * (args.kv_lora_rank + args.qk_rope_head_dim) + norm_params(args.kv_lora_rank)
    kv += args.kv_lora_rank * h * (args.qk_nope_head_dim + args.v_head_dim)
    return q + kv + h * args.v_head_dim * d


def mla_matmul_params(args) -> int:
    """Weights of one MLA layer that multiply every token (for FLOPs): all projections."""
    return mla_param_count(args, lambda features: 0)


def mla_attention_flops(args, seq_len: int) -> float:
    """Training FLOPs per token of the score and value products of one MLA layer:
    6 T h (d_qk + d_v) (forward 2 T h d_qk + 2 T h d_v, backward twice that), the
    causal mask not discounted; equals 12 T dim for standard attention."""
    qk = args.qk_nope_head_dim + args.qk_rope_head_dim
    return 6.0 * seq_len * args.n_heads * (qk + args.v_head_dim)
