"""The local provider's store: users with Argon2id password hashes, and ACL entries, in SQLite.

Synchronous on purpose: the CLI uses it directly, and the provider calls it from
one worker thread so the event loop never waits on the disk.

Change detection: every write bumps `meta.revision` inside its own transaction.
`PRAGMA data_version` was not chosen because it is per connection, reports only
changes made through *other* connections and restarts at every open; the
counter is persistent, sees every writer (the CLI, a second gateway, this
connection) and is read in the same transaction as the rows, so `snapshot()`
returns the exact revision its data belongs to and a reader never misses a
change. Reading it is one primary-key lookup.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from auth_providers.acl import AclEntry, validate_ops, validate_pattern
from gateway.errors import StoreError
from gateway.events import Secret

log = logging.getLogger("polygate.auth.local.store")

SCHEMA_VERSION = 1
#: The user whose ACL entries apply to clients that send no username.
ANONYMOUS = "anonymous"
MAX_USERNAME_LENGTH = 256
#: Milliseconds a writer waits for another process (the CLI, a gateway) to finish.
BUSY_TIMEOUT_MS = 5000

#: One certificate identity logs in one user: two would make the login depend on the lookup order.
_CERT_IDENTITY_INDEX = (
    "CREATE UNIQUE INDEX IF NOT EXISTS users_cert_identity ON users (cert_identity) WHERE cert_identity IS NOT NULL"
)
#: `users` columns in the order `_user` reads them.
_USER_COLUMNS = "username, password_hash, superuser, created_at, cert_identity"
MAX_CERT_IDENTITY_LENGTH = 1024

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    """CREATE TABLE users (
        username TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        superuser INTEGER NOT NULL DEFAULT 0 CHECK (superuser IN (0, 1)),
        created_at TEXT NOT NULL,
        cert_identity TEXT
    )""",
    _CERT_IDENTITY_INDEX,
    """CREATE TABLE acl (
        username TEXT NOT NULL,
        pattern TEXT NOT NULL,
        ops TEXT NOT NULL,
        deny INTEGER NOT NULL DEFAULT 0 CHECK (deny IN (0, 1)),
        UNIQUE (username, pattern, deny)
    )""",
)


# OWASP's Argon2id parameters: m=19 MiB, t=2, p=1 (the library defaults take 180-300 ms).
def new_password_hasher() -> PasswordHasher:
    return PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, type=Type.ID)


_hasher = new_password_hasher()


def hash_password(secret: Secret) -> str:
    """An Argon2id PHC string for `secret`."""
    if not secret:
        raise StoreError("a password must not be empty")
    return _hasher.hash(secret.reveal())


def verify_password(phc: str, secret: Secret) -> bool:
    """True when `secret` matches the PHC hash. Never raises; a malformed hash is False."""
    try:
        return _hasher.verify(phc, secret.reveal())
    except VerifyMismatchError:
        return False
    except (InvalidHashError, VerificationError) as exc:
        # Only the kind of problem: neither the secret nor the hash belong in a log.
        log.error("a stored password hash cannot be used (%s); that user cannot log in", type(exc).__name__)
        return False


def validate_username(username: str) -> None:
    if not username:
        raise StoreError("a username must not be empty")
    if len(username) > MAX_USERNAME_LENGTH:
        raise StoreError(f"a username must be at most {MAX_USERNAME_LENGTH} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in username):
        raise StoreError("a username must not contain control characters")


@dataclass(frozen=True, slots=True, kw_only=True)
class UserRecord:
    username: str
    password_hash: str = field(repr=False)
    superuser: bool = False
    #: ISO 8601, UTC.
    created_at: str = ""
    #: A verified client certificate with this identity (`auth.mtls_identity`) logs this user in
    #: without a password; "" when none does.
    cert_identity: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSnapshot:
    """Everything the provider needs, read in one transaction."""

    revision: int
    users: Mapping[str, UserRecord]
    acl: tuple[AclEntry, ...]
    #: Users by certificate identity (only those that have one).
    certificates: Mapping[str, UserRecord] = field(default_factory=lambda: MappingProxyType({}))


_T = TypeVar("_T")


def _ops_text(ops: frozenset[str]) -> str:
    return ",".join(sorted(ops))


def _entry(row: tuple[str, str, str, int]) -> AclEntry:
    return AclEntry(username=row[0], pattern=row[1], ops=frozenset(row[2].split(",")), deny=bool(row[3]))


def _user(row: tuple[str, str, int, str, str | None]) -> UserRecord:
    return UserRecord(
        username=row[0], password_hash=row[1], superuser=bool(row[2]), created_at=row[3], cert_identity=row[4] or ""
    )


def _create_private_file(path: str) -> None:
    """Create the database file readable by its owner only: it holds password hashes."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return  # another process created it first
    except OSError as exc:
        raise StoreError(f"cannot create the auth database {path!r}: {exc.strerror or exc}") from exc
    os.close(fd)


class LocalStore:
    """One SQLite connection. Safe to share between threads; calls are serialised."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        if path != ":memory:" and not os.path.exists(path):
            _create_private_file(path)
        try:
            self._conn = sqlite3.connect(
                path,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE for writes
                check_same_thread=False,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the auth database {path!r}: {exc}") from exc
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # WAL: readers (the gateway) never block the writer (the CLI) and vice versa.
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._init_schema()
        except StoreError:
            self._conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(f"{path!r} is not a usable polygate auth database: {exc}") from exc

    # -- transactions ---------------------------------------------------------

    @contextmanager
    def _transaction(self, *, write: bool, bump: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                raise StoreError(f"the auth database {self.path!r} is busy or not writable: {exc}") from exc
            try:
                yield self._conn
                if write and bump:
                    self._conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'")
                self._conn.execute("COMMIT")
            except BaseException as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"the auth database {self.path!r} failed: {exc}") from exc
                raise

    def _write(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._transaction(write=True) as conn:
            return work(conn)

    def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._transaction(write=False) as conn:
            return work(conn)

    def _init_schema(self) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if "meta" not in tables:
                    if tables:
                        raise StoreError(
                            f"{self.path!r} is an SQLite database of something else "
                            "(it has tables but no polygate meta table); choose another --db"
                        )
                    for statement in _SCHEMA:
                        self._conn.execute(statement)
                    self._conn.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        (("schema_version", SCHEMA_VERSION), ("revision", 0)),
                    )
                else:
                    row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                    version = row[0] if row else None
                    if version != SCHEMA_VERSION:
                        raise StoreError(
                            f"the auth database {self.path!r} has schema version {version}; "
                            f"this polygate knows version {SCHEMA_VERSION} (newer databases need a newer polygate)"
                        )
                    _add_cert_identity_column(self._conn)
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    # -- users ----------------------------------------------------------------

    def add_user(
        self, username: str, password: Secret | None, superuser: bool = False, cert_identity: str = ""
    ) -> None:
        """Add a user; `password` None (only with `cert_identity`) makes it a certificate-only user."""
        check_new_username(username)
        if cert_identity:
            validate_cert_identity(cert_identity)
        if password is None and not cert_identity:
            raise StoreError("a user without a password needs a certificate identity")
        # A certificate-only user gets a hash of a secret nobody knows: every password check
        # then fails the ordinary way, in the ordinary time.
        phc = hash_password(password if password is not None else Secret(secrets.token_bytes(32)))

        def work(conn: sqlite3.Connection) -> None:
            if _user_exists(conn, username):
                raise StoreError(f"user {username!r} already exists; use `users passwd` to change its password")
            if cert_identity:
                _check_cert_identity_free(conn, cert_identity, username)
            _insert_user(conn, username, phc, superuser)
            if cert_identity:
                conn.execute("UPDATE users SET cert_identity = ? WHERE username = ?", (cert_identity, username))

        self._write(work)

    def set_cert_identity(self, username: str, cert_identity: str | None) -> None:
        """Give a user the certificate identity that logs it in without a password; None clears it."""
        if cert_identity is not None:
            validate_cert_identity(cert_identity)

        def work(conn: sqlite3.Connection) -> None:
            if not _user_exists(conn, username):
                raise StoreError(_no_user(username))
            if cert_identity is not None:
                _check_cert_identity_free(conn, cert_identity, username)
            conn.execute("UPDATE users SET cert_identity = ? WHERE username = ?", (cert_identity, username))

        self._write(work)

    def create_first_superuser(self, username: str, password: Secret) -> bool:
        """Add a superuser only when there is no user at all; False when there already was one."""
        check_new_username(username)
        phc = hash_password(password)

        def work(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None:
                return False
            _insert_user(conn, username, phc, True)
            return True

        return self._write(work)

    def ensure_superuser(self, username: str, password: Secret) -> bool:
        """Add a superuser unless a user of that name exists (it is then left as it is); True when added."""
        check_new_username(username)
        phc = hash_password(password)

        def work(conn: sqlite3.Connection) -> bool:
            if _user_exists(conn, username):
                return False
            _insert_user(conn, username, phc, True)
            return True

        return self._write(work)

    def set_password(self, username: str, password: Secret) -> None:
        phc = hash_password(password)

        def work(conn: sqlite3.Connection) -> None:
            cursor = conn.execute("UPDATE users SET password_hash = ? WHERE username = ?", (phc, username))
            if cursor.rowcount == 0:
                raise StoreError(_no_user(username))

        self._write(work)

    def replace_password_hash(self, username: str, old_phc: str, new_phc: str) -> bool:
        """Store a re-hash of the same password (new parameters) unless the hash changed meanwhile.

        Compare-and-set, so a password changed by an operator since the login
        is never overwritten. It leaves the revision alone: what a client may
        do is unchanged, and a bump would reload every gateway's view and drop
        their auth caches once per user upgraded.
        """
        def work(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE users SET password_hash = ? WHERE username = ? AND password_hash = ?", (new_phc, username, old_phc)
            )
            return cursor.rowcount == 1

        with self._transaction(write=True, bump=False) as conn:
            return work(conn)

    def delete_user(self, username: str) -> None:
        """Delete a user and its ACL entries. Superusers cannot be deleted."""

        def work(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT superuser FROM users WHERE username = ?", (username,)).fetchone()
            if row is None:
                raise StoreError(_no_user(username))
            if row[0]:
                raise StoreError(f"cannot delete superuser {username!r}")
            conn.execute("DELETE FROM users WHERE username = ?", (username,))
            conn.execute("DELETE FROM acl WHERE username = ?", (username,))

        self._write(work)

    def get_user(self, username: str) -> UserRecord | None:
        def work(conn: sqlite3.Connection) -> UserRecord | None:
            row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE username = ?", (username,)).fetchone()
            return _user(row) if row else None

        return self._read(work)

    def list_users(self) -> list[UserRecord]:
        return self._read(
            lambda conn: [
                _user(row)
                for row in conn.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY username")
            ]
        )

    def count_users(self) -> int:
        return self._read(lambda conn: conn.execute("SELECT count(*) FROM users").fetchone()[0])

    # -- ACL ------------------------------------------------------------------

    def grant(self, username: str, pattern: str, ops: set[str] | frozenset[str], deny: bool = False) -> AclEntry:
        """Set the entry (username, pattern, allow|deny) to exactly `ops`, creating it if needed."""
        validate_username(username)
        validate_pattern(pattern)
        chosen = validate_ops(ops)

        def work(conn: sqlite3.Connection) -> AclEntry:
            if username != ANONYMOUS and not _user_exists(conn, username):
                raise StoreError(f"{_no_user(username)}; create it first with `users add {username}`")
            conn.execute(
                "INSERT INTO acl (username, pattern, ops, deny) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (username, pattern, deny) DO UPDATE SET ops = excluded.ops",
                (username, pattern, _ops_text(chosen), int(deny)),
            )
            return AclEntry(username=username, pattern=pattern, ops=chosen, deny=deny)

        return self._write(work)

    def revoke(self, username: str, pattern: str) -> int:
        """Remove the allow and the deny entry of `username` on `pattern`; returns how many."""

        def work(conn: sqlite3.Connection) -> int:
            cursor = conn.execute("DELETE FROM acl WHERE username = ? AND pattern = ?", (username, pattern))
            if cursor.rowcount == 0:
                raise StoreError(
                    f"no ACL entry of {username!r} on {pattern!r}; see `acl list {username}`"
                )
            return cursor.rowcount

        return self._write(work)

    def list_acl(self, username: str | None = None) -> list[AclEntry]:
        query = "SELECT username, pattern, ops, deny FROM acl"
        params: tuple[str, ...] = ()
        if username is not None:
            query += " WHERE username = ?"
            params = (username,)
        query += " ORDER BY username, pattern, deny"
        return self._read(lambda conn: [_entry(row) for row in conn.execute(query, params)])

    # -- change detection -----------------------------------------------------

    def revision(self) -> int:
        """Bumped by every write, by any process: compare to detect changes."""
        with self._lock:
            try:
                return self._conn.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0]
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the auth database {self.path!r}: {exc}") from exc

    def snapshot(self) -> StoreSnapshot:
        def work(conn: sqlite3.Connection) -> StoreSnapshot:
            revision = conn.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0]
            users = {row[0]: _user(row) for row in conn.execute(f"SELECT {_USER_COLUMNS} FROM users")}
            acl = tuple(_entry(row) for row in conn.execute("SELECT username, pattern, ops, deny FROM acl"))
            certificates = {user.cert_identity: user for user in users.values() if user.cert_identity}
            return StoreSnapshot(
                revision=revision, users=MappingProxyType(users), acl=acl, certificates=MappingProxyType(certificates)
            )

        return self._read(work)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def validate_cert_identity(cert_identity: str) -> None:
    if not cert_identity:
        raise StoreError("a certificate identity must not be empty")
    if len(cert_identity) > MAX_CERT_IDENTITY_LENGTH:
        raise StoreError(f"a certificate identity must be at most {MAX_CERT_IDENTITY_LENGTH} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in cert_identity):
        raise StoreError("a certificate identity must not contain control characters")


def certificate_user(certificates: Mapping[str, UserRecord], username: str, tls_identity: str) -> UserRecord | None:
    """The user a verified certificate logs in without a password, or None (the password decides).

    A client that names a user must name the certificate's own user: a
    certificate never logs in anyone else, and a user without a certificate
    identity is never reached this way.
    """
    if not tls_identity:
        return None
    user = certificates.get(tls_identity)
    if user is None or (username and username != user.username):
        return None
    return user


def _add_cert_identity_column(conn: sqlite3.Connection) -> None:
    """Bring a database made before certificate identities up to date (same schema version:
    an older polygate still opens it and simply ignores the column)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(users)")}
    if "cert_identity" not in columns:
        conn.execute("ALTER TABLE users ADD COLUMN cert_identity TEXT")
        log.info("auth database: added the users.cert_identity column")
    conn.execute(_CERT_IDENTITY_INDEX)


def _check_cert_identity_free(conn: sqlite3.Connection, cert_identity: str, username: str) -> None:
    row = conn.execute(
        "SELECT username FROM users WHERE cert_identity = ? AND username != ?", (cert_identity, username)
    ).fetchone()
    if row is not None:
        raise StoreError(f"certificate identity {cert_identity!r} already belongs to user {row[0]!r}")


def check_new_username(username: str) -> None:
    """Raise StoreError unless `username` may be given to a new user."""
    validate_username(username)
    if username == ANONYMOUS:
        raise StoreError(
            f"{ANONYMOUS!r} is reserved for clients that send no username; "
            f"give it ACL entries with `acl grant {ANONYMOUS} PATTERN --ops ...`"
        )


def _no_user(username: str) -> str:
    return f"no user {username!r}"


def _user_exists(conn: sqlite3.Connection, username: str) -> bool:
    return conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone() is not None


def _insert_user(conn: sqlite3.Connection, username: str, phc: str, superuser: bool) -> None:
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    conn.execute(
        "INSERT INTO users (username, password_hash, superuser, created_at) VALUES (?, ?, ?, ?)",
        (username, phc, int(superuser), created_at),
    )
