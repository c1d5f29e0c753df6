"""Load: many messages over many connections, both directions, nothing lost or duplicated.

Messages go example.com -> example.org and example.org -> example.com, each submitted on 465
and relayed to the other domain's MX over STARTTLS. Then every mailbox is read over IMAP and
over POP3, and each message's token must appear exactly once in the right mailbox
(docs/security.md A8.5 at scale).

The default size keeps the suite fast; ``ROUNDTRIP_LOAD_MESSAGES=10000`` runs the full test.
Figures measured on the reference machine are in docs/security.md.
"""

from __future__ import annotations

import asyncio
import collections
import imaplib
import os
import poplib
import re
import time
import uuid
from collections.abc import Iterator

import aiosmtplib
import pytest

from roundtrip import MailStack, StackConfig, User

MESSAGES = int(os.environ.get("ROUNDTRIP_LOAD_MESSAGES", "2000"))
CONNECTIONS = 32
# Messages per SMTP session before reconnecting: stays well inside the per-session command
# budget (SMTPLimits.command_limits, 1000 commands).
PER_SESSION = 100
TIMEOUT = 30.0
TOKEN = re.compile(rb"X-Load-Token: (\S+)")


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    # Default abuse limits: the load must fit inside them. Quick retries in case a relay
    # attempt is deferred, so a deferral shows up as slowness, not as a timeout.
    with MailStack(StackConfig(retry_delays=(0.2, 0.5))) as running:
        yield running


def _jobs(stack: MailStack, count: int) -> list[tuple[User, User, str]]:
    com, org = stack.user("example.com"), stack.user("example.org")
    jobs = []
    for i in range(count):
        sender, rcpt = (com, org) if i % 2 == 0 else (org, com)
        jobs.append((sender, rcpt, f"{i:06d}-{uuid.uuid4().hex[:12]}"))
    return jobs


async def _submit_all(stack: MailStack, jobs: list[tuple[User, User, str]]) -> None:
    context = stack.client_context()

    async def worker(mine: list[tuple[User, User, str]]) -> None:
        client: aiosmtplib.SMTP | None = None
        current = ""
        sent = 0
        try:
            for sender, rcpt, token in mine:
                if client is None or sent >= PER_SESSION or sender.domain != current:
                    if client is not None:
                        await client.quit()
                    host, port = stack.endpoints(sender.domain).address("submissions")
                    client = aiosmtplib.SMTP(
                        hostname=host,
                        port=port,
                        use_tls=True,
                        tls_context=context,
                        timeout=TIMEOUT,
                    )
                    await client.connect()
                    await client.login(sender.address, sender.password)
                    current, sent = sender.domain, 0
                raw = (
                    f"From: <{sender.address}>\r\nTo: <{rcpt.address}>\r\n"
                    f"Subject: load {token}\r\nX-Load-Token: {token}\r\n\r\nbody {token}\r\n"
                ).encode()
                await client.sendmail(sender.address, [rcpt.address], raw)
                sent += 1
            if client is not None:
                await client.quit()
        finally:
            if client is not None and client.is_connected:
                client.close()

    await asyncio.gather(*(worker(jobs[k::CONNECTIONS]) for k in range(CONNECTIONS)))


def _imap_tokens(stack: MailStack, user: User) -> list[bytes]:
    host, port = stack.endpoints(user.domain).address("imaps")
    with imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=60) as imap:
        imap.login(user.address, user.password)
        typ, _ = imap.select("INBOX", readonly=True)
        assert typ == "OK"
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (X-Load-Token)])")
        assert typ == "OK"
        imap.logout()
    return [
        m.group(1) for item in data if isinstance(item, tuple) for m in [TOKEN.search(item[1])] if m
    ]


def _pop3_tokens(stack: MailStack, user: User) -> list[bytes]:
    host, port = stack.endpoints(user.domain).address("pop3s")
    pop = poplib.POP3_SSL(host, port, context=stack.client_context(), timeout=60)
    try:
        pop.user(user.address)
        pop.pass_(user.password)
        count = pop.stat()[0]
        tokens = []
        for number in range(1, count + 1):
            head = b"\r\n".join(pop.top(number, 0)[1])
            found = TOKEN.search(head)
            if found:
                tokens.append(found.group(1))
        pop.quit()
    finally:
        pop.close()
    return tokens


@pytest.mark.timeout(max(120, MESSAGES // 20))
def test_load_messages_both_directions_none_lost_none_duplicated(
    stack: MailStack, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = _jobs(stack, MESSAGES)
    expected: dict[str, set[bytes]] = collections.defaultdict(set)
    for _, rcpt, token in jobs:
        expected[rcpt.address].add(token.encode())
    users = [stack.user("example.com"), stack.user("example.org")]

    started = time.monotonic()
    asyncio.run(_submit_all(stack, jobs))
    submitted = time.monotonic()

    def stored() -> int:
        # O(1) per check: it runs under the store's lock after every delivery, where copying
        # every message list would hold up the loop thread that delivers.
        return sum(len(stack.store.mailbox(u.address)) for u in users)

    stack.store.wait_until(lambda: stored() >= MESSAGES, max(60.0, MESSAGES / 20))
    delivered = time.monotonic()
    stack.relay_idle(TIMEOUT)
    stack.check()
    assert stored() == MESSAGES

    for user in users:
        for how, tokens in (
            ("IMAP", _imap_tokens(stack, user)),
            ("POP3", _pop3_tokens(stack, user)),
        ):
            counts = collections.Counter(tokens)
            lost = expected[user.address] - set(counts)
            duplicated = {t: n for t, n in counts.items() if n > 1}
            stray = set(counts) - expected[user.address]
            assert not lost, f"{how} {user.address}: {len(lost)} lost, e.g. {sorted(lost)[:3]}"
            assert not duplicated, f"{how} {user.address}: duplicated {list(duplicated)[:3]}"
            assert not stray, f"{how} {user.address}: not sent here {sorted(stray)[:3]}"
    fetched = time.monotonic()
    assert stack.outbound == []

    with capsys.disabled():
        print(
            f"\nload: {MESSAGES} messages over {CONNECTIONS} connections; "
            f"submitted in {submitted - started:.1f} s "
            f"({MESSAGES / (submitted - started):.0f}/s), "
            f"all stored after {delivered - started:.1f} s "
            f"({MESSAGES / (delivered - started):.0f}/s end to end), "
            f"read back over IMAP and POP3 in {fetched - delivered:.1f} s"
        )


def test_load_token_check_catches_a_lost_message(stack: MailStack) -> None:
    """The twin: with the stack dropping every message, the same check reports losses."""
    stack.reset()
    stack.faults.drop = True
    try:
        jobs = _jobs(stack, 4)
        asyncio.run(_submit_all(stack, jobs))
        stack.relay_idle(TIMEOUT)
        for user in (stack.user("example.com"), stack.user("example.org")):
            assert _imap_tokens(stack, user) == []
            assert _pop3_tokens(stack, user) == []
    finally:
        stack.reset()


def test_load_token_check_catches_a_duplicate(stack: MailStack) -> None:
    """The twin: with the stack storing twice, the counts show each token twice."""
    stack.reset()
    stack.faults.duplicate = True
    try:
        jobs = _jobs(stack, 4)
        asyncio.run(_submit_all(stack, jobs))
        stack.store.wait_until(
            lambda: sum(len(stack.store.messages(u.address)) for u in stack.users) >= 8, TIMEOUT
        )
        stack.relay_idle(TIMEOUT)
        counts = collections.Counter(_imap_tokens(stack, stack.user("example.org")))
        assert counts and set(counts.values()) == {2}
    finally:
        stack.reset()
