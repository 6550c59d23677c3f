"""The ``model`` config section: the preset, shape overrides, the norm and its settings,
the attention and feed-forward (registry names) and their shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from normopt.key_roles import MATH, require, role
from normopt.models.components import ATTENTIONS, FEED_FORWARDS, attention_class, feed_forward_class
from normopt.models.moe import BALANCE, SCORES
from normopt.models.norms import NORMS, norm_class
from normopt.registry import check_registered


@dataclass
class ModelConfig:
    """The preset, shape overrides, the norm and its settings, the attention and feed-forward."""

    preset: str = role(MATH, "debug", "the shape preset (models/presets.py: debug, 77m, 124m, 350m, 1b, ...)")
    norm: str = role(
        MATH,
        "rmsnorm",
        "the norm of every block and of the final layer: rmsnorm, dyt, derf, derf_ema, layernorm "
        "(the norm registry, models/norms.py), or a plugin's",
    )
    # optional overrides of the preset's shape (None = the preset's value)
    dim: int | None = role(
        MATH, None, "model width; null = the preset's (a width override keeps the preset's head size)"
    )
    n_layers: int | None = role(MATH, None, "transformer blocks; null = the preset's")
    n_heads: int | None = role(MATH, None, "attention (query) heads; null = the preset's")
    n_kv_heads: int | None = role(
        MATH, None, "key-value heads of grouped-query attention (must divide n_heads); null = the preset's"
    )
    ffn_hidden: int | None = role(MATH, None, "SwiGLU hidden size of the dense feed-forward; null = the preset's")
    tie_embeddings: bool | None = role(
        MATH, None, "the output head shares the token embedding's weight; null = the preset's"
    )
    rope_theta: float | None = role(MATH, None, "RoPE base theta (frequencies theta^(-2i/d)); null = the preset's")
    norm_eps: float = role(MATH, 1e-5, "normalising norms (RMSNorm, LayerNorm): added to the variance")
    init_std: float = role(
        MATH, 0.02, "std of the normal init of embeddings and linears (residual outputs: std / sqrt(2 n_layers))"
    )
    alpha_init_attn: float | Literal["auto"] = role(
        MATH,
        "auto",
        "bounded norms' alpha init before attention; auto = the norm's reference LM value (models/norms.py)",
    )
    alpha_init_ffn: float | Literal["auto"] = role(
        MATH, "auto", "bounded norms' alpha init before the feed-forward; auto = the norm's reference LM value"
    )
    alpha_init_final: float | Literal["auto"] = role(
        MATH, "auto", "bounded norms' alpha init of the final norm; auto = the norm's reference LM value"
    )
    norm_bias: bool | Literal["auto"] = role(
        MATH, "auto", "per-feature bias b of norms that can have one; auto = as the norm's reference code"
    )
    # sqrt_dim: an RMSNorm model with the bounded norms' embedding scale, to separate the two
    embed_scale: float | Literal["auto", "sqrt_dim", "none"] = role(
        MATH,
        "auto",
        "learnable scalar on the token embedding: auto = sqrt(dim) for bounded norms, none for "
        "normalising ones; sqrt_dim = sqrt(dim) whatever the norm; none; or a number (its init)",
    )
    derf_shift_init: float = role(MATH, 0.0, "derf, derf_ema: init of the shift s in erf(alpha x + s)")
    derf_ema_momentum: float = role(
        MATH, 0.99, "derf_ema: momentum of the running input-scale estimate blended into the erf argument"
    )
    derf_ema_blend: float = role(
        MATH,
        0.5,
        "derf_ema: weight lambda of the input-scale growth in the divisor of the erf argument (0 = plain derf)",
    )
    # attention and feed-forward: registry names (models/components.py); None = the preset's.
    # The MLA and MoE shape keys left unset (or 0) follow the dense shape (models/presets.py).
    attention: str | None = role(
        MATH,
        None,
        "gqa (grouped-query), mla (DeepSeek-V2 latent attention), swa (sliding window) or a plugin's; "
        "null = the preset's",
    )
    attention_window: int | None = role(MATH, None, "swa: keys per query, itself included; null = 128")
    q_lora_rank: int | None = role(
        MATH, None, "mla: query latent size; 0 = queries straight from x; null = the preset's"
    )
    kv_lora_rank: int | None = role(
        MATH, None, "mla: the shared key-value latent; null = the preset's or 4 x head size"
    )
    qk_nope_head_dim: int | None = role(
        MATH, None, "mla: per-head query/key dims without RoPE; null = the preset's or the head size"
    )
    qk_rope_head_dim: int | None = role(
        MATH, None, "mla: per-head RoPE dims (one RoPE key shared by the heads); null = the preset's or head size / 2"
    )
    v_head_dim: int | None = role(MATH, None, "mla: per-head value dims; null = the preset's or the head size")
    ffn: str | None = role(
        MATH,
        None,
        "dense (SwiGLU), moe (routed SwiGLU experts, models/moe.py) or a plugin's; null = the preset's",
    )
    n_experts: int | None = role(MATH, None, "moe: routed experts; null = the preset's or 8")
    moe_top_k: int | None = role(MATH, None, "moe: experts per token; null = the preset's or 2")
    moe_hidden: int | None = role(
        MATH,
        None,
        "moe: each expert's SwiGLU hidden size; null = the preset's or ffn_hidden / 2 (the dense active size at top-2)",
    )
    n_shared_experts: int | None = role(
        MATH, None, "moe: always-on experts of hidden moe_hidden; null = the preset's or 0"
    )
    moe_score: Literal[SCORES] | None = role(MATH, None, "moe: router scores, softmax or sigmoid; null = softmax")
    moe_balance: Literal[BALANCE] | None = role(
        MATH,
        None,
        "moe load balancing: aux_loss (DeepSeek-V2 balance loss, coefficient moe_aux_coef), "
        "aux_free (DeepSeek-V3 per-expert routing bias, step moe_bias_rate) or none; null = aux_loss",
    )
    moe_aux_coef: float | None = role(MATH, None, "moe aux_loss: the balance loss coefficient; null = 0.01")
    moe_bias_rate: float | None = role(
        MATH, None, "moe aux_free: the routing bias step per optimizer step; null = 0.001"
    )

    def validate(self, vocab_size: int) -> None:
        """Refuse impossible values; the shape is checked as resolved against its preset."""
        from normopt.models.presets import PRESETS, resolve_model_args

        require(
            self.preset in PRESETS, "model.preset", f"unknown preset {self.preset!r} (presets: {', '.join(PRESETS)})"
        )
        check_registered(NORMS, "model.norm", self.norm)
        check_registered(ATTENTIONS, "model.attention", self.attention)
        check_registered(FEED_FORWARDS, "model.ffn", self.ffn)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "attention_window"):
            value = getattr(self, name)
            require(value is None or value > 0, f"model.{name}", "must be positive")
        require(self.norm_eps > 0, "model.norm_eps", "must be positive")
        require(
            self.rope_theta is None or self.rope_theta > 0,
            "model.rope_theta",
            "must be positive (RoPE frequencies are theta^(-2i/d))",
        )
        require(self.init_std > 0, "model.init_std", "must be positive")
        for name in ("alpha_init_attn", "alpha_init_ffn", "alpha_init_final"):
            value = getattr(self, name)
            require(value == "auto" or value > 0, f"model.{name}", "must be positive or auto")
        require(
            not (self.norm_bias is True and not norm_class(self.norm).supports_bias),
            "model.norm_bias",
            f"{self.norm} has no bias (use auto or false)",
        )
        require(
            self.embed_scale in ("auto", "sqrt_dim", "none") or self.embed_scale > 0,
            "model.embed_scale",
            "must be auto, sqrt_dim, none or a positive number",
        )
        require(0.0 <= self.derf_ema_momentum < 1.0, "model.derf_ema_momentum", "must be in [0, 1)")
        require(0.0 <= self.derf_ema_blend <= 1.0, "model.derf_ema_blend", "must be in [0, 1]")
        for name in ("q_lora_rank", "n_shared_experts"):
            require(getattr(self, name) is None or getattr(self, name) >= 0, f"model.{name}", "must be >= 0")
        for name in (
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_experts",
            "moe_top_k",
            "moe_hidden",
        ):
            require(getattr(self, name) is None or getattr(self, name) > 0, f"model.{name}", "must be positive")
        for name in ("moe_aux_coef", "moe_bias_rate"):
            require(getattr(self, name) is None or getattr(self, name) >= 0, f"model.{name}", "must be >= 0")
        args = resolve_model_args(self, vocab_size=vocab_size)
        attention_class(args.attention).check_shapes(args)
        feed_forward_class(args.ffn).check_shapes(args)
        require(args.dim % args.n_heads == 0, "model.n_heads", f"{args.n_heads} heads do not divide dim {args.dim}")
        require(args.head_dim % 2 == 0, "model.n_heads", f"head dim {args.head_dim} must be even for RoPE")
        require(
            args.n_heads % args.n_kv_heads == 0,
            "model.n_kv_heads",
            f"{args.n_kv_heads} KV heads do not divide {args.n_heads} heads",
        )
