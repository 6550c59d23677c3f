"""What a normopt model becomes in the Hugging Face format: which architecture, its
``config.json`` fields and its tensors under transformers' names (pure functions of the
model; the files are written by :mod:`normopt.hf.export`).

* RMSNorm + grouped-query attention + dense SwiGLU without an embedding scale is stock
  ``LlamaForCausalLM``: the same computation under other names. normopt's RoPE is the
  rotate-half form transformers' Llama uses (models/rope.py), so W_q and W_k need no
  permutation; RMSNorm's epsilon and RoPE's theta are carried.
* Everything else is ``NormoptForCausalLM`` of ``modeling_normopt.py`` (copied into the
  folder, loaded with ``trust_remote_code=True``), which keeps normopt's names inside the
  blocks. derf_ema's three running statistics become the scale c they define, computed by
  the layer's own formula and frozen (a float64 ``input_scale`` buffer per layer, which the
  model's forward rounds to float32 as normopt's does).
"""

from __future__ import annotations

import torch

from normopt.models.derf import DerfEMA, blended_scale

# derf_ema's training-time statistics, replaced by the scale they define (``input_scale``)
DERF_EMA_STATISTICS = ("running_mean_square", "reference_mean_square", "commits")

LLAMA_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}


def exports_as_llama(args) -> bool:
    """Whether the model (its ``ModelArgs``) is exactly a Llama: RMSNorm, GQA, dense SwiGLU,
    no embedding scale."""
    return args.norm == "rmsnorm" and args.attention == "gqa" and args.ffn == "dense" and args.embed_scale is None


def llama_config_fields(args, max_positions: int, eos_id: int) -> dict:
    """``LlamaConfig`` keyword arguments of the model."""
    return dict(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=args.norm_config.eps,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=args.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=args.init_std,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=None,
    )


def normopt_config_fields(args, max_positions: int, eos_id: int) -> dict:
    """``NormoptConfig`` keyword arguments of the model (modeling_normopt.py)."""
    norm = args.norm_config
    return dict(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        intermediate_size=args.ffn_hidden,
        rope_theta=args.rope_theta,
        max_position_embeddings=max_positions,
        norm=norm.name,
        norm_eps=norm.eps,
        norm_bias=norm.bias,
        embed_scale=args.embed_scale is not None,
        attention=args.attention,
        attention_window=args.attention_window if args.attention == "swa" else 0,
        q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim,
        ffn=args.ffn,
        n_experts=args.n_experts,
        moe_top_k=args.moe_top_k,
        moe_hidden=args.moe_hidden,
        n_shared_experts=args.n_shared_experts,
        moe_score=args.moe_score,
        moe_routing_bias=args.ffn == "moe" and args.moe_balance == "aux_free",
        tie_word_embeddings=args.tie_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=None,
    )


def _top_level_name(name: str) -> str:
    """normopt's name outside the blocks -> the causal LM's (``model.`` holds the decoder)."""
    if name == "output.weight":
        return "lm_head.weight"
    if name == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    return f"model.{name}"


def llama_name(name: str) -> str:
    """A normopt tensor name -> its ``LlamaForCausalLM`` name."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"model.layers.{index}.{LLAMA_LAYER_NAMES[rest]}"
    return _top_level_name(name)


def hf_tensors(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' names: parameters in ``dtype``, buffers in
    float32 (the routing bias) or float64 (derf_ema's frozen scales). A tied output head is left out
    (``tie_word_embeddings`` restores it). Every tensor owns its storage (safetensors)."""
    llama = exports_as_llama(model.args)
    parameters = dict(model.named_parameters())  # a tied head appears once, as the embedding
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[-1] in DERF_EMA_STATISTICS or (name == "output.weight" and model.args.tie_embeddings):
            continue
        hf_name = llama_name(name) if llama else _top_level_name(name)
        out[hf_name] = tensor.detach().to(dtype if name in parameters else torch.float32).contiguous().clone()
    for name, module in model.named_modules():
        if isinstance(module, DerfEMA):
            scale = (
                blended_scale(
                    module.running_mean_square,
                    module.reference_mean_square,
                    module.commits,
                    module.momentum,
                    module.blend,
                )
                .detach()
                .reshape(1)
                .clone()
            )
            out[_top_level_name(f"{name}.input_scale")] = scale
    return out
