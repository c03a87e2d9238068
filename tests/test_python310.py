"""Python 3.10 (Ubuntu 22.04) stays possible: no name that only 3.11 or later has is used
anywhere in the project, tests included (mypy, set to 3.10, sees only the packages), and what
3.10's standard library parses differently is parsed by the project itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from unionfs.estargz.toc import _modtime_ns

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("registry", "whiteout", "unionfs", "tests", "benchmarks", "examples")
                 for p in (ROOT / d).rglob("*.py"))  # fmt: skip

# module -> names it gained in 3.11 or later that code might reach for
NEWER = {
    "datetime": {"UTC"},
    "typing": {"Self", "LiteralString", "Never", "NotRequired", "Required", "TypeVarTuple", "Unpack",
               "assert_never", "assert_type", "reveal_type", "dataclass_transform", "override"},
    "asyncio": {"TaskGroup", "timeout", "timeout_at", "Runner", "Barrier"},
    "enum": {"StrEnum", "ReprEnum", "verify", "member", "nonmember", "global_enum"},
    "hashlib": {"file_digest"},
    "contextlib": {"chdir"},
    "itertools": {"batched"},
}  # fmt: skip
NEWER_MODULES = {"tomllib", "wsgiref.types"}
NEWER_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def newer_uses(tree: ast.AST) -> list[str]:
    """Returns what `tree` uses that Python 3.10 lacks, as 'line: name'."""
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.attr in NEWER.get(node.value.id, ()):
                found.append(f"{line}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [f"{line}: from {node.module} import {a.name}" for a in node.names
                      if a.name in NEWER.get(node.module, ()) or node.module in NEWER_MODULES]  # fmt: skip
        elif isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name in NEWER_MODULES]
        elif isinstance(node, ast.Name) and node.id in NEWER_BUILTINS:
            found.append(f"{line}: {node.id}")
        elif type(node).__name__ == "TryStar":
            found.append(f"{line}: except*")
    return found


def test_no_source_uses_what_python_310_lacks() -> None:
    found = {str(p.relative_to(ROOT)): uses for p in SOURCES if (uses := newer_uses(ast.parse(p.read_bytes())))}
    assert found == {}


def test_the_scan_sees_what_it_looks_for() -> None:
    code = "import datetime, tomllib\nfrom typing import Self\nx = datetime.UTC\ny = ExceptionGroup"
    assert len(newer_uses(ast.parse(code))) == 4


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("2019-01-01T00:00:01Z", 1_546_300_801_000_000_000),
        ("2019-01-01T00:00:01.5Z", 1_546_300_801_500_000_000),  # Go trims trailing zeros
        ("2019-01-01T00:00:01.123456789Z", 1_546_300_801_123_456_789),  # RFC3339Nano: all 9 digits kept
        ("2019-01-01T00:00:01.12+02:00", 1_546_293_601_120_000_000),
        ("1969-12-31T23:59:59.25Z", -750_000_000),
    ],
)
def test_toc_modtimes_keep_every_fraction_go_writes(text: str, ns: int) -> None:
    assert _modtime_ns(text) == ns
