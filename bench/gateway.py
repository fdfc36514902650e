"""The gateway's push rate, round trip, orders/s and memory, next to bare trio-websocket.

Prints one JSON object per line: ``{"name", "value", "unit"}`` plus, where a
figure is compared, ``"ceiling"`` (bare trio-websocket, measured in the same
run) and ``"ratio"`` (value / ceiling), and ``"target"``/``"note"``/``"detail"``
where useful.

The servers (the gateway with its embedded engine, and the bare trio-websocket
servers) run in this process; the load generator runs in a child process
(this file with ``--client SPEC``). The load generator speaks WebSocket over
plain non-blocking sockets and ``selectors`` (handshake, unmasked-zero-key
client frames, CBOR), so that one Python process can keep thousands of
connections busy without becoming the bottleneck; it does the same work per
frame against the bare server and the gateway (decode every frame, ``ack``
every 100 private events).

Figures:

1. ``gateway.push.c<C>.events_per_s``: private events/s received across C
   logged-in connections (C = 100 and 1,000) while the bench deposits into
   every user's account round after round (each deposit → one
   ``account_update``, except that an account reports the deposits it applies
   in one turn in one; ``conflation_window_ns=0``; at most ``--push-depth``
   rounds in flight; a connection is done when its balance shows every
   deposit). Ceiling: a bare trio-websocket server sending the same number of
   pre-encoded ``private`` frames (one order event each) to each of C
   connections.
2. ``gateway.rtt.median_us`` / ``p99_us``: ``ping`` → ``pong`` through the
   gateway vs a bare trio-websocket echo of the same bytes (lower is better).
3. ``gateway.orders.*``: K logged-in connections (half idle); the other half
   are makers (resting sell limits at one price, refilled on every fill) and
   takers (IOC buys crossing them). First a closed loop (a bounded number of
   orders in flight per taker) finds the saturating rate; then an open loop
   paced at half of it measures submit→ack and submit→fill (the taker's
   ``trade_executed``) latency.
4. ``gateway.rss.kib_per_conn``: this process's VmRSS before and after N idle
   logged-in connections (8 sessions per user).

The engine is the embedded deployment of ``./run``: simpleSystemBase on the
bridge thread, one account host per user, journal on (temp dir, fsync
``batch``), but ``conflation_window_ns=0``. The per-connection request rate
limit is raised (it is policy, not cost: the token bucket runs either way).

Usage: ``python bench/gateway.py [--quick] [--only rss,push,rtt,orders]
[--profile push|orders]`` (``--profile`` prints the server's top functions, trio
thread and bridge thread, to stderr).
"""

from __future__ import annotations

# Run as a script, Python puts bench/ first on sys.path, where this very file
# (bench/gateway.py) would shadow the real ``gateway`` package: drop it.
import sys as _sys
from pathlib import Path as _Path

_HERE = _Path(__file__).parent.resolve()
_sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _HERE]
_ROOT = _HERE.parent
if str(_ROOT) not in _sys.path:
    _sys.path.insert(0, str(_ROOT))

import argparse
import contextlib
import cProfile
import gc
import io
import itertools
import json
import pstats
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import cbor2

SYMBOL = "BTC-PERP"
PRICE = "60000.0"
QTY = "0.001"
PASSWORD = "pw"
#: Un-acked private events after which a client sends ``ack`` (as the SDK does).
ACK_EVERY = 100

# A private frame with one 12-field order event (as bench/codec.py), pre-encoded.
EVENT_DATA: dict[str, Any] = {
    "order_id": 123456789, "client_order_id": "mm-7-000123", "symbol": SYMBOL,
    "side": "buy", "type": "limit", "price": "60000.1", "qty": "0.250",
    "filled_qty": "0.100", "remaining_qty": "0.150", "status": "partially_filled",
    "code": None, "reason": None,
}


def bare_frame() -> bytes:
    import protocol as p

    frame = p.PrivateFrame(events=(p.PrivateEvent(
        seq=41, kind="order_partially_filled", priority=1, ts=1_700_000_000_000_000_000,
        data=EVENT_DATA),))
    data = p.encode_frame(frame, p.Encoding.CBOR)
    assert isinstance(data, bytes)
    return data


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


# =====================================================================================
# The load generator (child process)
# =====================================================================================


def ws_frame(payload: bytes, op: int = 2) -> bytes:
    """A client frame: FIN, masked with the all-zero key (payload unchanged)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | op, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | op, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | op, 0xFF)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class Conn:
    __slots__ = (
        "balance",
        "buf",
        "closed",
        "done",
        "events",
        "ids",
        "idx",
        "open",
        "sock",
        "state",
        "unacked",
        "user",
    )

    def __init__(self, sock: socket.socket, idx: int, user: str | None) -> None:
        self.sock = sock
        self.idx = idx
        self.user = user
        self.buf = b""
        self.open = False
        self.closed = False
        self.done = False
        self.state = "new"
        self.events = 0
        self.balance = 0
        self.unacked = 0
        self.ids = itertools.count(1)

    def send(self, payload: bytes, op: int = 2) -> None:
        if self.closed:
            return
        data = ws_frame(payload, op)
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.closed = True
            return
        if n < len(data):  # rare on loopback: finish it blocking
            self.sock.settimeout(10)
            try:
                self.sock.sendall(data[n:])
            finally:
                self.sock.setblocking(False)

    def request(self, msg: dict[str, Any]) -> None:
        self.send(cbor2.dumps(msg))

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf + data if self.buf else data
        if not self.open:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf
                return []
            status = buf[:buf.find(b"\r\n")]
            if b" 101" not in status:
                raise RuntimeError(f"handshake refused: {status!r}")
            self.open = True
            buf = buf[i + 4:]
        out = []
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1] & 0x7F
            if b1 == 126:
                if n - pos < 4:
                    break
                ln, h = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif b1 == 127:
                if n - pos < 10:
                    break
                ln, h = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            else:
                ln, h = b1, 2
            if n - pos < h + ln:
                break
            out.append((b0 & 0x0F, buf[pos + h:pos + h + ln]))
            pos += h + ln
        self.buf = buf[pos:]
        return out


class Loop:
    """Connections on one ``selectors`` loop."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sel = selectors.DefaultSelector()
        self.conns: list[Conn] = []
        self.error: str | None = None
        self.hs = (f"GET /v1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: emporion.v1.cbor\r\n"
                   "\r\n").encode()

    def drop(self, c: Conn) -> None:
        if not c.closed:
            c.closed = True
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.sel.unregister(c.sock)
        c.sock.close()

    def close_all(self) -> None:
        for c in self.conns:
            if not c.closed:
                c.send(b"\x03\xe8", 8)
                self.drop(c)

    def pump(self, on_frame: Callable[[Conn, bytes], None], stop: Callable[[], bool],
             timeout: float, tick: Callable[[float], None] | None = None,
             poll: float = 0.01) -> bool:
        end = time.monotonic() + timeout
        select, mono = self.sel.select, time.monotonic
        while not stop():
            now = mono()
            if now > end:
                return False
            if tick is not None:
                tick(now)
            for key, _ in select(poll):
                c = key.data
                try:
                    data = c.sock.recv(1 << 18)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.drop(c)
                    continue
                for op, payload in c.feed(data):
                    if op == 2 or op == 1:
                        on_frame(c, payload)
                    elif op == 9:
                        c.send(payload, 10)
                    elif op == 8:
                        self.drop(c)
                        break
        return True

    def open(self, count: int, users: list[str] | None, timeout: float,
             batch: int = 250) -> None:
        """Connect ``count`` more (and log in as ``users[i]`` when given)."""
        end = time.monotonic() + timeout

        def on_login(c: Conn, payload: bytes) -> None:
            d = cbor2.loads(payload)
            if d.get("type") == "response" and d.get("id") == 0:
                c.state = "in" if d.get("ok") else "failed"
                if not d.get("ok") and self.error is None:
                    self.error = f"login {c.user}: {d.get('error')}"

        while len(self.conns) < count and self.error is None:
            group: list[Conn] = []
            for _ in range(min(batch, count - len(self.conns))):
                try:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                except OSError as exc:
                    self.error = f"socket(): {exc}"
                    break
                try:
                    s.settimeout(10)
                    s.connect(("127.0.0.1", self.port))
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    s.sendall(self.hs)
                    s.setblocking(False)
                except OSError as exc:
                    s.close()
                    self.error = f"connect: {exc}"
                    break
                i = len(self.conns)
                c = Conn(s, i, users[i] if users else None)
                self.conns.append(c)
                group.append(c)
                self.sel.register(s, selectors.EVENT_READ, c)
            left = max(0.1, end - time.monotonic())
            if not self.pump(lambda c, p: None,
                             lambda g=group: all(c.open or c.closed for c in g), left):
                self.error = self.error or "handshake timeout"
            if users:
                for c in group:
                    c.state = "login"
                    c.request({"op": "login", "id": 0, "user": c.user, "password": PASSWORD})
                left = max(0.1, end - time.monotonic())
                if not self.pump(on_login, lambda g=group: all(
                        c.state != "login" or c.closed for c in g), left):
                    self.error = self.error or "login timeout"
            if any(c.closed for c in group):
                self.error = self.error or "connections closed during setup"
            if time.monotonic() > end:
                self.error = self.error or "setup timeout"


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_go() -> None:
    line = sys.stdin.readline()
    if not line.startswith("go"):
        raise SystemExit(0)


def client_push(spec: dict[str, Any]) -> None:
    loop = Loop(spec["port"])
    users = spec.get("users")
    loop.open(spec["conns"], users, timeout=60)
    say({"ready": True, "conns": len(loop.conns), "error": loop.error})
    if loop.error:
        return
    wait_go()
    expected = spec["per_conn"]
    # The deposit run: an account host applies the deposits queued for it in one turn
    # and reports them in one account_update (P2, the state after the turn), so a
    # connection can get fewer events than deposits; it is done when its balance
    # shows every deposit (1 minor unit each).
    by_balance = bool(spec.get("by_balance"))
    from protocol import CASH_STEP
    st = {"t0": 0.0, "t1": 0.0, "events": 0, "frames": 0, "bytes": 0, "done": 0,
          "skipped": 0, "stalled": False}
    perf = time.perf_counter

    def on(c: Conn, payload: bytes) -> None:
        d = cbor2.loads(payload)
        if d.get("type") != "private":
            return
        now = perf()
        if not st["t0"]:
            st["t0"] = now
        st["t1"] = now
        evs = d["events"]
        k = len(evs)
        c.events += k
        st["events"] += k
        st["frames"] += 1
        st["bytes"] += len(payload)
        st["skipped"] += len(d.get("skipped", ()))
        c.unacked += k
        if c.unacked >= ACK_EVERY:
            c.unacked = 0
            c.request({"op": "ack", "seq": evs[-1]["seq"]})
        if by_balance:
            for e in evs:
                if e["kind"] == "account_update":
                    c.balance = int(Decimal(e["data"]["balance"]) / CASH_STEP)
        if (c.balance if by_balance else c.events) >= expected and not c.done:
            c.done = True
            st["done"] += 1

    def tick(now: float) -> None:
        if st["t1"] and perf() - st["t1"] > 5.0:
            st["stalled"] = True

    n = len(loop.conns)
    loop.pump(on, lambda: st["done"] >= n or bool(st["stalled"]), spec.get("timeout", 60),
              tick=tick, poll=0.05)
    span = st["t1"] - st["t0"]
    say({"events": st["events"], "frames": st["frames"], "span": span,
         "bytes": st["bytes"], "done_conns": st["done"], "skipped": st["skipped"],
         "min_events": min(c.events for c in loop.conns), "stalled": st["stalled"]})
    loop.close_all()


def client_rtt(spec: dict[str, Any]) -> None:
    loop = Loop(spec["port"])
    loop.open(1, None, timeout=10)
    if loop.error:
        say({"error": loop.error})
        return
    c = loop.conns[0]
    c.sock.setblocking(True)
    c.sock.settimeout(10)
    rtts: list[float] = []
    perf = time.perf_counter_ns
    for i in range(1, spec["warmup"] + spec["rounds"] + 1):
        payload = cbor2.dumps({"op": "ping", "id": i})
        t0 = perf()
        c.send(payload)
        got = False
        while not got:
            data = c.sock.recv(65536)
            if not data:
                say({"error": "closed"})
                return
            for op, body in c.feed(data):
                if op == 2 and cbor2.loads(body).get("id") == i:
                    got = True
        if i > spec["warmup"]:
            rtts.append((perf() - t0) / 1000)
    say({"median": statistics.median(rtts), "p99": percentile(rtts, 99), "n": len(rtts)})
    loop.close_all()


class Hist:
    """hdrhistogram (µs) when installed, else a sorted list."""

    def __init__(self) -> None:
        try:
            from hdrh.histogram import HdrHistogram
        except ImportError:
            self.h: Any = None
            self.values: list[float] = []
        else:
            self.h = HdrHistogram(1, 60_000_000, 3)
        self.n = 0

    def add(self, us: float) -> None:
        self.n += 1
        if self.h is not None:
            self.h.record_value(max(1, int(us)))
        else:
            self.values.append(us)

    def p(self, q: float) -> float:
        if self.n == 0:
            return float("nan")
        if self.h is not None:
            return float(self.h.get_value_at_percentile(q))
        return percentile(self.values, q)


class Orders:
    """Makers rest sells at one price and refill on each fill; takers send crossing IOC buys."""

    def __init__(self, loop: Loop, makers: list[Conn], takers: list[Conn], depth: int) -> None:
        self.loop = loop
        self.makers = makers
        self.takers = takers
        self.seed_depth = depth
        self.pending: dict[tuple[int, int], tuple[int, str, bool]] = {}  # (conn, rid) → ...
        self.fill_wait: dict[str, int] = {}  # taker cid → submit ns
        self.cids = itertools.count(1)
        self.measuring = False
        self.window = (0, 0)  # submit ns range whose latencies count
        self.acked = 0
        self.acked_in = 0
        self.sent = 0
        self.errors: dict[str, int] = {}
        self.misses = 0
        self.fills = 0
        self.ack_h = Hist()
        self.fill_h = Hist()
        self.closed_depth = 0  # > 0: closed loop, a new taker order on each taker ack
        self.rr = itertools.cycle(takers)

    def reset(self, window: tuple[int, int]) -> None:
        self.window = window
        self.acked_in = 0
        self.ack_h = Hist()
        self.fill_h = Hist()
        self.errors = {}
        self.misses = 0
        self.fills = 0

    def place(self, c: Conn, taker: bool) -> None:
        rid = next(c.ids)
        cid = f"{'t' if taker else 'm'}{c.idx}-{next(self.cids)}"
        now = time.perf_counter_ns()
        self.pending[(c.idx, rid)] = (now, cid, taker)
        if taker:
            self.fill_wait[cid] = now
        self.sent += 1
        c.request({"op": "place", "id": rid, "client_order_id": cid, "symbol": SYMBOL,
                   "side": "buy" if taker else "sell", "type": "limit", "price": PRICE,
                   "qty": QTY, "tif": "ioc" if taker else "gtc"})

    def on(self, c: Conn, payload: bytes) -> None:
        d = cbor2.loads(payload)
        kind = d.get("type")
        now = time.perf_counter_ns()
        lo, hi = self.window
        if kind == "response":
            got = self.pending.pop((c.idx, d.get("id")), None)
            if got is None:
                return
            t0, cid, taker = got
            if d.get("ok"):
                self.acked += 1
                if lo <= now <= hi:
                    self.acked_in += 1
                if lo <= t0 <= hi:
                    self.ack_h.add((now - t0) / 1000)
            else:
                code = str((d.get("error") or {}).get("code"))
                self.errors[code] = self.errors.get(code, 0) + 1
                self.fill_wait.pop(cid, None)
            if taker and self.closed_depth:
                self.place(c, True)
        elif kind == "private":
            evs = d["events"]
            for e in evs:
                k = e["kind"]
                if k == "trade_executed":
                    data = e["data"]
                    if data["liquidity"] == "taker":
                        t0 = self.fill_wait.pop(data["client_order_id"], None)
                        if t0 is not None:
                            self.fills += 1
                            if lo <= t0 <= hi:
                                self.fill_h.add((now - t0) / 1000)
                    else:
                        self.place(c, False)  # the maker refills the level
                elif k == "order_expired" and e["data"]["client_order_id"] in self.fill_wait:
                    del self.fill_wait[e["data"]["client_order_id"]]
                    self.misses += 1
            c.unacked += len(evs)
            if c.unacked >= ACK_EVERY:
                c.unacked = 0
                c.request({"op": "ack", "seq": evs[-1]["seq"]})

    def pump(self, seconds: float, tick: Callable[[float], None] | None = None,
             poll: float = 0.01) -> None:
        self.loop.pump(self.on, lambda: False, seconds, tick=tick, poll=poll)

    def drain(self, seconds: float) -> None:
        self.loop.pump(self.on, lambda: not self.pending, seconds)


def client_orders(spec: dict[str, Any]) -> None:
    loop = Loop(spec["port"])
    users = spec["users"]
    loop.open(len(users), users, timeout=90)
    say({"ready": True, "conns": len(loop.conns), "error": loop.error})
    if loop.error:
        return
    wait_go()
    active = loop.conns[spec["idle"]:]
    n_makers = spec["makers"]
    o = Orders(loop, active[:n_makers], active[n_makers:], spec["seed_depth"])
    for m in o.makers:  # resting liquidity, then wait for every ack
        for _ in range(o.seed_depth):
            o.place(m, False)
    o.drain(30)
    out: dict[str, Any] = {"makers": len(o.makers), "takers": len(o.takers),
                           "idle": spec["idle"], "seed_errors": dict(o.errors)}
    ns = time.perf_counter_ns
    # 1. closed loop: a bounded number of taker orders in flight → the saturating rate.
    o.closed_depth = max(1, spec["in_flight"] // len(o.takers))
    warm, secs = spec["warmup_s"], spec["sat_s"]
    t0 = ns()
    o.reset((t0 + int(warm * 1e9), t0 + int((warm + secs) * 1e9)))
    for t in o.takers:
        for _ in range(o.closed_depth):
            o.place(t, True)
    o.pump(warm + secs)
    sat = o.acked_in / secs
    o.closed_depth = 0
    o.drain(20)
    out["saturation"] = {"orders_per_s": sat, "in_flight": o.closed_depth or spec["in_flight"],
                         "ack_p50_us": o.ack_h.p(50), "ack_p99_us": o.ack_h.p(99),
                         "fill_p50_us": o.fill_h.p(50), "fill_p99_us": o.fill_h.p(99),
                         "errors": dict(o.errors), "misses": o.misses}
    # 2. open loop at half the saturating rate: every taker order is followed by one
    # maker refill, so takers send a quarter of the saturating rate.
    target = sat / 2
    taker_rate = target / 2
    secs = spec["paced_s"]
    t0 = ns()
    o.reset((t0 + int(warm * 1e9), t0 + int((warm + secs) * 1e9)))
    start = time.monotonic()
    sent = [0]

    def tick(now: float) -> None:
        due = int((now - start) * taker_rate) - sent[0]
        for _ in range(min(due, 500)):
            o.place(next(o.rr), True)
            sent[0] += 1

    o.pump(warm + secs, tick=tick, poll=0.0005)
    o.drain(20)
    out["paced"] = {"target_per_s": target, "orders_per_s": o.acked_in / secs,
                    "ack_p50_us": o.ack_h.p(50), "ack_p99_us": o.ack_h.p(99),
                    "fill_p50_us": o.fill_h.p(50), "fill_p99_us": o.fill_h.p(99),
                    "fills": o.fill_h.n, "acks": o.ack_h.n, "errors": dict(o.errors),
                    "misses": o.misses, "unanswered": len(o.pending)}
    say(out)
    loop.close_all()


def client_rss(spec: dict[str, Any]) -> None:
    limit = raise_nofile()
    loop = Loop(spec["port"])
    want = min(spec["conns"], max(0, limit - 64))
    loop.open(want, spec["users"][:want], timeout=90)
    ok = sum(1 for c in loop.conns if c.state == "in" and not c.closed)
    say({"ready": True, "conns": ok, "wanted": spec["conns"], "nofile": limit,
         "error": loop.error})
    wait_go()
    loop.close_all()


def client_main(spec_text: str) -> None:
    raise_nofile()
    spec = json.loads(spec_text)
    {"push": client_push, "rtt": client_rtt, "orders": client_orders,
     "rss": client_rss}[spec["mode"]](spec)


# =====================================================================================
# The servers (this process)
# =====================================================================================


def emit(name: str, value: float, unit: str, ceiling: float | None = None,
         **extra: Any) -> None:
    row: dict[str, Any] = {"name": name, "value": round(value, 1), "unit": unit}
    if ceiling is not None:
        row["ceiling"] = round(ceiling, 1)
        row["ratio"] = round(value / ceiling, 3) if ceiling else None
    row.update(extra)
    print(json.dumps(row), flush=True)


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Child:
    """The load generator process: JSON lines out, ``go`` in."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.buf = b""

    async def read(self, timeout: float) -> dict[str, Any]:
        import trio

        with trio.fail_after(timeout):
            while b"\n" not in self.buf:
                chunk = await self.proc.stdout.receive_some(65536)
                if not chunk:
                    raise RuntimeError("the load generator exited")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        out = json.loads(line)
        assert isinstance(out, dict)
        return out

    async def go(self) -> None:
        await self.proc.stdin.send_all(b"go\n")


@contextlib.asynccontextmanager
async def child(spec: dict[str, Any]) -> AsyncIterator[Child]:
    import trio

    proc = await trio.lowlevel.open_process(
        [sys.executable, str(_Path(__file__).resolve()), "--client", json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield Child(proc)
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(10):
                with contextlib.suppress(Exception):
                    await proc.stdin.aclose()
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()



class Counter:
    """Counts private events reaching the gateway from the engine (trio thread)."""

    def __init__(self) -> None:
        self.delivered = 0
        self.target = 0
        self.event: Any = None


@contextlib.asynccontextmanager
async def gateway(users: list[str], *, deposit: bool,
                  counter: Counter | None = None) -> AsyncIterator[Any]:
    import trio

    from actors.cores.session import SessionConfig
    from actors.host import EngineConfig
    from actors.messages import AccountDeposit, Delivery, Dest
    from gateway.bridge import BridgeOptions, EngineBridge
    from gateway.cli import load_instruments
    from gateway.server import Gateway, GatewayConfig
    from protocol import CASH_STEP

    with tempfile.TemporaryDirectory(prefix="bench-gw-") as tmp:
        engine = EngineConfig(
            instruments_toml=(_ROOT / "protocol" / "instruments.toml").read_text(),
            data_dir=tmp, fsync="batch", conflation_window_ns=0)
        bridge = EngineBridge(BridgeOptions(engine=engine))
        gw = Gateway(bridge, load_instruments(None), lambda u, p: p == PASSWORD,
                     GatewayConfig(port=0, session=SessionConfig(
                         rate_per_s=1_000_000, burst=1_000_000)))
        if counter is not None:
            inner = gw._from_engine

            def counting(msgs: list[Any]) -> None:
                for m in msgs:
                    if isinstance(m, Delivery):
                        counter.delivered += len(m.events)
                inner(msgs)
                if counter.event is not None and counter.delivered >= counter.target:
                    counter.event.set()

            gw._from_engine = counting  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            await nursery.start(gw.serve)
            million = int(1_000_000 / CASH_STEP)
            for u in users:  # the waiting calls: thousands of users outgrow the queue
                await bridge.open_accounts_waiting(u)
                if deposit:
                    await bridge.submit_waiting(Dest("account", u), AccountDeposit(
                        reply_to=None, user=u, amount=million, ts=time.time_ns()))
            done = threading.Event()
            bridge.call(lambda link: done.set())
            await trio.to_thread.run_sync(done.wait, 60)
            await trio.sleep(0.3)
            try:
                yield gw
            finally:
                nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def bare_server(handler: Callable[[Any], Any]) -> AsyncIterator[int]:
    import trio
    from trio_websocket import serve_websocket

    async with trio.open_nursery() as nursery:
        server = await nursery.start(lambda task_status: serve_websocket(
            handler, "127.0.0.1", 0, ssl_context=None, handler_nursery=nursery,
            task_status=task_status))
        try:
            yield server.port
        finally:
            nursery.cancel_scope.cancel()


async def accept(request: Any) -> Any:
    proposed = request.proposed_subprotocols
    return await request.accept(subprotocol=proposed[0] if proposed else None)


class Profiler:
    """cProfile of the trio thread and of the engine bridge thread."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.main = cProfile.Profile()
        self.bridge = cProfile.Profile()
        self.stop_bridge = False
        self.bridge_on = False

    def attach(self, gw: Any) -> None:
        if not self.enabled:
            return
        bridge = gw.bridge
        inner = bridge._pass

        def profiled(*a: Any) -> None:
            if self.stop_bridge:
                if self.bridge_on:
                    self.bridge.disable()
                    self.bridge_on = False
            elif not self.bridge_on:
                self.bridge.enable()
                self.bridge_on = True
            inner(*a)

        bridge._pass = profiled
        self.main.enable()

    def report(self, label: str) -> None:
        if not self.enabled:
            return
        self.main.disable()
        self.stop_bridge = True
        time.sleep(0.05)
        for name, prof in (("trio thread", self.main), ("bridge thread", self.bridge)):
            s = io.StringIO()
            try:
                st = pstats.Stats(prof, stream=s)
            except TypeError:
                continue
            st.sort_stats("tottime").print_stats(18)
            print(f"--- profile {label}: {name} (by own time)\n{s.getvalue()}", file=sys.stderr)


# -- figures ------------------------------------------------------------------------------


async def run_push(args: argparse.Namespace, conns: int, rounds: int,
                   prof: Profiler) -> None:
    import trio
    from trio_websocket import ConnectionClosed

    from actors.messages import AccountDeposit, Dest

    frame = bare_frame()
    # bare: every connection gets `rounds` pre-encoded frames on "go"
    go = trio.Event()

    async def push_handler(request: Any) -> None:
        ws = await accept(request)

        async def drain() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await ws.get_message()

        async with trio.open_nursery() as n:
            n.start_soon(drain)
            await go.wait()
            with contextlib.suppress(ConnectionClosed):
                for _ in range(rounds):
                    await ws.send_message(frame)

    async with bare_server(push_handler) as port, child(
            {"mode": "push", "port": port, "conns": conns, "per_conn": rounds}) as ch:
        ready = await ch.read(90)
        if ready.get("error"):
            raise RuntimeError(f"bare push setup: {ready}")
        await ch.go()
        go.set()
        bare = await ch.read(120)
    bare_rate = bare["frames"] / bare["span"]

    users = [f"p{i:05d}" for i in range(conns)]
    counter = Counter()
    async with gateway(users, deposit=False, counter=counter) as gw, child(
            {"mode": "push", "port": gw.port, "conns": conns, "users": users,
             "per_conn": rounds, "by_balance": True}) as ch:
        ready = await ch.read(120)
        if ready.get("error"):
            raise RuntimeError(f"gateway push setup: {ready}")
        await trio.sleep(0.2)
        base = counter.delivered
        await ch.go()
        prof.attach(gw)
        depth = args.push_depth
        with trio.fail_after(120):
            for r in range(rounds):
                need = base + (r - depth + 1) * conns
                if counter.delivered < need:
                    counter.target = need
                    counter.event = trio.Event()
                    await counter.event.wait()
                    counter.event = None
                ts = time.time_ns()
                for u in users:
                    await gw.bridge.submit_waiting(
                        Dest("account", u), AccountDeposit(reply_to=None, user=u, amount=1, ts=ts))
                await trio.sleep(0)
        got = await ch.read(120)
        prof.report(f"push c{conns}")
    rate = got["events"] / got["span"] if got["span"] > 0 else 0.0
    fan = await run_fanout(conns, rounds)
    emit(f"gateway.push.c{conns}.events_per_s", rate, "events/s", bare_rate,
         target_ratio=0.85, detail={
             "frames_per_s": round(got["frames"] / got["span"], 1) if got["span"] else 0,
             "events_per_frame": round(got["events"] / max(1, got["frames"]), 2),
             "events": got["events"], "deposits": conns * rounds,
             "done_conns": got["done_conns"],
             "skipped": got["skipped"], "stalled": got["stalled"],
             "frame_bytes": round(got["bytes"] / max(1, got["frames"]), 1),
             "bare_frame_bytes": len(frame), "bare_frames": bare["frames"],
             "rounds_in_flight": args.push_depth},
         note="ceiling: bare trio-websocket frames/s, one event per frame; an account "
              "reports the deposits it applied in one turn in one account_update, so "
              "events can be fewer than deposits")
    emit(f"gateway.push.c{conns}.fanout_events_per_s", fan["events"] / fan["span"], "events/s",
         bare_rate, target_ratio=0.85, detail={
             "events_per_frame": round(fan["events"] / max(1, fan["frames"]), 2),
             "events": fan["events"], "expected": conns * rounds,
             "frame_bytes": round(fan["bytes"] / max(1, fan["frames"]), 1),
             "stalled": fan["stalled"]},
         note="diagnostic: the gateway's fan-out alone, engine bypassed (a Delivery with "
              "the bare frame's order event per user per round, injected on the trio thread)")


async def run_fanout(conns: int, rounds: int) -> dict[str, Any]:
    """The gateway's push path without the engine: hub → frame → writer → socket."""
    import trio

    from actors.cores.router import SequencedEvent
    from actors.messages import Delivery

    users = [f"f{i:05d}" for i in range(conns)]
    async with gateway(users, deposit=False) as gw, child(
            {"mode": "push", "port": gw.port, "conns": conns, "users": users,
             "per_conn": rounds}) as ch:
        ready = await ch.read(120)
        if ready.get("error"):
            raise RuntimeError(f"fan-out setup: {ready}")
        await trio.sleep(0.2)
        seq = {u: 0 for u in users}
        for sid, sess in gw.hub.sessions.items():
            user = gw.conns[sid].proto.user
            seq[user] = max(seq[user], sess.delivered_seq)
        deliver = gw._from_engine
        live = list(gw.conns.values())
        await ch.go()
        with trio.fail_after(120):
            for r in range(rounds):
                ts = time.time_ns()
                deliver([Delivery(user=u, events=(SequencedEvent(
                    user=u, seq=seq[u] + r + 1, kind="order_partially_filled", priority=1,
                    ts=ts, data=EVENT_DATA, event_id=r),)) for u in users])
                # keep a few frames queued per connection, as the deposit run does
                while any(len(c.send) > 4 for c in live):
                    await trio.sleep(0)
        got = await ch.read(120)
    assert isinstance(got, dict)
    return got


async def run_rtt(args: argparse.Namespace) -> None:
    from trio_websocket import ConnectionClosed

    async def echo(request: Any) -> None:
        ws = await accept(request)
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send_message(await ws.get_message())

    spec = {"mode": "rtt", "rounds": args.rtt_rounds, "warmup": 200}
    async with bare_server(echo) as port, child({**spec, "port": port}) as ch:
        bare = await ch.read(120)
    async with gateway([], deposit=False) as gw, child({**spec, "port": gw.port}) as ch:
        ours = await ch.read(120)
    for key in ("median", "p99"):
        emit(f"gateway.rtt.{key}_us", ours[key], "us", bare[key],
             note="ping→pong through the gateway vs bare echo; lower is better",
             detail={"rounds": ours["n"]})


async def run_orders(args: argparse.Namespace, prof: Profiler) -> None:

    k = args.order_conns
    idle = k // 2
    active = k - idle
    makers = max(2, active // 10)
    users = [f"o{i:05d}" for i in range(k)]
    spec = {"mode": "orders", "users": users, "idle": idle, "makers": makers,
            "seed_depth": max(20, -(-3 * args.in_flight // (2 * makers))),
            "in_flight": args.in_flight, "warmup_s": 1.0,
            "sat_s": args.sat_s, "paced_s": args.paced_s}
    async with gateway(users, deposit=True) as gw, child({**spec, "port": gw.port}) as ch:
        ready = await ch.read(120)
        if ready.get("error"):
            raise RuntimeError(f"orders setup: {ready}")
        await ch.go()
        prof.attach(gw)
        cpu0, wall0 = cpu_s(), time.monotonic()
        got = await ch.read(180)
        cpu = (cpu_s() - cpu0) / (time.monotonic() - wall0)
        prof.report("orders")
    sat, paced = got["saturation"], got["paced"]
    detail = {"connections": k, "idle": idle, "makers": got["makers"],
              "server_cpu_cores": round(cpu, 2),
              "takers": got["takers"], "in_flight": args.in_flight}
    emit("gateway.orders.saturating_per_s", sat["orders_per_s"], "orders/s",
         target=5000, detail={**detail, "ack_p99_us": sat["ack_p99_us"],
                              "fill_p99_us": sat["fill_p99_us"], "errors": sat["errors"],
                              "misses": sat["misses"]},
         note="closed loop: acked orders/s (taker IOC buys + maker refills)")
    emit("gateway.orders.sustained_per_s", paced["orders_per_s"], "orders/s",
         detail={**detail, "target_per_s": round(paced["target_per_s"], 1),
                 "errors": paced["errors"], "misses": paced["misses"],
                 "unanswered": paced["unanswered"]},
         note="open loop paced at half the saturating rate")
    for key, note in (("ack", "submit→ack (response)"),
                      ("fill", "submit→taker trade_executed")):
        emit(f"gateway.orders.{key}_p50_us", paced[f"{key}_p50_us"], "us",
             note=f"{note} at half the saturating rate")
        emit(f"gateway.orders.{key}_p99_us", paced[f"{key}_p99_us"], "us",
             note=f"{note} at half the saturating rate",
             **({"target": 10_000} if key == "fill" else {}))


async def run_rss(args: argparse.Namespace) -> None:
    import trio

    n = args.rss_conns
    per_user = 8
    users = [f"r{i // per_user:05d}" for i in range(n)]
    distinct = sorted(set(users))
    async with gateway(distinct, deposit=False) as gw:
        await trio.sleep(0.2)
        gc.collect()
        before = rss_kib()
        async with child({"mode": "rss", "port": gw.port, "conns": n, "users": users}) as ch:
            ready = await ch.read(150)
            reached = int(ready["conns"])
            await trio.sleep(0.5)
            gc.collect()
            after = rss_kib()
            server_conns = len(gw.conns)
            await ch.go()
    per = (after - before) / reached if reached else float("nan")
    emit("gateway.rss.kib_per_conn", per, "KiB", target=30, detail={
        "conns": reached, "wanted": n, "server_conns": server_conns,
        "rss_before_kib": before, "rss_after_kib": after, "sessions_per_user": per_user,
        "client_nofile": ready.get("nofile"), "error": ready.get("error")},
         note="server VmRSS delta / idle logged-in connections")


async def run_all(args: argparse.Namespace) -> None:
    prof_phase = args.profile
    only = set(args.only.split(","))
    if "rss" in only:  # first: freed memory of other phases would be reused
        await run_rss(args)
    if "push" in only:
        for c in (100, 1000) if not args.quick else (100,):
            rounds = args.push_events // c
            await run_push(args, c, rounds, Profiler(prof_phase == "push"))
    if "rtt" in only:
        await run_rtt(args)
    if "orders" in only:
        await run_orders(args, Profiler(prof_phase == "orders"))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--client"]:
        client_main(argv[1])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small counts (≤ 30 s)")
    ap.add_argument("--only", default="rss,push,rtt,orders")
    ap.add_argument("--profile", choices=["push", "orders"], default=None)
    ap.add_argument("--push-events", type=int, default=None,
                    help="private events per push run (split over the connections)")
    ap.add_argument("--push-depth", type=int, default=4, help="deposit rounds in flight")
    ap.add_argument("--rtt-rounds", type=int, default=None)
    ap.add_argument("--order-conns", type=int, default=None)
    ap.add_argument("--in-flight", type=int, default=200,
                    help="taker orders in flight in the closed loop")
    ap.add_argument("--sat-s", type=float, default=None)
    ap.add_argument("--paced-s", type=float, default=None)
    ap.add_argument("--rss-conns", type=int, default=None)
    args = ap.parse_args(argv)
    q = args.quick
    args.push_events = args.push_events or (20_000 if q else 40_000)
    args.rtt_rounds = args.rtt_rounds or (1_000 if q else 5_000)
    args.order_conns = args.order_conns or (100 if q else 1_000)
    args.sat_s = args.sat_s or (2.0 if q else 5.0)
    args.paced_s = args.paced_s or (2.0 if q else 6.0)
    args.rss_conns = args.rss_conns or (1_000 if q else 10_000)
    raise_nofile()
    import logging

    logging.basicConfig(level=logging.WARNING)
    import trio

    t0 = time.monotonic()
    trio.run(run_all, args)
    print(f"bench/gateway.py: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
