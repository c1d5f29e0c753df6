"""MaildirStore: the Store contract on both backends, durability, fsync order, faults, interop."""

from __future__ import annotations

import errno
import imaplib
import mailbox
import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _support import backend_store, make_message
from imapclient import IMAPClient

from roundtrip import MailStack, StackConfig, User
from roundtrip.errors import MailboxError, StorageError
from roundtrip.maildir import LOG_NAME, MaildirStore, folder_dirname, folder_name
from roundtrip.store import DEFAULT_FOLDERS, Store, StoreChange

TIMEOUT = 5
ALICE = "alice@example.com"
RAW = b"From: <bob@example.org>\r\nSubject: one\r\n\r\nbody\r\n"
NAME_RE = re.compile(r"^\d+\.M\d+P\d+Q\d+R[0-9a-f]+\.[^/:]+,S=(\d+)(?::2,([A-Z]*))?$")


def _maildir(path: Path) -> MaildirStore:
    return MaildirStore(path)


@pytest.fixture(params=["memory", "maildir"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same behaviour is required of both backends."""
    with backend_store(request.param, tmp_path / "mail", {ALICE: "secret"}) as s:
        yield s


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "mail"


@pytest.fixture
def md(root: Path) -> Iterator[MaildirStore]:
    s = MaildirStore(root)
    s.add_user(ALICE, "secret")
    yield s
    s.close()


def _reopen(store: MaildirStore) -> MaildirStore:
    store.close()
    return MaildirStore(store.root)


def _tree(root: Path) -> list[str]:
    """Every file and directory under root, relative (the lock file aside)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != ".roundtrip.lock")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != ".roundtrip.lock"
    }


# The Store contract, on both backends


def test_store_contract_users_and_default_folders(store: Store) -> None:
    assert store.has_user("ALICE@example.com")
    assert not store.has_user("nobody@example.com")
    assert store.users() == [ALICE]
    assert [b.name for b in store.mailboxes(ALICE)] == ["INBOX", "Drafts", "Junk", "Sent", "Trash"]
    assert store.mailbox(ALICE, "Sent").special_use == "\\Sent"
    assert store.check_password(ALICE, "secret")
    assert not store.check_password(ALICE, "wrong")
    assert not store.check_password("nobody@example.com", "secret")


def test_store_contract_deliver_assigns_increasing_uids_and_announces(store: Store) -> None:
    changes: list[StoreChange] = []
    store.add_listener(changes.append)
    first = store.deliver(ALICE, RAW, envelope_from="bob@example.org", envelope_to=[ALICE])
    second = store.append(ALICE, b"x\r\n", flags={"\\Seen", "$Label"}, internal_date=1e9)
    assert (first.uid, second.uid) == (1, 2)
    assert store.mailbox(ALICE).uidnext == 3
    assert changes == [
        StoreChange(ALICE, "INBOX", "added", (1,)),
        StoreChange(ALICE, "INBOX", "added", (2,)),
    ]
    got = store.messages(ALICE, "INBOX")
    assert [m.raw for m in got] == [RAW, b"x\r\n"]
    assert [m.size for m in got] == [len(RAW), 3]
    assert got[0].envelope_from == "bob@example.org" and got[0].envelope_to == (ALICE,)
    assert got[1].flags == {"\\Seen", "$Label"} and got[1].internal_date == 1e9
    got[0].cache["k"] = 1
    assert store.mailbox(ALICE).get(1).cache == {"k": 1}  # type: ignore[union-attr]


def test_store_contract_deliver_to_unknown_user_or_mailbox_fails(store: Store) -> None:
    with pytest.raises(MailboxError) as user:
        store.deliver("nobody@example.com", RAW)
    with pytest.raises(MailboxError) as box:
        store.deliver(ALICE, RAW, mailbox="Nope")
    assert user.value.code == box.value.code == "NONEXISTENT"
    assert store.messages(ALICE) == []


def test_store_contract_set_flags_and_expunge(store: Store) -> None:
    for _ in range(3):
        store.deliver(ALICE, RAW)
    changes: list[StoreChange] = []
    store.add_listener(changes.append)
    changed = store.set_flags(ALICE, "INBOX", {1: frozenset({"\\Seen"}), 2: frozenset()})
    assert [m.uid for m in changed] == [1]  # 2 had no flags already
    assert store.set_flags(ALICE, "INBOX", {1: frozenset({"\\Seen"})}) == []
    assert store.expunge(ALICE, "INBOX", [3, 2, 99]) == [2, 3]
    assert store.mailbox(ALICE).uids() == [1]
    assert changes == [
        StoreChange(ALICE, "INBOX", "flags", (1,)),
        StoreChange(ALICE, "INBOX", "expunged", (2, 3)),
    ]
    # UIDs are never reused (RFC 3501 2.3.1.1).
    assert store.deliver(ALICE, RAW).uid == 4


def test_store_contract_copy(store: Store) -> None:
    store.deliver(ALICE, RAW, flags={"\\Flagged"})
    assert store.copy(ALICE, "INBOX", [1, 7], "Trash") == [(1, 1)]
    (copy,) = store.messages(ALICE, "Trash")
    assert copy.raw == RAW and copy.flags == {"\\Flagged"} and copy.mailbox == "Trash"


def test_store_contract_create_rename_delete(store: Store) -> None:
    store.create_mailbox(ALICE, "Work/")
    store.create_mailbox(ALICE, "Work/2024")
    store.deliver(ALICE, RAW, mailbox="Work/2024")
    with pytest.raises(MailboxError) as exists:
        store.create_mailbox(ALICE, "Work")
    assert exists.value.code == "ALREADYEXISTS"
    store.rename_mailbox(ALICE, "Work", "Archive")
    names = {b.name for b in store.mailboxes(ALICE)}
    assert {"Archive", "Archive/2024"} <= names and "Work" not in names
    assert [m.raw for m in store.messages(ALICE, "Archive/2024")] == [RAW]
    store.delete_mailbox(ALICE, "Archive/2024")
    with pytest.raises(MailboxError) as gone:
        store.mailbox(ALICE, "Archive/2024")
    assert gone.value.code == "NONEXISTENT"
    with pytest.raises(MailboxError) as inbox:
        store.delete_mailbox(ALICE, "inbox")
    assert inbox.value.code == "CANNOT"


def test_store_contract_rename_inbox_moves_messages(store: Store) -> None:
    store.deliver(ALICE, RAW)
    store.deliver(ALICE, b"two\r\n", flags={"\\Seen"})
    store.rename_mailbox(ALICE, "INBOX", "Old")
    assert store.messages(ALICE, "INBOX") == []
    moved = store.messages(ALICE, "Old")
    assert [(m.uid, m.raw, m.flags) for m in moved] == [
        (1, RAW, frozenset()),
        (2, b"two\r\n", {"\\Seen"}),
    ]
    assert store.deliver(ALICE, RAW).uid == 3  # INBOX keeps counting


@pytest.mark.parametrize("name", ["../x", "/etc", "~root", "a/../../b", "", "cur", "\\a", ".x"])
def test_store_contract_bad_mailbox_names_are_refused(store: Store, name: str) -> None:
    with pytest.raises(MailboxError) as exc:
        store.create_mailbox(ALICE, name)
    assert exc.value.code == "CANNOT"


# A backslash inside a name is an ordinary character (Dovecot and Gmail take it; imapclient's
# live suite creates "__imapclient/foo\\bar"). The twin above: a leading one stays refused.
@pytest.mark.parametrize("name", ["a\\b", "__imapclient/foo\\bar", "x\\", "a\\2eb", "a/b\\"])
def test_store_contract_backslash_inside_a_name_is_accepted(store: Store, name: str) -> None:
    store.create_mailbox(ALICE, name)
    assert store.mailbox(ALICE, name).name == name
    assert name in [b.name for b in store.mailboxes(ALICE)]
    store.deliver(ALICE, RAW, mailbox=name)
    assert [m.raw for m in store.messages(ALICE, name)] == [RAW]


def test_store_contract_subscribe_clear_and_locks(store: Store) -> None:
    store.subscribe(ALICE, "Junk", False)
    assert not store.mailbox(ALICE, "Junk").subscribed
    store.create_mailbox(ALICE, "Extra")
    store.deliver(ALICE, RAW)
    store.clear()
    assert [b.name for b in store.mailboxes(ALICE)] == list(
        sorted(DEFAULT_FOLDERS, key=lambda n: (n != "INBOX", n))
    )
    assert store.messages() == []
    assert store.deliver(ALICE, RAW).uid == 2  # UIDs keep increasing
    assert store.lock_maildrop(ALICE)
    assert not store.lock_maildrop(ALICE)
    store.unlock_maildrop(ALICE)
    assert store.lock_maildrop(ALICE)


# Subscriptions are the user's list, apart from the mailboxes (RFC 3501 6.3.6).


def test_store_contract_subscribe_to_a_missing_name_and_delete_keeps_it(store: Store) -> None:
    store.subscribe(ALICE, "Later/Child")  # no such mailbox (yet)
    store.create_mailbox(ALICE, "Gone")
    store.subscribe(ALICE, "Gone")
    store.delete_mailbox(ALICE, "Gone")  # 6.3.6: MUST NOT remove it from the list
    assert {"Later/Child", "Gone"} <= set(store.subscriptions(ALICE))
    assert store.subscriptions(ALICE)[0] == "INBOX"
    assert store.mailboxes(ALICE).subscriptions == tuple(store.subscriptions(ALICE))
    store.create_mailbox(ALICE, "Gone")  # still on the list: subscribed again
    assert store.mailbox(ALICE, "Gone").subscribed
    store.subscribe(ALICE, "Later/Child", False)
    assert "Later/Child" not in store.subscriptions(ALICE)


def test_store_contract_twin_unsubscribing_an_unknown_name_is_refused(store: Store) -> None:
    with pytest.raises(MailboxError) as exc:
        store.subscribe(ALICE, "Never", False)
    assert exc.value.code == "NONEXISTENT"
    store.create_mailbox(ALICE, "Quiet")
    store.subscribe(ALICE, "Quiet", False)  # a mailbox, not subscribed: nothing to do
    assert "Quiet" not in store.subscriptions(ALICE)


def test_store_contract_rename_moves_the_subscriptions_below_it(store: Store) -> None:
    for name in ["Work", "Work/Sub", "Workshop"]:
        store.create_mailbox(ALICE, name)
        store.subscribe(ALICE, name)
    store.subscribe(ALICE, "Work/Missing")  # a subscribed name that is no mailbox moves too
    store.rename_mailbox(ALICE, "Work", "Archive")
    subs = set(store.subscriptions(ALICE))
    assert {"Archive", "Archive/Sub", "Archive/Missing", "Workshop"} <= subs
    assert not {"Work", "Work/Sub", "Work/Missing"} & subs  # "Workshop" is no child of it
    assert store.mailbox(ALICE, "Archive/Sub").subscribed
    # Renaming INBOX leaves the list alone: INBOX stays, the new mailbox is not subscribed.
    store.rename_mailbox(ALICE, "INBOX", "Old")
    assert "INBOX" in store.subscriptions(ALICE)
    assert not store.mailbox(ALICE, "Old").subscribed


def test_store_contract_clear_restores_the_default_subscriptions(store: Store) -> None:
    store.subscribe(ALICE, "Elsewhere")
    store.subscribe(ALICE, "Junk", False)
    store.clear()
    assert store.subscriptions(ALICE) == sorted(DEFAULT_FOLDERS, key=lambda n: (n != "INBOX", n))


def test_store_contract_wait_until_wakes_on_delivery(store: Store) -> None:
    assert not store.wait_until(lambda: store.messages(ALICE), timeout=0.05)
    timer = threading.Timer(0.05, store.deliver, args=(ALICE, RAW))
    timer.start()
    try:
        found = store.wait_until(lambda: store.messages(ALICE), timeout=TIMEOUT)
    finally:
        timer.join(TIMEOUT)
    assert [m.raw for m in found] == [RAW]


# One rule, one behaviour: the same hostile or invalid call gets the same answer from both
# backends (exception type, code and message; or the same resulting tree and notifications).

_CONTRACT_CALLS: dict[str, Callable[[Store], object]] = {
    "create ../x": lambda s: s.create_mailbox(ALICE, "../x"),
    "create empty": lambda s: s.create_mailbox(ALICE, ""),
    "create /": lambda s: s.create_mailbox(ALICE, "/"),
    "create cur": lambda s: s.create_mailbox(ALICE, "cur"),
    "create a//b": lambda s: s.create_mailbox(ALICE, "a//b"),
    "create ~x": lambda s: s.create_mailbox(ALICE, "~x"),
    "create control": lambda s: s.create_mailbox(ALICE, "a\x01b"),
    "create backslash": lambda s: s.create_mailbox(ALICE, "a\\b"),
    "create too long": lambda s: s.create_mailbox(ALICE, "x" * 1025),
    "create inbox": lambda s: s.create_mailbox(ALICE, "inbox"),
    "create existing": lambda s: s.create_mailbox(ALICE, "Work/"),
    "create for nobody": lambda s: s.create_mailbox("nobody@example.com", "X"),
    "create child": lambda s: s.create_mailbox(ALICE, "Work/New"),
    "delete INBOX": lambda s: s.delete_mailbox(ALICE, "INBOX"),
    "delete inbox": lambda s: s.delete_mailbox(ALICE, "inbox"),
    "delete missing": lambda s: s.delete_mailbox(ALICE, "Nope"),
    "delete ../x": lambda s: s.delete_mailbox(ALICE, "../x"),
    "delete for nobody": lambda s: s.delete_mailbox("nobody@example.com", "Work"),
    "delete parent": lambda s: s.delete_mailbox(ALICE, "Work"),
    "rename missing": lambda s: s.rename_mailbox(ALICE, "Nope", "X"),
    "rename onto existing": lambda s: s.rename_mailbox(ALICE, "Work", "Sent"),
    "rename to ../x": lambda s: s.rename_mailbox(ALICE, "Work", "../x"),
    "rename from ../x": lambda s: s.rename_mailbox(ALICE, "../x", "X"),
    "rename INBOX onto existing": lambda s: s.rename_mailbox(ALICE, "inbox", "Sent"),
    "rename onto INBOX": lambda s: s.rename_mailbox(ALICE, "Work", "INBOX"),
    "rename INBOX": lambda s: s.rename_mailbox(ALICE, "INBOX", "Old"),
    "rename into own child": lambda s: s.rename_mailbox(ALICE, "Work", "Work/Deeper"),
    "rename child collides": lambda s: s.rename_mailbox(ALICE, "A", "B"),
    "rename with children": lambda s: s.rename_mailbox(ALICE, "Work", "Archive"),
    "rename for nobody": lambda s: s.rename_mailbox("nobody@example.com", "Work", "X"),
    "mailbox missing": lambda s: s.mailbox(ALICE, "Nope"),
    "mailbox bad name": lambda s: s.mailbox(ALICE, "a/../b"),
    "mailbox for nobody": lambda s: s.mailbox("nobody@example.com"),
    "deliver missing": lambda s: s.deliver(ALICE, RAW, mailbox="Nope"),
    "deliver for nobody": lambda s: s.deliver("nobody@example.com", RAW),
    "append bad name": lambda s: s.append(ALICE, RAW, mailbox=".hidden"),
    "set_flags missing": lambda s: s.set_flags(ALICE, "Nope", {1: frozenset({"\\Seen"})}),
    "set_flags unknown uid": lambda s: s.set_flags(ALICE, "INBOX", {9: frozenset({"\\Seen"})}),
    "expunge missing": lambda s: s.expunge(ALICE, "Nope", [1]),
    "expunge unknown uid": lambda s: s.expunge(ALICE, "INBOX", [9]),
    "copy to missing": lambda s: s.copy(ALICE, "INBOX", [1], "Nope"),
    "subscribe missing": lambda s: s.subscribe(ALICE, "Nope", False),
    "subscribe bad name": lambda s: s.subscribe(ALICE, "..", False),
}


def _contract_outcome(s: Store, call: Callable[[Store], object]) -> tuple[object, ...]:
    """What ``call`` did to ``s``: the error it raised, the tree it left, what it announced."""
    for name in ["Work", "Work/Sub", "A", "A/x", "B/x"]:
        s.create_mailbox(ALICE, name)
    s.deliver(ALICE, RAW, envelope_from="bob@example.org", envelope_to=[ALICE])
    s.deliver(ALICE, b"two\r\n", mailbox="Work/Sub", flags={"\\Seen", "$Label"})
    changes: list[StoreChange] = []
    s.add_listener(changes.append)
    try:
        call(s)
    except MailboxError as exc:
        error: tuple[object, ...] = (type(exc), exc.code, str(exc))
    else:
        error = ()
    boxes = [(b.name, b.special_use, b.subscribed, b.uids()) for b in s.mailboxes(ALICE)]
    messages = [
        (m.mailbox, m.uid, m.raw, sorted(m.flags), m.envelope_from, m.envelope_to)
        for b in s.mailboxes(ALICE)
        for m in s.messages(ALICE, b.name)
    ]
    return error, boxes, messages, changes


@pytest.mark.parametrize("call", list(_CONTRACT_CALLS), ids=list(_CONTRACT_CALLS))
def test_store_contract_both_backends_answer_alike(tmp_path: Path, call: str) -> None:
    memory = Store()
    memory.add_user(ALICE, "secret")
    with MaildirStore(tmp_path / "mail") as durable:
        durable.add_user(ALICE, "secret")
        expected = _contract_outcome(memory, _CONTRACT_CALLS[call])
        assert _contract_outcome(durable, _CONTRACT_CALLS[call]) == expected


def test_store_contract_maildir_overrides_no_public_method_of_store() -> None:
    # The rules live in Store's public methods; MaildirStore only fills in storage hooks, so
    # there is no second copy of a rule to drift.
    public = {n for n in vars(Store) if not n.startswith("_")}
    overridden = public & set(vars(MaildirStore))
    assert overridden == set()
    hooks = {n for n in vars(MaildirStore) if n.startswith("_") and not n.startswith("__")}
    assert {"_new_mailbox", "_store_message", "_write_flags", "_remove_messages"} <= hooks
    assert {"_new_mailbox", "_store_message", "_write_flags", "_remove_messages"} <= set(
        vars(Store)
    )


def test_store_contract_twin_a_different_answer_is_noticed(tmp_path: Path) -> None:
    # The twin: the comparison above does see a difference when there is one.
    memory = Store()
    memory.add_user(ALICE, "secret")
    other = Store()
    other.add_user(ALICE, "secret")
    other.create_mailbox(ALICE, "Nope")
    deliver = _CONTRACT_CALLS["deliver missing"]
    assert _contract_outcome(memory, deliver) != _contract_outcome(other, deliver)


# Durability: a new MaildirStore over the same tree sees everything


def test_maildir_reopen_recovers_users_folders_messages_flags_and_uids(
    md: MaildirStore,
) -> None:
    md.create_mailbox(ALICE, "Projects/Roundtrip")
    md.create_mailbox(ALICE, "Käse.v2")  # non-ASCII and a dot in one name
    md.deliver(ALICE, RAW, envelope_from="bob@example.org", envelope_to=[ALICE])
    md.deliver(ALICE, b"two\r\n", flags={"\\Seen", "$Important"}, internal_date=1234567890.0)
    md.deliver(ALICE, b"three\r\n", mailbox="Käse.v2")
    md.copy(ALICE, "INBOX", [2], "Projects/Roundtrip")
    md.set_flags(ALICE, "INBOX", {1: frozenset({"\\Answered", "\\Draft", "custom"})})
    md.subscribe(ALICE, "Trash", False)
    before = {
        b.name: (b.uidvalidity, b.uidnext, b.special_use, b.subscribed, b.uids())
        for b in md.mailboxes(ALICE)
    }
    messages = sorted(
        (m.mailbox, m.uid, m.raw, sorted(m.flags), m.internal_date, m.envelope_from, m.envelope_to)
        for m in md.messages()
    )
    again = _reopen(md)
    try:
        assert again.users() == [ALICE]
        after = {
            b.name: (b.uidvalidity, b.uidnext, b.special_use, b.subscribed, b.uids())
            for b in again.mailboxes(ALICE)
        }
        assert after == before
        assert (
            sorted(
                (
                    m.mailbox,
                    m.uid,
                    m.raw,
                    sorted(m.flags),
                    m.internal_date,
                    m.envelope_from,
                    m.envelope_to,
                )
                for m in again.messages()
            )
            == messages
        )
        # Passwords are not on disk: login waits for add_user (the stack calls it at start).
        assert not again.check_password(ALICE, "secret")
        again.add_user(ALICE, "secret")
        assert again.check_password(ALICE, "secret")
        assert again.deliver(ALICE, RAW).uid == 3
    finally:
        again.close()
    assert not any("secret" in p.read_text("latin-1") for p in md.root.rglob("*") if p.is_file())


# Names with "\\" and ".": each its own directory, the same name after a restart.

_ESCAPED_NAMES = ["a\\b", "a.b", "a\\2eb", "a\\5cb", "a\\.b", "a\\\\2eb", "Käse\\x.v2", "P/q\\r.s"]


def test_maildir_names_with_backslash_and_dot_survive_a_restart(md: MaildirStore) -> None:
    for i, name in enumerate(_ESCAPED_NAMES):
        md.create_mailbox(ALICE, name)
        md.deliver(ALICE, b"Subject: %d\r\n\r\nx\r\n" % i, mailbox=name)
    dirs = [folder_dirname(n) for n in _ESCAPED_NAMES]
    assert len(set(dirs)) == len(dirs)  # one directory per name: "a\\2eb" is not "a.b"
    assert all((md.root / ALICE / d / "cur").is_dir() for d in dirs)
    again = _reopen(md)
    try:
        names = {b.name for b in again.mailboxes(ALICE)}
        assert set(_ESCAPED_NAMES) <= names
        for i, name in enumerate(_ESCAPED_NAMES):
            assert [m.raw for m in again.messages(ALICE, name)] == [b"Subject: %d\r\n\r\nx\r\n" % i]
    finally:
        again.close()


def test_maildir_folder_names_without_backslash_are_written_as_before() -> None:
    # The twin: trees written before "\\" was allowed keep their directory names.
    assert folder_dirname("a.b") == ".a\\2eb"
    assert folder_dirname("Käse.v2/x") == ".K&AOQ-se\\2ev2.x"
    assert folder_name(".a\\2eb") == "a.b"
    assert folder_name(".K&AOQ-se\\2ev2.x") == "Käse.v2/x"
    assert folder_dirname("a\\2eb") == ".a\\5c2eb"
    assert folder_name(".a\\5c2eb") == "a\\2eb"
    # A directory that no name is written to is not a folder: a stray "\\", a spelling in
    # modified UTF-7 that is not ours ("&AGE-" is "a").
    assert folder_name(".a\\b") is None
    assert folder_name(".&AGE-") is None


def test_maildir_stray_backslash_directory_is_not_a_second_folder(md: MaildirStore) -> None:
    # ".a\\b" is not what "a\\b" is written as (".a\\5cb"): loading it as "a\\b" would give
    # one name two directories.
    stray = md.root / ALICE / ".a\\b"
    for sub in ("cur", "new", "tmp"):
        (stray / sub).mkdir(parents=True)
    again = _reopen(md)
    try:
        assert "a\\b" not in [b.name for b in again.mailboxes(ALICE)]
        again.create_mailbox(ALICE, "a\\b")
        assert (again.root / ALICE / ".a\\5cb" / "cur").is_dir()
    finally:
        again.close()


# Subscriptions: a file of the user's, apart from the folders.


def test_maildir_subscriptions_survive_delete_and_restart(md: MaildirStore) -> None:
    md.subscribe(ALICE, "Parent")  # no such mailbox
    md.create_mailbox(ALICE, "Gone")
    md.subscribe(ALICE, "Gone")
    md.delete_mailbox(ALICE, "Gone")
    md.subscribe(ALICE, "Junk", False)
    expected = md.subscriptions(ALICE)
    assert "Gone" in expected and "Parent" in expected and "Junk" not in expected
    again = _reopen(md)
    try:
        assert again.subscriptions(ALICE) == expected
        assert not again.mailbox(ALICE, "Junk").subscribed
        again.create_mailbox(ALICE, "Gone")
        assert again.mailbox(ALICE, "Gone").subscribed
    finally:
        again.close()


def test_maildir_subscriptions_of_an_older_tree_come_from_the_folder_logs(
    md: MaildirStore,
) -> None:
    # A tree written before roundtrip-subscriptions existed: each log held its folder's flag.
    user_dir = md.root / ALICE
    md.close()
    (user_dir / "roundtrip-subscriptions").unlink()
    with open(user_dir / ".Junk" / LOG_NAME, "ab") as log:
        log.write(b'{"subscribed":false}\n')
    again = MaildirStore(md.root)
    try:
        assert "Junk" not in again.subscriptions(ALICE)
        assert "Trash" in again.subscriptions(ALICE)  # the twin: the others stay subscribed
        assert (user_dir / "roundtrip-subscriptions").is_file()  # written once, at start
    finally:
        again.close()


def test_maildir_subscription_write_fault_changes_nothing(
    md: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = md.subscriptions(ALICE)
    snapshot = _snapshot(md.root)
    monkeypatch.setattr("roundtrip.maildir.os.fsync", _fail_nth(os.fsync, 1, errno.EIO))
    with pytest.raises(StorageError):
        md.subscribe(ALICE, "Elsewhere")
    monkeypatch.undo()
    assert md.subscriptions(ALICE) == before and _snapshot(md.root) == snapshot
    md.subscribe(ALICE, "Elsewhere")  # and it works once the disk does
    assert "Elsewhere" in md.subscriptions(ALICE)


def test_maildir_failed_rename_puts_the_subscriptions_back(
    md: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    md.create_mailbox(ALICE, "Work")
    md.subscribe(ALICE, "Work")
    before = md.subscriptions(ALICE)
    # The first rename replaces the subscriptions file; the second, the folder's, fails.
    monkeypatch.setattr("roundtrip.maildir.os.rename", _fail_nth(os.rename, 2, errno.EIO))
    with pytest.raises(StorageError):
        md.rename_mailbox(ALICE, "Work", "Archive")
    monkeypatch.undo()
    assert md.subscriptions(ALICE) == before
    again = _reopen(md)
    try:
        assert again.subscriptions(ALICE) == before
        assert "Work" in [b.name for b in again.mailboxes(ALICE)]
    finally:
        again.close()


def test_maildir_reopen_after_expunge_never_reuses_uids(md: MaildirStore) -> None:
    for _ in range(3):
        md.deliver(ALICE, RAW)
    md.expunge(ALICE, "INBOX", [2, 3])
    validity = md.mailbox(ALICE).uidvalidity
    again = _reopen(md)
    try:
        box = again.mailbox(ALICE)
        assert box.uids() == [1]  # the expunged messages stay gone
        assert (box.uidvalidity, box.uidnext) == (validity, 4)
        assert again.deliver(ALICE, RAW).uid == 4
    finally:
        again.close()


def test_maildir_recreated_folder_gets_a_new_uidvalidity_across_restarts(
    md: MaildirStore,
) -> None:
    old = md.create_mailbox(ALICE, "Temp").uidvalidity
    md.delete_mailbox(ALICE, "Temp")
    again = _reopen(md)
    try:
        assert again.create_mailbox(ALICE, "Temp").uidvalidity > old
    finally:
        again.close()


def test_maildir_files_from_other_tools_get_uids_above_uidnext(md: MaildirStore) -> None:
    md.deliver(ALICE, RAW)
    md.deliver(ALICE, RAW)
    md.expunge(ALICE, "INBOX", [2])
    user_dir = md.root / ALICE
    md.close()
    other = mailbox.Maildir(user_dir, factory=None, create=False)
    seen = mailbox.MaildirMessage(b"Subject: dropped\r\n\r\nin\r\n")
    seen.set_subdir("cur")
    seen.set_flags("S")
    other.add(seen)
    other.close()
    again = MaildirStore(md.root)
    try:
        box = again.mailbox(ALICE)
        assert box.uids() == [1, 3]
        dropped = box.get(3)
        assert dropped is not None and dropped.flags == {"\\Seen"}
        assert dropped.raw == b"Subject: dropped\n\nin\n"  # mailbox.Maildir writes LF
        assert box.uidnext == 4
    finally:
        again.close()
    # The new UID was recorded: a third opening keeps it.
    third = MaildirStore(md.root)
    try:
        assert third.mailbox(ALICE).uids() == [1, 3]
    finally:
        third.close()


def test_maildir_stale_tmp_files_are_removed_at_start_never_delivered(md: MaildirStore) -> None:
    md.deliver(ALICE, RAW)
    tmp = md.root / ALICE / "tmp"
    (tmp / "1700000000.M1P2Q3Rabc.host,S=5").write_bytes(b"half")
    (tmp / "foreign-in-progress").write_bytes(b"another tool is writing")
    again = _reopen(md)
    try:
        assert sorted(os.listdir(tmp)) == ["foreign-in-progress"]  # too young to be garbage
        assert [m.uid for m in again.messages(ALICE)] == [1]
    finally:
        again.close()


def test_maildir_torn_log_tail_is_ignored(md: MaildirStore) -> None:
    md.deliver(ALICE, RAW)
    md.deliver(ALICE, RAW)
    with open(md.root / ALICE / LOG_NAME, "ab") as log:
        log.write(b'{"uid":3,"fi')  # a crash in the middle of an append
    again = _reopen(md)
    try:
        assert again.mailbox(ALICE).uids() == [1, 2]
        assert again.deliver(ALICE, RAW).uid == 3
    finally:
        again.close()
    third = MaildirStore(md.root)
    try:
        assert third.mailbox(ALICE).uids() == [1, 2, 3]
    finally:
        third.close()


def test_maildir_one_store_per_tree(md: MaildirStore) -> None:
    with pytest.raises(StorageError, match="in use"):
        MaildirStore(md.root)
    md.close()
    MaildirStore(md.root).close()


def test_maildir_log_is_compacted_when_mostly_dead(md: MaildirStore) -> None:
    for _ in range(300):
        md.deliver(ALICE, b"x\r\n")
    md.expunge(ALICE, "INBOX", range(1, 300))
    lines = (md.root / ALICE / LOG_NAME).read_bytes().splitlines()
    assert len(lines) < 10
    again = _reopen(md)
    try:
        box = again.mailbox(ALICE)
        assert (box.uids(), box.uidnext) == ([300], 301)
    finally:
        again.close()


# On-disk format


def test_maildir_file_names_and_flag_letters(md: MaildirStore) -> None:
    plain = md.deliver(ALICE, RAW)
    flagged = md.deliver(ALICE, RAW, flags={"\\Seen"})
    inbox = md.root / ALICE
    (new,) = os.listdir(inbox / "new")
    (cur,) = os.listdir(inbox / "cur")
    assert NAME_RE.match(new) and NAME_RE.match(new)[1] == str(len(RAW))  # type: ignore[index]
    assert cur.endswith(":2,S") and NAME_RE.match(cur)
    every = frozenset({"\\Seen", "\\Answered", "\\Flagged", "\\Draft", "\\Deleted", "$kw"})
    md.set_flags(ALICE, "INBOX", {plain.uid: every, flagged.uid: frozenset()})
    assert os.listdir(inbox / "new") == []
    assert sorted(n.partition(":2,")[2] for n in os.listdir(inbox / "cur")) == ["", "DFRST"]
    assert plain.raw == RAW and plain.flags == every


def test_maildir_folder_names_map_to_maildirplusplus_and_back() -> None:
    assert folder_dirname("Sent") == ".Sent"
    assert folder_dirname("A/B") == ".A.B"
    assert folder_dirname("v1.2/Käse & Co") == ".v1\\2e2.K&AOQ-se &- Co"
    for name in ["Sent", "A/B", "v1.2/Käse & Co", "INBOX/child", "日本語"]:
        assert folder_name(folder_dirname(name)) == name
    for bad in ["..", ".", "Sent", "..x", ".a..b", ".cur", ".&Jjo"]:
        assert folder_name(bad) is None


@pytest.mark.parametrize("name", ["../x", "/abs", "~", "~user", "a/../../x", "..", "x/./y"])
def test_maildir_names_never_escape_root(md: MaildirStore, tmp_path: Path, name: str) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    tree = _tree(md.root)
    with pytest.raises(MailboxError):
        md.create_mailbox(ALICE, name)
    with pytest.raises(MailboxError):
        md.rename_mailbox(ALICE, "Junk", name)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert _tree(md.root) == tree


@pytest.mark.parametrize("address", ["../evil@x", "/etc/passwd", "~root", ".hidden@x", "a/b@x"])
def test_maildir_addresses_never_escape_root(
    md: MaildirStore, tmp_path: Path, address: str
) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(MailboxError):
        md.add_user(address, "pw")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert md.users() == [ALICE]


def test_maildir_messages_are_not_kept_in_memory(md: MaildirStore) -> None:
    msg = md.deliver(ALICE, RAW)
    held = []
    for cls in type(msg).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            try:  # read the slot itself, not the property that shadows it
                held.append(cls.__dict__[slot].__get__(msg, cls))
            except AttributeError:
                continue
    assert held and not any(isinstance(v, bytes) for v in held)
    assert msg.raw == RAW and msg.size == len(RAW)
    # A session still holding an expunged message can read it (RFC 3501 7.4.1).
    md.expunge(ALICE, "INBOX", [msg.uid])
    assert msg.raw == RAW


def test_maildir_vanished_file_is_a_storage_error(md: MaildirStore) -> None:
    msg = md.deliver(ALICE, RAW)
    (path,) = (md.root / ALICE / "new").iterdir()
    path.unlink()
    with pytest.raises(StorageError):
        _ = msg.raw


# fsync: the file, then the directory, then the UID record, before deliver returns


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def syscalls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name fsynced descriptors")
    calls: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        calls.append(("fsync", _fd_path(fd)))
        real_fsync(fd)

    def rename(src: Any, dst: Any, **kw: Any) -> None:
        calls.append(("rename", f"{src} -> {dst}"))
        real_rename(src, dst, **kw)

    monkeypatch.setattr("roundtrip.maildir.os.fsync", fsync)
    monkeypatch.setattr("roundtrip.maildir.os.rename", rename)
    return calls


def test_maildir_deliver_fsyncs_file_then_directory_then_uid_map(
    md: MaildirStore, syscalls: list[tuple[str, str]]
) -> None:
    md.deliver(ALICE, RAW)
    inbox = str(md.root / ALICE)
    (name,) = os.listdir(f"{inbox}/new")
    assert syscalls == [
        ("fsync", f"{inbox}/tmp/{name}"),
        ("rename", f"{inbox}/tmp/{name} -> {inbox}/new/{name}"),
        ("fsync", f"{inbox}/new"),
        ("fsync", f"{inbox}/{LOG_NAME}"),
    ]


def test_maildir_spy_sees_that_python_mailbox_skips_the_directory_fsync(
    tmp_path: Path, syscalls: list[tuple[str, str]]
) -> None:
    # The twin: the same spy on CPython's mailbox.Maildir finds no directory fsync, which is
    # why MaildirStore does not use it (docs/security.md A9.2).
    box = mailbox.Maildir(tmp_path / "py", create=True)
    box.add(RAW)
    box.close()
    assert any(kind == "fsync" for kind, _ in syscalls) or not hasattr(os, "fsync")
    assert not any(kind == "fsync" and os.path.isdir(path) for kind, path in syscalls)


def test_maildir_flag_changes_and_expunges_fsync_the_directory(
    md: MaildirStore, syscalls: list[tuple[str, str]]
) -> None:
    msg = md.deliver(ALICE, RAW)
    syscalls.clear()
    md.set_flags(ALICE, "INBOX", {msg.uid: frozenset({"\\Seen"})})
    inbox = str(md.root / ALICE)
    assert syscalls[0][0] == "rename"
    assert {("fsync", f"{inbox}/new"), ("fsync", f"{inbox}/cur")} <= set(syscalls)
    syscalls.clear()
    md.expunge(ALICE, "INBOX", [msg.uid])
    assert ("fsync", f"{inbox}/cur") in syscalls


# Fault injection: ENOSPC / EIO at each step -> StorageError, nothing left behind


def _fail_nth(real: Callable[..., Any], n: int, err: int) -> Callable[..., Any]:
    count = 0

    def fake(*args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        if count == n:
            raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    return fake


@pytest.mark.parametrize(
    ("call", "n", "err"),
    [
        ("write", 1, errno.ENOSPC),  # the message file
        ("fsync", 1, errno.EIO),  # the message file
        ("rename", 1, errno.ENOSPC),  # tmp/ -> new/
        ("fsync", 2, errno.EIO),  # the new/ directory
        ("write", 2, errno.ENOSPC),  # the UID record
        ("fsync", 3, errno.EIO),  # the UID record
    ],
)
def test_maildir_storage_faults_leave_no_trace(
    md: MaildirStore, monkeypatch: pytest.MonkeyPatch, call: str, n: int, err: int
) -> None:
    md.deliver(ALICE, RAW)
    before = _snapshot(md.root)
    tree = _tree(md.root)
    changes: list[StoreChange] = []
    md.add_listener(changes.append)
    monkeypatch.setattr(f"roundtrip.maildir.os.{call}", _fail_nth(getattr(os, call), n, err))
    with pytest.raises(StorageError) as exc:
        md.deliver(ALICE, b"Subject: lost\r\n\r\nx\r\n")
    monkeypatch.undo()
    assert os.strerror(err) in str(exc.value)
    assert _tree(md.root) == tree  # nothing in tmp/, new/ or cur/
    assert _snapshot(md.root) == before  # the UID log is as it was
    assert changes == [] and [m.uid for m in md.messages(ALICE)] == [1]
    assert md.deliver(ALICE, RAW).uid == 2  # and the store goes on working
    again = _reopen(md)
    try:
        assert [m.uid for m in again.messages(ALICE)] == [1, 2]
    finally:
        again.close()


def test_maildir_fault_in_flag_rename_is_a_storage_error(
    md: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    msg = md.deliver(ALICE, RAW)
    monkeypatch.setattr("roundtrip.maildir.os.rename", _fail_nth(os.rename, 1, errno.EIO))
    with pytest.raises(StorageError):
        md.set_flags(ALICE, "INBOX", {msg.uid: frozenset({"\\Seen"})})
    assert msg.flags == frozenset() and msg.raw == RAW


def test_maildir_fault_in_keyword_record_undoes_the_rename(
    md: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    msg = md.deliver(ALICE, RAW)
    names = _tree(md.root)
    monkeypatch.setattr("roundtrip.maildir.os.write", _fail_nth(os.write, 1, errno.ENOSPC))
    with pytest.raises(StorageError):
        md.set_flags(ALICE, "INBOX", {msg.uid: frozenset({"\\Seen", "$Label"})})
    monkeypatch.undo()
    assert _tree(md.root) == names and msg.flags == frozenset() and msg.raw == RAW
    again = _reopen(md)
    try:
        assert [m.flags for m in again.messages(ALICE)] == [frozenset()]
    finally:
        again.close()


# Readable by other tools


def test_maildir_is_readable_by_python_mailbox(md: MaildirStore) -> None:
    md.create_mailbox(ALICE, "Archive/2024")
    md.deliver(ALICE, RAW)
    md.deliver(ALICE, b"Subject: two\r\n\r\n2\r\n", flags={"\\Seen", "\\Flagged"})
    md.deliver(ALICE, b"Subject: old\r\n\r\nx\r\n", mailbox="Archive/2024")
    inbox = mailbox.Maildir(md.root / ALICE, factory=None, create=False)
    try:
        got = sorted((m.get_flags(), bytes(m)) for m in inbox)
        assert [flags for flags, _ in got] == ["", "FS"]
        assert sorted(inbox.list_folders()) == ["Archive.2024", "Drafts", "Junk", "Sent", "Trash"]
        archive = inbox.get_folder("Archive.2024")
        assert [m["Subject"] for m in archive] == ["old"]
    finally:
        inbox.close()


def test_maildir_is_readable_by_dovecot(md: MaildirStore, tmp_path: Path) -> None:
    doveadm = shutil.which("doveadm")
    if doveadm is None:
        pytest.skip("doveadm (Dovecot) is not installed")
    md.deliver(ALICE, RAW)
    md.deliver(ALICE, b"Subject: sent\r\n\r\n2\r\n", mailbox="Sent", flags={"\\Seen"})
    # Dovecot refuses to open mail as root: as root, read a copy owned by "nobody" in a
    # directory that user can reach (pytest's tmp_path is private to root).
    uid, gid = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    with tempfile.TemporaryDirectory(prefix="roundtrip-dovecot-") as scratch:
        copy = Path(scratch, "Maildir")
        shutil.copytree(md.root / ALICE, copy)
        for path in [Path(scratch), *Path(scratch).rglob("*")]:
            if os.geteuid() == 0:
                os.chown(path, uid, gid)
        conf = tmp_path / "dovecot.conf"
        conf.write_text(f"base_dir = {tmp_path}/run\nstate_dir = {tmp_path}/state\n")
        options = {
            "mail_location": f"maildir:{copy}:INDEX=MEMORY",
            "mail_uid": str(uid),
            "mail_gid": str(gid),
            "first_valid_uid": "1",
            "first_valid_gid": "1",
        }
        cmd = [doveadm, "-c", str(conf)]
        for key, value in options.items():
            cmd += ["-o", f"{key}={value}"]
        cmd += ["fetch", "mailbox flags hdr.subject", "ALL"]
        env = {"PATH": os.environ.get("PATH", ""), "USER": ALICE, "HOME": str(copy)}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0 and "Error" not in out.stderr, out.stderr
    # One "key: value" line per field; records are separated by a blank or form-feed line.
    records: list[dict[str, str]] = []
    for line in out.stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key == "mailbox":
            records.append({})
        if sep and records:
            records[-1][key] = value
    summary = sorted((r["mailbox"], "\\Seen" in r["flags"], r["hdr.subject"]) for r in records)
    assert summary == [("INBOX", False, "one"), ("Sent", True, "sent")]


# Through the stack: 250 only after storage, 451 when storage fails


@pytest.fixture
def maildir_stack(root: Path) -> Iterator[MailStack]:
    config = StackConfig(domains=("example.com",), users=(User(ALICE, "alice-pw"),))
    store = MaildirStore(root)
    try:
        with MailStack(config, store=store) as stack:
            yield stack
    finally:
        store.close()


def _submit(stack: MailStack, raw: bytes) -> None:
    host, port = stack.endpoints().address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(ALICE, "alice-pw")
        smtp.sendmail(ALICE, [ALICE], raw)


def test_maildir_stack_delivers_and_imap_reads_it(maildir_stack: MailStack, root: Path) -> None:
    raw = make_message(sender=ALICE, recipient=ALICE, subject="durable")
    _submit(maildir_stack, raw)
    assert len(list((root / ALICE / "new").iterdir())) == 1  # on disk before the 250 came back
    host, port = maildir_stack.endpoints().address("imaps")
    imap = imaplib.IMAP4_SSL(
        host, port, ssl_context=maildir_stack.client_context(), timeout=TIMEOUT
    )
    try:
        imap.login(ALICE, "alice-pw")
        imap.select("INBOX")
        typ, data = imap.uid("FETCH", "1", "(BODY.PEEK[])")
        assert typ == "OK" and raw.split(b"\r\n\r\n")[1] in data[0][1]
    finally:
        imap.logout()
    maildir_stack.check()


def _imapclient(stack: MailStack) -> IMAPClient:
    host, port = stack.endpoints().address("imaps")
    client = IMAPClient(host, port=port, ssl_context=stack.client_context(), timeout=TIMEOUT)
    client.login(ALICE, "alice-pw")
    return client


def test_maildir_stack_imapclient_names_and_subscriptions_survive_a_restart(root: Path) -> None:
    # What imapclient's live suite does: a folder with "\\" in its name, and a parent that is
    # no mailbox subscribed with its children; then the same tree under a new stack.
    config = StackConfig(domains=("example.com",), users=(User(ALICE, "alice-pw"),))
    odd, parent = "__imapclient/foo\\bar", "__imapclient/sub"
    for run in (1, 2):
        with MaildirStore(root) as store, MailStack(config, store=store) as stack:
            client = _imapclient(stack)
            try:
                if run == 1:
                    client.create_folder(odd)
                    for name in (f"{parent}/a", f"{parent}/b"):
                        client.create_folder(name)
                    for name in (parent, f"{parent}/a", f"{parent}/b"):
                        client.subscribe_folder(name)
                    client.subscribe_folder(odd)
                    client.delete_folder(f"{parent}/b")
                assert odd in [f[2] for f in client.list_folders("__imapclient/", "*")]
                subscribed = {f[2]: f[0] for f in client.list_sub_folders("__imapclient/", "*")}
                assert set(subscribed) == {odd, parent, f"{parent}/a", f"{parent}/b"}
                assert b"\\Noselect" in subscribed[parent]  # no such mailbox
                assert b"\\Noselect" in subscribed[f"{parent}/b"]  # deleted, still subscribed
                assert b"\\Noselect" not in subscribed[odd]
                assert client.select_folder(odd)[b"EXISTS"] == 0
            finally:
                client.logout()
            stack.check()


def test_maildir_stack_storage_failure_is_451_not_250(
    maildir_stack: MailStack, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = make_message(sender=ALICE, recipient=ALICE, subject="disk full")
    tree = _tree(root)
    monkeypatch.setattr("roundtrip.maildir.os.fsync", _fail_nth(os.fsync, 1, errno.ENOSPC))
    with pytest.raises(smtplib.SMTPDataError) as exc:
        _submit(maildir_stack, raw)
    monkeypatch.undo()
    assert exc.value.smtp_code == 451
    assert _tree(root) == tree
    assert maildir_stack.store.messages(ALICE) == []
    maildir_stack.check()


def test_maildir_recent_after_restart_only_for_files_dropped_in(tmp_path: Path) -> None:
    """\\Recent is not kept on disk: after a restart, messages the store already knew are not
    recent (some earlier session saw them); a file another tool dropped into new/ is."""
    root = tmp_path / "mail"
    with MaildirStore(root) as first:
        first.add_user("u@example.com", "pw")
        first.deliver("u@example.com", b"Subject: a\r\n\r\na\r\n")
        first.deliver("u@example.com", b"Subject: b\r\n\r\nb\r\n")
    with MaildirStore(root) as second:
        assert second.claim_recent("u@example.com", "INBOX") == (3, 3)  # nothing recent
    new_dir = next(root.rglob("new"))
    (new_dir / "1700000000.dropped.host").write_bytes(b"Subject: c\r\n\r\nc\r\n")
    with MaildirStore(root) as third:
        first_uid, end = third.claim_recent("u@example.com", "INBOX")
        assert (first_uid, end) == (3, 4)  # the dropped-in file, and only it
        assert third.claim_recent("u@example.com", "INBOX") == (4, 4)  # claimed once
