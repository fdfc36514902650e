"""``emporion simulate``: many traders over real sockets, faults, invariants, a report.

The run, in phases:

1. **Boot** — the embedded engine (simpleSystemBase, a journal in the data
   directory) and the gateway on 127.0.0.1; or, with ``--base
   multiprocTCPBase``, the engine booted as its own processes
   (:class:`MultiprocExchange`) and the gateway here attached to it; or attach
   to a running gateway with ``--url``. Each agent gets a user (``sim0001``…)
   funded with the scenario's deposit.
2. **Connect** — every agent opens its own WebSocket connection (at most 64
   handshakes at a time) and subscribes to the tickers of its symbols; a
   monitor connection subscribes to every book and trades channel.
3. **Trade** — agents place, cancel and drop connections at their rates
   (:mod:`simulations.agents`) until ``--seconds`` pass or the ``--orders``
   budget is spent; the fault schedule runs alongside.
4. **Settle** — agents stop placing, requests in flight finish, and the run
   waits until no private event arrived for half a second (bounded: 15 s).
5. **Check** — each agent queries its account, positions and open orders and
   waits until it has handled its final resume's replay; the monitor
   re-subscribes each book for a final snapshot; the invariant checkers
   (:mod:`simulations.invariants`) run over the whole history.
6. **Report** — report.json, report.md and PNG charts (:mod:`simulations.report`),
   with the load each process was under (:mod:`simulations.load`).

With ``--processes P`` (P ≥ 1) the agents run in P child processes (spawned,
each its own trio loop) so the load generator uses the other core; the engine
and gateway stay in this process. ``--processes 0`` (the default) keeps the
agents in this process.

Faults (the scenario's ``[[faults]]``) in the embedded deployment:
``kill_book`` / ``kill_account`` / ``kill_router`` stop that actor at once —
no flush, in-memory state discarded — and the Exchange re-creates it from the
journal; ``raise`` makes the next handler of a book (or account) raise after
applying (Thespian retries it; the transaction must not apply twice);
``kill_session`` aborts one user's connection at the gateway, discarding its
session state (sessions live in the gateway's session table, one core per
connection, not in a Thespian actor: see docs/architecture.md);
``restart_engine`` stops the gateway and the whole engine and boots both again
on the same data directory and port; ``drop_client``, ``delay_frames`` and
``duplicate_frames`` act in the agent's own client. Under ``--base
multiprocTCPBase`` the kills are real ``kill -9``s of the host's process, and
``restart_engine`` ``kill -9``s every process of the engine before it boots
it again (see :class:`MultiprocExchange`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import trio
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from actors.exchange import ExchangeStatus, ExchangeStatusQuery
from actors.host import EngineConfig, HostFault, account_host_id
from actors.messages import AccountDeposit, Dest
from actors.runtime import (
    RuntimeActorIdentity,
    RuntimeWhoAreYou,
    free_port,
    process_session,
    session_pids,
)
from gateway.bridge import BridgeOptions, EngineBridge
from gateway.client import ClientError, MarketUpdate, open_client
from gateway.server import Gateway, GatewayConfig
from protocol import CASH_STEP, Instrument, RemoteProtocolError, parse_instruments
from simulations.agents import Control, Pauses, SimAgent, deposit_units, market_record
from simulations.history import (
    AgentLog,
    BookFinal,
    FaultRecord,
    History,
    UserFinal,
)
from simulations.live import LiveMarketCheck
from simulations.load import LoadProbe, MachineProbe, ProcessLoad, assess
from simulations.scenario import CLIENT_FAULTS, FaultSpec, Scenario, ScenarioError

log = logging.getLogger(__name__)

CONNECT_CONCURRENCY = 64
SETTLE_QUIET_S = 0.5
SETTLE_MAX_S = 15.0
#: The phases of an agent before it stopped trading (see AgentGroup._give_up_on).
_BEFORE_THE_SETTLE = frozenset({"connecting", "waiting for go", "trading"})
#: The longest the agents may take, once told to stop, to stop trading; and then,
#: after the settle, to make their final queries and take their final replay. An
#: agent still at it is reported stuck (with the phase) and the run goes on to its
#: checks and fails: a run must end, whatever an agent waits for.
FINISH_MAX_S = 60.0
MONITOR_USER = "sim-monitor"
#: Without a live view, a status line every this many seconds.
LOG_EVERY_S = 5.0
#: ``--base multiprocTCPBase``: the longest an ``emporion boot`` or ``shutdown`` may take.
BOOT_TIMEOUT_S = 180.0


@attrs.frozen(kw_only=True)
class SimOptions:
    scenario: Scenario
    url: str | None = None  # attach to a running gateway instead of booting one
    password: str = "sim"  # the agents' password (``--url``: the demo users' "demo")
    user_prefix: str = "sim"
    report_dir: Path | None = None
    processes: int = 0
    data_dir: Path | None = None  # None: a fresh temporary directory
    record: Path | None = None
    fsync: str = "batch"
    live: bool = True
    instruments_path: str | None = None
    #: The engine's deployment: embedded (simpleSystemBase, in this process) or its own
    #: processes (multiprocTCPBase, booted and killed for real: MultiprocExchange).
    base: str = "simpleSystemBase"
    account_shards: int = 2  # multiprocTCPBase: account shard hosts (processes)


@attrs.define
class SimResult:
    history: History
    checks: list[Any]
    report: dict[str, Any]
    files: Any = None

    @property
    def stuck(self) -> dict[str, str]:
        """The agents the run gave up on (user → the phase they were stuck in)."""
        return dict(self.report.get("stuck_agents") or {})

    @property
    def passed(self) -> bool:
        """Every check passed and no agent was given up on (report.json's ``passed``)."""
        return all(c.passed for c in self.checks) and not self.stuck

    def verdict(self) -> str:
        """One line for the console: passed, or what failed."""
        if self.passed:
            return "[green]all invariants passed[/]"
        failed = [c.name for c in self.checks if not c.passed]
        parts = [f"[red]invariant failures[/]: {', '.join(failed)}"] if failed else []
        if self.stuck:
            parts.append(f"[red]{len(self.stuck)} agent(s) stuck[/]: " + ", ".join(
                f"{user} ({phase})" for user, phase in sorted(self.stuck.items())))
        return "; ".join(parts)


def agent_users(options: SimOptions) -> list[str]:
    n = options.scenario.agents
    if options.url is not None and options.user_prefix == "demo":
        return [f"demo{i}" for i in range(1, n + 1)]
    return [f"{options.user_prefix}{i:04d}" for i in range(1, n + 1)]


def fault_target(scenario: Scenario, index: int, spec: FaultSpec, users: list[str]) -> str:
    """The concrete target of a fault: ``any`` becomes an agent chosen from the seed."""
    if spec.target not in (None, "any"):
        return str(spec.target)
    if spec.kind in ("kill_book", "raise"):
        rng = random.Random(scenario.seed * 7919 + index)
        return rng.choice(scenario.symbols)
    if spec.kind in ("kill_router", "restart_engine"):
        return spec.kind.split("_", 1)[1]
    rng = random.Random(scenario.seed * 7919 + index)
    return users[rng.randrange(len(users))]


# -- the embedded exchange -----------------------------------------------------------------


async def _abort_quietly(stream: Any) -> None:
    with contextlib.suppress(Exception):
        await stream.aclose()


async def call_on_bridge(bridge: EngineBridge, fn: Callable[[Any], Any],
                         timeout: float = 30.0) -> Any:
    """Run ``fn(link)`` on the bridge thread and return its result (or raise its error)."""
    done = threading.Event()
    box: list[tuple[bool, Any]] = []

    def run(link: Any) -> None:
        try:
            box.append((True, fn(link)))
        except BaseException as exc:  # handed back to the caller
            box.append((False, exc))
        finally:
            done.set()

    bridge.call(run)
    with trio.fail_after(timeout):
        await trio.to_thread.run_sync(done.wait, abandon_on_cancel=True)
    ok, value = box[0]
    if not ok:
        raise value
    return value


#: What the run's gateways count and the report shows: gaps in users' live events
#: the gateway had the router fill, and fresh snapshots sent to a book's subscribers
#: after its host was re-created.
GATEWAY_COUNTERS = ("gap_repairs", "book_refreshes")


class EmbeddedExchange:
    """The engine and gateway of a simulation, restartable on the same data dir."""

    def __init__(self, instruments: Mapping[str, Instrument], instruments_toml: str,
                 data_dir: Path, *, fsync: str, record: Path | None) -> None:
        self.instruments = dict(instruments)
        self.toml = instruments_toml
        self.data_dir = data_dir
        self.fsync = fsync
        self.record = record
        self.port = 0
        self.gw: Gateway | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self.restarts = 0
        #: Host restarts (kills recovered) of the engines stopped by restart().
        self.past_host_restarts: dict[str, int] = {}
        #: The counters (:data:`GATEWAY_COUNTERS`) of the gateways stopped by restart().
        self.past_counts = dict.fromkeys(GATEWAY_COUNTERS, 0)

    def _bridge(self) -> EngineBridge:
        engine = EngineConfig(instruments_toml=self.toml, data_dir=str(self.data_dir),
                              fsync=self.fsync)
        extra: dict[str, Any] = {}
        if self.record is not None:
            name = self.record if self.restarts == 0 else self.record.with_name(
                f"{self.record.stem}.{self.restarts}{self.record.suffix}")
            extra["record"] = str(name)
        return EngineBridge(BridgeOptions(engine=engine, **extra))

    async def start(self, nursery: trio.Nursery) -> str:
        self.gw = Gateway(self._bridge(), self.instruments, lambda user, password: True,
                          GatewayConfig(host="127.0.0.1", port=self.port))
        self._stopped = trio.Event()
        self.port = await nursery.start(self._serve, self.gw)
        return f"ws://127.0.0.1:{self.port}/v1"

    async def _serve(self, gw: Gateway, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    port = await nursery.start(gw.serve)
                    task_status.started(port)
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            await self._stopped.wait()
            self._scope = None
            if self.gw is not None:
                for name in GATEWAY_COUNTERS:
                    self.past_counts[name] += getattr(self.gw, name)
                    setattr(self.gw, name, 0)

    def gateway_counts(self) -> dict[str, int]:
        """The run's totals of the gateways' :data:`GATEWAY_COUNTERS`."""
        return {name: n + (getattr(self.gw, name) if self.gw is not None else 0)
                for name, n in self.past_counts.items()}

    async def restart(self, nursery: trio.Nursery) -> None:
        for hid, n in (await self.host_restarts()).items():
            self.past_host_restarts[hid] = self.past_host_restarts.get(hid, 0) + n
        await self.stop()
        self.restarts += 1
        await self.start(nursery)

    @property
    def bridge(self) -> EngineBridge:
        assert self.gw is not None
        return self.gw.bridge

    async def fund(self, users: list[str], amount: int) -> None:
        # A typed bridge call: a recording (--record) keeps it as data for the replay.
        opened = await self.bridge.open_accounts_waiting(*users)
        with trio.fail_after(120):
            await trio.to_thread.run_sync(opened.wait, abandon_on_cancel=True)
        for user in users:
            await self.bridge.submit_waiting(Dest("account", user), AccountDeposit(
                reply_to=None, user=user, amount=amount, ts=time.time_ns()))

    async def host_fault(self, kind: str, target: str, mode: str) -> str:
        """Tell a host to die (``exit``) or raise once; returns the host id."""
        def do(link: Any) -> str:
            hid = _host_of(link, kind, target)
            link.asys.tell(link.directory.hosts[hid], HostFault(mode=mode))
            return hid

        return str(await call_on_bridge(self.bridge, do))

    async def kill_host(self, kind: str, target: str) -> str:
        """Kill the host of a book, an account or the router; returns what happened.

        Embedded, the host stops at once without a flush and its memory is dropped
        (the Exchange re-creates it from the journal)."""
        hid = await self.host_fault(kind, target, "exit")
        return f"host {hid} stopped without a flush"

    def kill_session(self, user: str) -> int:
        """Abort every connection of ``user`` at the gateway, session state and all."""
        assert self.gw is not None
        killed = 0
        for conn in list(self.gw.conns.values()):
            if conn.proto.user == user and not conn.closed:
                # No close handshake: the transport under the WebSocket goes away.
                # (A system task must not raise: that would end the whole trio run.)
                trio.lowlevel.spawn_system_task(_abort_quietly, conn.ws._stream)
                killed += 1
        return killed

    async def host_restarts(self) -> dict[str, int]:
        def ask(link: Any) -> dict[str, int]:
            got = link.asys.ask(link.exchange, ExchangeStatusQuery(), 10)
            while got is not None and not isinstance(got, ExchangeStatus):
                link._keep(got)
                got = link.asys.listen(10)
            if got is None:
                return {}
            return {hid: restarts for hid, _kind, restarts in got.hosts}

        try:
            return dict(await call_on_bridge(self.bridge, ask))
        except Exception:  # a report figure, never a reason to fail the run
            log.exception("exchange status")
            return {}


def _host_of(link: Any, kind: str, target: str) -> str:
    """The id of the host of a book (``target`` its symbol), an account (a user) or
    the router, from the link's refreshed directory."""
    link.refresh()
    d = link.directory
    if kind == "book":
        return str(d.books[target])
    if kind == "router":
        return str(d.router)
    hid = account_host_id(d, target)
    if hid is None:
        raise KeyError(f"no account host for {target}")
    return str(hid)


class MultiprocExchange(EmbeddedExchange):
    """The engine as its own processes (``emporion boot``, multiprocTCPBase) on the data
    directory, and the gateway in this process attached to it.

    Faults are real: a host kill is a ``kill -9`` of the host's process, and an engine
    restart ``kill -9``s every process of the engine (its session: the admin, the
    Exchange and every host) and boots it again on the same data directory, on a new
    admin port. Only processes this exchange booted are signalled, by pid.
    """

    def __init__(self, instruments: Mapping[str, Instrument], instruments_toml: str,
                 data_dir: Path, *, fsync: str, account_shards: int) -> None:
        super().__init__(instruments, instruments_toml, data_dir, fsync=fsync, record=None)
        self.account_shards = account_shards
        self.admin_port = 0
        self._session: int | None = None

    def _bridge(self) -> EngineBridge:
        return EngineBridge(BridgeOptions(base="multiprocTCPBase", admin_port=self.admin_port))

    async def start(self, nursery: trio.Nursery) -> str:
        await trio.to_thread.run_sync(self._boot)
        return await super().start(nursery)

    def _boot(self) -> None:
        instruments = self.data_dir / "instruments.toml"
        instruments.write_text(self.toml, encoding="utf-8")
        self.admin_port = free_port()
        # A child process: booting forks the actor system's admin, which must not
        # happen in this process (its trio and bridge threads would be copied).
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "boot", "--admin-port", str(self.admin_port),
             "--data-dir", str(self.data_dir), "--instruments", str(instruments),
             "--fsync", self.fsync, "--account-shards", str(self.account_shards), "--json"],
            capture_output=True, text=True, timeout=BOOT_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"emporion boot failed ({done.returncode}): "
                               f"{done.stderr.strip() or done.stdout.strip()}")
        report = json.loads(done.stdout[done.stdout.index("{"):])  # boot --json's report
        self._session = report.get("session")

    async def stop(self) -> None:
        await super().stop()  # the gateway and its bridge
        await trio.to_thread.run_sync(self._shutdown)

    def _shutdown(self) -> None:
        subprocess.run([sys.executable, "-m", "gateway.cli", "shutdown", "--data-dir",
                        str(self.data_dir)], capture_output=True, timeout=BOOT_TIMEOUT_S)
        self._kill_session()  # anything the shutdown left behind

    def engine_pids(self) -> list[int]:
        """The processes of the engine this exchange booted (admin, Exchange, hosts)."""
        if self._session is None:
            return []
        return [p for p in session_pids(self._session) if p != os.getpid()]

    def _kill_session(self) -> list[int]:
        """``kill -9`` every process of the engine this exchange booted; wait until gone."""
        pids = self.engine_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (any(process_session(p) is not None for p in pids)
               and time.monotonic() < deadline):
            time.sleep(0.02)  # a killed process's exit, which no event announces
        return pids

    async def restart(self, nursery: trio.Nursery) -> None:
        """A crash of the whole engine, then a boot on the same data directory."""
        for hid, n in (await self.host_restarts()).items():
            self.past_host_restarts[hid] = self.past_host_restarts.get(hid, 0) + n
        await EmbeddedExchange.stop(self)  # the gateway only: the engine crashes below
        await trio.to_thread.run_sync(self._kill_session)
        self.restarts += 1
        await self.start(nursery)

    async def kill_host(self, kind: str, target: str) -> str:
        def do(link: Any) -> tuple[str, int]:
            hid = _host_of(link, kind, target)
            ident = link.asys.ask(link.directory.hosts[hid], RuntimeWhoAreYou(), 10)
            while ident is not None and not isinstance(ident, RuntimeActorIdentity):
                link._keep(ident)
                ident = link.asys.listen(10)
            if ident is None:
                raise RuntimeError(f"host {hid} did not say who it is")
            if ident.pid in (os.getpid(), None):
                raise RuntimeError(f"host {hid} is not a process of its own")
            os.kill(ident.pid, signal.SIGKILL)
            return hid, int(ident.pid)

        hid, pid = await call_on_bridge(self.bridge, do)
        return f"host {hid}: its process {pid} killed with SIGKILL"


# -- one group of agents (this process or a child) -----------------------------------------


@attrs.frozen(kw_only=True)
class GroupSpec:
    url: str
    password: str
    scenario: Scenario
    instruments: dict[str, Instrument]
    users: tuple[str, ...]  # every agent of the run, in agent order
    indices: tuple[int, ...]  # the agents this group runs
    budget: int | None
    name: str = "agents"  # the process's name in the report's load section


@attrs.define
class GroupResult:
    logs: list[AgentLog]
    faults: list[FaultRecord]
    finals: dict[str, UserFinal]
    settled: bool
    errors: list[str]
    load: ProcessLoad | None = None  # the agent process's own (None: the harness's process)


class AgentGroup:
    """Connects, runs, settles and queries a set of agents; the phases are events so
    the harness (or the parent process) can drive them."""

    def __init__(self, spec: GroupSpec, control: Control) -> None:
        self.spec = spec
        self.control = control
        sc = spec.scenario
        roles = sc.roles()
        self.agents: list[SimAgent] = []
        self.pauses = Pauses()
        for i in spec.indices:
            role = roles[i]
            agent_log = AgentLog(user=spec.users[i], role=role,
                                 deposit=deposit_units(sc.deposit))
            self.agents.append(SimAgent(agent_log, spec.instruments, sc.symbols,
                                        seed=sc.seed * 1_000_003 + i,
                                        rate=sc.rates.get(role, 1.0), control=control,
                                        pause=self.pauses.sleep))
        if sc.feed() == "shared" and self.agents:
            # One feed, one set of prices: the agents share the maps the feed updates,
            # so a ticker costs one update rather than one per agent (a loop over 1,000
            # agents per ticker was ~4 % of a 1,000-agent process, py-spy).
            mid, trail = self.agents[0].mid, self.agents[0].last_trades
            for agent in self.agents[1:]:
                agent.mid, agent.last_trades = mid, trail
        self.connected = trio.Event()
        self.go = trio.Event()
        self.traded = trio.Event()
        self.finished = trio.Event()
        self.release = trio.Event()
        self.finals_ready = trio.Event()
        self.go_ns = 0
        self._go_time = 0.0
        self.errors: list[str] = []
        self.finals: dict[str, UserFinal] = {}
        self.settled = False
        self._n_connected = 0
        self._n_traded = 0
        self._n_finished = 0

    async def run(self) -> GroupResult:
        limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.pauses.run)
            if self.spec.scenario.feed() == "shared" and self.agents:
                await nursery.start(self._feed)
            for agent in self.agents:
                nursery.start_soon(self._agent, agent, limiter)
            nursery.start_soon(self._client_faults)
            if not self.agents:
                self.connected.set()
            await self.go.wait()
            if not self.agents:
                self.traded.set()
            await self.control.stop.wait()
            with trio.move_on_after(FINISH_MAX_S):
                await self.traded.wait()
            self._give_up_on("trading", self.traded, _BEFORE_THE_SETTLE)
            self.settled = await settle(self.agents)
            self.finals_ready.set()
            if self.agents:
                with trio.move_on_after(SETTLE_MAX_S + FINISH_MAX_S):
                    await self.finished.wait()
                self._give_up_on("finishing", self.finished, None)
            self.release.set()
            nursery.cancel_scope.cancel()  # the shared feed, and the clients' connections
        return GroupResult(logs=[a.log for a in self.agents],
                           faults=[f for a in self.agents for f in a.faults],
                           finals=self.finals, settled=self.settled, errors=self.errors)

    def _give_up_on(self, what: str, done: trio.Event, phases: frozenset[str] | None) -> None:
        """``done`` did not come in time: record every agent still short of it (in one
        of ``phases``; None: not done) as stuck, in the phase it was in, and go on
        without them."""
        if done.is_set():
            return
        for agent in self.agents:
            short = agent.phase != "done" if phases is None else agent.phase in phases
            if short and agent.log.stuck is None:
                agent.log.stuck = f"{agent.phase} (the group gave up {what})"
                self.errors.append(f"{agent.log.user}: stuck in {agent.phase}")
        done.set()

    async def _feed(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The shared market-data connection of this group (``market_data = "shared"``):
        it takes the tickers once and hands each price to every agent. It logs in as
        the group's first agent (a second session of that user) and its frames go into
        that agent's market log, the only ticker subscription there."""
        spec = self.spec
        first = self.agents[0]
        async with open_client(spec.url, first.log.user, spec.password, retries=8,
                               event_buffer=100_000) as feed:
            await feed.subscribe([f"ticker.{s}" for s in spec.scenario.symbols])
            task_status.started()
            async for ev in feed.events():
                if isinstance(ev, MarketUpdate):
                    first.log.market.append(market_record(ev))
                    if ev.kind == "ticker":
                        symbol = ev.channel.split(".", 1)[1]
                        last = ev.data.get("last")
                        inst = first.instruments.get(symbol)
                        if last is None or inst is None:
                            continue
                        # Once for every agent: they share the first one's price maps.
                        first.on_ticks(symbol, inst.price_to_ticks(last))

    async def _agent(self, agent: SimAgent, limiter: trio.CapacityLimiter) -> None:
        spec = self.spec
        user = agent.log.user
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with limiter:
                    client = await stack.enter_async_context(
                        open_client(spec.url, user, spec.password, retries=8, resume_from=0))
                    if spec.scenario.feed() == "agent":
                        await client.subscribe([f"ticker.{s}" for s in spec.scenario.symbols])
                self._n_connected += 1
                if self._n_connected == len(self.agents):
                    self.connected.set()
                agent.phase = "waiting for go"
                await self.go.wait()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(agent.run, client)
                    try:
                        agent.phase = "trading"
                        await agent.trade(client)
                    finally:
                        agent.log.reconnects = client.reconnects
                        self._n_traded += 1
                        if self._n_traded == len(self.agents):
                            self.traded.set()
                    agent.phase = "waiting for the settle"
                    await self.finals_ready.wait()
                    try:
                        agent.phase = "final queries"
                        final = self.finals[user] = await query_final(client,
                                                                      spec.instruments)
                    except (ClientError, RemoteProtocolError, KeyError, ValueError) as exc:
                        self.errors.append(f"{user}: final query failed: {exc}")
                    else:
                        if final.last_seq is not None:
                            agent.phase = "final replay"
                            await _handled_up_to(agent, client, final.last_seq)
                    agent.log.skipped = set(client.skipped)
                    agent.log.duplicates_dropped = client.duplicates_dropped
                    agent.log.reconnects = client.reconnects
                    agent.log.gap_resumes = client.gap_resumes
                    agent.log.dead_connections = client.dead_connections
                    agent.phase = "done"
                    self._n_finished += 1
                    if self._n_finished == len(self.agents):
                        self.finished.set()
                    await self.release.wait()
                    nursery.cancel_scope.cancel()
        except (ClientError, OSError) as exc:
            self.errors.append(f"{user}: {exc}")
            for counter, event in (("_n_connected", self.connected),
                                   ("_n_traded", self.traded),
                                   ("_n_finished", self.finished)):
                if not event.is_set():
                    setattr(self, counter, getattr(self, counter) + 1)
                    if getattr(self, counter) == len(self.agents):
                        event.set()

    async def _client_faults(self) -> None:
        sc = self.spec.scenario
        mine = {a.log.user: a for a in self.agents}
        plan = []
        for i, spec in enumerate(sc.faults):
            if spec.kind in CLIENT_FAULTS:
                target = fault_target(sc, i, spec, list(self.spec.users))
                if target in mine:
                    plan.append((spec, mine[target]))
        if not plan:
            return
        await self.go.wait()
        for spec, agent in plan:
            await trio.sleep_until(self._go_time + spec.at)
            if self.control.stop.is_set():
                return
            if spec.kind == "drop_client":
                with contextlib.suppress(Exception):
                    await agent.drop()
            elif spec.kind == "delay_frames":
                agent.delay_frames()
            elif spec.kind == "duplicate_frames":
                agent.duplicate_next()

    def start(self) -> None:
        self._go_time = trio.current_time()
        self.go_ns = time.monotonic_ns()
        self.go.set()


async def _handled_up_to(agent: SimAgent, client: Any, seq: int) -> None:
    """Wait (at most :data:`SETTLE_MAX_S`) until ``agent`` has handled every private
    event up to ``seq``, or the client was told they were skipped: the final resume's
    replay comes in frames after its answer, and an agent released before they are
    handled would look as if it never got them."""
    with trio.move_on_after(SETTLE_MAX_S):
        while True:
            seen = agent.log.private[-1].seq if agent.log.private else 0
            if all(s in client.skipped for s in range(seen + 1, seq + 1)):
                return
            await trio.sleep(0.01)  # the agent's hand-out signals nothing; bounded above


async def settle(agents: list[SimAgent]) -> bool:
    """Wait until requests in flight are answered and no private event arrived for
    ``SETTLE_QUIET_S``; False when that did not happen within ``SETTLE_MAX_S``.

    The engine has no "all quiet" signal a client can see, so this is a bounded
    quiet-period poll: the last fills of the run reach their owners within
    milliseconds, well inside the quiet period.
    """
    start = time.monotonic()
    last = -1
    quiet_since = start
    while True:
        now = time.monotonic()
        total = sum(len(a.log.private) for a in agents)
        if total != last or any(a.inflight for a in agents):
            last, quiet_since = total, now
        elif now - quiet_since >= SETTLE_QUIET_S:
            return True
        if now - start > SETTLE_MAX_S:
            return False
        await trio.sleep(0.05)  # poll period of the quiet-period check


async def query_final(client: Any, instruments: Mapping[str, Instrument]) -> UserFinal:
    account = await client.query("account")
    positions = (await client.query("positions")).get("positions", [])
    orders = (await client.query("orders")).get("orders", [])
    acc = {k: _cash(v) for k, v in account.items() if isinstance(v, str) and k != "risk_ratio"}
    pos: dict[str, int] = {}
    for p in positions:
        inst = instruments.get(p["symbol"])
        if inst is not None:
            pos[p["symbol"]] = (inst.qty_to_lots(p["long_qty"], zero_ok=True)
                                - inst.qty_to_lots(p["short_qty"], zero_ok=True))
    # A final resume: its to_seq is the engine's last seq for the user (and any event
    # still missing comes with it, through the client's gap-free hand-out).
    last = await client.request("resume", after_seq=client.last_seq)
    return UserFinal(user=client.user, account=acc, positions=pos,
                     open_orders={int(o["order_id"]): o for o in orders},
                     last_seq=int(last["to_seq"]))


def _cash(text: str) -> int:
    """A signed wire cash string → minor units (PnL may be negative)."""
    units = Decimal(text) / CASH_STEP
    if units != units.to_integral_value():
        raise ValueError(f"cash {text!r} is off the {CASH_STEP} grid")
    return int(units)


# -- child processes -------------------------------------------------------------------------


def _child_main(spec_path: str, result_path: str, shared_acked: Any, ready: Any, go: Any,
                stop: Any, done: Any) -> None:
    """A client process: run one group of agents, phases driven by the parent."""
    logging.basicConfig(level=logging.WARNING)
    spec: GroupSpec = pickle.loads(Path(spec_path).read_bytes())

    async def main() -> GroupResult:
        control = Control(budget=spec.budget, shared_acked=shared_acked)
        group = AgentGroup(spec, control)
        probe = LoadProbe(spec.name, len(spec.indices))
        async with trio.open_nursery() as nursery:
            box: list[GroupResult] = []

            async def run() -> None:
                box.append(await group.run())

            nursery.start_soon(run)
            nursery.start_soon(probe.run)
            await group.connected.wait()
            ready.set()
            await trio.to_thread.run_sync(go.wait, abandon_on_cancel=True)
            group.start()
            probe.start()

            async def watch_stop() -> None:
                await trio.to_thread.run_sync(stop.wait, abandon_on_cancel=True)
                control.stop.set()

            nursery.start_soon(watch_stop)
            await control.stop.wait()
            load = probe.stop()  # also ends the probe's task
        box[0].load = load
        return box[0]

    result = trio.run(main)
    Path(result_path).write_bytes(pickle.dumps(result))
    done.set()


# -- the run ---------------------------------------------------------------------------------


async def simulate(options: SimOptions, console: Console | None = None) -> SimResult:
    """Run one simulation; see the module docstring for the phases."""
    from gateway.cli import instruments_toml
    from simulations.invariants import check_all
    from simulations.report import build_report, write_report

    console = console or Console()
    sc = options.scenario
    toml_text = instruments_toml(options.instruments_path)
    instruments = parse_instruments(toml_text)
    unknown = [s for s in sc.symbols if s not in instruments]
    if unknown:
        raise ScenarioError(f"scenario {sc.name}: unknown symbol(s) {unknown}; "
                            f"instruments: {', '.join(instruments)}")
    if options.url is not None and any(f.kind not in CLIENT_FAULTS for f in sc.faults):
        raise ScenarioError("engine faults need the embedded engine: drop --url, or use a "
                            "scenario with only drop_client/delay_frames/duplicate_frames")
    users = agent_users(options)
    history = History(seed=sc.seed, scenario=sc.name, started_ns=time.monotonic_ns(),
                      instruments={s: (str(instruments[s].tick), str(instruments[s].lot))
                                   for s in sc.symbols})
    extra: dict[str, Any] = {"processes": options.processes, "market_data": sc.feed(),
                             "base": options.base if options.url is None else None}
    clock_offset = time.time_ns() - time.monotonic_ns()  # wall ↔ monotonic, for the charts
    with contextlib.ExitStack() as stack:
        data_dir = options.data_dir
        if data_dir is None and options.url is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="emporion-sim-")))
        async with trio.open_nursery() as nursery:
            exchange: EmbeddedExchange | None = None
            url = options.url
            if url is None:
                assert data_dir is not None
                data_dir.mkdir(parents=True, exist_ok=True)
                if options.base == "multiprocTCPBase":
                    exchange = MultiprocExchange(instruments, toml_text, data_dir,
                                                 fsync=options.fsync,
                                                 account_shards=options.account_shards)
                    console.print(f"[bold]emporion simulate[/] {sc.name}: booting the engine "
                                  f"(multiprocTCPBase, {options.account_shards} account "
                                  "shards)…")
                else:
                    exchange = EmbeddedExchange(instruments, toml_text, data_dir,
                                                fsync=options.fsync, record=options.record)
            try:
                if exchange is not None:
                    url = await exchange.start(nursery)
                    console.print(f"[bold]emporion simulate[/] {sc.name}: engine "
                                  f"({options.base}) and gateway on {url}, data in {data_dir}")
                    await exchange.fund(users, deposit_units(sc.deposit))
                assert url is not None
                run = _Run(options, sc, instruments, users, url, history, exchange, console)
                await run.go(nursery)
                extra.update(run.extra)
                if exchange is not None:
                    restarts = dict(exchange.past_host_restarts)
                    for hid, n in (await exchange.host_restarts()).items():
                        restarts[hid] = restarts.get(hid, 0) + n
                    extra["host_restarts"] = {h: n for h, n in sorted(restarts.items()) if n}
                    extra["engine_restarts"] = exchange.restarts
                    extra.update(exchange.gateway_counts())
            finally:
                if exchange is not None:
                    # Also when the run failed: a booted engine's processes outlive this one.
                    with trio.CancelScope(shield=True):
                        await exchange.stop()
            nursery.cancel_scope.cancel()
    if history.ended_ns == 0:
        history.ended_ns = time.monotonic_ns()
    checks = check_all(history, instruments)
    report = build_report(history, checks, extra=extra)
    files = None
    if options.report_dir is not None:
        files = write_report(options.report_dir, history, checks, extra=extra,
                             clock_offset_ns=clock_offset)
    return SimResult(history=history, checks=checks, report=report, files=files)


class _Run:
    def __init__(self, options: SimOptions, sc: Scenario, instruments: dict[str, Instrument],
                 users: list[str], url: str, history: History,
                 exchange: EmbeddedExchange | None, console: Console) -> None:
        self.options = options
        self.sc = sc
        self.instruments = instruments
        self.users = users
        self.url = url
        self.history = history
        self.exchange = exchange
        self.console = console
        self.extra: dict[str, Any] = {}
        #: The monitor's market stream checked as it arrives (simulations.live).
        self.live = LiveMarketCheck(instruments)
        self.control = Control(budget=sc.orders)
        self.monitor_ready = trio.Event()
        self.monitor_client: Any = None
        self._shared: list[Any] = []
        p = max(0, options.processes)
        where = "engine + gateway" if exchange is not None else "harness (monitor)"
        #: This process's CPU and event-loop lag over the trading phase.
        self.probe = LoadProbe(where + (" + agents" if p == 0 else ""),
                               len(users) if p == 0 else 0)
        #: The machine's CPU over the trading phase, and the engine's processes' when
        #: it runs in processes of its own.
        self.machine = MachineProbe(exchange.engine_pids
                                    if isinstance(exchange, MultiprocExchange) else None)
        self._machine: dict[str, Any] | None = None

    def acked(self) -> int:
        return self.control.acked + sum(int(v.value) for v in self._shared)

    async def go(self, nursery: trio.Nursery) -> None:
        sc, opts = self.sc, self.options
        nursery.start_soon(self._monitor)
        nursery.start_soon(self.probe.run)
        await self.monitor_ready.wait()
        p = max(0, opts.processes)
        groups = [tuple(range(len(self.users)))] if p == 0 else [
            tuple(range(k, len(self.users), p)) for k in range(p)]
        budgets = [None if sc.orders is None else
                   sc.orders // len(groups) + (1 if k < sc.orders % len(groups) else 0)
                   for k in range(len(groups))]
        specs = [GroupSpec(url=self.url, password=opts.password, scenario=sc,
                           instruments=self.instruments, users=tuple(self.users),
                           indices=g, budget=b, name=f"agents {k}")
                 for k, (g, b) in enumerate(zip(groups, budgets, strict=True))]
        results: list[GroupResult] = []
        if p == 0:
            self.control = Control(budget=specs[0].budget)
            group = AgentGroup(specs[0], self.control)
            async with trio.open_nursery() as inner:
                async def run_group() -> None:
                    results.append(await group.run())

                inner.start_soon(run_group)
                self.console.print(f"connecting {len(self.users)} agents…")
                await group.connected.wait()
                group.start()
                self.probe.start()
                self.machine.start()
                await self._trade_phase(nursery, group.go_ns)
                self.control.stop.set()
        else:
            results = await self._run_processes(specs, nursery)
        await self._finish(results)

    async def _run_processes(self, specs: list[GroupSpec],
                             nursery: trio.Nursery) -> list[GroupResult]:
        ctx = multiprocessing.get_context("spawn")
        ready, go, stop = [ctx.Event() for _ in specs], ctx.Event(), ctx.Event()
        dones = [ctx.Event() for _ in specs]
        tmp = Path(tempfile.mkdtemp(prefix="emporion-sim-procs-"))
        procs = []
        self._shared = [ctx.Value("q", 0, lock=False) for _ in specs]
        for k, spec in enumerate(specs):
            spec_path = tmp / f"spec{k}.pickle"
            spec_path.write_bytes(pickle.dumps(spec))
            proc = ctx.Process(target=_child_main, name=f"emporion-sim-agents-{k}", args=(
                str(spec_path), str(tmp / f"result{k}.pickle"), self._shared[k], ready[k], go,
                stop, dones[k]), daemon=True)
            proc.start()
            procs.append(proc)
        try:
            self.console.print(f"connecting {len(self.users)} agents from {len(specs)} "
                               "client processes…")
            for k, ev in enumerate(ready):
                while not await trio.to_thread.run_sync(ev.wait, 1.0):
                    if not procs[k].is_alive():
                        raise RuntimeError(f"agent process {k} exited with "
                                           f"{procs[k].exitcode} before connecting")
            go.set()
            self.probe.start()
            self.machine.start()
            go_ns = time.monotonic_ns()
            budget_total = self.sc.orders
            self.control = Control(budget=None)
            if budget_total is not None:
                async def budget_watch() -> None:
                    while self.acked() < budget_total and not self.control.stop.is_set():
                        await trio.sleep(0.1)  # progress poll of the child processes
                    self.control.stop.set()
                nursery.start_soon(budget_watch)
            await self._trade_phase(nursery, go_ns)
            stop.set()
            results = []
            for k, proc in enumerate(procs):
                if not await trio.to_thread.run_sync(dones[k].wait, SETTLE_MAX_S + 120):
                    raise RuntimeError(f"agent process {k} did not finish")
                results.append(pickle.loads((tmp / f"result{k}.pickle").read_bytes()))
                await trio.to_thread.run_sync(proc.join, 10)
            return results
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()

    async def _trade_phase(self, nursery: trio.Nursery, go_ns: int) -> None:
        sc = self.sc
        started = trio.current_time()
        self.history.started_ns = go_ns
        async with trio.open_nursery() as phase:
            phase.start_soon(self._engine_faults, started, nursery)
            if sc.seconds is not None:
                phase.cancel_scope.deadline = started + sc.seconds
            await self._view(phase, started)
        self.control.stop.set()
        self.history.ended_ns = time.monotonic_ns()
        self.probe.stop()
        self._machine = self.machine.stop()

    async def _view(self, phase: trio.Nursery, started: float) -> None:
        sc = self.sc
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                            console=self.console, transient=True)
        total = sc.seconds if sc.seconds is not None else float(sc.orders or 1)
        task = progress.add_task(f"{sc.name}: {sc.agents} agents", total=total)

        engine_faults = sum(1 for f in sc.faults if f.kind not in CLIENT_FAULTS)

        def figures() -> dict[str, str]:
            """What the live table and the plain status line show, by column."""
            elapsed = max(1e-9, trio.current_time() - started)
            acked = self.acked()
            gw = self.exchange.gw if self.exchange is not None else None
            return {
                "orders acked": str(acked),
                "orders/s": f"{acked / elapsed:,.0f}",
                "connections": "-" if gw is None else str(len(gw.conns)),
                "trades": "-" if gw is None else str(gw.trades),
                "faults": f"{len(self.history.faults)}/{engine_faults}",
                "live checks": self.live.status(),
                "elapsed": f"{elapsed:.0f}",
            }

        def table() -> Table:
            t = Table(show_header=True, header_style="bold", box=None)
            row = figures()
            del row["elapsed"]
            for col in row:
                t.add_column(col, justify="right")
            t.add_row(*row.values())
            return t

        def line() -> str:  # the same figures as one plain line, for logs
            f = figures()
            return (f"{sc.name}: {f['elapsed']} s, {f['orders acked']} orders acked "
                    f"({f['orders/s']}/s), {f['connections']} connections, "
                    f"{f['trades']} trades, faults {f['faults']}, "
                    f"live checks {f['live checks']}")

        def finished() -> bool:
            if sc.seconds is None and sc.orders is not None and self.acked() >= sc.orders:
                self.control.stop.set()
            if self.control.stop.is_set():
                phase.cancel_scope.cancel()
                return True
            return False

        if not self.options.live:
            # No terminal (or --no-live): a status line every LOG_EVERY_S seconds, which
            # a log keeps, instead of a live view that a log cannot redraw.
            next_line = started + LOG_EVERY_S
            while not finished():
                if trio.current_time() >= next_line:
                    self.console.print(line(), highlight=False, soft_wrap=True)
                    next_line += LOG_EVERY_S
                await trio.sleep(0.25)  # the check's period
            return
        with Live(Group(progress, table()), console=self.console, refresh_per_second=4,
                  transient=False) as live:
            while not finished():
                done = (trio.current_time() - started if sc.seconds is not None
                        else float(self.acked()))
                progress.update(task, completed=min(total, done))
                live.update(Group(progress, table()))
                await trio.sleep(0.25)  # the view's refresh period

    async def _engine_faults(self, started: float, nursery: trio.Nursery) -> None:
        ex = self.exchange
        if ex is None:
            return
        for i, spec in enumerate(self.sc.faults):
            if spec.kind in CLIENT_FAULTS:
                continue
            await trio.sleep_until(started + spec.at)
            target = fault_target(self.sc, i, spec, self.users)
            rec = FaultRecord(at_ns=time.monotonic_ns(), kind=spec.kind, target=target)
            try:
                if spec.kind in ("kill_book", "kill_account", "kill_router"):
                    rec.detail = await ex.kill_host(spec.kind.removeprefix("kill_"), target)
                elif spec.kind == "raise":
                    kind = "book" if target in self.instruments else "account"
                    hid = await ex.host_fault(kind, target, "raise_once")
                    rec.detail = f"the next handler of {hid} raises after applying"
                elif spec.kind == "kill_session":
                    n = ex.kill_session(target)
                    rec.detail = f"{n} connection(s) of {target} aborted at the gateway"
                    rec.ok = n > 0
                elif spec.kind == "restart_engine":
                    t0 = time.monotonic()
                    await ex.restart(nursery)
                    rec.detail = (f"gateway and engine stopped and booted again on "
                                  f"{ex.data_dir} in {time.monotonic() - t0:.2f} s")
            except Exception as exc:
                rec.ok = False
                rec.detail = f"{type(exc).__name__}: {exc}"
            self.history.faults.append(rec)

    async def _monitor(self) -> None:
        user = MONITOR_USER if self.exchange is not None else self.users[0]
        channels = [f"{k}.{s}" for s in self.sc.symbols for k in ("book", "trades", "ticker")]
        async with open_client(self.url, user, self.options.password, retries=8,
                               event_buffer=1_000_000) as c:
            self.monitor_client = c
            await c.subscribe(channels)
            self.monitor_ready.set()
            async for ev in c.events():
                if isinstance(ev, MarketUpdate):
                    rec = market_record(ev)
                    self.history.monitor.append(rec)
                    self.live.feed(rec)

    async def _finish(self, results: list[GroupResult]) -> None:
        errors: list[str] = []
        settled = True
        for r in results:
            for agent_log in r.logs:
                self.history.agents[agent_log.user] = agent_log
            self.history.faults.extend(r.faults)
            self.history.final.users.update(r.finals)
            errors += r.errors
            settled &= r.settled
        self.history.faults.sort(key=lambda f: f.at_ns)
        # Final books: a fresh snapshot of each (a new subscription epoch).
        books = await self._final_books()
        self.history.final.books.update(books)
        acks = sorted(o.acked_ns for a in self.history.agents.values()
                      for o in a.orders.values() if o.acked_ns is not None)
        self.history.progress = _progress(self.history.started_ns, acks)
        self.extra["live_checks"] = self.live.to_json()
        self.extra["load"] = self._load(results)
        self.extra.update({"settled": settled, "agent_errors": errors[:20],
                           "agent_error_count": len(errors)})

    def _load(self, results: list[GroupResult]) -> dict[str, Any]:
        """The report's ``load`` section (simulations.load): this process and every
        agent process, the agents' nominal and achieved request rates, a verdict."""
        processes = [self.probe.stop()] + [r.load for r in results if r.load is not None]
        span = (self.history.ended_ns - self.history.started_ns) / 1e9
        sent = sum(len(a.orders) + a.cancels for a in self.history.agents.values())
        rates = self.sc.rates
        nominal = sum(rates.get(role, 1.0) for role in self.sc.roles())
        return assess(processes, nominal_per_s=nominal,
                      requests_per_s=sent / span if span > 0 else 0.0, machine=self._machine)

    async def _final_books(self) -> dict[str, BookFinal]:
        c = self.monitor_client
        if c is None:
            return {}
        out: dict[str, BookFinal] = {}
        mark = len(self.history.monitor)
        chans = [f"book.{s}" for s in self.sc.symbols]
        await c.unsubscribe(chans)
        await c.subscribe(chans)
        with trio.move_on_after(10):
            while len(out) < len(chans):
                for rec in self.history.monitor[mark:]:
                    if rec.kind == "snapshot" and rec.channel in chans:
                        sym = rec.channel.split(".", 1)[1]
                        inst = self.instruments[sym]
                        out[sym] = BookFinal(symbol=sym, bids=[
                            (inst.price_to_ticks(p), inst.qty_to_lots(q))
                            for p, q in rec.data["bids"]], asks=[
                            (inst.price_to_ticks(p), inst.qty_to_lots(q))
                            for p, q in rec.data["asks"]])
                await trio.sleep(0.05)  # poll the monitor's log for the snapshots
        return out


def _progress(start_ns: int, acks: list[int], step_ns: int = 250_000_000) -> list[tuple[int, int]]:
    if not acks:
        return []
    out = []
    t = start_ns
    i = 0
    while t <= acks[-1] + step_ns:
        while i < len(acks) and acks[i] <= t:
            i += 1
        out.append((t, i))
        t += step_ns
    return out


@contextlib.contextmanager
def _logging_to(path: Path) -> Any:
    """Send log records to ``path`` for the run: injected faults make the engine log
    tracebacks on purpose, which belong in a file, not over the live view."""
    root = logging.getLogger()
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = root.handlers[:], root.level
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers, level = saved
        root.setLevel(level)
        handler.close()


def run_simulation(options: SimOptions, console: Console | None = None) -> int:
    """Run, print the summary, write the report; the exit code is 1 if any invariant
    failed or an agent was given up on as stuck (2 for a scenario error)."""
    from simulations.report import render_table

    console = console or Console()
    log_dir = options.report_dir or Path(tempfile.gettempdir())
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "simulate.log"
    try:
        with _logging_to(log_path):
            result = trio.run(simulate, options, console)
    except ScenarioError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    console.print(f"engine and harness log: {log_path}")
    console.print(render_table(result.report))
    if result.files is not None:
        console.print(f"report written to {options.report_dir}")
    console.print(result.verdict())
    return 0 if result.passed else 1


__all__ = ["SimOptions", "SimResult", "run_simulation", "simulate"]
