"""A real Postfix as a foreign MTA next to a stack: it resolves MX records through the stack's
DNS, sends to the stack's MX over verified STARTTLS, and receives mail the stack relays to it.

Theory of operation
-------------------
Postfix resolves through the C library, which reads ``/etc/resolv.conf`` and only ever asks
port 53. So the stack runs with ``ports="standard"`` (its DNS on 127.0.0.1:53) and Postfix is
started inside a private mount namespace where ``/etc/resolv.conf`` is a bind mount of a file
naming 127.0.0.1::

    unshare --mount --propagation private \
        sh -c 'mount --bind DIR/resolv.conf /etc/resolv.conf && exec postfix -c DIR/etc start'

Every Postfix daemon is a child of that master, so all of them see the private file; the
machine's resolver is never touched, and the mount disappears with the last process of the
namespace (no unmount to forget).

The configuration (all under one temporary directory, nothing read from ``/etc/postfix``):

- one smtpd listener on ``host:port`` (127.0.0.10:25 by default), STARTTLS with a certificate
  for ``mx_name`` issued by the stack's CA, ``smtpd_tls_received_header = yes``;
  ``mynetworks = 127.0.0.0/8`` lets the test inject mail there for relaying;
- Postfix refuses an ``inet_interfaces`` address that no interface carries (127.0.0.10 is only
  routed to ``lo``), so it is ``loopback-only`` plus ``proxy_interfaces = host``. Postfix then
  counts 127.0.0.1 as its own address and bounces mail whose MX lives there ("mail for ...
  loops back to myself": the check compares addresses, not ports). A stack with
  ``ports="standard"`` puts its first domain on 127.0.0.1: make that one a domain Postfix never
  sends to;
- the outbound client: ``smtp_tls_security_level = verify`` with ``smtp_tls_CAfile`` = the
  stack CA, so the MX name found in the stack's DNS must match the stack's certificate;
- local delivery: ``domain`` is a virtual mailbox domain delivered by Postfix's ``virtual``
  agent into ``DIR/mail/<user>/`` (Maildir), owned by ``nobody``; DSNs for local senders land
  there too.

Stopped by the PID in the master's pid file (SIGTERM, then SIGKILL), never by name.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import os
import pwd
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from types import TracebackType

from benchmarks._realstack import _pid_alive, _read_pid
from benchmarks._realstack_config import MASTER_SERVICES
from roundtrip.certs import CertificateAuthority
from roundtrip.errors import ServerStartError

__all__ = ["PostfixPeer", "peer_unavailable_reason"]

_POSTFIX = "/usr/sbin/postfix"
_STOP_TIMEOUT = 10.0
_START_TIMEOUT = 20.0
#: Interval between two looks at a Maildir while polling toward a deadline.
_POLL_INTERVAL = 0.02


def peer_unavailable_reason() -> str | None:
    """Why a Postfix peer cannot run here (None when it can)."""
    if not os.path.exists(_POSTFIX):
        return f"{_POSTFIX} is missing (apt-get install postfix)"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare(1) or mount(8) is missing (util-linux, mount)"
    if os.geteuid() != 0:
        return "needs root (Postfix's master, a mount namespace, and ports 25 and 53)"
    for account in ("postfix", "nobody"):
        try:
            pwd.getpwnam(account)
        except KeyError:
            return f"the {account!r} account is missing"
    return None


class PostfixPeer:
    """A loopback Postfix serving ``domain`` and sending through the stack's DNS.

    Args:
        ca: the stack's CA: it issues Postfix's certificate and is the one Postfix trusts.
        domain: the mail domain Postfix delivers locally (virtual mailboxes).
        users: local parts of the mailboxes of ``domain``.
        mx_name: Postfix's host name, the name its certificate is for.
        host: the loopback address of its one smtpd listener (also its only "own" address).
        port: that listener's port.
        nameserver: the address written into the private resolv.conf (the stack's DNS).
        extra_main_cf: lines appended to main.cf (a later line wins in Postfix), for
            example ``smtpd_milters`` naming mail filters (``tests/live/_milter_peer.py``).
    """

    def __init__(
        self,
        *,
        ca: CertificateAuthority,
        domain: str = "peer.test",
        users: Iterable[str] = ("alice",),
        mx_name: str = "mx.peer.test",
        host: str = "127.0.0.10",
        port: int = 25,
        nameserver: str = "127.0.0.1",
        extra_main_cf: str = "",
    ) -> None:
        self.ca = ca
        self.domain = domain
        self.users = tuple(users)
        self.mx_name = mx_name
        self.host = host
        self.port = port
        self.nameserver = nameserver
        self.extra_main_cf = extra_main_cf
        self.dir = ""
        self.start_duration = 0.0

    # -- files -------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def _write(self, rel: str, data: str | bytes, mode: int = 0o644) -> str:
        path = self._path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.chmod(path, mode)
        return path

    def main_cf(self) -> str:
        """The text of main.cf."""
        d = self.dir
        nobody = pwd.getpwnam("nobody")
        return f"""\
# A foreign MTA for roundtrip's interop tests; nothing here is read from /etc/postfix.
compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {self.mx_name}
mydomain = {self.domain}
myorigin = $mydomain
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = loopback-only
proxy_interfaces = {self.host}
inet_protocols = ipv4
maillog_file = {d}/log/postfix.log
maillog_file_prefixes = {d}/log
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
virtual_mailbox_domains = {self.domain}
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = texthash:{d}/etc/vmailbox
virtual_uid_maps = static:{nobody.pw_uid}
virtual_gid_maps = static:{nobody.pw_gid}
virtual_transport = virtual
smtpd_banner = $myhostname ESMTP
smtpd_tls_chain_files = {d}/tls/key.pem, {d}/tls/cert.pem
smtpd_tls_security_level = may
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
smtpd_tls_protocols = >=TLSv1.2
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtp_tls_security_level = verify
smtp_tls_CAfile = {d}/tls/ca.pem
smtp_tls_loglevel = 1
tls_random_source = dev:/dev/urandom
delay_warning_time = 0
in_flow_delay = 0
smtpd_error_sleep_time = 0
smtpd_forbid_bare_newline = yes
""" + (self.extra_main_cf.rstrip("\n") + "\n" if self.extra_main_cf else "")

    def master_cf(self) -> str:
        """The text of master.cf: the one smtpd listener, then the daemons (none chrooted)."""
        return (
            f"{self.host}:{self.port} inet n - n - - smtpd\n"
            + MASTER_SERVICES
            + "virtual    unix  - n n -    - virtual\n"
        )

    def _write_config(self) -> None:
        self._write("etc/main.cf", self.main_cf())
        self._write("etc/master.cf", self.master_cf())
        self._write("etc/vmailbox", "".join(f"{u}@{self.domain} {u}/\n" for u in self.users))
        self._write("resolv.conf", f"nameserver {self.nameserver}\noptions timeout:2 attempts:2\n")
        leaf = self.ca.leaf([self.mx_name])
        self._write("tls/key.pem", leaf.private_key_pem.bytes(), mode=0o600)
        self._write("tls/cert.pem", b"".join(p.bytes() for p in leaf.cert_chain_pems))
        self._write("tls/ca.pem", self.ca.pem)
        nobody = pwd.getpwnam("nobody")
        os.makedirs(self._path("mail"), exist_ok=True)
        os.chown(self._path("mail"), nobody.pw_uid, nobody.pw_gid)
        os.makedirs(self._path("log"), exist_ok=True)
        # ``postfix start`` creates the queue's subdirectories (post-install create-missing),
        # not the queue directory itself.
        os.makedirs(self._path("spool"), mode=0o755, exist_ok=True)
        postfix = pwd.getpwnam("postfix")
        os.makedirs(self._path("data"), mode=0o700, exist_ok=True)
        os.chown(self._path("data"), postfix.pw_uid, postfix.pw_gid)

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> PostfixPeer:
        """Write the configuration and start Postfix in its mount namespace.

        Returns once its listener greets (within ``_START_TIMEOUT`` seconds).

        Raises:
            ServerStartError: ``postfix start`` failed or the listener never greeted.
        """
        began = time.monotonic()
        self.dir = tempfile.mkdtemp(prefix="rt-postfix-")
        # Postfix's daemons run as ``postfix`` and ``nobody`` and must reach the files.
        os.chmod(self.dir, 0o755)
        self._write_config()
        etc = self._path("etc")
        script = (
            f"mount --bind {self._path('resolv.conf')} /etc/resolv.conf"
            f" && exec {_POSTFIX} -c {etc} start"
        )
        try:
            proc = subprocess.run(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=_START_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            self.stop()
            raise ServerStartError(
                f"'postfix -c {etc} start' took over {_START_TIMEOUT} s"
            ) from exc
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).decode(errors="replace")
            self.stop()
            raise ServerStartError(f"'postfix -c {etc} start' exited {proc.returncode}: {out}")
        self._await_greeting(time.monotonic() + _START_TIMEOUT)
        self.start_duration = time.monotonic() - began
        return self

    def _await_greeting(self, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with smtplib.SMTP(self.host, self.port, timeout=2) as client:
                    client.noop()
                return
            except (OSError, smtplib.SMTPException) as exc:
                last = exc
                time.sleep(_POLL_INTERVAL)  # sleep-ok: nothing signals here; poll to a deadline
        self.stop()
        raise ServerStartError(f"Postfix on {self.host}:{self.port} never greeted: {last!r}")

    def master_pid(self) -> int | None:
        """The PID of Postfix's master, from its pid file."""
        return _read_pid(self._path("spool", "pid", "master.pid")) if self.dir else None

    def stop(self) -> None:
        """Stop the master by its pid file (SIGTERM, then SIGKILL) and remove the directory."""
        if not self.dir:
            return
        pid = self.master_pid()
        if pid is not None and pid > 1 and _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + _STOP_TIMEOUT
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(_POLL_INTERVAL)  # sleep-ok: a foreign process's exit gives no event
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.final_log = self.log()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = ""

    def __enter__(self) -> PostfixPeer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what a test reads and does ------------------------------------------------------

    def log(self) -> str:
        """Postfix's log so far."""
        try:
            with open(self._path("log", "postfix.log"), encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except (FileNotFoundError, NotADirectoryError):
            return getattr(self, "final_log", "")

    def send(self, mail_from: str, rcpt: str, message: bytes) -> None:
        """Inject a message over SMTP into Postfix's listener (it relays for 127.0.0.0/8)."""
        with smtplib.SMTP(self.host, self.port, timeout=10) as client:
            client.sendmail(mail_from, [rcpt], message)

    def messages(self, user: str) -> list[email.message.EmailMessage]:
        """The messages in ``user``'s Maildir (new and cur), oldest file name first."""
        found = []
        for sub in ("new", "cur"):
            folder = self._path("mail", user, sub)
            with contextlib.suppress(FileNotFoundError):
                for name in sorted(os.listdir(folder)):
                    with open(os.path.join(folder, name), "rb") as fh:
                        msg = email.message_from_binary_file(fh, policy=email.policy.default)
                    found.append(msg)
        return found

    def wait_for_message(
        self,
        user: str,
        match: Callable[[email.message.EmailMessage], bool],
        *,
        timeout: float,
    ) -> email.message.EmailMessage:
        """The first message in ``user``'s Maildir that ``match`` accepts, within ``timeout``.

        Raises:
            AssertionError: none arrived in time; says what did, and the end of the log.
        """
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.messages(user):
                if match(msg):
                    return msg
            if time.monotonic() >= deadline:
                subjects = [m["Subject"] for m in self.messages(user)]
                raise AssertionError(
                    f"no matching message in {user}'s Maildir after {timeout:g} s;"
                    f" subjects seen: {subjects!r}\nPostfix log:\n{self.log()[-3000:]}"
                )
            time.sleep(_POLL_INTERVAL)  # sleep-ok: nothing signals here; poll to a deadline

    def wait_for_log(self, *needles: str, timeout: float) -> str:
        """The first log line containing every one of ``needles``, within ``timeout``.

        Raises:
            AssertionError: no such line in time; shows the end of the log.
        """
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log().splitlines():
                if all(n in line for n in needles):
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no log line with {needles!r} after {timeout:g} s:\n{self.log()[-3000:]}"
                )
            time.sleep(_POLL_INTERVAL)  # sleep-ok: nothing signals here; poll to a deadline

    def delete_queue(self) -> None:
        """Drop every queued message (``postsuper -d ALL``), so no retry outlives a test."""
        subprocess.run(
            ["postsuper", "-c", self._path("etc"), "-d", "ALL"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_STOP_TIMEOUT,
            check=True,
        )
