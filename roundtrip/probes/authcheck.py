"""E-mail authentication as the probe sees it: the receiver's verdicts, the delivered copy's
DKIM signatures, and the sending domain's published posture (issue #14, docs/auth-checks.md).

Three passes, each turning what it saw into ``Finding`` objects:

1. ``auth_results``: the receiving server's verdicts, read from the Authentication-Results
   field (RFC 8601) of the delivered copy (``_authres``).
2. ``verify_dkim``: every DKIM-Signature of the delivered copy verified by ``dkimpy`` (RFC
   6376, RFC 8463), with the keys looked up in the DNS the probe was given (``_authdkim``).
3. ``check_posture``: the sending domain's records: SPF (``_spfposture``), DMARC, TLS-RPT, MX
   and forward-confirmed reverse DNS (``_posture``), MTA-STS (``_posture_mtasts``).

This module is the public face of those: the names it exports stay importable from here.
None of them shares code with the stack's SPF, DKIM and DMARC evaluation
(roundtrip/protocols/spf.py, dmarc.py): a bug there must not validate itself here. All DNS
goes through ``Lookup`` (``_authdns``): one given server (``--dns HOST:PORT``) or the system
resolver. A probe of a loopback target without ``--dns`` makes no DNS query at all, since the
names of a test world are not the internet's (``lookup_for``).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

from ..config import Endpoint
from ._authdkim import verify_dkim
from ._authdns import MAX_EVIDENCE_CHARS, Answer, Lookup, lookup_for, parse_dns_server
from ._authres import NO_AUTHSERV_ID, auth_results
from ._net import INFO, Finding
from ._posture import FINDING_CHECKS, AuthReport, check_dmarc, check_mx, check_tls_rpt
from ._posture_mtasts import MAX_POLICY_BYTES, check_mta_sts
from ._spfposture import SPF_LOOKUP_LIMIT, check_spf, spf_lookup_count

__all__ = [
    "FINDING_CHECKS",
    "MAX_EVIDENCE_CHARS",
    "MAX_POLICY_BYTES",
    "NO_AUTHSERV_ID",
    "SPF_LOOKUP_LIMIT",
    "Answer",
    "AuthReport",
    "Lookup",
    "auth_results",
    "check_posture",
    "delivered_findings",
    "lookup_for",
    "parse_dns_server",
    "posture_skipped",
    "spf_lookup_count",
    "verify_dkim",
]


def delivered_findings(
    copies: Sequence[bytes],
    hops: Sequence[Any],
    *,
    target: Endpoint,
    dns_server: tuple[str, int] | None,
    timeout: float,
) -> list[Finding]:
    """Passes 1 and 2 for the first delivered copy; ``hops`` are the probe's parsed Received
    fields (oldest first: the last one is the receiving host's)."""
    if not copies:
        return []
    receiver = str(hops[-1].by) if hops else ""
    lookup = lookup_for(dns_server, target, timeout=min(timeout, 10.0))
    return auth_results(copies[0], receiver) + verify_dkim(copies[0], lookup)


def check_posture(
    domain: str,
    lookup: Lookup,
    *,
    mta_sts_policy: tuple[ssl.SSLContext, int, float] | None = None,
) -> AuthReport:
    """The sending domain's SPF, DMARC, MTA-STS, TLS-RPT and MX posture (pass 3).

    Args:
        domain: the domain of the probe's sender (From and MAIL FROM).
        lookup: where to ask.
        mta_sts_policy: (TLS context, port, timeout) to also fetch the MTA-STS policy over
            HTTPS (port 443 in the world; another for a test server); None: the TXT only.

    Returns:
        The findings, with a severity each, and the checks failed by SPF permerrors.
    """
    report = AuthReport(domain.lower().rstrip("."))
    check_spf(report, lookup)
    check_dmarc(report, lookup)
    check_mta_sts(report, lookup, mta_sts_policy)
    check_tls_rpt(report, lookup)
    check_mx(report, lookup)
    return report


def posture_skipped(domain: str, target: Endpoint) -> Finding:
    """The info finding that says why the posture checks of ``domain`` did not run."""
    why = (
        "the probe's sender has no domain"
        if not domain
        else f"{target.host} is on loopback, and a test world's domains are not looked up in "
        "the public DNS (give --dns HOST:PORT)"
    )
    return Finding(
        "posture-skipped", INFO, f"sending domain checks of {domain or '?'} skipped: {why}"
    )
