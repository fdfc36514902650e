"""The desks' message flow on the in-process loop: order → fill → events → replies."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from actors.desks import RECENT_TRADES, BookDesk
from actors.local import LocalEngine
from actors.messages import (
    AccountCancel,
    AccountCancelAll,
    AccountDeposit,
    AccountPlace,
    Delivery,
    Dest,
    Reply,
    ReplyTo,
    RouterReplay,
)
from protocol import (
    CASH_STEP,
    CancelUserOrders,
    Instrument,
    NewOrder,
    PublicTrade,
    RemoteProtocolError,
)

MS = 1_000_000


class Harness:
    def __init__(self, instruments: dict[str, Instrument]) -> None:
        self.replies: list[Reply] = []
        self.delivered: dict[str, list[Any]] = {}
        self.market: list[Any] = []
        self.engine = LocalEngine(
            instruments, on_gateway=self._gateway, on_market=lambda s, e: self.market.append(e),
            conflation_window_ns=0,
        )
        self.now = 1_000 * MS
        self.rid = 0

    def _gateway(self, gw: str, msg: Any) -> None:
        if isinstance(msg, Reply):
            self.replies.append(msg)
        else:
            assert isinstance(msg, Delivery)
            self.delivered.setdefault(msg.user, []).extend(msg.events)

    def ref(self) -> ReplyTo:
        self.rid += 1
        return ReplyTo(gateway="gw", conn=1, request_id=self.rid)

    def request(self, dest: Dest, msg: Any) -> Reply:
        before = len(self.replies)
        self.now += MS
        self.engine.send(dest, msg)
        self.engine.run(self.now)
        mine = [r for r in self.replies[before:] if r.reply_to.request_id == self.rid]
        assert len(mine) == 1, self.replies[before:]
        return mine[0]

    def deposit(self, user: str, amount: int) -> Reply:
        self.engine.attach(user, "gw")
        return self.request(Dest("account", user),
                            AccountDeposit(reply_to=self.ref(), user=user, amount=amount,
                                           ts=self.now))

    def place(self, user: str, cid: str, side: str, price: int | None, qty: int,
              **kw: Any) -> Reply:
        order = NewOrder(
            order_id=self.engine.next_order_id(), user=user, client_order_id=cid,
            symbol="BTC-PERP", side=side, order_type="limit" if price else "market",
            price=price, qty=qty, ts=self.now, **kw,
        )
        return self.request(Dest("account", user),
                            AccountPlace(reply_to=self.ref(), order=order, ref_price=600000))

    def kinds(self, user: str) -> list[str]:
        return [e.kind for e in self.delivered.get(user, [])]


@pytest.fixture
def h(instruments: dict[str, Instrument]) -> Harness:
    h = Harness(instruments)
    one_million = int(1_000_000 / CASH_STEP)
    assert h.deposit("alice", one_million).ok
    assert h.deposit("bob", one_million).ok
    return h


def test_a_crossing_order_gives_both_users_their_events_in_order(h: Harness) -> None:
    maker = h.place("alice", "a1", "sell", 600010, 5)
    assert maker.ok
    assert maker.result is not None
    assert maker.result["status"] == "open"
    taker = h.place("bob", "b1", "buy", 600020, 3)
    assert taker.ok
    assert taker.result == {"order_id": 2, "client_order_id": "b1", "status": "filled"}
    assert h.kinds("alice") == [  # her order rested first: its frozen funds, then the fill
        "account_update", "order_accepted", "account_update", "trade_executed",
        "order_partially_filled", "position_update", "account_update",
    ]
    assert h.kinds("bob") == [
        "account_update", "order_accepted", "trade_executed", "order_filled",
        "position_update", "account_update",
    ]
    for user in ("alice", "bob"):
        seqs = [e.seq for e in h.delivered[user]]
        assert seqs == list(range(1, len(seqs) + 1))
    trade = h.delivered["bob"][2].data
    assert trade["price"] == "60001.0"
    assert trade["liquidity"] == "taker"
    assert h.engine.account("bob").ledger.position("BTC-PERP")[0] == 3
    assert h.engine.account("alice").ledger.position("BTC-PERP")[0] == -3
    kinds = {type(e).__name__ for e in h.market}
    assert {"BookDelta", "PublicTrade", "TickerUpdate"} <= kinds


def test_cancel_someone_elses_order_is_unknown_order(h: Harness) -> None:
    placed = h.place("alice", "a1", "sell", 600010, 5)
    assert placed.result is not None
    oid = placed.result["order_id"]
    theft = h.request(Dest("account", "bob"),
                      AccountCancel(reply_to=h.ref(), user="bob", order_id=oid, ts=h.now))
    assert (theft.ok, theft.code) == (False, "unknown_order")
    assert h.engine.books["BTC-PERP"].book.order(oid) is not None
    mine = h.request(Dest("account", "alice"),
                     AccountCancel(reply_to=h.ref(), user="alice", client_order_id="a1",
                                   ts=h.now))
    assert mine.ok
    assert mine.result == {"order_id": oid, "status": "canceled"}
    assert h.engine.account("alice").ledger.frozen == 0


def test_cancel_all_names_the_accounts_open_orders_to_the_book(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[CancelUserOrders] = []
    real = BookDesk.handle

    def spy(self: BookDesk, msg: Any) -> Any:
        if isinstance(msg, CancelUserOrders):
            seen.append(msg)
        return real(self, msg)

    monkeypatch.setattr(BookDesk, "handle", spy)
    mine = [h.place("alice", f"a{i}", "buy", 599_990 - i, 1) for i in range(3)]
    theirs = h.place("bob", "b1", "buy", 599_990, 2)
    assert all(r.ok for r in [*mine, theirs])
    done = h.request(Dest("account", "alice"),
                     AccountCancelAll(reply_to=h.ref(), user="alice", ts=h.now))
    assert done.result == {"canceled": 3}
    ids = sorted(r.result["order_id"] for r in mine)  # type: ignore[index]
    assert [(m.symbol, m.order_ids) for m in seen] == [("BTC-PERP", tuple(ids))]
    book = h.engine.books["BTC-PERP"].book
    assert book.open_orders("alice") == []
    assert [o.client_order_id for o in book.open_orders("bob")] == ["b1"]
    assert h.kinds("alice")[-4:-1] == ["order_canceled"] * 3
    assert h.engine.account("alice").ledger.frozen == 0


def test_an_account_forgets_old_closed_orders_but_not_their_client_order_ids(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import actors.cores.ledger

    monkeypatch.setattr(actors.cores.ledger, "CLOSED_KEPT", 2)
    placed = [h.place("alice", f"a{i}", "buy", 599_990 - i, 1) for i in range(4)]
    for r in placed:
        assert r.result is not None
        done = h.request(Dest("account", "alice"), AccountCancel(
            reply_to=h.ref(), user="alice", order_id=r.result["order_id"], ts=h.now))
        assert done.result == {"order_id": r.result["order_id"], "status": "canceled"}
    ledger = h.engine.account("alice").ledger
    first = placed[0].result["order_id"]  # type: ignore[index]
    assert ledger.order(first) is None  # forgotten: 2 closed orders are kept whole
    assert ledger.order(placed[3].result["order_id"]) is not None  # type: ignore[index]
    again = h.place("alice", "a0", "buy", 599_990, 1)
    assert again.result == {"order_id": first, "client_order_id": "a0",
                            "status": "canceled", "duplicate": True}
    gone = h.request(Dest("account", "alice"), AccountCancel(
        reply_to=h.ref(), user="alice", order_id=first, ts=h.now))
    assert (gone.ok, gone.code) == (False, "unknown_order")


def test_a_retried_place_returns_the_original_with_duplicate(h: Harness) -> None:
    first = h.place("alice", "a1", "sell", 600010, 5)
    again = h.place("alice", "a1", "sell", 600010, 5)
    assert first.result is not None
    assert again.result == {**first.result, "duplicate": True}
    assert len(h.engine.books["BTC-PERP"].book.open_orders("alice")) == 1


def test_risk_refusal_changes_nothing(h: Harness) -> None:
    before = list(h.delivered["alice"])
    refused = h.place("alice", "big", "buy", 600000, 10**9)
    assert (refused.ok, refused.code) in {(False, "insufficient_funds"), (False, "position_limit")}
    assert h.delivered["alice"] == before
    assert h.engine.account("alice").ledger.frozen == 0


def test_replay_returns_exactly_the_missed_events(h: Harness) -> None:
    h.place("alice", "a1", "sell", 600010, 5)
    h.place("bob", "b1", "buy", 600010, 2)
    everything = [e.to_wire() for e in h.delivered["bob"]]
    reply = h.request(Dest("router"), RouterReplay(reply_to=h.ref(), user="bob", after_seq=2))
    assert reply.result is not None
    assert reply.result["from_seq"] == 3
    assert [e.to_wire() for e in reply.result["events"]] == everything[2:]
    assert reply.result["to_seq"] == everything[-1]["seq"]
    bad = h.request(Dest("router"), RouterReplay(reply_to=h.ref(), user="bob", after_seq=999))
    assert (bad.ok, bad.code) == (False, "bad_request")


def test_replay_unavailable_once_the_log_moved_on(instruments: dict[str, Instrument]) -> None:
    h = Harness(instruments)
    h.engine = LocalEngine(instruments, on_gateway=h._gateway, replay_capacity=3,
                           conflation_window_ns=0)
    for _ in range(5):
        h.deposit("carol", 10)
    reply = h.request(Dest("router"), RouterReplay(reply_to=h.ref(), user="carol", after_seq=0))
    assert (reply.ok, reply.code) == (False, "replay_unavailable")
    with pytest.raises(RemoteProtocolError):
        h.engine.router.router.replay("carol", 0)


def test_a_book_desk_keeps_its_newest_public_trades_and_loads_without_them(
        instruments: dict[str, Instrument]) -> None:
    inst = instruments["BTC-PERP"]
    desk = BookDesk(inst)
    price = inst.ref_price
    for i in range(RECENT_TRADES + 3):  # a maker and a taker per trade
        for side, user in (("sell", "s"), ("buy", "b")):
            desk.handle(NewOrder(order_id=2 * i + (side == "buy") + 1, user=user,
                                 client_order_id=f"{side}{i}", symbol=inst.symbol, side=side,
                                 order_type="limit", price=price, qty=1, tif="gtc", ts=i + 1))
        desk.end_turn()
    kept = list(desk.recent_trades)
    assert [t.trade_id for t in kept] == list(range(4, RECENT_TRADES + 4))
    assert all(type(t) is PublicTrade for t in kept)
    assert list(pickle.loads(pickle.dumps(desk)).recent_trades) == kept
    # A desk pickled before it kept trades loads with none.
    old = BookDesk.__new__(BookDesk)
    state = dict(desk.__dict__)
    del state["recent_trades"]
    old.__setstate__(state)
    assert list(old.recent_trades) == [] and old.recent_trades.maxlen == RECENT_TRADES
