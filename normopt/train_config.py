"""The ``run`` and ``train`` config sections: the run directory, the step budget and batch,
the precision and device, and how the same math is executed (compile, determinism,
activation checkpointing, logging)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from normopt.errors import UserError
from normopt.key_roles import EVALUATION, EXECUTION, LENGTH, MATH, require, role
from normopt.models.activation_checkpoint import MODES as ACTIVATION_CHECKPOINTING
from normopt.parallel.mesh_shape import data_parallel_shape


@dataclass
class RunConfig:
    """Where the run keeps what it writes."""

    dir: str = role(
        EXECUTION,
        "",
        "the run directory (config, metrics, TensorBoard, checkpoints); empty = "
        "runs/<config file name>-<model.norm>-<optim.name>",
    )


@dataclass
class TrainConfig:
    """The step budget and batch, the precision and device, and how the same math is executed."""

    steps: int = role(LENGTH, 300, "optimizer steps of the whole run (raising it continues a finished run)")
    # LENGTH like train.steps: it only sets train.steps (normopt/config.py, tokens_per_param_steps)
    tokens_per_param: float = role(
        LENGTH,
        0.0,
        "> 0: train.steps = ceil(parameters x this / tokens per step), "
        "the same training tokens per parameter at every model size "
        "(parameters without norm weights, at the config's vocabulary); "
        "0 = train.steps as given",
    )
    global_batch_size: int = role(MATH, 16, "sequences per optimizer step over all ranks")
    micro_batch_size: int = role(
        EXECUTION,
        16,
        "at most this many sequences per forward/backward on one rank "
        "(gradients are accumulated; the math is unchanged)",
    )
    seq_len: int = role(MATH, 256, "tokens per training sequence (and per validation window)")
    seed: int = role(
        MATH, 0, "seeds the model's initialisation and the order of the training batches (never the data itself)"
    )
    eval_interval: int = role(EXECUTION, 100, "evaluate at step 0, every N steps and at the end; 0 = only at the end")
    eval_sequences: int = role(EVALUATION, 256, "validation sequences per evaluation, over all ranks (0 = all)")
    log_interval: int = role(
        EXECUTION, 10, "append a metrics record (loss, lr, grad norm, throughput) every N steps and at the end"
    )
    # many CPUs lack native bf16 matmuls and run them 50x slower than fp32, hence auto
    dtype: Literal["auto", "float32", "bfloat16"] = role(
        MATH,
        "auto",
        "compute dtype (FSDP2 policy; master weights stay float32); auto = bfloat16 on CUDA, float32 on CPU",
    )
    device: Literal["auto", "cpu", "cuda"] = role(EXECUTION, "auto", "auto = cuda when available, else cpu")
    compile: bool = role(
        EXECUTION,
        False,
        "torch.compile each block's computation (the GPU configs turn it "
        "on); tested against eager within float tolerance",
    )
    deterministic: bool = role(
        EXECUTION,
        False,
        "deterministic kernels (CUDA: bit-identical resume at some "
        "throughput; CPU kernels already are): "
        "torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG, "
        "cuDNN",
    )
    activation_checkpointing: Literal[ACTIVATION_CHECKPOINTING] = role(
        EXECUTION,
        "none",
        "block = recompute each block in backward, keeping only block inputs "
        "(models/activation_checkpoint.py); the math is unchanged",
    )
    mfu_probe: bool = role(EXECUTION, True, "on CPU, measure the matmul peak at start for MFU")
    peak_tflops: float = role(EXECUTION, 0.0, "peak TFLOP/s of one rank for MFU; 0 = the datasheet value or the probe")
    # the data-parallel layout: normopt/parallel/mesh_shape.py
    dp_shard: int = role(
        EXECUTION,
        0,
        "ranks each parameter's rows are sharded over (FSDP); dp_shard x "
        "dp_replicate = the ranks; 0 = the rest (the default: FSDP over every "
        "rank)",
    )
    dp_replicate: int = role(EXECUTION, 1, "copies of the sharded model (HSDP when > 1); 0 = the rest of the ranks")

    def validate(self) -> None:
        require(self.steps > 0, "train.steps", "must be positive")
        require(self.tokens_per_param >= 0, "train.tokens_per_param", "must be >= 0 (0 = train.steps as given)")
        require(self.global_batch_size > 0, "train.global_batch_size", "must be positive")
        require(self.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
        require(self.seq_len > 0, "train.seq_len", "must be positive")
        require(0 <= self.seed < 2**64, "train.seed", "must be in [0, 2^64)")
        require(self.eval_interval >= 0, "train.eval_interval", "must be >= 0")
        require(self.eval_sequences >= 0, "train.eval_sequences", "must be >= 0 (0 = the whole split)")
        require(self.log_interval > 0, "train.log_interval", "must be positive")
        require(self.peak_tflops >= 0, "train.peak_tflops", "must be >= 0 (0 = datasheet or probe)")
        require(self.dp_shard >= 0, "train.dp_shard", "must be >= 0 (0 = the ranks / train.dp_replicate)")
        require(self.dp_replicate >= 0, "train.dp_replicate", "must be >= 0 (0 = the ranks / train.dp_shard)")
        require(
            self.dp_shard > 0 or self.dp_replicate > 0,
            "train.dp_replicate",
            "train.dp_shard and train.dp_replicate cannot both be 0 (the rest of the ranks)",
        )

    def mesh_shape(self, world_size: int) -> tuple[int, int]:
        """(replicate, shard) on ``world_size`` ranks (:func:`data_parallel_shape`)."""
        return data_parallel_shape(self.dp_replicate, self.dp_shard, world_size)

    def micro_batch_plan(self, world_size: int) -> tuple[int, int]:
        """(micro-batch, accumulation steps) on ``world_size`` ranks (:func:`micro_batch_plan`)."""
        return micro_batch_plan(self.global_batch_size, self.micro_batch_size, world_size)


def micro_batch_plan(global_batch_size: int, micro_batch_max: int, world_size: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) for ``world_size`` ranks: each rank takes
    global / W sequences per step, in micro-batches of the largest size <= the configured
    ``train.micro_batch_size`` that divides them. Any split gives the same math, since every
    micro-batch's mean loss is weighted 1 / (W * accumulation). Only a global batch that W
    does not divide is refused, naming the rank counts that do."""
    if global_batch_size % world_size:
        fits = [n for n in range(1, global_batch_size + 1) if global_batch_size % n == 0]
        raise UserError(
            f"train.global_batch_size: {global_batch_size} sequences cannot be split evenly over "
            f"{world_size} ranks (rank counts that divide it: {', '.join(map(str, fits))}; or "
            f"choose a global batch that is a multiple of {world_size})"
        )
    per_rank = global_batch_size // world_size
    micro = max(d for d in range(1, min(micro_batch_max, per_rank) + 1) if per_rank % d == 0)
    return micro, per_rank // micro
