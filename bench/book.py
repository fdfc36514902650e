"""Order book throughput: the OrderBook core next to a bare matching loop.

One seeded stream of operations (60% passive limit adds near mid, 25% cancels
of a random live order, 15% marketable orders: market or crossing limit IOC)
is built before timing, with the NewOrder/CancelOrder messages ready-made.
It runs through (a) ``actors.cores.book.OrderBook`` and (b) a bare reference
book written here (SortedDict price -> deque, lazy cancel via an id map, fill
tuples, no events, no validation), alternately, ``--repeat`` times each,
from an empty book every time with no other book alive. Each run times the
stream in blocks of ``BLOCK`` (1,000) operations, and a side's time is the sum
over blocks of that block's fastest run. The machines this runs on are shared
and their speed drifts by tens of percent within seconds; interference only
ever adds time, so a block's fastest run is the one least slowed by other
tenants, and both sides get the same number of chances. The collector runs as
usual: its passes fall at the same points in every run, so they stay in the
figures.

The core runs the stream as its actor would, in turns of ``TURN`` (100)
operations: each command returns its account events, and the core's
``flush_market`` is called once at the end of each turn, publishing that turn's
market data (one BookDelta, the PublicTrades, one TickerUpdate). Cutting the
stream into turns happens before timing; the flushes are timed.

Buyers and sellers are different users, so self-trade prevention (which the
bare book lacks) never fires and both books must end with the same fills and
resting quantity; the ``book.sanity`` line shows it.

Two more lines explain the gap: ``book.core_event_build_share`` (the share of
the core's time spent constructing the protocol's event tuples, built the way
the core builds them, which the bare loop does not build) and
``book.bare_plus_events_ops_per_s`` (the bare loop plus that construction: a
ceiling that includes the work the message types force on any core).

Usage: python bench/book.py [--ops N] [--repeat R] [--seed S]
"""

from __future__ import annotations

# Run as a script, Python puts bench/ first on sys.path, where this very file
# (bench/actors.py) would shadow the real ``actors`` package: drop it.
import sys as _sys
from pathlib import Path as _Path

_HERE = _Path(__file__).parent.resolve()
_sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _HERE]

import argparse
import gc
import json
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sortedcontainers import SortedDict

from actors.cores.book import OrderBook
from protocol import CancelOrder, Instrument, NewOrder, parse_instruments

SYMBOL = "BTC-PERP"
BUYERS = ("b1", "b2", "b3")
SELLERS = ("s1", "s2", "s3")
# kinds in the bare stream
ADD, CANCEL, IOC, MARKET = 0, 1, 2, 3
MARKET_BUY_BOUND = 1 << 62
#: Operations per turn of the core: it publishes market data once per turn.
TURN = 100
#: Operations per timed block (a whole number of turns).
BLOCK = 10 * TURN


class BareBook:
    """The ceiling: price-time matching and nothing else."""

    def __init__(self) -> None:
        self.bids: Any = SortedDict()  # -price -> deque[[order_id, qty]]
        self.asks: Any = SortedDict()  # price -> deque[[order_id, qty]]
        self.ids: dict[int, list[int]] = {}
        self.fills: list[tuple[int, int, int, int]] = []

    def submit(self, order_id: int, is_buy: bool, price: int, qty: int, rest: bool) -> None:
        if is_buy:
            opp, limit, sign = self.asks, price, 1
        else:
            opp, limit, sign = self.bids, -price, -1
        ids = self.ids
        fills = self.fills
        while qty and opp:
            key, queue = opp.peekitem(0)
            if key > limit:
                break
            while qty and queue:
                entry = queue[0]
                left = entry[1]
                if not left:
                    queue.popleft()
                    continue
                q = qty if qty < left else left
                qty -= q
                entry[1] = left - q
                fills.append((entry[0], order_id, sign * key, q))
                if left == q:
                    queue.popleft()
                    del ids[entry[0]]
            if not queue:
                del opp[key]
        if qty and rest:
            side = self.bids if is_buy else self.asks
            key = -price if is_buy else price
            queue = side.get(key)
            if queue is None:
                queue = side[key] = deque()
            entry = [order_id, qty]
            queue.append(entry)
            ids[order_id] = entry

    def cancel(self, order_id: int) -> None:
        entry = self.ids.pop(order_id, None)
        if entry is not None:
            entry[1] = 0

    def resting_qty(self) -> int:
        return sum(entry[1] for entry in self.ids.values())


BareOp = tuple[int, int, bool, int, int]


def build_stream(
    inst: Instrument, n: int, seed: int
) -> tuple[list[BareOp], list[tuple[bool, NewOrder | CancelOrder]]]:
    """The operations twice: tuples for the bare book, messages for the core."""
    rng = random.Random(seed)
    mid = inst.ref_price
    lo, hi = inst.band(mid)
    sim = BareBook()  # tells which orders are still live when a cancel is drawn
    live: list[int] = []
    owner: dict[int, str] = {}
    bare: list[BareOp] = []
    core: list[tuple[bool, NewOrder | CancelOrder]] = []
    next_id = 1
    ts = 1_700_000_000_000_000_000
    for _ in range(n):
        ts += 1_000
        r = rng.random()
        op: BareOp | None = None
        if 0.60 <= r < 0.85:
            while live:
                i = rng.randrange(len(live))
                order_id = live[i]
                live[i] = live[-1]
                live.pop()
                if order_id in sim.ids:
                    op = (CANCEL, order_id, False, 0, 0)
                    core.append((True, CancelOrder(
                        order_id=order_id, user=owner[order_id], symbol=SYMBOL, ts=ts)))
                    break
            if op is None:
                r = 0.0  # nothing live to cancel: add instead
        if op is None:
            is_buy = rng.random() < 0.5
            user = rng.choice(BUYERS if is_buy else SELLERS)
            order_id = next_id
            next_id += 1
            owner[order_id] = user
            if r < 0.85:
                price = mid - rng.randint(0, 40) if is_buy else mid + rng.randint(1, 40)
                qty = rng.randint(1, 10)
                op = (ADD, order_id, is_buy, price, qty)
                live.append(order_id)
                msg = NewOrder(order_id=order_id, user=user, client_order_id=f"c{order_id}",
                               symbol=SYMBOL, side="buy" if is_buy else "sell",
                               order_type="limit", price=price, qty=qty, tif="gtc", ts=ts)
            elif r < 0.925:
                price = mid + rng.randint(1, 20) if is_buy else mid - rng.randint(0, 19)
                qty = rng.randint(1, 20)
                op = (IOC, order_id, is_buy, price, qty)
                msg = NewOrder(order_id=order_id, user=user, client_order_id=f"c{order_id}",
                               symbol=SYMBOL, side="buy" if is_buy else "sell",
                               order_type="limit", price=price, qty=qty, tif="ioc", ts=ts)
            else:
                qty = rng.randint(1, 20)
                op = (MARKET, order_id, is_buy, MARKET_BUY_BOUND if is_buy else 0, qty)
                msg = NewOrder(order_id=order_id, user=user, client_order_id=f"c{order_id}",
                               symbol=SYMBOL, side="buy" if is_buy else "sell",
                               order_type="market", price=None, qty=qty, tif="ioc", ts=ts)
            assert msg.price is None or lo <= msg.price <= hi
            core.append((False, msg))
        assert op is not None
        bare.append(op)
        kind, order_id, is_buy, price, qty = op
        if kind == CANCEL:
            sim.cancel(order_id)
        else:
            sim.submit(order_id, is_buy, price, qty, kind == ADD)
    return bare, core


def turns(ops: list[tuple[bool, Any]], size: int = TURN) -> list[tuple[list[Any], int]]:
    """The core's stream cut into turns of ``size`` operations, each with its last ``ts``."""
    out = []
    for i in range(0, len(ops), size):
        chunk = ops[i:i + size]
        out.append((chunk, chunk[-1][1].ts))
    return out


def run_bare(blocks: list[list[BareOp]]) -> tuple[list[float], BareBook]:
    """The bare book over the blocks from empty; the seconds each block took."""
    book = BareBook()
    submit, cancel = book.submit, book.cancel
    clock = time.perf_counter
    times: list[float] = []
    gc.collect()
    for ops in blocks:
        t0 = clock()
        for kind, order_id, is_buy, price, qty in ops:
            if kind == CANCEL:
                cancel(order_id)
            else:
                submit(order_id, is_buy, price, qty, kind == ADD)
        times.append(clock() - t0)
    return times, book


def run_core(inst: Instrument, blocks: list[list[Any]]) -> tuple[list[float], OrderBook]:
    """The core over the blocks from empty, a flush per turn; the seconds each block took."""
    book = OrderBook(inst)
    submit, cancel, flush = book.submit, book.cancel, book.flush_market
    clock = time.perf_counter
    times: list[float] = []
    gc.collect()
    for block in blocks:
        t0 = clock()
        for turn, ts in block:
            for is_cancel, msg in turn:
                if is_cancel:
                    cancel(msg)
                else:
                    submit(msg)
            flush(ts)
        times.append(clock() - t0)
    return times, book


def _ending(book: OrderBook | BareBook) -> tuple[int, int, int]:
    """How a book ended: its fills, its resting lots and its resting orders."""
    if isinstance(book, BareBook):
        return len(book.fills), book.resting_qty(), len(book.ids)
    bids, asks = book.depth()
    return book.next_trade_id - 1, sum(q for _, q in bids) + sum(q for _, q in asks), len(book)


def _line(name: str, value: float, unit: str, ceiling: float | None = None) -> None:
    out: dict[str, Any] = {"name": name, "value": round(value, 1), "unit": unit}
    if ceiling is not None:
        out["ceiling"] = round(ceiling, 1)
        out["ratio"] = round(value / ceiling, 3)
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ops", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    inst = parse_instruments((root / "protocol" / "instruments.toml").read_text())[SYMBOL]
    bare_ops, core_ops = build_stream(inst, args.ops, args.seed)
    core_turns = turns(core_ops)
    per_block = BLOCK // TURN
    bare_blocks = [bare_ops[i:i + BLOCK] for i in range(0, len(bare_ops), BLOCK)]
    core_blocks = [core_turns[i:i + per_block] for i in range(0, len(core_turns), per_block)]

    runs: dict[str, Callable[[], tuple[list[float], Any]]] = {
        "bare": lambda: run_bare(bare_blocks),
        "core": lambda: run_core(inst, core_blocks),
    }
    # How each book ended (fills, resting lots, resting orders): only the book
    # being timed is alive while it runs, so each is summed up and dropped.
    ended: dict[str, tuple[int, int, int]] = {}
    fastest: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for name, run in runs.items():
            times, book = run()
            ended[name] = _ending(book)
            del book
            old = fastest.get(name, times)
            fastest[name] = [min(a, b) for a, b in zip(old, times, strict=True)]
    best = {name: sum(times) for name, times in fastest.items()}

    bare_rate = args.ops / best["bare"]
    core_rate = args.ops / best["core"]
    _line("book.core_ops_per_s", core_rate, "ops/s", bare_rate)
    _line("book.bare_ops_per_s", bare_rate, "ops/s")
    detail: dict[str, int] = {"ops": args.ops}
    for name in ("core", "bare"):
        fills, resting_qty, resting_orders = ended[name]
        detail[f"{name}_fills"] = fills
        detail[f"{name}_resting_qty"] = resting_qty
        detail[f"{name}_resting_orders"] = resting_orders
    match = (
        detail["core_fills"] == detail["bare_fills"]
        and detail["core_resting_qty"] == detail["bare_resting_qty"]
        and detail["core_resting_orders"] == detail["bare_resting_orders"]
    )
    # 1 when both books end with the same fills and resting quantity, else 0.
    print(json.dumps({"name": "book.sanity", "value": int(match), "unit": "match",
                      "detail": detail}), flush=True)

    # What the protocol's event objects alone cost: the core must build them and
    # the bare loop does not. Per-class construction time (best of a few, from a
    # real event's fields, built the way the core builds them) times how many
    # the stream produced.
    counts: Counter[type] = Counter()
    samples: dict[type, tuple[Any, ...]] = {}
    book = OrderBook(inst)
    for turn, ts in core_turns:
        events: list[Any] = []
        for _, msg in turn:
            events += book.cancel(msg) if isinstance(msg, CancelOrder) else book.submit(msg)
        events += book.flush_market(ts)
        for event in events:
            cls = type(event)
            counts[cls] += 1
            if cls not in samples:
                samples[cls] = tuple(event)
    events_s = sum(n * _build_time(cls, samples[cls]) for cls, n in counts.items())
    print(json.dumps({
        "name": "book.core_event_build_share",
        "value": round(events_s / best["core"], 3),
        "unit": "ratio",
        "events_per_op": round(sum(counts.values()) / args.ops, 3),
        "event_build_s": round(events_s, 3),
        "core_s": round(best["core"], 3),
    }), flush=True)
    # The bare loop plus building the same events: a ceiling that includes the
    # work the protocol's message types force on any core.
    _line("book.bare_plus_events_ops_per_s", args.ops / (best["bare"] + events_s), "ops/s")


def _build_time(cls: type, values: tuple[Any, ...], n: int = 20_000) -> float:
    """Seconds to construct one ``cls`` from ``values`` as the core does, best of three."""
    new = tuple.__new__
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            new(cls, values)
        best = min(best, time.perf_counter() - t0)
    return best / n


if __name__ == "__main__":
    main()
