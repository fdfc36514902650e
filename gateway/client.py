"""The trio client SDK: what trading programs and the simulation harness use.

::

    async with open_client("ws://127.0.0.1:8765/v1", "demo1", "demo") as c:
        await c.subscribe(["ticker.BTC-PERP"])
        await c.place("BTC-PERP", "buy", "limit", qty="0.001", price="60000.0")
        async for event in c.events():
            ...

Private events arrive in seq order, each exactly once: the client drops what it
already processed and, when the connection drops, reconnects, logs in again and
``resume``s from the last seq it handed out — so a program sees a gapless
stream across reconnects. A request in flight when the connection dropped
is sent again on the next connection (up to ``retries`` times) — safe because
a ``place`` carries its ``client_order_id`` and the server answers a repeat
with the original order and ``duplicate: true``; past that it fails with
:class:`ClientError` code ``disconnected``. A request the engine did not answer
in time (error ``timeout``) is sent again the same way, once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import attrs
import cbor2
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from protocol import EventData, event_data

#: Error codes after which :meth:`Client.request` sends the request again.
_RETRIED = frozenset({"disconnected", "timeout"})


class ClientError(Exception):
    """A request failed: ``code`` is a PROTOCOL.md error code (or ``disconnected``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@attrs.frozen(kw_only=True)
class PrivateUpdate:
    """One sequenced private event with its typed data."""

    seq: int
    kind: str
    priority: int
    ts: int
    data: EventData
    raw: dict[str, Any] = attrs.field(hash=False, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class MarketUpdate:
    """One market frame. ``epoch`` counts this client's subscriptions of the
    channel (a reconnect resubscribes): the server restarts ``seq`` at 1 on each."""

    channel: str
    seq: int
    kind: str
    ts: int
    data: dict[str, Any] = attrs.field(hash=False)
    epoch: int = 1


@attrs.frozen(kw_only=True)
class NoticeUpdate:
    kind: str
    data: dict[str, Any] = attrs.field(hash=False)


Event = PrivateUpdate | MarketUpdate | NoticeUpdate


class Client:
    """A logged-in connection with reconnect and resume. Use :func:`open_client`."""

    def __init__(self, url: str, user: str, password: str, *, encoding: str = "cbor",
                 reconnect: bool = True, event_buffer: int = 10_000,
                 ack_every: int = 100, retries: int = 3,
                 resume_from: int | None = None, heartbeat_s: float | None = 15.0,
                 gap_timeout_s: float | None = 2.0,
                 answer_timeout_s: float | None = 30.0) -> None:
        self.url = url
        self.user = user
        self._password = password
        self.encoding = encoding
        self.reconnect = reconnect
        self.ack_every = ack_every
        self.retries = retries
        #: ``resume_from``: replay the private events after this seq on the first login
        #: too (0: the user's whole retained stream, as far as the replay log reaches),
        #: not only after reconnects. None: start with what happens from now on.
        self.last_seq = resume_from or 0
        self._resume_first = resume_from is not None
        #: Send a ``ping`` when nothing was sent for this long, so the gateway's idle
        #: timeout (60 s by default) never closes a quiet or waiting client.
        self.heartbeat_s = heartbeat_s
        #: A gap in the private stream (events held behind a missing seq) that lasts
        #: this long is asked for again with a ``resume``. The gateway repairs the gaps
        #: it sees itself; this covers any it could not. None: never.
        self.gap_timeout_s = gap_timeout_s
        #: Resumes sent because a gap lasted ``gap_timeout_s``.
        self.gap_resumes = 0
        #: A request unanswered this long means the connection is dead, though open:
        #: the gateway answers every request (``timeout`` after its own 10 s when the
        #: engine does not), so the client drops the connection and reconnects, and
        #: the request fails ``disconnected`` (and is sent again). None: wait for ever.
        self.answer_timeout_s = answer_timeout_s
        #: Connections dropped because a request went unanswered (``answer_timeout_s``).
        self.dead_connections = 0
        self._gap = trio.Event()  # set while events are held behind a missing seq
        #: Book and trades channels resubscribed because a market seq was skipped (the
        #: gateway dropped frames: the book the frames describe is no longer whole, a
        #: trade is missing; the new subscription's snapshot has both).
        self.market_resubscribes = 0
        self._market_seq: dict[str, int] = {}  # channel → the last market seq seen
        self._resubscribing: set[str] = set()
        self._conn_nursery: trio.Nursery | None = None
        self._last_sent = time.monotonic()
        self.reconnects = 0
        self.session: int | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._send_events, self._recv_events = trio.open_memory_channel[Event](event_buffer)
        self._ws: WebSocketConnection | None = None
        self._connected = trio.Event()
        self._closing = False
        self._subscriptions: set[str] = set()
        self._cids = itertools.count(1)
        self._cid_prefix = f"{int(time.time() * 1000) % 10**10:010d}"
        self._unacked = 0
        #: Seqs the server announced it will never send (P2/P3 conflation under
        #: back-pressure; see PROTOCOL.md), and private events dropped because
        #: they were already handed out (a replay overlapping live delivery).
        self.skipped: set[int] = set()
        self.duplicates_dropped = 0
        self._epochs: dict[str, int] = {}
        #: Private events that arrived ahead of a gap (live events overtaking the
        #: resume's replay after a reconnect), by seq.
        self._held: dict[int, dict[str, Any]] = {}

    # -- requests ---------------------------------------------------------------------

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its response; returns ``result``.

        Raises:
            ClientError: the server refused it, or the connection dropped first.
        """
        # Every request here is safe to repeat (place carries its client_order_id,
        # which the server deduplicates), so a drop mid-request is retried on the
        # next connection, and a request the engine did not answer in time
        # (``timeout``) is sent again, instead of surfacing to the caller.
        # A timeout is repeated once only: the engine resends what a restarted actor
        # lost, so a second timeout means it is overloaded or stuck, and repeating
        # every request again would add to the load that made them time out.
        timed_out = False
        for attempt in range(self.retries + 1):
            await self._connected.wait()
            try:
                return await self._request_on(self._ws, op, **fields)
            except ClientError as exc:
                if (exc.code not in _RETRIED or attempt == self.retries or self._closing
                        or (exc.code == "timeout" and timed_out)):
                    raise
                timed_out = timed_out or exc.code == "timeout"
        raise AssertionError("unreachable")

    async def _request_on(self, ws: WebSocketConnection | None, op: str,
                          **fields: Any) -> dict[str, Any]:
        if ws is None:
            raise ClientError("disconnected", "not connected")
        rid = next(self._ids)
        done = trio.Event()
        slot: list[Any] = []
        self._waiting[rid] = (done, slot)
        try:
            await self._send(ws, {"op": op, "id": rid, **fields})
            limit = self.answer_timeout_s
            with trio.move_on_after(math.inf if limit is None else limit):
                await done.wait()
            if not slot:
                self.dead_connections += 1
                with contextlib.suppress(Exception):
                    await ws._stream.aclose()  # the reader sees the close: a reconnect
                raise ClientError("disconnected", f"no answer to {op} in {limit:g} s; "
                                  "the connection was dropped")
        finally:
            self._waiting.pop(rid, None)
        frame = slot[0]
        if frame.get("type") == "pong":
            return {"ts": frame.get("ts")}
        if not frame.get("ok"):
            err = frame.get("error") or {}
            raise ClientError(str(err.get("code", "internal")), str(err.get("message", "")))
        result: dict[str, Any] = frame.get("result") or {}
        return result

    async def _send(self, ws: WebSocketConnection, msg: dict[str, Any]) -> None:
        try:
            self._last_sent = time.monotonic()
            await ws.send_message(cbor2.dumps(msg) if self.encoding == "cbor" else json.dumps(msg))
        except ConnectionClosed:
            raise ClientError("disconnected", "the connection closed") from None

    def new_client_order_id(self) -> str:
        return f"{self._cid_prefix}-{next(self._cids)}"

    async def ping(self) -> float:
        """Round trip through the gateway, in seconds."""
        t0 = time.perf_counter()
        await self.request("ping")
        return time.perf_counter() - t0

    async def subscribe(self, channels: Iterable[str]) -> list[str]:
        chans = list(channels)
        self._new_epoch(chans)  # before: the snapshot may overtake the response
        result = await self.request("subscribe", channels=chans)
        self._subscriptions.update(chans)
        return list(result.get("channels", chans))

    async def unsubscribe(self, channels: Iterable[str]) -> list[str]:
        chans = list(channels)
        self._subscriptions.difference_update(chans)
        return list((await self.request("unsubscribe", channels=chans)).get("channels", []))

    async def place(self, symbol: str, side: str, type: str, *, qty: str,
                    price: str | None = None, tif: str = "gtc", post_only: bool = False,
                    client_order_id: str | None = None) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "client_order_id": client_order_id or self.new_client_order_id(),
            "symbol": symbol, "side": side, "type": type, "qty": qty, "tif": tif}
        if price is not None:
            fields["price"] = price
        if post_only:
            fields["post_only"] = True
        return await self.request("place", **fields)

    async def cancel(self, order_id: int | None = None, *,
                     client_order_id: str | None = None) -> dict[str, Any]:
        if order_id is not None:
            return await self.request("cancel", order_id=order_id)
        return await self.request("cancel", client_order_id=client_order_id)

    async def cancel_all(self, symbol: str | None = None) -> int:
        fields = {} if symbol is None else {"symbol": symbol}
        return int((await self.request("cancel_all", **fields))["canceled"])

    async def query(self, what: str) -> dict[str, Any]:
        return await self.request("query", what=what)

    # -- events --------------------------------------------------------------------------

    def events(self) -> trio.MemoryReceiveChannel[Event]:
        """Private events (gapless, once each, across reconnects), market data, notices.

        Iterate it with ``async for``; breaking out loses nothing (it is a channel).
        """
        return self._recv_events

    # -- the connection --------------------------------------------------------------------

    async def _run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        first = True
        backoff = 0.05
        while not self._closing:
            failure: BaseException | None = None
            try:
                async with trio.open_nursery() as nursery:
                    ws = await connect_websocket_url(
                        nursery, self.url, subprotocols=[f"emporion.v1.{self.encoding}"])
                    self._ws = ws
                    self._conn_nursery = nursery
                    nursery.start_soon(self._reader, ws, nursery.cancel_scope)
                    try:
                        await self._login(ws, resume=not first, replay=self._resume_first)
                    except ClientError as exc:
                        failure = exc
                        nursery.cancel_scope.cancel()
                    else:
                        self._connected.set()
                        if first:
                            first = False
                            task_status.started()
                        backoff = 0.05
                        if self.heartbeat_s is not None:
                            nursery.start_soon(self._heartbeat, ws, self.heartbeat_s)
                        if self.gap_timeout_s is not None:
                            nursery.start_soon(self._gap_watch, ws, self.gap_timeout_s)
                        await trio.sleep_forever()
                    finally:
                        with trio.move_on_after(1) as cleanup:
                            cleanup.shield = True
                            await ws.aclose()
                            # When the peer went away first, trio-websocket leaves the
                            # TCP stream to its reader task, which our cancel may have
                            # ended first: close it here (idempotent), never leak it.
                            with contextlib.suppress(Exception):
                                await ws._stream.aclose()
            except BaseExceptionGroup as group:
                failure = _unwrap(group)
            except (OSError, HandshakeError, ConnectionClosed) as exc:
                failure = exc
            finally:
                self._disconnected()
            if failure is not None and (first or (
                    isinstance(failure, ClientError)
                    and failure.code in ("auth_failed", "too_many_sessions"))):
                raise failure
            if not self.reconnect or self._closing:
                return
            await trio.sleep(backoff)  # reconnect backoff, not a wait for an event
            backoff = min(backoff * 2, 2.0)

    async def _login(self, ws: WebSocketConnection, *, resume: bool, replay: bool) -> None:
        login = await self._request_on(ws, "login", user=self.user, password=self._password)
        self.session = login.get("session")
        # Live events start after the login's last_seq and may arrive before the resume's
        # replay: they wait in the hold buffer until the replay fills the gap below them.
        live_from = int(login.get("last_seq", 0))
        if not (resume or replay):
            self.last_seq = max(self.last_seq, live_from)
            await self._release()
        if resume or replay:
            if resume:
                self.reconnects += 1
            try:
                await self._request_on(ws, "resume", after_seq=self.last_seq)
            except ClientError as exc:
                if exc.code != "replay_unavailable":
                    raise
                # The replay log no longer reaches back: go on from the login's
                # position (the events in between are lost to this client).
                await self._replay_lost(live_from)
            if self._subscriptions:
                chans = sorted(self._subscriptions)
                self._new_epoch(chans)
                await self._request_on(ws, "subscribe", channels=chans)

    async def _replay_lost(self, live_from: int) -> None:
        """The replay log no longer holds the events after ``last_seq``: announce a
        ``replay_unavailable`` notice and go on from ``live_from``."""
        lost = self.last_seq
        self.last_seq = max(self.last_seq, live_from)
        await self._send_events.send(NoticeUpdate(kind="replay_unavailable", data={
            "after_seq": lost, "live_from": live_from}))
        await self._release()

    async def _release(self) -> None:
        """Hand out held events while the next one in seq order is there (seqs the
        server announced as skipped count as there), so the stream stays gapless."""
        while self._held:
            nxt = self.last_seq + 1
            while nxt in self.skipped and nxt not in self._held:
                nxt += 1
            e = self._held.pop(nxt, None)
            if e is None:
                stale = [s for s in self._held if s <= self.last_seq]
                for s in stale:
                    del self._held[s]
                    self.duplicates_dropped += 1
                if not stale:
                    self._gap.set()  # events wait behind a missing seq (see _gap_watch)
                    return
                continue
            self.last_seq = nxt
            await self._send_events.send(PrivateUpdate(
                seq=e["seq"], kind=e["kind"], priority=e["priority"], ts=e["ts"],
                data=event_data(e["kind"], e["data"]), raw=e))
            self._unacked += 1

    async def _heartbeat(self, ws: WebSocketConnection, every: float) -> None:
        """Ping when the connection was quiet for ``every`` seconds (the answer is not
        awaited: any frame from the client resets the gateway's idle timer)."""
        while True:
            quiet = time.monotonic() - self._last_sent
            if quiet >= every:
                try:
                    await self._send(ws, {"op": "ping", "id": f"hb{next(self._ids)}"})
                except ClientError:
                    return  # the reader notices the close and reconnects
                quiet = 0.0
            await trio.sleep(every - quiet)  # a timer: the next heartbeat is due then

    async def _gap_watch(self, ws: WebSocketConnection, timeout: float) -> None:
        """Resume over a gap in the private stream that lasts ``timeout`` seconds."""
        while True:
            await self._gap.wait()
            stuck_at = self.last_seq
            await trio.sleep(timeout)  # a timer: how long a gap may last, not an event
            if self._held and self.last_seq == stuck_at:
                self.gap_resumes += 1
                try:
                    await self._request_on(ws, "resume", after_seq=self.last_seq)
                except ClientError as exc:
                    if exc.code == "disconnected":
                        return  # the next connection resumes anyway
                    if exc.code == "replay_unavailable" and self._held:
                        # The events below the held ones are gone for good: go on from
                        # the held ones (unless the gap filled meanwhile).
                        await self._replay_lost(min(self._held) - 1)
            if not self._held:
                self._gap = trio.Event()

    def _new_epoch(self, channels: Iterable[str]) -> None:
        for channel in channels:
            self._epochs[channel] = self._epochs.get(channel, 0) + 1
            self._market_seq.pop(channel, None)

    async def _resubscribe(self, ws: WebSocketConnection, channel: str) -> None:
        """A book or trades channel skipped a seq: unsubscribe, then subscribe again for
        a fresh snapshot (a new epoch), as the protocol asks of a client that sees a
        gap."""
        self.market_resubscribes += 1
        try:
            await self._request_on(ws, "unsubscribe", channels=[channel])
            self._new_epoch([channel])
            await self._request_on(ws, "subscribe", channels=[channel])
        except ClientError:
            pass  # disconnected: the next connection subscribes afresh anyway
        finally:
            self._resubscribing.discard(channel)

    def _disconnected(self) -> None:
        # A fresh event only if the current one was set: waiters already parked on an
        # unset event must be woken by the next connection, not stranded.
        if self._connected.is_set():
            self._connected = trio.Event()
        self._ws = None
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        for done, slot in list(self._waiting.values()):
            if not slot:
                slot.append({"type": "response", "ok": False,
                             "error": {"code": "disconnected", "message": "connection lost"}})
            done.set()

    async def _reader(self, ws: WebSocketConnection, scope: trio.CancelScope) -> None:
        try:
            while True:
                data = await ws.get_message()
                frame = cbor2.loads(data) if isinstance(data, bytes) else json.loads(data)
                await self._on_frame(ws, frame)
        except ConnectionClosed:
            # The connection is gone: new requests wait for the next one, requests in
            # flight fail (and are retried); end this connection's scope to reconnect.
            self._disconnected()
            scope.cancel()

    async def _on_frame(self, ws: WebSocketConnection, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind in ("response", "pong"):
            waiting = self._waiting.get(frame.get("id"))  # type: ignore[arg-type]
            if waiting is not None:
                waiting[1].append(frame)
                waiting[0].set()
        elif kind == "private":
            self.skipped.update(frame.get("skipped", ()))
            for e in frame.get("events", ()):
                if e["seq"] <= self.last_seq or e["seq"] in self._held:
                    self.duplicates_dropped += 1
                    continue  # already handed out (a replay overlapping live delivery)
                self._held[e["seq"]] = e
            await self._release()
            if self._unacked >= self.ack_every:
                self._unacked = 0
                with contextlib.suppress(ClientError):
                    await self._send(ws, {"op": "ack", "seq": self.last_seq})
        elif kind == "market":
            channel = frame["channel"]
            seq = frame["seq"]
            await self._send_events.send(MarketUpdate(
                channel=channel, seq=seq, kind=frame["kind"], ts=frame["ts"],
                data=frame["data"], epoch=self._epochs.get(channel, 1)))
            last = self._market_seq.get(channel)
            self._market_seq[channel] = seq
            if (last is not None and seq != last + 1
                    and channel.startswith(("book.", "trades."))
                    and channel in self._subscriptions and channel not in self._resubscribing
                    and self._conn_nursery is not None):
                # Frames were dropped (the gateway's queue for us was full): the deltas
                # no longer add up to the book, a trade is missing. The new
                # subscription's snapshot has the book and the newest trades (the
                # caller tells the trades it has by trade_id). A ticker is not
                # resubscribed: each one is the latest value.
                self._resubscribing.add(channel)
                self._conn_nursery.start_soon(self._resubscribe, ws, channel)
        elif kind == "notice":
            await self._send_events.send(NoticeUpdate(kind=frame["kind"],
                                                     data=frame.get("data", {})))

    async def drop(self) -> None:
        """Cut the connection abruptly, no close handshake (tests, fault injection);
        the client reconnects and resumes."""
        ws = self._ws
        if ws is not None:
            # trio-websocket has no public abort: close the TCP stream under it.
            await ws._stream.aclose()


@contextlib.asynccontextmanager
async def open_client(url: str, user: str, password: str, **options: Any) -> AsyncIterator[Client]:
    """Connect, log in, and keep the connection (reconnecting) until the block exits.

    Raises:
        ClientError: the first login failed (``auth_failed``…).
        OSError: the gateway is not reachable.
    """
    client = Client(url, user, password, **options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            try:
                yield client
            finally:
                client._closing = True
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real error inside trio's (nested) exception groups, else the group."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            leaves.append(e)

    walk(group)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    return real[0] if len(real) == 1 else group


class Strategy:
    """A strategy in the spirit of event-driven trading frameworks.

    Subclass it, override the ``on_*`` callbacks you need, and call
    :meth:`run` with a connected :class:`Client`. The callbacks run one at a
    time, in event order.
    """

    #: Symbols whose ticker and book the strategy follows.
    symbols: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.client: Client | None = None

    async def on_start(self) -> None: ...
    async def on_ticker(self, symbol: str, data: dict[str, Any]) -> None: ...
    async def on_book(self, symbol: str, event: MarketUpdate) -> None: ...
    async def on_trade(self, event: PrivateUpdate) -> None: ...
    async def on_order(self, event: PrivateUpdate) -> None: ...
    async def on_account(self, event: PrivateUpdate) -> None: ...
    async def on_event(self, event: Event) -> None: ...

    def _c(self) -> Client:
        if self.client is None:
            raise RuntimeError("the strategy is not running")
        return self.client

    async def buy_limit(self, symbol: str, qty: str, price: str, **kw: Any) -> dict[str, Any]:
        return await self._c().place(symbol, "buy", "limit", qty=qty, price=price, **kw)

    async def sell_limit(self, symbol: str, qty: str, price: str, **kw: Any) -> dict[str, Any]:
        return await self._c().place(symbol, "sell", "limit", qty=qty, price=price, **kw)

    async def buy_market(self, symbol: str, qty: str, **kw: Any) -> dict[str, Any]:
        return await self._c().place(symbol, "buy", "market", qty=qty, **kw)

    async def sell_market(self, symbol: str, qty: str, **kw: Any) -> dict[str, Any]:
        return await self._c().place(symbol, "sell", "market", qty=qty, **kw)

    async def cancel(self, order_id: int) -> dict[str, Any]:
        return await self._c().cancel(order_id)

    async def run(self, client: Client) -> None:
        """Subscribe to the symbols' tickers and books, then dispatch events until cancelled."""
        self.client = client
        if self.symbols:
            await client.subscribe([f"{k}.{s}" for s in self.symbols for k in ("ticker", "book")])
        await self.on_start()
        async for event in client.events():
            await self.on_event(event)
            if isinstance(event, MarketUpdate):
                symbol = event.channel.split(".", 1)[1]
                if event.kind == "ticker":
                    await self.on_ticker(symbol, event.data)
                elif event.channel.startswith("book."):
                    await self.on_book(symbol, event)
            elif isinstance(event, PrivateUpdate):
                if event.kind == "trade_executed":
                    await self.on_trade(event)
                elif event.kind.startswith("order_"):
                    await self.on_order(event)
                elif event.kind in ("account_update", "position_update"):
                    await self.on_account(event)


__all__ = [
    "Client",
    "ClientError",
    "Event",
    "MarketUpdate",
    "NoticeUpdate",
    "PrivateUpdate",
    "Strategy",
    "open_client",
]
