"""Gaps in a user's live events at the gateway: lost or overtaken router deliveries.

Under multiprocTCPBase a killed router's last sends die with it, and its successor's
can overtake them (the simulation harness caught both: clients held every event
after the gap for ever). The router numbers each user's events without gaps and
sends them in order, so the gateway asks it to replay what a gap leaves out. Here the
losses are made by hand, over real sockets, on the embedded engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
from gateway_kit import Client, client, lose, running_gateway

from actors.messages import Delivery, RouterReplay
from gateway.client import MarketUpdate
from gateway.server import Gateway, GatewayConfig


def _order(cid: str) -> dict[str, Any]:
    return {"op": "place", "id": cid, "client_order_id": cid, "symbol": "BTC-PERP",
            "side": "buy", "type": "limit", "price": "59000.0", "qty": "0.001"}


def _intercept(gw: Gateway, user: str, keep: Callable[[Delivery], bool]) -> list[Delivery]:
    """Route the engine's deliveries for ``user`` through ``keep``: those it returns
    False for never reach the gateway (they are kept in the list returned)."""
    real = gw._from_engine_one
    held: list[Delivery] = []

    def one(m: Any) -> None:
        if isinstance(m, Delivery) and m.user == user and not keep(m):
            held.append(m)
            return
        real(m)

    gw._from_engine_one = one  # type: ignore[method-assign]
    return held


async def _placed_and_seen(c: Client, cids: list[str], last: int) -> list[int]:
    """Place the orders one at a time; read until each one's accept has arrived;
    the private seqs after ``last`` as the client got them."""
    for cid in cids:
        assert (await c.call("place", **{k: v for k, v in _order(cid).items()
                                         if k not in ("op", "id")}))["ok"]
    with trio.fail_after(10):
        while not set(cids) <= {e["data"].get("client_order_id") for e in c.private
                                if e["kind"] == "order_accepted"}:
            await c.frame()
    return [e["seq"] for e in c.private if e["seq"] > last]


async def test_a_lost_delivery_is_replayed_in_its_place() -> None:
    async with running_gateway() as gw, client(gw, "json") as alice:
        last = (await alice.call("login", user="alice", password="pw"))["result"]["last_seq"]
        lost = _intercept(gw, "alice", lambda m: bool(lost))  # drop her first one
        seqs = await _placed_and_seen(alice, ["g1", "g2"], last)
        assert lost and lost[0].events[0].seq == last + 1
        assert seqs == list(range(last + 1, last + 1 + len(seqs)))  # gapless, each once
        assert gw.gap_repairs == 1 and not gw._pending


async def test_an_overtaken_delivery_is_not_doubled() -> None:
    async with running_gateway() as gw, client(gw, "json") as alice:
        last = (await alice.call("login", user="alice", password="pw"))["result"]["last_seq"]
        real = gw._from_engine_one
        late = _intercept(gw, "alice", lambda m: bool(late))
        seqs = await _placed_and_seen(alice, ["o1", "o2"], last)
        real(late[0])  # the first delivery arrives after all, behind the later ones
        assert (await alice.call("ping"))["type"] == "pong"  # any frame it caused is in
        assert [e["seq"] for e in alice.private if e["seq"] > last] == seqs
        assert seqs == list(range(last + 1, last + 1 + len(seqs)))


async def test_an_unanswered_repair_lets_the_events_through_and_a_resume_fills_the_gap(
) -> None:
    async with running_gateway(GatewayConfig(port=0, request_timeout_s=1.0)) as gw, \
            client(gw, "json") as alice:
        last = (await alice.call("login", user="alice", password="pw"))["result"]["last_seq"]
        dropped = _intercept(gw, "alice", lambda m: bool(dropped))
        unanswered = lose(gw, RouterReplay)
        for cid in ("u1", "u2"):  # one at a time: their events come in two deliveries
            assert (await alice.call("place", **{k: v for k, v in _order(cid).items()
                                                 if k not in ("op", "id")}))["ok"]
        with trio.fail_after(10):  # the repair times out; the later events come anyway
            while not any(e["data"].get("client_order_id") == "u2" for e in alice.private
                          if e["kind"] == "order_accepted"):
                await alice.frame()
        assert unanswered and gw.gap_repairs == 1 and not gw._pending
        gap = dropped[0].events[0].seq
        assert gap not in {e["seq"] for e in alice.private}
        r = await alice.call("resume", after_seq=gap - 1)
        assert r["ok"], r
        with trio.fail_after(10):  # the replay follows its answer
            while gap not in {e["seq"] for e in alice.private}:
                await alice.frame()
        seqs = sorted({e["seq"] for e in alice.private if e["seq"] > last})
        assert seqs == list(range(last + 1, r["result"]["to_seq"] + 1))


async def test_the_sdk_resumes_over_a_gap_the_gateway_did_not_repair(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.client import PrivateUpdate, open_client

    monkeypatch.setattr(Gateway, "_repair", lambda self, conn, after_seq: None)
    async with running_gateway() as gw:
        url = f"ws://127.0.0.1:{gw.port}/v1"
        async with open_client(url, "alice", "pw", gap_timeout_s=0.2) as alice:
            dropped = _intercept(gw, "alice", lambda m: bool(dropped))
            for cid in ("s1", "s2"):
                await alice.place("BTC-PERP", "buy", "limit", qty="0.001", price="59000.0",
                                  client_order_id=cid)
            seqs: list[int] = []
            with trio.fail_after(10):
                async for ev in alice.events():
                    if isinstance(ev, PrivateUpdate):
                        seqs.append(ev.seq)
                        if ev.kind == "order_accepted" and ev.raw["data"]["client_order_id"] == "s2":
                            break
        assert dropped and dropped[0].events[0].seq in seqs
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # in order, each once
        assert alice.gap_resumes == 1 and gw.gap_repairs == 0


def _drop_first_frame(monkeypatch: pytest.MonkeyPatch, channel: str,
                      kind: str) -> list[dict[str, Any]]:
    """From now on, the first JSON market frame of ``channel`` and ``kind`` any
    connection is sent is dropped, as from a full queue; returns it once dropped."""
    import json

    from gateway.server import Outbox

    dropped: list[dict[str, Any]] = []
    real = Outbox.send_nowait

    def send_nowait(self: Outbox, data: bytes | str) -> None:
        frame = json.loads(data) if isinstance(data, str) else {}
        if not dropped and (frame.get("channel"), frame.get("kind")) == (channel, kind):
            dropped.append(frame)
            raise trio.WouldBlock  # as from a full queue: the frame is dropped
        real(self, data)

    monkeypatch.setattr(Outbox, "send_nowait", send_nowait)
    return dropped


async def _collect(events: AsyncIterator[Any], got: list[MarketUpdate],
                   last: Callable[[MarketUpdate], bool]) -> None:
    """Append the market updates of ``events`` to ``got`` up to the ``last`` one."""
    with trio.fail_after(10):
        async for ev in events:
            if isinstance(ev, MarketUpdate):
                got.append(ev)
                if last(ev):
                    return


async def test_the_sdk_resubscribes_a_book_whose_frames_were_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A skipped market seq means the gateway dropped frames (its queue for the client
    was full): the deltas no longer add up to the book, so the SDK asks again."""
    from gateway.client import open_client

    async with running_gateway() as gw:
        url = f"ws://127.0.0.1:{gw.port}/v1"
        async with open_client(url, "alice", "pw", encoding="json") as alice:
            await alice.subscribe(["book.BTC-PERP"])
            got: list[MarketUpdate] = []
            events = alice.events()
            await _collect(events, got, lambda ev: True)  # the snapshot
            dropped = _drop_first_frame(monkeypatch, "book.BTC-PERP", "delta")
            for i, price in enumerate(("58000.0", "58001.0")):  # a delta each
                await alice.place("BTC-PERP", "buy", "limit", qty="0.001", price=price,
                                  client_order_id=f"d{i}")
            await _collect(events, got, lambda ev: ev.epoch == 2)
        assert dropped and alice.market_resubscribes == 1
        assert [(g.epoch, g.seq, g.kind) for g in got] == [
            (1, 1, "snapshot"), (1, 3, "delta"), (2, 1, "snapshot")]
        bids = {p for p, _ in got[-1].data["bids"]}
        assert {"58000.0", "58001.0"} <= bids  # the fresh snapshot has both orders


async def test_the_sdk_resubscribes_trades_whose_frame_was_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A skipped seq on a trades channel: the SDK subscribes again, and the new
    subscription's snapshot holds the trade whose frame was dropped."""
    from gateway.client import open_client

    async with running_gateway() as gw:
        url = f"ws://127.0.0.1:{gw.port}/v1"
        async with open_client(url, "alice", "pw", encoding="json") as alice, \
                open_client(url, "bob", "pw", encoding="json") as bob:
            await alice.subscribe(["trades.BTC-PERP"])
            got: list[MarketUpdate] = []
            events = alice.events()
            await _collect(events, got, lambda ev: True)  # the (empty) snapshot
            dropped = _drop_first_frame(monkeypatch, "trades.BTC-PERP", "trade")
            for i in range(2):  # two trades: the first one's frame is dropped
                await bob.place("BTC-PERP", "sell", "limit", qty="0.001", price="59000.0",
                                client_order_id=f"s{i}")
                await alice.place("BTC-PERP", "buy", "limit", qty="0.001", price="59000.0",
                                  client_order_id=f"b{i}")
            await _collect(events, got, lambda ev: ev.epoch == 2)
        assert dropped and dropped[0]["data"]["trade_id"] == 1
        assert alice.market_resubscribes == 1
        assert [(g.epoch, g.seq, g.kind) for g in got] == [
            (1, 1, "snapshot"), (1, 3, "trade"), (2, 1, "snapshot")]
        assert got[1].data["trade_id"] == 2
        assert [t["trade_id"] for t in got[2].data["trades"]] == [1, 2]
