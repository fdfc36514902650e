"""``emporion replay FILE``: the determinism proof of a recorded run.

A gateway started with ``BridgeOptions(record=FILE)`` journals every input its
bridge thread sends to the actor engine, in order and with its batch
boundaries, and the outputs it receives; at stop it appends the live run's
digests (:mod:`gateway.bridge`, *Recording*). :func:`replay` re-feeds those
inputs into a fresh :class:`~actors.local.LocalEngine` — the same desks, in one
process, on a virtual clock — computes the same digests from its outputs with
the same code (:class:`~gateway.bridge.RunDigest`) and compares.

**Feeding order.** The embedded engine runs on Thespian's ``simpleSystemBase``,
where every external ``tell`` runs all actors to quiescence before it returns.
The embedded bridge's ``EngineLink`` fans out: each pass's requests go in one
``tell`` to the Exchange, which splits them per host in one turn, and every host
then applies what is queued for it as one turn (grouped turns) — the rounds
``LocalEngine.run`` makes. Such a pass is recorded as one batch (host
``exchange``) and fed whole before the engine runs. A link that sends one
``tell`` per host (an attached gateway, older recordings) is recorded per host
batch, and each is fed on its own and the engine is run until nothing is left
before the next one. With one host per entity (``account_shards = 0``,
the embedded default) the cores then see the same inputs in the same order as
in the live run: a book's commands come from the one account a cascade started
at, an account's book events from the books in the order they ran, and the
router's inputs keep each user's order (they may be grouped into different
turns, which only moves P2/P3 conflation). Typed bridge calls
(:class:`~gateway.bridge.OpenAccounts`) need nothing here (a ``LocalEngine``
opens accounts on demand); opaque ``call(fn)`` markers are skipped with a
warning. A book snapshot request, which the host answers outside the desks, is
answered from the replayed book.

**Virtual clock.** Every message carries its own ``ts``; the replay's clock is
the largest ``ts`` fed so far, and the router's conflation timer fires when
that clock passes it (``LocalEngine.run``).

**The digests** (SHA-256, the first 16 hex digits shown; see ``RunDigest``):

* ``trades`` — every public trade (symbol, trade id, price, qty, taker side,
  ts) with its maker and taker ``(user, order id)``, in book order;
* ``balances`` — each user's final ``account``, ``positions`` and ``orders``
  views: queried from the live engine by the bridge at stop, through the same
  ``AccountQuery`` on the replayed one;
* ``events`` — per user and symbol, the P0/P1 private events as ``(kind,
  data)`` in seq order. A ``risk_alert``/``margin_call`` (P0, no symbol) is
  checked at the end of an account's turn, so a replay that groups the turns
  differently could report one the live run did not (a ratio that crossed 0.8
  and fell back inside one turn); the simulations fund their agents far from
  that band.

**What may legitimately differ, and is therefore left out:** P2/P3 events
(``account_update``, ``position_update``, ``system_notice``) are conflated by
the router on wall-clock timer ticks live and on message times here, and a
conflated event takes its seq when it flushes — so their number, their order
relative to P0/P1 events and every seq can differ; their content is covered by
``balances``. How one user's streams of different books interleave is the
order the book hosts ran in: a raising host's batch is re-queued behind the
others by Thespian, so an injected fault legitimately changes it (measured: a
``raise_once`` on a book). Book deltas and tickers are published per host
turn, which the round-based ``LocalEngine`` groups differently. Engine faults
(a killed or raising host, injected through an opaque call) have no
counterpart in a replay: a restarted host's ``resync`` notice is P3 and left
out, but a fault that lost, duplicated or changed anything the engine
promises shows as a mismatch, as it should.

**Where the proof does not reach** (the result's ``notes`` say so when it
applies): an engine that started from a non-empty journal (the replay starts
empty); an attached multi-process engine (hosts run concurrently, so the
interleaving of cascades is not in the file); account shards (``account_shards
> 0``), whose host batches mix users that ``LocalEngine`` handles user by user.

Records are pickles: replaying a file runs code from it. Replay only your own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import attrs
from rich.console import Console
from rich.table import Table

from actors.host import EngineConfig
from actors.local import LocalEngine
from actors.messages import (
    AccountCancel,
    AccountCancelAll,
    AccountDeposit,
    AccountPlace,
    AccountQuery,
    BookSnapshotRequest,
    Dest,
    Reply,
    RouterAttach,
    RouterDetach,
    RouterReplay,
    RouterTick,
)
from gateway.bridge import (
    DIGESTS,
    FANOUT_HOST,
    RECORD_CONN,
    OpaqueCall,
    OpenAccounts,
    RecordedCall,
    RecordedInput,
    RecordedOutput,
    RecordError,
    RecordFooter,
    RecordReader,
    RunDigest,
    balance_queries,
    collect_balances,
    input_user,
)
from protocol import CancelOrder, CancelUserOrders, NewOrder, PublicTrade

log = logging.getLogger(__name__)

__all__ = ["RecordError", "ReplayResult", "main", "replay"]

#: What each kind of destination's desk takes from outside the engine.
_INPUTS: dict[str, tuple[type, ...]] = {
    "account": (AccountPlace, AccountCancel, AccountCancelAll, AccountDeposit, AccountQuery),
    "router": (RouterAttach, RouterDetach, RouterReplay, RouterTick),
    "book": (NewOrder, CancelOrder, CancelUserOrders),
}


@attrs.frozen(kw_only=True)
class ReplayResult:
    """The recorded and the replayed digests of one record file.

    ``recorded`` comes from the file's footer (or, without a footer, from its
    recorded outputs, with ``balances`` unknown); ``matched[name]`` is true only
    when both digests exist and are equal. ``differences`` shows, per mismatched
    digest, the first row that differs. ``counts`` are the replay's (trades,
    events, users, batches, items), ``recorded_counts`` the footer's.
    """

    path: str
    recorded: dict[str, str | None]
    replayed: dict[str, str | None]
    matched: dict[str, bool]
    counts: dict[str, int]
    recorded_counts: dict[str, int]
    skipped: tuple[str, ...]
    notes: tuple[str, ...]
    differences: dict[str, str]

    @property
    def ok(self) -> bool:
        return all(self.matched.get(name, False) for name in DIGESTS)


class _Replayer:
    """A fresh LocalEngine fed host batch by host batch."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.digest = RunDigest()
        self.final: list[Reply] = []
        self.engine = LocalEngine(
            config.instruments(), on_gateway=self._gateway, on_market=self._market,
            replay_capacity=config.replay_capacity,
            conflation_window_ns=config.conflation_window_ns,
        )
        self.now = 0
        self.users: dict[str, None] = {}
        self.skipped: list[str] = []
        self.batches = 0
        self.items = 0
        self.mixed_batches = 0

    def _gateway(self, gateway: str, msg: Any) -> None:
        if isinstance(msg, Reply) and msg.reply_to.conn == RECORD_CONN:
            self.final.append(msg)
        self.digest.feed((msg,))

    def _market(self, symbol: str, ev: Any) -> None:
        if isinstance(ev, PublicTrade):
            self.digest.feed((ev,))

    def batch(self, items: Iterable[tuple[Dest, Any]], *, whole_pass: bool = False) -> None:
        """One host's batch (or, ``whole_pass``, a fan-out link's whole pass): everything
        in it, then run the engine to quiescence."""
        self.batches += 1
        accounts: set[str] = set()
        for dest, item in items:
            self.items += 1
            ts = _ts(item)
            if ts is not None:
                self.now = max(self.now, ts)
            user = input_user(item)
            if user is not None:
                self.users.setdefault(user)
            if dest.kind == "account":
                accounts.add(dest.key)
            if isinstance(item, BookSnapshotRequest):
                self.engine.run(self.now)
                self._snapshot(item)
            elif isinstance(item, _INPUTS.get(dest.kind, ())):
                self.engine.send(dest, item)
            else:
                self.skipped.append(f"{type(item).__name__} to {dest.kind}:{dest.key}")
        if len(accounts) > 1 and not whole_pass:
            self.mixed_batches += 1
        self.engine.run(self.now)

    def _snapshot(self, req: BookSnapshotRequest) -> None:
        # What a book host answers itself (actors.host: Host._apply).
        self._gateway(req.reply_to.gateway, Reply(
            reply_to=req.reply_to, ok=True,
            result=self.engine.books[req.symbol].snapshot(req.ts)))

    def call(self, call: OpenAccounts | OpaqueCall) -> None:
        if isinstance(call, OpenAccounts):
            for user in call.users:
                self.users.setdefault(user)
                self.engine.account(user)
        else:
            self.skipped.append(f"call {call.name}")

    def finish(self, users: Iterable[str], gateway_id: str) -> None:
        """The final balance queries, exactly as the live bridge made them."""
        queries = balance_queries(users, gateway_id)
        for dest, q in queries:
            self.engine.send(dest, q)
        self.engine.run(self.now)
        self.digest.balances = collect_balances(queries, self.final)


def _ts(item: Any) -> int | None:
    order = getattr(item, "order", None)
    ts = getattr(order if order is not None else item, "ts", None)
    return ts if isinstance(ts, int) else None


def _first_difference(name: str, live: RunDigest, replayed: RunDigest) -> str | None:
    a, b = live.rows(name), replayed.rows(name)
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"row {i}: recorded {_short(x)} · replayed {_short(y)}"
    if len(a) != len(b):
        return f"recorded {len(a)} rows, replayed {len(b)}"
    return None


def _short(row: Any, limit: int = 240) -> str:
    text = repr(row)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def replay(path: str | os.PathLike[str]) -> ReplayResult:
    """Re-feed a record file into a fresh LocalEngine and compare its digests.

    Raises:
        RecordError: not a record file, another version, or a damaged frame.
    """
    notes: list[str] = []
    live = RunDigest()  # from the recorded outputs: for diffs, and without a footer
    footer: RecordFooter | None = None
    with RecordReader(path) as reader:
        header = reader.header
        config = EngineConfig(**header["engine"])
        run = _Replayer(config)
        for frame in reader:
            if isinstance(frame, RecordedInput):
                for host, items in frame.batches:
                    run.batch(items, whole_pass=host == FANOUT_HOST)
            elif isinstance(frame, RecordedCall):
                run.call(frame.call)
            elif isinstance(frame, RecordedOutput):
                live.feed(frame.messages)
            elif isinstance(frame, RecordFooter):
                footer = frame
        truncated = reader.truncated

    gateway_id = str(header["gateway_id"])
    users = footer.users if footer is not None else tuple(sorted(run.users))
    run.finish(users, gateway_id)
    replayed = run.digest.digests()

    if footer is not None:
        recorded = dict(footer.digests)
        live.balances = footer.balances
        if footer.error:
            notes.append(f"the recording says: {footer.error}")
    else:
        recorded = {**live.digests(), "balances": None}
        notes.append("no footer (the recording did not stop cleanly"
                     f"{', its last frame is torn' if truncated else ''}): trades and events "
                     "are compared with the recorded outputs, balances are unknown")
    recovered = header.get("recovered_turns")
    if recovered is None:
        notes.append("recorded through an attached engine: its hosts ran concurrently and "
                     "started from whatever state they had, so a mismatch may be real "
                     "nondeterminism of that deployment rather than a fault")
    elif recovered:
        notes.append(f"the live engine started from its journal ({recovered} turns "
                     "recovered); the replay starts empty, so the digests cannot match")
    if run.mixed_batches:
        notes.append(f"{run.mixed_batches} host batches carried several users' requests "
                     "(account shards); LocalEngine handles them user by user, not in "
                     "the shard host's order")
    if run.skipped:
        kinds = sorted(set(run.skipped))
        shown = ", ".join(kinds[:5]) + (", …" if len(kinds) > 5 else "")
        notes.append(f"{len(run.skipped)} recorded inputs could not be replayed and were "
                     f"skipped ({shown}); an opaque call that changed the engine (a fault, "
                     "a direct tell) has no counterpart here")
        log.warning("replay of %s skipped %d inputs: %s", path, len(run.skipped), shown)

    matched = {name: recorded.get(name) is not None and recorded.get(name) == replayed[name]
               for name in DIGESTS}
    differences: dict[str, str] = {}
    for name in DIGESTS:
        if not matched[name] and (name != "balances" or live.balances is not None):
            diff = _first_difference(name, live, run.digest)
            if diff is not None:
                differences[name] = diff
    counts = {**run.digest.counts(), "batches": run.batches, "items": run.items}
    return ReplayResult(
        path=str(path), recorded=recorded, replayed=replayed, matched=matched, counts=counts,
        recorded_counts=dict(footer.counts) if footer is not None else {},
        skipped=tuple(run.skipped), notes=tuple(notes), differences=differences,
    )


def main(path: str | os.PathLike[str], console: Console) -> int:
    """Replay ``path`` and print the digest table; 0 only when every digest matches."""
    try:
        result = replay(path)
    except (RecordError, OSError) as exc:
        console.print(f"[red]cannot replay {path}:[/] {exc}")
        return 2
    table = Table(title=f"replay of {path}")
    table.add_column("digest")
    table.add_column("recorded", style="cyan")
    table.add_column("replayed", style="cyan")
    table.add_column("match")
    for name in DIGESTS:
        rec, rep = result.recorded.get(name), result.replayed.get(name)
        table.add_row(name, rec[:16] if rec else "—", rep[:16] if rep else "—",
                      "[green]yes[/]" if result.matched[name] else "[red]NO[/]")
    console.print(table)
    c = result.counts
    console.print(f"replayed {c['items']} inputs in {c['batches']} host batches: "
                  f"{c['trades']} trades, {c['events']} P0/P1 events, {c['users']} users")
    for name, diff in result.differences.items():
        console.print(f"[red]{name} differs[/] at {diff}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print("[green]deterministic: every digest matches[/]" if result.ok
                  else "[red]the replay does not reproduce the recorded run[/]")
    return 0 if result.ok else 1
