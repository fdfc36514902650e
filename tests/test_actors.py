"""The actor engine under simpleSystemBase: flow, transactional retry, restarts, recovery."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from engine_kit import engine, inspect

from actors.host import HostFault, HostStats, HostStatsQuery
from actors.messages import (
    AccountDeposit,
    BookSnapshotRequest,
    Dest,
    Reply,
    ReplyTo,
    RouterReplay,
)
from protocol import CASH_STEP

BASE = "simpleSystemBase"
MILLION = int(1_000_000 / CASH_STEP)


def _cross(t: engine, *, a: str = "alice", b: str = "bob") -> None:  # type: ignore[valid-type]
    t.link.attach(a)
    t.link.attach(b)
    assert t.deposit(a, MILLION).ok
    assert t.deposit(b, MILLION).ok
    assert t.place(a, "a1", "sell", 600010, 5).ok
    reply = t.place(b, "b1", "buy", 600020, 3)
    assert reply.result is not None
    assert reply.result["status"] == "filled"


def test_a_crossing_order_gives_both_users_the_full_sequence() -> None:
    with engine(BASE) as t:
        _cross(t)
        alice = t.wait_events("alice", 7)
        bob = t.wait_events("bob", 6)
        # Alice's order rested first (its frozen funds: an account_update), then filled;
        # bob's filled in the turn it was accepted (one account_update after all of it).
        assert [e.kind for e in alice] == [
            "account_update", "order_accepted", "account_update", "trade_executed",
            "order_partially_filled", "position_update", "account_update"]
        assert [e.kind for e in bob] == [
            "account_update", "order_accepted", "trade_executed", "order_filled",
            "position_update", "account_update"]
        assert t.seqs("alice") == [1, 2, 3, 4, 5, 6, 7]
        assert t.seqs("bob") == [1, 2, 3, 4, 5, 6]
        # Ledger effects, as the accounts hold them.
        assert t.query("bob", "positions")["positions"][0]["long_qty"] == "0.003"
        fee = bob[2].data["fee"]
        assert fee == "0.0901"  # 3 lots * 60001.0 * 0.001 = 180.003, taker 5 bp, ceil
        desks = inspect(t.link, "account:alice")
        assert desks["alice"].ledger.position("BTC-PERP")[0] == -3
        assert t.market, "market data reached the gateway"


def test_a_handler_that_raises_is_retried_without_double_apply() -> None:
    with engine(BASE) as t:
        t.link.attach("alice")
        t.link.attach("bob")
        t.deposit("alice", MILLION)
        t.deposit("bob", MILLION)
        t.place("alice", "a1", "sell", 600010, 5)
        t.link.refresh()
        # The next batch the book handles raises after applying, before its commit.
        t.link.asys.tell(t.link.directory.hosts["book:BTC-PERP"], HostFault(mode="raise_once"))
        assert t.place("bob", "b1", "buy", 600010, 2).ok
        t.wait_events("bob", 6)
        t.pump()
        book = inspect(t.link, "book:BTC-PERP")["BTC-PERP"].book
        assert book.depth()[1] == [(600010, 3)]  # 5 - 2, not 5 - 4
        assert t.kinds("bob").count("trade_executed") == 1
        assert t.seqs("bob") == list(range(1, len(t.seqs("bob")) + 1))
        alice = inspect(t.link, "account:alice")["alice"].ledger
        assert alice.position("BTC-PERP")[0] == -2


def test_a_killed_account_is_rebuilt_from_the_journal(tmp_path: Path) -> None:
    with engine(BASE, tmp_path) as t:
        _cross(t)
        t.wait_events("alice", 7)
        before = t.query("alice", "account")
        positions = t.query("alice", "positions")
        t.link.refresh()
        t.link.asys.tell(t.link.directory.hosts["account:alice"], HostFault(mode="exit"))
        t.pump()
        t.link.refresh()
        assert t.query("alice", "account") == before
        assert t.query("alice", "positions") == positions
        events = t.wait_events("alice", 8)
        assert events[7].kind == "system_notice"
        assert events[7].data["kind"] == "resync"
        assert t.seqs("alice") == list(range(1, 9))
        # Trading goes on: alice's resting order still fills.
        assert t.place("bob", "b2", "buy", 600010, 2).ok
        t.wait_events("alice", 12)
        assert t.seqs("alice") == list(range(1, len(t.seqs("alice")) + 1))


def test_a_killed_book_keeps_its_orders(tmp_path: Path) -> None:
    with engine(BASE, tmp_path) as t:
        _cross(t)
        t.link.refresh()
        t.link.asys.tell(t.link.directory.hosts["book:BTC-PERP"], HostFault(mode="exit"))
        t.pump()
        book = inspect(t.link, "book:BTC-PERP")["BTC-PERP"].book
        assert book.depth()[1] == [(600010, 2)]
        t.wait_events("alice", 7)
        assert "system_notice" in t.kinds("alice")  # alice had a resting order there


def test_the_whole_engine_restarts_on_the_same_data_dir(tmp_path: Path) -> None:
    with engine(BASE, tmp_path) as t:
        _cross(t)
        t.wait_events("bob", 6)
        state = {u: (t.query(u, "account"), t.query(u, "positions"), t.query(u, "orders"))
                 for u in ("alice", "bob")}
        seqs = {u: t.seqs(u)[-1] for u in ("alice", "bob")}
    with engine(BASE, tmp_path, first_order_id=100) as t2:
        for u in ("alice", "bob"):
            t2.link.attach(u)
            assert (t2.query(u, "account"), t2.query(u, "positions"),
                    t2.query(u, "orders")) == state[u]
        router = inspect(t2.link, "router")[""].router
        assert {u: router.last_seq(u) for u in ("alice", "bob")} == seqs
        # A retried place after the restart is still a duplicate.
        again = t2.place("alice", "a1", "sell", 600010, 5)
        assert again.result is not None
        assert again.result["duplicate"] is True


def test_a_torn_journal_tail_is_reported_and_not_applied(tmp_path: Path) -> None:
    with engine(BASE, tmp_path) as t:
        t.link.attach("alice")
        t.deposit("alice", MILLION)
        t.deposit("alice", 5)
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    (last,) = db.execute(
        "SELECT max(seq) FROM records WHERE stream = 'host:account:alice'").fetchone()
    db.execute("UPDATE records SET payload = substr(payload, 1, 10) "
               "WHERE stream = 'host:account:alice' AND seq = ?", (last,))
    db.commit()
    db.close()
    from engine_kit import config

    from actors.boot import boot_engine
    from actors.runtime import running_system

    with running_system(BASE) as asys:
        ready = boot_engine(asys, config(tmp_path))
        assert ready.recovered_turns > 0
        from engine_kit import Trader

        from actors.boot import EngineLink

        t2 = Trader(EngineLink(asys, "t2"))
        account = t2.query("alice", "account")
        assert account["balance"] == "1000000.0000"  # the torn +5 deposit was discarded


def test_message_class_names_are_unique_across_the_project() -> None:
    import importlib
    import inspect as pyinspect
    import pkgutil

    import actors
    import gateway
    import protocol
    import simulations

    seen: dict[str, str] = {}
    dupes = []
    for pkg in (protocol, actors, gateway, simulations):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            module = importlib.import_module(mod.name)
            for name, obj in vars(module).items():
                if pyinspect.isclass(obj) and obj.__module__ == module.__name__:
                    if name in seen and seen[name] != module.__name__:
                        dupes.append((name, seen[name], module.__name__))
                    seen[name] = module.__name__
    assert not dupes, dupes


@pytest.mark.parametrize("mode", ["bogus"])
def test_unknown_fault_modes_are_ignored(mode: str) -> None:
    with engine(BASE) as t:
        t.link.refresh()
        t.link.asys.tell(t.link.directory.hosts["router"], HostFault(mode=mode))
        t.link.attach("alice")
        assert t.deposit("alice", 1).ok


@pytest.mark.parametrize("factor", [1, 10**9])
def test_hosts_recover_from_snapshots_paced_by_journal_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factor: int
) -> None:
    import actors.host

    monkeypatch.setattr(actors.host, "SNAPSHOT_EVERY", 2)
    monkeypatch.setattr(actors.host, "SNAPSHOT_BYTES_FACTOR", factor)
    with engine(BASE, tmp_path) as t:
        _cross(t)
        for i in range(4):
            assert t.place("alice", f"a{i + 2}", "sell", 600010 + i, 1).ok
            assert t.place("bob", f"b{i + 2}", "buy", 600030, 1).ok
        t.wait_events("alice", 6)
        state = {u: (t.query(u, "account"), t.query(u, "positions"), t.query(u, "orders"))
                 for u in ("alice", "bob")}
        seqs = {u: inspect(t.link, "router")[""].router.last_seq(u) for u in ("alice", "bob")}
        db = sqlite3.connect(tmp_path / "journal.sqlite3")
        counts = dict(db.execute("SELECT stream, count(*) FROM snapshots GROUP BY stream"))
        oldest_snapshot = dict(db.execute("SELECT stream, min(seq) FROM snapshots GROUP BY stream"))
        first_record = dict(db.execute("SELECT stream, min(seq) FROM records GROUP BY stream"))
        db.close()
        if factor == 1:
            # A snapshot costs about its records' bytes: hosts snapshot again and again,
            # and each snapshot turn compacts the journal up to the previous snapshot:
            # two snapshots stay, with the records after the older one.
            assert counts["host:router"] == counts["host:account:alice"] == 2
            for stream in ("host:router", "host:account:alice", "host:book:BTC-PERP"):
                assert first_record[stream] == oldest_snapshot[stream] + 1 > 2
        else:
            # Never enough records to pay for another snapshot: only the first one.
            assert counts["host:router"] == 1
            assert counts["host:account:alice"] == 1
        t.link.refresh()
        for host in ("account:alice", "account:bob", "router", "book:BTC-PERP"):
            t.link.asys.tell(t.link.directory.hosts[host], HostFault(mode="exit"))
            t.pump()
            t.link.refresh()
        for u in ("alice", "bob"):
            assert (t.query(u, "account"), t.query(u, "positions"), t.query(u, "orders")) \
                == state[u]
        router = inspect(t.link, "router")[""].router
        # Each restart notified the users (resync), after the seqs they had.
        assert all(router.last_seq(u) > seqs[u] for u in ("alice", "bob"))


def test_a_failed_commit_sends_nothing_and_the_host_is_rebuilt(tmp_path: Path) -> None:
    # Write-ahead: a turn whose journal commit fails must not emit (a Thespian re-run
    # used to find nothing staged and send the outputs anyway). The book dies
    # instead; the account's unacked batch is resent to the re-created book, which
    # applies it once.
    with engine(BASE, tmp_path) as t:
        _cross(t)  # alice rests 2 lots at 600010
        t.wait_events("alice", 6)
        t.link.refresh()
        t.link.asys.tell(t.link.directory.hosts["book:BTC-PERP"], HostFault(mode="commit_fails"))
        reply = t.place("bob", "b2", "buy", 600010, 2)
        assert reply.ok and reply.result is not None
        assert reply.result["status"] == "filled"
        alice = t.wait_events("alice", 11)
        trades = [e for e in alice if e.kind == "trade_executed"]
        assert len(trades) == 2  # the first cross and b2's fill: once, not twice
        book = inspect(t.link, "book:BTC-PERP")["BTC-PERP"].book
        assert book.depth() == ([], [])
        assert t.seqs("alice") == list(range(1, len(t.seqs("alice")) + 1))
        # And the fill is durable: a book rebuilt from the journal agrees.
        t.link.refresh()
        t.link.asys.tell(t.link.directory.hosts["book:BTC-PERP"], HostFault(mode="exit"))
        t.pump()
        assert inspect(t.link, "book:BTC-PERP")["BTC-PERP"].book.depth() == ([], [])


def test_a_host_killed_right_after_a_snapshot_turn_numbers_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every turn snapshots, so each kill lands right after a snapshot turn with no
    # journal record after it. The snapshot must carry the channel seqs *after* that
    # turn's sends (and its batches for resending): a host that came back with the
    # seqs before them numbered its next batches with seqs the receivers had seen and
    # dropped as resends — alice's resync and fills never reached the router.
    import actors.host

    monkeypatch.setattr(actors.host, "SNAPSHOT_EVERY", 1)
    monkeypatch.setattr(actors.host, "SNAPSHOT_BYTES_FACTOR", 0)
    with engine(BASE, tmp_path) as t:
        _cross(t)  # alice rests 2 lots at 600010
        t.wait_events("alice", 7)
        t.link.refresh()
        t.link.asys.tell(t.link.directory.hosts["account:alice"], HostFault(mode="exit"))
        t.pump()
        t.link.refresh()
        events = t.wait_events("alice", 8)
        assert events[7].kind == "system_notice"
        assert t.place("bob", "b2", "buy", 600010, 2).ok
        alice = t.wait_events("alice", 12)
        assert [e.kind for e in alice[8:12]] == [
            "trade_executed", "order_filled", "position_update", "account_update"]
        assert t.seqs("alice") == list(range(1, len(t.seqs("alice")) + 1))
        # And the book, killed right after its snapshot turn, still answers the account.
        t.link.refresh()
        t.link.asys.tell(t.link.directory.hosts["book:BTC-PERP"], HostFault(mode="exit"))
        t.pump()
        t.link.refresh()
        assert t.place("alice", "a9", "sell", 600040, 1).ok
        assert t.place("bob", "b9", "buy", 600040, 1).ok
        assert t.query("bob", "positions")["positions"][0]["long_qty"] == "0.006"


def _router_turns(t: Any) -> int:
    t.link.refresh()
    stats = t.link.asys.ask(t.link.directory.hosts["router"], HostStatsQuery(),
                            timedelta(seconds=10))
    assert isinstance(stats, HostStats), stats
    return stats.turns


@pytest.mark.parametrize("group_commit", ["turn", "pass"])
def test_grouped_turns_apply_what_is_queued_in_one_turn_and_recover_it(
    tmp_path: Path, group_commit: str
) -> None:
    # One send with a deposit for each of 8 users reaches 8 account hosts, and each
    # sends the router one batch. Per-batch turns (group_commit "turn", a tell per
    # host): 8 router turns. Grouped turns ("pass" with a fan-out link, the embedded
    # deployment): the router applies the 8 batches queued for it in one turn,
    # journaled as one record; a router rebuilt from that record holds the same events.
    users = [f"u{i}" for i in range(8)]
    with engine(BASE, tmp_path, group_commit=group_commit) as t:
        # The embedded bridge's link: a send goes whole to the Exchange, which splits it.
        t.link.fanout = group_commit == "pass"
        for u in users:
            t.link.attach(u)
            assert t.deposit(u, 1).ok  # creates the account host
            t.wait_events(u, 1)
        turns = _router_turns(t)
        rids = {u: next(t.ids) for u in users}
        t.link.send([(Dest("account", u), AccountDeposit(
            reply_to=ReplyTo(gateway=t.link.gateway_id, conn=1, request_id=rids[u]),
            user=u, amount=MILLION + i, ts=1)) for i, u in enumerate(users)])
        for u in users:
            t.wait_events(u, 2)
        assert all(t.replies[rids[u]].ok for u in users)
        assert _router_turns(t) - turns == (1 if group_commit == "pass" else len(users))
        assert {u: t.kinds(u) for u in users} == {u: ["account_update"] * 2 for u in users}
        t.link.refresh()
        t.link.asys.tell(t.link.directory.hosts["router"], HostFault(mode="exit"))
        t.pump()
        for i, u in enumerate(users):
            reply = t.request(Dest("router"), lambda r, u=u: RouterReplay(
                reply_to=r, user=u, after_seq=0))
            assert reply.ok and reply.result is not None
            event = [e for e in reply.result["events"] if e.kind == "account_update"][-1]
            assert event.seq == 2
            assert event.data["balance"] == t.query(u, "account")["balance"]
            assert Decimal(event.data["balance"]) == (MILLION + i + 1) * CASH_STEP


def test_a_fanned_out_request_for_an_unknown_book_is_answered_not_dropped() -> None:
    # The Exchange splits a fan-out link's pass per host; an item for a book the engine
    # does not have used to vanish there (the per-host link raised instead). Now its
    # requester gets unknown_symbol, and the rest of the pass goes on.
    with engine(BASE, group_commit="pass") as t:
        t.link.fanout = True
        t.link.attach("alice")
        bad, good = next(t.ids), next(t.ids)
        t.link.send([
            (Dest("book", "NOPE-PERP"), BookSnapshotRequest(
                reply_to=ReplyTo(gateway=t.link.gateway_id, conn=1, request_id=bad),
                symbol="NOPE-PERP", ts=1)),
            (Dest("account", "alice"), AccountDeposit(
                reply_to=ReplyTo(gateway=t.link.gateway_id, conn=1, request_id=good),
                user="alice", amount=MILLION, ts=1)),
        ])
        t._take(t.link.wait_for(lambda got: {good, bad} <= {
            m.reply_to.request_id for m in got if isinstance(m, Reply)}))
        assert t.replies[good].ok
        assert not t.replies[bad].ok
        assert t.replies[bad].code == "unknown_symbol"


def test_opening_accounts_tells_the_hosts_that_route_to_accounts_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A new one-user account host used to be announced to every host, accounts
    # included: N accounts cost N²/2 directory updates (4.4 s for 1,000).
    import collections

    from actors.host import Host

    got: collections.Counter[str] = collections.Counter()
    real = Host.receiveMsg_DirectoryUpdate

    def counting(self: Host, msg: Any, sender: Any) -> None:
        got[self.host_id] += 1
        real(self, msg, sender)

    monkeypatch.setattr(Host, "receiveMsg_DirectoryUpdate", counting)
    with engine(BASE) as t:
        got.clear()
        users = [f"u{i}" for i in range(10)]
        for u in users:
            t.link.open_account(u)
        assert got["book:BTC-PERP"] == 10 and got["router"] == 10
        assert not any(got[f"account:{u}"] for u in users)
        # They trade with each other all the same: the book knows every account.
        for u in users[:2]:
            assert t.deposit(u, MILLION).ok
        assert t.place("u0", "a", "sell", 600010, 1).ok
        assert t.place("u1", "b", "buy", 600010, 1).result["status"] == "filled"  # type: ignore[index]
        # A restart still reaches every host: each resends what the dead one lacks.
        got.clear()
        t.link.refresh()
        t.link.asys.tell(t.link.directory.hosts["book:BTC-PERP"], HostFault(mode="exit"))
        t.pump()
        assert all(got[f"account:{u}"] == 1 for u in users), got


def test_a_batch_that_comes_before_the_hosts_init_is_applied_after_it() -> None:
    """A re-created host's peers resend to it as soon as the Exchange announces it, and
    under multiprocTCPBase that can overtake the Exchange's HostInit. The host used to
    handle such a batch with no journal: it raised twice and was lost (its channel
    stalled). It now waits, in order, for the init."""
    from engine_kit import config

    from actors.host import Directory, EngineBatch, Host, HostInit, HostInspect, HostReady
    from actors.messages import RouterAttach
    from actors.runtime import running_system

    with running_system("simpleSystemBase") as asys:
        host = asys.createActor(Host)
        for user in ("alice", "bob"):  # before the init, as a peer's resend would be
            asys.tell(host, EngineBatch(origin="account:x", seq={"alice": 1, "bob": 2}[user],
                                        items=((Dest("router"), RouterAttach(
                                            user=user, gateway="gw1")),)))
        ready = asys.ask(host, HostInit(host_id="router", kind="router", config=config(),
                                        directory=Directory()), timedelta(seconds=10))
        assert isinstance(ready, HostReady), ready
        view = asys.ask(host, HostInspect(), timedelta(seconds=10))
        desk = view.desks[""]
        assert list(desk._gateways) == ["alice", "bob"]  # both applied, in their order


def test_a_gateway_link_hands_each_host_incarnations_batches_out_in_send_order() -> None:
    """Thespian's TCP transport can deliver a host's batches to a gateway out of
    order; market data applied out of order is a wrong book at every subscriber."""
    from actors.boot import EngineLink
    from actors.host import GatewayBatch

    link = EngineLink.__new__(EngineLink)  # only the ordering state: no actor system
    link._channels, link._incarnation = {}, {}
    old, new = "book:BTC-PERP@10", "book:BTC-PERP@2a"  # incarnations, by hex time

    def got(origin: str, seq: int, *items: str) -> list[Any]:
        return list(link._in_order(GatewayBatch(items=items, origin=origin, seq=seq)))

    assert got(old, 2, "b") == []  # past a gap: held
    assert got(old, 1, "a") == ["a", "b"]  # the gap filled: both, in order
    assert got(old, 1, "a") == []  # a duplicate
    assert got("", 0, "x") == ["x"]  # unnumbered (the Exchange's): at once
    assert got(old, 4, "d") == []  # seq 3 died with the host...
    assert got(new, 2, "f") == ["d"]  # ...its successor's first batch frees what it left
    assert got(new, 1, "e") == ["e", "f"]
    assert got(old, 3, "c") == ["c"]  # overtaken by its successor: as it comes
    assert got(new, 3, "g") == ["g"]
    assert got("router@10", 1, "r") == ["r"]  # hosts are independent channels


class _DeadTargets:
    """An external ActorSystem handle with a relay: the relay's sends to the addresses
    in ``dead`` are lost (a kill -9'd host), and a tell to the relay itself fails as
    Thespian's do to a dead actor (``ActorSystemFailure``) while ``relay_down``."""

    def __init__(self, directory: Any) -> None:
        self.directory = directory
        self.dead: set[str] = set()
        self.relay_down = False
        self.sent: list[tuple[str, Any]] = []
        self.inbox: list[Any] = []

    def createActor(self, cls: Any, *args: Any, **kw: Any) -> str:  # noqa: N802 (Thespian's)
        return "relay" if cls.__name__ == "RuntimeRelay" else "exchange"

    def ask(self, addr: Any, msg: Any, timeout: Any) -> Any:
        return self.directory

    def tell(self, addr: str, msg: Any) -> None:
        from thespian.actors import ActorSystemFailure

        from actors.runtime import RuntimeRelayBatch

        if addr != "relay":
            self.sent.append((addr, msg))
            return
        if self.relay_down:
            raise ActorSystemFailure("Error sending to relay: -SENDSTS_DEADTARGET")
        assert isinstance(msg, RuntimeRelayBatch)
        self.sent += [(target, batch) for target, batch in msg.items
                      if target not in self.dead]

    def listen(self, timeout: Any) -> Any:
        return self.inbox.pop(0) if self.inbox else None


def test_a_gateway_link_sends_through_the_relay_and_resends_what_a_dead_host_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An attached link told each host itself: a tell to a kill -9'd host blocked the
    # bridge thread for 35 s (Thespian's transmit retry) or raised and ended it. It
    # now goes through the system's relay; what a dead host lost is resent to its
    # successor from the outbox.
    import actors.boot as boot
    from actors.boot import BooksRestarted, EngineLink
    from actors.host import Directory, DirectoryUpdate

    directory = Directory(hosts={"book:X": "book@1", "router": "router@1"},
                          books={"X": "book:X"})
    asys = _DeadTargets(directory)
    link = EngineLink(asys, "gw")
    asys.dead.add("book@1")
    assert link.send([(Dest("book", "X"), "a")]) == 1
    assert link.send([(Dest("book", "X"), "b"), (Dest("router"), "r")]) == 2
    assert [(addr, b.seq, b.items[0][1]) for addr, b in asys.sent] == [("router@1", 1, "r")]
    # The Exchange announces the successor: the lost batches go to it, in order.
    asys.inbox.append(DirectoryUpdate(
        directory=Directory(hosts={"book:X": "book@2", "router": "router@1"},
                            books={"X": "book:X"}),
        restarted=("book:X",)))
    assert link.receive(0.0) == [BooksRestarted(symbols=("X",))]
    assert [(addr, b.seq, b.items[0][1]) for addr, b in asys.sent[1:]] == [
        ("book@2", 1, "a"), ("book@2", 2, "b")]
    # The relay refusing (no exception out of send): the batches wait and go again.
    monkeypatch.setattr(boot, "RETRY_UNDELIVERED_S", 0.0)
    asys.relay_down = True
    link.send([(Dest("router"), "r2")])
    asys.relay_down = False
    assert link.receive(0.0) == []
    assert [(addr, b.seq, b.items[0][1]) for addr, b in asys.sent[3:]] == [
        ("router@1", 1, "r"), ("router@1", 2, "r2")]  # the whole outbox (none acked)


@pytest.mark.parametrize("group_commit", ["turn", "pass"])
def test_the_router_stores_its_frozen_replay_chunks_in_the_journal_and_reads_them_back(
    tmp_path: Path, group_commit: str
) -> None:
    # The replay log's frozen chunks (32 events each) are journal blobs: the router
    # keeps only their seqs (memory and snapshots no longer grow with the history),
    # a resume reads them back, and so does a router rebuilt from the journal.
    from actors.journal import FILE_NAME, flush_shared

    with engine(BASE, tmp_path, group_commit=group_commit) as t:
        t.link.fanout = group_commit == "pass"
        t.link.attach("alice")
        for _ in range(80):
            assert t.deposit("alice", 1).ok
        live = t.wait_events("alice", 80)[:80]
        assert [e.seq for e in live] == list(range(1, 81))
        log = inspect(t.link, "router")[""].router._lanes["alice"].log
        assert (log.stored_first, log.stored, list(log.chunks)) == (1, 2, [])  # stored
        assert [e.seq for e in log.tail] == list(range(65, 81))

        def replay() -> list[Any]:
            reply = t.request(Dest("router"), lambda r: RouterReplay(
                reply_to=r, user="alice", after_seq=0))
            assert reply.ok and reply.result is not None, reply
            return list(reply.result["events"])

        assert replay() == live
        t.link.asys.tell(t.link.directory.hosts["router"], HostFault(mode="exit"))
        t.pump()
        t.link.refresh()
        assert replay()[:80] == live  # rebuilt from the journal: the same events
        flush_shared()  # the "pass" deployment commits when the bridge flushes
    rows = sqlite3.connect(tmp_path / FILE_NAME).execute(
        "SELECT name, key FROM blobs WHERE stream = 'host:router' ORDER BY key").fetchall()
    assert rows == [("alice", 1), ("alice", 33)]
