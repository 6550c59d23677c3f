"""Whether and from where a run continues: ``checkpoint.resume`` against its run directory.

A resumed run must do the math the checkpoint was trained with, so the checkpoint's config
and the new one may differ only in keys whose role (``normopt.key_roles``) is not MATH:

* EXECUTION keys (device, micro-batch split, NS placement, logging, checkpointing,
  diagnostics, run.dir) compute or record the same steps;
* LENGTH (``train.steps``) may be raised to continue a finished run;
* EVALUATION (``train.eval_sequences``) changes only what later evaluations measure.

The report's notion of an arm (``normopt.report.cells.arms``) reads the same tags but is
stricter: there only EXECUTION keys may differ within an arm, because runs of different
lengths or measured on different validation sequences are not comparable cells.
"""

from __future__ import annotations

from pathlib import Path

from normopt.config import Config, flat_config, keys_with_role, read_saved_config
from normopt.errors import UserError
from normopt.key_roles import EVALUATION, EXECUTION, LENGTH
from normopt.plugins import check_run_plugins
from normopt.run_dir import PARTIAL, RunDir

RESUME_SAFE_KEYS = keys_with_role(EXECUTION, LENGTH, EVALUATION)  # normopt's own


def check_resume_compatible(saved: Config, current: Config) -> None:
    """Refuse to resume when a key outside the resume-safe roles (execution, length,
    evaluation; plugins' keys by their declared roles) differs from the checkpoint's."""
    old, new = flat_config(saved.to_dict()), flat_config(current.to_dict())
    safe = keys_with_role(EXECUTION, LENGTH, EVALUATION)
    for key in sorted(old):
        if key not in safe and old[key] != new.get(key):
            raise UserError(
                f"{key}: the run being resumed used {old[key]!r}, this config says {new.get(key)!r} "
                f"(start a new run.dir to change it)"
            )


def find_resume_point(run: RunDir, cfg: Config, log=None, rank: int = 0, world_size: int = 1) -> Path | None:
    """The checkpoint ``cfg`` continues from, per ``checkpoint.resume``: auto = the latest
    complete one (None in a new run directory), never = None (refusing a run directory that
    already holds a run), a step number = that step's. Refuses a checkpoint whose config
    differs from ``cfg`` in a key that changes the math.

    The checkpoint is used whole or not at all (``checkpoint.verify``): a damaged one is
    refused in one line naming the piece, never skipped. An older checkpoint is resumed from
    only in place of partial ones (a ``.tmp`` folder, a step folder without its
    trainer_state.json), and ``log`` (one line) says so. Ranks starting together split the
    check of the files' digests (``rank`` of ``world_size``): the caller agrees on the outcome."""
    from normopt.checkpoint.verify import verify_checkpoint

    mode = cfg.checkpoint.resume
    if mode == "never":
        if run.metrics.exists() or run.step_folders():
            raise UserError(
                f"run.dir {run} already holds a run (use checkpoint.resume=auto to continue it, or another run.dir)"
            )
        return None
    if mode == "auto" and all(run.checkpoint_status(s) == PARTIAL for s in run.step_folders()):
        checkpoint = None
    else:
        checkpoint = run.find_checkpoint(None if mode == "auto" else int(mode), "checkpoint.resume")
        verify_checkpoint(checkpoint, rank=rank, world_size=world_size)
    skipped = run.skipped_partials(checkpoint) if mode == "auto" else []
    if skipped and log is not None:
        then = f"resuming from {checkpoint.name}" if checkpoint is not None else "starting from step 0"
        log(
            f"normopt: partial checkpoint{'s' if len(skipped) > 1 else ''} {', '.join(skipped)} "
            f"(an interrupted write) skipped; {then}"
        )
    if checkpoint is None:
        return None
    check_run_plugins(run.path, "resume")  # before its saved config, whose plugin keys need them
    saved = run.config_of(checkpoint)
    if saved is not None:
        check_resume_compatible(read_saved_config(saved), cfg)
    return checkpoint
