"""Model size presets and the analytic parameter count.

Preset names give the parameter count at a 32768-token vocabulary (untied embeddings
unless the preset ties them); the real count depends on the tokenizer and is printed by
the trainer at start. ``1b`` follows Llama-3.2-1B's shape (dim 2048, 16 layers, 32 heads,
8 KV heads, SwiGLU hidden 8192, tied embeddings, RoPE theta 500000).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from normopt.models.norm_layer import NormConfig
from normopt.models.norms import norm_param_count, reference_embed_scale, resolve_norm_config

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

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def norm(self) -> str:
        """The norm's registry name."""
        return self.norm_config.name


def _preset(dim, n_layers, n_heads, n_kv_heads, ffn_hidden, tie=False, theta=10000.0) -> ModelArgs:
    return ModelArgs(NAMING_VOCAB, dim, n_layers, n_heads, n_kv_heads, ffn_hidden, tie, theta)


PRESETS: dict[str, ModelArgs] = {
    # a few M parameters at an 8k vocab: well under a second per step on a laptop CPU
    "debug": _preset(192, 4, 6, 2, 512),
    # size ladder for spectral-scaling studies (77M ... 2.8B)
    "77m": _preset(640, 8, 10, 5, 1792),
    "124m": _preset(768, 12, 12, 4, 2048),
    "350m": _preset(1024, 24, 16, 8, 2816),
    "760m": _preset(1536, 24, 16, 8, 4352),
    "1b": _preset(2048, 16, 32, 8, 8192, tie=True, theta=500000.0),
    "1.4b": _preset(2048, 27, 16, 8, 5632),
    "2.8b": _preset(2560, 32, 32, 8, 8192),
}


def resolve_model_args(model_cfg, vocab_size: int) -> ModelArgs:
    """The preset's ModelArgs with every ``model`` config key of the same name that is set
    (shape overrides are None unless given), the norm settings read by
    :func:`~normopt.models.norms.resolve_norm_config`, and an ``auto`` embedding scale
    resolved to the reference value of the norm (see ``models.norms``)."""
    base = PRESETS[model_cfg.preset]
    overrides = {f.name: getattr(model_cfg, f.name) for f in fields(ModelArgs)
                 if getattr(model_cfg, f.name, None) is not None}
    if "dim" in overrides and "n_heads" not in overrides:
        # a width override keeps the preset's head size
        overrides["n_heads"] = max(1, overrides["dim"] // base.head_dim)
    n_heads = overrides.get("n_heads", base.n_heads)
    if "n_kv_heads" not in overrides and n_heads % base.n_kv_heads:
        overrides["n_kv_heads"] = n_heads  # the preset's grouping no longer fits: plain MHA
    norm_config = overrides["norm_config"] = resolve_norm_config(model_cfg)
    dim = overrides.get("dim", base.dim)
    scale = overrides.pop("embed_scale", None)
    overrides["embed_scale"] = (reference_embed_scale(norm_config.name, dim) if scale == "auto"
                                else None if scale in (None, "none") else float(scale))
    return replace(base, **overrides, vocab_size=vocab_size)


def count_parameters(args: ModelArgs) -> int:
    """Analytic parameter count.

    N = V d (embedding) + [1 embedding scale] + L [2 d^2 + 2 d n_kv h + 3 d f + 2 norm(d)]
        + norm(d) + [V d if untied]
    with h the head dim and f the SwiGLU hidden size.
    """
    d, kv = args.dim, args.n_kv_heads * args.head_dim
    attention = d * d * 2 + 2 * d * kv
    mlp = 3 * d * args.ffn_hidden
    norm = norm_param_count(args.norm_config, d)
    block = attention + mlp + 2 * norm
    head = 0 if args.tie_embeddings else args.vocab_size * d
    scale = 0 if args.embed_scale is None else 1
    return args.vocab_size * d + scale + args.n_layers * block + norm + head


def count_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 N_matmul + 12 L d T (attention scores and values, causal
    masking not discounted, as in the PaLM MFU convention). The embedding lookup is free;
    a tied output head still costs its matmul."""
    d, kv = args.dim, args.n_kv_heads * args.head_dim
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * args.ffn_hidden
    matmul_params = args.n_layers * per_layer + args.vocab_size * d
    return 6.0 * matmul_params + 12.0 * args.n_layers * d * seq_len
