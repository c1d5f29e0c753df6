"""pytest plugin: a hermetic mail world per session, emptied for each test.

Fixtures:
    mailstack_config   (session) the StackConfig; override it in a conftest.py.
    mailstack_ca       (session) the CertificateAuthority shared by every stack of the session.
    mailstack_session  (session) the running MailStack.
    mailstack          (function) the session stack with its mailboxes emptied; a test marked
                       ``@pytest.mark.mailstack(**overrides)`` gets a private stack instead.
    mailstack_factory  (function) builds extra stacks; all are stopped at teardown.
    mailstack_probe    (function) round trips against the stack, or against a real server
                       with ``--roundtrip-live``.

Options (command line ``--roundtrip-*``, ini ``roundtrip_*``): host, tls, timeout, domains;
``--roundtrip-live=smtps://USER@HOST`` with ``--roundtrip-live-imap``/``--roundtrip-live-pop3``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from .errors import ConfigError

if TYPE_CHECKING:
    import ssl

    from .certs import CertificateAuthority
    from .config import Endpoint, StackConfig
    from .probes.roundtrip import ProbeResult
    from .stack import MailStack

# Stacks started by one pytest session (kept per config, so that a pytester run inside a
# test never stops the outer session's stacks).
_RUNNING = pytest.StashKey[list["MailStack"]]()


def _running(config: pytest.Config) -> list[MailStack]:
    return config.stash.setdefault(_RUNNING, [])


_OPTIONS = {
    # name: (help, ini type, default)
    "host": ("loopback address the stack binds (default 127.0.0.1)", "string", None),
    "tls": ("preferred submission TLS: starttls, implicit or both", "string", None),
    "timeout": ("seconds to wait for mail and for start-up", "string", None),
    "domains": ("mail domains of the stack (default example.com, example.org)", "linelist", None),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("roundtrip", "roundtrip mail stack")
    for name, (help_text, kind, default) in _OPTIONS.items():
        group.addoption(
            f"--roundtrip-{name}",
            dest=f"roundtrip_{name}",
            default=None,
            help=help_text + (" (comma-separated)" if kind == "linelist" else ""),
        )
        parser.addini(f"roundtrip_{name}", help_text, type=kind, default=default)  # type: ignore[arg-type]
    group.addoption(
        "--roundtrip-live",
        dest="roundtrip_live",
        default=None,
        metavar="URL",
        help="run against a real server: smtps://USER@HOST[:PORT] or smtp://USER@HOST[:PORT]; "
        "password from ROUNDTRIP_SMTP_PASSWORD",
    )
    group.addoption(
        "--roundtrip-live-imap",
        dest="roundtrip_live_imap",
        default=None,
        metavar="URL",
        help="imaps://USER@HOST or imap://... for live mode "
        "(password from ROUNDTRIP_IMAP_PASSWORD)",
    )
    group.addoption(
        "--roundtrip-live-pop3",
        dest="roundtrip_live_pop3",
        default=None,
        metavar="URL",
        help="pop3s://USER@HOST or pop3://... for live mode "
        "(password from ROUNDTRIP_POP3_PASSWORD)",
    )
    group.addoption(
        "--roundtrip-transcripts",
        dest="roundtrip_transcripts",
        default=None,
        choices=_TRANSCRIPT_MODES,
        help="report section 'roundtrip transcripts' with the test's SMTP, IMAP, POP3 and DNS "
        "exchanges: for failed tests (default), all tests, or off",
    )
    parser.addini(
        "roundtrip_transcripts",
        "transcripts in the report: failed (default), all or off",
        default="failed",
    )
    group.addoption(
        "--roundtrip-web",
        dest="roundtrip_web",
        nargs="?",
        const="",
        default=None,
        metavar="HOST:PORT",
        help="serve the web view of the session's stack (pip install roundtrip[web]) and "
        "print its URL, to watch the session's mail live (default 127.0.0.1, a free port)",
    )
    group.addoption(
        "--roundtrip-live-cafile",
        dest="roundtrip_live_cafile",
        default=None,
        metavar="PEM",
        help="CA bundle to verify the live server (default: system)",
    )


# Transcripts in the report (issue #15): when a test that used the stack fails, its section
# "roundtrip transcripts" shows the connections that began while it ran.
_TRANSCRIPT_MODES = ("failed", "all", "off")
_TEST_STARTED = pytest.StashKey[float]()
_TEST_STACKS = pytest.StashKey[list["MailStack"]]()


def _transcripts_mode(config: pytest.Config) -> str:
    mode = config.getoption("roundtrip_transcripts") or config.getini("roundtrip_transcripts")
    mode = str(mode or "failed").strip().lower()
    if mode not in _TRANSCRIPT_MODES:
        raise pytest.UsageError(
            f"roundtrip: roundtrip_transcripts={mode!r}: choose one of "
            f"{', '.join(_TRANSCRIPT_MODES)}"
        )
    return mode


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_TEST_STARTED] = time.time()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not any(name.startswith("mailstack") for name in getattr(item, "fixturenames", ())):
        return
    if call.when != "teardown":  # by teardown, the test's own stacks are stopped and gone
        item.stash[_TEST_STACKS] = list(_running(item.config))
    mode = _transcripts_mode(item.config)
    if mode == "off" or (not report.failed and (mode == "failed" or call.when != "call")):
        return
    from .stack._transcripts import report as transcript_report

    started = item.stash.get(_TEST_STARTED, 0.0)
    transcripts = [
        t for stack in item.stash.get(_TEST_STACKS, []) for t in stack.transcripts(since=started)
    ]
    failure = str(call.excinfo.value) if call.excinfo is not None else ""
    text = transcript_report(transcripts, failure)
    if text:
        report.sections.append(("roundtrip transcripts", text))


def _values(config: pytest.Config) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _OPTIONS:
        cli = config.getoption(f"roundtrip_{name}")
        ini = config.getini(f"roundtrip_{name}")
        values[name] = cli if cli is not None else (ini or None)
    return values


def _stack_config(config: pytest.Config) -> StackConfig:
    from .config import StackConfig

    try:
        return StackConfig.from_strings(_values(config))
    except ConfigError as exc:
        raise pytest.UsageError(f"roundtrip: {exc}") from None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "mailstack(**overrides): give this test a private mail stack built with these "
        "StackConfig overrides (domains=, users=, tls=, max_message_size=, ...)",
    )
    config.addinivalue_line(
        "markers", "roundtrip_live: talks to a real mail server; runs only with --roundtrip-live"
    )
    _stack_config(config)  # fail fast on bad ini/CLI values
    _transcripts_mode(config)
    _live_target(config)  # and on a live target that cannot work
    _web_address(config)


def pytest_report_header(config: pytest.Config) -> str:
    stack = _stack_config(config)
    live = config.getoption("roundtrip_live")
    target = f"live {live}" if live else f"embedded on {stack.host}"
    return (
        f"roundtrip: {target}, domains {', '.join(stack.domains)}, tls {stack.tls}, "
        f"timeout {stack.timeouts.wait_timeout:g}s"
    )


#: Fixtures that start an embedded stack.
_STACK_FIXTURES = frozenset({"mailstack", "mailstack_session", "mailstack_factory"})


def _prime_dkim_keys(config: pytest.Config) -> None:
    """Start minting the session stack's DKIM keys (an RSA-2048 key per domain takes 25 to
    200 ms) on worker threads now, while pytest sets the first test up: OpenSSL releases the
    GIL, so the first ``mailstack`` finds them made or nearly (roundtrip/stack/_dkim.py)."""
    stack_config = _stack_config(config)
    unsigned = stack_config.dkim_unsigned_domains
    domains = [d for d in stack_config.domains if d not in unsigned and "*" not in unsigned]
    if not stack_config.dkim or not domains:
        return

    def prime() -> None:
        from .config import cert_cache_dir
        from .stack._dkim import mint_in_background

        try:
            mint_in_background(domains, stack_config.cert_cache or cert_cache_dir())
        except Exception:  # the stack mints the keys again, and reports what fails
            return

    threading.Thread(target=prime, name="roundtrip-dkim-prime", daemon=True).start()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("roundtrip_live"):
        return
    if any(_STACK_FIXTURES.intersection(getattr(i, "fixturenames", ())) for i in items):
        _prime_dkim_keys(config)
    skip = pytest.mark.skip(reason="needs a real mail server: pass --roundtrip-live=URL")
    for item in items:
        if item.get_closest_marker("roundtrip_live") is not None:
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    running = _running(session.config)
    while running:
        running.pop().stop()


@pytest.fixture(scope="session")
def mailstack_config(pytestconfig: pytest.Config) -> StackConfig:
    """The configuration of the session stack (from ini and command line)."""
    return _stack_config(pytestconfig)


@pytest.fixture(scope="session")
def mailstack_ca(mailstack_config: StackConfig) -> Iterator[CertificateAuthority]:
    """One trustme CA for the whole session; kept across sessions in the certificate cache
    when one is configured (``StackConfig.cert_cache`` or ``ROUNDTRIP_CERT_CACHE``)."""
    from .certs import CertificateAuthority
    from .config import cert_cache_dir

    cache = mailstack_config.cert_cache or cert_cache_dir()
    if cache:
        from .stack._certcache import cached_authority

        ca: CertificateAuthority = cached_authority(cache)
    else:
        ca = CertificateAuthority()
    yield ca
    ca.cleanup()


def _start(
    pytest_config: pytest.Config, config: StackConfig, ca: CertificateAuthority
) -> MailStack:
    from .stack import MailStack

    stack = MailStack(config, ca=ca)
    stack.start()
    _running(pytest_config).append(stack)
    return stack


def _stop(pytest_config: pytest.Config, stack: MailStack) -> None:
    running = _running(pytest_config)
    if stack in running:
        running.remove(stack)
    stack.stop()


@pytest.fixture(scope="session")
def mailstack_session(
    pytestconfig: pytest.Config, mailstack_config: StackConfig, mailstack_ca: CertificateAuthority
) -> Iterator[MailStack]:
    """The stack shared by the session, started on first use."""
    stack = _start(pytestconfig, mailstack_config, mailstack_ca)
    view = _start_web(pytestconfig, stack)
    yield stack
    if view is not None:
        view.stop()
    _stop(pytestconfig, stack)


# The web view of the session stack (--roundtrip-web): imported only when asked for.
_WEB_VIEW = pytest.StashKey[Any]()


def _web_address(config: pytest.Config) -> tuple[str, int] | None:
    text = config.getoption("roundtrip_web")
    if text is None:
        return None
    try:
        from .web import parse_address
    except ImportError as exc:
        raise pytest.UsageError(
            f"roundtrip: --roundtrip-web needs aiohttp: pip install roundtrip[web] ({exc})"
        ) from None
    try:
        return parse_address(text)
    except ConfigError as exc:
        raise pytest.UsageError(f"roundtrip: {exc}") from None


def _start_web(config: pytest.Config, stack: MailStack) -> Any:
    address = _web_address(config)
    if address is None:
        return None
    from .web import WebView, is_loopback

    view = WebView(stack, host=address[0], port=address[1]).start()
    config.stash[_WEB_VIEW] = view
    line = f"roundtrip web view: {view.url_with_token}"
    if not is_loopback(view.host):
        line += f" (warning: {view.host} is not a loopback address)"
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        print(line, file=sys.stderr, flush=True)
    elif capture is None:
        reporter.write_line(line)
    else:
        # The session fixture starts inside a test, whose output is captured: this line is
        # for the person watching the run, so it bypasses the capture (as --setup-show does).
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
    return view


@pytest.fixture
def mailstack_factory(
    pytestconfig: pytest.Config, mailstack_config: StackConfig, mailstack_ca: CertificateAuthority
) -> Iterator[Callable[..., MailStack]]:
    """Build extra, isolated stacks: ``mailstack_factory(domains=["a.test"])``."""
    made: list[MailStack] = []

    def factory(**overrides: Any) -> MailStack:
        try:
            config = mailstack_config.replace(**overrides)
        except ConfigError as exc:
            raise pytest.UsageError(f"roundtrip: {exc}") from None
        stack = _start(pytestconfig, config, mailstack_ca)
        made.append(stack)
        return stack

    yield factory
    for stack in made:
        _stop(pytestconfig, stack)
    for stack in made:
        stack.check()


@pytest.fixture
def mailstack(request: pytest.FixtureRequest) -> Iterator[MailStack]:
    """The running stack for this test, reset (``MailStack.reset``): every mailbox empty,
    no ``on_delivery`` callback, the default faults, filter, DNS records and TLS policies.

    At teardown, an exception raised during the test by server code or an ``on_delivery``
    callback is re-raised, so it fails this test (reported as an error at its teardown).
    """
    marker = request.node.get_closest_marker("mailstack")
    if marker is not None:
        if marker.args:
            raise pytest.UsageError("roundtrip: @pytest.mark.mailstack takes keyword arguments")
        factory = request.getfixturevalue("mailstack_factory")
        yield factory(**marker.kwargs)
        return
    stack: MailStack = request.getfixturevalue("mailstack_session")
    stack.reset()
    yield stack
    # check() lets the loop finish what it was running first: the callbacks of a message
    # the test saw stored run just after it is stored (MailStack.check). The stack is left
    # as the test left it (the web view of --roundtrip-web still shows its mail); work the
    # test left running that fails later is raised by the next test's reset(), which names
    # it as recorded before the reset, rather than dropped.
    stack.check()


class MailstackProbe:
    """Round trips for tests, against the embedded stack or, in live mode, a real server.

    Attributes:
        live: True when ``--roundtrip-live`` points it at a real server.
        smtp, imap, pop3: the endpoints it uses (passwords held, never shown).
        context: the SSLContext that verifies the servers.
    """

    def __init__(
        self,
        *,
        smtp: Endpoint,
        imap: Endpoint | None,
        pop3: Endpoint | None,
        context: ssl.SSLContext,
        mail_from: str,
        rcpt_to: str,
        timeout: float,
        live: bool,
        settle: float | None = None,
    ) -> None:
        self.smtp = smtp
        self.imap = imap
        self.pop3 = pop3
        self.context = context
        self.mail_from = mail_from
        self.rcpt_to = rcpt_to
        self.timeout = timeout
        self.live = live
        #: Seconds to look again for a duplicate after the message shows: a real server may
        #: deliver a second copy a little later; the embedded stack delivers copies together.
        self.settle = settle if settle is not None else (0.25 if live else 0.05)

    def roundtrip(self, retrieve: str = "imap", *, keep: bool = False) -> ProbeResult:
        """Submit a tagged message, find it over ``retrieve`` (imap or pop3), verify it."""
        from .probes.roundtrip import run_probe

        target = self.imap if retrieve == "imap" else self.pop3
        if target is None:
            raise pytest.UsageError(f"roundtrip: no {retrieve} endpoint configured for the probe")
        return run_probe(
            self.smtp,
            target,
            context=self.context,
            mail_from=self.mail_from,
            rcpt_to=self.rcpt_to,
            timeout=self.timeout,
            keep=keep,
            settle=self.settle,
        )

    def assert_roundtrip(self, retrieve: str = "imap") -> ProbeResult:
        """Like ``roundtrip`` but fails the test with the probe's error when it fails."""
        result = self.roundtrip(retrieve)
        if not result.ok:
            pytest.fail(
                f"round trip over {retrieve} failed at {result.error_step}: {result.error}",
                pytrace=False,
            )
        return result


def _live_target(
    config: pytest.Config,
) -> tuple[Endpoint, Endpoint | None, Endpoint | None, ssl.SSLContext] | None:
    """The live endpoints and TLS context from ``--roundtrip-live*``, or None (embedded).

    Raises:
        pytest.UsageError: a bad URL, no reader, a password missing from the environment, or
            an unreadable CA file.
    """
    live = config.getoption("roundtrip_live")
    if not live:
        return None
    import ssl  # here, not at the top: a session without --roundtrip-live never needs it

    from .config import PASSWORD_ENV, parse_endpoint

    try:
        smtp = parse_endpoint(live, expect="smtp")
        imap_url = config.getoption("roundtrip_live_imap")
        pop3_url = config.getoption("roundtrip_live_pop3")
        imap = parse_endpoint(imap_url, expect="imap") if imap_url else None
        pop3 = parse_endpoint(pop3_url, expect="pop3") if pop3_url else None
    except ConfigError as exc:
        raise pytest.UsageError(f"roundtrip: {exc}") from None
    if imap is None and pop3 is None:
        raise pytest.UsageError(
            "roundtrip: --roundtrip-live needs --roundtrip-live-imap or --roundtrip-live-pop3"
        )
    for endpoint in (smtp, imap, pop3):
        if endpoint is not None and endpoint.user and not endpoint.password:
            raise pytest.UsageError(
                f"roundtrip: {endpoint.url}: set {PASSWORD_ENV[endpoint.protocol]} "
                f"to the password of {endpoint.user!r}"
            )
    cafile = config.getoption("roundtrip_live_cafile")
    try:
        context = ssl.create_default_context(cafile=cafile or None)
    except (OSError, ssl.SSLError) as exc:
        raise pytest.UsageError(
            f"roundtrip: --roundtrip-live-cafile {cafile}: cannot load CA certificates: {exc}"
        ) from None
    return smtp, imap, pop3, context


@pytest.fixture
def mailstack_probe(request: pytest.FixtureRequest, pytestconfig: pytest.Config) -> MailstackProbe:
    """A probe wired to the stack (or to the live server given by ``--roundtrip-live``)."""

    target = _live_target(pytestconfig)
    if target is not None:
        smtp, imap, pop3, context = target
        user = smtp.user
        reader = imap or pop3
        assert reader is not None
        return MailstackProbe(
            smtp=smtp,
            imap=imap,
            pop3=pop3,
            context=context,
            mail_from=user,
            rcpt_to=reader.user or user,
            timeout=_stack_config(pytestconfig).timeouts.wait_timeout,
            live=True,
        )
    stack: MailStack = request.getfixturevalue("mailstack")
    sender = stack.user(stack.config.domains[0])
    recipient = stack.user(stack.config.domains[-1])
    smtp_service = "submission" if stack.config.tls == "starttls" else "submissions"
    return MailstackProbe(
        smtp=stack.endpoint(smtp_service, sender),
        imap=stack.endpoint("imaps", recipient),
        pop3=stack.endpoint("pop3s", recipient),
        context=stack.client_context(),
        mail_from=sender.address,
        rcpt_to=recipient.address,
        timeout=stack.config.timeouts.wait_timeout,
        live=False,
    )
