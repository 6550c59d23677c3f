"""A decoder trained with normopt, for transformers (``normopt export --format hf`` copies this
file into the exported folder; load it with ``trust_remote_code=True``).

Self-contained: it depends on torch and transformers only. The model is a pre-norm
decoder, x + attn(norm(x)) then + ffn(norm(.)), with

* norm (``config.norm``): rmsnorm, layernorm, dyt (g tanh(a x) + b), derf
  (g erf(a x + s) + b) or derf_ema (derf with its input divided by a running scale c,
  frozen at export time and stored as the ``input_scale`` buffer of each layer), or a
  plugin's norm, whose module the export copies beside this file (``PLUGIN_NORMS``);
* attention (``config.attention``): gqa (grouped-query), swa (gqa restricted to the last
  ``attention_window`` keys) or mla (DeepSeek-V2 latent attention), all with rotate-half
  RoPE (only the ``qk_rope_head_dim`` dims under mla);
* feed-forward (``config.ffn``): a dense SwiGLU or a mixture of SwiGLU experts (top-k of
  softmax or sigmoid router scores, renormalised, plus always-on shared experts);
* an optional learnable scalar on the token embedding (``config.embed_scale``).

Norms and RoPE are evaluated in float32 as in training. Generation re-runs the model over
the last ``max_position_embeddings`` (the training length) tokens at every step, with no
key-value cache: meant for the small models normopt trains and for evaluation harnesses,
which score whole sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class NormoptConfig(PretrainedConfig):
    model_type = "normopt"

    def __init__(
        self,
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        rope_theta=10000.0,
        max_position_embeddings=256,
        norm="rmsnorm",
        norm_eps=1e-5,
        norm_bias=False,
        embed_scale=False,
        attention="gqa",
        attention_window=0,
        q_lora_rank=0,
        kv_lora_rank=0,
        qk_nope_head_dim=0,
        qk_rope_head_dim=0,
        v_head_dim=0,
        ffn="dense",
        n_experts=0,
        moe_top_k=2,
        moe_hidden=0,
        n_shared_experts=0,
        moe_score="softmax",
        moe_routing_bias=False,
        tie_word_embeddings=False,
        norm_settings=None,
        **kwargs,
    ):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.intermediate_size, self.rope_theta = intermediate_size, rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.norm, self.norm_eps, self.norm_bias, self.embed_scale = norm, norm_eps, norm_bias, embed_scale
        self.norm_settings = norm_settings  # a plugin norm's resolved settings (PLUGIN_NORMS below)
        self.attention, self.attention_window = attention, attention_window
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.ffn, self.n_experts, self.moe_top_k, self.moe_hidden = ffn, n_experts, moe_top_k, moe_hidden
        self.n_shared_experts, self.moe_score, self.moe_routing_bias = n_shared_experts, moe_score, moe_routing_bias
        kwargs.setdefault("use_cache", False)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# -- norms: y = g * core(x) (+ b), in float32 -------------------------------------------


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * g (+ b)."""

    def __init__(self, dim, eps, bias):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), bias, self.eps).to(x.dtype)


class DyT(nn.Module):
    """g * tanh(alpha x) (+ b), alpha a learned scalar."""

    def __init__(self, dim, bias):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        y = torch.tanh(self.alpha.float() * x.float()) * self.weight.float()
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)


class Derf(nn.Module):
    """g * erf(alpha x / c + s) (+ b); c = 1 (derf) or derf_ema's running scale, frozen."""

    def __init__(self, dim, bias, frozen_scale):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.shift = nn.Parameter(torch.zeros(1))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        if frozen_scale:  # float64 like the statistics it comes from; a model loaded in bfloat16 keeps it
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float64))
        else:
            self.input_scale = None

    def forward(self, x):
        x32 = x.float() if self.input_scale is None else x.float() / self.input_scale.float()
        y = torch.erf(self.alpha.float() * x32 + self.shift.float()) * self.weight.float()
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)


# a plugin norm: registry name -> its layer class, imported from the plugin's module beside
# this file by the lines normopt export appends at the end
PLUGIN_NORMS = {}


class NormSettings:
    """What a plugin norm's ``from_config`` reads: normopt's resolved norm settings."""

    def __init__(self, fields):
        self.__dict__.update(fields)
        self.options = tuple(tuple(pair) for pair in fields.get("options", ()))

    def alpha_init(self, location):
        return getattr(self, f"alpha_init_{location}")

    def option(self, field):
        return dict(self.options)[field]


def build_norm(config, dim):
    if config.norm in PLUGIN_NORMS:  # the location only sets inits: the weights are loaded
        return PLUGIN_NORMS[config.norm].from_config(dim, NormSettings(config.norm_settings), "attn")
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    if config.norm == "layernorm":
        return LayerNorm(dim, config.norm_eps, config.norm_bias)
    if config.norm == "dyt":
        return DyT(dim, config.norm_bias)
    if config.norm in ("derf", "derf_ema"):
        return Derf(dim, config.norm_bias, frozen_scale=config.norm == "derf_ema")
    raise ValueError(f"unknown norm {config.norm!r}")


# -- rotary position embeddings (rotate-half form) --------------------------------------


def rope_cos_sin(positions, dim, theta):
    """cos and sin of angle[b, t, i] = position[b, t] * theta^(-2i / dim), each (batch, 1, seq, dim)."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin for x of shape (batch, heads, seq, dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def visibility_mask(seq, window, padding, device):
    """Boolean (batch or 1, 1, seq, seq) mask, True where query i sees key j: j <= i, j > i - window
    (window > 0) and key j not padding; every query sees itself (a padding query then has a
    defined output). None when plain causal attention applies."""
    if not window and padding is None:
        return None
    i = torch.arange(seq, device=device)[:, None]
    j = torch.arange(seq, device=device)[None, :]
    allowed = (j <= i) & (j > i - window) if window else j <= i
    allowed = allowed[None, None]
    if padding is not None:
        allowed = (allowed & padding.bool()[:, None, None, :]) | (i == j)
    return allowed


# -- attention ----------------------------------------------------------------------------


class GroupedQueryAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        dim = config.hidden_size
        self.wq = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin, mask):
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class LatentAttention(nn.Module):
    """Queries [q_nope | q_rope] from x (optionally through a normed latent); keys and values
    from a normed shared latent c_kv; one RoPE key k_rope shared by all heads."""

    def __init__(self, config):
        super().__init__()
        dim, self.n_heads = config.hidden_size, config.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.d_nope, self.d_rope, self.d_v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        qk_dim = self.d_nope + self.d_rope
        if self.q_lora_rank > 0:
            self.wq_a = nn.Linear(dim, self.q_lora_rank, bias=False)
            self.q_norm = build_norm(config, self.q_lora_rank)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(dim, self.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(dim, self.kv_lora_rank + self.d_rope, bias=False)
        self.kv_norm = build_norm(config, self.kv_lora_rank)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_heads * (self.d_nope + self.d_v), bias=False)
        self.wo = nn.Linear(self.n_heads * self.d_v, dim, bias=False)

    def forward(self, x, cos, sin, mask):
        batch, seq, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank > 0 else self.wq(x)
        q = q.view(batch, seq, self.n_heads, self.d_nope + self.d_rope).transpose(1, 2)
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        c_kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.d_rope], dim=-1)
        kv = self.wkv_b(self.kv_norm(c_kv)).view(batch, seq, self.n_heads, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin).expand(-1, self.n_heads, -1, -1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


# -- feed-forward -------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    """Scores s = softmax or sigmoid(W x) in float32; the top-k experts of s + b (b: the
    routing bias, used when ``moe_routing_bias``), weighted by their s renormalised to sum 1."""

    def __init__(self, config):
        super().__init__()
        self.top_k, self.score, self.use_bias = config.moe_top_k, config.moe_score, config.moe_routing_bias
        self.gate = nn.Linear(config.hidden_size, config.n_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(config.n_experts, dtype=torch.float32))

    def forward(self, x):
        logits = self.gate(x).float()
        scores = logits.softmax(dim=-1) if self.score == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias.float() if self.use_bias else scores
        idx = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, idx)
        return idx, weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as three 3-D weights (experts, out, in)."""

    def __init__(self, n_experts, dim, hidden):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def forward(self, x, idx, weights):
        """sum over each token's chosen experts of g_i SwiGLU_i(x); x (tokens, dim), idx and weights (tokens, k)."""
        k = idx.shape[-1]
        order = idx.flatten().argsort(stable=True)
        counts = torch.bincount(idx.flatten(), minlength=self.w1.shape[0]).tolist()
        token = order // k
        gate = weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = token[start : start + n]
                h = x[rows]
                y = (F.silu(h @ self.w1[e].T) * (h @ self.w3[e].T)) @ self.w2[e].T
                out.index_add_(0, rows, y * gate[start : start + n])
                start += n
        return out


class MoEFeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.router = Router(config)
        self.experts = GroupedExperts(config.n_experts, config.hidden_size, config.moe_hidden)
        self.shared = (
            SwiGLU(config.hidden_size, config.n_shared_experts * config.moe_hidden)
            if config.n_shared_experts > 0
            else None
        )

    def forward(self, x):
        idx, weights = self.router(x)
        out = self.experts(x.flatten(0, 1), idx.flatten(0, 1), weights.flatten(0, 1)).view_as(x)
        return out if self.shared is None else out + self.shared(x)


# -- the model ----------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = build_norm(config, config.hidden_size)
        self.attn = LatentAttention(config) if config.attention == "mla" else GroupedQueryAttention(config)
        self.ffn_norm = build_norm(config, config.hidden_size)
        self.ffn = (
            MoEFeedForward(config) if config.ffn == "moe" else SwiGLU(config.hidden_size, config.intermediate_size)
        )

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.ffn(self.ffn_norm(x))


class NormoptModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_scale = nn.Parameter(torch.ones(1)) if config.embed_scale else None
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = build_norm(config, config.hidden_size)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        config = self.config
        batch, seq = input_ids.shape
        h = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device)[None].expand(batch, -1)
        rope_dim = config.qk_rope_head_dim if config.attention == "mla" else config.head_dim
        cos, sin = rope_cos_sin(position_ids, rope_dim, config.rope_theta)
        padding = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        window = config.attention_window if config.attention == "swa" else 0
        mask = visibility_mask(seq, window, padding, input_ids.device)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.norm(h)


class NormoptPreTrainedModel(PreTrainedModel):
    config_class = NormoptConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        """Only for a model built from a config alone: an export loads every weight."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, GroupedExperts):
            for weight in (module.w1, module.w2, module.w3):
                nn.init.normal_(weight, std=0.02)


class NormoptForCausalLM(NormoptPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = NormoptModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # no key-value cache: every step sees the whole sequence

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, attention_mask=None, **kwargs):
        """The last ``max_position_embeddings`` tokens at every step (whatever use_cache says:
        there is no cache to continue), at positions 0, 1, ... as in training: past the
        training length the context slides, as in ``normopt sample``."""
        window = self.config.max_position_embeddings
        input_ids = input_ids[:, -window:]
        kwargs.pop("position_ids", None)
        if attention_mask is not None:
            attention_mask = attention_mask[:, -window:]
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=None, attention_mask=attention_mask, **kwargs
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        labels=None,
        logits_to_keep=0,
        return_dict=None,
        **kwargs,
    ):
        """Logits (batch, seq, vocab); with ``labels``, the mean next-token cross-entropy
        (label -100 ignored). Cache arguments from ``generate`` are accepted and unused."""
        h = self.model(input_ids, attention_mask, position_ids)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
