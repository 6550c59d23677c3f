"""A rank's side of a lost peer: a collective that failed because another process of the job went away.

gloo reports a peer that died as a RuntimeError from its TCP transport ("Connection reset by
peer", "Connection closed by peer", a timed-out receive); NCCL and the c10d store raise
``torch.distributed.DistError``. The process group is broken for good after that (stack
notes), so the run ends, with :data:`normopt.errors.NODE_LOST_EXIT_CODE` and no traceback:
the traceback says nothing about *which* node went away, and under ``normopt launch`` the
launcher knows (its heartbeat, ``normopt.node_watch``) and says so in one line. So a rank
started by the launcher writes the cause to the file the launcher named in
:data:`PEER_LOST_REPORT_ENV` (the launcher quotes it when no node turns out to be lost) and
prints nothing; a rank started otherwise (torchrun) prints one line itself.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

PEER_LOST_REPORT_ENV = "NORMOPT_PEER_LOST_REPORT"
# how gloo's transport words a peer that is gone (its errors are plain RuntimeErrors)
GLOO_TRANSPORT_MARKERS = ("gloo/transport/", "Connection reset by peer", "Connection closed by peer")
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*")  # "[.../pair.cc:537] "


def _is_transport_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in GLOO_TRANSPORT_MARKERS)


def is_peer_loss(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from or while handling, is a collective
    or store call that failed because a peer is gone. Anything else is a bug and keeps its
    traceback."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _is_transport_error(current):
            return True
        # the chain as a traceback would show it ("raise ... from None" hides the context)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


def peer_loss_cause(exc: BaseException, limit: int = 160) -> str:
    """The error's first sentence, without the C++ source location (gloo goes on with advice
    that fits any failure), at most ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    text = _SOURCE_PREFIX.sub("", lines[0]) if lines else type(exc).__name__
    text = text.split(". ")[0].rstrip(".") + "." if ". " in text else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report_peer_loss(exc: BaseException) -> None:
    """Hand the cause to the launcher (quietly), or print this rank's one line when there is none."""
    cause = peer_loss_cause(exc)
    report = os.environ.get(PEER_LOST_REPORT_ENV)
    if report:
        try:
            Path(report).write_text(cause + "\n")
            return
        except OSError:  # the launcher's folder is gone: say it here rather than not at all
            pass
    rank = os.environ.get("RANK", "0")
    print(
        f"normopt: rank {rank} lost contact with another rank or node of the job ({cause}); "
        f"run the same command to resume from the last complete checkpoint",
        file=sys.stderr,
        flush=True,
    )


def read_peer_loss_report(path: Path) -> str | None:
    """The cause a rank wrote to ``path``, None when it wrote none."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text or None
