"""Booting the engine and talking to it from outside the actor system.

:func:`boot_engine` starts (or attaches to) the Exchange under its global name
and waits until every host has recovered from the journal. :class:`EngineLink`
is one external party (a gateway, a test, a tool): it registers as a gateway,
sends requests as batches per host and receives replies, private deliveries
and market data with :meth:`EngineLink.receive`.

One link per thread: Thespian's external ``ActorSystem`` handle is not
thread-safe (ARCHITECTURE.md measured 1,407 of 1,600 replies mismatched with 16
threads sharing one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import attrs
from thespian.actors import ActorSystemFailure

from actors.exchange import (
    EXCHANGE_NAME,
    Exchange,
    ExchangeBoot,
    ExchangeBootFailed,
    ExchangeDirectoryQuery,
    ExchangeOpenAccount,
    ExchangeReady,
    GatewayRegister,
    GatewayUnregister,
)
from actors.host import (
    LINK_ORIGIN_PREFIX,
    Directory,
    DirectoryUpdate,
    EngineAck,
    EngineBatch,
    EngineConfig,
    GatewayBatch,
    SendChannel,
)
from actors.host import account_host_id as _account_host_id
from actors.messages import Dest, RouterAttach
from actors.runtime import RuntimeRelayBatch, start_relay

log = logging.getLogger(__name__)

#: A link that could not deliver to a host (a ``kill -9``'d one refuses the
#: connection) tries its outbox for that host again after this long, unless the
#: Exchange's announcement of the host's successor comes first.
RETRY_UNDELIVERED_S = 1.0


class EngineError(RuntimeError):
    """The engine did not answer as expected (not booted, timed out)."""


@attrs.frozen(kw_only=True)
class BooksRestarted:
    """The books whose host was re-created: what an :class:`EngineLink` hands out, in
    the stream of received messages, when the Exchange announces the restart.

    Market data the old incarnation sent and nobody received is gone with it (a
    ``kill -9`` loses the sends still in its process), and subscribers' books may
    miss those changes. A gateway answers this with a fresh snapshot to every
    subscriber of each book (see docs/protocol.md, *Market frames*).
    """

    symbols: tuple[str, ...]


def boot_engine(asys: Any, config: EngineConfig, *, timeout: float = 60.0) -> ExchangeReady:
    """Create the Exchange (global name) and boot it; returns when every host is ready.

    Raises:
        EngineError: The Exchange reported that a host (or the journal) cannot
            start (:class:`~actors.exchange.ExchangeBootFailed`, at once), or
            nothing answered within ``timeout`` seconds.
    """
    exchange = asys.createActor(Exchange, globalName=EXCHANGE_NAME)
    ready = asys.ask(exchange, ExchangeBoot(config=config), timedelta(seconds=timeout))
    if isinstance(ready, ExchangeBootFailed):
        raise EngineError(ready.describe())
    if ready is None:
        raise EngineError(f"not every host reported ready within {timeout:g} s")
    if not isinstance(ready, ExchangeReady):
        raise EngineError(f"the exchange did not boot: {ready!r}")
    return ready


def exchange_address(asys: Any) -> Any:
    return asys.createActor(Exchange, globalName=EXCHANGE_NAME)


class EngineLink:
    """One external party's connection to a booted engine.

    Args:
        asys: this thread's ``ActorSystem`` handle.
        gateway_id: the name replies and deliveries are addressed to.
        fanout: send each :meth:`send` call's requests as one batch to the Exchange,
            which splits it per host in one turn (the embedded deployment; see
            :meth:`send`), instead of one ``tell`` per host.

    Without ``fanout`` (an attached gateway) the link's batches to each host are a
    channel like a host's: numbered per host (the channel is named anew for each
    link) and kept in its :attr:`channel`'s outbox until the host acks them; when the Exchange
    says a host was re-created (a ``DirectoryUpdate`` naming it, sent to the
    gateways too) the link sends it what it had not acked, so a request queued
    for a host that died before journaling it is not lost. (With ``fanout`` the
    Exchange's own forwarding channel does this.)
    """

    def __init__(self, asys: Any, gateway_id: str, *, timeout: float = 10.0,
                 fanout: bool = False) -> None:
        self.asys = asys
        self.gateway_id = gateway_id
        self.fanout = fanout
        self.origin = f"{LINK_ORIGIN_PREFIX}{gateway_id}"
        #: The numbered channel of this link's batches (see the class docstring).
        self.channel = SendChannel(f"{self.origin}@{time.time_ns():x}")
        self.exchange = exchange_address(asys)
        self._timeout = timedelta(seconds=timeout)
        self.backlog: list[Any] = []
        #: The GatewayBatch channels of the hosts' current incarnations (see
        #: :meth:`_in_order`): per channel the next seq to hand out and the batches
        #: that came early; per host id its current channel.
        self._channels: dict[str, list[Any]] = {}
        self._incarnation: dict[str, str] = {}
        #: Hosts a tell to failed → when to try their outbox again (see :meth:`_forward`).
        self._undelivered: dict[str, float] = {}
        #: The system's relay, which an attached link sends its batches through (see
        #: :meth:`_forward`); made on the first send.
        self._relay: Any = None
        self.directory = self._ask_directory(GatewayRegister(gateway_id=gateway_id))

    def _ask_directory(self, msg: Any) -> Directory:
        """Ask the Exchange; whatever else reaches this address meanwhile (replies,
        deliveries, market data for this gateway) is kept for :meth:`receive`,
        since an external ``ask`` returns the first message that arrives."""
        deadline = time.monotonic() + self._timeout.total_seconds()
        got = self.asys.ask(self.exchange, msg, self._timeout)
        while not isinstance(got, Directory):
            if got is None:
                raise EngineError(f"the exchange did not answer {type(msg).__name__}")
            self._keep(got)
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineError(f"the exchange did not answer {type(msg).__name__}")
            got = self.asys.listen(timedelta(seconds=left))
        return got

    def _keep(self, msg: Any) -> None:
        if isinstance(msg, GatewayBatch):
            self.backlog.extend(self._in_order(msg))
        elif not self._control(msg, self.backlog):
            self.backlog.append(msg)

    def _in_order(self, batch: GatewayBatch) -> Sequence[Any]:
        """The items ``batch`` lets through: its own and those of batches held for it.

        A host's batches to this gateway are handed out in the order the host sent
        them, per incarnation (see :class:`~actors.host.GatewayBatch`). Under
        multiprocTCPBase they can arrive out of order, and market data applied out
        of order is a wrong book at every subscriber (a simulation with real kills
        saw a monitor's book crossed for 20-160 frames). A batch past a gap waits
        for the gap. When a host's next incarnation speaks, what its previous one
        left waiting (a gap that died with it) goes out first, in order; a late
        batch of an older incarnation goes out as it comes.
        """
        if not batch.seq:
            return batch.items
        state = self._channels.get(batch.origin)
        if state is not None and batch.seq == state[0] and not state[1]:
            state[0] += 1  # the usual case: next in line, nothing held
            return batch.items
        return self._in_order_slow(batch, state)

    def _in_order_slow(self, batch: GatewayBatch, state: list[Any] | None) -> list[Any]:
        out: list[Any] = []
        if state is None:  # a channel not seen yet: a host's new incarnation
            host, _, born = batch.origin.rpartition("@")
            current = self._incarnation.get(host)
            if current is not None:
                if int(born, 16) < int(current.rpartition("@")[2], 16):
                    return list(batch.items)  # from a dead incarnation, overtaken
                held = self._channels.pop(current)[1]
                for seq in sorted(held):  # what the previous incarnation left waiting
                    out.extend(held[seq])
            self._incarnation[host] = batch.origin
            state = self._channels[batch.origin] = [1, {}]
        nxt, held = state
        if batch.seq >= nxt:
            held[batch.seq] = batch.items
        while nxt in held:
            out.extend(held.pop(nxt))
            nxt += 1
        state[0] = nxt
        return out

    def _control(self, msg: Any, out: list[Any]) -> bool:
        """Apply an engine control message to this link; True if ``msg`` was one.

        An :class:`EngineAck` trims the acking host's outbox; a
        :class:`DirectoryUpdate` replaces the directory and resends the outbox of
        each host it names as re-created (its HostInit is already on its way, so
        the batches follow the recovery; those it journaled are dropped by seq),
        and appends a :class:`BooksRestarted` to ``out`` if any of them held books.
        """
        if isinstance(msg, EngineAck):
            self.channel.acked(msg)
            return True
        if isinstance(msg, DirectoryUpdate):
            self.directory = msg.directory
            for hid in msg.restarted:
                self._undelivered.pop(hid, None)
            self._forward([(hid, batch) for hid in msg.restarted
                           for batch in self.channel.outbox.get(hid, ())])
            if msg.restarted:
                symbols = tuple(sorted(sym for sym, hid in self.directory.books.items()
                                       if hid in msg.restarted))
                if symbols:
                    out.append(BooksRestarted(symbols=symbols))
            return True
        return isinstance(msg, Directory)

    def refresh(self) -> Directory:
        self.directory = self._ask_directory(ExchangeDirectoryQuery())
        return self.directory

    def open_account(self, user: str) -> None:
        """Make sure ``user``'s account host exists (the gateway does it at login).

        A user this link's directory already places needs no round trip (host ids
        are stable: a restarted host keeps its id): every login used to ask the
        Exchange, which answered with the whole directory — 18% of the embedded
        bridge thread with 1,000 users (py-spy)."""
        if _account_host_id(self.directory, user) is not None:
            return
        self.directory = self._ask_directory(ExchangeOpenAccount(user=user))

    def attach(self, user: str) -> None:
        """Open ``user``'s account and route the user's private events to this link."""
        self.open_account(user)
        self.send([(Dest("router"), RouterAttach(user=user, gateway=self.gateway_id))])

    def host_of(self, dest: Dest) -> str:
        d = self.directory
        if dest.kind == "book":
            return d.books[dest.key]
        if dest.kind == "router":
            return d.router
        hid = _account_host_id(d, dest.key)
        if hid is None:
            self.open_account(dest.key)
            hid = _account_host_id(self.directory, dest.key)
        assert hid is not None
        return hid

    def send(self, items: Iterable[tuple[Dest, Any]]) -> int:
        """Send requests, one batch per host; returns how many batches went out.

        With ``fanout`` the Exchange splits them per host instead (one message out of
        this thread, counted as one batch). Under ``simpleSystemBase`` every external
        ``tell`` runs all actors until nothing is left, so a ``tell`` per host ran one
        host's cascade to the end before the next host saw its requests: a book took
        one turn per account host of a pass. Split by the Exchange inside the system,
        every host's batch is queued at once, and with grouped turns (see
        :mod:`actors.host`) each host applies all it was sent in one turn.
        """
        if self.fanout:
            whole = tuple(items)
            if not whole:
                return 0
            self.asys.tell(self.exchange, EngineBatch(origin=self.origin, items=whole))
            return 1
        per_host: dict[str, list[tuple[Dest, Any]]] = {}
        for dest, item in items:
            per_host.setdefault(self.host_of(dest), []).append((dest, item))
        self._forward([(hid, self.channel.batch(hid, tuple(batch)))  # kept until acked
                       for hid, batch in per_host.items()])
        return len(per_host)

    def _forward(self, batches: Sequence[tuple[str, EngineBatch]]) -> None:
        """Send outbox batches ``(host id, batch)`` to their hosts, through the relay.

        A tell from outside the system waits for the target's transport: to a host
        that was just ``kill -9``'d it blocked the gateway's bridge thread for 35 s
        (Thespian's transmit retry; a multi-process faults simulation hit it in 1 of
        4 runs), or raised ``ActorSystemFailure`` (dead target), which ended the
        thread. The system's :class:`~actors.runtime.RuntimeRelay` is a live actor
        whose own sends are asynchronous, so a dead host holds up only what is
        addressed to it; the hosts' channel seqs keep the order. A batch the dead
        host never got stays in the outbox, which the Exchange's ``DirectoryUpdate``
        naming its successor sends again. If the relay itself cannot be told, the
        hosts' batches wait in the outbox (later ones behind them) and
        :meth:`receive` tries again after :data:`RETRY_UNDELIVERED_S`.
        """
        items: list[tuple[Any, EngineBatch]] = []
        hosts: list[str] = []
        for hid, batch in batches:
            addr = self.directory.hosts.get(hid)
            if hid in self._undelivered or addr is None:
                self._undelivered.setdefault(hid, time.monotonic() + RETRY_UNDELIVERED_S)
                continue
            items.append((addr, batch))
            hosts.append(hid)
        if not items:
            return
        try:
            if self._relay is None:
                self._relay = start_relay(self.asys)
            self.asys.tell(self._relay, RuntimeRelayBatch(items=tuple(items)))
        except ActorSystemFailure as exc:
            log.warning("engine link %s: the relay is unreachable (%s); %d batches wait",
                        self.gateway_id, exc, len(items))
            self._relay = None
            for hid in hosts:
                self._undelivered[hid] = time.monotonic() + RETRY_UNDELIVERED_S

    def _retry_undelivered(self) -> None:
        """Send again the outbox of each host whose retry time has come (see
        :meth:`_forward`)."""
        now = time.monotonic()
        due = [hid for hid, at in self._undelivered.items() if at <= now]
        for hid in due:
            del self._undelivered[hid]
        self._forward([(hid, batch) for hid in due
                       for batch in self.channel.outbox.get(hid, ())])

    def receive(self, timeout: float = 0.5) -> list[Any]:
        """Everything addressed to this gateway that arrives within ``timeout`` of the
        first message (replies, deliveries, market data, in arrival order)."""
        if self._undelivered:
            self._retry_undelivered()
        out = self.backlog
        self.backlog = []
        msg = self.asys.listen(timedelta(seconds=0.0 if out else timeout))
        while msg is not None:
            if isinstance(msg, GatewayBatch):
                out.extend(self._in_order(msg))
            elif not self._control(msg, out):
                out.append(msg)
            msg = self.asys.listen(timedelta(seconds=0.0 if out else timeout))
        return out

    def wait_for(self, predicate: Any, *, timeout: float = 10.0) -> list[Any]:
        """Receive until ``predicate(all received so far)`` is true; raises on timeout."""
        got: list[Any] = []
        deadline = time.monotonic() + timeout
        while not predicate(got):
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineError(f"timed out; received {len(got)} messages: {got[-5:]!r}")
            got += self.receive(min(left, 1.0))
        return got

    def close(self) -> None:
        self.asys.tell(self.exchange, GatewayUnregister(gateway_id=self.gateway_id))
