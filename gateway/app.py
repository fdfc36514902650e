"""``emporion run``: the embedded exchange a person (or any WebSocket client) can use.

Boots the engine in-process (simpleSystemBase, journal in ``--data-dir``),
starts the gateway on 127.0.0.1, provisions demo users ``demo1``…``demoN``
(password ``demo``, each funded with 1,000,000 of the quote currency), starts
a small population of simulated traders that connect through the real gateway
with the client SDK, and shows a live view: top of book per symbol, trades/s,
connections, P50/P99 latency of the order and trade notifications (P0/P1; the
P2/P3 account and position updates wait out the conflation window by design, so
they are left out). Ctrl-C stops cleanly; the summary printed at the end shows
the most connections seen, since every trader has disconnected by then.
"""

from __future__ import annotations

import math
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import trio
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from actors.host import EngineConfig
from actors.messages import AccountDeposit, Dest
from gateway.bridge import BridgeOptions, EngineBridge
from gateway.client import ClientError, MarketUpdate, PrivateUpdate, open_client
from gateway.server import Gateway, GatewayConfig, stop_on_signals
from protocol import CASH_STEP, Instrument, parse_instruments

FUNDING = int(1_000_000 / CASH_STEP)
#: A simulated trader's largest net position per symbol, as notional (quote currency)
#: at the reference price; see :func:`max_position_lots`.
POSITION_NOTIONAL = Decimal(1_000_000)
#: The highest priority class that is never conflated (PROTOCOL.md): the live view's
#: notification latency counts these events only.
_UNCONFLATED = 1


@attrs.frozen(kw_only=True)
class RunOptions:
    host: str = "127.0.0.1"
    port: int = 8765
    data_dir: Path = Path("data")
    agents: int = 6
    demo_users: int = 10
    seconds: float | None = None  # stop by itself after this long (tests, demos)
    fsync: str = "batch"
    #: Events per user the router keeps for resumes (stored in the journal).
    replay_capacity: int = 10_000
    live: bool = True
    #: Users from the users file and their initial deposits (minor units).
    deposits: tuple[tuple[str, int], ...] = ()


class Latency:
    """The last samples of one latency, for percentiles in the live view."""

    def __init__(self, keep: int = 20_000) -> None:
        self.samples: deque[float] = deque(maxlen=keep)

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def pct(self, p: float) -> float | None:
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


@attrs.define
class Stats:
    started: float = attrs.field(factory=time.monotonic)
    orders: int = 0
    refused: int = 0
    #: The order and trade events' (P0/P1) event ts → receipt by a trader.
    notify: Latency = attrs.field(factory=Latency)
    ack: Latency = attrs.field(factory=Latency)
    trades_window: deque[float] = attrs.field(factory=lambda: deque(maxlen=100_000))
    peak_connections: int = 0


def max_position_lots(inst: Instrument) -> int:
    """The net position, in lots, past which a simulated trader only trades back
    towards flat: :data:`POSITION_NOTIONAL` at the reference price (at least one
    lot). Without it the traders' positions walked at random until their margin
    ate their cash and most of their orders were refused (``insufficient_funds``)."""
    lot_value = inst.ref_price * inst.tick * inst.lot * inst.multiplier
    return max(1, int(POSITION_NOTIONAL / lot_value))


async def agent(url: str, user: str, password: str, symbols: list[Instrument], seed: int,
                stats: Stats, role: str) -> None:
    """One simulated trader: a market maker quotes around the last price, a taker
    crosses the spread now and then; past :func:`max_position_lots` either one only
    trades back towards flat. Its decisions come from its own seeded RNG."""
    rng = random.Random(seed)
    mid = {i.symbol: i.ref_price for i in symbols}
    by_symbol = {i.symbol: i for i in symbols}
    limit = {i.symbol: max_position_lots(i) for i in symbols}
    net = dict.fromkeys(mid, 0)  # lots, from the account's position_update events
    async with open_client(url, user, password) as c:
        await c.subscribe([f"ticker.{i.symbol}" for i in symbols])

        async def listen() -> None:
            async for ev in c.events():
                if isinstance(ev, PrivateUpdate) and ev.kind == "position_update":
                    data = ev.raw["data"]
                    inst = by_symbol.get(data.get("symbol"))
                    if inst is not None:
                        net[inst.symbol] = (inst.qty_to_lots(data["long_qty"], zero_ok=True)
                                            - inst.qty_to_lots(data["short_qty"], zero_ok=True))
                if isinstance(ev, PrivateUpdate) and ev.priority <= _UNCONFLATED:
                    stats.notify.add(max(0.0, (time.time_ns() - ev.ts) / 1e9))
                elif isinstance(ev, MarketUpdate) and ev.kind == "ticker":
                    last = ev.data.get("last")
                    inst = next(i for i in symbols if ev.channel.endswith(i.symbol))
                    if last is not None:
                        mid[inst.symbol] = int(Decimal(last) / inst.tick)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            while True:
                inst = rng.choice(symbols)
                m = mid[inst.symbol] + rng.randint(-3, 3)
                t0 = time.perf_counter()
                try:
                    pos, cap = net[inst.symbol], limit[inst.symbol]
                    if role == "maker":
                        if rng.random() < 0.2:
                            await c.cancel_all(inst.symbol)
                        spread = rng.randint(1, 4)
                        size = inst.qty_str(rng.randint(1, min(5, cap)))
                        if pos < cap:  # long enough: quote only the offer
                            await c.place(inst.symbol, "buy", "limit", qty=size,
                                          price=inst.price_str(m - spread))
                            stats.orders += 1
                        if pos > -cap:  # short enough: quote only the bid
                            await c.place(inst.symbol, "sell", "limit", qty=size,
                                          price=inst.price_str(m + spread))
                            stats.orders += 1
                    else:
                        side = rng.choice(("buy", "sell"))
                        if abs(pos) >= cap:
                            side = "sell" if pos > 0 else "buy"  # back towards flat
                        await c.place(inst.symbol, side, "market",
                                      qty=inst.qty_str(rng.randint(1, min(3, cap))))
                        stats.orders += 1
                    stats.ack.add(time.perf_counter() - t0)
                except ClientError:
                    stats.refused += 1
                await trio.sleep(rng.uniform(0.02, 0.2))  # pacing: a trader thinks


def _view(gw: Gateway, stats: Stats, instruments: Mapping[str, Instrument],
          books: dict[str, tuple[str, str]], url: str, *, final: bool = False) -> Group:
    """The live view (or, ``final``, the summary at stop): a header line, top of book
    per symbol, and a latency line. The lines are text outside the table, so they
    wrap at the console's width rather than the table's."""
    elapsed = max(1e-9, time.monotonic() - stats.started)
    now = time.monotonic()
    recent = sum(1 for t in stats.trades_window if now - t <= 5.0)
    stats.peak_connections = max(stats.peak_connections, len(gw.conns))
    conns = (f"peak {stats.peak_connections} connections" if final
             else f"{len(gw.conns)} connections")
    header = Text.from_markup(
        f"[bold]Emporion[/] on {url} — {conns}, "
        f"{recent / 5:.1f} trades/s, {stats.orders / elapsed:.0f} orders/s")
    t = Table()
    for col in ("symbol", "bid", "ask", "last"):
        t.add_column(col, justify="left" if col == "symbol" else "right")
    for sym in instruments:
        bid, ask = books.get(sym, ("-", "-"))
        last = gw._last_price.get(sym)
        t.add_row(sym, bid, ask, "-" if last is None else instruments[sym].price_str(last))

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.2f} ms"

    footer = Text(
        f"order/trade notification latency P50 {ms(stats.notify.pct(50))}  "
        f"P99 {ms(stats.notify.pct(99))}  ·  submit→ack P50 {ms(stats.ack.pct(50))}  ·  "
        f"refused {stats.refused}" + ("" if final else "  ·  Ctrl-C stops"), style="dim")
    return Group(header, t, footer)


async def run_exchange(options: RunOptions, instruments_toml: str,
                       check_password: Callable[[str, str], bool],
                       console: Console | None = None) -> int:
    """Run until Ctrl-C (or ``options.seconds``); returns the exit code.

    ``instruments_toml`` is the registry's text: the engine's books and the gateway's
    validation both come from it, so a custom ``--instruments`` file reaches both.
    """
    console = console or Console()
    options.data_dir.mkdir(parents=True, exist_ok=True)
    instruments = parse_instruments(instruments_toml)
    engine = EngineConfig(instruments_toml=instruments_toml, data_dir=str(options.data_dir),
                          fsync=options.fsync, replay_capacity=options.replay_capacity)
    bridge = EngineBridge(BridgeOptions(engine=engine))
    gw = Gateway(bridge, instruments, check_password,
                 GatewayConfig(host=options.host, port=options.port))
    stats = Stats()
    books: dict[str, tuple[str, str]] = {}
    demo = [f"demo{i}" for i in range(1, options.demo_users + 1)]
    bots = [f"bot{i}" for i in range(1, options.agents + 1)]
    # The first SIGINT/SIGTERM (even during the start) shuts the gateway down once
    # it is up; a second one stops everything at once (stop_on_signals).
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signals, signals, stop, nursery.cancel_scope)
            await nursery.start(gw.serve)
            url = f"ws://{options.host}:{gw.port}/v1"
            funding = [(u, FUNDING) for u in demo + bots] + list(options.deposits)
            for user, amount in funding:
                # The waiting calls: thousands of users may outgrow the bridge's queue.
                await bridge.open_accounts_waiting(user)
                if amount > 0 and not _funded(options.data_dir, user):
                    await bridge.submit_waiting(Dest("account", user), AccountDeposit(
                        reply_to=None, user=user, amount=amount, ts=time.time_ns()))
            _mark_funded(options.data_dir, [u for u, _ in funding])
            console.print(f"[bold]Emporion[/] listening on [cyan]{url}[/] — demo users "
                          f"demo1…demo{options.demo_users} (password 'demo'), "
                          f"{options.agents} simulated traders, data in {options.data_dir}")
            syms = list(instruments.values())
            # The simulated traders and the market view are clients of this very
            # gateway: they stop before it shuts down (its closes would fail them).
            clients = await nursery.start(_client_nursery)
            for i, bot in enumerate(bots):
                clients.start_soon(agent, url, bot, "demo", syms, 1000 + i, stats,
                                   "maker" if i % 2 == 0 else "taker")

            async def watch_market() -> None:
                async with open_client(url, "demo1", "demo") as c:
                    await c.subscribe([f"ticker.{s}" for s in instruments]
                                      + [f"trades.{s}" for s in instruments])
                    async for ev in c.events():
                        if isinstance(ev, MarketUpdate):
                            sym = ev.channel.split(".", 1)[1]
                            if ev.kind == "ticker":
                                books[sym] = (ev.data.get("best_bid") or "-",
                                              ev.data.get("best_ask") or "-")
                            elif ev.kind == "trade":
                                stats.trades_window.append(time.monotonic())

            if options.demo_users:
                clients.start_soon(watch_market)
            with trio.move_on_after(math.inf if options.seconds is None else options.seconds):
                if options.live:
                    with Live(_view(gw, stats, instruments, books, url), console=console,
                              refresh_per_second=4) as live:
                        await _refresh(live, lambda: _view(gw, stats, instruments, books, url),
                                       stop)
                else:  # only the peak connection count; the view prints at the end
                    while not stop.is_set():
                        stats.peak_connections = max(stats.peak_connections, len(gw.conns))
                        with trio.move_on_after(0.25):
                            await stop.wait()
            clients.cancel_scope.cancel()
            console.print("stopping: answering what was asked, then closing connections")
            await gw.shutdown()
            nursery.cancel_scope.cancel()
    console.print(_view(gw, stats, instruments, books, url, final=True))
    console.print("stopped cleanly; the journal is in " + str(options.data_dir))
    return 0


async def _client_nursery(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A nursery for :func:`run_exchange`'s own clients, handed out by ``task_status``
    and open until its cancel scope is cancelled."""
    async with trio.open_nursery() as clients:
        task_status.started(clients)
        await trio.sleep_forever()


async def _refresh(live: Live, make: Callable[[], Group], stop: trio.Event) -> None:
    while not stop.is_set():
        with trio.move_on_after(0.25):  # the view's refresh period
            await stop.wait()
        live.update(make())


def _funded(data_dir: Path, user: str) -> bool:
    marker = data_dir / "funded.txt"
    return marker.exists() and user in marker.read_text().split()


def _mark_funded(data_dir: Path, users: list[str]) -> None:
    marker = data_dir / "funded.txt"
    known = set(marker.read_text().split()) if marker.exists() else set()
    marker.write_text("\n".join(sorted(known | set(users))) + "\n")
