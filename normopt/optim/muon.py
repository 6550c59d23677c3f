"""Muon and NorMuon for 2-D weight matrices and 3-D stacks of them (MoE experts stored as
(experts, rows, cols)), plain, FSDP2-sharded (DTensor Shard(0)) or HSDP (Replicate(), Shard(0) on
a 2-D mesh). The update's formulas, and the pure functions that compute them, are
:mod:`normopt.optim.muon_update`.

Distribution: the elementwise parts (momentum, Nesterov, weight decay, the update) run on
each rank's local shard; NS (and NorMuon's row statistics, which need the whole row and
the whole matrix norm) run on whole matrices through
``normopt.parallel.distributed_ns.run_row_sharded_jobs``: each matrix (or batch of
same-shape matrices, ``ns_batch_size``) has one owner rank, or a team of ranks splitting it
in row blocks (``ns_row_blocks``), in ``ns_mode="distributed"``; every rank computes every
matrix in ``"replicated"``. The exchange runs in buckets whose collectives overlap NS, and
each bucket's update is applied as it arrives. Results equal single-process Muon (with the
same ``ns_batch_size`` and ``ns_row_blocks``) bit for bit, since the owner sees the exact
matrix and batches and blocks do not depend on the ranks. Under HSDP the exchange runs
within each replica's shard group (``normopt.parallel.row_shards``): replicas hold the same
shards and, after FSDP's reduction, the same gradients, so every replica group computes the
same jobs and applies the same update bit for bit.

State (per parameter, same keys on every rank, DTensor Shard(0) like the parameter when
the parameter is a DTensor): ``momentum_buffer`` (rows, cols); NorMuon adds
``row_second_moment`` (rows,). Code outside the optimizer (diagnostics) reads the matrix
NS received and the momentum through ``ns_input`` and ``momentum_buffer``, not the keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from normopt.dtypes import dtype_name
from normopt.optim.head_blocks import HeadBlocks, block_shape, check_head_blocks
from normopt.optim.muon_update import (
    apply_update_,
    is_real_number,
    matrix_dims,
    momentum_update_,
    nesterov_direction,
    normuon_normalize,
    ns_matrices,
    orthogonalize,
    resolve_ns_dtype,
    update_scale,
    validate_muon_group,
)
from normopt.optim.newton_schulz import CoefficientSpec, ns_flops
from normopt.optim.ns_batches import batch_by_shape, stack_batch, unstack_batch
from normopt.parallel.distributed_ns import NS_MODES, ExchangeStats, RowShardedJob, run_row_sharded_jobs
from normopt.parallel.ns_plan import DEFAULT_BUCKET_MB, ns_cost
from normopt.parallel.row_shards import RowShards, row_shards_of

# ------------------------------------------------------------------- the optimizers


def _ns_job_cost(shape: Sequence[int], layout: HeadBlocks | None) -> float:
    """Relative NS cost of one parameter (``ns_cost`` of each matrix NS runs on), for the
    owners' load balance."""
    count, rows, cols = ns_matrices(shape, layout)
    return count * ns_cost(rows, cols)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: a DTensor's local shard (an alias under no_grad), or t."""
    return t.to_local() if isinstance(t, DTensor) else t


def _row_mesh(p: torch.Tensor) -> RowShards | None:
    """The ranks p's rows are sharded over (FSDP2: every rank; HSDP: p's shard group), or
    None for a plain tensor."""
    try:
        return row_shards_of(p)
    except ValueError as exc:
        raise ValueError(f"Muon supports plain tensors or FSDP2/HSDP DTensors: {exc}") from None


@dataclass
class _Pending:
    """A parameter whose momentum this step has updated, waiting for its NS."""

    p: torch.Tensor
    state: dict
    grad: torch.Tensor
    buf: torch.Tensor
    beta: float
    nesterov: bool
    mesh: Any

    def direction(self) -> torch.Tensor:
        """This rank's rows of U (``nesterov_direction``), built when its bucket is sent."""
        return nesterov_direction(self.buf, self.grad, self.beta, self.nesterov)


class Muon(torch.optim.Optimizer):
    """Muon: momentum, Newton-Schulz orthogonalization, scaled update (see module doc).

    Args:
        params: 2-D matrices (plain tensors or FSDP2 DTensors) or param groups; every
            hyperparameter below can be overridden per group.
        lr: learning rate.
        momentum: beta in m <- beta * m + g.
        nesterov: feed g + beta * m (True) or m (False) to NS.
        weight_decay: decoupled: W <- W * (1 - lr * weight_decay).
        ns_steps: Newton-Schulz iterations (per group; see ``ns_rules.ns_steps_param_groups``).
        ns_coefficients: 'quintic' | 'polar_express' | (a, b, c) | list of triples.
        ns_algorithm: 'standard' | 'gram' (``newton_schulz``: the same polynomial, computed
            as the matrix iteration or in Gram form; 'gram' needs ns_row_blocks=1).
        scale_rule: 'original' | 'match_adamw' | 'spectral' (see ``update_scale``).
        ns_mode: 'distributed' (each matrix orthogonalized once, by its owner rank) or
            'replicated' (every rank orthogonalizes every matrix). Optimizer-wide, not
            saved in the state dict: it changes the cost, not the result.
        ns_dtype: NS compute dtype (bf16 default); matrices travel in this dtype.
        ns_batch_size: same-shape matrices of a param group orthogonalized together in
            one batched NS, at most this many (1: one at a time). Batches depend on the
            parameter order only, so results do not depend on the rank count.
        ns_row_blocks: NS of every matrix computed in this many row blocks, shared by a
            team of min(blocks, ranks) ranks (``normopt.parallel.row_block_team``).
        ns_bucket_mb: MiB of whole matrices per exchange bucket (0: one bucket).
        ns_overlap: overlap each bucket's collectives with the NS of its neighbours.
        ns_mode, ns_bucket_mb and ns_overlap change where and when NS runs, never its bits;
        ns_batch_size and ns_row_blocks may change the last bits (different kernels).

    Param-group option (no default; absent = whole matrices): ``head_blocks`` = (axis, H)
    with axis 'rows' or 'cols', every matrix of the group orthogonalised as H head blocks
    (module doc, ``normopt.optim.head_blocks``).
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients: CoefficientSpec = "quintic",
        scale_rule: str = "match_adamw",
        ns_mode: str = "distributed",
        ns_dtype: torch.dtype | str = torch.bfloat16,
        ns_algorithm: str = "standard",
        **execution: Any,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            scale_rule=scale_rule,
            ns_dtype=ns_dtype,
            ns_algorithm=ns_algorithm,
        )
        self._setup(params, defaults, ns_mode, **execution)

    def _setup(
        self,
        params,
        defaults: dict[str, Any],
        ns_mode: str,
        ns_batch_size: int = 1,
        ns_row_blocks: int = 1,
        ns_bucket_mb: float = DEFAULT_BUCKET_MB,
        ns_overlap: bool = True,
    ) -> None:
        """Shared constructor body: validate the optimizer-wide NS options, then register
        the param groups."""
        if ns_mode not in NS_MODES:
            raise ValueError(f"ns_mode must be one of {NS_MODES}, got {ns_mode!r}")
        batch_by_shape([], ns_batch_size)  # raises ValueError naming ns_batch_size
        if not isinstance(ns_row_blocks, int) or isinstance(ns_row_blocks, bool) or ns_row_blocks < 1:
            raise ValueError(f"ns_row_blocks must be an integer >= 1, got {ns_row_blocks!r}")
        if not is_real_number(ns_bucket_mb) or float(ns_bucket_mb) < 0.0:
            raise ValueError(f"ns_bucket_mb must be a number >= 0, got {ns_bucket_mb!r}")
        self.ns_mode, self.ns_batch_size, self.ns_row_blocks = ns_mode, ns_batch_size, ns_row_blocks
        self.ns_bucket_mb, self.ns_overlap = float(ns_bucket_mb), bool(ns_overlap)
        # Timings and bytes of the last step's whole-matrix work (benchmarks, diagnostics).
        self.last_step_stats: ExchangeStats | None = None
        # NS FLOPs this process has computed since the counter was last reset (its share of
        # a row-block team's), and an optional timer of every NS computation (anything with
        # a ``section()`` context manager, e.g. metrics.device_stats.SectionTimer)
        self.ns_flops_computed = 0.0
        self.ns_timer = None
        torch.optim.Optimizer.__init__(self, params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate hyperparameters and shapes before registering the group."""
        validate_muon_group({**self.defaults, **param_group})
        if self.ns_row_blocks > 1 and {**self.defaults, **param_group}["ns_algorithm"] == "gram":
            raise ValueError(
                "ns_algorithm 'gram' runs each matrix on one process: it needs ns_row_blocks=1, "
                f"got {self.ns_row_blocks}"
            )
        params = param_group["params"]
        # Materialize once: a generator would be exhausted by the shape check below.
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        layout = {**self.defaults, **param_group}.get("head_blocks")
        for p in params:
            matrix_dims(p.shape)
            check_head_blocks(layout, p.shape)
        param_group = {**param_group, "params": params}
        if isinstance(param_group.get("ns_dtype"), torch.dtype):
            param_group["ns_dtype"] = dtype_name(param_group["ns_dtype"])
        super().add_param_group(param_group)
        if isinstance(self.param_groups[-1]["ns_dtype"], torch.dtype):
            # defaults given as a torch.dtype: store the name, which serializes anywhere.
            self.param_groups[-1]["ns_dtype"] = dtype_name(self.param_groups[-1]["ns_dtype"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Loading a state dict: param groups saved before ``ns_algorithm`` existed ran the
        standard iteration (torch's pattern for a hyperparameter added later)."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("ns_algorithm", "standard")

    # -- hooks a subclass overrides ------------------------------------------------

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _make_job(self, batch: list[_Pending], group: dict) -> RowShardedJob:
        """Whole-matrix work for a batch of same-shape parameters: O = NS(U), stacked along
        a new leading dim when the batch holds more than one matrix (a stack's matrices are
        batched already)."""
        p0 = batch[0].p
        ns_dtype = resolve_ns_dtype(group["ns_dtype"])
        steps, coeffs, layout = group["ns_steps"], group["ns_coefficients"], group.get("head_blocks")
        algorithm = group["ns_algorithm"]

        def compute(full: list[torch.Tensor], team) -> list[torch.Tensor]:
            O = orthogonalize(stack_batch(full), steps, coeffs, ns_dtype, team, layout, algorithm)
            return unstack_batch(O, len(full))

        # Cast before shipping: NS starts with this cast anyway, so the result is the
        # same and the all_to_all carries bf16 instead of fp32.
        return RowShardedJob(
            inputs=lambda: [item.direction().to(ns_dtype) for item in batch],
            rows=p0.shape[0],
            compute=self._counted(compute, p0, len(batch), group),
            output_specs=[(tuple(p0.shape[1:]), ns_dtype)] * len(batch),
            input_specs=[(tuple(p0.shape[1:]), ns_dtype)] * len(batch),
            cost=len(batch) * _ns_job_cost(p0.shape, layout),
            mesh=batch[0].mesh,
        )

    def _counted(self, compute, p0: torch.Tensor, count: int, group: dict):
        """``compute`` of a job of ``count`` parameters shaped like p0, adding the NS FLOPs it
        runs here to ``ns_flops_computed`` and timing it with ``ns_timer`` when set (the time
        then includes a row-block team's all-gathers)."""
        matrices, rows, cols = ns_matrices(p0.shape, group.get("head_blocks"))
        flops = (
            count
            * matrices
            * ns_flops(rows, cols, int(group["ns_steps"]), group["ns_algorithm"], group["ns_coefficients"])
        )

        def run(full: list[torch.Tensor], team) -> list[torch.Tensor]:
            self.ns_flops_computed += flops * (1.0 if team is None else team.share(min(rows, cols)))
            if self.ns_timer is None:
                return compute(full, team)
            with self.ns_timer.section():
                return compute(full, team)

        return run

    def _finish(self, p: torch.Tensor, outputs: list[torch.Tensor], state: dict, group: dict) -> None:
        """Apply this rank's rows of the job outputs to its shard of p."""
        rows, cols = block_shape(*matrix_dims(p.shape), group.get("head_blocks"))
        scale = update_scale(rows, cols, group["scale_rule"])
        apply_update_(_local(p), outputs[0], float(group["lr"]), float(group["weight_decay"]), scale)

    # -- what diagnostics read --------------------------------------------------------

    def momentum_buffer(self, p: torch.Tensor) -> torch.Tensor | None:
        """p's momentum m as the last step left it (a DTensor when p is one), or None
        before p's first step."""
        state = self.state.get(p)
        return state["momentum_buffer"] if state else None

    def ns_input(self, p: torch.Tensor) -> torch.Tensor | None:
        """The matrix the last step orthogonalized for p, before the cast to the NS dtype.

        U = g + beta * m with Nesterov, else m itself (``nesterov_direction``), built from
        p.grad and the momentum the step just updated, so it is only meaningful between
        ``step`` and ``zero_grad``. A DTensor when p is one (whole-tensor arithmetic, the
        same numbers the step computed on each shard). None if p has no gradient or has
        not been stepped yet.
        """
        buf = self.momentum_buffer(p)
        if p.grad is None or buf is None:
            return None
        group = self._group_of(p)
        return nesterov_direction(buf, p.grad, float(group["momentum"]), bool(group["nesterov"]))

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter is not managed by this optimizer")

    def ns_flops_per_step(self) -> float:
        """Newton-Schulz FLOPs of one step over every matrix NS runs on (``ns_matrices``:
        each expert of a stack, each head block; see ``ns_flops``: exact per matrix, step
        count, coefficients and algorithm), whichever rank runs them."""
        total = 0.0
        for group in self.param_groups:
            for p in group["params"]:
                count, rows, cols = ns_matrices(p.shape, group.get("head_blocks"))
                total += count * ns_flops(
                    rows, cols, int(group["ns_steps"]), group["ns_algorithm"], group["ns_coefficients"]
                )
        return total

    # -- the step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter that has a gradient.

        Elementwise math runs on local shards; all whole-matrix work of the step goes
        through one ``run_row_sharded_jobs`` call, which applies each job's update
        (``_finish``) as soon as its rows arrive.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo: list[tuple[list[_Pending], dict]] = []
        jobs: list[RowShardedJob] = []
        for group in self.param_groups:
            beta, nesterov = float(group["momentum"]), bool(group["nesterov"])
            pending: list[_Pending] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                grad = _local(p.grad)
                buf = momentum_update_(_local(state["momentum_buffer"]), grad, beta)
                pending.append(_Pending(p, state, grad, buf, beta, nesterov, _row_mesh(p)))
            for idx in batch_by_shape([(tuple(it.p.shape), it.mesh) for it in pending], self.ns_batch_size):
                batch = [pending[i] for i in idx]
                jobs.append(self._make_job(batch, group))
                todo.append((batch, group))

        def apply(j: int, outputs: list[torch.Tensor]) -> None:
            batch, group = todo[j]
            n = len(batch)  # outputs: kind 0 of every matrix, then kind 1, ...
            for i, item in enumerate(batch):
                self._finish(item.p, outputs[i::n], item.state, group)

        _, self.last_step_stats = run_row_sharded_jobs(
            jobs,
            self.ns_mode,
            row_blocks=self.ns_row_blocks,
            bucket_mb=self.ns_bucket_mb,
            overlap=self.ns_overlap,
            on_result=apply,
        )
        return loss


class NorMuon(Muon):
    """Muon with NorMuon's per-neuron (per-row = per output feature) second moment.

    After NS, each row of O is divided by the root of an EMA of its mean square and the
    result is rescaled to ||O||_F (``normuon_normalize``); then the Muon update follows.
    The row statistics need whole rows and the whole-matrix norm, so they run on the
    matrix owner together with NS, which makes distributed NorMuon exact.

    Extra args: beta2 (EMA decay of v), eps (added to sqrt(v)). State adds
    ``row_second_moment`` of shape (rows,) ((E, rows) for a stack), a Shard(0) DTensor for
    sharded params.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients: CoefficientSpec = "quintic",
        scale_rule: str = "match_adamw",
        ns_mode: str = "distributed",
        ns_dtype: torch.dtype | str = torch.bfloat16,
        beta2: float = 0.95,
        eps: float = 1e-8,
        ns_algorithm: str = "standard",
        **execution: Any,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            scale_rule=scale_rule,
            ns_dtype=ns_dtype,
            ns_algorithm=ns_algorithm,
            beta2=beta2,
            eps=eps,
        )
        self._setup(params, defaults, ns_mode, **execution)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        super()._init_state(p, state)
        matrix_dims(p.shape)
        local = torch.zeros(_local(p).shape[:-1], dtype=p.dtype, device=_local(p).device)
        if isinstance(p, DTensor):
            # Rows (experts of a stack) are sharded exactly like the parameter's (its
            # placements: Shard(0), replicated over HSDP's replicas), so each rank keeps
            # (and checkpoints) the statistics of the rows it holds.
            shape = torch.Size(p.shape[:-1])
            state["row_second_moment"] = DTensor.from_local(
                local,
                p.device_mesh,
                p.placements,
                shape=shape,
                stride=torch.empty(shape, device="meta").stride(),
                run_check=False,
            )
        else:
            state["row_second_moment"] = local

    def _make_job(self, batch: list[_Pending], group: dict) -> RowShardedJob:
        """Whole-matrix work: O = NS(U), then the row normalization and the new v (per
        matrix of the batch). Inputs: every U, then every v; outputs: every O_hat, then
        every v_new."""
        p0 = batch[0].p
        ns_dtype = resolve_ns_dtype(group["ns_dtype"])
        steps, coeffs, layout = group["ns_steps"], group["ns_coefficients"], group.get("head_blocks")
        algorithm = group["ns_algorithm"]
        beta2, eps = float(group["beta2"]), float(group["eps"])
        update_dtype, n = p0.dtype, len(batch)
        v_dtype = _local(batch[0].state["row_second_moment"]).dtype

        def compute(full: list[torch.Tensor], team) -> list[torch.Tensor]:
            O = orthogonalize(stack_batch(full[:n]), steps, coeffs, ns_dtype, team, layout, algorithm).to(update_dtype)
            O_hat, v_new = normuon_normalize(O, stack_batch(full[n:]), beta2, eps)
            return unstack_batch(O_hat, n) + unstack_batch(v_new, n)

        def inputs() -> list[torch.Tensor]:
            return [item.direction().to(ns_dtype) for item in batch] + [
                _local(item.state["row_second_moment"]) for item in batch
            ]

        out_specs = [(tuple(p0.shape[1:]), update_dtype)] * n + [(tuple(p0.shape[1:-1]), v_dtype)] * n
        return RowShardedJob(
            inputs=inputs,
            rows=p0.shape[0],
            compute=self._counted(compute, p0, n, group),
            output_specs=out_specs,
            input_specs=[(tuple(p0.shape[1:]), ns_dtype)] * n + [(tuple(p0.shape[1:-1]), v_dtype)] * n,
            cost=n * _ns_job_cost(p0.shape, layout),
            mesh=batch[0].mesh,
        )

    def _finish(self, p: torch.Tensor, outputs: list[torch.Tensor], state: dict, group: dict) -> None:
        _local(state["row_second_moment"]).copy_(outputs[1])
        super()._finish(p, outputs[:1], state, group)
