"""The ``roundtrip`` command: ``serve`` a local mail world, ``probe`` a round trip.

Exit codes: 0 the round trip (every check) passed, 1 it failed, 2 usage or configuration error.
``probe --fail-on warn`` also exits 1 on a warning finding. ``probe --nagios`` follows the
Nagios plugin API instead: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (the probe could not run).

``probe --json`` prints one JSON document whose ``schema_version`` key tells its shape
(``roundtrip.report.SCHEMA_VERSION``, now 2). When the probe cannot run at all (a usage error,
exit 2, or a stack that cannot start, exit 1), ``--json`` still prints one document:
``{"schema_version": 2, "ok": false, "error": "<message>", "exit_code": <code>}``, and the
message also goes to stderr as without ``--json``. ``serve --json`` prints its ready line
unchanged; only its usage errors get the error document.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ipaddress
import json
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from .config import PASSWORD_ENV, Endpoint, StackConfig, parse_endpoint
from .errors import ConfigError, RoundtripError
from .probes.roundtrip import TIMINGS, ProbeResult, Thresholds, run_probe
from .report import SCHEMA_VERSION, expiry_text, percentile

if TYPE_CHECKING:
    from .stack import DeliveredMessage

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: ``probe --nagios`` only: the probe could not run (exit 0, 1 and 2 are OK, WARNING and
#: CRITICAL there).
EXIT_NAGIOS_UNKNOWN = 3


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise _UsageError(f"{self.prog}: error: {message}")


def _version() -> str:
    """The installed distribution's version, else the package's ``__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("roundtrip")
    except PackageNotFoundError:
        # The package itself is always imported before this module (no import: layering).
        return str(getattr(sys.modules.get(__package__ or "roundtrip"), "__version__", "unknown"))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="roundtrip",
        description="Prove e-mail works end to end: submit, route, deliver, retrieve, verify.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser(
        "serve",
        help="run a local mail stack until Ctrl-C or SIGTERM",
        description="Run a local mail world until Ctrl-C (SIGINT) or SIGTERM, then exit 0. "
        "Every --domain gets SMTP for incoming mail (MX, 25), submission with implicit TLS "
        "(465) and with STARTTLS (587), POP3 with STLS (110) and POP3S (995), IMAP with "
        "STARTTLS (143) and IMAPS (993); one DNS server (53) answers MX and A queries for "
        "the domains. With --ports ephemeral (the default) each listener takes a free port "
        "on --host instead; the ready message (or the --json line) lists every endpoint, the "
        "users with their passwords, and the CA file to trust (the certificates are minted "
        "at each start). Without --user, each domain has user@<domain> with a password "
        "generated anew at each start; --user ADDRESS:PASSWORD (repeatable, replacing the "
        "default users) gives stable passwords that scripts can keep; a user of a domain not "
        "listed adds that domain. --ports 10000 gives fixed, unprivileged ports. Each stored "
        "message prints one line on stderr (--quiet: none). Mail to domains outside the "
        "stack never leaves the machine: it is captured (with --maildir, in the folder "
        "DIR/outbound@roundtrip.invalid/) and shown as such. Unknown local parts get 550 "
        "5.1.1 unless --catch-all. Mail lives in memory and is lost at exit, unless --maildir "
        "DIR keeps it in Maildir++ folders that survive restarts.",
    )
    _add_serve_options(serve)

    probe = sub.add_parser(
        "probe",
        help="submit a tagged message and find it again (embedded stack, or a real server)",
        description="Without --smtp, runs on an embedded stack: submit on 465 with AUTH from "
        "user@example.com to user@example.org, retrieve over IMAPS and POP3S. Passwords come "
        "only from ROUNDTRIP_SMTP_PASSWORD, ROUNDTRIP_IMAP_PASSWORD, ROUNDTRIP_POP3_PASSWORD. "
        "Certificates are always verified. --imap and --pop3 may be combined: each is probed "
        "(one path each). Exit codes: 0 every check passed, 1 a check failed, 2 usage or "
        "configuration error (--nagios: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN). The checks "
        "are listed in docs/checks.md. --json prints one document with schema_version "
        f'{SCHEMA_VERSION}; if the probe cannot run, {{"ok": false, "error": ..., '
        '"exit_code": ...}.',
    )
    _add_probe_options(probe)
    _add_exporter_parser(sub)
    return parser


def _add_exporter_parser(sub: Any) -> None:
    exporter = sub.add_parser(
        "exporter",
        help="serve round-trip probes to Prometheus (/probe?target=NAME, /metrics)",
        description="Serve /probe?target=NAME in blackbox_exporter's style: each scrape runs "
        "one round trip of the named target of the TOML configuration and answers its "
        "metrics (probe_success, durations per step, TLS facts, findings); /metrics has the "
        "exporter's own. Passwords come from password_env or password_file, never from a "
        "URL. Runs until Ctrl-C or SIGTERM. Exit 2 on a bad configuration (the message "
        "names the line). See docs/exporter.md.",
    )
    exporter.add_argument("--config", required=True, metavar="FILE", help="the TOML targets file")
    exporter.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to serve on (default 127.0.0.1:9465; port 0 picks a free one)",
    )
    exporter.set_defaults(json=False)


def _add_serve_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--domain",
        action="append",
        default=[],
        metavar="NAME",
        help="a mail domain to serve (repeatable; default example.com, example.org)",
    )
    serve.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="ADDRESS[:PASSWORD]",
        help="a mailbox (repeatable; replaces the default user@<domain>; with :PASSWORD the "
        "password is stable across restarts, without one it is generated at each start)",
    )
    serve.add_argument(
        "--ports",
        default="ephemeral",
        metavar="{ephemeral,standard,BASE}",
        help="ephemeral: free ports on --host (default); standard: 25, 465, 587, 110, 995, "
        "143, 993, 53 on 127.0.0.N (needs root); a number such as 10000: fixed unprivileged "
        "ports on --host, BASE + the standard port (10025, 10465, 10587, 10110, 10995, "
        "10143, 10993, DNS 10053) for the first domain, 1000 higher for each next one, so "
        "an application is configured once",
    )
    serve.add_argument(
        "--catch-all",
        action="append",
        nargs="?",
        const="*",
        default=[],
        metavar="DOMAIN",
        help="accept mail for any address of DOMAIN (every domain without a value) and "
        "deliver it to that domain's first user, as MailHog and Mailpit accept every "
        "recipient (repeatable)",
    )
    serve.add_argument(
        "--quiet",
        action="store_true",
        help="do not print a line on stderr for each message stored (from, to, subject, hops)",
    )
    serve.add_argument(
        "--host",
        action="append",
        help="address to bind the ephemeral ports on (default 127.0.0.1); a non-loopback "
        "address such as 0.0.0.0 exposes the servers to the network and prints a warning; "
        "repeat the option to listen on several addresses, each service on one port "
        "(127.0.0.1 then ::1: dual stack; the endpoints printed name the first)",
    )
    serve.add_argument(
        "--json", action="store_true", help="print one JSON line once every listener is ready"
    )
    serve.add_argument(
        "--maildir",
        metavar="DIR",
        help="keep mail durably in Maildir++ folders under DIR (fsync before every 250; "
        "survives restarts; readable by mutt and Dovecot)",
    )
    serve.add_argument(
        "--web",
        nargs="?",
        const="",
        metavar="HOST:PORT",
        help="serve a web page of the mailboxes, messages, journeys and relay queue (needs "
        "pip install roundtrip[web]); default 127.0.0.1 and a free port; a non-loopback "
        "address prints a warning; the URL and the token for deleting are printed "
        '(--json: the "web" and "web_token" keys)',
    )


def _add_probe_options(probe: argparse.ArgumentParser) -> None:
    probe.add_argument(
        "--smtp",
        metavar="URL",
        help="smtps://USER@HOST[:PORT] (implicit TLS, 465) or smtp://... (STARTTLS required, 587)",
    )
    probe.add_argument("--imap", metavar="URL", help="imaps://USER@HOST[:PORT] or imap://...")
    probe.add_argument("--pop3", metavar="URL", help="pop3s://USER@HOST[:PORT] or pop3://...")
    probe.add_argument(
        "--from", dest="mail_from", metavar="ADDR", help="envelope sender (default: the SMTP user)"
    )
    probe.add_argument(
        "--to", dest="rcpt_to", metavar="ADDR", help="recipient (default: the IMAP/POP3 user)"
    )
    probe.add_argument(
        "--cafile",
        metavar="PEM",
        help="CA certificates to verify servers with (default: system store)",
    )
    probe.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the message (default 30)",
    )
    probe.add_argument("--keep", action="store_true", help="do not delete the probe message")
    probe.add_argument(
        "--json",
        action="store_true",
        help=f"print one JSON document (schema_version {SCHEMA_VERSION})",
    )
    probe.add_argument(
        "--count",
        type=int,
        default=1,
        metavar="N",
        help="run the round trip N times per path and report p50/p95/max per path (default 1)",
    )
    probe.add_argument(
        "--interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="pause between two runs of --count (default 0)",
    )
    probe.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print the session transcript of every connection after the steps (credentials "
        "redacted, message content as its size and SHA-256); without it, only a failed "
        "probe prints one: that of the connection it failed on. With --count, the runs that "
        "passed keep their transcripts only in the latest run of each path (--json too)",
    )
    probe.add_argument(
        "--junit-xml", metavar="FILE", help="also write the results as JUnit XML to FILE"
    )
    probe.add_argument(
        "--prometheus",
        metavar="FILE",
        help="also write Prometheus text-format metrics to FILE (node_exporter textfile)",
    )
    probe.add_argument(
        "--fail-on",
        choices=("warn", "fail"),
        default="fail",
        help="the mildest finding severity that makes the exit code 1 (default fail: a "
        'warning alone exits 0); --json gives the verdict under "verdict"',
    )
    probe.add_argument(
        "--warn",
        action="append",
        default=[],
        metavar="[STEP=]SECONDS",
        help="a warning finding when the submit, deliver or fetch time is above SECONDS "
        "(repeatable; STEP= limits it to one of them: --warn deliver=5; a list works too: "
        "--warn submit=2,deliver=5); submit: SMTP connect to the reply to DATA; deliver: "
        "that reply to the message showing in the mailbox; fetch: retrieving it",
    )
    probe.add_argument(
        "--crit",
        action="append",
        default=[],
        metavar="[STEP=]SECONDS",
        help="like --warn, but a failing finding and a failed check (exit 1; Nagios CRITICAL)",
    )
    probe.add_argument(
        "--nagios",
        action="store_true",
        help="print a Nagios/Icinga plugin's output (one status line with perfdata, then the "
        "findings) and exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (the probe could not "
        "run); not with --json",
    )
    probe.add_argument(
        "--tls-scan",
        action="store_true",
        help="also try each TLS version (1.0 to 1.3) on its own with each server, and a TLS "
        "1.2 cipher suite without forward secrecy (five extra handshakes per server, first "
        "run of --count only, no credentials): the versions are an info finding, accepting "
        "that cipher suite is a warning (docs/checks.md)",
    )
    probe.add_argument(
        "--html",
        metavar="FILE",
        help="also write a self-contained HTML report to FILE (waterfall per round trip, "
        "latency histogram with --count, TLS facts, findings, transcripts)",
    )
    _add_active_options(probe)
    _add_auth_options(probe)


def _add_auth_options(probe: argparse.ArgumentParser) -> None:
    """``--dns``: where the e-mail authentication checks look things up (docs/auth-checks.md)."""
    probe.add_argument(
        "--dns",
        metavar="HOST[:PORT]",
        help="the DNS server (an IP address, port 53 by default) for verifying the delivered "
        "copy's DKIM signatures and checking the sending domain's SPF, DMARC, MTA-STS, "
        "TLS-RPT, MX and reverse DNS; default the system resolver, except for a loopback "
        "--smtp, where those checks are skipped unless --dns is given (docs/auth-checks.md)",
    )
    probe.add_argument(
        "--mta-sts-policy",
        nargs="?",
        const=443,
        type=int,
        metavar="PORT",
        help="also fetch the sending domain's MTA-STS policy over HTTPS (from port 443, or "
        "PORT) and check it against its MX hosts; without it, only the TXT record is checked",
    )


def _add_active_options(probe: argparse.ArgumentParser) -> None:
    """``--checks`` and ``--mx``: the opt-in active checks (docs/active-checks.md)."""
    probe.add_argument(
        "--checks",
        metavar="GROUP[,GROUP...]|all",
        help="after the round trip, run active checks of a server you own (with --smtp): "
        "starttls-injection, plaintext-auth, open-relay, spoofing, pipelining, chunking, "
        "smuggling, brute-force, or all; they send extra connections and mail, only ever to "
        "the probe's own mailbox; the run says which groups it skipped and why "
        "(docs/active-checks.md)",
    )
    probe.add_argument(
        "--mx",
        metavar="HOST[:PORT]",
        help="the MX for --checks open-relay, starttls-injection, plaintext-auth and "
        "smuggling (inbound) (default: port 25 of the --smtp host, when it answers)",
    )


def _wants_json(argv: Sequence[str]) -> bool:
    """Whether ``--json`` (or an abbreviation argparse accepts) is among the options."""
    for token in argv:
        if token == "--":
            break
        if len(token) >= len("--js") and "--json".startswith(token):
            return True
    return False


def _wants_nagios(argv: Sequence[str]) -> bool:
    """Whether ``probe --nagios`` (or an abbreviation argparse accepts) was asked for."""
    for token in argv:
        if token == "--":
            break
        if len(token) >= len("--na") and "--nagios".startswith(token):
            return True
    return False


def _unknown(message: str, out: TextIO) -> int:
    """``--nagios``: the probe could not run (Nagios UNKNOWN, exit 3)."""
    print(message, file=sys.stderr)
    text = " ".join(message.replace("|", "/").split())
    print(f"ROUNDTRIP UNKNOWN - {text}", file=out, flush=True)
    return EXIT_NAGIOS_UNKNOWN


def _fail(message: str, code: int, out: TextIO, *, as_json: bool) -> int:
    """Report an error that kept the command from running: stderr, and stdout for --json."""
    print(message, file=sys.stderr)
    if as_json:
        doc = {"schema_version": SCHEMA_VERSION, "ok": False, "error": message, "exit_code": code}
        print(json.dumps(doc, indent=2), file=out, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    out = sys.stdout
    try:
        args = _parser().parse_args(tokens)
    except _UsageError as exc:
        if _wants_nagios(tokens):
            return _unknown(str(exc), out)
        return _fail(str(exc), EXIT_USAGE, out, as_json=_wants_json(tokens))
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    #: Set once the command printed its own JSON document (then no error document follows).
    args.printed = False
    try:
        if args.command == "serve":
            return _serve(args, out)
        if args.command == "exporter":
            from .exporter import run as run_exporter

            return run_exporter(args.config, args.listen, out)
        return _probe(args, out)
    except ConfigError as exc:
        if getattr(args, "nagios", False):
            return _unknown(f"roundtrip: {exc}", out)
        return _fail(f"roundtrip: {exc}", EXIT_USAGE, out, as_json=args.json and not args.printed)
    except RoundtripError as exc:
        if getattr(args, "nagios", False):
            return _unknown(f"roundtrip: {exc}", out)
        # serve's ready line is its one document: a later failure goes to stderr only.
        as_json = args.json and not args.printed
        return _fail(f"roundtrip: {exc}", EXIT_FAILED, out, as_json=as_json)


# serve


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace, out: TextIO) -> int:
    from .stack import MailStack

    config = StackConfig.from_strings(
        {
            "domains": args.domain,
            "users": args.user,
            "ports": args.ports,
            "host": (args.host or ["127.0.0.1"])[0],
            "extra_hosts": (args.host or [])[1:],
            "catch_all": args.catch_all,
        }
    )
    exposed = [h for h in (config.host, *config.extra_hosts) if not _is_loopback(h)]
    if config.ports != "standard" and exposed:
        print(
            f"roundtrip: warning: --host {exposed[0]} is not a loopback address: other "
            "machines can reach these servers, whose passwords are printed and whose "
            "certificates come from a throwaway CA",
            file=sys.stderr,
            flush=True,
        )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    store = None
    if args.maildir:
        from .maildir import MaildirStore

        store = MaildirStore(args.maildir)
    web_address = None if args.web is None else _web_address(args.web)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with MailStack(config, store=store) as stack, _web_view(stack, web_address) as web:
            if not args.quiet:
                stack.on_delivery(_delivery_printer(sys.stderr))
            if args.json:
                doc = stack.describe()
                if web is not None:
                    doc.update(web=web.url, web_token=web.token)
                print(json.dumps(doc, separators=(",", ":")), file=out, flush=True)
                args.printed = True
            else:
                _print_endpoints(stack, out)
                if web is not None:
                    print(f"  web          {web.url_with_token}", file=out, flush=True)
            while not stop.wait(0.5):
                stack.check()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_OK


def _web_address(text: str) -> tuple[str, int]:
    """``--web``'s address, checked before anything starts."""
    try:
        from .web import parse_address
    except ImportError as exc:
        raise ConfigError(f"--web needs aiohttp: pip install roundtrip[web] ({exc})") from None
    host, port = parse_address(text)
    if not _is_loopback(host):
        print(
            f"roundtrip: warning: --web {host} is not a loopback address: other machines can "
            "reach the web view (reading and deleting need its printed token)",
            file=sys.stderr,
            flush=True,
        )
    return host, port


@contextlib.contextmanager
def _web_view(stack: object, address: tuple[str, int] | None) -> Iterator[Any]:
    """The web view of ``stack`` on ``address`` while the block runs (None: no view, and
    nothing of it imported)."""
    if address is None:
        yield None
        return
    from .stack import MailStack
    from .web import WebView

    assert isinstance(stack, MailStack)
    with WebView(stack, host=address[0], port=address[1]) as view:
        yield view


def _delivery_printer(err: TextIO) -> Callable[[DeliveredMessage], None]:
    """One line per stored message: ``delivered: FROM -> TO "SUBJECT" (N hops)``.

    It runs on the stack's loop thread; a line is one short write.
    """

    def announce(message: DeliveredMessage) -> None:
        rcpt = ", ".join(message.envelope_to) or message.stored.user
        where = " [outbound capture: not sent]" if message.captured else ""
        if not message.captured and message.stored.user.lower() not in rcpt.lower():
            where = f" [catch-all: mailbox of {message.stored.user}]"
        hops = len(message.headers.get_all("Received"))
        sender = message.envelope_from or message.from_ or "<>"
        line = f"roundtrip: delivered: {sender} -> {rcpt}{where} {message.subject!r} ({hops} hops)"
        print(line, file=err, flush=True)

    return announce


def _print_endpoints(stack: object, out: TextIO) -> None:
    from .stack import MailStack

    assert isinstance(stack, MailStack)
    doc = stack.describe()
    print("roundtrip: mail stack ready (Ctrl-C to stop)", file=out)
    if "dns" in doc:
        print(f"  dns          {doc['dns']}", file=out)
    if "extra_hosts" in doc:
        print(f"  also on      {', '.join(doc['extra_hosts'])} (same ports)", file=out)
    for domain, services in doc["domains"].items():
        print(f"  {domain}", file=out)
        for service, endpoint in services.items():
            print(f"    {service:<12} {endpoint}", file=out)
    print("  users", file=out)
    for user in doc["users"]:
        print(f"    {user['address']}  password {user['password']}", file=out)
    print(f"  CA file      {doc['ca_file']}", file=out, flush=True)


# probe


def _probe(args: argparse.Namespace, out: TextIO) -> int:
    if args.timeout <= 0:
        raise ConfigError("--timeout must be greater than 0")
    if args.count < 1:
        raise ConfigError("--count must be at least 1")
    if args.interval < 0:
        raise ConfigError("--interval must not be negative")
    for option, path in (("--junit-xml", args.junit_xml), ("--prometheus", args.prometheus)):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ConfigError(f"{option} {path}: the directory does not exist")
    if args.html is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.html))):
        raise ConfigError(f"--html {args.html}: the directory does not exist")
    if args.nagios and args.json:
        raise ConfigError("--nagios and --json are two output modes: choose one")
    args.thresholds = Thresholds(
        warn=_thresholds(args.warn, "--warn"), crit=_thresholds(args.crit, "--crit")
    )
    for name, warn in args.thresholds.warn.items():
        crit = args.thresholds.crit.get(name)
        if crit is not None and warn > crit:
            raise ConfigError(f"--warn {name}={warn:g} is above --crit {name}={crit:g}")
    args.active_groups = _active_groups(args)
    args.dns_server = _dns_server(args)
    if args.smtp is None:
        if args.imap or args.pop3 or args.cafile:
            raise ConfigError("--imap, --pop3 and --cafile need --smtp (a real server)")
        return _probe_embedded(args, out)
    smtp = parse_endpoint(args.smtp, expect="smtp")
    if not (args.imap or args.pop3):
        raise ConfigError("--smtp needs --imap URL or --pop3 URL to find the message")
    readers = [
        parse_endpoint(url, expect=protocol)
        for protocol, url in (("imap", args.imap), ("pop3", args.pop3))
        if url
    ]
    for endpoint in (smtp, *readers):
        if endpoint.user and not endpoint.password:
            raise ConfigError(
                f"{endpoint.url}: set {PASSWORD_ENV[endpoint.protocol]} to the password of "
                f"{endpoint.user!r}"
            )
    try:
        context = (
            ssl.create_default_context(cafile=args.cafile)
            if args.cafile
            else ssl.create_default_context()
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--cafile {args.cafile}: cannot load CA certificates: {exc}") from None
    mail_from = args.mail_from or smtp.user
    # Each path mails its own reader's user unless --to names one recipient for all.
    paths = [(smtp, reader, args.rcpt_to or reader.user) for reader in readers]
    if not mail_from or not all(rcpt for _, _, rcpt in paths):
        raise ConfigError("give --from and --to, or users in the URLs")
    results = _repeat(args, paths, context=context, mail_from=mail_from)
    _run_active(args, results, paths, context=context, mail_from=mail_from)
    _run_posture(args, results, paths, mail_from=mail_from, context=context)
    title = f"{smtp.url} -> {', '.join(reader.url for reader in readers)}"
    return _finish(args, results, out, title=title)


def _dns_server(args: argparse.Namespace) -> tuple[str, int] | None:
    """``--dns``, parsed; only with ``--smtp`` (the embedded stack uses its own DNS).
    ``--mta-sts-policy`` is checked here too, before any round trip."""
    from .probes.authcheck import parse_dns_server

    args.auth = None
    port = args.mta_sts_policy
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--mta-sts-policy {port}: expected a port from 1 to 65535")
    if args.dns is None:
        return None
    if args.smtp is None:
        raise ConfigError("--dns needs --smtp: the embedded stack's checks use its own DNS")
    return parse_dns_server(args.dns)


def _run_posture(
    args: argparse.Namespace,
    results: list[ProbeResult],
    paths: list[tuple[Endpoint, Endpoint, str]],
    *,
    mail_from: str,
    context: ssl.SSLContext,
) -> None:
    """The sending domain's SPF, DMARC, MTA-STS, TLS-RPT and MX checks, once per run of the
    command, added to the latest run of the first path (so text, JSON and exit code include
    them); skipped, with an info finding, for a loopback target without ``--dns``."""
    from .probes.authcheck import check_posture, lookup_for, posture_skipped

    smtp = paths[0][0]
    domain = mail_from.rpartition("@")[2]
    lookup = lookup_for(args.dns_server, smtp, timeout=min(args.timeout, 10.0))
    if lookup is None or not domain:
        results[-len(paths)].findings.append(posture_skipped(domain, smtp))
        return
    port = args.mta_sts_policy
    policy = (context, port, min(args.timeout, 10.0)) if port is not None else None
    args.auth = check_posture(domain, lookup, mta_sts_policy=policy)
    args.auth.apply(results[-len(paths)])


def _active_groups(args: argparse.Namespace) -> tuple[str, ...]:
    """The ``--checks`` groups (none without the option); ``--mx`` checked too."""
    from .probes.active import parse_checks, parse_mx

    args.active = None
    args.mx_address = parse_mx(args.mx) if args.mx is not None else None
    if args.checks is None:
        if args.mx is not None:
            raise ConfigError("--mx is for --checks: give --checks open-relay (or all)")
        return ()
    if args.smtp is None:
        raise ConfigError(
            "--checks needs --smtp: active checks run only against a server you name and own"
        )
    return parse_checks(args.checks)


def _run_active(
    args: argparse.Namespace,
    results: list[ProbeResult],
    paths: list[tuple[Endpoint, Endpoint, str]],
    *,
    context: ssl.SSLContext,
    mail_from: str,
) -> None:
    """``--checks``: run the groups once, after the round trips, and add their findings and
    checks to the latest run of the first path (so text, JSON and exit code include them)."""
    if not args.active_groups:
        return
    from .probes.active import run_active_checks

    smtp, reader, rcpt_to = paths[0]
    active = run_active_checks(
        args.active_groups,
        smtp=smtp,
        reader=reader,
        context=context,
        mail_from=mail_from,
        rcpt_to=rcpt_to,
        timeout=args.timeout,
        mx=args.mx_address,
        keep=args.keep,
    )
    active.apply(results[-len(paths)])
    args.active = active
    if not args.json and not args.nagios:
        print(f"roundtrip: {active.summary()}", file=sys.stderr, flush=True)


def _thresholds(values: list[str], option: str) -> dict[str, float]:
    """``--warn``/``--crit`` values (``SECONDS``, ``STEP=SECONDS``, comma lists) as seconds
    per name of ``TIMINGS``; a bare number applies to every one of them."""
    limits: dict[str, float] = {}
    for value in values:
        for item in value.split(","):
            name, _, number = item.strip().rpartition("=")
            names = [name.strip().lower()] if name else list(TIMINGS)
            if names[0] not in TIMINGS:
                raise ConfigError(
                    f"{option} {value}: unknown step {name!r}; choose from {', '.join(TIMINGS)}"
                )
            try:
                seconds = float(number)
            except ValueError:
                seconds = -1.0
            if not seconds > 0 or seconds == float("inf"):
                raise ConfigError(f"{option} {value}: expected a number of seconds above 0")
            limits.update(dict.fromkeys(names, seconds))
    return limits


def _repeat(
    args: argparse.Namespace,
    paths: list[tuple[Endpoint, Endpoint, str]],
    *,
    context: ssl.SSLContext,
    mail_from: str,
    check: Callable[[], None] | None = None,
    settle: float | None = None,
) -> list[ProbeResult]:
    """``--count`` runs of every path (SMTP, reader, recipient), with a progress line per run
    on stderr."""
    results: list[ProbeResult] = []
    options: dict[str, Any] = {} if settle is None else {"settle": settle}
    for run in range(args.count):
        if run and args.interval:
            time.sleep(args.interval)  # pacing between runs, not synchronisation
        batch = [
            run_probe(
                smtp,
                reader,
                context=context,
                mail_from=mail_from,
                rcpt_to=rcpt_to,
                timeout=args.timeout,
                keep=args.keep,
                # One extra TLS 1.0/1.1 handshake per server and invocation is enough.
                check_legacy_tls=run == 0,
                scan_tls=run == 0 and args.tls_scan,
                thresholds=args.thresholds,
                auth_checks=True,
                dns=getattr(args, "dns_server", None),
                **options,
            )
            for smtp, reader, rcpt_to in paths
        ]
        if check is not None:
            check()
        if results:
            # A passing run's transcripts are shown only for the latest run of its path: the
            # earlier ones are dropped, so that memory stays bounded however large --count.
            for earlier in results[-len(batch) :]:
                if earlier.ok:
                    earlier.transcripts = []
        results += batch
        if args.count > 1 and not args.json:
            _progress(run + 1, args.count, batch, results, sys.stderr)
    return results


def _progress(
    done: int, count: int, batch: list[ProbeResult], results: list[ProbeResult], err: TextIO
) -> None:
    """After each run of ``--count``: on a terminal, one bar redrawn in place with the running
    p50 of each path; piped, one plain line per run (what scripts and CI logs read)."""
    if not err.isatty():
        parts = []
        for result in batch:
            visible = (
                f", visible {result.time_to_visible * 1000:.1f} ms"
                if result.time_to_visible is not None
                else ""
            )
            verdict = "PASS" if result.ok else f"FAIL at {result.error_step}"
            parts.append(
                f"{result.retrieve.partition(':')[0]} {verdict} "
                f"{result.total_seconds * 1000:.1f} ms{visible}"
            )
        print(f"roundtrip: run {done}/{count}: {'; '.join(parts)}", file=err, flush=True)
        return
    width = 20
    filled = width * done // count
    medians = []
    for protocol in dict.fromkeys(r.retrieve.partition(":")[0] for r in results):
        totals = [r.total_seconds for r in results if r.retrieve.startswith(protocol + ":")]
        medians.append(f"{protocol} p50 {percentile(totals, 0.5) * 1000:.1f} ms")
    failed = sum(1 for r in results if not r.ok)
    bar = "#" * filled + "-" * (width - filled)
    line = f"roundtrip: [{bar}] {done}/{count}  {', '.join(medians)}  failed {failed}"
    end = "\n" if done == count else ""
    print(f"\r\x1b[K{line}", end=end, file=err, flush=True)


def _finish(
    args: argparse.Namespace, results: list[ProbeResult], out: TextIO, *, title: str
) -> int:
    from . import report

    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "ok": all(r.ok for r in results),
        "target": title,
        "results": [r.as_dict() for r in results],
        "summary": report.summarize([r.as_dict() for r in results]),
    }
    if args.thresholds:
        doc["thresholds"] = {"warn": args.thresholds.warn, "crit": args.thresholds.crit}
    if getattr(args, "active", None) is not None:
        doc["active"] = args.active.as_dict()
    if getattr(args, "auth", None) is not None:
        doc["auth"] = args.auth.as_dict()
    doc["verdict"] = report.verdict(doc, fail_on=args.fail_on)
    if args.nagios:
        text, nagios_code = report.nagios(doc, fail_on=args.fail_on)
        print(text, end="", file=out)
    elif args.json:
        print(json.dumps(doc, indent=2), file=out)
        args.printed = True
    else:
        _report_human(results, doc, out, title=title, verbose=args.verbose)
    try:
        if args.junit_xml:
            report.write_atomically(args.junit_xml, report.junit_xml(doc))
        if args.prometheus:
            report.write_atomically(args.prometheus, report.prometheus_text(doc))
        if args.html:
            from .htmlreport import render

            report.write_atomically(args.html, render(doc))
    except OSError as exc:
        raise ConfigError(f"cannot write the report: {exc}") from None
    if args.nagios:
        return nagios_code
    # Without --fail-on warn, exactly today's rule: 1 when a round trip failed.
    return EXIT_OK if doc["verdict"]["exit_code"] == 0 else EXIT_FAILED


def _probe_embedded(args: argparse.Namespace, out: TextIO) -> int:
    from .stack import MailStack

    with MailStack(StackConfig()) as stack:
        sender = stack.user(stack.config.domains[0])
        recipient = stack.user(stack.config.domains[-1])
        smtp = stack.endpoint("submissions", sender)
        readers = [stack.endpoint("imaps", recipient), stack.endpoint("pop3s", recipient)]
        rcpt_to = args.rcpt_to or recipient.address
        # DKIM keys of the delivered copies are looked up in the stack's own DNS.
        args.dns_server = (stack.dns.host, stack.dns.port) if stack.dns else None
        results = _repeat(
            args,
            [(smtp, reader, rcpt_to) for reader in readers],
            context=stack.client_context(),
            mail_from=args.mail_from or sender.address,
            check=stack.check,
            # Every copy is stored at once by the embedded stack: a short settle suffices.
            settle=0.05,
        )
        stack.relay_idle()
        for result in results:
            result.journey = [
                {"step": hop.step, "host": hop.host, "at": hop.at}
                for hop in stack.journey(result.message_id)
            ]
    title = f"embedded stack ({', '.join(stack.config.domains)}) on {smtp.host}"
    return _finish(args, results, out, title=title)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def _print_result(result: ProbeResult, out: TextIO, *, verbose: bool = False) -> None:
    print(f"\n  {result.smtp} -> {result.retrieve}  (token {result.token})", file=out)
    for step in result.steps:
        mark = "ok  " if step.ok else "FAIL"
        detail = f"  {step.detail}" if step.detail else ""
        print(f"    {mark} {step.name:<16} {_ms(step.seconds)}  {step.server}{detail}", file=out)
    _print_transcripts(result, out, verbose=verbose)
    if result.time_to_visible is not None:
        print(f"    time to visible       {_ms(result.time_to_visible)}", file=out)
    for facts in result.tls:
        match = "yes" if facts.hostname_match else "NO"
        print(
            f"    tls  {facts.server:<21} {facts.version} {facts.cipher}; "
            f"subject {facts.subject}; issuer {facts.issuer}; "
            f"{expiry_text(facts.not_after, facts.days_left)}; "
            f"matches {facts.server_name}: {match}"
            f"{'' if facts.hostname_verified else ' (NOT VERIFIED: diagnostic handshake)'}",
            file=out,
        )
    for server, outcome in result.legacy_tls.items():
        print(f"    tls  {server:<21} TLS 1.0/1.1 offered: {outcome}", file=out)
    for timing in result.journey:
        print(
            f"    time {timing['at'] * 1000:8.2f} ms  {timing['step']:<22} {timing['host']}",
            file=out,
        )
    for hop in result.hops:
        print(
            f"    hop  {hop.from_ or '?'} -> {hop.by or '?'} with {hop.with_ or '?'}"
            f"{'' if hop.tls else '  (NO TLS)'}",
            file=out,
        )
    for name, ok in result.checks.items():
        print(f"    {'ok  ' if ok else 'FAIL'} check {name}", file=out)
    for finding in result.findings:
        print(f"    finding [{finding.severity}] {finding.message}", file=out)
        if finding.severity != "info":  # a hop's Received field is in --json
            for line in finding.evidence:
                print(f"      evidence: {line!r}", file=out)
    verdict = "PASS" if result.ok else f"FAIL at {result.error_step}: {_error_text(result)}"
    print(f"  {verdict}  (total {result.total_seconds * 1000:.1f} ms)", file=out)


def _print_transcripts(result: ProbeResult, out: TextIO, *, verbose: bool) -> None:
    """Every connection's transcript with ``--verbose``; else that of the connection a
    failed probe failed on, so that what the server said is in front of the user."""
    if verbose:
        shown = result.transcripts
        if result.transcripts_omitted:
            print(
                f"    ({result.transcripts_omitted} connections between the first and the "
                "latest ones not recorded)",
                file=out,
            )
    else:
        shown = [t for t in result.transcripts if t.failed and not result.ok]
    for transcript in shown:
        label = "transcript of the failing connection" if transcript.failed else "transcript"
        head, *lines = str(transcript).splitlines()
        print(f"    {label}: {head}", file=out)
        for line in lines:
            print(f"    {line}", file=out)


def _error_text(result: ProbeResult) -> str:
    """The error without its leading step name, which the verdict already shows."""
    prefix = f"{result.error_step}: "
    return result.error[len(prefix) :] if result.error.startswith(prefix) else result.error


def _stat_line(name: str, stats: dict[str, Any], indent: str = "  ") -> str:
    if not stats["count"]:
        return f"{indent}{name:<16} no data"
    return (
        f"{indent}{name:<16} p50 {stats['p50'] * 1000:.1f} ms  "
        f"p95 {stats['p95'] * 1000:.1f} ms  max {stats['max'] * 1000:.1f} ms  "
        f"({stats['count']} runs)"
    )


def _report_human(
    results: list[ProbeResult],
    doc: dict[str, Any],
    out: TextIO,
    *,
    title: str,
    verbose: bool = False,
) -> None:
    print(f"roundtrip probe: {title}", file=out)
    # Every failed run, and the last run of each pair.
    last = {(r.smtp, r.retrieve): r for r in results}
    shown = [r for r in results if not r.ok or last[(r.smtp, r.retrieve)] is r]
    for result in shown:
        _print_result(result, out, verbose=verbose)
    verdict = doc["verdict"]
    if verdict["exit_code"] and doc["ok"]:
        # Every round trip passed, and findings of the severity --fail-on names fail the run.
        failing = ("warn", "fail") if verdict["fail_on"] == "warn" else ("fail",)
        counts = collections.Counter(
            f.severity for r in results for f in r.findings if f.severity in failing
        )
        named = " and ".join(f"{counts[s]} {s} finding(s)" for s in failing if counts[s])
        print(f"\nFAIL: --fail-on {verdict['fail_on']}: {named}", file=out)
    summary = doc["summary"]
    paths = summary["paths"]
    if max((path["runs"] for path in paths), default=0) <= 1:
        return
    if len(paths) == 1:
        print(f"\nsummary: {summary['runs']} runs, {summary['failed']} failed", file=out)
        print(_stat_line("total", summary["total_seconds"]), file=out)
        print(_stat_line("time to visible", summary["time_to_visible"]), file=out)
        return
    # IMAP waits with IDLE, POP3 reconnects to poll: one set of statistics per path.
    each = summary["runs_per_path"]
    runs = f"{each} runs of each of" if each is not None else "runs of"
    print(
        f"\nsummary: {runs} {len(paths)} paths ({summary['runs']} round trips), "
        f"{summary['failed']} failed",
        file=out,
    )
    for path in paths:
        print(
            f"  {path['smtp']} -> {path['retrieve']}: {path['runs']} runs, {path['failed']} failed",
            file=out,
        )
        print(_stat_line("total", path["total_seconds"], "    "), file=out)
        print(_stat_line("time to visible", path["time_to_visible"], "    "), file=out)
