"""The one place where the relay's lower-level exceptions become one of ours.

aiosmtplib, ``ssl``, ``OSError``, ``TimeoutError`` and dnspython each raise their own
exceptions; the relay needs only what they mean for a delivery: the MX's reply, if it sent one;
the TLS-RPT result type (RFC 8460 §4.3), if the TLS handshake failed; NXDOMAIN, if a name does
not exist; and a description for the queue's ``last_error``. :func:`translated` maps them all to
:class:`StepError` (the original stays on ``__cause__``), as ``probes/_net.map_errors`` does for
the probes. The rules that turn those values into outcomes are ``protocols/delivery.py``.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator

from ..errors import RoundtripError
from ..protocols.tlspolicy import ResultType, verify_failure_result

__all__ = ["StepError", "describe", "translated"]


class StepError(RoundtripError):
    """A step of a delivery failed (DNS lookup, connect, TLS, an SMTP command or reply).

    ``str()`` is the description for the queue and the events: ``"<code> <text>"`` for an
    SMTP reply, the failure in words otherwise.

    Attributes:
        code: the MX's reply code, or None when it sent no (well-formed) reply.
        reply: the MX's reply text ("" without a reply).
        tls: the TLS-RPT result type of a failed TLS handshake, else None.
        nxdomain: a DNS name does not exist.
    """

    def __init__(
        self,
        detail: str,
        *,
        code: int | None = None,
        reply: str = "",
        tls: ResultType | None = None,
        nxdomain: bool = False,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.reply = reply
        self.tls = tls
        self.nxdomain = nxdomain


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Run a step of a delivery; its lower-level exceptions leave as :class:`StepError`.

    Cancellation and bugs (anything else) pass through unchanged.
    """
    import aiosmtplib  # here: a stack that never dials an MX does not load the client
    import dns.exception
    import dns.resolver

    try:
        yield
    except aiosmtplib.SMTPResponseException as exc:
        raise StepError(f"{exc.code} {exc.message}", code=exc.code, reply=exc.message) from exc
    except dns.resolver.NXDOMAIN as exc:
        raise StepError(str(exc), nxdomain=True) from exc
    except dns.exception.DNSException as exc:
        raise StepError(str(exc)) from exc
    except ssl.SSLError as exc:
        raise StepError(describe(exc), tls=_tls_result(exc)) from exc
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        raise StepError(describe(exc)) from exc


def describe(exc: BaseException) -> str:
    """A lower-level exception in words, naming TLS failures as such."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or text}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {text}"
    return text


def _tls_result(exc: ssl.SSLError) -> ResultType:
    """The TLS-RPT result type of a failed TLS handshake (RFC 8460 §4.3)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return verify_failure_result(exc.verify_code, exc.verify_message or "")
    return ResultType.VALIDATION_FAILURE
