"""The session table of one gateway: private deliveries fanned out to connections.

The router sends one :class:`~actors.messages.Delivery` per user per turn to
each gateway holding a session of that user (never one message per
connection); the gateway fans it out locally to the user's connections in
this table (``by_user``), each through its session core. Each
connection's :class:`~actors.cores.session.Session` core applies the delivery
window: a connection that stops acknowledging first loses P2/P3 detail
(conflated to the latest value per key, the skipped seqs announced), is
disconnected past the hard bound, and never loses a P0/P1 event (they stay in
the router's replay log for ``resume``).

Pure and deterministic like the cores (time comes in as ``now_ns``).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from actors.cores.session import (
    Session,
    SessionConfig,
    SessionDisconnect,
    SessionEffect,
    SessionSend,
)
from actors.messages import Delivery
from protocol import ErrorCode, RemoteProtocolError


@attrs.frozen
class ConnEffect:
    """An effect of one connection's session core."""

    conn: int
    effect: SessionEffect


class SessionHub:
    """Every session of one gateway, by connection id, and each user's connections."""

    def __init__(self, known_symbols: Iterable[str], config: SessionConfig | None = None) -> None:
        self.symbols = tuple(known_symbols)
        self.config = config or SessionConfig()
        self.sessions: dict[int, Session] = {}
        self.by_user: dict[str, dict[int, None]] = {}

    def open(self, conn: int) -> Session:
        session = self.sessions[conn] = Session(known_symbols=self.symbols, config=self.config)
        return session

    def login(self, conn: int, user: str, now_ns: int, *, last_seq: int) -> None:
        """Log ``conn`` in as ``user``; live delivery starts after ``last_seq``.

        Raises:
            RemoteProtocolError: ``too_many_sessions`` (the per-user limit).
        """
        session = self.sessions[conn]
        session.login(user, now_ns, sessions_of_user=len(self.by_user.get(user, {})),
                      last_seq=last_seq)
        self.by_user.setdefault(user, {})[conn] = None

    def close(self, conn: int) -> str | None:
        """Forget ``conn``; returns its user when that was the user's last session here."""
        session = self.sessions.pop(conn, None)
        if session is None:
            return None
        user = session.user
        session.close()
        if user is None:
            return None
        conns = self.by_user.get(user, {})
        conns.pop(conn, None)
        if conns:
            return None
        self.by_user.pop(user, None)
        return user

    def deliver(self, delivery: Delivery) -> list[ConnEffect]:
        """Fan one user's delivery out to each of the user's connections.

        A :class:`SessionDisconnect` leaves the connection in the table (its session
        core, closed, takes nothing more): the caller closes the connection and then
        :meth:`close`, whose answer says whether that was the user's last session
        here (detach from the router, cancel on disconnect). The gateway does the
        same in its own fan-out, ``Gateway._deliver``, which also stashes events for
        a connection with a resume in flight.
        """
        out: list[ConnEffect] = []
        for conn in list(self.by_user.get(delivery.user, ())):
            out += [ConnEffect(conn, eff) for eff in self.sessions[conn].deliver(delivery.events)]
        return out

    def ack(self, conn: int, seq: int) -> list[ConnEffect]:
        session = self.sessions.get(conn)
        if session is None:
            raise RemoteProtocolError(ErrorCode.NOT_LOGGED_IN, "no session")
        return [ConnEffect(conn, e) for e in session.ack(seq)]


__all__ = ["ConnEffect", "SessionDisconnect", "SessionHub", "SessionSend"]
