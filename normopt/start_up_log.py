"""What a training run prints before its first step: the run, the model, memory, data,
batch, optimizer groups, the FLOP peak (and what MFU counts) and the resume point."""

from __future__ import annotations

import torch

from normopt.models.components import attention_class, feed_forward_class
from normopt.models.presets import count_active_parameters
from normopt.optim.param_groups import describe_head_blocks, format_group_table


def start_up_lines(trainer) -> list[str]:
    """The start-up log of a constructed :class:`~normopt.trainer.Trainer`, line by line."""
    out: list[str] = []
    cfg, t, a = trainer.cfg, trainer.cfg.train, trainer.model_args
    threads = f", {torch.get_num_threads()} thread(s) per rank" if trainer.dist.device.type == "cpu" else ""
    d = trainer.dist
    hsdp = f" HSDP {d.dp_replicate} replicas x {d.dp_shard} shards" if d.dp_replicate > 1 else ""
    out.append(
        f"normopt: run.dir={trainer.run}  ranks={d.world_size} ({d.device.type}{threads}){hsdp}  "
        f"dtype={trainer.dtype}  compile={t.compile}  deterministic={t.deterministic}  "
        f"activation_checkpointing={t.activation_checkpointing}"
    )
    out.append(
        f"model: preset={cfg.model.preset} norm={a.norm} dim={a.dim} layers={a.n_layers} "
        f"heads={a.n_heads}/{a.n_kv_heads} ffn={a.ffn_hidden} vocab={a.vocab_size} "
        f"tied={a.tie_embeddings}  parameters={trainer.num_params:,}"
    )
    for line in (
        attention_class(a.attention).describe(a),
        feed_forward_class(a.ffn).describe(a, trainer.num_params, count_active_parameters(a)),
    ):
        if line:
            out.append(line)
    out.append(f"memory: {trainer.memory.describe()}")
    out.append(
        f"data: {len(trainer.data.tokens):,} tokens, {trainer.batches.num_sequences:,} training "
        f"sequences of {t.seq_len}; unigram entropy {trainer.data.unigram_entropy:.3f} nats"
    )
    out.append(
        f"batch: {t.global_batch_size} sequences/step = {trainer.micro_batch} micro x "
        f"{trainer.accum_steps} accumulation x {trainer.dist.world_size} ranks "
        f"(train.micro_batch_size {t.micro_batch_size} is the largest micro-batch allowed)"
    )
    out.append("optimizer groups:\n" + format_group_table(trainer.optimizers.groups))
    split = describe_head_blocks(trainer.optimizers.groups)
    if split:
        out.append(f"per-head Newton-Schulz (optim.muon_split_heads={cfg.optim.muon_split_heads}): {split}")
    if trainer.peak_flops:
        out.append(
            f"peak: {trainer.peak_flops / 1e9:,.0f} GFLOP/s per rank ({trainer.peak_source}); mfu counts the "
            f"model's forward and backward FLOPs ({trainer.flops_per_token / 1e9:.3g} GFLOP per token)"
        )
        if trainer.ns_flops_per_step:
            model_flops = trainer.flops_per_token * t.global_batch_size * t.seq_len
            out.append(
                f"Newton-Schulz ({cfg.optim.ns_algorithm}): {trainer.ns_flops_per_step / 1e12:.3g} TFLOP "
                f"per step ({trainer.ns_flops_per_step / model_flops:.1%} of the model's), not in mfu; "
                f"mfu_with_ns counts them too; ns_s, ns_share and ns_tflops log NS time and rate"
            )
    if trainer.start_step:
        out.append(f"resumed from {trainer.resume_from} at step {trainer.start_step}")
    return out
