"""Llama-style decoder: token embedding, RoPE, attention (grouped-query, or latent:
models/mla.py), a SwiGLU feed-forward (dense, or a mixture of experts: models/moe.py),
pre-norm residual blocks, final norm and output head (tied or untied)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from normopt.models.activation_checkpoint import checkpointed_call
from normopt.models.mla import LatentAttention
from normopt.models.moe import MoEFeedForward
from normopt.models.norms import build_norm
from normopt.models.presets import ModelArgs
from normopt.models.rope import apply_rope, rope_frequencies


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
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
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    def input_matrices(self) -> list[torch.Tensor]:
        return [self.wq.weight, self.wk.weight, self.wv.weight]

    def output_matrices(self) -> list[torch.Tensor]:
        return [self.wo.weight]

    def norms(self) -> list[nn.Module]:
        return []


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def input_matrices(self) -> list[torch.Tensor]:
        return [self.w1.weight, self.w3.weight]

    def output_matrices(self) -> list[torch.Tensor]:
        return [self.w2.weight]


class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(.)); forward also returns the block's auxiliary
    loss (the MoE balance loss; zero for a dense block)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = build_norm(args.norm_config, args.dim, "attn")
        self.attn = LatentAttention(args) if args.attention == "mla" else Attention(args)
        self.ffn_norm = build_norm(args.norm_config, args.dim, "ffn")
        self.moe = args.ffn == "moe"
        self.ffn = MoEFeedForward(args, FeedForward) if self.moe else FeedForward(args.dim, args.ffn_hidden)
        # recompute the block in backward (models/activation_checkpoint.py); set by the trainer
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpointed_call(self, self._forward, x, cos, sin)
        return self._forward(x, cos, sin)

    def compile_forward(self) -> None:
        """Compile the block's computation (not FSDP2's hooks around it, nor the activation
        checkpoint, which must stay eager to mark its recomputation)."""
        self._forward = torch.compile(self._forward)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        if self.moe:
            out, aux = self.ffn(self.ffn_norm(x))
            return x + out, aux
        return x + self.ffn(self.ffn_norm(x)), x.new_zeros((), dtype=torch.float32)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """N(0, std) for the matrices reading the block input, N(0, out_std) for those
        writing into the residual stream, norms to their init."""
        for weight in self.attn.input_matrices() + self.ffn.input_matrices():
            nn.init.normal_(weight, std=std)
        for weight in self.attn.output_matrices() + self.ffn.output_matrices():
            nn.init.normal_(weight, std=out_std)
        for norm in (*self.attn.norms(), self.attn_norm, self.ffn_norm):
            norm.reset_parameters()
        if self.moe:
            self.ffn.router.expert_bias.zero_()
            self.ffn.router.load_counts.zero_()


class Transformer(nn.Module):
    """With ``args.embed_scale`` set, the token embedding is multiplied by a learnable scalar
    initialised to it (the DyT and Derf reference models use sqrt(dim): bounded norms have no
    statistics to undo the embedding's small scale, so without it the first norm sees inputs
    of RMS ~init_std and alpha acts sqrt(dim) times weaker)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # shape (1,), not (), so that FSDP2 can shard it like the norms' scalars
        self.embed_scale = None if args.embed_scale is None else nn.Parameter(torch.full((1,), args.embed_scale))
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = build_norm(args.norm_config, args.dim, "final")
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_frequencies(self.args.rope_dim, seq_len, self.args.rope_theta, device)
        return self._rope_cache[key]

    def forward(self, tokens: torch.Tensor, with_aux: bool = False):
        """Logits of shape (batch, seq, vocab) for token ids of shape (batch, seq); with
        ``with_aux``, (logits, the sum of the blocks' auxiliary losses)."""
        h = self.tok_embeddings(tokens)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        cos, sin = self.rope(tokens.shape[1], tokens.device)
        aux = None
        for layer in self.layers:
            h, layer_aux = layer(h, cos, sin)
            aux = layer_aux if aux is None else aux + layer_aux
        logits = self.output(self.norm(h))
        return (logits, aux) if with_aux else logits

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, std) for embeddings and linears (router and experts included); the
        residual-branch outputs (wo, w2) use std / sqrt(2 L) so the residual stream's
        variance does not grow with depth."""
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        if self.embed_scale is not None:
            self.embed_scale.fill_(self.args.embed_scale)
        for layer in self.layers:
            layer.init_weights(std, out_std)
        self.norm.reset_parameters()
        if not self.args.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)


def build_model(args: ModelArgs, device: torch.device | str = "cpu") -> Transformer:
    """A model with initialised weights (on the meta device, weights stay uninitialised)."""
    with torch.device(device):
        model = Transformer(args)
    if str(device) != "meta":
        model.init_weights()
    return model
