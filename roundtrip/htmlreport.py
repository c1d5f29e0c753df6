"""``roundtrip probe --html FILE``: the probe's results as one self-contained HTML page.

Theory of operation. Like ``report``, this module works on the JSON document that
``roundtrip probe --json`` prints, so the page cannot disagree with the other outputs. The page
needs nothing at view time: the CSS is inline, the plots are inline SVG, there is no script
and no external URL (it can be attached to a ticket or opened from a CI artifact offline).

What it shows, top down:

* the verdict, the target and the number of round trips;
* with ``--count N``, per path, a latency histogram of the whole round trip (p50 and p95
  marked) and a table of p50/p95/max of every step, of the total and of time to visible;
* per round trip shown (every failed one and the last of each path, as the text output
  does): a waterfall of the steps, laid end to end in the order they ran (a step records
  its duration, not its start), with each connection's transcript folded (``<details>``)
  under the steps it served; the hops inside the embedded stack (``journey``), placed at the
  time they happened since the submission; the TLS facts of each server, the Received
  chain, the checks and the findings with their severities.

Everything that came from a server (replies, certificate names, transcript lines, headers)
is hostile input: every text goes through ``html.escape`` on its way into the page, in SVG as
in HTML. The layout is a single column that narrows to a phone's width without horizontal
scrolling (long transcript lines wrap).
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .report import expiry_text, percentile

__all__ = ["render"]

#: Bars of a latency histogram.
HISTOGRAM_BINS = 20

_CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
  color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:16px}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.6em 0 .4em}
h3{font-size:1em;margin:1.2em 0 .3em}
section.run,section.path{background:#fff;border:1px solid #d8dce3;border-radius:8px;
  padding:12px 14px;margin:14px 0}
.verdict{display:inline-block;font-weight:700;padding:1px 8px;border-radius:4px;color:#fff}
.pass{background:#23863a}.fail{background:#c62828}.warn{background:#b26a00}
.info{background:#44607f}
.muted{color:#5b6475}
.wrap,td,th,dd,li,summary{overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%;table-layout:fixed}
th,td{text-align:left;padding:3px 6px;border-bottom:1px solid #eceef2;vertical-align:top}
table.stats td,table.stats th{font-variant-numeric:tabular-nums}
table.stats th:first-child{width:34%}
table.waterfall th.step{width:30%}table.waterfall td.ms{width:6.5em;text-align:right;
  font-variant-numeric:tabular-nums}
table.waterfall td.bar{padding:5px 6px}
table.waterfall svg{display:block;width:100%;height:14px}
table.waterfall tr.failed th{color:#c62828}
tbody.conn{border-top:2px solid #d8dce3}
.detail{display:block;font-weight:400;font-size:.85em}
details{margin:2px 0 6px}summary{cursor:pointer;color:#2b4f9e}
pre{white-space:pre-wrap;overflow-wrap:anywhere;font:12.5px/1.35 ui-monospace,Menlo,Consolas,
  monospace;background:#f3f4f7;border-radius:6px;padding:8px;margin:4px 0;max-width:100%}
dl.facts{display:grid;grid-template-columns:minmax(6em,max-content) 1fr;gap:2px 12px;
  margin:4px 0 10px}
dl.facts dt{color:#5b6475}dl.facts dd{margin:0}
figure{margin:8px 0}figure svg{display:block;width:100%;height:auto;max-height:260px}
figcaption{font-size:.85em;color:#5b6475}
ul.findings{padding-left:1.2em}ul.findings li{margin:2px 0}
.sev{font-size:.8em;font-weight:700;padding:0 5px;border-radius:3px;color:#fff;
  margin-right:6px}
@media (max-width:600px){main{padding:8px}table.waterfall th.step{width:42%}
  table.waterfall td.ms{width:5em}body{font-size:14px}}
"""


def _e(value: object) -> str:
    """Escape any value for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


# -- plots -------------------------------------------------------------------------------------


def _bar_svg(start: float, width: float, scale: float, *, failed: bool, title: str) -> str:
    """One waterfall bar: an SVG 1000 units wide stretched to its cell, ``start`` and
    ``width`` in seconds on a scale of ``scale`` seconds."""
    x = 1000 * start / scale if scale > 0 else 0.0
    w = max(1000 * width / scale if scale > 0 else 0.0, 2.0)
    colour = "#c62828" if failed else "#3a6fd8"
    return (
        '<svg viewBox="0 0 1000 10" preserveAspectRatio="none" role="img" '
        f'aria-label="{_e(title)}"><rect x="0" y="4" width="1000" height="2" fill="#eceef2"/>'
        f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="10" rx="1" fill="{colour}">'
        f"<title>{_e(title)}</title></rect></svg>"
    )


def _histogram_svg(values: Sequence[float], label: str) -> str:
    """A latency histogram of ``values`` (seconds) with p50 and p95 marked."""
    low, high = min(values), max(values)
    span = high - low or max(high, 1e-3) * 0.1
    bins = [0] * HISTOGRAM_BINS
    for v in values:
        bins[min(int((v - low) / span * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
    width, height, left, bottom, top = 600, 220, 44, 34, 12
    plot_w, plot_h = width - left - 10, height - bottom - top
    tallest = max(bins)
    parts = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}" '
        'font-family="system-ui,sans-serif" font-size="13">',
        f"<title>{_e(label)}</title>",
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        'stroke="#5b6475"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#5b6475"/>',
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{tallest}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    bar_w = plot_w / HISTOGRAM_BINS
    for index, count in enumerate(bins):
        if not count:
            continue
        h = plot_h * count / tallest
        lo = low + span * index / HISTOGRAM_BINS
        parts.append(
            f'<rect x="{left + index * bar_w + 1:.1f}" y="{top + plot_h - h:.1f}" '
            f'width="{bar_w - 2:.1f}" height="{h:.1f}" fill="#3a6fd8"><title>'
            f"{_e(_ms(lo))} to {_e(_ms(lo + span / HISTOGRAM_BINS))}: {count} runs</title></rect>"
        )
    for q, colour in ((0.5, "#23863a"), (0.95, "#b26a00")):
        value = percentile(values, q)
        x = left + plot_w * (value - low) / span
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="{colour}" '
            f'stroke-width="2" stroke-dasharray="5 3"><title>p{q * 100:g} {_e(_ms(value))}'
            "</title></line>"
        )
    axis_y = top + plot_h + 18
    parts += [
        f'<text x="{left}" y="{axis_y}">{_e(_ms(low))}</text>',
        f'<text x="{left + plot_w}" y="{axis_y}" text-anchor="end">{_e(_ms(low + span))}</text>',
        f'<text x="{left + plot_w / 2}" y="{axis_y + 14}" text-anchor="middle" fill="#5b6475">'
        "round trip (runs per bar; dashed: p50 green, p95 amber)</text>",
        "</svg>",
    ]
    return "".join(parts)


# -- statistics --------------------------------------------------------------------------------


def _stat_row(name: str, values: Sequence[float]) -> str:
    if not values:
        return f"<tr><th>{_e(name)}</th><td>n/a</td><td>n/a</td><td>n/a</td><td>0</td></tr>"
    cells = "".join(
        f"<td>{_e(_ms(v))}</td>"
        for v in (percentile(values, 0.5), percentile(values, 0.95), max(values))
    )
    return f"<tr><th>{_e(name)}</th>{cells}<td>{len(values)}</td></tr>"


def _step_series(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Step name -> its seconds in each run that had it (summed when it repeats in a run)."""
    series: dict[str, list[float]] = {}
    for run in runs:
        per_run: dict[str, float] = {}
        for step in run["steps"]:
            per_run[str(step["name"])] = per_run.get(str(step["name"]), 0.0) + float(
                step["seconds"]
            )
        for name, seconds in per_run.items():
            series.setdefault(name, []).append(seconds)
    return series


def _path_section(smtp: str, retrieve: str, runs: Sequence[Mapping[str, Any]]) -> str:
    totals = [float(r["total_seconds"]) for r in runs]
    visible = [float(r["time_to_visible"]) for r in runs if r.get("time_to_visible") is not None]
    failed = sum(1 for r in runs if not r["ok"])
    label = f"{smtp} -> {retrieve}"
    rows = [_stat_row("round trip (total)", totals), _stat_row("time to visible", visible)]
    rows += [_stat_row(name, values) for name, values in _step_series(runs).items()]
    return (
        f'<section class="path"><h3 class="wrap">{_e(label)}</h3>'
        f'<p class="muted">{len(runs)} runs, {failed} failed</p>'
        f"<figure>{_histogram_svg(totals, f'latency histogram of {label}')}"
        f"<figcaption>Round-trip time of each of the {len(runs)} runs.</figcaption></figure>"
        '<table class="stats"><thead><tr><th>step</th><th>p50</th><th>p95</th><th>max</th>'
        f"<th>runs</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


# -- one round trip ----------------------------------------------------------------------------


def _assign(
    steps: Sequence[Mapping[str, Any]], transcripts: Sequence[Mapping[str, Any]]
) -> list[int]:
    """For each step, the index of the transcript (connection) that served it, or -1.

    A transcript lists the names of the steps it served; POP3 reconnects to poll, so the same
    name can belong to several connections: each step goes to the current connection if it
    lists the name, else to the next one that does.
    """
    owners: list[int] = []
    current = -1
    for step in steps:
        name = step["name"]
        if current >= 0 and name in transcripts[current]["steps"]:
            owners.append(current)
            continue
        later = [i for i in range(current + 1, len(transcripts)) if name in transcripts[i]["steps"]]
        if later:
            current = later[0]
            owners.append(current)
        else:
            owners.append(-1)
    return owners


def _transcript_details(transcript: Mapping[str, Any]) -> str:
    lines = transcript["lines"]
    text = "\n".join(f"{float(ln['t']) * 1000:8.1f} ms {ln['dir']} {ln['text']}" for ln in lines)
    state = " open" if transcript.get("failed") else ""
    failed = " — the connection the probe failed on" if transcript.get("failed") else ""
    omitted = f", {transcript['omitted']} omitted" if transcript.get("omitted") else ""
    return (
        f"<details{state}><summary>transcript: {_e(transcript['protocol'])} "
        f"{_e(transcript['peer'])} ({len(lines)} lines{omitted}){_e(failed)}</summary>"
        f"<pre>{_e(text)}</pre></details>"
    )


def _waterfall(result: Mapping[str, Any]) -> str:
    steps = list(result["steps"])
    transcripts = list(result.get("transcripts") or [])
    journey = list(result.get("journey") or [])
    end = sum(float(s["seconds"]) for s in steps)
    scale = max([end, *(float(j["at"]) for j in journey)]) or 1e-3
    owners = _assign(steps, transcripts)
    groups: list[tuple[int, list[str]]] = []
    offset = 0.0
    for step, owner in zip(steps, owners, strict=True):
        seconds = float(step["seconds"])
        failed = not step["ok"]
        detail = " ".join(str(x) for x in (step.get("server"), step.get("detail")) if x)
        title = f"{step['name']}: {_ms(seconds)} from {_ms(offset)}"
        row = (
            f'<tr class="{"failed" if failed else "ok"}"><th class="step">{_e(step["name"])}'
            f'<span class="detail muted">{_e(detail)}</span></th>'
            f'<td class="bar">{_bar_svg(offset, seconds, scale, failed=failed, title=title)}</td>'
            f'<td class="ms">{_e(_ms(seconds))}</td></tr>'
        )
        if not groups or groups[-1][0] != owner:
            groups.append((owner, []))
        groups[-1][1].append(row)
        offset += seconds
    shown = set()
    bodies = []
    for owner, rows in groups:
        tail = ""
        if owner >= 0 and owner not in shown:
            shown.add(owner)
            tail = f'<tr><td colspan="3">{_transcript_details(transcripts[owner])}</td></tr>'
        bodies.append(f'<tbody class="conn">{"".join(rows)}{tail}</tbody>')
    unassigned = [t for i, t in enumerate(transcripts) if i not in shown]
    if unassigned:
        bodies.append(
            '<tbody class="conn"><tr><td colspan="3">'
            + "".join(_transcript_details(t) for t in unassigned)
            + "</td></tr></tbody>"
        )
    if journey:
        rows = []
        previous = 0.0
        for hop in journey:
            at = float(hop["at"])
            title = f"{hop['step']} at {_ms(at)} ({hop['host']})"
            rows.append(
                f'<tr><th class="step">{_e(hop["step"])}<span class="detail muted">'
                f'{_e(hop["host"])}</span></th><td class="bar">'
                f"{_bar_svg(previous, at - previous, scale, failed=False, title=title)}</td>"
                f'<td class="ms">{_e(_ms(at))}</td></tr>'
            )
            previous = at
        bodies.append(
            '<tbody class="conn"><tr><th colspan="3">inside the stack (hops, time since the '
            f"submission was accepted)</th></tr>{''.join(rows)}</tbody>"
        )
    omitted = result.get("transcripts_omitted") or 0
    note = (
        f'<p class="muted">{omitted} connections between the first and the latest ones were '
        "not recorded.</p>"
        if omitted
        else ""
    )
    return (
        f'<figure class="waterfall"><table class="waterfall" aria-label="waterfall">'
        f"{''.join(bodies)}</table><figcaption>Steps end to end in the order they ran; "
        f"scale 0 to {_e(_ms(scale))}.</figcaption></figure>{note}"
    )


def _tls(result: Mapping[str, Any]) -> str:
    blocks = []
    for facts in result["tls"]:
        match = "yes" if facts["hostname_match"] else "NO"
        verified = "" if facts["hostname_verified"] else " (not verified: diagnostic handshake)"
        items = [
            ("server", facts["server"]),
            ("version", facts["version"]),
            ("cipher", facts["cipher"]),
            ("subject", facts["subject"]),
            ("issuer", facts["issuer"]),
            ("expiry", expiry_text(str(facts["not_after"]), int(facts["days_left"]))),
            (f"names {facts['server_name']}", match + verified),
        ]
        blocks.append(
            '<dl class="facts">'
            + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
            + "</dl>"
        )
    for server, outcome in (result.get("legacy_tls") or {}).items():
        blocks.append(
            f'<dl class="facts"><dt>{_e(server)}</dt>'
            f"<dd>TLS 1.0/1.1 offered: {_e(outcome)}</dd></dl>"
        )
    return "<h3>TLS</h3>" + "".join(blocks) if blocks else ""


def _badge(severity: str) -> str:
    kind = {"fail": "fail", "info": "info", "ok": "pass"}.get(severity, "warn")
    return f'<span class="sev {kind}">{_e(severity.upper())}</span>'


def _verdicts(result: Mapping[str, Any]) -> str:
    parts = []
    findings = result["findings"]
    if findings:
        items = "".join(
            f"<li>{_badge(str(f['severity']))}<code>{_e(f['code'])}</code> {_e(f['message'])}</li>"
            for f in findings
        )
        parts.append(f'<h3>Findings</h3><ul class="findings">{items}</ul>')
    checks = result["checks"]
    if checks:
        items = "".join(
            f"<li>{_badge('ok') if ok else _badge('fail')}{_e(name)}</li>"
            for name, ok in checks.items()
        )
        parts.append(f'<h3>Checks</h3><ul class="findings">{items}</ul>')
    hops = result.get("hops") or []
    if hops:
        rows = "".join(
            f"<tr><td>{_e(h['from_'] or '?')}</td><td>{_e(h['by'] or '?')}</td>"
            f"<td>{_e(h['with_'] or '?')}{'' if h['tls'] else ' (no TLS)'}</td></tr>"
            for h in hops
        )
        parts.append(
            "<h3>Received chain (oldest first)</h3><table><thead><tr><th>from</th><th>by</th>"
            f"<th>with</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    return "".join(parts)


def _run_section(result: Mapping[str, Any], number: int, runs: int) -> str:
    ok = bool(result["ok"])
    verdict = (
        '<span class="verdict pass">PASS</span>'
        if ok
        else f'<span class="verdict fail">FAIL at {_e(result["error_step"])}</span>'
    )
    which = f"run {number} of {runs}" if runs > 1 else "round trip"
    error = "" if ok else f'<pre class="error">{_e(result["error"])}</pre>'
    visible = result.get("time_to_visible")
    return (
        f'<section class="run"><h2 class="wrap">{verdict} {_e(result["smtp"])} → '
        f"{_e(result['retrieve'])}</h2>"
        f'<p class="muted wrap">{_e(which)}; total {_e(_ms(float(result["total_seconds"])))}; '
        f"time to visible {_e(_ms(None if visible is None else float(visible)))}; "
        f"token {_e(result['token'])}</p>{error}"
        f"{_waterfall(result)}{_tls(result)}{_verdicts(result)}</section>"
    )


def _shown(results: Sequence[Mapping[str, Any]]) -> Iterable[tuple[Mapping[str, Any], int, int]]:
    """(result, its run number, runs of its path) of every failed run and the last of each
    path."""
    totals: dict[tuple[str, str], int] = {}
    for r in results:
        key = (str(r["smtp"]), str(r["retrieve"]))
        totals[key] = totals.get(key, 0) + 1
    seen: dict[tuple[str, str], int] = {}
    for r in results:
        key = (str(r["smtp"]), str(r["retrieve"]))
        seen[key] = seen.get(key, 0) + 1
        if not r["ok"] or seen[key] == totals[key]:
            yield r, seen[key], totals[key]


def render(doc: Mapping[str, Any], *, now: datetime.datetime | None = None) -> str:
    """The probe document (``roundtrip probe --json``) as one self-contained HTML page.

    Args:
        doc: the document, with ``ok``, ``target``, ``results`` (``ProbeResult.as_dict()``).
        now: the time stamped on the page (the current time by default).

    Returns:
        The page: no script, no external resource; every server-supplied text escaped.
    """
    results: list[Mapping[str, Any]] = list(doc["results"])
    moment = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%d %H:%M:%S %Z")
    ok = bool(doc["ok"])
    failed = sum(1 for r in results if not r["ok"])
    paths: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in results:
        paths.setdefault((str(r["smtp"]), str(r["retrieve"])), []).append(r)
    sections = []
    if any(len(runs) > 1 for runs in paths.values()):
        sections.append("<h2>Latency</h2>")
        sections += [_path_section(s, r, runs) for (s, r), runs in paths.items()]
    shown = list(_shown(results))
    sections.append("<h2>Round trips</h2>")
    if len(shown) < len(results):
        sections.append(
            f'<p class="muted">Every failed run and the last run of each path are shown; '
            f"{len(results) - len(shown)} other passing runs are in the statistics above.</p>"
        )
    sections += [_run_section(r, n, total) for r, n, total in shown]
    verdict = "pass" if ok else "fail"
    title = f"roundtrip probe: {'PASS' if ok else 'FAIL'} {doc.get('target', '')}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # An empty inline icon: a browser asks for /favicon.ico otherwise.
        '<link rel="icon" href="data:,">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f'<h1><span class="verdict {verdict}">{"PASS" if ok else "FAIL"}</span> roundtrip probe'
        f'</h1><p class="wrap">{_e(doc.get("target", ""))}</p>'
        f'<p class="muted">{len(results)} round trips over {len(paths)} paths, {failed} failed; '
        f"written {_e(moment)}.</p>{''.join(sections)}</main></body></html>\n"
    )
