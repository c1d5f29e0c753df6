"""Interop leftovers of issue #13: the IPv6 address literal in Received, the DNS server on
every host of a dual stack, the certificate a no-SNI client gets over ::1, and the POP3 AUTH
user in transcripts.

Everything runs on loopback with real clients (smtplib, dnspython, ssl, poplib). The IPv6
tests skip where ::1 cannot be bound (a container without IPv6).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
from _support import make_message

from roundtrip import MailStack, StackConfig
from roundtrip.certs import CertificateAuthority
from roundtrip.errors import ServerStartError
from roundtrip.protocols._imapmailbox import list_lines
from roundtrip.protocols.dns import build_zone, default_records
from roundtrip.servers._runner import LoopThread
from roundtrip.servers.dns import start_dns
from roundtrip.stack import Transcript
from roundtrip.stack._auth import peer_address
from roundtrip.store import Mailboxes, Store

TIMEOUT = 10.0
LSUB_USER = "lsub@example.com"


def _ipv6_loopback() -> str | None:
    """Why ::1 is unusable here, or None when a socket can bind it."""
    if not socket.has_ipv6:
        return "this Python has no IPv6 support (socket.has_ipv6 is False)"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        return f"cannot bind ::1 on this machine: {exc}"
    return None


_NO_IPV6 = _ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(_NO_IPV6 is not None, reason=_NO_IPV6 or "")


@pytest.fixture(scope="module")
def dual_stack() -> Iterator[MailStack]:
    """Every listener on 127.0.0.1 and on ::1, one port per service."""
    if _NO_IPV6 is not None:
        pytest.skip(_NO_IPV6)
    with MailStack(StackConfig(extra_hosts=("::1",), sender_auth=True)) as stack:
        yield stack


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Iterator[None]:
    stack = request.getfixturevalue("dual_stack") if "dual_stack" in request.fixturenames else None
    if stack is not None:
        stack.reset()
    yield
    if stack is not None:
        stack.check()


def _mx_hop(stack: MailStack, host: str, subject: str) -> str:
    """Hand a message to example.org's MX over ``host`` and return the Received field the MX
    wrote (unfolded)."""
    rcpt = stack.user("example.org").address
    port = stack.domains["example.org"].ports["smtp"]
    raw = make_message(sender="someone@elsewhere.test", recipient=rcpt, subject=subject)
    with smtplib.SMTP(host, port, timeout=TIMEOUT, local_hostname="client.test") as smtp:
        smtp.sendmail("someone@elsewhere.test", [rcpt], raw)
    got = stack.wait_for(rcpt, subject=subject, timeout=TIMEOUT)
    return " ".join(got.headers.get_all("Received")[0].split())


# -- 1. Received: the IPv6 address literal (RFC 5321 section 4.1.3) ---------------------------


@needs_ipv6
def test_received_ipv6_peer_is_written_as_an_ipv6_address_literal(dual_stack: MailStack) -> None:
    hop = _mx_hop(dual_stack, "::1", "mx over v6")
    assert hop.startswith("from client.test ([IPv6:::1])"), hop
    # The parsed chain still finds every clause after the literal.
    got = dual_stack.wait_for(dual_stack.user("example.org").address, subject="mx over v6")
    assert got.received_chain[0].from_ == "client.test"
    assert got.received_chain[0].by == "mail.example.org"


@needs_ipv6
def test_received_ipv4_peer_keeps_the_plain_literal(dual_stack: MailStack) -> None:
    """The twin: an IPv4 peer's literal has no tag."""
    hop = _mx_hop(dual_stack, "127.0.0.1", "mx over v4")
    assert hop.startswith("from client.test ([127.0.0.1])"), hop
    assert "IPv6:" not in hop


def test_received_peer_address_reads_both_literal_forms() -> None:
    """SPF reads the connecting address back from the top Received field: the tagged IPv6
    literal (in any case), the plain IPv4 one, and the untagged IPv6 one older stacks wrote."""
    assert peer_address(b"Received: from h ([IPv6:::1])\r\n") == "::1"
    assert peer_address(b"Received: from h ([ipv6:2001:db8::5])\r\n") == "2001:db8::5"
    assert peer_address(b"Received: from h ([127.0.0.1])\r\n") == "127.0.0.1"
    assert peer_address(b"Received: from h ([::1])\r\n") == "::1"
    # The twin: no literal, another tag, or a literal not in the top field: no address.
    assert peer_address(b"Received: from h (h.example)\r\n") is None
    assert peer_address(b"Received: from h ([IPv7:::1])\r\n") is None
    assert peer_address(b"X-Other: 1\r\nReceived: from h ([127.0.0.1])\r\n") is None


# -- 2. LSUB answers from the subscription list it is given ------------------------------------


def _boxes_with_stale_list() -> Mailboxes:
    """One subscribed mailbox, one not, and a list of names that disagrees with both."""
    store = Store()
    store.add_user(LSUB_USER, "pw")
    store.create_mailbox(LSUB_USER, "kept")
    store.create_mailbox(LSUB_USER, "dropped")
    store.subscribe(LSUB_USER, "kept", True)
    store.subscribe(LSUB_USER, "dropped", False)
    boxes = store.mailboxes(LSUB_USER)
    return Mailboxes(boxes, ["dropped", "stale/name"])


def test_imap_lsub_without_a_list_uses_the_mailboxes_own_flags() -> None:
    """No list given: the mailboxes' ``subscribed`` decide, not a ``subscriptions``
    attribute the sequence happens to carry (the IMAP machine always passes the list)."""
    lines = list_lines(_boxes_with_stale_list(), "", "*", lsub=True, special_only=False)
    assert b'* LSUB () "/" "kept"' in lines, lines
    assert not any(b"dropped" in line or b"stale" in line for line in lines), lines


def test_imap_lsub_with_a_list_answers_from_it() -> None:
    """The twin: the list the machine passes is what LSUB shows, names without a mailbox
    included (RFC 3501 6.3.6)."""
    boxes = _boxes_with_stale_list()
    lines = list_lines(
        boxes, "", "*", lsub=True, special_only=False, subscriptions=["kept", "stale/name"]
    )
    assert b'* LSUB () "/" "kept"' in lines, lines
    assert b'* LSUB (\\Noselect) "/" "stale/name"' in lines, lines
    assert not any(b"dropped" in line for line in lines), lines


# -- 3. DNS on every host of a dual stack --------------------------------------------------


def _dns_ask(host: str, port: int, name: str, rdtype: str, *, tcp: bool) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(query, host, port=port, timeout=TIMEOUT)
    return dns.query.udp(query, host, port=port, timeout=TIMEOUT)


def _texts(reply: dns.message.Message) -> list[str]:
    return [rdata.to_text() for rrset in reply.answer for rdata in rrset]


@needs_ipv6
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_dns_dual_stack_answers_on_every_host(dual_stack: MailStack, host: str, tcp: bool) -> None:
    assert dual_stack.dns is not None
    assert dual_stack.dns.hosts == ("127.0.0.1", "::1")
    port = dual_stack.dns.port
    assert _texts(_dns_ask(host, port, "mail.example.org", "AAAA", tcp=tcp)) == ["::1"]
    assert _texts(_dns_ask(host, port, "mail.example.org", "A", tcp=tcp)) == ["127.0.0.1"]
    # A name in no zone gets the world's answer on every address too.
    missing = _dns_ask(host, port, "no-such-domain.invalid", "MX", tcp=tcp)
    assert missing.rcode() == dns.rcode.NXDOMAIN


@needs_ipv6
def test_dns_single_host_stack_listens_on_its_host_only() -> None:
    """The twin: without extra hosts, nothing of the DNS listens on ::1."""
    with MailStack(StackConfig()) as stack:
        assert stack.dns is not None and stack.dns.hosts == ("127.0.0.1",)
        port = stack.dns.port
        assert _texts(_dns_ask("127.0.0.1", port, "mail.example.org", "A", tcp=True))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("::1", port), timeout=TIMEOUT).close()
        stack.check()


# -- 4. a no-SNI client gets a leaf whose CN is the address it dialled -------------------------


def _peer_cn(stack: MailStack, host: str, service: str, *, sni: str | None) -> str:
    """The subject CN of the leaf ``service`` of example.org presents on ``host``, verified
    against the stack's CA, with ``sni`` as the server name (None: no SNI extension)."""
    context = stack.client_context()
    if sni is None:
        context.check_hostname = False  # no name to check: the chain is still verified
    port = stack.domains["example.org"].ports[service]
    with (
        socket.create_connection((host, port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        cert = tls.getpeercert()
    assert cert, "no verified peer certificate"
    subject = dict(pair for rdn in cert["subject"] for pair in rdn)
    return str(subject["commonName"])


@needs_ipv6
@pytest.mark.parametrize("service", ["imaps", "pop3s", "submissions"])
def test_certs_no_sni_client_on_v6_sees_the_v6_address_as_cn(
    dual_stack: MailStack, service: str
) -> None:
    assert _peer_cn(dual_stack, "::1", service, sni=None) == "::1"


@needs_ipv6
@pytest.mark.parametrize("service", ["imaps", "pop3s", "submissions"])
def test_certs_no_sni_client_on_v4_and_named_client_keep_their_cn(
    dual_stack: MailStack, service: str
) -> None:
    """The twin: over 127.0.0.1 the CN stays 127.0.0.1, and a client that sends the host
    name gets the name on either family."""
    assert _peer_cn(dual_stack, "127.0.0.1", service, sni=None) == "127.0.0.1"
    for host in ("127.0.0.1", "::1"):
        assert _peer_cn(dual_stack, host, service, sni="mail.example.org") == "mail.example.org"


def _mbsync_over_v6(stack: MailStack, home: Path, ca_file: str) -> subprocess.CompletedProcess[str]:
    """mbsync (isync) syncing example.org's INBOX over IMAPS at ::1, trusting ``ca_file``
    only. mbsync 1.4 matches the certificate's CN and DNS names, never its IP entries."""
    program = shutil.which("mbsync")
    if program is None:
        pytest.skip("mbsync not installed (Debian package isync)")
    rcpt = stack.user("example.org")
    maildir = home / "Mail"
    maildir.mkdir(exist_ok=True)
    rc = home / "mbsyncrc"
    rc.write_text(
        "IMAPAccount remote\nHost ::1\n"
        f"Port {stack.domains['example.org'].ports['imaps']}\n"
        f'User "{rcpt.address}"\nPass "{rcpt.password}"\n'
        "SSLType IMAPS\nSSLVersions TLSv1.2 TLSv1.3\n"
        f"CertificateFile {ca_file}\nSystemCertificates no\nAuthMechs PLAIN LOGIN\nTimeout 20\n\n"
        "IMAPStore remote\nAccount remote\n\n"
        f"MaildirStore local\nPath {maildir}/\nInbox {maildir}/INBOX\n\n"
        "Channel inbox\nFar :remote:INBOX\nNear :local:INBOX\n"
        "Create Near\nSync Pull\nSyncState *\n"
    )
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    return subprocess.run(
        [program, "-V", "-c", str(rc), "inbox"],
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60.0,
        check=False,
        cwd=home,
    )


def _maildir_messages(home: Path) -> list[Path]:
    inbox = home / "Mail" / "INBOX"
    return [p for sub in ("new", "cur") for p in (inbox / sub).glob("*") if p.is_file()]


@needs_ipv6
def test_certs_mbsync_syncs_over_v6(dual_stack: MailStack, tmp_path: Path) -> None:
    _mx_hop(dual_stack, "::1", "for mbsync over v6")
    proc = _mbsync_over_v6(dual_stack, tmp_path, dual_stack.ca_file)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    (message,) = _maildir_messages(tmp_path)
    assert b"Subject: for mbsync over v6" in message.read_bytes()


@needs_ipv6
def test_certs_mbsync_over_v6_refuses_another_ca(dual_stack: MailStack, tmp_path: Path) -> None:
    """The twin: verification stays on; a CA that did not sign the leaf fails the sync."""
    other = tmp_path / "other-ca.pem"
    other.write_bytes(CertificateAuthority().pem)
    proc = _mbsync_over_v6(dual_stack, tmp_path, str(other))
    assert proc.returncode != 0
    assert "certificate" in (proc.stdout + proc.stderr).lower(), proc.stderr
    assert _maildir_messages(tmp_path) == []


def _offlineimap_over_v6(stack: MailStack, home: Path, ca_file: str) -> tuple[str, list[Path]]:
    """One offlineimap3 run (read-only, once) over IMAPS at ::1 trusting ``ca_file`` only;
    its output and the messages it wrote. Its TLS (Python's ssl) sends no SNI for an
    address, and it matches the CN and DNS names, never the IP entries."""
    program = shutil.which("offlineimap")
    if program is None:
        pytest.skip("offlineimap not installed (Debian package offlineimap3)")
    rcpt = stack.user("example.org")
    maildir = home / "Mail"
    rc = home / "offlineimaprc"
    rc.write_text(
        "[general]\naccounts = test\n"
        f"metadata = {home / 'metadata'}\n\n"
        "[Account test]\nlocalrepository = local\nremoterepository = remote\n\n"
        f"[Repository local]\ntype = Maildir\nlocalfolders = {maildir}\n\n"
        "[Repository remote]\ntype = IMAP\n"
        f"remotehost = ::1\nremoteport = {stack.domains['example.org'].ports['imaps']}\n"
        f"remoteuser = {rcpt.address}\nremotepass = {rcpt.password}\n"
        f"ssl = yes\nstarttls = no\nsslcacertfile = {ca_file}\n"
        "tls_level = tls_secure\nssl_version = tls1_2\n"
        "folderfilter = lambda name: name == 'INBOX'\n"
        "readonly = True\ntimeout = 20\nmaxconnections = 1\n"
    )
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    proc = subprocess.run(
        [program, "-c", str(rc), "-o", "-u", "basic"],
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60.0,
        check=False,
        cwd=home,
    )
    inbox = maildir / "INBOX"
    found = [p for sub in ("new", "cur") for p in (inbox / sub).glob("*") if p.is_file()]
    return f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}", found


@needs_ipv6
def test_certs_offlineimap_syncs_over_v6(dual_stack: MailStack, tmp_path: Path) -> None:
    _mx_hop(dual_stack, "::1", "for offlineimap over v6")
    out, found = _offlineimap_over_v6(dual_stack, tmp_path, dual_stack.ca_file)
    assert out.startswith("exit 0\n"), out
    (message,) = found
    assert b"Subject: for offlineimap over v6" in message.read_bytes()


@needs_ipv6
def test_certs_offlineimap_over_v6_refuses_another_ca(
    dual_stack: MailStack, tmp_path: Path
) -> None:
    """The twin: a CA that did not sign the leaf fails the sync over ::1."""
    _mx_hop(dual_stack, "::1", "not for offlineimap")
    other = tmp_path / "other-ca.pem"
    other.write_bytes(CertificateAuthority().pem)
    out, found = _offlineimap_over_v6(dual_stack, tmp_path, str(other))
    assert not out.startswith("exit 0\n"), out
    assert "certificate" in out.lower() or "verif" in out.lower(), out
    assert found == []


# -- 5. a POP3 AUTH login is named in its transcript ----------------------------------------


@pytest.fixture(scope="module")
def recording_stack() -> Iterator[MailStack]:
    with MailStack(StackConfig(transcript_connections=20)) as stack:
        yield stack


def _pop3_auth(stack: MailStack, mechanism: str, payload: str) -> bytes:
    """``AUTH <mechanism> <payload>`` on example.com's POP3S, then QUIT; the AUTH reply."""
    host, port = stack.endpoints("example.com").address("pop3s")
    with (
        socket.create_connection((host, port), timeout=TIMEOUT) as raw,
        stack.client_context().wrap_socket(raw, server_hostname="mail.example.com") as tls,
        tls.makefile("rb") as reader,
    ):
        assert reader.readline().startswith(b"+OK")
        tls.sendall(f"AUTH {mechanism} {payload}\r\n".encode())
        reply = reader.readline()
        tls.sendall(b"QUIT\r\n")
        reader.readline()
    return reply


def _pop3_transcript(stack: MailStack) -> Transcript:
    """The one POP3S transcript, once the server has noted the close (on its loop)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        found = stack.transcripts(service="pop3s")
        if found and any(line.text == "connection closed" for line in found[0].lines):
            (transcript,) = found
            return transcript
        assert time.monotonic() < deadline, [str(t) for t in found]
        stack.relay_idle(timeout=TIMEOUT)  # a round trip to the loop thread


@pytest.mark.parametrize("mechanism", ["PLAIN", "XOAUTH2"])
def test_transcripts_pop3_auth_login_names_the_user(
    recording_stack: MailStack, mechanism: str
) -> None:
    recording_stack.reset()
    user = recording_stack.user("example.com")
    if mechanism == "PLAIN":
        payload = _b64(f"\0{user.address}\0{user.password}")
    else:
        token = recording_stack.oauth_token(user)
        payload = _b64(f"user={user.address}\1auth=Bearer {token}\1\1")
    assert _pop3_auth(recording_stack, mechanism, payload).startswith(b"+OK")
    transcript = _pop3_transcript(recording_stack)
    assert transcript.addresses == [user.address]
    assert f"== authenticated as {user.address}" in str(transcript)
    assert payload not in str(transcript)
    recording_stack.check()


def test_transcripts_pop3_failed_auth_names_no_user(recording_stack: MailStack) -> None:
    """The twin: a refused AUTH leaves no "authenticated as" note and names nobody (the
    payload, which carries the name, is redacted)."""
    recording_stack.reset()
    user = recording_stack.user("example.com")
    payload = _b64(f"\0{user.address}\0wrong-password")
    assert _pop3_auth(recording_stack, "PLAIN", payload).startswith(b"-ERR")
    transcript = _pop3_transcript(recording_stack)
    assert transcript.addresses == []
    assert "authenticated as" not in str(transcript)
    recording_stack.check()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- 6. the docs name the relay's plaintext fallback after a failed handshake --------------


ROOT = Path(__file__).resolve().parent.parent
_CITED = re.compile(r"`(tests/[\w/]+\.py)?(?:::(test_\w+))?`")


def _missing_tests(text: str) -> list[str]:
    """The ``tests/<file>.py::test_name`` citations in ``text`` (a bare ``::test_name`` is in
    the file cited last) that name no test function of that file."""
    missing = []
    current = ""
    for match in _CITED.finditer(text):
        current = match.group(1) or current
        if match.group(2) is None:
            continue
        source = (ROOT / current).read_text(encoding="utf-8") if current else ""
        if not re.search(rf"^def {match.group(2)}\(", source, re.MULTILINE):
            missing.append(f"{current}::{match.group(2)}")
    return missing


def _a37_row() -> str:
    rows = (ROOT / "docs" / "security.md").read_text(encoding="utf-8").splitlines()
    (row,) = [line for line in rows if line.startswith("| A3.7 ")]
    return row


def test_docs_a37_names_the_handshake_fallback_and_its_tests() -> None:
    row = _a37_row()
    assert "handshake_fallback" in row
    assert "tests/test_relay_tls_fallback.py::" in row
    assert "plaintext" in row.partition("handshake_fallback")[2]
    assert _missing_tests(row) == []
    step3 = (ROOT / "roundtrip" / "servers" / "relay.py").read_text(encoding="utf-8")
    step3 = step3.partition("\n3. ")[2].partition("\n4. ")[0]
    assert "handshake_fallback" in step3 and "new connection" in step3


def test_docs_citation_check_catches_a_test_that_does_not_exist() -> None:
    """The twin: the citation check is not vacuous."""
    row = _a37_row() + " `tests/test_relay_tls_fallback.py::test_no_such_test` `::test_nor_this`"
    assert _missing_tests(row) == [
        "tests/test_relay_tls_fallback.py::test_no_such_test",
        "tests/test_relay_tls_fallback.py::test_nor_this",
    ]


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


@needs_ipv6
def test_dns_server_on_two_hosts_shares_one_port(loop_thread: LoopThread) -> None:
    server = loop_thread.run(
        start_dns(
            build_zone(default_records("example.org", "127.0.0.1")),
            host="127.0.0.1",
            extra_hosts=("::1", "127.0.0.1"),  # a repeat of the first host is dropped
            on_error=loop_thread.record_error,
        ),
        TIMEOUT,
    )
    try:
        assert server.hosts == ("127.0.0.1", "::1")
        for host in server.hosts:
            for tcp in (False, True):
                reply = _dns_ask(host, server.port, "example.org", "MX", tcp=tcp)
                assert reply.rcode() == dns.rcode.NOERROR and _texts(reply), (host, tcp)
    finally:
        loop_thread.run(server.close(), TIMEOUT)
    assert loop_thread.take_errors() == []


def _own_sockets_on(port: int) -> list[str]:
    """The sockets of this process bound to ``port`` on any address, as ``proto:address``.

    Reads /proc/net (the kernel's socket tables, with inodes) and /proc/self/fd (this
    process's descriptors), so a socket of another process with the same port does not count.
    """
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to list this process's sockets")
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed since listdir
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, inode = fields[1], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                found.append(f"{proto}:{local}")
    return found


@needs_ipv6
def test_dns_server_fixed_port_taken_on_the_extra_host_is_a_start_error(
    loop_thread: LoopThread,
) -> None:
    """The twin: a fixed port another socket holds on ::1 fails the start, names ::1, and
    leaves nothing bound on the first host."""
    # The port is chosen free on ::1 only; another test process may hold it on 127.0.0.1
    # (its own listener or client connection), and the start then fails on the first host,
    # which is not the case under test: a new port is chosen.
    for _ in range(20):
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as holder:
            holder.bind(("::1", 0))
            port = holder.getsockname()[1]
            # The check below sees a socket this process holds: the holder itself.
            assert [found.split(":")[0] for found in _own_sockets_on(port)] == ["udp6"]
            with pytest.raises(ServerStartError) as failed:
                loop_thread.run(
                    start_dns(
                        build_zone(default_records("example.org", "127.0.0.1")),
                        host="127.0.0.1",
                        port=port,
                        extra_hosts=("::1",),
                        on_error=loop_thread.record_error,
                    ),
                    TIMEOUT,
                )
        if f"127.0.0.1:{port}" not in str(failed.value):
            break
    assert "::1" in str(failed.value), failed.value
    # The first host's UDP and TCP listeners were closed again. Binding the port to find out
    # is not proof: another test process's client connection may own that port number.
    assert _own_sockets_on(port) == []
