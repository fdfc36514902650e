"""The actor engine's throughput and hop cost, side by side with bare Thespian.

Prints one JSON object per line: ``{"name", "value", "unit"}`` plus, where a
figure is compared, ``"ceiling"`` (bare Thespian, measured in the same run) and
``"ratio"`` (value / ceiling), and a ``"note"``/``"detail"`` where useful.

Figures:

1. ``actors.<base>.orders_per_s``: orders/s end to end through the real engine
   (an :class:`~actors.boot.EngineLink` → Account host → Book host → Account
   hosts → Router host → back to the link), journal on (fsync ``batch``, temp
   data dir), conflation window as default. A population of users deposits
   first and attaches its private events to the link; then ``N`` orders (a
   seeded mix of resting limits and crossing IOC limits) go out 100 per
   ``send`` call (one :class:`~actors.host.EngineBatch` per account host per
   call), pipelined with a bounded number of outstanding orders. Every
   :class:`~actors.messages.AccountPlace` carries a ``ReplyTo``; the clock stops
   when every Reply arrived *and* a router barrier (a ``RouterAttach`` with a
   ``reply_to``, sent after the last Reply) answered, so the router's work for
   the orders is inside the measured span. Ceiling: a bare blast of the same
   number of messages (``N / batch``), each a tuple of the same 100 items, from
   outside to one :class:`~actors.runtime.RuntimeSink`.
   ``actors.simple.group_commit_pass.orders_per_s``: the same under simpleSystemBase
   with ``group_commit="pass"``, as the embedded gateway bridge runs the engine:
   every host writes its turns into one open transaction and the driver commits it
   (:func:`~actors.journal.flush_shared`) after each ``receive``, before any Reply
   counts — write-ahead at the process edge, as the bridge does before delivering.
   ``actors.simple.orders_per_s`` stays the per-turn commit figure (multiprocTCPBase's
   policy, also the default of :class:`~actors.host.EngineConfig`). The pass run also
   sends as the bridge does: one batch per ``send`` to the Exchange, which splits it
   per host (``EngineLink(fanout=True)``), and hosts apply what is queued for them in
   one turn (grouped turns, :mod:`actors.host`).
2. ``actors.tcp.batching_lift``: under multiprocTCPBase, orders/s at 100 orders
   per ``send`` over orders/s at one order per ``send`` (one message each).
3. ``actors.<base>.hop_median``: an ``AccountQuery`` to one account host and its
   Reply back to the link, median µs, next to the bare ``ask`` ping-pong median
   to a :class:`~actors.runtime.RuntimeEcho` (lower is better).
4. ``actors.simple.journal_<policy>.orders_per_s``: orders/s under
   simpleSystemBase with fsync ``always`` / ``batch`` / ``off``.
5. ``actors.desks_only.orders_per_s``: the same orders through the same desks
   on :class:`~actors.local.LocalEngine`, with no actor runtime and no journal,
   a batch of 100 per round (the outcome is the actor runs': the same
   ``filled``). The engine's own work: the floor under the figures above, and
   what the 15,000 target would need before any runtime or journal cost.

Every actor system is started and stopped by :func:`actors.runtime.running_system`.

Placement: under simpleSystemBase one account host per user (the embedded
default; ``--simple-shards``), plus a diagnostic run with every account in one
shard host; under multiprocTCPBase ``--tcp-shards`` (default 2) account shard
hosts, as the multi-process deployment prescribes.

Usage: ``python bench/actors.py [--quick] [--orders N] [--unbatched N] [--only simple|tcp]
[--profile [--group-commit turn|pass]]`` (``--profile`` runs only the simpleSystemBase
order run under cProfile and prints the top functions by cumulative and own time to
stderr).
"""

from __future__ import annotations

# Run as a script, Python puts bench/ first on sys.path, where this very file
# (bench/actors.py) would shadow the real ``actors`` package: drop it.
import sys as _sys
from pathlib import Path as _Path

_HERE = _Path(__file__).parent.resolve()
_sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _HERE]

import argparse
import contextlib
import cProfile
import io
import itertools
import json
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.boot import EngineLink, boot_engine
from actors.host import EngineConfig
from actors.journal import flush_shared
from actors.local import LocalEngine
from actors.messages import (
    AccountDeposit,
    AccountPlace,
    AccountQuery,
    Delivery,
    Dest,
    Reply,
    ReplyTo,
    RouterAttach,
)
from actors.runtime import (
    RuntimeEcho,
    RuntimeSink,
    RuntimeSinkCount,
    RuntimeSinkQuery,
    SystemConfig,
    running_system,
)
from protocol import NewOrder, parse_instruments

ROOT = Path(__file__).resolve().parent.parent
SYMBOL = "BTC-PERP"
MID = 600_000  # ticks: 60000.0
DEPOSIT = 10**10  # minor units (0.0001 USDT): 1,000,000 USDT per user
GATEWAY = "bench"
ASK = 30.0
PHASE_TIMEOUT = 60.0
#: A run with replies outstanding stops after this long without one (lost replies).
STALL = 3.0

Item = tuple[Dest, Any]


def emit(name: str, value: float, unit: str, **extra: Any) -> None:
    row: dict[str, Any] = {"name": name, "value": round(value, 3), "unit": unit}
    row.update(extra)
    print(json.dumps(row), flush=True)


def compared(name: str, value: float, unit: str, ceiling: float, **extra: Any) -> None:
    emit(
        name,
        value,
        unit,
        ceiling=round(ceiling, 3),
        ratio=round(value / ceiling, 4) if ceiling else None,
        **extra,
    )


# -- workload ------------------------------------------------------------------------------


def users(count: int) -> list[str]:
    return [f"u{i:02d}" for i in range(count)]


def make_orders(population: Sequence[str], count: int, seed: int) -> list[Item]:
    """``count`` placements: ~65 % resting GTC limits within 40 ticks of the mid,
    ~35 % IOC limits crossing 50 ticks through it (they trade what rests)."""
    rng = random.Random(seed)
    now = time.time_ns()
    out: list[Item] = []
    for i in range(count):
        user = rng.choice(population)
        side = rng.choice(("buy", "sell"))
        sign = 1 if side == "buy" else -1
        if rng.random() < 0.65:
            price, qty, tif = MID - sign * rng.randint(1, 40), rng.randint(1, 5), "gtc"
        else:
            price, qty, tif = MID + sign * 50, rng.randint(1, 8), "ioc"
        order = NewOrder(
            order_id=i + 1,
            user=user,
            client_order_id=f"c{i + 1}",
            symbol=SYMBOL,
            side=side,
            order_type="limit",
            price=price,
            qty=qty,
            tif=tif,
            ts=now + i,
        )
        reply_to = ReplyTo(gateway=GATEWAY, conn=1, request_id=i + 1)
        out.append(
            (Dest("account", user), AccountPlace(reply_to=reply_to, order=order, ref_price=MID))
        )
    return out


def chunks(items: Sequence[Item], size: int) -> list[list[Item]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# -- the engine ----------------------------------------------------------------------------


class Tally:
    """What came back to the link."""

    def __init__(self) -> None:
        self.replies: dict[int, Reply] = {}
        self.deliveries = 0
        self.events = 0
        self.market = 0

    def take(self, got: list[Any]) -> None:
        for m in got:
            if isinstance(m, Reply):
                self.replies[int(m.reply_to.request_id)] = m  # type: ignore[arg-type]
            elif isinstance(m, Delivery):
                self.deliveries += 1
                self.events += len(m.events)
            else:
                self.market += 1


def engine_config(
    data_dir: str, fsync: str, shards: int, group_commit: str = "turn"
) -> EngineConfig:
    return EngineConfig(
        instruments_toml=(ROOT / "protocol" / "instruments.toml").read_text(),
        data_dir=data_dir,
        fsync=fsync,
        account_shards=shards,
        group_commit=group_commit,
    )


def pump(link: EngineLink, tally: Tally, *, flush: bool = False) -> None:
    """Take what is there; block (up to 0.5 s) only when nothing is.

    Under simpleSystemBase a ``listen`` with a timeout sleeps until the next
    pending wakeup (the router's conflation timer) whenever no send is pending,
    even with replies already waiting - so look without waiting first.

    ``flush``: the engine runs with ``group_commit="pass"``; commit the pass's
    journal writes (:func:`~actors.journal.flush_shared`) before anything received
    counts, exactly where the embedded gateway bridge commits before delivering.
    """
    got = link.receive(0.0)
    if not got:
        got = link.receive(0.5)
    if flush:
        flush_shared()
    tally.take(got)


def wait_replies(
    link: EngineLink, tally: Tally, ids: set[int], what: str, *, flush: bool = False
) -> None:
    deadline = time.monotonic() + PHASE_TIMEOUT
    while not ids <= tally.replies.keys():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: {len(ids - tally.replies.keys())} replies missing")
        pump(link, tally, flush=flush)


class Engine:
    """A booted engine with a populated, attached user population."""

    def __init__(self, asys: Any, config: EngineConfig, population: Sequence[str]) -> None:
        boot_engine(asys, config)
        self.flush = config.group_commit == "pass"
        if self.flush:
            flush_shared()
        # As the embedded bridge runs it: with group commit per pass, the link fans out
        # through the Exchange so every host gets its batch at once (grouped turns).
        self.link = EngineLink(asys, GATEWAY, timeout=ASK, fanout=self.flush)
        self.tally = Tally()
        self.population = list(population)
        self.request_ids = itertools.count(10**9)
        for user in population:
            self.link.attach(user)
        ids = set()
        deposits: list[Item] = []
        for user in population:
            rid = next(self.request_ids)
            ids.add(rid)
            deposits.append(
                (
                    Dest("account", user),
                    AccountDeposit(
                        reply_to=self.reply_to(rid), user=user, amount=DEPOSIT, ts=time.time_ns()
                    ),
                )
            )
        self.link.send(deposits)
        wait_replies(self.link, self.tally, ids, "deposits", flush=self.flush)
        bad = [r for i, r in self.tally.replies.items() if i in ids and not r.ok]
        if bad:
            raise RuntimeError(f"deposits refused: {bad[:3]!r}")

    @staticmethod
    def reply_to(rid: int) -> ReplyTo:
        return ReplyTo(gateway=GATEWAY, conn=1, request_id=rid)

    def pump(self) -> None:
        pump(self.link, self.tally, flush=self.flush)

    def barrier(self) -> None:
        """A RouterAttach with a reply: the router answers after what it got before."""
        rid = next(self.request_ids)
        self.link.send(
            [
                (
                    Dest("router"),
                    RouterAttach(
                        user=self.population[0], gateway=GATEWAY, reply_to=self.reply_to(rid)
                    ),
                )
            ]
        )
        wait_replies(self.link, self.tally, {rid}, "router barrier", flush=self.flush)

    def run_orders(self, batches: list[list[Item]], window: int) -> dict[str, Any]:
        """Send ``batches`` (one ``send`` call each) keeping at most ``window`` orders
        unanswered; returns the timing and what came back.

        Replies that never come (see ``lost``) do not hang the run: once nothing has
        arrived for :data:`STALL` seconds the run stops, the rate is taken over the
        answered orders up to the last reply, and the missing request ids are listed.
        """
        link, tally = self.link, self.tally
        total = sum(len(b) for b in batches)
        ids = {int(item.reply_to.request_id) for b in batches for _, item in b}
        before = len(tally.replies)
        sent = messages = 0
        nxt = 0
        deadline = time.monotonic() + PHASE_TIMEOUT
        started = last = time.perf_counter()
        answered = 0
        while True:
            while nxt < len(batches) and sent - answered + len(batches[nxt]) <= window:
                messages += link.send(batches[nxt])
                sent += len(batches[nxt])
                nxt += 1
            if answered >= total:
                break
            self.pump()
            now = time.perf_counter()
            if len(tally.replies) - before > answered:
                answered, last = len(tally.replies) - before, now
            elif now - last > STALL or time.monotonic() > deadline:
                break
        replied = last - started
        lost = sorted(ids - tally.replies.keys())
        if not lost:
            self.barrier()
        elapsed = (time.perf_counter() if not lost else last) - started
        got = [tally.replies[i] for i in ids if i in tally.replies]
        result: dict[str, Any] = {
            "orders": total,
            "answered": len(got),
            "seconds": round(elapsed, 4),
            "seconds_to_last_reply": round(replied, 4),
            "messages_sent": messages,
            "ok": sum(r.ok for r in got),
            "refused": sum(not r.ok for r in got),
            "filled": sum(
                bool(r.ok and r.result and r.result.get("status") == "filled") for r in got
            ),
        }
        if lost:
            result["lost"] = len(lost)
            result["lost_request_ids"] = lost[:20]
        return result

    def hop(self, rounds: int) -> float:
        """Median µs of an AccountQuery to one account host and its Reply."""
        user = self.population[0]
        link, tally = self.link, self.tally
        late = link.receive(0.0)  # drain late deliveries (conflation timer)
        if self.flush:
            flush_shared()
        tally.take(late)
        samples = []
        for _ in range(rounds + 1):
            rid = next(self.request_ids)
            item = (
                Dest("account", user),
                AccountQuery(reply_to=self.reply_to(rid), user=user, what="account"),
            )
            started = time.perf_counter()
            link.send([item])
            while rid not in tally.replies:
                self.pump()
            samples.append(time.perf_counter() - started)
        return statistics.median(samples[1:]) * 1e6


@contextlib.contextmanager
def engine(
    system: SystemConfig,
    population: Sequence[str],
    *,
    fsync: str = "batch",
    shards: int = 0,
    logs: str | None = None,
    group_commit: str = "turn",
) -> Iterator[Engine]:
    """A fresh actor system, a fresh journal directory, a booted and populated engine."""
    with (
        tempfile.TemporaryDirectory(prefix="emporion-bench-") as data_dir,
        running_system(system, log_dir=logs) as asys,
    ):
        config = engine_config(data_dir, fsync, shards, group_commit)
        eng = Engine(asys, config, population)
        try:
            yield eng
        finally:
            eng.link.close()


def desks_only(population: Sequence[str], batches: list[list[Item]]) -> dict[str, Any]:
    """The same orders through the same desks with no actor runtime and no journal.

    :class:`~actors.local.LocalEngine` runs the desks the hosts run, FIFO per
    destination in rounds (each round one turn per desk), in this thread. Every
    batch of 100 goes in at once and runs to quiescence (one account turn per user,
    one book turn and one router turn per round), as the actor runs group it: the
    outcome is theirs (the same ``filled``). It is the engine's own work per order,
    the floor under ``actors.simple.*.orders_per_s``.
    """
    tally = Tally()
    instruments = parse_instruments((ROOT / "protocol" / "instruments.toml").read_text())
    local = LocalEngine(instruments, on_gateway=lambda _gw, m: tally.take([m]))
    rid = itertools.count(10**9)
    for user in population:
        local.attach(user, GATEWAY)
        local.send(Dest("account", user), AccountDeposit(
            reply_to=ReplyTo(gateway=GATEWAY, conn=1, request_id=next(rid)), user=user,
            amount=DEPOSIT, ts=time.time_ns()))
    local.run(time.time_ns())
    if len(tally.replies) != len(population) or not all(r.ok for r in tally.replies.values()):
        raise RuntimeError(f"desks only: deposits refused: {list(tally.replies.values())[:3]!r}")
    before = len(tally.replies)
    started = time.perf_counter()
    for batch in batches:
        for dest, item in batch:
            local.send(dest, item)
        local.run(time.time_ns())
    elapsed = time.perf_counter() - started
    got = list(tally.replies.values())[before:]
    total = sum(len(b) for b in batches)
    if len(got) != total:
        raise RuntimeError(f"desks only: {total - len(got)} replies missing")
    return {
        "orders": total,
        "answered": len(got),
        "seconds": round(elapsed, 4),
        "ok": sum(r.ok for r in got),
        "refused": sum(not r.ok for r in got),
        "filled": sum(
            bool(r.ok and r.result and r.result.get("status") == "filled") for r in got
        ),
        "private_events": tally.events,
    }


# -- bare Thespian ---------------------------------------------------------------------------


def bare_blast(asys: Any, batches: list[list[Item]]) -> float:
    """Items/s of the same messages (a tuple of the same items each) from outside
    into one trivial sink, until the sink confirms the count."""
    sink = asys.createActor(RuntimeSink)
    asys.ask(sink, RuntimeSinkQuery(), ASK)
    payloads = [tuple(b) for b in batches]
    items = sum(len(p) for p in payloads)
    started = time.perf_counter()
    for p in payloads:
        asys.tell(sink, p)
    count = asys.ask(sink, RuntimeSinkQuery(), ASK)
    elapsed = time.perf_counter() - started
    expected = RuntimeSinkCount(messages=len(payloads), items=items)
    if count != expected:
        raise RuntimeError(f"bare blast: {count!r} != {expected!r}")
    return items / elapsed


def bare_pingpong(asys: Any, rounds: int) -> float:
    echo = asys.createActor(RuntimeEcho)
    asys.ask(echo, "warm", ASK)
    samples = []
    for i in range(rounds):
        started = time.perf_counter()
        if asys.ask(echo, i, ASK) is None:
            raise RuntimeError("bare ping-pong: no echo")
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


# -- the run ---------------------------------------------------------------------------------


def orders_per_s(result: dict[str, Any]) -> float:
    return float(result["answered"] / result["seconds"])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=None, help="orders per batched run")
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--batch", type=int, default=100, help="orders per send call")
    ap.add_argument(
        "--window",
        type=int,
        default=4,
        help="outstanding send calls (window = batch * this many orders)",
    )
    ap.add_argument("--unbatched", type=int, default=None, help="orders of the unbatched run")
    ap.add_argument(
        "--tcp-shards",
        type=int,
        default=2,
        help="account shard hosts under multiprocTCPBase (0: a host per user)",
    )
    ap.add_argument(
        "--simple-shards",
        type=int,
        default=0,
        help="account shard hosts under simpleSystemBase (0: a host per user)",
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--only", choices=("simple", "tcp"), default=None, help="run only one base's figures"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="only profile the simpleSystemBase order run (stats to stderr)",
    )
    ap.add_argument(
        "--group-commit",
        choices=("turn", "pass"),
        default="turn",
        help="the journal's group commit for --profile",
    )
    args = ap.parse_args(argv)
    n = args.orders or (1_500 if args.quick else 10_000)
    n_single = args.unbatched or (100 if args.quick else 1_000)
    hops_simple, hops_tcp = (300, 100) if args.quick else (2_000, 400)
    population = users(args.users)
    orders = make_orders(population, n, args.seed)
    batches = chunks(orders, args.batch)
    window = args.batch * args.window
    simple = SystemConfig(base="simpleSystemBase")

    if args.profile:
        with engine(
            simple, population, shards=args.simple_shards, group_commit=args.group_commit
        ) as eng:
            prof = cProfile.Profile()
            prof.enable()
            result = eng.run_orders(batches, window)
            prof.disable()
        emit("actors.simple.orders_per_s.profiled", orders_per_s(result), "orders/s", detail=result)
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
        stats.print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
        print(out.getvalue(), file=sys.stderr)
        return 0

    with tempfile.TemporaryDirectory(prefix="emporion-bench-logs-") as logs:
        if args.only != "tcp":
            run_simple(args, batches, population, window, hops_simple)
        if args.only != "simple":
            run_tcp(args, batches, population, window, hops_tcp, n_single, logs)
    return 0


def run_simple(
    args: argparse.Namespace,
    batches: list[list[Item]],
    population: list[str],
    window: int,
    hops: int,
) -> None:
    simple = SystemConfig(base="simpleSystemBase")
    # -- simpleSystemBase --------------------------------------------------------------
    with running_system(simple) as asys:
        bare_simple = bare_blast(asys, batches)
        bare_simple_pp = bare_pingpong(asys, hops)
    per_policy: dict[str, dict[str, Any]] = {}
    for policy in ("batch", "always", "off"):
        with engine(simple, population, fsync=policy, shards=args.simple_shards) as eng:
            per_policy[policy] = eng.run_orders(batches, window)
            if policy == "batch":
                simple_hop = eng.hop(hops)
    compared(
        "actors.simple.orders_per_s",
        orders_per_s(per_policy["batch"]),
        "orders/s",
        bare_simple,
        target=15_000,
        detail=per_policy["batch"],
        note=f"journal fsync=batch, group_commit=turn (a commit per host turn); ceiling: "
        f"bare blast of {len(batches)} messages of {args.batch} items to one sink",
    )
    # The embedded deployment as it runs: every host on one thread, journal writes
    # of a pass in one transaction, committed before anything received counts.
    with engine(simple, population, shards=args.simple_shards, group_commit="pass") as eng:
        passed = eng.run_orders(batches, window)
    compared(
        "actors.simple.group_commit_pass.orders_per_s",
        orders_per_s(passed),
        "orders/s",
        bare_simple,
        target=15_000,
        detail=passed,
        note="journal fsync=batch, group_commit=pass: the embedded bridge's commit per "
        "pass (flush_shared after each receive, before replies count) instead of per "
        "host turn; same orders and ceiling as actors.simple.orders_per_s",
    )
    compared(
        "actors.simple.hop_median",
        simple_hop,
        "us",
        bare_simple_pp,
        note="AccountQuery to one account host and its Reply vs bare ask ping-pong; "
        "latency: lower is better, ratio = ours / bare",
    )
    for policy in ("always", "batch", "off"):
        emit(
            f"actors.simple.journal_{policy}.orders_per_s",
            orders_per_s(per_policy[policy]),
            "orders/s",
            detail=per_policy[policy],
        )
    # The floor: the same orders through the same desks with no runtime and no journal.
    floor = desks_only(population, batches)
    emit(
        "actors.desks_only.orders_per_s",
        orders_per_s(floor),
        "orders/s",
        target=15_000,
        detail=floor,
        note="the same orders through the same desks (actors.local.LocalEngine: no actor "
        "runtime, no journal), a batch per round: the engine's own work, the floor under "
        "actors.simple.*.orders_per_s",
    )
    if args.simple_shards == 0:
        # Diagnostic: the same orders with every account on one shard host, i.e. one
        # account turn per send call instead of one per user: isolates per-turn costs.
        with engine(simple, population, shards=1) as eng:
            one = eng.run_orders(batches, window)
        emit(
            "actors.simple.one_account_shard.orders_per_s",
            orders_per_s(one),
            "orders/s",
            detail=one,
            note="diagnostic: account_shards=1 (all accounts in one host), journal fsync=batch",
        )


def run_tcp(
    args: argparse.Namespace,
    batches: list[list[Item]],
    population: list[str],
    window: int,
    hops: int,
    n_single: int,
    logs: str,
) -> None:
    tcp = SystemConfig(base="multiprocTCPBase")
    # -- multiprocTCPBase --------------------------------------------------------------
    with running_system(tcp, log_dir=logs) as asys:
        bare_tcp = bare_blast(asys, batches)
        bare_tcp_pp = bare_pingpong(asys, hops)
    with engine(tcp, population, shards=args.tcp_shards, logs=logs) as eng:
        batched = eng.run_orders(batches, window)
        tcp_hop = eng.hop(hops)
    singles = make_orders(population, n_single, args.seed + 1)
    with engine(tcp, population, shards=args.tcp_shards, logs=logs) as eng:
        unbatched = eng.run_orders(chunks(singles, 1), window)
    compared(
        "actors.tcp.orders_per_s",
        orders_per_s(batched),
        "orders/s",
        bare_tcp,
        detail={**batched, "account_shards": args.tcp_shards},
        note=f"journal fsync=batch; ceiling: bare blast of {len(batches)} messages "
        f"of {args.batch} items to one sink",
    )
    emit(
        "actors.tcp.unbatched.orders_per_s",
        orders_per_s(unbatched),
        "orders/s",
        detail={**unbatched, "account_shards": args.tcp_shards},
    )
    emit(
        "actors.tcp.batching_lift",
        orders_per_s(batched) / orders_per_s(unbatched),
        "x",
        target=20,
        note=f"{args.batch} orders per send vs 1 order per send",
    )
    compared(
        "actors.tcp.hop_median",
        tcp_hop,
        "us",
        bare_tcp_pp,
        note="AccountQuery to one account host and its Reply vs bare ask ping-pong; "
        "latency: lower is better, ratio = ours / bare",
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
