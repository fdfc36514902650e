"""The simulation invariants: a hand-built valid history passes every checker, and
each deliberately broken history fails exactly the checker it breaks."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import Instrument, parse_instruments
from simulations.history import (
    AgentLog,
    BookFinal,
    FinalState,
    History,
    MarketRecord,
    PlacedOrder,
    PrivateRecord,
    UserFinal,
)
from simulations.invariants import (
    CHECKERS,
    Check,
    _before_window,
    _EpochTape,
    check_all,
    check_books_not_crossed,
    check_cash_conserved,
    check_fills_both_sides,
    check_market_seqs_gapless,
    check_private_seqs_gapless,
)

INSTRUMENTS: dict[str, Instrument] = parse_instruments("""
[instruments.BTC-PERP]
tick = "0.1"
lot = "0.001"
margin_rate = "0.05"
maker_fee = "0.0002"
taker_fee = "0.0005"
ref_price = "60000.0"
price_band = "0.1"
position_limit = "100"

[instruments.ETH-PERP]
tick = "0.01"
lot = "0.01"
margin_rate = "0.05"
maker_fee = "0.0002"
taker_fee = "0.0005"
ref_price = "3000.00"
price_band = "0.1"
position_limit = "1000"
""")

BTC = "BTC-PERP"
DEPOSIT = 1_000_000_000  # 100 000 USDT in minor units
# One trade: 0.004 BTC at 60000.0 → notional 240 USDT = 2 400 000 minor units;
# maker fee 0.02 % = 480, taker fee 0.05 % = 1200 minor units.
MAKER_FEE, TAKER_FEE = 480, 1200
REALIZED = 500  # arbitrary, but each account consistent with it


def _order(oid: int, coid: str, side: str, type_: str, price: str | None, qty: str,
           filled: str, remaining: str, status: str) -> dict[str, Any]:
    return {"order_id": oid, "client_order_id": coid, "symbol": BTC, "side": side,
            "type": type_, "price": price, "qty": qty, "filled_qty": filled,
            "remaining_qty": remaining, "status": status}


def _fill(tid: int, oid: int, coid: str, side: str, fee: str, liquidity: str) -> dict[str, Any]:
    return {"trade_id": tid, "order_id": oid, "client_order_id": coid, "symbol": BTC,
            "side": side, "price": "60000.0", "qty": "0.004", "fee": fee,
            "liquidity": liquidity}


def _events(*items: tuple[int, str, dict[str, Any]]) -> list[PrivateRecord]:
    return [PrivateRecord(seq=s, kind=k, received_ns=1000 + s, data=d) for s, k, d in items]


def _mkt(channel: str, seq: int, kind: str, data: dict[str, Any], epoch: int = 1) -> MarketRecord:
    return MarketRecord(channel=channel, seq=seq, kind=kind, epoch=epoch, ts=seq,
                        received_wall_ns=seq, data=data)


def _book(seq: int, kind: str = "delta", bids: Any = (), asks: Any = (),
          epoch: int = 1, channel: str = "book.BTC-PERP") -> MarketRecord:
    return _mkt(channel, seq, kind, {"bids": [list(r) for r in bids],
                                     "asks": [list(r) for r in asks]}, epoch)


def _trade(seq: int, tid: int = 1, price: str = "60000.0", qty: str = "0.004",
           epoch: int = 1) -> MarketRecord:
    return _mkt("trades.BTC-PERP", seq, "trade",
                {"trade_id": tid, "price": price, "qty": qty, "taker_side": "buy"}, epoch)


ACCOUNT = {"balance": "0", "available": "0", "frozen": "0", "margin": "0",
           "position_pnl": "0", "realized_pnl": "0", "risk_ratio": "0"}


def valid_history() -> History:
    """Alice rests a sell of 0.010 BTC; Bob's market buy takes 0.004 of it (trade 1);
    Bob places and cancels a bid; one of Bob's places is refused. Everything agrees."""
    alice = AgentLog(user="alice", role="maker", deposit=DEPOSIT)
    alice.orders["a-1"] = PlacedOrder(
        client_order_id="a-1", symbol=BTC, side="sell", type="limit", qty=10, price=600000,
        submitted_ns=1, acked_ns=2, ok=True, order_id=1, first_fill_ns=5)
    alice.private = _events(
        (1, "order_accepted", _order(1, "a-1", "sell", "limit", "60000.0", "0.010",
                                     "0.000", "0.010", "open")),
        (2, "account_update", dict(ACCOUNT)),
        (3, "trade_executed", _fill(1, 1, "a-1", "sell", "0.0480", "maker")),
        (4, "order_partially_filled", _order(1, "a-1", "sell", "limit", "60000.0", "0.010",
                                             "0.004", "0.006", "partially_filled")),
        (5, "position_update", {"symbol": BTC}),
        (6, "account_update", dict(ACCOUNT)),
    )
    alice.market = [_trade(1)]

    bob = AgentLog(user="bob", role="noise", deposit=DEPOSIT, reconnects=1)
    bob.orders["b-1"] = PlacedOrder(
        client_order_id="b-1", symbol=BTC, side="buy", type="market", qty=4, price=None,
        submitted_ns=3, acked_ns=4, ok=True, order_id=2, first_fill_ns=5)
    bob.orders["b-2"] = PlacedOrder(
        client_order_id="b-2", symbol=BTC, side="buy", type="limit", qty=1, price=599900,
        submitted_ns=6, acked_ns=7, ok=True, order_id=3)
    bob.orders["b-3"] = PlacedOrder(
        client_order_id="b-3", symbol=BTC, side="buy", type="limit", qty=100_000,
        price=599900, submitted_ns=8, acked_ns=9, ok=False, error="insufficient_funds")
    bob.private = _events(
        (1, "order_accepted", _order(2, "b-1", "buy", "market", None, "0.004",
                                     "0.000", "0.004", "open")),
        (2, "trade_executed", _fill(1, 2, "b-1", "buy", "0.1200", "taker")),
        (3, "order_filled", _order(2, "b-1", "buy", "market", None, "0.004",
                                   "0.004", "0.000", "filled")),
        # seq 4 (a position_update) was conflated away: announced skipped
        (5, "account_update", dict(ACCOUNT)),
        (6, "order_accepted", _order(3, "b-2", "buy", "limit", "59990.0", "0.001",
                                     "0.000", "0.001", "open")),
        (7, "order_canceled", _order(3, "b-2", "buy", "limit", "59990.0", "0.001",
                                     "0.000", "0.001", "canceled")),
        (8, "account_update", dict(ACCOUNT)),
    )
    bob.skipped = {4}
    bob.market = [  # a reconnect: epoch 2 restarts the seqs with a fresh snapshot
        _book(1, "snapshot", asks=[("60000.0", "0.010")]),
        _book(2, asks=[("60000.0", "0.006")]),
        _book(1, "snapshot", asks=[("60000.0", "0.006")], epoch=2),
        _book(2, bids=[("59990.0", "0.001")], epoch=2),
        _book(3, bids=[("59990.0", "0.000")], epoch=2),
    ]

    monitor = [
        _book(1, "snapshot"),
        _book(1, "snapshot", channel="book.ETH-PERP"),
        _book(2, asks=[("60000.0", "0.010")]),
        _book(3, asks=[("60000.0", "0.006")]),
        _trade(1),
        _book(4, bids=[("59990.0", "0.001")]),
        _book(5, bids=[("59990.0", "0")]),
    ]

    final = FinalState(
        users={
            "alice": UserFinal(
                user="alice",
                account={"balance": DEPOSIT - MAKER_FEE + REALIZED, "available": 0,
                         "frozen": 0, "margin": 0, "position_pnl": 0,
                         "realized_pnl": REALIZED, "fees_paid": MAKER_FEE, "risk_ratio": 0},
                positions={BTC: -4},
                open_orders={1: _order(1, "a-1", "sell", "limit", "60000.0", "0.010",
                                       "0.004", "0.006", "partially_filled")},
            ),
            "bob": UserFinal(
                user="bob",
                account={"balance": DEPOSIT - TAKER_FEE - REALIZED, "available": 0,
                         "frozen": 0, "margin": 0, "position_pnl": 0,
                         "realized_pnl": -REALIZED, "fees_paid": TAKER_FEE, "risk_ratio": 0},
                positions={BTC: 4, "ETH-PERP": 0},
                open_orders={},
            ),
        },
        books={BTC: BookFinal(symbol=BTC, bids=[], asks=[(600000, 6)]),
               "ETH-PERP": BookFinal(symbol="ETH-PERP", bids=[], asks=[])},
    )
    return History(seed=7, scenario="hand-built", started_ns=0, ended_ns=100,
                   instruments={BTC: ("0.1", "0.001"), "ETH-PERP": ("0.01", "0.01")},
                   agents={"alice": alice, "bob": bob}, monitor=monitor, final=final)


def _by_name(history: History) -> dict[str, Check]:
    return {c.name: c for c in check_all(history, INSTRUMENTS)}


def _failed(history: History) -> dict[str, str]:
    return {c.name: c.detail for c in check_all(history, INSTRUMENTS) if not c.passed}


def _private(h: History, user: str, seq: int) -> PrivateRecord:
    return next(e for e in h.agents[user].private if e.seq == seq)


# -- the valid history -----------------------------------------------------------------


def test_valid_history_passes_every_check() -> None:
    checks = check_all(valid_history(), INSTRUMENTS)
    assert [c.name for c in checks] == [
        "orders_accounted", "private_seqs_gapless", "fills_both_sides", "cash_conserved",
        "net_position_zero", "books_not_crossed", "market_seqs_gapless", "fills_match_orders",
    ]
    assert len(checks) == len(CHECKERS)
    bad = {c.name: c.detail for c in checks if not c.passed}
    assert bad == {}
    by = {c.name: c for c in checks}
    assert by["orders_accounted"].detail.startswith(
        "3 acknowledged orders: 1 filled, 1 canceled, 1 resting")
    assert by["orders_accounted"].figures["refused"] == 1
    assert by["private_seqs_gapless"].figures == {
        "agents": 2, "events": 13, "skipped": 1, "missing": 0, "duplicates": 0,
        "out_of_order": 0, "late_starts": 0, "before_login": 0, "violations": 0}
    assert by["fills_both_sides"].figures["trades"] == 1
    assert by["fills_both_sides"].figures["fills"] == 2
    assert by["fills_both_sides"].figures["public_trades"] == 1
    cash = by["cash_conserved"].figures
    assert cash["fees_collected"] == MAKER_FEE + TAKER_FEE
    assert cash["realized_pnl"] == 0
    assert cash["deposits"] == cash["total"] == 2 * DEPOSIT
    assert "fees collected 1680" in by["cash_conserved"].detail
    assert by["books_not_crossed"].figures["frames_checked"] == 11
    assert by["market_seqs_gapless"].figures["streams"] == 6
    assert by["fills_match_orders"].figures["lots_filled"] == 8


def test_check_is_frozen_and_checkers_are_pure() -> None:
    h = valid_history()
    before = copy.deepcopy(h)
    c = check_all(h, INSTRUMENTS)[0]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        c.passed = False  # type: ignore[misc]
    assert h == before


def test_empty_history_passes() -> None:
    h = History(seed=0, scenario="empty", started_ns=0)
    assert all(c.passed for c in check_all(h, INSTRUMENTS))


# -- each broken history fails exactly its checker ---------------------------------------

Mutation = Callable[[History], None]


def _lose_open_order(h: History) -> None:
    h.final.users["alice"].open_orders.clear()


def _terminal_and_open(h: History) -> None:
    h.final.users["bob"].open_orders[3] = _order(3, "b-2", "buy", "limit", "59990.0", "0.001",
                                                 "0.000", "0.001", "open")


def _two_terminals(h: History) -> None:
    # Bob's account_update seq 8 replaced by a second cancel of order 3.
    e = _private(h, "bob", 8)
    e.kind, e.data = "order_canceled", dict(_private(h, "bob", 7).data)


def _event_after_terminal(h: History) -> None:
    e = _private(h, "bob", 8)
    e.kind = "order_accepted"
    e.data = _order(3, "b-2", "buy", "limit", "59990.0", "0.001", "0.000", "0.001", "open")


def _seq_gap(h: History) -> None:
    h.agents["bob"].skipped.clear()


def _duplicate_seq(h: History) -> None:
    # seq 4 arrives although it was announced skipped
    h.agents["bob"].private.insert(3, PrivateRecord(seq=4, kind="position_update",
                                                    received_ns=0, data={"symbol": BTC}))


def _seq_replayed(h: History) -> None:
    h.agents["alice"].private.append(copy.deepcopy(_private(h, "alice", 6)))


def _one_sided_fill(h: History) -> None:
    _private(h, "alice", 3).data["trade_id"] = 99


def _two_takers(h: History) -> None:
    _private(h, "alice", 3).data.update(liquidity="taker", fee="0.1200")


def _fill_price_differs(h: History) -> None:
    _private(h, "alice", 3).data["price"] = "60000.1"
    _private(h, "alice", 3).data["fee"] = "0.0481"  # keep the fee right for that price


def _missing_public_trade(h: History) -> None:
    h.monitor = [r for r in h.monitor if r.kind != "trade"]


def _public_trade_twice(h: History) -> None:
    h.monitor.append(_trade(2))


def _public_trade_without_fills(h: History) -> None:
    h.monitor.append(_trade(2, tid=2))


def _public_qty_differs(h: History) -> None:
    h.monitor[4] = _trade(1, qty="0.005")


def _cash_off_by_one(h: History) -> None:
    h.final.users["alice"].account["balance"] += 1


def _cash_moved_between_users(h: History) -> None:
    h.final.users["alice"].account["balance"] += 1
    h.final.users["bob"].account["balance"] -= 1


def _net_position(h: History) -> None:
    h.final.users["bob"].positions[BTC] = 5


def _crossed_final_book(h: History) -> None:
    h.final.books[BTC].bids = [(600000, 1)]


def _crossed_via_deltas(h: History) -> None:
    h.monitor = [
        _book(1, "snapshot"),
        _book(1, "snapshot", channel="book.ETH-PERP"),
        _book(2, asks=[("60000.0", "0.010")]),
        _book(3, bids=[("60000.0", "0.001")]),  # a bid at the ask: crossed
        _book(4, bids=[("60000.0", "0")], asks=[("60000.0", "0.006")]),
        _trade(1),
    ]


def _delta_before_snapshot(h: History) -> None:
    h.monitor = [r for r in h.monitor if r.channel != "book.ETH-PERP"]
    h.monitor.append(_book(1, bids=[("2999.00", "0.01")], channel="book.ETH-PERP"))


def _monitor_market_gap(h: History) -> None:
    # the delta seq 3 dropped (a slow consumer): the replay stops, the gap is reported
    h.monitor = [r for r in h.monitor if not (r.channel == "book.BTC-PERP" and r.seq == 3)]


def _agent_market_gap(h: History) -> None:
    del h.agents["bob"].market[3]  # epoch 2, seq 2


def _fills_exceed_order(h: History) -> None:
    h.agents["bob"].orders["b-1"].qty = 3


def _filled_qty_disagrees(h: History) -> None:
    _private(h, "bob", 3).data["filled_qty"] = "0.003"


def _wrong_fee(h: History) -> None:
    _private(h, "bob", 2).data["fee"] = "0.1199"


BROKEN: list[tuple[str, Mutation, str, str]] = [
    ("lost order", _lose_open_order, "orders_accounted", "alice order 1 (a-1) lost"),
    ("terminal and open", _terminal_and_open, "orders_accounted", "both order_canceled and open"),
    ("two terminal events", _two_terminals, "orders_accounted", "2 terminal events"),
    ("event after terminal", _event_after_terminal, "orders_accounted",
     "got order_accepted after its order_canceled"),
    ("seq gap", _seq_gap, "private_seqs_gapless", "bob: missing seqs [4] of 1..8"),
    ("duplicate seq", _duplicate_seq, "private_seqs_gapless", "bob: duplicate seqs [4]"),
    ("seq replayed", _seq_replayed, "private_seqs_gapless", "alice: seq 6 received after 6"),
    ("one-sided fill", _one_sided_fill, "fills_both_sides",
     "trade BTC-PERP#1 has 0 maker and 1 taker fill(s) of 1: one-sided"),
    ("two taker fills", _two_takers, "fills_both_sides", "0 maker and 2 taker"),
    ("fill prices differ", _fill_price_differs, "fills_both_sides",
     "maker 4@600001 vs taker 4@600000"),
    ("missing public trade", _missing_public_trade, "fills_both_sides",
     "trade BTC-PERP#1 has fills but never appeared on the public tape"),
    ("public trade twice", _public_trade_twice, "fills_both_sides",
     "public trade BTC-PERP#1 appears twice in epoch 1"),
    ("public trade without fills", _public_trade_without_fills, "fills_both_sides",
     "public trade BTC-PERP#2 has no fills"),
    ("public qty differs", _public_qty_differs, "fills_both_sides", "public 5@600000"),
    ("cash off by one", _cash_off_by_one, "cash_conserved",
     "Σ balance+fees-realized 2000000001 != Σ deposits 2000000000 (+1 minor units)"),
    ("cash moved between users", _cash_moved_between_users, "cash_conserved",
     "alice: balance+fees-realized 1000000001 != deposit 1000000000 (+1)"),
    ("net position", _net_position, "net_position_zero", "BTC-PERP: Σ net positions +1 lots"),
    ("crossed final book", _crossed_final_book, "books_not_crossed",
     "final BTC-PERP book crossed: best bid 600000 >= best ask 600000"),
    ("crossed via deltas", _crossed_via_deltas, "books_not_crossed",
     "monitor book.BTC-PERP epoch 1 seq 3: book crossed"),
    ("delta before snapshot", _delta_before_snapshot, "books_not_crossed",
     "delta before any snapshot"),
    ("monitor market gap", _monitor_market_gap, "market_seqs_gapless",
     "monitor book.BTC-PERP epoch 1: seq 4 where 3 was due (gap of 1)"),
    ("agent market gap", _agent_market_gap, "market_seqs_gapless",
     "agent bob book.BTC-PERP epoch 2: seq 3 where 2 was due"),
    ("fills exceed the order", _fills_exceed_order, "fills_match_orders",
     "bob order 2: fills total 4 lots, exceeding its qty 3"),
    ("filled_qty disagrees", _filled_qty_disagrees, "fills_match_orders",
     "fills total 4 lots but filled_qty is 3"),
    ("wrong fee", _wrong_fee, "fills_match_orders", "fee 1199 where taker rate gives 1200"),
]


@pytest.mark.parametrize(("mutate", "checker", "needle"),
                         [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_history_fails_exactly_its_checker(
        mutate: Mutation, checker: str, needle: str) -> None:
    h = valid_history()
    mutate(h)
    failed = _failed(h)
    assert set(failed) == {checker}, failed
    assert needle in failed[checker]
    check = _by_name(h)[checker]
    assert check.figures["violations"] >= 1
    assert check.detail.startswith(f"{check.figures['violations']} violation(s): ")


def test_every_checker_can_fail() -> None:
    assert {b[2] for b in BROKEN} == {c(History(seed=0, scenario="", started_ns=0),
                                        INSTRUMENTS).name for c in CHECKERS}


def test_gap_stops_the_book_replay() -> None:
    h = valid_history()
    _monitor_market_gap(h)
    books = check_books_not_crossed(h, INSTRUMENTS)
    assert books.passed
    assert books.figures["frames_not_replayed"] == 2
    assert "(2 after a gap not replayed)" in books.detail


def test_one_sided_fill_with_non_agent_counterparty_is_reported_not_failed() -> None:
    h = valid_history()
    alice = h.agents.pop("alice")  # alice still trades, but no agent logs her side
    h.monitor.append(_trade(2, tid=2))  # and a trade between non-agents
    check = check_fills_both_sides(h, INSTRUMENTS)
    assert check.passed, check.detail
    assert check.figures["one_sided"] == 1
    assert "1 one-sided (non-agent counterparty)" in check.detail
    assert "1 public trades between non-agents" in check.detail
    h.agents["alice"] = alice
    assert "public trade BTC-PERP#2 has no fills" in check_fills_both_sides(h, INSTRUMENTS).detail
    h.monitor.pop()
    assert check_fills_both_sides(h, INSTRUMENTS).passed


def test_same_trade_in_two_epochs_counts_once() -> None:
    h = valid_history()
    h.monitor.append(_trade(1, epoch=2))
    assert not _failed(h)
    h.monitor.append(_trade(1, epoch=3, qty="0.005"))  # the same trade, told differently
    assert "differs between epochs" in _failed(h)["fills_both_sides"]


def test_self_trade_fails() -> None:
    h = valid_history()
    bob = h.agents["bob"]
    for e in h.agents["alice"].private:
        if e.kind == "trade_executed":
            bob.private.append(PrivateRecord(seq=9, kind=e.kind, received_ns=0, data=e.data))
    h.agents["alice"].private = [e for e in h.agents["alice"].private
                                 if e.kind != "trade_executed"]
    detail = check_fills_both_sides(h, INSTRUMENTS).detail
    assert "both fills belong to bob" in detail


def test_malformed_wire_data_is_a_violation_not_a_crash() -> None:
    h = valid_history()
    _private(h, "alice", 3).data["qty"] = "0.0045"  # off the lot grid
    h.monitor[4].data["price"] = "sixty"
    h.monitor[2].data["asks"] = [["60000.0"]]
    _private(h, "bob", 6).data["symbol"] = "NOPE"
    failed = _failed(h)
    assert "qty '0.0045'" in failed["fills_both_sides"]
    assert "price 'sixty'" in failed["fills_both_sides"]
    assert "level ['60000.0']" in failed["books_not_crossed"]
    assert "unknown symbol 'NOPE'" in failed["fills_match_orders"]


def test_missing_final_state_fails_cash_and_orders() -> None:
    h = valid_history()
    del h.final.users["alice"]
    failed = _failed(h)
    assert "alice: no final account" in failed["cash_conserved"]
    assert "alice: no final state, its open orders are unknown" in failed["orders_accounted"]


def test_a_stream_must_start_at_its_first_seq() -> None:
    # alice's seq 1 (the deposit's account_update) never reached her.
    h = valid_history()
    del h.agents["alice"].private[0]
    check = check_private_seqs_gapless(h, INSTRUMENTS)
    assert not check.passed
    assert "alice: missing seqs [1] of 1..6" in check.detail
    # An agent that logged in without resuming from 0 starts at the login's seq + 1.
    h.agents["alice"].first_seq = 2
    assert check_private_seqs_gapless(h, INSTRUMENTS).passed
    del h.agents["alice"].private[2]  # seq 4 lost after the start
    assert "alice: missing seqs [4] of 2..6" in check_private_seqs_gapless(h, INSTRUMENTS).detail


def test_a_lost_tail_fails_against_the_engines_last_seq() -> None:
    h = valid_history()
    last = h.agents["alice"].private[-1].seq
    h.final.users["alice"].last_seq = last + 2  # the engine numbered two more
    check = check_private_seqs_gapless(h, INSTRUMENTS)
    assert not check.passed
    assert f"missing seqs [{last + 1}, {last + 2}]" in check.detail
    h.final.users["alice"].last_seq = last - 1  # the agent saw more than the engine has
    assert "beyond the engine's last seq" in check_private_seqs_gapless(h, INSTRUMENTS).detail
    h.final.users["alice"].last_seq = last
    assert check_private_seqs_gapless(h, INSTRUMENTS).passed


def _tape(epoch: int, high: int, window_low: int | None = None) -> _EpochTape:
    return _EpochTape(epoch=epoch, high=high, window_low=window_low)


@pytest.mark.parametrize(("tapes", "trade_id", "excused"), [
    ([], 1, False),
    ([_tape(1, 10)], 5, False),  # seen up to 10: missed while subscribed
    ([_tape(1, 10)], 11, False),  # after the last seen: missed while subscribed
    ([_tape(1, 10), _tape(2, 20, 14)], 12, True),  # between, older than the full window
    ([_tape(1, 10), _tape(2, 20)], 12, False),  # the snapshot was not full: it had room
    ([_tape(1, 10), _tape(2, 20, 14)], 9, False),  # inside what epoch 1 saw
    ([_tape(1, 10), _tape(2, 20, 14)], 14, False),  # in the window: should be there
    ([_tape(1, 20, 14)], 3, True),  # before the first subscription, older than its window
    ([_tape(1, 20, 14)], 15, False),
    ([_tape(1, 10), _tape(2, 0), _tape(3, 20, 14)], 12, True),  # an epoch with no trades
])
def test_trades_older_than_the_next_snapshot(tapes: list[_EpochTape], trade_id: int,
                                             excused: bool) -> None:
    assert _before_window(tapes, trade_id) is excused


def _snap(seq: int, tids: list[int], epoch: int, qty: str = "0.004") -> MarketRecord:
    return _mkt("trades.BTC-PERP", seq, "snapshot", {"trades": [
        {"trade_id": tid, "price": "60000.0", "qty": qty, "taker_side": "buy", "ts": tid}
        for tid in tids]}, epoch)


def _three_trades(tape: list[tuple[int, int]],
                  snapshots: dict[int, list[int]] | None = None) -> History:
    """Trades 1-3 between maker m and taker t; the monitor saw ``tape`` (trade id, epoch),
    each epoch starting with its snapshot's trade ids from ``snapshots`` (if any)."""
    m, t = AgentLog(user="m", role="maker"), AgentLog(user="t", role="noise")
    for tid in (1, 2, 3):
        m.private.append(PrivateRecord(seq=tid, kind="trade_executed", received_ns=tid,
                                       data=_fill(tid, 1, "a-1", "sell", "0.0480", "maker")))
        t.private.append(PrivateRecord(seq=tid, kind="trade_executed", received_ns=tid,
                                       data=_fill(tid, 2, "b-1", "buy", "0.1200", "taker")))
    seqs: dict[int, int] = {}
    monitor = []
    for epoch, tids in sorted((snapshots or {}).items()):
        seqs[epoch] = 1
        monitor.append(_snap(1, tids, epoch))
    for tid, epoch in tape:
        seqs[epoch] = seqs.get(epoch, 0) + 1
        monitor.append(_trade(seqs[epoch], tid=tid, epoch=epoch))
    return History(seed=0, scenario="tape", started_ns=0, agents={"m": m, "t": t},
                   monitor=monitor)


def test_a_trade_missed_between_epochs_must_be_in_the_next_snapshot() -> None:
    # Trade 2 fell while the monitor resubscribed: the new epoch's snapshot has it.
    check = check_fills_both_sides(_three_trades([(1, 1), (3, 2)], {2: [1, 2]}),
                                   INSTRUMENTS)
    assert check.passed, check.detail
    assert check.figures["public_trades"] == 3 and check.figures["snapshot_trades"] == 2
    assert check_fills_both_sides(_three_trades([(1, 1), (2, 1), (3, 1)]), INSTRUMENTS).passed
    # Missing from the snapshot too (or no snapshot): lost.
    for snapshots in ({2: [1]}, {}):
        check = check_fills_both_sides(_three_trades([(1, 1), (3, 2)], snapshots),
                                       INSTRUMENTS)
        assert not check.passed
        assert "trade BTC-PERP#2 has fills but never appeared on the public tape" in \
            check.detail
    # A trade before the first subscription is in its snapshot.
    assert check_fills_both_sides(_three_trades([(2, 1), (3, 1)], {1: [1]}),
                                  INSTRUMENTS).passed
    assert not check_fills_both_sides(_three_trades([(2, 1), (3, 1)]), INSTRUMENTS).passed


def test_a_trade_older_than_a_full_snapshot_is_counted_not_failed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("simulations.invariants.SNAPSHOT_TRADES", 1)
    check = check_fills_both_sides(_three_trades([(1, 1)], {2: [3]}), INSTRUMENTS)
    assert check.passed, check.detail
    assert check.figures["before_window"] == 1
    assert "1 trades fell while the monitor was not subscribed, older than its next " \
        "snapshot's trades" in check.detail
    monkeypatch.setattr("simulations.invariants.SNAPSHOT_TRADES", 2)  # then it had room
    assert not check_fills_both_sides(_three_trades([(1, 1)], {2: [3]}), INSTRUMENTS).passed


def test_a_trade_twice_in_one_epoch_or_told_differently_fails() -> None:
    check = check_fills_both_sides(_three_trades([(1, 1), (2, 2), (3, 2)], {2: [1, 2]}),
                                   INSTRUMENTS)
    assert "public trade BTC-PERP#2 appears twice in epoch 2" in check.detail
    h = _three_trades([(1, 1), (3, 2)], {2: [1, 2]})
    h.monitor[0] = _snap(1, [1, 2], 2, qty="0.005")
    assert "public trade BTC-PERP#1 differs between epochs" in \
        check_fills_both_sides(h, INSTRUMENTS).detail
    h.monitor.append(_snap(4, [3], 2))
    assert "a snapshot after the first frame of its epoch" in \
        check_fills_both_sides(h, INSTRUMENTS).detail


def test_detail_quotes_three_violations_then_counts() -> None:
    h = valid_history()
    h.agents["bob"].private = [e for e in h.agents["bob"].private if e.seq in (1, 8)]
    h.agents["bob"].skipped = set()
    h.agents["alice"].private = list(reversed(h.agents["alice"].private))
    check = check_private_seqs_gapless(h, INSTRUMENTS)
    assert not check.passed
    n = int(check.figures["violations"])
    assert n > 3
    assert check.detail.endswith(
        f"; +{n - 3} more (8 private events and 0 skipped seqs over 2 agents)")


# -- properties ----------------------------------------------------------------------------


@st.composite
def seq_streams(draw: st.DrawFn) -> tuple[list[int], set[int]]:
    """A valid private stream: 1..n, some seqs skipped (conflated), the rest received."""
    n = draw(st.integers(min_value=0, max_value=80))
    skipped = draw(st.sets(st.integers(min_value=1, max_value=max(n, 1)))) if n else set()
    received = [s for s in range(1, n + 1) if s not in skipped]
    return received, skipped


def _seq_history(received: list[int], skipped: set[int]) -> History:
    agent = AgentLog(user="u", role="noise",
                     private=[PrivateRecord(seq=s, kind="account_update", received_ns=s)
                              for s in received],
                     skipped=set(skipped))
    return History(seed=0, scenario="seqs", started_ns=0, agents={"u": agent})


@given(seq_streams())
def test_valid_private_streams_pass(stream: tuple[list[int], set[int]]) -> None:
    received, skipped = stream
    assert check_private_seqs_gapless(_seq_history(received, skipped), INSTRUMENTS).passed


@given(seq_streams(), st.data())
def test_losing_one_private_event_fails(stream: tuple[list[int], set[int]],
                                        data: st.DataObject) -> None:
    received, skipped = stream
    seen = [*received, *skipped]
    low, top = min(seen, default=0), max(seen, default=0)
    # A lost head or tail is invisible: the stream may start late (login) or end early.
    lost_candidates = [s for s in received if low < s < top]
    if not lost_candidates:
        return
    lost = data.draw(st.sampled_from(lost_candidates))
    check = check_private_seqs_gapless(
        _seq_history([s for s in received if s != lost], skipped), INSTRUMENTS)
    assert not check.passed
    assert f"missing seqs [{lost}]" in check.detail


@given(seq_streams(), st.data())
def test_reordering_or_doubling_private_events_fails(stream: tuple[list[int], set[int]],
                                                     data: st.DataObject) -> None:
    received, skipped = stream
    if not received:
        return
    i = data.draw(st.integers(min_value=0, max_value=len(received) - 1))
    doubled = [*received[: i + 1], received[i], *received[i + 1:]]
    assert not check_private_seqs_gapless(_seq_history(doubled, skipped), INSTRUMENTS).passed
    if len(received) > 1:
        j = min(i, len(received) - 2)
        swapped = list(received)
        swapped[j], swapped[j + 1] = swapped[j + 1], swapped[j]
        check = check_private_seqs_gapless(_seq_history(swapped, skipped), INSTRUMENTS)
        assert not check.passed
        assert "received after" in check.detail
    if skipped:
        also = data.draw(st.sampled_from(sorted(skipped)))
        check = check_private_seqs_gapless(
            _seq_history(sorted([*received, also]), skipped), INSTRUMENTS)
        assert f"duplicate seqs [{also}]" in check.detail


@given(st.lists(st.tuples(st.sampled_from(["trades.BTC-PERP", "book.ETH-PERP"]),
                          st.integers(min_value=1, max_value=6)), max_size=8), st.data())
def test_market_streams_gapless_iff_consecutive(streams: list[tuple[str, int]],
                                                data: st.DataObject) -> None:
    records: list[MarketRecord] = []
    epochs: dict[str, int] = {}
    for channel, length in streams:
        epochs[channel] = epoch = epochs.get(channel, 0) + 1
        records.extend(_mkt(channel, s, "trade", {}, epoch) for s in range(1, length + 1))
    h = History(seed=0, scenario="market", started_ns=0, monitor=records)
    assert check_market_seqs_gapless(h, INSTRUMENTS).passed
    # Dropping any frame but the last of its stream leaves a gap.
    droppable = [i for i, r in enumerate(records)
                 if any(o.channel == r.channel and o.epoch == r.epoch and o.seq == r.seq + 1
                        for o in records)]
    if droppable:
        i = data.draw(st.sampled_from(droppable))
        h.monitor = records[:i] + records[i + 1:]
        check = check_market_seqs_gapless(h, INSTRUMENTS)
        assert not check.passed
        assert f"seq {records[i].seq + 1} where {records[i].seq} was due" in check.detail


@given(st.lists(st.tuples(st.sampled_from(["bids", "asks"]),
                          st.integers(min_value=1, max_value=20),
                          st.integers(min_value=0, max_value=5)), max_size=40))
def test_replayed_books_that_never_cross_pass(changes: list[tuple[str, int, int]]) -> None:
    # Bids live at 2990.00-2999.99, asks at 3000.00 and up: never crossed.
    records = [_book(1, "snapshot", channel="book.ETH-PERP")]
    for n, (side, offset, lots) in enumerate(changes, start=2):
        cents = 300_000 - offset if side == "bids" else 299_999 + offset
        level = (f"{cents // 100}.{cents % 100:02d}", f"0.{lots:02d}")
        records.append(_book(n, bids=[level] if side == "bids" else [],
                             asks=[level] if side == "asks" else [], channel="book.ETH-PERP"))
    h = History(seed=0, scenario="book", started_ns=0, monitor=records)
    check = check_books_not_crossed(h, INSTRUMENTS)
    assert check.passed, check.detail
    assert check.figures["frames_checked"] == len(records)
    # A bid at 3000.19 (the highest ask price used) crosses as soon as any ask rests.
    records.append(_book(len(records) + 1, bids=[("3000.19", "0.01")], channel="book.ETH-PERP"))
    has_ask: dict[int, int] = {}
    for side, offset, lots in changes:
        if side == "asks":
            has_ask[offset] = lots
    crossed = not check_books_not_crossed(h, INSTRUMENTS).passed
    assert crossed == any(has_ask.values())


@given(st.lists(st.tuples(st.integers(min_value=1, max_value=10**12),
                          st.integers(min_value=0, max_value=10**7),
                          st.integers(min_value=-10**9, max_value=10**9)),
                min_size=1, max_size=6),
       st.data())
def test_cash_conserved_to_the_minor_unit(users: list[tuple[int, int, int]],
                                          data: st.DataObject) -> None:
    h = History(seed=0, scenario="cash", started_ns=0)
    for i, (deposit, fees, realized) in enumerate(users):
        u = f"u{i}"
        h.agents[u] = AgentLog(user=u, role="noise", deposit=deposit)
        h.final.users[u] = UserFinal(user=u, positions={}, open_orders={}, account={
            "balance": deposit - fees + realized, "fees_paid": fees, "realized_pnl": realized})
    check = check_cash_conserved(h, INSTRUMENTS)
    assert check.passed, check.detail
    assert check.figures["fees_collected"] == sum(f for _, f, _ in users)
    who = data.draw(st.sampled_from(sorted(h.final.users)))
    delta = data.draw(st.integers(min_value=-3, max_value=3).filter(bool))
    h.final.users[who].account["balance"] += delta
    check = check_cash_conserved(h, INSTRUMENTS)
    assert not check.passed
    assert check.figures["difference"] == delta
