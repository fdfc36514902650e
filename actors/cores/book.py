"""The order book core: one symbol's price-time priority matching, sans-I/O.

:class:`OrderBook` is a plain, picklable, deterministic object. Each command
handler takes one command from :mod:`protocol` and returns the events meant
for the accounts; time comes only from the command's ``ts`` and trade ids from
the book's own counter, so replaying the same commands on the same snapshot
gives the same events. A rejected command changes nothing: every check runs
before the first mutation.

Market data is per turn, not per command: the book remembers which levels
changed, the trades, and whether a best price moved, and
:meth:`OrderBook.flush_market` publishes them when the shell ends its turn
(one :class:`BookDelta` with the net change, the :class:`PublicTrade` events,
one :class:`TickerUpdate`). Flushing after every command gives per-command
market data.

Prices are integer ticks and sizes integer lots. Both sides live in a
:class:`~sortedcontainers.SortedDict` keyed so that the best level comes first
(asks by ``price``, bids by ``-price``), with the best key cached; each level
is a FIFO queue of resting orders with lazy deletion, and an ``order_id``
index makes cancels O(1) plus the level's removal when it empties.

The hot path is written for speed (about a million commands a second is the
scale ``bench/book.py`` measures): a resting order is a small list rather
than an object (see ``_Entry``), events are built with ``tuple.__new__`` (see
:mod:`protocol._commands`), and locals cache attributes.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Any

import attrs
from sortedcontainers import SortedDict

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
    TickerUpdate,
)

__all__ = ["DAY_NS", "STATUSES", "OpenOrder", "OrderBook"]

#: The ticker's volume window, in nanoseconds.
DAY_NS = 24 * 60 * 60 * 1_000_000_000
#: Trading statuses :meth:`OrderBook.set_status` accepts.
STATUSES = ("open", "halted")

# Plain ``str`` codes (not the enum) so events compare and pickle as wire values.
_UNKNOWN_SYMBOL = ErrorCode.UNKNOWN_SYMBOL.value
_MARKET_HALTED = ErrorCode.MARKET_HALTED.value
_INVALID_PRICE = ErrorCode.INVALID_PRICE.value
_BAD_REQUEST = ErrorCode.BAD_REQUEST.value
_UNKNOWN_ORDER = ErrorCode.UNKNOWN_ORDER.value

# A level's queue is rebuilt once this many cancelled orders wait in it (and
# they outnumber the live ones), so lazy deletion cannot grow without bound.
_COMPACT_AT = 32

# Events are positional named tuples; ``_new(Fill, (...))`` skips the keyword
# ``__new__`` the class would run (field order is the class's).
_new = tuple.__new__

# A resting order is ``[remaining, order_id, user, client_order_id, level, command]``:
# the open quantity (0 marks it dead in its level's queue), the fields its
# events need, the level it rests in, and the NewOrder that entered it (for
# views). Copying the fields keeps cancels and fills off the command object:
# on a large book each extra object touched is a likely cache miss.
_Entry = list[Any]


class _Side:
    """One side of the book: levels keyed best-first (``sign * price``) and the best key.

    The best key is cached because the hot path asks for it on nearly every
    command, and a SortedDict lookup by position costs several times a dict
    lookup. ``changed`` maps the key of each level changed since the last
    market flush to the level's total before the first change.
    """

    __slots__ = ("best", "changed", "levels", "sign")

    def __init__(self, sign: int) -> None:
        self.sign = sign
        self.levels = SortedDict()  # sign * price -> _Level
        self.best: int | None = None
        self.changed: dict[int, int] = {}

    def drop(self, key: int) -> None:
        """Remove the (empty) level at ``key``."""
        levels = self.levels
        del levels[key]
        if key == self.best:
            self.best = levels.peekitem(0)[0] if levels else None

    def best_price(self) -> int | None:
        best = self.best
        return None if best is None else self.sign * best

    def delta(self) -> tuple[tuple[int, int], ...]:
        """The net ``(price, total)`` changes since the last flush, best first; forgets them."""
        changed = self.changed
        if not changed:
            return ()
        levels = self.levels
        sign = self.sign
        out = []
        for key in sorted(changed):
            level = levels.get(key)
            total = 0 if level is None else level.total
            if total != changed[key]:
                out.append((sign * key, total))
        changed.clear()
        return tuple(out)


class _Level:
    """One price level: a FIFO of entries, their open total, and how many dead ones wait."""

    __slots__ = ("dead", "key", "price", "queue", "side", "total")

    def __init__(self, side: _Side, key: int, price: int) -> None:
        self.side = side
        self.key = key
        self.price = price
        self.queue: deque[_Entry] = deque()
        self.total = 0
        self.dead = 0


@attrs.frozen(kw_only=True)
class OpenOrder:
    """A read-only view of one resting order (``qty`` as entered, ``remaining`` open)."""

    order_id: int
    user: str
    client_order_id: str
    side: str
    price: int
    qty: int
    remaining: int
    ts: int


def _view(entry: _Entry) -> OpenOrder:
    cmd: NewOrder = entry[5]
    assert cmd.price is not None  # only limit orders rest
    return OpenOrder(
        order_id=cmd.order_id,
        user=cmd.user,
        client_order_id=cmd.client_order_id,
        side=cmd.side,
        price=cmd.price,
        qty=cmd.qty,
        remaining=entry[0],
        ts=cmd.ts,
    )


class OrderBook:
    """The order book of one instrument.

    Args:
        instrument: the contract traded here (symbol, reference price, band,
            initial status).
        next_trade_id: the id of the next trade; a shell restoring a book
            passes the counter it had reached.
    """

    def __init__(self, instrument: Instrument, *, next_trade_id: int = 1) -> None:
        self.instrument = instrument
        self.symbol = instrument.symbol
        self.status = instrument.status
        self.next_trade_id = next_trade_id
        self._bids = _Side(-1)
        self._asks = _Side(1)
        self._orders: dict[int, _Entry] = {}
        self._by_user: dict[str, dict[int, _Entry]] = {}
        self._last: int | None = None
        self._band_lo, self._band_hi = instrument.band(instrument.ref_price)
        self._volume: deque[tuple[int, int]] = deque()  # (ts, qty) per trading command
        self._volume_sum = 0
        # Market data waiting for the next flush: the trades, and the best keys
        # the last ticker showed.
        self._trades: list[PublicTrade] = []
        self._top: tuple[int | None, int | None] = (None, None)

    # -- commands -------------------------------------------------------------------

    def submit(self, cmd: NewOrder) -> list[BookEvent]:
        """Enter an order: validate, match, then rest or expire the rest.

        Rejections (only :class:`OrderRejected`, no state change), in check
        order: ``unknown_symbol`` (another book's symbol), ``market_halted``,
        ``bad_request`` (the ``order_id`` is already resting here, or a
        post-only market order), ``invalid_price`` (a limit price outside
        ``instrument.band(ref_price())``).

        Matching is price-time priority. A market order never trades outside
        the band (a buy up to its high, a sell down to its low). Self-trade
        prevention cancels the *resting* order of the same user and goes on
        matching. A FOK order trades only if its whole quantity can fill
        against other users' orders at or better than its limit, else it
        expires untouched. A post-only order that would cross expires.

        Returns:
            The events, in this order: :class:`OrderAccepted`; then per resting
            order met, best first, a :class:`Fill` or a self-trade
            :class:`OrderCanceled`; then :class:`OrderExpired` if the rest does
            not rest (reason ``ioc``, ``fok``, ``market`` or ``post_only``).
            Market data waits for :meth:`flush_market`.
        """
        order_id = cmd.order_id
        price = cmd.price
        orders = self._orders
        invalid = cmd.post_only if price is None else not self._band_lo <= price <= self._band_hi
        if invalid or cmd.symbol != self.symbol or self.status != "open" or order_id in orders:
            code, reason = self._rejection(cmd)
            return [
                _new(OrderRejected, (
                    order_id, cmd.user, cmd.client_order_id, self.symbol, code, reason, cmd.ts,
                ))
            ]
        qty = cmd.qty
        tif = cmd.tif
        events: list[BookEvent] = [
            _new(OrderAccepted, (
                order_id, cmd.user, cmd.client_order_id, self.symbol, cmd.side,
                cmd.order_type, price, qty, tif, cmd.ts,
            ))
        ]
        is_buy = cmd.side == "buy"
        # Keys run best-first on both sides, so "crosses" is one comparison: key <= limit_key.
        if is_buy:
            opp = self._asks
            limit_key = self._band_hi if price is None else price
        else:
            opp = self._bids
            limit_key = -(self._band_lo if price is None else price)
        best = opp.best
        remaining = qty
        if best is not None and best <= limit_key:
            if cmd.post_only:
                events.append(self._expired(cmd, qty, "post_only"))
                return events
            if tif == "fok" and not self._fillable(opp.levels, limit_key, qty, cmd.user):
                events.append(self._expired(cmd, qty, "fok"))
                return events
            remaining = self._match(cmd, opp, best, limit_key, events)
            if not remaining:
                return events

        if price is None or tif != "gtc":
            # A market order's rest expires as "market", except a FOK that never crossed.
            reason = "market" if price is None and tif != "fok" else tif
            events.append(self._expired(cmd, remaining, reason))
            return events
        # Rest the remainder.
        if is_buy:
            own = self._bids
            key = -price
        else:
            own = self._asks
            key = price
        levels = own.levels
        level = levels.get(key)
        if level is None:
            level = _Level(own, key, price)
            levels[key] = level
            own_best = own.best
            if own_best is None or key < own_best:
                own.best = key
        changed = own.changed
        total = level.total
        if key not in changed:
            changed[key] = total
        user = cmd.user
        entry = [remaining, order_id, user, cmd.client_order_id, level, cmd]
        level.queue.append(entry)
        level.total = total + remaining
        orders[order_id] = entry
        mine = self._by_user.get(user)
        if mine is None:
            self._by_user[user] = {order_id: entry}
        else:
            mine[order_id] = entry
        return events

    def cancel(self, cmd: CancelOrder) -> list[BookEvent]:
        """Cancel one resting order on its owner's request.

        Returns:
            :class:`OrderCanceled` (reason ``user``, ``remaining`` = the open
            quantity); the level's change and any best-price move wait for
            :meth:`flush_market`. If the order is not resting here or belongs
            to another user: only :class:`CancelRejected` (``unknown_order``;
            the same answer either way, so ids of others' orders leak
            nothing), and nothing changes. A cancel for another symbol gets
            ``unknown_symbol``.
        """
        order_id = cmd.order_id
        user = cmd.user
        orders = self._orders
        entry = orders.get(order_id)
        if entry is None or entry[2] != user or cmd.symbol != self.symbol:
            code = _UNKNOWN_SYMBOL if cmd.symbol != self.symbol else _UNKNOWN_ORDER
            return [
                _new(CancelRejected, (
                    order_id, user, cmd.symbol, code,
                    f"no open order {order_id} in {cmd.symbol}", cmd.ts,
                ))
            ]
        # The removal is _remove, inlined: cancels are a quarter of all commands.
        remaining = entry[0]
        entry[0] = 0
        del orders[order_id]
        by_user = self._by_user
        mine = by_user[user]
        del mine[order_id]
        if not mine:
            del by_user[user]
        level: _Level = entry[4]
        side = level.side
        changed = side.changed
        key = level.key
        total = level.total
        if key not in changed:
            changed[key] = total
        total -= remaining
        level.total = total
        if not total:
            side.drop(key)
        else:
            queue = level.queue
            if queue[-1] is entry:  # the newest is the likeliest to be cancelled
                queue.pop()
            elif queue[0] is entry:
                queue.popleft()
            else:
                dead = level.dead + 1
                if dead >= _COMPACT_AT and dead * 2 > len(queue):
                    level.queue = deque(e for e in queue if e[0])
                    dead = 0
                level.dead = dead
        return [
            _new(OrderCanceled, (
                order_id, user, entry[3], self.symbol, remaining, "user", cmd.ts,
            ))
        ]

    def cancel_user(self, cmd: CancelUserOrders) -> list[BookEvent]:
        """Cancel every resting order of ``cmd.user`` (e.g. on logout or disconnect).

        Returns:
            One :class:`OrderCanceled` (reason ``cancel_all``) per order in
            ``order_id`` order; market data waits for :meth:`flush_market`.
            Empty if the user has nothing resting or the symbol is not this
            book's.
        """
        mine = self._by_user.get(cmd.user)
        if cmd.symbol != self.symbol or not mine:
            return []
        ts = cmd.ts
        symbol = self.symbol
        events: list[BookEvent] = []
        for order_id in sorted(mine):
            entry = mine[order_id]
            remaining = entry[0]
            self._remove(entry)
            events.append(
                OrderCanceled(
                    order_id=order_id, user=cmd.user, client_order_id=entry[3],
                    symbol=symbol, remaining=remaining, reason="cancel_all", ts=ts,
                )
            )
        return events

    def flush_market(self, ts: int) -> list[BookEvent]:
        """Publish the market data gathered since the last flush (the end of a turn).

        Args:
            ts: the time of the turn (its last command's ``ts``); the ticker's
                24 h volume window ends here.

        Returns:
            One :class:`BookDelta` with the net change of every level that
            changed (levels best first, total 0 for a level that went away),
            if any did; then one :class:`PublicTrade` per fill, in trade-id
            order; then one :class:`TickerUpdate` if something traded or a best
            price differs from the last ticker's. Empty if nothing changed.
        """
        bids = self._bids
        asks = self._asks
        events: list[BookEvent] = []
        if bids.changed or asks.changed:
            bid_delta = bids.delta()
            ask_delta = asks.delta()
            if bid_delta or ask_delta:
                events.append(_new(BookDelta, (self.symbol, bid_delta, ask_delta, ts)))
        trades = self._trades
        top = (bids.best, asks.best)
        if trades:
            events += trades
            self._trades = []
        elif top == self._top:
            return events
        self._top = top
        volume = self._volume
        cutoff = ts - DAY_NS
        while volume and volume[0][0] <= cutoff:
            self._volume_sum -= volume.popleft()[1]
        bid, ask = top
        events.append(_new(TickerUpdate, (
            self.symbol, self._last, None if bid is None else -bid, ask, self._volume_sum, ts,
        )))
        return events

    def set_status(self, status: str) -> None:
        """Open or halt trading. A halted book rejects new orders but still cancels.

        Raises:
            ValueError: ``status`` is not one of :data:`STATUSES`.
        """
        if status not in STATUSES:
            raise ValueError(f"unknown book status {status!r}")
        self.status = status

    # -- queries --------------------------------------------------------------------

    @property
    def last_price(self) -> int | None:
        """The price of the last trade, or ``None`` before the first one."""
        return self._last

    def ref_price(self) -> int:
        """The reference price of the band: the last trade, else the instrument's."""
        return self.instrument.ref_price if self._last is None else self._last

    def band(self) -> tuple[int, int]:
        """The lowest and highest limit price (ticks) accepted now."""
        return self._band_lo, self._band_hi

    def best_bid(self) -> int | None:
        """The highest bid price, or ``None`` if there are no bids."""
        return self._bids.best_price()

    def best_ask(self) -> int | None:
        """The lowest ask price, or ``None`` if there are no asks."""
        return self._asks.best_price()

    def volume_24h(self) -> int:
        """Lots traded in the 24 hours before the last ticker, plus any trade since."""
        return self._volume_sum

    def depth(
        self, levels: int | None = None
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The aggregated book, best first on each side.

        Args:
            levels: how many levels per side; ``None`` for all.

        Returns:
            ``(bids, asks)``, each a list of ``(price, total_qty)``.
        """
        bids: list[tuple[int, int]] = [
            (lv.price, lv.total) for lv in islice(self._bids.levels.values(), levels)
        ]
        asks: list[tuple[int, int]] = [
            (lv.price, lv.total) for lv in islice(self._asks.levels.values(), levels)
        ]
        return bids, asks

    def snapshot(self, ts: int) -> BookDelta:
        """Every level, as a :class:`BookDelta` that builds the book from empty.

        This is the first message of a ``book.SYMBOL`` subscription; the
        deltas that follow apply on top of it.
        """
        bids, asks = self.depth()
        return BookDelta(symbol=self.symbol, bids=tuple(bids), asks=tuple(asks), ts=ts)

    def order(self, order_id: int) -> OpenOrder | None:
        """The resting order ``order_id``, or ``None`` if it is not in the book."""
        entry = self._orders.get(order_id)
        return None if entry is None else _view(entry)

    def users(self) -> list[str]:
        """The users with resting orders here, sorted."""
        return sorted(self._by_user)

    def open_orders(self, user: str) -> list[OpenOrder]:
        """The resting orders of ``user``, by ``order_id``."""
        mine = self._by_user.get(user)
        if not mine:
            return []
        return [_view(mine[order_id]) for order_id in sorted(mine)]

    def __len__(self) -> int:
        """How many orders rest in the book."""
        return len(self._orders)

    # -- internals ------------------------------------------------------------------

    def _rejection(self, cmd: NewOrder) -> tuple[str, str]:
        """The code and reason of the first check ``cmd`` fails (``submit`` knows one does)."""
        if cmd.symbol != self.symbol:
            return _UNKNOWN_SYMBOL, f"this book trades {self.symbol}, not {cmd.symbol}"
        if self.status != "open":
            return _MARKET_HALTED, f"{self.symbol} is {self.status}"
        if cmd.order_id in self._orders:
            return _BAD_REQUEST, f"order id {cmd.order_id} is already in the book"
        if cmd.price is None:
            return _BAD_REQUEST, "a post-only order needs a limit price"
        return (
            _INVALID_PRICE,
            f"price {cmd.price} is outside the band [{self._band_lo}, {self._band_hi}]",
        )

    def _expired(self, cmd: NewOrder, remaining: int, reason: str) -> OrderExpired:
        return _new(OrderExpired, (
            cmd.order_id, cmd.user, cmd.client_order_id, self.symbol, remaining, reason, cmd.ts,
        ))

    def _fillable(self, opp: SortedDict, limit_key: int, qty: int, user: str) -> bool:
        """Whether other users' orders at or better than ``limit_key`` hold ``qty``."""
        need = qty
        # Own orders are cancelled by self-trade prevention, not filled: count
        # order by order only when the user has some resting.
        own = user in self._by_user
        for key, level in opp.items():
            if key > limit_key:
                break
            if own:
                need -= sum(e[0] for e in level.queue if e[2] != user)
            else:
                need -= level.total
            if need <= 0:
                return True
        return False

    def _match(
        self, cmd: NewOrder, opp: _Side, key: int, limit_key: int, events: list[BookEvent]
    ) -> int:
        """Match ``cmd`` against ``opp`` from its best ``key`` up to ``limit_key``.

        Appends the fills and self-trade cancels to ``events``, queues the
        trades for the next flush, and returns the taker's open quantity.
        """
        symbol = self.symbol
        order_id = cmd.order_id
        user = cmd.user
        coid = cmd.client_order_id
        side = cmd.side
        ts = cmd.ts
        qty = remaining = cmd.qty
        orders = self._orders
        by_user = self._by_user
        trades = self._trades
        levels = opp.levels
        changed = opp.changed
        trade_id = first_trade_id = self.next_trade_id
        last_price = 0
        while True:
            level = levels[key]
            price = level.price
            queue = level.queue
            total = level.total
            if key not in changed:
                changed[key] = total
            while queue:
                entry = queue[0]
                maker_left = entry[0]
                if not maker_left:  # cancelled earlier, deleted lazily
                    queue.popleft()
                    level.dead -= 1
                    continue
                maker_id = entry[1]
                maker_user = entry[2]
                if maker_user == user:  # self-trade prevention: cancel the resting order
                    queue.popleft()
                    entry[0] = 0
                    total -= maker_left
                    del orders[maker_id]
                    own = by_user[user]
                    del own[maker_id]
                    if not own:
                        del by_user[user]
                    events.append(_new(OrderCanceled, (
                        maker_id, user, entry[3], symbol, maker_left, "self_trade", ts,
                    )))
                    continue
                if remaining < maker_left:
                    fill_qty = remaining
                    maker_left -= remaining
                    entry[0] = maker_left
                    remaining = 0
                else:
                    fill_qty = maker_left
                    remaining -= maker_left
                    maker_left = 0
                    entry[0] = 0
                    queue.popleft()
                    del orders[maker_id]
                    theirs = by_user[maker_user]
                    del theirs[maker_id]
                    if not theirs:
                        del by_user[maker_user]
                total -= fill_qty
                last_price = price
                events.append(_new(Fill, (
                    trade_id, symbol, price, fill_qty, side, maker_id, maker_user,
                    entry[3], maker_left, order_id, user, coid, remaining, ts,
                )))
                trades.append(_new(PublicTrade, (symbol, trade_id, price, fill_qty, side, ts)))
                trade_id += 1
                if not remaining:
                    break
            level.total = total
            if total:
                break  # the taker is done: only an emptied level moves on
            opp.drop(key)
            next_key = opp.best
            if next_key is None or next_key > limit_key or not remaining:
                break
            key = next_key
        if trade_id != first_trade_id:
            self.next_trade_id = trade_id
            if last_price != self._last:
                self._last = last_price
                self._band_lo, self._band_hi = self.instrument.band(last_price)
            self._volume.append((ts, qty - remaining))
            self._volume_sum += qty - remaining
        return remaining

    def _remove(self, entry: _Entry) -> None:
        """Take a resting order out of the book."""
        remaining = entry[0]
        order_id = entry[1]
        user = entry[2]
        level: _Level = entry[4]
        del self._orders[order_id]
        mine = self._by_user[user]
        del mine[order_id]
        if not mine:
            del self._by_user[user]
        entry[0] = 0
        side = level.side
        changed = side.changed
        total = level.total
        key = level.key
        if key not in changed:
            changed[key] = total
        total -= remaining
        level.total = total
        if not total:
            side.drop(key)
            return
        queue = level.queue
        if queue[-1] is entry:  # the newest is the likeliest to be cancelled
            queue.pop()
        elif queue[0] is entry:
            queue.popleft()
        else:
            dead = level.dead + 1
            if dead >= _COMPACT_AT and dead * 2 > len(queue):
                level.queue = deque(e for e in queue if e[0])
                dead = 0
            level.dead = dead
