"""What loading the pytest plugin and starting a stack import (issue "Performance, round two").

Every pytest session of a project that installs roundtrip loads ``roundtrip.pytest_plugin``,
whether or not a test uses the stack: it must not pull in the stack, TLS, asyncio, the
certificate or DNS libraries. A started stack that no test has asked to parse MIME, probe a
server or open the web view must not have loaded those parts either. Each check runs in a
fresh interpreter (``sys.modules`` of this one is full of everything), and each has a twin
that loads a forbidden module on purpose and sees the check report it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Modules (and their submodules) the plugin must not import by itself.
PLUGIN_FORBIDDEN = (
    "ssl",
    "asyncio",
    "roundtrip.stack",
    "roundtrip.certs",
    "roundtrip.servers",
    "roundtrip.probes",
    "roundtrip.message",
    "trustme",
    "cryptography",
    "dns",
    "aiosmtpd",
    "aiosmtplib",
)

#: Modules a started stack must not have imported before a test uses what needs them.
STACK_FORBIDDEN = (
    "roundtrip.protocols._mime",  # IMAP FETCH of parts / SEARCH of headers (lazy)
    "roundtrip.probes.roundtrip",  # the validator's round trip (mailstack_probe)
    "roundtrip.web",  # --roundtrip-web
    "aiohttp",
    "imapclient",
    "smtplib",
    "poplib",
    "imaplib",
)

#: Loaded by a started stack today through modules owned elsewhere (the relay's MX client:
#: roundtrip/servers/_mxcache.py and _relayerrors.py import them at module level); a test
#: that sends no mail off its own domain never uses them.
STACK_DEFERRABLE = ("aiosmtplib", "dns.resolver")

_CHILD = """
import json, sys
{before}
loaded = set(sys.modules)
{code}
print(json.dumps(sorted(set(sys.modules) - loaded)))
"""


def _new_modules(code: str, before: str = "pass") -> list[str]:
    """The modules ``code`` imports in a fresh interpreter, after ``before`` ran."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD.format(before=before, code=code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    loaded: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded


def forbidden_in(loaded: list[str], forbidden: tuple[str, ...]) -> list[str]:
    """The modules of ``loaded`` that are, or are submodules of, one of ``forbidden``."""
    return sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden))


_PLUGIN = "import roundtrip.pytest_plugin"
_STACK = (
    "from roundtrip.stack import MailStack\n"
    "stack = MailStack().start()\n"
    "stack.reset()\n"
    "stack.stop()"
)


def test_startup_plugin_imports_nothing_heavy() -> None:
    loaded = _new_modules(_PLUGIN, before="import pytest")
    assert "roundtrip.pytest_plugin" in loaded
    assert forbidden_in(loaded, PLUGIN_FORBIDDEN) == []


def test_startup_plugin_check_sees_a_forbidden_import() -> None:
    loaded = _new_modules(_PLUGIN + "\nimport ssl", before="import pytest")
    assert forbidden_in(loaded, PLUGIN_FORBIDDEN) == ["ssl"]


def test_startup_started_stack_leaves_unused_parts_out() -> None:
    loaded = _new_modules(_STACK, before="import pytest, roundtrip.pytest_plugin")
    assert "roundtrip.servers.imap" in loaded  # the stack did start
    assert forbidden_in(loaded, STACK_FORBIDDEN) == []


def test_startup_started_stack_check_sees_a_forbidden_import() -> None:
    code = _STACK + "\nimport roundtrip.protocols._mime"
    loaded = _new_modules(code, before="import pytest, roundtrip.pytest_plugin")
    assert forbidden_in(loaded, STACK_FORBIDDEN) == ["roundtrip.protocols._mime"]


_FETCH = """
from roundtrip.protocols import _imapfetch
class Message:
    uid, size, internal_date, flags, cache = 1, 48, 0.0, frozenset(), {{}}
    raw = b"Subject: hi\\r\\nContent-Type: text/plain\\r\\n\\r\\nbody\\r\\n"
got = _imapfetch.render_item(Message(), _imapfetch.parse_fetch_items("{item}")[0])
assert got.startswith(b"{expect}"), got
"""


def test_startup_mime_parser_loads_when_a_fetch_needs_it() -> None:
    before = "import roundtrip.protocols.imap"
    code = _FETCH.format(item="BODYSTRUCTURE", expect='BODYSTRUCTURE (\\"TEXT\\" \\"PLAIN\\"')
    assert "roundtrip.protocols._mime" in _new_modules(code, before=before)
    code = _FETCH.format(item="RFC822.SIZE", expect="RFC822.SIZE 48")
    assert "roundtrip.protocols._mime" not in _new_modules(code, before=before)


def test_startup_started_stack_leaves_the_mx_client_out() -> None:
    """The relay's SMTP client (aiosmtplib) and resolver (dns.resolver) load on the first
    delivery to an MX, not at start: about 35 ms a test that sends no mail never pays."""
    loaded = _new_modules(_STACK, before="import pytest, roundtrip.pytest_plugin")
    assert forbidden_in(loaded, STACK_DEFERRABLE) == []
