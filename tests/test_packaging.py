"""What the wheel ships: every runtime dependency is used by the package, and the package holds
only what users run (the Postfix + Dovecot driver for this repository's own tests and
benchmarks lives in benchmarks/)."""

from __future__ import annotations

import ast
import importlib.util
import re
import tomllib
from collections.abc import Iterable
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "roundtrip"


def _normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, requirement
    return _normalise(match.group())


def _top_level_imports(sources: Iterable[str]) -> set[str]:
    names: set[str] = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def unused_dependencies(requirements: Iterable[str], sources: Iterable[str]) -> list[str]:
    """The required distributions that no module in ``sources`` imports."""
    providers = packages_distributions()
    imported = {
        _normalise(dist)
        for module in _top_level_imports(sources)
        for dist in providers.get(module, ())
    }
    return sorted({_requirement_name(r) for r in requirements} - imported)


def _package_sources() -> list[str]:
    return [path.read_text(encoding="utf-8") for path in sorted(PACKAGE.rglob("*.py"))]


def test_packaging_every_runtime_dependency_is_imported_by_the_package() -> None:
    requirements = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "dependencies"
    ]
    assert unused_dependencies(requirements, _package_sources()) == []


def test_packaging_dependency_check_reports_an_unused_dependency() -> None:
    sources = ["import dns.message\nfrom trustme import CA\n"]
    assert unused_dependencies(["dnspython>=2.6", "trustme", "IMAPClient>=3.0"], sources) == [
        "imapclient"
    ]


def test_packaging_postfix_driver_is_not_in_the_package() -> None:
    assert importlib.util.find_spec("roundtrip.realstack") is None
    assert not any("/usr/sbin/postfix" in source for source in _package_sources())


def test_packaging_postfix_driver_is_importable_from_the_checkout() -> None:
    from benchmarks._realstack import RealMailServer

    ok, reason = RealMailServer.is_available()
    assert ok or reason
