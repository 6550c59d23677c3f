"""What each block matrix of the model is: its type, its component and its depth group.

One place names the model's matrices for everything that treats them by role: which
optimizer takes them (``optim.muon_params``, :mod:`normopt.optim.param_groups`), the
diagnostics that aggregate per type and depth (isotropy, the NS spectrum fit) and the
spectrum report.

* type: the dotted path inside its block without ``.weight`` or an expert index
  (``layers.3.attn.wq.weight`` -> ``attn.wq``); one type holds matrices of one shape;
* component: what the type does in the block, the unit component ablations work with:
  ``q``, ``k``, ``v``, ``o`` (attention), ``kv`` (latent attention's joint key-value
  projections, which are neither k nor v alone) and ``ffn`` (dense or expert); a new kind
  of matrix is one entry in its component class's ``matrix_components``. Under MLA the sets ``qk`` and ``vo`` hold
  the query and output matrices only; ``attn`` and ``all`` hold the ``kv`` matrices too;
* depth group: early / mid / late thirds of the blocks (fewer groups for shallow models);
* head blocks: which matrices ``optim.muon_split_heads`` orthogonalises per attention head,
  and along which axis (each attention class's ``head_blocks``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence

from normopt.errors import UserError
from normopt.models.components import matrix_components

# matrix type -> component, from each registered attention and feed-forward's
# ``matrix_components`` (the router is not a block matrix: it goes to AdamW unless a
# muon_params glob names it)
COMPONENTS = matrix_components()
# ``optim.muon_params`` named sets: the components whose matrices the Muon-family optimizer
# takes (None = every block matrix); "Muon Outperforms Adam in Tail-End Associative Memory
# Learning" (2025) ablates VO and FFN (associative memories) against QK
MUON_SETS: dict[str, frozenset[str] | None] = {
    "all": None,
    "none": frozenset(),
    "qk": frozenset({"q", "k"}),
    "vo": frozenset({"v", "o"}),
    "ffn": frozenset({"ffn"}),
    "vo_ffn": frozenset({"v", "o", "ffn"}),
    "attn": frozenset({"q", "k", "v", "o", "kv"}),
}
# ``optim.muon_split_heads``: the components whose matrices Muon orthogonalises per head.
# MLA's joint key-value up-projection (component kv) holds each head's keys and values in
# one block, so it splits when both k and v do (qkv, qkvo); under qk it stays whole, since
# splitting it would split the values too.
SPLIT_HEADS_SETS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "qk": frozenset({"q", "k"}),
    "qkv": frozenset({"q", "k", "v", "kv"}),
    "qkvo": frozenset({"q", "k", "v", "kv", "o"}),
}
GROUP_NAMES = {1: ("all",), 2: ("early", "late"), 3: ("early", "mid", "late")}


def matrix_type(name: str) -> str:
    """A matrix's role in its block: the dotted path after the block index (the first
    all-digit part), minus a trailing ``.weight`` and any later all-digit part (an expert
    index), so one type holds matrices of one shape:

        layers.3.attn.wq.weight -> attn.wq        layers.3.ffn.w2.weight -> ffn.w2
        layers.0.attn.wkv_a.weight -> attn.wkv_a  layers.1.ffn.experts.7.w1.weight -> ffn.experts.w1

    A name without a block index keeps its whole path (``output.weight`` -> ``output``)."""
    parts = name.split(".")
    parts = parts[:-1] if len(parts) > 1 and parts[-1] == "weight" else parts
    block = next((i for i, part in enumerate(parts) if part.isdigit()), -1)
    return ".".join(p for p in parts[block + 1 :] if not p.isdigit()) or name


def component(name: str) -> str | None:
    """The component (q, k, v, o, kv, ffn) of a block matrix by its parameter name; None for a
    matrix of no known component."""
    return COMPONENTS.get(matrix_type(name))


def group_names(n_groups: int) -> tuple[str, ...]:
    """Names of the depth groups, shallowest first: early/mid/late for 3, g0..g{G-1} past 3."""
    if n_groups < 1:
        raise UserError(f"the number of depth groups must be >= 1, got {n_groups}")
    return GROUP_NAMES.get(n_groups, tuple(f"g{i}" for i in range(n_groups)))


def depth_group(layer: int, n_layers: int, n_groups: int = 3) -> str:
    """Group of block ``layer`` (0-based) among ``n_layers``: index floor(G * layer / n_layers),
    i.e. the equal thirds early l < n/3, mid n/3 <= l < 2n/3, late the rest for G = 3."""
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is not in 0..{n_layers - 1}")
    return group_names(n_groups)[(n_groups * layer) // n_layers]


def parse_muon_params(value: str | Sequence[str]) -> str | tuple[str, ...]:
    """``optim.muon_params`` as given: a named set (a key of MUON_SETS), or name globs (a YAML
    list, or one comma-separated string of globs). Raises UserError for an unknown set name."""
    if isinstance(value, str):
        text = value.strip()
        if text in MUON_SETS:
            return text
        globs = tuple(g.strip() for g in text.split(",") if g.strip())
        if not globs or not any(ch in text for ch in "*?[."):
            raise UserError(
                f"optim.muon_params: unknown set {value!r} (sets: {', '.join(MUON_SETS)}; or a list of "
                f"parameter-name globs such as layers.*.attn.wv.weight)"
            )
        return globs
    if not value or not all(isinstance(g, str) and g.strip() for g in value):
        raise UserError("optim.muon_params: a list must hold parameter-name globs (non-empty strings)")
    return tuple(g.strip() for g in value)


def muon_selector(value: str | Sequence[str]) -> Callable[[str], bool]:
    """Whether the Muon-family optimizer takes the block matrix of a given parameter name:
    for a named set, when the matrix's component is in the set (``all``: every block matrix);
    for globs, when the name matches one of them (fnmatch)."""
    parsed = parse_muon_params(value)
    if isinstance(parsed, str):
        chosen = MUON_SETS[parsed]
        return (lambda name: True) if chosen is None else (lambda name: component(name) in chosen)
    return lambda name: any(fnmatch.fnmatchcase(name, glob) for glob in parsed)


def check_globs_match(value: str | Sequence[str], names: Iterable[str]) -> None:
    """A glob list that selects no block matrix is a mistake: UserError naming the globs and a
    few matrix names to match against."""
    parsed = parse_muon_params(value)
    if isinstance(parsed, str):
        return
    names = list(names)
    if not any(fnmatch.fnmatchcase(n, g) for n in names for g in parsed):
        raise UserError(
            f"optim.muon_params: the globs {', '.join(parsed)} match no block matrix "
            f"(for example: {', '.join(names[:4])})"
        )


def head_blocks_by_name(model, setting: str) -> dict[str, tuple[str, int]]:
    """Parameter name -> (axis, heads) of every block matrix that ``optim.muon_split_heads``
    = ``setting`` orthogonalises per head: axis ``rows`` (W_q, W_k, W_v: each head's output
    rows) or ``cols`` (W_o: each head's input columns), in ``heads`` equal blocks. The layout
    comes from each attention module's ``head_blocks()``, the selection from the matrix's
    component (SPLIT_HEADS_SETS); matrices with no head structure never appear."""
    chosen = SPLIT_HEADS_SETS[setting]
    if not chosen:
        return {}
    name_of = {id(p): name for name, p in model.named_parameters()}
    found = {}
    for module in model.modules():
        layout = getattr(type(module), "head_blocks", None)
        if layout is None:
            continue
        for weight, axis, heads in module.head_blocks():
            name = name_of[id(weight)]
            if component(name) in chosen:
                found[name] = (axis, heads)
    return found
