"""A plugin's norm in a transformers export: its module travels with the modeling file.

``normopt export --format hf`` of a model whose norm a plugin registered copies the
plugin's module beside ``modeling_normopt.py`` and appends one import to the modeling file
(transformers copies relative imports of remote code with it), so the exported model runs
the plugin's own layer class with the checkpoint's weights; the parity gate then checks it
as for the built-ins. That needs the module to import torch and the standard library alone
(a plugin registers such a layer from ``normopt_plugin(normopt)``, see normopt/extend.py);
anything else, and a plugin attention or feed-forward (whose forward takes normopt's RoPE
tables, not transformers' masks), is refused in one line.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import shutil
import sys
from pathlib import Path

from normopt.errors import UserError
from normopt.models.components import ATTENTIONS, FEED_FORWARDS
from normopt.models.norm_layer import NormLayer
from normopt.models.norms import NORMS
from normopt.registry import BUILT_IN

# what a module carried into an export may import besides torch
STANDARD_LIBRARY = frozenset(
    ("__future__", "abc", "collections", "dataclasses", "enum", "functools", "itertools", "math", "numbers")
    + ("operator", "typing")
)
HOW = "docs/extending.md#exporting-a-plugin-norm"


def plugin_norm(args) -> type | None:
    """The layer class of the model's norm when a plugin registered it (None for a built-in);
    a plugin attention or feed-forward is refused here."""
    for registry, name in ((ATTENTIONS, args.attention), (FEED_FORWARDS, args.ffn)):
        if registry.owner(name) != BUILT_IN:
            raise UserError(
                f"plugin {registry.kind} {name} ({registry.owner(name)}): --format hf exports built-in "
                f"attentions and feed-forwards and plugin norms only (a plugin {registry.kind}'s forward "
                f"takes normopt's RoPE tables and causal mask, not transformers'); --format safetensors "
                f"exports any run"
            )
    name = args.norm_config.name
    return None if NORMS.owner(name) == BUILT_IN else NORMS[name]


def layer_class(cls: type) -> type:
    """The plugin's own class behind a registered norm (``normopt.extend.norm_layer`` mixes
    NormLayer into a torch-only class; that class is what the export runs)."""
    bases = cls.__bases__
    if len(bases) == 2 and bases[1] is NormLayer and not issubclass(bases[0], NormLayer):
        return bases[0]
    return cls


def foreign_import(source: str) -> str | None:
    """The first import of ``source`` outside torch and :data:`STANDARD_LIBRARY` (a relative
    import counts), or None."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            return "." * node.level + (node.module or "")
        names = (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        for name in names:
            root = name.split(".")[0]
            if root != "torch" and root not in STANDARD_LIBRARY:
                return name
    return None


def plugin_module_file(cls: type, registered: str) -> Path:
    """The file of the module defining ``cls``, checked to import torch and the standard
    library alone."""
    module = sys.modules.get(cls.__module__)
    path = Path(inspect.getsourcefile(module)) if module is not None else None
    if path is None or not path.is_file():
        raise UserError(f"plugin norm {registered}: the source file of {cls.__name__} cannot be found to export it")
    found = foreign_import(path.read_text())
    if found is not None:
        raise UserError(
            f"plugin norm {registered}: {path} imports {found}; --format hf carries a plugin norm as its "
            f"module, which must import torch and the standard library alone (register the layer from "
            f"normopt_plugin(normopt): {HOW})"
        )
    return path


def check_exportable(args) -> None:
    """Refuse, before anything is written, a model with a plugin component the export cannot carry."""
    cls = plugin_norm(args)
    if cls is not None:
        plugin_module_file(layer_class(cls), args.norm_config.name)


def norm_settings(args) -> dict:
    """The norm's resolved settings for the exported config (``norm_settings``): what the
    plugin layer's ``from_config`` reads."""
    settings = dataclasses.asdict(args.norm_config)
    settings["options"] = [list(pair) for pair in args.norm_config.options]
    return settings


def write_plugin_norm(args, folder: Path, modeling_file: Path) -> None:
    """Copy the plugin norm's module into ``folder`` and import its layer class from the
    modeling file (a no-op for a built-in norm)."""
    cls = plugin_norm(args)
    if cls is None:
        return
    layer = layer_class(cls)
    path = plugin_module_file(layer, args.norm_config.name)
    module = f"normopt_plugin_{path.stem}"
    shutil.copyfile(path, folder / f"{module}.py")
    alias = f"_plugin_norm_{args.norm_config.name}"
    with open(modeling_file, "a", encoding="utf-8") as f:
        f.write(
            f"\n\n# the run's plugin norm, written by normopt export\n"
            f"from .{module} import {layer.__name__} as {alias}  # noqa: E402\n\n"
            f"PLUGIN_NORMS[{args.norm_config.name!r}] = {alias}\n"
        )
