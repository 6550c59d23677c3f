"""The one exception type that means "the user asked for something impossible".

Anything raised as :class:`UserError` ends the program with exit status 2 and a single
line on stderr (no traceback); every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re

# Exit statuses of a training process, in one place for the CLI, runners and reports.
USER_ERROR_EXIT_CODE = 2
DIVERGED_EXIT_CODE = 3  # the loss or gradient norm became NaN/Inf; stopped before that update
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; resume me
# EX_UNAVAILABLE: a node of a multi-node job (or a peer rank) was lost; the job cannot go on
# with its collectives broken; resume from the last complete checkpoint once all nodes are back
NODE_LOST_EXIT_CODE = 69
# normopt launch's progress watchdog: no rank entered a new step or phase for --watchdog-timeout
# seconds (a stopped or deadlocked rank, a hung disk); 124 as GNU timeout(1) says "timed out"
NO_PROGRESS_EXIT_CODE = 124


class UserError(Exception):
    """A bad config, missing data, an unreadable checkpoint: the user can fix it."""


def os_reason(exc: BaseException) -> str | None:
    """The operating system's reason behind ``exc`` in a few words ("no space left on
    device", "read-only file system"), looking through wrappers (a serializer's own error
    that quotes "os error N", an exception's cause); None when no OS error is behind it.
    Here, beside UserError, because every writer (logs, checkpoints, exports) words a
    refused write with it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = getattr(exc, "errno", None)
        if not isinstance(code, int):
            match = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(exc))
            code = int(match.group(1) or match.group(2)) if match else None
        if isinstance(code, int) and code > 0:
            return "no space left on device" if code == errno.ENOSPC else os.strerror(code).lower()
        if "StorageFull" in str(exc):
            return "no space left on device"
        exc = exc.__cause__ or exc.__context__
    return None
