"""Update-to-weight RMS ratio of every matrix, every step: how far one optimizer step moves
each layer relative to its size.

    ratio(W) = rms(W_after - W_before) / rms(W_before),   rms(A) = ||A||_F / sqrt(numel(A))

the update being everything the step applied (learning rate, schedule, weight decay and the
optimizer's own scaling included). The quantity researchers track to compare optimizers
layer by layer: an Adam-type update has per-coordinate magnitude about lr, so its ratio is
about lr / rms(W); Muon's orthogonalised update has all singular values equal, so its RMS is
set by the matrix shape and the scale rule (Jordan et al., "Muon: An optimizer for hidden
layers in neural networks", 2024; Bernstein & Newhouse, "Old Optimizer, New Norm",
arXiv:2409.20325, on why the update's RMS-to-RMS size is the quantity to control).

A normopt diagnostic plugin: ``--plugin examples/plugins/update_rms.py``; it writes an
``update_rms`` record ({"matrices": name -> ratio, "groups": "type" -> mean ratio}) every
``diagnostics.update_rms_interval`` steps (default every step) and adds a table of the last
step's mean ratio per matrix type to the report. It gathers each sharded matrix's sums of
squares, not the matrix: cheap enough to run every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from normopt.extend import (
    AFTER_OPTIMIZER_STEP,
    DIAGNOSTICS,
    EXECUTION,
    Diagnostic,
    block_matrices,
    component_options,
    require,
    role,
)


@dataclass
class UpdateRMSConfig:
    """The diagnostic's own keys: diagnostics.update_rms_<field>."""

    interval: int = role(EXECUTION, 1, "update_rms: every N steps (and the last); 0 = off")

    def validate(self) -> None:
        require(self.interval >= 0, "diagnostics.update_rms_interval", "must be >= 0 (0 = off)")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly sharded) parameter: sums of squares add up over shards."""
    return t.to_local() if hasattr(t, "to_local") else t


def matrix_type(name: str) -> str:
    """``layers.3.attn.wq.weight`` -> ``attn.wq``."""
    parts = name.split(".")
    return ".".join(parts[2:-1]) if parts[0] == "layers" else ".".join(parts[:-1])


class UpdateRMS(Diagnostic):
    name = "update_rms"
    when = AFTER_OPTIMIZER_STEP
    help = "rms(update) / rms(weight) of every block matrix at every step"
    config = UpdateRMSConfig

    def __init__(self, run):
        super().__init__(run)
        self._before: dict[str, torch.Tensor] | None = None

    @classmethod
    def interval(cls, cfg) -> int:
        return component_options(cfg, cls.name).interval

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cls.interval(cfg) > 0

    @torch.no_grad()
    def before_optimizer_step(self) -> float:
        started = time.perf_counter()
        self._before = {name: _local(p.detach()).clone() for name, p in block_matrices(self.run.model)}
        return time.perf_counter() - started

    @torch.no_grad()
    def collect(self, step: int, **inputs) -> dict | None:
        """Per matrix, this rank's sums of squares of W_before and of the update, added over
        the ranks (one all-reduce for all matrices), then the ratio."""
        before, self._before = self._before, None
        if not before:
            return None
        names, rows = list(before), []
        for name, p in block_matrices(self.run.model):
            after, old = _local(p.detach()).double(), before[name].double()
            rows.append(torch.stack([old.pow(2).sum(), (after - old).pow(2).sum(), old.new_tensor(old.numel())]))
        sums = torch.stack(rows)  # (matrices, 3) on the parameters' device: three numbers per matrix
        if self.run.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        sums = sums.cpu()
        ratios = {
            name: float((u / n).sqrt() / (w / n).sqrt()) if w > 0 else None for name, (w, u, n) in zip(names, sums)
        }
        by_type: dict[str, list[float]] = {}
        for name, ratio in ratios.items():
            if ratio is not None:
                by_type.setdefault(matrix_type(name), []).append(ratio)
        return {"matrices": ratios, "groups": {t: sum(v) / len(v) for t, v in sorted(by_type.items())}}

    @staticmethod
    def read(record) -> dict[str, float]:
        """Matrix type -> mean ratio of the record."""
        groups = record.get("groups")
        if not isinstance(groups, dict):
            raise ValueError("'groups' is not an object")
        return {str(k): float(v) for k, v in groups.items()}

    @classmethod
    def report_rows(cls, cells):
        """One row per cell: its last record's mean ratio per matrix type."""
        types = sorted({t for _, groups in cells for t in groups})
        rows = [[name, *(f"{groups[t]:.3g}" if t in groups else "-" for t in types)] for name, groups in cells]
        return "Update-to-weight RMS ratio per matrix type (last diagnosed step)", ["cell", *types], rows


DIAGNOSTICS.register(UpdateRMS)
