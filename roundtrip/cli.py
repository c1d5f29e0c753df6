"""The ``roundtrip`` command: ``serve`` a local mail world, ``probe`` a round trip.

Exit codes: 0 the round trip (every check) passed, 1 it failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TextIO

from .config import Endpoint, StackConfig, parse_endpoint
from .errors import ConfigError, RoundtripError
from .probes.roundtrip import ProbeResult, run_probe

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise _UsageError(f"{self.prog}: error: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="roundtrip",
        description="Prove e-mail works end to end: submit, route, deliver, retrieve, verify.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run a local mail stack until Ctrl-C or SIGTERM")
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
        help="a mailbox (repeatable; default user@<domain>, generated password)",
    )
    serve.add_argument(
        "--ports",
        choices=("ephemeral", "standard"),
        default="ephemeral",
        help="ephemeral: free ports on 127.0.0.1 (default); standard: 25, 465, "
        "587, 110, 995, 143, 993, 53 on 127.0.0.N (needs root)",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="loopback address for ephemeral ports (default 127.0.0.1)",
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

    probe = sub.add_parser(
        "probe",
        help="submit a tagged message and find it again (embedded stack, or a real server)",
        description="Without --smtp, runs on an embedded stack: submit on 465 with AUTH from "
        "user@example.com to user@example.org, retrieve over IMAPS and POP3S. Passwords come "
        "only from ROUNDTRIP_SMTP_PASSWORD, ROUNDTRIP_IMAP_PASSWORD, ROUNDTRIP_POP3_PASSWORD.",
    )
    probe.add_argument(
        "--smtp",
        metavar="URL",
        help="smtps://USER@HOST[:PORT] (implicit TLS, 465) or smtp://... (STARTTLS required, 587)",
    )
    retrieve = probe.add_mutually_exclusive_group()
    retrieve.add_argument("--imap", metavar="URL", help="imaps://USER@HOST[:PORT] or imap://...")
    retrieve.add_argument("--pop3", metavar="URL", help="pop3s://USER@HOST[:PORT] or pop3://...")
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
    probe.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        if args.command == "serve":
            return _serve(args, sys.stdout)
        return _probe(args, sys.stdout)
    except ConfigError as exc:
        print(f"roundtrip: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RoundtripError as exc:
        print(f"roundtrip: {exc}", file=sys.stderr)
        return EXIT_FAILED


# serve


def _serve(args: argparse.Namespace, out: TextIO) -> int:
    from .stack import MailStack

    config = StackConfig.from_strings(
        {"domains": args.domain, "users": args.user, "ports": args.ports, "host": args.host}
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    store = None
    if args.maildir:
        from .maildir import MaildirStore

        store = MaildirStore(args.maildir)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with MailStack(config, store=store) as stack:
            if args.json:
                print(json.dumps(stack.describe(), separators=(",", ":")), file=out, flush=True)
            else:
                _print_endpoints(stack, out)
            while not stop.wait(0.5):
                stack.check()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_OK


def _print_endpoints(stack: object, out: TextIO) -> None:
    from .stack import MailStack

    assert isinstance(stack, MailStack)
    doc = stack.describe()
    print("roundtrip: mail stack ready (Ctrl-C to stop)", file=out)
    if "dns" in doc:
        print(f"  dns          {doc['dns']}", file=out)
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
    if args.smtp is None:
        if args.imap or args.pop3 or args.cafile:
            raise ConfigError("--imap, --pop3 and --cafile need --smtp (a real server)")
        return _probe_embedded(args, out)
    smtp = parse_endpoint(args.smtp, expect="smtp")
    if not (args.imap or args.pop3):
        raise ConfigError("--smtp needs --imap URL or --pop3 URL to find the message")
    reader = (
        parse_endpoint(args.imap, expect="imap")
        if args.imap
        else parse_endpoint(args.pop3, expect="pop3")
    )
    context = (
        ssl.create_default_context(cafile=args.cafile)
        if args.cafile
        else ssl.create_default_context()
    )
    mail_from = args.mail_from or smtp.user
    rcpt_to = args.rcpt_to or reader.user
    if not mail_from or not rcpt_to:
        raise ConfigError("give --from and --to, or users in the URLs")
    result = run_probe(
        smtp,
        reader,
        context=context,
        mail_from=mail_from,
        rcpt_to=rcpt_to,
        timeout=args.timeout,
        keep=args.keep,
    )
    _report([result], out, json_output=args.json, title=f"{smtp.url} -> {reader.url}")
    return EXIT_OK if result.ok else EXIT_FAILED


def _probe_embedded(args: argparse.Namespace, out: TextIO) -> int:
    from .stack import MailStack

    with MailStack(StackConfig()) as stack:
        sender = stack.user(stack.config.domains[0])
        recipient = stack.user(stack.config.domains[-1])
        src = stack.endpoints(sender.domain)
        dst = stack.endpoints(recipient.domain)
        smtp = Endpoint(
            "smtp",
            "implicit",
            src.host,
            src.ports["submissions"],
            sender.address,
            sender.password,
            src.hostname,
        )
        readers = [
            Endpoint(
                "imap",
                "implicit",
                dst.host,
                dst.ports["imaps"],
                recipient.address,
                recipient.password,
                dst.hostname,
            ),
            Endpoint(
                "pop3",
                "implicit",
                dst.host,
                dst.ports["pop3s"],
                recipient.address,
                recipient.password,
                dst.hostname,
            ),
        ]
        results = [
            run_probe(
                smtp,
                reader,
                context=stack.client_context(),
                mail_from=args.mail_from or sender.address,
                rcpt_to=args.rcpt_to or recipient.address,
                timeout=args.timeout,
                keep=args.keep,
            )
            for reader in readers
        ]
        stack.check()
    _report(
        results,
        out,
        json_output=args.json,
        title=f"embedded stack ({', '.join(stack.config.domains)}) on {src.host}",
    )
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def _report(results: list[ProbeResult], out: TextIO, *, json_output: bool, title: str) -> None:
    if json_output:
        doc = {
            "ok": all(r.ok for r in results),
            "target": title,
            "results": [r.as_dict() for r in results],
        }
        print(json.dumps(doc, indent=2), file=out)
        return
    print(f"roundtrip probe: {title}", file=out)
    for result in results:
        print(f"\n  {result.smtp} -> {result.retrieve}  (token {result.token})", file=out)
        for step in result.steps:
            mark = "ok  " if step.ok else "FAIL"
            detail = f"  {step.detail}" if step.detail else ""
            print(
                f"    {mark} {step.name:<16} {_ms(step.seconds)}  {step.server}{detail}", file=out
            )
        for facts in result.tls:
            print(
                f"    tls  {facts.server:<21} {facts.version} {facts.cipher}; "
                f"subject {facts.subject}; issuer {facts.issuer}; "
                f"{facts.days_left} days left",
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
            print(f"    finding: {finding}", file=out)
        verdict = "PASS" if result.ok else f"FAIL at {result.error_step}: {result.error}"
        print(f"  {verdict}  (total {result.total_seconds * 1000:.1f} ms)", file=out)
