"""Test kit for the gateway: an embedded gateway on 127.0.0.1 and a bare WebSocket client."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cbor2
import trio
from engine_kit import config
from trio_websocket import WebSocketConnection, open_websocket_url

from actors.messages import AccountDeposit, Dest
from gateway.bridge import BridgeOptions, EngineBridge
from gateway.cli import load_instruments
from gateway.server import Gateway, GatewayConfig
from protocol import CASH_STEP

MILLION = int(1_000_000 / CASH_STEP)
USERS = ("alice", "bob", "carol", "dave")


class Client:
    """A bare test client: one request at a time, frames kept in order."""

    def __init__(self, ws: WebSocketConnection, enc: str) -> None:
        self.ws = ws
        self.enc = enc
        self.ids = 0
        self.private: list[dict[str, Any]] = []
        self.market: list[dict[str, Any]] = []
        self.other: list[dict[str, Any]] = []

    async def send(self, msg: dict[str, Any]) -> None:
        await self.ws.send_message(cbor2.dumps(msg) if self.enc == "cbor" else json.dumps(msg))

    async def frame(self) -> dict[str, Any]:
        with trio.fail_after(10):
            data = await self.ws.get_message()
        f = cbor2.loads(data) if isinstance(data, bytes) else json.loads(data)
        assert isinstance(f, dict)
        if f["type"] == "private":
            self.private.extend(f["events"])
        elif f["type"] == "market":
            self.market.append(f)
        return f

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.ids += 1
        rid = self.ids
        await self.send({"op": op, "id": rid, **fields})
        while True:
            f = await self.frame()
            if f["type"] in ("response", "pong") and f.get("id") == rid:
                return f
            if f["type"] == "response":
                self.other.append(f)

    async def events_until(self, n: int) -> list[dict[str, Any]]:
        while len(self.private) < n:
            await self.frame()
        return self.private


@contextlib.asynccontextmanager
async def running_gateway(gw_config: GatewayConfig | None = None, *,
                          record: str | None = None,
                          data_dir: Path | None = None) -> AsyncIterator[Gateway]:
    """An embedded engine and its gateway on a free port; users in USERS, password "pw".

    ``record``: journal the bridge's engine traffic to this file (BridgeOptions.record).
    ``data_dir``: the journal's directory (default: in memory, which a re-created host
    does not recover from).
    """
    bridge = EngineBridge(BridgeOptions(engine=config(data_dir), record=record))
    gw = Gateway(bridge, load_instruments(None), lambda u, p: p == "pw",
                 gw_config or GatewayConfig(port=0))
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.serve)
        for user in USERS:
            bridge.open_account(user)
            bridge.submit(Dest("account", user),
                          AccountDeposit(reply_to=None, user=user, amount=MILLION, ts=1))
        yield gw
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def client(gw: Gateway, enc: str) -> AsyncIterator[Client]:
    async with open_websocket_url(f"ws://127.0.0.1:{gw.port}/v1",
                                  subprotocols=[f"emporion.v1.{enc}"]) as ws:
        try:
            yield Client(ws, enc)
        finally:
            if ws.closed is not None:
                # The server went away first (no close handshake): trio-websocket's
                # aclose then returns early and leaves the TCP stream open.
                with contextlib.suppress(Exception):
                    await ws._stream.aclose()


def lose(gw: Gateway, kind: type, times: int | None = 1) -> list[Any]:
    """Make the bridge drop the first ``times`` requests of ``kind`` (None: every one),
    as a host killed before it journaled a request loses it; returns what was dropped."""
    lost: list[Any] = []
    real = gw.bridge.submit

    def submit(dest: Dest, item: Any) -> None:
        if isinstance(item, kind) and (times is None or len(lost) < times):
            lost.append(item)
            return
        real(dest, item)

    gw.bridge.submit = submit  # type: ignore[method-assign]
    return lost


def drop_first_reply(gw: Gateway, op: str) -> list[Any]:
    """Make the gateway drop the engine's first reply to an ``op`` request (the request
    took effect, its answer is lost); returns the dropped reply once it came."""
    real, dropped = gw._reply, []

    def reply(msg: Any) -> None:
        pending = gw._pending.get(int(msg.reply_to.request_id or 0))
        if pending is not None and pending.op == op and not dropped:
            dropped.append(msg)
            return
        real(msg)

    gw._reply = reply  # type: ignore[method-assign]
    return dropped
