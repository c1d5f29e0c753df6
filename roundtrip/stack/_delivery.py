"""What happens to a message once an SMTP listener of the stack has accepted it.

The plan is pure (:func:`split_recipients`, :func:`catch_all_owner`): the MX stores for
its own users; a submission server stores mail for its own domain and hands every other
recipient to the relay (``roundtrip/servers/relay.py``), which looks the MX up in the stack's
DNS and delivers over SMTP with STARTTLS, or captures mail for domains outside the stack.
:class:`Router` carries the plan out on the loop thread: the MX drops forged
Authentication-Results (RFC 8601 section 5), verifies DKIM, checks SPF and DMARC, prepends
one Authentication-Results field of its own (``_auth.py``), refuses mail DMARC says to reject
and files what it says to quarantine into the recipient's Junk folder, and runs the content
filter;
submission DKIM-signs what an authenticated user sends before storing or relaying it, and
drops Authentication-Results fields in the stack's name from it as the MX does; the relay's
part is
spooled before any local copy is stored (``Relay.prepare/commit/abandon``), so a failure on
either side leaves nothing that a client's retry would duplicate.

Forwarding aliases (``StackConfig.forwards``): the MX checks mail for one as any other,
then :func:`list_rewrite` changes it as a mailing list does, the domain's RSA key ARC-seals
the result (RFC 8617 section 5.1, ``roundtrip/protocols/arc.py``) and the relay sends it to
the alias's targets with the envelope sender kept, as Postfix's virtual aliases do. Each hop
adds a ``Received`` field, so a loop of aliases ends at ``SMTPLimits.max_hops`` (554 5.4.6,
bounced to the sender). Every MX validates an ARC chain it finds (``_auth.py`` decides
whether it overrides DMARC).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import quopri
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import TYPE_CHECKING

from ..config import Forward, StackConfig
from ..protocols.filter import ContentFilter, FilterInput, default_filter, header_fields
from ..protocols.smtp import Role, domain_of, drop_forged_auth_results
from ..protocols.spf import Lookup
from ..servers.relay import Relay
from ..servers.smtp import Accepted, ContentRejectedError
from ..store import Store, StoredMessage
from ._auth import JUNK, SenderVerdict, check_sender, junk_folder, trusted_sealers
from ._journeys import HopAuth, Journeys

if TYPE_CHECKING:
    # roundtrip.protocols.dkim and dkimpy are imported where DKIM runs (issue #17):
    # verification only with a key look-up (StackConfig.dkim), signing on submission.
    from ..protocols.arc import ARCResult
    from ..protocols.dkim import KeyLookup, SigningKey
    from ..servers.relay import Prepared

__all__ = ["Faults", "Router", "catch_all_owner", "list_rewrite", "split_recipients"]

# An ARC field in the header block (RFC 8617 section 4.1): validation runs only then.
_ARC_FIELD = re.compile(rb"(?im)^arc-(?:seal|message-signature|authentication-results)[ \t]*:")
_SUBJECT = re.compile(rb"(?im)^subject[ \t]*:[ \t]*")


@dataclass
class Faults:
    """Test-only misbehaviour, to prove that a validator notices it. All off by default.

    Attributes:
        drop: accept mail with 250 but never store it (a lost message).
        duplicate: store every local delivery twice.
        alter_body: change one byte of the body (a message altered in transit): mail
            arriving at an MX is altered before its checks, so DKIM fails as it would in
            the world; mail stored by submission is altered while stored.
    """

    drop: bool = False
    duplicate: bool = False
    alter_body: bool = False

    def apply(self, raw: bytes, *, alter: bool = True) -> list[bytes]:
        """The copies to store for one delivery of ``raw`` (``alter=False``: the body was
        already altered on the way, see :meth:`altered`)."""
        if self.drop:
            return []
        if alter:
            raw = self.altered(raw)
        return [raw, raw] if self.duplicate else [raw]

    def altered(self, raw: bytes) -> bytes:
        """``raw`` with one body byte changed when ``alter_body`` is on."""
        if not self.alter_body:
            return raw
        head, sep, body = raw.partition(b"\r\n\r\n")
        return head + sep + (body[:-3] + b"#" + body[-2:] if len(body) > 2 else body + b"#")


def split_recipients(
    role: Role, server_domain: str, rcpt_tos: Sequence[str]
) -> tuple[list[str], list[str]]:
    """``(stored here, relayed)``: the MX keeps every recipient it accepted (RCPT already
    refused the others); submission keeps its own domain's and relays the rest."""
    here: list[str] = []
    remote: list[str] = []
    for rcpt in rcpt_tos:
        ours = role is Role.SMTP or domain_of(rcpt) == server_domain
        (here if ours else remote).append(rcpt)
    return here, remote


def catch_all_owner(config: StackConfig, address: str) -> str | None:
    """The user who receives mail for ``address`` in a catch-all domain, if any."""
    if not config.catch_all:
        return None
    domain = domain_of(address)
    if "*" not in config.catch_all and domain not in config.catch_all:
        return None
    for user in config.users:
        if user.domain == domain:
            return user.address
    return None


def list_rewrite(raw: bytes, *, subject_prefix: str = "", footer: str = "") -> bytes:
    """``raw`` changed as a mailing list changes a message it forwards (Mailman's
    ``subject_prefix`` and ``msg_footer``): the prefix in front of the Subject value (once:
    a Subject that already starts with it is left alone), the footer after the text.

    The footer goes at the end of a ``text/plain`` body (7bit, 8bit, or quoted-printable,
    then encoded so), or into a ``multipart`` message as a last ``text/plain`` part; other
    bodies are left as they are. Both prefix and footer are printable ASCII
    (``roundtrip.config.Forward``).
    """
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        head, body = (raw if raw.endswith(b"\r\n") else raw + b"\r\n"), b""
    else:
        head, body = raw[: end + 2], raw[end + 4 :]
    if subject_prefix:
        prefix = subject_prefix.encode("ascii")
        found = _SUBJECT.search(head)
        if found is None:
            head += b"Subject: " + prefix.rstrip() + b"\r\n"
        elif not head[found.end() :].startswith(prefix):
            head = head[: found.end()] + prefix + head[found.end() :]
    if footer:
        body = _with_footer(head, body, footer)
    return head + b"\r\n" + body


def _with_footer(head: bytes, body: bytes, footer: str) -> bytes:
    text = "\r\n".join(footer.splitlines()).encode("ascii") + b"\r\n"
    fields = BytesHeaderParser(policy=compat32).parsebytes(head)
    ctype = fields.get_content_type()
    cte = str(fields.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    if ctype == "text/plain" and cte in ("7bit", "8bit", "binary"):
        return body + text
    if ctype == "text/plain" and cte == "quoted-printable":
        return body + quopri.encodestring(text.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    boundary = fields.get_boundary() if fields.get_content_maintype() == "multipart" else None
    if not boundary:
        return body
    close = body.rfind(b"--" + boundary.encode("ascii", "replace") + b"--")
    if close < 0 or (close > 0 and not body[:close].endswith(b"\r\n")):
        return body
    part = (
        b"--" + boundary.encode("ascii", "replace") + b"\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"Content-Disposition: inline\r\n\r\n" + text
    )
    return body[:close] + part + body[close:]


_SIGNER: concurrent.futures.ThreadPoolExecutor | None = None
_SIGNER_LOCK = threading.Lock()


def _signing_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The process's one DKIM signing thread (started on first use, shared by every stack:
    one is enough to take the signatures off a loop, and there is no state to keep apart)."""
    global _SIGNER
    with _SIGNER_LOCK:
        if _SIGNER is None:
            _SIGNER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="roundtrip-sign")
        return _SIGNER


class Router:
    """Carries out the plan for each accepted message (the SMTP listeners' ``router``).

    Args:
        config: for catch-all domains.
        store: where local copies go.
        journeys: where the steps are recorded.
        relay: returns the stack's relay (None before it started).
        authserv_ids: the stack's own host names, whose Authentication-Results only the
            stack may write.
        announce: called with every stored copy.
    """

    def __init__(
        self,
        *,
        config: StackConfig,
        store: Store,
        journeys: Journeys,
        relay: Callable[[], Relay | None],
        authserv_ids: Callable[[], list[str]],
        announce: Callable[[StoredMessage], None],
    ) -> None:
        self._config = config
        self._store = store
        self._journeys = journeys
        self._relay = relay
        self._authserv_ids = authserv_ids
        self._announce = announce
        #: Test-only misbehaviour switches; MailStack.reset() turns them off.
        self.faults = Faults()
        #: The receiving MX's content filter; MailStack.reset() restores the default.
        self.content_filter: ContentFilter | None = default_filter
        #: The DKIM keys submission signs with for a domain (none: it does not sign).
        self.dkim_keys: Callable[[str], Sequence[SigningKey]] = lambda domain: ()
        #: Where the MX looks DKIM keys up (None: no DKIM verification).
        self.dkim_lookup: KeyLookup | None = None
        #: Where the MX looks SPF and DMARC records up (None: no SPF or DMARC checks).
        #: With neither look-up the MX writes no Authentication-Results.
        self.sender_lookup: Lookup | None = None

    def accepts(self, address: str) -> bool:
        """Whether ``address`` may be a recipient: a user, a forwarding alias, or any address
        of a catch-all domain."""
        return (
            self._store.has_user(address)
            or self.forward(address) is not None
            or catch_all_owner(self._config, address) is not None
        )

    def forward(self, address: str) -> Forward | None:
        """The forwarding alias ``address`` names (``StackConfig.forwards``), if any: a
        user's mailbox never is one (the configuration refuses that)."""
        if not self._config.forwards:
            return None
        wanted = address.lower()  # as StackConfig tells aliases apart
        for forward in self._config.forwards:
            if forward.address.lower() == wanted:
                return forward
        return None

    def owner(self, address: str) -> str:
        """Whose mailbox gets mail for ``address``."""
        if self._store.has_user(address):
            return address
        return catch_all_owner(self._config, address) or address

    def _filtered(self, accepted: Accepted) -> tuple[bytes, bytes, str, SenderVerdict | None]:
        """What to store, as the fields to put on top and the bytes below them, and the
        folder, after the MX's checks and content filter; and what the checks found (None:
        no checks here).

        The MX's checks read the received bytes and its Received field apart
        (``Accepted.head``), and the fields they add join that field in a small block: the
        message itself is not copied here (the store joins the two when it is first read).
        """
        raw, head, mailbox = accepted.raw, accepted.head, "INBOX"
        if accepted.role is not Role.SMTP:
            return head, raw, mailbox, None
        raw = self.faults.altered(raw)
        raw = drop_forged_auth_results(raw, self._authserv_ids())
        sender = None
        if self.dkim_lookup is not None or self.sender_lookup is not None:
            dkim = arc = None
            if self.dkim_lookup is not None:
                from ..protocols.dkim import verify

                dkim = verify(raw, self.dkim_lookup, now=time.time())
                arc = self._arc(raw, self.dkim_lookup)
            sender = check_sender(
                raw,
                trace=head,
                authserv_id=accepted.hostname,
                mail_from=accepted.mail_from,
                helo=accepted.helo,
                dkim=dkim,
                lookup=self.sender_lookup,
                arc=arc,
                trusted_sealers=trusted_sealers(self._config),
            )
            self._journeys.authenticated(
                accepted.queue_id,
                HopAuth(
                    spf=sender.spf.result if sender.spf is not None else None,
                    dkim=tuple(r.result for r in dkim or ()),
                    dmarc=sender.dmarc.result if sender.dmarc is not None else None,
                    arc=arc.result if arc is not None else None,
                ),
            )
            # RFC 7489 section 6.6.4: the policy of a From domain that failed DMARC; a
            # verdict a DNS failure left open is a temporary failure (_auth.py).
            reject = sender.reject_reply
            if reject is not None:
                raise ContentRejectedError(reject)
            if sender.quarantine:
                mailbox = JUNK  # each recipient's \\Junk folder (_store_here)
            # RFC 8601 section 5: ours goes on top, above this hop's Received, below the
            # filter's fields.
            auth_field = sender.field
        else:
            auth_field = b""
        content_filter = self.content_filter
        if content_filter is None:
            return auth_field + head, raw, mailbox, sender
        verdict = content_filter(
            FilterInput(
                mail_from=accepted.mail_from,
                rcpt_tos=accepted.rcpt_tos,
                raw=raw,
                tls=accepted.tls,
                helo=accepted.helo,
                hostname=accepted.hostname,
                head=head,
            )
        )
        if verdict is None:
            return auth_field + head, raw, mailbox, sender
        if verdict.action == "reject":
            raise ContentRejectedError(verdict.reply)
        # The filter's folder, unless it says INBOX for mail DMARC quarantined.
        folder = mailbox if verdict.mailbox == "INBOX" else verdict.mailbox
        return header_fields(verdict.headers) + auth_field + head, raw, folder, sender

    @staticmethod
    def _arc(raw: bytes, lookup: KeyLookup) -> ARCResult | None:
        """The ARC chain's validation (RFC 8617 section 5.2), None without an ARC set."""
        end = raw.find(b"\r\n\r\n")
        if not _ARC_FIELD.search(raw, 0, end if end >= 0 else len(raw)):
            return None
        from ..protocols.arc import validate

        return validate(raw, lookup, now=time.time())

    def route(self, accepted: Accepted) -> None:
        """Store or relay an accepted message (runs on the loop thread)."""
        journeys = self._journeys
        journeys.record(
            accepted.queue_id,
            f"{accepted.role.value} accepted",
            accepted.hostname,
            accepted.received_monotonic,
        )
        if accepted.role is not Role.SMTP and accepted.authenticated_user and not accepted.signed:
            accepted = dataclasses.replace(accepted, raw=self._signed(accepted), signed=True)
        if accepted.role is not Role.SMTP:
            # RFC 8601 section 5, as the MX does (_filtered): an Authentication-Results field
            # in the stack's name that the client wrote goes, from the copy submission
            # stores for its own domain as from the one it relays or captures.
            cleaned = drop_forged_auth_results(accepted.raw, self._authserv_ids())
            if cleaned is not accepted.raw:
                accepted = dataclasses.replace(accepted, raw=cleaned)
        head, raw, mailbox, sender = self._filtered(accepted)
        here, remote = split_recipients(accepted.role, accepted.server_domain, accepted.rcpt_tos)
        forwards: list[Forward] = []
        if self._config.forwards:
            aliases = [r for r in here if self.forward(r) is not None]
            here = [r for r in here if r not in aliases]
            if accepted.role is Role.SMTP:
                for alias in aliases:
                    forward = self.forward(alias)
                    if forward is not None and forward not in forwards:
                        forwards.append(forward)
            else:  # submission: the domain's own aliases go through its MX as any mail
                remote += aliases
        relay = self._relay() if remote or forwards else None
        prepared: list[Prepared] = []
        try:
            if remote:
                assert relay is not None
                prepared.append(
                    relay.prepare(
                        helo=accepted.hostname,
                        mail_from=accepted.mail_from or "<>",
                        rcpt_tos=remote,
                        raw=accepted.message,
                        received_at=accepted.received_at,
                        origin_id=accepted.queue_id,
                    )
                )
            for forward in forwards:
                assert relay is not None
                prepared.append(
                    relay.prepare(
                        helo=accepted.hostname,
                        mail_from=accepted.mail_from or "<>",
                        rcpt_tos=forward.to,
                        raw=self._forwarded(forward, head + raw, accepted.hostname, sender),
                        received_at=accepted.received_at,
                        origin_id=accepted.queue_id,
                    )
                )
            self._store_here(here, head, raw, mailbox, accepted.mail_from, accepted.role)
        except BaseException:
            assert relay is not None or not prepared
            for done in prepared:
                assert relay is not None
                relay.abandon(done)
            raise
        if here:
            journeys.record(accepted.queue_id, "stored", accepted.hostname, time.monotonic())
            journeys.index(raw, head=head)
        for done in prepared:
            assert relay is not None
            entry = relay.commit(done)
            journeys.relayed(entry.id, accepted.queue_id)
            journeys.record(accepted.queue_id, "relay queued", entry.id, time.monotonic())

    def _forwarded(
        self, forward: Forward, raw: bytes, hostname: str, sender: SenderVerdict | None
    ) -> bytes:
        """The copy the alias sends on: rewritten as a list does, then ARC-sealed with the
        alias domain's RSA key (RFC 8617 section 5.1) when the stack holds one, this hop's
        verdicts as the ARC-Authentication-Results."""
        copy = list_rewrite(raw, subject_prefix=forward.subject_prefix, footer=forward.footer)
        domain = forward.address.rpartition("@")[2]
        key = next((k for k in self.dkim_keys(domain) if k.algorithm == "rsa-sha256"), None)
        if key is None:
            return copy
        from ..protocols.arc import ARCResult, seal

        chain = sender.arc if sender is not None and sender.arc is not None else ARCResult("none")
        results = _resinfo(sender.field if sender is not None else b"")
        if not re.search(r"(?:\A|;)\s*arc\s*=", results):
            results = f"{results}; arc={chain.result}" if results else f"arc={chain.result}"
        try:
            return seal(copy, key, hostname, results, chain, now=time.time()) + copy
        except ValueError:  # the chain is at i=50 already: it goes on unsealed
            return copy

    async def prepare(self, accepted: Accepted, shared: bool = True) -> Accepted:
        """Sign a submitted message before :meth:`route` (the SMTP listeners' ``prepare``).

        An RSA-2048 signature costs about 0.8 ms of OpenSSL, which runs without the GIL. On
        the loop thread it stalls every session for that long: under load that was 19 % of
        the stack's CPU (issue #17). When other SMTP sessions share the loop (``shared``) the
        signature is made on the signing thread and the loop serves them meanwhile; alone, it
        is made in place, which spares the two thread hops (about 0.2 ms of a lone round
        trip). Either way the session that sent the message waits for it, so its 250 comes
        after the signature.
        """
        if accepted.role is Role.SMTP or not accepted.authenticated_user:
            return accepted
        keys = self._keys_for(accepted)
        if not keys:  # nothing to sign: no hop
            raw = accepted.raw
        elif shared:
            raw = await asyncio.get_running_loop().run_in_executor(
                _signing_thread(), self._signed, accepted, keys
            )
        else:
            raw = self._signed(accepted, keys)
        return dataclasses.replace(accepted, raw=raw, signed=True)

    def _keys_for(self, accepted: Accepted) -> Sequence[SigningKey]:
        """The keys a submitted message is signed with: the From domain's when the stack
        holds keys for it, else the authenticated user's domain's (none: it goes unsigned)."""
        from ..protocols.dkim import from_domain

        keys = self.dkim_keys(from_domain(accepted.raw) or "")
        if not keys:
            keys = self.dkim_keys(domain_of(accepted.authenticated_user or ""))
        return keys

    def _signed(self, accepted: Accepted, keys: Sequence[SigningKey] | None = None) -> bytes:
        """The message with the DKIM signatures of ``keys`` (by default :meth:`_keys_for`)."""
        from ..protocols.dkim import sign

        raw = accepted.raw
        if keys is None:
            keys = self._keys_for(accepted)
        if not keys:
            return raw
        try:
            return sign(raw, keys, now=time.time())
        except Exception:  # dkimpy cannot read this header block: the mail goes unsigned
            return raw

    def _store_here(
        self, here: list[str], head: bytes, raw: bytes, mailbox: str, mail_from: str, role: Role
    ) -> None:
        for rcpt in here:
            owner = self.owner(rcpt)
            folder = junk_folder(self._store, owner) if mailbox == JUNK else mailbox
            # The MX altered the body on arrival already (_filtered).
            for copy in self.faults.apply(raw, alter=role is not Role.SMTP):
                stored = self._store.deliver(
                    owner,
                    copy,
                    mailbox=folder,
                    envelope_from=mail_from,
                    envelope_to=(rcpt,),
                    head=head,
                )
                self._announce(stored)


def _resinfo(field: bytes) -> str:
    """The results of an Authentication-Results field, without its name and authserv-id,
    on one line (what ARC-Authentication-Results repeats, RFC 8617 section 4.1.1)."""
    text = re.sub(r"\r\n[ \t]+", " ", field.decode("utf-8", "replace")).strip()
    _, _, results = text.partition(";")
    return results.strip()
