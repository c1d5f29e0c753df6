"""What the IMAP machine needs of a mailbox store, as ``typing.Protocol`` classes.

``roundtrip.store.Store`` satisfies them structurally and the stack wires the two together, so
``protocols`` never imports ``store``. ``roundtrip.protocols.imap`` re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from ._imapsearch import SearchMessage

__all__ = ["IMAPMailbox", "IMAPMessage", "IMAPStore", "IMAPStoreChange"]


#: One stored message, as the IMAP machine reads it: exactly what SEARCH reads.
IMAPMessage = SearchMessage


class IMAPMailbox(Protocol):
    """A folder: UIDs ascending, messages by UID, and its IMAP attributes."""

    @property
    def name(self) -> str: ...

    @property
    def uidvalidity(self) -> int: ...

    @property
    def uidnext(self) -> int: ...

    @property
    def special_use(self) -> str | None: ...

    @property
    def subscribed(self) -> bool: ...

    @property
    def first_recent_uid(self) -> int: ...

    @property
    def modseq(self) -> int:
        """A number that grows on every change to the folder (messages, flags)."""
        ...

    def __len__(self) -> int: ...

    def uids(self) -> list[int]: ...

    def keywords(self) -> set[str]:
        """The keywords some message of the folder carries (flags without a backslash)."""
        ...

    def get(self, uid: int) -> IMAPMessage | None: ...

    def uids_between(self, low: int, high: int) -> list[int]: ...


class IMAPStore(Protocol):
    """The store operations the machine needs; ``roundtrip.store.Store`` satisfies it.

    Mutators raise ``roundtrip.errors.MailboxError`` whose ``code`` becomes the response code.
    """

    def check_password(self, address: str, password: str) -> bool: ...

    def mailbox(self, address: str, name: str = ...) -> IMAPMailbox: ...

    def mailboxes(self, address: str) -> Sequence[IMAPMailbox]: ...

    def create_mailbox(self, address: str, name: str) -> object: ...

    def delete_mailbox(self, address: str, name: str) -> None: ...

    def rename_mailbox(self, address: str, old: str, new: str) -> None: ...

    def subscribe(self, address: str, name: str, subscribed: bool = ...) -> None: ...

    def subscriptions(self, address: str) -> Sequence[str]:
        """The names the user subscribed to, mailboxes or not (RFC 3501 6.3.6); LSUB reads it."""
        ...

    def claim_recent(self, address: str, name: str) -> tuple[int, int]: ...

    def append(
        self,
        address: str,
        raw: bytes,
        *,
        mailbox: str = ...,
        flags: Iterable[str] = ...,
        internal_date: float | None = ...,
    ) -> IMAPMessage: ...

    def set_flags(
        self, address: str, mailbox: str, updates: dict[int, frozenset[str]]
    ) -> Sequence[IMAPMessage]: ...

    def expunge(self, address: str, mailbox: str, uids: Iterable[int]) -> list[int]: ...

    def copy(
        self, address: str, source: str, uids: Iterable[int], target: str
    ) -> list[tuple[int, int]]: ...


class IMAPStoreChange(Protocol):
    """A store change notification (``roundtrip.store.StoreChange``)."""

    @property
    def user(self) -> str: ...

    @property
    def mailbox(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def uids(self) -> tuple[int, ...]: ...
