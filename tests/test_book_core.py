"""The order book core: matching rules, effects, market data, and properties over random op lists.

Most tests drive a :class:`TurnBook`, whose every command is a turn of its own
(the command's events, then :meth:`OrderBook.flush_market` at its ``ts``): the
per-command view of market data. The batching tests drive a plain
:class:`OrderBook` and flush at the end of multi-command turns.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.cores.book import DAY_NS, OpenOrder, OrderBook
from protocol import (
    BookDelta,
    BookEvent,
    CancelOrder,
    CancelRejected,
    CancelUserOrders,
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

SYM = "BTC-PERP"
REF = 600_000  # BTC-PERP ref_price in ticks; band 10 % -> [540_000, 660_000]
T0 = 1_700_000_000_000_000_000


@pytest.fixture
def btc(instruments: dict[str, Instrument]) -> Instrument:
    return instruments[SYM]


class TurnBook(OrderBook):
    """An OrderBook that flushes its market data after every command."""

    def submit(self, cmd: NewOrder) -> list[BookEvent]:
        return super().submit(cmd) + self.flush_market(cmd.ts)

    def cancel(self, cmd: CancelOrder) -> list[BookEvent]:
        return super().cancel(cmd) + self.flush_market(cmd.ts)

    def cancel_user(self, cmd: CancelUserOrders) -> list[BookEvent]:
        return super().cancel_user(cmd) + self.flush_market(cmd.ts)


@pytest.fixture
def book(btc: Instrument) -> OrderBook:
    return TurnBook(btc)


_ids = iter(range(1_000, 10**9))


def new(
    user: str,
    side: str,
    price: int | None,
    qty: int,
    *,
    order_id: int | None = None,
    tif: str = "gtc",
    post_only: bool = False,
    ts: int = T0,
    symbol: str = SYM,
) -> NewOrder:
    oid = next(_ids) if order_id is None else order_id
    return NewOrder(
        order_id=oid, user=user, client_order_id=f"c{oid}", symbol=symbol, side=side,
        order_type="market" if price is None else "limit", price=price, qty=qty, tif=tif,
        post_only=post_only, ts=ts,
    )


def cancel(order_id: int, user: str, ts: int = T0) -> CancelOrder:
    return CancelOrder(order_id=order_id, user=user, symbol=SYM, ts=ts)


def of(events: Sequence[BookEvent], kind: type[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def kinds(events: Sequence[BookEvent]) -> list[str]:
    return [type(e).__name__ for e in events]


def state(book: OrderBook, users: Sequence[str] = ("a", "b", "c")) -> Any:
    return book.depth(), [book.open_orders(u) for u in users], book.last_price, book.next_trade_id


def apply_delta(
    depth: tuple[list[tuple[int, int]], list[tuple[int, int]]], delta: BookDelta
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    bids, asks = dict(depth[0]), dict(depth[1])
    for side, changes in ((bids, delta.bids), (asks, delta.asks)):
        for price, qty in changes:
            if qty:
                side[price] = qty
            else:
                del side[price]
    return sorted(bids.items(), reverse=True), sorted(asks.items())


# -- resting, priority, fills ---------------------------------------------------------


def test_a_passive_order_rests_and_publishes(book: OrderBook) -> None:
    cmd = new("a", "buy", REF - 10, 5)
    events = book.submit(cmd)
    assert kinds(events) == ["OrderAccepted", "BookDelta", "TickerUpdate"]
    accepted = events[0]
    assert accepted == OrderAccepted(
        order_id=cmd.order_id, user="a", client_order_id=cmd.client_order_id, symbol=SYM,
        side="buy", order_type="limit", price=REF - 10, qty=5, tif="gtc", ts=T0,
    )
    assert events[1] == BookDelta(symbol=SYM, bids=((REF - 10, 5),), asks=(), ts=T0)
    assert events[2] == TickerUpdate(
        symbol=SYM, last=None, best_bid=REF - 10, best_ask=None, volume_24h=0, ts=T0
    )
    assert book.best_bid() == REF - 10 and book.best_ask() is None
    assert book.order(cmd.order_id) == OpenOrder(
        order_id=cmd.order_id, user="a", client_order_id=cmd.client_order_id, side="buy",
        price=REF - 10, qty=5, remaining=5, ts=T0,
    )


def test_an_order_behind_the_top_sends_no_ticker(book: OrderBook) -> None:
    book.submit(new("a", "sell", REF + 1, 5))
    assert kinds(book.submit(new("b", "sell", REF + 2, 5))) == ["OrderAccepted", "BookDelta"]
    # Same price as the best: the level grows, the best price does not move.
    events = book.submit(new("b", "sell", REF + 1, 3))
    assert kinds(events) == ["OrderAccepted", "BookDelta"]
    assert events[1] == BookDelta(symbol=SYM, bids=(), asks=((REF + 1, 8),), ts=T0)


def test_price_time_priority(book: OrderBook) -> None:
    first = new("a", "sell", REF + 5, 2)
    second = new("b", "sell", REF + 5, 2)
    better = new("c", "sell", REF + 4, 2)
    for cmd in (first, second, better):
        book.submit(cmd)
    events = book.submit(new("d", "buy", None, 5, tif="ioc"))
    fills = of(events, Fill)
    assert [(f.maker_order_id, f.price, f.qty) for f in fills] == [
        (better.order_id, REF + 4, 2),
        (first.order_id, REF + 5, 2),
        (second.order_id, REF + 5, 1),
    ]
    assert [f.trade_id for f in fills] == [1, 2, 3]
    assert book.order(second.order_id) is not None
    assert book.order(second.order_id).remaining == 1  # type: ignore[union-attr]
    assert book.depth() == ([], [(REF + 5, 1)])


def test_partial_fill_reports_both_remainders(book: OrderBook) -> None:
    maker = new("a", "sell", REF, 10)
    book.submit(maker)
    taker = new("b", "buy", REF, 4)
    events = book.submit(taker)
    assert kinds(events) == ["OrderAccepted", "Fill", "BookDelta", "PublicTrade", "TickerUpdate"]
    fill = events[1]
    assert fill == Fill(
        trade_id=1, symbol=SYM, price=REF, qty=4, taker_side="buy",
        maker_order_id=maker.order_id, maker_user="a",
        maker_client_order_id=maker.client_order_id, maker_remaining=6,
        taker_order_id=taker.order_id, taker_user="b",
        taker_client_order_id=taker.client_order_id, taker_remaining=0, ts=T0,
    )
    assert events[3] == PublicTrade(
        symbol=SYM, trade_id=1, price=REF, qty=4, taker_side="buy", ts=T0
    )
    assert events[4] == TickerUpdate(
        symbol=SYM, last=REF, best_bid=None, best_ask=REF, volume_24h=4, ts=T0
    )
    assert book.order(maker.order_id).remaining == 6  # type: ignore[union-attr]
    assert book.order(taker.order_id) is None
    assert book.last_price == REF


def test_a_crossing_limit_trades_at_maker_prices_then_rests(book: OrderBook) -> None:
    book.submit(new("a", "sell", REF + 1, 2))
    book.submit(new("a", "sell", REF + 3, 2))
    book.submit(new("a", "sell", REF + 9, 2))
    taker = new("b", "buy", REF + 3, 7)
    events = book.submit(taker)
    assert [(f.price, f.qty, f.taker_remaining) for f in of(events, Fill)] == [
        (REF + 1, 2, 5),
        (REF + 3, 2, 3),
    ]
    assert of(events, BookDelta) == [
        BookDelta(symbol=SYM, bids=((REF + 3, 3),), asks=((REF + 1, 0), (REF + 3, 0)), ts=T0)
    ]
    assert book.depth() == ([(REF + 3, 3)], [(REF + 9, 2)])
    assert book.order(taker.order_id).remaining == 3  # type: ignore[union-attr]


def test_effects_come_in_the_documented_order(book: OrderBook) -> None:
    book.submit(new("a", "sell", REF + 1, 1))
    book.submit(new("b", "sell", REF + 2, 1))
    book.submit(new("a", "sell", REF + 3, 1))
    events = book.submit(new("b", "buy", REF + 3, 5, tif="ioc"))
    assert kinds(events) == [
        "OrderAccepted",
        "Fill",
        "OrderCanceled",  # b's own ask at REF+2, in matching order
        "Fill",
        "OrderExpired",
        "BookDelta",
        "PublicTrade",
        "PublicTrade",
        "TickerUpdate",
    ]


# -- time in force, order types --------------------------------------------------------


def test_ioc_remainder_expires_and_does_not_rest(book: OrderBook) -> None:
    book.submit(new("a", "sell", REF, 2))
    taker = new("b", "buy", REF, 5, tif="ioc")
    events = book.submit(taker)
    assert of(events, OrderExpired) == [
        OrderExpired(
            order_id=taker.order_id, user="b", client_order_id=taker.client_order_id,
            symbol=SYM, remaining=3, reason="ioc", ts=T0,
        )
    ]
    assert book.depth() == ([], [])
    assert book.order(taker.order_id) is None


def test_ioc_that_does_not_cross_expires_without_market_data(book: OrderBook) -> None:
    book.submit(new("a", "sell", REF + 5, 2))
    before = state(book)
    events = book.submit(new("b", "buy", REF, 5, tif="ioc"))
    assert kinds(events) == ["OrderAccepted", "OrderExpired"]
    assert state(book) == before


def test_market_order_remainder_expires_with_reason_market(book: OrderBook) -> None:
    book.submit(new("a", "sell", REF, 2))
    events = book.submit(new("b", "buy", None, 5))  # gtc market: still never rests
    assert of(events, OrderExpired)[0].reason == "market"
    assert of(events, OrderExpired)[0].remaining == 3
    assert book.depth() == ([], [])


def test_market_order_on_empty_book_expires(book: OrderBook) -> None:
    events = book.submit(new("b", "sell", None, 5, tif="ioc"))
    assert kinds(events) == ["OrderAccepted", "OrderExpired"]
    assert events[1].reason == "market"  # type: ignore[union-attr]


def test_market_order_stops_at_the_band(book: OrderBook, btc: Instrument) -> None:
    far = new("a", "sell", 650_000, 5)  # inside the band around REF
    book.submit(far)
    # A trade at the band's low moves the reference, and with it the band.
    book.submit(new("a", "buy", 540_000, 1))
    book.submit(new("b", "sell", 540_000, 1))
    assert book.last_price == 540_000
    lo, hi = btc.band(540_000)
    assert book.band() == (lo, hi) and hi < 650_000
    events = book.submit(new("c", "buy", None, 3))
    assert of(events, Fill) == []
    assert of(events, OrderExpired)[0].reason == "market"
    assert book.order(far.order_id).remaining == 5  # type: ignore[union-attr]
    # A market sell stops at the band's low in the same way.
    book.submit(new("a", "buy", lo, 1))
    assert book.submit(new("c", "sell", None, 1))[1].qty == 1  # type: ignore[union-attr]


def test_fok_fills_completely_or_not_at_all(book: OrderBook) -> None:
    book.submit(new("a", "sell", REF, 3))
    book.submit(new("b", "sell", REF + 1, 3))
    before = state(book)
    events = book.submit(new("c", "buy", REF + 1, 7, tif="fok"))
    assert kinds(events) == ["OrderAccepted", "OrderExpired"]
    assert events[1].reason == "fok" and events[1].remaining == 7  # type: ignore[union-attr]
    assert state(book) == before
    # A limit below the second level cannot reach its quantity either.
    assert kinds(book.submit(new("c", "buy", REF, 4, tif="fok"))) == [
        "OrderAccepted",
        "OrderExpired",
    ]
    events = book.submit(new("c", "buy", REF + 1, 6, tif="fok"))
    assert sum(f.qty for f in of(events, Fill)) == 6
    assert of(events, OrderExpired) == []
    assert book.depth() == ([], [])


def test_fok_does_not_count_own_orders(book: OrderBook) -> None:
    book.submit(new("a", "sell", REF, 5))
    book.submit(new("b", "sell", REF, 5))
    before = state(book)
    # a's own 5 would be cancelled by self-trade prevention, not filled.
    events = book.submit(new("a", "buy", REF, 10, tif="fok"))
    assert kinds(events) == ["OrderAccepted", "OrderExpired"]
    assert state(book) == before
    # 5 is fillable from b: a's resting order meets STP on the way.
    events = book.submit(new("a", "buy", REF, 5, tif="fok"))
    assert kinds(events) == [
        "OrderAccepted",
        "OrderCanceled",
        "Fill",
        "BookDelta",
        "PublicTrade",
        "TickerUpdate",
    ]
    assert events[1].reason == "self_trade" and events[1].remaining == 5  # type: ignore[union-attr]
    assert book.depth() == ([], [])


def test_market_fok_is_bounded_by_the_band(book: OrderBook) -> None:
    book.submit(new("a", "buy", REF - 100, 2))
    assert kinds(book.submit(new("b", "sell", None, 3, tif="fok")))[-1] == "OrderExpired"
    events = book.submit(new("b", "sell", None, 2, tif="fok"))
    assert sum(f.qty for f in of(events, Fill)) == 2


def test_post_only_that_would_cross_expires_and_does_nothing_else(book: OrderBook) -> None:
    book.submit(new("a", "sell", REF, 5))
    before = state(book)
    cmd = new("b", "buy", REF, 5, post_only=True)
    events = book.submit(cmd)
    assert kinds(events) == ["OrderAccepted", "OrderExpired"]
    assert events[1].reason == "post_only" and events[1].remaining == 5  # type: ignore[union-attr]
    assert state(book) == before
    # Even against the user's own order: it would cross.
    assert book.submit(new("a", "buy", REF, 1, post_only=True))[1].reason == "post_only"  # type: ignore[union-attr]


def test_post_only_that_does_not_cross_rests(book: OrderBook) -> None:
    book.submit(new("a", "sell", REF, 5))
    cmd = new("b", "buy", REF - 1, 5, post_only=True)
    assert kinds(book.submit(cmd)) == ["OrderAccepted", "BookDelta", "TickerUpdate"]
    assert book.order(cmd.order_id) is not None


def test_post_only_market_is_a_bad_request(book: OrderBook) -> None:
    events = book.submit(new("b", "buy", None, 5, post_only=True))
    assert kinds(events) == ["OrderRejected"]
    assert events[0].code == "bad_request"  # type: ignore[union-attr]


# -- self-trade prevention ---------------------------------------------------------------


def test_self_trade_cancels_the_resting_order_and_keeps_matching(book: OrderBook) -> None:
    own = new("a", "sell", REF, 4)
    other = new("b", "sell", REF, 4)
    book.submit(own)
    book.submit(new("a", "buy", REF - 1, 1))  # partial-fill own first so remaining != qty
    book.submit(new("c", "buy", REF, 1))
    assert book.order(own.order_id).remaining == 3  # type: ignore[union-attr]
    book.submit(other)
    taker = new("a", "buy", REF, 2)
    events = book.submit(taker)
    assert events[1] == OrderCanceled(
        order_id=own.order_id, user="a", client_order_id=own.client_order_id, symbol=SYM,
        remaining=3, reason="self_trade", ts=T0,
    )
    assert [(f.maker_order_id, f.qty) for f in of(events, Fill)] == [(other.order_id, 2)]
    assert book.order(own.order_id) is None
    assert book.depth() == ([(REF - 1, 1)], [(REF, 2)])


def test_self_trade_only_still_publishes_the_removed_level(book: OrderBook) -> None:
    own = new("a", "sell", REF, 4)
    book.submit(own)
    book.submit(new("b", "sell", REF + 1, 4))
    events = book.submit(new("a", "buy", REF, 2, tif="ioc"))
    assert kinds(events) == [
        "OrderAccepted",
        "OrderCanceled",
        "OrderExpired",
        "BookDelta",
        "TickerUpdate",
    ]
    assert events[3] == BookDelta(symbol=SYM, bids=(), asks=((REF, 0),), ts=T0)
    assert events[4].best_ask == REF + 1  # type: ignore[union-attr]


# -- rejections ---------------------------------------------------------------------------


@pytest.mark.parametrize("price", [539_999, 660_001, 1])
def test_limit_price_outside_the_band_is_rejected(book: OrderBook, price: int) -> None:
    book.submit(new("a", "sell", REF, 5))
    before = state(book)
    cmd = new("b", "buy", price, 1)
    events = book.submit(cmd)
    assert len(events) == 1
    rejected = events[0]
    assert isinstance(rejected, OrderRejected)
    assert (rejected.code, rejected.order_id, rejected.client_order_id) == (
        "invalid_price", cmd.order_id, cmd.client_order_id,
    )
    assert state(book) == before


def test_band_edges_are_accepted(book: OrderBook) -> None:
    assert kinds(book.submit(new("b", "buy", 540_000, 1)))[0] == "OrderAccepted"
    assert kinds(book.submit(new("b", "sell", 660_000, 1)))[0] == "OrderAccepted"


def test_band_follows_the_last_trade(book: OrderBook, btc: Instrument) -> None:
    book.submit(new("a", "sell", 650_000, 1))
    book.submit(new("b", "buy", 650_000, 1))
    assert book.ref_price() == 650_000
    assert book.band() == btc.band(650_000)
    assert kinds(book.submit(new("b", "buy", 700_000, 1)))[0] == "OrderAccepted"
    assert kinds(book.submit(new("b", "buy", 540_000, 1))) == ["OrderRejected"]


def test_halted_book_rejects_orders_but_accepts_cancels(book: OrderBook) -> None:
    resting = new("a", "buy", REF, 1)
    book.submit(resting)
    book.set_status("halted")
    before = state(book)
    events = book.submit(new("b", "sell", REF, 1))
    assert kinds(events) == ["OrderRejected"]
    assert events[0].code == "market_halted"  # type: ignore[union-attr]
    assert state(book) == before
    assert kinds(book.cancel(cancel(resting.order_id, "a")))[0] == "OrderCanceled"
    book.set_status("open")
    assert kinds(book.submit(new("b", "sell", REF, 1)))[0] == "OrderAccepted"
    with pytest.raises(ValueError, match="status"):
        book.set_status("auction")


def test_instrument_status_is_the_initial_status(btc: Instrument) -> None:
    import attrs

    halted = TurnBook(attrs.evolve(btc, status="halted"))
    assert halted.submit(new("a", "buy", REF, 1))[0].code == "market_halted"  # type: ignore[union-attr]


def test_duplicate_order_id_is_rejected_and_leaves_the_original(book: OrderBook) -> None:
    first = new("a", "buy", REF, 3)
    book.submit(first)
    before = state(book)
    events = book.submit(new("b", "sell", REF + 1, 1, order_id=first.order_id))
    assert kinds(events) == ["OrderRejected"]
    assert events[0].code == "bad_request"  # type: ignore[union-attr]
    assert state(book) == before


def test_wrong_symbol_is_rejected(book: OrderBook) -> None:
    events = book.submit(new("a", "buy", REF, 1, symbol="ETH-PERP"))
    assert kinds(events) == ["OrderRejected"]
    assert events[0].code == "unknown_symbol"  # type: ignore[union-attr]
    assert book.depth() == ([], [])


# -- cancels ----------------------------------------------------------------------------


def test_cancel_returns_exactly_the_remaining_qty(book: OrderBook) -> None:
    maker = new("a", "sell", REF, 10)
    book.submit(maker)
    book.submit(new("b", "sell", REF, 1))
    book.submit(new("b", "buy", REF, 3))
    events = book.cancel(cancel(maker.order_id, "a", ts=T0 + 5))
    assert events == [
        OrderCanceled(
            order_id=maker.order_id, user="a", client_order_id=maker.client_order_id,
            symbol=SYM, remaining=7, reason="user", ts=T0 + 5,
        ),
        BookDelta(symbol=SYM, bids=(), asks=((REF, 1),), ts=T0 + 5),
    ]
    assert book.depth() == ([], [(REF, 1)])


def test_cancel_of_the_best_level_updates_the_ticker(book: OrderBook) -> None:
    best = new("a", "buy", REF, 1)
    book.submit(best)
    book.submit(new("a", "buy", REF - 2, 1))
    events = book.cancel(cancel(best.order_id, "a"))
    assert kinds(events) == ["OrderCanceled", "BookDelta", "TickerUpdate"]
    assert events[1] == BookDelta(symbol=SYM, bids=((REF, 0),), asks=(), ts=T0)
    assert events[2].best_bid == REF - 2  # type: ignore[union-attr]


@pytest.mark.parametrize("who", ["someone else", "unknown id", "twice"])
def test_cancel_rejections_are_all_alike_and_change_nothing(book: OrderBook, who: str) -> None:
    mine = new("a", "buy", REF, 1)
    book.submit(mine)
    if who == "someone else":
        cmd = cancel(mine.order_id, "mallory")
    elif who == "unknown id":
        cmd = cancel(999_999_999, "a")
    else:
        book.cancel(cancel(mine.order_id, "a"))
        cmd = cancel(mine.order_id, "a")
    before = state(book)
    events = book.cancel(cmd)
    assert events == [
        CancelRejected(
            order_id=cmd.order_id, user=cmd.user, symbol=SYM, code="unknown_order",
            reason=f"no open order {cmd.order_id} in {SYM}", ts=T0,
        )
    ]
    assert state(book) == before


def test_cancel_in_another_symbol_is_rejected(book: OrderBook) -> None:
    mine = new("a", "buy", REF, 1)
    book.submit(mine)
    events = book.cancel(CancelOrder(order_id=mine.order_id, user="a", symbol="ETH-PERP", ts=T0))
    assert [e.code for e in of(events, CancelRejected)] == ["unknown_symbol"]
    assert book.order(mine.order_id) is not None


def rest_three_of_a_and_one_of_b(book: OrderBook) -> None:
    """a: buy 2 @ REF-1 (id 30), sell 3 @ REF+1 (id 10), buy 4 @ REF-2 (id 20);
    b: buy 5 @ REF-1 (id 40) — ids out of placing order."""
    for cmd in (new("a", "buy", REF - 1, 2, order_id=30),
                new("a", "sell", REF + 1, 3, order_id=10),
                new("a", "buy", REF - 2, 4, order_id=20),
                new("b", "buy", REF - 1, 5, order_id=40)):
        book.submit(cmd)


def test_cancel_user_cancels_all_in_order_id_order(book: OrderBook) -> None:
    rest_three_of_a_and_one_of_b(book)
    events = book.cancel_user(CancelUserOrders(user="a", symbol=SYM, ts=T0))
    assert kinds(events) == ["OrderCanceled"] * 3 + ["BookDelta", "TickerUpdate"]
    assert [(e.order_id, e.remaining, e.reason) for e in of(events, OrderCanceled)] == [
        (10, 3, "cancel_all"),
        (20, 4, "cancel_all"),
        (30, 2, "cancel_all"),
    ]
    assert events[3] == BookDelta(
        symbol=SYM, bids=((REF - 1, 5), (REF - 2, 0)), asks=((REF + 1, 0),), ts=T0
    )
    assert book.depth() == ([(REF - 1, 5)], [])
    assert book.open_orders("a") == []
    assert book.cancel_user(CancelUserOrders(user="a", symbol=SYM, ts=T0)) == []


def test_cancel_user_with_ids_looks_up_only_those_of_the_user(book: OrderBook) -> None:
    rest_three_of_a_and_one_of_b(book)
    # 40 is b's, 99 rests nowhere, 20 is a's but not named: only 10 and 30 go.
    events = book.cancel_user(CancelUserOrders(user="a", symbol=SYM, ts=T0,
                                               order_ids=(40, 30, 99, 10, 30)))
    assert [(e.order_id, e.remaining, e.reason) for e in of(events, OrderCanceled)] == [
        (10, 3, "cancel_all"),
        (30, 2, "cancel_all"),
    ]
    assert [o.order_id for o in book.open_orders("a")] == [20]
    assert [o.order_id for o in book.open_orders("b")] == [40]
    assert book.depth() == ([(REF - 1, 5), (REF - 2, 4)], [])


def test_cancel_user_with_every_id_equals_the_scan(btc: Instrument) -> None:
    rng = random.Random(5)
    scanned, indexed = OrderBook(btc), OrderBook(btc)
    for i in range(1, 400):
        cmd = new(rng.choice("abc"), rng.choice(("buy", "sell")),
                  REF + rng.randint(-20, 20), rng.randint(1, 5), order_id=i)
        assert scanned.submit(cmd) == indexed.submit(cmd)
    ids = tuple(o.order_id for o in indexed.open_orders("b"))
    assert ids
    assert scanned.cancel_user(CancelUserOrders(user="b", symbol=SYM, ts=T0)) == (
        indexed.cancel_user(CancelUserOrders(user="b", symbol=SYM, ts=T0, order_ids=ids)))
    assert scanned.depth() == indexed.depth()


def test_cancel_user_journaled_before_order_ids_existed_scans(book: OrderBook) -> None:
    for i, user in enumerate(("a", "b", "a"), 1):
        book.submit(new(user, "buy", REF - i, 1, order_id=i))
    # As the journal restores an old record: the fields it names, no order_ids.
    old: Any = object.__new__(CancelUserOrders)
    for name, value in (("user", "a"), ("symbol", SYM), ("ts", T0)):
        object.__setattr__(old, name, value)
    events = book.cancel_user(old)
    assert [e.order_id for e in of(events, OrderCanceled)] == [1, 3]


def test_cancel_user_order_ids_are_validated() -> None:
    with pytest.raises((TypeError, ValueError)):
        CancelUserOrders(user="a", symbol=SYM, ts=T0, order_ids=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CancelUserOrders(user="a", symbol=SYM, ts=T0, order_ids=(1, 0))


def test_many_cancels_inside_a_level_keep_time_priority(book: OrderBook) -> None:
    orders = [new(f"u{i % 3}", "sell", REF, 1) for i in range(200)]
    for cmd in orders:
        book.submit(cmd)
    keep = orders[::7]
    for cmd in orders:
        if cmd not in keep:
            book.cancel(cancel(cmd.order_id, cmd.user))
    assert book.depth() == ([], [(REF, len(keep))])
    events = book.submit(new("z", "buy", None, len(keep)))
    assert [f.maker_order_id for f in of(events, Fill)] == [c.order_id for c in keep]
    assert book.depth() == ([], [])


# -- queries, market data, ticker ---------------------------------------------------------


def test_depth_snapshot_and_open_orders(book: OrderBook) -> None:
    a2 = new("a", "buy", REF - 2, 1)
    a1 = new("a", "sell", REF + 1, 2)
    for cmd in (new("b", "buy", REF - 1, 3), a2, new("b", "buy", REF - 2, 4), a1):
        book.submit(cmd)
    assert book.depth() == ([(REF - 1, 3), (REF - 2, 5)], [(REF + 1, 2)])
    assert book.depth(1) == ([(REF - 1, 3)], [(REF + 1, 2)])
    assert book.snapshot(T0 + 1) == BookDelta(
        symbol=SYM, bids=((REF - 1, 3), (REF - 2, 5)), asks=((REF + 1, 2),), ts=T0 + 1
    )
    assert [o.order_id for o in book.open_orders("a")] == sorted([a2.order_id, a1.order_id])
    assert book.open_orders("nobody") == []
    assert len(book) == 4


def test_deltas_equal_the_change_of_depth(book: OrderBook) -> None:
    cmds: list[Any] = [
        new("a", "sell", REF + 1, 2),
        new("b", "sell", REF + 1, 3),
        new("a", "sell", REF + 2, 3),
        new("c", "buy", REF - 1, 4),
        new("a", "buy", REF + 2, 7),  # STP on a's asks, fills b, rests 2 at REF+2
        new("c", "sell", None, 9),
    ]
    for cmd in cmds:
        before = book.depth()
        events = book.submit(cmd)
        deltas = of(events, BookDelta)
        assert len(deltas) <= 1
        after = apply_delta(before, deltas[0]) if deltas else before
        assert after == book.depth()


def test_ticker_volume_is_a_rolling_24h_window(book: OrderBook) -> None:
    def trade(qty: int, ts: int) -> TickerUpdate:
        book.submit(new("a", "sell", REF, qty, ts=ts))
        ticker: TickerUpdate = of(book.submit(new("b", "buy", REF, qty, ts=ts)), TickerUpdate)[0]
        return ticker

    assert trade(2, T0).volume_24h == 2
    assert trade(3, T0 + DAY_NS // 2).volume_24h == 5
    assert trade(4, T0 + DAY_NS).volume_24h == 7  # the first trade is exactly 24h old: out
    assert trade(1, T0 + 2 * DAY_NS).volume_24h == 1
    assert book.volume_24h() == 1


def test_trade_ids_continue_from_the_constructor(btc: Instrument) -> None:
    book = TurnBook(btc, next_trade_id=500)
    book.submit(new("a", "sell", REF, 1))
    events = book.submit(new("b", "buy", REF, 1))
    assert of(events, Fill)[0].trade_id == 500
    assert of(events, PublicTrade)[0].trade_id == 500
    assert book.next_trade_id == 501


def test_the_book_pickles_and_carries_on_identically(book: OrderBook) -> None:
    for i in range(20):
        book.submit(new("abc"[i % 3], "buy" if i % 2 else "sell", REF + (i % 5) - 2, 1 + i % 4))
    copy = pickle.loads(pickle.dumps(book))
    assert state(copy) == state(book)
    tail = [new("a", "buy", None, 6, order_id=77_777), new("b", "sell", REF - 3, 9, order_id=77_778)]
    assert [copy.submit(c) for c in tail] == [book.submit(c) for c in tail]


# -- market data per turn ------------------------------------------------------------------


def test_commands_alone_publish_no_market_data(btc: Instrument) -> None:
    book = OrderBook(btc)
    resting = new("a", "sell", REF, 5)
    assert kinds(book.submit(resting)) == ["OrderAccepted"]
    assert kinds(book.submit(new("b", "buy", REF, 2))) == ["OrderAccepted", "Fill"]
    assert kinds(book.cancel(cancel(resting.order_id, "a"))) == ["OrderCanceled"]
    assert kinds(book.flush_market(T0)) == ["PublicTrade", "TickerUpdate"]  # no net level change
    assert book.flush_market(T0) == []


def test_a_turn_publishes_the_net_change_once(btc: Instrument) -> None:
    book = OrderBook(btc)
    book.submit(new("a", "sell", REF + 1, 5))
    book.submit(new("a", "buy", REF - 1, 5))
    book.flush_market(T0)
    gone = new("b", "buy", REF - 3, 4)
    events: list[BookEvent] = []
    for cmd in (
        new("b", "sell", REF + 1, 2),  # the level grows twice: one entry, its final total
        new("c", "sell", REF + 1, 1),
        gone,
        new("d", "buy", REF + 1, 6, ts=T0 + 1),  # two trades
        new("b", "buy", REF - 2, 1, ts=T0 + 1),
    ):
        events += book.submit(cmd)
    events += book.cancel(cancel(gone.order_id, "b", ts=T0 + 2))  # came and went: not published
    assert of(events, BookDelta) == of(events, PublicTrade) == of(events, TickerUpdate) == []
    market = book.flush_market(T0 + 2)
    assert kinds(market) == ["BookDelta", "PublicTrade", "PublicTrade", "TickerUpdate"]
    assert market[0] == BookDelta(
        symbol=SYM, bids=((REF - 2, 1),), asks=((REF + 1, 2),), ts=T0 + 2
    )
    fills = of(events, Fill)
    assert [(t.trade_id, t.price, t.qty, t.ts) for t in market[1:3]] == [
        (f.trade_id, f.price, f.qty, f.ts) for f in fills
    ]
    assert market[3] == TickerUpdate(
        symbol=SYM, last=REF + 1, best_bid=REF - 1, best_ask=REF + 1, volume_24h=6, ts=T0 + 2
    )
    assert book.flush_market(T0 + 3) == []


def test_a_turn_that_moves_the_top_and_back_sends_no_ticker(btc: Instrument) -> None:
    book = OrderBook(btc)
    book.submit(new("a", "buy", REF - 1, 1))
    book.flush_market(T0)
    better = new("b", "buy", REF, 1)
    book.submit(better)
    book.cancel(cancel(better.order_id, "b"))
    assert book.flush_market(T0) == []
    book.submit(new("b", "buy", REF, 1))
    assert kinds(book.flush_market(T0)) == ["BookDelta", "TickerUpdate"]


# -- properties over random op lists ----------------------------------------------------

# A small instrument keeps random prices dense: band 10 % around 100 -> [90, 110].
TINY = Instrument(
    symbol="TINY", kind="perpetual", tick=Decimal(1), lot=Decimal(1), multiplier=Decimal(1),
    margin_ppm=50_000, maker_fee_ppm=0, taker_fee_ppm=0, ref_price=100, band_ppm=100_000,
    position_limit=10_000,
)
USERS = ("a", "b", "c")
HOUR = 3_600 * 10**9

# Prices cluster around the reference so orders cross often; a few fall outside
# the band. One order in eight is post-only; halts are rare so most orders trade.
# Hypothesis favours the first alternative of each choice: it is the common case.
submits = st.tuples(
    st.just("submit"),
    st.sampled_from(USERS),
    st.sampled_from(("buy", "sell")),
    st.one_of(st.integers(97, 103), st.integers(97, 103), st.integers(85, 115), st.none()),
    st.integers(1, 8),
    st.sampled_from(("gtc", "gtc", "gtc", "ioc", "fok")),
    st.integers(0, 7).map(lambda n: n == 7),
)
cancels = st.tuples(st.just("cancel"), st.sampled_from((None, *USERS)), st.integers(0, 200))
cancel_alls = st.tuples(st.just("cancel_all"), st.sampled_from(USERS))
statuses = st.tuples(st.just("status"), st.sampled_from(("open",) * 7 + ("halted",)))
ops_lists = st.lists(
    st.one_of(*[submits] * 12, *[cancels] * 4, cancel_alls, statuses), min_size=20, max_size=120
)

Op = tuple[Any, ...]


def seeded_ops(seed: int, n: int) -> list[Op]:
    """A uniform random op list: wider coverage than the shrinkable strategy, which
    favours its first choices (``buy``, user ``a``, low prices)."""
    rng = random.Random(seed)
    ops: list[Op] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.70:
            price = None if rng.random() < 0.1 else rng.choice((rng.randint(85, 115),) + (rng.randint(97, 103),) * 5)
            ops.append((
                "submit", rng.choice(USERS), rng.choice(("buy", "sell")), price,
                rng.randint(1, 8), rng.choice(("gtc", "gtc", "gtc", "ioc", "fok")),
                rng.random() < 0.1,
            ))
        elif r < 0.92:
            ops.append(("cancel", rng.choice((None, *USERS)), rng.randint(0, 200)))
        elif r < 0.97:
            ops.append(("cancel_all", rng.choice(USERS)))
        else:
            ops.append(("status", rng.choice(("open",) * 4 + ("halted",))))
    return ops


def make_command(op: Op, i: int, issued: list[NewOrder]) -> Any:
    ts = T0 + i * HOUR  # 80 ops span more than 3 days: the 24h window rolls
    if op[0] == "submit":
        _, user, side, price, qty, tif, post_only = op
        # Every tenth order reuses an issued id: duplicates while it rests.
        order_id = issued[i % len(issued)].order_id if issued and i % 10 == 9 else i + 1
        cmd = NewOrder(
            order_id=order_id, user=user, client_order_id=f"c{i}", symbol="TINY", side=side,
            order_type="market" if price is None else "limit", price=price, qty=qty, tif=tif,
            post_only=post_only, ts=ts,
        )
        issued.append(cmd)
        return cmd
    if op[0] == "cancel":
        _, user, pick = op
        # Mostly ids that were issued, some unknown. User None: the order's owner
        # asks; otherwise anyone may, and others' ids must be refused.
        if issued and pick < 180:
            target = issued[pick % len(issued)]
            order_id, user = target.order_id, user or target.user
        else:
            order_id, user = 10**6 + pick, user or "a"
        return CancelOrder(order_id=order_id, user=user, symbol="TINY", ts=ts)
    if op[0] == "cancel_all":
        return CancelUserOrders(user=op[1], symbol="TINY", ts=ts)
    return op[1]


def dispatch(book: OrderBook, cmd: Any) -> list[BookEvent]:
    if isinstance(cmd, NewOrder):
        return book.submit(cmd)
    if isinstance(cmd, CancelOrder):
        return book.cancel(cmd)
    if isinstance(cmd, CancelUserOrders):
        return book.cancel_user(cmd)
    book.set_status(cmd)
    return []


def all_open(book: OrderBook) -> dict[int, OpenOrder]:
    return {o.order_id: o for u in USERS for o in book.open_orders(u)}


def run_checked(ops: list[Op]) -> list[list[BookEvent]]:
    """Run ``ops`` on a fresh book, checking every invariant after every command."""
    book = TurnBook(TINY)
    model: dict[int, int] = {}  # resting order_id -> remaining, from the events alone
    replica = book.depth()  # rebuilt from BookDelta events alone
    trades: list[tuple[int, int]] = []  # (ts, qty)
    issued: list[NewOrder] = []
    out: list[list[BookEvent]] = []
    for i, op in enumerate(ops):
        cmd = make_command(op, i, issued)
        before = (book.depth(), all_open(book), book.last_price, book.band())
        events = dispatch(book, cmd)
        out.append(events)
        taker: int | None = None
        taker_left = 0
        for event in events:
            if isinstance(event, OrderAccepted):
                taker, taker_left = event.order_id, event.qty
            elif isinstance(event, Fill):
                assert event.taker_order_id == taker
                assert 0 < event.qty <= model[event.maker_order_id]
                assert event.qty <= taker_left
                assert event.maker_user != event.taker_user
                model[event.maker_order_id] -= event.qty
                taker_left -= event.qty
                assert event.maker_remaining == model[event.maker_order_id]
                assert event.taker_remaining == taker_left
                if not model[event.maker_order_id]:
                    del model[event.maker_order_id]
                # Price limits: the taker's own, or the band for market orders.
                assert isinstance(cmd, NewOrder)
                lo, hi = before[3]
                limit = cmd.price if cmd.price is not None else (hi if cmd.side == "buy" else lo)
                assert event.price <= limit if cmd.side == "buy" else event.price >= limit
                trades.append((event.ts, event.qty))
            elif isinstance(event, OrderCanceled):
                assert event.remaining == model.pop(event.order_id)
            elif isinstance(event, OrderExpired):
                assert event.order_id == taker and event.remaining == taker_left
                taker = None
            elif isinstance(event, OrderRejected):
                assert len(events) == 1
            elif isinstance(event, CancelRejected):
                assert len(events) == 1
                assert isinstance(cmd, CancelOrder)
                resting = before[1].get(cmd.order_id)
                assert resting is None or resting.user != cmd.user
            elif isinstance(event, BookDelta):
                replica = apply_delta(replica, event)
            elif isinstance(event, TickerUpdate):
                assert (event.best_bid, event.best_ask) == (book.best_bid(), book.best_ask())
                assert event.last == book.last_price
                assert event.volume_24h == sum(q for t, q in trades if t > event.ts - DAY_NS)
        if taker is not None and taker_left:
            model[taker] = taker_left  # it rests
        if isinstance(cmd, NewOrder) and cmd.tif == "fok" and kinds(events)[0] == "OrderAccepted":
            # FOK trades all or nothing, counting only other users' orders within its limit.
            lo, hi = before[3]
            buy = cmd.side == "buy"
            limit = cmd.price if cmd.price is not None else (hi if buy else lo)
            available = sum(
                o.remaining for o in before[1].values()
                if o.user != cmd.user and o.side != cmd.side
                and (o.price <= limit if buy else o.price >= limit)
            )
            expired = of(events, OrderExpired)
            if expired and expired[0].reason == "post_only":
                pass
            elif available >= cmd.qty:
                assert sum(f.qty for f in of(events, Fill)) == cmd.qty and not expired
            else:
                assert kinds(events) == ["OrderAccepted", "OrderExpired"]
                assert expired[0].reason == "fok"
        # The state a rejected command leaves is the state it found.
        if len(events) == 1 and isinstance(events[0], OrderRejected | CancelRejected):
            assert (book.depth(), all_open(book), book.last_price, book.band()) == before
        # A ticker comes exactly when something traded or a best price moved.
        bids, asks = book.depth()
        top_before = [side[0][0] if side else None for side in before[0]]
        top_after = [side[0][0] if side else None for side in (bids, asks)]
        assert bool(of(events, TickerUpdate)) == (top_before != top_after or bool(of(events, Fill)))
        # Invariants.
        best_bid, best_ask = book.best_bid(), book.best_ask()
        assert best_bid is None or best_ask is None or best_bid < best_ask
        assert {k: o.remaining for k, o in all_open(book).items()} == model
        assert sum(q for _, q in bids) + sum(q for _, q in asks) == sum(model.values())
        assert replica == (bids, asks)
        assert all(q > 0 for _, q in bids + asks)
        assert len(book) == len(model)
    return out


@settings(max_examples=300)
@given(ops_lists)
def test_random_op_lists_keep_every_invariant(ops: list[Op]) -> None:
    run_checked(ops)


@settings(max_examples=200)
@given(st.integers(0, 2**32 - 1), st.integers(20, 200))
def test_seeded_random_op_lists_keep_every_invariant(seed: int, n: int) -> None:
    run_checked(seeded_ops(seed, n))


@settings(max_examples=100)
@given(ops_lists, st.integers(0, 80))
def test_same_ops_same_events_and_pickled_books_agree(ops: list[Op], cut: int) -> None:
    assert run_checked(ops) == run_checked(ops)
    # A book pickled part-way (as a journal snapshot would) goes on identically.
    book = TurnBook(TINY)
    issued: list[NewOrder] = []
    cmds = [make_command(op, i, issued) for i, op in enumerate(ops)]
    for cmd in cmds[:cut]:
        dispatch(book, cmd)
    restored = pickle.loads(pickle.dumps(book))
    assert [dispatch(restored, c) for c in cmds[cut:]] == [dispatch(book, c) for c in cmds[cut:]]


@settings(max_examples=200)
@given(ops_lists, st.lists(st.integers(1, 12), min_size=1, max_size=40))
def test_turns_publish_what_per_command_flushes_would_net(ops: list[Op], sizes: list[int]) -> None:
    """Commands batched into turns: the deltas rebuild the book, the trades are the
    fills, and a ticker comes exactly when something traded or a best price moved."""
    book = OrderBook(TINY)
    issued: list[NewOrder] = []
    replica = book.depth()
    top = (None, None)  # the best prices of the last ticker
    fills: list[Fill] = []
    trades: list[tuple[int, int]] = []  # (ts, qty)
    turn_sizes = iter(sizes * (len(ops) // len(sizes) + 1))
    i = 0
    while i < len(ops):
        n = next(turn_sizes)
        ts = T0
        for j in range(i, min(i + n, len(ops))):
            cmd = make_command(ops[j], j, issued)
            ts = T0 + j * HOUR
            events = dispatch(book, cmd)
            assert of(events, BookDelta) == of(events, PublicTrade) == of(events, TickerUpdate) == []
            fills += of(events, Fill)
        i += n
        market = book.flush_market(ts)
        deltas = of(market, BookDelta)
        assert len(deltas) <= 1 and (not deltas or market[0] == deltas[0])
        if deltas:
            replica = apply_delta(replica, deltas[0])
            assert deltas[0].bids or deltas[0].asks
        assert replica == book.depth()
        public = of(market, PublicTrade)
        assert [(t.trade_id, t.price, t.qty, t.taker_side, t.ts) for t in public] == [
            (f.trade_id, f.price, f.qty, f.taker_side, f.ts) for f in fills
        ]
        trades += [(f.ts, f.qty) for f in fills]
        tickers = of(market, TickerUpdate)
        now = (book.best_bid(), book.best_ask())
        assert len(tickers) == (1 if fills or now != top else 0)
        if tickers:
            assert market[-1] == tickers[0]
            assert (tickers[0].best_bid, tickers[0].best_ask) == now
            assert tickers[0].last == book.last_price
            assert tickers[0].volume_24h == sum(q for t, q in trades if t > ts - DAY_NS)
            top = now
        fills = []


# -- snapshots of the old layout ------------------------------------------------------------

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _apply(book: OrderBook, kind: str, cmd: Any) -> list[BookEvent]:
    if kind == "flush":
        return book.flush_market(cmd)
    handler: Any = getattr(book, kind)
    return list(handler(cmd))


def _views(book: OrderBook) -> Any:
    ids = sorted(o.order_id for u in book.users() for o in book.open_orders(u))
    return (
        book.depth(), len(book), book.users(),
        {u: book.open_orders(u) for u in (*book.users(), "e", "f", "zz")},
        {i: book.order(i) for i in (*ids, 1, 99_999)},
        book.best_bid(), book.best_ask(), book.band(), book.last_price, book.volume_24h(),
        book.next_trade_id, book.status,
    )


def test_a_book_pickled_by_the_old_layout_loads_and_behaves_the_same(btc: Instrument) -> None:
    # book_v1.pickle: an OrderBook pickled by fd9551b (SortedDict of _Level objects,
    # _by_user, a deque of (ts, qty)); tests/fixtures/make_book_v1.py writes it.
    old = pickle.loads((FIXTURES / "book_v1.pickle").read_bytes())
    commands = pickle.loads((FIXTURES / "book_v1_commands.pickle").read_bytes())
    fresh = OrderBook(btc)
    for kind, cmd in commands:
        _apply(fresh, kind, cmd)
    assert type(old) is OrderBook
    assert not hasattr(old, "_by_user")
    assert _views(old) == _views(fresh)
    assert len(old) > 20 and len(old.users()) >= 3 and old.last_price is not None
    # The same resting orders, in the same queues (the old dead entries are dropped).
    for side in ("_bids", "_asks"):
        mine, theirs = getattr(old, side), getattr(fresh, side)
        assert mine.in_order() == theirs.in_order() and mine.best == theirs.best
        for key in mine.levels:
            level = mine.levels[key]
            assert level[3] == key and level[4] is mine and level[1] == 0
            assert all(entry[4] is level for entry in level[2])
            assert [e[:4] for e in level[2]] == [e[:4] for e in theirs.levels[key][2] if e[0]]
    for order_id, entry in old._orders.items():
        assert entry[4][2].count(entry) == 1 and entry[1] == order_id
    # Pending market data comes out the same, then everything that follows does.
    last_ts = max(cmd.ts for kind, cmd in commands if kind != "flush")
    ts = last_ts + 1_000
    assert old.flush_market(ts) == fresh.flush_market(ts)
    bids, asks = fresh.depth()
    resting = {u: [o.order_id for o in fresh.open_orders(u)] for u in fresh.users()}
    nid = 90_000
    later: list[tuple[str, Any]] = []

    def order(user: str, side: str, price: int | None, qty: int, tif: str = "gtc") -> None:
        nonlocal nid, ts
        nid += 1
        ts += 1_000
        later.append(("submit", new(user, side, price, qty, order_id=nid, tif=tif, ts=ts)))

    order("e", "buy", asks[2][0], sum(q for _, q in asks[:2]) + 1)  # sweeps two levels, rests
    later.append(("cancel", cancel(resting["a"][0], "a", ts=ts)))
    later.append(("cancel", cancel(resting["b"][-1], "b", ts=ts)))
    later.append(("cancel", cancel(resting["b"][-1], "c", ts=ts)))  # not c's: rejected
    later.append(("flush", ts))
    order("f", "sell", bids[3][0], 10**6, tif="fok")  # too big: expires untouched
    order("f", "sell", bids[2][0], sum(q for _, q in bids[:2]), tif="fok")
    order("c", "sell", bids[-1][0], 40, tif="ioc")  # crosses levels, meets c's own orders
    later.append(("cancel_user", CancelUserOrders(user="b", symbol=SYM, ts=ts)))
    order("a", "buy", None, 5)
    later.append(("flush", ts))
    order("d", "sell", asks[-1][0] + 10, 3)
    later.append(("flush", last_ts + DAY_NS + HOUR))  # the first trades leave the window
    seen: list[BookEvent] = []
    for kind, cmd in later:
        events = _apply(old, kind, cmd)
        assert events == _apply(fresh, kind, cmd), (kind, cmd)
        assert _views(old) == _views(fresh)
        seen += events
    names = set(kinds(seen))
    assert {"Fill", "OrderExpired", "OrderCanceled", "CancelRejected", "BookDelta"} <= names
    assert (list(old._volume_ts), list(old._volume_qty)) == (
        list(fresh._volume_ts), list(fresh._volume_qty)
    )
    # A converted book pickles and loads in the new layout.
    again = pickle.loads(pickle.dumps(old, 5))
    assert _views(again) == _views(fresh)
