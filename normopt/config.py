"""The run configuration: YAML file + ``dotted.key=value`` overrides -> validated dataclasses.

Each component owns its section (a small dataclass with its checks beside it):
``run`` and ``train`` (normopt/train_config.py), ``data`` (normopt/data/config.py), ``model``
(normopt/models/config.py), ``optim`` (normopt/optim/config.py), ``checkpoint``
(normopt/checkpoint/config.py) and ``diagnostics`` (normopt/diagnostics/config.py); what a key
changes is its role tag and what it means is its one-line help, both declared beside the
field (normopt/key_roles.py; ``normopt config --reference`` prints them, see
normopt/config_reference.py). This module only composes the sections, parses files and
overrides (a key must exist and take a value of its type) and runs every section's checks
before any work starts, each failing with a UserError naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from normopt.checkpoint.config import CheckpointConfig
from normopt.data.config import DataConfig
from normopt.diagnostics.config import DiagnosticsConfig
from normopt.errors import UserError
from normopt.key_roles import role_of
from normopt.models.config import ModelConfig
from normopt.optim.config import OptimConfig
from normopt.registry import generation, section_class
from normopt.train_config import RunConfig, TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def _section(base: type, name: str):
    """A default ``name`` section: ``base`` with the keys its registered components declared
    (a plugin's optimizer adds optim.<name>_<key>; normopt/registry.py)."""
    return field(default_factory=lambda: section_class(base, name)())


@dataclass
class Config:
    run: RunConfig = _section(RunConfig, "run")
    data: DataConfig = _section(DataConfig, "data")
    model: ModelConfig = _section(ModelConfig, "model")
    optim: OptimConfig = _section(OptimConfig, "optim")
    train: TrainConfig = _section(TrainConfig, "train")
    checkpoint: CheckpointConfig = _section(CheckpointConfig, "checkpoint")
    diagnostics: DiagnosticsConfig = _section(DiagnosticsConfig, "diagnostics")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Every section's checks; the model's shape is resolved against the vocabulary."""
        self.data.validate()
        self.model.validate(vocab_size=self.data.vocab_size)
        self.optim.validate()
        self.train.validate()
        self.diagnostics.validate()
        self.checkpoint.validate()


def section_classes() -> dict[str, type]:
    """Section name -> its dataclass as now extended by the registered components' keys, in
    the order of :class:`Config`."""
    cfg = Config()
    return {f.name: type(getattr(cfg, f.name)) for f in dataclasses.fields(Config)}


def keys_with_role(*roles: str) -> frozenset[str]:
    """The dotted keys ("section.name") whose role is one of ``roles`` (untagged = MATH),
    the keys loaded plugins' components declared included."""
    return _keys_with_role(roles, generation())


@functools.lru_cache(maxsize=64)
def _keys_with_role(roles: tuple[str, ...], _generation: int) -> frozenset[str]:
    return frozenset(
        f"{section}.{f.name}"
        for section, cls in section_classes().items()
        for f in dataclasses.fields(cls)
        if role_of(f) in roles
    )


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
            if abs(value) > 2**64:  # beyond any integer torch or numpy holds (sections check their ranges)
                raise UserError(f"{key}: {value} is out of the 64-bit integer range")
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
            try:
                number = float(value)
            except OverflowError:  # an int beyond any float
                number = math.inf
            if not math.isfinite(number):
                raise UserError(f"{key}: expected a finite number, got {value!r}")
            # training math runs in float32 at best: a value it cannot hold would become inf
            # (an lr of 1e39) or 0 (an eps of 1e-300, then a division by zero)
            if abs(number) > FLOAT32_MAX or 0 < abs(number) < FLOAT32_TINY:
                raise UserError(
                    f"{key}: {value!r} cannot be represented in float32 "
                    f"(magnitudes {FLOAT32_TINY:.3g} to {FLOAT32_MAX:.3g}, or 0)"
                )
            return number
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
        raise UserError(f"{key}: unknown config section {section_name!r} (sections: {', '.join(section_types)})")
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
    return resolve_config(path, overrides)[0]


PLUGINS_KEY = "plugins"  # top level of a config file: plugins to load (normopt/plugins.py), not a section


def load_config_plugins(entries: Any, path: Path) -> None:
    """Load the plugins a config file names under ``plugins:`` (paths relative to the file)."""
    if entries is None:
        return
    if not isinstance(entries, list) or not all(isinstance(e, str) and e.strip() for e in entries):
        raise UserError(f"{path}: plugins must be a list of plugin files or module names, got {entries!r}")
    from normopt.plugins import load_plugins

    load_plugins(entries, base=path.resolve().parent)


# where a resolved key's value came from (``normopt config --show``)
DEFAULT, FILE, OVERRIDE, DERIVED = "default", "file", "override", "derived"


def resolve_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[Config, dict[str, str]]:
    """:func:`load_config`, with the origin of every key's value ("section.key" -> default,
    file, override, or derived for an empty ``run.dir`` and for ``train.steps`` under
    ``train.tokens_per_param``): defaults < the YAML file < the ``section.key=value``
    overrides, in their order. ``train.tokens_per_param`` > 0 sets train.steps
    (:func:`tokens_per_param_steps`) over a train.steps given on a lower layer (the file under
    an override of the ratio); one given on the ratio's layer or above must agree with it."""
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
    load_config_plugins(raw.pop(PLUGINS_KEY, None), path)
    cfg = Config()
    origins = dict.fromkeys(flat_config(cfg.to_dict()), DEFAULT)
    for section_name, entries in raw.items():
        if not isinstance(entries, dict):
            raise UserError(f"{section_name}: expected a mapping of keys, got {entries!r}")
        for name, value in entries.items():
            _apply(cfg, f"{section_name}.{name}", value, from_text=False)
            origins[f"{section_name}.{name}"] = FILE
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected dotted.key=value")
        key, value = item.split("=", 1)
        _apply(cfg, key.strip(), value, from_text=True)
        origins[key.strip()] = OVERRIDE
    if not cfg.run.dir.strip():
        cfg.run.dir = default_run_dir(path.stem, cfg)
        origins["run.dir"] = DERIVED
    validate(cfg)
    _derive_steps(cfg, origins)
    return cfg, origins


# where a value was given, lowest first: train.steps given at or above train.tokens_per_param's
# layer must agree with it; given only below (a base file the overrides specialise), it is replaced
_LAYERS = {DEFAULT: 0, FILE: 1, OVERRIDE: 2}


def config_vocab_size(cfg: Config) -> int:
    """The vocabulary the config asks for: ``data.vocab_size`` (the trained BPE's size; a
    ``data.tokenizer`` brings its own, which may differ), or the synthetic task's 2 x classes + 1."""
    from normopt.data.synthetic_assoc import AssocSpec, is_synthetic

    return AssocSpec.from_config(cfg.data).vocab_size if is_synthetic(cfg.data.path) else cfg.data.vocab_size


def size_parameters(cfg: Config) -> int:
    """The parameters ``train.tokens_per_param`` counts: the model's without its norm weights
    and embedding scale (``count_parameters_without_norms``, the same for every norm of one
    shape), at :func:`config_vocab_size`."""
    from normopt.models.presets import count_parameters_without_norms, resolve_model_args

    return count_parameters_without_norms(resolve_model_args(cfg.model, vocab_size=config_vocab_size(cfg)))


def tokens_per_param_steps(cfg: Config) -> int:
    """train.steps for ``train.tokens_per_param`` = r: ceil(N r / (global batch x seq_len)), N =
    :func:`size_parameters`; the run then sees at least r tokens per parameter (at most one
    step's tokens more)."""
    t = cfg.train
    return max(1, math.ceil(round(size_parameters(cfg) * t.tokens_per_param / (t.global_batch_size * t.seq_len), 9)))


def _derive_steps(cfg: Config, origins: dict[str, str]) -> None:
    """With ``train.tokens_per_param`` > 0, train.steps becomes :func:`tokens_per_param_steps`;
    a train.steps given where the ratio is given or later (file, then overrides) that
    disagrees with it is refused."""
    if cfg.train.tokens_per_param <= 0:
        return
    steps = tokens_per_param_steps(cfg)
    if cfg.train.steps != steps and _LAYERS[origins["train.steps"]] >= _LAYERS[origins["train.tokens_per_param"]]:
        t = cfg.train
        raise UserError(
            f"train.steps: {t.steps} disagrees with train.tokens_per_param={t.tokens_per_param:g}, "
            f"which gives {steps} steps ({size_parameters(cfg):,} parameters x "
            f"{t.tokens_per_param:g} / {t.global_batch_size * t.seq_len:,} tokens per step): "
            f"give one of them (train.tokens_per_param=0 keeps train.steps)"
        )
    cfg.train.steps = steps
    origins["train.steps"] = DERIVED


def default_run_dir(config_name: str, cfg: Config) -> str:
    """runs/<config>-<norm>-<optim>: variants of one config land in separate runs."""
    return f"runs/{config_name}-{cfg.model.norm}-{cfg.optim.name}"


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. a saved config.yaml)."""
    cfg = Config()
    for section_name, entries in raw.items():
        if entries is not None and not isinstance(entries, dict):
            raise UserError(f"{section_name}: expected a mapping of keys, got {entries!r}")
        for name, value in (entries or {}).items():
            _apply(cfg, f"{section_name}.{name}", value, from_text=False)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def read_saved_config(path: Path) -> Config:
    """A run's or a checkpoint's saved ``config.yaml`` as a validated Config (the one way
    saved configs are read back); a UserError names the file when it cannot be."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
        if not isinstance(raw, dict):
            raise UserError("top level must be a mapping of sections")
        return config_from_dict(raw)
    except UserError as exc:
        raise UserError(f"{path}: cannot read the saved config ({exc})") from None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the saved config ({type(exc).__name__})") from None


def flat_config(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"section.key": value} from a nested config dict (:meth:`Config.to_dict` output)."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        out.update(flat_config(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def nested_config(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flat_config`: {"section": {"key": value}} (a key without a
    section is left out)."""
    out: dict[str, dict[str, Any]] = {}
    for dotted, value in flat.items():
        section, _, key = dotted.partition(".")
        if key:
            out.setdefault(section, {})[key] = value
    return out


# --------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Refuse impossible values (every section's checks)."""
    cfg.validate()


def check_world_size(cfg: Config, world_size: int) -> tuple[int, int]:
    """The micro-batch plan of ``cfg`` on ``world_size`` ranks (see ``train_config.micro_batch_plan``),
    after checking that the data-parallel layout (``train.dp_replicate`` x ``train.dp_shard``)
    fits them."""
    cfg.train.mesh_shape(world_size)
    return cfg.train.micro_batch_plan(world_size)
