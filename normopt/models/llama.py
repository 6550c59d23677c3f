"""Llama-style decoder: token embedding, RoPE, pre-norm residual blocks of an attention and a
feed-forward (registry names: models/components.py), final norm and output head (tied or
untied).

The model protocol: what the trainer, the parameter groups and the diagnostics ask of the
model and of its modules, so that none of them names a component (a plugin's module answers
the same questions):

* ``param_role`` (a module's class attribute): the optimizer group of the parameters under it
  (``"norm"`` for every norm layer, ``"router"`` for an MoE gate); unset, a parameter's group
  follows from its place and shape (optim/param_groups.py).
* ``end_optimizer_step(modules)`` (a classmethod): called once per optimizer step on every
  rank with all of the model's modules of that class, to fold cross-rank state (derf_ema's
  running scales, MoE expert loads) in one collective per class; returns tensors worth
  logging, which the trainer sums over a logging window and hands to the class's
  ``step_statistics_record(summed)`` for the metrics line.
* ``reset_buffers()``: buffers (not parameters) to their init, when weights are initialised.
* ``aux_loss_name`` (a feed-forward's class attribute): when set, its forward returns
  (output, auxiliary loss); the loss is added to the training loss and logged under that name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from normopt.models.activation_checkpoint import checkpointed_call
from normopt.models.components import attention_class, feed_forward_class
from normopt.models.norms import build_norm
from normopt.models.presets import ModelArgs
from normopt.models.rope import rope_frequencies


class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(.)); forward also returns the block's auxiliary
    loss (its feed-forward's, e.g. the MoE balance loss; zero for a dense block)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = build_norm(args.norm_config, args.dim, "attn")
        self.attn = attention_class(args.attention)(args)
        self.ffn_norm = build_norm(args.norm_config, args.dim, "ffn")
        self.ffn = feed_forward_class(args.ffn).build(args)
        self.has_aux_loss = getattr(self.ffn, "aux_loss_name", None) is not None
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
        if self.has_aux_loss:
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
        for module in (*self.attn.modules(), *self.ffn.modules()):
            if hasattr(module, "reset_buffers"):
                module.reset_buffers()


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
    def aux_loss_name(self) -> str | None:
        """The metric name of the blocks' auxiliary loss (``moe_aux_loss``); None when no
        block's forward has one."""
        names = [block.ffn.aux_loss_name for block in self.layers if block.has_aux_loss]
        return names[0] if names else None

    def _step_hooks(self) -> dict[type, list[nn.Module]]:
        """Each module class with an ``end_optimizer_step`` hook -> its modules, in model order."""
        hooked: dict[type, list[nn.Module]] = {}
        for module in self.modules():
            if module is not self and hasattr(type(module), "end_optimizer_step"):
                hooked.setdefault(type(module), []).append(module)
        return hooked

    @torch.no_grad()
    def end_optimizer_step(self) -> dict[str, torch.Tensor]:
        """Fold the layers' cross-rank state once per optimizer step, on every rank (one
        collective per module class; the model protocol, module docstring): derf_ema's
        running input scales, the MoE routers' expert loads and with them the aux-free
        routing biases, a plugin's own. Returns the step's statistics worth logging, kept on
        the device (``expert_loads``: tokens per (MoE layer, expert))."""
        stats: dict[str, torch.Tensor] = {}
        for cls, modules in self._step_hooks().items():
            stats.update(cls.end_optimizer_step(modules))
        return stats

    def step_statistics_record(self, summed: dict[str, torch.Tensor]) -> dict:
        """Metrics fields of :meth:`end_optimizer_step`'s statistics summed over a logging
        window, from each hooked class (per MoE layer: tokens per expert, load entropy, max
        over mean load)."""
        record: dict = {}
        for cls in self._step_hooks():
            if hasattr(cls, "step_statistics_record"):
                record.update(cls.step_statistics_record(summed))
        return record

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
