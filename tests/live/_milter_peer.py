"""Real Debian mail filters next to a Postfix peer: OpenDKIM and OpenDMARC, or Rspamd, as
Postfix milters that write Authentication-Results (RFC 8601) on the mail Postfix receives.

Each filter runs in the foreground (``-f``) with a configuration written into a temporary
directory (nothing read from ``/etc/opendkim.conf``, ``/etc/opendmarc.conf`` or the
machine's Rspamd local configuration), listens on a Unix socket in that directory (mode
0666, so Postfix's ``smtpd``, running as ``postfix``, can connect), and drops to its Debian
account (``opendkim``, ``opendmarc``, ``_rspamd``) after starting as root.

They resolve DKIM keys, SPF and DMARC records through the stack's DNS. OpenDKIM and
OpenDMARC use the C library's resolver (``/etc/resolv.conf``, port 53), so each starts, as
Postfix does in ``tests/live/_postfix_peer.py``, in a private mount namespace whose
``/etc/resolv.conf`` is a bind mount of a file naming 127.0.0.1; Rspamd is told the server
directly (``options { dns { nameserver } }``) and runs in such a namespace too.

What has to be turned off for mail from loopback to be checked at all:

- OpenDKIM signs, not verifies, mail from ``InternalHosts`` (127.0.0.1 by default): ``Mode
  v`` and an ``InternalHosts`` list naming only 192.0.2.1 (RFC 5737 documentation space);
- OpenDMARC skips mail from ``IgnoreHosts`` (127.0.0.1 by default): the same list. It does
  not verify DKIM itself but reads OpenDKIM's Authentication-Results, which it trusts when
  the authserv-id is in ``TrustedAuthservIDs``: both use Postfix's host name. It checks SPF
  itself (``SPFSelfValidate``);
- Rspamd's SPF and DKIM modules skip local and authenticated senders unless
  ``check_local``/``check_authed``; ``milter_headers`` likewise (``skip_local``,
  ``skip_authenticated``). ``local_addrs`` is emptied. Only the ``rspamd_proxy`` worker runs
  (``milter = yes``, ``self_scan = yes``); the normal, controller and fuzzy workers are
  disabled, so none of the ports 11332-11335 is bound.

Every filter is started in a process group of its own and stopped through it (the PID of
the process started here): SIGTERM, then SIGKILL for anything of the group still running.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType

from roundtrip.errors import ServerStartError

__all__ = ["Filter", "OpenDKIM", "OpenDMARC", "Rspamd", "filter_unavailable_reason"]

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
_POLL_INTERVAL = 0.05

#: The programs and the Debian accounts they run as.
_PROGRAMS = {
    "opendkim": ("/usr/sbin/opendkim", "opendkim"),
    "opendmarc": ("/usr/sbin/opendmarc", "opendmarc"),
    "rspamd": ("/usr/bin/rspamd", "_rspamd"),
}
#: A host list that matches no loopback client (RFC 5737 documentation address).
_NO_LOCAL_HOSTS = "192.0.2.1\n"


def filter_unavailable_reason(*names: str) -> str | None:
    """Why the filters ``names`` (keys of ``_PROGRAMS``) cannot run here (None when they can)."""
    for name in names:
        path, account = _PROGRAMS[name]
        if not os.path.exists(path):
            return f"{path} is missing (apt-get install --no-install-recommends {name})"
        try:
            pwd.getpwnam(account)
        except KeyError:
            return f"the {account!r} account of {name} is missing"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare(1) or mount(8) is missing (util-linux, mount)"
    if os.geteuid() != 0:
        return "needs root (the filters drop to their own accounts after starting)"
    return None


class Filter:
    """One milter process: its directory, configuration, socket and life cycle.

    Args:
        authserv_id: the authserv-id it writes (Postfix's host name).
        nameserver: the DNS server written into its private resolv.conf.
    """

    name = ""
    #: Seconds from start to a socket that accepts.
    start_timeout = _START_TIMEOUT

    def __init__(self, *, authserv_id: str, nameserver: str = "127.0.0.1") -> None:
        self.authserv_id = authserv_id
        self.nameserver = nameserver
        self.dir = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.final_log = ""

    # -- files -------------------------------------------------------------------------

    @property
    def account(self) -> pwd.struct_passwd:
        return pwd.getpwnam(_PROGRAMS[self.name][1])

    @property
    def socket_path(self) -> str:
        return os.path.join(self.dir, "run", f"{self.name}.sock")

    @property
    def milter(self) -> str:
        """The address Postfix's ``smtpd_milters`` names."""
        return f"unix:{self.socket_path}"

    def _write(self, rel: str, text: str) -> str:
        path = os.path.join(self.dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(path, 0o644)
        return path

    def _own_dir(self, rel: str) -> str:
        """A directory the filter's account writes to."""
        path = os.path.join(self.dir, rel)
        os.makedirs(path, mode=0o755, exist_ok=True)
        os.chown(path, self.account.pw_uid, self.account.pw_gid)
        return path

    def write_config(self) -> None:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> Filter:
        """Write the configuration, start the filter, return once its socket accepts.

        Raises:
            ServerStartError: the filter exited, or its socket never accepted in time.
        """
        self.dir = tempfile.mkdtemp(prefix=f"rt-{self.name}-")
        os.chmod(self.dir, 0o755)
        self._own_dir("run")
        self._write("resolv.conf", f"nameserver {self.nameserver}\noptions timeout:2 attempts:2\n")
        self.write_config()
        script = (
            f"mount --bind {os.path.join(self.dir, 'resolv.conf')} /etc/resolv.conf && exec "
            + " ".join(self.command())
        )
        log = open(os.path.join(self.dir, "output.log"), "wb")  # noqa: SIM115 - the child's
        with log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group, so that stop() reaches helpers the filter forks
                # (Rspamd's hs_helper outlives a main process stopped mid-compilation).
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                out = self.log()
                self.stop()
                raise ServerStartError(f"{self.name} exited {self.proc.returncode}: {out[-2000:]}")
            if self._accepts():
                return self
            if time.monotonic() >= deadline:
                out = self.log()
                self.stop()
                raise ServerStartError(
                    f"{self.name}'s socket {self.socket_path} never accepted: {out[-2000:]}"
                )
            time.sleep(_POLL_INTERVAL)  # sleep-ok: a foreign daemon's start gives no event

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            try:
                probe.connect(self.socket_path)
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """Stop the process started here and its process group (whose id is that PID):
        SIGTERM, then SIGKILL for what is left; remove the directory."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    pass
            # Whatever of the group outlived the main process (a helper it forked).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=_STOP_TIMEOUT)
        if self.dir:
            self.final_log = self.log()
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def log(self) -> str:
        """What the filter wrote so far (its output, and its log file when it has one)."""
        if not self.dir:
            return self.final_log
        text = ""
        for name in ("output.log", "log/filter.log"):
            path = os.path.join(self.dir, name)
            with (
                contextlib.suppress(FileNotFoundError),
                open(path, encoding="utf-8", errors="replace") as fh,
            ):
                text += fh.read()
        return text

    def __enter__(self) -> Filter:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class OpenDKIM(Filter):
    """OpenDKIM 2.11 verifying only (``Mode v``), adding its result even to unsigned mail."""

    name = "opendkim"

    def write_config(self) -> None:
        hosts = self._write("etc/no-local-hosts", _NO_LOCAL_HOSTS)
        self._write(
            "etc/opendkim.conf",
            f"""\
# Verify only: InternalHosts names no loopback address, so loopback mail is verified.
Mode v
Socket local:{self.socket_path}
UMask 000
UserID {self.account.pw_name}:{self.account.pw_name}
AuthservID {self.authserv_id}
AlwaysAddARHeader yes
InternalHosts refile:{hosts}
Nameservers {self.nameserver}
Background no
Syslog no
LogWhy yes
""",
        )

    def command(self) -> list[str]:
        return [_PROGRAMS[self.name][0], "-f", "-x", os.path.join(self.dir, "etc/opendkim.conf")]


class OpenDMARC(Filter):
    """OpenDMARC 1.4 checking SPF itself and reading OpenDKIM's verdicts of the same
    authserv-id; failures are reported, never rejected."""

    name = "opendmarc"

    def write_config(self) -> None:
        hosts = self._write("etc/no-local-hosts", _NO_LOCAL_HOSTS)
        psl = "/usr/share/publicsuffix/public_suffix_list.dat"
        self._write(
            "etc/opendmarc.conf",
            f"""\
Socket local:{self.socket_path}
UMask 000
UserID {self.account.pw_name}:{self.account.pw_name}
AuthservID {self.authserv_id}
TrustedAuthservIDs {self.authserv_id}
IgnoreHosts {hosts}
SPFSelfValidate true
SPFIgnoreResults true
RejectFailures false
FailureReports false
RequiredHeaders false
Background false
Syslog false
"""
            + (f"PublicSuffixList {psl}\n" if os.path.exists(psl) else ""),
        )

    def command(self) -> list[str]:
        return [_PROGRAMS[self.name][0], "-f", "-c", os.path.join(self.dir, "etc/opendmarc.conf")]


def _hyperscan_cache(account: pwd.struct_passwd) -> str:
    """A directory kept across runs for Rspamd's compiled Hyperscan databases.

    Compiling the URL matcher for the 9609 suffixes of
    ``/usr/share/rspamd/effective_tld_names.dat`` takes about 20 s on two cores; with the
    database cached (``hs_cache_dir``), a later start takes a few seconds. The files are
    derived from Debian's data only, each named by a hash of what it was compiled
    from: a changed input gets a new file.
    """
    path = os.path.join(tempfile.gettempdir(), "roundtrip-rspamd-hyperscan")
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chown(path, account.pw_uid, account.pw_gid)
    return path


class Rspamd(Filter):
    """Rspamd 3.4's proxy worker as a milter (``milter = yes``), scanning by itself
    (``self_scan``), with the Debian configuration and local overrides in a temporary
    ``LOCAL_CONFDIR``."""

    name = "rspamd"
    #: The first start on a machine compiles Hyperscan databases: about 30 s on two cores.
    start_timeout = 180.0

    def write_config(self) -> None:
        self._own_dir("db")
        self._own_dir("log")
        cache = _hyperscan_cache(self.account)
        self._write(
            "local/local.d/options.inc",
            f"""\
hs_cache_dir = "{cache}/";
local_addrs = [];
dns {{
  nameserver = ["{self.nameserver}:53"];
  timeout = 2s;
  retransmits = 2;
}}
""",
        )
        disabled = "enabled = false;\n"
        self._write("local/override.d/worker-normal.inc", disabled)
        self._write("local/override.d/worker-controller.inc", disabled)
        self._write("local/override.d/worker-fuzzy.inc", disabled)
        self._write(
            "local/override.d/worker-proxy.inc",
            f"""\
bind_socket = "{self.socket_path} mode=0666";
milter = yes;
timeout = 60s;
count = 1;
upstream "local" {{
  default = yes;
  self_scan = yes;
}}
discard_on_reject = false;
quarantine_on_reject = false;
""",
        )
        self._write(
            "local/override.d/logging.inc",
            f'type = "file";\nfilename = "{self.dir}/log/filter.log";\nlevel = "info";\n',
        )
        # Never reject or greylist: the test reads the verdicts in what is delivered.
        self._write(
            "local/local.d/actions.conf",
            "reject = 10000;\nadd_header = 9999;\ngreylist = null;\nrewrite_subject = null;\n",
        )
        for module in ("spf", "dkim", "dmarc"):
            self._write(
                f"local/local.d/{module}.conf", "check_local = true;\ncheck_authed = true;\n"
            )
        self._write(
            "local/local.d/milter_headers.conf",
            """\
use = ["authentication-results"];
skip_local = false;
skip_authenticated = false;
routines {
  authentication-results {
    header = "Authentication-Results";
  }
}
""",
        )
        # No Redis here: the modules that need it stay off rather than retrying it.
        self._write("local/local.d/redis.conf", "")
        self._write("local/local.d/greylist.conf", "enabled = false;\n")
        # A verifier only: no signing of what it takes for local or authenticated mail.
        self._write("local/local.d/dkim_signing.conf", "enabled = false;\n")

    def command(self) -> list[str]:
        d = self.dir
        return [
            _PROGRAMS[self.name][0],
            "-f",
            "-u",
            self.account.pw_name,
            "-g",
            self.account.pw_name,
            "-c",
            "/etc/rspamd/rspamd.conf",
            f"--var=LOCAL_CONFDIR={d}/local",
            f"--var=DBDIR={d}/db",
            f"--var=RUNDIR={d}/run",
            f"--var=LOGDIR={d}/log",
            f"--var=ROOT_DIR={d}",
        ]
