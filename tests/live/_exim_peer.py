"""A real Exim 4 as a foreign MTA next to a stack: it resolves MX records through the stack's
DNS, sends to the stack's MX over verified STARTTLS, and receives mail the stack relays to it.

Theory of operation
-------------------
Debian's ``postfix``, ``exim4-daemon-light`` and ``opensmtpd`` conflict as packages, so only
one can be installed. The others are unpacked (``apt-get download`` then ``dpkg-deb -x``) into
one directory, ``$ROUNDTRIP_PEERS_DIR`` (default ``/opt/roundtrip-peers``); ``.ci/run`` does
that. Exim is found there as ``usr/sbin/exim4``.

Like the Postfix peer (``_postfix_peer.py``), Exim resolves through the C library, which reads
``/etc/resolv.conf`` and only asks port 53. It is started inside a private mount namespace
where ``/etc/resolv.conf`` is a bind mount of a file naming the stack's DNS::

    unshare --mount --propagation private \
        sh -c 'mount --bind DIR/resolv.conf /etc/resolv.conf && exec exim4 -C DIR/exim.conf -bd'

The daemon and every delivery process it forks see the private file; the mount disappears with
the namespace's last process.

The configuration (one file, ``-C``; nothing read from ``/etc/exim4``):

- started as root with ``-C``, Exim binds port 25 and then runs as the ``Debian-exim`` user
  (which must exist); it re-executes itself, hence ``exim_path``; its spool and log
  directories belong to that user;
- one listener on ``host:port`` (127.0.0.10:25), STARTTLS with a certificate for ``mx_name``
  from the stack's CA; 127.0.0.0/8 may relay, so the test injects mail there;
- the outbound ``smtp`` transport requires TLS (``hosts_require_tls``) and a certificate that
  chains to the stack CA and names the MX host (``tls_verify_hosts``,
  ``tls_verify_cert_hostnames``); the mainlog then shows ``CV=yes``;
- the ``dnslookup`` router keeps loopback targets (Debian's stock configuration ignores
  127.0.0.0/8); Exim counts only ``local_interfaces`` (``host``) as itself;
- local delivery: ``domain``'s users get a Maildir under ``DIR/mail/<user>/``, written as
  ``Debian-exim`` (a daemon started with ``-C`` re-executes itself without root, so it cannot
  switch users); bounces to local senders land there too.

Stopped by the PID in its pid file (SIGTERM, then SIGKILL), never by name: the daemon leads
its own process group, and the group is signalled, so the processes serving connections go too.
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
from typing import TypeVar

import trustme

from benchmarks._realstack import _pid_alive, _read_pid
from roundtrip.certs import CertificateAuthority
from roundtrip.errors import ServerStartError

__all__ = ["EximPeer", "MaildirPeer", "exim_unavailable_reason", "peers_dir"]

_Peer = TypeVar("_Peer", bound="MaildirPeer")

#: Where ``.ci/run`` unpacks the MTA packages that conflict with the installed Postfix.
PEERS_DIR_VARIABLE = "ROUNDTRIP_PEERS_DIR"
_DEFAULT_PEERS_DIR = "/opt/roundtrip-peers"
_EXIM_USER = "Debian-exim"
_STOP_TIMEOUT = 10.0
_START_TIMEOUT = 20.0
#: Interval between two looks at a Maildir or a log while polling toward a deadline.
_POLL_INTERVAL = 0.02


def peers_dir() -> str:
    """The directory the conflicting MTA packages are unpacked into."""
    return os.environ.get(PEERS_DIR_VARIABLE) or _DEFAULT_PEERS_DIR


def _exim_binary() -> str:
    return os.path.join(peers_dir(), "usr", "sbin", "exim4")


def common_unavailable_reason() -> str | None:
    """What every peer started in a mount namespace needs (None when all is there)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare(1) or mount(8) is missing (util-linux, mount)"
    if os.geteuid() != 0:
        return "needs root (the MTA's privilege separation, a mount namespace, ports 25 and 53)"
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return "the 'nobody' account is missing"
    return None


def exim_unavailable_reason() -> str | None:
    """Why an Exim peer cannot run here (None when it can)."""
    exim = _exim_binary()
    if not os.path.exists(exim):
        return (
            f"{exim} is missing (unpack exim4-daemon-light, exim4-base and exim4-config into"
            f" ${PEERS_DIR_VARIABLE} with apt-get download + dpkg-deb -x, as .ci/run does)"
        )
    reason = common_unavailable_reason()
    if reason is not None:
        return reason
    try:
        pwd.getpwnam(_EXIM_USER)
    except KeyError:
        return f"the {_EXIM_USER!r} account is missing (Exim drops privileges to it)"
    return None


class MaildirPeer:
    """What the Exim and OpenSMTPD peers share: files under one temporary directory, the
    Maildirs a test reads, log polling, and a stop by PID.

    Subclasses set ``name`` and implement ``_launch`` (start the daemon), ``pid`` and
    ``log_path``.
    """

    name = "peer"

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
    ) -> None:
        self.ca = ca
        self.domain = domain
        self.users = tuple(users)
        self.mx_name = mx_name
        self.host = host
        self.port = port
        self.nameserver = nameserver
        self.dir = ""
        self.start_duration = 0.0
        self.final_log = ""

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

    #: The account that writes the Maildirs.
    mail_owner = "nobody"

    def _leaf(self) -> trustme.LeafCert:
        """The certificate the peer presents: for ``mx_name``, from the stack's CA."""
        return self.ca.leaf([self.mx_name])

    def _write_common(self) -> None:
        """resolv.conf, the TLS files, and one Maildir per user owned by ``mail_owner``."""
        self._write("resolv.conf", f"nameserver {self.nameserver}\noptions timeout:2 attempts:2\n")
        leaf = self._leaf()
        self._write("tls/key.pem", leaf.private_key_pem.bytes(), mode=0o600)
        self._write("tls/cert.pem", b"".join(p.bytes() for p in leaf.cert_chain_pems))
        self._write("tls/ca.pem", self.ca.pem)
        owner = pwd.getpwnam(self.mail_owner)
        for user in self.users:
            for sub in ("", "new", "cur", "tmp"):
                path = self._path("mail", user, sub)
                os.makedirs(path, exist_ok=True)
                os.chown(path, owner.pw_uid, owner.pw_gid)
        os.chown(self._path("mail"), owner.pw_uid, owner.pw_gid)
        os.makedirs(self._path("log"), exist_ok=True)

    # -- life cycle ----------------------------------------------------------------------

    def _write_config(self) -> None:
        raise NotImplementedError

    def _daemon_command(self) -> str:
        """The shell command run after the bind mounts, inside the namespace."""
        raise NotImplementedError

    def _extra_mounts(self) -> str:
        """Shell commands run in the namespace before the daemon (after resolv.conf's)."""
        return ""

    def pid(self) -> int | None:
        """The daemon's PID, from its pid file."""
        raise NotImplementedError

    def log_path(self) -> str:
        raise NotImplementedError

    def start(self: _Peer) -> _Peer:
        """Write the configuration and start the daemon in its mount namespace.

        Returns once its listener greets (within ``_START_TIMEOUT`` seconds).

        Raises:
            ServerStartError: the daemon failed to start or never greeted.
        """
        began = time.monotonic()
        self.dir = tempfile.mkdtemp(prefix=f"rt-{self.name}-")
        os.chmod(self.dir, 0o755)  # the daemon's unprivileged users must reach the files
        self._write_config()
        script = (
            f"mount --bind {self._path('resolv.conf')} /etc/resolv.conf"
            f"{self._extra_mounts()} && exec {self._daemon_command()}"
        )
        self._launch(script)
        self._await_greeting(time.monotonic() + _START_TIMEOUT)
        self.start_duration = time.monotonic() - began
        return self

    def _launch(self, script: str) -> None:
        """Run ``script`` in a new mount namespace; it must daemonise and return."""
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
            raise ServerStartError(f"{self.name}: {script!r} took over {_START_TIMEOUT} s") from exc
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).decode(errors="replace")
            self.stop()
            raise ServerStartError(f"{self.name}: {script!r} exited {proc.returncode}: {out}")

    def _exit_status(self) -> int | None:
        """The daemon's exit status if this helper launched it and it has exited."""
        return None

    def _await_greeting(self, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            status = self._exit_status()
            if status is not None:
                log = self.log()[-2000:]
                self.stop()
                raise ServerStartError(f"{self.name} exited {status} before greeting:\n{log}")
            try:
                with smtplib.SMTP(self.host, self.port, timeout=2) as client:
                    client.noop()
                return
            except (OSError, smtplib.SMTPException) as exc:
                last = exc
                time.sleep(_POLL_INTERVAL)  # sleep-ok: nothing signals here; poll to a deadline
        log = self.log()[-2000:]
        self.stop()
        raise ServerStartError(
            f"{self.name} on {self.host}:{self.port} never greeted: {last!r}\n{log}"
        )

    #: Whether the daemon leads its own process group whose members (the processes it forked
    #: per connection, which outlive it) are stopped with it.
    own_process_group = False

    def _kill(self, pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.own_process_group and os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    def _running(self, pid: int) -> bool:
        if not self.own_process_group:
            return _pid_alive(pid)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> None:
        """Stop the daemon by its PID (SIGTERM, then SIGKILL) and remove the directory."""
        if not self.dir:
            return
        pid = self.pid()
        if pid is not None and pid > 1 and _pid_alive(pid):
            self._kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + _STOP_TIMEOUT
            while self._running(pid) and time.monotonic() < deadline:
                time.sleep(_POLL_INTERVAL)  # sleep-ok: a foreign process's exit gives no event
            if self._running(pid):
                self._kill(pid, signal.SIGKILL)
        self.final_log = self.log()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = ""

    def __enter__(self: _Peer) -> _Peer:
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
        """The daemon's log so far."""
        if not self.dir:
            return self.final_log
        try:
            with open(self.log_path(), encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except (FileNotFoundError, NotADirectoryError):
            return ""

    def mark(self) -> int:
        """A position in the log; ``wait_for_log(..., since=mark)`` looks only past it."""
        return len(self.log())

    def send(self, mail_from: str, rcpt: str, message: bytes) -> None:
        """Inject a message over SMTP into the listener (it relays for 127.0.0.0/8)."""
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
                    f" subjects seen: {subjects!r}\n{self.name} log:\n{self.log()[-3000:]}"
                )
            time.sleep(_POLL_INTERVAL)  # sleep-ok: nothing signals here; poll to a deadline

    def wait_for_log(self, *needles: str, timeout: float, since: int = 0) -> str:
        """The first log line containing every one of ``needles``, within ``timeout``, in the
        part of the log written after ``since`` (a :meth:`mark`).

        Raises:
            AssertionError: no such line in time; shows the end of the log.
        """
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log()[since:].splitlines():
                if all(n in line for n in needles):
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no {self.name} log line with {needles!r} after {timeout:g} s:\n"
                    f"{self.log()[-3000:]}"
                )
            time.sleep(_POLL_INTERVAL)  # sleep-ok: nothing signals here; poll to a deadline


class EximPeer(MaildirPeer):
    """A loopback Exim serving ``domain`` and sending through the stack's DNS (see the
    module's docstring for the arguments, which are the Postfix peer's)."""

    name = "exim"
    # Exim re-executes itself with ``-C`` to receive and deliver, and so runs as its own user
    # from then on ("exim user lost privilege for using -C option"): it cannot switch to
    # another account for local delivery.
    mail_owner = _EXIM_USER
    # The daemon calls setsid(); a process serving a connection (say, one the stack's relay
    # keeps cached) outlives a SIGTERM to the daemon and would log into a removed directory.
    own_process_group = True

    def exim_conf(self) -> str:
        """The text of the configuration file given with ``-C``."""
        d = self.dir
        users = " : ".join(self.users)
        return f"""\
# A foreign MTA for roundtrip's interop tests; nothing here is read from /etc/exim4.
exim_path = {_exim_binary()}
exim_user = {_EXIM_USER}
exim_group = {_EXIM_USER}
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
pid_file_path = {d}/exim.pid
primary_hostname = {self.mx_name}
qualify_domain = {self.domain}
local_interfaces = <; {self.host}
daemon_smtp_ports = {self.port}
disable_ipv6 = true
domainlist local_domains = {self.domain}
hostlist relay_from_hosts = <; 127.0.0.0/8
acl_smtp_rcpt = acl_check_rcpt
host_lookup =
rfc1413_hosts =
never_users = root
keep_environment =
log_selector = +tls_peerdn +tls_certificate_verified +received_recipients
tls_advertise_hosts = *
tls_certificate = {d}/tls/cert.pem
tls_privatekey = {d}/tls/key.pem
tls_verify_certificates =
ignore_bounce_errors_after = 0s
timeout_frozen_after = 1m

begin acl

acl_check_rcpt:
  accept domains = +local_domains
         local_parts = {users}
  deny   domains = +local_domains
         message = 5.1.1 <$local_part@$domain>: user unknown
  accept hosts = +relay_from_hosts
  deny   message = 5.7.1 relay not permitted

begin routers

dnslookup:
  driver = dnslookup
  domains = ! +local_domains
  transport = remote_smtp
  no_more

local_user:
  driver = accept
  domains = +local_domains
  local_parts = {users}
  transport = local_maildir

begin transports

remote_smtp:
  driver = smtp
  hosts_require_tls = *
  tls_verify_certificates = {d}/tls/ca.pem
  tls_verify_hosts = *
  tls_verify_cert_hostnames = *
  hosts_try_dane =

local_maildir:
  driver = appendfile
  directory = {d}/mail/$local_part_data
  maildir_format
  create_directory
  # $local_part_data: the entry of the router's local_parts list, untainted (Exim 4.94+).
  delivery_date_add
  envelope_to_add
  return_path_add
  user = {_EXIM_USER}
  group = {_EXIM_USER}
  mode = 0600

begin retry

*  *  F,1h,5m
"""

    def _write_config(self) -> None:
        self._write_common()
        self._write("exim.conf", self.exim_conf())
        exim = pwd.getpwnam(_EXIM_USER)
        for sub in ("spool", "log"):
            os.makedirs(self._path(sub), mode=0o750, exist_ok=True)
            os.chown(self._path(sub), exim.pw_uid, exim.pw_gid)
        # Exim reads its key after dropping to its own user.
        for name in ("key.pem", "cert.pem", "ca.pem"):
            os.chown(self._path("tls", name), exim.pw_uid, exim.pw_gid)

    def _daemon_command(self) -> str:
        # -bd: daemon (it forks; the pid file names the listener); -q5m: a queue runner for
        # deferred mail, rarely reached within a test.
        return f"{_exim_binary()} -C {self._path('exim.conf')} -bd -q5m"

    def pid(self) -> int | None:
        return _read_pid(self._path("exim.pid")) if self.dir else None

    def log_path(self) -> str:
        return self._path("log", "mainlog")

    def exim(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Run the unpacked Exim with this peer's configuration (``-bp``, ``-Mrm``, ...)."""
        return subprocess.run(
            [_exim_binary(), "-C", self._path("exim.conf"), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_STOP_TIMEOUT,
            check=False,
        )

    def lines_for(self, message_id: str, *, timeout: float) -> list[str]:
        """Every mainlog line of the message whose Message-ID is ``message_id`` (Exim's
        ``id=`` on its arrival line names it), waiting up to ``timeout`` for the arrival."""
        arrival = self.wait_for_log("<= ", f"id={message_id}", timeout=timeout)
        exim_id = arrival.split()[2]
        return [line for line in self.log().splitlines() if f" {exim_id} " in line]

    def delete_queue(self) -> None:
        """Drop every queued message, so no retry outlives a test."""
        ids = self.exim("-bpr").stdout.decode(errors="replace")
        queued = [
            line.split()[2]
            for line in ids.splitlines()
            if line[:1].isspace() and len(line.split()) >= 3 and "-" in line.split()[2]
        ]
        if queued:
            self.exim("-Mrm", *queued)
