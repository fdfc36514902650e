"""The session core (actors/cores/session.py): plain pytest, no I/O, no actors."""

from __future__ import annotations

import contextlib
import copy
import itertools
import pickle
from collections.abc import Iterator, Sequence

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.cores.router import Router, SequencedEvent
from actors.cores.session import (
    SESSION_TRANSITIONS,
    IllegalSessionTransition,
    Session,
    SessionConfig,
    SessionDisconnect,
    SessionEffect,
    SessionEvent,
    SessionJoined,
    SessionLeft,
    SessionSend,
    SessionState,
    next_session_state,
)
from protocol import ErrorCode, RemoteProtocolError, UserEvent

SYMBOLS = ("BTC-PERP", "ETH-PERP")
SECOND = 1_000_000_000
STATES: tuple[SessionState, ...] = ("anonymous", "logged_in", "closed")
EVENTS: tuple[SessionEvent, ...] = ("login_ok", "login_failed", "logout", "close")


@attrs.frozen(kw_only=True)
class Item:
    """A stand-in for a sequenced private event."""

    seq: int
    priority: int = 1
    kind: str = "order_filled"
    key: str = ""


def p1(*seqs: int) -> list[Item]:
    return [Item(seq=s) for s in seqs]


def p2(seq: int, key: str = "") -> Item:
    return Item(seq=seq, priority=2, kind="position_update", key=key)


def session(config: SessionConfig | None = None, *, last_seq: int = 0) -> Session:
    s = Session(known_symbols=SYMBOLS, config=config)
    s.login("alice", 0, sessions_of_user=0, last_seq=last_seq)
    return s


def sends(effects: Sequence[SessionEffect]) -> list[SessionSend]:
    return [e for e in effects if isinstance(e, SessionSend)]


def sent(effects: Sequence[SessionEffect]) -> list[int]:
    """The seqs of the events sent, asserting there is at most one send per call."""
    out = sends(effects)
    assert len(out) <= 1
    return [i.seq for i in out[0].events] if out else []


@contextlib.contextmanager
def expect_error(code: ErrorCode) -> Iterator[None]:
    with pytest.raises(RemoteProtocolError) as info:
        yield
    assert info.value.code is code


# -- lifecycle table ----------------------------------------------------------------


@pytest.mark.parametrize(("state", "event"), list(itertools.product(STATES, EVENTS)))
def test_the_transition_table(state: SessionState, event: SessionEvent) -> None:
    if (state, event) in SESSION_TRANSITIONS:
        assert next_session_state(state, event) == SESSION_TRANSITIONS[(state, event)]
    else:
        with pytest.raises(IllegalSessionTransition) as info:
            next_session_state(state, event)
        assert (info.value.state, info.value.event) == (state, event)
        assert info.value.code is ErrorCode.BAD_REQUEST


def test_the_table_is_what_the_design_says() -> None:
    assert SESSION_TRANSITIONS == {
        ("anonymous", "login_ok"): "logged_in",
        ("anonymous", "login_failed"): "anonymous",
        ("anonymous", "close"): "closed",
        ("logged_in", "logout"): "anonymous",
        ("logged_in", "close"): "closed",
        ("closed", "close"): "closed",
    }


def test_illegal_transition_pickles() -> None:
    err = pickle.loads(pickle.dumps(IllegalSessionTransition("closed", "login_ok")))
    assert (err.state, err.event, err.code) == ("closed", "login_ok", ErrorCode.BAD_REQUEST)


def test_login_logout_close() -> None:
    s = Session(known_symbols=SYMBOLS)
    assert (s.state, s.user) == ("anonymous", None)
    s.login_failed()
    assert s.state == "anonymous"
    assert s.login("alice", 7, sessions_of_user=2, last_seq=41) == [SessionJoined(user="alice")]
    assert (s.state, s.user, s.logged_in_at, s.delivered_seq) == ("logged_in", "alice", 7, 41)
    with pytest.raises(IllegalSessionTransition):
        s.login("alice", 8, sessions_of_user=0)
    with pytest.raises(IllegalSessionTransition):
        s.login_failed()
    assert s.logout() == [SessionLeft(user="alice")]
    assert (s.state, s.user) == ("anonymous", None)
    s.login("bob", 9, sessions_of_user=0)
    assert s.close() == [SessionLeft(user="bob")]
    assert s.close() == []
    assert s.stats().state == "closed"
    with pytest.raises(IllegalSessionTransition):
        s.login("bob", 10, sessions_of_user=0)


def test_private_operations_need_a_login() -> None:
    s = Session(known_symbols=SYMBOLS)
    for op in (s.require_login, s.logout, lambda: s.ack(0), lambda: s.begin_resume(0)):
        with expect_error(ErrorCode.NOT_LOGGED_IN):
            op()
    with expect_error(ErrorCode.NOT_LOGGED_IN):
        s.replayed([])
    assert s.deliver(p1(1)) == []  # in flight when not logged in: dropped
    s.close()
    with expect_error(ErrorCode.NOT_LOGGED_IN):
        s.require_login()


# -- session limit ----------------------------------------------------------------------


def test_session_limit_refuses_the_nth_session_and_changes_nothing() -> None:
    s = Session(known_symbols=SYMBOLS, config=SessionConfig(max_sessions_per_user=3))
    with expect_error(ErrorCode.TOO_MANY_SESSIONS):
        s.login("alice", 0, sessions_of_user=3)
    assert (s.state, s.user) == ("anonymous", None)
    s.login("alice", 0, sessions_of_user=2)
    assert s.state == "logged_in"


@pytest.mark.parametrize(("user", "last_seq"), [("", 0), ("alice", -1)])
def test_login_validates(user: str, last_seq: int) -> None:
    s = Session(known_symbols=SYMBOLS)
    with expect_error(ErrorCode.BAD_REQUEST):
        s.login(user, 0, sessions_of_user=0, last_seq=last_seq)
    assert s.state == "anonymous"


# -- rate limit ---------------------------------------------------------------------------


def test_token_bucket_exact_integer_math() -> None:
    s = Session(known_symbols=SYMBOLS, config=SessionConfig(rate_per_s=2, burst=3))
    t0 = 1_000 * SECOND
    assert [s.allow(t0) for _ in range(4)] == [True, True, True, False]
    assert s.tokens_nano == 0
    # 2 tokens/s: one token takes exactly 500 ms.
    assert not s.allow(t0 + SECOND // 2 - 1)
    assert s.tokens_nano == 999_999_998
    assert s.allow(t0 + SECOND // 2)
    assert s.tokens_nano == 0
    # Refill is capped at the burst.
    assert s.allow(t0 + 3_600 * SECOND, cost=3)
    assert not s.allow(t0 + 3_600 * SECOND)


def test_token_bucket_cost_and_clock_going_backwards() -> None:
    s = Session(known_symbols=SYMBOLS, config=SessionConfig(rate_per_s=10, burst=5))
    assert not s.allow(0, cost=6)  # more than the burst: never
    assert s.tokens_nano == 5 * SECOND  # a refused request takes nothing
    assert s.allow(SECOND, cost=5)
    assert not s.allow(SECOND // 2)  # the clock went back: no refill
    assert s.allow(SECOND + SECOND // 10)  # 100 ms after the last refill: one token
    assert s.allow(5, cost=0)
    with pytest.raises(ValueError, match="cost"):
        s.allow(SECOND, cost=-1)


def test_require_rate_raises_rate_limited() -> None:
    s = Session(known_symbols=SYMBOLS, config=SessionConfig(rate_per_s=1, burst=1))
    s.require_rate(0)
    with expect_error(ErrorCode.RATE_LIMITED):
        s.require_rate(1)
    s.require_rate(SECOND)


def test_rate_limit_is_deterministic() -> None:
    times = [0, 3, 10**7, 10**7 + 1, 5 * 10**8, 10**9, 10**9, 2 * 10**9]
    runs = []
    for _ in range(2):
        s = Session(known_symbols=SYMBOLS, config=SessionConfig(rate_per_s=3, burst=2))
        runs.append([s.allow(t) for t in times])
    assert runs[0] == runs[1]


# -- subscriptions -----------------------------------------------------------------------


def test_subscribe_and_unsubscribe() -> None:
    s = Session(known_symbols=SYMBOLS)  # public data: no login needed
    assert s.subscribe(["book.BTC-PERP", "trades.BTC-PERP", "book.BTC-PERP"]) == (
        "book.BTC-PERP",
        "trades.BTC-PERP",
    )
    assert s.subscribe(["ticker.ETH-PERP", "book.BTC-PERP"]) == ("ticker.ETH-PERP",)
    assert s.subscriptions == ("book.BTC-PERP", "trades.BTC-PERP", "ticker.ETH-PERP")
    assert s.unsubscribe(["trades.BTC-PERP", "book.ETH-PERP"]) == ("trades.BTC-PERP",)
    assert list(s.subscriptions) == ["book.BTC-PERP", "ticker.ETH-PERP"]
    assert s.subscribe([]) == ()


@pytest.mark.parametrize(
    ("channels", "code"),
    [
        (["book.BTC-PERP", "trades.NOPE-PERP"], ErrorCode.UNKNOWN_SYMBOL),
        (["book.ETH-PERP", "book.btc-perp"], ErrorCode.BAD_REQUEST),
        (["candles.BTC-PERP"], ErrorCode.BAD_REQUEST),
        (["book."], ErrorCode.BAD_REQUEST),
        (["bookBTC-PERP"], ErrorCode.BAD_REQUEST),
        (["book.BTC-PERP", 7], ErrorCode.BAD_REQUEST),
        ("book.BTC-PERP", ErrorCode.BAD_REQUEST),
    ],
)
def test_subscribe_is_all_or_nothing(channels: list[str], code: ErrorCode) -> None:
    s = Session(known_symbols=SYMBOLS)
    s.subscribe(["ticker.BTC-PERP"])
    with expect_error(code):
        s.subscribe(channels)
    with expect_error(code):
        s.unsubscribe([*channels, "ticker.BTC-PERP"] if isinstance(channels, list) else channels)
    assert s.subscriptions == ("ticker.BTC-PERP",)


def test_subscription_limit_is_all_or_nothing() -> None:
    s = Session(known_symbols=SYMBOLS, config=SessionConfig(max_subscriptions=3))
    s.subscribe(["book.BTC-PERP", "book.ETH-PERP"])
    with expect_error(ErrorCode.BAD_REQUEST):
        s.subscribe(["trades.BTC-PERP", "trades.ETH-PERP"])
    assert s.subscriptions == ("book.BTC-PERP", "book.ETH-PERP")
    assert s.subscribe(["book.BTC-PERP", "trades.BTC-PERP"]) == ("trades.BTC-PERP",)


def test_no_subscriptions_after_close() -> None:
    s = Session(known_symbols=SYMBOLS)
    s.close()
    with expect_error(ErrorCode.BAD_REQUEST):
        s.subscribe(["book.BTC-PERP"])


# -- delivery and acks ---------------------------------------------------------------------


def test_deliver_sends_in_order_and_drops_duplicates() -> None:
    s = session(last_seq=3)
    assert sent(s.deliver(p1(3))) == []  # covered by the login's last_seq
    assert sent(s.deliver(p1(5, 4))) == [4, 5]  # sorted
    assert sent(s.deliver(p1(4, 5, 6, 6, 7))) == [6, 7]
    assert (s.delivered_seq, s.sent_seq, s.acked_seq, s.unacked) == (7, 7, 3, 4)
    assert s.stats().duplicates_dropped == 4


def test_live_gap_passes_through() -> None:
    s = session()
    assert sent(s.deliver(p1(1, 3))) == [1, 3]


def test_ack_bookkeeping() -> None:
    s = session()
    s.deliver(p1(1, 2, 3, 4, 5))
    assert s.ack(3) == []
    assert (s.acked_seq, s.unacked) == (3, 2)
    assert s.ack(2) == []  # backwards: ignored
    assert s.ack(3) == []
    assert s.acked_seq == 3
    with expect_error(ErrorCode.BAD_REQUEST):
        s.ack(6)  # beyond what was sent
    with expect_error(ErrorCode.BAD_REQUEST):
        s.ack(True)
    assert s.acked_seq == 3
    s.ack(5)
    assert s.unacked == 0


def test_the_session_accepts_router_events() -> None:
    router = Router()
    s = session()
    router.publish([UserEvent(user="alice", event_id=1, kind="order_filled", ts=0)], 0)
    events = router.replay("alice", 0)
    effects = s.deliver(events)
    assert sends(effects)[0].events == events
    assert isinstance(sends(effects)[0].events[0], SequencedEvent)


# -- back-pressure ----------------------------------------------------------------------


def test_p2_is_conflated_past_the_window_and_p1_is_never_held() -> None:
    s = session(SessionConfig(window=3, hard_bound=100))
    assert sent(s.deliver(p1(1, 2, 3))) == [1, 2, 3]  # unacked 3 = window
    effects = s.deliver([p2(4, "BTC"), p2(5, "ETH"), p2(6, "BTC")])
    assert effects == []  # over the window: held, 4 superseded by 6
    assert (s.delivered_seq, s.sent_seq, s.stats().held) == (6, 3, 2)
    [send] = sends(s.deliver([p2(7, "BTC"), Item(seq=8), p2(9, "ETH")]))
    # The P1 carries the held ones (in seq order) out first; 9 is held again.
    assert [i.seq for i in send.events] == [5, 7, 8]
    assert send.skipped == (4, 6)
    assert s.stats().conflated == 2
    assert s.stats().held == 1


def test_an_ack_releases_what_is_held() -> None:
    s = session(SessionConfig(window=2, hard_bound=100))
    s.deliver(p1(1, 2))
    assert s.deliver([p2(3), p2(4), p2(5, "X")]) == []
    assert s.ack(0) == []
    assert s.ack(1) == [SessionSend(events=(p2(4), p2(5, "X")), skipped=(3,))]
    assert (s.sent_seq, s.stats().held) == (5, 0)
    assert s.unacked == 4
    assert s.deliver([p2(6)]) == []  # still over the window: held again


def test_within_the_window_p2_flows() -> None:
    s = session(SessionConfig(window=2, hard_bound=100))
    assert sent(s.deliver([p2(1), p2(2), p2(3), p2(4)])) == [1, 2]
    assert s.stats().held == 1
    assert s.ack(2) == [SessionSend(events=(p2(4),), skipped=(3,))]


def test_window_one_holds_p2_until_acked() -> None:
    s = session(SessionConfig(window=1, hard_bound=100))
    assert sent(s.deliver([p2(1), p2(2)])) == [1]
    assert s.ack(1) == [SessionSend(events=(p2(2),), skipped=())]


def test_disconnect_past_the_hard_bound() -> None:
    s = session(SessionConfig(window=2, hard_bound=5))
    assert sent(s.deliver(p1(1, 2, 3, 4, 5))) == [1, 2, 3, 4, 5]
    effects = s.deliver(p1(6))
    assert effects == [SessionDisconnect(reason="slow_consumer"), SessionLeft(user="alice")]
    assert s.state == "closed"
    assert s.deliver(p1(7)) == []
    assert s.close() == []  # already gone: no second SessionLeft


def test_held_p2_count_toward_the_hard_bound() -> None:
    s = session(SessionConfig(window=1, hard_bound=4))
    s.deliver(p1(1, 2))
    assert s.deliver([p2(3), p2(4)]) == []  # held; backlog 4 = the bound
    assert s.deliver([p2(5)]) == [
        SessionDisconnect(reason="slow_consumer"),
        SessionLeft(user="alice"),
    ]


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="hard_bound"):
        SessionConfig(window=10, hard_bound=9)
    with pytest.raises(ValueError, match="burst"):
        SessionConfig(burst=0)
    with pytest.raises(ValueError, match="window"):
        SessionConfig(window=0)


# -- resume ------------------------------------------------------------------------------


def test_resume_buffers_live_events_until_the_replay() -> None:
    s = session(last_seq=10)
    s.begin_resume(4)
    assert (s.delivered_seq, s.sent_seq, s.acked_seq, s.resuming) == (4, 4, 4, True)
    assert s.deliver(p1(11, 12)) == []  # the replay has not come yet
    assert sent(s.replayed(p1(5, 6, 7, 8, 9, 10, 11))) == [5, 6, 7, 8, 9, 10, 11, 12]
    assert not s.resuming
    assert sent(s.deliver(p1(12, 13))) == [13]


def test_resume_passes_the_contiguous_prefix_of_partial_replays() -> None:
    s = session(last_seq=10)
    s.begin_resume(4)
    assert sent(s.replayed(p1(5, 6), last=False)) == [5, 6]
    assert sent(s.deliver(p1(9, 10, 11))) == []
    assert sent(s.replayed(p1(7, 8), last=False)) == [7, 8, 9, 10, 11]
    assert s.resuming
    assert sent(s.replayed([])) == []
    assert not s.resuming


def test_the_last_replay_flushes_across_a_gap() -> None:
    s = session(last_seq=10)
    s.begin_resume(4)
    s.deliver(p1(12))
    assert sent(s.replayed(p1(5, 6))) == [5, 6, 12]


def test_resume_ahead_of_the_session_drops_what_the_client_holds() -> None:
    s = session(last_seq=2)
    s.begin_resume(6)
    assert sent(s.replayed(p1(5, 6, 7))) == [7]
    with expect_error(ErrorCode.BAD_REQUEST):
        s.begin_resume(-1)


def test_resume_forgets_held_events_the_client_holds() -> None:
    s = session(SessionConfig(window=1, hard_bound=100))
    s.deliver(p1(1, 2))
    s.deliver([p2(3), p2(4, "X")])
    assert s.stats().held == 2
    s.begin_resume(3)
    assert s.stats().held == 0
    assert sent(s.replayed([p2(4, "X"), Item(seq=5)])) == [4, 5]


def test_session_pickles_mid_resume() -> None:
    s = session(SessionConfig(window=1, hard_bound=100), last_seq=3)
    s.subscribe(["book.BTC-PERP"])
    s.begin_resume(1)
    s.deliver(p1(4))
    clones = [pickle.loads(pickle.dumps(s)), copy.deepcopy(s)]
    expected = s.replayed(p1(2, 3))
    assert sent(expected) == [2, 3, 4]  # P1: never held back
    for clone in clones:
        assert clone.replayed(p1(2, 3)) == expected
        assert clone.stats() == s.stats()
        assert clone.subscriptions == ("book.BTC-PERP",)


def test_bad_items_change_nothing() -> None:
    s = session()
    s.deliver(p1(1))
    before = pickle.dumps(s)
    with pytest.raises(TypeError):
        s.deliver([Item(seq=2), Item(seq=0)])
    with pytest.raises(TypeError):
        s.deliver([Item(seq=2), object()])  # type: ignore[list-item]
    assert pickle.dumps(s) == before


# -- property: replay/live race ---------------------------------------------------------

SLOTS = (("position_update", "BTC"), ("position_update", "ETH"), ("account_update", ""))


@st.composite
def resume_scenarios(draw: st.DrawFn) -> tuple[int, int, int, int, list[Item], list[object]]:
    n = draw(st.integers(0, 40))
    c = draw(st.integers(0, n))  # the client holds 1..c
    live_from = draw(st.integers(c, n))  # live delivery starts after this seq
    replay_to = draw(st.integers(live_from, n))  # the replay ends here (>= live start)
    items = [
        Item(seq=s, priority=draw(st.integers(0, 3)), kind=kind, key=key)
        for s in range(1, n + 1)
        for kind, key in [draw(st.sampled_from(SLOTS))]
    ]

    def chunks(lo: int, hi: int) -> list[list[Item]]:
        """Split items lo+1..hi into batches that may overlap (re-sends)."""
        out: list[list[Item]] = []
        start = lo
        while start < hi:
            end = draw(st.integers(start + 1, hi))
            back = draw(st.integers(0, min(2, start - lo)))
            out.append(items[start - back : end])
            start = end
        return out

    replay = chunks(c, replay_to)
    live = chunks(live_from, n)
    # An interleaving that keeps each stream's own order; acks sprinkled in.
    order = draw(st.permutations(["r"] * len(replay) + ["l"] * len(live)))
    steps: list[object] = []
    r_i = l_i = 0
    for tag in order:
        if draw(st.booleans()):
            steps.append("ack")
        if tag == "r":
            r_i += 1
            steps.append(("replay", replay[r_i - 1], r_i == len(replay)))
        else:
            l_i += 1
            steps.append(("live", live[l_i - 1]))
    if not replay:
        steps.insert(draw(st.integers(0, len(steps))), ("replay", [], True))
    window = draw(st.integers(1, 6))
    return n, c, live_from, window, items, steps


@given(resume_scenarios())
def test_property_resume_dedup_strictly_increasing_gapless_complete(
    scenario: tuple[int, int, int, int, list[Item], list[object]],
) -> None:
    n, c, live_from, window, items, steps = scenario
    s = Session(known_symbols=SYMBOLS, config=SessionConfig(window=window, hard_bound=10_000))
    s.login("alice", 0, sessions_of_user=0, last_seq=live_from)
    s.begin_resume(c)
    events: list[int] = []
    skipped: list[int] = []

    def collect(effects: list[SessionEffect]) -> None:
        for effect in effects:
            assert isinstance(effect, SessionSend)
            assert effect.events
            events.extend(i.seq for i in effect.events)
            skipped.extend(effect.skipped)
            assert all(x < effect.events[-1].seq for x in effect.skipped)

    for step in steps:
        if step == "ack":
            collect(s.ack(s.sent_seq))
        elif isinstance(step, tuple) and step[0] == "replay":
            collect(s.replayed(step[1], last=step[2]))
        else:
            assert isinstance(step, tuple)
            collect(s.deliver(step[1]))
    collect(s.ack(s.sent_seq))  # a client that acks everything gets everything held

    assert events == sorted(set(events)), "strictly increasing"
    assert not set(events) & set(skipped)
    assert sorted(events + skipped) == list(range(c + 1, n + 1)), "gapless and complete"
    assert s.stats().held == 0
    assert not s.resuming
    by_seq = {i.seq: i for i in items}
    for seq in skipped:
        assert by_seq[seq].priority >= 2, "P0/P1 are never conflated away"
    last_of_slot = {(i.kind, i.key): i.seq for i in items[c:]}
    for seq in last_of_slot.values():
        assert seq in events, "the latest value of every slot reaches the client"
    if window >= n:
        assert skipped == []
