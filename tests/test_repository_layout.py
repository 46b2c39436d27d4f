"""The data plane's layout (core/repository): its modules import one another without a
cycle, counting imports inside functions and under TYPE_CHECKING, which hide cycles from the
interpreter; and no module is long without saying why in its first comment."""

from __future__ import annotations

import ast
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1] / "core" / "repository"
PACKAGE = "regionvault.core.repository"
#: a module longer than this says why in its docstring (issue 14)
MAX_LINES = 600
REASON = "Why this module is longer than the others:"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(REPOSITORY.rglob("*.py")):
        parts = path.relative_to(REPOSITORY).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((PACKAGE, *parts))] = path
    return found


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The data-plane modules ``module`` imports anywhere in its text. ``from package import
    submodule`` imports the submodule, as the interpreter (and import-linter) count it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in known:
                    found.add(submodule)
                elif node.module in known:
                    found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
    found.discard(module)
    return found


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None (depth-first, bounded by the graph's size)."""
    done: set[str] = set()
    for start in sorted(graph):
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        on_path = [start]
        while stack:
            node, pending = stack[-1]
            if not pending:
                stack.pop()
                on_path.pop()
                done.add(node)
                continue
            nxt = pending.pop()
            if nxt in on_path:
                return [*on_path[on_path.index(nxt) :], nxt]
            if nxt not in done:
                stack.append((nxt, sorted(graph[nxt])))
                on_path.append(nxt)
    return None


def test_the_data_plane_imports_without_a_cycle_late_imports_included() -> None:
    known = modules()
    assert f"{PACKAGE}.repository" in known  # the walk found the data plane
    graph = {module: imports(module, path, known) for module, path in known.items()}
    found = cycle(graph)
    assert found is None, " -> ".join(found)


def test_cycle_finds_a_late_import_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycle(graph) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_a_long_module_says_why_in_its_first_comment() -> None:
    unexplained = []
    for path in modules().values():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_LINES and REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            unexplained.append(f"{path.relative_to(REPOSITORY)} ({lines} lines)")
    assert not unexplained, f"longer than {MAX_LINES} lines, with no {REASON!r}: {unexplained}"
