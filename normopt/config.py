"""Typed run configuration: YAML file + ``dotted.key=value`` overrides -> validated dataclasses.

Every key has a type and a default here; a YAML file or a command-line override may only
set keys that exist, with values of the right type. All checks run before any work starts
and fail with :class:`~normopt.errors.UserError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from normopt.errors import UserError
from normopt.models.activation_checkpoint import MODES as ACTIVATION_CHECKPOINTING
from normopt.models.moe import BALANCE, SCORES
from normopt.models.norms import NORM_NAMES, norm_class
from normopt.parallel.ns_plan import DEFAULT_BUCKET_MB

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"

NormName = Literal[NORM_NAMES]  # the norm registry's names
OptimName = Literal["adamw", "muon", "normuon"]

# What a key changes, read from the tag on its field (``role(...)``; untagged = MATH). It
# decides where the key may differ: between a checkpoint and the run resuming it
# (normopt.checkpoint.resume_policy) and between cells of one arm (normopt.experiments.arms).
ROLE = "role"
MATH = "math"  # the training math: fixed for a run's life; cells that differ are different arms
LENGTH = "length"  # how many steps a run takes: raising it continues a finished run
EVALUATION = "evaluation"  # what the validation loss is measured on; the training is the same
EXECUTION = "execution"  # how the same math is run or recorded (device, split, logs, checkpoints)
ROLES = (MATH, LENGTH, EVALUATION, EXECUTION)


def role(name: str, default: Any) -> Any:
    """A config field with ``default`` whose key has the role ``name`` (see ROLES)."""
    return field(default=default, metadata={ROLE: name})


@dataclass
class RunConfig:
    # the run directory (config, metrics, TensorBoard, checkpoints); empty = derived from
    # the config file's name, the norm and the optimizer: runs/<config>-<norm>-<optim>
    dir: str = role(EXECUTION, "")


@dataclass
class DataConfig:
    path: str = ""  # file, folder, glob or hub dataset name; empty = built-in Shakespeare
    hub_config: str = ""  # hub dataset configuration name, if the dataset has several
    split: str = "train"
    text_column: str = "text"
    streaming: bool = False  # stream a hub dataset instead of downloading it whole
    max_tokens: int = 0  # stop reading the corpus after this many tokens (0 = all)
    tokenizer: str = ""  # a tokenizer.json; empty = train a byte-level BPE on the corpus
    vocab_size: int = 8192  # for the trained BPE
    val_fraction: float = 0.05  # tail of the token stream held out for evaluation
    # data.path synthetic:assoc (normopt/data/synthetic_assoc.py): key -> value pairs with
    # Zipf-distributed keys; the vocabulary is 2 x classes + 1 (data.vocab_size is not used)
    synthetic_classes: int = 1024
    synthetic_zipf: float = 1.0  # p(key k) proportional to (k + 1)^-zipf
    synthetic_tokens: int = 2_000_000
    synthetic_seed: int = 0  # the data's own seed: train.seed never changes the data
    cache_dir: str = role(EXECUTION, "")  # empty = $NORMOPT_CACHE or ~/.cache/normopt


@dataclass
class ModelConfig:
    preset: str = "debug"
    norm: NormName = "rmsnorm"
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
    # for normalising ones (the reference models); none; or a number (its init)
    embed_scale: float | Literal["auto", "none"] = "auto"
    derf_shift_init: float = 0.0
    # derf_ema: running input-scale estimate blended into the erf argument.
    derf_ema_momentum: float = 0.99
    derf_ema_blend: float = 0.5
    # attention: gqa (grouped-query) or mla (DeepSeek-V2 latent attention, models/mla.py);
    # None = the preset's. The MLA shape keys left unset (or 0) follow the head size.
    attention: Literal["gqa", "mla"] | None = None
    q_lora_rank: int | None = None  # query latent size; 0 = queries straight from x
    kv_lora_rank: int | None = None  # the shared key-value latent
    qk_nope_head_dim: int | None = None  # per-head query/key dims without RoPE
    qk_rope_head_dim: int | None = None  # per-head RoPE dims (one RoPE key shared by the heads)
    v_head_dim: int | None = None
    # feed-forward: dense SwiGLU or moe (routed SwiGLU experts, models/moe.py); None = the
    # preset's. Unset MoE sizes: 8 experts, hidden ffn_hidden / 2 (the dense active size).
    ffn: Literal["dense", "moe"] | None = None
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


@dataclass
class OptimConfig:
    name: OptimName = "adamw"
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
    muon_lr: float | None = None  # None = optim.lr (sensible with scale_rule match_adamw)
    muon_weight_decay: float | None = None  # None = optim.weight_decay
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    # "pattern=steps,...", first match wins; a glob, or re:regex (see optim/ns_rules.py),
    # e.g. "layers.0.*=8,re:w2=6"
    ns_steps_per_layer: str = ""
    ns_coefficients: Literal["quintic", "polar_express"] = "quintic"
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


@dataclass
class TrainConfig:
    steps: int = role(LENGTH, 300)  # optimizer steps
    global_batch_size: int = 16  # sequences per optimizer step over all ranks
    micro_batch_size: int = role(EXECUTION, 16)  # at most this many sequences per forward/backward on one rank
    seq_len: int = 256
    seed: int = 0
    eval_interval: int = role(EXECUTION, 100)  # evaluate every N steps (and at the end); 0 = only at the end
    eval_sequences: int = role(EVALUATION, 256)  # validation sequences per evaluation, over all ranks (0 = all)
    log_interval: int = role(EXECUTION, 10)
    # compute dtype (FSDP2 policy; master weights stay fp32). auto = bfloat16 on CUDA, float32
    # on CPU (many CPUs lack native bf16 matmuls and run them 50x slower than fp32)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = role(EXECUTION, "auto")
    # torch.compile each block's computation (the GPU configs turn it on; train.compile=false
    # turns it off); the compiled model is tested against eager within float tolerance
    compile: bool = role(EXECUTION, False)
    # deterministic kernels (CUDA: bit-identical resume, at some throughput; CPU kernels
    # already are): torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG, cuDNN
    deterministic: bool = role(EXECUTION, False)
    # none | block: recompute each block in backward, keeping only block inputs
    # (models/activation_checkpoint.py); the math is unchanged
    activation_checkpointing: Literal[ACTIVATION_CHECKPOINTING] = role(EXECUTION, "none")
    mfu_probe: bool = role(EXECUTION, True)  # on CPU, measure the matmul peak at start for MFU
    peak_tflops: float = role(EXECUTION, 0.0)  # peak TFLOP/s of one rank for MFU; 0 = datasheet or probe


@dataclass
class CheckpointConfig:
    interval: int = role(EXECUTION, 0)  # save every N steps (0 = only at the end)
    keep_latest_k: int = role(EXECUTION, 2)
    resume: str = role(EXECUTION, "auto")  # auto | never | a step number
    async_save: bool = role(EXECUTION, False)  # write checkpoints in the background (the final one waits)


@dataclass
class DiagnosticsConfig:
    # diagnostics observe the run and never change it
    interval: int = role(EXECUTION, 50)  # norm stats, spectral norms, NS spectrum, isotropy every N steps (0 = off)
    probe_sequences: int = role(EXECUTION, 8)  # validation windows in the fixed probe batch of the norm stats
    power_iterations: int = role(EXECUTION, 2)  # per call, warm-started from the last call's vector
    ns_spectrum: bool = role(EXECUTION, True)  # Muon/NorMuon runs: singular values of the matrices NS receives
    ns_band: str = role(EXECUTION, "")  # "lo,hi" target band of NS output singular values; empty = per coefficients
    isotropy: bool = role(EXECUTION, True)  # singular-value entropy of each block matrix's update and weight
    tail_buckets: int = role(EXECUTION, 10)  # eval loss by token-frequency bucket at every evaluation (0 = off)
    histograms: bool = role(EXECUTION, True)  # TensorBoard histograms of pre-activations and spectral norms


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def keys_with_role(*roles: str) -> frozenset[str]:
    """The dotted keys ("section.name") whose role is one of ``roles`` (untagged = MATH)."""
    return frozenset(f"{section}.{f.name}" for section, cls in typing.get_type_hints(Config).items()
                     for f in dataclasses.fields(cls) if f.metadata.get(ROLE, MATH) in roles)


# --------------------------------------------------------------------------- parsing


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` as ``annotation`` or raise a UserError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        non_none = [a for a in options if a is not type(None)]
        errors = []
        for option in non_none:  # the first type that takes the value wins
            try:
                return _coerce(key, value, option)
            except UserError as exc:
                errors.append(str(exc).split(": ", 1)[1])
        raise UserError(f"{key}: {' or '.join(errors)}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise UserError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept any float literal
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise UserError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
        raise UserError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
        raise UserError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(cfg: Config, key: str, value: Any, *, from_text: bool) -> None:
    """Set ``cfg.<section>.<name> = value`` after checking that the key and type exist."""
    parts = key.split(".")
    if len(parts) != 2:
        raise UserError(f"{key}: config keys have the form section.name (e.g. optim.lr)")
    section_name, name = parts
    section_types = _section_types(Config)
    if section_name not in section_types:
        raise UserError(
            f"{key}: unknown config section {section_name!r} "
            f"(sections: {', '.join(section_types)})"
        )
    section = getattr(cfg, section_name)
    field_types = _section_types(type(section))
    if name not in field_types:
        raise UserError(f"{key}: unknown config key")
    annotation = field_types[name]
    if from_text and not _accepts_plain_str(annotation):
        try:
            value = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise UserError(f"{key}: cannot parse value {value!r}") from None
    setattr(section, name, _coerce(key, value, annotation))


def _accepts_plain_str(annotation: Any) -> bool:
    """Strings (paths, names) take the override text verbatim: ``data.path=`` means empty."""
    return annotation is str


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (default: configs/demo.yaml), apply overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise UserError(f"{path}: cannot parse YAML ({first})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: top level must be a mapping of sections")
    cfg = Config()
    for section_name, entries in raw.items():
        if not isinstance(entries, dict):
            raise UserError(f"{section_name}: expected a mapping of keys, got {entries!r}")
        for name, value in entries.items():
            _apply(cfg, f"{section_name}.{name}", value, from_text=False)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected dotted.key=value")
        key, value = item.split("=", 1)
        _apply(cfg, key.strip(), value, from_text=True)
    if not cfg.run.dir.strip():
        cfg.run.dir = default_run_dir(path.stem, cfg)
    validate(cfg)
    return cfg


def default_run_dir(config_name: str, cfg: Config) -> str:
    """runs/<config>-<norm>-<optim>: variants of one config land in separate runs."""
    return f"runs/{config_name}-{cfg.model.norm}-{cfg.optim.name}"


def resolve_dtype(dtype_name: str, device_type: str) -> str:
    """The concrete name behind ``train.dtype`` or ``optim.ns_dtype`` on ``device_type``.

    ``auto`` means bfloat16 on CUDA and float32 on CPU, where bf16 matmuls are often
    emulated (about 50x slower than float32 on AVX2-only x86); other names pass through.
    The names map to torch dtypes in ``normopt.dtypes``.
    """
    if dtype_name == "auto":
        return "bfloat16" if device_type == "cuda" else "float32"
    return dtype_name


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. a saved config.yaml)."""
    cfg = Config()
    for section_name, entries in raw.items():
        for name, value in (entries or {}).items():
            _apply(cfg, f"{section_name}.{name}", value, from_text=False)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- validation


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    """Refuse impossible values; the model shape is checked against its preset too."""
    from normopt.models.presets import PRESETS, resolve_model_args

    d = cfg.data
    _require(d.vocab_size >= 260, "data.vocab_size", "must be at least 260 (256 bytes + specials)")
    _require(0.0 < d.val_fraction < 0.5, "data.val_fraction", "must be in (0, 0.5)")
    _require(d.max_tokens >= 0, "data.max_tokens", "must be >= 0")
    _require(2 <= d.synthetic_classes <= 1_000_000, "data.synthetic_classes", "must be in [2, 1000000]")
    _require(d.synthetic_zipf >= 0, "data.synthetic_zipf", "must be >= 0 (0 = uniform keys)")
    _require(d.synthetic_tokens >= 1000, "data.synthetic_tokens", "must be at least 1000")
    _require(d.synthetic_seed >= 0, "data.synthetic_seed", "must be >= 0")
    from normopt.data.synthetic_assoc import AssocSpec, is_synthetic

    if is_synthetic(d.path):
        AssocSpec.from_config(d)  # an unknown synthetic:NAME is refused here

    m = cfg.model
    _require(m.preset in PRESETS, "model.preset",
             f"unknown preset {m.preset!r} (presets: {', '.join(PRESETS)})")
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden"):
        value = getattr(m, name)
        _require(value is None or value > 0, f"model.{name}", "must be positive")
    _require(m.norm_eps > 0, "model.norm_eps", "must be positive")
    _require(m.init_std > 0, "model.init_std", "must be positive")
    for name in ("alpha_init_attn", "alpha_init_ffn", "alpha_init_final"):
        value = getattr(m, name)
        _require(value == "auto" or value > 0, f"model.{name}", "must be positive or auto")
    _require(not (m.norm_bias is True and not norm_class(m.norm).supports_bias), "model.norm_bias",
             f"{m.norm} has no bias (use auto or false)")
    _require(m.embed_scale in ("auto", "none") or m.embed_scale > 0, "model.embed_scale",
             "must be auto, none or a positive number")
    _require(0.0 <= m.derf_ema_momentum < 1.0, "model.derf_ema_momentum", "must be in [0, 1)")
    _require(0.0 <= m.derf_ema_blend <= 1.0, "model.derf_ema_blend", "must be in [0, 1]")
    for name in ("q_lora_rank", "n_shared_experts"):
        _require(getattr(m, name) is None or getattr(m, name) >= 0, f"model.{name}", "must be >= 0")
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_experts", "moe_top_k",
                 "moe_hidden"):
        _require(getattr(m, name) is None or getattr(m, name) > 0, f"model.{name}", "must be positive")
    for name in ("moe_aux_coef", "moe_bias_rate"):
        _require(getattr(m, name) is None or getattr(m, name) >= 0, f"model.{name}", "must be >= 0")
    args = resolve_model_args(m, vocab_size=d.vocab_size)
    if args.attention == "mla":
        _require(args.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim", f"{args.qk_rope_head_dim} must be even for RoPE")
    if args.ffn == "moe":
        _require(args.moe_top_k <= args.n_experts, "model.moe_top_k",
                 f"{args.moe_top_k} experts per token but only {args.n_experts} experts")
    _require(args.dim % args.n_heads == 0, "model.n_heads",
             f"{args.n_heads} heads do not divide dim {args.dim}")
    _require(args.head_dim % 2 == 0, "model.n_heads", f"head dim {args.head_dim} must be even for RoPE")
    _require(args.n_heads % args.n_kv_heads == 0, "model.n_kv_heads",
             f"{args.n_kv_heads} KV heads do not divide {args.n_heads} heads")

    o = cfg.optim
    _require(o.lr > 0, "optim.lr", "must be positive")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    _require(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    _require(o.eps > 0, "optim.eps", "must be positive")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(o.muon_lr is None or o.muon_lr > 0, "optim.muon_lr", "must be positive")
    _require(o.muon_weight_decay is None or o.muon_weight_decay >= 0, "optim.muon_weight_decay",
             "must be >= 0")
    _require(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)")
    _require(o.ns_steps >= 1, "optim.ns_steps", "must be at least 1")
    _require(o.ns_bucket_mb >= 0, "optim.ns_bucket_mb", "must be >= 0 (0 = one bucket)")
    _require(o.ns_batch_size == "auto" or o.ns_batch_size >= 1, "optim.ns_batch_size", "must be auto or at least 1")
    _require(o.ns_row_blocks >= 1, "optim.ns_row_blocks", "must be at least 1")
    _require(0 <= o.normuon_beta2 < 1, "optim.normuon_beta2", "must be in [0, 1)")
    _require(o.normuon_eps > 0, "optim.normuon_eps", "must be positive")
    from normopt.optim.ns_rules import NSStepRules

    try:  # under every optimizer: a bad rule is a typo worth refusing before any work
        NSStepRules.parse(o.ns_steps_per_layer)
    except ValueError as exc:
        raise UserError(f"optim.ns_steps_per_layer: {exc}") from None
    from normopt.models.matrix_roles import parse_muon_params

    parse_muon_params(o.muon_params)  # a misspelt set is refused under every optimizer
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _require(0 < o.decay_fraction <= 1, "optim.decay_fraction", "must be in (0, 1]")

    t = cfg.train
    _require(t.steps > 0, "train.steps", "must be positive")
    _require(t.global_batch_size > 0, "train.global_batch_size", "must be positive")
    _require(t.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
    _require(t.seq_len > 0, "train.seq_len", "must be positive")
    _require(0 <= t.seed < 2 ** 64, "train.seed", "must be in [0, 2^64)")
    _require(t.eval_interval >= 0, "train.eval_interval", "must be >= 0")
    _require(t.eval_sequences >= 0, "train.eval_sequences", "must be >= 0 (0 = the whole split)")
    _require(t.log_interval > 0, "train.log_interval", "must be positive")
    _require(t.peak_tflops >= 0, "train.peak_tflops", "must be >= 0 (0 = datasheet or probe)")

    d = cfg.diagnostics
    _require(d.interval >= 0, "diagnostics.interval", "must be >= 0 (0 = off)")
    _require(d.probe_sequences >= 1, "diagnostics.probe_sequences", "must be at least 1")
    _require(d.power_iterations >= 1, "diagnostics.power_iterations", "must be at least 1")
    _require(d.tail_buckets >= 0, "diagnostics.tail_buckets", "must be >= 0 (0 = off)")
    if d.ns_band:
        parts = d.ns_band.split(",")
        try:
            lo, hi = (float(x) for x in parts)
        except ValueError:
            lo = hi = float("nan")
        _require(len(parts) == 2 and 0 < lo < 1 < hi, "diagnostics.ns_band",
                 f"expected 'lo,hi' with 0 < lo < 1 < hi, got {d.ns_band!r}")
    c = cfg.checkpoint
    _require(c.interval >= 0, "checkpoint.interval", "must be >= 0 (0 = only at the end)")
    _require(c.keep_latest_k >= 1, "checkpoint.keep_latest_k", "must be at least 1")
    _require(c.resume in ("auto", "never") or c.resume.isdigit(), "checkpoint.resume",
             f"{c.resume!r} is not auto, never or a step number")


def micro_batch_plan(global_batch_size: int, micro_batch_max: int, world_size: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) for ``world_size`` ranks: each rank takes
    global / W sequences per step, in micro-batches of the largest size <= the configured
    ``train.micro_batch_size`` that divides them. Any split gives the same math, since every
    micro-batch's mean loss is weighted 1 / (W * accumulation). Only a global batch that W
    does not divide is refused, naming the rank counts that do."""
    if global_batch_size % world_size:
        fits = [n for n in range(1, global_batch_size + 1) if global_batch_size % n == 0]
        raise UserError(f"train.global_batch_size: {global_batch_size} sequences cannot be split evenly over "
                        f"{world_size} ranks (rank counts that divide it: {', '.join(map(str, fits))}; or "
                        f"choose a global batch that is a multiple of {world_size})")
    per_rank = global_batch_size // world_size
    micro = max(d for d in range(1, min(micro_batch_max, per_rank) + 1) if per_rank % d == 0)
    return micro, per_rank // micro


def check_world_size(cfg: Config, world_size: int) -> tuple[int, int]:
    """The micro-batch plan of ``cfg`` on ``world_size`` ranks (see :func:`micro_batch_plan`)."""
    t = cfg.train
    return micro_batch_plan(t.global_batch_size, t.micro_batch_size, world_size)
