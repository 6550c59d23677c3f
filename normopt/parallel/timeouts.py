"""How long a collective may wait for the other ranks, by what the run is doing.

gloo's default is 30 minutes for every collective, and a rank that never arrives (stopped,
deadlocked, writing to a hung disk) used to hold the others that long, or forever where no
timeout applied. Every collective now runs under the timeout of its phase:

* ``start-up`` (process group creation, rank 0 preparing the corpus while the others wait
  in a broadcast, loading a checkpoint): 1800 s, ``NORMOPT_START_UP_TIMEOUT_S``;
* ``step`` (the training loop's collectives, evaluation included): 600 s,
  ``NORMOPT_STEP_TIMEOUT_S``;
* ``checkpoint`` (the save's agreements and barriers, DCP's own collectives, the wait for an
  asynchronous write): 1800 s, ``NORMOPT_CHECKPOINT_TIMEOUT_S``.

A collective that times out raises on that rank and breaks the group (stack notes): the run
ends, as for a lost peer (``normopt.peer_loss``). ``normopt launch``'s progress watchdog
(``normopt.progress``) is the last bound over all of them.
"""

from __future__ import annotations

import os
from datetime import timedelta

from normopt.errors import UserError

PHASE_TIMEOUTS_S = {"start-up": 1800.0, "step": 600.0, "checkpoint": 1800.0}
PHASE_ENV = {
    "start-up": "NORMOPT_START_UP_TIMEOUT_S",
    "step": "NORMOPT_STEP_TIMEOUT_S",
    "checkpoint": "NORMOPT_CHECKPOINT_TIMEOUT_S",
}


def collective_timeout(phase: str) -> timedelta:
    """The timeout of ``phase``'s collectives: its environment variable, else its default."""
    name = PHASE_ENV[phase]
    text = os.environ.get(name, "").strip()
    if not text:
        return timedelta(seconds=PHASE_TIMEOUTS_S[phase])
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise UserError(f"{name}={text!r}: a collective timeout is a number of seconds above 0")
    return timedelta(seconds=seconds)
