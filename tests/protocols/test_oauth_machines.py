"""XOAUTH2 / OAUTHBEARER in the IMAP and POP3 machines, bytes in and out (RFC 7628 3.2.2)."""

from __future__ import annotations

import base64
import time

from roundtrip.protocols._lines import AuthenticationFailed, AuthenticationSucceeded
from roundtrip.protocols.imap import IMAPConnection, IMAPState
from roundtrip.protocols.pop3 import POP3Connection, POP3State
from roundtrip.store import Store

USER, PASSWORD, TOKEN = "u@example.com", "secret", "good-token"


class TokenStore(Store):
    """A store that also checks tokens; the machines get ``check_token`` as the stack's
    listeners pass it."""

    def check_token(self, address: str, token: str) -> bool:
        return address.lower() == USER and token == TOKEN


def make_store(cls: type[Store] = TokenStore) -> Store:
    store = cls()
    store.add_user(USER, PASSWORD)
    return store


def xoauth2(user: str, token: str) -> bytes:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def imap(store: Store) -> IMAPConnection:
    conn = IMAPConnection(
        store,
        hostname="h",
        secure=True,
        starttls_available=False,
        clock=time.time,
        check_token=getattr(store, "check_token", None),
    )
    conn.data_to_send()
    return conn


def test_imap_xoauth2_sasl_ir_logs_in() -> None:
    conn = imap(make_store())
    events = conn.receive_data(b"a AUTHENTICATE XOAUTH2 " + xoauth2(USER, TOKEN) + b"\r\n")
    assert conn.data_to_send().startswith(b"a OK")
    assert conn.state is IMAPState.AUTHENTICATED and conn.user == USER
    assert any(isinstance(e, AuthenticationSucceeded) for e in events)


def test_imap_xoauth2_sasl_ir_bad_token_error_then_no() -> None:
    conn = imap(make_store())
    events = conn.receive_data(b"a AUTHENTICATE XOAUTH2 " + xoauth2(USER, "bad") + b"\r\n")
    reply = conn.data_to_send()
    assert reply.startswith(b"+ ") and b"bad" not in reply
    assert not any(isinstance(e, AuthenticationFailed) for e in events)
    # "*" after the error status does not cancel: the exchange has failed (RFC 7628 3.2.3).
    events = conn.receive_data(b"*\r\n")
    assert conn.data_to_send() == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    assert any(isinstance(e, AuthenticationFailed) for e in events)
    conn.receive_data(b"b LOGIN u@example.com secret\r\n")
    assert conn.data_to_send().startswith(b"b OK")


def test_imap_xoauth2_cancel_before_response_is_bad() -> None:
    conn = imap(make_store())
    conn.receive_data(b"a AUTHENTICATE XOAUTH2\r\n")
    assert conn.data_to_send() == b"+ \r\n"
    conn.receive_data(b"*\r\n")
    assert conn.data_to_send().startswith(b"a BAD")
    assert conn.state is IMAPState.NOT_AUTHENTICATED


def test_imap_store_without_token_check_refuses_tokens() -> None:
    conn = imap(make_store(Store))
    conn.receive_data(b"a AUTHENTICATE XOAUTH2 " + xoauth2(USER, TOKEN) + b"\r\n")
    assert conn.data_to_send().startswith(b"+ ")
    conn.receive_data(b"AQ==\r\n")
    assert conn.data_to_send().startswith(b"a NO [AUTHENTICATIONFAILED]")


def pop3(store: Store) -> POP3Connection:
    conn = POP3Connection(
        store,
        hostname="h",
        secure=True,
        starttls_available=False,
        check_token=getattr(store, "check_token", None),
    )
    conn.data_to_send()
    return conn


def test_pop3_xoauth2_after_empty_challenge() -> None:
    conn = pop3(make_store())
    conn.receive_data(b"AUTH XOAUTH2\r\n")
    assert conn.data_to_send() == b"+ \r\n"
    conn.receive_data(xoauth2(USER, TOKEN) + b"\r\n")
    assert conn.data_to_send().startswith(b"+OK")
    assert conn.state is POP3State.TRANSACTION


def test_pop3_xoauth2_bad_token_error_then_err() -> None:
    conn = pop3(make_store())
    conn.receive_data(b"AUTH XOAUTH2 " + xoauth2(USER, "bad") + b"\r\n")
    reply = conn.data_to_send()
    assert reply.startswith(b"+ ") and b"invalid_token" in base64.b64decode(reply[2:])
    events = conn.receive_data(b"*\r\n")
    assert conn.data_to_send().startswith(b"-ERR [AUTH]")
    assert any(isinstance(e, AuthenticationFailed) for e in events)
    assert conn.state is POP3State.AUTHORIZATION
