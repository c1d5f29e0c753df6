"""``roundtrip probe --html FILE``: one self-contained, well-formed page, validated with a
real HTML parser; what a hostile server says shows escaped."""

from __future__ import annotations

import collections
import json
import socket
import threading
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from roundtrip.cli import main
from roundtrip.htmlreport import render

TIMEOUT = 10
#: Elements without an end tag in HTML.
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
HOSTILE = "<script>alert('owned')</script>"


class PageChecker(HTMLParser):
    """Collects tags, text and URLs, and every nesting error (a tag closed out of order or
    never closed)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.tags: collections.Counter[str] = collections.Counter()
        self.texts: list[str] = []

    def _attrs(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "action", "poster", "srcset"):
                self.urls.append(value or "")
            if name.startswith("on"):
                self.errors.append(f"<{tag}> has an event handler attribute {name}")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._attrs(tag, attrs)
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._attrs(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
            return
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.texts.append(data)

    @property
    def text(self) -> str:
        return "".join(self.texts)


def check_page(path: Path) -> PageChecker:
    """Parse the page; assert it is well-formed and refers to nothing outside itself."""
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    checker = PageChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == []
    assert checker.open == [], f"never closed: {checker.open}"
    external = [u for u in checker.urls if not (u.startswith("#") or u == "data:,")]
    assert external == []
    # No script, no stylesheet or font fetched from anywhere.
    assert checker.tags["script"] == 0
    assert "@import" not in page and "url(" not in page
    return checker


def test_html_report_of_count_runs_is_well_formed_and_complete(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert main(["probe", "--count", "3", "--html", str(out)]) == 0
    checker = check_page(out)
    text = checker.text
    assert "PASS" in text and "6 round trips over 2 paths, 0 failed" in text
    # A histogram per path, a waterfall per round trip shown (the last of each path).
    assert text.count("latency histogram of") == 2
    assert checker.tags["figure"] == 4
    assert "p50" in text and "p95" in text and "smtp auth" in text and "imap fetch" in text
    # Transcripts folded under the steps, credentials redacted.
    assert checker.tags["details"] >= 4 and "transcript: smtp" in text
    assert "AUTH PLAIN ****" in text or "AUTH LOGIN" in text
    assert "TLSv1.3" in text
    assert "days to expiry" in text or "expires" in text
    assert "relay delivered" in text  # the hops inside the embedded stack


def test_html_report_single_run_has_no_histogram(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert main(["probe", "--html", str(out)]) == 0
    checker = check_page(out)
    assert "latency histogram" not in checker.text
    assert checker.tags["figure"] == 2  # the waterfalls of the IMAP and the POP3 path


def test_html_report_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["probe", "--html", str(tmp_path / "nonexistent" / "r.html")]) == 2


class HostileSMTP:
    """An SMTP server whose greeting refuses the client with markup in its text."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(TIMEOUT)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(TIMEOUT)
            conn.sendall(f"554 5.7.1 {HOSTILE} <b onmouseover=alert(1)>no</b>\r\n".encode())
            try:
                conn.recv(1024)  # QUIT, or the close
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        self._thread.join(TIMEOUT)


def test_html_report_escapes_what_a_hostile_server_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUNDTRIP_SMTP_PASSWORD", "pw-smtp-html")
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", "pw-imap-html")
    server = HostileSMTP()
    out = tmp_path / "report.html"
    try:
        code = main(
            [
                "probe",
                "--smtp",
                f"smtp://u%40example.com@127.0.0.1:{server.port}",
                "--imap",
                "imaps://u%40example.com@127.0.0.1:1",
                "--timeout",
                "5",
                "--html",
                str(out),
            ]
        )
    finally:
        server.close()
    assert code == 1
    checker = check_page(out)  # no <script> element, no on* attribute: all of it is text
    assert HOSTILE in checker.text  # shown to the reader, as text
    assert "&lt;script&gt;" in out.read_text(encoding="utf-8")
    assert "FAIL at" in checker.text
    assert "pw-smtp-html" not in out.read_text(encoding="utf-8")


def _document(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """A real probe document of the embedded stack (``--json``)."""
    assert main(["probe", "--json"]) == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


def test_html_report_shows_findings_with_severities_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _document(capsys)
    last = doc["results"][-1]
    last["findings"] = [
        {"code": "legacy-tls", "severity": "fail", "message": f"accepted TLSv1 {HOSTILE}"},
        {"code": "plaintext-hop", "severity": "warn", "message": "hop without TLS"},
    ]
    last["tls"][0]["subject"] = f"CN={HOSTILE}"
    out = tmp_path / "report.html"
    out.write_text(render(doc), encoding="utf-8")
    checker = check_page(out)
    assert "FAILlegacy-tls accepted TLSv1 " + HOSTILE in checker.text
    assert "WARNplaintext-hop hop without TLS" in checker.text
    assert f"CN={HOSTILE}" in checker.text


def test_html_report_without_findings_lists_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _document(capsys)
    for result in doc["results"]:
        result["findings"] = []
    out = tmp_path / "report.html"
    out.write_text(render(doc), encoding="utf-8")
    checker = check_page(out)
    assert "Findings" not in checker.text and "Checks" in checker.text


def test_html_report_badges_follow_the_severity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An info finding and a passed check are not drawn as warnings; a warning still is."""
    doc = _document(capsys)
    last = doc["results"][-1]
    last["findings"] = [
        {"code": "received-hop", "severity": "info", "message": "hop 1"},
        {"code": "plaintext-hop", "severity": "warn", "message": "hop without TLS"},
    ]
    last["checks"] = {"passed check": True, "failed check": False}
    page = render(doc)
    assert '<span class="sev info">INFO</span><code>received-hop</code>' in page
    assert '<span class="sev warn">WARN</span><code>plaintext-hop</code>' in page
    assert '<span class="sev pass">OK</span>passed check' in page
    assert '<span class="sev fail">FAIL</span>failed check' in page
