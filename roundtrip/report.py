"""Machine-readable reports of probe runs: statistics, JUnit XML, Prometheus text format.

Everything here works on the JSON document that ``roundtrip probe --json`` prints (a dict with
``ok``, ``target``, ``results`` and ``summary``; each result is ``ProbeResult.as_dict()``), so
the three outputs cannot disagree and this module depends on nothing else in the package.

- JUnit XML: one ``<testsuite>``; one ``<testcase>`` per step, check and failing finding of
  every run, a ``<failure message=...>`` for each that failed (CI systems render these).
- Prometheus: the text exposition format 0.0.4 with HELP and TYPE lines, meant for
  node_exporter's textfile collector; written atomically (temporary file, then rename) so a
  scrape never sees half a file.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "junit_xml",
    "percentile",
    "prometheus_text",
    "summarize",
    "write_atomically",
]

#: Quantiles reported for ``--count`` runs (1.0 is the maximum).
QUANTILES = (0.5, 0.95, 1.0)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by linear interpolation between ranks.

    Raises:
        ValueError: ``values`` is empty or ``q`` is outside 0..1.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q!r} is outside 0..1")
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50": None, "p95": None, "max": None, "sum": 0.0}
    return {
        "count": len(values),
        "p50": percentile(values, 0.5),
        "p95": percentile(values, 0.95),
        "max": max(values),
        "sum": sum(values),
    }


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Runs, failures, and p50/p95/max of total time and time to visible (seconds)."""
    totals = [float(r["total_seconds"]) for r in results]
    visible = [float(r["time_to_visible"]) for r in results if r.get("time_to_visible") is not None]
    return {
        "runs": len(results),
        "failed": sum(1 for r in results if not r["ok"]),
        "total_seconds": _stats(totals),
        "time_to_visible": _stats(visible),
    }


# -- JUnit XML -------------------------------------------------------------------------------


def _case(suite: ET.Element, classname: str, name: str, seconds: float = 0.0) -> ET.Element:
    return ET.SubElement(
        suite, "testcase", {"classname": classname, "name": name, "time": f"{seconds:.6f}"}
    )


def _fail(case: ET.Element, message: str, kind: str) -> None:
    failure = ET.SubElement(case, "failure", {"message": message, "type": kind})
    failure.text = message


def junit_xml(doc: Mapping[str, Any]) -> str:
    """The probe document as JUnit XML: one testsuite, a testcase per step/check/finding."""
    results: list[Mapping[str, Any]] = list(doc["results"])
    suite = ET.Element("testsuite", {"name": "roundtrip probe"})
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", {"name": "target", "value": str(doc.get("target", ""))})
    several = len({(r["smtp"], r["retrieve"]) for r in results}) < len(results)
    run_of: dict[tuple[str, str], int] = {}
    for result in results:
        pair = (str(result["smtp"]), str(result["retrieve"]))
        run_of[pair] = run_of.get(pair, 0) + 1
        classname = f"{pair[0]} -> {pair[1]}"
        if several:
            classname += f" [run {run_of[pair]}]"
        failed_step_recorded = False
        for step in result["steps"]:
            case = _case(suite, classname, str(step["name"]), float(step["seconds"]))
            if not step["ok"]:
                failed_step_recorded = True
                _fail(case, str(result["error"] or step["detail"]), "step")
        if result["error"] and result["error_step"] != "VERIFY" and not failed_step_recorded:
            _fail(_case(suite, classname, str(result["error_step"])), str(result["error"]), "step")
        for check, ok in result["checks"].items():
            case = _case(suite, classname, f"check {check}")
            if not ok:
                _fail(case, str(result["error"]), "check")
        for finding in result["findings"]:
            if finding["severity"] == "fail":
                _fail(
                    _case(suite, classname, f"finding {finding['code']}"),
                    str(finding["message"]),
                    "finding",
                )
        notes = [
            f"finding [warn] {f['message']}" for f in result["findings"] if f["severity"] != "fail"
        ]
        notes += [
            f"tls {t['server']}: {t['version']} {t['cipher']}; subject {t['subject']}; "
            f"issuer {t['issuer']}; {t['days_left']} days to expiry; "
            f"hostname match {t['hostname_match']}"
            for t in result["tls"]
        ]
        if notes:
            case = _case(suite, classname, "report")
            ET.SubElement(case, "system-out").text = "\n".join(notes)
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(1 for c in cases if c.find("failure") is not None)))
    suite.set("errors", "0")
    suite.set("skipped", "0")
    suite.set("time", f"{sum(float(r['total_seconds']) for r in results):.6f}")
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, "unicode") + "\n"


# -- Prometheus text format --------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Families:
    """Metric families in first-use order, each with its HELP, TYPE and samples."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(
        self, name: str, kind: str, help_text: str, labels: Mapping[str, str], value: float
    ) -> None:
        self.sample(name, kind, help_text, name, labels, value)

    def sample(
        self,
        family: str,
        kind: str,
        help_text: str,
        name: str,
        labels: Mapping[str, str],
        value: float,
    ) -> None:
        entry = self._families.setdefault(family, (kind, help_text, []))
        entry[2].append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        lines = []
        for family, (kind, help_text, samples) in self._families.items():
            lines.append(f"# HELP {family} {help_text}")
            lines.append(f"# TYPE {family} {kind}")
            lines.extend(samples)
        return "\n".join(lines) + "\n"


def _summary(
    families: _Families, name: str, help_text: str, labels: dict[str, str], values: list[float]
) -> None:
    for q in QUANTILES:
        value = percentile(values, q) if values else math.nan
        families.sample(name, "summary", help_text, name, {**labels, "quantile": f"{q:g}"}, value)
    families.sample(name, "summary", help_text, f"{name}_sum", labels, sum(values))
    families.sample(name, "summary", help_text, f"{name}_count", labels, len(values))


def prometheus_text(doc: Mapping[str, Any], *, now: float | None = None) -> str:
    """The probe document as Prometheus text exposition format (version 0.0.4).

    Gauges describe the last run of each SMTP -> IMAP/POP3 pair; the summaries
    (quantiles 0.5, 0.95 and 1 = max) cover every run of the invocation.
    """
    results: list[Mapping[str, Any]] = list(doc["results"])
    families = _Families()
    pairs: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for result in results:
        pairs.setdefault((str(result["smtp"]), str(result["retrieve"])), []).append(result)
    certs: dict[str, Mapping[str, Any]] = {}
    for (smtp, retrieve), runs in pairs.items():
        labels = {"smtp": smtp, "retrieve": retrieve}
        last = runs[-1]
        families.add(
            "roundtrip_probe_success",
            "gauge",
            "1 if every run of the round trip passed every check, else 0.",
            labels,
            1 if all(r["ok"] for r in runs) else 0,
        )
        families.add(
            "roundtrip_probe_runs",
            "gauge",
            "Round trips run by this invocation.",
            labels,
            len(runs),
        )
        families.add(
            "roundtrip_probe_failed_runs",
            "gauge",
            "Round trips of this invocation that failed.",
            labels,
            sum(1 for r in runs if not r["ok"]),
        )
        _summary(
            families,
            "roundtrip_probe_duration_seconds",
            "Duration of a whole round trip (submit, wait, fetch, verify).",
            labels,
            [float(r["total_seconds"]) for r in runs],
        )
        _summary(
            families,
            "roundtrip_probe_time_to_visible_seconds",
            "Seconds from the SMTP server accepting the message to it showing in the mailbox.",
            labels,
            [float(r["time_to_visible"]) for r in runs if r.get("time_to_visible") is not None],
        )
        for step in last["steps"]:
            families.add(
                "roundtrip_probe_step_seconds",
                "gauge",
                "Duration of each step of the last round trip.",
                {**labels, "step": str(step["name"]).replace(" ", "_")},
                float(step["seconds"]),
            )
        for check, ok in last["checks"].items():
            families.add(
                "roundtrip_probe_check",
                "gauge",
                "1 if the check passed in the last round trip, else 0.",
                {**labels, "check": check},
                1 if ok else 0,
            )
        for severity in ("fail", "warn"):
            families.add(
                "roundtrip_probe_findings",
                "gauge",
                "Findings of the last round trip by severity.",
                {**labels, "severity": severity},
                sum(1 for f in last["findings"] if f["severity"] == severity),
            )
        for facts in last["tls"]:
            certs[str(facts["server"])] = facts
    for server, facts in certs.items():
        families.add(
            "roundtrip_tls_cert_expiry_days",
            "gauge",
            "Days until the server certificate expires.",
            {"server": server},
            float(facts["days_left"]),
        )
        families.add(
            "roundtrip_tls_info",
            "gauge",
            "TLS facts of the connection to each server (value always 1).",
            {
                "server": server,
                "version": str(facts["version"]),
                "cipher": str(facts["cipher"]),
                "subject": str(facts["subject"]),
                "issuer": str(facts["issuer"]),
                "hostname_match": "1" if facts["hostname_match"] else "0",
            },
            1,
        )
    families.add(
        "roundtrip_probe_last_run_timestamp_seconds",
        "gauge",
        "Unix time when this report was written.",
        {},
        time.time() if now is None else now,
    )
    return families.text()


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename.

    Raises:
        OSError: the directory is missing or not writable.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".roundtrip-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
