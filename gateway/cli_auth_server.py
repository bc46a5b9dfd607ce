"""`polygate auth-server`: run the reference external auth service until SIGINT/SIGTERM.

Exit codes: 0 stopped by a signal, 1 it could not listen, 2 a bad users file or address.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from gateway.errors import ConfigError, PolygateError

log = logging.getLogger("polygate.auth_server")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

DEFAULT_LISTEN = "127.0.0.1:7016"
# Spelled out rather than imported so that `polygate --help` does not load grpc;
# start_auth_server checks them again.
_TRANSPORTS = ("grpc", "http")
_GRPC_PACKAGES = ("broker.auth.v1", "fluxmq.auth.v1")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `auth-server` to the subcommands of the `polygate` parser."""
    parser = subparsers.add_parser(
        "auth-server",
        help="run the reference external auth service (gRPC or HTTP callout) from a users YAML file",
        description=(
            "Answer the gateway's auth callouts from a YAML file of users "
            "(see configs/auth-users.example.yaml). Over gRPC it serves AuthService "
            "of both broker.auth.v1 and fluxmq.auth.v1; over HTTP POST /auth/authenticate "
            "and POST /auth/authorize."
        ),
    )
    parser.add_argument("--users", required=True, metavar="FILE", help="the users YAML file")
    parser.add_argument(
        "--listen", default=DEFAULT_LISTEN, metavar="ADDR", help=f"host:port to listen on (default {DEFAULT_LISTEN})"
    )
    parser.add_argument("--transport", choices=_TRANSPORTS, default="grpc", help="callout transport (default grpc)")
    parser.add_argument(
        "--deny-with-status",
        action="store_true",
        help="refuse with a status (gRPC UNAUTHENTICATED/PERMISSION_DENIED, HTTP 401/403) "
        "instead of authenticated/authorized false, as Magistrala's bridge does",
    )
    parser.add_argument(
        "--grpc-package",
        action="append",
        choices=_GRPC_PACKAGES,
        dest="grpc_packages",
        help="serve only this callout package (repeatable; default both)",
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    parser.set_defaults(handler=_cmd_auth_server)


def _cmd_auth_server(args: argparse.Namespace) -> int:
    from gateway.auth_server import load_users
    from gateway.config import parse_addr
    from gateway.logging_setup import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        host, port = parse_addr(args.listen)
    except ValueError as exc:
        print(f"--listen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        users = load_users(args.users)
    except ConfigError as exc:
        print(f"{args.users}: {len(exc.problems)} error(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not users.users:
        log.warning("%s lists no users: every request will be refused", args.users)
    packages = tuple(dict.fromkeys(args.grpc_packages or _GRPC_PACKAGES))

    async def serve() -> int:
        from gateway.auth_server import start_auth_server

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server = await start_auth_server(
            users,
            host=host,
            port=port,
            transport=args.transport,
            deny_with_status=args.deny_with_status,
            grpc_packages=packages,
        )
        served = f" ({', '.join(packages)})" if args.transport == "grpc" else ""
        shown_host = server.host or "*"
        log.info(
            "auth server listening on %s://%s:%d%s with %d user(s)",
            args.transport,
            f"[{shown_host}]" if ":" in shown_host else shown_host,
            server.port,
            served,
            len(users.users),
            extra={"event": "listening", "port": server.port},
        )
        try:
            await stop.wait()
        finally:
            log.info("auth server shutting down", extra={"event": "shutdown"})
            await server.stop()
        return EXIT_OK

    try:
        return asyncio.run(serve())
    except PolygateError as exc:
        log.error("%s", exc)
        return EXIT_ERROR
