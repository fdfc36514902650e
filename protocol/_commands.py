"""Internal actor messages of the order flow: commands in, engine events out.

All integers: prices in ticks, sizes in lots, money in minor units, time in
nanoseconds. Ids are chosen outside the cores (the shells allocate them), so a
core is deterministic. Class names are project-unique because Thespian
dispatches ``receiveMsg_<ClassName>`` by bare name.

Commands and :class:`UserEvent` are frozen attrs classes with validators. The
book's events (:data:`BookEvent`) deliberately are not: they are
:class:`~typing.NamedTuple` classes, because the book builds about three per
order on its hottest path and ``tuple.__new__(Fill, (...))`` costs ~100 ns
where a frozen attrs instance costs ~800 ns (38 % of the book's time when they
were attrs). They keep what the house rule asks of a message: immutable, flat,
uniquely named, picklable, built by keyword (``Fill(trade_id=..., ...)``), and
equal only to an equal event of the same class, never to a bare tuple. The
book fills every field itself, so there is nothing to validate.
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import attrs

SIDES = ("buy", "sell")
ORDER_TYPES = ("limit", "market")
TIFS = ("gtc", "ioc", "fok")

_side = attrs.validators.in_(SIDES)
_nonneg = attrs.validators.ge(0)
_pos = attrs.validators.gt(0)


def _price_matches_type(inst: NewOrder, _: attrs.Attribute[int | None], value: int | None) -> None:
    if inst.order_type == "limit":
        if value is None or value <= 0:
            raise ValueError("a limit order needs a positive price")
    elif value is not None:
        raise ValueError("a market order has no price")


# -- commands -------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class NewOrder:
    """A risk-checked order for one book."""

    order_id: int = attrs.field(validator=_pos)
    user: str
    client_order_id: str
    symbol: str
    side: str = attrs.field(validator=_side)
    order_type: str = attrs.field(validator=attrs.validators.in_(ORDER_TYPES))
    price: int | None = attrs.field(validator=_price_matches_type)
    qty: int = attrs.field(validator=_pos)
    tif: str = attrs.field(default="gtc", validator=attrs.validators.in_(TIFS))
    post_only: bool = False
    ts: int = attrs.field(validator=_nonneg)


@attrs.frozen(kw_only=True)
class CancelOrder:
    """Cancel one resting order; only its owner may."""

    order_id: int = attrs.field(validator=_pos)
    user: str
    symbol: str
    ts: int = attrs.field(validator=_nonneg)


@attrs.frozen(kw_only=True)
class CancelUserOrders:
    """Cancel every resting order of ``user`` in this book.

    ``order_ids``, when given, are the user's orders its account still holds open
    in this symbol: the book then looks up only those (ids not resting here or of
    another user are passed over) instead of scanning every resting order for the
    user's — a mass cancel-on-disconnect on a deep book stays O(orders of the
    user). None (and commands journaled before the field existed) scans.
    """

    user: str
    symbol: str
    ts: int = attrs.field(validator=_nonneg)
    order_ids: tuple[int, ...] | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.deep_iterable(
            _pos, attrs.validators.instance_of(tuple))))


# -- engine events (book → accounts) -----------------------------------------------
# Named tuples, not attrs: see the module docstring.


def _same_event(self: tuple[object, ...], other: object) -> bool:
    return type(self) is type(other) and tuple.__eq__(self, other) is True


def _other_event(self: tuple[object, ...], other: object) -> bool:
    return not _same_event(self, other)


_E = TypeVar("_E", bound=tuple[object, ...])


def _event(cls: type[_E]) -> type[_E]:
    """Make a named-tuple event equal only to an equal event of its own class."""
    # setattr, because mypy rejects any statement but a field in a NamedTuple body.
    setattr(cls, "__eq__", _same_event)  # noqa: B010
    setattr(cls, "__ne__", _other_event)  # noqa: B010
    setattr(cls, "__hash__", tuple.__hash__)  # noqa: B010
    return cls


@_event
class OrderAccepted(NamedTuple):
    """The book took the order (it may trade at once and/or rest)."""

    order_id: int
    user: str
    client_order_id: str
    symbol: str
    side: str
    order_type: str
    price: int | None
    qty: int
    tif: str
    ts: int


@_event
class OrderRejected(NamedTuple):
    """The order never entered the book; ``code`` is a wire error code."""

    order_id: int
    user: str
    client_order_id: str
    symbol: str
    code: str
    reason: str
    ts: int


@_event
class Fill(NamedTuple):
    """One match between a resting (maker) and an incoming (taker) order.

    Both accounts receive the same event and apply their own side of it.
    ``maker_remaining``/``taker_remaining`` are the orders' open quantities
    after this fill.
    """

    trade_id: int
    symbol: str
    price: int
    qty: int
    taker_side: str
    maker_order_id: int
    maker_user: str
    maker_client_order_id: str
    maker_remaining: int
    taker_order_id: int
    taker_user: str
    taker_client_order_id: str
    taker_remaining: int
    ts: int


@_event
class OrderCanceled(NamedTuple):
    """A resting order left the book; ``remaining`` is what had not traded.

    ``reason``: ``user`` (asked to), ``self_trade`` (self-trade prevention),
    ``cancel_all``.
    """

    order_id: int
    user: str
    client_order_id: str
    symbol: str
    remaining: int
    reason: str
    ts: int


@_event
class OrderExpired(NamedTuple):
    """An incoming order's rest did not rest.

    ``reason``: ``ioc``, ``fok``, ``market`` (no more liquidity inside the band),
    ``post_only`` (it would have crossed).
    """

    order_id: int
    user: str
    client_order_id: str
    symbol: str
    remaining: int
    reason: str
    ts: int


@_event
class CancelRejected(NamedTuple):
    """A cancel named an order this user has no open order for."""

    order_id: int
    user: str
    symbol: str
    code: str
    reason: str
    ts: int


# -- market data (book → subscribers) -------------------------------------------------


@_event
class BookDelta(NamedTuple):
    """Changed price levels, best first: ``(price, total_qty)``, qty 0 removes.

    The book publishes one per turn (:meth:`OrderBook.flush_market`) with the
    net change since the previous one; totals are absolute, so applying a
    delta twice, or over a snapshot that already holds it, is harmless.
    """

    symbol: str
    bids: tuple[tuple[int, int], ...]
    asks: tuple[tuple[int, int], ...]
    ts: int


@_event
class PublicTrade(NamedTuple):
    """One trade, as the ``trades.SYMBOL`` channel shows it."""

    symbol: str
    trade_id: int
    price: int
    qty: int
    taker_side: str
    ts: int


@_event
class TickerUpdate(NamedTuple):
    """Last price, best prices and the rolling 24 h volume, after a turn that moved them."""

    symbol: str
    last: int | None
    best_bid: int | None
    best_ask: int | None
    volume_24h: int
    ts: int


BookEvent = (
    OrderAccepted
    | OrderRejected
    | Fill
    | OrderCanceled
    | OrderExpired
    | CancelRejected
    | BookDelta
    | PublicTrade
    | TickerUpdate
)


# -- private events (account → router → sessions) --------------------------------------

#: Event kind → priority class (PROTOCOL.md): 0 never conflated or dropped.
EVENT_PRIORITY: dict[str, int] = {
    "order_rejected": 0,
    "risk_alert": 0,
    "margin_call": 0,
    "order_accepted": 1,
    "order_partially_filled": 1,
    "order_filled": 1,
    "order_canceled": 1,
    "order_expired": 1,
    "trade_executed": 1,
    "account_update": 2,
    "position_update": 2,
    "system_notice": 3,
}


def _known_kind(inst: UserEvent, _: attrs.Attribute[str], value: str) -> None:
    if value not in EVENT_PRIORITY:
        raise ValueError(f"unknown private event kind {value!r}")


@attrs.frozen(kw_only=True)
class UserEvent:
    """A private event for one user, before the router numbers it.

    ``event_id`` is unique per user and deterministic (the producer's counter),
    so a producer that re-emits after a restart is deduplicated by the router.
    ``key`` groups P2/P3 events for conflation (e.g. ``position_update`` per
    symbol); ``data`` is the wire-ready map (decimal strings, ints, strs).
    """

    user: str
    event_id: int = attrs.field(validator=_pos)
    kind: str = attrs.field(validator=_known_kind)
    key: str = ""
    data: dict[str, object] = attrs.field(factory=dict, eq=True, hash=False)
    ts: int = attrs.field(validator=_nonneg)

    @property
    def priority(self) -> int:
        return EVENT_PRIORITY[self.kind]
