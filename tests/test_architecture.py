"""The house rules of mmsr_cli's imports (docs/architecture.md), read from the source with ``ast``:

* the library never imports the CLI (``mmsr_cli.app``, ``mmsr_cli.commands``);
* library modules import each other without cycles, counting imports inside functions too (not
  those under ``if TYPE_CHECKING:``, which never run: annotations may name a higher layer's type);
* an import left inside a function says why on its line or the line above it (a heavy optional
  dependency, a lazy registry, the CLI's start-up time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmsr_cli"
CLI = ("mmsr_cli.app", "mmsr_cli.commands")
# The console script's entry points sit above the CLI: they import it and nothing imports them.
ENTRY = ("mmsr_cli.__main__", "mmsr_cli.entry")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_cli(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in CLI)


def is_library(name: str) -> bool:
    return not is_cli(name) and name not in ENTRY


def imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The mmsr_cli modules an import statement names: ``from .models.base import X`` names
    ``mmsr_cli.models.base`` (not the package above it), ``from . import codes`` the submodule."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")
            if MODULES[module].name != "__init__.py":
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
    return sorted({n for n in names if n in MODULES})


def imports(module: str) -> list[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import statement of ``module``: whether it sits inside a function, and whether it
    says why (a comment on its lines or the line above the run of imports it belongs to)."""
    lines = MODULES[module].read_text().splitlines()
    out = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for field in ("body", "orelse", "finalbody", "handlers"):
            body = getattr(node, field, None)
            if not isinstance(body, list):
                continue
            group: list[ast.stmt] = []
            for stmt in body + [None]:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    group.append(stmt)
                    continue
                if group:
                    span = range(group[0].lineno - 1, (group[-1].end_lineno or group[-1].lineno) + 1)
                    reason = any("#" in lines[i - 1] for i in span if i >= 1)
                    out.extend((s, in_function, reason) for s in group)
                    group = []
                if stmt is not None and not is_type_checking(stmt):
                    walk(stmt, in_function or isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)))

    walk(ast.parse("\n".join(lines)), False)
    return out


def is_type_checking(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)


def graph() -> dict[str, set[str]]:
    return {m: {t for node, _, _ in imports(m) for t in imported(m, node) if t != m} for m in MODULES}


def test_the_library_never_imports_the_cli():
    offenders = sorted(f"{m} imports {t}" for m, targets in graph().items() if is_library(m)
                       for t in targets if is_cli(t))
    assert not offenders, offenders


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges`` (as a closed path), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_library_modules_import_each_other_without_cycles():
    library = {m: {t for t in targets if is_library(t)} for m, targets in graph().items() if is_library(m)}
    cycle = find_cycle(library)
    assert cycle is None, " -> ".join(cycle)


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    # a package's registry importing its modules, which import the package's base module
    assert find_cycle({"p": {"p.x"}, "p.x": {"p.base"}, "p.base": set()}) is None


def test_imports_name_the_module_not_the_package_above_it():
    node = ast.parse("from .models.base import Recommender\nfrom . import codes\nfrom .models import build_model").body
    assert imported("mmsr_cli.training", node[0]) == ["mmsr_cli.models.base"]
    assert imported("mmsr_cli.training", node[1]) == ["mmsr_cli.codes"]
    assert imported("mmsr_cli.training", node[2]) == ["mmsr_cli.models"]
    assert imported("mmsr_cli.models", ast.parse("from .base import X").body[0]) == ["mmsr_cli.models.base"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_an_import_inside_a_function_says_why(module):
    lines = MODULES[module].read_text().splitlines()
    silent = [f"{MODULES[module].name}:{node.lineno}: {lines[node.lineno - 1].strip()}"
              for node, in_function, reason in imports(module) if in_function and not reason]
    assert not silent, "imports inside functions without a comment saying why: " + "; ".join(silent)
