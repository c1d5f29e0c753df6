"""LSUB asks the store for the user's subscription list (``IMAPStore.subscriptions``).

RFC 3501 6.3.6: the subscription list is the user's, not the mailboxes': SUBSCRIBE may name a
mailbox that does not exist and DELETE leaves the name subscribed, so LSUB (6.3.9) must read
the list itself, not each mailbox's ``subscribed``. The store here returns its mailboxes as a
plain list, as any store satisfying the protocol may: LSUB must still find the names.
"""

from __future__ import annotations

from collections.abc import Sequence

from _support import imap_session

from roundtrip.store import Mailbox, Store

USER, PASSWORD = "alice@example.test", "wonderland"


class PlainListStore(Store):
    """A store whose ``mailboxes()`` is a bare list: no subscriptions ride along."""

    def mailboxes(self, address: str) -> list[Mailbox]:  # type: ignore[override]
        return list(super().mailboxes(address))


def _lsub(store: Store, pattern: str = "*") -> list[bytes]:
    conn = imap_session(store, USER, PASSWORD)
    conn.receive_data(f'a2 LSUB "" "{pattern}"\r\n'.encode())
    out = conn.data_to_send()
    assert b"a2 OK LSUB completed" in out, out
    return [line for line in out.split(b"\r\n") if line.startswith(b"* LSUB")]


def _store() -> PlainListStore:
    store = PlainListStore()
    store.add_user(USER, PASSWORD)
    store.create_mailbox(USER, "kept")
    store.create_mailbox(USER, "dropped")
    store.subscribe(USER, "kept", True)
    store.subscribe(USER, "planned/later", True)  # no such mailbox yet: 6.3.6 allows it
    store.subscribe(USER, "dropped", False)
    return store


def test_imap_lsub_lists_subscribed_names_from_the_store_interface() -> None:
    lines = _lsub(_store())
    assert b'* LSUB () "/" "kept"' in lines, lines
    assert b'* LSUB (\\Noselect) "/" "planned/later"' in lines, lines


def test_imap_lsub_leaves_out_unsubscribed_mailboxes() -> None:
    lines = _lsub(_store())
    assert not any(b"dropped" in line for line in lines), lines
    subscriptions: Sequence[str] = _store().subscriptions(USER)
    assert "dropped" not in subscriptions and "kept" in subscriptions
