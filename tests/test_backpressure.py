"""Back-pressure on real engine deliveries: fan-out, conflation, slow-consumer disconnect."""

from __future__ import annotations

from typing import Any

import pytest
from engine_kit import engine

from actors.cores.session import SessionConfig, SessionDisconnect, SessionSend
from actors.messages import Delivery
from actors.sessions import SessionHub
from protocol import ErrorCode, RemoteProtocolError

SYMBOLS = ("BTC-PERP", "ETH-PERP", "ESZ6")


def _sent(effects: list[Any], conn: int) -> list[int]:
    return [e.seq for ce in effects if ce.conn == conn and isinstance(ce.effect, SessionSend)
            for e in ce.effect.events]


def test_slow_session_is_conflated_then_cut_while_a_fast_one_gets_everything() -> None:
    hub = SessionHub(SYMBOLS, SessionConfig(window=3, hard_bound=12, max_sessions_per_user=2))
    for conn in (1, 2):
        hub.open(conn)
        hub.login(conn, "alice", 0, last_seq=0)
    hub.open(3)
    with pytest.raises(RemoteProtocolError) as info:
        hub.login(3, "alice", 0, last_seq=0)
    assert info.value.code is ErrorCode.TOO_MANY_SESSIONS

    effects: list[Any] = []
    with engine("simpleSystemBase") as t:
        t.link.attach("alice")
        for i in range(1, 16):
            t.deposit("alice", 10**9 * i, ts=i)  # each one a P2 account_update
        t.pump()
        t.place("alice", "a1", "sell", 600010, 1)  # P1 order_accepted after the flood
        t.wait_events("alice", 16)
        seq_events = t.events["alice"]
        for ev in seq_events:  # replay what the router delivered, in its batches of one turn
            effects += hub.deliver(Delivery(user="alice", events=(ev,)))
            effects += hub.ack(1, ev.seq)  # connection 1 keeps up; connection 2 never acks

    fast = _sent(effects, 1)
    assert fast == [e.seq for e in seq_events]  # everything, in order, once
    slow = _sent(effects, 2)
    assert slow[:3] == [1, 2, 3]  # up to the window, then P2 detail is held back
    assert slow == sorted(set(slow))  # strictly increasing, no duplicates
    cut = [ce for ce in effects if ce.conn == 2 and isinstance(ce.effect, SessionDisconnect)]
    assert len(cut) == 1
    assert cut[0].effect.reason == "slow_consumer"
    # The caller closes the cut connection; alice keeps connection 1, so this was not
    # her last session here (no router detach, no cancel on disconnect).
    assert hub.close(2) is None
    assert 2 not in hub.sessions
    assert list(hub.by_user["alice"]) == [1]
    assert hub.close(1) == "alice"  # her last session: the caller detaches her
    assert "alice" not in hub.by_user


def test_p0_p1_pass_the_window_p2_is_conflated_to_the_latest() -> None:
    hub = SessionHub(SYMBOLS, SessionConfig(window=2, hard_bound=100))
    hub.open(7)
    hub.login(7, "bob", 0, last_seq=0)
    effects: list[Any] = []
    with engine("simpleSystemBase") as t:
        t.link.attach("bob")
        t.deposit("bob", 10**10)
        for i in range(3):
            t.deposit("bob", 1 + i)
        t.place("bob", "b1", "buy", 600000, 1)
        events = t.wait_events("bob", 6)  # the last: the accept's account_update (frozen)
    for ev in events:
        effects += hub.deliver(Delivery(user="bob", events=(ev,)))
    sent = [e.seq for ce in effects if isinstance(ce.effect, SessionSend)
            for e in ce.effect.events]
    effects += hub.ack(7, max(sent))  # the client catches up: what is held goes out
    sends = [ce.effect for ce in effects if isinstance(ce.effect, SessionSend)]
    kinds = [e.kind for s in sends for e in s.events]
    assert "order_accepted" in kinds  # P1 is never held back
    skipped = [s for send in sends for s in send.skipped]
    assert skipped, "older account_updates were conflated away and announced as skipped"
    last_update = max(e.seq for e in events if e.kind == "account_update")
    assert last_update in [e.seq for s in sends for e in s.events]  # the latest value arrives
