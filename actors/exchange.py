"""The Exchange: root supervisor, instrument registry and directory of every host.

Runs under the well-known global name :data:`EXCHANGE_NAME`. At boot it loads
the instrument registry, creates the router host and one book host per symbol
(and, when ``account_shards`` is set, that many account shard hosts); accounts
of the embedded placement are created on demand, one host per user. It keeps
the directory (symbol → book host, user → account host, gateways) and pushes
it to every host whenever it changes.

Supervision: when a host exits (``ChildActorExited``: a crash, a kill -9 of its
process, an injected fault) the Exchange re-creates it under the same host id;
the new host replays its journal stream before it takes new messages (its
:class:`~actors.host.HostInit` is the first message in its mailbox), resends
its last turn's outputs and sends a sequenced ``resync`` notice to the users
whose state it holds. Every other host then resends what the dead one had not
acknowledged.

Forwarding: a batch that comes through the Exchange (a fan-out link's whole
pass, split per host; items for accounts that did not exist yet) goes to each
host on the Exchange's own channel, numbered per host and kept until the host
acks it, like a host→host batch: a host killed before it journaled a forwarded
request gets the unacked ones again once it is re-created (duplicates are
dropped by their seq). Without it a gateway's request queued for a dying host
died with it and its client waited for an answer that never came. The
channel's name (``exchange@<boot time>``) is new at every boot of the
Exchange, since a new Exchange numbers from 1 again.

Journal preparation: before it creates any host, the Exchange opens the
journal once itself (creating the file, switching it to WAL and creating the
schema) and closes it. Hosts must never be the first to open a fresh journal
concurrently: switching a new SQLite file to WAL needs a read->write lock
upgrade, and SQLite answers a contended upgrade with ``SQLITE_BUSY`` at once -
``busy_timeout`` is not consulted, since waiting could deadlock - so under
load several hosts' ``HostInit`` failed with "database is locked". Opening a
journal that is already WAL with its schema needs no lock upgrade (no write
lock at all, see ``Journal._setup``).

A host that cannot start: Thespian retries a failing message once, then
returns it to the sender as a ``PoisonMessage``. For a :class:`HostInit` the
Exchange then replaces the host by a fresh process (up to
:data:`HOST_START_ATTEMPTS` processes in all - re-running a half-done
``HostInit`` in the same process is not idempotent); when the last one fails
too, a boot in progress is answered with :class:`ExchangeBootFailed` naming the
host and the error, instead of leaving the booter waiting for its timeout.
"""

# ruff: noqa: N802

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Final

import attrs
from thespian.actors import ActorExitRequest, PoisonMessage

from actors.host import (
    Directory,
    DirectoryUpdate,
    EngineAck,
    EngineBatch,
    EngineConfig,
    GatewayBatch,
    Host,
    HostInit,
    HostReady,
    SendChannel,
    account_host_id,
)
from actors.journal import Journal, JournalError
from actors.messages import Dest, Reply, ReplyTo
from actors.runtime import RuntimeActor
from protocol import ErrorCode

log = logging.getLogger(__name__)

EXCHANGE_NAME = "emporion-exchange"
#: Host processes the Exchange tries for one start of a host (each gets
#: Thespian's two tries at its ``HostInit``) before it gives up on it.
HOST_START_ATTEMPTS: Final = 3


@attrs.frozen(kw_only=True)
class ExchangeBoot:
    config: EngineConfig


@attrs.frozen(kw_only=True)
class ExchangeReady:
    directory: Directory
    recovered_turns: int


@attrs.frozen(kw_only=True)
class ExchangeBootFailed:
    """The answer to :class:`ExchangeBoot` when the engine cannot start.

    Attributes:
        host_id: The host that failed to start, or ``""`` when the Exchange
            itself could not prepare the journal.
        reason: The error (the last line of its traceback).
    """

    host_id: str
    reason: str

    def describe(self) -> str:
        if not self.host_id:
            return self.reason
        return (f"host {self.host_id} failed to start in {HOST_START_ATTEMPTS} processes: "
                f"{self.reason}")


@attrs.frozen(kw_only=True)
class ExchangeOpenAccount:
    """Make sure ``user`` has an account host; answered with the directory."""

    user: str


@attrs.frozen(kw_only=True)
class GatewayRegister:
    """The sender is gateway ``gateway_id``: replies, deliveries and market data go there."""

    gateway_id: str


@attrs.frozen(kw_only=True)
class GatewayUnregister:
    gateway_id: str


@attrs.frozen(kw_only=True)
class ExchangeDirectoryQuery:
    pass


@attrs.frozen(kw_only=True)
class ExchangeStatusQuery:
    pass


@attrs.frozen(kw_only=True)
class ExchangeStatus:
    hosts: tuple[tuple[str, str, int], ...]  # (host id, kind, restarts)
    directory: Directory


@attrs.frozen(kw_only=True)
class ExchangeStop:
    """Stop supervising (a shutdown is coming): exits are no longer restarts."""


class Exchange(RuntimeActor):
    """The root supervisor; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config: EngineConfig | None = None
        self.directory = Directory()
        self.kinds: dict[str, tuple[str, str]] = {}  # host id → (kind, key)
        self.restarts: dict[str, int] = {}
        self._booters: list[Any] = []
        self._boot_failed: ExchangeBootFailed | None = None
        self._awaiting: set[str] = set()
        # host id -> processes that failed its current start (reset when it is ready)
        self._start_failures: dict[str, int] = {}
        self._recovered = 0
        self._stopping = False
        # The forwarding channel (see the module docstring): its name, the last seq
        # per host and the batches a host has not acked yet.
        self._forwarding = SendChannel(f"exchange@{time.time_ns():x}")

    # -- boot -------------------------------------------------------------------------

    def receiveMsg_ExchangeBoot(self, msg: ExchangeBoot, sender: Any) -> None:
        if self._boot_failed is not None:
            self.send(sender, self._boot_failed)
            return
        if self.config is not None:
            if self._awaiting:
                self._booters.append(sender)  # answered together with the first booter
            else:
                self.send(sender, ExchangeReady(directory=self.directory, recovered_turns=0))
            return
        self.config = msg.config
        try:
            streams = self._prepare_journal()
        except (JournalError, OSError, sqlite3.Error) as exc:
            failed = ExchangeBootFailed(host_id="", reason=(
                f"cannot open the journal in {msg.config.data_dir}: "
                f"{type(exc).__name__}: {exc}"))
            log.error("%s", failed.reason)
            self._boot_failed = failed
            self.send(sender, failed)
            return
        self._booters = [sender]
        instruments = msg.config.instruments()
        hosts: dict[str, Any] = {}
        books = {}
        for symbol in instruments:
            books[symbol] = f"book:{symbol}"
        shards = tuple(f"accounts:{i}" for i in range(msg.config.account_shards))
        self.kinds = {"router": ("router", "")}
        self.kinds.update({hid: ("book", sym) for sym, hid in books.items()})
        self.kinds.update({hid: ("account", "") for hid in shards})
        for hid in self.kinds:
            hosts[hid] = self.createActor(Host)
        self.directory = Directory(hosts=hosts, books=books, router="router",
                                   account_shards=shards, exchange=self.myAddress)
        # Recover the one-user account hosts a previous run created (same data dir).
        if not msg.config.account_shards:
            for stream in streams:
                if not stream.startswith("host:account:"):
                    continue
                user = stream.removeprefix("host:account:")
                hid = f"account:{user}"
                self.kinds[hid] = ("account", user)
                hosts[hid] = self.createActor(Host)
                self.directory.accounts[user] = hid
        self._awaiting = set(self.kinds)
        for hid in self.kinds:
            self._init(hid, restarted=False)

    def _prepare_journal(self) -> list[str]:
        """Open (creating) the journal once, before any host does; returns its streams.

        Leaves the file in WAL mode with its schema, so the hosts that open it
        concurrently next never need the lock upgrade SQLite refuses without
        waiting (see the module docstring).
        """
        assert self.config is not None
        if self.config.data_dir is None:
            return []
        with Journal.open(Path(self.config.data_dir), fsync=self.config.fsync) as journal:
            return journal.streams()

    def _init(self, host_id: str, *, restarted: bool) -> None:
        assert self.config is not None
        kind, key = self.kinds[host_id]
        self.send(self.directory.hosts[host_id], HostInit(
            host_id=host_id, kind=kind, key=key, config=self.config,
            directory=self.directory, restarted=restarted))

    def receiveMsg_HostReady(self, msg: HostReady, sender: Any) -> None:
        if msg.discarded:
            log.warning("host %s discarded a torn journal tail: %s", msg.host_id, msg.discarded)
        self._start_failures.pop(msg.host_id, None)
        if msg.host_id in self._awaiting:
            self._awaiting.discard(msg.host_id)
            self._recovered += msg.recovered_turns
            if not self._awaiting:
                ready = ExchangeReady(directory=self.directory, recovered_turns=self._recovered)
                for booter in self._booters:
                    self.send(booter, ready)
                self._booters = []

    def receiveMsg_PoisonMessage(self, msg: PoisonMessage, sender: Any) -> None:
        """A host failed its :class:`HostInit` twice: start it anew, or give up on it."""
        init = msg.poisonMessage
        if not isinstance(init, HostInit) or self._stopping:
            return
        hid = init.host_id
        if self.directory.hosts.get(hid) != sender:
            return  # from a host process that was already replaced
        failures = self._start_failures.get(hid, 0) + 1
        self._start_failures[hid] = failures
        reason = _last_line(msg.details) or "its HostInit failed"
        if failures < HOST_START_ATTEMPTS:
            log.warning("host %s failed to start (%s); starting it in a new process "
                        "(attempt %d of %d)", hid, reason, failures + 1, HOST_START_ATTEMPTS)
            self.send(sender, ActorExitRequest())
            self.directory.hosts[hid] = self.createActor(Host)
            self._init(hid, restarted=init.restarted)
            # Peers may have sent to the failed process: they resend to the new one.
            self._broadcast(restarted=(hid,))
            return
        log.error("host %s failed to start in %d processes, giving up: %s",
                  hid, failures, reason)
        if hid in self._awaiting and self._booters:
            failed = ExchangeBootFailed(host_id=hid, reason=reason)
            self._boot_failed = failed
            for booter in self._booters:
                self.send(booter, failed)
            self._booters = []

    # -- directory ----------------------------------------------------------------------

    def _broadcast(self, restarted: tuple[str, ...] = (), *, new_accounts: bool = False) -> None:
        """Send every host the new directory (and resend the forwarding channel's unacked
        batches to the ``restarted`` hosts).

        ``new_accounts``: the change is only account hosts created, and the one-user
        account hosts do not get it (they never send to another account); books (which
        do), the router and account shards do. Telling every account
        host about every new one made opening N accounts cost N²/2 messages (1,000
        accounts: 4.4 s on the embedded engine). An account host still gets the whole
        directory in its HostInit and with every other change (gateways, restarts).
        """
        self.directory = attrs.evolve(self.directory, generation=self.directory.generation + 1)
        update = DirectoryUpdate(directory=self.directory, restarted=restarted)
        kinds = self.kinds
        for hid, addr in self.directory.hosts.items():
            kind, key = kinds[hid]
            if new_accounts and kind == "account" and key:  # a one-user account host
                continue
            self.send(addr, update)
        if restarted:  # attached gateways' links resend what the host had not acked
            for addr in self.directory.gateways.values():
                self.send(addr, update)
        # After its HostInit: what it had not acked, again.
        self._forwarding.resend(restarted, self.directory.hosts, self.send)

    def _ensure_account(self, user: str) -> bool:
        """Create ``user``'s host if the placement needs one; True when it was created."""
        if account_host_id(self.directory, user) is not None:
            return False
        hid = f"account:{user}"
        self.kinds[hid] = ("account", user)
        self.directory.hosts[hid] = self.createActor(Host)
        self.directory.accounts[user] = hid
        self._init(hid, restarted=False)
        return True

    def receiveMsg_ExchangeOpenAccount(self, msg: ExchangeOpenAccount, sender: Any) -> None:
        if self._ensure_account(msg.user):
            self._broadcast(new_accounts=True)
        self.send(sender, self.directory)

    def receiveMsg_EngineBatch(self, batch: EngineBatch, sender: Any) -> None:
        """Split a batch per host and forward it: a fan-out link's whole pass (see
        ``EngineLink.send``), or items for accounts that did not exist yet (created
        here first)."""
        created = False
        per_host: dict[str, list[tuple[Dest, Any]]] = {}
        for dest, item in batch.items:
            if dest.kind == "account":
                created |= self._ensure_account(dest.key)
                hid = account_host_id(self.directory, dest.key)
            elif dest.kind == "book":
                hid = self.directory.books.get(dest.key)
            else:
                hid = self.directory.router
            if hid is not None:
                per_host.setdefault(hid, []).append((dest, item))
            else:
                self._unroutable(dest, item)
        if created:
            self._broadcast(new_accounts=True)
        for hid, items in per_host.items():
            self._forward(hid, tuple(items))

    def _forward(self, hid: str, items: tuple[tuple[Dest, Any], ...]) -> None:
        """Send ``items`` to host ``hid`` as the next batch of the forwarding channel,
        kept until the host acks it (see the module docstring)."""
        self.send(self.directory.hosts[hid], self._forwarding.batch(hid, items))

    def receiveMsg_EngineAck(self, ack: EngineAck, sender: Any) -> None:
        """A host committed the forwarded batches up to ``ack.seq``: forget them."""
        self._forwarding.acked(ack)

    def _unroutable(self, dest: Dest, item: Any) -> None:
        """An item for a book this engine does not have (the gateway checks symbols
        first, so this is a client of the link that did not): the requester gets an
        ``unknown_symbol`` error instead of silence."""
        log.warning("no host for %s:%s; %s refused", dest.kind, dest.key, type(item).__name__)
        reply_to = getattr(item, "reply_to", None)
        gateway = None if reply_to is None else self.directory.gateways.get(reply_to.gateway)
        if isinstance(reply_to, ReplyTo) and gateway is not None:
            self.send(gateway, GatewayBatch(items=(Reply(
                reply_to=reply_to, ok=False, code=ErrorCode.UNKNOWN_SYMBOL.value,
                message=f"no {dest.kind} {dest.key} in this engine"),)))

    def receiveMsg_GatewayRegister(self, msg: GatewayRegister, sender: Any) -> None:
        self.directory.gateways[msg.gateway_id] = sender
        self._broadcast()
        self.send(sender, self.directory)

    def receiveMsg_GatewayUnregister(self, msg: GatewayUnregister, sender: Any) -> None:
        self.directory.gateways.pop(msg.gateway_id, None)
        self._broadcast()

    def receiveMsg_ExchangeDirectoryQuery(self, msg: Any, sender: Any) -> None:
        self.send(sender, self.directory)

    def receiveMsg_ExchangeStatusQuery(self, msg: Any, sender: Any) -> None:
        rows = tuple((hid, kind, self.restarts.get(hid, 0))
                     for hid, (kind, _) in sorted(self.kinds.items()))
        self.send(sender, ExchangeStatus(hosts=rows, directory=self.directory))

    # -- supervision ----------------------------------------------------------------------

    def receiveMsg_ChildActorExited(self, msg: Any, sender: Any) -> None:
        if self._stopping:
            return
        dead = msg.childAddress
        hid = next((h for h, a in self.directory.hosts.items() if a == dead), None)
        if hid is None:
            return
        log.warning("host %s exited; re-creating it from its journal", hid)
        self.restarts[hid] = self.restarts.get(hid, 0) + 1
        self.directory.hosts[hid] = self.createActor(Host)
        self._init(hid, restarted=True)
        self._broadcast(restarted=(hid,))

    def receiveMsg_ExchangeStop(self, msg: ExchangeStop, sender: Any) -> None:
        self._stopping = True
        self.send(sender, msg)

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: Any) -> None:
        self._stopping = True


def _last_line(details: Any) -> str:
    """The last non-empty line of a traceback text (the exception itself), if any."""
    lines = [line.strip() for line in str(details or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


__all__ = [
    "EXCHANGE_NAME",
    "HOST_START_ATTEMPTS",
    "Exchange",
    "ExchangeBoot",
    "ExchangeBootFailed",
    "ExchangeDirectoryQuery",
    "ExchangeOpenAccount",
    "ExchangeReady",
    "ExchangeStatus",
    "ExchangeStatusQuery",
    "ExchangeStop",
    "GatewayRegister",
    "GatewayUnregister",
]
