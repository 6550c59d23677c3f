"""The training loop: config -> mesh -> data -> model -> FSDP2 -> optimizers -> steps.

Read :meth:`Trainer.fit` top to bottom for the story of one run; everything else here is
setup (``__init__``) and the small pieces the loop calls.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from normopt import progress as run_progress
from normopt.checkpoint.manager import CheckpointWriter, load_checkpoint
from normopt.checkpoint.preemption import StopRequest
from normopt.config import Config, save_config
from normopt.data.batches import TrainBatches, eval_micro_batches
from normopt.data.token_cache import check_enough_data, load_token_data, prepare_corpus
from normopt.diagnostics.collector import Diagnostics, DiagnosticsWriter
from normopt.diagnostics.tail_tokens import TailTokenBuckets
from normopt.dtypes import DTYPES, resolve_dtype
from normopt.errors import UserError
from normopt.memory_budget import available_bytes, check_fits, estimate_memory, memory_advice
from normopt.metrics.cost_summary import COST_KEYS, describe_cost, ns_window_fields, summarize_cost
from normopt.metrics.device_stats import SectionTimer, pop_peak_memory
from normopt.metrics.flops import MfuMeter, peak_flops
from normopt.metrics.jsonl import truncate_after
from normopt.metrics.logger import MetricsLogger
from normopt.models.llama import Transformer, build_model
from normopt.models.presets import count_flops_per_token, count_parameters, resolve_model_args
from normopt.optim.builder import build_optimizers
from normopt.parallel import collectives
from normopt.parallel.distributed import DistInfo, with_data_parallel_layout
from normopt.parallel.fsdp import apply_fsdp
from normopt.parallel.grad_clip import clip_grad_norm_
from normopt.plugins import write_run_plugins
from normopt.resume_policy import find_resume_point
from normopt.run_checks import check_run_dir
from normopt.run_dir import RunDir
from normopt.run_lock import RunLock
from normopt.start_up_log import start_up_lines


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class Preempted(RuntimeError):
    """A stop signal arrived; a checkpoint of the last finished step was saved."""


def on_main_then_share(fn, dist_info: DistInfo):
    """Run ``fn`` on rank 0 only and re-raise its UserError on every rank, so that a
    problem found by rank 0 (say, missing data) ends all ranks instead of hanging them."""
    outcome = None
    if dist_info.is_main:
        try:
            outcome = ("ok", fn())
        except UserError as exc:
            outcome = ("error", str(exc))
    status, value = collectives.broadcast_object(outcome, src=0)
    if status == "error":
        raise UserError(value)
    return value


def on_every_rank_agreed(fn, dist_info: DistInfo):
    """Run ``fn`` on every rank (each may check a share of something) and raise the first
    rank's UserError on all of them, so that a problem one rank found ends every rank."""
    problem, value = None, None
    try:
        value = fn()
    except UserError as exc:
        problem = str(exc)
    problems = collectives.all_gather_object(problem) if dist_info.world_size > 1 else [problem]
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise UserError(first)
    return value


class Trainer:
    _progress = None  # fit's progress bar, once it exists
    _agreed_failure = False  # a UserError that every rank raised at the same point

    def __init__(self, cfg: Config, dist_info: DistInfo, stop_request: StopRequest | None = None):
        self.cfg, self.dist = cfg, dist_info
        self.stop_request = stop_request or StopRequest()
        self.log = print if dist_info.is_main else (lambda *a, **k: None)
        t = cfg.train
        self.micro_batch, self.accum_steps = t.micro_batch_plan(dist_info.world_size)
        # FSDP over every rank, or HSDP's 2-D mesh (a layout that does not fit is a UserError)
        dist_info = self.dist = with_data_parallel_layout(dist_info, *t.mesh_shape(dist_info.world_size))
        self.dtype = resolve_dtype(t.dtype, dist_info.device.type)
        self.run = RunDir(cfg.run.dir)
        self.lock = RunLock(self.run)
        on_main_then_share(self.lock.acquire, dist_info)  # before anything in run.dir is read
        try:
            self._start(cfg, dist_info)
        except BaseException:
            self.lock.release(remove_if_created_and_empty=True)  # a refused start leaves nothing behind
            raise

    def _start(self, cfg: Config, dist_info: DistInfo) -> None:
        """Everything a start does, in order: first every read and check (the run directory,
        the resume point, the data, the memory, the checkpoint), then the first writes."""
        t = cfg.train
        # a run directory that a start would damage is refused before anything is written
        on_main_then_share(lambda: check_run_dir(self.run), dist_info)
        # every piece of the resume point is verified here; a damaged one is refused, never half-used
        self.resume_from = on_every_rank_agreed(
            lambda: find_resume_point(
                self.run, cfg, log=self.log, rank=dist_info.rank, world_size=dist_info.world_size
            ),
            dist_info,
        )

        folder = on_main_then_share(lambda: str(prepare_corpus(cfg.data, log=self.log)), dist_info)
        self.data = load_token_data(Path(folder))
        check_enough_data(self.data, t.seq_len)
        self.batches = TrainBatches(
            self.data,
            t.seq_len,
            t.global_batch_size,
            self.micro_batch,
            dist_info.rank,
            dist_info.world_size,
            t.seed,
            dist_info.device,
        )

        self.model_args = resolve_model_args(cfg.model, vocab_size=self.data.vocab_size)
        self.num_params = count_parameters(self.model_args)
        self.memory = estimate_memory(
            self.num_params,
            cfg.optim.name,
            dist_info.dp_shard,
            self.micro_batch,
            t.seq_len,
            self.data.vocab_size,
            self.model_args,
            DTYPES[self.dtype].itemsize,
            t.activation_checkpointing,
        )
        # rank 0 decides for all (an error raised on one rank alone would hang the others)
        on_main_then_share(self._check_memory, dist_info)
        self.model = self._build_model()
        self.aux_loss_name = self.model.aux_loss_name  # the blocks' auxiliary loss (moe_aux_loss), if any
        self.step_statistics: dict[str, torch.Tensor] = {}  # the model's, summed over the logging window
        self.aux_loss_sum, self.window_steps = 0.0, 0  # over the logging window's steps
        self.flops_per_token = count_flops_per_token(self.model_args, t.seq_len)
        self.optimizers = build_optimizers(self.model, cfg.optim, dist_info.device.type)
        self.ns_flops_per_step = self.optimizers.ns_flops_per_step()
        self.optimizer_timer = SectionTimer(dist_info.device)
        self.ns_timer = SectionTimer(dist_info.device)  # inside the optimizer step: NS alone
        self.optimizers.time_newton_schulz(self.ns_timer)
        self.cost_windows: list[dict] = []  # COST_KEYS of every logging window, for the summary

        self.start_step = 0
        if self.resume_from is not None:
            state = load_checkpoint(self.resume_from, self.model, self.optimizers.optimizers)
            self.start_step = state["step"]

        on_main_then_share(self._prepare_run_dir, dist_info)
        # a finished run re-run (or extended by 0 steps) writes nothing, TensorBoard files included
        self.metrics = MetricsLogger(self.run, enabled=dist_info.is_main and self.start_step < t.steps)
        self.diagnostics = self._build_diagnostics()
        self.checkpointer = CheckpointWriter(
            self.run, dist_info.is_main, cfg.checkpoint.keep_latest_k, cfg.checkpoint.async_save
        )
        self.peak_flops, self.peak_source = peak_flops(
            dist_info.device, DTYPES[self.dtype], probe=t.mfu_probe, peak_tflops=t.peak_tflops
        )
        self.mfu = MfuMeter(self.peak_flops, self.peak_source, self.flops_per_token, dist_info.world_size, self.log)
        self.write_failure: str | None = None  # rank 0's refused log write, until the ranks agree on it
        self._defer_write_failures()

    def _defer_write_failures(self) -> None:
        """With several ranks, a log or diagnostics write the disk refuses (rank 0 alone writes
        them) does not end rank 0 alone, which would leave the others in their next collective:
        it is kept, the rest of the run's writes are skipped, and the ranks agree on it at the
        next step's all-reduce (or the next checkpoint), where all of them stop with status 2 and
        rank 0 prints the refusal's one line."""
        if self.dist.world_size == 1 or not self.dist.is_main:
            return
        for owner, name in (
            (self.metrics, "log"),
            (self.diagnostics.writer, "write"),
            (self.diagnostics.writer, "histogram"),
        ):

            def deferred(*args, _write=getattr(owner, name), **kwargs):  # noqa: B008 - bound per writer
                if self.write_failure is not None:
                    return None
                try:
                    return _write(*args, **kwargs)
                except UserError as exc:
                    self.write_failure = str(exc)
                    return None

            setattr(owner, name, deferred)

    def _raise_write_failure(self) -> None:
        self._agreed_failure = True  # every rank raises it here: the write in flight can be finished
        raise UserError(self.write_failure or "a log write failed on rank 0")

    # ------------------------------------------------------------------ setup pieces

    def _check_memory(self) -> None:
        """Refuse a run above the lower bound; advise (before the model is built) when the
        estimate with activations exceeds the device."""
        available, where = available_bytes(self.dist.device.type, self.dist.device.index)
        check_fits(self.memory, available, where)
        advice = memory_advice(self.memory, available, self.micro_batch, self.cfg.train.activation_checkpointing)
        if advice:
            self.log(advice)

    def _prepare_run_dir(self) -> None:
        """Rank 0: save the resolved config (not over a finished run's: re-running it with
        fewer steps changes nothing) and drop logs past the resume point."""
        run = self.run
        if self.start_step >= self.cfg.train.steps and run.config.exists():
            return  # a finished run: nothing to write
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            self.lock.record_holder()
            if self.start_step < self.cfg.train.steps or not run.config.exists():
                save_config(self.cfg, run.config)
                write_run_plugins(run.path)  # which plugins (and which versions) the run needs
            if self.start_step == 0:
                run.metrics.unlink(missing_ok=True)
                run.diagnostics.unlink(missing_ok=True)
                shutil.rmtree(run.tensorboard, ignore_errors=True)
            else:
                truncate_after(run.metrics, self.start_step)
                truncate_after(run.diagnostics, self.start_step)
        except OSError as exc:
            raise UserError(
                f"run.dir {run}: {exc.strerror or type(exc).__name__}"
                f"{' (' + exc.filename + ')' if exc.filename else ''}"
            ) from None

    def _build_diagnostics(self) -> Diagnostics:
        d, t = self.cfg.diagnostics, self.cfg.train
        tail = (
            TailTokenBuckets(
                self.data.tokens[: self.data.val_start], self.data.vocab_size, d.tail_buckets, self.dist.device
            )
            if d.tail_buckets
            else None
        )
        probe_count = min(d.probe_sequences, self.data.num_sequences(t.seq_len, "val"))
        probe = torch.from_numpy(self.data.sequences(np.arange(probe_count), t.seq_len, "val"))
        writer = DiagnosticsWriter(
            self.run.diagnostics, self.metrics.tensorboard, enabled=self.dist.is_main, histograms=d.histograms
        )
        return Diagnostics(
            d,
            self.model,
            self.optimizers,
            probe[:, :-1].to(self.dist.device),
            writer,
            self.dist.rank,
            self.dist.world_size,
            tail,
        )

    def _build_model(self) -> Transformer:
        """Identical initial weights on every rank and for any world size: on CPU the full
        model is initialised from the seed before sharding; on CUDA it is built on the meta
        device, sharded, then initialised shard by shard."""
        torch.manual_seed(self.cfg.train.seed)
        on_cuda = self.dist.device.type == "cuda"
        model = build_model(self.model_args, "meta" if on_cuda else "cpu")
        for block in model.layers:
            block.activation_checkpointing = self.cfg.train.activation_checkpointing == "block"
            if self.cfg.train.compile:
                block.compile_forward()
        apply_fsdp(model, self.dist.mesh, self.dtype)
        if on_cuda:
            model.to_empty(device=self.dist.device)
            model.init_weights()
        return model

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self._print_header()
        if self.start_step >= t.steps:
            self.log(f"run already complete: {self.start_step} of {t.steps} steps (raise train.steps to continue it)")
            return self._summary(self._last_logged_eval())

        if collectives.any_rank(self.stop_request.requested):  # a stop signal during start-up
            raise Preempted(
                f"stopped by {self.stop_request.signal_name or 'a stop signal on another rank'} before "
                f"the first step (nothing trained since step {self.start_step})"
            )
        tokens_per_step = t.global_batch_size * t.seq_len
        # start-up is over: the loop's collectives wait for a late rank at most the step timeout
        collectives.set_phase_timeout("step")
        progress = self._progress = tqdm(
            total=t.steps,
            initial=self.start_step,
            disable=not self.dist.is_main,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        eval_loss = None
        if self.start_step == 0:
            self.diagnostics.run_record(
                {
                    "n_params": self.num_params,
                    "n_layers": self.model_args.n_layers,
                    "norm": self.model_args.norm,
                    "optim": cfg.optim.name,
                    "steps": t.steps,
                }
            )
            self.diagnostics.after_step(0)
            if t.eval_interval:
                self._evaluate_and_log(0)
        window_start, window_tokens = time.perf_counter(), 0
        for step in range(self.start_step, t.steps):
            done = step + 1
            run_progress.mark("step", done)
            self.optimizers.apply_schedule(cfg.optim, step, t.steps)
            loss, grad_norm, stop, aux_loss = self._train_step(step, final=done == t.steps)
            self.aux_loss_sum, self.window_steps = self.aux_loss_sum + aux_loss, self.window_steps + 1
            window_tokens += tokens_per_step
            progress.update(1)

            if done % t.log_interval == 0 or done == t.steps:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / elapsed
                record = {
                    "step": done,
                    "loss": loss,
                    **self.optimizers.current_lrs(),
                    "grad_norm": grad_norm,
                    "tokens": done * tokens_per_step,
                    "tokens_per_s": tokens_per_s,
                    "epoch": self.batches.epoch_of(done),
                }
                optimizer_s = self.optimizer_timer.pop_seconds()
                window_steps = window_tokens // tokens_per_step
                record["optimizer_step_s"] = optimizer_s / window_steps
                record["optimizer_share"] = optimizer_s / elapsed
                if self.ns_flops_per_step:
                    record.update(
                        ns_window_fields(
                            self.ns_flops_per_step,
                            self.ns_timer.pop_seconds(),
                            self.optimizers.pop_ns_flops_computed(),
                            window_steps,
                            elapsed,
                        )
                    )
                if self.peak_flops:
                    record["mfu"] = self.mfu(tokens_per_s)  # null where the peak is underestimated
                    if self.ns_flops_per_step:
                        record["mfu_with_ns"] = self.mfu(tokens_per_s, self.ns_flops_per_step / tokens_per_step)
                self.cost_windows.append({key: record.get(key) for key in COST_KEYS})
                record.update(pop_peak_memory(self.dist.device))
                record.update(self._step_statistics_window_record())
                self.metrics.log(record)
                progress.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            self.diagnostics.after_step(done, final=done == t.steps)
            if (t.eval_interval and done % t.eval_interval == 0) or done == t.steps:
                eval_loss = self._evaluate_and_log(done)
                if self.dist.is_main:
                    progress.write(f"step {done}: eval_loss {eval_loss:.4f}")
            if (cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0) or done == t.steps or stop:
                # the last checkpoint of a run (or of a preempted job) is written synchronously
                self.save(done, block=done == t.steps or stop)
            if stop and done < t.steps:
                progress.close()
                raise Preempted(
                    f"stopped by {self.stop_request.signal_name or 'a stop signal on another rank'} "
                    f"after step {done}; checkpoint saved in {self.run.checkpoint(done)}"
                )
            if done % t.log_interval == 0 or done == t.steps:
                window_start, window_tokens = time.perf_counter(), 0
        progress.close()
        return self._summary(eval_loss)

    def _train_step(self, step: int, final: bool = False) -> tuple[float, float, bool, float]:
        """Forward/backward over this rank's micro-batches, clip, step. Returns the global
        mean loss (cross-entropy) of the step's batch, the gradient norm, whether any rank
        was asked to stop and the MoE balance loss (0 without MoE; all four identical on
        every rank). The balance loss is added to the loss that is differentiated. On a
        diagnosed step (``final``: the run's last, when every diagnostic is due), the
        diagnostics of the optimizer step (the matrices the step handed to Newton-Schulz, the
        update it applied) run before the gradients are cleared."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.dist.device)
        aux_sum = torch.zeros((), device=self.dist.device)
        micro_batches = list(self.batches.micro_batches(step))
        for index, (inputs, targets) in enumerate(micro_batches):
            # gradients are reduced across ranks once, after the last micro-batch
            self.model.set_requires_gradient_sync(index == len(micro_batches) - 1)
            if self.aux_loss_name:
                logits, aux = self.model(inputs, with_aux=True)
                aux = aux / self.accum_steps
                aux_sum += aux.detach()
            else:
                logits, aux = self.model(inputs), None
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / self.accum_steps
            (loss if aux is None else loss + aux).backward()
            loss_sum += loss.detach()
        grad_norm = float(clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip))
        # one collective carries the loss and the stop request, before any weight changes:
        # a non-finite loss or gradient norm (both identical on every rank) stops the run
        # here, so no checkpoint ever holds the weights of a bad update
        flags = torch.tensor(
            [float(self.stop_request.requested), float(self.write_failure is not None)], device=loss_sum.device
        )
        shared = torch.cat([loss_sum.float().view(1), flags[:1], aux_sum.float().view(1), flags[1:]])
        collectives.all_reduce_sum(shared)
        if shared[3] > 0:  # a log write refused on rank 0 at the step before: every rank stops here
            self._raise_write_failure()
        loss = float(shared[0]) / self.dist.world_size
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainingDiverged(
                f"at step {step + 1} the loss is {loss} and the gradient norm {grad_norm}; "
                f"stopping before the update (last checkpoint kept untouched)"
            )
        diagnose = self.diagnostics.due(step + 1, final)  # every diagnostic is due on the last step
        if diagnose:
            self.diagnostics.before_optimizer_step(step + 1, final)  # the update is measured against these weights
        with self.optimizer_timer.section():
            self.optimizers.step()
        if diagnose:
            self.diagnostics.after_optimizer_step(step + 1, final)
        self.optimizers.zero_grad()
        for key, value in self.model.end_optimizer_step().items():  # kept on the device until logged
            self.step_statistics[key] = value + self.step_statistics[key] if key in self.step_statistics else value
        return loss, grad_norm, bool(shared[1] > 0), float(shared[2]) / self.dist.world_size

    def _step_statistics_window_record(self) -> dict:
        """The logging window's numbers from the model (the model protocol, models/llama.py):
        the mean auxiliary loss per step (``moe_aux_loss``), then the step statistics (per MoE
        layer: tokens routed to each expert, load entropy and max/mean load); then a new window."""
        record = {self.aux_loss_name: self.aux_loss_sum / max(1, self.window_steps)} if self.aux_loss_name else {}
        if self.step_statistics:
            record.update(self.model.step_statistics_record(self.step_statistics))
        self.step_statistics, self.aux_loss_sum, self.window_steps = {}, 0.0, 0
        return record

    @torch.no_grad()
    def evaluate(self) -> tuple[float, torch.Tensor | None]:
        """Mean next-token loss over the validation windows, over all ranks, and (with
        tail buckets) the per-bucket loss sums and token counts (see ``tail_tokens``)."""
        self.model.eval()
        t = self.cfg.train
        totals = torch.zeros(2, dtype=torch.float64, device=self.dist.device)
        tail = self.diagnostics.tail
        buckets = tail.zeros() if tail else torch.zeros(0, dtype=torch.float64, device=self.dist.device)
        for inputs, targets, weights in eval_micro_batches(
            self.data,
            t.seq_len,
            t.eval_sequences,
            self.micro_batch,
            self.dist.rank,
            self.dist.world_size,
            self.dist.device,
        ):
            logits = self.model(inputs)
            per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            per_token = per_token.view(targets.shape)
            totals[0] += (per_token.sum(dim=1) * weights).sum().double()
            totals[1] += weights.sum().double() * targets.shape[1]
            if tail:
                buckets += tail.sums(per_token, targets, weights)
        shared = torch.cat([totals, buckets.flatten()])  # one collective for both
        collectives.all_reduce_sum(shared)
        self.model.train()
        return float(shared[0] / shared[1]), (shared[2:].view(2, tail.n_buckets) if tail else None)

    def _evaluate_and_log(self, step: int) -> float:
        run_progress.mark("eval", step)
        eval_loss, buckets = self.evaluate()
        # the unigram entropy is the loss of the best model that ignores context: the
        # report compares every cell's final loss with it
        self.metrics.log(
            {"step": step, "eval_loss": eval_loss, "unigram_entropy": self.data.unigram_entropy}, prefix="eval"
        )
        if buckets is not None:
            self.diagnostics.tail_tokens(step, buckets)
        return eval_loss

    def save(self, step: int, block: bool = True) -> None:
        """Checkpoint ``step``, unless a weight is not finite on some rank: the loss and the
        gradient norm are checked before every update, but an update itself can overflow
        (an eps that vanishes in float32); then no checkpoint is written and the run stops
        as diverged, keeping the last good checkpoint."""
        local = [p.detach().to_local() if isinstance(p, DTensor) else p.detach() for p in self.model.parameters()]
        finite = bool(torch.stack([torch.isfinite(t).all() for t in local]).all()) if local else True
        flags = torch.tensor([float(not finite), float(self.write_failure is not None)])
        collectives.all_reduce(flags, "max")
        if flags[1] > 0:  # a log write refused on rank 0: no checkpoint, every rank stops
            self._raise_write_failure()
        if flags[0] > 0:
            raise TrainingDiverged(
                f"after step {step} a weight is not finite; no checkpoint written (the last complete one is kept)"
            )
        trainer_state = {
            "tokens": step * self.cfg.train.global_batch_size * self.cfg.train.seq_len,
            "world_size": self.dist.world_size,
        }
        self.checkpointer.save(step, self.model, self.optimizers.optimizers, trainer_state, block=block)

    # ------------------------------------------------------------------ reporting

    def _print_header(self) -> None:
        for line in start_up_lines(self):
            self.log(line)

    def _last_logged_eval(self) -> float | None:
        path = self.run.metrics
        if not path.exists():
            return None
        evals = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                value = json.loads(line).get("eval_loss")
            except (json.JSONDecodeError, AttributeError):
                continue  # a torn last line (check_run_dir refused any other damage)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                evals.append(float(value))
        return evals[-1] if evals else None

    def _summary(self, eval_loss: float | None) -> dict:
        summary = {
            "run_dir": str(self.run),
            "final_eval_loss": eval_loss,
            "unigram_entropy": self.data.unigram_entropy,
            "parameters": self.num_params,
            "tensorboard": str(self.run.tensorboard),
            "cost": summarize_cost(self.cost_windows),
            "ns_flops_per_step": self.ns_flops_per_step,
        }
        cost_line = describe_cost(summary["cost"], self.ns_flops_per_step)
        if cost_line:
            self.log(cost_line)
        if eval_loss is not None:
            self.log(
                f"final validation loss {eval_loss:.4f} nats vs unigram entropy "
                f"{self.data.unigram_entropy:.4f} nats of the training tokens"
            )
        self.log(f"TensorBoard logs: {summary['tensorboard']}  (tensorboard --logdir {self.run})")
        return summary

    def close(self) -> None:
        try:
            self._close()
        finally:
            self.lock.release()

    def _close(self) -> None:
        """Finish the checkpoint in flight and close the logs, each even if another is refused.
        Of a run that already failed, that failure is the one reported (a full disk refuses the
        logs' last bytes too); otherwise the first refusal here. A failed run's progress bar is
        cleared, so that its one line stands alone."""
        failure = sys.exc_info()[1]
        failed = failure is not None
        if failed and not (isinstance(failure, (TrainingDiverged, Preempted)) or self._agreed_failure):
            # a failure of this rank alone (a log the disk refused): the other ranks are not
            # waiting for this one's write, and a collective now would pair with theirs
            self.checkpointer.abandon()
        if self._progress is not None:
            self._progress.leave = False
            self._progress.close()  # a no-op once fit closed it
        refusals = []
        for close in (
            self.checkpointer.wait,
            self.stop_request.close,
            self.diagnostics.writer.close,
            self.metrics.close,
        ):
            try:
                close()
            except UserError as exc:
                refusals.append(exc)
        if refusals and not failed:
            raise refusals[0]
