"""The gateway's writer: frames queued together leave in one socket write, in order."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing
from gateway_kit import client, running_gateway

from gateway.server import can_coalesce


async def test_frames_queued_together_go_out_in_order_in_one_write() -> None:
    async with running_gateway() as gw, client(gw, "json") as c:
        assert (await c.call("ping"))["type"] == "pong"
        (conn,) = gw.conns.values()
        assert can_coalesce(conn.ws)  # the trio-websocket in use has what the writer needs
        before = gw.coalesced_writes
        # Queued with no checkpoint between them: the writer finds all of them at once.
        # The middle one is text no UTF-8 can carry: it alone becomes an internal error.
        conn.send.send_nowait('{"type":"pong","id":"a","ts":1}')
        conn.send.send_nowait('{"type":"pong","id":"\ud800","ts":2}')
        conn.send.send_nowait('{"type":"pong","id":"b","ts":3}')
        conn.send.send_nowait(json.dumps({"type": "pong", "id": "c" * 100_000, "ts": 4}))
        got: list[dict[str, Any]] = []
        with trio.fail_after(5):
            while len(got) < 4:
                got.append(json.loads(await c.ws.get_message()))
        assert [f.get("id") for f in got] == ["a", None, "b", "c" * 100_000]
        assert got[1]["type"] == "response" and got[1]["error"]["code"] == "internal"
        assert gw.coalesced_writes == before + 1
        assert (await c.call("ping"))["type"] == "pong"  # the connection carries on


async def test_a_subscriber_gets_every_market_frame_of_a_pass_in_seq_order() -> None:
    channels = ["book.BTC-PERP", "trades.BTC-PERP", "ticker.BTC-PERP"]
    async with running_gateway() as gw, client(gw, "cbor") as alice, \
            client(gw, "cbor") as bob, client(gw, "json") as watcher:
        assert (await alice.call("login", user="alice", password="pw"))["ok"]
        assert (await bob.call("login", user="bob", password="pw"))["ok"]
        assert (await watcher.call("subscribe", channels=channels))["ok"]
        before = gw.coalesced_writes
        for i in range(20):
            assert (await alice.call("place", client_order_id=f"s{i}", symbol="BTC-PERP",
                                     side="sell", type="limit", price="60010.0",
                                     qty="0.002"))["ok"]
            # Each cross makes a trade, a book delta and a ticker in one engine pass.
            assert (await bob.call("place", client_order_id=f"b{i}", symbol="BTC-PERP",
                                   side="buy", type="limit", price="60010.0",
                                   qty="0.002"))["ok"]
        with trio.fail_after(10):
            while sum(m["channel"] == "trades.BTC-PERP" for m in watcher.market) < 20:
                await watcher.frame()
        for ch in channels:
            seqs = [m["seq"] for m in watcher.market if m["channel"] == ch]
            assert seqs == list(range(1, len(seqs) + 1)), (ch, seqs)
        assert gw.coalesced_writes > before


async def test_the_embedded_bridge_tunes_the_interpreter_and_restores_it() -> None:
    import gc
    import sys

    from engine_kit import config

    from gateway.bridge import BridgeOptions, EngineBridge

    si, threshold = sys.getswitchinterval(), gc.get_threshold()
    bridge = EngineBridge(BridgeOptions(engine=config(), switch_interval_s=0.0007,
                                        gc_threshold=12_345))
    await bridge.start(lambda got: None)
    try:
        assert abs(sys.getswitchinterval() - 0.0007) < 1e-9
        assert gc.get_threshold() == (12_345, *threshold[1:])
    finally:
        await bridge.stop()
    assert (sys.getswitchinterval(), gc.get_threshold()) == (si, threshold)
    # None keeps the interpreter's own settings.
    bridge = EngineBridge(BridgeOptions(engine=config(), switch_interval_s=None,
                                        gc_threshold=None))
    await bridge.start(lambda got: None)
    try:
        assert (sys.getswitchinterval(), gc.get_threshold()) == (si, threshold)
    finally:
        await bridge.stop()


async def test_the_outbox_is_bounded_ordered_and_drains_after_close() -> None:
    import pytest

    from gateway.server import Outbox

    box = Outbox(3)
    for frame in (b"a", "b", b"c"):
        box.send_nowait(frame)
    with pytest.raises(trio.WouldBlock):  # full: the gateway cuts a slow consumer here
        box.send_nowait(b"d")
    assert await box.take(2, 1 << 20) == [b"a", "b"]  # at most `most`
    box.send_nowait(b"x" * 10)
    box.send_nowait(b"y")
    assert await box.take(10, 5) == [b"c", b"x" * 10]  # stops once past max_bytes
    box.close()
    with pytest.raises(trio.ClosedResourceError):
        box.send_nowait(b"z")
    assert await box.take(10, 1 << 20) == [b"y"]  # what was queued still goes out
    assert await box.take(10, 1 << 20) is None
    with pytest.raises(trio.EndOfChannel):
        box.receive_nowait()


async def test_a_waiting_writer_wakes_on_a_frame_and_on_close_and_can_be_cancelled() -> None:
    from gateway.server import Outbox

    box = Outbox(8)
    got: list[object] = []

    async def writer() -> None:
        while (frames := await box.take(8, 1 << 20)) is not None:
            got.append(frames)
        got.append(None)

    async with trio.open_nursery() as nursery:  # a take cancelled while waiting: no trace
        nursery.start_soon(box.take, 8, 1 << 20)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        box.send_nowait(b"1")
        await trio.testing.wait_all_tasks_blocked()
        assert got == [[b"1"]]
        box.send_nowait(b"2")
        box.send_nowait(b"3")
        box.close()
    assert got == [[b"1"], [b"2", b"3"], None]
