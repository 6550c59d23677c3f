"""Collect a run's diagnostics every K steps into ``diagnostics.jsonl`` and TensorBoard.

The collector runs the diagnostics of the registry (diagnostics/registry.py) that the
config enables, each in its phase of a diagnosed step (``Diagnostic.when``); it names none
of them. One JSON object per line, each with ``step`` and ``kind``; the built-in kinds:

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

A plugin's diagnostic writes records of its own kind the same way.

Every record also carries ``seconds``: the wall time its collection took, so the cost
share of diagnostics can be read off any run (``benchmarks/bench_diagnostics.py``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from normopt.diagnostics.diagnostic import EVALUATION, OPTIMIZER_STEP, STEP, Diagnostic, DiagnosticRun
from normopt.diagnostics.registry import DIAGNOSTICS
from normopt.diagnostics.tail_tokens import TailTokenBuckets
from normopt.metrics.jsonl import append_record, close_log, log_writes
from normopt.metrics.logger import jsonable
from normopt.run_dir import RecordKind


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
        """The record's numbers as TensorBoard scalars (and histograms): every number under
        ``layers``, ``matrices`` and ``groups``, then what its diagnostic adds."""
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
        if kind in DIAGNOSTICS:
            DIAGNOSTICS[kind].mirror(record, self.tb, self.histograms)

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
    """What the trainer calls: ``due(step)``, then ``before_optimizer_step`` and
    ``after_optimizer_step`` (before the gradients are cleared) and ``after_step``;
    ``tail_tokens`` after each evaluation. Each runs the enabled diagnostics of that phase."""

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
        self.cfg, self.writer = cfg, writer
        self.tail = tail  # evaluation loss by token frequency (None: diagnostics.tail_buckets = 0)
        histogram = getattr(writer, "histogram", lambda tag, values, step: None)
        run = DiagnosticRun(cfg, model, optimizers, probe_inputs, rank, world_size, histogram, tail)
        # every registered diagnostic the config enables, in registry order
        self.collectors: dict[str, Diagnostic] = {
            name: cls(run) for name, cls in DIAGNOSTICS.items() if cls.enabled(cfg)
        }
        self.seconds = 0.0  # total time spent collecting, all kinds
        self._before_seconds: dict[str, float] = {}

    def _due(self, diagnostic: Diagnostic, step: int, final: bool) -> bool:
        """Every ``interval`` steps (its own, or diagnostics.interval; 0 = never), and on the
        run's last step."""
        every = diagnostic.interval(self.cfg)
        return bool(every) and (step % every == 0 or final)

    def due(self, step: int, final: bool = False) -> bool:
        """Whether any step diagnostic runs at ``step`` (``final``: the run's last step)."""
        return any(self._due(d, step, final) for d in self.collectors.values() if d.when != EVALUATION)

    def _phase(self, when: str, step: int | None = None, final: bool = False) -> list[Diagnostic]:
        """The diagnostics of a phase, those due at ``step`` when given."""
        return [d for d in self.collectors.values() if d.when == when and (step is None or self._due(d, step, final))]

    def _collect(self, diagnostic: Diagnostic, step: int, **inputs) -> None:
        """Collect and write one record; its ``seconds`` include the diagnostic's preparation
        before the optimizer step."""
        started = time.perf_counter() - self._before_seconds.pop(diagnostic.name, 0.0)
        fields = diagnostic.collect(step, **inputs)
        if fields is None:
            return
        record = {"step": step, "kind": diagnostic.name, **fields}
        record["seconds"] = time.perf_counter() - started
        self.seconds += record["seconds"]
        self.writer.write(record)

    def before_optimizer_step(self, step: int, final: bool = False) -> None:
        """Just before the ``optimizer.step()`` that makes ``step`` (the isotropy record keeps
        what it needs to measure the update the step applies)."""
        for diagnostic in self._phase(OPTIMIZER_STEP, step, final):
            self._before_seconds[diagnostic.name] = diagnostic.before_optimizer_step()

    def after_optimizer_step(self, step: int, final: bool = False) -> None:
        for diagnostic in self._phase(OPTIMIZER_STEP, step, final):
            self._collect(diagnostic, step)

    def after_step(self, step: int, final: bool = False) -> None:
        for diagnostic in self._phase(STEP, step, final):
            self._collect(diagnostic, step)

    def tail_tokens(self, step: int, sums: torch.Tensor) -> None:
        """After one evaluation: its loss sums by frequency bucket (``sums``, all-reduced
        over ranks) to the evaluation diagnostics."""
        for diagnostic in self._phase(EVALUATION):
            self._collect(diagnostic, step, sums=sums)

    def run_record(self, record: dict) -> None:
        self.writer.write({"step": 0, "kind": RecordKind.RUN, **record})
