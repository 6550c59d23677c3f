"""Largest singular value of every weight matrix, by warm-started power iteration.

For W (m x n) and a unit vector v, one iteration is

    v <- W^T W v / ||W^T W v||,     sigma ~ ||W v||

which converges to the top right singular vector at rate (sigma_2 / sigma_1)^2 per
iteration. Keeping v between calls (weights move little in K steps) makes a couple of
iterations per call enough.

FSDP2 shards a matrix by rows (Shard(0)): rank i holds W_i. Then W v is row-local
(u_i = W_i v) and W^T W v = sum_i W_i^T u_i is one all-reduce of an n-vector, so no rank
ever gathers the matrix; ||W v||^2 = sum_i ||u_i||^2 is one more all-reduce of a scalar.
Under HSDP the sums run over one replica's shard group (each replica holds every row once).

What a summary of them means (``spectral_norm_groups``): the block matrices (attention,
feed-forward, MoE experts one by one, routers) by type and depth group, and the token
embedding and output matrices apart. The latter two are no block matrices: at init their
spectral norm is several times a block matrix's (vocab x dim, not dim x dim), and under Muon
they are AdamW-trained, so a mean over "all weight matrices" would mostly report them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from normopt.diagnostics.diagnostic import Diagnostic, DiagnosticRun, full_matrix
from normopt.metrics.record_fields import mapping_field, optional_metric
from normopt.models.matrix_roles import depth_group, matrix_type
from normopt.parallel import collectives
from normopt.parallel.row_shards import row_shards_of
from normopt.run_dir import RecordKind

# the two matrices outside the blocks, reported apart (module docstring)
EMBEDDING_MATRIX = "tok_embeddings.weight"
OUTPUT_MATRIX = "output.weight"


def _row_shard(weight: torch.Tensor) -> tuple[torch.Tensor, dist.ProcessGroup | None]:
    """This rank's rows of ``weight`` and the group to sum over (None: the whole matrix is here)."""
    if isinstance(weight, DTensor):
        try:  # FSDP2 or HSDP rows: sum over the ranks holding one copy of every row
            return weight.to_local(), row_shards_of(weight).group()
        except ValueError:
            return weight.full_tensor(), None  # another layout: gather (not used by normopt's FSDP2)
    return weight, None


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        collectives.all_reduce_sum(t, group)
    return t


@torch.no_grad()
def power_iteration(
    weight: torch.Tensor, v: torch.Tensor, iterations: int, max_iterations: int | None = None, tol: float = 1e-4
) -> tuple[float, torch.Tensor]:
    """(sigma_max estimate, updated unit vector v), starting from ``v``.

    Runs at least ``iterations`` steps, then continues (up to ``max_iterations``) while the
    estimate ||W v|| still grows by more than ``tol`` relative per step: a warm vector that
    still fits stops at once, one the weights moved away from keeps iterating. The estimate
    never exceeds sigma_max. ``weight`` may be a plain tensor or a row-sharded DTensor (then
    every rank of its mesh calls this with the same v; all get the same result).
    """
    rows, group = _row_shard(weight)
    rows = rows.float()
    v = v.float() / v.float().norm().clamp_min(1e-30)
    limit = max(iterations, max_iterations or iterations)
    previous = 0.0
    for done in range(1, limit + 1):
        u = rows @ v
        # W^T W v and ||W v||^2 for the current v in one collective
        packed = _all_reduce(torch.cat([rows.mT @ u, u.pow(2).sum().reshape(1)]), group)
        w, sigma = packed[:-1], float(packed[-1].sqrt())
        norm = w.norm()
        if float(norm) == 0.0:  # W v = 0: W is zero (or v in its null space)
            break
        v = w / norm
        if done >= iterations and sigma - previous <= tol * sigma:
            break
        previous = sigma
    sq = _all_reduce((rows @ v).pow(2).sum().reshape(1), group)
    return float(sq.sqrt()), v


def start_vector(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """A deterministic random unit vector (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=torch.float32)
    return (v / v.norm()).to(device)


class SpectralNormTracker:
    """Warm-started power iteration over named matrices: at least ``cold_iterations`` the
    first time a matrix is seen, at least ``iterations`` after that, and more (up to
    ``max_iterations``) while the estimate still moves by more than ``tol``."""

    def __init__(self, iterations: int = 2, cold_iterations: int = 20, max_iterations: int = 100, tol: float = 1e-4):
        self.iterations, self.cold_iterations = iterations, cold_iterations
        self.max_iterations, self.tol = max_iterations, tol
        self.vectors: dict[str, torch.Tensor] = {}

    def __call__(self, named_matrices: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
        sigmas = {}
        for index, (name, weight) in enumerate(named_matrices):
            v = self.vectors.get(name)
            iterations = self.iterations
            if v is None:
                v, iterations = start_vector(weight.shape[1], index, weight.device), self.cold_iterations
            sigmas[name], self.vectors[name] = power_iteration(weight, v, iterations, self.max_iterations, self.tol)
        return sigmas


def _block_layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


def spectral_norm_groups(sigmas: dict[str, float]) -> dict[str, object]:
    """The spectral norms of one record, summarised (module docstring):

    * blocks: the mean over the block matrices (``layers.<i>.*``; an expert stack's experts,
      named ``<stack>.<e>``, each count once), None without any;
    * by_cell: "type/group" -> the mean over that cell's matrices (``matrix_type``, and
      ``depth_group`` in thirds of the depth, one group per block with fewer than 3 blocks);
    * embedding, output: their own spectral norms (None when not logged; a tied output is
      the embedding, logged once under its name);
    * other: names of matrices that are none of these (left out of every mean).
    A NaN/Inf among the averaged values makes the mean NaN/Inf."""
    blocks = {name: v for name, v in sigmas.items() if _block_layer(name) is not None}
    n_layers = 1 + max((_block_layer(n) for n in blocks), default=-1)
    cells: dict[str, list[float]] = {}
    for name, value in blocks.items():
        group = depth_group(_block_layer(name), n_layers, min(3, n_layers))
        cells.setdefault(f"{matrix_type(name)}/{group}", []).append(value)
    return {
        "blocks": sum(blocks.values()) / len(blocks) if blocks else None,
        "by_cell": {cell: sum(v) / len(v) for cell, v in sorted(cells.items())},
        "embedding": sigmas.get(EMBEDDING_MATRIX),
        "output": sigmas.get(OUTPUT_MATRIX),
        "other": sorted(n for n in sigmas if n not in blocks and n not in (EMBEDDING_MATRIX, OUTPUT_MATRIX)),
    }


# --------------------------------------------------------------------------- the diagnostic


class SpectralNorm(Diagnostic):
    """sigma_max of every weight matrix (power iteration, warm-started from the last record's
    vectors): every 2-D weight, and each expert of an MoE expert stack (E, rows, cols) as its
    own matrix ``<stack>.<e>``. The report reads the summary by type and depth group."""

    name = RecordKind.SPECTRAL_NORM
    help = "largest singular value of every weight matrix (warm-started power iteration)"
    keys = ("interval", "power_iterations", "histograms")

    def __init__(self, run: DiagnosticRun):
        super().__init__(run)
        self.tracker = SpectralNormTracker(run.cfg.power_iterations)

    def collect(self, step: int, **inputs) -> dict:
        matrices = []
        for name, p in self.run.model.named_parameters():
            if p.ndim == 2:
                matrices.append((name, p))
            elif p.ndim == 3:  # an expert stack: gathered whole (a collective, same order on every rank)
                stack = full_matrix(p.detach())
                matrices += [(f"{name}.{e}", stack[e]) for e in range(stack.shape[0])]
        return {"experts": "per expert (<stack>.<e>)", "matrices": self.tracker(matrices)}

    @classmethod
    def mirror(cls, record, tensorboard, histograms: bool) -> None:
        if histograms and record["matrices"]:
            tensorboard.add_histogram(
                "diag_spectral_norm/all_matrices", torch.tensor(list(record["matrices"].values())), record["step"]
            )

    @staticmethod
    def read(record) -> dict[str, object]:
        """:func:`spectral_norm_groups` of the record's matrices (null values left out)."""
        values = {str(k): optional_metric(v) for k, v in mapping_field(record, "matrices").items()}
        return spectral_norm_groups({k: v for k, v in values.items() if v is not None})
