"""A real Postfix + Dovecot pair on loopback, for validator integration tests and benchmarks.

Theory of operation
-------------------
``RealMailServer`` writes a complete, private configuration for the Debian packages
``postfix``, ``dovecot-imapd``, ``dovecot-pop3d`` and ``dovecot-lmtpd`` under one temporary
directory and starts both daemons from it. Nothing under ``/etc`` is read for settings or
written, and no system service is started or stopped:

- Postfix runs as ``postfix -c DIR start`` with its own ``queue_directory``,
  ``data_directory`` and ``maillog_file``. It listens on 127.0.0.1 only: implicit-TLS
  submission (RFC 8314, "465") and STARTTLS submission (RFC 6409, "587"), plus an optional
  unauthenticated MX listener ("25"). Every outbound transport is ``error:``, so nothing
  leaves the machine, except for the foreign domains of ``relay_to``: their mail goes over
  SMTP with STARTTLS required to the loopback MX listener of another instance (two
  instances, one per domain, relay to each other; ``benchmarks/sections/load.py``).
  Mail for ``domain`` goes through Dovecot LMTP over a unix socket.
  No service is chrooted: the sockets live in the temporary directory.
- Dovecot runs as ``dovecot -F -c FILE`` (our child, output to a log file, because it keeps
  the caller's stdout open) with its own ``base_dir`` and ``state_dir``: IMAPS, POP3S, IMAP
  and POP3 with STARTTLS on 127.0.0.1, a passwd-file passdb, Maildir storage owned by
  ``nobody``, and the SASL socket that Postfix authenticates against.
- Ports are found by binding port 0 and closing the socket before the daemons bind them,
  which races with other programs; a start that fails is retried once on fresh ports.
- Both daemons are stopped by the PID in their pid files (SIGTERM, then SIGKILL).

Broken variants (for proving that a validator notices) are constructor knobs: a bad TLS
certificate, AUTH offered before STARTTLS, mail silently discarded, mail delivered twice, and
mail whose body the relay rewrites.

``profile`` chooses the security settings the issue #18 validator is proven against:
``"harness"`` (the default: TLS 1.2 and up, Postfix's default bare-newline handling, LMTP
over a unix socket), ``"stock"`` (what Debian 12's packages do out of the box: Postfix 3.7
accepts TLS 1.0 and 1.1, and takes a bare LF as a line end in DATA, CVE-2023-51764) and
``"hardened"`` (TLS 1.2 and up, ``smtpd_forbid_bare_newline = normalize`` with no exclusions,
and LMTP to Dovecot over TCP with STARTTLS required, so that every hop is encrypted).

It needs root (Postfix's master insists on it) and the packages above; ``is_available()``
says why not when they are missing.

The text of every configuration file comes from ``benchmarks/_realstack_config.py``; this
module creates the directories, writes the files and runs the daemons.

It lives under ``benchmarks/``, not in the ``roundtrip`` package: only this repository's
benchmarks and ``tests/live`` use it, so the wheel does not ship it.
"""

from __future__ import annotations

import contextlib
import datetime
import grp
import ipaddress
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Literal

from benchmarks._realstack_config import (
    ALTERED_SUFFIX,
    dovecot_conf,
    postfix_main_cf,
    postfix_maps,
    postfix_master_cf,
)
from roundtrip.certs import CertificateAuthority
from roundtrip.errors import ConfigError, ServerStartError

__all__ = ["ALTERED_SUFFIX", "PROFILE_CHOICES", "TLS_CERT_CHOICES", "RealMailServer"]

TLSCertKind = Literal["good", "wrong_host", "expired", "untrusted"]
TLS_CERT_CHOICES: tuple[str, ...] = ("good", "wrong_host", "expired", "untrusted")
Profile = Literal["harness", "stock", "hardened"]
PROFILE_CHOICES: tuple[str, ...] = ("harness", "stock", "hardened")
#: main.cf settings each profile changes (``None``: the line is removed, Postfix's default
#: applies; for Postfix 3.7.11 ``smtpd_tls_protocols = >=TLSv1`` and
#: ``smtpd_forbid_bare_newline = no``).
_PROFILE_MAIN_CF: dict[str, dict[str, str | None]] = {
    "harness": {},
    "stock": {"smtpd_tls_protocols": None, "smtpd_tls_mandatory_protocols": None},
    "hardened": {
        "smtpd_tls_protocols": ">=TLSv1.2",
        "smtpd_tls_mandatory_protocols": ">=TLSv1.2",
        "smtpd_forbid_bare_newline": "normalize",
        # The default exclusion is $mynetworks, which holds every loopback client.
        "smtpd_forbid_bare_newline_exclusions": "",
        "lmtp_tls_security_level": "encrypt",
    },
}

#: Port names, in the order they are allocated.
_PORT_NAMES = ("submissions", "submission", "imaps", "imap", "pop3s", "pop3")
_IMPLICIT_TLS_PORTS = frozenset({"submissions", "imaps", "pop3s"})

_POSTFIX = "/usr/sbin/postfix"
_POSTFIX_DAEMON_DIR = "/usr/lib/postfix/sbin"
_DOVECOT = "/usr/sbin/dovecot"
_DOVECOT_LMTP = "/usr/lib/dovecot/lmtp"
_REQUIRED_ACCOUNTS = ("postfix", "dovecot", "dovenull", "nobody")

#: sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
_STOP_TIMEOUT = 10.0
#: The longest unix socket path below the work directory (one of Dovecot's in base_dir).
_LONGEST_SOCKET = os.path.join("run", "replication-notify-fifo")


def _free_ports(host: str, count: int) -> list[int]:
    """Ports the kernel hands out for port 0 right now (closed again before returning)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _untraversable_ancestor(path: str) -> str | None:
    """The first directory from ``/`` down to ``path`` that other users cannot enter."""
    current = "/"
    for part in [p for p in path.split(os.sep) if p]:
        current = os.path.join(current, part)
        try:
            mode = os.stat(current).st_mode
        except FileNotFoundError:
            return None
        if not mode & stat.S_IXOTH:
            return current
    return None


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaps counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            proc_stat = fh.read()
    except OSError:
        return False
    # The state letter follows the command name in parentheses, which may contain spaces.
    # A zombie counts as gone: PID 1 of a container may never reap the daemonised master.
    return proc_stat.rpartition(")")[2].split()[:1] != ["Z"]


def _read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().split()
    except OSError:
        return None
    return int(text[0]) if text and text[0].isdigit() else None


def _override_main_cf(text: str, settings: Mapping[str, str | None]) -> str:
    """``text`` (main.cf) with each ``name = value`` of ``settings`` replacing the line that
    sets ``name`` (appended when none does); a value of None removes the line."""
    lines = text.splitlines()
    for name, value in settings.items():
        at = [i for i, line in enumerate(lines) if line.split("=", 1)[0].strip() == name]
        for index in reversed(at):
            del lines[index]
        if value is not None:
            lines.insert(at[0] if at else len(lines), f"{name} = {value}")
    return "\n".join(lines) + "\n"


class RealMailServer:
    """A loopback Postfix + Dovecot mail server under a private temporary directory.

    Use it as a context manager, or call ``start()`` and ``stop()``.

    Args:
        domain: the one mail domain served (virtual mailbox domain); the host name is
            ``mail.<domain>``.
        host: the loopback address every listener binds. Dovecot counts a client whose
            address equals the server's as secure and then allows plaintext logins before
            STARTTLS; a different address such as ``127.0.0.2`` (the client's source stays
            127.0.0.1) gives the behaviour remote clients see.
        users: login -> password. A login without ``@`` gets ``@<domain>`` appended; logins
            are full addresses. Defaults to ``alice`` and ``bob``.
        ca: the CA that issues the server certificate (a new one by default).
        workdir: the parent directory of the temporary directory (``tempfile`` default).
        startup_timeout: seconds to wait for every listener to complete a TLS handshake.
        tls_cert: ``"good"``; ``"wrong_host"`` (a leaf for ``wrong.invalid`` only);
            ``"expired"`` (validity ended yesterday); ``"untrusted"`` (issued by another CA).
        allow_plaintext_auth_on_starttls_port: offer AUTH before STARTTLS on ``submission``
            and accept mail there without TLS.
        discard_mail: accept mail for the domain and silently drop it.
        duplicate_delivery: deliver every message for the domain twice.
        alter_body: append ``ALTERED_SUFFIX`` to every non-empty body line in transit.
        mx: also listen as an unauthenticated MX (STARTTLS offered) under ``ports["smtp"]``.
        mx_port: with ``mx``, the MX listener's port instead of a free one, so that another
            instance can be told where to relay before either starts.
        relay_to: foreign domain -> ``(host, port)`` of another instance's MX listener (a
            loopback address). Mail for those domains leaves over SMTP with STARTTLS required
            (``smtp_tls_security_level = encrypt``, ``smtp_tls_CAfile`` = this ``ca``); every
            other foreign domain still meets ``error:``. The next hop is written ``[host]:port``
            (no MX look-up), which Postfix relays to even on one of its own addresses, so both
            instances of a pair may share 127.0.0.1.
        profile: ``"harness"``, ``"stock"`` or ``"hardened"`` (see the module docstring);
            ``"hardened"`` adds ``ports["lmtp"]``, Dovecot's LMTP listener on TCP.
        keep: leave the temporary directory in place after ``stop()`` (for debugging).
    """

    def __init__(
        self,
        *,
        domain: str = "example.net",
        host: str = "127.0.0.1",
        users: Mapping[str, str] | None = None,
        ca: CertificateAuthority | None = None,
        workdir: str | None = None,
        startup_timeout: float = 20.0,
        tls_cert: TLSCertKind = "good",
        allow_plaintext_auth_on_starttls_port: bool = False,
        discard_mail: bool = False,
        duplicate_delivery: bool = False,
        alter_body: bool = False,
        mx: bool = False,
        keep: bool = False,
        profile: Profile = "harness",
        mx_port: int | None = None,
        relay_to: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        if profile not in PROFILE_CHOICES:
            raise ConfigError(f"profile={profile!r} is not one of {', '.join(PROFILE_CHOICES)}")
        if tls_cert not in TLS_CERT_CHOICES:
            raise ConfigError(f"tls_cert={tls_cert!r} is not one of {', '.join(TLS_CERT_CHOICES)}")
        if not domain or any(c in domain for c in " \t\r\n/:@,") or domain != domain.lower():
            raise ConfigError(f"domain={domain!r}: expected a lower-case DNS name")
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError(host)
        except ValueError:
            raise ConfigError(f"host={host!r}: expected a loopback IP address") from None
        if mx_port is not None and (not mx or not 0 < mx_port < 65536):
            raise ConfigError(f"mx_port={mx_port!r}: expected a port number, with mx=True")
        self.relay_to = self._check_relays(relay_to or {}, domain)
        if users is None:
            users = {"alice": "alice-" + secrets.token_hex(8), "bob": "bob-" + secrets.token_hex(8)}
        self.domain = domain
        self.users: dict[str, str] = {}
        for login, password in users.items():
            address = login if "@" in login else f"{login}@{domain}"
            local, _, user_domain = address.partition("@")
            if user_domain != domain:
                raise ConfigError(f"user {login!r} is outside domain {domain!r}")
            bad = set(":\r\n\t #+") & set(address) or set(":\r\n") & set(password)
            if not local or bad or not password:
                raise ConfigError(f"user {login!r}: unusable login or password for passwd-file")
            self.users[address] = password
        self.ca = ca if ca is not None else CertificateAuthority()
        self.host = host
        self.hostname = f"mail.{domain}"
        self.startup_timeout = startup_timeout
        self.tls_cert: TLSCertKind = tls_cert
        self.allow_plaintext_auth_on_starttls_port = allow_plaintext_auth_on_starttls_port
        self.discard_mail = discard_mail
        self.duplicate_delivery = duplicate_delivery
        self.alter_body = alter_body
        self.mx = mx
        self.mx_port = mx_port
        self.keep = keep
        self.profile: Profile = profile
        self.ports: dict[str, int] = {}
        self.start_duration = 0.0
        self._parent_dir = workdir
        self._workdir: str | None = None
        self._dovecot: subprocess.Popen[bytes] | None = None
        self._started = False
        self._quick_start = True
        self._final_log = ""

    # -- public API ----------------------------------------------------------------------

    @staticmethod
    def is_available() -> tuple[bool, str]:
        """Whether this machine can run the harness.

        Returns:
            ``(True, "")``, or ``(False, reason)`` naming what is missing.
        """
        missing = [
            path
            for path in (_POSTFIX, f"{_POSTFIX_DAEMON_DIR}/master", _DOVECOT, _DOVECOT_LMTP)
            if not os.access(path, os.X_OK)
        ]
        if missing:
            return False, (
                f"missing {', '.join(missing)}: apt-get install postfix dovecot-imapd "
                "dovecot-pop3d dovecot-lmtpd"
            )
        if not os.path.exists("/usr/lib/dovecot/pop3") or not os.path.exists(
            "/usr/lib/dovecot/imap"
        ):
            return (
                False,
                "Dovecot IMAP or POP3 missing: apt-get install dovecot-imapd dovecot-pop3d",
            )
        for account in _REQUIRED_ACCOUNTS:
            try:
                pwd.getpwnam(account)
            except KeyError:
                return False, f"system account {account!r} missing (created by the packages)"
        if os.geteuid() != 0:
            return False, "Postfix's master daemon must be started as root"
        return True, ""

    @property
    def workdir(self) -> str:
        """The temporary directory holding configs, queue, mailboxes and logs."""
        if self._workdir is None:
            raise ServerStartError("RealMailServer has not been started")
        return self._workdir

    def start(self) -> RealMailServer:
        """Write the configuration, start Postfix and Dovecot, wait until every port is ready.

        Returns:
            ``self``.

        Raises:
            ServerStartError: the packages are missing, a daemon refused its configuration,
                or a listener did not complete a TLS handshake within ``startup_timeout``.
        """
        if self._started:
            return self
        ok, reason = self.is_available()
        if not ok:
            raise ServerStartError(f"Postfix + Dovecot harness unavailable: {reason}")
        began = time.monotonic()
        for attempt in (1, 2):
            try:
                self._start_once()
            except ServerStartError:
                # Another program may have taken a port between our probe and the bind.
                self._stop_processes()
                self._remove_workdir(force=attempt == 1)
                if attempt == 2:
                    raise
                # The second try lets ``postfix start`` run its own integrity checks.
                self._quick_start = False
            except BaseException:
                self._stop_processes()
                self._remove_workdir(force=False)
                raise
            else:
                break
        self._started = True
        self.start_duration = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop both daemons (SIGTERM, then SIGKILL) and remove the directory. Idempotent."""
        self._stop_processes()
        self._started = False
        if self._workdir is not None:
            self._final_log = self.log_text()
        self._remove_workdir(force=False)

    def log_text(self) -> str:
        """The Postfix and Dovecot logs so far (after ``stop()``: as they were at the end)."""
        if self._workdir is None:
            return self._final_log
        parts = []
        for name in ("postfix.log", "postfix-start.log", "dovecot.log", "dovecot-stdout.log"):
            path = os.path.join(self._workdir, "log", name)
            try:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    text = fh.read()
            except FileNotFoundError:
                continue
            if text:
                parts.append(f"==> {name} <==\n{text}")
        return "\n".join(parts)

    def mailbox_address(self, login: str) -> str:
        """The full address for ``login`` (``alice`` -> ``alice@<domain>``)."""
        return login if "@" in login else f"{login}@{self.domain}"

    def __enter__(self) -> RealMailServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._started else "stopped"
        return f"<RealMailServer {self.domain} {state} ports={self.ports}>"

    # -- start-up ------------------------------------------------------------------------

    @staticmethod
    def _check_relays(
        relays: Mapping[str, tuple[str, int]], domain: str
    ) -> dict[str, tuple[str, int]]:
        checked: dict[str, tuple[str, int]] = {}
        for foreign, (relay_host, relay_port) in relays.items():
            if foreign == domain or not foreign or any(c in foreign for c in " \t\r\n/:@,[]"):
                raise ConfigError(f"relay_to: {foreign!r} is not a foreign domain name")
            try:
                loopback = ipaddress.ip_address(relay_host).is_loopback
            except ValueError:
                loopback = False
            if not loopback or not 0 < int(relay_port) < 65536:
                raise ConfigError(
                    f"relay_to[{foreign!r}] = {relay_host!r}:{relay_port!r}: expected a "
                    "loopback IP address and a port"
                )
            checked[foreign] = (relay_host, int(relay_port))
        return checked

    def _start_once(self) -> None:
        parent = self._parent_dir if self._parent_dir is not None else tempfile.gettempdir()
        # mkdtemp adds 8 characters to the prefix.
        parent = os.path.abspath(parent)
        longest = os.path.join(parent, "rt-mail-XXXXXXXX", _LONGEST_SOCKET)
        if len(longest.encode()) > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"workdir={parent!r} is too long for unix socket paths (at most "
                f"{_MAX_SOCKET_PATH} bytes); pass a shorter workdir="
            )
        blocked = _untraversable_ancestor(parent)
        if blocked is not None:
            raise ConfigError(
                f"workdir={parent!r}: {blocked!r} is not searchable by other users (mode o+x), "
                "so Postfix and Dovecot cannot reach their sockets after dropping root; pass "
                "another workdir="
            )
        self._workdir = tempfile.mkdtemp(prefix="rt-mail-", dir=parent)
        # Postfix and Dovecot drop privileges (postfix, dovenull, nobody) and must still reach
        # their sockets, queue and mailboxes below this directory.
        os.chmod(self._workdir, 0o755)
        names = [*_PORT_NAMES, "smtp"] if self.mx else list(_PORT_NAMES)
        if self.profile == "hardened":
            names.append("lmtp")
        self.ports = dict(zip(names, _free_ports(self.host, len(names)), strict=True))
        if self.mx_port is not None:
            self.ports["smtp"] = self.mx_port
        self._write_tls()
        self._write_dovecot()
        self._write_postfix()
        deadline = time.monotonic() + self.startup_timeout
        self._start_dovecot()
        self._start_postfix()
        self._wait_ready(deadline)

    def _path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def _mkdir(self, *parts: str, mode: int = 0o755) -> str:
        path = self._path(*parts)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)
        return path

    def _write(self, relpath: str, text: str | bytes, mode: int = 0o644) -> str:
        path = self._path(relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = text.encode() if isinstance(text, str) else text
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(path, mode)
        # Postfix pauses 300 ms at a time until a table or main.cf is over a second old
        # ("pausing to let ... cool down"): that alone cost 2.1 s of every start.
        cooled = time.time() - 10
        os.utime(path, (cooled, cooled))
        return path

    def _write_tls(self) -> None:
        names = tuple(dict.fromkeys((self.hostname, "localhost", "127.0.0.1", self.host)))
        now = datetime.datetime.now(datetime.UTC)
        if self.tls_cert == "good":
            leaf = self.ca.ca.issue_cert(*names)
        elif self.tls_cert == "wrong_host":
            leaf = self.ca.ca.issue_cert("wrong.invalid")
        elif self.tls_cert == "expired":
            leaf = self.ca.ca.issue_cert(
                *names,
                not_before=now - datetime.timedelta(days=30),
                not_after=now - datetime.timedelta(days=1),
            )
        else:
            other = CertificateAuthority()
            leaf = other.ca.issue_cert(*names)
        key = leaf.private_key_pem.bytes()
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        self._mkdir("tls")
        self._write("tls/key.pem", key, mode=0o600)
        self._write("tls/cert.pem", chain)
        if self.relay_to:
            # What Postfix's SMTP client trusts when it relays to another instance.
            self._write("tls/ca.pem", self.ca.pem)

    def _write_dovecot(self) -> None:
        nobody = pwd.getpwnam("nobody")
        self._mkdir("log")
        self._mkdir("sock")
        self._mkdir("run")
        self._mkdir("dovecot", "state")
        mail = self._mkdir("mail")
        os.chown(mail, nobody.pw_uid, nobody.pw_gid)
        self._write(
            "dovecot/users",
            "".join(f"{user}:{{PLAIN}}{pw}::::::\n" for user, pw in self.users.items()),
            mode=0o644,
        )
        conf = dovecot_conf(
            workdir=self.workdir,
            host=self.host,
            domain=self.domain,
            ports=self.ports,
            uid=nobody.pw_uid,
            gid=nobody.pw_gid,
        )
        if self.profile == "hardened":
            conf = self._lmtp_over_tcp(conf)
        self._write("dovecot/dovecot.conf", conf)

    def _lmtp_over_tcp(self, conf: str) -> str:
        """dovecot.conf with an LMTP listener on TCP beside the unix socket (Dovecot offers
        STARTTLS on it, and ``ssl = required`` already holds for the whole server)."""
        block = "service lmtp {\n"
        if block not in conf:
            raise ConfigError("dovecot.conf has no 'service lmtp' block to extend")
        listener = (
            f"  inet_listener lmtp {{\n    address = {self.host}\n"
            f"    port = {self.ports['lmtp']}\n  }}\n"
        )
        return conf.replace(block, block + listener, 1)

    def _write_postfix(self) -> None:
        etc = self._mkdir("postfix", "etc")
        self._make_queue()
        maps, extra = postfix_maps(
            etc=etc,
            domain=self.domain,
            users=self.users,
            discard_mail=self.discard_mail,
            duplicate_delivery=self.duplicate_delivery,
            alter_body=self.alter_body,
            relays=self.relay_to,
        )
        for name, text in maps.items():
            self._write(f"postfix/etc/{name}", text)
        main = postfix_main_cf(
            workdir=self.workdir,
            etc=etc,
            hostname=self.hostname,
            domain=self.domain,
            host=self.host,
            extra=extra,
        )
        master = postfix_master_cf(
            workdir=self.workdir,
            host=self.host,
            ports=self.ports,
            mx=self.mx,
            allow_plaintext_auth_on_starttls_port=self.allow_plaintext_auth_on_starttls_port,
        )
        settings = dict(_PROFILE_MAIN_CF[self.profile])
        if self.profile == "hardened":
            settings["virtual_transport"] = f"lmtp:inet:{self.host}:{self.ports['lmtp']}"
        if self.relay_to:
            settings["smtp_tls_security_level"] = "encrypt"
            settings["smtp_tls_CAfile"] = self._path("tls", "ca.pem")
        main = _override_main_cf(main, settings)
        self._write("postfix/etc/main.cf", main)
        self._write("postfix/etc/master.cf", master)

    def _make_queue(self) -> None:
        """Create the queue tree as Postfix's ``postfix-files`` describes it.

        ``postfix start`` would create it too, through ``post-install create-missing``, but that
        script costs about 2 s; with the tree in place a ``quick-start`` file skips it.
        """
        postfix = pwd.getpwnam("postfix")
        postdrop = grp.getgrnam("postdrop").gr_gid
        spool = self._mkdir("postfix", "spool")
        self._mkdir("postfix", "spool", "pid")
        for name in (
            "active",
            "bounce",
            "corrupt",
            "defer",
            "deferred",
            "flush",
            "hold",
            "incoming",
            "private",
            "saved",
            "trace",
        ):
            os.chown(self._mkdir("postfix", "spool", name, mode=0o700), postfix.pw_uid, 0)
        os.chown(self._mkdir("postfix", "spool", "maildrop", mode=0o730), postfix.pw_uid, postdrop)
        os.chown(self._mkdir("postfix", "spool", "public", mode=0o710), postfix.pw_uid, postdrop)
        data = self._mkdir("postfix", "data", mode=0o700)
        os.chown(data, postfix.pw_uid, postfix.pw_gid)
        if self._quick_start:
            self._write("postfix/spool/quick-start", b"")
        else:
            os.chmod(spool, 0o755)

    def _start_dovecot(self) -> None:
        conf = self._path("dovecot", "dovecot.conf")
        with open(self._path("log", "dovecot-stdout.log"), "ab") as out:
            # Our child in the foreground (-F): we can wait() for it, and it never holds a
            # pipe of ours open.
            self._dovecot = subprocess.Popen(
                [_DOVECOT, "-F", "-c", conf],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _start_postfix(self) -> None:
        etc = self._path("postfix", "etc")
        with open(self._path("log", "postfix-start.log"), "ab") as out:
            proc = subprocess.run(
                [_POSTFIX, "-c", etc, "start"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=self.startup_timeout,
                check=False,
            )
        if proc.returncode != 0:
            raise ServerStartError(
                f"'postfix -c {etc} start' exited {proc.returncode}: "
                f"{self._postfix_diagnosis(etc)}\n{self.log_text()}"
            )

    def _postfix_diagnosis(self, etc: str) -> str:
        """Postfix's own complaint, which it sends to syslog (absent in containers).

        Postfix also writes to stderr when stderr is a terminal, hence ``script``.
        """
        script = shutil.which("script")
        if script is None:
            return f"see syslog, or run: postfix -c {etc} check"
        try:
            proc = subprocess.run(
                [script, "-qec", f"{_POSTFIX} -c {etc} check", "/dev/null"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.startup_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"'postfix -c {etc} check' timed out"
        return proc.stdout.decode(errors="replace").strip() or "no message from postfix check"

    def _wait_ready(self, deadline: float) -> None:
        # Certificates may be broken on purpose, so readiness does not verify them.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        pending = dict(self.ports)
        last_error: dict[str, str] = {}
        while pending:
            for name, port in list(pending.items()):
                try:
                    self._probe(name, port, ctx, deadline)
                except (OSError, TimeoutError) as exc:
                    last_error[name] = repr(exc)
                else:
                    del pending[name]
            if self._dovecot is not None and self._dovecot.poll() is not None:
                raise ServerStartError(
                    f"dovecot exited with {self._dovecot.returncode} during start-up\n"
                    f"{self.log_text()}"
                )
            if not pending:
                break
            if time.monotonic() >= deadline:
                detail = ", ".join(f"{n}:{self.ports[n]} ({last_error.get(n)})" for n in pending)
                raise ServerStartError(
                    f"Postfix/Dovecot listeners not ready after {self.startup_timeout} s: "
                    f"{detail}; raise startup_timeout if the machine is slow\n{self.log_text()}"
                )
            # A bounded poll interval between connection attempts, not synchronisation.
            time.sleep(0.02)

    def _probe(self, name: str, port: int, ctx: ssl.SSLContext, deadline: float) -> None:
        """Complete a TLS handshake (implicit-TLS ports) or read the greeting (others)."""
        timeout = max(0.1, min(2.0, deadline - time.monotonic()))
        with socket.create_connection((self.host, port), timeout=timeout) as raw:
            if name in _IMPLICIT_TLS_PORTS:
                with ctx.wrap_socket(raw, server_hostname=self.hostname) as tls:
                    greeting = tls.recv(512)
            else:
                greeting = raw.recv(512)
        if not greeting:
            raise ConnectionResetError(f"{name}: closed before the greeting")

    # -- shutdown ------------------------------------------------------------------------

    def _stop_processes(self) -> None:
        if self._workdir is None:
            return
        pids = [
            _read_pid(self._path("postfix", "spool", "pid", "master.pid")),
            _read_pid(self._path("run", "master.pid")),
        ]
        if self._dovecot is not None:
            pids.append(self._dovecot.pid)
        live = {pid for pid in pids if pid is not None and pid > 1 and _pid_alive(pid)}
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if self._dovecot is not None and self._dovecot.returncode is None:
            # Dovecot's master waits about 1 s for its children after SIGTERM; they share the
            # process group we gave it (start_new_session), so end them together.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._dovecot.pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while live and time.monotonic() < deadline:
            if self._dovecot is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._dovecot.wait(timeout=0.01)
            live = {pid for pid in live if _pid_alive(pid)}
            if live:
                time.sleep(0.02)
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._dovecot is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._dovecot.wait(timeout=_STOP_TIMEOUT)
            self._dovecot = None

    def _remove_workdir(self, *, force: bool) -> None:
        if self._workdir is None:
            return
        if force or not self.keep:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
