"""User accounts: login names, argon2id password hashes and opening deposits.

The accounts live in one JSON file (default ``DATA_DIR/users.json``)::

    {"version": 1,
     "users": {"alice": {"hash": "$argon2id$v=19$m=65536,t=3,p=4$...",
                         "deposit": "1000000",
                         "created_ns": 1700000000000000000}}}

``deposit`` is a decimal money string (the wire's format, see
:func:`protocol.cash_str`), so the file reads the way an operator typed it;
in memory it is integer minor units. The file never holds a password, only
its argon2id hash (salt and parameters included), and is written atomically
(temp file in the same directory, fsync, ``os.replace``) with mode 0600.

Hashing cost is a choice made per store. The default uses argon2-cffi's
defaults (RFC 9106 "low memory": 64 MiB, 3 passes, 4 lanes), about 0.1-0.2 s
per hash on a small machine: right for real accounts, where it is what makes a
stolen file expensive to crack. ``cheap=True`` uses :data:`CHEAP_PARAMETERS`
(8 MiB, 1 pass, 1 lane), some 50x faster and that much cheaper to attack:
for tests and throw-away demo accounts only. A hash records its own
parameters, so a store verifies hashes made under either setting; the setting
only decides how new hashes (and the unknown-user dummy) are made.

:meth:`UserStore.verify` costs one argon2 verification (CPU-bound,
blocking): an async caller should run it in a worker thread. It never
mutates the store, so concurrent calls need no lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import attrs
from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError

from protocol import (  # not re-exported by protocol (yet)
    MAX_PASSWORD,
    USER_RE,
    ProtocolError,
    cash_str,
    cash_to_units,
)

__all__ = [
    "CHEAP_PARAMETERS",
    "DEFAULT_DATA_DIR",
    "FILE_VERSION",
    "USERS_FILE",
    "UserRecord",
    "UserStore",
    "UsersFileError",
    "cheap_hasher",
    "cmd_users_add",
    "cmd_users_list",
    "default_users_path",
    "demo_users",
]

#: Mirrors ``actors.operations.DEFAULT_DATA_DIR``; repeated so this module does
#: not import the actor runtime.
DEFAULT_DATA_DIR: Final = "data"
USERS_FILE: Final = "users.json"
FILE_VERSION: Final = 1
FILE_MODE: Final = 0o600
#: ``PasswordHasher`` keyword arguments for ``cheap=True`` stores (memory in KiB).
CHEAP_PARAMETERS: Final[dict[str, int]] = {
    "time_cost": 1, "memory_cost": 8 * 1024, "parallelism": 1}
# Verified against when the user does not exist, so a miss costs what a hit does.
_DUMMY_PASSWORD: Final = "emporion: no such user"


class UsersFileError(Exception):
    """A users file that cannot be read, or a change to it that is refused.

    The message is for people and names the file or the user concerned.
    """


def cheap_hasher() -> PasswordHasher:
    """A fast, weak argon2id hasher (:data:`CHEAP_PARAMETERS`): tests and demos only."""
    return PasswordHasher(
        time_cost=CHEAP_PARAMETERS["time_cost"],
        memory_cost=CHEAP_PARAMETERS["memory_cost"],
        parallelism=CHEAP_PARAMETERS["parallelism"],
    )


def default_users_path(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``DATA_DIR/users.json``, with ``DATA_DIR`` defaulting to ``./data``."""
    return Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR) / USERS_FILE


@attrs.frozen(kw_only=True)
class UserRecord:
    """One account as stored: the password hash, the opening deposit, when it was made."""

    hash: str
    #: Opening cash in minor units (:data:`protocol.CASH_STEP`).
    deposit_units: int
    #: Creation time, integer nanoseconds since the epoch.
    created_ns: int


def _check_name(name: object) -> str:
    if not isinstance(name, str) or USER_RE.fullmatch(name) is None:
        raise UsersFileError(
            f"invalid user name {name!r}: use 1-64 of the characters A-Z a-z 0-9 . _ -")
    return name


def _check_password(password: object) -> str:
    if not isinstance(password, str) or not 1 <= len(password) <= MAX_PASSWORD:
        # Never echo the password itself.
        raise UsersFileError(f"a password must be 1-{MAX_PASSWORD} characters")
    return password


def _check_units(units: object, what: str) -> int:
    if isinstance(units, bool) or not isinstance(units, int) or units < 0:
        raise UsersFileError(f"{what} must be a non-negative integer, got {units!r}")
    return units


class UserStore:
    """The accounts of one users file, held in memory; :meth:`save` writes them back.

    Changes (:meth:`add`, :meth:`set_password`, :meth:`remove`) touch memory
    only until :meth:`save`. Every refusal raises :class:`UsersFileError`.

    Args:
        path: Where :meth:`save` writes; ``None`` for an in-memory store.
        cheap: Hash new passwords with :data:`CHEAP_PARAMETERS` (fast, weak)
            instead of argon2-cffi's defaults. See the module docstring.
        hasher: An explicit ``PasswordHasher``; overrides ``cheap``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        cheap: bool = False,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self.path: Path | None = Path(path) if path is not None else None
        if hasher is None:
            hasher = cheap_hasher() if cheap else PasswordHasher()
        self._hasher = hasher
        self._users: dict[str, UserRecord] = {}
        self._dummy_hash: str | None = None

    # -- reading ------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        cheap: bool = False,
        hasher: PasswordHasher | None = None,
    ) -> UserStore:
        """Read a users file; a missing file gives an empty store bound to ``path``.

        Args:
            path: The users file.
            cheap: As for the constructor (applies to hashes made later).
            hasher: As for the constructor.

        Returns:
            The store, whose :meth:`save` writes back to ``path``.

        Raises:
            UsersFileError: The file exists but is unreadable, not JSON, of
                another version, or holds a malformed entry; the message names
                the file.
        """
        store = cls(path, cheap=cheap, hasher=hasher)
        file = Path(path)
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            return store
        except OSError as exc:
            raise UsersFileError(f"cannot read users file {file}: {exc.strerror}") from exc
        try:
            document = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UsersFileError(f"users file {file} is corrupt (not JSON): {exc}") from exc
        try:
            store._users = _parse_document(document)
        except UsersFileError as exc:
            raise UsersFileError(f"users file {file} is corrupt: {exc}") from exc
        return store

    def names(self) -> list[str]:
        """The user names, sorted."""
        return sorted(self._users)

    def deposit_of(self, name: str) -> int:
        """A user's opening deposit in minor units.

        Raises:
            UsersFileError: No such user.
        """
        return self._record(name).deposit_units

    def record(self, name: str) -> UserRecord:
        """A user's stored record.

        Raises:
            UsersFileError: No such user.
        """
        return self._record(name)

    def __contains__(self, name: object) -> bool:
        return name in self._users

    def __len__(self) -> int:
        return len(self._users)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    # -- authentication -----------------------------------------------------

    def verify(self, name: str, password: str) -> bool:
        """Whether ``password`` is ``name``'s password.

        An unknown user, or a password of a length no account can have, is
        checked against a dummy hash made with this store's parameters, so the
        time taken does not tell whether the user exists. (A user whose hash
        was made with other parameters verifies at that hash's cost.) Never
        raises for bad input and never changes the store.

        Args:
            name: The login name as the client sent it.
            password: The password as the client sent it.

        Returns:
            ``True`` only for an existing user and their exact password.
        """
        # Made on the first call whoever asks, so only a store's first verify is slower.
        dummy = self._dummy()
        record = self._users.get(name) if isinstance(name, str) else None
        valid = isinstance(password, str) and 1 <= len(password) <= MAX_PASSWORD
        if record is None or not valid:
            self._check(dummy, password if isinstance(password, str) else "")
            return False
        return self._check(record.hash, password)

    def _check(self, encoded: str, password: str) -> bool:
        try:
            return self._hasher.verify(encoded, password)
        except (VerificationError, InvalidHashError):
            return False

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(_DUMMY_PASSWORD)
        return self._dummy_hash

    # -- changes ------------------------------------------------------------

    def add(self, name: str, password: str, *, deposit_units: int = 0, now_ns: int) -> None:
        """Create an account (in memory; :meth:`save` to keep it).

        Args:
            name: 1-64 of ``[A-Za-z0-9._-]`` (:data:`protocol.USER_RE`).
            password: 1-256 characters (:data:`protocol.MAX_PASSWORD`).
            deposit_units: Opening cash in minor units, non-negative.
            now_ns: Creation time, integer nanoseconds since the epoch.

        Raises:
            UsersFileError: Invalid name, password or deposit, or the user exists.
        """
        self._insert(name, self._hash(password), deposit_units=deposit_units, now_ns=now_ns)

    def _insert(self, name: str, encoded: str, *, deposit_units: int, now_ns: int) -> None:
        _check_name(name)
        _check_units(deposit_units, "deposit_units")
        _check_units(now_ns, "now_ns")
        if name in self._users:
            raise UsersFileError(f"user {name!r} already exists")
        self._users[name] = UserRecord(
            hash=encoded, deposit_units=deposit_units, created_ns=now_ns)

    def set_password(self, name: str, password: str) -> None:
        """Replace a user's password (in memory; :meth:`save` to keep it).

        Raises:
            UsersFileError: No such user, or an invalid password.
        """
        record = self._record(name)
        self._users[name] = attrs.evolve(record, hash=self._hash(password))

    def remove(self, name: str) -> None:
        """Delete an account (in memory; :meth:`save` to keep it).

        Raises:
            UsersFileError: No such user.
        """
        self._record(name)
        del self._users[name]

    def _hash(self, password: str) -> str:
        return self._hasher.hash(_check_password(password))

    def _record(self, name: str) -> UserRecord:
        try:
            return self._users[name]
        except (KeyError, TypeError):
            raise UsersFileError(f"no such user {name!r}") from None

    # -- writing ------------------------------------------------------------

    def to_document(self) -> dict[str, Any]:
        """The file's JSON document (hashes, never passwords)."""
        return {
            "version": FILE_VERSION,
            "users": {
                name: {
                    "hash": record.hash,
                    "deposit": cash_str(record.deposit_units),
                    "created_ns": record.created_ns,
                }
                for name, record in sorted(self._users.items())
            },
        }

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the store atomically with mode 0600, creating the directory if needed.

        A crash leaves either the old file or the new one, never a mix; the
        temp file (``.users.json.*.tmp`` beside the target) is removed on error.

        Args:
            path: Where to write; defaults to the store's path, and becomes it.

        Returns:
            The path written.

        Raises:
            UsersFileError: No path known, or the write failed.
        """
        if path is not None:
            self.path = Path(path)
        if self.path is None:
            raise UsersFileError("this users store has no file path; pass one to save()")
        target = self.path
        data = (json.dumps(self.to_document(), indent=2, ensure_ascii=True) + "\n").encode()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(target, data)
        except OSError as exc:
            raise UsersFileError(f"cannot write users file {target}: {exc}") from exc
        return target


def _atomic_write(target: Path, data: bytes) -> None:
    # mkstemp creates the file 0600 already; fchmod makes it explicit and umask-proof.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), FILE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    # Make the rename itself durable. Not every platform can open a directory.
    with contextlib.suppress(OSError):
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _parse_document(document: object) -> dict[str, UserRecord]:
    if not isinstance(document, dict):
        raise UsersFileError("the top level must be a JSON object")
    version = document.get("version")
    if version != FILE_VERSION:
        raise UsersFileError(f"unsupported version {version!r} (expected {FILE_VERSION})")
    users = document.get("users")
    if not isinstance(users, dict):
        raise UsersFileError('"users" must be an object of name -> account')
    return {name: _parse_entry(name, entry) for name, entry in users.items()}


def _parse_entry(name: str, entry: object) -> UserRecord:
    _check_name(name)
    if not isinstance(entry, dict):
        raise UsersFileError(f"user {name!r}: the entry must be an object")
    encoded = entry.get("hash")
    try:
        if not isinstance(encoded, str):
            raise InvalidHashError
        extract_parameters(encoded)
    except InvalidHashError:
        raise UsersFileError(f"user {name!r}: missing or malformed argon2 hash") from None
    try:
        deposit = cash_to_units(entry.get("deposit", "0"), field="deposit")
    except ProtocolError as exc:
        raise UsersFileError(f"user {name!r}: {exc.message}") from None
    created = entry.get("created_ns", 0)
    try:
        _check_units(created, "created_ns")
    except UsersFileError as exc:
        raise UsersFileError(f"user {name!r}: {exc}") from None
    return UserRecord(hash=encoded, deposit_units=deposit, created_ns=created)


# ---------------------------------------------------------------------------
# Demo provisioning


def demo_users(n: int, *, password: str = "demo", deposit_units: int) -> UserStore:
    """An in-memory, cheap-hashing store of ``demo1`` ... ``demoN``, all with one password.

    The shared password is hashed once and that hash (one salt) serves every
    demo account: a salt protects *different* secret passwords from one
    precomputation, and here there is one password, public by design. This
    is what makes 1,000 accounts take milliseconds rather than seconds.
    Creation times are 0, so two calls give equal stores apart from the salt.

    Args:
        n: How many accounts, non-negative.
        password: Their common password.
        deposit_units: Each account's opening cash in minor units.

    Returns:
        The store (no path; ``save(path)`` to write it).

    Raises:
        UsersFileError: Bad ``n``, password or deposit.
    """
    _check_units(n, "n")
    store = UserStore(cheap=True)
    encoded = store._hash(password)
    for i in range(1, n + 1):
        store._insert(f"demo{i}", encoded, deposit_units=deposit_units, now_ns=0)
    return store


# ---------------------------------------------------------------------------
# CLI commands (``emporion users ...``); the argument parsing lives in gateway.cli


def cmd_users_add(
    path: str | os.PathLike[str], name: str, password: str, deposit_text: str
) -> str:
    """``emporion users add``: create an account in the users file and save it.

    Uses full-strength hashing. Reads the clock (this is the edge).

    Args:
        path: The users file (created if missing).
        name: The new user's name.
        password: Their password.
        deposit_text: Opening cash as a decimal string, e.g. ``"10000.50"``.

    Returns:
        A one-line message for the operator.

    Raises:
        UsersFileError: A corrupt file, a bad name, password or deposit, an
            existing user, or a failed write.
    """
    try:
        deposit = cash_to_units(deposit_text, field="deposit")
    except ProtocolError as exc:
        raise UsersFileError(f"bad deposit {deposit_text!r}: {exc.message}") from None
    store = UserStore.load(path)
    store.add(name, password, deposit_units=deposit, now_ns=time.time_ns())
    written = store.save()
    return f"added user {name} with deposit {cash_str(deposit)} to {written}"


def cmd_users_list(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``emporion users list``: ``(name, deposit)`` pairs, sorted by name.

    Args:
        path: The users file (a missing file lists nothing).

    Returns:
        The deposit is a decimal string (:func:`protocol.cash_str`).

    Raises:
        UsersFileError: The file is corrupt or unreadable.
    """
    store = UserStore.load(path)
    return [(name, cash_str(store.deposit_of(name))) for name in store.names()]
