"""The ``emporion`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import Instrument, parse_instruments

if TYPE_CHECKING:
    from simulations.scenario import Scenario


def instruments_toml(path: str | None) -> str:
    """The registry's TOML text at ``path``, or the default shipped with the package."""
    if path is None:
        return files("protocol").joinpath("instruments.toml").read_text()
    return Path(path).read_text()


def load_instruments(path: str | None) -> dict[str, Instrument]:
    """The registry at ``path``, or the default shipped with the package."""
    return parse_instruments(instruments_toml(path))


def _run(args: argparse.Namespace) -> int:
    import trio

    from gateway.app import RunOptions, run_exchange
    from gateway.users import UserStore, default_users_path, demo_users

    data_dir = Path(args.data_dir)
    try:
        store = UserStore.load(Path(args.users_file) if args.users_file
                               else default_users_path(data_dir))
    except Exception as exc:
        return _fail(str(exc))
    try:
        registry = instruments_toml(args.instruments)
        parse_instruments(registry)
    except (OSError, ValueError) as exc:
        return _fail(f"instrument registry {args.instruments or '(default)'}: {exc}")
    demo = demo_users(args.demo_users, deposit_units=0)

    def check(user: str, password: str) -> bool:
        if user in store:
            return store.verify(user, password)
        return demo.verify(user, password) or (user.startswith("bot") and password == "demo")

    if args.replay_capacity < 1:
        return _fail("--replay-capacity must be 1 or more")
    options = RunOptions(host=args.host, port=args.port, data_dir=data_dir, agents=args.agents,
                         demo_users=args.demo_users, seconds=args.seconds, fsync=args.fsync,
                         replay_capacity=args.replay_capacity,
                         live=not args.no_live and sys.stdout.isatty(),
                         deposits=tuple((u, store.deposit_of(u)) for u in store.names()))
    try:
        return trio.run(run_exchange, options, registry, check)
    except OSError as exc:
        return _fail(f"cannot serve on {args.host}:{args.port}: {exc}")
    except BaseException as exc:
        failed = _bridge_failure(exc)
        if failed is None:
            raise
        return _fail(str(failed))


def _bridge_failure(exc: BaseException) -> BaseException | None:
    """The :class:`~gateway.bridge.BridgeFailed` that ended a run, if that is what did
    (trio hands it over inside exception groups): the engine is out of reach."""
    from gateway.bridge import BridgeFailed

    if isinstance(exc, BridgeFailed):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _bridge_failure(inner)
            if found is not None:
                return found
    return None


def _gateway(args: argparse.Namespace) -> int:
    """A gateway attached to a booted multi-process engine (``emporion boot``)."""
    import signal

    import trio

    from gateway.bridge import BridgeOptions, EngineBridge
    from gateway.server import Gateway, GatewayConfig, stop_on_signals
    from gateway.users import UserStore, default_users_path

    host, _, port_text = args.engine.rpartition(":")
    if not port_text.isdigit() or host not in ("", "127.0.0.1", "localhost"):
        return _fail(f"--engine must be 127.0.0.1:ADMIN_PORT (got {args.engine!r}); the admin "
                     "transport is pickle and stays on this machine")
    try:
        store = UserStore.load(Path(args.users_file) if args.users_file
                               else default_users_path(Path(args.data_dir)))
    except Exception as exc:
        return _fail(str(exc))
    bridge = EngineBridge(BridgeOptions(base="multiprocTCPBase", admin_port=int(port_text),
                                        gateway_id=args.gateway_id))
    gw = Gateway(bridge, load_instruments(args.instruments), store.verify,
                 GatewayConfig(host=args.host, port=args.port))

    async def main() -> None:
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_on_signals, signals, stop, nursery.cancel_scope)
                port = await nursery.start(gw.serve)
                print(f"emporion gateway on ws://{args.host}:{port}/v1 attached to engine "
                      f"127.0.0.1:{port_text}", flush=True)
                await stop.wait()
                print("stopping: answering what was asked, then closing connections",
                      flush=True)
                await gw.shutdown()
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except (OSError, RuntimeError) as exc:
        return _fail(f"gateway failed: {exc}")
    except BaseExceptionGroup as group:
        failed = _bridge_failure(group)
        if failed is None:
            raise
        return _fail(f"gateway failed: {failed}")
    return 0


def _users(args: argparse.Namespace) -> int:
    import getpass

    from gateway.users import UsersFileError, cmd_users_add, cmd_users_list, default_users_path

    path = Path(args.users_file) if args.users_file else default_users_path(Path(args.data_dir))
    try:
        if args.users_command == "add":
            password = args.password
            if password is None:
                password = (getpass.getpass(f"password for {args.name}: ") if sys.stdin.isatty()
                            else sys.stdin.readline().rstrip("\n"))
            print(cmd_users_add(path, args.name, password, args.deposit))
        else:
            rows = cmd_users_list(path)
            if args.json:
                _print_json([{"user": u, "deposit": d} for u, d in rows])
            else:
                for user, deposit in rows:
                    print(f"{user}\t{deposit}")
    except UsersFileError as exc:
        return _fail(str(exc))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from simulations.demo import run_demo

    return run_demo(
        load_instruments(args.instruments),
        agents=args.agents,
        seconds=args.seconds,
        steps=args.steps,
        seed=args.seed,
        live=not args.no_live and sys.stdout.isatty(),
    )


def _print_json(data: object) -> None:
    try:
        print(json.dumps(data, indent=2, sort_keys=True), flush=True)
    except BrokenPipeError:  # `emporion status --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fail(message: str) -> int:
    print(f"emporion: {message}", file=sys.stderr, flush=True)
    return 1


def _boot(args: argparse.Namespace) -> int:
    from actors.operations import BootOptions, BootReport, OperationError, boot

    def ready(report: BootReport) -> None:
        if args.json:
            _print_json(report.to_json())
        else:
            print(report.line(), flush=True)

    try:
        options = BootOptions(
            base=args.base, admin_port=args.admin_port, bind=args.bind,
            data_dir=Path(args.data_dir),
            instruments=None if args.instruments is None else Path(args.instruments),
            fsync=args.fsync, account_shards=args.account_shards,
            replay_capacity=args.replay_capacity, foreground=args.foreground,
            timeout=args.timeout)
        return boot(options, on_ready=ready)
    except OperationError as exc:
        return _fail(str(exc))


def _status(args: argparse.Namespace) -> int:
    from actors.operations import OperationError, resolve_target, status

    try:
        report = status(resolve_target(args.admin_port, args.data_dir), timeout=args.timeout)
    except OperationError as exc:
        return _fail(str(exc))
    if args.json:
        _print_json(report.to_json())
        return 0
    from rich.console import Console
    from rich.table import Table

    def num(value: int | None) -> str:
        return "-" if value is None else f"{value:,}"

    title = (f"emporion engine at {report.address} (admin pid {report.admin_pid}, "
             f"{len(report.gateways)} gateways)")
    table = Table(title=title)
    for name in ("host", "kind", "pid", "entities", "turns", "items", "outbox",
                 "journal offset", "restarts"):
        table.add_column(name, no_wrap=True, justify="left" if name in ("host", "kind")
                         else "right")
    for row in report.hosts:
        if row.answered:
            cells = [str(row.pid), num(row.entities), num(row.turns), num(row.items),
                     num(row.outbox), num(row.journal_offset)]
        else:
            cells = ["no answer", "", "", "", "", ""]
        table.add_row(row.host_id, row.kind, *cells, num(row.restarts),
                      style=None if row.answered else "red")
    console = Console(width=max(120, Console().width))
    if report.booted:
        console.print(table)
    else:
        console.print(f"an actor system runs at {report.address} but no exchange is booted")
    return 0


def _shutdown(args: argparse.Namespace) -> int:
    from actors.operations import NotBootedError, OperationError, resolve_target, shutdown

    try:
        report = shutdown(resolve_target(args.admin_port, args.data_dir), timeout=args.timeout)
    except NotBootedError as exc:
        if args.json:
            _print_json({"was_running": False, "stopped": True, "detail": str(exc)})
        else:
            print(f"not running: {exc}", flush=True)
        return 0
    except OperationError as exc:
        return _fail(str(exc))
    if args.json:
        _print_json(report.to_json())
    else:
        print(report.line(), flush=True)
    return 0 if report.stopped else 1


def simulate_scenario(args: argparse.Namespace) -> Scenario:
    """The scenario ``emporion simulate`` runs: ``--scenario`` with the options applied.

    Raises:
        ScenarioError: an unknown scenario, a bad field, or a bad override.
    """
    import attrs

    from simulations.scenario import ScenarioError, load_scenario, validate

    scenario = load_scenario(args.scenario)
    changes: dict[str, Any] = {}
    if args.agents is not None:
        changes["agents"] = args.agents
    if args.seconds is not None:
        changes.update(seconds=args.seconds, orders=None)
    if args.orders is not None:
        changes.update(orders=args.orders, seconds=None)
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.rate_scale is not None:
        if not args.rate_scale > 0:
            raise ScenarioError(f"--rate-scale must be > 0, not {args.rate_scale}")
        changes["rates"] = {role: rate * args.rate_scale
                            for role, rate in scenario.rates.items()}
    return validate(attrs.evolve(scenario, **changes))


def _simulate(args: argparse.Namespace) -> int:
    from simulations.harness import SimOptions, run_simulation
    from simulations.scenario import ScenarioError

    try:
        scenario = simulate_scenario(args)
    except ScenarioError as exc:
        print(f"emporion simulate: {exc}", file=sys.stderr)
        return 2
    if args.processes is None:
        args.processes = 0 if scenario.agents <= 100 else 1
    if args.processes < 0:
        print("emporion simulate: --processes must be >= 0", file=sys.stderr)
        return 2
    attach = args.url is not None
    if args.base == "multiprocTCPBase" and (attach or args.record):
        print("emporion simulate: --base multiprocTCPBase boots its own engine and cannot "
              "record; drop --url/--record", file=sys.stderr)
        return 2
    if args.account_shards < 1:
        print("emporion simulate: --account-shards must be >= 1", file=sys.stderr)
        return 2
    options = SimOptions(
        scenario=scenario, url=args.url, password="demo" if attach else "sim",
        user_prefix="demo" if attach else "sim",
        report_dir=Path(args.report) if args.report else None, processes=args.processes,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        record=Path(args.record) if args.record else None, fsync=args.fsync,
        live=not args.no_live and sys.stdout.isatty(), instruments_path=args.instruments,
        base=args.base, account_shards=args.account_shards)
    try:
        return run_simulation(options)
    except BaseException as exc:
        failed = _bridge_failure(exc)
        if failed is None:
            raise
        return _fail(f"simulate: {failed}")


def _replay(args: argparse.Namespace) -> int:
    from rich.console import Console

    from simulations.replay import main as replay_main

    return replay_main(args.file, Console())


def _add_target(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--admin-port", type=int, default=None,
                       help="the engine's admin port (default: from DATA_DIR/engine.json, "
                            "else 19500)")
    where.add_argument("--data-dir", default=None,
                       help="the engine's data directory (reads its engine.json; default ./data)")
    parser.add_argument("--json", action="store_true", help="print JSON")


REPLAY_HELP = ("events per user the router keeps for resumes after a reconnect (default "
               "10,000; stored in the journal, ~80 bytes each)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emporion", description="The Emporion exchange engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run the embedded exchange: engine, WebSocket gateway, demo users, simulated "
             "traders and a live view (Ctrl-C stops)",
    )
    run.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    run.add_argument("--port", type=int, default=8765, help="gateway port (default 8765)")
    run.add_argument("--data-dir", default="data", help="journal and users file (default ./data)")
    run.add_argument("--agents", type=int, default=6,
                     help="simulated traders connected through the gateway (0: none)")
    run.add_argument("--demo-users", type=int, default=10,
                     help="demo1..demoN, password 'demo', funded with 1,000,000 (default 10)")
    run.add_argument("--seconds", type=float, default=None,
                     help="stop by itself after this long (default: run until Ctrl-C)")
    run.add_argument("--fsync", choices=("always", "batch", "off"), default="batch")
    run.add_argument("--replay-capacity", type=int, default=10_000, help=REPLAY_HELP)
    run.add_argument("--users-file", default=None, help="default DATA_DIR/users.json")
    run.add_argument("--instruments", default=None, help="instrument registry TOML file")
    run.add_argument("--no-live", action="store_true", help="no live view, summary at the end")
    run.set_defaults(func=_run)

    demo = sub.add_parser(
        "demo", help="the cores on an in-process loop with seeded traders and invariant checks")
    demo.add_argument("--agents", type=int, default=30, help="simulated traders (default 30)")
    demo.add_argument("--seconds", type=float, default=5.0, help="wall-clock run time")
    demo.add_argument("--steps", type=int, default=None,
                      help="stop after this many 1 ms virtual steps instead of --seconds")
    demo.add_argument("--seed", type=int, default=1, help="RNG seed: same seed, same trades")
    demo.add_argument("--instruments", default=None, help="instrument registry TOML file")
    demo.add_argument("--no-live", action="store_true", help="no live table, summary only")
    demo.set_defaults(func=_demo)

    sim = sub.add_parser(
        "simulate",
        help="many simulated traders over real sockets, fault injection, invariant checks "
             "and a report (see docs/simulations.md)")
    sim.add_argument("--scenario", default="basic",
                     help="a shipped scenario (basic, faults, stress) or a TOML file "
                          "(default basic)")
    sim.add_argument("--agents", type=int, default=None, help="agents (overrides the scenario)")
    limit = sim.add_mutually_exclusive_group()
    limit.add_argument("--seconds", type=float, default=None, help="trading time")
    limit.add_argument("--orders", type=int, default=None,
                       help="an order budget instead of a trading time")
    sim.add_argument("--seed", type=int, default=None, help="RNG seed (overrides the scenario)")
    sim.add_argument("--rate-scale", type=float, default=None, metavar="F",
                     help="multiply every role's rate by F (0.5: half the scenario's load)")
    sim.add_argument("--report", default="sim-report",
                     help="report directory: report.json, report.md, charts (default ./sim-report)")
    sim.add_argument("--processes", type=int, default=None,
                     help="client processes for the agents (0: in this process; default: "
                          "0 up to 100 agents, else 1, so the load uses the other core)")
    sim.add_argument("--url", default=None,
                     help="attach to a running gateway (e.g. `emporion run --agents 0 "
                          "--demo-users N`) instead of booting one; agents log in as "
                          "demo1..demoN with password 'demo'; client faults only")
    sim.add_argument("--data-dir", default=None,
                     help="the embedded engine's journal (default: a fresh temporary dir)")
    sim.add_argument("--record", default=None,
                     help="journal every engine input to FILE (replay: emporion replay FILE)")
    sim.add_argument("--fsync", choices=("always", "batch", "off"), default="batch")
    sim.add_argument("--base", choices=("simpleSystemBase", "multiprocTCPBase"),
                     default="simpleSystemBase",
                     help="the engine: embedded in this process (default), or booted as its "
                          "own processes (multiprocTCPBase; kills are real kill -9s)")
    sim.add_argument("--account-shards", type=int, default=2,
                     help="multiprocTCPBase: account shard hosts, a process each (default 2)")
    sim.add_argument("--instruments", default=None, help="instrument registry TOML file")
    sim.add_argument("--no-live", action="store_true", help="no live view, summary at the end")
    sim.set_defaults(func=_simulate)

    rep = sub.add_parser(
        "replay",
        help="re-feed a recording (simulate --record FILE) into a fresh in-process "
             "engine on a virtual clock and compare the trades, balances and events digests")
    rep.add_argument("file", help="the record file")
    rep.set_defaults(func=_replay)

    gwp = sub.add_parser("gateway",
                         help="a WebSocket gateway attached to a booted engine (emporion boot)")
    gwp.add_argument("--engine", required=True, help="the engine's admin address 127.0.0.1:PORT")
    gwp.add_argument("--host", default="127.0.0.1")
    gwp.add_argument("--port", type=int, default=8765)
    gwp.add_argument("--gateway-id", default="gw1", help="unique per gateway of one engine")
    gwp.add_argument("--data-dir", default="data", help="where users.json lives")
    gwp.add_argument("--users-file", default=None)
    gwp.add_argument("--instruments", default=None)
    gwp.set_defaults(func=_gateway)

    users = sub.add_parser("users", help="manage the users file (argon2id password hashes)")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    add = users_sub.add_parser("add", help="add a user")
    add.add_argument("name")
    add.add_argument("--deposit", default="0", help="initial deposit, e.g. 1000000")
    add.add_argument("--password", default=None,
                     help="the password (default: prompt, or one line on stdin)")
    lst = users_sub.add_parser("list", help="list users and deposits")
    lst.add_argument("--json", action="store_true")
    for p in (add, lst):
        p.add_argument("--data-dir", default="data")
        p.add_argument("--users-file", default=None)
    users.set_defaults(func=_users)

    boot = sub.add_parser(
        "boot",
        help="start the actor system and boot the exchange (see docs/operations.md)",
        description="Start the actor system and boot the exchange on a data directory. "
                    "With multiprocTCPBase the engine runs in the background (its admin "
                    "outlives this command): every boot needs a matching `emporion shutdown`. "
                    "With --foreground, or with simpleSystemBase (which lives only inside "
                    "this process), it runs until SIGINT/SIGTERM, then stops cleanly.")
    boot.add_argument("--base", choices=("simpleSystemBase", "multiprocTCPBase"),
                      default="multiprocTCPBase", help="Thespian system base "
                      "(default multiprocTCPBase)")
    boot.add_argument("--admin-port", type=int, default=19500,
                      help="TCP port of the actor system's admin (default 19500)")
    boot.add_argument("--bind", default="127.0.0.1",
                      help="address every engine socket binds (default 127.0.0.1; the "
                           "transport is pickle: keep it private)")
    boot.add_argument("--data-dir", default="data",
                      help="journal, engine.json and logs (default ./data; created)")
    boot.add_argument("--instruments", default=None,
                      help="instrument registry TOML (default: the packaged one)")
    boot.add_argument("--fsync", choices=("always", "batch", "off"), default="batch",
                      help="journal fsync policy (default batch)")
    boot.add_argument("--account-shards", type=int, default=0,
                      help="account hosts: 0 = one actor per user (default); N > 0 = N shard "
                           "actors (use e.g. 4 with multiprocTCPBase: a process per user "
                           "does not scale)")
    boot.add_argument("--replay-capacity", type=int, default=10_000, help=REPLAY_HELP)
    boot.add_argument("--foreground", action="store_true",
                      help="stay attached; SIGINT/SIGTERM stop the engine cleanly")
    boot.add_argument("--timeout", type=float, default=60.0,
                      help="seconds to wait for the engine to be ready (default 60)")
    boot.add_argument("--json", action="store_true", help="print the ready report as JSON")
    boot.set_defaults(func=_boot)

    status = sub.add_parser("status", help="the hosts of a running engine (multiprocTCPBase)")
    _add_target(status)
    status.add_argument("--timeout", type=float, default=3.0,
                        help="seconds to wait for the exchange and for the hosts (default 3)")
    status.set_defaults(func=_status)

    shutdown = sub.add_parser("shutdown", help="stop a running engine and check nothing remains")
    _add_target(shutdown)
    shutdown.add_argument("--timeout", type=float, default=10.0,
                          help="seconds to wait for the exchange to stop (default 10)")
    shutdown.set_defaults(func=_shutdown)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
