"""The failed-login limiter: a source IP or a username that failed too often is refused at once for a while.

As Iggy and Rivven do: after `per_ip` failed logins from one source IP (or
`per_username` for one username, from any IP) within `window`, further
attempts from that IP (for that username) are denied for `lockout` without
being checked, so a password-guessing flood costs no Argon2 work and no call
to an auth service. Only a provider's denial counts as a failure; "unavailable"
says nothing about the credentials. A successful login clears its username's
count, never its IP's (one valid account must not reset a guesser's budget).

A username lock refuses that user from every IP: a guesser can lock a user out
for `lockout`. That is why `per_username` defaults higher than `per_ip`.

Usernames are kept as a keyed hash only (a password typed into the username
field must not sit in memory as text), and both tables are bounded: the
oldest entries go first, so a spray of random names cannot grow them.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.config_types import FailedLoginsConfig

log = logging.getLogger("polygate.auth.limiter")

#: Entries kept per table (IPs, usernames); beyond it the oldest is dropped.
MAX_TRACKED = 100_000
#: At most one log line per this many seconds, with the counts since the last one.
LOG_INTERVAL = 10.0

LOCKED_REASON = "too many failed logins: try again later"


def source_ip(peer: str) -> str:
    """The address part of an "ip:port" / "[v6]:port" peer: one source whatever its ports."""
    host, sep, _ = peer.rpartition(":")
    return host.strip("[]") if sep else peer


class _Table:
    """key -> [window start, failures, locked until]."""

    __slots__ = ("threshold", "_entries")

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._entries: dict[object, list[float]] = {}

    def locked(self, key: object, now: float) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry[2] > now

    def fail(self, key: object, now: float, window: float, lockout: float) -> bool:
        """Count a failure; True when it locks the key."""
        entries = self._entries
        entry = entries.get(key)
        if entry is None or now - entry[0] >= window:
            if entry is None and len(entries) >= MAX_TRACKED:
                del entries[next(iter(entries))]
            entry = entries[key] = [now, 0.0, entry[2] if entry is not None else 0.0]
        entry[1] += 1
        if entry[1] < self.threshold:
            return False
        entry[0], entry[1], entry[2] = now, 0.0, now + lockout
        return True

    def clear(self, key: object) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry[1] = 0.0

    def locked_now(self, now: float) -> int:
        return sum(1 for entry in self._entries.values() if entry[2] > now)


class FailedLoginLimiter:
    def __init__(self, config: FailedLoginsConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._ips = _Table(config.per_ip)
        self._users = _Table(config.per_username)
        self._key = secrets.token_bytes(16)
        #: Locks started and attempts refused, by scope ("ip", "username").
        self.lockouts = {"ip": 0, "username": 0}
        self.refused = {"ip": 0, "username": 0}
        self._logged_at = -LOG_INTERVAL
        self._unlogged = {"lockouts": 0, "refused": 0}

    @property
    def enabled(self) -> bool:
        return self.config.per_ip > 0 or self.config.per_username > 0

    def _user_key(self, username: str) -> bytes:
        return hashlib.blake2b(username.encode("utf-8", "surrogateescape"), key=self._key, digest_size=16).digest()

    def refuse(self, source_ip: str, username: str) -> bool:
        """True when this attempt must be denied without being checked."""
        now = self._clock()
        scope = ""
        if self.config.per_ip > 0 and source_ip and self._ips.locked(source_ip, now):
            scope = "ip"
        elif self.config.per_username > 0 and username and self._users.locked(self._user_key(username), now):
            scope = "username"
        if not scope:
            return False
        self.refused[scope] += 1
        self._unlogged["refused"] += 1
        self._maybe_log(now)
        return True

    def failed(self, source_ip: str, username: str) -> None:
        """A provider denied these credentials."""
        now = self._clock()
        config = self.config
        if config.per_ip > 0 and source_ip and self._ips.fail(source_ip, now, config.window, config.lockout):
            self.lockouts["ip"] += 1
            self._unlogged["lockouts"] += 1
        if config.per_username > 0 and username:
            if self._users.fail(self._user_key(username), now, config.window, config.lockout):
                self.lockouts["username"] += 1
                self._unlogged["lockouts"] += 1
        self._maybe_log(now)

    def succeeded(self, username: str) -> None:
        if self.config.per_username > 0 and username:
            self._users.clear(self._user_key(username))

    def _maybe_log(self, now: float) -> None:
        if not (self._unlogged["lockouts"] or self._unlogged["refused"]) or now - self._logged_at < LOG_INTERVAL:
            return
        self._logged_at = now
        # Counts only: neither the IPs (the metrics have the totals) nor the usernames (could be a typed password).
        log.warning(
            "failed-login limiter: %d lockouts started and %d attempts refused in the last %gs; "
            "locked now: %d source IPs, %d usernames",
            self._unlogged["lockouts"], self._unlogged["refused"], LOG_INTERVAL,
            self._ips.locked_now(now), self._users.locked_now(now),
            extra={"event": "failed_login_lockout", **self._unlogged},
        )
        self._unlogged = {"lockouts": 0, "refused": 0}

    def collect(self) -> Iterable[Metric]:
        now = self._clock()
        lockouts = CounterMetricFamily(
            "polygate_auth_lockouts", "Source IPs and usernames locked out after repeated failed logins",
            labels=["scope"],
        )
        refused = CounterMetricFamily(
            "polygate_auth_lockout_refused", "Logins denied unchecked because their IP or username was locked out",
            labels=["scope"],
        )
        locked = GaugeMetricFamily("polygate_auth_locked_out", "Source IPs and usernames locked out now",
                                   labels=["scope"])
        for scope, table in (("ip", self._ips), ("username", self._users)):
            lockouts.add_metric([scope], self.lockouts[scope])
            refused.add_metric([scope], self.refused[scope])
            locked.add_metric([scope], table.locked_now(now))
        return [lockouts, refused, locked]
