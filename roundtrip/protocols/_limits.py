"""Per-client abuse limits shared by every protocol: connection caps and login penalties.

Pure bookkeeping with the caller's clock (docs/design.md, layers); the SMTP listener and the
POP3/IMAP adapter both use it, and one ``AuthPenalties`` may be shared by all of a stack's
listeners, so a client guessing passwords is slowed on every port at once.
"""

from __future__ import annotations

__all__ = ["AuthPenalties", "ConnectionCounts", "auth_penalty"]

#: Refusal texts of ``ConnectionCounts.admit`` (SMTP sends them as they are; other protocols
#: put the part after the status into their own reply).
TOO_MANY_CONNECTIONS = "421 4.7.0 Error: too many connections"
TOO_MANY_CONNECTIONS_FROM = "421 4.7.0 Error: too many connections from {ip}"


def auth_penalty(failures: int, *, initial: float, maximum: float) -> float:
    """Seconds to wait before answering AUTH after ``failures`` recent failures.

    0 for none, then ``initial`` doubling up to ``maximum`` (Dovecot ``auth_penalty``:
    2 s doubling to 15 s).
    """
    if failures <= 0 or initial <= 0:
        return 0.0
    return float(min(maximum, initial * 2 ** min(failures - 1, 32)))


class AuthPenalties:
    """Failed AUTH attempts per client IP, and the delay they earn.

    A success from the IP clears its record, and so does ``timeout`` seconds without a new
    failure; there is no lockout, only a delay. Times are whatever clock the caller uses.
    """

    #: Above this many tracked IPs, expired records are pruned (memory stays bounded).
    MAX_TRACKED = 4096

    def __init__(self, *, initial: float, maximum: float, timeout: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.timeout = timeout
        self._failures: dict[str, tuple[int, float]] = {}

    def delay(self, ip: str, now: float) -> float:
        """Seconds the next AUTH from ``ip`` waits before it is answered."""
        entry = self._failures.get(ip)
        if entry is None:
            return 0.0
        count, last = entry
        if now - last > self.timeout:
            del self._failures[ip]
            return 0.0
        return auth_penalty(count, initial=self.initial, maximum=self.maximum)

    def failed(self, ip: str, now: float) -> None:
        count, last = self._failures.get(ip, (0, now))
        if now - last > self.timeout:
            count = 0
        self._failures[ip] = (count + 1, now)
        if len(self._failures) > self.MAX_TRACKED:
            self._prune(now)

    def succeeded(self, ip: str) -> None:
        self._failures.pop(ip, None)

    def _prune(self, now: float) -> None:
        fresh = {ip: e for ip, e in self._failures.items() if now - e[1] <= self.timeout}
        if len(fresh) > self.MAX_TRACKED:  # still too many: keep the most recent half
            keep = sorted(fresh.items(), key=lambda item: item[1][1])[-self.MAX_TRACKED // 2 :]
            fresh = dict(keep)
        self._failures = fresh


class ConnectionCounts:
    """Open connections of one listener, in total and per client IP.

    ``admit`` either counts a new connection or returns the reply to refuse it with
    (Postfix ``smtpd_client_connection_count_limit``); 0 turns a cap off.
    """

    def __init__(self, *, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> str | None:
        """Count a new connection from ``ip``, or return the 421 to refuse it with."""
        if self.max_per_ip and self._per_ip.get(ip, 0) >= self.max_per_ip:
            return TOO_MANY_CONNECTIONS_FROM.format(ip=ip)
        if self.max_total and self.total >= self.max_total:
            return TOO_MANY_CONNECTIONS
        self.total += 1
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        """Forget a connection that ``admit`` counted."""
        self.total = max(0, self.total - 1)
        left = self._per_ip.get(ip, 0) - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)
