"""Collect a run's diagnostics every K steps into ``diagnostics.jsonl`` and TensorBoard.

One JSON object per line, each with ``step`` and ``kind``:

* ``run`` (once, at the start of a fresh run): n_params, n_layers, norm, optim, steps.
* ``norm``: per norm layer, on a fixed probe batch (the first ``probe_sequences``
  validation windows, the same on every rank): type, saturation, alpha, shift,
  scale_across_tokens, linearity_within_token, input_rms (see ``norm_stats``), and for
  derf_ema the running scale c and the effective alpha alpha / c; with an embedding scale,
  its value (``embed_scale``).
* ``spectral_norm``: sigma_max of every weight matrix (``spectral_norm``, power iteration):
  every 2-D weight, and each expert of an MoE expert stack (E, rows, cols) as its own matrix
  ``<stack>.<e>``; ``experts`` says so. The report summarises them by type and depth group,
  with the embedding and output matrices apart (``spectral_norm_groups``).
* ``ns_spectrum`` (Muon/NorMuon): per matrix NS receives, the singular-value quantiles of
  its input, NS output deviation from 1 and the fewest NS steps into the band
  (``ns_spectrum``); computed right after the optimizer step from the gradient and the
  new momentum, exactly the matrix the step handed to NS (in float32); with Nesterov also
  the quantiles of the momentum buffer itself (``momentum_sv_rel_*``). An MoE expert stack
  is analysed per expert, ``<stack>.<e>`` (NS orthogonalises each expert's matrix).
* ``isotropy`` (``diagnostics.isotropy``): how evenly the update the optimizer step applied,
  Delta W = W_after - W_before (weight decay, lr and scale included; the parameters' own
  float32 arithmetic), and the weight W after it spread their energy over singular
  directions, for every 2-D matrix of the blocks (``isotropy``: energy shares
  p_i = s_i^2 / sum_j s_j^2). ``matrices``: name -> layer, type (``matrix_type``: attn.wq,
  ffn.w2, ...), group (``depth_group``: early/mid/late thirds of the depth; with fewer
  than 3 blocks one group per block), update_entropy and weight_entropy (H / log r in
  [0, 1], 1 = all singular values equal), update_erank and weight_erank (exp H in [1, r]);
  None where undefined (an all-zero update). ``groups``: "type/group" -> the mean of each
  of the four numbers over that cell's matrices. ``measure`` names the shares ("energy").
* ``tail_tokens`` (every evaluation): eval loss per token-frequency bucket (``tail_tokens``).

Every record also carries ``seconds``: the wall time its collection took, so the cost
share of diagnostics can be read off any run (``benchmarks/bench_diagnostics.py``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from normopt.diagnostics.isotropy import MEASURES, cell_means, isotropy
from normopt.diagnostics.norm_stats import norm_layer_stats
from normopt.diagnostics.ns_spectrum import default_band, ns_spectrum_record
from normopt.diagnostics.spectral_norm import SpectralNormTracker
from normopt.diagnostics.tail_tokens import TailTokenBuckets
from normopt.metrics.jsonl import append_record, close_log, log_writes
from normopt.metrics.logger import jsonable
from normopt.models.matrix_roles import depth_group, matrix_type
from normopt.models.norm_layer import NormLayer
from normopt.optim.head_blocks import split_heads
from normopt.parallel import collectives
from normopt.run_dir import RecordKind

QUANTILE_LEVELS = (0.01, 0.1, 0.5, 0.9, 0.99)
ISOTROPY_FIELDS = tuple(f"{source}_{measure}" for source in ("update", "weight") for measure in MEASURES)


def block_index(name: str) -> int | None:
    """``layers.3.attn.wq.weight`` -> 3; None outside the blocks."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


def full_matrix(t: torch.Tensor) -> torch.Tensor:
    """The whole matrix of a (sharded) DTensor: a collective, every rank calls it in turn."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def isotropy_cell(name: str, n_layers: int) -> tuple[int, str, str]:
    """(block index, matrix type, depth group) of a block matrix: groups are thirds of the
    depth, or one per block with fewer than 3 blocks."""
    layer = block_index(name)
    return layer, matrix_type(name), depth_group(layer, n_layers, min(3, n_layers))


def parse_band(text: str, coefficients) -> tuple[float, float]:
    """``diagnostics.ns_band`` ("lo,hi"), or the coefficients' default band when empty."""
    if text:
        lo, hi = (float(x) for x in text.split(","))
        return lo, hi
    return default_band(coefficients)


class DiagnosticsWriter:
    """Rank 0 appends records to diagnostics.jsonl and mirrors numbers to TensorBoard."""

    def __init__(self, path: Path, tb_writer, enabled: bool, histograms: bool):
        self.path, self.tb, self.enabled, self.histograms = path, tb_writer, enabled, histograms
        self._file = open(path, "a", buffering=1) if enabled else None  # noqa: SIM115 (closed in close())

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        append_record(self._file, json.dumps(jsonable(record)), record["step"])
        with log_writes("the TensorBoard events file", record["step"]):
            self._mirror(record)

    def _mirror(self, record: dict) -> None:
        """The record's numbers as TensorBoard scalars (and histograms)."""
        step, kind = record["step"], record["kind"]
        for group in ("layers", "matrices", "groups"):
            for name, values in record.get(group, {}).items():
                items = values.items() if isinstance(values, dict) else [("value", values)]
                for key, value in items:
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.tb.add_scalar(f"diag_{kind}/{name}/{key}", value, step)
                    elif isinstance(value, list) and "sv_rel" in key:
                        for level, q in zip(record.get("levels", ()), value):
                            self.tb.add_scalar(f"diag_{kind}/{name}/{key}_q{level:g}", q, step)
        if "embed_scale" in record:
            self.tb.add_scalar("diag_norm/embed_scale", record["embed_scale"], step)
        if kind == RecordKind.TAIL_TOKENS:
            for index, loss in enumerate(record["bucket_loss"]):
                if loss is not None:
                    self.tb.add_scalar(f"diag_tail_tokens/bucket_{index}", loss, step)
        if kind == RecordKind.SPECTRAL_NORM and self.histograms and record["matrices"]:
            self.tb.add_histogram(
                "diag_spectral_norm/all_matrices", torch.tensor(list(record["matrices"].values())), step
            )

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        if self.enabled and self.histograms:
            with log_writes("the TensorBoard events file", step):
                self.tb.add_histogram(tag, values.detach().float().flatten().cpu(), step)

    def close(self) -> None:
        """Close diagnostics.jsonl: its last buffered bytes refused by the disk are one line
        (``write_failure``), never a traceback."""
        if self._file is not None:
            file, self._file = self._file, None
            close_log(file)


class Diagnostics:
    """What the trainer calls: ``due(step)``, then ``after_optimizer_step`` (before the
    gradients are cleared) and ``after_step``; ``tail_tokens`` after each evaluation."""

    def __init__(
        self,
        cfg,
        model: nn.Module,
        optimizers,
        probe_inputs: torch.Tensor,
        writer: DiagnosticsWriter,
        rank: int,
        world_size: int,
        tail: TailTokenBuckets | None = None,
    ):
        self.cfg, self.model, self.optimizers = cfg, model, optimizers
        self.tail = tail  # evaluation loss by token frequency (None: diagnostics.tail_buckets = 0)
        self.probe_inputs, self.writer = probe_inputs, writer
        self.rank, self.world_size = rank, world_size
        self.spectral = SpectralNormTracker(cfg.power_iterations)
        self.norm_layers = {name: m for name, m in model.named_modules() if isinstance(m, NormLayer)}
        self.seconds = 0.0  # total time spent collecting, all kinds
        self._before: dict[str, torch.Tensor] | None = None  # block matrices before a diagnosed step
        self._snapshot_seconds = 0.0

    def due(self, step: int) -> bool:
        return bool(self.cfg.interval) and step % self.cfg.interval == 0

    def _timed_write(self, record: dict, started: float) -> None:
        record["seconds"] = time.perf_counter() - started
        self.seconds += record["seconds"]
        self.writer.write(record)

    # -- norm layers ----------------------------------------------------------------

    @torch.no_grad()
    def norm_layer_record(self, step: int) -> dict:
        """Forward the probe batch with hooks on every norm layer (eval mode: derf_ema's
        running scale is not touched, so training is unchanged)."""
        stats: dict[str, dict] = {}
        preacts: dict[str, torch.Tensor] = {}

        def hook(name):
            def capture(module, args, output):
                stats[name], z = norm_layer_stats(module, args[0])
                if z is not None:
                    preacts[name] = z

            return capture

        handles = [m.register_forward_hook(hook(n)) for n, m in self.norm_layers.items()]
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(self.probe_inputs)
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)
        for name, z in preacts.items():
            self.writer.histogram(f"diag_norm/{name}/preactivation", z, step)
        record = {"step": step, "kind": RecordKind.NORM, "layers": stats}
        scale = getattr(self.model, "embed_scale", None)
        if scale is not None:  # a collective on sharded models: every rank calls this
            record["embed_scale"] = float(full_matrix(scale).detach())
        return record

    # -- weights --------------------------------------------------------------------

    def spectral_norm_record(self, step: int) -> dict:
        matrices = []
        for name, p in self.model.named_parameters():
            if p.ndim == 2:
                matrices.append((name, p))
            elif p.ndim == 3:  # an expert stack: gathered whole (a collective, same order on every rank)
                stack = full_matrix(p.detach())
                matrices += [(f"{name}.{e}", stack[e]) for e in range(stack.shape[0])]
        return {
            "step": step,
            "kind": RecordKind.SPECTRAL_NORM,
            "experts": "per expert (<stack>.<e>)",
            "matrices": self.spectral(matrices),
        }

    # -- Newton-Schulz --------------------------------------------------------------

    def _ns_inputs(self):
        """(name, group, U, m) for every Muon-family matrix the step just updated: U the
        matrix NS received (``Muon.ns_input``) and m the momentum buffer, or None when U
        is the buffer itself (no Nesterov)."""
        name_of = {id(p): name for name, p in self.model.named_parameters()}
        for optimizer in self.optimizers.reporting(RecordKind.NS_SPECTRUM):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.ndim not in (2, 3):
                        continue
                    U = optimizer.ns_input(p)
                    if U is None:
                        continue
                    yield name_of[id(p)], group, U, optimizer.momentum_buffer(p) if group["nesterov"] else None

    @torch.no_grad()
    def ns_spectrum_record(self, step: int) -> dict | None:
        """Gather each matrix (all ranks, in the same order), analyse matrix i on rank
        i % world_size, collect the records on every rank. With Nesterov the momentum
        buffer is gathered and analysed too (its quantiles differ from the NS input's);
        without, the NS input is the buffer and its quantiles are reused."""
        todo = list(self._ns_inputs())
        if not todo:
            return None
        mine: dict[str, dict] = {}
        coefficients = None
        band = None
        names: list[str] = []
        for name, group, U, buf in todo:
            full, momentum = full_matrix(U), None if buf is None else full_matrix(buf)
            coefficients = group["ns_coefficients"]
            band = parse_band(self.cfg.ns_band, coefficients)
            # an expert stack (E, rows, cols) is E matrices, named <stack>.<expert>
            parts = (
                [(name, full, momentum)]
                if full.ndim == 2
                else [(f"{name}.{e}", full[e], None if momentum is None else momentum[e]) for e in range(full.shape[0])]
            )
            # a matrix orthogonalised per head: its head blocks are what NS receives
            layout = group.get("head_blocks")
            for part_name, part, part_momentum in parts:
                if len(names) % self.world_size == self.rank:
                    blocks = split_heads(part.float(), layout)
                    momentum_blocks = None if part_momentum is None else split_heads(part_momentum.float(), layout)
                    record = ns_spectrum_record(
                        blocks, group["ns_steps"], coefficients, QUANTILE_LEVELS, band, momentum=momentum_blocks
                    )
                    mine[part_name] = {
                        "layer": block_index(name),
                        **record,
                        **({} if layout is None else {"head_blocks": list(layout)}),
                    }
                names.append(part_name)
        if self.world_size > 1:
            mine = {k: v for part in collectives.all_gather_object(mine) for k, v in part.items()}
        ordered = {name: mine[name] for name in names}
        return {
            "step": step,
            "kind": RecordKind.NS_SPECTRUM,
            "experts": "per expert (<stack>.<e>)",
            "coefficients": coefficients if isinstance(coefficients, str) else "custom",
            "levels": list(QUANTILE_LEVELS),
            "band": list(band),
            "matrices": ordered,
        }

    # -- isotropy of updates and weights --------------------------------------------

    def _block_matrices(self) -> list[tuple[str, torch.Tensor]]:
        return [
            (n, p)
            for n, p in self.model.named_parameters()
            if p.ndim in (2, 3) and block_index(n) is not None and "router" not in n.split(".")
        ]

    @torch.no_grad()
    def _snapshot_block_matrices(self) -> None:
        """Copy this rank's shard of every block matrix: one more copy of those weights,
        held from just before the step until the record is written."""
        started = time.perf_counter()
        self._before = {name: p.detach().clone() for name, p in self._block_matrices()}
        self._snapshot_seconds = time.perf_counter() - started

    @torch.no_grad()
    def isotropy_record(self, step: int) -> dict | None:
        """Update Delta W = W - (the snapshot) and weight W of every block matrix, both
        gathered on all ranks in the same order, matrix i analysed on rank i % world_size,
        the per-matrix results collected on every rank; then the means per type and group."""
        before, self._before = self._before, None
        if not before:
            return None
        todo = self._block_matrices()
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
            if index % self.world_size == self.rank:
                for part_name, part_update, part_weight in parts:
                    layer, mtype, group = isotropy_cell(part_name, n_layers)
                    mine[part_name] = {
                        "layer": layer,
                        "type": mtype,
                        "group": group,
                        **{f"update_{k}": v for k, v in isotropy(part_update).items()},
                        **{f"weight_{k}": v for k, v in isotropy(part_weight).items()},
                    }
        if self.world_size > 1:
            mine = {k: v for part in collectives.all_gather_object(mine) for k, v in part.items()}
        ordered = {name: mine[name] for name in names}
        cells = {name: f"{r['type']}/{r['group']}" for name, r in ordered.items()}
        return {
            "step": step,
            "kind": RecordKind.ISOTROPY,
            "measure": "energy",
            "groups": cell_means(ordered, cells, ISOTROPY_FIELDS),
            "matrices": ordered,
        }

    # -- what the trainer calls -----------------------------------------------------

    def before_optimizer_step(self) -> None:
        """On a diagnosed step, just before ``optimizer.step()``: keep what the isotropy
        record needs to measure the update the step applies."""
        if self.cfg.isotropy:
            self._snapshot_block_matrices()

    def after_optimizer_step(self, step: int) -> None:
        if self.cfg.ns_spectrum:
            started = time.perf_counter()
            record = self.ns_spectrum_record(step)
            if record is not None:
                self._timed_write(record, started)
        if self.cfg.isotropy:
            started = time.perf_counter()
            record = self.isotropy_record(step)
            if record is not None:  # the snapshot's time counts too
                self._timed_write(record, started - self._snapshot_seconds)

    def after_step(self, step: int) -> None:
        started = time.perf_counter()
        self._timed_write(self.norm_layer_record(step), started)
        started = time.perf_counter()
        self._timed_write(self.spectral_norm_record(step), started)

    def tail_tokens(self, step: int, sums: torch.Tensor) -> None:
        """Write one evaluation's loss by frequency bucket (``sums`` all-reduced over ranks)."""
        started = time.perf_counter()
        self._timed_write(self.tail.record(step, sums), started)

    def run_record(self, record: dict) -> None:
        self.writer.write({"step": 0, "kind": RecordKind.RUN, **record})
