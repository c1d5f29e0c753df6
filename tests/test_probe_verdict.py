"""``roundtrip probe`` verdicts: ``--warn``/``--crit`` timing thresholds, ``--fail-on``, and
the Nagios/Icinga mode, run in-process through ``main()`` against a real stack; plus the
pure ``report.verdict``/``report.nagios`` over documents."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from roundtrip import MailStack
from roundtrip.cli import main
from roundtrip.probes._net import FAIL, INFO, WARN, Finding
from roundtrip.probes.roundtrip import ProbeResult, _body_difference, _conclude
from roundtrip.probes.tlsfacts import wildcard_covers
from roundtrip.report import nagios, verdict

#: A threshold every real round trip is above.
TINY = "1e-06"


@pytest.fixture(scope="module")
def stack() -> Iterator[MailStack]:
    with MailStack() as running:
        yield running


@pytest.fixture
def urls(stack: MailStack, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    stack.reset()
    monkeypatch.setenv("ROUNDTRIP_SMTP_PASSWORD", stack.user("example.com").password)
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", stack.user("example.org").password)
    src, dst = stack.endpoints("example.com"), stack.endpoints("example.org")
    return [
        "--smtp",
        f"smtps://user%40example.com@127.0.0.1:{src.ports['submissions']}",
        "--imap",
        f"imaps://user%40example.org@127.0.0.1:{dst.ports['imaps']}",
        "--cafile",
        stack.ca_file,
        "--timeout",
        "10",
    ]


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict[str, Any]]:
    code = main(["probe", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_probe_verdict_without_thresholds_has_timings_and_no_slow_finding(
    urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = _json(capsys, urls)
    assert code == 0
    result = doc["results"][0]
    assert set(result["timings"]) == {"submit", "deliver", "fetch"}
    assert not [f for f in result["findings"] if f["code"].startswith("slow-")]
    assert doc["verdict"]["fail_on"] == "fail" and doc["verdict"]["exit_code"] == 0
    assert doc["schema_version"] == 2 and "thresholds" not in doc


def test_probe_verdict_warn_threshold_is_a_warning_that_exits_0(
    urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = _json(capsys, [*urls, "--warn", f"deliver={TINY}"])
    assert code == 0
    slow = [f for f in doc["results"][0]["findings"] if f["code"] == "slow-deliver"]
    assert len(slow) == 1 and slow[0]["severity"] == "warn"
    assert slow[0]["server"].startswith("127.0.0.1:")
    assert re.fullmatch(r"deliver [0-9.]+ s", slow[0]["evidence"][0])
    assert doc["thresholds"] == {"warn": {"deliver": 1e-06}, "crit": {}}


def test_probe_verdict_fail_on_warn_turns_the_warning_into_exit_1(
    urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = _json(capsys, [*urls, "--warn", f"deliver={TINY}", "--fail-on", "warn"])
    assert code == 1
    assert doc["ok"] is True  # every check passed: only the verdict differs
    assert doc["verdict"] == {"fail_on": "warn", "worst": "warn", "exit_code": 1}


def test_probe_verdict_crit_threshold_fails_a_check(
    urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = _json(capsys, [*urls, "--crit", TINY, "--warn", TINY])
    assert code == 1
    result = doc["results"][0]
    assert result["checks"][f"submit within {float(TINY):g} s"] is False
    codes = {f["code"]: f["severity"] for f in result["findings"]}
    assert codes["slow-submit"] == codes["slow-deliver"] == codes["slow-fetch"] == "fail"


def test_probe_verdict_generous_crit_passes_its_check(
    urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = _json(capsys, [*urls, "--crit", "submit=60,deliver=60", "--warn", "50"])
    assert code == 0
    checks = doc["results"][0]["checks"]
    assert checks["submit within 60 s"] is True and checks["deliver within 60 s"] is True
    assert "fetch within 60 s" not in checks


@pytest.mark.parametrize(
    ("extra", "state", "exit_code"),
    [
        ([], "OK", 0),
        (["--warn", f"deliver={TINY}"], "WARNING", 1),
        (["--warn", f"deliver={TINY}", "--fail-on", "warn"], "CRITICAL", 2),
        (["--crit", f"fetch={TINY}"], "CRITICAL", 2),
    ],
)
def test_probe_verdict_nagios_states(
    urls: list[str],
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    state: str,
    exit_code: int,
) -> None:
    code = main(["probe", *urls, "--nagios", *extra])
    first, *rest = capsys.readouterr().out.splitlines()
    assert code == exit_code
    status, _, perfdata = first.partition(" | ")
    assert status.startswith(f"ROUNDTRIP {state} - ")
    labels = [item.split("=")[0] for item in perfdata.split()]
    assert labels == ["imap_submit", "imap_deliver", "imap_fetch", "imap_total"]
    assert all(
        re.fullmatch(r"[a-z_]+=[0-9.]+s;[0-9.e-]*;[0-9.e-]*;0;", i) for i in perfdata.split()
    )
    if state != "OK":
        assert any(line.startswith(("[warn] imap: slow-", "[fail] imap: slow-")) for line in rest)


def test_probe_verdict_nagios_failed_round_trip_is_critical(
    urls: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUNDTRIP_IMAP_PASSWORD", "not-it")
    code = main(["probe", *urls, "--nagios"])
    out = capsys.readouterr().out
    assert code == 2
    assert out.startswith(
        "ROUNDTRIP CRITICAL - 1 of 1 round trips failed; imap: FAIL at IMAP LOGIN"
    )
    assert "not-it" not in out


@pytest.mark.parametrize(
    "extra",
    [
        ["--warn", "bogus=1"],
        ["--warn", "deliver=soon"],
        ["--crit", "0"],
        ["--warn", "deliver=5", "--crit", "deliver=2"],
        ["--json"],
        ["--count", "x"],
    ],
)
def test_probe_verdict_nagios_cannot_run_is_unknown(
    urls: list[str], capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    code = main(["probe", *urls, "--nagios", *extra])
    assert code == 3
    assert capsys.readouterr().out.startswith("ROUNDTRIP UNKNOWN - ")


def test_probe_verdict_bad_threshold_is_a_usage_error(
    urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["probe", *urls, "--warn", "bogus=1"]) == 2
    assert "unknown step 'bogus'; choose from submit, deliver, fetch" in capsys.readouterr().err


def test_probe_verdict_fail_on_rejects_other_words(
    urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["probe", *urls, "--fail-on", "info"]) == 2
    assert "invalid choice: 'info'" in capsys.readouterr().err


# -- pure: the document in, the verdict out ------------------------------------------------------


def _doc(ok: bool, *severities: str) -> dict[str, Any]:
    findings = [
        {"code": f"c{i}", "severity": s, "message": f"m|{i}", "server": "", "evidence": []}
        for i, s in enumerate(severities)
    ]
    result = {
        "ok": ok,
        "smtp": "smtps://a",
        "retrieve": "pop3s://b",
        "error": "" if ok else "RETR: gone",
        "error_step": "" if ok else "RETR",
        "findings": findings,
        "timings": {"deliver": 0.5},
        "total_seconds": 1.0,
    }
    return {"results": [result], "thresholds": {"warn": {"deliver": 0.25}, "crit": {}}}


@pytest.mark.parametrize(
    ("ok", "severities", "fail_on", "exit_code"),
    [
        (True, (), "fail", 0),
        (True, ("info",), "warn", 0),
        (True, ("warn",), "fail", 0),
        (True, ("warn",), "warn", 1),
        (False, (), "fail", 1),
        (True, ("fail",), "fail", 1),
    ],
)
def test_report_verdict(
    ok: bool, severities: tuple[str, ...], fail_on: str, exit_code: int
) -> None:
    assert verdict(_doc(ok, *severities), fail_on=fail_on)["exit_code"] == exit_code


def test_report_verdict_rejects_unknown_fail_on() -> None:
    with pytest.raises(ValueError, match="expected 'warn' or 'fail'"):
        verdict(_doc(True), fail_on="info")


def test_report_nagios_warning_lists_findings_and_keeps_pipes_out() -> None:
    text, code = nagios(_doc(True, "warn", "info"))
    lines = text.splitlines()
    assert code == 1
    assert lines[0] == (
        "ROUNDTRIP WARNING - 1 round trips passed with 1 findings: m/0 | "
        "pop3_deliver=0.500000s;0.25;;0; pop3_total=1.000000s;;;0;"
    )
    assert lines[1:] == ["[warn] pop3: c0: m/0"]


def test_report_nagios_ok_and_critical() -> None:
    assert nagios(_doc(True, "info"))[1] == 0
    text, code = nagios(_doc(False))
    assert code == 2 and text.startswith("ROUNDTRIP CRITICAL - 1 of 1 round trips failed; pop3:")


def test_probe_verdict_fail_on_warn_names_the_findings_in_the_report(
    urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["probe", *urls, "--warn", f"deliver={TINY}", "--fail-on", "warn"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL: --fail-on warn: 1 warn finding(s)" in out


# -- _conclude: a failing finding always fails, a check passes only on evidence ----------------


def _concluded(
    findings: list[Finding], *, legacy: dict[str, str] | None = None, scanned: bool = False
) -> ProbeResult:
    result = ProbeResult(ok=False, smtp="smtps://a", retrieve="imaps://b")
    result.checks["exactly one copy"] = True
    result.findings = findings
    result.legacy_tls = dict(legacy or {})
    if scanned:
        result.tls_scan = {"127.0.0.1:1": {"TLSv1.2": "accepted"}}
    _conclude(result, (), legacy_checked=legacy is not None, scan_checked=scanned)
    return result


def test_conclude_any_failing_finding_fails_the_result() -> None:
    weak = _concluded([Finding("weak-cipher", FAIL, "accepts NULL")], scanned=True)
    assert not weak.ok
    assert weak.checks["no cipher suite RFC 9325 forbids"] is False
    assert weak.error_step == "VERIFY" and "accepts NULL" in weak.error
    # A failing finding of a kind with no check of its own still fails, under its code.
    novel = _concluded([Finding("something-new", FAIL, "bad")])
    assert not novel.ok and novel.checks["no something-new finding"] is False


def test_conclude_warnings_and_info_leave_the_result_passed() -> None:
    result = _concluded(
        [Finding("weak-cipher", WARN, "3DES"), Finding("received-hop", INFO, "hop")],
        scanned=True,
    )
    assert result.ok, result.error
    assert result.checks["no cipher suite RFC 9325 forbids"] is True


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ({"a": "refused", "b": "refused"}, True),
        ({"a": "refused", "b": "not tested: timed out"}, None),
        ({"a": "not tested: timed out", "b": "not tested: timed out"}, None),
    ],
)
def test_conclude_legacy_check_passes_only_when_every_server_refused(
    outcomes: dict[str, str], expected: bool | None
) -> None:
    result = _concluded([], legacy=outcomes)
    assert result.checks.get("TLS below 1.2 refused") is expected
    assert result.ok


def test_conclude_accepted_legacy_tls_fails() -> None:
    result = _concluded(
        [Finding("legacy-tls", FAIL, "TLSv1.1 was accepted")],
        legacy={"a": "accepted TLSv1.1", "b": "refused"},
    )
    assert not result.ok and result.checks["TLS below 1.2 refused"] is False


# -- the facts the report quotes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "covered"),
    [
        ("*.example.org", "mail.example.org", True),
        ("*.Example.org.", "MAIL.example.org", True),
        ("*.example.org", "example.org", False),
        ("*.example.org", "a.mail.example.org", False),
        ("*.test", "mail.test", False),  # one label under the wildcard: OpenSSL refuses it
        ("*.org", "example.org", False),
        ("mail.example.org", "mail.example.org", False),  # exact, not a wildcard
    ],
)
def test_wildcard_covers(pattern: str, host: str, covered: bool) -> None:
    assert wildcard_covers(pattern, host) is covered


def test_body_difference_quotes_the_change_past_the_start_of_a_long_line() -> None:
    line = b"x" * 70
    text = _body_difference(line + b"\r\n", line + b" \r\n")
    assert "line 1 at byte 71" in text
    sent, _, got = text.partition(", got ")
    assert sent.split(" sent ")[1] != got
    short = _body_difference(b"abc\r\n", b"abd\r\n")
    assert "line 1 sent b'abc', got b'abd'" in short
