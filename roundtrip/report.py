"""Machine-readable reports of probe runs: statistics, JUnit XML, Prometheus text format.

Everything here works on the JSON document that ``roundtrip probe --json`` prints (a dict with
``schema_version``, ``ok``, ``target``, ``results`` and ``summary``; each result is
``ProbeResult.as_dict()``), so the three outputs cannot disagree and this module depends on
nothing else in the package.

A *path* is one (SMTP server, IMAP or POP3 server) pair; ``--count N`` runs every path N times,
and each run of a path is one round trip. Statistics are given per path, because an IMAP
session waits with IDLE while POP3 has to reconnect to poll: their timings do not mix.

- JUnit XML: one ``<testsuite>``; one ``<testcase>`` per step, check and failing finding of
  every run, a ``<failure message=...>`` for each that failed (CI systems render these).
  Within one run (one ``classname``) every case name is unique: a step that repeats (POP3
  reconnects while it polls) gets `` (attempt N)`` from its second occurrence on.
- Prometheus: the text exposition format 0.0.4 with HELP and TYPE lines, meant for
  node_exporter's textfile collector; written atomically (temporary file, then rename) so a
  scrape never sees half a file. Every series appears once: a repeated step is summed into
  one ``roundtrip_probe_step_seconds`` sample, and ``roundtrip_probe_step_attempts`` says how
  many times it ran. Checked with ``promtool check metrics`` (Prometheus 2.42).

Schema versions of the JSON document (``schema_version``): a document without the key is
version 1; version 2 adds ``summary.runs_per_path`` and ``summary.paths`` (statistics per path)
and, for errors before any probe ran, the ``{"ok": false, "error": ..., "exit_code": ...}``
shape. A new version only adds keys: every key of version 1 keeps its place and meaning.
Keys added within version 2, optional for readers: ``verdict`` (``verdict()``),
``thresholds`` (``--warn``/``--crit``), each result's ``timings``, each finding's
``evidence`` (a list of reply lines), and the finding severity ``info``.

- Nagios/Icinga: ``nagios()`` gives the plugin output (one status line with perfdata, then
  the findings) and its exit code, 0 OK, 1 WARNING, 2 CRITICAL (3 UNKNOWN is the command
  line's, when the probe cannot run).
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
    "NAGIOS_CRITICAL",
    "NAGIOS_OK",
    "NAGIOS_UNKNOWN",
    "NAGIOS_WARNING",
    "SCHEMA_VERSION",
    "SEVERITIES",
    "expiry_text",
    "junit_xml",
    "nagios",
    "percentile",
    "prometheus_text",
    "summarize",
    "verdict",
    "worst_severity",
    "write_atomically",
]

#: The version of the ``roundtrip probe --json`` document (see the module docstring).
SCHEMA_VERSION = 2

#: Quantiles reported for ``--count`` runs (1.0 is the maximum).
QUANTILES = (0.5, 0.95, 1.0)

#: Finding severities, mildest first (``roundtrip.probes`` uses the same words).
SEVERITIES = ("info", "warn", "fail")

#: Exit codes of a Nagios/Icinga plugin (Monitoring Plugins development guidelines).
NAGIOS_OK = 0
NAGIOS_WARNING = 1
NAGIOS_CRITICAL = 2
NAGIOS_UNKNOWN = 3


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


def _path_key(result: Mapping[str, Any]) -> tuple[str, str]:
    return str(result["smtp"]), str(result["retrieve"])


def _by_path(
    results: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """Results grouped by path (SMTP URL, retrieval URL), in first-seen order."""
    paths: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for result in results:
        paths.setdefault(_path_key(result), []).append(result)
    return paths


def _timings(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    totals = [float(r["total_seconds"]) for r in results]
    visible = [float(r["time_to_visible"]) for r in results if r.get("time_to_visible") is not None]
    return {
        "runs": len(results),
        "failed": sum(1 for r in results if not r["ok"]),
        "total_seconds": _stats(totals),
        "time_to_visible": _stats(visible),
    }


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Runs, failures, and p50/p95/max of total time and time to visible (seconds).

    Returns:
        ``runs``, ``failed``, ``total_seconds`` and ``time_to_visible`` over every round trip
        of every path (schema 1); ``runs_per_path``, the ``--count`` (None when the paths ran
        unequal numbers of times); and ``paths``: per path, in first-run order, its ``smtp``
        and ``retrieve`` URLs, ``protocol`` (``imap`` or ``pop3``) and the same four
        statistics over its own runs only.
    """
    paths = _by_path(results)
    counts = {len(runs) for runs in paths.values()}
    return {
        **_timings(results),
        "runs_per_path": counts.pop() if len(counts) == 1 else None,
        "paths": [
            {
                "smtp": smtp,
                "retrieve": retrieve,
                "protocol": retrieve.partition(":")[0].rstrip("s"),
                **_timings(runs),
            }
            for (smtp, retrieve), runs in paths.items()
        ],
    }


def expiry_text(not_after: str, days_left: int) -> str:
    """A certificate's expiry for people: days when near, the date and years when far.

    Args:
        not_after: the ISO 8601 expiry time (empty when there was no certificate).
        days_left: whole days until then (negative once expired).
    """
    if not not_after:
        return "no certificate"
    date = not_after[:10]
    if days_left < 0:
        return f"EXPIRED {-days_left} days ago ({date})"
    if days_left <= 2 * 365:
        return f"{days_left} days to expiry ({date})"
    return f"expires {date} (in {days_left / 365.25:.0f} years)"


# -- verdicts ---------------------------------------------------------------------------------


def worst_severity(doc: Mapping[str, Any]) -> str:
    """``"fail"`` when a round trip failed or found a ``fail`` finding, else the worst
    severity among the findings (``"warn"``, ``"info"``), else ``"ok"``."""
    results: list[Mapping[str, Any]] = list(doc["results"])
    if any(not r["ok"] for r in results):
        return "fail"
    found = {str(f["severity"]) for r in results for f in r["findings"]}
    for severity in reversed(SEVERITIES):
        if severity in found:
            return severity
    return "ok"


def verdict(doc: Mapping[str, Any], *, fail_on: str = "fail") -> dict[str, Any]:
    """The exit verdict of a probe document: ``fail_on`` (``"fail"`` or ``"warn"``, the
    mildest severity that fails), ``worst`` (``worst_severity``) and ``exit_code`` (0 or 1).

    Raises:
        ValueError: ``fail_on`` is not ``"warn"`` or ``"fail"``.
    """
    if fail_on not in ("warn", "fail"):
        raise ValueError(f"fail_on {fail_on!r}: expected 'warn' or 'fail'")
    worst = worst_severity(doc)
    failing = ("warn", "fail") if fail_on == "warn" else ("fail",)
    return {"fail_on": fail_on, "worst": worst, "exit_code": 1 if worst in failing else 0}


def _plugin_text(text: str) -> str:
    """One line of plugin output: no newline, and no ``|`` (it starts the perfdata)."""
    return " ".join(text.replace("|", "/").split())


def _perf_label(result: Mapping[str, Any]) -> str:
    return str(result["retrieve"]).partition(":")[0].rstrip("s") or "path"


def _perfdata(doc: Mapping[str, Any]) -> str:
    """``label=value;warn;crit;min;`` per timing of each path's last run (seconds)."""
    thresholds: Mapping[str, Mapping[str, float]] = doc.get("thresholds") or {}
    warn, crit = thresholds.get("warn", {}), thresholds.get("crit", {})
    last = {_path_key(r): r for r in doc["results"]}
    items = []
    for result in last.values():
        label = _perf_label(result)
        timings: Mapping[str, float] = result.get("timings") or {}
        for name, seconds in timings.items():
            w = f"{warn[name]:g}" if name in warn else ""
            c = f"{crit[name]:g}" if name in crit else ""
            items.append(f"{label}_{name}={seconds:.6f}s;{w};{c};0;")
        items.append(f"{label}_total={float(result['total_seconds']):.6f}s;;;0;")
    return " ".join(items)


def nagios(doc: Mapping[str, Any], *, fail_on: str = "fail") -> tuple[str, int]:
    """The probe document as a Nagios/Icinga plugin's output and exit code.

    The first line is ``ROUNDTRIP <STATE> - <summary> | <perfdata>``; each warning and
    failing finding follows on a line of its own (the plugin's long output). The state is
    CRITICAL when a round trip failed (a step, a check, a ``fail`` finding), WARNING when a
    finding is a warning (CRITICAL with ``fail_on="warn"``), else OK. Perfdata: the
    ``submit``, ``deliver``, ``fetch`` and ``total`` seconds of each path's last run, with
    the thresholds of ``doc["thresholds"]`` (``--warn``/``--crit``) as warn and crit.
    """
    results: list[Mapping[str, Any]] = list(doc["results"])
    worst = worst_severity(doc)
    code = {"fail": NAGIOS_CRITICAL, "warn": NAGIOS_WARNING}.get(worst, NAGIOS_OK)
    if code == NAGIOS_WARNING and fail_on == "warn":
        code = NAGIOS_CRITICAL
    state = {NAGIOS_OK: "OK", NAGIOS_WARNING: "WARNING", NAGIOS_CRITICAL: "CRITICAL"}[code]
    failed = [r for r in results if not r["ok"]]
    noted = [(r, f) for r in results for f in r["findings"] if f["severity"] in ("warn", "fail")]
    if failed:
        first = failed[0]
        summary = (
            f"{len(failed)} of {len(results)} round trips failed; {_perf_label(first)}: "
            f"FAIL at {first['error_step']}: {first['error']}"
        )
    elif noted:
        summary = f"{len(results)} round trips passed with {len(noted)} findings: " + str(
            noted[0][1]["message"]
        )
    else:
        summary = f"{len(results)} round trips passed"
    lines = [f"ROUNDTRIP {state} - {_plugin_text(summary)} | {_perfdata(doc)}"]
    lines += [
        _plugin_text(f"[{f['severity']}] {_perf_label(r)}: {f['code']}: {f['message']}")
        for r, f in noted
    ]
    return "\n".join(lines) + "\n", code


# -- JUnit XML -------------------------------------------------------------------------------


class _Cases:
    """Adds ``<testcase>`` elements, keeping (classname, name) unique: a name seen before in
    the same class gets `` (attempt N)``, N counting its occurrences."""

    def __init__(self, suite: ET.Element) -> None:
        self._suite = suite
        self._seen: dict[tuple[str, str], int] = {}

    def __call__(self, classname: str, name: str, seconds: float = 0.0) -> ET.Element:
        occurrence = self._seen.get((classname, name), 0) + 1
        self._seen[(classname, name)] = occurrence
        unique = name if occurrence == 1 else f"{name} (attempt {occurrence})"
        return ET.SubElement(
            self._suite,
            "testcase",
            {"classname": classname, "name": unique, "time": f"{seconds:.6f}"},
        )


def _fail(case: ET.Element, message: str, kind: str) -> None:
    failure = ET.SubElement(case, "failure", {"message": message, "type": kind})
    failure.text = message


def junit_xml(doc: Mapping[str, Any]) -> str:
    """The probe document as JUnit XML: one testsuite, a testcase per step/check/finding.

    The classname is the path (``SMTP URL -> retrieval URL``, plus `` [run N]`` when a path
    ran more than once); case names are unique within a classname (see the module docstring).
    """
    results: list[Mapping[str, Any]] = list(doc["results"])
    suite = ET.Element("testsuite", {"name": "roundtrip probe"})
    add_case = _Cases(suite)
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
            case = add_case(classname, str(step["name"]), float(step["seconds"]))
            if not step["ok"]:
                failed_step_recorded = True
                _fail(case, str(result["error"] or step["detail"]), "step")
        if result["error"] and result["error_step"] != "VERIFY" and not failed_step_recorded:
            _fail(add_case(classname, str(result["error_step"])), str(result["error"]), "step")
        for check, ok in result["checks"].items():
            case = add_case(classname, f"check {check}")
            if not ok:
                _fail(case, str(result["error"]), "check")
        for finding in result["findings"]:
            if finding["severity"] == "fail":
                _fail(
                    add_case(classname, f"finding {finding['code']}"),
                    str(finding["message"]),
                    "finding",
                )
        notes = [
            f"finding [{f['severity']}] {f['message']}"
            for f in result["findings"]
            if f["severity"] != "fail"
        ]
        notes += [
            f"tls {t['server']}: {t['version']} {t['cipher']}; subject {t['subject']}; "
            f"issuer {t['issuer']}; {expiry_text(str(t['not_after']), int(t['days_left']))}; "
            f"hostname match {t['hostname_match']}"
            for t in result["tls"]
        ]
        if notes:
            case = add_case(classname, "report")
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


def _run_metrics(
    families: _Families, labels: dict[str, str], runs: Sequence[Mapping[str, Any]]
) -> None:
    """Outcome and timing statistics over every run of one path."""
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


def _step_metrics(
    families: _Families, labels: dict[str, str], steps: Sequence[Mapping[str, Any]]
) -> None:
    """Seconds and attempts of each step of a path's last run."""
    # A step repeats when POP3 reconnects to poll: one series per step name, summed.
    step_seconds: dict[str, float] = {}
    step_count: dict[str, int] = {}
    for step in steps:
        name = str(step["name"]).replace(" ", "_")
        step_seconds[name] = step_seconds.get(name, 0.0) + float(step["seconds"])
        step_count[name] = step_count.get(name, 0) + 1
    for name, seconds in step_seconds.items():
        families.add(
            "roundtrip_probe_step_seconds",
            "gauge",
            "Seconds spent in each step of the last round trip (summed when it repeats).",
            {**labels, "step": name},
            seconds,
        )
    for name, count in step_count.items():
        families.add(
            "roundtrip_probe_step_attempts",
            "gauge",
            "How many times each step ran in the last round trip (POP3 reconnects to poll).",
            {**labels, "step": name},
            count,
        )


def _verdict_metrics(families: _Families, labels: dict[str, str], last: Mapping[str, Any]) -> None:
    """The checks and the findings by severity of a path's last run."""
    for check, ok in last["checks"].items():
        families.add(
            "roundtrip_probe_check",
            "gauge",
            "1 if the check passed in the last round trip, else 0.",
            {**labels, "check": check},
            1 if ok else 0,
        )
    for severity in ("fail", "warn", "info"):
        families.add(
            "roundtrip_probe_findings",
            "gauge",
            "Findings of the last round trip by severity.",
            {**labels, "severity": severity},
            sum(1 for f in last["findings"] if f["severity"] == severity),
        )


def _tls_metrics(families: _Families, certs: Mapping[str, Mapping[str, Any]]) -> None:
    """Certificate expiry and TLS facts, one series per server."""
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


def prometheus_text(doc: Mapping[str, Any], *, now: float | None = None) -> str:
    """The probe document as Prometheus text exposition format (version 0.0.4).

    Every series is labelled with its path (``smtp`` and ``retrieve`` URLs) except the
    TLS facts (``server``) and the timestamp. Gauges describe the last run of each path; the
    summaries (quantiles 0.5, 0.95 and 1 = max) cover every run of that path, never mixing
    IMAP and POP3. No (name, labels) pair appears twice.
    """
    results: list[Mapping[str, Any]] = list(doc["results"])
    families = _Families()
    certs: dict[str, Mapping[str, Any]] = {}
    for (smtp, retrieve), runs in _by_path(results).items():
        labels = {"smtp": smtp, "retrieve": retrieve}
        last = runs[-1]
        _run_metrics(families, labels, runs)
        _step_metrics(families, labels, last["steps"])
        _verdict_metrics(families, labels, last)
        for facts in last["tls"]:
            certs[str(facts["server"])] = facts
    _tls_metrics(families, certs)
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
