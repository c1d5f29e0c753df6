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
submission DKIM-signs what an authenticated user sends before storing or relaying it; the
relay's part is
spooled before any local copy is stored (``Relay.prepare/commit/abandon``), so a failure on
either side leaves nothing that a client's retry would duplicate.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import StackConfig
from ..protocols.filter import ContentFilter, FilterInput, default_filter, prepend_headers
from ..protocols.smtp import Role, domain_of, drop_forged_auth_results
from ..protocols.spf import Lookup
from ..servers.relay import Relay
from ..servers.smtp import Accepted, ContentRejectedError
from ..store import Store, StoredMessage
from ._auth import JUNK, check_sender, junk_folder
from ._journeys import HopAuth, Journeys

if TYPE_CHECKING:
    # roundtrip.protocols.dkim and dkimpy are imported where DKIM runs (issue #17):
    # verification only with a key look-up (StackConfig.dkim), signing on submission.
    from ..protocols.dkim import KeyLookup, SigningKey

__all__ = ["Faults", "Router", "catch_all_owner", "split_recipients"]


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
        """Whether ``address`` may be a recipient: a user, or any address of a catch-all."""
        return self._store.has_user(address) or catch_all_owner(self._config, address) is not None

    def owner(self, address: str) -> str:
        """Whose mailbox gets mail for ``address``."""
        if self._store.has_user(address):
            return address
        return catch_all_owner(self._config, address) or address

    def _filtered(self, accepted: Accepted) -> tuple[bytes, str]:
        """The bytes to store and the folder, after the MX's checks and content filter."""
        raw, mailbox = accepted.raw, "INBOX"
        if accepted.role is not Role.SMTP:
            return raw, mailbox
        raw = self.faults.altered(raw)
        raw = drop_forged_auth_results(raw, self._authserv_ids())
        if self.dkim_lookup is not None or self.sender_lookup is not None:
            dkim = None
            if self.dkim_lookup is not None:
                from ..protocols.dkim import verify

                dkim = verify(raw, self.dkim_lookup)
            sender = check_sender(
                raw,
                authserv_id=accepted.hostname,
                mail_from=accepted.mail_from,
                helo=accepted.helo,
                dkim=dkim,
                lookup=self.sender_lookup,
            )
            self._journeys.authenticated(
                accepted.queue_id,
                HopAuth(
                    spf=sender.spf.result if sender.spf is not None else None,
                    dkim=tuple(r.result for r in dkim or ()),
                    dmarc=sender.dmarc.result if sender.dmarc is not None else None,
                ),
            )
            # RFC 7489 section 6.6.4: the policy of a From domain that failed DMARC.
            reject = sender.reject_reply
            if reject is not None:
                raise ContentRejectedError(reject)
            if sender.quarantine:
                mailbox = JUNK  # each recipient's \\Junk folder (_store_here)
            # RFC 8601 section 5: ours goes on top, above this hop's Received; prepended
            # below the filter's fields in one copy (a big message is copied once here).
            auth_field = sender.field
        else:
            auth_field = b""
        content_filter = self.content_filter
        if content_filter is None:
            return prepend_headers(raw, (), below=auth_field), mailbox
        verdict = content_filter(
            FilterInput(
                mail_from=accepted.mail_from,
                rcpt_tos=accepted.rcpt_tos,
                raw=raw,
                tls=accepted.tls,
                helo=accepted.helo,
                hostname=accepted.hostname,
            )
        )
        if verdict is None:
            return prepend_headers(raw, (), below=auth_field), mailbox
        if verdict.action == "reject":
            raise ContentRejectedError(verdict.reply)
        # The filter's folder, unless it says INBOX for mail DMARC quarantined.
        folder = mailbox if verdict.mailbox == "INBOX" else verdict.mailbox
        return prepend_headers(raw, verdict.headers, below=auth_field), folder

    def route(self, accepted: Accepted) -> None:
        """Store or relay an accepted message (runs on the loop thread)."""
        journeys = self._journeys
        journeys.record(
            accepted.queue_id,
            f"{accepted.role.value} accepted",
            accepted.hostname,
            accepted.received_monotonic,
        )
        if accepted.role is not Role.SMTP and accepted.authenticated_user:
            accepted = dataclasses.replace(accepted, raw=self._signed(accepted))
        raw, mailbox = self._filtered(accepted)
        here, remote = split_recipients(accepted.role, accepted.server_domain, accepted.rcpt_tos)
        relay = self._relay() if remote else None
        prepared = None
        if remote:
            assert relay is not None
            prepared = relay.prepare(
                helo=accepted.hostname,
                mail_from=accepted.mail_from or "<>",
                rcpt_tos=remote,
                raw=accepted.raw,
                received_at=accepted.received_at,
                origin_id=accepted.queue_id,
            )
        try:
            self._store_here(here, raw, mailbox, accepted.mail_from, accepted.role)
        except BaseException:
            if prepared is not None:
                assert relay is not None
                relay.abandon(prepared)
            raise
        if here:
            journeys.record(accepted.queue_id, "stored", accepted.hostname, time.monotonic())
            journeys.index(raw)
        if prepared is not None:
            assert relay is not None
            entry = relay.commit(prepared)
            journeys.relayed(entry.id, accepted.queue_id)
            journeys.record(accepted.queue_id, "relay queued", entry.id, time.monotonic())

    def _signed(self, accepted: Accepted) -> bytes:
        """The message with the sending domain's DKIM signatures: the From domain's when the
        stack holds keys for it, else the authenticated user's domain's."""
        from ..protocols.dkim import from_domain, sign

        raw = accepted.raw
        keys = self.dkim_keys(from_domain(raw) or "")
        if not keys:
            keys = self.dkim_keys(domain_of(accepted.authenticated_user or ""))
        if not keys:
            return raw
        try:
            return sign(raw, keys)
        except Exception:  # dkimpy cannot read this header block: the mail goes unsigned
            return raw

    def _store_here(
        self, here: list[str], raw: bytes, mailbox: str, mail_from: str, role: Role
    ) -> None:
        for rcpt in here:
            owner = self.owner(rcpt)
            folder = junk_folder(self._store, owner) if mailbox == JUNK else mailbox
            # The MX altered the body on arrival already (_filtered).
            for copy in self.faults.apply(raw, alter=role is not Role.SMTP):
                stored = self._store.deliver(
                    owner, copy, mailbox=folder, envelope_from=mail_from, envelope_to=(rcpt,)
                )
                self._announce(stored)
