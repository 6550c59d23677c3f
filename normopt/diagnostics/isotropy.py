"""How evenly a matrix spreads its energy over its singular directions.

For M (m x n) with singular values s_1..s_r, r = min(m, n), the energy shares

    p_i = s_i^2 / sum_j s_j^2        (sum_i p_i = 1; sum_j s_j^2 = ||M||_F^2)

define the singular-value entropy H(M) = -sum_i p_i log p_i (nats, 0 log 0 = 0) and

    normalised entropy   h(M)     = H(M) / log r      in [0, 1]
    effective rank       erank(M) = exp(H(M))         in [1, r]

h = 1 and erank = r when all r singular values are equal (an isotropic matrix: a multiple
of a semi-orthogonal one, what Muon's Newton-Schulz step aims its update at); h = 0 and
erank = 1 for a rank-one matrix.

Energy shares, not Roy & Vetterli's p_i = s_i / sum_j s_j ("The effective rank", 2007,
whose exp-entropy form erank keeps): with s_i^2, p_i is the share of ||M||_F^2 (for an
update: of its squared step length) along singular direction i, the trace-normalised
spectrum of M M^T. It is the stricter of the two: for one spectrum the entropy of
p ~ s^beta never rises with beta (dH/dbeta = -beta Var_p(log p) <= 0), so the energy
version is at most the s_i version, with equality exactly when the nonzero singular values
are equal; both give 1 and r for isotropic matrices and 0 and 1 for rank-one ones.

Undefined cases are None, never a made-up number: an all-zero matrix has no energy to
share (h and erank None), and for r = 1 log r = 0, so h is None (erank is 1). A non-finite
matrix gives nan. The functions are pure math on tensors; :class:`Isotropy` is the
diagnostic that applies them to a run's updates and weights (diagnostics/registry.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from normopt.diagnostics.diagnostic import (
    OPTIMIZER_STEP,
    Diagnostic,
    DiagnosticRun,
    block_index,
    block_matrices,
    full_matrix,
)
from normopt.diagnostics.ns_spectrum import singular_values
from normopt.metrics.record_fields import mapping_field, optional_metric
from normopt.models.matrix_roles import depth_group, matrix_type
from normopt.parallel import collectives
from normopt.run_dir import RecordKind

MEASURES = ("entropy", "erank")


def energy_shares(sigma: torch.Tensor) -> torch.Tensor | None:
    """p_i = s_i^2 / sum_j s_j^2 in float64, or None when every s_i is 0."""
    energy = sigma.detach().double().square()
    total = energy.sum()
    return None if total == 0 else energy / total


def spectral_entropy(p: torch.Tensor) -> float:
    """H = -sum_i p_i log p_i in nats, with 0 log 0 = 0 (``xlogy``), clipped to [0, log r]:
    rounding may otherwise leave it a hair outside (-0.0, or log r + 1e-16)."""
    h = float(-torch.special.xlogy(p, p).sum())
    return min(max(0.0, h), math.log(p.numel()))


def normalised_entropy(sigma: torch.Tensor) -> float | None:
    """h = H / log r from the r singular values ``sigma``; None for r = 1 or all zeros."""
    p = energy_shares(sigma)
    if p is None or p.numel() == 1:
        return None
    return min(spectral_entropy(p) / math.log(p.numel()), 1.0)


def effective_rank(sigma: torch.Tensor) -> float | None:
    """erank = exp(H) from the singular values ``sigma``; None when all are zero."""
    p = energy_shares(sigma)
    return None if p is None else min(math.exp(spectral_entropy(p)), float(p.numel()))


def isotropy(matrix: torch.Tensor) -> dict[str, float | None]:
    """{"entropy": h, "erank": erank} of a matrix, from one ``torch.linalg.svdvals`` in
    float32 (float64 stays float64; ``ns_spectrum.singular_values``)."""
    if not bool(torch.isfinite(matrix).all()):  # svdvals refuses such input
        return {"entropy": math.nan, "erank": math.nan}
    sigma = singular_values(matrix)
    return {"entropy": normalised_entropy(sigma), "erank": effective_rank(sigma)}


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def cell_means(
    matrices: Mapping[str, Mapping[str, float | None]], cell_of: Mapping[str, str], fields: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """Per cell, the mean of each of ``fields`` over the cell's matrices (``mean_or_none``:
    a matrix whose value is None, e.g. an all-zero update, is left out of that mean).

    ``matrices``: name -> {field: value}; ``cell_of``: name -> cell label. Cells keep the
    order in which their first matrix appears."""
    members: dict[str, list[str]] = {}
    for name in matrices:
        members.setdefault(cell_of[name], []).append(name)
    return {cell: {k: mean_or_none(matrices[n][k] for n in names) for k in fields} for cell, names in members.items()}


# --------------------------------------------------------------------------- the diagnostic

ISOTROPY_FIELDS = tuple(f"{source}_{measure}" for source in ("update", "weight") for measure in MEASURES)


def isotropy_cell(name: str, n_layers: int) -> tuple[int, str, str]:
    """(block index, matrix type, depth group) of a block matrix: groups are thirds of the
    depth, or one per block with fewer than 3 blocks."""
    layer = block_index(name)
    return layer, matrix_type(name), depth_group(layer, n_layers, min(3, n_layers))


@dataclass(frozen=True)
class IsotropyMeans:
    """One ``isotropy`` record's means per "type/group" cell (``attn.wq/early``): for the
    update the optimizer step applied and for the weights after it, the normalised
    singular-value entropy (energy shares; 1 = all singular values equal, 0 = rank one) and
    the effective rank; None = undefined."""

    step: int
    update_entropy: Mapping[str, float | None]
    update_erank: Mapping[str, float | None]
    weight_entropy: Mapping[str, float | None]
    weight_erank: Mapping[str, float | None]


class Isotropy(Diagnostic):
    """How evenly the update the optimizer step applied, Delta W = W_after - W_before
    (weight decay, lr and scale included; the parameters' own float32 arithmetic), and the
    weight W after it spread their energy over singular directions, for every block matrix:
    per matrix its layer, type, depth group and the four numbers of :func:`isotropy` for
    update and weight; per "type/group" cell their means."""

    name = RecordKind.ISOTROPY
    when = OPTIMIZER_STEP
    help = "singular-value entropy and effective rank of each block matrix's update and weight"
    keys = ("interval", "isotropy")

    def __init__(self, run: DiagnosticRun):
        super().__init__(run)
        self._before: dict[str, torch.Tensor] | None = None  # block matrices before a diagnosed step

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.isotropy

    @torch.no_grad()
    def before_optimizer_step(self) -> float:
        """Copy this rank's shard of every block matrix: one more copy of those weights,
        held from just before the step until the record is written."""
        started = time.perf_counter()
        self._before = {name: p.detach().clone() for name, p in block_matrices(self.run.model)}
        return time.perf_counter() - started

    @torch.no_grad()
    def collect(self, step: int, **inputs) -> dict | None:
        """Update Delta W = W - (the snapshot) and weight W of every block matrix, both
        gathered on all ranks in the same order, matrix i analysed on rank i % world_size,
        the per-matrix results collected on every rank; then the means per type and group."""
        before, self._before = self._before, None
        if not before:
            return None
        rank, world_size = self.run.rank, self.run.world_size
        todo = block_matrices(self.run.model)
        n_layers = 1 + max(block_index(name) for name, _ in todo)
        mine: dict[str, dict] = {}
        names: list[str] = []
        for index, (name, p) in enumerate(todo):
            weight = p.detach()
            update, weight = full_matrix(weight - before.pop(name)), full_matrix(weight)
            # an expert stack (E, rows, cols) is E matrices, named <stack>.<expert>
            parts = (
                [(name, update, weight)]
                if update.ndim == 2
                else [(f"{name}.{e}", update[e], weight[e]) for e in range(update.shape[0])]
            )
            names += [part[0] for part in parts]
            if index % world_size == rank:
                for part_name, part_update, part_weight in parts:
                    layer, mtype, group = isotropy_cell(part_name, n_layers)
                    mine[part_name] = {
                        "layer": layer,
                        "type": mtype,
                        "group": group,
                        **{f"update_{k}": v for k, v in isotropy(part_update).items()},
                        **{f"weight_{k}": v for k, v in isotropy(part_weight).items()},
                    }
        if world_size > 1:
            mine = {k: v for part in collectives.all_gather_object(mine) for k, v in part.items()}
        ordered = {name: mine[name] for name in names}
        cells = {name: f"{r['type']}/{r['group']}" for name, r in ordered.items()}
        return {"measure": "energy", "groups": cell_means(ordered, cells, ISOTROPY_FIELDS), "matrices": ordered}

    @staticmethod
    def read(record) -> IsotropyMeans:
        cells = mapping_field(record, "groups")
        if not all(isinstance(v, Mapping) for v in cells.values()):
            raise ValueError("'groups' is not an object of objects")
        columns = {
            field: {str(cell): optional_metric(values.get(field)) for cell, values in cells.items()}
            for field in ("update_entropy", "update_erank", "weight_entropy", "weight_erank")
        }
        return IsotropyMeans(record["step"], **columns)
