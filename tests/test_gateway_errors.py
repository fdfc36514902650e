"""Every error code of PROTOCOL.md over real sockets, and the connection-level limits.

Each test drives an embedded engine + gateway on 127.0.0.1 (``gateway_kit``) and
checks the typed error, the echoed ``id``, and that the connection still answers
afterwards (an error never closes the connection by itself). The limits — 1008
after repeated bad frames, the idle timeout, too many sessions, the slow-consumer
cut — are checked on gateways configured small.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import cbor2
import pytest
import trio
import trio.testing
from engine_kit import config
from gateway_kit import (
    MILLION,
    USERS,
    Client,
    client,
    drop_first_reply,
    lose,
    running_gateway,
)
from trio_websocket import ConnectionClosed

from actors.boot import EngineLink
from actors.cores.session import SessionConfig
from actors.desks import AccountDesk
from actors.messages import AccountDeposit, Dest
from gateway.bridge import BridgeBusy, BridgeOptions, EngineBridge
from gateway.server import Gateway, GatewayConfig
from protocol import ErrorCode, parse_instruments

ROOT = Path(__file__).resolve().parent.parent
TOML = (ROOT / "protocol" / "instruments.toml").read_text()
# A fourth instrument, configured halted: the only way to halt a book today.
HALTED_TOML = TOML + """
[instruments.HALT-PERP]
kind = "perpetual"
quote = "USDT"
tick = "0.1"
lot = "0.001"
multiplier = "1"
margin_rate = "0.05"
maker_fee = "0.0002"
taker_fee = "0.0005"
ref_price = "100.0"
price_band = "0.1"
position_limit = "100"
status = "halted"
"""
CODES = {c.value for c in ErrorCode}


@contextlib.asynccontextmanager
async def custom_gateway(gw_config: GatewayConfig | None = None, *, toml: str = TOML,
                         check: Callable[[str, str], bool] | None = None,
                         **engine: Any) -> AsyncIterator[Gateway]:
    """Like ``running_gateway`` but with engine options (replay_capacity) and instruments."""
    bridge = EngineBridge(BridgeOptions(
        engine=attrs.evolve(config(**engine), instruments_toml=toml)))
    gw = Gateway(bridge, parse_instruments(toml), check or (lambda u, p: p == "pw"),
                 gw_config or GatewayConfig(port=0))
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.serve)
        for user in USERS:
            def open_account(link: EngineLink, u: str = user) -> None:
                link.open_account(u)

            bridge.call(open_account)
            bridge.submit(Dest("account", user),
                          AccountDeposit(reply_to=None, user=user, amount=MILLION, ts=1))
        yield gw
        nursery.cancel_scope.cancel()


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    async with running_gateway() as gw:
        yield gw


def code(resp: dict[str, Any]) -> str:
    assert resp["type"] == "response", resp
    assert resp["ok"] is False, resp
    assert resp["error"]["code"] in CODES, resp
    assert isinstance(resp["error"]["message"], str)
    return str(resp["error"]["code"])


async def still_works(c: Client) -> None:
    assert (await c.call("ping"))["type"] == "pong"


async def answer(c: Client) -> dict[str, Any]:
    """The next response/pong, skipping private and market frames."""
    while True:
        f = await c.frame()
        if f["type"] in ("response", "pong"):
            return f


async def close_code(c: Client) -> tuple[int, str | None]:
    """Read until the server closes; the close code and reason."""
    with trio.fail_after(10):
        try:
            while True:
                await c.ws.get_message()
        except ConnectionClosed as exc:
            assert exc.reason is not None
            reason = exc.reason.code, exc.reason.reason
    await shut(c)
    return reason


async def shut(c: Client) -> None:
    """Close the client's socket after the server closed the WebSocket.

    trio-websocket 0.12's client waits for the server's TCP close after a
    server-initiated close handshake and then never closes its own socket (a
    ResourceWarning at GC, an error under filterwarnings=error).
    """
    await c.ws._stream.aclose()


async def send_raw(c: Client, data: bytes | str) -> None:
    await c.ws.send_message(data)


def limit(cid: str, price: str, qty: str, side: str = "buy", symbol: str = "BTC-PERP",
          **kw: Any) -> dict[str, Any]:
    return {"client_order_id": cid, "symbol": symbol, "side": side, "type": "limit",
            "price": price, "qty": qty, **kw}


# -- bad_frame ---------------------------------------------------------------------------


@pytest.mark.parametrize("enc", ["json", "cbor"])
async def test_bad_frame_undecodable_and_not_a_map(gateway: Gateway, enc: str) -> None:
    async with client(gateway, enc) as c:
        junk: list[bytes | str] = (
            ["{not json", "", "NaN", '{"op":"ping","id":Infinity}', "[1, 2]", '"ping"']
            if enc == "json" else
            [b"\xff\xfe", b"", b"\x9f", cbor2.dumps([1, 2]), cbor2.dumps("ping"),
             b"\xa1\x63op"])  # a map whose text key is truncated
        for data in junk:
            await send_raw(c, data)
            f = await answer(c)
            assert code(f) == "bad_frame", (data, f)
            assert f["id"] is None
            await still_works(c)  # also resets the consecutive-bad count


async def test_bad_frame_oversized_keeps_the_connection() -> None:
    async with running_gateway(GatewayConfig(max_frame=1024)) as gw, \
            client(gw, "json") as c, client(gw, "cbor") as b:
        big = json.dumps({"op": "ping", "id": 1, "pad": "x" * 2000})
        await send_raw(c, big)
        f = await answer(c)
        assert code(f) == "bad_frame"
        assert "exceeds" in f["error"]["message"]
        await still_works(c)
        await send_raw(b, cbor2.dumps({"op": "ping", "id": 1, "pad": b"x" * 1100}))
        assert code(await answer(b)) == "bad_frame"
        await still_works(b)
        # Just under the limit decodes (and is refused for its unknown field only).
        await send_raw(c, json.dumps({"op": "ping", "id": 2, "pad": "x" * 900}))
        assert code(await answer(c)) == "bad_request"


def padded(size: int, binary: bool = False) -> bytes | str:
    """A ping frame of exactly ``size`` bytes (CBOR) or characters (JSON)."""
    def make(n: int) -> bytes | str:
        return (cbor2.dumps({"op": "ping", "pad": b"x" * n}) if binary
                else json.dumps({"op": "ping", "pad": "x" * n}))

    frame = make(size - (len(make(size)) - size))  # minus the map's own overhead
    assert len(frame) == size
    return frame


async def test_bad_frame_far_oversized_keeps_the_connection() -> None:
    """Regression: trio-websocket's cap was 4 x max_frame, so a frame over it was cut
    with 1009 instead of answered; up to the hard cap (16 x max_frame) it is answered."""
    outcome: dict[str, Any] | str
    async with running_gateway(GatewayConfig(max_frame=1024)) as gw, client(gw, "json") as c:
        await send_raw(c, json.dumps({"op": "ping", "id": 1, "pad": "x" * 5000}))
        with trio.fail_after(10):
            try:
                outcome = await answer(c)
            except ConnectionClosed as exc:
                outcome = f"closed with {exc.reason}"
                await shut(c)
        assert not isinstance(outcome, str), outcome
        assert code(outcome) == "bad_frame"
        await still_works(c)


@pytest.mark.parametrize("binary", [False, True])
async def test_past_the_hard_cap_the_connection_closes_with_1009(binary: bool) -> None:
    """docs/protocol.md, *Limits*: bad_frame up to 16 x max_frame, then close 1009."""
    cfg = GatewayConfig(max_frame=1024)
    assert cfg.message_cap == 16 * 1024
    async with running_gateway(cfg) as gw, client(gw, "cbor" if binary else "json") as c:
        await send_raw(c, padded(1025, binary))  # just over max_frame
        assert code(await answer(c)) == "bad_frame"
        await send_raw(c, padded(16 * 1024, binary))  # exactly the cap: still answered
        assert code(await answer(c)) == "bad_frame"
        await still_works(c)
        await send_raw(c, padded(16 * 1024 + 1, binary))
        closed = await close_code(c)
        assert closed[0] == 1009, closed
        async with client(gw, "json") as other:  # only that connection
            await still_works(other)


async def test_the_hard_cap_is_a_server_option() -> None:
    async with running_gateway(GatewayConfig(max_frame=1024, max_message=2048)) as gw, \
            client(gw, "json") as c:
        await send_raw(c, padded(2048))
        assert code(await answer(c)) == "bad_frame"
        await send_raw(c, padded(2049))
        assert (await close_code(c))[0] == 1009


# -- bad_request / unknown_op ------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("missing op", {"id": 1}),
    ("op not a string", {"op": 7, "id": 1}),
    ("missing field", {"op": "query", "id": 1}),
    ("missing qty", {"op": "place", "id": 1, "client_order_id": "a", "symbol": "BTC-PERP",
                     "side": "buy", "type": "limit", "price": "60000.0"}),
    ("unknown field", {"op": "ping", "id": 1, "color": "red"}),
    ("ill-typed channels", {"op": "subscribe", "id": 1, "channels": "book.BTC-PERP"}),
    ("malformed channel", {"op": "subscribe", "id": 1, "channels": ["candles.BTC-PERP"]}),
    ("no channels", {"op": "subscribe", "id": 1, "channels": []}),
    ("ill-typed user", {"op": "login", "id": 1, "user": 5, "password": "pw"}),
    ("bad user chars", {"op": "login", "id": 1, "user": "al ice", "password": "pw"}),
    ("long password", {"op": "login", "id": 1, "user": "alice", "password": "p" * 257}),
    ("ill-typed what", {"op": "query", "id": 1, "what": ["account"]}),
    ("unknown what", {"op": "query", "id": 1, "what": "everything"}),
    ("bool seq", {"op": "resume", "id": 1, "after_seq": True}),
    ("negative seq", {"op": "resume", "id": 1, "after_seq": -1}),
    ("huge seq", {"op": "ack", "id": 1, "seq": 2**63}),
    ("string order id", {"op": "cancel", "id": 1, "order_id": "12"}),
    ("both refs", {"op": "cancel", "id": 1, "order_id": 1, "client_order_id": "a"}),
    ("no ref", {"op": "cancel", "id": 1}),
    ("bad side", {"op": "place", "id": 1, **limit("a", "60000.0", "0.001", side="long")}),
    ("bad tif", {"op": "place", "id": 1, **limit("a", "60000.0", "0.001", tif="day")}),
    ("long cid", {"op": "place", "id": 1, **limit("a" * 37, "60000.0", "0.001")}),
    ("cid chars", {"op": "place", "id": 1, **limit("a/b", "60000.0", "0.001")}),
    ("post_only not bool", {"op": "place", "id": 1, **limit("a", "60000.0", "0.001",
                                                             post_only=1)}),
]


@pytest.mark.parametrize("enc", ["json", "cbor"])
async def test_bad_request_for_missing_unknown_and_ill_typed_fields(
        gateway: Gateway, enc: str) -> None:
    async with client(gateway, enc) as c:
        assert (await c.call("login", user="alice", password="pw"))["ok"]
        for name, msg in BAD_REQUESTS:
            await c.send(msg)
            f = await answer(c)
            assert code(f) == "bad_request", (name, f)
            assert f["id"] == 1, name
            await still_works(c)
        orders = await c.call("query", what="orders")
        assert orders["result"]["orders"] == []  # nothing changed


async def test_bad_request_with_an_invalid_id_echoes_null(gateway: Gateway) -> None:
    async with client(gateway, "json") as c:
        for bad_id in ["x" * 65, [1], {"a": 1}, 2**64]:
            await c.send({"op": "ping", "id": bad_id})
            f = await answer(c)
            assert code(f) == "bad_request"
            assert f["id"] is None
        await c.send({"op": "ping", "id": "x" * 64})  # the longest valid text id
        assert (await answer(c)) ["id"] == "x" * 64


async def test_second_login_is_bad_request(gateway: Gateway) -> None:
    async with client(gateway, "cbor") as c:
        assert (await c.call("login", user="alice", password="pw"))["ok"]
        assert code(await c.call("login", user="alice", password="pw")) == "bad_request"
        assert code(await c.call("login", user="bob", password="pw")) == "bad_request"
        assert (await c.call("query", what="account"))["ok"]


async def test_a_second_login_racing_the_first_is_bad_request(gateway: Gateway) -> None:
    """Regression: the second RouterAttach reply used to kill the bridge thread."""
    async with client(gateway, "json") as c, client(gateway, "json") as other:
        await c.send({"op": "login", "id": 1, "user": "alice", "password": "pw"})
        await c.send({"op": "login", "id": 2, "user": "carol", "password": "pw"})
        with trio.fail_after(5):
            got = {f["id"]: f for f in [await answer(c), await answer(c)]}
        assert got[1]["ok"] is True
        assert got[1]["result"]["user"] == "alice"
        assert code(got[2]) == "bad_request"
        # The engine is still reachable, for this connection and for others.
        with trio.fail_after(5):
            assert (await c.call("query", what="account"))["ok"]
            assert (await other.call("login", user="bob", password="pw"))["ok"]


async def test_concurrent_logins_on_two_connections() -> None:
    both = threading.Barrier(2, timeout=5)

    def check(user: str, password: str) -> bool:  # both verified in the same instant
        both.wait()
        return password == "pw"

    # Regression: the second login's open_account ask() used to return the first
    # login's GatewayBatch and kill the bridge thread (EngineError).
    async with custom_gateway(check=check) as gw, client(gw, "json") as a, \
            client(gw, "cbor") as b:
        await a.send({"op": "login", "id": 1, "user": "alice", "password": "pw"})
        await b.send({"op": "login", "id": 1, "user": "bob", "password": "pw"})
        with trio.fail_after(5):
            assert (await answer(a))["ok"]
            assert (await answer(b))["ok"]
            assert (await a.call("query", what="account"))["ok"]


async def test_unknown_op(gateway: Gateway) -> None:
    async with client(gateway, "cbor") as c:
        for op in ["teleport", "", "PING", "login2", "x" * 1000]:
            r = await c.call(op)
            assert code(r) == "unknown_op", op
            assert len(r["error"]["message"]) < 100  # the op is cut in the message
        await still_works(c)


# -- login ----------------------------------------------------------------------------------


async def test_not_logged_in_for_every_private_op(gateway: Gateway) -> None:
    async with client(gateway, "json") as c:
        private = [("place", limit("a", "60000.0", "0.001")), ("cancel", {"order_id": 1}),
                   ("cancel", {"client_order_id": "a"}), ("cancel_all", {}),
                   ("query", {"what": "account"}), ("query", {"what": "positions"}),
                   ("query", {"what": "orders"}), ("query", {"what": "trades"}),
                   ("resume", {"after_seq": 0})]
        for op, fields in private:
            assert code(await c.call(op, **fields)) == "not_logged_in", op
        await c.send({"op": "ack", "id": 5, "seq": 0})
        f = await answer(c)
        assert code(f) == "not_logged_in"
        assert f["id"] == 5  # an ack has no answer, but its error echoes its id
        # Public ops work before login.
        assert (await c.call("query", what="instruments"))["ok"]
        assert (await c.call("subscribe", channels=["ticker.BTC-PERP"]))["ok"]
        assert (await c.call("unsubscribe", channels=["ticker.BTC-PERP"]))["ok"]
        # not_logged_in is a business error: it never counts toward the 1008 close.
        for _ in range(40):
            assert code(await c.call("cancel_all")) == "not_logged_in"
        await still_works(c)


async def test_auth_failed(gateway: Gateway) -> None:
    async with client(gateway, "cbor") as c:
        assert code(await c.call("login", user="alice", password="nope")) == "auth_failed"
        assert code(await c.call("login", user="mallory", password="x")) == "auth_failed"
        assert code(await c.call("login", user="alice", password="")) == "auth_failed"
        assert code(await c.call("query", what="account")) == "not_logged_in"
        assert (await c.call("login", user="alice", password="pw"))["ok"]


def test_forbidden_is_reserved_and_has_no_producer() -> None:
    """The decision (docs/protocol.md, *Errors*): no v1 request is refused `forbidden`.

    The one case a real exchange might use it for — acting on another user's order —
    answers `unknown_order`, as for an order that does not exist (see the next test):
    an order id tells nobody whether someone else's order exists. The code stays in
    the enum, documented as reserved; a producer added later must change the docs.
    """
    sources = [p for d in ("gateway", "actors") for p in (ROOT / d).rglob("*.py")]
    sources += [p for p in (ROOT / "protocol").glob("*.py") if p.name != "_errors.py"]
    assert not [p for p in sources
                if "FORBIDDEN" in p.read_text() or '"forbidden"' in p.read_text()]
    doc = (ROOT / "docs" / "protocol.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `forbidden`"))
    assert "reserved" in row
    assert ErrorCode.FORBIDDEN.value == "forbidden"


async def test_another_users_order_is_unknown_order_indistinguishably(gateway: Gateway) -> None:
    async with client(gateway, "json") as alice, client(gateway, "cbor") as bob:
        assert (await alice.call("login", user="alice", password="pw"))["ok"]
        assert (await bob.call("login", user="bob", password="pw"))["ok"]
        sell = await alice.call("place", **limit("mine", "60500.0", "0.002", side="sell"))
        oid = sell["result"]["order_id"]
        nobody = 123456789
        theirs = await bob.call("cancel", order_id=oid)
        missing = await bob.call("cancel", order_id=nobody)
        assert code(theirs) == code(missing) == "unknown_order"
        assert theirs["error"]["message"].replace(str(oid), "N") == \
            missing["error"]["message"].replace(str(nobody), "N")
        theirs = await bob.call("cancel", client_order_id="mine")
        missing = await bob.call("cancel", client_order_id="none")
        assert code(theirs) == code(missing) == "unknown_order"
        assert theirs["error"]["message"].replace("mine", "X") == \
            missing["error"]["message"].replace("none", "X")
        # Nothing happened to alice's order.
        orders = (await alice.call("query", what="orders"))["result"]["orders"]
        assert [o["order_id"] for o in orders] == [oid]
        assert not [e for e in alice.private if e["kind"] == "order_canceled"]


# -- orders ----------------------------------------------------------------------------------


async def test_unknown_symbol_for_place_subscribe_and_cancel_all(gateway: Gateway) -> None:
    async with client(gateway, "json") as c:
        for ch in ["book.DOGE", "trades.BTC-USDT", "ticker.X"]:
            assert code(await c.call("subscribe", channels=[ch])) == "unknown_symbol", ch
        # All or nothing: a known channel next to an unknown one is not taken.
        r = await c.call("subscribe", channels=["trades.BTC-PERP", "trades.DOGE"])
        assert code(r) == "unknown_symbol"
        assert code(await c.call("unsubscribe", channels=["book.DOGE"])) == "unknown_symbol"
        assert (await c.call("login", user="alice", password="pw"))["ok"]
        for sym in ["DOGE", "btc-perp", "", "BTC-PERP "]:
            r = await c.call("place", **limit("u1", "1.0", "1", symbol=sym))
            assert code(r) == "unknown_symbol", sym
        assert code(await c.call("cancel_all", symbol="DOGE")) == "unknown_symbol"
        assert (await c.call("cancel_all", symbol="BTC-PERP"))["result"] == {"canceled": 0}
        # The refused cid was never used: it places fine now.
        ok = await c.call("place", **limit("u1", "60000.0", "0.001"))
        assert ok["ok"] and "duplicate" not in ok["result"]


@pytest.mark.parametrize("price", [
    "60000.05",  # off the 0.1 tick
    "66000.1", "53999.9",  # one tick outside the ±10% band around 60000.0
    "100000.0", "0.1",
    "0", "0.0", "-60000.0",  # not positive
    "6e4", "60,000.0", " 60000.0", "+60000.0", "60000.", ".5", "٦٠٠٠٠",  # malformed
])
async def test_invalid_price(gateway: Gateway, price: str) -> None:
    async with client(gateway, "cbor") as c:
        assert (await c.call("login", user="alice", password="pw"))["ok"]
        r = await c.call("place", **limit("p1", price, "0.001"))
        assert code(r) == "invalid_price", r
        assert r["id"] == c.ids
        assert (await c.call("query", what="orders"))["result"]["orders"] == []


async def test_invalid_price_band_edges_and_market_rules(gateway: Gateway) -> None:
    async with client(gateway, "json") as c:
        assert (await c.call("login", user="alice", password="pw"))["ok"]
        for i, price in enumerate(["66000.0", "54000.0"]):  # the band edges are inside
            r = await c.call("place", **limit(f"e{i}", price, "0.001", side="sell"
                                               if price == "66000.0" else "buy"))
            assert r["ok"], (price, r)
        r = await c.call("place", client_order_id="m1", symbol="BTC-PERP", side="buy",
                         type="market", price="60000.0", qty="0.001")
        assert code(r) == "invalid_price"  # a market order takes no price
        r = await c.call("place", client_order_id="m2", symbol="BTC-PERP", side="buy",
                         type="limit", qty="0.001")
        assert code(r) == "invalid_price"  # a limit order needs one
        r = await c.call("place", **limit("m3", 60000.0, "0.001"))  # type: ignore[arg-type]
        assert code(r) == "invalid_price"  # a number in place of a decimal string


@pytest.mark.parametrize("qty", ["0.0005", "0.0011", "0", "-0.001", "1e-3", "0.001 ", ""])
async def test_invalid_qty(gateway: Gateway, qty: str) -> None:
    async with client(gateway, "json") as c:
        assert (await c.call("login", user="alice", password="pw"))["ok"]
        r = await c.call("place", **limit("q1", "60000.0", qty))
        assert code(r) == "invalid_qty", r
        await still_works(c)


async def test_insufficient_funds_and_position_limit_change_nothing(gateway: Gateway) -> None:
    async with client(gateway, "cbor") as c:
        assert (await c.call("login", user="alice", password="pw"))["ok"]
        before = (await c.call("query", what="account"))["result"]
        last_seq = len(c.private)
        poor = await c.call("place", **limit("f1", "6000.00", "400", symbol="ESZ6"))
        assert code(poor) == "insufficient_funds"
        big = await c.call("place", **limit("f2", "60000.0", "100.001"))
        assert code(big) == "position_limit"
        assert code(await c.call("place", **limit("f3", "60000.0", "100.001",
                                                   side="sell"))) == "position_limit"
        assert (await c.call("query", what="account"))["result"] == before
        assert (await c.call("query", what="orders"))["result"]["orders"] == []
        await still_works(c)
        assert len(c.private) == last_seq  # a risk refusal emits no event


async def test_unknown_order(gateway: Gateway) -> None:
    async with client(gateway, "json") as alice, client(gateway, "json") as bob:
        assert (await alice.call("login", user="alice", password="pw"))["ok"]
        assert (await bob.call("login", user="bob", password="pw"))["ok"]
        assert code(await alice.call("cancel", order_id=123456789)) == "unknown_order"
        assert code(await alice.call("cancel", order_id=2**63 - 1)) == "unknown_order"
        assert code(await alice.call("cancel", client_order_id="never")) == "unknown_order"
        sell = await alice.call("place", **limit("s1", "60500.0", "0.002", side="sell"))
        oid = sell["result"]["order_id"]
        # Another user's id (or cid) is unknown to you, indistinguishably.
        assert code(await bob.call("cancel", order_id=oid)) == "unknown_order"
        assert code(await bob.call("cancel", client_order_id="s1")) == "unknown_order"
        assert (await alice.call("cancel", order_id=oid))["result"]["status"] == "canceled"
        # Canceled: no longer open, so unknown now.
        assert code(await alice.call("cancel", order_id=oid)) == "unknown_order"
        await still_works(bob)


async def test_market_halted_for_a_halted_instrument() -> None:
    async with custom_gateway(toml=HALTED_TOML) as gw, client(gw, "json") as c:
        inst = (await c.call("query", what="instruments"))["result"]["instruments"]
        assert {i["symbol"]: i["status"] for i in inst}["HALT-PERP"] == "halted"
        assert (await c.call("login", user="alice", password="pw"))["ok"]
        r = await c.call("place", **limit("h1", "100.0", "0.001", symbol="HALT-PERP"))
        assert code(r) == "market_halted", r
        # The order had been numbered, so the refusal is also a private event.
        events = await c.events_until(1)
        rejected = [e for e in events if e["kind"] == "order_rejected"]
        assert rejected and rejected[0]["data"]["code"] == "market_halted"
        assert rejected[0]["priority"] == 0
        assert (await c.call("query", what="orders"))["result"]["orders"] == []
        assert (await c.call("place", **limit("h2", "60000.0", "0.001")))["ok"]


# -- limits -----------------------------------------------------------------------------------


async def test_rate_limited_after_the_burst() -> None:
    cfg = GatewayConfig(session=SessionConfig(rate_per_s=1, burst=3))
    async with running_gateway(cfg) as gw, client(gw, "json") as c, client(gw, "json") as d:
        for i in range(6):
            await c.send({"op": "ping", "id": i})
        got = [await answer(c) for _ in range(6)]
        assert [f["id"] for f in got] == list(range(6))
        assert [f["type"] for f in got[:3]] == ["pong"] * 3
        assert [code(f) for f in got[3:]] == ["rate_limited"] * 3
        # Bad frames are refused before the bucket (still answered), and the bucket is
        # per connection: another connection is not limited.
        await send_raw(c, "{")
        assert code(await answer(c)) == "bad_frame"
        await still_works(d)


async def test_too_many_sessions() -> None:
    cfg = GatewayConfig(session=SessionConfig(max_sessions_per_user=1))
    async with running_gateway(cfg) as gw:
        async with client(gw, "json") as a1, client(gw, "cbor") as a2:
            assert (await a1.call("login", user="alice", password="pw"))["ok"]
            assert code(await a2.call("login", user="alice", password="pw")) == \
                "too_many_sessions"
            assert code(await a2.call("query", what="account")) == "not_logged_in"
            assert (await a2.call("login", user="bob", password="pw"))["ok"]
        async with client(gw, "json") as a3:  # alice's session is gone: room again
            with trio.fail_after(10):
                while True:
                    r = await a3.call("login", user="alice", password="pw")
                    if r["ok"]:
                        break
                    assert code(r) == "too_many_sessions"  # the close is still in flight


async def test_replay_unavailable_when_the_log_moved_on() -> None:
    async with custom_gateway(replay_capacity=4) as gw, client(gw, "json") as c:
        assert (await c.call("login", user="alice", password="pw"))["ok"]
        for i in range(5):
            assert (await c.call("place", **limit(f"r{i}", "60500.0", "0.001",
                                                  side="sell")))["ok"]
        with trio.fail_after(10):
            while sum(e["kind"] == "order_accepted" for e in c.private) < 5:
                await c.frame()
        last = c.private[-1]["seq"]
        assert last >= 5  # so seq 1 has left a log of 4
        r = await c.call("resume", after_seq=0)
        assert code(r) == "replay_unavailable", r
        ok = await c.call("resume", after_seq=last - 2)
        assert ok["result"] == {"from_seq": last - 1, "to_seq": last}
        await still_works(c)


async def test_resume_beyond_the_last_seq_is_bad_request(gateway: Gateway) -> None:
    async with client(gateway, "json") as c:
        login = await c.call("login", user="alice", password="pw")
        last = login["result"]["last_seq"]
        assert code(await c.call("resume", after_seq=last + 1000)) == "bad_request"
        await still_works(c)


async def test_refused_resume_changes_no_delivery_state(gateway: Gateway) -> None:
    """Regression: begin_resume ran before the router's check, so a resume refused for
    an after_seq beyond the last seq left the session there and dropped live events."""
    async with client(gateway, "json") as alice, client(gateway, "json") as bob:
        login = await alice.call("login", user="alice", password="pw")
        assert (await bob.call("login", user="bob", password="pw"))["ok"]
        last = login["result"]["last_seq"]
        assert code(await alice.call("resume", after_seq=last + 1000)) == "bad_request"
        assert (await alice.call("place", **limit("z1", "60500.0", "0.001", side="sell")))["ok"]
        with trio.fail_after(3):
            events = await alice.events_until(1)
        assert events[0]["seq"] == last + 1


async def await_accepted(c: Client, cids: set[str]) -> list[int]:
    """Read until every order in ``cids`` was accepted; the private seqs so far."""
    with trio.fail_after(10):
        while not cids <= {e["data"].get("client_order_id") for e in c.private
                           if e["kind"] == "order_accepted"}:
            await c.frame()
    return [e["seq"] for e in c.private]


@pytest.mark.parametrize("refused", [True, False])
async def test_live_events_racing_a_resume_are_neither_lost_nor_doubled(
        gateway: Gateway, refused: bool) -> None:
    """A resume pipelined behind places: their events may reach the gateway while the
    router's answer is on its way. Refused, the stream goes on as if nothing was asked;
    accepted, everything after ``after_seq`` follows the answer, each seq once."""
    async with client(gateway, "json") as alice:
        last = (await alice.call("login", user="alice", password="pw"))["result"]["last_seq"]
        after = last + 1000 if refused else last
        for i in range(3):
            await alice.send({"op": "place", "id": f"p{i}",
                              **limit(f"race{i}", "60500.0", "0.001", side="sell")})
        await alice.send({"op": "resume", "id": "r", "after_seq": after})
        await alice.send({"op": "place", "id": "p3",
                          **limit("race3", "60500.0", "0.001", side="sell")})
        got: dict[str, dict[str, Any]] = {}
        with trio.fail_after(10):
            while len(got) < 5:
                f = await answer(alice)
                got[f["id"]] = f
                if f["id"] == "r":
                    split = len(alice.private)  # events pushed before the answer
        assert all(got[f"p{i}"]["ok"] for i in range(4))
        seqs = await await_accepted(alice, {f"race{i}" for i in range(4)})
        if refused:
            assert code(got["r"]) == "bad_request"
        else:
            assert got["r"]["result"]["from_seq"] == last + 1
            # What came before the answer was sent live; the client asked for it again.
            assert seqs[:split] == list(range(last + 1, last + 1 + split))
            seqs = seqs[split:]
        assert seqs == list(range(last + 1, last + 1 + len(seqs)))  # gapless, each once


async def test_internal_when_the_engine_fails(gateway: Gateway,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """No request from the wire reaches an engine bug; simulate one to check the path."""
    real = AccountDesk._query
    failures = [1]

    def broken(self: AccountDesk, msg: Any) -> Any:
        if failures:
            failures.pop()
            raise RuntimeError("simulated engine bug")
        return real(self, msg)

    monkeypatch.setattr(AccountDesk, "_query", broken)
    async with client(gateway, "json") as c:
        assert (await c.call("login", user="alice", password="pw"))["ok"]
        r = await c.call("query", what="account")
        assert code(r) == "internal"
        assert "RuntimeError" in r["error"]["message"]
        assert (await c.call("query", what="account"))["ok"]  # the actor survived


# -- timeout ----------------------------------------------------------------------------


async def test_timeout_answers_a_request_the_engine_lost() -> None:
    from actors.messages import AccountQuery

    async with running_gateway(GatewayConfig(port=0, request_timeout_s=1.0)) as gw, \
            client(gw, "json") as c:
        assert (await c.call("login", user="alice", password="pw"))["ok"]
        lost = lose(gw, AccountQuery)
        r = await c.call("query", what="account")
        assert code(r) == "timeout" and lost, r
        assert "within 1 s" in r["error"]["message"]
        assert (await c.call("query", what="account"))["ok"]  # the next one is answered
        assert not gw._pending


async def test_a_timed_out_place_repeated_gets_the_original_order() -> None:
    async with running_gateway(GatewayConfig(port=0, request_timeout_s=1.0)) as gw, \
            client(gw, "json") as c:
        assert (await c.call("login", user="alice", password="pw"))["ok"]
        dropped = drop_first_reply(gw, "place")  # the order is placed, its answer lost
        r = await c.call("place", **limit("t1", "59000.0", "0.001"))
        assert code(r) == "timeout" and dropped, r
        again = await c.call("place", **limit("t1", "59000.0", "0.001"))
        assert again["ok"] and again["result"]["duplicate"] is True, again
        assert again["result"]["order_id"] == dropped[0].result["order_id"]


async def test_a_login_that_timed_out_can_be_tried_again() -> None:
    from actors.messages import RouterAttach

    async with running_gateway(GatewayConfig(port=0, request_timeout_s=1.0)) as gw, \
            client(gw, "json") as c:
        lose(gw, RouterAttach)
        assert code(await c.call("login", user="alice", password="pw")) == "timeout"
        assert code(await c.call("query", what="account")) == "not_logged_in"
        assert (await c.call("login", user="alice", password="pw"))["ok"]
        assert (await c.call("query", what="account"))["ok"]


async def test_a_lost_book_snapshot_is_asked_for_again() -> None:
    from actors.messages import BookSnapshotRequest

    async with running_gateway(GatewayConfig(port=0, request_timeout_s=1.0)) as gw, \
            client(gw, "json") as c:
        lost = lose(gw, BookSnapshotRequest)
        assert (await c.call("subscribe", channels=["book.BTC-PERP"]))["ok"]
        while not c.market:
            await c.frame()
        assert lost and c.market[0]["kind"] == "snapshot" and c.market[0]["seq"] == 1


async def test_1008_after_consecutive_bad_frames() -> None:
    async with running_gateway(GatewayConfig(max_consecutive_bad=3)) as gw, \
            client(gw, "json") as c:
        # A good frame or a business error in between: never closed.
        for _ in range(5):
            await send_raw(c, "{")
            await c.send({"op": "nope", "id": 1})
            assert code(await answer(c)) == "bad_frame"
            assert code(await answer(c)) == "unknown_op"
            assert code(await c.call("query", what="account")) == "not_logged_in"
            await still_works(c)
        # Three in a row: the third is still answered, then 1008.
        await send_raw(c, "{")
        assert code(await answer(c)) == "bad_frame"
        await c.send({"op": "ping", "junk": 1})
        assert code(await answer(c)) == "bad_request"
        await c.send({"op": "nope"})
        assert code(await answer(c)) == "unknown_op"
        assert await close_code(c) == (1008, "too many bad frames")


async def test_the_frame_that_triggers_1008_is_still_answered() -> None:
    """Regression: the reader closed right after queueing the answer, and the close
    won the stream lock over the writer, so the answer was never sent."""
    async with running_gateway(GatewayConfig(max_consecutive_bad=3)) as gw, \
            client(gw, "json") as c:
        for _ in range(2):
            await send_raw(c, "{")
            assert code(await answer(c)) == "bad_frame"
        await send_raw(c, "{")
        try:
            last: dict[str, Any] | None = await answer(c)
        except ConnectionClosed:
            last = None
            await shut(c)
        closed = await close_code(c) if last is not None else (1008, None)
    assert last is not None, "closed with 1008 without answering the third bad frame"
    assert code(last) == "bad_frame"
    assert closed[0] == 1008


async def test_pipelined_answers_go_out_before_the_1008() -> None:
    async with running_gateway(GatewayConfig(max_consecutive_bad=3)) as gw, \
            client(gw, "cbor") as c:
        frames: list[bytes | str] = [cbor2.dumps({"op": "ping", "id": i}) for i in range(20)]
        frames += [b"\xff", cbor2.dumps([1]), cbor2.dumps({"op": "nope", "id": 99})]
        frames += [cbor2.dumps({"op": "ping", "id": 100})]  # after the close: unanswered
        for data in frames:  # in one go: the answers queue up behind each other
            await send_raw(c, data)
        got = []
        with trio.fail_after(10), contextlib.suppress(ConnectionClosed):
            while True:
                got.append(await answer(c))
        await shut(c)
        assert [f["id"] for f in got[:20]] == list(range(20))
        assert [f["type"] for f in got[:20]] == ["pong"] * 20
        assert [code(f) for f in got[20:]] == ["bad_frame", "bad_frame", "unknown_op"]
        assert got[-1]["id"] == 99
        assert c.ws.closed is not None and c.ws.closed.code == 1008


async def test_a_stuck_writer_delays_the_close_by_a_bounded_time() -> None:
    """The drain before a server-side close waits ``close_drain_s`` at most.

    A client whose socket takes nothing is simulated by a writer that never returns;
    its queue fills, the connection is cut (slow_consumer) and closed all the same.
    """
    cfg = GatewayConfig(outbound_queue=4, close_drain_s=0.2)
    async with running_gateway(cfg) as gw, client(gw, "json") as c:
        await still_works(c)
        (conn,) = gw.conns.values()

        async def stuck(data: bytes | str) -> None:
            await trio.sleep_forever()

        conn.ws.send_message = stuck  # type: ignore[method-assign]
        start = trio.current_time()
        with contextlib.suppress(ConnectionClosed):
            for i in range(10):  # one in the writer, 4 queued, then the queue is full
                await c.send({"op": "ping", "id": i})
        assert await close_code(c) == (1008, "slow_consumer")
        assert trio.current_time() - start >= 0.15  # the queue had its chance to drain
        async with client(gw, "json") as other:
            await still_works(other)


async def test_idle_timeout_closes_a_silent_connection() -> None:
    async with running_gateway(GatewayConfig(idle_timeout_s=0.3)) as gw, \
            client(gw, "json") as silent:
        start = trio.current_time()
        code_, reason = await close_code(silent)
        assert code_ == 1001
        assert reason is not None and "idle" in reason
        assert trio.current_time() - start >= 0.25
        async with client(gw, "json") as fresh:  # the server still accepts
            await still_works(fresh)


async def test_the_idle_timeout_counts_from_the_last_frame() -> None:
    """The reader sets its idle deadline from the last frame only when the deadline
    expires: a connection that keeps talking outlives many timeouts."""
    async with running_gateway(GatewayConfig(idle_timeout_s=0.3)) as gw, \
            client(gw, "json") as talker:
        start = last = trio.current_time()
        while last - start < 1.0:
            await trio.sleep(0.1)
            assert (await talker.call("ping"))["type"] == "pong"
            last = trio.current_time()
        code_, reason = await close_code(talker)
        assert code_ == 1001 and reason is not None and "idle" in reason
        assert trio.current_time() - last >= 0.25


# -- fan-out and slow consumers ---------------------------------------------------------------


async def test_two_sessions_of_one_user_get_the_same_private_events(gateway: Gateway) -> None:
    async with client(gateway, "json") as a1, client(gateway, "cbor") as a2, \
            client(gateway, "json") as bob:
        l1 = await a1.call("login", user="alice", password="pw")
        l2 = await a2.call("login", user="alice", password="pw")
        assert l1["result"]["session"] != l2["result"]["session"]
        assert (await bob.call("login", user="bob", password="pw"))["ok"]
        assert (await a1.call("place", **limit("t1", "60100.0", "0.005", side="sell")))["ok"]
        for i in range(3):
            r = await bob.call("place", **limit(f"b{i}", "60100.0", "0.001"))
            assert r["result"]["status"] == "filled"
        fills = []
        for a in (a1, a2):
            with trio.fail_after(10):
                while sum(e["kind"] == "trade_executed" for e in a.private) < 3:
                    await a.frame()
            fills.append([e["seq"] for e in a.private if e["kind"] == "trade_executed"])
        assert fills[0] == fills[1]
        n = min(len(a1.private), len(a2.private))
        assert [e["seq"] for e in a1.private[:n]] == [e["seq"] for e in a2.private[:n]]
        assert [e["data"] for e in a1.private[:n]] == [e["data"] for e in a2.private[:n]]
        # The response went only to the connection that asked.
        assert not [f for f in a2.other if f.get("id") == 1]


async def test_slow_consumer_is_cut_while_others_keep_trading() -> None:
    """A session that never acks is cut (1008 slow_consumer) past ``hard_bound``.

    The session's backlog is the deterministic bound: the outbound queue only fills
    once the kernel's socket buffers are full, which a test cannot time.
    """
    cfg = GatewayConfig(outbound_queue=64, session=SessionConfig(window=2, hard_bound=20))
    async with running_gateway(cfg) as gw, client(gw, "json") as lazy, \
            client(gw, "json") as alice, client(gw, "json") as bob:
        assert (await lazy.call("login", user="alice", password="pw"))["ok"]
        assert (await alice.call("login", user="alice", password="pw"))["ok"]
        assert (await bob.call("login", user="bob", password="pw"))["ok"]
        assert (await alice.call("place", **limit("s", "60100.0", "1.000", side="sell")))["ok"]
        for i in range(12):
            r = await bob.call("place", **limit(f"b{i}", "60100.0", "0.001"))
            assert r["result"]["status"] == "filled"
            if bob.private:
                await bob.send({"op": "ack", "seq": bob.private[-1]["seq"]})
            # The attentive session acks each fill's events, so it is never cut.
            with trio.fail_after(10):
                while sum(e["kind"] == "trade_executed" for e in alice.private) <= i:
                    await alice.frame()
            await alice.send({"op": "ack", "seq": alice.private[-1]["seq"]})
        assert await close_code(lazy) == (1008, "slow_consumer")
        assert (await bob.call("query", what="positions"))["result"]["positions"][0][
            "long_qty"] == "0.012"
        await still_works(alice)
        seqs = [e["seq"] for e in alice.private]
        assert seqs == sorted(set(seqs))  # increasing, no duplicate
        # P0/P1 are never conflated: every fill is there.
        assert sum(e["kind"] == "order_partially_filled" for e in alice.private) == 12


async def test_a_slow_consumer_cut_still_cancels_on_disconnect() -> None:
    """Regression: the cut removed the session from the hub at once, so the close
    that followed no longer saw the user's last session: no router detach, and
    cancel_on_disconnect was skipped ("still has sessions")."""
    # One session per user, so the second login proves the first one is gone; no rate
    # limit, so the second session can ask until the cancel has gone through the books.
    cfg = GatewayConfig(session=SessionConfig(window=2, hard_bound=8, max_sessions_per_user=1,
                                              rate_per_s=1_000_000, burst=1_000_000))
    async with running_gateway(cfg) as gw:
        async with client(gw, "json") as lazy:
            assert (await lazy.call("login", user="carol", password="pw",
                                    cancel_on_disconnect=True))["ok"]
            resting = 0
            with contextlib.suppress(ConnectionClosed):
                for i in range(20):  # resting orders, their events never acked
                    r = await lazy.call("place", **limit(f"c{i}", "60500.0", "0.001",
                                                         side="sell"))
                    assert r["result"]["status"] == "open"
                    resting += 1
                while True:
                    await lazy.frame()
            assert lazy.ws.closed is not None
            assert (lazy.ws.closed.code, lazy.ws.closed.reason) == (1008, "slow_consumer")
            await shut(lazy)
        assert resting >= 1
        async with client(gw, "json") as back:
            with trio.fail_after(10):
                while not (r := await back.call("login", user="carol", password="pw"))["ok"]:
                    assert code(r) == "too_many_sessions"  # the close is still in flight
                while (await back.call("query", what="orders"))["result"]["orders"]:
                    pass  # the cancel_all is on its way through the books


async def test_frames_in_flight_after_a_slow_consumer_cut_are_harmless() -> None:
    """Regression: a frame arriving after the cut used to raise KeyError and end serve()."""
    cfg = GatewayConfig(session=SessionConfig(window=2, hard_bound=8))
    async with running_gateway(cfg) as gw, client(gw, "json") as lazy:
        assert (await lazy.call("login", user="alice", password="pw"))["ok"]
        closed: list[tuple[int, str | None]] = []

        async def read_never_ack() -> None:  # reads (to see the close), never acks
            closed.append(await close_code(lazy))
            nursery.cancel_scope.cancel()

        async def keep_talking() -> None:  # so a frame is in flight when the cut lands
            with contextlib.suppress(ConnectionClosed):
                for i in range(30):
                    await lazy.send({"op": "place", "id": i, **limit(
                        f"p{i}", "60500.0", "0.001", side="sell")})
                while True:
                    await lazy.send({"op": "ping"})

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_never_ack)
                nursery.start_soon(keep_talking)
        assert closed == [(1008, "slow_consumer")]
        async with client(gw, "json") as other:  # the gateway still serves
            with trio.fail_after(5):
                assert (await other.call("login", user="bob", password="pw"))["ok"]
                assert (await other.call("query", what="account"))["ok"]


async def test_a_full_engine_queue_refuses_at_once_and_a_login_can_be_sent_again() -> None:
    """The bridge's queue full (its thread held in a call): every call from trio raises
    BridgeBusy at once instead of blocking the event loop, a login is answered
    ``rate_limited`` and can be sent again (it used to stay "in progress" for ever when
    its RouterAttach found the queue full), and a waiting submit goes in once there
    is room."""
    bridge = EngineBridge(BridgeOptions(engine=config(), max_pending=4))
    gw = Gateway(bridge, parse_instruments(TOML), lambda u, p: p == "pw",
                 GatewayConfig(port=0))
    entered, release = threading.Event(), threading.Event()

    def hold(link: EngineLink) -> None:
        entered.set()
        release.wait(30)

    async with trio.open_nursery() as nursery:
        await nursery.start(gw.serve)
        try:
            # Eight requests through a queue of four: the waiting calls wait for room.
            opened = await bridge.open_accounts_waiting(*USERS)
            for user in USERS:
                await bridge.submit_waiting(Dest("account", user), AccountDeposit(
                    reply_to=None, user=user, amount=MILLION, ts=1))
            with trio.fail_after(10):
                await trio.to_thread.run_sync(opened.wait)
            async with client(gw, "json") as c:
                bridge.call(hold)
                with trio.fail_after(10):
                    await trio.to_thread.run_sync(entered.wait)
                for _ in range(3):
                    bridge.call(lambda link: None)
                # One slot left: the login's open_account takes it, its RouterAttach
                # finds the queue full.
                assert code(await c.call("login", user="alice", password="pw")) == "rate_limited"
                # Full: the open_account itself is refused.
                assert code(await c.call("login", user="alice", password="pw")) == "rate_limited"
                with pytest.raises(BridgeBusy):
                    bridge.submit(Dest("account", "bob"), AccountDeposit(
                        reply_to=None, user="bob", amount=1, ts=2))
                with pytest.raises(BridgeBusy):
                    bridge.open_accounts("erin")
                with pytest.raises(BridgeBusy):
                    bridge.call(lambda link: None)
                deposited = trio.Event()

                async def deposit() -> None:
                    await bridge.submit_waiting(Dest("account", "alice"), AccountDeposit(
                        reply_to=None, user="alice", amount=MILLION, ts=3))
                    deposited.set()

                nursery.start_soon(deposit)
                await trio.testing.wait_all_tasks_blocked()
                assert not deposited.is_set()  # no room while the bridge is held
                release.set()
                with trio.fail_after(10):
                    await deposited.wait()
                assert (await c.call("login", user="alice", password="pw"))["ok"]
                account = await c.call("query", what="account")
                assert account["result"]["balance"] == "2000000.0000"  # both deposits
        finally:
            release.set()
            nursery.cancel_scope.cancel()


async def test_a_failed_bridge_stops_the_gateway_with_its_error() -> None:
    # A bridge thread that died (a tell to a kill -9'd host used to end it) left the
    # gateway serving with no engine: every request hung until its timeout. Now the
    # gateway closes its connections and serve() raises BridgeFailed with the cause.
    from gateway.bridge import BridgeFailed
    from gateway.cli import load_instruments

    bridge = EngineBridge(BridgeOptions(engine=config()))
    gw = Gateway(bridge, load_instruments(None), lambda u, p: p == "pw",
                 GatewayConfig(port=0))

    def transport_down(link: Any, items: Any) -> None:
        raise RuntimeError("transport down")

    closed = False
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(gw.serve)
            async with client(gw, "json") as c:
                bridge._send = transport_down  # type: ignore[method-assign]
                await c.send({"op": "login", "id": 1, "user": "alice", "password": "pw"})
                with trio.fail_after(10):
                    try:
                        while True:
                            await c.frame()
                    except ConnectionClosed:
                        closed = True
    assert closed
    failures = [e for e in info.value.exceptions if isinstance(e, BridgeFailed)]
    assert len(failures) == 1 and "transport down" in str(failures[0])
    assert isinstance(bridge.failure, RuntimeError)


def test_the_cli_finds_a_bridge_failure_inside_trio_exception_groups() -> None:
    from gateway.bridge import BridgeFailed
    from gateway.cli import _bridge_failure

    failed = BridgeFailed("the engine bridge failed: boom")
    nested = BaseExceptionGroup("run", [trio.Cancelled._create(),  # type: ignore[attr-defined]
                                        ExceptionGroup("serve", [failed])])
    assert _bridge_failure(nested) is failed
    assert _bridge_failure(failed) is failed
    assert _bridge_failure(ExceptionGroup("other", [ValueError("x")])) is None
