"""`polygate users ...`, `polygate acl ...` and `polygate hash-password`: manage the local store.

`register(subparsers)` adds the commands to the main parser; every leaf sets
`handler`, a function taking the parsed namespace and returning the exit code:
0 done, 1 the store refused (StoreError), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Sequence

from auth_providers.acl import OPS
from auth_providers.local_store import LocalStore, check_new_username, hash_password
from gateway.config_types import LocalConfig
from gateway.errors import ConfigError, StoreError
from gateway.events import Secret

Handler = Callable[[argparse.Namespace], int]

EXIT_OK = 0
EXIT_STORE = 1
EXIT_USAGE = 2


class _UsageError(Exception):
    """Input the user must fix (a missing or mismatched password, a bad config)."""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `users`, `acl` and `hash-password` to the subcommands of the `polygate` parser."""
    store_options = argparse.ArgumentParser(add_help=False)
    store_options.add_argument("--db", metavar="FILE", help="the SQLite auth database (created when missing)")
    store_options.add_argument(
        "--config", metavar="FILE", help="take the database path from auth.local.db of this config"
    )
    password_options = argparse.ArgumentParser(add_help=False)
    password_options.add_argument(
        "--password-stdin", action="store_true", help="read the password as one line from stdin instead of prompting"
    )

    users = subparsers.add_parser("users", help="manage the users of the local auth provider")
    users_commands = users.add_subparsers(dest="users_command", metavar="COMMAND", required=True)
    add = users_commands.add_parser(
        "add", parents=[store_options, password_options], help="create a user (prompts twice for the password)"
    )
    add.add_argument("username", metavar="USER")
    add.add_argument("--superuser", action="store_true", help="may do everything; cannot be deleted")
    add.add_argument(
        "--cert-identity", metavar="VALUE", default="",
        help="a verified client certificate with this identity (auth.mtls_identity) logs in without a password",
    )
    add.add_argument(
        "--no-password", action="store_true", help="with --cert-identity: no password at all (certificate only)"
    )
    add.set_defaults(handler=_users_add)
    cert_identity = users_commands.add_parser(
        "cert-identity", parents=[store_options], help="set (or --clear) the certificate identity of a user"
    )
    cert_identity.add_argument("username", metavar="USER")
    cert_identity.add_argument("value", metavar="VALUE", nargs="?", help="the identity, e.g. the certificate's CN")
    cert_identity.add_argument("--clear", action="store_true", help="no certificate logs this user in any more")
    cert_identity.set_defaults(handler=_users_cert_identity)
    passwd = users_commands.add_parser(
        "passwd", parents=[store_options, password_options], help="change a user's password"
    )
    passwd.add_argument("username", metavar="USER")
    passwd.set_defaults(handler=_users_passwd)
    delete = users_commands.add_parser("delete", parents=[store_options], help="delete a user and its ACL entries")
    delete.add_argument("username", metavar="USER")
    delete.set_defaults(handler=_users_delete)
    listing = users_commands.add_parser("list", parents=[store_options], help="list the users")
    listing.set_defaults(handler=_users_list)

    acl = subparsers.add_parser("acl", help="manage the ACL entries of the local auth provider")
    acl_commands = acl.add_subparsers(dest="acl_command", metavar="COMMAND", required=True)
    grant = acl_commands.add_parser(
        "grant",
        parents=[store_options],
        help="set an allow (or --deny) entry; USER 'anonymous' is for clients without a username",
    )
    grant.add_argument("username", metavar="USER")
    grant.add_argument("pattern", metavar="PATTERN", help="MQTT filter; %%u = username, %%c = client id (whole levels)")
    grant.add_argument("--ops", required=True, type=_parse_ops, help="publish, subscribe or publish,subscribe")
    grant.add_argument("--deny", action="store_true", help="forbid instead: overrides every allow that matches")
    grant.set_defaults(handler=_acl_grant)
    revoke = acl_commands.add_parser(
        "revoke", parents=[store_options], help="remove the allow and deny entries of USER on PATTERN"
    )
    revoke.add_argument("username", metavar="USER")
    revoke.add_argument("pattern", metavar="PATTERN")
    revoke.set_defaults(handler=_acl_revoke)
    acl_list = acl_commands.add_parser("list", parents=[store_options], help="list ACL entries (of USER)")
    acl_list.add_argument("username", metavar="USER", nargs="?")
    acl_list.set_defaults(handler=_acl_list)

    hasher = subparsers.add_parser("hash-password", help="print an Argon2id PHC hash of a password read from stdin")
    hasher.set_defaults(handler=_hash_password)


def _parse_ops(text: str) -> frozenset[str]:
    ops = frozenset(part.strip().lower() for part in text.split(",") if part.strip())
    if not ops or not ops <= OPS:
        raise argparse.ArgumentTypeError(f"{text!r}: use publish, subscribe or publish,subscribe")
    return ops


# -- plumbing -----------------------------------------------------------------


def _resolve_db(args: argparse.Namespace) -> str:
    if args.db:
        return str(args.db)
    if args.config:
        try:
            from gateway.config import load_config
        except ImportError as exc:
            raise _UsageError(f"cannot read --config here ({exc}); pass --db FILE instead") from exc
        config = load_config(args.config)
        return config.auth.local.db
    return LocalConfig().db


def _run(args: argparse.Namespace, work: Callable[[LocalStore], None]) -> int:
    try:
        db = _resolve_db(args)
        with LocalStore(db) as store:
            work(store)
    except ConfigError as exc:
        print(f"polygate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _UsageError as exc:
        print(f"polygate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"polygate: {exc}", file=sys.stderr)
        return EXIT_STORE
    except OSError as exc:  # e.g. --config names a file that cannot be read
        print(f"polygate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _read_stdin_line() -> bytes:
    stream = getattr(sys.stdin, "buffer", None)
    line: bytes
    if stream is not None:
        line = stream.readline()
    else:  # a replaced text stdin (tests, embedding)
        line = sys.stdin.readline().encode("utf-8", "surrogateescape")
    return line.rstrip(b"\r\n")


def _read_password(args: argparse.Namespace, *, confirm: bool) -> Secret:
    if args.password_stdin:
        secret = Secret(_read_stdin_line())
    else:
        try:
            first = getpass.getpass("Password: ")
            if confirm and getpass.getpass("Password (again): ") != first:
                raise _UsageError("the passwords do not match; nothing was changed")
        except EOFError as exc:
            raise _UsageError("no password given; nothing was changed") from exc
        secret = Secret(first)
    if not secret:
        raise _UsageError("a password must not be empty; nothing was changed")
    return secret


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(headers)).rstrip()]
    lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    return "\n".join(lines)


# -- handlers -----------------------------------------------------------------


def _users_add(args: argparse.Namespace) -> int:
    def work(store: LocalStore) -> None:
        # Refuse a bad or taken name before asking for a password.
        check_new_username(args.username)
        if store.get_user(args.username) is not None:
            raise StoreError(f"user {args.username!r} already exists; use `users passwd` to change its password")
        if args.no_password and not args.cert_identity:
            raise _UsageError("--no-password needs --cert-identity: such a user could never log in")
        password = None if args.no_password else _read_password(args, confirm=True)
        store.add_user(args.username, password, superuser=args.superuser, cert_identity=args.cert_identity)
        kind = "superuser" if args.superuser else "user"
        how = f" (certificate identity {args.cert_identity!r})" if args.cert_identity else ""
        print(f"created {kind} {args.username!r}{how} in {store.path}")

    return _run(args, work)


def _users_passwd(args: argparse.Namespace) -> int:
    def work(store: LocalStore) -> None:
        if store.get_user(args.username) is None:
            raise StoreError(f"no user {args.username!r}")
        store.set_password(args.username, _read_password(args, confirm=True))
        print(f"changed the password of {args.username!r}")

    return _run(args, work)


def _users_cert_identity(args: argparse.Namespace) -> int:
    def work(store: LocalStore) -> None:
        if args.clear == bool(args.value):
            raise _UsageError("give either VALUE or --clear")
        store.set_cert_identity(args.username, None if args.clear else args.value)
        if args.clear:
            print(f"cleared the certificate identity of {args.username!r}")
        else:
            print(f"{args.username!r} now logs in with a certificate of identity {args.value!r}")

    return _run(args, work)


def _users_delete(args: argparse.Namespace) -> int:
    def work(store: LocalStore) -> None:
        store.delete_user(args.username)
        print(f"deleted user {args.username!r} and its ACL entries")

    return _run(args, work)


def _users_list(args: argparse.Namespace) -> int:
    def work(store: LocalStore) -> None:
        users = store.list_users()
        if not users:
            print(f"no users in {store.path}")
            return
        rows: list[tuple[str, ...]] = [(u.username, "yes" if u.superuser else "no", u.created_at) for u in users]
        headers: tuple[str, ...] = ("USER", "SUPERUSER", "CREATED")
        if any(u.cert_identity for u in users):
            # Only then: scripts reading the three columns keep working.
            rows = [(*row, u.cert_identity or "-") for row, u in zip(rows, users)]
            headers += ("CERT_IDENTITY",)
        print(_table(headers, rows))

    return _run(args, work)


def _acl_grant(args: argparse.Namespace) -> int:
    def work(store: LocalStore) -> None:
        entry = store.grant(args.username, args.pattern, args.ops, deny=args.deny)
        effect = "deny" if entry.deny else "allow"
        print(f"{entry.username}: {effect} {','.join(sorted(entry.ops))} on {entry.pattern!r}")

    return _run(args, work)


def _acl_revoke(args: argparse.Namespace) -> int:
    def work(store: LocalStore) -> None:
        removed = store.revoke(args.username, args.pattern)
        noun = "entry" if removed == 1 else "entries"
        print(f"removed {removed} ACL {noun} of {args.username!r} on {args.pattern!r}")

    return _run(args, work)


def _acl_list(args: argparse.Namespace) -> int:
    def work(store: LocalStore) -> None:
        entries = store.list_acl(args.username)
        if not entries:
            print("no ACL entries" + (f" for {args.username!r}" if args.username else ""))
            return
        rows = [
            (e.username, e.pattern, "deny" if e.deny else "allow", ",".join(sorted(e.ops)))
            for e in entries
        ]
        print(_table(("USER", "PATTERN", "EFFECT", "OPS"), rows))

    return _run(args, work)


def _hash_password(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        try:
            secret = Secret(getpass.getpass("Password: "))
        except EOFError:
            secret = Secret(b"")
    else:
        secret = Secret(_read_stdin_line())
    if not secret:
        print("polygate: no password on stdin", file=sys.stderr)
        return EXIT_USAGE
    print(hash_password(secret))
    return EXIT_OK
