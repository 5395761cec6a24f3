"""The import graph of the top-level packages follows docs/architecture.md: no cycles, and no dependency the
doc's table does not allow.  The table is parsed from the doc, so the two cannot drift apart.  Needs no root,
no kernel and no network: it only parses source files."""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

# the repository root, at whatever depth under tests/ this file lives
ROOT = next(p for p in Path(__file__).resolve().parents if (p / "docs" / "architecture.md").exists())
DOC = ROOT / "docs" / "architecture.md"
TABLE_HEAD = "## Allowed dependencies"
COMPOSITION_ROOT = Path("bootseer/cli.py")  # the CLI entry point may reach every part
UNCHECKED = {"tests"}  # tests may import anything


def packages(root: Path = ROOT) -> set[str]:
    """The repository's top-level Python packages (directories with an ``__init__.py``)."""
    return {p.parent.name for p in root.glob("*/__init__.py")}


def allowed_table(doc: Path = DOC) -> dict[str, set[str]]:
    """``package → packages it may import``, from the first Markdown table after :data:`TABLE_HEAD`."""
    text = doc.read_text()
    if TABLE_HEAD not in text:
        raise AssertionError(f"{doc}: no {TABLE_HEAD!r} section")
    rows: dict[str, set[str]] = {}
    in_table = False
    for line in text.split(TABLE_HEAD, 1)[1].splitlines():
        if not line.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or set(cells[0]) <= set("-: ") or cells[0] == "package":
            continue
        name = cells[0].strip("`")
        rows[name] = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[1]))
    if not rows:
        raise AssertionError(f"{doc}: the {TABLE_HEAD!r} table has no rows")
    return rows


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in a module, at any depth (functions,
    ``if TYPE_CHECKING:`` blocks); relative imports stay inside their package and are skipped."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def import_graph(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """``package → {imported package: ["path:line", ...]}`` between top-level packages."""
    pkgs = packages(root)
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in pkgs}
    for pkg in sorted(pkgs - UNCHECKED):
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root)
            if rel == COMPOSITION_ROOT:
                continue
            tree = ast.parse(path.read_text(), filename=str(rel))
            for line, module in imported_modules(tree):
                top = module.split(".")[0]
                if top in pkgs and top != pkg:
                    graph[pkg].setdefault(top, []).append(f"{rel}:{line}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of the graph as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_table_names_every_package() -> None:
    table = allowed_table()
    missing = packages() - UNCHECKED - set(table)
    assert not missing, f"packages without a row in {DOC.name}'s dependency table: {sorted(missing)}"
    unknown = (set(table) | {d for deps in table.values() for d in deps}) - packages()
    assert not unknown, f"{DOC.name} names packages that do not exist: {sorted(unknown)}"


def test_no_package_cycle() -> None:
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        where = "; ".join(f"{a} -> {b} ({graph[a][b][0]})" for a, b in itertools.pairwise(cycle))
        pytest.fail(f"package cycle {' -> '.join(cycle)}: {where}")


def test_only_allowed_dependencies() -> None:
    table = allowed_table()
    bad = [f"{pkg} -> {dep} ({', '.join(sites[:3])}{', …' if len(sites) > 3 else ''})"
           for pkg, deps in sorted(import_graph().items()) if pkg not in UNCHECKED
           for dep, sites in sorted(deps.items()) if dep not in table.get(pkg, set())]
    assert not bad, f"dependencies {DOC.name} does not allow:\n" + "\n".join(bad)


def test_the_checks_catch_what_they_should(tmp_path: Path) -> None:
    """The graph sees function-level and TYPE_CHECKING imports and finds a cycle through them."""
    for name, body in {"a": "import b.x\n", "b": "def f():\n    from c import y\n",
                       "c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(body)
    graph = import_graph(tmp_path)
    assert {p: set(d) for p, d in graph.items()} == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


MAX_MODULE_LINES = 700  # the old hubs (fetcher 801, registry 933 lines) were split below this; keep it so


def test_no_module_grows_back_into_a_hub() -> None:
    """A module past this size has, every time so far, held several reasons to change (issue 17: the fetcher's
    token bucket + scheduler + HTTP client + multipart parser, the registry's transport + manifests + blobs +
    referrers).  Split it along the data flow instead of raising the limit."""
    big = {}
    # not integration (benchmarks and the local stack) nor protos (generated code)
    for pkg in sorted(packages() - UNCHECKED - {"integration", "protos"}):
        for path in (ROOT / pkg).rglob("*.py"):
            n = len(path.read_text().splitlines())
            if n > MAX_MODULE_LINES:
                big[str(path.relative_to(ROOT))] = n
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"
