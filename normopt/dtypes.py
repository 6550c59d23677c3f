"""Floating-point dtype names: the one table from a name to a ``torch.dtype``.

Config keys (``train.dtype``, ``optim.ns_dtype``) and optimizer arguments name dtypes by
string, so that configs, checkpoints and param groups hold plain text. Every such name
is turned into a torch dtype here, and nowhere else; so is what ``auto`` means
(:func:`resolve_dtype`: it depends on the device).
"""

from __future__ import annotations

import torch

# Canonical names first; the short aliases are accepted wherever a name is.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


def floating_dtype(value: torch.dtype | str, what: str = "dtype") -> torch.dtype:
    """A floating torch dtype from a dtype or a name in ``DTYPES`` (case-insensitive).

    Raises ValueError starting with ``what`` (the argument being checked) for an unknown
    name or a non-floating dtype.
    """
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str) and value.lower() in DTYPES:
        dtype = DTYPES[value.lower()]
    else:
        raise ValueError(f"{what} must be a floating torch dtype or one of {sorted(DTYPES)}, got {value!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"{what} must be a floating dtype, got {dtype}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a torch dtype: torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(dtype_name: str, device_type: str) -> str:
    """The concrete name behind ``train.dtype`` or ``optim.ns_dtype`` on ``device_type``.

    ``auto`` means bfloat16 on CUDA and float32 on CPU, where bf16 matmuls are often
    emulated (about 50x slower than float32 on AVX2-only x86); other names pass through.
    """
    if dtype_name == "auto":
        return "bfloat16" if device_type == "cuda" else "float32"
    return dtype_name
