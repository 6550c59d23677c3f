"""The ``checkpoint`` config section: when checkpoints are written, kept and resumed from."""

from __future__ import annotations

import re
from dataclasses import dataclass

from normopt.key_roles import EXECUTION, require, role


@dataclass
class CheckpointConfig:
    """When checkpoints are written, how many are kept and which one a run resumes from."""

    interval: int = role(
        EXECUTION, 0, "save every N steps (0 = only at the end; the final checkpoint is always written)"
    )
    keep_latest_k: int = role(
        EXECUTION, 2, "keep the newest N checkpoints that verify; older complete ones are deleted"
    )
    resume: str = role(
        EXECUTION,
        "auto",
        "auto = from the latest complete checkpoint of run.dir, if any; "
        "never = start fresh, refusing a run directory that holds a run; "
        "or a step number",
    )
    async_save: bool = role(EXECUTION, False, "write checkpoints in the background (the final one waits)")

    def validate(self) -> None:
        require(self.interval >= 0, "checkpoint.interval", "must be >= 0 (0 = only at the end)")
        require(self.keep_latest_k >= 1, "checkpoint.keep_latest_k", "must be at least 1")
        require(
            self.resume in ("auto", "never") or re.fullmatch(r"[0-9]{1,12}", self.resume) is not None,
            "checkpoint.resume",
            f"{self.resume!r} is not auto, never or a step number",
        )
