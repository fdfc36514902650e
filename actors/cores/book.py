"""The order book core: one symbol's price-time priority matching, sans-I/O.

:class:`OrderBook` is a plain, picklable, deterministic object. Each handler
takes one command from :mod:`protocol` and returns the list of events it
caused; time comes only from the command's ``ts`` and trade ids from the
book's own counter, so replaying the same commands on the same snapshot gives
the same events. A rejected command changes nothing: every check runs before
the first mutation.

Prices are integer ticks and sizes integer lots. Both sides live in a
:class:`~sortedcontainers.SortedDict` keyed so that the best level comes first
(asks by ``price``, bids by ``-price``); each level is a FIFO queue of resting
orders with lazy deletion, and an ``order_id`` index makes cancels O(1) plus
the level's removal when it empties.
"""

from __future__ import annotations

from collections import deque
from itertools import islice

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

_NO_LEVELS: list[tuple[int, int]] = []
_NO_TRADES: list[PublicTrade] = []


class _Order:
    """A resting order (internal, mutable). ``remaining == 0`` marks it dead in its queue."""

    __slots__ = ("client_order_id", "is_buy", "order_id", "price", "qty", "remaining", "ts", "user")

    def __init__(
        self,
        order_id: int,
        user: str,
        client_order_id: str,
        is_buy: bool,
        price: int,
        qty: int,
        remaining: int,
        ts: int,
    ) -> None:
        self.order_id = order_id
        self.user = user
        self.client_order_id = client_order_id
        self.is_buy = is_buy
        self.price = price
        self.qty = qty
        self.remaining = remaining
        self.ts = ts


class _Level:
    """One price level: a FIFO of orders, their open total, and how many dead ones wait."""

    __slots__ = ("dead", "price", "queue", "total")

    def __init__(self, price: int) -> None:
        self.price = price
        self.queue: deque[_Order] = deque()
        self.total = 0
        self.dead = 0


class _Side:
    """One side of the book: levels keyed best-first (``sign * price``) and the best key.

    The best key is cached because the hot path asks for it on nearly every
    command, and a SortedDict lookup by position costs several times a dict lookup.
    """

    __slots__ = ("best", "levels", "sign")

    def __init__(self, sign: int) -> None:
        self.sign = sign
        self.levels = SortedDict()  # sign * price -> _Level
        self.best: int | None = None

    def drop(self, key: int) -> None:
        """Remove the (empty) level at ``key``."""
        levels = self.levels
        del levels[key]
        if key == self.best:
            self.best = levels.peekitem(0)[0] if levels else None

    def best_price(self) -> int | None:
        best = self.best
        return None if best is None else self.sign * best


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


def _view(order: _Order) -> OpenOrder:
    return OpenOrder(
        order_id=order.order_id,
        user=order.user,
        client_order_id=order.client_order_id,
        side="buy" if order.is_buy else "sell",
        price=order.price,
        qty=order.qty,
        remaining=order.remaining,
        ts=order.ts,
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
        self._orders: dict[int, _Order] = {}
        self._by_user: dict[str, dict[int, _Order]] = {}
        self._last: int | None = None
        self._band_lo, self._band_hi = instrument.band(instrument.ref_price)
        self._volume: deque[tuple[int, int]] = deque()  # (ts, qty) per trading command
        self._volume_sum = 0

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
            not rest (reason ``ioc``, ``fok``, ``market`` or ``post_only``);
            then market data: one :class:`BookDelta` if any level changed, one
            :class:`PublicTrade` per fill, and one :class:`TickerUpdate` if
            something traded or a best price changed.
        """
        symbol = self.symbol
        order_id = cmd.order_id
        user = cmd.user
        coid = cmd.client_order_id
        ts = cmd.ts
        price = cmd.price
        if (
            cmd.symbol != symbol
            or self.status != "open"
            or order_id in self._orders
            or (price is None and cmd.post_only)
            or (price is not None and not self._band_lo <= price <= self._band_hi)
        ):
            code, reason = self._rejection(cmd)
            return [
                OrderRejected(
                    order_id=order_id, user=user, client_order_id=coid, symbol=symbol,
                    code=code, reason=reason, ts=ts,
                )
            ]
        side = cmd.side
        qty = cmd.qty
        tif = cmd.tif
        events: list[BookEvent] = [
            OrderAccepted(
                order_id=order_id, user=user, client_order_id=coid, symbol=symbol, side=side,
                order_type=cmd.order_type, price=price, qty=qty, tif=tif, ts=ts,
            )
        ]
        is_buy = side == "buy"
        # Keys run best-first on both sides, so "crosses" is one comparison: key <= limit_key.
        if is_buy:
            opp = self._asks
            limit_key = self._band_hi if price is None else price
        else:
            opp = self._bids
            limit_key = -(self._band_lo if price is None else price)
        best = opp.best
        crosses = best is not None and best <= limit_key

        if crosses and cmd.post_only:
            events.append(self._expired(cmd, qty, "post_only"))
            return events
        if tif == "fok" and not self._fillable(opp.levels, limit_key, qty, user):
            events.append(self._expired(cmd, qty, "fok"))
            return events

        remaining = qty
        last_price = 0
        top_changed = False
        # (price, new total) of opposite levels, and the trades; only crossing orders
        # need lists (the passive path reads the shared, never-mutated empty ones).
        touched: list[tuple[int, int]] = _NO_LEVELS
        trades: list[PublicTrade] = _NO_TRADES
        if crosses:
            touched = []
            trades = []
            orders = self._orders
            by_user = self._by_user
            levels = opp.levels
            key = best
            trade_id = self.next_trade_id - 1
            while remaining and key is not None and key <= limit_key:
                level = levels[key]
                queue = level.queue
                level_price = level.price
                while remaining and queue:
                    maker = queue[0]
                    maker_left = maker.remaining
                    if not maker_left:  # cancelled earlier, deleted lazily
                        queue.popleft()
                        level.dead -= 1
                        continue
                    maker_id = maker.order_id
                    if maker.user == user:
                        queue.popleft()
                        maker.remaining = 0
                        level.total -= maker_left
                        del orders[maker_id]
                        own = by_user[user]
                        del own[maker_id]
                        if not own:
                            del by_user[user]
                        events.append(
                            OrderCanceled(
                                order_id=maker_id, user=user,
                                client_order_id=maker.client_order_id, symbol=symbol,
                                remaining=maker_left, reason="self_trade", ts=ts,
                            )
                        )
                        continue
                    fill_qty = remaining if remaining < maker_left else maker_left
                    remaining -= fill_qty
                    maker_left -= fill_qty
                    maker.remaining = maker_left
                    level.total -= fill_qty
                    trade_id += 1
                    last_price = level_price
                    maker_user = maker.user
                    if not maker_left:
                        queue.popleft()
                        del orders[maker_id]
                        theirs = by_user[maker_user]
                        del theirs[maker_id]
                        if not theirs:
                            del by_user[maker_user]
                    events.append(
                        Fill(
                            trade_id=trade_id, symbol=symbol, price=level_price, qty=fill_qty,
                            taker_side=side, maker_order_id=maker_id, maker_user=maker_user,
                            maker_client_order_id=maker.client_order_id,
                            maker_remaining=maker_left, taker_order_id=order_id,
                            taker_user=user, taker_client_order_id=coid,
                            taker_remaining=remaining, ts=ts,
                        )
                    )
                    trades.append(
                        PublicTrade(
                            symbol=symbol, trade_id=trade_id, price=level_price, qty=fill_qty,
                            taker_side=side, ts=ts,
                        )
                    )
                total = level.total
                touched.append((level_price, total))
                if total:
                    break  # the taker is done: only an emptied level moves on
                # Matching starts at the best level, so removing any level moves the top.
                opp.drop(key)
                top_changed = True
                key = opp.best
            self.next_trade_id = trade_id + 1

        resting: tuple[tuple[int, int], ...] = ()
        if remaining:
            if price is not None and tif == "gtc":
                own_side = self._bids if is_buy else self._asks
                key = -price if is_buy else price
                level = own_side.levels.get(key)
                if level is None:
                    own_best = own_side.best
                    if own_best is None or key < own_best:
                        own_side.best = key
                        top_changed = True
                    level = _Level(price)
                    own_side.levels[key] = level
                order = _Order(order_id, user, coid, is_buy, price, qty, remaining, ts)
                level.queue.append(order)
                level.total += remaining
                self._orders[order_id] = order
                mine = self._by_user.get(user)
                if mine is None:
                    self._by_user[user] = {order_id: order}
                else:
                    mine[order_id] = order
                resting = ((price, level.total),)
            else:
                reason = "market" if price is None else tif
                events.append(self._expired(cmd, remaining, reason))

        if touched or resting:
            opposite = tuple(touched)
            if is_buy:
                events.append(BookDelta(symbol=symbol, bids=resting, asks=opposite, ts=ts))
            else:
                events.append(BookDelta(symbol=symbol, bids=opposite, asks=resting, ts=ts))
        if trades:
            events.extend(trades)
            self._last = last_price
            self._band_lo, self._band_hi = self.instrument.band(last_price)
            self._volume.append((ts, qty - remaining))
            self._volume_sum += qty - remaining
            events.append(self._ticker(ts))
        elif top_changed:
            events.append(self._ticker(ts))
        return events

    def cancel(self, cmd: CancelOrder) -> list[BookEvent]:
        """Cancel one resting order on its owner's request.

        Returns:
            :class:`OrderCanceled` (reason ``user``, ``remaining`` = the open
            quantity), :class:`BookDelta`, and :class:`TickerUpdate` if a best
            price changed. If the order is not resting here or belongs to
            another user: only :class:`CancelRejected` (``unknown_order``; the
            same answer either way, so ids of others' orders leak nothing),
            and nothing changes. A cancel for another symbol gets
            ``unknown_symbol``.
        """
        ts = cmd.ts
        symbol = self.symbol
        order = self._orders.get(cmd.order_id)
        if cmd.symbol != symbol or order is None or order.user != cmd.user:
            code = _UNKNOWN_SYMBOL if cmd.symbol != symbol else _UNKNOWN_ORDER
            return [
                CancelRejected(
                    order_id=cmd.order_id, user=cmd.user, symbol=cmd.symbol, code=code,
                    reason=f"no open order {cmd.order_id} in {cmd.symbol}", ts=ts,
                )
            ]
        remaining = order.remaining
        top_changed, total = self._remove(order)
        price = order.price
        events: list[BookEvent] = [
            OrderCanceled(
                order_id=order.order_id, user=order.user, client_order_id=order.client_order_id,
                symbol=symbol, remaining=remaining, reason="user", ts=ts,
            )
        ]
        if order.is_buy:
            events.append(BookDelta(symbol=symbol, bids=((price, total),), asks=(), ts=ts))
        else:
            events.append(BookDelta(symbol=symbol, bids=(), asks=((price, total),), ts=ts))
        if top_changed:
            events.append(self._ticker(ts))
        return events

    def cancel_user(self, cmd: CancelUserOrders) -> list[BookEvent]:
        """Cancel every resting order of ``cmd.user`` (e.g. on logout or disconnect).

        Returns:
            One :class:`OrderCanceled` (reason ``cancel_all``) per order in
            ``order_id`` order, then one :class:`BookDelta` (levels best
            first), then :class:`TickerUpdate` if a best price changed. Empty
            if the user has nothing resting or the symbol is not this book's.
        """
        mine = self._by_user.get(cmd.user)
        if cmd.symbol != self.symbol or not mine:
            return []
        ts = cmd.ts
        symbol = self.symbol
        top_before = (self._bids.best, self._asks.best)
        events: list[BookEvent] = []
        bids: dict[int, int] = {}
        asks: dict[int, int] = {}
        for order_id in sorted(mine):
            order = mine[order_id]
            remaining = order.remaining
            _, total = self._remove(order)
            (bids if order.is_buy else asks)[order.price] = total
            events.append(
                OrderCanceled(
                    order_id=order_id, user=order.user, client_order_id=order.client_order_id,
                    symbol=symbol, remaining=remaining, reason="cancel_all", ts=ts,
                )
            )
        events.append(
            BookDelta(
                symbol=symbol,
                bids=tuple(sorted(bids.items(), reverse=True)),
                asks=tuple(sorted(asks.items())),
                ts=ts,
            )
        )
        if (self._bids.best, self._asks.best) != top_before:
            events.append(self._ticker(ts))
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
        """Lots traded in the 24 hours before the last command that updated the ticker."""
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
        order = self._orders.get(order_id)
        return None if order is None else _view(order)

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
        return OrderExpired(
            order_id=cmd.order_id, user=cmd.user, client_order_id=cmd.client_order_id,
            symbol=self.symbol, remaining=remaining, reason=reason, ts=cmd.ts,
        )

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
                need -= sum(o.remaining for o in level.queue if o.user != user)
            else:
                need -= level.total
            if need <= 0:
                return True
        return False

    def _remove(self, order: _Order) -> tuple[bool, int]:
        """Take a resting order out; returns (best price changed, level total after)."""
        order_id = order.order_id
        del self._orders[order_id]
        mine = self._by_user[order.user]
        del mine[order_id]
        if not mine:
            del self._by_user[order.user]
        side = self._bids if order.is_buy else self._asks
        key = -order.price if order.is_buy else order.price
        level: _Level = side.levels[key]
        level.total -= order.remaining
        order.remaining = 0
        if not level.total:
            top = key == side.best
            side.drop(key)
            return top, 0
        queue = level.queue
        if queue[-1] is order:  # the newest is the likeliest to be cancelled
            queue.pop()
        elif queue[0] is order:
            queue.popleft()
        else:
            level.dead += 1
            if level.dead >= _COMPACT_AT and level.dead * 2 > len(queue):
                level.queue = deque(o for o in queue if o.remaining)
                level.dead = 0
        return False, level.total

    def _ticker(self, ts: int) -> TickerUpdate:
        volume = self._volume
        cutoff = ts - DAY_NS
        while volume and volume[0][0] <= cutoff:
            self._volume_sum -= volume.popleft()[1]
        bid = self._bids.best
        ask = self._asks.best
        return TickerUpdate(
            symbol=self.symbol, last=self._last, best_bid=None if bid is None else -bid,
            best_ask=ask, volume_24h=self._volume_sum, ts=ts,
        )
