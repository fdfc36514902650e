"""The client SDK against a live gateway: typed events, Strategy, reconnect + resume."""

from __future__ import annotations

import trio
from gateway_kit import drop_first_reply, lose, running_gateway

from gateway.client import ClientError, MarketUpdate, PrivateUpdate, Strategy, open_client
from protocol import OrderEventData, TradeData


async def test_place_and_typed_events() -> None:
    async with running_gateway() as gw:
        url = f"ws://127.0.0.1:{gw.port}/v1"
        async with open_client(url, "alice", "pw") as alice, \
                open_client(url, "bob", "pw", encoding="json") as bob:
            await alice.place("BTC-PERP", "sell", "limit", qty="0.002", price="60000.0")
            filled = await bob.place("BTC-PERP", "buy", "market", qty="0.002")
            assert filled["status"] == "filled"
            seen: list[PrivateUpdate] = []
            with trio.fail_after(10):
                async for ev in bob.events():
                    if isinstance(ev, PrivateUpdate):
                        seen.append(ev)
                        if ev.kind == "order_filled":
                            break
            kinds = [e.kind for e in seen]
            assert "trade_executed" in kinds
            trade = next(e for e in seen if e.kind == "trade_executed")
            assert isinstance(trade.data, TradeData)
            assert trade.data.price == "60000.0"
            assert isinstance(seen[-1].data, OrderEventData)
            try:
                await bob.cancel(123456)
            except ClientError as exc:
                assert exc.code == "unknown_order"
            else:
                raise AssertionError("cancel of an unknown order succeeded")
            try:
                async with open_client(url, "alice", "wrong"):
                    pass
            except ClientError as exc:
                assert exc.code == "auth_failed"


class Recorder(Strategy):
    symbols = ("ETH-PERP",)

    def __init__(self) -> None:
        super().__init__()
        self.tickers: list[dict[str, object]] = []
        self.orders: list[str] = []
        self.trades = 0
        self.done = trio.Event()

    async def on_start(self) -> None:
        await self.sell_limit("ETH-PERP", "1.00", "3000.00")

    async def on_ticker(self, symbol: str, data: dict[str, object]) -> None:
        self.tickers.append(data)

    async def on_order(self, event: PrivateUpdate) -> None:
        self.orders.append(event.kind)
        if event.kind == "order_filled":
            self.done.set()

    async def on_trade(self, event: PrivateUpdate) -> None:
        self.trades += 1


async def test_strategy_callbacks() -> None:
    async with running_gateway() as gw:
        url = f"ws://127.0.0.1:{gw.port}/v1"
        strat = Recorder()
        async with open_client(url, "carol", "pw") as carol, \
                open_client(url, "dave", "pw") as dave, trio.open_nursery() as nursery:
            nursery.start_soon(strat.run, carol)
            with trio.fail_after(10):
                while "order_accepted" not in strat.orders:
                    await trio.sleep(0.01)  # polling a plain list in the same thread
            await dave.place("ETH-PERP", "buy", "market", qty="1.00")
            with trio.fail_after(10):
                await strat.done.wait()
            assert strat.trades == 1
            assert "order_filled" in strat.orders
            nursery.cancel_scope.cancel()


async def test_reconnect_resumes_without_gap_or_duplicate() -> None:
    async with running_gateway() as gw:
        url = f"ws://127.0.0.1:{gw.port}/v1"
        async with open_client(url, "alice", "pw") as alice, \
                open_client(url, "bob", "pw") as bob, trio.open_nursery() as nursery:

            async def stream() -> None:  # a steady stream of fills against alice
                for i in range(40):
                    await alice.place("BTC-PERP", "sell", "limit", qty="0.001",
                                      price="60000.0", client_order_id=f"s{i}")
                    await bob.place("BTC-PERP", "buy", "market", qty="0.001",
                                    client_order_id=f"b{i}")

            nursery.start_soon(stream)
            seqs: list[int] = []
            dropped = False
            with trio.fail_after(30):
                async for ev in alice.events():
                    if not isinstance(ev, PrivateUpdate):
                        continue
                    seqs.append(ev.seq)
                    if len(seqs) == 20 and not dropped:
                        dropped = True
                        await alice.drop()
                    if ev.kind == "order_filled" and ev.data.client_order_id == "s39":  # type: ignore[union-attr]
                        break
            assert alice.reconnects >= 1
            # Gapless and once each, from the first event after the deposit seen at login.
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            assert isinstance(MarketUpdate, type)


def _event(seq: int) -> dict[str, object]:
    return {"seq": seq, "kind": "system_notice", "priority": 3, "ts": seq,
            "data": {"kind": "resync", "message": None, "scope": None}}


async def test_live_events_overtaking_the_replay_wait_for_it() -> None:
    # After a reconnect, live events (after the login's last_seq) can arrive before
    # the resume's replay fills the gap below them: the SDK holds them, hands the
    # stream out in seq order, once each, and counts what the replay repeated.
    from gateway.client import Client

    c = Client("ws://unused", "alice", "pw", ack_every=10**9)
    c.last_seq = 32
    await c._on_frame(None, {"type": "private", "events": [_event(35), _event(36)]})  # type: ignore[arg-type]
    assert c.last_seq == 32  # 33 and 34 are not here yet
    await c._on_frame(None, {"type": "private",  # type: ignore[arg-type]
                             "events": [_event(s) for s in (33, 34, 35, 36)]})
    await c._on_frame(None, {"type": "private", "events": [_event(38)],  # type: ignore[arg-type]
                             "skipped": [37]})
    got = []
    while True:
        try:
            got.append(c.events().receive_nowait().seq)  # type: ignore[union-attr]
        except trio.WouldBlock:
            break
    assert got == [33, 34, 35, 36, 38]
    assert c.last_seq == 38
    assert c.duplicates_dropped == 2


async def test_heartbeats_keep_a_quiet_client_past_the_idle_timeout() -> None:
    from gateway.server import GatewayConfig

    async with running_gateway(GatewayConfig(port=0, idle_timeout_s=0.5)) as gw:
        url = f"ws://127.0.0.1:{gw.port}/v1"
        async with open_client(url, "alice", "pw", heartbeat_s=0.1) as beating, \
                open_client(url, "bob", "pw", heartbeat_s=None) as silent:
            # Without heartbeats the gateway closes the quiet connection (1001) and
            # the SDK reconnects; wait for that to happen.
            with trio.fail_after(10):
                while silent.reconnects == 0:
                    await trio.sleep(0.05)  # poll the counter the reconnect bumps
            # Over the same span (more than one idle timeout) the beating one stayed.
            assert beating.reconnects == 0
            await beating.ping()
            assert beating.reconnects == 0


async def test_a_place_the_engine_did_not_answer_in_time_is_sent_again() -> None:

    from gateway.server import GatewayConfig

    async with running_gateway(GatewayConfig(port=0, request_timeout_s=1.0)) as gw:
        dropped = drop_first_reply(gw, "place")  # the order is placed, its answer lost
        async with open_client(f"ws://127.0.0.1:{gw.port}/v1", "alice", "pw") as alice:
            placed = await alice.place("BTC-PERP", "buy", "limit", qty="0.001",
                                       price="59000.0", client_order_id="slow-1")
        assert dropped  # the first answer was lost; the SDK sent the place again
        assert placed["duplicate"] is True
        assert placed["order_id"] == dropped[0].result["order_id"]
        assert len(gw._pending) == 0


async def test_a_second_timeout_reaches_the_caller() -> None:

    from actors.messages import AccountQuery
    from gateway.server import GatewayConfig

    async with running_gateway(GatewayConfig(port=0, request_timeout_s=1.0)) as gw:
        lost = lose(gw, AccountQuery, times=None)  # the engine never sees a query
        async with open_client(f"ws://127.0.0.1:{gw.port}/v1", "alice", "pw") as alice:
            try:
                await alice.query("account")
            except ClientError as exc:
                assert exc.code == "timeout"
            else:
                raise AssertionError("a query nothing answers succeeded")
        assert len(lost) == 2  # sent, timed out, sent once more, timed out: given up


async def test_a_connection_that_answers_nothing_is_dropped_and_the_request_sent_again(
) -> None:
    # The gateway answers every request (at the latest with ``timeout``), so a request
    # with no answer at all means the connection is dead though open (one a stopped
    # gateway left half-closed). The SDK used to wait on it for ever.
    from typing import Any

    async with running_gateway() as gw:
        real = gw._dispatch
        ignored: list[Any] = []

        def dispatch(conn: Any, req: Any) -> None:
            if type(req).__name__ == "Query" and not ignored:
                ignored.append(req)  # read, and never answered
                return
            real(conn, req)

        gw._dispatch = dispatch  # type: ignore[method-assign]
        async with open_client(f"ws://127.0.0.1:{gw.port}/v1", "alice", "pw",
                               answer_timeout_s=0.5) as alice:
            with trio.fail_after(10):
                account = await alice.query("account")
            assert "balance" in account
            assert ignored and alice.dead_connections == 1 and alice.reconnects == 1
