"""The session core: one WebSocket connection's login state, limits and delivery window.

A pure, deterministic, picklable object (no I/O, no clock, no randomness): the
Session shell (or the gateway) calls it with the current time and turns the
returned effects into frames, registrations and disconnects.

Decisions (the contract of this module):

* **Lifecycle** is the table :data:`SESSION_TRANSITIONS`. ``login_failed``
  keeps an anonymous session anonymous; ``close`` is idempotent; anything
  else not in the table raises :class:`IllegalSessionTransition` (a
  ``bad_request`` :class:`~protocol.RemoteProtocolError`, so a client that
  logs in twice gets a typed error, not a crash). Private operations
  (:meth:`Session.ack`, :meth:`Session.begin_resume`, :meth:`Session.logout`)
  first call :meth:`Session.require_login` (``not_logged_in``).
* **Rate limit.** A token bucket in integer nano-tokens: ``burst`` tokens of
  capacity, ``rate_per_s`` tokens per second, refilled from ``now_ns`` (one
  nanosecond adds ``rate_per_s`` nano-tokens), full at the first call. A clock
  that goes backwards refills nothing.
* **Subscriptions** (public market data) are allowed before login, not after
  close; a request is validated as a whole before anything changes: a
  malformed channel is ``bad_request``, an unknown symbol ``unknown_symbol``,
  going past ``max_subscriptions`` ``bad_request``. Re-subscribing or
  unsubscribing a channel not held is not an error; the result lists only
  what changed.
* **Positions.** ``delivered_seq`` is the last seq the session accepted for the
  client (sent, held for conflation, or conflated away); ``sent_seq`` the last
  one the client has been told about; ``acked_seq`` the client's ack. At login
  all three start at the router's ``last_seq`` (live delivery continues from
  there); a resume sets them to the client's ``after_seq``. An input with
  ``seq <= delivered_seq`` is a duplicate and is dropped. ``unacked`` is
  ``sent_seq - acked_seq``: what the client has been sent and not acknowledged
  (held items do not count, so a client that acks everything it got always
  gets the held ones).
* **Back-pressure.** A P2/P3 item is sent only while ``unacked < window``, so
  P2/P3 alone never take ``unacked`` past ``window`` (only P0/P1 do); otherwise
  it is *held* in a map keyed by ``(kind, key)`` (the items carry both: see
  :class:`DeliveryItem`); a newer item for the same slot replaces it and the
  replaced seq is *skipped*. Sending a P0/P1 item first sends every held item
  (they have lower seqs), so the client always sees strictly increasing seqs
  and the latest value of every slot; an ack that brings ``unacked`` back
  below ``window`` sends everything held. Skipped seqs are announced in the
  :class:`SessionSend` that covers them (``skipped``, every one below the
  send's last event seq), so ``events`` plus ``skipped`` of the sends are gapless
  when the inputs are: the gateway must put them on the wire (a proposed
  ``"skipped"`` field of the ``private`` frame) so a client can tell
  conflation from loss.
* **Hard bound.** When a call leaves the backlog (highest seq accepted or
  buffered minus ``acked_seq``) above ``hard_bound``, the session closes and
  the only effects are :class:`SessionDisconnect` (``slow_consumer``) and
  :class:`SessionLeft`. Nothing is lost: the events wait in the router's
  replay log for a resume.
* **Resume.** :meth:`Session.begin_resume` resets the positions to
  ``after_seq`` and enters *resuming*: every input (replayed or live) goes into
  a reorder buffer and only the contiguous run after ``delivered_seq`` is
  passed on, so the live/replay race can neither duplicate nor reorder.
  :meth:`Session.replayed` with ``last=True`` (the default: the router replays
  in one batch) ends the resume, flushing whatever is still buffered in seq
  order even across a gap (the inputs did not cover it; the client sees the
  gap and resumes again). Outside a resume a live gap is passed through for
  the same reason, never waited on.
* **Transactional.** Every method validates its input before changing state;
  nothing after validation raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, Literal, Protocol

import attrs

from protocol import CHANNEL_RE, ErrorCode, RemoteProtocolError

__all__ = [
    "SESSION_TRANSITIONS",
    "DeliveryItem",
    "IllegalSessionTransition",
    "Session",
    "SessionConfig",
    "SessionDisconnect",
    "SessionEffect",
    "SessionEvent",
    "SessionJoined",
    "SessionLeft",
    "SessionSend",
    "SessionState",
    "SessionStats",
    "next_session_state",
]

SessionState = Literal["anonymous", "logged_in", "closed"]
SessionEvent = Literal["login_ok", "login_failed", "logout", "close"]

#: The session lifecycle (STYLE.md rule 7): ``(state, event) -> next state``.
SESSION_TRANSITIONS: Final[dict[tuple[SessionState, SessionEvent], SessionState]] = {
    ("anonymous", "login_ok"): "logged_in",
    ("anonymous", "login_failed"): "anonymous",
    ("anonymous", "close"): "closed",
    ("logged_in", "logout"): "anonymous",
    ("logged_in", "close"): "closed",
    ("closed", "close"): "closed",
}

_NANO: Final = 1_000_000_000
#: Highest priority class that is never held back (P0/P1).
_ALWAYS_SENT_MAX_PRIORITY: Final = 1


class IllegalSessionTransition(RemoteProtocolError):  # noqa: N818 - the name the design uses
    """``event`` is not allowed in ``state`` (code ``bad_request``).

    Args:
        state: the session's state.
        event: the lifecycle event that was refused.
    """

    def __init__(self, state: SessionState, event: SessionEvent) -> None:
        super().__init__(ErrorCode.BAD_REQUEST, f"cannot {event} a session that is {state}")
        self.state: SessionState = state
        self.event: SessionEvent = event

    def __reduce__(self) -> tuple[type[IllegalSessionTransition], tuple[str, str]]:
        return (type(self), (self.state, self.event))


def next_session_state(state: SessionState, event: SessionEvent) -> SessionState:
    """Look ``(state, event)`` up in :data:`SESSION_TRANSITIONS`.

    Raises:
        IllegalSessionTransition: the pair is not in the table.
    """
    try:
        return SESSION_TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalSessionTransition(state, event) from None


class DeliveryItem(Protocol):
    """What :meth:`Session.deliver` needs from a private event.

    :class:`actors.cores.router.SequencedEvent` is one; ``kind`` and ``key``
    name the conflation slot of a P2/P3 item.
    """

    @property
    def seq(self) -> int: ...

    @property
    def priority(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def key(self) -> str: ...


@attrs.frozen(kw_only=True)
class SessionConfig:
    """Per-connection limits, all integers.

    Attributes:
        rate_per_s: requests per second refilled into the token bucket.
        burst: the bucket's capacity (and its content at the first request).
        window: un-acked private events at which P2/P3 are held back.
        hard_bound: backlog past which the connection is dropped.
        max_sessions_per_user: concurrent sessions one user may have.
        max_subscriptions: channels one connection may hold.
    """

    rate_per_s: int = attrs.field(default=50, validator=attrs.validators.ge(0))
    burst: int = attrs.field(default=100, validator=attrs.validators.gt(0))
    window: int = attrs.field(default=10_000, validator=attrs.validators.gt(0))
    hard_bound: int = attrs.field(default=50_000)
    max_sessions_per_user: int = attrs.field(default=8, validator=attrs.validators.gt(0))
    max_subscriptions: int = attrs.field(default=64, validator=attrs.validators.gt(0))

    @hard_bound.validator
    def _check_hard_bound(self, _: attrs.Attribute[int], value: int) -> None:
        if value < self.window:
            raise ValueError("hard_bound must be at least window")


@attrs.frozen(kw_only=True)
class SessionSend:
    """Send one ``private`` frame: ``events`` in seq order, and the seqs conflated away."""

    events: tuple[DeliveryItem, ...]
    skipped: tuple[int, ...] = ()


@attrs.frozen(kw_only=True)
class SessionDisconnect:
    """Close the connection (``reason``: ``slow_consumer``)."""

    reason: str


@attrs.frozen(kw_only=True)
class SessionJoined:
    """Register this connection for ``user``'s private events."""

    user: str


@attrs.frozen(kw_only=True)
class SessionLeft:
    """Unregister this connection from ``user``'s private events."""

    user: str


SessionEffect = SessionSend | SessionDisconnect | SessionJoined | SessionLeft


@attrs.frozen(kw_only=True)
class SessionStats:
    """A snapshot of one session's state and counters."""

    state: SessionState
    user: str | None
    delivered_seq: int
    sent_seq: int
    acked_seq: int
    unacked: int
    held: int
    buffered: int
    resuming: bool
    subscriptions: int
    duplicates_dropped: int
    conflated: int


class Session:
    """The state of one WebSocket connection.

    Args:
        known_symbols: the symbols a channel may name.
        config: the connection's limits.
    """

    def __init__(
        self, *, known_symbols: Iterable[str], config: SessionConfig | None = None
    ) -> None:
        self._known_symbols = frozenset(known_symbols)
        self._config = SessionConfig() if config is None else config
        self._state: SessionState = "anonymous"
        self._user: str | None = None
        self._logged_in_at: int | None = None
        # Rate limit (nano-tokens).
        self._tokens = self._config.burst * _NANO
        self._refilled_at: int | None = None
        # Subscriptions, in the order taken (a dict is an ordered set that pickles).
        self._channels: dict[str, None] = {}
        # Delivery window.
        self._delivered_seq = 0
        self._sent_seq = 0
        self._acked_seq = 0
        self._held: dict[tuple[str, str], DeliveryItem] = {}
        self._skipped: list[int] = []
        self._resuming = False
        self._buffer: dict[int, DeliveryItem] = {}
        self._duplicates = 0
        self._conflated = 0

    # -- lifecycle -------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """``anonymous``, ``logged_in`` or ``closed``."""
        return self._state

    @property
    def user(self) -> str | None:
        """The logged-in user (``None`` when anonymous)."""
        return self._user

    @property
    def logged_in_at(self) -> int | None:
        """When the current login happened (``None`` when not logged in)."""
        return self._logged_in_at

    @property
    def config(self) -> SessionConfig:
        """This connection's limits."""
        return self._config

    def login(
        self, user: str, now_ns: int, *, sessions_of_user: int, last_seq: int = 0
    ) -> list[SessionEffect]:
        """Log ``user`` in (the credentials were checked by the caller).

        Args:
            user: the authenticated user.
            now_ns: the current time.
            sessions_of_user: how many sessions ``user`` has open besides this one.
            last_seq: the router's newest seq for ``user``; live delivery
                continues after it.

        Returns:
            ``[SessionJoined(user)]``.

        Raises:
            IllegalSessionTransition: the session is not anonymous.
            RemoteProtocolError: ``too_many_sessions`` when ``sessions_of_user``
                reached ``max_sessions_per_user``; ``bad_request`` for an empty
                user or a negative ``last_seq``.
        """
        state = next_session_state(self._state, "login_ok")
        if not user:
            raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "user must not be empty")
        if last_seq < 0:
            raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "last_seq must not be negative")
        limit = self._config.max_sessions_per_user
        if sessions_of_user >= limit:
            raise RemoteProtocolError(
                ErrorCode.TOO_MANY_SESSIONS, f"{user} already has {limit} sessions open"
            )
        self._state = state
        self._user = user
        self._logged_in_at = now_ns
        self._reset_stream(last_seq)
        return [SessionJoined(user=user)]

    def login_failed(self) -> None:
        """Record a refused login (the session stays anonymous).

        Raises:
            IllegalSessionTransition: the session is not anonymous.
        """
        self._state = next_session_state(self._state, "login_failed")

    def logout(self) -> list[SessionEffect]:
        """Log out; the connection stays open and anonymous.

        Returns:
            ``[SessionLeft(user)]``.

        Raises:
            RemoteProtocolError: ``not_logged_in``.
        """
        user = self.require_login()
        self._state = next_session_state(self._state, "logout")
        self._user = None
        self._logged_in_at = None
        self._reset_stream(0)
        return [SessionLeft(user=user)]

    def close(self) -> list[SessionEffect]:
        """The connection is gone (or being closed); idempotent.

        Returns:
            ``[SessionLeft(user)]`` if a user was logged in, else ``[]``.
        """
        was_logged_in = self._state == "logged_in"
        self._state = next_session_state(self._state, "close")
        self._held.clear()
        self._buffer.clear()
        self._skipped.clear()
        if was_logged_in and self._user is not None:
            return [SessionLeft(user=self._user)]
        return []

    def require_login(self) -> str:
        """The logged-in user, for private operations.

        Raises:
            RemoteProtocolError: ``not_logged_in`` when anonymous or closed.
        """
        if self._state != "logged_in" or self._user is None:
            raise RemoteProtocolError(ErrorCode.NOT_LOGGED_IN, "log in first")
        return self._user

    # -- rate limit ----------------------------------------------------------------------

    def allow(self, now_ns: int, cost: int = 1) -> bool:
        """Take ``cost`` tokens from the bucket if it holds them.

        Args:
            now_ns: the current time.
            cost: tokens this request costs (at least 0).

        Returns:
            Whether the request may proceed; a refused request takes nothing.

        Raises:
            ValueError: a negative ``cost``.
        """
        if cost < 0:
            raise ValueError("cost must not be negative")
        self._refill(now_ns)
        needed = cost * _NANO
        if self._tokens < needed:
            return False
        self._tokens -= needed
        return True

    def require_rate(self, now_ns: int, cost: int = 1) -> None:
        """Like :meth:`allow`, raising instead of returning ``False``.

        Raises:
            RemoteProtocolError: ``rate_limited``.
        """
        if not self.allow(now_ns, cost):
            raise RemoteProtocolError(
                ErrorCode.RATE_LIMITED,
                f"at most {self._config.rate_per_s} requests per second "
                f"(bursts of {self._config.burst})",
            )

    @property
    def tokens_nano(self) -> int:
        """The bucket's content in nano-tokens, as of the last call."""
        return self._tokens

    def _refill(self, now_ns: int) -> None:
        if self._refilled_at is not None and now_ns > self._refilled_at:
            gained = (now_ns - self._refilled_at) * self._config.rate_per_s
            self._tokens = min(self._config.burst * _NANO, self._tokens + gained)
        if self._refilled_at is None or now_ns > self._refilled_at:
            self._refilled_at = now_ns

    # -- subscriptions ------------------------------------------------------------------

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """The channels held, in the order they were taken."""
        return tuple(self._channels)

    def subscribe(self, channels: Iterable[str]) -> tuple[str, ...]:
        """Take every channel in ``channels``, or none of them.

        Returns:
            The channels newly taken, in request order (without repeats).

        Raises:
            RemoteProtocolError: ``bad_request`` (malformed channel, closed
                session, or past ``max_subscriptions``), ``unknown_symbol``.
        """
        wanted = self._validate_channels(channels)
        added = tuple(ch for ch in wanted if ch not in self._channels)
        limit = self._config.max_subscriptions
        if len(self._channels) + len(added) > limit:
            raise RemoteProtocolError(
                ErrorCode.BAD_REQUEST, f"at most {limit} subscriptions per connection"
            )
        for ch in added:
            self._channels[ch] = None
        return added

    def unsubscribe(self, channels: Iterable[str]) -> tuple[str, ...]:
        """Drop every channel in ``channels`` (validated like :meth:`subscribe`).

        Returns:
            The channels actually dropped, in request order.

        Raises:
            RemoteProtocolError: ``bad_request``, ``unknown_symbol``.
        """
        wanted = self._validate_channels(channels)
        removed = tuple(ch for ch in wanted if ch in self._channels)
        for ch in removed:
            del self._channels[ch]
        return removed

    def _validate_channels(self, channels: Iterable[str]) -> tuple[str, ...]:
        if self._state == "closed":
            raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "the session is closed")
        if isinstance(channels, str):
            raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "channels must be a list")
        wanted: dict[str, None] = {}
        for ch in channels:
            match = CHANNEL_RE.fullmatch(ch) if isinstance(ch, str) else None
            if match is None:
                raise RemoteProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"{ch!r} is not a channel (book.SYM, trades.SYM or ticker.SYM)",
                )
            if match.group(2) not in self._known_symbols:
                raise RemoteProtocolError(
                    ErrorCode.UNKNOWN_SYMBOL, f"unknown symbol {match.group(2)!r}"
                )
            wanted[ch] = None
        return tuple(wanted)

    # -- private delivery ---------------------------------------------------------------

    @property
    def delivered_seq(self) -> int:
        """The last seq accepted for the client (sent, held, or conflated away)."""
        return self._delivered_seq

    @property
    def sent_seq(self) -> int:
        """The last seq the client has been sent (as an event or as skipped)."""
        return self._sent_seq

    @property
    def acked_seq(self) -> int:
        """The last seq the client acknowledged."""
        return self._acked_seq

    @property
    def unacked(self) -> int:
        """Seqs sent to the client and not yet acknowledged."""
        return self._sent_seq - self._acked_seq

    @property
    def resuming(self) -> bool:
        """Whether a resume is waiting for its replay."""
        return self._resuming

    def deliver(self, events: Sequence[DeliveryItem]) -> list[SessionEffect]:
        """Live private events from the router, for this session's user.

        Duplicates (``seq <= delivered_seq``) are dropped; during a resume the
        events wait in the reorder buffer until the replay reaches them. Events
        arriving for a session that is not logged in are dropped.

        Args:
            events: one batch; sorted by seq here, so any order is accepted.

        Returns:
            At most one :class:`SessionSend`; or :class:`SessionDisconnect` and
            :class:`SessionLeft` past the hard bound.

        Raises:
            TypeError: an item lacks an integer ``seq``/``priority`` or a string
                ``kind``/``key``.
        """
        return self._accept(events, final_replay=False)

    def begin_resume(self, after_seq: int) -> None:
        """The client holds every event up to ``after_seq`` and asked for the rest.

        The positions move to ``after_seq`` (backwards too: the client asks for
        what it asks for), held and buffered events at or below it are
        dropped, and live events wait for :meth:`replayed`.

        Raises:
            RemoteProtocolError: ``not_logged_in``; ``bad_request`` for a
                negative ``after_seq``.
        """
        self.require_login()
        if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0:
            raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "after_seq must be an integer >= 0")
        buffer = {s: item for s, item in self._buffer.items() if s > after_seq}
        buffer.update((item.seq, item) for item in self._held.values() if item.seq > after_seq)
        self._reset_stream(after_seq)
        self._buffer = buffer
        self._resuming = True

    def replayed(self, events: Sequence[DeliveryItem], *, last: bool = True) -> list[SessionEffect]:
        """Events the router replayed for the current resume.

        Args:
            events: replayed events (any order; duplicates are dropped).
            last: whether this is the last replay batch of the resume; it
                ends the resume and flushes the buffer in seq order.

        Returns:
            Like :meth:`deliver`.

        Raises:
            RemoteProtocolError: ``not_logged_in``.
            TypeError: like :meth:`deliver`.
        """
        self.require_login()
        return self._accept(events, final_replay=last)

    def ack(self, seq: int) -> list[SessionEffect]:
        """The client holds every event up to ``seq``.

        An ack at or below the current one is ignored. An ack that brings
        ``unacked`` below ``window`` sends the held P2/P3 events.

        Returns:
            ``[]``, or one :class:`SessionSend` of the held events.

        Raises:
            RemoteProtocolError: ``not_logged_in``; ``bad_request`` for an ack
                beyond :attr:`sent_seq` or not an integer.
        """
        self.require_login()
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "seq must be an integer")
        if seq > self._sent_seq:
            raise RemoteProtocolError(
                ErrorCode.BAD_REQUEST, f"ack {seq} is beyond the last seq sent, {self._sent_seq}"
            )
        if seq <= self._acked_seq:
            return []
        self._acked_seq = seq
        if self._held and self.unacked < self._config.window:
            out = sorted(self._held.values(), key=_seq_of)
            self._held.clear()
            return [self._send(out)]
        return []

    # -- delivery internals -----------------------------------------------------------

    def _reset_stream(self, seq: int) -> None:
        self._delivered_seq = self._sent_seq = self._acked_seq = seq
        self._held.clear()
        self._skipped.clear()
        self._buffer.clear()
        self._resuming = False

    def _accept(self, events: Sequence[DeliveryItem], *, final_replay: bool) -> list[SessionEffect]:
        for item in events:
            _check_item(item)
        if self._state != "logged_in":
            return []
        incoming = sorted(events, key=_seq_of)
        ready: list[DeliveryItem] = []
        if self._resuming:
            for item in incoming:
                if item.seq > self._delivered_seq:
                    self._buffer.setdefault(item.seq, item)
                else:
                    self._duplicates += 1
            nxt = self._delivered_seq + 1
            while nxt in self._buffer:
                ready.append(self._buffer.pop(nxt))
                nxt += 1
            if final_replay:
                ready.extend(self._buffer[s] for s in sorted(self._buffer))
                self._buffer.clear()
                self._resuming = False
        else:
            last = self._delivered_seq
            for item in incoming:
                if item.seq > last:
                    ready.append(item)
                    last = item.seq
                else:
                    self._duplicates += 1
        return self._release(ready)

    def _release(self, ready: list[DeliveryItem]) -> list[SessionEffect]:
        """Pass ``ready`` (strictly increasing, all after ``delivered_seq``) to the client."""
        window = self._config.window
        out: list[DeliveryItem] = []
        for item in ready:
            self._delivered_seq = item.seq
            sent = out[-1].seq if out else self._sent_seq
            if item.priority > _ALWAYS_SENT_MAX_PRIORITY and sent - self._acked_seq >= window:
                slot = (item.kind, item.key)
                older = self._held.pop(slot, None)
                if older is not None:
                    self._skipped.append(older.seq)
                    self._conflated += 1
                self._held[slot] = item
                continue
            if self._held:
                out.extend(sorted(self._held.values(), key=_seq_of))
                self._held.clear()
            out.append(item)
        backlog = max(self._delivered_seq, max(self._buffer, default=0)) - self._acked_seq
        if backlog > self._config.hard_bound:
            user = self._user
            self._state = next_session_state(self._state, "close")
            self._held.clear()
            self._buffer.clear()
            self._skipped.clear()
            effects: list[SessionEffect] = [SessionDisconnect(reason="slow_consumer")]
            if user is not None:
                effects.append(SessionLeft(user=user))
            return effects
        return [self._send(out)] if out else []

    def _send(self, out: list[DeliveryItem]) -> SessionSend:
        self._sent_seq = out[-1].seq
        announce = sorted(s for s in self._skipped if s < self._sent_seq)
        self._skipped = [s for s in self._skipped if s > self._sent_seq]
        return SessionSend(events=tuple(out), skipped=tuple(announce))

    # -- statistics -----------------------------------------------------------------

    def stats(self) -> SessionStats:
        """A snapshot of this session's state and counters."""
        return SessionStats(
            state=self._state,
            user=self._user,
            delivered_seq=self._delivered_seq,
            sent_seq=self._sent_seq,
            acked_seq=self._acked_seq,
            unacked=self.unacked,
            held=len(self._held),
            buffered=len(self._buffer),
            resuming=self._resuming,
            subscriptions=len(self._channels),
            duplicates_dropped=self._duplicates,
            conflated=self._conflated,
        )


def _seq_of(item: DeliveryItem) -> int:
    return item.seq


def _check_item(item: DeliveryItem) -> None:
    seq = getattr(item, "seq", None)
    priority = getattr(item, "priority", None)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise TypeError(f"a delivery item needs an integer seq >= 1, got {seq!r}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"a delivery item needs an integer priority, got {priority!r}")
    if not isinstance(getattr(item, "kind", None), str) or not isinstance(
        getattr(item, "key", None), str
    ):
        raise TypeError("a delivery item needs string kind and key")
