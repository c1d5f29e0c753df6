"""Real mail clients from Debian retrieve mail from our IMAP and POP3 servers.

Issue "IMAP server that every real client accepts": passing imaplib and poplib proves little,
because they are lenient and we wrote the servers against them. Here the programs people
actually run (mbsync from isync, fetchmail, getmail6, offlineimap3) fetch a message that went
through the whole stack (465 -> relay -> MX -> store), each with certificate verification
against the stack's CA only. Every program that is absent is skipped with the package name.

Which name the programs dial: most tests dial ``localhost``; the ``_by_ip`` ones dial
``127.0.0.1``, what ``roundtrip serve`` prints. mbsync 1.4 and offlineimap3 match the
certificate's Common Name and DNS names only, never its IP address entries, so by IP they need
a leaf whose CN is the address they dialled: the stack presents one to clients that send no
host name in SNI (certs.py ``server_context``). fetchmail with ``sslcertck`` rejects a leaf
without any Common Name ("Server name not specified in certificate!"), so every leaf has one.
"""

from __future__ import annotations

import getpass
import imaplib
import os
import re
import shutil
import smtplib
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from roundtrip.certs import CertificateAuthority
from roundtrip.stack import DeliveredMessage, MailStack

PROGRAM_TIMEOUT = 60.0
NET_TIMEOUT = 10.0
# The names the programs dial; see the module docstring.
SERVER_NAME = "localhost"
SERVER_IP = "127.0.0.1"


# the stack


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    try:
        resolved = {ai[4][0] for ai in socket.getaddrinfo(SERVER_NAME, None, socket.AF_INET)}
    except OSError as exc:
        pytest.skip(f"{SERVER_NAME!r} does not resolve here: {exc}")
    if "127.0.0.1" not in resolved:
        pytest.skip(f"{SERVER_NAME!r} does not resolve to 127.0.0.1 here ({sorted(resolved)})")
    ca = CertificateAuthority()
    with MailStack(ca=ca) as running:
        yield running
    ca.cleanup()


@pytest.fixture
def world(stack: MailStack) -> Iterator[MailStack]:
    """The module's stack, emptied for this test; server-thread errors fail the test."""
    stack.reset()
    yield stack
    stack.check()


@pytest.fixture
def wrong_ca_file(tmp_path: Path) -> str:
    """A PEM of a CA that did not sign the stack's certificates."""
    path = tmp_path / "wrong-ca.pem"
    path.write_bytes(CertificateAuthority().pem)
    return str(path)


# helpers


def require(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} not installed (Debian package {package})")
    return path


def send(stack: MailStack, tag: str = "") -> DeliveredMessage:
    """Submit a distinctive message over 465 from example.com to example.org; wait for it."""
    sender, rcpt = stack.user("example.com"), stack.user("example.org")
    token = tag or uuid.uuid4().hex
    subject = f"client program check {token}"
    body = (
        f"Distinctive body {token}\r\n"
        ".a line that starts with a dot\r\n"
        "..and one with two dots\r\n"
        ".\r\n"
        "trailing spaces stay   \r\n"
        "last line\r\n"
    ).encode()
    raw = (
        f"From: <{sender.address}>\r\nTo: <{rcpt.address}>\r\nSubject: {subject}\r\n\r\n"
    ).encode() + body
    host, port = stack.endpoints("example.com").address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=NET_TIMEOUT) as s:
        s.login(sender.address, sender.password)
        s.sendmail(sender.address, [rcpt.address], raw)
    delivered = stack.wait_for(rcpt.address, subject=subject, timeout=NET_TIMEOUT)
    assert body_of(delivered.raw) == body
    return delivered


def body_of(raw: bytes) -> bytes:
    """The body of a message with CRLF or LF line ends: all after the first empty line."""
    match = re.search(rb"\r?\n\r?\n", raw)
    assert match is not None, f"no header/body separator in {raw[:200]!r}"
    return raw[match.end() :]


def as_lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def run(argv: list[str], home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a client program with a private HOME, no terminal and no inherited config."""
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TMPDIR": str(home),
        **env,
    }
    return subprocess.run(
        argv,
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=PROGRAM_TIMEOUT,
        check=False,
        cwd=home,
    )


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@dataclass(frozen=True)
class Account:
    port: int
    user: str
    password: str
    ca_file: str


def account(
    stack: MailStack, service: str, *, password: str | None = None, ca_file: str = ""
) -> Account:
    rcpt = stack.user("example.org")
    return Account(
        port=stack.endpoints("example.org").address(service)[1],
        user=rcpt.address,
        password=rcpt.password if password is None else password,
        ca_file=ca_file or stack.ca_file,
    )


def quoted(value: str) -> str:
    """A double-quoted config string (mbsync and fetchmail share the escaping)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def server_imap(stack: MailStack) -> imaplib.IMAP4_SSL:
    """imaplib logged in to example.org's INBOX: flags set the way another client would."""
    host, port = stack.endpoints("example.org").address("imaps")
    client = imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=NET_TIMEOUT)
    rcpt = stack.user("example.org")
    client.login(rcpt.address, rcpt.password)
    client.select("INBOX")
    return client


CERT_ERROR = re.compile(r"certificate verify failed|certificate|verification error", re.I)


# mbsync (isync)


def mbsync_config(home: Path, acct: Account, ssl_type: str, *, host: str = SERVER_NAME) -> Path:
    maildir = home / "Mail"
    maildir.mkdir(exist_ok=True)
    rc = home / "mbsyncrc"
    rc.write_text(
        f"IMAPAccount remote\n"
        f"Host {host}\n"
        f"Port {acct.port}\n"
        f"User {quoted(acct.user)}\n"
        f"Pass {quoted(acct.password)}\n"
        f"SSLType {ssl_type}\n"
        f"SSLVersions TLSv1.2 TLSv1.3\n"
        f"CertificateFile {acct.ca_file}\n"
        f"SystemCertificates no\n"
        f"AuthMechs PLAIN LOGIN\n"
        f"Timeout 20\n\n"
        f"IMAPStore remote\nAccount remote\n\n"
        f"MaildirStore local\nPath {maildir}/\nInbox {maildir}/INBOX\n\n"
        f"Channel inbox\nFar :remote:INBOX\nNear :local:INBOX\n"
        f"Create Near\nSync All\nExpunge None\nSyncState *\n"
    )
    return rc


def mbsync(home: Path, rc: Path) -> subprocess.CompletedProcess[str]:
    return run([require("mbsync", "isync"), "-V", "-c", str(rc), "inbox"], home)


def maildir_files(home: Path) -> list[Path]:
    inbox = home / "Mail" / "INBOX"
    return sorted(p for sub in ("new", "cur") for p in (inbox / sub).glob("*") if p.is_file())


def maildir_flags(path: Path) -> str:
    return path.name.rpartition(":2,")[2]


@pytest.mark.parametrize(("service", "ssl_type"), [("imaps", "IMAPS"), ("imap", "STARTTLS")])
def test_mbsync_syncs_inbox_and_later_changes(
    world: MailStack, tmp_path: Path, service: str, ssl_type: str
) -> None:
    require("mbsync", "isync")
    first = send(world)
    rc = mbsync_config(tmp_path, account(world, service), ssl_type)

    proc = mbsync(tmp_path, rc)

    assert proc.returncode == 0, output(proc)
    assert "Connection is now encrypted" in proc.stdout + proc.stderr, output(proc)
    [stored] = maildir_files(tmp_path)
    # mbsync writes the message with LF line ends (Maildir convention) and adds X-TUID in the
    # header; the body must be byte-identical otherwise, dot-led lines included.
    assert body_of(stored.read_bytes()) == as_lf(body_of(first.raw))
    assert maildir_flags(stored) == ""

    # Second run: a flag set on the server by another client, a flag set locally, a new mail.
    other = server_imap(world)
    try:
        typ, _ = other.uid("STORE", str(first.stored.uid), "+FLAGS", r"(\Flagged)")
        assert typ == "OK"
    finally:
        other.logout()
    seen_locally = stored.with_name(stored.name + "S")  # ":2," -> ":2,S"
    stored.rename(seen_locally)
    second = send(world)

    proc = mbsync(tmp_path, rc)

    assert proc.returncode == 0, output(proc)
    files = maildir_files(tmp_path)
    assert len(files) == 2, (files, output(proc))
    by_body = {body_of(p.read_bytes()): p for p in files}
    assert set(by_body) == {as_lf(body_of(first.raw)), as_lf(body_of(second.raw))}
    assert maildir_flags(by_body[as_lf(body_of(first.raw))]) == "FS"
    [on_server] = [m for m in world.messages("user@example.org") if m.raw == first.raw]
    assert {r"\Seen", r"\Flagged"} <= set(on_server.stored.flags)
    assert len(world.messages("user@example.org")) == 2  # nothing deleted or duplicated


def test_mbsync_rejects_certificate_from_another_ca(
    world: MailStack, tmp_path: Path, wrong_ca_file: str
) -> None:
    require("mbsync", "isync")
    send(world)
    rc = mbsync_config(tmp_path, account(world, "imaps", ca_file=wrong_ca_file), "IMAPS")

    proc = mbsync(tmp_path, rc)

    assert proc.returncode != 0, output(proc)
    assert CERT_ERROR.search(proc.stdout + proc.stderr), output(proc)
    assert maildir_files(tmp_path) == []


def test_mbsync_starttls_rejects_certificate_from_another_ca(
    world: MailStack, tmp_path: Path, wrong_ca_file: str
) -> None:
    require("mbsync", "isync")
    send(world)
    rc = mbsync_config(tmp_path, account(world, "imap", ca_file=wrong_ca_file), "STARTTLS")

    proc = mbsync(tmp_path, rc)

    assert proc.returncode != 0, output(proc)
    assert CERT_ERROR.search(proc.stdout + proc.stderr), output(proc)
    assert maildir_files(tmp_path) == []


@pytest.mark.parametrize(("service", "ssl_type"), [("imaps", "IMAPS"), ("imap", "STARTTLS")])
def test_mbsync_by_ip_verifies_stack_certificate(
    world: MailStack, tmp_path: Path, service: str, ssl_type: str
) -> None:
    # mbsync 1.4 ignores IP subjectAltNames: with a leaf whose CN is mail.example.org it failed
    # with "certificate owner does not match hostname 127.0.0.1".
    require("mbsync", "isync")
    sent = send(world)
    rc = mbsync_config(tmp_path, account(world, service), ssl_type, host=SERVER_IP)

    proc = mbsync(tmp_path, rc)

    assert proc.returncode == 0, output(proc)
    assert "Connection is now encrypted" in proc.stdout + proc.stderr, output(proc)
    [stored] = maildir_files(tmp_path)
    assert body_of(stored.read_bytes()) == as_lf(body_of(sent.raw))


def test_mbsync_by_ip_rejects_certificate_from_another_ca(
    world: MailStack, tmp_path: Path, wrong_ca_file: str
) -> None:
    require("mbsync", "isync")
    send(world)
    acct = account(world, "imaps", ca_file=wrong_ca_file)
    rc = mbsync_config(tmp_path, acct, "IMAPS", host=SERVER_IP)

    proc = mbsync(tmp_path, rc)

    assert proc.returncode != 0, output(proc)
    assert CERT_ERROR.search(proc.stdout + proc.stderr), output(proc)
    assert maildir_files(tmp_path) == []


def test_mbsync_wrong_password_fails(world: MailStack, tmp_path: Path) -> None:
    require("mbsync", "isync")
    send(world)
    rc = mbsync_config(tmp_path, account(world, "imaps", password="not the password"), "IMAPS")

    proc = mbsync(tmp_path, rc)

    assert proc.returncode != 0, output(proc)
    assert re.search(r"auth|login", proc.stdout + proc.stderr, re.I), output(proc)
    assert maildir_files(tmp_path) == []


# fetchmail

FETCHMAIL_MODES = {
    # service: (protocol, TLS options, what the verbose log must show)
    "imaps": ("IMAP", "ssl sslproto 'tls1.2+'", "IMAP<"),
    "imap": ("IMAP", "sslproto 'tls1.2+'", "upgrade to TLS succeeded"),
    "pop3s": ("POP3", "ssl sslproto 'tls1.2+'", "POP3<"),
    "pop3": ("POP3", "sslproto 'tls1.2+'", "upgrade to TLS succeeded"),
}


def fetchmail(
    home: Path, acct: Account, service: str, *, keep: bool
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One fetchmail poll; every message goes through ``cat`` into one file per message."""
    protocol, tls, _ = FETCHMAIL_MODES[service]
    outdir = home / "delivered"
    outdir.mkdir(exist_ok=True)
    # One shell per message, so $$ names each file uniquely.
    mda = f"/bin/sh -c 'cat > {outdir}/msg.$$'"
    rc = home / "fetchmailrc"
    # fetchmail refuses an rc file that others can read (it holds the password).
    rc.touch(mode=0o600)
    rc.write_text(
        "set no syslog\n"
        f"set idfile {quoted(str(home / 'fetchids'))}\n"
        f"poll {SERVER_NAME} with proto {protocol} port {acct.port} timeout 20\n"
        f"  user {quoted(acct.user)} there with password {quoted(acct.password)}"
        f" is {quoted(getpass.getuser())} here\n"
        f"  {tls} sslcertck sslcertfile {quoted(acct.ca_file)}\n"
        f"  fetchall {'keep' if keep else 'nokeep'}\n"
        f"  mda {quoted(mda)}\n"
    )
    os.chmod(rc, 0o600)
    proc = run(
        # As root fetchmail locks /var/run/fetchmail.pid, whatever FETCHMAILHOME says: two
        # test workers would refuse each other ("another foreground fetchmail is running").
        [
            require("fetchmail", "fetchmail"),
            "-v",
            "--nodetach",
            "--pidfile",
            str(home / "fetchmail.pid"),
            "-f",
            str(rc),
        ],
        home,
        FETCHMAILHOME=str(home),
    )
    return proc, outdir


def delivered_files(outdir: Path) -> list[Path]:
    return sorted(outdir.glob("msg.*"))


@pytest.mark.parametrize("service", list(FETCHMAIL_MODES))
def test_fetchmail_keep_leaves_message_on_server(
    world: MailStack, tmp_path: Path, service: str
) -> None:
    require("fetchmail", "fetchmail")
    sent = send(world)

    proc, outdir = fetchmail(tmp_path, account(world, service), service, keep=True)

    assert proc.returncode == 0, output(proc)  # 0: mail was retrieved
    assert FETCHMAIL_MODES[service][2] in proc.stdout + proc.stderr, output(proc)
    [got] = delivered_files(outdir)
    # fetchmail hands the MDA LF line ends and prepends its own Received line.
    assert body_of(got.read_bytes()) == as_lf(body_of(sent.raw)), output(proc)
    assert [m.raw for m in world.messages("user@example.org")] == [sent.raw]


@pytest.mark.parametrize("service", list(FETCHMAIL_MODES))
def test_fetchmail_without_keep_deletes_from_server(
    world: MailStack, tmp_path: Path, service: str
) -> None:
    require("fetchmail", "fetchmail")
    sent = send(world)

    proc, outdir = fetchmail(tmp_path, account(world, service), service, keep=False)

    assert proc.returncode == 0, output(proc)
    [got] = delivered_files(outdir)
    assert body_of(got.read_bytes()) == as_lf(body_of(sent.raw)), output(proc)
    assert world.messages("user@example.org") == [], output(proc)

    # A second poll finds nothing: fetchmail's exit code 1 means "no mail".
    again, _ = fetchmail(tmp_path, account(world, service), service, keep=False)
    assert again.returncode == 1, output(again)
    assert len(delivered_files(outdir)) == 1


@pytest.mark.parametrize("service", list(FETCHMAIL_MODES))
def test_fetchmail_rejects_certificate_from_another_ca(
    world: MailStack, tmp_path: Path, wrong_ca_file: str, service: str
) -> None:
    require("fetchmail", "fetchmail")
    sent = send(world)

    proc, outdir = fetchmail(
        tmp_path, account(world, service, ca_file=wrong_ca_file), service, keep=False
    )

    assert proc.returncode == 2, output(proc)  # 2: socket / TLS error
    assert CERT_ERROR.search(proc.stdout + proc.stderr), output(proc)
    # No credentials went over the unverified connection.
    assert not re.search(r"IMAP> \S+ (LOGIN|AUTHENTICATE)|POP3> (USER|PASS|AUTH)", proc.stdout)
    assert delivered_files(outdir) == []
    assert [m.raw for m in world.messages("user@example.org")] == [sent.raw]


@pytest.mark.parametrize("service", ["imaps", "pop3s"])
def test_fetchmail_wrong_password_fails(world: MailStack, tmp_path: Path, service: str) -> None:
    require("fetchmail", "fetchmail")
    sent = send(world)

    proc, outdir = fetchmail(
        tmp_path, account(world, service, password="not the password"), service, keep=False
    )

    assert proc.returncode == 3, output(proc)  # 3: authentication failed
    assert delivered_files(outdir) == []
    assert [m.raw for m in world.messages("user@example.org")] == [sent.raw]


# getmail6


GETMAIL_RETRIEVERS = {"imaps": "SimpleIMAPSSLRetriever", "pop3s": "SimplePOP3SSLRetriever"}


def getmail(
    home: Path, acct: Account, service: str, *, delete: bool
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One getmail run delivering each message through ``cat`` into its own file."""
    outdir = home / "delivered"
    outdir.mkdir(exist_ok=True)
    rc = home / "getmailrc"
    rc.write_text(
        "[retriever]\n"
        f"type = {GETMAIL_RETRIEVERS[service]}\n"
        f"server = {SERVER_NAME}\n"
        f"port = {acct.port}\n"
        f"username = {acct.user}\n"
        f"password = {acct.password}\n"
        # With ca_certs getmail verifies the chain and matches the host name.
        f"ca_certs = {acct.ca_file}\n"
        "timeout = 20\n\n"
        "[destination]\n"
        "type = MDA_external\n"
        "path = /bin/sh\n"
        f'arguments = ("-c", "cat > {outdir}/msg.$$")\n'
        # getmail refuses external commands as root unless told (CI runs as root).
        "allow_root_commands = true\n\n"
        "[options]\n"
        "read_all = true\n"
        f"delete = {'true' if delete else 'false'}\n"
        "verbose = 2\n"
    )
    proc = run(
        [require("getmail", "getmail6"), "--getmaildir", str(home), "--rcfile", str(rc)], home
    )
    return proc, outdir


@pytest.mark.parametrize("service", list(GETMAIL_RETRIEVERS))
@pytest.mark.parametrize("delete", [False, True], ids=["keep", "delete"])
def test_getmail_retrieves_message(
    world: MailStack, tmp_path: Path, service: str, delete: bool
) -> None:
    require("getmail", "getmail6")
    sent = send(world)

    proc, outdir = getmail(tmp_path, account(world, service), service, delete=delete)

    assert proc.returncode == 0, output(proc)
    [got] = delivered_files(outdir)
    # getmail hands the MDA LF line ends and adds its own header lines.
    assert body_of(got.read_bytes()) == as_lf(body_of(sent.raw)), output(proc)
    left = [m.raw for m in world.messages("user@example.org")]
    assert left == ([] if delete else [sent.raw]), output(proc)


@pytest.mark.parametrize("service", list(GETMAIL_RETRIEVERS))
def test_getmail_rejects_certificate_from_another_ca(
    world: MailStack, tmp_path: Path, wrong_ca_file: str, service: str
) -> None:
    require("getmail", "getmail6")
    sent = send(world)

    proc, outdir = getmail(
        tmp_path, account(world, service, ca_file=wrong_ca_file), service, delete=True
    )

    assert proc.returncode != 0, output(proc)
    assert CERT_ERROR.search(proc.stdout + proc.stderr), output(proc)
    assert delivered_files(outdir) == []
    assert [m.raw for m in world.messages("user@example.org")] == [sent.raw]


def test_getmail_wrong_password_fails(world: MailStack, tmp_path: Path) -> None:
    require("getmail", "getmail6")
    sent = send(world)

    proc, outdir = getmail(
        tmp_path, account(world, "imaps", password="not the password"), "imaps", delete=True
    )

    assert proc.returncode != 0, output(proc)
    assert delivered_files(outdir) == []
    assert [m.raw for m in world.messages("user@example.org")] == [sent.raw]


# offlineimap3


def offlineimap(
    home: Path, acct: Account, *, starttls: bool, host: str = SERVER_NAME
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One offlineimap run (``-o``: once) syncing INBOX into a Maildir, read-only remote."""
    maildir = home / "Mail"
    rc = home / "offlineimaprc"
    rc.write_text(
        "[general]\naccounts = test\n"
        f"metadata = {home / 'metadata'}\n\n"
        "[Account test]\nlocalrepository = local\nremoterepository = remote\n\n"
        f"[Repository local]\ntype = Maildir\nlocalfolders = {maildir}\n\n"
        "[Repository remote]\ntype = IMAP\n"
        f"remotehost = {host}\nremoteport = {acct.port}\n"
        f"remoteuser = {acct.user}\nremotepass = {acct.password}\n"
        # ssl = no with starttls = yes forces the upgrade on the plain port.
        f"ssl = {'no' if starttls else 'yes'}\nstarttls = {'yes' if starttls else 'no'}\n"
        f"sslcacertfile = {acct.ca_file}\n"
        "tls_level = tls_secure\nssl_version = tls1_2\n"
        "folderfilter = lambda name: name == 'INBOX'\n"
        "readonly = True\ntimeout = 20\nmaxconnections = 1\n"
    )
    proc = run([require("offlineimap", "offlineimap3"), "-c", str(rc), "-o", "-u", "basic"], home)
    return proc, maildir / "INBOX"


def maildir_messages(inbox: Path) -> list[Path]:
    return sorted(p for sub in ("new", "cur") for p in (inbox / sub).glob("*") if p.is_file())


# Only IMAPS: offlineimap3 8.0.0 calls imaplib2's starttls() without ca_certs, so over STARTTLS
# it accepts any certificate (checked: it syncs with a foreign CA's file as sslcacertfile).
# A STARTTLS test would prove nothing about verification, which these tests never give up.


def test_offlineimap_syncs_inbox(world: MailStack, tmp_path: Path) -> None:
    require("offlineimap", "offlineimap3")
    sent = send(world)

    proc, inbox = offlineimap(tmp_path, account(world, "imaps"), starttls=False)

    assert proc.returncode == 0, output(proc)
    [got] = maildir_messages(inbox)
    assert body_of(got.read_bytes()) == as_lf(body_of(sent.raw)), output(proc)
    assert [m.raw for m in world.messages("user@example.org")] == [sent.raw]


def test_offlineimap_rejects_certificate_from_another_ca(
    world: MailStack, tmp_path: Path, wrong_ca_file: str
) -> None:
    require("offlineimap", "offlineimap3")
    send(world)

    proc, inbox = offlineimap(
        tmp_path, account(world, "imaps", ca_file=wrong_ca_file), starttls=False
    )

    assert proc.returncode != 0, output(proc)
    assert CERT_ERROR.search(proc.stdout + proc.stderr), output(proc)
    assert not inbox.exists() or maildir_messages(inbox) == []


def test_offlineimap_by_ip_verifies_stack_certificate(world: MailStack, tmp_path: Path) -> None:
    # offlineimap3 matches the CN and DNS names only: with a leaf whose CN is mail.example.org
    # it failed with "no matching domain name found in certificate".
    require("offlineimap", "offlineimap3")
    sent = send(world)

    proc, inbox = offlineimap(tmp_path, account(world, "imaps"), starttls=False, host=SERVER_IP)

    assert proc.returncode == 0, output(proc)
    [got] = maildir_messages(inbox)
    assert body_of(got.read_bytes()) == as_lf(body_of(sent.raw)), output(proc)


def test_offlineimap_by_ip_rejects_certificate_from_another_ca(
    world: MailStack, tmp_path: Path, wrong_ca_file: str
) -> None:
    require("offlineimap", "offlineimap3")
    send(world)
    acct = account(world, "imaps", ca_file=wrong_ca_file)

    proc, inbox = offlineimap(tmp_path, acct, starttls=False, host=SERVER_IP)

    assert proc.returncode != 0, output(proc)
    assert CERT_ERROR.search(proc.stdout + proc.stderr), output(proc)
    assert not inbox.exists() or maildir_messages(inbox) == []
