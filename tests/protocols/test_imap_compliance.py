"""RFC 3501 rules that Dovecot's imaptest and imapclient's live suite found broken.

Each test states the rule it checks; each "it works" test has a twin that shows the check can
fail (a different session, a different day, a different address).
"""

from __future__ import annotations

from typing import Any

import pytest

from roundtrip.errors import MailboxError
from roundtrip.protocols.imap import IMAPConnection
from roundtrip.store import Store, validate_mailbox_name

USER = "alice@example.test"
PASSWORD = "s3cret pass"
NOW = 1_700_000_000.0
MAIL = b"From: bob@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


class Session:
    """One IMAPConnection over the shared store, driven line by line."""

    def __init__(self, store: Store, **kwargs: Any) -> None:
        self.conn = IMAPConnection(
            store,
            hostname="imap.example.test",
            secure=True,
            starttls_available=False,
            clock=lambda: NOW,
            **kwargs,
        )
        self.conn.data_to_send()
        self.events: list[object] = []
        store.add_listener(self.conn.on_store_change)
        assert b"a0 OK" in self.cmd(f'a0 LOGIN {USER} "{PASSWORD}"')

    def send(self, data: bytes) -> bytes:
        self.events = list(self.conn.receive_data(data))
        return self.conn.data_to_send()

    def cmd(self, line: str | bytes) -> bytes:
        return self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")


@pytest.fixture
def store() -> Store:
    s = Store(clock=lambda: NOW)
    s.add_user(USER, PASSWORD)
    return s


def _deliver(store: Store, n: int) -> None:
    for _ in range(n):
        store.deliver(USER, MAIL)


# \Recent (RFC 3501 2.3.2): recent in the first session told of the message; a read-write
# session takes it, so no later session sees it as recent; EXAMINE looks without taking.


def test_imap_recent_examine_sees_it_without_taking_it(store: Store) -> None:
    _deliver(store, 2)
    looker = Session(store)
    out = looker.cmd("e EXAMINE INBOX")
    assert b"* 2 RECENT\r\n" in out
    assert b"* 1 FETCH (FLAGS (\\Recent))" in looker.cmd("f FETCH 1 FLAGS")
    other = Session(store)
    status = other.cmd("s STATUS INBOX (RECENT)")
    assert b'* STATUS "INBOX" (RECENT 2)' in status
    first = Session(store)
    assert b"* 2 RECENT\r\n" in first.cmd("s SELECT INBOX")


def test_imap_recent_only_the_first_read_write_session_has_it(store: Store) -> None:
    _deliver(store, 2)
    first, second = Session(store), Session(store)
    assert b"* 2 RECENT\r\n" in first.cmd("s SELECT INBOX")
    assert b"* 0 RECENT\r\n" in second.cmd("s SELECT INBOX")
    assert b"FLAGS (\\Recent)" in first.cmd("f FETCH 1 FLAGS")
    assert b"FLAGS ()" in second.cmd("f FETCH 1 FLAGS")
    assert b"(RECENT 0)" in Session(store).cmd("t STATUS INBOX (RECENT)")


def test_imap_recent_new_mail_is_announced_and_searchable(store: Store) -> None:
    _deliver(store, 1)
    s = Session(store)
    s.cmd("s SELECT INBOX")
    assert b"x1 OK" in s.cmd("x1 STORE 1 +FLAGS.SILENT (\\Seen)")
    # The session's own APPEND brings new mail it is the first to hear of.
    assert b"a OK" in s.send(b"a APPEND INBOX {%d}\r\n" % len(MAIL) + MAIL + b"\r\n")
    _deliver(store, 1)
    out = s.cmd("n NOOP")
    assert b"* 3 EXISTS\r\n* 3 RECENT\r\n" in out
    assert s.cmd("r SEARCH RECENT").startswith(b"* SEARCH 1 2 3\r\n")
    # NEW is RECENT UNSEEN; OLD is NOT RECENT.
    assert s.cmd("w SEARCH NEW").startswith(b"* SEARCH 2 3\r\n")
    assert s.cmd("o SEARCH OLD").startswith(b"* SEARCH\r\n")
    late = Session(store)
    late.cmd("s SELECT INBOX")
    assert late.cmd("r SEARCH RECENT").startswith(b"* SEARCH\r\n")
    assert late.cmd("o SEARCH OLD").startswith(b"* SEARCH 1 2 3\r\n")


def test_imap_status_recent_counts_an_append(store: Store) -> None:
    s = Session(store)
    assert b"(RECENT 0)" in s.cmd("a STATUS INBOX (RECENT)")
    assert b"b OK" in s.send(b"b APPEND INBOX {%d}\r\n" % len(MAIL) + MAIL + b"\r\n")
    assert b"(RECENT 1)" in s.cmd("c STATUS INBOX (RECENT)")


# Keywords (RFC 3501 7.2.6): a flag is in an untagged FLAGS before a FETCH shows it.


def test_imap_new_keyword_is_announced_before_fetch_shows_it(store: Store) -> None:
    _deliver(store, 1)
    s = Session(store)
    out = s.cmd("s SELECT INBOX")
    assert b"$hello" not in out
    out = s.cmd("a STORE 1 +FLAGS ($hello)")
    flags = out.index(b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $hello)\r\n")
    perm = out.index(b"* OK [PERMANENTFLAGS (")
    assert flags < perm < out.index(b"* 1 FETCH (FLAGS ($hello")
    assert b"$hello \\*)]" in out
    # Twin: a keyword already announced is not announced again.
    again = s.cmd("b STORE 1 FLAGS ($hello)")
    assert b"* FLAGS" not in again and b"* 1 FETCH (FLAGS ($hello" in again


def test_imap_keywords_of_append_and_select_are_announced(store: Store) -> None:
    s = Session(store)
    s.cmd("s SELECT INBOX")
    other = Session(store)
    msg = b"a APPEND INBOX ($keyword1) {%d}\r\n" % len(MAIL) + MAIL + b"\r\n"
    assert b"a OK" in other.send(msg)
    assert b"* 1 EXISTS" in s.cmd("n NOOP")
    out = s.cmd("f FETCH 1 FLAGS")
    assert out.index(b"* FLAGS (") < out.index(b"* 1 FETCH (FLAGS ($keyword1 \\Recent)")
    # A later SELECT lists the keywords in use.
    assert b"\\Draft $keyword1)\r\n" in Session(store).cmd("s SELECT INBOX")


# SEARCH SENT* (RFC 3501 6.4.4): "the Date: header (disregarding time and timezone)".


@pytest.mark.parametrize(
    ("key", "hit"),
    [
        ("SENTON 25-Mar-2007", True),
        ("SENTON 24-Mar-2007", False),
        ("SENTBEFORE 25-Mar-2007", False),
        ("SENTSINCE 25-Mar-2007", True),
    ],
)
def test_imap_search_sent_dates_use_the_date_fields_own_zone(
    store: Store, key: str, hit: bool
) -> None:
    # 00:30 on the 25th at +0200 is still the 24th in UTC.
    store.deliver(USER, b"Date: Sun, 25 Mar 2007 00:30:00 +0200\r\nSubject: x\r\n\r\nx\r\n")
    s = Session(store)
    s.cmd("s SELECT INBOX")
    want = b"* SEARCH 1\r\n" if hit else b"* SEARCH\r\n"
    assert s.cmd(f"q SEARCH {key}").startswith(want)


# SEARCH FROM (6.4.4): a case-insensitive substring of the field, the address as written.


@pytest.mark.parametrize(
    ("needle", "hit"),
    [("user-from@domain.org", True), ("USER-FROM@DOMAIN.ORG", True), ("other@domain.org", False)],
)
def test_imap_search_from_finds_an_address_with_comments_inside(
    store: Store, needle: str, hit: bool
) -> None:
    store.deliver(USER, b"From: <user-from (comment)@ (comment) domain.org>\r\n\r\nbody\r\n")
    s = Session(store)
    s.cmd("s SELECT INBOX")
    want = b"* SEARCH 1\r\n" if hit else b"* SEARCH\r\n"
    assert s.cmd(f"q SEARCH FROM {needle}").startswith(want)


# Atoms (RFC 3501 section 9): "[" is an ATOM-CHAR; a name that does not exist gets NO.

ODD_NAME = "!#$&'+,-.0123456789:;<=>?@^_`|[}"


def test_imap_select_of_a_name_with_brackets_is_no_and_list_still_works(store: Store) -> None:
    s = Session(store)
    out = s.cmd(f"a SELECT {ODD_NAME}")
    assert out.startswith(b"a NO "), out
    out = s.cmd(f'b LIST "" {ODD_NAME}%*')
    assert out == b"b OK LIST completed\r\n"
    assert not s.events
    assert s.cmd("c NOOP").startswith(b"c OK")


def test_imap_bracket_name_twin_still_refuses_a_real_syntax_error(store: Store) -> None:
    s = Session(store)
    assert s.cmd("a SELECT (unclosed").startswith(b"a BAD ")


# LSUB (RFC 3501 6.3.9) and CREATE (6.3.3).


def test_imap_create_does_not_subscribe(store: Store) -> None:
    s = Session(store)
    assert s.cmd("c CREATE Projects").startswith(b"c OK")
    assert b"Projects" not in s.cmd('l LSUB "" *')
    assert s.cmd("s SUBSCRIBE Projects").startswith(b"s OK")
    assert b'* LSUB () "/" "Projects"' in s.cmd('m LSUB "" *')


def test_imap_lsub_shows_an_unsubscribed_parent_as_noselect(store: Store) -> None:
    s = Session(store)
    for name in ("box", "box/test", "box/test2", "box/test2/test", "box/test3/test3"):
        assert s.cmd(f"c CREATE {name}").startswith(b"c OK")
    for name in ("box/test", "box/test2/test", "box/test3/test3"):
        s.cmd(f"s SUBSCRIBE {name}")
    out = s.cmd('l LSUB "" box/%')
    assert out == (
        b'* LSUB () "/" "box/test"\r\n'
        b'* LSUB (\\Noselect) "/" "box/test2"\r\n'
        b'* LSUB (\\Noselect) "/" "box/test3"\r\n'
        b"l OK LSUB completed\r\n"
    )
    # Twin: with nothing subscribed below it, the parent is not listed.
    s.cmd("u UNSUBSCRIBE box/test3/test3")
    assert b"box/test3" not in s.cmd('l LSUB "" box/%')


def test_imap_lsub_lists_a_subscribed_parent_and_children_without_list_attributes(
    store: Store,
) -> None:
    s = Session(store)
    for name in ("parent", "parent/a", "parent/b"):
        s.cmd(f"c CREATE {name}")
        s.cmd(f"s SUBSCRIBE {name}")
    out = s.cmd('l LSUB "" parent*')
    assert out == (
        b'* LSUB () "/" "parent"\r\n'
        b'* LSUB () "/" "parent/a"\r\n'
        b'* LSUB () "/" "parent/b"\r\n'
        b"l OK LSUB completed\r\n"
    )
    assert b"HasChildren" not in s.cmd('m LSUB "" *')


# SUBSCRIBE (RFC 3501 6.3.6): the subscription list is the user's, whether the mailboxes exist.


def test_imap_subscribe_to_a_missing_parent_and_lsub_lists_it(store: Store) -> None:
    # imapclient's live suite subscribes a parent and its children, then expects LSUB to list
    # the parent; here the parent is no mailbox, so LSUB marks it \Noselect.
    s = Session(store)
    for name in ("p/a", "p/b"):
        assert s.cmd(f"c CREATE {name}").startswith(b"c OK")
    for name in ("p", "p/a", "p/b"):
        assert s.cmd(f"s SUBSCRIBE {name}").startswith(b"s OK"), name
    assert s.cmd('l LSUB "" p*') == (
        b'* LSUB (\\Noselect) "/" "p"\r\n'
        b'* LSUB () "/" "p/a"\r\n'
        b'* LSUB () "/" "p/b"\r\n'
        b"l OK LSUB completed\r\n"
    )
    assert s.cmd('l LSUB "" %').count(b'"p"') == 1  # listed once, subscribed or not


def test_imap_unsubscribe_twin_refuses_a_name_never_subscribed(store: Store) -> None:
    s = Session(store)
    assert s.cmd("u UNSUBSCRIBE Never").startswith(b"u NO [NONEXISTENT]")
    assert s.cmd("s SUBSCRIBE Never").startswith(b"s OK")
    assert s.cmd("u UNSUBSCRIBE Never").startswith(b"u OK")
    assert b"Never" not in s.cmd('l LSUB "" *')


def test_imap_delete_keeps_the_subscription(store: Store) -> None:
    s = Session(store)
    s.cmd("c CREATE Old")
    s.cmd("s SUBSCRIBE Old")
    assert b'* LSUB () "/" "Old"' in s.cmd('l LSUB "" *')  # the twin: a mailbox
    assert s.cmd("d DELETE Old").startswith(b"d OK")
    assert b'* LSUB (\\Noselect) "/" "Old"' in s.cmd('l LSUB "" *')  # 6.3.6: MUST NOT drop it
    assert b"Old" not in s.cmd('l LIST "" *')
    assert s.cmd("c CREATE Old").startswith(b"c OK")
    assert b'* LSUB () "/" "Old"' in s.cmd('l LSUB "" *')


def test_imap_rename_moves_the_subscriptions(store: Store) -> None:
    s = Session(store)
    for name in ("Work", "Work/Sub"):
        s.cmd(f"c CREATE {name}")
        s.cmd(f"s SUBSCRIBE {name}")
    assert s.cmd("r RENAME Work Archive").startswith(b"r OK")
    out = s.cmd('l LSUB "" *')
    assert b'* LSUB () "/" "Archive"' in out and b'* LSUB () "/" "Archive/Sub"' in out
    assert b'"Work' not in out


# A backslash inside a mailbox name is an ordinary character (Dovecot and Gmail take it).


def test_imap_create_takes_a_backslash_inside_a_name(store: Store) -> None:
    s = Session(store)
    assert s.cmd('c CREATE "__imapclient/foo\\\\bar"').startswith(b"c OK")
    assert b'"__imapclient/foo\\\\bar"' in s.cmd('l LIST "" "__imapclient/*"')
    assert s.cmd('s SELECT "__imapclient/foo\\\\bar"').splitlines()[-1].startswith(b"s OK")
    # The twin: a leading backslash is still refused.
    assert s.cmd('c CREATE "\\\\foo"').startswith(b"c NO [CANNOT]")


# Mailbox names that could escape a directory tree stay refused.


@pytest.mark.parametrize("name", ["\\abs", "~home", "a/../b", "../x", "a/./b"])
def test_imap_mailbox_names_that_could_escape_are_still_refused(name: str) -> None:
    with pytest.raises(MailboxError):
        validate_mailbox_name(name)


# LITERAL+ (RFC 7888 section 4): a LITERAL+ server takes {n+} literals up to its limits.


def test_imap_append_takes_a_large_nonsync_literal(store: Store) -> None:
    s = Session(store)
    big = b"Subject: big\r\n\r\n" + b"x" * 20000 + b"\r\n"
    out = s.send(b"a APPEND INBOX {%d+}\r\n" % len(big) + big + b"\r\n")
    assert out.startswith(b"a OK [APPENDUID"), out[:80]
    assert store.messages(USER, "INBOX")[-1].raw == big


def test_imap_other_commands_keep_a_bound_on_nonsync_literals(store: Store) -> None:
    s = Session(store)
    out = s.send(b"a SELECT {5000+}\r\n")
    assert out.startswith(b"* BYE [TOOBIG]")


def test_imap_append_nonsync_literal_above_appendlimit_ends_the_session(store: Store) -> None:
    s = Session(store, max_literal=10000)
    out = s.send(b"a APPEND INBOX {20000+}\r\n")
    assert out.startswith(b"* BYE [TOOBIG]")
