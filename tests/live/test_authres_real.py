"""Authentication-Results written by real Debian filters on a real Postfix, read by the
validator's reader (``roundtrip.probes.authcheck.auth_results``, docs/auth-checks.md).

The world is the one of ``tests/live/test_mta_postfix.py`` (a stack on the standard ports, a
Postfix for ``peer.test`` on 127.0.0.10:25 resolving through the stack's DNS) with DKIM on in
the stack (``StackConfig(dkim=True)``: submission signs with an Ed25519 and an RSA key, the
keys, SPF and DMARC records are in the stack's DNS) and mail filters in Postfix
(``smtpd_milters``, ``tests/live/_milter_peer.py``), once per filter set:

- ``opendkim+opendmarc``: OpenDKIM 2.11 verifying, then OpenDMARC 1.4 checking SPF and
  DMARC. Each writes its own Authentication-Results field (OpenDKIM one with every ``dkim=``,
  OpenDMARC one for ``spf=`` and one for ``dmarc=``), all with the authserv-id
  ``mx.peer.test``;
- ``rspamd``: Rspamd 3.4's proxy worker as a milter, one field with every verdict.

Postfix delivers into a Maildir; the file is read as the probe reads a fetched copy and given
to ``auth_results`` with the receiving host it would use (the ``by`` of the topmost Received
field). What the tests assert, per filter set:

- a message from the stack's submission: ``dkim=pass`` for both signatures, ``spf=pass``,
  ``dmarc=pass``, all ``info``;
- its twins: a From domain that is not aligned (``dmarc=fail``, ``warn``, while DKIM and SPF
  pass for the envelope's domain); a signed message whose body was altered after signing
  (``stack.faults.alter_body``) sent straight to Postfix: ``dkim=fail``, and ``dmarc=fail``
  unless SPF passes for an aligned envelope sender.

Every verdict is checked in what the reader makes of each field on its own (its parsing of
the filters' syntax). That the reader reports the verdicts of *every* field of the receiving
host, not only of the topmost one, is asserted separately: OpenDKIM and OpenDMARC spread
them over three fields (``tests/test_authres_milter_fields.py`` keeps them as text).

Needs root, Postfix, unshare(1) and the filters (``apt-get install --no-install-recommends
opendkim opendmarc rspamd``); each set is skipped when its programs are missing, everything
when the standard ports are taken.
"""

from __future__ import annotations

import os
import re
import secrets
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from _milter_peer import Filter, OpenDKIM, OpenDMARC, Rspamd, filter_unavailable_reason
from _mta_world import (
    DELIVERY_TIMEOUT,
    FIRST_DOMAIN,
    PEER_DOMAIN,
    PEER_HOST,
    PEER_MX,
    PEER_USER,
    RECIPIENT,
    SENDER,
    STACK_DOMAIN,
    message,
    submit,
)
from _postfix_peer import PostfixPeer, peer_unavailable_reason

from roundtrip.config import StackConfig, User
from roundtrip.errors import ServerStartError
from roundtrip.probes._net import INFO, WARN, Finding
from roundtrip.probes.authcheck import auth_results
from roundtrip.protocols.dns import Record, default_records
from roundtrip.stack import MailStack

_REASON = peer_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"Postfix peer: {_REASON}")

#: A domain outside the stack that publishes ``p=reject``, for the unaligned From.
OTHER_DOMAIN = "other.test"
#: The selectors of the stack's two keys (roundtrip/stack/_dkim.py).
SELECTORS = ("rt-ed25519", "rt-rsa")

#: The filter sets: their programs, and how to make them (in milter order).
FILTER_SETS: dict[str, tuple[tuple[str, ...], tuple[type[Filter], ...]]] = {
    "opendkim+opendmarc": (("opendkim", "opendmarc"), (OpenDKIM, OpenDMARC)),
    "rspamd": (("rspamd",), (Rspamd,)),
}


@dataclass(frozen=True)
class Verdict:
    """One ``auth-<method>`` finding: its method, result, severity and details text."""

    method: str
    result: str
    severity: str
    details: str


def verdicts(findings: list[Finding]) -> list[Verdict]:
    """The spf, dkim, dmarc and arc findings of ``auth_results``, in its order."""
    found = []
    for f in findings:
        if f.code not in ("auth-spf", "auth-dkim", "auth-dmarc", "auth-arc"):
            continue
        match = re.match(r"[^:]*: (\w+)=(\w+)(?: \((.*)\))?$", f.message)
        assert match, f.message
        found.append(Verdict(match[1], match[2], f.severity, match[3] or ""))
    return found


def receiving_host(raw: bytes) -> str:
    """The ``by`` of the topmost Received field, as the probe takes it."""
    head = raw.partition(b"\n\n")[0].partition(b"\r\n\r\n")[0].decode("utf-8", "replace")
    unfolded = re.sub(r"\r?\n[ \t]+", " ", head)
    for line in unfolded.splitlines():
        if line.lower().startswith("received:"):
            match = re.search(r"\bby\s+([^\s;()]+)", line)
            return match[1] if match else ""
    return ""


def _head_fields(raw: bytes) -> tuple[list[bytes], bytes]:
    """The head as a list of fields (each with its folded lines) and the rest."""
    sep = b"\r\n" if b"\r\n" in raw[:200] else b"\n"
    head, blank, body = raw.partition(sep + sep)
    fields: list[bytes] = []
    for line in head.split(sep):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += sep + line
        else:
            fields.append(line)
    return fields, sep + sep + body if blank else b""


def authres_fields(raw: bytes) -> list[str]:
    """The Authentication-Results fields of ``raw`` as written, top to bottom."""
    fields, _ = _head_fields(raw)
    return [
        f.decode("utf-8", "replace")
        for f in fields
        if f.lower().startswith(b"authentication-results:")
    ]


def per_field_verdicts(raw: bytes) -> list[Verdict]:
    """What the reader makes of each Authentication-Results field on its own (the message
    with only that field kept), top to bottom: its reading of the filter's syntax."""
    fields, rest = _head_fields(raw)
    sep = b"\r\n" if b"\r\n" in raw[:200] else b"\n"
    indices = [i for i, f in enumerate(fields) if f.lower().startswith(b"authentication-results:")]
    receiver = receiving_host(raw)
    found: list[Verdict] = []
    for keep in indices:
        only = [f for i, f in enumerate(fields) if i == keep or i not in indices]
        findings = auth_results(sep.join(only) + rest, receiver)
        summary = next(f for f in findings if f.code == "auth-results")
        assert summary.server == PEER_MX, summary.message  # the filter's authserv-id
        found += verdicts(findings)
    return found


def _trace(raw: bytes) -> str:
    """The fields a failure message shows: the topmost Received and every
    Authentication-Results field."""
    fields, _ = _head_fields(raw)
    received = next((f for f in fields if f.lower().startswith(b"received:")), b"")
    return "\n".join([received.decode("utf-8", "replace"), *authres_fields(raw)])


def by_method(found: list[Verdict]) -> dict[str, list[Verdict]]:
    grouped: dict[str, list[Verdict]] = {}
    for v in found:
        grouped.setdefault(v.method, []).append(v)
    return grouped


# -- the world -------------------------------------------------------------------------------


def _stack() -> MailStack:
    config = StackConfig(
        domains=(FIRST_DOMAIN, STACK_DOMAIN),
        users=(User(SENDER), User(RECIPIENT), User(f"user@{FIRST_DOMAIN}")),
        ports="standard",
        routed_domains=(PEER_DOMAIN,),
        relay_tls=((PEER_DOMAIN, "enforce"),),
        dkim=True,
    )
    try:
        return MailStack(config).start()
    except ServerStartError as exc:
        pytest.skip(f"a stack on the standard ports (25, 53, ...) cannot start here: {exc}")


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    stack = _stack()
    try:
        yield stack
    finally:
        stack.stop()


def _zone(stack: MailStack) -> list[Record]:
    """The stack's records, ``peer.test`` (MX at Postfix) and ``other.test`` (a zone whose
    DMARC record says ``p=reject``, whose SPF names no host)."""
    records = stack.default_dns_records()
    for domain in (PEER_DOMAIN, OTHER_DOMAIN):
        records += [r for r in default_records(domain, PEER_HOST) if r.rtype in ("SOA", "NS")]
    return [
        *records,
        Record(PEER_DOMAIN, "MX", f"10 {PEER_MX}."),
        Record(PEER_MX, "A", PEER_HOST),
        Record(OTHER_DOMAIN, "TXT", "v=spf1 -all"),
        Record(f"_dmarc.{OTHER_DOMAIN}", "TXT", "v=DMARC1; p=reject"),
    ]


@pytest.fixture(scope="module", params=sorted(FILTER_SETS))
def world(
    request: pytest.FixtureRequest, stack: MailStack
) -> Iterator[tuple[str, MailStack, PostfixPeer, list[Filter]]]:
    """One filter set and a Postfix using it as milters, next to the module's stack."""
    name: str = request.param
    programs, kinds = FILTER_SETS[name]
    reason = filter_unavailable_reason(*programs)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    filters: list[Filter] = []
    try:
        began = time.monotonic()
        for kind in kinds:
            filters.append(kind(authserv_id=PEER_MX).start())
        milters = ", ".join(f.milter for f in filters)
        # tempfail when a filter does not answer: mail must not slip through unchecked.
        extra = f"smtpd_milters = {milters}\nmilter_default_action = tempfail\n"
        with PostfixPeer(
            ca=stack.ca,
            domain=PEER_DOMAIN,
            users=("alice",),
            mx_name=PEER_MX,
            host=PEER_HOST,
            extra_main_cf=extra,
        ) as peer:
            print(f"{name} + Postfix started in {time.monotonic() - began:.2f} s")
            yield name, stack, peer, filters
    finally:
        for f in filters:
            f.stop()


@pytest.fixture
def pair(
    world: tuple[str, MailStack, PostfixPeer, list[Filter]],
) -> Iterator[tuple[str, MailStack, PostfixPeer, list[Filter]]]:
    """The world with the stack reset, the zone served, and Postfix's queue emptied after."""
    _, stack, peer, _ = world
    stack.reset()
    stack.set_dns_records(_zone(stack))
    stack.mx_ports[PEER_MX] = peer.port
    try:
        yield world
        stack.check()
    finally:
        peer.delete_queue()


def _delivered(peer: PostfixPeer, filters: list[Filter], tag: str) -> bytes:
    """The raw Maildir file of the message tagged ``tag`` in alice's mailbox."""
    try:
        peer.wait_for_message(
            "alice", lambda m: m["Subject"] == f"interop {tag}", timeout=DELIVERY_TIMEOUT
        )
    except AssertionError as exc:
        logs = "\n".join(f"{f.name}:\n{f.log()[-1500:]}" for f in filters)
        raise AssertionError(f"{exc}\n{logs}") from None
    for raw in _maildir(peer, "alice"):
        if f"Subject: interop {tag}".encode() in raw:
            return raw
    raise AssertionError(f"message {tag} vanished from the Maildir")


def _maildir(peer: PostfixPeer, user: str) -> list[bytes]:
    """The files of ``user``'s Maildir as Postfix wrote them (``new`` and ``cur``)."""
    found = []
    for sub in ("new", "cur"):
        folder = os.path.join(peer.dir, "mail", user, sub)
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                with open(os.path.join(folder, name), "rb") as fh:
                    found.append(fh.read())
    return found


def _assert_dkim(found: dict[str, list[Verdict]], result: str) -> None:
    """Both of the stack's signatures (``d=example.com``) got ``result``."""
    dkim = found.get("dkim", [])
    assert sorted(v.result for v in dkim) == [result, result], dkim
    for selector in SELECTORS:
        assert any(
            f"header.d={STACK_DOMAIN}" in v.details and f"header.s={selector}" in v.details
            for v in dkim
        ), (selector, dkim)
    assert all(v.severity == (INFO if result == "pass" else WARN) for v in dkim), dkim


# -- a good message and its twins ------------------------------------------------------------


def test_signed_aligned_message_reads_dkim_spf_dmarc_pass(
    pair: tuple[str, MailStack, PostfixPeer, list[Filter]],
) -> None:
    _, stack, peer, filters = pair
    tag = secrets.token_hex(6)
    submit(stack, PEER_USER, message(SENDER, PEER_USER, tag))
    raw = _delivered(peer, filters, tag)
    assert receiving_host(raw) == PEER_MX
    found = by_method(per_field_verdicts(raw))
    _assert_dkim(found, "pass")
    (spf,) = found["spf"]
    assert (spf.result, spf.severity) == ("pass", INFO), spf
    assert f"smtp.mailfrom={STACK_DOMAIN}" in spf.details or f"smtp.mailfrom={SENDER}" in (
        spf.details
    ), spf
    (dmarc,) = found["dmarc"]
    assert (dmarc.result, dmarc.severity) == ("pass", INFO), dmarc
    assert f"header.from={STACK_DOMAIN}" in dmarc.details, dmarc
    # The policy applied, from the comment: OpenDMARC "p=reject dis=none", Rspamd
    # "policy=reject".
    assert "p=reject" in dmarc.details or "policy=reject" in dmarc.details, dmarc
    # Whatever the reader picks out of the whole message says the same (no contradiction).
    whole = verdicts(auth_results(raw, receiving_host(raw)))
    assert whole and all(v.result == "pass" for v in whole), whole
    assert any(v.method == "dmarc" for v in whole), whole


def test_unaligned_from_reads_dmarc_fail(
    pair: tuple[str, MailStack, PostfixPeer, list[Filter]],
) -> None:
    """The twin: From names ``other.test`` (``p=reject``); the signatures (``d=example.com``,
    the sender's domain) and SPF (``example.com``) pass but align with nothing."""
    _, stack, peer, filters = pair
    tag = secrets.token_hex(6)
    raw_out = message(SENDER, PEER_USER, tag).replace(
        f"From: <{SENDER}>".encode(), f"From: <news@{OTHER_DOMAIN}>".encode(), 1
    )
    submit(stack, PEER_USER, raw_out)
    raw = _delivered(peer, filters, tag)
    found = by_method(per_field_verdicts(raw))
    _assert_dkim(found, "pass")
    (spf,) = found["spf"]
    assert spf.result == "pass", spf
    (dmarc,) = found["dmarc"]
    assert (dmarc.result, dmarc.severity) == ("fail", WARN), dmarc
    assert f"header.from={OTHER_DOMAIN}" in dmarc.details, dmarc
    whole = by_method(verdicts(auth_results(raw, receiving_host(raw))))
    assert [v.result for v in whole["dmarc"]] == ["fail"], whole


def _altered_signed_copy(stack: MailStack, tag: str) -> bytes:
    """A message signed by the stack's submission whose body changed after signing: the copy
    submission stores for a local user under ``stack.faults.alter_body``."""
    stack.faults.alter_body = True
    try:
        submit(stack, RECIPIENT, message(SENDER, PEER_USER, tag))
        stored = stack.wait_for(RECIPIENT, subject=f"interop {tag}", timeout=DELIVERY_TIMEOUT)
    finally:
        stack.faults.alter_body = False
    raw = stored.raw
    assert b"DKIM-Signature:" in raw and f"body {tag}".encode() not in raw, raw[-200:]
    return raw


#: What SPF says of an envelope sender in ``other.test`` (``v=spf1 -all``) from 127.0.0.1:
#: Rspamd says ``fail``; OpenDMARC checks SPF with libspf2, which passes every client in
#: 127.0.0.0/8 whatever the record ("localhost is always allowed."), so a loopback world
#: cannot make OpenDMARC write ``spf=fail``.
UNALIGNED_SPF = {"opendkim+opendmarc": "pass", "rspamd": "fail"}


@pytest.mark.parametrize("aligned", [True, False], ids=["envelope-aligned", "envelope-other"])
def test_body_altered_after_signing_reads_dkim_fail(
    pair: tuple[str, MailStack, PostfixPeer, list[Filter]], aligned: bool
) -> None:
    """The twin: the stack's signatures broken by a changed body byte, the message sent
    straight to Postfix from 127.0.0.1. Both signatures fail. With the envelope sender in
    ``example.com`` (whose SPF record names 127.0.0.1) DMARC still passes on aligned SPF
    alone (RFC 7489 section 4.2); with one in ``other.test`` nothing is aligned and DMARC
    fails."""
    name, stack, peer, filters = pair
    tag = secrets.token_hex(6)
    raw_out = _altered_signed_copy(stack, tag)
    envelope = SENDER if aligned else f"bounces@{OTHER_DOMAIN}"
    with smtplib.SMTP(PEER_HOST, peer.port, timeout=10, source_address=("127.0.0.1", 0)) as c:
        c.ehlo(f"mail.{STACK_DOMAIN}")
        c.sendmail(envelope, [PEER_USER], raw_out)
    raw = _delivered(peer, filters, tag)
    trace = _trace(raw)
    found = by_method(per_field_verdicts(raw))
    _assert_dkim(found, "fail")
    for v in found["dkim"]:
        # Why it failed, as the filter wrote it: a reason (OpenDKIM) or a comment.
        assert "reason '" in v.details or "comment '" in v.details, (v, trace)
    (spf,) = found["spf"]
    assert spf.result == ("pass" if aligned else UNALIGNED_SPF[name]), (spf, trace)
    (dmarc,) = found["dmarc"]
    expected = "pass" if aligned else "fail"
    assert (dmarc.result, dmarc.severity) == (
        expected,
        INFO if aligned else WARN,
    ), (dmarc, trace)
    assert f"header.from={STACK_DOMAIN}" in dmarc.details, (dmarc, trace)
    whole = by_method(verdicts(auth_results(raw, receiving_host(raw))))
    assert [v.result for v in whole["dmarc"]] == [expected], (whole, trace)


# -- one reading of the whole message --------------------------------------------------------


def test_reader_reports_every_verdict_of_the_receiving_host(
    pair: tuple[str, MailStack, PostfixPeer, list[Filter]],
) -> None:
    """``auth_results`` on the delivered file reports the verdicts of every field the
    receiving host wrote. OpenDKIM and OpenDMARC write three fields with one authserv-id,
    all read together (tests/test_authres_milter_fields.py holds the text)."""
    _, stack, peer, filters = pair
    tag = secrets.token_hex(6)
    submit(stack, PEER_USER, message(SENDER, PEER_USER, tag))
    raw = _delivered(peer, filters, tag)
    every = sorted((v.method, v.result) for v in per_field_verdicts(raw))
    assert len(every) == 4, (every, authres_fields(raw))  # 2 dkim, spf, dmarc
    whole = sorted((v.method, v.result) for v in verdicts(auth_results(raw, receiving_host(raw))))
    assert whole == every, authres_fields(raw)
