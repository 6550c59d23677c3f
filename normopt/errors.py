"""The one exception type that means "the user asked for something impossible".

Anything raised as :class:`UserError` ends the program with exit status 2 and a single
line on stderr (no traceback); every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A bad config, missing data, an unreadable checkpoint: the user can fix it."""
