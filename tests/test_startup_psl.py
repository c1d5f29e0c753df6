"""The Public Suffix List (about 50 ms to read) is read only when DMARC needs it.

A stack's own mail names the domain that publishes the policy and aligns with itself, so
starting a stack and relaying between its domains never reads it; a From domain without a
record of its own, whose organizational domain must be found, does.
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import smtplib, sys
from roundtrip import MailStack

with MailStack() as stack:
    sender = stack.user("example.com")
    host, port = stack.endpoints("example.com").address("submissions")
    # news.example.com publishes no record: its organizational domain's applies.
    from_ = sender.address if sys.argv[1] == "own" else "news@news.example.com"
    with smtplib.SMTP_SSL(host, port, context=stack.client_context(), timeout=10) as smtp:
        smtp.login(sender.address, sender.password)
        smtp.sendmail(sender.address, ["user@example.org"],
                      f"From: {from_}\\r\\nSubject: psl\\r\\n\\r\\nhi\\r\\n")
    stack.wait_for("user@example.org", subject="psl", timeout=10)
    print("loaded" if "publicsuffixlist" in sys.modules else "not loaded")
"""


def _run(mode: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_startup_psl_not_read_for_a_stacks_own_mail() -> None:
    assert _run("own") == "not loaded"


def test_startup_psl_read_when_the_from_domain_publishes_no_record() -> None:
    """The twin: relaxed alignment of news.example.com needs the organizational domain."""
    assert _run("subdomain") == "loaded"
