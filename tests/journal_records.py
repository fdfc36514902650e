"""Representative journal records: one EngineBatch per kind of engine message.

``tests/fixtures/journal_pickle_v1.sqlite3`` holds these records (stream
:data:`STREAM`, offsets 1..n) and a snapshot of :func:`snapshot_state` at
offset 2, written by the journal before its record encoding (commit fd9551b,
records pickled by ``_Pickler``, ``_attrs_restore`` per attrs object). It was
made with that commit's code on the path::

    from journal_records import STREAM, engine_records, snapshot_state
    with Journal.open(data_dir) as j, j.turn():
        j.append(STREAM, engine_records())
        j.snapshot(STREAM, 2, snapshot_state())

so test_journal checks that records of every engine class written the old way
still load. Keep this module's values as they are: the fixture depends on them.
"""

from __future__ import annotations

from collections import deque
from decimal import Decimal
from typing import Any

from actors.cores.ledger import OrderState
from actors.host import (
    AccountResync,
    EngineAck,
    EngineBatch,
    HostFault,
    HostResync,
    HostStatsQuery,
)
from actors.messages import (
    ROUTER,
    AccountCancel,
    AccountCancelAll,
    AccountDeposit,
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
    RouterTick,
)
from protocol import (
    BookDelta,
    CancelOrder,
    CancelRejected,
    CancelUserOrders,
    ErrorCode,
    Fill,
    NewOrder,
    OrderAccepted,
    OrderCanceled,
    OrderExpired,
    OrderRejected,
    PublicTrade,
    TickerUpdate,
    UserEvent,
)

STREAM = "host:accounts:0"
TS = 1_796_229_261_703_903_800


def _order(order_id: int, **changes: Any) -> NewOrder:
    fields: dict[str, Any] = dict(
        order_id=order_id, user="u10", client_order_id=f"c{order_id}", symbol="BTC-PERP",
        side="buy", order_type="limit", price=599_996, qty=1, ts=TS,
    )
    fields.update(changes)
    return NewOrder(**fields)


def messages() -> list[Any]:
    """One or more of every engine message class, defaults and None included."""
    reply_to = ReplyTo(gateway="gw-1", conn=7, request_id=42)
    fill = Fill(
        trade_id=1, symbol="BTC-PERP", price=599_996, qty=1, taker_side="sell",
        maker_order_id=1, maker_user="u10", maker_client_order_id="c1", maker_remaining=0,
        taker_order_id=64, taker_user="u17", taker_client_order_id="c64", taker_remaining=1,
        ts=TS,
    )
    return [
        AccountPlace(reply_to=reply_to, order=_order(1), ref_price=600_000),
        AccountPlace(reply_to=None, order=_order(2, order_type="market", price=None,
                                                 tif="ioc", post_only=True), ref_price=0),
        AccountCancel(reply_to=reply_to, user="u10", order_id=3, ts=TS),
        AccountCancel(reply_to=None, user="u10", client_order_id="c3", ts=TS),
        AccountCancelAll(reply_to=reply_to, user="u10", ts=TS),
        AccountDeposit(reply_to=None, user="u10", amount=-5, ts=TS),
        AccountQuery(reply_to=reply_to, user="u10", what="positions"),
        _order(4),
        CancelOrder(order_id=4, user="u10", symbol="BTC-PERP", ts=TS),
        CancelUserOrders(user="u10", symbol="BTC-PERP", ts=TS),
        OrderAccepted(order_id=1, user="u10", client_order_id="c1", symbol="BTC-PERP",
                      side="buy", order_type="limit", price=None, qty=1, tif="gtc", ts=TS),
        OrderRejected(order_id=5, user="u10", client_order_id="c5", symbol="BTC-PERP",
                      code="insufficient_margin", reason="no", ts=TS),
        fill,
        fill._replace(trade_id=2),
        OrderCanceled(order_id=1, user="u10", client_order_id="c1", symbol="BTC-PERP",
                      remaining=1, reason="self_trade", ts=TS),
        OrderExpired(order_id=6, user="u10", client_order_id="c6", symbol="BTC-PERP",
                     remaining=2, reason="ioc", ts=TS),
        CancelRejected(order_id=7, user="u10", symbol="BTC-PERP", code="unknown_order",
                       reason="gone", ts=TS),
        BookDelta(symbol="BTC-PERP", bids=((599_996, 3), (599_990, 0)), asks=(), ts=TS),
        PublicTrade(symbol="BTC-PERP", trade_id=1, price=599_996, qty=1, taker_side="sell",
                    ts=TS),
        TickerUpdate(symbol="BTC-PERP", last=None, best_bid=599_996, best_ask=None,
                     volume_24h=0, ts=TS),
        UserEvent(user="u10", event_id=1, kind="account_update", key="account",
                  data={"balance": "1000000.0000", "frozen": "0.0000", "risk_ratio": "0"},
                  ts=TS),
        UserEvent(user="u10", event_id=2, kind="order_accepted",
                  data={"order_id": 1, "price": None, "nested": {"a": [1, "2", {"b": ()}]}},
                  ts=TS),
        UserEvent(user="u10", event_id=3, kind="position_update", key="BTC-PERP", ts=TS),
        Reply(reply_to=reply_to, ok=True, result={"orders": [{"order_id": 1}], "n": 1}),
        Reply(reply_to=reply_to, ok=False, code=ErrorCode.RATE_LIMITED, message="slow"),
        Delivery(user="u10", events=(("seq", 1), {"k": "v"})),
        RouterAttach(user="u10", gateway="gw-1"),
        RouterAttach(user="u10", gateway="gw-1", reply_to=reply_to),
        RouterDetach(user="u10", gateway="gw-1"),
        RouterReplay(reply_to=reply_to, user="u10", after_seq=3),
        RouterTick(now_ns=TS),
        BookSnapshotRequest(reply_to=reply_to, symbol="BTC-PERP", ts=TS),
        EngineAck(host="host:router", seq=9),
        HostResync(ts=TS, reason="restart"),
        AccountResync(user="u10", reason="restart", ts=TS),
        HostFault(mode="exit"),
        HostStatsQuery(),  # an attrs class without fields
        OrderState.OPEN,  # a StrEnum
        Decimal("0.1"),
        None,
    ]


def engine_records() -> list[EngineBatch]:
    """The records: batches as hosts journal them (shared and fresh Dests)."""
    account = Dest("account", "u10")
    items = [(account if i % 3 else Dest("book", "BTC-PERP"), m) for i, m in enumerate(messages())]
    return [
        EngineBatch(origin="gw-1", items=tuple(items[:5])),
        EngineBatch(origin="host:book:BTC-PERP", seq=5, items=tuple(items[5:20])),
        EngineBatch(origin="host:accounts:1", seq=2**40, items=tuple((ROUTER, m) for _, m in items[20:])),
        EngineBatch(origin="host:router:timer", items=()),
    ]


def snapshot_state() -> Any:
    """A snapshot-like state: dicts, deques, sets, messages in an outbox."""
    return (
        {"u10": {"orders": {1: _order(1)}, "state": OrderState.OPEN}},
        {"host:router": 3},
        deque([1, 2, 3], maxlen=5),
        {frozenset({1, 2}), "x"},
        [("host:router", engine_records()[2])],
    )
