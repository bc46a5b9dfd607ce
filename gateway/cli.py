"""The `polygate` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from gateway import __version__
from gateway.errors import ConfigError, PolygateError

log = logging.getLogger("polygate")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.config import default_config, load_config
    from gateway.logging_setup import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        config = load_config(args.config) if args.config else default_config()
    except ConfigError as exc:
        _print_problems(args.config or "<defaults>", exc.problems)
        return EXIT_CONFIG
    from gateway.frontends.peers import warn_plaintext_passwords

    warn_plaintext_passwords(config)
    try:
        return _run_loop(config)
    except ConfigError as exc:  # POLYGATE_EVENT_LOOP, checked as the loop is chosen
        _print_problems("environment", exc.problems)
        return EXIT_CONFIG
    except PolygateError as exc:
        log.error("%s", exc)
        return EXIT_ERROR


def _install_uvloop(environ: Mapping[str, str] | None = None) -> str:
    """Choose the event loop from POLYGATE_EVENT_LOOP; return "uvloop" or "asyncio".

    `auto` (the default) takes uvloop when it is installed (`polygate[fast]`),
    `asyncio` always the standard loop, `uvloop` insists on uvloop.
    """
    choice = (os.environ if environ is None else environ).get("POLYGATE_EVENT_LOOP", "").strip().lower() or "auto"
    if choice not in ("auto", "asyncio", "uvloop"):
        raise ConfigError([f"POLYGATE_EVENT_LOOP: {choice!r} is not one of auto, asyncio, uvloop"])
    if choice == "asyncio":
        asyncio.set_event_loop_policy(None)
        log.info("event loop: asyncio (POLYGATE_EVENT_LOOP=asyncio)", extra={"event": "event_loop", "loop": "asyncio"})
        return "asyncio"
    try:
        import uvloop  # optional extra: polygate[fast]
    except ImportError:
        if choice == "uvloop":
            raise ConfigError([
                "POLYGATE_EVENT_LOOP: uvloop is not installed (pip install 'polygate[fast]'),"
                " or set POLYGATE_EVENT_LOOP to auto or asyncio"
            ]) from None
        log.info("event loop: asyncio (uvloop is not installed)", extra={"event": "event_loop", "loop": "asyncio"})
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    log.info("event loop: uvloop", extra={"event": "event_loop", "loop": "uvloop"})
    return "uvloop"


def _run_loop(config: object) -> int:
    from gateway.server import Gateway

    async def main() -> int:
        gateway = Gateway(config)  # type: ignore[arg-type]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await gateway.start()
        log.info("polygate %s ready", __version__, extra={"event": "ready"})
        await stop.wait()
        log.info("shutting down", extra={"event": "shutdown"})
        await gateway.stop()
        return EXIT_OK

    _install_uvloop()
    return asyncio.run(main())


def _print_problems(source: str, problems: Sequence[str]) -> None:
    print(f"{source}: {len(problems)} error(s)", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.config import load_config

    try:
        load_config(args.file)
    except ConfigError as exc:
        _print_problems(args.file, exc.problems)
        return EXIT_CONFIG
    print(f"{args.file}: ok")
    return EXIT_OK


def _cmd_gen_cert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.certs import DEFAULT_HOSTS, generate

    try:
        written = generate(Path(args.out), args.host or DEFAULT_HOSTS, args.client)
    except (OSError, ValueError) as exc:
        print(f"polygate gen-cert: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for path in written:
        print(path)
    return EXIT_OK


def _register_gen_cert(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gen = sub.add_parser("gen-cert", help="make a development CA, a server certificate and client certificates")
    gen.add_argument("--out", required=True, help="directory for the PEM files (an existing ca.pem/ca-key.pem is reused)")
    gen.add_argument("--host", action="append", default=[], help="server name or IP address (repeat; default localhost, 127.0.0.1)")
    gen.add_argument("--client", action="append", default=[], help="client certificate with CN=NAME (repeat)")
    gen.set_defaults(handler=_cmd_gen_cert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polygate", description="Multi-protocol message gateway")
    parser.add_argument("--version", action="version", version=f"polygate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="start every listener in the config")
    run.add_argument("--config", help="YAML config file (default: built-in defaults)")
    run.add_argument("--log-format", choices=("text", "json"), default="text")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    run.set_defaults(handler=_cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and list every error")
    check.add_argument("file")
    check.set_defaults(handler=_cmd_check_config)
    _register_gen_cert(sub)

    from gateway.cli_store import register

    register(sub)
    from gateway.cli_auth_server import register as register_auth_server

    register_auth_server(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
