"""Sort a model's parameters into optimizer groups by role.

Roles: ``matrix`` (the hidden weights of attention and feed-forward: 2-D matrices and the
3-D expert stacks of MoE layers), ``router`` (an MoE layer's gate), ``head`` (an untied
output projection), ``embedding`` (token embedding, a tied head, and the embedding scale of
bounded-norm models) and ``norm`` (norm gains and biases, DyT/Derf alpha and shift). Under
Muon/NorMuon the matrices that ``optim.muon_params`` selects (all by default;
:mod:`normopt.models.matrix_roles`) go to the Muon-family optimizer, the other matrices form
the group ``matrix_adamw`` (AdamW with the AdamW lr and weight decay), and everything else
goes to AdamW: the router too, unless ``optim.muon_params`` names it in a glob. Norms and
embeddings take no weight decay unless ``optim.decay_norms_and_embeddings`` is set.
The Muon-family group also records which of its matrices ``optim.muon_split_heads``
orthogonalises per attention head (``head_blocks``, by name).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from normopt.models.matrix_roles import (
    check_globs_match,
    head_blocks_by_name,
    matrix_type,
    muon_selector,
    parse_muon_params,
)
from normopt.optim.registry import FALLBACK, optimizer_spec


@dataclass
class ParamGroup:
    role: str
    optimizer: str  # a name of the optimizer registry (optim/registry.py)
    lr: float
    weight_decay: float
    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)
    # name -> (axis, heads) of the matrices orthogonalised per head (Muon family only)
    head_blocks: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def torch_group(self) -> dict:
        """The group as a torch optimizer param group (``peak_lr`` is what the schedule scales)."""
        return {
            "params": self.params,
            "lr": self.lr,
            "peak_lr": self.lr,
            "weight_decay": self.weight_decay,
            "role": self.role,
        }


# the groups parameters are sorted into; a module may declare one of the last three
ROLES = ("matrix", "matrix_adamw", "head", "router", "embedding", "norm")
DECLARABLE_ROLES = ("router", "embedding", "norm")


def declared_roles(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> the ``param_role`` its module declares (the model protocol,
    models/llama.py: every norm layer "norm", an MoE router "router"); a module nested in
    another declares for its own parameters."""
    declared = {}
    for module in model.modules():
        role = getattr(module, "param_role", None)
        if role is None:
            continue
        if role not in DECLARABLE_ROLES:
            raise ValueError(
                f"{type(module).__name__}.param_role is {role!r}; a module may declare one of "
                f"{', '.join(DECLARABLE_ROLES)} (matrices and the head follow from their shape and place)"
            )
        declared.update((id(p), role) for p in module.parameters())
    return declared


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Map each parameter name (as in ``named_parameters``) to its role."""
    declared = declared_roles(model)
    embedding_params = {
        id(p) for module in model.modules() if isinstance(module, nn.Embedding) for p in module.parameters()
    }
    if getattr(model, "embed_scale", None) is not None:
        embedding_params.add(id(model.embed_scale))
    roles = {}
    for name, p in model.named_parameters():
        if declared.get(id(p)) == "norm":
            roles[name] = "norm"
        elif id(p) in embedding_params:
            roles[name] = "embedding"
        elif id(p) in declared:
            roles[name] = declared[id(p)]
        elif name.split(".")[-2:-1] == ["output"] or name.startswith("output."):
            roles[name] = "head"
        elif p.ndim in (2, 3):
            roles[name] = "matrix"
        else:
            roles[name] = "norm"  # any other vector or scalar is treated like a norm parameter
    return roles


def build_param_groups(model: nn.Module, optim_cfg) -> list[ParamGroup]:
    """One ParamGroup per role that has parameters, with its optimizer, lr and weight decay
    (under Muon/NorMuon, the matrices ``optim.muon_params`` leaves out are ``matrix_adamw``)."""
    matrices_only = optimizer_spec(optim_cfg.name).matrices_only
    others = FALLBACK if matrices_only else optim_cfg.name  # what takes the non-matrix roles
    no_decay = 0.0 if not optim_cfg.decay_norms_and_embeddings else optim_cfg.weight_decay
    if matrices_only:
        matrix_lr = optim_cfg.lr if optim_cfg.muon_lr is None else optim_cfg.muon_lr
        matrix_wd = optim_cfg.weight_decay if optim_cfg.muon_weight_decay is None else optim_cfg.muon_weight_decay
    else:
        matrix_lr, matrix_wd = optim_cfg.lr, optim_cfg.weight_decay
    specs = {
        "matrix": (optim_cfg.name, matrix_lr, matrix_wd),
        "matrix_adamw": (FALLBACK, optim_cfg.lr, optim_cfg.weight_decay),
        "router": (others, optim_cfg.lr, optim_cfg.weight_decay),
        "head": (others, optim_cfg.lr, optim_cfg.weight_decay),
        "embedding": (others, optim_cfg.lr, no_decay),
        "norm": (others, optim_cfg.lr, no_decay),
    }
    groups = {role: ParamGroup(role, *spec) for role, spec in specs.items()}
    roles = parameter_roles(model)
    if matrices_only:
        check_globs_match(optim_cfg.muon_params, [n for n, r in roles.items() if r in ("matrix", "router")])
        on_muon = muon_selector(optim_cfg.muon_params)
        named_by_glob = not isinstance(parse_muon_params(optim_cfg.muon_params), str)
        roles = {
            n: "matrix_adamw"
            if r == "matrix" and not on_muon(n)
            else "matrix"
            if r == "router" and named_by_glob and on_muon(n)
            else r
            for n, r in roles.items()
        }
    for name, p in model.named_parameters():
        group = groups[roles[name]]
        group.names.append(name)
        group.params.append(p)
    if matrices_only:
        split = head_blocks_by_name(model, optim_cfg.muon_split_heads)
        groups["matrix"].head_blocks = {n: split[n] for n in groups["matrix"].names if n in split}
    return [g for g in groups.values() if g.params]


def describe_head_blocks(groups: list[ParamGroup]) -> str | None:
    """One line naming the matrix types orthogonalised per head and their layouts, e.g.
    ``attn.wq rows/4, attn.wo cols/4 (8 matrices)``; None when nothing splits."""
    split = {name: layout for g in groups for name, layout in g.head_blocks.items()}
    if not split:
        return None
    kinds = dict.fromkeys(f"{matrix_type(name)} {axis}/{heads}" for name, (axis, heads) in split.items())
    return f"{', '.join(kinds)} ({len(split)} matrices)"


def format_group_table(groups: list[ParamGroup]) -> str:
    rows = [("group", "optimizer", "tensors", "parameters", "lr", "weight_decay")]
    for g in groups:
        rows.append((g.role, g.optimizer, str(len(g.params)), f"{g.numel:,}", f"{g.lr:g}", f"{g.weight_decay:g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
