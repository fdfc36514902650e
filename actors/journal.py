"""The durability journal: per-actor record streams and snapshots in SQLite.

Every stateful actor (a book, an account, the router) owns one *stream* of the
journal, named after it (``"book:BTC-PERP"``, ``"account:alice"``,
``"router"``). In each processing turn the actor stages what it processed with
:meth:`Journal.append` (and, now and then, a :meth:`Journal.snapshot` of its
state), commits the turn in one transaction (group commit), and only then
acknowledges or emits anything (write-ahead). After a restart,
:meth:`Journal.recover` hands back the latest valid snapshot and the records
after it, from which the actor rebuilds exactly its pre-crash state::

    journal = Journal.open(data_dir)
    recovery = journal.recover("book:BTC-PERP")      # before the first append
    ...
    with journal.turn():                              # one processing turn
        journal.append("book:BTC-PERP", inputs)
    # the turn is durable (per the fsync policy): now send the effects

Offsets are per stream, consecutive integers from 1. Records and snapshots are
pickled (protocol 5) and stored with a BLAKE2b checksum of stream, offset and
payload, verified on every read. **The journal file is trusted like code**:
unpickling runs code, so only the engine may write it. Both are read with plain
``pickle.loads``; they are written two ways (see *encoding* below): a record
(an engine turn's input, pickled every turn) names each engine message's class
and fields by one string per class and record, and is rebuilt by
``actors.journal._restore``; a snapshot pickles attrs objects field by field
(``_attrs_restore``). Every record or snapshot decodes on its own, and records
written by earlier versions (``_attrs_restore``, or attrs' own pickling) load.

Storage is SQLite from the standard library in WAL mode (or ``":memory:"`` for
unit tests). Several processes may open the same file (WAL + busy timeout); the
streams written by different processes must be disjoint.

What survives what (``fsync`` policy, chosen at open):

``always``
    ``synchronous=FULL``: every commit fsyncs the WAL before
    :meth:`Journal.commit` returns. A returned commit survives a process crash
    (``kill -9``) **and** a power loss or kernel panic.
``batch`` (default)
    ``synchronous=NORMAL``: a commit writes its WAL frames into the OS before it
    returns, so it survives a process crash (``kill -9``) but not necessarily a
    power loss; SQLite fsyncs the WAL at checkpoints. In addition every
    ``sync_interval``-th commit (default 100) runs with ``synchronous=FULL``,
    which fsyncs the WAL file and with it every earlier commit. A power loss
    therefore loses at most the last ``sync_interval - 1`` commits (fewer when a
    checkpoint intervened), and never corrupts the file. ``sync_interval=1`` is
    ``always``; ``sync_interval=0`` leaves syncing to checkpoints alone.
``off``
    ``synchronous=OFF``: SQLite never fsyncs. A returned commit still survives
    a process crash (its frames are in the OS page cache); a power loss may
    lose any number of recent commits and may corrupt the file.

Group commit per pass (``defer=True``, shared connections only): the embedded
engine runs every host on the gateway's bridge thread, and nothing a host
emits leaves the process until the bridge hands a pass's messages to the
gateway. There, :meth:`Journal.commit` writes the turn into one transaction
that stays open on the shared connection — a turn of one record is buffered and
the pass's buffered rows are written by one ``executemany``; any other turn goes
in its own savepoint, so a failed one rolls back alone — and :func:`flush_shared`
(called by the bridge before anything reaches a client) writes what is buffered
and commits the whole pass at once, fsyncing per the policy counted in passes. A
failed write of buffered rows fails the whole pass. Write-ahead still holds where it matters:
no reply or event leaves the process before the inputs behind it are
committed, and a crash loses only a pass nobody saw. Readers on the same
connection (a restarted host's recovery) see the pass's writes.

Integrity and recovery: SQLite's own WAL frame checksums already roll a torn
transaction back to the last complete commit. The per-row checksums catch what
slips past that (a damaged page, a bug, a hand edit). :meth:`Journal.recover`
applies this rule to the records after the chosen snapshot:

* a damaged record (checksum mismatch or missing, bad offset) or a gap in
  the offsets that **nothing valid follows** in the stream is the torn tail: it
  is reported in :attr:`Recovery.discarded` and deleted, and new appends
  continue gapless from the last good offset;
* a damaged record or a gap **followed by a valid record** raises
  :class:`JournalCorrupted` (stream and offset): a hole in the middle of the
  history is never skipped silently;
* a record whose checksum is valid but which does not unpickle (a message class
  renamed or removed) raises :class:`JournalCorrupted` wherever it is: its bytes
  are intact and were acknowledged, so it is never deleted.

A journal object is meant for one actor process and one thread at a time (it
holds no lock); the staged turn is per object.
"""

from __future__ import annotations

import collections
import contextlib
import copyreg
import hashlib
import importlib
import io
import logging
import operator
import os
import pickle
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NoReturn, cast

import attrs

__all__ = [
    "DEFAULT_SYNC_INTERVAL",
    "FILE_NAME",
    "FSYNC_POLICIES",
    "Discarded",
    "Journal",
    "JournalCompacted",
    "JournalCorrupted",
    "JournalError",
    "JournalStatistics",
    "Recovery",
    "Snapshot",
    "flush_shared",
]

FILE_NAME: Final = "journal.sqlite3"
FSYNC_POLICIES: Final = ("always", "batch", "off")
DEFAULT_SYNC_INTERVAL: Final = 100
PICKLE_PROTOCOL: Final = 5
#: 2 added the ``blobs`` table; a version-1 journal is upgraded when it is opened.
SCHEMA_VERSION: Final = 2

_RECORD_PERSON: Final = b"emporion.record"
_SNAPSHOT_PERSON: Final = b"emporion.snapsh"
_PAGE: Final = 512  # rows fetched per query by read()
_KEEP_BUFFER: Final = 1 << 20  # a journal keeps its pickling buffer up to this size

_SCHEMA: Final = (
    # Records and snapshots are rowid tables with a (stream, seq) primary-key index,
    # not WITHOUT ROWID: SQLite advises WITHOUT ROWID only for rows well under a
    # twentieth of a page, and an engine turn's record is ~0.5-2 KB (a snapshot
    # megabytes). Measured: inserting 1 KB rows, 22 µs per row instead of 61 µs.
    # Journals created with the earlier WITHOUT ROWID tables work unchanged (same
    # columns, same key, same statements).
    """CREATE TABLE IF NOT EXISTS records (
        stream TEXT NOT NULL,
        seq INTEGER NOT NULL,
        payload BLOB NOT NULL,
        checksum BLOB NOT NULL,
        PRIMARY KEY (stream, seq)
    )""",
    """CREATE TABLE IF NOT EXISTS snapshots (
        stream TEXT NOT NULL,
        seq INTEGER NOT NULL,
        state BLOB NOT NULL,
        checksum BLOB NOT NULL,
        PRIMARY KEY (stream, seq)
    )""",
    # base: every record at or below it was compacted away.
    """CREATE TABLE IF NOT EXISTS streams (
        name TEXT PRIMARY KEY,
        base INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    # A stream's blobs (Journal.put_blobs): immutable pieces of its state kept out of
    # its snapshots, by (name, key).
    """CREATE TABLE IF NOT EXISTS blobs (
        stream TEXT NOT NULL,
        name TEXT NOT NULL,
        key INTEGER NOT NULL,
        data BLOB NOT NULL,
        checksum BLOB NOT NULL,
        PRIMARY KEY (stream, name, key)
    )""",
)

_INSERT_RECORD: Final = "INSERT INTO records (stream, seq, payload, checksum) VALUES (?, ?, ?, ?)"
_INSERT_SNAPSHOT: Final = (
    "INSERT OR REPLACE INTO snapshots (stream, seq, state, checksum) VALUES (?, ?, ?, ?)"
)
# CAST: a damaged value may have turned into TEXT that is not UTF-8, which the sqlite3
# module fails to fetch; as bytes it simply fails its checksum.
_SELECT_RECORDS: Final = (
    "SELECT seq, CAST(payload AS BLOB), CAST(checksum AS BLOB) FROM records"
    " WHERE stream = ? AND seq > ? ORDER BY seq"
)
_SELECT_SNAPSHOTS: Final = (
    "SELECT seq, CAST(state AS BLOB), CAST(checksum AS BLOB) FROM snapshots"
    " WHERE stream = ? ORDER BY seq DESC"
)
_REGISTER_STREAM: Final = "INSERT OR IGNORE INTO streams (name, base) VALUES (?, 0)"
_PUT_BLOB: Final = (
    "INSERT OR REPLACE INTO blobs (stream, name, key, data, checksum) VALUES (?, ?, ?, ?, ?)"
)
_DROP_BLOB: Final = "DELETE FROM blobs WHERE stream = ? AND name = ? AND key = ?"
_SELECT_BLOB: Final = (
    "SELECT CAST(data AS BLOB), CAST(checksum AS BLOB) FROM blobs"
    " WHERE stream = ? AND name = ? AND key = ?"
)


#: Shared connections: (real path, pid, thread id) ->
#: [connection, users, fsync policy, sync interval, passes since the last fsync,
#: buffered record rows of the open pass, why the open pass failed (None: it did not),
#: the connection's background checkpointer (None: SQLite's own autocheckpoint),
#: buffered blob puts and drops of the open pass, in order (``(put?, row)``)].
_SHARED: dict[tuple[str, int, int], list[Any]] = {}
# Indexes into a _SHARED entry.
_PENDING: Final = 5
_PASS_FAILED: Final = 6
_CHECKPOINTER: Final = 7
_PENDING_BLOBS: Final = 8

log = logging.getLogger(__name__)

#: Seconds between the background checkpoints of a deferring (embedded) journal.
CHECKPOINT_INTERVAL_S: Final = 0.2


class _Checkpointer:
    """Checkpoints a WAL file from its own thread and connection, every
    :data:`CHECKPOINT_INTERVAL_S`.

    SQLite's automatic checkpoint runs inside the commit that pushes the WAL past
    1,000 pages: for the embedded engine that is the bridge's pass commit, which
    then copied pages into the database file and fsynced it while every request
    waited. Measured under bench/gateway.py's order load: 9 pass commits over
    20 ms (up to 65 ms) with it, 2 with autocheckpoint off. So a deferring
    connection turns autocheckpoint off and this thread checkpoints instead
    (``PASSIVE``: it never blocks the writer, and the sqlite3 call releases the
    GIL). Durability is unchanged: a checkpoint only moves committed frames.
    """

    def __init__(self, path: str, synchronous: str) -> None:
        self._path = path
        self._synchronous = synchronous
        self._stop = threading.Event()
        #: The last checkpoint's ``(busy, WAL frames, frames checkpointed)``; ``done``
        #: is set after every checkpoint (tests wait on it).
        self.last: tuple[int, int, int] | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="journal-checkpointer",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            log.exception("journal checkpointer: cannot open %s", self._path)
            return
        try:
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            while not self._stop.wait(CHECKPOINT_INTERVAL_S):
                try:
                    row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.last = (int(row[0]), int(row[1]), int(row[2]))
                    self.done.set()
                except sqlite3.Error as exc:  # e.g. busy: the next round retries
                    log.warning("journal checkpointer: %s", exc)
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop the thread (after any checkpoint in progress) and close its connection."""
        self._stop.set()
        self._thread.join()


def _write_pending(entry: list[Any]) -> None:
    """Write the buffered record rows of a shared connection's open pass (one
    ``executemany``), beginning the pass's transaction if need be.

    A failed write rolls the whole pass back and marks it failed, so that
    :func:`flush_shared` refuses to commit what the pass wrote afterwards.

    Raises:
        JournalError: the write failed.
    """
    rows = entry[_PENDING]
    blobs: list[tuple[bool, tuple[Any, ...]]] = entry[_PENDING_BLOBS]
    if not rows and not blobs:
        return
    conn: sqlite3.Connection = entry[0]
    try:
        if not conn.in_transaction:
            conn.execute("BEGIN IMMEDIATE")
        if rows:
            conn.executemany(_INSERT_RECORD, rows)
        # The blob puts and drops in their order, each run of one kind in one call.
        start = 0
        while start < len(blobs):
            put = blobs[start][0]
            end = start
            while end < len(blobs) and blobs[end][0] == put:
                end += 1
            conn.executemany(_PUT_BLOB if put else _DROP_BLOB,
                             [row for _, row in blobs[start:end]])
            start = end
    except sqlite3.Error as exc:
        entry[_PASS_FAILED] = (f"writing {len(rows)} buffered records and {len(blobs)} "
                               f"blob changes failed: {exc}")
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise JournalError(f"journal pass {entry[_PASS_FAILED]}") from exc
    finally:
        rows.clear()
        blobs.clear()


def flush_shared() -> int:
    """Commit the open pass of every deferring journal of this process and thread
    (see *Group commit per pass*); returns how many connections committed.

    Raises:
        JournalError: a commit failed (the pass is rolled back).
    """
    me = (os.getpid(), threading.get_ident())
    done = 0
    for key, entry in list(_SHARED.items()):
        conn = entry[0]
        if key[1:] != me:
            continue
        if entry[_PASS_FAILED] is None:
            with contextlib.suppress(JournalError):  # reported just below
                _write_pending(entry)
        failed = entry[_PASS_FAILED]
        if failed is not None:
            # A buffered write of this pass failed and rolled the pass back: what
            # the pass wrote since must not commit alone. Reported once.
            entry[_PASS_FAILED] = None
            entry[_PENDING].clear()
            entry[_PENDING_BLOBS].clear()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise JournalError(f"journal pass {failed}")
        if not conn.in_transaction:
            continue
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise JournalError(f"journal pass commit failed: {exc}") from exc
        done += 1
        policy, interval = entry[2], entry[3]
        entry[4] += 1
        if policy == "batch" and interval > 0 and entry[4] >= interval:
            entry[4] = 0
            _fsync_wal(key[0])
    return done


# -- encoding -----------------------------------------------------------------------------

#: The reducer of an object that keeps pickle's own way (``__reduce_ex__``).
def _own_reduce(obj: Any) -> Any:
    return obj.__reduce_ex__(PICKLE_PROTOCOL)


def _attrs_restore(cls: type, names: tuple[str, ...], values: tuple[Any, ...]) -> Any:
    """Unpickle what :class:`_Reducers` pickled: set the fields as attrs' own
    ``__setstate__`` does (no ``__init__``, no validators).

    A field the class gained since the object was written (not in ``names``)
    gets its default, so adding a field with a default to an engine message or
    a core's state keeps old records and snapshots loadable.

    Raises:
        TypeError: such a field has no default.
    """
    obj: Any = object.__new__(cls)
    for name, value in zip(names, values, strict=True):
        object.__setattr__(obj, name, value)
    if len(names) != _FIELD_COUNTS.get(cls, -1):
        for name, default, factory in _added_fields(cls, names):
            object.__setattr__(obj, name, default() if factory else default)
    return obj


#: How many attrs fields each class restored by :func:`_attrs_restore` has.
_FIELD_COUNTS: dict[type, int] = {}
_ADDED: dict[tuple[type, tuple[str, ...]], tuple[tuple[str, Any, bool], ...]] = {}


def _added_fields(cls: type, names: tuple[str, ...]) -> tuple[tuple[str, Any, bool], ...]:
    """The fields of ``cls`` missing from ``names``, each with its default and
    whether the default is a factory to call (cached per class and names)."""
    key = (cls, names)
    added = _ADDED.get(key)
    if added is None:
        fields = attrs.fields(cast(Any, cls))
        missing = []
        for field in fields:
            if field.name in names:
                continue
            default = field.default
            if default is attrs.NOTHING:
                raise TypeError(f"{cls.__qualname__} was written without {field.name!r}, "
                                "which has no default")
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                if default.takes_self:
                    raise TypeError(f"{cls.__qualname__}.{field.name}: a default that "
                                    "takes self cannot be restored")
                missing.append((field.name, default.factory, True))
            else:
                missing.append((field.name, default, False))
        added = _ADDED[key] = tuple(missing)
        _FIELD_COUNTS[cls] = len(fields)
    return added


def _is_plain_attrs(cls: type) -> bool:
    """A slotted attrs class that pickles the attrs way (no reduce or state of its own)."""
    if not attrs.has(cls) or "__slots__" not in cls.__dict__:
        return False
    if cls.__reduce_ex__ is not object.__reduce_ex__ or cls.__reduce__ is not object.__reduce__:
        return False
    own = (getattr(cls, "__getstate__", None), getattr(cls, "__setstate__", None))
    return all("slots_" in getattr(f, "__qualname__", "") for f in own)


class _Reducers(dict[type, Callable[[Any], Any]]):
    """The snapshot pickler's dispatch table, filled per class on first sight (records
    until the record encoding below; those records still load).

    A slotted attrs class (every engine message and most core state) pickles by
    default through attrs' ``__getstate__``, a Python dict comprehension per object
    (~9 % of the engine thread in bench/actors.py, py-spy). Here it pickles as
    ``_attrs_restore(cls, field names, field values)``: the values come from one C
    ``attrgetter`` call, and the class and the names tuple are memoized once per
    pickle. Loading sets the same attributes attrs' ``__setstate__`` would, and
    records pickled the default way still load. Other classes keep their own reduce.
    """

    def __missing__(self, cls: type) -> Callable[[Any], Any]:
        if issubclass(cls, type):
            raise KeyError(cls)  # a class with a metaclass: pickle saves it by name
        registered = copyreg.dispatch_table.get(cls)
        reducer: Callable[[Any], Any] = _own_reduce if registered is None else registered
        if registered is None and _is_plain_attrs(cls):
            names = tuple(a.name for a in attrs.fields(cast(Any, cls)))
            if len(names) > 1:
                values = operator.attrgetter(*names)

                def reducer(obj: Any) -> Any:
                    return _attrs_restore, (cls, names, values(obj))
            elif names:
                name = names[0]

                def reducer(obj: Any) -> Any:
                    return _attrs_restore, (cls, names, (getattr(obj, name),))
        self[cls] = reducer
        return reducer


class _Pickler(pickle.Pickler):
    dispatch_table = _Reducers()


def _dumps(obj: object) -> bytes:
    """Pickle ``obj`` (protocol 5) with the journal's snapshot encoding (attrs field by
    field, :class:`_Reducers`), in a fresh pickler."""
    buffer = io.BytesIO()
    _Pickler(buffer, PICKLE_PROTOCOL).dump(obj)
    return buffer.getvalue()


# -- the record encoding ----------------------------------------------------------------
#
# A record is one engine turn's input (an ``EngineBatch`` of messages), pickled
# in every turn, so it has its own, leaner encoding: measured 1.7-2.6x faster
# per batch than _Pickler's, except UserEvent batches (1.3x: their wire ``data``
# dicts, pickled natively, are most of the work). It is still a pickle that
# plain ``pickle.loads`` reads, so every record ever written loads the same way:
#
# * An engine message (a plain slotted attrs class, or a NamedTuple event)
#   pickles as ``_restore(tag, *values)``. The tag is one string naming the
#   class, ``"module:qualname"``, followed for an attrs class by its field names
#   (``"actors.messages:Dest kind key"``); it is pickled once per record (memo)
#   and the class is looked up by name when the record loads, as pickle looks up
#   a global. There is no class global per class and no names tuple per object.
#   Loading validates what the old encodings did: an attrs object gets exactly
#   the named fields (as _attrs_restore), a NamedTuple is rebuilt by its
#   ``__new__`` (as pickle's NEWOBJ).
# * The one global, ``actors.journal._restore``, is written by a fixed prefix
#   (_RECORD_PREFIX) in front of every record, and the record's pickler starts
#   from a memo that already holds it (_RECORD_MEMO), so the pickler never looks
#   the function up (pickle's save_global imports its module: ~0.9 us a record).
#   The memo is replaced per record by a copy of a pre-sized template: it never
#   grows (clear_memo keeps a table's size, and clearing a table grown by one
#   big pickle cost ~230 us per later record) nor regrows from scratch.
# * Anything else keeps the snapshot encoding (_Reducers).
#
# Stored records name ``actors.journal._restore`` and ``_attrs_restore`` and the
# message classes and fields: renaming any of them makes those records unreadable.


def _restore(tag: str, *values: Any) -> Any:
    """Unpickle an engine message of a record: see *the record encoding* above.

    Raises:
        AttributeError, ImportError, TypeError, ValueError: The class named by
            the tag is gone, no longer fits the values, or the tag is malformed.
    """
    make = _RESTORERS.get(tag)
    if make is None:
        make = _RESTORERS[tag] = _restorer(tag)
    return make(values)


def _find_class(module: str, qualname: str) -> type:
    """The class ``module:qualname`` (as pickle finds a global), or raise."""
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    if not isinstance(found, type):
        raise TypeError(f"{module}:{qualname} is not a class")
    return found


def _restorer(tag: str) -> Callable[[tuple[Any, ...]], Any]:
    """The loader of one record tag (cached in _RESTORERS)."""
    path, *fields = tag.split(" ")
    module, sep, qualname = path.partition(":")
    if not (sep and module and qualname):
        raise ValueError(f"malformed journal record tag {tag!r}")
    cls = _find_class(module, qualname)
    if fields:
        names = tuple(fields)
        return lambda values: _attrs_restore(cls, names, values)
    new = cls.__new__
    return lambda values: new(cls, *values)


_RESTORERS: dict[str, Callable[[tuple[Any, ...]], Any]] = {}

#: The code object every ``collections.namedtuple`` class's ``__getnewargs__`` shares.
_NAMEDTUPLE_GETNEWARGS: Final = (
    vars(collections.namedtuple("_Probe", "a"))["__getnewargs__"].__code__
)


def _is_plain_namedtuple(cls: type) -> bool:
    """A NamedTuple class that pickles the default way: ``cls.__new__(cls, *fields)``."""
    own = cls.__dict__
    getnewargs = own.get("__getnewargs__")
    plain: Any = object  # the methods a default-pickled object does not override
    return (
        cls.__bases__ == (tuple,)
        and own.get("__slots__") == ()
        and isinstance(own.get("_fields"), tuple)
        and getattr(getnewargs, "__code__", None) is _NAMEDTUPLE_GETNEWARGS
        and getattr(cls, "__reduce_ex__", None) is plain.__reduce_ex__
        and getattr(cls, "__reduce__", None) is plain.__reduce__
        and getattr(cls, "__getstate__", None) is plain.__getstate__
        and "__getnewargs_ex__" not in own
    )


def _record_tag(cls: type) -> tuple[str, tuple[str, ...]] | None:
    """The record tag of an engine-message class and its attrs field names (empty for a
    NamedTuple), or None for a class that keeps the snapshot encoding."""
    if copyreg.dispatch_table.get(cls) is not None:
        return None
    if _is_plain_attrs(cls):
        names = tuple(a.name for a in attrs.fields(cast(Any, cls)))
        if not names:
            return None
    elif _is_plain_namedtuple(cls):
        names = ()
    else:
        return None
    module, qualname = getattr(cls, "__module__", None), getattr(cls, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        return None
    if any(" " in s or ":" in s for s in (module, qualname, *names)):
        return None
    try:
        if _find_class(module, qualname) is not cls:
            return None  # not reachable by name (a local class): pickle decides
    except Exception:  # any failure to look it up: not reachable by name
        return None
    return " ".join((f"{module}:{qualname}", *names)), names


class _RecordReducers(_Reducers):
    """The record pickler's dispatch table: engine messages as ``_restore(tag, *values)``
    (values from one C call: an ``attrgetter``, or the tuple itself), anything else as
    :class:`_Reducers` does."""

    def __missing__(self, cls: type) -> Callable[[Any], Any]:
        found = None if issubclass(cls, type) else _record_tag(cls)
        if found is None:
            return super().__missing__(cls)
        tag, names = found
        head = (tag,)
        reducer: Callable[[Any], Any]
        if not names:

            def reducer(obj: Any) -> Any:
                return _restore, head + obj

        elif len(names) == 1:
            name = names[0]

            def reducer(obj: Any) -> Any:
                return _restore, (tag, getattr(obj, name))

        else:
            values = operator.attrgetter(*names)

            def reducer(obj: Any) -> Any:
                return _restore, head + values(obj)

        self[cls] = reducer
        return reducer


class _RecordPickler(pickle.Pickler):
    dispatch_table = _RecordReducers()


def _record_memo(slots: int) -> tuple[bytes, Any]:
    """The record prefix that makes ``_restore`` memo entry 2, and a memo template
    that holds it, in a table of ``slots`` (32, 128, 512...: pickle grows a table
    fourfold once it is 2/3 full); a plain empty memo and no prefix where the
    pickler's memo does not behave as measured."""
    module, name = _restore.__module__, _restore.__qualname__
    template = pickle.Pickler(io.BytesIO(), PICKLE_PROTOCOL)
    template.dump(tuple(str(i) for i in range(slots * 2 // 3 - 8)))  # size the table
    template.clear_memo()
    template.dump(_restore)  # memoizes the module name (0), the name (1), the function (2)
    memo = template.memo
    if type(memo).__name__ != "PicklerMemoProxy":
        return b"", {}
    held = {index: obj for index, obj in memo.copy().values()}
    if held.keys() != {0, 1, 2} or held[0] != module or held[1] != name or held[2] is not _restore:
        return b"", {}
    prefix = (
        pickle.PROTO + bytes([PICKLE_PROTOCOL])
        + pickle.SHORT_BINUNICODE + bytes([len(module)]) + module.encode() + pickle.MEMOIZE
        + pickle.SHORT_BINUNICODE + bytes([len(name)]) + name.encode() + pickle.MEMOIZE
        + pickle.STACK_GLOBAL + pickle.MEMOIZE + pickle.POP
    )
    return prefix, memo


# Copying a template costs with its size, and growing a table as it fills costs
# too: a journal starts each record from the small template (128 slots: records up
# to ~85 memo entries, ~0.9 KB: a book's or an account's turn), or from the large
# one (512 slots) after a record above _LARGE_RECORD bytes (the router's turns).
# Measured: Fill batches 0.4 us faster than with 512 slots, UserEvent batches
# 1.4 us faster than with 128.
_RECORD_PREFIX, _RECORD_MEMO = _record_memo(128)
_RECORD_MEMO_LARGE = _record_memo(512)[1]
_LARGE_RECORD: Final = 750


def _dumps_record(obj: object) -> bytes:
    """Pickle ``obj`` with the record encoding, in a fresh pickler (as Journal.append)."""
    buffer = io.BytesIO()
    buffer.write(_RECORD_PREFIX)
    pickler = _RecordPickler(buffer, PICKLE_PROTOCOL)
    pickler.memo = _RECORD_MEMO
    pickler.dump(obj)
    return buffer.getvalue()


def _fsync_wal(path: str) -> None:
    """fsync the WAL file: every commit in it becomes durable (``batch`` policy)."""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path + "-wal", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class JournalError(Exception):
    """The journal cannot do what was asked (misuse, a failed commit, a closed journal)."""


class JournalCorrupted(JournalError):  # noqa: N818  (the name says what happened)
    """A stream's stored history is damaged where it cannot be repaired safely.

    Attributes:
        stream: The stream concerned.
        offset: The first offset that is damaged or missing.
        reason: What is wrong with it.
    """

    def __init__(self, stream: str, offset: int, reason: str) -> None:
        super().__init__(f"journal stream {stream!r} is corrupted at offset {offset}: {reason}")
        self.stream = stream
        self.offset = offset
        self.reason = reason


class JournalCompacted(JournalError):  # noqa: N818
    """Records that were asked for were deleted by :meth:`Journal.compact`.

    Attributes:
        stream: The stream concerned.
        after: The offset the reader asked to read after.
        base: Every record at or below this offset was compacted away.
    """

    def __init__(self, stream: str, after: int, base: int) -> None:
        super().__init__(
            f"journal stream {stream!r}: records up to offset {base} were compacted,"
            f" cannot read after {after}"
        )
        self.stream = stream
        self.after = after
        self.base = base


@attrs.frozen
class Snapshot:
    """An actor's state as of ``offset`` (every record up to it applied)."""

    offset: int
    state: object


@attrs.frozen
class Discarded:
    """A stored item that recovery found damaged and deleted, with why."""

    offset: int
    reason: str


@attrs.frozen(kw_only=True)
class Recovery:
    """What a restarting actor rebuilds from: ``snapshot`` then ``records`` in order.

    Attributes:
        stream: The stream recovered.
        snapshot: The latest valid snapshot, or None to start from the initial state.
        records: ``(offset, record)`` after the snapshot, consecutive, all verified.
        discarded: Damaged tail records that were deleted (offset and reason).
        discarded_snapshots: Snapshots whose checksum failed; they were deleted.
        last_offset: The last good offset; the next append continues after it.
    """

    stream: str
    snapshot: Snapshot | None
    records: list[tuple[int, object]]
    discarded: list[Discarded]
    discarded_snapshots: list[Discarded]
    last_offset: int


@attrs.frozen(kw_only=True)
class JournalStatistics:
    """Counters since this journal object was opened.

    Attributes:
        commits: Transactions committed by :meth:`Journal.commit` (empty ones not counted).
        records: Records committed.
        snapshots: Snapshots committed.
        synced_commits: Commits that fsynced the WAL before returning (all of them under
            ``always``, every ``sync_interval``-th under ``batch``, none under ``off``).
        staged_records: Records staged for the current turn, not yet committed.
    """

    commits: int
    records: int
    snapshots: int
    synced_commits: int
    staged_records: int


class _Invalid(Exception):  # noqa: N818  (internal signal, never escapes)
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _checksum(person: bytes, stream: str, offset: int, data: bytes) -> bytes:
    # Stream names hold no NUL and the offset has a fixed width: the prefix is unambiguous.
    key = stream.encode() + b"\0" + offset.to_bytes(8, "big")
    return hashlib.blake2b(key + data, digest_size=16, person=person).digest()


def _blob_checksum(stream: str, name: str, key: int, data: bytes) -> bytes:
    """A blob's checksum: CRC-32 of its place and bytes. Blobs are written often and in
    bulk (the router's replay chunks), and BLAKE2b over them was ~1/3 of what storing
    them cost (callgrind); damage, not an adversary, is what the check is for."""
    place = f"{stream}\0{name}\0{key}".encode()
    return zlib.crc32(data, zlib.crc32(place)).to_bytes(4, "big")


def _check_intact(
    person: bytes, stream: str, offset: object, data: object, checksum: object
) -> int:
    """Return the row's offset if its bytes are intact, else raise ``_Invalid``."""
    if not isinstance(offset, int) or offset < 0:
        raise _Invalid(f"bad offset value {offset!r}")
    if not isinstance(data, bytes):
        raise _Invalid("payload missing or not a blob")
    if not isinstance(checksum, bytes) or not checksum:
        raise _Invalid("checksum missing")
    if checksum != _checksum(person, stream, offset, data):
        raise _Invalid("checksum mismatch")
    return offset


def _unpickle(stream: str, offset: int, data: bytes, what: str) -> object:
    try:
        return pickle.loads(data)
    except Exception as exc:  # pickle raises anything: AttributeError, ImportError, EOFError...
        raise JournalCorrupted(
            stream, offset, f"{what} checksum is valid but it does not unpickle"
            f" ({type(exc).__name__}: {exc}); a message class renamed or removed?"
        ) from exc


def _check_stream(stream: str) -> None:
    if not isinstance(stream, str) or not stream or "\0" in stream:
        raise ValueError(f"a stream name is a non-empty string without NUL, not {stream!r}")


class Journal:
    """Append-only record streams with snapshots, group-committed per turn.

    Args:
        path: The SQLite file, or ``":memory:"`` (unit tests; nothing survives).
        fsync: ``"always"``, ``"batch"`` or ``"off"`` (see the module docstring).
        sync_interval: Under ``batch``, every this-many-th commit fsyncs the WAL
            (0: only at checkpoints). Ignored by the other policies.
        busy_timeout: Seconds to wait for another process's write lock.

    Raises:
        ValueError: An unknown policy or a negative interval.
        JournalError: The file holds a journal of another schema version.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: str = "batch",
        sync_interval: int = DEFAULT_SYNC_INTERVAL,
        busy_timeout: float = 5.0,
        share: bool = False,
        defer: bool = False,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}, not {fsync!r}")
        if sync_interval < 0:
            raise ValueError(f"sync_interval must be >= 0, not {sync_interval}")
        self.path = str(path)
        self.fsync = fsync
        self.sync_interval = sync_interval
        # Sharing: journals of one process and thread on one file (the embedded
        # engine's hosts all run on the bridge thread) use one connection. Each
        # journal still stages and commits its own turns, but a connection that
        # another connection's commit did not just invalidate keeps its page cache
        # warm: measured, per-turn commits got several times cheaper.
        self._share_key: tuple[str, int, int] | None = None
        if share and self.path != ":memory:":
            key = (os.path.realpath(self.path), os.getpid(), threading.get_ident())
            entry = _SHARED.get(key)
            if entry is not None:
                entry[1] += 1
                self._share_key = key
        if self._share_key is None:
            # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
            # check_same_thread=False: the object may be created on one thread and used
            # on another (the embedded bridge thread); one thread uses it at a time.
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            try:
                self._setup(conn)
            except BaseException:
                conn.close()
                raise
            if share and self.path != ":memory:":
                key = (os.path.realpath(self.path), os.getpid(), threading.get_ident())
                checkpointer = None
                if defer:
                    conn.execute("PRAGMA wal_autocheckpoint=0")
                    checkpointer = _Checkpointer(self.path, self._base_synchronous())
                _SHARED[key] = [conn, 1, fsync, sync_interval, 0, [], None, checkpointer, []]
                self._share_key = key
        else:
            conn = _SHARED[self._share_key][0]
        self._conn: sqlite3.Connection | None = conn
        #: Group commit per pass: only for a shared connection (see the module doc).
        self.defer = defer and self._share_key is not None
        # The shared connection's entry (its buffered rows), or None.
        self._shared: list[Any] | None = (
            _SHARED[self._share_key] if self._share_key is not None else None)
        # Committed last offset per stream (loaded lazily), and the staged turn.
        self._last: dict[str, int] = {}
        self._registered: set[str] = set()
        self._rows: list[tuple[str, int, bytes, bytes]] = []
        self._snapshots: list[tuple[str, int, bytes, bytes]] = []
        self._compactions: dict[str, int] = {}
        self._blob_puts: list[tuple[str, str, int, bytes, bytes]] = []
        self._blob_drops: list[tuple[str, str, int]] = []
        self._staged_last: dict[str, int] = {}
        self._in_turn = False
        self._since_sync = 0
        self._commits = 0
        self._records = 0
        self._snapshot_count = 0
        self._synced = 0
        # One record pickler per journal, reused (its memo reset per record): building
        # a Pickler and a buffer per record was ~11 % of record pickling.
        self._new_pickler()
        #: Payload bytes of every record staged by :meth:`append` since this object
        #: was opened (committed or not): a writer paces its snapshots by it.
        self.appended_bytes = 0

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        fsync: str = "batch",
        sync_interval: int = DEFAULT_SYNC_INTERVAL,
        busy_timeout: float = 5.0,
        share: bool = False,
        defer: bool = False,
    ) -> Journal:
        """Open (creating if needed) ``data_dir/journal.sqlite3``.

        Args:
            data_dir: The engine's data directory; created with its parents if missing.
            fsync: The fsync policy: ``"always"``, ``"batch"`` or ``"off"``.
            sync_interval: Under ``batch``, every this-many-th commit fsyncs.
            busy_timeout: Seconds to wait for another process's write lock.
            share: Share one connection with the journals of this process and thread.
            defer: With ``share``: group commit per pass (:func:`flush_shared`).

        Returns:
            The open journal.
        """
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(
            data_dir / FILE_NAME, fsync=fsync, sync_interval=sync_interval,
            busy_timeout=busy_timeout, share=share, defer=defer,
        )

    def _new_pickler(self) -> None:
        self._buffer = io.BytesIO()
        self._buffer.write(_RECORD_PREFIX)  # stays in front of every record
        self._pickler = _RecordPickler(self._buffer, PICKLE_PROTOCOL)
        self._memo: Any = _RECORD_MEMO

    def _encode(self, record: object) -> bytes:
        """What :func:`_dumps_record` returns, with this journal's reused pickler."""
        buffer = self._buffer
        buffer.seek(len(_RECORD_PREFIX))
        buffer.truncate()
        pickler = self._pickler
        try:
            pickler.memo = self._memo  # a copy: the template never changes
            pickler.dump(record)
        except BaseException:
            # A failed dump may leave the pickler mid-frame: start afresh next time.
            self._new_pickler()
            raise
        data = buffer.getvalue()
        self._memo = _RECORD_MEMO_LARGE if len(data) > _LARGE_RECORD else _RECORD_MEMO
        if len(data) > _KEEP_BUFFER:
            self._new_pickler()  # do not hold a big record's worth of memory
        return data

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA synchronous={self._base_synchronous()}")
        if self.path != ":memory:" and os.path.exists(self.path):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == SCHEMA_VERSION:
                # An existing journal: no write lock needed to open it (a deferring
                # pass of this thread may hold that lock until the bridge flushes).
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() == "wal":
                    return
        conn.execute("PRAGMA journal_mode=WAL")  # a no-op (stays "memory") for :memory:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):  # 1: upgraded (the blobs table)
                raise JournalError(
                    f"{self.path}: journal schema version {version}, expected {SCHEMA_VERSION}"
                )
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _base_synchronous(self) -> str:
        return {"always": "FULL", "batch": "NORMAL", "off": "OFF"}[self.fsync]

    @property
    def _db(self) -> sqlite3.Connection:
        """The connection, for a statement: the buffered rows of the open pass (see
        :meth:`_write_deferred`) are written first, so every statement — a read
        included — sees the pass's records in order."""
        conn = self._conn
        if conn is None:
            raise JournalError("the journal is closed")
        shared = self._shared
        if shared is not None and (shared[_PENDING] or shared[_PENDING_BLOBS]):
            _write_pending(shared)
        return conn

    def _check_open(self) -> None:
        if self._conn is None:
            raise JournalError("the journal is closed")

    # -- writing ---------------------------------------------------------------------------

    def append(self, stream: str, records: Sequence[object]) -> int:
        """Stage records for the current turn; they are written by the next commit.

        All records are pickled first: if one does not pickle, nothing is staged.

        Args:
            stream: The writer's stream.
            records: The records, in order; offsets follow the stream's last one.

        Returns:
            The offset of the last record staged (the stream's last offset if
            ``records`` is empty).

        Raises:
            ValueError: A bad stream name.
            JournalError: The journal is closed.
            pickle.PicklingError, TypeError, AttributeError: A record does not pickle.
        """
        last = self._next_base(stream)
        rows: list[tuple[str, int, bytes, bytes]] = []
        size = 0
        for record in records:
            last += 1
            payload = self._encode(record)
            size += len(payload)
            rows.append((stream, last, payload, _checksum(_RECORD_PERSON, stream, last, payload)))
        if rows:
            self._rows.extend(rows)
            self._staged_last[stream] = last
            self.appended_bytes += size
        return last

    def snapshot(self, stream: str, offset: int, state: object) -> int:
        """Stage a snapshot of the stream's state as of ``offset``, for the current turn.

        A snapshot at an offset that already has one replaces it.

        Args:
            stream: The writer's stream.
            offset: Every record up to this one (staged or committed) is reflected in
                ``state``; at most the stream's staged last offset.
            state: The actor's state (pickled now, so later mutation does not leak in).

        Returns:
            The size of the pickled state in bytes (a writer may pace its snapshots by it).

        Raises:
            ValueError: A bad stream name or an offset outside the stream.
            JournalError: The journal is closed.
        """
        last = self._next_base(stream)
        base = self._base(stream)
        if not base <= offset <= last:
            raise ValueError(
                f"snapshot offset {offset} of {stream!r} outside [{base}, {last}]"
            )
        data = _dumps(state)  # a fresh pickler: a snapshot's memo is large
        checksum = _checksum(_SNAPSHOT_PERSON, stream, offset, data)
        self._snapshots.append((stream, offset, data, checksum))
        self._staged_last.setdefault(stream, last)
        return len(data)

    def put_blobs(self, stream: str, blobs: Sequence[tuple[str, int, bytes]]) -> None:
        """Stage blobs of the stream for the current turn: ``(name, key, data)`` each.

        A blob is a piece of the stream's state that never changes once written (the
        router's frozen replay-log chunks), kept here so that snapshots can refer to it
        instead of holding it, and read back by :meth:`get_blob`. It is written in the
        turn's transaction, so a snapshot staged after it in the same turn may refer
        to it. Putting an existing ``(name, key)`` again replaces it (a replayed turn
        puts the same bytes). Compaction does not touch blobs: the writer drops them
        (:meth:`drop_blobs`).

        Raises:
            ValueError: A bad stream name.
            JournalError: The journal is closed.
        """
        _check_stream(stream)
        self._check_open()
        for name, key, data in blobs:
            checksum = _blob_checksum(stream, name, key, data)
            self._blob_puts.append((stream, name, key, data, checksum))

    def drop_blobs(self, stream: str, keys: Sequence[tuple[str, int]]) -> None:
        """Stage the deletion of the stream's blobs ``(name, key)`` for the current turn
        (after the turn's puts; a missing one is no error)."""
        _check_stream(stream)
        self._check_open()
        self._blob_drops.extend((stream, name, key) for name, key in keys)

    def get_blob(self, stream: str, name: str, key: int) -> bytes | None:
        """A committed blob of the stream (or one written by this thread's open pass),
        None if there is none.

        Raises:
            JournalCorrupted: The blob's bytes fail their checksum.
            JournalError: The journal is closed.
        """
        row = self._db.execute(_SELECT_BLOB, (stream, name, key)).fetchone()
        if row is None:
            return None
        data, checksum = row
        if not isinstance(data, bytes) or checksum != _blob_checksum(stream, name, key, data):
            raise JournalCorrupted(stream, key, f"blob {name!r}: checksum mismatch")
        return data

    def compact(self, stream: str, keep_after: int) -> None:
        """Stage the deletion of the records up to ``keep_after``, for the current turn.

        Only records covered by a snapshot may go: there must be a snapshot
        (committed or staged) at ``keep_after`` or later. Snapshots older than
        ``keep_after`` are deleted too (the records after them are gone).
        Afterwards :meth:`read` refuses to read after an offset below ``keep_after``.

        Args:
            stream: The writer's stream.
            keep_after: Records at or below this offset are deleted.

        Raises:
            ValueError: No snapshot covers ``keep_after``.
            JournalError: The journal is closed.
        """
        _check_stream(stream)
        newest = max(
            [o for s, o, _, _ in self._snapshots if s == stream]
            + [self._max(stream, "snapshots")]
        )
        if keep_after < 0 or keep_after > newest:
            raise ValueError(
                f"cannot compact {stream!r} up to {keep_after}: the newest snapshot is at {newest}"
            )
        last = self._next_base(stream)
        self._compactions[stream] = max(keep_after, self._compactions.get(stream, 0))
        self._staged_last.setdefault(stream, last)

    def commit(self) -> None:
        """Write everything staged (records, snapshots, compactions) in one transaction.

        Returns only once the turn is durable per the fsync policy; an empty turn
        is a no-op.

        Raises:
            JournalError: The write failed (disk full, lock timeout, another writer on
                the same stream). Everything staged is discarded, so a handler that
                re-runs its turn does not append twice.
        """
        if not (self._rows or self._snapshots or self._compactions or self._blob_puts
                or self._blob_drops):
            self._check_open()
            return
        if self.defer:
            self._write_deferred()
            return
        db = self._db
        sync_now = (
            self.fsync == "batch"
            and self.sync_interval > 0
            and self._since_sync + 1 >= self.sync_interval
        )
        try:
            if sync_now:
                # A FULL commit fsyncs the WAL file, making every earlier commit durable too.
                db.execute("PRAGMA synchronous=FULL")
            try:
                db.execute("BEGIN IMMEDIATE")
                self._write_staged(db)
                db.execute("COMMIT")
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if sync_now:
                    db.execute(f"PRAGMA synchronous={self._base_synchronous()}")
        except BaseException as exc:
            self._failed("commit", exc)
        if self.fsync == "always" or sync_now:
            self._synced += 1
            self._since_sync = 0
        else:
            self._since_sync += 1
        self._written()

    def _write_deferred(self) -> None:
        """Write the staged turn into the pass's open transaction.

        A turn of one record in a known stream (the common turn), with any blobs it
        puts or drops (the router's), is only buffered:
        the rows of such turns are written by one ``executemany`` when the pass
        commits (:func:`flush_shared`) or before any other statement runs on the
        connection (:attr:`_db`), so every statement sees them in order. Each
        sqlite3 call releases the GIL; in the gateway the trio thread takes it
        and the bridge thread waits for it back, up to the switch interval:
        measured under bench/gateway.py's order load, ~140 µs per INSERT on
        the bridge thread (cProfile, wall), one INSERT per host turn.

        Any other turn is written at once, in a savepoint, so that a failed turn
        rolls back alone. A failed write of buffered rows surfaces at the pass's
        commit (or at the statement that flushed them) and fails the whole pass.
        """
        single = (len(self._rows) == 1 and not self._snapshots and not self._compactions
                  and self._staged_last.keys() <= self._registered)
        if single:
            self._check_open()
            assert self._shared is not None  # defer implies a shared connection
            self._shared[_PENDING].append(self._rows[0])
            if self._blob_puts or self._blob_drops:  # the router's spilled chunks
                pending = self._shared[_PENDING_BLOBS]
                pending += [(True, row) for row in self._blob_puts]
                pending += [(False, row) for row in self._blob_drops]
            self._written()
            return
        db = self._db
        try:
            if not db.in_transaction:
                db.execute("BEGIN IMMEDIATE")
            db.execute("SAVEPOINT journal_turn")
            try:
                self._write_staged(db)
            except BaseException:
                # This turn only: the pass's earlier turns (other hosts') stay.
                db.execute("ROLLBACK TO journal_turn")
                raise
            finally:
                db.execute("RELEASE journal_turn")
        except BaseException as exc:
            self._failed("write", exc)
        self._written()

    def _write_staged(self, db: sqlite3.Connection) -> None:
        """The staged turn's statements, inside the caller's transaction or savepoint."""
        touched = self._staged_last.keys() - self._registered
        if touched:
            db.executemany(_REGISTER_STREAM, [(s,) for s in touched])
        if self._rows:
            db.executemany(_INSERT_RECORD, self._rows)
        if self._snapshots:
            db.executemany(_INSERT_SNAPSHOT, self._snapshots)
        if self._blob_puts:
            db.executemany(_PUT_BLOB, self._blob_puts)
        if self._blob_drops:
            db.executemany(_DROP_BLOB, self._blob_drops)
        for stream, keep_after in self._compactions.items():
            self._apply_compaction(db, stream, keep_after)

    def _failed(self, what: str, exc: BaseException) -> NoReturn:
        """Discard the staged turn after a failed write and re-raise (sqlite errors as
        :class:`JournalError`). The outcome may be unknown (an I/O error around COMMIT):
        the cached offsets of the streams concerned are forgotten, to be re-read."""
        for stream in self._staged_last:
            self._last.pop(stream, None)
        staged = len(self._rows)
        self._discard_staged()
        if isinstance(exc, sqlite3.Error):
            raise JournalError(
                f"journal {what} failed, {staged} staged records discarded: {exc}"
            ) from exc
        raise exc

    def _written(self) -> None:
        """Account a staged turn as written and clear it."""
        self._commits += 1
        self._records += len(self._rows)
        self._snapshot_count += len(self._snapshots)
        self._registered.update(self._staged_last)
        self._last.update(self._staged_last)
        self._discard_staged()

    def discard(self) -> None:
        """Drop everything staged since the last commit."""
        self._discard_staged()

    @contextmanager
    def turn(self) -> Iterator[Journal]:
        """One processing turn: commit at the end, or discard if the body raised.

        Turns do not nest, and a turn starts with nothing staged.

        Yields:
            This journal.

        Raises:
            JournalError: A turn is already open, something is already staged, or
                the commit failed.
        """
        self._check_open()
        if self._in_turn:
            raise JournalError("journal turns do not nest")
        if (self._rows or self._snapshots or self._compactions or self._blob_puts
                or self._blob_drops):
            raise JournalError("a turn started with records staged outside any turn")
        self._in_turn = True
        try:
            try:
                yield self
            except BaseException:
                self._discard_staged()
                raise
            self.commit()
        finally:
            self._in_turn = False

    def _discard_staged(self) -> None:
        self._rows.clear()
        self._snapshots.clear()
        self._compactions.clear()
        self._blob_puts.clear()
        self._blob_drops.clear()
        self._staged_last.clear()

    def _apply_compaction(self, db: sqlite3.Connection, stream: str, keep_after: int) -> None:
        db.execute("DELETE FROM records WHERE stream = ? AND seq <= ?", (stream, keep_after))
        db.execute("DELETE FROM snapshots WHERE stream = ? AND seq < ?", (stream, keep_after))
        db.execute(
            "INSERT INTO streams (name, base) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET base = max(base, excluded.base)",
            (stream, keep_after),
        )

    # -- offsets -----------------------------------------------------------------------------

    def _next_base(self, stream: str) -> int:
        """The offset the next staged record follows (staged last, else committed last)."""
        staged = self._staged_last.get(stream)
        if staged is not None:
            return staged
        return self.last_offset(stream)

    def _max(self, stream: str, table: str) -> int:
        query = f"SELECT max(seq) FROM {table} WHERE stream = ?"
        value = self._db.execute(query, (stream,)).fetchone()[0]
        return value if isinstance(value, int) else 0

    def _base(self, stream: str) -> int:
        row = self._db.execute("SELECT base FROM streams WHERE name = ?", (stream,)).fetchone()
        return int(row[0]) if row is not None else 0

    def _load_last(self, stream: str) -> int:
        return max(self._max(stream, "records"), self._max(stream, "snapshots"), self._base(stream))

    def last_offset(self, stream: str) -> int:
        """The stream's last committed offset (0 for a new stream).

        Staged records are not counted: :meth:`append` returns their offsets.

        Args:
            stream: The stream.

        Returns:
            The offset of the last committed record (or snapshot, after compaction).
        """
        _check_stream(stream)
        self._check_open()
        last = self._last.get(stream)
        if last is None:
            last = self._load_last(stream)
            self._last[stream] = last
        return last

    def streams(self) -> list[str]:
        """Every stream that ever committed something, sorted by name."""
        return [row[0] for row in self._db.execute("SELECT name FROM streams ORDER BY name")]

    # -- reading -----------------------------------------------------------------------------

    def read(self, stream: str, after: int = 0) -> Iterator[tuple[int, object]]:
        """Yield the stream's committed records after ``after``, verifying each one.

        Staged records are not visible. Records are fetched in pages, so a long
        stream is not loaded at once.

        Args:
            stream: The stream.
            after: Yield the records with a greater offset.

        Yields:
            ``(offset, record)`` in offset order, consecutive.

        Raises:
            JournalCorrupted: A record is damaged, missing or does not unpickle.
            JournalCompacted: Records after ``after`` were compacted away.
        """
        _check_stream(stream)
        base = self._base(stream)
        if after < base:
            raise JournalCompacted(stream, after, base)
        expected = after + 1
        while True:
            rows = self._db.execute(
                _SELECT_RECORDS + " LIMIT ?",
                (stream, expected - 1, _PAGE),
            ).fetchall()
            for seq, payload, checksum in rows:
                if seq != expected:
                    raise JournalCorrupted(stream, expected, f"record missing (next is {seq!r})")
                try:
                    _check_intact(_RECORD_PERSON, stream, seq, payload, checksum)
                except _Invalid as bad:
                    raise JournalCorrupted(stream, expected, bad.reason) from None
                yield expected, _unpickle(stream, expected, payload, "record")
                expected += 1
            if len(rows) < _PAGE:
                return

    def latest_snapshot(self, stream: str) -> Snapshot | None:
        """The stream's latest committed snapshot, verified, or None if it has none.

        Raises:
            JournalCorrupted: The latest snapshot is damaged (:meth:`recover` falls
                back to an older one instead).
        """
        _check_stream(stream)
        row = self._db.execute(
            _SELECT_SNAPSHOTS + " LIMIT 1", (stream,)
        ).fetchone()
        if row is None:
            return None
        seq, data, checksum = row
        try:
            offset = _check_intact(_SNAPSHOT_PERSON, stream, seq, data, checksum)
        except _Invalid as bad:
            shown = seq if isinstance(seq, int) else -1
            raise JournalCorrupted(stream, shown, f"snapshot {bad.reason}") from None
        return Snapshot(offset, _unpickle(stream, offset, data, "snapshot"))

    def recover(self, stream: str) -> Recovery:
        """Rebuild material for a restarting actor, repairing a torn tail.

        Picks the latest snapshot whose checksum holds (damaged newer ones are
        deleted and reported), then verifies every record after it. A damaged tail
        is deleted and reported (see the module docstring for the rule), so the
        next append continues from ``Recovery.last_offset``. Call it before the
        stream's first append in a process.

        Args:
            stream: The stream to recover.

        Returns:
            The snapshot, the records after it and what was discarded.

        Raises:
            JournalCorrupted: Damage in the middle of the stream, a valid record
                that does not unpickle, or compacted records with no snapshot.
            JournalError: Records of this stream are staged.
        """
        _check_stream(stream)
        db = self._db
        if stream in self._staged_last:
            raise JournalError(f"cannot recover {stream!r} with records of it staged")
        base = self._base(stream)

        chosen: Snapshot | None = None
        bad_snapshots: list[tuple[object, Discarded]] = []
        for seq, data, checksum in db.execute(
            _SELECT_SNAPSHOTS, (stream,)
        ).fetchall():
            try:
                offset = _check_intact(_SNAPSHOT_PERSON, stream, seq, data, checksum)
            except _Invalid as bad:
                shown = seq if isinstance(seq, int) else -1
                bad_snapshots.append((seq, Discarded(shown, f"snapshot {bad.reason}")))
                continue
            if offset >= base:
                chosen = Snapshot(offset, _unpickle(stream, offset, data, "snapshot"))
                break
        start = chosen.offset if chosen is not None else base
        if chosen is None and base > 0:
            raise JournalCorrupted(
                stream, base, "records were compacted and no valid snapshot covers them"
            )

        rows = db.execute(_SELECT_RECORDS, (stream, start)).fetchall()
        expected = start + 1
        good = 0
        problem: tuple[int, str] | None = None
        for seq, payload, checksum in rows:
            if seq != expected:
                problem = (expected, f"record missing (next is {seq!r})")
                break
            try:
                _check_intact(_RECORD_PERSON, stream, seq, payload, checksum)
            except _Invalid as bad:
                problem = (expected, bad.reason)
                break
            good += 1
            expected += 1

        discarded: list[Discarded] = []
        if problem is not None:
            # Torn tail only if nothing intact follows the first problem.
            for seq, payload, checksum in rows[good:]:
                try:
                    _check_intact(_RECORD_PERSON, stream, seq, payload, checksum)
                except _Invalid as bad:
                    shown = seq if isinstance(seq, int) else -1
                    discarded.append(Discarded(shown, bad.reason))
                    continue
                raise JournalCorrupted(
                    stream, problem[0], f"{problem[1]}, and intact records follow"
                )

        records = [
            (start + 1 + i, _unpickle(stream, start + 1 + i, payload, "record"))
            for i, (_, payload, _) in enumerate(rows[:good])
        ]
        last_good = start + good

        if discarded or bad_snapshots:
            db.execute("BEGIN IMMEDIATE")
            try:
                if discarded:
                    db.execute(
                        "DELETE FROM records WHERE stream = ? AND seq > ?", (stream, last_good)
                    )
                for seq, _ in bad_snapshots:
                    db.execute("DELETE FROM snapshots WHERE stream = ? AND seq IS ?", (stream, seq))
                # A damaged snapshot beyond the last good record would otherwise leave a gap.
                db.execute(
                    "DELETE FROM snapshots WHERE stream = ? AND seq > ?", (stream, last_good)
                )
                db.execute("COMMIT")
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")
        self._last[stream] = self._load_last(stream)
        return Recovery(
            stream=stream,
            snapshot=chosen,
            records=records,
            discarded=discarded,
            discarded_snapshots=[d for _, d in bad_snapshots],
            last_offset=self._last[stream],
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def statistics(self) -> JournalStatistics:
        """Counters since this journal object was opened."""
        return JournalStatistics(
            commits=self._commits,
            records=self._records,
            snapshots=self._snapshot_count,
            synced_commits=self._synced,
            staged_records=len(self._rows),
        )

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._conn is None

    def close(self) -> None:
        """Discard anything staged, checkpoint the WAL and close. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._discard_staged()
        if self._share_key is not None:
            entry = _SHARED[self._share_key]
            entry[1] -= 1
            if entry[1] > 0:
                return  # other journals of this thread still use the connection
            del _SHARED[self._share_key]
            if entry[_CHECKPOINTER] is not None:
                entry[_CHECKPOINTER].stop()
            try:
                # The open pass of deferring journals: keep it (unless it failed).
                if entry[_PASS_FAILED] is None:
                    _write_pending(entry)
                if conn.in_transaction:
                    conn.execute("COMMIT" if entry[_PASS_FAILED] is None else "ROLLBACK")
            except BaseException:
                conn.close()
                raise
        try:
            # PASSIVE never waits on other processes; the last connection to close
            # checkpoints fully anyway. The checkpoint fsyncs unless the policy is off.
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Journal {self.path!r} fsync={self.fsync} {state}>"
