"""A cell's record in summary.json: its placement, flags and final loss, and its diagnostics in a few
numbers (descriptive only)."""

from __future__ import annotations

from typing import Any

from normopt.report.cells.cell_assessment import Assessment, learned_no_context
from normopt.report.cells.cell_reading import Cell, Diagnostics


def diagnostics_numbers(diagnostics: Diagnostics) -> dict[str, Any]:
    """A cell's diagnostics in a few numbers (None where the cell logged no such record):

    * final_saturation: the mean saturation over the bounded norm layers at the last step that
      has one (``saturation_step``), with each layer's value in ``saturation_by_layer``;
    * final_spectral_norm: the mean spectral norm over the block matrices (MoE experts each
      once; embedding and output excluded) at the last spectral_norm record;
      spectral_norm_growth = that mean at the last record / at the first
      (``spectral_norm_steps`` = [first, last]); None with one record or a first mean of 0;
      spectral_norm_by_cell: the last record's mean per "type/group" of block matrix;
      embedding_spectral_norm, output_spectral_norm: those two matrices' own, at the last record;
    * tail_bucket_loss: the last tail_tokens record's loss per token-frequency bucket (nats,
      head -> tail, None = empty bucket), at ``tail_tokens_step``, with its token shares and
      vocabulary sizes;
    * update_isotropy, weight_isotropy: the last isotropy record's normalised singular-value
      entropy (1 = isotropic, 0 = rank one) of the applied updates and of the weights, per
      "type/group" cell (mean over the cell's matrices), at ``isotropy_step``; their
      effective ranks in update_effective_rank, weight_effective_rank."""
    saturation, spectral, tail = diagnostics.saturation, diagnostics.spectral_norm, diagnostics.tail_tokens
    iso, groups = diagnostics.isotropy, diagnostics.spectral_groups
    growth = None
    if len(spectral) >= 2 and spectral[0][1] != 0:
        growth = spectral[-1][1] / spectral[0][1]
    return {
        "final_saturation": saturation[-1][1] if saturation else None,
        "saturation_step": saturation[-1][0] if saturation else None,
        "saturation_by_layer": dict(diagnostics.saturation_layers),
        "final_spectral_norm": spectral[-1][1] if spectral else None,
        "spectral_norm_growth": growth,
        "spectral_norm_steps": [spectral[0][0], spectral[-1][0]] if spectral else None,
        "spectral_norm_by_cell": dict(groups["by_cell"]) if groups else None,
        "embedding_spectral_norm": groups["embedding"] if groups else None,
        "output_spectral_norm": groups["output"] if groups else None,
        "tail_tokens_step": tail.step if tail else None,
        "tail_bucket_loss": list(tail.bucket_loss) if tail else None,
        "tail_bucket_token_share": list(tail.bucket_token_share) if tail else None,
        "tail_bucket_vocab_size": list(tail.bucket_vocab_size) if tail else None,
        "isotropy_step": iso.step if iso else None,
        "update_isotropy": dict(iso.update_entropy) if iso else None,
        "weight_isotropy": dict(iso.weight_entropy) if iso else None,
        "update_effective_rank": dict(iso.update_erank) if iso else None,
        "weight_effective_rank": dict(iso.weight_erank) if iso else None,
        "partial_last_line": diagnostics.partial_last_line,
    }


def cell_record(cell: Cell, assessment: Assessment, fix_of: str | None, stratum: str) -> dict[str, Any]:
    """summary.json's record of one cell, left out or not."""
    metrics = cell.metrics
    return {
        **({"stratum": stratum} if stratum else {}),
        "name": cell.name,
        "path": str(cell.path),
        "norm": cell.norm,
        "arm": cell.arm,
        "variant": cell.variant if cell.norm is not None else None,
        "optim": cell.optim,
        "seed": cell.seed,
        "fix_of": fix_of,
        "steps": cell.steps,
        "last_step": metrics.last_step if metrics else None,
        "final_eval_loss": assessment.final_eval_loss,
        "unigram_entropy": metrics.unigram_entropy if metrics else None,
        "learned_no_context": learned_no_context(
            assessment.final_eval_loss, metrics.unigram_entropy if metrics else None
        ),
        "flags": list(assessment.flags),
        "reasons": list(assessment.reasons),
        "included": not assessment.flags,
        "partial_last_line": bool(metrics and metrics.partial_last_line),
        "diagnostics": None if cell.diagnostics is None else diagnostics_numbers(cell.diagnostics),
        "cost": cell.cost,
    }
