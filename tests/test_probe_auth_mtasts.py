"""The MTA-STS policy check of the probe (RFC 8461 section 3.3, ``--mta-sts-policy PORT``):
a real HTTPS server on loopback with a certificate from the stack's CA serves the policy of
``mta-sts.example.com``, which the stack's DNS points at 127.0.0.1."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from roundtrip import MailStack
from roundtrip.cli import main
from roundtrip.probes.authcheck import Lookup, check_posture
from roundtrip.protocols.dns import Record

SENDER = "example.com"
GOOD = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmax_age: 86400\r\n"


class _Policy(http.server.BaseHTTPRequestHandler):
    """Serves whatever the test put in ``reply`` (status, content type, body)."""

    reply: ClassVar[dict[str, Any]] = {}

    def do_GET(self) -> None:
        body = str(self.reply["body"]).encode()
        self.send_response(int(self.reply["status"]))
        self.send_header("Content-Type", str(self.reply["type"]))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


@contextlib.contextmanager
def _serve_policy(stack: MailStack, names: list[str]) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Policy)
    context = stack.ca.server_context(names)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def policy_port(stack: MailStack) -> Iterator[int]:
    stack.reset()
    stack.set_dns_records(
        [*stack.default_dns_records(), Record(f"mta-sts.{SENDER}", "A", "127.0.0.1")]
    )
    _Policy.reply.clear()
    _Policy.reply.update(status=200, type="text/plain", body=GOOD)
    with _serve_policy(stack, [f"mta-sts.{SENDER}"]) as port:
        yield port


def _codes(stack: MailStack, port: int) -> dict[str, Any]:
    assert stack.dns is not None
    lookup = Lookup((stack.dns.host, stack.dns.port), timeout=5.0)
    report = check_posture(SENDER, lookup, mta_sts_policy=(stack.client_context(), port, 5.0))
    return {f.code: f for f in report.findings}


def test_probe_auth_mta_sts_policy_matching_the_mx(stack: MailStack, policy_port: int) -> None:
    codes = _codes(stack, policy_port)
    policy = codes["mta-sts-policy"]
    assert policy.severity == "info"
    assert policy.message.endswith("mode enforce, max_age 86400, mx mail.example.com")
    assert "mta-sts-mx-mismatch" not in codes and "mta-sts-policy-unreachable" not in codes


def test_probe_auth_mta_sts_policy_not_naming_the_mx_is_a_warning(
    stack: MailStack, policy_port: int
) -> None:
    _Policy.reply["body"] = GOOD.replace("mail.example.com", "*.elsewhere.example.net")
    mismatch = _codes(stack, policy_port)["mta-sts-mx-mismatch"]
    assert mismatch.severity == "warn" and "mail.example.com" in mismatch.message
    assert mismatch.evidence[0] == "example.com MX: 10 mail.example.com."


@pytest.mark.parametrize(
    ("reply", "code", "says"),
    [
        ({"body": GOOD.replace("STSv1", "STSv2")}, "mta-sts-policy-invalid", "version STSv2"),
        ({"body": "version: STSv1\nmode: enforce\n"}, "mta-sts-policy-invalid", "max_age"),
        # RFC 8461 section 3.2: max_age is 1*10DIGIT, ASCII digits.
        ({"body": GOOD.replace("86400", "\u0663")}, "mta-sts-policy-invalid", "max_age \u0663"),
        ({"body": GOOD.replace("86400", "00000086400")}, "mta-sts-policy-invalid", "max_age 0"),
        ({"body": GOOD.replace("86400", "+86400")}, "mta-sts-policy-invalid", "max_age +86400"),
        ({"status": 404}, "mta-sts-policy-unreachable", "HTTP 404"),
        ({"status": 301}, "mta-sts-policy-unreachable", "redirects are not followed"),
        ({"type": "text/html"}, "mta-sts-policy-unreachable", "Content-Type text/html"),
    ],
)
def test_probe_auth_mta_sts_policy_bad_replies(
    stack: MailStack, policy_port: int, reply: dict[str, Any], code: str, says: str
) -> None:
    _Policy.reply.update(reply)
    codes = _codes(stack, policy_port)
    assert codes[code].severity == "warn"
    assert says in codes[code].message + " ".join(codes[code].evidence)
    assert "mta-sts-policy" not in codes


@pytest.mark.parametrize("age", ["0", "0000086400", "31557600"])
def test_probe_auth_mta_sts_policy_max_age_of_ascii_digits_is_valid(
    stack: MailStack, policy_port: int, age: str
) -> None:
    _Policy.reply["body"] = GOOD.replace("86400", age)
    codes = _codes(stack, policy_port)
    assert codes["mta-sts-policy"].severity == "info" and "mta-sts-policy-invalid" not in codes
    assert f"max_age {age}," in codes["mta-sts-policy"].message


def test_probe_auth_mta_sts_policy_with_a_certificate_for_another_name(
    stack: MailStack,
) -> None:
    stack.reset()
    stack.set_dns_records(
        [*stack.default_dns_records(), Record(f"mta-sts.{SENDER}", "A", "127.0.0.1")]
    )
    _Policy.reply.update(status=200, type="text/plain", body=GOOD)
    with _serve_policy(stack, ["www.example.com"]) as port:
        unreachable = _codes(stack, port)["mta-sts-policy-unreachable"]
        assert "SSLCertVerificationError" in unreachable.evidence[0]


def test_probe_auth_mta_sts_policy_through_the_cli(
    stack: MailStack,
    policy_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert stack.dns is not None
    monkeypatch.setenv("ROUNDTRIP_SMTP_PASSWORD", stack.user(SENDER).password)
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", stack.user("example.org").password)
    src, dst = stack.endpoints(SENDER), stack.endpoints("example.org")
    argv = [
        "probe",
        "--smtp",
        f"smtps://user%40example.com@127.0.0.1:{src.ports['submissions']}",
        "--imap",
        f"imaps://user%40example.org@127.0.0.1:{dst.ports['imaps']}",
        "--cafile",
        stack.ca_file,
        "--timeout",
        "10",
        "--dns",
        f"{stack.dns.host}:{stack.dns.port}",
        "--json",
    ]
    assert main([*argv, "--mta-sts-policy", str(policy_port)]) == 0
    codes = [f["code"] for f in json.loads(capsys.readouterr().out)["auth"]["findings"]]
    assert "mta-sts-policy" in codes
    # Twin: without the option only the TXT record is read.
    assert main(argv) == 0
    findings = json.loads(capsys.readouterr().out)["auth"]["findings"]
    assert "mta-sts-policy" not in [f["code"] for f in findings]
    (record,) = [f for f in findings if f["code"] == "mta-sts"]
    assert "(the HTTPS policy is not fetched)" in record["message"]
    assert main([*argv, "--mta-sts-policy", "70000"]) == 2
