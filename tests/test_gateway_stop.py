"""Stopping, and the bridge's hand-over to trio: a gateway that shuts down answers
what it already read, closes with 1001 and sends what its connections asked on the
way out (cancel_on_disconnect) to the engine; the bridge sends what was queued when
it stopped, and an attached bridge hands its passes to trio without waiting."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from engine_kit import config
from gateway_kit import MILLION, Client, client, running_gateway
from test_gateway_errors import close_code, limit
from trio_websocket import open_websocket_url

from actors.messages import AccountDeposit, Dest, Reply
from gateway.bridge import DELIVERIES_AHEAD, BridgeOptions, EngineBridge
from gateway.server import SHUTDOWN_REASON


async def a_signal_closes_with_1001(proc: subprocess.Popen[str], sig: int, port: int,
                                    user: str, password: str) -> None:
    """Log in to the gateway process ``proc`` serving ``port``, send it ``sig``: the
    connection is closed with 1001 :data:`SHUTDOWN_REASON` (a graceful shutdown)."""
    async with open_websocket_url(f"ws://127.0.0.1:{port}/v1",
                                  subprotocols=["emporion.v1.json"]) as ws:
        c = Client(ws, "json")
        assert (await c.call("login", user=user, password=password))["ok"]
        proc.send_signal(sig)
        assert await close_code(c) == (1001, SHUTDOWN_REASON)


async def test_shutdown_answers_what_it_read_then_closes_every_connection_with_1001() -> None:
    async with running_gateway() as gw, client(gw, "json") as alice, \
            client(gw, "cbor") as bob:
        assert (await alice.call("login", user="alice", password="pw"))["ok"]
        assert (await bob.call("login", user="bob", password="pw"))["ok"]
        # The engine's answer to alice's place is held back until the shutdown waits.
        real = gw._from_engine_one
        held: list[Reply] = []
        answered = trio.Event()

        def one(m: Any) -> None:
            if isinstance(m, Reply) and not held:
                held.append(m)
                answered.set()
                return
            real(m)

        gw._from_engine_one = one  # type: ignore[method-assign]
        await alice.send({"op": "place", "id": 99, **limit("p1", "59000.0", "0.001")})
        with trio.fail_after(10):
            await answered.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(gw.shutdown)
            await trio.testing.wait_all_tasks_blocked()
            # Waiting for the answer: nobody is closed yet, and nobody new gets in.
            assert gw.stopping and len(gw.conns) == 2
            assert alice.ws.closed is None and bob.ws.closed is None
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            except OSError:
                pass
            else:
                await stream.aclose()
                raise AssertionError("the listener still accepts connections")
            gw._from_engine(held)  # the engine answers now

        with trio.fail_after(10):
            while (f := await alice.frame())["type"] != "response":
                pass
        assert f["id"] == 99 and f["ok"] and f["result"]["status"] == "open"
        assert await close_code(alice) == (1001, SHUTDOWN_REASON)
        assert await close_code(bob) == (1001, SHUTDOWN_REASON)
        assert not gw.conns


async def test_cancel_on_disconnect_of_a_shutdown_is_in_the_journal(tmp_path: Path) -> None:
    async with running_gateway(data_dir=tmp_path) as gw, client(gw, "json") as alice:
        assert (await alice.call("login", user="alice", password="pw",
                                 cancel_on_disconnect=True))["ok"]
        r = await alice.call("place", **limit("rest", "59000.0", "0.001"))
        assert r["result"]["status"] == "open"
        await gw.shutdown()
        assert await close_code(alice) == (1001, SHUTDOWN_REASON)
    async with running_gateway(data_dir=tmp_path) as gw, client(gw, "json") as alice:
        assert (await alice.call("login", user="alice", password="pw"))["ok"]
        orders = (await alice.call("query", what="orders"))["result"]["orders"]
        assert orders == []


async def test_the_bridge_sends_what_was_queued_when_it_was_stopped() -> None:
    """A request queued while a pass is past its last look at the queue, just before
    the stop, still goes to the engine (it used to stay in the queue)."""
    bridge = EngineBridge(BridgeOptions(engine=config(None)))
    await bridge.start(lambda msgs: None)
    in_receive = threading.Event()
    release = threading.Event()

    def slow_receive(link: Any) -> None:
        real = link.receive

        def receive(timeout: float = 0.5) -> list[Any]:
            link.receive = real
            in_receive.set()
            release.wait(10)
            return real(timeout)

        link.receive = receive

    try:
        bridge.call(slow_receive)
        await trio.to_thread.run_sync(in_receive.wait, 10)
        before = bridge.sent_items
        bridge.submit(Dest("account", "alice"),
                      AccountDeposit(reply_to=None, user="alice", amount=MILLION, ts=1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bridge.stop)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
    finally:
        release.set()
        await bridge.stop()
    assert bridge.sent_items == before + 1


async def test_an_attached_bridge_hands_deliveries_to_trio_in_order_and_survives_a_failing_one(
        caplog: pytest.LogCaptureFixture) -> None:
    """The attached bridge thread does not wait for trio to take each pass (it once
    stopped reading the engine meanwhile); a delivery that raises is logged, not
    allowed to end trio's run (an exception from a run_sync_soon callback would)."""
    bridge = EngineBridge(BridgeOptions(base="multiprocTCPBase", admin_port=1))
    token = trio.lowlevel.current_trio_token()
    got: list[list[Any]] = []
    done = trio.Event()

    def deliver(msgs: list[Any]) -> None:
        if msgs == ["boom"]:
            raise RuntimeError("boom")
        got.append(msgs)
        if msgs == ["last"]:
            done.set()

    def bridge_thread() -> None:  # more passes than DELIVERIES_AHEAD, one failing
        for i in range(DELIVERIES_AHEAD):
            bridge._deliver_soon(token, deliver, [i])
        bridge._deliver_soon(token, deliver, ["boom"])
        for i in range(DELIVERIES_AHEAD, 3 * DELIVERIES_AHEAD):
            bridge._deliver_soon(token, deliver, [i])
        bridge._deliver_soon(token, deliver, ["last"])

    await trio.to_thread.run_sync(bridge_thread)
    with trio.fail_after(10):
        await done.wait()
    assert got == [[i] for i in range(3 * DELIVERIES_AHEAD)] + [["last"]]
    assert "the gateway failed on a delivery from the engine" in caplog.text
