"""Messages between the engine's entities (books, accounts, router, gateways).

Every class is top-level, frozen, picklable and uniquely named across the
project (Thespian dispatches ``receiveMsg_<ClassName>`` by bare class name).
Messages that travel between actors are batches: an entity that handled
several inputs in one turn sends one message per destination.
"""

from __future__ import annotations

from typing import Any

import attrs

from protocol import (
    BookDelta,
    CancelOrder,
    CancelRejected,
    CancelUserOrders,
    Fill,
    NewOrder,
    OrderAccepted,
    OrderCanceled,
    OrderExpired,
    OrderRejected,
    PublicTrade,
    RequestId,
    TickerUpdate,
    UserEvent,
)


@attrs.frozen(kw_only=True)
class ReplyTo:
    """Where a request's response goes: a gateway, one of its connections, the request id."""

    gateway: str
    conn: int
    request_id: RequestId


@attrs.frozen
class Dest:
    """A logical destination; the host resolves it to an actor address.

    ``kind``: ``book`` (key = symbol), ``account`` (key = user), ``router``
    (key = ""), ``gateway`` (key = gateway id), ``market`` (key = symbol: the
    market-data fan-out of that symbol's subscribers).
    """

    kind: str
    key: str = ""


ROUTER = Dest(kind="router")
#: The desk's own timer: the host turns the message into a wakeup.
TIMER = Dest(kind="timer")

# -- requests into an account -------------------------------------------------------------


@attrs.frozen(kw_only=True)
class AccountPlace:
    """Place an order for ``order.user``; ``ref_price`` values a market order."""

    reply_to: ReplyTo | None
    order: NewOrder
    ref_price: int


@attrs.frozen(kw_only=True)
class AccountCancel:
    """Cancel one of the user's orders by engine id or client order id."""

    reply_to: ReplyTo | None
    user: str
    order_id: int | None = None
    client_order_id: str | None = None
    ts: int


@attrs.frozen(kw_only=True)
class AccountCancelAll:
    reply_to: ReplyTo | None
    user: str
    symbol: str | None = None
    ts: int


@attrs.frozen(kw_only=True)
class AccountDeposit:
    """Credit (positive ``amount``) or debit (negative) the user's cash, in minor units."""

    reply_to: ReplyTo | None
    user: str
    amount: int
    ts: int


@attrs.frozen(kw_only=True)
class AccountQuery:
    """``what``: account, positions, orders, trades."""

    reply_to: ReplyTo
    user: str
    what: str


# -- between entities --------------------------------------------------------------------------


BookCommand = NewOrder | CancelOrder | CancelUserOrders
AccountBookEvent = (
    OrderAccepted | OrderRejected | Fill | OrderCanceled | OrderExpired | CancelRejected
)
MarketEvent = BookDelta | PublicTrade | TickerUpdate


@attrs.frozen(kw_only=True)
class Reply:
    """A response for one request; ``result`` is the wire ``result`` map or None on error."""

    reply_to: ReplyTo
    ok: bool
    result: dict[str, Any] | None = attrs.field(default=None, hash=False)
    code: str | None = None
    message: str | None = None


@attrs.frozen(kw_only=True)
class Delivery:
    """Sequenced private events of one user, in seq order, for that user's sessions."""

    user: str
    events: tuple[Any, ...]


__all__ = [
    "ROUTER",
    "TIMER",
    "RouterAttach",
    "RouterDetach",
    "RouterReplay",
    "RouterTick",
    "AccountBookEvent",
    "AccountCancel",
    "AccountCancelAll",
    "AccountDeposit",
    "AccountPlace",
    "AccountQuery",
    "BookCommand",
    "Delivery",
    "Dest",
    "MarketEvent",
    "Reply",
    "ReplyTo",
    "UserEvent",
]


# -- the router's inputs -------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RouterAttach:
    """A gateway now holds a logged-in session of ``user``: deliver the user's events there.

    With ``reply_to`` the router answers ``{"last_seq"}``: every later event for
    the user reaches the gateway after that reply, so a session that starts
    after ``last_seq`` sees each event exactly once.
    """

    user: str
    gateway: str
    reply_to: ReplyTo | None = None


@attrs.frozen(kw_only=True)
class RouterDetach:
    """The gateway holds no more sessions of ``user``."""

    user: str
    gateway: str


@attrs.frozen(kw_only=True)
class RouterReplay:
    """``resume``: the user's events after ``after_seq``; answered with a Reply whose
    result is ``{from_seq, to_seq, events}`` (``SequencedEvent`` objects, in order)."""

    reply_to: ReplyTo
    user: str
    after_seq: int


@attrs.frozen(kw_only=True)
class RouterTick:
    """The router's conflation timer fired at ``now_ns``."""

    now_ns: int


@attrs.frozen(kw_only=True)
class BookSnapshotRequest:
    """A ``book.SYM`` or ``trades.SYM`` subscription: answered with
    :meth:`actors.desks.BookDesk.snapshot` (the levels and the newest trades) in the
    book's own order, so every delta and trade the gateway receives after the answer
    applies on top of it."""

    reply_to: ReplyTo
    symbol: str
    ts: int
