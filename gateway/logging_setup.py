"""Structured logs on stderr: `--log-format json|text`.

JSON lines carry the `extra={...}` fields that code attaches (event, client_id,
outcome...). Secrets never reach a log record: they travel in `Secret`. Libraries
do not know that rule (proton logs the raw bytes it could not parse, aiohttp
puts header lines into its tracebacks), so every handler also carries
`RedactingFilter`, a last line of defence that masks the shapes a secret takes
in text: Authorization header values, `password=`-like fields, URL userinfo and
SASL PLAIN `\\x00user\\x00password` blobs.

Failed logins are where a password most often lands in the username field, so
code logs `username_tag(name)` for them: a short keyed hash that lets an
operator tell attempts apart and count them without the name being readable.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import sys
import threading
import time
from typing import TextIO

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

REDACTED = "[redacted]"

#: Made at start and never stored: a tag links attempts within one process only.
_TAG_KEY = secrets.token_bytes(32)

# A NUL as it appears in a message: raw, in a Python bytes/str repr, or in JSON.
# (A repr of a repr doubles the backslashes: proton's conditions arrive that way.)
_NUL = r"(?:\x00|\\+(?:x00|u0000|0(?![0-7])))"
_SECRET_SHAPES = re.compile(
    # Authorization / Proxy-Authorization header values, as a header line or a dict/multidict repr.
    r"(?P<auth>(?i:\b(?:proxy-)?authorization)['\"]?\s*[:=]\s*['\"]?)"
    r"(?:(?i:basic|bearer|client|digest|token|negotiate)\s+)?(?!\[redacted\])[^\s'\",;)}\]]+"
    # key=value and "key": "value" forms of password-like fields.
    r"|(?P<field>(?i:\b[\w-]*(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token))['\"]?\s*[:=]\s*['\"]?)"
    r"(?!\[redacted\])[^\s'\",;&)}\]]+"
    # scheme://user:password@host
    r"|(?P<url>[a-zA-Z][\w+.-]*://[^\s:/@'\"]*:)(?!\[redacted\])[^\s/@'\"]+(?=@)"
    # SASL PLAIN: authzid NUL authcid NUL password (also the tail of any binary repr holding two NULs).
    rf"|(?P<plain>{_NUL}[^\x00'\"\s\\]*{_NUL})(?!{_NUL}|\[redacted\])[^'\"\s]+"
)


def _mask(match: re.Match[str]) -> str:
    for group in ("auth", "field", "url", "plain"):
        prefix = match.group(group)
        if prefix is not None:
            return prefix + REDACTED
    return REDACTED  # pragma: no cover - every alternative has a named prefix


def redact(text: str) -> str:
    """`text` with every known secret shape masked."""
    return _SECRET_SHAPES.sub(_mask, text)


def username_tag(username: str) -> str:
    """What a log may say about a username that did not authenticate: `user#` and 8 hex of a keyed hash."""
    if not username:
        return ""
    digest = hmac.new(_TAG_KEY, username.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
    return f"user#{digest[:8]}"


class RedactingFilter(logging.Filter):
    """Masks secret shapes in a record's message, traceback and string extras (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # A broken format string: keep what can be shown, without the arguments.
            message, record.args = str(record.msg), ()
        masked = redact(message)
        if masked != message or record.args:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if isinstance(value, str) and key not in _STANDARD and not key.startswith("_"):
                record.__dict__[key] = redact(value)
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info or record.exc_text:
            # exc_text is the traceback RedactingFilter already masked.
            entry["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def make_handler(fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """The handler `setup_logging` installs (tests add one to read what an operator would)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactingFilter())
    return handler


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    root = logging.getLogger()
    root.handlers[:] = [make_handler(fmt)]
    root.setLevel(level.upper())
    # aiohttp's access log is one line per request: useful at debug only.
    logging.getLogger("aiohttp.access").setLevel(max(logging.WARNING, root.level))


class LogThrottle:
    """First occurrence logged at once, then at most one line per `interval` with the count in between.

    For events anyone on the network can cause (bad requests, refused
    connections): counted always, logged rarely, so they cannot flood the log.
    """

    __slots__ = ("interval", "_lock", "_next", "_suppressed")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def admit(self) -> int | None:
        """None: stay quiet. Otherwise log now; the value is how many were kept quiet since the last line."""
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return None
            self._next = now + self.interval
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed
