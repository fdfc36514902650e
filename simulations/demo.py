"""The in-process demo: seeded traders on every instrument, then invariant checks.

Runs the desks on :class:`~actors.local.LocalEngine` with a virtual clock (1 ms
per step), so a seed always gives the same trades. Market makers quote around a
drifting reference price and requote; takers send market and IOC orders. A
live table shows the books; at the end the run checks that cash is conserved,
positions net to zero, books are not crossed, every order is accounted for and
every trader's private event stream is gapless.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Any

import attrs
from rich.console import Console
from rich.live import Live
from rich.table import Table

from actors.local import LocalEngine
from actors.messages import (
    AccountCancelAll,
    AccountDeposit,
    AccountPlace,
    Delivery,
    Dest,
    Reply,
    ReplyTo,
)
from protocol import (
    CASH_STEP,
    Instrument,
    NewOrder,
    PublicTrade,
    cash_str,
)

MS = 1_000_000
EPOCH_NS = 1_767_225_600 * 1_000_000_000  # 2026-01-01T00:00:00Z: a fixed virtual start
FUNDING = int(1_000_000 / CASH_STEP)


@attrs.define
class DemoStats:
    steps: int = 0
    orders: int = 0
    rejected: int = 0
    trades: int = 0
    volume: dict[str, int] = attrs.field(factory=dict)
    last: dict[str, int] = attrs.field(factory=dict)


@attrs.frozen
class DemoCheck:
    name: str
    passed: bool
    detail: str


class Demo:
    """A seeded market of ``agents`` traders on every instrument."""

    def __init__(self, instruments: Mapping[str, Instrument], *, agents: int, seed: int) -> None:
        self.instruments = dict(instruments)
        self.rng = random.Random(seed)
        self.stats = DemoStats()
        self.delivered: dict[str, list[int]] = {}
        self.engine = LocalEngine(
            self.instruments, on_gateway=self._on_gateway, on_market=self._on_market
        )
        self.now = EPOCH_NS
        self.users = [f"trader{i}" for i in range(1, agents + 1)]
        n_makers = max(1, agents // 3)
        self.makers = self.users[:n_makers]
        self.takers = self.users[n_makers:] or self.users
        self.mid = {s: i.ref_price for s, i in self.instruments.items()}
        self._cid = 0
        for user in self.users:
            self.engine.attach(user, "demo")
            self.engine.send(Dest("account", user), AccountDeposit(
                reply_to=None, user=user, amount=FUNDING, ts=self.now))
        self.deposits = FUNDING * len(self.users)
        self.engine.run(self.now)

    def _on_gateway(self, _: str, msg: Any) -> None:
        if isinstance(msg, Delivery):
            self.delivered.setdefault(msg.user, []).extend(e.seq for e in msg.events)
        elif isinstance(msg, Reply) and not msg.ok:
            self.stats.rejected += 1

    def _on_market(self, symbol: str, ev: Any) -> None:
        if isinstance(ev, PublicTrade):
            self.stats.trades += 1
            self.stats.volume[symbol] = self.stats.volume.get(symbol, 0) + ev.qty
            self.stats.last[symbol] = ev.price

    def _place(self, user: str, symbol: str, side: str, price: int | None, qty: int,
               tif: str = "gtc") -> None:
        self._cid += 1
        order = NewOrder(
            order_id=self.engine.next_order_id(), user=user, client_order_id=f"d{self._cid}",
            symbol=symbol, side=side, order_type="market" if price is None else "limit",
            price=price, qty=qty, tif=tif, ts=self.now,
        )
        ref = self.stats.last.get(symbol, self.instruments[symbol].ref_price)
        self.engine.send(Dest("account", user), AccountPlace(
            reply_to=ReplyTo(gateway="demo", conn=0, request_id=self._cid), order=order,
            ref_price=ref))
        self.stats.orders += 1

    def step(self) -> None:
        self.now += MS
        self.stats.steps += 1
        rng = self.rng
        for symbol, inst in self.instruments.items():
            mid = self.mid[symbol] = max(10, self.mid[symbol] + rng.randint(-2, 2))
            lo, hi = inst.band(self.stats.last.get(symbol, inst.ref_price))
            mid = min(max(mid, lo + 20), hi - 20)
            self.mid[symbol] = mid
            maker = rng.choice(self.makers)
            if rng.random() < 0.1:
                self.engine.send(Dest("account", maker), AccountCancelAll(
                    reply_to=None, user=maker, symbol=symbol, ts=self.now))
            spread = rng.randint(1, 5)
            size = rng.randint(1, 5)
            self._place(maker, symbol, "buy", mid - spread, size)
            self._place(maker, symbol, "sell", mid + spread, size)
            if rng.random() < 0.5:
                taker = rng.choice(self.takers)
                side = rng.choice(("buy", "sell"))
                if rng.random() < 0.5:
                    self._place(taker, symbol, side, None, rng.randint(1, 3))
                else:
                    px = mid + (8 if side == "buy" else -8)
                    self._place(taker, symbol, side, px, rng.randint(1, 3), tif="ioc")
        self.engine.run(self.now)

    def finish(self) -> None:
        """Flush the router's conflation window so every event is numbered and delivered."""
        self.now += 1_000 * MS
        self.engine.run(self.now)

    # -- invariants ------------------------------------------------------------------

    def checks(self) -> list[DemoCheck]:
        eng = self.engine
        ledgers = [eng.account(u).ledger for u in self.users]
        marks = {s: self.stats.last.get(s, i.ref_price) for s, i in self.instruments.items()}
        total = sum(led.cash + led.fees_paid + sum(
            led.unrealized(s, marks[s]) for s in self.instruments) for led in ledgers)
        out = [DemoCheck(
            "cash + fees + unrealized conserved",
            total == self.deposits,
            f"{cash_str(total)} vs deposits {cash_str(self.deposits)}",
        )]
        nets = {s: sum(led.position(s)[0] for led in ledgers) for s in self.instruments}
        out.append(DemoCheck("net position per symbol is zero", all(v == 0 for v in nets.values()),
                         ", ".join(f"{s}={v}" for s, v in nets.items())))
        crossed = [
            s for s, d in eng.books.items()
            if d.book.best_bid() is not None and d.book.best_ask() is not None
            and d.book.best_bid() >= d.book.best_ask()  # type: ignore[operator]
        ]
        out.append(DemoCheck("no book is crossed", not crossed, ", ".join(crossed) or "all ok"))
        gaps = [u for u in self.users
                if self.delivered.get(u, []) != list(range(1, eng.router.router.last_seq(u) + 1))]
        n_events = sum(len(v) for v in self.delivered.values())
        out.append(DemoCheck("private seqs gapless, no duplicates", not gaps,
                         f"{n_events} events to {len(self.delivered)} users"
                         + (f"; broken: {gaps[:5]}" if gaps else "")))
        mismatched = []
        for u in self.users:
            ledger_open = set(eng.account(u).ledger.open_order_ids())
            book_open = {o.order_id for d in eng.books.values() for o in d.book.open_orders(u)}
            if ledger_open != book_open:
                mismatched.append(u)
        out.append(DemoCheck("every order accounted for (ledger == books)", not mismatched,
                         f"{self.stats.orders} orders" + (f"; {mismatched[:5]}" if mismatched
                                                         else "")))
        return out

    # -- display ---------------------------------------------------------------------

    def table(self, elapsed: float) -> Table:
        t = Table(title=f"Emporion demo — {len(self.users)} traders, {self.stats.steps} steps, "
                        f"{self.stats.orders / max(elapsed, 1e-9):,.0f} orders/s")
        for col in ("symbol", "bid", "ask", "last", "volume"):
            t.add_column(col, justify="right" if col != "symbol" else "left")
        for s, inst in self.instruments.items():
            book = self.engine.books[s].book
            bid, ask, last = book.best_bid(), book.best_ask(), self.stats.last.get(s)
            t.add_row(s, "-" if bid is None else inst.price_str(bid),
                      "-" if ask is None else inst.price_str(ask),
                      "-" if last is None else inst.price_str(last),
                      inst.qty_str(self.stats.volume.get(s, 0)))
        t.caption = f"trades {self.stats.trades:,}  refused {self.stats.rejected:,}"
        return t


def run_demo(instruments: Mapping[str, Instrument], *, agents: int, seconds: float,
             steps: int | None, seed: int, live: bool, console: Console | None = None) -> int:
    """Run the demo; returns the exit code (0 when every invariant holds)."""
    console = console or Console()
    demo = Demo(instruments, agents=agents, seed=seed)
    start = time.perf_counter()
    deadline = start + seconds

    def done() -> bool:
        if steps is not None:
            return demo.stats.steps >= steps
        return time.perf_counter() >= deadline

    if live:
        with Live(demo.table(0.0), console=console, refresh_per_second=4) as view:
            while not done():
                for _ in range(50):
                    demo.step()
                view.update(demo.table(time.perf_counter() - start))
    else:
        while not done():
            demo.step()
    demo.finish()
    elapsed = time.perf_counter() - start
    console.print(demo.table(elapsed))
    results = Table(title="invariants")
    for col in ("check", "result", "detail"):
        results.add_column(col)
    checks = demo.checks()
    for c in checks:
        results.add_row(c.name, "[green]pass" if c.passed else "[red]FAIL", c.detail)
    console.print(results)
    console.print(f"{demo.engine.messages:,} engine messages in {elapsed:.2f} s "
                  f"({demo.engine.messages / elapsed:,.0f}/s), seed {seed}")
    return 0 if all(c.passed for c in checks) else 1
