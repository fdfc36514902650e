"""The notification router core: per-user sequencing, priorities, conflation, replay.

A pure, deterministic, picklable object (no I/O, no clock, no randomness): the
Router actor's shell feeds it batches of :class:`~protocol.UserEvent` with the
current time and turns the returned effects into messages and wakeups.

Decisions (the contract of this module):

* **Sequencing.** Each user has one lane with its own counter: seqs start at 1,
  grow by exactly 1 and are never reused. A seq is assigned when an event is
  *sequenced* (P0/P1: at once; P2/P3: when its conflation window flushes), so
  every seq that exists has been delivered and is in the replay log.
* **Dedup.** An event whose ``event_id`` was already accepted for that user is
  dropped and counted (``deduplicated``). The per-user memory holds the last
  ``dedup_capacity`` accepted ids (at least ``replay_capacity``); an id that
  was conflated away still counts as seen.
* **Conflation.** P2/P3 events wait in a per-user pending map keyed by
  ``(kind, key)``; a newer one replaces the older (counted ``conflated``) and
  moves to the back, so a flush sequences the survivors in the order their
  latest values arrived. A user's pending events flush together once
  ``conflation_window_ns`` has elapsed since the *first* of them arrived.
  ``conflation_window_ns == 0`` disables conflation (P2/P3 sequence at once).
* **P0/P1 with P2/P3 pending.** Every :meth:`Router.publish` first flushes the
  lanes whose window has elapsed (exactly what :meth:`Router.tick` would do at
  ``now_ns``), then sequences the batch. So a P0/P1 event is sequenced after
  the user's *due* pending events but does not force out pending ones whose
  window is still open: those keep conflating and get higher seqs later.
  Either way seqs stay gapless and monotonic; only P2/P3 ordering relative to
  P0/P1 shifts by at most one window.
* **Timers.** The router asks for at most one wakeup at a time
  (:class:`RouterTimer`), for the earliest pending flush. :meth:`Router.tick`
  marks that wakeup as fired when ``now_ns`` reached it and asks for the next
  one if something is still pending. A spurious tick is harmless.
* **Batching.** One call returns at most one :class:`RouterDeliver` per user
  (its events in seq order, in the order users were first touched), followed
  by at most one :class:`RouterTimer`.
* **Replay.** Each lane keeps its last ``replay_capacity`` sequenced events.
  :meth:`Router.replay` returns exactly those after ``after_seq``;
  ``replay_unavailable`` when the log no longer holds ``after_seq + 1``;
  ``bad_request`` when ``after_seq`` is negative or beyond the user's last seq
  (a client cannot hold an event that was never numbered).
* **Transactional.** Inputs are validated before any state changes; nothing
  after validation can raise, so a handler re-run by Thespian after a failure
  never double-applies.
"""

from __future__ import annotations

import operator
import pickle
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, cast

import attrs

from protocol import EVENT_PRIORITY, ErrorCode, RemoteProtocolError, UserEvent

__all__ = [
    "ChunkLoader",
    "Router",
    "RouterDeliver",
    "RouterEffect",
    "RouterStats",
    "RouterTimer",
    "SequencedEvent",
]

#: Highest priority class that is sequenced at once (P0/P1); the rest conflate.
_IMMEDIATE_MAX_PRIORITY = 1


@attrs.frozen(kw_only=True)
class SequencedEvent:
    """A private event numbered for its user, as it sits in the replay log.

    ``key`` is kept (it is not on the wire) so a session can conflate P2/P3
    items by ``(kind, key)`` from the items alone.
    """

    user: str
    seq: int
    kind: str
    priority: int
    ts: int
    data: dict[str, object] = attrs.field(eq=True, hash=False)
    event_id: int
    key: str = ""

    @classmethod
    def from_user_event(cls, event: UserEvent, seq: int) -> SequencedEvent:
        """Number ``event`` with ``seq``."""
        return cls(
            user=event.user,
            seq=seq,
            kind=event.kind,
            priority=EVENT_PRIORITY[event.kind],  # event.priority, without the property call
            ts=event.ts,
            data=event.data,
            event_id=event.event_id,
            key=event.key,
        )

    def to_wire(self) -> dict[str, object]:
        """The wire shape of a private event (PROTOCOL.md, *Server → client frames*).

        Returns:
            ``{"seq", "kind", "priority", "ts", "data"}``; ``data`` is a shallow copy.
        """
        return {
            "seq": self.seq,
            "kind": self.kind,
            "priority": self.priority,
            "ts": self.ts,
            "data": dict(self.data),
        }


@attrs.frozen(kw_only=True)
class RouterDeliver:
    """Deliver ``events`` (one user's, in seq order) to every session of ``user``."""

    user: str
    events: tuple[SequencedEvent, ...]


@attrs.frozen(kw_only=True)
class RouterTimer:
    """Call :meth:`Router.tick` once the clock reaches ``at_ns``."""

    at_ns: int


RouterEffect = RouterDeliver | RouterTimer


@attrs.frozen(kw_only=True)
class RouterStats:
    """Counters since construction (``pending`` and ``users`` are current sizes)."""

    published: int
    delivered: int
    deduplicated: int
    conflated: int
    pending: int
    users: int


_SEQ_FIELDS: tuple[str, ...] = tuple(a.name for a in attrs.fields(SequencedEvent))
_seq_values = operator.attrgetter(*_SEQ_FIELDS)


def _sequenced(values: tuple[object, ...]) -> SequencedEvent:
    """A :class:`SequencedEvent` from its field values (unpickling; no validators)."""
    event: Any = object.__new__(SequencedEvent)
    for name, value in zip(_SEQ_FIELDS, values, strict=True):
        object.__setattr__(event, name, value)
    return cast(SequencedEvent, event)


#: Replay-log events are pickled in chunks of this many (see :class:`_ReplayLog`).
_CHUNK = 32
_SEQ_INDEX = _SEQ_FIELDS.index("seq")


class _ChunkMissing(Exception):  # noqa: N818  (internal signal, never escapes)
    """A stored chunk could not be read back (see :meth:`Router.replay`)."""


#: Reads a stored chunk back: ``(user, first seq) -> bytes``, None if it is not there.
ChunkLoader = Callable[[str, int], "bytes | None"]


class _ReplayLog:
    """One user's replay log: the last ``capacity`` sequenced events, in seq order.

    Older events are kept *frozen*: every :data:`_CHUNK` appended events (or
    ``capacity``, if smaller: the log's chunk ``size``) are pickled once, as one
    chunk of field-value tuples, and only the newest (fewer than a chunk) stay
    objects. A host snapshot pickled every log in full and so paused the router's
    turn for the whole history each time (0.4-0.55 s under bench/gateway.py's order
    load); now it copies the chunks' bytes and pickles only the unfrozen tails. Each
    event is pickled once in its life, spread over the turns, and a frozen event
    costs its pickle's bytes instead of an object and a dict. A replay decodes the
    chunks it needs (replays are rare: a client's resume).

    Capacity: the events with ``seq > last_seq - capacity`` are the log; a chunk
    goes once all its events are older, and the older events of a partly
    expired chunk are filtered out when it is read.

    Stored chunks: a frozen chunk never changes, so its owner may store it
    elsewhere (:meth:`spill`; the router's host puts it in its journal) and keep
    nothing of it: every chunk holds exactly ``size`` consecutive events, so the
    stored ones, which come before those still in ``chunks``, are just
    ``stored_first`` (the first seq of the oldest) and ``stored`` (how many).
    :meth:`after` reads them back through a loader. The stored chunks that expired
    since the last spill are listed in ``dropped`` (their first seqs), for the owner
    to delete.
    """

    __slots__ = ("capacity", "chunks", "dropped", "last_seq", "size", "stored",
                 "stored_first", "tail")

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.size = _CHUNK if capacity is None else min(_CHUNK, capacity)
        #: ``(first seq, last seq, pickled list of field-value tuples)``, oldest first:
        #: the frozen chunks not stored yet.
        self.chunks: deque[tuple[int, int, bytes]] = deque()
        self.stored = 0
        self.stored_first = 0
        self.tail: list[SequencedEvent] = []
        self.last_seq = 0
        self.dropped: list[int] = []

    @classmethod
    def from_values(cls, capacity: int | None, values: Any) -> _ReplayLog:
        """A log holding the events given as field-value tuples, oldest first."""
        log = cls(capacity)
        for value in values:
            log.append(_sequenced(value))
        return log

    def append(self, event: SequencedEvent) -> bool:
        """Add the next event (its seq follows the last one's); True if that froze a
        chunk or expired a stored one (the log has something for :meth:`spill`)."""
        tail = self.tail
        tail.append(event)
        seq = self.last_seq = event.seq
        chunks = self.chunks
        changed = False
        if len(tail) >= self.size:
            chunks.append((tail[0].seq, seq, pickle.dumps(list(map(_seq_values, tail)), 5)))
            self.tail = []
            changed = True
        cap = self.capacity
        if cap is not None:
            first = seq - cap + 1  # the oldest seq kept: drop chunks wholly before it
            size = self.size
            while self.stored and self.stored_first + size <= first:
                self.dropped.append(self.stored_first)
                self.stored_first += size
                self.stored -= 1
                changed = True
            while chunks and chunks[0][1] < first:
                chunks.popleft()
        return changed

    def spill(self) -> list[tuple[int, int, bytes]]:
        """The chunks frozen since the last spill, as ``(first seq, last seq, bytes)``;
        the log keeps nothing of them from now on (the caller stores the bytes)."""
        chunks = self.chunks
        if not chunks:
            return []
        if not self.stored:
            self.stored_first = chunks[0][0]
        # Stored chunks are described by where the first starts: they must follow on.
        assert self.stored_first + self.stored * self.size == chunks[0][0], (
            self.stored_first, self.stored, self.size, chunks[0][0])
        self.stored += len(chunks)
        out = list(chunks)
        chunks.clear()
        return out

    def first_seq(self) -> int:
        """The oldest seq the log holds (``last_seq + 1`` when it is empty)."""
        if self.stored:
            oldest = self.stored_first
        elif self.chunks:
            oldest = self.chunks[0][0]
        elif self.tail:
            oldest = self.tail[0].seq
        else:
            return self.last_seq + 1
        cap = self.capacity
        return oldest if cap is None else max(oldest, self.last_seq - cap + 1)

    def after(self, after_seq: int,
              load: Callable[[int], bytes | None] | None = None) -> tuple[SequencedEvent, ...]:
        """The events with ``seq > after_seq``, oldest first; ``load(first seq)`` reads a
        stored chunk back.

        Raises:
            _ChunkMissing: a stored chunk is needed and ``load`` has not got it.
        """
        lo = max(after_seq + 1, self.first_seq())
        out: list[SequencedEvent] = []
        size = self.size
        if self.stored:
            start = max(0, (lo - self.stored_first) // size)
            for i in range(start, self.stored):
                first = self.stored_first + i * size
                blob = None if load is None else load(first)
                if blob is None:
                    raise _ChunkMissing(first)
                out += [_sequenced(v) for v in pickle.loads(blob) if v[_SEQ_INDEX] >= lo]
        for _, last, blob in self.chunks:
            if last >= lo:
                out += [_sequenced(v) for v in pickle.loads(blob) if v[_SEQ_INDEX] >= lo]
        out += [event for event in self.tail if event.seq >= lo]
        return tuple(out)


class _Seen:
    """One lane's dedup memory: exactly the last ``capacity`` accepted event ids.

    While every accepted id is above the ones before it, the ids are kept as runs of
    consecutive ids (``[first, last]`` lists, oldest first). One ledger numbers a
    user's events, so in the engine they do grow, one by one: a lane holds one run,
    two ints, where a set and a deque of 10,000 ids (the default capacity) held
    ~0.8 MB, and every snapshot pickled them all. The first id accepted below the
    highest one (never in the engine; a core test's choice) turns the memory into
    that set (``ids``) and deque (``order``) for good.
    """

    __slots__ = ("count", "ids", "order", "runs")

    def __init__(self) -> None:
        self.runs: deque[list[int]] | None = deque()
        self.count = 0  # ids held, in run mode
        self.ids: set[int] | None = None
        self.order: deque[int] | None = None

    @classmethod
    def from_ids(cls, order: Iterable[int]) -> _Seen:
        """The memory holding ``order`` (accepted ids, oldest first; no duplicates)."""
        seen = cls()
        for event_id in order:
            seen.add(event_id, None)
        return seen

    def __reduce__(self) -> tuple[Any, ...]:
        runs = None if self.runs is None else [tuple(run) for run in self.runs]
        return _restore_seen, (runs, None if self.order is None else list(self.order))

    def accepted(self) -> list[int]:
        """The ids held, oldest first."""
        if self.runs is None:
            assert self.order is not None
            return list(self.order)
        return [i for first, last in self.runs for i in range(first, last + 1)]

    def add(self, event_id: int, capacity: int | None) -> bool:
        """Remember ``event_id`` (forgetting the oldest past ``capacity``); False if it is
        remembered already: a duplicate."""
        runs = self.runs
        if runs is None:
            return self._add_to_set(event_id, capacity)
        if runs:
            last = runs[-1]
            if event_id == last[1] + 1:
                last[1] = event_id
            elif event_id > last[1]:
                runs.append([event_id, event_id])
            else:
                for first, end in reversed(runs):
                    if first <= event_id <= end:
                        return False
                self._to_set()  # new, but below the highest: ids no longer only grow
                return self._add_to_set(event_id, capacity)
        else:
            runs.append([event_id, event_id])
        self.count += 1
        if capacity is not None and self.count > capacity:
            oldest = runs[0]
            if oldest[0] == oldest[1]:
                runs.popleft()
            else:
                oldest[0] += 1
            self.count -= 1
        return True

    def _to_set(self) -> None:
        order = deque(self.accepted())
        self.ids = set(order)
        self.order = order
        self.runs = None
        self.count = 0

    def _add_to_set(self, event_id: int, capacity: int | None) -> bool:
        ids, order = self.ids, self.order
        assert ids is not None and order is not None
        if event_id in ids:
            return False
        ids.add(event_id)
        order.append(event_id)
        if capacity is not None and len(order) > capacity:
            ids.discard(order.popleft())
        return True


def _restore_seen(runs: list[tuple[int, int]] | None, order: list[int] | None) -> _Seen:
    """Unpickle a :class:`_Seen` (see its ``__reduce__``)."""
    seen = _Seen()
    if runs is None:
        seen._to_set()
        assert seen.ids is not None and seen.order is not None
        seen.order.extend(order or ())
        seen.ids.update(seen.order)
    else:
        assert seen.runs is not None
        seen.runs.extend([list(run) for run in runs])
        seen.count = sum(last - first + 1 for first, last in runs)
    return seen


def _restore_lane(last_seq: int, maxlen: int | None, log: list[tuple[object, ...]],
                  seen_ids: set[int], seen_order: deque[int],
                  pending: dict[tuple[str, str], UserEvent], due_ns: int | None) -> _Lane:
    """Unpickle a lane of a snapshot written before the log was chunked (every event
    as a tuple of field values)."""
    return _Lane(last_seq=last_seq, log=_ReplayLog.from_values(maxlen, log),
                 seen=_Seen.from_ids(seen_order), pending=pending, due_ns=due_ns)


def _restore_chunked_lane(last_seq: int, capacity: int | None,
                          chunks: list[tuple[int, int, bytes]], tail: list[tuple[object, ...]],
                          seen_ids: set[int], seen_order: deque[int],
                          pending: dict[tuple[str, str], UserEvent],
                          due_ns: int | None) -> _Lane:
    """Unpickle a lane written before the dedup memory was a :class:`_Seen`."""
    return _restore_lane_v3(last_seq, capacity, chunks, tail, _Seen.from_ids(seen_order),
                            pending, due_ns)


def _restore_lane_v3(last_seq: int, capacity: int | None,
                     chunks: list[tuple[int, int, bytes]], tail: list[tuple[object, ...]],
                     seen: _Seen, pending: dict[tuple[str, str], UserEvent],
                     due_ns: int | None) -> _Lane:
    """Unpickle a lane written before its chunks could be stored."""
    return _restore_lane_v4(last_seq, capacity, 0, 0, chunks, tail, seen, pending, due_ns, [])


def _restore_lane_v4(last_seq: int, capacity: int | None, stored_first: int, stored: int,
                     chunks: list[tuple[int, int, bytes]], tail: list[tuple[object, ...]],
                     seen: _Seen, pending: dict[tuple[str, str], UserEvent],
                     due_ns: int | None, dropped: list[int]) -> _Lane:
    """Unpickle a lane (see :meth:`_Lane.__reduce__`); the chunks stay frozen."""
    log = _ReplayLog(capacity)
    log.stored_first, log.stored = stored_first, stored
    log.chunks.extend(chunks)
    log.tail = [_sequenced(values) for values in tail]
    log.last_seq = last_seq  # every sequenced event went to the log
    log.dropped = list(dropped)
    return _Lane(last_seq=last_seq, log=log, seen=seen, pending=pending, due_ns=due_ns)


@attrs.define(kw_only=True)
class _Lane:
    """One user's sequencing state (mutable, picklable)."""

    last_seq: int = 0
    log: _ReplayLog
    seen: _Seen = attrs.field(factory=_Seen)
    pending: dict[tuple[str, str], UserEvent] = attrs.field(factory=dict)
    #: When the oldest pending event must be flushed; ``None`` when nothing pends.
    due_ns: int | None = None
    #: Only in a lane restored field by field from a snapshot written before the
    #: dedup memory was a :class:`_Seen` (``Router.__setstate__`` converts it).
    seen_ids: set[int] | None = None
    seen_order: deque[int] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the replay log as where its stored chunks are (two ints), its other
        frozen chunks (bytes, copied as they are) and its unfrozen tail as tuples of
        field values (see :class:`_ReplayLog`). Lanes pickled by earlier versions
        (the whole log as tuples, or field by field, or the dedup memory as a set and
        a deque, or before chunks were stored) still load."""
        log = self.log
        return _restore_lane_v4, (
            self.last_seq, log.capacity, log.stored_first, log.stored, list(log.chunks),
            list(map(_seq_values, log.tail)), self.seen, self.pending, self.due_ns,
            log.dropped)


class Router:
    """Numbers each user's private events, conflates P2/P3, dedups and keeps a replay log.

    Args:
        replay_capacity: how many sequenced events each user's replay log keeps.
        conflation_window_ns: how long P2/P3 events may wait to be conflated
            (0 disables conflation).
        dedup_capacity: how many recent event ids per user are remembered for
            dedup; defaults to, and may not be below, ``replay_capacity``.

    Raises:
        ValueError: a capacity below 1, a negative window, or a dedup memory
            shorter than the replay log.
    """

    def __init__(
        self,
        *,
        replay_capacity: int = 10_000,
        conflation_window_ns: int = 100_000_000,
        dedup_capacity: int | None = None,
    ) -> None:
        if replay_capacity < 1:
            raise ValueError("replay_capacity must be at least 1")
        if conflation_window_ns < 0:
            raise ValueError("conflation_window_ns must not be negative")
        if dedup_capacity is None:
            dedup_capacity = replay_capacity
        if dedup_capacity < replay_capacity:
            raise ValueError("dedup_capacity must be at least replay_capacity")
        self._replay_capacity = replay_capacity
        self._window_ns = conflation_window_ns
        self._dedup_capacity = dedup_capacity
        self._lanes: dict[str, _Lane] = {}
        #: Users whose replay log has something for :meth:`spill`.
        self._unspilled: set[str] = set()
        #: Users with pending events → their flush time (insertion = flush order).
        self._due: dict[str, int] = {}
        #: The one wakeup asked for and not yet seen fired.
        self._armed_ns: int | None = None
        self._published = 0
        self._delivered = 0
        self._deduplicated = 0
        self._conflated = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled router. Lanes pickled field by field (before lanes had
        their own reduce) bring their log as a ``deque`` of events: it is rebuilt
        as a :class:`_ReplayLog`."""
        self.__dict__.update(state)
        unspilled = self.__dict__.setdefault("_unspilled", set())
        for user, lane in self._lanes.items():
            old: Any = lane.log
            if isinstance(old, deque):
                lane.log = _ReplayLog.from_values(old.maxlen, map(_seq_values, old))
            if lane.seen_order is not None:
                lane.seen = _Seen.from_ids(lane.seen_order)
                lane.seen_ids = lane.seen_order = None
            if lane.log.chunks or lane.log.dropped:
                unspilled.add(user)

    # -- handlers --------------------------------------------------------------

    def publish(self, events: Sequence[UserEvent], now_ns: int) -> list[RouterEffect]:
        """Accept one turn's batch of private events.

        Due pending events are flushed first (as by :meth:`tick`), then each
        event is deduplicated, and P0/P1 events are sequenced while P2/P3
        events join their user's conflation map.

        Args:
            events: the batch, in the order the producers emitted it.
            now_ns: the current time.

        Returns:
            At most one :class:`RouterDeliver` per user, then at most one
            :class:`RouterTimer`.

        Raises:
            TypeError: an item is not a :class:`~protocol.UserEvent`.
            ValueError: ``now_ns`` is negative.
        """
        _check_now(now_ns)
        for event in events:
            if not isinstance(event, UserEvent):
                raise TypeError(f"expected a UserEvent, got {type(event).__name__}")
        out: dict[str, list[SequencedEvent]] = {}
        self._flush_due(now_ns, out)
        # Dedup memory and _sequence inlined, the counters in locals: this loop runs
        # for every private event of the engine.
        window_ns = self._window_ns
        conflate = window_ns != 0
        dedup_capacity = self._dedup_capacity
        published = delivered = deduplicated = conflated = 0
        unspilled = self._unspilled
        user: str | None = None
        lane: _Lane
        batch: list[SequencedEvent] | None = None  # out[user], once it exists
        for event in events:
            if event.user != user:
                user = event.user
                lane = self._lane(user)
                batch = out.get(user)
            # _Seen.add's usual case inlined: the user's next id, one run held.
            event_id = event.event_id
            seen = lane.seen
            runs = seen.runs
            if runs and len(runs) == 1 and event_id == (run := runs[0])[1] + 1:
                run[1] = event_id
                if seen.count < dedup_capacity:
                    seen.count += 1
                else:
                    run[0] += 1  # the oldest id is forgotten
            elif not seen.add(event_id, dedup_capacity):
                deduplicated += 1
                continue
            published += 1
            if not conflate or EVENT_PRIORITY[event.kind] <= _IMMEDIATE_MAX_PRIORITY:
                lane.last_seq += 1
                sequenced = SequencedEvent.from_user_event(event, lane.last_seq)
                if lane.log.append(sequenced):
                    unspilled.add(user)
                delivered += 1
                if batch is None:
                    batch = out[user] = []
                batch.append(sequenced)
                continue
            slot = (event.kind, event.key)
            if lane.pending.pop(slot, None) is not None:
                conflated += 1
            lane.pending[slot] = event
            if lane.due_ns is None:
                lane.due_ns = now_ns + window_ns
                self._due[user] = lane.due_ns
        self._published += published
        self._delivered += delivered
        self._deduplicated += deduplicated
        self._conflated += conflated
        return self._effects(out)

    def tick(self, now_ns: int) -> list[RouterEffect]:
        """Flush every user whose conflation window has elapsed at ``now_ns``.

        Args:
            now_ns: the current time.

        Returns:
            At most one :class:`RouterDeliver` per flushed user, then at most
            one :class:`RouterTimer` for the next pending flush.

        Raises:
            ValueError: ``now_ns`` is negative.
        """
        _check_now(now_ns)
        if self._armed_ns is not None and now_ns >= self._armed_ns:
            self._armed_ns = None
        out: dict[str, list[SequencedEvent]] = {}
        self._flush_due(now_ns, out)
        return self._effects(out)

    # -- queries ---------------------------------------------------------------

    def replay(self, user: str, after_seq: int,
               load: ChunkLoader | None = None) -> tuple[SequencedEvent, ...]:
        """The events of ``user`` numbered after ``after_seq``, in seq order.

        Args:
            user: whose events.
            after_seq: the last seq the client holds (0 for none).
            load: reads back the chunks :meth:`spill` handed out (without it, or
                when it has not got one, the events in it are unavailable).

        Returns:
            Exactly the sequenced events with ``seq > after_seq`` (empty when
            ``after_seq`` is the last seq). Pending P2/P3 events are not
            included: they are delivered live when they flush.

        Raises:
            RemoteProtocolError: ``bad_request`` if ``after_seq`` is negative or
                beyond the user's last seq; ``replay_unavailable`` if the log no
                longer holds ``after_seq + 1``, or a stored chunk it needs cannot be
                read back.
        """
        lane = self._lanes.get(user)
        last = 0 if lane is None else lane.last_seq
        if after_seq < 0 or after_seq > last:
            raise RemoteProtocolError(
                ErrorCode.BAD_REQUEST,
                f"after_seq {after_seq} is outside 0..{last}, the last seq for this user",
            )
        if lane is None or after_seq == last:
            return ()
        first = lane.log.first_seq()
        if after_seq + 1 < first:
            raise RemoteProtocolError(
                ErrorCode.REPLAY_UNAVAILABLE,
                f"the replay log starts at seq {first}; events after {after_seq} are gone",
            )
        try:
            return lane.log.after(after_seq, None if load is None else partial(load, user))
        except _ChunkMissing as missing:
            raise RemoteProtocolError(
                ErrorCode.REPLAY_UNAVAILABLE,
                f"the stored events from seq {missing.args[0]} cannot be read back",
            ) from None

    def spill(self) -> tuple[list[tuple[str, int, bytes]], list[tuple[str, int]]]:
        """Hand the frozen replay-log chunks over to the caller's store.

        Returns:
            The chunks frozen since the last call, as ``(user, first seq, bytes)``,
            to store (from now on the logs keep only their seqs, and :meth:`replay`
            reads them back through its ``load``); and the stored chunks that
            expired since, as ``(user, first seq)``, to delete.
        """
        puts: list[tuple[str, int, bytes]] = []
        drops: list[tuple[str, int]] = []
        lanes = self._lanes
        for user in self._unspilled:
            log = lanes[user].log
            puts += [(user, first, blob) for first, _, blob in log.spill()]
            if log.dropped:
                drops += [(user, first) for first in log.dropped]
                log.dropped.clear()
        self._unspilled.clear()
        return puts, drops

    def users(self) -> list[str]:
        """Every user the router has numbered events for (in first-seen order)."""
        return list(self._lanes)

    def last_seq(self, user: str) -> int:
        """The newest seq given to ``user``'s events (0 if none yet)."""
        lane = self._lanes.get(user)
        return 0 if lane is None else lane.last_seq

    def stats(self) -> RouterStats:
        """A snapshot of the router's counters."""
        return RouterStats(
            published=self._published,
            delivered=self._delivered,
            deduplicated=self._deduplicated,
            conflated=self._conflated,
            pending=sum(len(lane.pending) for lane in self._lanes.values()),
            users=len(self._lanes),
        )

    # -- internals ---------------------------------------------------------------

    def _lane(self, user: str) -> _Lane:
        lane = self._lanes.get(user)
        if lane is None:
            lane = self._lanes[user] = _Lane(log=_ReplayLog(self._replay_capacity))
        return lane

    def _sequence(self, lane: _Lane, event: UserEvent) -> SequencedEvent:
        lane.last_seq += 1
        sequenced = SequencedEvent.from_user_event(event, lane.last_seq)
        if lane.log.append(sequenced):
            self._unspilled.add(event.user)
        self._delivered += 1
        return sequenced

    def _flush_due(self, now_ns: int, out: dict[str, list[SequencedEvent]]) -> None:
        due_users = [user for user, due in self._due.items() if due <= now_ns]
        for user in due_users:
            del self._due[user]
            lane = self._lanes[user]
            batch = out.setdefault(user, [])
            for event in lane.pending.values():
                batch.append(self._sequence(lane, event))
            lane.pending.clear()
            lane.due_ns = None

    def _effects(self, out: dict[str, list[SequencedEvent]]) -> list[RouterEffect]:
        effects: list[RouterEffect] = [
            RouterDeliver(user=user, events=tuple(batch)) for user, batch in out.items() if batch
        ]
        if self._due:
            next_due = min(self._due.values())
            if self._armed_ns is None or next_due < self._armed_ns:
                self._armed_ns = next_due
                effects.append(RouterTimer(at_ns=next_due))
        return effects


def _check_now(now_ns: int) -> None:
    if now_ns < 0:
        raise ValueError("now_ns must not be negative")
