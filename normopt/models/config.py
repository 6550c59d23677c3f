"""The ``model`` config section: the preset, shape overrides, the norm and its settings,
the attention and feed-forward (registry names) and their shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from normopt.key_roles import require
from normopt.models.components import ATTENTION_NAMES, FEED_FORWARD_NAMES, attention_class, feed_forward_class
from normopt.models.moe import BALANCE, SCORES
from normopt.models.norms import NORM_NAMES, norm_class


@dataclass
class ModelConfig:
    preset: str = "debug"
    norm: Literal[NORM_NAMES] = "rmsnorm"  # the norm registry's names
    # Optional overrides of the preset's shape (None = the preset's value).
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    tie_embeddings: bool | None = None
    rope_theta: float | None = None
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # bounded norms' alpha init per norm location; auto = the norm's reference LM value
    # (see normopt/models/norms.py)
    alpha_init_attn: float | Literal["auto"] = "auto"
    alpha_init_ffn: float | Literal["auto"] = "auto"
    alpha_init_final: float | Literal["auto"] = "auto"
    # per-feature bias b of norms that can have one; auto = as the norm's reference code
    norm_bias: bool | Literal["auto"] = "auto"
    # learnable scalar on the token embedding: auto = sqrt(dim) for bounded norms and none
    # for normalising ones (the reference models); sqrt_dim = sqrt(dim) whatever the norm (an
    # RMSNorm model with the bounded norms' embedding scale, to separate the two); none; or a
    # number (its init)
    embed_scale: float | Literal["auto", "sqrt_dim", "none"] = "auto"
    derf_shift_init: float = 0.0
    # derf_ema: running input-scale estimate blended into the erf argument.
    derf_ema_momentum: float = 0.99
    derf_ema_blend: float = 0.5
    # attention: an attention registry name (models/components.py): gqa (grouped-query), mla
    # (DeepSeek-V2 latent attention) or swa (sliding window); None = the preset's. The MLA
    # shape keys left unset (or 0) follow the head size.
    attention: Literal[ATTENTION_NAMES] | None = None
    attention_window: int | None = None  # swa: keys per query, itself included (unset = 128)
    q_lora_rank: int | None = None  # query latent size; 0 = queries straight from x
    kv_lora_rank: int | None = None  # the shared key-value latent
    qk_nope_head_dim: int | None = None  # per-head query/key dims without RoPE
    qk_rope_head_dim: int | None = None  # per-head RoPE dims (one RoPE key shared by the heads)
    v_head_dim: int | None = None
    # feed-forward: dense SwiGLU or moe (routed SwiGLU experts, models/moe.py); None = the
    # preset's. Unset MoE sizes: 8 experts, hidden ffn_hidden / 2 (the dense active size).
    ffn: Literal[FEED_FORWARD_NAMES] | None = None
    n_experts: int | None = None
    moe_top_k: int | None = None  # experts per token
    moe_hidden: int | None = None  # each expert's SwiGLU hidden size
    n_shared_experts: int | None = None  # always-on experts of hidden moe_hidden
    moe_score: Literal[SCORES] | None = None
    # load balancing: aux_loss (DeepSeek-V2 balance loss, coefficient moe_aux_coef),
    # aux_free (DeepSeek-V3 per-expert routing bias, step moe_bias_rate) or none
    moe_balance: Literal[BALANCE] | None = None
    moe_aux_coef: float | None = None
    moe_bias_rate: float | None = None

    def validate(self, vocab_size: int) -> None:
        """Refuse impossible values; the shape is checked as resolved against its preset."""
        from normopt.models.presets import PRESETS, resolve_model_args

        require(self.preset in PRESETS, "model.preset",
                f"unknown preset {self.preset!r} (presets: {', '.join(PRESETS)})")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "attention_window"):
            value = getattr(self, name)
            require(value is None or value > 0, f"model.{name}", "must be positive")
        require(self.norm_eps > 0, "model.norm_eps", "must be positive")
        require(self.rope_theta is None or self.rope_theta > 0, "model.rope_theta",
                "must be positive (RoPE frequencies are theta^(-2i/d))")
        require(self.init_std > 0, "model.init_std", "must be positive")
        for name in ("alpha_init_attn", "alpha_init_ffn", "alpha_init_final"):
            value = getattr(self, name)
            require(value == "auto" or value > 0, f"model.{name}", "must be positive or auto")
        require(not (self.norm_bias is True and not norm_class(self.norm).supports_bias), "model.norm_bias",
                f"{self.norm} has no bias (use auto or false)")
        require(self.embed_scale in ("auto", "sqrt_dim", "none") or self.embed_scale > 0, "model.embed_scale",
                "must be auto, sqrt_dim, none or a positive number")
        require(0.0 <= self.derf_ema_momentum < 1.0, "model.derf_ema_momentum", "must be in [0, 1)")
        require(0.0 <= self.derf_ema_blend <= 1.0, "model.derf_ema_blend", "must be in [0, 1]")
        for name in ("q_lora_rank", "n_shared_experts"):
            require(getattr(self, name) is None or getattr(self, name) >= 0, f"model.{name}", "must be >= 0")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_experts", "moe_top_k",
                     "moe_hidden"):
            require(getattr(self, name) is None or getattr(self, name) > 0, f"model.{name}", "must be positive")
        for name in ("moe_aux_coef", "moe_bias_rate"):
            require(getattr(self, name) is None or getattr(self, name) >= 0, f"model.{name}", "must be >= 0")
        args = resolve_model_args(self, vocab_size=vocab_size)
        attention_class(args.attention).check_shapes(args)
        feed_forward_class(args.ffn).check_shapes(args)
        require(args.dim % args.n_heads == 0, "model.n_heads", f"{args.n_heads} heads do not divide dim {args.dim}")
        require(args.head_dim % 2 == 0, "model.n_heads", f"head dim {args.head_dim} must be even for RoPE")
        require(args.n_heads % args.n_kv_heads == 0, "model.n_kv_heads",
                f"{args.n_kv_heads} KV heads do not divide {args.n_heads} heads")
