"""A ``trades`` subscription starts with a snapshot of the book's newest trades.

A public trade frame that never reached a client (its queue was full, it was
subscribing, or the trade fell just before the whole engine restarted, when no
gateway was there to publish it) used to be gone for good. The snapshot gives
the book's newest trades (``actors.desks.RECENT_TRADES``) as the first frame of
every trades subscription, so a client that resubscribes can fill what it lacks
by trade id.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from gateway_kit import Client, client, running_gateway
from test_gateway_book_restart import TRADES, _kill_book, _lose_first_trade, _order, _tape

from actors.cores.session import SessionConfig
from actors.desks import RECENT_TRADES
from gateway.server import Gateway, GatewayConfig


@contextlib.asynccontextmanager
async def _with_watcher(
    gw_config: GatewayConfig | None = None, *, data_dir: Path | None = None, enc: str = "json"
) -> AsyncIterator[tuple[Gateway, Client, Client, Client]]:
    """A gateway, alice and bob logged in to trade, and carol (``enc``, anonymous) to
    watch the market."""
    async with running_gateway(gw_config, data_dir=data_dir) as gw, \
            client(gw, "json") as alice, client(gw, "json") as bob, client(gw, enc) as carol:
        assert (await alice.call("login", user="alice", password="pw"))["ok"]
        assert (await bob.call("login", user="bob", password="pw"))["ok"]
        yield gw, alice, bob, carol


async def _trade(bob: Client, alice: Client, i: int) -> None:
    """bob sells, alice buys: one trade at 59000.0, alice the taker."""
    assert (await bob.call("place", **_order(f"s{i}", "sell")))["ok"]
    assert (await alice.call("place", **_order(f"b{i}", "buy")))["ok"]


async def _snapshot(c: Client) -> dict[str, Any]:
    """``c``'s newest trades snapshot (it may have come in while ``call`` waited)."""
    with trio.fail_after(10):
        while True:
            snaps = [f for f in c.market if f["channel"] == TRADES and f["kind"] == "snapshot"]
            if snaps:
                return snaps[-1]
            await c.frame()


async def _fills(c: Client, n: int) -> None:
    """Read ``c``'s frames until it holds ``n`` ``trade_executed`` events: the book's
    turns that made those trades are over, so its newest trades include them."""
    with trio.fail_after(10):
        while sum(e["kind"] == "trade_executed" for e in c.private) < n:
            await c.frame()


@pytest.mark.parametrize("enc", ["json", "cbor"])
async def test_a_trades_subscription_starts_with_the_newest_trades(enc: str) -> None:
    async with _with_watcher(enc=enc) as (_gw, alice, bob, carol):
        for i in range(2):
            await _trade(bob, alice, i)
        await _fills(alice, 2)
        assert (await carol.call("subscribe", channels=[TRADES]))["ok"]
        snap = await _snapshot(carol)
        assert snap["seq"] == 1
        rows = snap["data"]["trades"]
        assert [(r["trade_id"], r["price"], r["qty"], r["taker_side"]) for r in rows] == [
            (1, "59000.0", "0.001", "buy"), (2, "59000.0", "0.001", "buy")]
        assert all(isinstance(r["ts"], int) and r["ts"] <= snap["ts"] for r in rows)
        # Live trades follow on the same subscription, after the snapshot's.
        await _trade(bob, alice, 2)
        live = await _tape(carol, 1)
        assert [(f["seq"], f["data"]["trade_id"]) for f in live] == [(2, 3)]


async def test_a_resubscription_brings_back_a_trade_the_client_missed() -> None:
    async with _with_watcher() as (_gw, alice, bob, carol):
        assert (await carol.call("subscribe", channels=[TRADES]))["ok"]
        assert (await carol.call("unsubscribe", channels=[TRADES]))["ok"]
        await _trade(bob, alice, 0)  # while carol is away
        await _fills(alice, 1)
        carol.market.clear()
        assert (await carol.call("subscribe", channels=[TRADES]))["ok"]
        snap = await _snapshot(carol)
        assert snap["seq"] == 1 and [r["trade_id"] for r in snap["data"]["trades"]] == [1]


async def test_the_snapshot_holds_at_most_the_books_recent_trades() -> None:
    # One taker order sweeping RECENT_TRADES + 5 resting orders: that many trades.
    n = RECENT_TRADES + 5
    unlimited = GatewayConfig(session=SessionConfig(rate_per_s=1_000_000, burst=1_000_000))
    async with _with_watcher(unlimited) as (_gw, alice, bob, carol):
        for i in range(n):
            r = await bob.call("place", **_order(f"s{i}", "sell"))
            assert r["ok"], r
        big = dict(_order("sweep", "buy"), qty=f"{n / 1000:.3f}", tif="ioc")
        assert (await alice.call("place", **big))["ok"]
        await _fills(alice, n)
        assert (await carol.call("subscribe", channels=[TRADES]))["ok"]
        ids = [r["trade_id"] for r in (await _snapshot(carol))["data"]["trades"]]
        assert ids == list(range(n - RECENT_TRADES + 1, n + 1))


async def test_a_late_trade_is_not_sent_to_a_subscriber_whose_snapshot_held_it(
        tmp_path: Path) -> None:
    # Trade 2 never reaches the gateway (a killed book's last send); carol subscribes
    # after it, so her snapshot has it; the book's restart resends it: alice, who
    # subscribed before, gets it late, carol not a second time.
    async with _with_watcher(data_dir=tmp_path) as (gw, alice, bob, carol):
        assert (await alice.call("subscribe", channels=[TRADES]))["ok"]
        lost = _lose_first_trade(gw, trade_id=2)
        for i in range(3):
            await _trade(bob, alice, i)
        assert [f["data"]["trade_id"] for f in await _tape(alice, 2)] == [1, 3]
        assert [t.trade_id for t in lost] == [2]
        assert (await carol.call("subscribe", channels=[TRADES]))["ok"]
        snap = await _snapshot(carol)
        assert [r["trade_id"] for r in snap["data"]["trades"]] == [1, 2, 3]
        await _kill_book(gw)
        assert [f["data"]["trade_id"] for f in await _tape(alice, 3)] == [1, 3, 2]
        assert (await carol.call("ping"))["type"] == "pong"
        await _trade(bob, alice, 3)  # the book is back; a new trade reaches both
        assert [f["data"]["trade_id"] for f in await _tape(carol, 1)] == [4]
        assert [f["data"]["trade_id"] for f in await _tape(alice, 4)] == [1, 3, 2, 4]


async def test_a_trade_just_before_an_engine_restart_is_in_the_next_snapshot(
        tmp_path: Path) -> None:
    # The trade is journaled but the gateway never publishes it, as when the whole
    # engine stops right after the book's turn; booted again on the same data, the
    # book still has it among its newest trades.
    async with running_gateway(data_dir=tmp_path) as gw, client(gw, "json") as alice, \
            client(gw, "json") as bob:
        assert (await alice.call("login", user="alice", password="pw"))["ok"]
        assert (await bob.call("login", user="bob", password="pw"))["ok"]
        lost = _lose_first_trade(gw)
        await _trade(bob, alice, 0)
        with trio.fail_after(10):
            while not lost:
                await alice.frame()
        assert gw.trades == 0
    async with running_gateway(data_dir=tmp_path) as gw, client(gw, "json") as carol:
        assert (await carol.call("subscribe", channels=[TRADES]))["ok"]
        snap = await _snapshot(carol)
        assert [(r["trade_id"], r["ts"]) for r in snap["data"]["trades"]] == [
            (lost[0].trade_id, lost[0].ts)]
