"""The engine bridge: the only place the trio gateway meets Thespian.

One bridge thread owns the gateway's ``ActorSystem`` handle (the handle is not
thread-safe) and its :class:`~actors.boot.EngineLink`. Trio never calls
Thespian: it puts requests on a bounded queue; the bridge thread drains
everything that arrived since its last pass and sends it **in batches** (one
``EngineBatch`` per host), then listens for the engine's ``GatewayBatch``es
and hands each pass's messages to trio in one call, where they are fanned out to
connections. The embedded bridge waits for that call
(``trio.from_thread.run_sync``): its thread runs the engine, and the wait is the
engine's back-pressure. The attached one does not (``run_sync_soon``, at most
:data:`DELIVERIES_AHEAD` calls ahead of trio): while it waited, its handle read
nothing from the engine's processes, whose sends to the gateway then held
Thespian's 20 transmits in flight per process, and everything else those
processes sent queued behind them.

Embedded deployment: the bridge thread creates a ``simpleSystemBase`` system
and boots the engine, so every actor runs on the bridge thread. Multi-process:
it attaches to a booted ``multiprocTCPBase`` system by admin port.

Bounds: the request queue holds ``max_pending`` requests; when it is full,
:meth:`EngineBridge.submit` (and every other call from trio) raises
:class:`BridgeBusy` at once and the gateway answers ``rate_limited`` rather than
queue without limit or block the event loop; bulk work that must not be refused
(funding accounts at boot) uses the ``*_waiting`` variants, which wait off the
event loop. The listen timeout (a few ms) is the most a request waits for the
bridge thread's next pass.

Recording (``BridgeOptions.record``): the bridge thread journals every engine
input it sends, in order and with its batch boundaries, the typed engine calls
(:class:`OpenAccounts`) between them, and the outputs it receives; at stop it
queries every user's final account and appends a footer with the live run's
digests (:class:`RunDigest`). ``simulations.replay`` re-feeds such a file into a
fresh :class:`~actors.local.LocalEngine` and compares. The file format:

* 8 magic bytes ``EMPREC\\r\\n``, then frames, each a 4-byte big-endian payload
  length, the payload's 4-byte CRC-32 and the payload: one pickle (protocol 5);
* the first frame is the header, a plain dict: ``format`` (``emporion-record``),
  ``version``, ``gateway_id``, ``base``, ``engine`` (the :class:`EngineConfig`
  fields, the instruments' TOML text among them), ``recovered_turns`` (what the
  engine replayed from its journal at boot; 0 for a fresh engine, None when
  attached), ``started_ns``;
* then :class:`RecordedInput`, :class:`RecordedCall` and :class:`RecordedOutput`
  frames in the order the bridge thread made them, and last a
  :class:`RecordFooter`. A run that died leaves a torn last frame and no footer;
  :class:`RecordReader` stops at the tear and says so.

Frames are written per pass (one ``write`` and ``flush``), never per message.
**Pickle is a trust boundary**: reading a record runs whatever the file says,
exactly like Thespian's own transport — replay only files you recorded.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import pickle
import queue
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

import attrs
import trio

from actors.boot import EngineLink, boot_engine
from actors.host import EngineConfig
from actors.journal import flush_shared
from actors.messages import AccountQuery, Delivery, Dest, Reply, ReplyTo
from actors.runtime import SystemConfig, start_system, stop_system
from protocol import PublicTrade

log = logging.getLogger(__name__)

#: How many passes' messages an attached bridge hands to trio before trio has taken
#: the first of them (see the module docstring); past it the bridge thread waits.
DELIVERIES_AHEAD = 8


class BridgeBusy(Exception):  # noqa: N818 - a normal, reportable condition
    """The request queue is full: the engine is behind."""


class BridgeStopped(Exception):  # noqa: N818
    """The bridge is not running."""


class BridgeFailed(RuntimeError):  # noqa: N818 - named like its siblings
    """The bridge thread ended with an error: the engine is out of reach (see
    :attr:`EngineBridge.failure`; the gateway stops with this error)."""


@attrs.frozen(kw_only=True)
class BridgeOptions:
    base: Literal["simpleSystemBase", "multiprocTCPBase"] = "simpleSystemBase"
    admin_port: int | None = None  # multiprocTCPBase: the booted system's admin port
    #: simpleSystemBase: the engine to boot in-thread; attached: only for a recording's header.
    engine: EngineConfig | None = None
    gateway_id: str = "gw1"
    #: Requests queued for the bridge thread before trio's calls raise BridgeBusy
    #: (clients get ``rate_limited``). About 3.5-5 s of work at the embedded engine's
    #: measured saturating rate (2,100-2,900 orders/s, bench/gateway.py), under the
    #: gateway's ``request_timeout_s`` (10 s): a request the queue takes is one the
    #: engine can reach before its client is told ``timeout``. 100,000 was 35-48 s.
    max_pending: int = 10_000
    listen_s: float = 0.002
    #: Embedded only: the interpreter's GIL switch interval while the bridge runs
    #: (``sys.setswitchinterval``, process-wide, restored at stop; None keeps it).
    #: The trio thread and the bridge thread share one GIL, and a request crosses
    #: between them twice; while the other thread computes, each crossing waits
    #: out the interval — Python's 5 ms default dominated submit→ack latency.
    switch_interval_s: float | None = 0.0005
    #: Embedded only: the cyclic garbage collector's first-generation threshold
    #: while the bridge runs (``gc.set_threshold``, process-wide, restored at stop;
    #: None keeps it). Engine state is many long-lived objects and few cycles
    #: (refcounting frees nearly everything); at Python's 700 allocations the
    #: collector's passes over them cost throughput and made the P99 pauses.
    gc_threshold: int | None = 10_000
    #: Journal every engine input and output to this file (see the module docstring).
    record: str | None = None


# -- typed engine calls ---------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class OpenAccounts:
    """Make sure each user's account host exists (a login does it before attaching).

    A typed call is recorded as data; a replay knows what it did (a
    :class:`~actors.local.LocalEngine` opens accounts on demand).
    """

    users: tuple[str, ...]


#: The engine calls the bridge knows by type (recorded as data).
EngineCall = OpenAccounts


@attrs.frozen(kw_only=True)
class OpaqueCall:
    """Stands in a recording for an :meth:`EngineBridge.call` callable: code is not
    data, so a replay can only skip it (with a warning)."""

    name: str


@attrs.frozen
class _Typed:
    call: EngineCall
    done: threading.Event


_Request = tuple[Dest, Any] | _Typed | Callable[[EngineLink], Any]


# -- record frames --------------------------------------------------------------------------

RECORD_FORMAT = "emporion-record"
#: The host name of a recorded batch that a fan-out link sent whole (to the Exchange).
FANOUT_HOST = "exchange"
RECORD_VERSION = 1
_MAGIC = b"EMPREC\r\n"
_FRAME = struct.Struct(">II")  # payload length, CRC-32 of the payload
#: Outputs kept in a record: what the digests read (book deltas and tickers are not).
_RECORDED_OUTPUTS = (Reply, Delivery, PublicTrade)
#: The ``conn`` of the bridge's own final queries (gateway connections count from 1).
RECORD_CONN = 0
#: What the ``balances`` digest reads per user, each an ``AccountQuery.what``.
BALANCE_VIEWS = ("account", "positions", "orders")
#: Digest names, in report order.
DIGESTS = ("trades", "balances", "events")


@attrs.frozen(kw_only=True)
class RecordedInput:
    """One ``EngineLink.send``: ``batches`` are the ``EngineBatch``es it made, one per
    host in the order sent, each ``(host id, ((Dest, message), …))``."""

    pass_no: int
    wall_ns: int
    batches: tuple[tuple[str, tuple[tuple[Dest, Any], ...]], ...]


@attrs.frozen(kw_only=True)
class RecordedCall:
    """A call run on the bridge thread between two sends."""

    pass_no: int
    call: EngineCall | OpaqueCall


@attrs.frozen(kw_only=True)
class RecordedOutput:
    """What one pass received (replies, deliveries, public trades), in arrival order."""

    pass_no: int
    messages: tuple[Any, ...]


@attrs.frozen(kw_only=True)
class RecordFooter:
    """Written at stop: the live run's digests and what they were computed from.

    ``balances`` maps each user to the final views of :data:`BALANCE_VIEWS`
    (None when the final queries did not answer); ``error`` says why a digest is
    missing.
    """

    digests: dict[str, str | None] = attrs.field(hash=False)
    users: tuple[str, ...]
    balances: dict[str, dict[str, Any]] | None = attrs.field(default=None, hash=False)
    counts: dict[str, int] = attrs.field(factory=dict, hash=False)
    error: str | None = None


RecordFrame = RecordedInput | RecordedCall | RecordedOutput | RecordFooter


class RecordError(Exception):
    """Not a record file, an unsupported version, or a damaged frame."""


class RecordWriter:
    """Appends frames to a record file; :meth:`flush` writes what was buffered."""

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any]) -> None:
        self._file: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._buf: list[bytes] = [_MAGIC]
        self.frames = 0
        self.frame(header)
        self.flush()

    def frame(self, obj: Any) -> None:
        payload = pickle.dumps(obj, protocol=5)
        self._buf.append(_FRAME.pack(len(payload), zlib.crc32(payload)))
        self._buf.append(payload)
        self.frames += 1

    def flush(self) -> None:
        if self._buf:
            self._file.write(b"".join(self._buf))
            self._file.flush()
            self._buf.clear()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._file.close()


class RecordReader:
    """Reads a record file frame by frame (streaming).

    ``header`` is read at construction; iterating yields the frames after it.
    A torn last frame (the recording process died mid-write) ends the iteration
    and sets ``truncated``; a frame whose checksum fails raises :class:`RecordError`.
    Unpickling runs code from the file: only read records you made.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: IO[bytes] = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        self.truncated = False
        try:
            self.header: dict[str, Any] = self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_header(self) -> dict[str, Any]:
        if self._file.read(len(_MAGIC)) != _MAGIC:
            raise RecordError(f"{self.path} is not an emporion record")
        header = self._next()
        if not isinstance(header, dict) or header.get("format") != RECORD_FORMAT:
            raise RecordError(f"{self.path}: no record header")
        if header.get("version") != RECORD_VERSION:
            raise RecordError(f"{self.path}: record version {header.get('version')} "
                              f"(this code reads {RECORD_VERSION})")
        return header

    def _next(self) -> Any:
        head = self._file.read(_FRAME.size)
        if not head:
            return _END
        if len(head) < _FRAME.size:
            self.truncated = True
            return _END
        size, crc = _FRAME.unpack(head)
        payload = self._file.read(size)
        if len(payload) < size:
            self.truncated = True
            return _END
        if zlib.crc32(payload) != crc:
            raise RecordError(f"{self.path}: a damaged frame at offset "
                              f"{self._file.tell() - size - _FRAME.size}")
        return pickle.loads(payload)  # a trust boundary: see the module docstring

    def __iter__(self) -> Iterator[RecordFrame]:
        while True:
            frame = self._next()
            if frame is _END:
                return
            yield frame

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_END = object()


# -- digests --------------------------------------------------------------------------------


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=repr).encode()


def input_user(item: Any) -> str | None:
    """The user an engine input concerns (None for e.g. a book snapshot request)."""
    order = getattr(item, "order", None)
    user = getattr(order, "user", None) if order is not None else getattr(item, "user", None)
    return user if isinstance(user, str) else None


def balance_queries(users: Iterable[str], gateway_id: str) -> list[tuple[Dest, AccountQuery]]:
    """The final queries behind the ``balances`` digest; request ids count down from -1."""
    out: list[tuple[Dest, AccountQuery]] = []
    for user in users:
        for what in BALANCE_VIEWS:
            rid = -(len(out) + 1)
            out.append((Dest("account", user), AccountQuery(
                reply_to=ReplyTo(gateway=gateway_id, conn=RECORD_CONN, request_id=rid),
                user=user, what=what)))
    return out


def collect_balances(queries: list[tuple[Dest, AccountQuery]],
                     replies: Iterable[Any]) -> dict[str, dict[str, Any]] | None:
    """The views the answers to :func:`balance_queries` carry; None if one is missing."""
    by_id: dict[Any, Reply] = {
        r.reply_to.request_id: r for r in replies
        if isinstance(r, Reply) and r.reply_to.conn == RECORD_CONN}
    views: dict[str, dict[str, Any]] = {}
    for _, q in queries:
        reply = by_id.get(q.reply_to.request_id)
        if reply is None:
            return None
        result = reply.result if reply.ok else {"error": reply.code}
        views.setdefault(q.user, {})[q.what] = result
    return views


class RunDigest:
    """The digests of one run's outputs, the same code for the live run and a replay.

    * ``trades``: every public trade as ``(symbol, trade_id, price, qty, taker_side,
      ts, maker, taker)`` in book order (by symbol, then trade id), ``maker`` and
      ``taker`` being ``(user, order_id)`` from the ``trade_executed`` events of
      the users whose events this gateway received (None otherwise);
    * ``balances``: each user's final ``account``, ``positions`` and ``orders``
      views (:data:`BALANCE_VIEWS`), by user;
    * ``events``: per user and symbol, the P0/P1 private events as ``(kind,
      data)`` in seq order. P2/P3 events and the seqs themselves are left out:
      the router conflates P2/P3 on wall-clock timer ticks in the actor engine
      and on the messages' own times in a replay, and a conflated event takes a
      seq when it flushes, so the numbering legitimately differs; what P2/P3
      carry (account and positions) is covered by ``balances``. The interleaving
      of one user's streams of different books is left out too: it is the order
      the book hosts ran in, which a host fault changes (Thespian re-queues a
      failed handler's message behind the others) and concurrent processes do
      not fix. Anything that order decides shows anyway: a risk check that went
      the other way changes the order's own stream and the balances.

    Each digest is the SHA-256 of the canonical JSON rows (:meth:`rows`).
    """

    def __init__(self) -> None:
        self.trades: dict[tuple[str, int], PublicTrade] = {}
        self.sides: dict[tuple[str, int], dict[str, tuple[str, int]]] = {}
        self.events: dict[str, dict[int, tuple[str, Any]]] = {}
        self.balances: dict[str, dict[str, Any]] | None = None

    def feed(self, messages: Iterable[Any]) -> None:
        for m in messages:
            if isinstance(m, PublicTrade):
                self.trades[(m.symbol, m.trade_id)] = m
            elif isinstance(m, Delivery):
                lane = self.events.setdefault(m.user, {})
                for e in m.events:
                    if e.kind == "trade_executed":
                        d = e.data
                        self.sides.setdefault((str(d["symbol"]), int(d["trade_id"])), {})[
                            str(d["liquidity"])] = (m.user, int(d["order_id"]))
                    if e.priority <= 1:
                        lane[e.seq] = (e.kind, e.data)

    def rows(self, name: str) -> list[Any]:
        """The canonical rows of one digest (for diffing two runs)."""
        if name == "trades":
            rows: list[Any] = []
            for key in sorted(self.trades):
                t = self.trades[key]
                side = self.sides.get(key, {})
                rows.append([t.symbol, t.trade_id, t.price, t.qty, t.taker_side, t.ts,
                             side.get("maker"), side.get("taker")])
            return rows
        if name == "events":
            rows = []
            for user in sorted(self.events):
                streams: dict[str, list[Any]] = {}
                for _, (kind, data) in sorted(self.events[user].items()):
                    symbol = str(data.get("symbol", ""))
                    streams.setdefault(symbol, []).append([user, symbol, kind, data])
                rows += [row for symbol in sorted(streams) for row in streams[symbol]]
            return rows
        if name == "balances":
            b = self.balances or {}
            return [[user, b[user]] for user in sorted(b)]
        raise ValueError(f"no digest {name!r}")

    def digest(self, name: str) -> str | None:
        if name == "balances" and self.balances is None:
            return None
        h = hashlib.sha256()
        for row in self.rows(name):
            h.update(_canon(row))
            h.update(b"\n")
        return h.hexdigest()

    def digests(self) -> dict[str, str | None]:
        return {name: self.digest(name) for name in DIGESTS}

    def counts(self) -> dict[str, int]:
        return {"trades": len(self.trades),
                "events": sum(len(lane) for lane in self.events.values()),
                "users": len(self.balances or {})}


class _Recorder:
    """The bridge thread's side of a recording."""

    def __init__(self, path: str, header: dict[str, Any]) -> None:
        self.writer = RecordWriter(path, header)
        self.digest = RunDigest()
        self.users: dict[str, None] = {}
        self.passes = 0
        self.items = 0
        self.batches = 0
        self.outputs = 0
        self.opaque = 0

    def inputs(self, link: EngineLink, items: list[tuple[Dest, Any]]) -> None:
        per_host: dict[str, list[tuple[Dest, Any]]] = {}
        for dest, item in items:
            # The same grouping EngineLink.send makes (host_of is what it calls); a
            # fan-out link sends the pass as one batch, which the Exchange splits.
            host = FANOUT_HOST if link.fanout else link.host_of(dest)
            per_host.setdefault(host, []).append((dest, item))
            user = input_user(item)
            if user is not None:
                self.users.setdefault(user)
        self.items += len(items)
        self.batches += len(per_host)
        self.writer.frame(RecordedInput(
            pass_no=self.passes, wall_ns=time.time_ns(),
            batches=tuple((h, tuple(b)) for h, b in per_host.items())))

    def call(self, call: EngineCall | OpaqueCall) -> None:
        if isinstance(call, OpenAccounts):
            for user in call.users:
                self.users.setdefault(user)
        else:
            self.opaque += 1
        self.writer.frame(RecordedCall(pass_no=self.passes, call=call))

    def received(self, got: list[Any]) -> None:
        kept = tuple(m for m in got if isinstance(m, _RECORDED_OUTPUTS))
        if kept:
            self.outputs += len(kept)
            self.digest.feed(kept)
            self.writer.frame(RecordedOutput(pass_no=self.passes, messages=kept))

    def end_pass(self) -> None:
        self.passes += 1
        self.writer.flush()

    def finish(self, link: EngineLink | None, *, settle_s: float, error: str | None) -> None:
        """Query the final balances (when the link still works) and write the footer."""
        users = tuple(sorted(self.users))
        if link is not None and error is None:
            try:
                self._final_balances(link, users, settle_s)
            except Exception as exc:
                log.exception("recording: the final balance queries failed")
                error = f"final balance queries failed: {exc!r}"
        self.writer.frame(RecordFooter(
            digests=self.digest.digests(), users=users, balances=self.digest.balances,
            counts={**self.digest.counts(), "passes": self.passes, "items": self.items,
                    "batches": self.batches, "outputs": self.outputs, "opaque": self.opaque},
            error=error))
        self.writer.close()

    def _final_balances(self, link: EngineLink, users: tuple[str, ...], settle_s: float) -> None:
        # Take in what is still on its way; an embedded engine is quiescent after
        # each send already (simpleSystemBase runs every actor to completion).
        got = link.receive(settle_s)
        while got:
            self.received(got)
            got = link.receive(settle_s)
        queries = balance_queries(users, link.gateway_id)
        if queries:
            link.send(queries)
        answers: list[Any] = []

        def answered(received: list[Any]) -> bool:
            answers[:] = received
            return collect_balances(queries, received) is not None

        try:
            link.wait_for(answered, timeout=10.0)
        finally:
            self.received(answers)
        self.digest.balances = collect_balances(queries, answers)


class EngineBridge:
    """A bridge thread between trio and the actor engine; see the module docstring."""

    def __init__(self, options: BridgeOptions) -> None:
        self.options = options
        self._requests: queue.Queue[_Request] = queue.Queue(maxsize=options.max_pending)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._idle = False
        self._recorder: _Recorder | None = None
        self.sent_batches = 0
        self.sent_items = 0
        self.received = 0
        self._switch_interval: tuple[float, float] | None = None  # (ours, the one before)
        self._gc_threshold: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        #: What ended the bridge thread after it started (None while it runs or
        #: once it stopped cleanly); ``failed`` is set on the trio side when it does.
        self.failure: BaseException | None = None
        self.failed = trio.Event()
        #: Free places for deliveries handed to trio and not yet run (attached only).
        self._ahead = threading.Semaphore(DELIVERIES_AHEAD)

    # -- trio side -------------------------------------------------------------------

    def submit(self, dest: Dest, item: Any) -> None:
        """Queue one request for the engine (non-blocking).

        Raises:
            BridgeBusy: the queue is full.
            BridgeStopped: the bridge is not running.
        """
        self._enqueue((dest, item))

    def open_accounts(self, *users: str) -> threading.Event:
        """Make sure each user's account host exists, in order with the requests
        queued before and after; a typed call (recorded as data). Non-blocking.

        Returns:
            An event set on the bridge thread once the accounts are open (or the
            attempt failed and was logged).

        Raises:
            BridgeBusy: the queue is full.
            BridgeStopped: the bridge is not running.
        """
        done = threading.Event()
        self._enqueue(_Typed(OpenAccounts(users=users), done))
        return done

    def open_account(self, user: str) -> threading.Event:
        """:meth:`open_accounts` of one user (the gateway does it at login)."""
        return self.open_accounts(user)

    def call(self, fn: Callable[[EngineLink], Any]) -> None:
        """Run ``fn(link)`` on the bridge thread. A recording keeps only an
        :class:`OpaqueCall` marker: prefer a typed call where there is one.
        Non-blocking; raises as :meth:`submit` does."""
        self._enqueue(fn)

    async def submit_waiting(self, dest: Dest, item: Any) -> None:
        """:meth:`submit`, but wait (off the event loop) while the queue is full:
        for bulk work that must not be refused, such as funding accounts at boot."""
        await self._enqueue_waiting((dest, item))

    async def open_accounts_waiting(self, *users: str) -> threading.Event:
        """:meth:`open_accounts`, but wait (off the event loop) while the queue is full."""
        done = threading.Event()
        await self._enqueue_waiting(_Typed(OpenAccounts(users=users), done))
        return done

    def _enqueue(self, request: _Request) -> None:
        # Never a blocking put: this runs on the trio thread, and a full queue would
        # stop every connection until the bridge thread's next pass.
        if self._stop.is_set() or self._thread is None:
            raise BridgeStopped("the engine bridge is not running")
        try:
            self._requests.put_nowait(request)
        except queue.Full:
            raise BridgeBusy("the engine is behind; try again") from None

    async def _enqueue_waiting(self, request: _Request) -> None:
        try:
            self._enqueue(request)
            return
        except BridgeBusy:
            pass

        def put() -> None:  # on a worker thread: a blocking put, until the bridge stops
            while not self._stop.is_set():
                try:
                    self._requests.put(request, timeout=0.05)
                    return
                except queue.Full:
                    continue
            raise BridgeStopped("the engine bridge is not running")

        await trio.to_thread.run_sync(put)

    async def start(self, deliver: Callable[[list[Any]], None]) -> None:
        """Start the bridge thread; returns when the engine is reachable.

        Args:
            deliver: called on the trio thread with each pass's engine messages.
        """
        token = trio.lowlevel.current_trio_token()
        self.failure = None
        self.failed = trio.Event()
        self._tune_interpreter()
        self._thread = threading.Thread(
            target=self._run, args=(token, deliver), name="engine-bridge", daemon=True
        )
        self._thread.start()
        await trio.to_thread.run_sync(self._ready.wait)
        if self._error is not None:
            self._restore_interpreter()
            raise RuntimeError(f"the engine bridge failed to start: {self._error}") from None

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await trio.to_thread.run_sync(self._thread.join)
        self._restore_interpreter()

    def _tune_interpreter(self) -> None:
        """The embedded engine's interpreter settings (see :class:`BridgeOptions`)."""
        if self.options.base != "simpleSystemBase":
            return
        si = self.options.switch_interval_s
        if si is not None:
            before = sys.getswitchinterval()
            sys.setswitchinterval(si)
            self._switch_interval = (sys.getswitchinterval(), before)
        if self.options.gc_threshold is not None:
            old = gc.get_threshold()
            gc.set_threshold(self.options.gc_threshold, *old[1:])
            self._gc_threshold = (gc.get_threshold(), old)

    def _restore_interpreter(self) -> None:
        """Undo :meth:`_tune_interpreter`, unless someone changed a setting since."""
        if self._switch_interval is not None:
            ours, before = self._switch_interval
            self._switch_interval = None
            if sys.getswitchinterval() == ours:
                sys.setswitchinterval(before)
        if self._gc_threshold is not None:
            ours_gc, before_gc = self._gc_threshold
            self._gc_threshold = None
            if gc.get_threshold() == ours_gc:
                gc.set_threshold(*before_gc)

    # -- the bridge thread ---------------------------------------------------------------

    def _header(self, recovered_turns: int | None) -> dict[str, Any]:
        opts = self.options
        assert opts.engine is not None
        return {"format": RECORD_FORMAT, "version": RECORD_VERSION,
                "gateway_id": opts.gateway_id, "base": opts.base,
                "engine": attrs.asdict(opts.engine), "recovered_turns": recovered_turns,
                "started_ns": time.time_ns()}

    def _run(self, token: trio.lowlevel.TrioToken, deliver: Callable[[list[Any]], None]) -> None:
        opts = self.options
        asys: Any = None
        try:
            if opts.record is not None and opts.engine is None:
                raise ValueError("a recording needs the engine's config (BridgeOptions.engine)")
            recovered: int | None = None
            if opts.base == "simpleSystemBase":
                asys = start_system(SystemConfig(base="simpleSystemBase"))
                assert opts.engine is not None, "the embedded bridge needs an engine config"
                # Every host runs on this thread: group commit per pass (flush_shared
                # below, before anything leaves the process) instead of per host turn.
                engine = attrs.evolve(opts.engine, group_commit="pass")
                recovered = boot_engine(asys, engine).recovered_turns
                flush_shared()
            else:
                port = opts.admin_port or 19500
                asys = start_system(SystemConfig(base=opts.base, admin_port=port), attach=True)
            if opts.record is not None:
                self._recorder = _Recorder(opts.record, self._header(recovered))
            # Embedded: the Exchange splits each pass's requests per host inside the
            # system, so every host's batch is queued at once (see EngineLink.send).
            link = EngineLink(asys, opts.gateway_id,
                              fanout=opts.base == "simpleSystemBase")
        except BaseException as exc:
            if self._recorder is not None:
                self._recorder.writer.close()
            self._error = exc
            self._ready.set()
            if asys is not None and opts.base == "simpleSystemBase":
                stop_system(asys)
            return
        self._ready.set()
        failed: str | None = None
        try:
            while not self._stop.is_set():
                self._pass(link, token, deliver)
            # What the gateway asked before it stopped the bridge (the connections'
            # cancel_on_disconnect, as they closed) still reaches the engine and its
            # journal: the stop may land between a pass's last look at the queue and
            # the loop's test.
            if not self._requests.empty():
                self._pass(link, token, deliver)
        except trio.RunFinishedError:
            pass
        except Exception as exc:
            # Nothing would reach the engine any more and every request would hang
            # until its timeout: tell the trio side, which stops the gateway with it.
            failed = f"the bridge failed: {exc!r}"
            log.exception("the engine bridge failed")
            self.failure = exc
            with contextlib.suppress(trio.RunFinishedError, RuntimeError):
                trio.from_thread.run_sync(self.failed.set, trio_token=token)
        finally:
            try:
                if self._recorder is not None:
                    settle = opts.listen_s if opts.base == "simpleSystemBase" else 0.25
                    self._recorder.finish(link, settle_s=settle, error=failed)
            finally:
                try:
                    link.close()
                finally:
                    if opts.base == "simpleSystemBase":
                        stop_system(asys)

    def _send(self, link: EngineLink, items: list[tuple[Dest, Any]]) -> None:
        if self._recorder is not None:
            self._recorder.inputs(link, items)
        self.sent_batches += link.send(items)
        self.sent_items += len(items)

    def _call(self, link: EngineLink, req: _Typed | Callable[[EngineLink], Any]) -> None:
        rec = self._recorder
        if isinstance(req, _Typed):
            if rec is not None:
                rec.call(req.call)
            try:
                for user in req.call.users:
                    link.open_account(user)
            except Exception:
                log.exception("opening accounts failed")
            finally:
                req.done.set()
            return
        if rec is not None:
            rec.call(OpaqueCall(name=getattr(req, "__qualname__", repr(req))))
        try:
            req(link)
        except Exception:
            log.exception("an engine call failed")

    def _pass(self, link: EngineLink, token: trio.lowlevel.TrioToken,
              deliver: Callable[[list[Any]], None]) -> None:
        items: list[tuple[Dest, Any]] = []
        first = True
        while True:
            try:
                if first and self._idle and self.options.base == "simpleSystemBase":
                    # simpleSystemBase's listen() returns at once when no actor has work
                    # (it does not wait for its timeout), so an idle bridge would spin and
                    # starve the trio thread of the GIL: block on the queue briefly instead
                    # (a new request wakes it at once; due timers run on the next pass).
                    req = self._requests.get(timeout=self.options.listen_s)
                else:
                    req = self._requests.get_nowait()
            except queue.Empty:
                break
            finally:
                first = False
            if isinstance(req, tuple):
                items.append(req)
            else:
                if items:
                    self._send(link, items)
                    items = []
                self._call(link, req)
        if items:
            self._send(link, items)
        got = link.receive(self.options.listen_s)
        self._idle = not got and not items
        # Write-ahead at the process edge: the pass's journal writes are committed
        # before any reply or event it produced reaches the gateway (a failure
        # here stops the bridge; nothing of the pass is delivered).
        flush_shared()
        if self._recorder is not None:
            if got:
                self._recorder.received(got)
            self._recorder.end_pass()
        if got:
            self.received += len(got)
            if self.options.base == "simpleSystemBase":
                trio.from_thread.run_sync(deliver, got, trio_token=token)
            else:
                self._deliver_soon(token, deliver, got)

    def _deliver_soon(self, token: trio.lowlevel.TrioToken,
                      deliver: Callable[[list[Any]], None], got: list[Any]) -> None:
        """Hand ``got`` to trio without waiting for it to run (see the module
        docstring), in order; wait while :data:`DELIVERIES_AHEAD` are pending."""
        while not self._ahead.acquire(timeout=0.1):
            if self._stop.is_set() and self._requests.empty():
                return  # trio is gone or going: nobody takes deliveries any more

        def run() -> None:
            try:
                deliver(got)
            except Exception:  # raised in a run_sync_soon callback, it would end trio.run
                log.exception("the gateway failed on a delivery from the engine")
            finally:
                self._ahead.release()

        try:
            token.run_sync_soon(run)
        except BaseException:
            self._ahead.release()
            raise
