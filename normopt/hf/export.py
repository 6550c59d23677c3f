"""``normopt export RUN_DIR --format hf``: a folder that ``transformers`` loads with nothing else.

The folder holds ``config.json``, the weights (``model.safetensors``, or shards of at most
``max_shard_bytes`` with ``model.safetensors.index.json``), ``generation_config.json``, the
run's tokenizer as a ``PreTrainedTokenizerFast`` (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``) and, for a model that is not a
stock Llama, ``modeling_normopt.py`` with the ``auto_map`` entries that point transformers
to it (:mod:`normopt.hf.convert`).

It is written into a hidden sibling folder, loaded back with transformers and checked by
the parity gate (:mod:`normopt.hf.parity`); only a folder that passed is renamed to its
final name. A failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from normopt.errors import UserError
from normopt.export import EXPORT_DIR_MODE, EXPORT_FILE_MODE
from normopt.hf.convert import exports_as_llama, hf_tensors, llama_config_fields, normopt_config_fields
from normopt.hf.parity import Parity, parity_gate
from normopt.hf.plugin_modules import check_exportable, norm_settings, plugin_norm, write_plugin_norm
from normopt.output_paths import check_output_folder, write_failed

TEMPLATE = Path(__file__).with_name("modeling_normopt.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
TRANSFORMERS_HINT = "pip install 'transformers>=5.25,<6' (or pip install -e '.[hf]')"


def require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError(f"--format hf needs transformers: {TRANSFORMERS_HINT}") from None


def export_hf(
    run_dir: Path,
    step: int | None = None,
    dtype: str = "float32",
    out: Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> tuple[Path, Parity]:
    """Export ``step``'s checkpoint (default: the latest complete one) of the run as a
    transformers folder, ``RUN_DIR/export/step_N_hf`` unless ``out``; return its path and
    the parity it passed the gate with."""
    from normopt.run_dir import RunDir
    from normopt.sample import load_run

    require_transformers()
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    run = RunDir(run_dir)
    checkpoint = run.find_checkpoint(step, "--step")
    out = out or run.hf_export_folder(checkpoint)
    check_new_folder(out)
    loaded = load_run(run_dir, int(checkpoint.name.split("_")[1]), doing="export")
    return write_hf_folder(
        loaded.model, loaded.tokenizer, loaded.cfg.train.seq_len, DTYPES[dtype], out, max_shard_bytes
    )


def check_new_folder(out: Path) -> None:
    check_output_folder(out, "--out")
    if os.path.lexists(out):
        raise UserError(f"--out {out}: already exists; remove it or choose another folder")


def write_hf_folder(
    model: torch.nn.Module,
    tokenizer,
    max_positions: int,
    dtype: torch.dtype,
    out: Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> tuple[Path, Parity]:
    """Write the normopt ``model`` (a ``Transformer``, eval mode) and its ``tokenizer``
    (``tokenizers.Tokenizer``) as a transformers folder at ``out``, once it passed the
    parity gate (returned with the path). In a ``bfloat16`` export the model's own parameters are rounded to bfloat16
    first, so that the gate compares the same weights."""
    from normopt.data.tokenizer import eos_id

    require_transformers()
    check_new_folder(out)
    check_exportable(model.args)
    model.eval()
    if dtype != torch.float32:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(parameter.to(dtype).float())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.incomplete.", dir=out.parent))
    except OSError as exc:  # a read-only file system, a full disk, no permission
        raise (write_failed("--out", out, exc) or exc) from None
    try:
        llama = exports_as_llama(model.args)
        eos = eos_id(tokenizer)
        write_config(model.args, max_positions, eos, dtype, llama, staging)
        write_generation_config(eos, llama, staging)
        write_tokenizer(tokenizer, max_positions, staging)
        write_weights(hf_tensors(model, dtype), staging, max_shard_bytes)
        parity = parity_gate(model, tokenizer, staging, remote_code=not llama)
        for path in staging.iterdir():
            path.chmod(EXPORT_FILE_MODE)
        staging.chmod(EXPORT_DIR_MODE)
        os.rename(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        failure = write_failed("--out", out, exc) if type(exc) is not UserError and isinstance(exc, Exception) else None
        if failure is not None:
            raise failure from None
        raise
    return out, parity


def write_config(args, max_positions: int, eos: int, dtype: torch.dtype, llama: bool, folder: Path) -> None:
    if llama:
        from transformers import LlamaConfig

        config = LlamaConfig(**llama_config_fields(args, max_positions, eos))
        config.architectures = ["LlamaForCausalLM"]
        config.rope_theta = args.rope_theta  # where transformers 4 reads it (5 reads rope_parameters)
    else:
        from normopt.hf.modeling_normopt import NormoptConfig

        config = NormoptConfig(**normopt_config_fields(args, max_positions, eos))
        config.architectures = ["NormoptForCausalLM"]
        config.auto_map = {
            "AutoConfig": "modeling_normopt.NormoptConfig",
            "AutoModelForCausalLM": "modeling_normopt.NormoptForCausalLM",
        }
        shutil.copyfile(TEMPLATE, folder / TEMPLATE.name)
        if plugin_norm(args) is not None:
            config.norm_settings = norm_settings(args)
            write_plugin_norm(args, folder, folder / TEMPLATE.name)
    config.dtype = dtype
    config.save_pretrained(folder)


def write_generation_config(eos: int, llama: bool, folder: Path) -> None:
    """End of document stops generation and pads batches; the custom model has no cache."""
    from transformers import GenerationConfig

    GenerationConfig(eos_token_id=eos, pad_token_id=eos, use_cache=llama).save_pretrained(folder)


def write_tokenizer(tokenizer, max_positions: int, folder: Path) -> None:
    """The run's tokenizer as a fast tokenizer: its end-of-document token is the EOS and pads
    batches (the attention mask hides it); no BOS is added (normopt trains on documents each
    followed by EOS, never preceded by a BOS)."""
    from transformers import PreTrainedTokenizerFast

    from normopt.data.tokenizer import eos_id

    eos_token = tokenizer.id_to_token(eos_id(tokenizer))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eos_token,
        pad_token=eos_token,
        model_max_length=max_positions,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.save_pretrained(folder)
    # transformers 5 names the class TokenizersBackend; the name it shares with transformers 4
    # (and the special tokens map 4 reads) let tools on either load the tokenizer
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": eos_token, "pad_token": eos_token}, indent=2) + "\n"
    )


def write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` each (a larger single tensor gets a shard of its own) with the
    index transformers reads."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_bytes
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": split.tensor_to_filename,
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
