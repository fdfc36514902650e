"""Bare Thespian ceilings: what later benchmarks compare against.

Prints one JSON object per line, ``{"name", "value", "unit"}``, for
simpleSystemBase and multiprocTCPBase:

- ``<base>.pingpong_median``: external ``ask`` to an echo actor, median us;
- ``<base>.external_blast_singles`` / ``..._batch100``: one-way ``tell`` from
  outside to a counting sink (one message each / 100 items per message),
  measured until the sink confirms the count;
- ``tcp.actor_blast_singles_fan{1,4}_{lifted,throttled}``: one actor sending
  singles (round-robin to 1 or 4 sinks), timed in the sender, with Thespian's
  4480 msgs/s governor lifted vs left alone;
- ``tcp.tell_to_killed_actor_{direct,relay}``: time of an external tell to a
  kill -9'd actor, directly vs through :class:`actors.runtime.RuntimeRelay`.

Counts are bounded so the whole run stays well under a minute.

Usage: ``python bench/thespian_ceiling.py [--quick]``
"""

# Thespian dispatches on camelCase names.
# ruff: noqa: N802

from __future__ import annotations

# Run as a script, Python puts bench/ first on sys.path, where this very file
# (bench/actors.py) would shadow the real ``actors`` package: drop it.
import sys as _sys
from pathlib import Path as _Path

_HERE = _Path(__file__).parent.resolve()
_sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _HERE]

import json
import os
import signal
import statistics
import sys
import tempfile
import time
from typing import Any

import attrs

from actors.runtime import (
    RelayClient,
    RuntimeActor,
    RuntimeEcho,
    RuntimeSink,
    RuntimeSinkCount,
    RuntimeSinkQuery,
    RuntimeWhoAreYou,
    SystemConfig,
    running_system,
    start_relay,
)

ASK = 20.0


def emit(name: str, value: float, unit: str) -> None:
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit}), flush=True)


@attrs.frozen
class CeilingBlast:
    """Ask a :class:`CeilingBlaster` to send ``count`` singles round-robin to ``targets``."""

    targets: tuple[Any, ...]
    count: int


@attrs.frozen
class CeilingBlastDone:
    sent: int
    seconds: float


@attrs.frozen
class CeilingBlastMore:
    """The blaster's note to itself: send the next chunk."""


class CeilingBlaster(RuntimeActor):
    """Sends singles to a sink as fast as its process is allowed to.

    Sends go out in chunks between which the actor returns to Thespian's loop:
    one handler that sends thousands overflows the transport's queue
    (THESPIAN_MAX_QUEUED_TRANSMITS = 950, drops beyond 1050).
    """

    CHUNK = 200

    def __init__(self) -> None:
        super().__init__()
        self.job: CeilingBlast | None = None
        self.requester: Any = None
        self.sent = 0
        self.started = 0.0

    def receiveMsg_CeilingBlast(self, message: CeilingBlast, sender: Any) -> None:
        self.job, self.requester, self.sent = message, sender, 0
        self.started = time.perf_counter()
        self.receiveMsg_CeilingBlastMore(CeilingBlastMore(), self.myAddress)

    def receiveMsg_CeilingBlastMore(self, message: CeilingBlastMore, sender: Any) -> None:
        job = self.job
        if job is None:
            return
        upto = min(job.count, self.sent + self.CHUNK)
        fan = len(job.targets)
        for i in range(self.sent, upto):
            self.send(job.targets[i % fan], i)
        self.sent = upto
        if upto < job.count:
            self.send(self.myAddress, CeilingBlastMore())
        else:
            self.send(self.requester, CeilingBlastDone(upto, time.perf_counter() - self.started))
            self.job = None


def _ask(asys: Any, target: Any, message: Any) -> Any:
    reply = asys.ask(target, message, ASK)
    if reply is None:
        raise RuntimeError(f"no reply to {message!r}")
    return reply


def pingpong(asys: Any, rounds: int) -> float:
    echo = asys.createActor(RuntimeEcho)
    _ask(asys, echo, "warm")
    samples = []
    for i in range(rounds):
        started = time.perf_counter()
        _ask(asys, echo, i)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def external_blast(asys: Any, messages: int, per_message: int) -> float:
    """Items per second from outside into one sink, until the sink confirms."""
    sink = asys.createActor(RuntimeSink)
    _ask(asys, sink, RuntimeSinkQuery())
    payload: Any = tuple(range(per_message)) if per_message > 1 else 7
    started = time.perf_counter()
    for _ in range(messages):
        asys.tell(sink, payload)
    count = _ask(asys, sink, RuntimeSinkQuery())
    elapsed = time.perf_counter() - started
    assert count == RuntimeSinkCount(messages=messages, items=messages * per_message), count
    return messages * per_message / elapsed


def actor_blast(asys: Any, messages: int, fan_out: int) -> float:
    """Singles per second sent by one actor (round-robin to ``fan_out`` sinks).

    Timed inside the sending process: the governor throttles the sender.
    """
    sinks = tuple(asys.createActor(RuntimeSink) for _ in range(fan_out))
    blaster = asys.createActor(CeilingBlaster)
    for sink in sinks:
        _ask(asys, sink, RuntimeSinkQuery())
    done = _ask(asys, blaster, CeilingBlast(sinks, messages))
    return float(done.sent / done.seconds)


def killed_actor_tells(asys: Any) -> tuple[float, float]:
    """Seconds for an external tell to a kill -9'd actor: direct, then via the relay."""
    relay = RelayClient(asys, start_relay(asys))
    results = []
    for via_relay in (False, True):
        victim = asys.createActor(RuntimeSink)
        pid = _ask(asys, victim, RuntimeWhoAreYou()).pid
        asys.tell(victim, "warm")  # a cached connection, as in steady traffic
        os.kill(pid, signal.SIGKILL)
        started = time.perf_counter()
        try:
            if via_relay:
                relay.tell(victim, "to-the-dead")
                relay.flush()
            else:
                asys.tell(victim, "to-the-dead")
        except Exception:  # ActorSystemFailure is a possible outcome; the time is the point
            pass
        results.append(time.perf_counter() - started)
    return results[0], results[1]


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    scale = 0.2 if quick else 1.0

    def n(value: int) -> int:
        return max(10, int(value * scale))

    with tempfile.TemporaryDirectory() as logs:
        with running_system(SystemConfig(base="simpleSystemBase")) as asys:
            emit("simple.pingpong_median", pingpong(asys, n(5000)), "us")
            emit("simple.external_blast_singles", external_blast(asys, n(50000), 1), "msgs/s")
            emit(
                "simple.external_blast_batch100",
                external_blast(asys, n(5000), 100),
                "items/s",
            )
        tcp = SystemConfig(base="multiprocTCPBase")
        with running_system(tcp, log_dir=logs) as asys:
            emit("tcp.pingpong_median", pingpong(asys, n(1000)), "us")
            emit("tcp.external_blast_singles", external_blast(asys, n(3000), 1), "msgs/s")
            emit("tcp.external_blast_batch100", external_blast(asys, n(1000), 100), "items/s")
            for fan in (1, 4):
                emit(
                    f"tcp.actor_blast_singles_fan{fan}_lifted",
                    actor_blast(asys, n(6000 * fan), fan),
                    "msgs/s",
                )
            direct, relayed = killed_actor_tells(asys)
            emit("tcp.tell_to_killed_actor_direct", direct * 1e3, "ms")
            emit("tcp.tell_to_killed_actor_relay", relayed * 1e3, "ms")
        throttled = attrs.evolve(tcp, lift_rate_throttle=False)
        with running_system(throttled, log_dir=logs) as asys:
            emit(
                "tcp.actor_blast_singles_fan4_throttled",
                actor_blast(asys, n(24000), 4),
                "msgs/s",
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
