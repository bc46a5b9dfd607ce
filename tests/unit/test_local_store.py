"""The local store: users, ACL entries, revisions, persistence and password hashing."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher, Type

from auth_providers import local_store
from auth_providers.acl import AclEntry
from auth_providers.local_store import LocalStore, hash_password, verify_password
from gateway.errors import StoreError
from gateway.events import Secret


@pytest.fixture(autouse=True)
def fast_hasher(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only here, where hashing cost is not under test: keeps the file fast.
    monkeypatch.setattr(local_store, "_hasher", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1, type=Type.ID))


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "sub" / "dir" / "auth.db")


@pytest.fixture
def store(db_path: str) -> Iterator[LocalStore]:
    with LocalStore(db_path) as opened:
        yield opened


def test_creates_the_file_and_its_parents_owner_only(db_path: str) -> None:
    with LocalStore(db_path):
        pass
    assert os.path.isfile(db_path)
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert dict(conn.execute("SELECT key, value FROM meta")) == {"schema_version": 1, "revision": 0}


def test_user_crud(store: LocalStore) -> None:
    store.add_user("alice", Secret("pw-a"))
    store.add_user("root", Secret("pw-r"), superuser=True)
    assert [(u.username, u.superuser) for u in store.list_users()] == [("alice", False), ("root", True)]
    alice = store.get_user("alice")
    assert alice is not None
    assert alice.password_hash.startswith("$argon2id$")
    assert "password_hash" not in repr(alice)
    assert alice.created_at.endswith("+00:00")
    assert verify_password(alice.password_hash, Secret("pw-a"))

    store.set_password("alice", Secret("pw-new"))
    alice = store.get_user("alice")
    assert alice is not None
    assert verify_password(alice.password_hash, Secret("pw-new"))
    assert not verify_password(alice.password_hash, Secret("pw-a"))

    store.delete_user("alice")
    assert store.get_user("alice") is None
    assert store.count_users() == 1


def test_user_errors(store: LocalStore) -> None:
    store.add_user("alice", Secret("pw"))
    with pytest.raises(StoreError, match="user 'alice' already exists"):
        store.add_user("alice", Secret("pw"))
    with pytest.raises(StoreError, match="no user 'bob'"):
        store.set_password("bob", Secret("pw"))
    with pytest.raises(StoreError, match="no user 'bob'"):
        store.delete_user("bob")
    with pytest.raises(StoreError, match="must not be empty"):
        store.add_user("carol", Secret(""))
    with pytest.raises(StoreError, match="reserved"):
        store.add_user("anonymous", Secret("pw"))


@pytest.mark.parametrize(
    ("username", "message"),
    [("", "must not be empty"), ("a\nb", "control characters"), ("a\x00", "control"), ("x" * 257, "at most 256")],
)
def test_username_rules(store: LocalStore, username: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        store.add_user(username, Secret("pw"))


def test_longest_username_and_unicode_are_fine(store: LocalStore) -> None:
    store.add_user("x" * 256, Secret("pw"))
    store.add_user("ünïcødé user", Secret("pw"))
    assert store.count_users() == 2


def test_superuser_cannot_be_deleted(store: LocalStore) -> None:
    store.add_user("root", Secret("pw"), superuser=True)
    with pytest.raises(StoreError, match="cannot delete superuser 'root'"):
        store.delete_user("root")
    assert store.get_user("root") is not None


def test_first_superuser_only_when_empty(store: LocalStore) -> None:
    assert store.create_first_superuser("admin", Secret("pw"))
    assert not store.create_first_superuser("other", Secret("pw"))
    assert [u.username for u in store.list_users()] == ["admin"]
    admin = store.get_user("admin")
    assert admin is not None and admin.superuser


def test_ensure_superuser_adds_only_missing_users(store: LocalStore) -> None:
    store.add_user("alice", Secret("pw"))
    assert store.ensure_superuser("root", Secret("root-pw"))
    assert not store.ensure_superuser("root", Secret("other"))
    assert not store.ensure_superuser("alice", Secret("other"))
    root, alice = store.get_user("root"), store.get_user("alice")
    assert root is not None and root.superuser and verify_password(root.password_hash, Secret("root-pw"))
    assert alice is not None and not alice.superuser and verify_password(alice.password_hash, Secret("pw"))


def test_acl_grant_list_revoke(store: LocalStore) -> None:
    store.add_user("alice", Secret("pw"))
    entry = store.grant("alice", "tenants/%u/#", {"publish", "subscribe"})
    assert entry == AclEntry(username="alice", pattern="tenants/%u/#", ops=frozenset({"publish", "subscribe"}))
    store.grant("alice", "tenants/%u/secret", {"publish"}, deny=True)
    store.grant("anonymous", "public/#", {"subscribe"})
    assert store.list_acl("alice") == [
        AclEntry(username="alice", pattern="tenants/%u/#", ops=frozenset({"publish", "subscribe"})),
        AclEntry(username="alice", pattern="tenants/%u/secret", ops=frozenset({"publish"}), deny=True),
    ]
    assert [e.username for e in store.list_acl()] == ["alice", "alice", "anonymous"]

    # Granting the same (user, pattern, effect) again sets its operations.
    store.grant("alice", "tenants/%u/#", {"subscribe"})
    assert store.list_acl("alice")[0].ops == frozenset({"subscribe"})
    # The allow and the deny entry of a pattern coexist; revoke removes both.
    store.grant("alice", "tenants/%u/#", {"publish"}, deny=True)
    assert store.revoke("alice", "tenants/%u/#") == 2
    assert [e.pattern for e in store.list_acl("alice")] == ["tenants/%u/secret"]


def test_acl_errors(store: LocalStore) -> None:
    store.add_user("alice", Secret("pw"))
    with pytest.raises(StoreError, match="no user 'bob'; create it first"):
        store.grant("bob", "a/#", {"publish"})
    with pytest.raises(StoreError, match="not a valid topic filter"):
        store.grant("alice", "a/#/b", {"publish"})
    with pytest.raises(StoreError, match="whole topic level"):
        store.grant("alice", "a/pre%u", {"publish"})
    with pytest.raises(StoreError, match="unknown ACL operation"):
        store.grant("alice", "a/#", {"read"})
    with pytest.raises(StoreError, match="at least one"):
        store.grant("alice", "a/#", set())
    with pytest.raises(StoreError, match="no ACL entry of 'alice' on 'a/#'"):
        store.revoke("alice", "a/#")
    assert store.list_acl() == []


def test_delete_user_removes_its_acl(store: LocalStore) -> None:
    store.add_user("alice", Secret("pw"))
    store.grant("alice", "a/#", {"publish"})
    store.delete_user("alice")
    assert store.list_acl() == []


def test_every_write_bumps_the_revision_and_failures_do_not(store: LocalStore) -> None:
    revisions = [store.revision()]

    def bumped() -> None:
        revisions.append(store.revision())
        assert revisions[-1] == revisions[-2] + 1

    store.add_user("alice", Secret("pw"))
    bumped()
    store.set_password("alice", Secret("pw2"))
    bumped()
    store.grant("alice", "a/#", {"publish"})
    bumped()
    store.revoke("alice", "a/#")
    bumped()
    store.delete_user("alice")
    bumped()
    with pytest.raises(StoreError):
        store.delete_user("alice")
    store.list_users()
    store.snapshot()
    assert store.revision() == revisions[-1]


def test_second_connection_sees_changes(store: LocalStore, db_path: str) -> None:
    with LocalStore(db_path) as other:
        before = store.revision()
        other.add_user("bob", Secret("pw"))
        assert store.revision() == before + 1
        assert store.get_user("bob") is not None


def test_snapshot(store: LocalStore) -> None:
    store.add_user("alice", Secret("pw"))
    store.grant("alice", "a/#", {"publish"})
    snap = store.snapshot()
    assert snap.revision == store.revision()
    assert set(snap.users) == {"alice"}
    assert snap.users["alice"].password_hash.startswith("$argon2id$")
    assert snap.acl == (AclEntry(username="alice", pattern="a/#", ops=frozenset({"publish"})),)
    with pytest.raises(TypeError):
        snap.users["x"] = snap.users["alice"]  # type: ignore[index]


def test_persists_across_reopen(db_path: str) -> None:
    with LocalStore(db_path) as first:
        first.add_user("alice", Secret("pw"))
        first.add_user("root", Secret("pw"), superuser=True)
        first.grant("alice", "a/#", {"subscribe"}, deny=True)
        revision = first.revision()
    with LocalStore(db_path) as second:
        assert [(u.username, u.superuser) for u in second.list_users()] == [("alice", False), ("root", True)]
        assert second.list_acl() == [AclEntry(username="alice", pattern="a/#", ops=frozenset({"subscribe"}), deny=True)]
        assert second.revision() == revision
        user = second.get_user("alice")
        assert user is not None and verify_password(user.password_hash, Secret("pw"))


def test_refuses_a_newer_schema(db_path: str) -> None:
    with LocalStore(db_path):
        pass
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99"):
        LocalStore(db_path)


def test_refuses_foreign_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable polygate auth database"):
        LocalStore(str(garbage))
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE things (x)")
    with pytest.raises(StoreError, match="something else"):
        LocalStore(str(other))


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create the auth database"):
        LocalStore(str(blocker / "auth.db"))


def test_hash_and_verify() -> None:
    phc = hash_password(Secret("s3cret"))
    assert phc.startswith("$argon2id$")
    assert verify_password(phc, Secret("s3cret"))
    assert not verify_password(phc, Secret("s3cret "))
    assert not verify_password(phc, Secret(""))
    assert hash_password(Secret("s3cret")) != phc  # salted
    with pytest.raises(StoreError):
        hash_password(Secret(""))


def test_real_parameters_are_owasp() -> None:
    hasher = local_store.new_password_hasher()
    assert (hasher.time_cost, hasher.memory_cost, hasher.parallelism, hasher.type) == (2, 19456, 1, Type.ID)


@pytest.mark.parametrize("bad", ["", "garbage", "$argon2id$v=19$m=1,t=1,p=1$bad$bad", "$2b$12$abcdefghijklmnop"])
def test_malformed_hash_is_false_and_logged_without_secrets(bad: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="polygate.auth.local.store"):
        assert verify_password(bad, Secret("topsecret")) is False
    assert caplog.records, "a malformed hash must be logged"
    assert "topsecret" not in caplog.text
    if bad:
        assert bad not in caplog.text


# -- certificate identities -----------------------------------------------------------------------


def test_a_certificate_only_user_has_an_identity_and_no_usable_password(store: LocalStore) -> None:
    store.add_user("dev1", None, cert_identity="dev1.example.com")
    user = store.get_user("dev1")
    assert user is not None and user.cert_identity == "dev1.example.com"
    # A hash of a secret nobody knows: every password fails the ordinary way.
    assert not verify_password(user.password_hash, Secret(""))
    assert not verify_password(user.password_hash, Secret("dev1"))
    snapshot = store.snapshot()
    assert snapshot.certificates["dev1.example.com"].username == "dev1"


def test_a_user_without_password_needs_a_certificate_identity(store: LocalStore) -> None:
    with pytest.raises(StoreError, match="needs a certificate identity"):
        store.add_user("dev1", None)
    assert store.get_user("dev1") is None


def test_cert_identity_is_set_changed_cleared_and_unique(store: LocalStore) -> None:
    store.add_user("dev1", Secret("pw"))
    store.add_user("dev2", Secret("pw"), cert_identity="two")
    assert store.get_user("dev1").cert_identity == ""  # type: ignore[union-attr]
    before = store.revision()
    store.set_cert_identity("dev1", "one")
    assert store.revision() > before  # the gateway notices the change
    assert store.snapshot().certificates.keys() == {"one", "two"}
    with pytest.raises(StoreError, match="already belongs to user 'dev2'"):
        store.set_cert_identity("dev1", "two")
    with pytest.raises(StoreError, match="already belongs to user 'dev1'"):
        store.add_user("dev3", Secret("pw"), cert_identity="one")
    assert store.get_user("dev3") is None
    store.set_cert_identity("dev1", "one")  # its own identity again: no conflict
    store.set_cert_identity("dev1", None)
    assert store.snapshot().certificates.keys() == {"two"}
    with pytest.raises(StoreError, match="no user"):
        store.set_cert_identity("ghost", "x")


@pytest.mark.parametrize("bad", ["", "a\x00b", "line\nbreak", "x" * 1025])
def test_bad_cert_identities_are_refused(store: LocalStore, bad: str) -> None:
    store.add_user("dev1", Secret("pw"))
    with pytest.raises(StoreError, match="certificate identity"):
        store.set_cert_identity("dev1", bad)


def test_a_database_from_before_certificate_identities_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        CREATE TABLE users (username TEXT PRIMARY KEY, password_hash TEXT NOT NULL,
            superuser INTEGER NOT NULL DEFAULT 0 CHECK (superuser IN (0, 1)), created_at TEXT NOT NULL);
        CREATE TABLE acl (username TEXT NOT NULL, pattern TEXT NOT NULL, ops TEXT NOT NULL,
            deny INTEGER NOT NULL DEFAULT 0 CHECK (deny IN (0, 1)), UNIQUE (username, pattern, deny));
        INSERT INTO meta VALUES ('schema_version', 1), ('revision', 7);
        """
    )
    conn.execute("INSERT INTO users VALUES ('old', ?, 0, '2026-01-01T00:00:00+00:00')", (hash_password(Secret("pw")),))
    conn.commit()
    conn.close()
    with LocalStore(str(path)) as store:
        old = store.get_user("old")
        assert old is not None and old.cert_identity == "" and verify_password(old.password_hash, Secret("pw"))
        store.set_cert_identity("old", "old-device")
        store.add_user("new", Secret("pw"), cert_identity="new-device")
        assert store.snapshot().certificates.keys() == {"old-device", "new-device"}
    with LocalStore(str(path)) as again:  # a second open finds the column and adds nothing
        assert again.get_user("old").cert_identity == "old-device"  # type: ignore[union-attr]


def test_certificate_user_matches_only_its_own_user() -> None:
    dev1 = local_store.UserRecord(username="dev1", password_hash="", cert_identity="dev1")
    certificates = {"dev1": dev1}
    assert local_store.certificate_user(certificates, "", "dev1") is dev1
    assert local_store.certificate_user(certificates, "dev1", "dev1") is dev1
    assert local_store.certificate_user(certificates, "root", "dev1") is None  # never logs in anyone else
    assert local_store.certificate_user(certificates, "", "stranger") is None
    assert local_store.certificate_user(certificates, "", "") is None
    assert local_store.certificate_user({}, "dev1", "dev1") is None  # a user without an identity
