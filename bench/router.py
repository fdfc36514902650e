"""The notification router core: sequencing throughput, and what a snapshot of it costs.

A seeded stream of private events (``order_accepted``-shaped data, 4 per user
touch, 25 users a turn) from ``--users`` users goes through
``actors.cores.router.Router.publish`` in turns, conflation off. Figures:

1. ``router.publish.events_per_s``: events/s through ``publish`` (dedup,
   sequencing, the replay log with its chunk freezing) and ``spill``, next to a bare ceiling
   measured in the same run: per event, a dict lookup of the user's counter, a
   seq increment, a tuple and an append to a bounded per-user deque.
2. ``router.snapshot_ms``: pickling the whole router as a host snapshot does
   (``actors.journal._dumps``), once every event is in, its frozen chunks stored
   (``Router.spill`` after every turn, as the host does, into a dict here);
   next to it ``router.snapshot_unstored_ms``, the same router keeping its
   chunks, and ``router.snapshot_whole_log_ms``, the same logs pickled the way
   snapshots did before the logs were chunked (every event as a tuple of field
   values; lower is better for all three).
3. ``router.load_ms``: unpickling that snapshot (a recovery).
4. ``router.replay_ms``: ``Router.replay`` of the last 50 events, per call
   (reading stored chunks back from the dict).

Times are process CPU time (robust to other processes on the machine), best of
``--repeat``.

Usage: python bench/router.py [--users N] [--turns T] [--repeat R]
"""

from __future__ import annotations

# Run as a script, Python puts bench/ first on sys.path, where a file of this
# directory could shadow a real package: drop it.
import sys as _sys
from pathlib import Path as _Path

_HERE = _Path(__file__).parent.resolve()
_sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _HERE]

import argparse
import gc
import json
import pickle
import random
import time
from collections import deque
from typing import Any

from actors.cores.router import Router, _seq_values
from actors.journal import _dumps
from protocol import UserEvent

PER_TOUCH = 4
USERS_PER_TURN = 25
REPLAY = 50


def _data(i: int) -> dict[str, object]:
    return {"order_id": i, "client_order_id": f"c{i}", "symbol": "BTC-PERP", "side": "buy",
            "type": "limit", "price": "60001.5", "qty": "0.010", "filled_qty": "0.000",
            "remaining_qty": "0.010", "status": "open", "tif": "gtc"}


def build(users: int, turns: int, seed: int) -> list[list[UserEvent]]:
    rng = random.Random(seed)
    names = [f"u{i}" for i in range(users)]
    next_id = dict.fromkeys(names, 0)
    out = []
    for turn in range(turns):
        batch = []
        for user in rng.sample(names, min(USERS_PER_TURN, users)):
            for _ in range(PER_TOUCH):
                next_id[user] += 1
                i = next_id[user]
                batch.append(UserEvent(user=user, event_id=i, kind="order_accepted", key="",
                                       data=_data(i), ts=turn))
        out.append(batch)
    return out


def run_router(turns: list[list[UserEvent]], *, store: dict[tuple[str, int], bytes] | None
               ) -> tuple[float, Router]:
    """Publish every turn; with a ``store``, spill after each turn as the router's host
    does (into the dict: the host's journal write is not timed here)."""
    router = Router(conflation_window_ns=0)
    publish = router.publish
    gc.collect()
    t0 = time.process_time()
    if store is None:
        for now, batch in enumerate(turns):
            publish(batch, now)
    else:
        spill = router.spill
        for now, batch in enumerate(turns):
            publish(batch, now)
            puts, drops = spill()
            for user, first, blob in puts:
                store[(user, first)] = blob
            for key in drops:
                del store[key]
    return time.process_time() - t0, router


def run_bare(turns: list[list[UserEvent]]) -> float:
    seqs: dict[str, int] = {}
    logs: dict[str, deque[tuple[Any, ...]]] = {}
    gc.collect()
    t0 = time.process_time()
    for batch in turns:
        for event in batch:
            user = event.user
            seq = seqs.get(user, 0) + 1
            seqs[user] = seq
            log = logs.get(user)
            if log is None:
                log = logs[user] = deque(maxlen=10_000)
            log.append((user, seq, event.kind, event.ts, event.data, event.event_id))
    return time.process_time() - t0


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def _line(name: str, value: float, unit: str, ceiling: float | None = None, **extra: Any) -> None:
    out: dict[str, Any] = {"name": name, "value": round(value, 2), "unit": unit}
    if ceiling is not None:
        out["ceiling"] = round(ceiling, 2)
        out["ratio"] = round(value / ceiling, 3)
    out.update(extra)
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--turns", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    turns = build(args.users, args.turns, args.seed)
    events = sum(len(b) for b in turns)

    best = {"router": float("inf"), "bare": float("inf"), "snapshot": float("inf"),
            "whole": float("inf"), "load": float("inf"), "replay": float("inf")}
    size = 0
    for _ in range(args.repeat):
        store: dict[tuple[str, int], bytes] = {}
        elapsed, router = run_router(turns, store=store)
        best["router"] = min(best["router"], elapsed)
        best["bare"] = min(best["bare"], run_bare(turns))
        elapsed, blob = _timed(lambda r=router: _dumps(r))
        best["snapshot"] = min(best["snapshot"], elapsed)
        size = len(blob)
        users = router.users()

        def load(user: str, first: int, st: dict[tuple[str, int], bytes] = store) -> bytes:
            return st[(user, first)]

        whole = {u: router.replay(u, 0, load) for u in users}
        elapsed, _ = _timed(lambda w=whole: pickle.dumps(
            {u: list(map(_seq_values, evs)) for u, evs in w.items()}, 5))
        best["whole"] = min(best["whole"], elapsed)
        elapsed, _ = _timed(lambda b=blob: pickle.loads(b))
        best["load"] = min(best["load"], elapsed)
        elapsed, _ = _timed(lambda r=router, us=users, ld=load: [
            r.replay(u, max(0, r.last_seq(u) - REPLAY), ld) for u in us])
        best["replay"] = min(best["replay"], elapsed / len(users))
    # The snapshot of a router that keeps its chunks (as before the host stored them).
    _, keeping = run_router(turns, store=None)
    unstored_s, unstored = _timed(lambda: _dumps(keeping))

    _line("router.publish.events_per_s", events / best["router"], "events/s",
          events / best["bare"], events=events, users=args.users)
    _line("router.snapshot_ms", best["snapshot"] * 1e3, "ms", bytes=size, events=events)
    _line("router.snapshot_unstored_ms", unstored_s * 1e3, "ms", bytes=len(unstored),
          note="the same router keeping its frozen chunks, as before the host stored them")
    _line("router.snapshot_whole_log_ms", best["whole"] * 1e3, "ms",
          note="the same logs pickled event by event, as before the logs were chunked")
    _line("router.load_ms", best["load"] * 1e3, "ms")
    _line("router.replay_ms", best["replay"] * 1e3, "ms", events=REPLAY)


if __name__ == "__main__":
    main()
