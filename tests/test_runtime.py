"""The Thespian runtime substrate under simpleSystemBase and multiprocTCPBase.

Measured here (Thespian 4.0.1, Python 3.11), asserted so a change shows up:
- a handler that raises runs 3 times under simpleSystemBase (first try + 2
  retries) and 2 times under multiprocTCPBase (first try + 1 retry with a deep
  copy) before the sender gets PoisonMessage; the actor lives on;
- a kill -9'd child is reported to its parent (ChildActorExited) and the
  parent re-creates it;
- Thespian binds 0.0.0.0 even with THESPIAN_BASE_IPADDR set; our bind patch
  makes the admin and every actor listen on 127.0.0.1;
- the 4480 msgs/s governor is lifted inside every actor process, including
  when the admin was not forked from a lifted process.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from thespian.actors import ActorExitRequest, ActorTypeDispatcher, ChildActorExited, PoisonMessage
from thespian.system import systemCommon

from actors import runtime
from actors.runtime import (
    LIFTED_RATE_THROTTLE,
    RelayClient,
    RuntimeActor,
    RuntimeActorIdentity,
    RuntimeEcho,
    RuntimeRelayAsk,
    RuntimeRelayStats,
    RuntimeRelayStatsQuery,
    RuntimeSink,
    RuntimeSinkCount,
    RuntimeSinkQuery,
    RuntimeWhoAreYou,
    SystemConfig,
    listening_sockets,
    process_session,
    running_system,
    start_relay,
    tracked,
)

TCP = "multiprocTCPBase"
SIMPLE = "simpleSystemBase"
ASK = 5.0  # seconds: every wait in this file is an ask with this timeout


# --- toy actors and messages (top-level, picklable, unique names) -----------


@attrs.frozen
class RtTestWatchChild:
    """Ask the supervisor for its child's identity and restart count."""


@attrs.frozen
class RtTestAwaitRestart:
    """Reply once the supervisor has re-created its child at least ``generation`` times."""

    generation: int


@attrs.frozen
class RtTestChildState:
    generation: int
    child: Any  # the child's address
    identity: RuntimeActorIdentity | None


@attrs.frozen
class RtTestBoom:
    """The handler raises on this."""


@attrs.frozen
class RtTestAttempts:
    """How many times did the handler run?"""


@attrs.frozen
class RtTestProbe:
    """Ask a plain (non-RuntimeActor) actor about its process's rate limiter."""


class RtTestChild(RuntimeActor):
    runtime_kind = "rt-child"


class RtTestSupervisor(RuntimeActor):
    """Creates one child; re-creates it whenever it exits."""

    def __init__(self) -> None:
        super().__init__()
        self.child: Any = None
        self.generation = 0
        self.waiting: list[tuple[Any, int]] = []

    def _ensure_child(self) -> None:
        if self.child is None:
            self.child = self.createActor(RtTestChild)

    def receiveMsg_RtTestWatchChild(self, message: RtTestWatchChild, sender: Any) -> None:  # noqa: N802
        self._ensure_child()
        self.send(sender, RtTestChildState(self.generation, self.child, None))

    def receiveMsg_RtTestAwaitRestart(self, message: RtTestAwaitRestart, sender: Any) -> None:  # noqa: N802
        self.waiting.append((sender, message.generation))
        self._notify()

    def receiveMsg_ChildActorExited(self, message: ChildActorExited, sender: Any) -> None:  # noqa: N802
        if message.childAddress == self.child:
            self.child = self.createActor(RtTestChild)
            self.generation += 1
            self._notify()

    def _notify(self) -> None:
        still = []
        for who, generation in self.waiting:
            if self.generation >= generation:
                self.send(who, RtTestChildState(self.generation, self.child, None))
            else:
                still.append((who, generation))
        self.waiting = still


class RtTestFlaky(RuntimeActor):
    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    def receiveMsg_RtTestBoom(self, message: RtTestBoom, sender: Any) -> None:  # noqa: N802
        self.runs += 1
        raise RuntimeError("boom (deliberate, from test_runtime)")

    def receiveMsg_RtTestAttempts(self, message: RtTestAttempts, sender: Any) -> None:  # noqa: N802
        self.send(sender, self.runs)


class RtTestPlainProbe(ActorTypeDispatcher):  # type: ignore[misc]
    """Not a RuntimeActor: reports the governor Thespian built for its process."""

    def receiveMsg_RtTestProbe(self, message: RtTestProbe, sender: Any) -> None:  # noqa: N802
        governor = self._myRef._governer
        self.send(sender, (int(systemCommon.RATE_THROTTLE), int(governor._maxRate)))


# --- helpers -----------------------------------------------------------------


def _ask(asys: Any, target: Any, message: Any) -> Any:
    reply = asys.ask(target, message, ASK)
    assert reply is not None, f"no reply to {message!r} within {ASK}s"
    return reply


def _dead(pids: list[int]) -> bool:
    return all(process_session(pid) is None for pid in pids)


def _port_of(address: str) -> int:
    # Thespian renders a local TCP actor address as "ActorAddr-(T|:40787)".
    return int(address.rsplit(":", 1)[1].rstrip(")"))


@pytest.fixture(params=[SIMPLE, TCP])
def asys(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    with running_system(SystemConfig(base=request.param), log_dir=tmp_path) as system:
        yield system


# --- tests -------------------------------------------------------------------


@pytest.mark.parametrize("base", [SIMPLE, TCP])
def test_start_stop_leaves_no_process(base: str, tmp_path: Any) -> None:
    with running_system(SystemConfig(base=base), log_dir=tmp_path) as system:
        info = tracked(system)
        assert info is not None
        echo = system.createActor(RuntimeEcho)
        ident = _ask(system, echo, RuntimeWhoAreYou())
        pids = info.live_pids()
        if base == TCP:
            assert info.admin_pid in pids and ident.pid in pids
            assert ident.pid != os.getpid()
            assert len(pids) >= 3  # admin, logger, the echo actor
            port = info.config.admin_port
        else:
            assert pids == [] and ident.pid == os.getpid()
    assert info.live_pids() == []
    assert _dead(pids)
    if base == TCP:
        assert listening_sockets(port) == []


def test_echo_round_trip(asys: Any) -> None:
    echo = asys.createActor(RuntimeEcho)
    assert _ask(asys, echo, ("ping", 1)) == ("ping", 1)
    ident = _ask(asys, echo, RuntimeWhoAreYou())
    assert ident.kind == "echo"
    assert ident.address == str(echo)


def test_supervisor_recreates_a_dead_child(asys: Any) -> None:
    sup = asys.createActor(RtTestSupervisor)
    state = _ask(asys, sup, RtTestWatchChild())
    child_ident = _ask(asys, state.child, RuntimeWhoAreYou())
    assert child_ident.kind == "rt-child"
    started = time.monotonic()
    if child_ident.pid != os.getpid():  # multiprocTCPBase: a real process to kill
        os.kill(child_ident.pid, signal.SIGKILL)
    else:  # simpleSystemBase: the child lives in this thread; ask it to exit
        asys.tell(state.child, ActorExitRequest())
    restarted = _ask(asys, sup, RtTestAwaitRestart(generation=1))
    elapsed = time.monotonic() - started
    assert restarted.generation == 1
    assert restarted.child != state.child
    new_ident = _ask(asys, restarted.child, RuntimeWhoAreYou())
    assert new_ident.kind == "rt-child"
    if child_ident.pid != os.getpid():
        assert new_ident.pid != child_ident.pid
        assert process_session(child_ident.pid) is None
    assert elapsed < ASK


@pytest.mark.parametrize(("base", "runs"), [(SIMPLE, 3), (TCP, 2)])
def test_raising_handler_is_retried_then_poisoned(base: str, runs: int, tmp_path: Any) -> None:
    with running_system(SystemConfig(base=base), log_dir=tmp_path) as system:
        flaky = system.createActor(RtTestFlaky)
        reply = _ask(system, flaky, RtTestBoom())
        assert isinstance(reply, PoisonMessage)
        assert isinstance(reply.poisonMessage, RtTestBoom)
        assert "boom" in (reply.details or "")
        # The actor survived and counted every run of the failing handler.
        assert _ask(system, flaky, RtTestAttempts()) == runs


def test_rate_throttle_is_lifted_in_actor_processes(tmp_path: Any) -> None:
    with running_system(SystemConfig(base=TCP), log_dir=tmp_path) as system:
        ident = _ask(system, system.createActor(RuntimeEcho), RuntimeWhoAreYou())
        assert ident.pid != os.getpid()
        assert ident.rate_throttle == LIFTED_RATE_THROTTLE
        assert ident.module_rate_throttle == LIFTED_RATE_THROTTLE
        # Even an actor that is not a RuntimeActor inherits it (fork).
        plain = _ask(system, system.createActor(RtTestPlainProbe), RtTestProbe())
        assert plain == (LIFTED_RATE_THROTTLE, LIFTED_RATE_THROTTLE)


def test_rate_throttle_is_lifted_even_under_a_foreign_admin(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate an admin not forked from a lifted process: the starting process
    # keeps Thespian's 4480, only the capabilities carry the lifted limit.
    default = 4480
    monkeypatch.setattr(systemCommon, "RATE_THROTTLE", default)
    real = runtime.lift_rate_throttle

    def only_inside_actors(limit: int | None = None, actor: Any = None) -> int:
        return real(limit, actor) if actor is not None else default

    monkeypatch.setattr(runtime, "lift_rate_throttle", only_inside_actors)
    with running_system(SystemConfig(base=TCP), log_dir=tmp_path) as system:
        plain = _ask(system, system.createActor(RtTestPlainProbe), RtTestProbe())
        assert plain == (default, default)  # what Thespian alone gives an actor
        ident = _ask(system, system.createActor(RuntimeEcho), RuntimeWhoAreYou())
        assert ident.rate_throttle == LIFTED_RATE_THROTTLE
        assert ident.module_rate_throttle == LIFTED_RATE_THROTTLE


def test_tcp_sockets_bind_loopback_only(tmp_path: Any) -> None:
    with running_system(SystemConfig(base=TCP), log_dir=tmp_path) as system:
        info = tracked(system)
        assert info is not None
        admin = listening_sockets(info.config.admin_port)
        assert admin and {host for host, _, _ in admin} == {"127.0.0.1"}
        ident = _ask(system, system.createActor(RuntimeEcho), RuntimeWhoAreYou())
        actor = listening_sockets(_port_of(ident.address))
        assert actor and {host for host, _, _ in actor} == {"127.0.0.1"}


def test_relay_keeps_traffic_flowing_past_a_dead_actor(tmp_path: Any) -> None:
    # The relay still holds sends to the killed actor's address when the system
    # shuts down. Once (one full-suite run of several), a process of this system
    # outlived the default 5 s grace; a send to a kill -9'd actor can take ~35 s to
    # give up (ARCHITECTURE.md), so this test grants the shutdown 40 s before it
    # counts a leak. A clean shutdown still takes well under a second.
    with running_system(SystemConfig(base=TCP), log_dir=tmp_path, grace=40.0) as system:
        victim = system.createActor(RuntimeSink)
        live = system.createActor(RuntimeSink)
        victim_ident = _ask(system, victim, RuntimeWhoAreYou())
        relay = start_relay(system)
        assert start_relay(system) == relay  # one per system (global name)
        client = RelayClient(system, relay)
        client.tell(victim, "before")
        client.tell(live, "before")
        assert client.flush() == 2
        os.kill(victim_ident.pid, signal.SIGKILL)
        started = time.monotonic()
        for i in range(10):
            client.tell(victim, ("to-the-dead", i))
            client.tell(live, ("x", i))
            client.flush()
        flushed = time.monotonic() - started
        stats = _ask(system, relay, RuntimeRelayStatsQuery())
        assert stats == RuntimeRelayStats(batches=11, forwarded=22)
        # Asked through the relay, the query is ordered after the relay's
        # forwards to ``live`` (Thespian keeps order per sender/receiver pair).
        count = _ask(system, relay, RuntimeRelayAsk(live, RuntimeSinkQuery()))
        assert count == RuntimeSinkCount(messages=11, items=21), (getattr(count, "poisonMessage", None), getattr(count, "details", None))
        assert flushed < 1.0


def test_fifo_sends_pops_only_at_its_ends() -> None:
    q = runtime.FifoSends([1, 2, 3])
    q.append(4)
    assert q.pop(0) == 1
    assert q.pop() == 4
    with pytest.raises(IndexError):
        q.pop(1)
    assert list(q) == [2, 3]


def test_a_simple_system_queues_its_sends_in_a_deque_and_keeps_their_order(
    tmp_path: Any,
) -> None:
    # Thespian's list pop(0) moved every queued message per delivery; the deque keeps
    # the same first-in-first-out order (the engine's grouped turns rely on it).
    with running_system(SystemConfig(base=SIMPLE), log_dir=tmp_path) as system:
        assert isinstance(system._systemBase._pendingSends, runtime.FifoSends)
        sink = system.createActor(RuntimeSink)
        for i in range(50):
            system.tell(sink, ("item", i))
        count = _ask(system, sink, RuntimeSinkQuery())
        assert isinstance(count, RuntimeSinkCount)
        assert count.messages == 50
        echo = system.createActor(RuntimeEcho)
        assert [_ask(system, echo, ("n", i)) for i in range(5)] == [("n", i) for i in range(5)]


class RuntimeTestAlarm(ActorTypeDispatcher):  # type: ignore[misc]
    """Asked ``("arm", seconds)``: answers ``("rang", payload)`` when its wakeup fires."""

    def receiveMsg_tuple(self, msg: tuple[Any, ...], sender: Any) -> None:  # noqa: N802
        from datetime import timedelta

        self.asker = sender
        self.wakeupAfter(timedelta(seconds=msg[1]), payload=msg[1])

    def receiveMsg_WakeupMessage(self, msg: Any, sender: Any) -> None:  # noqa: N802
        self.send(self.asker, ("rang", msg.payload))


def test_a_simple_system_skips_the_wakeup_scan_but_still_delivers_wakeups(
    tmp_path: Any,
) -> None:
    # start_system replaces the per-delivery wakeup scan with a deadline check:
    # wakeups still arrive, in deadline order, while other traffic flows.
    from thespian.system import simpleSystemBase

    with running_system(SystemConfig(base=SIMPLE), log_dir=tmp_path) as system:
        base = system._systemBase
        assert base._realizeWakeups.__name__ == "realize_due"
        assert getattr(simpleSystemBase.actor_base_receive, "_emporion", False)
        late, early = system.createActor(RuntimeTestAlarm), system.createActor(RuntimeTestAlarm)
        system.tell(late, ("arm", 0.5))
        echo = system.createActor(RuntimeEcho)
        assert _ask(system, echo, ("n", 1)) == ("n", 1)  # a delivery with a wakeup pending
        system.tell(early, ("arm", 0.05))
        got = [system.listen(ASK), system.listen(ASK)]
        assert got == [("rang", 0.05), ("rang", 0.5)]


class _Base:
    pass


class _Derived(_Base):
    pass


class _Other:
    pass


class _DispatchParent(runtime.RuntimeActor):
    def receiveMsg__Base(self, msg: Any, sender: Any) -> Any:  # noqa: N802
        return ("parent base", type(msg).__name__)


class _DispatchChild(_DispatchParent):
    def receiveMsg__Derived(self, msg: Any, sender: Any) -> Any:  # noqa: N802
        return self.SUPER if sender == "pass" else "child derived"

    def receiveMsg__Base(self, msg: Any, sender: Any) -> Any:  # noqa: N802
        return self.SUPER if sender == "pass base" else "child base"

    def receiveUnrecognizedMessage(self, msg: Any, sender: Any) -> Any:  # noqa: N802
        return ("unrecognized", type(msg).__name__)


@pytest.mark.parametrize("sender", [None, "pass", "pass base"])
@pytest.mark.parametrize("msg", [_Derived(), _Base(), _Other()], ids=type)
def test_the_cached_dispatch_answers_as_thespians_does(msg: Any, sender: Any) -> None:
    actor = _DispatchChild()
    actor._runtime_ready = True  # no actor system here: skip the process preparation
    expected = ActorTypeDispatcher.receiveMessage(actor, msg, sender)
    assert actor.receiveMessage(msg, sender) == expected
    assert actor.receiveMessage(msg, sender) == expected  # and again, from the cache
    assert (_DispatchChild, type(msg)) in runtime._HANDLERS


def test_a_handler_replaced_after_its_first_message_is_the_one_called(
        monkeypatch: pytest.MonkeyPatch) -> None:
    actor = _DispatchChild()
    actor._runtime_ready = True
    assert actor.receiveMessage(_Derived(), None) == "child derived"
    monkeypatch.setattr(_DispatchChild, "receiveMsg__Derived", lambda self, m, s: "patched")
    assert actor.receiveMessage(_Derived(), None) == "patched"
