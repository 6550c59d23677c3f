"""Reading DCP checkpoints without running code from them.

A checkpoint is data that people pass around, so loading one must never execute anything
it contains. torch.distributed.checkpoint has two paths that can: ``.metadata`` is read with
``pickle.load``, and non-tensor ("byte") entries are read with ``torch.load(weights_only=
False)``. normopt closes both:

* :class:`SafeReader` reads ``.metadata`` with :class:`MetadataUnpickler`, which resolves only
  the classes DCP's metadata is made of (and torch dtypes, sizes, layouts, paths); anything
  else, such as a callable smuggled in with ``__reduce__``, is refused before it is called;
* :class:`TensorOnlyPlanner` refuses a checkpoint whose metadata declares any byte entry, so
  ``torch.load(weights_only=False)`` is never reached. normopt writes none: the non-tensor
  parts of its state (optimizer hyperparameters) go to a JSON file beside the shards
  (:func:`split_tensors` / :func:`merge_tensors`), and tensor shards themselves are read by
  DCP with ``weights_only=True``.

Every refusal is a :class:`~normopt.errors.UserError` naming the file (exit status 2).
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from normopt.errors import UserError
from normopt.run_dir import NON_TENSOR_STATE

NON_TENSOR_FILE = NON_TENSOR_STATE

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict"},
}


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only checkpoint-metadata types (and torch dtypes)."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UserError(
            f"{self.source}: refusing to load {module}.{name} (checkpoint metadata may "
            f"only hold DCP metadata types; this file may be crafted)"
        )


class SafeReader(FileSystemReader):
    """A FileSystemReader whose metadata goes through :class:`MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as stream:
                metadata = MetadataUnpickler(stream, str(path)).load()
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{path}: cannot read checkpoint metadata ({type(exc).__name__})") from None
        if not isinstance(metadata, Metadata):
            raise UserError(f"{path}: not DCP checkpoint metadata")
        return metadata


class TensorOnlyPlanner(DefaultLoadPlanner):
    """Loads tensors only: a checkpoint that declares any byte (pickled) entry is refused."""

    def __init__(self, source: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.source = source

    def set_up_planner(self, state_dict, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        if metadata is not None:
            refuse_pickled_entries(metadata, self.source)
        super().set_up_planner(state_dict, metadata, is_coordinator)

    def load_bytes(self, read_item, value) -> None:  # never reached after set_up_planner's check
        raise UserError(f"{self.source}: refusing to unpickle checkpoint entry {read_item.dest_index.fqn}")


def refuse_pickled_entries(metadata: Metadata, source: str) -> None:
    pickled = sorted(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    if pickled:
        raise UserError(
            f"{source}: refusing a checkpoint with pickled entries ({pickled[0]}"
            f"{' and more' if len(pickled) > 1 else ''}); normopt writes tensors only"
        )


def read_metadata(checkpoint: Path) -> Metadata:
    """The checkpoint's metadata, read safely and checked for byte entries before DCP sees
    it (DCP would log its own tracebacks around a refusal)."""
    metadata = SafeReader(str(checkpoint)).read_metadata()
    refuse_pickled_entries(metadata, str(checkpoint))
    return metadata


# --------------------------------------------------------------------------- non-tensor state


def _encode(value: Any) -> Any:
    """JSON form of a non-tensor value; tuples are tagged so they come back as tuples."""
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON state")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        if set(value) == {"__dict__"}:
            return {_decode(k): _decode(v) for k, v in value["__dict__"]}
    return value


_NOTHING = object()  # a subtree with no leaves left


def split_tensors(tree: Any, path: tuple = ()) -> tuple[Any, dict[str, Any]]:
    """(the tree with only its tensor leaves, {json path: non-tensor leaf}). A dict or list
    node is walked; a tensor leaf stays; any other leaf moves to the JSON side, keyed by the
    JSON list of its path."""
    if isinstance(tree, torch.Tensor):
        return tree, {}
    if isinstance(tree, dict):
        kept, moved = {}, {}
        for key, value in tree.items():
            sub, sub_moved = split_tensors(value, path + (key,))
            moved.update(sub_moved)
            if sub is not _NOTHING:
                kept[key] = sub
        return kept, moved
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        kept, moved = {}, {}
        for index, value in enumerate(tree):  # a list of dicts (param_groups) becomes a dict
            sub, sub_moved = split_tensors(value, path + (index,))
            moved.update(sub_moved)
            kept[str(index)] = sub
        return {"__list__": kept} if kept else _NOTHING, moved
    return _NOTHING, {json.dumps(_encode(path)): _encode(tree)}


def merge_tensors(tree: Any, moved: dict[str, Any]) -> Any:
    """Undo :func:`split_tensors`: put the non-tensor leaves back into ``tree``."""

    def restore_lists(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"__list__"}:
                items = node["__list__"]
                return [restore_lists(items[str(i)]) for i in range(len(items))]
            return {k: restore_lists(v) for k, v in node.items()}
        return node

    tree = restore_lists(tree)
    for key, value in moved.items():
        path = _decode(json.loads(key))
        node = tree
        for part in path[:-1]:
            if isinstance(node, list):
                while len(node) <= part:
                    node.append({})
            elif part not in node:
                node[part] = {}
            node = node[part]
        if isinstance(node, list):
            while len(node) <= path[-1]:
                node.append({})
        node[path[-1]] = _decode(value)
    return tree


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return {str: "a string", type(None): "null", dict: "an object"}.get(type(value), type(value).__name__)


def _same_shape(saved: Any, expected: Any) -> bool:
    if _json_kind(saved) != _json_kind(expected):
        return False
    if isinstance(saved, float) and not math.isfinite(saved):
        return False
    if isinstance(saved, list):
        return all(_same_shape(a, b) for a, b in zip(saved, expected))
    if isinstance(saved, dict):
        return saved.keys() == expected.keys() and all(_same_shape(saved[k], expected[k]) for k in saved)
    return True


def check_non_tensor_state(path: Path, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a non-tensor state that is not the one this model's optimizers would write:
    the same entries (so every list index it names exists), each of the same JSON kind, and
    no non-finite number. Values may differ (the lr follows its schedule)."""
    missing, extra = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing or extra:
        which = f"lacks {missing[0]}" if missing else f"has an unknown entry {extra[0]}"
        raise UserError(f"{path / NON_TENSOR_FILE}: {which} (not this run's optimizer state)")
    for key in sorted(saved):
        if not _same_shape(saved[key], expected[key]):
            raise UserError(
                f"{path / NON_TENSOR_FILE}: {key} is {_json_kind(saved[key])} "
                f"({saved[key]!r:.60}), expected {_json_kind(expected[key])}"
            )


def write_non_tensor_state(folder: Path, moved: dict[str, Any]) -> None:
    (folder / NON_TENSOR_FILE).write_text(json.dumps(moved, indent=1, sort_keys=True))


def read_non_tensor_state(folder: Path) -> dict[str, Any]:
    path = folder / NON_TENSOR_FILE
    if not path.is_file():
        raise UserError(
            f"checkpoint {folder} has no {NON_TENSOR_FILE} (written by an older normopt "
            f"whose checkpoints hold pickled entries; start a new run.dir)"
        )
    try:
        moved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(moved, dict):
        raise UserError(f"{path}: expected a JSON object")
    return moved
