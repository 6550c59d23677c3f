"""Llama-style decoder: token embedding, RoPE, pre-norm residual blocks of an attention and a
feed-forward (registry names: models/components.py), final norm and output head (tied or
untied)."""

from __future__ import annotations

import math

import torch
from torch import nn

from normopt.models.activation_checkpoint import checkpointed_call
from normopt.models.components import attention_class, feed_forward_class
from normopt.models.derf import commit_running_scales
from normopt.models.moe import commit_expert_loads, load_summary
from normopt.models.norms import build_norm
from normopt.models.presets import ModelArgs
from normopt.models.rope import rope_frequencies


class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(.)); forward also returns the block's auxiliary
    loss (the MoE balance loss; zero for a dense block)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = build_norm(args.norm_config, args.dim, "attn")
        self.attn = attention_class(args.attention)(args)
        self.ffn_norm = build_norm(args.norm_config, args.dim, "ffn")
        self.ffn = feed_forward_class(args.ffn).build(args)
        self.moe = self.ffn.routed
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

    @property
    def routed(self) -> bool:
        """Whether any block routes tokens to experts (its forward then has a balance loss)."""
        return any(block.moe for block in self.layers)

    @torch.no_grad()
    def end_optimizer_step(self) -> dict[str, torch.Tensor]:
        """Fold the layers' cross-rank state once per optimizer step, on every rank (one
        all-reduce per kind): derf_ema's running input scales, the MoE routers' expert loads
        and with them the aux-free routing biases. Returns the step's statistics worth
        logging, kept on the device (``expert_loads``: tokens per (MoE layer, expert))."""
        commit_running_scales(self)
        counts = commit_expert_loads(self, self.args.moe_bias_rate)
        return {} if counts is None else {"expert_loads": counts}

    @staticmethod
    def step_statistics_record(summed: dict[str, torch.Tensor]) -> dict:
        """Metrics fields of :meth:`end_optimizer_step`'s statistics summed over a logging
        window (per MoE layer: tokens per expert, load entropy, max over mean load)."""
        return load_summary(summed["expert_loads"].cpu()) if "expert_loads" in summed else {}

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
