"""The one exception type that means "the user asked for something impossible".

Anything raised as :class:`UserError` ends the program with exit status 2 and a single
line on stderr (no traceback); every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

# Exit statuses of a training process, in one place for the CLI, runners and reports.
USER_ERROR_EXIT_CODE = 2
DIVERGED_EXIT_CODE = 3  # the loss or gradient norm became NaN/Inf; stopped before that update
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; resume me
# EX_UNAVAILABLE: a node of a multi-node job (or a peer rank) was lost; the job cannot go on
# with its collectives broken; resume from the last complete checkpoint once all nodes are back
NODE_LOST_EXIT_CODE = 69


class UserError(Exception):
    """A bad config, missing data, an unreadable checkpoint: the user can fix it."""
