"""``roundtrip probe`` against small hostile servers: each ends within ``--timeout`` with a
finding or a failed step that names what went wrong, and each has a twin, the same server
behaving, that passes.

The servers are scripted threads on 127.0.0.1 (port 0) with trustme certificates: an SMTP
server that stores what it accepts, and IMAP and POP3 servers that serve it back, so a
well-behaved world makes the whole round trip pass. Knobs make one step hostile: a greeting
that never ends, a 10 GB literal, endless untagged responses, an endless POP3 answer, a
stall, or plaintext on an implicit-TLS port. The probe runs as a subprocess
(``python -m roundtrip probe``) under a hard wall-clock bound, so a regression fails the test
instead of hanging it, and reports its own peak RSS.
"""

from __future__ import annotations

import imaplib
import json
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from roundtrip.errors import ProbeError
from roundtrip.probes._net import check_legacy_tls, map_errors

#: ``--timeout`` of the probe runs here.
TIMEOUT = 2.0
#: The wall-clock bound of a whole probe run: the timeout, the steps' own slack, and the
#: interpreter's start (about 0.5 s).
WALL = TIMEOUT * 2 + 3.0
#: What a run that ends at the probe's deadline may take beyond ``TIMEOUT`` (the
#: interpreter's start, the submission before the deadline's clock matters, a loaded machine).
STARTUP = 2.0
#: Server-side socket timeout: a server thread never outlives its test.
SERVER_TIMEOUT = 10.0

# The child's own peak RSS is VmHWM of its address space. Not getrusage's ru_maxrss: Linux
# carries the parent's high-water mark across fork and exec into it, and the pytest process
# that runs this suite may have grown past any bound set here (it was 865 MB in a full run).
_RUNNER = (
    "import re, sys\n"
    "from roundtrip.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "with open('/proc/self/status') as status:\n"
    "    hwm = re.search(r'VmHWM:\\s+(\\d+) kB', status.read())\n"
    "print('maxrss_kib', hwm.group(1) if hwm else 0, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


# -- the scripted world ------------------------------------------------------------------------


@dataclass
class Knobs:
    """What each server does wrong (nothing by default)."""

    #: Seconds between the lines of a multi-line SMTP greeting; None for one line.
    greeting_interval: float | None = None
    #: Continuation lines of the greeting before the final one; -1: never-ending.
    greeting_lines: int = 0
    #: SMTP: answer EHLO with silence.
    stall_after_ehlo: bool = False
    #: SMTP: answer the end of DATA with silence.
    stall_after_data: bool = False
    #: SMTP: serve plaintext even on the implicit-TLS listener.
    smtp_plaintext: bool = False
    #: SMTP in plaintext: offer STARTTLS (RFC 3207).
    starttls: bool = False
    #: SMTP: offer STARTTLS again after TLS started (RFC 3207 section 4.2 forbids it).
    starttls_again: bool = False
    #: SMTP: offer STARTTLS, then refuse it with 454 (RFC 3207 section 4).
    starttls_refused: bool = False
    #: SMTP: implicit TLS with TLS 1.0 and 1.1 only.
    smtp_legacy_only: bool = False
    #: IMAP: the size a FETCH literal announces (None: the real size).
    literal_size: int | None = None
    #: IMAP: untagged ``* n EXISTS`` lines before the SEARCH answer; -1: never-ending.
    exists_lines: int = 0
    #: Seconds between those lines (0: as fast as the socket takes them).
    exists_interval: float = 0.0
    #: POP3: lines of a RETR answer before the message; -1: never-ending.
    retr_junk_lines: int = 0
    #: SMTP: store every accepted message twice (a duplicate delivery).
    store_twice: bool = False
    #: IMAP: how a UID FETCH after the session's first is answered: ``"no"`` (a tagged NO),
    #: ``"empty"`` (OK without the message); None: honestly.
    refetch: str | None = None
    #: IMAP: answer UID STORE with NO (the probe's clean-up refused).
    store_refused: bool = False
    #: SMTP: seconds to hold the reply to QUIT (pacing, not a synchronisation).
    quit_delay: float = 0.0
    #: SMTP: also accept TLS 1.2 cipher suites with NULL encryption or anonymous key
    #: exchange (RFC 9325 section 4.1: MUST NOT be negotiated).
    smtp_weak_ciphers: bool = False


@dataclass
class World:
    knobs: Knobs
    #: The servers' TLS context (for STARTTLS).
    tls: ssl.SSLContext | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    messages: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Set when a client sent AUTH (with its credentials).
    auth_seen: threading.Event = field(default_factory=threading.Event)

    def add(self, raw: bytes) -> None:
        with self.lock:
            self.messages.append(raw)

    def matching(self, needle: bytes) -> list[int]:
        with self.lock:
            return [i + 1 for i, raw in enumerate(self.messages) if needle in raw]

    def message(self, number: int) -> bytes:
        with self.lock:
            return self.messages[number - 1]

    def pace(self, seconds: float) -> bool:
        """Wait ``seconds`` between two lines of a paced reply (pacing, not a
        synchronisation); False once the test is over."""
        return not self.stop.wait(seconds) if seconds else not self.stop.is_set()


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    def line(self) -> bytes:
        data = self.file.readline(65536)
        if not data:
            raise EOFError
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def upgrade(self, context: ssl.SSLContext) -> None:
        """STARTTLS: the client waited for our go-ahead, so nothing is buffered."""
        self.file.close()
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


Handler = Callable[[Conn, World], None]

#: The trace field the fake SMTP server adds (RFC 5321 section 4.4).
RECEIVED = b"Received: from probe by fake.test with ESMTPSA; Thu, 3 Dec 2026 22:00:00 +0000\r\n"


class Listener:
    """Accepts connections on 127.0.0.1 port 0 and runs ``handler`` for each in a thread."""

    def __init__(self, handler: Handler, world: World, tls: ssl.SSLContext | None) -> None:
        self._handler = handler
        self._world = world
        self._tls = tls
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, name=f"hostile-{self.port}")
        self._accepting.start()

    def _accept(self) -> None:
        while not self._world.stop.is_set():
            try:
                sock, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(sock,))
            thread.start()
            self._threads.append(thread)

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(SERVER_TIMEOUT)
        try:
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_side=True)
            conn = Conn(sock)
        except OSError:
            sock.close()
            return
        try:
            self._handler(conn, self._world)
        except (OSError, EOFError, ValueError):
            pass  # the probe hung up (as it should, for the hostile cases)
        finally:
            conn.close()

    def close(self) -> None:
        self._accepting.join(SERVER_TIMEOUT)
        for thread in self._threads:
            thread.join(SERVER_TIMEOUT)
        self._sock.close()


def _undot(lines: list[bytes]) -> bytes:
    return b"".join(line[1:] if line.startswith(b".") else line for line in lines)


def smtp_handler(conn: Conn, world: World) -> None:
    knobs = world.knobs
    count = knobs.greeting_lines
    while count != 0 and world.pace(knobs.greeting_interval or 0.0):
        conn.send(b"220-still here\r\n")
        count -= 1
    if world.stop.is_set():
        return
    conn.send(b"220 fake.test ESMTP\r\n")
    secure = isinstance(conn.sock, ssl.SSLSocket)
    while True:
        line = conn.line()
        verb = line.split(b" ", 1)[0].strip().upper()
        if verb == b"EHLO":
            if knobs.stall_after_ehlo:
                world.stop.wait(SERVER_TIMEOUT)
                return
            offer = knobs.starttls and (not secure or knobs.starttls_again)
            conn.send(
                b"250-fake.test\r\n"
                + (b"250-STARTTLS\r\n" if offer else b"")
                + (b"250-AUTH PLAIN\r\n" if secure or knobs.starttls_refused else b"")
                + b"250 8BITMIME\r\n"
            )
        elif verb == b"STARTTLS" and knobs.starttls_refused:
            conn.send(b"454 4.7.0 TLS not available due to temporary reason\r\n")
        elif verb == b"STARTTLS" and knobs.starttls and not secure and world.tls:
            conn.send(b"220 2.0.0 go ahead\r\n")
            conn.upgrade(world.tls)
            secure = True
        elif verb == b"AUTH":
            world.auth_seen.set()
            conn.send(b"235 2.7.0 accepted\r\n")
        elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            conn.send(b"250 2.0.0 ok\r\n")
        elif verb == b"DATA":
            conn.send(b"354 go ahead\r\n")
            lines = []
            while (data := conn.line()) != b".\r\n":
                lines.append(data)
            if knobs.stall_after_data:
                world.stop.wait(SERVER_TIMEOUT)
                return
            for _ in range(2 if knobs.store_twice else 1):
                world.add(RECEIVED + _undot(lines))
            conn.send(b"250 2.0.0 queued\r\n")
        elif verb == b"QUIT":
            if not world.pace(knobs.quit_delay):
                return
            conn.send(b"221 2.0.0 bye\r\n")
            return
        else:
            conn.send(b"502 5.5.2 not here\r\n")


def _endless(conn: Conn, world: World, line: bytes, interval: float) -> None:
    """Send ``line`` until the client hangs up or the test ends."""
    block = line * (1 if interval else 512)
    while world.pace(interval):
        conn.send(block)


def imap_handler(conn: Conn, world: World) -> None:
    knobs = world.knobs
    conn.send(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN UIDPLUS] fake ready\r\n")
    fetched = 0
    while True:
        line = conn.line()
        tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
        words = rest.split(b" ")
        verb = b" ".join(words[:2]).upper() if words[0].upper() == b"UID" else words[0].upper()
        if verb == b"CAPABILITY":
            conn.send(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN UIDPLUS\r\n")
        elif verb == b"SELECT":
            conn.send(b"* 0 EXISTS\r\n* FLAGS (\\Deleted)\r\n")
        elif verb == b"UID SEARCH":
            if knobs.exists_lines < 0:
                _endless(conn, world, b"* 1 EXISTS\r\n", knobs.exists_interval)
                return
            for _ in range(knobs.exists_lines):
                conn.send(b"* 1 EXISTS\r\n")
            needle = rest.rpartition(b'"<')[2].rstrip(b'>"')
            found = world.matching(needle) if needle else []
            conn.send(b"* SEARCH" + b"".join(b" %d" % n for n in found) + b"\r\n")
        elif verb == b"UID FETCH" and fetched and knobs.refetch == "no":
            conn.send(tag + b" NO [UNAVAILABLE] not now\r\n")
            continue
        elif verb == b"UID FETCH" and fetched and knobs.refetch == "empty":
            pass  # the tagged OK below, and no message
        elif verb == b"UID STORE" and knobs.store_refused:
            conn.send(tag + b" NO [CANNOT] read-only\r\n")
            continue
        elif verb == b"UID FETCH":
            fetched += 1
            uid = int(words[2])
            raw = world.message(uid)
            size = len(raw) if knobs.literal_size is None else knobs.literal_size
            conn.send(b"* %d FETCH (UID %d BODY[] {%d}\r\n" % (uid, uid, size))
            if knobs.literal_size is not None:
                _endless(conn, world, b"\0" * 8192, 0.0)
                return
            conn.send(raw + b")\r\n")
        elif verb == b"LOGOUT":
            conn.send(b"* BYE bye\r\n" + tag + b" OK done\r\n")
            return
        conn.send(tag + b" OK done\r\n")


def pop3_handler(conn: Conn, world: World) -> None:
    knobs = world.knobs
    conn.send(b"+OK fake ready\r\n")
    while True:
        words = conn.line().rstrip(b"\r\n").split(b" ")
        verb = words[0].upper()
        if verb == b"CAPA":
            conn.send(b"+OK\r\nUSER\r\nUIDL\r\nTOP\r\n.\r\n")
        elif verb == b"UIDL":
            with world.lock:
                count = len(world.messages)
            conn.send(b"+OK\r\n" + b"".join(b"%d m%d\r\n" % (n, n) for n in range(1, count + 1)))
            conn.send(b".\r\n")
        elif verb in (b"TOP", b"RETR"):
            raw = world.message(int(words[1]))
            if verb == b"TOP":
                raw = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            conn.send(b"+OK\r\n")
            if verb == b"RETR" and knobs.retr_junk_lines < 0:
                _endless(conn, world, b"junk line\r\n", 0.0)
                return
            if verb == b"RETR":
                conn.send(b"junk line\r\n" * knobs.retr_junk_lines)
            stuffed = b"".join(
                b"." + ln if ln.startswith(b".") else ln for ln in raw.splitlines(keepends=True)
            )
            conn.send(stuffed + b".\r\n")
        elif verb == b"QUIT":
            conn.send(b"+OK bye\r\n")
            return
        else:
            conn.send(b"+OK\r\n")


@dataclass
class Fake:
    world: World
    smtp: Listener
    imap: Listener
    pop3: Listener
    cafile: Path

    def run(self, reader: str, *extra: str, timeout: float = TIMEOUT) -> Run:
        smtp_scheme = "smtp" if self.world.knobs.smtp_plaintext else "smtps"
        port = {"imap": self.imap.port, "pop3": self.pop3.port}[reader]
        args = [
            "probe",
            "--smtp",
            f"{smtp_scheme}://probe%40fake.test@127.0.0.1:{self.smtp.port}",
            f"--{reader}",
            f"{reader}s://probe%40fake.test@127.0.0.1:{port}",
            "--cafile",
            str(self.cafile),
            "--timeout",
            f"{timeout:g}",
            *extra,
        ]
        return run_cli(args)


@dataclass
class Run:
    code: int
    seconds: float
    out: str
    err: str
    maxrss_kib: int


def run_cli(args: list[str]) -> Run:
    env = {
        "ROUNDTRIP_SMTP_PASSWORD": "pw",
        "ROUNDTRIP_IMAP_PASSWORD": "pw",
        "ROUNDTRIP_POP3_PASSWORD": "pw",
        "PATH": "/usr/bin:/bin",
    }
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, *args],
        capture_output=True,
        text=True,
        timeout=WALL + 30,
        env=env,
        check=False,
    )
    seconds = time.monotonic() - started
    rss = 0
    for line in proc.stderr.splitlines():
        if line.startswith("maxrss_kib "):
            rss = int(line.split()[1])
    return Run(proc.returncode, seconds, proc.stdout, proc.stderr, rss)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cafile(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def make_fake(ca: trustme.CA, cafile: Path) -> Iterator[Callable[..., Fake]]:
    made: list[Fake] = []
    leaf = ca.issue_cert("127.0.0.1", "localhost")

    def make(**knobs: Any) -> Fake:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        leaf.configure_cert(ctx)
        world = World(Knobs(**knobs), tls=ctx)
        smtp_tls = None if world.knobs.smtp_plaintext else ctx
        if world.knobs.smtp_weak_ciphers:
            smtp_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            leaf.configure_cert(smtp_tls)
            smtp_tls.set_ciphers("aNULL:eNULL:DEFAULT:@SECLEVEL=0")
        if world.knobs.smtp_legacy_only:
            smtp_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            leaf.configure_cert(smtp_tls)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                smtp_tls.minimum_version = ssl.TLSVersion.TLSv1
                smtp_tls.maximum_version = ssl.TLSVersion.TLSv1_1
            smtp_tls.set_ciphers("DEFAULT:@SECLEVEL=0")
        fake = Fake(
            world,
            Listener(smtp_handler, world, smtp_tls),
            Listener(imap_handler, world, ctx),
            Listener(pop3_handler, world, ctx),
            cafile,
        )
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.world.stop.set()
    for fake in made:
        for listener in (fake.smtp, fake.imap, fake.pop3):
            listener.close()


def _failed_within_timeout(run: Run) -> None:
    __tracebackhide__ = True
    assert run.code == 1, run.out + run.err
    assert "Traceback" not in run.err, run.err
    assert run.seconds < WALL, f"the probe took {run.seconds:.1f} s"


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["imap", "pop3"])
def test_probe_hostile_well_behaved_world_passes(
    make_fake: Callable[..., Fake], reader: str
) -> None:
    run = make_fake().run(reader)
    assert run.code == 0, run.out + run.err
    assert "PASS" in run.out


def test_probe_hostile_endless_greeting_ends_at_the_step_deadline(
    make_fake: Callable[..., Fake],
) -> None:
    run = make_fake(greeting_interval=0.2, greeting_lines=-1).run("imap")
    _failed_within_timeout(run)
    assert "FAIL at CONNECT" in run.out
    assert f"did not finish within {TIMEOUT:g} s" in run.out
    assert "the last line it sent: '220-still here'" in run.out
    assert run.seconds < TIMEOUT + STARTUP


def test_probe_hostile_slow_finite_greeting_passes(make_fake: Callable[..., Fake]) -> None:
    run = make_fake(greeting_interval=0.2, greeting_lines=3).run("imap")
    assert run.code == 0, run.out + run.err


@pytest.mark.parametrize(
    ("knob", "step"), [("stall_after_ehlo", "EHLO"), ("stall_after_data", "SUBMIT")]
)
def test_probe_hostile_stall_says_timed_out(
    make_fake: Callable[..., Fake], knob: str, step: str
) -> None:
    run = make_fake(**{knob: True}).run("imap")
    _failed_within_timeout(run)
    assert f"FAIL at {step}" in run.out
    assert f"did not answer within {TIMEOUT:g} s" in run.out
    assert "closed the connection" not in run.out


def test_probe_hostile_plaintext_on_implicit_tls_port_is_named(
    make_fake: Callable[..., Fake],
) -> None:
    fake = make_fake(smtp_plaintext=True)
    args = [
        "probe",
        "--smtp",
        f"smtps://probe%40fake.test@127.0.0.1:{fake.smtp.port}",
        "--imap",
        f"imaps://probe%40fake.test@127.0.0.1:{fake.imap.port}",
        "--cafile",
        str(fake.cafile),
        "--timeout",
        f"{TIMEOUT:g}",
        "--json",
    ]
    run = run_cli(args)
    _failed_within_timeout(run)
    result = json.loads(run.out)["results"][0]
    assert "answered in plaintext on an implicit-TLS port" in result["error"]
    assert "WRONG_VERSION_NUMBER" not in result["error"]
    finding = next(f for f in result["findings"] if f["code"] == "port-mode-mismatch")
    assert finding["severity"] == "fail"
    assert finding["evidence"] == ["220 fake.test ESMTP"]


def test_probe_hostile_starttls_port_in_plaintext_is_no_mismatch(
    make_fake: Callable[..., Fake],
) -> None:
    # The twin: the same plaintext server dialled as a STARTTLS port is another failure
    # (STARTTLS not offered), not a port/mode mismatch.
    run = make_fake(smtp_plaintext=True).run("imap", "--json")
    result = json.loads(run.out)["results"][0]
    assert result["error_step"] == "STARTTLS"
    assert all(f["code"] != "port-mode-mismatch" for f in result["findings"])


def test_probe_hostile_ten_gigabyte_literal_is_refused_unread(
    make_fake: Callable[..., Fake],
) -> None:
    run = make_fake(literal_size=10 * 1024**3).run("imap")
    _failed_within_timeout(run)
    assert "FAIL at IMAP FETCH" in run.out
    assert "announced a literal of 10737418240 bytes" in run.out
    assert run.maxrss_kib < 200 * 1024, f"peak RSS {run.maxrss_kib} KiB"


@pytest.mark.parametrize("interval", [0.0, 0.05])
def test_probe_hostile_endless_exists_lines_end(
    make_fake: Callable[..., Fake], interval: float
) -> None:
    run = make_fake(exists_lines=-1, exists_interval=interval).run("imap")
    _failed_within_timeout(run)
    assert "FAIL at IMAP WAIT" in run.out
    assert run.seconds < TIMEOUT + STARTUP  # the probe's deadline, not one step more
    assert run.maxrss_kib < 200 * 1024, f"peak RSS {run.maxrss_kib} KiB"


def test_probe_hostile_some_exists_lines_pass(make_fake: Callable[..., Fake]) -> None:
    run = make_fake(exists_lines=50).run("imap")
    assert run.code == 0, run.out + run.err


def test_probe_hostile_endless_pop3_answer_ends(make_fake: Callable[..., Fake]) -> None:
    run = make_fake(retr_junk_lines=-1).run("pop3")
    _failed_within_timeout(run)
    assert "FAIL at POP3 RETR" in run.out
    assert run.maxrss_kib < 200 * 1024, f"peak RSS {run.maxrss_kib} KiB"


@pytest.mark.parametrize("again", [False, True])
def test_probe_hostile_starttls_offered_again_after_tls_is_a_warning(
    make_fake: Callable[..., Fake], again: bool
) -> None:
    run = make_fake(smtp_plaintext=True, starttls=True, starttls_again=again).run("imap", "--json")
    assert run.code == 0, run.out + run.err  # a warning: the round trip passes
    findings = json.loads(run.out)["results"][0]["findings"]
    codes = {f["code"]: f for f in findings}
    assert codes["starttls"]["severity"] == "info"
    assert codes["starttls"]["evidence"][0] == "before TLS: 8BITMIME STARTTLS"
    if again:
        warning = codes["starttls-offered-after-tls"]
        assert warning["severity"] == "warn"
        assert warning["evidence"][1] == "after TLS: 8BITMIME AUTH STARTTLS"
    else:
        assert "starttls-offered-after-tls" not in codes


@pytest.mark.parametrize("lines", [-1, 2])
def test_probe_hostile_legacy_tls_check_bounds_the_starttls_exchange(
    make_fake: Callable[..., Fake], lines: int
) -> None:
    # The extra TLS 1.0/1.1 handshake speaks STARTTLS on its own connection: a greeting
    # that never ends must not hold it past its timeout; a finite one is read through.
    fake = make_fake(
        smtp_plaintext=True, starttls=True, greeting_interval=0.1, greeting_lines=lines
    )
    started = time.monotonic()
    outcome = check_legacy_tls(
        host="127.0.0.1",
        port=fake.smtp.port,
        protocol="smtp",
        tls="starttls",
        server_name="127.0.0.1",
        timeout=1.0,
    )
    assert time.monotonic() - started < 3.0
    if lines < 0:
        assert outcome == "not tested: the STARTTLS exchange did not finish in time"
    else:
        assert outcome == "refused" or outcome.startswith("not tested: local OpenSSL")


# -- the wording of what went wrong (pure: map_errors over raised exceptions) ----------------


def _translated(raise_it: Callable[[], None]) -> ProbeError:
    with pytest.raises(ProbeError) as caught, map_errors("EHLO", "mx.test:25", timeout=5.0):
        raise_it()
    return caught.value


def _wrapped(outer: Exception, inner: BaseException) -> Callable[[], None]:
    def raise_it() -> None:
        try:
            raise inner
        except BaseException:
            raise outer from None

    return raise_it


@pytest.mark.parametrize(
    "outer",
    [
        smtplib.SMTPServerDisconnected(
            "Connection unexpectedly closed: The read operation timed out"
        ),
        imaplib.IMAP4.abort("socket error: The write operation timed out"),
    ],
)
def test_probe_hostile_wrapped_timeout_says_timed_out(outer: Exception) -> None:
    error = _translated(_wrapped(outer, TimeoutError("The read operation timed out")))
    assert str(error) == "EHLO: mx.test:25 did not answer within 5 s"
    assert "closed the connection" not in str(error)


def test_probe_hostile_real_close_says_closed() -> None:
    outer = smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
    error = _translated(_wrapped(outer, ConnectionResetError("reset by peer")))
    assert str(error) == "EHLO: mx.test:25 closed the connection: Connection unexpectedly closed"


def _args(
    fake: Fake, smtp: str, reader: str, reader_port: int, smtp_port: int | None = None
) -> list[str]:
    return [
        "probe",
        "--smtp",
        f"{smtp}://probe%40fake.test@127.0.0.1:{smtp_port or fake.smtp.port}",
        f"--{reader.rstrip('s')}",
        f"{reader}://probe%40fake.test@127.0.0.1:{reader_port}",
        "--cafile",
        str(fake.cafile),
        "--timeout",
        "1",
        "--json",
    ]


@pytest.mark.parametrize(
    ("smtp", "reader", "step"), [("smtp", "imaps", "CONNECT"), ("smtps", "imap", "IMAP CONNECT")]
)
def test_probe_hostile_implicit_tls_port_dialled_for_starttls_is_named(
    make_fake: Callable[..., Fake], smtp: str, reader: str, step: str
) -> None:
    fake = make_fake()
    run = run_cli(_args(fake, smtp, reader, fake.imap.port))
    _failed_within_timeout(run)
    result = json.loads(run.out)["results"][0]
    assert result["error_step"] == step
    assert "sent no greeting: it speaks TLS at once (TLSv1.3)" in result["error"]
    finding = next(f for f in result["findings"] if f["code"] == "port-mode-mismatch")
    assert finding["severity"] == "fail"
    assert finding["evidence"] == ["no greeting within 1 s", "TLS handshake at once: TLSv1.3"]


def test_probe_hostile_silent_starttls_port_is_no_mismatch(
    make_fake: Callable[..., Fake],
) -> None:
    # The twin: a port that accepts and never speaks, in plaintext or in TLS, stays a timeout.
    fake = make_fake()
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        run = run_cli(_args(fake, "smtps", "imap", silent.getsockname()[1]))
    finally:
        silent.close()
    _failed_within_timeout(run)
    result = json.loads(run.out)["results"][0]
    assert result["error"].endswith("did not answer within 1 s (waiting for the greeting)")
    assert all(f["code"] != "port-mode-mismatch" for f in result["findings"])


# -- the probe never downgrades itself ----------------------------------------------------------


def test_probe_hostile_refused_starttls_sends_no_credentials(
    make_fake: Callable[..., Fake],
) -> None:
    # The server offers STARTTLS and AUTH, then refuses STARTTLS: the probe stops there and
    # never goes on in plaintext.
    fake = make_fake(smtp_plaintext=True, starttls=True, starttls_refused=True)
    run = fake.run("imap")
    _failed_within_timeout(run)
    assert "FAIL at STARTTLS" in run.out and "454 4.7.0 TLS not available" in run.out
    assert not fake.world.auth_seen.is_set()


def test_probe_hostile_accepted_starttls_sends_credentials_over_tls(
    make_fake: Callable[..., Fake],
) -> None:
    fake = make_fake(smtp_plaintext=True, starttls=True)
    assert fake.run("imap").code == 0
    assert fake.world.auth_seen.is_set()


def test_probe_hostile_legacy_only_server_is_not_met_halfway(
    make_fake: Callable[..., Fake],
) -> None:
    try:
        fake = make_fake(smtp_legacy_only=True)
    except (ValueError, ssl.SSLError) as exc:  # pragma: no cover - OpenSSL without TLS 1.1
        pytest.skip(f"local OpenSSL cannot serve TLS 1.1: {exc}")
    run = fake.run("imap")
    _failed_within_timeout(run)
    assert "FAIL at CONNECT: 127.0.0.1" in run.out
    assert "accepts none of the TLS versions the probe offers (TLS 1.2 and above" in run.out
    assert not fake.world.auth_seen.is_set()


# -- the classics: silence, a close, random bytes, a 20 MB line ---------------------------------


def _raw_behaviour(kind: str, conn: socket.socket, stop: threading.Event) -> None:
    if kind == "close":
        return
    if kind == "random":
        conn.sendall(bytes(range(256)) * 64)
    elif kind == "long-line":
        block = b"220-" + b"x" * (1024 * 1024 - 4)
        for _ in range(20):
            conn.sendall(block)
    stop.wait(SERVER_TIMEOUT)  # silence (after whatever it sent)


@pytest.mark.parametrize("tls", [True, False])
@pytest.mark.parametrize("kind", ["silence", "close", "random", "long-line"])
def test_probe_hostile_classic_misbehaviour_ends_cleanly(
    make_fake: Callable[..., Fake], ca: trustme.CA, kind: str, tls: bool
) -> None:
    fake = make_fake()
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(SERVER_TIMEOUT)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(SERVER_TIMEOUT)
            try:
                if tls:
                    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                    ca.issue_cert("127.0.0.1").configure_cert(ctx)
                    with ctx.wrap_socket(conn, server_side=True) as secure:
                        _raw_behaviour(kind, secure, stop)
                else:
                    _raw_behaviour(kind, conn, stop)
            except OSError:
                pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        port = listener.getsockname()[1]
        run = run_cli(_args(fake, "smtps", "imaps", fake.imap.port, smtp_port=port))
    finally:
        stop.set()
        thread.join(SERVER_TIMEOUT)
        listener.close()
    _failed_within_timeout(run)
    result = json.loads(run.out)["results"][0]
    assert result["error_step"] == "CONNECT", result["error"]


# -- what a server refuses or withholds never reads as a pass -----------------------------------


@pytest.mark.parametrize("refetch", ["no", "empty"])
def test_probe_hostile_withheld_second_copy_fails(
    make_fake: Callable[..., Fake], refetch: str
) -> None:
    # The search finds two copies; the server will not hand over the second. Counting the
    # bodies that came back would read "exactly one copy".
    run = make_fake(store_twice=True, refetch=refetch).run("imap", "--json")
    assert run.code == 1, run.out + run.err
    result = json.loads(run.out)["results"][0]
    assert not result["ok"]
    assert result["error_step"] == "IMAP FETCH", result["error"]
    assert "UID FETCH 2 (one of 2 copies found)" in result["error"]


def test_probe_hostile_honest_second_copy_is_a_duplicate(make_fake: Callable[..., Fake]) -> None:
    # The twin: both copies handed over, and the probe names the duplicate.
    run = make_fake(store_twice=True).run("imap", "--json")
    assert run.code == 1, run.out + run.err
    result = json.loads(run.out)["results"][0]
    assert result["checks"]["exactly one copy"] is False
    assert any(f["code"] == "duplicate" for f in result["findings"])


def test_probe_hostile_refused_clean_up_fails(make_fake: Callable[..., Fake]) -> None:
    # The probe message cannot be deleted: it would pile up in the mailbox run after run.
    run = make_fake(store_refused=True).run("imap", "--json")
    assert run.code == 1, run.out + run.err
    result = json.loads(run.out)["results"][0]
    assert result["error_step"] == "IMAP DELETE", result["error"]
    assert "[CANNOT] read-only" in result["error"]
    # The twin: --keep asks for no clean-up, and the same server passes.
    kept = make_fake(store_refused=True).run("imap", "--keep")
    assert kept.code == 0, kept.out + kept.err


def test_probe_hostile_deliver_time_starts_at_the_data_reply(
    make_fake: Callable[..., Fake],
) -> None:
    # A server slow to answer QUIT: the fetch cannot start before the submission is over,
    # so the time from the DATA reply to the message showing includes that wait, and a
    # deliver bound below it fails instead of reading a few milliseconds.
    run = make_fake(quit_delay=0.6).run("imap", "--json", "--crit", "deliver=0.5")
    assert run.code == 1, run.out + run.err
    result = json.loads(run.out)["results"][0]
    assert result["timings"]["deliver"] >= 0.6
    assert result["checks"]["deliver within 0.5 s"] is False
    quit_step = next(s for s in result["steps"] if s["name"] == "smtp quit")
    assert quit_step["seconds"] >= 0.6
    # QUIT is not part of the submission's own time (connect to the reply to DATA).
    assert result["timings"]["submit"] < quit_step["seconds"]
    # The twin: the same server within a bound it meets passes.
    run = make_fake(quit_delay=0.6).run("imap", "--json", "--crit", "deliver=5")
    assert run.code == 0, run.out + run.err


def test_probe_hostile_forbidden_cipher_suite_fails_the_verdict(
    make_fake: Callable[..., Fake],
) -> None:
    # RFC 9325 section 4.1: NULL encryption and anonymous key exchange MUST NOT be
    # negotiated. The failing findings fail the result in every output, not only the exit.
    run = make_fake(smtp_weak_ciphers=True).run("imap", "--json", "--tls-scan")
    assert run.code == 1, run.out + run.err
    doc = json.loads(run.out)
    result = doc["results"][0]
    assert doc["ok"] is False and result["ok"] is False
    assert result["checks"]["no cipher suite RFC 9325 forbids"] is False
    assert result["error_step"] == "VERIFY"
    assert "NULL encryption" in result["error"] or "anonymous" in result["error"]
    human = make_fake(smtp_weak_ciphers=True).run("imap", "--tls-scan")
    assert human.code == 1
    assert "PASS" not in human.out
    assert "warning(s)" not in human.out


def test_probe_hostile_scanned_server_without_forbidden_suites_passes(
    make_fake: Callable[..., Fake],
) -> None:
    run = make_fake().run("imap", "--json", "--tls-scan")
    assert run.code == 0, run.out + run.err
    result = json.loads(run.out)["results"][0]
    assert result["checks"]["no cipher suite RFC 9325 forbids"] is True
