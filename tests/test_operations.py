"""The operator commands as an operator runs them: `emporion boot`, `status`, `shutdown`.

Every command runs as a subprocess. Each test records the session of every
engine it boots and, in a ``finally``, ends what is left of it by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_kit import Trader, config

from actors.boot import EngineError, EngineLink, boot_engine, exchange_address
from actors.exchange import HOST_START_ATTEMPTS, ExchangeStatus, ExchangeStatusQuery
from actors.host import Host, HostInit
from actors.journal import FILE_NAME as JOURNAL_FILE
from actors.journal import Journal
from actors.operations import ENGINE_FILE, detach_handle, read_engine_file
from actors.runtime import (
    SystemConfig,
    free_port,
    listening_sockets,
    process_session,
    running_system,
    session_pids,
    start_system,
)
from protocol import CASH_STEP

CLI = [sys.executable, "-m", "gateway.cli"]
MILLION = int(1_000_000 / CASH_STEP)
#: ``boot --timeout`` in these tests; every wait on a boot is longer, so a boot
#: that fails shows its own error message rather than a subprocess timeout.
BOOT_TIMEOUT = 60
BOOT_WAIT = BOOT_TIMEOUT + 30


class Engines:
    """The engines a test booted: their sessions and foreground processes, for cleanup."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.sessions: set[int] = set()
        self.procs: list[subprocess.Popen[str]] = []

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)
        assert "Traceback" not in done.stderr, done.stderr
        return done

    def boot(self, *extra: str) -> dict[str, Any]:
        done = self.run("boot", "--admin-port", str(self.port), "--data-dir",
                        str(self.data_dir), "--json", "--timeout", str(BOOT_TIMEOUT), *extra,
                        timeout=BOOT_WAIT)
        assert done.returncode == 0, done.stderr
        report: dict[str, Any] = json.loads(done.stdout)
        self.sessions.add(report["session"])
        return report

    def status(self) -> dict[str, Any]:
        done = self.run("status", "--data-dir", str(self.data_dir), "--json")
        assert done.returncode == 0, done.stderr
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    def popen(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        if listening_sockets(self.port):
            self.run("shutdown", "--admin-port", str(self.port))
        for session in self.sessions:
            for pid in session_pids(session):
                if process_session(pid) == session:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Engines]:
    e = Engines(tmp_path / "data")
    try:
        yield e
    finally:
        e.cleanup()


def _ready_line(proc: subprocess.Popen[str], timeout: float = BOOT_WAIT) -> str:
    """The first stdout line of ``proc`` (fails if it exits or stays silent)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no ready line"
    line = proc.stdout.readline()
    assert line, f"exited with {proc.wait()}: {proc.communicate()[1]}"
    return line


def _gone(pid: int, session: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_session(pid) is None and not session_pids(session):
            return True
        time.sleep(0.02)
    return False


def test_boot_status_shutdown_leave_nothing_behind(engines: Engines) -> None:
    report = engines.boot("--account-shards", "2")
    assert report["ready"] and report["base"] == "multiprocTCPBase"
    assert report["admin"] == f"127.0.0.1:{engines.port}"
    assert {"router", "book:BTC-PERP", "accounts:0", "accounts:1"} <= set(report["hosts"])
    record = read_engine_file(engines.data_dir)
    assert record is not None and record.admin_pid == report["admin_pid"]
    # The engine lives on without the boot process, and only on 127.0.0.1.
    assert process_session(report["admin_pid"]) == report["session"]
    assert {addr for addr, _, _ in listening_sockets(engines.port)} == {"127.0.0.1"}

    status = engines.status()
    hosts = {h["host_id"]: h for h in status["hosts"]}
    assert set(hosts) == set(report["hosts"])
    assert all(h["answered"] for h in hosts.values()), hosts
    assert hosts["book:BTC-PERP"]["kind"] == "book"
    assert hosts["router"]["restarts"] == 0
    pids = {h["pid"] for h in hosts.values()}
    assert len(pids) == len(hosts)
    assert all(process_session(p) == report["session"] for p in pids)
    table = engines.run("status", "--admin-port", str(engines.port))
    assert table.returncode == 0
    assert "book:BTC-PERP" in table.stdout and "journal offset" in table.stdout

    # A host that does not answer (here: SIGSTOPped) costs the timeout, never a hang.
    frozen = hosts["book:ETH-PERP"]["pid"]
    os.kill(frozen, signal.SIGSTOP)
    try:
        slow = engines.run("status", "--data-dir", str(engines.data_dir), "--json",
                           "--timeout", "1", timeout=20)
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert slow.returncode == 0, slow.stderr
    rows = {h["host_id"]: h for h in json.loads(slow.stdout)["hosts"]}
    assert not rows["book:ETH-PERP"]["answered"] and rows["book:ETH-PERP"]["pid"] is None
    assert rows["book:BTC-PERP"]["answered"]

    done = engines.run("shutdown", "--data-dir", str(engines.data_dir))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("stopped"), done.stdout
    assert _gone(report["admin_pid"], report["session"])
    assert not (engines.data_dir / ENGINE_FILE).exists()

    again = engines.run("shutdown", "--admin-port", str(engines.port))
    assert again.returncode == 0 and again.stdout.startswith("not running"), again
    lost = engines.run("status", "--admin-port", str(engines.port))
    assert lost.returncode == 1
    assert "no engine is running" in lost.stderr


def test_a_second_boot_recovers_the_journal(engines: Engines) -> None:
    first = engines.boot("--account-shards", "2", "--fsync", "always")
    assert first["recovered_turns"] == 0
    asys = start_system(SystemConfig(base="multiprocTCPBase", admin_port=engines.port),
                        attach=True)
    try:
        link = EngineLink(asys, "ops-test")
        t = Trader(link)
        # Attach both before any traffic: EngineLink's asks (attach → open_account)
        # take the first message that arrives, which may be a GatewayBatch in flight.
        for user in ("alice", "bob"):
            link.attach(user)
        for user in ("alice", "bob"):
            assert t.deposit(user, MILLION).ok
        assert t.place("alice", "a1", "sell", 600010, 5).ok
        filled = t.place("bob", "b1", "buy", 600020, 3)
        assert filled.result is not None and filled.result["status"] == "filled"
        # (P2 updates are conflated over the default 100 ms window: no event count here.)
        t.wait_events("bob", 3)
        link.close()
    finally:
        detach_handle(asys)
    book = {h["host_id"]: h for h in engines.status()["hosts"]}["book:BTC-PERP"]
    assert book["turns"] >= 2 and book["journal_offset"] >= 2
    assert engines.run("shutdown", "--data-dir", str(engines.data_dir)).returncode == 0
    assert _gone(first["admin_pid"], first["session"])

    # Another placement would start the journaled accounts empty: refused up front.
    wrong = engines.run("boot", "--admin-port", str(engines.port), "--data-dir",
                        str(engines.data_dir), "--timeout", str(BOOT_TIMEOUT), timeout=BOOT_WAIT)
    assert wrong.returncode == 1 and "--account-shards" in wrong.stderr, wrong
    assert not listening_sockets(engines.port)

    second = engines.boot("--account-shards", "2")
    assert second["recovered_turns"] > 0
    book = {h["host_id"]: h for h in engines.status()["hosts"]}["book:BTC-PERP"]
    assert book["turns"] >= 2
    assert engines.run("shutdown", "--data-dir", str(engines.data_dir)).returncode == 0
    assert _gone(second["admin_pid"], second["session"])


def test_a_foreground_engine_stops_cleanly_on_sigterm(engines: Engines) -> None:
    proc = engines.popen("boot", "--foreground", "--admin-port", str(engines.port),
                         "--data-dir", str(engines.data_dir), "--timeout", str(BOOT_TIMEOUT))
    line = _ready_line(proc)
    assert line.startswith("emporion engine ready: multiprocTCPBase"), line
    record = read_engine_file(engines.data_dir)
    assert record is not None and record.foreground and record.session is not None
    engines.sessions.add(record.session)
    assert record.admin_pid is not None
    assert engines.status()["booted"]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.communicate()[1]
    assert _gone(record.admin_pid, record.session)
    assert not (engines.data_dir / ENGINE_FILE).exists()


def test_an_embedded_engine_runs_in_the_foreground(engines: Engines) -> None:
    proc = engines.popen("boot", "--base", "simpleSystemBase", "--data-dir",
                         str(engines.data_dir), "--timeout", str(BOOT_TIMEOUT))
    line = _ready_line(proc)
    assert line.startswith("emporion engine ready: simpleSystemBase, embedded"), line
    status = engines.run("status", "--data-dir", str(engines.data_dir))
    assert status.returncode == 1 and "embedded" in status.stderr
    done = engines.run("shutdown", "--data-dir", str(engines.data_dir))
    assert done.returncode == 0 and done.stdout.startswith("stopped"), done
    assert proc.wait(timeout=30) == 0
    assert not (engines.data_dir / ENGINE_FILE).exists()


# -- a boot on a fresh data directory; hosts that cannot start ----------------------------


@contextlib.contextmanager
def _writer_holding_the_lock(path: Path, seconds: float) -> Iterator[None]:
    """Another connection holds the journal's write lock for ``seconds``."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    timer = threading.Timer(seconds, other.execute, ("COMMIT",))
    timer.start()
    try:
        yield
    finally:
        timer.join()
        other.close()


def test_only_an_initialised_journal_opens_beside_a_busy_writer(tmp_path: Path) -> None:
    """Why the Exchange prepares the journal before it starts any host.

    Switching a *fresh* SQLite file to WAL upgrades a read lock to a write lock,
    and SQLite refuses a contended upgrade at once - the busy timeout is not
    consulted - which is how hosts starting together on a new data directory
    failed their HostInit with "database is locked" (twice: a hung boot). A
    journal already in WAL mode with its schema opens while a writer holds the lock.
    """
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with _writer_holding_the_lock(fresh / JOURNAL_FILE, 0.5):
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            Journal.open(fresh, busy_timeout=5.0)
        assert time.monotonic() - started < 2.0  # refused, not waited for

    prepared = tmp_path / "prepared"
    Journal.open(prepared).close()
    with (_writer_holding_the_lock(prepared / JOURNAL_FILE, 0.3),
          Journal.open(prepared, busy_timeout=5.0) as journal):
        assert journal.streams() == []


def test_the_exchange_prepares_the_journal_before_any_host_opens_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers: dict[str, bytes] = {}
    original = Host.receiveMsg_HostInit

    def spy(self: Host, msg: HostInit, sender: Any) -> None:
        path = tmp_path / JOURNAL_FILE
        # Bytes 18-19 of an SQLite file are 2, 2 once it is in WAL mode.
        headers[msg.host_id] = path.read_bytes()[18:20] if path.exists() else b""
        original(self, msg, sender)

    monkeypatch.setattr(Host, "receiveMsg_HostInit", spy)
    with running_system("simpleSystemBase") as asys:
        ready = boot_engine(asys, config(tmp_path, account_shards=2), timeout=30)
    assert set(headers) == set(ready.directory.hosts)
    assert set(headers.values()) == {b"\x02\x02"}, headers


def test_a_host_that_fails_to_start_is_started_in_a_new_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    routers: list[Host] = []  # the router actors, in the order they got a HostInit
    original = Host.receiveMsg_HostInit

    def flaky(self: Host, msg: HostInit, sender: Any) -> None:
        if msg.host_id == "router":
            if self not in routers:
                routers.append(self)
            if self is routers[0]:  # every try of the first router actor fails
                raise sqlite3.OperationalError("database is locked")
        original(self, msg, sender)

    monkeypatch.setattr(Host, "receiveMsg_HostInit", flaky)
    with running_system("simpleSystemBase") as asys:
        boot_engine(asys, config(tmp_path, account_shards=2), timeout=30)
        assert len(routers) == 2
        status = asys.ask(exchange_address(asys), ExchangeStatusQuery(), 10)
        assert isinstance(status, ExchangeStatus)
        assert {h: r for h, _, r in status.hosts}["router"] == 0  # not a restart
        link = EngineLink(asys, "ops-test")
        t = Trader(link)
        link.attach("alice")
        assert t.deposit("alice", MILLION).ok  # through the router started anew
        link.close()


def test_a_host_that_never_starts_fails_the_boot_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Host, msg: HostInit, sender: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Host, "receiveMsg_HostInit", broken)
    with running_system("simpleSystemBase") as asys:
        started = time.monotonic()
        with pytest.raises(EngineError, match=f"failed to start in {HOST_START_ATTEMPTS} "
                           "processes: .*disk I/O error"):
            boot_engine(asys, config(tmp_path), timeout=60)
        assert time.monotonic() - started < 30
        with pytest.raises(EngineError, match="disk I/O error"):  # and stays failed
            boot_engine(asys, config(tmp_path), timeout=60)


def test_boot_reports_a_corrupted_journal_instead_of_timing_out(engines: Engines) -> None:
    stream = "host:book:BTC-PERP"
    with Journal.open(engines.data_dir) as journal:
        for i in range(3):
            with journal.turn():
                journal.append(stream, [f"turn {i}"])
    raw = sqlite3.connect(engines.data_dir / JOURNAL_FILE)
    raw.execute("DELETE FROM records WHERE stream = ? AND seq = 2", (stream,))  # a hole
    raw.commit()
    raw.close()

    started = time.monotonic()
    done = engines.run("boot", "--admin-port", str(engines.port), "--data-dir",
                       str(engines.data_dir), "--account-shards", "2",
                       "--timeout", str(BOOT_TIMEOUT), timeout=BOOT_WAIT)
    assert time.monotonic() - started < BOOT_TIMEOUT / 2
    assert done.returncode == 1, done
    assert "host book:BTC-PERP failed to start" in done.stderr, done.stderr
    assert "JournalCorrupted" in done.stderr and "offset 2" in done.stderr, done.stderr
    assert not listening_sockets(engines.port)
    assert not (engines.data_dir / ENGINE_FILE).exists()
    # The Exchange's own account of it is in the actor log (not lost on stderr).
    log = (engines.data_dir / "logs" / "actors.log").read_text()
    assert "actors.exchange host book:BTC-PERP failed to start" in log, log[-2000:]


def test_a_replay_capacity_below_one_is_refused_before_anything_starts(
        engines: Engines) -> None:
    for command in (["boot", "--base", "simpleSystemBase"], ["run", "--no-live"]):
        done = engines.run(*command, "--data-dir", str(engines.data_dir),
                           "--replay-capacity", "0")
        assert done.returncode != 0
        assert "--replay-capacity must be 1 or more" in done.stderr, done.stderr
    assert not (engines.data_dir / ENGINE_FILE).exists()
