"""``roundtrip exporter``: round-trip probes scheduled by Prometheus, as blackbox_exporter does.

Theory of operation. The configuration file (TOML) names the targets; each is an SMTP
submission URL, one IMAP or POP3 URL to find the message with, a CA file, a timeout and where
the passwords come from (an environment variable or a file, never a URL). It is read once at
start-up, and every mistake in it is a ``ConfigError`` naming the file and line, so the
exporter never starts half-configured.

An HTTP server (the standard library's ``ThreadingHTTPServer``: one thread per request, no
event loop, because the probe's clients block) then answers:

* ``GET /probe?target=NAME``: one round trip now (``probes.roundtrip.run_probe``, the code
  ``roundtrip probe`` runs), returned as metrics built in a registry of their own for that
  scrape: ``probe_success``, ``probe_duration_seconds``, per-step durations, time to
  visible, TLS versions and certificate expiry, findings by code and severity.
* ``GET /metrics``: the exporter's own counters and histograms (scrapes, failures, probe
  durations per target) and its process metrics.

Time. Prometheus says how long it will wait in the ``X-Prometheus-Scrape-Timeout-Seconds``
header; the probe gets that minus ``SCRAPE_TIMEOUT_MARGIN`` (or the target's ``timeout`` if
shorter), and runs in a worker thread that the scrape stops waiting for when the time is up.
A target that hangs thus gives ``probe_success 0`` in time, never a failed scrape.

Concurrency. One probe per target is in flight at a time (two probes of one mailbox would see
each other's messages and double the load on it). A scrape that finds one running waits for
it within its own time budget, then answers ``probe_in_progress 1`` and ``probe_success 0``.

Secrets. Passwords live only in the ``Endpoint`` objects handed to the probe; labels carry
target names, step names, servers (host:port), finding codes; log lines are scrubbed of every
configured password before they are written.
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import logging
import os
import re
import signal
import ssl
import sys
import threading
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from .config import Endpoint, parse_endpoint
from .errors import ConfigError, ServerStartError
from .probes.roundtrip import ProbeResult, run_probe

__all__ = [
    "DEFAULT_LISTEN",
    "Exporter",
    "Target",
    "load_config",
    "parse_listen",
    "probe_metrics",
    "run",
]

#: Where the exporter listens unless ``--listen`` says otherwise (loopback only: a probe
#: endpoint open to the network lets anyone make it send mail).
DEFAULT_LISTEN = "127.0.0.1:9465"
#: Seconds kept back from Prometheus' scrape timeout to write the answer (blackbox_exporter
#: keeps 0.5 s too).
SCRAPE_TIMEOUT_MARGIN = 0.5
#: The scrape timeout assumed when the header is absent (a person with curl).
DEFAULT_SCRAPE_TIMEOUT = 30.0
#: Buckets of the exporter's own probe duration histogram (seconds).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Every key a ``[targets.NAME]`` table may hold.
TARGET_KEYS = (
    "smtp",
    "imap",
    "pop3",
    "cafile",
    "timeout",
    "mail_from",
    "rcpt_to",
    "check_legacy_tls",
    "password_env",
    "password_file",
    "smtp_password_env",
    "smtp_password_file",
    "imap_password_env",
    "imap_password_file",
    "pop3_password_env",
    "pop3_password_file",
)
_TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")

log = logging.getLogger("roundtrip.exporter")


@dataclass(frozen=True)
class Target:
    """One configured probe target (the ``[targets.NAME]`` table, checked and resolved)."""

    name: str
    smtp: Endpoint
    reader: Endpoint
    mail_from: str
    rcpt_to: str
    context: ssl.SSLContext = field(repr=False)
    timeout: float = 30.0
    check_legacy_tls: bool = True

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(p for p in (self.smtp.password, self.reader.password) if p)


# -- configuration ---------------------------------------------------------------------------


def _unquote_key(key: str) -> str:
    key = key.strip()
    if len(key) >= 2 and key[0] == key[-1] and key[0] in "\"'":
        return key[1:-1]
    return key


def _split_dotted(text: str) -> list[str]:
    """``targets."a.b".smtp`` -> ``["targets", "a.b", "smtp"]`` (quotes respected)."""
    parts = re.findall(r'"[^"]*"|\'[^\']*\'|[^.\s]+', text)
    return [_unquote_key(p) for p in parts]


def _line_of(text: str, table: list[str], key: str | None = None) -> int:
    """The 1-based line of ``key`` in the table ``table`` (or of the table's header), found by
    scanning the file text: tomllib gives positions for syntax errors only. 0 if not found."""
    wanted = list(table)
    current: list[str] = []
    header_line = 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            current = _split_dotted(stripped.strip("[]").split("#")[0])
            if current == wanted:
                header_line = number
            elif key is not None and current[: len(wanted) + 1] == [*wanted, key]:
                return number  # the key names a table: [targets.x] or [other]
            continue
        if key is None:
            continue
        left, eq, _ = stripped.partition("=")
        if not eq:
            continue
        path = current + _split_dotted(left)
        if path == [*wanted, key]:
            return number
    return header_line


class _Source:
    """The configuration file's name and text, to name lines in errors."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text

    def error(self, table: list[str], key: str | None, message: str) -> ConfigError:
        line = _line_of(self.text, table, key)
        where = f"{self.path}:{line}" if line else self.path
        return ConfigError(f"{where}: {message}")


def _password(
    source: _Source,
    table: list[str],
    spec: Mapping[str, Any],
    protocol: str,
    env: Mapping[str, str],
) -> str:
    """The password for ``protocol`` from ``<protocol>_password_env``/``_file``, else from
    ``password_env``/``password_file``; empty if none is configured."""
    for prefix in (f"{protocol}_", ""):
        env_key, file_key = f"{prefix}password_env", f"{prefix}password_file"
        if env_key in spec and file_key in spec:
            raise source.error(table, file_key, f"give {env_key} or {file_key}, not both")
        if env_key in spec:
            variable = spec[env_key]
            if not isinstance(variable, str) or not variable:
                raise source.error(table, env_key, f"{env_key} must be a variable name")
            if not env.get(variable):
                raise source.error(
                    table, env_key, f"{env_key}: the environment variable {variable} is not set"
                )
            return env[variable]
        if file_key in spec:
            path = spec[file_key]
            if not isinstance(path, str) or not path:
                raise source.error(table, file_key, f"{file_key} must be a file name")
            base = os.path.dirname(os.path.abspath(source.path))
            try:
                with open(os.path.join(base, path), encoding="utf-8") as fh:
                    secret = fh.read().rstrip("\r\n")
            except OSError as exc:
                raise source.error(
                    table, file_key, f"{file_key} {path}: cannot read: {exc.strerror}"
                ) from None
            if not secret:
                raise source.error(table, file_key, f"{file_key} {path}: the file is empty")
            return secret
    return ""


def _endpoint(
    source: _Source,
    table: list[str],
    spec: Mapping[str, Any],
    protocol: str,
    env: Mapping[str, str],
) -> Endpoint:
    url = spec[protocol]
    if not isinstance(url, str):
        raise source.error(table, protocol, f"{protocol} must be a URL string")
    try:
        has_password = urlsplit(url.strip()).password is not None
    except ValueError:
        has_password = False
    if has_password:
        # Checked before anything echoes the URL back in a message.
        raise source.error(
            table,
            protocol,
            f"{protocol}: put no password in the URL; use {protocol}_password_env, "
            f"{protocol}_password_file, password_env or password_file",
        )
    try:
        endpoint = parse_endpoint(url, expect=protocol, password="")
    except ConfigError as exc:
        raise source.error(table, protocol, f"{protocol}: {exc}") from None
    secret = _password(source, table, spec, protocol, env)
    if endpoint.user and not secret:
        raise source.error(
            table,
            protocol,
            f"{protocol}: user {endpoint.user!r} needs a password: set password_env or "
            f"password_file (or {protocol}_password_env / {protocol}_password_file)",
        )
    return parse_endpoint(url, expect=protocol, password=secret)


def _target(
    source: _Source, name: str, spec: Any, env: Mapping[str, str], default_timeout: float
) -> Target:
    table = ["targets", name]
    if not isinstance(spec, dict):
        raise source.error(["targets"], name, f"targets.{name} must be a table")
    if not _TARGET_NAME.match(name):
        raise source.error(
            table, None, f"target name {name!r}: use letters, digits, '.', '_', ':' and '-'"
        )
    for key in spec:
        if key not in TARGET_KEYS:
            raise source.error(
                table,
                key,
                f"targets.{name}: unknown key {key!r}; valid keys: {', '.join(TARGET_KEYS)}",
            )
    if "smtp" not in spec:
        raise source.error(table, None, f"targets.{name}: smtp = URL is missing")
    readers = [p for p in ("imap", "pop3") if p in spec]
    if len(readers) != 1:
        raise source.error(
            table,
            readers[1] if readers else None,
            f"targets.{name}: give exactly one of imap = URL or pop3 = URL "
            "(one target per path; define two targets to probe both)",
        )
    smtp = _endpoint(source, table, spec, "smtp", env)
    reader = _endpoint(source, table, spec, readers[0], env)
    timeout = spec.get("timeout", default_timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise source.error(table, "timeout", "timeout must be a number of seconds above 0")
    legacy = spec.get("check_legacy_tls", True)
    if not isinstance(legacy, bool):
        raise source.error(table, "check_legacy_tls", "check_legacy_tls must be true or false")
    cafile = spec.get("cafile")
    try:
        if cafile is None:
            context = ssl.create_default_context()
        elif not isinstance(cafile, str):
            raise source.error(table, "cafile", "cafile must be a file name")
        else:
            base = os.path.dirname(os.path.abspath(source.path))
            context = ssl.create_default_context(cafile=os.path.join(base, cafile))
    except (OSError, ssl.SSLError) as exc:
        raise source.error(
            table, "cafile", f"cafile {cafile}: cannot load CA certificates: {exc}"
        ) from None
    addresses = {}
    for key, fallback in (("mail_from", smtp.user), ("rcpt_to", reader.user)):
        value = spec.get(key, fallback)
        if not isinstance(value, str) or not value:
            raise source.error(
                table, key if key in spec else None, f"targets.{name}: give {key} (an address)"
            )
        addresses[key] = value
    return Target(
        name=name,
        smtp=smtp,
        reader=reader,
        mail_from=addresses["mail_from"],
        rcpt_to=addresses["rcpt_to"],
        context=context,
        timeout=float(timeout),
        check_legacy_tls=legacy,
    )


def load_config(path: str, *, env: Mapping[str, str] | None = None) -> dict[str, Target]:
    """Read and check the exporter's TOML configuration.

    The file holds one ``[targets.NAME]`` table per target (see docs/exporter.md). Relative
    ``cafile`` and ``password_file`` paths are taken from the configuration file's directory.

    Args:
        env: where ``password_env`` variables are looked up (``os.environ`` by default).

    Returns:
        The targets by name, in file order.

    Raises:
        ConfigError: the file is unreadable or not TOML, or a key is unknown, a URL is
            malformed or holds a password, a password variable or file is missing; the
            message names the file and line.
    """
    environ = os.environ if env is None else env
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line L, column C)".
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    source = _Source(path, text)
    for key in data:
        if key != "targets":
            raise source.error([], key, f"unknown key {key!r}; the file holds [targets.NAME]")
    targets = data.get("targets")
    if targets is not None and not isinstance(targets, dict):
        raise source.error([], "targets", "targets must be tables: [targets.NAME]")
    if not targets:
        raise ConfigError(f"{path}: no targets; add a [targets.NAME] table")
    default_timeout = 30.0
    return {
        name: _target(source, name, spec, environ, default_timeout)
        for name, spec in targets.items()
    }


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9465`` for IPv6) -> (host, port); port 0 picks a free one.

    Raises:
        ConfigError: no port, or a port out of range.
    """
    host, colon, port_text = value.strip().rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"--listen {value!r}: expected HOST:PORT, such as {DEFAULT_LISTEN}")
    return host, int(port_text)


# -- one scrape's metrics ---------------------------------------------------------------------


def _expiry_timestamp(not_after: str) -> float | None:
    try:
        moment = datetime.datetime.fromisoformat(not_after)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def probe_metrics(
    result: ProbeResult | None,
    *,
    duration: float,
    in_progress: bool = False,
    timed_out: bool = False,
) -> bytes:
    """The Prometheus text format of one scrape of ``/probe``.

    Args:
        result: the finished round trip; None when none finished in time (then only
            ``probe_success 0``, the duration and the reason are given).
        duration: seconds the scrape spent (waiting included).
        in_progress: another scrape's probe of the target was still running.
        timed_out: the probe did not finish within the scrape's time budget.
    """
    registry = CollectorRegistry()

    def gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, documentation, labels, registry=registry)

    ok = result is not None and result.ok
    gauge("probe_success", "1 if the round trip passed every check, else 0.").set(int(ok))
    gauge("probe_duration_seconds", "Seconds the scrape's probe took.").set(duration)
    gauge("probe_in_progress", "1 if another scrape's probe of this target was still running.").set(
        int(in_progress)
    )
    gauge("probe_timed_out", "1 if the probe did not finish before the scrape timeout.").set(
        int(timed_out)
    )
    if result is None:
        return generate_latest(registry)
    steps = gauge(
        "probe_step_duration_seconds",
        "Seconds of each step of the round trip (summed when a step repeats).",
        ("step",),
    )
    totals: dict[str, float] = collections.defaultdict(float)
    for step in result.steps:
        totals[step.name.replace(" ", "_")] += step.seconds
    for name, seconds in totals.items():
        steps.labels(step=name).set(seconds)
    if result.error_step:
        gauge(
            "probe_failed_step_info", "The step the round trip failed at (value 1).", ("step",)
        ).labels(step=result.error_step).set(1)
    if result.time_to_visible is not None:
        gauge(
            "probe_time_to_visible_seconds",
            "Seconds from the SMTP server accepting the message to it showing in the mailbox.",
        ).set(result.time_to_visible)
    _tls_metrics(gauge, result)
    findings = gauge(
        "probe_findings", "Findings of the round trip by code and severity.", ("code", "severity")
    )
    for (code, severity), count in collections.Counter(
        (f.code, f.severity) for f in result.findings
    ).items():
        findings.labels(code=code, severity=severity).set(count)
    checks = gauge("probe_check", "1 if the named check passed, else 0.", ("check",))
    for check, passed in result.checks.items():
        checks.labels(check=check).set(int(passed))
    return generate_latest(registry)


def _tls_metrics(gauge: Any, result: ProbeResult) -> None:
    version = gauge(
        "probe_tls_version_info",
        "TLS version negotiated with each server (value 1).",
        ("server", "version"),
    )
    expiry = gauge(
        "probe_tls_cert_expiry_timestamp_seconds",
        "Unix time when each server's certificate expires.",
        ("server",),
    )
    match = gauge(
        "probe_tls_hostname_match", "1 if the certificate names the server, else 0.", ("server",)
    )
    earliest: float | None = None
    for facts in result.tls:
        version.labels(server=facts.server, version=facts.version).set(1)
        match.labels(server=facts.server).set(int(facts.hostname_match))
        moment = _expiry_timestamp(facts.not_after)
        if moment is not None:
            expiry.labels(server=facts.server).set(moment)
            earliest = moment if earliest is None else min(earliest, moment)
    if earliest is not None:
        # The name blackbox_exporter uses, so its dashboards and alerts apply unchanged.
        gauge(
            "probe_ssl_earliest_cert_expiry", "Unix time of the earliest certificate expiry."
        ).set(earliest)


# -- the exporter -----------------------------------------------------------------------------


class UnknownTargetError(LookupError):
    """A scrape named a target the configuration does not have."""


class Exporter:
    """The ``/probe`` and ``/metrics`` endpoints over the configured targets.

    ``start()`` binds and serves in a background thread; ``stop()`` shuts down (idempotent).
    ``scrape(name, scrape_timeout)`` is what ``/probe`` answers, usable without HTTP.
    """

    def __init__(self, targets: Mapping[str, Target], *, listen: str = DEFAULT_LISTEN) -> None:
        self.targets = dict(targets)
        self._listen = parse_listen(listen)
        self._locks = {name: threading.Lock() for name in self.targets}
        self._secrets = tuple(s for t in self.targets.values() for s in t.secrets)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.registry = CollectorRegistry()
        self._scrapes = Counter(
            "roundtrip_exporter_scrapes",
            "Scrapes of /probe per target.",
            ("target",),
            registry=self.registry,
        )
        self._failures = Counter(
            "roundtrip_exporter_probe_failures",
            "Scrapes of /probe whose probe failed (probe_success 0), per target.",
            ("target",),
            registry=self.registry,
        )
        self._timeouts = Counter(
            "roundtrip_exporter_probe_timeouts",
            "Probes cut at the scrape timeout, per target.",
            ("target",),
            registry=self.registry,
        )
        self._busy = Counter(
            "roundtrip_exporter_probe_in_progress",
            "Scrapes answered probe_in_progress (another probe of the target still ran).",
            ("target",),
            registry=self.registry,
        )
        self._unknown = Counter(
            "roundtrip_exporter_unknown_target_scrapes",
            "Scrapes of /probe with a missing or unknown target (HTTP 400).",
            registry=self.registry,
        )
        self._durations = Histogram(
            "roundtrip_exporter_probe_duration_seconds",
            "Seconds each scrape of /probe took, per target.",
            ("target",),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        for name in self.targets:
            for metric in (self._scrapes, self._failures, self._timeouts, self._busy):
                metric.labels(target=name)
            self._durations.labels(target=name)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    # lifecycle

    def start(self) -> tuple[str, int]:
        """Bind and serve in a background thread; returns the bound (host, port).

        Raises:
            ServerStartError: the address cannot be bound.
        """
        host, port = self._listen
        handler = type("Handler", (_Handler,), {"exporter": self})
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ServerStartError(
                f"exporter: cannot listen on {host}:{port}: {exc.strerror or exc}; "
                "choose another --listen address"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="roundtrip-exporter", daemon=True
        )
        self._thread.start()
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "start() first"
        bound = self._server.server_address
        return str(bound[0]), int(bound[1])

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Exporter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # scraping

    def scrub(self, text: str) -> str:
        """``text`` with every configured password replaced by ``****``."""
        for secret in self._secrets:
            text = text.replace(secret, "****")
        return text

    def count_bad_request(self) -> None:
        self._unknown.inc()

    def own_metrics(self) -> bytes:
        return generate_latest(self.registry)

    def scrape(self, name: str, scrape_timeout: float | None = None) -> bytes:
        """Run one probe of target ``name`` within the scrape's budget; its metrics.

        Raises:
            UnknownTargetError: no such target.
        """
        target = self.targets.get(name)
        if target is None:
            self._unknown.inc()
            raise UnknownTargetError(name)
        started = time.monotonic()
        budget = _budget(target.timeout, scrape_timeout)
        self._scrapes.labels(target=name).inc()
        result, in_progress, timed_out = self._run_exclusive(target, budget)
        duration = time.monotonic() - started
        self._durations.labels(target=name).observe(duration)
        if result is None or not result.ok:
            self._failures.labels(target=name).inc()
        if in_progress:
            self._busy.labels(target=name).inc()
            log.warning("target %s: a probe is still in progress; answered probe_success 0", name)
        elif timed_out:
            self._timeouts.labels(target=name).inc()
            log.warning("target %s: probe cut at the scrape budget of %.1f s", name, budget)
        elif result is not None:
            self._log_result(name, result)
        return probe_metrics(
            result, duration=duration, in_progress=in_progress, timed_out=timed_out
        )

    def _log_result(self, name: str, result: ProbeResult) -> None:
        if result.ok:
            log.info("target %s: PASS in %.3f s", name, result.total_seconds)
        else:
            log.warning(
                "target %s: FAIL at %s in %.3f s: %s",
                name,
                result.error_step,
                result.total_seconds,
                self.scrub(result.error),
            )

    def _run_exclusive(
        self, target: Target, budget: float
    ) -> tuple[ProbeResult | None, bool, bool]:
        """(result, in_progress, timed_out) of one probe, never two of one target at once."""
        started = time.monotonic()
        lock = self._locks[target.name]
        if not lock.acquire(timeout=budget):
            return None, True, False
        remaining = max(budget - (time.monotonic() - started), 0.05)
        box: list[ProbeResult] = []
        done = threading.Event()

        def work() -> None:
            try:
                box.append(
                    run_probe(
                        target.smtp,
                        target.reader,
                        context=target.context,
                        mail_from=target.mail_from,
                        rcpt_to=target.rcpt_to,
                        timeout=remaining,
                        check_legacy_tls=target.check_legacy_tls,
                    )
                )
            except Exception:  # a bug in the probe: keep serving, say so in the log
                log.exception("target %s: the probe crashed", target.name)
            finally:
                # Released when the probe ends, not when the scrape gives up waiting: the
                # next scrape must not start a second probe of the same mailbox.
                lock.release()
                done.set()

        threading.Thread(target=work, name=f"probe {target.name}", daemon=True).start()
        if not done.wait(remaining):
            return None, False, True
        return (box[0] if box else None), False, False


def _budget(target_timeout: float, scrape_timeout: float | None) -> float:
    """Seconds a probe may take: the target's timeout, cut to the scrape timeout less the
    margin (half the scrape timeout when that is too short for the margin)."""
    if scrape_timeout is None or scrape_timeout <= 0:
        return target_timeout
    usable = scrape_timeout - SCRAPE_TIMEOUT_MARGIN
    if usable < scrape_timeout / 2:
        usable = scrape_timeout / 2
    return min(target_timeout, usable)


class _Handler(BaseHTTPRequestHandler):
    exporter: Exporter
    server_version = "roundtrip-exporter"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/probe":
            self._probe(parse_qs(url.query))
        elif url.path == "/metrics":
            self._send(200, self.exporter.own_metrics(), CONTENT_TYPE_LATEST)
        elif url.path == "/":
            names = "\n".join(f"  /probe?target={name}" for name in self.exporter.targets)
            body = f"roundtrip exporter\n\n  /metrics\n{names}\n"
            self._send(200, body.encode(), "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found: try /probe?target=NAME or /metrics\n")

    def _probe(self, query: dict[str, list[str]]) -> None:
        names = query.get("target", [])
        if len(names) != 1 or not names[0]:
            self.exporter.count_bad_request()
            self._send(400, b"give exactly one target parameter: /probe?target=NAME\n")
            return
        header = self.headers.get("X-Prometheus-Scrape-Timeout-Seconds")
        try:
            scrape_timeout = float(header) if header else None
        except ValueError:
            scrape_timeout = None
        try:
            body = self.exporter.scrape(names[0], scrape_timeout)
        except UnknownTargetError:
            known = ", ".join(self.exporter.targets)
            message = f"unknown target {names[0][:100]!r}; configured targets: {known}\n"
            self._send(400, message.encode("utf-8", "replace"))
            return
        self._send(200, body, CONTENT_TYPE_LATEST)

    def _send(
        self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), self.exporter.scrub(format % args))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def run(config: str, listen: str | None, out: TextIO) -> int:
    """``roundtrip exporter``: serve until SIGINT or SIGTERM, then return 0.

    Raises:
        ConfigError: a bad configuration file or ``--listen`` value.
        ServerStartError: the address cannot be bound.
    """
    targets = load_config(config)
    exporter = Exporter(targets, listen=listen or DEFAULT_LISTEN)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("roundtrip exporter: %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with exporter:
            host, port = exporter.address
            shown = f"[{host}]" if ":" in host else host
            if not _is_loopback(host):
                log.warning(
                    "listening on %s, not a loopback address: whoever reaches /probe can make "
                    "the exporter send mail and log in to the configured servers",
                    host,
                )
            print(
                f"roundtrip exporter: listening on http://{shown}:{port}/ "
                f"({len(targets)} targets: {', '.join(targets)})",
                file=out,
                flush=True,
            )
            while not stop.wait(0.5):
                pass
    finally:
        for signum, previous_handler in previous.items():
            signal.signal(signum, previous_handler)
    return 0
