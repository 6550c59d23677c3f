"""Which node of a multi-node job went silent: a heartbeat among the ``normopt launch`` processes.

The ranks' collectives cannot say which node is gone: gloo reports "Connection reset by peer"
for a dead peer and blocks for its 30-minute timeout on a frozen one. So the launchers watch
each other, apart from the ranks. Node 0's launcher hosts a small ``torch.distributed.TCPStore``
(the watch store, on ``--watch-port``: by default the master port + 1) and every launcher

* **joins a round**: records its host and global ranks under ``r<k>/node/<i>`` and waits until
  every node of the job has done so (the rendezvous of the launchers; ranks start after it);
* **beats**: adds 1 to its counter ``beat/<i>`` every :data:`HEARTBEAT_S` and reads everyone's;
* **declares a loss**: node j is lost when this launcher's own reads, spanning ``node_timeout``
  seconds, all found j's counter unchanged; node 0 (the store's host) is lost when the store has
  not answered for ``node_timeout`` seconds. The first declaration of round k is kept under
  ``r<k>/lost`` and the job moves to round k+1, which every launcher sees (a node that was
  frozen and comes back learns from it that the others gave it up); every launcher that stops
  its ranks for the loss appends its node to ``r<k>/stopped``, so that node 0 can keep the
  store up until the others have read which node was lost;
* **leaves**: appends its node and status to ``r<k>/left`` when its ranks ended by themselves,
  so that a node that finished (or failed and said so) is not taken for a lost one.

All store traffic runs on one background thread: a store whose host is frozen blocks a call
indefinitely (measured: a TCPStore client waits for a stopped server's answer regardless of
its timeout), so the launcher's own loop never touches the store and judges silence by the
age of the thread's last answer. A launcher that was itself stopped (SIGSTOP, a frozen VM)
sees a gap in its own checks on resuming and starts its silence clocks afresh instead of
blaming its peers for time it did not run.

A restarted node-0 launcher hosts a new store (a new ``store_id``); the others notice the
change and join its current round. Any other node's launcher started again (a new
``launcher`` id in its record) that finds its predecessor's round complete ends that round at
once, before the others could see the predecessor fall silent: its beats go on under the same
counter. Rounds exist so that ranks of two attempts never meet: a launcher starts ranks only
after every node joined the same round, and only after its own ranks of the previous round
are gone.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta

HEARTBEAT_S = 1.0  # how often each launcher beats and reads the others' beats
DEFAULT_NODE_TIMEOUT_S = 30.0  # silence after which a node is declared lost
MIN_NODE_TIMEOUT_S = 2 * HEARTBEAT_S  # shorter would take one late beat for a lost node
DEFAULT_JOIN_TIMEOUT_S = 600.0  # how long launchers wait for every node to join a round
STORE_CALL_TIMEOUT_S = 5.0  # connect and key-wait timeout of one store call
# a launcher that finds this long between two of its own checks was stopped itself
FROZEN_GAP_S = 3.0
DECLARE_WAIT_S = 1.0  # how long a declaration or a departure waits to reach the store
# node 0 leaving after a loss: how long the others may take to read it (one beat, and some)
READ_LOSS_WAIT_S = HEARTBEAT_S + 0.5


@dataclass(frozen=True)
class NodeInfo:
    """One node of the job as its launcher recorded it when joining a round."""

    node_rank: int
    host: str
    first_rank: int
    last_rank: int
    launcher: str = ""  # an id of the launcher process: a node's launcher started again has a new one

    def describe(self) -> str:
        ranks = (
            f"rank {self.first_rank}"
            if self.first_rank == self.last_rank
            else f"ranks {self.first_rank}-{self.last_rank}"
        )
        return f"node {self.node_rank} ({self.host}, {ranks})"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> NodeInfo:
        return cls(**json.loads(text))

    @classmethod
    def expected(cls, node_rank: int, nproc: int, host: str) -> NodeInfo:
        """What a node is known as before it recorded itself (its host as configured)."""
        return cls(node_rank, host, node_rank * nproc, (node_rank + 1) * nproc - 1)


@dataclass(frozen=True)
class NodeLoss:
    """A node declared lost: which, why (how long it was silent), and by which node."""

    lost: NodeInfo
    reason: str
    declared_by: int

    def to_json(self) -> str:
        return json.dumps({"lost": asdict(self.lost), "reason": self.reason, "declared_by": self.declared_by})

    @classmethod
    def from_json(cls, text: str | bytes) -> NodeLoss:
        data = json.loads(text)
        return cls(NodeInfo(**data["lost"]), data["reason"], data["declared_by"])


class JoinTimeout(Exception):
    """Not every node joined the round in time; ``missing`` names the nodes that did not."""

    def __init__(self, missing: list[int]):
        super().__init__(f"node(s) {', '.join(map(str, missing))} did not join")
        self.missing = missing


def parse_left(text: str | bytes) -> dict[int, int]:
    """``r<k>/left`` ("node:status," appended by each leaving launcher) as {node: status}."""
    if isinstance(text, bytes):
        text = text.decode()
    left = {}
    for entry in filter(None, text.split(",")):
        node, status = entry.split(":")
        left[int(node)] = int(status)
    return left


def _end_round(store, k: int, loss: NodeLoss) -> None:
    """Record ``loss`` as round k's, unless a loss was recorded first, and move the store to round k+1."""
    store.compare_set(f"r{k}/lost", "", loss.to_json())
    store.compare_set("round", str(k), str(k + 1))


def parse_nodes(text: str | bytes) -> set[int]:
    """``r<k>/stopped`` ("node," appended by each launcher that stopped for the loss) as a set."""
    if isinstance(text, bytes):
        text = text.decode()
    return {int(node) for node in text.split(",") if node}


def silent_for(last_answer: float, since: float) -> float:
    """How long a counter has been seen unchanged: from the first read that found its value to
    the latest read that answered (never the wall clock, so that reads that did not happen,
    because this launcher or its store thread was stalled, count for nothing)."""
    return max(0.0, last_answer - since)


class NodeWatch:
    """The heartbeat of this node's launcher, and its view of every other node (module doc)."""

    def __init__(
        self,
        node_rank: int,
        nnodes: int,
        nproc: int,
        addr: str,
        port: int,
        node_timeout: float = DEFAULT_NODE_TIMEOUT_S,
    ):
        self.node_rank, self.nnodes, self.nproc = node_rank, nnodes, nproc
        self.addr, self.port, self.node_timeout = addr, port, node_timeout
        self.me = NodeInfo(
            node_rank, socket.gethostname(), node_rank * nproc, (node_rank + 1) * nproc - 1, uuid.uuid4().hex
        )
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._server = self._host_store() if node_rank == 0 else None
        # what the thread learned (read and written under the lock)
        self._store_id: str | None = None
        self._store_replaced = False
        self._last_answer = time.monotonic()
        self._last_check = time.monotonic()
        self._beats: dict[int, tuple[int, float]] = {}  # node -> (counter, first read with that value)
        self._want_join = False
        self._joined: tuple[int, dict[int, NodeInfo]] | None = None
        self._missing: list[int] = list(range(nnodes))
        self._store_loss: NodeLoss | None = None
        self._left: dict[int, int] = {}
        self._stopped_nodes: set[int] = set()  # nodes that stopped their ranks for this round's loss
        self._requests: list[tuple[Callable, threading.Event]] = []
        self._thread = threading.Thread(target=self._run, name="normopt-node-watch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the launcher's side

    @property
    def round(self) -> int | None:
        with self._lock:
            return self._joined[0] if self._joined else None

    def info(self, node: int) -> NodeInfo:
        """A node as it recorded itself in the current round, else as configured."""
        with self._lock:
            infos = self._joined[1] if self._joined else {}
        return infos.get(node) or NodeInfo.expected(node, self.nproc, self.addr if node == 0 else "unknown host")

    def join(self, timeout: float, abort: Callable[[], bool]) -> int:
        """Join the store's current round and wait until every node has; returns the round.
        Raises :class:`JoinTimeout` after ``timeout`` seconds; returns -1 when ``abort()`` says
        so first (a stop signal)."""
        with self._lock:
            self._joined, self._want_join = None, True
            self._store_loss, self._left, self._store_replaced = None, {}, False
            self._stopped_nodes = set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                joined, missing = self._joined, list(self._missing)
            if joined is not None:
                return joined[0]
            if abort():
                return -1
            if time.monotonic() > deadline:
                raise JoinTimeout(missing)
            time.sleep(0.05)

    def problem(self) -> NodeLoss | None:
        """The loss that ends this round, if any: one recorded in the store by any launcher,
        the store itself silent (node 0 lost), or a node whose beat this launcher saw stand
        still for ``node_timeout`` seconds. Call it often (every 0.1 s): the gap between two
        calls is how a launcher notices that it was itself stopped."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_check > FROZEN_GAP_S:  # this launcher did not run: nothing was observed
                self._last_answer = max(self._last_answer, now)
                self._beats = {node: (value, max(since, now)) for node, (value, since) in self._beats.items()}
            self._last_check = now
            if self._joined is None:
                return None
            infos = self._joined[1]
            if self._store_loss is not None:
                return self._store_loss
            if self._store_replaced:
                return NodeLoss(
                    infos[0], f"its launcher restarted (a new watch store at {self.addr}:{self.port})", self.node_rank
                )
            quiet = now - self._last_answer
            if self.node_rank != 0 and quiet >= self.node_timeout:
                return NodeLoss(
                    infos[0],
                    f"the watch store it hosts at {self.addr}:{self.port} did not answer for {quiet:.1f} s",
                    self.node_rank,
                )
            for node, (_, since) in sorted(self._beats.items()):
                silence = silent_for(self._last_answer, since)
                if node != self.node_rank and node not in self._left and silence >= self.node_timeout:
                    return NodeLoss(infos[node], f"no heartbeat for {silence:.1f} s", self.node_rank)
        return None

    def left(self) -> dict[int, int]:
        """The nodes that left the current round by themselves, with their statuses."""
        with self._lock:
            return dict(self._left)

    def declare(self, loss: NodeLoss) -> None:
        """Record ``loss`` as round k's (unless another launcher's came first), move the job to
        round k+1 and say that this node stopped for it. Waits at most :data:`DECLARE_WAIT_S`;
        the thread keeps trying after."""
        k = self.round
        if k is None:
            return

        def write(store) -> None:
            _end_round(store, k, loss)
            store.append(f"r{k}/stopped", f"{self.node_rank},")

        self._request(write)

    def leave(self, status: int) -> None:
        """Say that this node's ranks ended by themselves with ``status`` (not lost)."""
        k = self.round
        if k is None:
            return
        self._request(lambda store: store.append(f"r{k}/left", f"{self.node_rank}:{status},"))

    def wait_for_others(self, bound: float, lost: int | None = None) -> None:
        """Node 0 hosts the store: before it goes, give the other launchers up to ``bound``
        seconds to leave, stop for the round's loss (of node ``lost``, not waited for) or fall
        silent, so that none of them takes the store's going for node 0's loss."""
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            self.problem()  # keeps the frozen-launcher check current
            with self._lock:
                done = {self.node_rank, lost, *self._left, *self._stopped_nodes}
                pending = [
                    node
                    for node, (_, since) in self._beats.items()
                    if node not in done and silent_for(self._last_answer, since) < self.node_timeout
                ]
            if not pending:
                return
            time.sleep(0.1)

    def close(self, wait: float = 0.5) -> bool:
        """Stop beating; whether the thread ended within ``wait`` seconds. It may be inside a
        store call that does not return (a frozen store host) or retries its connection for
        seconds (a vanished one): it is a daemon, and not waited for longer."""
        self._stopped = True
        self._wake.set()
        self._thread.join(wait)
        return not self._thread.is_alive()

    def _request(self, write: Callable) -> None:
        done = threading.Event()
        with self._lock:
            self._requests.append((write, done))
        self._wake.set()
        done.wait(DECLARE_WAIT_S)

    # ------------------------------------------------------------------ the thread's side

    def _host_store(self):
        from torch.distributed import TCPStore

        from normopt.errors import UserError

        try:
            store = TCPStore(
                "0.0.0.0",
                self.port,
                is_master=True,
                wait_for_workers=False,
                timeout=timedelta(seconds=STORE_CALL_TIMEOUT_S),
            )
        except RuntimeError as exc:  # DistNetworkError: the port is taken, most likely
            raise UserError(
                f"--watch-port {self.port}: cannot host the node watch store "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from None
        store.set("store_id", uuid.uuid4().hex)
        return store

    def _connect(self):
        """A client of the watch store (node 0: the store it hosts)."""
        if self._server is not None:
            return self._server
        from torch.distributed import TCPStore

        return TCPStore(
            self.addr,
            self.port,
            is_master=False,
            wait_for_workers=False,
            timeout=timedelta(seconds=STORE_CALL_TIMEOUT_S),
        )

    def _run(self) -> None:
        store = None
        while not self._stopped:
            started = time.monotonic()
            try:
                if store is None:
                    store = self._connect()
                    self._check_store_id(store)
                self._tick(store)
            except (RuntimeError, ValueError):  # DistError: the store went away or timed out; reconnect next beat
                store = None
            self._wake.wait(max(0.0, HEARTBEAT_S - (time.monotonic() - started)))
            self._wake.clear()

    def _check_store_id(self, store) -> None:
        store_id = store.get("store_id").decode()
        with self._lock:
            if self._store_id is not None and store_id != self._store_id:
                # node 0's launcher was restarted: the old round's requests mean nothing there
                self._store_replaced = self._joined is not None
                self._requests, pending = [], self._requests
                for _, done in pending:
                    done.set()
            self._store_id = store_id

    def _tick(self, store) -> None:
        """One beat: this node's counter, pending writes, then what the others did."""
        store.add(f"beat/{self.node_rank}", 1)
        with self._lock:
            requests = list(self._requests)
        for write, done in requests:
            write(store)
            with self._lock:
                self._requests.remove((write, done))
            done.set()
        with self._lock:
            joining = self._want_join and self._joined is None
        if joining:
            self._join_step(store)
        else:
            self._observe(store)
        with self._lock:
            self._last_answer = time.monotonic()

    def _join_step(self, store) -> None:
        """Record this node in the store's current round; note who is still missing; finish
        the join when nobody is."""
        k = int(store.add("round", 0))
        keys = [f"r{k}/node/{node}" for node in range(self.nnodes)]
        mine = keys[self.node_rank]
        if store.check([mine]):
            recorded = NodeInfo.from_json(store.get(mine))
            if recorded.launcher != self.me.launcher and all(store.check([key]) for key in keys):
                # this node's previous launcher joined round k with every other node, so ranks
                # may be running in it, and it is gone (this launcher replaces it): the round
                # is over, before the others could even see that launcher fall silent
                _end_round(store, k, NodeLoss(recorded, "its launcher was started again", self.node_rank))
                return
        # set on every step: the store may be a new one (node 0's launcher restarted)
        store.set(mine, self.me.to_json())
        missing = [node for node, key in enumerate(keys) if not store.check([key])]
        if missing:
            with self._lock:
                self._missing = missing
            return
        infos = {node: NodeInfo.from_json(raw) for node, raw in enumerate(store.multi_get(keys))}
        beats = store.multi_get([f"beat/{node}" for node in range(self.nnodes)])
        now = time.monotonic()
        with self._lock:
            self._joined, self._want_join, self._missing = (k, infos), False, []
            self._beats = {node: (int(raw), now) for node, raw in enumerate(beats)}
            self._store_loss, self._left, self._store_replaced = None, {}, False
            self._stopped_nodes = set()

    def _observe(self, store) -> None:
        """Read every node's beat, the store's round (and the loss that moved it) and who left."""
        with self._lock:
            joined = self._joined
        if joined is None:
            return
        k = joined[0]
        beats = [int(raw) for raw in store.multi_get([f"beat/{node}" for node in range(self.nnodes)])]
        store_round = int(store.add("round", 0))
        loss = None
        if store_round != k and store.check([f"r{k}/lost"]):
            loss = NodeLoss.from_json(store.get(f"r{k}/lost"))
        left = parse_left(store.get(f"r{k}/left")) if store.check([f"r{k}/left"]) else {}
        stopped = parse_nodes(store.get(f"r{k}/stopped")) if store.check([f"r{k}/stopped"]) else set()
        now = time.monotonic()
        with self._lock:
            if self._joined is not joined:  # a new round began meanwhile: these reads are the old one's
                return
            for node, value in enumerate(beats):
                if self._beats.get(node, (None,))[0] != value:
                    self._beats[node] = (value, now)
            self._left, self._stopped_nodes = left, stopped
            if loss is not None:
                self._store_loss = loss
