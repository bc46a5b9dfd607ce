"""The last-resort redaction of log records, and the tag a refused username is logged as."""

from __future__ import annotations

import base64
import io
import json
import logging

from hypothesis import given
from hypothesis import strategies as st

from gateway.logging_setup import REDACTED, make_handler, redact, username_tag

# What a password may be made of where its shape is recognisable (no blanks or quotes inside a token).
_secrets = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc"), blacklist_characters="'\"\\,;&)}]@/:="),
    min_size=4, max_size=40,
)


@given(secret=_secrets, user=st.text(alphabet="abcdefgh", min_size=1, max_size=8))
def test_every_known_shape_is_masked(secret: str, user: str) -> None:
    secret = "\u00a7" + secret  # a character no template or mask holds, so a match is the secret
    basic = base64.b64encode(f"{user}:{secret}".encode()).decode()
    plain = f"\x00{user}\x00{secret}".encode()
    for text in (
        f"b'Authorization: Basic {basic}\\r\\n'",
        f"<CIMultiDictProxy('Authorization': 'Bearer {secret}')>",
        f"password={secret} next",
        json.dumps({"password": secret}),
        f"amqp://{user}:{secret}@broker/",
        repr(plain),
        repr(repr(plain)),
        json.dumps(plain.decode()),
    ):
        masked = redact(text)
        # (The NUL escapes themselves stay: a secret like "0000" would be found in them.)
        shown = masked.replace("\\u0000", "").replace("\\x00", "")
        assert secret not in shown and basic not in shown, (text, masked)
        assert REDACTED in masked
        assert redact(masked) == masked  # every handler masks the same record: no second pass may change it


def test_ordinary_lines_are_left_alone() -> None:
    for text in ("allow mqtt connect client='c1' user='bob' topic='a/b' reason=''",
                 "listening on 127.0.0.1:1883 (server.tcp.plain)",
                 "closing MQTT connection from 127.0.0.1:5: expected CONNECT, got Publish"):
        assert redact(text) == text


def test_records_of_any_logger_are_masked_in_both_formats() -> None:
    streams = {fmt: io.StringIO() for fmt in ("text", "json")}
    logger = logging.getLogger("some.library")
    handlers = [make_handler(fmt, stream) for fmt, stream in streams.items()]
    for handler in handlers:
        logger.addHandler(handler)
    try:
        try:
            raise ValueError("header line b'Authorization: Basic c2VjcmV0'")
        except ValueError:
            logger.error("Unknown protocol detected: %r", b"\x00\x00SA\x00alice\x00hunter22", exc_info=True,
                         extra={"header": "password=hunter22"})
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
    for stream in streams.values():
        out = stream.getvalue()
        assert "hunter22" not in out and "c2VjcmV0" not in out and "Traceback" in out
    assert json.loads(streams["json"].getvalue())["header"] == f"password={REDACTED}"


def test_a_username_tag_is_stable_short_and_not_the_name() -> None:
    tag = username_tag("correct horse battery staple")
    assert tag == username_tag("correct horse battery staple") != username_tag("correct horse")
    assert tag.startswith("user#") and len(tag) == 13 and "horse" not in tag
    assert username_tag("") == ""
