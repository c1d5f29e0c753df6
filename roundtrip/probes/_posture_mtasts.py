"""The sending domain's MTA-STS: the ``_mta-sts`` TXT record (RFC 8461 section 3.1) and, when
asked (``--mta-sts-policy``), the HTTPS policy it announces (RFC 8461 sections 3.2, 3.3, 4.1).
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl

from ._authdns import MAX_EVIDENCE_CHARS, Lookup, tagged_records
from ._net import INFO, WARN
from ._posture import AuthReport, record_tags

#: Bytes of an MTA-STS policy body read at most (RFC 8461 section 3.3: 64 KiB).
MAX_POLICY_BYTES = 64 * 1024

#: RFC 8461 section 3.2: ``max_age`` at most one year, in seconds.
_MAX_POLICY_AGE = 31557600


def check_mta_sts(
    report: AuthReport,
    lookup: Lookup,
    policy: tuple[ssl.SSLContext, int, float] | None,
) -> None:
    name = f"_mta-sts.{report.domain}"
    answer = lookup.txt(name)
    evidence = answer.describe(name, "TXT")
    records = tagged_records(answer, "v=STSv1")
    if answer.failed:
        report.add("dns-error", WARN, f"MTA-STS of {report.domain} not checked", evidence)
    elif not records:
        report.add(
            "mta-sts-missing",
            INFO,
            f"{report.domain} publishes no MTA-STS record: senders may deliver to it without "
            "TLS (RFC 8461)",
            evidence,
        )
    elif len(records) > 1:
        report.add(
            "mta-sts-invalid",
            WARN,
            f"{name} holds {len(records)} MTA-STS records: senders ignore them (RFC 8461 3.1)",
            *records,
        )
    elif not re.fullmatch(r"[A-Za-z0-9]{1,32}", record_tags(records[0]).get("id", "")):
        report.add(
            "mta-sts-invalid",
            WARN,
            f"MTA-STS record of {report.domain} has no valid id= (1-32 letters and digits, "
            "RFC 8461 section 3.1)",
            records[0],
        )
    else:
        fetched = "" if policy is not None else " (the HTTPS policy is not fetched)"
        report.add(
            "mta-sts", INFO, f"MTA-STS record of {report.domain} present{fetched}", records[0]
        )
        if policy is not None:
            _check_mta_sts_policy(report, lookup, *policy)


def _fetch_policy(
    host: str, lookup: Lookup, context: ssl.SSLContext, port: int, timeout: float
) -> tuple[str, str]:
    """GET the MTA-STS policy from ``host`` (RFC 8461 section 3.3): (body, "") or
    ("", what went wrong). The address comes from ``lookup``, the certificate must name
    ``host``, redirects are not followed."""
    addresses = [*lookup.query(host, "A").values, *lookup.query(host, "AAAA").values]
    if not addresses:
        return "", f"{host} has no address"
    request = (
        f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\n"
        "User-Agent: roundtrip-probe\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    try:
        with (
            socket.create_connection((addresses[0], port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(request)
            response = http.client.HTTPResponse(tls)
            try:
                response.begin()
                body = response.read(MAX_POLICY_BYTES + 1)
            finally:
                response.close()
    except (OSError, http.client.HTTPException) as exc:
        # ssl.SSLError and TimeoutError are OSErrors: one place for every way a fetch fails.
        return "", f"https://{host}:{port}/.well-known/mta-sts.txt: {type(exc).__name__}: {exc}"
    where = f"https://{host}:{port}/.well-known/mta-sts.txt"
    if response.status != 200:
        return "", f"{where}: HTTP {response.status} {response.reason} (redirects are not followed)"
    kind = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if kind != "text/plain":
        return "", f"{where}: Content-Type {kind or 'missing'}, expected text/plain"
    if len(body) > MAX_POLICY_BYTES:
        return "", f"{where}: the policy is larger than {MAX_POLICY_BYTES} bytes"
    return body.decode("utf-8", "replace"), ""


def _mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 section 4.1: a ``*.`` pattern matches exactly one leftmost label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label and dot) and rest == pattern[2:]
    return pattern == host


def _check_mta_sts_policy(
    report: AuthReport, lookup: Lookup, context: ssl.SSLContext, port: int, timeout: float
) -> None:
    host = f"mta-sts.{report.domain}"
    body, error = _fetch_policy(host, lookup, context, port, timeout)
    if error:
        report.add(
            "mta-sts-policy-unreachable",
            WARN,
            f"the MTA-STS policy of {report.domain} cannot be fetched: senders apply none "
            "(RFC 8461 section 3.3)",
            error[:MAX_EVIDENCE_CHARS],
        )
        return
    fields: dict[str, list[str]] = {}
    for line in re.split(r"\r?\n", body):
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), []).append(value.strip())
    version, mode = fields.get("version", [""])[0], fields.get("mode", [""])[0]
    age, patterns = fields.get("max_age", [""])[0], fields.get("mx", [])
    problems = []
    if version != "STSv1":
        problems.append(f"version {version or 'missing'} (expected STSv1)")
    if mode not in ("enforce", "testing", "none"):
        problems.append(f"mode {mode or 'missing'}")
    # RFC 8461 section 3.2: max_age is 1*10DIGIT, ASCII digits only (str.isdigit takes others).
    if not re.fullmatch(r"[0-9]{1,10}", age) or int(age) > _MAX_POLICY_AGE:
        problems.append(f"max_age {age or 'missing'}")
    if mode != "none" and not patterns:
        problems.append("no mx")
    evidence = " | ".join(line for line in re.split(r"\r?\n", body) if line.strip())
    if problems:
        report.add(
            "mta-sts-policy-invalid",
            WARN,
            f"the MTA-STS policy of {report.domain} is invalid: {', '.join(problems)} "
            "(RFC 8461 section 3.2)",
            evidence[:MAX_EVIDENCE_CHARS],
        )
        return
    report.add(
        "mta-sts-policy",
        INFO,
        f"MTA-STS policy of {report.domain}: mode {mode}, max_age {age}, mx {', '.join(patterns)}",
        evidence[:MAX_EVIDENCE_CHARS],
    )
    if mode == "none":
        return
    mx = lookup.query(report.domain, "MX")
    hosts = [v.partition(" ")[2].rstrip(".") for v in mx.values]
    strays = [h for h in hosts if h and not any(_mx_matches(p, h) for p in patterns)]
    if strays:
        report.add(
            "mta-sts-mx-mismatch",
            WARN,
            f"MX host(s) {', '.join(strays)} of {report.domain} match no mx of its MTA-STS "
            f"policy: senders that {'enforce it refuse' if mode == 'enforce' else 'test it report'}"
            " delivery to them (RFC 8461 section 4.1)",
            mx.describe(report.domain, "MX"),
            evidence[:MAX_EVIDENCE_CHARS],
        )
