"""The gateway over real sockets on 127.0.0.1 (pytest-trio), embedded engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from gateway_kit import client, running_gateway

from gateway.server import Gateway


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    async with running_gateway() as gw:
        yield gw


@pytest.mark.parametrize("enc", ["json", "cbor"])
async def test_order_lifecycle_for_two_users(gateway: Gateway, enc: str) -> None:
    async with client(gateway, enc) as alice, client(gateway, enc) as bob:
        assert (await alice.call("ping"))["type"] == "pong"
        login = await alice.call("login", user="alice", password="pw")
        assert login["ok"], login
        assert login["result"]["user"] == "alice"
        assert (await bob.call("login", user="bob", password="pw"))["ok"]
        sell = await alice.call("place", client_order_id="a1", symbol="BTC-PERP", side="sell",
                                type="limit", price="60001.0", qty="0.005")
        assert sell["ok"], sell
        assert sell["result"]["status"] == "open"
        buy = await bob.call("place", client_order_id="b1", symbol="BTC-PERP", side="buy",
                             type="limit", price="60002.0", qty="0.003")
        assert buy["result"]["status"] == "filled"
        bob_events = await bob.events_until(5)
        kinds = [e["kind"] for e in bob_events]
        assert kinds[:4] == ["order_accepted", "trade_executed", "order_filled",
                             "position_update"]
        seqs = [e["seq"] for e in bob_events]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        trade = bob_events[1]["data"]
        assert (trade["price"], trade["qty"], trade["liquidity"]) == ("60001.0", "0.003", "taker")
        alice_events = await alice.events_until(4)
        assert "order_partially_filled" in [e["kind"] for e in alice_events]
        positions = await bob.call("query", what="positions")
        assert positions["result"]["positions"][0]["long_qty"] == "0.003"
        # Isolation: bob cannot cancel alice's order, and saw none of her events.
        theft = await bob.call("cancel", order_id=sell["result"]["order_id"])
        assert theft["error"]["code"] == "unknown_order"
        assert all(e["kind"] != "order_partially_filled" for e in bob.private)
        mine = await alice.call("cancel", client_order_id="a1")
        assert mine["result"]["status"] == "canceled"
        again = await alice.call("place", client_order_id="a1", symbol="BTC-PERP", side="sell",
                                 type="limit", price="60001.0", qty="0.005")
        assert again["result"]["duplicate"] is True


async def test_errors_are_typed_and_keep_the_connection(gateway: Gateway) -> None:
    async with client(gateway, "json") as c:
        r = await c.call("place", client_order_id="x", symbol="BTC-PERP", side="buy",
                         type="limit", price="1.0", qty="1")
        assert r["error"]["code"] == "not_logged_in"
        await c.ws.send_message("{not json")
        f = await c.frame()
        assert f["error"]["code"] == "bad_frame"
        assert (await c.call("teleport"))["error"]["code"] == "unknown_op"
        bad = await c.call("login", user="alice", password="nope")
        assert bad["error"]["code"] == "auth_failed"
        assert (await c.call("login", user="alice", password="pw"))["ok"]
        off = await c.call("place", client_order_id="x", symbol="BTC-PERP", side="buy",
                           type="limit", price="60000.05", qty="0.001")
        assert off["error"]["code"] == "invalid_price"
        poor = await c.call("place", client_order_id="y", symbol="ESZ6", side="buy",
                            type="limit", price="6000.00", qty="400")
        assert poor["error"]["code"] == "insufficient_funds"
        big = await c.call("place", client_order_id="z", symbol="BTC-PERP", side="buy",
                           type="limit", price="60000.0", qty="100.001")
        assert big["error"]["code"] == "position_limit"
        assert (await c.call("place", client_order_id="q", symbol="DOGE", side="buy",
                             type="limit", price="1", qty="1"))["error"]["code"] == "unknown_symbol"
        assert (await c.call("query", what="instruments"))["ok"]


async def test_book_snapshot_then_deltas(gateway: Gateway) -> None:
    async with client(gateway, "json") as alice, client(gateway, "json") as watcher:
        await alice.call("login", user="alice", password="pw")
        await alice.call("place", client_order_id="s1", symbol="ETH-PERP", side="sell",
                         type="limit", price="3001.00", qty="1.00")
        await watcher.call("subscribe", channels=["book.ETH-PERP", "trades.ETH-PERP"])
        while not watcher.market:
            await watcher.frame()
        snap = watcher.market[0]
        assert (snap["kind"], snap["seq"]) == ("snapshot", 1)
        assert ["3001.00", "1.00"] in snap["data"]["asks"]
        await alice.call("place", client_order_id="s2", symbol="ETH-PERP", side="sell",
                         type="limit", price="3002.00", qty="2.00")
        while len([m for m in watcher.market if m["channel"] == "book.ETH-PERP"]) < 2:
            await watcher.frame()
        book = [m for m in watcher.market if m["channel"] == "book.ETH-PERP"]
        assert book[1]["seq"] == 2
        assert book[1]["data"]["asks"] == [["3002.00", "2.00"]]


async def test_reconnect_and_resume_without_gap_or_duplicate(gateway: Gateway) -> None:
    async with client(gateway, "json") as carol:
        await carol.call("login", user="carol", password="pw")
        async with client(gateway, "cbor") as alice:
            await alice.call("login", user="alice", password="pw")
            for i in range(5):
                await alice.call("place", client_order_id=f"r{i}", symbol="BTC-PERP",
                                 side="sell", type="limit", price="60010.0", qty="0.001")
            held = await alice.events_until(5)
            last_held = held[4]["seq"]
        # While alice is away, carol trades against her: events alice must not lose.
        for i in range(3):
            await carol.call("place", client_order_id=f"c{i}", symbol="BTC-PERP", side="buy",
                             type="limit", price="60010.0", qty="0.001")
        async with client(gateway, "cbor") as alice2:
            login = await alice2.call("login", user="alice", password="pw")
            newest = login["result"]["last_seq"]
            assert newest > last_held
            resumed = await alice2.call("resume", after_seq=last_held)
            assert resumed["result"]["from_seq"] == last_held + 1
            await carol.call("place", client_order_id="c9", symbol="BTC-PERP", side="buy",
                             type="limit", price="60010.0", qty="0.001")  # live, after resume
            while not alice2.private or alice2.private[-1]["seq"] < newest + 1:
                await alice2.frame()
            seqs = [e["seq"] for e in alice2.private]
            assert seqs == list(range(last_held + 1, seqs[-1] + 1))  # no gap, no duplicate


def test_order_ids_are_unique_and_exact_in_json() -> None:
    import time

    from gateway.server import OrderIds

    ids = OrderIds(time.time_ns())
    got = [ids.next() for _ in range(200_000)]  # crosses a 65,536 rollover
    assert len(set(got)) == len(got)
    assert got == sorted(got)
    assert max(got) < 2**53
    later = OrderIds(time.time_ns() + 10**9)
    assert later.next() > got[0]


async def test_market_fan_out_reaches_exactly_the_subscribers() -> None:
    async with running_gateway() as gw:
        async with client(gw, "json") as sub, client(gw, "cbor") as other, \
                client(gw, "json") as alice, client(gw, "json") as bob:
            assert (await sub.call("subscribe", channels=["trades.BTC-PERP"]))["ok"]
            assert (await other.call("subscribe", channels=["trades.BTC-PERP"]))["ok"]
            assert (await other.call("unsubscribe", channels=["trades.BTC-PERP"]))["ok"]
            await alice.call("login", user="alice", password="pw")
            await bob.call("login", user="bob", password="pw")
            await alice.call("place", client_order_id="s1", symbol="BTC-PERP", side="sell",
                             type="limit", qty="0.001", price="60000.0")
            await bob.call("place", client_order_id="b1", symbol="BTC-PERP", side="buy",
                           type="market", qty="0.001")
            while not sub.market:
                await sub.frame()
            assert sub.market[0]["channel"] == "trades.BTC-PERP"
            assert len(gw._subscribers["trades.BTC-PERP"]) == 1
            # The trade went out before the pong: the unsubscribed one got no market frame.
            assert (await other.call("ping"))["type"] == "pong"
            assert not other.market
        # Closed connections leave the index.
        with trio.fail_after(10):
            while gw.conns:
                await trio.testing.wait_all_tasks_blocked()
        assert not any(gw._subscribers.values())


async def test_a_resume_reads_back_the_events_the_router_stored_in_the_journal(
        tmp_path: Path) -> None:
    # The router keeps a user's older events only in the journal (frozen 32-event
    # chunks): a resume from the start must still return exactly what was delivered.
    from engine_kit import inspect

    from simulations.harness import call_on_bridge

    async with running_gateway(data_dir=tmp_path) as gw:
        async with client(gw, "cbor") as alice:
            await alice.call("login", user="alice", password="pw")
            for i in range(40):
                assert (await alice.call(
                    "place", client_order_id=f"k{i}", symbol="BTC-PERP", side="sell",
                    type="limit", price="60010.0", qty="0.001"))["ok"]
            live = await alice.events_until(80)
        log = (await call_on_bridge(gw.bridge, lambda link: inspect(link, "router")))[
            ""].router._lanes["alice"].log
        assert log.stored >= 2 and log.stored_first == 1  # not in the router's memory
        async with client(gw, "json") as again:
            await again.call("login", user="alice", password="pw")
            resumed = await again.call("resume", after_seq=0)
            assert resumed["ok"] and resumed["result"]["from_seq"] == 1
            first = live[0]["seq"]  # the deposit's account_update came before the login
            replayed = await again.events_until(first - 1 + len(live))
        assert [e["seq"] for e in replayed] == list(range(1, len(replayed) + 1))
        same = replayed[first - 1:first - 1 + len(live)]
        assert [(e["seq"], e["kind"], e["data"]) for e in same] == [
            (e["seq"], e["kind"], e["data"]) for e in live]
