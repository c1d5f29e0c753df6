"""MaildirStore confinement: nothing is read, written or deleted through a symbolic link.

A user directory, a folder, its ``cur/ new/ tmp/`` or its ``roundtrip-uidlist`` replaced by a
link to a directory outside the tree must not be followed: at start it is skipped (and listed
in ``MaildirStore.refused``), while running every operation on it is refused with the store's
own errors, so IMAP answers NO, POP3 -ERR, and the servers keep serving. Each test checks the
outside directory byte for byte before and after. The twins show ordinary folders, folders
dropped in by hand and a root reached through a link still work.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from roundtrip import MailStack, StackConfig, User
from roundtrip.errors import MailboxError, StorageError
from roundtrip.maildir import LOG_NAME, MaildirStore

TIMEOUT = 5
ALICE = "alice@example.com"
BOB = "bob@example.com"
RAW = b"From: <bob@example.org>\r\nSubject: inside\r\n\r\nbody\r\n"
SECRET = b"Subject: outside\r\n\r\nSECRET-OUTSIDE-THE-TREE\r\n"

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")


def _outside(parent: Path, *, names: tuple[str, ...] = ("1.M1P1Q1R00.host,S=40",)) -> Path:
    """A maildir outside the store's tree, holding a message file per name in new/ and cur/."""
    out = parent / "outside"
    for sub in ("cur", "new", "tmp"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / "new" / name).write_bytes(SECRET)
        (out / "cur" / name).write_bytes(SECRET)
    (out / "private.txt").write_bytes(b"not mail\n")
    return out


def _snapshot(path: Path) -> dict[str, bytes | None]:
    """Every entry under path: file bytes, or None for a directory."""
    return {
        str(p.relative_to(path)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(path.rglob("*"))
    }


def _swap_for_link(path: Path, target: Path, aside: Path) -> None:
    """Move ``path`` out of the way and put a symbolic link to ``target`` in its place."""
    os.rename(path, aside)
    os.symlink(target, path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "mail"


@pytest.fixture
def md(root: Path) -> Iterator[MaildirStore]:
    s = MaildirStore(root)
    s.add_user(ALICE, "secret")
    yield s
    s.close()


# At start: links are skipped, never followed


def test_maildir_symlinked_folder_is_not_loaded_at_start(root: Path, tmp_path: Path) -> None:
    MaildirStore(root).close()
    with MaildirStore(root) as s:
        s.add_user(ALICE, "pw")
    outside = _outside(tmp_path)
    os.symlink(outside, root / ALICE / ".Secret")
    before = _snapshot(outside)
    with MaildirStore(root) as s:
        assert "Secret" not in {b.name for b in s.mailboxes(ALICE)}
        with pytest.raises(MailboxError) as exc:
            s.mailbox(ALICE, "Secret")
        assert exc.value.code == "NONEXISTENT"
        assert s.refused == [s.root / ALICE / ".Secret"]
        assert s.messages(ALICE) == []
        s.deliver(ALICE, RAW)  # the rest of the tree works
    assert _snapshot(outside) == before  # no maildirfolder, no log, nothing renamed


def test_maildir_folder_dropped_in_as_a_directory_is_loaded(root: Path, tmp_path: Path) -> None:
    # The twin: the same maildir copied into the tree (not linked) is an ordinary folder.
    with MaildirStore(root) as s:
        s.add_user(ALICE, "pw")
    shutil.copytree(_outside(tmp_path), root / ALICE / ".Secret")
    with MaildirStore(root) as s:
        assert s.refused == []
        assert [m.raw for m in s.messages(ALICE, "Secret")] == [SECRET]


def test_maildir_symlinked_default_folder_does_not_stop_the_start(
    root: Path, tmp_path: Path
) -> None:
    with MaildirStore(root) as s:
        s.add_user(ALICE, "pw")
    outside = _outside(tmp_path)
    shutil.rmtree(root / ALICE / ".Sent")
    os.symlink(outside, root / ALICE / ".Sent")
    before = _snapshot(outside)
    with MaildirStore(root) as s:
        names = [b.name for b in s.mailboxes(ALICE)]
        assert names == ["INBOX", "Drafts", "Junk", "Trash"]  # Sent refused, not re-created
        assert s.refused == [s.root / ALICE / ".Sent"]
        with pytest.raises(MailboxError):
            s.append(ALICE, RAW, mailbox="Sent")
        s.append(ALICE, RAW, mailbox="Drafts")
    assert _snapshot(outside) == before
    assert os.path.islink(root / ALICE / ".Sent")  # left for the administrator to look at


def test_maildir_symlinked_user_directory_is_not_loaded_nor_written(
    root: Path, tmp_path: Path
) -> None:
    with MaildirStore(root) as s:
        s.add_user(ALICE, "pw")
    outside = _outside(tmp_path)
    os.symlink(outside, root / BOB)
    before = _snapshot(outside)
    with MaildirStore(root) as s:
        assert s.users() == [ALICE]
        assert s.refused == [s.root / BOB]
        with pytest.raises(StorageError):
            s.add_user(BOB, "pw")  # nothing is created through the link
        assert s.users() == [ALICE]
        with pytest.raises(MailboxError):
            s.deliver(BOB, RAW)
    assert _snapshot(outside) == before


def test_maildir_user_directory_dropped_in_is_loaded(root: Path, tmp_path: Path) -> None:
    # The twin: the same directory copied into the tree is a user with its INBOX.
    MaildirStore(root).close()
    shutil.copytree(_outside(tmp_path), root / BOB)
    with MaildirStore(root) as s:
        assert s.users() == [BOB] and s.refused == []
        assert [m.raw for m in s.messages(BOB, "INBOX")] == [SECRET]


# While running: a folder swapped for a link is refused by every operation


def test_maildir_folder_swapped_for_symlink_is_refused_everywhere(
    md: MaildirStore, tmp_path: Path
) -> None:
    md.create_mailbox(ALICE, "Work")
    msg = md.append(ALICE, RAW, mailbox="Work")
    inbox_msg = md.deliver(ALICE, RAW)
    # The outside maildir holds a file with the very name of the message, so a store that
    # followed the link would read it (FETCH) or unlink it (EXPUNGE).
    outside = _outside(tmp_path, names=(msg.path.name,))
    work = md.root / ALICE / ".Work"
    _swap_for_link(work, outside, tmp_path / "work-aside")
    before = _snapshot(outside)

    with pytest.raises(MailboxError) as select:
        md.mailbox(ALICE, "Work")
    assert select.value.code == "CANNOT"
    with pytest.raises(StorageError):
        _ = msg.raw  # a session that selected Work before the swap
    refused = [
        lambda: md.append(ALICE, RAW, mailbox="Work"),
        lambda: md.copy(ALICE, "INBOX", [inbox_msg.uid], "Work"),
        lambda: md.set_flags(ALICE, "Work", {msg.uid: frozenset({"\\Deleted"})}),
        lambda: md.expunge(ALICE, "Work", [msg.uid]),
        lambda: md.subscribe(ALICE, "Work", False),
        lambda: md.rename_mailbox(ALICE, "Work", "Elsewhere"),
        lambda: md.delete_mailbox(ALICE, "Work"),
    ]
    for call in refused:
        with pytest.raises(MailboxError) as exc:
            call()
        assert exc.value.code == "CANNOT"
    md.clear()  # leaves the refused folder alone, empties the rest
    assert _snapshot(outside) == before
    assert md.messages(ALICE, "INBOX") == []

    # Put the real directory back: the folder works again (the refusal is not sticky).
    os.unlink(work)
    os.rename(tmp_path / "work-aside", work)
    assert md.mailbox(ALICE, "Work").uids() == [msg.uid]
    assert msg.raw == RAW
    assert md.expunge(ALICE, "Work", [msg.uid]) == [msg.uid]


@pytest.mark.parametrize("entry", ["cur", "new", "tmp", LOG_NAME])
def test_maildir_subdirectory_or_log_swapped_for_symlink_is_refused(
    md: MaildirStore, tmp_path: Path, entry: str
) -> None:
    md.deliver(ALICE, RAW)
    outside = _outside(tmp_path)
    target = outside / "uidlist" if entry == LOG_NAME else outside / entry
    if entry == LOG_NAME:
        target.write_bytes(b"outside log\n")
    _swap_for_link(md.root / ALICE / entry, target, tmp_path / "aside")
    before = _snapshot(outside)
    with pytest.raises(MailboxError):
        md.deliver(ALICE, RAW)  # tmp/, then new/, then the log
    with pytest.raises(MailboxError):
        md.append(ALICE, RAW, flags={"\\Seen"})  # tmp/, then cur/, then the log
    with pytest.raises(MailboxError):
        md.set_flags(ALICE, "INBOX", {1: frozenset({"\\Seen"})})
    with pytest.raises(MailboxError):
        md.expunge(ALICE, "INBOX", [1])
    assert _snapshot(outside) == before
    assert [m.uid for m in md.messages(ALICE)] == [1]


# The subscription list: a file in the user directory, never read or written through a link.

_SUBS = "roundtrip-subscriptions"


def test_maildir_symlinked_subscriptions_file_is_not_read_at_start(
    root: Path, tmp_path: Path
) -> None:
    with MaildirStore(root) as s:
        s.add_user(ALICE, "pw")
    outside = tmp_path / "outside-subs"
    outside.write_bytes(b'{"roundtrip-subscriptions":1,"names":["Secret"]}\n')
    (root / ALICE / _SUBS).unlink()
    os.symlink(outside, root / ALICE / _SUBS)
    with MaildirStore(root) as s:
        assert s.refused == [s.root / ALICE / _SUBS]
        assert "Secret" not in s.subscriptions(ALICE)
        assert "INBOX" in s.subscriptions(ALICE)  # rebuilt from the folders
        assert not os.path.islink(root / ALICE / _SUBS)  # the link is replaced, not followed
    assert outside.read_bytes() == b'{"roundtrip-subscriptions":1,"names":["Secret"]}\n'


def test_maildir_subscriptions_file_dropped_in_is_read(root: Path) -> None:
    # The twin: the same content as a plain file in the tree is the user's list.
    with MaildirStore(root) as s:
        s.add_user(ALICE, "pw")
    (root / ALICE / _SUBS).write_bytes(b'{"roundtrip-subscriptions":1,"names":["Secret"]}\n')
    with MaildirStore(root) as s:
        assert s.refused == [] and s.subscriptions(ALICE) == ["Secret"]


def test_maildir_subscriptions_file_swapped_for_symlink_is_not_written_through(
    md: MaildirStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside-subs"
    outside.write_bytes(b"not ours\n")
    _swap_for_link(md.root / ALICE / _SUBS, outside, tmp_path / "aside")
    md.subscribe(ALICE, "New")
    assert outside.read_bytes() == b"not ours\n"
    assert not os.path.islink(md.root / ALICE / _SUBS)
    assert b"New" in (md.root / ALICE / _SUBS).read_bytes()


def test_maildir_user_directory_swapped_for_symlink_is_refused(
    md: MaildirStore, tmp_path: Path
) -> None:
    md.deliver(ALICE, RAW)
    outside = tmp_path / "outside"
    shutil.copytree(md.root / ALICE, outside)  # looks exactly like the real one
    _swap_for_link(md.root / ALICE, outside, tmp_path / "aside")
    before = _snapshot(outside)
    for call in [
        lambda: md.mailbox(ALICE, "INBOX"),
        lambda: md.deliver(ALICE, RAW),
        lambda: md.expunge(ALICE, "INBOX", [1]),
        lambda: md.create_mailbox(ALICE, "New"),
        lambda: md.rename_mailbox(ALICE, "Junk", "Spam"),
        lambda: md.rename_mailbox(ALICE, "INBOX", "Old"),
        lambda: md.subscribe(ALICE, "Anything"),  # the subscriptions file is in there too
    ]:
        with pytest.raises(MailboxError) as exc:
            call()
        assert exc.value.code == "CANNOT"
    assert _snapshot(outside) == before


def test_maildir_message_file_swapped_for_symlink_is_not_read(
    md: MaildirStore, tmp_path: Path
) -> None:
    msg = md.deliver(ALICE, RAW)
    secret = tmp_path / "secret.eml"
    secret.write_bytes(SECRET)
    msg.path.unlink()
    os.symlink(secret, msg.path)
    with pytest.raises(StorageError):
        _ = msg.raw
    assert md.expunge(ALICE, "INBOX", [msg.uid]) == [msg.uid]  # unlinks the link only
    assert secret.read_bytes() == SECRET


def test_maildir_trash_directory_swapped_for_symlink_is_refused(
    md: MaildirStore, tmp_path: Path
) -> None:
    md.create_mailbox(ALICE, "Old")
    outside = _outside(tmp_path)
    os.symlink(outside, md.root / ".roundtrip-trash")
    before = _snapshot(outside)
    with pytest.raises(StorageError):
        md.delete_mailbox(ALICE, "Old")  # the folder would be moved outside, then removed
    assert _snapshot(outside) == before
    assert "Old" in {b.name for b in md.mailboxes(ALICE)}


# The twins: ordinary trees and a root reached through a link work as before


def test_maildir_root_reached_through_a_symlink_works(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    os.symlink(real, link)
    with MaildirStore(link) as s:
        assert s.root == real.resolve()
        s.add_user(ALICE, "pw")
        s.create_mailbox(ALICE, "Work")
        s.create_mailbox(ALICE, "Work/2024")
        msg = s.append(ALICE, RAW, mailbox="Work/2024", flags={"\\Seen"})
        s.set_flags(ALICE, "Work/2024", {msg.uid: frozenset({"\\Flagged"})})
        s.rename_mailbox(ALICE, "Work", "Archive")
        s.copy(ALICE, "Archive/2024", [msg.uid], "INBOX")
        s.deliver(ALICE, RAW)
        s.rename_mailbox(ALICE, "INBOX", "Old")
        s.delete_mailbox(ALICE, "Junk")
        assert s.refused == []
    with MaildirStore(link) as s:
        assert s.refused == []
        assert [m.raw for m in s.messages(ALICE, "Archive/2024")] == [RAW]
        assert [m.raw for m in s.messages(ALICE, "Old")] == [RAW, RAW]
        assert s.expunge(ALICE, "Old", [1, 2]) == [1, 2]
        s.clear()
        assert s.messages(ALICE) == []


# Through a running stack: real IMAP and POP3 clients get NO / -ERR, the servers keep serving


@pytest.fixture
def maildir_stack(root: Path) -> Iterator[MailStack]:
    config = StackConfig(domains=("example.com",), users=(User(ALICE, "alice-pw"),))
    store = MaildirStore(root)
    try:
        with MailStack(config, store=store) as stack:
            yield stack
    finally:
        store.close()


def _imap(stack: MailStack) -> imaplib.IMAP4_SSL:
    host, port = stack.endpoints().address("imaps")
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=stack.client_context(), timeout=TIMEOUT)
    imap.login(ALICE, "alice-pw")
    return imap


def test_maildir_stack_imap_refuses_a_folder_swapped_for_a_symlink(
    maildir_stack: MailStack, root: Path, tmp_path: Path
) -> None:
    store = maildir_stack.store
    assert isinstance(store, MaildirStore)
    store.create_mailbox(ALICE, "Work")
    msg = store.append(ALICE, RAW, mailbox="Work")
    outside = _outside(tmp_path, names=(msg.path.name,))
    selected = _imap(maildir_stack)
    fresh = _imap(maildir_stack)
    try:
        assert selected.select("Work")[0] == "OK"
        assert selected.uid("STORE", str(msg.uid), "+FLAGS", "(\\Deleted)")[0] == "OK"
        _swap_for_link(store.root / ALICE / ".Work", outside, tmp_path / "aside")
        before = _snapshot(outside)

        typ, data = selected.uid("FETCH", str(msg.uid), "(BODY.PEEK[])")
        assert typ == "NO" and b"SECRET" not in repr(data).encode()
        assert selected.uid("STORE", str(msg.uid), "+FLAGS", "(\\Flagged)")[0] == "NO"
        assert selected.expunge()[0] == "NO"  # would unlink outside/cur/<the same name>
        assert selected.noop()[0] == "OK"

        typ, data = fresh.select("Work")
        assert typ == "NO" and b"CANNOT" in data[0]
        assert fresh.status("Work", "(MESSAGES)")[0] == "NO"
        assert fresh.append("Work", "", imaplib.Time2Internaldate(0), RAW)[0] == "NO"
        assert fresh.rename("Work", "Elsewhere")[0] == "NO"
        assert fresh.delete("Work")[0] == "NO"
        assert _snapshot(outside) == before

        # The twin, on the same connection: an ordinary folder still works.
        assert fresh.append("INBOX", "", imaplib.Time2Internaldate(0), RAW)[0] == "OK"
        assert fresh.select("INBOX")[0] == "OK"
        typ, data = fresh.uid("FETCH", "1", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == RAW
    finally:
        for client in (selected, fresh):
            client.logout()
    maildir_stack.check()


def test_maildir_stack_restart_does_not_list_a_symlinked_folder(root: Path, tmp_path: Path) -> None:
    with MaildirStore(root) as s:
        s.add_user(ALICE, "pw")
        s.create_mailbox(ALICE, "Work")
    outside = _outside(tmp_path)
    os.symlink(outside, root / ALICE / ".Secret")
    before = _snapshot(outside)
    config = StackConfig(domains=("example.com",), users=(User(ALICE, "alice-pw"),))
    with MaildirStore(root) as store, MailStack(config, store=store) as stack:
        imap = _imap(stack)
        try:
            typ, listed = imap.list()
            assert typ == "OK"
            names = b" ".join(listed)  # type: ignore[arg-type]
            assert b"Work" in names and b"Secret" not in names
            typ, data = imap.select("Secret")
            assert typ == "NO" and b"NONEXISTENT" in data[0]
            assert imap.select("Work")[0] == "OK"
        finally:
            imap.logout()
        stack.check()
    assert _snapshot(outside) == before


def test_maildir_stack_pop3_refuses_an_inbox_swapped_for_a_symlink(
    maildir_stack: MailStack, tmp_path: Path
) -> None:
    store = maildir_stack.store
    assert isinstance(store, MaildirStore)
    store.deliver(ALICE, RAW)
    host, port = maildir_stack.endpoints().address("pop3s")

    def login() -> poplib.POP3_SSL:
        pop = poplib.POP3_SSL(host, port, context=maildir_stack.client_context(), timeout=TIMEOUT)
        try:
            pop.user(ALICE)
            pop.pass_("alice-pw")
        except BaseException:
            pop.close()
            raise
        return pop

    pop = login()  # the twin: an ordinary INBOX logs in and lists its message
    assert pop.stat()[0] == 1
    pop.quit()
    outside = tmp_path / "outside"
    shutil.copytree(store.root / ALICE / "new", outside)
    _swap_for_link(store.root / ALICE / "new", outside, tmp_path / "aside")
    before = _snapshot(outside)
    with pytest.raises(poplib.error_proto, match="-ERR"):
        login()
    assert _snapshot(outside) == before
    os.unlink(store.root / ALICE / "new")
    os.rename(tmp_path / "aside", store.root / ALICE / "new")
    pop = login()  # and the server kept serving
    assert pop.stat()[0] == 1
    pop.quit()
    maildir_stack.check()
