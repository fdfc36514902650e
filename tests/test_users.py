"""User accounts (gateway/users.py): hashing, validation, the users file, demo provisioning."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from gateway.users import (
    UsersFileError,
    UserStore,
    cmd_users_add,
    cmd_users_list,
    default_users_path,
    demo_users,
)

NOW = 1_700_000_000_000_000_000


def _store(path: Path | None = None) -> UserStore:
    return UserStore(path, cheap=True)


def test_add_and_verify() -> None:
    store = _store()
    store.add("alice", "s3cret", deposit_units=10_000_000, now_ns=NOW)
    assert store.verify("alice", "s3cret")
    assert not store.verify("alice", "s3cret ")
    assert not store.verify("alice", "")
    assert not store.verify("bob", "s3cret")
    assert not store.verify("", "s3cret")
    assert not store.verify("alice", "x" * 10_000)
    assert store.names() == ["alice"]
    assert store.deposit_of("alice") == 10_000_000
    assert store.record("alice").created_ns == NOW
    assert store.record("alice").hash.startswith("$argon2id$")


def test_duplicate_refused() -> None:
    store = _store()
    store.add("alice", "one", now_ns=NOW)
    with pytest.raises(UsersFileError, match="already exists"):
        store.add("alice", "two", now_ns=NOW)
    assert store.verify("alice", "one")


@pytest.mark.parametrize(
    "name", ["", "a" * 65, "ålice", "bob smith", "al/ice", "ａlice", "alice\n", 7, None])
def test_bad_names_refused(name: object) -> None:
    store = _store()
    with pytest.raises(UsersFileError, match="invalid user name"):
        store.add(name, "pw", now_ns=NOW)  # type: ignore[arg-type]
    assert store.names() == []


def test_name_edges_accepted() -> None:
    store = _store()
    store.add("a" * 64, "pw", now_ns=NOW)
    store.add("A.b_c-9", "pw", now_ns=NOW)
    assert store.names() == ["A.b_c-9", "a" * 64]


@pytest.mark.parametrize("password", ["", "x" * 257])
def test_bad_passwords_refused(password: str) -> None:
    store = _store()
    with pytest.raises(UsersFileError, match="1-256 characters"):
        store.add("alice", password, now_ns=NOW)
    store.add("alice", "x" * 256, now_ns=NOW)
    assert store.verify("alice", "x" * 256)


def test_bad_deposit_refused() -> None:
    with pytest.raises(UsersFileError, match="deposit_units"):
        _store().add("alice", "pw", deposit_units=-1, now_ns=NOW)


def test_set_password_and_remove() -> None:
    store = _store()
    store.add("alice", "old", now_ns=NOW)
    store.set_password("alice", "new")
    assert store.verify("alice", "new")
    assert not store.verify("alice", "old")
    store.remove("alice")
    assert "alice" not in store
    assert not store.verify("alice", "new")
    with pytest.raises(UsersFileError, match="no such user"):
        store.remove("alice")
    with pytest.raises(UsersFileError, match="no such user"):
        store.set_password("alice", "x")
    with pytest.raises(UsersFileError, match="no such user"):
        store.deposit_of("alice")


def test_file_round_trip_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    store = _store(path)
    store.add("alice", "pw-a", deposit_units=10_000_000, now_ns=NOW)
    store.add("bob", "pw-b", now_ns=NOW + 1)
    assert store.save() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    document = json.loads(path.read_text())
    assert document["version"] == 1
    assert document["users"]["alice"]["deposit"] == "1000.0000"
    assert document["users"]["bob"]["created_ns"] == NOW + 1

    again = UserStore.load(path, cheap=True)
    assert again.names() == ["alice", "bob"]
    assert again.deposit_of("alice") == 10_000_000
    assert again.record("bob") == store.record("bob")
    assert again.verify("alice", "pw-a")
    assert not again.verify("alice", "pw-b")
    # Hashes carry their parameters: a default-strength store verifies cheap hashes.
    assert UserStore.load(path).verify("bob", "pw-b")


def test_save_replaces_a_loose_mode(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text('{"version": 1, "users": {}}')
    path.chmod(0o644)
    store = UserStore.load(path, cheap=True)
    store.add("alice", "pw", now_ns=NOW)
    store.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_missing_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "users.json"
    store = UserStore.load(path, cheap=True)
    assert store.names() == []
    store.add("alice", "pw", now_ns=NOW)
    store.save()  # creates the directory
    assert UserStore.load(path).names() == ["alice"]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"version": 2, "users": {}}',
        b'{"version": 1}',
        b'{"version": 1, "users": []}',
        b'{"version": 1, "users": {"bad name": {"hash": "$argon2id$x"}}}',
        b'{"version": 1, "users": {"alice": "nope"}}',
        b'{"version": 1, "users": {"alice": {"hash": "plaintext"}}}',
        b'{"version": 1, "users": {"alice": {"deposit": "1"}}}',
    ],
)
def test_corrupt_file_raises(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "users.json"
    path.write_bytes(content)
    with pytest.raises(UsersFileError, match="corrupt") as info:
        UserStore.load(path)
    assert str(path) in str(info.value)


def test_corrupt_entry_fields_raise(tmp_path: Path) -> None:
    good = UserStore(cheap=True)
    good.add("alice", "pw", now_ns=NOW)
    entry = good.to_document()["users"]["alice"]
    path = tmp_path / "users.json"
    for field, value in [("deposit", "-1"), ("deposit", "0.00001"), ("deposit", 5),
                         ("created_ns", "0"), ("created_ns", -1), ("created_ns", True)]:
        doc = {"version": 1, "users": {"alice": {**entry, field: value}}}
        path.write_text(json.dumps(doc))
        with pytest.raises(UsersFileError, match=r"corrupt: user 'alice'"):
            UserStore.load(path)


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    store = _store(path)
    for i in range(3):
        store.add(f"u{i}", "pw", now_ns=NOW)
        store.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.json"]


def test_failed_write_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    store = _store(path)
    store.add("alice", "pw", now_ns=NOW)
    store.save()
    before = path.read_bytes()
    # A directory where the file should be makes os.replace fail after the temp is written.
    blocked = tmp_path / "blocked"
    (blocked / "users.json").mkdir(parents=True)
    (blocked / "users.json" / "x").write_text("")
    with pytest.raises(UsersFileError, match="cannot write"):
        store.save(blocked / "users.json")
    assert sorted(p.name for p in blocked.iterdir()) == ["users.json"]
    assert path.read_bytes() == before


def test_save_without_path_refused() -> None:
    with pytest.raises(UsersFileError, match="no file path"):
        _store().save()


def test_never_stores_plaintext(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    password = "correct-horse-battery-staple"
    store = _store(path)
    store.add("alice", password, now_ns=NOW)
    store.save()
    data = path.read_bytes()
    assert password.encode() not in data
    assert b"$argon2id$" in data
    assert password not in repr(store.to_document())


def test_demo_users(tmp_path: Path) -> None:
    started = time.perf_counter()
    store = demo_users(1000, deposit_units=10_000_000)
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"1000 demo users took {elapsed:.2f}s"
    assert len(store) == 1000
    assert store.names()[:3] == ["demo1", "demo10", "demo100"]
    assert "demo1000" in store and "demo1001" not in store
    assert store.verify("demo1", "demo")
    assert store.verify("demo1000", "demo")
    assert not store.verify("demo1", "wrong")
    assert not store.verify("demo1001", "demo")
    assert store.deposit_of("demo500") == 10_000_000

    path = tmp_path / "users.json"
    store.save(path)
    assert b'"demo"' not in path.read_bytes()
    assert UserStore.load(path, cheap=True).verify("demo42", "demo")


def test_demo_users_custom_password() -> None:
    store = demo_users(3, password="pw", deposit_units=0)
    assert store.names() == ["demo1", "demo2", "demo3"]
    assert store.verify("demo2", "pw")
    assert not store.verify("demo2", "demo")
    assert demo_users(0, deposit_units=0).names() == []


def test_cmd_users_add_and_list(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    message = cmd_users_add(path, "alice", "pw", "1000.5")
    assert "alice" in message and "1000.5" in message
    cmd_users_add(path, "bob", "pw2", "0")
    assert cmd_users_list(path) == [("alice", "1000.5000"), ("bob", "0.0000")]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert UserStore.load(path, cheap=True).deposit_of("alice") == 10_005_000
    assert cmd_users_list(tmp_path / "missing.json") == []


@pytest.mark.parametrize("deposit", ["-1", "abc", "0.00001", ""])
def test_cmd_users_add_bad_deposit(tmp_path: Path, deposit: str) -> None:
    path = tmp_path / "users.json"
    with pytest.raises(UsersFileError, match="bad deposit"):
        cmd_users_add(path, "alice", "pw", deposit)
    assert not path.exists()


def test_cmd_users_add_refusals(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    cmd_users_add(path, "alice", "pw", "1")
    with pytest.raises(UsersFileError, match="already exists"):
        cmd_users_add(path, "alice", "pw", "1")
    with pytest.raises(UsersFileError, match="invalid user name"):
        cmd_users_add(path, "al ice", "pw", "1")
    path.write_text("garbage")
    with pytest.raises(UsersFileError, match="corrupt"):
        cmd_users_list(path)


def test_default_users_path(tmp_path: Path) -> None:
    assert default_users_path() == Path("data") / "users.json"
    assert default_users_path(tmp_path) == tmp_path / "users.json"
