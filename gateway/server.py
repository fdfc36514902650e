"""The trio WebSocket gateway: ``ws://HOST:PORT/v1``, CBOR or JSON frames.

Thin I/O in the style of trio-websocket's reader task: a nursery per
connection with one reader (bytes → :class:`protocol.ServerConnection` →
request events → the handler table) and one writer draining a bounded queue.
Requests go to the engine through the :class:`~gateway.bridge.EngineBridge`;
what comes back (replies, private deliveries, market data) is fanned out here:
replies to the one connection that asked, a user's private events to each of
that user's sessions through the :class:`~actors.sessions.SessionHub`
(delivery window, conflation, slow-consumer cut), market data to the
channel's subscribers with a per-channel ``seq``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from actors.boot import BooksRestarted
from actors.cores.session import SessionConfig, SessionDisconnect, SessionSend
from actors.messages import (
    AccountCancel,
    AccountCancelAll,
    AccountPlace,
    AccountQuery,
    BookSnapshotRequest,
    Delivery,
    Dest,
    Reply,
    ReplyTo,
    RouterAttach,
    RouterDetach,
    RouterReplay,
)
from actors.sessions import SessionHub
from gateway.bridge import BridgeBusy, BridgeFailed, EngineBridge
from protocol import (
    POLICY_VIOLATION,
    SUBPROTOCOLS,
    Ack,
    BadInput,
    BookDelta,
    Cancel,
    CancelAll,
    Encoding,
    ErrorCode,
    ErrorResponse,
    Instrument,
    Login,
    MarketFrame,
    MarketFrameTemplate,
    Ping,
    Place,
    Pong,
    PublicTrade,
    Query,
    RemoteProtocolError,
    Request,
    Response,
    Resume,
    ServerConnection,
    ServerFrame,
    Subscribe,
    TickerUpdate,
    Unsubscribe,
)

log = logging.getLogger(__name__)

PasswordCheck = Callable[[str, str], bool]


@attrs.frozen(kw_only=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 0
    #: The largest frame answered normally; a larger one is answered ``bad_frame``.
    max_frame: int = 64 * 1024
    #: Hard cap on one WebSocket message (bytes, or characters of a text message):
    #: trio-websocket assembles a message whole before the gateway sees it, so this
    #: bounds what a connection makes the server buffer. Past it trio-websocket
    #: closes the connection with 1009 (message too big). None: 16 * ``max_frame``.
    max_message: int | None = None
    #: Frames waiting for one connection's writer; past it the connection is cut.
    outbound_queue: int = 4096
    #: A connection that sends nothing for this long is closed (send ``ping``).
    idle_timeout_s: float = 60.0
    #: Before a close the server decides (1008, idle 1001), the frames already queued
    #: get this long to go out, then the close handshake this long again.
    close_drain_s: float = 1.0
    max_consecutive_bad: int = 32
    #: An engine request not answered in this long is answered ``timeout`` (a login
    #: fails, a resume is refused, a book snapshot is asked for again): a request can
    #: die with an actor that is killed before it journaled the request.
    request_timeout_s: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    session: SessionConfig = attrs.field(factory=SessionConfig)

    @property
    def message_cap(self) -> int:
        """The hard cap in force (never below ``max_frame``)."""
        cap = 16 * self.max_frame if self.max_message is None else self.max_message
        return max(cap, self.max_frame)


#: A writer that wakes takes up to this many queued frames, or about this many
#: bytes, into one socket write (bounds the joined buffer).
WRITE_FRAMES = 256
WRITE_BYTES = 256 * 1024
#: The close reason (code 1001) of every connection when the gateway shuts down.
SHUTDOWN_REASON = "server shutting down"


def can_coalesce(ws: WebSocketConnection) -> bool:
    """Whether this trio-websocket has the internals :func:`write_frames` uses
    (0.12: ``_wsproto``, ``_stream``, ``_stream_lock``); otherwise one
    ``send_message`` per frame."""
    return all(hasattr(ws, name) for name in
               ("_wsproto", "_stream", "_stream_lock", "_close_reason", "_abort_web_socket"))


async def write_frames(ws: WebSocketConnection, frames: list[bytes | str],
                       unencodable: Callable[[], bytes | str]) -> None:
    """Send ``frames`` as WebSocket messages in order, in one ``send_all``.

    ``send_message`` makes one socket write (and one trio checkpoint) per frame;
    a connection that is sent a reply, a private frame and market frames in one
    engine pass got three. This is ``WebSocketConnection._send`` for several
    messages: wsproto encodes each (before it changes any state), the bytes are
    joined and written under the connection's stream lock. A text frame no UTF-8
    can carry becomes ``unencodable()`` (an ``internal`` error frame) alone.

    Raises:
        ConnectionClosed: the connection is closed or closing.
    """
    from wsproto.events import BytesMessage, TextMessage

    if ws._close_reason:
        raise ConnectionClosed(ws._close_reason)
    chunks: list[bytes] = []
    for frame in frames:
        try:
            chunks.append(ws._wsproto.send(
                TextMessage(data=frame) if isinstance(frame, str) else BytesMessage(data=frame)))
        except ValueError:  # UnicodeEncodeError
            substitute = unencodable()
            chunks.append(ws._wsproto.send(
                TextMessage(data=substitute) if isinstance(substitute, str)
                else BytesMessage(data=substitute)))
    async with ws._stream_lock:
        try:
            await ws._stream.send_all(b"".join(chunks))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            assert ws._close_reason is not None
            raise ConnectionClosed(ws._close_reason) from None


class Outbox:
    """One connection's bounded queue of encoded frames: the fan-out (synchronous, on
    the trio thread) puts, the connection's writer task takes.

    What a trio memory channel did here, lighter: a channel per connection cost
    ~1.9 KiB of every idle connection (its state keeps a deque and two ordered
    dicts of waiting tasks, plus the two channel objects); this is a list and a
    slot for the one waiting writer. :meth:`send_nowait` raises ``trio.WouldBlock``
    when ``limit`` frames wait and ``trio.ClosedResourceError`` after
    :meth:`close`; after :meth:`close` the writer still takes what is queued.
    """

    __slots__ = ("_closed", "_frames", "_limit", "_waiter")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("an outbox holds at least one frame")
        self._frames: list[bytes | str] = []
        self._limit = limit
        self._closed = False
        self._waiter: trio.lowlevel.Task | None = None

    def __len__(self) -> int:
        return len(self._frames)

    def send_nowait(self, data: bytes | str) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the outbox is closed")
        if len(self._frames) >= self._limit:
            raise trio.WouldBlock
        self._frames.append(data)
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            trio.lowlevel.reschedule(waiter)

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def receive_nowait(self) -> bytes | str:
        """The oldest frame (tests); ``trio.WouldBlock`` if none, ``trio.EndOfChannel``
        once closed and empty."""
        if self._frames:
            return self._frames.pop(0)
        raise trio.EndOfChannel if self._closed else trio.WouldBlock

    async def take(self, most: int, max_bytes: int) -> list[bytes | str] | None:
        """Wait for frames and take the oldest ones, at least one and at most ``most``
        (or about ``max_bytes``); None once the outbox is closed and empty. One task
        takes at a time (the connection's writer)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._frames:
            if self._closed:
                return None
            if self._waiter is not None:
                raise trio.BusyResourceError("another task is taking from this outbox")
            self._waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        frames = self._frames
        n, size = 1, len(frames[0])
        while n < len(frames) and n < most and size < max_bytes:
            size += len(frames[n])
            n += 1
        taken = frames[:n]
        del frames[:n]
        return taken


#: 2025-01-01T00:00:00Z in units of 10 ms: order ids count from there.
_ID_EPOCH = 1_735_689_600 * 100


class OrderIds:
    """Engine order ids: ``(centiseconds since 2025 << 16) | counter``.

    Unique across gateway restarts (a restart starts at a later time) and below
    2**53 until about 2068, so JSON clients in any language (JavaScript numbers
    included) read them exactly. A gateway that allocates more than 65,536 ids
    within 10 ms moves on to the next 10 ms slot early.
    """

    def __init__(self, now_ns: int) -> None:
        self._slot = now_ns // 10_000_000 - _ID_EPOCH
        self._next = 0

    def next(self) -> int:
        if self._next >= (1 << 16) - 1:  # the counter lives in the low 16 bits
            self._slot = max(self._slot + 1, time.time_ns() // 10_000_000 - _ID_EPOCH)
            self._next = 0
        self._next += 1
        return (self._slot << 16) | self._next


def _levels_data(inst: Instrument, bids: Iterable[tuple[int, int]],
                 asks: Iterable[tuple[int, int]]) -> dict[str, Any]:
    """A book's levels (``(price, qty)`` in ticks and lots) as the wire's ``bids`` and
    ``asks`` of a snapshot or a delta: ``[price, qty]`` decimal strings. A delta's
    removed level is qty ``"0"`` exactly (PROTOCOL.md), not the lot's ``"0.000"``."""
    return {"bids": [[inst.price_str(p), inst.qty_str(q) if q else "0"] for p, q in bids],
            "asks": [[inst.price_str(p), inst.qty_str(q) if q else "0"] for p, q in asks]}


def _trade_data(inst: Instrument, trade_id: int, price: int, qty: int,
                taker_side: str) -> dict[str, Any]:
    """A public trade as the wire's ``trade`` frame data (a trades snapshot's row adds
    its ``ts``)."""
    return {"trade_id": trade_id, "price": inst.price_str(price), "qty": inst.qty_str(qty),
            "taker_side": taker_side}


@attrs.define
class _Conn:
    id: int
    ws: WebSocketConnection
    proto: ServerConnection
    send: Outbox
    cancel_on_disconnect: bool = False
    subs: set[str] = attrs.field(factory=set)
    waiting_snapshot: set[str] = attrs.field(factory=set)
    #: Per-channel seq of the market frames of this connection (a dropped frame
    #: still takes its seq, so the client sees the gap and resubscribes).
    chan_seq: dict[str, int] = attrs.field(factory=dict)
    #: Per ``trades`` channel the newest trade id of its snapshot: a trade up to it
    #: that arrives later (a re-created book's late trade) is history the snapshot
    #: covered. ``None`` until the first trades snapshot (an idle connection keeps
    #: no dict).
    trades_upto: dict[str, int] | None = None
    login_pending: bool = False
    #: ``resume`` requests sent to the router and not answered yet; meanwhile the
    #: user's live events wait in ``stash`` (not in the session), so a refused
    #: resume leaves the session exactly as it was.
    resumes: int = 0
    stash: list[Any] = attrs.field(factory=list)
    #: Set once nothing more is to be queued (the client left, or the server decided
    #: to close: then ``close_with`` holds the code and reason).
    closed: bool = False
    close_with: tuple[int, str] | None = None
    reader_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: The writer task ended; ``writer_done`` is made only when a close waits for it
    #: (a trio.Event per connection cost ~0.9 KiB of every idle connection).
    writer_finished: bool = False
    writer_done: trio.Event | None = None


class _TradeIds:
    """Which of one symbol's trade ids the gateway has published.

    A book numbers its trades 1, 2, 3, … and sends them in order, so an id above
    the highest published means the ids between were lost: a killed book's sends
    die with it, and when its next incarnation speaks the link lets go of what
    the old one left waiting behind the hole (``EngineLink._in_order``). The
    re-created book resends its newest trades; those below the highest that were
    never published are published then (after later ones), the rest are
    duplicates. Only holes seen after the first trade count, and at most
    :data:`MAX_HOLES` of them are remembered (the oldest are forgotten).
    """

    MAX_HOLES = 4096

    __slots__ = ("high", "holes")

    def __init__(self) -> None:
        self.high = 0
        self.holes: set[int] = set()

    def publish(self, trade_id: int) -> bool:
        """Whether ``trade_id`` is to be published now (it is then recorded)."""
        high = self.high
        if trade_id > high:
            if high and trade_id > high + 1:
                self.holes.update(range(max(high + 1, trade_id - self.MAX_HOLES), trade_id))
                if len(self.holes) > self.MAX_HOLES:
                    self.holes = set(sorted(self.holes)[-self.MAX_HOLES:])
            self.high = trade_id
            return True
        if trade_id in self.holes:
            self.holes.discard(trade_id)
            return True
        return False


@attrs.frozen
class _Pending:
    conn: int
    request_id: Any
    op: str
    extra: Any = None
    deadline: float = 0.0  # time.monotonic() past which it is answered ``timeout``


async def stop_on_signals(signals: AsyncIterator[int], stop: trio.Event,
                          scope: trio.CancelScope) -> None:
    """The first signal sets ``stop`` (the caller then runs :meth:`Gateway.shutdown`);
    a second one, while that runs, cancels ``scope`` at once.

    ``signals`` is an ``open_signal_receiver`` whose block encloses ``scope``: a
    receiver closed while this task still iterates it raises ``RuntimeError``.
    """
    async for _ in signals:
        if stop.is_set():
            scope.cancel()
            return
        stop.set()


class Gateway:
    """The WebSocket server; see the module docstring."""

    def __init__(
        self,
        bridge: EngineBridge,
        instruments: Mapping[str, Instrument],
        check_password: PasswordCheck,
        config: GatewayConfig | None = None,
    ) -> None:
        self.bridge = bridge
        self.instruments = dict(instruments)
        self.check_password = check_password
        self.config = config or GatewayConfig()
        self.hub = SessionHub(self.instruments, self.config.session)
        self.conns: dict[int, _Conn] = {}
        self._conn_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._order_ids = OrderIds(time.time_ns())
        self._last_price: dict[str, int] = {}
        #: Per symbol the trade ids published (see :class:`_TradeIds`): a re-created
        #: book resends its last ones (actors.desks.RECENT_TRADES).
        self._trade_ids: dict[str, _TradeIds] = {}
        #: Per ``trades`` channel the newest trade id any of its snapshots held: a
        #: trade up to it is checked against each subscriber's ``trades_upto``.
        self._trades_snapshot_upto: dict[str, int] = {}
        self.port = 0
        #: channel → the connections subscribed to it (market fan-out without a
        #: scan of every connection per event).
        self._subscribers: dict[str, dict[int, _Conn]] = {}
        self.frames_out = 0
        #: Socket writes that carried several queued frames (see ``_writer``).
        self.coalesced_writes = 0
        self.trades = 0
        #: Gaps in a user's live events that the gateway had the router fill (see
        #: ``_deliver``).
        self.gap_repairs = 0
        #: Fresh snapshots sent to a book's subscribers after its host was re-created
        #: (one per book and restart; see ``_refresh_book``).
        self.book_refreshes = 0
        #: Books whose refresh could not be asked for yet (the bridge was busy).
        self._refresh_due: set[str] = set()
        #: :meth:`shutdown` has begun: no new connections or requests.
        self.stopping = False
        self._serve_scope: trio.CancelScope | None = None
        self._listener_scope: trio.CancelScope | None = None
        #: Set when :meth:`shutdown` has decided every connection's close; until then a
        #: connection whose reader it stopped waits for its requests' answers.
        self._closing_all = trio.Event()
        #: Made by :meth:`shutdown` while it waits: set on each engine pass and
        #: connection close, so it looks again at what is still pending or open.
        self._shutdown_wakeup: trio.Event | None = None

    # -- serving ----------------------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the bridge and accept connections until cancelled."""
        await self.bridge.start(self._from_engine)
        try:
            async with trio.open_nursery() as nursery:
                self._serve_scope = nursery.cancel_scope
                server = await nursery.start(self._listen, nursery)
                self.port = server.port
                nursery.start_soon(self._expire_requests)
                nursery.start_soon(self._watch_bridge, nursery.cancel_scope)
                task_status.started(self.port)
        finally:
            with trio.CancelScope(shield=True):
                await self.bridge.stop()
        failure = self.bridge.failure
        if failure is not None:
            raise BridgeFailed(f"the engine bridge failed: {failure!r}") from failure

    async def _listen(self, handlers: trio.Nursery, *,
                      task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections (their handlers run in ``handlers``) until
        :meth:`shutdown` closes the listener."""
        with trio.CancelScope() as scope:
            self._listener_scope = scope
            await serve_websocket(
                self._handle, self.config.host, self.config.port, ssl_context=None,
                handler_nursery=handlers, max_message_size=self.config.message_cap,
                task_status=task_status)

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop serving without dropping what was already asked; then :meth:`serve` returns.

        In order: the listener closes (no new connections); every connection stops
        reading (no new requests); the engine's answers to the requests already
        read are awaited, up to ``grace_s``, and queued to their connections; each
        connection then gets its queued frames and a close with code 1001
        (:data:`SHUTDOWN_REASON`), each bounded by ``close_drain_s`` as any close;
        their ``cancel_on_disconnect`` and router detach go to the engine, which the
        bridge sends before it stops. A second call does nothing.
        """
        if self.stopping:
            return
        self.stopping = True
        if self._listener_scope is not None:
            self._listener_scope.cancel()
        for conn in list(self.conns.values()):
            conn.reader_scope.cancel()
        with trio.move_on_after(grace_s):
            while any(p.conn in self.conns for p in self._pending.values()):
                await self._wait_shutdown_wakeup()
        self._closing_all.set()
        for conn in list(self.conns.values()):
            self._close(conn, 1001, SHUTDOWN_REASON)
        with trio.move_on_after(2 * self.config.close_drain_s + 1.0):
            while self.conns:
                await self._wait_shutdown_wakeup()
        if self._serve_scope is not None:
            self._serve_scope.cancel()

    async def _wait_shutdown_wakeup(self) -> None:
        self._shutdown_wakeup = trio.Event()
        try:
            await self._shutdown_wakeup.wait()
        finally:
            self._shutdown_wakeup = None

    def _wake_shutdown(self) -> None:
        if self._shutdown_wakeup is not None:
            self._shutdown_wakeup.set()

    async def _watch_bridge(self, scope: trio.CancelScope) -> None:
        """Stop serving (every connection closes) once the bridge thread has failed:
        requests could only hang until their timeout; :meth:`serve` then raises."""
        await self.bridge.failed.wait()
        log.error("gateway: stopping, the engine bridge failed: %r", self.bridge.failure)
        scope.cancel()

    async def _handle(self, request: WebSocketRequest) -> None:
        proposed = request.proposed_subprotocols
        chosen = next((p for p in proposed if p in SUBPROTOCOLS), None)
        ws = await request.accept(subprotocol=chosen)
        conn = _Conn(
            id=next(self._conn_ids), ws=ws, send=Outbox(self.config.outbound_queue),
            proto=ServerConnection(
                encoding=Encoding.from_subprotocol(chosen), instruments=self.instruments,
                max_frame=self.config.max_frame,
                max_consecutive_bad=self.config.max_consecutive_bad),
        )
        self.conns[conn.id] = conn
        self.hub.open(conn.id)
        if self.stopping:  # its handshake was under way when the shutdown began
            self._close(conn, 1001, SHUTDOWN_REASON)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, conn)
                with conn.reader_scope:
                    await self._reader(conn)
                if self.stopping and conn.close_with is None and conn.reader_scope.cancelled_caught:
                    await self._closing_all.wait()  # its answers come first (shutdown)
                if conn.close_with is not None:
                    await self._drain_and_close(conn, *conn.close_with)
                nursery.cancel_scope.cancel()
        finally:
            self._closed(conn)

    async def _reader(self, conn: _Conn) -> None:
        # One idle deadline for many frames, not a cancel scope per frame: the
        # deadline is set from the last frame's arrival only when it expires.
        timeout = self.config.idle_timeout_s
        last = trio.current_time()
        while not conn.closed:
            with trio.CancelScope(deadline=last + timeout) as idle:
                while not conn.closed:
                    try:
                        data = await conn.ws.get_message()  # the only checkpoint
                    except ConnectionClosed:
                        return
                    self._frame_in(conn, data)
                    last = trio.current_time()  # the idle time counts from here
            if idle.cancelled_caught and trio.current_time() >= last + timeout:
                self._close(conn, 1001, f"idle timeout: send ping at least every {timeout:g} s")
                return

    def _frame_in(self, conn: _Conn, data: bytes | str) -> None:
        try:
            self._on_frame(conn, data)
        except Exception:
            log.exception("gateway: frame from connection %s failed", conn.id)
            self._push(conn, ErrorResponse(id=None, code=ErrorCode.INTERNAL,
                                           message="the gateway failed on this frame"))
        if conn.proto.should_close:  # after the answer to this frame was queued
            self._close(conn, POLICY_VIOLATION, "too many bad frames")

    async def _writer(self, conn: _Conn) -> None:
        """Send the connection's queued frames in order; whatever is queued when the
        writer wakes goes out in one socket write (:func:`write_frames`)."""
        most = WRITE_FRAMES if can_coalesce(conn.ws) else 1
        try:
            while True:
                frames = await conn.send.take(most, WRITE_BYTES)
                if frames is None:
                    return  # closed and drained
                try:
                    if len(frames) == 1:
                        await self._send_one(conn, frames[0])
                    else:
                        await write_frames(conn.ws, frames, lambda: self._unencodable(conn))
                        self.coalesced_writes += 1
                except ConnectionClosed:
                    return
        finally:
            conn.writer_finished = True
            if conn.writer_done is not None:
                conn.writer_done.set()

    def _unencodable(self, conn: _Conn) -> bytes | str:
        """The ``internal`` error frame sent in place of a frame UTF-8 cannot carry."""
        log.exception("gateway: connection %s: cannot send a frame", conn.id)
        return conn.proto.send(ErrorResponse(
            id=None, code=ErrorCode.INTERNAL,
            message="the server could not encode a frame for this connection"))

    async def _send_one(self, conn: _Conn, data: bytes | str) -> None:
        try:
            await conn.ws.send_message(data)
        except ValueError:  # UnicodeEncodeError: text no UTF-8 can carry
            # ServerConnection.send never makes such text; should it happen, this
            # one frame becomes an internal error and the gateway keeps serving.
            # (wsproto encodes before it touches any state: the socket is intact.)
            await conn.ws.send_message(self._unencodable(conn))

    def _closed(self, conn: _Conn) -> None:
        conn.closed = True
        self.conns.pop(conn.id, None)
        self._wake_shutdown()
        for ch in conn.subs:
            self._subscribers.get(ch, {}).pop(conn.id, None)
        user = conn.proto.user
        last = self.hub.close(conn.id)
        if last is not None:
            gw = self.bridge.options.gateway_id
            self._submit(Dest("router"), RouterDetach(user=last, gateway=gw))
            if conn.cancel_on_disconnect:
                self._submit(Dest("account", last), AccountCancelAll(
                    reply_to=None, user=last, ts=time.time_ns()))
        elif user is not None and conn.cancel_on_disconnect:
            log.info("cancel_on_disconnect skipped: %s still has sessions", user)

    # -- out ---------------------------------------------------------------------------

    def _push(self, conn: _Conn, frame: ServerFrame, *, droppable: bool = False) -> bool:
        if conn.closed:
            return False
        return self._queue(conn, conn.proto.send(frame), droppable=droppable)

    def _queue(self, conn: _Conn, data: bytes | str, *, droppable: bool = False) -> bool:
        """Queue an encoded frame for ``conn``'s writer (``conn`` is not closed)."""
        try:
            conn.send.send_nowait(data)
        except trio.WouldBlock:
            if droppable:
                return False  # market data: the client sees a seq gap and resubscribes
            self._cut(conn, "slow_consumer")
            return False
        self.frames_out += 1
        return True

    def _cut(self, conn: _Conn, reason: str) -> None:
        self._close(conn, POLICY_VIOLATION, reason)

    def _close(self, conn: _Conn, code: int, reason: str) -> None:
        """Decide to close ``conn``: nothing more is queued, the reader stops, and the
        connection's task drains the queue and closes (:meth:`_drain_and_close`)."""
        if conn.closed:
            return
        conn.closed = True
        conn.close_with = (code, reason)
        conn.reader_scope.cancel()

    async def _drain_and_close(self, conn: _Conn, code: int, reason: str) -> None:
        """Send what is queued (answers included), then close; each step bounded.

        A client that reads nothing keeps the writer blocked: the close handshake
        then waits for the same socket and, past the bound, the TCP stream is
        closed without it (trio-websocket closes it when ``aclose`` is cancelled).
        """
        conn.send.close()  # the writer sends what is queued, then ends
        if not conn.writer_finished:
            conn.writer_done = conn.writer_done or trio.Event()
            with trio.move_on_after(self.config.close_drain_s):
                await conn.writer_done.wait()
        with trio.move_on_after(self.config.close_drain_s):
            await conn.ws.aclose(code, reason)

    def _error(self, conn: _Conn, request_id: Any, code: ErrorCode, message: str) -> None:
        self._push(conn, ErrorResponse(id=request_id, code=code, message=message))

    def _submit(self, dest: Dest, item: Any) -> bool:
        try:
            self.bridge.submit(dest, item)
        except BridgeBusy:
            return False
        return True

    def _ask(self, conn: _Conn, request_id: Any, op: str, dest: Dest,
             make: Callable[[ReplyTo], Any], extra: Any = None) -> bool:
        """Send a request to the engine; False (and ``rate_limited`` answered) when busy."""
        if self._ask_quietly(conn, request_id, op, dest, make, extra):
            return True
        self._error(conn, request_id, ErrorCode.RATE_LIMITED, "the engine is busy; retry")
        return False

    def _ask_quietly(self, conn: _Conn | None, request_id: Any, op: str, dest: Dest,
                     make: Callable[[ReplyTo], Any], extra: Any = None) -> bool:
        """:meth:`_ask` without an answer to the client when busy (the gateway's own
        requests; ``conn`` None: for no connection, answered by ``op``)."""
        token = next(self._tokens)
        conn_id = 0 if conn is None else conn.id  # connection ids start at 1
        reply_to = ReplyTo(gateway=self.bridge.options.gateway_id, conn=conn_id,
                           request_id=token)
        self._pending[token] = _Pending(conn_id, request_id, op, extra,
                                        time.monotonic() + self.config.request_timeout_s)
        if not self._submit(dest, make(reply_to)):
            self._pending.pop(token, None)
            return False
        return True

    # -- in ----------------------------------------------------------------------------

    def _on_frame(self, conn: _Conn, data: bytes | str) -> None:
        session = self.hub.sessions.get(conn.id)
        if conn.closed or session is None:
            return  # cut (slow consumer, abuse): frames still in flight are ignored
        event = conn.proto.receive_frame(data)
        if isinstance(event, BadInput):
            self._push(conn, event.response)
            return
        if not session.allow(time.monotonic_ns()):
            if not isinstance(event, Ack):
                self._error(conn, event.id, ErrorCode.RATE_LIMITED, "slow down")
            return
        try:
            self._dispatch(conn, event)
        except RemoteProtocolError as exc:
            self._error(conn, getattr(event, "id", None), exc.code, exc.message)

    def _dispatch(self, conn: _Conn, req: Request) -> None:
        now = time.time_ns()
        user = conn.proto.user
        if isinstance(req, Ping):
            self._push(conn, Pong(id=req.id, ts=now))
        elif isinstance(req, Login):
            self._login(conn, req)
        elif isinstance(req, Subscribe):
            self._subscribe(conn, req)
        elif isinstance(req, Unsubscribe):
            removed = self.hub.sessions[conn.id].unsubscribe(req.channels)
            conn.subs.difference_update(removed)
            conn.waiting_snapshot.difference_update(removed)
            for ch in removed:
                self._subscribers.get(ch, {}).pop(conn.id, None)
                conn.chan_seq.pop(ch, None)  # a later subscription counts from 1 again
                if conn.trades_upto:
                    conn.trades_upto.pop(ch, None)
            self._push(conn, Response(id=req.id, result={"channels": list(removed)}))
        elif isinstance(req, Query) and req.what == "instruments":
            self._push(conn, Response(id=req.id, result={"instruments": [
                i.to_wire(self._last_price.get(s)) for s, i in self.instruments.items()]}))
        elif user is None:  # ServerConnection already refuses; defence in depth
            self._error(conn, getattr(req, "id", None), ErrorCode.NOT_LOGGED_IN, "log in first")
        elif isinstance(req, Place):
            inst = self.instruments[req.symbol]
            order = req.to_new_order(inst, order_id=self._order_ids.next(), user=user, ts=now)
            ref = self._last_price.get(req.symbol, inst.ref_price)
            self._ask(conn, req.id, "place", Dest("account", user),
                      lambda r: AccountPlace(reply_to=r, order=order, ref_price=ref))
        elif isinstance(req, Cancel):
            self._ask(conn, req.id, "cancel", Dest("account", user), lambda r: AccountCancel(
                reply_to=r, user=user, order_id=req.order_id,
                client_order_id=req.client_order_id, ts=now))
        elif isinstance(req, CancelAll):
            if req.symbol is not None and req.symbol not in self.instruments:
                raise RemoteProtocolError(ErrorCode.UNKNOWN_SYMBOL, f"unknown symbol {req.symbol}")
            self._ask(conn, req.id, "cancel_all", Dest("account", user), lambda r: AccountCancelAll(
                reply_to=r, user=user, symbol=req.symbol, ts=now))
        elif isinstance(req, Query):
            self._ask(conn, req.id, "query", Dest("account", user), lambda r: AccountQuery(
                reply_to=r, user=user, what=req.what))
        elif isinstance(req, Resume):
            # The session moves only when the router accepts (see _reply): a refused
            # resume (after_seq beyond the last seq, replay_unavailable) changes nothing.
            if self._ask(conn, req.id, "resume", Dest("router"), lambda r: RouterReplay(
                    reply_to=r, user=user, after_seq=req.after_seq), extra=req.after_seq):
                conn.resumes += 1
        elif isinstance(req, Ack):
            for ce in self.hub.ack(conn.id, req.seq):
                self._session_effect(conn, ce.effect)

    def _login(self, conn: _Conn, req: Login) -> None:
        if conn.login_pending:
            raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "a login is already in progress")
        conn.login_pending = True

        # argon2 is deliberately slow: verify off the event loop, then continue here.
        async def verify() -> None:
            ok = await trio.to_thread.run_sync(self.check_password, req.user, req.password)
            if conn.closed:
                return
            if not ok:
                self._login_failed(conn)
                self._error(conn, req.id, ErrorCode.AUTH_FAILED, "wrong user or password")
                return
            limit = self.hub.config.max_sessions_per_user
            if len(self.hub.by_user.get(req.user, {})) >= limit:
                self._login_failed(conn)
                self._error(conn, req.id, ErrorCode.TOO_MANY_SESSIONS,
                            f"{req.user} already has {limit} sessions")
                return
            conn.cancel_on_disconnect = req.cancel_on_disconnect
            try:
                self.bridge.open_account(req.user)
                asked = self._ask(conn, req.id, "login", Dest("router"), lambda r: RouterAttach(
                    user=req.user, gateway=self.bridge.options.gateway_id, reply_to=r),
                    extra=req.user)
            except BridgeBusy:  # _ask answers its own busy queue; this is open_account's
                self._error(conn, req.id, ErrorCode.RATE_LIMITED, "the engine is busy; retry")
                asked = False
            if not asked:
                self._login_failed(conn)

        trio.lowlevel.spawn_system_task(verify)

    @staticmethod
    def _login_failed(conn: _Conn) -> None:
        """The login in progress failed (and was answered): it may be sent again."""
        conn.login_pending = False
        conn.proto.login_failed()

    def _subscribe(self, conn: _Conn, req: Subscribe) -> None:
        added = self.hub.sessions[conn.id].subscribe(req.channels)
        self._push(conn, Response(id=req.id, result={"channels": list(req.channels)}))
        for ch in added:
            kind = ch.split(".", 1)[0]
            if kind in ("book", "trades"):
                conn.waiting_snapshot.add(ch)
                self._ask_snapshot(conn, ch)
            else:
                conn.subs.add(ch)
                self._subscribers.setdefault(ch, {})[conn.id] = conn

    def _ask_snapshot(self, conn: _Conn, channel: str) -> None:
        symbol = channel.split(".", 1)[1]

        def make(r: ReplyTo) -> BookSnapshotRequest:
            return BookSnapshotRequest(reply_to=r, symbol=symbol, ts=time.time_ns())

        self._ask(conn, None, "snapshot", Dest("book", symbol), make, extra=channel)

    async def _expire_requests(self) -> None:
        """Answer the engine requests past their deadline (:meth:`_expire`)."""
        period = min(1.0, self.config.request_timeout_s / 4)
        while True:
            await trio.sleep(period)  # the sweep's period, not a wait for an event
            self._expire(time.monotonic())

    def _expire(self, now: float) -> None:
        """Answer ``timeout`` to every engine request asked before ``now`` minus the
        request timeout: the engine lost it (an actor killed before it journaled the
        request) or is stuck, and the client must not wait for ever.

        The pending requests are in the order they were asked, and all have the
        same timeout, so the expired ones are a prefix. A reply that comes after
        all is dropped (its request is no longer pending). The request may have
        taken effect: a ``place`` repeated with its ``client_order_id`` is answered
        with the original order (``duplicate``), as after a dropped connection.
        """
        pending = self._pending
        expired = []
        for token, p in pending.items():
            if p.deadline > now:
                break
            expired.append(token)
        timeout = self.config.request_timeout_s
        for token in expired:
            p = pending.pop(token)
            if p.op == "refresh":
                log.warning("gateway: the %s snapshot for a refresh unanswered for %g s",
                            p.extra, timeout)
                self._refresh_due.add(p.extra)  # read-only: ask again
                continue
            conn = self.conns.get(p.conn)
            if conn is None or conn.closed:
                continue
            log.warning("gateway: %s of connection %d unanswered for %g s", p.op, p.conn,
                        timeout)
            if p.op == "snapshot":
                if p.extra in conn.waiting_snapshot:
                    self._ask_snapshot(conn, p.extra)  # read-only: ask again
                continue
            if p.op == "repair":
                self._repaired(conn, [])  # the gap stays; the client can resume
                continue
            if p.op == "login":
                self._login_failed(conn)
            self._error(conn, p.request_id, ErrorCode.TIMEOUT,
                        f"the engine did not answer within {timeout:g} s; the request may "
                        "have taken effect (a place repeated with the same client_order_id "
                        "is answered with the original order)")
            if p.op == "resume":
                self._resumed(conn, None, [])
        for symbol in sorted(self._refresh_due):
            self._refresh_book(symbol)
        if expired:
            self._wake_shutdown()

    # -- from the engine -----------------------------------------------------------------

    def _from_engine(self, msgs: list[Any]) -> None:
        """One bridge pass: replies, deliveries and market data, in engine order."""
        for m in msgs:
            try:
                self._from_engine_one(m)
            except Exception:
                log.exception("gateway: engine message %s failed", type(m).__name__)
        self._wake_shutdown()

    def _from_engine_one(self, m: Any) -> None:
        if isinstance(m, Reply):
            self._reply(m)
        elif isinstance(m, Delivery):
            self._deliver(m)
        elif isinstance(m, BookDelta | PublicTrade | TickerUpdate):
            self._market(m)
        elif isinstance(m, BooksRestarted):
            for symbol in m.symbols:
                self._refresh_book(symbol)

    def _deliver(self, m: Delivery) -> None:
        """Fan a user's live events out to the user's sessions (``SessionHub.deliver``),
        except that a connection with a resume in flight keeps them in its stash.

        A cut connection stays in the hub until ``_closed`` (its session core,
        closed, takes nothing more), so that ``hub.close`` there still reports the
        user's last session: the router detach and ``cancel_on_disconnect``.
        """
        conn_ids = self.hub.by_user.get(m.user)
        if not conn_ids:
            return
        # A user's sessions are usually sent the same frame: encode it once per encoding.
        shared: dict[tuple[Any, ...], bytes | str] | None = {} if len(conn_ids) > 1 else None
        for conn_id in list(conn_ids):
            conn = self.conns.get(conn_id)
            if conn is None or conn.closed:
                continue
            session = self.hub.sessions[conn_id]
            if not conn.resumes and m.events and m.events[0].seq > session.delivered_seq + 1:
                # A gap: the router numbers a user's events without gaps and sends them
                # in order, so the ones before these were lost or are late (under
                # multiprocTCPBase a killed router's last sends die with it, and its
                # successor's can overtake them). Passed on, these would leave the
                # client holding everything after the gap for ever; instead they wait
                # while the router replays from the session's position, as for a resume.
                self._repair(conn, session.delivered_seq)
            if conn.resumes:
                conn.stash.extend(m.events)
                if len(conn.stash) > self.hub.config.hard_bound:
                    self._cut(conn, "slow_consumer")
                continue
            for eff in session.deliver(m.events):
                self._session_effect(conn, eff, shared)

    def _repair(self, conn: _Conn, after_seq: int) -> None:
        """Ask the router for ``conn``'s user's events after ``after_seq`` (a gap in the
        live stream); the answer goes to :meth:`_repaired`, with no response to the
        client. When the engine is too busy to take the request, the events go on with
        the gap (the client can still resume)."""
        user = conn.proto.user
        if user is not None and self._ask_quietly(
                conn, None, "repair", Dest("router"),
                lambda r: RouterReplay(reply_to=r, user=user, after_seq=after_seq),
                extra=after_seq):
            conn.resumes += 1
            self.gap_repairs += 1

    def _resumed(self, conn: _Conn, after_seq: int | None, replay: list[Any]) -> None:
        """A resume's answer: ``after_seq`` None when refused (the stash goes out as live)."""
        conn.resumes -= 1
        stash, conn.stash = conn.stash, []
        session = self.hub.sessions[conn.id]
        if after_seq is None:
            effects = session.deliver(stash)
        else:
            # The router published everything before answering, so the replay covers
            # the stashed events it overlaps; the session drops the duplicates.
            session.begin_resume(after_seq)
            effects = session.replayed([*stash, *replay], last=True)
        for eff in effects:
            self._session_effect(conn, eff)

    def _repaired(self, conn: _Conn, replay: list[Any]) -> None:
        """A gap repair's answer: the replay and the stashed live events go to the session
        as live ones (it sorts them and drops what it has), so the session keeps its
        positions, its window and the events it holds back, as a resume would not."""
        conn.resumes -= 1
        stash, conn.stash = conn.stash, []
        for eff in self.hub.sessions[conn.id].deliver([*replay, *stash]):
            self._session_effect(conn, eff)

    def _session_effect(self, conn: _Conn, effect: Any,
                        shared: dict[tuple[Any, ...], bytes | str] | None = None) -> None:
        """Apply a session core's effect; ``shared``: frames already encoded for another
        session of the same user in this delivery, by encoding, skipped and seqs."""
        if isinstance(effect, SessionSend):
            if effect.events and not conn.closed:
                self._queue(conn, self._private_frame(conn.proto, effect, shared))
        elif isinstance(effect, SessionDisconnect):
            self._cut(conn, effect.reason)

    @staticmethod
    def _private_frame(proto: ServerConnection, send: SessionSend,
                       shared: dict[tuple[Any, ...], bytes | str] | None) -> bytes | str:
        # The events are the router's SequencedEvents, checked by the router and the
        # session core: encoded as they are (ServerConnection.send_private), with no
        # PrivateEvent/PrivateFrame built and validated for each.
        if shared is None:
            return proto.send_private(send.events, send.skipped)
        # A user's seq names one event, so equal seqs mean equal frames.
        key = (proto.encoding, send.skipped, *[e.seq for e in send.events])
        data = shared.get(key)
        if data is None:
            errors = proto.encode_errors
            data = proto.send_private(send.events, send.skipped)
            if proto.encode_errors == errors:  # not a substitute: share it
                shared[key] = data
        return data

    def _reply(self, reply: Reply) -> None:
        pending = self._pending.pop(int(reply.reply_to.request_id or 0), None)
        if pending is None:
            return
        if pending.op == "refresh":  # the gateway's own, for no connection
            if reply.ok:
                self._refreshed(pending.extra, dict(reply.result or {}))
            else:
                log.warning("gateway: the %s snapshot for a refresh failed: %s %s",
                            pending.extra, reply.code, reply.message)
            return
        conn = self.conns.get(pending.conn)
        if conn is None or conn.closed:
            return
        if pending.op == "login":
            conn.login_pending = False
        if pending.op == "repair":  # the gateway's own request: nothing to answer
            if reply.ok:
                self._repaired(conn, list((reply.result or {})["events"]))
            else:
                log.warning("gateway: a gap repair for connection %d failed: %s %s",
                            conn.id, reply.code, reply.message)
                self._repaired(conn, [])
            return
        if not reply.ok:
            if pending.op == "login":
                conn.proto.login_failed()
            self._push(conn, ErrorResponse(id=pending.request_id,
                                           code=ErrorCode(reply.code or "internal"),
                                           message=reply.message or ""))
            if pending.op == "resume":
                self._resumed(conn, None, [])
            return
        result = dict(reply.result or {})
        if pending.op == "login":
            user = pending.extra
            try:
                self.hub.login(conn.id, user, time.monotonic_ns(), last_seq=result["last_seq"])
            except RemoteProtocolError as exc:
                conn.proto.login_failed()
                self._error(conn, pending.request_id, exc.code, exc.message)
                return
            conn.proto.login_succeeded(user)
            self._push(conn, Response(id=pending.request_id, result={
                "user": user, "session": conn.id, "last_seq": result["last_seq"]}))
        elif pending.op == "snapshot":
            self._snapshot(conn, pending.extra, result)
        elif pending.op == "resume":
            events = result.pop("events")
            self._push(conn, Response(id=pending.request_id, result=result))
            self._resumed(conn, pending.extra, events)
        else:
            self._push(conn, Response(id=pending.request_id, result=result))

    def _snapshot(self, conn: _Conn, channel: str, result: dict[str, Any]) -> None:
        if channel not in conn.waiting_snapshot:
            return  # unsubscribed meanwhile
        conn.waiting_snapshot.discard(channel)
        conn.subs.add(channel)
        self._subscribers.setdefault(channel, {})[conn.id] = conn
        conn.chan_seq[channel] = 0  # a (re)subscription starts the channel afresh
        if channel.startswith("trades."):
            data = self._trades_data(result)
            upto = result["trades"][-1][0] if result["trades"] else 0
            if conn.trades_upto is None:
                conn.trades_upto = {}
            conn.trades_upto[channel] = upto
            if upto > self._trades_snapshot_upto.get(channel, 0):
                self._trades_snapshot_upto[channel] = upto
        else:
            data = self._book_data(result)
        self._push_market(conn, channel, "snapshot", result["ts"], data)

    def _trades_data(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        """A book snapshot's newest trades as the wire's ``trades`` snapshot data."""
        inst = self.instruments[snapshot["symbol"]]
        return {"trades": [
            {**_trade_data(inst, trade_id, price, qty, taker_side), "ts": ts}
            for trade_id, price, qty, taker_side, ts in snapshot["trades"]]}

    def _book_data(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        """A book snapshot's reply as the wire's ``snapshot`` frame data."""
        return _levels_data(self.instruments[snapshot["symbol"]], snapshot["bids"],
                            snapshot["asks"])

    def _refresh_book(self, symbol: str) -> None:
        """A book's host was re-created: ask the book for a snapshot for its subscribers.

        What the killed incarnation sent and nobody received (its last deltas) is
        missing from every subscriber's book, and no seq shows it: the gateway numbers
        market frames per connection. The snapshot comes through the new
        incarnation's ordered channel, so it is applied after the deltas sent before
        it and before those sent after it. Read-only: a busy bridge or a timeout
        only asks again (on the next sweep of ``_expire``).
        """
        self._refresh_due.discard(symbol)
        if symbol not in self.instruments or not self._subscribers.get(f"book.{symbol}"):
            return  # nobody to refresh (a connection still subscribing gets its own)

        def make(r: ReplyTo) -> BookSnapshotRequest:
            return BookSnapshotRequest(reply_to=r, symbol=symbol, ts=time.time_ns())

        if not self._ask_quietly(None, None, "refresh", Dest("book", symbol), make,
                                 extra=symbol):
            self._refresh_due.add(symbol)

    def _refreshed(self, symbol: str, result: dict[str, Any]) -> None:
        """Send the refresh's snapshot to every subscriber of the book, as the next frame
        of its channel: the seq goes on, and the snapshot replaces the book (see
        docs/protocol.md, *Market frames*)."""
        channel = f"book.{symbol}"
        subscribers = self._subscribers.get(channel)
        if not subscribers:
            return
        self.book_refreshes += 1
        self._fan_out(channel, subscribers, MarketFrameTemplate(
            channel=channel, kind="snapshot", ts=result["ts"], data=self._book_data(result)))

    def _push_market(self, conn: _Conn, channel: str, kind: str, ts: int,
                     data: dict[str, Any]) -> None:
        seq = conn.chan_seq.get(channel, 0) + 1
        conn.chan_seq[channel] = seq
        self._push(conn, MarketFrame(channel=channel, seq=seq, kind=kind, ts=ts, data=data),
                   droppable=True)

    def _market(self, ev: BookDelta | PublicTrade | TickerUpdate) -> None:
        if isinstance(ev, PublicTrade):
            ids = self._trade_ids.get(ev.symbol)
            if ids is None:
                ids = self._trade_ids[ev.symbol] = _TradeIds()
            if not ids.publish(ev.trade_id):
                return  # a re-created book's resend of a trade published already
            self.trades += 1
            self._last_price[ev.symbol] = ev.price
            channel = f"trades.{ev.symbol}"
        else:
            channel = f"{'book' if isinstance(ev, BookDelta) else 'ticker'}.{ev.symbol}"
        subscribers = self._subscribers.get(channel)
        if not subscribers:
            return
        if isinstance(ev, PublicTrade) and ev.trade_id <= self._trades_snapshot_upto.get(
                channel, 0):
            # A late trade (see _TradeIds): not to those whose snapshot held it.
            subscribers = {cid: c for cid, c in subscribers.items()
                           if c.trades_upto is None
                           or c.trades_upto.get(channel, 0) < ev.trade_id}
            if not subscribers:
                return
        inst = self.instruments[ev.symbol]
        if isinstance(ev, BookDelta):
            kind = "delta"
            data: dict[str, Any] = _levels_data(inst, ev.bids, ev.asks)
        elif isinstance(ev, PublicTrade):
            kind = "trade"
            data = _trade_data(inst, ev.trade_id, ev.price, ev.qty, ev.taker_side)
        else:
            kind = "ticker"

            def px(v: int | None) -> str | None:
                return None if v is None else inst.price_str(v)

            data = {"last": px(ev.last), "best_bid": px(ev.best_bid),
                    "best_ask": px(ev.best_ask), "volume_24h": inst.qty_str(ev.volume_24h)}
        self._fan_out(channel, subscribers,
                      MarketFrameTemplate(channel=channel, kind=kind, ts=ev.ts, data=data))

    def _fan_out(self, channel: str, subscribers: dict[int, _Conn],
                 template: MarketFrameTemplate) -> None:
        # Subscribers differ only in their seq: the frame is encoded once per encoding
        # and each gets its own seq spliced in (MarketFrameTemplate).
        for conn in list(subscribers.values()):
            if conn.closed:
                continue
            seq = conn.chan_seq.get(channel, 0) + 1
            conn.chan_seq[channel] = seq
            self._queue(conn, conn.proto.send_market(template, seq), droppable=True)
