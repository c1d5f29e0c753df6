"""Section "auth": what sender authentication adds to each message.

Times, in this process and without sockets, the code the stack runs per message: DKIM signing
at submission (``roundtrip.protocols.dkim.sign``, with the Ed25519 key, the RSA-2048 key, and
both as ``StackConfig(dkim=True)`` signs), DKIM verifying at the MX (``verify``, one signature
of each kind, then both), and the MX's SPF + DMARC check (``roundtrip.stack._auth.check_sender``
without DKIM, on by default), and an ARC seal and its validation. Key and policy records come
from the stack's DNS server asked in memory (``DNSServer.lookup``, no socket), as the MX asks
it. The message is 4 KB, like the latency rows' messages. Each figure is the added cost
per message in milliseconds of CPU on this machine (p50 of ``n`` runs, after a warm-up).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from typing import Any

from benchmarks._common import MS, Plan, pct
from benchmarks._report import Results
from roundtrip.config import StackConfig
from roundtrip.protocols.dkim import SigningKey, key_record_name, sign, verify
from roundtrip.protocols.dns import Record, build_zone, default_records
from roundtrip.servers.dns import DNSServer
from roundtrip.stack._auth import SenderVerdict, check_sender, sender_auth_records
from roundtrip.stack._auth import zone_lookup as sender_lookup
from roundtrip.stack._dkim import domain_keys
from roundtrip.stack._dkim import zone_lookup as key_lookup

#: This section carries no target: its rows explain the round-trip rows.
METRICS: tuple[str, ...] = ()

_WARMUP = 2
_SENDER, _RCPT = "user@example.com", "user@example.org"


def _message() -> bytes:
    head = (
        f"From: <{_SENDER}>\r\nTo: <{_RCPT}>\r\nSubject: auth cost\r\n"
        f"Message-ID: {email.utils.make_msgid(domain='example.com')}\r\n"
        f"Date: {email.utils.formatdate()}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
    )
    line = "The quick brown fox jumps over the lazy dog, again and again.\r\n"
    return (head + "\r\n" + line * (4096 // len(line))).encode()


def _times(n: int, call: Callable[[], object]) -> list[float]:
    out = []
    for i in range(n + _WARMUP):
        started = time.perf_counter()
        call()
        if i >= _WARMUP:
            out.append(time.perf_counter() - started)
    return out


def _summary(times: list[float]) -> dict[str, float]:
    return {"p50": pct(times, 50), "p95": pct(times, 95)}


def measure(plan: Plan) -> dict[str, Any]:
    n = 10 if plan.quick else 200
    config = StackConfig(domains=("example.com", "example.org"))
    keys = domain_keys("example.com")
    ed: list[SigningKey] = [k for k in keys if k.algorithm == "ed25519-sha256"]
    rsa: list[SigningKey] = [k for k in keys if k.algorithm == "rsa-sha256"]
    records = [r for d in config.domains for r in default_records(d, "127.0.0.1")]
    records = sender_auth_records(config, records)
    records += [Record(key_record_name(k.selector, k.domain), "TXT", k.record) for k in keys]
    zone = build_zone(records)

    def unexpected(exc: BaseException) -> None:
        raise RuntimeError(f"auth section: the DNS server failed: {exc!r}")

    # Never started: only its in-memory look-up runs, as at the MX.
    dns = DNSServer(lambda: zone, host="127.0.0.1", on_error=unexpected, tcp_idle_timeout=1.0)
    dkim_lookup, spf_lookup = key_lookup(dns), sender_lookup(dns)
    raw = _message()
    # What the MX hands its checks: this hop's Received field on top (the peer address).
    received = (
        b"Received: from mail.example.com ([127.0.0.1])\r\n\tby mail.example.org "
        b"with ESMTPS id AUTHCOST; " + email.utils.formatdate().encode() + b"\r\n"
    )
    signed = {"ed25519": sign(raw, ed), "rsa": sign(raw, rsa), "both": sign(raw, keys)}
    for kind, message in signed.items():  # the figures below are for the pass path
        results = [r.result for r in verify(message, dkim_lookup)]
        if results != ["pass"] * len(results):
            raise RuntimeError(f"auth section: {kind} signature did not verify: {results}")

    def check() -> SenderVerdict:
        return check_sender(
            received + raw,
            authserv_id="mail.example.org",
            mail_from=_SENDER,
            helo="mail.example.com",
            dkim=None,
            lookup=spf_lookup,
        )

    from roundtrip.protocols import arc

    # A forwarder's ARC set (a mailing list, StackConfig.forwards), and its check at the MX.
    forwarded = "dkim=pass header.d=example.com; spf=pass smtp.mailfrom=example.com"
    arrived = arc.validate(signed["both"], dkim_lookup)
    sealed = (
        arc.seal(signed["both"], rsa[0], "mail.example.org", forwarded, arrived) + signed["both"]
    )
    if arc.validate(sealed, dkim_lookup).result != "pass":
        raise RuntimeError("auth section: the ARC set did not validate")

    verdict = check()
    spf = verdict.spf.result if verdict.spf else None
    dmarc = verdict.dmarc.result if verdict.dmarc else None
    if (spf, dmarc) != ("pass", "pass"):
        raise RuntimeError(f"auth section: SPF {spf}, DMARC {dmarc}, expected pass")
    return {
        "n": n,
        "message_bytes": len(raw),
        "sign_ed25519": _summary(_times(n, lambda: sign(raw, ed))),
        "sign_rsa": _summary(_times(n, lambda: sign(raw, rsa))),
        "sign_both": _summary(_times(n, lambda: sign(raw, keys))),
        "verify_ed25519": _summary(_times(n, lambda: verify(signed["ed25519"], dkim_lookup))),
        "verify_rsa": _summary(_times(n, lambda: verify(signed["rsa"], dkim_lookup))),
        "verify_both": _summary(_times(n, lambda: verify(signed["both"], dkim_lookup))),
        "spf_dmarc": _summary(_times(n, check)),
        "arc_seal": _summary(
            _times(n, lambda: arc.seal(signed["both"], rsa[0], "mx", forwarded, arrived))
        ),
        "arc_validate": _summary(_times(n, lambda: arc.validate(sealed, dkim_lookup))),
    }


_ROWS = (
    ("sign_ed25519", "DKIM sign, Ed25519"),
    ("sign_rsa", "DKIM sign, RSA-2048"),
    ("sign_both", "DKIM sign, both keys (submission, on by default)"),
    ("verify_ed25519", "DKIM verify, Ed25519"),
    ("verify_rsa", "DKIM verify, RSA-2048"),
    ("verify_both", "DKIM verify, both signatures (MX, on by default)"),
    ("spf_dmarc", "SPF + DMARC check (MX, on by default)"),
    ("arc_seal", "ARC seal, RSA-2048 (forwarding alias)"),
    ("arc_validate", "ARC validate, one set (MX, when ARC fields are present)"),
)


def rows(res: Results, data: dict[str, Any]) -> None:
    auth = data["auth"]
    size = auth["message_bytes"] // 1024
    for key, name in _ROWS:
        figures = auth[key]
        res.add(
            "auth",
            f"{name}, per {size} KB message p50",
            figures["p50"] * MS,
            "ms",
            note=f"p95 {figures['p95'] * MS:.2f} ms, n={auth['n']}",
        )
