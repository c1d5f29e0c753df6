"""A real OpenSMTPD as a foreign MTA next to a stack: it resolves MX records through the
stack's DNS, sends to the stack's MX over verified STARTTLS, and receives mail the stack relays
to it.

Theory of operation
-------------------
Debian's ``opensmtpd`` conflicts with the installed Postfix, so it is unpacked (``apt-get
download`` then ``dpkg-deb -x``) into ``$ROUNDTRIP_PEERS_DIR`` (default
``/opt/roundtrip-peers``), as ``.ci/run`` does; the daemon is ``usr/sbin/smtpd`` there.

OpenSMTPD 6.8 has paths compiled in that no option moves: its queue ``/var/spool/smtpd``, the
chroot of its unprivileged processes ``/var/lib/opensmtpd/empty``, its control socket
``/run/smtpd.sock``, the delivery helpers under ``/usr/libexec/opensmtpd``, and (like every MTA
here) ``/etc/resolv.conf``. It runs in a private mount namespace where each of those is a fresh
tmpfs or a bind mount, so nothing on the machine is touched and everything vanishes with the
namespace::

    unshare --mount --propagation private sh -c '
        mount --bind DIR/resolv.conf /etc/resolv.conf &&
        mount -t tmpfs tmpfs /var/spool && mount -t tmpfs tmpfs /var/lib && mkdir ... &&
        mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /usr/libexec && mkdir ... &&
        mount --bind $ROUNDTRIP_PEERS_DIR/usr/libexec/opensmtpd /usr/libexec/opensmtpd &&
        exec smtpd -d -f DIR/smtpd.conf'

``smtpd -d`` stays in the foreground (OpenSMTPD writes no pid file) and logs to stderr, which
goes to ``DIR/log/smtpd.log``; ``unshare`` and ``sh`` exec in place, so the process this helper
launches is the daemon's parent, and it is stopped by that PID (SIGTERM, then SIGKILL).

The configuration (``smtpd.conf``):

- one listener on ``host:port`` (127.0.0.10:25) offering STARTTLS with a certificate for
  ``mx_name`` from the stack's CA, and one on ``plain_host``
  (127.0.0.11:25) without STARTTLS; mail from 127.0.0.0/8 (and local bounces) is relayed;
- relaying is ``relay tls``: mandatory STARTTLS and a verified certificate; the CA is the stack
  CA (``ca`` directive for the server's own name);
- ``domain``'s users, a ``virtual`` table mapping each to ``nobody``, are delivered by
  ``mail.maildir`` into ``DIR/mail/<user>/``; other recipients of ``domain`` get 550.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess

from _exim_peer import MaildirPeer, common_unavailable_reason, peers_dir

__all__ = ["OpenSMTPDPeer", "opensmtpd_unavailable_reason"]

_ACCOUNTS = ("opensmtpd", "opensmtpq")
_COMMAND_TIMEOUT = 10.0


def _smtpd_binary() -> str:
    return os.path.join(peers_dir(), "usr", "sbin", "smtpd")


def opensmtpd_unavailable_reason() -> str | None:
    """Why an OpenSMTPD peer cannot run here (None when it can)."""
    smtpd = _smtpd_binary()
    if not os.path.exists(smtpd):
        return (
            f"{smtpd} is missing (unpack opensmtpd into $ROUNDTRIP_PEERS_DIR with"
            " apt-get download + dpkg-deb -x, as .ci/run does)"
        )
    reason = common_unavailable_reason()
    if reason is not None:
        return reason
    if shutil.which("nsenter") is None:
        return "nsenter(1) is missing (util-linux): smtpctl must run in the daemon's namespace"
    for account in _ACCOUNTS:
        try:
            pwd.getpwnam(account)
        except KeyError:
            return f"the {account!r} account is missing (OpenSMTPD's privilege separation)"
    return None


class OpenSMTPDPeer(MaildirPeer):
    """A loopback OpenSMTPD serving ``domain`` and sending through the stack's DNS (the
    arguments are the Postfix peer's)."""

    name = "opensmtpd"
    _proc: subprocess.Popen[bytes] | None = None
    #: A second listener, on port ``port`` of this address, that offers no STARTTLS (set it
    #: before ``start``): the stack's relay can deliver there in plaintext (see the tests).
    plain_host = "127.0.0.11"

    def smtpd_conf(self) -> str:
        """The text of smtpd.conf."""
        d = self.dir
        mx = self.mx_name
        users = ", ".join(f'"{u}@{self.domain}" = "nobody"' for u in self.users)
        rcpts = ", ".join(f'"{u}@{self.domain}"' for u in self.users)
        maildir = f"/usr/libexec/opensmtpd/mail.maildir {d}/mail/%{{rcpt.user}}"
        return f"""\
# A foreign MTA for roundtrip's interop tests; nothing here is read from /etc.
pki {mx} cert "{d}/tls/cert.pem"
pki {mx} key "{d}/tls/key.pem"
ca {mx} cert "{d}/tls/ca.pem"
table users {{ {users} }}
listen on {self.host} port {self.port} hostname {mx} tls pki {mx}
listen on {self.plain_host} port {self.port} hostname {mx}
action "local" mda "{maildir}" virtual <users>
action "relay" relay tls helo {mx}
match from any for domain "{self.domain}" rcpt-to {{ {rcpts} }} action "local"
match from any for domain "{self.domain}" reject
match from src 127.0.0.0/8 for any action "relay"
match from local for any action "relay"
"""

    def _write_config(self) -> None:
        self._write_common()
        self._write("smtpd.conf", self.smtpd_conf())

    def _extra_mounts(self) -> str:
        libexec = os.path.join(peers_dir(), "usr", "libexec", "opensmtpd")
        return (
            " && mount -t tmpfs -o mode=755 tmpfs /var/spool"
            " && mount -t tmpfs -o mode=755 tmpfs /var/lib"
            " && mkdir -p /var/lib/opensmtpd/empty"
            " && mount -t tmpfs -o mode=755 tmpfs /run"
            " && mount -t tmpfs -o mode=755 tmpfs /usr/libexec"
            " && mkdir /usr/libexec/opensmtpd"
            f" && mount --bind {libexec} /usr/libexec/opensmtpd"
        )

    def _daemon_command(self) -> str:
        return f"{_smtpd_binary()} -d -f {self._path('smtpd.conf')}"

    def _launch(self, script: str) -> None:
        with open(self.log_path(), "wb") as log:
            self._proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _exit_status(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        super().stop()
        if self._proc is not None:
            self._proc.wait(timeout=_COMMAND_TIMEOUT)  # reaped: stop() saw it exit
            self._proc = None

    def log_path(self) -> str:
        return self._path("log", "smtpd.log")

    def smtpctl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Run ``smtpctl`` inside the daemon's namespace (its control socket lives there)."""
        pid = self.pid()
        if pid is None:
            raise RuntimeError("OpenSMTPD is not running")
        smtpctl = os.path.join(peers_dir(), "usr", "sbin", "smtpctl")
        return subprocess.run(
            ["nsenter", "--mount", f"--target={pid}", smtpctl, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_COMMAND_TIMEOUT,
            check=False,
        )

    def delete_queue(self) -> None:
        """Drop every queued envelope, so no retry outlives a test."""
        self.smtpctl("remove", "all")
