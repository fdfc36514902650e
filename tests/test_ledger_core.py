"""The account ledger core (actors/cores/ledger.py): plain pytest, no I/O, no actors."""

from __future__ import annotations

import copy
import pickle
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import actors.cores.ledger as ledger_module
from actors.cores.ledger import (
    LIVE_STATES,
    ORDER_TRANSITIONS,
    DuplicateOrder,
    IllegalTransition,
    Ledger,
    LedgerBookEvent,
    OrderInput,
    OrderRecord,
    OrderState,
    _after_fill,
    _avg_price_decimal,
    _avg_price_str,
    _ratio_str,
    _replace,
    _user_event,
    _with_status,
    next_order_state,
    units_formatter,
)
from protocol import (
    CancelRejected,
    ErrorCode,
    Fill,
    Instrument,
    LocalProtocolError,
    NewOrder,
    OrderAccepted,
    OrderCanceled,
    OrderExpired,
    OrderRejected,
    RemoteProtocolError,
    UserEvent,
    event_data,
    from_units,
    parse_instruments,
    ratio_to_str,
)

ROOT = Path(__file__).parent.parent
INSTRUMENTS = parse_instruments((ROOT / "protocol" / "instruments.toml").read_text())
BTC = "BTC-PERP"  # tick 0.1, lot 0.001, value_per_tick_lot 1, margin 5%, fees 2/5 bp
ES = "ESZ6"  # tick 0.25, lot 1, multiplier 50: value_per_tick_lot 125_000
USDT = 10_000  # minor units per unit of quote currency
BTC_60K = 600_000  # 60000.0 in ticks
ONE_BTC = 1_000  # lots


# -- builders ---------------------------------------------------------------------------


def order(
    oid: int,
    side: str,
    qty: int,
    price: int | None = BTC_60K,
    *,
    user: str = "alice",
    symbol: str = BTC,
    cid: str | None = None,
    tif: str = "gtc",
) -> NewOrder:
    return NewOrder(
        order_id=oid,
        user=user,
        client_order_id=cid or f"c{oid}",
        symbol=symbol,
        side=side,
        order_type="market" if price is None else "limit",
        price=price,
        qty=qty,
        tif=tif,
        ts=oid,
    )


def accepted(o: NewOrder, ts: int = 10) -> OrderAccepted:
    return OrderAccepted(
        order_id=o.order_id,
        user=o.user,
        client_order_id=o.client_order_id,
        symbol=o.symbol,
        side=o.side,
        order_type=o.order_type,
        price=o.price,
        qty=o.qty,
        tif=o.tif,
        ts=ts,
    )


def rejected(o: NewOrder, ts: int = 10) -> OrderRejected:
    return OrderRejected(
        order_id=o.order_id,
        user=o.user,
        client_order_id=o.client_order_id,
        symbol=o.symbol,
        code="market_halted",
        reason="halted",
        ts=ts,
    )


def canceled(o: NewOrder, remaining: int, ts: int = 20) -> OrderCanceled:
    return OrderCanceled(
        order_id=o.order_id,
        user=o.user,
        client_order_id=o.client_order_id,
        symbol=o.symbol,
        remaining=remaining,
        reason="user",
        ts=ts,
    )


def expired(o: NewOrder, remaining: int, ts: int = 20) -> OrderExpired:
    return OrderExpired(
        order_id=o.order_id,
        user=o.user,
        client_order_id=o.client_order_id,
        symbol=o.symbol,
        remaining=remaining,
        reason="ioc",
        ts=ts,
    )


def fill(
    maker: NewOrder,
    taker: NewOrder,
    price: int,
    qty: int,
    maker_remaining: int,
    taker_remaining: int,
    trade_id: int = 1,
    ts: int = 15,
) -> Fill:
    return Fill(
        trade_id=trade_id,
        symbol=maker.symbol,
        price=price,
        qty=qty,
        taker_side=taker.side,
        maker_order_id=maker.order_id,
        maker_user=maker.user,
        maker_client_order_id=maker.client_order_id,
        maker_remaining=maker_remaining,
        taker_order_id=taker.order_id,
        taker_user=taker.user,
        taker_client_order_id=taker.client_order_id,
        taker_remaining=taker_remaining,
        ts=ts,
    )


def funded(user: str = "alice", amount: int = 100_000 * USDT, **kw: Any) -> Ledger:
    ledger = Ledger(user, kw.pop("instruments", INSTRUMENTS), **kw)
    ledger.deposit(amount, ts=0)
    return ledger


def snapshot(ledger: Ledger) -> dict[str, Any]:
    return copy.deepcopy(vars(ledger))


def kinds(events: list[UserEvent]) -> list[str]:
    return [e.kind for e in events]


def trade(
    maker_ledger: Ledger,
    taker_ledger: Ledger,
    maker: NewOrder,
    taker: NewOrder,
    price: int,
    trade_id: int = 1,
) -> None:
    """Place and accept both orders and fill them completely against each other."""
    assert maker.qty == taker.qty
    for ledger, o in ((maker_ledger, maker), (taker_ledger, taker)):
        ledger.place(o, ref_price=price)
        ledger.on_book_event(accepted(o))
    ev = fill(maker, taker, price, maker.qty, 0, 0, trade_id=trade_id)
    maker_ledger.on_book_event(ev)
    taker_ledger.on_book_event(ev)


def required(inst: Instrument, price: int, qty: int, *, fee_ppm: int | None = None) -> int:
    notional = inst.notional(price, qty)
    fee = inst.taker_fee_ppm if fee_ppm is None else fee_ppm
    return -(-notional * inst.margin_ppm // 1_000_000) + max(-(-notional * fee // 1_000_000), 0)


# -- cash ---------------------------------------------------------------------------------


def test_deposit_emits_an_account_update() -> None:
    ledger = Ledger("alice", INSTRUMENTS, next_event_id=7)
    events = ledger.deposit(10_000 * USDT, ts=5)
    assert ledger.cash == 10_000 * USDT
    [ev] = events
    assert (ev.user, ev.event_id, ev.kind, ev.key, ev.ts) == (
        "alice",
        7,
        "account_update",
        "account",
        5,
    )
    assert ev.data["balance"] == "10000.0000"
    assert ev.data["available"] == "10000.0000"
    assert ev.data["risk_ratio"] == "0"
    assert ledger.next_event_id == 8


def test_withdraw_within_available() -> None:
    ledger = funded(amount=100 * USDT)
    [ev] = ledger.withdraw(40 * USDT, ts=1)
    assert ev.kind == "account_update"
    assert ledger.cash == 60 * USDT
    ledger.withdraw(60 * USDT, ts=2)
    assert ledger.cash == 0


def test_over_withdraw_raises_and_changes_nothing() -> None:
    ledger = funded(amount=100 * USDT)
    before = snapshot(ledger)
    with pytest.raises(RemoteProtocolError) as err:
        ledger.withdraw(100 * USDT + 1, ts=1)
    assert err.value.code is ErrorCode.INSUFFICIENT_FUNDS
    assert vars(ledger) == before


@pytest.mark.parametrize("amount", [0, -1, True])
def test_non_positive_amounts_are_bad_requests(amount: int) -> None:
    ledger = funded(amount=100 * USDT)
    before = snapshot(ledger)
    for method in (ledger.deposit, ledger.withdraw):
        with pytest.raises(RemoteProtocolError) as err:
            method(amount, 1)
        assert err.value.code is ErrorCode.BAD_REQUEST
    assert vars(ledger) == before


def test_frozen_funds_cannot_be_withdrawn() -> None:
    ledger = funded(amount=100_000 * USDT)
    o = order(1, "buy", ONE_BTC)
    ledger.place(o, ref_price=BTC_60K)
    free = ledger.cash - ledger.frozen
    assert ledger.available == free
    with pytest.raises(RemoteProtocolError):
        ledger.withdraw(free + 1, ts=1)
    ledger.withdraw(free, ts=1)
    assert ledger.available == 0


# -- pre-trade checks ---------------------------------------------------------------------------


def test_place_freezes_margin_plus_taker_fee() -> None:
    ledger = funded()
    o = order(1, "buy", ONE_BTC)
    assert ledger.place(o, ref_price=BTC_60K) == []
    # 60000 USDT notional: 5% margin = 3000, 0.05% taker fee = 30.
    assert ledger.frozen == 3_030 * USDT
    assert ledger.available == (100_000 - 3_030) * USDT
    rec = ledger.order(1)
    assert rec is not None
    assert rec.status is OrderState.PENDING
    assert (rec.frozen, rec.frozen_remaining) == (3_030 * USDT, 3_030 * USDT)
    assert ledger.order_by_client_id("c1") == rec
    assert ledger.open_order_ids() == [1]
    assert ledger.open_orders()[0]["status"] == "pending"


@pytest.mark.parametrize(("side", "worst"), [("buy", 660_000), ("sell", 540_000)])
def test_market_order_is_valued_at_the_worst_price_of_the_band(side: str, worst: int) -> None:
    ledger = funded()
    ledger.place(order(1, side, ONE_BTC, None), ref_price=BTC_60K)
    assert INSTRUMENTS[BTC].band(BTC_60K) == (540_000, 660_000)
    assert ledger.frozen == required(INSTRUMENTS[BTC], worst, ONE_BTC)


def test_insufficient_funds_counts_the_fee_and_changes_nothing() -> None:
    ledger = funded(amount=3_000 * USDT)  # the margin alone, not the 30 of fee
    before = snapshot(ledger)
    with pytest.raises(RemoteProtocolError) as err:
        ledger.place(order(1, "buy", ONE_BTC), ref_price=BTC_60K)
    assert err.value.code is ErrorCode.INSUFFICIENT_FUNDS
    assert vars(ledger) == before
    assert ledger.order_by_client_id("c1") is None  # the id was not consumed
    ledger.deposit(30 * USDT, ts=1)
    ledger.place(order(1, "buy", ONE_BTC), ref_price=BTC_60K)  # same cid: now fine
    assert ledger.available == 0


def test_a_taker_rebate_does_not_lower_the_requirement() -> None:
    rebate = {BTC: attrs.evolve(INSTRUMENTS[BTC], taker_fee_ppm=-100)}
    ledger = funded(amount=3_000 * USDT, instruments=rebate)
    ledger.place(order(1, "buy", ONE_BTC), ref_price=BTC_60K)
    assert ledger.frozen == 3_000 * USDT


def test_unknown_symbol_changes_nothing() -> None:
    ledger = funded()
    before = snapshot(ledger)
    with pytest.raises(RemoteProtocolError) as err:
        ledger.place(order(1, "buy", 1, symbol="DOGE-PERP"), ref_price=BTC_60K)
    assert err.value.code is ErrorCode.UNKNOWN_SYMBOL
    assert vars(ledger) == before


def test_position_limit_counts_position_and_open_orders_per_side() -> None:
    limit = INSTRUMENTS[BTC].position_limit  # 100 BTC
    alice, bob = funded(amount=10**6 * USDT), funded("bob", amount=10**6 * USDT)
    trade(
        bob,
        alice,
        order(1, "sell", 60 * ONE_BTC, user="bob"),
        order(2, "buy", 60 * ONE_BTC),
        BTC_60K,
    )
    assert alice.position(BTC) == (60 * ONE_BTC, 60 * ONE_BTC * BTC_60K)
    alice.place(order(3, "buy", 30 * ONE_BTC), ref_price=BTC_60K)
    before = snapshot(alice)
    with pytest.raises(RemoteProtocolError) as err:
        alice.place(order(4, "buy", 10 * ONE_BTC + 1), ref_price=BTC_60K)
    assert err.value.code is ErrorCode.POSITION_LIMIT
    assert vars(alice) == before
    alice.place(order(4, "buy", 10 * ONE_BTC), ref_price=BTC_60K)  # exactly the limit
    # The short side is separate: a long position does not count against it.
    alice.place(order(5, "sell", limit), ref_price=BTC_60K)
    with pytest.raises(RemoteProtocolError) as err:
        alice.place(order(6, "sell", 1), ref_price=BTC_60K)
    assert err.value.code is ErrorCode.POSITION_LIMIT


def test_a_snapshot_pickled_without_the_open_qty_counter_loads() -> None:
    """Snapshots written before ``_open_qty`` existed rebuild it from the live orders."""
    limit = INSTRUMENTS[BTC].position_limit
    alice, bob = funded(amount=10**6 * USDT), funded("bob", amount=10**6 * USDT)
    buy, sell = order(1, "buy", 40 * ONE_BTC), order(2, "sell", 15 * ONE_BTC, user="bob")
    for ledger, o in ((alice, buy), (bob, sell)):
        ledger.place(o, ref_price=BTC_60K)
        ledger.on_book_event(accepted(o))
    alice.on_book_event(fill(buy, sell, BTC_60K, 15 * ONE_BTC, 25 * ONE_BTC, 0))
    alice.place(order(3, "buy", 20 * ONE_BTC), ref_price=BTC_60K)
    alice.place(order(4, "sell", 5, 24_000, symbol=ES), ref_price=24_000)
    # A ledger as the code before the counter pickled it: no attribute, no __getstate__.
    old = object.__new__(Ledger)
    vars(old).update((k, v) for k, v in vars(alice).items() if k != "_open_qty")
    with pytest.MonkeyPatch.context() as mp:
        mp.delattr(Ledger, "__getstate__")
        data = pickle.dumps(old)
    assert data == pickle.dumps(alice)  # the counter is not in today's pickle either
    restored = pickle.loads(data)
    assert vars(restored) == vars(alice)
    assert restored._open_qty == {(BTC, "buy"): 45 * ONE_BTC, (ES, "sell"): 5}
    # The restored counter drives the limit: 15 long + 45 open + 40 = the limit; +1 is over.
    restored.place(order(5, "buy", limit - 60 * ONE_BTC), ref_price=BTC_60K)
    with pytest.raises(RemoteProtocolError) as err:
        restored.place(order(6, "buy", 1), ref_price=BTC_60K)
    assert err.value.code is ErrorCode.POSITION_LIMIT


def test_an_order_for_another_user_is_an_internal_error() -> None:
    ledger = funded()
    with pytest.raises(LocalProtocolError) as err:
        ledger.place(order(1, "buy", 1, user="bob"), ref_price=BTC_60K)
    assert err.value.code is ErrorCode.INTERNAL


# -- duplicates ------------------------------------------------------------------------------------


def test_a_reused_client_order_id_returns_the_original_for_ever() -> None:
    ledger = funded()
    first = order(1, "buy", 5, cid="my-order")
    ledger.place(first, ref_price=BTC_60K)
    before = snapshot(ledger)
    with pytest.raises(DuplicateOrder) as dup:
        ledger.place(order(2, "sell", 9, cid="my-order"), ref_price=BTC_60K)
    assert dup.value.original is not None and dup.value.original.order_id == 1
    assert dup.value.result == {"order_id": 1, "client_order_id": "my-order", "status": "pending"}
    assert vars(ledger) == before
    # Still a duplicate once the first order is done.
    ledger.on_book_event(accepted(first))
    ledger.on_book_event(canceled(first, 5))
    with pytest.raises(DuplicateOrder) as dup:
        ledger.place(order(3, "buy", 5, cid="my-order"), ref_price=BTC_60K)
    assert dup.value.original.status is OrderState.CANCELED
    assert ledger.order_by_client_id("my-order") == dup.value.original
    assert ledger.order(3) is None
    assert pickle.loads(pickle.dumps(dup.value)).original == dup.value.original


def test_closed_orders_past_the_kept_ones_are_forgotten_but_stay_duplicates() -> None:
    ledger = funded()
    orders = [order(i, "buy", 5, cid=f"c{i}") for i in range(1, 6)]
    for o in orders:
        ledger.place(o, ref_price=BTC_60K)
        ledger.on_book_event(accepted(o))
    for o in orders[:3]:
        ledger.on_book_event(canceled(o, 5))  # closed, oldest first: 1, 2, 3
    live = ledger.open_order_ids()
    account = ledger.account_view()
    assert ledger.forget_closed(keep=1) == 2  # 1 and 2 go, 3 is kept whole
    assert ledger.order(1) is None and ledger.order_by_client_id("c2") is None
    assert ledger.order(3) is not None and ledger.order(3).status is OrderState.CANCELED
    assert ledger.open_order_ids() == live == [4, 5]
    assert ledger.account_view() == account
    assert ledger.forget_closed(keep=1) == 0
    # The client order id stays taken: the answer is the original's id and final status.
    with pytest.raises(DuplicateOrder) as dup:
        ledger.place(order(9, "buy", 5, cid="c1"), ref_price=BTC_60K)
    assert dup.value.original is None
    assert dup.value.result == {"order_id": 1, "client_order_id": "c1", "status": "canceled"}
    again = pickle.loads(pickle.dumps(ledger))
    assert again.order(1) is None and again.forget_closed(keep=0) == 1  # 3 goes now
    with pytest.raises(DuplicateOrder) as dup:
        again.place(order(9, "buy", 5, cid="c3"), ref_price=BTC_60K)
    assert dup.value.result["status"] == "canceled"


def test_a_ledger_pickled_before_closed_orders_were_forgotten_loads() -> None:
    ledger = funded()
    for i in (1, 2, 3):
        o = order(i, "buy", 5, cid=f"c{i}")
        ledger.place(o, ref_price=BTC_60K)
        ledger.on_book_event(accepted(o))
        if i != 2:
            ledger.on_book_event(canceled(o, 5))
    state = ledger.__getstate__()
    del state["_closed"], state["_forgotten"]  # as an older snapshot holds it
    old = Ledger.__new__(Ledger)
    old.__setstate__(state)
    assert old.forget_closed(keep=0) == 2  # the closed ones, 1 and 3; 2 is open
    assert old.open_order_ids() == [2]
    assert old.order(2) is not None and old.order(1) is None


def test_a_rejected_order_keeps_its_client_order_id() -> None:
    ledger = funded()
    o = order(1, "buy", 5)
    ledger.place(o, ref_price=BTC_60K)
    ledger.on_book_event(rejected(o))
    with pytest.raises(DuplicateOrder):
        ledger.place(order(2, "buy", 5, cid=o.client_order_id), ref_price=BTC_60K)


# -- the order lifecycle and exact release of frozen funds ----------------------------------------


def test_accept_emits_order_accepted_with_the_order_fields() -> None:
    ledger = funded()
    o = order(1, "buy", 1_500, 600_005)
    ledger.place(o, ref_price=BTC_60K)
    ev, update = ledger.on_book_event(accepted(o, ts=33))
    # The funds frozen at placement change ``frozen`` and ``available``: reported.
    assert (update.kind, update.ts) == ("account_update", 33)
    assert update.data == ledger.account_view()
    assert update.data["frozen"] != "0.0000"
    assert ev.kind == "order_accepted"
    assert ev.ts == 33
    assert ev.data == {
        "order_id": 1,
        "client_order_id": "c1",
        "symbol": BTC,
        "side": "buy",
        "type": "limit",
        "price": "60000.5",
        "qty": "1.500",
        "filled_qty": "0.000",
        "remaining_qty": "1.500",
        "status": "open",
        "tif": "gtc",
    }


def test_reject_releases_exactly_what_was_frozen() -> None:
    ledger = funded()
    o = order(1, "buy", 7, 600_001)
    ledger.place(o, ref_price=BTC_60K)
    assert ledger.frozen > 0
    events = ledger.on_book_event(rejected(o))
    assert kinds(events) == ["order_rejected", "account_update"]
    assert events[0].data["code"] == "market_halted"
    assert events[0].data["status"] == "rejected"
    assert ledger.frozen == 0
    assert ledger.open_order_ids() == []


def test_cancel_after_partial_fills_releases_exactly_the_remainder() -> None:
    """The classic bug: releasing ``frozen * remaining / qty`` on cancel leaks rounding."""
    alice, bob = funded(), funded("bob")
    buy = order(1, "buy", 7, 600_001)
    alice.place(buy, ref_price=BTC_60K)
    alice.on_book_event(accepted(buy))
    frozen = alice.frozen
    assert frozen == 212_102  # margin 210_001 + fee 2_101: not divisible by 7
    sells = [order(10 + i, "sell", q, 600_001, user="bob") for i, q in enumerate((3, 2))]
    remaining = 7
    releases = []
    for i, sell in enumerate(sells):
        bob.place(sell, ref_price=BTC_60K)
        bob.on_book_event(accepted(sell))
        remaining -= sell.qty
        before = alice.frozen
        ev = fill(buy, sell, 600_001, sell.qty, remaining, 0, trade_id=i + 1)
        events = alice.on_book_event(ev)
        bob.on_book_event(ev)
        assert kinds(events) == [
            "trade_executed",
            "order_partially_filled",
            "position_update",
            "account_update",
        ]
        releases.append(before - alice.frozen)
    assert releases == [frozen * 3 // 7, (frozen - frozen * 3 // 7) * 2 // 4]
    events = alice.on_book_event(canceled(buy, remaining=2))
    assert kinds(events) == ["order_canceled", "account_update"]
    assert events[0].data["remaining_qty"] == "0.002"
    releases.append(frozen - sum(releases))
    assert sum(releases) == frozen
    assert alice.frozen == 0
    rec = alice.order(1)
    assert rec is not None
    assert (rec.status, rec.filled_qty, rec.frozen_remaining) == (OrderState.CANCELED, 5, 0)
    assert frozen * 2 // 7 != releases[-1]  # what the naive formula would have released


def test_expiry_of_a_partially_filled_market_order_releases_the_rest() -> None:
    alice, bob = funded(), funded("bob")
    sell = order(1, "sell", 400, BTC_60K, user="bob")
    bob.place(sell, ref_price=BTC_60K)
    bob.on_book_event(accepted(sell))
    buy = order(2, "buy", ONE_BTC, None, tif="ioc")
    alice.place(buy, ref_price=BTC_60K)
    alice.on_book_event(accepted(buy))
    ev = fill(sell, buy, BTC_60K, 400, 0, 600)
    assert kinds(bob.on_book_event(ev))[1] == "order_filled"
    alice.on_book_event(ev)
    assert bob.frozen == 0
    assert alice.frozen > 0
    events = alice.on_book_event(expired(buy, 600))
    assert kinds(events) == ["order_expired", "account_update"]
    assert events[0].data["price"] is None
    assert events[0].data["reason"] == "ioc"
    assert alice.frozen == 0
    assert alice.position(BTC) == (400, 400 * BTC_60K)


def test_a_pending_order_may_expire_without_being_accepted() -> None:
    ledger = funded()
    o = order(1, "buy", 5)
    ledger.place(o, ref_price=BTC_60K)
    ledger.on_book_event(expired(o, 5))
    assert ledger.frozen == 0
    rec = ledger.order(1)
    assert rec is not None
    assert rec.status is OrderState.EXPIRED


def test_the_transition_table() -> None:
    assert next_order_state(1, OrderState.PENDING, OrderInput.ACCEPT) is OrderState.OPEN
    terminal = set(OrderState) - LIVE_STATES
    for (state, _), _target in ORDER_TRANSITIONS.items():
        assert state not in terminal
    for state in terminal:
        for event in OrderInput:
            with pytest.raises(IllegalTransition):
                next_order_state(1, state, event)
    with pytest.raises(IllegalTransition) as err:
        next_order_state(9, OrderState.PENDING, OrderInput.PARTIAL_FILL)
    assert err.value.code is ErrorCode.INTERNAL
    again = pickle.loads(pickle.dumps(err.value))
    assert (again.order_id, again.state, again.event) == (
        9,
        OrderState.PENDING,
        OrderInput.PARTIAL_FILL,
    )


def test_illegal_transitions_raise_and_change_nothing() -> None:
    alice, bob = funded(), funded("bob")
    buy = order(1, "buy", 5)
    sell = order(2, "sell", 5, user="bob")
    alice.place(buy, ref_price=BTC_60K)
    bob.place(sell, ref_price=BTC_60K)
    bob.on_book_event(accepted(sell))
    before = snapshot(alice)
    with pytest.raises(IllegalTransition):  # a fill before the book accepted the order
        alice.on_book_event(fill(sell, buy, BTC_60K, 5, 0, 0))
    assert vars(alice) == before
    alice.on_book_event(accepted(buy))
    with pytest.raises(IllegalTransition):
        alice.on_book_event(accepted(buy))
    alice.on_book_event(canceled(buy, 5))
    before = snapshot(alice)
    for ev in (canceled(buy, 5), expired(buy, 0), rejected(buy), accepted(buy)):
        with pytest.raises(IllegalTransition):
            alice.on_book_event(ev)
    with pytest.raises(IllegalTransition):
        alice.on_book_event(fill(sell, buy, BTC_60K, 5, 0, 0))
    assert vars(alice) == before


@pytest.mark.parametrize("coalesce", [False, True])
def test_inconsistent_book_events_raise_and_change_nothing(coalesce: bool) -> None:
    alice, bob = funded(coalesce_updates=coalesce), funded("bob", coalesce_updates=coalesce)
    buy = order(1, "buy", 5)
    sell = order(2, "sell", 5, user="bob")
    for ledger, o in ((alice, buy), (bob, sell)):
        ledger.place(o, ref_price=BTC_60K)
        ledger.on_book_event(accepted(o))
    before = snapshot(alice)
    bad: list[LedgerBookEvent] = [
        fill(sell, buy, BTC_60K, 5, 0, 1),  # remaining disagrees
        fill(sell, buy, BTC_60K, 6, 0, 0),  # more than the order's quantity
        fill(sell, attrs.evolve(buy, order_id=99), BTC_60K, 5, 0, 0),  # unknown order
        fill(sell, attrs.evolve(buy, user="carol"), BTC_60K, 5, 0, 0),  # not alice's
        canceled(buy, remaining=4),
        canceled(attrs.evolve(buy, user="bob"), remaining=5),
    ]
    for ev in bad:
        with pytest.raises(LocalProtocolError) as err:
            alice.on_book_event(ev)
        assert err.value.code is ErrorCode.INTERNAL
        assert vars(alice) == before


@pytest.mark.parametrize("coalesce", [False, True])
def test_a_bad_second_side_of_a_self_trade_changes_nothing(coalesce: bool) -> None:
    """All checks come before any change, also where a coalescing ledger writes its
    position and mark in place: a self-trade whose taker side is wrong leaves the
    maker side, the position and the mark as they were."""
    alice, bob = funded(coalesce_updates=coalesce), funded("bob", coalesce_updates=coalesce)
    trade(bob, alice, order(1, "sell", 3, user="bob"), order(2, "buy", 3), BTC_60K)
    alice.flush_updates()
    sell, buy = order(3, "sell", 5), order(4, "buy", 5)
    for o in (sell, buy):
        alice.place(o, ref_price=BTC_60K)
        alice.on_book_event(accepted(o))
    before, unrealized = snapshot(alice), alice.account_view()["position_pnl"]
    for bad in (fill(sell, buy, BTC_60K + 7, 2, 3, 4), fill(sell, buy, BTC_60K + 7, 2, 3, -1)):
        with pytest.raises(LocalProtocolError):
            alice.on_book_event(bad)
        assert vars(alice) == before
    assert alice.on_book_event(fill(sell, buy, BTC_60K + 7, 2, 3, 3))
    assert alice.position(BTC) == (3, 3 * BTC_60K + 14)  # closed 2, opened 2 at the new price
    assert alice.account_view()["position_pnl"] != unrealized  # the mark moved


@pytest.mark.parametrize("ts", [-1, True, 1.0, None])
def test_a_book_event_with_a_bad_timestamp_is_internal_and_changes_nothing(ts: Any) -> None:
    alice, bob = funded(), funded("bob")
    buy, sell = order(1, "buy", 5), order(2, "sell", 5, user="bob")
    for ledger, o in ((alice, buy), (bob, sell)):
        ledger.place(o, ref_price=BTC_60K)
    before = snapshot(alice)
    for ev in (accepted(buy)._replace(ts=ts), fill(sell, buy, BTC_60K, 5, 0, 0)._replace(ts=ts)):
        with pytest.raises(LocalProtocolError, match="bad timestamp") as err:
            alice.on_book_event(ev)
        assert err.value.code is ErrorCode.INTERNAL
        assert vars(alice) == before


def test_cancel_rejected_changes_nothing() -> None:
    ledger = funded()
    before = snapshot(ledger)
    ev = CancelRejected(order_id=5, user="alice", symbol=BTC, code="unknown_order", reason="", ts=3)
    assert ledger.on_book_event(ev) == []
    assert vars(ledger) == before


# -- PnL and fees ----------------------------------------------------------------------------------


def test_long_round_trip_realizes_pnl_and_charges_fees() -> None:
    alice, bob = funded(amount=10_000 * USDT), funded("bob", amount=10_000 * USDT)
    trade(bob, alice, order(1, "sell", ONE_BTC, user="bob"), order(2, "buy", ONE_BTC), BTC_60K)
    # Alice took liquidity: 0.05% of 60000; Bob made it: 0.02%.
    assert (alice.fees_paid, bob.fees_paid) == (30 * USDT, 12 * USDT)
    assert alice.position(BTC) == (ONE_BTC, ONE_BTC * BTC_60K)
    assert bob.position(BTC) == (-ONE_BTC, ONE_BTC * BTC_60K)
    assert alice.unrealized(BTC, 610_000) == 1_000 * USDT
    assert bob.unrealized(BTC, 610_000) == -1_000 * USDT
    assert alice.position_margin == 3_000 * USDT
    alice.mark(BTC, 610_000)
    view = alice.account_view()
    assert view["position_pnl"] == "1000.0000"
    assert view["margin"] == "3000.0000"
    assert view["balance"] == "9970.0000"
    assert view["available"] == "6970.0000"  # unrealized gains are not spendable
    assert view["risk_ratio"] == "0.27347311"  # 3000 / 10970
    [pos] = alice.positions_view()
    assert pos == {
        "symbol": BTC,
        "long_qty": "1.000",
        "short_qty": "0.000",
        "long_avg_price": "60000.00000",
        "short_avg_price": "0",
        "unrealized_pnl": "1000.0000",
        "realized_pnl": "0.0000",
        "margin": "3000.0000",
    }
    bob.mark(BTC, 610_000)
    assert bob.available == (10_000 - 12 - 3_000 - 1_000) * USDT  # losses count
    # Alice now sells as maker at 61000 to Bob, who closes his short.
    trade(alice, bob, order(3, "sell", ONE_BTC), order(4, "buy", ONE_BTC, user="bob"), 610_000, 2)
    assert alice.position(BTC) == (0, 0)
    assert alice.realized_pnl == 1_000 * USDT
    assert bob.realized_pnl == -1_000 * USDT
    assert alice.fees_paid == 300_000 + 122_000  # 30 + 12.2
    assert alice.cash == (10_000 - 30 + 1_000) * USDT - 122_000
    assert bob.cash == (10_000 - 12 - 1_000) * USDT - 305_000
    assert alice.account_view()["risk_ratio"] == "0"
    assert alice.frozen == bob.frozen == 0


def test_short_position_gains_when_the_price_falls() -> None:
    alice, bob = funded(), funded("bob")
    trade(
        bob, alice, order(1, "buy", 2 * ONE_BTC, user="bob"), order(2, "sell", 2 * ONE_BTC), BTC_60K
    )
    assert alice.position(BTC) == (-2 * ONE_BTC, 2 * ONE_BTC * BTC_60K)
    assert alice.unrealized(BTC, 590_000) == 2_000 * USDT
    [pos] = alice.positions_view()
    assert (pos["long_qty"], pos["short_qty"], pos["short_avg_price"]) == (
        "0.000",
        "2.000",
        "60000.00000",
    )
    # Buy back half at 59000: realize half of the gain.
    trade(
        bob,
        alice,
        order(3, "sell", ONE_BTC, 590_000, user="bob"),
        order(4, "buy", ONE_BTC, 590_000),
        590_000,
        2,
    )
    assert alice.realized_pnl == 1_000 * USDT
    assert alice.position(BTC) == (-ONE_BTC, ONE_BTC * BTC_60K)


def test_flip_from_long_to_short_through_zero() -> None:
    alice, bob = funded(), funded("bob")
    trade(
        bob, alice, order(1, "sell", 2 * ONE_BTC, user="bob"), order(2, "buy", 2 * ONE_BTC), BTC_60K
    )
    trade(
        bob,
        alice,
        order(3, "buy", 5 * ONE_BTC, 590_000, user="bob"),
        order(4, "sell", 5 * ONE_BTC, 590_000),
        590_000,
        2,
    )
    # 2 closed at a 1000 loss each; 3 opened short at 59000.
    assert alice.realized_pnl == -2_000 * USDT
    assert alice.position(BTC) == (-3 * ONE_BTC, 3 * ONE_BTC * 590_000)
    assert bob.position(BTC) == (3 * ONE_BTC, 3 * ONE_BTC * 590_000)
    assert alice.unrealized(BTC, 580_000) == 3_000 * USDT
    [pos] = alice.positions_view()
    assert pos["long_qty"] == "0.000"
    assert pos["short_qty"] == "3.000"
    assert pos["short_avg_price"] == "59000.00000"
    assert pos["realized_pnl"] == "-2000.0000"
    # and back through zero to long with a partial close in between
    trade(
        bob,
        alice,
        order(5, "sell", 4 * ONE_BTC, 580_000, user="bob"),
        order(6, "buy", 4 * ONE_BTC, 580_000),
        580_000,
        3,
    )
    assert alice.realized_pnl == (-2_000 + 3_000) * USDT
    assert alice.position(BTC) == (ONE_BTC, ONE_BTC * 580_000)


def test_a_partial_close_removes_cost_pro_rata_and_the_last_close_removes_the_rest() -> None:
    alice, bob = funded(), funded("bob")
    # Two entries at different prices: cost 3 * 600_001 + 4 * 600_002, not divisible by 7.
    trade(
        bob,
        alice,
        order(1, "sell", 3, 600_001, user="bob"),
        order(2, "buy", 3, 600_001),
        600_001,
        1,
    )
    trade(
        bob,
        alice,
        order(3, "sell", 4, 600_002, user="bob"),
        order(4, "buy", 4, 600_002),
        600_002,
        2,
    )
    cost = 3 * 600_001 + 4 * 600_002
    assert alice.position(BTC) == (7, cost)
    trade(
        bob,
        alice,
        order(5, "buy", 2, BTC_60K, user="bob"),
        order(6, "sell", 2, BTC_60K),
        BTC_60K,
        3,
    )
    removed = cost * 2 // 7
    assert alice.position(BTC) == (5, cost - removed)
    assert alice.realized_pnl == 2 * BTC_60K - removed
    trade(
        bob,
        alice,
        order(7, "buy", 5, BTC_60K, user="bob"),
        order(8, "sell", 5, BTC_60K),
        BTC_60K,
        4,
    )
    assert alice.position(BTC) == (0, 0)
    assert alice.realized_pnl == 7 * BTC_60K - cost  # exact over the round trip
    assert alice.realized_pnl == -bob.realized_pnl


def test_es_future_uses_the_multiplier() -> None:
    alice, bob = funded(amount=10**6 * USDT), funded("bob", amount=10**6 * USDT)
    es_6000 = 24_000  # 6000.00 in 0.25 ticks
    trade(
        bob,
        alice,
        order(1, "sell", 2, es_6000, user="bob", symbol=ES),
        order(2, "buy", 2, es_6000, symbol=ES),
        es_6000,
    )
    # 2 contracts * 50 * 6000 = 600000 notional; one point = 100 USDT.
    assert alice.unrealized(ES, es_6000 + 4) == 100 * USDT
    assert alice.fees_paid == 180 * USDT  # 0.03%
    assert bob.fees_paid == 60 * USDT  # 0.01%
    assert alice.position_margin == 48_000 * USDT  # 8%


def test_fees_round_up_and_a_maker_rebate_rounds_toward_zero() -> None:
    rebate = {BTC: attrs.evolve(INSTRUMENTS[BTC], maker_fee_ppm=-100)}
    alice = funded(instruments=rebate)
    bob = funded("bob", instruments=rebate)
    # notional 1_800_003: taker 0.05% = 900.0015 -> 901; maker -0.01% = -180.0003 -> -180.
    maker, taker = order(1, "sell", 3, 600_001, user="bob"), order(2, "buy", 3, 600_001)
    bob.place(maker, ref_price=BTC_60K)
    bob.on_book_event(accepted(maker))
    alice.place(taker, ref_price=BTC_60K)
    alice.on_book_event(accepted(taker))
    ev = fill(maker, taker, 600_001, 3, 0, 0)
    bob_events = bob.on_book_event(ev)
    alice_events = alice.on_book_event(ev)
    assert (alice.fees_paid, bob.fees_paid) == (901, -180)
    assert alice.cash == 100_000 * USDT - 901
    assert bob.cash == 100_000 * USDT + 180
    assert bob_events[0].data["fee"] == "-0.0180"
    assert bob_events[0].data["liquidity"] == "maker"
    assert alice_events[0].data["fee"] == "0.0901"
    assert alice_events[0].data["liquidity"] == "taker"
    assert alice_events[0].data["trade_id"] == 1
    assert alice.fees_paid + bob.fees_paid == 721  # the exchange's fee pool


def test_a_self_trade_applies_both_sides_to_one_account() -> None:
    ledger = funded()
    maker, taker = order(1, "sell", 5), order(2, "buy", 5)
    for o in (maker, taker):
        ledger.place(o, ref_price=BTC_60K)
        ledger.on_book_event(accepted(o))
    events = ledger.on_book_event(fill(maker, taker, BTC_60K, 5, 0, 0))
    assert kinds(events) == [
        "trade_executed",
        "order_filled",
        "trade_executed",
        "order_filled",
        "position_update",
        "account_update",
    ]
    assert ledger.position(BTC) == (0, 0)
    assert ledger.frozen == 0
    assert ledger.fees_paid == 600 + 1_500  # maker 2 bp + taker 5 bp of 3_000_000
    assert ledger.cash == 100_000 * USDT - 2_100


# -- events, views, determinism -------------------------------------------------------------------


def test_event_ids_are_contiguous_and_replay_identically() -> None:
    def run() -> tuple[list[UserEvent], Ledger]:
        alice, bob = funded(), funded("bob")
        out: list[UserEvent] = []
        buy, sell = order(1, "buy", 9, 600_003), order(2, "sell", 4, 600_003, user="bob")
        alice.place(buy, ref_price=BTC_60K)
        out += alice.on_book_event(accepted(buy))
        bob.place(sell, ref_price=BTC_60K)
        bob.on_book_event(accepted(sell))
        out += alice.on_book_event(fill(buy, sell, 600_003, 4, 5, 0))
        out += alice.on_book_event(canceled(buy, 5))
        out += alice.withdraw(USDT, ts=30)
        return out, alice

    first, alice = run()
    assert [e.event_id for e in first] == list(range(2, 2 + len(first)))
    second, _ = run()
    assert first == second
    assert [e.data for e in first] == [e.data for e in second]
    restored = pickle.loads(pickle.dumps(alice))
    assert vars(restored) == vars(alice)
    assert restored.deposit(USDT, 40) == alice.deposit(USDT, 40)


def test_open_orders_and_ids_by_symbol() -> None:
    ledger = funded(amount=10**6 * USDT)
    ledger.place(order(1, "buy", 5), ref_price=BTC_60K)
    ledger.place(order(2, "sell", 1, 24_000, symbol=ES), ref_price=24_000)
    ledger.place(order(3, "sell", 5), ref_price=BTC_60K)
    assert ledger.open_order_ids() == [1, 2, 3]
    assert ledger.open_order_ids(BTC) == [1, 3]
    assert ledger.open_order_ids(ES) == [2]
    assert [o["order_id"] for o in ledger.open_orders()] == [1, 2, 3]
    assert ledger.open_orders()[1]["price"] == "6000.00"


def test_mark_validates_and_account_update_reports_the_marks() -> None:
    alice, bob = funded(amount=10_000 * USDT), funded("bob", amount=10_000 * USDT)
    trade(bob, alice, order(1, "sell", ONE_BTC, user="bob"), order(2, "buy", ONE_BTC), BTC_60K)
    with pytest.raises(RemoteProtocolError):
        alice.mark("NOPE", 1)
    with pytest.raises(RemoteProtocolError):
        alice.mark(BTC, 0)
    alice.mark(BTC, 540_000)  # a 6000 loss
    [ev] = alice.account_update(ts=50)
    assert ev.data["position_pnl"] == "-6000.0000"
    assert ev.data["available"] == str(10_000 - 30 - 3_000 - 6_000) + ".0000"
    assert ev.data["risk_ratio"] == "0.75566751"  # 3000 / 3970
    assert alice.equity() == (10_000 - 30 - 6_000) * USDT
    assert alice.equity({BTC: BTC_60K}) == (10_000 - 30) * USDT
    alice.mark(BTC, 400_000)  # equity below zero: the ratio stays positive and large
    assert Decimal(str(alice.account_view()["risk_ratio"])) > 1


# -- properties: a simulated book between several accounts -----------------------------------------

USERS = ("ann", "ben", "cy")
SYMBOLS = (BTC, ES)
QTY = {BTC: 3_000, ES: 12}


class Sim:
    """Drives several ledgers the way the book would, and checks the ledger-wide invariants."""

    def __init__(self) -> None:
        self.ledgers = {u: Ledger(u, INSTRUMENTS) for u in USERS}
        self.orders: dict[int, NewOrder] = {}
        self.resting: dict[int, int] = {}  # order id -> remaining, in the simulated book
        self.deposited = 0
        self.withdrawn = 0
        self.next_order_id = 1
        self.next_trade_id = 1
        self.ts = 0
        self.log: list[tuple[str, str, tuple[Any, ...]]] = []
        self.events: dict[str, list[UserEvent]] = {u: [] for u in USERS}

    def tick(self) -> int:
        self.ts += 1
        return self.ts

    def call(self, user: str, method: str, *args: Any) -> list[UserEvent]:
        """Call a ledger method; on a pre-trade/cash error, check nothing changed and re-raise."""
        ledger = self.ledgers[user]
        before = snapshot(ledger)
        try:
            out: list[UserEvent] = getattr(ledger, method)(*args) or []
        except RemoteProtocolError:
            assert vars(ledger) == before
            raise
        self.log.append((user, method, args))
        self.events[user].extend(out)
        return out

    def deposit(self, user: str, amount: int) -> None:
        self.call(user, "deposit", amount, self.tick())
        self.deposited += amount

    def withdraw(self, user: str, amount: int) -> None:
        try:
            self.call(user, "withdraw", amount, self.tick())
        except RemoteProtocolError as err:
            assert err.code is ErrorCode.INSUFFICIENT_FUNDS
            assert amount > self.ledgers[user].available
        else:
            self.withdrawn += amount

    def place(
        self, user: str, symbol: str, side: str, qty: int, price: int | None, ref: int
    ) -> NewOrder | None:
        oid = self.next_order_id
        self.next_order_id += 1
        o = NewOrder(
            order_id=oid,
            user=user,
            client_order_id=f"{user}-{oid}",
            symbol=symbol,
            side=side,
            order_type="limit" if price else "market",
            price=price,
            qty=qty,
            tif="gtc" if price else "ioc",
            ts=self.tick(),
        )
        try:
            self.call(user, "place", o, ref)
        except RemoteProtocolError as err:
            assert err.code in (ErrorCode.INSUFFICIENT_FUNDS, ErrorCode.POSITION_LIMIT)
            return None
        self.orders[oid] = o
        return o

    def book(self, ev: LedgerBookEvent, *users: str) -> None:
        for user in dict.fromkeys(users):
            self.call(user, "on_book_event", ev)

    def accept(self, o: NewOrder) -> None:
        self.book(accepted(o, self.tick()), o.user)
        self.resting[o.order_id] = o.qty

    def reject(self, o: NewOrder) -> None:
        self.book(rejected(o, self.tick()), o.user)

    def cancel(self, oid: int, *, expire: bool = False) -> None:
        o = self.orders[oid]
        make = expired if expire else canceled
        self.book(make(o, self.resting.pop(oid), self.tick()), o.user)

    def fill(self, maker_id: int, taker_id: int, qty: int, price: int) -> None:
        maker, taker = self.orders[maker_id], self.orders[taker_id]
        self.resting[maker_id] -= qty
        self.resting[taker_id] -= qty
        ev = fill(
            maker,
            taker,
            price,
            qty,
            self.resting[maker_id],
            self.resting[taker_id],
            self.next_trade_id,
            self.tick(),
        )
        self.next_trade_id += 1
        for oid in (maker_id, taker_id):
            if self.resting[oid] == 0:
                del self.resting[oid]
        self.book(ev, maker.user, taker.user)

    def check(self, marks: dict[str, int]) -> None:
        for ledger in self.ledgers.values():
            assert ledger.frozen >= 0
            live = [ledger.order(oid) for oid in ledger.open_order_ids()]
            assert ledger.frozen == sum(r.frozen_remaining for r in live if r is not None)
            for oid in ledger.open_order_ids():
                assert self.resting.get(oid) == ledger.order(oid).remaining_qty  # type: ignore[union-attr]
        for symbol in SYMBOLS:
            assert sum(led.position(symbol)[0] for led in self.ledgers.values()) == 0
        for m in (marks, {s: 1 for s in SYMBOLS}, {s: INSTRUMENTS[s].ref_price for s in SYMBOLS}):
            total = sum(
                led.cash + sum(led.unrealized(s, m[s]) for s in SYMBOLS) + led.fees_paid
                for led in self.ledgers.values()
            )
            assert total == self.deposited - self.withdrawn

    def replay(self) -> None:
        """Re-run the logged commands on fresh ledgers: identical events and state."""
        fresh = {u: Ledger(u, INSTRUMENTS) for u in USERS}
        events: dict[str, list[UserEvent]] = {u: [] for u in USERS}
        for user, method, args in self.log:
            events[user].extend(getattr(fresh[user], method)(*args) or [])
        assert events == self.events
        for user in USERS:
            assert vars(fresh[user]) == vars(self.ledgers[user])
            assert vars(pickle.loads(pickle.dumps(fresh[user]))) == vars(fresh[user])
            ids = [e.event_id for e in self.events[user]]
            assert ids == list(range(1, len(ids) + 1))


def prices(symbol: str) -> st.SearchStrategy[int]:
    low, high = INSTRUMENTS[symbol].band(INSTRUMENTS[symbol].ref_price)
    return st.integers(low, high)


def run_steps(sim: Sim, data: st.DataObject, steps: int) -> None:
    draw = data.draw
    for _ in range(steps):
        op = draw(st.sampled_from(["place", "trade", "trade", "trade", "cancel", "cash", "mark"]))
        user = draw(st.sampled_from(USERS))
        symbol = draw(st.sampled_from(SYMBOLS))
        side = draw(st.sampled_from(("buy", "sell")))
        if op == "place":
            o = sim.place(
                user,
                symbol,
                side,
                draw(st.integers(1, QTY[symbol])),
                draw(prices(symbol)),
                INSTRUMENTS[symbol].ref_price,
            )
            if o is not None:
                (sim.reject if draw(st.integers(0, 9)) == 0 else sim.accept)(o)
        elif op == "trade" and sim.resting:
            maker = sim.orders[draw(st.sampled_from(sorted(sim.resting)))]
            # Any user may take, the maker's owner included (a failed self-trade prevention).
            opposite = "sell" if maker.side == "buy" else "buy"
            assert maker.price is not None
            market = draw(st.booleans())
            qty = draw(st.integers(1, QTY[maker.symbol]))
            taker = sim.place(
                user, maker.symbol, opposite, qty, None if market else maker.price, maker.price
            )
            if taker is None:
                continue
            sim.accept(taker)
            sim.fill(
                maker.order_id, taker.order_id, min(qty, sim.resting[maker.order_id]), maker.price
            )
            if taker.order_id in sim.resting and (market or draw(st.booleans())):
                sim.cancel(taker.order_id, expire=True)
        elif op == "cancel" and sim.resting:
            sim.cancel(draw(st.sampled_from(sorted(sim.resting))), expire=draw(st.booleans()))
        elif op == "cash":
            if draw(st.booleans()):
                sim.deposit(user, draw(st.integers(1, 10**9)))
            else:
                sim.withdraw(user, draw(st.integers(1, 10**10)))
        elif op == "mark":
            price = draw(prices(symbol))
            for name in USERS:
                sim.call(name, "mark", symbol, price)
        sim.check({s: draw(st.integers(1, 10**7)) for s in SYMBOLS})


def flatten(sim: Sim, data: st.DataObject) -> None:
    """Close every position by trading longs against shorts; fund generously first."""
    for user in USERS:
        sim.deposit(user, 10**14)
    for symbol in SYMBOLS:
        while True:
            nets = {u: sim.ledgers[u].position(symbol)[0] for u in USERS}
            longs = [u for u in USERS if nets[u] > 0]
            shorts = [u for u in USERS if nets[u] < 0]
            if not longs:
                assert not shorts
                break
            qty = min(nets[longs[0]], -nets[shorts[0]])
            price = data.draw(prices(symbol))
            sell = sim.place(longs[0], symbol, "sell", qty, price, price)
            buy = sim.place(shorts[0], symbol, "buy", qty, price, price)
            assert sell is not None
            assert buy is not None
            sim.accept(sell)
            sim.accept(buy)
            sim.fill(sell.order_id, buy.order_id, qty, price)


@settings(max_examples=150)
@given(data=st.data())
def test_conservation_over_random_trading(data: st.DataObject) -> None:
    sim = Sim()
    for user in USERS:
        sim.deposit(user, data.draw(st.integers(10**7, 10**10), label="deposit"))
    run_steps(sim, data, data.draw(st.integers(1, 40), label="steps"))
    # Every order done: nothing stays frozen.
    for oid in sorted(sim.resting):
        sim.cancel(oid)
    for ledger in sim.ledgers.values():
        assert ledger.frozen == 0
        assert ledger.open_order_ids() == []
    sim.check({s: 1 for s in SYMBOLS})
    # Every position flat: cash plus fees is exactly what came in.
    flatten(sim, data)
    for ledger in sim.ledgers.values():
        assert all(ledger.position(s) == (0, 0) for s in SYMBOLS)
        assert ledger.frozen == 0
    total_cash = sum(led.cash for led in sim.ledgers.values())
    total_fees = sum(led.fees_paid for led in sim.ledgers.values())
    assert total_cash + total_fees == sim.deposited - sim.withdrawn
    assert sum(led.realized_pnl for led in sim.ledgers.values()) == 0
    sim.replay()


class CountingSim(Sim):
    """:class:`Sim` that also checks the ledgers' open-quantity counters after each step."""

    def check(self, marks: dict[str, int]) -> None:
        super().check(marks)
        for ledger in self.ledgers.values():
            scan: dict[tuple[str, str], int] = {}
            for oid in ledger.open_order_ids():
                rec = ledger.order(oid)
                assert rec is not None
                key = (rec.symbol, rec.side)
                scan[key] = scan.get(key, 0) + rec.remaining_qty
            assert ledger._open_qty == scan


@settings(max_examples=100)
@given(data=st.data())
def test_open_qty_counter_equals_the_scan_of_live_orders(data: st.DataObject) -> None:
    sim = CountingSim()
    for user in USERS:
        sim.deposit(user, data.draw(st.integers(10**7, 10**12), label="deposit"))
    run_steps(sim, data, data.draw(st.integers(1, 60), label="steps"))
    for oid in sorted(sim.resting):
        sim.cancel(oid)
    sim.check({s: 1 for s in SYMBOLS})
    for ledger in sim.ledgers.values():
        assert ledger._open_qty == {}
        assert pickle.loads(pickle.dumps(ledger))._open_qty == {}
    # The ledger builds its events without running UserEvent's validators: they hold.
    for events in sim.events.values():
        for event in events:
            attrs.validate(event)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_coalesced_updates_are_the_last_per_event_updates(data: st.DataObject) -> None:
    # The same calls on per-event ledgers and on coalescing ones flushed after every
    # call: the same P0/P1 events, and per call one update per key, holding exactly
    # what the per-event ledger's last update of that key held.
    sim = Sim()
    for user in USERS:
        sim.deposit(user, data.draw(st.integers(10**7, 10**12), label="deposit"))
    run_steps(sim, data, data.draw(st.integers(1, 40), label="steps"))
    plain = {u: Ledger(u, INSTRUMENTS) for u in USERS}
    coalesced = {u: Ledger(u, INSTRUMENTS, coalesce_updates=True) for u in USERS}
    updates = 0
    for user, method, args in sim.log:
        want = getattr(plain[user], method)(*args) or []
        got = getattr(coalesced[user], method)(*args) or []
        flushed = coalesced[user].flush_updates()
        assert [(e.kind, e.data) for e in got] == [
            (e.kind, e.data) for e in want if e.priority <= 1]
        last = {(e.kind, e.key): e.data for e in want if e.priority == 2}
        assert {(e.kind, e.key): e.data for e in flushed} == last
        assert len(flushed) == len(last)
        assert [e.kind for e in flushed][-1:] == (["account_update"] if last else [])
        ts = args[-1] if isinstance(args[-1], int) else args[-1].ts
        assert all(e.ts == ts for e in flushed)
        ids = [e.event_id for e in got + flushed]
        if ids:
            assert ids == list(range(ids[0], ids[0] + len(ids)))
        assert coalesced[user].flush_updates() == []
        updates += len(flushed)
    for user in USERS:
        assert coalesced[user].account_view() == plain[user].account_view()
        assert coalesced[user].positions_view() == plain[user].positions_view()
    assert updates > 0


def test_coalesced_updates_wait_for_the_flush_and_survive_a_pickle() -> None:
    ann = funded("ann", coalesce_updates=True)
    ben = funded("ben", coalesce_updates=True)
    assert ann.flush_updates()[0].kind == "account_update"  # the deposit's
    assert ann.flush_updates() == []
    maker, taker = order(1, "sell", ONE_BTC, user="ben"), order(2, "buy", ONE_BTC, user="ann")
    for ledger, o in ((ben, maker), (ann, taker)):
        assert kinds(ledger.place(o, ref_price=BTC_60K)) == []
        assert kinds(ledger.on_book_event(accepted(o))) == ["order_accepted"]
    half = fill(maker, taker, BTC_60K, ONE_BTC // 2, ONE_BTC // 2, ONE_BTC // 2, ts=30)
    rest = fill(maker, taker, BTC_60K, ONE_BTC // 2, 0, 0, trade_id=2, ts=31)
    assert kinds(ann.on_book_event(half)) == ["trade_executed", "order_partially_filled"]
    restored = pickle.loads(pickle.dumps(ann))  # a snapshot mid-turn keeps what is dirty
    for ledger in (ann, restored):
        assert kinds(ledger.on_book_event(rest)) == ["trade_executed", "order_filled"]
        updates = ledger.flush_updates()
        assert kinds(updates) == ["position_update", "account_update"]
        assert updates[0].data == ledger.positions_view()[0]
        assert updates[1].data == ledger.account_view()
        assert {e.ts for e in updates} == {31}
    # A snapshot from before coalescing existed loads with it off.
    state = ann.__getstate__()
    for name in ("coalesce_updates", "_dirty_positions", "_dirty_account", "_dirty_ts"):
        del state[name]
    old = Ledger.__new__(Ledger)
    old.__setstate__(state)
    assert not old.coalesce_updates
    assert old.flush_updates() == []
    assert kinds(old.deposit(1, ts=40)) == ["account_update"]


def test_after_fill_and_with_status_are_replace_with_their_changes() -> None:
    # Every field differs from its default, so a field _after_fill forgot would show.
    values = {a.name: a.default for a in attrs.fields(OrderRecord)}
    values.update(order_id=3, client_order_id="x", symbol=ES, side="sell", order_type="limit",
                  price=24_000, qty=9, tif="ioc", post_only=True, ts=4,
                  status=OrderState.PARTIALLY_FILLED, filled_qty=2, frozen=50,
                  frozen_remaining=40, fees=6, code="c", reason="r")
    assert all(values[a.name] != a.default for a in attrs.fields(OrderRecord))
    rec = OrderRecord(**values)
    assert _after_fill(rec, OrderState.FILLED, 7, 40, -2) == _replace(
        rec, status=OrderState.FILLED, filled_qty=9, frozen_remaining=0, fees=4
    )
    assert _with_status(rec, OrderState.OPEN) == _replace(rec, status=OrderState.OPEN)


def test_user_event_built_without_validators_is_a_user_event() -> None:
    assert [a.name for a in attrs.fields(UserEvent)] == [
        "user", "event_id", "kind", "key", "data", "ts"
    ]
    fast = _user_event("ann", 7, "position_update", BTC, {"symbol": BTC}, 12)
    slow = UserEvent(user="ann", event_id=7, kind="position_update", key=BTC,
                     data={"symbol": BTC}, ts=12)
    assert fast == slow
    assert (fast.priority, repr(fast)) == (slow.priority, repr(slow))
    assert pickle.dumps(fast) == pickle.dumps(slow)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        fast.kind = "order_filled"  # type: ignore[misc]


@settings(max_examples=200)
@given(
    qty=st.integers(1, 10**4),
    cuts=st.lists(st.integers(1, 10**4), max_size=20),
)
def test_fill_releases_sum_exactly_to_the_frozen_amount(qty: int, cuts: list[int]) -> None:
    """The release rule alone: any partition of the fills, then a cancel, releases everything."""
    alice = Ledger("alice", INSTRUMENTS)
    alice.deposit(10**15, 0)
    o = order(1, "buy", qty, BTC_60K)
    alice.place(o, ref_price=BTC_60K)
    alice.on_book_event(accepted(o))
    bob = Ledger("bob", INSTRUMENTS)
    bob.deposit(10**15, 0)
    remaining = qty
    for i, cut in enumerate(cuts):
        q = min(cut, remaining)
        if q == 0:
            break
        s = order(100 + i, "sell", q, BTC_60K, user="bob")
        bob.place(s, ref_price=BTC_60K)
        bob.on_book_event(accepted(s))
        remaining -= q
        alice.on_book_event(fill(o, s, BTC_60K, q, remaining, 0, trade_id=i + 1))
        rec = alice.order(1)
        assert rec is not None
        assert 0 <= rec.frozen_remaining <= rec.frozen
    if remaining:
        alice.on_book_event(canceled(o, remaining))
    assert alice.frozen == 0


def test_system_notice_takes_the_next_event_id() -> None:
    from pathlib import Path

    from actors.cores.ledger import Ledger
    from protocol import parse_instruments

    inst = parse_instruments((Path(__file__).parent.parent / "protocol" / "instruments.toml").read_text())
    led = Ledger("u", inst)
    first = led.deposit(10, 1)[0]
    notice = led.system_notice("resync", "account restarted", 2)[0]
    assert notice.kind == "system_notice"
    assert notice.event_id == first.event_id + 1
    assert notice.data == {"kind": "resync", "message": "account restarted"}
    assert notice.priority == 3


# -- decimal strings: the ledger's integer formatter is protocol.from_units -----------------

_STEPS = ["0.0001", "0.1", "0.001", "0.01", "0.25", "1", "50", "5E+1", "0.10", "2.5", "1E-8"]


@settings(max_examples=300)
@given(
    step=st.sampled_from(_STEPS),
    units=st.one_of(
        st.integers(-10**6, 10**6),
        st.integers(-10**30, 10**30),
        st.sampled_from([0, 1, -1, 9, 10, -10, 10**26, 10**27 - 1, 10**27, -(10**27)]),
    ),
)
def test_units_formatter_is_from_units(step: str, units: int) -> None:
    assert units_formatter(Decimal(step))(units) == from_units(units, Decimal(step))


def test_memoized_strings_are_the_formatter_and_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ledger_module, "_MEMO_LIMIT", 8)
    for step in map(Decimal, _STEPS):
        memo, fmt = ledger_module._Strings(step), units_formatter(step)
        for units in [*range(-12, 12), *range(10), 10**27, -(10**27), 7, 7]:
            assert memo[units] == fmt(units)
            assert len(memo) <= 8  # full: cleared, then refilled
    assert ledger_module._STRINGS[Decimal("0.1")] is ledger_module._STRINGS[Decimal("0.1")]


def test_order_events_show_each_fill_not_a_remembered_string() -> None:
    """The strings are memoized per value, never per order: after each fill the
    order's event shows its new filled and remaining quantities."""
    ann, ben = funded("ann"), funded("ben")
    maker, taker = order(1, "sell", 5, user="ben"), order(2, "buy", 5, user="ann")
    for ledger, o in ((ben, maker), (ann, taker)):
        ledger.place(o, ref_price=BTC_60K)
        ledger.on_book_event(accepted(o))
    for trade_id, (price, qty, left) in enumerate(
        [(BTC_60K, 2, 3), (BTC_60K + 1, 2, 1), (BTC_60K + 1, 1, 0)], start=1
    ):
        ev = fill(maker, taker, price, qty, left, left, trade_id=trade_id)
        executed, filled = ann.on_book_event(ev)[:2]
        assert (executed.data["price"], executed.data["qty"]) == (
            from_units(price, Decimal("0.1")), from_units(qty, Decimal("0.001")))
        assert (filled.data["filled_qty"], filled.data["remaining_qty"]) == (
            from_units(5 - left, Decimal("0.001")), from_units(left, Decimal("0.001")))
        assert filled.data["status"] == ("filled" if left == 0 else "partially_filled")
        assert type(filled.data["status"]) is str  # the plain value, as .value gives it


@settings(max_examples=500)
@given(
    tick=st.sampled_from(["0.1", "0.01", "0.25", "1", "5", "10", "0.0001", "0.5", "100"]),
    cost=st.one_of(st.integers(0, 10**12), st.integers(0, 10**32)),
    qty=st.one_of(st.integers(1, 10**6), st.integers(1, 10**24)),
)
def test_integer_average_price_is_the_decimal_one(tick: str, cost: int, qty: int) -> None:
    class Ticked:  # _avg_price_str reads only the tick
        pass

    inst: Any = Ticked()
    inst.tick = Decimal(tick)
    try:
        want = _avg_price_decimal(Decimal(tick), cost, qty)
    except ArithmeticError:  # beyond Decimal's digits: the integer path must defer to it
        with pytest.raises(ArithmeticError):
            _avg_price_str(inst, cost, qty)
        return
    assert _avg_price_str(inst, cost, qty) == want


@settings(max_examples=500)
@given(
    numerator=st.one_of(st.integers(0, 10**14), st.integers(0, 10**30)),
    denominator=st.one_of(st.integers(1, 10**14), st.integers(1, 10**30)),
)
def test_integer_risk_ratio_is_the_decimal_one(numerator: int, denominator: int) -> None:
    try:
        want = ratio_to_str(numerator, denominator)
    except ArithmeticError:  # beyond Decimal's digits: the integer path must defer to it
        with pytest.raises(ArithmeticError):
            _ratio_str(numerator, denominator)
        return
    assert _ratio_str(numerator, denominator) == want


# -- risk -----------------------------------------------------------------------------------


def _risk(events: list[UserEvent]) -> list[tuple[str, str]]:
    return [(e.kind, str(e.data["risk_ratio"])) for e in events
            if e.kind in ("risk_alert", "margin_call")]


def _fill_both(maker_ledger: Ledger, taker_ledger: Ledger, maker: NewOrder,
               taker: NewOrder, price: int, trade_id: int) -> list[UserEvent]:
    """Place, accept and fully fill ``maker`` against ``taker``; the taker's events."""
    for ledger, o in ((maker_ledger, maker), (taker_ledger, taker)):
        ledger.place(o, ref_price=price)
        ledger.on_book_event(accepted(o))
    ev = fill(maker, taker, price, maker.qty, 0, 0, trade_id=trade_id)
    maker_ledger.on_book_event(ev)
    return taker_ledger.on_book_event(ev)


@pytest.mark.parametrize("coalesce", [False, True])
def test_risk_alert_then_margin_call_once_each_and_again_after_falling_below(
    coalesce: bool
) -> None:
    alice = funded(amount=3_700 * USDT, coalesce_updates=coalesce)
    bob = funded("bob", amount=100_000 * USDT)

    def turn(events: list[UserEvent]) -> list[UserEvent]:
        return events + alice.flush_updates() if coalesce else events

    # Alice buys 1 BTC at 60000: margin 3000 against equity 3700 - 30 (fee) = 3670.
    events = turn(_fill_both(bob, alice, order(1, "sell", ONE_BTC, user="bob"),
                             order(2, "buy", ONE_BTC), BTC_60K, 1))
    assert _risk(events) == [("risk_alert", "0.81743869")]
    assert events[-1].kind == "risk_alert" and events[-1].priority == 0
    assert "reached 0.8" in str(events[-1].data["message"])
    # Another trade in the same band reports nothing new.
    events = turn(_fill_both(bob, alice, order(3, "buy", 1, user="bob"),
                             order(4, "sell", 1), BTC_60K, 2))
    assert _risk(events) == []
    # Alice sells 0.001 at 59000: her mark, and her equity with it, fall below the margin.
    events = turn(_fill_both(bob, alice, order(5, "buy", 1, user="bob"),
                             order(6, "sell", 1), 590_000, 3))
    [(kind, ratio)] = _risk(events)
    assert kind == "margin_call" and Decimal(ratio) > 1
    assert events[-1].kind == "margin_call"
    # A deposit brings the ratio down: nothing to report, and the band is forgotten.
    assert _risk(turn(alice.deposit(100_000 * USDT, ts=30))) == []
    # Withdrawing all that is available leaves equity at the margin: a call again.
    assert [k for k, _ in _risk(turn(alice.withdraw(alice.available, ts=31)))] == [
        "margin_call"]


def test_a_ledger_pickled_before_risk_events_loads_with_nothing_reported() -> None:
    alice = funded()
    state = alice.__getstate__()
    del state["_risk_level"]
    restored = Ledger.__new__(Ledger)
    restored.__setstate__(state)
    assert restored._risk_level == 0
    assert _risk(restored.deposit(USDT, ts=5)) == []


def test_the_sdk_typed_data_keeps_every_field_the_ledger_sends() -> None:
    # protocol.event_data ignores unknown fields (forward compatibility), so a field the
    # ledger added and the typed data lacked was silently dropped for SDK users.
    alice = funded(amount=3_700 * USDT)
    bob = funded("bob", amount=100_000 * USDT)
    events = _fill_both(bob, alice, order(1, "sell", ONE_BTC, user="bob"),
                        order(2, "buy", ONE_BTC), BTC_60K, 1)
    gone = order(3, "buy", 1, tif="ioc")
    alice.place(gone, ref_price=BTC_60K)
    events += alice.on_book_event(expired(gone, 1))
    events += alice.system_notice("resync", "rebuilt", ts=40)
    assert {"trade_executed", "order_filled", "position_update", "account_update",
            "risk_alert", "order_expired", "system_notice"} <= set(kinds(events))
    for e in events:
        typed = event_data(e.kind, e.data)
        assert set(e.data) <= set(attrs.fields_dict(type(typed))), e.kind
        assert {k: getattr(typed, k) for k in e.data} == dict(e.data), e.kind
