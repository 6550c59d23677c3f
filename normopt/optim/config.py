"""The ``optim`` config section: the optimizer (a registry name), its hyperparameters, the
Newton-Schulz settings of the Muon family, and the learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from normopt.errors import UserError
from normopt.key_roles import EXECUTION, MATH, require, role
from normopt.optim.ns_rules import NSStepRules, is_step_count
from normopt.optim.registry import OPTIMIZERS
from normopt.parallel.ns_plan import DEFAULT_BUCKET_MB
from normopt.registry import check_registered

# no optimizer here trains above this; far larger rates overflow float32 inside the update
# (lr x Muon's scale as a kernel's scalar argument) instead of diverging cleanly (exit 3)
MAX_LR = 1e6


@lru_cache(maxsize=64)
def _ns_rules(text: str) -> NSStepRules:
    return NSStepRules.parse(text)


@dataclass
class OptimConfig:
    """The optimizer, its hyperparameters, the Muon family's Newton-Schulz settings and the schedule."""

    name: str = role(
        MATH,
        "adamw",
        "the optimizer: adamw, muon, normuon, lion (the registry, optim/registry.py) or a plugin's; "
        "muon and normuon take the block matrices, AdamW the rest",
    )
    lr: float = role(
        MATH,
        3e-3,
        "peak learning rate of AdamW (and Lion), and of the AdamW parameters under "
        "Muon/NorMuon; logged as lr (times the schedule)",
    )
    weight_decay: float = role(
        MATH, 0.1, "decoupled weight decay (norms and embeddings: see decay_norms_and_embeddings)"
    )
    beta1: float = role(MATH, 0.9, "AdamW's first-moment decay; Lion's interpolation beta")
    beta2: float = role(MATH, 0.95, "AdamW's second-moment decay; Lion's momentum beta")
    eps: float = role(MATH, 1e-8, "AdamW's epsilon added to the root of the second moment")
    decay_norms_and_embeddings: bool = role(
        MATH,
        False,
        "also decay norm gains/biases, DyT/Derf scalars and embeddings (which get no weight decay otherwise)",
    )
    grad_clip: float = role(MATH, 1.0, "max global grad norm; 0 disables clipping")
    # Muon / NorMuon (the 2-D hidden matrices; everything else stays on AdamW)
    muon_params: str | list[str] = role(
        MATH,
        "all",
        "which block matrices Muon/NorMuon takes (the rest: AdamW): all, none, qk, vo, ffn, vo_ffn, "
        "attn (models/matrix_roles.py), or parameter-name globs (a YAML list, or comma-separated)",
    )
    muon_split_heads: Literal["none", "qk", "qkv", "qkvo"] = role(
        MATH,
        "none",
        "attention projections Muon/NorMuon orthogonalises per head instead of whole (W_q, W_k, "
        "W_v by each head's rows, W_o by its columns; GQA's k/v by key-value head; MLA: "
        "models/matrix_roles.py), among muon_params' matrices",
    )
    muon_lr: float | None = role(
        MATH,
        None,
        "peak learning rate of the Muon/NorMuon matrices; null = optim.lr "
        "(sensible with scale_rule match_adamw); logged as lr_matrix",
    )
    muon_weight_decay: float | None = role(
        MATH, None, "weight decay of the Muon/NorMuon matrices; null = optim.weight_decay"
    )
    momentum: float = role(MATH, 0.95, "Muon/NorMuon momentum")
    nesterov: bool = role(MATH, True, "Muon/NorMuon: orthogonalise the Nesterov direction instead of the momentum")
    ns_steps: int = role(MATH, 5, "Newton-Schulz iterations per matrix (unless ns_steps_per_layer names it)")
    ns_steps_per_layer: str = role(
        MATH,
        "",
        'per-matrix NS steps: "pattern=steps,...", first match wins; a '
        'glob or re:regex (optim/ns_rules.py), e.g. "layers.0.*=8,re:w2=6"',
    )
    ns_coefficients: Literal["quintic", "polar_express"] = role(
        MATH,
        "quintic",
        "NS polynomial: the fixed quintic of Muon, or Polar Express's per-step minimax "
        "quintics (optim/newton_schulz.py)",
    )
    # gram restarts and works in float32: it changes the last bits, so it is math
    ns_algorithm: Literal["standard", "gram"] = role(
        MATH,
        "standard",
        "standard: the matrix iteration; gram: the same polynomial on the Gram matrix X X^T "
        "(float32, fewer FLOPs far from square; optim/gram_newton_schulz.py; needs "
        "ns_row_blocks 1)",
    )
    scale_rule: Literal["original", "match_adamw", "spectral"] = role(
        MATH,
        "match_adamw",
        "update scale of a rows x cols matrix: original sqrt(max(1, rows/cols)), "
        "match_adamw 0.2 sqrt(max(rows, cols)), spectral sqrt(rows/cols)",
    )
    # ns_mode, ns_bucket_mb and ns_overlap say where and when NS runs, never what it computes
    ns_mode: Literal["distributed", "replicated"] = role(
        EXECUTION,
        "distributed",
        "distributed: each matrix's NS on one owner rank; replicated: on every rank; bit-identical updates",
    )
    ns_bucket_mb: float = role(
        EXECUTION,
        DEFAULT_BUCKET_MB,
        "MiB of whole matrices per all_to_all bucket of distributed NS (0 = one bucket per step)",
    )
    ns_overlap: bool = role(EXECUTION, True, "overlap a bucket's collectives with the NS of its neighbours")
    # both below are independent of the rank count but may change the last bits (other kernels)
    ns_batch_size: int | Literal["auto"] = role(
        MATH,
        "auto",
        "same-shape matrices stacked into one batched NS (1 = one at a time); auto = 8 on CUDA, "
        "1 on CPU (optim/ns_batches.py)",
    )
    ns_row_blocks: int = role(
        MATH, 1, "each matrix's NS split into row blocks computed by a team of ranks (1 = one owner per matrix)"
    )
    ns_dtype: Literal["auto", "float32", "bfloat16"] = role(
        MATH, "auto", "NS compute dtype; auto = bfloat16 on CUDA, float32 on CPU (see train.dtype)"
    )
    normuon_beta2: float = role(MATH, 0.95, "NorMuon: decay of the per-row second moment of the NS output")
    normuon_eps: float = role(MATH, 1e-8, "NorMuon: added to the root of the per-row second moment")
    schedule: Literal["warmup_cosine", "constant", "wsd"] = role(
        MATH,
        "warmup_cosine",
        "lr factor over the steps after linear warmup: cosine to min_lr_ratio, constant, "
        "or warmup-stable-decay (linear decay over decay_fraction)",
    )
    warmup_steps: int = role(MATH, 20, "linear warmup steps (factor (step + 1) / warmup_steps)")
    min_lr_ratio: float = role(MATH, 0.1, "final lr / peak lr for cosine and WSD")
    decay_fraction: float = role(MATH, 0.2, "WSD: share of steps spent in the final decay")

    def ns_step_rules(self) -> NSStepRules:
        """``ns_steps_per_layer`` parsed (once per distinct string)."""
        return _ns_rules(self.ns_steps_per_layer)

    def validate(self) -> None:
        check_registered(OPTIMIZERS, "optim.name", self.name)
        require(0 < self.lr <= MAX_LR, "optim.lr", f"must be in (0, {MAX_LR:g}]")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        require(0 <= self.beta1 < 1, "optim.beta1", "must be in [0, 1)")
        require(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)")
        require(self.eps > 0, "optim.eps", "must be positive")
        require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(self.muon_lr is None or 0 < self.muon_lr <= MAX_LR, "optim.muon_lr", f"must be in (0, {MAX_LR:g}]")
        require(
            self.muon_weight_decay is None or self.muon_weight_decay >= 0, "optim.muon_weight_decay", "must be >= 0"
        )
        require(0 <= self.momentum < 1, "optim.momentum", "must be in [0, 1)")
        require(is_step_count(self.ns_steps), "optim.ns_steps", "must be at least 1")
        require(self.ns_bucket_mb >= 0, "optim.ns_bucket_mb", "must be >= 0 (0 = one bucket)")
        require(
            self.ns_batch_size == "auto" or self.ns_batch_size >= 1, "optim.ns_batch_size", "must be auto or at least 1"
        )
        require(self.ns_row_blocks >= 1, "optim.ns_row_blocks", "must be at least 1")
        require(
            self.ns_algorithm != "gram" or self.ns_row_blocks == 1,
            "optim.ns_row_blocks",
            "must be 1 with optim.ns_algorithm gram (the Gram iteration's m x m products would need "
            "several all-gathers per step to split; each matrix runs on one rank)",
        )
        require(0 <= self.normuon_beta2 < 1, "optim.normuon_beta2", "must be in [0, 1)")
        require(self.normuon_eps > 0, "optim.normuon_eps", "must be positive")
        try:  # under every optimizer: a bad rule is a typo worth refusing before any work
            self.ns_step_rules()
        except ValueError as exc:
            raise UserError(f"optim.ns_steps_per_layer: {exc}") from None
        from normopt.models.matrix_roles import parse_muon_params

        parse_muon_params(self.muon_params)  # a misspelt set is refused under every optimizer
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        require(0 < self.decay_fraction <= 1, "optim.decay_fraction", "must be in (0, 1]")
