"""Imports point down only (docs/design.md, layers), checked on the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "roundtrip"

# Lower number = lower layer. A module may import only from layers strictly below, or its own
# package's private helpers (same layer) where noted.
LAYER = {
    "errors": 0,
    "config": 1,
    "report": 1,
    "_headerblock": 1,
    "protocols": 2,
    "store": 2,
    "certs": 2,
    "message": 2,
    "corpus": 2,
    "spool": 2,
    "_maildirfmt": 2,
    "assertions": 3,
    "maildir": 3,
    "servers": 3,
    "probes": 3,
    "htmlreport": 2,
    "stack": 4,
    "exporter": 4,
    "testing": 5,
    "web": 5,
    "pytest_plugin": 6,
    "cli": 6,
    "__init__": 7,
    "__main__": 7,
}
FORBIDDEN_IN_PROTOCOLS = {"asyncio", "socket", "ssl", "threading", "time", "logging"}


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(source: str, module: tuple[str, ...]) -> list[tuple[str, int]]:
    """(absolute module name, line) for each import in ``source`` of module ``module``."""
    tree = ast.parse(source)
    package = list(module[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((name, node.lineno))
    return out


def _module(path: Path) -> tuple[str, ...]:
    return path.relative_to(PACKAGE.parent).with_suffix("").parts


def violations(unit: str, module: tuple[str, ...], source: str) -> list[str]:
    """Every import in ``source`` that breaks the layering rules."""
    found = []
    for name, line in _imports(source, module):
        if not name.startswith("roundtrip.") or unit in ("__init__", "__main__"):
            continue
        target = name.split(".")[1]
        if target == unit:
            continue  # inside the same package or module
        if LAYER[target] >= LAYER[unit]:
            found.append(f"{module[-1]}:{line} imports {name} (layer of {target})")
        elif unit == "probes" and target not in ("errors", "config", "certs", "_headerblock"):
            found.append(
                f"{module[-1]}:{line}: probes import only errors, config, certs, _headerblock"
            )
        elif unit == "servers" and target == "probes":
            found.append(f"{module[-1]}:{line}: servers must not import probes")
    if unit == "protocols":
        for name, line in _imports(source, module):
            if name.split(".")[0] in FORBIDDEN_IN_PROTOCOLS or name.startswith("roundtrip.store"):
                found.append(f"{module[-1]}:{line}: sans-IO module imports {name}")
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layering_imports_point_down(path: Path) -> None:
    assert violations(_unit(path), _module(path), path.read_text(encoding="utf-8")) == []


def test_layering_only_the_plugin_imports_pytest() -> None:
    for path in SOURCES:
        if path.name == "pytest_plugin.py":
            continue
        names = [n for n, _ in _imports(path.read_text(encoding="utf-8"), _module(path))]
        assert "pytest" not in names, f"{path.name} imports pytest"


@pytest.mark.parametrize(
    ("unit", "module", "source", "expected"),
    [
        (
            "protocols",
            ("roundtrip", "protocols", "x"),
            "from ..stack import MailStack\n",
            "imports roundtrip.stack",
        ),
        ("protocols", ("roundtrip", "protocols", "x"), "import asyncio\n", "imports asyncio"),
        (
            "protocols",
            ("roundtrip", "protocols", "x"),
            "from ..store import Store\n",
            "imports roundtrip.store",
        ),
        (
            "probes",
            ("roundtrip", "probes", "x"),
            "from ..store import Store\n",
            "probes import only",
        ),
        (
            "servers",
            ("roundtrip", "servers", "x"),
            "from ..stack import MailStack\n",
            "imports roundtrip.stack",
        ),
    ],
)
def test_layering_checker_reports_upward_imports(
    unit: str, module: tuple[str, ...], source: str, expected: str
) -> None:
    found = violations(unit, module, source)
    assert found and expected in found[0]
