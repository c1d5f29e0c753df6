"""report.py: percentiles, JUnit XML and Prometheus text built from probe documents."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from roundtrip.report import (
    expiry_text,
    junit_xml,
    percentile,
    prometheus_text,
    summarize,
    write_atomically,
)


def _result(ok: bool = True, total: float = 0.1, visible: float | None = 0.02) -> dict[str, Any]:
    return {
        "ok": ok,
        "smtp": "smtps://u%40a.test@127.0.0.1:465",
        "retrieve": "imaps://u%40b.test@127.0.0.1:993",
        "token": "t",
        "steps": [
            {"name": "smtp connect", "seconds": 0.001, "ok": True, "detail": "", "server": "x"},
            {"name": "imap visible", "seconds": 0.02, "ok": ok, "detail": "", "server": "y"},
        ],
        "tls": [
            {
                "server": "127.0.0.1:465",
                "server_name": "127.0.0.1",
                "version": "TLSv1.3",
                "cipher": "TLS_AES_256_GCM_SHA384",
                "subject": 'CN=mail "quoted"\\test',
                "issuer": "O=CA",
                "not_after": "2030-01-01T00:00:00+00:00",
                "days_left": 12,
                "hostname_verified": True,
                "hostname_match": True,
                "san": ["DNS:mail.a.test"],
            }
        ],
        "findings": [
            {"code": "cert-expiring", "severity": "warn", "message": "expires soon", "server": ""}
        ]
        + ([] if ok else [{"code": "duplicate", "severity": "fail", "message": "2 copies"}]),
        "hops": [],
        "checks": {"exactly one copy": ok, 'odd "name"\nhere': True},
        "error": "" if ok else "verification failed: exactly one copy",
        "error_step": "" if ok else "VERIFY",
        "total_seconds": total,
        "time_to_visible": visible,
        "legacy_tls": {},
    }


def _doc(*results: dict[str, Any]) -> dict[str, Any]:
    return {
        "ok": all(r["ok"] for r in results),
        "target": "t",
        "results": list(results),
        "summary": summarize(results),
    }


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([1.0], 0.5, 1.0), ([1.0, 2.0, 3.0, 4.0], 0.5, 2.5), ([3.0, 1.0, 2.0], 1.0, 3.0)],
)
def test_report_percentile(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_report_percentile_p95_interpolates() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.95) == pytest.approx(95.05)


@pytest.mark.parametrize(("values", "q"), [([], 0.5), ([1.0], 1.5), ([1.0], -0.1)])
def test_report_percentile_rejects_nonsense(values: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        percentile(values, q)


def test_report_summary_counts_failures_and_skips_missing_visibility() -> None:
    summary = summarize([_result(total=0.1), _result(False, total=0.3, visible=None)])
    assert summary["runs"] == 2 and summary["failed"] == 1
    assert summary["total_seconds"]["max"] == pytest.approx(0.3)
    assert summary["time_to_visible"]["count"] == 1


def test_report_junit_passing_run_has_no_failures() -> None:
    suite = ET.fromstring(junit_xml(_doc(_result())))
    assert suite.tag == "testsuite" and suite.get("failures") == "0"
    names = [c.get("name") for c in suite.iter("testcase")]
    assert names[:2] == ["smtp connect", "imap visible"]
    assert "check exactly one copy" in names
    assert int(suite.get("tests", "0")) == len(names)


def test_report_junit_failed_run_names_the_failures() -> None:
    suite = ET.fromstring(junit_xml(_doc(_result(), _result(False))))
    failed = {
        (c.get("classname"), c.get("name")): c.find("failure")
        for c in suite.iter("testcase")
        if c.find("failure") is not None
    }
    assert int(suite.get("failures", "0")) == len(failed) == 3
    assert all("[run 2]" in str(classname) for classname, _ in failed)
    names = {name for _, name in failed}
    assert names == {"imap visible", "check exactly one copy", "finding duplicate"}
    duplicate = next(f for (_, n), f in failed.items() if n == "finding duplicate")
    assert duplicate is not None and duplicate.get("message") == "2 copies"


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_report_prometheus_parses_with_the_official_parser() -> None:
    text = prometheus_text(_doc(_result(total=0.1), _result(total=0.3)), now=1700000000.0)
    families = _families(text)
    assert families["roundtrip_probe_success"].samples[0].value == 1
    duration = families["roundtrip_probe_duration_seconds"]
    assert duration.type == "summary"
    quantiles = {
        s.labels.get("quantile"): s.value for s in duration.samples if s.name == duration.name
    }
    assert quantiles == {"0.5": pytest.approx(0.2), "0.95": pytest.approx(0.29), "1": 0.3}
    count = next(s for s in duration.samples if s.name.endswith("_count"))
    assert count.value == 2
    (expiry,) = families["roundtrip_tls_cert_expiry_days"].samples
    assert expiry.labels == {"server": "127.0.0.1:465"} and expiry.value == 12
    (info,) = families["roundtrip_tls_info"].samples
    assert info.labels["subject"] == 'CN=mail "quoted"\\test'
    checks = {s.labels["check"] for s in families["roundtrip_probe_check"].samples}
    assert 'odd "name"\nhere' in checks
    assert families["roundtrip_probe_last_run_timestamp_seconds"].samples[0].value == 1.7e9
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            assert line.split()[3] in ("gauge", "summary")
    assert text.count("# HELP ") == text.count("# TYPE ") == len(families)


def test_report_prometheus_failure_and_missing_visibility() -> None:
    families = _families(prometheus_text(_doc(_result(False, visible=None))))
    assert families["roundtrip_probe_success"].samples[0].value == 0
    assert families["roundtrip_probe_failed_runs"].samples[0].value == 1
    visible = families["roundtrip_probe_time_to_visible_seconds"].samples
    assert all(math.isnan(s.value) for s in visible if "quantile" in s.labels)
    findings = {s.labels["severity"]: s.value for s in families["roundtrip_probe_findings"].samples}
    assert findings == {"fail": 1, "warn": 1, "info": 0}


def test_report_write_atomically_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "out.prom"
    target.write_text("old")
    write_atomically(str(target), "new\n")
    assert target.read_text() == "new\n"
    assert os.listdir(tmp_path) == ["out.prom"]


def test_report_write_atomically_fails_for_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_atomically(str(tmp_path / "missing" / "out.prom"), "x")


# -- several retrieval paths, POP3 reconnects --------------------------------------------------


def _path_result(
    scheme: str, total: float, visible: float, *, reconnects: int = 1, ok: bool = True
) -> dict[str, Any]:
    """A result of the SMTP -> ``scheme`` path; POP3 polls repeat connect/tls/login."""
    result = _result(ok=ok, total=total, visible=visible)
    result["retrieve"] = f"{scheme}://u%40b.test@127.0.0.1:{995 if 'pop3' in scheme else 993}"
    label = "pop3" if "pop3" in scheme else "imap"
    steps = [{"name": "smtp connect", "seconds": 0.001, "ok": True, "detail": "", "server": "x"}]
    for attempt in range(reconnects):
        for name in ("connect", "tls", "login"):
            steps.append(
                {
                    "name": f"{label} {name}",
                    "seconds": 0.001 * (attempt + 1),
                    "ok": True,
                    "detail": "",
                    "server": "y",
                }
            )
    steps.append(
        {"name": f"{label} visible", "seconds": visible, "ok": ok, "detail": "", "server": "y"}
    )
    result["steps"] = steps
    return result


def _series(text: str) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """(sample name, sorted labels) of every sample, as Prometheus identifies a series."""
    return [
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _assert_valid_exposition(text: str) -> None:
    """Parses, and no series appears twice (the parser alone accepts duplicates)."""
    series = _series(text)
    duplicates = {s for s in series if series.count(s) > 1}
    assert not duplicates, duplicates
    promtool = shutil.which("promtool")
    if promtool is not None:
        checked = subprocess.run(
            [promtool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        # promtool parses and lints names; the one known complaint is the days unit of the
        # certificate expiry gauge, kept for compatibility with existing dashboards.
        problems = [
            line
            for line in (checked.stdout + checked.stderr).splitlines()
            if line.strip() and not line.startswith("roundtrip_tls_cert_expiry_days ")
        ]
        assert not problems, problems


def test_report_prometheus_pop3_reconnects_make_no_duplicate_series() -> None:
    doc = _doc(_path_result("imaps", 0.1, 0.02), _path_result("pop3s", 0.2, 0.05, reconnects=3))
    text = prometheus_text(doc, now=1.0)
    _assert_valid_exposition(text)
    families = _families(text)
    steps = {
        (s.labels["retrieve"].split(":")[0], s.labels["step"]): s.value
        for s in families["roundtrip_probe_step_seconds"].samples
    }
    # Repeated steps are summed: 1 + 2 + 3 ms over the three POP3 sessions.
    assert steps[("pop3s", "pop3_connect")] == pytest.approx(0.006)
    assert steps[("imaps", "imap_connect")] == pytest.approx(0.001)
    counts = {
        (s.labels["retrieve"].split(":")[0], s.labels["step"]): s.value
        for s in families["roundtrip_probe_step_attempts"].samples
    }
    assert counts[("pop3s", "pop3_login")] == 3 and counts[("imaps", "imap_login")] == 1


def test_report_prometheus_duplicate_check_catches_duplicates() -> None:
    text = prometheus_text(_doc(_result()), now=1.0)
    doubled = text + 'roundtrip_probe_success{smtp="a",retrieve="b"} 1\n' * 2
    with pytest.raises(AssertionError):
        _assert_valid_exposition(doubled)


def test_report_prometheus_quantiles_per_path() -> None:
    doc = _doc(
        _path_result("imaps", 0.1, 0.01),
        _path_result("pop3s", 0.5, 0.2),
        _path_result("imaps", 0.3, 0.03),
        _path_result("pop3s", 0.7, 0.4),
    )
    families = _families(prometheus_text(doc, now=1.0))
    duration = families["roundtrip_probe_duration_seconds"]
    p50 = {
        s.labels["retrieve"].split(":")[0]: s.value
        for s in duration.samples
        if s.labels.get("quantile") == "0.5"
    }
    assert p50 == {"imaps": pytest.approx(0.2), "pop3s": pytest.approx(0.6)}


def test_report_junit_case_names_are_unique_with_pop3_reconnects() -> None:
    doc = _doc(
        _path_result("imaps", 0.1, 0.02),
        _path_result("pop3s", 0.2, 0.05, reconnects=3),
        _path_result("imaps", 0.1, 0.02),
        _path_result("pop3s", 0.2, 0.05, reconnects=2),
    )
    suite = ET.fromstring(junit_xml(doc))
    cases = [(c.get("classname"), c.get("name")) for c in suite.iter("testcase")]
    assert len(cases) == len(set(cases))
    names = [n for c, n in cases if "pop3s" in str(c) and "[run 1]" in str(c)]
    assert names[1:4] == ["pop3 connect", "pop3 tls", "pop3 login"]
    assert "pop3 connect (attempt 3)" in names and "pop3 login (attempt 2)" in names


def test_report_summary_per_path_counts_runs_of_each_path() -> None:
    summary = summarize(
        [
            _path_result("imaps", 0.1, 0.01),
            _path_result("pop3s", 0.5, 0.2, ok=False),
            _path_result("imaps", 0.3, 0.03),
            _path_result("pop3s", 0.7, 0.4),
        ]
    )
    # The existing keys keep their meaning: every round trip of every path.
    assert summary["runs"] == 4 and summary["failed"] == 1
    assert summary["runs_per_path"] == 2
    by_path = {p["protocol"]: p for p in summary["paths"]}
    assert set(by_path) == {"imap", "pop3"}
    assert by_path["imap"]["runs"] == 2 and by_path["imap"]["failed"] == 0
    assert by_path["pop3"]["failed"] == 1
    assert by_path["imap"]["total_seconds"]["p50"] == pytest.approx(0.2)
    assert by_path["pop3"]["total_seconds"]["p50"] == pytest.approx(0.6)
    assert by_path["pop3"]["time_to_visible"]["max"] == pytest.approx(0.4)
    assert by_path["imap"]["retrieve"].startswith("imaps://")


def test_report_summary_uneven_paths_have_no_runs_per_path() -> None:
    summary = summarize(
        [
            _path_result("imaps", 0.1, 0.01),
            _path_result("imaps", 0.1, 0.01),
            _path_result("pop3s", 0.1, 0.01),
        ]
    )
    assert summary["runs_per_path"] is None
    assert [p["runs"] for p in summary["paths"]] == [2, 1]


@pytest.mark.parametrize(
    ("not_after", "days", "expected"),
    [
        ("3000-01-01T00:00:00+00:00", 355409, "expires 3000-01-01 (in 973 years)"),
        ("2030-01-01T00:00:00+00:00", 12, "12 days to expiry (2030-01-01)"),
        ("2027-06-01T00:00:00+00:00", 700, "700 days to expiry (2027-06-01)"),
        ("2020-01-01T00:00:00+00:00", -5, "EXPIRED 5 days ago (2020-01-01)"),
        ("", -1, "no certificate"),
    ],
)
def test_report_expiry_text(not_after: str, days: int, expected: str) -> None:
    assert expiry_text(not_after, days) == expected
