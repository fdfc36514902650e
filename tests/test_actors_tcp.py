"""The same actors under multiprocTCPBase: order → fill → events, and kill -9 recovery."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

from engine_kit import Trader, engine, inspect

from actors.runtime import RuntimeActorIdentity, RuntimeWhoAreYou
from protocol import CASH_STEP

BASE = "multiprocTCPBase"
MILLION = int(1_000_000 / CASH_STEP)


def _pid(t: Trader, host_id: str) -> int:
    t.link.refresh()
    ident = t.link.asys.ask(t.link.directory.hosts[host_id], RuntimeWhoAreYou(),
                            timedelta(seconds=10))
    assert isinstance(ident, RuntimeActorIdentity), ident
    assert ident.pid != os.getpid()  # a process of its own
    return ident.pid


def _setup(t: Trader) -> None:
    for user in ("alice", "bob"):
        t.link.attach(user)
        assert t.deposit(user, MILLION).ok
    assert t.place("alice", "a1", "sell", 600010, 5).ok
    reply = t.place("bob", "b1", "buy", 600020, 3)
    assert reply.result is not None
    assert reply.result["status"] == "filled"
    t.wait_events("alice", 7)  # her resting order's accept is followed by an account_update
    t.wait_events("bob", 6)


def test_order_fill_events_across_processes(tmp_path: Path) -> None:
    with engine(BASE, tmp_path, account_shards=2) as t:
        _setup(t)
        assert t.kinds("bob") == [
            "account_update", "order_accepted", "trade_executed", "order_filled",
            "position_update", "account_update"]
        assert t.seqs("alice") == [1, 2, 3, 4, 5, 6, 7]
        # Placement: two account shards host every account; the book has its own process.
        assert t.link.directory.account_shards == ("accounts:0", "accounts:1")
        pids = {_pid(t, h) for h in ("accounts:0", "accounts:1", "book:BTC-PERP", "router")}
        assert len(pids) == 4


def test_kill_9_of_a_book_and_an_account_process(tmp_path: Path) -> None:
    with engine(BASE, tmp_path, account_shards=2) as t:
        _setup(t)
        book_before = inspect(t.link, "book:BTC-PERP")["BTC-PERP"].book.depth()

        os.kill(_pid(t, "book:BTC-PERP"), signal.SIGKILL)
        t.wait_events("alice", 8)  # alice rested an order there: she gets resync
        assert t.events["alice"][7].data["kind"] == "resync"
        assert inspect(t.link, "book:BTC-PERP")["BTC-PERP"].book.depth() == book_before

        shard = t.link.directory.accounts.get("bob") or next(
            h for h in t.link.directory.account_shards if "bob" in inspect(t.link, h))
        os.kill(_pid(t, shard), signal.SIGKILL)
        t.wait_events("bob", 7)
        assert t.events["bob"][-1].data["kind"] == "resync"
        t.link.refresh()
        assert t.query("bob", "positions")["positions"][0]["long_qty"] == "0.003"

        # Nothing lost, nothing doubled: trading goes on with gapless seqs.
        assert t.place("bob", "b2", "buy", 600010, 2).ok
        t.wait_events("bob", 12)
        for user in ("alice", "bob"):
            assert t.seqs(user) == list(range(1, len(t.seqs(user)) + 1)), t.kinds(user)
        assert t.kinds("bob").count("trade_executed") == 2
