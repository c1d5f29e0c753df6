"""What local development with ``roundtrip serve`` needs from the stack.

Fixed unprivileged ports (a base port), a catch-all domain (as MailHog and Mailpit accept
every recipient), one announcement per stored message, and users that add their domain.
"""

from __future__ import annotations

import random
import smtplib
import threading
from collections.abc import Callable, Iterator

import pytest
from imapclient import IMAPClient

from roundtrip import MailStack, StackConfig
from roundtrip.config import PORT_STRIDE
from roundtrip.errors import ConfigError, ServerStartError
from roundtrip.stack import STANDARD_PORTS, DeliveredMessage

TIMEOUT = 5.0


def _send(stack: MailStack, to: list[str], subject: str, *, domain: str = "example.com") -> None:
    user = stack.user(domain)
    raw = f"From: <{user.address}>\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()
    host, port = stack.endpoints(domain).address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(user.address, user.password)
        smtp.sendmail(user.address, to, raw)


# -- a base port -------------------------------------------------------------------------------


def _start_on_some_base(config: StackConfig) -> tuple[MailStack, int]:
    # A base port fixes the ports by design, so the test cannot bind port 0: it tries a few
    # random bases in the unprivileged range and takes the first that is free.
    last: Exception | None = None
    for _ in range(8):
        base = random.randrange(20, 60) * 1000
        stack = MailStack(config.replace(ports=base))
        try:
            stack.start()
        except ServerStartError as exc:
            last = exc
            continue
        return stack, base
    raise AssertionError(f"no free base port found: {last}")


def test_base_port_gives_fixed_ports_per_domain() -> None:
    stack, base = _start_on_some_base(StackConfig(domains=("example.com", "example.org")))
    with stack:
        for index, domain in enumerate(("example.com", "example.org")):
            ports = stack.endpoints(domain).ports
            for service, port in ports.items():
                assert port == base + index * PORT_STRIDE + STANDARD_PORTS[service], service
        assert stack.describe()["dns"].endswith(f":{base + 53}")
        _send(stack, [stack.user("example.org").address], "fixed")
        stack.assert_delivered(subject="fixed", timeout=TIMEOUT)


@pytest.mark.parametrize("bad", [80, 1023, 65000, "65000", "fast"])
def test_base_port_out_of_range_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="ports="):
        if isinstance(bad, str):
            StackConfig.from_strings({"ports": bad, "domains": "example.com,example.org"})
        else:
            StackConfig(ports=bad)  # type: ignore[arg-type]


def test_base_port_parsed_from_strings() -> None:
    assert StackConfig.from_strings({"ports": "10000"}).ports == 10000
    assert StackConfig.from_strings({"ports": "standard"}).ports == "standard"


# -- catch-all ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catch_all() -> Iterator[MailStack]:
    config = StackConfig(domains=("example.com", "example.org"), catch_all=("example.org",))
    with MailStack(config) as stack:
        yield stack


def test_catch_all_accepts_any_local_part_into_the_first_user(catch_all: MailStack) -> None:
    catch_all.reset()
    _send(catch_all, ["anyone@example.org", "Someone.Else@example.org"], "catch")
    found = catch_all.wait_for("anyone@example.org", timeout=TIMEOUT)
    assert found.stored.user == "user@example.org"
    assert found.envelope_to == ("anyone@example.org",)
    catch_all.assert_delivered("someone.else@example.org", subject="catch", timeout=TIMEOUT)
    assert [m.subject for m in catch_all.messages("anyone@example.org")] == ["catch"]
    owner = catch_all.user("example.org")
    host, port = catch_all.endpoints("example.org").address("imaps")
    with IMAPClient(
        host, port, ssl=True, ssl_context=catch_all.client_context(), timeout=TIMEOUT
    ) as client:
        client.login(owner.address, owner.password)
        client.select_folder("INBOX", readonly=True)
        assert len(client.search("ALL")) == 2  # both copies, readable by the owner


def test_catch_all_twin_other_domain_still_refuses_unknown_users(catch_all: MailStack) -> None:
    catch_all.reset()
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        _send(catch_all, ["nobody@example.com"], "refused", domain="example.org")
    [(code, reply)] = info.value.recipients.values()
    assert code == 550 and b"5.1.1" in reply
    with pytest.raises(ConfigError):
        catch_all.wait_for("nobody@example.com", timeout=0.2)


def test_catch_all_off_by_default() -> None:
    config = StackConfig(domains=("example.com", "example.org"))
    with MailStack(config) as stack, pytest.raises(smtplib.SMTPRecipientsRefused):
        _send(stack, ["anyone@example.org"], "nope")


def test_catch_all_config_errors() -> None:
    with pytest.raises(ConfigError, match="not a domain of the stack"):
        StackConfig(domains=("example.com",), catch_all=("example.net",))
    assert StackConfig(catch_all="*").catch_all == ("*",)
    assert StackConfig.from_strings({"catch_all": "example.com"}).catch_all == ("example.com",)


# -- announcements -----------------------------------------------------------------------------


def test_on_delivery_announces_every_stored_copy() -> None:
    seen: list[DeliveredMessage] = []
    done = threading.Event()

    def record(message: DeliveredMessage) -> None:
        seen.append(message)
        if len(seen) == 2:
            done.set()

    with MailStack(StackConfig(domains=("example.com", "example.org"))) as stack:
        stack.on_delivery(record)
        _send(stack, [stack.user("example.org").address, "carol@gmail.com"], "announced")
        assert done.wait(TIMEOUT), f"announced so far: {seen}"
        assert sorted(m.envelope_to[0] for m in seen) == ["carol@gmail.com", "user@example.org"]
        assert {m.subject for m in seen} == {"announced"}
        assert [m.captured for m in seen if m.envelope_to == ("carol@gmail.com",)] == [True]


def test_on_delivery_callback_error_fails_check() -> None:
    def broken(message: DeliveredMessage) -> None:
        raise RuntimeError("printer on fire")

    with MailStack(StackConfig(domains=("example.com",))) as stack:
        stack.on_delivery(broken)
        _send(stack, [stack.user().address], "boom")
        with pytest.raises(RuntimeError, match="printer on fire"):
            stack.wait_for(subject="boom", timeout=TIMEOUT)  # which calls check()
        assert [m.subject for m in stack.messages()] == ["boom"]  # the message is stored
        stack.check()  # reported once


def _gated(stack: MailStack, gate: threading.Event, then: Callable[[], None]) -> None:
    """Register a callback that runs ``then`` only once ``gate`` is set: after the test
    thread has seen the message stored, as when the loop is slow to reach the callback."""

    def callback(message: DeliveredMessage) -> None:
        assert gate.wait(TIMEOUT), "the test thread never saw the message"
        then()

    stack.on_delivery(callback)


def _send_aside(stack: MailStack, subject: str) -> threading.Thread:
    """Send to the stack's user from another thread: the callback holds the 250 back (the
    same domain's copy is stored before it), and the test thread must wait meanwhile."""
    sender = threading.Thread(target=_send, args=(stack, [stack.user().address], subject))
    sender.start()
    return sender


def _seen_by_the_test(gate: threading.Event) -> Callable[[DeliveredMessage], bool]:
    """A wait_for predicate that opens ``gate`` once wait_for has found the message."""

    def match(message: DeliveredMessage) -> bool:
        gate.set()
        return True

    return match


def test_wait_for_reraises_a_callback_error_raised_after_the_message_was_stored() -> None:
    gate = threading.Event()

    def fail() -> None:
        raise RuntimeError("late callback failure")

    with MailStack(StackConfig(domains=("example.com",))) as stack:
        _gated(stack, gate, fail)
        sender = _send_aside(stack, "late")
        with pytest.raises(RuntimeError, match="late callback failure"):
            stack.wait_for(subject="late", match=_seen_by_the_test(gate), timeout=TIMEOUT)
        sender.join(TIMEOUT)
        assert not sender.is_alive()
        stack.check()  # reported once


def test_wait_for_twin_returns_after_a_passing_callback_ran() -> None:
    gate = threading.Event()
    ran: list[str] = []
    with MailStack(StackConfig(domains=("example.com",))) as stack:
        _gated(stack, gate, lambda: ran.append("callback"))
        sender = _send_aside(stack, "late")
        stack.wait_for(subject="late", match=_seen_by_the_test(gate), timeout=TIMEOUT)
        assert ran == ["callback"]  # already: wait_for returned after the callback
        sender.join(TIMEOUT)
        assert not sender.is_alive()
        stack.check()


def test_reset_raises_an_error_recorded_since_the_last_check() -> None:
    def broken(message: DeliveredMessage) -> None:
        raise RuntimeError("unchecked failure")

    with MailStack(StackConfig(domains=("example.com",))) as stack:
        stack.on_delivery(broken)
        _send(stack, [stack.user().address], "unchecked")  # stored, and announced, before the 250
        assert [m.subject for m in stack.messages()] == ["unchecked"]
        with pytest.raises(RuntimeError, match="unchecked failure") as info:
            stack.reset()
        assert "recorded by the stack before reset()" in "\n".join(info.value.__notes__)
        assert stack.messages() == []  # the stack was reset all the same
        stack.check()  # reported once
        stack.reset()  # and not by the next reset either


def test_reset_forgets_the_callbacks_and_a_new_one_runs() -> None:
    old: list[str] = []
    new: list[str] = []
    with MailStack(StackConfig(domains=("example.com",))) as stack:
        stack.on_delivery(lambda m: old.append(m.subject or ""))
        _send(stack, [stack.user().address], "before")
        stack.wait_for(subject="before", timeout=TIMEOUT)
        stack.reset()
        stack.on_delivery(lambda m: new.append(m.subject or ""))
        _send(stack, [stack.user().address], "after")
        stack.wait_for(subject="after", timeout=TIMEOUT)
        assert old == ["before"]
        assert new == ["after"]


# -- users add their domain --------------------------------------------------------------------


def test_user_of_a_new_domain_adds_it() -> None:
    config = StackConfig.from_strings({"users": ["dev@myapp.test:secret"]})
    assert config.domains == ("myapp.test",)
    assert config.user().password == "secret"
    both = StackConfig.from_strings({"domains": "example.com", "users": ["dev@myapp.test:s"]})
    assert both.domains == ("example.com", "myapp.test")


def test_user_of_a_new_domain_twin_direct_config_still_refuses() -> None:
    with pytest.raises(ConfigError, match="not in a domain of the stack"):
        StackConfig(domains=("example.com",), users=("dev@myapp.test:s",))  # type: ignore[arg-type]
