"""Model size presets and the analytic parameter count.

Preset names give the parameter count at a 32768-token vocabulary (untied embeddings
unless the preset ties them); the real count depends on the tokenizer and is printed by
the trainer at start. ``1b`` follows Llama-3.2-1B's shape (dim 2048, 16 layers, 32 heads,
8 KV heads, SwiGLU hidden 8192, tied embeddings, RoPE theta 500000).

Attention and feed-forward are registry names (models/components.py): grouped-query
(``gqa``), DeepSeek-V2 latent attention (``mla``) or sliding-window attention (``swa``); a
dense SwiGLU or a mixture of SwiGLU experts (``moe``). Switching a dense GQA preset to another
component fills the shape keys left at 0 from it (:func:`fill_derived_shapes`, each
component's ``fill_shapes``): MLA as DeepSeek-V2-Lite relative to the
head size h (no query latent, KV latent 4h, RoPE dims h/2, no-RoPE and value dims h); MoE
as 8 experts, top-2, hidden f/2, no shared experts: the same active feed-forward size as
the dense model, 4x its total.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields, replace
from typing import Any

from normopt.models.components import attention_class, feed_forward_class
from normopt.models.norm_layer import NormConfig
from normopt.models.norms import norm_param_count, reference_embed_scale, resolve_norm_config
from normopt.registry import component_options

NAMING_VOCAB = 32768


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    init_std: float = 0.02
    norm_config: NormConfig = NormConfig()  # every norm layer's settings
    embed_scale: float | None = None  # learnable scalar on the token embedding, its init
    attention: str = "gqa"  # an attention registry name (models/components.py)
    attention_window: int = 0  # swa: keys per query (0 = its default)
    # MLA (0 = derived from the head size, see the module doc; q_lora_rank 0 = no query latent)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    ffn: str = "dense"  # a feed-forward registry name (models/components.py)
    # MoE (0 = derived from the dense shape)
    n_experts: int = 0
    moe_top_k: int = 2
    moe_hidden: int = 0  # each expert's SwiGLU hidden size
    n_shared_experts: int = 0  # always-on experts of the same hidden size
    moe_score: str = "softmax"  # softmax | sigmoid
    moe_balance: str = "aux_loss"  # aux_loss | aux_free | none
    moe_aux_coef: float = 0.01
    moe_bias_rate: float = 1e-3  # aux_free: bias step per optimizer step
    # a plugin attention's or feed-forward's own keys (model.<name>_<field>): (name, ((field, value), ...))
    component_options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def options(self, component: str) -> dict[str, Any]:
        """The own keys of the attention or feed-forward ``component`` ({} when it has none)."""
        return dict(dict(self.component_options).get(component, ()))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Dimensions per head that RoPE rotates."""
        return attention_class(self.attention).rope_dim(self)

    @property
    def norm(self) -> str:
        """The norm's registry name."""
        return self.norm_config.name


def _preset(dim, n_layers, n_heads, n_kv_heads, ffn_hidden, tie=False, theta=10000.0, **latent_moe) -> ModelArgs:
    return fill_derived_shapes(
        ModelArgs(NAMING_VOCAB, dim, n_layers, n_heads, n_kv_heads, ffn_hidden, tie, theta, **latent_moe)
    )


def fill_derived_shapes(args: ModelArgs) -> ModelArgs:
    """Component shape keys left at 0 filled from the dense GQA shape (module doc)."""
    filled = {**attention_class(args.attention).fill_shapes(args), **feed_forward_class(args.ffn).fill_shapes(args)}
    return replace(args, **filled) if filled else args


PRESETS: dict[str, ModelArgs] = {
    # a few M parameters at an 8k vocab: well under a second per step on a laptop CPU
    "debug": _preset(192, 4, 6, 2, 512),
    # the debug shape with latent attention (query latent too) and/or 8 experts, top-2
    "debug-mla": _preset(192, 4, 6, 2, 512, attention="mla", q_lora_rank=96),
    "debug-moe": _preset(192, 4, 6, 2, 512, ffn="moe"),
    "debug-mla-moe": _preset(192, 4, 6, 2, 512, attention="mla", q_lora_rank=96, ffn="moe"),
    # size ladder for spectral-scaling studies (77M ... 2.8B)
    "77m": _preset(640, 8, 10, 5, 1792),
    "124m": _preset(768, 12, 12, 4, 2048),
    "350m": _preset(1024, 24, 16, 8, 2816),
    "760m": _preset(1536, 24, 16, 8, 4352),
    "1b": _preset(2048, 16, 32, 8, 8192, tie=True, theta=500000.0),
    "1.4b": _preset(2048, 27, 16, 8, 5632),
    "2.8b": _preset(2560, 32, 32, 8, 8192),
    # ~0.97B total, ~0.27B active (32k vocabulary): MLA (query latent 512, KV latent 256) and 32 fine-grained
    # experts (hidden 512), top-4, plus 2 shared experts; a GPU model in the range of the
    # MLA/MoE/Muon study's larger models
    "mla-moe-1b": _preset(
        1024,
        16,
        16,
        16,
        4096,
        attention="mla",
        q_lora_rank=512,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        ffn="moe",
        n_experts=32,
        moe_top_k=4,
        moe_hidden=512,
        n_shared_experts=2,
    ),
}


def resolve_model_args(model_cfg, vocab_size: int) -> ModelArgs:
    """The preset's ModelArgs with every ``model`` config key of the same name that is set
    (shape overrides are None unless given), the norm settings read by
    :func:`~normopt.models.norms.resolve_norm_config`, and an ``auto`` embedding scale
    resolved to the reference value of the norm (see ``models.norms``)."""
    base = PRESETS[model_cfg.preset]
    overrides = {
        f.name: getattr(model_cfg, f.name) for f in fields(ModelArgs) if getattr(model_cfg, f.name, None) is not None
    }
    if "dim" in overrides and "n_heads" not in overrides:
        # a width override keeps the preset's head size
        overrides["n_heads"] = max(1, overrides["dim"] // base.head_dim)
    n_heads = overrides.get("n_heads", base.n_heads)
    if "n_kv_heads" not in overrides and n_heads % base.n_kv_heads:
        overrides["n_kv_heads"] = n_heads  # the preset's grouping no longer fits: plain MHA
    norm_config = overrides["norm_config"] = resolve_norm_config(model_cfg)
    dim = overrides.get("dim", base.dim)
    scale = overrides.pop("embed_scale", None)
    overrides["embed_scale"] = (
        reference_embed_scale(norm_config.name, dim)
        if scale == "auto"
        else math.sqrt(dim)
        if scale == "sqrt_dim"
        else None
        if scale in (None, "none")
        else float(scale)
    )
    args = replace(base, **overrides, vocab_size=vocab_size)
    own = {name: component_options(model_cfg, name) for name in (args.attention, args.ffn)}
    options = tuple((name, tuple(dataclasses.asdict(o).items())) for name, o in own.items() if o is not None)
    return fill_derived_shapes(replace(args, component_options=options))


def _attention_params(args: ModelArgs, norms: bool = True) -> int:
    """One block's attention (its latent norms included unless ``norms`` is False): the
    registered class's count."""
    return attention_class(args.attention).param_count(
        args, lambda features: norm_param_count(args.norm_config, features) if norms else 0
    )


def _ffn_params(args: ModelArgs, active: bool) -> int:
    """One block's feed-forward: its total or per-token active count."""
    return feed_forward_class(args.ffn).param_counts(args)[1 if active else 0]


def _count(args: ModelArgs, active: bool, norms: bool = True) -> int:
    d = args.dim
    norm = norm_param_count(args.norm_config, d) if norms else 0
    block = _attention_params(args, norms) + _ffn_params(args, active) + 2 * norm
    head = 0 if args.tie_embeddings else args.vocab_size * d
    scale = 0 if args.embed_scale is None or not norms else 1
    return args.vocab_size * d + scale + args.n_layers * block + norm + head


def count_parameters(args: ModelArgs) -> int:
    """Analytic parameter count.

    N = V d (embedding) + [1 embedding scale] + L [attention + ffn + 2 norm(d)]
        + norm(d) + [V d if untied]
    with attention = 2 d^2 + 2 d n_kv h for GQA and SWA (h the head dim; MLA:
    ``mla_param_count``) and ffn = 3 d f for a dense SwiGLU of hidden size f (MoE: router +
    every expert, ``moe_param_counts``).
    """
    return _count(args, active=False)


def count_parameters_without_norms(args: ModelArgs) -> int:
    """``count_parameters`` without the norm layers' parameters (gains, biases, alphas, shifts,
    MLA's latent norms included) and the embedding scale: the same for every norm of one
    shape, so a quantity per parameter built on it (``train.tokens_per_param``, the report's
    interaction against model size) does not differ between the cells a norm comparison
    compares. The difference to ``count_parameters`` is a few feature vectors per layer."""
    return _count(args, active=False, norms=False)


def count_active_parameters(args: ModelArgs) -> int:
    """Parameters a token passes through: as ``count_parameters`` with only the router,
    the top-k routed experts and the shared experts of each MoE layer; equal to it for a
    dense model."""
    return _count(args, active=True)


def count_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 N_matmul + L A(T), with N_matmul the matrices a token is
    multiplied by (attention projections, router, active experts, output head) and A(T)
    the attention scores and values, 12 d T for GQA (causal masking not discounted, as in
    the PaLM MFU convention; SWA 12 d min(T, w); MLA: ``mla_attention_flops``). The embedding
    lookup is free; a tied output head still costs its matmul."""
    attention = attention_class(args.attention)
    matmul_params = (
        args.n_layers * (attention.matmul_params(args) + _ffn_params(args, active=True)) + args.vocab_size * args.dim
    )
    return 6.0 * matmul_params + args.n_layers * attention.score_flops(args, seq_len)
