"""Start-up cost: a test imports only what it uses (issue #17).

DKIM is off by default (``StackConfig.dkim``), so the stack modules that run DKIM import
``roundtrip.protocols.dkim`` (and dkimpy, ~10 ms with its DNS plug-in) only where it runs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_LAZY_DKIM = ("roundtrip/stack/_dkim.py", "roundtrip/stack/_delivery.py")


def _eager_dkim_imports(source: str) -> list[int]:
    """Lines of module-level imports of ``protocols.dkim`` outside ``if TYPE_CHECKING:``."""
    lines = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("protocols.dkim"):
            lines.append(node.lineno)
        if isinstance(node, ast.Import) and any(a.name == "dkim" for a in node.names):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", _LAZY_DKIM)
def test_startup_dkim_is_imported_where_it_runs(path: str) -> None:
    source = (REPO / path).read_text(encoding="utf-8")
    assert _eager_dkim_imports(source) == [], f"{path} imports DKIM at module level"


def test_startup_eager_dkim_import_is_caught() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from ..protocols.dkim import sign\n"
        "import dkim\n"
        "if TYPE_CHECKING:\n"
        "    from ..protocols.dkim import SigningKey\n"
        "def f():\n"
        "    from ..protocols.dkim import verify\n"
    )
    assert _eager_dkim_imports(source) == [2, 3]


def test_startup_mailstack_import_leaves_dkimpy_out() -> None:
    code = "import sys\nfrom roundtrip import MailStack\nprint('dkim' in sys.modules)\n"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "False"
