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

Prices are integer ticks and sizes integer lots. Each side keeps its levels
in a dict by a key that sorts best first (asks by ``price``, bids by
``-price``) and the negated keys in a sorted list (best at the end, where nearly all
insertions and removals happen; ``bisect``), with the best key cached; each
level is a FIFO queue of resting orders with lazy deletion, and an
``order_id`` index makes cancels O(1) plus the level's removal when it
empties. There is no per-user index: the rare per-user work (a user's
cancel-all, the list of users) scans the orders instead of every add, cancel
and fill keeping one up to date.

The hot path is written for speed (about a million commands a second is the
scale ``bench/book.py`` measures): a resting order and a level are small lists
rather than objects (see ``_Entry`` and ``_PriceLevel``), events are built with
``tuple.__new__`` (see :mod:`protocol._commands`), and locals cache
attributes.

Snapshots pickled by the book before this layout (commit fd9551b and earlier:
``_Level`` objects in a ``SortedDict``, a per-user index, a volume deque of
pairs) still load: ``_Side.__setstate__`` and ``OrderBook.__setstate__``
recognize the old state and rebuild it in the new shape, at load time only.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque
from operator import itemgetter
from typing import Any

import attrs

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
# they outnumber the live ones twice over), so lazy deletion cannot grow
# without bound.
_COMPACT_AT = 32
# How many last prices' bands OrderBook keeps before it forgets them all.
_BANDS_KEPT = 256

# Events are positional named tuples; ``_new(Fill, (...))`` skips the keyword
# ``__new__`` the class would run (field order is the class's).
_new = tuple.__new__

# A resting order is ``[remaining, order_id, user, client_order_id, level, command]``:
# the open quantity (0 marks it dead in its level's queue), the fields its
# events need, the level it rests in, and the NewOrder that entered it (for
# views). Copying the fields keeps cancels and fills off the command object:
# on a large book each extra object touched is a likely cache miss.
_Entry = list[Any]

# A price level is ``[total, dead, queue, key, side]``: the open quantity of its
# orders, how many cancelled entries wait in ``queue`` (a FIFO of entries, with
# lazy deletion), its best-first key and its _Side. A list, not an object:
# building one is several times cheaper than calling a class, and new levels
# are frequent near the top of the book.
_PriceLevel = list[Any]

_alive = itemgetter(0)  # an entry's open quantity: 0 once it is cancelled or filled


class _Side:
    """One side of the book: its levels by best-first key (``sign * price``), in order.

    ``levels`` maps each key to its level; ``ranks`` holds the negated keys
    sorted ascending, so the best level is the *last* one and the changes
    near the top of the book (where nearly all of them happen) move only the
    end of the list. ``best`` caches the best key (``-ranks[-1]``, or
    ``None`` when the side is empty). ``changed`` maps the key of each level
    changed since the last market flush to the level's total before the
    first change.
    """

    __slots__ = ("best", "changed", "levels", "ranks", "sign")

    def __init__(self, sign: int) -> None:
        self.sign = sign
        self.levels: dict[int, _PriceLevel] = {}
        self.ranks: list[int] = []
        self.best: int | None = None
        self.changed: dict[int, int] = {}

    def __setstate__(self, state: Any) -> None:
        """Restore a pickled side; one pickled before fd9551b's successor is converted.

        Pickle hands a slotted object's state as ``(None, {slot: value})``. The
        old side (no ``ranks``; ``levels`` a SortedDict of :class:`_Level`)
        gets its levels rebuilt as lists, each with its live entries in queue
        order (the lazily deleted ones dropped) and each entry pointed at its
        new level.
        """
        slots: dict[str, Any] = state[1]
        if "ranks" in slots:
            for name, value in slots.items():
                setattr(self, name, value)
            return
        self.sign = slots["sign"]
        self.changed = dict(slots["changed"])
        levels: dict[int, _PriceLevel] = {}
        for key, old in slots["levels"].items():
            queue = deque(filter(_alive, old.queue))
            level = [sum([entry[0] for entry in queue]), 0, queue, key, self]
            for entry in queue:
                entry[4] = level
            levels[key] = level
        self.levels = levels
        self.ranks = sorted([-key for key in levels])
        self.best = -self.ranks[-1] if self.ranks else None

    def drop(self, key: int) -> None:
        """Remove the (empty) level at ``key``."""
        del self.levels[key]
        ranks = self.ranks
        if key == self.best:
            ranks.pop()
            self.best = -ranks[-1] if ranks else None
        else:
            del ranks[bisect_left(ranks, -key)]

    def in_order(self) -> list[int]:
        """The level keys, best first."""
        return [-rank for rank in reversed(self.ranks)]

    def best_price(self) -> int | None:
        best = self.best
        return None if best is None else self.sign * best

    def delta(self) -> tuple[tuple[int, int], ...]:
        """The net ``(price, total)`` changes since the last flush, best first; forgets them.

        A plain loop: ~20 % cheaper than the same as a comprehension over zipped
        ``map``s (measured on bench/book.py's turns, ~27 changed levels a side).
        """
        changed = self.changed
        get = self.levels.get
        sign = self.sign
        out = []
        for key in sorted(changed):
            level = get(key)
            total = level[0] if level else 0
            if total != changed[key]:
                out.append((sign * key, total))
        changed.clear()
        return tuple(out)


class _Level:
    """A price level as the book pickled it before the levels became lists.

    Only for loading old snapshots: pickle finds this class by name, restores
    its slots, and :meth:`_Side.__setstate__` then replaces it by a list level.
    """

    __slots__ = ("dead", "key", "price", "queue", "side", "total")

    dead: int
    key: int
    price: int
    queue: deque[_Entry]
    side: _Side
    total: int


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
        # The symbol this book takes orders for: ``None`` while it is halted,
        # so ``submit`` checks symbol and status with one comparison.
        self._accepting: str | None = None
        self.status = instrument.status
        self.next_trade_id = next_trade_id
        self._bids = _Side(-1)
        self._asks = _Side(1)
        self._orders: dict[int, _Entry] = {}
        self._last: int | None = None
        self._band_lo, self._band_hi = instrument.band(instrument.ref_price)
        # The band around each recent last price: the last price moves back and
        # forth over a few ticks, and Instrument.band is arithmetic in Python.
        self._bands: dict[int, tuple[int, int]] = {}
        # The ts and the lots traded of each trading command, oldest first: two
        # queues of ints rather than one of pairs, so a trade allocates no
        # tuple that the garbage collector would have to track.
        self._volume_ts: deque[int] = deque()
        self._volume_qty: deque[int] = deque()
        self._volume_sum = 0
        # Market data waiting for the next flush: the trades, and the best keys
        # the last ticker showed.
        self._trades: list[PublicTrade] = []
        self._top: tuple[int | None, int | None] = (None, None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled book; one pickled by the old layout (fd9551b) is converted.

        The old book kept ``status`` as a plain attribute, a per-user index
        ``_by_user`` (dropped: the orders hold the users) and the volume window
        as one deque of ``(ts, qty)`` pairs (split into two deques of ints). Its
        sides were converted by :meth:`_Side.__setstate__` already.
        """
        if "_by_user" not in state:
            self.__dict__.update(state)
            return
        state = dict(state)
        del state["_by_user"]
        status = state.pop("status")
        volume = state.pop("_volume")
        self.__dict__.update(state)
        self.status = status  # sets _status and _accepting
        self._bands = {}
        self._volume_ts = deque([ts for ts, _ in volume])
        self._volume_qty = deque([qty for _, qty in volume])

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
        if invalid or cmd.symbol != self._accepting or order_id in orders:
            code, reason = self._rejection(cmd)
            return [
                _new(OrderRejected, (
                    order_id, cmd.user, cmd.client_order_id, self.symbol, code, reason, cmd.ts,
                ))
            ]
        qty = cmd.qty
        tif = cmd.tif
        side = cmd.side
        events: list[BookEvent] = [
            _new(OrderAccepted, (
                order_id, cmd.user, cmd.client_order_id, self.symbol, side,
                cmd.order_type, price, qty, tif, cmd.ts,
            ))
        ]
        # Keys run best-first on both sides, so "crosses" is one comparison: key <= limit_key.
        if side == "buy":
            opp = self._asks
            own = self._bids
            if price is None:
                limit_key = self._band_hi
            else:
                limit_key = price
                key = -price
        else:
            opp = self._bids
            own = self._asks
            if price is None:
                limit_key = -self._band_lo
            else:
                limit_key = -price
                key = price
        best = opp.best
        remaining = qty
        if best is not None and best <= limit_key:
            if cmd.post_only:
                events.append(self._expired(cmd, qty, "post_only"))
                return events
            if tif == "fok" and not self._fillable(opp, limit_key, qty, cmd.user):
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
        levels = own.levels
        level = levels.get(key)
        changed = own.changed
        if level is None:
            # A new level: the new best goes at the end of ranks, any other is insorted.
            level = levels[key] = [0, 0, deque(), key, own]
            own_best = own.best
            if own_best is None or key < own_best:
                own.best = key
                own.ranks.append(-key)
            else:
                insort(own.ranks, -key)
        total = level[0]
        if key not in changed:
            changed[key] = total
        entry = [remaining, order_id, cmd.user, cmd.client_order_id, level, cmd]
        level[2].append(entry)
        level[0] = total + remaining
        orders[order_id] = entry
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
        del orders[order_id]
        # The removal is _take, inlined: cancels are a quarter of all commands.
        remaining = entry[0]
        entry[0] = 0
        level: _PriceLevel = entry[4]
        side: _Side = level[4]
        changed = side.changed
        key = level[3]
        total = level[0]
        if key not in changed:
            changed[key] = total
        total -= remaining
        level[0] = total
        if not total:
            side.drop(key)
        else:
            queue = level[2]
            if queue[-1] is entry:  # the newest is the likeliest to be cancelled
                queue.pop()
            elif queue[0] is entry:
                queue.popleft()
            else:
                dead = level[1] + 1
                if dead >= _COMPACT_AT and dead > 2 * (len(queue) - dead):
                    level[2] = deque(filter(_alive, queue))
                    dead = 0
                level[1] = dead
        return [
            _new(OrderCanceled, (
                order_id, user, entry[3], self.symbol, remaining, "user", cmd.ts,
            ))
        ]

    def cancel_user(self, cmd: CancelUserOrders) -> list[BookEvent]:
        """Cancel every resting order of ``cmd.user`` (e.g. on logout or disconnect).

        With ``cmd.order_ids`` only those ids are looked up (the account's open
        orders; ids not resting here or of another user are passed over), in
        O(ids) rather than a scan of the whole book; without, every resting
        order is checked.

        Returns:
            One :class:`OrderCanceled` (reason ``cancel_all``) per order in
            ``order_id`` order; market data waits for :meth:`flush_market`.
            Empty if the user has nothing resting or the symbol is not this
            book's.
        """
        if cmd.symbol != self.symbol:
            return []
        user = cmd.user
        ts = cmd.ts
        symbol = self.symbol
        orders = self._orders
        # getattr: a command journaled before ``order_ids`` existed unpickles without it.
        wanted = getattr(cmd, "order_ids", None)
        if wanted is None:
            ids = self._ids_of(user)
        else:
            ids = sorted({oid for oid in wanted
                          if (e := orders.get(oid)) is not None and e[2] == user})
        events: list[BookEvent] = []
        for order_id in ids:
            entry = orders.pop(order_id)
            remaining = entry[0]
            self._take(entry)
            events.append(
                OrderCanceled(
                    order_id=order_id, user=user, client_order_id=entry[3],
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
        volume_ts = self._volume_ts
        cutoff = ts - DAY_NS
        if volume_ts and volume_ts[0] <= cutoff:
            volume_qty = self._volume_qty
            while volume_ts and volume_ts[0] <= cutoff:
                volume_ts.popleft()
                self._volume_sum -= volume_qty.popleft()
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

    @property
    def status(self) -> str:
        """The trading status: ``open`` or ``halted`` (see :meth:`set_status`)."""
        return self._status

    @status.setter
    def status(self, status: str) -> None:
        self._status = status
        self._accepting = self.symbol if status == "open" else None

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
        out = []
        for side in (self._bids, self._asks):
            by_key = side.levels
            sign = side.sign
            out.append([(sign * key, by_key[key][0]) for key in side.in_order()[:levels]])
        return out[0], out[1]

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
        return sorted({entry[2] for entry in self._orders.values()})

    def open_orders(self, user: str) -> list[OpenOrder]:
        """The resting orders of ``user``, by ``order_id``."""
        orders = self._orders
        return [_view(orders[order_id]) for order_id in self._ids_of(user)]

    def __len__(self) -> int:
        """How many orders rest in the book."""
        return len(self._orders)

    # -- internals ------------------------------------------------------------------

    def _ids_of(self, user: str) -> list[int]:
        """The ids of ``user``'s resting orders, sorted.

        A scan of the whole book: there is no per-user index, because keeping
        one up to date cost every add, cancel and fill a lookup in a large
        dict, for the sake of the rare per-user query (:meth:`open_orders`, a
        cancel-all without ids). The account's cancel-all names its ids.
        """
        return sorted([oid for oid, entry in self._orders.items() if entry[2] == user])

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

    def _fillable(self, opp: _Side, limit_key: int, qty: int, user: str) -> bool:
        """Whether other users' orders at or better than ``limit_key`` hold ``qty``.

        Own orders are cancelled by self-trade prevention, not filled, so the
        levels are counted order by order.
        """
        need = qty
        levels = opp.levels
        for key in opp.in_order():
            if key > limit_key:
                break
            need -= sum([e[0] for e in levels[key][2] if e[2] != user])
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
        trades = self._trades
        levels = opp.levels
        changed = opp.changed
        sign = opp.sign
        trade_id = first_trade_id = self.next_trade_id
        last_price = 0
        while True:
            level = levels[key]
            price = sign * key
            queue = level[2]
            total = level[0]
            if key not in changed:
                changed[key] = total
            while queue:
                entry = queue[0]
                maker_left = entry[0]
                if not maker_left:  # cancelled earlier, deleted lazily
                    queue.popleft()
                    level[1] -= 1
                    continue
                maker_id = entry[1]
                maker_user = entry[2]
                if maker_user == user:  # self-trade prevention: cancel the resting order
                    queue.popleft()
                    entry[0] = 0
                    total -= maker_left
                    del orders[maker_id]
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
            level[0] = total
            if total:
                break  # the taker is done: only an emptied level moves on
            # The emptied level is the best one: opp.drop(key), inlined.
            del levels[key]
            ranks = opp.ranks
            ranks.pop()
            if not ranks:
                opp.best = None
                break
            key = opp.best = -ranks[-1]
            if key > limit_key or not remaining:
                break
        if trade_id != first_trade_id:
            self.next_trade_id = trade_id
            if last_price != self._last:
                self._last = last_price
                band = self._bands.get(last_price)
                if band is None:
                    bands = self._bands
                    if len(bands) >= _BANDS_KEPT:
                        bands.clear()
                    band = bands[last_price] = self.instrument.band(last_price)
                self._band_lo, self._band_hi = band
            self._volume_ts.append(ts)
            self._volume_qty.append(qty - remaining)
            self._volume_sum += qty - remaining
        return remaining

    def _take(self, entry: _Entry) -> None:
        """Take a resting order out of its level (the caller drops it from ``_orders``)."""
        remaining = entry[0]
        entry[0] = 0
        level: _PriceLevel = entry[4]
        side: _Side = level[4]
        changed = side.changed
        key = level[3]
        total = level[0]
        if key not in changed:
            changed[key] = total
        total -= remaining
        level[0] = total
        if not total:
            side.drop(key)
            return
        queue = level[2]
        if queue[-1] is entry:  # the newest is the likeliest to be cancelled
            queue.pop()
        elif queue[0] is entry:
            queue.popleft()
        else:
            dead = level[1] + 1
            if dead >= _COMPACT_AT and dead > 2 * (len(queue) - dead):
                level[2] = deque(filter(_alive, queue))
                dead = 0
            level[1] = dead
