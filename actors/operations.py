"""Operator commands: boot an engine, ask it for its status, shut it down.

The logic behind ``emporion boot``, ``emporion status`` and ``emporion shutdown``
(``gateway/cli.py`` only parses arguments and prints). See
``docs/operations.md`` for the operator's view.

* :func:`boot` starts an actor system (:func:`actors.runtime.start_system`),
  boots the Exchange (:func:`actors.boot.boot_engine`) on a data directory and
  writes ``DATA_DIR/engine.json`` (:class:`EngineFile`) so the other commands
  find it. Under ``multiprocTCPBase`` the admin calls ``setsid`` and outlives
  the booting process: without ``foreground`` :func:`boot` returns once the
  engine is ready and the engine keeps running until ``emporion shutdown``.
  With ``foreground`` (always, for ``simpleSystemBase``, whose actors live in
  the calling thread) it stays attached until SIGINT/SIGTERM, then stops the
  engine itself.
* :func:`status` attaches to a running ``multiprocTCPBase`` system, asks the
  Exchange for its hosts and every host for its :class:`~actors.host.HostStats`
  through the system's relay, so a dead or busy host costs at most the timeout
  and shows as "no answer".
* :func:`shutdown` sends ``ExchangeStop`` (exits are no longer restarts), shuts
  the actor system down, and checks in ``/proc`` that no process of the
  system's session remains.

Every engine process forked by a booting process gets its stdin/stdout/stderr
redirected to ``DATA_DIR/logs/engine.out`` (an ``os.register_at_fork`` hook), so
a detached admin never holds the terminal or the pipe of whoever ran ``boot``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from importlib.resources import files
from pathlib import Path
from types import FrameType
from typing import Any, Final

import attrs

from actors.boot import EngineError, boot_engine
from actors.exchange import (
    EXCHANGE_NAME,
    Exchange,
    ExchangeStatus,
    ExchangeStatusQuery,
    ExchangeStop,
)
from actors.host import EngineConfig, HostStats, HostStatsQuery
from actors.journal import FILE_NAME as JOURNAL_FILE
from actors.journal import FSYNC_POLICIES, Journal
from actors.runtime import (
    BASES,
    DEFAULT_ADMIN_PORT,
    Base,
    RuntimeRelayAsk,
    RuntimeSystemError,
    SystemConfig,
    listening_sockets,
    process_session,
    session_pids,
    start_relay,
    start_system,
    stop_system,
    tracked,
)
from protocol import parse_instruments

__all__ = [
    "DEFAULT_DATA_DIR",
    "ENGINE_FILE",
    "BootOptions",
    "BootReport",
    "EngineFile",
    "HostRow",
    "NotBootedError",
    "OperationError",
    "ShutdownReport",
    "StatusReport",
    "Target",
    "boot",
    "detach_handle",
    "read_engine_file",
    "resolve_target",
    "shutdown",
    "status",
]

ENGINE_FILE: Final = "engine.json"
DEFAULT_DATA_DIR: Final = "data"
LOG_DIR: Final = "logs"
#: stdout/stderr of every engine process forked by ``boot``.
ENGINE_OUT: Final = "engine.out"


class OperationError(RuntimeError):
    """A command could not do what was asked; the message is meant for the operator."""


class NotBootedError(OperationError):
    """The data directory named has no engine file: no engine was booted on it."""


# ---------------------------------------------------------------------------
# engine.json


@attrs.frozen(kw_only=True)
class EngineFile:
    """What ``DATA_DIR/engine.json`` records about the engine running on that directory.

    Attributes:
        base: The Thespian system base.
        admin_port: TCP port of the admin (meaningless for ``simpleSystemBase``).
        bind: Address the system's sockets bind.
        admin_pid: OS pid of the TCP admin; for ``simpleSystemBase`` the pid of
            the process the engine is embedded in.
        session: Session id shared by the admin and every actor process.
        boot_pid: Pid of the ``emporion boot`` process.
        foreground: Whether ``boot_pid`` stays attached (and stops the engine).
        started: Unix time of the boot.
    """

    base: str
    admin_port: int
    bind: str
    admin_pid: int | None
    session: int | None
    boot_pid: int
    foreground: bool
    started: float

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineFile:
        names = {a.name for a in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def read_engine_file(data_dir: Path) -> EngineFile | None:
    """The engine file of ``data_dir``, or ``None`` if there is none (or it is unreadable)."""
    path = data_dir / ENGINE_FILE
    try:
        return EngineFile.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_engine_file(data_dir: Path, record: EngineFile) -> None:
    tmp = data_dir / (ENGINE_FILE + ".tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2) + "\n")
    os.replace(tmp, data_dir / ENGINE_FILE)


def _remove_engine_file(data_dir: Path, boot_pid: int | None = None) -> None:
    """Remove the engine file (only ours, when ``boot_pid`` is given)."""
    if boot_pid is not None:
        current = read_engine_file(data_dir)
        if current is None or current.boot_pid != boot_pid:
            return
    with contextlib.suppress(FileNotFoundError):
        (data_dir / ENGINE_FILE).unlink()


def _alive(pid: int | None) -> bool:
    return pid is not None and process_session(pid) is not None


# ---------------------------------------------------------------------------
# Targets: which engine a command talks to


@attrs.frozen(kw_only=True)
class Target:
    """The engine a ``status`` or ``shutdown`` addresses.

    Attributes:
        admin_port: The admin's TCP port.
        bind: The address to reach it on.
        data_dir: Its data directory, when known (then ``record`` is its engine file).
        record: The engine file, if one was found.
    """

    admin_port: int
    bind: str = "127.0.0.1"
    data_dir: Path | None = None
    record: EngineFile | None = None

    @property
    def address(self) -> str:
        return f"{self.bind}:{self.admin_port}"

    def config(self) -> SystemConfig:
        log_file = None
        if self.data_dir is not None:
            log_file = str(self.data_dir / LOG_DIR / "actors.log")
        return SystemConfig(base="multiprocTCPBase", admin_port=self.admin_port,
                            bind=self.bind, log_file=log_file)


def resolve_target(admin_port: int | None = None, data_dir: str | None = None) -> Target:
    """Which engine to talk to.

    An explicit ``admin_port`` wins; otherwise the engine file of ``data_dir``
    (default ``./data``) gives the port; otherwise :data:`DEFAULT_ADMIN_PORT`.

    Raises:
        OperationError: ``data_dir`` was given explicitly and holds no engine file.
    """
    if admin_port is not None:
        return Target(admin_port=admin_port)
    directory = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR)
    record = read_engine_file(directory)
    if record is None:
        if data_dir is not None:
            raise NotBootedError(
                f"no {ENGINE_FILE} in {directory}: no engine was booted on it "
                "(or it was shut down)")
        return Target(admin_port=DEFAULT_ADMIN_PORT)
    bind = "127.0.0.1" if record.bind in ("", "0.0.0.0") else record.bind
    return Target(admin_port=record.admin_port, bind=bind, data_dir=directory, record=record)


# ---------------------------------------------------------------------------
# Boot


@attrs.frozen(kw_only=True)
class BootOptions:
    """The options of ``emporion boot`` (see ``docs/operations.md``)."""

    base: Base = "multiprocTCPBase"
    admin_port: int = DEFAULT_ADMIN_PORT
    bind: str = "127.0.0.1"
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    instruments: Path | None = None
    fsync: str = "batch"
    account_shards: int = 0
    #: Events per user the router keeps for resumes (stored in the journal).
    replay_capacity: int = 10_000
    foreground: bool = False
    timeout: float = 60.0

    def __attrs_post_init__(self) -> None:
        if self.base not in BASES:
            raise OperationError(f"unknown base {self.base!r}; choose one of {', '.join(BASES)}")
        if self.fsync not in FSYNC_POLICIES:
            raise OperationError(f"unknown fsync policy {self.fsync!r}")
        if self.account_shards < 0:
            raise OperationError("--account-shards must be 0 or more")
        if self.replay_capacity < 1:
            raise OperationError("--replay-capacity must be 1 or more")

    @property
    def attached(self) -> bool:
        """Whether ``boot`` stays in the foreground (always for the embedded base)."""
        return self.foreground or self.base == "simpleSystemBase"


@attrs.frozen(kw_only=True)
class BootReport:
    """What ``boot`` prints once the engine is ready."""

    base: str
    admin: str | None
    admin_pid: int | None
    session: int | None
    data_dir: str
    hosts: tuple[str, ...]
    recovered_turns: int
    account_shards: int
    fsync: str
    foreground: bool

    def line(self) -> str:
        where = f"admin {self.admin}" if self.admin else "embedded (in this process)"
        pid = f", admin pid {self.admin_pid}" if self.admin_pid and self.admin else ""
        mode = ("in the foreground until SIGINT/SIGTERM" if self.foreground
                else "in the background; stop it with `emporion shutdown`")
        return (f"emporion engine ready: {self.base}, {where}{pid}, data dir {self.data_dir}, "
                f"{len(self.hosts)} hosts, {self.recovered_turns} recovered journal turns; "
                f"running {mode}")

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["hosts"] = list(self.hosts)
        data["ready"] = True
        return data


_FORK_STDIO: dict[str, str | None] = {"path": None}
_FORK_HOOK = {"installed": False}


def _after_fork_in_child() -> None:
    """In a forked engine process: detach stdio and restore default stop signals."""
    path = _FORK_STDIO["path"]
    if path is None:
        return
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
    # The booting process's own SIGINT/SIGTERM handlers must not live on in the
    # admin (Thespian installs its own in every actor process after this).
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _detach_forked_stdio(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _FORK_STDIO["path"] = str(path)
    if not _FORK_HOOK["installed"]:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _FORK_HOOK["installed"] = True


class _StopSignals:
    """SIGINT/SIGTERM set an event instead of killing the process (this process only)."""

    SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received: int | None = None
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked child that has not reset it yet
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        self.event.set()

    def __enter__(self) -> _StopSignals:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _instruments_text(path: Path | None) -> str:
    try:
        text = (files("protocol").joinpath("instruments.toml").read_text() if path is None
                else path.read_text())
        parse_instruments(text)
    except OSError as exc:
        raise OperationError(f"cannot read the instrument registry: {exc}") from exc
    except ValueError as exc:
        raise OperationError(f"invalid instrument registry {path}: {exc}") from exc
    return text


def _check_placement(data_dir: Path, account_shards: int) -> None:
    """Refuse a placement that cannot read the accounts a previous run journaled.

    Account state lives in the stream of the host that held it: ``host:account:USER``
    (one host per user) or ``host:accounts:I`` (shard ``I`` of ``N``, by
    ``crc32(user) % N``). Booting a data directory with another placement would
    start those accounts empty. (Only shards that journaled something leave a
    stream, so a smaller ``N`` than before is not always detectable.)
    """
    if not (data_dir / JOURNAL_FILE).exists():
        return
    with Journal.open(data_dir, fsync="off") as journal:
        streams = journal.streams()
    per_user = [s for s in streams if s.startswith("host:account:")]
    shards = [int(s.rpartition(":")[2]) for s in streams
              if s.startswith("host:accounts:") and s.rpartition(":")[2].isdigit()]
    if account_shards == 0 and shards:
        raise OperationError(
            f"{data_dir} holds sharded accounts (--account-shards >= {max(shards) + 1}); "
            "boot it with the --account-shards it was created with")
    if account_shards and per_user:
        raise OperationError(
            f"{data_dir} holds one account host per user; boot it with --account-shards 0")
    if account_shards and shards and max(shards) >= account_shards:
        raise OperationError(
            f"{data_dir} holds account shard {max(shards)}: boot it with the "
            f"--account-shards it was created with (not {account_shards})")


def _ask(asys: Any, target: Any, message: Any, timeout: float) -> Any:
    return asys.ask(target, message, timedelta(seconds=timeout))


def _stop_engine(asys: Any, timeout: float = 10.0) -> list[int]:
    """``ExchangeStop`` (no restarts from now on), then stop the actor system.

    Returns:
        Pids that survived the shutdown and had to be killed.
    """
    with contextlib.suppress(Exception):
        _ask(asys, asys.createActor(Exchange, globalName=EXCHANGE_NAME), ExchangeStop(), timeout)
    return stop_system(asys)


def boot(options: BootOptions, *, on_ready: Callable[[BootReport], None]) -> int:
    """Start an actor system, boot the Exchange on the data directory, report readiness.

    Args:
        options: What to boot.
        on_ready: Called once with the :class:`BootReport` when every host has
            recovered (the CLI prints it).

    Returns:
        The exit code, 0: a SIGINT/SIGTERM (during the boot, or while attached)
        stops the engine cleanly and still returns 0.

    Raises:
        OperationError: The engine could not be started (nothing is left running).
    """
    data_dir = options.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir.resolve()
    text = _instruments_text(options.instruments)
    record = read_engine_file(data_dir)
    if record is not None and (_alive(record.admin_pid) or _alive(record.boot_pid)) and (
        record.base == "simpleSystemBase" or listening_sockets(record.admin_port)
    ):
        raise OperationError(
            f"an engine already runs on {data_dir} ({record.base}, admin port "
            f"{record.admin_port}, pid {record.admin_pid}); `emporion shutdown "
            f"--data-dir {data_dir}` first")
    _check_placement(data_dir, options.account_shards)
    config = SystemConfig(base=options.base, admin_port=options.admin_port, bind=options.bind,
                          log_file=str(data_dir / LOG_DIR / "actors.log"))
    engine = EngineConfig(instruments_toml=text, data_dir=str(data_dir), fsync=options.fsync,
                          account_shards=options.account_shards,
                          replay_capacity=options.replay_capacity)
    with _StopSignals() as stops:
        if config.is_tcp:
            if listening_sockets(options.admin_port):
                raise OperationError(
                    f"port {options.admin_port} is taken (an engine already running? "
                    f"`emporion status --admin-port {options.admin_port}`)")
            _detach_forked_stdio(data_dir / LOG_DIR / ENGINE_OUT)
        try:
            asys = start_system(config)
        except (RuntimeSystemError, OSError) as exc:
            raise OperationError(f"could not start the actor system: {exc}") from exc
        try:
            ready = boot_engine(asys, engine, timeout=options.timeout)
        except BaseException as exc:
            stop_system(asys)
            if isinstance(exc, EngineError | OSError):
                raise OperationError(f"the engine did not boot: {exc}") from exc
            raise
        info = tracked(asys)
        admin_pid = info.admin_pid if info is not None and info.admin_pid else None
        session = info.session if info is not None else None
        _write_engine_file(data_dir, EngineFile(
            base=options.base, admin_port=options.admin_port, bind=options.bind,
            admin_pid=admin_pid if config.is_tcp else os.getpid(), session=session,
            boot_pid=os.getpid(), foreground=options.attached, started=time.time()))
        report = BootReport(
            base=options.base,
            admin=f"{options.bind}:{options.admin_port}" if config.is_tcp else None,
            admin_pid=admin_pid, session=session, data_dir=str(data_dir),
            hosts=tuple(sorted(ready.directory.hosts)), recovered_turns=ready.recovered_turns,
            account_shards=options.account_shards, fsync=options.fsync,
            foreground=options.attached)
        if stops.event.is_set():  # SIGINT/SIGTERM during the boot: undo it
            _stop_engine(asys)
            _remove_engine_file(data_dir, os.getpid())
            return 0
        if not options.attached:
            # Background: the admin lives on (setsid); `emporion shutdown` stops it.
            on_ready(report)
            detach_handle(asys)
            return 0
        gone = False
        try:
            on_ready(report)
            gone = _serve(asys, stops, admin_pid if config.is_tcp else None)
        finally:
            if not gone:
                _stop_engine(asys)
            _remove_engine_file(data_dir, os.getpid())
    return 0


def _serve(asys: Any, stops: _StopSignals, admin_pid: int | None) -> bool:
    """Stay attached until a stop signal; True if the admin disappeared meanwhile."""
    while not stops.event.is_set():
        if admin_pid is None:
            # simpleSystemBase: the actors (timers included) run only inside calls.
            asys.listen(timedelta(seconds=0.2))
        else:
            stops.event.wait(0.5)
            if not _alive(admin_pid):
                return True  # shut down from outside (`emporion shutdown`)
    return False


def detach_handle(asys: Any) -> None:
    """Drop an external handle without shutting its system down."""
    base = getattr(asys, "_systemBase", None)
    transport = getattr(base, "transport", None)
    with contextlib.suppress(Exception):
        if transport is not None:
            transport.close()


# ---------------------------------------------------------------------------
# Status


@attrs.frozen(kw_only=True)
class HostRow:
    """One line of the status table; ``answered`` is false for a dead or slow host."""

    host_id: str
    kind: str
    restarts: int
    answered: bool = False
    pid: int | None = None
    entities: int | None = None
    turns: int | None = None
    items: int | None = None
    outbox: int | None = None
    journal_offset: int | None = None


@attrs.frozen(kw_only=True)
class StatusReport:
    """What ``status`` found."""

    address: str
    admin_pid: int | None
    session: int | None
    data_dir: str | None
    booted: bool
    gateways: tuple[str, ...]
    hosts: tuple[HostRow, ...]

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["gateways"] = list(self.gateways)
        data["hosts"] = [attrs.asdict(h) for h in self.hosts]
        return data


@contextlib.contextmanager
def _attached(target: Target) -> Iterator[Any]:
    """An external handle on the running system of ``target`` (never starts one)."""
    if target.record is not None and target.record.base == "simpleSystemBase":
        raise OperationError(
            f"the engine on {target.data_dir} is embedded (simpleSystemBase) in pid "
            f"{target.record.admin_pid}: it cannot be reached from another process")
    if not listening_sockets(target.admin_port):
        raise OperationError(f"no engine is running: nothing listens on {target.address}")
    try:
        asys = start_system(target.config(), attach=True)
    except Exception as exc:
        raise OperationError(
            f"cannot reach an actor system at {target.address}: {exc}") from exc
    try:
        yield asys
    finally:
        detach_handle(asys)


def status(target: Target, *, timeout: float = 3.0) -> StatusReport:
    """Ask the Exchange for its hosts and every host for its statistics.

    Args:
        target: The engine (see :func:`resolve_target`).
        timeout: Seconds to wait for the Exchange, and for all hosts together.

    Raises:
        OperationError: Nothing runs there, or the Exchange does not answer.
    """
    with _attached(target) as asys:
        info = tracked(asys)
        exchange = asys.createActor(Exchange, globalName=EXCHANGE_NAME)
        answer = _ask(asys, exchange, ExchangeStatusQuery(), timeout)
        if not isinstance(answer, ExchangeStatus):
            raise OperationError(
                f"the exchange at {target.address} did not answer within {timeout:g} s")
        rows = {hid: HostRow(host_id=hid, kind=kind, restarts=restarts)
                for hid, kind, restarts in answer.hosts}
        addresses = {hid: answer.directory.hosts[hid] for hid in rows
                     if hid in answer.directory.hosts}
        if addresses:
            # Through the relay: a tell to a busy host would block this command for
            # the rest of that host's handler; the relay's sends are asynchronous.
            relay = start_relay(asys)
            for addr in addresses.values():
                asys.tell(relay, RuntimeRelayAsk(target=addr, message=HostStatsQuery()))
            waiting = set(addresses)
            deadline = time.monotonic() + timeout
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                msg = asys.listen(timedelta(seconds=left))
                if isinstance(msg, HostStats) and msg.host_id in waiting:
                    waiting.discard(msg.host_id)
                    rows[msg.host_id] = attrs.evolve(
                        rows[msg.host_id], answered=True, pid=msg.pid,
                        entities=msg.entities, turns=msg.turns, items=msg.items,
                        outbox=msg.outbox, journal_offset=msg.journal_offset)
        return StatusReport(
            address=target.address,
            admin_pid=None if info is None else info.admin_pid,
            session=None if info is None else info.session,
            data_dir=None if target.data_dir is None else str(target.data_dir),
            booted=bool(rows),
            gateways=tuple(sorted(answer.directory.gateways)),
            hosts=tuple(rows[h] for h in sorted(rows, key=_host_order)),
        )


def _host_order(host_id: str) -> tuple[int, str]:
    kind = host_id.partition(":")[0]
    return ({"router": 0, "book": 1, "accounts": 2, "account": 3}.get(kind, 4), host_id)


# ---------------------------------------------------------------------------
# Shutdown


@attrs.frozen(kw_only=True)
class ShutdownReport:
    """What ``shutdown`` did: ``stopped`` (it ran and is gone) or not running."""

    address: str
    was_running: bool
    stopped: bool
    admin_pid: int | None
    killed: tuple[int, ...] = ()
    remaining: tuple[int, ...] = ()
    detail: str = ""

    def line(self) -> str:
        if not self.was_running:
            return f"not running: nothing listens on {self.address}{self.detail}"
        if self.stopped:
            extra = (f"; killed {len(self.killed)} stuck processes {list(self.killed)}"
                     if self.killed else "")
            return (f"stopped the engine at {self.address} (admin pid {self.admin_pid} "
                    f"is gone, no process of its session remains{extra})")
        return (f"shutdown of {self.address} incomplete: processes {list(self.remaining)} "
                f"are still alive{self.detail}")

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["killed"] = list(self.killed)
        data["remaining"] = list(self.remaining)
        return data


def shutdown(target: Target, *, timeout: float = 10.0) -> ShutdownReport:
    """Stop the engine of ``target``: ``ExchangeStop``, then the actor system.

    A foreground ``boot`` notices the admin is gone and exits by itself; an
    embedded (``simpleSystemBase``) engine is asked to stop with SIGTERM to the
    process it runs in.
    """
    record = target.record
    if record is not None and record.base == "simpleSystemBase":
        return _shutdown_embedded(target, record, timeout)
    if not listening_sockets(target.admin_port):
        if record is not None and record.session is not None and session_pids(record.session):
            # The admin is gone but processes of its session live on: say so, kill nothing.
            return ShutdownReport(
                address=target.address, was_running=True, stopped=False,
                admin_pid=record.admin_pid, remaining=tuple(session_pids(record.session)),
                detail=f" (the admin is gone; these are of its session {record.session})")
        detail = ""
        if target.data_dir is not None:
            _remove_engine_file(target.data_dir)
            detail = f" (removed the stale {ENGINE_FILE} of {target.data_dir})"
        return ShutdownReport(address=target.address, was_running=False, stopped=True,
                              admin_pid=None, detail=detail)
    with _attached(target) as asys:
        info = tracked(asys)
        admin_pid = info.admin_pid if info is not None else None
        session = info.session if info is not None else None
        try:
            killed = _stop_engine(asys, timeout)
        except Exception as exc:
            raise OperationError(f"the shutdown of {target.address} failed: {exc}") from exc
    pids = {p for p in (admin_pid, record.admin_pid if record else None) if p is not None}
    remaining = sorted(p for p in pids if _alive(p))
    if session is not None:
        remaining = sorted(set(remaining) | set(session_pids(session)))
    if not remaining and target.data_dir is not None:
        _remove_engine_file(target.data_dir)
    return ShutdownReport(address=target.address, was_running=True, stopped=not remaining,
                          admin_pid=admin_pid, killed=tuple(killed), remaining=tuple(remaining))


def _shutdown_embedded(target: Target, record: EngineFile, timeout: float) -> ShutdownReport:
    pid = record.boot_pid
    where = f"embedded engine pid {pid}"
    if not _alive(pid) or not _is_emporion(pid):
        assert target.data_dir is not None
        _remove_engine_file(target.data_dir)
        return ShutdownReport(address=where, was_running=False, stopped=True, admin_pid=pid,
                              detail=f" (removed the stale {ENGINE_FILE})")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    alive = _alive(pid)
    return ShutdownReport(address=where, was_running=True, stopped=not alive, admin_pid=pid,
                          remaining=(pid,) if alive else ())


def _is_emporion(pid: int) -> bool:
    """Whether ``pid`` runs the emporion CLI (never signal a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"emporion" in part or b"gateway.cli" in part for part in cmdline)
