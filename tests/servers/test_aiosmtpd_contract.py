"""The aiosmtpd internals roundtrip's SMTP session relies on, pinned by name.

``roundtrip/servers/_smtpsession.py`` subclasses aiosmtpd's ``SMTP`` and overrides or reads a
few of its private names (listed in that module's docstring). pyproject.toml pins the aiosmtpd
versions CI tests; when a new aiosmtpd renames or reshapes one of these names, a test here
fails and its message names the hook and the place that depends on it.

Two kinds of test:

- contract: the hook exists on aiosmtpd's ``SMTP`` with the signature we override or call,
  and aiosmtpd still calls or reads it where we rely on that (checked in its source, which is
  cheap and names the call site);
- twin, over a real socket: our override is the one aiosmtpd actually runs, shown by a reply
  that only our override produces.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from _support import RawSMTPClient, SMTPListeners
from aiosmtpd.smtp import SMTP

from roundtrip.certs import CertificateAuthority
from roundtrip.config import SMTPLimits
from roundtrip.protocols.smtp import Reply, Role
from roundtrip.servers._smtpsession import SMTPSession
from roundtrip.servers.smtp import Accepted
from roundtrip.store import Store

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 5.0
USER = "user@example.com"
PASSWORD = "correct horse battery"
WHERE = "roundtrip/servers/_smtpsession.py"


@dataclass(frozen=True)
class Hook:
    """One aiosmtpd method we override or call, and why."""

    name: str
    params: tuple[str, ...]
    coroutine: bool
    use: str


HOOKS = [
    Hook(
        "_handle_client",
        ("self",),
        True,
        "SMTPSession._handle_client refuses clients over a connection cap and pregreeters "
        "before the banner",
    ),
    Hook(
        "_call_handler_hook",
        ("self", "command", "args"),
        True,
        "SMTPSession._call_handler_hook keeps a closing session from reaching the handler",
    ),
    Hook(
        "_getaddr",
        ("self", "arg"),
        False,
        "SMTPSession._getaddr: the fast path for plain paths and no crash on malformed ones",
    ),
    Hook(
        "_cb_client_connected",
        ("self", "reader", "writer"),
        False,
        "it sets _reader/_writer, which SMTPSession reads for DATA, AUTH lines and replies",
    ),
    Hook(
        "challenge_auth",
        ("self", "challenge", "encode_to_b64", "log_client_response"),
        True,
        "SMTPSession.challenge_auth: the SASL step without logging client data",
    ),
    Hook("push", ("self", "status"), True, "SMTPSession.push: enhanced codes, deadlines"),
    Hook("check_helo_needed", ("self", "helo"), True, "SMTPSession.smtp_DATA calls it"),
    Hook("check_auth_needed", ("self", "caller_method"), True, "SMTPSession.smtp_DATA calls it"),
    Hook("auth_PLAIN", ("self", "_", "args"), True, "SMTPSession.auth_PLAIN: RFC 4616 authzid"),
    Hook("smtp_DATA", ("self", "arg"), True, "SMTPSession.smtp_DATA: one buffer per message"),
    Hook("smtp_AUTH", ("self", "arg"), True, "SMTPSession.smtp_AUTH: penalties and caps"),
    Hook("smtp_EHLO", ("self", "hostname"), True, "SMTPSession.smtp_EHLO: name checks"),
    Hook("smtp_HELO", ("self", "hostname"), True, "SMTPSession.smtp_HELO: name checks"),
    Hook("eof_received", ("self",), False, "SMTPSession.eof_received frees the client's slot"),
    Hook(
        "smtp_STARTTLS",
        ("self", "arg"),
        True,
        "SMTPSession.smtp_STARTTLS: the handshake through loop.start_tls (its 501/454 kept)",
    ),
    Hook("_set_rset_state", ("self",), False, "SMTPSession.smtp_STARTTLS resets the state"),
    Hook("_create_session", ("self",), False, "SMTPSession.smtp_STARTTLS: a new session"),
    Hook("_reset_timeout", ("self", "duration"), False, "SMTPSession.smtp_STARTTLS calls it"),
]


@pytest.mark.parametrize("hook", HOOKS, ids=[h.name for h in HOOKS])
def test_aiosmtpd_hook_keeps_its_signature(hook: Hook) -> None:
    method = getattr(SMTP, hook.name, None)
    assert method is not None, (
        f"aiosmtpd.smtp.SMTP.{hook.name} is gone; {WHERE} relies on it: {hook.use}"
    )
    params = tuple(inspect.signature(method).parameters)
    assert params == hook.params, (
        f"aiosmtpd.smtp.SMTP.{hook.name} now takes {params}, expected {hook.params}; "
        f"{WHERE} relies on it: {hook.use}"
    )
    assert inspect.iscoroutinefunction(method) is hook.coroutine, (
        f"aiosmtpd.smtp.SMTP.{hook.name} is {'no longer' if hook.coroutine else 'now'} a "
        f"coroutine function; {WHERE} relies on it: {hook.use}"
    )


#: (aiosmtpd method, code it must still contain, what of ours depends on it)
CALL_SITES = [
    ("_handle_client", "self._smtp_methods.get(command)", "_Commands routes unknown verbs"),
    ("_handle_client", "await self.push('220 ", "SMTPSession._handle_client: the banner"),
    ("smtp_MAIL", "self._call_handler_hook(", "SMTPSession._call_handler_hook's closing guard"),
    ("smtp_RCPT", "self._call_handler_hook(", "SMTPSession._call_handler_hook's closing guard"),
    ("smtp_MAIL", "self._getaddr(", "SMTPSession._getaddr parses MAIL paths"),
    ("smtp_RCPT", "self._getaddr(", "SMTPSession._getaddr parses RCPT paths"),
    ("smtp_EHLO", "self._tls_protocol", "implicit TLS sets _tls_protocol to offer AUTH"),
    ("smtp_AUTH", "self._tls_protocol", "implicit TLS sets _tls_protocol to accept AUTH"),
    ("__init__", "for m in dir(self)", "SMTPSession.__dir__ lists only the smtp_* verbs"),
    ("__init__", "inspect.getmembers(obj)", "SMTPSession.__dir__ lists only the auth_* methods"),
    ("_cb_client_connected", "self._reader = reader", "SMTPSession reads _reader"),
    ("_cb_client_connected", "self._writer = writer", "SMTPSession writes with _writer"),
    # SMTPSession.smtp_STARTTLS leaves the state aiosmtpd's own STARTTLS and connection_made
    # would: these are the names that state is read under.
    ("connection_made", "self.session.ssl = ", "smtp_STARTTLS sets session.ssl likewise"),
    ("connection_made", 'self._handle_hooks.get("STARTTLS")', "smtp_STARTTLS runs the hook"),
    ("connection_made", "self._tls_handshake_okay", "smtp_STARTTLS sets it from the hook"),
    ("connection_lost", "self._original_transport.close()", "smtp_STARTTLS sets it"),
    ("_handle_client", "self._tls_handshake_okay", "smtp_STARTTLS sets it from the hook"),
    ("_handle_client", "TLSSetupException", "smtp_STARTTLS raises it on a failed handshake"),
]


@pytest.mark.parametrize(
    ("method", "code", "use"), CALL_SITES, ids=[f"{m}:{c}" for m, c, _ in CALL_SITES]
)
def test_aiosmtpd_call_site_still_there(method: str, code: str, use: str) -> None:
    source = inspect.getsource(getattr(SMTP, method))
    assert code in source, (
        f"aiosmtpd.smtp.SMTP.{method} no longer contains {code!r}; {WHERE}: {use}"
    )


def test_aiosmtpd_instance_attributes_we_read_exist() -> None:
    """The private attributes we read or replace are set by aiosmtpd's ``__init__``."""
    loop = asyncio.new_event_loop()
    try:
        server = SMTP(object(), loop=loop)
        state = vars(server)
        for name, expected, use in [
            ("_smtp_methods", dict, "replaced by _Commands (unknown verbs, closing)"),
            ("_tls_protocol", type(None), "set on implicit TLS (AUTH offered)"),
        ]:
            assert name in state, f"aiosmtpd SMTP() no longer sets {name}; {WHERE}: {use}"
            assert type(state[name]) is expected, (
                f"aiosmtpd SMTP().{name} is a {type(state[name]).__name__}, expected "
                f"{expected.__name__}; {WHERE}: {use}"
            )
        assert {"DATA", "AUTH", "EHLO", "MAIL", "RCPT"} <= set(server._smtp_methods)
        assert server._getaddr("<a@b.example> SIZE=1") == ("a@b.example", "SIZE=1"), (
            f"aiosmtpd's _getaddr changed its result shape; {WHERE}: SMTPSession._getaddr "
            "returns the same (address, rest) pair from its fast path"
        )
        for name in ("line_length_limit", "command_size_limit", "local_part_limit"):
            assert isinstance(getattr(SMTP, name, None), int), (
                f"aiosmtpd SMTP.{name} is no longer an int class attribute; "
                f"{WHERE} sizes it per session"
            )
    finally:
        loop.close()


def test_asyncio_stream_reader_buffer_is_readable() -> None:
    """``SMTPSession._buffered`` peeks at asyncio's StreamReader buffer (private)."""
    loop = asyncio.new_event_loop()
    try:
        reader = asyncio.StreamReader(loop=loop)
        reader.feed_data(b"NOOP\r\nQUIT")
        buffered = getattr(reader, "_buffer", None)
        assert isinstance(buffered, bytearray) and bytes(buffered) == b"NOOP\r\nQUIT", (
            f"asyncio.StreamReader._buffer changed; {WHERE}: SMTPSession._buffered looks for "
            "pipelined commands there"
        )
    finally:
        loop.close()


def test_smtp_session_helpers_shadow_no_aiosmtpd_name() -> None:
    """Our own private helpers must not silently override a new aiosmtpd private name."""
    overrides = {"_handle_client", "_call_handler_hook", "_getaddr"}  # smtp_* are public verbs
    ours = {n for n in vars(SMTPSession) if n.startswith("_") and not n.startswith("__")}
    clashes = sorted(n for n in ours - overrides if hasattr(SMTP, n))
    assert clashes == [], (
        f"aiosmtpd's SMTP now defines {clashes}, which {WHERE} also defines for its own "
        "purpose: rename ours"
    )


def test_smtp_session_call_handler_hook_is_silent_once_closing() -> None:
    """Behaviour of our ``_call_handler_hook`` override, without a socket."""
    session = object.__new__(SMTPSession)  # the guard reads nothing but _closing
    session._closing = True
    assert asyncio.run(session._call_handler_hook("DATA")) == Reply.TIMEOUT


# Twins over a real socket: our override is the one aiosmtpd runs.


@dataclass
class Listeners:
    ports: dict[Role, int]
    ca: CertificateAuthority
    routed: list[Accepted]

    def raw(self, role: Role) -> RawSMTPClient:
        ctx = self.ca.client_context() if role is Role.SUBMISSIONS else None
        return RawSMTPClient(self.ports[role], ctx, reset_is_eof=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture
def listeners(ca: CertificateAuthority) -> Iterator[Listeners]:
    store = Store()
    store.add_user(USER, PASSWORD)
    routed: list[Accepted] = []
    started = SMTPListeners(ca, thread_name="aiosmtpd-contract-loop")
    try:
        ports = started.start(
            Role,
            store=store,
            router=routed.append,
            local_domains=("example.com",),
            max_recipients=10,
            max_message_size=100_000,
            idle_timeout=1.0,
            tls_handshake_timeout=TIMEOUT,
            limits=SMTPLimits(max_connections_per_ip=2),
        )
        yield Listeners(ports, ca, routed)
    finally:
        errors = started.close()
    assert errors == []


def test_handle_client_override_refuses_over_the_cap(listeners: Listeners) -> None:
    with listeners.raw(Role.SMTP) as first, listeners.raw(Role.SMTP) as second:
        assert first.reply()[0].startswith("220 ")
        assert second.reply()[0].startswith("220 ")
        with listeners.raw(Role.SMTP) as third:
            refusal = third.read_to_eof()
        assert refusal.startswith(b"421 4.7.0 Error: too many connections from "), refusal


def test_handle_client_override_lets_a_client_under_the_cap_in(listeners: Listeners) -> None:
    with listeners.raw(Role.SMTP) as client:
        assert client.reply()[0].startswith("220 ")
        assert client.cmd("QUIT") == ["221 Bye"]


def test_smtp_methods_table_routes_unknown_verbs_to_us(listeners: Listeners) -> None:
    with listeners.raw(Role.SMTP) as client:
        client.reply()
        # aiosmtpd's own reply would be '500 Error: command "XYZZY" not recognized'.
        assert client.cmd("XYZZY") == [Reply.UNKNOWN_COMMAND]
        assert client.cmd("NOOP") == ["250 OK"]


def test_getaddr_override_answers_a_broken_path_with_553(listeners: Listeners) -> None:
    with listeners.raw(Role.SMTP) as client:
        client.reply()
        assert client.cmd("HELO client.example")[0].startswith("250")
        # aiosmtpd's parser raises IndexError here: it would answer 500 naming the exception.
        reply = client.cmd("MAIL FROM:<")
        assert reply[0].startswith("553") and "IndexError" not in reply[0]
        assert client.cmd("MAIL FROM:<a@example.com>")[0].startswith("250 ")


def test_deadline_not_aiosmtpd_timer_ends_a_trickled_command(listeners: Listeners) -> None:
    with listeners.raw(Role.SMTP) as client:
        client.reply()
        # Never finished: our command deadline (1 s) passes and says so; aiosmtpd's own
        # timer would have closed without a word.
        client.send(b"NOO")
        assert client.read_to_eof() == (Reply.TIMEOUT + "\r\n").encode()


def test_implicit_tls_offers_and_accepts_auth(listeners: Listeners) -> None:
    with listeners.raw(Role.SUBMISSIONS) as client:
        client.reply()
        ehlo = client.cmd("EHLO client.example")
        assert any(line.startswith("250-AUTH ") for line in ehlo), ehlo
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        assert client.cmd(f"AUTH PLAIN {token}")[0].startswith("235")


def test_plaintext_before_starttls_neither_offers_nor_accepts_auth(listeners: Listeners) -> None:
    with listeners.raw(Role.SUBMISSION) as client:
        client.reply()
        ehlo = client.cmd("EHLO client.example")
        assert not any(line.startswith("250-AUTH") for line in ehlo), ehlo
        assert "250-STARTTLS" in ehlo  # smtp_STARTTLS found through SMTPSession.__dir__
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        assert client.cmd(f"AUTH PLAIN {token}")[0].startswith("538")


def test_implicit_tls_session_records_tls_facts(listeners: Listeners) -> None:
    """The Received line's TLS clause comes from the public transport facts."""
    with listeners.raw(Role.SUBMISSIONS) as client:
        client.reply()
        client.cmd("EHLO client.example")
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        assert client.cmd(f"AUTH PLAIN {token}")[0].startswith("235")
        assert client.cmd(f"MAIL FROM:<{USER}>")[0].startswith("250")
        assert client.cmd(f"RCPT TO:<{USER}>")[0].startswith("250")
        assert client.cmd("DATA")[0].startswith("354")
        reply = client.cmd("Subject: t\r\n\r\nbody\r\n.")
        assert reply[0].startswith("250"), reply
        assert isinstance(client.sock, ssl.SSLSocket)
        version = client.sock.version()
        cipher = client.sock.cipher()
    assert version is not None and cipher is not None
    (accepted,) = listeners.routed
    assert accepted.tls and accepted.authenticated_user == USER
    trace = accepted.message.split(b"\r\n\r\n", 1)[0].decode()
    assert f"(using {version} with cipher {cipher[0]} ({cipher[2]} bits))" in trace, trace
