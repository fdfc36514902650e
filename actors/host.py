"""The host shell: one Thespian actor running one or more desks of one kind.

Placement is a boot option, not a second code path: the embedded deployment
starts one host per book, per account and for the router (literally an actor
per entity); the multi-process deployment starts one host per book, one for the
router and ``N`` account shards, each running many account desks, because a
process per user does not scale. The host code is the same.

One turn = one inbound :class:`EngineBatch` (or, with ``group_commit="pass"``,
every batch queued for the host when the turn starts: *grouped turns*, below):

1. drop it if its ``(origin, seq)`` was seen already (a resend after a restart);
2. hand every item to its desk (``handle``), then ``end_turn`` each touched desk;
3. **write ahead**: append the batch to the host's journal stream and commit
   (group commit: one transaction per turn) — only then
4. send the outputs, **one batch per destination**, and ack the batch to its
   sender (after the commit, so an acked batch is durable) — lazily: a channel
   is acked once :data:`ACK_EVERY` of its batches (or :data:`ACK_ITEMS` items)
   are applied and not yet acked, and at once when asked (*Acks*, below).

Grouped turns (embedded deployment): every host runs on one thread under
``simpleSystemBase``, which delivers messages in send order. A book, the router
or an account shard that receives a batch only queues it (after the channel
checks of step 1) and, if it has not yet, sends itself a :class:`HostGo`; that
arrives after every message already queued for the host, and its turn applies
all the batches queued since, journaled as one record (a tuple of batches), with
one ``end_turn`` per desk and one outbound batch per destination. A book that
used to take one turn per account host's batch takes one per round of a pass,
and so does the router. (A one-user account host gets one batch per round and
applies it at once.)

Transactional under Thespian's retry: a handler that raises is run again with
the same message. The outputs of an applied batch are cached by batch key
before anything can fail, and the journal records stay staged, so the re-run
commits and sends them without applying the batch twice. A desk that raises on
one item fails only that item (cores validate before they mutate): the item's
requester gets an ``internal`` error and the rest of the batch goes on.

Reliable delivery between hosts: every host→host batch carries a per-channel
``seq``; the sender keeps it in an outbox until the receiver acks it and
resends the outbox when the directory says the receiver was re-created. A
restarted host rebuilds its state by replaying its journal stream (from the
latest snapshot) — the desks are deterministic — asks each receiver for its ack
(:class:`EngineProbe`) and resends what that ack does not cover; receivers
deduplicate by ``(origin, seq)``.

Acks: an ack only trims the sender's outbox (what it names is durable at the
receiver); nothing but a recovered sender's probe waits for one. So a receiver
acks a channel lazily (acks were up to a third of the hosts' messages, one per
committed turn and origin): once the channel's applied-but-unacked batches
reach :data:`ACK_EVERY` or their items :data:`ACK_ITEMS`, which bounds every
outbox; at once for a resend (it names the applied prefix the sender lacks) and
for an :class:`EngineProbe`.
"""

# Thespian dispatches on camelCase names (receiveMsg_<Class>).
# ruff: noqa: N802

from __future__ import annotations

import logging
import os
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from thespian.actors import ActorSystemMessage

from actors.cores.router import RouterTimer
from actors.desks import AccountDesk, BookDesk, Out, RouterDesk
from actors.journal import Journal, JournalError
from actors.messages import BookSnapshotRequest, Dest, Reply, ReplyTo, RouterTick, UserEvent
from actors.runtime import RuntimeActor, RuntimeWhoAreYou
from protocol import ErrorCode, Instrument, parse_instruments

log = logging.getLogger(__name__)

#: Take a snapshot of a host's state at most every this many turns (bounds replay time)…
SNAPSHOT_EVERY = 2_000
#: …and only once the records journaled since the last snapshot add up to at least
#: this many times its size. A snapshot pickles the host's whole state: the router's
#: replay logs grow to megabytes (13 MB after 30,000 bench orders) and pickle ~4x
#: slower per byte than records. Measured (bench/actors.py workload, group_commit
#: pass, 30,000 orders): snapshot CPU 2.7-4.5 s of 13-14 s at factor 1 (every
#: 2,000 turns before: more), 0.9-2.5 s at 4; the router's restart and recovery
#: after that run took 4.0 s at factor 1 and 4.5 s at 4 (replay of at most about
#: four snapshots' worth of record bytes on top of loading the snapshot).
SNAPSHOT_BYTES_FACTOR = 4
#: Each snapshot turn also deletes (``Journal.compact``) the records and snapshots
#: that the *previous* snapshot covers: a stream keeps two snapshots and the records
#: after the older one, so recovery can fall back one snapshot if the newest is
#: damaged, and the journal stops growing with the traffic (freed SQLite pages are
#: reused). False keeps every record (the journal then grows for ever).
COMPACT_JOURNAL = True

#: A receiver acks a channel once this many of its batches are applied and not acked
#: (or :data:`ACK_ITEMS` of their items), not after every turn: acks only trim the
#: sender's outbox, so these bound each outbox (and the snapshot that holds it).
#: 1 acks every committed turn.
ACK_EVERY = 16
ACK_ITEMS = 256
#: Channels from these hosts are acked after every turn all the same. A book sends
#: to every account that trades: acked lazily, its outbox (and so its snapshot) held
#: up to ACK_EVERY - 1 batches per account. Measured with bench/gateway.py's 1,000
#: users: the book's snapshot grew from 0.26 MB / 12 ms to 1.29 MB / 229 ms, a
#: pause on the engine thread bigger than the router's chunked snapshot (78 ms).
EAGER_ACK_ORIGINS = ("book:",)
#: Channels from an attached gateway's link (``EngineLink``, origin ``gateway:...``) are
#: acked every this many batches and never for their item count: an ack to a link
#: outside the system is a message across the transport (multiprocTCPBase: a TCP
#: message to another process), and the link's outbox is in the gateway's memory,
#: not in any snapshot. Acked by ACK_EVERY / ACK_ITEMS, bench/actors.py's batched
#: multiprocTCPBase run (100 orders a batch, an ack every ~3 batches) lost 10-20 %.
LINK_ACK_EVERY = 64
#: How the origin of a link's channel begins (``EngineLink`` names it).
LINK_ORIGIN_PREFIX = "gateway:"

Desk = AccountDesk | BookDesk | RouterDesk


# -- messages ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class EngineConfig:
    """What every host needs to build its desks; travels in :class:`HostInit`."""

    instruments_toml: str
    data_dir: str | None = None
    fsync: str = "batch"
    replay_capacity: int = 10_000
    conflation_window_ns: int = 100_000_000
    account_shards: int = 0
    #: ``turn``: each host commits its journal every turn before it sends anything.
    #: ``pass``: hosts of one thread write into one transaction that the embedded
    #: bridge commits (``flush_shared``) before a pass's messages leave the process —
    #: only for ``simpleSystemBase``, where the bridge thread runs every host.
    group_commit: str = attrs.field(default="turn",
                                    validator=attrs.validators.in_(("turn", "pass")))

    def instruments(self) -> dict[str, Instrument]:
        return parse_instruments(self.instruments_toml)


@attrs.frozen(kw_only=True)
class Directory:
    """Where every entity lives. ``accounts`` maps user → host id (one host per user);
    with ``account_shards`` set, a user's host is ``shards[crc32(user) % n]``."""

    hosts: dict[str, Any] = attrs.field(factory=dict, hash=False)  # host id → address
    books: dict[str, str] = attrs.field(factory=dict, hash=False)  # symbol → host id
    router: str = "router"
    account_shards: tuple[str, ...] = ()
    accounts: dict[str, str] = attrs.field(factory=dict, hash=False)  # user → host id
    gateways: dict[str, Any] = attrs.field(factory=dict, hash=False)  # gateway id → address
    exchange: Any = None
    generation: int = 0


def account_host_id(directory: Directory, user: str) -> str | None:
    """The host id of ``user``'s account, or None when it does not exist yet."""
    if directory.account_shards:
        shards = directory.account_shards
        return shards[zlib.crc32(user.encode()) % len(shards)]
    return directory.accounts.get(user)


@attrs.frozen(kw_only=True)
class EngineBatch:
    """One turn's messages from ``origin`` to one host: ``items`` are ``(Dest, message)``.

    ``seq`` numbers the batches of the channel origin → this host (0: unsequenced,
    e.g. from a gateway, never deduplicated or acked).
    """

    origin: str
    seq: int = 0
    items: tuple[tuple[Dest, Any], ...]


@attrs.frozen
class HostGo:
    """A host's note to itself (grouped turns): apply the batches accepted so far."""


@attrs.frozen(kw_only=True)
class EngineAck:
    """``host`` committed every batch of the channel up to ``seq``."""

    host: str
    seq: int


class SendChannel:
    """The sending end of a numbered channel that is not a host (the Exchange's
    forwarding, an attached gateway's link): each batch to a host gets that host's
    next seq and stays in the outbox until the host acks it (a host's own channels
    keep their seqs and outboxes in its state, for its snapshots).

    Args:
        origin: the channel's name, as the receivers key it.
    """

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self._seq: dict[str, int] = {}
        self.outbox: dict[str, deque[EngineBatch]] = {}

    def batch(self, host: str, items: tuple[tuple[Dest, Any], ...]) -> EngineBatch:
        """The next batch to ``host``, numbered and kept until acked."""
        seq = self._seq.get(host, 0) + 1
        self._seq[host] = seq
        out = EngineBatch(origin=self.origin, seq=seq, items=items)
        self.outbox.setdefault(host, deque()).append(out)
        return out

    def acked(self, ack: EngineAck) -> None:
        """Forget the batches ``ack`` covers."""
        trim_outbox(self.outbox, ack)

    def resend(self, restarted: tuple[str, ...], hosts: Mapping[str, Any],
               send: Callable[[Any, EngineBatch], Any]) -> None:
        """Send each re-created host in ``restarted`` (its address in ``hosts``) what
        it has not acked, oldest first; it drops by seq what it journaled already."""
        for hid in restarted:
            addr = hosts.get(hid)
            if addr is not None:
                for batch in self.outbox.get(hid, ()):
                    send(addr, batch)


def trim_outbox(outbox: Mapping[str, deque[EngineBatch]],
                ack: EngineAck) -> deque[EngineBatch] | None:
    """Drop from ``outbox[ack.host]`` the batches ``ack`` covers; returns what is left
    (None when nothing was ever sent there)."""
    box = outbox.get(ack.host)
    while box and box[0].seq <= ack.seq:
        box.popleft()
    return box


@attrs.frozen(kw_only=True)
class EngineProbe:
    """A recovered host asks a receiver how far it applied the channel ``origin`` → it:
    answered at once by an :class:`EngineAck` (acks are otherwise lazy), after which
    the sender resends the rest of its outbox. Never journaled."""

    origin: str


@attrs.frozen(kw_only=True)
class HostInit:
    host_id: str
    kind: str  # "book" | "account" | "router"
    key: str = ""  # the book's symbol or the user of a one-user account host
    config: EngineConfig
    directory: Directory
    restarted: bool = False


@attrs.frozen(kw_only=True)
class HostReady:
    host_id: str
    recovered_turns: int
    discarded: tuple[int, ...] = ()


@attrs.frozen(kw_only=True)
class DirectoryUpdate:
    directory: Directory
    #: Host ids re-created since the last update: resend what they have not acked.
    restarted: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class HostResync:
    """Tell the users this host's state concerns that it was rebuilt (``resync``)."""

    ts: int
    reason: str


@attrs.frozen(kw_only=True)
class AccountResync:
    """Emit a sequenced ``system_notice`` of kind ``resync`` to ``user``."""

    user: str
    reason: str
    ts: int


@attrs.frozen(kw_only=True)
class HostFault:
    """Fault injection: ``raise_once`` (the next batch handler raises after applying,
    before its commit), ``commit_fails`` (the next journal commit fails), ``exit``
    (stop at once: no flush, memory discarded)."""

    mode: str


@attrs.frozen(kw_only=True)
class HostStatsQuery:
    pass


@attrs.frozen(kw_only=True)
class HostStats:
    host_id: str
    kind: str
    pid: int
    entities: int
    turns: int
    items: int
    outbox: int
    journal_offset: int
    restarted: bool


@attrs.frozen(kw_only=True)
class HostInspect:
    """Tests and tools: ask a host for a picklable view computed by ``what``
    (``state``: the pickled desks)."""

    what: str = "state"


# -- the host ---------------------------------------------------------------------------------


@attrs.define
class _Sends:
    """One turn's outputs grouped per destination actor (see :meth:`Host._route`)."""

    timers: list[int] = attrs.Factory(list)
    gateways: dict[str, list[Any]] = attrs.Factory(dict)
    exchange: EngineBatch | None = None
    hosts: list[tuple[str, EngineBatch]] = attrs.Factory(list)


class Host(RuntimeActor):
    """One Thespian actor hosting desks of one kind; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.host_id = ""
        self.kind = ""
        self.key = ""
        self.config: EngineConfig | None = None
        self.directory = Directory()
        self.instruments: dict[str, Instrument] = {}
        self.desks: dict[str, Desk] = {}
        self.journal: Journal | None = None
        self.stream = ""
        self.out_seq: dict[str, int] = {}
        self.in_last: dict[str, int] = {}
        self.outbox: dict[str, deque[EngineBatch]] = {}
        #: The turn applied and staged but not yet committed and sent: its batches (with
        #: their senders) and outputs; a re-run by Thespian finishes it (see _finish).
        self._inflight: tuple[list[tuple[EngineBatch, Any]], _Sends] | None = None
        self._early: dict[str, dict[int, tuple[EngineBatch, Any]]] = {}
        #: Grouped turns (group_commit "pass"): batches accepted and waiting for the
        #: HostGo this host sent itself, and the highest seq waiting per channel.
        self._pending: list[tuple[EngineBatch, Any]] = []
        self._pending_last: dict[str, int] = {}
        self._go = False
        #: Receivers asked for their ack after a recovery (EngineProbe): their next ack
        #: releases the outbox.
        self._probing: set[str] = set()
        #: Per origin: the batches and items applied (committed) but not acked yet.
        self._unacked: dict[str, tuple[int, int]] = {}
        self._fault: str | None = None
        self._dead = False
        self._timer_at: int | None = None
        #: Messages that came before this host's HostInit, for after it (see
        #: _receive_before_init, this instance's receiveMessage until then).
        self._before_init: list[tuple[Any, Any]] = []
        self.receiveMessage = self._receive_before_init  # type: ignore[method-assign]
        #: The channels of this incarnation's GatewayBatches: its name, and per gateway
        #: id the address its numbering started for and the last seq sent.
        self._gw_origin = ""
        self._gw_seq: dict[str, tuple[Any, int]] = {}
        self.turns = 0
        self.items = 0
        self.restarted = False
        # Snapshot pacing: the turn count, the journal's appended bytes and the size
        # of the last snapshot (0: none taken by this incarnation).
        self._snap_turn = 0
        self._snap_bytes = 0
        self._snap_size = 0
        # The offset of the stream's newest snapshot (recovered or taken; 0: none):
        # the next snapshot turn compacts the journal up to it.
        self._snap_offset = 0

    # -- boot and recovery ----------------------------------------------------------

    def _receive_before_init(self, message: Any, sender: Any) -> Any:
        """``receiveMessage`` until the :class:`HostInit` is handled (set as an instance
        attribute in ``__init__`` and deleted by the init, so later messages pay
        nothing): a message that comes before the init waits for it.

        A re-created host's peers learn its address from the Exchange's
        ``DirectoryUpdate`` and resend their outboxes to it at once; under
        multiprocTCPBase nothing orders their messages after the Exchange's
        ``HostInit`` (different senders), and a batch handled by a host with no
        journal yet raised twice and was lost as a PoisonMessage, stalling its
        channel for good (`emporion simulate --base multiprocTCPBase` found it). So
        such messages are kept, in arrival order, and handled right after the init.
        Thespian's own messages and identity questions are not held back.
        """
        if self.journal is None and not isinstance(
                message, HostInit | ActorSystemMessage | RuntimeWhoAreYou):
            self._before_init.append((message, sender))
            return None
        return RuntimeActor.receiveMessage(self, message, sender)

    def receiveMsg_HostInit(self, msg: HostInit, sender: Any) -> None:
        self.host_id, self.kind, self.key = msg.host_id, msg.kind, msg.key
        self.config = msg.config
        self.directory = msg.directory
        self.restarted = msg.restarted
        self.instruments = msg.config.instruments()
        self.stream = f"host:{msg.host_id}"
        self._gw_origin = f"{msg.host_id}@{time.time_ns():x}"
        if msg.config.data_dir is None:
            self.journal = Journal(":memory:", fsync="off")
        else:
            self.journal = Journal.open(Path(msg.config.data_dir), fsync=msg.config.fsync,
                                        share=True, defer=msg.config.group_commit == "pass")
        if self.kind == "book":
            self.desks[self.key] = BookDesk(self.instruments[self.key])
        elif self.kind == "router":
            self.desks[""] = RouterDesk(
                replay_capacity=msg.config.replay_capacity,
                conflation_window_ns=msg.config.conflation_window_ns,
            )
        recovered, discarded = self._recover()
        book = self.desks.get(self.key)
        if msg.restarted and isinstance(book, BookDesk) and book.recent_trades \
                and self.directory.gateways:
            # Before anything this incarnation sends, first on its gateway channels: the
            # newest public trades, those its killed incarnation sent and nobody got
            # among them (gateways drop the trade ids they published already).
            trades = list(book.recent_trades)
            self._deliver(_Sends(gateways={gw: trades for gw in self.directory.gateways}))
        for desk in self.desks.values():
            wakeup = desk.wakeup_ns() if isinstance(desk, RouterDesk) else None
            if wakeup is not None:
                self._arm(wakeup)  # the dead host's wakeup died with it
            if isinstance(desk, RouterDesk):
                desk.load_chunk = self._load_chunk
        # Whatever the crashed host had not seen acked may not have left. The outbox
        # now holds every batch since the snapshot (which receivers applied is not
        # journaled): ask each receiver for its ack, which it sends at once (acks are
        # lazy otherwise) and which names the prefix it applied; the rest follows (see
        # receiveMsg_EngineAck) instead of resending every turn since the snapshot.
        # (It used to send the oldest batch as the probe: one a receiver applied
        # without acking at once would have stalled the channel.)
        for host, box in self.outbox.items():
            if box:
                self._probing.add(host)
                self.send(self.directory.hosts.get(host), EngineProbe(origin=self.host_id))
        if msg.restarted:
            self._resync(time.time_ns())
        self.send(sender, HostReady(host_id=self.host_id, recovered_turns=recovered,
                                    discarded=tuple(discarded)))
        if "receiveMessage" in self.__dict__:
            del self.receiveMessage  # the class's dispatch from now on
        early, self._before_init = self._before_init, []
        for message, from_ in early:
            try:
                self.receiveMessage(message, from_)
            except Exception:
                # As Thespian would after a retry (a PoisonMessage), but without
                # re-running this HostInit: the message is dropped and logged.
                log.exception("%s: %s held until the init failed", self.host_id,
                              type(message).__name__)

    def _recover(self) -> tuple[int, list[int]]:
        assert self.journal is not None
        rec = self.journal.recover(self.stream)
        if rec.snapshot is not None:
            self._snap_offset = rec.snapshot.offset
            state: Any = rec.snapshot.state
            self.desks, self.out_seq, self.in_last = state[:3]
            # The outbox at the snapshot: every batch not acked by then, the snapshot
            # turn's own included (older snapshots hold only that turn's, or none).
            for host, batch in state[3] if len(state) > 3 else ():
                self.outbox.setdefault(host, deque()).append(batch)
        for _, record in rec.records:
            # A turn's record: its one batch, or a grouped turn's batches (a tuple).
            group: Any = record
            batches: tuple[Any, ...] = (group,) if isinstance(group, EngineBatch) else tuple(group)
            assert all(isinstance(b, EngineBatch) for b in batches), record
            self._route(self._apply(batches))  # numbered and kept, not sent
        self.turns = len(rec.records)
        if rec.discarded:
            log.warning("%s: discarded a torn journal tail at offsets %s", self.host_id,
                        [d.offset for d in rec.discarded])
        # Every batch regenerated stays in the outbox: acks are not journaled, so any
        # of them may be missing at its receiver — not only the last turn's. A batch
        # the dead host sent to a receiver that died too before committing it, with
        # later turns after it, used to be dropped here and stall the channel for ever.
        return len(rec.records), [d.offset for d in rec.discarded]

    def _resync(self, ts: int) -> None:
        """After a restart, tell every user whose state this host holds to re-query.

        Done as a journaled turn of its own (a :class:`HostResync` input), so a
        replay regenerates the same notices and the same channel seqs.
        """
        reason = f"{self.kind} {self.key or self.host_id} restarted"
        self.receiveMsg_EngineBatch(EngineBatch(
            origin=f"{self.host_id}:resync",
            items=((Dest(self.kind, self.key), HostResync(ts=ts, reason=reason)),),
        ), self.myAddress)

    def _resync_outputs(self, item: HostResync) -> list[Out]:
        out: list[Out] = []
        users: list[str] = []
        for desk in self.desks.values():
            if isinstance(desk, AccountDesk):
                out += [(Dest("router"), e) for e in
                        desk.ledger.system_notice("resync", item.reason, item.ts)]
            elif isinstance(desk, BookDesk):
                users += desk.book.users()
            else:
                users += desk.router.users()
        out += [(Dest("account", u), AccountResync(user=u, reason=item.reason, ts=item.ts))
                for u in sorted(set(users))]
        return out

    # -- the turn ----------------------------------------------------------------------

    def _desk_for(self, dest: Dest) -> Desk:
        if dest.kind == "account":
            desk = self.desks.get(dest.key)
            if desk is None:
                desk = self.desks[dest.key] = AccountDesk(dest.key, self.instruments)
            return desk
        if dest.kind == "book":
            return self.desks[dest.key]
        return self.desks[""]

    def _apply(self, batches: tuple[EngineBatch, ...]) -> list[Out]:
        """Run one turn's batches through the desks, then end the turn of every desk
        they touched; returns the outputs (nothing is sent)."""
        touched: dict[int, Desk] = {}
        out: list[Out] = []
        for batch in batches:
            if batch.seq:
                self.in_last[batch.origin] = max(self.in_last.get(batch.origin, 0),
                                                 batch.seq)
            out += self._apply_items(batch, touched)
        for desk in touched.values():
            out += desk.end_turn()
        return out

    def _apply_items(self, batch: EngineBatch, touched: dict[int, Desk]) -> list[Out]:
        out: list[Out] = []
        for dest, item in batch.items:
            if isinstance(item, HostResync):
                out += self._resync_outputs(item)
                continue
            if isinstance(item, BookSnapshotRequest) and self.kind == "book":
                snap = self.desks[self.key]
                assert isinstance(snap, BookDesk)
                out.append((Dest("gateway", item.reply_to.gateway), Reply(
                    reply_to=item.reply_to, ok=True, result=snap.snapshot(item.ts))))
                continue
            if dest.kind == self.kind == "account" and isinstance(item, AccountResync):
                desk = self._desk_for(dest)
                assert isinstance(desk, AccountDesk)
                out += [(Dest("router"), e) for e in
                        desk.ledger.system_notice("resync", item.reason, item.ts)]
                continue
            try:
                desk = self._desk_for(dest)
                touched[id(desk)] = desk
                out += desk.handle(item)
            except Exception as exc:
                log.exception("%s: item %s failed", self.host_id, type(item).__name__)
                reply_to = getattr(item, "reply_to", None)
                if isinstance(reply_to, ReplyTo):
                    out.append((Dest("gateway", reply_to.gateway), Reply(
                        reply_to=reply_to, ok=False, code=ErrorCode.INTERNAL.value,
                        message=f"the engine could not handle this request ({type(exc).__name__})",
                    )))
        self.items += len(batch.items)
        return out

    def receiveMsg_EngineBatch(self, batch: EngineBatch, sender: Any) -> None:
        if self._dead:
            return  # stopping (see _die): not acked, so the sender resends it
        assert self.journal is not None
        if self._inflight is not None:
            # Thespian re-runs a handler that raised, with the same message: the turn
            # in flight is applied and staged already; finish it without applying again.
            done = self._finish_inflight()
            if self._stopping():  # _finish may have stopped the host (see _die)
                return
            if any(batch == b for b, _ in done):
                # The re-run of that very batch: it is applied now. A sequenced one would
                # be dropped below by its channel seq, but an unsequenced one (a gateway's
                # requests) has none and would be applied a second time.
                return
        if self._grouped():
            self._accept(batch, sender)
            return
        if not batch.seq:
            self._turn([(batch, sender)])
            return
        if self._admit(batch, sender, self.in_last.get(batch.origin, 0)):
            self._turn([(batch, sender)])
            self._drain(batch.origin)

    def _admit(self, batch: EngineBatch, sender: Any, last: int) -> bool:
        """Step 1 for a sequenced batch of a channel whose batches up to ``last`` are
        taken: whether it is next in line. A resend is acked (the ack names the applied
        prefix); a batch past a gap is held until the gap fills (Thespian's TCP
        transport can deliver a channel's batches out of order, measured under load)."""
        if batch.seq <= last:
            self._ack(batch.origin, sender)
            return False
        if batch.seq > last + 1:
            self._early.setdefault(batch.origin, {})[batch.seq] = (batch, sender)
            return False
        return True

    def _next_early(self, origin: str, last: int) -> tuple[EngineBatch, Any] | None:
        """The held batch of ``origin`` numbered ``last + 1``, if any (taken out)."""
        early = self._early.get(origin)
        if not early:
            return None
        nxt = early.pop(last + 1, None)
        if not early:
            del self._early[origin]
        return nxt

    def _grouped(self) -> bool:
        """Whether turns are grouped: with ``group_commit="pass"`` (the embedded
        deployment, every host on one thread), a book, the router or an account shard
        applies every batch queued for it in one turn (see :meth:`receiveMsg_HostGo`).

        A one-user account host is not grouped: it gets one batch per round of a pass
        (the pass's requests, then each book's answers), so the HostGo would be one
        more message per turn and group nothing (measured: bench/gateway.py's private
        push, one deposit per user and pass, 20-35 % slower with it).
        """
        config = self.config
        if config is None or config.group_commit != "pass":
            return False
        return self.kind != "account" or config.account_shards > 0

    def _accept(self, batch: EngineBatch, sender: Any) -> None:
        """Grouped turns: queue ``batch`` for the next turn (after the channel checks a
        turn of its own would make) and make sure a :class:`HostGo` is on its way."""
        if batch.seq:
            origin = batch.origin
            last = max(self.in_last.get(origin, 0), self._pending_last.get(origin, 0))
            if not self._admit(batch, sender, last):
                return
            nxt: tuple[EngineBatch, Any] | None = (batch, sender)
            while nxt is not None:  # this batch, then any held ones now in line
                self._pending.append(nxt)
                self._pending_last[origin] = nxt[0].seq
                nxt = self._next_early(origin, nxt[0].seq)
        else:
            self._pending.append((batch, sender))
        if not self._go:
            # Thespian's simple base delivers in send order: the HostGo arrives after
            # every message already queued for this host, which join this turn.
            self._go = True
            self.send(self.myAddress, HostGo())

    def receiveMsg_HostGo(self, msg: HostGo, sender: Any) -> None:
        """Grouped turns: apply every batch accepted since the last turn, as one turn
        (one journal record, one end of turn per desk, one batch per destination).

        Under ``simpleSystemBase`` a gateway's requests reach ~20 account hosts, whose
        orders reach a book as ~20 batches, whose fills reach the accounts and then the
        router: one turn per batch made most of the engine's time per-turn cost.
        """
        self._go = False
        if self._dead:
            return
        if self._inflight is not None:  # the re-run of a HostGo that raised
            self._finish_inflight()
            if self._stopping():
                return
        if self._pending:
            self._turn(self._pending)

    def _finish_inflight(self) -> list[tuple[EngineBatch, Any]]:
        assert self._inflight is not None
        group, sends = self._inflight
        self._finish(group, sends)
        for origin in dict.fromkeys(b.origin for b, _ in group):
            self._drain(origin)
        return group

    def _drain(self, origin: str) -> None:
        """Apply held batches of ``origin`` that are now next in line."""
        while not self._dead:
            nxt = self._next_early(origin, self.in_last.get(origin, 0))
            if nxt is None:
                break
            self._turn([nxt])

    def _turn(self, group: list[tuple[EngineBatch, Any]]) -> None:
        """One turn: apply ``group``'s batches (with their senders), journal them as one
        record (the batch, or a tuple of a grouped turn's batches), commit, send."""
        assert self.journal is not None
        batches = tuple(b for b, _ in group)
        sends = self._route(self._apply(batches))
        self.journal.append(self.stream, [batches[0] if len(batches) == 1 else batches])
        if self.kind == "router":
            self._spill()
        self._inflight = (group, sends)
        if group is self._pending:
            self._pending = []
            self._pending_last = {}
        self.turns += 1
        if self._fault == "raise_once":
            self._fault = None
            raise RuntimeError(f"{self.host_id}: injected fault after apply, before commit")
        self._finish(group, sends)

    def _finish(self, group: list[tuple[EngineBatch, Any]], sends: _Sends) -> None:
        assert self.journal is not None
        if self._snapshot_due():
            # The state after this turn, its sends numbered: the channel seqs past its
            # batches and the whole outbox (this turn's batches and any older ones not
            # acked yet), which a recovery resends.
            offset = self.journal.last_offset(self.stream) + 1
            outbox = [(host, b) for host, box in self.outbox.items() for b in box]
            self._snap_size = self.journal.snapshot(
                self.stream, offset, (self.desks, self.out_seq, self.in_last, outbox))
            self._snap_turn, self._snap_bytes = self.turns, self.journal.appended_bytes
            if COMPACT_JOURNAL and self._snap_offset:
                # Same transaction as the new snapshot: the older one and the
                # records after it stay as the fallback (see COMPACT_JOURNAL).
                self.journal.compact(self.stream, self._snap_offset)
            self._snap_offset = offset
        try:
            if self._fault == "commit_fails":
                self._fault = None
                raise JournalError(f"{self.host_id}: injected commit failure")
            self.journal.commit()
        except Exception:
            # The turn is applied in memory but not durable: its outputs must never
            # leave (write-ahead), and a re-run by Thespian would find nothing staged
            # and send them anyway. Die instead; the journal rebuilds the host.
            log.exception("%s: journal commit failed; the host stops and is rebuilt",
                          self.host_id)
            self._die()
            return
        self._inflight = None
        # Lazy acks (see the module docstring): count what each channel applied since
        # its last ack; ack those past a bound.
        unacked = self._unacked
        senders: dict[str, Any] = {}
        for b, sender in group:
            if b.seq:
                n, items = unacked.get(b.origin, (0, 0))
                unacked[b.origin] = (n + 1, items + len(b.items))
                senders[b.origin] = sender
        for origin, sender in senders.items():
            n, items = unacked[origin]
            if origin.startswith(LINK_ORIGIN_PREFIX):
                if n >= LINK_ACK_EVERY:
                    self._ack(origin, sender)
            elif n >= ACK_EVERY or items >= ACK_ITEMS or origin.startswith(EAGER_ACK_ORIGINS):
                self._ack(origin, sender)
        self._deliver(sends)

    def _spill(self) -> None:
        """Stage the router's newly frozen replay-log chunks as journal blobs (and the
        deletion of the expired ones), with this turn.

        The chunks are most of the router's state (up to ``replay_capacity`` events
        per user) and never change: kept in memory and in every snapshot, they made
        the router's memory and its snapshot pauses grow with users times capacity. Stored
        with the turn that froze them, a snapshot of this turn or a later one refers
        to them by seq, and a resume reads them back (:meth:`_load_chunk`). A turn
        replayed by a recovery freezes the same chunks again; they are stored again
        (the same bytes) by the next turn's spill.
        """
        assert self.journal is not None
        desk = self.desks[""]
        assert isinstance(desk, RouterDesk)
        puts, drops = desk.spill()
        if puts:
            self.journal.put_blobs(self.stream, puts)
        if drops:
            self.journal.drop_blobs(self.stream, drops)

    def _load_chunk(self, user: str, first_seq: int) -> bytes | None:
        """A stored replay-log chunk of ``user`` (see :meth:`_spill`); None if it cannot
        be read (the resume is then answered ``replay_unavailable``)."""
        if self.journal is None:
            return None
        try:
            return self.journal.get_blob(self.stream, user, first_seq)
        except JournalError:
            log.exception("%s: the replay chunk of %s from seq %d cannot be read",
                          self.host_id, user, first_seq)
            return None

    def _snapshot_due(self) -> bool:
        """Whether this turn stages a snapshot (see :data:`SNAPSHOT_BYTES_FACTOR`).

        Where snapshots fall does not change what recovery rebuilds (a snapshot and
        the records after it give the same state as the records alone): it only
        trades the cost of taking them against the replay after a crash.
        """
        assert self.journal is not None
        if self.turns - self._snap_turn < SNAPSHOT_EVERY:
            return False
        since = self.journal.appended_bytes - self._snap_bytes
        return since >= SNAPSHOT_BYTES_FACTOR * self._snap_size

    def _ack(self, origin: str, sender: Any) -> None:
        """Ack the channel's applied prefix (everything up to ``in_last``).

        A gateway link's batches come through the system's relay (see
        ``EngineLink._forward``), so their sender is the relay: the ack goes to the
        gateway itself, whose link keeps the outbox it trims."""
        if not origin.endswith((":resync", ":timer")):
            self._unacked.pop(origin, None)
            if origin.startswith(LINK_ORIGIN_PREFIX):
                gateway = origin[len(LINK_ORIGIN_PREFIX):].rpartition("@")[0]
                sender = self.directory.gateways.get(gateway, sender)
            self.send(sender, EngineAck(host=self.host_id, seq=self.in_last.get(origin, 0)))

    def receiveMsg_EngineProbe(self, msg: EngineProbe, sender: Any) -> None:
        """A recovered sender waits for this ack before it resends its outbox: at once."""
        if self._dead:
            return  # the re-created host's DirectoryUpdate makes the sender resend all
        if self._inflight is not None:
            # ``in_last`` covers the staged turn: make it durable before acking it.
            self._finish_inflight()
            if self._stopping():
                return
        self._ack(msg.origin, sender)

    def receiveMsg_EngineAck(self, ack: EngineAck, sender: Any) -> None:
        box = trim_outbox(self.outbox, ack)
        if ack.host in self._probing:
            # The receiver's answer to the recovery's first resend: what is left, it
            # lacks (or has in flight from this incarnation; duplicates are dropped).
            self._probing.discard(ack.host)
            addr = self.directory.hosts.get(ack.host)
            for batch in box or ():
                self.send(addr, batch)

    # -- sending -----------------------------------------------------------------------

    def _route(self, outs: list[Out]) -> _Sends:
        """Group a turn's outputs per destination actor, one batch each (nothing is sent).

        Host→host batches get the channel's next seq and join the outbox (until
        acked) here, once per turn and before the turn's snapshot and commit, so a
        snapshot holds the seqs past them. Replaying the journal routes each turn
        again without sending, so a recovered host numbers its next batches where
        the crashed one stopped.
        """
        sends = _Sends()
        per_host: dict[str, list[Out]] = {}
        for dest, msg in outs:
            if dest.kind == "timer":
                assert isinstance(msg, RouterTimer)
                sends.timers.append(msg.at_ns)
            elif dest.kind == "gateway":
                sends.gateways.setdefault(dest.key, []).append(msg)
            elif dest.kind == "market":
                for gw in self.directory.gateways:
                    sends.gateways.setdefault(gw, []).append(msg)
            else:
                host = self._resolve(dest)
                per_host.setdefault(host or "exchange", []).append((dest, msg))
        for host, items in per_host.items():
            if host == "exchange":
                # An account that does not exist yet: the exchange creates it and forwards.
                sends.exchange = EngineBatch(origin=self.host_id, items=tuple(items))
                continue
            seq = self.out_seq.get(host, 0) + 1
            self.out_seq[host] = seq
            batch = EngineBatch(origin=self.host_id, seq=seq, items=tuple(items))
            sends.hosts.append((host, batch))
            self.outbox.setdefault(host, deque()).append(batch)
        return sends

    def _deliver(self, sends: _Sends) -> None:
        """Send what :meth:`_route` grouped (after the turn's commit)."""
        for at_ns in sends.timers:
            self._arm(at_ns)
        for gw, msgs in sends.gateways.items():
            addr = self.directory.gateways.get(gw)
            if addr is not None:
                last = self._gw_seq.get(gw)
                seq = last[1] + 1 if last is not None and last[0] == addr else 1
                self._gw_seq[gw] = (addr, seq)
                self.send(addr, GatewayBatch(items=tuple(msgs), origin=self._gw_origin,
                                             seq=seq))
        if sends.exchange is not None:
            self.send(self.directory.exchange, sends.exchange)
        for host, batch in sends.hosts:
            addr = self.directory.hosts.get(host)
            if addr is not None:
                self.send(addr, batch)

    def _resolve(self, dest: Dest) -> str | None:
        d = self.directory
        if dest.kind == "book":
            return d.books.get(dest.key)
        if dest.kind == "router":
            return d.router
        if dest.kind == "account":
            return account_host_id(d, dest.key)
        raise ValueError(f"cannot route to {dest}")

    def _arm(self, at_ns: int) -> None:
        if self._timer_at is not None and self._timer_at <= at_ns:
            return
        self._timer_at = at_ns
        delay = max(0.0, (at_ns - time.time_ns()) / 1e9)
        from datetime import timedelta

        self.wakeupAfter(timedelta(seconds=delay), payload=at_ns)

    def receiveMsg_WakeupMessage(self, msg: Any, sender: Any) -> None:
        self._timer_at = None
        now = max(time.time_ns(), int(msg.payload or 0))
        tick = EngineBatch(origin=f"{self.host_id}:timer", items=((Dest("router"),
                                                                   RouterTick(now_ns=now)),))
        self.receiveMsg_EngineBatch(tick, self.myAddress)

    # -- control -----------------------------------------------------------------------

    def receiveMsg_DirectoryUpdate(self, msg: DirectoryUpdate, sender: Any) -> None:
        self.directory = msg.directory
        for host in msg.restarted:
            addr = self.directory.hosts.get(host)
            for batch in self.outbox.get(host, ()):
                self.send(addr, batch)

    def receiveMsg_HostFault(self, msg: HostFault, sender: Any) -> None:
        if msg.mode == "exit":
            # Die without flushing anything: staged journal records and memory are lost.
            self._die()
            return
        self._fault = msg.mode

    def _stopping(self) -> bool:
        return self._dead

    def _die(self) -> None:
        """Stop at once: the staged turn is discarded (close() does not commit it and
        releases this host's hold on a shared connection), nothing more is sent, and
        whatever is still queued for this host is dropped — none of it was acked, so
        the senders' outboxes resend it to the host the Exchange re-creates from the
        journal."""
        from thespian.actors import ActorExitRequest

        if self.journal is not None:
            self.journal.close()
        self.journal = None
        self._inflight = None
        self._pending = []
        self._dead = True
        self.send(self.myAddress, ActorExitRequest())

    def receiveMsg_HostStatsQuery(self, msg: HostStatsQuery, sender: Any) -> None:
        self.send(sender, HostStats(
            host_id=self.host_id, kind=self.kind, pid=os.getpid(), entities=len(self.desks),
            turns=self.turns, items=self.items,
            outbox=sum(len(b) for b in self.outbox.values()),
            journal_offset=0 if self.journal is None else self.journal.last_offset(self.stream),
            restarted=self.restarted,
        ))

    def receiveMsg_HostInspect(self, msg: HostInspect, sender: Any) -> None:
        self.send(sender, HostView(host_id=self.host_id, desks=self.desks))

    def receiveMsg_ActorExitRequest(self, msg: Any, sender: Any) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None


@attrs.frozen(kw_only=True)
class HostView:
    host_id: str
    desks: dict[str, Any] = attrs.field(hash=False)


@attrs.frozen(kw_only=True)
class GatewayBatch:
    """Replies, deliveries and market data for one gateway, in order.

    A host numbers its batches to each gateway (``seq`` from 1) on a channel named
    by ``origin``, unique to the host's incarnation (``host_id@time``) and restarted
    when the gateway's address changes; the gateway's :class:`~actors.boot.EngineLink`
    hands their items out in that order (Thespian's TCP transport does not keep it).
    ``seq`` 0: unnumbered (the Exchange's), handed out as it comes.
    """

    items: tuple[Any, ...]
    origin: str = ""
    seq: int = 0


__all__ = [
    "AccountResync",
    "Directory",
    "DirectoryUpdate",
    "EngineAck",
    "EngineBatch",
    "SendChannel",
    "EngineConfig",
    "EngineProbe",
    "GatewayBatch",
    "Host",
    "HostFault",
    "HostInit",
    "HostInspect",
    "HostReady",
    "HostResync",
    "HostStats",
    "HostStatsQuery",
    "HostView",
    "UserEvent",
    "account_host_id",
]
