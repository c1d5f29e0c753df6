"""Assertions over the messages a mailbox received, with failure messages a human can act on.

``assert_delivered(messages, to=..., subject=...)`` returns the matching messages or raises
``AssertionError``. The message says what was expected, then what did arrive (sender,
recipients, subject, time; at most :data:`MAX_SHOWN` arrivals), and, when one arrival misses by
a single criterion (a subject a few characters off, the right subject for the wrong recipient),
a short ``difflib`` diff of that closest candidate. ``assert_not_delivered`` is the negation.

Criteria combine with AND:

- ``to``: a recipient (a bare address; surrounding space is ignored), compared
  case-insensitively with the envelope recipients of a stored message (the stack's) and,
  when it has one, its mailbox owner (a catch-all domain's user); a copy a client only
  APPENDed (its Sent copy, a draft) has none and was delivered to nobody. A message
  without a store record (one downloaded over IMAP or POP3) is compared with its To and Cc
  addresses.
- ``subject``: the exact decoded Subject, or a compiled regular expression (``search``).
- ``sender``: the From address (a bare address, surrounding space ignored, case-insensitive),
  also accepted as the Sender or envelope sender.
- ``headers``: ``{name: value}``; each value exact (surrounding space ignored) or a compiled
  regular expression; any occurrence of a repeated header may match, except on a copy the
  stack stored, where only the stack's own copy of a field it writes counts (see
  :func:`header_values`): ``{"X-Spam-Flag": "NO"}`` is what the stack's filter said, never
  an ``X-Spam-Flag: NO`` the sender put in the message.
- ``body_contains``: a substring of the text body or of the HTML body.
- ``auth``: ``{method: result}`` read from the message's ``auth`` (what the receiving MX
  found): ``{"dkim": "pass"}`` holds when it has at least one ``dkim`` result and every one
  of them is ``pass`` (so one failing signature of two does not hide). For a copy the stack
  stored (``DeliveredMessage.auth``) that is only the Authentication-Results field the
  stack's MX added, never one the sender wrote: mail submission stored for its own domain
  passed no MX, has none, and fails every ``auth`` criterion (the failure says so). For a
  download it is the topmost field (RFC 8601 section 5).
- ``match``: any predicate, for example :func:`header_matches` or :func:`body_contains`
  (these two describe themselves in failure messages).

This module uses only the standard library, :mod:`roundtrip.message` and
:mod:`roundtrip.store`; it never imports
pytest, so the same calls work in any test runner.
"""

from __future__ import annotations

import difflib
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from .errors import ConfigError
from .message import Headers, ReceivedMessage
from .store import address_key

__all__ = [
    "MAX_SHOWN",
    "Criteria",
    "Matcher",
    "TextPattern",
    "assert_delivered",
    "assert_not_delivered",
    "body_contains",
    "check_delivered",
    "check_not_delivered",
    "header_matches",
    "header_values",
    "wait_for_matches",
]

#: At most this many arrivals are listed in a failure message (the newest ones).
MAX_SHOWN = 20

M = TypeVar("M", bound=ReceivedMessage)
#: A literal string, or a compiled regular expression applied with ``search``.
TextPattern = str | re.Pattern[str]

# Near misses: a subject or body line at least this similar (difflib ratio) gets a diff.
_SIMILAR = 0.6
_DIFF_LINES = 12


class Matcher:
    """A predicate on a message that can describe itself in a failure message.

    Args:
        description: what it checks, as it reads after "matching", e.g.
            ``header X-Spam-Flag ~ 'NO'``.
        predicate: the check itself.
    """

    __slots__ = ("_predicate", "description")

    def __init__(self, description: str, predicate: Callable[[ReceivedMessage], bool]) -> None:
        self.description = description
        self._predicate = predicate

    def __call__(self, message: ReceivedMessage) -> bool:
        return bool(self._predicate(message))

    def __repr__(self) -> str:
        return f"<Matcher {self.description}>"


def _compile(pattern: TextPattern) -> re.Pattern[str]:
    return pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)


#: Fields the stack writes when it stores a copy: its Received field, its receiving MX's
#: Authentication-Results (RFC 8601 section 5) and the default content filter's ``X-Spam-*``
#: fields (roundtrip/protocols/filter.py).
STACK_FIELDS = frozenset({"received", "authentication-results"})
STACK_FIELD_PREFIXES = ("x-spam-",)


def _stack_field(name: str) -> bool:
    lowered = name.lower()
    return lowered in STACK_FIELDS or lowered.startswith(STACK_FIELD_PREFIXES)


def header_values(message: ReceivedMessage, name: str) -> list[str]:
    """The values of header ``name`` that ``headers=`` and :func:`header_matches` look at.

    On a copy the stack stored (it has ``stack_headers``, the fields the stack put on top,
    ``DeliveredMessage.stack_headers``), a field the stack wrote is read from those only:
    for a name among them (a content filter's fields, the DKIM-Signature submission adds,
    its Received), and for the names the stack writes (:data:`STACK_FIELDS`, ``X-Spam-*``)
    even when it did not write one this time (mail submission stored for its own domain
    passes no content filter). So an ``X-Spam-Flag: NO`` the sender wrote below the
    filter's ``X-Spam-Flag: YES`` never matches. Any other name: every occurrence, in order,
    as on a download (IMAP, POP3), whose fields are all there is.
    """
    added = getattr(message, "stack_headers", None)
    if not isinstance(added, Headers):
        return message.headers.get_all(name)
    values = added.get_all(name)
    if values or _stack_field(name):
        return values
    return message.headers.get_all(name)


def header_matches(name: str, pattern: TextPattern) -> Matcher:
    """A matcher: some value of header ``name`` matches ``pattern`` (``re.search``).

    Args:
        name: the header name (case-insensitive); on a copy the stack stored, a field the
            stack writes is read from the stack's own copy only (:func:`header_values`).
        pattern: a regular expression, as a string or compiled; values are decoded and
            unfolded (see :class:`roundtrip.message.Headers`).
    """
    regex = _compile(pattern)

    def check(message: ReceivedMessage) -> bool:
        return any(regex.search(value) for value in header_values(message, name))

    return Matcher(f"header {name} ~ {regex.pattern!r}", check)


def body_contains(text: str) -> Matcher:
    """A matcher: the text body or the HTML body contains ``text``."""

    def check(message: ReceivedMessage) -> bool:
        return _body_has(message, text)

    return Matcher(f"body containing {text!r}", check)


def _body_has(message: ReceivedMessage, text: str) -> bool:
    return any(text in body for body in (message.text, message.html) if body)


def _norm_space(value: str) -> str:
    return " ".join(value.split())


@dataclass(frozen=True)
class Criteria:
    """What a wanted message looks like; see the module docstring for each field.

    ``select(messages)`` returns the messages that match; :meth:`MailStack.assert_delivered`
    uses it to wait until enough have arrived.
    """

    to: str | None = None
    subject: TextPattern | None = None
    sender: str | None = None
    match: Callable[[ReceivedMessage], bool] | None = None
    headers: Mapping[str, TextPattern] | None = None
    body_contains: str | None = None
    auth: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        # One form for every address the stack compares (store.address_key, as wait_for and
        # messages() use it): " Bob@Example.org\n" finds bob's mail here too.
        for name in ("to", "sender"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _address(value, name))

    def count(self) -> int:
        """How many criteria are given (each header or auth method counts as one)."""
        given = [self.to, self.subject, self.sender, self.match, self.body_contains]
        return sum(v is not None for v in given) + len(self.headers or {}) + len(self.auth or {})

    def failures(self, message: ReceivedMessage) -> list[str]:
        """Names of the criteria ``message`` does not meet (empty: it matches)."""
        failed = []
        if self.to is not None and self.to not in _recipients(message):
            failed.append("to")
        if self.subject is not None and not _subject_ok(self.subject, message.subject):
            failed.append("subject")
        if self.sender is not None and self.sender not in _senders(message):
            failed.append("sender")
        for name, wanted in (self.headers or {}).items():
            if not _header_ok(message, name, wanted):
                failed.append(f"header {name}")
        if self.body_contains is not None and not _body_has(message, self.body_contains):
            failed.append("body")
        for method, wanted in (self.auth or {}).items():
            found = [r.result for r in message.auth.of(method)]
            if not found or any(r != wanted.lower() for r in found):
                failed.append(f"auth {method}")
        if self.match is not None and not self.match(message):
            failed.append("match")
        return failed

    def select(self, messages: Iterable[M]) -> list[M]:
        """The messages that meet every criterion, in the order given."""
        return [m for m in messages if not self.failures(m)]

    def describe(self) -> str:
        """The wanted message in words: ``to X with subject 'Y' from Z ...``."""
        parts = [f"to {self.to}" if self.to is not None else "to anyone"]
        if self.subject is not None:
            if isinstance(self.subject, re.Pattern):
                parts.append(f"with subject ~ {self.subject.pattern!r}")
            else:
                parts.append(f"with subject {self.subject!r}")
        if self.sender is not None:
            parts.append(f"from {self.sender}")
        for name, wanted in (self.headers or {}).items():
            shown = wanted.pattern if isinstance(wanted, re.Pattern) else wanted
            op = "~" if isinstance(wanted, re.Pattern) else "="
            parts.append(f"with header {name} {op} {shown!r}")
        if self.body_contains is not None:
            parts.append(f"with body containing {self.body_contains!r}")
        for method, wanted in (self.auth or {}).items():
            parts.append(f"with {method}={wanted}")
        if self.match is not None:
            described = getattr(self.match, "description", None)
            fname = getattr(self.match, "__name__", None)
            parts.append(
                f"matching {described}"
                if described
                else f"matching {fname}()"
                if fname and fname != "<lambda>"
                else "matching the given predicate"
            )
        return " ".join(parts)


def _address(value: str, name: str) -> str:
    """``value`` as the stack compares addresses (:func:`roundtrip.store.address_key`).

    Raises:
        ConfigError: not a bare address (``user@example.org``): one with a display name or
            angle brackets, or several, would match no message and pass every
            ``assert_not_delivered``.
    """
    key = address_key(value)
    if not key or any(c.isspace() or c in "<>,;" for c in key):
        raise ConfigError(f"{name}={value!r} is not a bare address such as user@example.org")
    return key


def _recipients(message: ReceivedMessage) -> set[str]:
    stored = getattr(message, "stored", None)
    if stored is None:  # a download (IMAP, POP3): its header fields are all there is
        return {address_key(a) for a in (*message.to, *message.cc)}
    # A stored copy belongs to whom it was delivered: its envelope recipients and the owner
    # of its mailbox. Not to every address in its To and Cc: alice's copy of a message to
    # alice and bob is not bob's, and counting it made assert_delivered(to=bob) pass with
    # bob's copy missing (and the outbound capture's copy for an outside recipient match
    # every local address in its header).
    envelope_to = getattr(message, "envelope_to", ())
    found = {address_key(a) for a in envelope_to if isinstance(a, str)}
    user = getattr(stored, "user", None)
    # A copy in the stack's outbound capture belongs to its envelope recipient, not to the
    # capture mailbox that holds it. A copy without an envelope recipient was APPENDed by
    # a client (RFC 3501 section 6.3.11: its own Sent copy, a draft), never delivered: it
    # is not its owner's mail either.
    if isinstance(user, str) and found and not getattr(message, "captured", False):
        found.add(address_key(user))
    return found


def _senders(message: ReceivedMessage) -> set[str]:
    found = {address_key(a) for a in (message.from_, message.sender) if a}
    envelope_from = getattr(message, "envelope_from", None)
    if isinstance(envelope_from, str) and envelope_from:
        found.add(address_key(envelope_from))
    return found


def _subject_ok(wanted: TextPattern, subject: str) -> bool:
    if isinstance(wanted, re.Pattern):
        return wanted.search(subject) is not None
    return subject == wanted


def _header_ok(message: ReceivedMessage, name: str, wanted: TextPattern) -> bool:
    values = header_values(message, name)
    if isinstance(wanted, re.Pattern):
        return any(wanted.search(v) for v in values)
    return any(_norm_space(v) == _norm_space(wanted) for v in values)


# -- waiting -----------------------------------------------------------------------------------


def wait_for_matches(
    snapshot: Callable[[], Sequence[M]],
    criteria: Criteria,
    *,
    count: int,
    wait_until: Callable[[Callable[[], bool], float], object],
    timeout: float,
) -> list[M]:
    """Wait until ``count`` messages of ``snapshot()`` meet ``criteria``; return the matches.

    The one waiting loop behind ``MailStack.wait_for``, ``assert_delivered`` and
    ``assert_not_delivered``: ``wait_until(predicate, timeout)`` re-evaluates ``predicate``
    whenever the store changes (``Store.wait_until``), so nothing polls.

    Returns:
        The matching messages of the last snapshot taken: fewer than ``count`` when the
        timeout passed first (the caller decides what that means).
    """
    __tracebackhide__ = True  # the report shows the test's line, not ours
    if count <= 0:
        return criteria.select(snapshot())
    found: list[M] = []

    def enough() -> bool:
        nonlocal found
        found = criteria.select(snapshot())
        return len(found) >= count

    wait_until(enough, timeout)  # evaluates enough() first: no wait when it already holds
    return found


# -- the assertions ----------------------------------------------------------------------------


def assert_delivered(
    messages: Iterable[M],
    *,
    to: str | None = None,
    subject: TextPattern | None = None,
    sender: str | None = None,
    count: int | None = 1,
    match: Callable[[ReceivedMessage], bool] | None = None,
    headers: Mapping[str, TextPattern] | None = None,
    body_contains: str | None = None,
    auth: Mapping[str, str] | None = None,
) -> list[M]:
    """Assert that ``count`` of ``messages`` meet every given criterion, and return them.

    Args:
        messages: what arrived (``mailstack.messages()``, parsed IMAP/POP3 downloads ...).
        to, subject, sender, match, headers, body_contains, auth: the criteria (module
            docstring).
        count: how many must match exactly; ``None`` means at least one.

    Returns:
        The matching messages, in the order given.

    Raises:
        AssertionError: a different number matched. The message lists what arrived and,
            for a near miss, a diff of the closest candidate.
        ValueError: ``count`` is negative.
    """
    __tracebackhide__ = True  # the report shows the test's line, not ours
    criteria = Criteria(to, subject, sender, match, headers, body_contains, auth)
    return check_delivered(list(messages), criteria, count)


def check_delivered(
    arrived: Sequence[M],
    criteria: Criteria,
    count: int | None,
    *,
    pending: Sequence[str] = (),
    elsewhere: Callable[[], Sequence[ReceivedMessage]] | None = None,
    where: str | None = None,
) -> list[M]:
    """:func:`assert_delivered` with what a caller knows besides ``arrived``.

    Args:
        pending: lines about mail still on its way to a matching recipient (the stack's
            relay queue): with an exact ``count`` the assertion fails while there are any,
            since the count is not final.
        elsewhere: returns the arrivals in the folders not searched, listed when nothing
            matched.
        where: the folder searched (None: every folder).
    """
    __tracebackhide__ = True  # the report shows the test's line, not ours
    if count is not None and count < 0:
        raise ConfigError(f"count must be >= 0 or None, got {count}")
    matched = criteria.select(arrived)
    final = count is None or not pending
    if final and ((count is None and matched) or len(matched) == count):
        return matched
    want = "at least 1 message" if count is None else _plural(count, "message")
    if count is not None and len(matched) == count:
        lines = [
            f"expected exactly {want} {criteria.describe()}: {len(matched)} matched, but the "
            "count is not final:",
            *pending,
        ]
        if matched:
            lines += ["Matched:", *_listing(matched)]
        raise AssertionError("\n".join(lines))
    if count is not None and count > 0 and matched:
        lines = [
            f"expected exactly {want} {criteria.describe()}, but {len(matched)} matched:",
            *_listing(matched),
            *pending,
        ]
        raise AssertionError("\n".join(lines))
    exactly = "exactly " if count is not None else ""
    lines = [f"expected {exactly}{want} {criteria.describe()}, but {len(matched)} matched."]
    if count == 0:
        lines.append("Matched:")
        lines += _listing(matched)
    elif not matched:
        lines += _near_miss(criteria, arrived)
        lines += _auth_misses(criteria, arrived)
        lines += _arrivals(arrived, where)
        lines += _elsewhere(criteria, elsewhere() if elsewhere else (), where)
    lines += pending
    raise AssertionError("\n".join(lines))


def assert_not_delivered(
    messages: Iterable[ReceivedMessage],
    *,
    to: str | None = None,
    subject: TextPattern | None = None,
    sender: str | None = None,
    match: Callable[[ReceivedMessage], bool] | None = None,
    headers: Mapping[str, TextPattern] | None = None,
    body_contains: str | None = None,
    auth: Mapping[str, str] | None = None,
) -> None:
    """Assert that none of ``messages`` meets every given criterion.

    With no criterion at all, asserts that nothing arrived.

    Raises:
        AssertionError: something matched; the message lists what.
    """
    __tracebackhide__ = True  # the report shows the test's line, not ours
    criteria = Criteria(to, subject, sender, match, headers, body_contains, auth)
    check_not_delivered(list(messages), criteria)


def check_not_delivered(
    messages: Sequence[ReceivedMessage], criteria: Criteria, *, pending: Sequence[str] = ()
) -> None:
    """:func:`assert_not_delivered`; ``pending`` as for :func:`check_delivered`: mail still
    on its way to a matching recipient fails it, since it may yet be delivered."""
    __tracebackhide__ = True  # the report shows the test's line, not ours
    matched = criteria.select(messages)
    if not matched and not pending:
        return
    if matched:
        lines = [
            f"expected no message {criteria.describe()}, but {len(matched)} matched:",
            *_listing(matched),
            *pending,
        ]
    else:
        lines = [
            f"expected no message {criteria.describe()}; none matched yet, but it may still "
            "be delivered:",
            *pending,
        ]
    raise AssertionError("\n".join(lines))


# -- failure text ------------------------------------------------------------------------------


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _when(message: ReceivedMessage) -> str:
    stored = getattr(message, "stored", None)
    internal = getattr(stored, "internal_date", None)
    if isinstance(internal, (int, float)):
        return time.strftime("%H:%M:%S", time.localtime(internal))
    date = message.date
    if isinstance(date, datetime):
        return date.strftime("%Y-%m-%d %H:%M:%S %z").strip()
    return "no date"


def _arrival(message: ReceivedMessage) -> str:
    recipients = sorted(_recipients(message)) or ["<no recipients>"]
    stored = getattr(message, "stored", None)
    where = ""
    if getattr(message, "captured", False):
        where = " [outbound capture: an outside domain]"
    elif stored is not None and isinstance(getattr(stored, "mailbox", None), str):
        where = f" [{stored.mailbox}]"
    return (
        f"from {message.from_ or '<no sender>'} to {', '.join(recipients)}{where} "
        f"subject {message.subject!r} at {_when(message)}"
    )


def _listing(messages: Sequence[ReceivedMessage]) -> list[str]:
    shown = messages[-MAX_SHOWN:]
    lines = []
    if len(messages) > len(shown):
        lines.append(f"  ({len(messages) - len(shown)} earlier not shown)")
    lines += [f"  - {_arrival(m)}" for m in shown]
    return lines


def _arrivals(arrived: Sequence[ReceivedMessage], where: str | None = None) -> list[str]:
    place = f" in {where}" if where is not None else ""
    if not arrived:
        return [f"Nothing arrived{place}."]
    return [f"What did arrive{place} ({len(arrived)}):", *_listing(arrived)]


def _elsewhere(
    criteria: Criteria, elsewhere: Sequence[ReceivedMessage], where: str | None
) -> list[str]:
    """The arrivals in the folders not searched, those that meet every criterion first."""
    if not elsewhere:
        return []
    matching = criteria.select(elsewhere)
    lines = [f"In other folders than {where} ({len(elsewhere)}, not searched):"]
    if matching:
        lines[0] += f" {len(matching)} of them meet every criterion:"
    others = [m for m in elsewhere if m not in matching]
    return lines + _listing([*others, *matching])


#: Why a stored copy has no Authentication-Results field of the stack.
NO_STACK_AUTH = (
    "no Authentication-Results field of the stack: no receiving MX of the stack checked it "
    "(mail submission stores for its own domain, or a client APPENDed)"
)


def _auth_found(message: ReceivedMessage) -> str:
    """The results ``message.auth`` holds, in one line, or why there are none."""
    auth = message.auth
    if not auth.authserv_id:
        if getattr(message, "stored", None) is not None:
            return NO_STACK_AUTH
        return auth.error or "no Authentication-Results field"
    found = ", ".join(
        f"{r.method}={r.result}" + (f" ({r.reason})" if r.reason else "") for r in auth.results
    )
    return f"at {auth.authserv_id}: {found or 'no results'}"


def _auth_misses(criteria: Criteria, arrived: Sequence[ReceivedMessage]) -> list[str]:
    """The arrivals that meet every criterion but ``auth``, with what their field says."""
    if not criteria.auth:
        return []
    missed = []
    for message in arrived:
        failed = criteria.failures(message)
        if failed and all(f.startswith("auth ") for f in failed):
            missed.append(message)
    if not missed:
        return []
    shown = missed[-5:]
    lines = [f"Only the authentication results differ for {_plural(len(missed), 'arrival')}:"]
    lines += [f"  - {_arrival(m)}: {_auth_found(m)}" for m in shown]
    return lines


def _ratio(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _closeness(criteria: Criteria, message: ReceivedMessage, failed: list[str]) -> float:
    """Higher is closer: few failed criteria, then a similar subject."""
    score = -float(len(failed))
    if isinstance(criteria.subject, str):
        score += _ratio(criteria.subject, message.subject) / 2
    return score


def _near_miss(criteria: Criteria, arrived: Sequence[ReceivedMessage]) -> list[str]:
    """A diff of the closest candidate, when it misses by one criterion only."""
    best: tuple[float, ReceivedMessage, list[str]] | None = None
    for message in arrived:
        failed = criteria.failures(message)
        score = _closeness(criteria, message, failed)
        if best is None or score > best[0]:
            best = (score, message, failed)
    if best is None:
        return []
    _, message, failed = best
    if len(failed) != 1:
        return []
    what = failed[0]
    if what == "subject" and isinstance(criteria.subject, str):
        if _ratio(criteria.subject, message.subject) < _SIMILAR:
            return []
    elif criteria.count() < 2:
        return []  # it met no other criterion: not a near miss, just a different message
    head = f"Closest candidate (only {what if what != 'match' else 'the predicate'} differs): "
    lines = [head + _arrival(message)]
    if what == "subject" and isinstance(criteria.subject, str):
        lines += _diff([criteria.subject], [message.subject], "subject")
    elif what == "to":
        got = ", ".join(sorted(_recipients(message))) or "<no recipients>"
        lines.append(f"  it went to {got}, not {criteria.to}")
        close = difflib.get_close_matches(
            (criteria.to or "").lower(), sorted(_recipients(message)), n=1
        )
        if close:
            lines += _diff([criteria.to or ""], close, "recipient")
    elif what == "sender":
        got = ", ".join(sorted(_senders(message))) or "<no sender>"
        lines.append(f"  it came from {got}, not {criteria.sender}")
        lines += _diff([criteria.sender or ""], [message.from_ or ""], "sender")
    elif what.startswith("header "):
        name = what[len("header ") :]
        values = header_values(message, name)
        # The stack's copies are the topmost ones (header_values): what is left is not its.
        ignored = message.headers.get_all(name)[len(values) :]
        if values:
            lines.append(f"  {name}: {values!r}")
        elif ignored:
            lines.append(f"  the stack added no {name} field")
        else:
            lines.append(f"  it has no {name} header")
        if ignored:
            lines.append(f"  not the stack's, so not matched: {name}: {ignored!r}")
        wanted = (criteria.headers or {}).get(name)
        if isinstance(wanted, str) and len(values) == 1:
            lines += _diff([wanted], values, name)
    elif what == "body":
        lines += _body_near_miss(criteria.body_contains or "", message)
    elif what.startswith("auth "):
        method = what[len("auth ") :]
        found = [
            f"{r.result}" + (f" ({r.reason})" if r.reason else "") for r in message.auth.of(method)
        ]
        if message.auth.authserv_id:
            where = message.auth.authserv_id
            lines.append(f"  {method} results at {where}: {', '.join(found) or 'none reported'}")
        else:
            lines.append(f"  {_auth_found(message)}")
    return lines


def _body_near_miss(wanted: str, message: ReceivedMessage) -> list[str]:
    body = message.text if message.text is not None else message.html
    if not body:
        return ["  it has no text or HTML body"]
    candidates = [line.strip() for line in body.splitlines() if line.strip()]
    close = difflib.get_close_matches(wanted.strip(), candidates, n=1, cutoff=_SIMILAR)
    if close:
        return _diff([wanted.strip()], close, "body line")
    preview = _norm_space(body)
    return [f"  body starts {preview[:80]!r}{'...' if len(preview) > 80 else ''}"]


def _diff(expected: list[str], actual: list[str], what: str) -> list[str]:
    diff = list(
        difflib.ndiff(
            [f"{e}\n" for e in expected],
            [f"{a}\n" for a in actual],
        )
    )
    lines = [f"  diff of {what} (- expected, + actual):"]
    lines += ["    " + line.rstrip("\n") for line in diff[:_DIFF_LINES]]
    return lines
