"""Fuzz a live gateway: 10,000+ random and mutated frames, while others keep trading.

A seeded ``random.Random`` (deterministic) makes random bytes, random text,
maps of known field names with junk values, and bit-flipped / truncated /
spliced copies of valid requests. They go out pipelined (a batch, then as many
answers) over four connections — JSON and CBOR, two anonymous and two logged
in — with a ``ping`` every few frames so the 1008 rule (consecutive bad frames)
never fires by accident; a separate phase makes it fire on purpose and goes on
over a fresh connection. Meanwhile alice and bob trade ETH-PERP before, during
(a concurrent task) and after the fuzz, and their private seqs stay gapless.

Checked: the server never goes down; every frame gets exactly one answer,
either a typed error (a code from PROTOCOL.md) or a valid response/pong.
"""

from __future__ import annotations

import json
import math
import random
import time
from typing import Any

import cbor2
import pytest
import trio
from gateway_kit import Client, client, running_gateway
from trio_websocket import ConnectionClosed

from actors.cores.session import SessionConfig
from gateway.server import Gateway, GatewayConfig
from protocol import Ack, ErrorCode, RemoteProtocolError, decode_request

SEED = 20261123
FRAMES = 10_400
BATCH = 64
PING_EVERY = 8  # never 32 bad frames in a row by accident
CODES = {c.value for c in ErrorCode}
OPS = ["login", "subscribe", "unsubscribe", "place", "cancel", "cancel_all", "query",
       "resume", "ack", "ping", "teleport", "", "PLACE", "ping\x00"]
FIELDS = ["op", "id", "user", "password", "channels", "client_order_id", "symbol", "side",
          "type", "price", "qty", "tif", "post_only", "order_id", "what", "after_seq", "seq",
          "cancel_on_disconnect", "junk", ""]
SYMBOLS = ["BTC-PERP", "ESZ6", "DOGE", "btc-perp", "BTC-PERP\u200b", ""]
WEIRD_TEXT = ["\u202e", "\x00", "\U0001f4a9", "\ufeff", "\u0663", "e\u0301", "\\", '"',
              "a" * 70, "\n", "ｆｕｌｌ", "null"]
VALID: list[dict[str, Any]] = [
    {"op": "ping", "id": 1},
    {"op": "query", "id": "q", "what": "instruments"},
    {"op": "query", "id": 2, "what": "account"},
    {"op": "subscribe", "id": 3, "channels": ["trades.BTC-PERP", "ticker.ESZ6"]},
    {"op": "unsubscribe", "id": 4, "channels": ["trades.BTC-PERP"]},
    {"op": "place", "id": 5, "client_order_id": "fz-1", "symbol": "BTC-PERP", "side": "buy",
     "type": "limit", "price": "50000.0", "qty": "0.001", "tif": "ioc"},
    {"op": "cancel", "id": 6, "order_id": 123},
    {"op": "cancel", "id": 7, "client_order_id": "nope"},
    {"op": "cancel_all", "id": 8, "symbol": "ESZ6"},
    {"op": "resume", "id": 9, "after_seq": 0},
    {"op": "login", "id": 10, "user": "alice", "password": "not-the-password"},
]


def encodable_id(value: Any) -> bool:
    """Whether an id can be echoed in both encodings (no NaN/inf, no lone surrogate)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return not any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    return True


class Fuzzer:
    """Deterministic frame factory."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.kinds: dict[str, int] = {}
        self.unencodable_ids = 0

    def _count(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def junk(self, depth: int = 0, *, json_safe: bool) -> Any:
        """A junk value; ``json_safe``: for a JSON frame (lone surrogates), else CBOR."""
        r = self.r
        choice = r.randrange(14 if depth < 3 else 10)
        if choice == 0:
            return r.randint(-(2**70), 2**70)
        if choice == 1:
            return r.choice([0, -1, 1, 2**63 - 1, 2**63, -(2**63), 2**64, 10**30])
        if choice == 2:
            return r.choice([0.5, -0.0, 1e308, 3.14, 60000.0])
        if choice == 3:
            return r.choice([True, False, None])
        if choice == 4:
            return "".join(r.choice(WEIRD_TEXT) for _ in range(r.randrange(4)))
        if choice == 5:
            return "".join(chr(r.randrange(0x20, 0x3000)) for _ in range(r.randrange(40)))
        if choice == 6:
            return r.choice(["60000.0", "0.001", "1e3", "-1", "0", "60000.05", "NaN",
                             "99999999999999999999.999999999999999999", "١٢"])
        if choice == 7:
            return r.choice([*SYMBOLS, "book.BTC-PERP", "trades.DOGE", "ticker."])
        if choice == 8:
            return r.choice(OPS)
        if choice == 9:
            return "x" * r.choice([64, 65, 300, 5000])
        if choice in (10, 11):
            return [self.junk(depth + 1, json_safe=json_safe) for _ in range(r.randrange(4))]
        if choice == 12:
            return {str(self.junk(depth + 1, json_safe=json_safe)): self.junk(
                depth + 1, json_safe=json_safe) for _ in range(r.randrange(3))}
        if json_safe:
            return "\ud800" if r.random() < 0.3 else "tail"  # a lone surrogate
        return r.choice([b"\x00\xff", cbor2.CBORTag(1, 0), float("nan"), {1: 2}, (1, 2)])

    def junk_map(self, *, json_safe: bool) -> dict[Any, Any]:
        r = self.r
        base: dict[Any, Any] = dict(r.choice(VALID)) if r.random() < 0.5 else {}
        if r.random() < 0.8:
            base["op"] = r.choice(OPS) if r.random() < 0.7 else self.junk(json_safe=json_safe)
        for _ in range(r.randrange(5)):
            base[r.choice(FIELDS)] = self.junk(json_safe=json_safe)
        if r.random() < 0.3 and base:
            del base[r.choice(list(base))]
        if not json_safe and r.random() < 0.1:
            base[r.choice([1, b"op", None])] = "x"  # non-text keys: CBOR only
        if not encodable_id(base.get("id")):
            # Once a crash / lost answer (see the tests below): now refused as bad_request.
            self.unencodable_ids += 1
        return base

    def encode(self, obj: Any, binary: bool) -> bytes | str:
        if binary:
            return cbor2.dumps(obj)
        return json.dumps(obj)

    def mutate(self, data: bytes) -> bytes:
        r = self.r
        buf = bytearray(data)
        for _ in range(r.randrange(1, 4)):
            op = r.randrange(4)
            if op == 0 and buf:  # bit flip
                i = r.randrange(len(buf))
                buf[i] ^= 1 << r.randrange(8)
            elif op == 1 and buf:  # truncate
                del buf[r.randrange(len(buf)):]
            elif op == 2:  # insert random bytes
                i = r.randrange(len(buf) + 1)
                buf[i:i] = r.randbytes(r.randrange(1, 6))
            else:  # splice a chunk of the frame elsewhere
                if buf:
                    a = r.randrange(len(buf))
                    chunk = buf[a:a + r.randrange(1, 8)]
                    i = r.randrange(len(buf) + 1)
                    buf[i:i] = chunk
        return bytes(buf)

    def frame(self) -> bytes | str:
        r = self.r
        kind = r.randrange(6)
        binary = r.random() < 0.5
        if kind == 0:
            self._count("random bytes")
            return r.randbytes(r.randrange(0, 200))
        if kind == 1:
            self._count("random text")
            return "".join(chr(r.randrange(1, 0x500)) for _ in range(r.randrange(0, 120)))
        if kind in (2, 3):
            self._count("junk map")
            return self.encode(self.junk_map(json_safe=not binary), binary)
        self._count("mutated valid frame")
        valid = r.choice(VALID)
        raw = self.encode(valid, binary)
        mutated = self.mutate(raw if isinstance(raw, bytes) else raw.encode())
        return mutated if binary else mutated.decode("utf-8", errors="replace")


def check_answer(f: dict[str, Any]) -> str:
    """The answer's label (an error code, ``pong`` or ``ok``); fails if it is not typed."""
    if f["type"] == "pong":
        assert isinstance(f["ts"], int)
        return "pong"
    assert f["type"] == "response", f
    if f["ok"]:
        assert isinstance(f["result"], dict), f
        return "ok"
    err = f["error"]
    assert err["code"] in CODES, f
    assert isinstance(err["message"], str), f
    return str(err["code"])


async def next_answer(c: Client) -> dict[str, Any]:
    while True:
        f = await c.frame()
        if f["type"] in ("response", "pong"):
            return f


def would_be_silent_ack(data: bytes | str) -> bool:
    """A valid ``ack`` on a logged-in connection gets no answer: keep it out of counts."""
    try:
        return isinstance(decode_request(data), Ack)
    except RemoteProtocolError:
        return False


async def fuzz_connection(gw: Gateway, enc: str, user: str | None, fz: Fuzzer, n: int,
                          stats: dict[str, Any]) -> None:
    """Send ``n`` fuzz frames (plus pings) in pipelined batches; check every answer."""
    async with client(gw, enc) as c:
        if user is not None:
            assert (await c.call("login", user=user, password="pw"))["ok"]
        sent = 0
        while sent < n:
            batch: list[bytes | str] = []
            while len(batch) < BATCH and sent < n:
                if len(batch) % PING_EVERY == PING_EVERY - 1:
                    batch.append(json.dumps({"op": "ping"}) if enc == "json"
                                 else cbor2.dumps({"op": "ping"}))
                    continue
                data = fz.frame()
                if user is not None and would_be_silent_ack(data):
                    stats["silent_acks_skipped"] += 1
                    continue
                batch.append(data)
                sent += 1
            for data in batch:
                await c.ws.send_message(data)
            with trio.fail_after(20):
                for _ in batch:
                    label = check_answer(await next_answer(c))
                    stats["answers"][label] = stats["answers"].get(label, 0) + 1
            stats["frames"] += len(batch)
        assert (await c.call("ping"))["type"] == "pong"


async def trade_rounds(alice: Client, bob: Client, tag: str, rounds: int) -> int:
    for i in range(rounds):
        sell = await alice.call("place", client_order_id=f"{tag}a{i}", symbol="ETH-PERP",
                                side="sell", type="limit", price="3000.00", qty="0.01")
        assert sell["ok"], sell
        buy = await bob.call("place", client_order_id=f"{tag}b{i}", symbol="ETH-PERP",
                             side="buy", type="limit", price="3000.00", qty="0.01")
        assert buy["result"]["status"] == "filled", buy
    return rounds


def assert_gapless(c: Client) -> None:
    seqs = [e["seq"] for e in c.private]
    assert seqs, "no private events"
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


async def test_fuzz_frames_at_a_live_gateway() -> None:
    started = time.monotonic()
    # A rate limit out of the way, so valid fuzz frames reach the engine and answer.
    cfg = GatewayConfig(session=SessionConfig(rate_per_s=1_000_000, burst=1_000_000))
    stats: dict[str, Any] = {"frames": 0, "answers": {}, "silent_acks_skipped": 0}
    # One deterministic stream per connection (the connections run concurrently).
    fuzzers = [Fuzzer(SEED + k) for k in range(4)]
    async with running_gateway(cfg) as gw, client(gw, "json") as alice, \
            client(gw, "cbor") as bob:
        assert (await alice.call("login", user="alice", password="pw"))["ok"]
        assert (await bob.call("login", user="bob", password="pw"))["ok"]
        traded = await trade_rounds(alice, bob, "pre", 5)
        fuzz_done = trio.Event()

        async def trade_during() -> None:
            nonlocal traded
            i = 0
            while not fuzz_done.is_set():
                traded += await trade_rounds(alice, bob, f"d{i}-", 1)
                i += 1

        async def fuzz_all() -> None:
            per = FRAMES // 4
            async with trio.open_nursery() as inner:
                for fz, (enc, user) in zip(fuzzers, [("json", None), ("cbor", None),
                                                     ("json", "carol"), ("cbor", "dave")],
                                           strict=True):
                    inner.start_soon(fuzz_connection, gw, enc, user, fz, per, stats)
            fuzz_done.set()

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trade_during)
                nursery.start_soon(fuzz_all)
        during = traded - 5
        traded += await trade_rounds(alice, bob, "post", 5)
        assert during >= 1
        # Every trade's events reached both sides, gapless.
        with trio.fail_after(10):
            while sum(e["kind"] == "trade_executed" for e in bob.private) < traded:
                await bob.frame()
            while sum(e["kind"] == "trade_executed" for e in alice.private) < traded:
                await alice.frame()
        assert_gapless(alice)
        assert_gapless(bob)
        assert gw.trades >= traded
        # The 1008 rule still works, and a fresh connection goes on.
        async with client(gw, "cbor") as abuser:
            for _ in range(gw.config.max_consecutive_bad):
                await abuser.ws.send_message(fuzzers[0].r.randbytes(8) + b"\xff")
            with trio.fail_after(10):
                try:
                    while True:
                        await abuser.ws.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason is not None and exc.reason.code == 1008
            await abuser.ws._stream.aclose()  # trio-websocket leaves it open
        async with client(gw, "cbor") as fresh:
            assert (await fresh.call("ping"))["type"] == "pong"
    elapsed = time.monotonic() - started
    kinds: dict[str, int] = {}
    for fz in fuzzers:
        for k, v in fz.kinds.items():
            kinds[k] = kinds.get(k, 0) + v
    fuzz_frames = sum(kinds.values())
    unencodable = sum(fz.unencodable_ids for fz in fuzzers)
    print(f"\nfuzz: {fuzz_frames} fuzz frames + pings = {stats['frames']} frames, "
          f"{traded} trades ({during} during), {elapsed:.1f} s; kinds {kinds}; "
          f"answers {stats['answers']}; silent acks skipped {stats['silent_acks_skipped']}; "
          f"unencodable ids sent {unencodable}")
    assert fuzz_frames >= 10_000
    assert unencodable > 0  # the fuzz still covers what it found
    assert stats["frames"] >= fuzz_frames


# -- what the fuzz found ----------------------------------------------------------------


async def test_a_lone_surrogate_id_does_not_take_the_gateway_down() -> None:
    """Once: the id was echoed, the writer raised UnicodeEncodeError, serve() went down."""
    async with running_gateway() as gw:
        async with client(gw, "json") as c:
            await c.ws.send_message('{"op":"ping","id":"\\ud800"}')
            try:
                with trio.fail_after(5):
                    f = await next_answer(c)
                    outcome = check_answer(f)
            except ConnectionClosed as exc:  # the server went down under it
                outcome = f"closed: {exc.reason}"
                await c.ws._stream.aclose()  # trio-websocket leaves it open
        assert outcome == "bad_request", outcome
        assert f["id"] is None  # the id is invalid, so not echoed
        async with client(gw, "json") as other:
            assert (await other.call("ping"))["type"] == "pong"


@pytest.mark.parametrize(("conn_enc", "frame"), [
    # NaN/Infinity: CBOR carries them, strict JSON does not.
    ("json", cbor2.dumps({"op": "query", "id": float("nan"), "what": "account"})),
    ("json", cbor2.dumps({"op": "query", "id": float("-inf"), "what": "account"})),
    # A lone surrogate: a JSON escape carries it, UTF-8 (so CBOR) does not.
    ("cbor", '{"op":"query","id":"a\\udfff","what":"account"}'),
], ids=["nan-on-json", "inf-on-json", "surrogate-on-cbor"])
async def test_an_id_the_encoding_cannot_carry_still_gets_an_answer(
        conn_enc: str, frame: bytes | str) -> None:
    """Once: the engine's answer could not be encoded, so the request got none."""
    async with running_gateway() as gw, client(gw, conn_enc) as c:
        assert (await c.call("login", user="carol", password="pw"))["ok"]
        await c.ws.send_message(frame)
        with trio.fail_after(5):
            f = await next_answer(c)
        assert check_answer(f) == "bad_request", f
        assert f["id"] is None
        assert (await c.call("query", what="account"))["ok"]


async def test_the_writer_survives_a_frame_it_cannot_send() -> None:
    """Defence in depth: text the WebSocket cannot UTF-8-encode costs one frame only."""
    async with running_gateway() as gw, client(gw, "json") as c:
        assert (await c.call("ping"))["type"] == "pong"
        (conn,) = gw.conns.values()
        conn.send.send_nowait('{"type":"pong","id":"\ud800","ts":1}')  # a raw surrogate
        with trio.fail_after(5):
            f = await next_answer(c)
        assert check_answer(f) == "internal", f
        assert f["id"] is None
        assert (await c.call("ping"))["type"] == "pong"
        async with client(gw, "json") as other:
            assert (await other.call("ping"))["type"] == "pong"
