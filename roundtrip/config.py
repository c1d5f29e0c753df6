"""Frozen option objects, and the only place that parses option strings and environment variables.

Precedence, lowest to highest (docs/design.md, config flow): dataclass defaults < ini <
command line < ``mailstack`` marker keyword arguments < explicit code arguments.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

__all__ = [
    "DEFAULT_DOMAINS",
    "LOOP_CHOICES",
    "PASSWORD_ENV",
    "Endpoint",
    "Forward",
    "MailboxLimits",
    "PortMode",
    "SMTPLimits",
    "StackConfig",
    "TLSMode",
    "Timeouts",
    "User",
    "cert_cache_dir",
    "check_envelope_address",
    "loop_choice",
    "parse_bool",
    "parse_dmarc_policy",
    "parse_domains",
    "parse_endpoint",
    "parse_host_port",
    "parse_port_mode",
    "parse_relay_tls",
    "parse_seconds",
    "parse_tls_mode",
    "parse_user",
]

#: The values ``ROUNDTRIP_LOOP`` accepts (``DEFAULT_LOOP`` when unset). ``auto``: uvloop when
#: it can be imported, else asyncio's loop (resolved by roundtrip/servers/_runner.py).
LOOP_CHOICES = ("asyncio", "uvloop", "auto")
#: What an unset ``ROUNDTRIP_LOOP`` means (issue "Performance, round two": uvloop as the loop
#: when it is installed; docs/benchmarks.md has both loops' figures).
DEFAULT_LOOP = "auto"


def loop_choice(environ: Mapping[str, str] | None = None) -> str:
    """The event loop named by ``ROUNDTRIP_LOOP`` (``auto`` when unset or empty: uvloop when
    it is installed, else asyncio's own).

    Raises:
        ConfigError: the value is not one of ``LOOP_CHOICES``.
    """
    raw = (os.environ if environ is None else environ).get("ROUNDTRIP_LOOP", "")
    value = raw.strip().lower() or DEFAULT_LOOP
    if value not in LOOP_CHOICES:
        raise ConfigError(
            f"ROUNDTRIP_LOOP={raw!r} is not a known event loop; expected one of "
            + ", ".join(LOOP_CHOICES)
        )
    return value


def cert_cache_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """The certificate cache directory named by ``ROUNDTRIP_CERT_CACHE`` (None when unset)."""
    raw = (os.environ if environ is None else environ).get("ROUNDTRIP_CERT_CACHE", "")
    return os.path.expanduser(raw.strip()) if raw.strip() else None


#: What may never appear in an envelope address we write into an SMTP command: CR and LF end
#: the command (command injection), NUL and angle brackets break the path (RFC 5321 4.1.2).
_FORBIDDEN_IN_ADDRESS = frozenset("\r\n\x00<>")


def check_envelope_address(address: str, *, what: str = "address") -> str:
    """Return ``address``, or refuse it when it could inject SMTP commands.

    One rule for every client side of ours: the relay (aiosmtplib writes addresses into
    commands verbatim, GHSA-v3q9-hj7j-63hq) and the probe (docs/security.md A2.5, A5.3).

    Raises:
        ConfigError: the address holds CR, LF, NUL or an angle bracket.
    """
    if any(c in _FORBIDDEN_IN_ADDRESS for c in address):
        raise ConfigError(f"{what} {address!r} contains CR, LF, NUL or angle brackets")
    return address


DEFAULT_DOMAINS = ("example.com", "example.org")
#: ``ephemeral``, ``standard``, or a base port (an int): see ``StackConfig.ports``.
PortMode = Literal["ephemeral", "standard"] | int
TLSMode = Literal["starttls", "implicit", "both"]
_PORT_MODES = ("ephemeral", "standard")
_TLS_MODES = ("starttls", "implicit", "both")
#: With a base port, domain N (from 0) listens on base + N * PORT_STRIDE + the well-known port.
PORT_STRIDE = 1000
# RFC 1035 section 2.3.1 labels, lower-cased; at least two labels.
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


def _generated_password() -> str:
    return secrets.token_urlsafe(12)


@dataclass(frozen=True, slots=True)
class User:
    """A mailbox owner: full address and password."""

    address: str
    password: str = field(default_factory=_generated_password, repr=False)

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    def __post_init__(self) -> None:
        local, at, domain = self.address.rpartition("@")
        if not at or not local or not domain:
            raise ConfigError(f"user address {self.address!r} is not of the form local@domain")
        if not self.password:
            # An empty password must never open a mailbox (Dovecot refuses one unless
            # ``nopassword`` is configured on purpose): refuse it where it is configured.
            raise ConfigError(f"user {self.address!r}: the password is empty")
        object.__setattr__(self, "address", f"{local}@{domain.lower()}")


#: What a forwarding alias may write into a message: printable ASCII (a subject prefix on one
#: line; a footer may span lines), so the forwarded copy never needs a new encoding.
_FORWARD_TEXT = re.compile(r"[ -~]*")


@dataclass(frozen=True, slots=True)
class Forward:
    """A forwarding alias of a stack domain (Postfix ``virtual_alias_maps``, a mailing list).

    Mail to ``address`` is accepted by its domain's MX, checked as any mail there, changed as
    a mailing list changes it (``subject_prefix`` in front of the Subject, ``footer`` after
    the text body: either breaks the original DKIM signature), ARC-sealed (RFC 8617) and
    re-sent through the relay to every ``to`` address, the envelope sender kept.

    Attributes:
        address: the alias, in a stack domain, not a user's mailbox.
        to: where each message goes (one or more addresses; a string is one address).
        subject_prefix: put in front of the Subject value (``"[list] "``); printable ASCII.
        footer: appended to the text body; printable ASCII lines.
    """

    address: str
    to: tuple[str, ...]
    subject_prefix: str = ""
    footer: str = ""

    def __post_init__(self) -> None:
        local, at, domain = self.address.rpartition("@")
        if not at or not local or not domain:
            raise ConfigError(f"forwards: {self.address!r} is not of the form local@domain")
        check_envelope_address(self.address, what="forwards: address")
        object.__setattr__(self, "address", f"{local}@{domain.lower()}")
        targets = (self.to,) if isinstance(self.to, str) else tuple(self.to)
        if not targets:
            raise ConfigError(f"forwards: {self.address!r} has no 'to' address")
        for target in targets:
            _, at, domain = target.rpartition("@")
            if not at or not domain:
                raise ConfigError(f"forwards: {self.address!r}: to {target!r} is not an address")
            check_envelope_address(target, what=f"forwards: {self.address!r}: to")
        object.__setattr__(self, "to", targets)
        if not _FORWARD_TEXT.fullmatch(self.subject_prefix):
            raise ConfigError(
                f"forwards: {self.address!r}: subject_prefix must be printable ASCII on one line"
            )
        if not all(_FORWARD_TEXT.fullmatch(line) for line in self.footer.splitlines()):
            raise ConfigError(f"forwards: {self.address!r}: footer must be printable ASCII lines")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Every time limit of a stack, in float seconds."""

    #: How long start() may take before ServerStartError.
    start_timeout: float = 10.0
    #: Idle time before a server closes a connection (RFC 5321 4.5.3.2: 5 minutes).
    idle_timeout: float = 300.0
    #: TLS handshake limit for implicit TLS and STARTTLS (docs/security.md A3.4).
    tls_handshake_timeout: float = 30.0
    #: Default wait of mailstack.wait_for() and of probes.
    wait_timeout: float = 10.0
    #: IMAP: deadline per command once logged in (RFC 9051 5.4: at least 30 minutes).
    imap_idle_timeout: float = 1800.0
    #: POP3: the same (RFC 1939 section 3: at least 10 minutes).
    pop3_idle_timeout: float = 600.0
    #: IMAP and POP3: deadline per command before login (docs/security.md A4.8).
    login_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class SMTPLimits:
    """Abuse limits of the SMTP listeners (docs/security.md A1, A4.3, A5.4, A8).

    Defaults follow the RFCs, Postfix and Dovecot; a test stack lowers them to run fast. A
    count of 0 turns that limit off.
    """

    #: Longest command line, CRLF included (RFC 5321 4.5.3.1.4: 512 octets). MAIL gets the
    #: extra octets that SIZE and SMTPUTF8 allow (RFC 1870, RFC 6531 3.4).
    max_command_line: int = 512
    #: Longest text line of DATA, CRLF included (RFC 5321 4.5.3.1.6: 1000 octets). A longer
    #: line makes the whole message fail with 500 after the final dot; nothing is stored.
    max_text_line: int = 1000
    #: 4xx/5xx replies in one session before "421 4.7.0 Error: too many errors" and close
    #: (Postfix smtpd_hard_error_limit 20).
    max_errors: int = 20
    #: Commands per session, by verb; "*" is the budget of every other verb. Past it: 421 and
    #: close (aiosmtpd command_call_limit; Postfix smtpd_junk_command_limit 100 for
    #: NOOP/RSET/VRFY). RCPT gets room for several full-size transactions.
    command_limits: tuple[tuple[str, int], ...] = (
        ("*", 1000),
        ("NOOP", 100),
        ("RSET", 100),
        ("VRFY", 100),
        ("EXPN", 100),
        ("HELP", 100),
        ("RCPT", 10_000),
    )
    #: Simultaneous connections to one listener (Postfix default_process_limit 100).
    max_connections: int = 100
    #: Simultaneous connections from one client IP to one listener
    #: (Postfix smtpd_client_connection_count_limit 50).
    max_connections_per_ip: int = 50
    #: Failed AUTH (535) on one connection before 421 and close.
    max_auth_failures: int = 3
    #: Delay before AUTH is answered, after failures from the same client IP: 0, then this,
    #: doubling up to ``auth_penalty_max``. It runs before the credentials are checked, so a
    #: right password waits too and timing reveals nothing (Dovecot auth penalty: 2 s doubling
    #: to 15 s). Ours is small because a test stack shares one client IP between tests that
    #: fail AUTH on purpose and tests with sub-second timeouts. Success clears it.
    auth_penalty_initial: float = 0.1
    auth_penalty_max: float = 1.0
    #: Failures from an IP are forgotten this long after its last one.
    auth_penalty_timeout: float = 300.0
    #: Time for the whole DATA phase, from 354 to the final dot; every N bytes received add
    #: N/min_data_rate seconds, never beyond this much from now (Postfix
    #: smtpd_per_request_deadline with smtpd_timeout 300 s and smtpd_min_data_rate 500).
    data_timeout: float = 300.0
    #: Bytes per second a DATA sender must sustain (Postfix smtpd_min_data_rate 500).
    min_data_rate: float = 500.0
    #: Received fields a message may already carry (Postfix hopcount_limit 50); more is a
    #: mail loop: 554 5.4.6, not stored.
    max_hops: int = 50
    #: Largest header field, folded lines together (Postfix header_size_limit 102400); a
    #: larger one gets 552 5.3.4 and nothing is stored. 0 turns the check off.
    max_header_size: int = 102400
    #: Seconds to wait before the banner; a client that talks first gets 554 5.5.0 and is
    #: dropped (Postfix postscreen_greet_wait, sendmail greet_pause). 0 (default) sends the
    #: banner at once; bytes that arrive before it still count as pregreet.
    greet_pause: float = 0.0

    def __post_init__(self) -> None:
        if self.max_command_line < 64 or self.max_text_line < 64:
            raise ConfigError("max_command_line and max_text_line must be at least 64 octets")
        for name in ("data_timeout", "min_data_rate"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"smtp_limits.{name} must be greater than 0")
        for name in ("auth_penalty_initial", "auth_penalty_max", "greet_pause"):
            if getattr(self, name) < 0:
                raise ConfigError(f"smtp_limits.{name} must not be negative")
        object.__setattr__(
            self, "command_limits", tuple((str(k).upper(), int(v)) for k, v in self.command_limits)
        )


def _command_budget(name: str, value: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """Normalise a ``(verb, count)`` budget: upper-case verbs, int counts, none negative."""
    budget = tuple((str(verb).strip().upper(), int(count)) for verb, count in value)
    for verb, count in budget:
        if not verb or count < 0:
            raise ConfigError(f"{name}: {verb!r} must be a verb (or '*') with a count of 0 or more")
    return budget


@dataclass(frozen=True, slots=True)
class MailboxLimits:
    """Command budgets of the IMAP and POP3 listeners (docs/security.md A8.3).

    A session that sends more commands than its budget gets ``* BYE [LIMIT] ...`` (IMAP) or
    ``-ERR too many ... commands`` (POP3) and is closed; other sessions go on. Unlike
    ``SMTPLimits.command_limits`` (where ``"*"`` is the allowance of each unlisted verb, as in
    aiosmtpd), ``"*"`` here is the session's total: every command counts against it, and a
    listed verb also against its own count. A count of 0 turns that budget off. Commands that
    fail count as well, but bad commands end a session much sooner (``max_bad_commands``).
    """

    #: Neither Dovecot nor Courier caps the commands of a session (Dovecot only counts bad
    #: ones, CLIENT_MAX_BAD_COMMANDS 20); Postfix smtpd_junk_command_limit is 100 for SMTP.
    #: Real IMAP sessions are long: mbsync and offlineimap send one UID FETCH per message, so
    #: a first sync of a 100,000-message folder alone takes more than 100,000 commands, and a
    #: client without IDLE NOOPs (or CHECKs) every minute or so for days. Hence a total of a
    #: million, which only ends sessions that never end, and a budget for the cheap
    #: keep-alive commands a flooder loops on: 100,000 is a day of one NOOP a second, or
    #: two months of one a minute, and more than a test that loops NOOP for a few seconds
    #: sends (about 7,000 a second over TLS). Clients send CAPABILITY a few times per
    #: session (after connect, STARTTLS and login).
    imap_command_limits: tuple[tuple[str, int], ...] = (
        ("*", 1_000_000),
        ("NOOP", 100_000),
        ("CHECK", 100_000),
        ("CAPABILITY", 1_000),
    )
    #: POP3 sessions are short (RFC 1939 autologout 10 minutes, download and quit): a
    #: client needs one or two commands per message (RETR, DELE, LIST n, UIDL n), so the
    #: total follows the IMAP one. The status commands are sent once or twice per session;
    #: the argument-less LIST and UIDL (the whole scan listing, whose reply grows with the
    #: maildrop) count against ``LIST``/``UIDL``, while ``LIST n`` and ``UIDL n`` count only
    #: against ``"*"``.
    pop3_command_limits: tuple[tuple[str, int], ...] = (
        ("*", 1_000_000),
        ("NOOP", 1_000),
        ("STAT", 1_000),
        ("LIST", 1_000),
        ("UIDL", 1_000),
        ("RSET", 1_000),
        ("CAPA", 1_000),
    )

    def __post_init__(self) -> None:
        for name in ("imap_command_limits", "pop3_command_limits"):
            object.__setattr__(self, name, _command_budget(name, getattr(self, name)))


def _extra_hosts(config: StackConfig) -> tuple[str, ...]:
    """``config.extra_hosts`` as canonical IP addresses, checked against ``host`` and ports."""
    hosts: list[str] = []
    for value in _as_list(config.extra_hosts):
        try:
            address = str(ipaddress.ip_address(value.strip().strip("[]")))
        except ValueError:
            raise ConfigError(f"extra_hosts: {value!r} is not an IP address") from None
        if address not in hosts and address != config.host:
            hosts.append(address)
    if hosts and config.ports == "standard":
        raise ConfigError(
            "extra_hosts needs ports='ephemeral' or a base port: with ports='standard' every"
            " domain listens on its own 127.0.0.N"
        )
    return tuple(hosts)


@dataclass(frozen=True, slots=True)
class StackConfig:
    """What a MailStack serves.

    Args:
        domains: mail domains; each gets SMTP (MX), submission (465 and 587), POP3 and IMAP.
        users: mailbox owners; by default one ``user@<domain>`` per domain.
        host: loopback address to bind in ``ephemeral`` mode.
        ports: ``ephemeral`` (port 0, safe in parallel), ``standard`` (25, 465, 587, 110, 995,
            143, 993, 53 on 127.0.0.N per domain; needs root or CAP_NET_BIND_SERVICE), or a
            base port (an int from 1024): fixed, unprivileged ports on ``host``, the first
            domain on base + the well-known port (10000: 10025, 10465, 10587, 10110, 10995,
            10143, 10993, DNS on 10053), the next domain 1000 higher, and so on. An
            application can then be configured once, as with Mailpit's fixed 1025.
        tls: which submission flavour probes and helpers prefer: ``implicit`` (465),
            ``starttls`` (587) or ``both``. Every listener runs regardless.
        timeouts: time limits.
        max_message_size: SIZE limit advertised by SMTP and the IMAP APPENDLIMIT (bytes).
    """

    domains: tuple[str, ...] = DEFAULT_DOMAINS
    users: tuple[User, ...] = ()
    host: str = "127.0.0.1"
    ports: PortMode = "ephemeral"
    tls: TLSMode = "both"
    timeouts: Timeouts = Timeouts()
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 1000
    #: Seconds between relay attempts after a temporary failure (then the last one repeats).
    retry_delays: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0)
    #: Seconds a message may wait in the relay queue before it bounces (Postfix: 5 days).
    queue_lifetime: float = 600.0
    #: Seconds the relay keeps an MX connection open after a message, for the next message to
    #: the same MX (Postfix's connection cache); 0: a fresh connection for every message.
    relay_connection_cache: float = 2.0
    #: The relay's outbound TLS policy per recipient domain (docs/security.md A3.7): a mode,
    #: ``enforce``, ``testing`` or ``none`` (RFC 8461 §5), or a whole MTA-STS policy file
    #: (``version: STSv1``, ``mode: ...``, ``mx: ...``, ``max_age: ...``). A bare mode allows
    #: every MX the stack's DNS names. A stack domain not listed acts as if it published
    #: ``enforce`` listing its MX hosts; other domains have no policy: opportunistic TLS. A
    #: mapping is accepted and stored as sorted ``(domain, value)`` pairs (hashable config).
    relay_tls: tuple[tuple[str, str], ...] = ()
    #: What submission does with a From: header naming someone other than the AUTH user:
    #: ``accept`` (default: applications often send as noreply@...) or ``reject`` (553 5.7.1,
    #: docs/security.md A4.6). MAIL FROM is always held to the AUTH user.
    from_header_policy: str = "accept"
    #: SPF (RFC 7208) and DMARC (RFC 7489) at every MX: every stack domain publishes a
    #: DMARC record, the verdicts go into the MX's Authentication-Results, a From domain
    #: whose policy is ``reject`` and that fails DMARC gets ``550 5.7.1``, one whose policy is
    #: ``quarantine`` goes to the Junk folder. On by default, as at every large mailbox
    #: provider: mail whose From names a stack domain it was not sent from is refused.
    #: False turns the checks and the DMARC records off (docs/design.md, "Sender
    #: authentication").
    sender_auth: bool = True
    #: With ``sender_auth``: the DMARC policy each stack domain publishes at
    #: ``_dmarc.<domain>``: ``reject``
    #: (default), ``quarantine``, ``none``, or a whole record (``v=DMARC1; p=...``); ``"*"``
    #: sets the default for every domain not listed. Stored as sorted ``(domain, value)``
    #: pairs (hashable config); a mapping is accepted.
    dmarc_policy: tuple[tuple[str, str], ...] = ()
    #: Abuse limits of the SMTP listeners.
    smtp_limits: SMTPLimits = SMTPLimits()
    #: Command budgets of the IMAP and POP3 listeners.
    mailbox_limits: MailboxLimits = MailboxLimits()
    #: Domains whose MX and submission accept every local part, as MailHog and Mailpit do:
    #: mail for an address that is not a user goes to the domain's first user (a catch-all
    #: alias, Postfix's ``@domain user`` virtual alias). ``("*",)``: every domain.
    catch_all: tuple[str, ...] = ()
    #: Domains outside the stack that the relay delivers to over SMTP, routed by the stack's
    #: DNS like its own domains, instead of capturing their mail: a real MTA under test (give
    #: its MX with ``MailStack.set_dns_records`` and, if not on 25, ``MailStack.mx_ports``; its
    #: TLS policy with ``relay_tls`` or ``MailStack.tls_policies``, opportunistic by default).
    routed_domains: tuple[str, ...] = ()
    #: DKIM (RFC 6376, RFC 8463): every stack domain gets keys in the stack's DNS, submission
    #: signs authenticated mail, and every MX verifies every signature and reports it in its
    #: Authentication-Results. On by default, as at every large receiver; False: no keys, no
    #: signing, no DKIM verdict (``python -m benchmarks.run --only auth`` gives the cost).
    dkim: bool = True
    #: With ``dkim``: stack domains whose submission does not DKIM-sign (and which get no keys
    #: in DNS): their mail arrives with ``dkim=none``, as from a domain that never set DKIM up, or
    #: one whose application signs with its own key (``MailStack.publish_dkim_key``).
    #: Every other domain signs with an Ed25519 and an RSA-2048 key (RFC 8463 dual signing).
    #: ``("*",)``: no domain signs (the MX still verifies what applications sign).
    dkim_unsigned_domains: tuple[str, ...] = ()
    #: More addresses every listener binds besides ``host``, each on the same port as on
    #: ``host`` (``("::1",)``: dual stack, IPv4 and IPv6 loopback). ``describe()`` and the
    #: printed endpoints keep naming ``host``; the DNS zone gives each MX host an A or AAAA
    #: record per address. Not with ``ports="standard"`` (one ::1 cannot hold every domain).
    extra_hosts: tuple[str, ...] = ()
    #: Transcripts (``MailStack.transcripts()``): how many of the latest connections, and
    #: of the latest DNS queries, the stack keeps (0: none are recorded).
    transcript_connections: int = 200
    #: Forwarding aliases (:class:`Forward`): mail to each ``address`` is checked at its MX,
    #: changed as a mailing list changes it, ARC-sealed and relayed to its ``to`` addresses
    #: (docs/design.md, "Forwarding and ARC").
    forwards: tuple[Forward, ...] = ()
    #: The ARC sealers (RFC 8617 ``d=`` of the newest ARC-Seal) whose word every MX takes
    #: when DMARC fails: a chain that validates, sealed by one of these (or a subdomain),
    #: whose ARC-Authentication-Results says the From domain passed DMARC (or DKIM) at the
    #: sealer, lets the message in despite ``p=reject``/``quarantine`` (RFC 8617 section 7.2,
    #: RFC 7489 section 6.7 local policy). None (default): the stack's own domains; ``()``:
    #: nobody, so a forwarder's modifications end in the DMARC policy.
    arc_trusted_sealers: tuple[str, ...] | None = None
    #: A directory that keeps the stack's CA and leaf certificates across sessions (files of
    #: mode 0600 in a directory of mode 0700; roundtrip/stack/_certcache.py), so a session
    #: reuses them instead of minting new ones; None: minted in memory every time, as before.
    #: ``ROUNDTRIP_CERT_CACHE`` gives one to a stack that was given none (``cert_cache_dir``).
    cert_cache: str | None = None

    def __post_init__(self) -> None:
        domains = tuple(dict.fromkeys(parse_domains(self.domains)))
        if not domains:
            raise ConfigError("a stack needs at least one domain")
        object.__setattr__(self, "domains", domains)
        if isinstance(self.ports, bool) or (
            not isinstance(self.ports, int) and self.ports not in _PORT_MODES
        ):
            raise ConfigError(
                f"ports={self.ports!r}: choose one of {', '.join(_PORT_MODES)}, or a base port"
            )
        if isinstance(self.ports, int):
            _check_base_port(self.ports, len(domains))
        if self.tls not in _TLS_MODES:
            raise ConfigError(f"tls={self.tls!r}: choose one of {', '.join(_TLS_MODES)}")
        users = tuple(u if isinstance(u, User) else parse_user(u) for u in self.users)
        if not users:
            users = tuple(User(f"user@{d}") for d in domains)
        for user in users:
            if user.domain not in domains:
                raise ConfigError(
                    f"user {user.address!r} is not in a domain of the stack ({', '.join(domains)})"
                )
        object.__setattr__(self, "users", users)
        catch_all = tuple(dict.fromkeys(d.strip().lower() for d in _as_list(self.catch_all)))
        for domain in catch_all:
            if domain != "*" and domain not in domains:
                raise ConfigError(
                    f"catch_all domain {domain!r} is not a domain of the stack"
                    f" ({', '.join(domains)})"
                )
            if domain != "*" and not any(u.domain == domain for u in users):
                raise ConfigError(f"catch_all domain {domain!r} has no user to receive its mail")
        object.__setattr__(self, "catch_all", catch_all)
        routed = tuple(dict.fromkeys(parse_domains(self.routed_domains)))
        clash = sorted(set(routed) & set(domains))
        if clash:
            raise ConfigError(
                f"routed_domains {', '.join(clash)}: a stack domain is served, not routed"
            )
        object.__setattr__(self, "routed_domains", routed)
        given = _as_list(self.dkim_unsigned_domains)
        every = ["*"] if "*" in given else []
        unsigned = tuple(dict.fromkeys([*every, *parse_domains([d for d in given if d != "*"])]))
        strangers = [d for d in unsigned if d not in domains and d != "*"]
        if strangers:
            raise ConfigError(
                f"dkim_unsigned_domains {', '.join(strangers)}: not a domain of the stack"
                f" ({', '.join(domains)})"
            )
        object.__setattr__(self, "dkim_unsigned_domains", unsigned)
        if self.max_message_size <= 0:
            raise ConfigError("max_message_size must be positive")
        if self.from_header_policy not in ("accept", "reject"):
            raise ConfigError(
                f"from_header_policy={self.from_header_policy!r}: choose one of accept, reject"
            )
        object.__setattr__(self, "relay_tls", parse_relay_tls(self.relay_tls))
        dmarc = parse_dmarc_policy(self.dmarc_policy)
        strangers = [d for d, _ in dmarc if d != "*" and d not in domains]
        if strangers:
            raise ConfigError(
                f"dmarc_policy {', '.join(strangers)}: not a domain of the stack"
                f" ({', '.join(domains)})"
            )
        object.__setattr__(self, "dmarc_policy", dmarc)
        if self.relay_connection_cache < 0:
            raise ConfigError("relay_connection_cache must not be negative")
        if isinstance(self.transcript_connections, bool) or self.transcript_connections < 0:
            raise ConfigError("transcript_connections must be a count, 0 or more")
        object.__setattr__(self, "extra_hosts", _extra_hosts(self))
        object.__setattr__(self, "forwards", _forwards(self.forwards, domains, users))
        if self.arc_trusted_sealers is not None:
            try:
                sealers = tuple(parse_domains(_as_list(self.arc_trusted_sealers)))
            except ConfigError as exc:
                raise ConfigError(f"arc_trusted_sealers: {exc}") from None
            object.__setattr__(self, "arc_trusted_sealers", sealers)

    def user(self, domain: str | None = None) -> User:
        """The first user of ``domain``, or the user ``domain`` names when it is an address.

        Raises:
            ConfigError: no such user; the message lists the configured ones.
        """
        if domain is not None and "@" in domain:
            wanted = domain.strip().lower()
            for user in self.users:
                if user.address.lower() == wanted:
                    return user
            known = ", ".join(u.address for u in self.users)
            raise ConfigError(f"{domain!r} is not a user of this stack; its users: {known}")
        for user in self.users:
            if domain is None or user.domain == domain.lower():
                return user
        raise ConfigError(
            f"no user in domain {domain!r}; the stack's domains: {', '.join(self.domains)}"
        )

    def replace(self, **overrides: Any) -> StackConfig:
        """A copy with some fields changed.

        Raises:
            ConfigError: an unknown key (the message lists the valid ones) or a bad value.
        """
        valid = {f.name for f in dataclasses.fields(self)} | set(_TIMEOUT_KEYS)
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ConfigError(
                f"unknown stack option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
            )
        timeouts = {k: float(overrides.pop(k)) for k in list(overrides) if k in _TIMEOUT_KEYS}
        if timeouts:
            overrides["timeouts"] = dataclasses.replace(self.timeouts, **timeouts)
        if "domains" in overrides and "users" not in overrides:
            overrides["users"] = ()
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_strings(cls, values: Mapping[str, Any]) -> StackConfig:
        """Build from ini/CLI strings (None values are ignored)."""
        kwargs: dict[str, Any] = {}
        timeouts: dict[str, float] = {}
        for key, value in values.items():
            if value is None or value == "" or value == []:
                continue
            if key == "domains":
                kwargs["domains"] = parse_domains(value)
            elif key == "users":
                kwargs["users"] = tuple(parse_user(v) for v in _as_list(value))
            elif key == "host":
                kwargs["host"] = str(value).strip()
            elif key == "extra_hosts":
                kwargs["extra_hosts"] = tuple(_as_list(value))
            elif key == "ports":
                kwargs["ports"] = parse_port_mode(value)
            elif key == "catch_all":
                kwargs["catch_all"] = tuple(_as_list(value))
            elif key == "routed_domains":
                kwargs["routed_domains"] = parse_domains(value)
            elif key == "dkim_unsigned_domains":
                kwargs["dkim_unsigned_domains"] = tuple(_as_list(value))
            elif key == "sender_auth":
                kwargs["sender_auth"] = parse_bool(value)
            elif key == "dmarc_policy":  # "example.org=quarantine, *=none"
                kwargs["dmarc_policy"] = tuple(
                    tuple(item.split("=", 1)) if "=" in item else ("*", item)
                    for item in _as_list(value)
                )
            elif key == "tls":
                kwargs["tls"] = parse_tls_mode(value)
            elif key == "timeout":
                timeouts["wait_timeout"] = parse_seconds(value, "timeout")
            elif key in _TIMEOUT_KEYS:
                timeouts[key] = parse_seconds(value, key)
            else:
                raise ConfigError(f"unknown option {key!r}")
        if timeouts:
            kwargs["timeouts"] = Timeouts(**timeouts)
        # A user of a domain not listed adds the domain (``serve --user dev@myapp.test``);
        # without any domain given, the users' domains are the stack's.
        if kwargs.get("users"):
            user_domains = tuple(u.domain for u in kwargs["users"])
            kwargs["domains"] = tuple(dict.fromkeys((*kwargs.get("domains", ()), *user_domains)))
        return cls(**kwargs)


_TIMEOUT_KEYS = tuple(f.name for f in dataclasses.fields(Timeouts))
_RELAY_TLS_MODES = ("enforce", "testing", "none")


def parse_relay_tls(
    value: Mapping[str, str] | Iterable[tuple[str, str]],
) -> tuple[tuple[str, str], ...]:
    """Normalise ``StackConfig.relay_tls``: lower-case domains, sorted, one value each.

    A value is a mode (checked here) or an MTA-STS policy file (any text with a newline or a
    colon; the stack parses it with ``roundtrip.protocols.tlspolicy.parse_policy``).

    Raises:
        ConfigError: a bad domain, or a value that is neither a mode nor a policy file.
    """
    pairs = value.items() if isinstance(value, Mapping) else value
    out: dict[str, str] = {}
    for domain, policy in pairs:
        name = str(domain).strip().rstrip(".").lower()
        if not _DOMAIN_RE.match(name):
            raise ConfigError(f"relay_tls: {domain!r} is not a domain name")
        text = str(policy).strip()
        if "\n" not in text and ":" not in text and text not in _RELAY_TLS_MODES:
            raise ConfigError(
                f"relay_tls[{name!r}]={policy!r}: choose one of {', '.join(_RELAY_TLS_MODES)}"
                " or give an MTA-STS policy file"
            )
        out[name] = text if text in _RELAY_TLS_MODES else str(policy)
    return tuple(sorted(out.items()))


_DMARC_POLICIES = ("none", "quarantine", "reject")


def parse_dmarc_policy(
    value: Mapping[str, str] | Iterable[tuple[str, str]],
) -> tuple[tuple[str, str], ...]:
    """Normalise ``StackConfig.dmarc_policy``: lower-case domains (or ``*``), sorted, a
    policy word in lower case or a whole record (starting ``v=DMARC1``) as given.

    Raises:
        ConfigError: a bad domain, or a value that is neither a policy nor a record.
    """
    pairs = value.items() if isinstance(value, Mapping) else value
    out: dict[str, str] = {}
    for domain, policy in pairs:
        name = str(domain).strip().rstrip(".").lower()
        if name != "*" and not _DOMAIN_RE.match(name):
            raise ConfigError(f"dmarc_policy: {domain!r} is not a domain name")
        text = str(policy).strip()
        if text.lower() in _DMARC_POLICIES:
            text = text.lower()
        elif not text.startswith("v=DMARC1"):
            raise ConfigError(
                f"dmarc_policy[{name!r}]={policy!r}: choose one of "
                f"{', '.join(_DMARC_POLICIES)} or give a record starting 'v=DMARC1'"
            )
        out[name] = text
    return tuple(sorted(out.items()))


def _forwards(
    value: Iterable[Forward], domains: tuple[str, ...], users: tuple[User, ...]
) -> tuple[Forward, ...]:
    """``StackConfig.forwards`` checked: each alias in a stack domain, not a user, once."""
    if isinstance(value, Forward):
        value = (value,)
    forwards = tuple(value)
    seen: set[str] = set()
    mailboxes = {u.address.lower() for u in users}
    for forward in forwards:
        if not isinstance(forward, Forward):
            raise ConfigError(f"forwards: {forward!r} is not a roundtrip.Forward")
        address = forward.address.lower()
        if address.rpartition("@")[2] not in domains:
            raise ConfigError(
                f"forwards: {forward.address!r} is not in a domain of the stack"
                f" ({', '.join(domains)})"
            )
        if address in mailboxes:
            raise ConfigError(f"forwards: {forward.address!r} is a user's mailbox")
        if address in seen:
            raise ConfigError(f"forwards: {forward.address!r} is given twice")
        seen.add(address)
    return forwards


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v for v in re.split(r"[\s,]+", value) if v]
    return [str(v).strip() for v in value if str(v).strip()]


def parse_domains(value: str | Iterable[str]) -> tuple[str, ...]:
    """Parse a domain list (a string separated by commas/whitespace, or an iterable)."""
    out = []
    for item in _as_list(value):
        domain = item.strip().rstrip(".").lower()
        if not _DOMAIN_RE.match(domain):
            raise ConfigError(f"{item!r} is not a valid mail domain (like example.com)")
        out.append(domain)
    return tuple(out)


def parse_user(value: str | User) -> User:
    """Parse ``ADDRESS[:PASSWORD]``; without a password one is generated."""
    if isinstance(value, User):
        return value
    address, sep, password = str(value).partition(":")
    address = address.strip()
    if sep and not password:
        raise ConfigError(f"user {address!r}: empty password after ':'")
    return User(address, password) if sep else User(address)


def parse_port_mode(value: str) -> PortMode:
    """``ephemeral``, ``standard``, or a base port given as digits."""
    text = str(value).strip().lower()
    if text == "ephemeral":
        return "ephemeral"
    if text == "standard":
        return "standard"
    if text.isdigit():
        return int(text)
    raise ConfigError(
        f"ports={value!r}: choose one of {', '.join(_PORT_MODES)}, or a base port such as 10000"
    )


def _check_base_port(base: int, domains: int) -> None:
    highest = base + (domains - 1) * PORT_STRIDE + 995
    if base < 1024 or highest > 65535:
        raise ConfigError(
            f"ports={base}: a base port must be from 1024 up, and base + 995 + 1000 per extra"
            f" domain at most 65535 (here {highest}); 10000 gives 10025, 10465, 10587, ..."
        )


def parse_tls_mode(value: str) -> TLSMode:
    text = str(value).strip().lower()
    if text == "starttls":
        return "starttls"
    if text == "implicit":
        return "implicit"
    if text == "both":
        return "both"
    raise ConfigError(f"tls={value!r}: choose one of {', '.join(_TLS_MODES)}")


def parse_seconds(value: str | float, name: str = "timeout") -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected a number of seconds") from None
    if not seconds > 0:
        raise ConfigError(f"{name}={value!r}: must be greater than 0")
    return seconds


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{value!r}: expected true or false")


# Probe targets (issue: validate real mail servers). URL scheme -> (protocol, tls, default port).
_SCHEMES: dict[str, tuple[str, str, int]] = {
    "smtps": ("smtp", "implicit", 465),
    "smtp": ("smtp", "starttls", 587),
    "imaps": ("imap", "implicit", 993),
    "imap": ("imap", "starttls", 143),
    "pop3s": ("pop3", "implicit", 995),
    "pop3": ("pop3", "starttls", 110),
}
#: Environment variables that hold the password for each protocol; never argv, never printed.
PASSWORD_ENV = {
    "smtp": "ROUNDTRIP_SMTP_PASSWORD",
    "imap": "ROUNDTRIP_IMAP_PASSWORD",
    "pop3": "ROUNDTRIP_POP3_PASSWORD",
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A server a probe talks to: protocol, TLS flavour, address and credentials.

    ``server_name`` is the name the certificate must match (the host by default).
    """

    protocol: str
    tls: str
    host: str
    port: int
    user: str = ""
    password: str = field(default="", repr=False)
    server_name: str = ""

    def __post_init__(self) -> None:
        if not self.server_name:
            object.__setattr__(self, "server_name", self.host)

    @property
    def scheme(self) -> str:
        for scheme, (protocol, tls, _) in _SCHEMES.items():
            if protocol == self.protocol and tls == self.tls:
                return scheme
        raise ConfigError(f"no URL scheme for {self.protocol}/{self.tls}")

    @property
    def url(self) -> str:
        """The URL without any password."""
        user = _url_quote(self.user) + "@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _url_quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def parse_host_port(
    text: str, *, default_port: int, option: str, hint: str = ""
) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT`` of a command-line option -> ``(host, port)``.

    Raises:
        ConfigError: an empty host or a port outside 1-65535, naming ``option``.
    """
    host, port = text.strip(), str(default_port)
    if host.startswith("["):
        inner, _, rest = host[1:].partition("]")
        host, port = inner, rest[1:] if rest.startswith(":") else port
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {text!r}: expected HOST or HOST:PORT{hint}")
    return host, int(port)


def parse_endpoint(
    url: str,
    *,
    expect: str | None = None,
    env: Mapping[str, str] | None = None,
    password: str | None = None,
    server_name: str = "",
) -> Endpoint:
    """Parse ``smtps://USER@HOST[:PORT]`` (and smtp, imaps, imap, pop3s, pop3).

    The user is percent-decoded (``%40`` for ``@``). The password comes from ``password`` or
    from the protocol's environment variable (``ROUNDTRIP_SMTP_PASSWORD`` ...), never from
    the URL.

    Raises:
        ConfigError: bad scheme, a password in the URL, a bad port, or the wrong protocol.
    """
    import os
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(url.strip())
        port_value = parts.port
    except ValueError as exc:
        raise ConfigError(f"{url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigError(f"{url!r}: unknown scheme {scheme!r}; use one of {', '.join(_SCHEMES)}")
    protocol, tls, default_port = _SCHEMES[scheme]
    if expect is not None and protocol != expect:
        choices = ", ".join(s for s, v in _SCHEMES.items() if v[0] == expect)
        raise ConfigError(f"{url!r}: expected a {expect.upper()} URL ({choices})")
    if parts.password is not None:
        raise ConfigError(
            f"{scheme}://...: put no password in the URL; set {PASSWORD_ENV[protocol]} instead"
        )
    if not parts.hostname:
        raise ConfigError(f"{url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{url!r}: unexpected path or query after the host")
    environ = os.environ if env is None else env
    secret = password if password is not None else environ.get(PASSWORD_ENV[protocol], "")
    return Endpoint(
        protocol=protocol,
        tls=tls,
        host=parts.hostname,
        port=port_value or default_port,
        user=unquote(parts.username or ""),
        password=secret,
        server_name=server_name,
    )
