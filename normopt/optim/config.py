"""The ``optim`` config section: the optimizer (a registry name), its hyperparameters, the
Newton-Schulz settings of the Muon family, and the learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from normopt.errors import UserError
from normopt.key_roles import EXECUTION, require, role
from normopt.optim.ns_rules import NSStepRules, is_step_count
from normopt.optim.registry import OPTIMIZER_NAMES
from normopt.parallel.ns_plan import DEFAULT_BUCKET_MB


# no optimizer here trains above this; far larger rates overflow float32 inside the update
# (lr x Muon's scale as a kernel's scalar argument) instead of diverging cleanly (exit 3)
MAX_LR = 1e6


@lru_cache(maxsize=64)
def _ns_rules(text: str) -> NSStepRules:
    return NSStepRules.parse(text)


@dataclass
class OptimConfig:
    name: Literal[OPTIMIZER_NAMES] = "adamw"  # the optimizer registry's names (optim/registry.py)
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Norm gains/biases, DyT/Derf scalars and embeddings get no weight decay unless set.
    decay_norms_and_embeddings: bool = False
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # Muon / NorMuon (the 2-D hidden matrices; everything else stays on AdamW)
    # which block matrices Muon/NorMuon takes, the rest going to AdamW with the AdamW settings:
    # all | none | qk | vo | ffn | vo_ffn | attn (by component, models/matrix_roles.py), or
    # parameter-name globs (a YAML list, or comma-separated: "layers.*.attn.wv.weight,layers.0.*")
    muon_params: str | list[str] = "all"
    # which attention projections Muon/NorMuon orthogonalises per head instead of whole:
    # none | qk | qkv | qkvo (W_q, W_k, W_v by each head's rows, W_o by its columns; GQA's
    # k/v by key-value head; MLA: see models/matrix_roles.py), only among muon_params' matrices
    muon_split_heads: Literal["none", "qk", "qkv", "qkvo"] = "none"
    muon_lr: float | None = None  # None = optim.lr (sensible with scale_rule match_adamw)
    muon_weight_decay: float | None = None  # None = optim.weight_decay
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    # "pattern=steps,...", first match wins; a glob, or re:regex (see optim/ns_rules.py),
    # e.g. "layers.0.*=8,re:w2=6"
    ns_steps_per_layer: str = ""
    ns_coefficients: Literal["quintic", "polar_express"] = "quintic"
    # standard: the matrix iteration; gram: the same polynomial iterated on the Gram matrix
    # X X^T (float32, restarts, fewer FLOPs when a matrix is far from square; optim/
    # gram_newton_schulz.py); changes the last bits, so it is math; gram needs ns_row_blocks 1
    ns_algorithm: Literal["standard", "gram"] = "standard"
    scale_rule: Literal["original", "match_adamw", "spectral"] = "match_adamw"
    # where NS runs, not what it computes: both modes give bit-identical updates
    ns_mode: Literal["distributed", "replicated"] = role(EXECUTION, "distributed")
    # MiB of whole matrices per all_to_all bucket (0 = one bucket per step), and whether a
    # bucket's collectives overlap the NS of its neighbours; neither changes a bit
    ns_bucket_mb: float = role(EXECUTION, DEFAULT_BUCKET_MB)
    ns_overlap: bool = role(EXECUTION, True)
    # same-shape matrices stacked into one batched NS (1 = one at a time), and each matrix's
    # NS split into row blocks computed by a team of ranks (1 = one owner per matrix); both
    # are independent of the rank count but may change the last bits (other kernels);
    # ns_batch_size auto = 8 on CUDA, 1 on CPU (optim/ns_batches.py)
    ns_batch_size: int | Literal["auto"] = "auto"
    ns_row_blocks: int = 1
    # auto = bfloat16 on CUDA, float32 on CPU (see train.dtype)
    ns_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    normuon_beta2: float = 0.95
    normuon_eps: float = 1e-8
    schedule: Literal["warmup_cosine", "constant", "wsd"] = "warmup_cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # final lr / peak lr for cosine and WSD
    decay_fraction: float = 0.2  # WSD: share of steps spent in the final decay

    def ns_step_rules(self) -> NSStepRules:
        """``ns_steps_per_layer`` parsed (once per distinct string)."""
        return _ns_rules(self.ns_steps_per_layer)

    def validate(self) -> None:
        require(0 < self.lr <= MAX_LR, "optim.lr", f"must be in (0, {MAX_LR:g}]")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        require(0 <= self.beta1 < 1, "optim.beta1", "must be in [0, 1)")
        require(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)")
        require(self.eps > 0, "optim.eps", "must be positive")
        require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(self.muon_lr is None or 0 < self.muon_lr <= MAX_LR, "optim.muon_lr", f"must be in (0, {MAX_LR:g}]")
        require(self.muon_weight_decay is None or self.muon_weight_decay >= 0, "optim.muon_weight_decay",
                "must be >= 0")
        require(0 <= self.momentum < 1, "optim.momentum", "must be in [0, 1)")
        require(is_step_count(self.ns_steps), "optim.ns_steps", "must be at least 1")
        require(self.ns_bucket_mb >= 0, "optim.ns_bucket_mb", "must be >= 0 (0 = one bucket)")
        require(self.ns_batch_size == "auto" or self.ns_batch_size >= 1, "optim.ns_batch_size",
                "must be auto or at least 1")
        require(self.ns_row_blocks >= 1, "optim.ns_row_blocks", "must be at least 1")
        require(self.ns_algorithm != "gram" or self.ns_row_blocks == 1, "optim.ns_row_blocks",
                "must be 1 with optim.ns_algorithm gram (the Gram iteration's m x m products would need "
                "several all-gathers per step to split; each matrix runs on one rank)")
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
