"""The engine's entities as pure, routed behaviours ("desks").

A desk wraps one core and knows the message flow around it: what it receives,
which core handler that calls, and where each effect goes. It returns
``(Dest, message)`` pairs and never sends anything itself, so the same desk runs
inside a Thespian actor (the host shell batches the pairs per destination and
journals before sending) and inside the in-process demo loop, unchanged.

Flow of one order (ARCHITECTURE.md)::

    AccountPlace → AccountDesk (risk check, freeze) → BookDesk (match)
      → AccountDesk of each user involved (apply) → RouterDesk (seq per user)
      → Delivery to the user's gateway(s); Reply to the requesting connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from actors.cores.book import OrderBook
from actors.cores.ledger import DuplicateOrder, Ledger, OrderRecord
from actors.cores.router import ChunkLoader, Router, RouterEffect, RouterTimer
from actors.messages import (
    ROUTER,
    TIMER,
    AccountCancel,
    AccountCancelAll,
    AccountDeposit,
    AccountPlace,
    AccountQuery,
    Delivery,
    Dest,
    Reply,
    ReplyTo,
    RouterAttach,
    RouterDetach,
    RouterReplay,
    RouterTick,
)
from protocol import (
    BookDelta,
    BookEvent,
    CancelOrder,
    CancelRejected,
    CancelUserOrders,
    ErrorCode,
    Fill,
    Instrument,
    NewOrder,
    OrderAccepted,
    OrderCanceled,
    OrderExpired,
    OrderRejected,
    PublicTrade,
    RemoteProtocolError,
    TickerUpdate,
    UserEvent,
)

Out = tuple[Dest, Any]

_BOOK_ANSWERS = (OrderAccepted, OrderRejected, Fill, OrderCanceled, OrderExpired, CancelRejected)

#: How many of a user's own trades ``query trades`` returns.
TRADES_KEPT = 1000
#: How many of its newest public trades a book keeps, in its state and so in its
#: snapshots (the trades of a snapshot's own turn among them): a re-created book
#: sends them to its gateways again, since those its killed incarnation sent and
#: nobody received would otherwise never reach the trades channels (see
#: ``actors.host.Host.receiveMsg_HostInit``).
RECENT_TRADES = 256


def _shared_dests(kind: str) -> Callable[[str], Dest]:
    """``key -> Dest(kind, key)``, one shared object per key.

    A turn's outputs to one account, book or gateway then repeat one object, which
    the receiver's journal record pickles once (pickle memoizes by identity) instead
    of once per fill or order, and no attrs ``__init__`` runs per output.
    """
    known: dict[str, Dest] = {}

    def dest(key: str) -> Dest:
        found = known.get(key)
        if found is None:
            found = known[key] = Dest(kind, key)
        return found

    return dest


account_dest = _shared_dests("account")
book_dest = _shared_dests("book")
gateway_dest = _shared_dests("gateway")


def _error(reply_to: ReplyTo | None, code: str, message: str) -> list[Out]:
    if reply_to is None:
        return []
    return [(gateway_dest(reply_to.gateway),
             Reply(reply_to=reply_to, ok=False, code=code, message=message))]


def _ok(reply_to: ReplyTo | None, result: dict[str, Any]) -> list[Out]:
    if reply_to is None:
        return []
    return [(gateway_dest(reply_to.gateway), Reply(reply_to=reply_to, ok=True, result=result))]


class BookDesk:
    """One symbol's book: matches orders, answers the accounts, publishes market data.

    Market data goes out once per turn: :meth:`end_turn` flushes what the
    turn's commands changed (one delta, the trades, one ticker).
    """

    def __init__(self, instrument: Instrument) -> None:
        self.book = OrderBook(instrument)
        self.symbol = instrument.symbol
        self._ts = 0  # the last command's time: the flush's
        #: The newest public trades, oldest first (at most :data:`RECENT_TRADES`).
        self.recent_trades: deque[PublicTrade] = deque(maxlen=RECENT_TRADES)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled desk; one pickled before ``recent_trades`` gets it empty."""
        self.__dict__.update(state)
        if "recent_trades" not in state:
            self.recent_trades = deque(maxlen=RECENT_TRADES)

    def snapshot(self, ts: int) -> dict[str, Any]:
        """The answer to a :class:`~actors.messages.BookSnapshotRequest` asked at ``ts``.

        ``{"symbol", "bids", "asks", "trades", "ts"}``: the levels as integer
        ``(price, qty)`` pairs best first, and the newest public trades (at most
        :data:`RECENT_TRADES`, oldest first) as ``(trade_id, price, qty,
        taker_side, ts)``. Taken between two commands, it holds what the market
        data sent before it holds: the deltas and trades the gateway receives
        after it apply on top.
        """
        bids, asks = self.book.depth()
        trades = [(t.trade_id, t.price, t.qty, t.taker_side, t.ts) for t in self.recent_trades]
        return {"symbol": self.symbol, "bids": bids, "asks": asks, "trades": trades, "ts": ts}

    def handle(self, msg: Any) -> list[Out]:
        if isinstance(msg, NewOrder):
            events = self.book.submit(msg)
        elif isinstance(msg, CancelOrder):
            events = self.book.cancel(msg)
        elif isinstance(msg, CancelUserOrders):
            events = self.book.cancel_user(msg)
        else:
            raise TypeError(f"a book does not handle {type(msg).__name__}")
        self._ts = msg.ts
        return self._route(events)

    def end_turn(self) -> list[Out]:
        events = self.book.flush_market(self._ts)
        self.recent_trades.extend([ev for ev in events if type(ev) is PublicTrade])
        return self._route(events)

    def _route(self, events: list[BookEvent]) -> list[Out]:
        out: list[Out] = []
        market = Dest("market", self.symbol)
        for ev in events:
            if isinstance(ev, Fill):
                out.append((account_dest(ev.maker_user), ev))
                if ev.taker_user != ev.maker_user:
                    out.append((account_dest(ev.taker_user), ev))
            elif isinstance(ev, BookDelta | PublicTrade | TickerUpdate):
                out.append((market, ev))
            else:
                out.append((account_dest(ev.user), ev))
        return out


class AccountDesk:
    """One user's account: risk checks, order bookkeeping, private events, replies."""

    def __init__(self, user: str, instruments: Mapping[str, Instrument]) -> None:
        self.user = user
        # P2 updates once per turn, with the state after it (see the ledger's docstring).
        self.ledger = Ledger(user, instruments, coalesce_updates=True)
        self._instruments = dict(instruments)
        self._pending_place: dict[int, ReplyTo | None] = {}
        self._pending_cancel: dict[int, list[ReplyTo]] = {}
        self._resolved: list[int] = []
        self._trades: deque[dict[str, object]] = deque(maxlen=TRADES_KEPT)

    # -- requests -------------------------------------------------------------------

    def handle(self, msg: Any) -> list[Out]:
        if isinstance(msg, AccountPlace):
            return self._place(msg)
        if isinstance(msg, AccountCancel):
            return self._cancel(msg)
        if isinstance(msg, AccountCancelAll):
            return self._cancel_all(msg)
        if isinstance(msg, AccountDeposit):
            return self._deposit(msg)
        if isinstance(msg, AccountQuery):
            return self._query(msg)
        if isinstance(msg, _BOOK_ANSWERS):
            return self._book_event(msg)
        raise TypeError(f"an account does not handle {type(msg).__name__}")

    def _place(self, msg: AccountPlace) -> list[Out]:
        order = msg.order
        try:
            events = self.ledger.place(order, msg.ref_price)
        except DuplicateOrder as dup:
            return _ok(msg.reply_to, {**dup.result, "duplicate": True})
        except RemoteProtocolError as exc:
            return _error(msg.reply_to, exc.code.value, exc.message)
        self._pending_place[order.order_id] = msg.reply_to
        out: list[Out] = [(ROUTER, ev) for ev in events]
        out.append((book_dest(order.symbol), order))
        return out

    def _find(self, msg: AccountCancel) -> OrderRecord | None:
        if msg.order_id is not None:
            return self.ledger.order(msg.order_id)
        assert msg.client_order_id is not None
        return self.ledger.order_by_client_id(msg.client_order_id)

    def _cancel(self, msg: AccountCancel) -> list[Out]:
        record = self._find(msg)
        # Someone else's id and an unknown id get the same answer: no order to see.
        if record is None or not record.is_live:
            ref = msg.order_id if msg.order_id is not None else msg.client_order_id
            return _error(msg.reply_to, ErrorCode.UNKNOWN_ORDER.value, f"no open order {ref}")
        if msg.reply_to is not None:
            self._pending_cancel.setdefault(record.order_id, []).append(msg.reply_to)
        cmd = CancelOrder(order_id=record.order_id, user=self.user, symbol=record.symbol,
                          ts=msg.ts)
        return [(book_dest(record.symbol), cmd)]

    def _cancel_all(self, msg: AccountCancelAll) -> list[Out]:
        if msg.symbol is not None and msg.symbol not in self._instruments:
            return _error(msg.reply_to, ErrorCode.UNKNOWN_SYMBOL.value,
                          f"unknown symbol {msg.symbol}")
        ids = self.ledger.open_order_ids(msg.symbol)
        # Each book gets the ids of this account's open orders in its symbol, so it
        # looks up those rather than scanning its whole depth for the user's.
        by_symbol: dict[str, list[int]] = {}
        for i in ids:
            by_symbol.setdefault(self.ledger.order(i).symbol, []).append(  # type: ignore[union-attr]
                i)
        out: list[Out] = [
            (book_dest(s), CancelUserOrders(user=self.user, symbol=s, ts=msg.ts,
                                            order_ids=tuple(sorted(by_symbol[s]))))
            for s in sorted(by_symbol)
        ]
        return out + _ok(msg.reply_to, {"canceled": len(ids)})

    def _deposit(self, msg: AccountDeposit) -> list[Out]:
        try:
            if msg.amount >= 0:
                events = self.ledger.deposit(msg.amount, msg.ts)
            else:
                events = self.ledger.withdraw(-msg.amount, msg.ts)
        except RemoteProtocolError as exc:
            return _error(msg.reply_to, exc.code.value, exc.message)
        out: list[Out] = [(ROUTER, ev) for ev in events]
        if msg.reply_to is not None:  # the view is ~15 decimal strings: only when asked
            out += _ok(msg.reply_to, self.ledger.account_view())
        return out

    def _query(self, msg: AccountQuery) -> list[Out]:
        result: dict[str, Any]
        if msg.what == "account":
            result = self.ledger.account_view()
        elif msg.what == "positions":
            result = {"positions": self.ledger.positions_view()}
        elif msg.what == "orders":
            result = {"orders": self.ledger.open_orders()}
        elif msg.what == "trades":
            result = {"trades": list(self._trades)}
        else:
            return _error(msg.reply_to, ErrorCode.BAD_REQUEST.value, f"cannot query {msg.what}")
        return _ok(msg.reply_to, result)

    # -- the book's answers ------------------------------------------------------------

    def _book_event(self, ev: Any) -> list[Out]:
        if isinstance(ev, CancelRejected):
            refs = self._pending_cancel.pop(ev.order_id, [])
            return [o for r in refs for o in _error(r, ev.code, ev.reason)]
        events: list[UserEvent] = self.ledger.on_book_event(ev)
        for e in events:
            if e.kind == "trade_executed":
                self._trades.append(e.data)
        out: list[Out] = [(ROUTER, e) for e in events]
        order_ids = (
            (ev.maker_order_id, ev.taker_order_id) if isinstance(ev, Fill) else (ev.order_id,)
        )
        for oid in order_ids:
            if oid in self._pending_place or oid in self._pending_cancel:
                self._resolved.append(oid)
        return out

    def end_turn(self) -> list[Out]:
        """Send the turn's coalesced position and account updates, and answer the requests
        this turn resolved, with the orders' state after the whole turn."""
        out: list[Out] = [(ROUTER, e) for e in self.ledger.flush_updates()]
        for oid in dict.fromkeys(self._resolved):
            record = self.ledger.order(oid)
            if record is None:
                continue
            if oid in self._pending_place:
                reply_to = self._pending_place.pop(oid)
                if record.status == "rejected":
                    out += _error(reply_to, record.code or ErrorCode.INTERNAL.value,
                                  record.reason or "rejected")
                else:
                    out += _ok(reply_to, _place_result(record))
            if oid in self._pending_cancel and not record.is_live:
                for reply_to in self._pending_cancel.pop(oid):
                    out += _ok(reply_to, {"order_id": oid, "status": record.status.value})
        self._resolved.clear()
        self.ledger.forget_closed()  # after the replies above read the closed records
        return out


def _place_result(record: OrderRecord) -> dict[str, Any]:
    return {
        "order_id": record.order_id,
        "client_order_id": record.client_order_id,
        "status": record.status.value,
    }


class RouterDesk:
    """The notification router: numbers each user's events and sends them to the
    gateways that hold the user's sessions, one :class:`Delivery` per user and
    gateway per turn."""

    def __init__(
        self, *, replay_capacity: int = 10_000, conflation_window_ns: int = 100_000_000
    ) -> None:
        self.router = Router(
            replay_capacity=replay_capacity, conflation_window_ns=conflation_window_ns
        )
        self._gateways: dict[str, dict[str, None]] = {}
        self._batch: list[UserEvent] = []
        self._now = 0
        self._replies: list[Out] = []
        #: Reads back the replay-log chunks the host stored (:meth:`spill`); not part
        #: of the state (the host sets it again after a restore).
        self.load_chunk: ChunkLoader | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("load_chunk", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.load_chunk = None

    def spill(self) -> tuple[list[tuple[str, int, bytes]], list[tuple[str, int]]]:
        """The router's frozen replay-log chunks to store, and the stored ones that
        expired (:meth:`~actors.cores.router.Router.spill`)."""
        return self.router.spill()

    def handle(self, msg: Any) -> list[Out]:
        if isinstance(msg, UserEvent):
            self._batch.append(msg)
            self._now = max(self._now, msg.ts)
            return []
        if isinstance(msg, RouterTick):
            self._now = max(self._now, msg.now_ns)
            return self._route(self.router.tick(self._now))
        if isinstance(msg, RouterAttach):
            # Number what this turn gathered first, so last_seq covers it.
            out = self._publish()
            self._gateways.setdefault(msg.user, {})[msg.gateway] = None
            return out + _ok(msg.reply_to, {"last_seq": self.router.last_seq(msg.user)})
        if isinstance(msg, RouterDetach):
            gws = self._gateways.get(msg.user, {})
            gws.pop(msg.gateway, None)
            if not gws:
                self._gateways.pop(msg.user, None)
            return []
        if isinstance(msg, RouterReplay):
            # Publish what this turn gathered first, so the answer covers it and
            # the live deliveries that follow start right after it.
            out = self._publish()
            try:
                events = self.router.replay(msg.user, msg.after_seq, self.load_chunk)
            except RemoteProtocolError as exc:
                return out + _error(msg.reply_to, exc.code.value, exc.message)
            result = {
                "from_seq": msg.after_seq + 1,
                "to_seq": self.router.last_seq(msg.user),
                "events": list(events),
            }
            return out + _ok(msg.reply_to, result)
        raise TypeError(f"the router does not handle {type(msg).__name__}")

    def _publish(self) -> list[Out]:
        if not self._batch:
            return []
        batch, self._batch = self._batch, []
        return self._route(self.router.publish(batch, self._now))

    def _route(self, effects: list[RouterEffect]) -> list[Out]:
        out: list[Out] = []
        for eff in effects:
            if isinstance(eff, RouterTimer):
                out.append((TIMER, eff))
                continue
            for gw in self._gateways.get(eff.user, ()):
                out.append((gateway_dest(gw), Delivery(user=eff.user, events=eff.events)))
        return out

    def end_turn(self) -> list[Out]:
        return self._publish()

    def wakeup_ns(self) -> int | None:
        """The conflation wakeup the router asked for and has not seen fire, if any.

        A host rebuilt from the journal arms it again: replaying the turns does not
        arm wakeups, and the core asks only for a wakeup earlier than the one it
        believes armed, so without this the events pending at the crash (and the
        ``resync`` notice joining them) would wait for the next publish after their
        window instead of flushing on time.
        """
        return self.router._armed_ns  # the core's own record (its pickled state)
