"""The Thespian runtime substrate: start, stop, observe and de-throttle actor systems.

Everything Emporion needs from Thespian 4.0.1 that is not "define an actor" lives
here, with the reasons taken from Thespian's own source:

* **Bind address and trust boundary.** Under ``multiprocTCPBase`` every Thespian
  process (admin, logger, each actor, the external handle) listens on a TCP port
  and unpickles whatever arrives on it: *anyone who can connect can run code as
  this user.* Thespian 4.0.1 reads ``THESPIAN_BASE_IPADDR`` only to choose the
  *advertised* address (``IPActorAddress.sockname``); the *bind* address of every
  external-facing socket is hard-wired to ``('', port)``, i.e. 0.0.0.0
  (``IPActorAddress.bindname``, thespian/system/transport/IPBase.py). So the env
  var alone does not keep the port private. :func:`start_system` sets
  ``THESPIAN_BASE_IPADDR`` to :attr:`SystemConfig.bind` *and* patches
  ``IPActorAddress.bindArgs`` so the sockets really bind that address (default
  127.0.0.1). A cluster (convention) must bind a private-network address and
  live on a network where every peer is trusted.
* **Rate limiter.** Every actor and admin process owns a ``RateThrottle``
  created in ``systemCommonBase.__init__`` from the module global
  ``thespian.system.systemCommon.RATE_THROTTLE`` (4480 msgs/s). Once a process
  has sent 70 % of that many messages it measures its rate and, above the limit,
  sleeps 0.1 s *per send*. The governor is built before the actor class is even
  imported, so patching the global from an actor module is too late for that
  actor. :func:`lift_rate_throttle` patches the global in the starting process
  (inherited by the admin and every actor through ``fork``, Thespian's default
  start method), and :class:`RuntimeActor` re-applies the limit - carried in
  the system capabilities - to its own process's governor on its first message,
  which covers admins not forked from us.
* **Dead and busy targets.** An external ``ActorSystem.tell`` returns only
  when its transmit completes, i.e. when the target's *transport* ACKs it - and
  a target runs no transport while its handler runs, so a tell to a busy actor
  blocks for the rest of that handler. If the connection then closes without an
  ACK (kill -9), Thespian's source reschedules the transmit ``attempts * 35 s``
  later (``TRANSMIT_RETRY_PERIOD``, thespian/system/transport/__init__.py,
  ``_next_XMIT_4`` -> ``_next_XMIT_6``); a reconnect gets ``ECONNREFUSED``
  (``DeadTarget``). Measured here (loopback, 4.0.1): a tell to a kill -9'd actor
  failed in ~37 ms in every scenario tried (idle, mid-stream, busy-then-killed),
  the next one raises ``ActorSystemFailure``; the 35 s path was not reproduced.
  :class:`RuntimeRelay` is the mitigation for both: external code only ever
  talks to the relay (a live, system-owned actor) and the relay's sends are
  asynchronous, so a dead or busy target delays only the messages addressed to
  it (measured: relay flush 0.6 ms with a dead target in the batch).
* **Processes.** The TCP admin calls ``setsid`` and double-forks, so it outlives
  its starter; every actor it forks shares its session id.
  :func:`running_system` records that session and, on exit, shuts down, waits
  for the session to empty and kill -9s only processes of *that* session.
* **Logging.** In every multiprocess actor process Thespian replaces
  ``logging.root`` (and the logger manager) by a forwarder to its logger
  process, which writes :attr:`SystemConfig.log_file`. Loggers made before
  that - every ``logging.getLogger(__name__)`` of a module the starting
  process had imported, e.g. ``actors.exchange`` - still hang under the old
  root, so their records went to the inherited stderr, not to the log file.
  :class:`RuntimeActor` re-parents them onto the forwarder on its first
  message (:func:`adopt_module_loggers`).
"""

# Thespian dispatches on camelCase names (receiveMessage, receiveMsg_<Class>).
# ruff: noqa: N802

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Final, Literal

import attrs
from thespian.actors import ActorExitRequest, ActorSystem, ActorTypeDispatcher

__all__ = [
    "BASES",
    "DEFAULT_ADMIN_PORT",
    "LIFTED_RATE_THROTTLE",
    "RATE_THROTTLE_CAPABILITY",
    "THESPIAN_RATE_THROTTLE",
    "RELAY_GLOBAL_NAME",
    "Base",
    "RelayClient",
    "RuntimeActor",
    "RuntimeActorIdentity",
    "RuntimeEcho",
    "RuntimeLeakError",
    "RuntimeRelay",
    "RuntimeRelayAsk",
    "RuntimeRelayBatch",
    "RuntimeRelayStats",
    "RuntimeRelayStatsQuery",
    "RuntimeSink",
    "RuntimeSinkCount",
    "RuntimeSinkQuery",
    "RuntimeSystemError",
    "RuntimeWhoAreYou",
    "SystemConfig",
    "TrackedSystem",
    "adopt_module_loggers",
    "free_port",
    "lift_rate_throttle",
    "listening_sockets",
    "process_session",
    "rate_throttle",
    "running_system",
    "session_pids",
    "start_relay",
    "start_system",
    "stop_system",
    "tracked",
]

Base = Literal["simpleSystemBase", "multiprocTCPBase"]
BASES: Final[tuple[Base, ...]] = ("simpleSystemBase", "multiprocTCPBase")

DEFAULT_ADMIN_PORT: Final = 19500
#: Capability key carrying the per-process rate limit into every actor process.
RATE_THROTTLE_CAPABILITY: Final = "Emporion Rate Throttle"
#: "Unlimited": RateThrottle only starts measuring after 70 % of this many sends.
LIFTED_RATE_THROTTLE: Final = 1_000_000_000
#: Global name of the system-owned relay (one per actor system).
RELAY_GLOBAL_NAME: Final = "emporion.runtime.relay"


def _thespian_rate_throttle() -> int:
    from thespian.system import systemCommon

    return int(systemCommon.RATE_THROTTLE)


#: Thespian's own per-process limit (4480 msgs/s in 4.0.1), read at import.
THESPIAN_RATE_THROTTLE: Final = _thespian_rate_throttle()

_TCP: Final = "multiprocTCPBase"
_ANY_ADDRESSES: Final = frozenset({"", "0.0.0.0"})


class RuntimeSystemError(RuntimeError):
    """An actor system could not be started, found or stopped as asked."""


class RuntimeLeakError(RuntimeSystemError):
    """Processes of a stopped actor system were still alive (they have been killed)."""


# ---------------------------------------------------------------------------
# Configuration


@attrs.frozen(kw_only=True)
class SystemConfig:
    """How to start one actor system.

    Attributes:
        base: ``"simpleSystemBase"`` (embedded, all actors in the calling thread)
            or ``"multiprocTCPBase"`` (a process per actor, pickle over TCP).
        admin_port: TCP port of the admin (``multiprocTCPBase`` only).
        bind: Address every TCP socket binds *and* advertises. The transport is
            pickle: whoever can connect can execute code, so keep 127.0.0.1
            unless the system joins a convention on a trusted private network.
            ``"0.0.0.0"`` restores Thespian's own behaviour (bind all
            interfaces, advertise the default-route address).
        log_file: Where actor ``logging`` records go (multiprocess bases; the
            embedded base leaves logging to the host process). Thespian's
            internal log goes next to it, suffixed ``.thespian``. ``None`` keeps
            Thespian's defaults (stderr, ``$TMPDIR/thespian.log``).
        lift_rate_throttle: Lift Thespian's per-process 4480 msgs/s limiter.
        rate_limit: The limit to install when lifting (``None``: effectively
            unlimited, :data:`LIFTED_RATE_THROTTLE`).
        convention_address: ``"host:port"`` of a convention leader to join.
    """

    base: Base = "simpleSystemBase"
    admin_port: int = DEFAULT_ADMIN_PORT
    bind: str = "127.0.0.1"
    log_file: str | None = None
    lift_rate_throttle: bool = True
    rate_limit: int | None = None
    convention_address: str | None = None

    @property
    def is_tcp(self) -> bool:
        """Whether this is a multi-process TCP system."""
        return self.base == _TCP

    @property
    def effective_rate_limit(self) -> int | None:
        """The per-process limit actors must install, or ``None`` to leave Thespian's."""
        if not self.lift_rate_throttle:
            return None
        return LIFTED_RATE_THROTTLE if self.rate_limit is None else self.rate_limit

    def capabilities(self) -> dict[str, Any]:
        """The capabilities dict for ``ActorSystem(base, capabilities)``.

        Thespian reads ``Admin Port`` and ``Convention Address.IPv4`` from it;
        the bind/advertised address is *not* a capability in 4.0.1 (it is the
        ``THESPIAN_BASE_IPADDR`` env var plus the bind patch applied by
        :func:`start_system`). The rate limit travels as
        :data:`RATE_THROTTLE_CAPABILITY` so actor processes can apply it.

        Returns:
            A fresh dict (Thespian mutates the one it is given).
        """
        caps: dict[str, Any] = {}
        if self.is_tcp:
            caps["Admin Port"] = self.admin_port
            # Thespian's default, pinned: the bind patch and the lifted
            # throttle reach actor processes by fork inheritance.
            caps["Process Startup Method"] = "fork"
            if self.convention_address:
                caps["Convention Address.IPv4"] = self.convention_address
        limit = self.effective_rate_limit
        if limit is not None:
            caps[RATE_THROTTLE_CAPABILITY] = limit
        return caps

    def thespian_log_file(self) -> str | None:
        """Path of Thespian's internal log (``thesplog``), derived from :attr:`log_file`."""
        if self.log_file is None:
            return None
        return str(Path(self.log_file).with_suffix(".thespian.log"))

    def log_defs(self) -> dict[str, Any] | Literal[False] | None:
        """The ``logDefs`` for ``ActorSystem``.

        Returns:
            ``False`` for the embedded base (never reconfigure the host
            process's logging), a dictConfig routing everything to
            :attr:`log_file` for the multiprocess base, or ``None`` for
            Thespian's default.
        """
        if not self.is_tcp:
            return False
        if self.log_file is None:
            return None
        return {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "plain": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"}
            },
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "filename": self.log_file,
                    "formatter": "plain",
                    "level": "INFO",
                }
            },
            "root": {"handlers": ["file"], "level": "INFO"},
        }


# ---------------------------------------------------------------------------
# Process-wide Thespian adjustments


def rate_throttle() -> int:
    """The rate limit Thespian will give the next governor created in this process."""
    from thespian.system import systemCommon

    return int(systemCommon.RATE_THROTTLE)


class FifoSends(deque[Any]):
    """``simpleSystemBase``'s queue of pending sends as a deque.

    Thespian keeps it in a list and takes the next message with ``pop(0)``, which
    moves every message behind it: a pass that queues a thousand batches at once
    (the embedded link's fan-out, see ``EngineLink.send``) paid that for each of
    them. Measured with bench/gateway.py's private push: +20 % events/s at 100
    connections. Thespian only appends, iterates, tests truth and pops the head.
    """

    def pop(self, index: int = -1) -> Any:
        if index == 0:
            return self.popleft()
        if index == -1:
            return super().pop()
        raise IndexError("FifoSends pops only at its ends")


def _fifo_sends(asys: Any) -> None:
    """Give a ``simpleSystemBase`` system a :class:`FifoSends` queue (a no-op if
    Thespian's internals are not what this was written against)."""
    base: Any = getattr(asys, "_systemBase", None)
    pending = getattr(base, "_pendingSends", None)
    if type(pending) is list:
        base._pendingSends = FifoSends(pending)


def _quick_wakeup_check(asys: Any) -> None:
    """Make a ``simpleSystemBase`` system skip its wakeup scan when nothing is due.

    Before *every* delivery Thespian's ``_realizeWakeups`` partitions the list of
    pending wakeups with a lambda, a ``reduce`` and a view object per timer, due
    or not: 6 % of the engine's time with one order per pass (bench/actors.py
    --batch 1, cProfile). This first compares each timer's deadline with the
    clock Thespian uses (``ExpirationTimer._time_to_quit``, ``currentTime``) and
    calls the original only when one has expired, so what is delivered, and
    when, is unchanged. A no-op if Thespian's internals are not what this was
    written against.
    """
    from thespian.system import timing

    base: Any = getattr(asys, "_systemBase", None)
    realize = getattr(base, "_realizeWakeups", None)
    if realize is None or not isinstance(getattr(base, "_wakeUps", None), list):
        return
    now = timing.currentTime

    def realize_due() -> None:
        wakeups = base._wakeUps
        if not wakeups:
            return
        t = now()
        for wakeup in wakeups:
            due = getattr(wakeup[1], "_time_to_quit", 0.0)  # unknown shape: scan
            if due is not None and t >= due:
                realize()
                return

    base._realizeWakeups = realize_due


def _quiet_receive() -> None:
    """Replace ``simpleSystemBase.actor_base_receive`` (bound to each actor as it is
    created) by one that looks its logger up once: Thespian's calls
    ``logging.getLogger('Thespian')``, which takes the logging module's lock, and
    formats a debug call on every delivery (3 % of the engine's time with one
    order per pass, cProfile). The debug record is still made when that logger
    is enabled for DEBUG."""
    from thespian.system import simpleSystemBase

    if getattr(simpleSystemBase.actor_base_receive, "_emporion", False):
        return
    thespian_log = logging.getLogger("Thespian")

    def actor_base_receive(actor: Any, msg: Any, sender: Any) -> None:
        if thespian_log.isEnabledFor(logging.DEBUG):
            thespian_log.debug('Actor "%s" got message "%s" from "%s"', actor, msg, sender)
        actor.receiveMessage(msg, sender)

    actor_base_receive._emporion = True  # type: ignore[attr-defined]
    simpleSystemBase.actor_base_receive = actor_base_receive


def lift_rate_throttle(limit: int | None = None, actor: Any = None) -> int:
    """Lift (or set) Thespian's per-process send-rate limiter.

    Patches ``thespian.system.systemCommon.RATE_THROTTLE`` - read by every
    ``systemCommonBase.__init__`` (admin and actor managers) - so processes
    forked from here afterwards inherit it, and, when ``actor`` is a running
    multiprocess actor, replaces that process's already-built governor.

    Args:
        limit: Messages per second per process; ``None`` means effectively
            unlimited (:data:`LIFTED_RATE_THROTTLE`).
        actor: A Thespian actor instance whose own process governor should be
            replaced too (no effect under ``simpleSystemBase``, which has none).

    Returns:
        The limit now in force.
    """
    from thespian.system import systemCommon
    from thespian.system.ratelimit import RateThrottle

    value = LIFTED_RATE_THROTTLE if limit is None else int(limit)
    systemCommon.RATE_THROTTLE = value
    manager = getattr(actor, "_myRef", None) if actor is not None else None
    governor = getattr(manager, "_governer", None)
    if governor is not None and getattr(governor, "_maxRate", None) != value:
        manager._governer = RateThrottle(value)  # type: ignore[union-attr]
    return value


#: The logger manager of this process as imported (inherited by forked actors).
_IMPORT_LOG_MANAGER: Final = logging.Logger.manager


def adopt_module_loggers() -> int:
    """Re-parent loggers made before Thespian replaced this process's root logger.

    Thespian's actor processes swap ``logging.root`` and ``Logger.manager``
    for a forwarder to the system's logger; loggers that already existed (the
    module-level ``logging.getLogger(__name__)`` of every module imported
    before the fork) keep the old root as their parent and never reach the
    forwarder. A no-op where the root was not replaced (``simpleSystemBase``,
    external processes).

    Returns:
        How many loggers were re-parented.
    """
    old = _IMPORT_LOG_MANAGER
    if logging.Logger.manager is old or old.root is logging.root:
        return 0
    moved = 0
    for logger in list(old.loggerDict.values()):
        if isinstance(logger, logging.Logger) and logger.parent is old.root:
            logger.parent = logging.root
            moved += 1
    for logger in list(old.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            logger.manager = logging.Logger.manager
            cache = getattr(logger, "_cache", None)
            if isinstance(cache, dict):
                cache.clear()  # effective levels were cached along the old chain
    return moved


_BIND_STATE: dict[str, str | None] = {"address": None}


def _apply_bind(bind: str) -> None:
    """Make every Thespian TCP socket of this process (and its forks) bind ``bind``.

    ``THESPIAN_BASE_IPADDR`` picks the advertised address; the bind address of
    external-facing sockets is ``('', port)`` in ``IPActorAddress``, so the
    ``bindArgs`` property is replaced to substitute ``bind`` for ``''``.
    """
    from thespian.system.transport import IPBase

    if bind in _ANY_ADDRESSES:
        os.environ.pop("THESPIAN_BASE_IPADDR", None)
        _BIND_STATE["address"] = None
        return
    os.environ["THESPIAN_BASE_IPADDR"] = bind
    IPBase.thisSystem.add_local_addr(bind)
    _BIND_STATE["address"] = bind
    cls: Any = IPBase.IPActorAddress
    if not getattr(cls, "_emporion_bind_patched", False):

        def bind_args(self: Any) -> tuple[tuple[Any, ...]]:
            host, *rest = self.bindname
            chosen = _BIND_STATE["address"]
            if chosen is not None and host in _ANY_ADDRESSES:
                return ((chosen, *rest),)
            return (tuple(self.bindname),)

        cls.bindArgs = property(bind_args)
        cls._emporion_bind_patched = True


def _patch_tcp_close() -> None:
    """Make ``TCPTransport.close`` actually close its sockets.

    Thespian 4.0.1's ``TCPTransport._safeSocketShutdown`` guards on
    ``isinstance(socket.error, Exception)`` - always false, ``socket.error`` is
    a class - so ``close()`` drops the listening socket and never closes cached
    connections (``_openSockets``): every ``createActor``/``shutdown`` from an
    external handle leaks sockets to the garbage collector (ResourceWarning).
    The wrapper collects them before the original ``close`` and closes them
    after it.
    """
    from thespian.system.transport.TCPTransport import TCPTransport

    cls: Any = TCPTransport
    if getattr(cls, "_emporion_close_patched", False):
        return
    original = cls.close

    def close(self: Any) -> None:
        held: list[Any] = [getattr(self, "socket", None)]
        held += [getattr(h, "socket", None) for h in getattr(self, "_openSockets", {}).values()]
        held += [getattr(h, "socket", None) for h in getattr(self, "_transmitIntents", {}).values()]
        held += [getattr(h, "socket", None) for h in getattr(self, "_waitingTransmits", [])]
        try:
            original(self)
        finally:
            for sock in held:
                if isinstance(sock, socket.socket):
                    with contextlib.suppress(OSError):
                        sock.close()
            if hasattr(self, "_openSockets"):
                self._openSockets = {}

    cls.close = close
    cls._emporion_close_patched = True


def _apply_thespian_log(path: str | None) -> None:
    """Send Thespian's internal ``thesplog`` to ``path`` (this process and its forks)."""
    if path is None:
        return
    from thespian.system import utilis

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    os.environ["THESPLOG_FILE"] = path
    # thesplog caches the file name on first use: reset the cache.
    utilis._thesplog_file = path
    utilis._thesplog_old_file = path + ".old"


# ---------------------------------------------------------------------------
# /proc helpers (Linux): who listens where, which processes belong to a system


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _decode_ipv4(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    return socket.inet_ntop(socket.AF_INET, raw[::-1])


def _decode_ipv6(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listening_sockets(port: int) -> list[tuple[str, int, int]]:
    """Listening TCP sockets on ``port`` as ``(address, port, inode)`` from /proc/net."""
    found: list[tuple[str, int, int]] = []
    for table, decode in (("/proc/net/tcp", _decode_ipv4), ("/proc/net/tcp6", _decode_ipv6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            host_hex, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.append((decode(host_hex), port, inode))
    return found


def _pids_holding_inode(inode: int) -> list[int]:
    target = f"socket:[{inode}]"
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        pids.append(int(entry.name))
                        break
    return pids


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name: state ppid pgrp session ...
    return raw.rpartition(")")[2].split()


def process_session(pid: int) -> int | None:
    """The session id of ``pid`` (``None`` if it is gone)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[3])


def session_pids(session: int) -> list[int]:
    """Live (non-zombie) processes whose session id is ``session``."""
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and process_session(int(entry.name)) == session:
            pids.append(int(entry.name))
    return sorted(pids)


# ---------------------------------------------------------------------------
# Starting and stopping


@attrs.define
class TrackedSystem:
    """What :func:`start_system` learned about a system it started.

    Attributes:
        config: The configuration it was started with.
        admin_pid: OS pid of the TCP admin (``None`` for the embedded base).
        session: Session id shared by the admin and every actor it forked.
        listen: The admin's listening sockets ``(address, port, inode)``.
    """

    config: SystemConfig
    admin_pid: int | None = None
    session: int | None = None
    listen: list[tuple[str, int, int]] = attrs.field(factory=list)

    def live_pids(self) -> list[int]:
        """Processes of this system still alive (admin, logger, actors)."""
        if self.session is None:
            return []
        return [pid for pid in session_pids(self.session) if pid != os.getpid()]


_TRACKED: dict[int, TrackedSystem] = {}


def tracked(asys: Any) -> TrackedSystem | None:
    """The :class:`TrackedSystem` of a handle returned by :func:`start_system`."""
    return _TRACKED.get(id(asys))


def start_system(config: SystemConfig, *, attach: bool = False) -> Any:
    """Start an actor system (its own handle, never Thespian's process singleton).

    Args:
        config: What to start.
        attach: For TCP, accept an admin already listening on the port (its
            processes are then not ours: they are not tracked or killed).

    Returns:
        The ``thespian.actors.ActorSystem`` handle. It is not thread-safe: use
        one handle per thread.

    Raises:
        RuntimeSystemError: The TCP port is taken and ``attach`` is false, or
            the admin cannot be found after start.
    """
    if config.is_tcp:
        _patch_tcp_close()
        _apply_bind(config.bind)
        _apply_thespian_log(config.thespian_log_file())
        if config.log_file is not None:
            Path(config.log_file).parent.mkdir(parents=True, exist_ok=True)
        existing = listening_sockets(config.admin_port)
        if existing and not attach:
            raise RuntimeSystemError(
                f"port {config.admin_port} already has a listener {existing}; "
                "stop it or pass attach=True"
            )
    limit = config.effective_rate_limit
    # Not lifting means Thespian's own limit, even if an earlier start lifted it.
    lift_rate_throttle(THESPIAN_RATE_THROTTLE if limit is None else limit)
    asys = ActorSystem(
        config.base, config.capabilities(), logDefs=config.log_defs(), transientUnique=True
    )
    info = TrackedSystem(config=config)
    if config.base == "simpleSystemBase":
        _fifo_sends(asys)
        _quick_wakeup_check(asys)
        _quiet_receive()
    if config.is_tcp:
        info.listen = listening_sockets(config.admin_port)
        holders = [pid for _, _, inode in info.listen for pid in _pids_holding_inode(inode)]
        if not holders:
            asys.shutdown()
            raise RuntimeSystemError(f"no process listens on admin port {config.admin_port}")
        info.admin_pid = min(holders)
        info.session = process_session(info.admin_pid)
    _TRACKED[id(asys)] = info
    return asys


def stop_system(
    target: Any, *, grace: float = 5.0, kill_leftovers: bool = True
) -> list[int]:
    """Shut an actor system down and make sure none of its processes remain.

    Args:
        target: A handle from :func:`start_system`, or a :class:`SystemConfig`
            of a running TCP system (attached to, then shut down).
        grace: Seconds to wait for the system's processes to exit after the
            admin confirmed the shutdown.
        kill_leftovers: kill -9 processes of the system's session still alive
            after ``grace`` (only processes of the session recorded at start).

    Returns:
        The pids that had to be killed (empty on a clean shutdown).
    """
    if isinstance(target, SystemConfig):
        if not target.is_tcp or not listening_sockets(target.admin_port):
            return []
        target = start_system(target, attach=True)
    info = _TRACKED.pop(id(target), None)
    _exit_in_process_actors(target)
    target.shutdown()
    if info is None or info.session is None:
        return []
    deadline = time.monotonic() + grace
    while info.live_pids() and time.monotonic() < deadline:
        time.sleep(0.01)
    leftovers = info.live_pids()
    if kill_leftovers:
        for pid in leftovers:
            if process_session(pid) == info.session:  # re-check: never a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    return leftovers


def _exit_in_process_actors(asys: Any) -> None:
    """Give each top-level actor of a simpleSystemBase its ``ActorExitRequest``.

    The multiproc bases send every actor an ``ActorExitRequest`` on shutdown; the
    simple base's ``shutdown()`` just drops them, so a host would never close its
    journal (the file stayed open and the WAL unchecked-pointed for the life of
    the process). Thespian passes the request on to each actor's children. Uses
    the simple base's registry; a base without one (the TCP handle) is left alone.
    """
    base = getattr(asys, "_systemBase", None)
    registry = getattr(base, "actorRegistry", None)
    if base is None or not isinstance(registry, dict):
        return
    internal = set(getattr(base, "_internalAddresses", ()))
    system = base.system.systemAddress
    tops = [
        ref.address
        for key, ref in list(registry.items())
        if key not in internal and getattr(ref, "instance", None) is not None
        and getattr(ref, "parent", None) == system
    ]
    for address in tops:
        with contextlib.suppress(Exception):  # shutting down regardless
            asys.tell(address, ActorExitRequest())


@contextlib.contextmanager
def running_system(
    config: SystemConfig | Base = "simpleSystemBase",
    *,
    log_dir: str | os.PathLike[str] | None = None,
    free_admin_port: bool = True,
    grace: float = 5.0,
) -> Iterator[Any]:
    """A started actor system that is always stopped, leaving no process behind.

    For ``multiprocTCPBase`` the admin port is replaced by a free one (unless
    ``free_admin_port`` is false), logs go to ``log_dir`` (a temporary
    directory if not given), and on exit every process of the system's
    session that survived the shutdown is killed by pid and reported.

    Args:
        config: A :class:`SystemConfig` or just a base name.
        log_dir: Directory for the actor and Thespian logs.
        free_admin_port: Pick a free port for the TCP admin.
        grace: Seconds the system's processes get to exit after the shutdown
            before they are killed and reported (see :func:`stop_system`).

    Yields:
        The ``ActorSystem`` handle (see :func:`tracked` for its processes).

    Raises:
        RuntimeLeakError: Processes survived the shutdown (they were killed).
    """
    if isinstance(config, str):
        config = SystemConfig(base=config)
    with contextlib.ExitStack() as stack:
        if config.is_tcp:
            if free_admin_port:
                config = attrs.evolve(config, admin_port=free_port())
            if config.log_file is None:
                directory = (
                    Path(log_dir)
                    if log_dir is not None
                    else Path(stack.enter_context(tempfile.TemporaryDirectory()))
                )
                config = attrs.evolve(config, log_file=str(directory / "actors.log"))
        asys = start_system(config)
        leftovers: list[int] = []
        try:
            yield asys
        finally:
            leftovers = stop_system(asys, grace=grace)
        if leftovers:
            raise RuntimeLeakError(f"killed surviving actor-system processes {leftovers}")


# ---------------------------------------------------------------------------
# Messages (top-level, picklable, project-unique names)


@attrs.frozen
class RuntimeWhoAreYou:
    """Ask any :class:`RuntimeActor` for its :class:`RuntimeActorIdentity`."""


@attrs.frozen
class RuntimeActorIdentity:
    """Who an actor is, where it runs, and the rate limit its process enforces.

    Attributes:
        pid: OS process id (the caller's own pid under ``simpleSystemBase``).
        address: ``str()`` of its Thespian address.
        kind: Actor class name (or :attr:`RuntimeActor.runtime_kind`).
        key: The entity key it hosts (symbol, user, shard), if any.
        rate_throttle: Max rate of its process's governor; ``None`` if the base
            has none (``simpleSystemBase``).
        module_rate_throttle: ``systemCommon.RATE_THROTTLE`` in its process.
    """

    pid: int
    address: str
    kind: str
    key: str | None = None
    rate_throttle: int | None = None
    module_rate_throttle: int | None = None


@attrs.frozen
class RuntimeRelayBatch:
    """Messages for the relay to forward: ``(target address, message)`` pairs, in order."""

    items: tuple[tuple[Any, Any], ...]


@attrs.frozen
class RuntimeRelayAsk:
    """Ask ``target`` through the relay; the target's reply comes back to the asker.

    The relay queues askers per target and hands each reply from that target
    to the oldest waiting asker (targets answer in order). A dead target only
    makes the asker's own ``ask`` time out.
    """

    target: Any
    message: Any


@attrs.frozen
class RuntimeRelayStatsQuery:
    """Ask a :class:`RuntimeRelay` how much it forwarded."""


@attrs.frozen
class RuntimeRelayStats:
    """Answer to :class:`RuntimeRelayStatsQuery`."""

    batches: int
    forwarded: int


@attrs.frozen
class RuntimeSinkQuery:
    """Ask a :class:`RuntimeSink` how many messages (and batched items) it took."""


@attrs.frozen
class RuntimeSinkCount:
    """Answer to :class:`RuntimeSinkQuery`."""

    messages: int
    items: int


# ---------------------------------------------------------------------------
# Actors


#: (actor class, message class) → the (class, handler name) pairs whose handlers
#: ActorTypeDispatcher would try, in its order (see :meth:`RuntimeActor.receiveMessage`).
_HANDLERS: dict[tuple[type, type], tuple[tuple[type, str], ...]] = {}


def _handlers(actor_cls: type, msg_cls: type) -> tuple[tuple[type, str], ...]:
    """ActorTypeDispatcher's lookup, done once: for each class of the message's MRO
    with a ``receiveMsg_<Name>`` on the actor, every class of the actor's MRO that has
    that attribute (Thespian calls each until one does not return SUPER). Pairs, not
    functions: the attribute is read at each call, so a handler replaced on its class
    (a test's monkeypatch) is the one called."""
    found: list[tuple[type, str]] = []
    for each in msg_cls.__mro__:
        name = "receiveMsg_" + each.__name__
        if hasattr(actor_cls, name):
            found += [(klass, name) for klass in actor_cls.__mro__ if hasattr(klass, name)]
    handlers = _HANDLERS[actor_cls, msg_cls] = tuple(found)
    return handlers


class RuntimeActor(ActorTypeDispatcher):  # type: ignore[misc]
    """Base of every Emporion actor shell.

    On its first message it installs the system's rate limit in its own
    process (see the module docstring), and it answers
    :class:`RuntimeWhoAreYou` so tests and fault injection can find its pid.
    """

    runtime_kind: ClassVar[str | None] = None
    runtime_key: str | None = None
    _runtime_ready: bool = False

    def receiveMessage(self, message: Any, sender: Any) -> Any:
        """Prepare the process once, then dispatch by message type.

        The dispatch is ``ActorTypeDispatcher.receiveMessage``'s, with its lookup
        cached per (actor class, message class): Thespian walks both classes' MROs,
        building ``receiveMsg_<Name>`` strings and calling ``hasattr`` on each, for
        every message. The handlers are tried in the same order, each until one
        returns something other than ``SUPER``; with none (or all ``SUPER``),
        ``receiveUnrecognizedMessage`` if the actor has it.
        """
        if not self._runtime_ready:
            self._runtime_ready = True
            self._runtime_prepare()
        handlers = _HANDLERS.get((type(self), type(message)))
        if handlers is None:
            handlers = _handlers(type(self), type(message))
        for klass, name in handlers:
            r = getattr(klass, name)(self, message, sender)
            if r != self.SUPER:
                return r
        unrecognized = getattr(self, "receiveUnrecognizedMessage", None)
        if unrecognized is not None:
            return unrecognized(message, sender)
        return None

    def _runtime_prepare(self) -> None:
        adopt_module_loggers()
        manager = getattr(self, "_myRef", None)
        capabilities = getattr(manager, "capabilities", None) or {}
        limit = capabilities.get(RATE_THROTTLE_CAPABILITY)
        if limit is not None:
            lift_rate_throttle(int(limit), actor=self)

    def runtime_identity(self) -> RuntimeActorIdentity:
        """This actor's identity, as sent in reply to :class:`RuntimeWhoAreYou`."""
        from thespian.system import systemCommon

        manager = getattr(self, "_myRef", None)
        governor = getattr(manager, "_governer", None)
        max_rate = getattr(governor, "_maxRate", None)
        return RuntimeActorIdentity(
            pid=os.getpid(),
            address=str(self.myAddress),
            kind=self.runtime_kind or type(self).__name__,
            key=self.runtime_key,
            rate_throttle=None if max_rate is None else int(max_rate),
            module_rate_throttle=None if governor is None else int(systemCommon.RATE_THROTTLE),
        )

    def receiveMsg_RuntimeWhoAreYou(self, message: RuntimeWhoAreYou, sender: Any) -> None:
        """Reply with :meth:`runtime_identity`."""
        self.send(sender, self.runtime_identity())

    def receiveMsg_ActorSystemMessage(self, message: Any, sender: Any) -> None:
        """Ignore system messages a subclass does not handle (never echo or count them)."""


class RuntimeRelay(RuntimeActor):
    """Forwards batches from outside the system so the outside never waits on a dead actor.

    External code tells the relay one :class:`RuntimeRelayBatch`; the relay's
    sends are asynchronous, so a dead target holds up only the messages
    addressed to it (inside the relay's transport, ~35 s, then dead letters)
    while the external handle - which only talks to the live relay - and all
    other targets keep flowing.
    """

    runtime_kind = "relay"

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0
        self.forwarded = 0
        # (target, askers waiting for its replies); addresses are not hashable.
        self.askers: list[tuple[Any, list[Any]]] = []

    def _askers_of(self, target: Any) -> list[Any] | None:
        for known, waiting in self.askers:
            if known == target:
                return waiting
        return None

    def receiveMsg_RuntimeRelayAsk(self, message: RuntimeRelayAsk, sender: Any) -> None:
        """Forward the question; remember who waits for the answer."""
        waiting = self._askers_of(message.target)
        if waiting is None:
            waiting = []
            self.askers.append((message.target, waiting))
        waiting.append(sender)
        self.send(message.target, message.message)

    def receiveMsg_PoisonMessage(self, message: Any, sender: Any) -> None:
        """A target's handler failed on an asked message: the asker gets the poison."""
        self.receiveUnrecognizedMessage(message, sender)

    def receiveUnrecognizedMessage(self, message: Any, sender: Any) -> None:
        """A reply from a target: hand it to the oldest asker of that target."""
        waiting = self._askers_of(sender)
        if waiting:
            self.send(waiting.pop(0), message)
            if not waiting:
                self.askers = [(t, w) for t, w in self.askers if w]

    def receiveMsg_RuntimeRelayBatch(self, message: RuntimeRelayBatch, sender: Any) -> None:
        """Forward every item, in order."""
        self.batches += 1
        for target, payload in message.items:
            self.send(target, payload)
        self.forwarded += len(message.items)

    def receiveMsg_RuntimeRelayStatsQuery(
        self, message: RuntimeRelayStatsQuery, sender: Any
    ) -> None:
        """Report the counters."""
        self.send(sender, RuntimeRelayStats(batches=self.batches, forwarded=self.forwarded))


def start_relay(asys: Any) -> Any:
    """The system's relay (created on first use, a global name makes it unique)."""
    return asys.createActor(RuntimeRelay, globalName=RELAY_GLOBAL_NAME)


class RelayClient:
    """Buffers external tells and hands them to a :class:`RuntimeRelay` in one batch.

    Args:
        asys: The (per-thread) ``ActorSystem`` handle.
        relay: Address of the relay (see :func:`start_relay`).
    """

    def __init__(self, asys: Any, relay: Any) -> None:
        self._asys = asys
        self._relay = relay
        self._pending: list[tuple[Any, Any]] = []

    def tell(self, target: Any, message: Any) -> None:
        """Queue ``message`` for ``target`` until :meth:`flush`."""
        self._pending.append((target, message))

    def flush(self) -> int:
        """Send everything queued as one batch; returns how many messages went."""
        if not self._pending:
            return 0
        batch, self._pending = tuple(self._pending), []
        self._asys.tell(self._relay, RuntimeRelayBatch(batch))
        return len(batch)


class RuntimeEcho(RuntimeActor):
    """Replies to every unrecognised message with the message itself (ping-pong ceilings)."""

    runtime_kind = "echo"

    def receiveUnrecognizedMessage(self, message: Any, sender: Any) -> None:
        """Echo."""
        self.send(sender, message)


class RuntimeSink(RuntimeActor):
    """Counts what it receives (one-way blast ceilings); answers :class:`RuntimeSinkQuery`."""

    runtime_kind = "sink"

    def __init__(self) -> None:
        super().__init__()
        self.messages = 0
        self.items = 0

    def receiveMsg_RuntimeSinkQuery(self, message: RuntimeSinkQuery, sender: Any) -> None:
        """Report the counters."""
        self.send(sender, RuntimeSinkCount(messages=self.messages, items=self.items))

    def receiveUnrecognizedMessage(self, message: Any, sender: Any) -> None:
        """Count one message; a tuple or list counts as that many items."""
        self.messages += 1
        self.items += len(message) if isinstance(message, (tuple, list)) else 1
