"""`polygate users/acl/hash-password` through argparse, and once through a real subprocess."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from auth_providers.local_store import LocalStore, verify_password
from gateway import cli_store
from gateway.events import Secret

REPO = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="polygate")
    commands = top.add_subparsers(dest="command", required=True)
    cli_store.register(commands)
    return top


def run(argv: Sequence[str], stdin: str = "", monkeypatch: pytest.MonkeyPatch | None = None) -> int:
    args = parser().parse_args(list(argv))
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return args.handler(args)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "nested" / "auth.db")


def test_users_lifecycle(db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["users", "add", "alice", "--db", db, "--password-stdin"], "alice pw\n", monkeypatch) == 0
    assert run(["users", "add", "root", "--superuser", "--db", db, "--password-stdin"], "r\r\n", monkeypatch) == 0
    out = capsys.readouterr().out
    assert "created user 'alice'" in out and "created superuser 'root'" in out
    with LocalStore(db) as store:
        alice = store.get_user("alice")
        root = store.get_user("root")
        assert alice is not None and verify_password(alice.password_hash, Secret("alice pw"))
        assert root is not None and root.superuser and verify_password(root.password_hash, Secret("r"))

    assert run(["users", "list", "--db", db]) == 0
    listing = capsys.readouterr().out
    lines = listing.splitlines()
    assert lines[0].split() == ["USER", "SUPERUSER", "CREATED"]
    assert lines[1].split()[:2] == ["alice", "no"]
    assert lines[2].split()[:2] == ["root", "yes"]
    assert "$argon2" not in listing

    assert run(["users", "passwd", "alice", "--db", db, "--password-stdin"], "new pw\n", monkeypatch) == 0
    with LocalStore(db) as store:
        alice = store.get_user("alice")
        assert alice is not None and verify_password(alice.password_hash, Secret("new pw"))

    assert run(["users", "delete", "root", "--db", db]) == 1
    assert "cannot delete superuser 'root'" in capsys.readouterr().err
    assert run(["users", "delete", "alice", "--db", db]) == 0
    assert run(["users", "delete", "alice", "--db", db]) == 1
    assert "no user 'alice'" in capsys.readouterr().err


def test_user_errors(db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["users", "add", "alice", "--db", db, "--password-stdin"], "pw\n", monkeypatch) == 0
    assert run(["users", "add", "alice", "--db", db, "--password-stdin"], "pw\n", monkeypatch) == 1
    assert "already exists" in capsys.readouterr().err
    assert run(["users", "add", "bob", "--db", db, "--password-stdin"], "\n", monkeypatch) == 2
    assert "must not be empty" in capsys.readouterr().err
    assert run(["users", "add", "anonymous", "--db", db, "--password-stdin"], "pw\n", monkeypatch) == 1
    assert "reserved" in capsys.readouterr().err
    assert run(["users", "passwd", "nobody", "--db", db, "--password-stdin"], "pw\n", monkeypatch) == 1
    with LocalStore(db) as store:
        assert [u.username for u in store.list_users()] == ["alice"]


def test_prompts_twice_and_refuses_a_mismatch(
    db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(["first", "second"])
    monkeypatch.setattr(cli_store.getpass, "getpass", lambda prompt="": next(answers))
    assert run(["users", "add", "alice", "--db", db]) == 2
    assert "do not match" in capsys.readouterr().err
    with LocalStore(db) as store:
        assert store.list_users() == []

    answers = iter(["same", "same"])
    assert run(["users", "add", "alice", "--db", db]) == 0
    with LocalStore(db) as store:
        alice = store.get_user("alice")
        assert alice is not None and verify_password(alice.password_hash, Secret("same"))


def test_acl_commands(db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["users", "add", "alice", "--db", db, "--password-stdin"], "pw\n", monkeypatch) == 0
    assert run(["acl", "grant", "alice", "tenants/%u/#", "--ops", "publish,subscribe", "--db", db]) == 0
    assert run(["acl", "grant", "alice", "tenants/%u/secret", "--ops", "publish", "--deny", "--db", db]) == 0
    assert run(["acl", "grant", "anonymous", "public/#", "--ops", "subscribe", "--db", db]) == 0
    capsys.readouterr()

    assert run(["acl", "list", "--db", db]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines] == [
        ["USER", "PATTERN", "EFFECT", "OPS"],
        ["alice", "tenants/%u/#", "allow", "publish,subscribe"],
        ["alice", "tenants/%u/secret", "deny", "publish"],
        ["anonymous", "public/#", "allow", "subscribe"],
    ]
    assert run(["acl", "list", "anonymous", "--db", db]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2

    assert run(["acl", "grant", "bob", "a/#", "--ops", "publish", "--db", db]) == 1
    assert "no user 'bob'" in capsys.readouterr().err
    assert run(["acl", "grant", "alice", "a/#/b", "--ops", "publish", "--db", db]) == 1
    assert "not a valid topic filter" in capsys.readouterr().err

    assert run(["acl", "revoke", "alice", "tenants/%u/#", "--db", db]) == 0
    assert "removed 1 ACL entry of 'alice' on 'tenants/%u/#'" in capsys.readouterr().out
    assert run(["acl", "revoke", "alice", "tenants/%u/#", "--db", db]) == 1
    assert "no ACL entry of 'alice'" in capsys.readouterr().err
    assert run(["acl", "list", "alice", "--db", db]) == 0
    assert "tenants/%u/#" not in capsys.readouterr().out
    assert run(["acl", "list", "nobody", "--db", db]) == 0
    assert "no ACL entries for 'nobody'" in capsys.readouterr().out


def test_bad_ops_are_a_usage_error(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    for ops in ("read", "", "publish,write"):
        with pytest.raises(SystemExit) as exited:
            parser().parse_args(["acl", "grant", "alice", "a/#", "--ops", ops, "--db", db])
        assert exited.value.code == 2
    assert "use publish, subscribe" in capsys.readouterr().err


def test_db_from_config_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gateway.config")
    configured = tmp_path / "from-config.db"
    config = tmp_path / "polygate.yaml"
    config.write_text(f"auth:\n  provider: local\n  local:\n    db: {configured}\n", encoding="utf-8")
    assert run(["users", "list", "--config", str(config)]) == 0
    assert configured.exists()
    assert "no users" in capsys.readouterr().out

    # --db wins over --config.
    explicit = tmp_path / "explicit.db"
    assert run(["users", "list", "--config", str(config), "--db", str(explicit)]) == 0
    assert explicit.exists()

    broken = tmp_path / "broken.yaml"
    broken.write_text("auth: [unclosed\n", encoding="utf-8")
    assert run(["users", "list", "--config", str(broken)]) == 2
    assert "broken.yaml" in capsys.readouterr().err

    monkeypatch.chdir(tmp_path)
    assert run(["users", "list"]) == 0
    assert (tmp_path / "polygate-auth.db").exists()


def test_hash_password(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["hash-password"], "hunter2\n", monkeypatch) == 0
    phc = capsys.readouterr().out.strip()
    assert phc.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert verify_password(phc, Secret("hunter2"))
    assert run(["hash-password"], "", monkeypatch) == 2
    assert "no password" in capsys.readouterr().err


def test_subprocess_users_add(tmp_path: Path) -> None:
    pytest.importorskip("gateway.cli")
    db = tmp_path / "auth.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "users", "add", "carol", "--db", str(db), "--password-stdin"],
        input=b"carol-pw\n",
        capture_output=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert b"carol-pw" not in done.stdout + done.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "gateway", "users", "list", "--db", str(db)],
        capture_output=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr.decode()
    assert b"carol" in listed.stdout
    with LocalStore(str(db)) as store:
        carol = store.get_user("carol")
        assert carol is not None and verify_password(carol.password_hash, Secret("carol-pw"))
